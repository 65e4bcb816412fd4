//! Write trackers: per-export named dirty bitmaps with heat, marked after every guest write.
//!
//! Purpose: know which blocks changed since a point in time (a migration pass, a seed, a
//! backup) and how often each block is rewritten (heat). The write path calls
//! [`TrackerSet::mark_range`] after each completed write; jobs take and clear a tracker's
//! bits before copying ([`Tracker::take_and_clear`]); NBD BLOCK_STATUS exposes each tracker
//! as `qemu:dirty-bitmap:NAME` ([`Tracker::dirty_runs`]).
//!
//! Invariants:
//! - DESIGN.md invariant 1: a block's dirty bit is set only after its write completed, and a
//!   copier clears the bit before it reads the block (`tests.rs` shows the other order loses
//!   updates).
//! - The hot path takes no lock and allocates nothing: one atomic load when the export has no
//!   tracker, otherwise an arc-swap snapshot load, one clock read, and per tracker one
//!   `fetch_or` per bitmap word touched and one heat update per heat region touched. The
//!   first write into a chunk of 32 Ki blocks (or a heat chunk of 1 GiB) allocates that chunk
//!   once, lock-free (`chunked.rs`); memory follows the regions written, not the disk size.
//! - A tracker persisted on clean shutdown comes back as it was; one whose file says the agent
//!   did not stop cleanly comes back lost (every block dirty, cold), never silently trusted, and
//!   stays lost across later clean restarts until [`Tracker::clear_lost`]; a corrupt file is an
//!   error naming the file (`persist.rs`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use arc_swap::ArcSwap;

use crate::env::Clock;
use crate::name::NameError;

pub mod activity;
pub mod bitmap;
mod chunked;
pub mod heat;
pub mod logfile;
pub mod persist;
mod persist_v1;
pub mod set;
#[cfg(test)]
mod tests;
mod tracker;

pub use bitmap::{BitmapError, DirtyBitmap, DirtySet};
pub use heat::{
    heat_shift_for, Heat, HeatHistogram, HeatSnapshot, HEAT_BUCKET_LOWER_BOUNDS, HEAT_REGION_BYTES,
    HOT_THRESHOLD,
};
pub use logfile::LogError;
pub use tracker::{
    validate_granularity, Tracker, TrackerSpec, TrackerState, DEFAULT_GRANULARITY_BYTES,
    DEFAULT_HALF_LIFE_MS, MAX_BLOCK_COUNT, MAX_DIRTY_RUNS, MAX_GRANULARITY_BYTES, MAX_HALF_LIFE_MS,
    MIN_GRANULARITY_BYTES,
};

/// Errors from creating, finding, saving and restoring trackers.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// The tracker name cannot name a file and an NBD meta context (the message says why).
    #[error("invalid tracker {0}")]
    Name(NameError),
    /// The granularity is not a power of two in 4 KiB..=64 MiB.
    #[error("granularity {granularity_bytes} bytes is not a power of two in 4096..=67108864")]
    Granularity {
        /// The rejected granularity.
        granularity_bytes: u64,
    },
    /// The half-life is zero or too long.
    #[error("half-life {half_life_ms} ms is outside 1..={max}", max = MAX_HALF_LIFE_MS)]
    HalfLife {
        /// The rejected half-life.
        half_life_ms: u64,
    },
    /// The disk has more blocks than a tracker may hold at this granularity.
    #[error("disk of {disk_bytes} bytes has too many blocks at granularity {granularity_bytes}")]
    TooManyBlocks {
        /// Size of the disk.
        disk_bytes: u64,
        /// The requested granularity.
        granularity_bytes: u64,
    },
    /// A tracker of that name already exists on the export.
    #[error("tracker {0:?} already exists")]
    Exists(String),
    /// No tracker of that name on the export.
    #[error("no tracker named {0:?}")]
    NotFound(String),
    /// Writing, syncing, renaming or removing a tracker file failed.
    #[error("cannot save tracker file {}", path.display())]
    Save {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Reading a tracker file or listing the directory failed.
    #[error("cannot read tracker file {}", path.display())]
    Load {
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid tracker file: truncated, bad checksum, magic or version.
    #[error("tracker file {} is corrupt: {problem}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
    /// A durable tracker's activity log could not be created.
    #[error("cannot create activity log {}", path.display())]
    Log {
        /// The log file.
        path: PathBuf,
        /// Why.
        #[source]
        source: logfile::LogError,
    },
    /// A durable tracker was asked for where no state directory is known.
    #[error("tracker {0:?} cannot be durable: the export has no state directory")]
    NoStateDir(String),
    /// The file is valid but was saved for a disk of another size.
    #[error("tracker file {} does not match the disk: {problem}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What differs.
        problem: String,
    },
}

