//! The destination side of a migration, as the agent provides it to the block stream: target
//! images are created sparse in the image directory, refused when they cannot be right, and
//! served as exports once the source commits.
//!
//! Invariants: a target is never created over an export this agent serves, nor over an
//! image of another size; two streams never fill the same target at once; a committed target
//! is recorded like an export added at run time, so a restarted agent serves it again.
//!
//! File safety (the peer holds the cluster key, but is trusted with no local file): an `Open`
//! is checked whole ([`validate_spec`], the job's phase, the served exports, the file there)
//! before anything is journaled. A new job's image is created `O_CREAT|O_EXCL|O_NOFOLLOW`,
//! mode 0600, in `image_dir` (made 0700): never over a file that was there, never through a
//! link. An existing file is reopened (`O_NOFOLLOW`) only to resume the job the journal says
//! created it. The stream's image is OFD-locked from the Open to the commit or the stream's
//! end, so it is never the image of a served export (those hold the same lock), and Abort
//! removes only that locked file, the job's own.
//! Journal (commit protocol): `TargetCreated` is durable before the image is created,
//! `TargetCommitted` (the commit point) before the image is served and `CommitOk` sent,
//! `TargetAborted` before the image is removed; a job the journal says committed or aborted
//! is never filled again. One stream at a time fills an export (until its connection has
//! ended and its writes drained), and [`CommitFence`] decides commits: a finalizing query
//! fences the job's stream, so "not committed" is final without losing the received
//! blocks (docs/commit-protocol.md). Commits and queries decide under one lock.

use std::collections::BTreeMap;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_sys::{DirectFile, OfdLock};

use super::exports::Exports;
use super::fencing::Fencing;
use crate::api::types::ExportSpec;
use crate::dirty::DirtySet;
use crate::journal::commit::{Answer, CommitDecision, CommitFence};
use crate::journal::{Record, Role, SharedJournal, Side, TargetPhase, TargetView};
use crate::transfer::{
    check_free_space, create_image_file, validate_spec, Repoint, RepointOutcome, TargetError,
    TargetHost, TargetSpec, TargetState,
};

use super::holding;
use super::seeded;
use crate::journal::SeedStep;
use image::{lock_image, open_existing, open_locked, warn_if_open, Image};

/// Least time between two records of a job's received blocks.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// Mode of an image directory this agent creates: the images are guests' disks.
const IMAGE_DIR_MODE: u32 = 0o700;

/// The stream filling an export.
#[derive(Debug)]
struct Filling {
    job_id: u64,
    stream_id: u64,
    /// The lock on the job's image, from its Open to its commit (the export takes the lock
    /// then) or the stream's end; Abort removes the file only while this holds it.
    image: Option<OfdLock>,
}

/// Where this agent puts migrated-in disks, and what it tells sources.
#[derive(Debug)]
pub struct Targets {
    exports: Arc<Exports>,
    image_dir: PathBuf,
    nbd_tcp: Option<String>,
    /// Export → the stream filling it.
    filling: Mutex<BTreeMap<String, Filling>>,
    /// Which stream may still commit each job; held while a commit or a query decides.
    fence: Mutex<CommitFence>,
    next_stream: AtomicU64,
    journal: SharedJournal,
    /// When each job's received blocks were last recorded.
    checkpoints: Mutex<BTreeMap<u64, Instant>>,
    /// Seeded jobs whose image was found changed outside ferry at their latest Open.
    changed_outside: Mutex<std::collections::BTreeSet<u64>>,
    /// The agent's manager-epoch fence: a manager's job opens and commits only at an epoch
    /// no older than the highest seen here.
    epochs: Arc<Fencing>,
}

impl Targets {
    /// Targets in `image_dir` of the agent whose exports are in `exports`; `nbd_tcp` is where
    /// it serves NBD over TCP (sources forward there after the switchover).
    pub fn new(
        exports: Arc<Exports>,
        image_dir: PathBuf,
        nbd_tcp: Option<String>,
        journal: SharedJournal,
        epochs: Arc<Fencing>,
    ) -> Self {
        warn_if_open(&image_dir);
        Targets {
            exports,
            image_dir,
            nbd_tcp,
            filling: Mutex::new(BTreeMap::new()),
            fence: Mutex::new(CommitFence::new()),
            next_stream: AtomicU64::new(1),
            journal,
            checkpoints: Mutex::new(BTreeMap::new()),
            changed_outside: Mutex::new(std::collections::BTreeSet::new()),
            epochs,
        }
    }

    /// The journal's phase of the job on this side, if it knows the job.
    fn phase(&self, job_id: u64) -> Option<(TargetPhase, String)> {
        let view = self.journal.view(job_id, Role::Target)?;
        match view.side {
            Side::Target(target) => Some((target.phase, view.export)),
            Side::Source(_) => None,
        }
    }

