//! Unit tests of the activity log: concurrent writers against crash snapshots, eviction,
//! takes, wide writes, and a tracker set restored after a crash.

use std::sync::Arc;

use super::*;
use crate::dirty::{Tracker, TrackerSet, TrackerSpec, TrackerState};
use crate::env::{Clock, MonotonicClock};
use crate::prng::SplitMix64 as Prng;

const GRANULARITY: u64 = 4096;
/// 256 MiB: 64 extents of 4 MiB.
const DISK_BYTES: u64 = 256 << 20;

fn clock() -> Arc<dyn Clock> {
    Arc::new(MonotonicClock::new())
}

/// A durable 4 KiB tracker in `dir` whose log holds `capacity` extents open.
fn durable_set(dir: &Path, capacity: usize) -> (TrackerSet, Arc<Tracker>) {
    let set = TrackerSet::in_dir(DISK_BYTES, clock(), dir).with_log_extents(capacity);
    let tracker = set
        .add(
            TrackerSpec::new("d")
                .with_granularity_bytes(GRANULARITY)
                .with_durable(true),
        )
        .expect("add");
    (set, tracker)
}

fn geometry() -> Geometry {
    Geometry {
        granularity_bytes: GRANULARITY,
        disk_bytes: DISK_BYTES,
        extent_blocks: extent_blocks_for(GRANULARITY),
    }
}

/// One write as the data path does it: admit, (write), mark, drop the admission.
fn write(set: &TrackerSet, block: u64) {
    let offset_bytes = block * GRANULARITY;
    let admission = set.admit(offset_bytes, GRANULARITY);
    set.mark_admitted(offset_bytes, GRANULARITY, &admission);
    drop(admission);
}

#[test]
fn every_acknowledged_write_is_in_a_crash_snapshot_of_the_log() {
    // Goal: a crash at any moment recovers every write acknowledged before it, while four
    // writers force extents to open and close (capacity 8 of 64 extents). Method: writers
    // push each block to a ledger after marking it (the acknowledgement); a crasher copies
    // the ledger, then the log file, and replays the copy: every ledgered block is dirty and
    // the over-marking stays within the open extents.
    let dir = tempfile::tempdir().expect("tempdir");
    let (set, tracker) = durable_set(dir.path(), 8);
    let set = Arc::new(set);
    let ledger = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|seed| {
            let (set, ledger) = (Arc::clone(&set), Arc::clone(&ledger));
            std::thread::spawn(move || {
                let mut prng = Prng::new(seed);
                for _ in 0..3000 {
                    let block = prng.below(DISK_BYTES / GRANULARITY);
                    write(&set, block);
                    lock(&ledger).push(block);
                }
            })
        })
        .collect();
    let path = logfile::log_path(dir.path(), "d");
    let mut snapshots = 0;
    let crasher = {
        let (ledger, done) = (Arc::clone(&ledger), Arc::clone(&done));
        std::thread::spawn(move || {
            while !done.load(Ordering::Acquire) {
                let acked: Vec<u64> = lock(&ledger).clone();
                let copy = std::fs::read(&path).expect("read log");
                let crashed = path.with_extension("crash");
                std::fs::write(&crashed, &copy).expect("copy");
                let replayed = logfile::replay(&crashed, &geometry()).expect("replay");
                for block in acked {
                    assert!(
                        replayed.set.contains(block),
                        "acknowledged block {block} lost"
                    );
                }
                assert!(replayed.open_extents <= 8 + 4, "{}", replayed.open_extents);
                snapshots += 1;
            }
            snapshots
        })
    };
    for writer in writers {
        writer.join().expect("writer");
    }
    done.store(true, Ordering::Release);
    let snapshots = crasher.join().expect("crasher");
    assert!(snapshots > 3, "only {snapshots} snapshots");
    assert!(tracker.open_bytes() <= 12 * (4 << 20));
    assert!(tracker.is_durable());
}

#[test]
fn a_take_stays_in_the_log_until_the_next_take() {
    // Goal: blocks a pass took survive a crash in the middle of the pass, even after their
    // extents were closed. Method: write, take, write elsewhere until every extent of the
    // taken blocks was evicted, replay: the taken blocks are dirty; after a second take they
    // may go (the first pass is over).
    let dir = tempfile::tempdir().expect("tempdir");
    let (set, tracker) = durable_set(dir.path(), 4);
    for block in [0, 1100, 2200] {
        write(&set, block);
    }
    let taken = tracker.take_and_clear();
    assert_eq!(taken.count(), 3);
    for extent in 10..40 {
        write(&set, extent * 1024 + 7);
    }
    assert_eq!(tracker.open_bytes(), 4 * (4 << 20), "old extents closed");
    let path = logfile::log_path(dir.path(), "d");
    let replayed = logfile::replay(&path, &geometry()).expect("replay");
    for block in [0, 1100, 2200] {
        assert!(replayed.set.contains(block), "taken block {block} lost");
    }
    for extent in 10..40 {
        assert!(replayed.set.contains(extent * 1024 + 7));
    }
}

