//! The activity log of a durable tracker: before a write reaches an extent, the extent is on
//! disk as open, so a crash loses no tracked write.
//!
//! Purpose: a tracker's bits live in memory and reach its file only at a clean stop. A
//! durable tracker also keeps this log (`logfile.rs`): the disk is cut into extents of at
//! least 4 MiB, at most `capacity` of them are open at once, and a write may start only once
//! every extent it touches is open in the log. When the open set is full, extents nobody is
//! writing are closed least-recently-used first (CLOCK): a close record holds the extent's
//! bits, so the log stays a checkpoint of the bitmap plus the open extents. After a kill -9 or
//! a power loss, replaying the log gives every block written since the log was created, plus
//! at most the open extents' other blocks (the bound `tracker ls` shows).
//!
//! Invariants:
//! - Before a write is submitted, every extent it touches is open in the log and fdatasynced
//!   ([`ActivityLog::enter`]), and it stays open until the write was marked in the bitmap
//!   ([`ActivityLog::leave`]): each open extent's cell counts the writes inside it, and an
//!   extent is closed only at count 0.
//! - A cell is `OPEN | EVICTING | REFERENCED | count`. A writer enters with one CAS that
//!   succeeds only while OPEN is set and EVICTING clear; the evictor sets EVICTING with a CAS
//!   that succeeds only at count 0. So once the evictor owns an extent no write is inside it,
//!   and every write that was has marked its bits and left with a `Release` decrement, which
//!   the evictor's `AcqRel` CAS reads: its close record sees those bits.
//! - Opens are batched: a writer that misses queues its extents; one committer writes the
//!   close records of its victims and the open record in one append and one fdatasync, while
//!   the others wait on a condvar (group commit). Lock order: `file`, then `state`; no thread
//!   holds `state` while it waits for `file`.
//! - Anything that adds bits without a write (a merge, a take's set until the next take) or
//!   reads them for a record holds `file`, so no record is built from a half-changed bitmap.
//! - A write touching more than a quarter of the capacity (a large TRIM or WRITE_ZEROES) does
//!   not open extents: its blocks go into the log as a merge record before it starts and are
//!   counted in every record while it runs.
//! - If the log cannot be written, the tracker stops being durable: the log file is removed
//!   (a recovery then finds the tracker lost, never a log that missed writes), the caller
//!   marks the tracker lost, and writes go on untracked by the log.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use super::chunked::Chunked;
use super::logfile::{self, Geometry, LogError, LogFile};
use super::set::{DirtySet, WORD_BITS};

/// Smallest extent: 4 MiB (an extent is also at least 64 blocks, one bitmap word).
pub const MIN_EXTENT_BYTES: u64 = 4 << 20;
/// Extents a log holds open by default: 1024 (4 GiB of disk at 4 MiB extents).
pub const DEFAULT_LOG_EXTENTS: usize = 1024;

/// The extent is open in the log: writes may enter.
const OPEN: u32 = 1 << 31;
/// The extent is being closed: writes wait.
const EVICTING: u32 = 1 << 30;
/// A write entered since the last CLOCK sweep passed.
const REFERENCED: u32 = 1 << 29;
/// Writes inside the extent now.
const COUNT_MASK: u32 = REFERENCED - 1;
/// Extent cells per lazily allocated chunk (1 KiB).
const CELL_CHUNK: usize = 256;

/// The tracker's durable bits, as the log reads them for its records.
pub trait DurableBits {
    /// Nonzero `(word, bits)` in `first_word..end_word` of the bitmap and the last take.
    fn words_in(&self, first_word: u64, end_word: u64) -> Vec<(u64, u64)>;
    /// The bitmap and the last take as one set.
    fn all(&self) -> DirtySet;
}

/// What the committer and the waiters share.
#[derive(Debug, Default)]
struct State {
    /// Open extents in CLOCK order.
    active: VecDeque<u64>,
    /// Extents waiting for the next commit to open them.
    queued: Vec<u64>,
    /// A thread is writing a batch.
    committing: bool,
    /// Block ranges `(first, end)` of wide writes in flight.
    wide: Vec<(u64, u64)>,
}

/// One durable tracker's log; see the module docs.
pub struct ActivityLog {
    geometry: Geometry,
    /// Bytes per extent, as a shift.
    extent_shift: u32,
    capacity: usize,
    cells: Chunked<AtomicU32, CELL_CHUNK>,
    state: Mutex<State>,
    changed: Condvar,
    /// `None` once the log failed.
    file: Mutex<Option<LogFile>>,
    failed: AtomicBool,
}

