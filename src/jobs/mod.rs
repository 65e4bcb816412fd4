//! The agent's migration jobs: started through the control API, each on its own thread,
//! observable while they run (progress) and after (report or error).
//!
//! Invariants: at most one job per export at a time; a job's status says which side is
//! authoritative when it failed, straight from the algorithm's error (never guessed); the
//! reported guest write latency is measured by the export's sessions during the job.

pub mod fair;
pub mod holder;
pub mod job;
pub mod seeding;
pub mod sync;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::disk::Export;
use crate::journal::JobSettings;
use crate::metrics::LatencySummary;
use crate::migrate::{MigrateError, MigrationReport, Progress};
use crate::transfer::ClusterKey;
use holder::HolderChoice;
use job::{JobEnv, JobRequest, VerifyOutcome};
use sync::SyncStatus;

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobPhase {
    /// Copying or switching over.
    Running,
    /// Switched over: the destination serves the disk, the source forwards to it.
    Done,
    /// Stopped; `authoritative` says which side holds the disk.
    Failed,
}

/// What `GET /v1/jobs/{id}` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    /// Job id.
    pub id: u64,
    /// Export being moved.
    pub export: String,
    /// Destination agent's block-stream address.
    pub to: String,
    /// Policy name.
    pub policy: String,
    /// Phase.
    pub phase: JobPhase,
    /// "source" or "destination": which side holds the disk now.
    pub authoritative: String,
    /// Latest progress sample.
    pub progress: Option<Progress>,
    /// The report, once done.
    pub report: Option<MigrationReport>,
    /// Guest write latency during the job (µs), measured at the source's sessions.
    pub guest_write_latency_us: Option<LatencySummary>,
    /// Guest writes completed during the job.
    pub guest_writes: u64,
    /// Seconds the job has run (or ran).
    pub elapsed_s: f64,
    /// Why it failed.
    pub error: Option<String>,
    /// Both images compared at the switchover point (when asked for).
    pub verify: Option<VerifyOutcome>,
    /// What the job runs with (a resume: the journaled settings, with the request's
    /// overrides); absent from agents that did not report it.
    #[serde(default)]
    pub settings: Option<JobSettings>,
    /// The agent holding the guest's connection, when another one: told where the disk
    /// went after the switchover ("telling ADDR", then its answer); the job is done once it
    /// answered.
    #[serde(default)]
    pub holder: Option<String>,
    /// A seed catch-up (`ferry seed sync`): its state and figures.
    #[serde(default)]
    pub sync: Option<SyncStatus>,
    /// Its share of the copying while other jobs copied too ([`fair`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<fair::ShareStatus>,
}

impl JobStatus {
    /// A job that is starting: running, the source authoritative, nothing measured yet.
    pub fn starting(id: u64, export: &str, to: &str, policy: &str) -> JobStatus {
        JobStatus {
            id,
            export: export.into(),
            to: to.into(),
            policy: policy.into(),
            phase: JobPhase::Running,
            authoritative: "source".into(),
            progress: None,
            report: None,
            guest_write_latency_us: None,
            guest_writes: 0,
            elapsed_s: 0.0,
            error: None,
            verify: None,
            settings: None,
            holder: None,
            sync: None,
            share: None,
        }
    }
}

/// One job's shared state.
#[derive(Debug)]
struct Job {
    status: Mutex<JobStatus>,
    progress: Arc<Mutex<Option<Progress>>>,
    verify: Arc<Mutex<Option<VerifyOutcome>>>,
    /// A seed catch-up's own figures.
    sync: Arc<Mutex<SyncStatus>>,
    /// Asked to stop (a continuous replication ends after its current run).
    stop: AtomicBool,
    started: Instant,
    /// Its share while other jobs copied too.
    share: Arc<Mutex<Option<fair::ShareStatus>>>,
}

/// Every job of this agent.
#[derive(Debug, Default)]
pub struct Jobs {
    next_id: AtomicU64,
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
    /// The running jobs' shares of the copying.
    fair: Arc<fair::FairShare>,
}

