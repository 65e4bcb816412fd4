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
use super::heat_shift_for;
use super::persist::{truncated, Header};
use crate::codec;

/// The dense format's version number.
pub const VERSION: u32 = 1;

/// Parses a version 1 body after the name into nonzero `(word, bits)` and `(region, heat)`.
#[allow(clippy::type_complexity)]
pub(crate) fn decode_body(
    reader: &mut codec::Reader<'_>,
    header: &Header,
) -> Result<(Vec<(u64, u64)>, Vec<(u64, u8)>), String> {
    let block_count = header.block_count;
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
        .map_err(truncated)?;
    let shift = heat_shift_for(header.spec.granularity_bytes);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::persist::{decode, FileState, FLAG_LOST, MAGIC};
    use std::path::Path;

    /// A version 1 file as the old build wrote it.
    fn v1_file(
        state: FileState,
        flags: u32,
        disk_bytes: u64,
        words: &[u64],
        heat: &[u8],
    ) -> Vec<u8> {
        let granularity_bytes = 4096u64;
        let mut out = Vec::new();
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(state as u32).to_le_bytes());
        out.extend_from_slice(&flags.to_le_bytes());
        let block_count = disk_bytes.div_ceil(granularity_bytes);
        for field in [granularity_bytes, block_count, disk_bytes, 30_000] {
            out.extend_from_slice(&field.to_le_bytes());
        }
        out.extend_from_slice(&2u32.to_le_bytes());
        out.extend_from_slice(b"v1");
        for word in words {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(heat);
        let checksum = crc32c::crc32c(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        out
    }

    #[test]
    fn version_1_files_load_sparse() {
        // Goal: an old dense file loads as the same bits, heat per region the hottest block.
        // Method: hand-build a v1 file of 600 blocks (3 regions of 256), decode, compare.
        let disk_bytes = 600 * 4096 - 10;
        let mut words = vec![0u64; 10];
        words[0] = 0b101;
        words[9] = 1 << 23; // block 599, the last
        let mut heat = vec![0u8; 600];
        heat[3] = 7;
        heat[200] = 9;
        heat[599] = 2;
        let bytes = v1_file(FileState::Clean, 0, disk_bytes, &words, &heat);
        let saved = decode(Path::new("old.tracker"), &bytes).expect("v1 decodes");
        assert_eq!(saved.words, vec![(0, 0b101), (9, 1 << 23)]);
        assert_eq!(saved.heat, vec![(0, 9), (2, 2)]);
        assert_eq!(saved.spec.name, "v1");
        assert!(!saved.lost);
        let lost = v1_file(FileState::Active, FLAG_LOST, disk_bytes, &words, &heat);
        let saved = decode(Path::new("old.tracker"), &lost).expect("v1 decodes");
        assert!(saved.lost);
        assert_eq!(saved.state, FileState::Active);
        // A v1 body of the wrong length, even with a valid checksum, is refused.
        let short = v1_file(FileState::Clean, 0, disk_bytes, &words, &heat[..599]);
        let err = decode(Path::new("old.tracker"), &short).expect_err("short body");
        assert!(err.to_string().contains("header implies"), "{err}");
        // Bits past the disk's end are refused.
        let mut past = words.clone();
        past[9] = 1 << 24;
        let bytes = v1_file(FileState::Clean, 0, disk_bytes, &past, &heat);
        let err = decode(Path::new("old.tracker"), &bytes).expect_err("bits past end");
        assert!(err.to_string().contains("past"), "{err}");
    }
}