/// The trackers of one export; the write path marks them all without taking a lock.
pub struct TrackerSet {
    disk_bytes: u64,
    clock: Arc<dyn Clock>,
    /// Where tracker files and activity logs live (`None`: in-memory only, no durable
    /// tracker can be added).
    dir: Option<PathBuf>,
    /// Extents each durable tracker's log holds open at most.
    log_extents: usize,
    /// Trackers with an activity log, so that a write without any pays one atomic load.
    durable_count: AtomicUsize,
    /// Published list; replaced whole on add/remove, loaded on every write.
    trackers: ArcSwap<Vec<Arc<Tracker>>>,
    /// `trackers.len()`, so that an export without trackers pays one atomic load.
    tracker_count: AtomicUsize,
    /// Serializes add/remove so that two updates cannot lose each other.
    update: Mutex<()>,
}

impl std::fmt::Debug for TrackerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.list().iter().map(|t| t.name().to_owned()).collect();
        f.debug_struct("TrackerSet")
            .field("disk_bytes", &self.disk_bytes)
            .field("trackers", &names)
            .finish_non_exhaustive()
    }
}

impl TrackerSet {
    /// An empty set for a disk of `disk_bytes` bytes; trackers measure heat with `clock`.
    pub fn new(disk_bytes: u64, clock: Arc<dyn Clock>) -> Self {
        Self {
            disk_bytes,
            clock,
            trackers: ArcSwap::from_pointee(Vec::new()),
            tracker_count: AtomicUsize::new(0),
            update: Mutex::new(()),
            dir: None,
            log_extents: activity::DEFAULT_LOG_EXTENTS,
            durable_count: AtomicUsize::new(0),
        }
    }

    /// An empty set whose tracker files and activity logs live in `dir` (created when the
    /// first file is written), so durable trackers can be added.
    pub fn in_dir(disk_bytes: u64, clock: Arc<dyn Clock>, dir: &Path) -> Self {
        let mut set = Self::new(disk_bytes, clock);
        set.dir = Some(dir.to_owned());
        set
    }

    /// Where the set's tracker files and logs live (`None`: in memory only).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Sets how many extents each durable tracker's log holds open at most (before any
    /// durable tracker is added).
    pub fn with_log_extents(mut self, log_extents: usize) -> Self {
        self.log_extents = log_extents.max(4);
        self
    }

    /// Creates the activity log of a durable `tracker` in the set's directory, and its file
    /// as Active, before it is published.
    fn attach_log(&self, tracker: &Tracker) -> Result<(), DirtyError> {
        if !tracker.wants_log() {
            return Ok(());
        }
        let Some(dir) = &self.dir else {
            return Err(DirtyError::NoStateDir(tracker.name().to_owned()));
        };
        std::fs::create_dir_all(dir).map_err(|source| DirtyError::Save {
            path: dir.clone(),
            source,
        })?;
        tracker.attach_log(&logfile::log_path(dir, tracker.name()), self.log_extents)?;
        // Recorded as running at once: a crash from now on replays the log, whoever added
        // the tracker (a job adds its own without saving the set).
        persist::save_one(dir, tracker, persist::FileState::Active)
    }

    /// Size of the disk the trackers cover.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// The clock the trackers use.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Number of trackers.
    pub fn len(&self) -> usize {
        self.trackers.load().len()
    }

    /// Whether the set has no tracker.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Creates and adds a clean tracker; an existing name is [`DirtyError::Exists`].
    /// Marks start with the first write that completes after this returns.
    pub fn add(&self, spec: TrackerSpec) -> Result<Arc<Tracker>, DirtyError> {
        let tracker = Tracker::new(spec, self.disk_bytes, Arc::clone(&self.clock))?;
        self.insert(tracker)
    }

    /// Adds a built tracker, creating its log first when it is durable.
    fn insert(&self, tracker: Tracker) -> Result<Arc<Tracker>, DirtyError> {
        let _update = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.trackers.load_full();
        if current.iter().any(|t| t.name() == tracker.name()) {
            return Err(DirtyError::Exists(tracker.name().to_owned()));
        }
        self.attach_log(&tracker)?;
        let tracker = Arc::new(tracker);
        let mut next = Vec::clone(&current);
        next.push(Arc::clone(&tracker));
        self.publish(next);
        Ok(tracker)
    }

