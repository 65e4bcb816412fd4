//! Manager fencing by epoch against a real agent process: a command of an older epoch than
//! the agent has seen is refused (409, naming both epochs) and changes nothing, and the agent
//! remembers the highest epoch across kill -9; a corrupt epoch file stops the agent at start.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::pair::pair_of;
use common::{free_port, run_ok, sparse_image, AgentProc};
use ferry::api::types::{JobPhase, JobStatus, MigrateRequest, TrackerAdd};
use ferry::api::{Client, ClientError};

fn tracker(name: &str) -> TrackerAdd {
    TrackerAdd {
        name: name.to_string(),
        granularity_bytes: None,
        half_life_ms: None,
        durable: false,
    }
}

fn tracker_names(client: &Client) -> Vec<String> {
    let mut names: Vec<String> = client
        .trackers("vm1")
        .expect("trackers")
        .into_iter()
        .map(|t| t.name)
        .collect();
    names.sort();
    names
}

/// Asserts `result` is the agent refusing `epoch` because it saw `highest`.
fn assert_stale<T: std::fmt::Debug>(result: Result<T, ClientError>, epoch: u64, highest: u64) {
    let err = result.expect_err("a stale epoch is refused");
    assert_eq!(err.status(), Some(409), "{err:?}");
    let ClientError::StaleEpoch {
        epoch: sent,
        highest: seen,
        message,
        ..
    } = &err
    else {
        panic!("not a stale epoch: {err:?}");
    };
    assert_eq!((*sent, *seen), (epoch, highest));
    assert!(
        message.contains(&format!("manager epoch {epoch} "))
            && message.contains(&format!("epoch {highest} ")),
        "{message}"
    );
}

fn epoch_gauge(client: &Client) -> String {
    let metrics = client.metrics().expect("metrics");
    metrics
        .lines()
        .find(|line| line.starts_with("ferry_manager_epoch "))
        .expect("ferry_manager_epoch in /metrics")
        .to_string()
}

#[test]
fn stale_epochs_are_refused_and_remembered_across_kill_9() {
    // Goal: "a paused or partitioned old active that wakes up changes nothing", also after
    // the agent restarts. Method: epoch 5 adds a tracker; epoch 4 tries to add and remove
    // trackers (409, no change); the CLI without an epoch still works; kill -9 and restart
    // on the same state; 4 is still refused, 5 and 6 admitted, then 5 refused.
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.raw");
    sparse_image(&image, 64 << 20);
    let exports = [format!("vm1={}", image.display())];
    let mut agent = AgentProc::start_in(dir, &exports, &[]);
    let operator = agent.client();
    assert_eq!(epoch_gauge(&operator), "ferry_manager_epoch 0");

    let manager = |agent: &AgentProc, epoch| agent.client().with_epoch(epoch);
    manager(&agent, 5)
        .add_tracker("vm1", &tracker("t5"))
        .expect("epoch 5 admitted");
    let before = tracker_names(&operator);
    assert!(before.contains(&"t5".to_string()), "{before:?}");
    assert_stale(manager(&agent, 4).add_tracker("vm1", &tracker("t4")), 4, 5);
    assert_stale(manager(&agent, 4).remove_tracker("vm1", "t5"), 4, 5);
    assert_stale(manager(&agent, 4).trackers("vm1"), 4, 5);
    assert_eq!(
        tracker_names(&operator),
        before,
        "the stale commands changed nothing"
    );
    assert_eq!(epoch_gauge(&operator), "ferry_manager_epoch 5");
    let file = std::fs::read_to_string(agent.state_dir.join("manager-epoch")).expect("file");
    assert!(file.starts_with("ferry-epoch v1 5 "), "{file}");

    agent.kill();
    agent.restart(&exports, &[]);
    let operator = agent.client();
    assert_eq!(epoch_gauge(&operator), "ferry_manager_epoch 5");
    let before = tracker_names(&operator);
    assert_stale(manager(&agent, 4).add_tracker("vm1", &tracker("t4")), 4, 5);
    assert_eq!(
        tracker_names(&operator),
        before,
        "still nothing after the restart"
    );
    manager(&agent, 5)
        .trackers("vm1")
        .expect("epoch 5 still admitted");
    manager(&agent, 6)
        .add_tracker("vm1", &tracker("t6"))
        .expect("epoch 6 admitted");
    assert!(tracker_names(&operator).contains(&"t6".to_string()));
    assert_stale(manager(&agent, 5).add_tracker("vm1", &tracker("t5b")), 5, 6);
    assert_eq!(epoch_gauge(&operator), "ferry_manager_epoch 6");
    operator.trackers("vm1").expect("the CLI is not fenced");
}

