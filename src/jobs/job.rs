//! The real migration job: [`MigrationEnv`] over the export's migration tracker, the block
//! stream to the destination agent ([`Sender`]) and the export's route and write gate.
//!
//! Invariants:
//! - The migration tracker is created before the first block is read, so every write that
//!   completes from then on is in its bits (DESIGN invariant 1); it is removed when the job
//!   ends, whatever the outcome.
//! - `send` returns only after the destination wrote and synced what was sent (a `Sync`
//!   round trip), so "sent" in a report means durable at the destination. (A `Fence`, written
//!   but not synced, was measured too: the copy got ~6% faster and the guest's write p99
//!   during the job tripled, because the sync's short gaps are when guest I/O gets the
//!   shared disk; see the README.)
//! - The route switches to forwarding only after the destination committed, with writes
//!   held; on any failure before the commit the export keeps serving locally (the algorithm
//!   releases writes), and the target is left uncommitted at the destination.
//! - Active mirroring: the export's sessions write each guest write into the block stream
//!   ([`MirrorLink`]) and wait for the destination's fence before answering. The mirror is
//!   installed and removed with writes held. Blocks taken while mirroring are kept aside
//!   and merged back if mirroring stops without a switchover; a mirror that failed to
//!   deliver anything makes the commit refuse, so the algorithm dropping mirrored bits can
//!   never skip a write the destination lacks.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::fair::{FairSeat, ShareStatus};
use super::holder::HolderChoice;
use crate::dirty::{DirtySet, Tracker, TrackerSpec};
use crate::disk::Export;
use crate::env::Clock;
use crate::journal::{JobSettings, Record, SharedJournal};
use crate::metrics::LatencyRecorder;
use crate::migrate::steer::{self, Gear};
use crate::migrate::{MigrateOptions, Progress};
use crate::transfer::frame::MAX_BLOCKS;
use crate::transfer::{ClusterKey, MirrorLink, SendOptions, Sender, TargetSpec, TransferError};

mod compare;
mod env;
mod seeded;

pub use seeded::{SeedSync, SyncThen};

/// How long a switchover waits for in-flight guest writes to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// The destination syncs after this many bytes of sends, or this long after its last sync,
/// whichever comes first (and after every send with writes held): a slow copy still makes
/// its progress durable (and resumable) every second.
pub const SYNC_EVERY_BYTES: u64 = 64 << 20;
/// See [`SYNC_EVERY_BYTES`].
pub const SYNC_EVERY_NS: u64 = 1_000_000_000;

/// Blocks whose digests a resume asks for at once (2 MiB of digests).
const DIGEST_WINDOW_BLOCKS: u64 = 1 << 16;

/// Block size a job tracks at unless told otherwise, whatever the export's granularity: at
/// 64 KiB a random 4 KiB guest write re-sends 16 times its bytes (`scripts/bench-migrate`:
/// 0.10 of the disk re-sent at 64 KiB against 0.005 at 4 KiB), and a sparse tracker's memory
/// follows the regions written, so 4 KiB costs little on a large disk.
pub const JOB_GRANULARITY_BYTES: u64 = 4 << 10;

/// The granularity a new job tracks at: the one asked for, else [`JOB_GRANULARITY_BYTES`] or
/// the export's when that is finer (never coarser than the export's own trackers), doubled
/// while the disk has more blocks than a destination takes ([`MAX_BLOCKS`]: 4 TiB at 4 KiB).
pub fn job_granularity(
    requested_bytes: Option<u64>,
    export_granularity_bytes: u64,
    disk_bytes: u64,
) -> u64 {
    if let Some(granularity_bytes) = requested_bytes {
        return granularity_bytes;
    }
    let mut granularity_bytes = JOB_GRANULARITY_BYTES.min(export_granularity_bytes);
    while disk_bytes.div_ceil(granularity_bytes) > MAX_BLOCKS
        && granularity_bytes < export_granularity_bytes
    {
        granularity_bytes *= 2;
    }
    granularity_bytes
}

