//! One connection's target at the destination: the frames of a block stream applied to
//! its image. Data is written only after its digest checked, through an io engine with
//! several writes in flight, never two overlapping at once (a resent block must win over its
//! older copy); Sync and Commit drain and fdatasync; every received block is marked once its
//! write completed.
//!
//! A Fence does not drain: it is answered once every write submitted before it completed,
//! while the frames after it keep being applied. A mirroring source sends one per batch of
//! guest writes, thousands a second; draining at each would empty the write pipeline that
//! many times and hold the guest's writes behind the copy's.
//!
//! Invariants:
//! - Requests are tagged in submission order, so "every write before the Fence completed" is
//!   "the oldest tag in flight is the Fence's watermark or newer".
//! - FenceOks go out in the order of their Fences; every Fence read is answered before the
//!   target waits for the next frame with nothing arriving, and before any other reply.
//! - At most [`MAX_PENDING_FENCES`] wait: past that the target reaps writes before it reads
//!   on, so a peer sending Fences faster than writes complete gains no memory.

/// Largest single WriteZeroes/Trim request (engine lengths are u32).
const MAX_ZERO_REQUEST_BYTES: u64 = 1 << 30;
/// Fences waiting for their writes before the target stops reading to reap them: far more
/// than a mirroring source's sessions have in flight at once.
pub(in crate::transfer) const MAX_PENDING_FENCES: usize = 1024;

/// The most Fences that waited at once on any target in this process: the tests check the
/// cap against it.
#[cfg(test)]
pub(in crate::transfer) static MOST_FENCES_WAITING: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(0);

use std::collections::{BTreeMap, VecDeque};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::Arc;

use ferry_sys::{DirectFile, DIRECT_ALIGN};

use super::super::frame::{Frame, TargetSpec};
use super::super::host::TargetHost;
use super::super::link::{self, read_frame, unexpected, write_frame, Link};
use super::super::TransferError;
use super::hash_image;
use crate::dirty::{DirtyBitmap, DirtySet};
use crate::io::{BlockIo, IoCompletion, IoKind, IoRequest};
use crate::nbd::bufpool::BufPool;

/// The target of one connection: its engine, the writes in flight and the received blocks.
#[derive(Debug)]
pub(super) struct Target {
    spec: TargetSpec,
    file: Arc<DirectFile>,
    engine: Box<dyn BlockIo>,
    /// tag → (offset, length) of each request in flight.
    in_flight: BTreeMap<u64, (u64, u64)>,
    next_tag: u64,
    /// Fences read and not answered: (seq, the first tag submitted after the Fence).
    fences: VecDeque<(u64, u64)>,
    received: DirtyBitmap,
    pool: BufPool,
    done: Vec<IoCompletion>,
    meta: Vec<u8>,
    scratch: Vec<u8>,
}

