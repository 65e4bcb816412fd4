//! The control API: HTTP/JSON on `127.0.0.1:7450` (by default), served by ferry's own small
//! HTTP/1.1 server ([`listen`]: one poll(2) listener thread, [`WORKERS`] fixed workers;
//! [`http`]: request heads on `httparse`), and its `ureq` client for the CLI.
//!
//! ```text
//!  ferry CLI ── Client (ureq) ──HTTP──► listen ─► workers ─► server::route ─► dyn Control
//!  curl -H 'Authorization: Bearer ..' /metrics ┘                          (agent::Registry)
//!  Prometheus ──► metrics address (optional) ─► listen ─► server::MetricsOnly
//! ```
//!
//! Routes (all JSON; see [`server`] for the details):
//!
//! | method | path                                      | body        | answer          |
//! |--------|-------------------------------------------|-------------|-----------------|
//! | GET    | /v1/exports                               |             | [ExportStatus]  |
//! | POST   | /v1/exports                               | ExportSpec  | 201 ExportStatus|
//! | GET    | /v1/exports/{name}                        |             | ExportStatus    |
//! | DELETE | /v1/exports/{name}?force=true             |             | 204             |
//! | GET    | /v1/exports/{name}/trackers               |             | [TrackerStatus] |
//! | POST   | /v1/exports/{name}/trackers               | TrackerAdd  | 201 TrackerStatus|
//! | DELETE | /v1/exports/{name}/trackers/{tracker}     |             | 204             |
//! | GET    | /v1/exports/{name}/heat?tracker=T&cells=N |             | HeatMap         |
//! | POST   | /v1/exports/{name}/migrate                | MigrateRequest | 202 JobStatus |
//! | GET    | /v1/jobs                                  |             | [JobStatus]     |
//! | GET    | /v1/jobs/{id}                             |             | JobStatus       |
//! | POST   | /v1/jobs/{id}/abort                       |             | AbortOutcome    |
//! | GET    | /v1/status?batch=B                        |             | [DiskStatus]    |
//! | GET    | /v1/journal/jobs?batch=B                  |             | [JournalJob]    |
//! | POST   | /v1/leases/{pair}                         | LeaseCall   | LeaseReply      |
//! | GET    | /v1/leases                                |             | [`leases::LeaseStatus`] |
//! | GET    | /metrics                                  |             | Prometheus text |
//!
//! `GET /v1/status` is `ferry status`: the agent judges every job of its journal (of batch
//! `B` only, when given), asking each destination agent over the block stream, so it can
//! take a few seconds per unreachable destination. `GET /v1/journal/jobs` lists the
//! journal's jobs as they are (what `ferry resume` and `ferry abort` pick from). `batch`
//! is a name (1 to 64 of `[A-Za-z0-9._-]`, not starting with '.'); any other query
//! parameter is refused.
//!
//! Invariants:
//! - Every route requires `Authorization: Bearer <token>`, `GET /metrics` included (it shows
//!   export names, sizes and each guest's I/O) unless `metrics_auth = false`; the token is
//!   compared in constant time. A Prometheus scraper without the token gets `/metrics` alone
//!   on a separate address ([`ServeOptions::metrics`]), bound where only it can reach.
//! - Errors are `{"error": "..."}` with a status from [`ControlError::http_status`]; request
//!   bodies are read only with the token and capped at [`server::MAX_BODY_BYTES`]; bad input
//!   is a 4xx, never a panic; what a peer can make the agent hold before authentication is
//!   bounded (see [`listen`]).
//! - Fencing: a request carrying [`http::MANAGER_EPOCH_HEADER`] (a `ferry manager`'s) is
//!   routed only once [`Control::admit_epoch`] admitted its epoch, after authentication (an
//!   unauthenticated caller never moves the fence); a stale epoch is 409 and the command does
//!   nothing. Requests without the header (the operator's CLI) are not fenced. The lease
//!   routes ([`leases`]) are never fenced: a request there with the header is a 400.
//! - On a routable address the API is TLS only ([`tls`]; the agent's configuration refuses
//!   plain HTTP there unless told `api_insecure`): mutual certificates, and the token too.
//! - [`ApiServer::shutdown`] returns promptly: the listener is woken and joined, idle
//!   connections close, each worker finishes the request it holds and is joined.

