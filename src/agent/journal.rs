//! The agent's migration journal (`<state>/journal`), shared by its migration jobs (source
//! side) and its targets (destination side), and what a restarted agent does with it.
//!
//! Invariants (the commit protocol, `docs/commit-protocol.md`):
//! - Every record is durable before the change it announces takes effect; a failed append
//!   stops that change (the callers return an error before acting).
//! - At start-up, before any session is served, every job's restart action is the one
//!   [`commit::restart`] decides (the table the simulation checks), carried out here:
//!   a `switched` export forwards to the destination (its local image is stale); an in-doubt
//!   one (`switching-over`) holds its writes until the destination has answered whether it
//!   committed; an aborted source serves locally, drops the job's tracker and tells the
//!   destination to drop its image; a finished source serves nothing; a committed target is
//!   served even if the export list lost it; an aborted target's image is removed.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::disk::Route;
use crate::error::error_chain;
use crate::jobs::job::tracker_name;
use crate::journal::commit::{self, Restart};
use crate::journal::{JobView, Record, SharedJournal, Side, SourcePhase, TargetPhase, TargetView};
use crate::transfer::{abort_target, ask_until_final, ClusterKey, TargetState};

use super::exports::Exports;
use super::migrations::target_spec;

/// Attempts to tell the destination of an aborted job, at restart (`ferry abort` again
/// retries by hand).
const ABORT_ATTEMPTS: u32 = 5;

/// Brings the exports back to what the journal says: each job's [`commit::restart`] action
/// (see the module docs). In-doubt exports and aborted destinations are handled by
/// background threads; everything else is done when this returns.
pub fn recover(
    journal: &SharedJournal,
    exports: &Arc<Exports>,
    key: &ClusterKey,
    image_dir: &Path,
) {
    let mut to_abort = Vec::new();
    let views = journal.views();
    for view in views.iter().cloned() {
        let action = commit::restart(&view);
        match (&view.side, action) {
            (_, Restart::ServeAndResume | Restart::KeepForResume) => {}
            (Side::Source(_), Restart::Forward) if superseded(&view, &views) => {
                log::info!(
                    "export {}: job {} moved it away, a later move brought it back",
                    view.export,
                    view.job_id
                );
            }
            (Side::Source(source), Restart::Forward) => {
                if let Some(addr) = source.forward_addr.clone() {
                    forward(exports, &view, addr);
                }
            }
            (Side::Source(source), Restart::HoldAndAsk) => {
                resolve_in_doubt(journal, exports, key, &view, &source.destination);
            }
            (Side::Source(source), Restart::ServeAndAbortTarget) => {
                if let Some(export) = exports.export(&view.export) {
                    let _ = export.trackers().remove(&tracker_name(view.job_id));
                }
                to_abort.push((view.clone(), source.destination.clone()));
            }
            (Side::Source(_), Restart::ServeNothing) => withdraw(exports, &view),
            (Side::Target(target), Restart::Serve) => serve_committed(exports, &view, target),
            (Side::Target(target), Restart::RemoveImage) => {
                remove_image(exports, &view, target, image_dir);
            }
            // commit::restart answers source phases with source actions and target phases
            // with target ones; this arm is a bug there, logged by kind (a target's view holds
            // a whole bitmap).
            (side, action) => log::error!(
                "job {}: restart action {action:?} does not apply to a {} job",
                view.job_id,
                if matches!(side, Side::Source(_)) {
                    "source"
                } else {
                    "target"
                }
            ),
        }
    }
    if !to_abort.is_empty() {
        tell_aborted(to_abort, key.clone());
    }
}

/// Whether a later move of the same export supersedes `view` (a disk that left and came
/// back is served here, not forwarded by the older job).
fn superseded(view: &JobView, all: &[JobView]) -> bool {
    all.iter().any(|other| {
        other.export == view.export
            && other.first_seq > view.first_seq
            && match &other.side {
                Side::Source(source) => source.phase == SourcePhase::Switched,
                Side::Target(target) => target.phase == TargetPhase::Committed,
            }
    })
}

/// A switched source forwards every request to the destination, never its stale image.
fn forward(exports: &Exports, view: &JobView, addr: String) {
    let Some(export) = exports.export(&view.export) else {
        log::warn!(
            "export {} (job {}, switched) is not configured here",
            view.export,
            view.job_id
        );
        return;
    };
    log::info!(
        "export {}: migrated by job {}, forwarding to {addr}",
        view.export,
        view.job_id
    );
    export.hold_writes();
    export.switch_route(Route::Forward {
        addr,
        lineage: super::holding::forward_lineage(view),
    });
    export.release_writes();
    // Stopped between `SourceSwitched` and the rename: the image still has its old name.
    if !crate::disk::is_stale_name(&export.path(), view.job_id) {
        crate::jobs::job::retire_image(&export, view.job_id);
    }
}

/// A finished source serves nothing for the export: its image is debris.
fn withdraw(exports: &Exports, view: &JobView) {
    if !exports.has_export(&view.export) {
        return;
    }
    match exports.remove_export(&view.export, true) {
        Ok(()) => log::info!(
            "export {}: migrated away by job {} (finished), not served",
            view.export,
            view.job_id
        ),
        Err(err) => log::error!(
            "export {} (job {}, finished): {err}",
            view.export,
            view.job_id
        ),
    }
}

