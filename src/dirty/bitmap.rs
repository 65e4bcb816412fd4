//! Dirty bitmaps: one bit per block, set after a guest write completes, taken by a copier.
//!
//! Invariants:
//! - A bit is set ([`DirtyBitmap::mark`]) only after the write it stands for has completed,
//!   with `Release`; a copier takes bits ([`DirtyBitmap::take_word`]) with `swap(0, Acquire)`
//!   before it reads the blocks. So a pass that sees a bit also sees the write, and a write
//!   that completes after the take sets the bit again for the next pass (DESIGN.md
//!   invariant 1).
//! - Bits at or past `block_count` are never set: marking an out-of-range block is a bug
//!   and panics (a write past the end of an export was validated away long before).
//! - On disk and on the wire, words are little-endian `u64`, block `b` is bit `b % 64` of
//!   word `b / 64`.

use std::sync::atomic::{AtomicU64, Ordering};

use super::MAX_BLOCK_COUNT;
use crate::codec;

/// Blocks per bitmap word.
pub const WORD_BITS: u64 = 64;

/// Number of `u64` words needed for `block_count` bits.
pub fn word_count_for(block_count: u64) -> usize {
    usize::try_from(block_count.div_ceil(WORD_BITS)).expect("bitmap fits in memory")
}

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
    let word_count = word_count_for(block_count);
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

/// Index of the word holding `block`.
pub(crate) fn word_index(block: u64) -> usize {
    usize::try_from(block / WORD_BITS).expect("bitmap fits in memory")
}

/// Mask of the valid bits of the word at `word` in a bitmap of `block_count` bits.
fn valid_mask(word: usize, block_count: u64) -> u64 {
    let first_block = word as u64 * WORD_BITS;
    let valid_bits = block_count.saturating_sub(first_block).min(WORD_BITS);
    if valid_bits == WORD_BITS {
        u64::MAX
    } else {
        (1u64 << valid_bits) - 1
    }
}

/// One bit per block; set after a guest write completes, cleared by a transfer pass.
#[derive(Debug)]
pub struct DirtyBitmap {
    words: Box<[AtomicU64]>,
    block_count: u64,
}

impl DirtyBitmap {
    /// Creates a clean bitmap of `block_count` blocks.
    pub fn new(block_count: u64) -> Self {
        let words = (0..word_count_for(block_count))
            .map(|_| AtomicU64::new(0))
            .collect();
        Self { words, block_count }
    }

    /// Number of blocks (bits) tracked.
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// Number of `u64` words.
    pub fn word_count(&self) -> usize {
        self.words.len()
    }

    /// Marks `block` dirty.
    ///
    /// Call only after the backing write has completed. If a block is marked before the
    /// write, a concurrent pass can clear the bit, copy stale data, and never resend the
    /// block.
    pub fn mark(&self, block: u64) {
        assert!(
            block < self.block_count,
            "block {block} out of range (block count {})",
            self.block_count
        );
        // Release: a pass that observes this bit also observes the completed write.
        self.words[word_index(block)].fetch_or(1 << (block % WORD_BITS), Ordering::Release);
    }

