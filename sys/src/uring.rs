//! A small io_uring ring that owns every operation in flight.
//!
//! Purpose: aligned reads/writes and datasyncs on registered (fixed) files, batched into one
//! `io_uring_enter` per call, with completions reaped into a caller-owned `Vec`.
//!
//! Invariants (the ownership model):
//! - The ring owns each [`Op`] and its [`AlignedBuf`] from [`Ring::push`] until
//!   [`Ring::reap`] hands it back with its completion. The SQE points into that heap buffer,
//!   which never moves and is never freed while the kernel may use it.
//! - `push` returns the op on failure, so no buffer is ever lost.
//! - `Drop` waits for every op in flight; if it cannot, it leaks their buffers
//!   (`mem::forget`): leaking is safe, freeing memory the kernel may still write is not.
//! - Ops live in a slab of `depth` slots with a free list; the SQE user data is the slot index,
//!   so steady-state operation allocates nothing.
//! - A ring is driven by one thread. It is created disabled and enabled by its first
//!   `submit`, so with `SINGLE_ISSUER` the issuer is the thread that uses it, not the one that
//!   built it.
//! - Only Read, Write, Fsync and PollAdd on fixed files are allowed (io_uring restrictions).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::register::{Probe, Restriction};
use io_uring::{opcode, squeue, types, IoUring};

use crate::errno::{self, CqeAction};
use crate::AlignedBuf;

/// Largest ring depth accepted by [`Ring::new`].
pub const MAX_DEPTH: u32 = 4096;

/// `IORING_ENTER_GETEVENTS`: wait for, and (with deferred task work) run, completions.
const ENTER_GETEVENTS: u32 = 1;

/// Rounds of `Drop` without progress after which the remaining buffers are leaked.
const DROP_STALL_ROUNDS: u32 = 1000;

/// One operation on a registered file; `file_index` indexes the `files` given to
/// [`Ring::new`]. Offsets, lengths and buffers must be aligned as the file requires
/// (`O_DIRECT`: [`DIRECT_ALIGN`](crate::DIRECT_ALIGN)), or the kernel answers `EINVAL`.
#[derive(Debug)]
pub enum Op {
    /// Reads `len_bytes` at `offset_bytes` into `buf[..len_bytes]`.
    Read {
        /// Index of the registered file.
        file_index: u32,
        /// File offset.
        offset_bytes: u64,
        /// Bytes to read; at most `buf.len()`.
        len_bytes: u32,
        /// Destination; owned by the ring while in flight.
        buf: AlignedBuf,
    },
    /// Writes `buf[..len_bytes]` at `offset_bytes`; with `dsync`, durable on completion
    /// (`RWF_DSYNC`, the FUA of NBD).
    Write {
        /// Index of the registered file.
        file_index: u32,
        /// File offset.
        offset_bytes: u64,
        /// Bytes to write; at most `buf.len()`.
        len_bytes: u32,
        /// Source; owned by the ring while in flight.
        buf: AlignedBuf,
        /// Complete only once the data is durable.
        dsync: bool,
    },
    /// `fdatasync` of the file.
    Fsync {
        /// Index of the registered file.
        file_index: u32,
    },
    /// Completes once the file (a socket) is readable, or hung up: lets one `io_uring_enter`
    /// wait for disk completions and for new requests on the connection at once.
    PollIn {
        /// Index of the registered file.
        file_index: u32,
    },
}

impl Op {
    /// The op's buffer, if it has one.
    pub fn buf(&self) -> Option<&AlignedBuf> {
        match self {
            Op::Read { buf, .. } | Op::Write { buf, .. } => Some(buf),
            Op::Fsync { .. } | Op::PollIn { .. } => None,
        }
    }

    /// Takes the op's buffer back, if it has one.
    pub fn into_buf(self) -> Option<AlignedBuf> {
        match self {
            Op::Read { buf, .. } | Op::Write { buf, .. } => Some(buf),
            Op::Fsync { .. } | Op::PollIn { .. } => None,
        }
    }

