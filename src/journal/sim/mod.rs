//! Deterministic simulation of the commit protocol (docs/commit-protocol.md): one source
//! and one target agent, each a state machine over an in-memory journal of real
//! [`Record`](crate::journal::Record)s, driven by a seeded scheduler through crashes, torn
//! appends, lost, duplicated and delayed messages, timeouts, operator aborts and guest
//! writes.
//!
//! What is production code here: the records, [`fold`](crate::journal::fold) (every append
//! passes `fold::check`, every restart replays with `fold::fold`), and the decisions of
//! [`commit`](crate::journal::commit): the restart table, the target's fenced answer to an
//! in-doubt query, its commit decision, and `agree`/`status`. What is modelled: the agents'
//! protocol steps (`source.rs`, `target.rs`), TCP connections (`net.rs`), the journal's
//! durability (`log.rs`), the disk images as a count of the guest writes they hold, and the
//! scheduler (`schedule.rs`).
//!
//! Invariants checked after every step ([`World::check`]):
//! 1. At most one side serves guest writes: never the source locally while the target
//!    serves; the target only with a durable `TargetCommitted`; the source only while its
//!    journal says it is authoritative.
//! 2. The journals agree ([`commit::agree`](crate::journal::commit::agree)) as they are, and
//!    as they would be if either pending append lands: a committed target has a source that
//!    began a switchover and never cancelled it; a switched source has a committed target.
//! 3. No acknowledged write is lost: the authoritative side (the target once its commit is
//!    durable, the source before) holds every write the guest saw acknowledged, and a write
//!    is only applied to a side holding all earlier ones.
//!
//! Liveness ([`World::drive`]): after the fault phase both agents are restarted and faults
//! stop; within `settle_steps_max` steps the run must reach a decided end (migrated: the
//! target serves and the source forwards; not migrated: the source aborted and the target
//! confirmed), `commit::status` must give that verdict, and a guest write must succeed.
//!
//! Determinism: one [`SplitMix64`] per seed, vectors only (no hash order), no clock. A failed
//! seed is replayed with tracing on to print every step.

mod log;
pub mod net;
mod schedule;
mod source;
mod target;

use crate::journal::commit::{self, Peer, Verdict};
use crate::journal::fold::{JobKey, JobView, TargetPhase};
use crate::journal::{Authority, Role, Side};
use crate::prng::SplitMix64;

pub use log::SimLog;
pub use net::{Body, Net, Node};
pub use schedule::Action;
pub use source::{SourceMode, SourceNode, Stream};
pub use target::TargetNode;

/// The one job of every run.
pub const JOB_ID: u64 = 7;
/// The job in the source's journal.
pub const SOURCE_KEY: JobKey = JobKey {
    job_id: JOB_ID,
    role: Role::Source,
};
/// The job in the target's journal.
pub const TARGET_KEY: JobKey = JobKey {
    job_id: JOB_ID,
    role: Role::Target,
};

/// A run's parameters; [`SimOptions::swarm`] draws them per seed (TigerBeetle's swarm
/// testing: some seeds crash a lot, some never, some lose every other message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimOptions {
    /// Steps with faults before the agents are healed.
    pub fault_steps: u32,
    /// Steps after healing within which the run must be decided.
    pub settle_steps_max: u32,
    /// Weight of crashing each agent that is up.
    pub crash_weight: u32,
    /// Weight of breaking each connection with messages in flight.
    pub break_weight: u32,
    /// Weight of duplicating each idempotent message at a connection's head.
    pub duplicate_weight: u32,
    /// Weight of the source's timer firing while it waits for an answer.
    pub timeout_weight: u32,
    /// Weight of an operator's `ferry abort` on the source.
    pub abort_weight: u32,
    /// Weight of the source deferring a switchover after holding writes.
    pub defer_weight: u32,
    /// Chance that an append in progress lands when its agent crashes (else it is torn).
    pub land_per_mille: u32,
    /// Chance that a crash also loses what the agent had sent (power loss, not a kill).
    pub lose_outgoing_per_mille: u32,
    /// Weight of stalling each connection with messages in flight (delays them for long).
    pub stall_weight: u32,
    /// Whether the target fences streams before answering "not committed". Only a test
    /// that shows the checker catches the unfenced protocol turns this off.
    pub fence_queries: bool,
}

