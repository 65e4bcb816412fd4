//! The migration loop: passes, the hot-block decision, mirroring and the switchover.
//!
//! Purpose: one function, [`run`], that both the real job and the simulation call. It only
//! talks to a [`MigrationEnv`], reads time through it, and keeps no state across runs: what
//! must survive a failure lives in the tracker (dirty bits merged back).
//!
//! Invariants:
//! - Every taken block is either confirmed sent or merged back before `run` returns; a
//!   failed `send` merges back the whole unconfirmed rest of its set.
//! - The switchover decides with writes held, on the final set it just took: it sends only
//!   if the time already spent holding plus the pessimistic forecast fits `max_pause_ms`
//!   (or `force_after_ms` elapsed); otherwise it merges the set back, releases and defers.
//! - Before the commit every error releases writes and stops mirroring (source
//!   authoritative); after it, writes stay held and the error says the destination is
//!   authoritative.
//! - While mirroring, bits taken after the mirror pass come from mirrored writes, already on
//!   both sides; they are dropped, so the set to send only drains and the run converges.

use super::forecast::Forecast;
use super::policy::{split_hot, Ending, MigrateOptions, Policy};
use super::report::{MigrationReport, PassKind, PassReport};
use super::steer::{self, Bound, Steer};
use super::{MigrateError, MigrationEnv, Progress, Step};
use crate::dirty::set::WORD_BITS;
use crate::dirty::DirtySet;

/// Runs a migration to its switchover; see the module docs. On `Ok` the destination is
/// authoritative and the source forwards to it.
pub fn run<E: MigrationEnv>(
    env: &mut E,
    options: &MigrateOptions,
) -> Result<MigrationReport, MigrateError<E::Error>> {
    options.validate().map_err(MigrateError::Options)?;
    let mut migration = Migration::new(env, options);
    match migration.drive() {
        Ok(()) => Ok(migration.report),
        Err(err) => Err(migration.unwind(err)),
    }
}

/// State of one run.
struct Migration<'env, E: MigrationEnv> {
    env: &'env mut E,
    options: MigrateOptions,
    forecast: Forecast,
    report: MigrationReport,
    start_ns: u64,
    granularity_bytes: u64,
    /// Passes run so far (not counting final sends).
    passes: u32,
    mirroring: bool,
    /// Whether the blocks dirtied before mirroring started have been sent.
    mirror_drained: bool,
    writes_held: bool,
    /// Heat policy: still in the cold passes.
    cold_phase: bool,
    /// Heat policy: cold blocks sent by the previous cold pass.
    previous_cold_blocks: Option<u64>,
    /// Blocks this run merged back since the last take (not new guest writes).
    carried: DirtySet,
    last_take_ns: u64,
    /// Blocks this run sent at least once.
    sent_once: DirtySet,
    /// The copy controller ([`super::steer`]) and the dirty count at its last window.
    steer: Steer,
    steer_dirty: (u64, u64),
    /// Bytes sent by the steered sends since the controller's last window.
    steer_sent_bytes: u64,
}

impl<'env, E: MigrationEnv> Migration<'env, E> {
    fn new(env: &'env mut E, options: &MigrateOptions) -> Self {
        let granularity_bytes = env.granularity_bytes();
        let disk_bytes = env.disk_bytes();
        let start_ns = env.now_ns();
        let empty = DirtySet::empty(granularity_bytes, disk_bytes);
        Self {
            report: MigrationReport {
                policy: options.policy,
                disk_bytes,
                allocated_bytes: 0,
                bytes_data: 0,
                bytes_zero: 0,
                blocks_resent: 0,
                passes: Vec::new(),
                hot_blocks: 0,
                deferrals: 0,
                mirrored: false,
                bytes_mirrored: 0,
                forced: false,
                in_sync: false,
                converge_ms: 0.0,
                pause_ms: 0.0,
                pause_drain_ms: 0.0,
                pause_final_send_ms: 0.0,
                pause_commit_ms: 0.0,
                amplification: 0.0,
                impact_target_us: options.impact_target_us,
                impact_conflict: false,
            },
            env,
            options: options.clone(),
            forecast: Forecast::new(options.stall_passes),
            start_ns,
            granularity_bytes,
            passes: 0,
            mirroring: false,
            mirror_drained: false,
            writes_held: false,
            cold_phase: true,
            previous_cold_blocks: None,
            carried: empty.clone(),
            last_take_ns: start_ns,
            steer: Steer::new(bound_of(options), start_ns),
            steer_dirty: (start_ns, 0),
            steer_sent_bytes: 0,
            sent_once: empty,
        }
    }

