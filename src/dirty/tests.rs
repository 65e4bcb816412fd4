//! Cross-module tests of the trackers: DESIGN.md invariant 1 under concurrency, the
//! lock-free tracker set, and saved heat of another region size.
//!
//! The ordering model: a "disk" of `AtomicU64` cells (one per block), writer threads that store
//! a new version into a cell and mark it, and a copier that repeatedly takes and clears the
//! dirty bits and then reads the cells it found dirty into a "copy". After the writers stop and
//! one final take-and-copy, the copy must equal the disk. With the order reversed (mark, then
//! write) the copier can take the bit and read the cell before the write lands, and nothing
//! marks it again: the copy keeps a stale version.

use crate::prng::SplitMix64 as Prng;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use super::{DirtyError, Tracker, TrackerSet, TrackerSpec};
use crate::env::{Clock, ManualClock};

const GRANULARITY_BYTES: u64 = 4096;

/// Which comes first in a writer: the data write or the dirty mark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    /// What ferry does: the mark follows the completed write.
    WriteThenMark,
    /// The bug the invariant forbids.
    MarkThenWrite,
}

/// One round's parameters.
#[derive(Debug, Clone, Copy)]
struct Round {
    order: Order,
    /// Hold the gap between the two steps open until the copier completed two more sweeps,
    /// so that a sweep surely falls between them (a slow write, deterministically).
    hold: bool,
    cells: u64,
    writers: u64,
    writes_per_writer: u64,
    seed: u64,
}

/// Shared state of one round.
struct Model {
    disk: Vec<AtomicU64>,
    set: TrackerSet,
    tracker: Arc<Tracker>,
    /// Completed copier sweeps.
    sweeps: AtomicU64,
    writers_done: AtomicBool,
}

impl Model {
    fn new(cells: u64) -> Self {
        let clock: Arc<dyn Clock> = Arc::new(ManualClock::default());
        let set = TrackerSet::new(cells * GRANULARITY_BYTES, clock);
        let spec = TrackerSpec::new("model").with_granularity_bytes(GRANULARITY_BYTES);
        let tracker = set.add(spec).expect("add tracker");
        Self {
            disk: (0..cells).map(|_| AtomicU64::new(0)).collect(),
            set,
            tracker,
            sweeps: AtomicU64::new(0),
            writers_done: AtomicBool::new(false),
        }
    }

    /// One copier pass: take and clear first, then read what was dirty.
    fn sweep(&self, copy: &mut [u64]) {
        let dirty = self.tracker.take_and_clear();
        for block in dirty.iter_blocks() {
            let cell = usize::try_from(block).expect("small model");
            // Relaxed suffices: the take's Acquire pairs with the mark's Release.
            copy[cell] = self.disk[cell].load(Ordering::Relaxed);
        }
    }

    /// Waits until the copier completed two sweeps after this call started: the second one
    /// began after this point, so it saw (and cleared) every mark made before it.
    fn hold_for_sweeps(&self) {
        let start = self.sweeps.load(Ordering::SeqCst);
        while self.sweeps.load(Ordering::SeqCst) < start + 2 {
            std::thread::yield_now();
        }
    }