    /// Checks what the kernel cannot: the file index and the length against the buffer.
    fn check(&self, file_count: u32) -> Result<(), &'static str> {
        let (Op::Read { file_index, .. }
        | Op::Write { file_index, .. }
        | Op::Fsync { file_index }
        | Op::PollIn { file_index }) = self;
        if *file_index >= file_count {
            return Err("file index not registered");
        }
        if let Op::Read { len_bytes, buf, .. } | Op::Write { len_bytes, buf, .. } = self {
            if usize::try_from(*len_bytes).map_or(true, |len| len > buf.len()) {
                return Err("length exceeds buffer");
            }
        }
        Ok(())
    }

    /// Builds the SQE; for Read/Write it points into `buf`'s heap allocation.
    fn build_entry(&mut self, slot: u32) -> squeue::Entry {
        let entry = match self {
            Op::Read {
                file_index,
                offset_bytes,
                len_bytes,
                buf,
            } => opcode::Read::new(types::Fixed(*file_index), buf.as_mut_ptr(), *len_bytes)
                .offset(*offset_bytes)
                .build(),
            Op::Write {
                file_index,
                offset_bytes,
                len_bytes,
                buf,
                dsync,
            } => opcode::Write::new(types::Fixed(*file_index), buf.as_mut_ptr(), *len_bytes)
                .offset(*offset_bytes)
                .rw_flags(if *dsync { libc::RWF_DSYNC } else { 0 })
                .build(),
            Op::Fsync { file_index } => opcode::Fsync::new(types::Fixed(*file_index))
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Op::PollIn { file_index } => {
                let mask = u32::try_from(libc::POLLIN).expect("POLLIN is positive");
                opcode::PollAdd::new(types::Fixed(*file_index), mask).build()
            }
        };
        entry.user_data(u64::from(slot))
    }
}

/// A finished op: the caller's tag, the kernel's result (bytes transferred) and the op with
/// its buffer.
#[derive(Debug)]
pub struct Completion {
    /// The tag given to [`Ring::push`].
    pub user_tag: u64,
    /// Bytes transferred (0 for Fsync), or the error the kernel reported.
    pub result: io::Result<u32>,
    /// The op, handed back with its buffer.
    pub op: Op,
}

/// Errors from ring setup and submission.
#[derive(Debug)]
pub enum RingError {
    /// `io_uring_setup` failed (no io_uring, or disabled by sysctl/seccomp).
    Setup(io::Error),
    /// The kernel's opcode probe failed.
    Probe(io::Error),
    /// The kernel lacks an opcode ferry needs.
    Unsupported(&'static str),
    /// Registering the fixed files failed.
    RegisterFiles(io::Error),
    /// Registering the opcode allow-list or enabling the ring failed.
    Restrict(io::Error),
    /// Every slot (or the submission queue) is in use.
    Full,
    /// The op is malformed (a caller bug the ring refuses instead of passing on).
    BadOp(&'static str),
    /// `io_uring_enter` failed.
    Submit(io::Error),
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::Setup(_) => f.write_str("io_uring setup failed"),
            RingError::Probe(_) => f.write_str("io_uring opcode probe failed"),
            RingError::Unsupported(op) => write!(f, "io_uring lacks the {op} opcode"),
            RingError::RegisterFiles(_) => f.write_str("io_uring file registration failed"),
            RingError::Restrict(_) => f.write_str("io_uring restriction setup failed"),
            RingError::Full => f.write_str("io_uring ring is full"),
            RingError::BadOp(reason) => write!(f, "bad io_uring op: {reason}"),
            RingError::Submit(_) => f.write_str("io_uring submission failed"),
        }
    }
}

impl std::error::Error for RingError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RingError::Setup(err)
            | RingError::Probe(err)
            | RingError::RegisterFiles(err)
            | RingError::Restrict(err)
            | RingError::Submit(err) => Some(err),
            RingError::Unsupported(_) | RingError::Full | RingError::BadOp(_) => None,
        }
    }
}

