//! The scheduler of the commit simulation: which steps are possible now, how likely each
//! is, and how a step reads in a trace.
//!
//! During the fault phase everything possible may happen, weighted by the seed's
//! [`SimOptions`](super::SimOptions). While settling there are no faults, no operator and
//! no deferral, and the source's timer fires only when nothing else but a guest write can
//! happen: a run that still does not decide is stuck, which is a liveness failure.

use super::net::Node;
use super::phase;
use super::{SimLog, SourceMode, Stream, World, SOURCE_KEY, TARGET_KEY};

/// Weight of one enabled protocol step (a delivery, an append completing, a copy...).
const WEIGHT_STEP: u32 = 20;
/// Weight of a restart of an agent that is down, during the fault phase.
const WEIGHT_RESTART: u32 = 8;

/// One scheduler step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// The network delivers the message with this id.
    Deliver {
        /// Message id.
        msg: u64,
    },
    /// The network duplicates an idempotent message (a retry).
    Duplicate {
        /// Message id.
        msg: u64,
    },
    /// A connection breaks; everything on it is lost.
    Break {
        /// Connection id.
        conn: u64,
    },
    /// A connection stalls: its messages are delayed far behind others'.
    Stall {
        /// Connection id.
        conn: u64,
    },
    /// An agent crashes: volatile state gone, its pending append lands or is torn.
    Crash {
        /// Which agent.
        node: Node,
        /// Whether the pending append (if any) reached the disk.
        lands: bool,
        /// Whether what it had sent is lost too.
        lose_outgoing: bool,
    },
    /// An agent restarts: replay, then the restart action of `commit::restart`.
    Restart {
        /// Which agent.
        node: Node,
    },
    /// An agent's pending append becomes durable and it acts on it.
    Complete {
        /// Which agent.
        node: Node,
    },
    /// The guest tries a write through the source's export.
    GuestWrite,
    /// Source: start the job (append `SourceStarted`).
    Start,
    /// Source: open a block stream (Open).
    Open,
    /// Source: send a copy pass (Blocks).
    Copy,
    /// Source: hold guest writes for a switchover.
    Hold,
    /// Source: the pause would not fit; release writes and copy on.
    Defer,
    /// Source: append `SourceSwitchoverBegun`, then send the final blocks and Commit.
    Begin,
    /// Source: the guest moved to the target; append `SourceFinished`.
    Finish,
    /// Source: its timer fires while it waits (OpenOk, CommitOk, an answer, AbortOk).
    Timeout,
    /// Operator: `ferry abort` on the source.
    OperatorAbort,
    /// Operator: `ferry abort` on the target (drops an uncommitted image).
    TargetAbort,
    /// Target: fdatasync received blocks and append a `TargetReceived` checkpoint.
    Checkpoint,
}

impl World {
    /// Picks the next action among those enabled, by weight.
    pub(super) fn pick(&mut self, settling: bool) -> Result<Action, String> {
        let mut actions = self.enabled(settling);
        if settling
            && actions
                .iter()
                .all(|(action, _)| *action == Action::GuestWrite)
        {
            // Nothing moves by itself: the source's timer is the only way on.
            if self.source.is_waiting() && !self.source.log.is_appending() {
                actions.push((Action::Timeout, WEIGHT_STEP));
            } else {
                return Err("stuck: nothing can happen but guest writes".to_owned());
            }
        }
        let total: u64 = actions.iter().map(|(_, weight)| u64::from(*weight)).sum();
        let mut point = self.prng.below(total);
        let mut chosen = actions[0].0;
        for (action, weight) in actions {
            if point < u64::from(weight) {
                chosen = action;
                break;
            }
            point -= u64::from(weight);
        }
        if let Action::Crash { node, .. } = chosen {
            chosen = Action::Crash {
                node,
                lands: self.prng.chance(self.options.land_per_mille),
                lose_outgoing: self.prng.chance(self.options.lose_outgoing_per_mille),
            };
        }
        Ok(chosen)
    }

