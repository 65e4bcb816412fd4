//! `ferry status`: the verdict on one migration from this agent's journal and what the other
//! side answered (or that it could not be reached). Pure: no I/O, so every pair of states is
//! tested.
//!
//! Invariants:
//! - `migrated` only when a journal says the destination committed: the destination's own
//!   answer, or the source's `switched` record (written after the destination's CommitOk).
//! - A source in doubt (`switching-over`) is never reported migrated or not-migrated on its
//!   own: only the destination's journal knows, so an unreachable destination means
//!   `needs-attention`.
//! - `not-migrated` requires that the destination holds nothing for the job (aborted or
//!   unknown there); a target image left behind is `resumable` (interrupted) or
//!   `needs-attention` (the source gave up: debris to remove).

use serde::{Deserialize, Serialize};

use super::{JobView, Side, SourcePhase, TargetPhase};
use crate::transfer::{QueryAnswer, TargetState};

/// The answer to "did this disk fully migrate?".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// The destination committed: it holds the disk.
    Migrated,
    /// The source holds the disk and nothing is left at the destination.
    NotMigrated,
    /// Interrupted: the source holds the disk, the destination keeps what it received.
    Resumable,
    /// A side is unreachable, in doubt, or holds debris: read the reason.
    NeedsAttention,
}

impl Verdict {
    /// The name `ferry status` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Migrated => "migrated",
            Self::NotMigrated => "not-migrated",
            Self::Resumable => "resumable",
            Self::NeedsAttention => "needs-attention",
        }
    }
}

/// What the other side said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// It answered.
    Answered(QueryAnswer),
    /// It could not be reached (why).
    Unreachable(String),
    /// Not asked (this agent cannot reach the other side's journal from here).
    NotAsked,
}

/// The verdict and the reason read from the journals.
pub fn judge(local: &JobView, peer: &Peer) -> (Verdict, String) {
    match &local.side {
        Side::Source(source) => judge_source(source.phase, peer, local.granularity_bytes),
        Side::Target(target) => match target.phase {
            TargetPhase::Committed => (Verdict::Migrated, "committed here".into()),
            TargetPhase::Aborted => (Verdict::NotMigrated, "aborted here".into()),
            TargetPhase::Receiving => {
                let blocks = target.received.as_ref().map_or(0, |set| set.count());
                (
                    Verdict::Resumable,
                    format!(
                        "receiving here ({} durable); the source was not asked",
                        human_blocks(blocks, local.granularity_bytes)
                    ),
                )
            }
        },
    }
}

fn judge_source(phase: SourcePhase, peer: &Peer, granularity_bytes: u64) -> (Verdict, String) {
    use Verdict::{Migrated, NeedsAttention, NotMigrated, Resumable};
    let answer = match peer {
        Peer::Answered(answer) => Some(answer),
        Peer::Unreachable(_) | Peer::NotAsked => None,
    };
    let unreachable = match peer {
        Peer::Unreachable(why) => format!("destination unreachable ({why})"),
        _ => "destination not asked".into(),
    };
    let state = answer.map(|answer| answer.state);
    match (phase, state) {
        (SourcePhase::Switched | SourcePhase::Finished, Some(TargetState::Committed) | None) => (
            Migrated,
            "destination committed; the source forwards to it".into(),
        ),
        (SourcePhase::Switched | SourcePhase::Finished, Some(other)) => (
            NeedsAttention,
            format!(
                "the source recorded the commit but the destination says {}",
                other.as_str()
            ),
        ),
        (SourcePhase::SwitchingOver, Some(TargetState::Committed)) => (
            Migrated,
            "destination committed; the source has not recorded it yet (it resolves on its own)"
                .into(),
        ),
        (SourcePhase::SwitchingOver, Some(TargetState::Receiving)) => (
            NeedsAttention,
            "in doubt: switching over, the destination has not committed".into(),
        ),
        (SourcePhase::SwitchingOver, Some(other)) => (
            NotMigrated,
            format!(
                "switchover cancelled: the destination says {} (the source resolves it)",
                other.as_str()
            ),
        ),
        (SourcePhase::SwitchingOver, None) => (
            NeedsAttention,
            format!("in doubt: switching over and {unreachable}; guest writes are held"),
        ),
        (SourcePhase::Copying, Some(TargetState::Receiving)) => {
            let blocks = answer.map_or(0, |answer| answer.received_blocks);
            (
                Resumable,
                format!(
                    "interrupted; {} durable at the destination",
                    human_blocks(blocks, granularity_bytes)
                ),
            )
        }
        (SourcePhase::Copying, Some(TargetState::Unknown | TargetState::Aborted)) => (
            NotMigrated,
            "interrupted before the destination kept anything".into(),
        ),
        (SourcePhase::Copying, Some(TargetState::Committed)) => (
            NeedsAttention,
            "the journals disagree: the destination committed a job the source never \
             switched over"
                .into(),
        ),
        (SourcePhase::Copying, None) => (
            NeedsAttention,
            format!("interrupted; the source holds the disk; {unreachable}"),
        ),
        (SourcePhase::Aborted, Some(TargetState::Unknown | TargetState::Aborted)) => {
            (NotMigrated, "aborted on both sides".into())
        }
        (SourcePhase::Aborted, Some(other)) => (
            NeedsAttention,
            format!(
                "aborted at the source; the destination says {}",
                other.as_str()
            ),
        ),
        (SourcePhase::Aborted, None) => (
            NeedsAttention,
            format!("aborted at the source; {unreachable}"),
        ),
    }
}

