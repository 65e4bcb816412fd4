//! Tracker files: save on clean shutdown, restore at start-up, detect unclean stops.
//!
//! One file per tracker, `<dir>/<name>.tracker` (the caller passes one directory per export).
//! The format is sparse: only nonzero bitmap words and nonzero heat regions are stored, so
//! saving and loading take time proportional to what was written, not to the disk size.
//! A durable tracker also has an activity log, `<dir>/<name>.log` (`logfile.rs`).
//! Layout, little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic `FERRYTRK` |
//! | 4 | version (3; versions 2 and 1 still load, see `persist_v1.rs` for 1) |
//! | 4 | state: 1 = Clean (saved at shutdown), 2 = Active (in use) |
//! | 4 | flags: bit 0 = lost (the history was already lost before this save), bit 1 = durable (an activity log beside it), bit 2 = recovered (from a log, over-marking at most the bound below); bits 1 and 2 from version 3 |
//! | 8 | granularity_bytes |
//! | 8 | block_count |
//! | 8 | disk_bytes |
//! | 8 | half_life_ms |
//! | 4 | name length, then the name (UTF-8) |
//! | 8 | recovered bound in bytes (version 3 only; 0 unless recovered) |
//! | 4 | heat shift: blocks per heat region, as a shift (another is mapped to this build's) |
//! | 8 | W: number of bitmap entries |
//! | 8 | H: number of heat entries |
//! | 16 × W | (word index, bits): nonzero words, indexes strictly increasing |
//! | 9 × H | (region, heat): nonzero heat decayed to save time, regions strictly increasing |
//! | 4 | crc32c of every byte before it |
//!
//! An Active file, or a lost tracker's, has W = H = 0: its bits are never read (it loads as
//! lost, every block dirty, or for a durable tracker as its log's replay), so the rewrite at
//! start-up is small whatever the disk size.
//!
//! Invariants:
//! - Files are replaced atomically: temp file, fsync, rename, fsync of the directory. A crash
//!   leaves the old file or the new one, never a mix; a torn temp file is ignored.
//! - Restore rewrites every file as Active before any tracker is used, so a file found
//!   Active at start-up means the agent did not stop cleanly: that tracker comes back lost,
//!   or, when durable and its log replays, recovered with the log's bound.
//! - A clean save removes the durable trackers' logs after their Clean files are written: a
//!   Clean file holds every bit (the last take included), and a log is only read beside an
//!   Active file. A log without a durable tracker's file is removed at restore.
//! - Decoding checks length, magic, version and checksum before trusting any field, then
//!   every field against the others and against the disk, and the entry counts against the
//!   bytes present before allocating for them (a hostile file allocates nothing it does not
//!   hold): a corrupt file is an error naming the file and the problem, never misread.

use std::path::{Path, PathBuf};

use super::bitmap::valid_mask;
use super::heat::{heat_shift_for_blocks, remap_regions};
use super::persist_v1;
use super::{DirtyError, Tracker, TrackerSpec};
use crate::codec::{self, CodecError};
use crate::name::NAME_MAX_BYTES;

/// First bytes of every tracker file.
pub const MAGIC: [u8; 8] = *b"FERRYTRK";
/// Format version this build writes.
pub const VERSION: u32 = 3;
/// The sparse format without the durable and recovered fields (still read).
const VERSION_2: u32 = 2;
/// File name suffix of tracker files.
pub const EXTENSION: &str = "tracker";
/// Suffix of the temp file a save writes before renaming: the extension, then
/// [`durable::TEMP_SUFFIX`].
const TEMP_SUFFIX: &str = ".tracker.tmp";
/// Bytes before the name: magic, version, state, flags, 4 u64 fields, name length.
const FIXED_HEADER_BYTES: usize = 8 + 4 + 4 + 4 + 4 * 8 + 4;
/// Bytes after the name and before the entries: heat shift, W, H.
const COUNTS_BYTES: usize = 4 + 8 + 8;
/// Bytes of one bitmap entry and of one heat entry.
const WORD_ENTRY_BYTES: u64 = 16;
const HEAT_ENTRY_BYTES: u64 = 9;
/// Flag bit: the tracker was lost (restored after an unclean stop, not yet cleared).
const FLAG_LOST: u32 = 1;
/// Flag bit: the tracker is durable (an activity log lies beside its file).
const FLAG_DURABLE: u32 = 2;
/// Flag bit: the tracker was recovered from its log (the bound field says by how much).
const FLAG_RECOVERED: u32 = 4;
/// Bytes of the trailing checksum.
const CHECKSUM_BYTES: usize = 4;

