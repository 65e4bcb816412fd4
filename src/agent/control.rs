//! The control API's view of the agent: each request handed to the part that owns it
//! (exports, trackers, migrations, the manager epoch fence, the lease witness). Nothing is
//! decided here.

use std::sync::Arc;

use crate::agent::exports::Exports;
use crate::agent::fencing::Fencing;
use crate::agent::migrations::Migrations;
use crate::agent::seeds::Seeds;
use crate::agent::trackers::Trackers;
use crate::agent::witness::WitnessService;
use crate::api::leases::{LeaseCall, LeaseReply, LeaseStatus, WitnessCounters};
use crate::api::types::{
    AbortOutcome, DiskStatus, ExportSpec, ExportStatus, HeatMap, JobStatus, JournalJob,
    MigrateRequest, SeedExportRequest, SeedImportRequest, SeedInfo, SeedInspectRequest,
    SeedRunStatus, SeedSyncRequest, StaleImage, TrackerAdd, TrackerStatus,
};
use crate::api::{Control, ControlError, EpochHold};

/// What the API server calls.
#[derive(Debug)]
pub struct AgentControl {
    /// The export table.
    pub exports: Arc<Exports>,
    /// Their trackers.
    pub trackers: Trackers,
    /// Migrations from this agent.
    pub migrations: Migrations,
    /// Seeds exported and imported here.
    pub seeds: Seeds,
    /// The highest manager epoch seen; older managers' commands are refused.
    pub fencing: Arc<Fencing>,
    /// The manager pairs' leases this agent keeps as witness.
    pub witness: WitnessService,
}

impl Control for AgentControl {
    fn exports(&self) -> Vec<ExportStatus> {
        self.exports.statuses()
    }

    fn add_export(&self, spec: ExportSpec) -> Result<ExportStatus, ControlError> {
        self.exports.add_export(spec)
    }

    fn remove_export(&self, name: &str, force: bool) -> Result<(), ControlError> {
        self.exports.remove_export(name, force)
    }

    fn trackers(&self, export: &str) -> Result<Vec<TrackerStatus>, ControlError> {
        self.trackers.trackers(export)
    }

    fn add_tracker(&self, export: &str, add: TrackerAdd) -> Result<TrackerStatus, ControlError> {
        self.trackers.add_tracker(export, add)
    }

    fn remove_tracker(&self, export: &str, tracker: &str) -> Result<(), ControlError> {
        self.trackers.remove_tracker(export, tracker)
    }

    fn heat(
        &self,
        export: &str,
        tracker: Option<&str>,
        cells: usize,
    ) -> Result<HeatMap, ControlError> {
        self.trackers.heat(export, tracker, cells)
    }

    fn migrate(&self, export: &str, request: MigrateRequest) -> Result<JobStatus, ControlError> {
        self.migrations.migrate(export, request)
    }

    fn seed_export(&self, request: SeedExportRequest) -> Result<SeedRunStatus, ControlError> {
        self.seeds.export(&self.migrations, request)
    }

    fn seed_import(&self, request: SeedImportRequest) -> Result<SeedRunStatus, ControlError> {
        self.seeds.import(request)
    }

    fn seed_inspect(&self, request: SeedInspectRequest) -> Result<SeedInfo, ControlError> {
        self.seeds.inspect(request)
    }

    fn seeds(&self) -> Vec<SeedRunStatus> {
        self.seeds.list()
    }

    fn seed(&self, seed_id: &str) -> Result<SeedRunStatus, ControlError> {
        self.seeds.get(seed_id)
    }

    fn seed_stop(&self, seed_id: &str) -> Result<SeedRunStatus, ControlError> {
        self.seeds.stop(seed_id)
    }

    fn seed_sync(&self, export: &str, request: SeedSyncRequest) -> Result<JobStatus, ControlError> {
        self.seeds.sync(&self.migrations, export, request)
    }

    fn stop_job(&self, id: u64) -> Result<JobStatus, ControlError> {
        self.migrations.stop_job(id)
    }

    fn abort_job(&self, id: u64) -> Result<AbortOutcome, ControlError> {
        self.migrations.abort_job(id)
    }

    fn jobs(&self) -> Vec<JobStatus> {
        self.migrations.jobs()
    }

    fn job(&self, id: u64) -> Result<JobStatus, ControlError> {
        self.migrations.job(id)
    }

    fn migration_status(&self, batch: Option<&str>) -> Result<Vec<DiskStatus>, ControlError> {
        self.migrations.disk_status(batch)
    }

    fn journal_jobs(&self, batch: Option<&str>) -> Result<Vec<JournalJob>, ControlError> {
        self.migrations.journal_jobs(batch)
    }

    fn collect_stale(&self, dry_run: bool) -> Result<Vec<StaleImage>, ControlError> {
        Ok(super::gc::collect(
            self.migrations.journal(),
            &self.exports,
            dry_run,
        ))
    }

    fn admit_epoch(&self, epoch: u64) -> Result<EpochHold<'_>, ControlError> {
        let admitted = self.fencing.admit(epoch)?;
        Ok(EpochHold::new(admitted))
    }

    fn manager_epoch(&self) -> u64 {
        self.fencing.highest()
    }

    fn lease(&self, pair: &str, call: &LeaseCall) -> Result<LeaseReply, ControlError> {
        let reply = self
            .witness
            .serve(pair, &call.request, call.lease_ms, call.write_timeout())?;
        Ok(reply)
    }

    fn leases(&self) -> Vec<LeaseStatus> {
        self.witness.statuses()
    }

    fn witness_counters(&self) -> WitnessCounters {
        WitnessCounters {
            pairs: u64::try_from(self.witness.pair_count()).unwrap_or(u64::MAX),
            write_failures: self.witness.write_failures(),
        }
    }
}