    /// The pass loop; returns once switched over.
    fn drive(&mut self) -> Result<(), MigrateError<E::Error>> {
        self.env.set_copy_gear(self.steer.gear());
        let allocated = self
            .env
            .allocated()
            .map_err(|source| source_error(Step::Allocated, source))?;
        self.report.allocated_bytes = set_bytes(&allocated);
        // Fresh: everything with data the destination may lack is "dirty". Resumed: the
        // tracker's bits, less what the destination turns out to hold already. From here on
        // the tracker alone says what the destination may lack.
        let candidates = if self.options.resume {
            self.env.take_dirty()
        } else {
            allocated
        };
        let missing = match self.env.missing(&candidates) {
            Ok(missing) => missing,
            Err(source) => {
                if self.options.resume {
                    self.env.merge_dirty(&candidates);
                }
                return Err(source_error(Step::Allocated, source));
            }
        };
        self.env.merge_dirty(&missing);
        self.carried = missing;
        if self.options.mirror_from_start {
            self.start_mirroring()?;
        }
        loop {
            if self.mirroring {
                if !self.mirror_drained {
                    self.mirror_pass()?;
                }
                if self.switchover()? {
                    return Ok(());
                }
                if self.report.deferrals > self.options.max_passes {
                    return Err(MigrateError::NotConverged {
                        deferrals: self.report.deferrals,
                    });
                }
                continue;
            }
            if self.steer.conflict() {
                // The bound lets the copy run slower than the guest dirties: mirror instead.
                self.report.impact_conflict = true;
                self.start_mirroring()?;
                continue;
            }
            let dirty_blocks = self.env.dirty_count();
            if (self.fits(dirty_blocks) || self.force_due()) && self.switchover()? {
                return Ok(());
            }
            if self.passes >= self.options.max_passes {
                self.start_mirroring()?;
                continue;
            }
            self.policy_step()?;
        }
    }

    /// One step of the policy: a pass, or the decision to mirror.
    fn policy_step(&mut self) -> Result<(), MigrateError<E::Error>> {
        match self.options.policy {
            Policy::Naive => {
                let kind = if self.passes == 0 {
                    PassKind::Full
                } else {
                    PassKind::Dirty
                };
                let taken = self.take();
                self.send_pass(kind, &taken, taken.count())
            }
            Policy::Heat if self.cold_phase => self.cold_pass(),
            Policy::Heat if !self.forecast.converges() => self.start_mirroring(),
            Policy::Heat => {
                // The hot blocks did not fit the pause: send everything, then cold passes again.
                let taken = self.take();
                self.send_pass(PassKind::Hot, &taken, taken.count())?;
                self.cold_phase = true;
                self.previous_cold_blocks = None;
                Ok(())
            }
        }
    }

    /// Heat policy: sends the dirty cold blocks and puts the hot ones back.
    fn cold_pass(&mut self) -> Result<(), MigrateError<E::Error>> {
        let heat = self.env.heat_snapshot();
        let taken = self.take();
        let (cold, hot) = split_hot(&taken, &heat, self.options.hot_threshold);
        if self.passes == 0 {
            self.report.hot_blocks = hot.count();
        }
        self.env.merge_dirty(&hot);
        self.carried = hot;
        self.send_pass(PassKind::Cold, &cold, taken.count())?;
        let cold_blocks = cold.count();
        // Stop when cold passes stop gaining, or when the cold rest would fit the pause anyway.
        let stalled = self
            .previous_cold_blocks
            .is_some_and(|previous| cold_blocks >= previous);
        if cold_blocks == 0 || stalled || self.fits(cold_blocks) {
            self.cold_phase = false;
        }
        self.previous_cold_blocks = Some(cold_blocks);
        Ok(())
    }

