//! The manager's lease loop: one thread owns the [`Role`], ticks it, feeds it the witness's
//! replies, the peer's messages and which hosts answer, and carries out what it decides.
//!
//! Invariants:
//! - A [`Out::Persist`] is saved before any later output is handed to a sender; a failed
//!   save stops the loop's sending for that batch (and is logged): nothing is sent that
//!   depends on a state not on disk.
//! - The loop never blocks on the network: requests go to bounded queues drained by the
//!   [`Workers`]; a full queue drops the message (the protocol treats it as lost). The send time a reply is judged by is taken when the
//!   request is queued, before it is sent, which only shortens the deadline.
//! - Every role change is logged with its reason and kept for `ferry manager status`.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::fleet::Fleet;
pub use super::shared::{HostJob, Input, Shared};
use super::state::StateFile;
pub use super::workers::Workers;
use crate::api::fleet::{AgentView, PeerView, RoleChange};
use crate::env::Clock;
use crate::lease::role::{Out, Role};
use crate::lease::witness::LeaseRequest;

/// How often the role is ticked.
pub const TICK: Duration = Duration::from_millis(100);

/// The loop's state.
#[allow(missing_debug_implementations)] // holds a clock trait object and channels only
pub struct Runtime {
    role: Role,
    state: StateFile,
    clock: Arc<dyn Clock>,
    inputs: Receiver<Input>,
    workers: Workers,
    fleet: Arc<Fleet>,
    shared: Arc<Shared>,
    heard: HashMap<String, Instant>,
    role_changes: u64,
    last_change: Option<RoleChange>,
}

impl Runtime {
    /// A loop for `role` (built from the saved state), with its inputs and workers.
    pub fn new(
        role: Role,
        state: StateFile,
        clock: Arc<dyn Clock>,
        inputs: Receiver<Input>,
        workers: Workers,
        shared: Arc<Shared>,
    ) -> Self {
        Self {
            role,
            state,
            clock,
            inputs,
            fleet: workers.fleet(),
            workers,
            shared,
            heard: HashMap::new(),
            role_changes: 0,
            last_change: None,
        }
    }

    /// Runs until [`Shared::stop`] or until every input sender is gone.
    pub fn run(mut self) {
        let mut next_tick = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match self.inputs.recv_timeout(wait) {
                Ok(input) => self.handle(input),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            if Instant::now() >= next_tick {
                let outs = self.role.tick(self.clock.now_ns());
                self.carry_out(outs);
                next_tick += TICK;
                if next_tick < Instant::now() {
                    next_tick = Instant::now() + TICK; // the loop was late: do not burst
                }
                self.publish();
            }
        }
    }

    fn handle(&mut self, input: Input) {
        let now_ns = self.clock.now_ns();
        let outs = match input {
            Input::Reply {
                host,
                request,
                sent_ns,
                reply,
            } => self
                .role
                .on_witness(&host, &request, sent_ns, &reply, now_ns),
            Input::Heard(host) => {
                self.role.heard_host(&host, now_ns);
                self.heard.insert(host, Instant::now());
                Vec::new()
            }
            Input::Peer(message) => self.role.on_peer(&message, now_ns),
            Input::Drain { host, drained } => {
                if drained {
                    self.role.drain(&host);
                } else {
                    self.role.undrain(&host);
                }
                log::info!(
                    "host {host}: {}",
                    if drained {
                        "drained"
                    } else {
                        "back in service"
                    }
                );
                Vec::new()
            }
            Input::Force(host) => {
                log::warn!(
                    "forced takeover: {host} recorded as witness by this manager alone; safe \
                     only if the other manager is gone"
                );
                self.role.force_choice(&host)
            }
        };
        self.carry_out(outs);
    }

    fn carry_out(&mut self, outs: Vec<Out>) {
        let now_ns = self.clock.now_ns();
        for out in outs {
            match out {
                Out::Persist(durable) => {
                    if let Err(err) = self.state.save(&durable) {
                        log::error!("{}", crate::error::error_chain(&err));
                        return; // nothing that depends on it is sent
                    }
                }
                Out::Witness { host, request } => self.send_to_host(&host, request, now_ns),
                Out::Peer(message) => self.workers.to_peer(message),
                Out::Changed {
                    active,
                    epoch,
                    reason,
                } => self.changed(active, epoch, reason),
            }
        }
        self.shared.set_acting(self.role.acting(now_ns));
    }

    fn send_to_host(&mut self, host: &str, request: LeaseRequest, sent_ns: u64) {
        self.workers.lease(host, HostJob { request, sent_ns });
    }

    fn changed(&mut self, active: bool, epoch: u64, reason: &'static str) {
        self.role_changes += 1;
        let role = if active { "active" } else { "standby" };
        log::warn!("manager role: {role} (epoch {epoch}): {reason}");
        self.last_change = Some(RoleChange {
            at_unix_ms: crate::env::unix_ms(),
            active,
            epoch,
            reason: reason.to_string(),
        });
    }

    /// Publishes the status the API serves.
    fn publish(&self) {
        let now_ns = self.clock.now_ns();
        let durable = self.role.durable();
        let (peer_heard_ns, peer_active) = self.role.peer();
        let mut status = self.shared.status.lock().unwrap_or_else(|p| p.into_inner());
        status.active = self.role.is_active(now_ns);
        status.epoch = self.role.active_epoch(now_ns);
        status.known_epoch = durable.known_epoch;
        status.witness = durable.choice.clone();
        status.pending = durable.pending.clone();
        status.lease_remaining_ms = self.role.lease_remaining_ns(now_ns) / 1_000_000;
        status.peer = PeerView {
            heard_ms_ago: peer_heard_ns.map(|at| now_ns.saturating_sub(at) / 1_000_000),
            active: peer_active,
            ..status.peer.clone()
        };
        status.role_changes = self.role_changes;
        status.last_change.clone_from(&self.last_change);
        status.drained = self.role.drained().to_vec();
        // Agents may be added at run time: the list is the fleet's.
        status.agents = self
            .fleet
            .all()
            .iter()
            .map(|agent| AgentView {
                name: agent.entry.name.clone(),
                address: agent.entry.address.clone(),
                heard_ms_ago: self
                    .heard
                    .get(&agent.entry.name)
                    .map(|at| at.elapsed().as_millis() as u64),
            })
            .collect();
    }
}
