//! The control API across hosts, on a real agent process: on an address that is not
//! loopback the agent serves the API over mutual TLS only (and refuses to start without
//! credentials), and a stalled handshake costs nobody else anything.
//!
//! The agent listens on `0.0.0.0` (every interface: routable, unlike any 127.0.0.0/8
//! address, which Rust and the agent count as loopback) and the clients dial 127.0.0.1, a
//! name the generated server certificate carries.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{agent_bin, free_port, scratch_dir, sparse_image, tls_init};
use ferry::api::listen::HEAD_DEADLINE;
use ferry::api::tls::ClientTlsOptions;
use ferry::api::{Client, ClientError};

/// What "answers promptly" means here (the machine is shared with other builds).
const PROMPT: Duration = Duration::from_secs(2);

/// An agent process with its API on `0.0.0.0`; killed on drop.
struct RoutableAgent {
    child: Child,
    /// Where clients dial it: 127.0.0.1 and the API port.
    api: String,
    dir: tempfile::TempDir,
}

impl Drop for RoutableAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RoutableAgent {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    fn token(&self) -> String {
        ferry::api::token::read(&self.dir.path().join("state").join("api.token")).expect("token")
    }

    /// A client of this agent over TLS with the credentials in `creds`, checking `name`.
    fn client(&self, creds: &Path, name: Option<&str>) -> Client {
        let tls = ClientTlsOptions::load(creds, name.map(String::from)).expect("client creds");
        Client::new(&self.api, Some(self.token())).with_tls(&tls)
    }

    /// `ferry ARGS` against this agent with `--api-tls-creds creds`.
    fn cli(&self, args: &[&str], creds: &Path) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .args(["--api", &self.api, "--state-dir"])
            .arg(self.dir.path().join("state"))
            .arg("--api-tls-creds")
            .arg(creds)
            .output()
            .expect("run ferry cli")
    }
}

