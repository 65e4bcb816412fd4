//! The manager pair against real faults (issue 13, "How it is tested"): agents on netlab
//! hosts h1..h4, managers m1 and m2 on hosts h5 and h6, all APIs over mutual TLS on the lab's
//! addresses. Each scenario starts from a settled pair (one active, the standby hears it,
//! both recorded the same witness, every agent knows the epoch), injects one fault, heals it
//! and waits until the pair settles again:
//!
//! 1. kill -9 of the active (its host crashes): the standby is active within 5 s.
//! 2. the active isolated from every host: failover within 5 s; healed, it comes back standby.
//! 3. the active cut off from the witness only: no failover, the lease moves.
//! 4. the managers cut apart (both reach the witness): no failover.
//! 5. the witness host crashes: no failover, the lease moves.
//! 6. the witness agent is killed and started again: no failover.
//! 7. the witness host is drained: no failover, the lease moves.
//! 8. the active is stopped (SIGSTOP) for 8 s: failover; woken, it logs standby and the
//!    agents refuse its epoch.
//! 9. 0..200 ms of jitter on every link of the active (a delaying proxy; no netem here):
//!    no failover for 15 s (9a first makes the proxied manager the active, by a kill -9).
//! 10. one manager's monotonic clock shifted by 100000 s (`unshare --time`): the pair still
//!     fails over both ways (10a puts the shifted manager in, 10 makes it the active).
//!
//! Method: pollers in the root namespace ask both managers for their status every 100 ms and
//! every agent for its `ferry_manager_epoch` every 300 ms; the managers' logs give every role
//! change with a millisecond timestamp. Checked for the whole run: no two active intervals
//! overlap (by the logs, within one 100 ms tick of the lease loop, and by the polls where a
//! sample proves it), the epochs of successive active intervals grow, agents' epochs never go
//! down; per scenario: the takeovers expected, the failover time, the old epoch refused.
//! A batch migration runs through the scenarios (`common::managers::batch`): three disks of
//! h1 moved to h2 by whichever manager is active, at 1 MiB/s, digests compared at every
//! switchover, a guest writing into every disk all along; at the end every item is migrated
//! and every acknowledged write is in h2's images.
//! Needs root (network namespaces), as scripts/test runs it.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::managers::batch::{self, LabBatch};
use common::managers::checks::{
    both_active_polls, intervals, polls_csv, proven_overlaps, timeline, Event, LOG_TICK_MS,
};
use common::managers::jitter::JitterProxy;
use common::managers::{
    now_ms, role_lines, Fleet, Lab, LabAgent, LabManager, Launch, RoleLine, Sample, Watch,
};
use common::{agent_bin, scratch_dir};
use ferry::api::fleet::ManagerStatus;
use ferry::api::ClientError;
use ferry::lease::role::WitnessChoice;

/// Agents' hosts; the managers are on the two hosts after them.
const AGENTS: u32 = 4;
/// A failover must happen, within the lease (4 s) plus one second plus slack for a loaded
/// CI machine; the 5 s goal itself is measured by `scripts/bench-failover` (performance goals
/// live in benchmark scripts, not in timed tests). The table prints every figure.
const FAILOVER_LIMIT_MS: u64 = 8_000;
/// How long a fault that must not cause a failover is held: longer than the lease.
const HOLD_MS: u64 = 6_500;

/// A settled pair.
#[derive(Debug, Clone)]
struct Settled {
    active: usize,
    epoch: u64,
    witness: WitnessChoice,
}

/// What one scenario did and found.
#[derive(Debug, Default)]
struct Outcome {
    name: String,
    expect_failover: bool,
    takeovers: usize,
    failover_ms: Option<u64>,
    failover_poll_ms: Option<u64>,
    epochs: (u64, u64),
    witness: (String, String),
    notes: Vec<String>,
    failures: Vec<String>,
}

/// The lab, the fleet and what the test did; fields drop in order (pollers, processes, then
/// the lab goes down).
struct Harness {
    watch: Watch,
    managers: [LabManager; 2],
    agents: Vec<LabAgent>,
    proxies: Vec<JitterProxy>,
    launches: [Launch; 2],
    events: Vec<(u64, usize, Event)>,
    lab: Lab,
    fleet: Fleet,
    batch: LabBatch,
    root: tempfile::TempDir,
}

