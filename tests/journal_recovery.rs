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

use common::pair::{
    json_of, migrate, migrate_background, pair, prefill, slow_migration, start_guest, verify_only,
    wait_fio, MIB,
};
use common::{require, run_ok, sparse_image, stdout};

/// The one status line of `status`.
fn only_line(status: &serde_json::Value) -> &serde_json::Value {
    let lines = status.as_array().expect("status is a list");
    assert_eq!(lines.len(), 1, "{status:#}");
    &lines[0]
}

// Goal: after a migration both journals say migrated, and a source killed with kill -9 comes
// back forwarding (never serving its stale image). Method: migrate a 64 MiB disk; status on
// both agents; `ferry export ls` at the source says where the disk is forwarded, before and
// after a kill -9 and restart of the source (which finds its image under the stale name it
// took at the switchover); qemu-io writes a pattern through the
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
    let forwarded = |pair: &common::pair::Pair| {
        let exports = cli_json(&pair.source, &["export", "ls"]);
        exports[0]["forwarding"]["to"].as_str().map(str::to_owned)
    };
    let destination_nbd = pair.destination.tcp.clone().unwrap();
    assert_eq!(forwarded(&pair).as_deref(), Some(destination_nbd.as_str()));

    pair.source.kill();
    pair.restart_source();
    // Said again after the restart (the journal's `switched`), and in the table as well.
    assert_eq!(forwarded(&pair).as_deref(), Some(destination_nbd.as_str()));
    let table = stdout(&pair.source.cli(&["export", "ls"]));
    assert!(
        table.contains(&format!("forwarding → {destination_nbd}")),
        "{table}"
    );
    let write = format!("write -P 0x5a {} 65536", 40 * MIB);
    run_ok(
        Command::new("qemu-io")
            .args(["--image-opts", &pair.source.qemu_opts("vm1")])
            .args(["-c", &write]),
    );
    let read = format!("read -P 0x5a {} 65536", 40 * MIB);
    let destination_uri = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={},export=vm1,\
         tls-creds=tls0",
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
            .args(["--object", &common::qemu_tls_object()])
            .args(["--image-opts", &destination_uri])
            .args(["-c", &read]),
    );
    assert!(
        !stdout(&out).contains("Pattern verification failed"),
        "{}",
        stdout(&out)
    );
    let mut local = vec![0u8; 65536];
    // Renamed at the switchover: the stale image is never where the disk was configured.
    let stale = common::stale_image(&image);
    let exports = cli_json(&pair.source, &["export", "ls"]);
    assert_eq!(exports[0]["path"].as_str(), stale.to_str(), "{exports:#}");
    std::fs::File::open(&stale)
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
// nothing; `ferry status` is the agent's answer, and with the agent down only `--offline`
// answers, saying so. Method: fio writes with verify; migrate capped at 16 MiB/s; kill -9 the
// destination after 2.5 s (the destination records what it received at most every second);
// status on the source: needs-attention (destination unreachable, source holds the disk);
// restart the destination: resumable with some MiB durable there; fio verifies at the source.
// Then stop the source agent: `ferry status` fails pointing at --offline; `ferry status
// --offline` reads the journal file, gives the same verdict and says it is offline.
#[test]
fn interrupted_migration_is_reported_resumable() {
    require("fio");
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 128 * MIB);
    prefill(&image, 64 * MIB);
    let mut pair = pair(&image, "64K");
    let source_uri = pair.source.uri("vm1");
    let guest = start_guest(&source_uri);
    let migrate_cmd = migrate_background(&pair, &[]);
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

    assert!(pair.source.stop(), "{}", pair.source.log());
    let out = pair.source.cli(&["status", "--json"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("--offline"), "{stderr}");
    let (offline, said) = pair.offline_status(&pair.source, None);
    let line = only_line(&offline);
    assert_eq!(line["verdict"], "resumable", "{line:#}");
    assert_eq!(line["peer_state"], "receiving", "{line:#}");
    assert!(said.contains("offline"), "{said}");
}

/// `ferry <args> --json` run against `agent`, parsed.
fn cli_json(agent: &common::AgentProc, args: &[&str]) -> serde_json::Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = agent.cli(&all);
    let text = stdout(&out);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "ferry {args:?} ({e}):\n{text}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            agent.log()
        )
    })
}

