//! Convergence forecast: measured copy bandwidth against measured dirty rate.
//!
//! Purpose: the heat policy asks "can the hot and dirty blocks be sent within the pause
//! budget?" ([`Forecast::pause_estimate_ms`]) and "will another pass ever catch up with the
//! guest?" ([`Forecast::converges`]); the progress bar shows both rates and an ETA.
//!
//! Invariants:
//! - Every input is a measurement the env reported (DESIGN.md invariant 5): bytes and elapsed
//!   time of each `send`, and the number of blocks newly dirtied between two takes. Nothing
//!   here reads a clock.
//! - Without a bandwidth sample there is no pause estimate (`None`), so a switchover is never
//!   attempted on a guess.
//! - Estimates lean pessimistic: the bandwidth is divided by [`PAUSE_SAFETY`] and the largest
//!   recent per-send overhead is added, because an over-budget pause cannot be undone while a
//!   deferred switchover costs only another pass.

use std::collections::VecDeque;

/// Weight of a new sample in the moving averages.
const EWMA_WEIGHT: f64 = 0.3;
/// Factor applied to the send time a pause estimate predicts.
pub const PAUSE_SAFETY: f64 = 1.25;
/// The dirty rate must stay below this fraction of the copy rate for a pass to gain ground.
pub const CONVERGE_MARGIN: f64 = 0.9;
/// Number of recent sends whose overhead is remembered.
const OVERHEAD_WINDOW: usize = 16;
/// Number of pass-start dirty counts remembered.
const HISTORY_WINDOW: usize = 16;

/// Moving averages of what the migration measured; see the module docs.
#[derive(Debug, Clone)]
pub struct Forecast {
    /// Copy bandwidth in disk bytes per second (data and zero extents), EWMA.
    copy_bytes_per_s: Option<f64>,
    /// The same, of the sends no cap slowed: what a final send (never capped) may expect.
    uncapped_bytes_per_s: Option<f64>,
    /// Bytes newly dirtied per second between takes, EWMA.
    dirty_bytes_per_s: Option<f64>,
    /// Recent per-send time beyond what the bandwidth explains, in nanoseconds.
    overhead_ns: VecDeque<f64>,
    /// A round trip to the destination measured since the last send (a sync with little
    /// or nothing to flush).
    round_trip_ns: Option<u64>,
    /// Elapsed times of the same recent sends, in nanoseconds.
    send_ns: VecDeque<u64>,
    /// Dirty blocks at the start of recent passes, oldest first.
    pass_dirty_blocks: VecDeque<u64>,
    /// Passes without shrinking after which [`Forecast::converges`] says no.
    stall_passes: u32,
}

impl Forecast {
    /// An empty forecast; `stall_passes` passes without a smaller dirty set mean "stalled".
    pub fn new(stall_passes: u32) -> Self {
        assert!(stall_passes > 0, "stall_passes must be positive");
        Self {
            copy_bytes_per_s: None,
            uncapped_bytes_per_s: None,
            dirty_bytes_per_s: None,
            overhead_ns: VecDeque::with_capacity(OVERHEAD_WINDOW),
            round_trip_ns: None,
            send_ns: VecDeque::with_capacity(OVERHEAD_WINDOW),
            pass_dirty_blocks: VecDeque::with_capacity(HISTORY_WINDOW),
            stall_passes,
        }
    }

    /// Records one send of `bytes` (data plus zero extents) that took `elapsed_ns`.
    pub fn record_send(&mut self, bytes: u64, elapsed_ns: u64) {
        self.record_send_capped(bytes, elapsed_ns, false);
    }

    /// Records a send as [`Forecast::record_send`] does; `capped`: a rate cap slowed it (the
    /// copy controller's), so it says nothing of what an uncapped final send takes.
    pub fn record_send_capped(&mut self, bytes: u64, elapsed_ns: u64, capped: bool) {
        if bytes == 0 || elapsed_ns == 0 {
            return; // nothing measurable: an empty send or a clock that did not move
        }
        let sample = bytes as f64 * 1e9 / elapsed_ns as f64;
        let bandwidth = ewma(self.copy_bytes_per_s, sample);
        self.copy_bytes_per_s = Some(bandwidth);
        if !capped {
            self.uncapped_bytes_per_s = Some(ewma(self.uncapped_bytes_per_s, sample));
        }
        let overhead_ns = (elapsed_ns as f64 - bytes as f64 * 1e9 / bandwidth).max(0.0);
        if self.overhead_ns.len() == OVERHEAD_WINDOW {
            self.overhead_ns.pop_front();
            self.send_ns.pop_front();
        }
        self.overhead_ns.push_back(overhead_ns);
        self.send_ns.push_back(elapsed_ns);
        self.round_trip_ns = None;
    }

    /// Records a round trip to the destination just measured (see
    /// [`Forecast::ending_estimate_ms`]).
    pub fn record_round_trip(&mut self, round_trip_ns: u64) {
        self.round_trip_ns = Some(round_trip_ns);
    }