/// Whether a file was written by a clean shutdown or by a running agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// Saved at clean shutdown: the bitmap is the whole history.
    Clean = 1,
    /// The tracker is (or was, when the agent died) in use: its bitmap is stale.
    Active = 2,
}

/// A decoded tracker file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedTracker {
    /// Clean or Active.
    pub state: FileState,
    /// The tracker was already lost when saved; it stays lost after a clean restart.
    pub lost: bool,
    /// Name, granularity, half-life.
    pub spec: TrackerSpec,
    /// Size of the disk when saved.
    pub disk_bytes: u64,
    /// Nonzero bitmap words as `(word index, bits)`, in order.
    pub words: Vec<(u64, u64)>,
    /// Nonzero heat at save time as `(region, heat)`, in order.
    pub heat: Vec<(u64, u8)>,
    /// `Some(bound_bytes)` when the tracker had been recovered from its log.
    pub recovered_bound: Option<u64>,
}

/// The fields every version shares, checked against each other.
struct Header {
    state: FileState,
    lost: bool,
    recovered: bool,
    spec: TrackerSpec,
    block_count: u64,
    disk_bytes: u64,
}

/// Path of the file for tracker `name` under `dir`.
pub fn tracker_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.{EXTENSION}"))
}

/// Serializes `tracker` in `state`; see the module docs for the layout.
pub fn encode(tracker: &Tracker, state: FileState) -> Vec<u8> {
    // Active and lost files load as lost: their bits and heat would never be read.
    let keep = state == FileState::Clean && !tracker.is_lost();
    let words: Vec<(u64, u64)> = if keep {
        tracker.bitmap_set().iter_words().collect()
    } else {
        Vec::new()
    };
    let heat = if keep {
        tracker.heat_regions()
    } else {
        Vec::new()
    };
    let name = tracker.name().as_bytes();
    let mut out = Vec::with_capacity(
        FIXED_HEADER_BYTES + name.len() + COUNTS_BYTES + words.len() * 16 + heat.len() * 9 + 4,
    );
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(state as u32).to_le_bytes());
    let recovered_bound = tracker.recovered_bound();
    let flags = [
        (tracker.is_lost(), FLAG_LOST),
        (tracker.wants_log(), FLAG_DURABLE),
        (recovered_bound.is_some(), FLAG_RECOVERED),
    ]
    .iter()
    .filter(|(set, _)| *set)
    .fold(0, |flags, (_, flag)| flags | flag);
    out.extend_from_slice(&flags.to_le_bytes());
    for field in [
        tracker.granularity_bytes(),
        tracker.block_count(),
        tracker.disk_bytes(),
        tracker.half_life_ms(),
    ] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    let name_len = u32::try_from(name.len()).expect("names are at most NAME_MAX_BYTES");
    out.extend_from_slice(&name_len.to_le_bytes());
    out.extend_from_slice(name);
    out.extend_from_slice(&recovered_bound.unwrap_or(0).to_le_bytes());
    out.extend_from_slice(&tracker.heat_shift().to_le_bytes());
    out.extend_from_slice(&(words.len() as u64).to_le_bytes());
    out.extend_from_slice(&(heat.len() as u64).to_le_bytes());
    for &(word, bits) in &words {
        out.extend_from_slice(&word.to_le_bytes());
        out.extend_from_slice(&bits.to_le_bytes());
    }
    for &(region, count) in &heat {
        out.extend_from_slice(&region.to_le_bytes());
        out.push(count);
    }
    let checksum = crc32c::crc32c(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    // Pair assertion: what we write is what decode accepts.
    debug_assert!(decode(Path::new("<encoded>"), &out)
        .is_ok_and(|saved| saved.words == words && saved.heat == heat && saved.state == state));
    out
}

