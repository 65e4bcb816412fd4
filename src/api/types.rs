//! The control API's wire types: what the agent returns (statuses, heat maps) and what a
//! client sends (an export to add, a tracker to add). They are also what `--json` prints and
//! what the agent persists in `exports.json`.
//!
//! Invariants: every field carries its unit in its name (`_bytes`, `_ms`, `_us`); inputs
//! reject unknown fields, so a misspelt option is an error and not silently ignored; fields
//! added later must have defaults so an older `exports.json` still loads.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use crate::disk::{CounterSnapshot, Forwarding, Holding};
use crate::journal::{JobView, Role, Side, SourcePhase};
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
    /// Keep an activity log so that a crash leaves the tracker `recovered`, not `lost`
    /// (false when absent).
    #[serde(default)]
    pub durable: bool,
}

/// Request counters and latency of one export since the agent started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ExportStats {
    /// Requests and bytes by command (flattened: the JSON has one level).
    #[serde(flatten)]
    pub counts: CounterSnapshot,
    /// Request latency, receive to reply, in microseconds.
    pub latency_us: LatencySummary,
    /// Connections to the destination lost and made again while forwarding, over the
    /// export's life (0 from older agents).
    #[serde(default)]
    pub forward_reconnects: u64,
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
    /// Heap bytes its bitmap and heat chunks hold now: follows the regions written, not the
    /// disk size (0 from older agents).
    #[serde(default)]
    pub memory_bytes: u64,
    /// Bytes of its `.tracker` file at the last save, Clean or Active (0: never saved, or
    /// an older agent). A running tracker's file is Active and small.
    #[serde(default)]
    pub state_bytes: u64,
    /// Every acknowledged write's mark survives a crash. False for every tracker until the
    /// activity log sets it: today an unclean stop loses the history (state `lost`).
    #[serde(default)]
    pub durable: bool,
    /// How far its dirty bits can be trusted (`ok` from older agents; see `lost` there).
    #[serde(default)]
    pub state: TrackerState,
}

/// How far a tracker's dirty bits can be trusted: JSON `"ok"`, `"lost"`, or
/// `{"recovered":{"bound_bytes":N}}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TrackerState {
    /// The bits are the whole history since creation or the last take.
    #[default]
    Ok,
    /// The history was lost (unclean stop, or writes made elsewhere): every block is dirty.
    Lost,
    /// Reserved for the activity log: rebuilt from it after an unclean stop, over-marking
    /// at most `bound_bytes`. No agent reports it yet.
    Recovered {
        /// Most bytes marked dirty that may not have been written.
        bound_bytes: u64,
    },
}

impl TrackerState {
    /// The short name `tracker ls` and `/metrics` show: `ok`, `lost` or `recovered`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Lost => "lost",
            Self::Recovered { .. } => "recovered",
        }
    }
}

impl From<crate::dirty::TrackerState> for TrackerState {
    fn from(state: crate::dirty::TrackerState) -> Self {
        use crate::dirty::TrackerState as Dirty;
        match state {
            Dirty::Ok => Self::Ok,
            Dirty::Lost => Self::Lost,
            Dirty::Recovered { bound_bytes } => Self::Recovered { bound_bytes },
        }
    }
}

impl ExportStats {
    /// The counters and latency of `export` now.
    pub fn of(export: &crate::disk::Export) -> Self {
        ExportStats {
            counts: export.counts(),
            latency_us: export.latency().summary(),
            forward_reconnects: export.forward_gauge().reconnects(),
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
            memory_bytes: tracker.memory_bytes(),
            state_bytes: tracker.state_bytes(),
            durable: tracker.is_durable(),
            state: tracker.state().into(),
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
    /// Where its requests go when it no longer serves its own image (after a migration's
    /// switchover): absent while it serves locally.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarding: Option<Forwarding>,
    /// Its own hold of forwarded requests, when it has one (absent: the agent's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_hold_ms: Option<u64>,
}

/// An image the journal's moves left stale (`<file>.stale-<job>`): never served again,
/// kept for the operator until `ferry export gc` removes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleImage {
    /// The export whose disk it held.
    pub export: String,
    /// The file.
    pub path: PathBuf,
    /// The job whose switchover left it stale.
    pub job_id: u64,
    /// Bytes it occupies on disk (allocated blocks).
    pub allocated_bytes: u64,
    /// Whether this request removed it.
    pub removed: bool,
    /// Why it was kept, when it was (not a regular file, removal failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kept_because: Option<String>,
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
    /// Hottest heat (0..=255) within each cell, in disk order (heat is kept per region of
    /// 1 MiB or more, see `heat_shift_for`, so cells finer than a region repeat its heat).
    pub cells: Vec<u8>,
    /// `(heat lower bound, blocks)` per heat bucket, coldest first; see
    /// [`crate::dirty::heat::HEAT_BUCKET_LOWER_BOUNDS`].
    pub histogram: Vec<(u8, u64)>,
    /// Blocks at or above the agent's hot threshold.
    pub hot_blocks: u64,
}

/// The body of every error response: `{"error": "..."}`; a refused manager command (409)
/// also carries both epochs: `{"error": "...", "stale_epoch": {"epoch": 4, "highest": 5}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, as a sentence for a person.
    pub error: String,
    /// Set when a manager command was refused for its epoch: a newer manager took over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_epoch: Option<StaleEpochBody>,
}

