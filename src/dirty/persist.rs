//! Tracker files: save on clean shutdown, restore at start-up, detect unclean stops.
//!
//! One file per tracker, `<dir>/<name>.tracker` (the caller passes one directory per export).
//! Format version 2 is sparse: only nonzero bitmap words and nonzero heat regions are stored,
//! so saving and loading take time proportional to what was written, not to the disk size.
//! Layout, little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic `FERRYTRK` |
//! | 4 | version (2; version 1 files still load, see `persist_v1.rs`) |
//! | 4 | state: 1 = Clean (saved at shutdown), 2 = Active (in use) |
//! | 4 | flags: bit 0 = lost (the history was already lost before this save) |
//! | 8 | granularity_bytes |
//! | 8 | block_count |
//! | 8 | disk_bytes |
//! | 8 | half_life_ms |
//! | 4 | name length, then the name (UTF-8) |
//! | 4 | heat shift: blocks per heat region, as a shift (another is mapped to this build's) |
//! | 8 | W: number of bitmap entries |
//! | 8 | H: number of heat entries |
//! | 16 × W | (word index, bits): nonzero words, indexes strictly increasing |
//! | 9 × H | (region, heat): nonzero heat decayed to save time, regions strictly increasing |
//! | 4 | crc32c of every byte before it |
//!
//! An Active file, or a lost tracker's, has W = H = 0: its bits are never read (it loads as
//! lost, every block dirty), so the rewrite at start-up is small whatever the disk size.
//!
//! Invariants:
//! - Files are replaced atomically: temp file, fsync, rename, fsync of the directory. A crash
//!   leaves the old file or the new one, never a mix; a torn temp file is ignored.
//! - Restore rewrites every file as Active before any tracker is used, so a file found
//!   Active at start-up means the agent did not stop cleanly: that tracker comes back lost.
//! - Decoding checks length, magic, version and checksum before trusting any field, then
//!   every field against the others and against the disk, and the entry counts against the
//!   bytes present before allocating for them (a hostile file allocates nothing it does not
//!   hold): a corrupt file is an error naming the file and the problem, never misread.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::bitmap::valid_mask;
use super::heat::{heat_shift_for_blocks, remap_regions};
use super::persist_v1;
use super::{DirtyError, Tracker, TrackerSpec};
use crate::codec::{self, CodecError};
use crate::durable;
use crate::env::Clock;
use crate::name::NAME_MAX_BYTES;

/// First bytes of every tracker file.
pub const MAGIC: [u8; 8] = *b"FERRYTRK";
/// Format version this build writes.
pub const VERSION: u32 = 2;
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
}