    /// Removes a tracker and hands it back (a job may still hold it), with its file and
    /// activity log when the set has a directory.
    pub fn remove(&self, name: &str) -> Result<Arc<Tracker>, DirtyError> {
        let _update = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.trackers.load_full();
        let Some(index) = current.iter().position(|t| t.name() == name) else {
            return Err(DirtyError::NotFound(name.to_owned()));
        };
        let mut next = Vec::clone(&current);
        let removed = next.remove(index);
        self.publish(next);
        if let Some(dir) = &self.dir {
            // Its file and log go too, or a restart would bring it back (lost, or recovered).
            if let Err(err) = persist::remove_saved(dir, name) {
                log::error!(
                    "tracker {name} removed, its files not: {}",
                    crate::error::error_chain(&err)
                );
            }
        }
        Ok(removed)
    }

    /// Replaces the tracker of `spec`'s name by one built from `spec` holding the old one's
    /// bits at the new granularity ([`DirtySet::to_granularity`]), in one publish; hands back
    /// (new, old). On error nothing changed. Call with writes held and drained: a write that
    /// loaded the list before this would mark only the old one.
    pub fn replace(&self, spec: TrackerSpec) -> Result<(Arc<Tracker>, Arc<Tracker>), DirtyError> {
        let tracker = Arc::new(Tracker::new(
            spec,
            self.disk_bytes,
            Arc::clone(&self.clock),
        )?);
        let _update = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.trackers.load_full();
        let Some(index) = current.iter().position(|t| t.name() == tracker.name()) else {
            return Err(DirtyError::NotFound(tracker.name().to_owned()));
        };
        // Before the new log exists (it replaces the old one's file): it starts with them.
        let carried = current[index].bitmap_set();
        tracker.merge(&carried.to_granularity(tracker.granularity_bytes()));
        if current[index].is_lost() {
            tracker.mark_lost();
        }
        self.attach_log(&tracker)?;
        let mut next = Vec::clone(&current);
        let old = std::mem::replace(&mut next[index], Arc::clone(&tracker));
        self.publish(next);
        Ok((tracker, old))
    }

    /// Publishes a new list; the caller holds `update`.
    fn publish(&self, next: Vec<Arc<Tracker>>) {
        let count = next.len();
        let durable = next.iter().filter(|t| t.has_log()).count();
        self.trackers.store(Arc::new(next));
        // SeqCst like the count below: a writer that sees 0 admitted nothing, and marks
        // late-admit a durable tracker published after its admission.
        self.durable_count.store(durable, Ordering::SeqCst);
        // SeqCst, after the list store: a writer whose load sees the new count also sees the
        // new list, and one that still sees 0 did its load (so its write completed) before
        // the tracker was published, hence before any copier using the tracker starts.
        self.tracker_count.store(count, Ordering::SeqCst);
    }

