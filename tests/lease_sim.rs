//! Deterministic simulation of the manager pair's witness lease (DESIGN.md capability 4):
//! the production decisions (`ferry::lease::{role, witness, holder}`) in a world of two
//! managers and four hosts with partitions, crashes, pauses, slow witness disks, drains,
//! message delay and loss, and drifting clocks. `SIM_SEED=N` replays one seed;
//! `LEASE_SIM_SEEDS=N` runs more (scripts/soak-lease).

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

use ferry::lease::role::Rules;
use ferry::lease::sim::{run, seeds_from_env, Scripted, SeedReport, SimOptions, SimReport};

/// Seeds of the default run (CI), or `LEASE_SIM_SEEDS`.
fn seed_count(default: u64) -> u64 {
    std::env::var("LEASE_SIM_SEEDS")
        .ok()
        .and_then(|count| count.parse().ok())
        .unwrap_or(default)
}

/// Runs every seed; panics on the first violation with the seed to replay.
fn run_all(options: &SimOptions, count: u64) -> Vec<SimReport> {
    seeds_from_env(count)
        .into_iter()
        .map(|seed| {
            let _report = SeedReport(seed);
            match run(seed, options) {
                Ok(report) => report,
                Err(violation) => panic!("seed {seed}: {violation}"),
            }
        })
        .collect()
}

fn print_totals(label: &str, reports: &[SimReport]) {
    let sum = |f: fn(&SimReport) -> u64| reports.iter().map(f).sum::<u64>();
    eprintln!(
        "{label}: {} seeds, {} events, {} activations, {} failovers, {} witness moves \
         (highest epoch {}), commands {} executed / {} fenced, longest gap {} ms",
        reports.len(),
        sum(|r| r.events),
        sum(|r| u64::from(r.activations)),
        sum(|r| u64::from(r.failovers)),
        sum(|r| r.witness_moves),
        reports.iter().map(|r| r.highest_epoch).max().unwrap_or(0),
        sum(|r| r.commands_executed),
        sum(|r| r.commands_fenced),
        reports.iter().map(|r| r.longest_gap_ms).max().unwrap_or(0),
    );
}

#[test]
fn never_two_actives_under_random_faults() {
    // Goal: at most one active at any true time, epochs only grow, fenced agents, and an
    // active again once faults heal. Method: many seeds of 90 s with a fault every ~3 s
    // (partitions, kill -9, host crashes, SIGSTOP, drains, slow disks), 2 ms drift bound.
    let options = SimOptions::default();
    let reports = run_all(&options, seed_count(2_000));
    print_totals("random faults", &reports);
    for (seed, report) in seeds_from_env(seed_count(2_000)).into_iter().zip(&reports) {
        assert!(
            report.active_at_end,
            "seed {seed}: no active after the heal (LEASE_SIM_DEBUG=1 prints the end state)"
        );
    }
    assert!(reports.iter().map(|r| r.failovers).sum::<u32>() > 0);
}

/// A quiet world (no random faults) with one scripted fault at 30 s.
fn scenario(scripted: Scripted, delay_ms_max: u32) -> SimOptions {
    SimOptions {
        fault_every_ms: 0,
        loss_per_mille: 0,
        delay_ms_max,
        duration_ms: 70_000,
        heal_ms: 5_000,
        script: vec![(30_000, scripted)],
        ..SimOptions::default()
    }
}

/// Runs a scenario over `seeds` seeds: every seed timed its recovery; returns the
/// recoveries (ms) and the failovers after the first activation.
fn run_scenario(label: &str, options: &SimOptions, seeds: u64) -> (Vec<u64>, u32) {
    let reports = run_all(options, seeds);
    print_totals(label, &reports);
    let mut recoveries = Vec::new();
    let mut failovers = 0;
    for report in &reports {
        assert_eq!(
            report.recovery_ms.len(),
            1,
            "{label}: recovery not timed: {report:?}"
        );
        recoveries.extend(&report.recovery_ms);
        failovers += report.failovers;
        assert!(report.active_at_end, "{label}: no active at the end");
    }
    recoveries.sort_unstable();
    eprintln!(
        "{label}: recovery min {} / median {} / max {} ms, failovers {failovers}",
        recoveries[0],
        recoveries[recoveries.len() / 2],
        recoveries[recoveries.len() - 1]
    );
    (recoveries, failovers)
}