impl std::fmt::Debug for ActivityLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivityLog")
            .field("geometry", &self.geometry)
            .field("capacity", &self.capacity)
            .field("failed", &self.failed.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The extent size for blocks of `granularity_bytes`: 4 MiB, or 64 blocks when larger.
pub fn extent_blocks_for(granularity_bytes: u64) -> u64 {
    (MIN_EXTENT_BYTES / granularity_bytes).max(WORD_BITS)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl ActivityLog {
    /// Creates the log at `path` holding `bits` (nothing open), replacing any file there.
    pub fn create(
        path: &Path,
        granularity_bytes: u64,
        disk_bytes: u64,
        capacity: usize,
        bits: &dyn DurableBits,
    ) -> Result<ActivityLog, LogError> {
        let geometry = Geometry {
            granularity_bytes,
            disk_bytes,
            extent_blocks: extent_blocks_for(granularity_bytes),
        };
        let file = LogFile::create(path, &geometry, &bits.all(), &[])?;
        Ok(ActivityLog {
            extent_shift: (geometry.extent_blocks * granularity_bytes).trailing_zeros(),
            cells: Chunked::new(geometry.extent_count()),
            geometry,
            capacity: capacity.max(4),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            file: Mutex::new(Some(file)),
            failed: AtomicBool::new(false),
        })
    }

    /// The log's geometry.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// Whether the log failed (the tracker is no longer durable).
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Bytes of disk the open extents cover: what a crash now would over-mark at most.
    pub fn open_bytes(&self) -> u64 {
        let state = lock(&self.state);
        state
            .active
            .iter()
            .map(|&extent| self.geometry.extent_disk_bytes(extent))
            .sum()
    }

    /// Bytes of the log file now (0 once it failed).
    pub fn file_bytes(&self) -> u64 {
        lock(&self.file).as_ref().map_or(0, LogFile::len_bytes)
    }

    /// Extents `[offset_bytes, offset_bytes + len_bytes)` touches (`len_bytes > 0`).
    fn extents(&self, offset_bytes: u64, len_bytes: u64) -> (u64, u64) {
        let last_byte = offset_bytes + len_bytes - 1;
        (
            offset_bytes >> self.extent_shift,
            last_byte >> self.extent_shift,
        )
    }

    /// Whether a range of `count` extents is admitted as a wide write.
    fn is_wide(&self, count: u64) -> bool {
        count > (self.capacity / 4) as u64
    }

    fn cell(&self, extent: u64) -> &AtomicU32 {
        self.cells.get_or_install(extent).cell
    }

    /// Enters an open extent without waiting; false when it is closed or being closed.
    fn try_enter(&self, extent: u64) -> bool {
        let cell = self.cell(extent);
        let mut current = cell.load(Ordering::Acquire);
        loop {
            if current & OPEN == 0 || current & EVICTING != 0 {
                return false;
            }
            let next = (current + 1) | REFERENCED;
            match cell.compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(seen) => current = seen,
            }
        }
    }

    /// Returns once every extent the range touches is open on disk and counts this write
    /// (or, for a wide write, once its blocks are in the log); pair with [`ActivityLog::leave`]
    /// after the write was marked. Blocks at most for one append and fdatasync when an extent
    /// was closed. Does not fail: a log that cannot be written is given up (see the module
    /// docs) and `false` returned, once, so the caller marks the tracker lost.
    pub fn enter(&self, bits: &dyn DurableBits, offset_bytes: u64, len_bytes: u64) -> bool {
        if len_bytes == 0 {
            return true;
        }
        let (first, last) = self.extents(offset_bytes, len_bytes);
        if self.is_wide(last - first + 1) {
            return self.enter_wide(offset_bytes, len_bytes);
        }
        let mut missing: Vec<u64> = (first..=last).filter(|&e| !self.try_enter(e)).collect();
        if missing.is_empty() {
            return true;
        }
        self.enter_slow(bits, &mut missing)
    }

    /// A write of `[offset_bytes, offset_bytes + len_bytes)` admitted by
    /// [`ActivityLog::enter`] was marked: its extents may close again.
    pub fn leave(&self, offset_bytes: u64, len_bytes: u64) {
        if len_bytes == 0 {
            return;
        }
        let (first, last) = self.extents(offset_bytes, len_bytes);
        if self.is_wide(last - first + 1) {
            let range = self.block_range(offset_bytes, len_bytes);
            let mut state = lock(&self.state);
            if let Some(index) = state.wide.iter().position(|&r| r == range) {
                state.wide.swap_remove(index);
            }
            return;
        }
        for extent in first..=last {
            // Release: the marks made before this are seen by an evictor reading count 0.
            self.cell(extent).fetch_sub(1, Ordering::Release);
        }
    }

    /// Blocks of a byte range, as `(first, end)`.
    fn block_range(&self, offset_bytes: u64, len_bytes: u64) -> (u64, u64) {
        let granularity = self.geometry.granularity_bytes;
        (
            offset_bytes / granularity,
            (offset_bytes + len_bytes).div_ceil(granularity),
        )
    }

    fn enter_slow(&self, bits: &dyn DurableBits, missing: &mut Vec<u64>) -> bool {
        let mut state = lock(&self.state);
        loop {
            missing.retain(|&extent| !self.try_enter(extent));
            if missing.is_empty() {
                return true;
            }
            if self.failed() {
                // Counted anyway, so that `leave` stays balanced; nothing closes any more.
                for &extent in missing.iter() {
                    self.cell(extent).fetch_add(1, Ordering::AcqRel);
                }
                return true;
            }
            for &extent in missing.iter() {
                let cell = self.cell(extent).load(Ordering::Acquire);
                if cell & (OPEN | EVICTING) == 0 && !state.queued.contains(&extent) {
                    state.queued.push(extent);
                }
            }
            if state.committing {
                state = self
                    .changed
                    .wait(state)
                    .unwrap_or_else(PoisonError::into_inner);
                continue;
            }
            let (next, ok) = self.commit(bits, state);
            state = next;
            if !ok {
                for &extent in missing.iter() {
                    self.cell(extent).fetch_add(1, Ordering::AcqRel);
                }
                return false;
            }
        }
    }

    /// Opens the queued extents, closing victims first if the open set is full, in one
    /// append; returns the state lock again and false if the log failed just now.
    fn commit<'s>(
        &'s self,
        bits: &dyn DurableBits,
        mut state: MutexGuard<'s, State>,
    ) -> (MutexGuard<'s, State>, bool) {
        state.committing = true;
        let batch = std::mem::take(&mut state.queued);
        let victims = self.choose_victims(&mut state, batch.len());
        drop(state);
        let mut file = lock(&self.file);
        let mut result = Ok(());
        if let Some(log) = file.as_mut() {
            let mut records = Vec::new();
            let wide = lock(&self.state).wide.clone();
            for &victim in &victims {
                logfile::encode_close(&mut records, victim, &self.close_words(bits, victim, &wide));
            }
            logfile::encode_open(&mut records, &batch);
            result = log.append(&records);
        }
        let mut state = lock(&self.state);
        let ok = match result {
            Ok(()) => {
                for &victim in &victims {
                    // Count 0 and EVICTING kept writers out: nobody else changes this cell.
                    self.cell(victim).store(0, Ordering::Release);
                }
                for &extent in &batch {
                    self.cell(extent)
                        .fetch_or(OPEN | REFERENCED, Ordering::AcqRel);
                    state.active.push_back(extent);
                }
                true
            }
            Err(err) => {
                for &victim in &victims {
                    self.cell(victim).fetch_and(!EVICTING, Ordering::AcqRel);
                    state.active.push_back(victim);
                }
                self.give_up(&mut file, &err);
                false
            }
        };
        let wants_compaction = file.as_ref().is_some_and(LogFile::wants_compaction);
        state.committing = false;
        self.changed.notify_all();
        drop(state);
        if ok && wants_compaction {
            self.compact_locked(bits, &mut file);
        }
        drop(file);
        (lock(&self.state), ok)
    }

    /// Up to enough open extents nobody is writing to make room for `incoming`, CLOCK order
    /// (a referenced extent gets a second chance); each is marked EVICTING. Closes a
    /// sixteenth of the capacity at least, so the cost of closing is shared by many opens.
    fn choose_victims(&self, state: &mut State, incoming: usize) -> Vec<u64> {
        let over = (state.active.len() + incoming).saturating_sub(self.capacity);
        if over == 0 {
            return Vec::new();
        }
        let want = over.max(self.capacity / 16);
        let mut victims = Vec::with_capacity(want);
        let mut scanned = 0;
        let limit = 2 * state.active.len();
        while victims.len() < want && scanned < limit {
            let Some(extent) = state.active.pop_front() else {
                break;
            };
            scanned += 1;
            let cell = self.cell(extent);
            let current = cell.load(Ordering::Acquire);
            if current & REFERENCED != 0 {
                cell.fetch_and(!REFERENCED, Ordering::Relaxed);
                state.active.push_back(extent);
                continue;
            }
            let idle = current & COUNT_MASK == 0
                && cell
                    .compare_exchange(
                        current,
                        current | EVICTING,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    )
                    .is_ok();
            if idle {
                victims.push(extent);
            } else {
                state.active.push_back(extent);
            }
        }
        victims
    }

    /// The words a close record of `extent` holds: its bits, the last take's, and the
    /// blocks of wide writes in flight.
    fn close_words(
        &self,
        bits: &dyn DurableBits,
        extent: u64,
        wide: &[(u64, u64)],
    ) -> Vec<(u64, u64)> {
        let words = self.geometry.extent_words();
        let first_word = extent * words;
        let mut merged: BTreeMap<u64, u64> = bits
            .words_in(first_word, first_word + words)
            .into_iter()
            .collect();
        let (start, end) = (first_word * WORD_BITS, (first_word + words) * WORD_BITS);
        for &(first, stop) in wide {
            for block in first.max(start)..stop.min(end) {
                *merged.entry(block / WORD_BITS).or_default() |= 1 << (block % WORD_BITS);
            }
        }
        merged.into_iter().filter(|&(_, bits)| bits != 0).collect()
    }

    fn enter_wide(&self, offset_bytes: u64, len_bytes: u64) -> bool {
        let (first, end) = self.block_range(offset_bytes, len_bytes);
        let end = end.min(self.geometry.block_count());
        let mut file = lock(&self.file);
        let mut ok = true;
        if let Some(log) = file.as_mut() {
            let mut set =
                DirtySet::empty(self.geometry.granularity_bytes, self.geometry.disk_bytes);
            set.insert_range(first, end);
            let mut records = Vec::new();
            logfile::encode_merge(&mut records, &set);
            if let Err(err) = log.append(&records) {
                self.give_up(&mut file, &err);
                ok = false;
            }
        }
        // Under `file`: a record built after this counts the range.
        lock(&self.state).wide.push((first, end));
        drop(file);
        ok
    }

    /// Runs `f` with the log's records held still: a take moves bits to its set inside.
    pub fn exclusive<R>(&self, f: impl FnOnce() -> R) -> R {
        let _file = lock(&self.file);
        f()
    }

    /// Records `set`, just ORed into the bitmap, durably (a merge, or a take given back).
    /// Returns false if the log failed just now.
    pub fn merged(&self, bits: &dyn DurableBits, set: &DirtySet) -> bool {
        let mut file = lock(&self.file);
        let Some(log) = file.as_mut() else {
            return true;
        };
        let mut records = Vec::new();
        logfile::encode_merge(&mut records, set);
        if records.len() > logfile::MAX_APPEND_BYTES {
            return self.compact_locked(bits, &mut file);
        }
        match log.append(&records) {
            Ok(()) => true,
            Err(err) => {
                self.give_up(&mut file, &err);
                false
            }
        }
    }

    /// Rewrites the log as one checkpoint: every durable bit and the open extents.
    pub fn compact(&self, bits: &dyn DurableBits) -> bool {
        let mut file = lock(&self.file);
        self.compact_locked(bits, &mut file)
    }

    fn compact_locked(&self, bits: &dyn DurableBits, file: &mut Option<LogFile>) -> bool {
        let Some(log) = file.as_ref() else {
            return true;
        };
        let path = log.path().to_owned();
        let mut set = bits.all();
        let open: Vec<u64> = {
            let state = lock(&self.state);
            for &(first, end) in &state.wide {
                set.insert_range(first, end);
            }
            // No commit runs (it would hold `file`): every active extent is plainly open.
            state.active.iter().copied().collect()
        };
        match LogFile::create(&path, &self.geometry, &set, &open) {
            Ok(new) => {
                *file = Some(new);
                true
            }
            Err(err) => {
                self.give_up(file, &err);
                false
            }
        }
    }

    /// Closes the log for good after a clean save wrote every bit to the tracker's file: the
    /// file is closed here (so removing it frees its blocks now, in the saving thread, not at
    /// process exit) and nothing is logged any more.
    pub fn close(&self) {
        let mut file = lock(&self.file);
        self.failed.store(true, Ordering::Release);
        file.take();
    }

    /// The log cannot be written: stop logging and remove the file, so that a recovery finds
    /// no log (the tracker comes back lost) rather than one that missed writes.
    fn give_up(&self, file: &mut Option<LogFile>, err: &LogError) {
        let Some(log) = file.take() else {
            return;
        };
        self.failed.store(true, Ordering::Release);
        let removed = std::fs::remove_file(log.path());
        log::error!(
            "{}; the tracker is no longer durable (log removed: {})",
            crate::error::error_chain(err),
            removed.is_ok()
        );
    }
}

#[cfg(test)]
mod tests;
