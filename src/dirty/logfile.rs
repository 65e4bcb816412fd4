//! The activity log's file: records of which extents a durable tracker holds open, replayed
//! after an unclean stop.
//!
//! One file per durable tracker, `<dir>/<name>.log`, beside its `<name>.tracker`. Layout,
//! little-endian: a header, then records appended by the running agent.
//!
//! | bytes | header field |
//! | --- | --- |
//! | 8 | magic `FERRYALG` |
//! | 4 | version (1) |
//! | 8 | granularity_bytes |
//! | 8 | disk_bytes |
//! | 8 | extent_blocks (a multiple of 64: an extent is whole bitmap words) |
//! | 4 | crc32c of the bytes above |
//!
//! Each record is `len: u32, kind: u8, payload (len bytes), crc32c(len, kind, payload): u32`:
//!
//! | kind | payload | replay |
//! | --- | --- | --- |
//! | 1 open | extents (u64 each) | the extents may be written from now on |
//! | 2 close | extent (u64), then (word, bits) pairs (u64, u64) inside it | the extent's bits are exactly these; it is closed |
//! | 3 merge | runs (first block u64, block count u64) | these blocks are dirty |
//!
//! Replay starts from nothing; at the end every extent still open is marked dirty whole. So
//! the recovered set is the last checkpoint (merge records of a compaction, close records)
//! plus every extent the log held open: a superset of every write admitted since the log was
//! created, over-marking at most the open extents.
//!
//! Invariants:
//! - A compaction writes a whole new file (header, merge records of every durable bit, one
//!   open record of the open extents) with [`durable::write_atomic`]: a crash leaves the old
//!   log or the new one. Appends go to the end and are fdatasynced before anyone relies on
//!   them, so only the last append can be torn; replay stops at the first record that is
//!   short or fails its checksum, and refuses the file when more than [`MAX_APPEND_BYTES`]
//!   follow it (that is damage in the middle, not a torn tail).
//! - Hostile input: the header is checked (magic, version, checksum, geometry equal to the
//!   tracker's) before any record is read; a record longer than [`MAX_RECORD_BYTES`] is
//!   refused before it is allocated; every extent, word and run is checked against the
//!   geometry. A bad file is an error naming it, never misread.

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::set::{valid_mask, DirtySet, WORD_BITS};
use crate::codec;
use crate::durable;

/// First bytes of every log file.
pub const MAGIC: [u8; 8] = *b"FERRYALG";
/// Format version this build writes and reads.
pub const VERSION: u32 = 1;
/// File name suffix of log files.
pub const EXTENSION: &str = "log";
/// Bytes of the header, checksum included.
const HEADER_BYTES: usize = 8 + 4 + 3 * 8 + 4;
/// Longest record payload: 1 MiB (65,536 runs or extents).
pub const MAX_RECORD_BYTES: usize = 1 << 20;
/// Most bytes one append writes; longer appends are written as a compaction instead. Also
/// the most bytes replay accepts after a bad record as a torn tail.
pub const MAX_APPEND_BYTES: usize = 16 << 20;
/// A log is compacted once it exceeds this many bytes and four times its last compaction.
const COMPACT_MIN_BYTES: u64 = 1 << 20;
/// Space reserved past the end at a time (`fallocate` keeping the size): small synced appends
/// then fill one extent instead of scattering blocks, which made removing hundreds of logs
/// (every free a discard on this kind of disk) a visible part of a clean stop.
const RESERVE_BYTES: u64 = 256 << 10;

const KIND_OPEN: u8 = 1;
const KIND_CLOSE: u8 = 2;
const KIND_MERGE: u8 = 3;

/// What a log describes: the tracker's blocks and the extent size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes per block.
    pub granularity_bytes: u64,
    /// Bytes of the disk.
    pub disk_bytes: u64,
    /// Blocks per extent, a multiple of [`WORD_BITS`].
    pub extent_blocks: u64,
}

impl Geometry {
    /// Blocks of the disk.
    pub fn block_count(&self) -> u64 {
        self.disk_bytes.div_ceil(self.granularity_bytes)
    }

    /// Extents of the disk.
    pub fn extent_count(&self) -> u64 {
        self.block_count().div_ceil(self.extent_blocks)
    }

