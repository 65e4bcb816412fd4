//! Dirty bitmaps: one bit per block, set after a guest write completes, taken by a copier.
//!
//! Storage is sparse ([`Chunked`]): a chunk of [`CHUNK_WORDS`] words (1 Ki blocks, 128 bytes
//! and its hint) is allocated on the first mark inside it, so an empty tracker of a 64 TiB disk
//! at 64 KiB costs its 16 KiB directory top and memory follows the regions written. A sweep
//! ([`DirtyBitmap::take_into`]) walks only directory nodes whose hint is set and visits only
//! installed chunks whose hint says they may hold bits, so taking a sparse set from a huge
//! disk touches only the nodes and chunks written since the last take (at worst reading the
//! slots of every node, 8 bytes per chunk: 8 MiB at 2^30 blocks).
//!
//! Why chunks this small: under writes scattered uniformly (many exports, random I/O), nearly
//! every chunk is touched once the writes outnumber the chunks, so memory is about
//! `chunks touched x chunk size + 8 bytes x chunk slots` (the directory; see `chunked.rs`).
//! 4096 random writes on a 256 GiB disk at 4 KiB cost ~7 MiB in 512-word chunks (most of the
//! 2048 touched), ~1.1 MiB in 16-word ones (~4000 of 65536 touched, half the cost directory),
//! and more again in 8-word (directory) or 32-word (chunks) ones.
//!
//! Invariants:
//! - A bit is set ([`DirtyBitmap::mark`]) only after the write it stands for has completed,
//!   with `Release`; a copier takes bits ([`DirtyBitmap::take_word`],
//!   [`DirtyBitmap::take_into`]) with `swap(0, Acquire)` before it reads the blocks. So a pass
//!   that sees a bit also sees the write, and a write that completes after the take sets the
//!   bit again for the next pass (DESIGN.md invariant 1).
//! - The chunk hint: a marker whose `fetch_or` found the word zero then sets its chunk's hint
//!   with an RMW (`swap(true, Release)`); a sweep clears the hint (`swap(false, Acquire)`)
//!   before it takes the chunk's words, and skips a chunk whose hint was clear. A bit is never
//!   stranded: either the sweep's hint swap reads a value at or after the marker's hint RMW
//!   in the hint's modification order (RMWs continue the release sequence, so the sweep
//!   synchronizes with that marker and its word swap sees the bit), or the marker's RMW comes
//!   later and leaves the hint set for the next sweep. A marker that finds the word nonzero
//!   leaves the hint alone: whoever made the word nonzero set it, and a sweep that took those
//!   bits took ours too (both RMWs on one word are ordered), or our `fetch_or` came after the
//!   sweep's swap and found zero.
//! - The node hint (one per directory node, [`Chunked::hinted_chunks`]) is the same protocol
//!   one level up, with chunk hints in the place of words: a marker whose chunk-hint swap
//!   found it clear then sets the node hint with an RMW (`swap(true, Release)`); a sweep
//!   clears the node hint (`swap(false, Acquire)`) before it swaps the node's chunk hints,
//!   and skips a node whose hint was clear. So a sweep after a quiet period reads one flag
//!   per node, not every chunk slot.
//! - Chunks are never freed while the bitmap lives (see `chunked.rs`): memory is proportional
//!   to the regions written over the tracker's life, and a sweep never races a free.
//! - "Every block dirty" (a lost tracker, [`DirtyBitmap::mark_all`]) is one flag, not bits:
//!   while it is set every block reads dirty whatever the words say, so losing a 16 TiB
//!   tracker installs nothing. It is set with `Release` after the bits it stands for would
//!   have been, and a sweep takes it with `swap(false, Acquire)` like a word (taking the whole
//!   range) before it sweeps the words, so a mark after the sweep's swap lands in a word for
//!   the next pass. Anything that must take single words ([`DirtyBitmap::take_word`]) first
//!   turns the flag into bits, setting every word before clearing the flag, so no block is
//!   ever clean in between (a racing sweep may take some twice: a harmless extra copy).
//! - Bits at or past `block_count` are never set: marking an out-of-range block is a bug
//!   and panics (a write past the end of an export was validated away long before).
//! - On disk and on the wire, words are little-endian `u64`, block `b` is bit `b % 64` of
//!   word `b / 64`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::chunked::Chunked;
pub use super::set::{valid_mask, word_count_for, DirtySet, WORD_BITS};
use super::MAX_BLOCK_COUNT;
use crate::codec;

/// Words per bitmap chunk: 1 Ki blocks, 128 bytes, allocated on the first mark inside it
/// (see the module docs for why this size).
pub const CHUNK_WORDS: usize = 16;

