//! The lease file of one manager pair: `<dir>/<pair>.lease`, two [`Record`] slots (sector 0
//! and sector 1), written `O_DIRECT` + `fdatasync`, read back and verified, with a bounded
//! write time.
//!
//! Writing: each write reads both slots, takes the newest valid record, and writes the new
//! one, with its sequence + 1, into the *other* slot, so the newest confirmed record is never
//! overwritten. It is then synced, read back `O_DIRECT` (the bytes the device returns, not a
//! cached copy) and decoded; only a read back equal to what was meant is a confirmed write.
//!
//! Reading takes the valid record with the highest sequence. An empty slot (never written)
//! or a torn one (checksum mismatch) does not count, and the other slot's older record
//! stands (the next write then reuses the torn one's sequence: a sequence names a record
//! only among valid ones). That is safe for a lease because:
//! - a torn slot is a write that was never confirmed: the witness grants or renews only on a
//!   confirmed write, so nobody was told about the lost record;
//! - [`LeaseFile::write`] refuses a lower epoch than the newest record's, so an older record
//!   never has a higher epoch than a newer one, and an agent's epoch fence refuses commands of
//!   an epoch lower than one it has seen;
//! - a restarted witness treats the lease it reads as renewed at that moment, so the holder in
//!   the older record gets no less time than it counted on.
//!
//! What refuses the whole file rather than skipping a slot:
//! - a slot whose checksum holds but which this build cannot use (another magic, a newer
//!   version, a malformed field: see [`super::record`]), another pair's record, or two
//!   different records with one sequence: someone else wrote the file, and it is never
//!   overwritten;
//! - no valid record, but a slot that is not empty ([`StoreError::Unreadable`]). A torn very
//!   first write looks like that, and so does damage to a confirmed record; the two cannot be
//!   told apart, and reading a lost lease as "never written" would restart its epochs. An
//!   operator removes the file after checking the witness's peers.
//!
//! Files: the directory is created mode 0700 if missing and must not be a symbolic link; the
//! file is created `O_CREAT | O_EXCL | O_NOFOLLOW`, mode 0600, zero-filled to two sectors,
//! synced with its directory; an existing one is opened `O_NOFOLLOW` and must be exactly
//! [`FILE_BYTES`] long (an all-zero shorter file is what a crash during creation leaves, and
//! is filled again). An OFD lock keeps a second local process (or `LeaseFile`) off the file.
//!
//! Bounded writes: every write runs on the file's own writer thread, fed by a bounded channel.
//! [`LeaseFile::write_within`] waits at most its timeout, so a slow disk costs a renewal,
//! not safety. Contract: a write that timed out may still land later, so the caller treats it
//! as *maybe written* ([`StoreError::is_maybe_written`]) and acts only on a confirmed write.
//! Until it has finished, the next write fails at once with [`StoreError::Busy`]; nothing
//! queues. A later write reads the slots afresh, so a late landing is simply the newest.

use std::fmt;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use ferry_sys::{AlignedBuf, DirectFile, DIRECT_ALIGN};
use thiserror::Error;

use super::record::{Record, RecordError, RECORD_BYTES};
use super::Lease;
use crate::durable;
use crate::name::{self, NameError};

/// End of a lease file's name: `<pair>.lease`.
pub const FILE_SUFFIX: &str = ".lease";
/// Size of a lease file: two record slots.
pub const FILE_BYTES: u64 = 2 * RECORD_BYTES as u64;
/// Mode of a new lease file.
pub const FILE_MODE: u32 = 0o600;
/// Mode of a new lease directory.
pub const DIR_MODE: u32 = 0o700;
const _: () = assert!(RECORD_BYTES % DIRECT_ALIGN == 0);

