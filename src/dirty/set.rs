//! Dirty sets: the blocks a pass took from a tracker, owned by one thread, sparse.
//!
//! A [`DirtySet`] keeps a sorted map of spans over chunks of [`SET_CHUNK_BLOCKS`] blocks: a
//! chunk with some blocks is a `Bits` span (64 words, 512 bytes), and a run of chunks with every
//! block is one `Full` span however long. So memory follows what is in the set: a few scattered
//! blocks cost a few chunks, one long run (a lost tracker, a whole disk, a hostile journal
//! record of 44 bytes) costs one span, and a dense random set costs about its dense bitmap.
//!
//! Invariants:
//! - Spans never overlap; a `Full` span covering the last chunk means every block up to
//!   `block_count`, and no bit at or past `block_count` is ever set.
//! - The representation is not canonical (an all-ones `Bits` chunk may sit beside a `Full`
//!   span), so equality compares the nonzero words, never the spans.
//! - Block `b` is bit `b % 64` of word `b / 64`, as on disk and on the wire.

use std::collections::BTreeMap;

/// Blocks per bitmap word.
pub const WORD_BITS: u64 = 64;
/// Words per set chunk.
pub const SET_CHUNK_WORDS: usize = 64;
/// Blocks per set chunk.
pub const SET_CHUNK_BLOCKS: u64 = SET_CHUNK_WORDS as u64 * WORD_BITS;

/// Number of `u64` words needed for `block_count` bits.
pub fn word_count_for(block_count: u64) -> u64 {
    block_count.div_ceil(WORD_BITS)
}

/// Mask of the valid bits of word `word` in a bitmap of `block_count` bits.
pub fn valid_mask(word: u64, block_count: u64) -> u64 {
    let first_block = word.saturating_mul(WORD_BITS);
    let valid_bits = block_count.saturating_sub(first_block).min(WORD_BITS);
    if valid_bits == WORD_BITS {
        u64::MAX
    } else {
        (1u64 << valid_bits) - 1
    }
}

/// Words of one set chunk.
type Words = [u64; SET_CHUNK_WORDS];

/// What one map entry covers, from its key (a chunk number) on.
#[derive(Debug, Clone)]
enum Span {
    /// This many whole chunks, every valid block set.
    Full(u64),
    /// One chunk, these bits.
    Bits(Box<Words>),
}

/// Blocks a pass took from a tracker: a plain (non-atomic) sparse bitmap owned by the copier.
#[derive(Clone)]
pub struct DirtySet {
    granularity_bytes: u64,
    disk_bytes: u64,
    block_count: u64,
    spans: BTreeMap<u64, Span>,
}

impl std::fmt::Debug for DirtySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let runs: Vec<(u64, u64)> = self.iter_runs().take(8).collect();
        f.debug_struct("DirtySet")
            .field("granularity_bytes", &self.granularity_bytes)
            .field("disk_bytes", &self.disk_bytes)
            .field("count", &self.count())
            .field("first_runs", &runs)
            .finish_non_exhaustive()
    }
}

impl PartialEq for DirtySet {
    fn eq(&self, other: &Self) -> bool {
        (self.granularity_bytes, self.disk_bytes) == (other.granularity_bytes, other.disk_bytes)
            && self.iter_words().eq(other.iter_words())
    }
}

impl Eq for DirtySet {}

impl DirtySet {
    /// An empty set of `disk_bytes.div_ceil(granularity_bytes)` blocks.
    pub fn empty(granularity_bytes: u64, disk_bytes: u64) -> Self {
        assert!(
            granularity_bytes.is_power_of_two(),
            "granularity {granularity_bytes}"
        );
        Self {
            granularity_bytes,
            disk_bytes,
            block_count: disk_bytes.div_ceil(granularity_bytes),
            spans: BTreeMap::new(),
        }
    }