/// Parses a tracker file's bytes (version 2, or 1); `path` only names the file in errors.
pub fn decode(path: &Path, bytes: &[u8]) -> Result<SavedTracker, DirtyError> {
    let corrupt = |problem: String| DirtyError::Corrupt {
        path: path.to_owned(),
        problem,
    };
    let minimum = FIXED_HEADER_BYTES + CHECKSUM_BYTES;
    if bytes.len() < minimum {
        return Err(corrupt(format!(
            "truncated: {} bytes, a header needs {minimum}",
            bytes.len()
        )));
    }
    let (body, checksum) = bytes.split_at(bytes.len() - CHECKSUM_BYTES);
    // The reads below cannot run out: the length was checked against the fixed header.
    let short = |err| corrupt(truncated(err));
    let mut reader = codec::Reader::new(body);
    if reader.array::<8>().map_err(short)? != MAGIC {
        return Err(corrupt("bad magic: not a ferry tracker file".to_owned()));
    }
    let version = reader.u32_le().map_err(short)?;
    if ![VERSION, VERSION_2, persist_v1::VERSION].contains(&version) {
        return Err(corrupt(format!(
            "unsupported version {version} (this build reads {}, {VERSION_2} and {VERSION})",
            persist_v1::VERSION
        )));
    }
    let stored = codec::Reader::new(checksum).u32_le().map_err(short)?;
    let computed = crc32c::crc32c(body);
    if stored != computed {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): torn or damaged"
        )));
    }
    let header = decode_header(&mut reader, version).map_err(corrupt)?;
    let recovered_bound = if version == VERSION {
        let bound = reader.u64_le().map_err(short)?;
        header.recovered.then_some(bound)
    } else {
        None
    };
    let (words, heat) = if version != persist_v1::VERSION {
        decode_entries(&mut reader, &header)
    } else {
        persist_v1::decode_body(
            &mut reader,
            header.block_count,
            header.spec.granularity_bytes,
        )
    }
    .map_err(corrupt)?;
    Ok(SavedTracker {
        state: header.state,
        lost: header.lost,
        spec: header.spec,
        disk_bytes: header.disk_bytes,
        words,
        heat,
        recovered_bound,
    })
}

/// A file that ends inside a field.
fn truncated(err: CodecError) -> String {
    format!("truncated: {err}")
}

/// Parses the checksummed fields after the version up to the name; the error is the problem.
fn decode_header(reader: &mut codec::Reader<'_>, version: u32) -> Result<Header, String> {
    let state = match reader.u32_le().map_err(truncated)? {
        1 => FileState::Clean,
        2 => FileState::Active,
        other => return Err(format!("unknown state {other}")),
    };
    let flags = reader.u32_le().map_err(truncated)?;
    let known = if version == VERSION {
        FLAG_LOST | FLAG_DURABLE | FLAG_RECOVERED
    } else {
        FLAG_LOST
    };
    if flags & !known != 0 {
        return Err(format!("unknown flags {flags:#x}"));
    }
    let granularity_bytes = reader.u64_le().map_err(truncated)?;
    let block_count = reader.u64_le().map_err(truncated)?;
    let disk_bytes = reader.u64_le().map_err(truncated)?;
    let half_life_ms = reader.u64_le().map_err(truncated)?;
    let name_len = reader.u32_le().map_err(truncated)? as usize;
    if name_len > NAME_MAX_BYTES {
        return Err(format!("name length {name_len} exceeds {NAME_MAX_BYTES}"));
    }
    if !granularity_bytes.is_power_of_two() {
        return Err(format!(
            "granularity {granularity_bytes} is not a power of two"
        ));
    }
    if block_count != disk_bytes.div_ceil(granularity_bytes) {
        return Err(format!(
            "block count {block_count} does not match {disk_bytes} bytes at granularity {granularity_bytes}"
        ));
    }
    let name = String::from_utf8(reader.bytes(name_len).map_err(truncated)?.to_vec())
        .map_err(|_| "name is not UTF-8".to_owned())?;
    let spec = TrackerSpec {
        name,
        granularity_bytes,
        half_life_ms,
        durable: flags & FLAG_DURABLE != 0,
    };
    // block_count against MAX_BLOCK_COUNT: the tracker's constructor, at load.
    spec.validate().map_err(|err| err.to_string())?;
    Ok(Header {
        state,
        lost: flags & FLAG_LOST != 0,
        recovered: flags & FLAG_RECOVERED != 0,
        spec,
        block_count,
        disk_bytes,
    })
}

