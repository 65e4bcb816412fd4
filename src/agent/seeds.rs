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
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferry_sys::DirectFile;

use super::exports::Exports;
use super::migrations::Migrations;
use crate::api::types::{JobStatus, MigrateRequest};
use crate::api::ControlError;
use crate::dirty::TrackerSpec;
use crate::error::error_chain;
use crate::jobs::job::tracker_name;
use crate::jobs::seeding::checkpoint::{self, Checkpoint, Line, StartDisk};
use crate::jobs::seeding::export::{ExportDisk, SeedWriter};
use crate::jobs::seeding::import::{self, OpenedVolume};
use crate::jobs::seeding::{
    unix_ms, SeedDisk, SeedDiskInfo, SeedExportRequest, SeedImportRequest, SeedInfo,
    SeedInspectRequest, SeedProgress, SeedRunError, SeedRunStatus, SeedSyncRequest, VolumeInfo,
};
use crate::jobs::sync::SeedSync;
use crate::journal::seed::{parse_seed_id, seed_id_hex};
use crate::journal::{Record, Role, SeedStep, SharedJournal, Side, SourcePhase, TargetPhase};
use crate::migrate::Policy;
use crate::seed::header::{KeySource, VolumeState};
use crate::seed::manifest::ExtentKind;
use crate::seed::SeedKeys;
use crate::transfer::{check_free_space, create_image_file, ClusterKey};

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

    /// Starts copying `request.exports` onto the media: checked, journaled, trackers made,
    /// then the copy on its own thread.
    pub fn export(
        &self,
        migrations: &Migrations,
        request: SeedExportRequest,
    ) -> Result<SeedRunStatus, ControlError> {
        if request.exports.is_empty() || request.media.is_empty() {
            return Err(ControlError::Invalid("give exports and --media".into()));
        }
        let mut exports = Vec::new();
        for name in &request.exports {
            let export = self.exports.get(name)?;
            if export.is_forwarded() {
                return Err(ControlError::Invalid(format!("export '{name}' forwards")));
            }
            if export.trackers().dir().is_none() {
                log::warn!("export {name}: no state directory, the seed tracker is not durable");
            }
            exports.push(export);
        }
        if let Some(seed) = &request.resume {
            return self.resume_export(request.clone(), seed, exports);
        }
        let seed_id = random_seed_id()?;
        let (keys, key_source) = self.keys(seed_id, request.seed_key_file.as_deref())?;
        let hex = seed_id_hex(&seed_id);
        let checkpoint_path = self.checkpoint_path(&hex)?;
        let mut checkpoint = Checkpoint::create(&checkpoint_path)
            .map_err(|err| ControlError::Io(error_chain(&err)))?;
        let mut disks = Vec::new();
        for (index, export) in exports.into_iter().enumerate() {
            let job_id = migrations.reserve_job_id();
            let start_unix_ms = unix_ms();
            let generation = u64::from_le_bytes(random_seed_id()?[..8].try_into().expect("8"));
            self.journal_export_start(job_id, &export, seed_id, start_unix_ms)?;
            let spec = TrackerSpec {
                name: tracker_name(job_id),
                granularity_bytes: SEED_BLOCK_BYTES,
                half_life_ms: export.half_life_ms(),
                durable: export.trackers().dir().is_some(),
            };
            let tracker = export
                .trackers()
                .add(spec)
                .map_err(|err| ControlError::Io(format!("seed tracker: {err}")))?;
            disks.push(ExportDisk {
                index: u32::try_from(index).expect("few disks"),
                export,
                job_id,
                tracker: (tracker.name().to_string(), generation),
                start_unix_ms,
            });
        }
        checkpoint
            .append(&Line::Start {
                seed_id: hex.clone(),
                separate_key: key_source == KeySource::SeparateKey,
                disks: disks.iter().map(start_disk).collect(),
            })
            .map_err(|err| ControlError::Io(error_chain(&err)))?;
        let writer = ExportPlan {
            keys,
            key_source,
            media: request.media.clone(),
            max_impact_us: request.max_impact_ms.map(|ms| ms.saturating_mul(1000)),
            checkpoint,
            resume: None,
        };
        self.start_export(&hex, seed_id, disks, writer)
    }

    /// Where the checkpoint of seed `hex`'s export is (the directory made if missing).
    fn checkpoint_path(&self, hex: &str) -> Result<PathBuf, ControlError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.seeds_dir)
            .map_err(|err| ControlError::Io(format!("{}: {err}", self.seeds_dir.display())))?;
        Ok(self.seeds_dir.join(format!("{hex}.export")))
    }

    /// Continues the stopped export of seed `hex`: the same disks, their seed trackers
    /// intact (a lost tracker would hide writes made while stopped), from the checkpoint.
    fn resume_export(
        &self,
        request: SeedExportRequest,
        hex: &str,
        exports: Vec<Arc<crate::disk::Export>>,
    ) -> Result<SeedRunStatus, ControlError> {
        let seed_id = parse_seed_id(hex)
            .ok_or_else(|| ControlError::Invalid(format!("--resume: '{hex}' is not a seed id")))?;
        let hex = seed_id_hex(&seed_id);
        let path = self.checkpoint_path(&hex)?;
        let invalid = |err: SeedRunError| ControlError::Invalid(error_chain(&err));
        let resume =
            checkpoint::fold(&checkpoint::read_lines(&path).map_err(invalid)?).map_err(invalid)?;
        if resume.seed_id != hex || resume.separate_key != request.seed_key_file.is_some() {
            return Err(ControlError::Invalid(
                "--resume: give the seed key exactly when the export used one".into(),
            ));
        }
        let mut disks = Vec::new();
        for start in &resume.disks {
            let export = exports
                .iter()
                .find(|export| export.name() == start.export)
                .cloned()
                .ok_or_else(|| {
                    ControlError::Invalid(format!("--resume: name export '{}' too", start.export))
                })?;
            self.check_resumable_disk(&export, start, seed_id)?;
            disks.push(ExportDisk {
                index: start.index,
                export,
                job_id: start.job_id,
                tracker: start.tracker.clone(),
                start_unix_ms: start.start_unix_ms,
            });
        }
        let (keys, key_source) = self.keys(seed_id, request.seed_key_file.as_deref())?;
        let writer = ExportPlan {
            keys,
            key_source,
            media: request.media.clone(),
            max_impact_us: request.max_impact_ms.map(|ms| ms.saturating_mul(1000)),
            checkpoint: Checkpoint::reopen(&path).map_err(invalid)?,
            resume: Some(resume),
        };
        self.start_export(&hex, seed_id, disks, writer)
    }

    /// A disk of a stopped export may continue: its job still exporting this seed, its
    /// export the same size, its seed tracker there and not lost.
    fn check_resumable_disk(
        &self,
        export: &crate::disk::Export,
        start: &StartDisk,
        seed_id: [u8; 16],
    ) -> Result<(), ControlError> {
        let exporting =
            self.journal
                .view(start.job_id, Role::Source)
                .is_some_and(|view| match &view.side {
                    Side::Source(source) => {
                        source.phase == SourcePhase::Copying
                            && source.seed.as_ref().is_some_and(|seed| {
                                seed.seed_id == seed_id && seed.step == SeedStep::Exporting
                            })
                    }
                    Side::Target(_) => false,
                });
        if !exporting {
            return Err(ControlError::Invalid(format!(
                "--resume: job {} is not exporting this seed any more",
                start.job_id
            )));
        }
        if export.size_bytes() != start.size_bytes {
            return Err(ControlError::Invalid(format!(
                "--resume: export '{}' changed size",
                start.export
            )));
        }
        let tracker_ok = export
            .trackers()
            .get(&start.tracker.0)
            .is_some_and(|tracker| !tracker.is_lost());
        if !tracker_ok {
            return Err(ControlError::Invalid(format!(
                "--resume: the seed tracker of '{}' is gone or lost, so writes made since \
                 cannot be known: `ferry abort {}` and export a new seed",
                start.export, start.job_id
            )));
        }
        Ok(())
    }

    /// Runs `plan` for `disks` on its own thread; `Exported` is journaled once it sealed
    /// every volume.
    fn start_export(
        &self,
        hex: &str,
        seed_id: [u8; 16],
        disks: Vec<ExportDisk>,
        plan: ExportPlan,
    ) -> Result<SeedRunStatus, ControlError> {
        let run = self.new_run(hex, "export", &disks_of(&disks))?;
        let seeds_journal = self.journal.clone();
        let agent_id = self.agent_id.clone();
        let thread_run = run.clone();
        std::thread::Builder::new()
            .name(format!("seed-export-{}", &hex[..8]))
            .spawn(move || {
                let writer = SeedWriter {
                    keys: &plan.keys,
                    key_source: plan.key_source,
                    source_agent: agent_id,
                    media: plan.media,
                    progress: &thread_run.progress,
                    stop: &thread_run.stop,
                    max_impact_us: plan.max_impact_us,
                    checkpoint: Some(std::sync::Mutex::new(plan.checkpoint)),
                    resume: plan.resume,
                };
                let result = writer.run(&disks).and_then(|outcome| {
                    for disk in &disks {
                        seeds_journal
                            .append(&Record::SourceSeed {
                                job_id: disk.job_id,
                                seed_id,
                                step: SeedStep::Exported,
                                at_unix_ms: unix_ms(),
                            })
                            .map_err(|err| SeedRunError::Refused(error_chain(&err)))?;
                    }
                    Ok(outcome.volumes)
                });
                finish_run(&thread_run, result);
            })
            .map_err(|err| ControlError::Io(format!("cannot start the seed thread: {err}")))?;
        Ok(status_of(&run))
    }

    /// `SourceStarted` and `SourceSeed(Exporting)` of one disk's seed job.
    fn journal_export_start(
        &self,
        job_id: u64,
        export: &crate::disk::Export,
        seed_id: [u8; 16],
        at_unix_ms: u64,
    ) -> Result<(), ControlError> {
        let records = [
            Record::SourceStarted {
                job_id,
                batch: None,
                export: export.name().to_string(),
                size_bytes: export.size_bytes(),
                granularity_bytes: SEED_BLOCK_BYTES,
                destination: format!("seed:{}", seed_id_hex(&seed_id)),
                policy: Policy::Heat,
            },
            Record::SourceSeed {
                job_id,
                seed_id,
                step: SeedStep::Exporting,
                at_unix_ms,
            },
        ];
        for record in &records {
            self.journal
                .append(record)
                .map_err(|err| ControlError::Io(error_chain(&err)))?;
        }
        Ok(())
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

    /// Starts importing a seed: every volume verified and the images journaled, then the
    /// copy on its own thread.
    pub fn import(&self, request: SeedImportRequest) -> Result<SeedRunStatus, ControlError> {
        let (keys, volumes) = self.open_media(&request.media, request.seed_key_file.as_deref())?;
        let seed_id = *keys.seed_id();
        let hex = seed_id_hex(&seed_id);
        let disks = seed_disks(&volumes);
        if request.as_name.is_some() && disks.len() != 1 {
            return Err(ControlError::Invalid(
                "--as names the disk of a one-disk seed".into(),
            ));
        }
        let mut planned = Vec::new();
        let mut resuming = false;
        for disk in &disks {
            let name = request
                .as_name
                .clone()
                .unwrap_or_else(|| disk.export.clone());
            crate::name::validate(&name)
                .map_err(|err| ControlError::Invalid(format!("export name: {err}")))?;
            resuming |= self.check_importable(disk.job_id, &name, seed_id)?;
            planned.push(SeedDisk {
                export: name.clone(),
                image_path: Some(self.image_dir.join(format!("{name}.img"))),
                ..disk.clone()
            });
        }
        let mut images = Vec::new();
        for (index, disk) in planned.iter().enumerate() {
            images.push((index, self.create_image(disk, seed_id)?));
        }
        let run = self.new_run(&hex, "import", &planned)?;
        let journal = self.journal.clone();
        let thread_run = run.clone();
        std::thread::Builder::new()
            .name(format!("seed-import-{}", &hex[..8]))
            .spawn(move || {
                let result =
                    import_thread(&keys, &volumes, &images, &planned, resuming, &thread_run)
                        .and_then(|()| {
                            for (disk, (_, image)) in planned.iter().zip(&images) {
                                record_target_seed(
                                    &journal,
                                    disk,
                                    seed_id,
                                    SeedStep::Imported,
                                    image,
                                )?;
                            }
                            Ok(volumes.iter().map(|v| v.path.clone()).collect())
                        });
                finish_run(&thread_run, result);
            })
            .map_err(|err| ControlError::Io(format!("cannot start the seed thread: {err}")))?;
        Ok(status_of(&run))
    }

    /// Whether job `job_id` may import seed `seed_id` as `name` here: true for the resume of
    /// an interrupted import of the same seed, false for a new one; refused otherwise.
    fn check_importable(
        &self,
        job_id: u64,
        name: &str,
        seed_id: [u8; 16],
    ) -> Result<bool, ControlError> {
        if let Some(view) = self.journal.view(job_id, Role::Target) {
            let Side::Target(target) = &view.side else {
                unreachable!("a target view");
            };
            return match &target.seed {
                Some(seed) if seed.seed_id == seed_id && seed.step == SeedStep::Importing => {
                    Ok(true)
                }
                Some(seed) if seed.seed_id == seed_id => Err(ControlError::Invalid(format!(
                    "seed {} was imported here already (export {}, {}): a seed imports once",
                    seed_id_hex(&seed_id),
                    view.export,
                    seed.step
                ))),
                _ => Err(ControlError::Invalid(format!(
                    "job {job_id} is another migration here ({}, {}); this seed cannot be \
                     imported on this agent",
                    view.export,
                    target.phase.as_str()
                ))),
            };
        }
        if self.exports.has_export(name) {
            return Err(ControlError::Invalid(format!(
                "export '{name}' is served here: import the seed --as another name"
            )));
        }
        Ok(false)
    }

    /// Records the disk's target job and creates (or, resuming, reopens) its image.
    fn create_image(&self, disk: &SeedDisk, seed_id: [u8; 16]) -> Result<DirectFile, ControlError> {
        let path = disk.image_path.clone().expect("planned with a path");
        let resuming = self.journal.view(disk.job_id, Role::Target).is_some();
        if !resuming {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.image_dir)
                .map_err(|err| ControlError::Io(format!("{}: {err}", self.image_dir.display())))?;
            check_free_space(&self.image_dir, disk.size_bytes)
                .map_err(|err| ControlError::Io(error_chain(&err)))?;
            if path.symlink_metadata().is_ok() {
                return Err(ControlError::Invalid(format!(
                    "{} exists; it is not this seed's",
                    path.display()
                )));
            }
            let records = [
                Record::TargetCreated {
                    job_id: disk.job_id,
                    batch: None,
                    export: disk.export.clone(),
                    size_bytes: disk.size_bytes,
                    granularity_bytes: SEED_BLOCK_BYTES,
                    source: format!("seed:{}", seed_id_hex(&seed_id)),
                    image_path: path.clone(),
                },
                Record::TargetSeed {
                    job_id: disk.job_id,
                    seed_id,
                    step: SeedStep::Importing,
                    at_unix_ms: unix_ms(),
                    fingerprint: 0,
                },
            ];
            for record in &records {
                self.journal
                    .append(record)
                    .map_err(|err| ControlError::Io(error_chain(&err)))?;
            }
            let file =
                create_image_file(&path).map_err(|err| ControlError::Io(error_chain(&err)))?;
            file.set_len(disk.size_bytes)
                .map_err(|err| ControlError::Io(format!("{}: {err}", path.display())))?;
        }
        DirectFile::open_no_follow(&path, true)
            .map_err(|err| ControlError::Io(format!("{}: {err}", path.display())))
    }

    /// The seed on `media`: its keys and its volumes, each verified.
    fn open_media(
        &self,
        media: &[PathBuf],
        key_file: Option<&Path>,
    ) -> Result<(SeedKeys, Vec<OpenedVolume>), ControlError> {
        let refused = |err: SeedRunError| ControlError::Invalid(error_chain(&err));
        let paths = import::volume_paths(media).map_err(refused)?;
        let seed_id = import::claimed_seed_id(&paths[0]).map_err(refused)?;
        let (keys, _) = self.keys(seed_id, key_file)?;
        let volumes = import::open_volumes(&paths, &keys).map_err(refused)?;
        Ok((keys, volumes))
    }

    /// What is on `media` (`seed ls|show|verify`): headers without a key when the key
    /// does not open them, manifests with it, every chunk with `verify`.
    pub fn inspect(&self, request: SeedInspectRequest) -> Result<SeedInfo, ControlError> {
        let refused = |err: SeedRunError| ControlError::Invalid(error_chain(&err));
        let paths = import::volume_paths(&request.media).map_err(refused)?;
        let seed_id = import::claimed_seed_id(&paths[0]).map_err(refused)?;
        let mut info = SeedInfo {
            seed_id: seed_id_hex(&seed_id),
            ..SeedInfo::default()
        };
        for path in &paths {
            let header = crate::seed::volume::open_raw(path, false)
                .and_then(|file| crate::seed::volume::read_header_clear(&file));
            match header {
                Ok(header) => info.volumes.push(VolumeInfo {
                    path: path.clone(),
                    volume: header.volume,
                    state: match header.state {
                        VolumeState::Writing => "writing".into(),
                        VolumeState::Sealed => "sealed".into(),
                    },
                }),
                Err(err) => {
                    info.problems
                        .push(format!("{}: {}", path.display(), error_chain(&err)))
                }
            }
        }
        let (keys, _) = self.keys(seed_id, request.seed_key_file.as_deref())?;
        let volumes = match import::open_volumes(&paths, &keys) {
            Ok(volumes) => volumes,
            Err(err) => {
                info.problems.push(error_chain(&err));
                return Ok(info);
            }
        };
        info.complete = true;
        info.disks = disk_infos(&volumes);
        if request.verify {
            let progress = SeedProgress::default();
            let checked = import::copy_volumes(
                &keys,
                &volumes,
                &BTreeMap::new(),
                false,
                &progress,
                &AtomicBool::new(false),
            );
            if let Err(err) = &checked {
                info.problems.push(error_chain(err));
            }
            info.verified = Some(checked.is_ok());
        }
        Ok(info)
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
            to: request.to.clone(),
            policy: None,
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

    /// Seeds this agent's journal knows, for `ferry status`: (export, role, job, step).
    pub fn journaled(&self) -> Vec<(String, Role, u64, String, SeedStep, Option<u64>)> {
        let mut out = Vec::new();
        for view in self.journal.views() {
            let (role, seed, over) = match &view.side {
                Side::Source(source) => (
                    Role::Source,
                    &source.seed,
                    source.phase != SourcePhase::Copying,
                ),
                Side::Target(target) => (
                    Role::Target,
                    &target.seed,
                    target.phase != TargetPhase::Receiving,
                ),
            };
            if let (Some(seed), false) = (seed, over) {
                out.push((
                    view.export.clone(),
                    role,
                    view.job_id,
                    seed_id_hex(&seed.seed_id),
                    seed.step,
                    seed.in_sync_unix_ms,
                ));
            }
        }
        out
    }
}

