//! The manager's HTTP API: its status, the pair's messages, the operator's takeover and
//! drains, and the fleet's per-VM status; the standby redirects writes to the active.
//!
//! Invariants: every path needs the fleet token (the peer presents it too); bodies are
//! bounded by the listener and decoded strictly; a host named in a request must be a managed
//! one; nothing here blocks the lease loop (requests are queued to it, never awaited).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crossbeam_channel::Sender;

use super::batches::Driver;
use super::config::{AgentEntry, ManagerConfig};
use super::fleet::{Agent, Fleet, FleetError};
use super::shared::{Input, Shared};
use crate::api::fleet::{BatchPlan, HostAdd, TakeoverRequest};
use crate::api::http::{Head, Method, Reply};
use crate::api::listen::Service;
use crate::api::request::{authenticate, decode, flag, path_segments};
use crate::api::tls::ClientTlsOptions;
use crate::api::Client;
use crate::journal::status::DiskStatus;
use crate::lease::role::PeerMessage;

/// Agents asked at once for the fleet's status (or their exports).
const STATUS_FANOUT: usize = 32;

/// The manager's API.
pub struct ManagerService {
    driver: Arc<Driver>,
    token: String,
    config: ManagerConfig,
    inputs: Sender<Input>,
    shared: Arc<Shared>,
    fleet: Arc<Fleet>,
    peer: Client,
}

impl std::fmt::Debug for ManagerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ManagerService")
            .field("id", &self.config.id)
            .finish_non_exhaustive()
    }
}

impl ManagerService {
    /// The API of the manager configured by `config`.
    pub fn new(
        token: String,
        config: ManagerConfig,
        channels: (Sender<Input>, Arc<Shared>),
        tls: Option<&ClientTlsOptions>,
        (driver, fleet): (Arc<Driver>, Arc<Fleet>),
    ) -> Self {
        let (inputs, shared) = channels;
        let peer = Client::new(&config.peer_address, Some(token.clone()));
        let peer = match tls {
            Some(tls) => peer.with_tls(tls),
            None => peer,
        };
        Self {
            driver,
            token,
            config,
            inputs,
            shared,
            fleet,
            peer,
        }
    }

    fn route(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        body: &mut dyn std::io::Read,
    ) -> Reply {
        let Some(segments) = path_segments(path) else {
            return Reply::error(400, "malformed path");
        };
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        match (method, segments.as_slice()) {
            (Method::Get, ["v1", "manager", "status"]) => {
                let status = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
                Reply::json(200, &*status)
            }
            (Method::Post, ["v1", "manager", "peer"]) => match decode::<PeerMessage>(body) {
                Ok(message) => self.queue(Input::Peer(message), Reply::empty(204)),
                Err(reply) => reply,
            },
            (Method::Post, ["v1", "manager", "takeover"]) => match decode(body) {
                Ok(request) => self.takeover(&request),
                Err(reply) => reply,
            },
            (Method::Post, ["v1", "hosts"]) => match flag(query, "from_peer") {
                Ok(from_peer) => match decode::<HostAdd>(body) {
                    Ok(host) => self.add_host(host, from_peer),
                    Err(reply) => reply,
                },
                Err(reply) => reply,
            },
            (Method::Post, ["v1", "hosts", name, action @ ("drain" | "undrain")]) => {
                match flag(query, "from_peer") {
                    Ok(from_peer) => self.drain(name, *action == "drain", from_peer),
                    Err(reply) => reply,
                }
            }
            (Method::Post, ["v1", "manager", "batches"]) => match flag(query, "from_peer") {
                Ok(from_peer) => match decode::<BatchPlan>(body) {
                    Ok(plan) => self.submit(plan, from_peer, path),
                    Err(reply) => reply,
                },
                Err(reply) => reply,
            },
            (Method::Get, ["v1", "manager", "batches"]) => Reply::json(
                200,
                &*self.driver.views.lock().unwrap_or_else(|p| p.into_inner()),
            ),
            (Method::Get, ["v1", "manager", "batches", name]) => {
                let views = self.driver.views.lock().unwrap_or_else(|p| p.into_inner());
                match views.iter().find(|view| view.name == *name) {
                    Some(view) => Reply::json(200, view),
                    None => Reply::error(
                        404,
                        format!("no batch {name} (yet: the driver looks every 0.5 s)"),
                    ),
                }
            }
            (Method::Get, ["v1", "status"]) => match batch_of(query) {
                Ok(batch) => Reply::json(200, &self.fleet_status(batch.as_deref())),
                Err(reply) => reply,
            },
            (Method::Get, ["metrics"]) => self.metrics(),
            (Method::Get, _) => Reply::error(404, "no such manager path"),
            _ => self.not_here(path),
        }
    }

