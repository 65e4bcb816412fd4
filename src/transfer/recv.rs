//! The destination side of block streams: a listener, one thread per connection, each
//! authenticating its peer, opening a target through the [`TargetHost`] and applying frames.
//!
//! Per connection:
//! - Data: the payload is read into an aligned buffer, its BLAKE3 digest checked, and only
//!   then written through an io engine (io_uring + O_DIRECT when available) with several
//!   writes in flight. Zero: `WriteZeroes{may_trim}` (a hole). Trim: `Trim`.
//! - A write never overlaps a write still in flight: two writes of the same range could land
//!   in either order, and a resent block must win over its older copy.
//! - Received blocks are marked in a [`DirtyBitmap`] after their write completed.
//! - Sync: drain, fdatasync, `SyncOk`. Commit: the same, then `host.commit_target`, `CommitOk`.
//!   Abort: `host.abort_target`, `Abort` back. A stream that ends before Commit leaves the
//!   target as it is, for a later resume.
//! - Any malformed frame, digest mismatch or write failure: an `Error` frame, then the
//!   connection closes; the listener and other connections go on.
//!
//! Admission ([`Admission`], DESIGN invariant 6): peers that have not proven the cluster key
//! are capped apart from authenticated ones (16 and 64 by default), the oldest
//! unauthenticated one is closed for a newcomer, and authentication must finish within its
//! deadline (5 s), so peers trickling bytes cannot lock real sources out.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_sys::{DirectFile, DIRECT_ALIGN};

use super::frame::{ErrorCode, Frame, Repoint, Role, TargetSpec};
use super::host::{validate_spec, TargetHost};
use super::link::{self, read_frame, unexpected, write_frame, Link};
use super::{ClusterKey, TransferError};
use crate::dirty::{DirtyBitmap, DirtySet};
use crate::io::{open_engine, probe_uring, BlockIo, EngineKind, IoCompletion, IoKind, IoRequest};
use crate::nbd::admission::{
    accept_failed, out_of_descriptors, AcceptBackoff, Admission, AdmissionLimits, Ticket,
};
use crate::nbd::bufpool::BufPool;

/// Time a peer has to finish the handshake and Open.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence from a source before the connection is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a blocked write to the source may wait.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Writes in flight per connection.
const WRITE_DEPTH: u32 = 16;
/// Largest single WriteZeroes/Trim request (engine lengths are u32).
const MAX_ZERO_REQUEST_BYTES: u64 = 1 << 30;
/// After an error, input is still read (and dropped) for this long, so the Error frame
/// reaches the peer before the close can turn into a reset.
const LINGER: Duration = Duration::from_secs(3);

/// A running block-stream listener.
#[derive(Debug)]
pub struct ReceiverServer {
    local_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    shared: Arc<Shared>,
}

/// What the accept thread and connection threads share.
#[derive(Debug)]
struct Shared {
    /// Every open connection, authenticated or not (a clone each, to shut them down).
    admission: Arc<Admission>,
    reaper: Mutex<Option<JoinHandle<()>>>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

/// Listens on `addr` and serves each stream on its own thread, admitting peers within
/// `limits`.
pub fn serve(
    addr: SocketAddr,
    key: ClusterKey,
    host: Arc<dyn TargetHost>,
    limits: AdmissionLimits,
) -> Result<ReceiverServer, TransferError> {
    let listener = TcpListener::bind(addr).map_err(TransferError::Listen)?;
    let local_addr = listener.local_addr().map_err(TransferError::Listen)?;
    let stop = Arc::new(AtomicBool::new(false));
    let admission = Admission::new("block stream", limits);
    let reaper = admission.start_reaper().map_err(TransferError::Spawn)?;
    let shared = Arc::new(Shared {
        admission,
        reaper: Mutex::new(Some(reaper)),
        workers: Mutex::new(Vec::new()),
    });
    let engine_kind = if probe_uring().is_ok() {
        EngineKind::Uring
    } else {
        log::info!("io_uring unavailable: block streams write with the sync engine");
        EngineKind::Sync
    };
    let accept = {
        let (stop, worker_shared) = (Arc::clone(&stop), Arc::clone(&shared));
        std::thread::Builder::new()
            .name("ferry-recv-accept".into())
            .spawn(move || accept_loop(&listener, &stop, &worker_shared, &key, &host, engine_kind))
    };
    let accept = match accept {
        Ok(accept) => accept,
        Err(err) => {
            // The reaper stops with the admission.
            shared.admission.stop(Shutdown::Both);
            if let Some(reaper) = lock(&shared.reaper).take() {
                let _ = reaper.join();
            }
            return Err(TransferError::Spawn(err));
        }
    };
    Ok(ReceiverServer {
        local_addr,
        stop,
        accept: Some(accept),
        shared,
    })
}

impl ReceiverServer {
    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every connection and waits for their threads.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        let Some(accept) = self.accept.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.local_addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let _ = TcpStream::connect_timeout(&wake, Duration::from_secs(1));
        let _ = accept.join();
        self.shared.admission.stop(Shutdown::Both);
        if let Some(reaper) = lock(&self.shared.reaper).take() {
            let _ = reaper.join();
        }
        let workers = std::mem::take(&mut *lock(&self.shared.workers));
        for worker in workers {
            let _ = worker.join();
        }
    }
}