/// Why a lease file could not be opened, read or written. Messages name the file. In every
/// variant, `path` is the lease file (the directory for [`StoreError::Dir`] and
/// [`StoreError::NotADirectory`]), `slot` is 0 or 1, and `source` is the cause.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The pair's name breaks the name rule.
    #[error("bad manager pair name")]
    BadPair(#[source] NameError),
    /// Creating or inspecting the lease directory failed.
    #[error("cannot prepare lease directory {}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The lease directory is not a directory (a symbolic link is not followed).
    #[error("lease directory {} is not a directory (links are not followed)", path.display())]
    NotADirectory { path: PathBuf },
    /// A symbolic link is where the lease file should be.
    #[error("lease file {} is a symbolic link: refused", path.display())]
    Symlink { path: PathBuf },
    /// Opening or creating the lease file failed.
    #[error("cannot open lease file {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another open (process) holds the lease file's lock.
    #[error("lease file {} is in use", path.display())]
    Locked {
        path: PathBuf,
        /// The lock's error, naming the holder.
        #[source]
        source: io::Error,
    },
    /// The file is not two records long, or not a regular file.
    #[error("lease file {} is {size_bytes} bytes, not {FILE_BYTES}: not a lease file, or damaged", path.display())]
    WrongSize {
        path: PathBuf,
        /// Its size.
        size_bytes: u64,
    },
    /// Reading a slot failed.
    #[error("cannot read slot {slot} of lease file {}", path.display())]
    Read {
        path: PathBuf,
        slot: usize,
        #[source]
        source: io::Error,
    },
    /// A checksummed record this build does not use: never overwritten.
    #[error("slot {slot} of lease file {} holds a record this build cannot use", path.display())]
    Foreign {
        path: PathBuf,
        slot: usize,
        /// What the record is.
        #[source]
        source: RecordError,
    },
    /// A valid record of another manager pair (a copied or renamed file).
    #[error("slot {slot} of lease file {} belongs to pair {found:?}", path.display())]
    WrongPair {
        path: PathBuf,
        slot: usize,
        /// The pair in the record.
        found: String,
    },
    /// Two different valid records with one sequence: not written by this store.
    #[error("both slots of lease file {} hold sequence {sequence}, differently", path.display())]
    Conflict {
        path: PathBuf,
        /// The sequence.
        sequence: u64,
    },
    /// No valid record, and not both slots empty (see the module docs).
    #[error("lease file {} has no valid record (slot 0: {slot0}; slot 1: {slot1})", path.display())]
    Unreadable {
        path: PathBuf,
        /// Why slot 0 does not count.
        slot0: RecordError,
        /// Why slot 1 does not count.
        slot1: RecordError,
    },
    /// The write would lower the epoch: a caller bug, refused before anything is written.
    #[error("lease file {} holds epoch {current_epoch}; refusing to write epoch {new_epoch}", path.display())]
    EpochRegression {
        path: PathBuf,
        /// The newest record's epoch.
        current_epoch: u64,
        /// The epoch asked for.
        new_epoch: u64,
    },
    /// The newest record's sequence is `u64::MAX` (only a foreign writer gets there).
    #[error("lease file {} has no sequence left", path.display())]
    SequenceExhausted { path: PathBuf },
    /// Writing the new record failed: the slot may be torn.
    #[error("cannot write slot {slot} of lease file {}", path.display())]
    Write {
        path: PathBuf,
        slot: usize,
        #[source]
        source: io::Error,
    },
    /// `fdatasync` after the write failed.
    #[error("cannot sync lease file {}", path.display())]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading the written slot back failed.
    #[error("cannot read back slot {slot} of lease file {}", path.display())]
    ReadBack {
        path: PathBuf,
        slot: usize,
        #[source]
        source: io::Error,
    },
    /// The slot read back is not the record written.
    #[error("slot {slot} of lease file {} reads back differently from what was written", path.display())]
    ReadBackMismatch { path: PathBuf, slot: usize },
    /// The write did not finish within `timeout`; it may still land (module docs).
    #[error("lease write to {} not confirmed within {timeout:?}: it may still land", path.display())]
    TimedOut {
        path: PathBuf,
        /// How long the caller waited.
        timeout: Duration,
    },
    /// An earlier write that timed out is still running; nothing was done.
    #[error("an earlier lease write to {} is still in flight", path.display())]
    Busy { path: PathBuf },
    /// Starting the writer thread failed.
    #[error("cannot start the writer thread of lease file {}", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The writer thread is gone (it panicked: a bug).
    #[error("the writer thread of lease file {} is gone", path.display())]
    WriterGone { path: PathBuf },
}

impl StoreError {
    /// Whether a failed write may still have put its record on disk (or still may): then the
    /// caller can neither act on it nor assume the old record stands. Exhaustive on purpose:
    /// a new variant must decide.
    pub fn is_maybe_written(&self) -> bool {
        match self {
            Self::Write { .. }
            | Self::Sync { .. }
            | Self::ReadBack { .. }
            | Self::ReadBackMismatch { .. }
            | Self::TimedOut { .. }
            | Self::WriterGone { .. } => true,
            Self::BadPair(_)
            | Self::Dir { .. }
            | Self::NotADirectory { .. }
            | Self::Symlink { .. }
            | Self::Open { .. }
            | Self::Locked { .. }
            | Self::WrongSize { .. }
            | Self::Read { .. }
            | Self::Foreign { .. }
            | Self::WrongPair { .. }
            | Self::Conflict { .. }
            | Self::Unreadable { .. }
            | Self::EpochRegression { .. }
            | Self::SequenceExhausted { .. }
            | Self::Busy { .. }
            | Self::Spawn { .. } => false,
        }
    }
}

/// The lease file of one manager pair; see the module docs.
#[derive(Debug)]
pub struct LeaseFile {
    slots: Arc<Slots>,
    /// To the writer thread; `None` only while dropping.
    requests: Option<Sender<Request>>,
    replies: Receiver<Reply>,
    /// The ticket of the write sent last whose reply is not taken yet (its caller timed out).
    in_flight: Option<u64>,
    next_ticket: u64,
    writer: Option<JoinHandle<()>>,
}

