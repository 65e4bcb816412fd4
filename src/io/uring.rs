//! The io_uring engine: one ring per connection, the image registered twice (O_DIRECT and
//! buffered descriptors), every request of a session loop submitted with one `io_uring_enter`.
//!
//! Routing, and why:
//! - Aligned READ/WRITE (offset and length multiples of 4 KiB) go O_DIRECT: no page-cache
//!   copy, no cache pollution, the same semantics as `qemu-nbd --cache=none`.
//! - Unaligned READs are widened to whole blocks and still go O_DIRECT; the data starts at
//!   `offset % 4096` in the buffer, so nothing is copied.
//! - Unaligned WRITEs go to the buffered descriptor with their exact bytes: the kernel merges
//!   them into the page under its page lock. A read-modify-write in ferry would race with a
//!   concurrent unaligned write to the other half of the same block and lose it.
//!   Linux keeps the two paths coherent: O_DIRECT I/O writes back and invalidates the cached
//!   pages of its range first.
//! - FLUSH is `fdatasync` (covers both descriptors: it is one inode); FUA is `RWF_DSYNC`.
//! - TRIM and WRITE_ZEROES are `fallocate`, run inline (see `super::zero_or_trim`).
//! - The connection's socket is registered too: [`BlockIo::arm_readable`] queues a POLLIN on it
//!   in a slot reserved for it, so the session's one `io_uring_enter` wakes for a disk
//!   completion or a new request, whichever comes first. Measured: 4k random writes at QD32
//!   went from ~62k to ~85-95k IOPS (waiting for the disk alone left new requests in the
//!   socket until the next completion).
//!
//! Invariant: a short transfer (the kernel may return fewer bytes, e.g. at the end of an image
//! whose size is not a multiple of 4 KiB) is finished with pread/pwrite before the request
//! completes, so `Ok` always means every byte.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use ferry_sys::uring::{Completion, Op, Ring, RingError};
use ferry_sys::DirectFile;

use super::{
    check_request, is_aligned, read_buf_len, read_data_start, zero_or_trim, BlockIo, IoCompletion,
    IoError, IoKind, IoRequest,
};

/// Registered file index of the O_DIRECT descriptor.
const FILE_DIRECT: u32 = 0;
/// Registered file index of the buffered descriptor.
const FILE_BUFFERED: u32 = 1;
/// Registered file index of the connection's socket, when there is one.
const FILE_CONNECTION: u32 = 2;
/// Ring tag of the readable wake-up (meta indexes are below the ring depth).
const TAG_READABLE: u64 = u64::MAX;

/// What the engine remembers of a request in the ring.
#[derive(Debug, Clone, Copy)]
struct Meta {
    tag: u64,
    kind: IoKind,
    offset_bytes: u64,
    len_bytes: u32,
}

/// The io_uring engine of one connection.
#[derive(Debug)]
pub struct UringEngine {
    file: Arc<DirectFile>,
    ring: Ring,
    metas: Vec<Option<Meta>>,
    free_metas: Vec<u32>,
    /// Requests finished inline (TRIM, WRITE_ZEROES), waiting for `complete`.
    ready: Vec<IoCompletion>,
    reaped: Vec<Completion>,
    /// Whether the connection is registered (a readable wake-up can be armed).
    watches_connection: bool,
    /// A PollIn on the connection is in the ring.
    readable_armed: bool,
}

impl UringEngine {
    /// A ring of `queue_depth` slots on `file`.
    pub fn new(
        file: Arc<DirectFile>,
        queue_depth: u32,
        connection: Option<BorrowedFd<'_>>,
    ) -> Result<Self, IoError> {
        let depth = queue_depth.clamp(1, ferry_sys::uring::MAX_DEPTH - 1);
        let mut files = vec![file.direct_fd(), file.buffered_fd()];
        files.extend(connection);
        // One slot more than requests: the readable wake-up never takes a request's place.
        let ring = Ring::new(depth + 1, &files).map_err(IoError::Unavailable)?;
        let slots = usize::try_from(depth).expect("depth fits in usize");
        Ok(UringEngine {
            file,
            ring,
            metas: vec![None; slots],
            free_metas: (0..depth).rev().collect(),
            ready: Vec::with_capacity(slots),
            reaped: Vec::with_capacity(slots + 1),
            watches_connection: connection.is_some(),
            readable_armed: false,
        })
    }

    /// The ring op for a request (Read, Write or Flush).
    fn op_for(request: &mut IoRequest) -> Op {
        match request.kind {
            IoKind::Read => {
                let start = request.offset_bytes - read_data_start(request.offset_bytes) as u64;
                let span = read_buf_len(request.offset_bytes, request.len_bytes);
                Op::Read {
                    file_index: FILE_DIRECT,
                    offset_bytes: start,
                    len_bytes: u32::try_from(span).expect("request lengths are bounded"),
                    buf: request.buf.take().expect("checked"),
                }
            }
            IoKind::Write { fua } => Op::Write {
                file_index: if is_aligned(request.offset_bytes, request.len_bytes) {
                    FILE_DIRECT
                } else {
                    FILE_BUFFERED
                },
                offset_bytes: request.offset_bytes,
                len_bytes: request.len_bytes,
                buf: request.buf.take().expect("checked"),
                dsync: fua,
            },
            IoKind::Flush => Op::Fsync {
                file_index: FILE_DIRECT,
            },
            IoKind::Trim { .. } | IoKind::WriteZeroes { .. } => {
                unreachable!("fallocate requests run inline")
            }
        }
    }

