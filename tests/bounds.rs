//! Bounded resources before authentication (DESIGN invariant 6), against real agent
//! processes: connection caps and eviction, handshake and request deadlines, descriptor
//! exhaustion, bytes in flight, and a stalled writer that must not hold the write gate.
//!
//! Each test measures the agent from outside: `/proc/PID/status` (Threads, VmHWM) and
//! `/proc/PID/fd`, and real clients (nbdinfo, qemu-io, `ferry migrate`) that must still be
//! served.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pair::{migrate, pair_with, MIB};
use common::{proc_fd_count, proc_status_field, require, sparse_image, tls_creds, AgentProc};
use ferry::nbd::client::NbdClient;

/// Writes `[agent.limits]` (`body`) into a config file in `dir`.
fn limits_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("limits.toml");
    std::fs::write(&path, format!("[agent.limits]\n{body}\n")).unwrap();
    path
}

/// `timeout 30 nbdinfo --size URI` succeeds.
fn nbdinfo_ok(uri: &str) -> Result<(), String> {
    require("nbdinfo");
    let out = Command::new("timeout")
        .args(["30", "nbdinfo", "--size", uri])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nbdinfo {uri}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// One 4 KiB write and read back through qemu-io on the unix socket; how long it took.
fn qemu_io_write(agent: &AgentProc, offset: u64) -> Duration {
    require("qemu-io");
    let started = Instant::now();
    let out = Command::new("timeout")
        .args(["30", "qemu-io", "--image-opts"])
        .arg(agent.qemu_opts("vm1"))
        .arg("-c")
        .arg(format!("write -P 0x5a {offset} 4k"))
        .arg("-c")
        .arg(format!("read -P 0x5a {offset} 4k"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("Pattern verification failed"),
        "qemu-io: {text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    started.elapsed()
}

// Goal: 2000 idle connections on the NBD TCP listener cost a bounded number of threads and
// descriptors (the handshaking cap), and a real client is still served at once. Method:
// open 2000 TCP connections that never speak, read the agent's Threads and fd count, then
// nbdinfo over TLS on the same listener. Today's main: one thread and two fds per idle
// connection (2013 threads, 4013 fds).
#[test]
fn idle_connections_at_the_handshake_cap_cost_bounded_threads() {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 16 * MIB);
    let mut agent = AgentProc::start(&[format!("vm1={}", image.display())], &["--tcp"]);
    let pid = agent.pid();
    let tcp = agent.tcp.clone().unwrap();
    let (threads_before, fds_before) = (proc_status_field(pid, "Threads"), proc_fd_count(pid));
    let mut idle = Vec::new();
    for _ in 0..2000 {
        let addr = tcp.parse().unwrap();
        if let Ok(stream) = TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            idle.push(stream);
        }
    }
    assert!(idle.len() >= 1900, "only {} connected", idle.len());
    std::thread::sleep(Duration::from_millis(1500));
    let (threads_idle, fds_idle) = (proc_status_field(pid, "Threads"), proc_fd_count(pid));
    eprintln!(
        "{} idle connections: threads {threads_before} -> {threads_idle}, \
         fds {fds_before} -> {fds_idle}",
        idle.len()
    );
    let handshaking_max = 64;
    assert!(
        threads_idle <= threads_before + handshaking_max + 8,
        "threads {threads_before} -> {threads_idle}"
    );
    assert!(
        fds_idle <= fds_before + 2 * handshaking_max as usize + 16,
        "fds {fds_before} -> {fds_idle}"
    );
    let uri = format!(
        "nbds://{tcp}/vm1?tls-certificates={}",
        tls_creds().display()
    );
    let started = Instant::now();
    nbdinfo_ok(&uri).unwrap_or_else(|err| panic!("{err}\n{}", agent.log()));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(agent.is_running());
    drop(idle);
}

// Goal: a connection that does not finish its handshake in time is closed, even when it
// trickles bytes to look alive. Method: the default deadline (10 s); read the greeting,
// send the client flags, then one byte of an option every 300 ms; the agent must close it
// by 13 s. Today's main: no deadline, the connection lives as long as it trickles.
#[test]
fn handshake_deadline_closes_a_trickling_connection() {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 16 * MIB);
    let agent = AgentProc::start(&[format!("vm1={}", image.display())], &[]);
    let mut conn = UnixStream::connect(&agent.socket).unwrap();
    let started = Instant::now();
    let mut greeting = [0u8; 18];
    conn.read_exact(&mut greeting).unwrap();
    // Client flags: FIXED_NEWSTYLE | NO_ZEROES.
    conn.write_all(&3u32.to_be_bytes()).unwrap();
    conn.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let option = b"IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x00";
    let mut closed = None;
    for byte in option.iter().cycle().take(60) {
        if conn.write_all(&[*byte]).is_err() {
            closed = Some(started.elapsed());
            break;
        }
        let mut buf = [0u8; 64];
        match conn.read(&mut buf) {
            Ok(0) => {
                closed = Some(started.elapsed());
                break;
            }
            // Our own 300 ms wait: still open.
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => {
                closed = Some(started.elapsed());
                break;
            }
            Ok(_) => {}
        }
    }
    let closed = closed.expect("still open after 18 s of trickling");
    eprintln!("trickling handshake closed after {closed:?}");
    assert!(closed >= Duration::from_secs(9), "{closed:?}");
    assert!(closed < Duration::from_secs(13), "{closed:?}");
    assert!(
        agent.log().contains("no handshake within"),
        "{}",
        agent.log()
    );
}

