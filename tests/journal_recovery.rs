//! The migration journal with real agents: what `ferry status` says after a migration and
//! after faults, and what a restarted agent serves.
//!
//! How this proves no acknowledged write is lost across a restart: after a switchover the
//! source's local image is stale; a source killed and restarted must forward again (its
//! journal says `switched`), so a write made through it after the restart lands at the
//! destination, and the stale local image is never written or served.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::os::unix::fs::FileExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::pair::{fio_zipf, migrate, pair, prefill, verify_only, wait_fio, MIB};
use common::{require, run_ok, sparse_image, stdout};

/// The one status line of `status`.
fn only_line(status: &serde_json::Value) -> &serde_json::Value {
    let lines = status.as_array().expect("status is a list");
    assert_eq!(lines.len(), 1, "{status:#}");
    &lines[0]
}

// Goal: after a migration both journals say migrated, and a source killed with kill -9 comes
// back forwarding (never serving its stale image). Method: migrate a 64 MiB disk; status on
// both agents; kill -9 the source and restart it; qemu-io writes a pattern through the
// source; the pattern is at the destination (qemu-io read there) and not in the source's
// local image file; status still says migrated.
#[test]
fn switched_source_forwards_after_kill_and_status_says_migrated() {
    require("qemu-io");
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 64 * MIB);
    prefill(&image, 32 * MIB);
    let mut pair = pair(&image, "64K");
    let status = migrate(&pair.source, &pair.destination_transfer, &[]);
    assert_eq!(status["phase"], "done", "{status:#}");

    let source_view = pair.status(&pair.source);
    let line = only_line(&source_view);
    assert_eq!(line["role"], "source");
    assert_eq!(line["phase"], "switched");
    assert_eq!(line["peer_state"], "committed", "{line:#}");
    assert_eq!(line["verdict"], "migrated", "{line:#}");
    let destination_view = pair.status(&pair.destination);
    let line = only_line(&destination_view);
    assert_eq!(
        (&line["role"], &line["phase"]),
        (&"target".into(), &"committed".into())
    );
    assert_eq!(line["verdict"], "migrated");

    pair.source.kill();
    pair.restart_source();
    let write = format!("write -P 0x5a {} 65536", 40 * MIB);
    run_ok(
        Command::new("qemu-io")
            .args(["--image-opts", &pair.source.qemu_opts("vm1")])
            .args(["-c", &write]),
    );
    let read = format!("read -P 0x5a {} 65536", 40 * MIB);
    let destination_uri = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=vm1",
        pair.destination
            .tcp
            .as_ref()
            .unwrap()
            .rsplit_once(':')
            .unwrap()
            .1
    );
    let out = run_ok(
        Command::new("qemu-io")
            .args(["--image-opts", &destination_uri])
            .args(["-c", &read]),
    );
    assert!(
        !stdout(&out).contains("Pattern verification failed"),
        "{}",
        stdout(&out)
    );
    let mut local = vec![0u8; 65536];
    std::fs::File::open(&image)
        .unwrap()
        .read_exact_at(&mut local, 40 * MIB)
        .unwrap();
    assert!(
        local.iter().any(|&b| b != 0x5a),
        "the stale local image was written"
    );
    let line = only_line(&pair.status(&pair.source)).clone();
    assert_eq!(line["verdict"], "migrated", "{line:#}");
    assert!(
        pair.source.log().contains("forwarding to"),
        "{}",
        pair.source.log()
    );
}

// Goal: an interrupted migration is reported truthfully at each stage, and the guest loses
// nothing. Method: fio writes with verify; migrate capped at 16 MiB/s; kill -9 the
// destination after 2.5 s (the destination records what it received at most every second);
// status on the source: needs-attention (destination unreachable, source holds the disk);
// restart the destination: resumable with some MiB durable there; fio verifies at the source.
#[test]
fn interrupted_migration_is_reported_resumable() {
    require("fio");
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 128 * MIB);
    prefill(&image, 64 * MIB);
    let mut pair = pair(&image, "64K");
    let source_uri = pair.source.uri("vm1");
    let guest = fio_zipf(&source_uri, 1000, 6000, &["--do_verify=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let migrate_cmd = Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["migrate", "vm1", "--json", "--bandwidth", "16M", "--to"])
        .arg(&pair.destination_transfer)
        .args(["--api", &pair.source.api, "--state-dir"])
        .arg(&pair.source.state_dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    pair.destination.kill();
    let out = migrate_cmd.wait_with_output().unwrap();
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json status");
    assert_eq!(job["phase"], "failed", "{job:#}");

    let line = only_line(&pair.status(&pair.source)).clone();
    assert_eq!(line["phase"], "copying", "{line:#}");
    assert_eq!(line["verdict"], "needs-attention", "{line:#}");
    assert!(line["peer_unreachable"].is_string(), "{line:#}");

    pair.restart_destination();
    let line = only_line(&pair.status(&pair.source)).clone();
    assert_eq!(line["verdict"], "resumable", "{line:#}");
    assert_eq!(line["peer_state"], "receiving", "{line:#}");
    assert!(
        line["destination_bytes"].as_u64().unwrap() >= 8 * MIB,
        "{line:#}"
    );
    wait_fio(guest);
    verify_only(&source_uri, 6000);
}