impl LeaseFile {
    /// Opens the lease file of `pair` in `dir` (`<dir>/<pair>.lease`), creating the
    /// directory and the file if missing, locks it and starts its writer thread.
    pub fn open_or_create(dir: &Path, pair: &str) -> Result<LeaseFile, StoreError> {
        name::validate(pair).map_err(StoreError::BadPair)?;
        ensure_dir(dir)?;
        let path = dir.join(format!("{pair}{FILE_SUFFIX}"));
        let file = open_file(dir, &path)?;
        Self::start(Slots {
            path,
            pair: pair.to_owned(),
            io: Box::new(DirectSlots { file }),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.slots.path
    }

    /// The manager pair whose lease this is.
    pub fn pair(&self) -> &str {
        &self.slots.pair
    }

    /// The newest valid record; `None` when both slots are empty (never written). Runs on
    /// the caller's thread; a write in flight does not disturb it (it writes the other slot).
    pub fn read(&self) -> Result<Option<Record>, StoreError> {
        Ok(self.slots.newest()?.map(|(_, record)| record))
    }

    /// Writes `lease` as the next record and waits, unbounded, until it is confirmed.
    pub fn write(&mut self, lease: &Lease) -> Result<Record, StoreError> {
        let ticket = self.submit(lease)?;
        let reply = self.replies.recv().map_err(|_| self.writer_gone())?;
        self.take_reply(ticket, reply)
    }

    /// Writes `lease` as the next record and waits at most `timeout` for it to be confirmed;
    /// [`StoreError::TimedOut`] otherwise, after which the write may still land, and the next
    /// call is [`StoreError::Busy`] until it has finished (module docs).
    pub fn write_within(&mut self, lease: &Lease, timeout: Duration) -> Result<Record, StoreError> {
        let ticket = self.submit(lease)?;
        match self.replies.recv_timeout(timeout) {
            Ok(reply) => self.take_reply(ticket, reply),
            Err(RecvTimeoutError::Timeout) => Err(StoreError::TimedOut {
                path: self.slots.path.clone(),
                timeout,
            }),
            Err(RecvTimeoutError::Disconnected) => Err(self.writer_gone()),
        }
    }

    fn start(slots: Slots) -> Result<LeaseFile, StoreError> {
        let slots = Arc::new(slots);
        // Capacity 1 each way, and one write at a time (`in_flight`): neither side blocks.
        let (request_tx, request_rx) = crossbeam_channel::bounded(1);
        let (reply_tx, reply_rx) = crossbeam_channel::bounded(1);
        let writer_slots = Arc::clone(&slots);
        let writer = thread::Builder::new()
            .name("lease-writer".to_owned())
            .spawn(move || run_writer(&writer_slots, &request_rx, &reply_tx))
            .map_err(|source| StoreError::Spawn {
                path: slots.path.clone(),
                source,
            })?;
        Ok(LeaseFile {
            slots,
            requests: Some(request_tx),
            replies: reply_rx,
            in_flight: None,
            next_ticket: 0,
            writer: Some(writer),
        })
    }

    /// Hands `lease` to the writer thread, unless an earlier write is still running.
    fn submit(&mut self, lease: &Lease) -> Result<u64, StoreError> {
        if let Some(ticket) = self.in_flight {
            match self.replies.try_recv() {
                Ok(reply) => self.drop_late_reply(ticket, reply),
                Err(TryRecvError::Empty) => return Err(self.busy()),
                Err(TryRecvError::Disconnected) => return Err(self.writer_gone()),
            }
        }
        let ticket = self.next_ticket;
        self.next_ticket += 1;
        let request = Request {
            ticket,
            lease: lease.clone(),
        };
        let requests = self.requests.as_ref().expect("requests live until drop");
        match requests.try_send(request) {
            Ok(()) => {}
            // Cannot happen with no write in flight; refusing is the safe answer anyway.
            Err(TrySendError::Full(_)) => return Err(self.busy()),
            Err(TrySendError::Disconnected(_)) => return Err(self.writer_gone()),
        }
        self.in_flight = Some(ticket);
        Ok(ticket)
    }

    fn take_reply(&mut self, ticket: u64, reply: Reply) -> Result<Record, StoreError> {
        assert_eq!(reply.ticket, ticket, "replies come in request order");
        self.in_flight = None;
        reply.result
    }

    /// The outcome of a write whose caller stopped waiting: logged, since that caller
    /// already treats it as maybe written, and the next write reads the slots afresh.
    fn drop_late_reply(&mut self, ticket: u64, reply: Reply) {
        assert_eq!(reply.ticket, ticket, "replies come in request order");
        self.in_flight = None;
        match reply.result {
            Ok(record) => log::info!(
                "lease write to {} (sequence {}) landed after its caller's timeout",
                self.slots.path.display(),
                record.sequence
            ),
            Err(err) => log::warn!(
                "lease write to {} failed after its caller's timeout: {err}",
                self.slots.path.display()
            ),
        }
    }

    fn busy(&self) -> StoreError {
        StoreError::Busy {
            path: self.slots.path.clone(),
        }
    }

    #[cold]
    fn writer_gone(&self) -> StoreError {
        StoreError::WriterGone {
            path: self.slots.path.clone(),
        }
    }
}

impl Drop for LeaseFile {
    /// Stops the writer thread. It is joined only when idle: a write stuck on a slow disk
    /// must not hold up the caller, so then the thread finishes that write on its own, and
    /// keeps the file (and its lock: a reopen is `Locked`) until it has.
    fn drop(&mut self) {
        drop(self.requests.take());
        if self.in_flight.is_none() {
            if let Some(writer) = self.writer.take() {
                // A panic of the writer was already reported as WriterGone, if anyone asked.
                let _ = writer.join();
            }
        }
    }
}

/// A write for the writer thread.
#[derive(Debug)]
struct Request {
    ticket: u64,
    lease: Lease,
}

/// The writer thread's answer to the [`Request`] of the same ticket.
#[derive(Debug)]
struct Reply {
    ticket: u64,
    result: Result<Record, StoreError>,
}

/// The writer thread: one write at a time, until the [`LeaseFile`] drops its sender.
fn run_writer(slots: &Slots, requests: &Receiver<Request>, replies: &Sender<Reply>) {
    for request in requests {
        let result = slots.write(&request.lease);
        let reply = Reply {
            ticket: request.ticket,
            result,
        };
        if replies.send(reply).is_err() {
            return; // the LeaseFile is gone
        }
    }
}

/// The I/O of the two slots: the seam a test uses to slow a step down.
trait SlotIo: Send + Sync + fmt::Debug {
    /// Reads slot `slot` whole into `buf` (one record, aligned).
    fn read_slot(&self, slot: usize, buf: &mut AlignedBuf) -> io::Result<()>;
    /// Writes `buf` (one record, aligned) over slot `slot`.
    fn write_slot(&self, slot: usize, buf: &AlignedBuf) -> io::Result<()>;
    /// After Ok, every completed write is durable.
    fn sync(&self) -> io::Result<()>;
}

/// The slots of a real lease file, through its `O_DIRECT` descriptor.
#[derive(Debug)]
struct DirectSlots {
    file: DirectFile,
}

impl SlotIo for DirectSlots {
    fn read_slot(&self, slot: usize, buf: &mut AlignedBuf) -> io::Result<()> {
        read_direct(&self.file, slot_offset_bytes(slot), buf)
    }

    fn write_slot(&self, slot: usize, buf: &AlignedBuf) -> io::Result<()> {
        write_direct(&self.file, slot_offset_bytes(slot), buf)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.datasync()
    }
}

/// What the caller's thread and the writer thread share.
#[derive(Debug)]
struct Slots {
    path: PathBuf,
    pair: String,
    io: Box<dyn SlotIo>,
}

impl Slots {
    /// The newest valid record and its slot (module docs).
    fn newest(&self) -> Result<Option<(usize, Record)>, StoreError> {
        let reads = [self.read_slot(0)?, self.read_slot(1)?];
        self.choose(reads)
    }

    /// Slot `slot` decoded; the outer error is the I/O.
    fn read_slot(&self, slot: usize) -> Result<Result<Record, RecordError>, StoreError> {
        let mut buf = AlignedBuf::zeroed(RECORD_BYTES, DIRECT_ALIGN);
        self.io
            .read_slot(slot, &mut buf)
            .map_err(|source| StoreError::Read {
                path: self.path.clone(),
                slot,
                source,
            })?;
        Ok(Record::decode(buf.as_slice()))
    }

    /// The newest valid record of the two slots' contents; refuses what the module docs list.
    fn choose(
        &self,
        reads: [Result<Record, RecordError>; 2],
    ) -> Result<Option<(usize, Record)>, StoreError> {
        let path = || self.path.clone();
        for (slot, read) in reads.iter().enumerate() {
            match read {
                Ok(record) if record.pair != self.pair => {
                    return Err(StoreError::WrongPair {
                        path: path(),
                        slot,
                        found: record.pair.clone(),
                    })
                }
                Ok(_) | Err(RecordError::Empty | RecordError::BadChecksum) => {}
                Err(source) => {
                    return Err(StoreError::Foreign {
                        path: path(),
                        slot,
                        source: source.clone(),
                    })
                }
            }
        }
        match reads {
            [Ok(first), Ok(second)] if first.sequence == second.sequence && first != second => {
                Err(StoreError::Conflict {
                    path: path(),
                    sequence: first.sequence,
                })
            }
            [Ok(first), Ok(second)] if second.sequence > first.sequence => Ok(Some((1, second))),
            [Ok(first), _] => Ok(Some((0, first))),
            [Err(_), Ok(second)] => Ok(Some((1, second))),
            [Err(RecordError::Empty), Err(RecordError::Empty)] => Ok(None),
            [Err(slot0), Err(slot1)] => Err(StoreError::Unreadable {
                path: path(),
                slot0,
                slot1,
            }),
        }
    }

    /// One write (module docs); runs on the writer thread.
    fn write(&self, lease: &Lease) -> Result<Record, StoreError> {
        let (slot, sequence) = match self.newest()? {
            None => (0, 1),
            Some((_, current)) if lease.epoch < current.lease.epoch => {
                return Err(StoreError::EpochRegression {
                    path: self.path.clone(),
                    current_epoch: current.lease.epoch,
                    new_epoch: lease.epoch,
                })
            }
            Some((slot, current)) => {
                let sequence = current.sequence.checked_add(1).ok_or_else(|| {
                    StoreError::SequenceExhausted {
                        path: self.path.clone(),
                    }
                })?;
                (1 - slot, sequence)
            }
        };
        let record = Record {
            pair: self.pair.clone(),
            sequence,
            lease: lease.clone(),
        };
        self.put(slot, &record)?;
        Ok(record)
    }

    /// Writes `record` over `slot`, syncs, reads it back and compares.
    fn put(&self, slot: usize, record: &Record) -> Result<(), StoreError> {
        let path = || self.path.clone();
        let mut buf = AlignedBuf::zeroed(RECORD_BYTES, DIRECT_ALIGN);
        buf.as_mut_slice().copy_from_slice(&record.encode());
        self.io
            .write_slot(slot, &buf)
            .map_err(|source| StoreError::Write {
                path: path(),
                slot,
                source,
            })?;
        self.io.sync().map_err(|source| StoreError::Sync {
            path: path(),
            source,
        })?;
        let read_back = match self.read_slot(slot) {
            Ok(read_back) => read_back,
            Err(StoreError::Read { path, slot, source }) => {
                return Err(StoreError::ReadBack { path, slot, source })
            }
            Err(other) => return Err(other),
        };
        if read_back.as_ref() != Ok(record) {
            return Err(StoreError::ReadBackMismatch { path: path(), slot });
        }
        Ok(())
    }
}

fn slot_offset_bytes(slot: usize) -> u64 {
    assert!(slot < 2, "slot {slot}");
    (slot * RECORD_BYTES) as u64
}

/// Creates `dir` (mode [`DIR_MODE`]) if missing, durably; refuses anything but a directory
/// there, a symbolic link included.
fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    let dir_error = |source| StoreError::Dir {
        path: dir.to_owned(),
        source,
    };
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => durable::sync_parent(dir).map_err(dir_error)?,
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(dir_error(err)),
    }
    let metadata = fs::symlink_metadata(dir).map_err(dir_error)?;
    if !metadata.file_type().is_dir() {
        return Err(StoreError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

/// Opens (or creates) the lease file at `path` in `dir`, locks it and checks its size.
fn open_file(dir: &Path, path: &Path) -> Result<DirectFile, StoreError> {
    let open_error = |source: io::Error| {
        if source.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) {
            StoreError::Symlink {
                path: path.to_owned(),
            }
        } else {
            StoreError::Open {
                path: path.to_owned(),
                source,
            }
        }
    };
    let file = match DirectFile::open_no_follow(path, true) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            match DirectFile::create_new(path, FILE_MODE) {
                Ok(file) => file,
                // Another process created it between the two calls: open what it made.
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    DirectFile::open_no_follow(path, true).map_err(open_error)?
                }
                Err(err) => return Err(open_error(err)),
            }
        }
        Err(err) => return Err(open_error(err)),
    };
    file.lock_exclusive().map_err(|source| StoreError::Locked {
        path: path.to_owned(),
        source,
    })?;
    check_size(dir, &file)?;
    Ok(file)
}

