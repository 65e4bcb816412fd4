//! A manager's role in the pair: standby, active, or active while moving the witness; the
//! pure decisions both `ferry manager` and the simulation run (`docs/manager-lease.md`).
//!
//! Event-driven: the caller feeds ticks, the witness's replies (with when the request was
//! sent) and the peer's messages, and carries out the returned [`Out`]s in order: a
//! [`Out::Persist`] is written durably before anything after it is sent.
//!
//! Invariants (the argument is in `docs/manager-lease.md`; [`super::sim`] checks them):
//! - A manager acts as active only before its [`Deadline`], computed from when it *sent* the
//!   request the witness granted; it becomes active only through a grant at the witness of
//!   its recorded choice and generation (never because the peer is silent).
//! - Witness moves: the active stops renewing at the old witness *before* it proposes the
//!   new one, persists the proposal first, and carries the lease over (install) only once
//!   the standby has durably accepted it; after proposing it never uses the old generation
//!   again unless the peer shows a newer epoch (which proves its own lease over).
//! - The standby accepts a proposal only while standby, only from an epoch no older than it
//!   has seen, only on top of its own current generation, and only for a host it reaches; it
//!   never picks a witness alone. Grants for a generation no longer recorded are ignored.

use serde::{Deserialize, Serialize};

use super::holder::{Deadline, HolderBounds};
use super::witness::LeaseRequest;
use super::{Lease, ManagerId};

/// Which host is witness, under which generation, proposed at which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WitnessChoice {
    /// Raised by one at every move (1 for the first choice).
    pub generation: u64,
    /// The host whose agent keeps the lease.
    pub host: String,
    /// The proposer's epoch when it proposed.
    pub proposer_epoch: u64,
}

/// What a manager keeps durably.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RoleDurable {
    /// The witness both managers recorded.
    pub choice: Option<WitnessChoice>,
    /// A move this manager proposed and the peer has not confirmed.
    pub pending: Option<WitnessChoice>,
    /// The highest epoch this manager held or was told of by its peer's proposals.
    pub known_epoch: u64,
}

/// Rules the simulation can break on purpose, to show its checker catches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Shrink deadlines by the clock-drift bound (off: trust the clocks to agree).
    pub drift_margin: bool,
    /// Expiry judged by the witness (off: the standby times the lease by its own clock from
    /// when it first read the record, and the witness trusts it).
    pub expiry_by_witness: bool,
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            drift_margin: true,
            expiry_by_witness: true,
        }
    }
}

/// A manager's configuration of the lease.
#[derive(Debug, Clone)]
pub struct RoleConfig {
    /// This manager.
    pub me: ManagerId,
    /// The other one.
    pub peer: ManagerId,
    /// Lease, drift and margin.
    pub bounds: HolderBounds,
    /// How often the lease is renewed (and a standby asks for it).
    pub renew_interval_ms: u32,
    /// A host or peer not heard from this long counts as unreachable.
    pub reach_timeout_ms: u32,
    /// The rules (all on in production).
    pub rules: Rules,
}

/// A message between the two managers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PeerMessage {
    /// Sent every renewal interval.
    Heartbeat {
        /// The sender's known epoch.
        known_epoch: u64,
        /// Whether it acts as active.
        active: bool,
        /// Its recorded choice.
        choice: Option<WitnessChoice>,
        /// Hosts it heard from recently; `None` until it has run for the reach timeout (a
        /// manager that just started has not heard from every host yet, and a partial list
        /// would read as "the witness is unreachable to me").
        reaches: Option<Vec<String>>,
    },
    /// The sender (the active, or the lower id at first) proposes a witness.
    Propose {
        /// The proposer's epoch.
        epoch: u64,
        /// The generation the move starts from (0 for the first choice).
        base_generation: u64,
        /// The new choice.
        to: WitnessChoice,
    },
    /// The answer to a proposal.
    Answer {
        /// Whether the sender recorded the proposed choice.
        accepted: bool,
        /// The sender's recorded choice.
        choice: Option<WitnessChoice>,
        /// The sender's known epoch.
        known_epoch: u64,
        /// Whether the sender acts as active.
        active: bool,
    },
}

/// What the caller does, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Out {
    /// Write this durably before anything after it.
    Persist(RoleDurable),
    /// Send `request` to the witness agent on `host`; report the reply with the send time.
    Witness {
        /// The host.
        host: String,
        /// The request.
        request: LeaseRequest,
    },
    /// Send to the peer manager.
    Peer(PeerMessage),
    /// The role changed (log it with the reason).
    Changed {
        /// Active now.
        active: bool,
        /// The epoch it holds or last knew.
        epoch: u64,
        /// Why.
        reason: &'static str,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Standby,
    /// Holds `epoch` until `deadline`; `installed` once the current witness has its lease.
    Active {
        epoch: u64,
        deadline: Deadline,
        installed: bool,
    },
    /// Holds `epoch` until `deadline` without renewing: a move is proposed.
    Moving {
        epoch: u64,
        deadline: Deadline,
    },
}

