//! `ferry manager` with real processes on loopback: three agents (the witness candidates)
//! sharing the fleet token, two managers. One becomes active; the agents' fences learn its
//! epoch; the standby redirects writes; draining the witness moves the lease without a
//! failover; kill -9 of the active fails over within the lease plus a second, and the old
//! epoch is refused by the agents; the killed manager comes back as standby.
//! (The partition, pause, jitter and clock scenarios run in network namespaces:
//! `scripts/manager-scenarios`.)

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{agent_bin, free_port, scratch_dir, AgentProc};
use ferry::api::fleet::ManagerStatus;
use ferry::api::{Client, ClientError};

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A `ferry manager` process.
struct ManagerProc {
    child: Option<Child>,
    args: Vec<String>,
    dir: PathBuf,
    api: String,
}

impl ManagerProc {
    fn start(id: &str, api: &str, peer: &str, agents: &[String], dir: &Path) -> Self {
        let token_file = dir.join("fleet.token");
        std::fs::write(&token_file, TOKEN).expect("token");
        let mut args: Vec<String> = [
            "manager",
            "--id",
            id,
            "--listen",
            api,
            "--peer",
            peer,
            "--manager-dir",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(dir.join(id).display().to_string());
        args.push("--token-file".into());
        args.push(token_file.display().to_string());
        for agent in agents {
            args.push("--agent".into());
            args.push(agent.clone());
        }
        let mut manager = Self {
            child: None,
            args,
            dir: dir.to_path_buf(),
            api: api.to_string(),
        };
        manager.spawn();
        manager
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", self.api.replace(':', "_"))))
            .expect("log");
        let child = Command::new(agent_bin())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(log)
            .env("RUST_LOG", "info")
            .spawn()
            .expect("spawn ferry manager");
        self.child = Some(child);
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join(format!("{}.log", self.api.replace(':', "_"))))
            .unwrap_or_default()
    }

    fn client(&self) -> Client {
        Client::new(&self.api, Some(TOKEN.into()))
    }