/// How completions are delivered, from the best the kernel accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupMode {
    /// `SINGLE_ISSUER | DEFER_TASKRUN`: completions run only when the issuer enters (6.1+).
    DeferTaskrun,
    /// `COOP_TASKRUN | TASKRUN_FLAG`: no IPI to interrupt the issuer (5.19+).
    CoopTaskrun,
    /// Default delivery.
    Plain,
}

/// An op held by the ring, with the caller's tag.
#[derive(Debug)]
struct Slot {
    user_tag: u64,
    op: Op,
}

/// An io_uring instance owning its in-flight ops; see the module docs for the invariants.
pub struct Ring {
    uring: IoUring,
    slots: Box<[Option<Slot>]>,
    free_slots: Vec<u32>,
    file_count: u32,
    enabled: bool,
    mode: SetupMode,
}

impl fmt::Debug for Ring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ring")
            .field("depth", &self.slots.len())
            .field("in_flight", &self.in_flight())
            .field("file_count", &self.file_count)
            .field("mode", &self.mode)
            .finish()
    }
}

impl Ring {
    /// Creates a ring of `depth` slots (1..=[`MAX_DEPTH`]) with `files` registered as fixed
    /// files (`Op` file index `i` is `files[i]`), restricted to Read/Write/Fsync/PollAdd on them.
    pub fn new(depth: u32, files: &[BorrowedFd<'_>]) -> Result<Ring, RingError> {
        assert!(
            (1..=MAX_DEPTH).contains(&depth),
            "ring depth {depth} out of 1..={MAX_DEPTH}"
        );
        assert!(!files.is_empty(), "a ring needs at least one file");
        let (uring, mode, enabled) = build_uring(depth).map_err(RingError::Setup)?;
        let fds: Vec<i32> = files.iter().map(AsRawFd::as_raw_fd).collect();
        let submitter = uring.submitter();
        submitter
            .register_files(&fds)
            .map_err(RingError::RegisterFiles)?;
        if !enabled {
            submitter
                .register_restrictions(&mut allow_list())
                .map_err(RingError::Restrict)?;
        }
        let slot_count = usize::try_from(depth).expect("depth fits in usize");
        Ok(Ring {
            uring,
            slots: std::iter::repeat_with(|| None).take(slot_count).collect(),
            free_slots: (0..depth).rev().collect(),
            file_count: u32::try_from(fds.len()).expect("few files"),
            enabled,
            mode,
        })
    }

    /// Slots in the ring: the most ops that can be in flight.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Ops pushed and not yet reaped.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// The completion delivery mode the kernel accepted.
    pub fn mode(&self) -> SetupMode {
        self.mode
    }

    /// Queues `op` (not yet submitted: see [`Ring::submit`]). On failure the op comes back,
    /// so the caller can fail the request that owns it instead of losing the buffer.
    pub fn push(&mut self, user_tag: u64, op: Op) -> Result<(), (RingError, Op)> {
        if let Err(reason) = op.check(self.file_count) {
            return Err((RingError::BadOp(reason), op));
        }
        let Some(slot) = self.free_slots.pop() else {
            return Err((RingError::Full, op));
        };
        let index = usize::try_from(slot).expect("slot fits in usize");
        let held = self.slots[index].insert(Slot { user_tag, op });
        let entry = held.op.build_entry(slot);
        // SAFETY: the SQE points into a heap buffer now owned by `slots[slot]`; it is not
        // freed until `reap` sees this slot's CQE, or until `Drop` has waited for it (or
        // leaked it). The buffer is `len_bytes` or more long (checked above).
        if unsafe { self.uring.submission().push(&entry) }.is_err() {
            let Slot { op, .. } = self.slots[index].take().expect("slot filled above");
            self.free_slots.push(slot);
            return Err((RingError::Full, op));
        }
        Ok(())
    }

    /// Submits every queued op with one `io_uring_enter`, without waiting.
    pub fn submit(&mut self) -> Result<usize, RingError> {
        self.submit_and_wait(0)
    }

    /// Submits every queued op and waits until at least `want` completions (capped at the
    /// ops in flight) are ready to reap. Returns the number of ops submitted. A transient
    /// kernel shortage (`EAGAIN`/`EBUSY`) returns early with 0; the ops stay queued.
    pub fn submit_and_wait(&mut self, want: usize) -> Result<usize, RingError> {
        self.enable()?;
        let want = u32::try_from(want.min(self.in_flight())).expect("want <= depth");
        let to_submit = u32::try_from(self.uring.submission().len()).expect("sq len fits u32");
        if to_submit == 0 && want == 0 && self.in_flight() == 0 {
            return Ok(0);
        }
        loop {
            // SAFETY: no argument pointer is passed (None), and the flags are a valid
            // `io_uring_enter` flag set; every queued SQE points into a buffer owned by a slot.
            let ret = unsafe {
                self.uring.submitter().enter::<libc::sigset_t>(
                    to_submit,
                    want,
                    ENTER_GETEVENTS,
                    None,
                )
            };
            return match ret {
                Ok(submitted) => Ok(submitted),
                Err(err) => match err.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN | libc::EBUSY) => Ok(0),
                    _ => Err(RingError::Submit(err)),
                },
            };
        }
    }

    /// Appends every completion available now to `out`, without blocking; returns how many.
    /// Ops that failed with `EINTR`/`EAGAIN` are queued again instead (submitted by the next
    /// `submit`).
    pub fn reap(&mut self, out: &mut Vec<Completion>) -> usize {
        let (_, mut sq, cq) = self.uring.split();
        let mut reaped = 0;
        for cqe in cq {
            let slot = u32::try_from(cqe.user_data()).expect("user data is a slot index");
            let index = usize::try_from(slot).expect("slot fits in usize");
            let held = self.slots[index]
                .as_mut()
                .expect("completion for an empty slot");
            if errno::cqe_action(cqe.result()) == CqeAction::Requeue {
                let entry = held.op.build_entry(slot);
                // SAFETY: as in `push`: the buffer stays owned by `slots[slot]` until its
                // next CQE.
                if unsafe { sq.push(&entry) }.is_ok() {
                    continue;
                }
            }
            let Slot { user_tag, op } = self.slots[index].take().expect("checked above");
            self.free_slots.push(slot);
            out.push(Completion {
                user_tag,
                result: errno::cvt_cqe(cqe.result()),
                op,
            });
            reaped += 1;
        }
        reaped
    }

    /// Whether an op holding a buffer is in flight.
    fn buffers_in_flight(&self) -> bool {
        self.slots
            .iter()
            .flatten()
            .any(|held| held.op.buf().is_some())
    }

    /// Enables a ring created disabled, from the thread that drives it.
    fn enable(&mut self) -> Result<(), RingError> {
        if !self.enabled {
            self.uring
                .submitter()
                .register_enable_rings()
                .map_err(RingError::Restrict)?;
            self.enabled = true;
        }
        Ok(())
    }

    /// Leaks every op still held: the kernel may still write into their buffers.
    #[cold]
    fn leak_in_flight(&mut self) {
        for slot in self.slots.iter_mut() {
            if let Some(held) = slot.take() {
                std::mem::forget(held.op);
            }
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        let mut done = Vec::with_capacity(self.capacity());
        let mut stalled_rounds = 0;
        // Only ops holding a buffer must finish before their memory is freed; a poll may
        // never complete, and the kernel cancels it when the ring is closed.
        while self.buffers_in_flight() && stalled_rounds < DROP_STALL_ROUNDS {
            if self.submit_and_wait(1).is_err() {
                break;
            }
            if self.reap(&mut done) == 0 {
                stalled_rounds += 1;
            }
            done.clear();
        }
        if self.buffers_in_flight() {
            self.leak_in_flight();
        }
    }
}

