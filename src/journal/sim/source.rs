//! The source agent of the simulation: its volatile mode and its protocol steps.
//!
//! The mode is what the process knows; the journal is what survives it. Writes are served
//! locally only in `Idle`, `Copying` and `Aborted`, forwarded only in `Forwarding` and
//! `Finished`, and held from `Held` (before `SourceSwitchoverBegun` is appended) until
//! `SourceSwitched` or `SourceSwitchoverCancelled` is durable. In doubt (`Committing`,
//! `InDoubt`) it never guesses: only `CommitOk`, a refusal of its commit stream, or an answer
//! to a query naming its attempt decide.

use super::net::{Body, Node};
use super::{SimLog, World, JOB_ID, SOURCE_KEY};
use crate::journal::commit::{self, Restart};
use crate::journal::fold::Side;
use crate::journal::Record;
use crate::migrate::Policy;

/// Size of the simulated disk.
pub(super) const SIZE_BYTES: u64 = 16 * GRANULARITY_BYTES;
/// Block size of the simulated disk.
pub(super) const GRANULARITY_BYTES: u64 = 4096;

/// A block stream as the source sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    /// Its connection.
    pub conn: u64,
    /// Whether `OpenOk` arrived.
    pub ready: bool,
    /// The guest writes the last Blocks on this stream carried (`None`: none sent yet).
    /// Like a dirty bitmap, it makes the final set hold only what changed since.
    pub sent_writes: Option<u64>,
}

/// What the source process is doing; see the module docs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceMode {
    /// Not running.
    Down,
    /// No job in the journal: serves locally, may start one.
    Idle,
    /// Copy passes: serves locally.
    Copying {
        /// The current stream, if any.
        stream: Option<Stream>,
    },
    /// Writes held, deciding whether the switchover fits (no record yet).
    Held {
        /// The stream the final blocks will go on.
        stream: Stream,
        /// The final set, taken once writes were held: the guest writes it carries.
        final_writes: u64,
    },
    /// `SourceSwitchoverBegun` durable, final blocks and Commit sent: waiting for CommitOk.
    Committing {
        /// The commit stream.
        conn: u64,
    },
    /// In doubt: asking the target.
    InDoubt {
        /// The commit stream, if this process sent the Commit (a CommitOk on it still counts).
        stream: Option<u64>,
        /// The query connection, if one is open.
        query: Option<u64>,
    },
    /// `SourceSwitched` durable: forwards writes to the target.
    Forwarding,
    /// `SourceAborted` durable: serves locally, tells the target to drop its image.
    Aborted {
        /// The Abort connection, if one is open.
        conn: Option<u64>,
        /// Whether the target confirmed (AbortOk).
        confirmed: bool,
    },
    /// `SourceFinished` durable: the guest uses the target directly.
    Finished,
}

/// The source agent.
#[derive(Debug)]
pub struct SourceNode {
    /// Its journal.
    pub log: SimLog,
    /// Its process's state.
    pub mode: SourceMode,
    /// Guest writes the local image holds (durable: the model writes with FUA).
    pub applied_writes: u64,
}

impl SourceNode {
    pub(super) fn new() -> Self {
        Self {
            log: SimLog::default(),
            mode: SourceMode::Idle,
            applied_writes: 0,
        }
    }

    /// Whether guest writes are applied to the local image now.
    pub fn serves_locally(&self) -> bool {
        matches!(
            self.mode,
            SourceMode::Idle | SourceMode::Copying { .. } | SourceMode::Aborted { .. }
        )
    }

    /// Whether guest writes go to the target now.
    pub fn forwards(&self) -> bool {
        matches!(self.mode, SourceMode::Forwarding | SourceMode::Finished)
    }

    /// Whether the source waits for a message its timer gives up on.
    pub fn is_waiting(&self) -> bool {
        matches!(
            self.mode,
            SourceMode::Copying {
                stream: Some(Stream { ready: false, .. })
            } | SourceMode::Committing { .. }
                | SourceMode::InDoubt { .. }
                | SourceMode::Aborted {
                    confirmed: false,
                    ..
                }
        )
    }

    pub(super) fn crash(&mut self) {
        self.mode = SourceMode::Down;
    }

