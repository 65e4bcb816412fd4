//! Batches the active manager drives across agents: plans kept by both managers, each item's
//! state read back from its source agent's journal every round.
//!
//! Invariants:
//! - The agents' journals are the truth. A round asks every source agent for the batch's
//!   verdicts (`GET /v1/status?batch=`) and its running jobs, and derives each item's state
//!   ([`item_state`], pure); the driver keeps nothing else. So a manager that just took over
//!   carries on every stored batch from where the agents are, with no hand-over.
//! - Plans are saved (atomically) before they are acknowledged, and sent to the peer manager,
//!   which saves them too: a failover finds them.
//! - Only the active drives, and every command carries its epoch: a deposed active's start
//!   or resume is refused by any agent that saw the newer epoch.
//! - An item is started at most once per round, and only when no job of the batch for its
//!   export is running or journaled at its source; a resumable job is resumed, never started
//!   anew; an item needing attention is left to the operator.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use thiserror::Error;

use super::fleet::Fleet;
use super::shared::Shared;
use crate::api::fleet::{BatchItemView, BatchPlan, BatchView};
use crate::api::types::{JobPhase, JobStatus};
use crate::jobs::sync::SyncThen;
use crate::journal::status::DiskStatus;

/// How often the driver looks at the batches.
pub const ROUND: Duration = Duration::from_millis(500);
/// Most batches kept.
const MAX_BATCHES: usize = 256;
/// Largest plan file read back.
const MAX_PLAN_BYTES: u64 = 4 << 20;

/// Why a plan cannot be kept.
#[derive(Debug, Error)]
pub enum BatchError {
    /// Reading or writing the plans failed.
    #[error("batch plans in {}", dir.display())]
    Io {
        /// The directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Too many batches are kept.
    #[error("{MAX_BATCHES} batches are kept already")]
    Full,
}

/// Where plans are kept: `<manager-dir>/batches/<name>.json`.
#[derive(Debug, Clone)]
pub struct BatchStore {
    dir: PathBuf,
}

impl BatchStore {
    /// The store under `manager_dir`.
    pub fn new(manager_dir: &Path) -> Self {
        Self {
            dir: manager_dir.join("batches"),
        }
    }

    fn io(&self, source: std::io::Error) -> BatchError {
        BatchError::Io {
            dir: self.dir.clone(),
            source,
        }
    }

    /// Saves `plan` (its name was checked against the name rule).
    pub fn save(&self, plan: &BatchPlan) -> Result<(), BatchError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| self.io(e))?;
        let path = self.dir.join(format!("{}.json", plan.name));
        if !path.exists() && self.load_all()?.len() >= MAX_BATCHES {
            return Err(BatchError::Full);
        }
        let bytes = serde_json::to_vec_pretty(plan).expect("plans serialize");
        crate::durable::write_atomic(&path, &bytes)
            .map_err(|e| self.io(std::io::Error::other(crate::error::error_chain(&e))))
    }

    /// Every plan kept; an unreadable one is logged and skipped.
    pub fn load_all(&self) -> Result<Vec<BatchPlan>, BatchError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(self.io(err)),
        };
        let mut plans = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|ext| ext != "json") {
                continue;
            }
            match read_plan(&path) {
                Ok(plan) => plans.push(plan),
                Err(err) => log::warn!("batch plan {}: {err}", path.display()),
            }
        }
        plans.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(plans)
    }
}

fn read_plan(path: &Path) -> Result<BatchPlan, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    file.take(MAX_PLAN_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

/// An item's state, from its source agent's journal lines of the batch and running jobs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ItemState {
    /// No job yet.
    Waiting,
    /// A job runs.
    Running(u64),
    /// Its job stopped and can be resumed.
    Resumable(u64),
    /// Done.
    Migrated(u64),
    /// A seed replication reached its in-sync point and stopped there (`then: stop`).
    InSync(u64),
    /// Ended without moving (aborted or failed for good).
    NotMigrated(u64, String),
    /// The journals disagree or a side is unreachable: the operator decides.
    NeedsAttention(u64, String),
    /// The source agent did not answer this round.
    Unknown(String),
}