impl SimOptions {
    /// Parameters drawn from `seed`.
    pub fn swarm(seed: u64) -> SimOptions {
        let mut prng = SplitMix64::new(seed ^ 0xC0_5117_5EED);
        SimOptions {
            fault_steps: 100 + u32::try_from(prng.below(300)).expect("below 300"),
            settle_steps_max: 1500,
            crash_weight: prng.pick(&[0, 1, 2, 4]),
            break_weight: prng.pick(&[0, 1, 3, 6]),
            duplicate_weight: prng.pick(&[0, 2, 5]),
            timeout_weight: prng.pick(&[1, 3, 8]),
            abort_weight: prng.pick(&[0, 0, 1]),
            defer_weight: prng.pick(&[0, 3]),
            land_per_mille: prng.pick(&[0, 500, 1000]),
            lose_outgoing_per_mille: prng.pick(&[0, 500, 1000]),
            stall_weight: prng.pick(&[0, 1, 3]),
            fence_queries: true,
        }
    }
}

/// Counters over a run, for the test's summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Agent crashes.
    pub crashes: u64,
    /// Crashes that tore an append in progress.
    pub torn_appends: u64,
    /// Crashes during an append that landed anyway.
    pub landed_appends: u64,
    /// In-doubt queries answered "committed".
    pub answers_committed: u64,
    /// In-doubt queries answered "not committed" (after fencing).
    pub answers_not_committed: u64,
    /// Commits the target refused (fenced stream, aborted or unknown job).
    pub commits_refused: u64,
    /// Switchovers cancelled by the source.
    pub cancels: u64,
    /// Operator aborts refused: the source in doubt or switched, the target committed.
    pub aborts_refused: u64,
    /// Guest writes acknowledged.
    pub writes_acked: u64,
    /// Guest writes not acknowledged (held, or no side serving).
    pub writes_waiting: u64,
}

impl SimStats {
    /// Adds `other` to these counters.
    pub fn add(&mut self, other: &SimStats) {
        self.crashes += other.crashes;
        self.torn_appends += other.torn_appends;
        self.landed_appends += other.landed_appends;
        self.answers_committed += other.answers_committed;
        self.answers_not_committed += other.answers_not_committed;
        self.commits_refused += other.commits_refused;
        self.cancels += other.cancels;
        self.aborts_refused += other.aborts_refused;
        self.writes_acked += other.writes_acked;
        self.writes_waiting += other.writes_waiting;
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimOutcome {
    /// `commit::status` of the final journals: migrated or not migrated.
    pub verdict: Verdict,
    /// Steps taken in all.
    pub steps: u64,
    /// Steps the settle phase took.
    pub settle_steps: u64,
    /// Counters.
    pub stats: SimStats,
}

/// A broken invariant, with what it takes to replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimFailure {
    /// The seed (`SIM_SEED=N` replays it).
    pub seed: u64,
    /// The step that broke it.
    pub step: u64,
    /// What broke.
    pub problem: String,
    /// One line per step up to the failure.
    pub trace: Vec<String>,
}

impl std::fmt::Display for SimFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for line in &self.trace {
            writeln!(f, "{line}")?;
        }
        write!(
            f,
            "seed {} failed at step {}: {} (replay with SIM_SEED={})",
            self.seed, self.step, self.problem, self.seed
        )
    }
}

/// Runs seed `seed`: faults, healing, settling, every invariant after every step. On a
/// failure the seed is run again with tracing on, for the report.
pub fn run(seed: u64, options: &SimOptions) -> Result<SimOutcome, SimFailure> {
    let mut world = World::new(seed, options.clone());
    match world.drive() {
        Ok(outcome) => Ok(outcome),
        Err(problem) => {
            let mut traced = World::new(seed, options.clone());
            traced.trace = Some(Vec::new());
            let _ = traced.drive();
            Err(SimFailure {
                seed,
                step: world.steps,
                problem,
                trace: traced.trace.unwrap_or_default(),
            })
        }
    }
}

/// The two agents, the network and the guest; see the module docs.
#[derive(Debug)]
pub struct World {
    options: SimOptions,
    prng: SplitMix64,
    /// The source agent.
    pub source: SourceNode,
    /// The target agent.
    pub target: TargetNode,
    /// Connections and messages in flight.
    pub net: Net,
    /// Guest writes acknowledged so far; write number n is the n-th acknowledged.
    pub acked_writes: u64,
    steps: u64,
    /// Counters.
    pub stats: SimStats,
    trace: Option<Vec<String>>,
}

