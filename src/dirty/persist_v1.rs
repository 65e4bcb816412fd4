//! Reading version 1 tracker files (dense), so that an upgrade keeps its trackers.
//!
//! Version 1 stored, after the common header and name, `8 × ceil(block_count / 64)` bytes of
//! bitmap words and then `block_count` bytes of heat (one count per block), then the crc32c.
//! This build never writes it. Loading converts it to the sparse form: nonzero words, and per
//! heat region the hottest of its blocks.
//!
//! Invariants:
//! - The body length must equal what the header implies before anything is read; what is
//!   allocated is bounded by the bytes present (the file was read whole already).

use super::bitmap::read_le_words;
use super::heat::heat_shift_for_blocks;
use crate::codec;

/// The dense format's version number.
pub const VERSION: u32 = 1;

/// Parses a version 1 body after the name, for `block_count` blocks of `granularity_bytes`
/// (from the checked header), into nonzero `(word, bits)` and `(region, heat)`.
#[allow(clippy::type_complexity)]
pub(crate) fn decode_body(
    reader: &mut codec::Reader<'_>,
    block_count: u64,
    granularity_bytes: u64,
) -> Result<(Vec<(u64, u64)>, Vec<(u64, u8)>), String> {
    let expected = block_count
        .div_ceil(64)
        .checked_mul(8)
        .and_then(|words| words.checked_add(block_count));
    if expected != Some(reader.remaining() as u64) {
        return Err(format!(
            "{} bytes of bitmap and heat, header implies {expected:?}",
            reader.remaining()
        ));
    }
    let words = read_le_words(reader, block_count)
        .map_err(|err| crate::error::error_chain(&err))?
        .into_iter()
        .enumerate()
        .filter(|&(_, bits)| bits != 0)
        .map(|(word, bits)| (word as u64, bits))
        .collect();
    let per_block = reader
        .bytes(usize::try_from(block_count).expect("bounded by the file"))
        .map_err(|err| format!("truncated: {err}"))?;
    let shift = heat_shift_for_blocks(granularity_bytes, block_count);
    let mut heat: Vec<(u64, u8)> = Vec::new();
    for (block, &count) in (0u64..).zip(per_block) {
        if count == 0 {
            continue;
        }
        let region = block >> shift;
        match heat.last_mut() {
            Some((last, hottest)) if *last == region => *hottest = (*hottest).max(count),
            _ => heat.push((region, count)),
        }
    }
    Ok((words, heat))
}
