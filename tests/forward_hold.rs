//! The source's forwarder after a switchover, with a destination that goes away: requests
//! are held while it reconnects and resent when it is back, so a guest whose one connection
//! stays at the source sees a stall, not an error; the source says so (`holding since T, N
//! requests` in its API, `ferry export ls`, `ferry status` and `/metrics`) until the
//! destination is back; only a request that waited past the hold (`--forward-hold`, or the
//! export's own `forward_hold=MS`) fails with EIO, and a different image answering under
//! the export's name is refused.
//!
//! The guest is the in-crate NBD client on one unix-socket connection to the source: in
//! batches of 8 pipelined requests it writes 4 KiB blocks (a pattern naming the write; some
//! FUA), reads them back, flushes every 8th batch, and keeps a ledger of acknowledged writes
//! (offset -> write number) that must read back afterwards. So a restart finds several
//! requests in flight, and they are resent.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::pair::{migrate, pair_with, prefill, Pair, MIB};
use common::sparse_image;
use ferry::nbd::client::NbdClient;

const BLOCK: u64 = 4096;
/// The guest writes in the first 16 MiB.
const BLOCKS: u64 = 4096;

/// The bytes of write number `seq` at `offset`.
fn pattern(seq: u64, offset: u64) -> Vec<u8> {
    let word = (seq << 20) ^ offset;
    word.to_le_bytes()
        .iter()
        .copied()
        .cycle()
        .take(BLOCK as usize)
        .collect()
}

/// What the guest saw.
struct GuestReport {
    client: NbdClient,
    ledger: BTreeMap<u64, u64>,
    errors: Vec<String>,
    ops: u64,
}

/// The guest loop on its own thread.
struct Guest {
    stop: Arc<AtomicBool>,
    /// Longest request since the last `take_stall`, in microseconds.
    stall_us: Arc<AtomicU64>,
    thread: JoinHandle<GuestReport>,
}

impl Guest {
    fn start(client: NbdClient) -> Guest {
        let stop = Arc::new(AtomicBool::new(false));
        let stall_us = Arc::new(AtomicU64::new(0));
        let (stop_in, stall_in) = (stop.clone(), stall_us.clone());
        let thread = std::thread::spawn(move || guest_loop(client, &stop_in, &stall_in));
        Guest {
            stop,
            stall_us,
            thread,
        }
    }

    /// The longest request since the last call.
    fn take_stall(&self) -> Duration {
        Duration::from_micros(self.stall_us.swap(0, Ordering::Relaxed))
    }

    fn finish(self) -> GuestReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("guest thread")
    }
}

/// Requests the guest keeps in flight at once (pipelined on its one connection).
const DEPTH: usize = 8;

fn guest_loop(mut client: NbdClient, stop: &AtomicBool, stall_us: &AtomicU64) -> GuestReport {
    let mut ledger = BTreeMap::new();
    let mut errors = Vec::new();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut ops = 0;
    let mut batches = 0u64;
    while !stop.load(Ordering::Relaxed) && errors.len() <= 20 {
        batches += 1;
        let started = Instant::now();
        // DEPTH writes to distinct blocks in flight at once, then their reads, pipelined.
        let mut batch = BTreeMap::new();
        while batch.len() < DEPTH {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1);
            ops += 1;
            batch.entry((state >> 33) % BLOCKS * BLOCK).or_insert(ops);
        }
        let mut cookies = BTreeMap::new();
        for (&offset, &seq) in &batch {
            match client.send_write(offset, &pattern(seq, offset), seq % 16 == 0) {
                Ok(cookie) => cookies.insert(cookie, offset),
                Err(err) => return report(client, ledger, errors, ops, &err),
            };
        }
        let flush = (batches % 8 == 0).then(|| client.send_flush());
        for _ in 0..cookies.len() + usize::from(flush.is_some()) {
            let reply = match client.recv() {
                Ok(reply) => reply,
                Err(err) => return report(client, ledger, errors, ops, &err),
            };
            let Some(&offset) = cookies.get(&reply.cookie) else {
                if reply.error != 0 {
                    errors.push(format!("flush: NBD error {}", reply.error));
                }
                continue;
            };
            if reply.error == 0 {
                ledger.insert(offset, batch[&offset]);
            } else {
                ledger.remove(&offset); // unknown content now
                errors.push(format!("write at {offset}: NBD error {}", reply.error));
            }
        }
        let mut reads = BTreeMap::new();
        for &offset in batch.keys() {
            match client.send_read(offset, BLOCK as u32) {
                Ok(cookie) => reads.insert(cookie, offset),
                Err(err) => return report(client, ledger, errors, ops, &err),
            };
        }
        for _ in 0..reads.len() {
            let reply = match client.recv() {
                Ok(reply) => reply,
                Err(err) => return report(client, ledger, errors, ops, &err),
            };
            let offset = reads[&reply.cookie];
            let expected = ledger.get(&offset).map(|&seq| pattern(seq, offset));
            match (reply.error, reply.data, expected) {
                (0, Some(data), Some(expected)) if data != expected => {
                    errors.push(format!("read at {offset}: not the acknowledged write"));
                }
                (0, _, _) => {}
                (error, _, _) => errors.push(format!("read at {offset}: NBD error {error}")),
            }
        }
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        stall_us.fetch_max(took, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(3));
    }
    GuestReport {
        client,
        ledger,
        errors,
        ops,
    }
}

