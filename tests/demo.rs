//! `ferry demo` end to end, on a small disk: it must pass, tell its story on stdout without
//! the agents' logs, and leave nothing behind (no work directory, no agent process).

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

use std::process::Command;

/// Goal: the demo runs both acts through child agents and cleans up after itself.
/// Method: run the binary with a 64 MiB disk in a temporary directory; check the story's
/// landmarks on stdout, that no agent log line reached the terminal, and that the work
/// directory is gone.
#[test]
fn demo_passes_quietly_and_cleans_up() {
    // On disk, not tmpfs: the agents open their images O_DIRECT.
    let base = tempfile::Builder::new()
        .prefix("ferry-demo-test")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["demo", "--size", "64M", "--writes", "4000", "--dir"])
        .arg(base.path())
        .output()
        .expect("run ferry demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
    for landmark in [
        "work directory",
        "started agent tracking",
        "$ ferry tracker ls demo",
        "$ ferry heat demo",
        "started agent heat-destination",
        "started agent naive-source",
        "switched over",
        "policy   converge",
        "ferry demo: done; removed",
    ] {
        assert!(stdout.contains(landmark), "no '{landmark}' in:\n{stdout}");
    }
    // Agents log with env_logger's "[<time> INFO  ferry::..." lines: into their files only.
    assert!(
        !stdout.contains(" INFO "),
        "agent logs on stdout:\n{stdout}"
    );
    assert!(
        !stderr.contains(" INFO "),
        "agent logs on stderr:\n{stderr}"
    );
    // Every agent is gone: no live process runs with a config from the work directory.
    for pid in stdout
        .split("(pid ")
        .skip(1)
        .filter_map(|rest| rest.split(',').next())
    {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        assert!(
            !cmdline.contains(&*base.path().to_string_lossy()),
            "agent {pid} still runs: {cmdline}"
        );
    }
    let left: Vec<_> = std::fs::read_dir(base.path()).expect("read_dir").collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}
