//! Write heat: a counter of recent writes per region that halves every half-life.
//!
//! Heat is kept per region, not per block: it is a scheduling hint, and a region's cell is
//! bumped once per write touching it. A region is [`HEAT_REGION_BYTES`] (1 MiB), or one block
//! when blocks are larger, or, on disks over 64 GiB, the power of two that keeps a tracker at
//! most [`MAX_HEAT_REGIONS`] regions ([`heat_shift_for`]): 4 MiB on 256 GiB, 1 GiB on 64 TiB.
//! So a tracker's heat never exceeds 256 KiB of cells, even when writes are spread over the
//! whole disk and touch every region. Cells live in lazily allocated chunks ([`Chunked`], 1024
//! cells = 4 KiB), so memory follows the regions written; a region never written reads 0.
//! Chunks are never freed while the tracker lives (see `chunked.rs`).
//!
//! Each region has one `AtomicU32` packing an 8-bit count (low byte) and a 24-bit epoch (high
//! bits), where `epoch = now_ns / half_life_ns` from the injected clock. A bump first decays the
//! stored count to the current epoch (`count >> elapsed_epochs`, 0 once 8 or more half-lives
//! passed), then adds 1, saturating at 255. Reading decays the same way, so no background
//! thread ever walks the counters.
//!
//! Invariants:
//! - Heat is a scheduling hint (which blocks to copy last), never a correctness input: the
//!   dirty bitmap alone decides what must be copied. So updates use `Relaxed` loads and stores
//!   and may lose an increment when two writes race on one block; the block then looks
//!   slightly cooler, and no data is ever lost by that.
//! - Epochs are 24-bit and wrap (after 2^24 half-lives: 194 days at 1 s, 15 years at 30 s).
//!   A stored epoch "ahead" of the reader's (a racing writer read the clock later) counts as
//!   zero elapsed. A block left untouched for a whole multiple of 2^24 half-lives may read as
//!   warm again: accepted for a hint.
//! - Epochs mean nothing across restarts (the clock origin changes); persisted heat is a
//!   plain count, restored as fresh at the current epoch.
//! - The region size is a function of the granularity and the block count only (never of
//!   the build's history), so every tracker of one disk at one granularity agrees on it.
//!   Saved heat of another region size (an older build) is mapped ([`remap_regions`]), never
//!   read as if its regions were this build's.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering};

use super::chunked::Chunked;

/// Smallest bytes per heat region (when the tracker's blocks are smaller): 1 MiB.
pub const HEAT_REGION_BYTES: u64 = 1 << 20;
/// Most heat regions a tracker has (256 KiB of cells); larger disks get larger regions.
pub const MAX_HEAT_REGIONS: u64 = 1 << 16;

/// Blocks per heat region for a disk of `disk_bytes` at `granularity_bytes`, as a shift:
/// regions of [`HEAT_REGION_BYTES`] (or one block when blocks are larger), doubled until the
/// disk has at most [`MAX_HEAT_REGIONS`]. Depends on `disk_bytes` only through the block
/// count, so a disk rounded up to whole blocks gets the same shift.
pub fn heat_shift_for(granularity_bytes: u64, disk_bytes: u64) -> u32 {
    heat_shift_for_blocks(granularity_bytes, disk_bytes.div_ceil(granularity_bytes))
}

/// [`heat_shift_for`] from the block count (a saved tracker's header).
pub fn heat_shift_for_blocks(granularity_bytes: u64, block_count: u64) -> u32 {
    let at_least_region = HEAT_REGION_BYTES
        .trailing_zeros()
        .saturating_sub(granularity_bytes.trailing_zeros());
    // The smallest s with ceil(block_count / 2^s) <= MAX_HEAT_REGIONS.
    let at_most_regions = block_count
        .div_ceil(MAX_HEAT_REGIONS)
        .next_power_of_two()
        .trailing_zeros();
    at_least_region.max(at_most_regions)
}

/// Nonzero `(region, heat)` of regions of `1 << from_shift` blocks, in region order, as regions
/// of `1 << to_shift` blocks would hold them, in region order, below `to_region_count`: a
/// region larger than the new ones gives its heat to each region it covers, smaller regions
/// give their hottest to the region holding them. (Loads heat saved with another region size.)
pub fn remap_regions(
    regions: Vec<(u64, u8)>,
    from_shift: u32,
    to_shift: u32,
    to_region_count: u64,
) -> Vec<(u64, u8)> {
    if from_shift == to_shift {
        return regions;
    }
    let mut out: Vec<(u64, u8)> = Vec::new();
    for (region, heat) in regions {
        if from_shift > to_shift {
            let ratio_shift = from_shift - to_shift;
            let first = region.checked_shl(ratio_shift).unwrap_or(u64::MAX);
            let end = (region + 1)
                .checked_shl(ratio_shift)
                .unwrap_or(u64::MAX)
                .min(to_region_count);
            out.extend((first..end).map(|r| (r, heat)));
        } else {
            let holder = region >> (to_shift - from_shift);
            match out.last_mut() {
                Some((last, hottest)) if *last == holder => *hottest = (*hottest).max(heat),
                _ => out.push((holder, heat)),
            }
        }
    }
    out
}

