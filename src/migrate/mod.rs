//! Live disk migration (DESIGN.md capability 1, US8560791B2): the algorithm, apart from I/O.
//!
//! Purpose: [`run`] drives copy passes, the hot-block decision, active mirroring and the
//! switchover through the [`MigrationEnv`] trait. The real job (tracker + block stream +
//! export write gate) and the deterministic simulation ([`sim::SimEnv`]) implement the same
//! trait, so the simulation tests exactly the logic that runs in production.
//!
//! ```text
//!  fresh run: merge allocated blocks into the dirty set
//!  loop:  dirty fits max_pause? ──yes──► switchover: hold ► take ► fits? send ► commit ► switch ► release
//!           │no                                        └── no: merge back, release (deferral)
//!           ▼
//!         heat:  cold passes (hot put back) while the set shrinks, then
//!                hot pass if the forecast converges, else start mirroring
//!         naive: full pass, then dirty passes; after max_passes start mirroring
//! ```
//!
//! Invariants:
//! - DESIGN.md invariant 1: blocks are taken from the tracker ([`MigrationEnv::take_dirty`])
//!   before `send` reads them; a block skipped or not confirmed sent is merged back.
//! - Between calls of [`run`], the tracker's dirty bits (plus, while [`run`] runs, the sets it
//!   holds) cover every block the destination may lack. So an error anywhere leaves the
//!   source authoritative and a rerun with [`MigrateOptions::resume`] continues from the bits.
//! - DESIGN.md invariant 4: the commit happens with guest writes held and after the final
//!   dirty set was sent; the source forwards to the destination before writes are released.
//! - DESIGN.md invariant 5: reports hold measurements only ([`report`]).

use crate::dirty::{DirtySet, HeatSnapshot};

pub mod backoff;
pub mod forecast;
pub mod plan;
pub mod policy;
pub mod report;
pub mod sim;
pub mod steer;

pub use forecast::Forecast;
pub use plan::run;
pub use policy::{Ending, MigrateOptions, Policy, PolicyParseError};
pub use report::{MigrationReport, PassKind, PassReport};

/// What one [`MigrationEnv::send`] moved, as the env measured it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendOutcome {
    /// Bytes sent as data extents.
    pub bytes_data: u64,
    /// Bytes sent as zero extents (blocks read back all zero; no payload on the wire).
    pub bytes_zero: u64,
    /// Time from the first read to the destination's acknowledgement of the last extent.
    pub elapsed_ns: u64,
}

/// A progress sample for the CLI bar and the API; the rates and the ETA are forecasts.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    /// Current pass number.
    pub pass: u32,
    /// What the current pass copies.
    pub kind: PassKind,
    /// Bytes sent so far in this run (measured).
    pub bytes_sent: u64,
    /// Blocks still dirty in the tracker now.
    pub dirty_blocks: u64,
    /// Blocks left to send in the current pass.
    pub pass_blocks_left: u64,
    /// Measured copy bandwidth, bytes per second.
    pub copy_bytes_per_s: Option<f64>,
    /// Measured dirty rate, bytes per second.
    pub dirty_bytes_per_s: Option<f64>,
    /// Forecast time until the dirty set drains.
    pub eta_ms: Option<f64>,
    /// Whether guest writes are mirrored to the destination.
    pub mirroring: bool,
    /// The guest p99 bound the copy is steered to (µs), absent when off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impact_target_us: Option<u64>,
    /// The guest's p99 in the latest window (µs), when measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_p99_us: Option<u64>,
    /// The copy's rate cap now (bytes/s), absent when uncapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_cap_bytes_per_s: Option<u64>,
    /// The copy's reads in flight now, when steered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_read_depth: Option<usize>,
    /// The copy's largest read now (bytes), when steered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy_read_bytes: Option<usize>,
    /// The bound and convergence conflict: the job mirrors writes instead of copying on.
    #[serde(default)]
    pub impact_conflict: bool,
}