impl World {
    /// A world before the job starts: both agents up, empty journals.
    pub fn new(seed: u64, options: SimOptions) -> World {
        World {
            options,
            prng: SplitMix64::new(seed),
            source: SourceNode::new(),
            target: TargetNode::new(),
            net: Net::default(),
            acked_writes: 0,
            steps: 0,
            stats: SimStats::default(),
            trace: None,
        }
    }

    /// The fault phase, healing, then settling until decided; see the module docs.
    pub fn drive(&mut self) -> Result<SimOutcome, String> {
        for _ in 0..self.options.fault_steps {
            let action = self.pick(false)?;
            self.step(action)?;
        }
        for node in [Node::Source, Node::Target] {
            if !self.is_up(node) {
                self.step(Action::Restart { node })?;
            }
        }
        let settle_start = self.steps;
        for _ in 0..self.options.settle_steps_max {
            if let Some(verdict) = self.decided() {
                self.check_end(verdict)?;
                return Ok(SimOutcome {
                    verdict,
                    steps: self.steps,
                    settle_steps: self.steps - settle_start,
                    stats: self.stats.clone(),
                });
            }
            let action = self.pick(true)?;
            self.step(action)?;
        }
        Err(format!(
            "not decided {} steps after the faults stopped",
            self.options.settle_steps_max
        ))
    }

    /// Applies `action` and checks every invariant.
    pub fn step(&mut self, action: Action) -> Result<(), String> {
        self.steps += 1;
        let described = self.trace.is_some().then(|| self.describe(action));
        let result = self.apply(action).and_then(|()| self.check());
        if let Some(described) = described {
            let state = self.state_line();
            if let Some(trace) = &mut self.trace {
                trace.push(format!("{:>5} {described:<44} | {state}", self.steps));
            }
        }
        result
    }

    fn apply(&mut self, action: Action) -> Result<(), String> {
        match action {
            Action::Deliver { msg } => {
                let msg = self.net.take(msg);
                match msg.to {
                    Node::Source => self.source_receive(msg.conn, msg.body),
                    Node::Target => self.target_receive(msg.conn, msg.body),
                }
            }
            Action::Duplicate { msg } => {
                self.net.duplicate(msg);
                Ok(())
            }
            Action::Break { conn } => {
                self.net.break_conn(conn);
                Ok(())
            }
            Action::Stall { conn } => {
                self.net.stall(conn);
                Ok(())
            }
            Action::Crash {
                node,
                lands,
                lose_outgoing,
            } => {
                self.crash(node, lands, lose_outgoing);
                Ok(())
            }
            Action::Restart { node: Node::Source } => self.source_restart(),
            Action::Restart { node: Node::Target } => self.target_restart(),
            Action::Complete { node: Node::Source } => self.source_complete(),
            Action::Complete { node: Node::Target } => self.target_complete(),
            Action::GuestWrite => self.guest_write(),
            Action::Start => self.source_start(),
            Action::Open => {
                self.source_open();
                Ok(())
            }
            Action::Copy => {
                self.source_copy();
                Ok(())
            }
            Action::Hold => self.source_hold(),
            Action::Defer => self.source_defer(),
            Action::Begin => self.source_begin(),
            Action::Finish => self.source.log.begin_append(source::finished()),
            Action::Timeout => self.source_timeout(),
            Action::OperatorAbort => self.operator_abort(),
            Action::Checkpoint => self.target_checkpoint(),
            Action::TargetAbort => self.target_operator_abort(),
        }
    }

    fn crash(&mut self, node: Node, lands: bool, lose_outgoing: bool) {
        self.stats.crashes += 1;
        let log = match node {
            Node::Source => &mut self.source.log,
            Node::Target => &mut self.target.log,
        };
        if log.is_appending() {
            if lands {
                self.stats.landed_appends += 1;
            } else {
                self.stats.torn_appends += 1;
            }
        }
        log.crash(lands);
        match node {
            Node::Source => self.source.crash(),
            Node::Target => self.target.crash(),
        }
        self.net.crash(node, lose_outgoing);
    }

    fn is_up(&self, node: Node) -> bool {
        match node {
            Node::Source => self.source.mode != SourceMode::Down,
            Node::Target => self.target.up,
        }
    }

