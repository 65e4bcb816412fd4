//! Request latency recording (hdrhistogram).
//!
//! Each NBD session records into its own [`LatencyRecorder`] without locks and merges it into
//! its export's recorder every few hundred milliseconds; the API reads the export's recorder
//! as a [`LatencySummary`].
//!
//! Invariants:
//! - Recording never fails and never panics: values above [`LATENCY_MAX_US`] are clamped to
//!   it (a stuck request shows up as "at least 60 s", not as a lost sample).
//! - Every recorder has the same bounds, so merging one into another is exact.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Lowest latency the histogram tells apart.
pub const LATENCY_MIN_US: u64 = 1;
/// Highest latency recorded; larger values are clamped to it.
pub const LATENCY_MAX_US: u64 = 60_000_000;
/// Significant decimal digits kept for every value (0.1 % relative error).
const SIGNIFICANT_DIGITS: u8 = 3;

/// A latency histogram in microseconds, 1 µs .. 60 s at 3 significant digits.
#[derive(Debug, Clone)]
pub struct LatencyRecorder {
    histogram: Histogram<u64>,
}

/// Latency percentiles in microseconds; all zero when nothing was recorded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Requests recorded.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest value recorded (clamped to [`LATENCY_MAX_US`]).
    pub max: u64,
    /// Arithmetic mean.
    pub mean: f64,
}

impl LatencyRecorder {
    /// An empty recorder.
    pub fn new() -> Self {
        let histogram =
            Histogram::new_with_bounds(LATENCY_MIN_US, LATENCY_MAX_US, SIGNIFICANT_DIGITS)
                .expect("constant histogram bounds are valid");
        LatencyRecorder { histogram }
    }

    /// Records one request that took `latency_us`; clamps values above [`LATENCY_MAX_US`].
    pub fn record_us(&mut self, latency_us: u64) {
        self.histogram
            .saturating_record(latency_us.min(LATENCY_MAX_US));
    }

    /// Adds every sample of `other` to this recorder.
    pub fn merge_from(&mut self, other: &LatencyRecorder) {
        if self.histogram.add(&other.histogram).is_err() {
            // Unreachable while all recorders share bounds; fall back to a clamped copy
            // rather than dropping the samples.
            Self::merge_clamped(&mut self.histogram, &other.histogram);
        }
    }

    #[cold]
    fn merge_clamped(target: &mut Histogram<u64>, source: &Histogram<u64>) {
        for value in source.iter_recorded() {
            let latency_us = value.value_iterated_to().min(LATENCY_MAX_US);
            target.saturating_record_n(latency_us, value.count_at_value());
        }
    }

    /// Removes the samples of `earlier`, a snapshot this recorder grew from: what remains is
    /// what was recorded since (a migration job's window).
    pub fn subtract(&mut self, earlier: &LatencyRecorder) {
        if self.histogram.subtract(&earlier.histogram).is_err() {
            // `earlier` is not a snapshot of this recorder (it was reset meanwhile): keep
            // everything rather than report a made-up difference.
            log::debug!("latency snapshot does not subtract; keeping all samples");
        }
    }

    /// Forgets every sample (a session after merging into its export).
    pub fn reset(&mut self) {
        self.histogram.reset();
    }

    /// Samples recorded.
    pub fn count(&self) -> u64 {
        self.histogram.len()
    }

    /// Percentiles, max and mean of the samples.
    pub fn summary(&self) -> LatencySummary {
        let h = &self.histogram;
        if h.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p90: h.value_at_quantile(0.9),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            mean: h.mean(),
        }
    }
}

impl Default for LatencyRecorder {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencySummary {
    /// The value at `quantile`, for the quantiles the summary keeps.
    pub fn at(&self, quantile: f64) -> u64 {
        match quantile {
            q if q <= 0.5 => self.p50,
            q if q <= 0.9 => self.p90,
            q if q <= 0.99 => self.p99,
            _ => self.p999,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_known_samples() {
        // Goal: percentiles, max, mean and count match the samples (to 3 significant digits).
        // Method: record 1..=1000 µs once each and read the summary.
        let mut recorder = LatencyRecorder::new();
        assert_eq!(recorder.summary(), LatencySummary::default());
        for us in 1..=1000 {
            recorder.record_us(us);
        }
        let summary = recorder.summary();
        assert_eq!(summary.count, 1000);
        assert_eq!(summary.p50, 500);
        assert_eq!(summary.p90, 900);
        assert_eq!(summary.p99, 990);
        assert_eq!(summary.p999, 999);
        assert_eq!(summary.max, 1000);
        assert!((summary.mean - 500.5).abs() < 1.0, "mean {}", summary.mean);
    }

    #[test]
    fn record_clamps_instead_of_failing() {
        // Goal: out-of-range values never panic and are kept. Method: record 0 and u64::MAX.
        let mut recorder = LatencyRecorder::new();
        recorder.record_us(0);
        recorder.record_us(u64::MAX);
        let summary = recorder.summary();
        assert_eq!(summary.count, 2);
        assert!(summary.max >= LATENCY_MAX_US, "max {}", summary.max);
        assert!(summary.max <= LATENCY_MAX_US + LATENCY_MAX_US / 1000);
    }

    #[test]
    fn merge_adds_and_reset_clears() {
        // Goal: a session's samples end up in the export's recorder exactly once.
        // Method: merge two recorders, reset the source, merge again; counts add up once.
        let mut export = LatencyRecorder::new();
        let mut session = LatencyRecorder::new();
        export.record_us(5);
        for _ in 0..9 {
            session.record_us(100);
        }
        export.merge_from(&session);
        session.reset();
        assert_eq!(session.count(), 0);
        export.merge_from(&session);
        let summary = export.summary();
        assert_eq!(summary.count, 10);
        assert_eq!(summary.p50, 100);
        assert_eq!(summary.max, 100);
    }
}
