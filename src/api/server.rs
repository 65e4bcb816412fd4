//! Request handling of the control API: authentication, routing, body decoding and the
//! mapping of [`ControlError`]s to HTTP statuses.
//!
//! [`route`] is a pure function of (method, URL, Authorization header, body) to a [`Reply`],
//! so the whole API is testable without sockets; [`Context`] is the [`Service`] the
//! listener ([`super::listen`]) calls with each request, and only moves it to [`route`].
//!
//! Invariants:
//! - Authentication comes before routing: without the token, every path answers 401 (but
//!   `/metrics` when `metrics_auth` is off), so an unauthenticated caller learns nothing
//!   about exports.
//! - Fencing comes right after authentication: a request carrying a manager epoch is routed
//!   only once [`Control::admit_epoch`] admitted it, and runs while its hold lives; a stale
//!   epoch is 409 with both epochs in the body, and nothing is routed. The lease routes
//!   ([`super::leases`]) come before the fence and are never fenced.
//! - A body is read only from a caller presenting the token ([`Service::admit_body`], before
//!   any body byte), and at most [`MAX_BODY_BYTES`] of it; larger bodies get 413,
//!   undecodable ones 400. Path segments and query values are percent-decoded; nothing
//!   here panics on input.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

use serde::Serialize;

use super::http::{Head, Method};
use super::leases::LeaseCall;
use super::listen::Service;
use super::prometheus;
use super::request::{authenticate, batch_param, decode, flag, path_segments, query_pairs};
use super::types::{
    ErrorBody, ExportSpec, MigrateRequest, SeedExportRequest, SeedImportRequest,
    SeedInspectRequest, SeedSyncRequest, StaleEpochBody, TrackerAdd,
};
use super::{Control, ControlError};

pub use super::http::{Reply, MAX_BODY_BYTES};
/// Heat map cells when the request names none (64 columns x 16 rows).
pub const DEFAULT_HEAT_CELLS: usize = 1024;
/// Most heat map cells one request gets.
pub const MAX_HEAT_CELLS: usize = 65_536;

/// What every worker shares: the token, whether `/metrics` needs it, and the thing
/// controlled.
pub struct Context {
    token: String,
    metrics_auth: bool,
    control: Arc<dyn Control>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token.
        f.debug_struct("Context")
            .field("metrics_auth", &self.metrics_auth)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context answering with `control` to callers presenting `token`; `/metrics` too
    /// needs the token when `metrics_auth`.
    pub fn new(token: String, metrics_auth: bool, control: Arc<dyn Control>) -> Self {
        Context {
            token,
            metrics_auth,
            control,
        }
    }
}

impl Reply {
    fn from_result<T: Serialize>(status: u16, result: Result<T, ControlError>) -> Reply {
        match result {
            Ok(value) => Reply::json(status, &value),
            Err(err) => Reply::from_error(&err),
        }
    }

    fn from_unit(result: Result<(), ControlError>) -> Reply {
        match result {
            Ok(()) => Reply::empty(204),
            Err(err) => Reply::from_error(&err),
        }
    }

    /// The error answer: `{"error": ...}`, with both epochs when a manager was fenced off.
    #[cold]
    fn from_error(err: &ControlError) -> Reply {
        let stale_epoch = match err {
            ControlError::StaleEpoch(stale) => Some(StaleEpochBody {
                epoch: stale.epoch,
                highest: stale.highest,
            }),
            _ => None,
        };
        let body = ErrorBody {
            error: err.to_string(),
            stale_epoch,
        };
        Reply::json(err.http_status(), &body)
    }
}

impl Service for Context {
    /// A body is read only from a caller presenting the token, whatever the path.
    fn admit_body(&self, head: &Head) -> Result<(), Reply> {
        authenticate(head.authorization.as_deref(), &self.token).inspect_err(|_| {
            log::warn!(
                "control API: {} {} with a {} byte body: refused (token), connection closed",
                head.method,
                path_of(&head.target),
                head.body_bytes
            );
        })
    }

    fn answer(&self, head: &Head, body: &[u8], peer: SocketAddr) -> Reply {
        let mut body = body;
        let url = head.target.as_str();
        let method = head_as_get(&head.method);
        let authorization = head.authorization.as_deref();
        let reply = route(
            method,
            url,
            authorization,
            head.manager_epoch,
            &mut body,
            self,
        );
        if reply.status == 401 {
            log::warn!(
                "control API: {} {} from {peer}: refused (token)",
                head.method,
                path_of(url)
            );
        } else {
            log::debug!(
                "control API: {} {} -> {}",
                head.method,
                path_of(url),
                reply.status
            );
        }
        reply
    }
}

