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
//! - No tracker is durable yet ([`Tracker::is_durable`] is false): marks live in memory and
//!   reach disk only at a clean shutdown, so an unclean stop loses the history (the tracker
//!   comes back lost). The activity log will make marks durable and restore trackers as
//!   [`TrackerState::Recovered`]; until then no tracker is in that state.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

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
}

impl TrackerSpec {
    /// A spec with the default granularity and half-life.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            granularity_bytes: DEFAULT_GRANULARITY_BYTES,
            half_life_ms: DEFAULT_HALF_LIFE_MS,
        }
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
    /// Reserved for the activity log: restored after an unclean stop from the log, so the
    /// bits are a superset of the real history that over-marks at most `bound_bytes` (the
    /// regions the log held open). No tracker is in this state yet.
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
        let mut set = DirtySet::empty(self.granularity_bytes, self.disk_bytes);
        self.bitmap.take_into(&mut set);
        set
    }

    /// Heap bytes the bitmap and the heat hold now (directories and installed chunks).
    pub fn allocated_bytes(&self) -> u64 {
        self.bitmap.allocated_bytes() + self.heat.allocated_bytes()
    }

    /// Heap bytes held now, as [`Tracker::allocated_bytes`]: what `tracker ls` and `/metrics`
    /// show as the tracker's memory.
    pub fn memory_bytes(&self) -> u64 {
        self.allocated_bytes()
    }

    /// Bytes of the tracker's file at its last save, Clean or Active (0 when never saved). A
    /// running tracker's file is Active and holds no bits (see `persist.rs`), so this is small
    /// until a clean shutdown writes the whole state.
    pub fn state_bytes(&self) -> u64 {
        self.state_bytes.load(Ordering::Relaxed)
    }

    /// Records the size of the file just saved for this tracker.
    pub(crate) fn record_save(&self, file_bytes: u64) {
        self.state_bytes.store(file_bytes, Ordering::Relaxed);
    }

    /// Whether every mark of an acknowledged write survives a crash. False for every tracker
    /// today: marks reach disk only at a clean shutdown. The activity log will make it true.
    pub fn is_durable(&self) -> bool {
        false
    }

    /// How far the dirty bits can be trusted now.
    pub fn state(&self) -> TrackerState {
        if self.is_lost() {
            TrackerState::Lost
        } else {
            TrackerState::Ok
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
    }

    /// Clears the lost flag, once the caller re-established what differs (e.g. by comparing
    /// extent hashes).
    pub fn clear_lost(&self) {
        self.lost.store(false, Ordering::Release);
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

    /// The dirty bits now, without clearing (for saving).
    pub(crate) fn bitmap_set(&self) -> DirtySet {
        let mut set = DirtySet::empty(self.granularity_bytes, self.disk_bytes);
        self.bitmap.load_into(&mut set);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::ManualClock;
    use crate::prng::SplitMix64 as Prng;

    const KIB: u64 = 1024;

    /// A tracker of 4 KiB blocks over `disk_bytes`, half-life 1 s, on a manual clock.
    fn new_tracker(disk_bytes: u64) -> (Tracker, Arc<ManualClock>) {
        let clock = Arc::new(ManualClock::default());
        let spec = TrackerSpec::new("t")
            .with_granularity_bytes(4 * KIB)
            .with_half_life_ms(1000);
        (
            Tracker::new(spec, disk_bytes, clock.clone()).expect("valid spec"),
            clock,
        )
    }

    /// Dirty blocks, in order.
    fn dirty_blocks(tracker: &Tracker) -> Vec<u64> {
        (0..tracker.block_count())
            .filter(|&b| tracker.is_dirty(b))
            .collect()
    }

    #[test]
    fn spec_validation_names_the_bad_value() {
        // Goal: bad granularity, half-life and names are refused with the value in the message.
        // Method: validate a table of bad specs, check the error text.
        let bad_granularity = [0, 2048, 3000, 4095, 12 * KIB, 128 * KIB * KIB];
        for granularity_bytes in bad_granularity {
            let spec = TrackerSpec::new("t").with_granularity_bytes(granularity_bytes);
            let err = spec.validate().expect_err("bad granularity");
            assert!(
                err.to_string().contains(&granularity_bytes.to_string()),
                "{err}"
            );
        }
        for granularity_bytes in [4 * KIB, 64 * KIB, 64 * KIB * KIB] {
            TrackerSpec::new("t")
                .with_granularity_bytes(granularity_bytes)
                .validate()
                .expect("valid");
        }
        let err = TrackerSpec::new("t")
            .with_half_life_ms(0)
            .validate()
            .expect_err("zero");
        assert!(err.to_string().contains("half-life 0 ms"), "{err}");
        for name in ["", ".hidden", "a/b", "sp ace", &"x".repeat(129)] {
            let err = TrackerSpec::new(name).validate().expect_err("bad name");
            assert!(matches!(err, DirtyError::Name { .. }), "{name:?}: {err}");
        }
        TrackerSpec::new("mig-1_a.b")
            .validate()
            .expect("valid name");
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::default());
        let err = Tracker::new(
            TrackerSpec::new("t").with_granularity_bytes(4 * KIB),
            1 << 50,
            clock,
        )
        .expect_err("too many blocks");
        assert!(matches!(err, DirtyError::TooManyBlocks { .. }), "{err}");
    }

    #[test]
    fn mark_range_rounds_out_to_blocks() {
        // Goal: every block a byte range touches is marked, no other. Method: ranges at edges.
        let (tracker, _clock) = new_tracker(10 * 4 * KIB + 100);
        assert_eq!(tracker.block_count(), 11);
        tracker.mark_range(4095, 2);
        assert_eq!(dirty_blocks(&tracker), vec![0, 1]);
        tracker.mark_range(3 * 4 * KIB, 4 * KIB);
        assert_eq!(dirty_blocks(&tracker), vec![0, 1, 3]);
        tracker.mark_range(10 * 4 * KIB, 100);
        tracker.mark_range(5 * 4 * KIB + 1, 0);
        assert_eq!(dirty_blocks(&tracker), vec![0, 1, 3, 10]);
        assert_eq!(tracker.dirty_count(), 4);
        assert_eq!(tracker.dirty_bytes(), 3 * 4 * KIB + 100);
        tracker.mark_range(0, tracker.disk_bytes());
        assert_eq!(tracker.dirty_count(), 11);
    }

    #[test]
    #[should_panic(expected = "past disk")]
    fn mark_range_past_disk_panics() {
        // Goal: a write past the export is a bug. Method: mark one byte past the end.
        let (tracker, _clock) = new_tracker(8 * KIB);
        tracker.mark_range(8 * KIB - 1, 2);
    }

    #[test]
    fn take_and_clear_then_merge_gives_bits_back() {
        // Goal: take returns and clears the bits; merge restores them. Method: mark, take, merge.
        let (tracker, _clock) = new_tracker(1000 * 4 * KIB);
        for block in [0, 64, 65, 999] {
            tracker.mark_range(block * 4 * KIB, 1);
        }
        let set = tracker.take_and_clear();
        assert_eq!(set.iter_blocks().collect::<Vec<_>>(), vec![0, 64, 65, 999]);
        assert_eq!(tracker.dirty_count(), 0);
        tracker.mark_range(5 * 4 * KIB, 1);
        tracker.merge(&set);
        assert_eq!(dirty_blocks(&tracker), vec![0, 5, 64, 65, 999]);
        // Heat counts writes (one per region per write), not merges.
        assert_eq!(tracker.heat(64), 4);
    }

    /// Bytes of one heat region of a 4 KiB tracker (256 blocks).
    const REGION: u64 = 1 << 20;

    #[test]
    fn heat_counts_writes_per_region_and_decays_with_the_clock() {
        // Goal: heat counts writes per 1 MiB region and halves each half-life; every block
        // reads its region's heat. Method: ManualClock steps over a 16-region disk.
        let (tracker, clock) = new_tracker(16 * REGION - 4 * KIB);
        assert_eq!(tracker.heat_shift(), 8);
        for _ in 0..40 {
            tracker.mark_range(2 * REGION + 8 * KIB, 2 * 4 * KIB);
        }
        // One write spanning two regions bumps both once.
        tracker.mark_range(9 * REGION - 4 * KIB, 8 * KIB);
        let region = |r: u64| tracker.heat(r * 256 + 17);
        assert_eq!((region(2), region(8), region(9), region(3)), (40, 1, 1, 0));
        clock.advance_ms(1000);
        assert_eq!((region(2), region(9)), (20, 0));
        clock.advance_ms(2000);
        assert_eq!(region(2), 5);
        tracker.mark_range(2 * REGION, 1);
        assert_eq!(tracker.heat(2 * 256), 6);
        assert_eq!(tracker.hot_set(5), (512..768).collect::<Vec<u64>>());
        assert_eq!(tracker.hot_count(6), 256);
        assert_eq!(tracker.hot_count(7), 0);
        let histogram = tracker.heat_histogram();
        assert_eq!(histogram.total(), tracker.block_count());
        assert_eq!(histogram.to_pairs()[0], (0, tracker.block_count() - 256));
        assert_eq!(histogram.to_pairs()[3], (4, 256));
        let snapshot = tracker.heat_snapshot();
        assert_eq!((snapshot.get(600), snapshot.get(0)), (6, 0));
        assert!(
            tracker.allocated_bytes() < 64 * KIB,
            "{}",
            tracker.allocated_bytes()
        );
    }

    #[test]
    fn heat_map_takes_max_per_cell() {
        // Goal: heat_map splits the disk in equal cells, max heat each. Method: few and many
        // cells over an 8-region disk.
        let (tracker, _clock) = new_tracker(8 * REGION);
        for _ in 0..3 {
            tracker.mark_range(KIB, 1);
        }
        tracker.mark_range(5 * REGION, 1);
        assert_eq!(tracker.heat_map(2), vec![3, 1]);
        assert_eq!(tracker.heat_map(4), vec![3, 0, 1, 0]);
        assert_eq!(tracker.heat_map(1), vec![3]);
        assert_eq!(tracker.heat_map(0), Vec::<u8>::new());
        let fine = tracker.heat_map(16);
        assert_eq!(fine.len(), 16);
        assert_eq!(&fine[..2], &[3, 3]);
        assert_eq!(&fine[10..12], &[1, 1]);
        assert_eq!(fine.iter().filter(|&&h| h > 0).count(), 4);
        let (empty, _clock) = new_tracker(0);
        assert_eq!(empty.heat_map(3), vec![0, 0, 0]);
    }

    /// Reference for `dirty_runs`: byte by byte at block resolution, then merged.
    fn naive_runs(tracker: &Tracker, offset_bytes: u64, len_bytes: u64) -> Vec<(u64, bool)> {
        let end_bytes = (offset_bytes + len_bytes).min(tracker.disk_bytes());
        let mut runs: Vec<(u64, bool)> = Vec::new();
        let mut position = offset_bytes;
        while position < end_bytes {
            let block = position / tracker.granularity_bytes();
            let next = ((block + 1) * tracker.granularity_bytes()).min(end_bytes);
            let dirty = tracker.is_dirty(block);
            match runs.last_mut() {
                Some(last) if last.1 == dirty => last.0 += next - position,
                _ => runs.push((next - position, dirty)),
            }
            position = next;
        }
        runs
    }

    #[test]
    fn dirty_runs_match_a_naive_model() {
        // Goal: dirty_runs covers exactly the clipped range with maximal runs. Method: random
        // bitmaps (sparse, dense, all) and random ranges against a block-by-block reference.
        let mut prng = Prng::new(7);
        for round in 0..60 {
            let disk_bytes = 1 + prng.below(300 * 4 * KIB);
            let (tracker, _clock) = new_tracker(disk_bytes);
            let density = [0, 1, 50, 99, 100][round % 5];
            for block in 0..tracker.block_count() {
                if prng.below(100) < density {
                    tracker.mark_range(block * 4 * KIB, 1);
                }
            }
            for _ in 0..20 {
                let offset_bytes = prng.below(disk_bytes + 10 * KIB);
                let len_bytes = prng.below(disk_bytes + 10 * KIB);
                let runs = tracker.dirty_runs(offset_bytes, len_bytes);
                assert_eq!(
                    runs,
                    naive_runs(&tracker, offset_bytes, len_bytes),
                    "round {round}"
                );
            }
            let whole = tracker.dirty_runs(0, u64::MAX);
            assert_eq!(whole.iter().map(|r| r.0).sum::<u64>(), disk_bytes);
        }
    }

    #[test]
    fn dirty_runs_are_capped() {
        // Goal: at most max_runs runs, covering a prefix. Method: alternate blocks, small caps.
        let (tracker, _clock) = new_tracker(5000 * 4 * KIB);
        for block in (0..5000).step_by(2) {
            tracker.mark_range(block * 4 * KIB, 1);
        }
        let runs = tracker.dirty_runs(100, u64::MAX);
        assert_eq!(runs.len(), MAX_DIRTY_RUNS);
        assert_eq!(runs[0], (4 * KIB - 100, true));
        assert_eq!(runs[1], (4 * KIB, false));
        assert_eq!(tracker.dirty_runs_capped(0, u64::MAX, 3).len(), 3);
        assert!(tracker.dirty_runs(5000 * 4 * KIB, 10).is_empty());
        assert!(tracker.dirty_runs(0, 0).is_empty());
    }

    #[test]
    fn heat_runs_follow_regions_and_merge_equal_neighbours() {
        // Goal: heat runs cover the range exactly, per 1 MiB region, equal neighbours merged.
        // Method: bump regions 1 (twice) and 2 (twice) of a 5 MiB disk, read an unaligned range.
        let (tracker, _clock) = new_tracker(5 << 20);
        tracker.mark_range(1 << 20, 4096);
        tracker.mark_range((1 << 20) + 8192, 4096);
        tracker.mark_range(2 << 20, 8192);
        tracker.mark_range((3 << 20) - 4096, 4096);
        let runs = tracker.heat_runs(4096, 5 << 20);
        assert_eq!(
            runs,
            vec![((1 << 20) - 4096, 0), (2 << 20, 2), (2 << 20, 0)],
            "clipped to the disk, regions 1 and 2 merged"
        );
        assert_eq!(tracker.heat_runs(0, 0), Vec::new());
    }

    #[test]
    fn lost_tracker_is_all_dirty_until_cleared() {
        // Goal: loading as lost marks every block and sets the flag. Method: load_saved(lost).
        let (tracker, _clock) = new_tracker(100 * 4 * KIB + 1);
        assert_eq!(tracker.state(), TrackerState::Ok);
        tracker.load_saved(&[], &[], true);
        assert!(tracker.is_lost());
        assert_eq!(tracker.state(), TrackerState::Lost);
        assert!(
            !tracker.is_durable(),
            "no tracker is durable before the activity log"
        );
        assert_eq!(tracker.dirty_count(), 101);
        assert_eq!(tracker.dirty_bytes(), tracker.disk_bytes());
        tracker.clear_lost();
        assert!(!tracker.is_lost());
        assert_eq!(tracker.state(), TrackerState::Ok);
        assert!(format!("{tracker:?}").contains("dirty_count: 101"));
    }
}
