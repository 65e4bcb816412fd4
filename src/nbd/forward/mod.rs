//! The forwarding engine: a [`BlockIo`] that sends every request to another agent's NBD server
//! (TCP) instead of the local image. After a migration's switchover the source export serves
//! its clients through it, so the guest keeps its connection and never sees an error while the
//! disk lives at the destination, even while the destination restarts.
//!
//! One connection at a time per session; requests are pipelined (the NBD cookie is the
//! request's tag). A link thread (`nbd-forward`, in `link.rs`) owns the connection's life: it
//! reads replies and turns them into completions, which `complete` collects; when the
//! connection breaks it reconnects with backoff ([`BACKOFF_FIRST`] doubling to
//! [`BACKOFF_MAX`]), redoes the handshake, checks that the same image answers (export name,
//! size, and the disk's lineage when the destination states one) and resends every request
//! still held.
//!
//! States: *connected* (a connection is installed in `writer`; submitters send on it, the link
//! thread reads it) and *reconnecting* (`writer` is empty; submitted requests are only
//! recorded; the link thread dials on its backoff and, between attempts, wakes for the next
//! request whose hold ends, to fail it). [`ForwardEngine::connect`] starts reconnecting,
//! instead of failing the session, when the destination does not answer at once. A connected
//! link whose socket stays silent for the hold while a request has waited as long counts as
//! broken (a destination that hangs without closing). The link thread tells the export's
//! [`ForwardGauge`] when it starts holding (the connection was lost, or the first attempt
//! failed) and when it stops (a connection to the same image is made again, or the engine
//! is dropped), so operators see the export holding and how many requests wait.
//!
//! Invariants:
//! - Every submitted request completes exactly once: from its reply, or with EIO once it has
//!   waited longer than the hold (`forward_hold_ms`, counted from `submit`). Nothing else
//!   fails a request: a broken connection only holds it. While held, `submit` still takes
//!   requests up to `capacity` (then Full, and the session stops reading its client).
//! - A request is on at most one live connection at a time, so a reply cannot come twice: a
//!   broken connection is shut down and never read again, and a new one starts with the
//!   held requests resent on it, exactly once each. A reply whose cookie is unknown is a
//!   protocol error and breaks the connection.
//! - Resending is safe: a WRITE, TRIM or WRITE_ZEROES at the same range with the same data
//!   leaves the same bytes; a READ is read again. FLUSH and FUA requests are resent too, so
//!   their success always comes from the destination on the connection that is alive: a
//!   flush is never acknowledged on a guess. (Writes acknowledged on a previous connection
//!   are in the destination's file: a process restart keeps them, and the resent FLUSH covers
//!   them; a power loss of the destination host is not seen here, as with any NBD reconnect.)
//!   Limit: a destination *process* that survives a broken connection (a network cut) may still
//!   apply a request it had already read from it; a ferry session does that before its thread
//!   exits, well before a reconnect's handshake completes, unless its disk stalls longer.
//! - A READ's data lands at `data_start` of its own buffer, as the local engines do. A WRITE
//!   may complete without its buffer (its reply came while the buffer was being resent or
//!   before it was put back); forwarded sessions do not use write buffers (the write trap
//!   only lets forwarded writes leave the gate).
//! - The gauge counts this engine as holding exactly from the link thread's start of holding
//!   to its end (one `hold_started`, one `hold_ended`), and its share of the held requests is
//!   the size of `pending` over that time: the `holding` flag flips, and the share changes,
//!   only under the `pending` lock. Replies are read only while not holding (the link thread
//!   stops holding before it serves a new connection, starts after), so a connected engine
//!   never touches the gauge: its hot path gains one relaxed load of `holding`, under the
//!   `pending` lock `submit` takes anyway.
//!
//! Locks, in this order (never the other way round): `writer` (the installed connection; held
//! while sending on it), then `pending` (the held requests; held only for map updates, never
//! while the socket is written or read: the destination may stop reading our requests while
//! we do not read its replies). `closer` is taken alone. The gauge is lock-free and takes no
//! lock, so updating it under `pending` adds no order. The link thread reads replies
//! without any lock, so sending never waits for itself; the resend after a reconnect runs on a
//! second, scoped thread (`nbd-forward-send`) for the same reason.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use ferry_sys::AlignedBuf;

