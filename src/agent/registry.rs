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

use crate::agent::config::{self, ExportConfig};
use crate::api::types::AbortOutcome;
use crate::api::types::{
    ExportSpec, ExportStats, ExportStatus, HeatMap, TrackerAdd, TrackerStatus,
};
use crate::api::types::{JobStatus, MigrateRequest};
use crate::api::{Control, ControlError};
use crate::dirty::{TrackerSet, TrackerSpec};
use crate::disk::Export;
use crate::env::Clock;
use crate::error::error_chain;
use crate::jobs::job::JobRequest;
use crate::jobs::Jobs;
use crate::journal::{JobView, Record, Role, SharedJournal, Side, SourcePhase};
use crate::migrate::{MigrateOptions, Policy};
use crate::nbd::server::{export_info, ExportLookup};
use crate::nbd::wire::{ExportCatalog, ExportInfo};
use crate::transfer::{resolve_peer, ClusterKey, SendOptions};

/// Heat at and above which a block counts as hot in reports.
pub const HOT_THRESHOLD: u8 = crate::api::types::HOT_THRESHOLD;

/// Bytes a migration hands to one send (one sync round trip, one progress and bandwidth
/// sample), whatever the tracking granularity: ~30 ms of copy at disk speed. (At 4 KiB
/// tracking a fixed 256 blocks made sends of 1 MiB, each waiting for a sync.)
pub const SEND_CHUNK_BYTES: u64 = 16 << 20;

/// The exports of one agent.
#[derive(Debug)]
pub struct Registry {
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    state_dir: PathBuf,
    clock: Arc<dyn Clock>,
    half_life_ms: u64,
    /// Serializes add/remove so `exports.json` matches the map.
    changes: Mutex<()>,
    /// Names of exports added at run time (persisted).
    runtime: Mutex<BTreeMap<String, ExportSpec>>,
    /// Migration jobs started here.
    jobs: Jobs,
    /// Key authenticating block streams to other agents (set at start).
    cluster_key: Mutex<Option<ClusterKey>>,
    /// The migration journal (set at start).
    journal: Mutex<Option<SharedJournal>>,
}

impl Registry {
    /// An empty registry keeping its state under `state_dir`.
    pub fn new(state_dir: &Path, clock: Arc<dyn Clock>, half_life_ms: u64) -> Self {
        Registry {
            exports: RwLock::new(BTreeMap::new()),
            state_dir: state_dir.to_path_buf(),
            clock,
            half_life_ms,
            changes: Mutex::new(()),
            runtime: Mutex::new(BTreeMap::new()),
            jobs: Jobs::new(),
            cluster_key: Mutex::new(None),
            journal: Mutex::new(None),
        }
    }

    /// A resume of `job_id` for `export` must continue an interrupted job of this export.
    fn check_resumable(
        &self,
        export: &Export,
        job_id: u64,
        journal: Option<&SharedJournal>,
    ) -> Result<(), ControlError> {
        let view = journal
            .and_then(|journal| journal.view(job_id, Role::Source))
            .ok_or_else(|| ControlError::NotFound(format!("no migration job {job_id} here")))?;
        match &view.side {
            Side::Source(source)
                if source.phase == SourcePhase::Copying && view.export == export.name() =>
            {
                Ok(())
            }
            Side::Source(source) => Err(ControlError::Invalid(format!(
                "job {job_id} ({}) is {}: only an interrupted migration resumes",
                view.export,
                source.phase.as_str()
            ))),
            Side::Target(_) => Err(ControlError::Invalid(format!(
                "job {job_id} is a target job here"
            ))),
        }
    }

    /// Tells the destination of an aborted job to drop its image; says how that went.
    fn abort_destination(&self, view: &JobView, destination: &str) -> String {
        let Some(key) = self.cluster_key.lock().expect("key lock").clone() else {
            return "not told: this agent has no cluster key".into();
        };
        let spec = crate::transfer::TargetSpec {
            export: view.export.clone(),
            size_bytes: view.size_bytes,
            granularity_bytes: view.granularity_bytes,
            job_id: view.job_id,
            batch: view.batch.clone(),
        };
        let told = resolve_peer(destination)
            .map_err(|err| error_chain(&err))
            .and_then(|addr| {
                let (sender, _) = crate::transfer::Sender::connect(
                    addr,
                    &key,
                    &spec,
                    SendOptions {
                        reply_timeout_ms: 10_000,
                        connect_timeout_ms: 3_000,
                        ..SendOptions::default()
                    },
                )
                .map_err(|err| error_chain(&err))?;
                sender.abort().map_err(|err| error_chain(&err))
            });
        match told {
            Ok(()) => "aborted".into(),
            Err(err) => format!("not told ({err}); its image stays until `ferry abort` again"),
        }
    }