impl Target {
    pub(super) fn new(
        spec: &TargetSpec,
        file: Arc<DirectFile>,
        engine: Box<dyn BlockIo>,
    ) -> Target {
        Target {
            spec: spec.clone(),
            file,
            engine,
            in_flight: BTreeMap::new(),
            next_tag: 0,
            fences: VecDeque::new(),
            received: DirtyBitmap::new(spec.size_bytes.div_ceil(spec.granularity_bytes)),
            pool: BufPool::new(),
            done: Vec::new(),
            meta: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Applies frames until Abort, a clean close after Commit, or an error.
    pub(super) fn apply_frames(
        &mut self,
        stream: &mut Link<TcpStream>,
        host: &dyn TargetHost,
    ) -> Result<&'static str, TransferError> {
        let mut committed = false;
        // At an in-sync point and nothing written since: the source may close here.
        let mut at_point = false;
        loop {
            self.await_fences_or_input(stream)?;
            let frame = match read_frame(stream, &mut self.meta) {
                Ok(frame) => frame,
                Err(TransferError::PeerGone(_)) if committed => return Ok("committed"),
                Err(TransferError::PeerGone(_)) if at_point => return Ok("in sync"),
                Err(err) => return Err(err),
            };
            at_point = matches!(frame, Frame::Mark { .. });
            if committed {
                // The target is served now: nothing may write it from this stream any more.
                return Err(unexpected(frame, "the end of the stream after Commit"));
            }
            match frame {
                Frame::Data {
                    offset_bytes,
                    len_bytes,
                    digest,
                } => self.receive_data(stream, offset_bytes, len_bytes, &digest)?,
                Frame::Zero {
                    offset_bytes,
                    len_bytes,
                } => self.zero_or_trim(offset_bytes, len_bytes, true)?,
                Frame::Trim {
                    offset_bytes,
                    len_bytes,
                } => self.zero_or_trim(offset_bytes, len_bytes, false)?,
                Frame::Sync { seq } => {
                    self.flush()?;
                    self.answer_fences(stream)?;
                    let mut received =
                        DirtySet::empty(self.spec.granularity_bytes, self.spec.size_bytes);
                    self.received.load_into(&mut received);
                    host.checkpoint(&self.spec, &received);
                    let reply = Frame::SyncOk {
                        seq,
                        received_blocks: self.received.count(),
                    };
                    write_frame(stream, &reply, &mut self.scratch)?;
                }
                Frame::Fence { seq } => {
                    self.fences.push_back((seq, self.next_tag));
                    #[cfg(test)]
                    MOST_FENCES_WAITING
                        .fetch_max(self.fences.len(), std::sync::atomic::Ordering::Relaxed);
                    self.answer_fences(stream)?;
                }
                Frame::Digests {
                    seq,
                    offset_bytes,
                    block_bytes,
                    count,
                } => {
                    self.drain()?;
                    self.answer_fences(stream)?;
                    let digests = self.digests(offset_bytes, block_bytes, count)?;
                    write_frame(
                        stream,
                        &Frame::DigestsOk { seq, digests },
                        &mut self.scratch,
                    )?;
                }
                Frame::Verify { seq } => {
                    self.drain()?;
                    self.answer_fences(stream)?;
                    let digest = hash_image(&self.file, self.spec.size_bytes)?;
                    let reply = Frame::VerifyOk { seq, digest };
                    write_frame(stream, &reply, &mut self.scratch)?;
                }
                Frame::Commit { seq, manager_epoch } => {
                    self.flush()?;
                    self.answer_fences(stream)?;
                    host.commit_target(&self.spec, manager_epoch)
                        .map_err(|err| {
                            log::warn!(
                                "target {} not committed: {}",
                                self.spec.export,
                                crate::error::error_chain(&err)
                            );
                            TransferError::Refused {
                                reason: err.peer_reason(),
                            }
                        })?;
                    committed = true;
                    write_frame(stream, &Frame::CommitOk { seq }, &mut self.scratch)?;
                }
                Frame::Mark { seq, at_unix_ms } => {
                    self.flush()?;
                    self.answer_fences(stream)?;
                    host.mark_in_sync(&self.spec, at_unix_ms).map_err(|err| {
                        log::warn!(
                            "target {}: in-sync point not recorded: {}",
                            self.spec.export,
                            crate::error::error_chain(&err)
                        );
                        TransferError::Refused {
                            reason: err.peer_reason(),
                        }
                    })?;
                    write_frame(stream, &Frame::MarkOk { seq }, &mut self.scratch)?;
                }
                Frame::Abort => {
                    self.drain()?;
                    self.answer_fences(stream)?;
                    host.abort_target(&self.spec);
                    write_frame(stream, &Frame::Abort, &mut self.scratch)?;
                    return Ok("aborted");
                }
                other => {
                    return Err(unexpected(
                        other,
                        "Data, Zero, Trim, Sync, Fence, Verify, Mark, Commit or Abort",
                    ))
                }
            }
        }
    }

    /// BLAKE3 of each of `count` blocks from `offset_bytes`, the last clipped to the disk.
    fn digests(
        &mut self,
        offset_bytes: u64,
        block_bytes: u32,
        count: u32,
    ) -> Result<Vec<[u8; 32]>, TransferError> {
        let span = u64::from(block_bytes) * u64::from(count);
        let end = offset_bytes
            .checked_add(span)
            .map(|end| end.min(self.spec.size_bytes))
            .filter(|&end| end > offset_bytes)
            .ok_or(TransferError::OutOfRange {
                offset_bytes,
                len_bytes: span,
            })?;
        let mut buf = vec![0u8; block_bytes as usize];
        let mut digests = Vec::with_capacity(count as usize);
        let mut at = offset_bytes;
        while at < end {
            let len = usize::try_from((end - at).min(u64::from(block_bytes))).expect("≤ u32");
            self.file
                .read_at(at, &mut buf[..len])
                .map_err(TransferError::TargetWrite)?;
            digests.push(*blake3::hash(&buf[..len]).as_bytes());
            at += len as u64;
        }
        Ok(digests)
    }

    fn check_range(&self, offset_bytes: u64, len_bytes: u64) -> Result<(), TransferError> {
        match offset_bytes.checked_add(len_bytes) {
            Some(end) if end <= self.spec.size_bytes => Ok(()),
            _ => Err(TransferError::OutOfRange {
                offset_bytes,
                len_bytes,
            }),
        }
    }

    /// Reads a Data payload, checks its digest, then queues its write.
    fn receive_data(
        &mut self,
        stream: &mut Link<TcpStream>,
        offset_bytes: u64,
        len_bytes: u32,
        digest: &[u8; 32],
    ) -> Result<(), TransferError> {
        self.check_range(offset_bytes, u64::from(len_bytes))?;
        let len = len_bytes as usize;
        let mut buf = self.pool.take(len.next_multiple_of(DIRECT_ALIGN));
        link::read_payload(stream, &mut buf.as_mut_slice()[..len])?;
        let actual = blake3::hash(&buf.as_slice()[..len]);
        if actual != blake3::Hash::from(*digest) {
            self.pool.give(buf);
            return Err(TransferError::Digest { offset_bytes });
        }
        self.submit(IoRequest {
            tag: 0,
            kind: IoKind::Write { fua: false },
            offset_bytes,
            len_bytes,
            buf: Some(buf),
        })
    }

    /// Queues a hole (Zero) or a discard (Trim), in pieces the engine accepts.
    fn zero_or_trim(
        &mut self,
        offset_bytes: u64,
        len_bytes: u64,
        zero: bool,
    ) -> Result<(), TransferError> {
        self.check_range(offset_bytes, len_bytes)?;
        let kind = if zero {
            IoKind::WriteZeroes {
                may_trim: true,
                fua: false,
            }
        } else {
            IoKind::Trim { fua: false }
        };
        let end_bytes = offset_bytes + len_bytes;
        let mut at_bytes = offset_bytes;
        while at_bytes < end_bytes {
            let piece = (end_bytes - at_bytes).min(MAX_ZERO_REQUEST_BYTES);
            self.submit(IoRequest {
                tag: 0,
                kind,
                offset_bytes: at_bytes,
                len_bytes: u32::try_from(piece).expect("≤ 1 GiB"),
                buf: None,
            })?;
            at_bytes += piece;
        }
        Ok(())
    }

    /// Submits a request once the engine has room and no write in flight overlaps it.
    fn submit(&mut self, mut request: IoRequest) -> Result<(), TransferError> {
        let start = request.offset_bytes;
        let end = start + u64::from(request.len_bytes);
        while self.engine.in_flight() >= self.engine.capacity()
            || self
                .in_flight
                .values()
                .any(|&(offset, len)| offset < end && start < offset + len)
        {
            self.complete(1)?;
        }
        request.tag = self.next_tag;
        self.next_tag += 1;
        self.in_flight.insert(request.tag, (start, end - start));
        if let Err((err, request)) = self.engine.submit(request) {
            self.in_flight.remove(&request.tag);
            return Err(TransferError::Engine(err));
        }
        // To the kernel now (a queued request waits for the engine to be entered): else
        // the disk sits idle while the next frames arrive, until the queue is full.
        self.complete(0)
    }

    /// Waits for at least `min_complete` requests; marks the blocks of each finished write.
    fn complete(&mut self, min_complete: usize) -> Result<(), TransferError> {
        self.engine
            .complete(min_complete, &mut self.done)
            .map_err(TransferError::Engine)?;
        let mut failure = None;
        for completion in self.done.drain(..) {
            let (offset_bytes, len_bytes) = self
                .in_flight
                .remove(&completion.tag)
                .expect("every completion matches a submitted request");
            if let Some(buf) = completion.buf {
                self.pool.give(buf);
            }
            match completion.result {
                // Marked only now that the write completed (DESIGN invariant 1).
                Ok(()) if len_bytes > 0 => {
                    let granularity = self.spec.granularity_bytes;
                    let first = offset_bytes / granularity;
                    let last = (offset_bytes + len_bytes - 1) / granularity;
                    self.received.mark_blocks(first, last);
                }
                Ok(()) => {}
                Err(err) => failure = failure.or(Some(err)),
            }
        }
        failure.map_or(Ok(()), |err| Err(TransferError::TargetWrite(err)))
    }

    /// Answers, in order, every Fence whose writes have all completed.
    fn answer_fences(&mut self, stream: &mut Link<TcpStream>) -> Result<(), TransferError> {
        let oldest_in_flight = self.in_flight.keys().next().copied().unwrap_or(u64::MAX);
        while let Some(&(seq, watermark)) = self.fences.front() {
            if oldest_in_flight < watermark {
                break;
            }
            self.fences.pop_front();
            write_frame(stream, &Frame::FenceOk { seq }, &mut self.scratch)?;
        }
        Ok(())
    }

    /// Before waiting for the next frame: answers the Fences that can be, and while some
    /// wait on writes and nothing has arrived, reaps completions (the engine's wait also
    /// ends when the socket turns readable, where it watches it).
    fn await_fences_or_input(&mut self, stream: &mut Link<TcpStream>) -> Result<(), TransferError> {
        loop {
            self.answer_fences(stream)?;
            if self.fences.is_empty()
                || (self.fences.len() < MAX_PENDING_FENCES && has_input(stream)?)
            {
                return Ok(());
            }
            self.engine.arm_readable();
            self.complete(1)?;
        }
    }

    /// Waits for every request in flight.
    pub(super) fn drain(&mut self) -> Result<(), TransferError> {
        while !self.in_flight.is_empty() {
            self.complete(self.in_flight.len())?;
        }
        Ok(())
    }

    /// Drains, then fdatasyncs the target (the Fences waiting are answerable after it).
    fn flush(&mut self) -> Result<(), TransferError> {
        self.drain()?;
        self.submit(IoRequest {
            tag: 0,
            kind: IoKind::Flush,
            offset_bytes: 0,
            len_bytes: 0,
            buf: None,
        })?;
        self.drain()
    }
}

/// Whether the socket holds unread bytes (or its end): a read would not block.
fn has_input(stream: &Link<TcpStream>) -> Result<bool, TransferError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(ready) => Ok(ready > 0),
        Err(nix::errno::Errno::EINTR) => Ok(false),
        Err(err) => Err(TransferError::Socket(err.into())),
    }
}
