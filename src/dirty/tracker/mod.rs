//! A tracker: a named dirty bitmap plus heat counters over one export, at one granularity.
//!
//! Purpose: the write path calls [`Tracker::mark_range`] once per completed guest write; a
//! migration, seed catch-up or backup calls [`Tracker::take_and_clear`] before each pass and
//! [`Tracker::merge`] when a pass fails; NBD BLOCK_STATUS over `qemu:dirty-bitmap:NAME` reads
//! [`Tracker::dirty_runs`]; the heat views feed the migration policy and the terminal map.
//!
//! Invariants:
//! - Block `b` covers bytes `[b * granularity, (b + 1) * granularity)` clipped to the disk;
//!   `block_count = ceil(disk_bytes / granularity)`. A range past the disk is a bug (panic).
//! - Marks follow completed writes (DESIGN.md invariant 1, see `bitmap.rs`).
//! - A lost tracker (restored after an unclean stop) has every block dirty and says so with
//!   [`Tracker::is_lost`] until a caller that re-established the history clears it.
//! - A tracker that is not durable keeps its marks in memory; they reach disk only at a clean
//!   shutdown, so an unclean stop loses the history (the tracker comes back lost). A durable
//!   tracker ([`TrackerSpec::durable`]) also keeps an activity log (`durable.rs`,
//!   `../activity.rs`): every write is admitted into it before it starts, so after an unclean
//!   stop it comes back [`TrackerState::Recovered`], every tracked write still dirty.
//! - A durable tracker's log also covers the set its last [`Tracker::take_and_clear`]
//!   returned, until the next take: a copier takes again only once the blocks of the previous
//!   take are at the destination or merged back, so a crash in the middle of a pass never
//!   loses the blocks the pass had taken.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use super::activity::ActivityLog;
use super::bitmap::{DirtyBitmap, DirtySet, WORD_BITS};
use super::heat::{heat_shift_for, Heat, HeatHistogram, HeatSnapshot};
use super::DirtyError;
use crate::env::Clock;
use crate::name;

/// Default block size of a tracker: 64 KiB.
pub const DEFAULT_GRANULARITY_BYTES: u64 = 64 << 10;
/// Smallest block size: 4 KiB (one page, the O_DIRECT unit).
pub const MIN_GRANULARITY_BYTES: u64 = 4 << 10;
/// Largest block size: 64 MiB.
pub const MAX_GRANULARITY_BYTES: u64 = 64 << 20;
/// Default heat half-life: 30 s.
pub const DEFAULT_HALF_LIFE_MS: u64 = 30_000;
/// Longest heat half-life accepted: 365 days.
pub const MAX_HALF_LIFE_MS: u64 = 365 * 24 * 3600 * 1000;
/// Most blocks one tracker may have. Trackers are sparse now (and a lost one is a flag); the
/// bound stays for the journal (a dense block set must fit a record body).
pub const MAX_BLOCK_COUNT: u64 = 1 << 32;
/// Most runs [`Tracker::dirty_runs`] returns; the NBD client asks again for the rest.
pub const MAX_DIRTY_RUNS: usize = 1024;

/// What a tracker is: its name, block size and heat half-life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackerSpec {
    /// Name, unique per export, valid by [`crate::name::validate`] (it names a file and an
    /// NBD meta context).
    pub name: String,
    /// Block size: a power of two in [`MIN_GRANULARITY_BYTES`]..=[`MAX_GRANULARITY_BYTES`].
    pub granularity_bytes: u64,
    /// Heat halves every `half_life_ms` (1..=[`MAX_HALF_LIFE_MS`]).
    pub half_life_ms: u64,
    /// Keeps an activity log, so that a crash leaves the tracker recovered, not lost.
    pub durable: bool,
}