    /// Starts mirroring; the next loop iteration drains what was dirtied before it.
    #[cold]
    fn start_mirroring(&mut self) -> Result<(), MigrateError<E::Error>> {
        self.env
            .start_mirroring()
            .map_err(|source| source_error(Step::StartMirroring, source))?;
        self.mirroring = true;
        self.report.mirrored = true;
        // The copy stays steered: a mirrored write travels the one ordered stream behind
        // the copy's data and waits at the destination with its writes, so a copy flat out
        // holds every guest write for milliseconds. The gears' figures from before hold no
        // round trip: the controller measures afresh (the conflict is past: mirroring
        // converges whatever the copy's rate). No bound is strict here: the round trip
        // alone may exceed it, and a copy slowed to the floor for a bound it cannot reach
        // only keeps every guest write paying that round trip longer (`auto` weighs the
        // harm per byte instead).
        let bound = self.steer.bound().map(|bound| Bound {
            strict: false,
            ..bound
        });
        self.steer = Steer::new(bound, self.env.now_ns());
        self.env.set_copy_gear(self.steer.gear());
        Ok(())
    }

    /// While mirroring: sends every block dirtied before mirroring began (taken now, after
    /// `start_mirroring` returned, so the set holds all of them).
    fn mirror_pass(&mut self) -> Result<(), MigrateError<E::Error>> {
        let taken = self.take();
        self.send_pass(PassKind::Mirror, &taken, taken.count())?;
        self.mirror_drained = true;
        Ok(())
    }

    /// Takes the dirty set and records the dirty rate since the previous take.
    fn take(&mut self) -> DirtySet {
        let now_ns = self.env.now_ns();
        let taken = self.env.take_dirty();
        let carried = std::mem::replace(
            &mut self.carried,
            DirtySet::empty(self.granularity_bytes, self.report.disk_bytes),
        );
        let new_blocks = taken.count_not_in(&carried);
        let interval_ns = now_ns.saturating_sub(self.last_take_ns);
        self.forecast
            .record_dirty(new_blocks, self.granularity_bytes, interval_ns);
        self.forecast.record_pass_start(taken.count());
        self.last_take_ns = now_ns;
        taken
    }

    /// Runs one pass sending `set`, and records it.
    fn send_pass(
        &mut self,
        kind: PassKind,
        set: &DirtySet,
        dirty_blocks_at_start: u64,
    ) -> Result<(), MigrateError<E::Error>> {
        self.passes += 1;
        let pass = self.passes;
        let start_ns = self.env.now_ns();
        let (blocks_sent, bytes_sent) = self.send_set(pass, kind, set, Step::Send)?;
        self.report.passes.push(PassReport {
            pass,
            kind,
            dirty_blocks_at_start,
            blocks_sent,
            bytes_sent,
            duration_ms: ms_since(start_ns, self.env.now_ns()),
        });
        Ok(())
    }

