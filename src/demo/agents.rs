//! The demo's agents: each one is this executable run as `ferry agent --config FILE`, a child
//! process with its own TOML config, state directory and log file (stdout and stderr), reached
//! only through its control API and its NBD socket.
//!
//! Invariants:
//! - A started [`AgentProcess`] is stopped when dropped: SIGTERM, then SIGKILL if it has not
//!   exited within [`STOP_TIMEOUT`]. So no return path of the demo, error or not, leaves an
//!   agent running; [`AgentProcess::stop`] does the same and says whether the stop was clean.
//! - The child is reaped only by that stop, so its pid cannot be reused by another process
//!   while the demo may still signal it.
//! - Ports that must be known from outside the agent (its control API; the block stream of a
//!   migration destination) are picked by binding port 0 and closing. Another process can take
//!   such a port before the agent binds it, so when an agent exits during start-up it is started
//!   again with fresh ports, up to [`START_ATTEMPTS`] times. Other listeners keep port 0.

use std::fs::OpenOptions;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde::Serialize;

use super::DemoError;
use crate::api::{token, Client};

/// How long an agent may take to answer on its control API after it was spawned.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Starts of one agent before giving up (see the module invariants on ports).
const START_ATTEMPTS: u32 = 3;
/// How long a stopping agent may take: longer than the agent's own 10 s drain grace.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a starting or stopping agent is looked at.
const POLL: Duration = Duration::from_millis(20);
/// Tracking granularity of the demo's exports.
const GRANULARITY_BYTES: u64 = 64 * 1024;

/// One export an agent serves from the start.
#[derive(Debug)]
pub(crate) struct ExportSpec {
    /// NBD export name.
    pub name: &'static str,
    /// Raw image file.
    pub path: PathBuf,
    /// Trackers created with the export.
    pub trackers: Vec<&'static str>,
}

/// What the demo asks of one agent.
#[derive(Debug)]
pub(crate) struct AgentSpec {
    /// Short name, also the log file's (`tracking`, `heat-source`, ...).
    pub name: String,
    /// The agent's own directory: config, state, NBD socket, migrated-in images.
    pub dir: PathBuf,
    /// Log file (created, or appended to).
    pub log: PathBuf,
    /// Cluster key file (created by the agent if missing).
    pub cluster_key: PathBuf,
    /// Half-life of the heat counters.
    pub half_life_ms: u64,
    /// Exports served from the start.
    pub exports: Vec<ExportSpec>,
    /// Receives migrations: its block stream gets a known port (the source is told it), and
    /// it serves NBD over TCP (the source forwards its guests' connections there).
    pub receives_migrations: bool,
}

impl AgentSpec {
    /// The unix socket of the agent's NBD server.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("nbd.sock")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
}

/// A running agent process; stopped when dropped.
#[derive(Debug)]
pub(crate) struct AgentProcess {
    name: String,
    log: PathBuf,
    child: Child,
    /// Set once the child has been reaped.
    exited: Option<ExitStatus>,
    api: Client,
    transfer: Option<String>,
}

/// The ports picked for one start of an agent.
#[derive(Debug)]
struct Ports {
    api: String,
    transfer: String,
}

impl Ports {
    fn pick(receives_migrations: bool) -> io::Result<Ports> {
        let transfer = if receives_migrations { free_port()? } else { 0 };
        Ok(Ports {
            api: format!("127.0.0.1:{}", free_port()?),
            transfer: format!("127.0.0.1:{transfer}"),
        })
    }
}

/// A port that was free a moment ago (see the module invariants).
fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind(("127.0.0.1", 0))?.local_addr()?.port())
}

/// Why one start attempt failed.
#[derive(Debug)]
enum StartFailure {
    Exited(ExitStatus),
    Timeout,
    Io(io::Error),
}