/// Parses version 2's heat shift, counts and entries, checking the counts against the bytes
/// left before allocating, and every entry against the geometry.
#[allow(clippy::type_complexity)]
fn decode_entries(
    reader: &mut codec::Reader<'_>,
    header: &Header,
) -> Result<(Vec<(u64, u64)>, Vec<(u64, u8)>), String> {
    let heat_shift = reader.u32_le().map_err(truncated)?;
    // Another region size (an older build) is mapped below; a shift past 63 is no shift.
    if heat_shift >= u64::BITS {
        return Err(format!("heat shift {heat_shift} is not a block shift"));
    }
    let word_entries = reader.u64_le().map_err(truncated)?;
    let heat_entries = reader.u64_le().map_err(truncated)?;
    let expected = word_entries
        .checked_mul(WORD_ENTRY_BYTES)
        .zip(heat_entries.checked_mul(HEAT_ENTRY_BYTES))
        .and_then(|(words, heat)| words.checked_add(heat));
    if expected != Some(reader.remaining() as u64) {
        return Err(format!(
            "{} bytes of entries, counts {word_entries} words and {heat_entries} heat imply {expected:?}",
            reader.remaining()
        ));
    }
    // Both counts are now bounded by the bytes present.
    let mut words = Vec::with_capacity(usize::try_from(word_entries).expect("bounded"));
    let word_count = header.block_count.div_ceil(64);
    for _ in 0..word_entries {
        let word = reader.u64_le().map_err(truncated)?;
        let bits = reader.u64_le().map_err(truncated)?;
        if word >= word_count || words.last().is_some_and(|&(last, _)| last >= word) {
            return Err(format!(
                "bitmap word {word} out of order or past {word_count}"
            ));
        }
        if bits == 0 || bits & !valid_mask(word, header.block_count) != 0 {
            return Err(format!(
                "bitmap word {word} is zero or has bits past the disk"
            ));
        }
        words.push((word, bits));
    }
    let region_count = header.block_count.div_ceil(1 << heat_shift);
    let mut heat = Vec::with_capacity(usize::try_from(heat_entries).expect("bounded"));
    for _ in 0..heat_entries {
        let region = reader.u64_le().map_err(truncated)?;
        let count = reader.u8().map_err(truncated)?;
        if region >= region_count || heat.last().is_some_and(|&(last, _)| last >= region) {
            return Err(format!(
                "heat region {region} out of order or past {region_count}"
            ));
        }
        if count == 0 {
            return Err(format!("heat region {region} stored with heat 0"));
        }
        heat.push((region, count));
    }
    let shift = heat_shift_for_blocks(header.spec.granularity_bytes, header.block_count);
    let heat = remap_regions(
        heat,
        heat_shift,
        shift,
        header.block_count.div_ceil(1 << shift),
    );
    Ok((words, heat))
}

mod dir;

pub use dir::remove_saved;
pub(crate) use dir::{load_all, save_all, save_one};

#[cfg(test)]
mod tests;
