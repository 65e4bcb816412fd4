//! A seed export as the agent runs it: the disks checked, their seed jobs journaled and
//! their durable 4 KiB trackers created before the copy reads a block; the checkpoint begun
//! (or, with `--resume`, read back and checked against the journal and the trackers); then
//! the copy on its own thread, and `Exported` journaled once every volume is sealed.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;

use super::super::migrations::Migrations;
use crate::api::ControlError;
use crate::dirty::TrackerSpec;
use crate::error::error_chain;
use crate::jobs::job::tracker_name;
use crate::jobs::seeding::checkpoint::{self, Checkpoint, Line, StartDisk};
use crate::jobs::seeding::export::{ExportDisk, SeedWriter};
use crate::jobs::seeding::{unix_ms, SeedDisk, SeedExportRequest, SeedRunError, SeedRunStatus};
use crate::journal::seed::{parse_seed_id, seed_id_hex};
use crate::journal::{Record, Role, SeedStep, Side, SourcePhase};
use crate::migrate::Policy;
use crate::seed::header::KeySource;
use crate::seed::SeedKeys;

use super::*;

impl Seeds {
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
