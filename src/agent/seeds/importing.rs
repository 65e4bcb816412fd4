//! A seed import and inspection as the agent runs them: every volume verified before
//! anything is recorded; each disk's target job and `Importing` journaled before its image is
//! created (O_EXCL, no links); the verified copy on its own thread; `Imported` journaled once
//! the images are synced. The images stay unserved receiving targets.

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use ferry_sys::DirectFile;

use crate::api::ControlError;
use crate::error::error_chain;
use crate::jobs::seeding::import::{self, OpenedVolume};
use crate::jobs::seeding::{
    unix_ms, SeedDisk, SeedDiskInfo, SeedImportRequest, SeedInfo, SeedInspectRequest, SeedProgress,
    SeedRunError, SeedRunStatus, VolumeInfo,
};
use crate::journal::seed::seed_id_hex;
use crate::journal::{Record, Role, SeedStep, SharedJournal, Side};
use crate::seed::header::VolumeState;
use crate::seed::manifest::ExtentKind;
use crate::seed::SeedKeys;
use crate::transfer::{check_free_space, create_image_file};

use super::*;

impl Seeds {
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
            fingerprint: crate::agent::seeded::fingerprint(&path),
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
