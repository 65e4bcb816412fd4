//! Many fake agents in one process, for the manager's scale benchmark
//! (`scripts/bench-manager-scale`, `tests/manager_scale.rs`): each is a real control API
//! listener (`ferry::api::listen`, one worker) answering through the real router
//! (`ferry::api::server::Context`: token check, epoch fence, lease routes, `/metrics`) with
//! a [`Control`] that keeps everything in memory:
//!
//! | route                    | answer                                                   |
//! |--------------------------|----------------------------------------------------------|
//! | GET  /v1/exports         | `--exports-per-agent` exports, one tracker each          |
//! | GET  /v1/status          | `--disks-per-agent` `DiskStatus` lines, mixed verdicts   |
//! | POST /v1/leases/{pair}   | an in-memory `lease::witness::Witness` per pair          |
//! | GET  /v1/leases          | those witnesses                                          |
//! | GET  /metrics            | the real renderer over the fake's exports and counters   |
//!
//! Invariants: the fence is an agent's (a lower epoch is refused with 409, a command holds
//! its epoch current while it runs) but kept in memory; a witness record "write" always
//! succeeds at once (`Witness::written(ok = true)`), so a lease is decided exactly as a
//! real witness with a perfect disk decides it; the JSON shapes are the API's own types.
//!
//! Usage: `cargo run --release --example fake_agents -- --count 1000 --token-file F
//! --base-port 20000 --disks-per-agent 4 --addresses-out FILE`. Agent `i` is `h{i}` on
//! `127.0.0.1:(base-port + i)` (`--base-port 0`: any free port). Once every listener is up,
//! FILE gets one `h{i}=127.0.0.1:PORT` line per agent (written to `FILE.tmp`, then renamed),
//! and `ready N` goes to stdout. On SIGTERM or SIGINT it prints request counts by route to
//! stdout (`requests exports=.. status=.. lease=.. leases=.. stale=..`) and exits.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use clap::Parser;

use ferry::api::leases::{LeaseCall, LeaseReply, LeaseStatus, WitnessCounters};
use ferry::api::server::Context;
use ferry::api::types::{
    DiskStatus, ExportSpec, ExportStats, ExportStatus, HeatMap, TrackerAdd, TrackerState,
    TrackerStatus,
};
use ferry::api::{Control, ControlError, EpochHold};
use ferry::env::{Clock, MonotonicClock};
use ferry::lease::fence::StaleEpoch;
use ferry::lease::witness::{Decision, Witness};

/// Command line.
#[derive(Debug, Parser)]
struct Args {
    /// Agents to run.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// The fleet's API token (the managers' `token_file`).
    #[arg(long)]
    token_file: PathBuf,
    /// Port of agent 0; agent i listens on base-port + i (0: any free port).
    #[arg(long, default_value_t = 0)]
    base_port: u16,
    /// `DiskStatus` lines each agent's `GET /v1/status` returns.
    #[arg(long, default_value_t = 4)]
    disks_per_agent: usize,
    /// Exports each agent's `GET /v1/exports` (the managers' ping) returns.
    #[arg(long, default_value_t = 2)]
    exports_per_agent: usize,
    /// API worker threads per agent (the listener thread comes on top).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Where the `h{i}=ADDRESS` lines go.
    #[arg(long)]
    addresses_out: PathBuf,
}

/// Requests answered, by route, over every agent (for the run's summary).
#[derive(Debug, Default)]
struct Counts {
    exports: AtomicU64,
    status: AtomicU64,
    lease: AtomicU64,
    leases: AtomicU64,
    stale: AtomicU64,
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
    fn new(index: usize, args: &Args, clock: Arc<MonotonicClock>, counts: Arc<Counts>) -> Self {
        let exports = (0..args.exports_per_agent)
            .map(|e| fake_export(index, e))
            .collect();
        let disks = (0..args.disks_per_agent)
            .map(|d| fake_disk(index, d, args.disks_per_agent))
            .collect();
        Self {
            exports,
            disks,
            fence: RwLock::new(0),
            witnesses: Mutex::new(HashMap::new()),
            clock,
            counts,
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
        Ok(match witness.decide(&call.request, now_ns, call.lease_ms) {
            Decision::Reply(reply) => reply,
            Decision::Renew(reply) => {
                witness.renewed(now_ns);
                reply
            }
            // A perfect disk: written at once.
            Decision::Write { lease, reply } => witness.written(lease, reply, true, now_ns, now_ns),
        })
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

/// Starts every agent; returns the running listeners and their `h{i}=ADDRESS` lines.
fn start_all(
    args: &Args,
    token: &str,
    counts: &Arc<Counts>,
) -> Result<(Vec<ferry::api::listen::Running>, Vec<String>), String> {
    let clock = Arc::new(MonotonicClock::new());
    let mut running = Vec::with_capacity(args.count);
    let mut lines = Vec::with_capacity(args.count);
    for index in 0..args.count {
        let port = match args.base_port {
            0 => 0,
            base => u16::try_from(usize::from(base) + index)
                .map_err(|_| format!("agent {index}: port past 65535"))?,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let agent = FakeAgent::new(index, args, clock.clone(), counts.clone());
        let context = Context::new(token.to_string(), true, Arc::new(agent));
        let name = format!("h{index}");
        let server = ferry::api::listen::start(addr, args.workers, &name, Arc::new(context))
            .map_err(|err| format!("agent {name}: {}", ferry::error::error_chain(&err)))?;
        lines.push(format!("{name}={}", server.local_addr()));
        running.push(server);
    }
    Ok((running, lines))
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let token = match ferry::api::token::read(&args.token_file) {
        Ok(token) => token,
        Err(err) => fail(&format!("token {}: {err}", args.token_file.display())),
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .unwrap_or_else(|err| fail(&format!("signals: {err}")));
    let counts = Arc::new(Counts::default());
    let started = Instant::now();
    let (mut running, lines) = match start_all(&args, &token, &counts) {
        Ok(started) => started,
        Err(message) => fail(&message),
    };
    let tmp = args.addresses_out.with_extension("tmp");
    let written = std::fs::write(&tmp, lines.join("\n") + "\n")
        .and_then(|()| std::fs::rename(&tmp, &args.addresses_out));
    if let Err(err) = written {
        fail(&format!("{}: {err}", args.addresses_out.display()));
    }
    eprintln!(
        "fake_agents: {} agents up in {:.2} s ({} workers each)",
        args.count,
        started.elapsed().as_secs_f64(),
        args.workers
    );
    println!("ready {}", args.count);
    let _signal = signals.forever().next();
    for server in &mut running {
        server.stop();
    }
    let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    println!(
        "requests exports={} status={} lease={} leases={} stale={}",
        load(&counts.exports),
        load(&counts.status),
        load(&counts.lease),
        load(&counts.leases),
        load(&counts.stale)
    );
}

fn fail(message: &str) -> ! {
    eprintln!("fake_agents: {message}");
    std::process::exit(1);
}
