//! Seeds as the control API drives them (`docs/seed-format.md`): an export's seed journaled
//! and its tracker created before the copy; an import checked whole, journaled before its
//! images exist, and never served; a catch-up started as the resume of the seed's job.
//!
//! Invariants:
//! - Export: `SourceStarted` and `SourceSeed(Exporting)` are durable, and every disk's
//!   durable 4 KiB seed tracker exists, before the first block is read; `Exported` only after
//!   every volume is sealed and synced.
//! - Import: every header, manifest and the volumes' coverage are verified before anything
//!   is recorded; `TargetCreated` and `TargetSeed(Importing)` are durable before an image is
//!   created (O_EXCL, no links, in the image directory); `Imported` only after every chunk
//!   verified and the images were synced. An image is never served by an import: it stays a
//!   receiving target until a catch-up commits it (`--then migrate`).
//! - Importing a seed twice is refused; a failed import resumes (same seed, same job).

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::exports::Exports;
use super::migrations::Migrations;
use crate::api::types::{JobStatus, MigrateRequest};
use crate::api::ControlError;
use crate::error::error_chain;
use crate::jobs::seeding::{SeedDisk, SeedProgress, SeedRunError, SeedRunStatus, SeedSyncRequest};
use crate::jobs::sync::SeedSync;
use crate::journal::seed::parse_seed_id;
use crate::journal::{SeedStep, SharedJournal, Side, SourcePhase};
use crate::seed::header::KeySource;
use crate::seed::SeedKeys;
use crate::transfer::ClusterKey;

mod exporting;
mod importing;

/// Block size of a seed's tracker, its manifest and the destination's image.
const SEED_BLOCK_BYTES: u64 = 4096;
/// Longest seed key file read.
const MAX_KEY_FILE_BYTES: u64 = 256;

/// One export or import run.
#[derive(Debug)]
struct SeedRun {
    status: Mutex<SeedRunStatus>,
    progress: Arc<SeedProgress>,
    stop: AtomicBool,
    started: Instant,
}

/// The seeds of one agent.
#[derive(Debug)]
pub struct Seeds {
    exports: Arc<Exports>,
    journal: SharedJournal,
    cluster_key: ClusterKey,
    image_dir: PathBuf,
    /// Where each export's checkpoint is kept (`<state>/seeds`).
    seeds_dir: PathBuf,
    agent_id: String,
    runs: Mutex<BTreeMap<String, Arc<SeedRun>>>,
}

impl Seeds {
    /// The seeds of the agent whose exports are `exports`; imported images go to
    /// `image_dir`.
    pub fn new(
        exports: Arc<Exports>,
        journal: SharedJournal,
        cluster_key: ClusterKey,
        image_dir: PathBuf,
        seeds_dir: PathBuf,
    ) -> Self {
        let agent_id = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().chars().take(255).collect())
            .unwrap_or_else(|_| "ferry".into());
        Seeds {
            exports,
            journal,
            cluster_key,
            image_dir,
            seeds_dir,
            agent_id,
            runs: Mutex::new(BTreeMap::new()),
        }
    }

    /// The keys of `seed_id`: from the cluster key, or from a separate seed key's file.
    fn keys(
        &self,
        seed_id: [u8; 16],
        key_file: Option<&Path>,
    ) -> Result<(SeedKeys, KeySource), ControlError> {
        let Some(path) = key_file else {
            let keys = SeedKeys::from_cluster(&self.cluster_key, seed_id);
            return Ok((keys, KeySource::Cluster));
        };
        let key = read_seed_key(path)
            .map_err(|err| ControlError::Invalid(format!("seed key {}: {err}", path.display())))?;
        Ok((
            SeedKeys::from_seed_key(key, seed_id),
            KeySource::SeparateKey,
        ))
    }

    /// Every run since the agent started.
    pub fn list(&self) -> Vec<SeedRunStatus> {
        let runs: Vec<Arc<SeedRun>> = self.runs.lock().expect("runs").values().cloned().collect();
        runs.iter().map(|run| status_of(run)).collect()
    }

    /// One run.
    pub fn get(&self, seed_id: &str) -> Result<SeedRunStatus, ControlError> {
        let run = self.runs.lock().expect("runs").get(seed_id).cloned();
        run.map(|run| status_of(&run))
            .ok_or_else(|| ControlError::NotFound(format!("no seed run {seed_id} here")))
    }

    /// Asks a running seed run to stop (an export keeps its checkpoint for `--resume`).
    pub fn stop(&self, seed_id: &str) -> Result<SeedRunStatus, ControlError> {
        let run = self.runs.lock().expect("runs").get(seed_id).cloned();
        let run =
            run.ok_or_else(|| ControlError::NotFound(format!("no seed run {seed_id} here")))?;
        run.stop.store(true, Ordering::Release);
        Ok(status_of(&run))
    }

    /// A new run in the table (refused while another run of that seed is running).
    fn new_run(
        &self,
        hex: &str,
        kind: &str,
        disks: &[SeedDisk],
    ) -> Result<Arc<SeedRun>, ControlError> {
        let mut runs = self.runs.lock().expect("runs");
        if runs
            .get(hex)
            .is_some_and(|run| run.status.lock().expect("status").state == "running")
        {
            return Err(ControlError::Busy(format!(
                "seed {hex} is already being copied"
            )));
        }
        let progress = Arc::new(SeedProgress::default());
        let total: u64 = disks.iter().map(|disk| disk.size_bytes).sum();
        progress.total_bytes.store(total, Ordering::Relaxed);
        let run = Arc::new(SeedRun {
            status: Mutex::new(SeedRunStatus {
                seed_id: hex.to_string(),
                kind: kind.into(),
                state: "running".into(),
                disks: disks.to_vec(),
                total_bytes: total,
                ..SeedRunStatus::default()
            }),
            progress,
            stop: AtomicBool::new(false),
            started: Instant::now(),
        });
        runs.insert(hex.to_string(), run.clone());
        Ok(run)
    }

    /// Starts the catch-up of `export`'s seed to the destination that imported it.
    pub fn sync(
        &self,
        migrations: &Migrations,
        export: &str,
        request: SeedSyncRequest,
    ) -> Result<JobStatus, ControlError> {
        let (job_id, seed_id) = self.seed_job(export)?;
        let migrate = MigrateRequest {
            manager_epoch: request.manager_epoch,
            max_impact: None,
            weight: None,
            to: request.to.clone(),
            // What changed since the seed was mostly written while it travelled: heat says
            // little about what is still being written, and holding "hot" blocks back to the
            // end only makes the last pass longer.
            policy: Some("naive".into()),
            max_pause_ms: request.max_pause_ms,
            target_pause_ms: None,
            force_after_ms: None,
            bandwidth_bytes_per_s: request.bandwidth_bytes_per_s,
            hot_threshold: None,
            verify: None,
            yield_to_guest: None,
            mirror: None,
            granularity_bytes: None,
            batch: None,
            resume_job: Some(job_id),
        };
        let sync = SeedSync {
            seed_id,
            then: request.then,
            compare_all: false,
        };
        migrations.start_job(export, migrate, Some((sync, request.threshold_bytes)))
    }

    /// The exported seed job of `export`: the latest that is exported or in sync.
    fn seed_job(&self, export: &str) -> Result<(u64, [u8; 16]), ControlError> {
        let mut exporting = false;
        let mut found = None;
        for view in self.journal.views() {
            let Side::Source(source) = &view.side else {
                continue;
            };
            let Some(seed) = &source.seed else {
                continue;
            };
            if view.export != export || source.phase != SourcePhase::Copying {
                continue;
            }
            match seed.step {
                SeedStep::Exporting => exporting = true,
                _ => found = Some((view.job_id, seed.seed_id)),
            }
        }
        found.ok_or_else(|| {
            ControlError::NotFound(if exporting {
                format!("the seed of export '{export}' is still being exported (or stopped)")
            } else {
                format!("export '{export}' has no exported seed here: `ferry seed export` it first")
            })
        })
    }
}