    fn image_path(&self, export: &str) -> PathBuf {
        self.image_dir.join(format!("{export}.img"))
    }

    /// Checks the Open, then opens the job's image (a resume) or creates it, locked; the
    /// journal records the job only once every check passed.
    fn create(&self, spec: &TargetSpec, source: &str) -> Result<Image, TargetError> {
        validate_spec(spec)?;
        let resume = match self.phase(spec.job_id) {
            None => false,
            // The same job again: a resume.
            Some((TargetPhase::Receiving, export)) if export == spec.export => true,
            Some((TargetPhase::Receiving, export)) => {
                return Err(TargetError::Refused(format!(
                    "job {} is already receiving export '{export}' here",
                    spec.job_id
                )));
            }
            Some((phase, _)) => {
                return Err(TargetError::Refused(format!(
                    "job {} is {} here",
                    spec.job_id,
                    phase.as_str()
                )));
            }
        };
        // An export this agent forwards is a disk coming home: its image here is stale, so
        // the disk is received into a new file, adopted at the commit.
        if self.exports.has_export(&spec.export) && !self.exports.is_forwarded(&spec.export) {
            return Err(TargetError::Refused(format!(
                "export '{}' is already served by this agent",
                spec.export
            )));
        }
        let path = self.image_path(&spec.export);
        if self.exports.serves_path(&path) {
            return Err(TargetError::Exists { path });
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(IMAGE_DIR_MODE)
            .create(&self.image_dir)
            .map_err(TargetError::io("create the directory of", &self.image_dir))?;
        // Only the job that created a file may reopen it; anything else there is not ours.
        let existing = if resume {
            open_existing(&path)?
        } else if path.symlink_metadata().is_ok() {
            return Err(TargetError::Exists { path });
        } else {
            None
        };
        match existing {
            Some(file) => {
                let lock = lock_image(file, &path, spec.size_bytes)?;
                self.record_created(spec, source, &path)?;
                open_locked(&path, lock)
            }
            None => {
                check_free_space(&self.image_dir, spec.size_bytes)?;
                // Before the image exists, so that no image exists the journal does not know.
                self.record_created(spec, source, &path)?;
                // A file appearing here since the check (only root writes this directory)
                // is refused, left alone, and its job stays receiving with no image of its own.
                let file = create_image_file(&path)?;
                let made = file
                    .set_len(spec.size_bytes)
                    .map_err(TargetError::io("size", &path))
                    .and_then(|()| lock_image(file, &path, spec.size_bytes))
                    .and_then(|lock| open_locked(&path, lock));
                if made.is_err() {
                    // Created by this call (O_EXCL), so it is ours to remove; the job stays
                    // receiving, as if stopped before the creation.
                    let _ = std::fs::remove_file(&path);
                }
                made
            }
        }
    }

    /// `TargetCreated` (again, on a resume) and the holder, durably.
    fn record_created(
        &self,
        spec: &TargetSpec,
        source: &str,
        path: &Path,
    ) -> Result<(), TargetError> {
        self.journal
            .append(&Record::TargetCreated {
                job_id: spec.job_id,
                batch: spec.batch.clone(),
                export: spec.export.clone(),
                size_bytes: spec.size_bytes,
                granularity_bytes: spec.granularity_bytes,
                source: source.to_string(),
                image_path: path.to_path_buf(),
            })
            .map_err(|err| TargetError::Journal(Box::new(err)))?;
        self.record_holder(spec, source)
    }

    /// The lock on the image of the stream filling `spec`'s export, if it is `spec`'s job.
    fn take_lock(&self, spec: &TargetSpec) -> Option<OfdLock> {
        let mut filling = self.filling.lock().expect("filling lock");
        let entry = filling.get_mut(&spec.export)?;
        if entry.job_id != spec.job_id {
            return None;
        }
        entry.image.take()
    }
}

impl Targets {
    /// A seeded job's stream is about to write its image: notes whether the image changed
    /// outside ferry since its last step, then records `CatchingUp` (durable before any
    /// write).
    fn open_seeded(&self, spec: &TargetSpec) -> Result<(), TargetError> {
        let image = self.image_path(&spec.export);
        let changed = seeded::changed_since_recorded(&self.journal, spec.job_id, &image);
        if changed {
            log::warn!(
                "export {} (job {}): the seeded image changed since ferry last wrote it; the \
                 source will compare digests of the whole disk",
                spec.export,
                spec.job_id
            );
            self.changed_outside
                .lock()
                .expect("changed lock")
                .insert(spec.job_id);
        }
        let now = crate::env::unix_ms();
        let image = (image.as_path(), changed);
        seeded::record(&self.journal, spec.job_id, SeedStep::CatchingUp, now, image)
    }
}

impl Targets {
    /// Records who holds the guest's connection to the disk, unless this agent does (the
    /// disk is coming home) or the source did not say.
    fn record_holder(&self, spec: &TargetSpec, source: &str) -> Result<(), TargetError> {
        let Some(holder) = &spec.holder else {
            return Ok(());
        };
        if holding::is_holder_here(&self.journal, &spec.export, holder) {
            return Ok(());
        }
        let holder = holding::holder_as_seen(holder, source);
        let recorded = self
            .journal
            .view(spec.job_id, Role::Target)
            .and_then(|view| match view.side {
                Side::Target(target) => target.holder,
                Side::Source(_) => None,
            });
        if recorded.as_ref() == Some(&holder) {
            return Ok(());
        }
        self.journal
            .append(&Record::TargetHolder {
                job_id: spec.job_id,
                holder,
            })
            .map_err(|err| TargetError::Journal(Box::new(err)))
    }
}

impl TargetHost for Targets {
    fn create_target(
        &self,
        spec: &TargetSpec,
        source: &str,
    ) -> Result<Arc<DirectFile>, TargetError> {
        // A deposed manager's job creates nothing here.
        let _admitted = self.epochs.admit_stream(spec.manager_epoch)?;
        let stream_id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        {
            let mut filling = self.filling.lock().expect("filling lock");
            if filling.contains_key(&spec.export) {
                return Err(TargetError::Refused(format!(
                    "another migration is filling '{}' here",
                    spec.export
                )));
            }
            let entry = Filling {
                job_id: spec.job_id,
                stream_id,
                image: None,
            };
            filling.insert(spec.export.clone(), entry);
        }
        match self.create(spec, source) {
            Ok(Image { file, lock }) => {
                if let Some(entry) = self
                    .filling
                    .lock()
                    .expect("filling lock")
                    .get_mut(&spec.export)
                {
                    entry.image = Some(lock);
                }
                if spec.seed.is_some() {
                    if let Err(err) = self.open_seeded(spec) {
                        drop(file);
                        self.end_stream(spec);
                        return Err(err);
                    }
                }
                // After TargetCreated is durable: this stream is the one that may commit.
                self.fence
                    .lock()
                    .expect("fence lock")
                    .open(spec.job_id, stream_id);
                Ok(file)
            }
            Err(err) => {
                self.end_stream(spec);
                Err(err)
            }
        }
    }