    /// One writer: `writes_per_writer` versions into random cells, in `round.order`.
    fn write(&self, round: Round, writer: u64) {
        let mut prng = Prng::new(round.seed ^ (writer << 48));
        for write in 0..round.writes_per_writer {
            let cell = prng.below(round.cells);
            // Unique and never 0, so a stale copy always differs.
            let version = ((writer + 1) << 32) | (write + 1);
            let offset_bytes = cell * GRANULARITY_BYTES;
            let cell = usize::try_from(cell).expect("small model");
            match round.order {
                Order::WriteThenMark => {
                    self.disk[cell].store(version, Ordering::Relaxed);
                    if round.hold {
                        self.hold_for_sweeps();
                    }
                    self.set.mark_range(offset_bytes, GRANULARITY_BYTES);
                }
                Order::MarkThenWrite => {
                    self.set.mark_range(offset_bytes, GRANULARITY_BYTES);
                    if round.hold {
                        self.hold_for_sweeps();
                    }
                    self.disk[cell].store(version, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Runs one round; returns how many cells of the final copy differ from the disk.
fn diverged_cells(round: Round) -> usize {
    let model = Model::new(round.cells);
    let cells = usize::try_from(round.cells).expect("small model");
    let mut copy = std::thread::scope(|scope| {
        let copier = scope.spawn(|| {
            let mut copy = vec![0u64; cells];
            while !model.writers_done.load(Ordering::SeqCst) {
                model.sweep(&mut copy);
                model.sweeps.fetch_add(1, Ordering::SeqCst);
            }
            copy
        });
        let writers: Vec<_> = (0..round.writers)
            .map(|writer| {
                let model = &model;
                scope.spawn(move || model.write(round, writer))
            })
            .collect();
        for writer in writers {
            writer.join().expect("writer thread");
        }
        model.writers_done.store(true, Ordering::SeqCst);
        copier.join().expect("copier thread")
    });
    // The final pass, after every write completed (the switchover's last pass).
    model.sweep(&mut copy);
    let disk = model.disk.iter().map(|cell| cell.load(Ordering::Relaxed));
    copy.iter()
        .zip(disk)
        .filter(|&(&copied, written)| copied != written)
        .count()
}

#[test]
fn write_then_mark_never_diverges() {
    // Goal: invariant 1 keeps copy == disk. Method: 2 writers hammer 64 cells (one bitmap word)
    // while a copier sweeps; 60 seeds, then 10 seeds with a sweep forced inside every gap.
    for seed in 0..60 {
        let round = Round {
            order: Order::WriteThenMark,
            hold: false,
            cells: 64,
            writers: 2,
            writes_per_writer: 3000,
            seed,
        };
        assert_eq!(diverged_cells(round), 0, "seed {seed}");
    }
    for seed in 0..10 {
        let round = Round {
            order: Order::WriteThenMark,
            hold: true,
            cells: 16,
            writers: 2,
            writes_per_writer: 40,
            seed,
        };
        assert_eq!(diverged_cells(round), 0, "held seed {seed}");
    }
}

#[test]
fn mark_then_write_is_detected() {
    // Goal: the model catches the forbidden order, so the test above means something.
    // Method: mark first, hold the gap open for two copier sweeps; within 5 rounds at least one
    // must end with a stale copy (in practice each round does: the last write to every cell
    // is taken and read before it lands, and nothing marks it again).
    let diverged: Vec<usize> = (0..5)
        .map(|seed| {
            diverged_cells(Round {
                order: Order::MarkThenWrite,
                hold: true,
                cells: 16,
                writers: 2,
                writes_per_writer: 40,
                seed,
            })
        })
        .collect();
    assert!(
        diverged.iter().any(|&cells| cells > 0),
        "never diverged: {diverged:?}"
    );
}

#[test]
fn tracker_set_add_remove_while_marking() {
    // Goal: the lock-free set stays consistent while writers mark and the control path adds
    // and removes trackers. Method: 2 marking threads, 200 add/remove cycles, then check that a
    // tracker present throughout saw every write, and that marks after add() always land.
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::default());
    let set = TrackerSet::new(1024 * GRANULARITY_BYTES, clock);
    let steady = set.add(TrackerSpec::new("steady").with_granularity_bytes(GRANULARITY_BYTES));
    let steady = steady.expect("add steady");
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        for writer in 0..2u64 {
            let (set, stop) = (&set, &stop);
            scope.spawn(move || {
                let mut block = writer;
                while !stop.load(Ordering::Relaxed) {
                    set.mark_range(block * GRANULARITY_BYTES, GRANULARITY_BYTES);
                    block = (block + 2) % 1024;
                }
            });
        }
        for cycle in 0..200 {
            let name = format!("t{}", cycle % 3);
            let added = set.add(TrackerSpec::new(name.as_str())).expect("add");
            set.mark_range(5, 1);
            assert!(added.is_dirty(0), "a mark after add() must land");
            assert!(set.get(&name).is_some());
            let removed = set.remove(&name).expect("remove");
            assert!(Arc::ptr_eq(&added, &removed));
        }
        stop.store(true, Ordering::Relaxed);
    });
    assert_eq!(set.len(), 1);
    assert!(steady.dirty_count() > 0);
}

#[test]
fn tracker_set_names_and_empty_path() {
    // Goal: names are unique, missing names are reported, an empty set ignores writes.
    // Method: add a duplicate, remove a missing name, mark with no trackers.
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::default());
    let set = TrackerSet::new(1 << 20, clock);
    assert!(set.is_empty());
    set.mark_range(0, 4096);
    set.add(TrackerSpec::new("a")).expect("add a");
    let err = set.add(TrackerSpec::new("a")).expect_err("duplicate");
    assert!(
        matches!(err, DirtyError::Exists(ref name) if name == "a"),
        "{err}"
    );
    let err = set.remove("b").expect_err("missing");
    assert!(
        matches!(err, DirtyError::NotFound(ref name) if name == "b"),
        "{err}"
    );
    set.add(TrackerSpec::new("b").with_granularity_bytes(4096))
        .expect("add b");
    let names: Vec<String> = set.list().iter().map(|t| t.name().to_owned()).collect();
    assert_eq!(names, vec!["a", "b"]);
    set.mark_range(70_000, 1);
    assert!(set.get("a").expect("a").is_dirty(1));
    assert!(set.get("b").expect("b").is_dirty(17));
    assert!(format!("{set:?}").contains("\"a\", \"b\""));
}

/// Resident set size of this process now, from /proc (0 where there is none).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// A tracker over `disk_bytes` at `granularity_bytes`, in a set of its own.
fn figure_set(disk_bytes: u64, granularity_bytes: u64) -> TrackerSet {
    let set = TrackerSet::new(disk_bytes, Arc::new(ManualClock::default()));
    let spec = TrackerSpec::new("figures").with_granularity_bytes(granularity_bytes);
    set.add(spec).expect("add tracker");
    set
}

/// Marks `writes` random 4 KiB writes.
fn random_writes(set: &TrackerSet, writes: u64, seed: u64) {
    let mut prng = Prng::new(seed);
    let pages = set.disk_bytes() / 4096;
    for _ in 0..writes {
        set.mark_range(prng.below(pages) * 4096, 4096);
    }
}

#[test]
#[ignore = "figures: cargo test --release --lib sparse_figures -- --ignored --nocapture"]
fn sparse_figures() {
    // Goal: print the memory, sweep and save/load figures of issue 11. Method: build the
    // trackers, measure with allocated_bytes (heap held by bitmap and heat) and VmRSS, time
    // the operations once (run alone, in release).
    const TIB: u64 = 1 << 40;
    let too_big = Tracker::new(
        TrackerSpec::new("t").with_granularity_bytes(4096),
        64 * TIB,
        Arc::new(ManualClock::default()),
    );
    println!(
        "64 TiB at 4 KiB (2^34 blocks): {}",
        too_big.expect_err("over MAX")
    );
    for (disk_bytes, granularity_bytes, label) in [
        (16 * TIB, 4096, "16 TiB at 4 KiB (2^32 blocks)"),
        (64 * TIB, 64 << 10, "64 TiB at 64 KiB (2^30 blocks)"),
        (256 << 30, 64 << 10, "256 GiB at 64 KiB (4 Mi blocks)"),
    ] {
        let rss_before = rss_bytes();
        let set = figure_set(disk_bytes, granularity_bytes);
        let tracker = set.get("figures").expect("tracker");
        let empty = tracker.allocated_bytes();
        random_writes(&set, 2048, 1);
        let after_2k = tracker.allocated_bytes();
        random_writes(&set, (1 << 20) - 2048, 2);
        let after_1m = tracker.allocated_bytes();
        let rss_after = rss_bytes();
        println!(
            "{label}: empty {empty} B; after 2k random 4 KiB writes {after_2k} B; after 1M \
             {after_1m} B (RSS +{} KiB)",
            rss_after.saturating_sub(rss_before) >> 10
        );
    }
    let disk_bytes = 64 * TIB;
    let set = figure_set(disk_bytes, 64 << 10);
    let tracker = set.get("figures").expect("tracker");
    random_writes(&set, 4096, 3);
    let dirty = tracker.dirty_count();
    let dir = tempfile::tempdir().expect("tempdir");
    let started = std::time::Instant::now();
    set.save(dir.path()).expect("save");
    let save = started.elapsed();
    let file_bytes = std::fs::metadata(dir.path().join("figures.tracker"))
        .expect("file")
        .len();
    let started = std::time::Instant::now();
    let restored = TrackerSet::restore(dir.path(), disk_bytes, Arc::new(ManualClock::default()))
        .expect("restore");
    let load = started.elapsed();
    assert_eq!(
        restored.get("figures").expect("restored").dirty_count(),
        dirty
    );
    let started = std::time::Instant::now();
    let taken = tracker.take_and_clear();
    let take = started.elapsed();
    let started = std::time::Instant::now();
    let again = tracker.take_and_clear();
    let take_empty = started.elapsed();
    assert_eq!((taken.count(), again.count()), (dirty, 0));
    println!(
        "64 TiB at 64 KiB, {dirty} dirty blocks: take_and_clear {take:?} (then empty: \
         {take_empty:?}), set {} B; save {save:?} ({file_bytes} B file), restore {load:?} \
         (includes the Active rewrite)",
        taken.allocated_bytes()
    );
}

#[test]
fn saved_heat_of_another_region_size_is_remapped_on_load() {
    // Goal: a file from a build with other heat regions (1 MiB where this build uses 4 MiB on
    // 256 GiB) loads with its heat on the same bytes, never misread. Method: save a tracker,
    // rewrite the file's heat shift (finer, then coarser), reseal, decode.
    use super::persist::{decode, encode, FileState};
    let disk_bytes = 256 << 30;
    let clock: Arc<dyn Clock> = Arc::new(ManualClock::default());
    let spec = TrackerSpec::new("remap-me").with_granularity_bytes(GRANULARITY_BYTES);
    let tracker = Tracker::new(spec, disk_bytes, clock).expect("tracker");
    assert_eq!(tracker.heat_shift(), 10, "4 MiB regions on 256 GiB");
    tracker.mark_range(9 << 20, 4096); // 4 MiB region 2
    let bytes = encode(&tracker, FileState::Clean);
    let name_at = bytes
        .windows(8)
        .position(|window| window == b"remap-me")
        .expect("name in the file");
    // After the name: the recovered bound (8 bytes), then the heat shift.
    let shift_at = name_at + 8 + 8;
    let path = std::path::Path::new("remap-me.tracker");
    for (file_shift, expected) in [
        (10u32, vec![(2, 1)]),
        (8, vec![(0, 1)]),
        (11, vec![(4, 1), (5, 1)]),
    ] {
        let mut edited = bytes.clone();
        edited[shift_at..shift_at + 4].copy_from_slice(&file_shift.to_le_bytes());
        let body_len = edited.len() - 4;
        let checksum = crc32c::crc32c(&edited[..body_len]);
        edited[body_len..].copy_from_slice(&checksum.to_le_bytes());
        let saved = decode(path, &edited).expect("decode");
        assert_eq!(saved.heat, expected, "file shift {file_shift}");
    }
}