/// The world the migration algorithm runs in: the source's tracker, the block stream to the
/// destination, and the export's write gate. Implemented by the real job and by
/// [`sim::SimEnv`]. Methods are called from one thread; guest writes go on concurrently
/// except between [`MigrationEnv::hold_writes`] and [`MigrationEnv::release_writes`].
pub trait MigrationEnv {
    /// What the env's fallible steps return.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Monotonic time in nanoseconds (an injected [`crate::env::Clock`]).
    fn now_ns(&self) -> u64;
    /// The tracker's block size.
    fn granularity_bytes(&self) -> u64;
    /// Size of the disk.
    fn disk_bytes(&self) -> u64;
    /// Blocks holding data at the source now. Holes need no copy: the destination starts
    /// sparse (all zero). A block may be reported allocated and read back as zeros.
    fn allocated(&mut self) -> Result<DirtySet, Self::Error>;
    /// Of `candidates` (the allocated blocks of a fresh run, the tracker's bits of a resumed
    /// one), those the destination may lack: the run sends these. By default all of them.
    fn missing(&mut self, allocated: &DirtySet) -> Result<DirtySet, Self::Error> {
        Ok(allocated.clone())
    }
    /// Takes and clears the migration tracker's dirty bits. Writes completing later mark
    /// again. Invariant 1: the caller takes a block before `send` reads it.
    fn take_dirty(&mut self) -> DirtySet;
    /// ORs `set` back into the tracker: blocks skipped this pass, or not confirmed sent.
    fn merge_dirty(&mut self, set: &DirtySet);
    /// Number of dirty blocks now, without clearing (racy while writes go on).
    fn dirty_count(&self) -> u64;
    /// Heat now (decayed), sparse by region; [`HeatSnapshot::get`] maps a block to its heat.
    fn heat_snapshot(&self) -> HeatSnapshot;
    /// Reads the blocks' current contents at the source and sends them, returning once the
    /// destination acknowledged them all. On error, any subset of `blocks` may have arrived;
    /// the caller merges all of them back. A block read and sent here must be ordered with
    /// a mirrored write of the same block at the destination (e.g. one ordered stream, read
    /// and enqueue under the block's range lock), so a stale copy never overwrites it.
    fn send(&mut self, blocks: &DirtySet) -> Result<SendOutcome, Self::Error>;
    /// Has the destination make everything sent so far durable, and returns how long that
    /// took (ns): called before each switchover, while the guest still runs, so that the
    /// commit syncs only the final send, and the round trip it measures is what the commit's
    /// own will cost. `None`: nothing measured (the env syncs with every send).
    fn sync_sent(&mut self) -> Result<Option<u64>, Self::Error> {
        Ok(None)
    }
    /// Holds new guest writes (they wait, unacknowledged) and returns once no guest write is
    /// in flight; every write acknowledged before this returns has been marked dirty. On
    /// error the caller still calls [`MigrationEnv::release_writes`].
    fn hold_writes(&mut self) -> Result<(), Self::Error>;
    /// Lets held and new guest writes proceed, on whichever side is authoritative now.
    /// Releasing when nothing is held does nothing.
    fn release_writes(&mut self);
    /// The destination syncs what it received and becomes authoritative: the commit point.
    /// Called with writes held. `Ok` means committed; `Err` must mean NOT committed (the env
    /// resolves an ambiguous reply, e.g. from the destination's journal, before returning).
    fn commit(&mut self) -> Result<(), Self::Error>;
    /// The destination syncs what it received and records that it equals the source now
    /// (an in-sync point, [`Ending::InSync`]); the source records it too. Called with writes
    /// held, after the final send. `Err`: no point was recorded; nothing changes authority.
    fn mark_in_sync(&mut self) -> Result<(), Self::Error>;
    /// From now on the source forwards every guest request to the destination. Called with
    /// writes held, after a successful commit.
    fn switch_to_destination(&mut self) -> Result<(), Self::Error>;
    /// From now on each guest write is applied at both sides before it is acknowledged.
    /// Returns once every write that is not mirrored has completed and been marked dirty.
    /// Mirrored writes may still mark the tracker: the algorithm does not rely on their bits.
    fn start_mirroring(&mut self) -> Result<(), Self::Error>;
    /// Ends mirroring on an error path: writes go to the source only again. Safe because
    /// mirrored writes were marked dirty too, so the tracker still covers them.
    fn stop_mirroring(&mut self);
    /// A progress sample for the CLI bar and the API.
    fn progress(&mut self, progress: &Progress);
    /// What the guest's requests did since the window was last closed ([`steer`]); `close`:
    /// the next window starts now. `None` when the env cannot measure them (the copy is
    /// then not steered).
    fn guest_window(&mut self, close: bool) -> Option<steer::GuestWindow> {
        let _ = close;
        None
    }
    /// Copies in `gear` from now on (its reads and pace; [`steer::FASTEST`]: unsteered).
    /// Sends with guest writes held are always in the fastest gear.
    fn set_copy_gear(&mut self, gear: steer::Gear) {
        let _ = gear;
    }
}

