//! Benchmarks of the write-tracking hot paths.
//!
//! - `mark`: one 4 KiB write recorded in a tracker (bitmap `fetch_or` + heat update + clock
//!   read), and the bare bitmap `mark`, from 1 and 2 threads over random blocks of a 1 TiB
//!   disk at 64 KiB granularity (16M blocks).
//! - `sweep`: a copier pass over the same 16M blocks: bare `take_word` over every word, and
//!   `Tracker::take_and_clear` (which also builds the `DirtySet`).
//! - `tracker_set`: `TrackerSet::mark_range` for one 4 KiB write with 0, 1 and 4 trackers.
//! - `mark_chunk`: the bare bitmap `mark` into a chunk that exists (hot) and into a fresh one
//!   (cold: the first mark allocates the chunk and installs it).
//! - `take_and_clear`: a 64 TiB disk at 64 KiB (2^30 blocks) with 4096 random dirty blocks
//!   (sparse), and 1 TiB at 64 KiB with every other block dirty (dense, 8M blocks).

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use ferry::dirty::bitmap::CHUNK_WORDS;
use ferry::dirty::{DirtyBitmap, Tracker, TrackerSet, TrackerSpec};
use ferry::env::{Clock, MonotonicClock};

const TIB: u64 = 1 << 40;
const GRANULARITY_BYTES: u64 = 64 << 10;
const WRITE_BYTES: u64 = 4096;

/// Pseudo-random 4 KiB-aligned write offsets on a disk of `disk_bytes` (xorshift64).
fn offsets(disk_bytes: u64, count: usize, seed: u64) -> Vec<u64> {
    let mut state = seed | 1;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % (disk_bytes / WRITE_BYTES)) * WRITE_BYTES
        })
        .collect()
}

/// Criterion's iteration count as a `take` bound.
fn count(iters: u64) -> usize {
    usize::try_from(iters).expect("iteration count fits in usize")
}

/// Runs `work(thread, iters)` on `threads` threads started together; returns the wall time.
fn timed_threads(threads: u64, iters: u64, work: &(dyn Fn(u64, u64) + Sync)) -> Duration {
    let barrier = Barrier::new(usize::try_from(threads).expect("few threads") + 1);
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let barrier = &barrier;
            scope.spawn(move || {
                barrier.wait();
                work(thread, iters);
            });
        }
        barrier.wait();
        Instant::now()
    })
    .elapsed()
}

fn bench_mark(c: &mut Criterion) {
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
    let spec = TrackerSpec::new("bench").with_granularity_bytes(GRANULARITY_BYTES);
    let tracker = Tracker::new(spec, TIB, clock).expect("tracker");
    let bitmap = DirtyBitmap::new(TIB / GRANULARITY_BYTES);
    let per_thread: Vec<Vec<u64>> = (0..2).map(|t| offsets(TIB, 1 << 16, 0x5eed + t)).collect();
    let mut group = c.benchmark_group("mark");
    for threads in [1u64, 2] {
        group.bench_function(BenchmarkId::new("tracker_mark_range_4k", threads), |b| {
            b.iter_custom(|iters| {
                timed_threads(threads, iters, &|thread, iters| {
                    let offsets = &per_thread[usize::try_from(thread).expect("thread")];
                    for &offset_bytes in offsets.iter().cycle().take(count(iters)) {
                        tracker.mark_range(black_box(offset_bytes), WRITE_BYTES);
                    }
                })
            });
        });
        group.bench_function(BenchmarkId::new("bitmap_mark", threads), |b| {
            b.iter_custom(|iters| {
                timed_threads(threads, iters, &|thread, iters| {
                    let offsets = &per_thread[usize::try_from(thread).expect("thread")];
                    for &offset_bytes in offsets.iter().cycle().take(count(iters)) {
                        bitmap.mark(black_box(offset_bytes / GRANULARITY_BYTES));
                    }
                })
            });
        });
    }
    group.finish();
}