    /// Marks blocks `first..=last` dirty with one `fetch_or` per word touched.
    ///
    /// Same contract as [`DirtyBitmap::mark`]: only after the writes completed.
    pub fn mark_blocks(&self, first: u64, last: u64) {
        assert!(first <= last, "empty block range {first}..={last}");
        assert!(
            last < self.block_count,
            "block {last} out of range (block count {})",
            self.block_count
        );
        let (first_word, last_word) = (word_index(first), word_index(last));
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
            let mask = (u64::MAX >> (63 - high_bit)) & (u64::MAX << low_bit);
            // Release: as in `mark`, the bits publish the completed write.
            self.words[word].fetch_or(mask, Ordering::Release);
        }
    }

    /// Whether `block` is dirty now.
    pub fn is_dirty(&self, block: u64) -> bool {
        assert!(
            block < self.block_count,
            "block {block} out of range (block count {})",
            self.block_count
        );
        // Acquire: a caller that sees the bit may read the block and see the write.
        self.words[word_index(block)].load(Ordering::Acquire) & (1 << (block % WORD_BITS)) != 0
    }

    /// Reads one word without clearing it (status reports, persistence).
    pub fn load_word(&self, word: usize) -> u64 {
        // Acquire: pairs with `mark`'s Release, as `take_word` does.
        self.words[word].load(Ordering::Acquire)
    }

    /// Takes and clears one word; later writes set bits again for the next pass.
    pub fn take_word(&self, word: usize) -> u64 {
        // Acquire: the pass then reads blocks whose writes completed before their marks.
        self.words[word].swap(0, Ordering::Acquire)
    }

    /// ORs `bits` into one word: gives back bits a failed pass took, or restores saved ones.
    pub fn or_word(&self, word: usize, bits: u64) {
        assert_eq!(
            bits & !valid_mask(word, self.block_count),
            0,
            "bits past block count {} in word {word}",
            self.block_count
        );
        // Release: a later taker must see the writes the original taker had acquired, so
        // the give-back continues the release chain from the original marks.
        self.words[word].fetch_or(bits, Ordering::Release);
    }

    /// Marks every block dirty (a tracker whose history was lost).
    pub fn mark_all(&self) {
        for word in 0..self.words.len() {
            self.or_word(word, valid_mask(word, self.block_count));
        }
    }

    /// Number of dirty blocks now (a racy count while writes go on).
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|word| u64::from(word.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// Takes and clears every word, in order; see [`DirtyBitmap::take_word`].
    pub fn take_all(&self) -> Vec<u64> {
        (0..self.words.len())
            .map(|word| self.take_word(word))
            .collect()
    }

    /// Copies every word without clearing.
    pub fn snapshot(&self) -> Vec<u64> {
        (0..self.words.len())
            .map(|word| self.load_word(word))
            .collect()
    }
}

/// Blocks a pass took from a tracker: a plain (non-atomic) bitmap owned by the copier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtySet {
    granularity_bytes: u64,
    disk_bytes: u64,
    block_count: u64,
    words: Vec<u64>,
}

impl DirtySet {
    /// Wraps words taken from a bitmap of `block_count` blocks of `granularity_bytes` bytes
    /// covering a disk of `disk_bytes` bytes.
    pub fn from_words(
        granularity_bytes: u64,
        disk_bytes: u64,
        block_count: u64,
        words: Vec<u64>,
    ) -> Self {
        assert!(
            granularity_bytes.is_power_of_two(),
            "granularity {granularity_bytes}"
        );
        assert_eq!(block_count, disk_bytes.div_ceil(granularity_bytes));
        assert_eq!(words.len(), word_count_for(block_count));
        for (word, bits) in words.iter().enumerate() {
            assert_eq!(
                bits & !valid_mask(word, block_count),
                0,
                "bits past block count"
            );
        }
        Self {
            granularity_bytes,
            disk_bytes,
            block_count,
            words,
        }
    }

    /// An empty set for the same geometry.
    pub fn empty(granularity_bytes: u64, disk_bytes: u64) -> Self {
        let block_count = disk_bytes.div_ceil(granularity_bytes);
        let words = vec![0; word_count_for(block_count)];
        Self::from_words(granularity_bytes, disk_bytes, block_count, words)
    }

    /// Bytes per block.
    pub fn granularity_bytes(&self) -> u64 {
        self.granularity_bytes
    }