    /// The tracker named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Tracker>> {
        self.trackers
            .load()
            .iter()
            .find(|t| t.name() == name)
            .cloned()
    }

    /// Every tracker, in the order they were added.
    pub fn list(&self) -> Vec<Arc<Tracker>> {
        Vec::clone(&self.trackers.load())
    }

    /// Records a completed guest write in every tracker (see [`Tracker::mark_range`]).
    /// Without trackers this is one atomic load; otherwise no lock and no allocation.
    pub fn mark_range(&self, offset_bytes: u64, len_bytes: u64) {
        // SeqCst: pairs with `publish`.
        if self.tracker_count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let trackers = self.trackers.load();
        let now_ns = self.clock.now_ns();
        for tracker in trackers.iter() {
            tracker.mark_range_at(offset_bytes, len_bytes, now_ns);
        }
    }

    /// Admits a write of `[offset_bytes, offset_bytes + len_bytes)` into every durable
    /// tracker's activity log before it starts (blocking at most for one log append); the
    /// write is marked with [`TrackerSet::mark_admitted`], and the admission dropped after.
    /// Without durable trackers this is one atomic load.
    pub fn admit(&self, offset_bytes: u64, len_bytes: u64) -> Admission {
        // SeqCst: pairs with `publish`.
        if len_bytes == 0 || self.durable_count.load(Ordering::SeqCst) == 0 {
            return Admission { held: None };
        }
        let trackers = self.trackers.load_full();
        for tracker in trackers.iter() {
            tracker.enter(offset_bytes, len_bytes);
        }
        Admission {
            held: Some(Held {
                trackers,
                offset_bytes,
                len_bytes,
            }),
        }
    }

    /// Records a completed write admitted with `admission` in every tracker (see
    /// [`Tracker::mark_range`]). A durable tracker published after the admission has not
    /// admitted the write: its extents are opened now, after the mark and before the reply,
    /// so an acknowledged write is in its log all the same.
    pub fn mark_admitted(&self, offset_bytes: u64, len_bytes: u64, admission: &Admission) {
        self.mark_range(offset_bytes, len_bytes);
        if len_bytes == 0 || self.durable_count.load(Ordering::SeqCst) == 0 {
            return;
        }
        for tracker in self.trackers.load().iter().filter(|t| t.has_log()) {
            if !admission.holds(tracker) {
                tracker.enter(offset_bytes, len_bytes);
                tracker.leave(offset_bytes, len_bytes);
            }
        }
    }

    /// Saves every tracker under `dir` as cleanly stopped. Call on clean shutdown, after guest
    /// writes stopped: a write marked after this is not in the files, and a crash after it
    /// would restore stale trackers. Files of trackers no longer in the set are left alone
    /// (see [`persist::remove_saved`]).
    pub fn save(&self, dir: &Path) -> Result<(), DirtyError> {
        persist::save_all(dir, &self.list(), persist::FileState::Clean)
    }

    /// Saves every tracker under `dir` as running (Active), so that a crash from now on brings
    /// them back lost. Call after adding or removing a tracker at run time; `restore` does
    /// it itself.
    pub fn save_active(&self, dir: &Path) -> Result<(), DirtyError> {
        persist::save_all(dir, &self.list(), persist::FileState::Active)
    }

    /// Loads the trackers saved under `dir` (none if `dir` does not exist) for a disk of
    /// `disk_bytes` bytes, then rewrites their files as Active before returning, so that an
    /// unclean stop from now on is detected. A file left Active by an unclean stop gives a
    /// lost tracker (every block dirty, [`Tracker::is_lost`]). A corrupt file, or one saved
    /// for another disk size, is an error naming the file.
    pub fn restore(
        dir: &Path,
        disk_bytes: u64,
        clock: Arc<dyn Clock>,
    ) -> Result<TrackerSet, DirtyError> {
        Self::in_dir(disk_bytes, Arc::clone(&clock), dir).restore_into(dir)
    }

    /// [`TrackerSet::restore`] into this empty set (which keeps its log settings): each
    /// durable tracker gets a new log holding its restored bits before its file is rewritten
    /// as Active.
    pub fn restore_into(mut self, dir: &Path) -> Result<TrackerSet, DirtyError> {
        self.dir = Some(dir.to_owned());
        for tracker in persist::load_all(dir, self.disk_bytes, &self.clock)? {
            self.insert(tracker)?;
        }
        // A durable tracker's file was written Active with its new log (`attach_log`).
        let plain: Vec<Arc<Tracker>> = self.list().into_iter().filter(|t| !t.has_log()).collect();
        persist::save_all(dir, &plain, persist::FileState::Active)?;
        Ok(self)
    }
}

/// A write admitted into the durable trackers' activity logs
/// ([`TrackerSet::admit`]); dropping it lets the extents close again, so drop it only after
/// the write was marked ([`TrackerSet::mark_admitted`]) or, if it never started, at once.
#[must_use = "dropping an admission ends it"]
pub struct Admission {
    held: Option<Held>,
}

struct Held {
    trackers: Arc<Vec<Arc<Tracker>>>,
    offset_bytes: u64,
    len_bytes: u64,
}

impl Admission {
    /// An admission of nothing (a write no durable tracker sees).
    pub fn none() -> Self {
        Admission { held: None }
    }

    /// Whether `tracker` admitted this write.
    fn holds(&self, tracker: &Arc<Tracker>) -> bool {
        self.held
            .as_ref()
            .is_some_and(|held| held.trackers.iter().any(|t| Arc::ptr_eq(t, tracker)))
    }
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field(
                "held",
                &self.held.as_ref().map(|h| (h.offset_bytes, h.len_bytes)),
            )
            .finish()
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            for tracker in held.trackers.iter() {
                tracker.leave(held.offset_bytes, held.len_bytes);
            }
        }
    }
}
