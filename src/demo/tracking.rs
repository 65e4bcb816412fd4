//! Act 1, write tracking: one agent serves a sparse image; the guest writes a Zipf-skewed
//! workload over NBD, a second tracker is added half-way, a sample is read back, and the
//! trackers and the heat map are printed as `ferry tracker ls` and `ferry heat` print them.
//!
//! Invariant: the agent is stopped (SIGTERM) whatever happens, and a clean stop is checked:
//! that is when it saves its trackers.

use std::time::Instant;

use super::agents::{AgentProcess, AgentSpec, ExportSpec};
use super::guest::{pattern, Ledger, Prng, Workload, REGIONS, WRITE_BYTES, ZIPF_S};
use super::{DemoError, WorkDir};
use crate::api::render::{self, human_bytes};
use crate::api::types::TrackerAdd;
use crate::api::Client;
use crate::nbd::client::{check, NbdClient};

/// Guest writes in flight.
const QUEUE_DEPTH: usize = 32;
/// Blocks read back and checked after the workload.
const READ_BACK_BLOCKS: usize = 2000;
/// Heat half-life: long enough that the heat map still shows the whole workload.
const HALF_LIFE_MS: u64 = 60_000;
/// Heat map width, in cells; it has as many rows.
const HEAT_WIDTH: usize = 64;
const HEAT_ROWS: usize = 16;

/// Runs act 1 in `<work>/tracking`.
pub(super) fn run(work: &WorkDir, size_bytes: u64, writes: u64) -> Result<(), DemoError> {
    println!(
        "\n== 1. write tracking: an agent serves a {} sparse image over NBD",
        human_bytes(size_bytes)
    );
    let dir = work.subdir("tracking")?;
    let image = dir.join("disk.img");
    std::fs::File::create(&image)
        .and_then(|file| file.set_len(size_bytes))
        .map_err(DemoError::work(&image))?;
    let spec = AgentSpec {
        name: "tracking".into(),
        log: work.log("tracking"),
        cluster_key: dir.join("cluster.key"),
        half_life_ms: HALF_LIFE_MS,
        exports: vec![ExportSpec {
            name: "demo",
            path: image,
            trackers: vec!["since-boot"],
        }],
        receives_migrations: false,
        dir,
    };
    let agent = AgentProcess::start(&spec)?;
    let outcome = drive(agent.api(), &spec, size_bytes, writes);
    let stopped = agent.stop();
    outcome?;
    stopped?;
    println!(
        "\nagent tracking stopped cleanly (SIGTERM): it saved its trackers in its state directory"
    );
    Ok(())
}

/// The workload, the read-back, then the trackers and the heat map.
fn drive(api: &Client, spec: &AgentSpec, size_bytes: u64, writes: u64) -> Result<(), DemoError> {
    let socket = spec.socket();
    let mut nbd = NbdClient::connect_unix(&socket, "demo").map_err(DemoError::Nbd)?;
    println!(
        "guest connected over NBD ({}): {} bytes, flags {:#06x}",
        socket.display(),
        nbd.size_bytes(),
        nbd.transmission_flags()
    );
    let ledger = write_workload(&mut nbd, api, size_bytes, writes)?;
    let checked = ledger.verify(&mut nbd, READ_BACK_BLOCKS)?;
    println!("read back {checked} blocks through NBD: all hold their last write");
    nbd.disconnect().map_err(DemoError::Nbd)?;
    println!("\n$ ferry tracker ls demo");
    print!("{}", render::trackers_table(&api.trackers("demo")?));
    println!("\n$ ferry heat demo --tracker since-boot");
    let map = api.heat("demo", Some("since-boot"), HEAT_WIDTH * HEAT_ROWS)?;
    print!("{}", render::heat_map(&map, HEAT_WIDTH, false));
    Ok(())
}

/// Writes `writes` Zipf-placed 4 KiB blocks, [`QUEUE_DEPTH`] in flight, adding the tracker
/// `second-half` half-way. Returns the generation last written to each offset.
fn write_workload(
    nbd: &mut NbdClient,
    api: &Client,
    size_bytes: u64,
    writes: u64,
) -> Result<Ledger, DemoError> {
    let mut prng = Prng::new(0x5eed);
    let mut workload = Workload::new(size_bytes, &mut prng);
    let mut ledger = Ledger::default();
    let mut buf = vec![0u8; WRITE_BYTES as usize];
    let started = Instant::now();
    for generation in 0..writes {
        if generation == writes / 2 {
            // Drained first, so the new tracker sees exactly the second half of the writes.
            drain(nbd)?;
            ledger.drained();
            api.add_tracker(
                "demo",
                &TrackerAdd {
                    name: "second-half".into(),
                    granularity_bytes: None,
                    half_life_ms: None,
                    durable: false,
                },
            )?;
            println!(
                "half-way: added the tracker second-half (it sees only the writes from now on)"
            );
        }
        let offset = workload.offset(&mut prng);
        if ledger.must_drain(offset) {
            drain(nbd)?;
            ledger.drained();
        }
        pattern(offset, generation, &mut buf);
        ledger.record(offset, generation);
        if nbd.in_flight() >= QUEUE_DEPTH {
            check(nbd.recv().map_err(DemoError::Nbd)?).map_err(DemoError::Nbd)?;
        }
        nbd.send_write(offset, &buf, false)
            .map_err(DemoError::Nbd)?;
    }
    drain(nbd)?;
    nbd.flush().map_err(DemoError::Nbd)?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "wrote {writes} x 4 KiB (zipf {ZIPF_S} over {REGIONS} regions, {QUEUE_DEPTH} in flight) \
         in {secs:.2} s: {:.0} IOPS, {} distinct blocks",
        writes as f64 / secs,
        ledger.blocks()
    );
    Ok(ledger)
}

fn drain(nbd: &mut NbdClient) -> Result<(), DemoError> {
    while nbd.in_flight() > 0 {
        check(nbd.recv().map_err(DemoError::Nbd)?).map_err(DemoError::Nbd)?;
    }
    Ok(())
}
