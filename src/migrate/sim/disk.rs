//! The disk the simulated guest and copy share ([`super::SimOptions::disk_bytes_per_s`]).
//!
//! Model: the copy runs at the least of the link's bandwidth, its cap, and what the guest
//! leaves of the disk (at most [`MAX_UTILISATION_PCT`] of it in all); a guest write's latency
//! is its base latency stretched by the disk's utilisation, `base / (1 − u)` (a queue's
//! growth), with the copy's current rate in `u`. The latencies of a window feed the copy
//! controller as the export's histogram does in production.

use crate::migrate::steer::GuestWindow;

/// The disk is never busier than this (percent): latency stays finite.
pub const MAX_UTILISATION_PCT: u64 = 95;

/// The shared disk's state; see the module docs.
#[derive(Debug, Clone)]
pub struct SharedDisk {
    bytes_per_s: u64,
    guest_bytes_per_s: u64,
    base_latency_us: u64,
    /// The copy's rate while a send runs, 0 between sends.
    copy_bytes_per_s: u64,
    cap_bytes_per_s: Option<u64>,
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
            bytes_per_s,
            guest_bytes_per_s,
            base_latency_us: base_latency_us.max(1),
            copy_bytes_per_s: 0,
            cap_bytes_per_s: None,
            window_us: Vec::new(),
            p99_log_us: Vec::new(),
        }
    }

    /// The copy's cap from now on.
    pub fn set_cap(&mut self, cap_bytes_per_s: Option<u64>) {
        self.cap_bytes_per_s = cap_bytes_per_s;
    }

    /// The rate a send runs at over a link of `link_bytes_per_s`; the send is on from now.
    pub fn start_send(&mut self, link_bytes_per_s: u64) -> u64 {
        let room = (self.bytes_per_s * MAX_UTILISATION_PCT / 100)
            .saturating_sub(self.guest_bytes_per_s)
            .max(1);
        let rate = link_bytes_per_s
            .min(self.cap_bytes_per_s.unwrap_or(u64::MAX))
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
        let utilisation_pct = (busy * 100 / self.bytes_per_s.max(1)).min(MAX_UTILISATION_PCT);
        let latency_us = self.base_latency_us * 100 / (100 - utilisation_pct);
        self.window_us.push(latency_us);
    }

    /// The writes since the previous call: their count and p99.
    pub fn take_window(&mut self) -> GuestWindow {
        let mut window = std::mem::take(&mut self.window_us);
        window.sort_unstable();
        let ops = window.len() as u64;
        let p99_us = match window.len() {
            0 => 0,
            len => window[(len * 99).div_ceil(100) - 1],
        };
        self.p99_log_us.push(p99_us);
        GuestWindow { ops, p99_us }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the model's two rules. Method: an idle disk, then a send at full speed and at a
    // cap, with the latency each gives.
    #[test]
    fn the_copy_takes_what_the_guest_leaves_and_slows_it() {
        let mut disk = SharedDisk::new(100, 10, 200);
        disk.record_write();
        assert_eq!(
            disk.take_window(),
            GuestWindow {
                ops: 1,
                p99_us: 222
            }
        );
        assert_eq!(
            disk.start_send(1000),
            85,
            "95% of the disk less the guest's 10"
        );
        disk.record_write();
        assert_eq!(
            disk.take_window().p99_us,
            4000,
            "95% busy: 20 times the base"
        );
        disk.end_send();
        disk.set_cap(Some(40));
        assert_eq!(disk.start_send(1000), 40);
        disk.record_write();
        assert_eq!(disk.take_window().p99_us, 400, "50% busy: twice the base");
    }
}
