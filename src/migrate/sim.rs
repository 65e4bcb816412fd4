//! Deterministic simulation of a live migration: a [`MigrationEnv`] with a guest writer.
//!
//! Purpose: run [`super::run`] (the production algorithm) against a source and a destination
//! disk modelled as one version number per block, a guest writing with a Zipf-like skew, a
//! link with simulated bandwidth, per-send delays and failures, and the real
//! [`Tracker`] (dirty bits + heat) on a [`ManualClock`]. Everything comes from one seeded
//! [`SplitMix64`]; nothing reads real time, so a seed replays exactly (`SIM_SEED=N`).
//!
//! Model:
//! - Time moves only inside env calls (sends, holds, commits): guest writes due by then are
//!   applied, in order, at their completion time. A write is applied first and marked in the
//!   tracker after (DESIGN.md invariant 1), and acknowledged at once.
//! - `send` reads each block and delivers it at the same instant (the ordering the trait
//!   demands against mirrored writes), then spends the block's transfer time.
//! - While writes are held, writes issued after the hold wait in a queue (the guest blocks
//!   once it is full) and are applied, on the side authoritative then, at release.
//! - Mirroring applies a write to both sides; after the switch writes go to the destination
//!   only.
//!
//! Checks (DESIGN.md invariant 4): [`SimEnv::commit`] and [`SimEnv::switch_to_destination`]
//! panic unless the destination equals the source; [`SimEnv::check_switched`] and
//! [`SimEnv::check_source_authoritative`] compare the authoritative side with every
//! acknowledged write, and the source with its image at the switch.

use std::sync::Arc;

use super::steer::{Gear, GuestWindow};
use super::{MigrationEnv, Progress, SendOutcome};
use crate::dirty::{DirtySet, HeatSnapshot, Tracker, TrackerSpec};
use crate::env::{Clock, ManualClock};

pub use crate::prng::{seeds_from_env, SeedReport, SplitMix64};

mod disk;
pub use disk::SharedDisk;

/// Errors the simulated env injects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimError {
    /// The link failed mid-send, after `delivered` blocks arrived.
    #[error("simulated send failure after {delivered} blocks")]
    SendFailed {
        /// Blocks delivered before the failure.
        delivered: u64,
    },
    /// The destination refused the commit (and did not commit).
    #[error("simulated commit failure")]
    CommitFailed,
    /// The source could not start forwarding to the destination.
    #[error("simulated switch failure")]
    SwitchFailed,
}

/// The simulated world's parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct SimOptions {
    /// Blocks on the disk; a power of two (the skew permutation needs it).
    pub block_count: u64,
    /// Bytes per block.
    pub granularity_bytes: u64,
    /// Share of blocks holding data at the start, in percent.
    pub allocated_pct: u64,
    /// Link bandwidth for data blocks; zero blocks travel 16 times faster.
    pub bandwidth_bytes_per_s: u64,
    /// Each send first waits a uniform delay in `0..=send_delay_ns_max`.
    pub send_delay_ns_max: u64,
    /// Mean guest writes per second.
    pub write_rate_per_s: u64,
    /// Skew exponent: a write hits rank `N * u^skew` (u uniform); 1 is uniform.
    pub skew: u32,
    /// Time from a write's issue to its completion.
    pub write_latency_ns: u64,
    /// Chance that a send fails midway, per mille.
    pub send_fail_per_mille: u32,
    /// Chance that a commit fails, per mille.
    pub commit_fail_per_mille: u32,
    /// Chance that `switch_to_destination` fails (after the commit), per mille.
    pub switch_fail_per_mille: u32,
    /// Each hold waits a further uniform delay in `0..=hold_delay_ns_max` (slow in-flight
    /// writes draining).
    pub hold_delay_ns_max: u64,
    /// Time a commit takes at the destination.
    pub commit_ns: u64,
    /// Heat half-life of the tracker.
    pub half_life_ms: u64,
    /// Guest writes run this long before the migration starts (heat builds up).
    pub warmup_ms: u64,
    /// A disk the guest and the copy share, of this many bytes/s ([`SharedDisk`]): the
    /// guest's latency grows with the copy's rate, and is measured for the copy controller.
    /// 0: no such disk (the guest's latency is not measured, the copy not steered).
    pub disk_bytes_per_s: u64,
    /// While mirroring, each guest write on the shared disk also waits this long for the
    /// destination (the round trip and its write there), µs.
    pub mirror_round_trip_us: u64,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            block_count: 1024,
            granularity_bytes: 64 << 10,
            allocated_pct: 70,
            bandwidth_bytes_per_s: 50 << 20,
            send_delay_ns_max: 2_000_000,
            write_rate_per_s: 200,
            skew: 4,
            write_latency_ns: 100_000,
            send_fail_per_mille: 0,
            commit_fail_per_mille: 0,
            switch_fail_per_mille: 0,
            hold_delay_ns_max: 0,
            commit_ns: 1_000_000,
            half_life_ms: 10_000,
            warmup_ms: 20_000,
            disk_bytes_per_s: 0,
            mirror_round_trip_us: 0,
        }
    }
}

