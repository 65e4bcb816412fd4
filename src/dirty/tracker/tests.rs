//! Unit tests of a tracker: marks, takes, heat, runs, the lost state.

use super::*;
use crate::env::ManualClock;
use crate::prng::SplitMix64 as Prng;

const KIB: u64 = 1024;

/// A tracker of 4 KiB blocks over `disk_bytes`, half-life 1 s, on a manual clock.
fn new_tracker(disk_bytes: u64) -> (Tracker, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::default());
    let spec = TrackerSpec::new("t")
        .with_granularity_bytes(4 * KIB)
        .with_half_life_ms(1000);
    (
        Tracker::new(spec, disk_bytes, clock.clone()).expect("valid spec"),
        clock,
    )
}

/// Dirty blocks, in order.
fn dirty_blocks(tracker: &Tracker) -> Vec<u64> {
    (0..tracker.block_count())
        .filter(|&b| tracker.is_dirty(b))
        .collect()
}

#[test]
fn spec_validation_names_the_bad_value() {
    // Goal: bad granularity, half-life and names are refused with the value in the message.
    // Method: validate a table of bad specs, check the error text.
    let bad_granularity = [0, 2048, 3000, 4095, 12 * KIB, 128 * KIB * KIB];
    for granularity_bytes in bad_granularity {
        let spec = TrackerSpec::new("t").with_granularity_bytes(granularity_bytes);
        let err = spec.validate().expect_err("bad granularity");
        assert!(
            err.to_string().contains(&granularity_bytes.to_string()),
            "{err}"
        );
    }
    for granularity_bytes in [4 * KIB, 64 * KIB, 64 * KIB * KIB] {
        TrackerSpec::new("t")
            .with_granularity_bytes(granularity_bytes)
            .validate()
            .expect("valid");
    }
    let err = TrackerSpec::new("t")
        .with_half_life_ms(0)
        .validate()
        .expect_err("zero");
    assert!(err.to_string().contains("half-life 0 ms"), "{err}");
    for name in ["", ".hidden", "a/b", "sp ace", &"x".repeat(129)] {
        let err = TrackerSpec::new(name).validate().expect_err("bad name");
        assert!(matches!(err, DirtyError::Name { .. }), "{name:?}: {err}");
    }
    TrackerSpec::new("mig-1_a.b")
        .validate()
        .expect("valid name");
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::default());
    let err = Tracker::new(
        TrackerSpec::new("t").with_granularity_bytes(4 * KIB),
        1 << 50,
        clock,
    )
    .expect_err("too many blocks");
    assert!(matches!(err, DirtyError::TooManyBlocks { .. }), "{err}");
}

#[test]
fn mark_range_rounds_out_to_blocks() {
    // Goal: every block a byte range touches is marked, no other. Method: ranges at edges.
    let (tracker, _clock) = new_tracker(10 * 4 * KIB + 100);
    assert_eq!(tracker.block_count(), 11);
    tracker.mark_range(4095, 2);
    assert_eq!(dirty_blocks(&tracker), vec![0, 1]);
    tracker.mark_range(3 * 4 * KIB, 4 * KIB);
    assert_eq!(dirty_blocks(&tracker), vec![0, 1, 3]);
    tracker.mark_range(10 * 4 * KIB, 100);
    tracker.mark_range(5 * 4 * KIB + 1, 0);
    assert_eq!(dirty_blocks(&tracker), vec![0, 1, 3, 10]);
    assert_eq!(tracker.dirty_count(), 4);
    assert_eq!(tracker.dirty_bytes(), 3 * 4 * KIB + 100);
    tracker.mark_range(0, tracker.disk_bytes());
    assert_eq!(tracker.dirty_count(), 11);
}

#[test]
#[should_panic(expected = "past disk")]
fn mark_range_past_disk_panics() {
    // Goal: a write past the export is a bug. Method: mark one byte past the end.
    let (tracker, _clock) = new_tracker(8 * KIB);
    tracker.mark_range(8 * KIB - 1, 2);
}

