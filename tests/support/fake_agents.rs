//! Fake agents for the manager's scale runs, shared by `examples/fake_agents.rs` (the
//! benchmark's process, `scripts/bench-manager-scale`) and `tests/manager_scale.rs` (included
//! with `#[path]`): each fake agent is a real control API listener (`ferry::api::listen`)
//! answering through the real router (`ferry::api::server::Context`: token check, epoch
//! fence, lease routes, `/metrics`) with a [`Control`] that keeps everything in memory:
//!
//! | route                    | answer                                                   |
//! |--------------------------|----------------------------------------------------------|
//! | GET  /v1/exports         | `exports_per_agent` exports, one tracker each            |
//! | GET  /v1/status          | `disks_per_agent` `DiskStatus` lines, mixed verdicts     |
//! | POST /v1/leases/{pair}   | an in-memory `lease::witness::Witness` per pair          |
//! | GET  /v1/leases          | those witnesses                                          |
//! | GET  /metrics            | the real renderer over the fake's exports and counters   |
//!
//! Invariants: the fence is an agent's (a lower epoch is refused with 409, a command holds
//! its epoch current while it runs) but kept in memory; a witness record "write" always
//! succeeds at once (`Witness::written(ok = true)`), so a lease is decided exactly as a
//! real witness with a perfect disk decides it; the JSON shapes are the API's own types.
//! A stalled agent ([`Options::stall_agents`]) answers `GET /v1/status` only after
//! [`Options::stall_ms`], as an agent whose destinations do not answer would (a real agent
//! waits up to 3 s per unreachable destination).
#![allow(dead_code)] // each includer uses a part

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ferry::api::leases::{LeaseCall, LeaseReply, LeaseStatus, WitnessCounters};
use ferry::api::server::Context;
use ferry::api::types::{
    DiskStatus, ExportSpec, ExportStats, ExportStatus, HeatMap, TrackerAdd, TrackerState,
    TrackerStatus,
};
use ferry::api::{Control, ControlError, EpochHold};
use ferry::env::{Clock, MonotonicClock};
use ferry::lease::fence::StaleEpoch;
use ferry::lease::witness::Witness;

/// How the fake agents look.
#[derive(Debug, Clone)]
pub struct Options {
    /// Port of agent 0; agent i listens on `base_port + i` (0: any free port).
    pub base_port: u16,
    /// `DiskStatus` lines each agent's `GET /v1/status` returns.
    pub disks_per_agent: usize,
    /// Exports each agent's `GET /v1/exports` (the managers' ping) returns.
    pub exports_per_agent: usize,
    /// API worker threads per agent (the listener thread comes on top).
    pub workers: usize,
    /// This many agents, spread evenly over the fleet, answer `GET /v1/status` slowly.
    pub stall_agents: usize,
    /// How slowly.
    pub stall_ms: u64,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            base_port: 0,
            disks_per_agent: 4,
            exports_per_agent: 2,
            workers: 1,
            stall_agents: 0,
            stall_ms: 0,
        }
    }
}

/// Requests answered, by route, over every agent (for the run's summary).
#[derive(Debug, Default)]
pub struct Counts {
    /// Answered.
    pub exports: AtomicU64,
    /// Answered.
    pub status: AtomicU64,
    /// Answered.
    pub lease: AtomicU64,
    /// Answered.
    pub leases: AtomicU64,
    /// Answered.
    pub stale: AtomicU64,
}

/// One fake agent: canned exports and status lines, an in-memory fence and witnesses.
#[derive(Debug)]
struct FakeAgent {
    exports: Vec<ExportStatus>,
    disks: Vec<DiskStatus>,
    /// The highest manager epoch admitted; a command holds a read guard while it runs, so a
    /// higher epoch (which takes the write lock) waits for the older commands to end.
    fence: RwLock<u64>,
    witnesses: Mutex<HashMap<String, Witness>>,
    clock: Arc<MonotonicClock>,
    counts: Arc<Counts>,
    /// How long `GET /v1/status` takes, when this agent is stalled.
    stall: Option<Duration>,
}

const VERDICTS: [(&str, &str, &str); 4] = [
    ("migrated", "committed", "none"),
    ("resumable", "copying", "`ferry resume wave-1`"),
    ("not-migrated", "aborted", "none"),
    (
        "needs-attention",
        "switching",
        "`ferry status` at the destination",
    ),
];