impl TrackerSpec {
    /// A spec with the default granularity and half-life.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            granularity_bytes: DEFAULT_GRANULARITY_BYTES,
            half_life_ms: DEFAULT_HALF_LIFE_MS,
            durable: false,
        }
    }

    /// Sets whether the tracker keeps an activity log.
    pub fn with_durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Sets the granularity.
    pub fn with_granularity_bytes(mut self, granularity_bytes: u64) -> Self {
        self.granularity_bytes = granularity_bytes;
        self
    }

    /// Sets the half-life.
    pub fn with_half_life_ms(mut self, half_life_ms: u64) -> Self {
        self.half_life_ms = half_life_ms;
        self
    }

    /// Checks name, granularity and half-life; the error names the bad value.
    pub fn validate(&self) -> Result<(), DirtyError> {
        name::validate(&self.name).map_err(DirtyError::Name)?;
        validate_granularity(self.granularity_bytes)?;
        if !(1..=MAX_HALF_LIFE_MS).contains(&self.half_life_ms) {
            return Err(DirtyError::HalfLife {
                half_life_ms: self.half_life_ms,
            });
        }
        Ok(())
    }
}

/// A tracking granularity must be a power of two in
/// [`MIN_GRANULARITY_BYTES`]..=[`MAX_GRANULARITY_BYTES`] (for trackers and export defaults).
pub fn validate_granularity(granularity_bytes: u64) -> Result<(), DirtyError> {
    if !granularity_bytes.is_power_of_two()
        || !(MIN_GRANULARITY_BYTES..=MAX_GRANULARITY_BYTES).contains(&granularity_bytes)
    {
        return Err(DirtyError::Granularity { granularity_bytes });
    }
    Ok(())
}

/// How far a tracker's dirty bits can be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerState {
    /// The bits are the whole history since the tracker was created or last taken.
    Ok,
    /// The history was lost (unclean stop, or writes made elsewhere): every block is dirty.
    Lost,
    /// Restored after an unclean stop from the activity log: the bits are a superset of the
    /// real history that over-marks at most `bound_bytes` (the extents the log held open).
    Recovered {
        /// Most bytes marked dirty that may not have been written.
        bound_bytes: u64,
    },
}

/// A named dirty bitmap plus heat over one disk; see the module docs.
pub struct Tracker {
    name: String,
    granularity_bytes: u64,
    granularity_shift: u32,
    half_life_ms: u64,
    disk_bytes: u64,
    bitmap: DirtyBitmap,
    /// Per region of `1 << heat_shift` blocks.
    heat: Heat,
    heat_shift: u32,
    clock: Arc<dyn Clock>,
    lost: AtomicBool,
    /// Bytes of this tracker's file at its last save (0: never saved).
    state_bytes: AtomicU64,
    durable: bool,
    /// The activity log of a durable tracker, attached before the tracker is published.
    log: OnceLock<ActivityLog>,
    /// A durable tracker's last take, covered by its log until the next take.
    last_take: Mutex<Option<DirtySet>>,
    /// `Some(bound_bytes)` once recovered from a log, until the history is re-established.
    recovered: Mutex<Option<u64>>,
    /// Blocks of the last take, and how many of them were settled since the log's last
    /// compaction ([`Tracker::settle`]).
    take_blocks: AtomicU64,
    settled_blocks: AtomicU64,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the words: a tracker can hold millions of blocks.
        f.debug_struct("Tracker")
            .field("name", &self.name)
            .field("granularity_bytes", &self.granularity_bytes)
            .field("disk_bytes", &self.disk_bytes)
            .field("half_life_ms", &self.half_life_ms)
            .field("dirty_count", &self.dirty_count())
            .field("lost", &self.is_lost())
            .finish_non_exhaustive()
    }
}

