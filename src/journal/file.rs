//! The journal file: a header, then one checksummed frame per record, appended and synced.
//!
//! Layout, little-endian. File header (16 bytes, the same in every version):
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic `FERRYJNL` |
//! | 4 | version (1) |
//! | 4 | crc32c of the 12 bytes before |
//!
//! Then frames, back to back, until the end of the file:
//!
//! | bytes | field |
//! | --- | --- |
//! | 4 | `body_bytes`, at most [`MAX_BODY_BYTES`] |
//! | 8 | sequence number |
//! | 4 | header crc32c: of the 12 bytes before |
//! | `body_bytes` | the record (`record.rs`) |
//! | 4 | frame crc32c: of every byte of the frame before it |
//!
//! The header crc makes the length trustworthy before the body is read, so a damaged length
//! never makes replay skip valid frames; the frame crc comes last, so a torn append fails it.
//!
//! Replay, frame by frame from offset 16 (see the invariants in [`crate::journal`]):
//! - valid frame: its sequence number must exceed the previous one, and its body must decode;
//!   otherwise the file is corrupt there (a checksummed frame is what was written).
//! - fewer than 16 bytes left, or a valid header whose frame runs past the end of the file,
//!   or a bad frame crc on a frame that ends exactly at the end of the file: a torn (or
//!   damaged) last append, dropped: the file is cut back to the last good frame.
//! - bad frame crc with bytes after the frame: corrupt at that frame.
//! - bad header crc: the length is unknown, so the rest of the file is searched for a valid
//!   frame. One found means damage in the middle (corrupt at the bad header); none means the
//!   last append was torn inside its header, dropped.
//!
//! A new journal (missing file, empty file, or what a crash during creation leaves: a prefix
//! of the header, or up to 16 zero bytes) gets its header written and synced, and its
//! directory synced.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ferry_sys::OfdLock;

use super::fold::{self, JobKey, JobViews, Side, TargetPhase};
use super::record::{Entry, Record};
use super::JournalError;
use crate::dirty::MAX_BLOCK_COUNT;
use crate::durable::{self, temp_path};

/// First bytes of every journal.
pub const MAGIC: [u8; 8] = *b"FERRYJNL";
/// Format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of the file header.
pub const FILE_HEADER_BYTES: usize = 16;
/// Bytes of a frame before its body.
const FRAME_HEADER_BYTES: usize = 16;
/// Bytes of a frame after its body.
const FRAME_TRAILER_BYTES: usize = 4;
/// Largest record body: room for the raw bitmap of the largest tracker (1 bit per block).
pub const MAX_BODY_BYTES: usize = 1 << 30;
const _: () = assert!(MAX_BLOCK_COUNT / 8 + 4096 <= MAX_BODY_BYTES as u64);

/// What [`Journal::open`] (or [`Journal::inspect`]) found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replay {
    /// Every record, in file order.
    pub entries: Vec<Entry>,
    /// Bytes of a torn or damaged last frame that were cut off (0 for a clean file).
    pub dropped_tail_bytes: u64,
    /// Length of the file up to the last good frame: where the next append goes.
    pub end_offset_bytes: u64,
    /// The file had no complete header (missing, empty, or torn at creation): `open` wrote
    /// one (and `end_offset_bytes` counts it); `inspect` leaves the file alone.
    pub created: bool,
}

/// An open journal, positioned for appending. Appends take `&mut self`: an agent shares its
/// journal behind a mutex, so records are totally ordered.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// The open, locked file. Replaced by compaction.
    lock: OfdLock,
    /// Where the next frame goes.
    end_offset_bytes: u64,
    next_seq: u64,
    jobs: JobViews,
    /// An append or compaction failed: the file's state is unknown until reopened.
    broken: bool,
    /// Frame buffer, reused.
    frame: Vec<u8>,
}

/// How many records a compaction removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compaction {
    /// Records dropped (superseded checkpoints).
    pub dropped_records: u64,
    /// File length before.
    pub before_bytes: u64,
    /// File length after.
    pub after_bytes: u64,
}