impl FakeAgent {
    fn new(
        index: usize,
        options: &Options,
        stall: Option<Duration>,
        clock: Arc<MonotonicClock>,
        counts: Arc<Counts>,
    ) -> Self {
        let exports = (0..options.exports_per_agent)
            .map(|e| fake_export(index, e))
            .collect();
        let disks = (0..options.disks_per_agent)
            .map(|d| fake_disk(index, d, options.disks_per_agent))
            .collect();
        Self {
            exports,
            disks,
            fence: RwLock::new(0),
            witnesses: Mutex::new(HashMap::new()),
            clock,
            counts,
            stall,
        }
    }
}

fn fake_export(agent: usize, export: usize) -> ExportStatus {
    let size_bytes = 64u64 << 30;
    let granularity_bytes = 64u64 << 10;
    ExportStatus {
        name: format!("vm{agent}-disk{export}"),
        path: PathBuf::from(format!("/var/lib/images/vm{agent}-disk{export}.img")),
        read_only: false,
        size_bytes,
        granularity_bytes,
        connections: 1,
        trackers: vec![TrackerStatus {
            name: "t64k".into(),
            granularity_bytes,
            block_count: size_bytes / granularity_bytes,
            dirty_blocks: 1234,
            dirty_bytes: 1234 * granularity_bytes,
            lost: false,
            half_life_ms: 30_000,
            memory_bytes: 256 << 10,
            state_bytes: 4096,
            durable: false,
            state: TrackerState::Ok,
        }],
        stats: ExportStats::default(),
        forwarding: None,
        forward_hold_ms: None,
    }
}

fn fake_disk(agent: usize, disk: usize, per_agent: usize) -> DiskStatus {
    let (verdict, phase, action) = VERDICTS[(agent + disk) % VERDICTS.len()];
    let job_id = u64::try_from(agent * per_agent + disk + 1).expect("job ids fit u64");
    DiskStatus {
        job_id,
        batch: Some("wave-1".into()),
        export: format!("vm{agent}-disk{disk}"),
        role: "source".into(),
        phase: phase.into(),
        peer_state: Some(phase.into()),
        peer_unreachable: None,
        destination_bytes: Some(64 << 30),
        verdict: verdict.into(),
        reason: format!("source journal says {phase}; the destination agrees"),
        action: action.into(),
        forwarding: None,
        seed: None,
    }
}

fn refused(what: &str) -> ControlError {
    ControlError::Invalid(format!("a fake agent does not {what}"))
}