    /// The switchover attempt the journal is at.
    fn attempt(&self) -> u32 {
        match self.log.view(SOURCE_KEY).map(|view| &view.side) {
            Some(Side::Source(source)) => source.switchovers,
            _ => 0,
        }
    }
}

/// The source's first record.
pub(super) fn started() -> Record {
    Record::SourceStarted {
        job_id: JOB_ID,
        batch: Some("sim".into()),
        export: "vm-sim".into(),
        size_bytes: SIZE_BYTES,
        granularity_bytes: GRANULARITY_BYTES,
        destination: "target:7410".into(),
        policy: Policy::Heat,
    }
}

/// `SourceFinished` of the job.
pub(super) fn finished() -> Record {
    Record::SourceFinished { job_id: JOB_ID }
}

impl World {
    /// A new connection to the target.
    fn connect(&mut self) -> u64 {
        self.net.connect(self.target.up)
    }

    pub(super) fn source_start(&mut self) -> Result<(), String> {
        self.source.log.begin_append(started())
    }

    /// Opens a stream; a refused connection (target down) leaves no stream.
    pub(super) fn source_open(&mut self) {
        let conn = self.connect();
        let stream = self
            .net
            .send(conn, Node::Target, Body::Open)
            .then_some(Stream {
                conn,
                ready: false,
                sent_writes: None,
            });
        if stream.is_none() {
            self.net.close(conn, Node::Source);
        }
        self.source.mode = SourceMode::Copying { stream };
    }

    /// A copy pass; a send error drops the stream.
    pub(super) fn source_copy(&mut self) {
        let SourceMode::Copying {
            stream: Some(mut stream),
        } = self.source.mode
        else {
            unreachable!("copy needs a ready stream");
        };
        let applied_writes = self.source.applied_writes;
        if self
            .net
            .send(stream.conn, Node::Target, Body::Blocks { applied_writes })
        {
            stream.sent_writes = Some(applied_writes);
            self.source.mode = SourceMode::Copying {
                stream: Some(stream),
            };
        } else {
            self.net.close(stream.conn, Node::Source);
            self.source.mode = SourceMode::Copying { stream: None };
        }
    }

    pub(super) fn source_hold(&mut self) -> Result<(), String> {
        let SourceMode::Copying {
            stream: Some(stream @ Stream { ready: true, .. }),
        } = self.source.mode
        else {
            return Err(format!("hold in {:?}", self.source.mode));
        };
        // The final set is taken now, with writes held (plan.rs: hold, then take).
        let final_writes = self.source.applied_writes;
        self.source.mode = SourceMode::Held {
            stream,
            final_writes,
        };
        Ok(())
    }

    pub(super) fn source_defer(&mut self) -> Result<(), String> {
        let SourceMode::Held { stream, .. } = self.source.mode else {
            return Err(format!("defer in {:?}", self.source.mode));
        };
        self.source.mode = SourceMode::Copying {
            stream: Some(stream),
        };
        Ok(())
    }

    /// Appends `SourceSwitchoverBegun`; the final blocks and Commit go when it is durable.
    pub(super) fn source_begin(&mut self) -> Result<(), String> {
        self.source
            .log
            .begin_append(Record::SourceSwitchoverBegun { job_id: JOB_ID })
    }

    /// The timer fired while waiting.
    pub(super) fn source_timeout(&mut self) -> Result<(), String> {
        match self.source.mode {
            SourceMode::Copying {
                stream: Some(Stream {
                    conn, ready: false, ..
                }),
            } => {
                self.net.close(conn, Node::Source);
                self.source.mode = SourceMode::Copying { stream: None };
            }
            // No CommitOk in time: in doubt. Keep listening on the stream, and ask.
            SourceMode::Committing { conn } => self.source_ask(Some(conn), None),
            SourceMode::InDoubt { stream, query } => self.source_ask(stream, query),
            SourceMode::Aborted {
                conn,
                confirmed: false,
            } => self.source_send_abort(conn),
            other => return Err(format!("timeout in {other:?}")),
        }
        Ok(())
    }

