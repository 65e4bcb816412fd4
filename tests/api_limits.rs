//! The control API under hostile local peers, on a real agent process: nothing sent before
//! authentication makes the agent abort, grow without bound, leak, or stop answering the
//! token holder; and `/metrics` needs the token unless served on its own address.
//!
//! Each test fails on the tiny_http server this replaced: a header line read whole into
//! memory, workers blocked on bodies that never come, requests abandoned with their
//! descriptor and thread, a thread per connection (a panic once the thread limit is hit),
//! an accept loop that ends for good when descriptors run out, and an open `/metrics`.
//!
//! `FERRY_AGENT_BIN=target/release/ferry` runs them against the release build (`panic =
//! "abort"`, as deployed); any binary of another revision can be compared the same way.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, proc_fd_count, proc_status_field, run_ok, scratch_dir, AgentProc};

const MIB: usize = 1 << 20;
/// What "answers promptly" means here (the machine is shared with other builds).
const PROMPT: Duration = Duration::from_secs(2);

fn token(agent: &AgentProc) -> String {
    ferry::api::token::read(&agent.state_dir.join("api.token")).expect("token")
}

/// One request on a fresh connection (`Connection: close`); the status and body, or why not.
fn call(api: &str, method: &str, path: &str, token: Option<&str>) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(api)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
    stream.write_all(head.as_bytes())?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer)?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP answer: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// Asserts an authenticated `GET /v1/exports` is answered 200 within [`PROMPT`].
fn served_promptly(api: &str, token: &str, what: &str) -> Duration {
    let started = Instant::now();
    let (status, body) = call(api, "GET", "/v1/exports", Some(token))
        .unwrap_or_else(|err| panic!("{what}: not served: {err}"));
    let took = started.elapsed();
    assert_eq!(status, 200, "{what}: {body}");
    assert!(took < PROMPT, "{what}: took {took:?}");
    took
}

/// Whether the peer closed `stream` (EOF or reset) within `wait`, reading past any answer.
fn closed_within(stream: &mut TcpStream, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut scratch = [0u8; 4096];
    while Instant::now() < deadline {
        stream
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        match stream.read(&mut scratch) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) if err.kind() == io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

/// Running, and no thread of it panicked (a debug build unwinds where the release build,
/// `panic = "abort"`, would take the whole agent down).
fn alive(agent: &mut AgentProc) -> bool {
    let running = agent.is_running();
    let log = agent.log();
    assert!(!log.contains("panicked"), "a thread panicked:\n{log}");
    running
}

// Goal: a 256 MiB header line without CRLF costs the agent at most its head buffer, the
// connection is closed, and the API still answers. Method: warm up, note VmHWM/VmRSS, send
// the line in 1 MiB writes until the agent cuts the connection, compare, call the API.
#[test]
fn huge_header_line_is_cut_off_without_growth() {
    let mut agent = AgentProc::start(&[], &[]);
    let (pid, token) = (agent.pid(), token(&agent));
    served_promptly(&agent.api, &token, "warm-up");
    let _ = call(&agent.api, "GET", "/v1/exports", None);
    let (hwm_before, rss_before) = (
        proc_status_field(pid, "VmHWM"),
        proc_status_field(pid, "VmRSS"),
    );
    let mut stream = TcpStream::connect(&agent.api).expect("connect");
    stream
        .write_all(b"GET /v1/exports HTTP/1.1\r\nX-Long: ")
        .expect("head");
    let chunk = vec![b'a'; MIB];
    let mut sent = 0;
    let cut = loop {
        if sent >= 256 * MIB {
            break false;
        }
        match stream.write(&chunk) {
            Ok(n) => sent += n,
            Err(_) => break true,
        }
    };
    assert!(cut, "the agent read all {} MiB", sent / MIB);
    assert!(closed_within(&mut stream, PROMPT), "connection left open");
    let (hwm_after, rss_after) = (
        proc_status_field(pid, "VmHWM"),
        proc_status_field(pid, "VmRSS"),
    );
    eprintln!(
        "256 MiB header line: cut after {} KiB sent; VmRSS {rss_before} -> {rss_after} kB, \
         VmHWM {hwm_before} -> {hwm_after} kB",
        sent / 1024
    );
    assert!(
        hwm_after < hwm_before + 1024,
        "peak grew by more than 1 MiB"
    );
    assert!(rss_after < rss_before + 1024, "RSS grew by more than 1 MiB");
    served_promptly(&agent.api, &token, "after the long line");
    assert!(alive(&mut agent));
}

// Goal: requests that declare a body and never send it do not stall the API for the token
// holder. Method: 8 unauthenticated POSTs declaring 1000 bytes, kept open; then /metrics and
// GET /v1/exports with the token, timed; the 8 are answered 401 and closed, unread.
#[test]
fn unsent_bodies_do_not_stall_the_api() {
    let mut agent = AgentProc::start(&[], &[]);
    let token = token(&agent);
    let mut stalls: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut stream = TcpStream::connect(&agent.api).expect("connect");
            let head = "POST /v1/exports HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n";
            stream.write_all(head.as_bytes()).expect("send");
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let (status, _) = call(&agent.api, "GET", "/metrics", Some(&token)).expect("metrics");
    assert_eq!(status, 200);
    assert!(started.elapsed() < PROMPT, "{:?}", started.elapsed());
    let took = served_promptly(&agent.api, &token, "with 8 unsent bodies");
    eprintln!("8 unsent bodies: /metrics and /v1/exports answered in {took:?}");
    for stream in &mut stalls {
        stream.set_read_timeout(Some(PROMPT)).expect("timeout");
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).expect("an answer");
        assert_eq!(
            &answer,
            b"HTTP/1.1 401",
            "{}",
            String::from_utf8_lossy(&answer)
        );
        assert!(closed_within(stream, PROMPT), "body awaited");
    }
    assert!(alive(&mut agent));
}

