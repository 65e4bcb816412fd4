//! Guest priority during the bulk copy: the copy's bandwidth backs off when the guest's write
//! latency rises, and grows back when it falls (multiplicative decrease, gentle increase).
//!
//! Purpose: on a shared disk a full-speed copy saturates the device and the guest's writes
//! queue behind it (measured: 20000 IOPS fell to ~4.5k with p99 18 ms). The signal is the
//! export's own write-latency histogram, which the sessions merge every 200 ms, compared over
//! windows of at least [`WINDOW_NS`].
//!
//! Invariants: pure (time and latency come in as arguments); the rate never drops below
//! [`FLOOR_BYTES_PER_S`], so the copy always progresses; with a quiet guest the cap is lifted.

use crate::metrics::LatencyRecorder;

/// Shortest window the guest's latency is judged over.
pub const WINDOW_NS: u64 = 250_000_000;
/// Guest write p99 above which the copy backs off.
pub const TARGET_P99_US: u64 = 4_000;
/// The copy never goes slower than this.
pub const FLOOR_BYTES_PER_S: u64 = 64 << 20;
/// Above this the cap is lifted altogether.
pub const CEILING_BYTES_PER_S: u64 = 4 << 30;
/// Fewer guest writes than this in a window: the guest is quiet, nothing to protect.
const QUIET_WRITES: u64 = 20;

/// The controller of one job.
#[derive(Debug)]
pub struct GuestBackoff {
    /// Guest write p99 above which the copy backs off.
    target_p99_us: u64,
    rate_bytes_per_s: Option<u64>,
    window_start_ns: u64,
    before: LatencyRecorder,
}

impl GuestBackoff {
    /// Starts uncapped, judging from `now_ns` on, `latency` being the export's recorder now.
    pub fn new(now_ns: u64, latency: &LatencyRecorder) -> Self {
        GuestBackoff {
            target_p99_us: TARGET_P99_US,
            rate_bytes_per_s: None,
            window_start_ns: now_ns,
            before: latency.clone(),
        }
    }

    /// The same, backing off above `target_p99_us` instead of [`TARGET_P99_US`].
    pub fn with_target_us(mut self, target_p99_us: u64) -> Self {
        self.target_p99_us = target_p99_us.max(1);
        self
    }

    /// The cap to use for the next send (None: uncapped). `copy_bytes_per_s` is the copy rate
    /// measured so far, the starting point of the first back-off.
    pub fn observe(
        &mut self,
        now_ns: u64,
        latency: &LatencyRecorder,
        copy_bytes_per_s: Option<f64>,
    ) -> Option<u64> {
        if now_ns.saturating_sub(self.window_start_ns) < WINDOW_NS {
            return self.rate_bytes_per_s;
        }
        let mut window = latency.clone();
        window.subtract(&self.before);
        self.before = latency.clone();
        self.window_start_ns = now_ns;
        let busy = window.count() >= QUIET_WRITES;
        self.rate_bytes_per_s = if busy && window.summary().p99 > self.target_p99_us {
            let current = self
                .rate_bytes_per_s
                .or(copy_bytes_per_s.map(|r| r as u64))
                .unwrap_or(CEILING_BYTES_PER_S);
            Some((current / 2).max(FLOOR_BYTES_PER_S))
        } else {
            let grown = self
                .rate_bytes_per_s
                .map(|r| if busy { r + r / 4 } else { r * 2 });
            grown.filter(|&r| r < CEILING_BYTES_PER_S)
        };
        self.rate_bytes_per_s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(latencies_us: &[u64]) -> LatencyRecorder {
        let mut recorder = LatencyRecorder::new();
        for &l in latencies_us {
            recorder.record_us(l);
        }
        recorder
    }

    // Goal: slow guest writes halve the copy rate down to the floor, fast ones let it grow
    // back, a quiet guest lifts the cap; nothing changes within a window. Method: feed
    // cumulative recorders window by window.
    #[test]
    fn backs_off_and_recovers() {
        let mut recorder = LatencyRecorder::new();
        let mut backoff = GuestBackoff::new(0, &recorder);
        recorder.merge_from(&with(&[20_000; 100]));
        assert_eq!(
            backoff.observe(WINDOW_NS / 2, &recorder, Some(600e6)),
            None,
            "same window"
        );
        let first = backoff
            .observe(WINDOW_NS, &recorder, Some(600e6))
            .expect("capped");
        assert_eq!(first, 300_000_000);
        let mut now = WINDOW_NS;
        let mut rate = first;
        for _ in 0..10 {
            now += WINDOW_NS;
            recorder.merge_from(&with(&[20_000; 100]));
            rate = backoff.observe(now, &recorder, None).expect("capped");
        }
        assert_eq!(rate, FLOOR_BYTES_PER_S, "never below the floor");
        now += WINDOW_NS;
        recorder.merge_from(&with(&[500; 100]));
        let grown = backoff.observe(now, &recorder, None).expect("still capped");
        assert_eq!(grown, FLOOR_BYTES_PER_S + FLOOR_BYTES_PER_S / 4);
        for _ in 0..20 {
            now += WINDOW_NS;
            // Quiet guest: no new samples.
            if backoff.observe(now, &recorder, None).is_none() {
                return;
            }
        }
        panic!("a quiet guest must lift the cap");
    }
}
