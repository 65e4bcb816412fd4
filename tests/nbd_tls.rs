//! NBD over TCP with TLS, driven by real clients: QEMU's (qemu-io, qemu-img, through GnuTLS
//! with `tls-creds-x509`) and libnbd's (nbdinfo, nbdcopy, with `nbds://` and
//! `tls-certificates=`), against a `ferry agent` started with `--tcp --tls-creds DIR`.
//!
//! What is refused: a client in plaintext (nothing is listed or opened), a client without a
//! certificate, a client whose certificate another CA signed; and an agent asked to serve TCP
//! with neither TLS credentials nor `--tcp-insecure` does not start.
//!
//! The credentials are the ones every agent of the test run shares (`common::tls_creds`,
//! made by `ferry tls init`); the forwarding hop of the migration tests (forward_hold.rs,
//! come_home.rs) runs over TLS with them as well.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{require, run_ok, sparse_image, stdout, tls_creds, AgentProc};

const MIB: u64 = 1 << 20;

/// An agent serving an 8 MiB `vm1` (and a 4 MiB read-only `vm2`) over TCP with TLS.
fn tls_agent(dir: &Path) -> (AgentProc, String) {
    let image = dir.join("disk.img");
    let other = dir.join("other.img");
    sparse_image(&image, 8 * MIB);
    sparse_image(&other, 4 * MIB);
    let agent = AgentProc::start(
        &[
            format!("vm1={}", image.display()),
            format!("vm2={},ro", other.display()),
        ],
        &["--tcp"],
    );
    let tcp = agent.tcp.clone().expect("tcp address");
    (agent, tcp)
}

/// `host=...,port=...` of `host:port`.
fn host_port(tcp: &str) -> (String, String) {
    let (host, port) = tcp.rsplit_once(':').expect("host:port");
    (host.to_string(), port.to_string())
}

/// qemu-io on `export` over TLS with the credentials in `creds`; the output, not checked.
fn qemu_io_tls(tcp: &str, export: &str, creds: &Path, commands: &[&str]) -> Output {
    require("qemu-io");
    let (host, port) = host_port(tcp);
    let mut cmd = Command::new("qemu-io");
    cmd.arg("--object").arg(format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        creds.display()
    ));
    cmd.arg("--image-opts").arg(format!(
        "driver=nbd,host={host},port={port},export={export},tls-creds=tls0"
    ));
    for command in commands {
        cmd.arg("-c").arg(command);
    }
    cmd.output().expect("run qemu-io")
}

/// `nbds://HOST:PORT/EXPORT?tls-certificates=DIR`.
fn nbds(tcp: &str, export: &str, creds: &Path) -> String {
    format!("nbds://{tcp}/{export}?tls-certificates={}", creds.display())
}

/// Runs `cmd` (bounded by `timeout`), expecting it to fail; returns its stdout and stderr.
fn fails(cmd: &mut Command) -> (String, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        !out.status.success(),
        "{cmd:?} succeeded:\n{stdout}\n{stderr}"
    );
    (stdout, stderr)
}

/// A credentials directory for libnbd/QEMU clients: `ca` from `ca_from`, the client identity
/// from `client_from` (none when None).
fn client_dir(at: &Path, ca_from: &Path, client_from: Option<&Path>) {
    std::fs::create_dir_all(at).unwrap();
    std::fs::copy(ca_from.join("ca-cert.pem"), at.join("ca-cert.pem")).unwrap();
    if let Some(from) = client_from {
        for file in ["client-cert.pem", "client-key.pem"] {
            std::fs::copy(from.join(file), at.join(file)).unwrap();
        }
    }
}

/// `NBD_REP_ERR_TLS_REQD`.
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;

/// The reply type the server gives a plaintext NBD_OPT_LIST, spoken byte by byte.
fn raw_list_reply(tcp: &str) -> u32 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(tcp).unwrap();
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    stream.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut option = b"IHAVEOPT".to_vec();
    option.extend_from_slice(&3u32.to_be_bytes()); // NBD_OPT_LIST
    option.extend_from_slice(&0u32.to_be_bytes());
    stream.write_all(&option).unwrap();
    let mut reply = [0u8; 20];
    stream.read_exact(&mut reply).unwrap();
    u32::from_be_bytes(reply[12..16].try_into().unwrap())
}

