//! The control API's wire types: what the agent returns (statuses, heat maps) and what a
//! client sends (an export to add, a tracker to add). They are also what `--json` prints and
//! what the agent persists in `exports.json`.
//!
//! Invariants: every field carries its unit in its name (`_bytes`, `_ms`, `_us`); inputs
//! reject unknown fields, so a misspelt option is an error and not silently ignored; fields
//! added later must have defaults so an older `exports.json` still loads.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::disk::CounterSnapshot;
pub use crate::metrics::LatencySummary;

/// An export to serve, as `POST /v1/exports` takes it and `exports.json` stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    /// NBD export name.
    pub name: String,
    /// Raw image file or block device (absolute: the agent's working directory is `/`).
    pub path: PathBuf,
    /// Refuse writes.
    #[serde(default)]
    pub read_only: bool,
    /// Default granularity of the export's trackers.
    #[serde(default = "default_granularity_bytes")]
    pub granularity_bytes: u64,
    /// Trackers to create.
    #[serde(default)]
    pub trackers: Vec<String>,
}

fn default_granularity_bytes() -> u64 {
    crate::dirty::DEFAULT_GRANULARITY_BYTES
}

/// A tracker to add, as `POST /v1/exports/{name}/trackers` takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackerAdd {
    /// Tracker name, unique within the export.
    pub name: String,
    /// Granularity; the export's when absent.
    #[serde(default)]
    pub granularity_bytes: Option<u64>,
    /// Heat half-life; the agent's when absent.
    #[serde(default)]
    pub half_life_ms: Option<u64>,
}

/// Request counters and latency of one export since the agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ExportStats {
    /// Requests and bytes by command (flattened: the JSON has one level).
    #[serde(flatten)]
    pub counts: CounterSnapshot,
    /// Request latency, receive to reply, in microseconds.
    pub latency_us: LatencySummary,
}

/// One tracker of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackerStatus {
    /// Tracker name.
    pub name: String,
    /// Bytes per tracked block.
    pub granularity_bytes: u64,
    /// Blocks covering the export.
    pub block_count: u64,
    /// Blocks written since the tracker was created or last cleared.
    pub dirty_blocks: u64,
    /// `dirty_blocks * granularity_bytes` (the last block may extend past the image end).
    pub dirty_bytes: u64,
    /// Restored after an unclean stop: every block counts as dirty.
    pub lost: bool,
    /// Heat half-life.
    pub half_life_ms: u64,
}

impl ExportStats {
    /// The counters and latency of `export` now.
    pub fn of(export: &crate::disk::Export) -> Self {
        ExportStats {
            counts: export.counts(),
            latency_us: export.latency().summary(),
        }
    }
}

impl TrackerStatus {
    /// The state of `tracker` now.
    pub fn of(tracker: &crate::dirty::Tracker) -> Self {
        let dirty_blocks = tracker.dirty_count();
        TrackerStatus {
            name: tracker.name().to_string(),
            granularity_bytes: tracker.granularity_bytes(),
            block_count: tracker.block_count(),
            dirty_blocks,
            dirty_bytes: dirty_blocks * tracker.granularity_bytes(),
            lost: tracker.is_lost(),
            half_life_ms: tracker.half_life_ms(),
        }
    }
}

/// One served export.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExportStatus {
    /// NBD export name.
    pub name: String,
    /// Image path.
    pub path: PathBuf,
    /// Writes refused.
    pub read_only: bool,
    /// Image size.
    pub size_bytes: u64,
    /// Default granularity of its trackers.
    pub granularity_bytes: u64,
    /// Live NBD connections.
    pub connections: u64,
    /// Its trackers.
    pub trackers: Vec<TrackerStatus>,
    /// Its counters.
    pub stats: ExportStats,
}