    /// Wraps dense words of a bitmap of `block_count` blocks of `granularity_bytes` bytes
    /// covering a disk of `disk_bytes` bytes (a decoded dense encoding).
    pub fn from_words(
        granularity_bytes: u64,
        disk_bytes: u64,
        block_count: u64,
        words: Vec<u64>,
    ) -> Self {
        let mut set = Self::empty(granularity_bytes, disk_bytes);
        assert_eq!(block_count, set.block_count);
        assert_eq!(words.len() as u64, word_count_for(block_count));
        for (word, bits) in (0u64..).zip(words) {
            set.or_word(word, bits);
        }
        set
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

    /// Number of words of the dense form.
    pub fn word_count(&self) -> u64 {
        word_count_for(self.block_count)
    }

    /// The span holding chunk `chunk`, as (its first chunk, the span).
    fn span_of(&self, chunk: u64) -> Option<(u64, &Span)> {
        let (&first, span) = self.spans.range(..=chunk).next_back()?;
        match span {
            Span::Full(chunks) if chunk < first + chunks => Some((first, span)),
            Span::Bits(_) if first == chunk => Some((first, span)),
            _ => None,
        }
    }

    /// Word `word` of the dense form (0 past the end).
    pub fn word(&self, word: u64) -> u64 {
        if word >= self.word_count() {
            return 0;
        }
        let chunk = word / SET_CHUNK_WORDS as u64;
        match self.span_of(chunk) {
            None => 0,
            Some((_, Span::Full(_))) => valid_mask(word, self.block_count),
            Some((_, Span::Bits(bits))) => bits[(word % SET_CHUNK_WORDS as u64) as usize],
        }
    }

    /// ORs `bits` into word `word`; bits past the last block are a bug.
    pub fn or_word(&mut self, word: u64, bits: u64) {
        assert_eq!(
            bits & !valid_mask(word, self.block_count),
            0,
            "bits past block count {} in word {word}",
            self.block_count
        );
        if bits == 0 {
            return;
        }
        let chunk = word / SET_CHUNK_WORDS as u64;
        let index = (word % SET_CHUNK_WORDS as u64) as usize;
        // Appending in order (a take, a decode) hits the last span: skip the tree search.
        if let Some(mut last) = self.spans.last_entry() {
            if *last.key() == chunk {
                if let Span::Bits(words) = last.get_mut() {
                    words[index] |= bits;
                    return;
                }
            }
        }
        match self.span_of(chunk) {
            Some((_, Span::Full(_))) => {}
            Some((_, Span::Bits(_))) => {
                if let Some(Span::Bits(words)) = self.spans.get_mut(&chunk) {
                    words[index] |= bits;
                }
            }
            None => {
                let mut words = Box::new([0; SET_CHUNK_WORDS]);
                words[index] = bits;
                self.spans.insert(chunk, Span::Bits(words));
            }
        }
    }

    /// Adds whole chunks `first..end`, merging with `Full` spans that touch them.
    fn fill_chunks(&mut self, first: u64, end: u64) {
        debug_assert!(first < end);
        let (mut start, mut stop) = (first, end);
        if let Some((&key, Span::Full(chunks))) = self.spans.range(..first).next_back() {
            if key + chunks >= first {
                (start, stop) = (key, stop.max(key + chunks));
                self.spans.remove(&key);
            }
        }
        while let Some((&key, span)) = self.spans.range(start..=stop).next() {
            match span {
                Span::Full(chunks) => stop = stop.max(key + chunks),
                Span::Bits(_) if key == stop => break,
                Span::Bits(_) => {}
            }
            self.spans.remove(&key);
        }
        self.spans.insert(start, Span::Full(stop - start));
    }

    /// Adds blocks `first..end`: whole chunks as one `Full` span, the edges bit by bit.
    pub fn insert_range(&mut self, first: u64, end: u64) {
        assert!(
            first <= end && end <= self.block_count,
            "range {first}..{end} out of {} blocks",
            self.block_count
        );
        let (mut block, end) = (first, end);
        while block < end {
            let at_chunk_start = block % SET_CHUNK_BLOCKS == 0;
            let chunk = block / SET_CHUNK_BLOCKS;
            let chunk_end = ((chunk + 1) * SET_CHUNK_BLOCKS).min(self.block_count);
            if at_chunk_start && end >= chunk_end {
                // Whole chunks up to the last one `end` covers entirely.
                let last_full = if end == self.block_count {
                    end.div_ceil(SET_CHUNK_BLOCKS)
                } else {
                    end / SET_CHUNK_BLOCKS
                };
                self.fill_chunks(chunk, last_full);
                block = (last_full * SET_CHUNK_BLOCKS).min(end);
                continue;
            }
            let bit = block % WORD_BITS;
            let count = (WORD_BITS - bit).min(end - block);
            let mask = if count == WORD_BITS {
                u64::MAX
            } else {
                ((1u64 << count) - 1) << bit
            };
            self.or_word(block / WORD_BITS, mask);
            block += count;
        }
    }

    /// Number of dirty blocks.
    pub fn count(&self) -> u64 {
        self.spans
            .iter()
            .map(|(&first, span)| match span {
                Span::Full(chunks) => {
                    let end = ((first + chunks) * SET_CHUNK_BLOCKS).min(self.block_count);
                    end - first * SET_CHUNK_BLOCKS
                }
                Span::Bits(words) => words.iter().map(|w| u64::from(w.count_ones())).sum(),
            })
            .sum()
    }

    /// Whether no block is dirty.
    pub fn is_empty(&self) -> bool {
        self.iter_words().next().is_none()
    }

    /// Whether `block` is in the set.
    pub fn contains(&self, block: u64) -> bool {
        assert!(block < self.block_count, "block {block} out of range");
        self.word(block / WORD_BITS) & (1 << (block % WORD_BITS)) != 0
    }

    /// Adds `block` to the set.
    pub fn insert(&mut self, block: u64) {
        assert!(block < self.block_count, "block {block} out of range");
        self.or_word(block / WORD_BITS, 1 << (block % WORD_BITS));
    }

    /// Adds every block of `other` (same geometry) to the set.
    pub fn union_with(&mut self, other: &DirtySet) {
        assert_eq!(
            (self.granularity_bytes, self.block_count),
            (other.granularity_bytes, other.block_count),
            "sets of different geometry"
        );
        for (&first, span) in &other.spans {
            match span {
                Span::Full(chunks) => self.fill_chunks(first, first + chunks),
                Span::Bits(words) => {
                    let base = first * SET_CHUNK_WORDS as u64;
                    for (word, &bits) in (base..).zip(words.iter()) {
                        self.or_word(word, bits);
                    }
                }
            }
        }
    }

    /// Number of blocks of the set not in `other` (same geometry).
    pub fn count_not_in(&self, other: &DirtySet) -> u64 {
        self.iter_words()
            .map(|(word, bits)| u64::from((bits & !other.word(word)).count_ones()))
            .sum()
    }

    /// First block of `other` (same geometry) missing from the set.
    pub fn first_missing(&self, other: &DirtySet) -> Option<u64> {
        other.iter_words().find_map(|(word, bits)| {
            let missing = bits & !self.word(word);
            (missing != 0).then(|| word * WORD_BITS + u64::from(missing.trailing_zeros()))
        })
    }

    /// Nonzero words of the dense form as `(word index, bits)`, in order.
    pub fn iter_words(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.iter_words_from(0)
    }

    /// [`DirtySet::iter_words`] from word `first_word` on: the map is entered at the span
    /// holding it, so a pass taken chunk by chunk costs each chunk, not the set before it.
    pub fn iter_words_from(&self, first_word: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let word_count = self.word_count();
        let chunk = first_word / SET_CHUNK_WORDS as u64;
        // The span holding `first_word` may start at an earlier chunk (a `Full` run).
        let start_key = self
            .spans
            .range(..=chunk)
            .next_back()
            .map_or(chunk, |(&key, _)| key);
        self.spans
            .range(start_key..)
            .flat_map(move |(&first, span)| {
                let base = first * SET_CHUNK_WORDS as u64;
                let (full_end, bits) = match span {
                    Span::Full(chunks) => (
                        ((first + chunks) * SET_CHUNK_WORDS as u64).min(word_count),
                        None,
                    ),
                    Span::Bits(words) => (base, Some(words)),
                };
                let full = (base.max(first_word)..full_end)
                    .map(move |word| (word, valid_mask(word, self.block_count)));
                let partial = bits
                    .into_iter()
                    .flat_map(move |words| (base..).zip(words.iter().copied()))
                    .filter(move |&(word, bits)| bits != 0 && word >= first_word);
                full.chain(partial)
            })
    }

    /// Dirty blocks in increasing order.
    pub fn iter_blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.iter_words()
            .flat_map(|(word, bits)| BitIter { bits }.map(move |bit| word * WORD_BITS + bit))
    }