impl Tracker {
    /// Creates a clean, cold tracker over a disk of `disk_bytes` bytes.
    pub fn new(
        spec: TrackerSpec,
        disk_bytes: u64,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, DirtyError> {
        spec.validate()?;
        let block_count = disk_bytes.div_ceil(spec.granularity_bytes);
        if block_count > MAX_BLOCK_COUNT {
            return Err(DirtyError::TooManyBlocks {
                disk_bytes,
                granularity_bytes: spec.granularity_bytes,
            });
        }
        let heat_shift = heat_shift_for(spec.granularity_bytes, disk_bytes);
        Ok(Self {
            granularity_shift: spec.granularity_bytes.trailing_zeros(),
            granularity_bytes: spec.granularity_bytes,
            half_life_ms: spec.half_life_ms,
            name: spec.name,
            disk_bytes,
            bitmap: DirtyBitmap::new(block_count),
            heat: Heat::new(block_count.div_ceil(1 << heat_shift), spec.half_life_ms),
            heat_shift,
            clock,
            lost: AtomicBool::new(false),
            state_bytes: AtomicU64::new(0),
            durable: spec.durable,
            log: OnceLock::new(),
            last_take: Mutex::new(None),
            recovered: Mutex::new(None),
            take_blocks: AtomicU64::new(0),
            settled_blocks: AtomicU64::new(0),
        })
    }

    /// The tracker's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Bytes per block.
    pub fn granularity_bytes(&self) -> u64 {
        self.granularity_bytes
    }

    /// Number of blocks.
    pub fn block_count(&self) -> u64 {
        self.bitmap.block_count()
    }

    /// Size of the tracked disk.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Heat half-life.
    pub fn half_life_ms(&self) -> u64 {
        self.half_life_ms
    }

    /// The spec this tracker was made from.
    pub fn spec(&self) -> TrackerSpec {
        TrackerSpec {
            name: self.name.clone(),
            granularity_bytes: self.granularity_bytes,
            half_life_ms: self.half_life_ms,
            durable: self.durable,
        }
    }

    /// The clock heat is measured with.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Records a completed guest write of `[offset_bytes, offset_bytes + len_bytes)`: sets the
    /// dirty bit and bumps the heat of every block it touches. Call only after the write
    /// completed. A 4 KiB write inside one block costs one clock read, one `fetch_or` and one
    /// heat update. Empty ranges do nothing; a range past the disk panics.
    pub fn mark_range(&self, offset_bytes: u64, len_bytes: u64) {
        self.mark_range_at(offset_bytes, len_bytes, self.clock.now_ns());
    }

    /// [`Tracker::mark_range`] with the time already read (a set marks several trackers).
    pub fn mark_range_at(&self, offset_bytes: u64, len_bytes: u64, now_ns: u64) {
        if len_bytes == 0 {
            return;
        }
        let end_bytes = offset_bytes.checked_add(len_bytes);
        assert!(
            end_bytes.is_some_and(|end| end <= self.disk_bytes),
            "range {offset_bytes}+{len_bytes} past disk of {} bytes",
            self.disk_bytes
        );
        let first = offset_bytes >> self.granularity_shift;
        let last = (offset_bytes + len_bytes - 1) >> self.granularity_shift;
        self.bitmap.mark_blocks(first, last);
        let epoch = self.heat.epoch(now_ns);
        for region in first >> self.heat_shift..=last >> self.heat_shift {
            self.heat.bump(region, epoch);
        }
    }

    /// Number of dirty blocks now.
    pub fn dirty_count(&self) -> u64 {
        self.bitmap.count()
    }

    /// Bytes covered by dirty blocks now (the last block may be partial).
    pub fn dirty_bytes(&self) -> u64 {
        let block_count = self.block_count();
        let mut bytes = self.dirty_count() * self.granularity_bytes;
        if block_count > 0 && self.bitmap.is_dirty(block_count - 1) {
            bytes -= block_count * self.granularity_bytes - self.disk_bytes;
        }
        bytes
    }

    /// Whether `block` is dirty now.
    pub fn is_dirty(&self, block: u64) -> bool {
        self.bitmap.is_dirty(block)
    }

    /// Takes every dirty bit and clears it, word by word (each word atomically); call before
    /// reading the blocks. Writes completing meanwhile set bits again for the next pass.
    /// Visits only the chunks written since the last take.
    pub fn take_and_clear(&self) -> DirtySet {
        let take = || {
            let mut set = DirtySet::empty(self.granularity_bytes, self.disk_bytes);
            self.bitmap.take_into(&mut set);
            set
        };
        let Some(log) = self.log.get() else {
            return take();
        };
        // Under the log's lock: a close record sees the bits in the bitmap or in the take.
        log.exclusive(|| {
            let set = take();
            *self
                .last_take
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(set.clone());
            set
        })
    }

    /// Heap bytes the bitmap and the heat hold now (directories and installed chunks).
    pub fn allocated_bytes(&self) -> u64 {
        self.bitmap.allocated_bytes() + self.heat.allocated_bytes()
    }

    /// Heap bytes held now: the bitmap, the heat and a durable tracker's last take. What
    /// `tracker ls` and `/metrics` show as the tracker's memory.
    pub fn memory_bytes(&self) -> u64 {
        let take = self
            .last_take
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map_or(0, DirtySet::allocated_bytes);
        self.allocated_bytes() + take
    }

    /// Bytes of the tracker's file at its last save, Clean or Active (0 when never saved),
    /// plus its activity log's now. A running tracker's file is Active and holds no bits (see
    /// `persist.rs`), so this is small until a clean shutdown writes the whole state.
    pub fn state_bytes(&self) -> u64 {
        let log_bytes = self.log.get().map_or(0, ActivityLog::file_bytes);
        self.state_bytes.load(Ordering::Relaxed) + log_bytes
    }

    /// Records the size of the file just saved for this tracker.
    pub(crate) fn record_save(&self, file_bytes: u64) {
        self.state_bytes.store(file_bytes, Ordering::Relaxed);
    }

    /// Whether every mark of an acknowledged write survives a crash: the tracker is durable
    /// and its activity log works.
    pub fn is_durable(&self) -> bool {
        self.log.get().is_some_and(|log| !log.failed())
    }

    /// How far the dirty bits can be trusted now.
    pub fn state(&self) -> TrackerState {
        if self.is_lost() {
            return TrackerState::Lost;
        }
        match *self
            .recovered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            Some(bound_bytes) => TrackerState::Recovered { bound_bytes },
            None => TrackerState::Ok,
        }
    }