impl Drop for ReceiverServer {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panicked connection thread leaves nothing half-updated in these maps.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn accept_loop(
    listener: &TcpListener,
    stop: &AtomicBool,
    shared: &Arc<Shared>,
    key: &ClusterKey,
    host: &Arc<dyn TargetHost>,
    engine_kind: EngineKind,
) {
    let mut backoff = AcceptBackoff::default();
    let mut next_id = 0u64;
    loop {
        let incoming = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match incoming {
            Ok((stream, _)) => stream,
            Err(err) => {
                accept_failed(&shared.admission, &mut backoff, &err);
                continue;
            }
        };
        backoff.succeeded();
        let cloned = match stream.try_clone() {
            Err(err) if out_of_descriptors(&err) && shared.admission.evict_oldest() => {
                stream.try_clone()
            }
            other => other,
        };
        let closer = match cloned {
            Ok(clone) => Box::new(clone),
            Err(err) => {
                log::warn!("block stream refused: cannot clone its socket: {err}");
                continue;
            }
        };
        let Ok(ticket) = shared.admission.admit(closer) else {
            continue; // stopping
        };
        next_id += 1;
        let (key, host) = (key.clone(), Arc::clone(host));
        let spawned = std::thread::Builder::new()
            .name(format!("ferry-recv-{next_id}"))
            .spawn(move || {
                let peer = stream.peer_addr().ok();
                match serve_connection(stream, &ticket, &key, &*host, engine_kind) {
                    Ok(end) => log::info!("block stream from {peer:?}: {end}"),
                    Err(err) => log::warn!(
                        "block stream from {peer:?} failed: {}",
                        crate::error::error_chain(&err)
                    ),
                }
            });
        let mut workers = lock(&shared.workers);
        workers.retain(|worker| !worker.is_finished());
        match spawned {
            Ok(worker) => workers.push(worker),
            Err(err) => log::warn!("cannot start a block stream thread: {err}"),
        }
    }
}

/// Runs one connection to its end; the Ok value says how it ended.
fn serve_connection(
    stream: TcpStream,
    ticket: &Ticket,
    key: &ClusterKey,
    host: &dyn TargetHost,
    engine_kind: EngineKind,
) -> Result<&'static str, TransferError> {
    stream.set_nodelay(true).map_err(TransferError::Socket)?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(TransferError::Socket)?;
    stream
        .set_write_timeout(Some(WRITE_TIMEOUT))
        .map_err(TransferError::Socket)?;
    let mut stream = link::authenticate(stream, key, Role::Destination)?;
    if ticket.promote().is_err() {
        let refused = TransferError::Refused {
            reason: "too many streams".into(),
        };
        return Err(fail(&mut stream, refused));
    }
    let spec = match read_frame(&mut stream, &mut Vec::new()) {
        Ok(Frame::Open(spec)) => spec,
        Ok(Frame::Query { job_id, finalize }) => {
            let (state, received_blocks) = host.query(job_id, finalize);
            let reply = Frame::QueryOk {
                job_id,
                state,
                received_blocks,
                nbd_tcp: host.nbd_tcp(),
            };
            write_frame(&mut stream, &reply, &mut Vec::new())?;
            return Ok("queried");
        }
        Ok(Frame::Repoint(repoint)) => return answer_repoint(&mut stream, host, &repoint),
        Ok(other) => {
            let expected = "Open, Query or Repoint";
            return Err(fail(&mut stream, unexpected(other, expected)));
        }
        Err(err) => return Err(fail(&mut stream, err)),
    };
    let source = stream
        .peer_addr()
        .map_or_else(|_| "unknown".to_string(), |addr| addr.to_string());
    // Checked here for every host, before it records or creates anything.
    let resolved = host.resolve_spec(spec.clone());
    let spec = resolved.as_ref().map_or(spec, Clone::clone);
    let created = resolved
        .and_then(|_| validate_spec(&spec))
        .and_then(|()| host.create_target(&spec, &source));
    let file = match created {
        Ok(file) => file,
        Err(err) => {
            log::warn!(
                "target {:?} (job {}) refused: {}",
                spec.export,
                spec.job_id,
                crate::error::error_chain(&err)
            );
            let reason = err.peer_reason();
            return Err(fail(&mut stream, TransferError::Refused { reason }));
        }
    };
    let engine = open_engine(engine_kind, Arc::clone(&file), WRITE_DEPTH, None)
        .map_err(|err| fail(&mut stream, TransferError::Engine(err)))?;
    let reply = Frame::OpenOk {
        nbd_tcp: host.nbd_tcp(),
        changed_outside: host.changed_outside(&spec),
    };
    write_frame(&mut stream, &reply, &mut Vec::new())?;
    stream
        .set_read_timeout(Some(IDLE_TIMEOUT))
        .map_err(TransferError::Socket)?;
    let mut target = Target::new(&spec, file, engine);
    let outcome = target.apply_frames(&mut stream, host);
    // Whatever happened, nothing may be left in the ring when the connection ends.
    let drained = target.drain();
    drop(target);
    host.end_stream(&spec);
    match (outcome, drained) {
        (Ok(end), Ok(())) => Ok(end),
        (Err(err @ (TransferError::PeerGone(_) | TransferError::Timeout(_))), _) => {
            log::info!(
                "stream for export {} (job {}) ended before commit; target kept for resume",
                spec.export,
                spec.job_id
            );
            Err(err)
        }
        (Err(err), _) | (Ok(_), Err(err)) => Err(fail(&mut stream, err)),
    }
}

