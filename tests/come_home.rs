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

/// Agent A serving vm1 from a new image, and the cluster key for more agents.
struct Site {
    _keys: tempfile::TempDir,
    key: String,
    image: std::path::PathBuf,
    exports: Vec<String>,
    a: AgentProc,
    a_transfer: String,
}

impl Site {
    /// A with `prefill_bytes` of data in vm1 (`options` appended to its export spec).
    fn new(prefill_bytes: u64, options: &str) -> Site {
        let keys = common::scratch_dir();
        let key = write_key(keys.path()).to_str().unwrap().to_owned();
        let a_dir = common::scratch_dir();
        let image = a_dir.path().join("vm1.img");
        sparse_image(&image, DISK_BYTES);
        prefill(&image, prefill_bytes);
        let exports = vec![format!("vm1={},granularity=64K{options}", image.display())];
        let a_transfer = format!("127.0.0.1:{}", free_port());
        let a = AgentProc::start_in(a_dir, &exports, &flags(&a_transfer, &key));
        Site {
            _keys: keys,
            key,
            image,
            exports,
            a,
            a_transfer,
        }
    }

    /// Another agent serving nothing yet, and its block-stream address.
    fn agent(&self) -> (AgentProc, String) {
        let transfer = format!("127.0.0.1:{}", free_port());
        let agent = AgentProc::start(&[], &flags(&transfer, &self.key));
        (agent, transfer)
    }

    /// Starts `agent` (stopped or killed, serving nothing of its own) again, same state and
    /// addresses.
    fn restart(&self, agent: &mut AgentProc, transfer: &str) {
        agent.restart(&[], &flags(transfer, &self.key));
    }

    /// Stops A cleanly and starts it again.
    fn restart_a(&mut self) {
        assert!(self.a.stop(), "A stops cleanly\n{}", self.a.log());
        self.a
            .restart(&self.exports, &flags(&self.a_transfer, &self.key));
    }
}

fn flags<'a>(transfer: &'a str, key: &'a str) -> [&'a str; 5] {
    ["--tcp", "--transfer", transfer, "--cluster-key", key]
}

