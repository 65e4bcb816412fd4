//! Migrations started from this agent, as the control API drives them: a migrate request
//! checked and turned into a job, a resume checked against the journal, an abort recorded and
//! carried to the destination, the job table listed.
//!
//! Invariants: a resume continues only an interrupted (`copying`) source job of the same
//! export; an abort is journaled before the destination is told, and only an uncommitted job
//! can be aborted; job ids never repeat one the journal holds.

use std::sync::Arc;

use super::exports::Exports;
use super::holding;
use crate::api::types::{AbortOutcome, DiskStatus, JobStatus, JournalJob, MigrateRequest};
use crate::api::ControlError;
use crate::disk::Export;
use crate::error::error_chain;
use crate::jobs::holder::HolderChoice;
use crate::jobs::job::{job_granularity, JobRequest, ManagerEpoch};
use crate::jobs::sync::SeedSync;
use crate::jobs::Jobs;
use crate::journal::{JobView, Record, Role, SharedJournal, Side, SourcePhase};
use crate::migrate::steer::{ImpactTarget, BASELINE_MIN_OPS};
use crate::migrate::{MigrateOptions, Policy};
use crate::transfer::{abort_target, resolve_peer, ClusterKey, SendOptions, TargetSpec};

/// Bytes a migration hands to one send (one sync round trip, one progress and bandwidth
/// sample), whatever the tracking granularity: ~30 ms of copy at disk speed. (At 4 KiB
/// tracking a fixed 256 blocks made sends of 1 MiB, each waiting for a sync.)
pub const SEND_CHUNK_BYTES: u64 = 16 << 20;
/// The largest `weight` a job may be given (its share against a weight-1 job's).
pub const MAX_WEIGHT: u32 = 100;

/// Reads in flight of a seed catch-up's sends.
const SEED_READ_DEPTH: usize = 32;

/// The migrations of one agent.
#[derive(Debug)]
pub struct Migrations {
    exports: Arc<Exports>,
    jobs: Jobs,
    /// Key authenticating block streams to other agents.
    cluster_key: ClusterKey,
    /// Where every job records its steps.
    journal: SharedJournal,
    /// This agent's block-stream address, as jobs name it to destinations when this agent
    /// holds the guest's connection.
    holder_addr: String,
    /// The agent's manager-epoch fence, named by the Open and Commit of a manager's job.
    epochs: Arc<dyn ManagerEpoch>,
}

impl Migrations {
    /// Migrations of `exports`, recorded in `journal`; new job ids continue above the
    /// highest the journal holds.
    /// `holder_addr` is this agent's block-stream address.
    pub fn new(
        exports: Arc<Exports>,
        cluster_key: ClusterKey,
        journal: SharedJournal,
        holder_addr: String,
        epochs: Arc<dyn ManagerEpoch>,
    ) -> Self {
        let jobs = Jobs::new();
        if let Some(highest) = journal.views().iter().map(|view| view.job_id).max() {
            jobs.ids_above(highest);
        }
        Migrations {
            exports,
            jobs,
            cluster_key,
            journal,
            holder_addr,
            epochs,
        }
    }

    /// A new job id (a seed's job, journaled by the seed export).
    pub fn reserve_job_id(&self) -> u64 {
        self.jobs.reserve_id()
    }

    /// Asks job `id` to stop after its current run (a continuous replication).
    pub fn stop_job(&self, id: u64) -> Result<JobStatus, ControlError> {
        if !self.jobs.stop(id) {
            return Err(ControlError::NotFound(format!("no running job {id}")));
        }
        self.job(id)
    }

    /// The journal every job records its steps in.
    pub fn journal(&self) -> &SharedJournal {
        &self.journal
    }

    /// Who holds the guest's connection to `export`'s disk, for a new job or the resume of
    /// `resume_job` (as its first run journaled it).
    fn holder(&self, export: &str, resume_job: Option<u64>) -> HolderChoice {
        let journaled = match resume_job {
            Some(job_id) => {
                self.journal
                    .view(job_id, Role::Source)
                    .and_then(|view| match view.side {
                        Side::Source(source) => source.holder,
                        Side::Target(_) => None,
                    })
            }
            None => holding::holder_for(&self.journal, export),
        };
        journaled.map_or_else(
            || HolderChoice::Here {
                addr: self.holder_addr.clone(),
            },
            HolderChoice::Elsewhere,
        )
    }