    /// Turns a ring completion into the request's, finishing a short transfer inline.
    fn finish(&mut self, completion: Completion) -> IoCompletion {
        let index = usize::try_from(completion.user_tag).expect("meta index fits in usize");
        let meta = self.metas[index]
            .take()
            .expect("completion for an unused meta slot");
        self.free_metas
            .push(u32::try_from(index).expect("index < depth"));
        let mut buf = completion.op.into_buf();
        let data_start = match meta.kind {
            IoKind::Read => read_data_start(meta.offset_bytes),
            _ => 0,
        };
        let result = completion.result.and_then(|done_bytes| {
            let done = done_bytes as usize;
            match meta.kind {
                IoKind::Read => {
                    let end = data_start + meta.len_bytes as usize;
                    if done >= end {
                        return Ok(());
                    }
                    let from = meta.offset_bytes - data_start as u64 + done as u64;
                    let data = buf.as_mut().expect("a read has a buffer").as_mut_slice();
                    self.file.read_at(from, &mut data[done..end])
                }
                IoKind::Write { fua } => {
                    let len = meta.len_bytes as usize;
                    if done >= len {
                        return Ok(());
                    }
                    let data = buf.as_ref().expect("a write has a buffer").as_slice();
                    self.file
                        .write_at(meta.offset_bytes + done as u64, &data[done..len])?;
                    if fua {
                        self.file.datasync()?;
                    }
                    Ok(())
                }
                _ => Ok(()),
            }
        });
        IoCompletion {
            tag: meta.tag,
            result,
            buf,
            data_start,
        }
    }
}

impl BlockIo for UringEngine {
    fn capacity(&self) -> usize {
        self.metas.len()
    }

    fn in_flight(&self) -> usize {
        self.ring.in_flight() - usize::from(self.readable_armed) + self.ready.len()
    }

    fn arm_readable(&mut self) -> bool {
        if !self.watches_connection {
            return false;
        }
        if !self.readable_armed {
            let poll = Op::PollIn {
                file_index: FILE_CONNECTION,
            };
            // A slot is reserved for the wake-up, so this fails only on a bug; waiting for
            // the disk alone is still correct then.
            self.readable_armed = self.ring.push(TAG_READABLE, poll).is_ok();
        }
        self.readable_armed
    }

    fn submit(&mut self, mut request: IoRequest) -> Result<(), (IoError, IoRequest)> {
        if let Err(reason) = check_request(&request) {
            return Err((IoError::BadRequest(reason), request));
        }
        if let IoKind::Trim { .. } | IoKind::WriteZeroes { .. } = request.kind {
            if self.in_flight() >= self.capacity() {
                return Err((IoError::Full, request));
            }
            let result = zero_or_trim(
                &self.file,
                request.kind,
                request.offset_bytes,
                request.len_bytes,
            );
            let done = IoCompletion {
                tag: request.tag,
                result,
                buf: request.buf,
                data_start: 0,
            };
            self.ready.push(done);
            return Ok(());
        }
        let Some(index) = self.free_metas.pop() else {
            return Err((IoError::Full, request));
        };
        let meta = Meta {
            tag: request.tag,
            kind: request.kind,
            offset_bytes: request.offset_bytes,
            len_bytes: request.len_bytes,
        };
        let op = Self::op_for(&mut request);
        match self.ring.push(u64::from(index), op) {
            Ok(()) => {
                self.metas[index as usize] = Some(meta);
                Ok(())
            }
            Err((err, op)) => {
                self.free_metas.push(index);
                request.buf = op.into_buf();
                let err = match err {
                    RingError::Full => IoError::Full,
                    RingError::BadOp(reason) => IoError::BadRequest(reason),
                    other => IoError::Submit(other),
                };
                Err((err, request))
            }
        }
    }

    fn complete(
        &mut self,
        min_complete: usize,
        out: &mut Vec<IoCompletion>,
    ) -> Result<(), IoError> {
        let inline = self.ready.len();
        out.append(&mut self.ready);
        let want = min_complete.saturating_sub(inline);
        self.ring.submit_and_wait(want).map_err(IoError::Submit)?;
        let mut reaped = std::mem::take(&mut self.reaped);
        self.ring.reap(&mut reaped);
        for completion in reaped.drain(..) {
            if completion.user_tag == TAG_READABLE {
                // Readable, hung up or failed: in every case the session reads the socket next.
                self.readable_armed = false;
                continue;
            }
            let done = self.finish(completion);
            out.push(done);
        }
        self.reaped = reaped;
        Ok(())
    }
}