// Goal: batches migrate several disks under one name; an interrupted batch resumes from
// what the destination kept (sending less than the disk again) and ends with identical
// images; an aborted batch leaves the source authoritative and no image at the
// destination. Method: four 64 MiB disks (48 MiB of data each). Batch b1: vm1 and vm2, two at
// once. Batch b2: vm3 capped at 8 MiB/s (a send of 16 MiB is confirmed every 2 s), the
// destination killed after 3 s, restarted;
// status says resumable; `ferry resume b2`; its report sends less than the allocated bytes;
// status says migrated; the images are byte for byte equal. Batch b3: vm4 interrupted the same way;
// `ferry abort b3`; status says not-migrated and the destination's image is gone.
#[test]
fn batches_resume_and_abort() {
    let dir = common::scratch_dir();
    let mut exports = Vec::new();
    for name in ["vm1", "vm2", "vm3", "vm4"] {
        let image = dir.path().join(format!("{name}.img"));
        sparse_image(&image, 64 * MIB);
        prefill(&image, 48 * MIB);
        exports.push(format!("{name}={},granularity=64K", image.display()));
    }
    let mut pair = common::pair::pair_of(exports);
    let to = pair.destination_transfer.clone();

    let b1 = cli_json(
        &pair.source,
        &[
            "migrate",
            "vm1",
            "vm2",
            "--to",
            &to,
            "--batch",
            "b1",
            "--concurrency",
            "2",
        ],
    );
    let phases: Vec<_> = b1.as_array().unwrap().iter().map(|s| &s["phase"]).collect();
    assert_eq!(phases, ["done", "done"], "{b1:#}");
    let status = pair.status(&pair.source);
    let verdicts: Vec<_> = status
        .as_array()
        .unwrap()
        .iter()
        .map(|l| &l["verdict"])
        .collect();
    assert_eq!(verdicts, ["migrated", "migrated"], "{status:#}");

    for (export, batch) in [("vm3", "b2"), ("vm4", "b3")] {
        let child = slow_migration(&pair, export, batch);
        std::thread::sleep(Duration::from_millis(3000));
        pair.destination.kill();
        let out = child.wait_with_output().unwrap();
        assert!(
            !out.status.success(),
            "{export}: the migration should have failed"
        );
        pair.restart_destination();
    }
    let b2_status = only_line(&pair.batch_status(&pair.source, Some("b2"))).clone();
    assert_eq!(b2_status["verdict"], "resumable", "{b2_status:#}");

    let resumed = cli_json(&pair.source, &["resume", "b2"]);
    let job = &resumed.as_array().unwrap()[0];
    assert_eq!(job["phase"], "done", "{resumed:#}\n{}", pair.source.log());
    let report = &job["report"];
    let sent = report["bytes_data"].as_u64().unwrap() + report["bytes_zero"].as_u64().unwrap();
    assert!(
        sent < report["allocated_bytes"].as_u64().unwrap(),
        "the resume sent the whole disk again: {report:#}"
    );
    let b2_status = only_line(&pair.batch_status(&pair.source, Some("b2"))).clone();
    assert_eq!(b2_status["verdict"], "migrated", "{b2_status:#}");
    let destination_image = pair.destination.state_dir.join("images").join("vm3.img");
    // The source agent holds its image locked (qemu-img would refuse): a plain compare.
    run_ok(
        Command::new("cmp")
            .arg(common::stale_image(&dir.path().join("vm3.img")))
            .arg(&destination_image),
    );

    let aborted = cli_json(&pair.source, &["abort", "b3"]);
    let outcome = &aborted.as_array().unwrap()[0];
    assert_eq!(outcome["destination"], "aborted", "{aborted:#}");
    let b3_status = only_line(&pair.batch_status(&pair.source, Some("b3"))).clone();
    assert_eq!(b3_status["verdict"], "not-migrated", "{b3_status:#}");
    assert!(!pair
        .destination
        .state_dir
        .join("images")
        .join("vm4.img")
        .exists());
}

