//! Bad input from the network (DESIGN invariant 3): malformed requests get an NBD error and the
//! connection keeps working; a bad magic or a broken handshake closes that connection only;
//! nothing a client sends stops the agent from serving everybody else.
//!
//! The requests libnbd can send are sent by nbdsh (python3-libnbd) with its client-side checks
//! off (`set_strict_mode(0)`), so they reach ferry as a buggy or hostile client would send them;
//! what no NBD library will send (bad magic, garbage) goes over a raw socket.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use ferry::prng::SplitMix64 as Prng;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

use common::{require, run_ok, sparse_image, stdout, AgentProc};

const MIB: u64 = 1 << 20;

fn agent_with_rw_and_ro() -> AgentProc {
    let dir = common::scratch_dir();
    let rw = dir.path().join("rw.img");
    let ro = dir.path().join("ro.img");
    sparse_image(&rw, 64 * MIB);
    sparse_image(&ro, 8 * MIB);
    let exports = [
        format!("rw={}", rw.display()),
        format!("ro={},ro", ro.display()),
    ];
    AgentProc::start_in(dir, &exports, &[])
}

/// Runs a Python script under nbdsh with `uri_rw` / `uri_ro` defined; it prints "ok" at the end.
fn nbdsh(agent: &AgentProc, script: &str) -> String {
    require("nbdsh");
    let prelude = format!(
        "import errno\nuri_rw = {:?}\nuri_ro = {:?}\n",
        agent.uri("rw"),
        agent.uri("ro")
    );
    let out = run_ok(
        common::nbdsh_command()
            .arg("-c")
            .arg(format!("{prelude}{script}")),
    );
    let text = stdout(&out);
    assert!(
        text.trim_end().ends_with("ok"),
        "nbdsh script did not finish:\n{text}"
    );
    text
}

// Goal: each malformed request gets the errno the issue names and the same connection serves
// the next request. Method: nbdsh with strict mode off sends, on one connection: a read past
// the end, a read whose offset+length overflows u64, a read longer than the 32 MiB maximum, a
// write past the end, a write to a read-only export, a flag that does not apply; after each, a
// good write and read-back on the same handle.
#[test]
fn malformed_requests_get_errors_and_connection_survives() {
    let agent = agent_with_rw_and_ro();
    nbdsh(
        &agent,
        r#"
def expect(call, codes, what):
    try:
        call()
    except nbd.Error as e:
        # libnbd gives the errno by name ("EINVAL"); older bindings gave the number.
        name = e.errno if isinstance(e.errno, str) else errno.errorcode.get(e.errno)
        wanted = [errno.errorcode[c] for c in codes]
        assert name in wanted, f"{what}: {name} ({e}) not in {wanted}"
        return
    raise AssertionError(f"{what}: accepted")

def still_works(h, n):
    data = bytes([n % 256]) * 4096
    h.pwrite(data, n * 4096)
    assert h.pread(4096, n * 4096) == data

h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(uri_rw)
size = h.get_size()
expect(lambda: h.pread(4096, size - 100), (errno.EINVAL,), "read past the end")
still_works(h, 1)
expect(lambda: h.pread(4096, 2**64 - 512), (errno.EINVAL, errno.EOVERFLOW), "offset overflow")
still_works(h, 2)
expect(lambda: h.pread(33 * 2**20, 0), (errno.EINVAL, errno.EOVERFLOW), "read over 32 MiB")
still_works(h, 3)
expect(lambda: h.pwrite(b"x" * 8192, size - 4096), (errno.EINVAL, errno.ENOSPC), "write past the end")
still_works(h, 4)
expect(lambda: h.pwrite(b"x" * 40 * 2**20, 0), (errno.EINVAL, errno.EOVERFLOW), "write over 32 MiB")
still_works(h, 5)
expect(lambda: h.zero(4096, 0, nbd.CMD_FLAG_DF), (errno.EINVAL,), "flag not for this command")
still_works(h, 6)
h.flush()
h.shutdown()

ro = nbd.NBD()
ro.set_strict_mode(0)
ro.connect_uri(uri_ro)
assert ro.is_read_only()
expect(lambda: ro.pwrite(b"y" * 4096, 0), (errno.EPERM, errno.EROFS), "write to read-only")
expect(lambda: ro.trim(4096, 0), (errno.EPERM, errno.EROFS, errno.EINVAL), "trim on read-only")
expect(lambda: ro.zero(4096, 0), (errno.EPERM, errno.EROFS, errno.EINVAL), "zero on read-only")
assert ro.pread(4096, 0) == bytes(4096)
ro.shutdown()
print("ok")
"#,
    );
}