impl Journal {
    /// Opens (creating if missing) the journal at `path`, whose directory must exist, locks
    /// it against other processes, replays it and cuts off a torn tail. Returns the journal,
    /// ready to append, and what the replay found.
    pub fn open(path: &Path) -> Result<(Journal, Replay), JournalError> {
        let lock = OfdLock::acquire(path).map_err(|source| JournalError::Open {
            path: path.to_owned(),
            source,
        })?;
        let bytes = read_all(lock.file()).map_err(|source| JournalError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut replay = scan(path, &bytes)?;
        let jobs = fold_entries(path, &replay.entries)?;
        if replay.created {
            create_header(path, lock.file())?;
            replay.end_offset_bytes = FILE_HEADER_BYTES as u64;
        } else if replay.dropped_tail_bytes > 0 {
            log::warn!(
                "journal {}: dropping {} bytes of a torn last record at offset {}",
                path.display(),
                replay.dropped_tail_bytes,
                replay.end_offset_bytes
            );
            let truncate_error = |source| JournalError::Truncate {
                path: path.to_owned(),
                offset_bytes: replay.end_offset_bytes,
                source,
            };
            let file = lock.file();
            file.set_len(replay.end_offset_bytes)
                .map_err(truncate_error)?;
            file.sync_all().map_err(truncate_error)?;
        }
        remove_stale_temp(path);
        let journal = Journal {
            path: path.to_owned(),
            lock,
            end_offset_bytes: replay.end_offset_bytes,
            next_seq: replay.entries.last().map_or(1, |entry| entry.seq + 1),
            jobs,
            broken: false,
            frame: Vec::new(),
        };
        Ok((journal, replay))
    }

    /// Reads the journal at `path` without locking or changing it (a torn tail is reported,
    /// not cut off), for `ferry status` and debugging. Fold the entries to see the jobs.
    pub fn inspect(path: &Path) -> Result<Replay, JournalError> {
        let bytes = std::fs::read(path).map_err(|source| JournalError::Read {
            path: path.to_owned(),
            source,
        })?;
        scan(path, &bytes)
    }

    /// Replays and folds a journal's bytes held in memory, as `open` does a file's, without
    /// touching any file: what the fuzz target drives (every byte of it is hostile there).
    pub fn replay_bytes(bytes: &[u8]) -> Result<(Replay, JobViews), JournalError> {
        let path = Path::new("<memory>");
        let replay = scan(path, bytes)?;
        let jobs = fold_entries(path, &replay.entries)?;
        Ok((replay, jobs))
    }

    /// Appends `record`, durably: it returns only after the record is synced, and the
    /// caller may then let the change it announces take effect. Returns the record's
    /// sequence number. A record the state machine refuses is not written.
    pub fn append(&mut self, record: &Record) -> Result<u64, JournalError> {
        if self.broken {
            return Err(JournalError::Broken {
                path: self.path.clone(),
            });
        }
        let seq = self.next_seq;
        fold::check(&self.jobs, seq, record)?;
        self.frame.clear();
        encode_frame(seq, record, &mut self.frame)?;
        let offset_bytes = self.end_offset_bytes;
        let file = self.lock.file();
        let written = file
            .write_all_at(&self.frame, offset_bytes)
            .and_then(|()| file.sync_data());
        if let Err(source) = written {
            self.broken = true;
            // Cut the frame off again, so the failed record is surely absent; if that fails
            // too, only the next replay knows.
            let rolled_back = file
                .set_len(offset_bytes)
                .and_then(|()| file.sync_all())
                .is_ok();
            return Err(JournalError::Append {
                path: self.path.clone(),
                offset_bytes,
                rolled_back,
                source,
            });
        }
        self.end_offset_bytes += self.frame.len() as u64;
        self.next_seq += 1;
        fold::apply(&mut self.jobs, seq, record).expect("checked before the write");
        Ok(seq)
    }

    /// Every job, as the records so far leave it.
    pub fn jobs(&self) -> &JobViews {
        &self.jobs
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Length of the file.
    pub fn len_bytes(&self) -> u64 {
        self.end_offset_bytes
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Rewrites the file without superseded checkpoints (a `TargetReceived` followed by
    /// another for its job, or of a job that is over), atomically: a crash leaves the old
    /// file or the new one. Records keep their sequence numbers; the fold is unchanged.
    pub fn compact(&mut self) -> Result<Compaction, JournalError> {
        if self.broken {
            return Err(JournalError::Broken {
                path: self.path.clone(),
            });
        }
        let bytes = read_all(self.lock.file()).map_err(|source| JournalError::Read {
            path: self.path.clone(),
            source,
        })?;
        let replay = scan(&self.path, &bytes)?;
        assert_eq!(
            replay.end_offset_bytes, self.end_offset_bytes,
            "no torn tail"
        );
        let kept = self.kept_entries(&replay.entries);
        let mut out = file_header().to_vec();
        for entry in &kept {
            let start = usize::try_from(entry.offset_bytes).expect("file is in memory");
            let end = start + usize::try_from(entry.frame_bytes).expect("file is in memory");
            out.extend_from_slice(&bytes[start..end]);
        }
        // Pair assertion: the new file replays to the same jobs and the same next number.
        let rewritten = scan(&self.path, &out).expect("a rewrite replays");
        assert_eq!(rewritten.dropped_tail_bytes, 0);
        assert_eq!(
            fold::fold(&rewritten.entries).expect("a rewrite folds"),
            self.jobs
        );
        assert_eq!(
            rewritten.entries.last().map_or(1, |entry| entry.seq + 1),
            self.next_seq
        );
        let lock = self.replace_file(&out)?;
        self.lock = lock;
        self.end_offset_bytes = out.len() as u64;
        durable::sync_parent(&self.path).map_err(|source| {
            // The rename may not be durable: appends to the new file might vanish.
            self.broken = true;
            JournalError::Compact {
                path: self.path.clone(),
                source,
            }
        })?;
        Ok(Compaction {
            dropped_records: (replay.entries.len() - kept.len()) as u64,
            before_bytes: bytes.len() as u64,
            after_bytes: out.len() as u64,
        })
    }

    /// The entries a compaction keeps: all but superseded checkpoints.
    fn kept_entries<'a>(&self, entries: &'a [Entry]) -> Vec<&'a Entry> {
        let mut latest_checkpoint = std::collections::BTreeMap::new();
        for entry in entries {
            if let Record::TargetReceived { .. } = entry.record {
                latest_checkpoint.insert(JobKey::of(&entry.record), entry.seq);
            }
        }
        entries
            .iter()
            .filter(|entry| {
                let Record::TargetReceived { .. } = entry.record else {
                    return true;
                };
                let key = JobKey::of(&entry.record);
                let receiving = matches!(
                    self.jobs.get(&key).map(|view| &view.side),
                    Some(Side::Target(target)) if target.phase == TargetPhase::Receiving
                );
                receiving && latest_checkpoint.get(&key) == Some(&entry.seq)
            })
            .collect()
    }

    /// Writes `bytes` to the temp file, syncs it and renames it over the journal; returns
    /// the lock on the new file. The caller syncs the directory.
    fn replace_file(&self, bytes: &[u8]) -> Result<OfdLock, JournalError> {
        let temp_path = temp_path(&self.path);
        let compact_error = |path: &Path| {
            let path = path.to_owned();
            move |source| JournalError::Compact { path, source }
        };
        // Never open through an entry already there (a planted symlink would redirect the
        // write): unlink it, then `acquire` creates the file afresh, mode 0600.
        remove_stale_temp(&self.path);
        let lock = OfdLock::acquire(&temp_path).map_err(compact_error(&temp_path))?;
        let file = lock.file();
        file.set_len(0)
            .and_then(|()| file.write_all_at(bytes, 0))
            .and_then(|()| file.sync_all())
            .map_err(compact_error(&temp_path))?;
        std::fs::rename(&temp_path, &self.path).map_err(compact_error(&self.path))?;
        Ok(lock)
    }
}

/// The 16-byte file header of this version.
fn file_header() -> [u8; FILE_HEADER_BYTES] {
    let mut header = [0u8; FILE_HEADER_BYTES];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    let checksum = crc32c::crc32c(&header[..12]);
    header[12..].copy_from_slice(&checksum.to_le_bytes());
    header
}

/// Writes the header of a new journal, syncs it and its directory.
fn create_header(path: &Path, file: &File) -> Result<(), JournalError> {
    let create_error = |source| JournalError::Create {
        path: path.to_owned(),
        source,
    };
    file.write_all_at(&file_header(), 0).map_err(create_error)?;
    file.sync_all().map_err(create_error)?;
    durable::sync_parent(path).map_err(create_error)
}

/// Checks the file header; `Ok(false)` when there is none yet (a new journal).
fn check_header(path: &Path, bytes: &[u8]) -> Result<bool, JournalError> {
    let header_error = |problem: String| JournalError::Header {
        path: path.to_owned(),
        problem,
    };
    // A crash while creating the journal leaves a prefix of the header, or (when the size
    // reached the disk before the data) zeros. Either holds no record.
    let header = file_header();
    let torn_creation = bytes.len() <= FILE_HEADER_BYTES
        && bytes != header
        && (header.starts_with(bytes) || bytes.iter().all(|&byte| byte == 0));
    if torn_creation {
        return Ok(false);
    }
    if bytes.len() < FILE_HEADER_BYTES {
        if !bytes.starts_with(&MAGIC[..bytes.len().min(MAGIC.len())]) {
            return Err(header_error("bad magic: not a ferry journal".to_owned()));
        }
        return Err(header_error(format!(
            "truncated: {} bytes, a header needs {FILE_HEADER_BYTES}",
            bytes.len()
        )));
    }
    if bytes[..8] != MAGIC {
        return Err(header_error("bad magic: not a ferry journal".to_owned()));
    }
    let stored = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
    let computed = crc32c::crc32c(&bytes[..12]);
    if stored != computed {
        return Err(header_error(format!(
            "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
        )));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(header_error(format!(
            "unsupported version {version} (this build reads {VERSION})"
        )));
    }
    Ok(true)
}

/// Appends the frame of `record` numbered `seq` to `out`; see the module docs.
fn encode_frame(seq: u64, record: &Record, out: &mut Vec<u8>) -> Result<(), JournalError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    record.encode(out);
    let body_bytes = out.len() - start - FRAME_HEADER_BYTES;
    if body_bytes > MAX_BODY_BYTES {
        out.truncate(start);
        return Err(JournalError::TooLarge {
            record: record.kind_name(),
            body_bytes,
        });
    }
    let len = u32::try_from(body_bytes).expect("bounded by MAX_BODY_BYTES");
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 12].copy_from_slice(&seq.to_le_bytes());
    let header_checksum = crc32c::crc32c(&out[start..start + 12]);
    out[start + 12..start + 16].copy_from_slice(&header_checksum.to_le_bytes());
    let frame_checksum = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&frame_checksum.to_le_bytes());
    // Pair assertion: what we write is what replay accepts.
    debug_assert!(matches!(
        read_frame(&out[start..], 0),
        FrameRead::Valid { seq: read_seq, body, .. }
            if read_seq == seq && Record::decode(body).as_ref() == Ok(record)
    ));
    Ok(())
}