// Goal: a QEMU NBD client configured with reconnect-delay sees no I/O error when the agent is
// killed with kill -9 and restarted: the agent serves its exports again within seconds, and
// no write QEMU saw acknowledged is lost. Method: one interactive qemu-io on the export with
// reconnect-delay=20; write pattern 0x11; kill -9 the agent; issue a write of 0x22 (it waits
// for the reconnection); restart the agent; both patterns read back through the same
// qemu-io, and no command reports an error.
#[test]
fn qemu_client_with_reconnect_delay_survives_kill_9() {
    use std::io::{BufRead, BufReader, Write};
    require("qemu-io");
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 64 * MIB);
    let export = format!("vm1={}", image.display());
    let mut agent = common::AgentProc::start(std::slice::from_ref(&export), &[]);
    let opts = format!("{},reconnect-delay=20", agent.qemu_opts("vm1"));
    let mut qemu = Command::new("qemu-io")
        .args(["--image-opts", &opts])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = qemu.stdin.take().unwrap();
    let mut output = BufReader::new(qemu.stdout.take().unwrap());
    // Sends one command and returns the output line that reports it.
    let mut run = |command: &str, expect: &str| -> String {
        writeln!(input, "{command}").unwrap();
        input.flush().unwrap();
        let mut seen = String::new();
        loop {
            let mut line = String::new();
            assert!(
                output.read_line(&mut line).unwrap() > 0,
                "qemu-io ended: {seen}"
            );
            seen.push_str(&line);
            if line.contains(expect) || line.to_lowercase().contains("error") {
                return seen;
            }
        }
    };
    let wrote = run("write -P 0x11 0 65536", "wrote");
    assert!(wrote.contains("wrote 65536/65536"), "{wrote}");
    agent.kill();
    let second = std::thread::scope(|scope| {
        let writer = scope.spawn(|| run("write -P 0x22 1048576 65536", "wrote"));
        std::thread::sleep(Duration::from_millis(500));
        agent.restart(std::slice::from_ref(&export), &[]);
        writer.join().unwrap()
    });
    assert!(second.contains("wrote 65536/65536"), "{second}");
    for (pattern, offset) in [("0x11", 0), ("0x22", 1048576)] {
        let read = run(&format!("read -P {pattern} {offset} 65536"), "read");
        assert!(read.contains("read 65536/65536"), "{read}");
    }
    drop(input);
    let out = qemu.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.to_lowercase().contains("error"), "{stderr}");
}

// Goal: a source killed mid-copy comes back with its migration tracker recovered from its
// activity log (durable), holding less than the whole disk (the delivered chunks were
// settled), and a resume compares digests of the recovered blocks only and sends at most
// them, ending with identical images. Method: a 64 MiB disk (48 MiB of data) migrated in
// batch b at 8 MiB/s; kill -9 the source after 3 s (the first 16 MiB send is confirmed by
// then); restart it; `tracker ls` shows the job's tracker `recovered`; status says
// resumable; `ferry resume b` sends no more than the recovered bytes; migrated; the images
// are byte for byte equal.
#[test]
fn source_crash_then_resume_compares_digests() {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 64 * MIB);
    prefill(&image, 48 * MIB);
    let mut pair = pair(&image, "64K");
    let child = slow_migration(&pair, "vm1", "b");
    std::thread::sleep(Duration::from_millis(3000));
    pair.source.kill();
    let _ = child.wait_with_output();
    pair.restart_source();
    let trackers = cli_json(&pair.source, &["tracker", "ls", "vm1"]);
    let tracker = trackers
        .as_array()
        .unwrap()
        .iter()
        .find(|t| {
            t["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("migrate-"))
        })
        .unwrap_or_else(|| panic!("no migration tracker: {trackers:#}\n{}", pair.source.log()))
        .clone();
    assert!(tracker["state"]["recovered"].is_object(), "{tracker:#}");
    let recovered_bytes = tracker["dirty_bytes"].as_u64().unwrap();
    assert!(recovered_bytes < 48 * MIB, "nothing settled: {tracker:#}");
    let line = only_line(&pair.batch_status(&pair.source, Some("b"))).clone();
    assert_eq!(line["verdict"], "resumable", "{line:#}");

    let resumed = cli_json(&pair.source, &["resume", "b"]);
    let job = &resumed.as_array().unwrap()[0];
    assert_eq!(job["phase"], "done", "{resumed:#}\n{}", pair.source.log());
    let report = &job["report"];
    let sent = report["bytes_data"].as_u64().unwrap() + report["bytes_zero"].as_u64().unwrap();
    assert!(
        sent + 8 * MIB <= report["allocated_bytes"].as_u64().unwrap(),
        "the resume sent (nearly) the whole disk again: {report:#}"
    );
    assert!(
        sent <= recovered_bytes,
        "sent {sent} beyond the recovered {recovered_bytes}: {report:#}"
    );
    assert!(pair.source.log().contains("differ at the destination"));
    let line = only_line(&pair.batch_status(&pair.source, Some("b"))).clone();
    assert_eq!(line["verdict"], "migrated", "{line:#}");
    run_ok(
        Command::new("cmp")
            .arg(common::stale_image(&image))
            .arg(pair.destination.state_dir.join("images").join("vm1.img")),
    );
}