    /// Maximal runs of dirty blocks as `(first block, end block)`, in order; a word at a time.
    pub fn iter_runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.iter_runs_from(0)
    }

    /// [`DirtySet::iter_runs`] of the blocks at or after `first_block` (a run that holds it
    /// starts there).
    pub fn iter_runs_from(&self, first_block: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let first_word = first_block / WORD_BITS;
        let below = first_block % WORD_BITS;
        let mut words = self
            .iter_words_from(first_word)
            .map(move |(word, bits)| {
                // The first word's bits below `first_block` are not asked for.
                let keep = if word == first_word {
                    u64::MAX << below
                } else {
                    u64::MAX
                };
                (word, bits & keep)
            })
            .filter(|&(_, bits)| bits != 0)
            .peekable();
        let mut pending: Option<(u64, u64)> = None;
        std::iter::from_fn(move || loop {
            let Some(&(word, bits)) = words.peek() else {
                return pending.take();
            };
            // The first run of this word, then the rest of the word stays for the next round.
            let low = u64::from(bits.trailing_zeros());
            let ones = u64::from((bits >> low).trailing_ones());
            let rest = if low + ones >= WORD_BITS {
                0
            } else {
                bits & (u64::MAX << (low + ones))
            };
            if rest == 0 {
                words.next();
            } else if let Some(entry) = words.peek_mut() {
                entry.1 = rest;
            }
            let (first, end) = (word * WORD_BITS + low, word * WORD_BITS + low + ones);
            match pending {
                Some((start, stop)) if stop == first => pending = Some((start, end)),
                Some(run) => {
                    pending = Some((first, end));
                    return Some(run);
                }
                None => pending = Some((first, end)),
            }
        })
    }

    /// Maximal runs of dirty blocks as byte extents `(offset_bytes, len_bytes)`, in order,
    /// clipped to the disk (the last block may be partial).
    pub fn iter_extents(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.iter_runs().map(|(first, end)| {
            let offset_bytes = first * self.granularity_bytes;
            let end_bytes = (end * self.granularity_bytes).min(self.disk_bytes);
            (offset_bytes, end_bytes - offset_bytes)
        })
    }

    /// Heap bytes the spans hold (approximate: the tree's nodes are not counted).
    pub fn allocated_bytes(&self) -> u64 {
        let bits = self
            .spans
            .values()
            .filter(|span| matches!(span, Span::Bits(_)))
            .count() as u64;
        bits * std::mem::size_of::<Words>() as u64 + self.spans.len() as u64 * 24
    }
}