impl Jobs {
    /// An empty job table; ids start at a random base (a multiple of 1000 below 10^12) so
    /// that two agents rarely issue the same id: a disk's lineage and its holder are named
    /// by job id across agents. (A base from the start second made agents started together
    /// number their jobs alike.)
    pub fn new() -> Self {
        let random = crate::transfer::key::random_bytes().map_or_else(
            |_| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64 ^ u64::from(std::process::id()))
            },
            |bytes| u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")),
        );
        let base = random % 1_000_000_000 * 1000;
        Jobs {
            next_id: AtomicU64::new(base + 1),
            jobs: Mutex::new(BTreeMap::new()),
            fair: Arc::default(),
        }
    }

    /// New ids start above `job_id` (the journal's highest), so no id is reused.
    pub fn ids_above(&self, job_id: u64) {
        self.next_id.fetch_max(job_id + 1, Ordering::Relaxed);
    }

    /// Starts migrating `export`; fails at once if another job runs on it.
    /// `resume_id`: the id of an interrupted job this one continues.
    pub fn start(
        &self,
        export: Arc<Export>,
        request: JobRequest,
        key: ClusterKey,
        resume_id: Option<u64>,
    ) -> Result<JobStatus, String> {
        let mut jobs = self.jobs.lock().expect("jobs lock");
        let busy = jobs.values().any(|job| {
            let status = job.status.lock().expect("status lock");
            status.export == export.name() && status.phase == JobPhase::Running
        });
        if busy {
            return Err(format!(
                "export '{}' is already being migrated",
                export.name()
            ));
        }
        if export.is_forwarded() {
            return Err(format!(
                "export '{}' was migrated already (it forwards)",
                export.name()
            ));
        }
        let id = resume_id.unwrap_or_else(|| self.next_id.fetch_add(1, Ordering::Relaxed));
        let status = JobStatus {
            settings: Some(request.settings()),
            sync: request.seed.as_ref().map(|_| SyncStatus::default()),
            ..JobStatus::starting(
                id,
                export.name(),
                &request.to.to_string(),
                &request.options.policy.to_string(),
            )
        };
        let job = Arc::new(Job {
            status: Mutex::new(status),
            progress: Arc::new(Mutex::new(None)),
            verify: Arc::new(Mutex::new(None)),
            sync: Arc::new(Mutex::new(SyncStatus {
                seed_id: request
                    .seed
                    .as_ref()
                    .map(|sync| crate::journal::seed::seed_id_hex(&sync.seed_id))
                    .unwrap_or_default(),
                state: "catching-up".into(),
                compared_all: request.seed.as_ref().is_some_and(|sync| sync.compare_all),
                ..SyncStatus::default()
            })),
            stop: AtomicBool::new(false),
            started: Instant::now(),
            share: Arc::new(Mutex::new(None)),
        });
        jobs.insert(id, job.clone());
        drop(jobs);
        let thread_job = job.clone();
        let seat = self.fair.join(id, request.weight);
        std::thread::Builder::new()
            .name(format!("migrate-{id}"))
            .spawn(move || run_job(&thread_job, export, request, (key, seat), id))
            .map_err(|err| format!("cannot start the job thread: {err}"))?;
        Ok(self.status_of(&job))
    }

    fn status_of(&self, job: &Job) -> JobStatus {
        let mut status = job.status.lock().expect("status lock").clone();
        if status.sync.is_some() {
            status.sync = Some(job.sync.lock().expect("sync lock").clone());
        }
        status.share = *job.share.lock().expect("share lock");
        if status.phase == JobPhase::Running {
            status.elapsed_s = job.started.elapsed().as_secs_f64();
            status.progress = job.progress.lock().expect("progress lock").clone();
        }
        status
    }

    /// Every job, oldest first.
    pub fn list(&self) -> Vec<JobStatus> {
        let jobs: Vec<Arc<Job>> = self
            .jobs
            .lock()
            .expect("jobs lock")
            .values()
            .cloned()
            .collect();
        jobs.iter().map(|job| self.status_of(job)).collect()
    }

    /// A new job id, for a job the caller journals itself (a seed's).
    pub fn reserve_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Asks job `id` to stop after its current run (a continuous replication); false when
    /// no such job runs.
    pub fn stop(&self, id: u64) -> bool {
        let Some(job) = self.jobs.lock().expect("jobs lock").get(&id).cloned() else {
            return false;
        };
        job.stop.store(true, Ordering::Release);
        let running = job.status.lock().expect("status lock").phase == JobPhase::Running;
        running
    }

    /// Whether job `id` is running now.
    pub fn is_running(&self, id: u64) -> bool {
        self.get(id)
            .is_some_and(|status| status.phase == JobPhase::Running)
    }

    /// One job.
    pub fn get(&self, id: u64) -> Option<JobStatus> {
        let job = self.jobs.lock().expect("jobs lock").get(&id).cloned()?;
        Some(self.status_of(&job))
    }
}