pub mod batch;
pub mod client;
pub mod fleet;
pub mod http;
pub mod leases;
pub mod listen;
pub mod prometheus;
pub mod render;
pub mod request;
pub mod server;
#[cfg(test)]
mod tests;
pub mod tls;
pub mod token;
pub mod types;
pub mod view;
mod worker;

use std::net::SocketAddr;
use std::sync::Arc;

pub use client::{Client, ClientError};
use types::{
    DiskStatus, ExportSpec, ExportStatus, HeatMap, JobStatus, JournalJob, MigrateRequest,
    SeedExportRequest, SeedImportRequest, SeedInfo, SeedInspectRequest, SeedRunStatus,
    SeedSyncRequest, TrackerAdd, TrackerStatus,
};

/// Default control API address: where an agent listens and a client calls.
pub const DEFAULT_API: &str = "127.0.0.1:7450";
/// Default state directory of an agent (trackers, runtime exports, journal, API token,
/// cluster key): where a client finds the token, and `ferry status --offline` the journal.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ferry";

/// Worker threads answering API requests. Requests are short (a status read, an export
/// open); a few workers keep a slow heat map from blocking `/metrics` scrapes.
pub const WORKERS: usize = 4;

/// What the API controls: implemented by `agent::Registry`, and by fakes in the tests.
pub trait Control: Send + Sync {
    /// Every export with its trackers and counters.
    fn exports(&self) -> Vec<ExportStatus>;
    /// Opens and serves a new export (remembered across restarts).
    fn add_export(&self, spec: ExportSpec) -> Result<ExportStatus, ControlError>;
    /// Stops serving an export; with `force`, closes its live connections, else refuses
    /// while it has any ([`ControlError::Busy`]).
    fn remove_export(&self, name: &str, force: bool) -> Result<(), ControlError>;
    /// The trackers of an export.
    fn trackers(&self, export: &str) -> Result<Vec<TrackerStatus>, ControlError>;
    /// Starts a tracker on an export.
    fn add_tracker(&self, export: &str, add: TrackerAdd) -> Result<TrackerStatus, ControlError>;
    /// Removes a tracker and its saved state.
    fn remove_tracker(&self, export: &str, tracker: &str) -> Result<(), ControlError>;
    /// The heat of a tracker (the export's first when `None`) in about `cells` cells.
    fn heat(
        &self,
        export: &str,
        tracker: Option<&str>,
        cells: usize,
    ) -> Result<HeatMap, ControlError>;
    /// Starts migrating an export to another agent.
    fn migrate(&self, export: &str, request: MigrateRequest) -> Result<JobStatus, ControlError> {
        let _ = request;
        Err(ControlError::Invalid(format!(
            "this agent cannot migrate '{export}'"
        )))
    }
    /// Every migration job.
    fn jobs(&self) -> Vec<JobStatus> {
        Vec::new()
    }
    /// One migration job.
    fn job(&self, id: u64) -> Result<JobStatus, ControlError> {
        Err(ControlError::NotFound(format!("no job {id}")))
    }
    /// Rolls an uncommitted migration back on both sides (`ferry abort`).
    fn abort_job(&self, id: u64) -> Result<types::AbortOutcome, ControlError> {
        Err(ControlError::NotFound(format!("no job {id}")))
    }
    /// `ferry status`: each job of this agent's journal (of `batch` only, if given), judged
    /// with what the other side's journal says.
    fn migration_status(&self, batch: Option<&str>) -> Result<Vec<DiskStatus>, ControlError> {
        let _ = batch;
        Err(ControlError::NotFound("this agent keeps no journal".into()))
    }
    /// The jobs of this agent's journal (of `batch` only, if given).
    fn journal_jobs(&self, batch: Option<&str>) -> Result<Vec<JournalJob>, ControlError> {
        let _ = batch;
        Ok(Vec::new())
    }
    /// Starts copying exports onto a seed's media (`ferry seed export`).
    fn seed_export(&self, request: SeedExportRequest) -> Result<SeedRunStatus, ControlError> {
        let _ = request;
        Err(ControlError::Invalid("this agent keeps no seeds".into()))
    }
    /// Starts importing a seed into images here (`ferry seed import`).
    fn seed_import(&self, request: SeedImportRequest) -> Result<SeedRunStatus, ControlError> {
        let _ = request;
        Err(ControlError::Invalid("this agent keeps no seeds".into()))
    }
    /// What is on a medium (`ferry seed ls|show|verify`).
    fn seed_inspect(&self, request: SeedInspectRequest) -> Result<SeedInfo, ControlError> {
        let _ = request;
        Err(ControlError::Invalid("this agent keeps no seeds".into()))
    }
    /// The seed exports and imports since the agent started.
    fn seeds(&self) -> Vec<SeedRunStatus> {
        Vec::new()
    }
    /// One seed run, by seed id (hex).
    fn seed(&self, seed_id: &str) -> Result<SeedRunStatus, ControlError> {
        Err(ControlError::NotFound(format!("no seed run {seed_id}")))
    }
    /// Stops a running seed export or import (an export continues with `--resume`).
    fn seed_stop(&self, seed_id: &str) -> Result<SeedRunStatus, ControlError> {
        Err(ControlError::NotFound(format!("no seed run {seed_id}")))
    }
    /// Starts the catch-up of an export's seed (`ferry seed sync`).
    fn seed_sync(&self, export: &str, request: SeedSyncRequest) -> Result<JobStatus, ControlError> {
        let _ = request;
        Err(ControlError::Invalid(format!(
            "this agent cannot sync '{export}'"
        )))
    }
    /// Asks a running job to stop after its current run (a continuous replication).
    fn stop_job(&self, id: u64) -> Result<JobStatus, ControlError> {
        Err(ControlError::NotFound(format!("no job {id}")))
    }
    /// The stale images migrations left here; removed unless `dry_run` (`ferry export gc`).
    fn collect_stale(&self, dry_run: bool) -> Result<Vec<types::StaleImage>, ControlError> {
        let _ = dry_run;
        Ok(Vec::new())
    }
    /// Admits a manager's command of `epoch` before it is routed: refuses an epoch lower than
    /// the highest seen ([`ControlError::StaleEpoch`]), and persists a higher one durably
    /// before returning. The command runs while the returned hold lives. The default refuses
    /// every manager command, so a `Control` that keeps no fence never obeys one unfenced.
    fn admit_epoch(&self, epoch: u64) -> Result<EpochHold<'_>, ControlError> {
        let _ = epoch;
        Err(ControlError::Invalid(
            "this agent takes no manager commands".into(),
        ))
    }
    /// The highest manager epoch admitted (0 before any); the `ferry_manager_epoch` gauge.
    fn manager_epoch(&self) -> u64 {
        0
    }
    /// Decides a manager's lease request for `pair`, this agent being the pair's witness.
    /// `pair` and `call` were checked ([`leases::LeaseCall::check`]).
    fn lease(
        &self,
        pair: &str,
        call: &leases::LeaseCall,
    ) -> Result<leases::LeaseReply, ControlError> {
        let _ = (pair, call);
        Err(ControlError::Invalid("this agent keeps no leases".into()))
    }
    /// The leases kept as witness, by pair.
    fn leases(&self) -> Vec<leases::LeaseStatus> {
        Vec::new()
    }
    /// The witness's gauge and counter for `/metrics`.
    fn witness_counters(&self) -> leases::WitnessCounters {
        leases::WitnessCounters::default()
    }
}