impl ItemState {
    /// Whether nothing more will happen to it.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            Self::Migrated(_) | Self::InSync(_) | Self::NotMigrated(..)
        )
    }
}

/// The state of `export` from its source's `lines` (the batch's verdicts) and running
/// `jobs`. The latest job (highest id) of the export counts.
pub fn item_state(export: &str, lines: &[DiskStatus], jobs: &[JobStatus]) -> ItemState {
    let latest = lines
        .iter()
        .filter(|line| line.export == export && line.role == "source")
        .max_by_key(|line| line.job_id);
    let running = |id: u64| {
        jobs.iter()
            .any(|job| job.id == id && job.phase == JobPhase::Running)
    };
    let Some(line) = latest else {
        return ItemState::Waiting;
    };
    let id = line.job_id;
    if running(id) {
        return ItemState::Running(id);
    }
    match line.verdict.as_str() {
        "migrated" => ItemState::Migrated(id),
        "resumable" => ItemState::Resumable(id),
        "not-migrated" => ItemState::NotMigrated(id, line.reason.clone()),
        _ => ItemState::NeedsAttention(id, line.reason.clone()),
    }
}

/// A source agent's verdicts of a batch and its jobs.
type SourceView = (Vec<DiskStatus>, Vec<JobStatus>);

/// The driver: a thread that drives every stored batch while this manager is active.
pub struct Driver {
    store: BatchStore,
    fleet: Arc<Fleet>,
    shared: Arc<Shared>,
    /// What the last round saw, for `GET /v1/manager/batches`.
    pub views: Mutex<Vec<BatchView>>,
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver").finish_non_exhaustive()
    }
}

impl Driver {
    /// A driver of the plans in `store`, talking to `fleet`'s agents.
    pub fn new(store: BatchStore, fleet: Arc<Fleet>, shared: Arc<Shared>) -> Self {
        Self {
            store,
            fleet,
            shared,
            views: Mutex::new(Vec::new()),
        }
    }

    /// The plans' store.
    pub fn store(&self) -> &BatchStore {
        &self.store
    }

    /// Runs rounds until the manager stops.
    pub fn run(&self) {
        while !self.shared.stop.load(Ordering::Relaxed) {
            std::thread::sleep(ROUND);
            match self.store.load_all() {
                Ok(plans) => {
                    let views = plans.iter().map(|plan| self.round(plan)).collect();
                    *self.views.lock().unwrap_or_else(|p| p.into_inner()) = views;
                }
                Err(err) => log::warn!("{}", crate::error::error_chain(&err)),
            }
        }
    }

    /// One look at `plan`; starts or resumes items when active.
    fn round(&self, plan: &BatchPlan) -> BatchView {
        let mut seen: HashMap<&str, Result<SourceView, String>> = HashMap::new();
        let mut states = Vec::with_capacity(plan.items.len());
        for item in &plan.items {
            let source = item.source.as_deref().unwrap_or_default();
            let answer = seen
                .entry(source)
                .or_insert_with(|| self.look(source, plan));
            let state = match answer {
                Ok((lines, jobs)) => match &plan.seed_sync {
                    None => item_state(&item.export, lines, jobs),
                    Some(sync) => seed_item_state(&item.export, lines, jobs, sync.then),
                },
                Err(err) => ItemState::Unknown(err.clone()),
            };
            states.push(state);
        }
        if self.shared.acting_epoch().is_some() {
            self.act(plan, &mut states);
        }
        view(plan, &states)
    }

    fn look(&self, source: &str, plan: &BatchPlan) -> Result<SourceView, String> {
        let agent = self
            .fleet
            .get(source)
            .ok_or_else(|| format!("{source} is not a managed host"))?;
        let client = &agent.command;
        // A seed's job was journaled by its export, under no plan of the manager's.
        let batch = match plan.seed_sync {
            None => Some(plan.name.as_str()),
            Some(_) => None,
        };
        let lines = client
            .migration_status(batch)
            .map_err(|e| crate::error::error_chain(&e))?;
        let jobs = client.jobs().map_err(|e| crate::error::error_chain(&e))?;
        Ok((lines, jobs))
    }