    /// Records that `new_blocks` blocks of `granularity_bytes` became dirty over `interval_ns`.
    pub fn record_dirty(&mut self, new_blocks: u64, granularity_bytes: u64, interval_ns: u64) {
        if interval_ns == 0 {
            return;
        }
        let sample = (new_blocks * granularity_bytes) as f64 * 1e9 / interval_ns as f64;
        self.dirty_bytes_per_s = Some(ewma(self.dirty_bytes_per_s, sample));
    }

    /// Records the dirty set's size at the start of a pass.
    pub fn record_pass_start(&mut self, dirty_blocks: u64) {
        if self.pass_dirty_blocks.len() == HISTORY_WINDOW {
            self.pass_dirty_blocks.pop_front();
        }
        self.pass_dirty_blocks.push_back(dirty_blocks);
    }

    /// Measured copy bandwidth, bytes per second.
    pub fn copy_bytes_per_s(&self) -> Option<f64> {
        self.copy_bytes_per_s
    }

    /// Measured dirty rate, bytes per second.
    pub fn dirty_bytes_per_s(&self) -> Option<f64> {
        self.dirty_bytes_per_s
    }

    /// Forecast time to send `bytes` in one go, in milliseconds; `None` before any send was
    /// measured. Pessimistic: see [`PAUSE_SAFETY`]. At the bandwidth of uncapped sends when
    /// there were any (the final send is never capped).
    pub fn pause_estimate_ms(&self, bytes: u64) -> Option<f64> {
        let bandwidth = self.uncapped_bytes_per_s.or(self.copy_bytes_per_s)?;
        let overhead_ns = self.overhead_ns.iter().copied().fold(0.0, f64::max);
        let send_ns = bytes as f64 * 1e9 / bandwidth * PAUSE_SAFETY;
        Some((send_ns + overhead_ns) / 1e6)
    }

    /// Forecast time of a final step with nothing to send (the commit or in-sync mark
    /// alone), in milliseconds; `None` before any send was measured. Two measurements bound
    /// it from above, and the lower one is taken: the largest recent per-send overhead (a
    /// send's fixed costs, a round trip among them), and the quickest recent send (each
    /// ended with a round trip to the destination, as the commit does). The overhead alone
    /// would also charge slow source reads, which an empty final step does not do and which
    /// no later send refreshes once nothing is left to send; the quickest send alone would
    /// charge the data of large passes.
    ///
    /// A round trip measured since the last send replaces both: it is what the ending's own
    /// will cost, and it is measured again at each attempt, so a switchover with nothing left
    /// to send is never deferred forever on figures no later send refreshes.
    pub fn ending_estimate_ms(&self) -> Option<f64> {
        if let Some(round_trip_ns) = self.round_trip_ns {
            return Some(round_trip_ns as f64 / 1e6);
        }
        let quickest_ns = *self.send_ns.iter().min()? as f64;
        let overhead_ns = self.overhead_ns.iter().copied().fold(0.0, f64::max);
        Some(quickest_ns.min(overhead_ns) / 1e6)
    }

    /// Whether the last `stall_passes` passes all started with more dirty blocks than the
    /// smallest set seen before them: no new minimum, so iterating stopped gaining. (A
    /// minimum, not neighbours: the set size wobbles from pass to pass under a steady load.)
    pub fn stalled(&self) -> bool {
        let recent = self.stall_passes as usize;
        if self.pass_dirty_blocks.len() <= recent {
            return false;
        }
        let split = self.pass_dirty_blocks.len() - recent;
        let before = self.pass_dirty_blocks.iter().take(split).min();
        let latest = self.pass_dirty_blocks.iter().skip(split).min();
        matches!((before, latest), (Some(before), Some(latest)) if latest >= before)
    }

    /// Whether iterating passes will catch up: the dirty rate stays below
    /// [`CONVERGE_MARGIN`] of the copy rate and the set is not stalled. Optimistic until
    /// both rates were measured.
    pub fn converges(&self) -> bool {
        if self.stalled() {
            return false;
        }
        match (self.copy_bytes_per_s, self.dirty_bytes_per_s) {
            (Some(copy), Some(dirty)) => dirty < copy * CONVERGE_MARGIN,
            _ => true,
        }
    }

    /// Forecast time until `dirty_bytes` are drained while the guest keeps dirtying at the
    /// measured rate, in milliseconds; `None` when unknown or when it never drains.
    pub fn eta_ms(&self, dirty_bytes: u64) -> Option<f64> {
        let copy = self.copy_bytes_per_s?;
        let gain = copy - self.dirty_bytes_per_s.unwrap_or(0.0);
        if gain <= 0.0 {
            return None;
        }
        Some(dirty_bytes as f64 / gain * 1e3)
    }
}

