//! The manager at (CI-sized) scale: two real `ferry manager` processes over 100 fake agents
//! in this process (`tests/support/fake_agents.rs`: the real API listener and router over
//! in-memory agents). The full-size run is `scripts/bench-manager-scale` (1000 agents).
//!
//! Goal: fleet status answers every agent's lines within 2 s, and meanwhile the active renews
//! its lease on time: it stays active at its epoch, its lease never has less than
//! `lease − 2 × renewal` left, no manager changes role, no log says the deadline passed.
//! Method: wait for an active; watch both managers' status every 100 ms from a thread while
//! asking the active for the fleet's status a few times, then for a few seconds more.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;
#[path = "support/fake_agents.rs"]
mod fake_agents;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{agent_bin, free_port, scratch_dir};
use fake_agents::{Fleet, Options};
use ferry::api::fleet::ManagerStatus;
use ferry::api::Client;

const TOKEN: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const AGENTS: usize = 100;
const DISKS: usize = 4;
const RENEW_MS: u64 = 1_000;
/// A bound with slack for a loaded CI machine: the 2 s goal at 1000 agents is measured by
/// `scripts/bench-manager-scale` (performance goals live in benchmark scripts).
const STATUS_GOAL: Duration = Duration::from_secs(10);

/// A `ferry manager` process, killed on drop.
struct Manager {
    child: Child,
    api: String,
    log: PathBuf,
}

impl Manager {
    fn start(dir: &Path, id: &str, api: &str, peer: (&str, &str), agents: &[String]) -> Self {
        let token_file = dir.join("fleet.token");
        std::fs::write(&token_file, TOKEN).expect("token");
        let mut toml = format!(
            "id = \"{id}\"\npair = \"scale\"\nlisten = \"{api}\"\nstate_dir = \"{}\"\n\
             token_file = \"{}\"\n\n[peer]\nid = \"{}\"\naddress = \"{}\"\n",
            dir.join(id).display(),
            token_file.display(),
            peer.0,
            peer.1
        );
        for line in agents {
            let (name, address) = line.split_once('=').expect("NAME=ADDRESS");
            let _ = write!(
                toml,
                "\n[[agents]]\nname = \"{name}\"\naddress = \"{address}\"\n"
            );
        }
        let config = dir.join(format!("{id}.toml"));
        std::fs::write(&config, toml).expect("config");
        let log = dir.join(format!("{id}.log"));
        let child = Command::new(agent_bin())
            .args(["manager", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .env("RUST_LOG", "info")
            .spawn()
            .expect("spawn ferry manager");
        Self {
            child,
            api: api.to_string(),
            log,
        }
    }

    fn client(&self) -> Client {
        Client::new(&self.api, Some(TOKEN.into()))
    }

    fn status(&self) -> Option<ManagerStatus> {
        self.client().manager_status().ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One poll of the active's status.
#[derive(Debug, Clone)]
struct Sample {
    at: Duration,
    active: bool,
    epoch: Option<u64>,
    lease_remaining_ms: u64,
    role_changes: u64,
}

/// Polls `api` every 100 ms until `stop`.
fn watch(api: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Sample>> {
    std::thread::spawn(move || {
        let client = Client::new(&api, Some(TOKEN.into()));
        let started = Instant::now();
        let mut samples = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            if let Ok(status) = client.manager_status() {
                samples.push(Sample {
                    at: started.elapsed(),
                    active: status.active,
                    epoch: status.epoch,
                    lease_remaining_ms: status.lease_remaining_ms,
                    role_changes: status.role_changes,
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        samples
    })
}

#[test]
fn a_manager_over_100_agents_answers_fleet_status_and_renews_on_time() {
    let mut fleet = Fleet::start(AGENTS, TOKEN, &Options::default()).expect("fake agents");
    let dir = scratch_dir();
    let apis = [
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    ];
    let managers = [
        Manager::start(dir.path(), "m1", &apis[0], ("m2", &apis[1]), &fleet.lines),
        Manager::start(dir.path(), "m2", &apis[1], ("m1", &apis[0]), &fleet.lines),
    ];
    let logs = || {
        managers
            .iter()
            .map(Manager::log)
            .collect::<Vec<_>>()
            .join("\n---\n")
    };

    // An active, a lease (4 s on a fresh witness) after the witness is chosen.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (active, first) = loop {
        let found = managers
            .iter()
            .enumerate()
            .find_map(|(i, m)| m.status().filter(|s| s.active).map(|s| (i, s)));
        if let Some(found) = found {
            break found;
        }
        assert!(
            Instant::now() < deadline,
            "no active after 20 s\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let standby_changes = managers[1 - active]
        .status()
        .expect("standby status")
        .role_changes;
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch(apis[active].clone(), stop.clone());

    // Fleet status, a few times: every agent's lines, each answer within the goal.
    let client = managers[active].client();
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let lines = client.migration_status(None).expect("fleet status");
        times.push(started.elapsed());
        assert_eq!(lines.len(), AGENTS * DISKS, "every agent's lines");
    }
    std::thread::sleep(Duration::from_secs(5));
    stop.store(true, Ordering::Relaxed);
    let samples = watcher.join().expect("watcher");
    let lowest = samples.iter().min_by_key(|s| s.lease_remaining_ms);
    eprintln!(
        "{AGENTS} agents: fleet status {times:?}; lease remaining min {:?} ms (at {:?}) over \
         {} samples; fake agents {}",
        lowest.map(|s| s.lease_remaining_ms),
        lowest.map(|s| s.at),
        samples.len(),
        fleet.counts_line()
    );
    let slowest = times.iter().max().expect("timed");
    assert!(*slowest <= STATUS_GOAL, "fleet status took {slowest:?}");

    // The lease was renewed on time all along.
    assert!(samples.len() >= 40, "too few samples: {}", samples.len());
    // The lease never lapsed (the bench checks the tighter floor: lease - 2 renewals).
    let floor_ms = RENEW_MS / 10;
    for sample in &samples {
        assert!(
            sample.active && sample.epoch == first.epoch,
            "{sample:?}\n{}",
            logs()
        );
        assert!(
            sample.lease_remaining_ms >= floor_ms,
            "{sample:?}: below {floor_ms} ms\n{}",
            logs()
        );
        assert_eq!(sample.role_changes, first.role_changes, "{sample:?}");
    }
    let standby = managers[1 - active].status().expect("standby status");
    assert!(!standby.active);
    assert_eq!(
        standby.role_changes, standby_changes,
        "the standby changed role"
    );
    assert!(!logs().contains("the lease deadline passed"), "{}", logs());
    drop(managers);
    fleet.stop();
}