/// HEAD is answered as GET (the listener sends the head only).
fn head_as_get(method: &Method) -> &Method {
    match method {
        Method::Head => &Method::Get,
        other => other,
    }
}

/// The service of the separate `/metrics` address (`metrics = "ADDR"`): `GET /metrics`
/// without a token, nothing else, and no request bodies.
pub struct MetricsOnly {
    control: Arc<dyn Control>,
}

impl std::fmt::Debug for MetricsOnly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsOnly").finish_non_exhaustive()
    }
}

impl MetricsOnly {
    /// Serves the counters of `control`.
    pub fn new(control: Arc<dyn Control>) -> Self {
        MetricsOnly { control }
    }
}

impl Service for MetricsOnly {
    fn admit_body(&self, _head: &Head) -> Result<(), Reply> {
        Err(Reply::error(400, "no request takes a body here"))
    }

    fn answer(&self, head: &Head, _body: &[u8], _peer: SocketAddr) -> Reply {
        match (head_as_get(&head.method), path_of(&head.target)) {
            (Method::Get, "/metrics") => metrics(self.control.as_ref()),
            (_, "/metrics") => method_not_allowed("GET"),
            _ => Reply::error(404, "only /metrics is served here"),
        }
    }
}

fn metrics(control: &dyn Control) -> Reply {
    Reply {
        status: 200,
        content_type: Some(prometheus::PROMETHEUS_CONTENT_TYPE),
        body: {
            let mut text = prometheus::render_prometheus(&control.exports());
            let now_ms = crate::env::unix_ms();
            text.push_str(&prometheus::render_replication(&control.jobs(), now_ms));
            text.push_str(&prometheus::render_manager_epoch(control.manager_epoch()));
            text.push_str(&prometheus::render_witness(&control.witness_counters()));
            text.into_bytes()
        },
        headers: Vec::new(),
    }
}

fn path_of(url: &str) -> &str {
    url.split_once('?').map_or(url, |(path, _)| path)
}

/// Answers one request. `authorization` is the raw header value; `manager_epoch` the
/// checked `Ferry-Manager-Epoch` (a manager's command); `body` is read only by routes that
/// take one, and at most [`MAX_BODY_BYTES`] + 1 bytes of it.
pub fn route(
    method: &Method,
    url: &str,
    authorization: Option<&str>,
    manager_epoch: Option<u64>,
    body: &mut dyn Read,
    context: &Context,
) -> Reply {
    let (path, query) = url.split_once('?').unwrap_or((url, ""));
    if path == "/metrics" && !context.metrics_auth {
        // Unauthenticated: the epoch (if any) is ignored, never admitted.
        return match method {
            Method::Get => metrics(context.control.as_ref()),
            _ => method_not_allowed("GET"),
        };
    }
    if let Err(reply) = authenticate(authorization, &context.token) {
        return reply;
    }
    let control = context.control.as_ref();
    // A lease request is how a manager gets an epoch: never fenced (see `leases`).
    if let Some(segments) = path_segments(path) {
        if let Some(reply) = lease_route(method, &segments, manager_epoch, body, control) {
            return reply;
        }
    }
    // Held until the command below has answered: no newer epoch is admitted meanwhile.
    let _hold = match manager_epoch.map(|epoch| control.admit_epoch(epoch)) {
        None => None,
        Some(Ok(hold)) => Some(hold),
        Some(Err(err)) => {
            log::warn!("control API: {method} {path}: {err}");
            return Reply::from_error(&err);
        }
    };
    if path == "/metrics" {
        return match method {
            Method::Get => metrics(control),
            _ => method_not_allowed("GET"),
        };
    }
    dispatch(method, path, query, body, control, manager_epoch)
}

