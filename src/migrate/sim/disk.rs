//! The disk the simulated guest and copy share ([`super::SimOptions::disk_bytes_per_s`]).
//!
//! Model, after what the benchmark's disk shows:
//! - The copy's rate is the least of the link's bandwidth, its gear's pace, what its reads
//!   give (`depth × chunk / (chunk / disk rate + READ_OVERHEAD_US)`), and what the guest
//!   leaves of the disk (at most [`MAX_UTILISATION_PCT`] of it in all).
//! - A guest write's latency is its base latency stretched by the disk's utilisation,
//!   `base / (1 − u)` (a queue's growth), plus, for the share of writes that arrive while
//!   the copy's reads occupy the disk (its busy share, spread evenly and deterministically),
//!   the time to serve the reads queued ahead (a quarter to all of `depth × chunk / disk
//!   rate`). So shorter and fewer reads cut the guest's p99 sharply, and pacing short reads
//!   cuts it little until the copy is slow.
//! - While mirroring, every guest write also waits for the destination: a fixed round trip
//!   ([`SharedDisk::set_round_trip_us`]) that no gear lowers.
//!
//! The latencies of a window feed the copy controller as the export's histogram does in
//! production.

use crate::migrate::steer::{Gear, GuestWindow, FASTEST};

/// The disk is never busier than this (percent): latency stays finite.
pub const MAX_UTILISATION_PCT: u64 = 95;
/// What each copy read costs besides its transfer (µs): submission, completion, the round
/// trip of a read at depth one.
pub const READ_OVERHEAD_US: u64 = 150;

/// The shared disk's state; see the module docs.
#[derive(Debug, Clone)]
pub struct SharedDisk {
    bytes_per_s: u64,
    guest_bytes_per_s: u64,
    base_latency_us: u64,
    /// The copy's rate while a send runs, 0 between sends.
    copy_bytes_per_s: u64,
    gear: Gear,
    /// What a mirrored write waits for at the destination, µs (0: not mirroring).
    round_trip_us: u64,
    /// The busy share accumulated since the last write that met the copy's reads.
    meet_credit: f64,
    meetings: u64,
    /// Guest write latencies (µs) of the current window.
    window_us: Vec<u64>,
    /// Each window's p99 (µs) as the controller saw it, for the tests.
    pub p99_log_us: Vec<u64>,
}

impl SharedDisk {
    /// A disk of `bytes_per_s`, with a guest writing `guest_bytes_per_s` at `base_latency_us`
    /// when the disk is idle.
    pub fn new(bytes_per_s: u64, guest_bytes_per_s: u64, base_latency_us: u64) -> Self {
        SharedDisk {
            bytes_per_s: bytes_per_s.max(1),
            guest_bytes_per_s,
            base_latency_us: base_latency_us.max(1),
            copy_bytes_per_s: 0,
            gear: FASTEST,
            round_trip_us: 0,
            meet_credit: 0.0,
            meetings: 0,
            window_us: Vec::new(),
            p99_log_us: Vec::new(),
        }
    }

    /// The copy's gear from now on.
    pub fn set_gear(&mut self, gear: Gear) {
        self.gear = gear;
    }

    /// Every guest write from now on also waits `round_trip_us` (mirroring; 0 when not).
    pub fn set_round_trip_us(&mut self, round_trip_us: u64) {
        self.round_trip_us = round_trip_us;
    }

    /// Time the disk takes to transfer `bytes` (µs).
    fn transfer_us(&self, bytes: u64) -> u64 {
        bytes.saturating_mul(1_000_000) / self.bytes_per_s
    }