    /// A resume of `job_id` for `export` must continue an interrupted job of this export.
    fn check_resumable(&self, export: &Export, job_id: u64) -> Result<(), ControlError> {
        let view = self
            .journal
            .view(job_id, Role::Source)
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
        if destination.starts_with("seed:") {
            // A seed's job names its seed, not a destination: an agent that imported it
            // keeps an unserved image until it is removed there.
            return "none to tell (a seed; remove an imported image at its agent)".into();
        }
        let told = abort_target(destination, &self.cluster_key, &target_spec(view));
        match told {
            Ok(()) => "aborted".into(),
            Err(err) => format!(
                "not told ({}); its image stays until `ferry abort` again",
                error_chain(&err)
            ),
        }
    }

    /// Checks a migrate (or resume) request and starts its job.
    pub fn migrate(
        &self,
        export: &str,
        request: MigrateRequest,
    ) -> Result<JobStatus, ControlError> {
        self.start_job(export, request, None)
    }

    /// Starts a migrate, resume or seed catch-up job (`seed`: the catch-up's part; its
    /// request resumes the seed's job).
    pub(super) fn start_job(
        &self,
        export: &str,
        request: MigrateRequest,
        seed: Option<(SeedSync, Option<u64>)>,
    ) -> Result<JobStatus, ControlError> {
        let request = super::status::with_journaled_settings(Some(&self.journal), request);
        let export = self.exports.get(export)?;
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
        let impact = impact_bound(&request, &export)?;
        let weight = match request.weight {
            None => 1,
            Some(weight @ 1..=MAX_WEIGHT) => weight,
            Some(_) => {
                return Err(ControlError::Invalid(format!(
                    "weight: give 1 to {MAX_WEIGHT}"
                )))
            }
        };
        options.impact_target_us = impact.bound_us;
        options.impact_own_us = impact.own_us;
        options.impact_strict = impact.strict;
        if let Some(granularity_bytes) = request.granularity_bytes {
            crate::dirty::validate_granularity(granularity_bytes)
                .map_err(|err| ControlError::Invalid(format!("granularity: {err}")))?;
        }
        // A resume's is the journaled one (`with_journaled_settings`), never re-derived.
        let tracker_granularity_bytes = job_granularity(
            request.granularity_bytes,
            export.granularity_bytes(),
            export.size_bytes(),
        );
        options.chunk_blocks = (SEND_CHUNK_BYTES / tracker_granularity_bytes).max(1);
        if let Some(batch) = &request.batch {
            crate::name::validate(batch)
                .map_err(|err| ControlError::Invalid(format!("batch: {err}")))?;
        }
        let journal = Some(self.journal.clone());
        let resuming = request.resume_job.is_some();
        let mut tracker_kept = false;
        let mut tracker_recovered = false;
        if let Some(job_id) = request.resume_job {
            self.check_resumable(&export, job_id)?;
            // The failed run left its tracker: its bits are what the destination may lack.
            // Without it (or lost in an unclean stop), all allocated blocks are candidates.
            let tracker = export
                .trackers()
                .get(&crate::jobs::job::tracker_name(job_id));
            tracker_kept = tracker.as_ref().is_some_and(|tracker| !tracker.is_lost());
            tracker_recovered = tracker.is_some_and(|tracker| {
                matches!(
                    tracker.state(),
                    crate::dirty::TrackerState::Recovered { .. }
                )
            });
            options.resume = tracker_kept;
        }
        // On a resume the destination holds part of the disk: compare before sending. A
        // seed's destination holds all of it as the seed saw it: its tracker says what
        // changed since, and without the tracker only digests can say.
        // A tracker recovered from its log after a crash marks whole extents: its bits are
        // compared before they are sent.
        let compare_digests = match &seed {
            None => resuming,
            Some(_) => !tracker_kept || tracker_recovered,
        };
        let seed = seed.map(|(mut sync, threshold_bytes)| {
            sync.compare_all = !tracker_kept;
            options.ending = crate::migrate::Ending::InSync;
            options.threshold_bytes = threshold_bytes;
            sync
        });
        options
            .validate()
            .map_err(|p| ControlError::Invalid(p.to_string()))?;
        let mut send = SendOptions {
            bandwidth_bytes_per_s: request.bandwidth_bytes_per_s,
            ..SendOptions::default()
        };
        if seed.is_some() {
            // A catch-up sends scattered blocks (what changed since the seed): reads of one
            // block each, so more of them in flight.
            send.read_depth = SEED_READ_DEPTH;
        }
        let key = self.cluster_key.clone();
        let holder = self.holder(export.name(), request.resume_job);
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
                    holder,
                    tracker_granularity_bytes,
                    seed,
                    manager_epoch: request.manager_epoch.map(|_| Arc::clone(&self.epochs)),
                    weight,
                },
                key,
                request.resume_job,
            )
            .map_err(ControlError::Busy)
    }

    /// Aborts an uncommitted job: journaled first, its tracker dropped, the destination told.
    pub fn abort_job(&self, id: u64) -> Result<AbortOutcome, ControlError> {
        let journal = &self.journal;
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
                .map_err(|err| ControlError::Io(error_chain(&err)))?,
            SourcePhase::Aborted => {} // again: the destination may not have heard it
            phase => {
                return Err(ControlError::Invalid(format!(
                    "job {id} is {}: only an uncommitted migration can be aborted",
                    phase.as_str()
                )));
            }
        }
        if let Some(export) = self.exports.export(&view.export) {
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

    /// Every job started since the agent started.
    pub fn jobs(&self) -> Vec<JobStatus> {
        self.jobs.list()
    }

    /// Per-disk verdicts of the jobs in the journal (of `batch`), asking destinations, with
    /// what each export forwarded now does.
    pub fn disk_status(&self, batch: Option<&str>) -> Result<Vec<DiskStatus>, ControlError> {
        let mut lines = super::status::disks(Some(&self.journal), Some(&self.cluster_key), batch)?;
        super::status::attach_forwarding(&mut lines, |name| {
            self.exports.export(name)?.forwarding()
        });
        Ok(lines)
    }

    /// The journal's jobs (of `batch`).
    pub fn journal_jobs(&self, batch: Option<&str>) -> Result<Vec<JournalJob>, ControlError> {
        super::status::journal_jobs(Some(&self.journal), batch)
    }

    /// One job.
    pub fn job(&self, id: u64) -> Result<JobStatus, ControlError> {
        self.jobs
            .get(id)
            .ok_or_else(|| ControlError::NotFound(format!("no migration job {id}")))
    }
}