/// A bitmap read from a file or the wire that cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    /// The granularity is not a power of two.
    #[error("granularity {granularity_bytes} is not a power of two")]
    Granularity {
        /// What was read.
        granularity_bytes: u64,
    },
    /// The disk has more blocks than a bitmap may hold.
    #[error("{block_count} blocks exceed the bitmap limit {MAX_BLOCK_COUNT}")]
    TooManyBlocks {
        /// Blocks the geometry asks for.
        block_count: u64,
    },
    /// The input ends inside the bitmap.
    #[error("truncated bitmap")]
    Truncated(#[source] codec::CodecError),
    /// A bit is set past the last block.
    #[error("bitmap has bits past block count {block_count}")]
    BitsPastEnd {
        /// The bitmap's block count.
        block_count: u64,
    },
}

/// Blocks of a disk of `disk_bytes` at `granularity_bytes`, when a bitmap can hold them (a
/// geometry read from a file or the journal is checked before anything is allocated for it).
pub fn checked_block_count(disk_bytes: u64, granularity_bytes: u64) -> Result<u64, BitmapError> {
    if !granularity_bytes.is_power_of_two() {
        return Err(BitmapError::Granularity { granularity_bytes });
    }
    let block_count = disk_bytes.div_ceil(granularity_bytes);
    if block_count > MAX_BLOCK_COUNT {
        return Err(BitmapError::TooManyBlocks { block_count });
    }
    Ok(block_count)
}

/// Reads the `word_count_for(block_count)` little-endian words of a bitmap in its on-disk and
/// wire form. The length is checked before anything is allocated; the error names the
/// problem: the input ends early, or a bit is set past `block_count`.
pub fn read_le_words(
    reader: &mut codec::Reader<'_>,
    block_count: u64,
) -> Result<Vec<u64>, BitmapError> {
    // At most MAX_BLOCK_COUNT / 8 bytes (512 MiB), and `bytes` checks they are all there
    // before anything is allocated: memory follows the input.
    let word_count = usize::try_from(word_count_for(block_count)).expect("checked block count");
    let mut raw = codec::Reader::new(
        reader
            .bytes(word_count * 8)
            .map_err(BitmapError::Truncated)?,
    );
    let words = (0..word_count)
        .map(|_| raw.u64_le())
        .collect::<Result<Vec<u64>, _>>()
        .map_err(BitmapError::Truncated)?;
    let tail_bits = block_count % WORD_BITS;
    if let (Some(&last), true) = (words.last(), tail_bits != 0) {
        if last >> tail_bits != 0 {
            return Err(BitmapError::BitsPastEnd { block_count });
        }
    }
    Ok(words)
}

/// One bit per block; set after a guest write completes, cleared by a transfer pass.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Chunked<AtomicU64, CHUNK_WORDS>,
    block_count: u64,
    /// Every block is dirty, whatever the words say (see the module docs).
    all_dirty: AtomicBool,
}

impl DirtyBitmap {
    /// Creates a clean bitmap of `block_count` blocks; nothing is allocated per block.
    pub fn new(block_count: u64) -> Self {
        Self {
            words: Chunked::new(word_count_for(block_count)),
            block_count,
            all_dirty: AtomicBool::new(false),
        }
    }

    /// Number of blocks (bits) tracked.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// Number of `u64` words of the dense form.
    pub fn word_count(&self) -> u64 {
        self.words.len()
    }

    /// Heap bytes held now (directory and installed chunks).
    pub fn allocated_bytes(&self) -> u64 {
        self.words.allocated_bytes()
    }

    /// Asserts `block` is in range; a write past the export is a bug.
    fn check(&self, block: u64) {
        assert!(
            block < self.block_count,
            "block {block} out of range (block count {})",
            self.block_count
        );
    }

    /// ORs `mask` into word `word` with `Release`, installing its chunk, and sets the chunk
    /// hint when the word was zero, and the node hint when the chunk hint was clear (see the
    /// module docs).
    fn publish(&self, word: u64, mask: u64) {
        let installed = self.words.get_or_install(word);
        // Release: a pass that observes these bits also observes the completed writes.
        if installed.cell.fetch_or(mask, Ordering::Release) == 0 {
            // RMWs, not stores: each continues the release sequence of an earlier marker's
            // hint, so a sweep reading ours synchronizes with that marker too.
            if !installed.chunk.hint.swap(true, Ordering::Release) {
                installed.node_hint.swap(true, Ordering::Release);
            }
        }
    }