/// The env step that failed, for [`MigrateError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// [`MigrationEnv::allocated`].
    Allocated,
    /// [`MigrationEnv::send`] during a pass.
    Send,
    /// [`MigrationEnv::send`] of the final set, writes held.
    FinalSend,
    /// [`MigrationEnv::sync_sent`].
    SyncSent,
    /// [`MigrationEnv::hold_writes`].
    HoldWrites,
    /// [`MigrationEnv::commit`].
    Commit,
    /// [`MigrationEnv::mark_in_sync`].
    MarkInSync,
    /// [`MigrationEnv::switch_to_destination`].
    SwitchToDestination,
    /// [`MigrationEnv::start_mirroring`].
    StartMirroring,
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Allocated => "allocated",
            Self::Send => "send",
            Self::FinalSend => "final send",
            Self::SyncSent => "sync sent",
            Self::HoldWrites => "hold writes",
            Self::Commit => "commit",
            Self::MarkInSync => "mark in sync",
            Self::SwitchToDestination => "switch to destination",
            Self::StartMirroring => "start mirroring",
        })
    }
}

/// Why [`run`] stopped without a completed switchover. Each variant says which side is
/// authoritative, so the caller (and `ferry status`) never has to guess.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError<E: std::error::Error + 'static> {
    /// The options were refused before the env was touched.
    #[error("invalid migration options: {0}")]
    Options(&'static str),
    /// An env step failed before the commit point. Writes were released, taken bits merged
    /// back and mirroring stopped: the source is authoritative and a rerun with
    /// `resume: true` continues from the tracker's bits.
    #[error("migration step {step} failed; the source stays authoritative")]
    SourceAuthoritative {
        /// The step that failed.
        step: Step,
        /// The env's error.
        #[source]
        source: E,
    },
    /// `switch_to_destination` failed after the commit: the DESTINATION is authoritative.
    /// Guest writes stay held (the source must not apply them) until the caller completes
    /// the switch or stops the source export.
    #[error("migration step {step} failed after commit; the destination is authoritative")]
    DestinationAuthoritative {
        /// The step that failed.
        step: Step,
        /// The run up to the commit (pause and converge time measured to the commit).
        report: Box<MigrationReport>,
        /// The env's error.
        #[source]
        source: E,
    },
    /// The pause budget could not be met even while mirroring, after every pass and
    /// deferral allowed. The source is authoritative and the run can be resumed.
    #[error("switchover deferred {deferrals} times; the source stays authoritative")]
    NotConverged {
        /// Switchovers deferred before giving up.
        deferrals: u32,
    },
}

impl<E: std::error::Error + 'static> MigrateError<E> {
    /// Whether the destination is authoritative after this error. Exhaustive on purpose.
    pub fn destination_authoritative(&self) -> bool {
        match self {
            Self::DestinationAuthoritative { .. } => true,
            Self::Options(_) | Self::SourceAuthoritative { .. } | Self::NotConverged { .. } => {
                false
            }
        }
    }
}
