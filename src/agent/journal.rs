//! The agent's migration journal (`<state>/journal`), shared by its migration jobs (source
//! side) and its targets (destination side), and what a restarted agent does with it.
//!
//! Invariants (the commit protocol, `docs/commit-protocol.md`):
//! - Every record is durable before the change it announces takes effect; a failed append
//!   stops that change (the callers return an error before acting).
//! - At start-up, before any session is served: an export whose job is `switched` forwards
//!   to the destination again (its local image is stale); an export whose job is in doubt
//!   (`switching-over`) holds its writes until the destination has answered whether it
//!   committed; a committed target is served even if the export list lost it.

use std::sync::Arc;

use crate::disk::Route;
use crate::journal::{JobView, Record, SharedJournal, Side, SourcePhase, TargetPhase, TargetView};
use crate::transfer::{ask_until_final, ClusterKey, TargetState};

use super::exports::Exports;

/// Brings the exports back to what the journal says (see the module docs); in-doubt
/// exports are resolved by background threads.
pub fn recover(journal: &SharedJournal, exports: &Arc<Exports>, key: &ClusterKey) {
    for view in journal.views() {
        match &view.side {
            Side::Source(source) => match source.phase {
                SourcePhase::Switched => {
                    let Some(addr) = source.forward_addr.clone() else {
                        continue;
                    };
                    match exports.export(&view.export) {
                        Some(export) => {
                            log::info!(
                                "export {}: migrated by job {}, forwarding to {addr}",
                                view.export,
                                view.job_id
                            );
                            export.hold_writes();
                            export.switch_route(Route::Forward { addr });
                            export.release_writes();
                        }
                        None => log::warn!(
                            "export {} (job {}, switched) is not configured here",
                            view.export,
                            view.job_id
                        ),
                    }
                }
                SourcePhase::SwitchingOver => {
                    resolve_in_doubt(journal, exports, key, &view, &source.destination);
                }
                SourcePhase::Copying | SourcePhase::Aborted | SourcePhase::Finished => {}
            },
            Side::Target(target) => serve_committed(exports, &view, target),
        }
    }
}

/// A committed target this agent does not serve (its export list lost it) is served.
fn serve_committed(exports: &Exports, view: &JobView, target: &TargetView) {
    if target.phase != TargetPhase::Committed || exports.has_export(&view.export) {
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
                export.switch_route(Route::Forward { addr: forward_addr });
            }
            export.release_writes();
            log::info!("export {}: job {job_id} resolved", export.name());
        });
    if let Err(err) = spawned {
        log::error!("cannot start the in-doubt resolver for job {job_id}: {err}");
    }
}
