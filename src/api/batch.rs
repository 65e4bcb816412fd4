//! Batches, as the CLI drives them: several exports migrated under one batch name with a
//! concurrency limit (`ferry migrate --batch`), continued (`ferry resume BATCH`) or rolled
//! back (`ferry abort BATCH`). The agent runs each job and journals it under the batch name;
//! this module only starts jobs, waits for them and reports, so a batch whose CLI died is
//! continued by `ferry resume` from the journals.
//!
//! Plan files map exports to destinations, one `EXPORT HOST[:PORT]` per line; `#` starts a
//! comment. A malformed line is an error naming its number, before any job starts.

use std::collections::VecDeque;
use std::time::Duration;

use super::client::{Client, ClientError};
use super::types::{JobPhase, JobStatus, MigrateRequest};

/// How often running jobs are polled.
const POLL: Duration = Duration::from_millis(200);

/// One migration of a batch.
#[derive(Debug, Clone)]
pub struct Item {
    /// The export to move.
    pub export: String,
    /// The request (destination, options, batch name, resumed job).
    pub request: MigrateRequest,
}

/// Why a plan file's text is not a plan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A line that is not `EXPORT HOST[:PORT]`.
    #[error("plan line {line}: expected \"EXPORT HOST[:PORT]\", got {got:?}")]
    Line {
        /// 1-based line number.
        line: usize,
        /// The line without its comment.
        got: String,
    },
    /// Only comments and blank lines.
    #[error("the plan names no export")]
    Empty,
}

/// `(export, destination)` pairs of a plan file's text.
pub fn parse_plan(text: &str) -> Result<Vec<(String, String)>, PlanError> {
    let mut pairs = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [export, destination] => pairs.push((export.to_string(), destination.to_string())),
            _ => {
                return Err(PlanError::Line {
                    line: index + 1,
                    got: line.to_string(),
                })
            }
        }
    }
    if pairs.is_empty() {
        return Err(PlanError::Empty);
    }
    Ok(pairs)
}

/// Runs `items` with at most `concurrency` jobs at once; returns every job's final status
/// in the items' order (a job that could not start is reported failed with the reason).
/// `on_done` is called as each job ends.
pub fn run(
    client: &Client,
    items: Vec<Item>,
    concurrency: usize,
    mut on_done: impl FnMut(&JobStatus),
) -> Result<Vec<JobStatus>, ClientError> {
    let mut waiting: VecDeque<(usize, Item)> = items.into_iter().enumerate().collect();
    let mut results: Vec<Option<JobStatus>> = vec![None; waiting.len()];
    let mut running: Vec<(usize, u64)> = Vec::new();
    loop {
        while running.len() < concurrency.max(1) {
            let Some((index, item)) = waiting.pop_front() else {
                break;
            };
            match client.migrate(&item.export, &item.request) {
                Ok(status) => running.push((index, status.id)),
                Err(err) => {
                    let status = not_started(&item, &err);
                    on_done(&status);
                    results[index] = Some(status);
                }
            }
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(POLL);
        let mut still = Vec::new();
        for (index, id) in running {
            let status = client.job(id)?;
            if status.phase == JobPhase::Running {
                still.push((index, id));
            } else {
                on_done(&status);
                results[index] = Some(status);
            }
        }
        running = still;
    }
    Ok(results.into_iter().flatten().collect())
}

/// The status of a job the agent refused to start.
fn not_started(item: &Item, err: &ClientError) -> JobStatus {
    JobStatus {
        phase: JobPhase::Failed,
        error: Some(format!("not started: {err}")),
        ..JobStatus::starting(
            item.request.resume_job.unwrap_or(0),
            &item.export,
            &item.request.to,
            item.request.policy.as_deref().unwrap_or_default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_lines_and_errors() {
        // Goal: a plan maps exports to destinations, and a bad line is named before anything
        // starts. Method: comments, blank lines, a port-less host; then a line with 3 fields.
        let plan = "# evacuate host a\nvm1 10.0.0.2:7451\n\n  vm2   hostb   # default port\n";
        assert_eq!(
            parse_plan(plan),
            Ok(vec![
                ("vm1".to_string(), "10.0.0.2:7451".to_string()),
                ("vm2".to_string(), "hostb".to_string()),
            ])
        );
        let err = parse_plan("vm1 a\nvm2 b c\n").unwrap_err();
        assert!(matches!(err, PlanError::Line { line: 2, .. }), "{err}");
        assert!(err.to_string().contains("line 2"), "{err}");
        assert_eq!(parse_plan("# nothing\n"), Err(PlanError::Empty));
    }
}
