//! `ferry status [BATCH]`: takes this agent's journal (the running agent's own, for
//! `GET /v1/status`; or the file in its state directory, for `ferry status --offline` with
//! the agent down), asks the destination of every source job what its journal says (over
//! the block-stream port, authenticated with the cluster key), and judges each disk with
//! [`super::commit::status_of`] (docs/commit-protocol.md). Destinations that cannot be
//! reached are named, never guessed.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::commit::{status_of, SourceState, TargetState};
use super::{fold, JobView, Journal, JournalError, SeedStep, Side, SourcePhase, TargetPhase};
use crate::disk::Forwarding;
use crate::transfer::{query_target, ClusterKey, QueryAnswer, TargetState as RemoteState};

/// How long one destination may take to answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// One disk's line of `ferry status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// The source's job id.
    pub job_id: u64,
    /// Batch, if any.
    pub batch: Option<String>,
    /// Export (VM disk).
    pub export: String,
    /// This agent's role: source or target.
    pub role: String,
    /// Phase in this agent's journal.
    pub phase: String,
    /// The other side's state, when it answered.
    pub peer_state: Option<String>,
    /// The other side, when it could not be reached: why.
    pub peer_unreachable: Option<String>,
    /// Bytes durably at the destination (from its latest checkpoint), when known.
    pub destination_bytes: Option<u64>,
    /// migrated, not-migrated, resumable or needs-attention.
    pub verdict: String,
    /// Why, from the journals.
    pub reason: String,
    /// What the operator does next ("none" when nothing).
    pub action: String,
    /// On a switched source job's line, when this agent forwards the export now: where,
    /// since when, and whether requests are held (filled in by the running agent; absent
    /// offline and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forwarding: Option<Forwarding>,
    /// The job's seed, when its disk travels on a medium: its id, step and latest in-sync
    /// point (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<SeedLine>,
}

/// A seed's state on a `ferry status` line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedLine {
    /// The seed (hex).
    pub seed_id: String,
    /// Its step at this end (`exporting`, `exported`, `importing`, `imported`,
    /// `catching-up`, `in-sync`).
    pub step: String,
    /// The latest in-sync point, if any (Unix ms).
    pub in_sync_unix_ms: Option<u64>,
}

/// The verdict of a job whose seed is still travelling or catching up (not committed, not
/// aborted): what the seed step says, instead of asking a destination the source may not
/// know yet.
fn seed_verdict(view: &JobView) -> Option<(SeedLine, &'static str, String, &'static str)> {
    let (seed, open) = match &view.side {
        Side::Source(source) => (source.seed.as_ref()?, source.phase == SourcePhase::Copying),
        Side::Target(target) => (
            target.seed.as_ref()?,
            target.phase == TargetPhase::Receiving,
        ),
    };
    if !open {
        return None;
    }
    let line = SeedLine {
        seed_id: super::seed::seed_id_hex(&seed.seed_id),
        step: seed.step.as_str().to_string(),
        in_sync_unix_ms: seed.in_sync_unix_ms,
    };
    let (verdict, reason, action) = match seed.step {
        SeedStep::Exporting => (
            "seed-exporting",
            "the seed is being copied onto its medium (or the copy stopped)".to_string(),
            "wait for `ferry seed export`, or `ferry abort` the job and export again",
        ),
        SeedStep::Exported => (
            "seed-exported",
            "the medium is sealed; the source serves the disk and tracks every write".to_string(),
            "ship the medium, `ferry seed import` it, then `ferry seed sync`",
        ),
        SeedStep::Importing => (
            "seed-importing",
            "the image is being verified from the medium; it is unserved and inconsistent"
                .to_string(),
            "let the import finish; if it failed, run it again with a good copy of the medium \
             (it resumes; a damaged medium is refused again)",
        ),
        SeedStep::Imported | SeedStep::CatchingUp => (
            "catching-up",
            "the image is unserved and inconsistent until a catch-up reaches an in-sync point"
                .to_string(),
            "`ferry seed sync` at the source",
        ),
        SeedStep::InSync => (
            "in-sync",
            {
                let at_ms = seed.in_sync_unix_ms.unwrap_or(seed.at_unix_ms);
                let lag_s = crate::env::unix_ms().saturating_sub(at_ms) / 1000;
                format!(
                    "equal to the source as of {at_ms} (Unix ms, lag {lag_s} s); the source \
                     stays authoritative"
                )
            },
            "none (`ferry seed sync --then migrate` to switch over)",
        ),
    };
    Some((line, verdict, reason, action))
}

