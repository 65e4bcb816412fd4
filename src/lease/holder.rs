//! The holder's side of a lease: when it must stop acting, by its own clock.
//!
//! The witness counts a grant or renewal from when it *received* the request, by its own
//! monotonic clock, and will grant the lease to another manager only `lease_ms` later on that
//! clock. The holder cannot see that clock; it knows only when it *sent* the request, which
//! was earlier in true time. Clocks tick at rates that differ from true time by at most
//! `drift_ppm` parts per million (a configured bound), so `lease_ms` on the witness's clock
//! lasts at least `lease_ms / (1 + ρ)` of true time, and `d` on the holder's clock is at most
//! `d / (1 - ρ)` of true time. The holder therefore stops after
//! `lease_ms · (1 - ρ) / (1 + ρ)` by its own clock, counted from the send, less a margin for
//! the time between checking the deadline and the last action it takes.
//!
//! Invariants:
//! - [`Deadline::after_send`] is never later than the earliest true time at which the witness
//!   could expire the lease, for every pair of clock rates within the bound (unit test below,
//!   and the simulation with `Rules::drift_margin` off shows what breaks without it).
//! - A deadline only moves forward: a late reply to an older renewal never extends it past
//!   what a newer one gave, and never shortens it either (`extend`).

/// Parts per million.
const PPM: f64 = 1_000_000.0;

/// The configured bounds the deadline is computed from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HolderBounds {
    /// Lease duration granted by the witness, by its clock.
    pub lease_ms: u32,
    /// Largest clock-rate difference from true time of any clock involved, in ppm.
    pub drift_ppm: u32,
    /// Subtracted from every deadline: the longest a holder takes between checking that it
    /// is active and finishing an action.
    pub margin_ms: u32,
}

impl HolderBounds {
    /// How long after sending a request the holder may act on its grant, by its own clock,
    /// in nanoseconds; zero when the margin eats the whole lease.
    pub fn safe_span_ns(&self) -> u64 {
        let rate = self.drift_ppm as f64 / PPM;
        let span_ms = self.lease_ms as f64 * (1.0 - rate) / (1.0 + rate) - self.margin_ms as f64;
        if span_ms <= 0.0 {
            return 0;
        }
        // Rounded down: a nanosecond early is safe, a nanosecond late is not.
        (span_ms * 1e6).floor() as u64
    }
}

/// The local time until which a holder may act as active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Deadline {
    until_ns: u64,
}

impl Deadline {
    /// The deadline a grant or renewal gives, for a request sent at `sent_ns` (local clock).
    pub fn after_send(bounds: &HolderBounds, sent_ns: u64) -> Self {
        Self {
            until_ns: sent_ns.saturating_add(bounds.safe_span_ns()),
        }
    }

    /// Keeps the later of the two deadlines.
    pub fn extend(&mut self, other: Deadline) {
        self.until_ns = self.until_ns.max(other.until_ns);
    }

    /// Whether the holder may still act at local time `now_ns`.
    pub fn allows(&self, now_ns: u64) -> bool {
        now_ns < self.until_ns
    }

    /// Time left at `now_ns`, in nanoseconds (zero once passed).
    pub fn remaining_ns(&self, now_ns: u64) -> u64 {
        self.until_ns.saturating_sub(now_ns)
    }

    /// The deadline, in local nanoseconds.
    pub fn until_ns(&self) -> u64 {
        self.until_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(drift_ppm: u32, margin_ms: u32) -> HolderBounds {
        HolderBounds {
            lease_ms: 4_000,
            drift_ppm,
            margin_ms,
        }
    }

    #[test]
    fn deadline_precedes_the_witness_expiry_at_every_rate_within_the_bound() {
        // Goal: the holder stops before the witness could expire the lease. Method: holder
        // and witness clock rates at the extremes and in between of ±ρ; the request takes 0
        // or 300 ms of true time to arrive; compare true times of both.
        let b = bounds(10_000, 0); // 1%: larger than any real clock, so errors show
        let rho = 0.01;
        for holder_rate in [1.0 - rho, 1.0, 1.0 + rho] {
            for witness_rate in [1.0 - rho, 1.0, 1.0 + rho] {
                for transit_s in [0.0, 0.3] {
                    let sent_true_s = 10.0;
                    let holder_stops_true_s =
                        sent_true_s + b.safe_span_ns() as f64 / 1e9 / holder_rate;
                    let witness_expires_true_s =
                        sent_true_s + transit_s + b.lease_ms as f64 / 1e3 / witness_rate;
                    assert!(
                        holder_stops_true_s <= witness_expires_true_s,
                        "rates {holder_rate}/{witness_rate}: {holder_stops_true_s} > \
                         {witness_expires_true_s}"
                    );
                }
            }
        }
    }

    #[test]
    fn margin_and_drift_shrink_the_span() {
        // Goal: the formula as documented. Method: known values.
        assert_eq!(bounds(0, 0).safe_span_ns(), 4_000_000_000);
        let with_drift = bounds(1_000, 0).safe_span_ns();
        assert!(
            with_drift < 4_000_000_000 && with_drift > 3_990_000_000,
            "{with_drift}"
        );
        assert_eq!(bounds(0, 100).safe_span_ns(), 3_900_000_000);
        assert_eq!(bounds(0, 5_000).safe_span_ns(), 0);
    }

    #[test]
    fn deadline_only_moves_forward() {
        // Goal: a late reply to an older renewal never shortens the deadline. Method: extend
        // with an earlier deadline, then a later one.
        let b = bounds(0, 0);
        let mut deadline = Deadline::after_send(&b, 2_000_000_000);
        deadline.extend(Deadline::after_send(&b, 1_000_000_000));
        assert_eq!(deadline.until_ns(), 6_000_000_000);
        deadline.extend(Deadline::after_send(&b, 3_000_000_000));
        assert_eq!(deadline.until_ns(), 7_000_000_000);
        assert!(deadline.allows(6_999_999_999));
        assert!(!deadline.allows(7_000_000_000));
        assert_eq!(deadline.remaining_ns(8_000_000_000), 0);
    }
}
