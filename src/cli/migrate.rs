//! `ferry migrate`, `ferry resume` and `ferry abort`: one job followed with a progress bar,
//! or a batch run with a concurrency limit ([`crate::api::batch`]). Which jobs a batch has
//! comes from the agent's journal, through the API (`GET /v1/journal/jobs`).
//!
//! A resume sends only the options given on its command line: the agent fills in the rest
//! from the settings it journaled when the job started, so a job capped at 32 MiB/s resumes
//! at 32 MiB/s unless `--bandwidth` says otherwise.

use std::path::PathBuf;

use super::{client, print_json, ApiTarget, CliError, ResumeOverrides};
use crate::api::batch::{self, Item};
use crate::api::types::{JobPhase, JobStatus, MigrateRequest};
use crate::api::{view, Client};
use crate::units::parse_rate;

/// The options of `ferry migrate`.
#[derive(Debug, Clone)]
pub struct Request {
    /// Copy policy name.
    pub policy: String,
    /// Longest write pause.
    pub max_pause_ms: u64,
    /// Forced switchover after this long.
    pub force_after_ms: Option<u64>,
    /// Bandwidth cap as written (`200M`).
    pub bandwidth: Option<String>,
    /// Compare both images at the switchover point.
    pub verify: bool,
    /// Yield to the guest during the bulk copy (`--max-impact 4ms`).
    pub yield_to_guest: bool,
    /// `--max-impact` as written.
    pub max_impact: Option<String>,
    /// `--weight`.
    pub weight: Option<u32>,
    /// Mirror from the start.
    pub mirror: bool,
    /// Tracking granularity of the job as written (`64K`); `None`: the agent's default.
    pub granularity: Option<String>,
}

/// What `ferry migrate` moves where.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Exports named on the command line.
    pub exports: Vec<String>,
    /// Their destination.
    pub to: Option<String>,
    /// Batch name.
    pub batch: Option<String>,
    /// Plan file of `EXPORT HOST[:PORT]` lines.
    pub file: Option<PathBuf>,
}

/// `--bandwidth` in bytes per second.
pub(super) fn bandwidth(text: Option<&str>) -> Result<Option<u64>, CliError> {
    text.map(parse_rate)
        .transpose()
        .map_err(|source| CliError::Size {
            flag: "--bandwidth",
            source,
        })
}

/// `--granularity` in bytes.
fn granularity(text: Option<&str>) -> Result<Option<u64>, CliError> {
    text.map(crate::units::parse_size)
        .transpose()
        .map_err(|source| CliError::Size {
            flag: "--granularity",
            source,
        })
}

/// `ferry migrate`: one export followed with a progress bar, or a batch.
pub fn migrate(
    plan: Plan,
    options: &Request,
    concurrency: usize,
    no_wait: bool,
    target: &ApiTarget,
) -> Result<(), CliError> {
    let client = client(target)?;
    let request = MigrateRequest {
        manager_epoch: None,
        to: plan.to.clone().unwrap_or_default(),
        policy: Some(options.policy.clone()),
        max_pause_ms: Some(options.max_pause_ms),
        target_pause_ms: None,
        force_after_ms: options.force_after_ms,
        bandwidth_bytes_per_s: bandwidth(options.bandwidth.as_deref())?,
        hot_threshold: None,
        verify: Some(options.verify),
        yield_to_guest: Some(options.yield_to_guest),
        max_impact: options.max_impact.clone(),
        weight: options.weight,
        mirror: Some(options.mirror),
        granularity_bytes: granularity(options.granularity.as_deref())?,
        batch: plan.batch.clone(),
        resume_job: None,
    };
    if let Some(text) = &request.max_impact {
        text.parse::<crate::migrate::steer::ImpactTarget>()?;
    }
    let mut pairs = match &plan.file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| CliError::File {
                flag: "--plan",
                path: path.clone(),
                source,
            })?;
            batch::parse_plan(&text).map_err(|source| CliError::Plan {
                path: path.clone(),
                source,
            })?
        }
        None => Vec::new(),
    };
    if let Some(to) = &plan.to {
        pairs.extend(
            plan.exports
                .iter()
                .map(|export| (export.clone(), to.clone())),
        );
    }
    if pairs.is_empty() {
        return Err(CliError::Usage("name an export (or give --plan)"));
    }
    // A manager (it answers its status) drives the batch across the fleet itself.
    let manager = client.manager_status().is_ok();
    if pairs.len() == 1 && plan.batch.is_none() && plan.file.is_none() && !manager {
        return migrate_one(&client, &pairs[0].0, request, no_wait, target.json);
    }
    let batch = plan.batch.unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        format!("batch-{secs}")
    });
    if manager {
        let plan = super::manager::batch_plan(&batch, pairs, request, concurrency);
        return super::manager::drive_batch(&client, &plan, no_wait, target.json);
    }
    let items = pairs
        .into_iter()
        .map(|(export, to)| Item {
            export,
            request: MigrateRequest {
                manager_epoch: None,
                max_impact: None,
                weight: None,
                to,
                batch: Some(batch.clone()),
                ..request.clone()
            },
        })
        .collect();
    run_batch(&client, &batch, items, concurrency, target.json)
}