/// The job thread: runs the algorithm and records the outcome.
fn run_job(
    job: &Job,
    export: Arc<Export>,
    request: JobRequest,
    (key, seat): (ClusterKey, fair::FairSeat),
    id: u64,
) {
    let write_ops_before = export.counts().write_ops;
    let latency_before = export.write_latency();
    // A panic is a bug (and aborts a release build); in a test build the job must still end
    // as failed so that nobody waits for it forever. Held writes stay held: after a panic
    // nobody knows which side is authoritative, and releasing could apply writes wrongly.
    let run = std::panic::AssertUnwindSafe(|| {
        JobEnv::start(
            export.clone(),
            &request,
            &key,
            id,
            job.progress.clone(),
            job.verify.clone(),
        )
        .map_err(|err| (false, crate::error::error_chain(&err)))
        .and_then(|mut env| {
            env.share_with(seat, job.share.clone());
            let result = match &request.seed {
                None => crate::migrate::run(&mut env, &request.options),
                Some(sync) => sync::drive(&mut env, &request.options, sync, &job.sync, &job.stop),
            };
            // Kept for a resume while the source is authoritative (and at an in-sync point,
            // where the tracker goes on covering every write since).
            let keep = match &result {
                Ok(report) => report.in_sync,
                Err(err) => !err.destination_authoritative(),
            };
            let bytes_mirrored = env.finish(keep).mirrored_bytes();
            result
                .map(|mut report| {
                    report.bytes_mirrored = bytes_mirrored;
                    report
                })
                .map_err(|err| (err.destination_authoritative(), describe(&err)))
        })
    });
    let outcome = std::panic::catch_unwind(run).unwrap_or_else(|_| {
        Err((
            false,
            "internal error (panic): the export may hold guest writes".to_string(),
        ))
    });
    let mut during = export.write_latency();
    during.subtract(&latency_before);
    let mut status = job.status.lock().expect("status lock");
    status.elapsed_s = job.started.elapsed().as_secs_f64();
    status.progress = job.progress.lock().expect("progress lock").clone();
    status.verify = job.verify.lock().expect("verify lock").clone();
    status.guest_writes = export.counts().write_ops - write_ops_before;
    status.guest_write_latency_us = (during.count() > 0).then(|| during.summary());
    if let (Ok(_), Some(journal), HolderChoice::Elsewhere(holder)) =
        (&outcome, &request.journal, &request.holder)
    {
        status.phase = JobPhase::Running;
        status.authoritative = "destination".into();
        status.holder = Some(format!("telling {} (job {})", holder.addr, holder.job_id));
        drop(status);
        let told = holder::tell_holder(journal, &key, id);
        status = job.status.lock().expect("status lock");
        status.holder = told.map(|outcome| {
            format!(
                "{} (job {}): {}",
                holder.addr,
                holder.job_id,
                outcome.as_str()
            )
        });
    }
    match outcome {
        Ok(report) if report.in_sync => {
            log::info!(
                "export {}: in sync at {} after {:.1} s (pause {:.1} ms)",
                export.name(),
                status.to,
                report.converge_ms / 1000.0,
                report.pause_ms,
            );
            status.phase = JobPhase::Done;
            status.authoritative = "source".into();
            status.report = Some(report);
        }
        Ok(report) => {
            log::info!(
                "export {}: migrated to {} in {:.1} s (pause {:.1} ms, {} passes)",
                export.name(),
                status.to,
                report.converge_ms / 1000.0,
                report.pause_ms,
                report.passes.len()
            );
            status.phase = JobPhase::Done;
            status.authoritative = "destination".into();
            status.report = Some(report);
        }
        Err((destination, message)) => {
            log::error!("export {}: migration failed: {message}", export.name());
            status.phase = JobPhase::Failed;
            status.authoritative = if destination { "destination" } else { "source" }.into();
            status.error = Some(message);
        }
    }
}

fn describe<E: std::error::Error + 'static>(err: &MigrateError<E>) -> String {
    crate::error::error_chain(err)
}