/// What an export thread is given.
struct ExportPlan {
    keys: SeedKeys,
    key_source: KeySource,
    media: Vec<PathBuf>,
    max_impact_us: Option<u64>,
    checkpoint: Checkpoint,
    resume: Option<checkpoint::Resume>,
}

/// A disk as the checkpoint's start line records it.
fn start_disk(disk: &ExportDisk) -> StartDisk {
    StartDisk {
        index: disk.index,
        export: disk.export.name().to_string(),
        size_bytes: disk.export.size_bytes(),
        job_id: disk.job_id,
        tracker: disk.tracker.clone(),
        start_unix_ms: disk.start_unix_ms,
    }
}

/// Copies the volumes into the images, then syncs them.
fn import_thread(
    keys: &SeedKeys,
    volumes: &[OpenedVolume],
    images: &[(usize, DirectFile)],
    planned: &[SeedDisk],
    resuming: bool,
    run: &SeedRun,
) -> Result<(), SeedRunError> {
    // Disk indexes in the manifests, mapped to the images (in seed order).
    let indexes = seed_indexes(volumes);
    let by_index: import::Images<'_> = indexes
        .iter()
        .zip(images)
        .map(|(&index, (_, file))| (index, file))
        .collect();
    import::copy_volumes(keys, volumes, &by_index, resuming, &run.progress, &run.stop)?;
    for ((_, file), disk) in images.iter().zip(planned) {
        file.datasync().map_err(SeedRunError::io(
            "sync",
            disk.image_path.as_deref().unwrap_or(Path::new("")),
        ))?;
    }
    Ok(())
}

