//! The migration loop's unit tests on the simulated environment.

use super::super::sim::{SimEnv, SimOptions};
use super::*;

#[test]
fn chunks_cover_the_set_in_order() {
    // Goal: chunking loses no block. Method: 10 scattered blocks, chunks of 3, then the
    // suffix from the second chunk.
    let mut set = DirtySet::empty(4096, 200 * 4096);
    for block in [1, 5, 6, 7, 63, 64, 65, 100, 150, 199] {
        set.insert(block);
    }
    let mut seen = Vec::new();
    let mut from_block = 0;
    loop {
        let (chunk, next_block) = next_chunk(&set, from_block, 3);
        if chunk.is_empty() {
            break;
        }
        assert!(chunk.count() <= 3);
        seen.extend(chunk.iter_blocks());
        from_block = next_block;
    }
    assert_eq!(seen, set.iter_blocks().collect::<Vec<_>>());
    let rest = suffix(&set, 7);
    assert_eq!(
        rest.iter_blocks().collect::<Vec<_>>(),
        [7, 63, 64, 65, 100, 150, 199]
    );
    assert_eq!(set_bytes(&rest), 7 * 4096);
}

#[test]
fn chunks_match_the_block_by_block_definition() {
    // Goal: next_chunk takes the first blocks at or after the start, at most the limit, on
    // any shape of set (scattered bits, whole chunks, runs across words). Method: random
    // sets and starts against a BTreeSet.
    let mut prng = crate::prng::SplitMix64::new(5);
    for round in 0..200 {
        let block_count = 1 + prng.below(3 * 4096);
        let mut set = DirtySet::empty(4096, block_count * 4096);
        for _ in 0..prng.below(6) {
            let first = prng.below(block_count);
            set.insert_range(first, first + prng.below(block_count - first + 1));
        }
        let model: Vec<u64> = set.iter_blocks().collect();
        let (from_block, max_blocks) = (prng.below(block_count + 1), 1 + prng.below(300));
        let (chunk, next_block) = next_chunk(&set, from_block, max_blocks);
        let expected: Vec<u64> = model
            .iter()
            .copied()
            .filter(|&block| block >= from_block)
            .take(max_blocks as usize)
            .collect();
        assert_eq!(chunk.iter_blocks().collect::<Vec<_>>(), expected, "{round}");
        let expected_next = expected.last().map_or(from_block, |&block| block + 1);
        assert_eq!(next_block, expected_next, "{round}");
    }
}

#[test]
fn a_whole_terabyte_pass_is_cut_into_chunks_once() {
    // Goal: chunking a pass costs the pass, not its square: a whole 1 TiB disk at 4 KiB (one
    // `Full` span, 2^28 blocks) cut into 65536 chunks of 16 MiB (block by block from the
    // start each time, this ran for hours). Method: cut it, count the blocks.
    let mut set = DirtySet::empty(4096, 1 << 40);
    set.insert_range(0, set.block_count());
    let (mut from_block, mut chunks, mut blocks) = (0, 0u64, 0);
    loop {
        let (chunk, next_block) = next_chunk(&set, from_block, 4096);
        if chunk.is_empty() {
            break;
        }
        chunks += 1;
        blocks += chunk.count();
        from_block = next_block;
    }
    assert_eq!((chunks, blocks), (65536, 1 << 28));
}

fn world(fail: fn(&mut SimOptions)) -> SimEnv {
    let mut options = SimOptions {
        write_rate_per_s: 500,
        ..SimOptions::default()
    };
    fail(&mut options);
    SimEnv::new(11, options)
}

#[test]
fn failed_send_leaves_the_source_authoritative_with_bits_back() {
    // Goal: a send error releases nothing half-done and loses no bit. Method: every send
    // fails; expect SourceAuthoritative(Send), every allocated block still dirty.
    let mut env = world(|options| options.send_fail_per_mille = 1000);
    let allocated = env.allocated().expect("sim allocated");
    let err = run(&mut env, &MigrateOptions::default()).expect_err("sends fail");
    assert!(matches!(
        err,
        MigrateError::SourceAuthoritative {
            step: Step::Send,
            ..
        }
    ));
    assert!(!err.destination_authoritative());
    env.check_source_authoritative();
    let dirty = env.take_dirty();
    for block in allocated.iter_blocks() {
        assert!(dirty.contains(block), "block {block} lost its bit");
    }
}