/// Answers a [`Frame::Repoint`]; the connection ends after it.
fn answer_repoint(
    stream: &mut Link<TcpStream>,
    host: &dyn TargetHost,
    repoint: &Repoint,
) -> Result<&'static str, TransferError> {
    match host.repoint(repoint) {
        Ok(outcome) => {
            let reply = Frame::RepointOk {
                job_id: repoint.job_id,
                outcome,
            };
            write_frame(stream, &reply, &mut Vec::new())?;
            Ok(outcome.as_str())
        }
        Err(err) => {
            log::warn!(
                "re-point of export {} (job {}) refused: {}",
                repoint.export,
                repoint.job_id,
                crate::error::error_chain(&err)
            );
            let reason = err.peer_reason();
            Err(fail(stream, TransferError::Refused { reason }))
        }
    }
}

/// Tells the peer why the connection ends (when the socket still works), then closes it
/// gracefully: shut down our side and drop the peer's in-flight input for a while, so the
/// Error frame is read before the kernel could reset the connection. Returns `err`.
#[cold]
fn fail(stream: &mut Link<TcpStream>, err: TransferError) -> TransferError {
    let (code, offset_bytes) = match &err {
        TransferError::Digest { offset_bytes } => (ErrorCode::Digest, *offset_bytes),
        TransferError::Refused { .. } => (ErrorCode::Refused, 0),
        TransferError::BadFrame(_)
        | TransferError::Unexpected { .. }
        | TransferError::OutOfRange { .. } => (ErrorCode::BadFrame, 0),
        TransferError::TargetWrite(_) | TransferError::Engine(_) => (ErrorCode::TargetWrite, 0),
        // The socket is gone, or the error was already reported (Auth).
        TransferError::PeerGone(_)
        | TransferError::Timeout(_)
        | TransferError::Socket(_)
        | TransferError::Auth { .. } => return err,
        TransferError::Connect(_)
        | TransferError::Listen(_)
        | TransferError::Remote { .. }
        | TransferError::SourceRead(_)
        | TransferError::Spawn(_)
        | TransferError::KeyRead { .. }
        | TransferError::KeyPermissions { .. }
        | TransferError::KeyFormat { .. }
        | TransferError::KeyCreate { .. } => (ErrorCode::Internal, 0),
    };
    // Short, and never a local path or size (the full chain goes to the local log).
    let message = match &err {
        TransferError::Refused { reason } => reason.clone(),
        TransferError::TargetWrite(_) | TransferError::Engine(_) => "target write failed".into(),
        TransferError::Digest { .. }
        | TransferError::BadFrame(_)
        | TransferError::Unexpected { .. }
        | TransferError::OutOfRange { .. } => crate::error::error_chain(&err),
        _ => "internal error".into(),
    };
    link::send_error(stream, code, offset_bytes, &message);
    let _ = stream.shutdown(Shutdown::Write);
    let deadline = Instant::now() + LINGER;
    let mut sink = vec![0u8; 64 * 1024];
    // Bounded in time, however slowly the peer trickles bytes.
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    err
}