/// What is at an offset of the file.
#[derive(Debug)]
enum FrameRead<'a> {
    /// Both checksums hold.
    Valid {
        seq: u64,
        body: &'a [u8],
        end: usize,
    },
    /// Fewer bytes left than a frame header.
    ShortHeader,
    /// The header checksum fails: the length cannot be trusted.
    BadHeader,
    /// A valid header claims more than [`MAX_BODY_BYTES`].
    TooLong { body_bytes: usize },
    /// A valid header, but the frame runs past the end of the file.
    PastEnd,
    /// A valid header, but the frame checksum fails.
    BadFrame { end: usize },
}

/// Reads the frame at `at` (pure).
fn read_frame(bytes: &[u8], at: usize) -> FrameRead<'_> {
    let Some(header) = bytes.get(at..at + FRAME_HEADER_BYTES) else {
        return FrameRead::ShortHeader;
    };
    let stored = u32::from_le_bytes(header[12..16].try_into().expect("4 bytes"));
    if crc32c::crc32c(&header[..12]) != stored {
        return FrameRead::BadHeader;
    }
    let body_bytes = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    if body_bytes > MAX_BODY_BYTES {
        return FrameRead::TooLong { body_bytes };
    }
    let seq = u64::from_le_bytes(header[4..12].try_into().expect("8 bytes"));
    let body_end = at + FRAME_HEADER_BYTES + body_bytes;
    let end = body_end + FRAME_TRAILER_BYTES;
    let Some(trailer) = bytes.get(body_end..end) else {
        return FrameRead::PastEnd;
    };
    let stored = u32::from_le_bytes(trailer.try_into().expect("4 bytes"));
    if crc32c::crc32c(&bytes[at..body_end]) != stored {
        return FrameRead::BadFrame { end };
    }
    FrameRead::Valid {
        seq,
        body: &bytes[at + FRAME_HEADER_BYTES..body_end],
        end,
    }
}