impl Harness {
    fn new() -> Harness {
        let lab = Lab::up("msc", "10.79", AGENTS + 2);
        let fleet = Fleet::new(&lab, AGENTS + 2);
        let root = scratch_dir();
        let batch = LabBatch::prepare(root.path());
        let agents: Vec<LabAgent> = (1..=AGENTS)
            .map(|i| {
                let host = format!("h{i}");
                let flags = batch.agent_flags(&lab, &fleet, &host);
                LabAgent::start(&lab, &fleet, &host, root.path(), flags)
            })
            .collect();
        let ids = ["m1", "m2"];
        let mut managers = [0, 1].map(|i| {
            LabManager::new(
                ids[i],
                &format!("h{}", AGENTS + 1 + i as u32),
                &lab,
                root.path(),
            )
        });
        let agent_args: Vec<String> = agents
            .iter()
            .map(|a| LabBatch::manager_agent(&lab, &a.host, &a.api))
            .collect();
        let launches = [0, 1].map(|i| Launch {
            agents: agent_args.clone(),
            peer: format!("{}={}", ids[1 - i], managers[1 - i].listen),
            wrapper: Vec::new(),
        });
        for (manager, launch) in managers.iter_mut().zip(&launches) {
            manager.spawn(&lab, &fleet, launch);
        }
        let listens: Vec<String> = managers.iter().map(|m| m.listen.clone()).collect();
        let apis: Vec<String> = agents.iter().map(|a| a.api.clone()).collect();
        let watch = Watch::start(&fleet, &listens, &apis);
        Harness {
            watch,
            managers,
            agents,
            proxies: Vec::new(),
            launches,
            events: Vec::new(),
            lab,
            fleet,
            batch,
            root,
        }
    }

    fn netlab(&self, args: &[&str]) {
        self.lab.run(args);
    }