/// Write heat of one tracker, reduced to a fixed number of cells for display.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeatMap {
    /// Export name.
    pub export: String,
    /// Tracker name.
    pub tracker: String,
    /// Bytes per tracked block.
    pub granularity_bytes: u64,
    /// Blocks covering the export.
    pub block_count: u64,
    /// Bytes of the export per cell (rounded up).
    pub cell_bytes: u64,
    /// Hottest block heat (0..=255) within each cell, in disk order.
    pub cells: Vec<u8>,
    /// `(heat lower bound, blocks)` per heat bucket, coldest first; see
    /// [`crate::dirty::heat::HEAT_BUCKET_LOWER_BOUNDS`].
    pub histogram: Vec<(u8, u64)>,
    /// Blocks at or above the agent's hot threshold.
    pub hot_blocks: u64,
}

/// The body of every error response: `{"error": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, as a sentence for a person.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_spec_defaults_and_rejects_unknown_fields() {
        // Goal: minimal specs load with defaults; typos are errors. Method: parse JSON texts.
        let spec: ExportSpec =
            serde_json::from_str(r#"{"name":"vm1","path":"/i/vm1.raw"}"#).expect("minimal spec");
        assert_eq!(spec.granularity_bytes, 64 * 1024);
        assert!(!spec.read_only);
        assert!(spec.trackers.is_empty());
        let typo = r#"{"name":"vm1","path":"/i","readonly":true}"#;
        assert!(serde_json::from_str::<ExportSpec>(typo).is_err());
    }

    #[test]
    fn tracker_add_options_are_optional() {
        // Goal: a tracker can be added by name alone. Method: parse and round-trip.
        let add: TrackerAdd = serde_json::from_str(r#"{"name":"t"}"#).expect("name only");
        assert_eq!(
            add,
            TrackerAdd {
                name: "t".into(),
                granularity_bytes: None,
                half_life_ms: None
            }
        );
        let text = serde_json::to_string(&add).expect("serialize");
        assert_eq!(
            serde_json::from_str::<TrackerAdd>(&text).expect("round trip"),
            add
        );
    }
}

/// Body of `POST /v1/exports/{name}/migrate`: where to and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination agent's block-stream address, `host:port`.
    pub to: String,
    /// `heat` (default) or `naive`.
    #[serde(default)]
    pub policy: Option<String>,
    /// Longest write pause the switchover may cause (default 100 ms).
    #[serde(default)]
    pub max_pause_ms: Option<u64>,
    /// The pause aimed for while the dirty set still shrinks (default 10 ms).
    #[serde(default)]
    pub target_pause_ms: Option<u64>,
    /// After this long, switch over even if the pause bound cannot be met.
    #[serde(default)]
    pub force_after_ms: Option<u64>,
    /// Bandwidth cap of the block stream.
    #[serde(default)]
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Heat at and above which a block counts as hot (default 8).
    #[serde(default)]
    pub hot_threshold: Option<u8>,
    /// Compare BLAKE3 digests of both images at the switchover point (holds writes longer).
    #[serde(default)]
    pub verify: bool,
    /// The bulk copy backs off while the guest's write p99 is above 4 ms.
    #[serde(default)]
    pub yield_to_guest: bool,
    /// Mirror guest writes to the destination from the start (each write waits for both
    /// sides); the copy then runs once and always converges.
    #[serde(default)]
    pub mirror: bool,
    /// Batch the job belongs to (recorded in both journals; `ferry status BATCH`).
    #[serde(default)]
    pub batch: Option<String>,
    /// Continue this interrupted job (same id, same destination) instead of a new one.
    #[serde(default)]
    pub resume_job: Option<u64>,
}

/// What `POST /v1/jobs/{id}/abort` did on each side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AbortOutcome {
    /// The job.
    pub job_id: u64,
    /// The export.
    pub export: String,
    /// "aborted" (recorded here, tracker removed).
    pub source: String,
    /// "aborted" (the destination dropped its image), or why it could not be told.
    pub destination: String,
}

pub use crate::jobs::{JobPhase, JobStatus};
pub use crate::migrate::Progress;
