//! The control API client used by the CLI (every subcommand but `ferry agent` and
//! `ferry status --offline`) and by `ferry demo`.
//!
//! Invariants: every error names the agent's address and says what went wrong in the
//! agent's own words (`agent at 127.0.0.1:7450: no export named 'x'`); path segments are
//! percent-encoded, so no name can change which route is called; the token is sent only in
//! the `Authorization` header and never appears in `Debug` output or errors.
//!
//! An agent on a routable address answers over TLS only ([`Client::with_tls`]: mutual
//! certificates from a credential directory, the agent's name checked), still with the token.
//!
//! A `ferry manager` sends its epoch with every call ([`Client::with_epoch`], header
//! [`MANAGER_EPOCH_HEADER`]); an agent that has seen a newer manager answers
//! [`ClientError::StaleEpoch`], and the caller must stop acting as the active manager.
//! Lease requests to the witness ([`Client::lease`]) never carry it: they are not fenced.

use std::io::{self, Read};
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::http::MANAGER_EPOCH_HEADER;
use super::leases::{LeaseCall, LeaseReply, LeaseStatus};
use super::tls::ClientTlsOptions;
use super::types::{
    AbortOutcome, DiskStatus, ErrorBody, ExportSpec, ExportStatus, HeatMap, JobStatus, JournalJob,
    MigrateRequest, SeedExportRequest, SeedImportRequest, SeedInfo, SeedInspectRequest,
    SeedRunStatus, SeedSyncRequest, StaleImage, TrackerAdd, TrackerStatus,
};

/// How long to wait for the agent to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one call may take (adding an export opens and locks an image).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest error body read from a non-ferry server.
const ERROR_BODY_MAX_BYTES: u64 = 4096;

/// Errors from calling the agent.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The agent could not be reached: not running, or another address.
    #[error("cannot reach the agent at {addr}")]
    Unreachable {
        /// The agent's address as given.
        addr: String,
        /// What the HTTP client saw.
        #[source]
        source: Box<ureq::Transport>,
    },
    /// The agent refused the token (HTTP 401).
    #[error("agent at {addr}: {message} (is the token file the agent's?)")]
    Unauthorized {
        /// The agent's address as given.
        addr: String,
        /// The agent's explanation.
        message: String,
    },
    /// The agent refused or failed the request.
    #[error("agent at {addr}: {message}")]
    Rejected {
        /// The agent's address as given.
        addr: String,
        /// HTTP status: 400 invalid, 404 not found, 409 exists or busy, 500 agent I/O error.
        status: u16,
        /// The agent's explanation.
        message: String,
    },
    /// The agent has seen a newer manager epoch than the one sent (HTTP 409): a newer
    /// manager took over, and this call did nothing.
    #[error("agent at {addr}: {message}")]
    StaleEpoch {
        /// The agent's address as given.
        addr: String,
        /// The epoch sent.
        epoch: u64,
        /// The highest epoch the agent has seen.
        highest: u64,
        /// The agent's explanation.
        message: String,
    },
    /// The agent's answer could not be read or is not what the call expects.
    #[error("agent at {addr}: unreadable answer to {call}")]
    Decode {
        /// The agent's address as given.
        addr: String,
        /// The call, e.g. `GET /v1/exports`.
        call: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl ClientError {
    /// The HTTP status the agent answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Unauthorized { .. } => Some(401),
            ClientError::Rejected { status, .. } => Some(*status),
            ClientError::StaleEpoch { .. } => Some(409),
            ClientError::Unreachable { .. } | ClientError::Decode { .. } => None,
        }
    }
}

/// A client of one agent's control API.
pub struct Client {
    http: ureq::Agent,
    addr: String,
    base_url: String,
    token: Option<String>,
    epoch: Option<u64>,
    /// TLS options ([`Client::with_tls`]), kept to rebuild `http` with another timeout.
    tls: Option<ClientTlsOptions>,
    /// Connect and call timeout ([`Client::with_timeout`]), when not the defaults.
    timeout: Option<Duration>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client of the agent at `addr` (`host:port`, or a `http://` URL), sending `token`.
    pub fn new(addr: &str, token: Option<String>) -> Self {
        let trimmed = addr.trim().trim_end_matches('/');
        let base_url = if trimmed.contains("://") {
            trimmed.to_string()
        } else {
            format!("http://{trimmed}")
        };
        let http = http_builder().build();
        Client {
            http,
            addr: addr.to_string(),
            base_url,
            token,
            epoch: None,
            tls: None,
            timeout: None,
        }
    }