    /// Sends `set` in chunks of `chunk_blocks`, in offset order. On a failed send the
    /// unconfirmed rest (the failed chunk onward) is merged back. Returns blocks and bytes.
    fn send_set(
        &mut self,
        pass: u32,
        kind: PassKind,
        set: &DirtySet,
        step: Step,
    ) -> Result<(u64, u64), MigrateError<E::Error>> {
        let mut blocks_left = set.count();
        let (mut blocks_sent, mut bytes_sent) = (0, 0);
        let mut from_block = 0;
        loop {
            let (chunk, next_block) = next_chunk(set, from_block, self.chunk_blocks(step));
            if chunk.is_empty() {
                return Ok((blocks_sent, bytes_sent));
            }
            let outcome = match self.env.send(&chunk) {
                Ok(outcome) => outcome,
                Err(source) => {
                    self.env.merge_dirty(&suffix(set, from_block));
                    return Err(source_error(step, source));
                }
            };
            let bytes = outcome.bytes_data + outcome.bytes_zero;
            let slowed = step == Step::Send && self.steer.slowed();
            self.forecast
                .record_send_capped(bytes, outcome.elapsed_ns, slowed);
            if step == Step::Send {
                self.steer_sent_bytes += bytes;
            }
            self.report.bytes_data += outcome.bytes_data;
            self.report.bytes_zero += outcome.bytes_zero;
            self.report.blocks_resent += chunk.count() - chunk.count_not_in(&self.sent_once);
            self.sent_once.union_with(&chunk);
            blocks_sent += chunk.count();
            bytes_sent += bytes;
            blocks_left -= chunk.count();
            from_block = next_block;
            self.send_progress(pass, kind, blocks_left);
            // Steered only while the guest runs (never the final send, writes held).
            if step == Step::Send && self.steer_window() && !self.mirroring {
                // Newly in conflict: the rest of this pass goes back to the tracker, and
                // the loop starts mirroring.
                self.env.merge_dirty(&suffix(set, from_block));
                return Ok((blocks_sent, bytes_sent));
            }
        }
    }

    /// Blocks per send: `chunk_blocks`, or fewer when a paced gear would make a send outlast
    /// the controller's window (its judgements come between sends).
    fn chunk_blocks(&self, step: Step) -> u64 {
        let paced = self
            .steer
            .gear()
            .cap_bytes_per_s
            .filter(|_| step == Step::Send);
        let Some(cap_bytes_per_s) = paced else {
            return self.options.chunk_blocks;
        };
        let window_bytes = cap_bytes_per_s.saturating_mul(steer::WINDOW_NS) / 1_000_000_000;
        (window_bytes / self.granularity_bytes).clamp(1, self.options.chunk_blocks.max(1))
    }

    /// Judges a guest window when one is due and sets the copy's gear; true when the bound
    /// and convergence have just come into conflict.
    fn steer_window(&mut self) -> bool {
        let now_ns = self.env.now_ns();
        if self.steer.bound().is_none() || !self.steer.window_due(now_ns) {
            return false;
        }
        let open = self.env.guest_window(false).map(|window| window.ops);
        if !open.is_some_and(|ops| self.steer.window_closes(now_ns, ops)) {
            return false;
        }
        let Some(window) = self.env.guest_window(true) else {
            return false;
        };
        let dirty_blocks = self.env.dirty_count();
        let dirty_bytes_per_s = self.forecast.dirty_bytes_per_s().or_else(|| {
            // Before the first take: the blocks newly dirtied during this window.
            let (at_ns, before) = self.steer_dirty;
            let blocks = dirty_blocks.checked_sub(before)?;
            let seconds = now_ns.saturating_sub(at_ns) as f64 / 1e9;
            (seconds > 0.0).then(|| (blocks * self.granularity_bytes) as f64 / seconds)
        });
        let seconds = now_ns.saturating_sub(self.steer_dirty.0) as f64 / 1e9;
        let copy_bytes_per_s = (seconds > 0.0 && self.steer_sent_bytes > 0)
            .then(|| self.steer_sent_bytes as f64 / seconds);
        self.steer_dirty = (now_ns, dirty_blocks);
        self.steer_sent_bytes = 0;
        let was = self.steer.conflict();
        let gear = self
            .steer
            .observe(now_ns, window, copy_bytes_per_s, dirty_bytes_per_s);
        log::debug!(
            "steer: guest p99 {} µs over {} requests, copy {:?} B/s, dirty {:?} B/s: {gear:?}",
            window.p99_us,
            window.ops,
            copy_bytes_per_s.map(|rate| rate as u64),
            dirty_bytes_per_s.map(|rate| rate as u64),
        );
        self.env.set_copy_gear(gear);
        !was && self.steer.conflict()
    }