    fn commit_target(
        &self,
        spec: &TargetSpec,
        manager_epoch: Option<u64>,
    ) -> Result<(), TargetError> {
        // Held to the end of the commit: a newer manager's first command waits for it.
        let _admitted = self.epochs.admit_stream(manager_epoch)?;
        let stream_id = self
            .filling
            .lock()
            .expect("filling lock")
            .get(&spec.export)
            .filter(|entry| entry.job_id == spec.job_id)
            .map(|entry| entry.stream_id);
        {
            // Decided under the fence lock, so no query answers while this commits.
            let fence = self.fence.lock().expect("fence lock");
            let view = self.journal.view(spec.job_id, Role::Target);
            let decision = match stream_id {
                Some(stream_id) => fence.on_commit(spec.job_id, stream_id, view.as_ref()),
                None => CommitDecision::Refuse,
            };
            match decision {
                CommitDecision::AlreadyCommitted => return Ok(()),
                CommitDecision::Refuse => {
                    return Err(TargetError::Refused(format!(
                        "job {} may not commit on this stream (fenced by an in-doubt query, \
                         or not receiving here)",
                        spec.job_id
                    )));
                }
                // The commit point.
                CommitDecision::Commit => self
                    .journal
                    .append(&Record::TargetCommitted {
                        job_id: spec.job_id,
                    })
                    .map_err(|err| TargetError::Journal(Box::new(err)))?,
            }
        }
        // The export takes the image's lock from here on.
        drop(self.take_lock(spec));
        let export = ExportSpec {
            name: spec.export.clone(),
            path: self.image_path(&spec.export),
            read_only: false,
            granularity_bytes: spec.granularity_bytes,
            trackers: Vec::new(),
        };
        let served = if self.exports.is_forwarded(&spec.export) {
            self.exports.bring_home(&spec.export, &export.path)
        } else {
            self.exports.serve_committed(export)
        };
        if let Some(export) = self.exports.export(&spec.export) {
            export.set_lineage(holding::lineage_of(&self.journal, &spec.export));
        }
        if let Err(err) = served {
            // Committed all the same (the journal says so): a restart serves it again.
            log::error!(
                "export {} committed by job {} but not served: {err}",
                spec.export,
                spec.job_id
            );
        }
        Ok(())
    }