    /// The same client over TLS: every call goes to `https://` (an `http://` address is
    /// dialled over TLS all the same), verifying the agent's certificate and showing the
    /// client's, as `tls` says.
    pub fn with_tls(mut self, tls: &ClientTlsOptions) -> Client {
        self.tls = Some(tls.clone());
        self.http = self.build_http();
        if let Some(rest) = self.base_url.strip_prefix("http://") {
            self.base_url = format!("https://{rest}");
        }
        self
    }

    /// The same client as a manager of `epoch`: every call carries it
    /// ([`MANAGER_EPOCH_HEADER`]), and the agent refuses it once a newer manager took over
    /// ([`ClientError::StaleEpoch`]).
    pub fn with_epoch(mut self, epoch: u64) -> Client {
        self.epoch = Some(epoch);
        self
    }

    /// `GET /v1/exports`
    pub fn exports(&self) -> Result<Vec<ExportStatus>, ClientError> {
        self.call_json("GET", "/v1/exports", &[], None)
    }

    /// `GET /v1/exports/{name}`
    pub fn export(&self, name: &str) -> Result<ExportStatus, ClientError> {
        self.call_json("GET", &format!("/v1/exports/{}", encode(name)), &[], None)
    }

    /// `POST /v1/exports`
    pub fn add_export(&self, spec: &ExportSpec) -> Result<ExportStatus, ClientError> {
        self.call_json("POST", "/v1/exports", &[], Some(json(spec)))
    }

    /// `DELETE /v1/exports/{name}?force=`
    pub fn remove_export(&self, name: &str, force: bool) -> Result<(), ClientError> {
        let path = format!("/v1/exports/{}", encode(name));
        let force = if force { "true" } else { "false" };
        self.call("DELETE", &path, &[("force", force)], None)
            .map(drop)
    }

    /// `GET /v1/stale-images` (`dry_run`: list them) or `DELETE /v1/stale-images` (remove
    /// them).
    pub fn collect_stale(&self, dry_run: bool) -> Result<Vec<StaleImage>, ClientError> {
        let method = if dry_run { "GET" } else { "DELETE" };
        self.call_json(method, "/v1/stale-images", &[], None)
    }

    /// `GET /v1/exports/{export}/trackers`
    pub fn trackers(&self, export: &str) -> Result<Vec<TrackerStatus>, ClientError> {
        let path = format!("/v1/exports/{}/trackers", encode(export));
        self.call_json("GET", &path, &[], None)
    }

    /// `POST /v1/exports/{export}/trackers`
    pub fn add_tracker(
        &self,
        export: &str,
        add: &TrackerAdd,
    ) -> Result<TrackerStatus, ClientError> {
        let path = format!("/v1/exports/{}/trackers", encode(export));
        self.call_json("POST", &path, &[], Some(json(add)))
    }

    /// `DELETE /v1/exports/{export}/trackers/{tracker}`
    pub fn remove_tracker(&self, export: &str, tracker: &str) -> Result<(), ClientError> {
        let path = format!(
            "/v1/exports/{}/trackers/{}",
            encode(export),
            encode(tracker)
        );
        self.call("DELETE", &path, &[], None).map(drop)
    }

    /// `GET /v1/exports/{export}/heat?tracker=&cells=`
    pub fn heat(
        &self,
        export: &str,
        tracker: Option<&str>,
        cells: usize,
    ) -> Result<HeatMap, ClientError> {
        let path = format!("/v1/exports/{}/heat", encode(export));
        let cells = cells.to_string();
        let mut query = vec![("cells", cells.as_str())];
        if let Some(tracker) = tracker {
            query.push(("tracker", tracker));
        }
        self.call_json("GET", &path, &query, None)
    }

    /// `POST /v1/exports/{export}/migrate`
    pub fn migrate(
        &self,
        export: &str,
        request: &MigrateRequest,
    ) -> Result<JobStatus, ClientError> {
        let path = format!("/v1/exports/{}/migrate", encode(export));
        self.call_json("POST", &path, &[], Some(json(request)))
    }

    /// `GET /v1/jobs`
    pub fn jobs(&self) -> Result<Vec<JobStatus>, ClientError> {
        self.call_json("GET", "/v1/jobs", &[], None)
    }

    /// `GET /v1/jobs/{id}`
    pub fn job(&self, id: u64) -> Result<JobStatus, ClientError> {
        self.call_json("GET", &format!("/v1/jobs/{id}"), &[], None)
    }

    /// `POST /v1/jobs/{id}/stop`
    pub fn stop_job(&self, id: u64) -> Result<JobStatus, ClientError> {
        self.call_json("POST", &format!("/v1/jobs/{id}/stop"), &[], None)
    }