/// The report of a guest whose connection failed.
fn report(
    client: NbdClient,
    ledger: BTreeMap<u64, u64>,
    mut errors: Vec<String>,
    ops: u64,
    err: &std::io::Error,
) -> GuestReport {
    errors.push(format!("connection: {err}"));
    GuestReport {
        client,
        ledger,
        errors,
        ops,
    }
}

/// Every acknowledged write reads back through `client`.
fn check_ledger(client: &mut NbdClient, ledger: &BTreeMap<u64, u64>) {
    for (&offset, &seq) in ledger {
        let data = client.read_at(offset, BLOCK as u32).expect("read back");
        assert!(
            data == pattern(seq, offset),
            "acknowledged write {seq} at {offset} lost"
        );
    }
}

/// A pair with a 64 MiB disk (32 MiB of data) migrated to the destination; `export_options`
/// are appended to the source's `--export vm1=PATH,granularity=64K`.
fn switched_pair(export_options: &str, source_extra: &[&str]) -> (tempfile::TempDir, Pair) {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 64 * MIB);
    prefill(&image, 32 * MIB);
    let export = format!("vm1={},granularity=64K{export_options}", image.display());
    let pair = pair_with(vec![export], source_extra);
    let status = migrate(&pair.source, &pair.destination_transfer, &[]);
    assert_eq!(status["phase"], "done", "{status:#}");
    (dir, pair)
}

fn connect_source(pair: &Pair) -> NbdClient {
    NbdClient::connect_unix(&pair.source.socket, "vm1").expect("connect to the source")
}

/// Polls `probe` every 50 ms for up to 20 s until it returns Some; panics with `what`.
fn wait_for<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the source's API says of vm1's holding now (None: not forwarding or not holding).
fn source_holding(pair: &Pair) -> Option<ferry::api::types::Holding> {
    let export = pair
        .source
        .client()
        .export("vm1")
        .expect("vm1 at the source");
    export.forwarding.expect("vm1 is forwarded").holding
}