// Goal: over TCP with TLS configured, a plaintext client gets nothing: no export listed, none
// opened (the server answers NBD_REP_ERR_TLS_REQD until STARTTLS). Method: nbdinfo --list,
// nbdinfo and qemu-io with nbd:// URIs must fail and print no export name; a LIST spoken by
// hand gets NBD_REP_ERR_TLS_REQD.
#[test]
fn plaintext_clients_are_refused() {
    require("nbdinfo");
    let dir = common::scratch_dir();
    let (_agent, tcp) = tls_agent(dir.path());
    let (out, err) = fails(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd://{tcp}")),
    );
    assert!(
        !out.contains("vm1") && !out.contains("vm2"),
        "listed: {out}"
    );
    println!("nbdinfo --list in plaintext: {err}");
    let (out, _) = fails(Command::new("nbdinfo").arg(format!("nbd://{tcp}/vm1")));
    assert!(!out.contains("export-size"), "opened: {out}");
    assert_eq!(raw_list_reply(&tcp), REP_ERR_TLS_REQD);
    require("qemu-io");
    fails(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read 0 4k"])
            .arg(format!("nbd://{tcp}/vm1")),
    );
}

// Goal: mutual TLS: a client without a certificate, and one whose certificate another CA
// signed, are refused by the server; a client that does not know the server's CA refuses
// the server. Method: libnbd and QEMU clients with directories holding the right CA but no
// client identity, the right CA with another CA's client identity, and only another CA.
#[test]
fn clients_without_a_valid_certificate_are_refused() {
    require("nbdinfo");
    let dir = common::scratch_dir();
    let (agent, tcp) = tls_agent(dir.path());
    let creds = tls_creds();
    let other_ca = dir.path().join("other-ca");
    common::tls_init(&other_ca, &["localhost", "127.0.0.1"]);

    let no_cert = dir.path().join("no-cert");
    client_dir(&no_cert, &creds, None);
    let wrong_client = dir.path().join("wrong-client");
    client_dir(&wrong_client, &creds, Some(&other_ca));
    for refused in [&no_cert, &wrong_client, &other_ca] {
        let (out, _) = fails(Command::new("nbdinfo").arg(nbds(&tcp, "vm1", refused)));
        assert!(!out.contains("export-size"), "{}: {out}", refused.display());
        let qemu = qemu_io_tls(&tcp, "vm1", refused, &["read 0 4k"]);
        assert!(!qemu.status.success(), "qemu-io with {}", refused.display());
    }
    let log = agent.log();
    assert!(log.contains("TLS handshake failed"), "{log}");
}

// Goal: QEMU's clients work over TLS: qemu-io writes and reads a pattern, qemu-img info sees
// the size, qemu-img convert copies an image in and out. Method: the shared credentials
// directory with tls-creds-x509 endpoint=client; the data read back over the unix socket and
// over TLS matches.
#[test]
fn qemu_clients_work_over_tls() {
    require("qemu-img");
    let dir = common::scratch_dir();
    let (agent, tcp) = tls_agent(dir.path());
    let creds = tls_creds();
    let out = qemu_io_tls(
        &tcp,
        "vm1",
        &creds,
        &["write -P 0x5a 0 64k", "read -P 0x5a 0 64k"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("Pattern verification failed"), "{text}");
    let local = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read -P 0x5a 0 64k"])
        .arg(agent.uri("vm1"))
        .output()
        .unwrap();
    assert!(local.status.success() && !String::from_utf8_lossy(&local.stdout).contains("failed"));

    let (host, port) = host_port(&tcp);
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        creds.display()
    );
    let opts = format!("driver=nbd,host={host},port={port},export=vm1,tls-creds=tls0");
    let info = stdout(&run_ok(Command::new("qemu-img").args([
        "info",
        "--object",
        &object,
        "--image-opts",
        &opts,
    ])));
    assert!(info.contains("8 MiB"), "{info}");

    let source = dir.path().join("source.img");
    let data: Vec<u8> = (0..8 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&source, &data).unwrap();
    run_ok(
        Command::new("qemu-img")
            .args([
                "convert",
                "-n",
                "-f",
                "raw",
                "--object",
                &object,
                "--target-image-opts",
            ])
            .arg(&source)
            .arg(&opts),
    );
    let back = dir.path().join("back.img");
    run_ok(
        Command::new("qemu-img")
            .args([
                "convert",
                "-O",
                "raw",
                "--object",
                &object,
                "--image-opts",
                &opts,
            ])
            .arg(&back),
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "convert round trip differs"
    );
}

