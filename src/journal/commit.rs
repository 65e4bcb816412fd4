//! The commit protocol's decisions (docs/commit-protocol.md): what an agent does with a job
//! after it replays its journal, how a target answers a source in doubt, which stream may
//! still write and commit a job, and what `ferry status` says of a pair of journals.
//!
//! Pure: no I/O, no clock. The agent and the simulation (`journal::sim`) call the same
//! functions, so the simulation checks the decisions production makes.
//!
//! Invariants:
//! - Authority is a function of the target's journal alone: the target is authoritative
//!   once its `TargetCommitted` is durable, the source before. A side serves guest writes
//!   only while its own journal proves it is that side: the target once committed, the
//!   source while copying or aborted, never while in doubt ([`restart`]).
//! - "Not committed" is final: [`CommitFence::answer`] fences every stream of the job before
//!   it says so, and a fenced stream never writes a block or commits again. A restart fences
//!   every stream too ([`CommitFence::new`]): they died with the process.
//! - [`status`] never guesses: a pair whose outcome a message still in flight could change is
//!   `resumable` or `needs-attention`, never `migrated` or `not-migrated`.

use std::collections::BTreeMap;
use std::fmt;

use super::fold::{JobView, Side, SourcePhase, TargetPhase};

/// What an agent does for a job after replaying its journal: the restart table of
/// docs/commit-protocol.md, one variant per phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// Source, copying: serve the export from the local image; the job resumes on a new
    /// stream (`ferry resume`), from the target's received bitmap.
    ServeAndResume,
    /// Source, aborted: serve the export from the local image, and tell the target to drop
    /// its image until it confirms.
    ServeAndAbortTarget,
    /// Source, switching over: in doubt. Hold guest writes and ask the target until it
    /// answers; never guess.
    HoldAndAsk,
    /// Source, switched: forward the export to the target, never serve the local image.
    Forward,
    /// Source, finished: serve nothing; the local image is debris.
    ServeNothing,
    /// Target, receiving: keep the image unserved for a resume. No stream is current, so
    /// nothing commits until a source opens a new one.
    KeepForResume,
    /// Target, committed: serve the image.
    Serve,
    /// Target, aborted: remove the image if it is still there.
    RemoveImage,
}

/// The restart action for `view`. Exhaustive on purpose: a new phase must decide.
pub fn restart(view: &JobView) -> Restart {
    match &view.side {
        Side::Source(source) => match source.phase {
            SourcePhase::Copying => Restart::ServeAndResume,
            SourcePhase::SwitchingOver => Restart::HoldAndAsk,
            SourcePhase::Switched => Restart::Forward,
            SourcePhase::Aborted => Restart::ServeAndAbortTarget,
            SourcePhase::Finished => Restart::ServeNothing,
        },
        Side::Target(target) => match target.phase {
            TargetPhase::Receiving => Restart::KeepForResume,
            TargetPhase::Committed => Restart::Serve,
            TargetPhase::Aborted => Restart::RemoveImage,
        },
    }
}

/// A target's answer to a source in doubt ("what is the state of job J?").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// `TargetCommitted` is durable: the source appends `SourceSwitched` and forwards.
    Committed,
    /// Not committed, and never will be by any stream open now: the source appends
    /// `SourceSwitchoverCancelled` and serves locally again.
    NotCommitted,
}

/// What a target does with a `Commit` frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitDecision {
    /// fdatasync the image, append `TargetCommitted`, serve, then send `CommitOk`.
    Commit,
    /// Already committed (a repeated Commit): send `CommitOk` again, which is still true.
    AlreadyCommitted,
    /// Refuse: the job is not committed and this stream never will commit it (fenced,
    /// aborted or unknown job). The source may take the refusal as final.
    Refuse,
}

/// Target side, volatile: for each job, the one stream that may still write blocks and
/// commit. A stream becomes current when its Open is accepted (after `TargetCreated` is
/// durable); a newer Open or an in-doubt query fences it. Empty after a restart, because
/// every stream died with the process.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitFence {
    /// Job id → its current stream's id.
    current: BTreeMap<u64, u64>,
}

impl CommitFence {
    /// A fence with no current stream (a target that just started).
    pub fn new() -> Self {
        Self::default()
    }