    /// Blocks per heat region, as a shift: heat is kept per region, not per block.
    pub fn heat_shift(&self) -> u32 {
        self.heat_shift
    }

    /// ORs `set` back: a failed pass gives its bits back. The set must come from a tracker
    /// of the same geometry (a bug otherwise).
    pub fn merge(&self, set: &DirtySet) {
        assert_eq!(
            set.granularity_bytes(),
            self.granularity_bytes,
            "merge granularity"
        );
        assert_eq!(set.disk_bytes(), self.disk_bytes, "merge disk size");
        for (word, bits) in set.iter_words() {
            self.bitmap.or_word(word, bits);
        }
        if let Some(log) = self.log.get() {
            // Bits a pass gives back come from the last take, which the log covers already:
            // no append (a deferred switchover merges with writes held).
            let covered = self
                .last_take
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_ref()
                .is_some_and(|take| set.count_not_in(take) == 0);
            if !covered && !log.merged(self, set) {
                self.mark_lost();
            }
        }
    }

    /// The heat epoch now.
    fn epoch_now(&self) -> u32 {
        self.heat.epoch(self.clock.now_ns())
    }

    /// Heat of `block` (of the region holding it), decayed to now.
    pub fn heat(&self, block: u64) -> u8 {
        assert!(block < self.block_count(), "block {block} out of range");
        self.heat.get(block >> self.heat_shift, self.epoch_now())
    }

    /// Blocks of heat region `region`, clipped to the disk.
    fn region_blocks(&self, region: u64) -> std::ops::Range<u64> {
        let first = region << self.heat_shift;
        first..((region + 1) << self.heat_shift).min(self.block_count())
    }

    /// Number of blocks per heat bucket, decayed to now (each block counts its region's heat).
    pub fn heat_histogram(&self) -> HeatHistogram {
        let mut histogram = HeatHistogram::default();
        let mut warm_blocks = 0;
        for (region, heat) in self.heat.nonzero(self.epoch_now()) {
            let blocks = self.region_blocks(region);
            let count = blocks.end - blocks.start;
            histogram.add_blocks(heat, count);
            warm_blocks += count;
        }
        histogram.add_blocks(0, self.block_count() - warm_blocks);
        histogram
    }

    /// Heat of every region now, sparse (for the migration policy).
    pub fn heat_snapshot(&self) -> HeatSnapshot {
        HeatSnapshot::new(self.heat_shift, self.heat.nonzero(self.epoch_now()))
    }

