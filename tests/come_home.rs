//! A disk comes home, and a chain of moves leaves one hop: after A→B, the agent that holds
//! the guest's connection (A, which forwards to B) takes the disk back with
//! `ferry migrate vm1 --to A` at B, and from the switchover on serves it from a new local
//! image; after A→B→C, B tells A where the disk went and A forwards straight to C. Either way
//! B can go away.
//!
//! How this proves no acknowledged write is lost: one guest connection at A writes
//! throughout the migrations, keeping a ledger of every write the agent acknowledged (block
//! -> generation, never two writes of one block in flight); after B is killed and again after
//! A restarts, every block of the ledger reads back with its last acknowledged generation.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::pair::{migrate, prefill, write_key, MIB};
use common::{free_port, require, sparse_image, stdout, AgentProc};
use ferry::nbd::client::NbdClient;

const BLOCK_BYTES: u64 = 4096;
const DISK_BYTES: u64 = 64 * MIB;

/// The 4 KiB block of `generation` at `offset`: both are readable back from it.
fn pattern(offset: u64, generation: u64) -> Vec<u8> {
    let mut block = Vec::with_capacity(BLOCK_BYTES as usize);
    while block.len() < BLOCK_BYTES as usize {
        block.extend_from_slice(&offset.to_le_bytes());
        block.extend_from_slice(&generation.to_le_bytes());
    }
    block
}

/// A guest writing 4 KiB blocks one at a time on one connection until stopped; returns the
/// connection and its ledger of acknowledged writes.
fn guest(socket: std::path::PathBuf, stop: Arc<AtomicBool>) -> JoinHandle<(NbdClient, Ledger)> {
    std::thread::spawn(move || {
        let mut nbd = NbdClient::connect_unix(&socket, "vm1").expect("guest connects");
        let mut ledger = HashMap::new();
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut generation = 0u64;
        while !stop.load(Ordering::Relaxed) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let offset = state % (DISK_BYTES / BLOCK_BYTES) * BLOCK_BYTES;
            generation += 1;
            nbd.write_at(offset, &pattern(offset, generation))
                .unwrap_or_else(|err| panic!("write {generation} at {offset} failed: {err}"));
            ledger.insert(offset, generation);
            std::thread::sleep(Duration::from_millis(2));
        }
        (nbd, ledger)
    })
}

type Ledger = HashMap<u64, u64>;

/// Every block of `ledger` holds its last acknowledged write.
fn check_ledger(nbd: &mut NbdClient, ledger: &Ledger) {
    for (&offset, &generation) in ledger {
        let read = nbd.read_at(offset, BLOCK_BYTES as u32).expect("read back");
        assert!(
            read == pattern(offset, generation),
            "block at {offset} lost write {generation}"
        );
    }
}

fn agent(dir: tempfile::TempDir, exports: &[String], key: &str, transfer: &str) -> AgentProc {
    AgentProc::start_in(
        dir,
        exports,
        &["--tcp", "--transfer", transfer, "--cluster-key", key],
    )
}