    fn queue(&self, input: Input, reply: Reply) -> Reply {
        match self.inputs.send(input) {
            Ok(()) => reply,
            Err(_) => Reply::error(503, "the manager is stopping"),
        }
    }

    fn managed(&self, name: &str) -> bool {
        self.fleet.get(name).is_some()
    }

    /// Manages one more agent, durably, and tells the peer (unless it told us). Either
    /// manager takes it: the standby must know every host the active may choose as witness.
    fn add_host(&self, host: HostAdd, from_peer: bool) -> Reply {
        let entry = AgentEntry {
            name: host.name.clone(),
            address: host.address.clone(),
            transfer: host.transfer.clone(),
        };
        match self.fleet.add(entry) {
            Ok(true) => log::info!("host {} added (at {})", host.name, host.address),
            Ok(false) => {}
            Err(err @ (FleetError::Invalid(_) | FleetError::Conflict { .. })) => {
                return Reply::error(400, err.to_string())
            }
            Err(err @ FleetError::Full) => return Reply::error(409, err.to_string()),
            Err(err @ FleetError::Save { .. }) => {
                log::error!("{}", crate::error::error_chain(&err));
                return Reply::error(500, "cannot save the host list");
            }
        }
        if from_peer {
            return Reply::empty(204);
        }
        match self.peer.host_add(&host, true) {
            Ok(()) => Reply::empty(204),
            Err(err) => Reply::error(
                502,
                format!(
                    "{} added here, but the peer manager was not told: {}",
                    host.name,
                    crate::error::error_chain(&err)
                ),
            ),
        }
    }

    fn takeover(&self, request: &TakeoverRequest) -> Reply {
        if !request.force {
            return Reply::error(
                400,
                "a takeover happens only through the witness; --force records a witness alone, \
                 which is safe only if the other manager is gone",
            );
        }
        if !self.managed(&request.witness) {
            return Reply::error(400, format!("{} is not a managed host", request.witness));
        }
        let status = self
            .shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        self.queue(
            Input::Force(request.witness.clone()),
            Reply::json(202, &status),
        )
    }

    fn drain(&self, name: &str, drained: bool, from_peer: bool) -> Reply {
        if !self.managed(name) {
            return Reply::error(404, format!("{name} is not a managed host"));
        }
        let input = Input::Drain {
            host: name.to_string(),
            drained,
        };
        if let Err(_closed) = self.inputs.send(input) {
            return Reply::error(503, "the manager is stopping");
        }
        if from_peer {
            return Reply::empty(204);
        }
        // Both managers must know: the witness is moved by whichever is active.
        match self.peer.host_drain(name, drained, true) {
            Ok(()) => Reply::empty(204),
            Err(err) => Reply::error(
                502,
                format!(
                    "{name} {} here, but the peer manager was not told: {}",
                    if drained { "drained" } else { "returned" },
                    crate::error::error_chain(&err)
                ),
            ),
        }
    }

    /// Every agent's per-VM verdicts (of `batch`, if given), asked by [`fan_out`], each
    /// call bounded by [`super::fleet::STATUS_TIMEOUT`]. An agent that does not answer is a line of
    /// its own (needs-attention, naming the host), never silently left out.
    fn fleet_status(&self, batch: Option<&str>) -> Vec<DiskStatus> {
        let answers = fan_out(&self.fleet.all(), |agent| {
            let client = &agent.status;
            let answer = match self.shared.acting_epoch() {
                Some(epoch) => client.at_epoch(epoch).migration_status(batch),
                None => client.migration_status(batch),
            };
            answer.unwrap_or_else(|err| vec![unreachable_line(&agent.entry.name, &err)])
        });
        answers.into_iter().flatten().collect()
    }