/// Cells per heat chunk: 4 KiB of cells.
const HEAT_CHUNK_CELLS: usize = 1024;

/// Bits of the epoch stored beside each count.
const EPOCH_BITS: u32 = 24;
/// Mask of a stored epoch.
const EPOCH_MASK: u32 = (1 << EPOCH_BITS) - 1;
/// Differences above this (mod 2^24) mean "stored in the future" rather than "long ago".
const EPOCH_HALF_RANGE: u32 = 1 << (EPOCH_BITS - 1);

/// Heat at and above which a block counts as hot: the heat report's line and the migration
/// policy's default (a block written about 8 times in the last half-life is copied last).
pub const HOT_THRESHOLD: u8 = 8;

/// Lower bounds of the heat histogram buckets: 0, 1, 2-3, 4-7, ..., 128-255.
pub const HEAT_BUCKET_LOWER_BOUNDS: [u8; 9] = [0, 1, 2, 4, 8, 16, 32, 64, 128];

/// Index of the histogram bucket holding `heat`.
pub fn heat_bucket(heat: u8) -> usize {
    // 0 -> 0, 1 -> 1, 2..=3 -> 2, ..., 128..=255 -> 8: the bit length of `heat`.
    (u8::BITS - heat.leading_zeros()) as usize
}

/// Number of blocks per heat bucket; see [`HEAT_BUCKET_LOWER_BOUNDS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeatHistogram {
    /// `blocks[i]` blocks have a heat in bucket `i`.
    pub blocks: [u64; 9],
}

impl HeatHistogram {
    /// Counts one block of heat `heat`.
    pub fn add(&mut self, heat: u8) {
        self.add_blocks(heat, 1);
    }

    /// Counts `blocks` blocks of heat `heat`.
    pub fn add_blocks(&mut self, heat: u8, blocks: u64) {
        self.blocks[heat_bucket(heat)] += blocks;
    }

    /// `(heat lower bound, blocks)` per bucket, coldest first (the API's wire shape).
    pub fn to_pairs(&self) -> Vec<(u8, u64)> {
        HEAT_BUCKET_LOWER_BOUNDS
            .iter()
            .copied()
            .zip(self.blocks.iter().copied())
            .collect()
    }

    /// Total blocks counted.
    pub fn total(&self) -> u64 {
        self.blocks.iter().sum()
    }
}

/// Count decayed from `stored_epoch` to `epoch`.
fn decay(count: u8, stored_epoch: u32, epoch: u32) -> u8 {
    let elapsed = epoch.wrapping_sub(stored_epoch) & EPOCH_MASK;
    if elapsed >= EPOCH_HALF_RANGE {
        // Stored by a writer whose clock read was later than ours: no decay yet.
        count
    } else if elapsed >= u8::BITS {
        0
    } else {
        count >> elapsed
    }
}

/// Packs a count and an epoch into one cell value.
fn pack(count: u8, epoch: u32) -> u32 {
    (epoch << 8) | u32::from(count)
}

/// Splits a cell value into (count, epoch).
fn unpack(cell: u32) -> (u8, u32) {
    let [count, ..] = cell.to_le_bytes();
    (count, cell >> 8)
}

/// Per-region decaying write counters in lazily allocated chunks; see the module docs.
#[derive(Debug)]
pub struct Heat {
    cells: Chunked<AtomicU32, HEAT_CHUNK_CELLS>,
    half_life_ns: u64,
}

impl Heat {
    /// Creates cold counters for `region_count` regions, halving every `half_life_ms`;
    /// nothing is allocated per region.
    pub fn new(region_count: u64, half_life_ms: u64) -> Self {
        assert!(half_life_ms > 0, "half-life must be positive");
        let half_life_ns = half_life_ms
            .checked_mul(1_000_000)
            .expect("half-life fits in u64 nanoseconds");
        Self {
            cells: Chunked::new(region_count),
            half_life_ns,
        }
    }