    /// Starts waiting items and resumes resumable ones, up to the concurrency.
    fn act(&self, plan: &BatchPlan, states: &mut [ItemState]) {
        let mut busy = states
            .iter()
            .filter(|s| matches!(s, ItemState::Running(_)))
            .count();
        for (item, state) in plan.items.iter().zip(states.iter_mut()) {
            if busy >= plan.concurrency.max(1) {
                break;
            }
            let resume_job = match state {
                ItemState::Waiting => None,
                ItemState::Resumable(id) => Some(*id),
                _ => continue,
            };
            let source = item.source.as_deref().unwrap_or_default();
            let Some(agent) = self.fleet.get(source) else {
                continue;
            };
            let client = &agent.command;
            // Read against the clock right before the command, not at the round's start.
            let Some(epoch) = self.shared.acting_epoch() else {
                return;
            };
            let started = match &plan.seed_sync {
                None => {
                    let mut request = plan.options.clone();
                    request.to.clone_from(&item.to);
                    request.batch = Some(plan.name.clone());
                    request.resume_job = resume_job;
                    client.at_epoch(epoch).migrate(&item.export, &request)
                }
                Some(sync) => {
                    let mut request = sync.clone();
                    request.to.clone_from(&item.to);
                    client.at_epoch(epoch).seed_sync(&item.export, &request)
                }
            };
            match started {
                Ok(job) => {
                    log::info!(
                        "batch {}: {} {} on {source} as job {source}:{}",
                        plan.name,
                        if resume_job.is_some() {
                            "resumed"
                        } else {
                            "started"
                        },
                        item.export,
                        job.id
                    );
                    *state = ItemState::Running(job.id);
                    busy += 1;
                }
                Err(err) => log::warn!(
                    "batch {}: {} on {source}: {}",
                    plan.name,
                    item.export,
                    crate::error::error_chain(&err)
                ),
            }
        }
    }
}

/// The state of a seed replication of `export` from its source's `lines` (all of them: a
/// seed's job belongs to no plan) and running `jobs`; `then` is what the plan's syncs do
/// once in sync. The seed's job is the export's latest. A seed still travelling or caught
/// up part way is resumed (a sync continues the seed's job: the destination refuses it
/// until it has imported the seed, and the next round tries again).
pub fn seed_item_state(
    export: &str,
    lines: &[DiskStatus],
    jobs: &[JobStatus],
    then: SyncThen,
) -> ItemState {
    let latest = lines
        .iter()
        .filter(|line| line.export == export && line.role == "source")
        .max_by_key(|line| line.job_id);
    let Some(line) = latest else {
        return ItemState::NeedsAttention(0, format!("no seed of {export} here: export one"));
    };
    let id = line.job_id;
    if jobs
        .iter()
        .any(|job| job.id == id && job.phase == JobPhase::Running)
    {
        return ItemState::Running(id);
    }
    match (line.verdict.as_str(), then) {
        ("in-sync", SyncThen::Stop) => ItemState::InSync(id),
        ("in-sync" | "catching-up" | "seed-exported" | "resumable", _) => ItemState::Resumable(id),
        ("migrated", _) => ItemState::Migrated(id),
        ("seed-exporting", _) => {
            ItemState::NeedsAttention(id, "its seed export has not finished".into())
        }
        ("not-migrated", _) => ItemState::NotMigrated(id, line.reason.clone()),
        _ => ItemState::NeedsAttention(id, line.reason.clone()),
    }
}

/// The view of a plan no round has looked at yet.
pub fn planned(plan: &BatchPlan) -> BatchView {
    view(plan, &vec![ItemState::Waiting; plan.items.len()])
}