// Goal: requests abandoned after declaring a large body (unauthenticated, and with the token
// for an over-limit body) leak no descriptor and no thread. Method: count /proc/PID/fd and
// Threads, send 40 such requests and drop each, wait for the counts to come back.
#[test]
fn abandoned_bodies_leak_no_descriptor_or_thread() {
    let mut agent = AgentProc::start(&[], &[]);
    let (pid, token) = (agent.pid(), token(&agent));
    served_promptly(&agent.api, &token, "warm-up");
    let (fds_before, threads_before) = (proc_fd_count(pid), proc_status_field(pid, "Threads"));
    for round in 0..40 {
        let mut stream = TcpStream::connect(&agent.api).expect("connect");
        let length = if round % 2 == 0 { 1u64 << 40 } else { 4 << 20 };
        let auth = if round % 4 == 1 {
            format!("Authorization: Bearer {token}\r\n")
        } else {
            String::new()
        };
        let head = format!("POST /v1/exports HTTP/1.1\r\n{auth}Content-Length: {length}\r\n\r\n{{");
        stream.write_all(head.as_bytes()).expect("send");
        stream.write_all(&[b' '; 1000]).expect("some body");
    }
    // Until the agent has taken them from the backlog (counting earlier proves nothing).
    std::thread::sleep(Duration::from_secs(1));
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut fds, mut threads) = (usize::MAX, u64::MAX);
    while Instant::now() < deadline {
        (fds, threads) = (proc_fd_count(pid), proc_status_field(pid, "Threads"));
        if fds <= fds_before && threads <= threads_before {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "40 abandoned bodies: fds {fds_before} -> {fds}, threads {threads_before} -> {threads}"
    );
    assert!(
        fds <= fds_before,
        "descriptors leaked: {fds_before} -> {fds}"
    );
    assert_eq!(threads, threads_before, "threads leaked");
    served_promptly(&agent.api, &token, "after the abandoned bodies");
    assert!(alive(&mut agent));
}