/// `ferry ARGS` at the source: its standard output (the call must succeed).
fn source_cli(pair: &Pair, args: &[&str]) -> String {
    let out = pair.source.cli(args);
    assert!(out.status.success(), "ferry {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// Goal: a destination restarted by SIGTERM, or killed with kill -9 and down for 2 s, costs
// the guest a stall and no error; every acknowledged write reads back; a session opened at
// the source while the destination is down is served once it is back. Method: migrate, run
// the guest on one source connection; SIGTERM + restart the destination; kill -9, 2 s down,
// a second connection opened at the source meanwhile writes and reads, restart; the guest
// runs on; then its ledger is read back; the longest stall of each phase is printed.
#[test]
fn destination_restarts_cost_a_stall_not_an_error() {
    let (_dir, mut pair) = switched_pair("", &[]);
    let guest = Guest::start(connect_source(&pair));
    std::thread::sleep(Duration::from_secs(1));
    let steady = guest.take_stall();

    assert!(pair.destination.stop(), "{}", pair.destination.log());
    pair.restart_destination();
    std::thread::sleep(Duration::from_secs(1));
    let sigterm = guest.take_stall();

    pair.destination.kill();
    let late = connect_source(&pair);
    let late_guest = std::thread::spawn(move || {
        let mut late = late;
        let offset = 40 * MIB;
        let started = Instant::now();
        late.write_at(offset, &pattern(1, offset)).expect("write");
        let data = late.read_at(offset, BLOCK as u32).expect("read");
        assert!(data == pattern(1, offset));
        started.elapsed()
    });
    std::thread::sleep(Duration::from_secs(2));
    pair.restart_destination();
    std::thread::sleep(Duration::from_secs(1));
    let kill = guest.take_stall();
    let late_wait = late_guest.join().expect("late session");

    let mut report = guest.finish();
    println!(
        "guest: {} ops; longest stall: steady {:?}, SIGTERM restart {:?}, kill -9 + 2 s down \
         {:?}; session opened while down served after {:?}",
        report.ops, steady, sigterm, kill, late_wait
    );
    assert!(
        report.errors.is_empty(),
        "{:?}\nsource log:\n{}",
        report.errors,
        pair.source.log()
    );
    assert!(report.ops > 200, "the guest hardly ran: {}", report.ops);
    check_ledger(&mut report.client, &report.ledger);
    let log = pair.source.log();
    assert!(log.contains("connected again"), "{log}");
    for line in log.lines().filter(|line| line.contains("forward target")) {
        println!("source: {line}");
    }
    // FORWARD_HOLD_LOGS=1 (with --nocapture) prints both agents' logs.
    if std::env::var_os("FORWARD_HOLD_LOGS").is_some() {
        println!(
            "SOURCE LOG\n{log}\nDESTINATION LOG\n{}",
            pair.destination.log()
        );
    }
}

// Goal: with `--forward-hold 3000`, a request to a destination that stays down fails with
// EIO after about 3 s and never before; a destination restarted with a different-size image
// under the same export name is refused (requests hold, then EIO after the hold); once the
// right image is back, requests succeed again. Method: migrate; kill -9 the destination;
// time one write; grow the destination's image to 128 MiB and restart it; time one write;
// stop, shrink back, restart; a write and read succeed on the same connection.
#[test]
fn hold_expires_with_eio_and_a_different_image_is_refused() {
    let (_dir, mut pair) = switched_pair("", &["--forward-hold", "3000"]);
    let mut client = connect_source(&pair);
    client.write_at(0, &pattern(1, 0)).expect("write while up");

    pair.destination.kill();
    let started = Instant::now();
    let failed = client.write_at(0, &pattern(2, 0));
    let to_eio = started.elapsed();
    println!("destination down: write failed after {to_eio:?}");
    let err = failed.expect_err("a write to a destination that stays down fails");
    assert!(err.to_string().contains("NBD error 5"), "{err}");
    assert!(to_eio >= Duration::from_millis(2500), "{to_eio:?}");
    assert!(to_eio < Duration::from_secs(8), "{to_eio:?}");

    let image = pair.destination.state_dir.join("images").join("vm1.img");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .expect("destination image")
        .set_len(128 * MIB)
        .unwrap();
    pair.restart_destination();
    let started = Instant::now();
    let failed = client.write_at(0, &pattern(3, 0));
    let to_eio = started.elapsed();
    println!("different image: write failed after {to_eio:?}");
    assert!(failed.is_err(), "a write reached a different image");
    assert!(to_eio >= Duration::from_millis(2500), "{to_eio:?}");
    let log = pair.source.log();
    assert!(log.contains("not the same image"), "{log}");

    assert!(pair.destination.stop(), "{}", pair.destination.log());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    pair.restart_destination();
    client
        .write_at(0, &pattern(4, 0))
        .expect("write after the right image is back");
    let data = client.read_at(0, BLOCK as u32).expect("read");
    assert!(data == pattern(4, 0));
}

// Goal: another disk answering under the export's name and size at the destination's
// address (a fresh agent serving its own vm1) is refused: its NBD description names
// another lineage. Method: migrate (hold 3 s); stop the destination; start an agent on its
// NBD address serving a local 64 MiB vm1; a write at the source fails after the hold and
// the source logs the refusal; the impostor's image is untouched; with the real destination
// back, writes succeed on the same connection.
#[test]
fn another_disk_of_the_same_size_is_refused() {
    let (_dir, mut pair) = switched_pair("", &["--forward-hold", "3000"]);
    let mut client = connect_source(&pair);
    client.write_at(0, &pattern(1, 0)).expect("write while up");
    let nbd_tcp = pair
        .destination
        .tcp
        .clone()
        .expect("destination NBD address");
    assert!(pair.destination.stop(), "{}", pair.destination.log());

    let other_dir = common::scratch_dir();
    let other = other_dir.path().join("other.img");
    sparse_image(&other, 64 * MIB);
    let tcp_flag = format!("--tcp={nbd_tcp}");
    let impostor = common::AgentProc::start(
        &[format!("vm1={},granularity=64K", other.display())],
        &[&tcp_flag],
    );
    let started = Instant::now();
    let failed = client.write_at(0, &pattern(2, 0));
    println!("another disk: write failed after {:?}", started.elapsed());
    assert!(failed.is_err(), "a write reached another disk");
    let log = pair.source.log();
    assert!(log.contains("serves another disk"), "{log}");
    let untouched = std::fs::read(&other).unwrap();
    assert!(
        untouched.iter().all(|&byte| byte == 0),
        "the other disk was written"
    );
    drop(impostor);

    pair.restart_destination();
    client
        .write_at(0, &pattern(3, 0))
        .expect("write with the disk back");
    let data = client.read_at(0, BLOCK as u32).expect("read");
    assert!(data == pattern(3, 0));
}

// Goal: while the destination is away the source says its forwarded export is holding,
// since when and how many requests (API, `ferry export ls`, `ferry status`, `/metrics`),
// with the guest's in-flight requests counted; once the destination is back it no longer
// does, a reconnect is counted, and no request failed. Method: migrate; the guest pipelines
// on one source connection; SIGTERM the destination; poll the source's API until it says
// holding with N >= 1; read the listing, the status and the metrics; restart the
// destination; poll until the API no longer says holding; read them again; the guest's
// ledger reads back.
#[test]
fn holding_is_shown_while_the_destination_is_away() {
    let (_dir, mut pair) = switched_pair("", &[]);
    let guest = Guest::start(connect_source(&pair));
    std::thread::sleep(Duration::from_millis(500));
    let stopped_at = std::time::SystemTime::now();
    assert!(pair.destination.stop(), "{}", pair.destination.log());

    let holding = wait_for("the source says holding with a request", || {
        source_holding(&pair).filter(|holding| holding.requests >= 1)
    });
    let stopped_ms = stopped_at.duration_since(std::time::UNIX_EPOCH).unwrap();
    let since_ms = u128::from(holding.since_unix_ms);
    assert!(
        since_ms + 1000 >= stopped_ms.as_millis(),
        "holding since {since_ms}, the destination stopped at {stopped_ms:?}"
    );
    println!("holding: {holding:?}");
    let listing = source_cli(&pair, &["export", "ls"]);
    assert!(listing.contains("forwarding → "), "{listing}");
    assert!(listing.contains(" (holding since "), "{listing}");
    assert!(listing.contains(" request"), "{listing}");
    let status = source_cli(&pair, &["status"]);
    assert!(status.contains("vm1 (job "), "{status}");
    assert!(status.contains(" (holding since "), "{status}");
    let metrics = pair.source.client().metrics().expect("metrics");
    assert!(
        metrics.contains("ferry_export_forward_holding{export=\"vm1\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("ferry_export_forward_held_requests{export=\"vm1\"} 0\n"),
        "{metrics}"
    );

    pair.restart_destination();
    wait_for("the source no longer says holding", || {
        source_holding(&pair).is_none().then_some(())
    });
    let listing = source_cli(&pair, &["export", "ls"]);
    assert!(listing.contains("forwarding → "), "{listing}");
    assert!(!listing.contains("holding"), "{listing}");
    assert!(!source_cli(&pair, &["status"]).contains("holding"));
    let metrics = pair.source.client().metrics().expect("metrics");
    for want in [
        "ferry_export_forward_holding{export=\"vm1\"} 0",
        "ferry_export_forward_held_requests{export=\"vm1\"} 0",
    ] {
        assert!(metrics.contains(want), "{want}:\n{metrics}");
    }
    let reconnects = pair.source.client().export("vm1").unwrap().stats;
    assert!(reconnects.forward_reconnects >= 1, "{reconnects:?}");

    std::thread::sleep(Duration::from_millis(500));
    let mut report = guest.finish();
    assert!(
        report.errors.is_empty(),
        "{:?}\nsource log:\n{}",
        report.errors,
        pair.source.log()
    );
    check_ledger(&mut report.client, &report.ledger);
}

// Goal: an export's own hold (`--export ...,forward_hold=MS`) wins over the agent's: with
// the agent's hold at 10 minutes and the export's at 2 s, a write to a destination that
// stays down fails with EIO after about 2 s; the API shows the export's hold. Method:
// migrate; read the export's status; kill -9 the destination; time one write.
#[test]
fn an_export_hold_wins_over_the_agent_hold() {
    let (_dir, mut pair) = switched_pair(",forward_hold=2000", &["--forward-hold", "600000"]);
    let export = pair.source.client().export("vm1").expect("vm1");
    assert_eq!(export.forward_hold_ms, Some(2000));
    let mut client = connect_source(&pair);
    client.write_at(0, &pattern(1, 0)).expect("write while up");
    pair.destination.kill();
    let started = Instant::now();
    let failed = client.write_at(0, &pattern(2, 0));
    let to_eio = started.elapsed();
    println!("destination down, export hold 2 s: write failed after {to_eio:?}");
    let err = failed.expect_err("a write to a destination that stays down fails");
    assert!(err.to_string().contains("NBD error 5"), "{err}");
    assert!(to_eio >= Duration::from_millis(1500), "{to_eio:?}");
    assert!(to_eio < Duration::from_secs(8), "{to_eio:?}");
}
