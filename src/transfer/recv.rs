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
//! - Fence: `FenceOk` once every write before it completed, without stopping the writes
//!   after it ([`target`]).
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

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_sys::DirectFile;

use super::frame::{ErrorCode, Frame, Repoint, Role};
use super::host::{validate_spec, TargetHost};
use super::link::{self, read_frame, unexpected, write_frame, Link};
use super::{ClusterKey, TransferError};
use crate::io::{open_engine, probe_uring, EngineKind};
use crate::nbd::admission::{
    accept_failed, out_of_descriptors, AcceptBackoff, Admission, AdmissionLimits, Ticket,
};

mod target;

use target::Target;
#[cfg(test)]
pub(super) use target::{MAX_PENDING_FENCES, MOST_FENCES_WAITING};

/// Time a peer has to finish the handshake and Open.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest silence from a source before the connection is dropped.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a blocked write to the source may wait.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Writes in flight per connection.
const WRITE_DEPTH: u32 = 16;
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
    // The engine watches the socket, so a wait for writes behind a Fence ends when the
    // next frame arrives.
    let connection = Some(stream.as_fd());
    let engine = open_engine(engine_kind, Arc::clone(&file), WRITE_DEPTH, connection)
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