    /// The Open of `stream_id` was accepted: it becomes the job's current stream, and the
    /// stream it replaces is fenced.
    pub fn open(&mut self, job_id: u64, stream_id: u64) {
        self.current.insert(job_id, stream_id);
    }

    /// Whether `stream_id` may still write blocks of `job_id` or commit it.
    pub fn is_current(&self, job_id: u64, stream_id: u64) -> bool {
        self.current.get(&job_id) == Some(&stream_id)
    }

    /// What to do with a Commit for `job_id` on `stream_id`, given the target's view of
    /// the job (`None`: no such job in its journal).
    pub fn on_commit(&self, job_id: u64, stream_id: u64, view: Option<&JobView>) -> CommitDecision {
        match view.map(target_phase) {
            Some(TargetPhase::Committed) => CommitDecision::AlreadyCommitted,
            Some(TargetPhase::Receiving) if self.is_current(job_id, stream_id) => {
                CommitDecision::Commit
            }
            Some(TargetPhase::Receiving | TargetPhase::Aborted) | None => CommitDecision::Refuse,
        }
    }

    /// The answer to a source in doubt about `job_id`, given the target's view of it
    /// (`None`: no such job). Before answering `NotCommitted` it fences every stream of the
    /// job, which makes the answer final: a Commit still buffered in an older stream is
    /// refused when it arrives, and a new stream opens only after the source cancelled.
    /// The caller answers under the job's lock, so no commit runs concurrently.
    pub fn answer(&mut self, job_id: u64, view: Option<&JobView>) -> Answer {
        if view.map(target_phase) == Some(TargetPhase::Committed) {
            return Answer::Committed;
        }
        self.current.remove(&job_id);
        Answer::NotCommitted
    }
}

/// The phase of a target's view; a source's view here is a caller bug.
fn target_phase(view: &JobView) -> TargetPhase {
    match &view.side {
        Side::Target(target) => target.phase,
        Side::Source(_) => panic!("job {} is a source job, not a target job", view.job_id),
    }
}

/// What `ferry status` concludes for one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The target committed: it is authoritative.
    Migrated,
    /// The source is authoritative and the migration is over (aborted).
    NotMigrated,
    /// In progress: `ferry resume` (or the agents themselves) carry it on.
    Resumable,
    /// An operator must act: a side that would decide is unreachable, or the journals
    /// disagree.
    NeedsAttention,
}

impl Verdict {
    /// Lower-case name, as `ferry status` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Migrated => "migrated",
            Self::NotMigrated => "not-migrated",
            Self::Resumable => "resumable",
            Self::NeedsAttention => "needs-attention",
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One side's journal as `ferry status` found it.
#[derive(Debug, Clone, Copy)]
pub enum Peer<'a> {
    /// The agent did not answer.
    Unreachable,
    /// Its journal has no such job.
    NoJob,
    /// Its view of the job.
    Job(&'a JobView),
}

/// A verdict with its reason and the operator's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// The verdict.
    pub verdict: Verdict,
    /// Why, in a few words.
    pub reason: &'static str,
    /// What to do ("none" when nothing).
    pub action: &'static str,
}

/// A source as status sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceState {
    /// The source agent did not answer.
    Unreachable,
    /// Its journal has no such job.
    NoJob,
    /// Its journal's phase of the job.
    Phase(SourcePhase),
}

/// A target as status sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// The target agent did not answer.
    Unreachable,
    /// Its journal has no such job.
    NoJob,
    /// Its journal's phase of the job.
    Phase(TargetPhase),
}

fn source_state(peer: Peer<'_>) -> SourceState {
    match peer {
        Peer::Unreachable => SourceState::Unreachable,
        Peer::NoJob => SourceState::NoJob,
        Peer::Job(view) => match &view.side {
            Side::Source(source) => SourceState::Phase(source.phase),
            Side::Target(_) => panic!("job {} is a target job, not a source job", view.job_id),
        },
    }
}

fn target_state(peer: Peer<'_>) -> TargetState {
    match peer {
        Peer::Unreachable => TargetState::Unreachable,
        Peer::NoJob => TargetState::NoJob,
        Peer::Job(view) => TargetState::Phase(target_phase(view)),
    }
}