/// `TargetSeed(step)` of an imported disk, with its image's fingerprint.
fn record_target_seed(
    journal: &SharedJournal,
    disk: &SeedDisk,
    seed_id: [u8; 16],
    step: SeedStep,
    _image: &DirectFile,
) -> Result<(), SeedRunError> {
    let path = disk.image_path.clone().unwrap_or_default();
    journal
        .append(&Record::TargetSeed {
            job_id: disk.job_id,
            seed_id,
            step,
            at_unix_ms: unix_ms(),
            fingerprint: super::seeded::fingerprint(&path),
        })
        .map_err(|err| SeedRunError::Refused(error_chain(&err)))
}

/// The disk indexes of a seed, in order.
fn seed_indexes(volumes: &[OpenedVolume]) -> Vec<u32> {
    let mut indexes: Vec<u32> = volumes
        .iter()
        .flat_map(|v| v.manifest.disks.iter().map(|d| d.index))
        .collect();
    indexes.sort_unstable();
    indexes.dedup();
    indexes
}

/// The disks of a seed, in index order (from their first part).
fn seed_disks(volumes: &[OpenedVolume]) -> Vec<SeedDisk> {
    let mut disks = BTreeMap::new();
    for disk in volumes.iter().flat_map(|v| &v.manifest.disks) {
        disks.entry(disk.index).or_insert_with(|| SeedDisk {
            export: disk.export.clone(),
            job_id: disk.job_id,
            size_bytes: disk.size_bytes,
            image_path: None,
        });
    }
    disks.into_values().collect()
}

