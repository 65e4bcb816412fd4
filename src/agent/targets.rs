//! The destination side of a migration, as the agent provides it to the block stream: target
//! images are created sparse in the image directory, refused when they cannot be right, and
//! served as exports once the source commits.
//!
//! Invariants: a target is never created over an export this agent serves, nor over an
//! image of another size; two streams never fill the same target at once; a committed target
//! is recorded like an export added at run time, so a restarted agent serves it again.
//! Journal (commit protocol): `TargetCreated` is durable before the image is created,
//! `TargetCommitted` (the commit point) before the image is served and `CommitOk` sent,
//! `TargetAborted` before the image is removed; a job the journal says committed or aborted
//! is never filled again. One stream at a time fills an export (until its connection has
//! ended and its writes drained), and [`CommitFence`] decides commits: a finalizing query
//! fences the job's stream, so "not committed" is final without losing the received
//! blocks (docs/commit-protocol.md). Commits and queries decide under one lock.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_sys::DirectFile;

use super::exports::Exports;
use crate::api::types::ExportSpec;
use crate::dirty::DirtySet;
use crate::journal::commit::{Answer, CommitDecision, CommitFence};
use crate::journal::{Record, Role, SharedJournal, Side, TargetPhase, TargetView};
use crate::transfer::{
    check_free_space, Repoint, RepointOutcome, TargetError, TargetHost, TargetSpec, TargetState,
};

use super::holding;

/// Least time between two records of a job's received blocks.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Where this agent puts migrated-in disks, and what it tells sources.
#[derive(Debug)]
pub struct Targets {
    exports: Arc<Exports>,
    image_dir: PathBuf,
    nbd_tcp: Option<String>,
    /// Export → (job, stream id) of the stream filling it.
    filling: Mutex<BTreeMap<String, (u64, u64)>>,
    /// Which stream may still commit each job; held while a commit or a query decides.
    fence: Mutex<CommitFence>,
    next_stream: AtomicU64,
    journal: SharedJournal,
    /// When each job's received blocks were last recorded.
    checkpoints: Mutex<BTreeMap<u64, Instant>>,
}

impl Targets {
    /// Targets in `image_dir` of the agent whose exports are in `exports`; `nbd_tcp` is where
    /// it serves NBD over TCP (sources forward there after the switchover).
    pub fn new(
        exports: Arc<Exports>,
        image_dir: PathBuf,
        nbd_tcp: Option<String>,
        journal: SharedJournal,
    ) -> Self {
        Targets {
            exports,
            image_dir,
            nbd_tcp,
            filling: Mutex::new(BTreeMap::new()),
            fence: Mutex::new(CommitFence::new()),
            next_stream: AtomicU64::new(1),
            journal,
            checkpoints: Mutex::new(BTreeMap::new()),
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

    fn create(&self, spec: &TargetSpec, source: &str) -> Result<Arc<DirectFile>, TargetError> {
        crate::name::validate(&spec.export).map_err(|err| TargetError::Refused(err.to_string()))?;
        match self.phase(spec.job_id) {
            None => {}
            // The same job again: a resume.
            Some((TargetPhase::Receiving, export)) if export == spec.export => {}
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
        }
        // An export this agent forwards is a disk coming home: its image here is stale, so
        // the disk is received into a new file, adopted at the commit.
        if self.exports.has_export(&spec.export) && !self.exports.is_forwarded(&spec.export) {
            return Err(TargetError::Refused(format!(
                "export '{}' is already served by this agent",
                spec.export
            )));
        }
        std::fs::create_dir_all(&self.image_dir)
            .map_err(TargetError::io("create the directory of", &self.image_dir))?;
        let path = self.image_path(&spec.export);
        // Before the image exists, so that no image exists the journal does not know.
        self.journal
            .append(&Record::TargetCreated {
                job_id: spec.job_id,
                batch: spec.batch.clone(),
                export: spec.export.clone(),
                size_bytes: spec.size_bytes,
                granularity_bytes: spec.granularity_bytes,
                source: source.to_string(),
                image_path: path.clone(),
            })
            .map_err(|err| TargetError::Journal(Box::new(err)))?;
        self.record_holder(spec, source)?;
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() != spec.size_bytes => {
                return Err(TargetError::WrongSize {
                    have_bytes: meta.len(),
                    want_bytes: spec.size_bytes,
                });
            }
            // Same size: an interrupted migration of this disk, continued.
            Ok(_) => {}
            Err(_) => {
                check_free_space(&self.image_dir, spec.size_bytes)?;
                let file =
                    std::fs::File::create(&path).map_err(TargetError::io("create", &path))?;
                file.set_len(spec.size_bytes)
                    .map_err(TargetError::io("size", &path))?;
            }
        }
        DirectFile::open(&path, true)
            .map(Arc::new)
            .map_err(TargetError::io("open", &path))
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
        let stream_id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        {
            let mut filling = self.filling.lock().expect("filling lock");
            if filling.contains_key(&spec.export) {
                return Err(TargetError::Refused(format!(
                    "another migration is filling '{}' here",
                    spec.export
                )));
            }
            filling.insert(spec.export.clone(), (spec.job_id, stream_id));
        }
        let created = self.create(spec, source);
        match &created {
            // After TargetCreated is durable: this stream is the one that may commit.
            Ok(_) => self
                .fence
                .lock()
                .expect("fence lock")
                .open(spec.job_id, stream_id),
            Err(_) => self.end_stream(spec),
        }
        created
    }

    fn commit_target(&self, spec: &TargetSpec) -> Result<(), TargetError> {
        let stream_id = self
            .filling
            .lock()
            .expect("filling lock")
            .get(&spec.export)
            .filter(|&&(job_id, _)| job_id == spec.job_id)
            .map(|&(_, stream_id)| stream_id);
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
        let path = self.image_path(&spec.export);
        if !self.exports.serves_path(&path) {
            if let Err(err) = std::fs::remove_file(&path) {
                log::warn!("cannot remove aborted target {}: {err}", path.display());
            }
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

    fn end_stream(&self, spec: &TargetSpec) {
        let mut filling = self.filling.lock().expect("filling lock");
        if filling
            .get(&spec.export)
            .is_some_and(|&(job_id, _)| job_id == spec.job_id)
        {
            filling.remove(&spec.export);
        }
    }
}