/// Answers one authenticated (and, for a manager, admitted) request by its path.
fn dispatch(
    method: &Method,
    path: &str,
    query: &str,
    body: &mut dyn Read,
    control: &dyn Control,
    manager_epoch: Option<u64>,
) -> Reply {
    let Some(segments) = path_segments(path) else {
        return Reply::error(400, format!("malformed path '{path}'"));
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match segments.as_slice() {
        ["v1", "exports"] => match method {
            Method::Get => Reply::json(200, &control.exports()),
            Method::Post => match decode::<ExportSpec>(body) {
                Ok(spec) => Reply::from_result(201, control.add_export(spec)),
                Err(reply) => reply,
            },
            _ => method_not_allowed("GET, POST"),
        },
        ["v1", "stale-images"] => match method {
            Method::Get => Reply::from_result(200, control.collect_stale(true)),
            Method::Delete => Reply::from_result(200, control.collect_stale(false)),
            _ => method_not_allowed("GET, DELETE"),
        },
        ["v1", "exports", name] => match method {
            Method::Get => export_status(control, name),
            Method::Delete => match flag(query, "force") {
                Ok(force) => Reply::from_unit(control.remove_export(name, force)),
                Err(reply) => reply,
            },
            _ => method_not_allowed("GET, DELETE"),
        },
        ["v1", "exports", name, "trackers"] => match method {
            Method::Get => Reply::from_result(200, control.trackers(name)),
            Method::Post => match decode::<TrackerAdd>(body) {
                Ok(add) => Reply::from_result(201, control.add_tracker(name, add)),
                Err(reply) => reply,
            },
            _ => method_not_allowed("GET, POST"),
        },
        ["v1", "exports", name, "trackers", tracker] => match method {
            Method::Delete => Reply::from_unit(control.remove_tracker(name, tracker)),
            _ => method_not_allowed("DELETE"),
        },
        ["v1", "exports", name, "heat"] => match method {
            Method::Get => heat(control, name, query),
            _ => method_not_allowed("GET"),
        },
        ["v1", "exports", name, "migrate"] => match method {
            Method::Post => match decode::<MigrateRequest>(body) {
                Ok(request) => {
                    let request = MigrateRequest {
                        manager_epoch,
                        ..request
                    };
                    Reply::from_result(202, control.migrate(name, request))
                }
                Err(reply) => reply,
            },
            _ => method_not_allowed("POST"),
        },
        ["v1", "jobs"] => match method {
            Method::Get => Reply::json(200, &control.jobs()),
            _ => method_not_allowed("GET"),
        },
        ["v1", "jobs", id] => match (method, id.parse::<u64>()) {
            (Method::Get, Ok(id)) => Reply::from_result(200, control.job(id)),
            (Method::Get, Err(_)) => Reply::error(400, format!("job id '{id}' is not a number")),
            _ => method_not_allowed("GET"),
        },
        ["v1", "jobs", id, "stop"] => match (method, id.parse::<u64>()) {
            (Method::Post, Ok(id)) => Reply::from_result(200, control.stop_job(id)),
            (Method::Post, Err(_)) => Reply::error(400, format!("job id '{id}' is not a number")),
            _ => method_not_allowed("POST"),
        },
        ["v1", "seeds"] => match method {
            Method::Get => Reply::json(200, &control.seeds()),
            _ => method_not_allowed("GET"),
        },
        ["v1", "seeds", "export"] => match method {
            Method::Post => match decode::<SeedExportRequest>(body) {
                Ok(request) => Reply::from_result(202, control.seed_export(request)),
                Err(reply) => reply,
            },
            _ => method_not_allowed("POST"),
        },
        ["v1", "seeds", "import"] => match method {
            Method::Post => match decode::<SeedImportRequest>(body) {
                Ok(request) => Reply::from_result(202, control.seed_import(request)),
                Err(reply) => reply,
            },
            _ => method_not_allowed("POST"),
        },
        ["v1", "seeds", "inspect"] => match method {
            Method::Post => match decode::<SeedInspectRequest>(body) {
                Ok(request) => Reply::from_result(200, control.seed_inspect(request)),
                Err(reply) => reply,
            },
            _ => method_not_allowed("POST"),
        },
        ["v1", "seeds", id, "stop"] => match method {
            Method::Post => Reply::from_result(200, control.seed_stop(id)),
            _ => method_not_allowed("POST"),
        },
        ["v1", "seeds", id] => match method {
            Method::Get => Reply::from_result(200, control.seed(id)),
            _ => method_not_allowed("GET"),
        },
        ["v1", "exports", name, "seed-sync"] => match method {
            Method::Post => match decode::<SeedSyncRequest>(body) {
                Ok(request) => {
                    let request = SeedSyncRequest {
                        manager_epoch,
                        ..request
                    };
                    Reply::from_result(202, control.seed_sync(name, request))
                }
                Err(reply) => reply,
            },
            _ => method_not_allowed("POST"),
        },
        ["v1", "jobs", id, "abort"] => match (method, id.parse::<u64>()) {
            (Method::Post, Ok(id)) => Reply::from_result(200, control.abort_job(id)),
            (Method::Post, Err(_)) => Reply::error(400, format!("job id '{id}' is not a number")),
            _ => method_not_allowed("POST"),
        },
        ["v1", "status"] => match (method, batch_param(query)) {
            (Method::Get, Ok(batch)) => {
                Reply::from_result(200, control.migration_status(batch.as_deref()))
            }
            (Method::Get, Err(reply)) => reply,
            _ => method_not_allowed("GET"),
        },
        ["v1", "journal", "jobs"] => match (method, batch_param(query)) {
            (Method::Get, Ok(batch)) => {
                Reply::from_result(200, control.journal_jobs(batch.as_deref()))
            }
            (Method::Get, Err(reply)) => reply,
            _ => method_not_allowed("GET"),
        },
        _ => Reply::error(404, format!("no API route {path}")),
    }
}

/// Answers a request under `/v1/leases` (`segments` are the decoded path's; [`super::leases`]
/// says why these are never fenced); `None` when the path is another route's.
fn lease_route(
    method: &Method,
    segments: &[String],
    manager_epoch: Option<u64>,
    body: &mut dyn Read,
    control: &dyn Control,
) -> Option<Reply> {
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let ["v1", "leases", rest @ ..] = segments.as_slice() else {
        return None;
    };
    if manager_epoch.is_some() {
        return Some(Reply::error(
            400,
            "lease requests are not manager commands: send no manager epoch header",
        ));
    }
    Some(match (rest, method) {
        ([], Method::Get) => Reply::json(200, &control.leases()),
        ([], _) => method_not_allowed("GET"),
        ([pair], Method::Post) => lease(control, pair, body),
        ([_], _) => method_not_allowed("POST"),
        _ => Reply::error(404, "no API route under /v1/leases"),
    })
}

fn lease(control: &dyn Control, pair: &str, body: &mut dyn Read) -> Reply {
    if crate::name::validate(pair).is_err() {
        // The reply never echoes the hostile text; the rule is enough to fix the request.
        return Reply::error(
            400,
            format!(
                "pair: 1 to {} of letters, digits, '.', '_', '-' (no leading '.')",
                crate::name::NAME_MAX_BYTES
            ),
        );
    }
    let call = match decode::<LeaseCall>(body) {
        Ok(call) => call,
        Err(reply) => return reply,
    };
    if let Err(err) = call.check() {
        return Reply::error(400, err.to_string());
    }
    match control.lease(pair, &call) {
        Ok(reply) => Reply::json(200, &reply),
        Err(err) => Reply::from_error(&err),
    }
}

fn export_status(control: &dyn Control, name: &str) -> Reply {
    match control.exports().into_iter().find(|e| e.name == name) {
        Some(status) => Reply::json(200, &status),
        None => Reply::error(404, format!("no export named '{name}'")),
    }
}

fn heat(control: &dyn Control, export: &str, query: &str) -> Reply {
    let params = match query_pairs(query) {
        Some(params) => params,
        None => return Reply::error(400, "malformed query string"),
    };
    let tracker = params
        .iter()
        .find(|(k, _)| k == "tracker")
        .map(|(_, v)| v.as_str());
    let cells = match params.iter().find(|(k, _)| k == "cells") {
        None => DEFAULT_HEAT_CELLS,
        Some((_, text)) => match text.parse::<usize>() {
            Ok(cells) if cells > 0 => cells.min(MAX_HEAT_CELLS),
            _ => {
                let problem = format!("cells must be a number from 1 to {MAX_HEAT_CELLS}");
                return Reply::error(400, problem);
            }
        },
    };
    Reply::from_result(200, control.heat(export, tracker, cells))
}

#[cold]
fn method_not_allowed(allow: &'static str) -> Reply {
    Reply::error(405, format!("method not allowed here (allowed: {allow})"))
        .with_header("Allow", allow)
}
