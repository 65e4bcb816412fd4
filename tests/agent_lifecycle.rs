//! The agent as an operator runs it: config file, CLI and control API, /metrics, clean stop
//! (trackers saved, image synced) and kill -9 (trackers come back `lost`, never trusted).

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::process::Command;

use common::{run_ok, sparse_image, stdout, AgentProc};

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, command: &str) {
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", command])
            .arg(uri),
    );
    assert!(!stdout(&out).contains("failed"), "{}", stdout(&out));
}

fn cli_json(agent: &AgentProc, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    serde_json::from_str(&agent.cli_ok(&all)).expect("json output")
}

fn tracker<'a>(list: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {list}"))
}

// Goal: exports and trackers can be managed at run time from the CLI, with clear errors, and
// the heat map and metrics reflect the writes. Method: add an export and a tracker, write
// through qemu-io, read `tracker ls`, `heat --json`, `/metrics`; bad names, duplicates and a
// missing token give errors naming the problem; rm refuses a busy export without --force.
#[test]
fn cli_manages_exports_trackers_heat_and_metrics() {
    let dir = common::scratch_dir();
    let first = dir.path().join("first.img");
    let second = dir.path().join("second.img");
    sparse_image(&first, 16 * MIB);
    sparse_image(&second, 32 * MIB);
    let agent = AgentProc::start(&[format!("vm1={}", first.display())], &[]);

    let added = cli_json(
        &agent,
        &[
            "export",
            "add",
            "vm2",
            second.to_str().unwrap(),
            "--tracker",
            "backup",
        ],
    );
    assert_eq!(added["size_bytes"].as_u64(), Some(32 * MIB), "{added}");
    let exports = cli_json(&agent, &["export", "ls"]);
    assert_eq!(exports.as_array().unwrap().len(), 2, "{exports}");
    let table = agent.cli_ok(&["export", "ls"]);
    assert!(table.contains("vm1") && table.contains("vm2"), "{table}");

    for _ in 0..20 {
        qemu_io(&agent.uri("vm2"), "write -P 3 0 65536");
    }
    qemu_io(&agent.uri("vm2"), &format!("write -P 4 {} 4096", 20 * MIB));
    agent.cli_ok(&["tracker", "add", "vm2", "since-now", "--granularity", "4K"]);
    qemu_io(&agent.uri("vm2"), &format!("write -P 5 {} 8192", 8 * MIB));

    let trackers = cli_json(&agent, &["tracker", "ls", "vm2"]);
    let backup = tracker(&trackers, "backup");
    assert_eq!(backup["dirty_blocks"].as_u64(), Some(3), "{trackers}");
    assert_eq!(backup["lost"].as_bool(), Some(false));
    let since = tracker(&trackers, "since-now");
    assert_eq!(since["dirty_blocks"].as_u64(), Some(2), "{trackers}");
    assert_eq!(since["granularity_bytes"].as_u64(), Some(4096));

    let heat = cli_json(&agent, &["heat", "vm2", "--tracker", "backup"]);
    let cells = heat["cells"].as_array().unwrap();
    let hottest = cells.iter().filter_map(|c| c.as_u64()).max().unwrap();
    assert!(
        hottest > 0 && cells[0].as_u64() == Some(hottest),
        "first block is hottest: {heat}"
    );
    assert!(heat["hot_blocks"].as_u64().unwrap() >= 1, "{heat}");
    let map = agent.cli_ok(&["heat", "vm2"]);
    assert!(
        map.lines().count() > 4,
        "a heat map in the terminal:\n{map}"
    );

    // curl's view of it: /metrics needs the token too.
    let metrics = http_get(&format!("http://{}/metrics", agent.api), &agent);
    for want in [
        "ferry_export_write_bytes_total{export=\"vm2\"}",
        "ferry_tracker_dirty_blocks{export=\"vm2\",tracker=\"backup\"} 3",
        "ferry_request_latency_us{export=\"vm2\",quantile=\"0.99\"}",
    ] {
        assert!(
            metrics.contains(want),
            "{want} missing from /metrics:\n{metrics}"
        );
    }

    let bad = agent.cli(&["tracker", "add", "vm2", "bad/name"]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("bad/name"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let dup = agent.cli(&["export", "add", "vm2", second.to_str().unwrap()]);
    assert!(!dup.status.success());
    assert!(
        String::from_utf8_lossy(&dup.stderr).contains("exists"),
        "{}",
        String::from_utf8_lossy(&dup.stderr)
    );
    let missing = agent.cli(&["heat", "nope"]);
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope"));
    let no_token = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args([
            "export",
            "ls",
            "--api",
            &agent.api,
            "--token-file",
            "/nonexistent/token",
        ])
        .output()
        .unwrap();
    assert!(!no_token.status.success());
    assert!(String::from_utf8_lossy(&no_token.stderr).contains("/nonexistent/token"));

    agent.cli_ok(&["tracker", "rm", "vm2", "since-now"]);
    agent.cli_ok(&["export", "rm", "vm2"]);
    let exports = cli_json(&agent, &["export", "ls"]);
    assert_eq!(exports.as_array().unwrap().len(), 1, "{exports}");
}

fn http_get(url: &str, agent: &AgentProc) -> String {
    let token = ferry::api::token::read(&agent.state_dir.join("api.token")).expect("token");
    let out = run_ok(Command::new("python3").arg("-c").arg(format!(
        "import urllib.request; r = urllib.request.Request({url:?}, \
         headers={{'Authorization': 'Bearer {token}'}}); \
         print(urllib.request.urlopen(r).read().decode())"
    )));
    stdout(&out)
}

// Goal: SIGTERM saves trackers (clean) and a restart restores them, runtime-added exports
// included; kill -9 leaves them marked lost (every block dirty) after the restart. Method:
// write, stop, restart in the same state directory, compare `tracker ls`; then kill -9, restart.
#[test]
fn clean_stop_saves_and_kill_marks_lost() {
    let dir = common::scratch_dir();
    let image = dir.path().join("disk.img");
    let extra = dir.path().join("extra.img");
    sparse_image(&image, 16 * MIB);
    sparse_image(&extra, 8 * MIB);
    let exports = vec![format!("vm1={},tracker=backup", image.display())];
    let mut agent = AgentProc::start_in(dir, &exports, &[]);
    agent.cli_ok(&[
        "export",
        "add",
        "extra",
        extra.to_str().unwrap(),
        "--tracker",
        "t",
    ]);
    qemu_io(&agent.uri("vm1"), "write -P 7 0 196608");
    qemu_io(&agent.uri("extra"), "write -P 7 65536 1");
    assert!(agent.stop(), "clean stop:\n{}", agent.log());

    let dir = std::mem::replace(&mut agent.dir, common::scratch_dir());
    drop(agent);
    let mut agent = AgentProc::start_in(dir, &exports, &[]);
    let vm1 = cli_json(&agent, &["tracker", "ls", "vm1"]);
    assert_eq!(
        tracker(&vm1, "backup")["dirty_blocks"].as_u64(),
        Some(3),
        "{vm1}"
    );
    assert_eq!(
        tracker(&vm1, "backup")["lost"].as_bool(),
        Some(false),
        "{vm1}"
    );
    let extra_trackers = cli_json(&agent, &["tracker", "ls", "extra"]);
    assert_eq!(
        tracker(&extra_trackers, "t")["dirty_blocks"].as_u64(),
        Some(1),
        "{extra_trackers}"
    );
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "read -P 7 0 196608"])
            .arg(agent.uri("vm1")),
    );

    agent.kill();
    let dir = std::mem::replace(&mut agent.dir, common::scratch_dir());
    drop(agent);
    let agent = AgentProc::start_in(dir, &exports, &[]);
    let vm1 = cli_json(&agent, &["tracker", "ls", "vm1"]);
    let backup = tracker(&vm1, "backup");
    assert_eq!(backup["lost"].as_bool(), Some(true), "{vm1}");
    assert_eq!(
        backup["dirty_blocks"].as_u64(),
        Some(256),
        "lost = every block dirty: {vm1}"
    );
    assert!(
        agent.log().contains("lost"),
        "the log says so:\n{}",
        agent.log()
    );
}