/// Errors of the job's environment.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The block stream failed.
    #[error("block stream")]
    Transfer(#[source] TransferError),
    /// Reading the source's allocation map failed.
    #[error("cannot map the source image")]
    Allocation(#[source] std::io::Error),
    /// In-flight guest writes did not finish in time.
    #[error("guest writes did not drain within {0:?}")]
    Drain(Duration),
    /// The destination does not serve NBD over TCP, so the source cannot forward to it.
    #[error("the destination agent does not serve NBD over TCP: start it with --tcp")]
    NoForwardAddress,
    /// The images differ at the switchover point: the commit was not sent.
    #[error("verification failed: source {source_digest} != destination {destination_digest}")]
    VerifyMismatch {
        /// BLAKE3 of the source image.
        source_digest: String,
        /// BLAKE3 of the destination image.
        destination_digest: String,
    },
    /// The source image could not be read for verification.
    #[error("cannot hash the source image")]
    VerifyRead(#[source] TransferError),
    /// The journal could not record a step: the step was not taken.
    #[error("the journal cannot record the step")]
    Journal(#[source] crate::journal::JournalError),
    /// A mirrored guest write may be missing at the destination: the commit was not sent.
    #[error("active mirroring failed to deliver a guest write; not committing")]
    MirrorFailed,
    /// An in-sync point was asked of a job that is not a seed catch-up.
    #[error("only a seed catch-up has in-sync points")]
    NotSeeded,
}

/// The environment of one running migration.
#[derive(Debug)]
pub struct JobEnv {
    /// A manager's job: the fence whose epoch the Commit carries.
    manager_epoch: Option<Arc<dyn ManagerEpoch>>,
    export: Arc<Export>,
    tracker: Arc<Tracker>,
    sender: Sender,
    clock: Arc<dyn Clock>,
    forward_addr: Option<String>,
    progress: Arc<Mutex<Option<Progress>>>,
    verify: Option<Arc<Mutex<Option<VerifyOutcome>>>>,
    /// The export's latency histogram at the end of the previous guest window.
    guest_before: LatencyRecorder,
    /// The copy controller's gear ([`crate::migrate::steer`]).
    gear: Gear,
    /// Blocks sent since the destination's last sync, and their bytes: the destination
    /// syncs every [`SYNC_EVERY_BYTES`] (not after every send), and until it has, these count
    /// as possibly lost: never settled in the tracker's log, and merged back into the tracker
    /// when the job ends with the source authoritative ([`JobEnv::finish`]).
    unsynced: DirtySet,
    unsynced_bytes: u64,
    /// When the destination last synced (the job's clock).
    synced_ns: u64,
    /// The job's own reads in flight and largest read, which the controller only lowers.
    read_shape: (usize, usize),
    /// Its seat among the agent's copying jobs, and where its share is shown.
    fair: Option<(FairSeat, Arc<Mutex<Option<ShareStatus>>>)>,
    /// The operator's cap, which the controller never raises.
    bandwidth_cap: Option<u64>,
    /// Whether `allocated` leaves out blocks the destination already holds.
    compare_digests: bool,
    /// Every block of the disk is a candidate, holes too (a seed catch-up without its
    /// tracker, or onto an image changed outside ferry): only digests say what differs.
    compare_all: bool,
    /// The seed whose image the destination holds (a seed catch-up).
    seed: Option<[u8; 16]>,
    /// Bytes read from the source image to send or to compare.
    bytes_read: u64,
    /// While mirroring: the mirror the sessions feed, and every block taken since.
    mirror: Option<(MirrorLink, DirtySet)>,
    /// Guest writes are held (the switchover): nothing that may wait on a disk sync runs.
    writes_held: bool,
    /// Where the steps are recorded, and what an in-doubt commit needs to ask the target.
    journal: Option<SharedJournal>,
    /// The disk's lineage (the holder's job), which the forwarding checks.
    lineage: u64,
    job_id: u64,
    to: SocketAddr,
    key: ClusterKey,
}

/// The least of the paces a send follows: the controller's `gear`, the job's share among
/// the copying jobs (not with writes held: the switchover's sends go as fast as they can)
/// and the operator's cap.
fn send_cap(
    gear: Gear,
    fair: Option<&(FairSeat, Arc<Mutex<Option<ShareStatus>>>)>,
    bandwidth_cap: Option<u64>,
    writes_held: bool,
) -> Option<u64> {
    let fair_cap = match (fair, writes_held) {
        (Some((seat, _)), false) => seat.cap(),
        _ => None,
    };
    [gear.cap_bytes_per_s, fair_cap, bandwidth_cap]
        .into_iter()
        .flatten()
        .min()
}

/// The comparison of both images at the switchover point (`--verify`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct VerifyOutcome {
    /// Whether the digests are equal.
    pub matched: bool,
    /// BLAKE3 of the source image, hex.
    pub source_digest: String,
    /// BLAKE3 of the destination image, hex.
    pub destination_digest: String,
    /// Time both hashes took (guest writes are held meanwhile, so it adds to the pause).
    pub elapsed_ms: f64,
}

impl JobEnv {
    /// Sets the sender's pace and reads for the next sends: the controller's gear (the
    /// algorithm puts the fastest for a send with writes held), the fair share's cap among
    /// other copying jobs (not with writes held either), and the operator's cap, the least
    /// of the three paces.
    fn shape_sends(&mut self) {
        let cap = send_cap(
            self.gear,
            self.fair.as_ref(),
            self.bandwidth_cap,
            self.writes_held,
        );
        self.sender.set_bandwidth(cap);
        // The gear shapes the reads (the operator's cap alone does not): never more or
        // longer reads than the job's own.
        let (base_depth, base_chunk) = self.read_shape;
        self.sender.set_read_shape(
            self.gear.read_depth.min(base_depth),
            self.gear.chunk_bytes.min(base_chunk),
        );
    }

    /// Creates the migration tracker on `export` and opens the block stream to the
    /// request's destination; progress samples and the verification go to the given slots.
    pub fn start(
        export: Arc<Export>,
        request: &JobRequest,
        key: &ClusterKey,
        job_id: u64,
        progress: Arc<Mutex<Option<Progress>>>,
        verify: Arc<Mutex<Option<VerifyOutcome>>>,
    ) -> Result<JobEnv, JobError> {
        let (to, send_options) = (request.to, request.send.clone());
        if let (Some(journal), false) = (&request.journal, request.resuming) {
            // Before the destination hears of the job. A resumed job is still `copying`.
            journal
                .append(&Record::SourceStarted {
                    job_id,
                    batch: request.batch.clone(),
                    export: export.name().to_string(),
                    size_bytes: export.size_bytes(),
                    granularity_bytes: request.tracker_granularity_bytes,
                    destination: to.to_string(),
                    policy: request.options.policy,
                })
                .map_err(JobError::Journal)?;
        }
        let holder = request.holder.holder(job_id);
        if let (Some(journal), false, HolderChoice::Elsewhere(_)) =
            (&request.journal, request.resuming, &request.holder)
        {
            // Before the destination hears of the job: the switchover tells this holder.
            journal
                .append(&Record::SourceHolder {
                    job_id,
                    holder: holder.clone(),
                })
                .map_err(JobError::Journal)?;
        }
        if let Some(journal) = &request.journal {
            // What this run was asked for, so that a resume without options continues alike.
            journal
                .append(&Record::SourceSettings {
                    job_id,
                    settings: request.settings(),
                })
                .map_err(JobError::Journal)?;
        }
        let verify = request.verify.then_some(verify);
        let name = tracker_name(job_id);
        let spec = TrackerSpec {
            name: name.clone(),
            granularity_bytes: request.tracker_granularity_bytes,
            half_life_ms: export.half_life_ms(),
            // A crash of the source then resumes from the recovered bits, not from digests
            // of the whole disk (an export without a state directory cannot keep a log).
            durable: export.trackers().dir().is_some(),
        };
        // A resumed job continues with the tracker its failed run left (its bits are what
        // the destination may lack); a fresh one starts its own.
        let tracker = match export.trackers().get(&name) {
            Some(tracker) if request.resuming && !tracker.is_lost() => {
                regrain_tracker(&export, tracker, spec)?
            }
            old => {
                if old.is_some() {
                    // Lost (the agent stopped uncleanly): a fresh one, and digests instead.
                    let _ = export.trackers().remove(&name);
                }
                export
                    .trackers()
                    .add(spec)
                    .map_err(|err| JobError::Allocation(std::io::Error::other(err.to_string())))?
            }
        };
        let target = TargetSpec {
            export: export.name().to_string(),
            size_bytes: export.size_bytes(),
            granularity_bytes: tracker.granularity_bytes(),
            job_id,
            batch: request.batch.clone(),
            holder: Some(holder),
            seed: request.seed.as_ref().map(|sync| sync.seed_id),
            manager_epoch: request.manager_epoch.as_ref().map(|fence| fence.highest()),
        };
        let bandwidth_cap = send_options.bandwidth_bytes_per_s;
        let opened = Sender::connect(to, key, &target, send_options);
        let (sender, reply) = match opened {
            Ok(opened) => opened,
            Err(err) => {
                if !request.resuming {
                    let _ = export.trackers().remove(&name);
                }
                return Err(JobError::Transfer(err));
            }
        };
        let clock = export.trackers().clock().clone();
        let guest_before = export.latency();
        let mut compare_all = request.seed.as_ref().is_some_and(|sync| sync.compare_all);
        if reply.changed_outside {
            log::warn!(
                "export {}: the destination's seeded image was written outside ferry; \
                 comparing digests of the whole disk",
                export.name()
            );
            compare_all = true;
        }
        Ok(JobEnv {
            guest_before,
            gear: steer::FASTEST,
            unsynced: DirtySet::empty(tracker.granularity_bytes(), export.size_bytes()),
            unsynced_bytes: 0,
            synced_ns: clock.now_ns(),
            read_shape: (request.send.read_depth, request.send.chunk_bytes),
            fair: None,
            bandwidth_cap,
            compare_digests: request.compare_digests || compare_all,
            compare_all,
            seed: target.seed,
            bytes_read: 0,
            mirror: None,
            writes_held: false,
            journal: request.journal.clone(),
            manager_epoch: request.manager_epoch.clone(),
            lineage: target
                .holder
                .as_ref()
                .map_or(job_id, |holder| holder.job_id),
            job_id,
            to,
            key: key.clone(),
            clock,
            export,
            tracker,
            sender,
            forward_addr: reply.nbd_tcp,
            progress,
            verify,
        })
    }

    /// Removes any mirror (the run is over), and the migration tracker unless
    /// `keep_tracker`: a run that failed with the source authoritative keeps it, so that a
    /// resume sends only what its bits say the destination may lack.
    pub fn finish(self, keep_tracker: bool) -> Sender {
        self.export.remove_mirror();
        if keep_tracker && !self.unsynced.is_empty() {
            // Sent but never synced: the destination may not hold them (a crash there).
            self.tracker.merge(&self.unsynced);
        }
        if !keep_tracker {
            let _ = self.export.trackers().remove(self.tracker.name());
        }
        self.sender
    }
}

/// `tracker` at `spec`'s granularity: itself when it already is, else a tracker of `spec`
/// replacing it (writes held meanwhile, so no write falls between the two) with its bits
/// converted ([`DirtySet::to_granularity`]): a resume never loses what the failed run left.
fn regrain_tracker(
    export: &Export,
    tracker: Arc<Tracker>,
    spec: TrackerSpec,
) -> Result<Arc<Tracker>, JobError> {
    if tracker.granularity_bytes() == spec.granularity_bytes {
        return Ok(tracker);
    }
    let granularity_bytes = spec.granularity_bytes;
    export.hold_writes();
    if !export.wait_drained(DRAIN_TIMEOUT) {
        export.release_writes();
        return Err(JobError::Drain(DRAIN_TIMEOUT));
    }
    // The new tracker starts with the old one's bits, converted.
    let replaced = export.trackers().replace(spec);
    export.release_writes();
    log::info!(
        "export {}: tracker {} now at {granularity_bytes} bytes, its bits converted",
        export.name(),
        tracker.name()
    );
    replaced
        .map(|(fine, _)| fine)
        .map_err(|err| JobError::Allocation(std::io::Error::other(err.to_string())))
}

/// Name of a job's tracker.
pub fn tracker_name(job_id: u64) -> String {
    format!("migrate-{job_id}")
}

/// Blocks of `granularity_bytes` that hold data (SEEK_DATA/SEEK_HOLE); a block partly data
/// counts whole.
pub fn allocated_blocks(export: &Export, granularity_bytes: u64) -> std::io::Result<DirtySet> {
    let disk = export.size_bytes();
    let mut set = DirtySet::empty(granularity_bytes, disk);
    let image = export.image()?;
    let mut offset = 0;
    while offset < disk {
        let Some(data) = image.seek_data(offset)? else {
            break;
        };
        if data >= disk {
            break;
        }
        let hole = image.seek_hole(data)?.unwrap_or(disk).min(disk);
        for block in data / granularity_bytes..hole.div_ceil(granularity_bytes) {
            set.insert(block);
        }
        offset = hole;
    }
    Ok(set)
}

/// Options of a job as the API receives them.
#[derive(Debug, Clone)]
pub struct JobRequest {
    /// Where the job records its steps (the agent's journal); `None` in tests without one.
    pub journal: Option<SharedJournal>,
    /// Destination agent's block-stream address.
    pub to: SocketAddr,
    /// Algorithm options.
    pub options: MigrateOptions,
    /// Block-stream options (bandwidth cap).
    pub send: SendOptions,
    /// Compare BLAKE3 digests of both images at the switchover point.
    pub verify: bool,
    /// `--yield` was asked for (journaled in the settings; the copy controller's bound is
    /// in `options.impact_target_us`).
    pub yield_to_guest: bool,
    /// Batch the job belongs to.
    pub batch: Option<String>,
    /// The job id is that of an interrupted job being resumed (`ferry resume`).
    pub resuming: bool,
    /// A resume: blocks whose content already matches at the destination (BLAKE3 per
    /// block) are not sent.
    pub compare_digests: bool,
    /// Who holds the guest's connection to the disk: named in the `Open`, and told where
    /// the disk went after the switchover when it is another agent.
    pub holder: HolderChoice,
    /// Block size of the job's tracker, hence of its sends, digests, the destination's
    /// received blocks and the journal's sets ([`job_granularity`]; a resume: the journaled
    /// one).
    pub tracker_granularity_bytes: u64,
    /// A seed catch-up (`ferry seed sync`) instead of a plain migration.
    pub seed: Option<SeedSync>,
    /// A manager started the job: its Open and Commit carry the highest manager epoch this
    /// agent has admitted at that moment ([`ManagerEpoch`]). `None`: an operator's job.
    pub manager_epoch: Option<Arc<dyn ManagerEpoch>>,
    /// Its weight among the agent's copying jobs ([`super::fair`]; 1: an equal share).
    pub weight: u32,
}

/// The highest manager epoch this agent has admitted (its fence): a job a manager started
/// names it in its Open and Commit, so a destination that has seen a newer manager refuses
/// the job of a deposed one, unless this agent has heard from the newer manager too (it
/// answers to that one now, and would have been told to abort).
pub trait ManagerEpoch: Send + Sync + std::fmt::Debug {
    /// The epoch, read when the Open or Commit is sent.
    fn highest(&self) -> u64;
}

impl JobRequest {
    /// The settings this run journals (`SourceSettings`) and reports in its status. A cap
    /// of 0 is no cap, as the block stream's pacer reads it.
    pub fn settings(&self) -> JobSettings {
        JobSettings {
            policy: self.options.policy,
            max_pause_ms: self.options.max_pause_ms,
            target_pause_ms: self.options.target_pause_ms,
            force_after_ms: self.options.force_after_ms,
            bandwidth_bytes_per_s: self.send.bandwidth_bytes_per_s.filter(|&rate| rate > 0),
            hot_threshold: self.options.hot_threshold,
            mirror: self.options.mirror_from_start,
            verify: self.verify,
            yield_to_guest: self.yield_to_guest,
        }
    }
}

/// After a switchover: the local image is stale; its file takes its stale name so nobody
/// reads it as the disk. A failure is logged, never fatal: the route already forwards, and
/// the journal's `switched` keeps a restart forwarding whatever the file is called.
pub fn retire_image(export: &Export, job_id: u64) {
    match export.retire_image(job_id) {
        Ok(stale) => log::info!(
            "export {}: its local image is stale now, renamed to {}",
            export.name(),
            stale.display()
        ),
        Err(err) => log::warn!(
            "export {}: cannot rename the stale image {}: {err}",
            export.name(),
            export.path().display()
        ),
    }
}

#[cfg(test)]
mod tests;