#[test]
fn settled_blocks_leave_the_log_at_the_next_compaction() {
    // Goal: blocks a pass delivered are not recovered again after a crash. Method: merge
    // 1000 blocks (as a fresh migration does), take them, settle them in two halves: the log
    // replays empty once the settled share triggered a compaction.
    let dir = tempfile::tempdir().expect("tempdir");
    let (_set, tracker) = durable_set(dir.path(), 8);
    let mut all = DirtySet::empty(GRANULARITY, DISK_BYTES);
    all.insert_range(0, 1000);
    tracker.merge(&all);
    let taken = tracker.take_and_clear();
    let path = logfile::log_path(dir.path(), "d");
    assert_eq!(
        logfile::replay(&path, &geometry())
            .expect("replay")
            .set
            .count(),
        1000
    );
    let mut half = DirtySet::empty(GRANULARITY, DISK_BYTES);
    half.insert_range(0, 500);
    tracker.settle(&half);
    let replayed = logfile::replay(&path, &geometry()).expect("replay");
    assert_eq!(
        replayed.set.count(),
        500,
        "compacted without the settled half"
    );
    tracker.settle(&taken);
    assert!(logfile::replay(&path, &geometry())
        .expect("replay")
        .set
        .is_empty());
}

#[test]
fn a_wide_write_is_logged_before_it_starts() {
    // Goal: a write over more extents than a quarter of the log is in the log before it
    // starts, without opening them. Method: admit a 64 MiB TRIM into a log of 8 extents,
    // replay while it is in flight: all its blocks are dirty; no extent was opened.
    let dir = tempfile::tempdir().expect("tempdir");
    let (set, tracker) = durable_set(dir.path(), 8);
    let admission = set.admit(8 << 20, 64 << 20);
    let path = logfile::log_path(dir.path(), "d");
    let replayed = logfile::replay(&path, &geometry()).expect("replay");
    assert_eq!(replayed.set.count(), (64 << 20) / GRANULARITY);
    assert_eq!(replayed.open_extents, 0);
    set.mark_admitted(8 << 20, 64 << 20, &admission);
    drop(admission);
    assert_eq!(tracker.open_bytes(), 0);
    assert_eq!(tracker.dirty_count(), (64 << 20) / GRANULARITY);
}

#[test]
fn a_crashed_set_restores_recovered_and_a_clean_one_ok() {
    // Goal: after an unclean stop a durable tracker comes back recovered with its bound and
    // every written block; a non-durable one comes back lost; a clean stop gives ok and
    // removes the log. Method: write, drop without saving (the crash), restore; then save
    // clean and restore again.
    let dir = tempfile::tempdir().expect("tempdir");
    let (set, _) = durable_set(dir.path(), 16);
    set.add(TrackerSpec::new("plain").with_granularity_bytes(GRANULARITY))
        .expect("plain");
    set.save_active(dir.path()).expect("active");
    let written: Vec<u64> = (0..50).map(|i| i * 997 % 65536).collect();
    for &block in &written {
        write(&set, block);
    }
    drop(set);
    let restored = TrackerSet::restore(dir.path(), DISK_BYTES, clock()).expect("restore");
    let durable = restored.get("d").expect("durable tracker");
    let TrackerState::Recovered { bound_bytes } = durable.state() else {
        panic!("{:?}", durable.state());
    };
    assert!(bound_bytes <= 16 * (4 << 20), "{bound_bytes}");
    for &block in &written {
        assert!(durable.is_dirty(block), "block {block}");
    }
    assert_eq!(
        restored.get("plain").expect("plain").state(),
        TrackerState::Lost
    );
    assert!(durable.is_durable());
    // Still recovered after a clean restart, and the log is gone after the clean save.
    restored.save(dir.path()).expect("clean save");
    assert!(!logfile::log_path(dir.path(), "d").exists());
    drop(restored);
    let again = TrackerSet::restore(dir.path(), DISK_BYTES, clock()).expect("restore");
    let durable = again.get("d").expect("durable");
    assert_eq!(durable.state(), TrackerState::Recovered { bound_bytes });
    durable.clear_lost();
    assert_eq!(durable.state(), TrackerState::Ok);
    for &block in &written {
        assert!(durable.is_dirty(block));
    }
}

#[test]
fn a_tracker_added_during_a_write_still_logs_it() {
    // Goal: a durable tracker published between a write's admission and its mark opens the
    // write's extent before the reply. Method: admit with no durable tracker, add one, mark:
    // the log holds the block.
    let dir = tempfile::tempdir().expect("tempdir");
    let set = TrackerSet::in_dir(DISK_BYTES, clock(), dir.path());
    let admission = set.admit(40 << 20, GRANULARITY);
    set.add(
        TrackerSpec::new("late")
            .with_granularity_bytes(GRANULARITY)
            .with_durable(true),
    )
    .expect("add");
    set.mark_admitted(40 << 20, GRANULARITY, &admission);
    drop(admission);
    let path = logfile::log_path(dir.path(), "late");
    let replayed = logfile::replay(&path, &geometry()).expect("replay");
    assert!(replayed.set.contains((40 << 20) / GRANULARITY));
    assert_eq!(replayed.open_extents, 1);
}

#[test]
fn a_log_that_cannot_be_written_makes_the_tracker_lost() {
    // Goal: a failing log never leaves a tracker that claims durability. Method: replace
    // the log's directory entry by a directory-less path (remove the dir), write into a new
    // extent: the tracker is lost, not durable, and every block is dirty.
    let dir = tempfile::tempdir().expect("tempdir");
    let sub = dir.path().join("trackers");
    let (set, tracker) = durable_set(&sub, 4);
    write(&set, 0);
    // Compaction renames into the directory: with it gone, the next one fails.
    std::fs::remove_dir_all(&sub).expect("remove");
    tracker.mark_lost();
    write(&set, 5000);
    assert!(!tracker.is_durable());
    assert!(tracker.is_lost());
    assert_eq!(tracker.dirty_count(), tracker.block_count());
}