// Goal: A→B then B→A leaves A serving the disk locally from a new image, with the guest's
// connection kept and no request failing; B can then be killed; a restart of A serves the
// same image. Method: a guest writing every 2 ms on one connection at A throughout; migrate
// A→B (forwarding), then B→A; `ferry export ls` at A shows no forwarding and the received
// image; kill -9 B; the guest writes 1 s more; the ledger reads back through its own
// connection; A restarts (SIGTERM) and the ledger reads back through a new one.
#[test]
fn a_disk_comes_home_and_no_hop_remains() {
    require("fio");
    let keys = common::scratch_dir();
    let key = write_key(keys.path());
    let key = key.to_str().unwrap();
    let a_dir = common::scratch_dir();
    let image = a_dir.path().join("vm1.img");
    sparse_image(&image, DISK_BYTES);
    prefill(&image, 16 * MIB);
    let a_transfer = format!("127.0.0.1:{}", free_port());
    let b_transfer = format!("127.0.0.1:{}", free_port());
    let exports = vec![format!(
        "vm1={},granularity=64K,tracker=backup",
        image.display()
    )];
    let mut a = agent(a_dir, &exports, key, &a_transfer);
    let mut b = agent(common::scratch_dir(), &[], key, &b_transfer);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = guest(a.socket.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let away = migrate(&a, &b_transfer, &[]);
    assert_eq!(away["phase"], "done", "{away:#}\n{}", a.log());
    std::thread::sleep(Duration::from_millis(300));
    let home = migrate(&b, &a_transfer, &[]);
    assert_eq!(
        home["phase"],
        "done",
        "{home:#}\nB:\n{}\nA:\n{}",
        b.log(),
        a.log()
    );

    let listed = a.cli(&["export", "ls", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&listed)).unwrap();
    let vm1 = &listed[0];
    assert!(vm1.get("forwarding").is_none(), "still forwarding: {vm1:#}");
    let received = a.state_dir.join("images").join("vm1.img");
    assert_eq!(vm1["path"].as_str(), received.to_str(), "{vm1:#}");
    // The tracker missed the writes made at B: it says so instead of being trusted.
    assert_eq!(vm1["trackers"][0]["lost"], true, "{vm1:#}");

    b.kill();
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let (mut nbd, ledger) = writer.join().expect("the guest saw no error");
    assert!(
        ledger.len() > 100,
        "the guest wrote {} blocks",
        ledger.len()
    );
    check_ledger(&mut nbd, &ledger);
    drop(nbd);

    assert!(a.stop(), "A stops cleanly\n{}", a.log());
    a.restart(
        &exports,
        &["--tcp", "--transfer", &a_transfer, "--cluster-key", key],
    );
    let mut nbd = NbdClient::connect_unix(&a.socket, "vm1").expect("connect after restart");
    check_ledger(&mut nbd, &ledger);
    let listed = a.cli(&["export", "ls", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&listed)).unwrap();
    assert_eq!(listed[0]["path"].as_str(), received.to_str(), "{listed:#}");
    assert!(listed[0].get("forwarding").is_none(), "{listed:#}");
}

// Goal: one hop at most. After A→B and B→C, A (which holds the guest's connection) forwards
// straight to C, so B can be killed once its job is done; A's journal keeps that across a
// restart. Method: a guest writing every 2 ms on one connection at A throughout; migrate
// A→B, then B→C; B's job is done only after A answered (holder "re-pointed"); A's listing
// forwards to C's NBD address; kill -9 B; the guest writes 1 s more; the ledger reads back
// through its own connection; A restarts and the ledger reads back through a new one.
#[test]
fn a_chain_of_moves_leaves_one_hop() {
    require("fio");
    let keys = common::scratch_dir();
    let key = write_key(keys.path());
    let key = key.to_str().unwrap();
    let a_dir = common::scratch_dir();
    let image = a_dir.path().join("vm1.img");
    sparse_image(&image, DISK_BYTES);
    prefill(&image, 16 * MIB);
    let [a_transfer, b_transfer, c_transfer] =
        [(); 3].map(|()| format!("127.0.0.1:{}", free_port()));
    let exports = vec![format!("vm1={},granularity=64K", image.display())];
    let mut a = agent(a_dir, &exports, key, &a_transfer);
    let mut b = agent(common::scratch_dir(), &[], key, &b_transfer);
    let c = agent(common::scratch_dir(), &[], key, &c_transfer);

    let stop = Arc::new(AtomicBool::new(false));
    let writer = guest(a.socket.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let first = migrate(&a, &b_transfer, &[]);
    assert_eq!(first["phase"], "done", "{first:#}\n{}", a.log());
    std::thread::sleep(Duration::from_millis(300));
    let second = migrate(&b, &c_transfer, &[]);
    assert_eq!(second["phase"], "done", "{second:#}\nB:\n{}", b.log());
    let told = second["holder"].as_str().unwrap_or_default();
    assert!(told.ends_with("re-pointed"), "{second:#}\nA:\n{}", a.log());

    let c_nbd = c.tcp.clone().expect("C serves NBD over TCP");
    assert_eq!(
        forwarding_to(&a).as_deref(),
        Some(c_nbd.as_str()),
        "{}",
        a.log()
    );

    b.kill();
    std::thread::sleep(Duration::from_millis(1000));
    stop.store(true, Ordering::Relaxed);
    let (mut nbd, ledger) = writer.join().expect("the guest saw no error");
    assert!(
        ledger.len() > 100,
        "the guest wrote {} blocks",
        ledger.len()
    );
    check_ledger(&mut nbd, &ledger);
    drop(nbd);

    assert!(a.stop(), "A stops cleanly\n{}", a.log());
    a.restart(
        &exports,
        &["--tcp", "--transfer", &a_transfer, "--cluster-key", key],
    );
    assert_eq!(
        forwarding_to(&a).as_deref(),
        Some(c_nbd.as_str()),
        "{}",
        a.log()
    );
    let mut nbd = NbdClient::connect_unix(&a.socket, "vm1").expect("connect after restart");
    check_ledger(&mut nbd, &ledger);

    // And home from the end of the chain: A holds the connection, so nothing is left to
    // re-point (the answer says so) and A serves locally.
    let home = migrate(&c, &a_transfer, &[]);
    assert_eq!(
        home["phase"],
        "done",
        "{home:#}
C:
{}
A:
{}",
        c.log(),
        a.log()
    );
    let told = home["holder"].as_str().unwrap_or_default();
    assert!(told.ends_with("not forwarding"), "{home:#}");
    assert_eq!(forwarding_to(&a), None, "{}", a.log());
    check_ledger(&mut nbd, &ledger);
}

/// The `forwarding.to` of vm1 in `agent`'s listing, if it forwards.
fn forwarding_to(agent: &AgentProc) -> Option<String> {
    let listed = agent.cli(&["export", "ls", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&listed)).unwrap();
    listed[0]["forwarding"]["to"].as_str().map(str::to_owned)
}

// Goal: a holder that is away when the disk moves on is told once it is back, even when
// the agent that must tell it restarted meanwhile (the telling is journaled, and resumes).
// Method: A→B; stop A; B→C switches over, and B's job stays running ("telling A"); stop B;
// start A (it forwards to B, which is down, and holds); start B: it tells A, which then
// forwards to C; a new guest connection at A writes and reads back through C.
#[test]
fn an_away_holder_is_told_when_it_is_back() {
    let keys = common::scratch_dir();
    let key = write_key(keys.path());
    let key = key.to_str().unwrap();
    let a_dir = common::scratch_dir();
    let image = a_dir.path().join("vm1.img");
    sparse_image(&image, DISK_BYTES);
    prefill(&image, 4 * MIB);
    let [a_transfer, b_transfer, c_transfer] =
        [(); 3].map(|()| format!("127.0.0.1:{}", free_port()));
    let exports = vec![format!("vm1={},granularity=64K", image.display())];
    let flags =
        |transfer: &str| ["--tcp", "--transfer", transfer, "--cluster-key", key].map(str::to_owned);
    let mut a = agent(a_dir, &exports, key, &a_transfer);
    let mut b = agent(common::scratch_dir(), &[], key, &b_transfer);
    let c = agent(common::scratch_dir(), &[], key, &c_transfer);
    let first = migrate(&a, &b_transfer, &[]);
    assert_eq!(first["phase"], "done", "{first:#}\n{}", a.log());
    assert!(a.stop(), "A stops cleanly\n{}", a.log());

    let started = migrate(&b, &c_transfer, &["--no-wait"]);
    let job = started["id"].to_string();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let telling = loop {
        let listed: serde_json::Value =
            serde_json::from_str(&stdout(&b.cli(&["jobs", &job, "--json"]))).unwrap();
        let status = listed[0].clone();
        let holder = status["holder"].as_str().unwrap_or_default().to_owned();
        if holder.starts_with("telling") || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(telling["phase"], "running", "{telling:#}\n{}", b.log());
    assert_eq!(telling["authoritative"], "destination", "{telling:#}");
    assert!(b.stop(), "B stops cleanly\n{}", b.log());

    a.restart(&exports, &flags(&a_transfer).each_ref().map(String::as_str));
    b.restart(&[], &flags(&b_transfer).each_ref().map(String::as_str));
    let c_nbd = c.tcp.clone().expect("C serves NBD over TCP");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while forwarding_to(&a).as_deref() != Some(c_nbd.as_str()) {
        assert!(
            std::time::Instant::now() < deadline,
            "A not re-pointed to C\nA:\n{}\nB:\n{}",
            a.log(),
            b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut nbd = NbdClient::connect_unix(&a.socket, "vm1").expect("connect at A");
    nbd.write_at(0, &pattern(0, 1))
        .expect("write through A to C");
    assert_eq!(nbd.read_at(0, BLOCK_BYTES as u32).unwrap(), pattern(0, 1));
    drop(b);
}

// Goal: `ferry export gc` removes the image a switchover left stale, and the forwarding
// export goes on without it, across a restart too. Method: A→B; at A `gc --dry-run` lists
// the stale image and keeps it; `gc` removes it; a guest at A writes and reads through B;
// A restarts (its export opens without an image and forwards) and the write reads back.
#[test]
fn gc_removes_stale_images_and_forwarding_goes_on() {
    let keys = common::scratch_dir();
    let key = write_key(keys.path());
    let key = key.to_str().unwrap();
    let a_dir = common::scratch_dir();
    let image = a_dir.path().join("vm1.img");
    sparse_image(&image, DISK_BYTES);
    prefill(&image, 4 * MIB);
    let [a_transfer, b_transfer] = [(); 2].map(|()| format!("127.0.0.1:{}", free_port()));
    let exports = vec![format!("vm1={},granularity=64K", image.display())];
    let mut a = agent(a_dir, &exports, key, &a_transfer);
    let b = agent(common::scratch_dir(), &[], key, &b_transfer);
    let moved = migrate(&a, &b_transfer, &[]);
    assert_eq!(moved["phase"], "done", "{moved:#}\n{}", a.log());
    let stale = common::stale_image(&image);
    let gc = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["export", "gc", "--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&stdout(&a.cli(&all))).unwrap()
    };
    let listed = gc(&["--dry-run"]);
    assert_eq!(listed[0]["path"].as_str(), stale.to_str(), "{listed:#}");
    assert_eq!(listed[0]["removed"], false, "{listed:#}");
    assert!(
        listed[0]["allocated_bytes"].as_u64().unwrap() >= 4 * MIB,
        "{listed:#}"
    );
    assert!(stale.exists());
    let removed = gc(&[]);
    assert_eq!(removed[0]["removed"], true, "{removed:#}");
    assert!(!stale.exists(), "{} still there", stale.display());
    assert_eq!(gc(&[]), serde_json::json!([]));

    let mut nbd = NbdClient::connect_unix(&a.socket, "vm1").expect("connect at A");
    nbd.write_at(8192, &pattern(8192, 7))
        .expect("write through A");
    drop(nbd);
    assert!(a.stop(), "A stops cleanly\n{}", a.log());
    a.restart(
        &exports,
        &["--tcp", "--transfer", &a_transfer, "--cluster-key", key],
    );
    assert_eq!(forwarding_to(&a), b.tcp.clone(), "{}", a.log());
    let mut nbd = NbdClient::connect_unix(&a.socket, "vm1").expect("connect after restart");
    assert_eq!(
        nbd.read_at(8192, BLOCK_BYTES as u32).unwrap(),
        pattern(8192, 7)
    );
}
