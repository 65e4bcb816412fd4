//! The io engines: how one NBD connection's requests reach the image.
//!
//! [`BlockIo`] is the interface the session drives: `submit` queues a request (and takes its
//! buffer), `complete` hands requests back with their result and buffer, in completion order.
//! Two engines implement it:
//! - [`uring::UringEngine`]: io_uring on the O_DIRECT descriptor for aligned requests, on the
//!   buffered descriptor for unaligned writes (the kernel does the read-modify-write under its
//!   page lock, so two unaligned writes sharing a 4 KiB block never undo each other), batched
//!   into one `io_uring_enter` per loop of the session.
//! - [`sync::SyncEngine`]: pread/pwrite on the buffered descriptor, one request at a time;
//!   the fallback when io_uring is missing and the reference model of the conformance tests.
//!
//! Invariants every engine keeps (checked by `tests.rs` for both):
//! - A completion with `Ok` means the bytes are in the image (through the page cache or
//!   O_DIRECT); with `fua` or for `Flush`, durable (RWF_DSYNC / fdatasync) — DESIGN
//!   invariant 2.
//! - Every submitted request comes back exactly once, with its buffer: from `submit` on
//!   refusal, from `complete` otherwise.
//! - A READ's data is `buf[data_start..data_start + len_bytes]`; the buffer is at least
//!   [`read_buf_len`] bytes.

pub mod sync;
#[cfg(test)]
mod tests;
pub mod uring;

use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::Arc;

use ferry_sys::{AlignedBuf, DirectFile, DIRECT_ALIGN};

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Read `len_bytes` at `offset_bytes` into the buffer.
    Read,
    /// Write the buffer's first `len_bytes`; with `fua`, durable before completion.
    Write {
        /// Forced unit access (RWF_DSYNC).
        fua: bool,
    },
    /// fdatasync of the image.
    Flush,
    /// Punch a hole (reads return zeros afterwards).
    Trim {
        /// Durable before completion.
        fua: bool,
    },
    /// Make the range read as zeros.
    WriteZeroes {
        /// A hole may be punched (NBD: no NO_HOLE flag); otherwise the range stays allocated.
        may_trim: bool,
        /// Durable before completion.
        fua: bool,
    },
}

/// One request for an engine.
#[derive(Debug)]
pub struct IoRequest {
    /// Caller's identifier, returned with the completion.
    pub tag: u64,
    /// What to do.
    pub kind: IoKind,
    /// Image offset.
    pub offset_bytes: u64,
    /// Bytes (0 for Flush).
    pub len_bytes: u32,
    /// The data of a Write, the destination of a Read ([`read_buf_len`] bytes or more).
    pub buf: Option<AlignedBuf>,
}

/// A finished request.
#[derive(Debug)]
pub struct IoCompletion {
    /// The request's tag.
    pub tag: u64,
    /// Whether it succeeded; errors carry the OS errno where there is one.
    pub result: io::Result<()>,
    /// The request's buffer, handed back.
    pub buf: Option<AlignedBuf>,
    /// For a Read: where its data starts in `buf`.
    pub data_start: usize,
}

