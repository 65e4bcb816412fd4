//! Act 2, live migration: two agents on loopback, a guest writing a Zipf-skewed workload into
//! a disk (half of it data), and a live migration of that disk while the guest writes, once
//! with the heat policy and once with the naive one, on the same image and workload. A progress
//! bar follows each copy (polling the job through the source's control API). Afterwards the
//! guest reads back, through its original (now forwarded) connection, the last version of every
//! block it wrote, and a table compares the two policies.
//!
//! Invariants: each policy runs on fresh agents and a fresh copy of the same image; the guest
//! thread is told to stop and joined before its agents are stopped, on error too.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::agents::{AgentProcess, AgentSpec, ExportSpec};
use super::guest::{pattern, Ledger, Prng, Workload, WRITE_BYTES};
use super::{DemoError, WorkDir};
use crate::api::render::human_bytes;
use crate::api::types::{JobPhase, JobStatus, MigrateRequest};
use crate::api::Client;
use crate::metrics::LatencyRecorder;
use crate::nbd::client::{check, NbdClient};

/// Guest write rate during the migrations.
const GUEST_IOPS: u64 = 4000;
/// Guest writes in flight.
const GUEST_DEPTH: usize = 8;
/// Heat half-life: short, so the heat reflects the second of writes before the migration.
const HALF_LIFE_MS: u64 = 10_000;
/// How long the guest writes before the migration starts, so heat builds up.
const WARM_UP: Duration = Duration::from_secs(1);
/// How long the guest goes on writing after the switchover, forwarded to the destination.
const FORWARDED: Duration = Duration::from_millis(500);
/// Longest switchover pause asked for.
const MAX_PAUSE_MS: u64 = 100;
/// Switch over after this long even if the pause bound is not met.
const FORCE_AFTER_MS: u64 = 30_000;

/// What one migration of the demo measured.
#[derive(Debug)]
struct Outcome {
    policy: &'static str,
    status: JobStatus,
    guest: GuestReport,
}

/// What the guest did during one migration.
#[derive(Debug)]
struct GuestReport {
    writes: u64,
    latency: LatencyRecorder,
    checked_blocks: usize,
}

/// Migrates a fresh copy of the same disk with each policy and prints both reports.
pub(super) fn compare(work: &WorkDir, size_bytes: u64) -> Result<(), DemoError> {
    println!(
        "\n== 2. live migration: a {} disk moves to another agent while its guest writes \
         {GUEST_IOPS} IOPS (zipf), heat policy vs naive",
        human_bytes(size_bytes)
    );
    let dir = work.subdir("migration")?;
    let key = dir.join("cluster.key");
    // Created here, before either agent starts: both must share it.
    crate::transfer::ClusterKey::create(&key).map_err(|source| DemoError::ClusterKey {
        path: key.clone(),
        source,
    })?;
    let mut outcomes = Vec::new();
    for policy in ["heat", "naive"] {
        outcomes.push(migrate_once(work, &key, size_bytes, policy)?);
    }
    print_table(&outcomes);
    Ok(())
}

/// Bytes of data in the image: its first half (the rest is a hole).
fn data_bytes(size_bytes: u64) -> u64 {
    size_bytes / 2
}

/// The first [`data_bytes`] hold pseudo-random data (the rest stays a hole), the same for
/// each run.
fn make_image(path: &Path, size_bytes: u64) -> Result<(), DemoError> {
    let file = std::fs::File::create(path).map_err(DemoError::work(path))?;
    file.set_len(size_bytes).map_err(DemoError::work(path))?;
    let mut prng = Prng::new(0xda7a);
    let mut chunk = vec![0u8; 1 << 20];
    for offset in (0..data_bytes(size_bytes)).step_by(chunk.len()) {
        for word in chunk.chunks_mut(8) {
            word.copy_from_slice(&prng.next_u64().to_le_bytes());
        }
        file.write_all_at(&chunk, offset)
            .map_err(DemoError::work(path))?;
    }
    file.sync_all().map_err(DemoError::work(path))
}

/// The agent `<policy>-<role>`, in `<dir>/<role>`.
fn agent_spec(work: &WorkDir, dir: &Path, policy: &str, role: &str, key: &Path) -> AgentSpec {
    let name = format!("{policy}-{role}");
    AgentSpec {
        log: work.log(&name),
        dir: dir.join(role),
        name,
        cluster_key: key.to_path_buf(),
        half_life_ms: HALF_LIFE_MS,
        exports: Vec::new(),
        receives_migrations: false,
    }
}