    /// Number of blocks whose heat now is at least `threshold` (at least 1).
    pub fn hot_count(&self, threshold: u8) -> u64 {
        assert!(threshold > 0, "every block has heat 0 or more");
        self.heat
            .nonzero(self.epoch_now())
            .filter(|&(_, heat)| heat >= threshold)
            .map(|(region, _)| {
                let blocks = self.region_blocks(region);
                blocks.end - blocks.start
            })
            .sum()
    }

    /// [`Tracker::heat_histogram`] as `(heat lower bound, blocks)` pairs, coldest first.
    pub fn heat_histogram_pairs(&self) -> Vec<(u8, u64)> {
        self.heat_histogram().to_pairs()
    }

    /// Blocks whose heat now is at least `threshold`, in increasing order.
    /// Lists every block of every hot region: prefer [`Tracker::hot_count`] for a number.
    pub fn hot_set(&self, threshold: u8) -> Vec<u64> {
        if threshold == 0 {
            return (0..self.block_count()).collect();
        }
        self.heat
            .nonzero(self.epoch_now())
            .filter(|&(_, heat)| heat >= threshold)
            .flat_map(|(region, _)| self.region_blocks(region))
            .collect()
    }

    /// The disk split in `cells` equal byte ranges; the hottest block touching each one.
    /// With more cells than blocks, neighbouring cells repeat a block's heat.
    pub fn heat_map(&self, cells: usize) -> Vec<u8> {
        if self.disk_bytes == 0 {
            return vec![0; cells];
        }
        let epoch = self.epoch_now();
        let cell_start = |cell: usize| -> u64 {
            let start = cell as u128 * u128::from(self.disk_bytes) / cells as u128;
            u64::try_from(start).expect("cell start lies within the disk")
        };
        (0..cells)
            .map(|cell| {
                let (start_bytes, end_bytes) = (cell_start(cell), cell_start(cell + 1));
                let first = start_bytes >> self.granularity_shift;
                let last = (end_bytes.max(start_bytes + 1) - 1) >> self.granularity_shift;
                self.heat
                    .max_in(first >> self.heat_shift, last >> self.heat_shift, epoch)
            })
            .collect()
    }

    /// Whether this tracker was restored after an unclean stop (every block marked dirty,
    /// the real history lost).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// The tracker missed writes (its disk was written elsewhere, e.g. while the export
    /// forwarded to another agent): every block counts as dirty and it says it is lost, as
    /// after an unclean stop. A backup that trusted it would miss those writes.
    pub fn mark_lost(&self) {
        self.bitmap.mark_all();
        self.lost.store(true, Ordering::Release);
        if let Some(log) = self.log.get() {
            // Every block dirty, in the log too (a failed log does nothing).
            log.compact(self);
        }
    }

