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
//! broken (a destination that hangs without closing).
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
//!
//! Locks, in this order (never the other way round): `writer` (the installed connection; held
//! while sending on it), then `pending` (the held requests; held only for map updates, never
//! while the socket is written or read: the destination may stop reading our requests while
//! we do not read its replies). `closer` is taken alone. The link thread reads replies
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

use crate::io::{read_data_start, BlockIo, IoCompletion, IoError, IoKind, IoRequest};
use crate::nbd::conn::Conn;
use crate::nbd::wire::{self, RequestHeader};

/// How long a request may wait for a destination that is away before it fails with EIO.
pub const DEFAULT_HOLD_MS: u64 = 60_000;
/// First delay between reconnect attempts.
pub const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// Longest delay between reconnect attempts.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

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
    hold: Duration,
    writer: Mutex<Writer>,
    pending: Mutex<HashMap<u64, Pending>>,
    /// A handle on the newest connection, only to shut it down from `Drop`.
    closer: Mutex<Option<Conn>>,
    stop: AtomicBool,
    done: Sender<IoCompletion>,
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
    /// Forwards to `export` at `addr` (host:port of the destination's NBD TCP listener), whose
    /// size must be `size_bytes` and whose description must not name a lineage other than
    /// `lineage` (when given). A request waits up to `hold` for a destination that is
    /// away. When the destination does not answer now, the engine starts reconnecting (logged
    /// once) and the session's requests wait under the same hold; only failing to start the
    /// link thread is an error.
    pub fn connect(
        addr: &str,
        export: &str,
        size_bytes: u64,
        lineage: Option<u64>,
        capacity: usize,
        hold: Duration,
    ) -> io::Result<Self> {
        let (done_tx, done) = crossbeam_channel::unbounded();
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let shared = Arc::new(Shared {
            addr: addr.to_string(),
            export: export.to_string(),
            size_bytes,
            lineage,
            hold,
            writer: Mutex::new(Writer::default()),
            pending: Mutex::new(HashMap::new()),
            closer: Mutex::new(None),
            stop: AtomicBool::new(false),
            done: done_tx,
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
        let replaced = lock(&self.shared.pending).insert(request.tag, entry);
        assert!(replaced.is_none(), "tag {} submitted twice", request.tag);
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
mod tests {
    use super::*;

    fn entry(since: Instant, ready: bool) -> Pending {
        Pending {
            header: RequestHeader {
                flags: 0,
                command: wire::CMD_FLUSH,
                cookie: 0,
                offset_bytes: 0,
                length_bytes: 0,
            },
            data_start: 0,
            buf: None,
            ready,
            since,
            seq: 0,
        }
    }

    // Goal: only ready requests that waited the whole hold expire, and the next expiry is
    // the oldest ready one's. Method: a map of requests of several ages, judged at one instant.
    #[test]
    fn hold_expiry_takes_only_ready_requests_past_the_hold() {
        let hold = Duration::from_millis(1000);
        let now = Instant::now() + Duration::from_secs(10);
        let mut pending = HashMap::new();
        pending.insert(1, entry(now - Duration::from_millis(1500), true));
        pending.insert(2, entry(now - Duration::from_millis(1000), true));
        pending.insert(3, entry(now - Duration::from_millis(999), true));
        pending.insert(4, entry(now - Duration::from_millis(5000), false));
        let mut due = expired_tags(&pending, now, hold);
        due.sort_unstable();
        assert_eq!(due, [1, 2]);
        let next = next_expiry(&pending, hold).unwrap();
        assert_eq!(next, now - Duration::from_millis(500));
        assert!(expired(now, now, Duration::ZERO));
        assert!(!expired(now, now - Duration::from_millis(1), hold));
        pending.retain(|_, entry| !entry.ready);
        assert_eq!(next_expiry(&pending, hold), None);
    }

    /// A loopback address nothing listens on (a port just bound and released).
    fn unreachable_addr() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("127.0.0.1:{}", listener.local_addr().unwrap().port())
    }

    // Goal: an engine opened while nothing listens at the destination starts (reconnecting),
    // holds a request for the whole hold and then fails it with EIO, and drops promptly.
    // Method: a port with no listener; a FLUSH with a 300 ms hold; timed.
    #[test]
    fn unreachable_destination_holds_then_fails_with_eio() {
        let addr = unreachable_addr();
        let hold = Duration::from_millis(300);
        let mut engine = ForwardEngine::connect(&addr, "vm", 1 << 20, None, 4, hold).unwrap();
        let started = Instant::now();
        let flush = IoRequest {
            tag: 7,
            kind: IoKind::Flush,
            offset_bytes: 0,
            len_bytes: 0,
            buf: None,
        };
        engine.submit(flush).unwrap();
        assert_eq!(engine.in_flight(), 1);
        let mut out = Vec::new();
        engine.complete(1, &mut out).unwrap();
        let waited = started.elapsed();
        assert!(waited >= hold, "failed after {waited:?}");
        assert!(waited < hold + Duration::from_secs(2), "{waited:?}");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].tag, 7);
        let errno = out[0].result.as_ref().unwrap_err().raw_os_error();
        assert_eq!(errno, Some(nix::libc::EIO));
        assert_eq!(engine.in_flight(), 0);
        let dropping = Instant::now();
        drop(engine);
        assert!(dropping.elapsed() < Duration::from_secs(1));
    }

    // Goal: beyond its capacity the engine refuses (Full) instead of failing requests while
    // it holds them. Method: capacity 1, destination unreachable, two submits.
    #[test]
    fn held_engine_is_full_at_capacity() {
        let addr = unreachable_addr();
        let hold = Duration::from_secs(60);
        let mut engine = ForwardEngine::connect(&addr, "vm", 1 << 20, None, 1, hold).unwrap();
        let flush = |tag| IoRequest {
            tag,
            kind: IoKind::Flush,
            offset_bytes: 0,
            len_bytes: 0,
            buf: None,
        };
        engine.submit(flush(0)).unwrap();
        let (err, back) = engine.submit(flush(1)).unwrap_err();
        assert!(matches!(err, IoError::Full));
        assert_eq!(back.tag, 1);
        let mut out = Vec::new();
        engine.complete(0, &mut out).unwrap();
        assert!(out.is_empty(), "a held request completed: {out:?}");
    }

    /// The export a fake destination serves.
    struct Catalog(wire::ExportInfo);

    impl wire::ExportCatalog for Catalog {
        fn list(&self) -> Vec<wire::ExportInfo> {
            vec![self.0.clone()]
        }
        fn lookup(&self, name: &str) -> Option<wire::ExportInfo> {
            (name == self.0.name).then(|| self.0.clone())
        }
    }

    const FAKE_BYTES: u64 = 1 << 20;

    /// A fake destination on loopback: handshakes `vm` (1 MiB) on every connection, then hands
    /// the connection and its index to `serve`. Returns the address.
    fn fake_destination(serve: impl Fn(usize, std::net::TcpStream) + Send + 'static) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let catalog = Catalog(wire::ExportInfo {
                name: "vm".into(),
                description: String::new(),
                size_bytes: FAKE_BYTES,
                read_only: false,
                multi_conn: true,
                can_trim: true,
                can_fast_zero: false,
                block_min: 1,
                block_preferred: 4096,
                block_max: 1 << 25,
                meta_contexts: Vec::new(),
            });
            for (index, stream) in listener.incoming().enumerate() {
                let Ok(mut stream) = stream else { return };
                let negotiated = crate::nbd::handshake::negotiate(&mut stream, &catalog);
                if matches!(negotiated, Ok(Some(_))) {
                    serve(index, stream);
                }
            }
        });
        addr
    }

    /// Reads one request (and a WRITE's payload); None at end of stream.
    fn read_request(stream: &mut std::net::TcpStream) -> Option<(RequestHeader, Vec<u8>)> {
        use std::io::Read;
        let mut head = [0u8; wire::REQUEST_BYTES];
        stream.read_exact(&mut head).ok()?;
        let header = wire::parse_request(&head).ok()?;
        let mut payload = vec![0u8; header.payload_bytes() as usize];
        stream.read_exact(&mut payload).ok()?;
        Some((header, payload))
    }

    fn request(tag: u64, kind: IoKind, offset_bytes: u64, len_bytes: u32) -> IoRequest {
        let buf = match kind {
            IoKind::Read => Some(AlignedBuf::zeroed(
                crate::io::read_buf_len(offset_bytes, len_bytes),
                4096,
            )),
            IoKind::Write { .. } => {
                let mut buf = AlignedBuf::zeroed(len_bytes as usize, 4096);
                buf.as_mut_slice().fill(0xab);
                Some(buf)
            }
            _ => None,
        };
        IoRequest {
            tag,
            kind,
            offset_bytes,
            len_bytes,
            buf,
        }
    }

    // Goal: requests on a connection that breaks before answering are resent on the next one,
    // each exactly once with the same bytes, and complete once, successfully. Method: a fake
    // destination whose first connection reads three requests (WRITE, READ, FLUSH) and
    // closes; its second connection records what it receives and answers everything.
    #[test]
    fn broken_connection_resends_each_request_once() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let addr = fake_destination(move |index, mut stream| {
            if index == 0 {
                for _ in 0..3 {
                    read_request(&mut stream);
                }
                return; // dropped unanswered
            }
            while let Some((header, payload)) = read_request(&mut stream) {
                log.lock().unwrap().push((header, payload));
                let mut reply = Vec::new();
                wire::encode_simple_reply(&mut reply, header.cookie, 0);
                if header.command == wire::CMD_READ {
                    reply.extend(std::iter::repeat_n(0x5a, header.length_bytes as usize));
                }
                stream.write_all(&reply).unwrap();
            }
        });
        let hold = Duration::from_secs(30);
        let mut engine = ForwardEngine::connect(&addr, "vm", FAKE_BYTES, None, 8, hold).unwrap();
        let write = IoKind::Write { fua: true };
        engine.submit(request(0, write, 8192, 4096)).unwrap();
        engine.submit(request(1, IoKind::Read, 100, 512)).unwrap();
        engine.submit(request(2, IoKind::Flush, 0, 0)).unwrap();
        let mut out = Vec::new();
        while out.len() < 3 {
            engine.complete(1, &mut out).unwrap();
        }
        assert_eq!(out.len(), 3, "{out:?}");
        for completion in &out {
            assert!(completion.result.is_ok(), "{completion:?}");
        }
        let read = out.iter().find(|c| c.tag == 1).unwrap();
        let data = &read.buf.as_ref().unwrap().as_slice()[read.data_start..][..512];
        assert!(data.iter().all(|&b| b == 0x5a));
        let seen = seen.lock().unwrap();
        let mut cookies: Vec<u64> = seen.iter().map(|(header, _)| header.cookie).collect();
        cookies.sort_unstable();
        assert_eq!(cookies, [0, 1, 2], "each request resent exactly once");
        let (header, payload) = seen.iter().find(|(h, _)| h.cookie == 0).unwrap();
        assert_eq!(header.flags, wire::CMD_FLAG_FUA);
        assert_eq!((header.offset_bytes, header.length_bytes), (8192, 4096));
        assert!(payload.iter().all(|&b| b == 0xab));
        assert_eq!(engine.in_flight(), 0);
    }

    // Goal: a destination that accepts and then never answers does not hold a request
    // forever: it fails with EIO once it waited the hold, not before. Method: a fake
    // destination that handshakes and reads but never replies; a 300 ms hold; timed.
    #[test]
    fn silent_destination_fails_requests_after_the_hold() {
        let addr = fake_destination(|_, mut stream| {
            std::thread::spawn(move || while read_request(&mut stream).is_some() {});
        });
        let hold = Duration::from_millis(300);
        let mut engine = ForwardEngine::connect(&addr, "vm", FAKE_BYTES, None, 8, hold).unwrap();
        let started = Instant::now();
        engine.submit(request(3, IoKind::Flush, 0, 0)).unwrap();
        let mut out = Vec::new();
        engine.complete(1, &mut out).unwrap();
        let waited = started.elapsed();
        assert!(waited >= hold, "{waited:?}");
        assert!(waited < Duration::from_secs(3), "{waited:?}");
        let errno = out[0].result.as_ref().unwrap_err().raw_os_error();
        assert_eq!(errno, Some(nix::libc::EIO));
    }
}
