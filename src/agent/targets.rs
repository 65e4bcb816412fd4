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
//! is never filled again, and a finalizing query makes a job not committed uncommittable.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_sys::DirectFile;

use crate::agent::config;
use crate::agent::registry::Registry;
use crate::api::types::ExportSpec;
use crate::dirty::DirtySet;
use crate::journal::{Record, Role, SharedJournal, Side, TargetPhase, TargetView};
use crate::transfer::{TargetHost, TargetSpec, TargetState};

/// Least time between two records of a job's received blocks.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// Where this agent puts migrated-in disks, and what it tells sources.
#[derive(Debug)]
pub struct Targets {
    registry: Arc<Registry>,
    image_dir: PathBuf,
    nbd_tcp: Option<String>,
    filling: Mutex<BTreeSet<String>>,
    journal: SharedJournal,
    /// When each job's received blocks were last recorded.
    checkpoints: Mutex<BTreeMap<u64, Instant>>,
}

impl Targets {
    /// Targets in `image_dir` of the agent whose exports are in `registry`; `nbd_tcp` is where
    /// it serves NBD over TCP (sources forward there after the switchover).
    pub fn new(
        registry: Arc<Registry>,
        image_dir: PathBuf,
        nbd_tcp: Option<String>,
        journal: SharedJournal,
    ) -> Self {
        Targets {
            registry,
            image_dir,
            nbd_tcp,
            filling: Mutex::new(BTreeSet::new()),
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

    fn create(&self, spec: &TargetSpec, source: &str) -> Result<Arc<DirectFile>, String> {
        config::validate_name(&spec.export)?;
        match self.phase(spec.job_id) {
            None => {}
            // The same job again: a resume.
            Some((TargetPhase::Receiving, export)) if export == spec.export => {}
            Some((TargetPhase::Receiving, export)) => {
                return Err(format!(
                    "job {} is already receiving export '{export}' here",
                    spec.job_id
                ));
            }
            Some((phase, _)) => {
                return Err(format!("job {} is {} here", spec.job_id, phase.as_str()));
            }
        }
        if self.registry.has_export(&spec.export) {
            return Err(format!(
                "export '{}' is already served by this agent",
                spec.export
            ));
        }
        std::fs::create_dir_all(&self.image_dir)
            .map_err(|err| format!("cannot create {}: {err}", self.image_dir.display()))?;
        let path = self.image_path(&spec.export);
        // Before the image exists, so that no image exists the journal does not know.
        self.journal.append(&Record::TargetCreated {
            job_id: spec.job_id,
            batch: None,
            export: spec.export.clone(),
            size_bytes: spec.size_bytes,
            granularity_bytes: spec.granularity_bytes,
            source: source.to_string(),
            image_path: path.clone(),
        })?;
        match std::fs::metadata(&path) {
            Ok(meta) if meta.len() != spec.size_bytes => {
                return Err(format!(
                    "wrong size: {} holds {} bytes, the source disk has {}",
                    path.display(),
                    meta.len(),
                    spec.size_bytes
                ));
            }
            // Same size: an interrupted migration of this disk, continued.
            Ok(_) => {}
            Err(_) => {
                let free = free_bytes(&self.image_dir)?;
                if free < spec.size_bytes {
                    return Err(format!(
                        "disk full: {} has {free} bytes free, the disk needs {}",
                        self.image_dir.display(),
                        spec.size_bytes
                    ));
                }
                let file = std::fs::File::create(&path)
                    .map_err(|err| format!("cannot create {}: {err}", path.display()))?;
                file.set_len(spec.size_bytes)
                    .map_err(|err| format!("cannot size {}: {err}", path.display()))?;
            }
        }
        DirectFile::open(&path, true)
            .map(Arc::new)
            .map_err(|err| format!("cannot open {}: {err}", path.display()))
    }
}

/// Bytes available to this process on the file system holding `dir`.
fn free_bytes(dir: &std::path::Path) -> Result<u64, String> {
    let stat = nix::sys::statvfs::statvfs(dir)
        .map_err(|err| format!("cannot stat {}: {err}", dir.display()))?;
    Ok(stat.blocks_available() * stat.fragment_size())
}

impl TargetHost for Targets {
    fn create_target(&self, spec: &TargetSpec, source: &str) -> Result<Arc<DirectFile>, String> {
        if !self
            .filling
            .lock()
            .expect("filling lock")
            .insert(spec.export.clone())
        {
            return Err(format!(
                "another migration is filling '{}' here",
                spec.export
            ));
        }
        let created = self.create(spec, source);
        if created.is_err() {
            self.filling
                .lock()
                .expect("filling lock")
                .remove(&spec.export);
        }
        created
    }

    fn commit_target(&self, spec: &TargetSpec) -> Result<(), String> {
        // The commit point. Refused (and the source stays authoritative) when a finalizing
        // query already made this job uncommittable.
        let committed = self.journal.append(&Record::TargetCommitted {
            job_id: spec.job_id,
        });
        if let Err(reason) = committed {
            self.filling
                .lock()
                .expect("filling lock")
                .remove(&spec.export);
            return Err(reason);
        }
        let export = ExportSpec {
            name: spec.export.clone(),
            path: self.image_path(&spec.export),
            read_only: false,
            granularity_bytes: spec.granularity_bytes,
            trackers: Vec::new(),
        };
        if let Err(err) = self.registry.serve_committed(export) {
            // Committed all the same (the journal says so): a restart serves it again.
            log::error!(
                "export {} committed by job {} but not served: {err}",
                spec.export,
                spec.job_id
            );
        }
        self.filling
            .lock()
            .expect("filling lock")
            .remove(&spec.export);
        Ok(())
    }

    fn abort_target(&self, spec: &TargetSpec) {
        self.filling
            .lock()
            .expect("filling lock")
            .remove(&spec.export);
        let aborted = self.journal.append(&Record::TargetAborted {
            job_id: spec.job_id,
            reason: "the source aborted".into(),
        });
        if aborted.is_err() {
            return; // keep the image: the journal does not say it is debris
        }
        if !self.registry.has_export(&spec.export) {
            let path = self.image_path(&spec.export);
            if let Err(err) = std::fs::remove_file(&path) {
                log::warn!("cannot remove aborted target {}: {err}", path.display());
            }
        }
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
        let Some(view) = self.journal.view(job_id, Role::Target) else {
            return (TargetState::Unknown, 0);
        };
        let Side::Target(target) = view.side else {
            return (TargetState::Unknown, 0);
        };
        match target.phase {
            TargetPhase::Committed => (TargetState::Committed, 0),
            TargetPhase::Aborted => (TargetState::Aborted, 0),
            TargetPhase::Receiving if finalize => {
                let record = Record::TargetAborted {
                    job_id,
                    reason: "made uncommittable by the source's in-doubt query".into(),
                };
                match self.journal.append(&record) {
                    Ok(()) => (TargetState::Aborted, 0),
                    // Not recorded: the answer must not promise "never commits".
                    Err(_) => self.query(job_id, false),
                }
            }
            TargetPhase::Receiving => (
                TargetState::Receiving,
                target.received.map_or(0, |set| set.count()),
            ),
        }
    }
}