    /// Sends a query naming the current attempt on a new connection (closing `old_query`).
    fn source_ask(&mut self, stream: Option<u64>, old_query: Option<u64>) {
        if let Some(old) = old_query {
            self.net.close(old, Node::Source);
        }
        let conn = self.connect();
        let attempt = self.source.attempt();
        let query = self
            .net
            .send(conn, Node::Target, Body::Query { attempt })
            .then_some(conn);
        self.source.mode = SourceMode::InDoubt { stream, query };
    }

    /// Sends Abort on a new connection (closing `old`).
    fn source_send_abort(&mut self, old: Option<u64>) {
        if let Some(old) = old {
            self.net.close(old, Node::Source);
        }
        let conn = self.connect();
        let conn = self
            .net
            .send(conn, Node::Target, Body::Abort)
            .then_some(conn);
        self.source.mode = SourceMode::Aborted {
            conn,
            confirmed: false,
        };
    }

    /// `ferry abort`: allowed exactly where the fold allows `SourceAborted`, which is
    /// checked against the protocol's own rule (never in doubt, never once switched).
    pub(super) fn operator_abort(&mut self) -> Result<(), String> {
        let record = Record::SourceAborted {
            job_id: JOB_ID,
            reason: "operator".into(),
        };
        let protocol_allows = matches!(
            self.source.mode,
            SourceMode::Copying { .. } | SourceMode::Held { .. }
        );
        let mut probe = self.source.log.clone();
        let fold_allows = probe.begin_append(record.clone()).is_ok();
        if protocol_allows != fold_allows {
            return Err(format!(
                "abort in {:?}: the fold says {fold_allows}, the protocol {protocol_allows}",
                self.source.mode
            ));
        }
        if !protocol_allows {
            self.stats.aborts_refused += 1;
            return Ok(());
        }
        if let SourceMode::Held { stream, .. } = self.source.mode {
            // Release the held writes: the source is authoritative and stays so.
            self.source.mode = SourceMode::Copying {
                stream: Some(stream),
            };
        }
        self.source.log.begin_append(record)
    }

    /// The pending append is durable: act on it.
    pub(super) fn source_complete(&mut self) -> Result<(), String> {
        let record = self.source.log.complete_append();
        match (&record, self.source.mode) {
            (Record::SourceStarted { .. }, _) => {
                self.source.mode = SourceMode::Copying { stream: None };
            }
            (
                Record::SourceSwitchoverBegun { .. },
                SourceMode::Held {
                    stream,
                    final_writes,
                },
            ) => {
                // Writes were held before the final set was taken, so it carries every
                // acknowledged write not sent yet on this stream (none: only the Commit).
                let conn = stream.conn;
                let blocks = Body::Blocks {
                    applied_writes: final_writes,
                };
                let sent = stream.sent_writes == Some(final_writes)
                    || self.net.send(conn, Node::Target, blocks);
                if sent {
                    let attempt = self.source.attempt();
                    self.net.send(conn, Node::Target, Body::Commit { attempt });
                }
                self.source.mode = SourceMode::Committing { conn };
            }
            (Record::SourceSwitched { .. }, _) => {
                self.source_close_all();
                self.source.mode = SourceMode::Forwarding;
            }
            (Record::SourceSwitchoverCancelled { .. }, _) => {
                self.stats.cancels += 1;
                self.source_close_all();
                self.source.mode = SourceMode::Copying { stream: None };
            }
            (Record::SourceAborted { .. }, _) => {
                self.source_close_all();
                self.source_send_abort(None);
            }
            (Record::SourceFinished { .. }, _) => self.source.mode = SourceMode::Finished,
            (record, mode) => return Err(format!("{} completed in {mode:?}", record.kind_name())),
        }
        Ok(())
    }

    /// Closes every connection the mode holds (streams die with a decided switchover).
    fn source_close_all(&mut self) {
        let conns = match self.source.mode {
            SourceMode::Copying { stream } => [stream.map(|stream| stream.conn), None],
            SourceMode::Held { stream, .. } => [Some(stream.conn), None],
            SourceMode::Committing { conn } => [Some(conn), None],
            SourceMode::InDoubt { stream, query } => [stream, query],
            SourceMode::Aborted { conn, .. } => [conn, None],
            SourceMode::Down | SourceMode::Idle | SourceMode::Forwarding | SourceMode::Finished => {
                [None, None]
            }
        };
        for conn in conns.into_iter().flatten() {
            self.net.close(conn, Node::Source);
        }
    }