    /// Checks, completes (sources, destinations), saves and replicates a plan; the driver
    /// takes it from the store. Only the active takes plans from the operator.
    fn submit(&self, mut plan: BatchPlan, from_peer: bool, path: &str) -> Reply {
        if let Err(message) = check_plan(&plan) {
            return Reply::error(400, message);
        }
        if !from_peer {
            if !self
                .shared
                .status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .active
            {
                return self.not_here(path);
            }
            if let Err(message) = self.complete(&mut plan) {
                return Reply::error(400, message);
            }
        }
        if let Err(err) = self.driver.store().save(&plan) {
            return Reply::error(500, crate::error::error_chain(&err));
        }
        if !from_peer {
            if let Err(err) = self.peer.manager_submit_batch(&plan, true) {
                log::warn!(
                    "batch {}: the peer manager did not store it (a failover now would not \
                     know of it): {}",
                    plan.name,
                    crate::error::error_chain(&err)
                );
            }
        }
        Reply::json(202, &crate::manager::batches::planned(&plan))
    }

    /// Finds each item's source (the one agent serving the export) and turns a managed
    /// host named as destination into its block-stream address.
    fn complete(&self, plan: &mut BatchPlan) -> Result<(), String> {
        let mut served: Option<Vec<(String, Vec<String>)>> = None;
        for item in &mut plan.items {
            if let Some(agent) = self.fleet.get(&item.to) {
                item.to = agent.entry.transfer.clone().ok_or_else(|| {
                    format!(
                        "{} has no transfer address in the manager's configuration",
                        agent.entry.name
                    )
                })?;
            }
            match &item.source {
                Some(source) if self.managed(source) => {}
                Some(source) => return Err(format!("{source} is not a managed host")),
                None => {
                    let served = served.get_or_insert_with(|| self.exports_by_host());
                    let hosts: Vec<&String> = served
                        .iter()
                        .filter(|(_, exports)| exports.contains(&item.export))
                        .map(|(host, _)| host)
                        .collect();
                    match hosts.as_slice() {
                        [host] => item.source = Some((*host).clone()),
                        [] => return Err(format!("no managed agent serves {}", item.export)),
                        _ => {
                            return Err(format!(
                                "{} is served by several agents: name its source",
                                item.export
                            ))
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Every reachable agent's export names.
    fn exports_by_host(&self) -> Vec<(String, Vec<String>)> {
        fan_out(&self.fleet.all(), |agent| {
            let exports = agent
                .status
                .exports()
                .map(|list| list.into_iter().map(|e| e.name).collect());
            (agent.entry.name.clone(), exports.unwrap_or_default())
        })
    }

    /// A write this manager does not serve: the standby points to the active.
    fn not_here(&self, path: &str) -> Reply {
        let status = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        if status.active {
            return Reply::error(404, "no such manager path");
        }
        if status.peer.active {
            let scheme = if self.config.tls_creds.is_some() {
                "https"
            } else {
                "http"
            };
            let base = if self.config.peer_address.contains("://") {
                self.config.peer_address.clone()
            } else {
                format!("{scheme}://{}", self.config.peer_address)
            };
            return Reply::error(
                307,
                format!(
                    "this manager is standby; the active is {}",
                    self.config.peer_id
                ),
            )
            .with_header("Location", format!("{base}{path}"));
        }
        Reply::error(
            503,
            "no manager is active right now (a takeover is in progress)",
        )
    }

    fn metrics(&self) -> Reply {
        let status = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        let text = format!(
            "# HELP ferry_manager_active Whether this manager acts as active.\n\
             # TYPE ferry_manager_active gauge\nferry_manager_active {}\n\
             # HELP ferry_manager_epoch_known The highest epoch this manager knows of.\n\
             # TYPE ferry_manager_epoch_known gauge\nferry_manager_epoch_known {}\n\
             # HELP ferry_manager_lease_remaining_seconds Time left on the lease.\n\
             # TYPE ferry_manager_lease_remaining_seconds gauge\n\
             ferry_manager_lease_remaining_seconds {}\n\
             # HELP ferry_manager_witness_generation The recorded witness generation.\n\
             # TYPE ferry_manager_witness_generation gauge\nferry_manager_witness_generation {}\n\
             # HELP ferry_manager_role_changes_total Role changes since start.\n\
             # TYPE ferry_manager_role_changes_total counter\nferry_manager_role_changes_total {}\n",
            u8::from(status.active),
            status.known_epoch,
            status.lease_remaining_ms as f64 / 1e3,
            status.witness.as_ref().map_or(0, |w| w.generation),
            status.role_changes,
        );
        let mut reply = Reply::empty(200);
        reply.content_type = Some("text/plain; version=0.0.4");
        reply.body = text.into_bytes();
        reply
    }
}

impl Service for ManagerService {
    fn admit_body(&self, head: &Head) -> Result<(), Reply> {
        authenticate(head.authorization.as_deref(), &self.token)
    }

    fn answer(&self, head: &Head, body: &[u8], _peer: SocketAddr) -> Reply {
        if let Err(reply) = authenticate(head.authorization.as_deref(), &self.token) {
            return reply;
        }
        let (path, query) = head.target.split_once('?').unwrap_or((&head.target, ""));
        let method = if head.method == Method::Head {
            &Method::Get
        } else {
            &head.method
        };
        let mut body = body;
        self.route(method, path, query, &mut body)
    }
}

/// A plan's shape: names under the name rule, a sane concurrency and size.
fn check_plan(plan: &BatchPlan) -> Result<(), String> {
    crate::name::validate(&plan.name).map_err(|err| format!("batch: {err}"))?;
    if !(1..=64).contains(&plan.concurrency) {
        return Err("concurrency must be 1..=64".into());
    }
    if plan.items.is_empty() || plan.items.len() > 10_000 {
        return Err("a batch has 1..=10000 items".into());
    }
    for item in &plan.items {
        crate::name::validate(&item.export).map_err(|err| format!("export: {err}"))?;
        if item.to.is_empty()
            || item
                .to
                .contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "{}: destination {:?} is not an address",
                item.export, item.to
            ));
        }
    }
    Ok(())
}

/// `?batch=NAME`, checked against the name rule.
fn batch_of(query: &str) -> Result<Option<String>, Reply> {
    let Some(batch) = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("batch="))
    else {
        return Ok(None);
    };
    crate::name::validate(batch).map_err(|err| Reply::error(400, format!("batch: {err}")))?;
    Ok(Some(batch.to_string()))
}

/// The line of an agent that did not answer.
fn unreachable_line(host: &str, err: &crate::api::ClientError) -> DiskStatus {
    log::warn!("status of {host}: {}", crate::error::error_chain(err));
    DiskStatus {
        job_id: 0,
        batch: None,
        export: "*".into(),
        role: format!("host {host}"),
        phase: "unknown".into(),
        peer_state: None,
        peer_unreachable: Some(err.to_string()),
        destination_bytes: None,
        verdict: "needs-attention".into(),
        reason: format!("agent {host} did not answer: its disks' verdicts are unknown"),
        action: format!("check host {host}, then ask again"),
        forwarding: None,
        seed: None,
    }
}

/// `ask` of every agent, from at most [`STATUS_FANOUT`] threads pulling agents from one
/// queue (a slow agent holds only its own thread); the answers in the agents' order.
fn fan_out<T: Send>(agents: &[Arc<Agent>], ask: impl Fn(&Agent) -> T + Sync) -> Vec<T> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let answers = std::sync::Mutex::new(Vec::with_capacity(agents.len()));
    std::thread::scope(|scope| {
        for _ in 0..STATUS_FANOUT.min(agents.len()) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                let Some(agent) = agents.get(index) else {
                    break;
                };
                let answer = ask(agent);
                answers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((index, answer));
            });
        }
    });
    let mut answers = answers.into_inner().unwrap_or_else(|p| p.into_inner());
    answers.sort_by_key(|(index, _)| *index);
    answers.into_iter().map(|(_, answer)| answer).collect()
}
