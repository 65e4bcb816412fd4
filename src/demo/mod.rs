//! `ferry demo`: starts an agent on a temporary sparse image, writes a skewed workload through
//! a real NBD connection (4 KiB writes, 32 in flight, hot spots drawn from a Zipf law), reads
//! a sample back to check it, and prints the trackers and the heat map from the control API —
//! the same calls `ferry tracker ls` and `ferry heat` make. Then it moves a live disk between
//! two agents with each copy policy ([`migrate`]) and prints both reports.
//!
//! Invariant: the demo cleans up its directory and stops the agent cleanly even on error.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::agent::config::{parse_size, AgentConfig, ExportConfig, Overrides};
use crate::agent::Agent;
use crate::api::types::TrackerAdd;
use crate::api::{render, token, Client};
use crate::nbd::client::{check, NbdClient};

mod guest;
mod migrate;

use guest::{pattern, Prng, Workload, REGIONS, WRITE_BYTES, ZIPF_S};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// `ferry demo` flags.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Image size.
    #[arg(long, default_value = "1G")]
    pub size: String,
    /// Writes to issue.
    #[arg(long, default_value_t = 40_000)]
    pub writes: u64,
    /// Directory for the temporary image (must support O_DIRECT: not tmpfs).
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

const QUEUE_DEPTH: usize = 32;

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    let size_bytes = parse_size(&args.size).map_err(|p| format!("--size: {p}"))?;
    if size_bytes < 64 << 20 {
        return Err("--size: use at least 64M".into());
    }
    let base = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/tmp"));
    let dir = base.join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_in(&dir.join("tracking"), size_bytes, args.writes)
        .and_then(|()| migrate::compare(&dir.join("migration"), size_bytes));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn run_in(dir: &Path, size_bytes: u64, writes: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let image = dir.join("disk.img");
    std::fs::File::create(&image)?.set_len(size_bytes)?;
    let mut config = AgentConfig::from_toml("", &Overrides::default())?;
    config.socket = dir.join("nbd.sock");
    config.state_dir = dir.join("state");
    config.api = "127.0.0.1:0".parse()?;
    config.transfer = "127.0.0.1:0".parse()?;
    config.cluster_key = config.state_dir.join("cluster.key");
    config.image_dir = config.state_dir.join("images");
    config.half_life_ms = 60_000;
    config.exports = vec![ExportConfig {
        name: "demo".into(),
        path: image.clone(),
        read_only: false,
        granularity_bytes: 64 * 1024,
        trackers: vec!["since-boot".into()],
    }];
    println!(
        "ferry demo: {} sparse image at {}",
        human(size_bytes),
        image.display()
    );
    let agent = Agent::start(&config)?;
    let outcome = drive(&agent, &config, size_bytes, writes);
    let stopped = agent.shutdown();
    outcome?;
    stopped?;
    println!(
        "\nagent stopped cleanly: trackers saved under {}",
        config.state_dir.display()
    );
    Ok(())
}

fn drive(agent: &Agent, config: &AgentConfig, size_bytes: u64, writes: u64) -> Result<()> {
    let api = Client::new(
        &agent.api_addr().to_string(),
        Some(token::read(agent.token_path())?),
    );
    let mut nbd = NbdClient::connect_unix(&config.socket, "demo")?;
    println!(
        "connected over NBD ({}): {} bytes, flags {:#06x}",
        config.socket.display(),
        nbd.size_bytes(),
        nbd.transmission_flags()
    );
    let mut prng = Prng::new(0x5eed);
    let mut workload = Workload::new(size_bytes, &mut prng);
    let mut last_write = std::collections::HashMap::new();
    let mut buf = vec![0u8; WRITE_BYTES as usize];
    let started = Instant::now();
    for generation in 0..writes {
        if generation == writes / 2 {
            // A tracker created half-way sees only the second half of the writes.
            drain(&mut nbd)?;
            api.add_tracker(
                "demo",
                &TrackerAdd {
                    name: "second-half".into(),
                    granularity_bytes: None,
                    half_life_ms: None,
                },
            )?;
        }
        let offset = workload.offset(&mut prng);
        pattern(offset, generation, &mut buf);
        last_write.insert(offset, generation);
        if nbd.in_flight() >= QUEUE_DEPTH {
            check(nbd.recv()?)?;
        }
        nbd.send_write(offset, &buf, false)?;
    }
    drain(&mut nbd)?;
    nbd.flush()?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "wrote {writes} x 4 KiB (zipf {ZIPF_S} over {REGIONS} regions, {QUEUE_DEPTH} in flight) in {secs:.2} s: {:.0} IOPS, {} distinct blocks",
        writes as f64 / secs,
        last_write.len()
    );
    let mut checked = 0;
    for (offset, generation) in last_write.iter().take(2000) {
        pattern(*offset, *generation, &mut buf);
        if nbd.read_at(*offset, WRITE_BYTES as u32)? != buf {
            return Err(format!("read-back mismatch at offset {offset}").into());
        }
        checked += 1;
    }
    println!("read back {checked} blocks through NBD: all match the last write");
    nbd.disconnect()?;
    println!("\n$ ferry tracker ls demo");
    print!("{}", render::trackers_table(&api.trackers("demo")?));
    println!("\n$ ferry heat demo --tracker since-boot");
    let map = api.heat("demo", Some("since-boot"), 64 * 16)?;
    print!("{}", render::heat_map(&map, 64, false));
    Ok(())
}

fn drain(nbd: &mut NbdClient) -> Result<()> {
    while nbd.in_flight() > 0 {
        check(nbd.recv()?)?;
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b => format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64),
    }
}
