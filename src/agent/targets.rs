//! The destination side of a migration, as the agent provides it to the block stream: target
//! images are created sparse in the image directory, refused when they cannot be right, and
//! served as exports once the source commits.
//!
//! Invariants: a target is never created over an export this agent serves, nor over an
//! image of another size; two streams never fill the same target at once; a committed target
//! is recorded like an export added at run time, so a restarted agent serves it again.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_sys::DirectFile;

use crate::agent::config;
use crate::agent::registry::Registry;
use crate::api::types::ExportSpec;
use crate::transfer::{TargetHost, TargetSpec};

/// Where this agent puts migrated-in disks, and what it tells sources.
#[derive(Debug)]
pub struct Targets {
    registry: Arc<Registry>,
    image_dir: PathBuf,
    nbd_tcp: Option<String>,
    filling: Mutex<BTreeSet<String>>,
}

impl Targets {
    /// Targets in `image_dir` of the agent whose exports are in `registry`; `nbd_tcp` is where
    /// it serves NBD over TCP (sources forward there after the switchover).
    pub fn new(registry: Arc<Registry>, image_dir: PathBuf, nbd_tcp: Option<String>) -> Self {
        Targets {
            registry,
            image_dir,
            nbd_tcp,
            filling: Mutex::new(BTreeSet::new()),
        }
    }

    fn image_path(&self, export: &str) -> PathBuf {
        self.image_dir.join(format!("{export}.img"))
    }

    fn create(&self, spec: &TargetSpec) -> Result<Arc<DirectFile>, String> {
        config::validate_name(&spec.export)?;
        if self.registry.has_export(&spec.export) {
            return Err(format!(
                "export '{}' is already served by this agent",
                spec.export
            ));
        }
        std::fs::create_dir_all(&self.image_dir)
            .map_err(|err| format!("cannot create {}: {err}", self.image_dir.display()))?;
        let path = self.image_path(&spec.export);
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
    fn create_target(&self, spec: &TargetSpec) -> Result<Arc<DirectFile>, String> {
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
        let created = self.create(spec);
        if created.is_err() {
            self.filling
                .lock()
                .expect("filling lock")
                .remove(&spec.export);
        }
        created
    }

    fn commit_target(&self, spec: &TargetSpec) -> Result<(), String> {
        let export = ExportSpec {
            name: spec.export.clone(),
            path: self.image_path(&spec.export),
            read_only: false,
            granularity_bytes: spec.granularity_bytes,
            trackers: Vec::new(),
        };
        let served = self
            .registry
            .serve_committed(export)
            .map_err(|err| err.to_string());
        self.filling
            .lock()
            .expect("filling lock")
            .remove(&spec.export);
        served
    }

    fn abort_target(&self, spec: &TargetSpec) {
        self.filling
            .lock()
            .expect("filling lock")
            .remove(&spec.export);
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
}