impl DirtySet {
    /// Makes words `first_word..end_word` exactly `words` (nonzero `(word, bits)` pairs inside
    /// the range, valid bits only): the range is cleared, splitting a `Full` span around it,
    /// then `words` are ORed in. Replaying an activity log's close record does this.
    pub fn replace_words(&mut self, first_word: u64, end_word: u64, words: &[(u64, u64)]) {
        let chunk_words = SET_CHUNK_WORDS as u64;
        let end_word = end_word.min(self.word_count());
        if first_word < end_word {
            for chunk in first_word / chunk_words..end_word.div_ceil(chunk_words) {
                self.split_full(chunk);
                let Some(Span::Bits(bits)) = self.spans.get_mut(&chunk) else {
                    continue;
                };
                let base = chunk * chunk_words;
                for word in first_word.max(base)..end_word.min(base + chunk_words) {
                    bits[(word - base) as usize] = 0;
                }
                if bits.iter().all(|&w| w == 0) {
                    self.spans.remove(&chunk);
                }
            }
        }
        for &(word, bits) in words {
            assert!(
                (first_word..end_word).contains(&word),
                "word {word} outside {first_word}..{end_word}"
            );
            self.or_word(word, bits);
        }
    }

    /// Removes every block of `other` (same geometry) from the set: a pass's delivered
    /// blocks leave the take a durable tracker keeps.
    pub fn remove_all(&mut self, other: &DirtySet) {
        assert_eq!(
            (self.granularity_bytes, self.block_count),
            (other.granularity_bytes, other.block_count),
            "sets of different geometry"
        );
        let chunk_words = SET_CHUNK_WORDS as u64;
        for (word, bits) in other.iter_words() {
            let chunk = word / chunk_words;
            self.split_full(chunk);
            let Some(Span::Bits(words)) = self.spans.get_mut(&chunk) else {
                continue;
            };
            words[(word % chunk_words) as usize] &= !bits;
            if words.iter().all(|&w| w == 0) {
                self.spans.remove(&chunk);
            }
        }
    }

    /// When chunk `chunk` lies in a `Full` span, cuts it out as a `Bits` chunk of every valid
    /// block, keeping the rest of the span `Full`.
    fn split_full(&mut self, chunk: u64) {
        let Some((first, Span::Full(chunks))) = self.span_of(chunk).map(|(f, s)| (f, s.clone()))
        else {
            return;
        };
        self.spans.remove(&first);
        if chunk > first {
            self.spans.insert(first, Span::Full(chunk - first));
        }
        if first + chunks > chunk + 1 {
            self.spans
                .insert(chunk + 1, Span::Full(first + chunks - chunk - 1));
        }
        let base = chunk * SET_CHUNK_WORDS as u64;
        let mut words = Box::new([0; SET_CHUNK_WORDS]);
        for (index, word) in words.iter_mut().enumerate() {
            *word = valid_mask(base + index as u64, self.block_count);
        }
        self.spans.insert(chunk, Span::Bits(words));
    }
}

