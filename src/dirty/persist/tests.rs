//! Unit tests of tracker files: round trips, unclean stops, torn and hostile files, old versions.

use std::fs;
use std::sync::Arc;

use super::*;
use crate::dirty::TrackerSet;
use crate::env::{Clock, ManualClock};

const DISK_BYTES: u64 = 300 * 4096 + 512;

fn clock() -> Arc<dyn Clock> {
    Arc::new(ManualClock::default())
}

/// A set with two trackers, some dirty blocks and some heat.
fn sample_set() -> TrackerSet {
    let set = TrackerSet::new(DISK_BYTES, clock());
    set.add(TrackerSpec::new("fine").with_granularity_bytes(4096))
        .expect("add fine");
    set.add(TrackerSpec::new("coarse").with_half_life_ms(5000))
        .expect("add coarse");
    for _ in 0..5 {
        set.mark_range(3 * 4096, 4096);
    }
    set.mark_range(100 * 4096 + 7, 9000);
    set.mark_range(DISK_BYTES - 1, 1);
    set
}

/// Saves `sample_set` Clean into a fresh directory; returns it and the fine file's path.
fn saved_sample() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    sample_set().save(dir.path()).expect("save");
    let path = tracker_path(dir.path(), "fine");
    (dir, path)
}

/// Restores `dir` and expects a Corrupt or Mismatch error naming `path`; returns its text.
fn restore_error(dir: &Path, disk_bytes: u64, path: &Path) -> String {
    let err = TrackerSet::restore(dir, disk_bytes, clock()).expect_err("must be refused");
    assert!(
        matches!(
            err,
            DirtyError::Corrupt { .. } | DirtyError::Mismatch { .. }
        ),
        "{err}"
    );
    let text = err.to_string();
    assert!(text.contains(&path.display().to_string()), "{text}");
    text
}

#[test]
fn round_trip_keeps_bits_heat_and_spec() {
    // Goal: a clean save restores the same trackers. Method: save, restore, compare.
    let dir = tempfile::tempdir().expect("tempdir");
    let original = sample_set();
    original.save(dir.path()).expect("save");
    let restored = TrackerSet::restore(dir.path(), DISK_BYTES, clock()).expect("restore");
    assert_eq!(restored.len(), 2);
    for before in original.list() {
        let after = restored.get(before.name()).expect("restored by name");
        assert_eq!(after.spec(), before.spec());
        assert!(!after.is_lost());
        assert_eq!(after.bitmap_set(), before.bitmap_set());
        assert_eq!(after.heat_regions(), before.heat_regions());
    }
    // Five writes to block 3 and one to blocks 100..=102, all in the first 1 MiB region.
    assert_eq!(restored.get("fine").expect("fine").heat(3), 6);
    assert_eq!(restored.get("fine").expect("fine").dirty_count(), 5);
}

#[test]
fn restore_marks_files_active_and_an_unclean_stop_is_lost() {
    // Goal: after restore the files say Active; restoring again (no clean save in between,
    // as after a crash) gives lost trackers with every block dirty. Method: restore twice.
    let (dir, path) = saved_sample();
    let first = TrackerSet::restore(dir.path(), DISK_BYTES, clock()).expect("restore");
    let on_disk = decode(&path, &fs::read(&path).expect("read")).expect("decode");
    assert_eq!(on_disk.state, FileState::Active);
    drop(first);
    let second = TrackerSet::restore(dir.path(), DISK_BYTES, clock()).expect("restore");
    for tracker in second.list() {
        assert!(tracker.is_lost(), "{}", tracker.name());
        assert_eq!(tracker.dirty_count(), tracker.block_count());
        assert_eq!(tracker.heat_histogram().total(), tracker.block_count());
        assert_eq!(tracker.hot_set(1), Vec::<u64>::new());
    }
    // A clean save keeps them lost (and all dirty) until a caller clears the flag.
    second.get("coarse").expect("coarse").clear_lost();
    second.save(dir.path()).expect("save");
    let third = TrackerSet::restore(dir.path(), DISK_BYTES, clock()).expect("restore");
    let fine = third.get("fine").expect("fine");
    assert!(fine.is_lost());
    assert_eq!(fine.dirty_count(), fine.block_count());
    let coarse = third.get("coarse").expect("coarse");
    assert!(!coarse.is_lost());
    assert_eq!(coarse.dirty_count(), coarse.block_count());
}