    /// `POST /v1/seeds/export`
    pub fn seed_export(&self, request: &SeedExportRequest) -> Result<SeedRunStatus, ClientError> {
        self.call_json("POST", "/v1/seeds/export", &[], Some(json(request)))
    }

    /// `POST /v1/seeds/import`
    pub fn seed_import(&self, request: &SeedImportRequest) -> Result<SeedRunStatus, ClientError> {
        self.call_json("POST", "/v1/seeds/import", &[], Some(json(request)))
    }

    /// `POST /v1/seeds/inspect`
    pub fn seed_inspect(&self, request: &SeedInspectRequest) -> Result<SeedInfo, ClientError> {
        self.call_json("POST", "/v1/seeds/inspect", &[], Some(json(request)))
    }

    /// `GET /v1/seeds`
    pub fn seeds(&self) -> Result<Vec<SeedRunStatus>, ClientError> {
        self.call_json("GET", "/v1/seeds", &[], None)
    }

    /// `POST /v1/seeds/{id}/stop`
    pub fn seed_stop(&self, seed_id: &str) -> Result<SeedRunStatus, ClientError> {
        let path = format!("/v1/seeds/{}/stop", encode(seed_id));
        self.call_json("POST", &path, &[], None)
    }

    /// `GET /v1/seeds/{id}`
    pub fn seed(&self, seed_id: &str) -> Result<SeedRunStatus, ClientError> {
        self.call_json("GET", &format!("/v1/seeds/{}", encode(seed_id)), &[], None)
    }

    /// `POST /v1/exports/{export}/seed-sync`
    pub fn seed_sync(
        &self,
        export: &str,
        request: &SeedSyncRequest,
    ) -> Result<JobStatus, ClientError> {
        let path = format!("/v1/exports/{}/seed-sync", encode(export));
        self.call_json("POST", &path, &[], Some(json(request)))
    }

    /// `POST /v1/jobs/{id}/abort`
    pub fn abort_job(&self, id: u64) -> Result<AbortOutcome, ClientError> {
        self.call_json("POST", &format!("/v1/jobs/{id}/abort"), &[], None)
    }

    /// `GET /v1/status?batch=`: the agent judges its journal's jobs, asking their
    /// destinations (`ferry status`).
    pub fn migration_status(&self, batch: Option<&str>) -> Result<Vec<DiskStatus>, ClientError> {
        let query: Vec<(&str, &str)> = batch.map(|batch| ("batch", batch)).into_iter().collect();
        self.call_json("GET", "/v1/status", &query, None)
    }

    /// `GET /v1/journal/jobs?batch=`: the jobs of the agent's journal.
    pub fn journal_jobs(&self, batch: Option<&str>) -> Result<Vec<JournalJob>, ClientError> {
        let query: Vec<(&str, &str)> = batch.map(|batch| ("batch", batch)).into_iter().collect();
        self.call_json("GET", "/v1/journal/jobs", &query, None)
    }

    /// `POST /v1/leases/{pair}`: a lease request to the pair's witness. Sent without the
    /// manager epoch, even by a client [`Client::with_epoch`]: the witness never fences it.
    /// Refusals of the lease are `Ok` ([`LeaseReply::Refused`]); `Err` means undecided.
    pub fn lease(&self, pair: &str, call: &LeaseCall) -> Result<LeaseReply, ClientError> {
        let path = format!("/v1/leases/{}", encode(pair));
        self.unfenced()
            .call_json("POST", &path, &[], Some(json(call)))
    }

    /// `GET /v1/leases`: the leases the agent keeps as witness.
    pub fn leases(&self) -> Result<Vec<LeaseStatus>, ClientError> {
        self.unfenced().call_json("GET", "/v1/leases", &[], None)
    }

    /// This client without a manager epoch (same connection pool).
    fn unfenced(&self) -> Client {
        self.copy_with_epoch(None)
    }

    /// A copy sharing the connection pool, with `epoch`.
    fn copy_with_epoch(&self, epoch: Option<u64>) -> Client {
        Client {
            http: self.http.clone(),
            addr: self.addr.clone(),
            base_url: self.base_url.clone(),
            token: self.token.clone(),
            epoch,
            tls: self.tls.clone(),
            timeout: self.timeout,
        }
    }

    /// The HTTP agent for this client's TLS options and timeout.
    fn build_http(&self) -> ureq::Agent {
        let mut builder = http_builder();
        if let Some(timeout) = self.timeout {
            builder = builder.timeout_connect(timeout).timeout(timeout);
        }
        if let Some(tls) = &self.tls {
            builder = builder.tls_connector(tls.connector());
        }
        builder.build()
    }

