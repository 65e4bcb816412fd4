//! Fair sharing between the agent's concurrent jobs (a batch's, seed catch-ups): while two
//! or more jobs copy at once they compete for the same source disk and, often, the same
//! link; without a rule the one that happens to queue deeper takes most of it. Each window
//! ([`WINDOW_NS`]) the jobs' measured rates are summed, and every job is capped at its
//! weighted share of that total plus [`HEADROOM_PCT`]: a job above its share is held back
//! so the others get room, and the caps together leave room to grow, so the total is never
//! pushed down (a job slower for its own reasons simply stays under its cap).
//!
//! A window in which fewer than two jobs sent but another seated job sent lately (within
//! [`IDLE_WINDOWS_HELD`] windows: it was syncing or planning) keeps the caps it had.
//!
//! Invariants: [`fair_caps`] is pure; a job alone at the table, or the only one that sent
//! for longer than [`IDLE_WINDOWS_HELD`] windows, is never capped; a job's share is measured
//! (bytes it sent in the windows it shared), never assumed; a seat leaves the table when
//! dropped, whatever ended the job.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Shortest window the shares are judged over.
pub const WINDOW_NS: u64 = 250_000_000;
/// How far above its share a job may go (percent): room for the total to grow.
pub const HEADROOM_PCT: u64 = 10;

/// Windows a seated job may send nothing (a sync, a pass's planning) and still count as
/// sharing: while it does, the caps of the last shared window stay, so a job that paused
/// for a moment does not leave the others uncapped for a window (1 s).
pub const IDLE_WINDOWS_HELD: u32 = 4;

/// Each job's cap for the next window, from `(weight, bytes/s)` of the jobs that sent in
/// the last one: `None` (uncapped) when fewer than two did.
pub fn fair_caps(rates: &[(u32, f64)]) -> Vec<Option<u64>> {
    let active = rates.iter().filter(|(_, rate)| *rate > 0.0).count();
    if active < 2 {
        return vec![None; rates.len()];
    }
    let total: f64 = rates.iter().map(|(_, rate)| rate.max(0.0)).sum();
    let weights: f64 = rates
        .iter()
        .map(|(weight, _)| f64::from((*weight).max(1)))
        .sum();
    rates
        .iter()
        .map(|(weight, _)| {
            let share = total * f64::from((*weight).max(1)) / weights;
            Some((share * (100 + HEADROOM_PCT) as f64 / 100.0) as u64)
        })
        .collect()
}

/// One job's place at the table.
#[derive(Debug, Default, Clone)]
struct Entry {
    weight: u32,
    /// Bytes sent in the current window.
    window_bytes: u64,
    cap: Option<u64>,
    /// Bytes sent in windows shared with other jobs, and the total of all jobs in those.
    shared_bytes: u64,
    shared_total: u64,
    /// The most jobs it shared a window with (itself included).
    most_jobs: u32,
    /// Windows in a row in which it sent nothing.
    idle_windows: u32,
}

#[derive(Debug, Default)]
struct Table {
    entries: BTreeMap<u64, Entry>,
    window_start_ns: Option<u64>,
}

/// The agent's table of copying jobs.
#[derive(Debug, Default)]
pub struct FairShare {
    table: Mutex<Table>,
}

/// What a job's share came to.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ShareStatus {
    /// Its bytes over all jobs' bytes, in the windows it shared (percent).
    pub pct: f64,
    /// The most jobs copying at once beside it, itself included.
    pub jobs: u32,
}

