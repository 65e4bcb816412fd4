//! What a migration run reports: per-pass figures and totals, all measured.
//!
//! Invariant (DESIGN.md invariant 5): every number here comes from what the env reported
//! (`send` outcomes, `now_ns` readings, set sizes taken from the tracker), never from an
//! estimate. Forecasts appear only in [`super::Progress`], labelled as such.

use serde::{Deserialize, Serialize};

/// What a pass copied and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PassKind {
    /// Naive first pass: every allocated (or resumed dirty) block in offset order.
    Full,
    /// Heat policy: dirty cold blocks only; hot ones were put back.
    Cold,
    /// Heat policy: every dirty block, hot ones included (the hot blocks did not fit the
    /// pause budget, and the forecast said iterating converges).
    Hot,
    /// Naive later pass: every dirty block.
    Dirty,
    /// While mirroring: the blocks dirtied before mirroring started.
    Mirror,
    /// The switchover's send, with guest writes held.
    Final,
}

impl PassKind {
    /// Lower-case name, as serialized.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Cold => "cold",
            Self::Hot => "hot",
            Self::Dirty => "dirty",
            Self::Mirror => "mirror",
            Self::Final => "final",
        }
    }
}

/// One pass: what was dirty when it began and what it sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PassReport {
    /// 1-based pass number within the run; the final send has its own number.
    pub pass: u32,
    /// What the pass copied.
    pub kind: PassKind,
    /// Blocks in the set taken from the tracker at the start (before any were put back).
    pub dirty_blocks_at_start: u64,
    /// Blocks handed to `send` and confirmed.
    pub blocks_sent: u64,
    /// Bytes the env reported sent (data plus zero extents).
    pub bytes_sent: u64,
    /// Wall time of the pass by the env's clock.
    pub duration_ms: f64,
}

/// The outcome of a successful run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// The policy that ran.
    pub policy: super::Policy,
    /// Size of the disk.
    pub disk_bytes: u64,
    /// Bytes of the blocks that held data when the run started.
    pub allocated_bytes: u64,
    /// Bytes sent as data.
    pub bytes_data: u64,
    /// Bytes sent as zero extents (no payload on the wire).
    pub bytes_zero: u64,
    /// Block sends of blocks this run had already sent once (the cost of re-copying).
    pub blocks_resent: u64,
    /// Every pass in order, the final send last.
    pub passes: Vec<PassReport>,
    /// Hot blocks when the first pass classified them (heat policy; 0 for naive).
    pub hot_blocks: u64,
    /// Switchovers attempted and given up because the pause would exceed the budget.
    pub deferrals: u32,
    /// Whether the run switched to active mirroring.
    pub mirrored: bool,
    /// Guest write bytes the sessions mirrored into the stream (not in `bytes_data`).
    #[serde(default)]
    pub bytes_mirrored: u64,
    /// Whether the switchover was forced past the pause budget (`force_after_ms`).
    pub forced: bool,
    /// The run ended at an in-sync point ([`super::Ending::InSync`]), not a switchover: the
    /// source is still authoritative.
    #[serde(default)]
    pub in_sync: bool,
    /// From the start of the run to the commit point.
    pub converge_ms: f64,
    /// Guest write pause: from `hold_writes` to `release_writes`.
    pub pause_ms: f64,
    /// Part of the pause spent holding writes and waiting for those in flight.
    #[serde(default)]
    pub pause_drain_ms: f64,
    /// Part of the pause spent sending the final dirty set.
    #[serde(default)]
    pub pause_final_send_ms: f64,
    /// Part of the pause spent on the commit (destination sync and commit; with `--verify`,
    /// hashing both images too).
    #[serde(default)]
    pub pause_commit_ms: f64,
    /// `(bytes_data + bytes_zero) / allocated_bytes`; 0 when nothing was allocated.
    pub amplification: f64,
    /// The guest p99 bound the copy was steered to (µs; `--max-impact`), absent when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impact_target_us: Option<u64>,
    /// The bound and convergence conflicted: the copy could not outrun the guest's writes
    /// within it, so the job mirrored writes instead ([`super::steer`]).
    #[serde(default)]
    pub impact_conflict: bool,
}

impl MigrationReport {
    /// Total bytes sent (data and zero extents).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_data + self.bytes_zero
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_through_json() {
        // Goal: the API can ship reports. Method: serialize, check names, deserialize.
        let report = MigrationReport {
            policy: super::super::Policy::Naive,
            disk_bytes: 1 << 20,
            allocated_bytes: 1 << 19,
            bytes_data: 1 << 19,
            bytes_zero: 0,
            blocks_resent: 0,
            passes: vec![PassReport {
                pass: 1,
                kind: PassKind::Full,
                dirty_blocks_at_start: 8,
                blocks_sent: 8,
                bytes_sent: 1 << 19,
                duration_ms: 1.5,
            }],
            hot_blocks: 0,
            deferrals: 0,
            mirrored: false,
            in_sync: false,
            bytes_mirrored: 0,
            forced: false,
            converge_ms: 2.0,
            pause_ms: 0.5,
            pause_drain_ms: 0.1,
            pause_final_send_ms: 0.2,
            pause_commit_ms: 0.2,
            amplification: 1.0,
            impact_target_us: None,
            impact_conflict: false,
        };
        let json = serde_json::to_string(&report).expect("serialize");
        assert!(json.contains("\"kind\":\"full\""), "{json}");
        assert!(json.contains("\"policy\":\"naive\""), "{json}");
        let back: MigrationReport = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back, report);
        assert_eq!(PassKind::Final.as_str(), "final");
    }
}
