//! The per-host daemon: opens the exports, serves them over NBD, answers the control API, and
//! on SIGTERM/SIGINT stops accepting, drains in-flight requests, flushes the images and saves
//! the trackers.
//!
//! Invariants: a clean stop leaves every tracker file Clean and every image synced; anything
//! else (kill -9, power loss) leaves tracker files Active, which the next start reports lost.

pub mod config;
pub mod control;
pub mod exports;
pub mod fencing;
pub mod gc;
pub mod holding;
pub mod journal;
pub mod limits;
pub mod migrations;
pub mod moves;
pub mod seeded;
pub mod seeds;
pub mod status;
pub mod targets;
pub mod trackers;
pub mod witness;

use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::api::{self, ApiServer};
use crate::env::MonotonicClock;
use crate::io::{probe_uring, EngineKind};
use crate::nbd::server::{NbdServer, SessionOptions};
use crate::nbd::tls::TlsCreds;

use crate::error::error_chain;
use crate::journal::SharedJournal;
pub use config::AgentConfig;
use config::EngineChoice;
use control::AgentControl;
use exports::Exports;
use fencing::Fencing;
use migrations::Migrations;
use seeds::Seeds;
use targets::Targets;
use trackers::Trackers;
use witness::WitnessService;

use crate::transfer::{ClusterKey, ReceiverServer};