    fn abort_target(&self, spec: &TargetSpec) {
        let aborted = self.journal.append(&Record::TargetAborted {
            job_id: spec.job_id,
            reason: "the source aborted".into(),
        });
        if aborted.is_err() {
            return; // keep the image: the journal does not say it is debris
        }
        // Only the file this job's stream created or reopened, and still holds locked.
        let Some(lock) = self.take_lock(spec) else {
            log::warn!(
                "job {}: aborted without its image locked; no file removed",
                spec.job_id
            );
            return;
        };
        let path = self.image_path(&spec.export);
        let ours = lock
            .file()
            .metadata()
            .ok()
            .zip(path.symlink_metadata().ok())
            .is_some_and(|(locked, there)| {
                locked.dev() == there.dev() && locked.ino() == there.ino()
            });
        if !ours || self.exports.serves_path(&path) {
            log::warn!(
                "job {}: {} is no longer its image; not removed",
                spec.job_id,
                path.display()
            );
            return;
        }
        if let Err(err) = std::fs::remove_file(&path) {
            log::warn!("cannot remove aborted target {}: {err}", path.display());
        }
    }

    fn repoint(&self, repoint: &Repoint) -> Result<RepointOutcome, TargetError> {
        holding::repoint(&self.journal, &self.exports, repoint)
    }

    fn nbd_tcp(&self) -> Option<String> {
        self.nbd_tcp.clone()
    }

    fn checkpoint(&self, spec: &TargetSpec, received: &DirtySet) {
        {
            let mut last = self.checkpoints.lock().expect("checkpoint lock");
            let now = Instant::now();
            if last
                .get(&spec.job_id)
                .is_some_and(|at| now.duration_since(*at) < CHECKPOINT_EVERY)
            {
                return;
            }
            last.insert(spec.job_id, now);
        }
        // A resumed stream starts its bitmap empty: what earlier streams recorded still holds.
        let mut all = received.clone();
        if let Some(Side::Target(TargetView {
            received: Some(before),
            ..
        })) = self
            .journal
            .view(spec.job_id, Role::Target)
            .map(|view| view.side)
        {
            if before.block_count() == all.block_count()
                && before.granularity_bytes() == all.granularity_bytes()
            {
                all.union_with(&before);
            }
        }
        let _ = self.journal.append(&Record::TargetReceived {
            job_id: spec.job_id,
            received: all,
        });
    }

    fn query(&self, job_id: u64, finalize: bool) -> (TargetState, u64) {
        let mut fence = self.fence.lock().expect("fence lock");
        let view = self.journal.view(job_id, Role::Target);
        if finalize && fence.answer(job_id, view.as_ref()) == Answer::NotCommitted {
            // The job's stream is fenced: whatever this says now, it will not commit.
            log::info!("job {job_id}: fenced by the source's in-doubt query");
        }
        drop(fence);
        let Some(Side::Target(target)) = view.map(|view| view.side) else {
            return (TargetState::Unknown, 0);
        };
        match target.phase {
            TargetPhase::Committed => (TargetState::Committed, 0),
            TargetPhase::Aborted => (TargetState::Aborted, 0),
            TargetPhase::Receiving => (
                TargetState::Receiving,
                target.received.map_or(0, |set| set.count()),
            ),
        }
    }

    fn resolve_spec(&self, spec: TargetSpec) -> Result<TargetSpec, TargetError> {
        seeded::resolve(&self.journal, spec)
    }

    fn changed_outside(&self, spec: &TargetSpec) -> bool {
        self.changed_outside
            .lock()
            .expect("changed lock")
            .remove(&spec.job_id)
    }

    fn mark_in_sync(&self, spec: &TargetSpec, at_unix_ms: u64) -> Result<(), TargetError> {
        let image = self.image_path(&spec.export);
        let image = (image.as_path(), false);
        seeded::record(
            &self.journal,
            spec.job_id,
            SeedStep::InSync,
            at_unix_ms,
            image,
        )?;
        log::info!(
            "export {} (job {}): in sync with its source as of {at_unix_ms} (Unix ms)",
            spec.export,
            spec.job_id
        );
        Ok(())
    }

    fn end_stream(&self, spec: &TargetSpec) {
        if spec.seed.is_some() {
            seeded::record_stream_end(&self.journal, spec.job_id, &self.image_path(&spec.export));
        }
        let mut filling = self.filling.lock().expect("filling lock");
        if filling
            .get(&spec.export)
            .is_some_and(|entry| entry.job_id == spec.job_id)
        {
            filling.remove(&spec.export);
        }
    }
}

mod image;
#[cfg(test)]
mod tests;