/// Exponentially weighted moving average; the first sample is taken as is.
fn ewma(previous: Option<f64>, sample: f64) -> f64 {
    match previous {
        Some(average) => average + EWMA_WEIGHT * (sample - average),
        None => sample,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn no_estimate_before_a_measurement() {
        // Goal: no switchover on a guess. Method: ask an empty forecast.
        let forecast = Forecast::new(3);
        assert_eq!(forecast.pause_estimate_ms(MIB), None);
        assert_eq!(forecast.eta_ms(MIB), None);
        assert!(forecast.converges());
    }

    #[test]
    fn bandwidth_and_pause_from_sends() {
        // Goal: estimates follow measured sends. Method: 100 MiB/s sends with no overhead,
        // then one slow send; the estimate is pessimistic and moves toward the new rate.
        let mut forecast = Forecast::new(3);
        for _ in 0..5 {
            forecast.record_send(10 * MIB, 100_000_000);
        }
        let bandwidth = forecast.copy_bytes_per_s().unwrap();
        assert!((bandwidth - 100.0 * MIB as f64).abs() < 1.0);
        let pause_ms = forecast.pause_estimate_ms(10 * MIB).unwrap();
        assert!((pause_ms - 100.0 * PAUSE_SAFETY).abs() < 0.01, "{pause_ms}");
        forecast.record_send(MIB, 20_000_000); // 50 MiB/s and overhead
        assert!(forecast.copy_bytes_per_s().unwrap() < bandwidth);
        assert!(
            forecast.pause_estimate_ms(0).unwrap() > 0.0,
            "overhead counted"
        );
        forecast.record_send(0, 5); // ignored
        forecast.record_send(5, 0); // ignored
    }

    #[test]
    fn ending_estimate_is_a_round_trip() {
        // Goal: an empty final step is judged by a round trip, not by slow reads. Method:
        // none before a send; one quick and several slow sends: the quickest bounds it.
        let mut forecast = Forecast::new(3);
        assert_eq!(forecast.ending_estimate_ms(), None);
        forecast.record_send(MIB, 2_000_000);
        for _ in 0..4 {
            forecast.record_send(MIB, 300_000_000); // reads stalled behind a busy disk
        }
        let ending_ms = forecast.ending_estimate_ms().unwrap();
        assert!((ending_ms - 2.0).abs() < 1e-9, "{ending_ms}");
        assert!(forecast.pause_estimate_ms(0).unwrap() > 100.0);
    }

    #[test]
    fn a_measured_round_trip_replaces_the_ending_estimate_until_the_next_send() {
        // Goal: stale send figures never hold the ending's estimate above the budget once a
        // round trip was measured; a later send brings the send figures back. Method: slow
        // paced sends only (every bound above 100 ms), then a 3 ms round trip, then a send.
        let mut forecast = Forecast::new(3);
        for _ in 0..4 {
            forecast.record_send(MIB, 2_000_000_000);
        }
        forecast.record_send(MIB, 2_500_000_000);
        assert!(forecast.ending_estimate_ms().unwrap() > 100.0);
        forecast.record_round_trip(3_000_000);
        assert_eq!(forecast.ending_estimate_ms(), Some(3.0));
        forecast.record_send(MIB, 2_000_000_000);
        assert!(forecast.ending_estimate_ms().unwrap() > 3.0);
    }

    #[test]
    fn converges_compares_rates() {
        // Goal: dirty rate near the copy rate means no convergence. Method: synthetic rates.
        let mut forecast = Forecast::new(3);
        forecast.record_send(100 * MIB, 1_000_000_000);
        forecast.record_dirty(10, MIB, 1_000_000_000); // 10 MiB/s vs 100 MiB/s
        assert!(forecast.converges());
        let eta_ms = forecast.eta_ms(90 * MIB).unwrap();
        assert!((eta_ms - 1000.0).abs() < 1.0, "{eta_ms}");
        for _ in 0..20 {
            forecast.record_dirty(95, MIB, 1_000_000_000);
        }
        assert!(
            !forecast.converges(),
            "95 MiB/s is within the margin of 100 MiB/s"
        );
        assert!(
            forecast.eta_ms(MIB).is_some(),
            "but it still drains, slowly"
        );
        for _ in 0..20 {
            forecast.record_dirty(105, MIB, 1_000_000_000);
        }
        assert_eq!(
            forecast.eta_ms(MIB),
            None,
            "105 MiB/s never drains at 100 MiB/s"
        );
    }

    #[test]
    fn stall_after_passes_without_shrink() {
        // Goal: a set that stops reaching new minima is detected. Method: counts 100, 50, 60,
        // 55, 70 with stall_passes = 3: stalled once three passes in a row stayed above 50;
        // a new minimum clears it.
        let mut forecast = Forecast::new(3);
        for count in [100, 50, 60, 55] {
            forecast.record_pass_start(count);
            assert!(!forecast.stalled(), "at {count}");
        }
        forecast.record_pass_start(70);
        assert!(forecast.stalled());
        assert!(!forecast.converges());
        forecast.record_pass_start(10);
        assert!(!forecast.stalled());
    }
}