/// `ferry agent` with `--api 0.0.0.0:PORT`, an export `d`, and `extra` flags.
fn agent_command(dir: &Path, port: u16, extra: &[&str]) -> Command {
    let image = dir.join("d.img");
    sparse_image(&image, 1 << 20);
    let mut cmd = Command::new(agent_bin());
    cmd.arg("agent")
        .arg("--socket")
        .arg(dir.join("nbd.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--api")
        .arg(format!("0.0.0.0:{port}"))
        .arg("--transfer")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--export")
        .arg(format!("d={}", image.display()))
        .args(extra)
        .stdout(Stdio::null())
        .env("RUST_LOG", "info");
    cmd
}

/// Starts the agent with its API TLS credentials in `creds`, and waits for its API.
fn start_with_tls(creds: &Path) -> RoutableAgent {
    let dir = scratch_dir();
    let port = free_port();
    let log = std::fs::File::create(dir.path().join("agent.log")).expect("log");
    let creds = creds.to_str().expect("UTF-8 path");
    let child = agent_command(dir.path(), port, &["--api-tls-creds", creds])
        .stderr(log)
        .spawn()
        .expect("spawn ferry agent");
    let mut agent = RoutableAgent {
        child,
        api: format!("127.0.0.1:{port}"),
        dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(&agent.api).is_err() {
        let exited = agent.child.try_wait().expect("wait");
        assert!(exited.is_none(), "agent exited:\n{}", agent.log());
        assert!(Instant::now() < deadline, "not ready:\n{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    agent
}

/// Fresh credentials (`ferry tls init`) for 127.0.0.1 and localhost under `root/name`.
fn creds(root: &Path, name: &str) -> PathBuf {
    let dir = root.join(name);
    tls_init(&dir, &["127.0.0.1", "localhost"]);
    dir
}

/// The error and its sources, as one line.
fn chain(err: &ClientError) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

// Goal: an agent asked to serve its API on a routable address in plain HTTP does not start,
// and says which option it needs. Method: `--api 0.0.0.0:PORT` without credentials; the exit
// status and stderr.
#[test]
fn routable_api_without_tls_refuses_to_start() {
    let dir = scratch_dir();
    let port = free_port();
    let out = agent_command(dir.path(), port, &[])
        .stderr(Stdio::piped())
        .output()
        .expect("run ferry agent");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started:\n{stderr}");
    assert!(stderr.contains("0.0.0.0"), "{stderr}");
    assert!(stderr.contains("requires TLS"), "{stderr}");
    assert!(stderr.contains("--api-tls-creds DIR"), "{stderr}");
    assert!(stderr.contains("--api-insecure"), "{stderr}");
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "API bound"
    );
}

// Goal: with credentials, the API is mutual TLS and nothing else: the right CA and client
// certificate are served (Client and CLI, name checked), plain HTTP gets no answer, a client
// trusting another CA, one without a client certificate, and one expecting another name
// all fail. Method: one agent on 0.0.0.0, one call per kind of client.
#[test]
fn routable_api_serves_mutual_tls_only() {
    let root = scratch_dir();
    let good = creds(root.path(), "good");
    let agent = start_with_tls(&good);

    let exports = agent.client(&good, None).exports().expect("TLS client");
    assert_eq!(exports.len(), 1, "{exports:?}");
    assert_eq!(exports[0].name, "d");
    // The certificate names localhost too; the operator may ask for that name.
    let named = agent.client(&good, Some("localhost")).exports();
    assert!(named.is_ok(), "{named:?}");
    let out = agent.cli(&["export", "ls"], &good);
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains('d'),
        "ferry export ls: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Plain HTTP: no answer, the connection closed.
    let plain = Client::new(&agent.api, Some(agent.token())).exports();
    assert!(
        matches!(plain, Err(ClientError::Unreachable { .. })),
        "{plain:?}"
    );
    let mut raw = TcpStream::connect(&agent.api).expect("connect");
    raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    raw.write_all(b"GET /v1/exports HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    assert!(
        !String::from_utf8_lossy(&answer).contains("HTTP/"),
        "answered in plain HTTP"
    );

    let other = creds(root.path(), "other");
    let err = agent.client(&other, None).exports().expect_err("other CA");
    // Both CAs are "ferry CA": webpki finds the issuer by name, and its signature fails.
    assert!(
        chain(&err).contains("invalid peer certificate"),
        "{}",
        chain(&err)
    );

    let ca_only = root.path().join("ca-only");
    std::fs::create_dir(&ca_only).unwrap();
    std::fs::copy(good.join("ca-cert.pem"), ca_only.join("ca-cert.pem")).unwrap();
    let err = agent
        .client(&ca_only, None)
        .exports()
        .expect_err("no client cert");
    assert!(
        chain(&err).contains("CertificateRequired"),
        "{}",
        chain(&err)
    );

    let err = agent
        .client(&good, Some("elsewhere.example"))
        .exports()
        .expect_err("another name");
    assert!(
        chain(&err).contains("not valid for name"),
        "{}",
        chain(&err)
    );

    let log = agent.log();
    assert!(log.contains("api https://0.0.0.0:"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

// Goal: clients that never finish the handshake are closed at the head deadline, without
// delaying anyone meanwhile, even when they outnumber the workers. Method: open more silent
// connections (one of them a ClientHello cut short) than there are workers; call with a
// good client at once; then time when the agent closes them.
#[test]
fn stalled_handshakes_are_dropped_at_the_deadline() {
    let root = scratch_dir();
    let good = creds(root.path(), "good");
    let agent = start_with_tls(&good);
    let opened = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..2 * ferry::api::WORKERS)
        .map(|_| TcpStream::connect(&agent.api).expect("connect"))
        .collect();
    // A TLS handshake record header announcing 512 bytes, and 3 of them.
    stalled[0].write_all(&[22, 3, 1, 2, 0, 1, 0, 1]).unwrap();

    let started = Instant::now();
    let exports = agent
        .client(&good, None)
        .exports()
        .expect("served meanwhile");
    assert_eq!(exports.len(), 1);
    assert!(started.elapsed() < PROMPT, "took {:?}", started.elapsed());

    for (index, conn) in stalled.iter_mut().enumerate() {
        conn.set_read_timeout(Some(HEAD_DEADLINE * 3)).unwrap();
        let mut scratch = [0u8; 64];
        let read = conn.read(&mut scratch);
        let after = opened.elapsed();
        assert!(
            matches!(read, Ok(0))
                || read.is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock),
            "connection {index} not closed by the agent"
        );
        assert!(
            after >= HEAD_DEADLINE - Duration::from_millis(100),
            "{index}: {after:?}"
        );
        assert!(
            after < HEAD_DEADLINE + PROMPT,
            "{index}: closed after {after:?}"
        );
    }
    assert!(agent.client(&good, None).exports().is_ok());
}
