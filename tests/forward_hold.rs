//! The source's forwarder after a switchover, with a destination that goes away: requests
//! are held while it reconnects and resent when it is back, so a guest whose one connection
//! stays at the source sees a stall, not an error; only a request that waited past the hold
//! (`--forward-hold`) fails with EIO, and a different image answering under the export's
//! name is refused.
//!
//! The guest is the in-crate NBD client on one unix-socket connection to the source: it
//! writes 4 KiB blocks (a pattern naming the write), reads each back, flushes now and then,
//! and keeps a ledger of acknowledged writes (offset -> write number) that must read back
//! afterwards.

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

fn guest_loop(mut client: NbdClient, stop: &AtomicBool, stall_us: &AtomicU64) -> GuestReport {
    let mut ledger = BTreeMap::new();
    let mut errors = Vec::new();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut ops = 0;
    while !stop.load(Ordering::Relaxed) {
        ops += 1;
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        let offset = (state >> 33) % BLOCKS * BLOCK;
        let started = Instant::now();
        match client.write_at(offset, &pattern(ops, offset)) {
            Ok(()) => {
                ledger.insert(offset, ops);
            }
            Err(err) => {
                ledger.remove(&offset); // unknown content now
                errors.push(format!("write {ops} at {offset}: {err}"));
            }
        }
        match client.read_at(offset, BLOCK as u32) {
            Ok(data)
                if ledger
                    .get(&offset)
                    .is_none_or(|&seq| data == pattern(seq, offset)) => {}
            Ok(_) => errors.push(format!("read at {offset}: not the acknowledged write")),
            Err(err) => errors.push(format!("read at {offset}: {err}")),
        }
        if ops % 64 == 0 {
            if let Err(err) = client.flush() {
                errors.push(format!("flush: {err}"));
            }
        }
        let took = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        stall_us.fetch_max(took, Ordering::Relaxed);
        if errors.len() > 20 {
            break; // the connection is gone: no point in going on
        }
        std::thread::sleep(Duration::from_millis(3));
    }
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

/// A pair with a 64 MiB disk (32 MiB of data) migrated to the destination.
fn switched_pair(source_extra: &[&str]) -> (tempfile::TempDir, Pair) {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 64 * MIB);
    prefill(&image, 32 * MIB);
    let export = format!("vm1={},granularity=64K", image.display());
    let pair = pair_with(vec![export], source_extra);
    let status = migrate(&pair.source, &pair.destination_transfer, &[]);
    assert_eq!(status["phase"], "done", "{status:#}");
    (dir, pair)
}

fn connect_source(pair: &Pair) -> NbdClient {
    NbdClient::connect_unix(&pair.source.socket, "vm1").expect("connect to the source")
}

// Goal: a destination restarted by SIGTERM, or killed with kill -9 and down for 2 s, costs
// the guest a stall and no error; every acknowledged write reads back; a session opened at
// the source while the destination is down is served once it is back. Method: migrate, run
// the guest on one source connection; SIGTERM + restart the destination; kill -9, 2 s down,
// a second connection opened at the source meanwhile writes and reads, restart; the guest
// runs on; then its ledger is read back; the longest stall of each phase is printed.
#[test]
fn destination_restarts_cost_a_stall_not_an_error() {
    let (_dir, mut pair) = switched_pair(&[]);
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
    assert!(report.ops > 100, "the guest hardly ran: {}", report.ops);
    check_ledger(&mut report.client, &report.ledger);
    let log = pair.source.log();
    assert!(log.contains("connected again"), "{log}");
    for line in log.lines().filter(|line| line.contains("forward target")) {
        println!("source: {line}");
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
    let (_dir, mut pair) = switched_pair(&["--forward-hold", "3000"]);
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