impl AgentProcess {
    /// Writes the agent's config, spawns it and waits until its control API answers.
    pub fn start(spec: &AgentSpec) -> Result<AgentProcess, DemoError> {
        let process_err = |source| DemoError::Process {
            agent: spec.name.clone(),
            log: spec.log.clone(),
            source,
        };
        let exe = std::env::current_exe().map_err(process_err)?;
        std::fs::create_dir_all(&spec.dir).map_err(DemoError::work(&spec.dir))?;
        let config = spec.dir.join("agent.toml");
        for attempt in 1..=START_ATTEMPTS {
            let ports = Ports::pick(spec.receives_migrations).map_err(process_err)?;
            write_config(&config, spec, &ports)?;
            let mut agent = AgentProcess {
                name: spec.name.clone(),
                log: spec.log.clone(),
                child: spawn(&exe, &config, &spec.log).map_err(process_err)?,
                exited: None,
                api: Client::new(&ports.api, None),
                transfer: spec.receives_migrations.then(|| ports.transfer.clone()),
            };
            match agent.wait_up(&spec.state_dir().join("api.token"), &ports.api) {
                Ok(()) => {
                    println!(
                        "started agent {} (pid {}, api {}): log {}",
                        spec.name,
                        agent.child.id(),
                        ports.api,
                        spec.log.display()
                    );
                    return Ok(agent);
                }
                Err(StartFailure::Exited(status)) if attempt < START_ATTEMPTS => {
                    agent.exited = Some(status);
                    println!(
                        "agent {} exited during start-up ({status}), perhaps a port was taken: \
                         starting it again on other ports",
                        spec.name
                    );
                }
                Err(StartFailure::Exited(status)) => {
                    agent.exited = Some(status);
                    return Err(DemoError::StartExited {
                        agent: spec.name.clone(),
                        status,
                        log: spec.log.clone(),
                    });
                }
                // Dropping `agent` stops it.
                Err(StartFailure::Timeout) => {
                    return Err(DemoError::StartTimeout {
                        agent: spec.name.clone(),
                        api: ports.api,
                        waited_s: START_TIMEOUT.as_secs(),
                        log: spec.log.clone(),
                    })
                }
                Err(StartFailure::Io(source)) => return Err(process_err(source)),
            }
        }
        unreachable!("the last attempt returns")
    }

    /// Polls until the token file exists and the API answers with it, or the child exits.
    fn wait_up(&mut self, token_path: &Path, api: &str) -> Result<(), StartFailure> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().map_err(StartFailure::Io)? {
                return Err(StartFailure::Exited(status));
            }
            // The agent writes its token before it binds the API: a token alone is not "up".
            if let Ok(token) = token::read(token_path) {
                let client = Client::new(api, Some(token));
                if client.exports().is_ok() {
                    self.api = client;
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(StartFailure::Timeout);
            }
            std::thread::sleep(POLL);
        }
    }

    /// The agent's control API.
    pub fn api(&self) -> &Client {
        &self.api
    }

    /// The block-stream address migrations into this agent go to (`receives_migrations`).
    pub fn transfer_addr(&self) -> Option<&str> {
        self.transfer.as_deref()
    }

    /// The agent's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops the agent (SIGTERM, wait, SIGKILL on timeout); Ok if it exited cleanly.
    pub fn stop(mut self) -> Result<(), DemoError> {
        let how = match self.terminate() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => status.to_string(),
            Ok(None) => format!("killed after {} s", STOP_TIMEOUT.as_secs()),
            Err(source) => {
                return Err(DemoError::Process {
                    agent: self.name.clone(),
                    log: self.log.clone(),
                    source,
                })
            }
        };
        Err(DemoError::Unclean {
            agent: self.name.clone(),
            how,
            log: self.log.clone(),
        })
    }

    /// SIGTERM, then waits; kills the child if it has not exited within [`STOP_TIMEOUT`].
    /// Returns its exit status, or None if it had to be killed. Idempotent.
    fn terminate(&mut self) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.exited {
            return Ok(Some(status));
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("pids fit in i32"));
        // Safe against pid reuse: the child is not reaped yet (module invariants). An error
        // (ESRCH) means it already exited, which the wait below sees.
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                self.exited = Some(status);
                return Ok(Some(status));
            }
            std::thread::sleep(POLL);
        }
        self.child.kill()?;
        self.exited = Some(self.child.wait()?);
        Ok(None)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.exited.is_none() {
            if let Err(err) = self.terminate() {
                eprintln!("ferry demo: cannot stop agent {}: {err}", self.name);
            }
        }
    }
}

/// `ferry agent --config FILE`, with stdout and stderr appended to `log`.
fn spawn(exe: &Path, config: &Path, log: &Path) -> io::Result<Child> {
    let log_file = OpenOptions::new().create(true).append(true).open(log)?;
    Command::new(exe)
        .arg("agent")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
}

/// The TOML config file of `ferry agent` (scripts/deploy/ferry.toml): `[agent]`, `[[export]]`.
#[derive(Debug, Serialize)]
struct ConfigFile<'a> {
    agent: AgentTable<'a>,
    export: Vec<ExportTable<'a>>,
}