#[test]
fn a_corrupt_epoch_file_stops_the_agent() {
    // Goal: a damaged epoch file is never read as 0 (which would let any old manager act
    // again): the agent refuses to start and says why. Method: write a file with a bad
    // checksum into a fresh state directory, start `ferry agent`, expect a quick failure.
    let dir = common::scratch_dir();
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).expect("state dir");
    let body = "ferry-epoch v1 9";
    let wrong = blake3::hash(b"something else").to_hex();
    std::fs::write(state_dir.join("manager-epoch"), format!("{body} {wrong}\n")).expect("write");
    let mut child = Command::new(common::agent_bin())
        .arg("agent")
        .arg("--socket")
        .arg(dir.path().join("nbd.sock"))
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--api")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--transfer")
        .arg(format!("127.0.0.1:{}", free_port()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ferry agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the agent started on a corrupt epoch file");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("manager-epoch"), "{stderr}");
    assert!(stderr.contains("corrupt"), "{stderr}");
}

/// A migration to `to` at 8 MiB/s (a 32 MiB disk takes ~4 s), resuming `resume` if given.
fn slow_migration(to: &str, resume: Option<u64>) -> MigrateRequest {
    serde_json::from_value(serde_json::json!({
        "to": to,
        "bandwidth_bytes_per_s": 8 << 20,
        "resume_job": resume,
    }))
    .expect("a migrate request")
}

/// Polls job `id` on `client` until it is no longer running.
fn finished(client: &Client, id: u64) -> JobStatus {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let job = client.job(id).expect("job status");
        if job.phase != JobPhase::Running {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} still running: {job:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_deposed_managers_migration_neither_opens_nor_commits() {
    // Goal: block-stream Opens and Commits of a manager's job carry its epoch, so a job of a
    // deposed manager whose source has not heard of the new one cannot take a disk, and the
    // new manager's resume of it finishes with no write lost.
    // Method: two agents; epoch 5 starts vm1's migration (8 MiB/s over 32 MiB written with a
    // pattern); while it copies, the destination sees epoch 6 (the new active's first call):
    // the Commit at 5 is refused naming both epochs, the source stays authoritative and
    // still serves the pattern. Epoch 6 resumes the job: done, and the destination image
    // equals the source's. A job of vm2 at epoch 6 after the destination saw 8 is refused at
    // its Open, before any image is created there.
    common::require("qemu-io");
    let dir = common::scratch_dir();
    let (vm1, vm2) = (dir.path().join("vm1.raw"), dir.path().join("vm2.raw"));
    sparse_image(&vm1, 32 << 20);
    sparse_image(&vm2, 8 << 20);
    run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", "-c", "write -P 0x5a 0 32M"])
            .arg(&vm1),
    );
    let pair = pair_of(vec![
        format!("vm1={}", vm1.display()),
        format!("vm2={}", vm2.display()),
    ]);
    let to = pair.destination_transfer.clone();
    let started = pair
        .source
        .client()
        .with_epoch(5)
        .migrate("vm1", &slow_migration(&to, None))
        .expect("epoch 5 starts the job");
    std::thread::sleep(Duration::from_secs(1));
    pair.destination
        .client()
        .with_epoch(6)
        .exports()
        .expect("epoch 6 is admitted");
    let failed = finished(&pair.source.client(), started.id);
    assert_eq!(failed.phase, JobPhase::Failed, "{failed:?}");
    assert_eq!(failed.authoritative, "source", "{failed:?}");
    let error = failed.error.clone().unwrap_or_default();
    assert!(
        error.contains("manager epoch 5 ") && error.contains("epoch 6 "),
        "{error}"
    );
    let read = run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-r",
        "-c",
        "read -P 0x5a 0 32M",
        &pair.source.uri("vm1"),
    ]));
    assert!(common::stdout(&read).contains("read 33554432/33554432"));

    let resumed = pair
        .source
        .client()
        .with_epoch(6)
        .migrate("vm1", &slow_migration(&to, Some(started.id)))
        .expect("epoch 6 resumes the job");
    let done = finished(&pair.source.client(), resumed.id);
    assert_eq!(done.phase, JobPhase::Done, "{done:?}");
    let moved = pair.destination.dir.path().join("state/images/vm1.img");
    // The source agent holds its image locked (qemu-img would refuse): a plain compare.
    run_ok(
        Command::new("cmp")
            .arg(common::stale_image(&vm1))
            .arg(&moved),
    );

    pair.destination
        .client()
        .with_epoch(8)
        .exports()
        .expect("epoch 8 is admitted");
    let refused = pair
        .source
        .client()
        .with_epoch(6)
        .migrate("vm2", &slow_migration(&to, None))
        .expect("epoch 6 is current at the source");
    let refused = finished(&pair.source.client(), refused.id);
    assert_eq!(refused.phase, JobPhase::Failed, "{refused:?}");
    let error = refused.error.unwrap_or_default();
    assert!(error.contains("older than epoch 8"), "{error}");
    assert!(
        !pair
            .destination
            .dir
            .path()
            .join("state/images/vm2.img")
            .exists(),
        "a refused Open created an image"
    );
}
