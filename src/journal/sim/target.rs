//! The target agent of the simulation: its volatile state and its protocol steps.
//!
//! The image is a count of guest writes: `applied_writes` is what was written (lost back to
//! `synced_writes` by a crash), `synced_writes` what an fdatasync made durable. The target
//! serves only after `TargetCommitted` is durable; it decides commits and answers queries
//! with [`CommitFence`], the production rule, so no stream it fenced ever writes or commits.

use super::net::{Body, Node};
use super::source::{GRANULARITY_BYTES, SIZE_BYTES};
use super::{SimLog, World, JOB_ID, TARGET_KEY};
use crate::dirty::DirtySet;
use crate::journal::commit::{Answer, CommitDecision, CommitFence, Restart};
use crate::journal::fold::{JobView, Side, TargetPhase};
use crate::journal::{commit, Record};

/// The target agent.
#[derive(Debug)]
pub struct TargetNode {
    /// Its journal.
    pub log: SimLog,
    /// Whether its process runs.
    pub up: bool,
    /// Whether it serves the disk (after a durable commit).
    pub serving: bool,
    /// Which stream may still write and commit (volatile).
    pub fence: CommitFence,
    /// Guest writes the image holds, synced or not.
    pub applied_writes: u64,
    /// Guest writes the image holds durably.
    pub synced_writes: u64,
    /// The reply (connection, message) to send once the pending append is durable.
    reply: Option<(u64, Body)>,
}

impl TargetNode {
    pub(super) fn new() -> Self {
        Self {
            log: SimLog::default(),
            up: true,
            serving: false,
            fence: CommitFence::new(),
            applied_writes: 0,
            synced_writes: 0,
            reply: None,
        }
    }

    /// Volatile state is gone; unsynced writes are lost.
    pub(super) fn crash(&mut self) {
        self.up = false;
        self.serving = false;
        self.fence = CommitFence::new();
        self.applied_writes = self.synced_writes;
        self.reply = None;
    }

    /// The durable phase of the job, if the journal has it.
    pub fn phase(&self) -> Option<TargetPhase> {
        self.log.view(TARGET_KEY).map(target_phase)
    }

    /// Whether a checkpoint would record something new.
    pub(super) fn may_checkpoint(&self) -> bool {
        self.up
            && !self.log.is_appending()
            && self.phase() == Some(TargetPhase::Receiving)
            && self.applied_writes > self.synced_writes
    }

    /// The image is removed (an aborted job).
    fn remove_image(&mut self) {
        self.serving = false;
        self.applied_writes = 0;
        self.synced_writes = 0;
    }
}

fn target_phase(view: &JobView) -> TargetPhase {
    match &view.side {
        Side::Target(target) => target.phase,
        Side::Source(_) => unreachable!("the target key holds a target job"),
    }
}

/// The target's `TargetCreated` (the same for every resume).
fn created() -> Record {
    Record::TargetCreated {
        job_id: JOB_ID,
        batch: Some("sim".into()),
        export: "vm-sim".into(),
        size_bytes: SIZE_BYTES,
        granularity_bytes: GRANULARITY_BYTES,
        source: "source:40122".into(),
        image_path: "/var/lib/ferry/vm-sim.img".into(),
    }
}

/// A checkpoint of `synced_writes`: the model fills blocks in order, one per write, so
/// the received set grows with the synced image, as the fold demands.
fn received(synced_writes: u64) -> Record {
    let mut set = DirtySet::empty(GRANULARITY_BYTES, SIZE_BYTES);
    for block in 0..synced_writes.min(SIZE_BYTES / GRANULARITY_BYTES) {
        set.insert(block);
    }
    Record::TargetReceived {
        job_id: JOB_ID,
        received: set,
    }
}