// Goal: at most 64 API connections are held; with more idle ones, the oldest is evicted and
// the token holder is served. Method: open 150 idle connections, count the agent's fds,
// call the API, check that the first connection was closed.
#[test]
fn idle_connections_are_capped_oldest_evicted() {
    let mut agent = AgentProc::start(&[], &[]);
    let (pid, token) = (agent.pid(), token(&agent));
    served_promptly(&agent.api, &token, "warm-up");
    let fds_before = proc_fd_count(pid);
    let addr = agent.api.parse().expect("address");
    let mut idle = Vec::new();
    for _ in 0..150 {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(stream) => idle.push(stream),
            Err(err) => panic!("connect: {err}"),
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    let fds = proc_fd_count(pid);
    eprintln!("150 idle connections: agent fds {fds_before} -> {fds}");
    assert!(
        fds <= fds_before + 64,
        "more than 64 held: {fds_before} -> {fds}"
    );
    let took = served_promptly(&agent.api, &token, "at the connection cap");
    eprintln!("at the cap, served in {took:?}");
    assert!(closed_within(&mut idle[0], PROMPT), "oldest idle kept");
    assert!(alive(&mut agent));
}

// Goal: when the agent runs out of descriptors it neither aborts nor stops listening, and
// serves again soon after descriptors free up. Method: lower RLIMIT_NOFILE (prlimit) to
// a few above what it holds, flood 60 idle connections, close them, time the next call.
#[test]
fn out_of_descriptors_backs_off_and_serves_again() {
    let mut agent = AgentProc::start(&[], &[]);
    let (pid, token) = (agent.pid(), token(&agent));
    served_promptly(&agent.api, &token, "warm-up");
    let limit = proc_fd_count(pid) + 6;
    run_ok(
        Command::new("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--nofile={limit}:")),
    );
    let flood: Vec<TcpStream> = (0..60)
        .filter_map(|_| TcpStream::connect(&agent.api).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let held = proc_fd_count(pid);
    let log = agent.log();
    assert!(
        log.contains("cannot accept a connection"),
        "limit not reached:\n{log}"
    );
    // Even now the token holder gets through: each failed accept gives up the oldest idle
    // connection. Not asserted (a matter of backlog order), only reported.
    let during = call(&agent.api, "GET", "/v1/exports", Some(&token)).map(|(status, _)| status);
    drop(flood);
    let freed = Instant::now();
    let served = loop {
        if let Ok((200, _)) = call(&agent.api, "GET", "/v1/exports", Some(&token)) {
            break freed.elapsed();
        }
        assert!(
            freed.elapsed() < Duration::from_secs(10),
            "not serving again"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    eprintln!(
        "RLIMIT_NOFILE {limit}: {held} fds held in the flood, a call then: {during:?}; \
         served {served:?} after the fds were freed"
    );
    assert!(served < PROMPT, "{served:?}");
    assert!(alive(&mut agent), "agent exited:\n{}", agent.log());
}

/// The agent as `nobody` (no CAP_SYS_RESOURCE, so RLIMIT_NPROC binds), in a directory it
/// owns; killed on drop.
struct NobodyAgent {
    child: Child,
    api: String,
    dir: tempfile::TempDir,
}

impl Drop for NobodyAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_as_nobody() -> NobodyAgent {
    let dir = scratch_dir();
    run_ok(Command::new("chown").arg("nobody:nogroup").arg(dir.path()));
    let api = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(dir.path().join("agent.log")).expect("log");
    let child = Command::new("setpriv")
        .args([
            "--reuid",
            "nobody",
            "--regid",
            "nogroup",
            "--clear-groups",
            "--",
        ])
        .arg(common::agent_bin())
        .arg("agent")
        .arg("--socket")
        .arg(dir.path().join("nbd.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--api", &api, "--transfer"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdout(Stdio::null())
        .stderr(log)
        .env("RUST_LOG", "info")
        .spawn()
        .expect("setpriv");
    let mut agent = NobodyAgent { child, api, dir };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&agent.api).is_err() {
        let log = std::fs::read_to_string(agent.dir.path().join("agent.log")).unwrap_or_default();
        assert!(
            agent.child.try_wait().expect("wait").is_none(),
            "exited:\n{log}"
        );
        assert!(Instant::now() < deadline, "not ready:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

// Goal: with the thread limit reached, no request (nor connection flood) aborts the agent,
// and it keeps answering. Method: run the agent as nobody, set RLIMIT_NPROC to its thread
// count (no new thread for that user), open 100 connections, send 100 requests, call again.
#[test]
fn thread_limit_never_aborts_the_agent() {
    let mut agent = start_as_nobody();
    let token_path = agent.dir.path().join("state").join("api.token");
    let token = ferry::api::token::read(&token_path).expect("token");
    let pid = agent.child.id();
    served_promptly(&agent.api, &token, "warm-up");
    // As nobody too: prlimit(2) on another user's process needs CAP_SYS_RESOURCE. The limit
    // is the agent's own thread count: nobody may start no further thread.
    let threads = proc_status_field(pid, "Threads");
    run_ok(
        Command::new("setpriv")
            .args([
                "--reuid",
                "nobody",
                "--regid",
                "nogroup",
                "--clear-groups",
                "--",
            ])
            .arg("prlimit")
            .arg(format!("--pid={pid}"))
            .arg(format!("--nproc={threads}")),
    );
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let nproc = limits.lines().find(|l| l.starts_with("Max processes"));
    let soft = nproc.and_then(|l| l.split_whitespace().nth(2));
    assert_eq!(soft, Some(threads.to_string().as_str()), "{limits}");
    let idle: Vec<TcpStream> = (0..100)
        .filter_map(|_| TcpStream::connect(&agent.api).ok())
        .collect();
    let mut answered = 0;
    for round in 0..100 {
        let with = (round % 2 == 0).then_some(token.as_str());
        if call(&agent.api, "GET", "/metrics", with).is_ok() {
            answered += 1;
        }
    }
    drop(idle);
    let log = std::fs::read_to_string(agent.dir.path().join("agent.log")).unwrap_or_default();
    assert!(
        agent.child.try_wait().expect("wait").is_none(),
        "aborted:\n{log}"
    );
    eprintln!("RLIMIT_NPROC {threads} (the agent's threads): {answered}/100 calls answered");
    assert_eq!(answered, 100, "{log}");
    served_promptly(&agent.api, &token, "at the thread limit");
}

// Goal: /metrics needs the token by default; `--metrics ADDR` serves it alone there without
// the token; `--metrics-auth false` opens it on the API address. Method: two agents.
#[test]
fn metrics_need_the_token_unless_served_apart() {
    let metrics = format!("127.0.0.1:{}", free_port());
    let agent = AgentProc::start(&[], &["--metrics", &metrics]);
    let token = token(&agent);
    let (status, body) = call(&agent.api, "GET", "/metrics", None).expect("call");
    assert_eq!(status, 401, "{body}");
    let (status, _) = call(&agent.api, "GET", "/metrics", Some(&token)).expect("call");
    assert_eq!(status, 200);
    let (status, body) = call(&metrics, "GET", "/metrics", None).expect("metrics address");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("# TYPE"), "{body}");
    let (status, _) = call(&metrics, "GET", "/v1/exports", Some(&token)).expect("call");
    assert_eq!(status, 404, "only /metrics there");
    drop(agent);
    let open = AgentProc::start(&[], &["--metrics-auth", "false"]);
    let (status, _) = call(&open.api, "GET", "/metrics", None).expect("call");
    assert_eq!(status, 200);
    let (status, _) = call(&open.api, "GET", "/v1/exports", None).expect("call");
    assert_eq!(status, 401);
}