use crate::disk::ForwardGauge;
use crate::io::{read_data_start, BlockIo, IoCompletion, IoError, IoKind, IoRequest};
use crate::nbd::conn::Conn;
use crate::nbd::tls::ClientTls;
use crate::nbd::wire::{self, RequestHeader};

/// How long a request may wait for a destination that is away before it fails with EIO.
pub const DEFAULT_HOLD_MS: u64 = 60_000;
/// First delay between reconnect attempts.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// Longest delay between reconnect attempts: an outage costs the guest at most this much more
/// than itself (a dial refused by an address nothing listens on costs ~nothing; 1 s made a
/// 2 s outage a 2.6 s stall, scripts/bench-hop).
pub const BACKOFF_MAX: Duration = Duration::from_millis(200);

mod link;

/// A request sent (or to be sent) and not yet answered, with all it takes to send it again.
#[derive(Debug)]
struct Pending {
    header: RequestHeader,
    data_start: usize,
    /// A READ's destination (always here); a WRITE's payload (here once sent, except while a
    /// resend is writing it).
    buf: Option<AlignedBuf>,
    /// The submitter is done with it: sent on the installed connection, or recorded while
    /// there was none. Only ready requests are resent or expired; the others belong to a
    /// submitter that holds or awaits the writer lock and sends them itself.
    ready: bool,
    /// When `submit` took it: the hold counts from here.
    since: Instant,
    /// Submission order, kept by the resend.
    seq: u64,
}

/// Whether a request submitted at `since` has waited past the hold at `now`.
fn expired(since: Instant, now: Instant, hold: Duration) -> bool {
    now.saturating_duration_since(since) >= hold
}

/// The ready requests that waited past the hold at `now`.
fn expired_tags(pending: &HashMap<u64, Pending>, now: Instant, hold: Duration) -> Vec<u64> {
    let is_due = |entry: &Pending| entry.ready && expired(entry.since, now, hold);
    pending
        .iter()
        .filter(|(_, entry)| is_due(entry))
        .map(|(tag, _)| *tag)
        .collect()
}

/// When the oldest ready request's hold ends (None: nothing is held).
fn next_expiry(pending: &HashMap<u64, Pending>, hold: Duration) -> Option<Instant> {
    pending
        .values()
        .filter(|entry| entry.ready)
        .map(|entry| entry.since + hold)
        .min()
}

/// The installed connection; `generation` names it, so the link thread clears only its own.
#[derive(Debug, Default)]
struct Writer {
    conn: Option<Conn>,
    generation: u64,
}

/// What the engine and its link thread share.
#[derive(Debug)]
struct Shared {
    addr: String,
    export: String,
    size_bytes: u64,
    /// The disk's lineage the destination must not contradict (`disk::lineage_matches`).
    lineage: Option<u64>,
    /// STARTTLS with this configuration on each dial; None: plaintext.
    tls: Option<ClientTls>,
    hold: Duration,
    writer: Mutex<Writer>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// A handle on the newest connection, only to shut it down from `Drop`.
    closer: Mutex<Option<Conn>>,
    stop: AtomicBool,
    done: Sender<IoCompletion>,
    /// The export's holding state, shared by its sessions' engines.
    gauge: Arc<ForwardGauge>,
    /// The link thread holds (no connection since it lost one, or since the first attempt
    /// failed). Written only under the `pending` lock, so `Relaxed` suffices.
    holding: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().expect("forward engine lock")
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(nix::libc::EIO)
}

impl Shared {
    /// `addr/export` for log lines.
    fn name(&self) -> String {
        format!("{}/{}", self.addr, self.export)
    }

