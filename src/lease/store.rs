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
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, TrySendError};
use ferry_sys::{AlignedBuf, DIRECT_ALIGN};
use thiserror::Error;

mod file;

use super::record::{Record, RecordError, RECORD_BYTES};
use super::Lease;
use crate::name::{self, NameError};
use file::{ensure_dir, open_file, DirectSlots};

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
    /// call is [`StoreError::Busy`] until it has finished (module docs). A zero `timeout`
    /// never waits, so it never confirms (however fast the disk).
    pub fn write_within(&mut self, lease: &Lease, timeout: Duration) -> Result<Record, StoreError> {
        let ticket = self.submit(lease)?;
        let answer = if timeout.is_zero() {
            Err(RecvTimeoutError::Timeout)
        } else {
            self.replies.recv_timeout(timeout)
        };
        match answer {
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

#[cfg(test)]
mod tests;