#[test]
fn failed_commit_releases_writes_and_resume_converges() {
    // Goal: a refused commit keeps the source authoritative, and a resumed run finishes
    // from the merged-back bits. Method: commits always fail, then never.
    let mut env = world(|options| options.commit_fail_per_mille = 1000);
    let err = run(&mut env, &MigrateOptions::default()).expect_err("commit fails");
    assert!(matches!(
        err,
        MigrateError::SourceAuthoritative {
            step: Step::Commit,
            ..
        }
    ));
    env.check_source_authoritative();
    env.set_commit_fail_per_mille(0);
    let options = MigrateOptions {
        resume: true,
        ..MigrateOptions::default()
    };
    let report = run(&mut env, &options).expect("resumed run");
    env.check_switched();
    assert!(report.allocated_bytes > 0);
    assert!(report.pause_ms <= options.max_pause_ms as f64);
}

#[test]
fn failed_switch_after_commit_keeps_writes_held() {
    // Goal: after the commit point an error says "destination authoritative" and writes
    // stay held (the source must not apply them). Method: switches always fail.
    let mut env = world(|options| options.switch_fail_per_mille = 1000);
    let err = run(&mut env, &MigrateOptions::default()).expect_err("switch fails");
    let MigrateError::DestinationAuthoritative { step, report, .. } = &err else {
        panic!("unexpected {err}");
    };
    assert_eq!(*step, Step::SwitchToDestination);
    assert_eq!(report.passes.last().map(|p| p.kind), Some(PassKind::Final));
    assert!(err.destination_authoritative());
    assert!(env.writes_held());
}

#[test]
fn in_sync_points_leave_the_source_authoritative_and_repeat() {
    // Goal: an in-sync run ends with both sides equal at the point (the sim checks that
    // in `mark_in_sync`), writes released, no switch; the guest writes on, and a second
    // run from the tracker's bits reaches another point, then a switchover. Method: three
    // runs on one env: InSync, InSync (resume), Switchover (resume).
    let mut env = world(|_| {});
    let in_sync = MigrateOptions {
        ending: Ending::InSync,
        ..MigrateOptions::default()
    };
    let report = run(&mut env, &in_sync).expect("first point");
    assert!(report.in_sync);
    assert!(!env.switched());
    assert!(!env.writes_held());
    assert_eq!(env.in_sync_points(), 1);
    env.check_source_authoritative();
    env.run_guest_ms(500);
    let again = MigrateOptions {
        resume: true,
        threshold_bytes: Some(1 << 20),
        ..in_sync
    };
    let report = run(&mut env, &again).expect("second point");
    assert!(report.in_sync);
    assert_eq!(env.in_sync_points(), 2);
    assert!(report.bytes_data < report.allocated_bytes, "{report:?}");
    let migrate = MigrateOptions {
        resume: true,
        ..MigrateOptions::default()
    };
    run(&mut env, &migrate).expect("switchover");
    env.check_switched();
}

#[test]
fn empty_disk_switches_over_without_passes() {
    // Goal: nothing to copy means an immediate switchover. Method: no allocated block
    // and a quiet guest (one write a second, warm-up 0); expect only the final send.
    let mut env = world(|options| {
        options.allocated_pct = 0;
        options.write_rate_per_s = 1;
        options.warmup_ms = 0;
    });
    let report = run(&mut env, &MigrateOptions::default()).expect("empty disk");
    env.check_switched();
    assert_eq!(report.allocated_bytes, 0);
    assert_eq!(report.passes.len(), 1, "{:?}", report.passes);
    assert_eq!(report.amplification, 0.0);
}
