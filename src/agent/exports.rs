//! The agent's exports: opened at start (from the config and from exports added at run time
//! earlier), added and removed through the control API, looked up by the NBD server.
//!
//! Invariants: export names are unique; trackers of a served export live in
//! `<state_dir>/trackers/<export>/` and are saved there on clean shutdown; exports added at run
//! time are recorded in `<state_dir>/exports.json` (written atomically) so a restarted agent
//! serves them again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::agent::config::ExportConfig;
use crate::agent::moves::{locate, Move};
use crate::api::types::{ExportSpec, ExportStats, ExportStatus, TrackerStatus};
use crate::api::ControlError;
use crate::dirty::{TrackerSet, TrackerSpec};
use crate::disk::{Export, Shape};
use crate::env::Clock;
use crate::error::error_chain;
use crate::nbd::server::{export_info, ExportLookup};
use crate::nbd::wire::{ExportCatalog, ExportInfo};

/// The exports of one agent.
#[derive(Debug)]
pub struct Exports {
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    state_dir: PathBuf,
    clock: Arc<dyn Clock>,
    half_life_ms: u64,
    /// Extents each durable tracker's activity log holds open at most.
    log_extents: usize,
    /// Serializes add/remove so `exports.json` matches the map.
    changes: Mutex<()>,
    /// Exports added at run time (persisted).
    runtime: Mutex<BTreeMap<String, ExportSpec>>,
    /// Export name -> the moves of its disk the journal records: a configured path that is
    /// gone is looked for where those moves left the image.
    moves: BTreeMap<String, Vec<Move>>,
    /// Export name -> the path it was configured with.
    configured: Mutex<BTreeMap<String, PathBuf>>,
}

impl Exports {
    /// An empty table keeping its state under `state_dir`.
    pub fn new(
        state_dir: &Path,
        clock: Arc<dyn Clock>,
        half_life_ms: u64,
        moves: BTreeMap<String, Vec<Move>>,
    ) -> Self {
        Exports {
            moves,
            exports: RwLock::new(BTreeMap::new()),
            state_dir: state_dir.to_path_buf(),
            clock,
            half_life_ms,
            log_extents: crate::dirty::activity::DEFAULT_LOG_EXTENTS,
            changes: Mutex::new(()),
            runtime: Mutex::new(BTreeMap::new()),
            configured: Mutex::new(BTreeMap::new()),
        }
    }

    /// Sets how many extents each durable tracker's activity log holds open at most.
    pub fn with_log_extents(mut self, log_extents: usize) -> Self {
        self.log_extents = log_extents;
        self
    }

    /// Default heat half-life of new trackers.
    pub fn half_life_ms(&self) -> u64 {
        self.half_life_ms
    }

    /// The export named `name`, if served.
    pub fn export(&self, name: &str) -> Option<Arc<Export>> {
        self.get(name).ok()
    }

    /// Where the trackers of `export` are saved.
    pub fn tracker_dir(&self, export: &str) -> PathBuf {
        self.state_dir.join("trackers").join(export)
    }

    fn runtime_file(&self) -> PathBuf {
        self.state_dir.join("exports.json")
    }