/// Whether two journals can both be right: `Err` names the contradiction. A committed
/// target needs a source that began a switchover and never cancelled it; a switched source
/// needs a committed target; a source in a switchover needs a target that has the job. Any
/// other pair is a moment of a correct run.
pub fn agree(source: Option<&JobView>, target: Option<&JobView>) -> Result<(), &'static str> {
    let source = source_state(source.map_or(Peer::NoJob, Peer::Job));
    let target = target_state(target.map_or(Peer::NoJob, Peer::Job));
    contradiction(source, target).map_or(Ok(()), Err)
}

fn contradiction(source: SourceState, target: TargetState) -> Option<&'static str> {
    use SourcePhase as S;
    use TargetPhase as T;
    match (source, target) {
        (
            SourceState::NoJob | SourceState::Phase(S::Copying | S::Aborted),
            TargetState::Phase(T::Committed),
        ) => Some("the target committed, but the source never switched over (or cancelled)"),
        (
            SourceState::Phase(S::Switched | S::Finished),
            TargetState::NoJob | TargetState::Phase(T::Receiving | T::Aborted),
        ) => Some("the source switched, but the target has not committed"),
        // A switchover begins only on a stream the target accepted, after its TargetCreated.
        (SourceState::Phase(S::SwitchingOver), TargetState::NoJob) => {
            Some("the source began a switchover, but the target has no record of the job")
        }
        _ => None,
    }
}

/// What `ferry status` reports for a job from the two journals it gathered (the table in
/// docs/commit-protocol.md).
pub fn status(source: Peer<'_>, target: Peer<'_>) -> Status {
    status_of(source_state(source), target_state(target))
}