    /// Clears the lost (or recovered) state, once the caller re-established what differs
    /// (e.g. by comparing extent hashes).
    pub fn clear_lost(&self) {
        self.lost.store(false, Ordering::Release);
        *self
            .recovered
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Runs of equal dirtiness `(run_len_bytes, dirty)` covering `[offset_bytes,
    /// offset_bytes + len_bytes)` clipped to the disk, in order (for NBD BLOCK_STATUS over
    /// `qemu:dirty-bitmap:NAME`). The first and last runs may cover partial blocks. At most
    /// [`MAX_DIRTY_RUNS`] runs: then they cover only a prefix of the range, and the
    /// client asks again from where they end.
    pub fn dirty_runs(&self, offset_bytes: u64, len_bytes: u64) -> Vec<(u64, bool)> {
        self.dirty_runs_capped(offset_bytes, len_bytes, MAX_DIRTY_RUNS)
    }

    /// [`Tracker::dirty_runs`] with an explicit cap on the number of runs.
    pub fn dirty_runs_capped(
        &self,
        offset_bytes: u64,
        len_bytes: u64,
        max_runs: usize,
    ) -> Vec<(u64, bool)> {
        let end_bytes = offset_bytes.saturating_add(len_bytes).min(self.disk_bytes);
        let mut runs = Vec::new();
        let mut position_bytes = offset_bytes;
        while position_bytes < end_bytes && runs.len() < max_runs {
            let block = position_bytes >> self.granularity_shift;
            let dirty = self.bitmap.is_dirty(block);
            let limit = ((end_bytes - 1) >> self.granularity_shift) + 1;
            let run_end_block = self.same_state_end(block, dirty, limit);
            let run_end_bytes = (run_end_block << self.granularity_shift).min(end_bytes);
            runs.push((run_end_bytes - position_bytes, dirty));
            position_bytes = run_end_bytes;
        }
        runs
    }

    /// First block in `start..limit` whose dirtiness differs from `dirty`, or `limit`.
    /// Scans a word at a time.
    fn same_state_end(&self, start: u64, dirty: bool, limit: u64) -> u64 {
        let mut block = start;
        while block < limit {
            let word = match self.bitmap.word_or_gap(block / WORD_BITS) {
                Ok(word) => word,
                // No chunk: clean up to the next chunk. Past the dirty state's end when dirty.
                Err(_) if dirty => return block,
                Err(next_word) => {
                    block = next_word * WORD_BITS;
                    continue;
                }
            };
            // Ones where the state differs; bits past block_count read as clean.
            let differs = if dirty { !word } else { word } >> (block % WORD_BITS);
            if differs != 0 {
                return (block + u64::from(differs.trailing_zeros())).min(limit);
            }
            block = (block / WORD_BITS + 1) * WORD_BITS;
        }
        limit
    }

    /// Runs of equal heat `(run_len_bytes, heat)` covering `[offset_bytes, offset_bytes +
    /// len_bytes)` clipped to the disk, in order, heat decayed to now (for NBD BLOCK_STATUS
    /// over `ferry:heat`). One run per heat region at most, so a range of `R` regions gives
    /// at most `R + 1` runs (the first and last may cover partial regions); neighbours of
    /// equal heat are merged. Reads never allocate.
    pub fn heat_runs(&self, offset_bytes: u64, len_bytes: u64) -> Vec<(u64, u8)> {
        let end_bytes = offset_bytes.saturating_add(len_bytes).min(self.disk_bytes);
        let region_shift = self.granularity_shift + self.heat_shift;
        let epoch = self.epoch_now();
        let mut runs: Vec<(u64, u8)> = Vec::new();
        let mut position_bytes = offset_bytes;
        while position_bytes < end_bytes {
            let region = position_bytes >> region_shift;
            let region_end_bytes = ((region + 1) << region_shift).min(end_bytes);
            let heat = self.heat.get(region, epoch);
            let run_bytes = region_end_bytes - position_bytes;
            match runs.last_mut() {
                Some((last_bytes, last_heat)) if *last_heat == heat => *last_bytes += run_bytes,
                _ => runs.push((run_bytes, heat)),
            }
            position_bytes = region_end_bytes;
        }
        runs
    }

    /// The dirty bits now, without clearing, with a durable tracker's last take (for saving:
    /// a pass cut short by the stop has not delivered those blocks).
    pub(crate) fn bitmap_set(&self) -> DirtySet {
        let mut set = DirtySet::empty(self.granularity_bytes, self.disk_bytes);
        self.bitmap.load_into(&mut set);
        if let Some(take) = &*self
            .last_take
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            set.union_with(take);
        }
        set
    }

    /// Nonzero heat per region, decayed to now (for saving).
    pub(crate) fn heat_regions(&self) -> Vec<(u64, u8)> {
        self.heat.nonzero(self.epoch_now()).collect()
    }

    /// Loads saved state into a fresh tracker: nonzero `(word, bits)` and `(region, heat)`
    /// pairs (heat as fresh counts), or, when `lost`, every block dirty and cold. The caller
    /// checked every index against this tracker's geometry.
    pub(crate) fn load_saved(&self, words: &[(u64, u64)], heat: &[(u64, u8)], lost: bool) {
        assert_eq!(self.dirty_count(), 0, "load into a fresh tracker only");
        if lost {
            self.bitmap.mark_all();
            self.lost.store(true, Ordering::Release);
            return;
        }
        for &(word, bits) in words {
            self.bitmap.or_word(word, bits);
        }
        let epoch = self.epoch_now();
        for &(region, count) in heat {
            self.heat.set(region, count, epoch);
        }
    }
}

mod durable;
#[cfg(test)]
mod tests;