    /// Opens an export, restoring its trackers and creating the configured ones.
    pub fn open(&self, cfg: &ExportConfig) -> Result<Arc<Export>, ControlError> {
        crate::name::validate(&cfg.name).map_err(|err| ControlError::Invalid(err.to_string()))?;
        crate::dirty::validate_granularity(cfg.granularity_bytes)
            .map_err(|err| ControlError::Invalid(err.to_string()))?;
        if self
            .exports
            .read()
            .expect("exports lock")
            .contains_key(&cfg.name)
        {
            return Err(ControlError::Exists(format!(
                "export '{}' exists",
                cfg.name
            )));
        }
        let dir = self.tracker_dir(&cfg.name);
        let clock = self.clock.clone();
        let log_extents = self.log_extents;
        let mut restore_error = None;
        let image = self.image_path(cfg);
        let trackers = |size_bytes| {
            let empty = || TrackerSet::in_dir(size_bytes, clock.clone(), &dir);
            if dir.exists() {
                match empty().with_log_extents(log_extents).restore_into(&dir) {
                    Ok(set) => return set,
                    Err(err) => restore_error = Some(err),
                }
            }
            empty().with_log_extents(log_extents)
        };
        let export = match self.forwarded_size(cfg, &image) {
            // Its stale image was collected: it only forwards (recovery sets the route).
            Some(size_bytes) => {
                let shape = Shape {
                    size_bytes,
                    read_only: cfg.read_only,
                    granularity_bytes: cfg.granularity_bytes,
                    half_life_ms: self.half_life_ms,
                };
                Export::open_forwarding(&cfg.name, &image, shape, trackers)
            }
            None => Export::open(
                &cfg.name,
                &image,
                cfg.read_only,
                cfg.granularity_bytes,
                self.half_life_ms,
                trackers,
            )
            .map_err(|err| ControlError::Io(error_chain(&err)))?,
        }
        .with_forward_hold(cfg.forward_hold_ms.map(std::time::Duration::from_millis));
        self.configured
            .lock()
            .expect("configured lock")
            .insert(cfg.name.clone(), cfg.path.clone());
        if let Some(err) = restore_error {
            // The files are left in place for inspection; the export serves without them.
            log::error!(
                "export {}: trackers not restored: {}",
                cfg.name,
                error_chain(&err)
            );
        }
        for tracker in export.trackers().list() {
            if tracker.is_lost() {
                log::warn!(
                    "export {}: tracker {} was not saved cleanly (unclean stop): marked lost, \
                     every block counts as dirty",
                    cfg.name,
                    tracker.name()
                );
            }
        }
        let durable = cfg.durable_trackers.iter().map(|name| (name, true));
        for (name, durable) in cfg.trackers.iter().map(|name| (name, false)).chain(durable) {
            if export.trackers().get(name).is_none() {
                let spec = TrackerSpec {
                    name: name.clone(),
                    granularity_bytes: cfg.granularity_bytes,
                    half_life_ms: self.half_life_ms,
                    durable,
                };
                export
                    .trackers()
                    .add(spec)
                    .map_err(|err| ControlError::Invalid(err.to_string()))?;
            }
        }
        self.save_active(&export)?;
        let export = Arc::new(export);
        self.exports
            .write()
            .expect("exports lock")
            .insert(cfg.name.clone(), export.clone());
        log::info!(
            "serving export {} from {} ({} bytes{})",
            cfg.name,
            image.display(),
            export.size_bytes(),
            if cfg.read_only { ", read-only" } else { "" }
        );
        Ok(export)
    }

    /// Where `cfg`'s image is: its configured path, or, when migrations moved the disk (the
    /// journal says how), where they left it: its stale name (a switched export is opened
    /// only to forward; that image is never served) or the image of a disk that came home.
    fn image_path(&self, cfg: &ExportConfig) -> PathBuf {
        match self.moves.get(&cfg.name) {
            Some(moves) if cfg.path.symlink_metadata().is_err() => locate(&cfg.path, moves),
            _ => cfg.path.clone(),
        }
    }

    /// The disk's size when `cfg`'s export forwards (its latest move took the disk away) and
    /// its image is gone from where that move left it (`ferry export gc` removed it).
    fn forwarded_size(&self, cfg: &ExportConfig, image: &Path) -> Option<u64> {
        match self.moves.get(&cfg.name)?.last()? {
            Move::Retired { size_bytes, .. } if image.symlink_metadata().is_err() => {
                Some(*size_bytes)
            }
            _ => None,
        }
    }

    /// The path each served export was configured with (where its moves start).
    pub fn configured_paths(&self) -> BTreeMap<String, PathBuf> {
        self.configured.lock().expect("configured lock").clone()
    }