    fn logs(&self) -> String {
        self.managers
            .iter()
            .map(|m| format!("--- {} log:\n{}", m.id, m.log()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn roles(&self, manager: usize) -> Vec<RoleLine> {
        role_lines(&self.managers[manager].log())
    }

    /// The pair as the latest polls see it, if settled.
    fn settled_now(&self) -> Option<Settled> {
        let now = now_ms();
        let statuses: Vec<ManagerStatus> = (0..2)
            .map(|i| self.watch.latest(i))
            // A poll the watcher recorded after `now` was read is as fresh as can be.
            .map(|s| {
                s.filter(|s| now.saturating_sub(s.recv_ms) < 500)
                    .and_then(|s| s.status)
            })
            .collect::<Option<_>>()?;
        let actives: Vec<usize> = (0..2).filter(|&i| statuses[i].active).collect();
        let [active] = actives[..] else { return None };
        let (act, stb) = (&statuses[active], &statuses[1 - active]);
        let heard = |ms: Option<u64>| ms.is_some_and(|ms| ms < 1_500);
        let agents_heard = |s: &ManagerStatus| s.agents.iter().all(|a| heard(a.heard_ms_ago));
        let epoch = act.epoch?;
        let ok = stb.peer.active
            && heard(stb.peer.heard_ms_ago)
            && heard(act.peer.heard_ms_ago)
            && act.witness.is_some()
            && act.witness == stb.witness
            && act.pending.is_none()
            && stb.pending.is_none()
            && act.lease_remaining_ms > 2_500
            && agents_heard(act)
            && agents_heard(stb)
            && self
                .watch
                .agent_latest(self.agents.len())
                .iter()
                .all(|e| *e == Some(epoch));
        ok.then(|| Settled {
            active,
            epoch,
            witness: act.witness.clone().expect("checked"),
        })
    }

    fn settle(&self, what: &str) -> Settled {
        let deadline = Instant::now() + Duration::from_secs(25);
        loop {
            if let Some(settled) = self.settled_now() {
                return settled;
            }
            if Instant::now() > deadline {
                let latest: Vec<Option<Sample>> = (0..2).map(|i| self.watch.latest(i)).collect();
                panic!(
                    "{what}: the pair did not settle in 25 s: {latest:#?}\nagent epochs: {:?}\n{}",
                    self.watch.agent_latest(self.agents.len()),
                    self.logs()
                );
            }
            sleep_ms(100);
        }
    }

    /// Waits until manager `index` is active; when, by the polls.
    fn wait_active(&self, index: usize, limit_ms: u64) -> Option<u64> {
        let deadline = now_ms() + limit_ms;
        while now_ms() < deadline {
            if let Some(sample) = self
                .watch
                .latest(index)
                .filter(|s| s.active_epoch().is_some())
            {
                return Some(sample.recv_ms);
            }
            sleep_ms(50);
        }
        None
    }

    fn kill_manager(&mut self, index: usize) {
        self.events.push((now_ms(), index, Event::Killed));
        self.managers[index].kill();
    }

    fn restart_manager(&mut self, index: usize, launch: Launch) {
        self.managers[index].reap();
        self.managers[index].spawn(&self.lab, &self.fleet, &launch);
        self.launches[index] = launch;
    }

    fn agent_index(&self, host: &str) -> usize {
        self.agents
            .iter()
            .position(|a| a.host == host)
            .expect("witness on an agent host")
    }

    /// Every agent, told the old epoch, refuses it (409).
    fn check_stale_refused(&self, old: u64, new: u64, out: &mut Outcome) {
        for agent in &self.agents {
            let client = self.fleet.client(&agent.api, Duration::from_secs(2));
            match client.with_epoch(old).exports() {
                Err(ClientError::StaleEpoch { highest, .. }) if highest >= new => {}
                other => out.failures.push(format!(
                    "{}: a command at the old epoch {old} was not refused as stale: {other:?}",
                    agent.host
                )),
            }
        }
        out.notes
            .push(format!("epoch {old} refused by every agent"));
    }

    /// Runs one scenario: `fault` on a settled pair, `hold_ms` (after the takeover, when one is
    /// expected), `heal`, settled again; then the per-scenario checks.
    fn scenario(
        &mut self,
        name: &str,
        expect_failover: bool,
        hold_ms: u64,
        fault: impl FnOnce(&mut Harness, &Settled),
        heal: impl FnOnce(&mut Harness, &Settled),
    ) -> Outcome {
        let before = self.settle(&format!("before {name}"));
        eprintln!(
            "scenario {name}: active {}, epoch {}, witness {} (g{})",
            self.managers[before.active].id,
            before.epoch,
            before.witness.host,
            before.witness.generation
        );
        let start_ms = now_ms();
        fault(self, &before);
        let fault_ms = start_ms;
        let mut out = Outcome {
            name: name.into(),
            expect_failover,
            ..Outcome::default()
        };
        if expect_failover {
            out.failover_poll_ms = self
                .wait_active(1 - before.active, 10_000)
                .map(|at| at - fault_ms);
        }
        sleep_ms(hold_ms);
        heal(self, &before);
        let after = self.settle(&format!("after {name}"));
        let end_ms = now_ms();
        out.epochs = (before.epoch, after.epoch);
        out.witness = (
            format!("{}:g{}", before.witness.host, before.witness.generation),
            format!("{}:g{}", after.witness.host, after.witness.generation),
        );
        let takeovers: Vec<(usize, RoleLine)> = (0..2)
            .flat_map(|i| self.roles(i).into_iter().map(move |line| (i, line)))
            .filter(|(_, line)| line.active && (start_ms..=end_ms).contains(&line.at_ms))
            .collect();
        out.takeovers = takeovers.len();
        out.failover_ms = takeovers
            .iter()
            .map(|(_, line)| line.at_ms.saturating_sub(fault_ms))
            .min();
        let changes: usize = (0..2)
            .map(|i| {
                self.roles(i)
                    .iter()
                    .filter(|line| (start_ms..=end_ms).contains(&line.at_ms))
                    .count()
            })
            .sum();
        if expect_failover {
            self.check_failover(&before, &after, &takeovers, &mut out);
        } else {
            if changes > 0 || after.active != before.active || after.epoch != before.epoch {
                out.failures.push(format!(
                    "expected no failover: {changes} role changes, active {} -> {}, epoch {} -> {}",
                    self.managers[before.active].id,
                    self.managers[after.active].id,
                    before.epoch,
                    after.epoch
                ));
            }
        }
        if expect_failover && after.witness.host != before.witness.host {
            // No fault touched the witness: the restarted manager's first heartbeats list only
            // the hosts it heard so far, and the active moves the lease on that.
            out.notes.push(format!(
                "witness moved off {} with no fault on it (after a manager restart)",
                before.witness.host
            ));
        }
        out.notes.push(format!(
            "polls: {}",
            timeline(&self.watch, &self.managers, start_ms, end_ms)
        ));
        let overlaps = proven_overlaps(&self.watch, start_ms, end_ms);
        if overlaps > 0 {
            out.failures.push(format!(
                "{overlaps} polls prove both managers active at once"
            ));
        }
        out
    }

    fn check_failover(
        &self,
        before: &Settled,
        after: &Settled,
        takeovers: &[(usize, RoleLine)],
        out: &mut Outcome,
    ) {
        if takeovers.len() != 1 || takeovers[0].0 == before.active {
            out.failures.push(format!(
                "expected one takeover by the standby: {takeovers:?}"
            ));
        }
        if after.active == before.active {
            out.failures
                .push("the old active is active again after the heal".into());
        }
        match out.failover_ms {
            Some(ms) if ms <= FAILOVER_LIMIT_MS => {}
            other => out.failures.push(format!(
                "failover took {other:?} ms (limit {FAILOVER_LIMIT_MS})"
            )),
        }
        if after.epoch <= before.epoch {
            out.failures.push(format!(
                "the epoch did not grow: {} -> {}",
                before.epoch, after.epoch
            ));
        }
        self.check_stale_refused(before.epoch, after.epoch, out);
    }
}

fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// The whole run's checks: log intervals never overlap (beyond the log's resolution), their
/// epochs grow, agents' epochs never go down. Failures, and a line of findings.
fn whole_run_checks(h: &Harness) -> (Vec<String>, String) {
    let mut failures = Vec::new();
    let roles: Vec<Vec<RoleLine>> = (0..2).map(|i| h.roles(i)).collect();
    let all = intervals(&roles, &h.events, now_ms());
    let mut min_gap: Option<i64> = None;
    for pair in all.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        if next.epoch <= prev.epoch {
            failures.push(format!("epochs did not grow: {prev:?} then {next:?}"));
        }
        if prev.manager == next.manager {
            continue;
        }
        let gap = next.start_ms as i64 - prev.end_ms as i64;
        min_gap = Some(min_gap.map_or(gap, |g| g.min(gap)));
        let tolerated = prev.end_by == "logged standby" && -gap <= LOG_TICK_MS as i64;
        if gap < 0 && !tolerated {
            failures.push(format!("active intervals overlap: {prev:?} and {next:?}"));
        }
    }
    let log = h.watch.agent_epochs.lock().unwrap().clone();
    for agent in 0..h.agents.len() {
        let epochs: Vec<u64> = log
            .iter()
            .filter(|(_, i, _)| *i == agent)
            .map(|e| e.2)
            .collect();
        if epochs.windows(2).any(|w| w[1] < w[0]) {
            failures.push(format!(
                "{}: ferry_manager_epoch went down: {epochs:?}",
                h.agents[agent].host
            ));
        }
    }
    let both = both_active_polls(&h.watch);
    let proven = proven_overlaps(&h.watch, 0, u64::MAX);
    if proven > 0 {
        failures.push(format!("{proven} poll pairs prove two actives"));
    }
    let findings = format!(
        "{} active intervals (epochs {:?}); smallest handover gap by the logs {} ms; \
         {both} polls saw both active within 100 ms ({proven} prove an overlap); \
         {} agent epoch samples, never decreasing: {}",
        all.len(),
        all.iter().map(|i| i.epoch).collect::<Vec<_>>(),
        min_gap.map_or("n/a".into(), |g| g.to_string()),
        log.len(),
        failures.iter().all(|f| !f.contains("went down"))
    );
    (failures, findings)
}

// ---------------------------------------------------------------------------------------------
// The scenarios.

/// `ferry host drain|undrain HOST` through manager `manager`'s API, as an operator would.
fn host_cli(h: &Harness, manager: usize, action: &str, host: &str) {
    let out = Command::new(agent_bin())
        .args(["host", action, host, "--api", &h.managers[manager].listen])
        .arg("--token-file")
        .arg(&h.fleet.token_file)
        .arg("--api-tls-creds")
        .arg(&h.fleet.creds)
        .output()
        .expect("ferry host");
    assert!(
        out.status.success(),
        "ferry host {action} {host}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The scenario expects the lease to have left the old witness.
fn expect_moved(out: &mut Outcome, before: &str) {
    if out.witness.1.split(':').next() == Some(before) {
        out.failures
            .push(format!("the witness did not move off {before}"));
    }
}

fn kill_active(h: &mut Harness) -> Outcome {
    h.scenario(
        "1 kill -9 the active (host crash)",
        true,
        500,
        |h, s| {
            h.events.push((now_ms(), s.active, Event::Killed));
            let host = h.managers[s.active].host.clone();
            h.netlab(&["crash", &host]);
        },
        |h, s| {
            let host = h.managers[s.active].host.clone();
            h.netlab(&["plug", &host]);
            let launch = h.launches[s.active].clone();
            h.restart_manager(s.active, launch);
        },
    )
}

fn isolate_active(h: &mut Harness) -> Outcome {
    let mut isolated_at = 0;
    let mut out = h.scenario(
        "2 isolate the active",
        true,
        1_000,
        |h, s| {
            isolated_at = now_ms();
            h.netlab(&["isolate", &h.managers[s.active].host]);
        },
        |h, s| h.netlab(&["heal", &h.managers[s.active].host]),
    );
    let old = 1 - h.settled_now().map_or(0, |s| s.active);
    match h
        .roles(old)
        .iter()
        .find(|l| !l.active && l.at_ms >= isolated_at)
    {
        Some(line) => out.notes.push(format!(
            "old active logged standby {} ms after isolation ({})",
            line.at_ms - isolated_at,
            line.reason
        )),
        None => out
            .failures
            .push("the isolated active never logged standby".into()),
    }
    out
}

fn block_witness(h: &mut Harness) -> Outcome {
    let mut witness = String::new();
    let mut out = h.scenario(
        "3 cut active <-> witness",
        false,
        HOLD_MS,
        |h, s| {
            witness.clone_from(&s.witness.host);
            let active = h.managers[s.active].host.clone();
            h.netlab(&["block", &active, &s.witness.host]);
            h.netlab(&["block", &s.witness.host, &active]);
        },
        |h, s| h.netlab(&["heal", &h.managers[s.active].host]),
    );
    expect_moved(&mut out, &witness);
    out
}

fn split_managers(h: &mut Harness) -> Outcome {
    h.scenario(
        "4 cut the managers apart",
        false,
        HOLD_MS,
        |h, _| {
            let (a, b) = (h.managers[0].host.clone(), h.managers[1].host.clone());
            h.netlab(&["partition", &a, &b]);
        },
        |h, _| h.netlab(&["heal"]),
    )
}

fn crash_witness(h: &mut Harness) -> Outcome {
    let mut witness = String::new();
    let mut out = h.scenario(
        "5 crash the witness host",
        false,
        HOLD_MS,
        |h, s| {
            witness.clone_from(&s.witness.host);
            h.netlab(&["crash", &s.witness.host]);
            let index = h.agent_index(&s.witness.host);
            h.agents[index].reap();
        },
        |h, s| {
            h.netlab(&["plug", &s.witness.host]);
            let index = h.agent_index(&s.witness.host);
            h.agents[index].spawn(&h.lab, &h.fleet);
        },
    );
    expect_moved(&mut out, &witness);
    out
}

fn restart_witness(h: &mut Harness) -> Outcome {
    let mut witness = String::new();
    let mut out = h.scenario(
        "6 restart the witness agent",
        false,
        HOLD_MS,
        |h, s| {
            witness.clone_from(&s.witness.host);
            let index = h.agent_index(&s.witness.host);
            h.agents[index].kill();
            h.agents[index].spawn(&h.lab, &h.fleet);
        },
        |_, _| {},
    );
    let moved = out.witness.1.split(':').next() != Some(witness.as_str());
    out.notes.push(format!(
        "lease {} {witness}",
        if moved { "moved off" } else { "stayed on" }
    ));
    out
}

fn drain_witness(h: &mut Harness) -> Outcome {
    let mut witness = String::new();
    let mut out = h.scenario(
        "7 drain the witness host",
        false,
        HOLD_MS,
        |h, s| {
            witness.clone_from(&s.witness.host);
            host_cli(h, s.active, "drain", &s.witness.host);
        },
        |h, s| host_cli(h, s.active, "undrain", &s.witness.host),
    );
    expect_moved(&mut out, &witness);
    out
}

fn pause_active(h: &mut Harness) -> Outcome {
    let paused_at = std::cell::Cell::new(0);
    let (mut resumed_at, mut old, mut refused) = (0, 0, Vec::new());
    let mut out = h.scenario(
        "8 SIGSTOP the active 8 s",
        true,
        0,
        |h, s| {
            old = s.active;
            paused_at.set(now_ms());
            h.events.push((paused_at.get(), s.active, Event::Paused));
            h.netlab(&["pause", &h.managers[s.active].host]);
        },
        |h, s| {
            sleep_ms((paused_at.get() + 8_000).saturating_sub(now_ms()));
            resumed_at = now_ms();
            h.netlab(&["resume", &h.managers[s.active].host]);
            sleep_ms(1_500); // what the woken manager sends at its old epoch, before our check
            refused = stale_refusals(h, s.epoch, resumed_at);
        },
    );
    out.notes
        .push(format!("stopped {} ms", resumed_at - paused_at.get()));
    out.notes.push(format!(
        "agents refused {} calls at epoch {} after SIGCONT {refused:?}",
        refused.len(),
        out.epochs.0
    ));
    let woke = h
        .roles(old)
        .into_iter()
        .find(|l| !l.active && l.at_ms >= resumed_at);
    match woke {
        Some(line) if line.at_ms - resumed_at <= 2_000 => out.notes.push(format!(
            "woken, it logged standby after {} ms ({})",
            line.at_ms - resumed_at,
            line.reason
        )),
        other => out.failures.push(format!(
            "the woken manager did not log standby within 2 s: {other:?}"
        )),
    }
    out
}

/// Calls at `epoch` the agents refused as stale since `from_ms`, by their logs
/// (`[STAMP WARN ...] control API: GET /v1/exports: manager epoch 3 is older ...`), as
/// `host: METHOD PATH`.
fn stale_refusals(h: &Harness, epoch: u64, from_ms: u64) -> Vec<String> {
    let needle = format!(": manager epoch {epoch} is older");
    let mut refused = Vec::new();
    for agent in &h.agents {
        for line in agent.log().lines().filter(|line| line.contains(&needle)) {
            let at = line
                .strip_prefix('[')
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(common::managers::rfc3339_ms);
            if at.is_some_and(|at| at >= from_ms) {
                let call = line
                    .split_once("control API: ")
                    .and_then(|(_, rest)| rest.split_once(&needle))
                    .map_or("?", |(call, _)| call);
                refused.push(format!("{}: {call}", agent.host));
            }
        }
    }
    refused
}

/// 9a makes the manager whose every link runs through a jitter proxy the active (restarted
/// as standby behind the proxies, then the other one is killed); 9 watches it for 15 s.
fn jitter(h: &mut Harness) -> Vec<Outcome> {
    let s = h.settle("before 9");
    let (jittered, other) = (1 - s.active, s.active);
    let root = h.lab.ip("root");
    let seed = u64::from(std::process::id());
    let max = Duration::from_millis(200);
    let mut launch = h.launches[jittered].clone();
    launch.agents.clear();
    for (i, agent) in h.agents.iter().enumerate() {
        let proxy = JitterProxy::start(&format!("{root}:0"), &agent.api, max, seed + i as u64);
        launch.agents.push(format!("{}={}", agent.host, proxy.addr));
        h.proxies.push(proxy);
    }
    let proxy = JitterProxy::start(&format!("{root}:0"), &h.managers[other].listen, max, seed);
    launch.peer = format!("{}={}", h.managers[other].id, proxy.addr);
    h.proxies.push(proxy);
    h.kill_manager(jittered);
    h.restart_manager(jittered, launch);
    let mut outcomes = vec![h.scenario(
        "9a kill -9 onto the jittered one",
        true,
        500,
        |h, _| h.kill_manager(other),
        |h, _| {
            let launch = h.launches[other].clone();
            h.restart_manager(other, launch);
        },
    )];
    let chunks = |h: &Harness| -> u64 {
        h.proxies
            .iter()
            .map(|p| p.chunks.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    };
    let chunks_before = chunks(h);
    let mut out = h.scenario(
        "9 jitter 0-200 ms on the active, 15 s",
        false,
        15_000,
        |_, _| {},
        |_, _| {},
    );
    out.notes.push(format!(
        "{} chunks delayed through the proxies",
        chunks(h) - chunks_before
    ));
    outcomes.push(out);
    outcomes
}

/// 10a restarts the active under a monotonic clock shifted by 100000 s (the other takes
/// over); 10 kills the other, so the shifted one takes over.
fn shifted_clock(h: &mut Harness) -> Vec<Outcome> {
    let s = h.settle("before 10");
    let (shifted, other) = (s.active, 1 - s.active);
    let mut launch = h.launches[shifted].clone();
    launch.agents = h
        .agents
        .iter()
        .map(|a| format!("{}={}", a.host, a.api))
        .collect();
    launch.peer = format!("{}={}", h.managers[other].id, h.managers[other].listen);
    launch.wrapper = ["unshare", "--time", "--monotonic", "100000"]
        .map(String::from)
        .to_vec();
    let mut first = h.scenario(
        "10a restart the active, clock +100000 s",
        true,
        500,
        |h, _| h.kill_manager(shifted),
        |h, _| {
            h.restart_manager(shifted, launch);
            h.proxies.clear(); // nobody goes through them any more
        },
    );
    let offsets =
        std::fs::read_to_string(format!("/proc/{}/timens_offsets", h.managers[shifted].pid))
            .unwrap_or_default();
    if offsets.contains("monotonic") && offsets.contains("100000") {
        first.notes.push(format!(
            "{} runs with monotonic +100000 s",
            h.managers[shifted].id
        ));
    } else {
        first.failures.push(format!(
            "the clock is not shifted: timens_offsets {offsets:?}"
        ));
    }
    let second = h.scenario(
        "10 kill -9 onto the shifted one",
        true,
        500,
        |h, _| h.kill_manager(other),
        |h, _| {
            let launch = h.launches[other].clone();
            h.restart_manager(other, launch);
        },
    );
    vec![first, second]
}

/// Why scenario 10 cannot run here, if it cannot.
fn unshare_time_missing() -> Option<String> {
    let help = Command::new("unshare").arg("--help").output();
    match help {
        Ok(out) if String::from_utf8_lossy(&out.stdout).contains("--monotonic") => {
            let probe = Command::new("unshare")
                .args(["--time", "--monotonic", "100000", "true"])
                .output();
            match probe {
                Ok(out) if out.status.success() => None,
                Ok(out) => Some(format!(
                    "unshare --time fails here: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Err(err) => Some(format!("unshare: {err}")),
            }
        }
        Ok(_) => Some("this util-linux unshare has no --time/--monotonic".into()),
        Err(err) => Some(format!("no unshare: {err}")),
    }
}

fn render(outcomes: &[Outcome], findings: &str, failures: &[String]) -> String {
    use std::fmt::Write;
    let mut text = String::from("manager pair scenarios (lease 4 s, renewal 1 s; failover = fault to the new active's log line)\n");
    let _ = writeln!(
        text,
        "{:<42} {:<11} {:>9} {:>13} {:>7} {:<14} result",
        "scenario", "expected", "takeovers", "failover ms", "epochs", "witness"
    );
    for out in outcomes {
        let failover = match (out.failover_ms, out.failover_poll_ms) {
            (Some(log), Some(poll)) => format!("{log} ({poll})"),
            (Some(log), None) => log.to_string(),
            (None, _) => "-".into(),
        };
        let witness = if out.witness.0 == out.witness.1 {
            out.witness.0.clone()
        } else {
            format!("{}->{}", out.witness.0, out.witness.1)
        };
        let result = if out.failures.is_empty() {
            "ok"
        } else {
            "FAIL"
        };
        let _ = writeln!(
            text,
            "{:<42} {:<11} {:>9} {:>13} {:>7} {:<14} {result}",
            out.name,
            if out.expect_failover {
                "failover"
            } else {
                "no failover"
            },
            out.takeovers,
            failover,
            format!("{}->{}", out.epochs.0, out.epochs.1),
            witness,
        );
        for note in &out.notes {
            let _ = writeln!(text, "    {note}");
        }
        for failure in &out.failures {
            let _ = writeln!(text, "    FAILED: {failure}");
        }
    }
    let _ = writeln!(text, "whole run: {findings}");
    for failure in failures {
        let _ = writeln!(text, "    FAILED: {failure}");
    }
    let _ = writeln!(
        text,
        "(failover ms: by the logs, in brackets by the 100 ms polls)"
    );
    text
}

/// The batch that ran through the scenarios: finished, every verdict migrated, every
/// acknowledged write of the guest in h2's images.
fn batch_outcome(h: &mut Harness) -> Outcome {
    let listens: Vec<String> = h.managers.iter().map(|m| m.listen.clone()).collect();
    let (mut notes, failures) = h.batch.finish(
        &h.fleet,
        &listens,
        (&h.agents[0].api, &h.agents[1].dir),
        Duration::from_secs(180),
    );
    let mark = format!("batch {}: resumed", batch::NAME);
    let resumes: usize = h
        .managers
        .iter()
        .map(|m| m.log().matches(&mark).count())
        .sum();
    notes.push(format!(
        "{resumes} resumes by the managers (jobs cut by the faults)"
    ));
    Outcome {
        name: format!(
            "batch {}: {} disks h1 -> h2 through 1-10",
            batch::NAME,
            batch::DISKS
        ),
        notes,
        failures,
        ..Outcome::default()
    }
}

#[test]
fn manager_pair_scenarios() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: the manager scenarios need root (network namespaces, scripts/netlab)");
        return;
    }
    let started = Instant::now();
    let mut h = Harness::new();
    let first = h.settle("the batch");
    let listen = h.managers[first.active].listen.clone();
    h.batch.submit(&h.fleet, &listen);
    let (root, socket) = (
        h.root.path().to_path_buf(),
        h.agents[0].dir.join("nbd.sock"),
    );
    h.batch.start_writers(&root, &socket);
    let mut outcomes = vec![
        kill_active(&mut h),
        isolate_active(&mut h),
        block_witness(&mut h),
        split_managers(&mut h),
        crash_witness(&mut h),
        restart_witness(&mut h),
        drain_witness(&mut h),
        pause_active(&mut h),
    ];
    outcomes.extend(jitter(&mut h));
    match unshare_time_missing() {
        None => outcomes.extend(shifted_clock(&mut h)),
        Some(reason) => {
            eprintln!("scenario 10 skipped: {reason}");
            outcomes.push(Outcome {
                name: "10 shifted monotonic clock".into(),
                notes: vec![format!("SKIPPED: {reason}")],
                ..Outcome::default()
            });
        }
    }
    outcomes.push(batch_outcome(&mut h));
    let (failures, findings) = whole_run_checks(&h);
    let mut table = render(&outcomes, &findings, &failures);
    let _ = std::fmt::Write::write_fmt(
        &mut table,
        format_args!("total {:.0} s\n", started.elapsed().as_secs_f64()),
    );
    println!("{table}");
    eprintln!("{table}");
    let report = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("manager-scenarios.txt");
    let _ = std::fs::write(&report, &table);
    let polls = report.with_file_name("manager-scenarios-polls.csv");
    let _ = std::fs::write(&polls, polls_csv(&h.watch, &h.managers));
    println!(
        "(table in {}, every poll in {})",
        report.display(),
        polls.display()
    );
    let failed = !failures.is_empty() || outcomes.iter().any(|o| !o.failures.is_empty());
    assert!(!failed, "{table}\n{}", h.logs());
}

#[test]
fn log_stamps_match_the_unix_clock() {
    // Goal: role-change stamps line up with SystemTime. Method: known instants, one line.
    use common::managers::rfc3339_ms;
    assert_eq!(rfc3339_ms("1970-01-01T00:00:00.000Z"), Some(0));
    assert_eq!(
        rfc3339_ms("2000-03-01T00:00:01.250Z"),
        Some(951_868_801_250)
    );
    assert_eq!(
        rfc3339_ms("2026-01-31T23:59:59.999Z"),
        Some(1_769_903_999_999)
    );
    let lines = role_lines(
        "[2026-01-31T23:59:59.999Z WARN  ferry::manager::runtime] manager role: active \
         (epoch 3): the witness granted the lease\nother",
    );
    assert_eq!(lines.len(), 1);
    assert!(lines[0].active && lines[0].epoch == 3);
    assert_eq!(lines[0].at_ms, 1_769_903_999_999);
}
