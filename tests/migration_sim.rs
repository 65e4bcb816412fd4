//! Deterministic simulation of live migration (DESIGN.md capability 1, invariant 4): the
//! production algorithm (`ferry::migrate::run`) against `SimEnv`, a guest writing with a skew
//! over a link with delays and failures. `SIM_SEED=N` replays one seed.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

use ferry::migrate::sim::{seeds_from_env, SeedReport, SimEnv, SimOptions};
use ferry::migrate::{
    run, MigrateError, MigrateOptions, MigrationEnv, MigrationReport, PassKind, Policy,
};

/// Failed runs tolerated before a seed counts as not converging (each rerun starts a new
/// pass budget, so a naive run that needs 30 passes at 2% failures per send retries often).
const MAX_ATTEMPTS: u32 = 200;
/// A low guest write rate: every policy converges by iterating.
const LOW_RATE_PER_S: u64 = 200;
/// A high guest write rate: the distinct blocks dirtied per pass never fit the pause budget,
/// so the heat policy has to mirror.
const HIGH_RATE_PER_S: u64 = 5_000;

/// A migration run to completion, retrying failed runs with `resume`.
struct Migrated {
    report: MigrationReport,
    failed_runs: u32,
}

/// Runs, checks the invariants after every failed run and after the switch, and retries.
fn migrate(env: &mut SimEnv, options: &MigrateOptions) -> Migrated {
    let mut options = options.clone();
    for failed_runs in 0..MAX_ATTEMPTS {
        match run(env, &options) {
            Ok(report) => {
                check_switched(env, &report);
                if !report.forced {
                    assert!(
                        report.pause_ms <= options.max_pause_ms as f64,
                        "pause {} ms over budget {} ms",
                        report.pause_ms,
                        options.max_pause_ms
                    );
                }
                return Migrated {
                    report,
                    failed_runs,
                };
            }
            Err(MigrateError::DestinationAuthoritative { report, .. }) => {
                // Committed: writes stay held and the caller completes the switch.
                while env.switch_to_destination().is_err() {}
                env.release_writes();
                check_switched(env, &report);
                return Migrated {
                    report: *report,
                    failed_runs,
                };
            }
            Err(err) => {
                assert!(!err.destination_authoritative(), "{err}");
                env.check_source_authoritative();
                options.resume = true; // continue from the merged-back bits
                env.run_guest_ms(20);
            }
        }
    }
    panic!("no switchover after {MAX_ATTEMPTS} runs");
}

/// Checks a switched world now and after 100 ms more of guest writes, which must go to
/// the destination only.
fn check_switched(env: &mut SimEnv, report: &MigrationReport) {
    env.check_switched();
    env.run_guest_ms(100);
    env.check_switched();
    assert_eq!(report.passes.last().map(|p| p.kind), Some(PassKind::Final));
}

/// Sums over seeds, printed as averages.
#[derive(Debug, Default)]
struct Totals {
    runs: u64,
    bytes_sent: u64,
    blocks_resent: u64,
    passes: u64,
    pause_ms: f64,
    pause_ms_max: f64,
    converge_ms: f64,
    mirrored: u64,
    deferrals: u64,
    failed_runs: u64,
}

impl Totals {
    fn add(&mut self, migrated: &Migrated) {
        let report = &migrated.report;
        self.runs += 1;
        self.bytes_sent += report.bytes_sent();
        self.blocks_resent += report.blocks_resent;
        self.passes += report.passes.len() as u64;
        self.pause_ms += report.pause_ms;
        self.pause_ms_max = self.pause_ms_max.max(report.pause_ms);
        self.converge_ms += report.converge_ms;
        self.mirrored += u64::from(report.mirrored);
        self.deferrals += u64::from(report.deferrals);
        self.failed_runs += u64::from(migrated.failed_runs);
    }

    fn mean_bytes_sent(&self) -> f64 {
        self.bytes_sent as f64 / self.runs.max(1) as f64
    }

    fn print(&self, label: &str) {
        let runs = self.runs.max(1) as f64;
        println!(
            "{label}: runs {} | sent {:.1} MiB | resent blocks {:.1} | passes {:.2} | pause avg \
             {:.2} ms max {:.2} ms | converge {:.0} ms | mirrored {} | deferrals {:.2} | failed \
             runs {:.2}",
            self.runs,
            self.mean_bytes_sent() / f64::from(1 << 20),
            self.blocks_resent as f64 / runs,
            self.passes as f64 / runs,
            self.pause_ms / runs,
            self.pause_ms_max,
            self.converge_ms / runs,
            self.mirrored,
            self.deferrals as f64 / runs,
            self.failed_runs as f64 / runs,
        );
    }
}

