//! The job as the migration algorithm sees it: [`MigrationEnv`] over the export's migration
//! tracker, the block stream and the export's route and write gate (the invariants are the
//! job's, in its module docs), and the batching of the destination's syncs.

use std::sync::{Arc, Mutex};

use super::super::fair::{FairSeat, ShareStatus};
use super::{
    allocated_blocks, retire_image, send_cap, JobEnv, JobError, DRAIN_TIMEOUT, SYNC_EVERY_BYTES,
    SYNC_EVERY_NS,
};
use crate::dirty::{DirtySet, HeatSnapshot};
use crate::disk::Route;
use crate::journal::Record;
use crate::migrate::steer::{Gear, GuestWindow};
use crate::migrate::{MigrationEnv, Progress, SendOutcome};
use crate::transfer::{TargetState, TransferError};

impl MigrationEnv for JobEnv {
    type Error = JobError;

    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    fn granularity_bytes(&self) -> u64 {
        self.tracker.granularity_bytes()
    }

    fn disk_bytes(&self) -> u64 {
        self.export.size_bytes()
    }

    fn allocated(&mut self) -> Result<DirtySet, JobError> {
        if self.compare_all {
            return Ok(self.every_block());
        }
        allocated_blocks(&self.export, self.tracker.granularity_bytes())
            .map_err(JobError::Allocation)
    }

    fn missing(&mut self, allocated: &DirtySet) -> Result<DirtySet, JobError> {
        if !self.compare_digests {
            return Ok(allocated.clone());
        }
        // Read after the tracker exists: a block written from now on is in its bits. With
        // nothing to trust at the destination, every block of the disk is compared (blocks
        // changed there need not be in any tracker of ours).
        let allocated = &if self.compare_all {
            self.every_block()
        } else {
            allocated.clone()
        };
        let differing = self.differing(allocated)?;
        // The rest is at the destination already: the take need not cover it any more.
        let mut same = allocated.clone();
        same.remove_all(&differing);
        self.tracker.settle(&same);
        log::info!(
            "export {}: resume: {} of {} candidate blocks differ at the destination",
            self.export.name(),
            differing.count(),
            allocated.count()
        );
        Ok(differing)
    }

    fn take_dirty(&mut self) -> DirtySet {
        let taken = self.tracker.take_and_clear();
        if let Some((_, kept)) = &mut self.mirror {
            kept.union_with(&taken);
        }
        taken
    }

    fn merge_dirty(&mut self, set: &DirtySet) {
        self.tracker.merge(set);
    }

    fn dirty_count(&self) -> u64 {
        self.tracker.dirty_count()
    }

    /// The hottest view available: every tracker of the export (a tracker that existed
    /// before the job carries the write history the migration tracker lacks), each mapped to
    /// the migration's granularity ([`HeatSnapshot::to_granularity`]), region by region the
    /// maximum.
    fn heat_snapshot(&self) -> HeatSnapshot {
        let granularity = self.tracker.granularity_bytes();
        let mut snapshot = self.tracker.heat_snapshot();
        for tracker in self.export.trackers().list() {
            let other = tracker.heat_snapshot();
            let same_regions = other.region_shift() == snapshot.region_shift();
            if tracker.granularity_bytes() == granularity && same_regions {
                snapshot.merge_max(&other);
            } else {
                // Regions as the job's tracker cuts its disk, whatever the other's size.
                let disk_bytes = self.tracker.disk_bytes();
                let other =
                    other.to_granularity(tracker.granularity_bytes(), granularity, disk_bytes);
                snapshot.merge_max(&other);
            }
        }
        snapshot
    }