/// The epochs of a refused manager command ([`crate::lease::fence::StaleEpoch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaleEpochBody {
    /// The epoch the command carried.
    pub epoch: u64,
    /// The highest epoch the agent has seen.
    pub highest: u64,
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
    fn export_status_of_an_older_agent_parses() {
        // Goal: a client reads the exports of an agent that predates holding, reconnect
        // counts and per-export holds. Method: a forwarding status as JSON without those
        // fields, parsed.
        let status = ExportStatus {
            name: "vm1".into(),
            path: "/i/vm1.raw".into(),
            read_only: false,
            size_bytes: 1 << 20,
            granularity_bytes: 65536,
            connections: 1,
            trackers: Vec::new(),
            stats: ExportStats::default(),
            forwarding: Some(Forwarding {
                to: "10.0.0.2:10809".into(),
                since_unix_ms: Some(5),
                holding: None,
            }),
            forward_hold_ms: None,
        };
        let mut json = serde_json::to_value(&status).expect("serialize");
        let stats = json["stats"].as_object_mut().expect("stats");
        assert!(stats.remove("forward_reconnects").is_some());
        let text = json.to_string();
        assert!(
            !text.contains("holding") && !text.contains("forward_hold"),
            "{text}"
        );
        let parsed: ExportStatus = serde_json::from_str(&text).expect("older status");
        assert_eq!(parsed, status);
    }

    fn journaled() -> JobSettings {
        JobSettings {
            policy: crate::migrate::Policy::Naive,
            max_pause_ms: 250,
            target_pause_ms: 20,
            force_after_ms: Some(60_000),
            bandwidth_bytes_per_s: Some(32 << 20),
            hot_threshold: 12,
            mirror: true,
            verify: true,
            yield_to_guest: false,
        }
    }

    fn resume_of(job_id: u64) -> MigrateRequest {
        serde_json::from_str(&format!(r#"{{"to":"h:7451","resume_job":{job_id}}}"#))
            .expect("minimal resume")
    }

    #[test]
    fn a_resume_without_options_keeps_the_journaled_settings() {
        // Goal: `ferry resume` with no flags runs the job as it was started (a job capped at
        // 32 MiB/s is not resumed uncapped). Method: merge a request that gives nothing.
        let merged = resume_of(7).resumed_with(&journaled());
        assert_eq!(merged.policy.as_deref(), Some("naive"));
        assert_eq!(merged.max_pause_ms, Some(250));
        assert_eq!(merged.target_pause_ms, Some(20));
        assert_eq!(merged.force_after_ms, Some(60_000));
        assert_eq!(merged.bandwidth_bytes_per_s, Some(32 << 20));
        assert_eq!(merged.hot_threshold, Some(12));
        assert_eq!(
            (merged.mirror, merged.verify, merged.yield_to_guest),
            (Some(true), Some(true), Some(false))
        );
        assert_eq!((merged.to.as_str(), merged.resume_job), ("h:7451", Some(7)));
    }

    #[test]
    fn options_given_to_a_resume_override_the_journaled_ones() {
        // Goal: each option the resume request gives wins over the journaled one, including
        // switching a journaled flag off and lifting a cap with 0; the others are kept.
        // Method: merge requests that give one field at a time.
        let given = MigrateRequest {
            bandwidth_bytes_per_s: Some(64 << 20),
            verify: Some(false),
            policy: Some("heat".into()),
            ..resume_of(7)
        };
        let merged = given.resumed_with(&journaled());
        assert_eq!(merged.bandwidth_bytes_per_s, Some(64 << 20));
        assert_eq!(merged.verify, Some(false));
        assert_eq!(merged.policy.as_deref(), Some("heat"));
        assert_eq!(merged.max_pause_ms, Some(250), "not given: kept");
        assert_eq!(merged.mirror, Some(true), "not given: kept");
        let uncapped = MigrateRequest {
            bandwidth_bytes_per_s: Some(0),
            ..resume_of(7)
        };
        assert_eq!(
            uncapped.resumed_with(&journaled()).bandwidth_bytes_per_s,
            Some(0)
        );
    }

    #[test]
    fn migrate_request_json_stays_compatible() {
        // Goal: bodies written for the bool flags still parse, and a request that leaves the
        // flags out serializes without them (an older agent reads it). Method: parse the old
        // form; serialize a minimal request.
        let old: MigrateRequest = serde_json::from_str(
            r#"{"to":"h:7451","verify":true,"mirror":false,"yield_to_guest":true}"#,
        )
        .expect("old body");
        assert_eq!(
            (old.verify, old.mirror, old.yield_to_guest),
            (Some(true), Some(false), Some(true))
        );
        let text = serde_json::to_string(&resume_of(3)).expect("serialize");
        for flag in ["verify", "mirror", "yield_to_guest"] {
            assert!(!text.contains(flag), "{text}");
        }
    }

    #[test]
    fn tracker_status_json_names_states_and_defaults_new_fields() {
        // Goal: states serialize as the documented names, and an older agent's status (no
        // memory, state file, durability or state) still parses. Method: serde both ways.
        for (state, json) in [
            (TrackerState::Ok, r#""ok""#),
            (TrackerState::Lost, r#""lost""#),
            (
                TrackerState::Recovered { bound_bytes: 5 },
                r#"{"recovered":{"bound_bytes":5}}"#,
            ),
        ] {
            assert_eq!(serde_json::to_string(&state).expect("serialize"), json);
            assert_eq!(
                serde_json::from_str::<TrackerState>(json).expect("parse"),
                state
            );
        }
        let old: TrackerStatus = serde_json::from_str(
            r#"{"name":"t","granularity_bytes":65536,"block_count":16,"dirty_blocks":1,
                "dirty_bytes":65536,"lost":false,"half_life_ms":30000}"#,
        )
        .expect("older agent");
        assert_eq!((old.memory_bytes, old.state_bytes), (0, 0));
        assert!(!old.durable);
        assert_eq!(old.state, TrackerState::Ok);
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
                half_life_ms: None,
                durable: false,
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
    /// Compare BLAKE3 digests of both images at the switchover point (holds writes longer);
    /// off when absent (on a resume: as the job was started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<bool>,
    /// The bulk copy backs off while the guest's write p99 is above 4 ms; off when absent
    /// (on a resume: as the job was started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yield_to_guest: Option<bool>,
    /// What the copy may cost the guest: `auto` (the default), `off`, a factor of its own
    /// p99 before the job (`2x`) or a p99 bound (`5ms`); the copy's reads and pace are
    /// steered to it ([`crate::migrate::steer`]). `yield_to_guest` alone means `4ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_impact: Option<String>,
    /// The job's weight among the agent's copying jobs (1-100, default 1): each copies at
    /// its weighted share of their total rate ([`crate::jobs::fair`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Mirror guest writes to the destination from the start (each write waits for both
    /// sides); the copy then runs once and always converges. Off when absent (on a resume:
    /// as the job was started).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<bool>,
    /// Block size the job tracks (and sends, and journals) at; absent: 4 KiB, or the
    /// export's granularity when finer. A resume always keeps the one its job started with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granularity_bytes: Option<u64>,
    /// Batch the job belongs to (recorded in both journals; `ferry status BATCH`).
    #[serde(default)]
    pub batch: Option<String>,
    /// Continue this interrupted job (same id, same destination) instead of a new one. The
    /// options left out are those the job was started with (its journaled settings).
    #[serde(default)]
    pub resume_job: Option<u64>,
    /// The manager epoch the request was admitted at (its `Ferry-Manager-Epoch` header,
    /// set by the API server, never read from the body): the job's Open and Commit are
    /// then fenced at the destination.
    #[serde(skip)]
    pub manager_epoch: Option<u64>,
}

impl MigrateRequest {
    /// A migration to `to` with every option at its default.
    pub fn new(to: &str) -> MigrateRequest {
        MigrateRequest {
            to: to.to_string(),
            policy: None,
            max_pause_ms: None,
            target_pause_ms: None,
            force_after_ms: None,
            bandwidth_bytes_per_s: None,
            hot_threshold: None,
            verify: None,
            yield_to_guest: None,
            max_impact: None,
            weight: None,
            mirror: None,
            granularity_bytes: None,
            batch: None,
            resume_job: None,
            manager_epoch: None,
        }
    }
}

impl MigrateRequest {
    /// This request with every option it leaves out taken from `journaled`, the settings
    /// an interrupted job ran with: a resume keeps the job's cap, budgets and switches,
    /// and what the request does give overrides them. A bandwidth of 0 given here lifts a
    /// journaled cap (the block stream reads 0 as uncapped).
    pub fn resumed_with(self, journaled: &JobSettings) -> MigrateRequest {
        MigrateRequest {
            policy: self
                .policy
                .or_else(|| Some(journaled.policy.as_str().to_string())),
            max_pause_ms: self.max_pause_ms.or(Some(journaled.max_pause_ms)),
            target_pause_ms: self.target_pause_ms.or(Some(journaled.target_pause_ms)),
            force_after_ms: self.force_after_ms.or(journaled.force_after_ms),
            bandwidth_bytes_per_s: self
                .bandwidth_bytes_per_s
                .or(journaled.bandwidth_bytes_per_s),
            hot_threshold: self.hot_threshold.or(Some(journaled.hot_threshold)),
            verify: self.verify.or(Some(journaled.verify)),
            yield_to_guest: self.yield_to_guest.or(Some(journaled.yield_to_guest)),
            mirror: self.mirror.or(Some(journaled.mirror)),
            ..self
        }
    }
}

/// One job of the agent's journal, as `GET /v1/journal/jobs` returns it: what `ferry resume`
/// and `ferry abort` choose from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JournalJob {
    /// The source's job id.
    pub job_id: u64,
    /// Batch, if any.
    pub batch: Option<String>,
    /// The export being moved.
    pub export: String,
    /// This agent's side: "source" or "target".
    pub role: String,
    /// Latest phase in this agent's journal ("copying", "switched", "receiving", ...).
    pub phase: String,
    /// Size of the disk.
    pub size_bytes: u64,
    /// Block size of the job's bitmaps.
    pub granularity_bytes: u64,
    /// A source job's destination (block-stream address).
    pub destination: Option<String>,
    /// A source job's copy policy.
    pub policy: Option<String>,
    /// A source job's settings of its latest run, when the journal holds them.
    pub settings: Option<JobSettings>,
    /// The latest reason recorded (a cancelled switchover, an abort).
    pub reason: Option<String>,
}

impl JournalJob {
    /// The API form of a journal's view of a job.
    pub fn of(view: &JobView) -> JournalJob {
        let (destination, policy, settings) = match &view.side {
            Side::Source(source) => (
                Some(source.destination.clone()),
                Some(source.policy.as_str().to_string()),
                source.settings.clone(),
            ),
            Side::Target(_) => (None, None, None),
        };
        JournalJob {
            job_id: view.job_id,
            batch: view.batch.clone(),
            export: view.export.clone(),
            role: view.role().as_str().to_string(),
            phase: view.phase_name().to_string(),
            size_bytes: view.size_bytes,
            granularity_bytes: view.granularity_bytes,
            destination,
            policy,
            settings,
            reason: view.reason.clone(),
        }
    }

    /// An interrupted source job: `ferry resume` continues it.
    pub fn resumable(&self) -> bool {
        self.role == Role::Source.as_str() && self.phase == SourcePhase::Copying.as_str()
    }

    /// A source job `ferry abort` rolls back (an aborted one again: its destination may not
    /// have heard).
    pub fn abortable(&self) -> bool {
        self.role == Role::Source.as_str()
            && [SourcePhase::Copying, SourcePhase::Aborted]
                .iter()
                .any(|phase| self.phase == phase.as_str())
    }
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

pub use crate::jobs::seeding::{
    SeedDisk, SeedDiskInfo, SeedExportRequest, SeedImportRequest, SeedInfo, SeedInspectRequest,
    SeedRunStatus, SeedSyncRequest, VolumeInfo,
};
pub use crate::jobs::sync::{SyncStatus, SyncThen};
pub use crate::jobs::{JobPhase, JobStatus};
pub use crate::journal::status::DiskStatus;
pub use crate::journal::JobSettings;
pub use crate::migrate::Progress;