    fn send_progress(&mut self, pass: u32, kind: PassKind, pass_blocks_left: u64) {
        let dirty_blocks = self.env.dirty_count();
        let progress = Progress {
            pass,
            kind,
            bytes_sent: self.report.bytes_sent(),
            dirty_blocks,
            pass_blocks_left,
            copy_bytes_per_s: self.forecast.copy_bytes_per_s(),
            dirty_bytes_per_s: self.forecast.dirty_bytes_per_s(),
            eta_ms: self
                .forecast
                .eta_ms((dirty_blocks + pass_blocks_left) * self.granularity_bytes),
            mirroring: self.mirroring,
            impact_target_us: self.options.impact_target_us,
            guest_p99_us: (self.steer.last_window().ops > 0)
                .then(|| self.steer.last_window().p99_us),
            copy_cap_bytes_per_s: self.steer.gear().cap_bytes_per_s,
            copy_read_depth: self.steer.bound().map(|_| self.steer.gear().read_depth),
            copy_read_bytes: self.steer.bound().map(|_| self.steer.gear().chunk_bytes),
            impact_conflict: self.report.impact_conflict
                || (self.steer.conflict() && !self.mirroring),
        };
        self.env.progress(&progress);
    }

    /// Whether `blocks` dirty blocks could be sent within the pause budget. Nothing to send
    /// always fits, even before any bandwidth was measured (an empty or all-hole disk).
    fn fits(&self, blocks: u64) -> bool {
        if blocks == 0 {
            return true;
        }
        let over_threshold = self
            .options
            .threshold_bytes
            .is_some_and(|threshold_bytes| blocks * self.granularity_bytes > threshold_bytes);
        if over_threshold {
            return false;
        }
        // Aim low while the set still shrinks; accept the hard bound once it does not.
        let budget_ms = if self.forecast.stalled() {
            self.options.max_pause_ms
        } else {
            self.options.target_pause_ms.min(self.options.max_pause_ms)
        } as f64;
        self.forecast
            .pause_estimate_ms(blocks * self.granularity_bytes)
            .is_some_and(|estimate_ms| estimate_ms <= budget_ms)
    }

    /// Whether `force_after_ms` has elapsed since the run started.
    fn force_due(&self) -> bool {
        let elapsed_ms = ms_since(self.start_ns, self.env.now_ns());
        self.options
            .force_after_ms
            .is_some_and(|force_ms| elapsed_ms >= force_ms as f64)
    }

    /// Tries the switchover; `Ok(false)` when deferred (the pause would exceed the budget).
    fn switchover(&mut self) -> Result<bool, MigrateError<E::Error>> {
        let forced = self.force_due();
        // While the guest still runs: the commit then syncs the final send alone, and this
        // round trip, measured afresh at every attempt, is the forecast of the commit's.
        let round_trip_ns = self
            .env
            .sync_sent()
            .map_err(|source| source_error(Step::SyncSent, source))?;
        if let Some(round_trip_ns) = round_trip_ns {
            self.forecast.record_round_trip(round_trip_ns);
        }
        let hold_start_ns = self.env.now_ns();
        self.writes_held = true;
        self.env
            .hold_writes()
            .map_err(|source| source_error(Step::HoldWrites, source))?;
        let taken = self.env.take_dirty();
        let final_set = if self.mirror_drained {
            // Bits of mirrored writes: those blocks are already on both sides.
            DirtySet::empty(self.granularity_bytes, self.report.disk_bytes)
        } else {
            taken
        };
        let held_ms = ms_since(hold_start_ns, self.env.now_ns());
        let final_bytes = set_bytes(&final_set);
        // The pause is the hold, the final send and the ending's round trip (commit or
        // in-sync mark). With nothing to send only the round trip is charged (a slow hold is
        // deferred: the next one may drain faster); without any measurement the switchover
        // goes ahead, as nothing can be sent faster than nothing.
        let ending_ms = self.forecast.ending_estimate_ms().unwrap_or(0.0);
        let estimate_ms = match final_bytes {
            0 => Some(ending_ms),
            bytes => self
                .forecast
                .pause_estimate_ms(bytes)
                .map(|send_ms| send_ms + ending_ms),
        };
        let fits = estimate_ms
            .is_some_and(|estimate_ms| held_ms + estimate_ms <= self.options.max_pause_ms as f64);
        if !fits && !forced {
            self.env.merge_dirty(&final_set);
            self.carried = final_set;
            self.env.release_writes();
            self.writes_held = false;
            self.report.deferrals += 1;
            return Ok(false);
        }
        self.report.pause_drain_ms = held_ms;
        self.finish_switchover(&final_set, hold_start_ns, forced)?;
        Ok(true)
    }