/// `ferry resume BATCH`: continues each interrupted job of the batch, with its journaled
/// settings except those `overrides` gives.
pub fn resume(
    batch: &str,
    concurrency: usize,
    overrides: &ResumeOverrides,
    target: &ApiTarget,
) -> Result<(), CliError> {
    let client = client(target)?;
    let given = MigrateRequest {
        manager_epoch: None,
        max_impact: None,
        weight: None,
        to: String::new(),
        policy: overrides.policy.clone(),
        max_pause_ms: overrides.max_pause,
        target_pause_ms: None,
        force_after_ms: overrides.force_after,
        bandwidth_bytes_per_s: bandwidth(overrides.bandwidth.as_deref())?,
        hot_threshold: None,
        verify: overrides.verify,
        yield_to_guest: overrides.yield_to_guest,
        mirror: overrides.mirror,
        granularity_bytes: None,
        batch: Some(batch.to_string()),
        resume_job: None,
    };
    let items: Vec<Item> = client
        .journal_jobs(Some(batch))?
        .into_iter()
        .filter(|job| job.resumable())
        .map(|job| Item {
            request: MigrateRequest {
                manager_epoch: None,
                max_impact: None,
                weight: None,
                to: job.destination.clone().unwrap_or_default(),
                resume_job: Some(job.job_id),
                ..given.clone()
            },
            export: job.export,
        })
        .collect();
    if items.is_empty() {
        if target.json {
            println!("[]");
        } else {
            println!("batch {batch}: nothing to resume");
        }
        return Ok(());
    }
    run_batch(&client, batch, items, concurrency, target.json)
}

/// `ferry abort BATCH`: rolls back every uncommitted job of the batch on both sides.
pub fn abort(batch: &str, target: &ApiTarget) -> Result<(), CliError> {
    let client = client(target)?;
    let mut outcomes = Vec::new();
    for job in client.journal_jobs(Some(batch))? {
        if job.abortable() {
            outcomes.push(client.abort_job(job.job_id)?);
        }
    }
    if target.json {
        print_json(&outcomes);
    } else if outcomes.is_empty() {
        println!("batch {batch}: nothing to abort");
    } else {
        for outcome in &outcomes {
            println!(
                "job {} ({}): source {}, destination {}",
                outcome.job_id, outcome.export, outcome.source, outcome.destination
            );
        }
    }
    Ok(())
}

/// One migration, followed with a progress bar (or not, with `no_wait`).
fn migrate_one(
    client: &Client,
    export: &str,
    request: MigrateRequest,
    no_wait: bool,
    json: bool,
) -> Result<(), CliError> {
    let disk_bytes = client
        .exports()?
        .iter()
        .find(|e| e.name == export)
        .map_or(0, |e| e.size_bytes);
    let started = client.migrate(export, &request)?;
    let status = if no_wait {
        started
    } else {
        let bar = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
        view::follow(client, started.id, disk_bytes, bar)?
    };
    if json {
        print_json(&status);
    } else {
        print!("{}", view::render(&status));
    }
    if status.phase == JobPhase::Failed {
        return Err(CliError::MigrationFailed {
            export: export.to_string(),
        });
    }
    Ok(())
}

/// Runs a batch's items and prints each job as it ends (or every status as JSON).
fn run_batch(
    client: &Client,
    batch: &str,
    items: Vec<Item>,
    concurrency: usize,
    json: bool,
) -> Result<(), CliError> {
    let statuses = batch::run(client, items, concurrency, |status| {
        if !json {
            println!("batch {batch}: {}", job_line(status));
        }
    })?;
    if json {
        print_json(&statuses);
    }
    let failed = statuses
        .iter()
        .filter(|status| status.phase == JobPhase::Failed)
        .count();
    if failed > 0 {
        return Err(CliError::BatchFailed {
            batch: batch.to_string(),
            failed,
            total: statuses.len(),
        });
    }
    Ok(())
}

/// `job 7 vm1 -> host:7451: Done, destination authoritative (error)`.
fn job_line(status: &JobStatus) -> String {
    format!(
        "job {} {} -> {}: {:?}, {} authoritative{}",
        status.id,
        status.export,
        status.to,
        status.phase,
        status.authoritative,
        status
            .error
            .as_deref()
            .map(|err| format!(" ({err})"))
            .unwrap_or_default()
    )
}
