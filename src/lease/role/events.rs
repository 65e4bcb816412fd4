//! The role's answers to the witness's replies and to the peer's messages.

use super::{Out, PeerMessage, Phase, Role, WitnessChoice};
use crate::lease::holder::Deadline;
use crate::lease::witness::{LeaseReply, LeaseRequest, Refusal};
use crate::lease::Lease;

impl Role {
    /// The witness on `host` answered `request`, sent at local time `sent_ns`, with `reply`.
    pub fn on_witness(
        &mut self,
        host: &str,
        request: &LeaseRequest,
        sent_ns: u64,
        reply: &LeaseReply,
        now_ns: u64,
    ) -> Vec<Out> {
        let mut out = Vec::new();
        let Some(choice) = self.durable.choice.clone() else {
            return out;
        };
        // Only the recorded witness and generation count: anything else is a ghost of a
        // request sent before a move.
        if host != choice.host {
            return out;
        }
        match reply {
            LeaseReply::Granted { lease } if lease.witness_generation == choice.generation => {
                self.last_witness_ok_ns = Some(now_ns);
                self.granted(lease, sent_ns, now_ns, &mut out);
            }
            LeaseReply::Held {
                lease,
                remaining_ms,
            } => {
                self.saw(lease, *remaining_ms, choice.generation, now_ns);
            }
            LeaseReply::State {
                lease: Some(lease),
                remaining_ms,
            } => self.saw(lease, *remaining_ms, choice.generation, now_ns),
            LeaseReply::State { lease: None, .. } if !self.config.rules.expiry_by_witness => {
                self.judged_expiry_ns.get_or_insert(now_ns);
            }
            LeaseReply::Refused { reason, lease } => {
                if let Some(lease) = lease {
                    self.saw(lease, 0, choice.generation, now_ns);
                }
                self.refused(request, *reason, &mut out);
            }
            _ => {}
        }
        out
    }

    /// Notes what the witness showed of the recorded generation.
    fn saw(&mut self, lease: &Lease, remaining_ms: u64, generation: u64, now_ns: u64) {
        if lease.witness_generation != generation {
            return;
        }
        // What the witness holds now, even if lower than shown before: a record write that
        // failed (shown with its new epoch, held by nobody) may be lost to a crash, and the
        // compare-and-swap needs the epoch the witness has. Nobody ever held the lost one.
        self.witness_epoch = lease.epoch;
        if self.phase == Phase::Standby && remaining_ms > 0 {
            self.next_ask_ns = Some(now_ns + remaining_ms * 1_000_000);
        }
        // The broken rule: the standby times the lease by its own clock from the first time
        // it saw the record (which renewals do not change).
        if !self.config.rules.expiry_by_witness && self.judged_expiry_ns.is_none() {
            self.judged_expiry_ns = Some(now_ns + remaining_ms * 1_000_000);
        }
    }

    fn granted(&mut self, lease: &Lease, sent_ns: u64, now_ns: u64, out: &mut Vec<Out>) {
        if lease.holder.as_ref() != Some(&self.config.me) {
            return;
        }
        let given = Deadline::after_send(&self.bounds(), sent_ns);
        match &mut self.phase {
            Phase::Active {
                epoch,
                deadline,
                installed,
            } if *epoch == lease.epoch => {
                deadline.extend(given);
                *installed = true;
            }
            Phase::Moving { epoch, deadline } if *epoch == lease.epoch => deadline.extend(given),
            Phase::Standby if self.durable.pending.is_none() && given.allows(now_ns) => {
                self.phase = Phase::Active {
                    epoch: lease.epoch,
                    deadline: given,
                    installed: true,
                };
                self.judged_expiry_ns = None;
                self.raise_known_epoch(lease.epoch, out);
                out.push(Out::Changed {
                    active: true,
                    epoch: lease.epoch,
                    reason: "the witness granted the lease",
                });
            }
            _ => {}
        }
    }

    fn refused(&mut self, request: &LeaseRequest, reason: Refusal, out: &mut Vec<Out>) {
        let holding = matches!(
            request,
            LeaseRequest::Renew { .. } | LeaseRequest::Install { .. }
        );
        if !holding {
            return;
        }
        match reason {
            Refusal::EpochMismatch | Refusal::HolderMismatch | Refusal::OldGeneration => self
                .step_down(
                    "the witness refused the renewal: another manager holds it",
                    out,
                ),
            Refusal::NoLease => {
                // The install did not land: carry the lease over again.
                if let Phase::Active { installed, .. } = &mut self.phase {
                    *installed = false;
                }
            }
            Refusal::WriteFailed => {}
        }
    }