impl Control for FakeAgent {
    fn exports(&self) -> Vec<ExportStatus> {
        self.counts.exports.fetch_add(1, Ordering::Relaxed);
        self.exports.clone()
    }
    fn add_export(&self, _: ExportSpec) -> Result<ExportStatus, ControlError> {
        Err(refused("add exports"))
    }
    fn remove_export(&self, _: &str, _: bool) -> Result<(), ControlError> {
        Err(refused("remove exports"))
    }
    fn trackers(&self, export: &str) -> Result<Vec<TrackerStatus>, ControlError> {
        let export = self.exports.iter().find(|e| e.name == export);
        export
            .map(|e| e.trackers.clone())
            .ok_or_else(|| ControlError::NotFound("no such export".into()))
    }
    fn add_tracker(&self, _: &str, _: TrackerAdd) -> Result<TrackerStatus, ControlError> {
        Err(refused("add trackers"))
    }
    fn remove_tracker(&self, _: &str, _: &str) -> Result<(), ControlError> {
        Err(refused("remove trackers"))
    }
    fn heat(&self, _: &str, _: Option<&str>, _: usize) -> Result<HeatMap, ControlError> {
        Err(refused("keep heat maps"))
    }
    fn migration_status(&self, batch: Option<&str>) -> Result<Vec<DiskStatus>, ControlError> {
        self.counts.status.fetch_add(1, Ordering::Relaxed);
        if let Some(stall) = self.stall {
            std::thread::sleep(stall);
        }
        Ok(self
            .disks
            .iter()
            .filter(|disk| batch.is_none_or(|b| disk.batch.as_deref() == Some(b)))
            .cloned()
            .collect())
    }
    fn admit_epoch(&self, epoch: u64) -> Result<EpochHold<'_>, ControlError> {
        loop {
            let held = self.fence.read().unwrap_or_else(|p| p.into_inner());
            if epoch < *held {
                self.counts.stale.fetch_add(1, Ordering::Relaxed);
                let highest = *held;
                return Err(StaleEpoch { epoch, highest }.into());
            }
            if epoch == *held {
                return Ok(EpochHold::new(held));
            }
            drop(held);
            // A higher epoch: raised once every command of the older one has ended.
            let mut highest = self.fence.write().unwrap_or_else(|p| p.into_inner());
            *highest = (*highest).max(epoch);
        }
    }
    fn manager_epoch(&self) -> u64 {
        *self.fence.read().unwrap_or_else(|p| p.into_inner())
    }
    fn lease(&self, pair: &str, call: &LeaseCall) -> Result<LeaseReply, ControlError> {
        self.counts.lease.fetch_add(1, Ordering::Relaxed);
        let mut witnesses = self.witnesses.lock().unwrap_or_else(|p| p.into_inner());
        let now_ns = self.clock.now_ns();
        let witness = witnesses.entry(pair.to_string()).or_default();
        // A perfect disk: every record written at once.
        Ok(witness.answer_in_memory(&call.request, now_ns, call.lease_ms))
    }
    fn leases(&self) -> Vec<LeaseStatus> {
        self.counts.leases.fetch_add(1, Ordering::Relaxed);
        let witnesses = self.witnesses.lock().unwrap_or_else(|p| p.into_inner());
        let now_ns = self.clock.now_ns();
        let mut statuses: Vec<LeaseStatus> = witnesses
            .iter()
            .map(|(pair, witness)| LeaseStatus {
                pair: pair.clone(),
                lease: witness.lease().cloned(),
                remaining_ms: witness.remaining_ms(now_ns),
                error: None,
            })
            .collect();
        statuses.sort_by(|a, b| a.pair.cmp(&b.pair));
        statuses
    }
    fn witness_counters(&self) -> WitnessCounters {
        let witnesses = self.witnesses.lock().unwrap_or_else(|p| p.into_inner());
        WitnessCounters {
            pairs: witnesses.len() as u64,
            write_failures: 0,
        }
    }
}

/// Running fake agents.
#[derive(Debug)]
pub struct Fleet {
    running: Vec<ferry::api::listen::Running>,
    /// `h{i}=127.0.0.1:PORT`, one per agent.
    pub lines: Vec<String>,
    /// Requests answered so far.
    pub counts: Arc<Counts>,
}

impl Fleet {
    /// Starts `count` agents answering callers that present `token`.
    pub fn start(count: usize, token: &str, options: &Options) -> Result<Fleet, String> {
        let clock = Arc::new(MonotonicClock::new());
        let counts = Arc::new(Counts::default());
        let mut fleet = Fleet {
            running: Vec::with_capacity(count),
            lines: Vec::with_capacity(count),
            counts: counts.clone(),
        };
        for index in 0..count {
            let port = match options.base_port {
                0 => 0,
                base => u16::try_from(usize::from(base) + index)
                    .map_err(|_| format!("agent {index}: port past 65535"))?,
            };
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            // Spread evenly: agent i is stalled when (i + 1)·k / count steps past i·k / count.
            let k = options.stall_agents;
            let stalled = (index + 1) * k / count > index * k / count;
            let stall = stalled.then(|| Duration::from_millis(options.stall_ms));
            let agent = FakeAgent::new(index, options, stall, clock.clone(), counts.clone());
            let context = Context::new(token.to_string(), true, Arc::new(agent));
            let name = format!("h{index}");
            let server = ferry::api::listen::start(addr, options.workers, &name, Arc::new(context))
                .map_err(|err| format!("agent {name}: {}", ferry::error::error_chain(&err)))?;
            fleet.lines.push(format!("{name}={}", server.local_addr()));
            fleet.running.push(server);
        }
        Ok(fleet)
    }

    /// `requests exports=.. status=.. lease=.. leases=.. stale=..`
    pub fn counts_line(&self) -> String {
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        format!(
            "requests exports={} status={} lease={} leases={} stale={}",
            load(&self.counts.exports),
            load(&self.counts.status),
            load(&self.counts.lease),
            load(&self.counts.leases),
            load(&self.counts.stale)
        )
    }

    /// Stops every listener (each worker finishes the request it holds).
    pub fn stop(&mut self) {
        for server in &mut self.running {
            server.stop();
        }
    }
}