impl World {
    /// A message from the source.
    pub(super) fn target_receive(&mut self, conn: u64, body: Body) -> Result<(), String> {
        let view = self.target.log.view(TARGET_KEY).cloned();
        let phase = view.as_ref().map(target_phase);
        let job_over = phase == Some(TargetPhase::Aborted);
        match body {
            Body::Open => match self.target.log.begin_append(created()) {
                Ok(()) => self.target.reply = Some((conn, Body::OpenOk)),
                Err(_) if phase != Some(TargetPhase::Receiving) && phase.is_some() => {
                    let job_over = true;
                    self.net
                        .send(conn, Node::Source, Body::Refused { job_over });
                }
                Err(err) => return Err(format!("a resume was refused: {err}")),
            },
            Body::Blocks { applied_writes } => {
                let current = self.target.fence.is_current(JOB_ID, conn);
                if phase == Some(TargetPhase::Receiving) && current {
                    self.target.applied_writes = applied_writes;
                } else {
                    // A fenced stream is closed: nothing on it reaches the image.
                    self.net
                        .send(conn, Node::Source, Body::Refused { job_over });
                }
            }
            Body::Commit { .. } => {
                match self.target.fence.on_commit(JOB_ID, conn, view.as_ref()) {
                    CommitDecision::Commit => {
                        // fdatasync first: the commit point covers every received block.
                        self.target.synced_writes = self.target.applied_writes;
                        let record = Record::TargetCommitted { job_id: JOB_ID };
                        self.target.log.begin_append(record)?;
                        self.target.reply = Some((conn, Body::CommitOk));
                    }
                    CommitDecision::AlreadyCommitted => {
                        self.net.send(conn, Node::Source, Body::CommitOk);
                    }
                    CommitDecision::Refuse => {
                        self.stats.commits_refused += 1;
                        self.net
                            .send(conn, Node::Source, Body::Refused { job_over });
                    }
                }
            }
            Body::Query { attempt } => {
                let answer = if self.options.fence_queries {
                    self.target.fence.answer(JOB_ID, view.as_ref())
                } else if phase == Some(TargetPhase::Committed) {
                    Answer::Committed
                } else {
                    // The flaw the fence prevents: "not committed" with streams still live.
                    Answer::NotCommitted
                };
                let committed = answer == Answer::Committed;
                self.net
                    .send(conn, Node::Source, Body::Answer { attempt, committed });
            }
            Body::Abort => match phase {
                Some(TargetPhase::Receiving) => {
                    self.target.log.begin_append(Record::TargetAborted {
                        job_id: JOB_ID,
                        reason: "the source aborted".into(),
                    })?;
                    self.target.reply = Some((conn, Body::AbortOk));
                }
                Some(TargetPhase::Committed) => {
                    return Err("the source aborted a job the target committed".to_owned())
                }
                Some(TargetPhase::Aborted) | None => {
                    self.net.send(conn, Node::Source, Body::AbortOk);
                }
            },
            other => return Err(format!("the target received {other:?}")),
        }
        Ok(())
    }

    /// The pending append is durable: act on it, then reply.
    pub(super) fn target_complete(&mut self) -> Result<(), String> {
        let record = self.target.log.complete_append();
        let reply = self.target.reply.take();
        match (&record, &reply) {
            (Record::TargetCreated { .. }, Some((conn, _))) => {
                self.target.fence.open(JOB_ID, *conn);
            }
            (Record::TargetReceived { .. }, None) => {}
            (Record::TargetCommitted { .. }, Some(_)) => self.target.serving = true,
            (Record::TargetAborted { .. }, _) => self.target.remove_image(),
            (record, reply) => {
                return Err(format!("{} completed with {reply:?}", record.kind_name()))
            }
        }
        if let Some((conn, body)) = reply {
            self.net.send(conn, Node::Source, body);
        }
        Ok(())
    }

    /// `ferry abort` on the target: allowed exactly where the fold allows `TargetAborted`,
    /// which must be while receiving (never once committed).
    pub(super) fn target_operator_abort(&mut self) -> Result<(), String> {
        let record = Record::TargetAborted {
            job_id: JOB_ID,
            reason: "operator".into(),
        };
        let receiving = self.target.phase() == Some(TargetPhase::Receiving);
        let mut probe = self.target.log.clone();
        if probe.begin_append(record.clone()).is_ok() != receiving {
            return Err(format!(
                "TargetAborted in phase {:?}: the fold and the protocol disagree",
                self.target.phase()
            ));
        }
        if !receiving {
            self.stats.aborts_refused += 1;
            return Ok(());
        }
        self.target.log.begin_append(record)
    }

    /// fdatasync and record what was received.
    pub(super) fn target_checkpoint(&mut self) -> Result<(), String> {
        self.target.synced_writes = self.target.applied_writes;
        self.target
            .log
            .begin_append(received(self.target.synced_writes))
    }

    /// A restarted target: replay, then the restart table. No stream is current.
    pub(super) fn target_restart(&mut self) -> Result<(), String> {
        let views = self.target.log.replay();
        self.target.up = true;
        self.target.fence = CommitFence::new();
        let Some(view) = views.get(&TARGET_KEY) else {
            return Ok(());
        };
        match commit::restart(view) {
            Restart::KeepForResume => {}
            Restart::Serve => self.target.serving = true,
            Restart::RemoveImage => self.target.remove_image(),
            other => return Err(format!("a target job restarts as {other:?}: {view:?}")),
        }
        Ok(())
    }
}
