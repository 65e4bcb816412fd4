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

pub mod bitmap;
mod chunked;
pub mod heat;
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
        }
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

    /// Adds a built tracker (restore path).
    fn insert(&self, tracker: Tracker) -> Result<Arc<Tracker>, DirtyError> {
        let _update = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.trackers.load_full();
        if current.iter().any(|t| t.name() == tracker.name()) {
            return Err(DirtyError::Exists(tracker.name().to_owned()));
        }
        let tracker = Arc::new(tracker);
        let mut next = Vec::clone(&current);
        next.push(Arc::clone(&tracker));
        self.publish(next);
        Ok(tracker)
    }

    /// Removes a tracker and hands it back (a job may still hold it).
    pub fn remove(&self, name: &str) -> Result<Arc<Tracker>, DirtyError> {
        let _update = self.update.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.trackers.load_full();
        let Some(index) = current.iter().position(|t| t.name() == name) else {
            return Err(DirtyError::NotFound(name.to_owned()));
        };
        let mut next = Vec::clone(&current);
        let removed = next.remove(index);
        self.publish(next);
        Ok(removed)
    }

    /// Replaces the tracker of `spec`'s name by a clean one built from `spec`, in one publish;
    /// hands back (new, old). On error nothing changed. A write that loaded the list before
    /// this may still mark the old one: a caller moving bits over holds writes meanwhile.
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
        let mut next = Vec::clone(&current);
        let old = std::mem::replace(&mut next[index], Arc::clone(&tracker));
        self.publish(next);
        Ok((tracker, old))
    }

    /// Publishes a new list; the caller holds `update`.
    fn publish(&self, next: Vec<Arc<Tracker>>) {
        let count = next.len();
        self.trackers.store(Arc::new(next));
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
        let set = TrackerSet::new(disk_bytes, Arc::clone(&clock));
        for tracker in persist::load_all(dir, disk_bytes, &clock)? {
            set.insert(tracker)?;
        }
        set.save_active(dir)?;
        Ok(set)
    }
}