/// How long a stopping agent waits for connections to drain.
const DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Errors starting or stopping the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state directory cannot be used.
    #[error("state directory {path}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A configured export could not be opened.
    #[error("export '{name}': {message}")]
    Export {
        /// Export name.
        name: String,
        /// What failed.
        message: String,
    },
    /// io_uring was required and is not available.
    #[error("io_uring is not available: {0}")]
    NoUring(String),
    /// The NBD listeners could not be bound.
    #[error("cannot listen for NBD clients")]
    Listen(#[source] std::io::Error),
    /// The NBD unix socket could not be opened to its group.
    #[error("NBD socket group {group}")]
    SocketGroup {
        /// The group.
        group: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The NBD TLS credentials could not be loaded.
    #[error("NBD TLS credentials {}", path.display())]
    Tls {
        /// The credentials directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::nbd::tls::TlsError,
    },
    /// The control API's TLS credentials could not be loaded.
    #[error("control API TLS credentials {}", path.display())]
    ApiTls {
        /// The credentials directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::nbd::tls::TlsError,
    },
    /// The control API could not start.
    #[error("cannot start the control API")]
    Api(#[source] api::ApiError),
    /// The cluster key could not be read or created.
    #[error("cluster key")]
    ClusterKey(#[source] crate::transfer::TransferError),
    /// The block-stream listener could not start.
    #[error("cannot listen for migrations")]
    Transfer(#[source] crate::transfer::TransferError),
    /// The migration journal cannot be opened or replayed.
    #[error("migration journal")]
    Journal(#[source] crate::journal::JournalError),
    /// The manager epoch fence cannot be loaded (its file is unreadable or corrupt).
    #[error("manager epoch fence")]
    Fence(#[source] fencing::FenceError),
    /// Signal handling could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The stop did not complete cleanly (details were logged).
    #[error("unclean stop: {0}")]
    Unclean(String),
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    exports: Arc<Exports>,
    nbd: NbdServer,
    api: Option<ApiServer>,
    api_addr: SocketAddr,
    transfer: Option<ReceiverServer>,
    transfer_addr: SocketAddr,
    token_path: PathBuf,
}

impl Agent {
    /// Opens the exports and starts the NBD server and the control API.
    pub fn start(config: &AgentConfig) -> Result<Agent, AgentError> {
        let state_err = |source| AgentError::StateDir {
            path: config.state_dir.clone(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&config.state_dir)
            .map_err(state_err)?;
        // Before anything acts: a corrupt epoch file must stop the agent, not reset it.
        let fencing = Arc::new(Fencing::load(&config.state_dir).map_err(AgentError::Fence)?);
        let engine = choose_engine(config.engine)?;
        let journal = SharedJournal::open(&config.state_dir).map_err(AgentError::Journal)?;
        let exports = Arc::new(
            Exports::new(
                &config.state_dir,
                Arc::new(MonotonicClock::new()),
                config.half_life_ms,
                moves::moves(&journal),
            )
            .with_log_extents(config.tracker_log_extents),
        );
        // In parallel: each open reads tracker files and syncs their Active rewrite, so a
        // host with hundreds of exports starts in the time of a few.
        exports::for_each_parallel(&config.exports, |export| {
            exports
                .open(export)
                .map(drop)
                .map_err(|err| AgentError::Export {
                    name: export.name.clone(),
                    message: err.to_string(),
                })
        })?;
        exports.restore_runtime();
        let key =
            load_cluster_key(&config.cluster_key)?.with_insecure_stream(config.stream_insecure);
        if config.stream_insecure {
            log::warn!(
                "stream_insecure: block-stream frames travel unsealed (plaintext, no \
                 protection against a relay); for measurement only"
            );
        }
        // Before any client is served: forwarding and held writes come back first.
        journal::recover(&journal, &exports, &key, &config.image_dir);
        // Holders not yet told where a disk went (stopped mid-way) are told again.
        holding::resume_telling(&journal, &key);
        for export in exports.all() {
            export.set_lineage(holding::lineage_of(&journal, export.name()));
        }
        let tls = match &config.tls_creds {
            Some(dir) => Some(TlsCreds::load(dir, config.tcp.is_some()).map_err(|source| {
                AgentError::Tls {
                    path: dir.clone(),
                    source,
                }
            })?),
            None => None,
        };
        if let (Some(addr), None) = (config.tcp, &tls) {
            log::warn!(
                "NBD over TCP on {addr} WITHOUT TLS (--tcp-insecure): anyone who reaches it \
                 can read and write every export"
            );
        }
        let options = SessionOptions {
            engine,
            queue_depth: config.queue_depth,
            engine_watches_socket: true,
            forward_hold: std::time::Duration::from_millis(config.forward_hold_ms),
            tls,
            limits: config.limits.nbd(),
        };
        let nbd = NbdServer::start(Some(&config.socket), config.tcp, exports.clone(), options)
            .map_err(AgentError::Listen)?;
        if let Some(group) = &config.socket_group {
            open_to_group(&config.socket, group).map_err(|source| AgentError::SocketGroup {
                group: group.clone(),
                source,
            })?;
        }
        let nbd_tcp = nbd.tcp_addr.map(|addr| addr.to_string());
        let targets = Arc::new(Targets::new(
            exports.clone(),
            config.image_dir.clone(),
            nbd_tcp,
            journal.clone(),
            Arc::clone(&fencing),
        ));
        let transfer = crate::transfer::serve(
            config.transfer,
            key.clone(),
            targets,
            config.limits.stream(),
        )
        .map_err(AgentError::Transfer)?;
        let transfer_addr = transfer.local_addr();
        // Before the API answers: leases kept here count as renewed now (the restart rule).
        let witness = WitnessService::open(
            config.state_dir.join(witness::LEASE_DIR),
            Arc::new(MonotonicClock::new()),
            witness::PAIRS_MAX,
        );
        let token_path = config.state_dir.join("api.token");
        let token = api::token::load_or_create(&token_path).map_err(state_err)?;
        let control = Arc::new(AgentControl {
            exports: exports.clone(),
            trackers: Trackers::new(exports.clone()),
            seeds: Seeds::new(
                exports.clone(),
                journal.clone(),
                key.clone(),
                config.image_dir.clone(),
                config.state_dir.join("seeds"),
            ),
            migrations: Migrations::new(
                exports.clone(),
                key,
                journal,
                transfer_addr.to_string(),
                Arc::clone(&fencing) as _,
            ),
            fencing,
            witness,
        });
        let options = api::ServeOptions {
            metrics_open: !config.metrics_auth,
            metrics: config.metrics,
            tls: api_tls(config)?,
        };
        let scheme = if options.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let api = api::serve_with(config.api, token, control, &options).map_err(AgentError::Api)?;
        let api_addr = api.local_addr();
        if let Some(metrics_addr) = api.metrics_addr() {
            log::info!("/metrics without token on http://{metrics_addr}/metrics");
        }
        log::info!(
            "agent up: nbd unix {}{}, api {scheme}://{api_addr}, migrations on {transfer_addr}, \
             engine {engine:?}, state {}",
            config.socket.display(),
            nbd.tcp_addr
                .map(|a| format!(", nbd tcp {a}"))
                .unwrap_or_default(),
            config.state_dir.display()
        );
        Ok(Agent {
            exports,
            nbd,
            api: Some(api),
            api_addr,
            transfer: Some(transfer),
            transfer_addr,
            token_path,
        })
    }

    /// The control API's bound address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The block-stream listener's bound address.
    pub fn transfer_addr(&self) -> SocketAddr {
        self.transfer_addr
    }

    /// The file holding the API token.
    pub fn token_path(&self) -> &Path {
        &self.token_path
    }

    /// The exports.
    pub fn exports(&self) -> &Arc<Exports> {
        &self.exports
    }

    /// Clean stop: stop the API and the listeners, drain connections, sync, save trackers.
    pub fn shutdown(&mut self) -> Result<(), AgentError> {
        if let Some(api) = self.api.take() {
            api.shutdown();
        }
        if let Some(transfer) = self.transfer.take() {
            transfer.shutdown();
        }
        let left = self.nbd.shutdown(DRAIN_GRACE);
        let mut problems = Vec::new();
        if left > 0 {
            problems.push(format!("{left} connection(s) did not drain"));
        }
        if !self.exports.sync_all() {
            problems.push("an image could not be synced".to_string());
        }
        if !self.exports.save_trackers() {
            problems.push("a tracker could not be saved".to_string());
        }
        if problems.is_empty() {
            log::info!("agent stopped cleanly");
            Ok(())
        } else {
            Err(AgentError::Unclean(problems.join("; ")))
        }
    }
}

/// The control API's TLS configuration, if configured; warns when the API is served in
/// plain HTTP beyond loopback (`api_insecure`).
fn api_tls(config: &AgentConfig) -> Result<Option<api::tls::ServerTls>, AgentError> {
    let Some(dir) = &config.api_tls_creds else {
        if !api::tls::is_local(config.api) {
            log::warn!(
                "control API on {} WITHOUT TLS (--api-insecure): the API token and every \
                 command cross the network readable",
                config.api
            );
        }
        return Ok(None);
    };
    let tls = api::tls::ServerTls::load(dir).map_err(|source| AgentError::ApiTls {
        path: dir.clone(),
        source,
    })?;
    Ok(Some(tls))
}

/// The cluster key: read from `path`, or created there (0600) on first start.
fn load_cluster_key(path: &Path) -> Result<ClusterKey, AgentError> {
    if path.exists() {
        ClusterKey::load(path).map_err(AgentError::ClusterKey)
    } else {
        log::info!(
            "creating cluster key {} (copy it to the agents this one migrates with)",
            path.display()
        );
        ClusterKey::create(path).map_err(AgentError::ClusterKey)
    }
}

fn choose_engine(choice: EngineChoice) -> Result<EngineKind, AgentError> {
    match choice {
        EngineChoice::Sync => Ok(EngineKind::Sync),
        EngineChoice::Uring => probe_uring()
            .map(|()| EngineKind::Uring)
            .map_err(|err| AgentError::NoUring(error_chain(&err))),
        EngineChoice::Auto => match probe_uring() {
            Ok(()) => Ok(EngineKind::Uring),
            Err(err) => {
                log::warn!(
                    "io_uring unavailable ({}): using the pread/pwrite engine",
                    error_chain(&err)
                );
                Ok(EngineKind::Sync)
            }
        },
    }
}

/// Runs the agent until SIGTERM or SIGINT, then stops it cleanly.
pub fn run(config: &AgentConfig) -> Result<(), AgentError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    // Installed before anything starts, so a signal during start-up still stops cleanly.
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(AgentError::Signals)?;
    let mut agent = Agent::start(config)?;
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal}: stopping");
    }
    let stopped = agent.shutdown();
    // The process exits next: the exports' memory (millions of tracker chunks on a large
    // host) goes back with it, not one free at a time, which took most of a clean stop.
    if stopped.is_ok() {
        std::process::exit(0);
    }
    stopped
}

/// Lets `group` connect to the unix socket at `path` (group owner, mode 0660).
fn open_to_group(path: &Path, group: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let found = nix::unistd::Group::from_name(group).map_err(std::io::Error::from)?;
    let Some(found) = found else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no such group",
        ));
    };
    nix::unistd::chown(path, None, Some(found.gid)).map_err(std::io::Error::from)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
}