    /// `GET /metrics` (Prometheus text).
    pub fn metrics(&self) -> Result<String, ClientError> {
        let response = self.call("GET", "/metrics", &[], None)?;
        response
            .into_string()
            .map_err(|source| self.decode_error("GET", "/metrics", source))
    }

    fn call_json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<T, ClientError> {
        let response = self.call(method, path, query, body)?;
        response
            .into_json()
            .map_err(|source| self.decode_error(method, path, source))
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        query: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<ureq::Response, ClientError> {
        let mut request = self
            .http
            .request(method, &format!("{}{path}", self.base_url));
        for (key, value) in query {
            request = request.query(key, value);
        }
        if let Some(token) = &self.token {
            request = request.set("Authorization", &format!("Bearer {token}"));
        }
        if let Some(epoch) = self.epoch {
            request = request.set(MANAGER_EPOCH_HEADER, &epoch.to_string());
        }
        let result = match body {
            Some(bytes) => request
                .set("Content-Type", "application/json")
                .send_bytes(&bytes),
            None => request.call(),
        };
        match result {
            // Redirects are not followed (a standby manager points to the active): an error
            // naming where to go, not a body to decode.
            Ok(response) if (300..400).contains(&response.status()) => {
                let status = response.status();
                Err(self.rejected(status, response))
            }
            Ok(response) => Ok(response),
            Err(ureq::Error::Status(status, response)) => Err(self.rejected(status, response)),
            Err(ureq::Error::Transport(transport)) => Err(ClientError::Unreachable {
                addr: self.addr.clone(),
                source: Box::new(transport),
            }),
        }
    }

    #[cold]
    fn rejected(&self, status: u16, response: ureq::Response) -> ClientError {
        let status_text = response.status_text().to_string();
        let mut text = String::new();
        let read = response
            .into_reader()
            .take(ERROR_BODY_MAX_BYTES)
            .read_to_string(&mut text);
        let body = serde_json::from_str::<ErrorBody>(&text);
        if let Ok(ErrorBody {
            error,
            stale_epoch: Some(stale),
        }) = &body
        {
            return ClientError::StaleEpoch {
                addr: self.addr.clone(),
                epoch: stale.epoch,
                highest: stale.highest,
                message: error.clone(),
            };
        }
        let message = match body {
            Ok(body) => body.error,
            // Not a ferry agent, or the body was cut: say what was seen.
            Err(_) if read.is_ok() && !text.trim().is_empty() => {
                format!("HTTP {status} {status_text}: {}", text.trim())
            }
            Err(_) => format!("HTTP {status} {status_text}"),
        };
        if status == 401 {
            ClientError::Unauthorized {
                addr: self.addr.clone(),
                message,
            }
        } else {
            ClientError::Rejected {
                addr: self.addr.clone(),
                status,
                message,
            }
        }
    }

    #[cold]
    fn decode_error(&self, method: &str, path: &str, source: io::Error) -> ClientError {
        ClientError::Decode {
            addr: self.addr.clone(),
            call: format!("{method} {path}"),
            source,
        }
    }
}

/// The HTTP agent's settings, with or without TLS.
fn http_builder() -> ureq::AgentBuilder {
    ureq::AgentBuilder::new()
        .timeout_connect(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .redirects(0)
}

fn json(value: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(value).expect("API types serialize to JSON")
}

/// Percent-encodes a path segment: everything but unreserved characters (RFC 3986).
fn encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_encoded() {
        // Goal: names cannot escape their path segment. Method: encode slashes, dots, UTF-8.
        assert_eq!(encode("vm-1.raw_x~"), "vm-1.raw_x~");
        assert_eq!(encode("a/b"), "a%2Fb");
        assert_eq!(encode("a b?c"), "a%20b%3Fc");
        assert_eq!(encode("é"), "%C3%A9");
    }

    #[test]
    fn debug_hides_the_token() {
        // Goal: the token never shows in logs. Method: format a client with Debug.
        let client = Client::new("127.0.0.1:7450", Some("secret-token".into()));
        let text = format!("{client:?}");
        assert!(!text.contains("secret-token"), "{text}");
        assert!(text.contains("127.0.0.1:7450"));
    }

    #[test]
    fn unreachable_agent_names_the_address() {
        // Goal: a stopped agent gives "cannot reach the agent at ADDR". Method: call a port
        // that was just bound and closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let err = Client::new(&addr, None)
            .exports()
            .expect_err("nothing listens");
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
        assert_eq!(err.to_string(), format!("cannot reach the agent at {addr}"));
        assert_eq!(err.status(), None);
    }
}

mod manager;