/// Accepts a file of [`FILE_BYTES`]; fills one that a crash during creation left short and
/// all zeros; refuses anything else.
fn check_size(dir: &Path, file: &DirectFile) -> Result<(), StoreError> {
    let path = file.path();
    let open_error = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let size_bytes = file.size_bytes().map_err(open_error)?;
    let wrong_size = || StoreError::WrongSize {
        path: path.to_owned(),
        size_bytes,
    };
    if file.is_block_device() || size_bytes > FILE_BYTES {
        return Err(wrong_size());
    }
    if size_bytes == FILE_BYTES {
        return Ok(());
    }
    let mut head = [0u8; FILE_BYTES as usize];
    let head = &mut head[..size_bytes as usize]; // below FILE_BYTES, checked above
    file.read_at(0, head).map_err(open_error)?;
    if head.iter().any(|&byte| byte != 0) {
        return Err(wrong_size());
    }
    let zeros = AlignedBuf::zeroed(FILE_BYTES as usize, DIRECT_ALIGN);
    write_direct(file, 0, &zeros).map_err(open_error)?;
    file.datasync().map_err(open_error)?;
    durable::sync_dir(dir).map_err(|source| StoreError::Dir {
        path: dir.to_owned(),
        source,
    })
}

/// Reads `buf` whole at `offset_bytes` through the `O_DIRECT` descriptor. One sector or
/// two: a short transfer would leave an unaligned rest, so it is an error, not a loop.
fn read_direct(file: &DirectFile, offset_bytes: u64, buf: &mut AlignedBuf) -> io::Result<()> {
    let at = direct_offset(offset_bytes)?;
    let slice = buf.as_mut_slice();
    loop {
        match nix::sys::uio::pread(file.direct_fd(), slice, at) {
            Ok(read) if read == slice.len() => return Ok(()),
            Ok(_) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// Writes `buf` whole at `offset_bytes` through the `O_DIRECT` descriptor (as above).
fn write_direct(file: &DirectFile, offset_bytes: u64, buf: &AlignedBuf) -> io::Result<()> {
    let at = direct_offset(offset_bytes)?;
    loop {
        match nix::sys::uio::pwrite(file.direct_fd(), buf.as_slice(), at) {
            Ok(written) if written == buf.len() => return Ok(()),
            Ok(_) => return Err(io::ErrorKind::WriteZero.into()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
}

fn direct_offset(offset_bytes: u64) -> io::Result<i64> {
    i64::try_from(offset_bytes).map_err(|_| io::ErrorKind::InvalidInput.into())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use super::*;
    use crate::lease::ManagerId;

    const PAIR: &str = "pair-1";

    /// A fresh directory under /var/tmp (`O_DIRECT` does not work on tmpfs).
    fn temp_dir() -> tempfile::TempDir {
        tempfile::Builder::new()
            .prefix("ferry-lease-")
            .tempdir_in("/var/tmp")
            .expect("tempdir in /var/tmp")
    }

    fn lease(epoch: u64, holder: &str) -> Lease {
        Lease {
            epoch,
            holder: Some(ManagerId::new(holder).expect("id")),
            witness_generation: 1,
            lease_ms: 5_000,
        }
    }

    /// The file's two sectors, decoded, read around the store (buffered).
    fn raw_slots(path: &Path) -> [Result<Record, RecordError>; 2] {
        let bytes = fs::read(path).expect("read file");
        assert_eq!(bytes.len() as u64, FILE_BYTES);
        let (slot0, slot1) = bytes.split_at(RECORD_BYTES);
        [Record::decode(slot0), Record::decode(slot1)]
    }

    /// Overwrites `bytes` at `offset_bytes` of the file, around the store.
    fn scribble(path: &Path, offset_bytes: u64, bytes: &[u8]) {
        let file = fs::OpenOptions::new().write(true).open(path).expect("open");
        file.write_all_at(bytes, offset_bytes).expect("scribble");
        file.sync_all().expect("sync");
    }

    #[test]
    fn create_write_read_and_reopen() {
        // Goal: a new file is made 0600 in a new 0700 directory, reads as never written, and
        // a confirmed write is what a read and a reopened file see. Method: open in a missing
        // directory, read, write, read, drop, reopen, read.
        let root = temp_dir();
        let dir = root.path().join("leases");
        let mut file = LeaseFile::open_or_create(&dir, PAIR).expect("create");
        assert_eq!(file.path(), dir.join("pair-1.lease"));
        assert_eq!(file.pair(), PAIR);
        let mode = |path: &Path| fs::metadata(path).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode(&dir), DIR_MODE);
        assert_eq!(mode(file.path()), FILE_MODE);
        assert_eq!(fs::metadata(file.path()).expect("stat").len(), FILE_BYTES);
        assert_eq!(file.read().expect("read"), None);
        let written = file.write(&lease(1, "manager-a")).expect("write");
        assert_eq!(written.sequence, 1);
        assert_eq!(written.pair, PAIR);
        assert_eq!(written.lease, lease(1, "manager-a"));
        assert_eq!(file.read().expect("read"), Some(written.clone()));
        drop(file);
        let file = LeaseFile::open_or_create(&dir, PAIR).expect("reopen");
        assert_eq!(file.read().expect("read"), Some(written));
    }

    #[test]
    fn writes_alternate_slots_and_keep_the_previous_record() {
        // Goal: each write goes to the slot not holding the newest record, with the next
        // sequence, so the previous confirmed record survives every write. Method: five
        // writes; after each, decode both sectors of the file directly.
        let dir = temp_dir();
        let mut file = LeaseFile::open_or_create(dir.path(), PAIR).expect("create");
        let mut previous: Option<Record> = None;
        for sequence in 1..=5u64 {
            let written = file
                .write_within(&lease(sequence, "manager-a"), Duration::from_secs(10))
                .expect("write");
            assert_eq!(written.sequence, sequence);
            let slot = usize::from(sequence % 2 == 0);
            let slots = raw_slots(file.path());
            assert_eq!(slots[slot], Ok(written.clone()), "sequence {sequence}");
            match &previous {
                Some(previous) => assert_eq!(slots[1 - slot].as_ref(), Ok(previous)),
                None => assert_eq!(slots[1 - slot], Err(RecordError::Empty)),
            }
            previous = Some(written);
        }
    }

    #[test]
    fn a_damaged_or_torn_newest_slot_falls_back_to_the_older_record() {
        // Goal: a flipped byte or a torn write in the newest slot never counts; the older
        // record is read, and the next write replaces the damaged slot. Method: three
        // writes (slot 0 holds sequence 3), then damage slot 0 in several ways.
        let dir = temp_dir();
        let mut file = LeaseFile::open_or_create(dir.path(), PAIR).expect("create");
        let mut records = Vec::new();
        for epoch in 1..=3 {
            records.push(file.write(&lease(epoch, "manager-a")).expect("write"));
        }
        let newest = records[2].encode();
        let older_same_slot = records[0].encode();
        for tear in (1..8).map(|sectors| sectors * 512) {
            let mut torn = older_same_slot;
            torn[..tear].copy_from_slice(&newest[..tear]);
            scribble(file.path(), 0, &torn);
            assert_eq!(
                file.read().expect("read"),
                Some(records[1].clone()),
                "tear {tear}"
            );
        }
        scribble(file.path(), 0, &newest);
        assert_eq!(file.read().expect("read"), Some(records[2].clone()));
        scribble(file.path(), 100, &[0xff]);
        assert_eq!(file.read().expect("read"), Some(records[1].clone()));
        let next = file
            .write(&lease(4, "manager-b"))
            .expect("write over damage");
        assert_eq!(next.sequence, 3, "one more than the newest valid record");
        assert_eq!(raw_slots(file.path())[0], Ok(next.clone()));
        assert_eq!(file.read().expect("read"), Some(next));
    }

    #[test]
    fn no_valid_record_is_an_error_unless_never_written() {
        // Goal: both slots empty reads as None; both damaged, or a torn first write (one
        // damaged, one empty), is Unreadable for read and write, since a lost lease must not
        // read as "never written" (module docs). Method: damage the slots of a file.
        let dir = temp_dir();
        let mut file = LeaseFile::open_or_create(dir.path(), PAIR).expect("create");
        let first = file.write(&lease(1, "manager-a")).expect("write").encode();
        scribble(file.path(), 0, &first[..512]);
        scribble(file.path(), 512, &[0u8; RECORD_BYTES - 512]);
        let err = file.read().expect_err("torn first write");
        assert!(
            matches!(
                &err,
                StoreError::Unreadable {
                    slot0: RecordError::BadChecksum,
                    slot1: RecordError::Empty,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("pair-1.lease"), "{err}");
        let err = file
            .write(&lease(2, "manager-a"))
            .expect_err("write refused");
        assert!(matches!(err, StoreError::Unreadable { .. }), "{err:?}");
        assert!(!err.is_maybe_written());
        scribble(file.path(), RECORD_BYTES as u64, &first[..100]);
        let err = file.read().expect_err("both damaged");
        assert!(matches!(err, StoreError::Unreadable { .. }), "{err:?}");
        scribble(file.path(), 0, &[0u8; FILE_BYTES as usize]);
        assert_eq!(file.read().expect("zeroed"), None);
    }

    #[test]
    fn records_the_store_cannot_use_refuse_the_file() {
        // Goal: a checksummed slot this build cannot use (a newer version), another pair's
        // record, or two records of one sequence refuse the file rather than being skipped
        // or overwritten. Method: craft each into a slot, read and write.
        let dir = temp_dir();
        let mut file = LeaseFile::open_or_create(dir.path(), PAIR).expect("create");
        let record = file.write(&lease(1, "manager-a")).expect("write");
        let mut newer = record.encode();
        newer[8] = 2;
        let checksum = blake3::hash(&newer[..RECORD_BYTES - 32]);
        newer[RECORD_BYTES - 32..].copy_from_slice(checksum.as_bytes());
        scribble(file.path(), RECORD_BYTES as u64, &newer);
        let err = file
            .write(&lease(2, "manager-a"))
            .expect_err("newer version");
        assert!(
            matches!(
                err,
                StoreError::Foreign {
                    slot: 1,
                    source: RecordError::UnsupportedVersion { version: 2 },
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            raw_slots(file.path())[1],
            Err(RecordError::UnsupportedVersion { version: 2 })
        );
        let other = Record {
            pair: "pair-2".to_owned(),
            ..record.clone()
        };
        scribble(file.path(), RECORD_BYTES as u64, &other.encode());
        let err = file.read().expect_err("another pair");
        assert!(matches!(&err, StoreError::WrongPair { slot: 1, found, .. } if found == "pair-2"));
        let twin = Record {
            lease: lease(1, "manager-b"),
            ..record.clone()
        };
        scribble(file.path(), RECORD_BYTES as u64, &twin.encode());
        let err = file.read().expect_err("same sequence");
        assert!(
            matches!(err, StoreError::Conflict { sequence: 1, .. }),
            "{err:?}"
        );
        scribble(file.path(), RECORD_BYTES as u64, &record.encode());
        assert_eq!(file.read().expect("identical twins"), Some(record));
    }

    #[test]
    fn a_lower_epoch_is_refused_before_it_is_written() {
        // Goal: the store keeps epochs from going down, so an older record never holds a
        // higher epoch than a newer one. Method: write epoch 5, then try 4; the file keeps 5.
        let dir = temp_dir();
        let mut file = LeaseFile::open_or_create(dir.path(), PAIR).expect("create");
        let kept = file.write(&lease(5, "manager-a")).expect("write");
        let err = file.write(&lease(4, "manager-b")).expect_err("lower epoch");
        assert!(
            matches!(
                err,
                StoreError::EpochRegression {
                    current_epoch: 5,
                    new_epoch: 4,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(file.read().expect("read"), Some(kept));
        let same = file
            .write(&lease(5, "manager-a"))
            .expect("same epoch renews");
        assert_eq!(same.sequence, 2);
    }

    #[test]
    fn links_bad_names_and_foreign_files_are_refused() {
        // Goal: the lease file is never reached through a symbolic link (file or directory),
        // the pair must be a name, and a second open of the file is locked out. Method: plant
        // a link to a victim; link the directory; open twice; bad pair.
        let root = temp_dir();
        let dir = root.path().join("leases");
        fs::create_dir(&dir).expect("mkdir");
        let victim = root.path().join("victim");
        fs::write(&victim, vec![7u8; FILE_BYTES as usize]).expect("victim");
        symlink(&victim, dir.join("pair-1.lease")).expect("symlink");
        let err = LeaseFile::open_or_create(&dir, PAIR).expect_err("symlink");
        assert!(matches!(err, StoreError::Symlink { .. }), "{err:?}");
        assert!(err.to_string().contains("pair-1.lease"), "{err}");
        assert_eq!(
            fs::read(&victim).expect("victim"),
            vec![7u8; FILE_BYTES as usize]
        );
        let linked_dir = root.path().join("linked");
        symlink(&dir, &linked_dir).expect("dir symlink");
        let err = LeaseFile::open_or_create(&linked_dir, "pair-2").expect_err("dir link");
        assert!(matches!(err, StoreError::NotADirectory { .. }), "{err:?}");
        let err = LeaseFile::open_or_create(&dir, "a/pair").expect_err("bad pair");
        assert!(matches!(
            err,
            StoreError::BadPair(NameError::BadCharacter { .. })
        ));
        let _first = LeaseFile::open_or_create(&dir, "pair-3").expect("first open");
        let err = LeaseFile::open_or_create(&dir, "pair-3").expect_err("second open");
        assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
    }

    #[test]
    fn wrong_sizes_are_refused_and_a_crashed_creation_is_completed() {
        // Goal: a file not two records long is refused with its size, except what a crash
        // during creation leaves (short and all zeros), which is filled. Method: files of
        // several sizes and contents at the lease path.
        let dir = temp_dir();
        let path = dir.path().join("pair-1.lease");
        for (len_bytes, byte) in [(100, 1u8), (FILE_BYTES + 4096, 0), (RECORD_BYTES as u64, 9)] {
            fs::write(&path, vec![byte; len_bytes as usize]).expect("plant");
            let err = LeaseFile::open_or_create(dir.path(), PAIR).expect_err("wrong size");
            assert!(
                matches!(err, StoreError::WrongSize { size_bytes, .. } if size_bytes == len_bytes),
                "{err:?}"
            );
            assert!(err.to_string().contains("pair-1.lease"), "{err}");
        }
        for len_bytes in [0, 512, RECORD_BYTES] {
            fs::write(&path, vec![0u8; len_bytes]).expect("plant");
            let file = LeaseFile::open_or_create(dir.path(), PAIR).expect("completed");
            assert_eq!(fs::metadata(&path).expect("stat").len(), FILE_BYTES);
            assert_eq!(file.read().expect("read"), None);
        }
    }

    /// Real slots whose sync waits for a permit, and whose writes can be made to fail.
    #[derive(Debug)]
    struct SlowSlots {
        inner: DirectSlots,
        permits: Receiver<()>,
        fail_writes: Arc<AtomicBool>,
    }

    impl SlotIo for SlowSlots {
        fn read_slot(&self, slot: usize, buf: &mut AlignedBuf) -> io::Result<()> {
            self.inner.read_slot(slot, buf)
        }

        fn write_slot(&self, slot: usize, buf: &AlignedBuf) -> io::Result<()> {
            if self.fail_writes.load(Ordering::Relaxed) {
                return Err(io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32));
            }
            self.inner.write_slot(slot, buf)
        }

        fn sync(&self) -> io::Result<()> {
            self.permits.recv().map_err(io::Error::other)?;
            self.inner.sync()
        }
    }

    /// A lease file whose syncs each need a permit sent on the returned sender.
    fn slow_file(dir: &Path) -> (LeaseFile, Sender<()>, Arc<AtomicBool>) {
        let path = dir.join("pair-1.lease");
        let file = open_file(dir, &path).expect("open");
        let (permit_tx, permits) = crossbeam_channel::bounded(8);
        let fail_writes = Arc::new(AtomicBool::new(false));
        let io = SlowSlots {
            inner: DirectSlots { file },
            permits,
            fail_writes: Arc::clone(&fail_writes),
        };
        let slots = Slots {
            path,
            pair: PAIR.to_owned(),
            io: Box::new(io),
        };
        (
            LeaseFile::start(slots).expect("start"),
            permit_tx,
            fail_writes,
        )
    }

    #[test]
    fn a_slow_write_times_out_then_busies_the_next_until_it_lands() {
        // Goal: a write stuck in sync returns TimedOut within about its timeout (maybe
        // written), the next write fails fast with Busy without queueing, and once the stuck
        // write lands the next write follows it. Method: syncs gated by permits.
        let dir = temp_dir();
        let (mut file, permits, _) = slow_file(dir.path());
        let timeout = Duration::from_millis(50);
        let started = Instant::now();
        let err = file
            .write_within(&lease(1, "manager-a"), timeout)
            .expect_err("stuck");
        assert!(matches!(err, StoreError::TimedOut { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(5), "bounded wait");
        assert!(err.is_maybe_written());
        assert!(err.to_string().contains("may still land"), "{err}");
        let started = Instant::now();
        let long = Duration::from_secs(30);
        for _ in 0..3 {
            let err = file
                .write_within(&lease(2, "manager-a"), long)
                .expect_err("busy");
            assert!(matches!(err, StoreError::Busy { .. }), "{err:?}");
            assert!(!err.is_maybe_written());
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "Busy does not wait"
        );
        permits.send(()).expect("release the stuck sync");
        permits.send(()).expect("permit the next write's sync");
        // Busy until the late write has also been read back; then the next write follows it.
        let next = wait_for(|| match file.write_within(&lease(2, "manager-b"), long) {
            Err(StoreError::Busy { .. }) => None,
            other => Some(other),
        });
        let next = next.expect("the late write finishes").expect("next write");
        assert_eq!(next.sequence, 2, "the late write landed as sequence 1");
        let late = raw_slots(file.path())[0].clone().expect("late record");
        assert_eq!((late.sequence, late.lease), (1, lease(1, "manager-a")));
        assert_eq!(file.read().expect("read"), Some(next));
    }

    #[test]
    fn a_failed_write_is_maybe_written_and_the_old_record_stands() {
        // Goal: an I/O error while writing is reported as maybe written, with its path, and
        // the previous confirmed record still reads. Method: make writes fail with EIO.
        let dir = temp_dir();
        let (mut file, permits, fail_writes) = slow_file(dir.path());
        permits.send(()).expect("permit");
        let kept = file.write(&lease(1, "manager-a")).expect("write");
        fail_writes.store(true, Ordering::Relaxed);
        let err = file.write(&lease(2, "manager-a")).expect_err("EIO");
        assert!(matches!(err, StoreError::Write { slot: 1, .. }), "{err:?}");
        assert!(err.is_maybe_written());
        assert!(std::error::Error::source(&err).is_some(), "chained");
        assert_eq!(file.read().expect("read"), Some(kept));
    }

    /// Polls `probe` until it gives Some, for at most 10 s.
    fn wait_for<T>(mut probe: impl FnMut() -> Option<T>) -> Option<T> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(found) = probe() {
                return Some(found);
            }
            thread::sleep(Duration::from_millis(5));
        }
        None
    }
}