#[test]
fn take_and_clear_then_merge_gives_bits_back() {
    // Goal: take returns and clears the bits; merge restores them. Method: mark, take, merge.
    let (tracker, _clock) = new_tracker(1000 * 4 * KIB);
    for block in [0, 64, 65, 999] {
        tracker.mark_range(block * 4 * KIB, 1);
    }
    let set = tracker.take_and_clear();
    assert_eq!(set.iter_blocks().collect::<Vec<_>>(), vec![0, 64, 65, 999]);
    assert_eq!(tracker.dirty_count(), 0);
    tracker.mark_range(5 * 4 * KIB, 1);
    tracker.merge(&set);
    assert_eq!(dirty_blocks(&tracker), vec![0, 5, 64, 65, 999]);
    // Heat counts writes (one per region per write), not merges.
    assert_eq!(tracker.heat(64), 4);
}

/// Bytes of one heat region of a 4 KiB tracker (256 blocks).
const REGION: u64 = 1 << 20;

#[test]
fn heat_counts_writes_per_region_and_decays_with_the_clock() {
    // Goal: heat counts writes per 1 MiB region and halves each half-life; every block
    // reads its region's heat. Method: ManualClock steps over a 16-region disk.
    let (tracker, clock) = new_tracker(16 * REGION - 4 * KIB);
    assert_eq!(tracker.heat_shift(), 8);
    for _ in 0..40 {
        tracker.mark_range(2 * REGION + 8 * KIB, 2 * 4 * KIB);
    }
    // One write spanning two regions bumps both once.
    tracker.mark_range(9 * REGION - 4 * KIB, 8 * KIB);
    let region = |r: u64| tracker.heat(r * 256 + 17);
    assert_eq!((region(2), region(8), region(9), region(3)), (40, 1, 1, 0));
    clock.advance_ms(1000);
    assert_eq!((region(2), region(9)), (20, 0));
    clock.advance_ms(2000);
    assert_eq!(region(2), 5);
    tracker.mark_range(2 * REGION, 1);
    assert_eq!(tracker.heat(2 * 256), 6);
    assert_eq!(tracker.hot_set(5), (512..768).collect::<Vec<u64>>());
    assert_eq!(tracker.hot_count(6), 256);
    assert_eq!(tracker.hot_count(7), 0);
    let histogram = tracker.heat_histogram();
    assert_eq!(histogram.total(), tracker.block_count());
    assert_eq!(histogram.to_pairs()[0], (0, tracker.block_count() - 256));
    assert_eq!(histogram.to_pairs()[3], (4, 256));
    let snapshot = tracker.heat_snapshot();
    assert_eq!((snapshot.get(600), snapshot.get(0)), (6, 0));
    assert!(
        tracker.allocated_bytes() < 64 * KIB,
        "{}",
        tracker.allocated_bytes()
    );
}

#[test]
fn heat_map_takes_max_per_cell() {
    // Goal: heat_map splits the disk in equal cells, max heat each. Method: few and many
    // cells over an 8-region disk.
    let (tracker, _clock) = new_tracker(8 * REGION);
    for _ in 0..3 {
        tracker.mark_range(KIB, 1);
    }
    tracker.mark_range(5 * REGION, 1);
    assert_eq!(tracker.heat_map(2), vec![3, 1]);
    assert_eq!(tracker.heat_map(4), vec![3, 0, 1, 0]);
    assert_eq!(tracker.heat_map(1), vec![3]);
    assert_eq!(tracker.heat_map(0), Vec::<u8>::new());
    let fine = tracker.heat_map(16);
    assert_eq!(fine.len(), 16);
    assert_eq!(&fine[..2], &[3, 3]);
    assert_eq!(&fine[10..12], &[1, 1]);
    assert_eq!(fine.iter().filter(|&&h| h > 0).count(), 4);
    let (empty, _clock) = new_tracker(0);
    assert_eq!(empty.heat_map(3), vec![0, 0, 0]);
}

/// Reference for `dirty_runs`: byte by byte at block resolution, then merged.
fn naive_runs(tracker: &Tracker, offset_bytes: u64, len_bytes: u64) -> Vec<(u64, bool)> {
    let end_bytes = (offset_bytes + len_bytes).min(tracker.disk_bytes());
    let mut runs: Vec<(u64, bool)> = Vec::new();
    let mut position = offset_bytes;
    while position < end_bytes {
        let block = position / tracker.granularity_bytes();
        let next = ((block + 1) * tracker.granularity_bytes()).min(end_bytes);
        let dirty = tracker.is_dirty(block);
        match runs.last_mut() {
            Some(last) if last.1 == dirty => last.0 += next - position,
            _ => runs.push((next - position, dirty)),
        }
        position = next;
    }
    runs
}