/// The target of one connection: its engine, the writes in flight and the received blocks.
#[derive(Debug)]
struct Target {
    spec: TargetSpec,
    file: Arc<DirectFile>,
    engine: Box<dyn BlockIo>,
    /// tag → (offset, length) of each request in flight.
    in_flight: BTreeMap<u64, (u64, u64)>,
    next_tag: u64,
    received: DirtyBitmap,
    pool: BufPool,
    done: Vec<IoCompletion>,
    meta: Vec<u8>,
    scratch: Vec<u8>,
}

impl Target {
    fn new(spec: &TargetSpec, file: Arc<DirectFile>, engine: Box<dyn BlockIo>) -> Target {
        Target {
            spec: spec.clone(),
            file,
            engine,
            in_flight: BTreeMap::new(),
            next_tag: 0,
            received: DirtyBitmap::new(spec.size_bytes.div_ceil(spec.granularity_bytes)),
            pool: BufPool::new(),
            done: Vec::new(),
            meta: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Applies frames until Abort, a clean close after Commit, or an error.
    fn apply_frames(
        &mut self,
        stream: &mut Link<TcpStream>,
        host: &dyn TargetHost,
    ) -> Result<&'static str, TransferError> {
        let mut committed = false;
        // At an in-sync point and nothing written since: the source may close here.
        let mut at_point = false;
        loop {
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
                    self.drain()?;
                    write_frame(stream, &Frame::FenceOk { seq }, &mut self.scratch)?;
                }
                Frame::Digests {
                    seq,
                    offset_bytes,
                    block_bytes,
                    count,
                } => {
                    self.drain()?;
                    let digests = self.digests(offset_bytes, block_bytes, count)?;
                    write_frame(
                        stream,
                        &Frame::DigestsOk { seq, digests },
                        &mut self.scratch,
                    )?;
                }
                Frame::Verify { seq } => {
                    self.drain()?;
                    let digest = hash_image(&self.file, self.spec.size_bytes)?;
                    let reply = Frame::VerifyOk { seq, digest };
                    write_frame(stream, &reply, &mut self.scratch)?;
                }
                Frame::Commit { seq, manager_epoch } => {
                    self.flush()?;
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
        Ok(())
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

    /// Waits for every request in flight.
    fn drain(&mut self) -> Result<(), TransferError> {
        while !self.in_flight.is_empty() {
            self.complete(self.in_flight.len())?;
        }
        Ok(())
    }

    /// Drains, then fdatasyncs the target.
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

/// BLAKE3 of the first `size_bytes` of `file`, read in 4 MiB chunks through the page cache.
pub fn hash_image(file: &DirectFile, size_bytes: u64) -> Result<[u8; 32], TransferError> {
    const CHUNK_BYTES: u64 = 4 << 20;
    let mut hasher = blake3::Hasher::new();
    let mut buf = vec![0u8; CHUNK_BYTES as usize];
    let mut offset = 0;
    while offset < size_bytes {
        let len = usize::try_from((size_bytes - offset).min(CHUNK_BYTES)).expect("≤ 4 MiB");
        file.read_at(offset, &mut buf[..len])
            .map_err(TransferError::TargetWrite)?;
        hasher.update(&buf[..len]);
        offset += len as u64;
    }
    Ok(*hasher.finalize().as_bytes())
}
