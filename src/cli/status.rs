//! `ferry status` and `ferry jobs`: what became of each migration.
//!
//! `ferry status` asks the agent (`GET /v1/status`), which judges its journal's jobs and
//! asks their destinations. Only `ferry status --offline` reads the journal file of the
//! state directory itself, for when the agent is down; it says so on stderr, so that an
//! answer read from a file is never taken for the agent's.

use std::path::PathBuf;

use super::{client, print_json, ApiTarget, CliError};
use crate::api::{render, view, ClientError};
use crate::error::error_chain;
use crate::transfer::ClusterKey;

/// `ferry status [BATCH]`, answered by the agent.
pub fn online(batch: Option<&str>, target: &ApiTarget) -> Result<(), CliError> {
    let client = client(target)?;
    let lines = client.migration_status(batch).map_err(|err| match err {
        ClientError::Unreachable { .. } => CliError::StatusUnreachable(err),
        other => CliError::Api(other),
    })?;
    if target.json {
        print_json(&lines);
    } else {
        print!("{}", render::status_table(&lines));
    }
    Ok(())
}

/// `ferry status --offline [BATCH]`: reads the journal file of a stopped agent and asks the
/// destinations with the cluster key (`--cluster-key`, or the one in the state directory).
pub fn offline(
    batch: Option<&str>,
    cluster_key: Option<PathBuf>,
    target: &ApiTarget,
) -> Result<(), CliError> {
    let key_path = cluster_key.unwrap_or_else(|| target.state_dir.join("cluster.key"));
    let key = match ClusterKey::load(&key_path) {
        Ok(key) => Some(key),
        Err(err) => {
            eprintln!(
                "ferry: cannot read the cluster key ({}); destinations not asked",
                error_chain(&err)
            );
            None
        }
    };
    let journal = target.state_dir.join(crate::journal::shared::FILE_NAME);
    eprintln!(
        "ferry: offline: status read from {} (the agent was not asked)",
        journal.display()
    );
    let lines =
        crate::journal::status::gather(&journal, key.as_ref(), batch).map_err(CliError::Offline)?;
    if target.json {
        print_json(&lines);
    } else {
        print!("{}", render::status_table(&lines));
    }
    Ok(())
}

/// `ferry jobs [ID]`: the agent's migration jobs since it started, or one.
pub fn jobs(id: Option<u64>, target: &ApiTarget) -> Result<(), CliError> {
    let client = client(target)?;
    let jobs = match id {
        Some(id) => vec![client.job(id)?],
        None => client.jobs()?,
    };
    if target.json {
        print_json(&jobs);
    } else {
        for job in &jobs {
            print!("{}", view::render(job));
        }
    }
    Ok(())
}