impl FairShare {
    /// Seats job `job_id` with `weight` (1 is an equal share).
    pub fn join(self: &Arc<Self>, job_id: u64, weight: u32) -> FairSeat {
        self.lock().entries.insert(
            job_id,
            Entry {
                weight: weight.max(1),
                ..Entry::default()
            },
        );
        FairSeat {
            table: Arc::clone(self),
            job_id,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Table {
    /// Closes the window at `now_ns` if it is due: measures, sets the caps, starts anew.
    fn close_window(&mut self, now_ns: u64) {
        let start_ns = *self.window_start_ns.get_or_insert(now_ns);
        let elapsed_ns = now_ns.saturating_sub(start_ns);
        if elapsed_ns < WINDOW_NS {
            return;
        }
        let seconds = elapsed_ns as f64 / 1e9;
        let rates: Vec<(u32, f64)> = self
            .entries
            .values()
            .map(|entry| (entry.weight, entry.window_bytes as f64 / seconds))
            .collect();
        let total: u64 = self.entries.values().map(|entry| entry.window_bytes).sum();
        let sending = self.entries.values().filter(|e| e.window_bytes > 0).count() as u32;
        for entry in self.entries.values_mut() {
            entry.idle_windows = if entry.window_bytes > 0 {
                0
            } else {
                entry.idle_windows.saturating_add(1)
            };
        }
        let sharing = self
            .entries
            .values()
            .filter(|e| e.idle_windows <= IDLE_WINDOWS_HELD)
            .count();
        // Fewer than two sent but more are still at it: the last shares hold (the measured
        // total of a window one job sat out says nothing of the shares).
        let hold = sending < 2 && sharing >= 2;
        let caps = fair_caps(&rates);
        for (entry, cap) in self.entries.values_mut().zip(caps) {
            if sending >= 2 && entry.window_bytes > 0 {
                entry.shared_bytes += entry.window_bytes;
                entry.shared_total += total;
                entry.most_jobs = entry.most_jobs.max(sending);
            }
            if !hold {
                entry.cap = cap;
            }
            entry.window_bytes = 0;
        }
        self.window_start_ns = Some(now_ns);
    }
}

/// A job's seat: it reports what it sent and reads its cap; it leaves when dropped.
#[derive(Debug)]
pub struct FairSeat {
    table: Arc<FairShare>,
    job_id: u64,
}

impl FairSeat {
    /// The job sent `bytes`, the send ending at `now_ns`.
    pub fn sent(&self, bytes: u64, now_ns: u64) {
        let mut table = self.table.lock();
        if let Some(entry) = table.entries.get_mut(&self.job_id) {
            entry.window_bytes += bytes;
        }
        table.close_window(now_ns);
    }

    /// The job's cap for its next send (None: uncapped).
    pub fn cap(&self) -> Option<u64> {
        self.table.lock().entries.get(&self.job_id)?.cap
    }

    /// Its share so far, once it shared a window with another job.
    pub fn share(&self) -> Option<ShareStatus> {
        let table = self.table.lock();
        let entry = table.entries.get(&self.job_id)?;
        (entry.shared_total > 0).then(|| ShareStatus {
            pct: entry.shared_bytes as f64 * 100.0 / entry.shared_total as f64,
            jobs: entry.most_jobs,
        })
    }
}

impl Drop for FairSeat {
    fn drop(&mut self) {
        self.table.lock().entries.remove(&self.job_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a lone job is free; two or more are capped at their weighted share of the
    // total plus the headroom. Method: a table of rates.
    #[test]
    fn caps_are_weighted_shares_of_the_total() {
        assert_eq!(fair_caps(&[(1, 500.0)]), [None]);
        assert_eq!(fair_caps(&[(1, 500.0), (1, 0.0)]), [None, None]);
        assert_eq!(fair_caps(&[(1, 300.0), (1, 100.0)]), [Some(220), Some(220)]);
        assert_eq!(fair_caps(&[(3, 300.0), (1, 100.0)]), [Some(330), Some(110)]);
    }

    // Goal: a window in which one of two jobs sent nothing (it synced) keeps the last
    // caps; once it has sent nothing for longer than IDLE_WINDOWS_HELD windows, the other
    // goes uncapped. Method: two seats, one shared window, then the light job goes quiet.
    #[test]
    fn a_job_pausing_briefly_keeps_the_caps() {
        let share = Arc::new(FairShare::default());
        let (heavy, light) = (share.join(1, 3), share.join(2, 1));
        light.sent(0, 0); // the table's first window opens at 0
        let mut now = WINDOW_NS;
        light.sent(100, now - 1);
        heavy.sent(300, now);
        let (heavy_cap, light_cap) = (heavy.cap(), light.cap());
        assert!(heavy_cap.is_some() && light_cap.is_some());
        for _ in 0..IDLE_WINDOWS_HELD {
            now += WINDOW_NS;
            heavy.sent(300, now);
            assert_eq!((heavy.cap(), light.cap()), (heavy_cap, light_cap));
        }
        now += WINDOW_NS;
        heavy.sent(300, now);
        assert_eq!(
            heavy.cap(),
            None,
            "the other job is gone quiet: no share to keep"
        );
    }

    // Goal: a greedy job held back gives the others room until the shares are even, and
    // the total is not pushed down. Method: a disk of 400 units/s that two jobs share in
    // proportion to how hard they push (the greedy one twice as hard), the caps applied
    // window after window through the table.
    #[test]
    fn a_greedy_job_is_brought_to_an_even_share() {
        let share = Arc::new(FairShare::default());
        let (greedy, modest) = (share.join(1, 1), share.join(2, 1));
        let mut now = 0;
        let (mut last_greedy, mut last_modest) = (0.0, 0.0);
        for _ in 0..40 {
            // Demand: the greedy job pushes 2 units for the modest one's 1, up to its cap.
            let want_greedy = greedy.cap().map_or(f64::MAX, |c| c as f64);
            let want_modest = modest.cap().map_or(f64::MAX, |c| c as f64);
            let mut rate_greedy = 400.0 * 2.0 / 3.0;
            let mut rate_modest = 400.0 / 3.0;
            if rate_greedy > want_greedy {
                rate_greedy = want_greedy;
                rate_modest = (400.0 - rate_greedy).min(want_modest);
            }
            now += WINDOW_NS;
            // Both sends land in the window; the later one closes it.
            modest.sent((rate_modest / 4.0) as u64, now - 1);
            greedy.sent((rate_greedy / 4.0) as u64, now);
            (last_greedy, last_modest) = (rate_greedy, rate_modest);
        }
        let total = last_greedy + last_modest;
        assert!(total >= 390.0, "total pushed down to {total}");
        let gap = (last_greedy - last_modest).abs() / total;
        assert!(gap < 0.2, "greedy {last_greedy}, modest {last_modest}");
        let status = greedy.share().expect("shared");
        assert_eq!(status.jobs, 2);
        drop(greedy);
        assert_eq!(share.lock().entries.len(), 1, "a dropped seat leaves");
    }
}