// Goal: a resumed job runs with the settings it was started with, not the defaults (a job
// capped at 4 MiB/s is not resumed uncapped), and an option given to `ferry resume` replaces
// that setting only. Method: a 64 MiB disk (48 MiB of data) migrated in batch s with
// --bandwidth 4M --max-pause 250 --yield; the destination killed after 3 s and restarted; the
// agent's journal (GET /v1/journal/jobs) holds those settings; `ferry resume s` without
// options, the destination killed again after 2 s: the failed job's status shows 4 MiB/s,
// 250 ms and yield; `ferry resume s --bandwidth 64M --yield=false`: done with 64 MiB/s, no
// yield, still 250 ms, and the journal holds the settings of that run; the images are equal.
#[test]
fn resumed_job_keeps_its_settings() {
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 64 * MIB);
    prefill(&image, 48 * MIB);
    let mut pair = pair(&image, "64K");
    let to = pair.destination_transfer.clone();
    let first = pair.background(&[
        "migrate",
        "vm1",
        "--to",
        &to,
        "--batch",
        "s",
        "--bandwidth",
        "4M",
        "--max-pause",
        "250",
        "--yield",
    ]);
    std::thread::sleep(Duration::from_millis(3000));
    pair.destination.kill();
    let out = first.wait_with_output().unwrap();
    assert!(!out.status.success(), "the first run should have failed");
    pair.restart_destination();

    let journaled = pair.source.client().journal_jobs(Some("s")).unwrap();
    assert_eq!(journaled.len(), 1, "{journaled:#?}");
    assert!(journaled[0].resumable(), "{journaled:#?}");
    let settings = journaled[0].settings.clone().expect("settings journaled");
    assert_eq!(settings.bandwidth_bytes_per_s, Some(4 * MIB));
    assert_eq!(settings.max_pause_ms, 250);
    assert!(settings.yield_to_guest);

    let second = pair.background(&["resume", "s"]);
    std::thread::sleep(Duration::from_millis(2000));
    pair.destination.kill();
    let out = second.wait_with_output().unwrap();
    assert!(!out.status.success(), "the resume should have failed");
    let statuses = json_of(&out);
    let job = &statuses.as_array().expect("statuses")[0];
    assert_eq!(job["phase"], "failed", "{job:#}");
    assert_eq!(job["settings"]["bandwidth_bytes_per_s"], 4 * MIB, "{job:#}");
    assert_eq!(job["settings"]["max_pause_ms"], 250, "{job:#}");
    assert_eq!(job["settings"]["yield_to_guest"], true, "{job:#}");
    pair.restart_destination();

    let out = pair.source.cli(&[
        "resume",
        "s",
        "--bandwidth",
        "64M",
        "--yield=false",
        "--json",
    ]);
    let statuses = json_of(&out);
    let job = &statuses.as_array().expect("statuses")[0];
    assert_eq!(job["phase"], "done", "{job:#}\n{}", pair.source.log());
    assert_eq!(
        job["settings"]["bandwidth_bytes_per_s"],
        64 * MIB,
        "{job:#}"
    );
    assert_eq!(job["settings"]["yield_to_guest"], false, "{job:#}");
    assert_eq!(job["settings"]["max_pause_ms"], 250, "kept: {job:#}");
    let journaled = pair.source.client().journal_jobs(Some("s")).unwrap();
    let settings = journaled[0].settings.clone().expect("settings journaled");
    assert_eq!(settings.bandwidth_bytes_per_s, Some(64 * MIB));
    assert!(!settings.yield_to_guest);
    assert_eq!(journaled[0].phase, "switched");
    run_ok(
        Command::new("cmp")
            .arg(common::stale_image(&image))
            .arg(pair.destination.state_dir.join("images").join("vm1.img")),
    );
}