/// The first offset at or after `from` holding a valid frame.
#[cold]
fn find_valid_frame(bytes: &[u8], from: usize) -> Option<usize> {
    (from..bytes.len()).find(|&at| matches!(read_frame(bytes, at), FrameRead::Valid { .. }))
}

/// Replays a journal's bytes (pure); `path` only names the file in errors.
fn scan(path: &Path, bytes: &[u8]) -> Result<Replay, JournalError> {
    if !check_header(path, bytes)? {
        return Ok(Replay {
            entries: Vec::new(),
            dropped_tail_bytes: 0,
            end_offset_bytes: 0,
            created: true,
        });
    }
    let corrupt = |at: usize, problem: String| JournalError::Corrupt {
        path: path.to_owned(),
        offset_bytes: at as u64,
        problem,
    };
    let mut entries: Vec<Entry> = Vec::new();
    let mut at = FILE_HEADER_BYTES;
    while at < bytes.len() {
        let (seq, body, end) = match read_frame(bytes, at) {
            FrameRead::Valid { seq, body, end } => (seq, body, end),
            FrameRead::ShortHeader | FrameRead::PastEnd => break,
            FrameRead::BadFrame { end } if end == bytes.len() => break,
            FrameRead::BadFrame { end } => {
                return Err(corrupt(
                    at,
                    format!(
                        "frame checksum mismatch with {} bytes after the frame",
                        bytes.len() - end
                    ),
                ))
            }
            FrameRead::BadHeader => match find_valid_frame(bytes, at + 1) {
                None => break,
                Some(next) => {
                    return Err(corrupt(
                        at,
                        format!(
                        "frame header checksum mismatch; a valid frame follows at offset {next}"
                    ),
                    ))
                }
            },
            FrameRead::TooLong { body_bytes } => {
                return Err(corrupt(
                    at,
                    format!("frame of {body_bytes} bytes exceeds the {MAX_BODY_BYTES}-byte limit"),
                ))
            }
        };
        let previous = entries.last().map_or(0, |entry| entry.seq);
        if seq <= previous {
            return Err(corrupt(
                at,
                format!("sequence number {seq} after {previous}"),
            ));
        }
        let record = Record::decode(body)
            .map_err(|problem| corrupt(at, format!("record {seq}: {problem}")))?;
        entries.push(Entry {
            seq,
            offset_bytes: at as u64,
            frame_bytes: (end - at) as u64,
            record,
        });
        at = end;
    }
    Ok(Replay {
        entries,
        dropped_tail_bytes: (bytes.len() - at) as u64,
        end_offset_bytes: at as u64,
        created: false,
    })
}