    /// Number of regions.
    pub fn region_count(&self) -> u64 {
        self.cells.len()
    }

    /// Heap bytes held now.
    pub fn allocated_bytes(&self) -> u64 {
        self.cells.allocated_bytes()
    }

    /// The epoch (half-lives since the clock's origin, mod 2^24) at `now_ns`.
    pub fn epoch(&self, now_ns: u64) -> u32 {
        let epoch = (now_ns / self.half_life_ns) & u64::from(EPOCH_MASK);
        u32::try_from(epoch).expect("masked to 24 bits")
    }

    /// Counts one write to `region` at `epoch` (from [`Heat::epoch`]); installs its chunk.
    pub fn bump(&self, region: u64, epoch: u32) {
        let cell = self.cells.get_or_install(region).cell;
        // Relaxed load + store, not a CAS loop: a racing bump may be lost, which only makes
        // the region look a little cooler (see module docs), and the hot path stays one load
        // and at most one store.
        let old = cell.load(Ordering::Relaxed);
        let (count, stored_epoch) = unpack(old);
        let new = pack(decay(count, stored_epoch, epoch).saturating_add(1), epoch);
        if new != old {
            // Skipping the store when saturated keeps hot regions' cache lines shared.
            cell.store(new, Ordering::Relaxed);
        }
    }

    /// Heat of `region` decayed to `epoch` (0 when never written); out of range is a bug.
    pub fn get(&self, region: u64, epoch: u32) -> u8 {
        self.cells.get(region).map_or(0, |cell| read(cell, epoch))
    }

    /// Sets `region`'s heat to `count` as of `epoch` (restoring a saved tracker); a zero
    /// count on a region never written allocates nothing.
    pub fn set(&self, region: u64, count: u8, epoch: u32) {
        if count == 0 && self.cells.get(region).is_none() {
            return;
        }
        let cell = self.cells.get_or_install(region).cell;
        cell.store(pack(count, epoch), Ordering::Relaxed);
    }

    /// Regions of nonzero heat decayed to `epoch`, as `(region, heat)` in region order;
    /// visits installed chunks only.
    pub fn nonzero(&self, epoch: u32) -> impl Iterator<Item = (u64, u8)> + '_ {
        self.cells.chunks().flat_map(move |(number, chunk)| {
            let base = number * HEAT_CHUNK_CELLS as u64;
            (base..)
                .zip(chunk.cells.iter())
                .map(move |(region, cell)| (region, read(cell, epoch)))
                .filter(|&(_, heat)| heat > 0)
        })
    }

    /// Hottest region in `first..=last` at `epoch`; skips chunks never written.
    pub fn max_in(&self, first: u64, last: u64, epoch: u32) -> u8 {
        let chunk_len = HEAT_CHUNK_CELLS as u64;
        let mut hottest = 0;
        for number in first / chunk_len..=last / chunk_len {
            let Some(chunk) = self.cells.chunk(number) else {
                continue;
            };
            let base = number * chunk_len;
            let (from, to) = (
                first.max(base) - base,
                last.min(base + chunk_len - 1) - base,
            );
            for cell in &chunk.cells[from as usize..=to as usize] {
                hottest = hottest.max(read(cell, epoch));
            }
        }
        hottest
    }
}

/// A cell's count decayed to `epoch`.
fn read(cell: &AtomicU32, epoch: u32) -> u8 {
    let (count, stored_epoch) = unpack(cell.load(Ordering::Relaxed));
    decay(count, stored_epoch, epoch)
}

/// Heat of every region at one moment, sparse, with the block-to-region mapping: what the
/// migration policy reads to decide which blocks to copy last.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeatSnapshot {
    /// Blocks per region, as a shift.
    region_shift: u32,
    /// Nonzero heat per region.
    regions: BTreeMap<u64, u8>,
}

impl HeatSnapshot {
    /// A snapshot of regions of `1 << region_shift` blocks with the given nonzero heats.
    pub fn new(region_shift: u32, regions: impl IntoIterator<Item = (u64, u8)>) -> Self {
        let regions = regions.into_iter().filter(|&(_, heat)| heat > 0).collect();
        Self {
            region_shift,
            regions,
        }
    }

    /// Blocks per region, as a shift.
    pub fn region_shift(&self) -> u32 {
        self.region_shift
    }

    /// Heat of the region holding `block` (0 when cold or unknown).
    pub fn get(&self, block: u64) -> u8 {
        self.regions
            .get(&(block >> self.region_shift))
            .copied()
            .unwrap_or(0)
    }