#[test]
fn dirty_runs_match_a_naive_model() {
    // Goal: dirty_runs covers exactly the clipped range with maximal runs. Method: random
    // bitmaps (sparse, dense, all) and random ranges against a block-by-block reference.
    let mut prng = Prng::new(7);
    for round in 0..60 {
        let disk_bytes = 1 + prng.below(300 * 4 * KIB);
        let (tracker, _clock) = new_tracker(disk_bytes);
        let density = [0, 1, 50, 99, 100][round % 5];
        for block in 0..tracker.block_count() {
            if prng.below(100) < density {
                tracker.mark_range(block * 4 * KIB, 1);
            }
        }
        for _ in 0..20 {
            let offset_bytes = prng.below(disk_bytes + 10 * KIB);
            let len_bytes = prng.below(disk_bytes + 10 * KIB);
            let runs = tracker.dirty_runs(offset_bytes, len_bytes);
            assert_eq!(
                runs,
                naive_runs(&tracker, offset_bytes, len_bytes),
                "round {round}"
            );
        }
        let whole = tracker.dirty_runs(0, u64::MAX);
        assert_eq!(whole.iter().map(|r| r.0).sum::<u64>(), disk_bytes);
    }
}

#[test]
fn dirty_runs_are_capped() {
    // Goal: at most max_runs runs, covering a prefix. Method: alternate blocks, small caps.
    let (tracker, _clock) = new_tracker(5000 * 4 * KIB);
    for block in (0..5000).step_by(2) {
        tracker.mark_range(block * 4 * KIB, 1);
    }
    let runs = tracker.dirty_runs(100, u64::MAX);
    assert_eq!(runs.len(), MAX_DIRTY_RUNS);
    assert_eq!(runs[0], (4 * KIB - 100, true));
    assert_eq!(runs[1], (4 * KIB, false));
    assert_eq!(tracker.dirty_runs_capped(0, u64::MAX, 3).len(), 3);
    assert!(tracker.dirty_runs(5000 * 4 * KIB, 10).is_empty());
    assert!(tracker.dirty_runs(0, 0).is_empty());
}

#[test]
fn heat_runs_follow_regions_and_merge_equal_neighbours() {
    // Goal: heat runs cover the range exactly, per 1 MiB region, equal neighbours merged.
    // Method: bump regions 1 (twice) and 2 (twice) of a 5 MiB disk, read an unaligned range.
    let (tracker, _clock) = new_tracker(5 << 20);
    tracker.mark_range(1 << 20, 4096);
    tracker.mark_range((1 << 20) + 8192, 4096);
    tracker.mark_range(2 << 20, 8192);
    tracker.mark_range((3 << 20) - 4096, 4096);
    let runs = tracker.heat_runs(4096, 5 << 20);
    assert_eq!(
        runs,
        vec![((1 << 20) - 4096, 0), (2 << 20, 2), (2 << 20, 0)],
        "clipped to the disk, regions 1 and 2 merged"
    );
    assert_eq!(tracker.heat_runs(0, 0), Vec::new());
}

#[test]
fn lost_tracker_is_all_dirty_until_cleared() {
    // Goal: loading as lost marks every block and sets the flag. Method: load_saved(lost).
    let (tracker, _clock) = new_tracker(100 * 4 * KIB + 1);
    assert_eq!(tracker.state(), TrackerState::Ok);
    tracker.load_saved(&[], &[], true);
    assert!(tracker.is_lost());
    assert_eq!(tracker.state(), TrackerState::Lost);
    assert!(
        !tracker.is_durable(),
        "no tracker is durable before the activity log"
    );
    assert_eq!(tracker.dirty_count(), 101);
    assert_eq!(tracker.dirty_bytes(), tracker.disk_bytes());
    tracker.clear_lost();
    assert!(!tracker.is_lost());
    assert_eq!(tracker.state(), TrackerState::Ok);
    assert!(format!("{tracker:?}").contains("dirty_count: 101"));
}