    /// Sets the journal migrations from this agent record their steps in.
    pub fn set_journal(&self, journal: SharedJournal) {
        if let Some(highest) = journal.views().iter().map(|view| view.job_id).max() {
            self.jobs.ids_above(highest);
        }
        *self.journal.lock().expect("journal lock") = Some(journal);
    }

    /// The export named `name`, if served.
    pub fn export(&self, name: &str) -> Option<Arc<Export>> {
        self.get(name).ok()
    }

    /// Sets the key migrations from this agent authenticate with.
    pub fn set_cluster_key(&self, key: ClusterKey) {
        *self.cluster_key.lock().expect("key lock") = Some(key);
    }

    fn tracker_dir(&self, export: &str) -> PathBuf {
        self.state_dir.join("trackers").join(export)
    }

    fn runtime_file(&self) -> PathBuf {
        self.state_dir.join("exports.json")
    }

    /// Opens an export, restoring its trackers and creating the configured ones.
    pub fn open(&self, cfg: &ExportConfig) -> Result<Arc<Export>, ControlError> {
        config::validate_name(&cfg.name).map_err(ControlError::Invalid)?;
        config::validate_granularity(cfg.granularity_bytes)
            .map_err(|p| ControlError::Invalid(format!("granularity: {p}")))?;
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
        let mut restore_error = None;
        let export = Export::open(
            &cfg.name,
            &cfg.path,
            cfg.read_only,
            cfg.granularity_bytes,
            self.half_life_ms,
            |size_bytes| {
                if dir.exists() {
                    match TrackerSet::restore(&dir, size_bytes, clock.clone()) {
                        Ok(set) => return set,
                        Err(err) => restore_error = Some(err),
                    }
                }
                TrackerSet::new(size_bytes, clock)
            },
        )
        .map_err(|err| ControlError::Io(error_chain(&err)))?;
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
        for name in &cfg.trackers {
            if export.trackers().get(name).is_none() {
                let spec = TrackerSpec {
                    name: name.clone(),
                    granularity_bytes: cfg.granularity_bytes,
                    half_life_ms: self.half_life_ms,
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
            cfg.path.display(),
            export.size_bytes(),
            if cfg.read_only { ", read-only" } else { "" }
        );
        Ok(export)
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
        crate::agent::write_atomic(&self.runtime_file(), &text)
            .map_err(|err| ControlError::Io(format!("cannot save exports.json: {err}")))
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

    /// Every export.
    pub fn all(&self) -> Vec<Arc<Export>> {
        self.exports
            .read()
            .expect("exports lock")
            .values()
            .cloned()
            .collect()
    }

    fn get(&self, name: &str) -> Result<Arc<Export>, ControlError> {
        self.exports
            .read()
            .expect("exports lock")
            .get(name)
            .cloned()
            .ok_or_else(|| ControlError::NotFound(format!("no export named '{name}'")))
    }

    /// Records the export's trackers as running, so that a crash from now on brings them back
    /// lost instead of trusting a tracker that never saw the writes made before the crash.
    fn save_active(&self, export: &Export) -> Result<(), ControlError> {
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

    /// Saves every export's trackers (clean shutdown).
    pub fn save_trackers(&self) -> bool {
        let mut ok = true;
        for export in self.all() {
            let dir = self.tracker_dir(export.name());
            if export.trackers().list().is_empty() && !dir.exists() {
                continue;
            }
            if let Err(err) = export.trackers().save(&dir) {
                log::error!(
                    "export {}: trackers not saved: {}",
                    export.name(),
                    error_chain(&err)
                );
                ok = false;
            }
        }
        ok
    }

    /// fdatasync of every writable image.
    pub fn sync_all(&self) -> bool {
        let mut ok = true;
        for export in self.all().iter().filter(|e| !e.read_only()) {
            if let Err(err) = export.file().datasync() {
                log::error!("export {}: final fdatasync failed: {err}", export.name());
                ok = false;
            }
        }
        ok
    }

    fn status(&self, export: &Export) -> ExportStatus {
        ExportStatus {
            name: export.name().to_string(),
            path: export.path().to_path_buf(),
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
        }
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
    }
}

impl ExportCatalog for Registry {
    fn list(&self) -> Vec<ExportInfo> {
        self.all().iter().map(|e| export_info(e)).collect()
    }

    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        let exports = self.exports.read().expect("exports lock");
        if name.is_empty() && exports.len() == 1 {
            return exports.values().next().map(|e| export_info(e));
        }
        exports.get(name).map(|e| export_info(e))
    }
}

impl ExportLookup for Registry {
    fn export(&self, name: &str) -> Option<Arc<Export>> {
        let exports = self.exports.read().expect("exports lock");
        if name.is_empty() && exports.len() == 1 {
            return exports.values().next().cloned();
        }
        exports.get(name).cloned()
    }
}

impl Control for Registry {
    fn exports(&self) -> Vec<ExportStatus> {
        self.all().iter().map(|e| self.status(e)).collect()
    }

    fn add_export(&self, spec: ExportSpec) -> Result<ExportStatus, ControlError> {
        let _changes = self.changes.lock().expect("changes lock");
        let export = self.open(&export_config(&spec))?;
        self.runtime
            .lock()
            .expect("runtime lock")
            .insert(spec.name.clone(), spec);
        self.save_runtime()?;
        Ok(self.status(&export))
    }

    fn remove_export(&self, name: &str, force: bool) -> Result<(), ControlError> {
        let _changes = self.changes.lock().expect("changes lock");
        let export = self.get(name)?;
        let connections = export.connection_count();
        if connections > 0 && !force {
            return Err(ControlError::Busy(format!(
                "export '{name}' has {connections} connection(s); use --force to close them"
            )));
        }
        self.exports.write().expect("exports lock").remove(name);
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

    fn trackers(&self, export: &str) -> Result<Vec<TrackerStatus>, ControlError> {
        let export = self.get(export)?;
        Ok(export
            .trackers()
            .list()
            .iter()
            .map(|t| TrackerStatus::of(t))
            .collect())
    }

    fn add_tracker(&self, export: &str, add: TrackerAdd) -> Result<TrackerStatus, ControlError> {
        let export = self.get(export)?;
        config::validate_name(&add.name).map_err(ControlError::Invalid)?;
        let granularity_bytes = add.granularity_bytes.unwrap_or(export.granularity_bytes());
        config::validate_granularity(granularity_bytes)
            .map_err(|p| ControlError::Invalid(format!("granularity: {p}")))?;
        if export.trackers().get(&add.name).is_some() {
            return Err(ControlError::Exists(format!(
                "export '{}' already has a tracker '{}'",
                export.name(),
                add.name
            )));
        }
        let spec = TrackerSpec {
            name: add.name,
            granularity_bytes,
            half_life_ms: add.half_life_ms.unwrap_or(self.half_life_ms).max(1),
        };
        let tracker = export
            .trackers()
            .add(spec)
            .map_err(|err| ControlError::Invalid(err.to_string()))?;
        self.save_active(&export)?;
        Ok(TrackerStatus::of(&tracker))
    }

    fn remove_tracker(&self, export: &str, tracker: &str) -> Result<(), ControlError> {
        let export = self.get(export)?;
        export.trackers().remove(tracker).map_err(|_| {
            ControlError::NotFound(format!(
                "export '{}' has no tracker '{tracker}'",
                export.name()
            ))
        })?;
        let file = self
            .tracker_dir(export.name())
            .join(format!("{tracker}.tracker"));
        if file.exists() {
            std::fs::remove_file(&file).map_err(|err| {
                ControlError::Io(format!("cannot remove {}: {err}", file.display()))
            })?;
        }
        Ok(())
    }

    fn heat(
        &self,
        export: &str,
        tracker: Option<&str>,
        cells: usize,
    ) -> Result<HeatMap, ControlError> {
        let export = self.get(export)?;
        let tracker = match tracker {
            Some(name) => export.trackers().get(name).ok_or_else(|| {
                ControlError::NotFound(format!(
                    "export '{}' has no tracker '{name}'",
                    export.name()
                ))
            })?,
            None => export.trackers().list().into_iter().next().ok_or_else(|| {
                ControlError::NotFound(format!(
                    "export '{}' has no tracker: add one with `ferry tracker add {} NAME`",
                    export.name(),
                    export.name()
                ))
            })?,
        };
        let cells = cells.clamp(1, 65_536).min(tracker.block_count() as usize);
        let map = tracker.heat_map(cells);
        let cell_bytes = export.size_bytes().div_ceil(map.len().max(1) as u64);
        Ok(HeatMap {
            export: export.name().to_string(),
            tracker: tracker.name().to_string(),
            granularity_bytes: tracker.granularity_bytes(),
            block_count: tracker.block_count(),
            cell_bytes,
            cells: map,
            histogram: tracker.heat_histogram_pairs(),
            hot_blocks: tracker.hot_set(HOT_THRESHOLD).len() as u64,
        })
    }

    fn migrate(&self, export: &str, request: MigrateRequest) -> Result<JobStatus, ControlError> {
        let journaled = self.journal.lock().expect("journal lock").clone();
        let request = super::status::with_journaled_settings(journaled.as_ref(), request);
        let export = self.get(export)?;
        let to = resolve_peer(&request.to)
            .map_err(|err| ControlError::Invalid(format!("to: {}", error_chain(&err))))?;
        let mut options = MigrateOptions::default();
        if let Some(policy) = &request.policy {
            options.policy = policy
                .parse::<Policy>()
                .map_err(|err| ControlError::Invalid(format!("policy: {err}")))?;
        }
        if let Some(max_pause_ms) = request.max_pause_ms {
            options.max_pause_ms = max_pause_ms;
        }
        options.force_after_ms = request.force_after_ms;
        if let Some(target_pause_ms) = request.target_pause_ms {
            options.target_pause_ms = target_pause_ms;
        }
        if let Some(threshold) = request.hot_threshold {
            options.hot_threshold = threshold;
        }
        options.mirror_from_start = request.mirror.unwrap_or(false);
        options.chunk_blocks = (SEND_CHUNK_BYTES / export.granularity_bytes()).max(1);
        if let Some(batch) = &request.batch {
            config::validate_name(batch)
                .map_err(|err| ControlError::Invalid(format!("batch: {err}")))?;
        }
        let journal = self.journal.lock().expect("journal lock").clone();
        let resuming = request.resume_job.is_some();
        if let Some(job_id) = request.resume_job {
            self.check_resumable(&export, job_id, journal.as_ref())?;
            // The failed run left its tracker: its bits are what the destination may lack.
            // Without it (or lost in an unclean stop), all allocated blocks are candidates.
            options.resume = export
                .trackers()
                .get(&crate::jobs::job::tracker_name(job_id))
                .is_some_and(|tracker| !tracker.is_lost());
        }
        // On a resume the destination holds part of the disk: compare before sending.
        let compare_digests = resuming;
        options
            .validate()
            .map_err(|p| ControlError::Invalid(p.to_string()))?;
        let send = SendOptions {
            bandwidth_bytes_per_s: request.bandwidth_bytes_per_s,
            ..SendOptions::default()
        };
        let key = self
            .cluster_key
            .lock()
            .expect("key lock")
            .clone()
            .ok_or_else(|| ControlError::Invalid("this agent has no cluster key".into()))?;
        self.jobs
            .start(
                export,
                JobRequest {
                    to,
                    options,
                    send,
                    verify: request.verify.unwrap_or(false),
                    yield_to_guest: request.yield_to_guest.unwrap_or(false),
                    journal,
                    batch: request.batch.clone(),
                    resuming,
                    compare_digests,
                },
                key,
                request.resume_job,
            )
            .map_err(ControlError::Busy)
    }

    fn abort_job(&self, id: u64) -> Result<AbortOutcome, ControlError> {
        let journal = self
            .journal
            .lock()
            .expect("journal lock")
            .clone()
            .ok_or_else(|| ControlError::Invalid("this agent keeps no journal".into()))?;
        let view = journal
            .view(id, Role::Source)
            .ok_or_else(|| ControlError::NotFound(format!("no migration job {id} here")))?;
        let Side::Source(source) = &view.side else {
            return Err(ControlError::NotFound(format!(
                "job {id} is not a source job"
            )));
        };
        if self.jobs.is_running(id) {
            return Err(ControlError::Busy(format!("job {id} is running")));
        }
        match source.phase {
            SourcePhase::Copying => journal
                .append(&Record::SourceAborted {
                    job_id: id,
                    reason: "aborted by the operator".into(),
                })
                .map_err(ControlError::Invalid)?,
            SourcePhase::Aborted => {} // again: the destination may not have heard it
            phase => {
                return Err(ControlError::Invalid(format!(
                    "job {id} is {}: only an uncommitted migration can be aborted",
                    phase.as_str()
                )));
            }
        }
        if let Some(export) = self.export(&view.export) {
            let _ = export
                .trackers()
                .remove(&crate::jobs::job::tracker_name(id));
        }
        let destination = self.abort_destination(&view, &source.destination);
        Ok(AbortOutcome {
            job_id: id,
            export: view.export.clone(),
            source: "aborted".into(),
            destination,
        })
    }

    fn jobs(&self) -> Vec<JobStatus> {
        self.jobs.list()
    }

    fn job(&self, id: u64) -> Result<JobStatus, ControlError> {
        self.jobs
            .get(id)
            .ok_or_else(|| ControlError::NotFound(format!("no migration job {id}")))
    }

    fn migration_status(
        &self,
        batch: Option<&str>,
    ) -> Result<Vec<crate::api::types::DiskStatus>, ControlError> {
        let journal = self.journal.lock().expect("journal lock").clone();
        let key = self.cluster_key.lock().expect("key lock").clone();
        super::status::disks(journal.as_ref(), key.as_ref(), batch)
    }

    fn journal_jobs(
        &self,
        batch: Option<&str>,
    ) -> Result<Vec<crate::api::types::JournalJob>, ControlError> {
        let journal = self.journal.lock().expect("journal lock").clone();
        super::status::journal_jobs(journal.as_ref(), batch)
    }
}