    /// Opens the exports that were added at run time before the last stop.
    pub fn restore_runtime(&self) {
        let text = match std::fs::read_to_string(self.runtime_file()) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return,
            Err(err) => {
                log::error!("cannot read {}: {err}", self.runtime_file().display());
                return;
            }
        };
        let specs: Vec<ExportSpec> = match serde_json::from_str(&text) {
            Ok(specs) => specs,
            Err(err) => {
                log::error!("{} is not valid: {err}", self.runtime_file().display());
                return;
            }
        };
        for spec in specs {
            let name = spec.name.clone();
            match self.open(&export_config(&spec)) {
                Ok(_) => {
                    self.runtime
                        .lock()
                        .expect("runtime lock")
                        .insert(name, spec);
                }
                Err(err) => log::error!("runtime export {name} not restored: {err}"),
            }
        }
    }

    fn save_runtime(&self) -> Result<(), ControlError> {
        let specs: Vec<ExportSpec> = self
            .runtime
            .lock()
            .expect("runtime lock")
            .values()
            .cloned()
            .collect();
        let text = serde_json::to_vec_pretty(&specs).expect("specs serialize");
        crate::durable::write_atomic(&self.runtime_file(), &text).map_err(|err| {
            ControlError::Io(format!("cannot save exports.json: {}", error_chain(&err)))
        })
    }

    /// Whether an export of that name is served.
    pub fn has_export(&self, name: &str) -> bool {
        self.exports
            .read()
            .expect("exports lock")
            .contains_key(name)
    }

    /// Serves a disk migrated into this agent and records it like an export added at run
    /// time (a restart serves it again).
    pub fn serve_committed(&self, spec: ExportSpec) -> Result<(), ControlError> {
        self.add_export(spec).map(drop)
    }

    /// Whether some export's image is `path` (then it is never debris to remove).
    pub fn serves_path(&self, path: &Path) -> bool {
        self.all().iter().any(|export| export.path() == path)
    }

    /// Whether `name` is served here but forwarded to another agent (its disk lives there):
    /// a migration of it back here is a disk coming home.
    pub fn is_forwarded(&self, name: &str) -> bool {
        self.export(name)
            .is_some_and(|export| export.is_forwarded())
    }

    /// A disk this agent forwarded was committed here again (at `image`): its export serves
    /// the new image locally from now on, with the guests' connections kept. The stale image
    /// it had before is not reused.
    pub fn bring_home(&self, name: &str, image: &Path) -> Result<(), ControlError> {
        let export = self.get(name)?;
        export
            .adopt_image(image)
            .map_err(|err| ControlError::Io(error_chain(&err)))?;
        log::info!("export {name}: came home, served from {}", image.display());
        Ok(())
    }

    /// Every export.
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.exports
            .read()
            .expect("exports lock")
            .values()
            .cloned()
            .collect()
    }

    /// The export named `name`, or NotFound.
    pub fn get(&self, name: &str) -> Result<Arc<Export>, ControlError> {
        self.exports
            .read()
            .expect("exports lock")
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no export named '{name}'")))
    }

    /// Records the export's trackers as running, so that a crash from now on brings them back
    /// lost instead of trusting a tracker that never saw the writes made before the crash.
    pub fn save_active(&self, export: &Export) -> Result<(), ControlError> {
        if export.trackers().is_empty() {
            return Ok(());
        }
        export
            .trackers()
            .save_active(&self.tracker_dir(export.name()))
            .map_err(|err| {
                ControlError::Io(format!(
                    "export {}: cannot record trackers: {}",
                    export.name(),
                    error_chain(&err)
                ))
            })
    }

    /// Saves every export's trackers (clean shutdown), exports in parallel: each save is
    /// a few fsyncs, which overlap.
    pub fn save_trackers(&self) -> bool {
        let saved = for_each_parallel(&self.all(), |export| {
            let dir = self.tracker_dir(export.name());
            if export.trackers().list().is_empty() && !dir.exists() {
                return Ok(());
            }
            export.trackers().save(&dir).map_err(|err| {
                log::error!(
                    "export {}: trackers not saved: {}",
                    export.name(),
                    error_chain(&err)
                );
            })
        });
        saved.is_ok()
    }

    /// fdatasync of every writable image.
    pub fn sync_all(&self) -> bool {
        let mut ok = true;
        for export in self.all().iter().filter(|e| !e.read_only()) {
            let Some(file) = export.file() else {
                continue;
            };
            if let Err(err) = file.datasync() {
                log::error!("export {}: final fdatasync failed: {err}", export.name());
                ok = false;
            }
        }
        ok
    }

    /// The API status of one export.
    pub fn status(&self, export: &Export) -> ExportStatus {
        ExportStatus {
            name: export.name().to_string(),
            path: export.path(),
            read_only: export.read_only(),
            size_bytes: export.size_bytes(),
            granularity_bytes: export.granularity_bytes(),
            connections: export.connection_count(),
            trackers: export
                .trackers()
                .list()
                .iter()
                .map(|t| TrackerStatus::of(t))
                .collect(),
            stats: ExportStats::of(export),
            forwarding: export.forwarding(),
            forward_hold_ms: export
                .forward_hold()
                .map(|hold| u64::try_from(hold.as_millis()).unwrap_or(u64::MAX)),
        }
    }

    /// The API status of every export.
    pub fn statuses(&self) -> Vec<ExportStatus> {
        self.all().iter().map(|e| self.status(e)).collect()
    }

    /// Opens an export at run time and records it in `exports.json`.
    pub fn add_export(&self, spec: ExportSpec) -> Result<ExportStatus, ControlError> {
        let _changes = self.changes.lock().expect("changes lock");
        let export = self.open(&export_config(&spec))?;
        self.runtime
            .lock()
            .expect("runtime lock")
            .insert(spec.name.clone(), spec);
        self.save_runtime()?;
        Ok(self.status(&export))
    }

    /// Stops serving an export (closing its connections only with `force`), forgets it and
    /// its trackers.
    pub fn remove_export(&self, name: &str, force: bool) -> Result<(), ControlError> {
        let _changes = self.changes.lock().expect("changes lock");
        let export = self.get(name)?;
        let connections = export.connection_count();
        if connections > 0 && !force {
            return Err(ControlError::Busy(format!(
                "export '{name}' has {connections} connection(s); use --force to close them"
            )));
        }
        self.exports.write().expect("exports lock").remove(name);
        self.configured
            .lock()
            .expect("configured lock")
            .remove(name);
        export.close_connections();
        if self
            .runtime
            .lock()
            .expect("runtime lock")
            .remove(name)
            .is_some()
        {
            self.save_runtime()?;
        }
        // The export is gone: its trackers describe nothing any more.
        let dir = self.tracker_dir(name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|err| {
                ControlError::Io(format!("cannot remove {}: {err}", dir.display()))
            })?;
        }
        log::info!("export {name} removed");
        Ok(())
    }
}