    /// A message from the target.
    pub(super) fn source_receive(&mut self, conn: u64, body: Body) -> Result<(), String> {
        let attempt = self.source.attempt();
        match (body, self.source.mode) {
            (
                Body::OpenOk,
                SourceMode::Copying {
                    stream: Some(stream),
                },
            ) if stream.conn == conn => {
                let stream = Some(Stream {
                    ready: true,
                    ..stream
                });
                self.source.mode = SourceMode::Copying { stream };
            }
            (Body::CommitOk, SourceMode::Committing { conn: stream })
            | (
                Body::CommitOk,
                SourceMode::InDoubt {
                    stream: Some(stream),
                    ..
                },
            ) if stream == conn => self.source.log.begin_append(switched())?,
            (
                Body::Refused { job_over },
                SourceMode::Copying {
                    stream: Some(stream),
                },
            ) if stream.conn == conn => {
                self.net.close(conn, Node::Source);
                self.source.mode = SourceMode::Copying { stream: None };
                if job_over {
                    self.source.log.begin_append(Record::SourceAborted {
                        job_id: JOB_ID,
                        reason: "the target dropped the job".into(),
                    })?;
                }
            }
            (Body::Refused { .. }, SourceMode::Held { stream, .. }) if stream.conn == conn => {
                // No record yet: release the held writes, the source is authoritative.
                self.net.close(conn, Node::Source);
                self.source.mode = SourceMode::Copying { stream: None };
            }
            // The commit stream was refused: that stream never commits, and it was the only
            // one that carried this attempt's Commit.
            (Body::Refused { .. }, SourceMode::Committing { conn: stream })
            | (
                Body::Refused { .. },
                SourceMode::InDoubt {
                    stream: Some(stream),
                    ..
                },
            ) if stream == conn => self.source.log.begin_append(cancelled("commit refused"))?,
            (
                Body::Answer {
                    attempt: answered,
                    committed,
                },
                SourceMode::InDoubt {
                    query: Some(query), ..
                },
            ) if query == conn && answered == attempt => {
                let record = if committed {
                    self.stats.answers_committed += 1;
                    switched()
                } else {
                    self.stats.answers_not_committed += 1;
                    cancelled("the target answered: not committed")
                };
                self.source.log.begin_append(record)?;
            }
            (
                Body::AbortOk,
                SourceMode::Aborted {
                    conn: Some(abort), ..
                },
            ) if abort == conn => {
                self.net.close(conn, Node::Source);
                self.source.mode = SourceMode::Aborted {
                    conn: None,
                    confirmed: true,
                };
            }
            // Anything else is stale (an old stream, an answer about another attempt, a
            // repeated reply) and changes nothing.
            _ => {}
        }
        Ok(())
    }

    /// A restarted source: replay, then the restart table.
    pub(super) fn source_restart(&mut self) -> Result<(), String> {
        let views = self.source.log.replay();
        let Some(view) = views.get(&SOURCE_KEY) else {
            self.source.mode = SourceMode::Idle;
            return Ok(());
        };
        match commit::restart(view) {
            Restart::ServeAndResume => self.source.mode = SourceMode::Copying { stream: None },
            Restart::HoldAndAsk => self.source_ask(None, None),
            Restart::Forward => self.source.mode = SourceMode::Forwarding,
            Restart::ServeAndAbortTarget => self.source_send_abort(None),
            Restart::ServeNothing => self.source.mode = SourceMode::Finished,
            other => return Err(format!("a source job restarts as {other:?}: {view:?}")),
        }
        Ok(())
    }
}

fn switched() -> Record {
    Record::SourceSwitched {
        job_id: JOB_ID,
        forward_addr: "target:10809".into(),
    }
}

fn cancelled(reason: &str) -> Record {
    Record::SourceSwitchoverCancelled {
        job_id: JOB_ID,
        reason: reason.into(),
    }
}
