//! After a switchover, the disk's holder (the agent holding the guest's connection, when it
//! is another one) is told where the disk went, so that it forwards there directly
//! (`agent::holding` has the whole scheme).
//!
//! Invariant: `SourceHolderTold` is journaled only with the holder's own answer.

use crate::journal::{Record, Role, SharedJournal, Side};
use crate::transfer::repoint::tell_until_final;
use crate::transfer::{ClusterKey, Holder, Repoint, RepointOutcome};

/// Who holds the guest's connection to the disk a job moves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HolderChoice {
    /// This agent, which peers reach at `addr` (its block stream).
    Here {
        /// Its block-stream address.
        addr: String,
    },
    /// Another agent; its moves count this job already.
    Elsewhere(Holder),
}

impl HolderChoice {
    /// The holder job `job_id`'s `Open` names.
    pub fn holder(&self, job_id: u64) -> Holder {
        match self {
            Self::Here { addr } => Holder {
                addr: addr.clone(),
                job_id,
                moves: 1,
            },
            Self::Elsewhere(holder) => holder.clone(),
        }
    }
}

/// After a switchover (or at restart, for a switched job whose holder has not answered):
/// tells the job's holder where the disk went, until it answers, then journals the answer.
/// Blocks. `None`: the job has no holder to tell (or is not switched).
pub fn tell_holder(
    journal: &SharedJournal,
    key: &ClusterKey,
    job_id: u64,
) -> Option<RepointOutcome> {
    let view = journal.view(job_id, Role::Source)?;
    let Side::Source(source) = &view.side else {
        return None;
    };
    let holder = source.holder.as_ref()?;
    let forward_addr = source.forward_addr.as_deref()?;
    if let Some(outcome) = source.holder_told {
        return Some(outcome);
    }
    let repoint = Repoint {
        job_id: holder.job_id,
        export: view.export.clone(),
        size_bytes: view.size_bytes,
        nbd_tcp: forward_addr.to_owned(),
        moves: holder.moves,
    };
    let outcome = tell_until_final(holder, key, &repoint);
    log::info!(
        "export {}: holder {} (job {}) answered the re-point to {forward_addr}: {}",
        view.export,
        holder.addr,
        holder.job_id,
        outcome.as_str()
    );
    if let Err(err) = journal.append(&Record::SourceHolderTold { job_id, outcome }) {
        // A restart tells it again; the holder answers the same.
        log::error!("job {job_id}: the holder's answer is not journaled: {err}");
    }
    Some(outcome)
}