    fn hold_ms(&self) -> u64 {
        u64::try_from(self.hold.as_millis()).unwrap_or(u64::MAX)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// `count` requests entered `pending` (locked by the caller, who proves it by passing
    /// the map): held ones while holding.
    fn count_in(&self, _locked: &HashMap<u64, Pending>, count: usize) {
        if self.holding.load(Ordering::Relaxed) {
            self.gauge.hold_requests(count as u64);
        }
    }

    /// `count` requests left `pending` (locked by the caller, as for `count_in`).
    fn count_out(&self, _locked: &HashMap<u64, Pending>, count: usize) {
        if self.holding.load(Ordering::Relaxed) {
            self.gauge.release_requests(count as u64);
        }
    }

    /// Link thread: the connection is lost (or the first attempt failed); every request now
    /// in `pending` is held, and so is each one submitted until `stop_holding`.
    fn start_holding(&self) {
        let pending = lock(&self.pending);
        if self.holding.swap(true, Ordering::Relaxed) {
            return;
        }
        self.gauge.hold_started();
        self.gauge.hold_requests(pending.len() as u64);
    }

    /// Link thread: holding ends, because a connection to the same image was made
    /// (`reconnected`; its requests are resent on it) or the engine stops.
    fn stop_holding(&self, reconnected: bool) {
        let pending = lock(&self.pending);
        if !self.holding.swap(false, Ordering::Relaxed) {
            return;
        }
        self.gauge.release_requests(pending.len() as u64);
        self.gauge.hold_ended(reconnected);
    }

    fn finish(&self, tag: u64, entry: Pending, result: io::Result<()>) {
        let completion = IoCompletion {
            tag,
            result,
            buf: entry.buf,
            data_start: entry.data_start,
        };
        // The receiver lives as long as the engine; after that nobody is waiting.
        let _ = self.done.send(completion);
    }
}

/// The export a [`ForwardEngine`] forwards to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardTarget {
    /// host:port of the destination's NBD TCP listener.
    pub addr: String,
    /// The export's name there (the same as here).
    pub export: String,
    /// The image's size: an export of another size under that name is not the same image.
    pub size_bytes: u64,
    /// The disk's lineage: an export whose NBD description names another is another disk
    /// (`disk::lineage_matches`). `None`: not checked.
    pub lineage: Option<u64>,
    /// Dial with STARTTLS and this configuration (the destination requires TLS). None:
    /// plaintext.
    pub tls: Option<ClientTls>,
}

/// Forwards requests to a remote NBD export.
#[derive(Debug)]
pub struct ForwardEngine {
    shared: Arc<Shared>,
    capacity: usize,
    in_flight: usize,
    next_seq: u64,
    done: Receiver<IoCompletion>,
    /// Dropped to wake the link thread from a backoff wait.
    stop_tx: Option<Sender<()>>,
    link: Option<JoinHandle<()>>,
}

impl ForwardEngine {
    /// Forwards to `target`, at most `capacity` requests at a time. A request waits up to
    /// `hold` for a destination that is away. When the destination does not answer now, the
    /// engine starts reconnecting (logged once) and the session's requests wait under the
    /// same hold; only failing to start the link thread is an error. `gauge` is the export's:
    /// the engine reports there while it holds.
    pub fn connect(
        target: ForwardTarget,
        capacity: usize,
        hold: Duration,
        gauge: Arc<ForwardGauge>,
    ) -> io::Result<Self> {
        let (done_tx, done) = crossbeam_channel::unbounded();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let shared = Arc::new(Shared {
            addr: target.addr,
            export: target.export,
            size_bytes: target.size_bytes,
            lineage: target.lineage,
            tls: target.tls,
            hold,
            writer: Mutex::new(Writer::default()),
            pending: Mutex::new(HashMap::new()),
            closer: Mutex::new(None),
            stop: AtomicBool::new(false),
            done: done_tx,
            gauge,
            holding: AtomicBool::new(false),
        });
        let first = match shared.dial() {
            Ok(conn) => {
                // Installed before the first submit: nothing waits for the link thread.
                let reader = conn.try_clone()?;
                *lock(&shared.writer) = Writer {
                    conn: Some(conn),
                    generation: 1,
                };
                Some(reader)
            }
            Err(err) => {
                log::warn!(
                    "forward target {}: {}: the session starts and holds its requests up to \
                     {} ms while reconnecting",
                    shared.name(),
                    crate::error::error_chain(&err),
                    shared.hold_ms()
                );
                None
            }
        };
        let link_shared = shared.clone();
        let link = std::thread::Builder::new()
            .name("nbd-forward".into())
            .spawn(move || link::run_link(&link_shared, first, &stop_rx))?;
        Ok(ForwardEngine {
            shared,
            capacity: capacity.max(1),
            in_flight: 0,
            next_seq: 0,
            done,
            stop_tx: Some(stop_tx),
            link: Some(link),
        })
    }
}

