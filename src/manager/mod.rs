//! `ferry manager`: the control plane over many agents, run as an active/standby pair whose
//! active is decided by a lease on a witness agent (DESIGN.md capability 4,
//! `docs/manager-lease.md`).
//!
//! ```text
//!  operator / ferry CLI ──HTTP──► service (status, takeover, drains, fleet status;
//!                                  the standby redirects writes to the active)
//!  peer manager ◄──HTTP── peer sender        ▲ status, epoch
//!                          ▲                 │
//!                 runtime: one thread owns lease::role::Role, ticks it, saves its state
//!                          │ per-host queues
//!  agents ◄──HTTP── host workers: lease requests to the witness, pings (with the epoch)
//! ```
//!
//! The manager talks to agents only through the API client ([`link::HttpTransport`]).
//! Invariants: those of [`crate::lease::role`] (the pure decisions) and
//! [`runtime`] (state saved before anything depending on it is sent; the loop never blocks
//! on the network).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::api::fleet::{AgentView, ManagerStatus, PeerView};
use crate::env::{Clock, MonotonicClock};
use crate::lease::role::{Role, RoleConfig, Rules};

pub mod batches;
pub mod config;
pub mod fleet;
pub mod link;
pub mod runtime;
pub mod service;
pub mod shared;
pub mod state;
pub mod workers;

pub use config::{ConfigError, ManagerConfig, Overrides};

/// Why the manager could not run.
#[derive(Debug, Error)]
pub enum ManagerError {
    /// The role state could not be read.
    #[error("role state")]
    State(#[from] state::StateError),
    /// The fleet token could not be read.
    #[error("cannot read the API token {}", path.display())]
    Token {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The API address is not an address.
    #[error("listen address {0:?} is not host:port")]
    Listen(String),
    /// The API server could not start.
    #[error("API server")]
    Api(#[from] crate::api::ApiError),
    /// A thread could not start.
    #[error("cannot start a thread")]
    Spawn(#[source] std::io::Error),
    /// The TLS credentials could not be loaded.
    #[error("TLS credentials")]
    Tls(#[source] crate::nbd::tls::TlsError),
    /// The signal handler could not be installed.
    #[error("cannot install signal handlers")]
    Signals(#[source] std::io::Error),
}

/// API worker threads of the manager.
const API_WORKERS: usize = 4;

/// A running manager: its API address and a handle to stop it.
#[derive(Debug)]
pub struct Running {
    shared: Arc<Shared>,
    api: crate::api::listen::Running,
}

use runtime::{Input, Runtime, Shared, Workers};

impl Running {
    /// The API's bound address.
    pub fn api_addr(&self) -> std::net::SocketAddr {
        self.api.local_addr()
    }

    /// Stops every thread.
    pub fn stop(mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.api.stop();
    }
}

/// Starts a manager reaching its agents and its peer over their HTTP APIs.
pub fn start(config: ManagerConfig, token: String) -> Result<Running, ManagerError> {
    let (server_tls, client_tls) = match &config.tls_creds {
        Some(dir) => (
            Some(crate::api::tls::ServerTls::load(dir).map_err(ManagerError::Tls)?),
            Some(crate::api::tls::ClientTlsOptions::load(dir, None).map_err(ManagerError::Tls)?),
        ),
        None => (None, None),
    };
    let state = state::StateFile::new(&config.state_dir)?;
    let durable = state.load()?;
    log::info!(
        "manager {} (pair {}): starting standby; witness {:?}, known epoch {}",
        config.id,
        config.pair,
        durable.choice,
        durable.known_epoch
    );
    let role = Role::new(role_config(&config), durable);
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
    let shared = Arc::new(Shared::new(initial_status(&config), clock.clone()));
    let (inputs_tx, inputs_rx) = crossbeam_channel::unbounded::<Input>();
    let fleet = Arc::new(fleet::Fleet::load(
        &config.state_dir,
        &config.agents,
        &token,
        client_tls.as_ref(),
        link::quick_timeout(&config),
    ));
    let transport = Arc::new(link::HttpTransport::new(
        &config,
        fleet.clone(),
        &token,
        client_tls.as_ref(),
    ));
    let ping = Duration::from_millis(u64::from(config.lease.renew_interval_ms));
    let workers = Workers::start(fleet.clone(), transport, &inputs_tx, ping, &shared)
        .map_err(ManagerError::Spawn)?;
    let runtime = Runtime::new(role, state, clock, inputs_rx, workers, shared.clone());
    std::thread::Builder::new()
        .name("mgr-lease".into())
        .spawn(move || runtime.run())
        .map_err(ManagerError::Spawn)?;
    let addr = config
        .listen
        .parse()
        .map_err(|_| ManagerError::Listen(config.listen.clone()))?;
    let driver = Arc::new(batches::Driver::new(
        batches::BatchStore::new(&config.state_dir),
        fleet.clone(),
        shared.clone(),
    ));
    let driving = driver.clone();
    std::thread::Builder::new()
        .name("mgr-batches".into())
        .spawn(move || driving.run())
        .map_err(ManagerError::Spawn)?;
    let channels = (inputs_tx, shared.clone());
    let service = service::ManagerService::new(
        token,
        config,
        channels,
        client_tls.as_ref(),
        (driver, fleet),
    );
    let api =
        crate::api::listen::start_tls(addr, API_WORKERS, "mgr-api", Arc::new(service), server_tls)?;
    Ok(Running { shared, api })
}

/// Runs the manager configured by `config` over HTTP until SIGTERM or SIGINT.
pub fn run(config: ManagerConfig) -> Result<(), ManagerError> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let token =
        crate::api::token::read(&config.token_file).map_err(|source| ManagerError::Token {
            path: config.token_file.clone(),
            source,
        })?;
    let mut signals =
        signal_hook::iterator::Signals::new([SIGTERM, SIGINT]).map_err(ManagerError::Signals)?;
    let running = start(config, token)?;
    log::info!("manager API on {}", running.api_addr());
    if let Some(signal) = signals.forever().next() {
        log::info!("signal {signal}: stopping");
    }
    running.stop();
    Ok(())
}

fn role_config(config: &ManagerConfig) -> RoleConfig {
    RoleConfig {
        me: config.id.clone(),
        peer: config.peer_id.clone(),
        bounds: config.lease.bounds(),
        renew_interval_ms: config.lease.renew_interval_ms,
        reach_timeout_ms: config.lease.renew_interval_ms * 5 / 2,
        rules: Rules::default(),
    }
}

fn initial_status(config: &ManagerConfig) -> ManagerStatus {
    ManagerStatus {
        id: config.id.to_string(),
        pair: config.pair.clone(),
        lease_ms: config.lease.lease_ms,
        renew_interval_ms: config.lease.renew_interval_ms,
        peer: PeerView {
            id: config.peer_id.to_string(),
            address: config.peer_address.clone(),
            ..PeerView::default()
        },
        agents: config
            .agents
            .iter()
            .map(|agent| AgentView {
                name: agent.name.clone(),
                address: agent.address.clone(),
                heard_ms_ago: None,
            })
            .collect(),
        ..ManagerStatus::default()
    }
}