/// Writes a blocked guest may queue while writes are held.
const HELD_QUEUE_DEPTH: usize = 64;

/// The simulated source agent, link and destination; see the module docs.
#[derive(Debug)]
pub struct SimEnv {
    options: SimOptions,
    prng: SplitMix64,
    clock: Arc<ManualClock>,
    tracker: Tracker,
    /// Version of each block at the source (0: never written, reads as zeros).
    source: Vec<u64>,
    /// Version of each block at the destination.
    target: Vec<u64>,
    /// Latest version acknowledged to the guest, per block.
    acked: Vec<u64>,
    next_version: u64,
    next_write_ns: u64,
    held: bool,
    hold_start_ns: u64,
    queued: Vec<u64>,
    mirroring: bool,
    committed: bool,
    switched: bool,
    /// In-sync points recorded ([`MigrationEnv::mark_in_sync`]).
    in_sync_points: u32,
    source_at_switch: Vec<u64>,
    /// Guest writes acknowledged, total.
    pub writes_acked: u64,
    /// Progress samples received.
    pub progress_samples: u64,
    /// Errors injected so far.
    pub faults_injected: u64,
    /// The disk the guest and the copy share, if modelled.
    pub disk: Option<SharedDisk>,
    /// The copy's gears set while mirroring with the guest running, in order.
    pub mirror_gears: Vec<Gear>,
}

impl SimEnv {
    /// A world for `seed`; guest writes have already run for `options.warmup_ms`.
    pub fn new(seed: u64, options: SimOptions) -> Self {
        assert!(options.block_count.is_power_of_two(), "block_count");
        let clock = Arc::new(ManualClock::new(0));
        let disk_bytes = options.block_count * options.granularity_bytes;
        let spec = TrackerSpec::new("migrate")
            .with_granularity_bytes(options.granularity_bytes)
            .with_half_life_ms(options.half_life_ms);
        let shared: Arc<dyn Clock> = clock.clone();
        let tracker = Tracker::new(spec, disk_bytes, shared).expect("valid sim tracker");
        let block_count = usize::try_from(options.block_count).expect("sim disk fits");
        let mut env = Self {
            prng: SplitMix64::new(seed),
            clock,
            tracker,
            source: vec![0; block_count],
            target: vec![0; block_count],
            acked: vec![0; block_count],
            next_version: 1,
            next_write_ns: 0,
            held: false,
            hold_start_ns: 0,
            queued: Vec::new(),
            mirroring: false,
            committed: false,
            in_sync_points: 0,
            switched: false,
            source_at_switch: Vec::new(),
            writes_acked: 0,
            progress_samples: 0,
            faults_injected: 0,
            disk: (options.disk_bytes_per_s > 0).then(|| {
                let guest_bytes_per_s = options.write_rate_per_s * options.granularity_bytes;
                let base_us = options.write_latency_ns / 1000;
                SharedDisk::new(options.disk_bytes_per_s, guest_bytes_per_s, base_us)
            }),
            mirror_gears: Vec::new(),
            options,
        };
        for block in 0..block_count {
            if env.prng.below(100) < env.options.allocated_pct {
                env.source[block] = env.next_version;
                env.acked[block] = env.next_version;
                env.next_version += 1;
            }
        }
        env.schedule_next_write();
        let warmup_ns = env.options.warmup_ms * 1_000_000;
        env.advance_to(warmup_ns);
        env
    }