/// Kills `b`, lets the guest write 1 s more, stops it; every write it saw acknowledged reads
/// back through its own connection, which is returned.
fn kill_then_check(
    b: &mut AgentProc,
    stop: &AtomicBool,
    writer: JoinHandle<(NbdClient, Ledger)>,
) -> (NbdClient, Ledger) {
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
    (nbd, ledger)
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
    let mut site = Site::new(16 * MIB, ",tracker=backup");
    let (mut b, b_transfer) = site.agent();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = guest(site.a.socket.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let away = migrate(&site.a, &b_transfer, &[]);
    assert_eq!(away["phase"], "done", "{away:#}\n{}", site.a.log());
    std::thread::sleep(Duration::from_millis(300));
    let home = migrate(&b, &site.a_transfer, &[]);
    let logs = format!("B:\n{}\nA:\n{}", b.log(), site.a.log());
    assert_eq!(home["phase"], "done", "{home:#}\n{logs}");

    let vm1 = listing(&site.a);
    assert!(vm1.get("forwarding").is_none(), "still forwarding: {vm1:#}");
    let received = site.a.state_dir.join("images").join("vm1.img");
    assert_eq!(vm1["path"].as_str(), received.to_str(), "{vm1:#}");
    // The tracker missed the writes made at B: it says so instead of being trusted.
    assert_eq!(vm1["trackers"][0]["lost"], true, "{vm1:#}");

    let (nbd, ledger) = kill_then_check(&mut b, &stop, writer);
    drop(nbd);
    site.restart_a();
    let mut nbd = NbdClient::connect_unix(&site.a.socket, "vm1").expect("connect after restart");
    check_ledger(&mut nbd, &ledger);
    let vm1 = listing(&site.a);
    assert_eq!(vm1["path"].as_str(), received.to_str(), "{vm1:#}");
    assert!(vm1.get("forwarding").is_none(), "{vm1:#}");
}

/// vm1 in `agent`'s `ferry export ls --json`.
fn listing(agent: &AgentProc) -> serde_json::Value {
    let listed = agent.cli(&["export", "ls", "--json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&listed)).unwrap();
    listed[0].clone()
}

/// The `forwarding.to` of vm1 in `agent`'s listing, if it forwards.
fn forwarding_to(agent: &AgentProc) -> Option<String> {
    listing(agent)["forwarding"]["to"]
        .as_str()
        .map(str::to_owned)
}

// Goal: one hop at most. After A→B and B→C, A (which holds the guest's connection) forwards
// straight to C, so B can be killed once its job is done; A's journal keeps that across a
// restart; the disk can come home from the chain's end. Method: a guest writing every 2 ms
// on one connection at A throughout; migrate A→B, then B→C; B's job is done only after A
// answered (holder "re-pointed"); A's listing forwards to C's NBD address; kill -9 B; the
// guest writes 1 s more; the ledger reads back through its own connection; A restarts and
// the ledger reads back through a new one; then C→A: the holder's answer is "not
// forwarding", A serves locally, the ledger reads back.
#[test]
fn a_chain_of_moves_leaves_one_hop() {
    require("fio");
    let mut site = Site::new(16 * MIB, "");
    let (mut b, b_transfer) = site.agent();
    let (c, c_transfer) = site.agent();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = guest(site.a.socket.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    let first = migrate(&site.a, &b_transfer, &[]);
    assert_eq!(first["phase"], "done", "{first:#}\n{}", site.a.log());
    std::thread::sleep(Duration::from_millis(300));
    let second = migrate(&b, &c_transfer, &[]);
    assert_eq!(second["phase"], "done", "{second:#}\nB:\n{}", b.log());
    let told = second["holder"].as_str().unwrap_or_default();
    assert!(
        told.ends_with("re-pointed"),
        "{second:#}\nA:\n{}",
        site.a.log()
    );
    let c_nbd = c.tcp.clone();
    assert_eq!(forwarding_to(&site.a), c_nbd, "{}", site.a.log());

    let (nbd, ledger) = kill_then_check(&mut b, &stop, writer);
    drop(nbd);
    site.restart_a();
    assert_eq!(forwarding_to(&site.a), c_nbd, "{}", site.a.log());
    let mut nbd = NbdClient::connect_unix(&site.a.socket, "vm1").expect("connect after restart");
    check_ledger(&mut nbd, &ledger);

    // And home from the end of the chain: A holds the connection, so nothing is left to
    // re-point (the answer says so) and A serves locally.
    let home = migrate(&c, &site.a_transfer, &[]);
    let logs = format!("C:\n{}\nA:\n{}", c.log(), site.a.log());
    assert_eq!(home["phase"], "done", "{home:#}\n{logs}");
    let told = home["holder"].as_str().unwrap_or_default();
    assert!(told.ends_with("not forwarding"), "{home:#}");
    assert_eq!(forwarding_to(&site.a), None, "{}", site.a.log());
    check_ledger(&mut nbd, &ledger);
}

// Goal: a holder that is away when the disk moves on is told once it is back, even when
// the agent that must tell it restarted meanwhile (the telling is journaled, and resumes).
// Method: A→B; stop A; B→C switches over, and B's job stays running ("telling A"); stop B;
// start A (it forwards to B, which is down, and holds); start B: it tells A, which then
// forwards to C; a new guest connection at A writes and reads back through C.
#[test]
fn an_away_holder_is_told_when_it_is_back() {
    let mut site = Site::new(4 * MIB, "");
    let (mut b, b_transfer) = site.agent();
    let (c, c_transfer) = site.agent();
    let first = migrate(&site.a, &b_transfer, &[]);
    assert_eq!(first["phase"], "done", "{first:#}\n{}", site.a.log());
    assert!(site.a.stop(), "A stops cleanly\n{}", site.a.log());

    let started = migrate(&b, &c_transfer, &["--no-wait"]);
    let job = started["id"].to_string();
    let telling = wait_until(|| {
        let listed: serde_json::Value =
            serde_json::from_str(&stdout(&b.cli(&["jobs", &job, "--json"]))).unwrap();
        let status = listed[0].clone();
        let holder = status["holder"].as_str().unwrap_or_default();
        holder.starts_with("telling").then_some(status)
    });
    let telling = telling.unwrap_or_else(|| panic!("B never said telling\n{}", b.log()));
    assert_eq!(telling["phase"], "running", "{telling:#}\n{}", b.log());
    assert_eq!(telling["authoritative"], "destination", "{telling:#}");
    assert!(b.stop(), "B stops cleanly\n{}", b.log());

    site.a
        .restart(&site.exports, &flags(&site.a_transfer, &site.key));
    site.restart(&mut b, &b_transfer);
    let repointed = wait_until(|| (forwarding_to(&site.a) == c.tcp).then_some(()));
    let logs = format!("A:\n{}\nB:\n{}", site.a.log(), b.log());
    assert!(repointed.is_some(), "A not re-pointed to C\n{logs}");
    let mut nbd = NbdClient::connect_unix(&site.a.socket, "vm1").expect("connect at A");
    nbd.write_at(0, &pattern(0, 1))
        .expect("write through A to C");
    assert_eq!(nbd.read_at(0, BLOCK_BYTES as u32).unwrap(), pattern(0, 1));
}

/// Polls `probe` every 100 ms for up to 30 s; its first answer.
fn wait_until<T>(mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(answer) = probe() {
            return Some(answer);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

// Goal: `ferry export gc` removes the image a switchover left stale, and the forwarding
// export goes on without it, across a restart too. Method: A→B; at A `gc --dry-run` lists
// the stale image and keeps it; `gc` removes it; a guest at A writes and reads through B;
// A restarts (its export opens without an image and forwards) and the write reads back.
#[test]
fn gc_removes_stale_images_and_forwarding_goes_on() {
    let mut site = Site::new(4 * MIB, "");
    let (b, b_transfer) = site.agent();
    let moved = migrate(&site.a, &b_transfer, &[]);
    assert_eq!(moved["phase"], "done", "{moved:#}\n{}", site.a.log());
    let stale = common::stale_image(&site.image);
    let gc = |a: &AgentProc, args: &[&str]| -> serde_json::Value {
        let mut all = vec!["export", "gc", "--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&stdout(&a.cli(&all))).unwrap()
    };
    let listed = gc(&site.a, &["--dry-run"]);
    assert_eq!(listed[0]["path"].as_str(), stale.to_str(), "{listed:#}");
    assert_eq!(listed[0]["removed"], false, "{listed:#}");
    let allocated = listed[0]["allocated_bytes"].as_u64().unwrap();
    assert!(allocated >= 4 * MIB, "{listed:#}");
    assert!(stale.exists());
    let removed = gc(&site.a, &[]);
    assert_eq!(removed[0]["removed"], true, "{removed:#}");
    assert!(!stale.exists(), "{} still there", stale.display());
    assert_eq!(gc(&site.a, &[]), serde_json::json!([]));

    let mut nbd = NbdClient::connect_unix(&site.a.socket, "vm1").expect("connect at A");
    nbd.write_at(8192, &pattern(8192, 7))
        .expect("write through A");
    drop(nbd);
    site.restart_a();
    assert_eq!(forwarding_to(&site.a), b.tcp, "{}", site.a.log());
    let mut nbd = NbdClient::connect_unix(&site.a.socket, "vm1").expect("connect after restart");
    let read = nbd.read_at(8192, BLOCK_BYTES as u32).unwrap();
    assert_eq!(read, pattern(8192, 7));
}