/// Builds a disabled ring with the best completion mode the kernel accepts; kernels without
/// `R_DISABLED` (before 5.10) get an enabled, unrestricted ring.
fn build_uring(depth: u32) -> io::Result<(IoUring, SetupMode, bool)> {
    let modes = [
        SetupMode::DeferTaskrun,
        SetupMode::CoopTaskrun,
        SetupMode::Plain,
    ];
    for mode in modes {
        let mut builder = IoUring::builder();
        builder.setup_r_disabled();
        match mode {
            SetupMode::DeferTaskrun => {
                builder.setup_single_issuer().setup_defer_taskrun();
            }
            SetupMode::CoopTaskrun => {
                builder.setup_coop_taskrun().setup_taskrun_flag();
            }
            SetupMode::Plain => {}
        }
        match builder.build(depth) {
            Ok(uring) => return Ok((uring, mode, false)),
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(err) => return Err(err),
        }
    }
    Ok((IoUring::new(depth)?, SetupMode::Plain, true))
}

/// Read, Write, Fsync and PollAdd, on fixed files only.
fn allow_list() -> [Restriction; 5] {
    let fixed = squeue::Flags::FIXED_FILE.bits();
    [
        Restriction::sqe_op(opcode::Read::CODE),
        Restriction::sqe_op(opcode::Write::CODE),
        Restriction::sqe_op(opcode::Fsync::CODE),
        Restriction::sqe_op(opcode::PollAdd::CODE),
        Restriction::sqe_flags_required(fixed),
    ]
}

