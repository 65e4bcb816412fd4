//! A seed catch-up (`ferry seed sync`): the job of a seed, resumed over the block stream to
//! the destination that imported the seed, run to an in-sync point, then stopped there, kept
//! there (continuous replication) or switched over (a migration).
//!
//! Invariants:
//! - Every run of the loop is [`crate::migrate::run`] on the same [`JobEnv`]: the first ends
//!   at an in-sync point ([`Ending::InSync`]), each later one continues from the tracker's
//!   bits (`resume`), so a block written at any time is sent by some run after it.
//! - The source stays authoritative at every in-sync point; only `--then migrate`'s last run
//!   commits, exactly as a migration does.
//! - A follow ends only when asked to (the job's stop flag) or when a run fails; the lag it
//!   reports is the time since the last in-sync point.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::job::{JobEnv, JobError};
pub use super::job::{SeedSync, SyncThen};
pub use crate::env::unix_ms;
use crate::migrate::{Ending, MigrateError, MigrateOptions, MigrationReport};

/// Least pause between two runs of a continuous replication.
const FOLLOW_PAUSE: Duration = Duration::from_millis(500);

/// What a catch-up reports while it runs and after.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// The seed (hex).
    pub seed_id: String,
    /// "catching-up", "in-sync" or "switching-over".
    pub state: String,
    /// In-sync points reached.
    pub in_sync_points: u32,
    /// The latest one (Unix ms).
    pub last_in_sync_unix_ms: Option<u64>,
    /// Whether the first run compared digests of every block (no tracker to trust).
    pub compared_all: bool,
    /// Data bytes sent over all runs.
    pub bytes_sent: u64,
    /// Bytes the source read to send or compare over all runs.
    pub bytes_read: u64,
}

/// Runs the catch-up on `env`; the last run's report (an in-sync point, or the switchover).
pub fn drive(
    env: &mut JobEnv,
    options: &MigrateOptions,
    sync: &SeedSync,
    status: &Arc<Mutex<SyncStatus>>,
    stop: &AtomicBool,
) -> Result<MigrationReport, MigrateError<JobError>> {
    let in_sync = MigrateOptions {
        ending: Ending::InSync,
        ..options.clone()
    };
    let mut report = run_once(env, &in_sync, status)?;
    let again = MigrateOptions {
        resume: true,
        ..in_sync.clone()
    };
    match sync.then {
        SyncThen::Stop => Ok(report),
        SyncThen::Follow => {
            while !stop.load(Ordering::Acquire) {
                std::thread::sleep(FOLLOW_PAUSE);
                match run_once(env, &again, status) {
                    Ok(next) => report = next,
                    // A burst of writes kept this point from fitting the hold budget: its bits
                    // were merged back and writes released, so the next run carries on.
                    Err(MigrateError::NotConverged { deferrals }) => {
                        log::warn!(
                            "export {}: in-sync point deferred {deferrals} times; trying again",
                            env.export_name()
                        );
                        status.lock().expect("sync status").state = "catching-up".into();
                    }
                    Err(err) => return Err(err),
                }
            }
            Ok(report)
        }
        SyncThen::Migrate => {
            status.lock().expect("sync status").state = "switching-over".into();
            let migrate = MigrateOptions {
                ending: Ending::Switchover,
                ..again
            };
            let report = run_once(env, &migrate, status)?;
            status.lock().expect("sync status").state = "migrated".into();
            Ok(report)
        }
    }
}

/// One run; the status counts what it sent and whether it reached a point.
fn run_once(
    env: &mut JobEnv,
    options: &MigrateOptions,
    status: &Arc<Mutex<SyncStatus>>,
) -> Result<MigrationReport, MigrateError<JobError>> {
    let read_before = env.bytes_read();
    if env.compares_all() {
        status.lock().expect("sync status").compared_all = true;
    }
    let report = crate::migrate::run(env, options)?;
    let mut status = status.lock().expect("sync status");
    status.bytes_sent += report.bytes_data;
    status.bytes_read += env.bytes_read() - read_before;
    if report.in_sync {
        status.state = "in-sync".into();
        status.in_sync_points += 1;
        status.last_in_sync_unix_ms = Some(unix_ms());
    }
    Ok(report)
}