/// What `seed show` lists per disk.
fn disk_infos(volumes: &[OpenedVolume]) -> Vec<SeedDiskInfo> {
    let mut disks: BTreeMap<u32, SeedDiskInfo> = BTreeMap::new();
    for disk in volumes.iter().flat_map(|v| &v.manifest.disks) {
        let info = disks.entry(disk.index).or_insert_with(|| SeedDiskInfo {
            export: disk.export.clone(),
            size_bytes: disk.size_bytes,
            job_id: disk.job_id,
            tracker_generation: disk.tracker_generation,
            start_unix_ms: disk.start_unix_ms,
            ..SeedDiskInfo::default()
        });
        info.end_unix_ms = info.end_unix_ms.max(disk.end_unix_ms);
        for extent in &disk.extents {
            match extent.kind {
                ExtentKind::Zero => info.zero_bytes += u64::from(extent.len_bytes),
                ExtentKind::Data { .. } => info.data_bytes += u64::from(extent.len_bytes),
            }
        }
    }
    disks.into_values().collect()
}

fn disks_of(disks: &[ExportDisk]) -> Vec<SeedDisk> {
    disks
        .iter()
        .map(|disk| SeedDisk {
            export: disk.export.name().to_string(),
            job_id: disk.job_id,
            size_bytes: disk.export.size_bytes(),
            image_path: None,
        })
        .collect()
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