    /// Bitmap words per extent.
    pub fn extent_words(&self) -> u64 {
        self.extent_blocks / WORD_BITS
    }

    /// Bytes of disk extent `extent` covers (the last one may be short).
    pub fn extent_disk_bytes(&self, extent: u64) -> u64 {
        let extent_bytes = self.extent_blocks * self.granularity_bytes;
        let start = extent * extent_bytes;
        (start + extent_bytes).min(self.disk_bytes) - start
    }
}

/// Errors reading or writing a log file.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Reading, writing or syncing failed.
    #[error("activity log {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file is not a log of this tracker, or is damaged beyond a torn tail.
    #[error("activity log {} is unusable: {problem}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// The path of tracker `name`'s log under `dir`.
pub fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.{EXTENSION}"))
}

/// Encodes one record into `out`.
fn push_record(out: &mut Vec<u8>, kind: u8, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_RECORD_BYTES);
    let start = out.len();
    let len = u32::try_from(payload.len()).expect("records are at most 1 MiB");
    out.extend_from_slice(&len.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(payload);
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Open records for `extents`, split to fit [`MAX_RECORD_BYTES`].
pub fn encode_open(out: &mut Vec<u8>, extents: &[u64]) {
    for part in extents.chunks(MAX_RECORD_BYTES / 8) {
        let payload: Vec<u8> = part.iter().flat_map(|e| e.to_le_bytes()).collect();
        push_record(out, KIND_OPEN, &payload);
    }
}

/// A close record for `extent` holding `words` (nonzero `(word, bits)` inside it).
pub fn encode_close(out: &mut Vec<u8>, extent: u64, words: &[(u64, u64)]) {
    let mut payload = Vec::with_capacity(8 + words.len() * 16);
    payload.extend_from_slice(&extent.to_le_bytes());
    for &(word, bits) in words {
        payload.extend_from_slice(&word.to_le_bytes());
        payload.extend_from_slice(&bits.to_le_bytes());
    }
    push_record(out, KIND_CLOSE, &payload);
}

/// Merge records for every run of `set`, split to fit [`MAX_RECORD_BYTES`].
pub fn encode_merge(out: &mut Vec<u8>, set: &DirtySet) {
    let mut payload = Vec::new();
    for (first, end) in set.iter_runs() {
        let count = end - first;
        if payload.len() + 16 > MAX_RECORD_BYTES {
            push_record(out, KIND_MERGE, &std::mem::take(&mut payload));
        }
        payload.extend_from_slice(&first.to_le_bytes());
        payload.extend_from_slice(&count.to_le_bytes());
    }
    if !payload.is_empty() {
        push_record(out, KIND_MERGE, &payload);
    }
}

/// The header for `geometry`.
pub fn encode_header(geometry: &Geometry) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    for field in [
        geometry.granularity_bytes,
        geometry.disk_bytes,
        geometry.extent_blocks,
    ] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// An open log, appended to by the running tracker.
#[derive(Debug)]
pub struct LogFile {
    path: PathBuf,
    file: File,
    /// Bytes in the file now.
    len_bytes: u64,
    /// Bytes right after the last compaction.
    base_bytes: u64,
    /// End of the space reserved for appends.
    reserved_bytes: u64,
}

impl LogFile {
    /// Writes a new log at `path` holding `set` as merge records and `open` as open extents,
    /// atomically (replacing any file there), and opens it for appending.
    pub fn create(
        path: &Path,
        geometry: &Geometry,
        set: &DirtySet,
        open: &[u64],
    ) -> Result<LogFile, LogError> {
        let io_error = |source| LogError::Io {
            path: path.to_owned(),
            source,
        };
        let mut bytes = encode_header(geometry);
        encode_merge(&mut bytes, set);
        encode_open(&mut bytes, open);
        durable::write_atomic(path, &bytes).map_err(|err| {
            let (path, source) = err.into_parts();
            LogError::Io { path, source }
        })?;
        // O_NOFOLLOW: the name was just renamed into place by us; never follow a planted link.
        let file = OpenOptions::new()
            .append(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(io_error)?;
        let mut log = LogFile {
            path: path.to_owned(),
            file,
            len_bytes: bytes.len() as u64,
            base_bytes: bytes.len() as u64,
            reserved_bytes: bytes.len() as u64,
        };
        log.reserve(log.len_bytes + 1);
        Ok(log)
    }

    /// Reserves space up to at least `end_bytes` (growing by half the file, at least
    /// [`RESERVE_BYTES`]). Best effort: a file system without `fallocate` just allocates as
    /// it is written.
    fn reserve(&mut self, end_bytes: u64) {
        if end_bytes <= self.reserved_bytes {
            return;
        }
        let step = RESERVE_BYTES.max(self.reserved_bytes / 2);
        let new_end = end_bytes.max(self.reserved_bytes + step);
        let (Ok(offset), Ok(len)) = (
            i64::try_from(self.reserved_bytes),
            i64::try_from(new_end - self.reserved_bytes),
        ) else {
            return;
        };
        let flags = nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match nix::fcntl::fallocate(self.file.as_raw_fd(), flags, offset, len) {
            Ok(()) => self.reserved_bytes = new_end,
            Err(err) => {
                log::debug!("{}: no space reserved: {err}", self.path.display());
                // Not again for every append.
                self.reserved_bytes = new_end;
            }
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes in the file now.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }

    /// Appends encoded records and fdatasyncs; they are durable when this returns.
    pub fn append(&mut self, records: &[u8]) -> Result<(), LogError> {
        if records.is_empty() {
            return Ok(());
        }
        self.reserve(self.len_bytes + records.len() as u64);
        let result = self
            .file
            .write_all(records)
            .and_then(|()| self.file.sync_data());
        result.map_err(|source| LogError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.len_bytes += records.len() as u64;
        Ok(())
    }

    /// Whether the log has grown enough that a compaction pays.
    pub fn wants_compaction(&self) -> bool {
        self.len_bytes > COMPACT_MIN_BYTES.max(4 * self.base_bytes)
    }
}

/// What replaying a log gave.
#[derive(Debug)]
pub struct Replayed {
    /// Every block the log says may differ since it was created.
    pub set: DirtySet,
    /// Extents still open at the end (marked dirty whole in `set`).
    pub open_extents: u64,
    /// Bytes of disk those extents cover: the most the replay over-marks.
    pub bound_bytes: u64,
    /// Bytes of a torn tail ignored (0 when the log ended on a record boundary).
    pub torn_bytes: u64,
}

/// Replays the log at `path` for a tracker of `geometry`; see the module docs.
pub fn replay(path: &Path, geometry: &Geometry) -> Result<Replayed, LogError> {
    let io_error = |source| LogError::Io {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(io_error)?;
    let file_bytes = file.metadata().map_err(io_error)?.len();
    replay_from(BufReader::new(file), file_bytes, geometry, path)
}

/// [`replay`] of a log's bytes already in memory (`path` names it in errors).
pub fn replay_bytes(bytes: &[u8], geometry: &Geometry, path: &Path) -> Result<Replayed, LogError> {
    replay_from(bytes, bytes.len() as u64, geometry, path)
}

/// The log of `file_bytes` bytes read from `reader`; see [`replay`].
fn replay_from(
    mut reader: impl Read,
    file_bytes: u64,
    geometry: &Geometry,
    path: &Path,
) -> Result<Replayed, LogError> {
    let corrupt = |problem: String| LogError::Corrupt {
        path: path.to_owned(),
        problem,
    };
    let io_error = |source| LogError::Io {
        path: path.to_owned(),
        source,
    };
    let mut header = [0u8; HEADER_BYTES];
    reader
        .read_exact(&mut header)
        .map_err(|_| corrupt("shorter than its header".to_owned()))?;
    if header != encode_header(geometry)[..] {
        return Err(corrupt(
            "bad magic, version, checksum or geometry (not this tracker's log)".to_owned(),
        ));
    }
    let mut state = ReplayState::new(geometry);
    let mut offset = HEADER_BYTES as u64;
    while offset < file_bytes {
        match read_record(&mut reader).map_err(io_error)? {
            Some((kind, payload)) => {
                state
                    .apply(kind, &payload)
                    .map_err(|problem| corrupt(format!("record at byte {offset}: {problem}")))?;
                offset += 9 + payload.len() as u64;
            }
            None => break,
        }
    }
    let torn_bytes = file_bytes - offset;
    if torn_bytes > MAX_APPEND_BYTES as u64 {
        return Err(corrupt(format!(
            "bad record at byte {offset} with {torn_bytes} bytes after it: damaged, not torn"
        )));
    }
    Ok(state.finish(torn_bytes))
}

/// Reads one record; `None` when it is short, too long or fails its checksum (a torn tail,
/// or damage: the caller tells them apart by what follows).
fn read_record(reader: &mut impl Read) -> io::Result<Option<(u8, Vec<u8>)>> {
    let mut head = [0u8; 5];
    if !read_full(reader, &mut head)? {
        return Ok(None);
    }
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    if len > MAX_RECORD_BYTES {
        return Ok(None);
    }
    let mut payload = vec![0u8; len];
    let mut crc = [0u8; 4];
    if !read_full(reader, &mut payload)? || !read_full(reader, &mut crc)? {
        return Ok(None);
    }
    let mut computed = crc32c::crc32c(&head);
    computed = crc32c::crc32c_append(computed, &payload);
    if computed != u32::from_le_bytes(crc) {
        return Ok(None);
    }
    Ok(Some((head[4], payload)))
}

/// Fills `buf`; false when the input ends first.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match reader.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(err) => Err(err),
    }
}

/// The set and open extents while records are applied.
struct ReplayState<'g> {
    geometry: &'g Geometry,
    set: DirtySet,
    open: std::collections::BTreeSet<u64>,
}

impl<'g> ReplayState<'g> {
    fn new(geometry: &'g Geometry) -> Self {
        Self {
            geometry,
            set: DirtySet::empty(geometry.granularity_bytes, geometry.disk_bytes),
            open: std::collections::BTreeSet::new(),
        }
    }

    /// Applies one record; the error says what in it is invalid.
    fn apply(&mut self, kind: u8, payload: &[u8]) -> Result<(), String> {
        let mut reader = codec::Reader::new(payload);
        let short = |err: codec::CodecError| format!("truncated: {err}");
        match kind {
            KIND_OPEN => {
                while reader.remaining() > 0 {
                    let extent = reader.u64_le().map_err(short)?;
                    self.check_extent(extent)?;
                    self.open.insert(extent);
                }
            }
            KIND_CLOSE => {
                let extent = reader.u64_le().map_err(short)?;
                self.check_extent(extent)?;
                let words = self.geometry.extent_words();
                let first_word = extent * words;
                let end_word = (first_word + words).min(self.set.word_count());
                let mut bits_in = Vec::new();
                while reader.remaining() > 0 {
                    let word = reader.u64_le().map_err(short)?;
                    let bits = reader.u64_le().map_err(short)?;
                    if !(first_word..end_word).contains(&word)
                        || bits & !valid_mask(word, self.set.block_count()) != 0
                    {
                        return Err(format!("word {word} outside extent {extent}"));
                    }
                    bits_in.push((word, bits));
                }
                self.set.replace_words(first_word, end_word, &bits_in);
                self.open.remove(&extent);
            }
            KIND_MERGE => {
                while reader.remaining() > 0 {
                    let first = reader.u64_le().map_err(short)?;
                    let count = reader.u64_le().map_err(short)?;
                    let end = first
                        .checked_add(count)
                        .filter(|&end| end <= self.set.block_count());
                    let Some(end) = end else {
                        return Err(format!("run {first}+{count} past the disk"));
                    };
                    self.set.insert_range(first, end);
                }
            }
            other => return Err(format!("unknown record kind {other}")),
        }
        Ok(())
    }

    fn check_extent(&self, extent: u64) -> Result<(), String> {
        if extent >= self.geometry.extent_count() {
            return Err(format!(
                "extent {extent} past the disk's {}",
                self.geometry.extent_count()
            ));
        }
        Ok(())
    }

    /// Marks every open extent dirty whole.
    fn finish(mut self, torn_bytes: u64) -> Replayed {
        let block_count = self.set.block_count();
        let mut bound_bytes = 0;
        for &extent in &self.open {
            let first = extent * self.geometry.extent_blocks;
            let end = (first + self.geometry.extent_blocks).min(block_count);
            self.set.insert_range(first, end);
            bound_bytes += self.geometry.extent_disk_bytes(extent);
        }
        Replayed {
            set: self.set,
            open_extents: self.open.len() as u64,
            bound_bytes,
            torn_bytes,
        }
    }
}

#[cfg(test)]
mod tests;