/// The run's status now.
fn status_of(run: &SeedRun) -> SeedRunStatus {
    let mut status = run.status.lock().expect("status").clone();
    let progress = &run.progress;
    status.data_bytes = progress.data_bytes.load(Ordering::Relaxed);
    status.zero_bytes = progress.zero_bytes.load(Ordering::Relaxed);
    status.media_bytes = progress.media_bytes.load(Ordering::Relaxed);
    status.volume = u32::try_from(progress.volume.load(Ordering::Relaxed)).unwrap_or(u32::MAX);
    if status.state == "running" {
        status.elapsed_ms = run.started.elapsed().as_secs_f64() * 1000.0;
    }
    status
}

/// Records how a run ended.
fn finish_run(run: &SeedRun, result: Result<Vec<PathBuf>, SeedRunError>) {
    let elapsed_ms = run.started.elapsed().as_secs_f64() * 1000.0;
    let mut status = run.status.lock().expect("status");
    status.elapsed_ms = elapsed_ms;
    match result {
        Ok(volumes) => {
            log::info!(
                "seed {}: {} done in {:.1} s",
                status.seed_id,
                status.kind,
                elapsed_ms / 1e3
            );
            status.state = "done".into();
            status.volumes = volumes;
        }
        Err(err) => {
            let message = error_chain(&err);
            log::error!("seed {}: {} failed: {message}", status.seed_id, status.kind);
            status.state = "failed".into();
            status.error = Some(message);
        }
    }
}

/// A random seed id (a UUID v4's bits).
fn random_seed_id() -> Result<[u8; 16], ControlError> {
    let bytes = crate::transfer::key::random_bytes()
        .map_err(|err| ControlError::Io(format!("no randomness: {err}")))?;
    let mut id = [0u8; 16];
    id.copy_from_slice(&bytes[..16]);
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    Ok(id)
}

/// A separate seed key: 64 hex digits in a small file (whitespace around allowed).
fn read_seed_key(path: &Path) -> Result<[u8; 32], String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|err| err.to_string())?;
    let mut text = String::new();
    file.take(MAX_KEY_FILE_BYTES)
        .read_to_string(&mut text)
        .map_err(|err| err.to_string())?;
    let digits = text.trim();
    let first = parse_seed_id(digits.get(..32).unwrap_or(""));
    let second = parse_seed_id(digits.get(32..).unwrap_or(""));
    match (first, second, digits.len()) {
        (Some(a), Some(b), 64) => {
            let mut key = [0u8; 32];
            key[..16].copy_from_slice(&a);
            key[16..].copy_from_slice(&b);
            Ok(key)
        }
        _ => Err("not 64 hex digits".into()),
    }
}