impl DirtySet {
    /// The same disk's set at blocks of `granularity_bytes` (a power of two): to a finer
    /// granularity each block becomes every fine block it covers, to a coarser one a coarse
    /// block is in the set when any fine block it covers is. Either way every byte in a block
    /// of `self` is in a block of the result, so a tracker's history survives a change of
    /// granularity (a job tracking at 4 KiB started over a 64 KiB tracker's bits). Works run by
    /// run, so a long run stays one span.
    pub fn to_granularity(&self, granularity_bytes: u64) -> DirtySet {
        let mut converted = DirtySet::empty(granularity_bytes, self.disk_bytes);
        let (from, to) = (self.granularity_bytes, granularity_bytes);
        for (first, end) in self.iter_runs() {
            let (first, end) = if from >= to {
                let ratio = from / to;
                (first * ratio, (end * ratio).min(converted.block_count))
            } else {
                let ratio = to / from;
                (first / ratio, end.div_ceil(ratio))
            };
            converted.insert_range(first, end);
        }
        converted
    }
}

/// Positions of the set bits of one word, lowest first.
pub(crate) struct BitIter {
    /// Bits not yet returned.
    pub(crate) bits: u64,
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
    use crate::prng::SplitMix64 as Prng;
    use std::collections::BTreeSet;

    /// A set over `block_count` blocks of 4 KiB, the last one partial.
    fn empty(block_count: u64) -> DirtySet {
        DirtySet::empty(4096, (block_count * 4096).saturating_sub(100))
    }

    /// Runs of a sorted block list.
    fn runs_of(blocks: &BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &block in blocks {
            match runs.last_mut() {
                Some(run) if run.1 == block => run.1 += 1,
                _ => runs.push((block, block + 1)),
            }
        }
        runs
    }