/// Folds replayed entries; a refused record is corruption at its offset (the journal checks
/// every record before writing it, so only a bug or an edited file gets here).
fn fold_entries(path: &Path, entries: &[Entry]) -> Result<JobViews, JournalError> {
    let mut jobs = JobViews::new();
    for entry in entries {
        fold::apply(&mut jobs, entry.seq, &entry.record).map_err(|err| JournalError::Corrupt {
            path: path.to_owned(),
            offset_bytes: entry.offset_bytes,
            problem: err.to_string(),
        })?;
    }
    Ok(jobs)
}

/// The whole file, read through `file` (whatever its position).
fn read_all(file: &File) -> io::Result<Vec<u8>> {
    let len_bytes = file.metadata()?.len();
    let len = usize::try_from(len_bytes)
        .map_err(|_| io::Error::other(format!("{len_bytes} bytes do not fit in memory")))?;
    let mut bytes = vec![0u8; len];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

/// Removes the temp file of a compaction that crashed before its rename (harmless, but it
/// holds a whole copy of the journal).
fn remove_stale_temp(path: &Path) {
    let temp = temp_path(path);
    match std::fs::remove_file(&temp) {
        Ok(()) => log::info!("removed stale journal temp file {}", temp.display()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => log::warn!("cannot remove {}: {err}", temp.display()),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::dirty::DirtySet;
    use crate::journal::fold::{Authority, JobViews};
    use crate::migrate::Policy;

    const GRANULARITY_BYTES: u64 = 64 << 10;
    const SIZE_BYTES: u64 = 100 * GRANULARITY_BYTES - 512;

    pub(crate) fn started(job_id: u64) -> Record {
        Record::SourceStarted {
            job_id,
            batch: Some("rack-4".into()),
            export: format!("vm-{job_id}"),
            size_bytes: SIZE_BYTES,
            granularity_bytes: GRANULARITY_BYTES,
            destination: "10.0.0.2:7410".into(),
            policy: Policy::Heat,
        }
    }

    pub(crate) fn created(job_id: u64) -> Record {
        Record::TargetCreated {
            job_id,
            batch: None,
            export: format!("vm-{job_id}"),
            size_bytes: SIZE_BYTES,
            granularity_bytes: GRANULARITY_BYTES,
            source: "10.0.0.1:40122".into(),
            image_path: PathBuf::from(format!("/var/lib/ferry/vm-{job_id}.img")),
        }
    }

    pub(crate) fn received(job_id: u64, blocks: impl IntoIterator<Item = u64>) -> Record {
        let mut set = DirtySet::empty(GRANULARITY_BYTES, SIZE_BYTES);
        for block in blocks {
            set.insert(block);
        }
        Record::TargetReceived {
            job_id,
            received: set,
        }
    }

    /// A sequence the fold accepts that holds every record kind.
    pub(crate) fn lifecycle() -> Vec<Record> {
        vec![
            started(7),
            created(9),
            received(9, 0..40),
            Record::SourceSwitchoverBegun { job_id: 7 },
            Record::SourceSwitchoverCancelled {
                job_id: 7,
                reason: "destination refused: disk full".into(),
            },
            created(9),
            received(9, (0..100).step_by(3).chain(0..40)),
            Record::SourceSwitchoverBegun { job_id: 7 },
            Record::SourceSwitched {
                job_id: 7,
                forward_addr: "10.0.0.2:10809".into(),
            },
            started(8),
            Record::SourceSettings {
                job_id: 8,
                settings: crate::journal::JobSettings::sample(Policy::Heat, 100),
            },
            Record::TargetCommitted { job_id: 9 },
            Record::SourceAborted {
                job_id: 8,
                reason: "operator".into(),
            },
            Record::SourceFinished { job_id: 7 },
            created(10),
            Record::TargetAborted {
                job_id: 10,
                reason: "source aborted".into(),
            },
        ]
    }

    /// A fresh directory holding a journal with `records`; returns it, the path and the
    /// file's bytes.
    fn written(records: &[Record]) -> (tempfile::TempDir, PathBuf, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        let (mut journal, _) = Journal::open(&path).expect("open");
        for record in records {
            journal.append(record).expect("append");
        }
        drop(journal);
        let bytes = std::fs::read(&path).expect("read");
        (dir, path, bytes)
    }

    fn records(replay: &Replay) -> Vec<Record> {
        replay.entries.iter().map(|e| e.record.clone()).collect()
    }

    fn seqs(replay: &Replay) -> Vec<u64> {
        replay.entries.iter().map(|e| e.seq).collect()
    }

    /// Expects a Corrupt error from replaying `bytes`; returns its offset and problem.
    fn corrupt_at(bytes: &[u8]) -> (u64, String) {
        match scan(Path::new("j"), bytes) {
            Err(JournalError::Corrupt {
                offset_bytes,
                problem,
                ..
            }) => (offset_bytes, problem),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }

    #[test]
    fn missing_empty_or_half_created_file_is_an_empty_journal() {
        // Goal: a journal that never held a record opens empty and takes seq 1, whether the
        // file is missing, empty, a torn prefix of the header, or just the header. Method:
        // prepare each, open, check the replay and the file, append.
        let dir = tempfile::tempdir().expect("tempdir");
        let header = file_header();
        let cases: [(&str, Option<&[u8]>, bool); 5] = [
            ("missing", None, true),
            ("empty", Some(&[]), true),
            ("torn-header", Some(&header[..5]), true),
            ("zeroed-header", Some(&[0; FILE_HEADER_BYTES]), true),
            ("header-only", Some(&header), false),
        ];
        for (name, content, created) in cases {
            let path = dir.path().join(name);
            if let Some(content) = content {
                std::fs::write(&path, content).expect("write");
            }
            let (mut journal, replay) = Journal::open(&path).expect(name);
            assert!(replay.entries.is_empty(), "{name}");
            assert_eq!(replay.created, created, "{name}");
            assert_eq!(replay.dropped_tail_bytes, 0, "{name}");
            assert_eq!(replay.end_offset_bytes, FILE_HEADER_BYTES as u64, "{name}");
            assert_eq!(std::fs::read(&path).expect("read"), header, "{name}");
            assert!(journal.jobs().is_empty());
            assert_eq!(journal.compact().expect("compact").dropped_records, 0);
            assert_eq!(journal.append(&started(1)).expect("append"), 1, "{name}");
        }
    }

    #[test]
    fn every_record_kind_survives_a_reopen() {
        // Goal: records come back as written, numbered from 1, and fold to the state the
        // journal held. Method: append a lifecycle holding all eleven kinds, reopen, compare.
        let kinds: std::collections::BTreeSet<_> =
            lifecycle().iter().map(Record::kind_name).collect();
        assert_eq!(kinds.len(), 11, "the lifecycle covers every kind");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        let (mut journal, _) = Journal::open(&path).expect("open");
        for record in lifecycle() {
            journal.append(&record).expect("append");
        }
        let jobs_before: JobViews = journal.jobs().clone();
        let len_before = journal.len_bytes();
        drop(journal);
        let (journal, replay) = Journal::open(&path).expect("reopen");
        assert_eq!(records(&replay), lifecycle());
        let count = lifecycle().len() as u64;
        assert_eq!(seqs(&replay), (1..=count).collect::<Vec<_>>());
        assert_eq!(replay.dropped_tail_bytes, 0);
        assert_eq!(replay.end_offset_bytes, len_before);
        assert_eq!(journal.jobs(), &jobs_before);
        assert_eq!(fold::fold(&replay.entries).expect("fold"), jobs_before);
        assert_eq!(Journal::inspect(&path).expect("inspect"), replay);
    }

    #[test]
    fn sequence_numbers_continue_after_reopen() {
        // Goal: a reopened journal never reuses a number. Method: append 3, reopen, append 2,
        // reopen, check 1..=5.
        let (_dir, path, _) = written(&lifecycle()[..3]);
        let (mut journal, replay) = Journal::open(&path).expect("reopen");
        assert_eq!(seqs(&replay), vec![1, 2, 3]);
        assert_eq!(journal.next_seq(), 4);
        assert_eq!(journal.append(&lifecycle()[3]).expect("append"), 4);
        assert_eq!(journal.append(&lifecycle()[4]).expect("append"), 5);
        drop(journal);
        let (journal, replay) = Journal::open(&path).expect("reopen");
        assert_eq!(seqs(&replay), vec![1, 2, 3, 4, 5]);
        assert_eq!(journal.next_seq(), 6);
    }

    #[test]
    fn torn_tail_at_every_length_replays_the_records_before_it() {
        // Goal: a last append cut at any byte is dropped, the file cut back, and appending
        // again gives the same bytes as before the crash. Method: truncate the last frame at
        // every length (and replace it with zeros, as a crash after a size update can),
        // open, check, re-append.
        let all = lifecycle();
        let (_dir, path, bytes) = written(&all);
        let last = Journal::inspect(&path)
            .expect("inspect")
            .entries
            .pop()
            .expect("last");
        let start = last.offset_bytes as usize;
        let mut torn_files: Vec<(Vec<u8>, u64)> = (0..last.frame_bytes as usize)
            .map(|cut| (bytes[..start + cut].to_vec(), cut as u64))
            .collect();
        let mut zeroed = bytes[..start].to_vec();
        zeroed.resize(bytes.len(), 0);
        torn_files.push((zeroed, last.frame_bytes));
        for (torn, dropped) in torn_files {
            std::fs::write(&path, &torn).expect("write");
            let (mut journal, replay) = Journal::open(&path).expect("open");
            assert_eq!(records(&replay), all[..all.len() - 1], "cut {dropped}");
            assert_eq!(replay.dropped_tail_bytes, dropped);
            assert_eq!(replay.end_offset_bytes, last.offset_bytes);
            assert_eq!(
                std::fs::metadata(&path).expect("stat").len(),
                last.offset_bytes
            );
            assert_eq!(journal.append(&last.record).expect("append"), last.seq);
            drop(journal);
            assert_eq!(std::fs::read(&path).expect("read"), bytes, "cut {dropped}");
        }
        let mut trailing = bytes.clone();
        trailing.extend_from_slice(&[0; 4096]);
        let replay = scan(&path, &trailing).expect("zeros after the last frame");
        assert_eq!(records(&replay), all);
        assert_eq!(replay.dropped_tail_bytes, 4096);
    }

    #[test]
    fn bit_flip_in_a_middle_record_is_an_error_naming_its_offset() {
        // Goal: damage before the last frame is never dropped as a torn tail, and the error
        // names the damaged frame, whichever bit flipped (length, number, checksums, body).
        // Method: flip every bit of the first and of a middle frame, replay; then once
        // through `open`, which must leave the file as it found it.
        let (_dir, path, bytes) = written(&lifecycle());
        let entries = Journal::inspect(&path).expect("inspect").entries;
        for entry in [&entries[0], &entries[6]] {
            let start = entry.offset_bytes as usize;
            for bit in start * 8..(start + entry.frame_bytes as usize) * 8 {
                let mut flipped = bytes.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                let (offset_bytes, problem) = corrupt_at(&flipped);
                assert_eq!(offset_bytes, entry.offset_bytes, "bit {bit}: {problem}");
            }
        }
        let mut flipped = bytes;
        flipped[entries[6].offset_bytes as usize + 20] ^= 0x04;
        std::fs::write(&path, &flipped).expect("write");
        let err = Journal::open(&path).expect_err("corrupt");
        let text = err.to_string();
        assert!(
            text.contains(&format!("corrupt at offset {}", entries[6].offset_bytes)),
            "{text}"
        );
        assert_eq!(std::fs::read(&path).expect("read"), flipped);
    }

    #[test]
    fn bit_flip_in_the_last_record_is_dropped_as_torn() {
        // Goal: a damaged last frame cannot be told from a torn one (both fail a checksum
        // and nothing follows), so it is dropped and reported, never misread. Method: flip
        // every bit of the last frame, replay.
        let all = lifecycle();
        let (_dir, path, bytes) = written(&all);
        let last = Journal::inspect(&path)
            .expect("inspect")
            .entries
            .pop()
            .expect("last");
        let start = last.offset_bytes as usize;
        for bit in start * 8..bytes.len() * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            let replay = scan(&path, &flipped).expect("dropped, not an error");
            assert_eq!(records(&replay), all[..all.len() - 1], "bit {bit}");
            assert_eq!(replay.dropped_tail_bytes, last.frame_bytes, "bit {bit}");
        }
    }

    #[test]
    fn wrong_magic_version_or_header_checksum_is_refused() {
        // Goal: another format (or a newer ferry's journal) is refused with a clear error and
        // left untouched. Method: rewrite the version (with a valid checksum), the magic, the
        // checksum; a short file that is not a header prefix; open each.
        let (_dir, path, bytes) = written(&lifecycle()[..2]);
        let mut newer = bytes.clone();
        newer[8..12].copy_from_slice(&2u32.to_le_bytes());
        let checksum = crc32c::crc32c(&newer[..12]);
        newer[12..16].copy_from_slice(&checksum.to_le_bytes());
        let mut alien = bytes.clone();
        alien[..8].copy_from_slice(b"NOTOURS!");
        let mut damaged = bytes.clone();
        damaged[9] ^= 1;
        let mut short = MAGIC.to_vec();
        short.push(9);
        let cases: [(&[u8], &str); 5] = [
            (&newer, "unsupported version 2 (this build reads 1)"),
            (&alien, "bad magic"),
            (&damaged, "checksum mismatch"),
            (&short, "truncated: 9 bytes"),
            (b"hello", "bad magic"),
        ];
        for (content, problem) in cases {
            std::fs::write(&path, content).expect("write");
            let err = Journal::open(&path).expect_err(problem);
            assert!(matches!(err, JournalError::Header { .. }), "{err:?}");
            let text = err.to_string();
            assert!(text.contains(problem), "{text}");
            assert!(text.contains(&path.display().to_string()), "{text}");
            assert_eq!(std::fs::read(&path).expect("read"), content);
        }
    }

    #[test]
    fn checksummed_frames_that_no_ferry_writes_are_corrupt() {
        // Goal: a frame whose checksums hold but whose number goes back, whose body does not
        // decode, or whose record the state machine refuses is an error at its offset, even
        // as the last frame. Method: assemble such files from frames by hand.
        let frame = |seq: u64, record: &Record| {
            let mut out = Vec::new();
            encode_frame(seq, record, &mut out).expect("encode");
            out
        };
        let file = |frames: &[Vec<u8>]| {
            let mut out = file_header().to_vec();
            frames.iter().for_each(|f| out.extend_from_slice(f));
            out
        };
        let first = frame(2, &started(1));
        let second_at = (FILE_HEADER_BYTES + first.len()) as u64;
        let backwards = file(&[first.clone(), frame(2, &started(3))]);
        assert_eq!(
            corrupt_at(&backwards),
            (second_at, "sequence number 2 after 2".to_owned())
        );
        let mut garbage = frame(3, &Record::SourceFinished { job_id: 1 });
        garbage[FRAME_HEADER_BYTES] = 99;
        let body_end = garbage.len() - FRAME_TRAILER_BYTES;
        let checksum = crc32c::crc32c(&garbage[..body_end]);
        garbage[body_end..].copy_from_slice(&checksum.to_le_bytes());
        let (offset_bytes, problem) = corrupt_at(&file(&[first.clone(), garbage]));
        assert_eq!(offset_bytes, second_at);
        assert!(
            problem.contains("record 3: unknown record kind 99"),
            "{problem}"
        );
        let refused = file(&[
            first,
            frame(
                3,
                &Record::SourceSwitched {
                    job_id: 1,
                    forward_addr: "x".into(),
                },
            ),
        ]);
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        std::fs::write(&path, &refused).expect("write");
        let text = Journal::open(&path).expect_err("refused").to_string();
        assert!(
            text.contains(&format!("corrupt at offset {second_at}")),
            "{text}"
        );
        assert!(text.contains("not allowed in phase copying"), "{text}");
    }

    #[test]
    fn refused_record_is_not_written() {
        // Goal: a record the state machine refuses leaves the file and the numbering as they
        // were. Method: append an out-of-order record, compare length and next seq.
        let (_dir, path, bytes) = written(&lifecycle()[..2]);
        let (mut journal, _) = Journal::open(&path).expect("open");
        let err = journal
            .append(&Record::TargetCommitted { job_id: 7 })
            .expect_err("no such target job");
        assert!(
            matches!(
                err,
                JournalError::Transition {
                    seq: 3,
                    job_id: 7,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(journal.next_seq(), 3);
        assert_eq!(std::fs::read(&path).expect("read"), bytes);
        assert_eq!(
            journal
                .append(&Record::TargetCommitted { job_id: 9 })
                .expect("ok"),
            3
        );
    }

    #[test]
    fn second_open_is_refused_while_the_journal_is_open() {
        // Goal: two agents never append to one journal. Method: open twice in one process
        // (OFD locks conflict across opens), then again after the first closes.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("journal");
        let (journal, _) = Journal::open(&path).expect("open");
        let err = Journal::open(&path).expect_err("locked");
        assert!(matches!(err, JournalError::Open { .. }), "{err:?}");
        drop(journal);
        Journal::open(&path).expect("open after close");
    }

    #[test]
    fn compaction_drops_superseded_checkpoints_and_keeps_the_fold() {
        // Goal: compaction keeps every job's state and the numbering, drops checkpoints a
        // later one or the job's end superseded, and a leftover temp file is cleaned up.
        // Method: two target jobs with several checkpoints (one committed), compact, append,
        // reopen, compare.
        let mut records = vec![created(9), created(10)];
        records.extend((1..=5).map(|n| received(9, 0..n * 10)));
        records.extend((1..=2).map(|n| received(10, 0..n * 10)));
        records.push(Record::TargetCommitted { job_id: 10 });
        let (_dir, path, bytes) = written(&records);
        let (mut journal, _) = Journal::open(&path).expect("open");
        let jobs_before = journal.jobs().clone();
        let compaction = journal.compact().expect("compact");
        assert_eq!(compaction.dropped_records, 4 + 2);
        assert_eq!(compaction.before_bytes, bytes.len() as u64);
        assert_eq!(compaction.after_bytes, journal.len_bytes());
        assert!(compaction.after_bytes < compaction.before_bytes);
        assert_eq!(journal.jobs(), &jobs_before);
        let seq = journal
            .append(&received(9, 0..60))
            .expect("append after compaction");
        assert_eq!(seq, records.len() as u64 + 1);
        drop(journal);
        std::fs::write(temp_path(&path), b"a crashed compaction").expect("write");
        let (journal, replay) = Journal::open(&path).expect("reopen");
        assert_eq!(seqs(&replay), vec![1, 2, 7, 10, 11]);
        assert!(!temp_path(&path).exists());
        let Side::Target(target) = &journal.jobs()[&JobKey::of(&created(9))].side else {
            panic!("a target job");
        };
        assert_eq!(target.received.as_ref().map(DirtySet::count), Some(60));
        let ten = &journal.jobs()[&JobKey::of(&created(10))];
        assert_eq!(ten.authority(), Authority::Target);
    }

    #[test]
    fn inspect_reports_a_torn_tail_without_cutting_it() {
        // Goal: reading a journal for status never changes it. Method: tear the last frame,
        // inspect, compare the file.
        let (_dir, path, bytes) = written(&lifecycle()[..3]);
        let torn = &bytes[..bytes.len() - 3];
        std::fs::write(&path, torn).expect("write");
        let replay = Journal::inspect(&path).expect("inspect");
        assert_eq!(replay.entries.len(), 2);
        assert!(replay.dropped_tail_bytes > 0);
        assert_eq!(std::fs::read(&path).expect("read"), torn);
    }
}
