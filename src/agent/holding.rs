//! One hop at most: the agent that holds a guest's connection to a disk (its *holder*)
//! forwards to whichever agent holds the disk now, however often the disk moved since.
//!
//! - A job names the disk's holder in its `Open`: this agent, when the disk was served here
//!   from the start or came home; else the holder the target record that brought the disk
//!   here names ([`holder_for`]), journaled as `SourceHolder`.
//! - A destination records the holder the `Open` names (`TargetHolder`), unless it is that
//!   holder itself ([`is_holder_here`]: the disk is coming home).
//! - After its switchover a job whose holder is another agent tells it where the disk went
//!   (`transfer::repoint`), until it answers, and journals the answer (`SourceHolderTold`):
//!   only then has nothing left to forward through this agent. A restart resumes the telling
//!   ([`resume_telling`]).
//! - The holder ([`repoint`]) journals `SourceRepointed` before its route switches, and takes
//!   only a move newer than the last one it applied (more moves), so a late or repeated
//!   re-point never points it back along the chain.

use std::sync::Mutex;

use crate::disk::Route;
use crate::jobs::holder::tell_holder;
use crate::journal::{JobView, Record, Role, SharedJournal, Side, SourcePhase, TargetPhase};
use crate::transfer::{ClusterKey, Holder, Repoint, RepointOutcome, TargetError};

use super::exports::Exports;
use super::moves::{moves, Move};

/// Serializes re-points: each decides on the journal as the previous one left it.
static REPOINTING: Mutex<()> = Mutex::new(());

/// The journal's views in journal order, and the index of the latest committed target of
/// `export` (the migration that brought its disk here last), if any.
fn latest_arrival(journal: &SharedJournal, export: &str) -> Option<(Vec<JobView>, usize)> {
    let mut views = journal.views();
    views.sort_by_key(|view| view.first_seq);
    let arrival = views.iter().rposition(|view| {
        view.export == export
            && matches!(&view.side, Side::Target(target) if target.phase == TargetPhase::Committed)
    })?;
    Some((views, arrival))
}

/// The holder of `export`'s guest connection when it is another agent: the one named by the
/// target record that brought the disk here last (`None`: this agent holds it). The moves
/// count the job about to start.
pub fn holder_for(journal: &SharedJournal, export: &str) -> Option<Holder> {
    let (views, arrival) = latest_arrival(journal, export)?;
    let Side::Target(target) = &views[arrival].side else {
        return None;
    };
    target.holder.as_ref().map(|holder| Holder {
        moves: holder.moves.saturating_add(1),
        ..holder.clone()
    })
}

/// Whether `holder` (as an `Open` for `export` names it) is this agent: it moved the disk
/// away under that job, as its holder, and forwards it since.
pub fn is_holder_here(journal: &SharedJournal, export: &str, holder: &Holder) -> bool {
    journal
        .view(holder.job_id, Role::Source)
        .is_some_and(|view| {
            view.export == export
                && matches!(&view.side, Side::Source(source)
                    if source.phase == SourcePhase::Switched && source.holder.is_none())
        })
}