/// Keeps an admitted epoch current while the command it admitted runs: until the hold is
/// dropped the agent admits no higher epoch, so a newer manager's first command starts only
/// after every command of an older epoch has ended.
pub struct EpochHold<'a> {
    _guard: Box<dyn Held + 'a>,
}

/// Anything an [`EpochHold`] keeps alive (it is only dropped, never used).
trait Held {}
impl<T> Held for T {}

impl<'a> EpochHold<'a> {
    /// A hold that keeps `guard` (e.g. a read guard on the fence) until dropped.
    pub fn new<G: 'a>(guard: G) -> Self {
        EpochHold {
            _guard: Box::new(guard),
        }
    }
}

impl std::fmt::Debug for EpochHold<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EpochHold").finish_non_exhaustive()
    }
}

/// Why a control operation was refused. Each message is a sentence naming the export or
/// tracker, shown to the user as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// The request is malformed or names something invalid (HTTP 400).
    #[error("{0}")]
    Invalid(String),
    /// The export or tracker already exists (HTTP 409).
    #[error("{0}")]
    Exists(String),
    /// No such export or tracker (HTTP 404).
    #[error("{0}")]
    NotFound(String),
    /// The export is in use (HTTP 409).
    #[error("{0}")]
    Busy(String),
    /// The agent failed to open, save or remove a file (HTTP 500).
    #[error("{0}")]
    Io(String),
    /// A manager command of an epoch older than one the agent has seen (HTTP 409).
    #[error(transparent)]
    StaleEpoch(#[from] crate::lease::fence::StaleEpoch),
}