// Goal: libnbd's clients work over TLS: nbdinfo lists both exports, nbdcopy copies in and
// out. Method: nbds:// URIs with tls-certificates= the shared credentials directory.
#[test]
fn libnbd_clients_work_over_tls() {
    require("nbdcopy");
    let dir = common::scratch_dir();
    let (_agent, tcp) = tls_agent(dir.path());
    let creds = tls_creds();
    let list = stdout(&run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbds://{tcp}?tls-certificates={}", creds.display())),
    ));
    assert!(list.contains("vm1") && list.contains("vm2"), "{list}");
    let source = dir.path().join("source.img");
    let data: Vec<u8> = (0..8 * MIB).map(|i| (i * 13 % 253) as u8).collect();
    std::fs::write(&source, &data).unwrap();
    run_ok(
        Command::new("nbdcopy")
            .arg(&source)
            .arg(nbds(&tcp, "vm1", &creds)),
    );
    let back = dir.path().join("back.img");
    run_ok(
        Command::new("nbdcopy")
            .arg(nbds(&tcp, "vm1", &creds))
            .arg(&back),
    );
    assert!(
        std::fs::read(&back).unwrap() == data,
        "nbdcopy round trip differs"
    );
}

// Goal: NBD over TCP without TLS is opt-in: an agent given --tcp with neither --tls-creds nor
// --tcp-insecure exits at once with a message naming both. Method: run `ferry agent` so.
#[test]
fn tcp_without_tls_does_not_start() {
    let dir = common::scratch_dir();
    let image = dir.path().join("disk.img");
    sparse_image(&image, MIB);
    let (_, err) = fails(
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .arg("agent")
            .arg("--socket")
            .arg(dir.path().join("nbd.sock"))
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .arg("--tcp=127.0.0.1:0")
            .arg("--export")
            .arg(format!("vm1={}", image.display())),
    );
    assert!(
        err.contains("requires TLS")
            && err.contains("--tls-creds")
            && err.contains("--tcp-insecure"),
        "{err}"
    );
}

// Goal: ferry's own client (the forwarder's dialler) does STARTTLS with its client identity,
// and large requests cross TLS intact in both directions; without TLS it is refused. Method:
// NbdClient::connect_tcp with and without the shared credentials; a write and a read of the
// whole 8 MiB export, then pipelined 4 KiB reads checked against the pattern.
#[test]
fn ferry_client_speaks_tls() {
    use ferry::nbd::client::NbdClient;
    let dir = common::scratch_dir();
    let (_agent, tcp) = tls_agent(dir.path());
    let refused = NbdClient::connect_tcp(&tcp, "vm1", None).expect_err("plaintext refused");
    assert!(refused.to_string().contains("refused"), "{refused}");
    let creds = ferry::nbd::tls::TlsCreds::load(&tls_creds(), false).unwrap();
    let mut client = NbdClient::connect_tcp(&tcp, "vm1", Some(creds.client())).unwrap();
    let data: Vec<u8> = (0..8 * MIB).map(|i| (i * 31 % 241) as u8).collect();
    client.write_at(0, &data).unwrap();
    client.flush().unwrap();
    assert!(client.read_at(0, 8 * MIB as u32).unwrap() == data);
    let cookies: Vec<u64> = (0..64u64)
        .map(|i| client.send_read(i * 4096 * 31, 4096).unwrap())
        .collect();
    for _ in &cookies {
        let reply = client.recv().unwrap();
        let index = cookies.iter().position(|c| *c == reply.cookie).unwrap() as u64;
        let offset = (index * 4096 * 31) as usize;
        assert!(reply.data.unwrap() == data[offset..offset + 4096]);
    }
    client.disconnect().unwrap();
}

// Goal: the unix socket, which stays plaintext, is guarded by its mode: 0600 (owner only) by
// default, 0660 with the group of --socket-group. Method: stat the socket of two agents.
#[test]
fn unix_socket_is_owner_only_or_its_group() {
    use std::os::unix::fs::MetadataExt;
    let dir = common::scratch_dir();
    let image = dir.path().join("disk.img");
    sparse_image(&image, MIB);
    let export = [format!("vm1={}", image.display())];
    let agent = AgentProc::start(&export, &[]);
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    drop(agent);
    let grouped = AgentProc::start(&export, &["--socket-group", "daemon"]);
    let meta = std::fs::metadata(&grouped.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660, "{}", grouped.log());
    let daemon = Command::new("getent")
        .args(["group", "daemon"])
        .output()
        .unwrap();
    let gid = String::from_utf8_lossy(&daemon.stdout)
        .split(':')
        .nth(2)
        .and_then(|gid| gid.parse::<u32>().ok())
        .expect("the daemon group");
    assert_eq!(meta.gid(), gid);
}
