//! A manager pair with real processes in network namespaces (scripts/netlab): agents on lab
//! hosts h1..h4, managers m1 and m2 on hosts h5 and h6, every API on a routable lab address
//! over mutual TLS, and the test driver in the root namespace (the lab's root link, which no
//! fault touches) watching both managers and every agent.
//!
//! What it records, all in Unix milliseconds so it lines up with the processes' logs:
//! - every status poll of each manager (sent, received, the status or nothing),
//! - every agent's `ferry_manager_epoch`,
//! - what the test did to each manager process (started, killed, paused, resumed),
//! - the role changes each manager logged (`manager role: active|standby (epoch N): why`).

pub mod batch;
pub mod checks;
pub mod jitter;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry::api::fleet::ManagerStatus;
use ferry::api::tls::ClientTlsOptions;
use ferry::api::Client;

use super::{agent_bin, scratch_dir, tls_init};

/// The fleet's API token (agents and managers share it).
pub const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// Every agent's API port (each agent has a namespace, hence an address, of its own).
pub const AGENT_PORT: u16 = 7450;
/// Every manager's API port.
pub const MANAGER_PORT: u16 = 7700;
/// How often the pollers ask each manager.
pub const POLL: Duration = Duration::from_millis(100);

/// Now, in Unix milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX))
}

pub use super::netlab::Lab;

/// What every process of the fleet shares: the token file and the TLS credentials (one CA,
/// one server certificate naming every lab address and 127.0.0.1).
#[derive(Debug)]
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub token_file: PathBuf,
    pub creds: PathBuf,
    pub tls: ClientTlsOptions,
    /// The cluster key of the agents' block streams.
    pub cluster_key: PathBuf,
}

impl Fleet {
    pub fn new(lab: &Lab, hosts: u32) -> Fleet {
        let dir = scratch_dir();
        let token_file = dir.path().join("fleet.token");
        std::fs::write(&token_file, TOKEN).expect("token");
        let creds = dir.path().join("tls");
        let mut names: Vec<String> = (1..=hosts).map(|i| lab.ip(&format!("h{i}"))).collect();
        names.push(lab.ip("root"));
        names.push("127.0.0.1".into());
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        tls_init(&creds, &names);
        let tls = ClientTlsOptions::load(&creds, None).expect("client TLS");
        let cluster_key = super::pair::write_key(dir.path());
        Fleet {
            dir,
            token_file,
            creds,
            tls,
            cluster_key,
        }
    }

    /// A client of the API at `addr` with the fleet token, over TLS, giving up after
    /// `timeout` (a paused process must not stall the pollers).
    pub fn client(&self, addr: &str, timeout: Duration) -> Client {
        Client::new(addr, Some(TOKEN.into()))
            .with_tls(&self.tls)
            .with_timeout(timeout)
    }
}

/// An agent in a lab host, its API on the host's address; killed on drop.
#[derive(Debug)]
pub struct LabAgent {
    pub host: String,
    pub api: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
    /// Flags after the fleet's (exports, block stream, NBD over TCP), on every start.
    pub extra: Vec<String>,
}

impl LabAgent {
    /// Starts `ferry agent` in `host` (state and socket under `root/host`) with `extra` flags
    /// and waits for its API.
    pub fn start(
        lab: &Lab,
        fleet: &Fleet,
        host: &str,
        root: &Path,
        extra: Vec<String>,
    ) -> LabAgent {
        let dir = root.join(host);
        std::fs::create_dir_all(dir.join("state")).expect("state dir");
        std::fs::write(dir.join("state/api.token"), TOKEN).expect("token");
        let mut agent = LabAgent {
            host: host.into(),
            api: format!("{}:{AGENT_PORT}", lab.ip(host)),
            dir,
            child: None,
            extra,
        };
        agent.spawn(lab, fleet);
        agent
    }

    /// Starts the agent again (after a kill or a host crash), same state and address.
    pub fn spawn(&mut self, lab: &Lab, fleet: &Fleet) {
        assert!(self.child.is_none(), "agent {} still runs", self.host);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("agent log");
        let child = lab
            .command()
            .args(["exec", &self.host])
            .arg(agent_bin())
            .arg("agent")
            .arg("--socket")
            .arg(self.dir.join("nbd.sock"))
            .arg("--state-dir")
            .arg(self.dir.join("state"))
            .args(["--api", &self.api, "--api-tls-creds"])
            .arg(&fleet.creds)
            .arg("--tls-creds")
            .arg(&fleet.creds)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "info")
            .spawn()
            .expect("netlab exec ferry agent");
        self.child = Some(child);
        wait_listening(&self.api, &mut self.child, &self.dir.join("agent.log"));
    }

    /// kill -9 (the child is the agent itself: netlab exec and ip netns exec exec it).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Reaps an agent a host crash killed.
    pub fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }
}

