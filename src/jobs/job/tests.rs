//! Unit tests of the job's setup: its tracker's granularity.

use super::*;
use crate::dirty::TrackerSet;
use crate::env::MonotonicClock;

#[test]
fn a_job_tracks_at_4k_unless_told_never_coarser_than_its_export() {
    // Goal: the job's granularity rule. Method: the pure function on export granularities
    // and disk sizes around the destination's block limit.
    const TIB: u64 = 1 << 40;
    assert_eq!(job_granularity(None, 64 << 10, TIB), 4096);
    assert_eq!(job_granularity(None, 1 << 20, TIB), 4096);
    assert_eq!(job_granularity(None, 4096, TIB), 4096);
    assert_eq!(job_granularity(Some(64 << 10), 64 << 10, TIB), 64 << 10);
    assert_eq!(
        job_granularity(Some(1 << 20), 4096, TIB),
        1 << 20,
        "as asked"
    );
    // Past 4 TiB the destination's block limit doubles it, up to the export's.
    assert_eq!(job_granularity(None, 64 << 10, 4 * TIB), 4096);
    assert_eq!(job_granularity(None, 64 << 10, 4 * TIB + 1), 8192);
    assert_eq!(job_granularity(None, 64 << 10, 20 * TIB), 32 << 10);
    assert_eq!(job_granularity(None, 64 << 10, 1 << 60), 64 << 10);
}

#[test]
fn a_resumed_tracker_at_another_granularity_keeps_its_bits() {
    // Goal: a resume whose tracker is at another granularity than the job's loses no
    // dirty block, and the converted tracker is the one the export marks from then on.
    // Method: a 64 KiB tracker with two dirty blocks, regrained to 4 KiB; then a write.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(8 << 20).unwrap();
    let export = Export::open("vm", &path, false, 64 << 10, 1000, |size_bytes| {
        TrackerSet::new(size_bytes, Arc::new(MonotonicClock::new()))
    })
    .unwrap();
    let spec = |granularity_bytes| TrackerSpec {
        name: tracker_name(3),
        granularity_bytes,
        half_life_ms: 1000,
        durable: false,
    };
    let coarse = export.trackers().add(spec(64 << 10)).unwrap();
    coarse.mark_range(0, 1);
    coarse.mark_range(5 << 16, 4096);
    let fine = regrain_tracker(&export, Arc::clone(&coarse), spec(4096)).unwrap();
    assert_eq!(fine.granularity_bytes(), 4096);
    assert_eq!(fine.dirty_count(), 32, "two 64 KiB blocks = 32 of 4 KiB");
    let same = regrain_tracker(&export, Arc::clone(&fine), spec(4096)).unwrap();
    assert!(Arc::ptr_eq(&same, &fine));
    export.trackers().mark_range(1 << 20, 4096);
    assert_eq!(fine.dirty_count(), 33);
    assert_eq!(export.trackers().len(), 1);
}
