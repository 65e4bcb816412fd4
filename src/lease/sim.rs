//! Deterministic simulation of the manager pair: two [`Role`]s, hosts whose agents are
//! witnesses ([`Witness`]) and keep an epoch fence, a network with delay, loss and
//! partitions, crashes and restarts, paused processes, slow witness disks, drains, and
//! clocks whose rates drift within the configured bound.
//!
//! Everything comes from one seeded [`SplitMix64`]; true time is the event queue's, each node
//! reads its own clock (`offset + rate · true`), so a seed replays exactly (`SIM_SEED=N`).
//!
//! Checks, after every event ([`Violation`]): at most one manager acts as active at any true
//! time; the epochs of successive active intervals only grow; no agent executes a command of
//! an epoch older than one it has seen. After the faults stop and everything heals, some
//! manager is active ([`SimReport::active_at_end`]).
//!
//! Model notes: a witness serves one pair's requests one at a time, a record write holding
//! the queue until it lands or times out (as the agent does); a write that times out may land
//! later. A paused manager (SIGSTOP) handles nothing until it resumes and its clock keeps
//! running; a crashed one loses everything but [`RoleDurable`]; a crashed host loses its
//! witness's memory, keeps the landed record, and restarts with a new clock origin.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::holder::HolderBounds;
use super::role::{PeerMessage, RoleConfig, Rules};
use super::witness::{LeaseReply, LeaseRequest};
use super::{Lease, ManagerId};
pub use crate::prng::{seeds_from_env, SeedReport, SplitMix64};

mod violation;
mod world;

pub use violation::Violation;

const MS: u64 = 1_000_000;

/// The simulated world's parameters.
#[derive(Debug, Clone)]
pub struct SimOptions {
    /// Hosts whose agents may be witness.
    pub hosts: usize,
    /// Lease duration.
    pub lease_ms: u32,
    /// Renewal interval.
    pub renew_interval_ms: u32,
    /// The configured clock-rate drift bound; clocks drift within it.
    pub drift_ppm: u32,
    /// The holder's margin.
    pub margin_ms: u32,
    /// One-way message delay, uniform in `0..=delay_ms_max`.
    pub delay_ms_max: u32,
    /// Messages lost, per mille, until the heal.
    pub loss_per_mille: u32,
    /// Mean time between injected faults (0: none).
    pub fault_every_ms: u64,
    /// Longest a witness record write takes while its disk is slow.
    pub slow_write_ms_max: u32,
    /// The witness's write timeout.
    pub write_timeout_ms: u32,
    /// Simulated time.
    pub duration_ms: u64,
    /// Faults stop and everything heals this long before the end.
    pub heal_ms: u64,
    /// Rules the managers follow.
    pub rules: Rules,
    /// Scripted faults: at a true time (ms), one of [`Scripted`].
    pub script: Vec<(u64, Scripted)>,
}

/// A scripted fault, aimed at whoever holds the role when it strikes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scripted {
    /// kill -9 the active manager for this long (ms).
    KillActive(u64),
    /// Cut the active from every other node for this long.
    IsolateActive(u64),
    /// Cut the active from the witness host only.
    CutActiveFromWitness(u64),
    /// Cut the two managers apart (both still reach every host).
    CutManagers(u64),
    /// Crash the witness host for this long.
    CrashWitness(u64),
    /// Restart the witness agent at once (its memory is lost, its record stays).
    RestartWitness,
    /// Drain the witness host for this long.
    DrainWitness(u64),
    /// SIGSTOP the active for this long, then SIGCONT.
    PauseActive(u64),
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            hosts: 4,
            lease_ms: 4_000,
            renew_interval_ms: 1_000,
            drift_ppm: 2_000,
            margin_ms: 50,
            delay_ms_max: 20,
            loss_per_mille: 10,
            fault_every_ms: 3_000,
            slow_write_ms_max: 1_500,
            write_timeout_ms: 500,
            duration_ms: 90_000,
            heal_ms: 20_000,
            rules: Rules::default(),
            script: Vec::new(),
        }
    }
}