    /// A message from the peer manager.
    pub fn on_peer(&mut self, message: &PeerMessage, now_ns: u64) -> Vec<Out> {
        let mut out = Vec::new();
        self.peer_heard_ns = Some(now_ns);
        match message {
            PeerMessage::Heartbeat {
                known_epoch,
                active,
                choice,
                reaches,
            } => {
                self.peer_reaches.clone_from(reaches);
                self.peer_choice.clone_from(choice);
                self.peer_active = *active;
                if *active && self.active_epoch(now_ns).is_some_and(|e| e < *known_epoch) {
                    self.step_down("the peer holds a newer epoch", &mut out);
                }
            }
            PeerMessage::Propose {
                epoch,
                base_generation,
                to,
            } => {
                let accepted = self.consider(*epoch, *base_generation, to, now_ns, &mut out);
                out.push(Out::Peer(PeerMessage::Answer {
                    accepted,
                    choice: self.durable.choice.clone(),
                    known_epoch: self.durable.known_epoch,
                    active: self.is_active(now_ns),
                }));
            }
            PeerMessage::Answer {
                choice,
                known_epoch,
                ..
            } => self.answered(choice.as_ref(), *known_epoch, now_ns, &mut out),
        }
        out
    }

    /// Whether to record the peer's proposal (see the module's invariants).
    fn consider(
        &mut self,
        epoch: u64,
        base_generation: u64,
        to: &WitnessChoice,
        now_ns: u64,
        out: &mut Vec<Out>,
    ) -> bool {
        if self.durable.choice.as_ref() == Some(to) {
            return true; // a repeat of what was recorded
        }
        let current_generation = self.durable.choice.as_ref().map_or(0, |c| c.generation);
        let acceptable = !self.is_active(now_ns)
            && !matches!(self.phase, Phase::Moving { .. })
            && self.durable.pending.is_none()
            && epoch >= self.durable.known_epoch
            && base_generation == current_generation
            && to.generation == base_generation + 1
            && self.reaches(&to.host, now_ns);
        if !acceptable {
            return false;
        }
        self.durable.choice = Some(to.clone());
        self.durable.known_epoch = self.durable.known_epoch.max(epoch);
        self.witness_epoch = epoch;
        self.judged_expiry_ns = None;
        self.persist(out);
        true
    }

    /// The peer answered this manager's proposal.
    fn answered(
        &mut self,
        theirs: Option<&WitnessChoice>,
        known_epoch: u64,
        now_ns: u64,
        out: &mut Vec<Out>,
    ) {
        let Some(pending) = self.durable.pending.clone() else {
            return;
        };
        let agreed = theirs.filter(|theirs| {
            theirs.generation == pending.generation
                && theirs.proposer_epoch == pending.proposer_epoch
        });
        // The peer recorded one of this manager's proposals for that generation (this one, or
        // an earlier one that arrived late): that is the choice now.
        if let Some(agreed) = agreed {
            self.adopt(agreed.clone(), now_ns, out);
            return;
        }
        if known_epoch > pending.proposer_epoch {
            // The peer holds or held a newer epoch, which the witness granted only after this
            // manager's lease expired: its lease is over; follow the peer's choice.
            self.durable.pending = None;
            self.durable.choice = theirs.cloned();
            self.raise_known_epoch(known_epoch, out);
            self.persist(out);
            self.step_down("the peer holds a newer epoch", out);
            return;
        }
        // Refused (e.g. the peer does not reach that host): the generation stays committed;
        // the next tick proposes another host for it.
        if let Some(host) = self
            .candidate_host(Some(&pending.host), now_ns)
            .filter(|h| *h != pending.host)
        {
            self.durable.pending = Some(WitnessChoice { host, ..pending });
            self.persist(out);
        }
    }

    /// Both managers recorded `choice`: carry the lease over if still active.
    fn adopt(&mut self, choice: WitnessChoice, now_ns: u64, out: &mut Vec<Out>) {
        self.durable.choice = Some(choice);
        self.durable.pending = None;
        self.persist(out);
        self.last_witness_ok_ns = Some(now_ns);
        match self.phase {
            Phase::Moving { epoch, deadline } if deadline.allows(now_ns) => {
                self.phase = Phase::Active {
                    epoch,
                    deadline,
                    installed: false,
                };
                let choice = self.durable.choice.clone().expect("just set");
                out.push(self.install(&choice, epoch));
            }
            _ => self.step_down("the lease deadline passed during the witness move", out),
        }
    }
}