    /// The rate a send runs at over a link of `link_bytes_per_s`; the send is on from now.
    pub fn start_send(&mut self, link_bytes_per_s: u64) -> u64 {
        let room = (self.bytes_per_s * MAX_UTILISATION_PCT / 100)
            .saturating_sub(self.guest_bytes_per_s)
            .max(1);
        let chunk = self.gear.chunk_bytes as u64;
        let reads = (self.gear.read_depth as u64 * chunk).saturating_mul(1_000_000)
            / (self.transfer_us(chunk) + READ_OVERHEAD_US).max(1);
        let rate = link_bytes_per_s
            .min(self.gear.cap_bytes_per_s.unwrap_or(u64::MAX))
            .min(reads)
            .min(room)
            .max(1);
        self.copy_bytes_per_s = rate;
        rate
    }

    /// The send is over.
    pub fn end_send(&mut self) {
        self.copy_bytes_per_s = 0;
    }

    /// A guest write completed now: its latency, as the disk's load makes it.
    pub fn record_write(&mut self) {
        let busy = self.guest_bytes_per_s + self.copy_bytes_per_s;
        let utilisation_pct = (busy * 100 / self.bytes_per_s).min(MAX_UTILISATION_PCT);
        let mut latency_us =
            self.base_latency_us * 100 / (100 - utilisation_pct) + self.round_trip_us;
        if self.copy_bytes_per_s > 0 {
            self.meet_credit += self.copy_bytes_per_s as f64 / self.bytes_per_s as f64;
            if self.meet_credit >= 1.0 {
                self.meet_credit -= 1.0;
                self.meetings += 1;
                let ahead_us =
                    self.transfer_us((self.gear.read_depth * self.gear.chunk_bytes) as u64);
                latency_us += ahead_us * (1 + self.meetings % 4) / 4;
            }
        }
        self.window_us.push(latency_us);
    }

    /// The writes since the previous take: their count and p99 (logged).
    pub fn take_window(&mut self) -> GuestWindow {
        let window = std::mem::take(&mut self.window_us);
        let summary = summarize(window);
        self.p99_log_us.push(summary.p99_us);
        summary
    }

    /// The writes since the previous take, the window left open.
    pub fn open_window(&self) -> GuestWindow {
        summarize(self.window_us.clone())
    }
}

/// The count and p99 of a window's write latencies.
fn summarize(mut window_us: Vec<u64>) -> GuestWindow {
    window_us.sort_unstable();
    let ops = window_us.len() as u64;
    let p99_us = match window_us.len() {
        0 => 0,
        len => window_us[(len * 99).div_ceil(100) - 1],
    };
    GuestWindow { ops, p99_us }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migrate::steer::GEARS;

    // Goal: the model's rules. Method: an idle disk, then sends in the fastest gear, in one
    // short read unpaced, and at the floor, with the rates and latencies each gives.
    #[test]
    fn the_copy_takes_what_its_reads_and_the_guest_leave_and_slows_it() {
        let mut disk = SharedDisk::new(100 << 20, 10 << 20, 200);
        disk.record_write();
        assert_eq!(
            disk.take_window(),
            GuestWindow {
                ops: 1,
                p99_us: 222
            }
        );
        assert_eq!(
            disk.start_send(u64::MAX),
            (95 - 10) << 20,
            "95% of the disk less the guest's 10"
        );
        for _ in 0..100 {
            disk.record_write();
        }
        let fastest = disk.take_window().p99_us;
        assert!(fastest > 80_000, "8 x 1 MiB ahead: {fastest}");
        disk.end_send();
        disk.set_gear(GEARS[4]);
        let rate = disk.start_send(u64::MAX);
        assert_eq!(
            rate,
            (64 << 10) * 1_000_000 / (625 + 150),
            "one 64 KiB read at a time"
        );
        for _ in 0..100 {
            disk.record_write();
        }
        let short = disk.take_window().p99_us;
        assert!((2_000..3_500).contains(&short), "{short}");
        disk.end_send();
        disk.set_gear(GEARS[7]);
        assert_eq!(disk.start_send(u64::MAX), 16 << 20);
        for _ in 0..100 {
            disk.record_write();
        }
        let floor = disk.take_window().p99_us;
        assert!(floor < short, "{floor} < {short}");
    }
}
