//! Tracker memory at agent scale: 256 exports of 256 GiB (64 TiB), each with a 4 KiB and a
//! 64 KiB tracker, and 1M random 4 KiB writes spread uniformly over all of them.
//!
//! Prints the trackers' own count (`Tracker::allocated_bytes`), the process RSS growth
//! (VmRSS from /proc/self/status, so allocator overhead is included), and the time of one
//! `take_and_clear` per granularity. Run with `cargo run --release --example tracker_scale`.

use std::sync::Arc;
use std::time::Instant;

use ferry::dirty::{TrackerSet, TrackerSpec};
use ferry::env::{Clock, MonotonicClock};

const EXPORTS: u64 = 256;
const DISK_BYTES: u64 = 256 << 30;
const WRITES: u64 = 1 << 20;
const WRITE_BYTES: u64 = 4096;
const MIB: f64 = (1u64 << 20) as f64;

/// Resident set size of this process in bytes (Linux `VmRSS`).
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .expect("VmRSS line");
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|field| field.parse().ok())
        .expect("VmRSS in kB");
    kib << 10
}

/// xorshift64: a reproducible uniform stream without a dependency.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn main() {
    let rss_start = rss_bytes();
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::new());
    let sets: Vec<TrackerSet> = (0..EXPORTS)
        .map(|_| {
            let set = TrackerSet::new(DISK_BYTES, clock.clone());
            for (name, granularity_bytes) in [("fine", 4u64 << 10), ("coarse", 64 << 10)] {
                let spec = TrackerSpec::new(name).with_granularity_bytes(granularity_bytes);
                set.add(spec).expect("tracker");
            }
            set
        })
        .collect();
    let allocated = |sets: &[TrackerSet]| -> u64 {
        sets.iter()
            .flat_map(TrackerSet::list)
            .map(|tracker| tracker.allocated_bytes())
            .sum()
    };
    let empty_bytes = allocated(&sets);
    let mut state = 0x5eed_u64;
    let start = Instant::now();
    for _ in 0..WRITES {
        let export = next(&mut state) % EXPORTS;
        let offset_bytes = (next(&mut state) % (DISK_BYTES / WRITE_BYTES)) * WRITE_BYTES;
        sets[export as usize].mark_range(offset_bytes, WRITE_BYTES);
    }
    let mark_time = start.elapsed();
    let tracker_bytes = allocated(&sets);
    let rss_delta = rss_bytes().saturating_sub(rss_start);
    println!(
        "exports {EXPORTS} x {} GiB, 2 trackers each, {WRITES} random 4 KiB writes",
        DISK_BYTES >> 30
    );
    println!(
        "allocated_bytes empty:  {:9.1} MiB",
        empty_bytes as f64 / MIB
    );
    println!(
        "allocated_bytes after:  {:9.1} MiB",
        tracker_bytes as f64 / MIB
    );
    println!("RSS growth:             {:9.1} MiB", rss_delta as f64 / MIB);
    println!(
        "marking:                {:9.1} ms",
        mark_time.as_secs_f64() * 1e3
    );
    for tracker in sets[0].list() {
        let start = Instant::now();
        let taken = tracker.take_and_clear();
        println!(
            "take_and_clear {:>6} ({} KiB blocks): {:7.3} ms, {} blocks",
            tracker.name(),
            tracker.granularity_bytes() >> 10,
            start.elapsed().as_secs_f64() * 1e3,
            taken.count()
        );
    }
    let lost = TrackerSet::new(16 << 40, clock.clone());
    let tracker = lost
        .add(TrackerSpec::new("lost").with_granularity_bytes(4 << 10))
        .expect("tracker");
    let start = Instant::now();
    tracker.mark_lost();
    println!(
        "mark_lost 16 TiB @ 4 KiB: {:.1} MiB allocated, {:.1} ms",
        tracker.allocated_bytes() as f64 / MIB,
        start.elapsed().as_secs_f64() * 1e3
    );
}