/// A peer that connects to `addr` and sends one byte every `every`, reconnecting `pause`
/// after the agent closes it, until `stop`.
fn trickler(addr: String, every: Duration, pause: Duration, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut stream) = TcpStream::connect(&addr) else {
            std::thread::sleep(pause);
            continue;
        };
        // The first bytes of a frame header: the agent waits for the other 20.
        for byte in b"FRYB".iter().cycle() {
            if stop.load(Ordering::Relaxed) || stream.write_all(&[*byte]).is_err() {
                break;
            }
            std::thread::sleep(every);
        }
        std::thread::sleep(pause);
    }
}

// Goal: peers trickling bytes at the block-stream listener do not lock a real source out.
// Method: 64 peers send one byte every 2 s (reconnecting 1 s after being closed); then a
// real migration runs to its switchover. Today's main: the 64 slots stay full and the
// migration is refused.
#[test]
fn trickling_stream_peers_do_not_block_a_migration() {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 16 * MIB);
    let pair = pair_with(
        vec![format!("vm1={},granularity=64K", image.display())],
        &[],
    );
    let stop = Arc::new(AtomicBool::new(false));
    let tricklers: Vec<_> = (0..64)
        .map(|_| {
            let (addr, stop) = (pair.destination_transfer.clone(), stop.clone());
            std::thread::spawn(move || {
                trickler(addr, Duration::from_secs(2), Duration::from_secs(1), stop)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    let status = migrate(&pair.source, &pair.destination_transfer, &[]);
    stop.store(true, Ordering::Relaxed);
    assert_eq!(
        status["phase"],
        "done",
        "{status:#}\nsource:\n{}\ndestination:\n{}",
        pair.source.log(),
        pair.destination.log()
    );
    assert_eq!(status["authoritative"], "destination");
    for trickler in tricklers {
        trickler.join().unwrap();
    }
}

// Goal: peers holding descriptors mid-handshake while the agent is out of descriptors
// (EMFILE at accept) do not abort it and do not keep a real client out. Method: lower the
// agent's RLIMIT_NOFILE (prlimit) to 24 above what it uses, open 100 silent connections,
// then a real client writes and reads, served well before the handshake deadline (10 s)
// could free anything; the agent lives and logs the failed accepts. Today's main: the silent peers hold
// every descriptor and the client is never answered.
#[test]
fn descriptor_exhaustion_does_not_lock_out_or_abort() {
    require("prlimit");
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 16 * MIB);
    let mut agent = AgentProc::start(&[format!("vm1={}", image.display())], &[]);
    let pid = agent.pid();
    let limit = proc_fd_count(pid) + 24;
    common::run_ok(
        Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--nofile={limit}:{limit}")),
    );
    let silent: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&agent.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(agent.is_running(), "{}", agent.log());
    let took = qemu_io_write(&agent, 0);
    eprintln!(
        "served while out of descriptors in {took:?} (limit {limit}, agent fds {})",
        proc_fd_count(pid)
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(agent.log().contains("accept failed"), "{}", agent.log());
    drop(silent);
    std::thread::sleep(Duration::from_millis(300));
    qemu_io_write(&agent, 8192);
    assert!(agent.is_running());
}

// Goal: a client that queues large unaligned READs and never reads the replies makes the
// agent hold at most its byte budget. Method: budgets 64 MiB per connection, 128 MiB per
// agent; 128 READs of 32 MiB at offset 1 (each needs a 64 MiB buffer) on each of two
// connections, replies never read; the agent's peak RSS (VmHWM) must stay near the budget.
// Today's main: 7.4 GiB for one connection.
#[test]
fn unread_large_reads_stay_within_the_byte_budget() {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 64 * MIB);
    let mut agent = AgentProc::start(&[format!("vm1={}", image.display())], &[]);
    let pid = agent.pid();
    let before = proc_status_field(pid, "VmHWM");
    let mut clients = Vec::new();
    for _ in 0..2 {
        let mut client = NbdClient::connect_unix(&agent.socket, "vm1").unwrap();
        for _ in 0..128 {
            client.send_read(1, 32 << 20).unwrap();
        }
        clients.push(client);
    }
    std::thread::sleep(Duration::from_secs(4));
    let peak_kib = proc_status_field(pid, "VmHWM");
    eprintln!(
        "unread READs: agent VmHWM {} MiB -> {} MiB (2 connections x 64 MiB budget)",
        before / 1024,
        peak_kib / 1024
    );
    assert!(agent.is_running());
    assert!(
        peak_kib < before + 200 * 1024,
        "peak RSS {} MiB",
        peak_kib / 1024
    );
    drop(clients);
    qemu_io_write(&agent, 0);
}

// Goal: a client that sends a WRITE header and part of its payload, then stalls, holds no
// write gate: other clients' writes are not delayed and a migration's switchover drains.
// Method: raw WRITE of 1 MiB with 1000 payload bytes, then silence; qemu-io writes on
// another connection; `ferry migrate` runs to done. Today's main: the stalled WRITE holds
// the gate, the switchover "did not drain within 5s" and fails.
#[test]
fn stalled_writer_does_not_block_a_drain() {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 16 * MIB);
    let pair = pair_with(
        vec![format!("vm1={},granularity=64K", image.display())],
        &[],
    );
    let client = NbdClient::connect_unix(&pair.source.socket, "vm1").unwrap();
    let mut conn = client.into_conn();
    let mut header = Vec::new();
    header.extend_from_slice(&0x2560_9513u32.to_be_bytes()); // request magic
    header.extend_from_slice(&0u16.to_be_bytes()); // flags
    header.extend_from_slice(&1u16.to_be_bytes()); // WRITE
    header.extend_from_slice(&7u64.to_be_bytes()); // cookie
    header.extend_from_slice(&(4 * MIB).to_be_bytes()); // offset
    header.extend_from_slice(&(1u32 << 20).to_be_bytes()); // length
    header.extend_from_slice(&[0xab; 1000]);
    conn.write_all(&header).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let took = qemu_io_write(&pair.source, 0);
    assert!(
        took < Duration::from_secs(3),
        "other writes delayed {took:?}"
    );
    let started = Instant::now();
    let status = migrate(&pair.source, &pair.destination_transfer, &[]);
    assert_eq!(
        status["phase"],
        "done",
        "{status:#}\nsource:\n{}",
        pair.source.log()
    );
    eprintln!("migration with a stalled writer: {:?}", started.elapsed());
    assert!(!pair.source.log().contains("did not drain"));
    drop(conn);
}

// Goal: `[agent.limits]` reaches the listeners. Method: a config with 4 handshaking
// connections and a 1 s handshake deadline; 10 silent connections cost at most 4 threads,
// and every one of them is closed within 3 s.
#[test]
fn configured_limits_are_applied() {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 16 * MIB);
    let config = limits_config(
        dir.path(),
        "nbd_handshaking_max = 4\nnbd_handshake_timeout_ms = 1000",
    );
    let config = config.to_str().unwrap().to_string();
    let agent = AgentProc::start(
        &[format!("vm1={}", image.display())],
        &["--config", &config],
    );
    let pid = agent.pid();
    let threads_before = proc_status_field(pid, "Threads");
    let mut silent: Vec<UnixStream> = (0..10)
        .map(|_| UnixStream::connect(&agent.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let threads_silent = proc_status_field(pid, "Threads");
    assert!(
        threads_silent <= threads_before + 4,
        "threads {threads_before} -> {threads_silent}"
    );
    let started = Instant::now();
    for conn in &mut silent {
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 64];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {} // the greeting
                Err(err) if err.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(err) => panic!("not closed: {err}"),
            }
        }
    }
    assert!(started.elapsed() < Duration::from_secs(3));
    nbdinfo_ok(&agent.uri("vm1")).unwrap();
}