    /// Whether guest writes are held now.
    pub fn writes_held(&self) -> bool {
        self.held
    }

    /// Changes the commit failure rate (a fault that heals).
    pub fn set_commit_fail_per_mille(&mut self, per_mille: u32) {
        self.options.commit_fail_per_mille = per_mille;
    }

    /// Whether the destination is authoritative (the run switched over).
    pub fn switched(&self) -> bool {
        self.switched
    }

    /// In-sync points recorded so far.
    pub fn in_sync_points(&self) -> u32 {
        self.in_sync_points
    }

    /// Lets the guest write for `duration_ms` more (between runs, or after the switch).
    pub fn run_guest_ms(&mut self, duration_ms: u64) {
        let target_ns = self.clock.now_ns() + duration_ms * 1_000_000;
        self.advance_to(target_ns);
    }

    /// After a switch: the destination holds every acknowledged write, and no write landed
    /// on the source after the switch.
    pub fn check_switched(&self) {
        assert!(self.switched, "not switched");
        assert!(!self.held, "writes still held after switch");
        for (block, &acked) in self.acked.iter().enumerate() {
            assert_eq!(self.target[block], acked, "block {block}: acked write lost");
        }
        assert!(
            self.source == self.source_at_switch,
            "write on source after switch"
        );
    }

    /// After a failed run: the source is authoritative, holds every acknowledged write, and
    /// nothing is held or mirrored.
    pub fn check_source_authoritative(&self) {
        assert!(!self.switched, "switched although the run failed");
        assert!(!self.held, "writes still held after a failed run");
        assert!(!self.mirroring, "still mirroring after a failed run");
        for (block, &acked) in self.acked.iter().enumerate() {
            assert_eq!(self.source[block], acked, "block {block}: acked write lost");
        }
    }

    /// What a guest write waits for at the destination: the round trip while mirroring.
    fn set_round_trip(&mut self) {
        let round_trip_us = if self.mirroring {
            self.options.mirror_round_trip_us
        } else {
            0
        };
        if let Some(disk) = &mut self.disk {
            disk.set_round_trip_us(round_trip_us);
        }
    }

    fn block_index(block: u64) -> usize {
        usize::try_from(block).expect("sim block fits")
    }

    fn schedule_next_write(&mut self) {
        let rate = self.options.write_rate_per_s.max(1);
        self.next_write_ns += self.prng.below(2_000_000_000 / rate + 1);
    }

    /// A block drawn with the configured skew, hot ranks scattered over the disk.
    fn skewed_block(&mut self) -> u64 {
        let count = self.options.block_count;
        let rank_f = self.prng.unit().powi(self.options.skew as i32) * count as f64;
        let rank = (rank_f as u64).min(count - 1);
        rank.wrapping_mul(0x9E37_79B9_7F4A_7C15 | 1) & (count - 1)
    }

    /// Applies a guest write on the authoritative side(s), marks it, acknowledges it.
    fn apply_write(&mut self, block: u64) {
        let index = Self::block_index(block);
        let version = self.next_version;
        self.next_version += 1;
        if self.switched {
            self.target[index] = version;
        } else {
            self.source[index] = version;
            if self.mirroring {
                self.target[index] = version;
            }
            // After the write completed (invariant 1).
            let granularity_bytes = self.options.granularity_bytes;
            self.tracker.mark_range_at(
                block * granularity_bytes,
                granularity_bytes,
                self.clock.now_ns(),
            );
        }
        self.acked[index] = version;
        self.writes_acked += 1;
        if let Some(disk) = &mut self.disk {
            disk.record_write();
        }
    }

    /// Moves time to `target_ns`, applying (or queueing, if held) the guest writes due.
    fn advance_to(&mut self, target_ns: u64) {
        let latency_ns = self.options.write_latency_ns;
        while self.next_write_ns + latency_ns <= target_ns {
            let issue_ns = self.next_write_ns;
            let block = self.skewed_block();
            self.schedule_next_write();
            if self.held && issue_ns >= self.hold_start_ns {
                if self.queued.len() < HELD_QUEUE_DEPTH {
                    self.queued.push(block); // waits, unacknowledged
                }
                continue;
            }
            self.clock
                .set_ns(self.clock.now_ns().max(issue_ns + latency_ns));
            self.apply_write(block);
        }
        self.clock.set_ns(self.clock.now_ns().max(target_ns));
    }