/// An aborted target's image is removed if it is still there (the agent stopped between
/// `TargetAborted` and the removal). Only a file in the image directory that no export
/// serves is removed: the journal is a state file, and a state file is not trusted with a
/// path outside the directories the agent owns.
fn remove_image(exports: &Exports, view: &JobView, target: &TargetView, image_dir: &Path) {
    let path = &target.image_path;
    let inside = path.parent() == Some(image_dir)
        && path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().ends_with(".img"));
    if !inside {
        log::warn!(
            "job {} (target, aborted): image {} is outside {}; left alone",
            view.job_id,
            path.display(),
            image_dir.display()
        );
        return;
    }
    if exports.serves_path(path) {
        return; // served again since (a later job brought the disk here): not debris
    }
    match std::fs::remove_file(path) {
        Ok(()) => log::info!(
            "job {} (target, aborted): removed the image {} left by an unclean stop",
            view.job_id,
            path.display()
        ),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => log::warn!("cannot remove aborted target {}: {err}", path.display()),
    }
}

/// Tells the destinations of aborted jobs to drop their images, a few times each with a
/// growing pause, on one background thread (they are idempotent there).
fn tell_aborted(jobs: Vec<(JobView, String)>, key: ClusterKey) {
    let spawned = std::thread::Builder::new()
        .name("ferry-abort".into())
        .spawn(move || {
            for (view, destination) in jobs {
                let spec = target_spec(&view);
                let mut pause = Duration::from_secs(1);
                for attempt in 1..=ABORT_ATTEMPTS {
                    match abort_target(&destination, &key, &spec) {
                        Ok(()) => {
                            log::info!("job {}: {destination} dropped its target", view.job_id);
                            break;
                        }
                        Err(err) if attempt == ABORT_ATTEMPTS => log::warn!(
                            "job {} (aborted): {destination} not told ({}); `ferry abort` retries",
                            view.job_id,
                            error_chain(&err)
                        ),
                        Err(_) => {
                            std::thread::sleep(pause);
                            pause *= 2;
                        }
                    }
                }
            }
        });
    if let Err(err) = spawned {
        log::error!("cannot start telling aborted destinations: {err}");
    }
}

/// A committed target this agent does not serve (its export list lost it) is served.
fn serve_committed(exports: &Exports, view: &JobView, target: &TargetView) {
    if exports.has_export(&view.export) {
        return;
    }
    let spec = crate::api::types::ExportSpec {
        name: view.export.clone(),
        path: target.image_path.clone(),
        read_only: false,
        granularity_bytes: view.granularity_bytes,
        trackers: Vec::new(),
    };
    match exports.serve_committed(spec) {
        Ok(()) => log::info!(
            "export {}: committed by job {}, served again",
            view.export,
            view.job_id
        ),
        Err(err) => log::error!(
            "export {} (job {}, committed here) cannot be served: {err}",
            view.export,
            view.job_id
        ),
    }
}

/// A source that crashed between `SourceSwitchoverBegun` and the outcome: its writes stay
/// held until the destination says whether it committed (asking it to make "not
/// committed" final), then it forwards or serves locally. Never guesses.
fn resolve_in_doubt(
    journal: &SharedJournal,
    exports: &Arc<Exports>,
    key: &ClusterKey,
    view: &JobView,
    destination: &str,
) {
    let Some(export) = exports.export(&view.export) else {
        log::warn!(
            "export {} (job {}, in doubt) is not configured here",
            view.export,
            view.job_id
        );
        return;
    };
    export.hold_writes();
    log::warn!(
        "export {}: job {} was switching over when the agent stopped; writes held until \
         {destination} says whether it committed",
        view.export,
        view.job_id
    );
    let (journal, key, job_id) = (journal.clone(), key.clone(), view.job_id);
    let destination = destination.to_string();
    let spawned = std::thread::Builder::new()
        .name(format!("ferry-doubt-{job_id}"))
        .spawn(move || {
            let answer = ask_until_final(&destination, &key, job_id);
            let record = match (answer.state, answer.nbd_tcp) {
                (TargetState::Committed, Some(forward_addr)) => Record::SourceSwitched {
                    job_id,
                    forward_addr,
                },
                (TargetState::Committed, None) => {
                    log::error!(
                        "job {job_id}: the destination committed but serves no NBD over TCP; \
                         writes stay held"
                    );
                    return;
                }
                (state, _) => Record::SourceSwitchoverCancelled {
                    job_id,
                    reason: format!(
                        "the destination answered {} after a restart",
                        state.as_str()
                    ),
                },
            };
            if journal.append(&record).is_err() {
                return; // writes stay held: the journal must speak first
            }
            if let Record::SourceSwitched { forward_addr, .. } = record {
                export.switch_route(Route::Forward {
                    addr: forward_addr,
                    lineage: journal
                        .view(job_id, crate::journal::Role::Source)
                        .and_then(|view| super::holding::forward_lineage(&view)),
                });
                crate::jobs::job::retire_image(&export, job_id);
            }
            export.release_writes();
            log::info!("export {}: job {job_id} resolved", export.name());
        });
    if let Err(err) = spawned {
        log::error!("cannot start the in-doubt resolver for job {job_id}: {err}");
    }
}