    /// Marks `block` dirty.
    ///
    /// Call only after the backing write has completed. If a block is marked before the
    /// write, a concurrent pass can clear the bit, copy stale data, and never resend the
    /// block.
    pub fn mark(&self, block: u64) {
        self.check(block);
        self.publish(block / WORD_BITS, 1 << (block % WORD_BITS));
    }

    /// Marks blocks `first..=last` dirty with one `fetch_or` per word touched.
    ///
    /// Same contract as [`DirtyBitmap::mark`]: only after the writes completed.
    pub fn mark_blocks(&self, first: u64, last: u64) {
        assert!(first <= last, "empty block range {first}..={last}");
        self.check(last);
        let (first_word, last_word) = (first / WORD_BITS, last / WORD_BITS);
        for word in first_word..=last_word {
            let low_bit = if word == first_word {
                first % WORD_BITS
            } else {
                0
            };
            let high_bit = if word == last_word {
                last % WORD_BITS
            } else {
                63
            };
            self.publish(word, (u64::MAX >> (63 - high_bit)) & (u64::MAX << low_bit));
        }
    }

    /// Whether `block` is dirty now.
    pub fn is_dirty(&self, block: u64) -> bool {
        self.check(block);
        self.load_word(block / WORD_BITS) & (1 << (block % WORD_BITS)) != 0
    }

    /// Reads one word without clearing it (status reports); 0 when its chunk is missing.
    pub fn load_word(&self, word: u64) -> u64 {
        // Acquire: pairs with `mark`'s Release, as `take_word` does.
        let bits = self
            .words
            .get(word)
            .map_or(0, |cell| cell.load(Ordering::Acquire));
        bits | self.all_dirty_mask(word)
    }

    /// Every valid bit of `word` while the all-dirty flag is set, else 0.
    fn all_dirty_mask(&self, word: u64) -> u64 {
        // Acquire: pairs with `mark_all`'s Release, as the words' loads do.
        if self.all_dirty.load(Ordering::Acquire) {
            valid_mask(word, self.block_count)
        } else {
            0
        }
    }

    /// Word `word`, or, when its chunk was never written (all clean), `Err` with the first
    /// word past the clean space around it (the chunk, or its whole directory node), so a
    /// scan of clean space skips whole chunks or nodes.
    pub fn word_or_gap(&self, word: u64) -> Result<u64, u64> {
        if self.all_dirty.load(Ordering::Acquire) {
            return Ok(self.load_word(word));
        }
        // Acquire: pairs with `mark`'s Release.
        self.words
            .get_or_gap(word)
            .map(|cell| cell.load(Ordering::Acquire))
    }

    /// Takes and clears one word; later writes set bits again for the next pass. The chunk
    /// hint is left set (a later sweep finds nothing there, which is harmless). When every
    /// block is dirty, the flag is first turned into bits (installing every chunk).
    pub fn take_word(&self, word: u64) -> u64 {
        if self.all_dirty.load(Ordering::Acquire) {
            self.expand_all_dirty();
        }
        // Acquire: the pass then reads blocks whose writes completed before their marks.
        self.words
            .get(word)
            .map_or(0, |cell| cell.swap(0, Ordering::Acquire))
    }

    /// ORs `bits` into one word: gives back bits a failed pass took, or restores saved ones.
    pub fn or_word(&self, word: u64, bits: u64) {
        assert_eq!(
            bits & !valid_mask(word, self.block_count),
            0,
            "bits past block count {} in word {word}",
            self.block_count
        );
        if bits != 0 {
            // Release: a later taker must see the writes the original taker had acquired, so
            // the give-back continues the release chain from the original marks.
            self.publish(word, bits);
        }
    }

    /// Marks every block dirty (a tracker whose history was lost): sets the all-dirty flag,
    /// allocating nothing.
    pub fn mark_all(&self) {
        // Release: a sweep that takes the flag sees what was done before (as for a bit).
        self.all_dirty.store(true, Ordering::Release);
    }

    /// Turns the all-dirty flag into bits: every word set, then the flag cleared, so each
    /// block stays dirty throughout (see the module docs).
    fn expand_all_dirty(&self) {
        for word in 0..self.word_count() {
            self.or_word(word, valid_mask(word, self.block_count));
        }
        // Acquire: whoever set the flag happens-before the bits we just published.
        self.all_dirty.swap(false, Ordering::Acquire);
    }

