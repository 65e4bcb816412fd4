//! Bandwidth cap of a block stream: a token bucket in virtual time.
//!
//! `paid_until_ns` is the instant at which every byte sent so far is paid for at the rate.
//! Sending `n` bytes advances it by `n / rate`; the sender sleeps until it is not in the
//! future. Idle time earns credit, but at most [`BURST_NS`] worth, so a stream that was idle
//! cannot then exceed the cap for long.
//!
//! Invariants: over any window of `t` ns the pacer lets through at most
//! `rate * (t + BURST_NS) / 1e9` bytes (plus the one frame that started the wait); with no
//! cap it never delays. It reads no clock itself: callers pass `now_ns` from a
//! [`Clock`], so tests drive it with a `ManualClock`.

use std::time::Duration;

use crate::env::Clock;

/// Credit an idle stream may accumulate (100 ms at the configured rate).
pub const BURST_NS: u64 = 100_000_000;

/// Token-bucket pacer of one stream.
#[derive(Debug, Clone)]
pub struct Pacer {
    bytes_per_s: Option<u64>,
    paid_until_ns: u64,
}

impl Pacer {
    /// A pacer capping the stream at `bytes_per_s` (None or 0: no cap).
    pub fn new(bytes_per_s: Option<u64>) -> Pacer {
        Pacer {
            bytes_per_s: bytes_per_s.filter(|&rate| rate > 0),
            paid_until_ns: 0,
        }
    }

    /// The cap, if any.
    pub fn bytes_per_s(&self) -> Option<u64> {
        self.bytes_per_s
    }

    /// Accounts `bytes` about to be sent at `now_ns`; returns how long to sleep first.
    pub fn delay_for(&mut self, bytes: u64, now_ns: u64) -> Duration {
        let Some(rate) = self.bytes_per_s else {
            return Duration::ZERO;
        };
        let cost_ns = u128::from(bytes) * 1_000_000_000 / u128::from(rate);
        let cost_ns = u64::try_from(cost_ns).unwrap_or(u64::MAX);
        let start_ns = self.paid_until_ns.max(now_ns.saturating_sub(BURST_NS));
        self.paid_until_ns = start_ns.saturating_add(cost_ns);
        Duration::from_nanos(self.paid_until_ns.saturating_sub(now_ns))
    }

    /// [`Pacer::delay_for`] at the clock's current time.
    pub fn delay_now(&mut self, bytes: u64, clock: &dyn Clock) -> Duration {
        self.delay_for(bytes, clock.now_ns())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::ManualClock;

    const MIB: u64 = 1 << 20;

    // Goal: without a cap nothing waits. Method: huge sends at time 0.
    #[test]
    fn uncapped_never_delays() {
        let mut pacer = Pacer::new(None);
        assert_eq!(pacer.delay_for(u64::MAX, 0), Duration::ZERO);
        let mut zero = Pacer::new(Some(0));
        assert_eq!(zero.delay_for(1 << 40, 5), Duration::ZERO);
    }

    // Goal: a saturating sender gets exactly the rate. Method: at 10 MiB/s, send 1 MiB frames,
    // advancing a ManualClock by each delay; 100 MiB must take 10 s minus the 100 ms burst.
    #[test]
    fn steady_rate_matches_cap() {
        let clock = ManualClock::new(5_000_000_000);
        let mut pacer = Pacer::new(Some(10 * MIB));
        for _ in 0..100 {
            let delay = pacer.delay_now(MIB, &clock);
            clock.advance_ns(u64::try_from(delay.as_nanos()).unwrap());
        }
        let elapsed_ns = clock.now_ns() - 5_000_000_000;
        assert_eq!(elapsed_ns, 10_000_000_000 - BURST_NS);
    }

    // Goal: idle time earns at most BURST_NS of credit. Method: idle 60 s, then the first
    // 1 MiB (= the burst at 10 MiB/s) passes free and the next waits its full cost.
    #[test]
    fn idle_credit_is_bounded() {
        let mut pacer = Pacer::new(Some(10 * MIB));
        let now = 60_000_000_000;
        assert_eq!(pacer.delay_for(MIB, now), Duration::ZERO);
        assert_eq!(pacer.delay_for(MIB, now), Duration::from_millis(100));
        assert_eq!(pacer.delay_for(MIB / 2, now), Duration::from_millis(150));
    }
}
