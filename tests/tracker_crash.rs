//! Durable trackers across a kill -9: every write a client saw acknowledged is still dirty
//! after the restart, the tracker says `recovered` with a bound it keeps to, and a tracker
//! that is not durable says `lost`.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{require, sparse_image, AgentProc};

const MIB: u64 = 1 << 20;
const GRANULARITY: u64 = 4096;

/// The tracker `name` of `export` as `tracker ls --json` lists it.
fn tracker(agent: &AgentProc, export: &str, name: &str) -> serde_json::Value {
    let list: serde_json::Value =
        serde_json::from_str(&agent.cli_ok(&["tracker", "ls", export, "--json"])).expect("json");
    list.as_array()
        .expect("array")
        .iter()
        .find(|t| t["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no tracker {name} in {list}"))
}

/// Dirty byte ranges of `context` on `uri`, from nbdinfo's map.
fn dirty_ranges(context: &str, uri: &str) -> Vec<(u64, u64)> {
    let out =
        common::run_ok(Command::new("nbdinfo").args(["--json", &format!("--map={context}"), uri]));
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).expect("map json");
    value
        .as_array()
        .expect("map is an array")
        .iter()
        .filter(|e| e["type"].as_u64().unwrap() & 1 != 0)
        .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}

fn covered(ranges: &[(u64, u64)], offset: u64) -> bool {
    ranges
        .iter()
        .any(|&(start, len)| (start..start + len).contains(&offset))
}

// Goal: after a kill -9 in the middle of a random write load, the durable tracker holds every
// write qemu-io saw acknowledged, comes back `recovered` with a bound no larger than its log
// (8 extents of 4 MiB here), and over-marks no more than that bound; the plain tracker beside
// it comes back `lost`. Method: a 1 GiB export, `tracker_log_extents = 8` so extents keep
// opening and closing; qemu-io writes 4 KiB at 4000 random offsets, its "wrote ... at offset
// N" lines are the ledger; the agent is killed once 400 writes were acknowledged; restart;
// `tracker ls --json` and nbdinfo's map of `qemu:dirty-bitmap:d`.
#[test]
fn a_durable_tracker_keeps_every_acknowledged_write_across_kill_9() {
    require("qemu-io");
    require("nbdinfo");
    let dir = common::scratch_dir();
    let image = dir.path().join("disk.img");
    sparse_image(&image, 1024 * MIB);
    let config = dir.path().join("ferry.toml");
    std::fs::write(&config, "[agent]\ntracker_log_extents = 8\n").expect("config");
    let exports = [format!("vm1={}", image.display())];
    let extra = ["--config", config.to_str().unwrap()];
    let mut agent = AgentProc::start_in(dir, &exports, &extra);
    agent.cli_ok(&[
        "tracker",
        "add",
        "vm1",
        "d",
        "--granularity",
        "4K",
        "--durable",
    ]);
    agent.cli_ok(&["tracker", "add", "vm1", "plain", "--granularity", "4K"]);
    assert_eq!(tracker(&agent, "vm1", "d")["durable"], true);

    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for _ in 0..4000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let offset = (seed % (1024 * MIB / GRANULARITY)) * GRANULARITY;
        cmd.arg("-c").arg(format!("write -P 0x5a {offset} 4096"));
    }
    let mut qemu = cmd
        .arg(agent.uri("vm1"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io");
    let ledger = Arc::new(Mutex::new(BTreeSet::new()));
    let reader = {
        let (stdout, ledger) = (qemu.stdout.take().unwrap(), Arc::clone(&ledger));
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(offset) = line
                    .strip_prefix("wrote 4096/4096 bytes at offset ")
                    .and_then(|rest| rest.parse::<u64>().ok())
                {
                    ledger.lock().unwrap().insert(offset);
                }
            }
        })
    };
    // The tracker's count says how far the load got (qemu-io's stdout is buffered).
    let deadline = Instant::now() + Duration::from_secs(60);
    while tracker(&agent, "vm1", "d")["dirty_blocks"]
        .as_u64()
        .unwrap_or(0)
        < 400
    {
        assert!(Instant::now() < deadline, "the write load did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.kill();
    let _ = qemu.wait();
    reader.join().expect("reader");
    let acked = ledger.lock().unwrap().clone();
    assert!(
        acked.len() >= 300,
        "only {} writes acknowledged",
        acked.len()
    );

    agent.restart(&exports, &extra);
    let durable = tracker(&agent, "vm1", "d");
    let bound_bytes = durable["state"]["recovered"]["bound_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("not recovered: {durable}\n{}", agent.log()));
    assert!(bound_bytes <= 8 * 4 * MIB + 4 * 4 * MIB, "{durable}");
    assert_eq!(tracker(&agent, "vm1", "plain")["state"], "lost");
    let ranges = dirty_ranges("qemu:dirty-bitmap:d", &agent.uri("vm1"));
    let missing: Vec<u64> = acked
        .iter()
        .copied()
        .filter(|&offset| !covered(&ranges, offset))
        .collect();
    assert!(
        missing.is_empty(),
        "acknowledged writes not dirty: {missing:?}"
    );
    // Recovered = the writes that reached the image (acknowledged or in flight at the kill)
    // plus at most the open extents.
    let dirty_bytes = durable["dirty_bytes"].as_u64().expect("dirty_bytes");
    let in_flight_bytes = 64 * GRANULARITY;
    assert!(
        dirty_bytes <= acked.len() as u64 * GRANULARITY + in_flight_bytes + bound_bytes,
        "{dirty_bytes} dirty bytes for {} writes, bound {bound_bytes}",
        acked.len()
    );
    eprintln!(
        "{} acknowledged writes; recovered {dirty_bytes} dirty bytes, bound {bound_bytes}",
        acked.len()
    );
}