/// The holder's side of a re-point: see the module docs. Refuses (the teller retries) when
/// the disk's size differs or the journal cannot record it.
pub fn repoint(
    journal: &SharedJournal,
    exports: &Exports,
    repoint: &Repoint,
) -> Result<RepointOutcome, TargetError> {
    let _one_at_a_time = REPOINTING.lock().unwrap_or_else(|err| err.into_inner());
    let Some(view) = journal.view(repoint.job_id, Role::Source) else {
        return Ok(RepointOutcome::NotForwarding);
    };
    let Side::Source(source) = &view.side else {
        return Ok(RepointOutcome::NotForwarding);
    };
    let latest_move = moves(journal)
        .get(&view.export)
        .and_then(|moves| moves.last().cloned());
    let forwards = view.export == repoint.export
        && source.phase == SourcePhase::Switched
        && source.holder.is_none()
        && matches!(latest_move, Some(Move::Retired { job_id, .. }) if job_id == view.job_id);
    let Some(export) = exports.export(&view.export).filter(|_| forwards) else {
        return Ok(RepointOutcome::NotForwarding);
    };
    if view.size_bytes != repoint.size_bytes {
        // The sizes go to the local log only.
        return Err(TargetError::WrongSize {
            have_bytes: view.size_bytes,
            want_bytes: repoint.size_bytes,
        });
    }
    // The job's own switchover is move 1.
    if repoint.moves <= source.repointed_moves.max(1) {
        return Ok(RepointOutcome::Superseded);
    }
    journal
        .append(&Record::SourceRepointed {
            job_id: view.job_id,
            forward_addr: repoint.nbd_tcp.clone(),
            moves: repoint.moves,
        })
        .map_err(|err| TargetError::Journal(Box::new(err)))?;
    log::info!(
        "export {}: its disk moved on (move {}), forwarding to {} now",
        view.export,
        repoint.moves,
        repoint.nbd_tcp
    );
    export.reroute(Route::Forward {
        addr: repoint.nbd_tcp.clone(),
        lineage: Some(view.job_id),
    });
    Ok(RepointOutcome::Repointed)
}

/// The lineage of `export`'s disk as served here (`disk::lineage_token`): the holder's job
/// the latest committed target names; for a disk that came home, the job that had moved it
/// away from here before; `None` for a disk that never left.
pub fn lineage_of(journal: &SharedJournal, export: &str) -> Option<u64> {
    let (views, arrival) = latest_arrival(journal, export)?;
    let arrival = &views[arrival];
    if let Side::Target(target) = &arrival.side {
        if let Some(holder) = &target.holder {
            return Some(holder.job_id);
        }
    }
    views
        .iter()
        .rev()
        .filter(|view| view.export == export && view.first_seq < arrival.first_seq)
        .find_map(|view| match &view.side {
            Side::Source(source)
                if source.holder.is_none()
                    && matches!(source.phase, SourcePhase::Switched | SourcePhase::Finished) =>
            {
                Some(view.job_id)
            }
            _ => None,
        })
}

/// The lineage a switched job's forwarding checks: its holder's job, or its own when this
/// agent holds the guest's connection.
pub fn forward_lineage(view: &JobView) -> Option<u64> {
    match &view.side {
        Side::Source(source) => Some(source.holder.as_ref().map_or(view.job_id, |h| h.job_id)),
        Side::Target(_) => None,
    }
}

/// At restart: every switched job whose holder has not answered tells it, each on its own
/// thread.
pub fn resume_telling(journal: &SharedJournal, key: &ClusterKey) {
    for view in journal.views() {
        let Side::Source(source) = &view.side else {
            continue;
        };
        let pending = source.phase == SourcePhase::Switched
            && source.holder.is_some()
            && source.holder_told.is_none();
        if !pending {
            continue;
        }
        let (journal, key) = (journal.clone(), key.clone());
        let job_id = view.job_id;
        let spawned = std::thread::Builder::new()
            .name("ferry-holder".into())
            .spawn(move || {
                tell_holder(&journal, &key, job_id);
            });
        if let Err(err) = spawned {
            log::error!("job {job_id}: cannot start telling its holder: {err}");
        }
    }
}

/// The holder an `Open` names, as this destination records it: an unspecified IP (the
/// source listens on all addresses) is replaced by the IP the stream came from, when the
/// holder is that source itself (its first move).
pub fn holder_as_seen(holder: &Holder, peer: &str) -> Holder {
    let parsed = holder.addr.parse::<std::net::SocketAddr>();
    let peer_ip = peer.parse::<std::net::SocketAddr>().map(|addr| addr.ip());
    match (parsed, peer_ip) {
        (Ok(addr), Ok(ip)) if addr.ip().is_unspecified() && holder.moves == 1 => Holder {
            addr: std::net::SocketAddr::new(ip, addr.port()).to_string(),
            ..holder.clone()
        },
        _ => holder.clone(),
    }
}