    fn send(&mut self, blocks: &DirtySet) -> Result<SendOutcome, JobError> {
        let started = self.clock.now_ns();
        let extents: Vec<(u64, u64)> = blocks.iter_extents().collect();
        let image = self.export.image().map_err(JobError::Allocation)?;
        self.shape_sends();
        // A job sharing the disk counts its share, and follows its cap, chunk by chunk.
        let (fair, clock) = (&self.fair, &self.clock);
        let (gear, bandwidth_cap, writes_held) = (self.gear, self.bandwidth_cap, self.writes_held);
        let mut on_chunk = |bytes: u64| {
            if let Some((seat, share)) = fair {
                seat.sent(bytes, clock.now_ns());
                *share.lock().expect("share lock") = seat.share();
            }
            send_cap(gear, fair.as_ref(), bandwidth_cap, writes_held)
        };
        let stats = self
            .sender
            .send_extents_paced(&image, &extents, &mut on_chunk)
            .map_err(JobError::Transfer)?;
        let (data_bytes, zero_bytes) = (stats.data_bytes, stats.zero_bytes);
        self.bytes_read += data_bytes + zero_bytes;
        self.unsynced.union_with(blocks);
        self.unsynced_bytes += data_bytes;
        // With writes held every send is synced: the switchover's sends are its last.
        let since_sync_ns = self.clock.now_ns().saturating_sub(self.synced_ns);
        if self.writes_held
            || self.unsynced_bytes >= SYNC_EVERY_BYTES
            || since_sync_ns >= SYNC_EVERY_NS
        {
            self.sync_now()?;
        }
        Ok(SendOutcome {
            bytes_data: data_bytes,
            bytes_zero: zero_bytes,
            elapsed_ns: self.clock.now_ns() - started,
        })
    }

    fn sync_sent(&mut self) -> Result<Option<u64>, JobError> {
        let started = self.clock.now_ns();
        self.sync_now()?;
        Ok(Some(self.clock.now_ns().saturating_sub(started)))
    }

    fn hold_writes(&mut self) -> Result<(), JobError> {
        self.writes_held = true;
        self.export.hold_writes();
        if self.export.wait_drained(DRAIN_TIMEOUT) {
            Ok(())
        } else {
            Err(JobError::Drain(DRAIN_TIMEOUT))
        }
    }

    fn release_writes(&mut self) {
        self.writes_held = false;
        self.export.release_writes();
    }

    fn commit(&mut self) -> Result<(), JobError> {
        // Writes are drained: every mirrored write has been fenced or recorded a failure.
        if self.mirror.as_ref().is_some_and(|(link, _)| link.failed()) {
            return Err(JobError::MirrorFailed);
        }
        if self.forward_addr.is_none() {
            // Checked before the commit point: without an address the source could not
            // forward, and the guest would lose its disk.
            return Err(JobError::NoForwardAddress);
        }
        if self.verify.is_some() {
            self.verify_images()?;
        }
        let epoch = self.manager_epoch.as_ref().map(|fence| fence.highest());
        let Some(journal) = self.journal.clone() else {
            return self.sender.commit(epoch).map_err(JobError::Transfer);
        };
        let job_id = self.job_id;
        journal
            .append(&Record::SourceSwitchoverBegun { job_id })
            .map_err(JobError::Journal)?;
        let err = match self.sender.commit(epoch) {
            Ok(()) => return Ok(()),
            Err(err) => err,
        };
        if !matches!(
            err,
            TransferError::Remote { .. } | TransferError::Refused { .. }
        ) {
            // The Commit may have arrived: ask the destination, making "not committed" final.
            // Writes stay held however long that takes (the guest waits; nothing guesses).
            log::warn!("job {job_id}: commit outcome unknown ({err}); asking the destination");
            let answer = crate::transfer::ask_until_final(&self.to.to_string(), &self.key, job_id);
            if answer.state == TargetState::Committed {
                return Ok(());
            }
        }
        // Not committed, and it never will be: the source stays authoritative.
        journal
            .append(&Record::SourceSwitchoverCancelled {
                job_id,
                reason: crate::error::error_chain(&err),
            })
            .map_err(JobError::Journal)?;
        Err(JobError::Transfer(err))
    }