/// The fields every version shares, checked against each other.
struct Header {
    state: FileState,
    lost: bool,
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
    let flags = if tracker.is_lost() { FLAG_LOST } else { 0 };
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
    if version != VERSION && version != persist_v1::VERSION {
        return Err(corrupt(format!(
            "unsupported version {version} (this build reads {} and {VERSION})",
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
    let header = decode_header(&mut reader).map_err(corrupt)?;
    let (words, heat) = if version == VERSION {
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
    })
}

/// A file that ends inside a field.
fn truncated(err: CodecError) -> String {
    format!("truncated: {err}")
}

/// Parses the checksummed fields after the version up to the name; the error is the problem.
fn decode_header(reader: &mut codec::Reader<'_>) -> Result<Header, String> {
    let state = match reader.u32_le().map_err(truncated)? {
        1 => FileState::Clean,
        2 => FileState::Active,
        other => return Err(format!("unknown state {other}")),
    };
    let flags = reader.u32_le().map_err(truncated)?;
    if flags & !FLAG_LOST != 0 {
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
    };
    // block_count against MAX_BLOCK_COUNT: the tracker's constructor, at load.
    spec.validate().map_err(|err| err.to_string())?;
    Ok(Header {
        state,
        lost: flags & FLAG_LOST != 0,
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

/// Fsyncs a directory so that renames and removals in it are durable.
fn sync_dir(dir: &Path) -> Result<(), DirtyError> {
    durable::sync_dir(dir).map_err(|source| DirtyError::Save {
        path: dir.to_owned(),
        source,
    })
}

/// What a directory entry is to us.
enum Entry {
    /// `<name>.tracker`.
    Tracker(String),
    /// A temp file a crashed save left.
    Temp,
    /// Anything else: left alone.
    Other,
}

/// Classifies a file name found in a tracker directory.
fn classify(file_name: &str) -> Entry {
    if file_name.ends_with(TEMP_SUFFIX) {
        Entry::Temp
    } else if let Some(name) = file_name.strip_suffix(".tracker") {
        Entry::Tracker(name.to_owned())
    } else {
        Entry::Other
    }
}

/// Lists the entries of `dir` (sorted, for a deterministic order); `None` if it is missing.
fn list_dir(dir: &Path) -> Result<Option<Vec<(PathBuf, Entry)>>, DirtyError> {
    let load_error = |source| DirtyError::Load {
        path: dir.to_owned(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(load_error(err)),
    };
    let mut listed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(load_error)?;
        let file_name = entry.file_name();
        let kind = file_name.to_str().map_or(Entry::Other, classify);
        listed.push((entry.path(), kind));
    }
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Some(listed))
}

/// Writes every tracker's file in `state`, removes temp files a crashed save left, then syncs
/// the directory. A missing `dir` is created when there is something to write. Files of other
/// trackers are left alone (one that failed to restore stays for inspection): removing a
/// tracker's file is [`remove_saved`]'s job.
pub(crate) fn save_all(
    dir: &Path,
    trackers: &[Arc<Tracker>],
    state: FileState,
) -> Result<(), DirtyError> {
    if trackers.is_empty() && !dir.exists() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|source| DirtyError::Save {
        path: dir.to_owned(),
        source,
    })?;
    for tracker in trackers {
        let bytes = encode(tracker, state);
        durable::write_atomic(&tracker_path(dir, tracker.name()), &bytes).map_err(|err| {
            let (path, source) = err.into_parts();
            DirtyError::Save { path, source }
        })?;
        tracker.record_save(bytes.len() as u64);
    }
    for (path, entry) in list_dir(dir)?.unwrap_or_default() {
        if let Entry::Temp = entry {
            log::info!("removing stale temp file {}", path.display());
            fs::remove_file(&path).map_err(|source| DirtyError::Save { path, source })?;
        }
    }
    sync_dir(dir)
}

/// Removes the file of tracker `name` under `dir` (after the tracker was removed from its
/// set), durably; returns whether there was one. Without this, a removed tracker whose file
/// was Active would come back, lost, at the next start.
pub fn remove_saved(dir: &Path, name: &str) -> Result<bool, DirtyError> {
    let path = tracker_path(dir, name);
    match fs::remove_file(&path) {
        Ok(()) => sync_dir(dir).map(|()| true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DirtyError::Save { path, source }),
    }
}

/// Loads every `<name>.tracker` under `dir` (none when `dir` is missing) into trackers for a
/// disk of `disk_bytes` bytes: Clean files as saved, Active files as lost.
pub(crate) fn load_all(
    dir: &Path,
    disk_bytes: u64,
    clock: &Arc<dyn Clock>,
) -> Result<Vec<Tracker>, DirtyError> {
    let mut trackers = Vec::new();
    for (path, entry) in list_dir(dir)?.unwrap_or_default() {
        let Entry::Tracker(file_name) = entry else {
            continue;
        };
        let bytes = fs::read(&path).map_err(|source| DirtyError::Load {
            path: path.clone(),
            source,
        })?;
        let saved = decode(&path, &bytes)?;
        if saved.spec.name != file_name {
            return Err(DirtyError::Corrupt {
                path,
                problem: format!("holds tracker {:?}", saved.spec.name),
            });
        }
        if saved.disk_bytes != disk_bytes {
            return Err(DirtyError::Mismatch {
                path,
                problem: format!(
                    "saved for {} bytes, disk has {disk_bytes}",
                    saved.disk_bytes
                ),
            });
        }
        let unclean = saved.state == FileState::Active;
        if unclean {
            log::warn!(
                "tracker {} was in use at an unclean stop: all blocks dirty",
                path.display()
            );
        }
        let tracker = Tracker::new(saved.spec, disk_bytes, Arc::clone(clock)).map_err(|err| {
            DirtyError::Corrupt {
                path: path.clone(),
                problem: err.to_string(),
            }
        })?;
        tracker.load_saved(&saved.words, &saved.heat, unclean || saved.lost);
        trackers.push(tracker);
    }
    Ok(trackers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::TrackerSet;
    use crate::env::ManualClock;

    const DISK_BYTES: u64 = 300 * 4096 + 512;

    fn clock() -> Arc<dyn Clock> {
        Arc::new(ManualClock::default())
    }

    /// A set with two trackers, some dirty blocks and some heat.
    fn sample_set() -> TrackerSet {
        let set = TrackerSet::new(DISK_BYTES, clock());
        set.add(TrackerSpec::new("fine").with_granularity_bytes(4096))
            .expect("add fine");
        set.add(TrackerSpec::new("coarse").with_half_life_ms(5000))
            .expect("add coarse");
        for _ in 0..5 {
            set.mark_range(3 * 4096, 4096);
        }
        set.mark_range(100 * 4096 + 7, 9000);
        set.mark_range(DISK_BYTES - 1, 1);
        set
    }

    /// Saves `sample_set` Clean into a fresh directory; returns it and the fine file's path.
    fn saved_sample() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        sample_set().save(dir.path()).expect("save");
        let path = tracker_path(dir.path(), "fine");
        (dir, path)
    }

    /// Restores `dir` and expects a Corrupt or Mismatch error naming `path`; returns its text.
    fn restore_error(dir: &Path, disk_bytes: u64, path: &Path) -> String {
        let err = TrackerSet::restore(dir, disk_bytes, clock()).expect_err("must be refused");
        assert!(
            matches!(
                err,
                DirtyError::Corrupt { .. } | DirtyError::Mismatch { .. }
            ),
            "{err}"
        );
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        text
    }

    #[test]
    fn round_trip_keeps_bits_heat_and_spec() {
        // Goal: a clean save restores the same trackers. Method: save, restore, compare.
        let dir = tempfile::tempdir().expect("tempdir");
        let original = sample_set();
        original.save(dir.path()).expect("save");
        let restored = TrackerSet::restore(dir.path(), DISK_BYTES, clock()).expect("restore");
        assert_eq!(restored.len(), 2);
        for before in original.list() {
            let after = restored.get(before.name()).expect("restored by name");
            assert_eq!(after.spec(), before.spec());
            assert!(!after.is_lost());
            assert_eq!(after.bitmap_set(), before.bitmap_set());
            assert_eq!(after.heat_regions(), before.heat_regions());
        }
        // Five writes to block 3 and one to blocks 100..=102, all in the first 1 MiB region.
        assert_eq!(restored.get("fine").expect("fine").heat(3), 6);
        assert_eq!(restored.get("fine").expect("fine").dirty_count(), 5);
    }

    #[test]
    fn restore_marks_files_active_and_an_unclean_stop_is_lost() {
        // Goal: after restore the files say Active; restoring again (no clean save in between,
        // as after a crash) gives lost trackers with every block dirty. Method: restore twice.
        let (dir, path) = saved_sample();
        let first = TrackerSet::restore(dir.path(), DISK_BYTES, clock()).expect("restore");
        let on_disk = decode(&path, &fs::read(&path).expect("read")).expect("decode");
        assert_eq!(on_disk.state, FileState::Active);
        drop(first);
        let second = TrackerSet::restore(dir.path(), DISK_BYTES, clock()).expect("restore");
        for tracker in second.list() {
            assert!(tracker.is_lost(), "{}", tracker.name());
            assert_eq!(tracker.dirty_count(), tracker.block_count());
            assert_eq!(tracker.heat_histogram().total(), tracker.block_count());
            assert_eq!(tracker.hot_set(1), Vec::<u64>::new());
        }
        // A clean save keeps them lost (and all dirty) until a caller clears the flag.
        second.get("coarse").expect("coarse").clear_lost();
        second.save(dir.path()).expect("save");
        let third = TrackerSet::restore(dir.path(), DISK_BYTES, clock()).expect("restore");
        let fine = third.get("fine").expect("fine");
        assert!(fine.is_lost());
        assert_eq!(fine.dirty_count(), fine.block_count());
        let coarse = third.get("coarse").expect("coarse");
        assert!(!coarse.is_lost());
        assert_eq!(coarse.dirty_count(), coarse.block_count());
    }

    #[test]
    fn truncated_or_empty_file_is_corrupt() {
        // Goal: a torn file is refused, naming the file. Method: truncate at many lengths.
        let (dir, path) = saved_sample();
        let bytes = fs::read(&path).expect("read");
        for len in [
            0,
            1,
            8,
            55,
            56,
            60,
            bytes.len() / 2,
            bytes.len() - 4,
            bytes.len() - 1,
        ] {
            fs::write(&path, &bytes[..len]).expect("write");
            let text = restore_error(dir.path(), DISK_BYTES, &path);
            assert!(
                text.contains("truncated") || text.contains("checksum"),
                "{len}: {text}"
            );
        }
        fs::write(&path, b"").expect("write");
        assert!(restore_error(dir.path(), DISK_BYTES, &path).contains("truncated: 0 bytes"));
    }

    #[test]
    fn any_single_bit_flip_is_detected() {
        // Goal: no one-bit corruption is misread. Method: flip each bit of the file in turn.
        let (dir, path) = saved_sample();
        let bytes = fs::read(&path).expect("read");
        for bit in 0..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&path, &flipped).is_err(), "bit {bit} went unnoticed");
        }
        let mut flipped = bytes;
        flipped[100] ^= 0x10;
        fs::write(&path, &flipped).expect("write");
        restore_error(dir.path(), DISK_BYTES, &path);
    }

    #[test]
    fn wrong_magic_or_version_is_refused() {
        // Goal: another format is never read as ours. Method: rewrite version (with a valid
        // checksum) and magic.
        let (dir, path) = saved_sample();
        let bytes = fs::read(&path).expect("read");
        let mut newer = bytes.clone();
        newer[8..12].copy_from_slice(&3u32.to_le_bytes());
        let body_len = newer.len() - 4;
        let checksum = crc32c::crc32c(&newer[..body_len]);
        newer[body_len..].copy_from_slice(&checksum.to_le_bytes());
        fs::write(&path, &newer).expect("write");
        let text = restore_error(dir.path(), DISK_BYTES, &path);
        assert!(text.contains("unsupported version 3"), "{text}");
        let mut alien = bytes;
        alien[..8].copy_from_slice(b"NOTOURS!");
        fs::write(&path, &alien).expect("write");
        assert!(restore_error(dir.path(), DISK_BYTES, &path).contains("bad magic"));
    }

    #[test]
    fn disk_size_change_is_a_mismatch() {
        // Goal: a file saved for another disk size is refused, not stretched. Method: restore
        // with a disk one block larger, and one byte smaller (same block count).
        let (dir, _fine) = saved_sample();
        // Files load in name order: "coarse" is refused first.
        let path = tracker_path(dir.path(), "coarse");
        let text = restore_error(dir.path(), DISK_BYTES + 4096, &path);
        assert!(text.contains("does not match the disk"), "{text}");
        restore_error(dir.path(), DISK_BYTES - 1, &path);
    }

    #[test]
    fn file_holding_another_name_is_corrupt() {
        // Goal: a renamed file is not loaded under the wrong name. Method: rename, restore.
        let (dir, path) = saved_sample();
        let renamed = tracker_path(dir.path(), "other");
        fs::rename(&path, &renamed).expect("rename");
        let text = restore_error(dir.path(), DISK_BYTES, &renamed);
        assert!(text.contains("holds tracker \"fine\""), "{text}");
    }

    #[test]
    fn save_removes_temp_files_and_missing_dir_is_empty() {
        // Goal: torn temp files are removed, other files kept until remove_saved. Method: remove
        // one tracker, leave a temp file, save, list, remove_saved; restore a missing dir.
        let dir = tempfile::tempdir().expect("tempdir");
        let set = sample_set();
        set.save(dir.path()).expect("save");
        set.remove("coarse").expect("remove");
        fs::write(dir.path().join("fine.tracker.tmp"), b"torn").expect("write");
        fs::write(dir.path().join("README"), b"not ours").expect("write");
        set.save(dir.path()).expect("save");
        let names = || {
            let mut names: Vec<String> = fs::read_dir(dir.path())
                .expect("read_dir")
                .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
                .collect();
            names.sort();
            names
        };
        assert_eq!(names(), vec!["README", "coarse.tracker", "fine.tracker"]);
        assert!(remove_saved(dir.path(), "coarse").expect("remove_saved"));
        assert!(!remove_saved(dir.path(), "coarse").expect("remove_saved again"));
        assert_eq!(names(), vec!["README", "fine.tracker"]);
        let missing = dir.path().join("missing");
        let empty = TrackerSet::restore(&missing, DISK_BYTES, clock()).expect("restore");
        assert!(empty.is_empty());
        assert!(!missing.exists());
    }

    #[test]
    fn save_active_then_crash_restores_lost() {
        // Goal: a tracker added at run time and recorded with save_active comes back lost
        // after a crash. Method: add, save_active, drop without a clean save, restore.
        let dir = tempfile::tempdir().expect("tempdir");
        let set = TrackerSet::new(DISK_BYTES, clock());
        set.add(TrackerSpec::new("late")).expect("add");
        set.save_active(dir.path()).expect("save_active");
        drop(set);
        let restored = TrackerSet::restore(dir.path(), DISK_BYTES, clock()).expect("restore");
        assert!(restored.get("late").expect("late").is_lost());
    }

    /// Rewrites the trailing checksum after an edit, so decode reaches the field checks.
    fn reseal(bytes: &mut [u8]) {
        let body_len = bytes.len() - 4;
        let checksum = crc32c::crc32c(&bytes[..body_len]);
        bytes[body_len..].copy_from_slice(&checksum.to_le_bytes());
    }

    #[test]
    fn a_sparse_huge_tracker_saves_small_and_round_trips() {
        // Goal: file size and work follow the dirty data, not the disk. Method: a 64 TiB disk
        // at 64 KiB (2^30 blocks) with 3 dirty blocks; save, check the size, restore, compare;
        // the Active rewrite holds no entries.
        let disk_bytes = 64 << 40;
        let dir = tempfile::tempdir().expect("tempdir");
        let set = TrackerSet::new(disk_bytes, clock());
        set.add(TrackerSpec::new("big")).expect("add");
        for offset_bytes in [0, 1 << 40, disk_bytes - 4096] {
            set.mark_range(offset_bytes, 4096);
        }
        set.save(dir.path()).expect("save");
        let path = tracker_path(dir.path(), "big");
        let bytes = fs::read(&path).expect("read");
        assert!(bytes.len() < 200, "{} bytes", bytes.len());
        let before = set.get("big").expect("big");
        assert_eq!(
            before.state_bytes(),
            bytes.len() as u64,
            "size of the last save"
        );
        let restored = TrackerSet::restore(dir.path(), disk_bytes, clock()).expect("restore");
        let big = restored.get("big").expect("big");
        assert_eq!(big.bitmap_set(), before.bitmap_set());
        assert_eq!(big.heat_regions(), before.heat_regions());
        assert!(
            big.allocated_bytes() < 64 << 10,
            "{}",
            big.allocated_bytes()
        );
        let active_bytes = fs::read(&path).expect("read");
        assert_eq!(
            big.state_bytes(),
            active_bytes.len() as u64,
            "the Active rewrite"
        );
        let active = decode(&path, &active_bytes).expect("decode");
        assert_eq!(active.state, FileState::Active);
        assert!(active.words.is_empty() && active.heat.is_empty());
    }

    #[test]
    fn hostile_counts_and_entries_are_refused_before_allocating() {
        // Goal: a file with a valid checksum but lying counts or entries is refused, never
        // misread and never allocating from a count. Method: edit W, H and entries, reseal.
        let (_dir, path) = saved_sample();
        let bytes = fs::read(&path).expect("read");
        let saved = decode(&path, &bytes).expect("decode");
        assert!(saved.words.len() >= 2, "{saved:?}");
        let counts_at = FIXED_HEADER_BYTES + "fine".len() + 4;
        let entries_at = counts_at + 16;
        let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
        let mut huge = bytes.clone();
        huge[counts_at..counts_at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        cases.push((huge, "imply"));
        let mut swapped = bytes.clone();
        let (first, second) = (entries_at, entries_at + 16);
        let first_entry = swapped[first..first + 16].to_vec();
        swapped.copy_within(second..second + 16, first);
        swapped[second..second + 16].copy_from_slice(&first_entry);
        cases.push((swapped, "out of order"));
        let mut zero = bytes.clone();
        zero[entries_at + 8..entries_at + 16].fill(0);
        cases.push((zero, "zero"));
        let mut past = bytes.clone();
        past[entries_at..entries_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        cases.push((past, "past"));
        let mut shift = bytes;
        shift[counts_at - 4] = 64;
        cases.push((shift, "heat shift"));
        for (mut bytes, problem) in cases {
            reseal(&mut bytes);
            let err = decode(&path, &bytes).expect_err(problem);
            assert!(err.to_string().contains(problem), "{problem}: {err}");
        }
    }

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
        out.extend_from_slice(&persist_v1::VERSION.to_le_bytes());
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
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(tracker_path(dir.path(), "v1"), &bytes).expect("write");
        let restored = TrackerSet::restore(dir.path(), disk_bytes, clock()).expect("restore v1");
        let tracker = restored.get("v1").expect("v1");
        let blocks: Vec<u64> = tracker.bitmap_set().iter_blocks().collect();
        assert_eq!(blocks, vec![0, 2, 599]);
        assert_eq!((tracker.heat(3), tracker.heat(599)), (9, 2));
        // The rewrite at restore is version 2.
        let rewritten = fs::read(tracker_path(dir.path(), "v1")).expect("read");
        assert_eq!(rewritten[8..12], VERSION.to_le_bytes());
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