fn bench_sweep(c: &mut Criterion) {
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
    let spec = TrackerSpec::new("bench").with_granularity_bytes(GRANULARITY_BYTES);
    let tracker = Tracker::new(spec, TIB, clock).expect("tracker");
    let bitmap = DirtyBitmap::new(TIB / GRANULARITY_BYTES);
    let dirty = offsets(TIB, 1 << 16, 7);
    let mut group = c.benchmark_group("sweep_1tib_64k");
    group.sample_size(10);
    // Each pass re-dirties 64K random blocks first (not timed), so the sweep sees real bits.
    group.bench_function("bitmap_take_word", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                dirty
                    .iter()
                    .for_each(|&o| bitmap.mark(o / GRANULARITY_BYTES));
                let start = Instant::now();
                let mut found = 0u64;
                for word in 0..bitmap.word_count() {
                    found += u64::from(bitmap.take_word(word).count_ones());
                }
                total += start.elapsed();
                black_box(found);
            }
            total
        });
    });
    group.bench_function("tracker_take_and_clear", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                dirty
                    .iter()
                    .for_each(|&o| tracker.mark_range(o, WRITE_BYTES));
                let start = Instant::now();
                black_box(tracker.take_and_clear());
                total += start.elapsed();
            }
            total
        });
    });
    group.finish();
}

fn bench_tracker_set(c: &mut Criterion) {
    // 64 GiB keeps 4 trackers' heat arrays small (1M blocks each); the cost per write does
    // not depend on the disk size.
    let disk_bytes = 64 << 30;
    let offsets = offsets(disk_bytes, 1 << 16, 11);
    let mut group = c.benchmark_group("tracker_set_mark_range_4k");
    for trackers in [0, 1, 4] {
        let set = TrackerSet::new(disk_bytes, Arc::new(MonotonicClock::new()));
        for index in 0..trackers {
            let spec = TrackerSpec::new(format!("t{index}"));
            set.add(spec).expect("add tracker");
        }
        group.bench_function(BenchmarkId::from_parameter(trackers), |b| {
            let mut i = 0usize;
            b.iter(|| {
                i = (i + 1) & 0xffff;
                set.mark_range(black_box(offsets[i]), WRITE_BYTES);
            });
        });
    }
    group.finish();
}

fn bench_mark_chunk(c: &mut Criterion) {
    let mut group = c.benchmark_group("mark_chunk");
    let blocks = 1u64 << 32;
    // Marking the first block of chunk after chunk installs each one.
    let chunk_blocks = CHUNK_WORDS as u64 * 64;
    group.bench_function("hot", |b| {
        let bitmap = DirtyBitmap::new(blocks);
        bitmap.mark(0);
        let mut block = 0;
        b.iter(|| {
            block = (block + 1) & (chunk_blocks - 1);
            bitmap.mark(black_box(block));
        });
    });
    group.bench_function("cold", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let bitmap = DirtyBitmap::new(blocks);
                let batch = left.min(blocks / chunk_blocks);
                let start = Instant::now();
                for chunk in 0..batch {
                    bitmap.mark(black_box(chunk * chunk_blocks));
                }
                total += start.elapsed();
                left -= batch;
            }
            total
        });
    });
    group.finish();
}

/// Times `take_and_clear` on `tracker`, re-marking `dirty` (not timed) before each take.
fn time_takes(tracker: &Tracker, iters: u64, dirty: &dyn Fn(&Tracker)) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        dirty(tracker);
        let start = Instant::now();
        black_box(tracker.take_and_clear());
        total += start.elapsed();
    }
    total
}

fn bench_take_and_clear(c: &mut Criterion) {
    let mut group = c.benchmark_group("take_and_clear");
    group.sample_size(10);
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
    let disk_bytes = 64 * TIB;
    let spec = TrackerSpec::new("sparse").with_granularity_bytes(GRANULARITY_BYTES);
    let sparse = Tracker::new(spec, disk_bytes, Arc::clone(&clock)).expect("tracker");
    let dirty = offsets(disk_bytes, 4096, 13);
    group.bench_function("sparse_64tib_4k_dirty", |b| {
        b.iter_custom(|iters| {
            time_takes(&sparse, iters, &|t| {
                dirty.iter().for_each(|&o| t.mark_range(o, WRITE_BYTES));
            })
        });
    });
    let spec = TrackerSpec::new("dense").with_granularity_bytes(GRANULARITY_BYTES);
    let dense = Tracker::new(spec, TIB, clock).expect("tracker");
    group.bench_function("dense_1tib_every_other_block", |b| {
        b.iter_custom(|iters| {
            time_takes(&dense, iters, &|t| {
                (0..TIB / GRANULARITY_BYTES)
                    .step_by(2)
                    .for_each(|block| t.mark_range(block * GRANULARITY_BYTES, WRITE_BYTES));
            })
        });
    });
    group.finish();
}

criterion_group!(
    benches,
    bench_mark,
    bench_sweep,
    bench_tracker_set,
    bench_mark_chunk,
    bench_take_and_clear
);
criterion_main!(benches);