    fn check_sides_equal(&self, at: &str) {
        for (block, (&source, &target)) in self.source.iter().zip(&self.target).enumerate() {
            assert_eq!(source, target, "{at}: block {block} differs");
        }
    }

    /// Delivers `blocks` at `rate` bytes/s (zero blocks 16 times faster), failing after
    /// `fail_after` of them if given.
    fn send_blocks(
        &mut self,
        blocks: &DirtySet,
        fail_after: Option<u64>,
        rate: u64,
    ) -> Result<SendOutcome, SimError> {
        let data_block_ns = self.options.granularity_bytes * 1_000_000_000 / rate.max(1);
        let mut outcome = SendOutcome::default();
        for (delivered, block) in (0u64..).zip(blocks.iter_blocks()) {
            if fail_after == Some(delivered) {
                self.faults_injected += 1;
                return Err(SimError::SendFailed { delivered });
            }
            let index = Self::block_index(block);
            let version = self.source[index];
            self.target[index] = version; // read and delivered at one instant
            let block_ns = if version == 0 {
                outcome.bytes_zero += self.options.granularity_bytes;
                data_block_ns / 16
            } else {
                outcome.bytes_data += self.options.granularity_bytes;
                data_block_ns
            };
            let now_ns = self.clock.now_ns();
            self.advance_to(now_ns + block_ns);
        }
        Ok(outcome)
    }

    /// Holds writes: those issued from now on wait; in-flight ones complete first.
    fn hold(&mut self) -> Result<(), SimError> {
        self.held = true;
        self.hold_start_ns = self.clock.now_ns();
        while self.next_write_ns < self.hold_start_ns {
            let complete_ns = self.next_write_ns + self.options.write_latency_ns;
            self.advance_to(complete_ns);
        }
        let delay_ns = self.prng.below(self.options.hold_delay_ns_max + 1);
        let now_ns = self.clock.now_ns();
        self.advance_to(now_ns + delay_ns);
        Ok(())
    }
}

impl MigrationEnv for SimEnv {
    type Error = SimError;

    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    fn granularity_bytes(&self) -> u64 {
        self.options.granularity_bytes
    }

    fn disk_bytes(&self) -> u64 {
        self.tracker.disk_bytes()
    }

    fn allocated(&mut self) -> Result<DirtySet, SimError> {
        let mut set = DirtySet::empty(self.options.granularity_bytes, self.disk_bytes());
        for (block, &version) in (0u64..).zip(&self.source) {
            if version != 0 {
                set.insert(block);
            }
        }
        Ok(set)
    }

    fn take_dirty(&mut self) -> DirtySet {
        self.tracker.take_and_clear()
    }

    fn merge_dirty(&mut self, set: &DirtySet) {
        self.tracker.merge(set);
    }

    fn dirty_count(&self) -> u64 {
        self.tracker.dirty_count()
    }

    fn heat_snapshot(&self) -> HeatSnapshot {
        self.tracker.heat_snapshot()
    }

    fn send(&mut self, blocks: &DirtySet) -> Result<SendOutcome, SimError> {
        assert!(!self.switched, "send after the switch");
        let start_ns = self.clock.now_ns();
        let fail_after = if self.prng.chance(self.options.send_fail_per_mille) {
            Some(self.prng.below(blocks.count().max(1)))
        } else {
            None
        };
        let delay_ns = self.prng.below(self.options.send_delay_ns_max + 1);
        self.advance_to(start_ns + delay_ns);
        let link_bytes_per_s = self.options.bandwidth_bytes_per_s;
        let rate = match &mut self.disk {
            Some(disk) => disk.start_send(link_bytes_per_s),
            None => link_bytes_per_s,
        };
        let outcome = self.send_blocks(blocks, fail_after, rate);
        if let Some(disk) = &mut self.disk {
            disk.end_send();
        }
        let mut outcome = outcome?;
        outcome.elapsed_ns = self.clock.now_ns() - start_ns;
        Ok(outcome)
    }