/// Checks that io_uring works here and supports Read, Write, Fsync and PollAdd.
pub fn probe() -> Result<(), RingError> {
    let uring = IoUring::new(4).map_err(RingError::Setup)?;
    let mut probe = Probe::new();
    uring
        .submitter()
        .register_probe(&mut probe)
        .map_err(RingError::Probe)?;
    let needed = [
        (opcode::Read::CODE, "READ"),
        (opcode::Write::CODE, "WRITE"),
        (opcode::Fsync::CODE, "FSYNC"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
    ];
    for (code, name) in needed {
        if !probe.is_supported(code) {
            return Err(RingError::Unsupported(name));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DirectFile, DIRECT_ALIGN};
    use std::path::PathBuf;

    fn temp_file(name: &str, len_bytes: u64) -> (PathBuf, DirectFile) {
        let path = std::env::temp_dir().join(format!("ferry-ring-{name}-{}", std::process::id()));
        std::fs::File::create(&path)
            .and_then(|file| file.set_len(len_bytes))
            .expect("create");
        let file = DirectFile::open(&path, true).expect("open");
        (path, file)
    }

    fn ring_for(file: &DirectFile, depth: u32) -> Option<Ring> {
        match Ring::new(depth, &[file.direct_fd()]) {
            Ok(ring) => Some(ring),
            Err(err) => {
                eprintln!("skipped: io_uring unavailable: {err}");
                None
            }
        }
    }

    fn write_op(offset_bytes: u64, fill: u8) -> Op {
        let mut buf = AlignedBuf::zeroed(DIRECT_ALIGN, DIRECT_ALIGN);
        buf.as_mut_slice().fill(fill);
        Op::Write {
            file_index: 0,
            offset_bytes,
            len_bytes: 4096,
            buf,
            dsync: false,
        }
    }

    fn drain(ring: &mut Ring, count: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        while out.len() < count {
            ring.submit_and_wait(count - out.len()).expect("submit");
            ring.reap(&mut out);
        }
        out
    }

    // Goal: writes then reads through the ring round-trip, tags and buffers come back.
    // Method: 8 direct writes, an fsync, 8 reads, compare contents.
    #[test]
    fn write_fsync_read_round_trip() {
        let (path, file) = temp_file("rt", 1 << 20);
        let Some(mut ring) = ring_for(&file, 16) else {
            return;
        };
        for block in 0..8u8 {
            ring.push(
                u64::from(block),
                write_op(u64::from(block) * 4096, block + 1),
            )
            .expect("push");
        }
        let mut done = drain(&mut ring, 8);
        ring.push(100, Op::Fsync { file_index: 0 })
            .expect("push fsync");
        done.extend(drain(&mut ring, 1));
        assert!(done.iter().all(|c| c.result.is_ok()), "{done:?}");
        for block in 0..8u8 {
            let buf = AlignedBuf::zeroed(DIRECT_ALIGN, DIRECT_ALIGN);
            let op = Op::Read {
                file_index: 0,
                offset_bytes: u64::from(block) * 4096,
                len_bytes: 4096,
                buf,
            };
            ring.push(u64::from(block), op).expect("push read");
        }
        for completion in drain(&mut ring, 8) {
            assert_eq!(completion.result.as_ref().ok(), Some(&4096));
            let fill = u8::try_from(completion.user_tag).unwrap() + 1;
            let buf = completion.op.into_buf().expect("read has a buffer");
            assert!(buf.as_slice().iter().all(|&b| b == fill));
        }
        assert_eq!(ring.in_flight(), 0);
        std::fs::remove_file(path).unwrap();
    }

    // Goal: a full ring and a malformed op hand the op back. Method: depth 2, push 3; push an
    // op naming an unregistered file and one longer than its buffer.
    #[test]
    fn push_failures_return_the_op() {
        let (path, file) = temp_file("full", 1 << 20);
        let Some(mut ring) = ring_for(&file, 2) else {
            return;
        };
        ring.push(1, write_op(0, 1)).expect("push 1");
        ring.push(2, write_op(4096, 2)).expect("push 2");
        let (err, op) = ring.push(3, write_op(8192, 3)).unwrap_err();
        assert!(matches!(err, RingError::Full));
        assert_eq!(op.buf().unwrap().as_slice()[0], 3);
        drain(&mut ring, 2);
        let (err, _) = ring.push(4, Op::Fsync { file_index: 1 }).unwrap_err();
        assert!(matches!(err, RingError::BadOp(_)));
        let buf = AlignedBuf::zeroed(DIRECT_ALIGN, DIRECT_ALIGN);
        let long = Op::Read {
            file_index: 0,
            offset_bytes: 0,
            len_bytes: 8192,
            buf,
        };
        assert!(matches!(ring.push(5, long), Err((RingError::BadOp(_), _))));
        std::fs::remove_file(path).unwrap();
    }

    // Goal: kernel errors come back per op; a ring can be dropped with ops in flight.
    // Method: a write through a read-only fd (EBADF), then drop a ring holding unsubmitted ops.
    #[test]
    fn errors_and_drop_with_ops_in_flight() {
        let (path, file) = temp_file("err", 1 << 20);
        let read_only = DirectFile::open(&path, false).expect("open read-only");
        let Some(mut ring) = ring_for(&read_only, 8) else {
            return;
        };
        ring.push(9, write_op(0, 1)).expect("push");
        let done = drain(&mut ring, 1);
        let err = done[0].result.as_ref().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBADF));
        let Some(mut ring) = ring_for(&file, 8) else {
            return;
        };
        for block in 0..4 {
            ring.push(block, write_op(block * 4096, 7)).expect("push");
        }
        drop(ring);
        let mut got = vec![0u8; 4 * 4096];
        file.read_at(0, &mut got).unwrap();
        assert!(got.iter().all(|&b| b == 7), "drop waited for the writes");
        std::fs::remove_file(path).unwrap();
    }

    // Goal: a ring built on one thread works on another (SINGLE_ISSUER binds at first use).
    // Method: build here, move into a thread, write and read back there.
    #[test]
    fn ring_moves_to_its_thread_before_first_use() {
        let (path, file) = temp_file("move", 1 << 20);
        let Some(mut ring) = ring_for(&file, 4) else {
            return;
        };
        let worker = std::thread::spawn(move || {
            ring.push(1, write_op(0, 9)).expect("push");
            drain(&mut ring, 1).pop().unwrap().result.expect("write")
        });
        assert_eq!(worker.join().unwrap(), 4096);
        std::fs::remove_file(path).unwrap();
    }

    // Goal: the probe accepts this kernel or explains why not. Method: call it.
    #[test]
    fn probe_reports() {
        match probe() {
            Ok(()) => {}
            Err(err) => eprintln!("skipped: io_uring unavailable: {err}"),
        }
    }
}