/// What the other side said.
enum Peer {
    Answered(QueryAnswer),
    Unreachable(String),
    NotAsked,
}

/// The status of every job in the journal at `journal_path` (of `batch` only, if given),
/// read without opening it for appends (the agent may be down). `key` is needed to ask
/// destinations; without it they are reported as not asked.
pub fn gather(
    journal_path: &Path,
    key: Option<&ClusterKey>,
    batch: Option<&str>,
) -> Result<Vec<DiskStatus>, JournalError> {
    let replay = Journal::inspect(journal_path)?;
    let jobs = fold(&replay.entries)?;
    Ok(judge(jobs.values(), key, batch))
}

/// The status of each of `views` (of `batch` only, if given), asking the destination of
/// every source job; without `key` destinations are reported as not asked.
pub fn judge<'a>(
    views: impl IntoIterator<Item = &'a JobView>,
    key: Option<&ClusterKey>,
    batch: Option<&str>,
) -> Vec<DiskStatus> {
    let mut lines = Vec::new();
    for view in views {
        if batch.is_some_and(|batch| view.batch.as_deref() != Some(batch)) {
            continue;
        }
        if let Some((seed, verdict, reason, action)) = seed_verdict(view) {
            lines.push(DiskStatus {
                job_id: view.job_id,
                batch: view.batch.clone(),
                export: view.export.clone(),
                role: view.role().as_str().into(),
                phase: view.phase_name().into(),
                peer_state: None,
                peer_unreachable: None,
                destination_bytes: None,
                verdict: verdict.into(),
                reason,
                action: action.into(),
                forwarding: None,
                seed: Some(seed),
            });
            continue;
        }
        let peer = match (&view.side, key) {
            (Side::Source(source), Some(key)) => ask(&source.destination, key, view.job_id),
            _ => Peer::NotAsked,
        };
        let (role, phase, status) = match &view.side {
            Side::Source(source) => (
                "source",
                source.phase.as_str(),
                status_of(SourceState::Phase(source.phase), remote_target(&peer)),
            ),
            // The source's block-stream address is not in a target's journal: not asked.
            Side::Target(target) => (
                "target",
                target.phase.as_str(),
                status_of(SourceState::Unreachable, TargetState::Phase(target.phase)),
            ),
        };
        let mut reason = status.reason.to_string();
        if let Side::Target(_) = view.side {
            reason.push_str(" (the source was not asked from here)");
        }
        let (peer_state, peer_unreachable, destination_blocks) = match &peer {
            Peer::Answered(answer) => (
                Some(answer.state.as_str().to_string()),
                None,
                (answer.state == RemoteState::Receiving).then_some(answer.received_blocks),
            ),
            Peer::Unreachable(why) => (None, Some(why.clone()), None),
            Peer::NotAsked => (None, None, None),
        };
        lines.push(DiskStatus {
            job_id: view.job_id,
            batch: view.batch.clone(),
            export: view.export.clone(),
            role: role.into(),
            phase: phase.into(),
            peer_state,
            peer_unreachable,
            destination_bytes: destination_blocks.map(|blocks| blocks * view.granularity_bytes),
            verdict: status.verdict.as_str().to_string(),
            reason,
            action: status.action.to_string(),
            forwarding: None,
            seed: None,
        });
    }
    lines
}

/// The target's phase as a query answered it.
fn remote_target(peer: &Peer) -> TargetState {
    match peer {
        Peer::Answered(answer) => match answer.state {
            RemoteState::Unknown => TargetState::NoJob,
            RemoteState::Receiving => TargetState::Phase(TargetPhase::Receiving),
            RemoteState::Committed => TargetState::Phase(TargetPhase::Committed),
            RemoteState::Aborted => TargetState::Phase(TargetPhase::Aborted),
        },
        Peer::Unreachable(_) | Peer::NotAsked => TargetState::Unreachable,
    }
}

fn ask(destination: &str, key: &ClusterKey, job_id: u64) -> Peer {
    let addr = match crate::transfer::resolve_peer(destination) {
        Ok(addr) => addr,
        Err(err) => return Peer::Unreachable(crate::error::error_chain(&err)),
    };
    match query_target(addr, key, job_id, false, QUERY_TIMEOUT) {
        Ok(answer) => Peer::Answered(answer),
        Err(err) => Peer::Unreachable(crate::error::error_chain(&err)),
    }
}