    /// Sends the final set, commits, switches and releases; writes are held.
    fn finish_switchover(
        &mut self,
        final_set: &DirtySet,
        hold_start_ns: u64,
        forced: bool,
    ) -> Result<(), MigrateError<E::Error>> {
        let pass = self.passes + 1;
        // The guest waits on this send: flat out (the next window steers the copy again).
        self.env.set_copy_gear(steer::FASTEST);
        let start_ns = self.env.now_ns();
        let (blocks_sent, bytes_sent) =
            self.send_set(pass, PassKind::Final, final_set, Step::FinalSend)?;
        let sent_ns = self.env.now_ns();
        if self.options.ending == Ending::InSync {
            let times = (hold_start_ns, start_ns, sent_ns);
            return self.finish_in_sync(final_set, times, (blocks_sent, bytes_sent), forced);
        }
        if let Err(source) = self.env.commit() {
            // Not committed (the env's contract): the destination may hold the final blocks
            // but is not authoritative; give their bits back so a rerun sends them again.
            self.env.merge_dirty(final_set);
            return Err(source_error(Step::Commit, source));
        }
        let commit_ns = self.env.now_ns();
        self.report.pause_final_send_ms = ms_since(start_ns, sent_ns);
        self.report.pause_commit_ms = ms_since(sent_ns, commit_ns);
        self.report.passes.push(PassReport {
            pass,
            kind: PassKind::Final,
            dirty_blocks_at_start: final_set.count(),
            blocks_sent,
            bytes_sent,
            duration_ms: ms_since(start_ns, commit_ns),
        });
        self.report.forced = forced;
        self.report.converge_ms = ms_since(self.start_ns, commit_ns);
        self.report.pause_ms = ms_since(hold_start_ns, commit_ns);
        if self.report.allocated_bytes > 0 {
            self.report.amplification =
                self.report.bytes_sent() as f64 / self.report.allocated_bytes as f64;
        }
        if let Err(source) = self.env.switch_to_destination() {
            return Err(MigrateError::DestinationAuthoritative {
                step: Step::SwitchToDestination,
                report: Box::new(self.report.clone()),
                source,
            });
        }
        self.env.release_writes();
        self.writes_held = false;
        self.report.pause_ms = ms_since(hold_start_ns, self.env.now_ns());
        Ok(())
    }

    /// [`Ending::InSync`]: records the point at both ends, ends mirroring (the tracker covers
    /// the mirrored writes too) and releases writes; the source stays authoritative.
    /// `times`: when writes were held, the final send started, and ended; `sent`: its
    /// blocks and bytes.
    fn finish_in_sync(
        &mut self,
        final_set: &DirtySet,
        times: (u64, u64, u64),
        sent: (u64, u64),
        forced: bool,
    ) -> Result<(), MigrateError<E::Error>> {
        let (hold_start_ns, start_ns, sent_ns) = times;
        if let Err(source) = self.env.mark_in_sync() {
            self.env.merge_dirty(final_set);
            return Err(source_error(Step::MarkInSync, source));
        }
        let marked_ns = self.env.now_ns();
        self.report.pause_final_send_ms = ms_since(start_ns, sent_ns);
        self.report.pause_commit_ms = ms_since(sent_ns, marked_ns);
        let (blocks_sent, bytes_sent) = sent;
        self.report.passes.push(PassReport {
            pass: self.passes + 1,
            kind: PassKind::Final,
            dirty_blocks_at_start: final_set.count(),
            blocks_sent,
            bytes_sent,
            duration_ms: ms_since(start_ns, marked_ns),
        });
        self.report.forced = forced;
        self.report.in_sync = true;
        self.report.converge_ms = ms_since(self.start_ns, marked_ns);
        if self.report.allocated_bytes > 0 {
            self.report.amplification =
                self.report.bytes_sent() as f64 / self.report.allocated_bytes as f64;
        }
        if self.mirroring {
            self.env.stop_mirroring();
            self.mirroring = false;
        }
        self.env.release_writes();
        self.writes_held = false;
        self.report.pause_ms = ms_since(hold_start_ns, self.env.now_ns());
        Ok(())
    }