    fn hold_writes(&mut self) -> Result<(), SimError> {
        self.hold()
    }

    fn guest_window(&mut self, close: bool) -> Option<GuestWindow> {
        let disk = self.disk.as_mut()?;
        Some(if close {
            disk.take_window()
        } else {
            disk.open_window()
        })
    }

    fn set_copy_gear(&mut self, gear: Gear) {
        if self.mirroring && !self.held {
            self.mirror_gears.push(gear);
        }
        if let Some(disk) = &mut self.disk {
            disk.set_gear(gear);
        }
    }
    fn release_writes(&mut self) {
        if !self.held {
            return;
        }
        self.held = false;
        for block in std::mem::take(&mut self.queued) {
            self.apply_write(block);
        }
    }

    fn commit(&mut self) -> Result<(), SimError> {
        assert!(self.held, "commit without held writes");
        let now_ns = self.clock.now_ns();
        self.advance_to(now_ns + self.options.commit_ns);
        if self.prng.chance(self.options.commit_fail_per_mille) {
            self.faults_injected += 1;
            return Err(SimError::CommitFailed);
        }
        self.check_sides_equal("commit");
        self.committed = true;
        Ok(())
    }

    fn mark_in_sync(&mut self) -> Result<(), SimError> {
        assert!(self.held, "in-sync point without held writes");
        let now_ns = self.clock.now_ns();
        self.advance_to(now_ns + self.options.commit_ns);
        if self.prng.chance(self.options.commit_fail_per_mille) {
            self.faults_injected += 1;
            return Err(SimError::CommitFailed);
        }
        self.check_sides_equal("in-sync point");
        self.in_sync_points += 1;
        Ok(())
    }

    fn switch_to_destination(&mut self) -> Result<(), SimError> {
        assert!(self.held, "switch without held writes");
        assert!(self.committed, "switch before commit");
        self.check_sides_equal("switch");
        if self.prng.chance(self.options.switch_fail_per_mille) {
            self.faults_injected += 1;
            return Err(SimError::SwitchFailed);
        }
        self.switched = true;
        self.mirroring = false;
        self.set_round_trip();
        self.source_at_switch = self.source.clone();
        Ok(())
    }

    fn start_mirroring(&mut self) -> Result<(), SimError> {
        self.mirroring = true;
        self.set_round_trip();
        Ok(())
    }

    fn stop_mirroring(&mut self) {
        self.mirroring = false;
        self.set_round_trip();
    }

    fn progress(&mut self, _progress: &Progress) {
        self.progress_samples += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_deterministic_and_spread() {
        // Goal: seeds replay. Method: two generators, same seed, same stream; below() in range.
        let (mut left, mut right) = (SplitMix64::new(7), SplitMix64::new(7));
        for _ in 0..100 {
            assert_eq!(left.next_u64(), right.next_u64());
            assert!(left.below(10) < 10);
            right.below(10);
            let unit = left.unit();
            right.unit();
            assert!((0.0..1.0).contains(&unit));
        }
    }

    #[test]
    fn guest_writes_mark_after_apply_and_skew() {
        // Goal: the warm-up writes are applied, acked and marked, skewed toward few blocks.
        // Method: 2 s at 1000 writes/s, half-life 1 s; compare dirty bits with written
        // blocks; a few blocks are hot, most are not.
        let options = SimOptions {
            write_rate_per_s: 1000,
            half_life_ms: 1_000,
            warmup_ms: 2_000,
            ..SimOptions::default()
        };
        let env = SimEnv::new(3, options);
        assert!(env.writes_acked > 1500, "{}", env.writes_acked);
        let dirty = env.tracker.take_and_clear();
        for block in dirty.iter_blocks() {
            let index = SimEnv::block_index(block);
            assert_eq!(env.source[index], env.acked[index]);
        }
        // Heat is per 1 MiB region (16 blocks here), so a region sums its blocks' writes:
        // a few of the 64 regions stand out (heat 32 or more), most do not.
        let snapshot = env.heat_snapshot();
        let hot = snapshot.regions().filter(|&(_, heat)| heat >= 32).count();
        let all: Vec<(u64, u8)> = snapshot.regions().collect();
        assert!(hot > 0 && hot < 8, "hot regions: {hot} {all:?}");
    }
}