/// The config form of an API export spec.
fn export_config(spec: &ExportSpec) -> ExportConfig {
    ExportConfig {
        name: spec.name.clone(),
        path: spec.path.clone(),
        read_only: spec.read_only,
        granularity_bytes: spec.granularity_bytes,
        trackers: spec.trackers.clone(),
        // Through the API, a durable tracker is added with `POST .../trackers`.
        durable_trackers: Vec::new(),
        // Exports added through the API take the agent's hold.
        forward_hold_ms: None,
    }
}

impl ExportCatalog for Exports {
    fn list(&self) -> Vec<ExportInfo> {
        self.all().iter().map(|e| export_info(e)).collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        ExportLookup::export(self, name).map(|e| export_info(&e))
    }
}

impl ExportLookup for Exports {
    fn export(&self, name: &str) -> Option<Arc<Export>> {
        let exports = self.exports.read().expect("exports lock");
        if name.is_empty() && exports.len() == 1 {
            return exports.values().next().cloned();
        }
        exports.get(name).cloned()
    }
}

/// Threads [`for_each_parallel`] uses: enough to overlap many fsyncs on 2 cores.
const PARALLEL_WORKERS: usize = 16;

/// Runs `work` on every item from a few threads; every item is tried, and the first error
/// (in item order) is returned.
pub(crate) fn for_each_parallel<T: Sync, E: Send>(
    items: &[T],
    work: impl Fn(&T) -> Result<(), E> + Sync,
) -> Result<(), E> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let errors = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..PARALLEL_WORKERS.min(items.len()) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(item) = items.get(index) else {
                    return;
                };
                if let Err(err) = work(item) {
                    errors.lock().expect("errors lock").push((index, err));
                }
            });
        }
    });
    let mut errors = errors.into_inner().expect("errors lock");
    errors.sort_by_key(|(index, _)| *index);
    errors
        .into_iter()
        .next()
        .map_or(Ok(()), |(_, err)| Err(err))
}