// Goal: the agent runs from a TOML config (the deploy example's shape) and rejects a bad one
// naming the field. Method: write a config, start, read it over NBD; a config with a bad
// granularity fails with the field in the message.
#[test]
fn config_file_and_config_errors() {
    let dir = common::scratch_dir();
    let image = dir.path().join("disk.img");
    sparse_image(&image, 8 * MIB);
    let config = dir.path().join("ferry.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nengine = \"auto\"\nqueue_depth = 64\n\n[[export]]\nname = \"cfg\"\npath = \"{}\"\ngranularity = \"1M\"\ntrackers = [\"a\"]\n",
            image.display()
        ),
    )
    .unwrap();
    let agent = AgentProc::start_in(dir, &[], &["--config", config.to_str().unwrap()]);
    let trackers = cli_json(&agent, &["tracker", "ls", "cfg"]);
    assert_eq!(
        tracker(&trackers, "a")["granularity_bytes"].as_u64(),
        Some(MIB),
        "{trackers}"
    );
    qemu_io(&agent.uri("cfg"), "write -P 1 0 4096");

    let bad = agent.dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[export]]\nname = \"x\"\npath = \"/dev/null\"\ngranularity = \"3K\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["agent", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("export[0].granularity"), "{err}");
}

// Goal: `ferry status`, `ferry resume` and `ferry abort` ask the agent through its API (they
// work with a state directory that holds no journal, given the token), a batch name that is
// not a name gets a short refusal, and with the agent stopped `ferry status` fails while
// `ferry status --offline` reads the journal file and says it is offline. Method: an agent
// with no migration; the three commands with `--state-dir` pointing elsewhere and
// `--token-file` at the agent's token; `status ../x`; stop; status with and without --offline.
#[test]
fn status_resume_and_abort_go_through_the_api() {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 16 * MIB);
    let mut agent = AgentProc::start(&[format!("vm1={}", image.display())], &[]);
    let elsewhere = common::scratch_dir();
    let token = agent.state_dir.join("api.token");
    let remote = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(args)
            .args(["--api", &agent.api, "--token-file"])
            .arg(&token)
            .arg("--state-dir")
            .arg(elsewhere.path())
            .output()
            .unwrap()
    };
    let out = remote(&["status", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out).trim(), "[]");
    let out = remote(&["status"]);
    assert!(stdout(&out).contains("no migrations"), "{out:?}");
    let out = remote(&["resume", "b9"]);
    assert_eq!(
        stdout(&out).trim(),
        "batch b9: nothing to resume",
        "{out:?}"
    );
    let out = remote(&["abort", "b9"]);
    assert_eq!(stdout(&out).trim(), "batch b9: nothing to abort", "{out:?}");
    let out = remote(&["status", "../x"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("batch:") && stderr.len() < 200, "{stderr}");

    assert!(agent.stop(), "{}", agent.log());
    let out = agent.cli(&["status"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot reach the agent"), "{stderr}");
    let out = agent.cli(&["status", "--offline", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout(&out).trim(), "[]");
    assert!(stderr.contains("offline"), "{stderr}");
}