    /// Raises every region to `other`'s heat where it is hotter (same region size).
    pub fn merge_max(&mut self, other: &HeatSnapshot) {
        assert_eq!(
            self.region_shift, other.region_shift,
            "regions of another size"
        );
        for (&region, &heat) in &other.regions {
            let entry = self.regions.entry(region).or_insert(0);
            *entry = (*entry).max(heat);
        }
    }

    /// Nonzero regions as `(region, heat)`, in order.
    pub fn regions(&self) -> impl Iterator<Item = (u64, u8)> + '_ {
        self.regions.iter().map(|(&region, &heat)| (region, heat))
    }

    /// This snapshot of a tracker of `from_granularity_bytes` blocks on a disk of
    /// `disk_bytes`, as one of `to_granularity_bytes` blocks on that disk would map it
    /// (regions from [`heat_shift_for`]): a region larger than the new ones gives its heat to
    /// each region it covers, smaller regions give their hottest to the region holding them.
    /// So a 64 KiB tracker's heat merges into a 4 KiB job's view, region for region.
    pub fn to_granularity(
        &self,
        from_granularity_bytes: u64,
        to_granularity_bytes: u64,
        disk_bytes: u64,
    ) -> HeatSnapshot {
        let region_shift = heat_shift_for(to_granularity_bytes, disk_bytes);
        let from_region_bytes = from_granularity_bytes << self.region_shift;
        let to_region_bytes = to_granularity_bytes << region_shift;
        let mut regions = BTreeMap::new();
        for (&region, &heat) in &self.regions {
            if from_region_bytes >= to_region_bytes {
                let ratio = from_region_bytes / to_region_bytes;
                regions.extend((region * ratio..(region + 1) * ratio).map(|r| (r, heat)));
            } else {
                let entry = regions
                    .entry(region / (to_region_bytes / from_region_bytes))
                    .or_insert(0);
                *entry = heat.max(*entry);
            }
        }
        Self {
            region_shift,
            regions,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bump_counts_and_saturates() {
        // Goal: bumps add one up to 255. Method: bump 300 times in one epoch, read after each.
        let heat = Heat::new(4, 1000);
        for expected in 1..=300u32 {
            heat.bump(2, 7);
            assert_eq!(u32::from(heat.get(2, 7)), expected.min(255));
        }
        assert_eq!(heat.get(1, 7), 0);
    }

    #[test]
    fn heat_halves_each_half_life() {
        // Goal: each epoch elapsed halves the count, 8+ epochs read 0. Method: 200 bumps, read later.
        let heat = Heat::new(1, 1000);
        for _ in 0..200 {
            heat.bump(0, 100);
        }
        let expected = [200, 100, 50, 25, 12, 6, 3, 1, 0, 0, 0];
        for (elapsed, want) in (0u32..).zip(expected) {
            assert_eq!(heat.get(0, 100 + elapsed), want, "after {elapsed}");
        }
        assert_eq!(heat.get(0, 100 + 1000), 0);
    }

    #[test]
    fn bump_decays_before_adding() {
        // Goal: a bump in a later epoch decays first. Method: 10 bumps, 1 bump two epochs on.
        let heat = Heat::new(1, 1000);
        for _ in 0..10 {
            heat.bump(0, 5);
        }
        heat.bump(0, 7);
        assert_eq!(heat.get(0, 7), 10 / 4 + 1);
    }

    #[test]
    fn epochs_wrap_and_future_reads_do_not_decay() {
        // Goal: epochs across the 24-bit wrap decay right; a future stamp is not decayed.
        // Method: bump at the last epoch, read one epoch later (wrapped) and one earlier.
        let heat = Heat::new(1, 1);
        heat.bump(0, EPOCH_MASK);
        heat.bump(0, EPOCH_MASK);
        assert_eq!(heat.get(0, 0), 1);
        assert_eq!(heat.get(0, EPOCH_MASK - 1), 2);
        assert_eq!(heat.epoch(u64::from(EPOCH_MASK + 1) * 1_000_000), 0);
        assert_eq!(heat.epoch(5_500_000), 5);
    }

    #[test]
    fn histogram_buckets_by_bit_length() {
        // Goal: each heat lands in its documented bucket. Method: check boundaries.
        let cases = [
            (0, 0),
            (1, 1),
            (2, 2),
            (3, 2),
            (4, 3),
            (7, 3),
            (8, 4),
            (127, 7),
            (128, 8),
        ];
        for (heat, bucket) in cases {
            assert_eq!(heat_bucket(heat), bucket, "heat {heat}");
        }
        assert_eq!(heat_bucket(255), 8);
        let mut histogram = HeatHistogram::default();
        for heat in [0, 0, 3, 200] {
            histogram.add(heat);
        }
        assert_eq!(histogram.total(), 4);
        let pairs = histogram.to_pairs();
        assert_eq!(pairs[0], (0, 2));
        assert_eq!(pairs[2], (2, 1));
        assert_eq!(pairs[8], (128, 1));
    }

    #[test]
    fn snapshots_convert_between_granularities() {
        // Goal: a coarse tracker's heat lands on the same bytes in a fine tracker's view.
        // Method: snapshots at 64 KiB, 4 MiB and 4 KiB blocks; read blocks at the new size.
        let coarse = HeatSnapshot::new(4, [(3, 9)]); // 1 MiB regions of 64 KiB blocks
        let disk_bytes = 1 << 30;
        let fine = coarse.to_granularity(64 << 10, 4096, disk_bytes);
        assert_eq!(fine.region_shift(), 8);
        assert_eq!(fine.get(3 * 256), 9);
        assert_eq!(fine.get(4 * 256 - 1), 9);
        assert_eq!(fine.get(4 * 256), 0);
        // A 4 MiB block is its own region: it spreads over four 1 MiB regions.
        let huge = HeatSnapshot::new(0, [(1, 7)]).to_granularity(4 << 20, 4096, disk_bytes);
        let hot: Vec<(u64, u8)> = huge.regions().collect();
        assert_eq!(hot, vec![(4, 7), (5, 7), (6, 7), (7, 7)]);
        // Back to 4 MiB blocks: the hottest of the regions a block holds.
        let small = HeatSnapshot::new(8, [(4, 2), (6, 5), (9, 1)]);
        let back: Vec<(u64, u8)> = small
            .to_granularity(4096, 4 << 20, disk_bytes)
            .regions()
            .collect();
        assert_eq!(back, vec![(1, 5), (2, 1)]);
        assert_eq!(
            coarse.to_granularity(64 << 10, 64 << 10, disk_bytes),
            coarse
        );
        // On 256 GiB, regions are 4 MiB at both granularities: 64 KiB heat maps 1:1.
        let big = HeatSnapshot::new(6, [(3, 9)]).to_granularity(64 << 10, 4096, 256 << 30);
        assert_eq!((big.region_shift(), big.get(3 << 10)), (10, 9));
    }

    #[test]
    fn regions_grow_with_the_disk_to_bound_the_count() {
        // Goal: 1 MiB regions up to 64 GiB, then at most MAX_HEAT_REGIONS per tracker, and a
        // shift that depends on the block count only. Method: sizes around the thresholds.
        const GIB: u64 = 1 << 30;
        let cases = [
            (4096, 0, 8),
            (4096, 64 * GIB, 8),
            (4096, 64 * GIB + 1, 9),
            (4096, 256 * GIB, 10),
            (64 << 10, 256 * GIB, 6),
            (64 << 10, 64 << 40, 14),
            (4 << 20, 256 * GIB, 0),
            (4 << 20, 1 << 40, 2),
        ];
        for (granularity_bytes, disk_bytes, shift) in cases {
            let got = heat_shift_for(granularity_bytes, disk_bytes);
            assert_eq!(got, shift, "{granularity_bytes} on {disk_bytes}");
            let blocks = disk_bytes.div_ceil(granularity_bytes);
            assert!(blocks.div_ceil(1 << got) <= MAX_HEAT_REGIONS);
            assert_eq!(
                heat_shift_for(granularity_bytes, blocks * granularity_bytes),
                got
            );
        }
    }

    #[test]
    fn remapped_regions_keep_their_bytes() {
        // Goal: heat saved with other regions lands on the same bytes. Method: 1 MiB regions
        // (shift 8) to 4 MiB (shift 10) take the hottest; back spreads, clipped to the count.
        let fine = vec![(0, 3), (3, 9), (4, 2), (9, 1)];
        let coarse = remap_regions(fine.clone(), 8, 10, 3);
        assert_eq!(coarse, vec![(0, 9), (1, 2), (2, 1)]);
        assert_eq!(
            remap_regions(vec![(1, 4), (2, 5)], 10, 8, 10),
            vec![(4, 4), (5, 4), (6, 4), (7, 4), (8, 5), (9, 5)]
        );
        assert_eq!(remap_regions(fine.clone(), 8, 8, 10), fine);
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn bump_out_of_range_panics() {
        // Goal: bumping past the end is a bug. Method: bump block == block_count.
        Heat::new(3, 1000).bump(3, 0);
    }
}