#[test]
fn truncated_or_empty_file_is_corrupt() {
    // Goal: a torn file is refused, naming the file. Method: truncate at many lengths.
    let (dir, path) = saved_sample();
    let bytes = fs::read(&path).expect("read");
    for len in [
        0,
        1,
        8,
        55,
        56,
        60,
        bytes.len() / 2,
        bytes.len() - 4,
        bytes.len() - 1,
    ] {
        fs::write(&path, &bytes[..len]).expect("write");
        let text = restore_error(dir.path(), DISK_BYTES, &path);
        assert!(
            text.contains("truncated") || text.contains("checksum"),
            "{len}: {text}"
        );
    }
    fs::write(&path, b"").expect("write");
    assert!(restore_error(dir.path(), DISK_BYTES, &path).contains("truncated: 0 bytes"));
}

#[test]
fn any_single_bit_flip_is_detected() {
    // Goal: no one-bit corruption is misread. Method: flip each bit of the file in turn.
    let (dir, path) = saved_sample();
    let bytes = fs::read(&path).expect("read");
    for bit in 0..bytes.len() * 8 {
        let mut flipped = bytes.clone();
        flipped[bit / 8] ^= 1 << (bit % 8);
        assert!(decode(&path, &flipped).is_err(), "bit {bit} went unnoticed");
    }
    let mut flipped = bytes;
    flipped[100] ^= 0x10;
    fs::write(&path, &flipped).expect("write");
    restore_error(dir.path(), DISK_BYTES, &path);
}

#[test]
fn wrong_magic_or_version_is_refused() {
    // Goal: another format is never read as ours. Method: rewrite version (with a valid
    // checksum) and magic.
    let (dir, path) = saved_sample();
    let bytes = fs::read(&path).expect("read");
    let mut newer = bytes.clone();
    newer[8..12].copy_from_slice(&4u32.to_le_bytes());
    let body_len = newer.len() - 4;
    let checksum = crc32c::crc32c(&newer[..body_len]);
    newer[body_len..].copy_from_slice(&checksum.to_le_bytes());
    fs::write(&path, &newer).expect("write");
    let text = restore_error(dir.path(), DISK_BYTES, &path);
    assert!(text.contains("unsupported version 4"), "{text}");
    let mut alien = bytes;
    alien[..8].copy_from_slice(b"NOTOURS!");
    fs::write(&path, &alien).expect("write");
    assert!(restore_error(dir.path(), DISK_BYTES, &path).contains("bad magic"));
}

#[test]
fn disk_size_change_is_a_mismatch() {
    // Goal: a file saved for another disk size is refused, not stretched. Method: restore
    // with a disk one block larger, and one byte smaller (same block count).
    let (dir, _fine) = saved_sample();
    // Files load in name order: "coarse" is refused first.
    let path = tracker_path(dir.path(), "coarse");
    let text = restore_error(dir.path(), DISK_BYTES + 4096, &path);
    assert!(text.contains("does not match the disk"), "{text}");
    restore_error(dir.path(), DISK_BYTES - 1, &path);
}

#[test]
fn file_holding_another_name_is_corrupt() {
    // Goal: a renamed file is not loaded under the wrong name. Method: rename, restore.
    let (dir, path) = saved_sample();
    let renamed = tracker_path(dir.path(), "other");
    fs::rename(&path, &renamed).expect("rename");
    let text = restore_error(dir.path(), DISK_BYTES, &renamed);
    assert!(text.contains("holds tracker \"fine\""), "{text}");
}

#[test]
fn save_removes_temp_files_and_missing_dir_is_empty() {
    // Goal: torn temp files are removed, other files kept until remove_saved. Method: remove
    // one tracker, leave a temp file, save, list, remove_saved; restore a missing dir.
    let dir = tempfile::tempdir().expect("tempdir");
    let set = sample_set();
    set.save(dir.path()).expect("save");
    set.remove("coarse").expect("remove");
    fs::write(dir.path().join("fine.tracker.tmp"), b"torn").expect("write");
    fs::write(dir.path().join("README"), b"not ours").expect("write");
    set.save(dir.path()).expect("save");
    let names = || {
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        names.sort();
        names
    };
    assert_eq!(names(), vec!["README", "coarse.tracker", "fine.tracker"]);
    assert!(remove_saved(dir.path(), "coarse").expect("remove_saved"));
    assert!(!remove_saved(dir.path(), "coarse").expect("remove_saved again"));
    assert_eq!(names(), vec!["README", "fine.tracker"]);
    let missing = dir.path().join("missing");
    let empty = TrackerSet::restore(&missing, DISK_BYTES, clock()).expect("restore");
    assert!(empty.is_empty());
    assert!(!missing.exists());
}