/// Errors of an engine as a whole (a single request's failure is in its completion).
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// io_uring is missing or refused.
    #[error("io_uring unavailable")]
    Unavailable(#[source] ferry_sys::uring::RingError),
    /// Every slot is in use: complete something first.
    #[error("io engine queue is full")]
    Full,
    /// The request is malformed (a caller bug the engine refuses instead of passing on).
    #[error("bad io request: {0}")]
    BadRequest(&'static str),
    /// Submitting to the kernel failed.
    #[error("io submission failed")]
    Submit(#[source] ferry_sys::uring::RingError),
}

impl From<IoError> for io::Error {
    fn from(err: IoError) -> io::Error {
        let kind = match err {
            IoError::Full => io::ErrorKind::WouldBlock,
            IoError::BadRequest(_) => io::ErrorKind::InvalidInput,
            IoError::Unavailable(_) | IoError::Submit(_) => io::ErrorKind::Other,
        };
        io::Error::new(kind, crate::error::error_chain(&err))
    }
}

/// The interface of an io engine; one per connection, driven by that connection's thread.
pub trait BlockIo: Send + fmt::Debug {
    /// Most requests in flight at once.
    fn capacity(&self) -> usize;

    /// Requests submitted and not yet completed.
    fn in_flight(&self) -> usize;

    /// Queues a request. On refusal the request comes back, buffer included.
    fn submit(&mut self, request: IoRequest) -> Result<(), (IoError, IoRequest)>;

    /// Sends queued requests to the kernel, waits until at least `min_complete` (capped at
    /// the requests in flight) are done, and appends every finished one to `out`. When a
    /// readable wake-up is armed ([`BlockIo::arm_readable`]) and fires, the wait ends early,
    /// possibly with nothing in `out`.
    fn complete(&mut self, min_complete: usize, out: &mut Vec<IoCompletion>)
        -> Result<(), IoError>;

    /// Arms a one-shot wake-up for when the connection given to [`open_engine`] has data, so
    /// that the next [`BlockIo::complete`] also returns when a request arrives. Returns false
    /// when the engine cannot watch the connection (the caller then waits for disk only).
    fn arm_readable(&mut self) -> bool {
        false
    }
}

/// Which engine a connection gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// io_uring + O_DIRECT.
    Uring,
    /// pread/pwrite through the page cache.
    Sync,
}

/// Opens an engine on `file` with room for `queue_depth` requests in flight; `connection`,
/// when given, is the socket [`BlockIo::arm_readable`] watches.
pub fn open_engine(
    kind: EngineKind,
    file: Arc<DirectFile>,
    queue_depth: u32,
    connection: Option<BorrowedFd<'_>>,
) -> Result<Box<dyn BlockIo>, IoError> {
    Ok(match kind {
        EngineKind::Uring => Box::new(uring::UringEngine::new(file, queue_depth, connection)?),
        EngineKind::Sync => Box::new(sync::SyncEngine::new(file, queue_depth)),
    })
}

/// Checks at start-up that io_uring works here with the opcodes the engine needs.
pub fn probe_uring() -> Result<(), IoError> {
    ferry_sys::uring::probe().map_err(IoError::Unavailable)
}

/// Whether a range can go to the O_DIRECT descriptor as it is.
pub fn is_aligned(offset_bytes: u64, len_bytes: u32) -> bool {
    let align = DIRECT_ALIGN as u64;
    offset_bytes % align == 0 && u64::from(len_bytes) % align == 0
}

/// Where a read's data starts in its buffer: reads are widened to whole 4 KiB blocks.
pub fn read_data_start(offset_bytes: u64) -> usize {
    (offset_bytes % DIRECT_ALIGN as u64) as usize
}

/// Buffer bytes a READ needs: its range widened to whole 4 KiB blocks, so the engine can read
/// it with O_DIRECT and hand back the buffer without copying.
pub fn read_buf_len(offset_bytes: u64, len_bytes: u32) -> usize {
    let align = DIRECT_ALIGN as u64;
    let start = offset_bytes - offset_bytes % align;
    let end = (offset_bytes + u64::from(len_bytes)).div_ceil(align) * align;
    usize::try_from(end - start)
        .expect("request lengths are bounded")
        .max(DIRECT_ALIGN)
}

/// Runs a TRIM or WRITE_ZEROES on `file` (no engine does these asynchronously: io_uring's
/// fallocate would need a wider opcode allow-list for no gain, the call is a metadata update).
fn zero_or_trim(
    file: &DirectFile,
    kind: IoKind,
    offset_bytes: u64,
    len_bytes: u32,
) -> io::Result<()> {
    let len = u64::from(len_bytes);
    let fua = match kind {
        IoKind::Trim { fua } => {
            match file.punch_hole(offset_bytes, len) {
                // TRIM is advisory: a device that cannot discard keeps the data, which is allowed.
                Err(err) if is_not_supported(&err) => {}
                other => other?,
            }
            fua
        }
        IoKind::WriteZeroes { may_trim, fua } => {
            let punched = may_trim && file.punch_hole(offset_bytes, len).is_ok();
            if !punched {
                file.zero_range(offset_bytes, len)?;
            }
            fua
        }
        IoKind::Read | IoKind::Write { .. } | IoKind::Flush => {
            unreachable!("zero_or_trim called for {kind:?}")
        }
    };
    if fua {
        file.datasync()?;
    }
    Ok(())
}

fn is_not_supported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(code) if code == nix::libc::EOPNOTSUPP || code == nix::libc::ENOSYS
    )
}

/// Checks what the engines rely on before touching the disk; `wire::validate` already
/// enforces the same for network requests, so this catches only caller bugs.
fn check_request(request: &IoRequest) -> Result<(), &'static str> {
    match request.kind {
        IoKind::Read => match &request.buf {
            Some(buf) if buf.len() >= read_buf_len(request.offset_bytes, request.len_bytes) => {
                Ok(())
            }
            _ => Err("read buffer missing or too short"),
        },
        IoKind::Write { .. } => match &request.buf {
            Some(buf) if buf.len() >= request.len_bytes as usize => Ok(()),
            _ => Err("write buffer missing or too short"),
        },
        IoKind::Flush | IoKind::Trim { .. } | IoKind::WriteZeroes { .. } => Ok(()),
    }
}