const LEASE_PLUS_ONE_S_MS: u64 = 5_000;

#[test]
fn losing_the_active_fails_over_within_the_lease_plus_a_second() {
    // Goal: failover (active lost -> the other active) <= lease + 1 s in every run, for kill
    // -9, isolation, and SIGSTOP longer than the lease (whose wake-up must change nothing:
    // the checker runs at every event). Method: 40 seeds each; recovery times.
    for scripted in [
        Scripted::KillActive(10_000),
        Scripted::IsolateActive(10_000),
        Scripted::PauseActive(8_000),
    ] {
        let (recoveries, failovers) =
            run_scenario(&format!("{scripted:?}"), &scenario(scripted, 20), 40);
        assert!(failovers >= 40, "{scripted:?}: every seed fails over");
        let worst = recoveries.last().copied().unwrap_or(0);
        assert!(
            worst > 0 && worst <= LEASE_PLUS_ONE_S_MS,
            "{scripted:?}: worst {worst} ms"
        );
    }
}

#[test]
fn losing_the_witness_or_the_peer_link_causes_no_failover() {
    // Goal: no failover when only the witness is lost (crash, restart, cut from the active,
    // drain: the lease moves or survives) or the managers are cut from each other. Method:
    // 40 seeds each; no failover and the active never idle.
    for scripted in [
        Scripted::CrashWitness(15_000),
        Scripted::RestartWitness,
        Scripted::CutActiveFromWitness(15_000),
        Scripted::DrainWitness(20_000),
        Scripted::CutManagers(15_000),
    ] {
        let (recoveries, failovers) =
            run_scenario(&format!("{scripted:?}"), &scenario(scripted, 20), 40);
        assert_eq!(failovers, 0, "{scripted:?}");
        assert!(
            recoveries.iter().all(|ms| *ms == 0),
            "{scripted:?}: {recoveries:?}"
        );
    }
}

#[test]
fn no_false_failover_under_200_ms_of_jitter() {
    // Goal: jitter alone never costs the active its lease. Method: 40 seeds of 70 s with
    // every message delayed 0..=200 ms and nothing else: one activation each, no failover.
    let options = SimOptions {
        script: Vec::new(),
        ..scenario(Scripted::RestartWitness, 200)
    };
    let reports = run_all(&options, 40);
    print_totals("200 ms jitter", &reports);
    for report in &reports {
        assert_eq!((report.activations, report.failovers), (1, 0), "{report:?}");
    }
}

/// Runs seeds until one breaks an invariant; returns it.
fn first_violation(options: &SimOptions, seeds: u64) -> Option<(u64, String)> {
    (1..=seeds).find_map(|seed| run(seed, options).err().map(|v| (seed, v.to_string())))
}

#[test]
fn broken_rules_are_caught() {
    // Goal: the checker has teeth. Method: the same worlds with one rule broken at a time:
    // (a) expiry judged by the standby's clock from what it last read, the witness trusting
    // it; (b) no drift margin, with clocks drifting 2% (the bound the correct rules use);
    // each must produce a violation within the seeds, while the correct rules pass them.
    let base = SimOptions {
        drift_ppm: 20_000,
        ..SimOptions::default()
    };
    let by_standby = SimOptions {
        rules: Rules {
            expiry_by_witness: false,
            ..Rules::default()
        },
        ..base.clone()
    };
    let found = first_violation(&by_standby, 200);
    eprintln!("expiry by the standby's clock: {found:?}");
    assert!(
        found.is_some(),
        "expiry by the standby's clock went unnoticed"
    );
    let no_margin = SimOptions {
        rules: Rules {
            drift_margin: false,
            ..Rules::default()
        },
        ..base.clone()
    };
    let found = first_violation(&no_margin, 400);
    eprintln!("no drift margin: {found:?}");
    assert!(found.is_some(), "a missing drift margin went unnoticed");
    run_all(&base, 100);
}