#[test]
fn save_active_then_crash_restores_lost() {
    // Goal: a tracker added at run time and recorded with save_active comes back lost
    // after a crash. Method: add, save_active, drop without a clean save, restore.
    let dir = tempfile::tempdir().expect("tempdir");
    let set = TrackerSet::new(DISK_BYTES, clock());
    set.add(TrackerSpec::new("late")).expect("add");
    set.save_active(dir.path()).expect("save_active");
    drop(set);
    let restored = TrackerSet::restore(dir.path(), DISK_BYTES, clock()).expect("restore");
    assert!(restored.get("late").expect("late").is_lost());
}

/// Rewrites the trailing checksum after an edit, so decode reaches the field checks.
fn reseal(bytes: &mut [u8]) {
    let body_len = bytes.len() - 4;
    let checksum = crc32c::crc32c(&bytes[..body_len]);
    bytes[body_len..].copy_from_slice(&checksum.to_le_bytes());
}

#[test]
fn a_sparse_huge_tracker_saves_small_and_round_trips() {
    // Goal: file size and work follow the dirty data, not the disk. Method: a 64 TiB disk
    // at 64 KiB (2^30 blocks) with 3 dirty blocks; save, check the size, restore, compare;
    // the Active rewrite holds no entries.
    let disk_bytes = 64 << 40;
    let dir = tempfile::tempdir().expect("tempdir");
    let set = TrackerSet::new(disk_bytes, clock());
    set.add(TrackerSpec::new("big")).expect("add");
    for offset_bytes in [0, 1 << 40, disk_bytes - 4096] {
        set.mark_range(offset_bytes, 4096);
    }
    set.save(dir.path()).expect("save");
    let path = tracker_path(dir.path(), "big");
    let bytes = fs::read(&path).expect("read");
    assert!(bytes.len() < 200, "{} bytes", bytes.len());
    let before = set.get("big").expect("big");
    assert_eq!(
        before.state_bytes(),
        bytes.len() as u64,
        "size of the last save"
    );
    let restored = TrackerSet::restore(dir.path(), disk_bytes, clock()).expect("restore");
    let big = restored.get("big").expect("big");
    assert_eq!(big.bitmap_set(), before.bitmap_set());
    assert_eq!(big.heat_regions(), before.heat_regions());
    assert!(
        big.allocated_bytes() < 64 << 10,
        "{}",
        big.allocated_bytes()
    );
    let active_bytes = fs::read(&path).expect("read");
    assert_eq!(
        big.state_bytes(),
        active_bytes.len() as u64,
        "the Active rewrite"
    );
    let active = decode(&path, &active_bytes).expect("decode");
    assert_eq!(active.state, FileState::Active);
    assert!(active.words.is_empty() && active.heat.is_empty());
}