/// A manager's lease role.
#[derive(Debug, Clone)]
pub struct Role {
    config: RoleConfig,
    durable: RoleDurable,
    phase: Phase,
    /// The epoch the witness last showed for the recorded generation.
    witness_epoch: u64,
    last_lease_sent_ns: Option<u64>,
    last_witness_ok_ns: Option<u64>,
    peer_heard_ns: Option<u64>,
    /// What the peer's last heartbeat said it reaches (`None`: not known yet).
    peer_reaches: Option<Vec<String>>,
    /// When this role started ticking (again, after a stall) (local time).
    started_ns: Option<u64>,
    /// Its latest tick (local time).
    last_tick_ns: Option<u64>,
    peer_choice: Option<WitnessChoice>,
    peer_active: bool,
    /// Hosts heard from, with when.
    heard: Vec<(String, u64)>,
    drained: Vec<String>,
    /// Under `expiry_by_witness: false`: when this manager's own clock says the lease ends.
    judged_expiry_ns: Option<u64>,
    /// A standby asks again at this local time, when the witness said the lease expires.
    next_ask_ns: Option<u64>,
}

impl Role {
    /// A manager starting (or restarting) with `durable` read back: standby.
    pub fn new(config: RoleConfig, durable: RoleDurable) -> Self {
        Self {
            witness_epoch: durable.known_epoch,
            config,
            durable,
            phase: Phase::Standby,
            last_lease_sent_ns: None,
            last_witness_ok_ns: None,
            peer_heard_ns: None,
            peer_reaches: None,
            started_ns: None,
            last_tick_ns: None,
            peer_choice: None,
            peer_active: false,
            heard: Vec::new(),
            drained: Vec::new(),
            judged_expiry_ns: None,
            next_ask_ns: None,
        }
    }

    /// Whether this manager may act as active at local time `now_ns`.
    pub fn is_active(&self, now_ns: u64) -> bool {
        self.active_epoch(now_ns).is_some()
    }

    /// The epoch it acts under at `now_ns`, when active.
    pub fn active_epoch(&self, now_ns: u64) -> Option<u64> {
        match self.phase {
            Phase::Active {
                epoch, deadline, ..
            }
            | Phase::Moving { epoch, deadline }
                if deadline.allows(now_ns) =>
            {
                Some(epoch)
            }
            _ => None,
        }
    }

    /// What is kept durably.
    pub fn durable(&self) -> &RoleDurable {
        &self.durable
    }

    /// The epoch it acts under and the local time it must stop by, when active at `now_ns`.
    pub fn acting(&self, now_ns: u64) -> Option<(u64, u64)> {
        match self.phase {
            Phase::Active {
                epoch, deadline, ..
            }
            | Phase::Moving { epoch, deadline }
                if deadline.allows(now_ns) =>
            {
                Some((epoch, deadline.until_ns()))
            }
            _ => None,
        }
    }

    /// Time left on the lease at `now_ns`, in nanoseconds (zero when standby).
    pub fn lease_remaining_ns(&self, now_ns: u64) -> u64 {
        match self.phase {
            Phase::Active { deadline, .. } | Phase::Moving { deadline, .. } => {
                deadline.remaining_ns(now_ns)
            }
            Phase::Standby => 0,
        }
    }

    /// When the peer was last heard from (local time), and whether it said it was active.
    pub fn peer(&self) -> (Option<u64>, bool) {
        (self.peer_heard_ns, self.peer_active)
    }

    /// Hosts drained (no witness there).
    pub fn drained(&self) -> &[String] {
        &self.drained
    }

    /// The operator's override when the active and the witness are lost together: this
    /// manager records `host` as the next witness generation alone, which a standby
    /// otherwise never does, and acquires there once a full lease has passed. Safe only if the
    /// other manager is really gone: if it still holds a lease elsewhere, two managers may
    /// act until agents' fences meet the new, higher epoch.
    pub fn force_choice(&mut self, host: &str) -> Vec<Out> {
        let mut out = Vec::new();
        let generation = [self.durable.choice.as_ref(), self.durable.pending.as_ref()]
            .into_iter()
            .flatten()
            .map(|choice| choice.generation)
            .max()
            .unwrap_or(0);
        // Skip an epoch: a grant the lost side might still get at the old witness (one
        // takeover: known + 1) stays below what agents see from here, so fences refuse it.
        self.durable.known_epoch += 1;
        self.witness_epoch = self.durable.known_epoch;
        self.durable.choice = Some(WitnessChoice {
            generation: generation + 1,
            host: host.to_string(),
            proposer_epoch: self.durable.known_epoch,
        });
        self.durable.pending = None;
        self.judged_expiry_ns = None;
        self.next_ask_ns = None;
        self.persist(&mut out);
        out
    }

