//! Unit tests of the forwarding engine: hold expiry, an unreachable destination, capacity,
//! and fake destinations on loopback (a broken connection, a silent one, one that comes up
//! late), with the export's gauge checked along the way.

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

/// An engine forwarding to `vm` of `size_bytes` at `addr`, and its export's gauge.
fn open(
    addr: &str,
    size_bytes: u64,
    capacity: usize,
    hold: Duration,
) -> (ForwardEngine, Arc<ForwardGauge>) {
    let target = ForwardTarget {
        addr: addr.to_string(),
        export: "vm".into(),
        size_bytes,
        lineage: None,
        tls: None,
    };
    let gauge = Arc::new(ForwardGauge::default());
    let engine = ForwardEngine::connect(target, capacity, hold, gauge.clone()).unwrap();
    (engine, gauge)
}

/// Waits up to 5 s for `gauge` to say `requests` are held (the link thread starts holding
/// on its own time); panics with what it said instead.
fn wait_held(gauge: &ForwardGauge, requests: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while gauge.holding().map(|h| h.requests) != Some(requests) {
        assert!(
            Instant::now() < deadline,
            "gauge says {:?}, not {requests} held",
            gauge.holding()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

// Goal: an engine opened while nothing listens at the destination starts (reconnecting),
// holds a request for the whole hold and then fails it with EIO, and drops promptly; the
// gauge says holding with the request while it waits, holding with none after the EIO, and
// nothing once the engine is gone. Method: a port with no listener; a FLUSH with a 300 ms
// hold; timed.
#[test]
fn unreachable_destination_holds_then_fails_with_eio() {
    let addr = unreachable_addr();
    let hold = Duration::from_millis(300);
    let (mut engine, gauge) = open(&addr, 1 << 20, 4, hold);
    wait_held(&gauge, 0);
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
    assert_eq!(gauge.holding().map(|h| h.requests), Some(1));
    let mut out = Vec::new();
    engine.complete(1, &mut out).unwrap();
    let waited = started.elapsed();
    assert_eq!(
        gauge.holding().map(|h| h.requests),
        Some(0),
        "still holding"
    );
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
    assert_eq!(gauge.holding(), None);
    assert_eq!(gauge.reconnects(), 0);
}

// Goal: beyond its capacity the engine refuses (Full) instead of failing requests while
// it holds them. Method: capacity 1, destination unreachable, two submits.
#[test]
fn held_engine_is_full_at_capacity() {
    let addr = unreachable_addr();
    let hold = Duration::from_secs(60);
    let (mut engine, gauge) = open(&addr, 1 << 20, 1, hold);
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
    wait_held(&gauge, 1);
    drop(engine); // its held request fails and leaves the gauge
    assert_eq!(gauge.holding(), None);
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
    fake_destination_at("127.0.0.1:0", serve)
}

/// [`fake_destination`] listening at `addr`.
fn fake_destination_at(
    addr: &str,
    serve: impl Fn(usize, std::net::TcpStream) + Send + 'static,
) -> String {
    let listener = std::net::TcpListener::bind(addr).unwrap();
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
    let (mut engine, gauge) = open(&addr, FAKE_BYTES, 8, hold);
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
    assert_eq!(gauge.holding(), None, "connected again: not holding");
    assert_eq!(gauge.reconnects(), 1);
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
    let (mut engine, _gauge) = open(&addr, FAKE_BYTES, 8, hold);
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

/// Answers every request on `stream` (a READ with 0x5a bytes) until it closes.
fn answer_all(mut stream: std::net::TcpStream) {
    while let Some((header, _)) = read_request(&mut stream) {
        let mut reply = Vec::new();
        wire::encode_simple_reply(&mut reply, header.cookie, 0);
        if header.command == wire::CMD_READ {
            reply.extend(std::iter::repeat_n(0x5a, header.length_bytes as usize));
        }
        if stream.write_all(&reply).is_err() {
            return;
        }
    }
}

// Goal: while the destination is down the gauge counts every request the engine holds,
// those submitted before it noticed and those after; when the destination comes up they
// are resent and answered, and the gauge says not holding, one reconnect. Method: an
// engine opened on a port with no listener; a WRITE, a READ and a FLUSH submitted; the
// gauge read; a fake destination started on that port; completions awaited.
#[test]
fn gauge_counts_held_requests_until_the_destination_is_back() {
    let addr = unreachable_addr();
    let (mut engine, gauge) = open(&addr, FAKE_BYTES, 8, Duration::from_secs(30));
    engine
        .submit(request(0, IoKind::Write { fua: false }, 0, 4096))
        .unwrap();
    wait_held(&gauge, 1);
    engine.submit(request(1, IoKind::Read, 4096, 4096)).unwrap();
    engine.submit(request(2, IoKind::Flush, 0, 0)).unwrap();
    assert_eq!(gauge.holding().map(|h| h.requests), Some(3));
    let since = gauge.holding().unwrap().since_unix_ms;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    assert!(since > 0 && u128::from(since) <= now.unwrap().as_millis());
    fake_destination_at(&addr, |_, stream| {
        std::thread::spawn(move || answer_all(stream));
    });
    let mut out = Vec::new();
    while out.len() < 3 {
        engine.complete(1, &mut out).unwrap();
    }
    assert!(out.iter().all(|c| c.result.is_ok()), "{out:?}");
    assert_eq!(gauge.holding(), None);
    assert_eq!(gauge.reconnects(), 1);
}