#[test]
fn hostile_counts_and_entries_are_refused_before_allocating() {
    // Goal: a file with a valid checksum but lying counts or entries is refused, never
    // misread and never allocating from a count. Method: edit W, H and entries, reseal.
    let (_dir, path) = saved_sample();
    let bytes = fs::read(&path).expect("read");
    let saved = decode(&path, &bytes).expect("decode");
    assert!(saved.words.len() >= 2, "{saved:?}");
    // After the name: the recovered bound (8), the heat shift (4), then the counts.
    let counts_at = FIXED_HEADER_BYTES + "fine".len() + 8 + 4;
    let entries_at = counts_at + 16;
    let mut cases: Vec<(Vec<u8>, &str)> = Vec::new();
    let mut huge = bytes.clone();
    huge[counts_at..counts_at + 8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    cases.push((huge, "imply"));
    let mut swapped = bytes.clone();
    let (first, second) = (entries_at, entries_at + 16);
    let first_entry = swapped[first..first + 16].to_vec();
    swapped.copy_within(second..second + 16, first);
    swapped[second..second + 16].copy_from_slice(&first_entry);
    cases.push((swapped, "out of order"));
    let mut zero = bytes.clone();
    zero[entries_at + 8..entries_at + 16].fill(0);
    cases.push((zero, "zero"));
    let mut past = bytes.clone();
    past[entries_at..entries_at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
    cases.push((past, "past"));
    let mut shift = bytes;
    shift[counts_at - 4] = 64;
    cases.push((shift, "heat shift"));
    for (mut bytes, problem) in cases {
        reseal(&mut bytes);
        let err = decode(&path, &bytes).expect_err(problem);
        assert!(err.to_string().contains(problem), "{problem}: {err}");
    }
}

/// A version 1 file as the old build wrote it.
fn v1_file(state: FileState, flags: u32, disk_bytes: u64, words: &[u64], heat: &[u8]) -> Vec<u8> {
    let granularity_bytes = 4096u64;
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&persist_v1::VERSION.to_le_bytes());
    out.extend_from_slice(&(state as u32).to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    let block_count = disk_bytes.div_ceil(granularity_bytes);
    for field in [granularity_bytes, block_count, disk_bytes, 30_000] {
        out.extend_from_slice(&field.to_le_bytes());
    }
    out.extend_from_slice(&2u32.to_le_bytes());
    out.extend_from_slice(b"v1");
    for word in words {
        out.extend_from_slice(&word.to_le_bytes());
    }
    out.extend_from_slice(heat);
    let checksum = crc32c::crc32c(&out);
    out.extend_from_slice(&checksum.to_le_bytes());
    out
}

#[test]
fn version_1_files_load_sparse() {
    // Goal: an old dense file loads as the same bits, heat per region the hottest block.
    // Method: hand-build a v1 file of 600 blocks (3 regions of 256), decode, compare.
    let disk_bytes = 600 * 4096 - 10;
    let mut words = vec![0u64; 10];
    words[0] = 0b101;
    words[9] = 1 << 23; // block 599, the last
    let mut heat = vec![0u8; 600];
    heat[3] = 7;
    heat[200] = 9;
    heat[599] = 2;
    let bytes = v1_file(FileState::Clean, 0, disk_bytes, &words, &heat);
    let saved = decode(Path::new("old.tracker"), &bytes).expect("v1 decodes");
    assert_eq!(saved.words, vec![(0, 0b101), (9, 1 << 23)]);
    assert_eq!(saved.heat, vec![(0, 9), (2, 2)]);
    assert_eq!(saved.spec.name, "v1");
    assert!(!saved.lost);
    let dir = tempfile::tempdir().expect("tempdir");
    fs::write(tracker_path(dir.path(), "v1"), &bytes).expect("write");
    let restored = TrackerSet::restore(dir.path(), disk_bytes, clock()).expect("restore v1");
    let tracker = restored.get("v1").expect("v1");
    let blocks: Vec<u64> = tracker.bitmap_set().iter_blocks().collect();
    assert_eq!(blocks, vec![0, 2, 599]);
    assert_eq!((tracker.heat(3), tracker.heat(599)), (9, 2));
    // The rewrite at restore is the current version.
    let rewritten = fs::read(tracker_path(dir.path(), "v1")).expect("read");
    assert_eq!(rewritten[8..12], VERSION.to_le_bytes());
    let lost = v1_file(FileState::Active, FLAG_LOST, disk_bytes, &words, &heat);
    let saved = decode(Path::new("old.tracker"), &lost).expect("v1 decodes");
    assert!(saved.lost);
    assert_eq!(saved.state, FileState::Active);
    // A v1 body of the wrong length, even with a valid checksum, is refused.
    let short = v1_file(FileState::Clean, 0, disk_bytes, &words, &heat[..599]);
    let err = decode(Path::new("old.tracker"), &short).expect_err("short body");
    assert!(err.to_string().contains("header implies"), "{err}");
    // Bits past the disk's end are refused.
    let mut past = words.clone();
    past[9] = 1 << 24;
    let bytes = v1_file(FileState::Clean, 0, disk_bytes, &past, &heat);
    let err = decode(Path::new("old.tracker"), &bytes).expect_err("bits past end");
    assert!(err.to_string().contains("past"), "{err}");
}

#[test]
fn version_2_files_load() {
    // Goal: a file of the previous sparse version loads with its bits and heat. Method: take
    // a current file, drop the recovered-bound field, stamp version 2, reseal, restore.
    let (dir, path) = saved_sample();
    let bytes = fs::read(&path).expect("read");
    let saved = decode(&path, &bytes).expect("decode");
    let bound_at = FIXED_HEADER_BYTES + "fine".len();
    let mut v2 = bytes[..bound_at].to_vec();
    v2.extend_from_slice(&bytes[bound_at + 8..]);
    v2[8..12].copy_from_slice(&VERSION_2.to_le_bytes());
    reseal(&mut v2);
    let old = decode(&path, &v2).expect("version 2 decodes");
    assert_eq!((old.words, old.heat), (saved.words, saved.heat));
    assert_eq!(old.recovered_bound, None);
    let mut flagged = v2;
    flagged[16..20].copy_from_slice(&FLAG_DURABLE.to_le_bytes());
    reseal(&mut flagged);
    let err = decode(&path, &flagged).expect_err("no durable flag in version 2");
    assert!(err.to_string().contains("unknown flags"), "{err}");
    drop(dir);
}
