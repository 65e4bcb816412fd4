//! Shared harness of the integration tests: an agent process started from the built `ferry`
//! binary on a temporary image, with its own socket, state directory and API port, and
//! helpers to run the real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh, fio).
#![allow(dead_code)]

pub mod managers;
pub mod netlab;
pub mod pair;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// A running agent process and its files.
pub struct AgentProc {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub api: String,
    pub tcp: Option<String>,
}

/// The TLS credentials every agent of the test run shares (`ferry tls init`, for localhost,
/// 127.0.0.1 and ::1), made once under the target's temporary directory: a CA, a server and
/// a client identity, in the layout QEMU and libnbd read too.
pub fn tls_creds() -> PathBuf {
    static CREDS: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    CREDS
        .get_or_init(|| {
            let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            let ready = root.join("tls-creds");
            if ready.join("client-key.pem").exists() {
                return ready;
            }
            // Made aside and renamed into place: test binaries may race to make it.
            let fresh = root.join(format!("tls-creds.{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&fresh);
            tls_init(&fresh, &["localhost", "127.0.0.1", "::1"]);
            if std::fs::rename(&fresh, &ready).is_err() {
                let _ = std::fs::remove_dir_all(&fresh);
            }
            assert!(ready.join("client-key.pem").exists(), "no TLS credentials");
            ready
        })
        .clone()
}

/// QEMU's `--object` for the shared credentials as a client: pair with `tls-creds=tls0` in
/// the `--image-opts` of an NBD TCP address.
pub fn qemu_tls_object() -> String {
    format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        tls_creds().display()
    )
}

/// Runs `ferry tls init DIR --host H...`.
pub fn tls_init(dir: &Path, hosts: &[&str]) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferry"));
    cmd.arg("tls").arg("init").arg(dir);
    for host in hosts {
        cmd.arg("--host").arg(host);
    }
    run_ok(&mut cmd);
}

/// The `ferry` binary agents are started from: `FERRY_AGENT_BIN` when set (e.g. the release
/// build, `panic = "abort"` as deployed, or another revision's binary to compare), else the
/// binary built for these tests.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("FERRY_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ferry")))
}

/// A directory on a file system that supports O_DIRECT (not tmpfs).
pub fn scratch_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-test-")
        .tempdir_in("/var/tmp")
        .expect("tempdir")
}

/// A free TCP port on loopback, below the kernel's ephemeral range (32768 and up by default).
/// Agents are restarted on the same ports; a port from the ephemeral range may meanwhile be
/// the local end of some outgoing connection, whose TIME_WAIT then blocks the bind (even with
/// SO_REUSEADDR, as client sockets do not set it), and a client reconnecting to such a port
/// while nothing listens can connect to itself.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |t| t.subsec_nanos());
    for _ in 0..COUNT {
        let step = NEXT.fetch_add(7_919, Ordering::Relaxed);
        let port = FIRST + seed.wrapping_add(step) % COUNT;
        let port = u16::try_from(port).expect("below 32768");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + COUNT);
}

/// Creates a sparse image of `size_bytes`.
pub fn sparse_image(path: &Path, size_bytes: u64) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(size_bytes)
        .unwrap();
}

/// Whether a client program exists (scripts/test installs them; a missing one fails loudly).
pub fn require(program: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "{program} is not installed: run scripts/test, which installs it"
    );
}

impl AgentProc {
    /// Starts `ferry agent` serving `exports` (`NAME=PATH[,opts]`), with extra flags.
    pub fn start(exports: &[String], extra: &[&str]) -> AgentProc {
        Self::start_in(scratch_dir(), exports, extra)
    }

    /// Like `start`, in a given directory (restarts keep their state).
    pub fn start_in(dir: tempfile::TempDir, exports: &[String], extra: &[&str]) -> AgentProc {
        let (child, socket, state_dir, api, tcp) = spawn(dir.path(), exports, extra, None);
        let mut agent = AgentProc {
            child: Some(child),
            dir,
            socket,
            state_dir,
            api,
            tcp,
        };
        agent.wait_ready();
        agent
    }

    /// Starts the agent again in the same directory (state, socket, NBD TCP address), after
    /// `stop` or `kill`; `extra` as for `start`.
    pub fn restart(&mut self, exports: &[String], extra: &[&str]) {
        assert!(self.child.is_none(), "stop or kill the agent first");
        let (child, socket, state_dir, api, tcp) =
            spawn(self.dir.path(), exports, extra, self.tcp.clone());
        self.child = Some(child);
        (self.socket, self.state_dir, self.api, self.tcp) = (socket, state_dir, api, tcp);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited early ({status}):\n{}", self.log());
            }
            if self.socket.exists() && std::net::TcpStream::connect(&self.api).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("agent not ready after 20 s:\n{}", self.log());
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("agent.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// `nbd+unix:///NAME?socket=...`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// qemu's `--image-opts` form of the export.
    pub fn qemu_opts(&self, export: &str) -> String {
        format!(
            "driver=nbd,server.type=unix,server.path={},export={export}",
            self.socket.display()
        )
    }

    /// Runs the ferry CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .arg("--api")
            .arg(&self.api)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .expect("run ferry cli")
    }