    fn mark_in_sync(&mut self) -> Result<(), JobError> {
        let Some(seed_id) = self.seed else {
            return Err(JobError::NotSeeded);
        };
        let at_unix_ms = crate::env::unix_ms();
        self.sender
            .mark_in_sync(at_unix_ms)
            .map_err(JobError::Transfer)?;
        // The Mark synced everything sent before it.
        self.unsynced = DirtySet::empty(
            self.unsynced.granularity_bytes(),
            self.unsynced.disk_bytes(),
        );
        self.unsynced_bytes = 0;
        if let Some(journal) = &self.journal {
            journal
                .append(&Record::SourceSeed {
                    job_id: self.job_id,
                    seed_id,
                    step: crate::journal::SeedStep::InSync,
                    at_unix_ms,
                })
                .map_err(JobError::Journal)?;
        }
        // Later passes of a continuous replication compare nothing: the tracker covers
        // every write since this point.
        self.compare_digests = false;
        self.compare_all = false;
        Ok(())
    }

    fn switch_to_destination(&mut self) -> Result<(), JobError> {
        let addr = self
            .forward_addr
            .clone()
            .ok_or(JobError::NoForwardAddress)?;
        if let Some(journal) = &self.journal {
            // Before forwarding: a restart then forwards too, never serves the stale image.
            journal
                .append(&Record::SourceSwitched {
                    job_id: self.job_id,
                    forward_addr: addr.clone(),
                })
                .map_err(JobError::Journal)?;
        }
        // Writes are held: no session mirrors into a stream the destination closed.
        self.export.remove_mirror();
        self.export.switch_route(Route::Forward {
            addr,
            lineage: Some(self.lineage),
        });
        retire_image(&self.export, self.job_id);
        Ok(())
    }

    fn start_mirroring(&mut self) -> Result<(), JobError> {
        self.export.hold_writes();
        if !self.export.wait_drained(DRAIN_TIMEOUT) {
            self.export.release_writes();
            return Err(JobError::Drain(DRAIN_TIMEOUT));
        }
        let link = self.sender.mirror_link();
        self.export.install_mirror(Arc::new(link.clone()));
        let kept = DirtySet::empty(self.tracker.granularity_bytes(), self.export.size_bytes());
        self.mirror = Some((link, kept));
        self.export.release_writes();
        Ok(())
    }

    fn stop_mirroring(&mut self) {
        self.export.remove_mirror();
        self.sender.end_mirroring();
        if let Some((_, kept)) = self.mirror.take() {
            // The algorithm may have dropped these bits as "on both sides"; without a
            // switchover that is not a promise any more.
            self.tracker.merge(&kept);
        }
    }

    fn progress(&mut self, progress: &Progress) {
        *self.progress.lock().expect("progress lock") = Some(progress.clone());
    }

    /// Every guest request on the export (reads and writes) since the window was last
    /// closed, from the histogram the sessions merge every 200 ms; `close` starts the next.
    fn guest_window(&mut self, close: bool) -> Option<GuestWindow> {
        let now = self.export.latency();
        let mut window = now.clone();
        window.subtract(&self.guest_before);
        if close {
            self.guest_before = now;
        }
        Some(GuestWindow {
            ops: window.count(),
            p99_us: window.summary().p99,
        })
    }

    fn set_copy_gear(&mut self, gear: Gear) {
        self.gear = gear;
    }
}

impl JobEnv {
    /// Has the destination write and fdatasync everything sent so far.
    fn sync_now(&mut self) -> Result<(), JobError> {
        self.sender.sync().map_err(JobError::Transfer)?;
        if !self.writes_held {
            // Synced at the destination: a crash from here on need not resend these. Not in
            // the switchover (the log's compaction would lengthen the pause; the tracker
            // goes with the commit).
            self.tracker.settle(&self.unsynced);
        }
        self.unsynced = DirtySet::empty(
            self.unsynced.granularity_bytes(),
            self.unsynced.disk_bytes(),
        );
        self.unsynced_bytes = 0;
        self.synced_ns = self.clock.now_ns();
        Ok(())
    }

    /// Takes `seat` among the agent's copying jobs; its share is written to `share`.
    pub fn share_with(&mut self, seat: FairSeat, share: Arc<Mutex<Option<ShareStatus>>>) {
        self.fair = Some((seat, share));
    }
}