impl Drop for LabAgent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until something listens on `addr`, or panics with the log at `log_path` if the
/// process exits or 20 s pass.
fn wait_listening(addr: &str, child: &mut Option<Child>, log_path: &Path) {
    let log = || std::fs::read_to_string(log_path).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let child = child.as_mut().expect("started");
        if let Some(status) = child.try_wait().expect("wait") {
            panic!("process for {addr} exited ({status}):\n{}", log());
        }
        let target = addr.parse().expect("address");
        if std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_ok() {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "nothing listens on {addr} after 20 s:\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A `ferry manager` in a lab host; killed on drop.
#[derive(Debug)]
pub struct LabManager {
    pub id: String,
    pub host: String,
    pub listen: String,
    pub dir: PathBuf,
    pub child: Option<Child>,
    /// Pid of the running process (for kill -STOP and the record).
    pub pid: u32,
}

/// How a manager is started: where it reaches its agents and peer, and a command to run it
/// under (`unshare --time ...`).
#[derive(Debug, Clone, Default)]
pub struct Launch {
    /// `NAME=ADDRESS` of every agent.
    pub agents: Vec<String>,
    /// `ID=ADDRESS` of the peer.
    pub peer: String,
    /// Prefix command, empty for none.
    pub wrapper: Vec<String>,
}

impl LabManager {
    pub fn new(id: &str, host: &str, lab: &Lab, root: &Path) -> LabManager {
        let dir = root.join(id);
        std::fs::create_dir_all(&dir).expect("manager dir");
        LabManager {
            id: id.into(),
            host: host.into(),
            listen: format!("{}:{MANAGER_PORT}", lab.ip(host)),
            dir,
            child: None,
            pid: 0,
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("manager.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Starts it (its log appends, its state directory is kept across starts).
    pub fn spawn(&mut self, lab: &Lab, fleet: &Fleet, launch: &Launch) {
        assert!(self.child.is_none(), "manager {} still runs", self.id);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("manager log");
        let mut cmd = lab.command();
        cmd.args(["exec", &self.host]);
        cmd.args(&launch.wrapper);
        cmd.arg(agent_bin())
            .args(["manager", "--id", &self.id, "--listen", &self.listen])
            .args(["--peer", &launch.peer, "--manager-dir"])
            .arg(self.dir.join("state"))
            .arg("--token-file")
            .arg(&fleet.token_file)
            .arg("--api-tls-creds")
            .arg(&fleet.creds);
        for agent in &launch.agents {
            cmd.args(["--agent", agent]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "info")
            .spawn()
            .expect("netlab exec ferry manager");
        self.pid = child.id();
        self.child = Some(child);
        let log = self.log_path();
        wait_listening(&self.listen, &mut self.child, &log);
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Reaps a manager a host crash killed.
    pub fn reap(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for LabManager {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A paused process must be woken to die promptly in wait().
            let _ = Command::new("kill")
                .args(["-CONT", &self.pid.to_string()])
                .output();
        }
        self.kill();
    }
}

/// One poll of one manager.
#[derive(Debug, Clone)]
pub struct Sample {
    pub sent_ms: u64,
    pub recv_ms: u64,
    pub status: Option<ManagerStatus>,
}

impl Sample {
    pub fn active_epoch(&self) -> Option<u64> {
        self.status
            .as_ref()
            .filter(|s| s.active)
            .and_then(|s| s.epoch)
    }
}

/// Threads polling every manager's status and every agent's epoch until dropped.
#[derive(Debug)]
pub struct Watch {
    pub samples: Vec<Arc<Mutex<Vec<Sample>>>>,
    /// `(unix ms, agent index, ferry_manager_epoch)`.
    pub agent_epochs: Arc<Mutex<Vec<(u64, usize, u64)>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Watch {
    pub fn start(fleet: &Fleet, managers: &[String], agents: &[String]) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut samples = Vec::new();
        for addr in managers {
            let log = Arc::new(Mutex::new(Vec::new()));
            samples.push(log.clone());
            let client = fleet.client(addr, Duration::from_millis(400));
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let sent_ms = now_ms();
                    let status = client.manager_status().ok();
                    let recv_ms = now_ms();
                    log.lock().unwrap().push(Sample {
                        sent_ms,
                        recv_ms,
                        status,
                    });
                    std::thread::sleep(
                        POLL.saturating_sub(Duration::from_millis(recv_ms.saturating_sub(sent_ms))),
                    );
                }
            }));
        }
        let agent_epochs = Arc::new(Mutex::new(Vec::new()));
        let clients: Vec<Client> = agents
            .iter()
            .map(|addr| fleet.client(addr, Duration::from_millis(400)))
            .collect();
        let log = agent_epochs.clone();
        let stop_agents = stop.clone();
        threads.push(std::thread::spawn(move || {
            while !stop_agents.load(Ordering::Relaxed) {
                for (index, client) in clients.iter().enumerate() {
                    if let Some(epoch) = client.metrics().ok().as_deref().and_then(epoch_metric) {
                        log.lock().unwrap().push((now_ms(), index, epoch));
                    }
                }
                std::thread::sleep(Duration::from_millis(300));
            }
        }));
        Watch {
            samples,
            agent_epochs,
            stop,
            threads,
        }
    }

    /// The latest sample of manager `index`.
    pub fn latest(&self, index: usize) -> Option<Sample> {
        self.samples[index].lock().unwrap().last().cloned()
    }

    /// Samples of manager `index` received in `[from_ms, to_ms]`.
    pub fn between(&self, index: usize, from_ms: u64, to_ms: u64) -> Vec<Sample> {
        self.samples[index]
            .lock()
            .unwrap()
            .iter()
            .filter(|s| (from_ms..=to_ms).contains(&s.recv_ms))
            .cloned()
            .collect()
    }

    /// The latest epoch each agent reported (None: never answered).
    pub fn agent_latest(&self, agents: usize) -> Vec<Option<u64>> {
        let log = self.agent_epochs.lock().unwrap();
        (0..agents)
            .map(|index| {
                log.iter()
                    .rev()
                    .find(|(_, i, _)| *i == index)
                    .map(|(_, _, e)| *e)
            })
            .collect()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// `ferry_manager_epoch N` of an agent's metrics.
pub fn epoch_metric(metrics: &str) -> Option<u64> {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("ferry_manager_epoch "))
        .and_then(|value| value.trim().parse().ok())
}

/// One `manager role: ...` line of a manager's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleLine {
    pub at_ms: u64,
    pub active: bool,
    pub epoch: u64,
    pub reason: String,
}

/// The role changes in a log written by ferry's logger
/// (`[2026-03-01T19:20:00.123Z WARN  ferry::manager::runtime] manager role: active (epoch 3): why`).
pub fn role_lines(log: &str) -> Vec<RoleLine> {
    log.lines()
        .filter_map(|line| {
            let (head, message) = line.split_once("] ")?;
            let rest = message.strip_prefix("manager role: ")?;
            let stamp = head.strip_prefix('[')?.split_whitespace().next()?;
            let (role, rest) = rest.split_once(" (epoch ")?;
            let (epoch, reason) = rest.split_once("): ")?;
            Some(RoleLine {
                at_ms: rfc3339_ms(stamp)?,
                active: role == "active",
                epoch: epoch.parse().ok()?,
                reason: reason.to_string(),
            })
        })
        .collect()
}

/// `2026-03-01T19:20:00.123Z` in Unix milliseconds (UTC only, as the logger writes it).
pub fn rfc3339_ms(stamp: &str) -> Option<u64> {
    let stamp = stamp.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut date = date.split('-').map(|part| part.parse::<i64>().ok());
    let (y, m, d) = (date.next()??, date.next()??, date.next()??);
    let (hms, millis) = time.split_once('.').unwrap_or((time, "0"));
    let mut hms = hms.split(':').map(|part| part.parse::<i64>().ok());
    let (hh, mm, ss) = (hms.next()??, hms.next()??, hms.next()??);
    let millis: i64 = millis.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let ms = ((days * 86_400 + hh * 3_600 + mm * 60 + ss) * 1_000) + millis;
    u64::try_from(ms).ok()
}
