//! The control API: HTTP/JSON on `127.0.0.1:7450` (by default), served by a few worker
//! threads on `tiny_http`, and its `ureq` client for the CLI.
//!
//! ```text
//!  ferry CLI ── Client (ureq) ──HTTP──► tiny_http ─► workers ─► server::route ─► dyn Control
//!  curl /metrics ─────────────────────┘                                     (agent::Registry)
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
//! - Every route except `GET /metrics` requires `Authorization: Bearer <token>`; the token is
//!   compared in constant time. `/metrics` holds counters only, no names beyond export and
//!   tracker names, and is what a local Prometheus scrapes without the token.
//! - Errors are `{"error": "..."}` with a status from [`ControlError::http_status`]; request
//!   bodies are capped at [`server::MAX_BODY_BYTES`]; bad input is a 4xx, never a panic.
//! - [`ApiServer::shutdown`] returns promptly: each worker is woken with `Server::unblock`,
//!   finishes the request it holds, and is joined.

pub mod batch;
pub mod client;
pub mod prometheus;
pub mod render;
pub mod server;
#[cfg(test)]
mod tests;
pub mod token;
pub mod types;
pub mod view;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

pub use client::{Client, ClientError};
use types::{
    DiskStatus, ExportSpec, ExportStatus, HeatMap, JobStatus, JournalJob, MigrateRequest,
    TrackerAdd, TrackerStatus,
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
    /// The stale images migrations left here; removed unless `dry_run` (`ferry export gc`).
    fn collect_stale(&self, dry_run: bool) -> Result<Vec<types::StaleImage>, ControlError> {
        let _ = dry_run;
        Ok(Vec::new())
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
}

impl ControlError {
    /// The HTTP status this error is answered with. Exhaustive: a new variant must decide.
    pub fn http_status(&self) -> u16 {
        match self {
            ControlError::Invalid(_) => 400,
            ControlError::Exists(_) | ControlError::Busy(_) => 409,
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
    #[error("cannot start an API worker thread")]
    Spawn(#[source] std::io::Error),
}

/// A running API server; [`ApiServer::shutdown`] (or dropping it) stops it.
pub struct ApiServer {
    http: Arc<tiny_http::Server>,
    local_addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServer")
            .field("local_addr", &self.local_addr)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// Binds `addr` and answers API requests against `control` until shut down.
pub fn serve(
    addr: SocketAddr,
    token: String,
    control: Arc<dyn Control>,
) -> Result<ApiServer, ApiError> {
    assert!(!token.is_empty(), "an empty token would let anyone in");
    let http = tiny_http::Server::http(addr).map_err(|err| ApiError::Bind {
        addr,
        source: match err.downcast::<std::io::Error>() {
            Ok(io) => *io,
            Err(other) => std::io::Error::other(other),
        },
    })?;
    let local_addr = http
        .server_addr()
        .to_ip()
        .expect("a TCP listener has an IP address");
    let mut server = ApiServer {
        http: Arc::new(http),
        local_addr,
        stopping: Arc::new(AtomicBool::new(false)),
        workers: Vec::with_capacity(WORKERS),
    };
    let context = Arc::new(server::Context::new(token, control));
    for index in 0..WORKERS {
        let http = server.http.clone();
        let stopping = server.stopping.clone();
        let context = context.clone();
        let worker = std::thread::Builder::new()
            .name(format!("ferry-api-{index}"))
            .spawn(move || server::worker(&http, &stopping, &context))
            // Dropping `server` stops the workers already started.
            .map_err(ApiError::Spawn)?;
        server.workers.push(worker);
    }
    Ok(server)
}

impl ApiServer {
    /// The bound address (the real port when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops taking requests, lets each worker finish the one it holds, and joins them.
    pub fn shutdown(mut self) {
        self.stop();
        log::info!("control API on {} stopped", self.local_addr);
    }

    /// Idempotent: the second call finds no workers.
    fn stop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // One unblock wakes one worker, so one per worker.
        for _ in &self.workers {
            self.http.unblock();
        }
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                log::error!("an API worker panicked");
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}