    /// Checks every view of `set` against the reference `model`.
    fn check(set: &DirtySet, model: &BTreeSet<u64>, context: &str) {
        assert_eq!(set.count(), model.len() as u64, "{context}");
        let blocks: Vec<u64> = set.iter_blocks().collect();
        assert!(blocks.iter().eq(model.iter()), "{context}");
        assert_eq!(
            set.iter_runs().collect::<Vec<_>>(),
            runs_of(model),
            "{context}"
        );
        assert_eq!(set.is_empty(), model.is_empty(), "{context}");
        let block_count = set.block_count();
        for from in [
            1,
            63,
            64,
            65,
            SET_CHUNK_BLOCKS,
            block_count / 2,
            block_count - 1,
        ] {
            let rest: BTreeSet<u64> = model.range(from..).copied().collect();
            assert_eq!(
                set.iter_runs_from(from).collect::<Vec<_>>(),
                runs_of(&rest),
                "{context}: runs from {from}"
            );
        }
        let dense: Vec<u64> = (0..set.word_count()).map(|w| set.word(w)).collect();
        let rebuilt = DirtySet::from_words(4096, set.disk_bytes(), set.block_count(), dense);
        assert_eq!(&rebuilt, set, "{context}");
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

    #[test]
    fn random_inserts_ranges_and_unions_match_a_reference() {
        // Goal: the sparse set behaves as a plain set of blocks. Method: random inserts,
        // ranges (short, chunk-crossing, whole-disk) and unions, against a BTreeSet, on
        // sizes around the chunk size.
        let mut prng = Prng::new(11);
        for round in 0..60 {
            let block_count = 1 + prng.below(5 * SET_CHUNK_BLOCKS);
            let (mut set, mut model) = (empty(block_count), BTreeSet::new());
            for _ in 0..prng.below(40) {
                let first = prng.below(block_count);
                let len = match prng.below(3) {
                    0 => 1,
                    1 => prng.below(200),
                    _ => prng.below(block_count - first + 1),
                };
                let end = (first + len).min(block_count);
                if len == 1 {
                    set.insert(first);
                } else {
                    set.insert_range(first, end);
                }
                model.extend(first..end.max(first + u64::from(len == 1)));
            }
            check(&set, &model, &format!("round {round}"));
            let mut other = empty(block_count);
            let mut other_model = BTreeSet::new();
            for _ in 0..prng.below(5) {
                let first = prng.below(block_count);
                let end = first + prng.below(block_count - first + 1);
                other.insert_range(first, end);
                other_model.extend(first..end);
            }
            assert_eq!(
                set.count_not_in(&other),
                model.difference(&other_model).count() as u64
            );
            assert_eq!(
                other.first_missing(&set),
                model.difference(&other_model).next().copied()
            );
            let mut removed = set.clone();
            removed.remove_all(&other);
            let removed_model: BTreeSet<u64> = model.difference(&other_model).copied().collect();
            check(
                &removed,
                &removed_model,
                &format!("round {round} after remove"),
            );
            let (first_word, end_word) =
                (prng.below(removed.word_count() + 1), removed.word_count());
            let keep = (first_word < end_word).then_some((first_word, 1u64));
            removed.replace_words(first_word, end_word, keep.as_slice());
            let replaced_model: BTreeSet<u64> = removed_model
                .iter()
                .copied()
                .filter(|&b| b / WORD_BITS < first_word)
                .chain(keep.map(|(word, _)| word * WORD_BITS))
                .collect();
            check(
                &removed,
                &replaced_model,
                &format!("round {round} after replace"),
            );
            set.union_with(&other);
            model.extend(other_model);
            check(&set, &model, &format!("round {round} after union"));
        }
    }

    #[test]
    fn a_whole_disk_run_costs_one_span() {
        // Goal: memory follows runs, not blocks (the journal's hostile-record finding).
        // Method: insert 2^32 blocks as one range; check count, extents and allocation.
        let mut set = DirtySet::empty(4096, 4096 << 32);
        set.insert_range(0, 1 << 32);
        assert_eq!(set.count(), 1 << 32);
        assert_eq!(set.iter_runs().collect::<Vec<_>>(), vec![(0, 1 << 32)]);
        assert!(set.allocated_bytes() < 100, "{}", set.allocated_bytes());
        set.insert(12345);
        set.insert_range(7, 9_000_000);
        assert_eq!(set.allocated_bytes(), 24);
    }

    #[test]
    fn to_granularity_expands_and_coarsens_block_sets() {
        // Goal: converting a set between granularities keeps every byte it covers, both ways,
        // and a round trip fine -> coarse -> fine gives the coarse blocks' cover. Method:
        // random sets on a disk whose last block is partial at both granularities; compare
        // byte coverage against a per-4-KiB model.
        let mut prng = Prng::new(23);
        let disk_bytes = 3 * SET_CHUNK_BLOCKS * 65536 + 5000;
        for round in 0..20 {
            let mut coarse = DirtySet::empty(65536, disk_bytes);
            for _ in 0..prng.below(30) {
                let first = prng.below(coarse.block_count());
                let end = (first + 1 + prng.below(3 * SET_CHUNK_BLOCKS)).min(coarse.block_count());
                coarse.insert_range(first, end);
            }
            let fine = coarse.to_granularity(4096);
            assert_eq!(
                (fine.granularity_bytes(), fine.disk_bytes()),
                (4096, disk_bytes)
            );
            let expected: u64 = coarse
                .iter_extents()
                .map(|(_, len)| len.div_ceil(4096))
                .sum();
            assert_eq!(fine.count(), expected, "round {round}");
            for block in fine.iter_blocks() {
                assert!(coarse.contains(block / 16), "round {round}: block {block}");
            }
            assert_eq!(fine.to_granularity(65536), coarse, "round {round} back");
        }
        // To coarser: any fine block sets its coarse block; the partial last block too.
        let mut fine = DirtySet::empty(4096, disk_bytes);
        let last = fine.block_count() - 1;
        for block in [0, 15, 16, 17, 40, last] {
            fine.insert(block);
        }
        let coarse = fine.to_granularity(65536);
        let blocks: Vec<u64> = coarse.iter_blocks().collect();
        assert_eq!(blocks, vec![0, 1, 2, last / 16]);
        assert_eq!(coarse.block_count(), disk_bytes.div_ceil(65536));
        // Same granularity: the same set; a whole-disk run stays one span.
        assert_eq!(fine.to_granularity(4096), fine);
        let mut whole = DirtySet::empty(1 << 20, 1 << 40);
        whole.insert_range(0, whole.block_count());
        let expanded = whole.to_granularity(4096);
        assert_eq!(expanded.count(), (1u64 << 40) / 4096);
        assert!(expanded.allocated_bytes() < 100);
    }
}