    /// Number of dirty blocks now (a racy count while writes go on); visits installed chunks.
    pub fn count(&self) -> u64 {
        if self.all_dirty.load(Ordering::Acquire) {
            return self.block_count;
        }
        self.words
            .chunks()
            .flat_map(|(_, chunk)| chunk.cells.iter())
            .map(|word| u64::from(word.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Takes and clears every dirty word into `set` (same block count), chunk by chunk,
    /// skipping nodes and chunks whose hint is clear; see [`DirtyBitmap::take_word`] and the module docs.
    pub fn take_into(&self, set: &mut DirtySet) {
        assert_eq!(
            set.block_count(),
            self.block_count,
            "take into another geometry"
        );
        // Acquire: pairs with `mark_all`'s Release. Taken before the words: a mark after this
        // swap lands in a word this sweep or the next one takes.
        if self.all_dirty.swap(false, Ordering::Acquire) {
            set.insert_range(0, self.block_count);
        }
        for (number, chunk) in self.words.hinted_chunks() {
            // Acquire: pairs with the hint RMW of the marker that made a word nonzero.
            if !chunk.hint.swap(false, Ordering::Acquire) {
                continue;
            }
            let base = number * CHUNK_WORDS as u64;
            for (word, cell) in (base..).zip(chunk.cells.iter()) {
                // A zero load skips the swap: the swap would read a value at least as new, and
                // a mark it misses found the word zero, so it sets the hint again.
                if cell.load(Ordering::Relaxed) != 0 {
                    set.or_word(word, cell.swap(0, Ordering::Acquire));
                }
            }
        }
    }

    /// Copies every dirty word into `set` (same block count) without clearing.
    pub fn load_into(&self, set: &mut DirtySet) {
        assert_eq!(
            set.block_count(),
            self.block_count,
            "load into another geometry"
        );
        if self.all_dirty.load(Ordering::Acquire) {
            set.insert_range(0, self.block_count);
        }
        for (number, chunk) in self.words.chunks() {
            let base = number * CHUNK_WORDS as u64;
            for (word, cell) in (base..).zip(chunk.cells.iter()) {
                // Acquire: pairs with `mark`'s Release, as `take_word` does.
                let bits = cell.load(Ordering::Acquire);
                if bits != 0 {
                    set.or_word(word, bits);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::set::BitIter;
    use crate::prng::SplitMix64 as Prng;
    use std::collections::BTreeSet;

    /// Takes everything into a fresh set of 4 KiB blocks.
    fn take(bitmap: &DirtyBitmap) -> DirtySet {
        let mut set = DirtySet::empty(4096, bitmap.block_count() * 4096);
        bitmap.take_into(&mut set);
        set
    }

    #[test]
    fn mark_take_round_trip() {
        // Goal: a take returns marked bits once. Method: mark 3 blocks, take twice.
        let bitmap = DirtyBitmap::new(130);
        assert_eq!(bitmap.word_count(), 3);
        for block in [0, 127, 129] {
            bitmap.mark(block);
        }
        assert!(bitmap.is_dirty(127));
        assert!(!bitmap.is_dirty(126));
        assert_eq!(bitmap.count(), 3);
        let taken = take(&bitmap);
        assert_eq!(
            taken.iter_words().collect::<Vec<_>>(),
            vec![(0, 1), (1, 1 << 63), (2, 2)]
        );
        assert!(take(&bitmap).is_empty());
        assert_eq!(bitmap.count(), 0);
        bitmap.mark(5);
        assert_eq!(bitmap.take_word(0), 1 << 5);
        assert_eq!(bitmap.take_word(2), 0);
    }

    #[test]
    fn mark_blocks_sets_exactly_the_range() {
        // Goal: mark_blocks sets first..=last across words. Method: compare with per-block marks.
        for (first, last) in [
            (0, 0),
            (3, 60),
            (5, 64),
            (63, 64),
            (0, 199),
            (64, 127),
            (70, 190),
        ] {
            let ranged = DirtyBitmap::new(200);
            let single = DirtyBitmap::new(200);
            ranged.mark_blocks(first, last);
            for block in first..=last {
                single.mark(block);
            }
            assert_eq!(take(&ranged), take(&single), "{first}..={last}");
        }
    }

    #[test]
    fn random_marks_takes_and_merges_match_a_reference() {
        // Goal: the chunked bitmap behaves as a plain set. Method: on a 2^32-block bitmap
        // (sparse, chunks far apart) and a 100k-block one (dense), random marks and ranges,
        // takes that must return exactly the model in block order, and merge-backs of part of
        // a take; memory stays with the chunks touched.
        let mut prng = Prng::new(5);
        for block_count in [1u64 << 32, 100_000] {
            let bitmap = DirtyBitmap::new(block_count);
            let mut model = BTreeSet::new();
            for round in 0..20 {
                for _ in 0..prng.below(300) {
                    let first = prng.below(block_count);
                    let last = (first + prng.below(3 * WORD_BITS)).min(block_count - 1);
                    bitmap.mark_blocks(first, last);
                    model.extend(first..=last);
                }
                assert_eq!(bitmap.count(), model.len() as u64, "round {round}");
                let mut peek = DirtySet::empty(4096, block_count * 4096);
                bitmap.load_into(&mut peek);
                let taken = take(&bitmap);
                assert_eq!(peek, taken);
                assert!(
                    taken.iter_blocks().eq(model.iter().copied()),
                    "round {round}"
                );
                assert_eq!(bitmap.count(), 0);
                // Give back every other word, as a failed pass would.
                model.clear();
                for (word, bits) in taken.iter_words().step_by(2) {
                    bitmap.or_word(word, bits);
                    model.extend(BitIter { bits }.map(|bit| word * WORD_BITS + bit));
                }
            }
            assert!(
                bitmap.allocated_bytes() < 20 << 20,
                "{}",
                bitmap.allocated_bytes()
            );
        }
    }

    #[test]
    fn an_empty_huge_bitmap_is_small_and_sweeps_fast() {
        // Goal: memory and sweep time follow what was written. Method: 2^32 blocks, check
        // the empty footprint, mark 3 far-apart blocks, take them, take again (hint skip).
        let bitmap = DirtyBitmap::new(1 << 32);
        assert!(
            bitmap.allocated_bytes() <= 64 << 10,
            "{}",
            bitmap.allocated_bytes()
        );
        for block in [0, 1 << 31, (1 << 32) - 1] {
            bitmap.mark(block);
        }
        let taken = take(&bitmap);
        assert_eq!(
            taken.iter_blocks().collect::<Vec<_>>(),
            vec![0, 1 << 31, (1 << 32) - 1]
        );
        assert!(take(&bitmap).is_empty());
        assert!(!bitmap.is_dirty(1 << 31));
    }

    #[test]
    #[should_panic(expected = "out of range")]
    fn mark_out_of_range_panics() {
        // Goal: marking past the end is caught as a bug. Method: mark block == block_count.
        DirtyBitmap::new(10).mark(10);
    }

    #[test]
    #[should_panic(expected = "past block count")]
    fn or_word_refuses_bits_past_end() {
        // Goal: a merge cannot invent blocks. Method: OR bit 10 into a 10-block bitmap.
        DirtyBitmap::new(10).or_word(0, 1 << 10);
    }

    #[test]
    fn mark_all_stays_in_range() {
        // Goal: mark_all sets exactly block_count bits. Method: count after mark_all.
        for block_count in [0, 1, 63, 64, 65, 1000, 40_000] {
            let bitmap = DirtyBitmap::new(block_count);
            bitmap.mark_all();
            assert_eq!(bitmap.count(), block_count);
            assert_eq!(take(&bitmap).count(), block_count);
        }
    }

    #[test]
    fn all_dirty_is_a_flag_that_takes_and_marks_like_bits() {
        // Goal: a lost 2^32-block bitmap allocates nothing, reads all dirty, takes once, and
        // keeps later marks; take_word turns it into bits. Method: probe each reader.
        let bitmap = DirtyBitmap::new(1 << 32);
        bitmap.mark(7);
        let before = bitmap.allocated_bytes();
        bitmap.mark_all();
        assert_eq!(bitmap.allocated_bytes(), before);
        assert!(bitmap.is_dirty(1 << 31));
        assert_eq!(bitmap.count(), 1 << 32);
        assert_eq!(bitmap.word_or_gap(1 << 20), Ok(u64::MAX));
        let mut peek = DirtySet::empty(4096, (1 << 32) * 4096);
        bitmap.load_into(&mut peek);
        assert_eq!(peek.count(), 1 << 32);
        assert_eq!(take(&bitmap).count(), 1 << 32);
        assert_eq!(take(&bitmap).count(), 0);
        assert!(!bitmap.is_dirty(7));
        // Marks during and after the flag are taken like any other.
        bitmap.mark_all();
        bitmap.mark(9);
        assert_eq!(take(&bitmap).count(), 1 << 32);
        bitmap.mark(11);
        assert_eq!(take(&bitmap).iter_blocks().collect::<Vec<_>>(), vec![11]);
        // take_word: the flag becomes bits, the other words stay dirty.
        let small = DirtyBitmap::new(200);
        small.mark_all();
        assert_eq!(small.take_word(1), u64::MAX);
        assert_eq!(small.count(), 200 - 64);
        assert_eq!(small.load_word(3), valid_mask(3, 200));
        assert_eq!(take(&small).count(), 200 - 64);
    }
}