    /// Leaves the env consistent after `err` and hands the error back: before the commit,
    /// writes are released and mirroring stopped; after it, writes stay held.
    #[cold]
    fn unwind(&mut self, err: MigrateError<E::Error>) -> MigrateError<E::Error> {
        if err.destination_authoritative() {
            return err;
        }
        if self.writes_held {
            self.env.release_writes();
            self.writes_held = false;
        }
        if self.mirroring {
            self.env.stop_mirroring();
            self.mirroring = false;
        }
        err
    }
}

#[cold]
/// The bound `options` steer the copy to, if any.
fn bound_of(options: &MigrateOptions) -> Option<Bound> {
    options.impact_target_us.map(|p99_us| Bound {
        p99_us,
        own_us: options.impact_own_us,
        strict: options.impact_strict,
    })
}

fn source_error<Err: std::error::Error + 'static>(step: Step, source: Err) -> MigrateError<Err> {
    MigrateError::SourceAuthoritative { step, source }
}

/// Milliseconds from `start_ns` to `end_ns`.
fn ms_since(start_ns: u64, end_ns: u64) -> f64 {
    end_ns.saturating_sub(start_ns) as f64 / 1e6
}

/// Bytes covered by `set`, the last block clipped to the disk.
pub fn set_bytes(set: &DirtySet) -> u64 {
    set.iter_extents().map(|(_, len_bytes)| len_bytes).sum()
}

/// The first `max_blocks` blocks of `set` at or after `from_block`, and the block after the
/// last one taken (where the next chunk starts). Word by word from `from_block`: a pass sent
/// chunk by chunk costs the pass, not its square (a whole 1 TiB disk at 4 KiB is 65536
/// chunks).
pub fn next_chunk(set: &DirtySet, from_block: u64, max_blocks: u64) -> (DirtySet, u64) {
    let mut chunk = DirtySet::empty(set.granularity_bytes(), set.disk_bytes());
    let (mut next_block, mut left) = (from_block, max_blocks);
    let first_word = from_block / WORD_BITS;
    for (word, bits) in set.iter_words_from(first_word) {
        if left == 0 {
            break;
        }
        let mut bits = if word == first_word {
            bits & (u64::MAX << (from_block % WORD_BITS))
        } else {
            bits
        };
        if u64::from(bits.count_ones()) > left {
            bits = lowest_ones(bits, left);
        }
        if bits == 0 {
            continue;
        }
        chunk.or_word(word, bits);
        left -= u64::from(bits.count_ones());
        next_block = word * WORD_BITS + WORD_BITS - u64::from(bits.leading_zeros());
    }
    (chunk, next_block)
}

/// The lowest `count` set bits of `bits` (`count` below its ones).
fn lowest_ones(bits: u64, count: u64) -> u64 {
    let mut rest = bits;
    for _ in 0..count {
        rest &= rest - 1;
    }
    bits & !rest
}

/// The blocks of `set` at or after `from_block`.
pub fn suffix(set: &DirtySet, from_block: u64) -> DirtySet {
    let mut rest = DirtySet::empty(set.granularity_bytes(), set.disk_bytes());
    for (first, end) in set.iter_runs_from(from_block) {
        rest.insert_range(first, end);
    }
    rest
}

#[cfg(test)]
mod tests;