    fn status(&self) -> Option<ManagerStatus> {
        self.client().manager_status().ok()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ManagerProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent whose state directory holds the fleet token before it starts.
fn agent() -> AgentProc {
    let dir = scratch_dir();
    std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
    std::fs::write(dir.path().join("state/api.token"), TOKEN).expect("token");
    AgentProc::start_in(dir, &[], &[])
}

/// Polls until `check` holds of the two managers' statuses, or panics after `limit`.
fn wait_for(
    managers: &[&ManagerProc],
    limit: Duration,
    what: &str,
    check: impl Fn(&[Option<ManagerStatus>]) -> bool,
) -> Vec<Option<ManagerStatus>> {
    let deadline = Instant::now() + limit;
    loop {
        let statuses: Vec<_> = managers.iter().map(|m| m.status()).collect();
        if check(&statuses) {
            return statuses;
        }
        if Instant::now() > deadline {
            panic!(
                "{what}: not after {limit:?}: {statuses:#?}\n{}",
                managers
                    .iter()
                    .map(|m| m.log())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Managers m1 and m2 on loopback, peers of each other, managing `agents` (`NAME=ADDR`).
fn start_pair(agents: &[String], dir: &Path) -> [ManagerProc; 2] {
    let apis = [
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ];
    [
        ManagerProc::start("m1", &apis[0], &format!("m2={}", apis[1]), agents, dir),
        ManagerProc::start("m2", &apis[1], &format!("m1={}", apis[0]), agents, dir),
    ]
}

fn active_index(statuses: &[Option<ManagerStatus>]) -> Option<usize> {
    let actives: Vec<usize> = statuses
        .iter()
        .enumerate()
        .filter(|(_, s)| s.as_ref().is_some_and(|s| s.active))
        .map(|(i, _)| i)
        .collect();
    assert!(actives.len() <= 1, "two actives: {statuses:#?}");
    actives.first().copied()
}

fn agent_epoch(agent: &AgentProc) -> u64 {
    let metrics = agent.client().metrics().expect("metrics");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("ferry_manager_epoch "))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

/// `ferry ARGS --api MANAGER --token-file ...` (the operator's CLI), which must succeed.
fn cli_ok(manager: &ManagerProc, args: &[&str]) -> String {
    let token_file = manager.dir.join("fleet.token");
    let out = Command::new(agent_bin())
        .args(args)
        .args(["--api", &manager.api, "--token-file"])
        .arg(&token_file)
        .output()
        .expect("run ferry");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ferry {args:?}: {text}");
    text
}

/// Whether `status` lists `host` as an agent it has heard from.
fn hears(status: &Option<ManagerStatus>, host: &str) -> bool {
    status.as_ref().is_some_and(|s| {
        s.agents
            .iter()
            .any(|a| a.name == host && a.heard_ms_ago.is_some_and(|ms| ms < 3_000))
    })
}

#[test]
fn a_pair_elects_moves_its_witness_and_fails_over() {
    // Goal: election, fencing, redirect, a host added at run time, a drain that moves the
    // witness with no failover, kill -9 failover, rejoin, and the operator's forced takeover
    // when the active and the witness are lost at once.
    let mut agents: Vec<AgentProc> = (0..3).map(|_| agent()).collect();
    let names: Vec<String> = agents
        .iter()
        .enumerate()
        .map(|(i, a)| format!("h{}={}", i + 1, a.api))
        .collect();
    let dir = scratch_dir();
    // h3 is not configured: the operator adds it while the pair runs.
    let mut managers = start_pair(&names[..2], dir.path());

    // Election: the first witness is chosen by both, one manager is active a lease later.
    let statuses = wait_for(
        &[&managers[0], &managers[1]],
        Duration::from_secs(20),
        "an active",
        |s| active_index(s).is_some(),
    );
    let active = active_index(&statuses).expect("active");
    let first = statuses[active].clone().expect("status");
    let epoch = first.epoch.expect("epoch");
    let witness = first.witness.clone().expect("witness");
    let other = statuses[1 - active].clone().expect("standby status");
    assert_eq!(
        other.witness.as_ref(),
        Some(&witness),
        "both recorded the witness"
    );

    // The agents' fences learn the epoch from the active's pings.
    let deadline = Instant::now() + Duration::from_secs(5);
    while agents[..2].iter().any(|a| agent_epoch(a) < epoch) {
        assert!(
            Instant::now() < deadline,
            "fences did not learn epoch {epoch}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The standby redirects a write it does not serve to the active, once a heartbeat told
    // it which one that is (until then it answers 503: no active known).
    wait_for(
        &[&managers[1 - active]],
        Duration::from_secs(5),
        "standby sees the active",
        |s| s[0].as_ref().is_some_and(|s| s.peer.active),
    );
    let err = managers[1 - active]
        .client()
        .abort_job(1)
        .expect_err("standby redirects");
    assert_eq!(err.status(), Some(307), "{err}");

    // A host added at run time (on either manager: the standby here) is managed by both.
    let added = cli_ok(
        &managers[1 - active],
        &["host", "add", "h3", &agents[2].api],
    );
    assert!(added.contains("h3: managed"), "{added}");
    wait_for(
        &[&managers[0], &managers[1]],
        Duration::from_secs(5),
        "both managers hear the added h3",
        |s| hears(&s[0], "h3") && hears(&s[1], "h3"),
    );

    // Draining the witness moves the lease, with no failover.
    let drained = witness.host.clone();
    managers[1 - active]
        .client()
        .host_drain(&drained, true, false)
        .expect("drain");
    let statuses = wait_for(
        &[&managers[0], &managers[1]],
        Duration::from_secs(10),
        "a move",
        |s| {
            s[active]
                .as_ref()
                .and_then(|s| s.witness.as_ref())
                .is_some_and(|w| w.host != drained && w.generation == witness.generation + 1)
        },
    );
    let moved = statuses[active].clone().expect("status");
    assert!(
        moved.active && moved.epoch == Some(epoch),
        "no failover: {moved:?}"
    );
    assert_eq!(moved.role_changes, first.role_changes, "no role change");

    // kill -9 of the active: the standby takes over (within the lease plus a second: 4.1 s
    // here; scripts/bench-failover measures it).
    let killed_at = Instant::now();
    managers[active].kill();
    let statuses = wait_for(
        &[&managers[1 - active]],
        Duration::from_secs(10),
        "failover",
        |s| s[0].as_ref().is_some_and(|s| s.active),
    );
    let failover = killed_at.elapsed();
    let new_epoch = statuses[0].as_ref().and_then(|s| s.epoch).expect("epoch");
    eprintln!("failover after kill -9: {failover:?}, epoch {epoch} -> {new_epoch}");
    assert!(
        failover <= Duration::from_secs(5),
        "failover took {failover:?}"
    );
    assert!(new_epoch > epoch);

    // The agents refuse the old epoch once the new active's pings reached them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while agents.iter().any(|a| agent_epoch(a) < new_epoch) {
        assert!(
            Instant::now() < deadline,
            "fences did not learn epoch {new_epoch}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let stale = agents[0].client().with_epoch(epoch).exports();
    assert!(
        matches!(stale, Err(ClientError::StaleEpoch { .. })),
        "{stale:?}"
    );

    // The killed manager comes back as standby.
    managers[active].spawn();
    let statuses = wait_for(
        &[&managers[0], &managers[1]],
        Duration::from_secs(10),
        "rejoin",
        |s| {
            s[active]
                .as_ref()
                .is_some_and(|s| s.peer.active && !s.active)
        },
    );
    assert_eq!(active_index(&statuses), Some(1 - active));
    // It kept the host added before it was killed (its hosts file).
    assert!(
        statuses[active]
            .as_ref()
            .is_some_and(|s| s.agents.iter().any(|a| a.name == "h3")),
        "h3 forgotten: {statuses:#?}"
    );

    // The active and the witness lost at once: the standby waits, as any quorum system
    // must, until the operator forces a takeover with another witness.
    let survivor = active;
    let witness = statuses[1 - active]
        .as_ref()
        .and_then(|s| s.witness.clone())
        .expect("witness");
    let witness_index: usize = witness.host[1..].parse::<usize>().expect("hN") - 1;
    managers[1 - active].kill();
    agents[witness_index].kill();
    std::thread::sleep(Duration::from_secs(7));
    let waiting = managers[survivor].status().expect("status");
    assert!(!waiting.active, "took over without a witness: {waiting:?}");
    let other_host = format!("h{}", (witness_index + 1) % 3 + 1);
    let forced = cli_ok(
        &managers[survivor],
        &["manager", "takeover", "--force", "--witness", &other_host],
    );
    eprintln!("forced takeover: {forced}");
    let statuses = wait_for(
        &[&managers[survivor]],
        Duration::from_secs(10),
        "forced takeover",
        |s| s[0].as_ref().is_some_and(|s| s.active),
    );
    let forced_epoch = statuses[0].as_ref().and_then(|s| s.epoch).expect("epoch");
    assert!(forced_epoch > new_epoch, "{forced_epoch} after {new_epoch}");
    assert_eq!(
        statuses[0]
            .as_ref()
            .and_then(|s| s.witness.clone())
            .map(|w| w.host),
        Some(other_host)
    );
}

/// An agent with the fleet token and the cluster key, serving `exports`, with `extra` flags.
fn keyed_agent(key: &Path, exports: &[String], extra: &[&str]) -> (AgentProc, String) {
    let dir = scratch_dir();
    std::fs::create_dir_all(dir.path().join("state")).expect("state dir");
    std::fs::write(dir.path().join("state/api.token"), TOKEN).expect("token");
    let transfer = format!("127.0.0.1:{}", free_port());
    let key = key.display().to_string();
    let mut flags = vec!["--transfer", &transfer, "--cluster-key", &key];
    flags.extend_from_slice(extra);
    (AgentProc::start_in(dir, exports, &flags), transfer)
}

#[test]
fn a_batch_driven_by_the_manager_survives_a_failover() {
    // Goal: `ferry migrate --batch` against a manager moves disks between agents, jobs named
    // across the fleet (SOURCE:ID), and the batch carries on after the active is killed.
    // Method: h1 serves three 16 MiB images, h2 receives (named by host: the manager knows
    // its block-stream address), h3 is a witness candidate; concurrency 1 at 4 MiB/s, so the
    // batch lasts ~12 s; kill -9 the active once the first job runs; the new active finishes
    // it; every item is migrated with the images' digests compared at the switchover.
    // Then a seed replication through the new active: vm4's seed was exported at h1 before
    // the managers started, written to since, and imported at h2; `ferry seed sync vm4 --to
    // h2 --then migrate --api MANAGER` catches it up and switches it over.
    let keys = scratch_dir();
    let key = common::pair::write_key(keys.path());
    let images = scratch_dir();
    let exports: Vec<String> = (1..=4)
        .map(|i| {
            let path = images.path().join(format!("vm{i}.img"));
            common::data_image(&path, 16, i as u8);
            format!("vm{i}={}", path.display())
        })
        .collect();
    let (h1, _) = keyed_agent(&key, &exports, &[]);
    let (h2, h2_transfer) = keyed_agent(&key, &[], &["--tcp"]);
    let (h3, _) = keyed_agent(&key, &[], &[]);
    let medium = images.path().join("medium");
    std::fs::create_dir(&medium).expect("medium");
    let medium_arg = medium.display().to_string();
    h1.cli_ok(&["seed", "export", "vm4", "--media", &medium_arg]);
    common::run_ok(Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x66 1M 256k",
        &h1.uri("vm4"),
    ]));
    h2.cli_ok(&["seed", "import", "--media", &medium_arg]);
    let names = vec![
        format!("h1={}", h1.api),
        format!("h2={},{h2_transfer}", h2.api),
        format!("h3={}", h3.api),
    ];
    let dir = scratch_dir();
    let mut managers = start_pair(&names, dir.path());
    let statuses = wait_for(
        &[&managers[0], &managers[1]],
        Duration::from_secs(20),
        "an active",
        |s| active_index(s).is_some(),
    );
    let active = active_index(&statuses).expect("active");
    let token_file = dir.path().join("fleet.token");
    let out = Command::new(agent_bin())
        .args([
            "migrate", "vm1", "vm2", "vm3", "--to", "h2", "--batch", "b1",
        ])
        .args([
            "--concurrency",
            "1",
            "--bandwidth",
            "4M",
            "--verify",
            "--no-wait",
        ])
        .args(["--api", &managers[active].api, "--token-file"])
        .arg(&token_file)
        .output()
        .expect("ferry migrate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Kill the active once the first job runs.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let view = managers[active].client().manager_batch("b1");
        if view.is_ok_and(|v| v.items.iter().any(|i| i.state == "running")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no job started:\n{}",
            managers[active].log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    managers[active].kill();

    // The other manager takes over and finishes the batch.
    let survivor = &managers[1 - active];
    let deadline = Instant::now() + Duration::from_secs(90);
    let view = loop {
        if let Ok(view) = survivor.client().manager_batch("b1") {
            if view.done {
                break view;
            }
        }
        assert!(
            Instant::now() < deadline,
            "batch not done:\n{}",
            survivor.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!("{view:#?}");
    for item in &view.items {
        assert_eq!(item.state, "migrated", "{item:?}");
        assert!(
            item.job
                .as_deref()
                .is_some_and(|job| job.starts_with("h1:")),
            "{item:?}"
        );
    }
    let lines = h1.client().migration_status(Some("b1")).expect("status");
    let migrated = lines.iter().filter(|l| l.verdict == "migrated").count();
    assert_eq!(migrated, 3, "{lines:#?}");

    // The seed replication, driven by the manager that took over.
    cli_ok(
        survivor,
        &[
            "seed", "sync", "vm4", "--to", "h2", "--then", "migrate", "--batch", "s1",
        ],
    );
    let view = survivor.client().manager_batch("s1").expect("plan s1");
    assert_eq!(view.items[0].state, "migrated", "{view:?}");
    let seeded = h2.state_dir.join("images").join("vm4.img");
    let source = common::stale_image(&images.path().join("vm4.img"));
    common::run_ok(Command::new("cmp").arg(&source).arg(&seeded));
    drop((h2, h3));
}