#[derive(Debug, Serialize)]
struct AgentTable<'a> {
    socket: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    tcp: Option<&'static str>,
    state_dir: PathBuf,
    api: &'a str,
    half_life_ms: u64,
    transfer: &'a str,
    cluster_key: &'a Path,
    image_dir: PathBuf,
    tls_creds: PathBuf,
}

#[derive(Debug, Serialize)]
struct ExportTable<'a> {
    name: &'a str,
    path: &'a Path,
    granularity: u64,
    trackers: &'a [&'static str],
}

/// The TLS credentials the demo's agents share, beside their shared cluster key: the
/// forwarding hop after a switchover runs over TLS, as a deployment's would.
fn tls_creds(spec: &AgentSpec) -> PathBuf {
    spec.cluster_key
        .parent()
        .unwrap_or(Path::new("."))
        .join("tls")
}

/// Creates the credentials of [`tls_creds`] unless they exist.
fn ensure_tls_creds(dir: &Path) -> Result<(), DemoError> {
    if dir.join(crate::nbd::tls::CA_CERT).exists() {
        return Ok(());
    }
    crate::nbd::tls::init::generate(dir, &["localhost".into(), "127.0.0.1".into()])
        .map_err(DemoError::Tls)
}

fn write_config(path: &Path, spec: &AgentSpec, ports: &Ports) -> Result<(), DemoError> {
    let tls_creds = tls_creds(spec);
    ensure_tls_creds(&tls_creds)?;
    let file = ConfigFile {
        agent: AgentTable {
            socket: spec.socket(),
            tcp: spec.receives_migrations.then_some("127.0.0.1:0"),
            state_dir: spec.state_dir(),
            api: &ports.api,
            half_life_ms: spec.half_life_ms,
            transfer: &ports.transfer,
            cluster_key: &spec.cluster_key,
            image_dir: spec.dir.join("images"),
            tls_creds,
        },
        export: spec
            .exports
            .iter()
            .map(|export| ExportTable {
                name: export.name,
                path: &export.path,
                granularity: GRANULARITY_BYTES,
                trackers: &export.trackers,
            })
            .collect(),
    };
    let text = toml::to_string(&file).map_err(|source| DemoError::Config {
        agent: spec.name.clone(),
        source,
    })?;
    std::fs::write(path, text).map_err(DemoError::work(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: the config the demo writes is the `ferry agent` file format.
    /// Method: serialize a spec and check the tables and fields a reader of
    /// scripts/deploy/ferry.toml expects (the agent's parser is not imported: layering).
    #[test]
    fn demo_config_file_has_the_agent_format() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = AgentSpec {
            name: "heat-destination".into(),
            dir: PathBuf::from("/w/dest"),
            log: PathBuf::from("/w/logs/heat-destination.log"),
            cluster_key: dir.path().join("cluster.key"),
            half_life_ms: 10_000,
            exports: vec![ExportSpec {
                name: "vm1",
                path: PathBuf::from("/w/vm1.img"),
                trackers: vec!["since-boot"],
            }],
            receives_migrations: true,
        };
        let ports = Ports {
            api: "127.0.0.1:4000".into(),
            transfer: "127.0.0.1:4001".into(),
        };
        let path = dir.path().join("agent.toml");
        write_config(&path, &spec, &ports).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        let value: toml::Table = text.parse().expect("valid TOML");
        let agent = value["agent"].as_table().expect("[agent]");
        assert_eq!(agent["socket"].as_str(), Some("/w/dest/nbd.sock"));
        assert_eq!(agent["state_dir"].as_str(), Some("/w/dest/state"));
        assert_eq!(agent["api"].as_str(), Some("127.0.0.1:4000"));
        assert_eq!(agent["transfer"].as_str(), Some("127.0.0.1:4001"));
        assert_eq!(agent["tcp"].as_str(), Some("127.0.0.1:0"));
        let tls = dir.path().join("tls");
        assert_eq!(agent["tls_creds"].as_str(), tls.to_str());
        assert!(tls.join("server-cert.pem").exists() && tls.join("client-key.pem").exists());
        assert_eq!(agent["half_life_ms"].as_integer(), Some(10_000));
        let exports = value["export"].as_array().expect("[[export]]");
        assert_eq!(exports.len(), 1);
        assert_eq!(exports[0]["name"].as_str(), Some("vm1"));
        assert_eq!(exports[0]["granularity"].as_integer(), Some(65536));
        assert_eq!(exports[0]["trackers"][0].as_str(), Some("since-boot"));
    }
}