    /// Records that `host`'s agent answered at `now_ns`.
    pub fn heard_host(&mut self, host: &str, now_ns: u64) {
        match self.heard.iter_mut().find(|(name, _)| name == host) {
            Some(entry) => entry.1 = now_ns,
            None => self.heard.push((host.to_string(), now_ns)),
        }
    }

    /// `host` is drained: it stops being a witness candidate (and is moved away from).
    pub fn drain(&mut self, host: &str) {
        if !self.drained.iter().any(|name| name == host) {
            self.drained.push(host.to_string());
        }
    }

    /// `host` is back in service.
    pub fn undrain(&mut self, host: &str) {
        self.drained.retain(|name| name != host);
    }

    fn reaches(&self, host: &str, now_ns: u64) -> bool {
        self.heard
            .iter()
            .any(|(name, at_ns)| name == host && self.recent(*at_ns, now_ns))
    }

    fn recent(&self, at_ns: u64, now_ns: u64) -> bool {
        now_ns.saturating_sub(at_ns) < u64::from(self.config.reach_timeout_ms) * 1_000_000
    }

    fn bounds(&self) -> HolderBounds {
        let mut bounds = self.config.bounds;
        if !self.config.rules.drift_margin {
            bounds.drift_ppm = 0;
        }
        bounds
    }

    fn persist(&self, out: &mut Vec<Out>) {
        out.push(Out::Persist(self.durable.clone()));
    }

    fn step_down(&mut self, reason: &'static str, out: &mut Vec<Out>) {
        if let Phase::Active { epoch, .. } | Phase::Moving { epoch, .. } = self.phase {
            self.phase = Phase::Standby;
            out.push(Out::Changed {
                active: false,
                epoch,
                reason,
            });
        }
    }

    fn raise_known_epoch(&mut self, epoch: u64, out: &mut Vec<Out>) {
        if epoch > self.durable.known_epoch {
            self.durable.known_epoch = epoch;
            self.persist(out);
        }
        self.witness_epoch = self.witness_epoch.max(epoch);
    }

    /// Time passes: deadlines, heartbeats, renewals, acquisitions, moves.
    pub fn tick(&mut self, now_ns: u64) -> Vec<Out> {
        let mut out = Vec::new();
        // A manager that did not tick for the reach timeout (paused, or starting) has a stale
        // view of the hosts it reaches: it starts over, as after a restart.
        let stalled = self
            .last_tick_ns
            .is_none_or(|last_ns| !self.recent(last_ns, now_ns));
        if stalled {
            self.started_ns = Some(now_ns);
        }
        self.last_tick_ns = Some(now_ns);
        if !self.is_active(now_ns) {
            self.step_down("the lease deadline passed", &mut out);
        }
        let interval_ns = u64::from(self.config.renew_interval_ms) * 1_000_000;
        if self
            .last_lease_sent_ns
            .is_some_and(|sent_ns| now_ns.saturating_sub(sent_ns) < interval_ns)
        {
            // Between intervals, a standby asks as soon as the witness said it may.
            if self.phase == Phase::Standby && self.next_ask_ns.is_some_and(|at| now_ns >= at) {
                self.next_ask_ns = None;
                if let (Some(choice), None) = (self.durable.choice.clone(), &self.durable.pending) {
                    self.ask(&choice, now_ns, &mut out);
                }
            }
            return out;
        }
        self.last_lease_sent_ns = Some(now_ns);
        out.push(Out::Peer(self.heartbeat(now_ns)));
        if let Some(pending) = self.durable.pending.clone() {
            out.push(Out::Peer(self.proposal(pending)));
            return out;
        }
        let Some(choice) = self.durable.choice.clone() else {
            self.maybe_bootstrap(now_ns, &mut out);
            return out;
        };
        match self.phase {
            Phase::Active {
                epoch,
                installed: true,
                ..
            } => {
                if !self.maybe_move(&choice, epoch, now_ns, &mut out) {
                    out.push(self.renew(&choice, epoch));
                }
            }
            Phase::Active {
                epoch,
                installed: false,
                ..
            } => out.push(self.install(&choice, epoch)),
            Phase::Moving { .. } => {}
            Phase::Standby => self.ask(&choice, now_ns, &mut out),
        }
        out
    }

    fn heartbeat(&self, now_ns: u64) -> PeerMessage {
        let settled = self
            .started_ns
            .is_some_and(|started_ns| !self.recent(started_ns, now_ns));
        let reaches = settled.then(|| {
            self.heard
                .iter()
                .filter(|(_, at_ns)| self.recent(*at_ns, now_ns))
                .map(|(name, _)| name.clone())
                .collect()
        });
        PeerMessage::Heartbeat {
            known_epoch: self.durable.known_epoch,
            active: self.is_active(now_ns),
            choice: self.durable.choice.clone(),
            reaches,
        }
    }