/// The request as the destination receives it.
fn header_of(request: &IoRequest) -> RequestHeader {
    let fua = |fua: bool| if fua { wire::CMD_FLAG_FUA } else { 0 };
    let (command, flags) = match request.kind {
        IoKind::Read => (wire::CMD_READ, 0),
        IoKind::Write { fua: f } => (wire::CMD_WRITE, fua(f)),
        IoKind::Flush => (wire::CMD_FLUSH, 0),
        IoKind::Trim { fua: f } => (wire::CMD_TRIM, fua(f)),
        IoKind::WriteZeroes { may_trim, fua: f } => {
            let no_hole = if may_trim { 0 } else { wire::CMD_FLAG_NO_HOLE };
            (wire::CMD_WRITE_ZEROES, fua(f) | no_hole)
        }
    };
    RequestHeader {
        flags,
        command,
        cookie: request.tag,
        offset_bytes: request.offset_bytes,
        length_bytes: request.len_bytes,
    }
}

/// Writes one request (header, and a WRITE's payload) to the destination.
fn send(conn: &mut Conn, header: &RequestHeader, payload: Option<&AlignedBuf>) -> io::Result<()> {
    let head = header.to_bytes();
    if header.command != wire::CMD_WRITE {
        return conn.write_all(&head);
    }
    let buf = payload.expect("a write keeps its payload until it is answered");
    let data = &buf.as_slice()[..header.length_bytes as usize];
    let mut slices = [io::IoSlice::new(&head), io::IoSlice::new(data)];
    conn.write_all_slices(&mut slices)
}

impl BlockIo for ForwardEngine {
    fn capacity(&self) -> usize {
        self.capacity
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn submit(&mut self, mut request: IoRequest) -> Result<(), (IoError, IoRequest)> {
        if self.in_flight >= self.capacity {
            return Err((IoError::Full, request));
        }
        let header = header_of(&request);
        let reads = header.command == wire::CMD_READ;
        let len = header.length_bytes as usize;
        if header.command == wire::CMD_WRITE && request.buf.as_ref().is_none_or(|b| b.len() < len) {
            return Err((
                IoError::BadRequest("write buffer missing or too short"),
                request,
            ));
        }
        self.next_seq += 1;
        let entry = Pending {
            header,
            data_start: if reads {
                read_data_start(request.offset_bytes)
            } else {
                0
            },
            // A read's buffer goes to the link thread now; a write's stays until sent.
            buf: if reads { request.buf.take() } else { None },
            ready: false,
            since: Instant::now(),
            seq: self.next_seq,
        };
        self.in_flight += 1;
        {
            let mut pending = lock(&self.shared.pending);
            let replaced = pending.insert(request.tag, entry);
            assert!(replaced.is_none(), "tag {} submitted twice", request.tag);
            self.shared.count_in(&pending, 1);
        }
        // Lock order: writer, then pending (the resend after a reconnect takes them the same
        // way, so it waits for this request or this request waits for it: never both).
        let mut writer = lock(&self.shared.writer);
        if let Some(conn) = writer.conn.as_mut() {
            if let Err(err) = send(conn, &header, request.buf.as_ref()) {
                // The link thread sees the shutdown, reconnects, and resends this request.
                log::debug!("forward target {}: send failed: {err}", self.shared.name());
                let _ = conn.shutdown(Shutdown::Both);
                writer.conn = None;
            }
        }
        if let Some(entry) = lock(&self.shared.pending).get_mut(&request.tag) {
            entry.ready = true;
            if !reads {
                entry.buf = request.buf.take();
            }
        } // else the reply already came: the write completes without its buffer.
        drop(writer);
        Ok(())
    }

    fn complete(
        &mut self,
        min_complete: usize,
        out: &mut Vec<IoCompletion>,
    ) -> Result<(), IoError> {
        // The link thread sends a completion for every reply and every expired request, so a
        // wait here ends at the latest when the oldest request's hold does.
        let want = min_complete.min(self.in_flight);
        let mut got = 0;
        while got < want {
            match self.done.recv() {
                Ok(completion) => {
                    out.push(completion);
                    got += 1;
                }
                Err(_) => break,
            }
        }
        while let Ok(completion) = self.done.try_recv() {
            out.push(completion);
            got += 1;
        }
        self.in_flight -= got;
        Ok(())
    }
}

impl Drop for ForwardEngine {
    fn drop(&mut self) {
        // Release pairs with the Acquire in `stopping`; `register` checks under `closer`.
        self.shared.stop.store(true, Ordering::Release);
        drop(self.stop_tx.take());
        if let Some(conn) = lock(&self.shared.closer).as_ref() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        if let Some(link) = self.link.take() {
            let _ = link.join();
        }
    }
}

#[cfg(test)]
mod tests;