/// What a job's copy is steered to (`MigrateOptions::impact_*`).
struct Impact {
    bound_us: Option<u64>,
    own_us: Option<u64>,
    strict: bool,
}

/// The guest p99 bound (µs) the job's copy is steered to: `max_impact` (default `auto`:
/// twice the guest's own p99 where slowing spares it; `off` for none), or `4ms` for a bare
/// `yield_to_guest`. The guest's own p99 is that of every request the export served so far,
/// once there are enough of them.
fn impact_bound(request: &MigrateRequest, export: &Export) -> Result<Impact, ControlError> {
    let target = match (&request.max_impact, request.yield_to_guest) {
        (Some(text), _) => text
            .parse::<ImpactTarget>()
            .map_err(|err| ControlError::Invalid(err.to_string()))?,
        (None, Some(true)) => ImpactTarget::Absolute { p99_us: 4_000 },
        (None, _) => ImpactTarget::default(),
    };
    let latency = export.latency();
    let own_us = (latency.count() >= BASELINE_MIN_OPS).then(|| latency.summary().p99);
    let bound_us = target.bound_us(own_us);
    if let Some(bound_us) = bound_us {
        log::info!(
            "export {}: the copy keeps the guest's p99 within {bound_us} µs ({target}; its own \
             {})",
            export.name(),
            own_us.map_or_else(|| "unknown".to_string(), |us| format!("{us} µs")),
        );
    }
    Ok(Impact {
        bound_us,
        own_us,
        strict: target.strict(),
    })
}

/// What the destination of `view`'s job knows it by.
pub fn target_spec(view: &JobView) -> TargetSpec {
    TargetSpec {
        export: view.export.clone(),
        size_bytes: view.size_bytes,
        granularity_bytes: view.granularity_bytes,
        job_id: view.job_id,
        batch: view.batch.clone(),
        holder: None,
        seed: match &view.side {
            Side::Source(source) => source.seed.as_ref().map(|seed| seed.seed_id),
            Side::Target(_) => None,
        },
        // Asking about or aborting a job is not fenced.
        manager_epoch: None,
    }
}