fn faulty_world(rate_per_s: u64) -> SimOptions {
    SimOptions {
        write_rate_per_s: rate_per_s,
        send_fail_per_mille: 5,
        commit_fail_per_mille: 100,
        switch_fail_per_mille: 50,
        ..SimOptions::default()
    }
}

fn converge_under_faults(policy: Policy) {
    let options = MigrateOptions::with_policy(policy);
    let (mut low, mut high) = (Totals::default(), Totals::default());
    for seed in seeds_from_env(200) {
        let _report = SeedReport(seed);
        let mut env = SimEnv::new(seed, faulty_world(LOW_RATE_PER_S));
        low.add(&migrate(&mut env, &options));
        let mut env = SimEnv::new(seed, faulty_world(HIGH_RATE_PER_S));
        let migrated = migrate(&mut env, &options);
        if policy == Policy::Heat {
            assert!(
                migrated.report.mirrored,
                "heat must mirror at the high rate"
            );
        }
        high.add(&migrated);
    }
    low.print(&format!("{policy} low rate ({LOW_RATE_PER_S}/s)"));
    high.print(&format!("{policy} high rate ({HIGH_RATE_PER_S}/s)"));
}

#[test]
fn heat_converges_under_faults_at_low_and_high_rates() {
    // Goal: heat switches over with every acked write on the authoritative side, the pause
    // within budget, and the source authoritative after each injected failure. Method: 200
    // seeds x {low, high} write rates, 2% send and 10% commit failures, rerun with `resume`.
    converge_under_faults(Policy::Heat);
}

#[test]
fn naive_converges_under_faults_at_low_and_high_rates() {
    // Goal and method: as for heat, with the naive policy (which mirrors after max_passes).
    converge_under_faults(Policy::Naive);
}

#[test]
fn heat_resends_less_than_naive_on_a_skewed_workload() {
    // Goal: the heat policy's point: fewer bytes re-sent than naive when writes are skewed.
    // Method: the same seeds and world (skew 6, 1000 writes/s, no faults) under both
    // policies; compare mean bytes sent; print both.
    let world = SimOptions {
        write_rate_per_s: 1_000,
        skew: 6,
        ..SimOptions::default()
    };
    let (mut heat, mut naive) = (Totals::default(), Totals::default());
    for seed in seeds_from_env(200) {
        let _report = SeedReport(seed);
        let mut env = SimEnv::new(seed, world.clone());
        heat.add(&migrate(
            &mut env,
            &MigrateOptions::with_policy(Policy::Heat),
        ));
        let mut env = SimEnv::new(seed, world.clone());
        naive.add(&migrate(
            &mut env,
            &MigrateOptions::with_policy(Policy::Naive),
        ));
    }
    heat.print("heat  skewed");
    naive.print("naive skewed");
    assert!(
        heat.mean_bytes_sent() < naive.mean_bytes_sent(),
        "heat sent {} bytes on average, naive {}",
        heat.mean_bytes_sent(),
        naive.mean_bytes_sent()
    );
}

#[test]
fn force_after_switches_over_past_the_budget() {
    // Goal: `force_after_ms` bounds the migration time, and forced pauses still keep every
    // acked write. Method: naive with unlimited passes at a rate that never fits; force at
    // 3 s; the report must say forced and the checks in `migrate` must hold.
    let options = MigrateOptions {
        max_passes: 10_000,
        force_after_ms: Some(3_000),
        ..MigrateOptions::with_policy(Policy::Naive)
    };
    let mut totals = Totals::default();
    for seed in seeds_from_env(50) {
        let _report = SeedReport(seed);
        let mut env = SimEnv::new(seed, faulty_world(HIGH_RATE_PER_S));
        let migrated = migrate(&mut env, &options);
        assert!(migrated.report.forced, "not forced: {:?}", migrated.report);
        assert!(!migrated.report.mirrored);
        totals.add(&migrated);
    }
    totals.print("naive forced");
}

#[test]
fn slow_holds_defer_instead_of_overrunning_the_pause() {
    // Goal: a switchover whose hold alone eats the budget is deferred, never overrun, and
    // the run still converges. Method: every hold waits 0..=150 ms (slow in-flight writes)
    // against a 100 ms budget; `migrate` asserts each pause; deferrals must occur.
    let world = SimOptions {
        write_rate_per_s: LOW_RATE_PER_S,
        hold_delay_ns_max: 150_000_000,
        ..SimOptions::default()
    };
    let mut totals = Totals::default();
    for policy in [Policy::Heat, Policy::Naive] {
        for seed in seeds_from_env(50) {
            let _report = SeedReport(seed);
            let mut env = SimEnv::new(seed, world.clone());
            totals.add(&migrate(&mut env, &MigrateOptions::with_policy(policy)));
        }
    }
    totals.print("slow holds");
    assert!(totals.deferrals > 0, "no switchover was deferred");
}
