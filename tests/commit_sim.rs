#![allow(clippy::tests_outside_test_module)]
//! Deterministic simulation of the switchover's commit protocol (docs/commit-protocol.md,
//! DESIGN.md capability 3): a source and a target agent over real journal records and the
//! production fold and commit decisions, through crashes, torn appends, lost, duplicated
//! and delayed messages, timeouts and operator aborts. `SIM_SEED=N` replays one seed with
//! its step trace; `SIM_SEEDS=N` runs seeds 1..=N.

use std::time::Instant;

use ferry::journal::commit::Verdict;
use ferry::journal::sim::{run, SimOptions, SimStats};
use ferry::migrate::sim::{seeds_from_env, SeedReport};

/// Seeds per run: thousands, a few seconds in a debug build.
const SEEDS: u64 = 5_000;

/// The seeds to run: `SIM_SEED` (one), else `SIM_SEEDS` or [`SEEDS`] from 1.
fn seeds() -> Vec<u64> {
    let count = std::env::var("SIM_SEEDS").ok().map_or(SEEDS, |count| {
        count.trim().parse().expect("SIM_SEEDS is a count")
    });
    seeds_from_env(count)
}

#[test]
fn one_authority_and_no_lost_write_under_faults() {
    // Goal: at every step of every seed at most one side serves writes, the two journals
    // never claim conflicting authority, and every acknowledged write is on the
    // authoritative side; once faults stop, every run ends migrated or not migrated.
    // Method: thousands of swarm seeds (fault rates drawn per seed), invariants after every
    // step (`World::check`), liveness after healing; on failure, print the seed's trace.
    let started = Instant::now();
    let (mut migrated, mut not_migrated, mut steps, mut settle_steps_max) = (0, 0, 0, 0);
    let mut totals = SimStats::default();
    let seeds = seeds();
    for &seed in &seeds {
        let _report = SeedReport(seed);
        let outcome = run(seed, &SimOptions::swarm(seed)).unwrap_or_else(|failure| {
            panic!("{failure}");
        });
        match outcome.verdict {
            Verdict::Migrated => migrated += 1,
            Verdict::NotMigrated => not_migrated += 1,
            other => panic!("seed {seed} ended {other}"),
        }
        steps += outcome.steps;
        settle_steps_max = settle_steps_max.max(outcome.settle_steps);
        totals.add(&outcome.stats);
    }
    println!(
        "{} seeds in {:.1} s: {migrated} migrated, {not_migrated} not migrated, {steps} steps \
         (settled within {settle_steps_max}); {totals:?}",
        seeds.len(),
        started.elapsed().as_secs_f64()
    );
    if seeds.len() as u64 >= SEEDS {
        // The faults the protocol exists for must actually happen.
        assert!(migrated > 0 && not_migrated > 0);
        assert!(totals.torn_appends > 0 && totals.landed_appends > 0);
        assert!(totals.answers_committed > 0 && totals.answers_not_committed > 0);
        assert!(totals.commits_refused > 0 && totals.cancels > 0);
        assert!(totals.aborts_refused > 0);
    }
}

#[test]
fn an_unfenced_not_committed_answer_is_caught() {
    // Goal: the simulation is able to find the flaw the fence prevents (a Commit still in
    // flight when the target answered "not committed" commits after the source cancelled).
    // Method: the same seeds with the fence off; some seed must fail, with a trace.
    let failure = (1..=SEEDS)
        .find_map(|seed| {
            let mut options = SimOptions::swarm(seed);
            options.fence_queries = false;
            run(seed, &options).err()
        })
        .expect("an unfenced answer breaks an invariant on some seed");
    println!(
        "without the fence, seed {} fails at step {}: {}",
        failure.seed, failure.step, failure.problem
    );
    assert!(!failure.trace.is_empty());
    assert!(
        failure.problem.contains("journals disagree")
            || failure.problem.contains("both serve")
            || failure.problem.contains("acknowledged writes"),
        "{failure}"
    );
}