impl SimOptions {
    fn role_config(&self, me: usize) -> RoleConfig {
        RoleConfig {
            me: manager_id(me),
            peer: manager_id(1 - me),
            bounds: HolderBounds {
                lease_ms: self.lease_ms,
                drift_ppm: self.drift_ppm,
                margin_ms: self.margin_ms,
            },
            renew_interval_ms: self.renew_interval_ms,
            reach_timeout_ms: self.renew_interval_ms * 5 / 2,
            rules: self.rules,
        }
    }
}

/// The manager ids of the simulation: `m1`, `m2`.
pub fn manager_id(index: usize) -> ManagerId {
    ManagerId::new(&format!("m{}", index + 1)).expect("a valid name")
}

/// The host names of the simulation: `h1`...
pub fn host_name(index: usize) -> String {
    format!("h{}", index + 1)
}

/// What one run measured.
#[derive(Debug, Clone, Default)]
pub struct SimReport {
    /// Events processed.
    pub events: u64,
    /// Times a manager became active.
    pub activations: u32,
    /// Activations by the other manager than the previous active (failovers).
    pub failovers: u32,
    /// Witness moves both managers recorded (the highest generation reached, less one).
    pub witness_moves: u64,
    /// Commands agents executed, and refused as stale.
    pub commands_executed: u64,
    /// Commands refused by an agent's fence.
    pub commands_fenced: u64,
    /// Longest time with no active manager after the first activation, in milliseconds.
    pub longest_gap_ms: u64,
    /// Whether a manager was active at the end (after the heal).
    pub active_at_end: bool,
    /// The highest epoch granted.
    pub highest_epoch: u64,
    /// For each scripted fault: time until a manager was active again, in ms (0 when the
    /// active stayed active throughout).
    pub recovery_ms: Vec<u64>,
}

/// A scheduled event.
#[derive(Debug, Clone)]
enum Event {
    /// A manager's tick, for its incarnation (a restart starts a new chain).
    Tick(usize, u32),
    Peer {
        to: usize,
        message: PeerMessage,
    },
    AtWitness {
        host: usize,
        from: usize,
        request: LeaseRequest,
        sent_ns: u64,
    },
    /// A record write finished in time (`ok`) or timed out; the witness replies.
    Written {
        host: usize,
        crash_count: u32,
        pending: Box<PendingWrite>,
        ok: bool,
    },
    /// A timed-out write lands on the disk after all.
    Landed {
        host: usize,
        crash_count: u32,
        lease: Lease,
    },
    Reply {
        to: usize,
        host: usize,
        request: LeaseRequest,
        sent_ns: u64,
        reply: LeaseReply,
    },
    Pong {
        to: usize,
        host: usize,
    },
    Command {
        host: usize,
        epoch: u64,
    },
    Fault,
    Script(Scripted),
    Heal,
    RestartManager(usize),
    RestartHost(usize),
    Reconnect(usize, usize),
    Undrain(usize),
    DiskFast(usize),
}

/// A witness write in progress and whom to answer.
#[derive(Debug, Clone)]
struct PendingWrite {
    from: usize,
    request: LeaseRequest,
    sent_ns: u64,
    lease: Lease,
    reply: LeaseReply,
    decided_ns: u64,
}

/// Runs one seed of the world in `options`; `Err` names the first broken invariant.
pub fn run(seed: u64, options: &SimOptions) -> Result<SimReport, Violation> {
    let mut world = world::World::new(seed, options.clone());
    world.run()
}

/// The event queue: true time, then insertion order.
#[derive(Debug, Default)]
struct Queue {
    heap: BinaryHeap<Reverse<(u64, u64, usize)>>,
    events: Vec<Option<Event>>,
    next_seq: u64,
}

impl Queue {
    fn push(&mut self, at_ns: u64, event: Event) {
        self.events.push(Some(event));
        self.heap
            .push(Reverse((at_ns, self.next_seq, self.events.len() - 1)));
        self.next_seq += 1;
    }

    fn pop(&mut self) -> Option<(u64, Event)> {
        let Reverse((at_ns, _, index)) = self.heap.pop()?;
        let event = self.events[index].take()?;
        Some((at_ns, event))
    }
}