fn migrate_once(
    work: &WorkDir,
    key: &Path,
    size_bytes: u64,
    policy: &'static str,
) -> Result<Outcome, DemoError> {
    println!("\n-- policy {policy}");
    let dir = work.subdir(&format!("migration/{policy}"))?;
    let image = dir.join("vm1.img");
    make_image(&image, size_bytes)?;
    println!(
        "made vm1: {} image, the first half pseudo-random data, the rest a hole",
        human_bytes(size_bytes)
    );
    let mut source_spec = agent_spec(work, &dir, policy, "source", key);
    source_spec.exports.push(ExportSpec {
        name: "vm1",
        path: image,
        // A tracker that lives with the export: its heat is the write history the migration
        // classifies blocks by.
        trackers: vec!["since-boot"],
    });
    let mut destination_spec = agent_spec(work, &dir, policy, "destination", key);
    destination_spec.receives_migrations = true;
    let source = AgentProcess::start(&source_spec)?;
    let destination = AgentProcess::start(&destination_spec)?;
    let outcome = drive(
        &source,
        &source_spec.socket(),
        &destination,
        size_bytes,
        policy,
    );
    // The destination first: the source forwards to it, never the other way round.
    let destination_stopped = destination.stop();
    let source_stopped = source.stop();
    let outcome = outcome?;
    destination_stopped?;
    source_stopped?;
    println!("agents stopped cleanly (SIGTERM)");
    Ok(outcome)
}

fn drive(
    source: &AgentProcess,
    socket: &Path,
    destination: &AgentProcess,
    size_bytes: u64,
    policy: &'static str,
) -> Result<Outcome, DemoError> {
    let guest = Guest::start(socket.to_path_buf(), size_bytes);
    println!(
        "guest writing {GUEST_IOPS} IOPS to vm1 on {}; heat builds up for {} s",
        source.name(),
        WARM_UP.as_secs()
    );
    std::thread::sleep(WARM_UP);
    let migrated = migrate(source.api(), destination, size_bytes, policy);
    if migrated.is_ok() {
        std::thread::sleep(FORWARDED);
    }
    let guest = guest.finish();
    let status = migrated?;
    let guest = guest?;
    println!(
        "guest: {} writes; then it read back {} blocks through its forwarded connection: \
         all hold their last write",
        guest.writes, guest.checked_blocks
    );
    Ok(Outcome {
        policy,
        status,
        guest,
    })
}

/// Starts the migration of vm1 to `destination` and follows it with a progress bar.
fn migrate(
    api: &Client,
    destination: &AgentProcess,
    size_bytes: u64,
    policy: &'static str,
) -> Result<JobStatus, DemoError> {
    let to = destination
        .transfer_addr()
        .expect("the destination receives migrations");
    let request = MigrateRequest {
        manager_epoch: None,
        max_impact: None,
        weight: None,
        to: to.to_string(),
        policy: Some(policy.into()),
        max_pause_ms: Some(MAX_PAUSE_MS),
        target_pause_ms: None,
        force_after_ms: Some(FORCE_AFTER_MS),
        bandwidth_bytes_per_s: None,
        hot_threshold: None,
        verify: None,
        yield_to_guest: None,
        mirror: None,
        granularity_bytes: None,
        batch: None,
        resume_job: None,
    };
    let started = api.migrate("vm1", &request)?;
    println!(
        "migrating vm1 to {} ({to}): job {}, policy {policy}, switchover pause at most \
         {MAX_PAUSE_MS} ms",
        destination.name(),
        started.id
    );
    let bar = std::io::IsTerminal::is_terminal(&std::io::stderr());
    // The bar's total is the data, not the disk: holes cost the copy next to nothing, so a
    // bar over the whole disk would stop half-way. It grows if passes send blocks again.
    let status = crate::api::view::follow(api, started.id, data_bytes(size_bytes), bar)?;
    let Some(report) = status
        .report
        .as_ref()
        .filter(|_| status.phase == JobPhase::Done)
    else {
        return Err(DemoError::Migration {
            policy,
            phase: format!("{:?}", status.phase),
            reason: status.error.clone().unwrap_or_else(|| "no report".into()),
        });
    };
    println!(
        "switched over: converged in {:.0} ms over {} passes, {} sent, writes paused {:.2} ms",
        report.converge_ms,
        report.passes.len(),
        human_bytes(report.bytes_data + report.bytes_zero),
        report.pause_ms
    );
    Ok(status)
}