    /// Every action possible now, with its weight (zero weights left out).
    fn enabled(&self, settling: bool) -> Vec<(Action, u32)> {
        let faults = !settling;
        let options = &self.options;
        let mut actions = vec![(Action::GuestWrite, if settling { 2 } else { 10 })];
        for msg in self.net.deliverable() {
            let (to, conn) = self
                .net
                .get(msg)
                .map(|m| (m.to, m.conn))
                .expect("deliverable");
            if self.is_up(to) && !self.is_appending(to) {
                let weight = if self.net.is_slow(conn) {
                    1
                } else {
                    WEIGHT_STEP
                };
                actions.push((Action::Deliver { msg }, weight));
            }
            let idempotent = self.net.get(msg).expect("deliverable").body.may_duplicate();
            if faults && idempotent {
                actions.push((Action::Duplicate { msg }, options.duplicate_weight));
            }
        }
        if faults {
            for conn in self.net.busy_conns() {
                actions.push((Action::Break { conn }, options.break_weight));
                if !self.net.is_slow(conn) {
                    actions.push((Action::Stall { conn }, options.stall_weight));
                }
            }
        }
        for node in [Node::Source, Node::Target] {
            if !self.is_up(node) {
                actions.push((Action::Restart { node }, WEIGHT_RESTART));
                continue;
            }
            if self.is_appending(node) {
                actions.push((Action::Complete { node }, WEIGHT_STEP));
            }
            if faults {
                let crash = Action::Crash {
                    node,
                    lands: false,
                    lose_outgoing: false,
                };
                actions.push((crash, options.crash_weight));
            }
        }
        self.source_actions(settling, &mut actions);
        if faults && self.target.up && !self.target.log.is_appending() {
            if self.target.may_checkpoint() {
                actions.push((Action::Checkpoint, 3));
            }
            if self.target.phase().is_some() {
                actions.push((Action::TargetAbort, options.abort_weight));
            }
        }
        actions.retain(|(_, weight)| *weight > 0);
        actions
    }

    /// The source's own steps.
    fn source_actions(&self, settling: bool, actions: &mut Vec<(Action, u32)>) {
        if self.source.mode == SourceMode::Down || self.source.log.is_appending() {
            return;
        }
        let options = &self.options;
        let (copy_weight, hold_weight) = if settling { (2, 10) } else { (10, 5) };
        match self.source.mode {
            SourceMode::Idle => actions.push((Action::Start, 10)),
            SourceMode::Copying { stream: None } => actions.push((Action::Open, 10)),
            SourceMode::Copying {
                stream: Some(Stream { ready: true, .. }),
            } => {
                actions.push((Action::Copy, copy_weight));
                actions.push((Action::Hold, hold_weight));
            }
            SourceMode::Held { .. } => {
                actions.push((Action::Begin, 10));
                if !settling {
                    actions.push((Action::Defer, options.defer_weight));
                }
            }
            SourceMode::Forwarding if !settling => actions.push((Action::Finish, 2)),
            _ => {}
        }
        if !settling {
            if self.source.is_waiting() {
                actions.push((Action::Timeout, options.timeout_weight));
            }
            if self.source.mode != SourceMode::Idle {
                actions.push((Action::OperatorAbort, options.abort_weight));
            }
        }
    }

    /// One line of the trace for `action`, before it runs.
    pub(super) fn describe(&self, action: Action) -> String {
        match action {
            Action::Deliver { msg } | Action::Duplicate { msg } => {
                let message = self.net.get(msg).expect("in flight");
                let verb = if matches!(action, Action::Deliver { .. }) {
                    "deliver"
                } else {
                    "duplicate"
                };
                format!(
                    "{verb} {:?} to {} on conn {}",
                    message.body, message.to, message.conn
                )
            }
            other => format!("{other:?}"),
        }
    }

    /// The state after a step, for the trace.
    pub(super) fn state_line(&self) -> String {
        let pending = |log: &SimLog| {
            log.pending()
                .map_or(String::new(), |record| format!(" +{}?", record.kind_name()))
        };
        format!(
            "source {:?} [{}{}] image {} | target {}{} [{}{}] image {}/{} | acked {} \
             | in flight {}",
            self.source.mode,
            phase(self.source.log.view(SOURCE_KEY)),
            pending(&self.source.log),
            self.source.applied_writes,
            if self.target.up { "up" } else { "down" },
            if self.target.serving { " serving" } else { "" },
            phase(self.target.log.view(TARGET_KEY)),
            pending(&self.target.log),
            self.target.applied_writes,
            self.target.synced_writes,
            self.acked_writes,
            self.net.in_flight().len()
        )
    }
}