/// [`status`] from the two phases alone (what a query over the network returns).
pub fn status_of(source: SourceState, target: TargetState) -> Status {
    use SourcePhase as S;
    use TargetPhase as T;
    use Verdict::{Migrated, NeedsAttention, NotMigrated, Resumable};
    let status = |verdict, reason, action| Status {
        verdict,
        reason,
        action,
    };
    if let Some(reason) = contradiction(source, target) {
        return status(
            NeedsAttention,
            reason,
            "keep both images; find the lost or replaced journal before serving either",
        );
    }
    match (source, target) {
        (SourceState::Phase(S::SwitchingOver), TargetState::Phase(T::Committed)) => status(
            Migrated,
            "the target committed; the source switches as soon as it reaches the target",
            "none",
        ),
        (_, TargetState::Phase(T::Committed)) => {
            status(Migrated, "the target committed and serves the disk", "none")
        }
        (SourceState::Phase(S::Switched | S::Finished), _) => status(
            Migrated,
            "the source recorded the target's commit; the target is unreachable",
            "bring the target agent back: it serves the disk",
        ),
        (SourceState::Phase(S::Aborted), TargetState::Phase(T::Receiving)) => status(
            NotMigrated,
            "the source aborted and serves the disk; the target still holds an image",
            "ferry abort removes the target's image",
        ),
        (SourceState::Phase(S::Aborted), _) => status(
            NotMigrated,
            "the source aborted and serves the disk",
            "none",
        ),
        (SourceState::Phase(S::Copying), TargetState::Phase(T::Aborted)) => status(
            NotMigrated,
            "the target dropped its image; the source serves the disk",
            "ferry abort closes the job on the source",
        ),
        (SourceState::Phase(S::Copying), TargetState::Unreachable) => status(
            NeedsAttention,
            "interrupted; the source serves the disk; the target is unreachable",
            "bring the target agent back, then ferry resume",
        ),
        (SourceState::Phase(S::Copying), _) => status(
            Resumable,
            "copying; the source serves the disk",
            "ferry resume continues from the received bitmap",
        ),
        (SourceState::Phase(S::SwitchingOver), TargetState::Unreachable) => status(
            NeedsAttention,
            "switchover in doubt and the target is unreachable: guest writes are held",
            "bring the target agent back: the outcome is in its journal",
        ),
        (SourceState::Phase(S::SwitchingOver), _) => status(
            Resumable,
            "switchover in doubt: the source holds guest writes until the target answers",
            "none: the source asks the target (ferry resume if its job stopped)",
        ),
        (SourceState::Unreachable, TargetState::Phase(T::Aborted)) => status(
            NotMigrated,
            "the target aborted; the source is authoritative",
            "bring the source agent back",
        ),
        (SourceState::Unreachable, _) => status(
            NeedsAttention,
            "the source agent is unreachable and the target has not committed",
            "bring the source agent back: it is authoritative unless a commit is in flight",
        ),
        (SourceState::NoJob, TargetState::Unreachable | TargetState::NoJob) => {
            status(NotMigrated, "no migration started on the source", "none")
        }
        (SourceState::NoJob, TargetState::Phase(T::Receiving | T::Aborted)) => status(
            NeedsAttention,
            "the target holds an image of a job the source has no record of",
            "ferry abort removes the target's image",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::file::tests::{created, started};
    use crate::journal::fold::{apply, JobKey, JobViews};
    use crate::journal::Record;

    /// The view of the job `records` (all about job 7) leave.
    fn view_of(records: &[Record]) -> JobView {
        let mut jobs = JobViews::new();
        for (seq, record) in (1..).zip(records) {
            apply(&mut jobs, seq, record).unwrap_or_else(|err| panic!("{err}"));
        }
        jobs.remove(&JobKey::of(&records[0])).expect("the job")
    }

    fn source_views() -> Vec<(SourcePhase, JobView)> {
        let begun = Record::SourceSwitchoverBegun { job_id: 7 };
        let switched = Record::SourceSwitched {
            job_id: 7,
            forward_addr: "a".into(),
        };
        let aborted = Record::SourceAborted {
            job_id: 7,
            reason: "operator".into(),
        };
        let finished = Record::SourceFinished { job_id: 7 };
        vec![
            (SourcePhase::Copying, view_of(&[started(7)])),
            (
                SourcePhase::SwitchingOver,
                view_of(&[started(7), begun.clone()]),
            ),
            (
                SourcePhase::Switched,
                view_of(&[started(7), begun.clone(), switched.clone()]),
            ),
            (SourcePhase::Aborted, view_of(&[started(7), aborted])),
            (
                SourcePhase::Finished,
                view_of(&[started(7), begun, switched, finished]),
            ),
        ]
    }

    fn target_views() -> Vec<(TargetPhase, JobView)> {
        let committed = Record::TargetCommitted { job_id: 7 };
        let aborted = Record::TargetAborted {
            job_id: 7,
            reason: "source aborted".into(),
        };
        vec![
            (TargetPhase::Receiving, view_of(&[created(7)])),
            (TargetPhase::Committed, view_of(&[created(7), committed])),
            (TargetPhase::Aborted, view_of(&[created(7), aborted])),
        ]
    }

    #[test]
    fn restart_serves_only_on_the_authoritative_side() {
        // Goal: the restart table serves writes locally only where the journal proves the
        // side authoritative, holds them in doubt, and serves a target only once committed.
        // Method: every phase of both sides against the fold's authority.
        use crate::journal::Authority;
        for (phase, view) in source_views() {
            let action = restart(&view);
            let serves_locally = matches!(
                action,
                Restart::ServeAndResume | Restart::ServeAndAbortTarget
            );
            assert_eq!(
                serves_locally,
                view.authority() == Authority::Source,
                "{phase}"
            );
            assert_eq!(
                action == Restart::HoldAndAsk,
                view.authority() == Authority::InDoubt,
                "{phase}"
            );
        }
        for (phase, view) in target_views() {
            let serves = restart(&view) == Restart::Serve;
            assert_eq!(serves, view.authority() == Authority::Target, "{phase}");
        }
    }

    #[test]
    fn not_committed_fences_every_stream_of_the_job() {
        // Goal: after a "not committed" answer no stream open at that moment can commit,
        // while another job's stream is untouched and a later Open may commit. Method: open
        // streams 1 then 2 of job 7 and stream 5 of job 8, answer for job 7, then commit.
        let receiving = &target_views()[0].1;
        let mut fence = CommitFence::new();
        fence.open(7, 1);
        fence.open(7, 2);
        fence.open(8, 5);
        assert!(
            !fence.is_current(7, 1),
            "a newer Open fences the older stream"
        );
        assert_eq!(
            fence.on_commit(7, 2, Some(receiving)),
            CommitDecision::Commit
        );
        assert_eq!(fence.answer(7, Some(receiving)), Answer::NotCommitted);
        for stream_id in [1, 2] {
            assert_eq!(
                fence.on_commit(7, stream_id, Some(receiving)),
                CommitDecision::Refuse
            );
        }
        assert!(fence.is_current(8, 5));
        fence.open(7, 3);
        assert_eq!(
            fence.on_commit(7, 3, Some(receiving)),
            CommitDecision::Commit
        );
        assert_eq!(fence.answer(7, None), Answer::NotCommitted);
        assert_eq!(fence.on_commit(7, 3, None), CommitDecision::Refuse);
    }

    #[test]
    fn committed_stays_committed_for_every_stream() {
        // Goal: once committed, a query says so and a repeated Commit gets CommitOk again,
        // on any stream; an aborted job refuses. Method: the committed and aborted views.
        let committed = &target_views()[1].1;
        let aborted = &target_views()[2].1;
        let mut fence = CommitFence::new();
        assert_eq!(fence.answer(7, Some(committed)), Answer::Committed);
        assert_eq!(
            fence.on_commit(7, 9, Some(committed)),
            CommitDecision::AlreadyCommitted
        );
        fence.open(7, 4);
        assert_eq!(fence.on_commit(7, 4, Some(aborted)), CommitDecision::Refuse);
        assert_eq!(fence.answer(7, Some(aborted)), Answer::NotCommitted);
    }

    #[test]
    fn status_covers_every_pair() {
        // Goal: every (source, target) pair gets a verdict; migrated exactly when some
        // journal proves the commit, not-migrated only when no in-flight message can change
        // it, and a contradiction is needs-attention. Method: all 7 x 5 pairs.
        let sources = source_views();
        let targets = target_views();
        let mut source_peers: Vec<(Option<SourcePhase>, Peer<'_>)> =
            vec![(None, Peer::Unreachable), (None, Peer::NoJob)];
        source_peers.extend(
            sources
                .iter()
                .map(|(phase, view)| (Some(*phase), Peer::Job(view))),
        );
        let mut target_peers: Vec<(Option<TargetPhase>, Peer<'_>)> =
            vec![(None, Peer::Unreachable), (None, Peer::NoJob)];
        target_peers.extend(
            targets
                .iter()
                .map(|(phase, view)| (Some(*phase), Peer::Job(view))),
        );
        for (source_phase, source) in &source_peers {
            for (target_phase, target) in &target_peers {
                let status = status(*source, *target);
                let case = format!("{source:?} / {target:?}: {status:?}");
                let contradiction = matches!(
                    (source_phase, target_phase),
                    (
                        Some(SourcePhase::Copying | SourcePhase::Aborted),
                        Some(TargetPhase::Committed)
                    ) | (
                        Some(SourcePhase::Switched | SourcePhase::Finished),
                        Some(TargetPhase::Receiving | TargetPhase::Aborted)
                    )
                ) || (matches!(source, Peer::NoJob)
                    && *target_phase == Some(TargetPhase::Committed))
                    || (matches!(target, Peer::NoJob)
                        && matches!(
                            source_phase,
                            Some(
                                SourcePhase::SwitchingOver
                                    | SourcePhase::Switched
                                    | SourcePhase::Finished
                            )
                        ));
                let proves_commit = *target_phase == Some(TargetPhase::Committed)
                    || matches!(
                        source_phase,
                        Some(SourcePhase::Switched | SourcePhase::Finished)
                    );
                if contradiction {
                    assert_eq!(status.verdict, Verdict::NeedsAttention, "{case}");
                    continue;
                }
                assert_eq!(status.verdict == Verdict::Migrated, proves_commit, "{case}");
                if status.verdict == Verdict::NotMigrated {
                    let final_not_committed = *source_phase == Some(SourcePhase::Aborted)
                        || *target_phase == Some(TargetPhase::Aborted)
                        || matches!(source, Peer::NoJob);
                    assert!(final_not_committed, "{case}");
                }
                assert!(!status.reason.is_empty() && !status.action.is_empty());
            }
        }
    }
}