fn view(plan: &BatchPlan, states: &[ItemState]) -> BatchView {
    let items = plan
        .items
        .iter()
        .zip(states)
        .map(|(item, state)| {
            let source = item.source.clone().unwrap_or_default();
            let job = |id: &u64| Some(format!("{source}:{id}"));
            let (name, job, reason) = match state {
                ItemState::Waiting => ("waiting", None, None),
                ItemState::Running(id) => ("running", job(id), None),
                ItemState::Resumable(id) => ("resumable", job(id), None),
                ItemState::Migrated(id) => ("migrated", job(id), None),
                ItemState::InSync(id) => ("in-sync", job(id), None),
                ItemState::NotMigrated(id, why) => ("not-migrated", job(id), Some(why.clone())),
                ItemState::NeedsAttention(id, why) => {
                    ("needs-attention", job(id), Some(why.clone()))
                }
                ItemState::Unknown(why) => ("unknown", None, Some(why.clone())),
            };
            BatchItemView {
                export: item.export.clone(),
                source,
                to: item.to.clone(),
                state: name.to_string(),
                job,
                reason,
            }
        })
        .collect();
    BatchView {
        name: plan.name.clone(),
        done: states.iter().all(ItemState::is_final),
        items,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(job_id: u64, export: &str, verdict: &str) -> DiskStatus {
        DiskStatus {
            job_id,
            batch: Some("b".into()),
            export: export.into(),
            role: "source".into(),
            phase: "x".into(),
            peer_state: None,
            peer_unreachable: None,
            destination_bytes: None,
            verdict: verdict.into(),
            reason: "why".into(),
            action: "none".into(),
            forwarding: None,
            seed: None,
        }
    }

    #[test]
    fn states_come_from_the_latest_job_of_the_export() {
        // Goal: the journal decides. Method: no line, a resumable older job with a newer
        // migrated one, a running job, a needs-attention line.
        assert_eq!(item_state("vm1", &[], &[]), ItemState::Waiting);
        let lines = [
            line(3, "vm1", "resumable"),
            line(7, "vm1", "migrated"),
            line(5, "vm2", "resumable"),
        ];
        assert_eq!(item_state("vm1", &lines, &[]), ItemState::Migrated(7));
        assert_eq!(item_state("vm2", &lines, &[]), ItemState::Resumable(5));
        let running = JobStatus {
            phase: JobPhase::Running,
            ..JobStatus::starting(5, "vm2", "h2:7451", "heat")
        };
        assert_eq!(item_state("vm2", &lines, &[running]), ItemState::Running(5));
        let odd = [line(9, "vm3", "needs-attention")];
        assert!(matches!(
            item_state("vm3", &odd, &[]),
            ItemState::NeedsAttention(9, _)
        ));
        assert!(!ItemState::Resumable(1).is_final() && ItemState::Migrated(1).is_final());
    }

    #[test]
    fn a_seeds_state_follows_its_step_and_the_plans_ending() {
        // Goal: a seed plan resumes a seed until its ending, whatever plan journaled it.
        // Method: each source verdict a seed's job goes through, with each ending.
        let state =
            |verdict: &str, then| seed_item_state("vm1", &[line(4, "vm1", verdict)], &[], then);
        assert!(matches!(
            seed_item_state("vm1", &[], &[], SyncThen::Stop),
            ItemState::NeedsAttention(0, _)
        ));
        for verdict in ["seed-exported", "catching-up"] {
            assert_eq!(state(verdict, SyncThen::Migrate), ItemState::Resumable(4));
        }
        assert_eq!(state("in-sync", SyncThen::Stop), ItemState::InSync(4));
        assert_eq!(state("in-sync", SyncThen::Migrate), ItemState::Resumable(4));
        assert_eq!(state("in-sync", SyncThen::Follow), ItemState::Resumable(4));
        assert_eq!(state("migrated", SyncThen::Migrate), ItemState::Migrated(4));
        assert!(matches!(
            state("seed-exporting", SyncThen::Stop),
            ItemState::NeedsAttention(4, _)
        ));
        let running = JobStatus {
            phase: JobPhase::Running,
            ..JobStatus::starting(4, "vm1", "h2:7451", "naive")
        };
        let lines = [line(4, "vm1", "in-sync")];
        assert_eq!(
            seed_item_state("vm1", &lines, &[running], SyncThen::Follow),
            ItemState::Running(4)
        );
    }
}