/// The guest thread and the flag that stops it.
#[derive(Debug)]
struct Guest {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<GuestReport, DemoError>>,
}

impl Guest {
    fn start(socket: PathBuf, size_bytes: u64) -> Guest {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || guest(&socket, size_bytes, &stop))
        };
        Guest { stop, thread }
    }

    /// Stops the writes, waits for the read-back and returns what the guest measured.
    fn finish(self) -> Result<GuestReport, DemoError> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().map_err(|_| DemoError::GuestPanicked)?
    }
}

/// Writes until `stop`, paced at [`GUEST_IOPS`], then checks the last version of every block.
fn guest(socket: &Path, size_bytes: u64, stop: &AtomicBool) -> Result<GuestReport, DemoError> {
    let mut nbd = NbdClient::connect_unix(socket, "vm1").map_err(DemoError::Nbd)?;
    let mut prng = Prng::new(0x5eed);
    let mut workload = Workload::new(data_bytes(size_bytes), &mut prng);
    let mut ledger = Ledger::default();
    let mut sent_at: HashMap<u64, Instant> = HashMap::new();
    let mut latency = LatencyRecorder::new();
    let mut buf = vec![0u8; WRITE_BYTES as usize];
    let started = Instant::now();
    let mut writes = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = started + Duration::from_micros(writes * 1_000_000 / GUEST_IOPS);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        if nbd.in_flight() >= GUEST_DEPTH {
            reap(&mut nbd, &mut sent_at, &mut latency)?;
        }
        let offset = workload.offset(&mut prng);
        if ledger.must_drain(offset) {
            while nbd.in_flight() > 0 {
                reap(&mut nbd, &mut sent_at, &mut latency)?;
            }
            ledger.drained();
        }
        pattern(offset, writes, &mut buf);
        ledger.record(offset, writes);
        let cookie = nbd
            .send_write(offset, &buf, false)
            .map_err(DemoError::Nbd)?;
        sent_at.insert(cookie, Instant::now());
        writes += 1;
    }
    while nbd.in_flight() > 0 {
        reap(&mut nbd, &mut sent_at, &mut latency)?;
    }
    let checked_blocks = ledger.verify(&mut nbd, usize::MAX)?;
    nbd.disconnect().map_err(DemoError::Nbd)?;
    Ok(GuestReport {
        writes,
        latency,
        checked_blocks,
    })
}

/// Receives one reply and records its write's latency.
fn reap(
    nbd: &mut NbdClient,
    sent_at: &mut HashMap<u64, Instant>,
    latency: &mut LatencyRecorder,
) -> Result<(), DemoError> {
    let reply = check(nbd.recv().map_err(DemoError::Nbd)?).map_err(DemoError::Nbd)?;
    if let Some(at) = sent_at.remove(&reply.cookie) {
        latency.record_us(u64::try_from(at.elapsed().as_micros()).unwrap_or(u64::MAX));
    }
    Ok(())
}

fn print_table(outcomes: &[Outcome]) {
    println!(
        "\n{:<7} {:>9} {:>7} {:>11} {:>11} {:>9} {:>10} {:>10} {:>9} {:>9}",
        "policy",
        "converge",
        "passes",
        "sent",
        "re-sent",
        "ampl.",
        "pause",
        "hot blocks",
        "guest p99",
        "guest max"
    );
    for o in outcomes {
        let Some(r) = &o.status.report else { continue };
        let resent = (r.bytes_data + r.bytes_zero).saturating_sub(r.allocated_bytes);
        let l = o.guest.latency.summary();
        println!(
            "{:<7} {:>7.0}ms {:>7} {:>11} {:>11} {:>9.3} {:>8.2}ms {:>10} {:>7}us {:>7}us",
            o.policy,
            r.converge_ms,
            r.passes.len(),
            human_bytes(r.bytes_data + r.bytes_zero),
            human_bytes(resent),
            r.amplification,
            r.pause_ms,
            r.hot_blocks,
            l.p99,
            l.max
        );
    }
    for o in outcomes {
        println!(
            "{}: {} guest writes, {} blocks verified after the switchover",
            o.policy, o.guest.writes, o.guest.checked_blocks
        );
    }
}
