//! The demo's second act: two agents on loopback, a guest writing a Zipf-skewed workload into
//! a 1 GiB disk (half of it data), and a live migration of that disk while the guest writes,
//! once with the heat policy and once with the naive one, on the same workload. Afterwards
//! the guest reads back, through its original (now forwarded) connection, the last version of
//! every block it wrote.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::guest::{pattern, Prng, Workload, WRITE_BYTES};
use super::Result;
use crate::agent::config::{AgentConfig, ExportConfig, Overrides};
use crate::agent::Agent;
use crate::api::types::{JobPhase, JobStatus, MigrateRequest};
use crate::api::{render::human_bytes, token, Client};
use crate::metrics::LatencyRecorder;
use crate::nbd::client::{check, NbdClient};

/// Guest write rate during the migrations.
const GUEST_IOPS: u64 = 4000;
/// Guest writes in flight.
const GUEST_DEPTH: usize = 8;

/// What one migration of the demo measured.
#[derive(Debug)]
struct Outcome {
    policy: &'static str,
    status: JobStatus,
    guest_writes: u64,
    guest_latency: LatencyRecorder,
    checked_blocks: usize,
}

/// Migrates a fresh copy of the same disk with each policy and prints both reports.
pub(crate) fn compare(dir: &Path, size_bytes: u64) -> Result<()> {
    println!(
        "\n== live migration: {} disk, guest writing {GUEST_IOPS} IOPS (zipf), heat vs naive",
        human_bytes(size_bytes)
    );
    std::fs::create_dir_all(dir)?;
    let key = dir.join("cluster.key");
    crate::transfer::ClusterKey::create(&key)?;
    let mut outcomes = Vec::new();
    for policy in ["heat", "naive"] {
        outcomes.push(migrate_once(&dir.join(policy), &key, size_bytes, policy)?);
    }
    print_table(&outcomes);
    Ok(())
}

fn agent_config(dir: &Path, key: &Path, tcp: bool) -> Result<AgentConfig> {
    let mut config = AgentConfig::from_toml("", &Overrides::default())?;
    config.socket = dir.join("nbd.sock");
    config.state_dir = dir.join("state");
    config.api = "127.0.0.1:0".parse()?;
    config.transfer = "127.0.0.1:0".parse()?;
    config.tcp = tcp.then(|| "127.0.0.1:0".parse()).transpose()?;
    config.cluster_key = key.to_path_buf();
    config.image_dir = dir.join("images");
    config.half_life_ms = 10_000;
    Ok(config)
}

/// Half the disk holds pseudo-random data (the rest stays a hole), the same for each run.
fn make_image(path: &Path, size_bytes: u64) -> Result<()> {
    let file = std::fs::File::create(path)?;
    file.set_len(size_bytes)?;
    let mut prng = Prng::new(0xda7a);
    let mut chunk = vec![0u8; 1 << 20];
    for offset in (0..size_bytes / 2).step_by(chunk.len()) {
        for word in chunk.chunks_mut(8) {
            word.copy_from_slice(&prng.next_u64().to_le_bytes());
        }
        file.write_all_at(&chunk, offset)?;
    }
    file.sync_all()?;
    Ok(())
}

fn migrate_once(dir: &Path, key: &Path, size_bytes: u64, policy: &'static str) -> Result<Outcome> {
    std::fs::create_dir_all(dir)?;
    let image = dir.join("vm1.img");
    make_image(&image, size_bytes)?;
    let mut source_config = agent_config(&dir.join("source"), key, false)?;
    source_config.exports = vec![ExportConfig {
        name: "vm1".into(),
        path: image,
        read_only: false,
        granularity_bytes: 64 * 1024,
        // A tracker that lives with the export: its heat is the write history the migration
        // classifies blocks by.
        trackers: vec!["since-boot".into()],
    }];
    let source = Agent::start(&source_config)?;
    let destination = Agent::start(&agent_config(&dir.join("destination"), key, true)?)?;
    let outcome = drive(&source, &source_config, &destination, size_bytes, policy);
    let _ = destination.shutdown();
    let _ = source.shutdown();
    outcome
}

fn drive(
    source: &Agent,
    source_config: &AgentConfig,
    destination: &Agent,
    size_bytes: u64,
    policy: &'static str,
) -> Result<Outcome> {
    let api = Client::new(
        &source.api_addr().to_string(),
        Some(token::read(source.token_path())?),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let guest = {
        let (socket, stop) = (source_config.socket.clone(), stop.clone());
        std::thread::spawn(move || guest(&socket, size_bytes, &stop).map_err(|e| e.to_string()))
    };
    std::thread::sleep(Duration::from_secs(1)); // heat builds up
    let request = MigrateRequest {
        to: destination.transfer_addr().to_string(),
        policy: Some(policy.into()),
        max_pause_ms: Some(100),
        target_pause_ms: None,
        force_after_ms: Some(30_000),
        bandwidth_bytes_per_s: None,
        hot_threshold: None,
        verify: None,
        yield_to_guest: None,
        mirror: None,
        batch: None,
        resume_job: None,
    };
    let started = api.migrate("vm1", &request)?;
    let status = crate::api::view::follow(&api, started.id, size_bytes, false)?;
    std::thread::sleep(Duration::from_millis(500)); // the guest goes on, forwarded
    stop.store(true, Ordering::Relaxed);
    let (guest_writes, guest_latency, checked_blocks) =
        guest.join().map_err(|_| "guest thread panicked")??;
    if status.phase != JobPhase::Done {
        return Err(format!("{policy} migration failed: {:?}", status.error).into());
    }
    println!(
        "{policy}: migrated; the guest then read back {checked_blocks} blocks through its \
         forwarded connection: all hold their last write"
    );
    Ok(Outcome {
        policy,
        status,
        guest_writes,
        guest_latency,
        checked_blocks,
    })
}

/// Writes until `stop`, paced at [`GUEST_IOPS`], then checks the last version of every block.
fn guest(
    socket: &Path,
    size_bytes: u64,
    stop: &AtomicBool,
) -> Result<(u64, LatencyRecorder, usize)> {
    let mut nbd = NbdClient::connect_unix(socket, "vm1")?;
    let mut prng = Prng::new(0x5eed);
    let mut workload = Workload::new(size_bytes / 2, &mut prng);
    let mut last_write: HashMap<u64, u64> = HashMap::new();
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
            let reply = check(nbd.recv()?)?;
            if let Some(at) = sent_at.remove(&reply.cookie) {
                latency.record_us(at.elapsed().as_micros() as u64);
            }
        }
        let offset = workload.offset(&mut prng);
        pattern(offset, writes, &mut buf);
        last_write.insert(offset, writes);
        let cookie = nbd.send_write(offset, &buf, false)?;
        sent_at.insert(cookie, Instant::now());
        writes += 1;
    }
    while nbd.in_flight() > 0 {
        let reply = check(nbd.recv()?)?;
        if let Some(at) = sent_at.remove(&reply.cookie) {
            latency.record_us(at.elapsed().as_micros() as u64);
        }
    }
    for (offset, generation) in &last_write {
        pattern(*offset, *generation, &mut buf);
        if nbd.read_at(*offset, WRITE_BYTES as u32)? != buf {
            return Err(format!("block at {offset} lost its last write").into());
        }
    }
    nbd.disconnect()?;
    Ok((writes, latency, last_write.len()))
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
        let l = o.guest_latency.summary();
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
            o.policy, o.guest_writes, o.checked_blocks
        );
    }
}