impl ControlError {
    /// The HTTP status this error is answered with. Exhaustive: a new variant must decide.
    pub fn http_status(&self) -> u16 {
        match self {
            ControlError::Invalid(_) => 400,
            ControlError::Exists(_) | ControlError::Busy(_) | ControlError::StaleEpoch(_) => 409,
            ControlError::NotFound(_) => 404,
            ControlError::Io(_) => 500,
        }
    }
}

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The address could not be bound (in use, not local, no permission).
    #[error("cannot listen on {addr}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A worker thread could not be started.
    #[error("cannot start an API thread")]
    Spawn(#[source] std::io::Error),
    /// The listener's wake-up socket pair could not be made.
    #[error("cannot set up the API listener")]
    Setup(#[source] std::io::Error),
}

/// How the API is served besides its address and token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeOptions {
    /// `/metrics` answers without the token on the API address (`metrics_auth = false`).
    pub metrics_open: bool,
    /// Also serve `/metrics` alone, without the token, on this address.
    pub metrics: Option<SocketAddr>,
    /// Serve the API address over TLS only (mutual; the token is still required). The
    /// separate `/metrics` address stays plain.
    pub tls: Option<tls::ServerTls>,
}

/// A running API server; [`ApiServer::shutdown`] (or dropping it) stops it.
#[derive(Debug)]
pub struct ApiServer {
    api: listen::Running,
    metrics: Option<listen::Running>,
}

/// Binds `addr` and answers API requests against `control` until shut down; `/metrics`
/// needs the token too.
pub fn serve(
    addr: SocketAddr,
    token: String,
    control: Arc<dyn Control>,
) -> Result<ApiServer, ApiError> {
    serve_with(addr, token, control, &ServeOptions::default())
}

/// [`serve`], with `options`. Every thread is started here; failing to start one is an error.
pub fn serve_with(
    addr: SocketAddr,
    token: String,
    control: Arc<dyn Control>,
    options: &ServeOptions,
) -> Result<ApiServer, ApiError> {
    assert!(!token.is_empty(), "an empty token would let anyone in");
    let context = server::Context::new(token, !options.metrics_open, control.clone());
    let service = Arc::new(context);
    let api = listen::start_tls(addr, WORKERS, "ferry-api", service, options.tls.clone())?;
    let metrics = match options.metrics {
        None => None,
        Some(metrics_addr) => {
            let service = Arc::new(server::MetricsOnly::new(control));
            // Dropping `api` on an error stops it.
            Some(listen::start(metrics_addr, 1, "ferry-metrics", service)?)
        }
    };
    Ok(ApiServer { api, metrics })
}

impl ApiServer {
    /// The bound address (the real port when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.api.local_addr()
    }

    /// The bound address of the separate `/metrics` listener, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(listen::Running::local_addr)
    }

    /// Stops taking requests, lets each worker finish the one it holds, and joins them.
    pub fn shutdown(mut self) {
        self.api.stop();
        if let Some(metrics) = self.metrics.as_mut() {
            metrics.stop();
        }
        log::info!("control API on {} stopped", self.api.local_addr());
    }
}