    /// `ferry ARGS` against this agent, which must succeed; its stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed:\n{}\n{}",
            stdout(&out),
            String::from_utf8_lossy(&out.stderr)
        );
        stdout(&out)
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Whether the agent process still runs (it did not exit or abort).
    pub fn is_running(&mut self) -> bool {
        let child = self.child.as_mut().expect("started");
        child.try_wait().expect("wait").is_none()
    }

    /// A control API client of this agent, with its token (what the CLI uses).
    pub fn client(&self) -> ferry::api::Client {
        let token = ferry::api::token::read(&self.state_dir.join("api.token")).expect("token");
        ferry::api::Client::new(&self.api, Some(token))
    }

    /// Sends SIGTERM and waits for a clean exit; returns the exit status success.
    pub fn stop(&mut self) -> bool {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            assert!(
                Instant::now() < deadline,
                "agent did not stop:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// The agent process of `start_in`/`restart` in `dir`; `keep_tcp`: the NBD TCP address of a
/// previous run (sources forward there).
fn spawn(
    dir: &Path,
    exports: &[String],
    extra: &[&str],
    keep_tcp: Option<String>,
) -> (Child, PathBuf, PathBuf, String, Option<String>) {
    let socket = dir.join("nbd.sock");
    let state_dir = dir.join("state");
    let api = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(agent_bin());
    cmd.arg("agent")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--api")
        .arg(&api);
    let mut tcp = None;
    if extra.contains(&"--tcp") {
        let addr = keep_tcp.unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        cmd.arg(format!("--tcp={addr}"));
        tcp = Some(addr);
    }
    cmd.args(extra.iter().filter(|a| **a != "--tcp"));
    if !extra.contains(&"--tcp-insecure") && !extra.iter().any(|a| a.starts_with("--tls-creds")) {
        // Every agent of a test run trusts one CA: listeners require TLS, forwarders dial
        // with it, so the forwarding hop of every migration test runs over TLS.
        cmd.arg("--tls-creds").arg(tls_creds());
    }
    if !extra.contains(&"--transfer") {
        // Every agent of a test run needs its own block-stream port.
        cmd.arg("--transfer")
            .arg(format!("127.0.0.1:{}", free_port()));
    }
    for export in exports {
        cmd.arg("--export").arg(export);
    }
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("agent.log"))
        .unwrap();
    cmd.stdout(Stdio::null())
        .stderr(log)
        .env("RUST_LOG", "info");
    let child = cmd.spawn().expect("spawn ferry agent");
    (child, socket, state_dir, api, tcp)
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs a command, panicking with its output if it fails.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nbdsh` under Debian's python3 (python3-libnbd is installed for it): nbdsh runs
/// `python3 -mnbd`, which would pick up any other python3 earlier on PATH.
pub fn nbdsh_command() -> Command {
    require("nbdsh");
    let path = std::env::var("PATH").unwrap_or_default();
    let mut cmd = Command::new("nbdsh");
    cmd.env("PATH", format!("/usr/bin:{path}"));
    cmd
}

/// Where a source image is after a migration's switchover retired it
/// (`<file name>.stale-<job>`, the only such file); the configured path must be gone.
pub fn stale_image(image: &Path) -> std::path::PathBuf {
    assert!(
        image.symlink_metadata().is_err(),
        "{} was not renamed at the switchover",
        image.display()
    );
    let prefix = format!("{}.stale-", image.file_name().unwrap().to_string_lossy());
    let found: Vec<_> = std::fs::read_dir(image.parent().unwrap())
        .unwrap()
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| {
            path.file_name()
                .is_some_and(|name| name.to_string_lossy().starts_with(&prefix))
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "stale images of {}: {found:?}",
        image.display()
    );
    found[0].clone()
}

/// A number field of `/proc/PID/status` (`Threads`, `VmRSS` in KiB, ...).
pub fn proc_status_field(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = text
        .lines()
        .find(|line| line.starts_with(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    let value = line.split_whitespace().nth(1).expect("value");
    value.parse().expect("number")
}

/// Open descriptors of process `pid`.
pub fn proc_fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count()
}

/// Writes `size_mib` MiB of pseudo-random data into a new image.
pub fn data_image(path: &Path, size_mib: usize, seed: u8) {
    let mut bytes = vec![0u8; size_mib << 20];
    let mut state = u64::from(seed) + 1;
    for chunk in bytes.chunks_mut(8) {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(path, bytes).expect("image");
}