// Goal: a request whose header arrived but whose payload stalls is closed at the request
// deadline, while a connection idle between requests is not. Method: request deadline 1 s;
// one connection sends a WRITE header and 100 payload bytes, another sends nothing after
// its handshake; after 2.5 s the first is closed, the second still serves a READ.
#[test]
fn request_deadline_closes_a_stalled_request_only() {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 16 * MIB);
    let config = limits_config(dir.path(), "request_timeout_ms = 1000");
    let config = config.to_str().unwrap().to_string();
    let agent = AgentProc::start(
        &[format!("vm1={}", image.display())],
        &["--config", &config],
    );
    let mut idle = NbdClient::connect_unix(&agent.socket, "vm1").unwrap();
    let mut stalled = NbdClient::connect_unix(&agent.socket, "vm1")
        .unwrap()
        .into_conn();
    let mut request = Vec::new();
    request.extend_from_slice(&0x2560_9513u32.to_be_bytes()); // request magic
    request.extend_from_slice(&0u16.to_be_bytes()); // flags
    request.extend_from_slice(&1u16.to_be_bytes()); // WRITE
    request.extend_from_slice(&9u64.to_be_bytes()); // cookie
    request.extend_from_slice(&0u64.to_be_bytes()); // offset
    request.extend_from_slice(&65536u32.to_be_bytes()); // length
    request.extend_from_slice(&[0xcd; 100]);
    stalled.write_all(&request).unwrap();
    let started = Instant::now();
    stalled
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 64];
    let end = stalled.read(&mut buf);
    let closed = started.elapsed();
    assert!(
        matches!(end, Ok(0))
            || end
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "{end:?}"
    );
    eprintln!("stalled request closed after {closed:?}");
    assert!(closed < Duration::from_millis(2500), "{closed:?}");
    assert!(closed >= Duration::from_millis(900), "{closed:?}");
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(idle.read_at(0, 4096).unwrap(), vec![0u8; 4096]);
    assert!(
        agent.log().contains("request not received within"),
        "{}",
        agent.log()
    );
}