    /// Size of the disk the set covers.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes
    }

    /// Number of blocks the set covers (dirty or not).
    pub fn block_count(&self) -> u64 {
        self.block_count
    }

    /// The raw words (block `b` is bit `b % 64` of word `b / 64`).
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Number of dirty blocks.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no block is dirty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Whether `block` is in the set.
    pub fn contains(&self, block: u64) -> bool {
        assert!(block < self.block_count, "block {block} out of range");
        self.words[word_index(block)] & (1 << (block % WORD_BITS)) != 0
    }

    /// Adds `block` to the set.
    pub fn insert(&mut self, block: u64) {
        assert!(block < self.block_count, "block {block} out of range");
        self.words[word_index(block)] |= 1 << (block % WORD_BITS);
    }

    /// Adds every block of `other` (same geometry) to the set.
    pub fn union_with(&mut self, other: &DirtySet) {
        assert_eq!(
            (self.granularity_bytes, self.block_count),
            (other.granularity_bytes, other.block_count),
            "sets of different geometry"
        );
        for (word, &bits) in self.words.iter_mut().zip(&other.words) {
            *word |= bits;
        }
    }

    /// Dirty blocks in increasing order.
    pub fn iter_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(word, &bits)| BitIter { bits }.map(move |bit| word as u64 * 64 + bit))
    }

    /// Maximal runs of dirty blocks as byte extents `(offset_bytes, len_bytes)`, in order,
    /// clipped to the disk (the last block may be partial).
    pub fn iter_extents(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut blocks = self.iter_blocks().peekable();
        std::iter::from_fn(move || {
            let first = blocks.next()?;
            let mut last = first;
            while blocks.next_if_eq(&(last + 1)).is_some() {
                last += 1;
            }
            let offset_bytes = first * self.granularity_bytes;
            let end_bytes = ((last + 1) * self.granularity_bytes).min(self.disk_bytes);
            Some((offset_bytes, end_bytes - offset_bytes))
        })
    }
}

/// Positions of the set bits of one word, lowest first.
struct BitIter {
    bits: u64,
}

impl Iterator for BitIter {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        if self.bits == 0 {
            return None;
        }
        let bit = u64::from(self.bits.trailing_zeros());
        self.bits &= self.bits - 1;
        Some(bit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_take_round_trip() {
        // Goal: take_word returns marked bits once. Method: mark 3 blocks, take twice.
        let bitmap = DirtyBitmap::new(130);
        assert_eq!(bitmap.word_count(), 3);
        for block in [0, 127, 129] {
            bitmap.mark(block);
        }
        assert!(bitmap.is_dirty(127));
        assert!(!bitmap.is_dirty(126));
        assert_eq!(bitmap.count(), 3);
        assert_eq!(bitmap.take_all(), vec![1, 1 << 63, 1 << 1]);
        assert_eq!(bitmap.take_all(), vec![0, 0, 0]);
        assert_eq!(bitmap.count(), 0);
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
            assert_eq!(ranged.snapshot(), single.snapshot(), "{first}..={last}");
        }
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
        for block_count in [0, 1, 63, 64, 65, 1000] {
            let bitmap = DirtyBitmap::new(block_count);
            bitmap.mark_all();
            assert_eq!(bitmap.count(), block_count);
        }
    }

    #[test]
    fn dirty_set_iterates_blocks_and_extents() {
        // Goal: iter_blocks/iter_extents list the set. Method: insert known blocks, compare.
        let mut set = DirtySet::empty(4096, 200 * 4096 - 100);
        for block in [0, 1, 2, 64, 65, 130, 199] {
            set.insert(block);
        }
        assert_eq!(set.count(), 7);
        assert!(set.contains(65));
        assert!(!set.contains(66));
        let blocks: Vec<u64> = set.iter_blocks().collect();
        assert_eq!(blocks, vec![0, 1, 2, 64, 65, 130, 199]);
        let extents: Vec<(u64, u64)> = set.iter_extents().collect();
        assert_eq!(
            extents,
            vec![
                (0, 3 * 4096),
                (64 * 4096, 2 * 4096),
                (130 * 4096, 4096),
                (199 * 4096, 4096 - 100)
            ]
        );
        assert!(DirtySet::empty(4096, 4096).is_empty());
    }
}