fn handshake_and_go(stream: &mut UnixStream, export: &str) {
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    stream.write_all(&3u32.to_be_bytes()).unwrap(); // FIXED_NEWSTYLE | NO_ZEROES
    let mut opt = Vec::new();
    opt.extend_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
    opt.extend_from_slice(&7u32.to_be_bytes()); // OPT_GO
    opt.extend_from_slice(&(4 + export.len() as u32 + 2).to_be_bytes());
    opt.extend_from_slice(&(export.len() as u32).to_be_bytes());
    opt.extend_from_slice(export.as_bytes());
    opt.extend_from_slice(&0u16.to_be_bytes());
    stream.write_all(&opt).unwrap();
    loop {
        let mut head = [0u8; 20];
        stream.read_exact(&mut head).unwrap();
        let reply = u32::from_be_bytes(head[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut body = vec![0u8; len as usize];
        stream.read_exact(&mut body).unwrap();
        if reply == 1 {
            return; // NBD_REP_ACK: transmission phase
        }
        assert_eq!(reply, 3, "expected NBD_REP_INFO or ACK, got {reply:#x}");
    }
}

/// Reads until EOF (or error); true when the server closed the connection within 5 s.
fn closed_by_server(stream: &mut UnixStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut sink = [0u8; 4096];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(err) => return err.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

// Goal: a bad request magic and garbage handshakes close only their own connection; a client
// connected before keeps reading and writing, and new clients are served after. Method: an
// nbdsh client holds a connection; raw sockets send a request with a bad magic after OPT_GO,
// 200 random byte streams at the handshake, and truncated options; then the first client and a
// new qemu-io client verify their data, and the agent is still running.
#[test]
fn bad_magic_and_garbage_close_only_that_connection() {
    let mut agent = agent_with_rw_and_ro();
    require("nbdsh");
    let mut held = common::nbdsh_command()
        .arg("-c")
        .arg(format!(
            "import sys\nh = nbd.NBD()\nh.connect_uri({:?})\nh.pwrite(b'a' * 4096, 0)\n\
             print('ready', flush=True)\nsys.stdin.readline()\nassert h.pread(4096, 0) == b'a' * 4096\n\
             h.pwrite(b'b' * 4096, 4096)\nh.flush()\nprint('ok', flush=True)\n",
            agent.uri("rw")
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut held_out = held.stdout.take().unwrap();
    let mut ready = [0u8; 6];
    held_out.read_exact(&mut ready).unwrap();
    assert_eq!(&ready, b"ready\n");

    let mut bad = UnixStream::connect(&agent.socket).unwrap();
    handshake_and_go(&mut bad, "rw");
    let mut request = [0u8; 28];
    request[0..4].copy_from_slice(&0xdead_beefu32.to_be_bytes());
    bad.write_all(&request).unwrap();
    assert!(
        closed_by_server(&mut bad),
        "bad magic must close the connection"
    );

    let mut prng = Prng::new(99);
    for round in 0..200 {
        let Ok(mut raw) = UnixStream::connect(&agent.socket) else {
            panic!("round {round}: agent stopped accepting:\n{}", agent.log());
        };
        let len = (prng.next_u64() % 300) as usize;
        let mut junk: Vec<u8> = (0..len).map(|_| prng.next_u64() as u8).collect();
        if round % 3 == 0 && junk.len() >= 12 {
            // Valid client flags and option magic, then a random option: deeper in the parser.
            junk[..4].copy_from_slice(&1u32.to_be_bytes());
            junk[4..12].copy_from_slice(&0x4948_4156_454f_5054u64.to_be_bytes());
        }
        let _ = raw.write_all(&junk);
        let _ = raw.shutdown(std::net::Shutdown::Write);
        assert!(
            closed_by_server(&mut raw),
            "round {round}: connection not closed"
        );
    }

    held.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    held_out.read_to_string(&mut rest).unwrap();
    assert!(
        held.wait().unwrap().success() && rest.contains("ok"),
        "held client: {rest}"
    );
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 0x62 4096 4096"])
            .arg(agent.uri("rw")),
    );
    assert!(stdout(&out).contains("read 4096/4096"), "{}", stdout(&out));
    assert!(
        agent.child.as_mut().unwrap().try_wait().unwrap().is_none(),
        "agent died:\n{}",
        agent.log()
    );
    assert!(agent.stop(), "clean stop after bad input:\n{}", agent.log());
}