    fn is_appending(&self, node: Node) -> bool {
        match node {
            Node::Source => self.source.log.is_appending(),
            Node::Target => self.target.log.is_appending(),
        }
    }

    /// The guest writes through the source's export: applied and acknowledged by the side
    /// that serves, if one does; otherwise it waits (not acknowledged). Images are written
    /// with FUA, so an acknowledged write is durable.
    fn guest_write(&mut self) -> Result<(), String> {
        let acked = self.acked_writes;
        let (side, image) = if self.source.serves_locally() {
            ("source", self.source.applied_writes)
        } else if self.source.forwards() && self.target.up && self.target.serving {
            ("target", self.target.applied_writes)
        } else {
            self.stats.writes_waiting += 1;
            return Ok(());
        };
        if image != acked {
            return Err(format!(
                "write {} applied to the {side}, whose image holds {image} of {acked} \
                 acknowledged writes",
                acked + 1
            ));
        }
        if side == "source" {
            self.source.applied_writes += 1;
        } else {
            self.target.applied_writes += 1;
            self.target.synced_writes = self.target.applied_writes;
        }
        self.acked_writes += 1;
        self.stats.writes_acked += 1;
        Ok(())
    }

    /// The invariants of the module docs.
    pub fn check(&self) -> Result<(), String> {
        let source_view = self.source.log.view(SOURCE_KEY);
        let target_view = self.target.log.view(TARGET_KEY);
        let target_committed = target_view.is_some_and(is_committed);
        if self.source.serves_locally() && self.target.serving {
            return Err("source and target both serve guest writes".to_owned());
        }
        if self.target.serving && !target_committed {
            return Err("the target serves without a durable TargetCommitted".to_owned());
        }
        if self.source.serves_locally()
            && source_view.is_some_and(|view| view.authority() != Authority::Source)
        {
            return Err("the source serves while its journal says it is not authoritative".into());
        }
        let source_landed = self.source.log.view_if_landed(SOURCE_KEY);
        let target_landed = self.target.log.view_if_landed(TARGET_KEY);
        for source in [source_view, source_landed.as_ref()] {
            for target in [target_view, target_landed.as_ref()] {
                commit::agree(source, target).map_err(|problem| {
                    format!(
                        "journals disagree ({} / {}): {problem}",
                        phase(source),
                        phase(target)
                    )
                })?;
            }
        }
        let (side, held) = if target_committed {
            ("target", self.target.synced_writes)
        } else {
            ("source", self.source.applied_writes)
        };
        if held != self.acked_writes {
            return Err(format!(
                "the authoritative {side} holds {held} of {} acknowledged writes",
                self.acked_writes
            ));
        }
        Ok(())
    }

    /// The verdict, once the run reached a decided end.
    fn decided(&self) -> Option<Verdict> {
        if self.source.log.is_appending() || self.target.log.is_appending() {
            return None;
        }
        match self.source.mode {
            SourceMode::Forwarding | SourceMode::Finished
                if self.target.up && self.target.serving =>
            {
                Some(Verdict::Migrated)
            }
            SourceMode::Aborted {
                confirmed: true, ..
            } => Some(Verdict::NotMigrated),
            _ => None,
        }
    }

    /// At a decided end: `commit::status` agrees, and the guest can write.
    fn check_end(&mut self, verdict: Verdict) -> Result<(), String> {
        let status = commit::status(
            peer(self.source.log.view(SOURCE_KEY)),
            peer(self.target.log.view(TARGET_KEY)),
        );
        if status.verdict != verdict {
            return Err(format!("ended {verdict} but status says {status:?}"));
        }
        let acked = self.acked_writes;
        self.step(Action::GuestWrite)?;
        if self.acked_writes != acked + 1 {
            return Err(format!("ended {verdict} but no side takes a guest write"));
        }
        Ok(())
    }
}

/// A journal's view as `commit::status` takes it.
fn peer(view: Option<&JobView>) -> Peer<'_> {
    view.map_or(Peer::NoJob, Peer::Job)
}

/// Whether a target view is committed.
fn is_committed(view: &JobView) -> bool {
    matches!(&view.side, Side::Target(target) if target.phase == TargetPhase::Committed)
}

/// A view's phase name, or "none".
fn phase(view: Option<&JobView>) -> &'static str {
    view.map_or("none", JobView::phase_name)
}

#[cfg(test)]
mod tests;