    fn proposal(&self, to: WitnessChoice) -> PeerMessage {
        PeerMessage::Propose {
            epoch: to.proposer_epoch,
            base_generation: to.generation - 1,
            to,
        }
    }

    fn renew(&self, choice: &WitnessChoice, epoch: u64) -> Out {
        Out::Witness {
            host: choice.host.clone(),
            request: LeaseRequest::Renew {
                holder: self.config.me.clone(),
                epoch,
                generation: choice.generation,
            },
        }
    }

    fn install(&self, choice: &WitnessChoice, epoch: u64) -> Out {
        Out::Witness {
            host: choice.host.clone(),
            request: LeaseRequest::Install {
                lease: Lease {
                    epoch,
                    holder: Some(self.config.me.clone()),
                    witness_generation: choice.generation,
                    lease_ms: self.config.bounds.lease_ms,
                },
            },
        }
    }

    /// The standby asks for the lease (or, under the broken rule, reads it and asks only
    /// once its own clock says it expired).
    fn ask(&mut self, choice: &WitnessChoice, now_ns: u64, out: &mut Vec<Out>) {
        let acquire = LeaseRequest::Acquire {
            candidate: self.config.me.clone(),
            seen_epoch: self.witness_epoch,
            generation: choice.generation,
        };
        let request = if self.config.rules.expiry_by_witness
            || self.judged_expiry_ns.is_some_and(|at_ns| now_ns >= at_ns)
        {
            acquire
        } else {
            LeaseRequest::Read
        };
        out.push(Out::Witness {
            host: choice.host.clone(),
            request,
        });
    }

    /// The lower id proposes the first witness once both have none.
    fn maybe_bootstrap(&mut self, now_ns: u64, out: &mut Vec<Out>) {
        let peer_fresh = self.peer_heard_ns.is_some_and(|at| self.recent(at, now_ns));
        if self.config.me > self.config.peer || !peer_fresh || self.peer_choice.is_some() {
            return;
        }
        let Some(host) = self.candidate_host(None, now_ns) else {
            return;
        };
        let to = WitnessChoice {
            generation: 1,
            host,
            proposer_epoch: self.durable.known_epoch,
        };
        self.durable.pending = Some(to.clone());
        self.persist(out);
        out.push(Out::Peer(self.proposal(to)));
    }

    /// A host both managers reach, not drained, other than `current`: the lowest name.
    fn candidate_host(&self, current: Option<&str>, now_ns: u64) -> Option<String> {
        let mut hosts: Vec<&String> = self
            .heard
            .iter()
            .map(|(name, _)| name)
            .filter(|name| Some(name.as_str()) != current)
            .filter(|name| !self.drained.contains(name))
            .filter(|name| self.reaches(name, now_ns))
            .filter(|name| {
                self.peer_reaches
                    .as_ref()
                    .is_some_and(|reaches| reaches.contains(name))
            })
            .collect();
        hosts.sort();
        hosts.first().map(|name| (*name).clone())
    }

    /// The active moves the lease when its witness is drained, or unreachable to it or to
    /// the peer, and the peer is there to confirm. Returns whether a move was proposed.
    fn maybe_move(
        &mut self,
        choice: &WitnessChoice,
        epoch: u64,
        now_ns: u64,
        out: &mut Vec<Out>,
    ) -> bool {
        let peer_fresh = self.peer_heard_ns.is_some_and(|at| self.recent(at, now_ns));
        if !peer_fresh {
            return false;
        }
        let drained = self.drained.contains(&choice.host);
        let unreachable_to_me = !self
            .last_witness_ok_ns
            .is_some_and(|at_ns| self.recent(at_ns, now_ns));
        let unreachable_to_peer = self
            .peer_reaches
            .as_ref()
            .is_some_and(|reaches| !reaches.contains(&choice.host));
        if !(drained || unreachable_to_me || unreachable_to_peer) {
            return false;
        }
        let Some(host) = self.candidate_host(Some(&choice.host), now_ns) else {
            return false;
        };
        let Phase::Active { deadline, .. } = self.phase else {
            return false;
        };
        let to = WitnessChoice {
            generation: choice.generation + 1,
            host,
            proposer_epoch: epoch,
        };
        // Renewals at the old witness stop here, before the proposal can be accepted.
        self.phase = Phase::Moving { epoch, deadline };
        self.durable.pending = Some(to.clone());
        self.persist(out);
        out.push(Out::Peer(self.proposal(to)));
        true
    }
}

mod events;
#[cfg(test)]
mod tests;