fn human_blocks(blocks: u64, granularity_bytes: u64) -> String {
    let bytes = blocks.saturating_mul(granularity_bytes);
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{SourceView, TargetView};
    use crate::migrate::Policy;

    fn source(phase: SourcePhase) -> JobView {
        JobView {
            job_id: 1,
            batch: None,
            export: "vm1".into(),
            size_bytes: 1 << 30,
            granularity_bytes: 1 << 16,
            side: Side::Source(SourceView {
                phase,
                destination: "127.0.0.1:7451".into(),
                policy: Policy::Heat,
                forward_addr: None,
            }),
            reason: None,
            first_seq: 1,
            last_seq: 1,
        }
    }

    fn answered(state: TargetState, received_blocks: u64) -> Peer {
        Peer::Answered(QueryAnswer {
            state,
            received_blocks,
            nbd_tcp: None,
        })
    }

    #[test]
    fn migrated_only_when_a_journal_says_committed() {
        // Goal: `migrated` is never reported for a destination that did not commit. Method:
        // every source phase against every answer (and unreachable); collect the migrated
        // pairs and compare with the two allowed: switched (source saw CommitOk) or the
        // destination's own "committed".
        let phases = [
            SourcePhase::Copying,
            SourcePhase::SwitchingOver,
            SourcePhase::Switched,
            SourcePhase::Aborted,
            SourcePhase::Finished,
        ];
        let peers = [
            answered(TargetState::Unknown, 0),
            answered(TargetState::Receiving, 5),
            answered(TargetState::Committed, 0),
            answered(TargetState::Aborted, 0),
            Peer::Unreachable("refused".into()),
        ];
        for phase in phases {
            for peer in &peers {
                let (verdict, reason) = judge(&source(phase), peer);
                let target_committed =
                    matches!(peer, Peer::Answered(a) if a.state == TargetState::Committed);
                let source_switched =
                    matches!(phase, SourcePhase::Switched | SourcePhase::Finished);
                if verdict == Verdict::Migrated {
                    assert!(
                        target_committed
                            || (source_switched && matches!(peer, Peer::Unreachable(_))),
                        "{phase:?} / {peer:?}: {reason}"
                    );
                }
                if phase == SourcePhase::SwitchingOver && !target_committed {
                    assert_ne!(verdict, Verdict::Migrated, "{reason}");
                }
            }
        }
    }

    #[test]
    fn verdicts_of_common_situations() {
        // Goal: the operator reads the right word. Method: hand-picked pairs.
        let resumable = judge(
            &source(SourcePhase::Copying),
            &answered(TargetState::Receiving, 160),
        );
        assert_eq!(resumable.0, Verdict::Resumable);
        assert!(resumable.1.contains("10.0 MiB"), "{}", resumable.1);
        assert_eq!(
            judge(
                &source(SourcePhase::SwitchingOver),
                &Peer::Unreachable("timed out".into())
            )
            .0,
            Verdict::NeedsAttention
        );
        assert_eq!(
            judge(
                &source(SourcePhase::Aborted),
                &answered(TargetState::Aborted, 0)
            )
            .0,
            Verdict::NotMigrated
        );
        assert_eq!(
            judge(
                &source(SourcePhase::Copying),
                &answered(TargetState::Committed, 0)
            )
            .0,
            Verdict::NeedsAttention
        );
        let target = JobView {
            side: Side::Target(TargetView {
                phase: TargetPhase::Committed,
                source: "127.0.0.1:5555".into(),
                image_path: "/var/lib/ferry/images/vm1.img".into(),
                received: None,
                resumes: 0,
            }),
            ..source(SourcePhase::Copying)
        };
        assert_eq!(judge(&target, &Peer::NotAsked).0, Verdict::Migrated);
    }
}
