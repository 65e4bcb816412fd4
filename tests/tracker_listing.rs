//! `ferry tracker ls`, its JSON and `/metrics` on a large sparse export: memory follows the
//! writes (not the disk size), the state file size is the file's, no tracker claims to be
//! durable, and the state is `ok`.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::process::Command;

use common::{require, run_ok, sparse_image, stdout, AgentProc};

const GIB: u64 = 1 << 30;
const TIB: u64 = 1 << 40;

fn metrics(agent: &AgentProc) -> String {
    // /metrics needs the API token, as every other call does.
    agent.client().metrics().expect("/metrics")
}

/// The value of the sample whose line starts with `series` (name and labels).
fn sample(metrics: &str, series: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

// Goal: on a 1 TiB sparse export, after 64 scattered writes, each tracker's memory is > 0 and
// tiny next to a dense tracker (64 KiB blocks: 2 MiB of bitmap + 4 MiB of heat; 4 KiB blocks:
// 32 MiB + 4 MiB), its state file size is the Active file's, durable is false and the state
// ok, in the JSON, the table and /metrics. Method: qemu-io writes 16 GiB apart, then
// `tracker ls --json`, `tracker ls`, /metrics, and a stat of the tracker files.
#[test]
fn tracker_ls_shows_memory_state_file_durability_and_state() {
    require("qemu-io");
    let dir = common::scratch_dir();
    let image = dir.path().join("disk.img");
    sparse_image(&image, TIB);
    let agent = AgentProc::start_in(dir, &[format!("vm1={},tracker=boot", image.display())], &[]);
    agent.cli_ok(&["tracker", "add", "vm1", "fine", "--granularity", "4K"]);
    let writes = 64;
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for i in 0..writes {
        cmd.arg("-c")
            .arg(format!("write -P 7 {} 4096", i * 16 * GIB + 4096));
    }
    let out = stdout(&run_ok(cmd.arg(agent.uri("vm1"))));
    assert!(!out.contains("failed"), "{out}");

    let list: serde_json::Value =
        serde_json::from_str(&agent.cli_ok(&["tracker", "ls", "vm1", "--json"])).expect("json");
    let metrics = metrics(&agent);
    for (name, dense_bytes) in [("boot", 6 << 20), ("fine", 36 << 20)] {
        let tracker = list
            .as_array()
            .expect("array")
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {list}"));
        assert_eq!(tracker["dirty_blocks"].as_u64(), Some(writes), "{tracker}");
        let memory_bytes = tracker["memory_bytes"].as_u64().expect("memory_bytes");
        eprintln!("{name}: {memory_bytes} bytes of memory after {writes} writes on 1 TiB");
        assert!(memory_bytes > 0, "{tracker}");
        assert!(memory_bytes < dense_bytes / 8, "not dense-sized: {tracker}");
        let file = agent
            .state_dir
            .join("trackers/vm1")
            .join(format!("{name}.tracker"));
        let file_bytes = std::fs::metadata(&file).expect("tracker file").len();
        assert_eq!(
            tracker["state_bytes"].as_u64(),
            Some(file_bytes),
            "{tracker}"
        );
        assert_eq!(tracker["durable"].as_bool(), Some(false), "{tracker}");
        assert_eq!(tracker["state"].as_str(), Some("ok"), "{tracker}");

        let labels = format!("{{export=\"vm1\",tracker=\"{name}\"}}");
        let shown = sample(&metrics, &format!("ferry_tracker_memory_bytes{labels}"));
        assert!(shown > 0 && shown < dense_bytes / 8, "{metrics}");
        assert_eq!(
            sample(&metrics, &format!("ferry_tracker_state_bytes{labels}")),
            file_bytes
        );
        assert_eq!(
            sample(&metrics, &format!("ferry_tracker_durable{labels}")),
            0
        );
        let state =
            format!("ferry_tracker_state{{export=\"vm1\",tracker=\"{name}\",state=\"ok\"}}");
        assert_eq!(sample(&metrics, &state), 1);
    }
    let table = agent.cli_ok(&["tracker", "ls", "vm1"]);
    let header = table.lines().next().expect("header");
    for column in ["MEMORY", "STATE FILE", "DURABLE", "STATE"] {
        assert!(header.contains(column), "{table}");
    }
    eprintln!("{table}");
}
