//! The migration journal (DESIGN.md capability 3, US9336039B2): an append-only, checksummed
//! file each agent keeps of every migration it takes part in, as source or as target.
//!
//! Purpose: after any fault (host crash, agent killed, network cut) the journals of both
//! sides say, for each disk, which side is authoritative and how far the copy got, so that
//! `ferry status` can give a verdict, the agent can restart into the right state, and
//! `ferry resume` continues from the received bitmap rather than from zero. [`Journal::open`]
//! replays the file; [`Journal::append`] writes one [`Record`] and fdatasyncs it before it
//! returns ("synced at each state change before the change takes effect"); [`fold()`] reduces
//! records to one [`JobView`] per job. Files: `record.rs` (records and their encoding),
//! `file.rs` (frames, open, replay, append, compaction), `fold.rs` (the state machine),
//! `commit.rs` (the protocol's decisions: restart actions, the target's fenced answer to a
//! source in doubt, `ferry status` verdicts), `sim/` (its deterministic simulation).
//!
//! # The commit protocol the records implement
//!
//! The full protocol, with the message sequence and every restart case, is
//! `docs/commit-protocol.md`. At every instant exactly one side is authoritative for a disk.
//! The target's `TargetCommitted` record is the commit point: before it is durable the source
//! is authoritative, after it the target is. The only side that can be unsure is a source
//! that began a switchover: it must ask the target, whose journal knows, and the target
//! makes a "not committed" answer final by fencing first ([`commit::CommitFence`]): every
//! stream of the job that is open when it answers can never write or commit again.
//!
//! ```text
//!  source:  SourceStarted ─► Copying ──SwitchoverBegun──► SwitchingOver ──Switched──► Switched ──Finished──► Finished
//!                              │  ▲                          │
//!                              │  └──SwitchoverCancelled─────┘
//!                              └──Aborted──► Aborted
//!  target:  TargetCreated ─► Receiving (TargetReceived*, TargetCreated again = resume)
//!                              ├──TargetCommitted──► Committed      (THE commit point)
//!                              └──TargetAborted────► Aborted
//! ```
//!
//! | phase | authoritative | on restart, this agent … |
//! | --- | --- | --- |
//! | source Copying | source | serves the export locally; the job is resumable (`ferry resume`) |
//! | source SwitchingOver | in doubt | serves no write until the target answers: committed → append `SourceSwitched`, forward; not committed → append `SourceSwitchoverCancelled`, serve locally; unreachable → keep asking, `ferry status` says needs-attention |
//! | source Switched | target | forwards the export to `forward_addr`, never serves the local image |
//! | source Aborted | source | serves locally; removes the migration tracker; sends Abort to the target (5 attempts, growing pauses; `ferry abort` again retries) |
//! | source Finished | target | serves nothing for the export; the local image is debris |
//! | target Receiving | source | keeps the image unserved, with its received bitmap, for a resume; no stream is current, so nothing commits before a new Open |
//! | target Committed | target | serves the image as an export |
//! | target Aborted | source | removes the image if it is still there |
//!
//! Each record is appended *before* the effect it announces (intent first), except the two
//! that report what already happened:
//!
//! | record | appended |
//! | --- | --- |
//! | `SourceStarted` | before the destination is contacted |
//! | `SourceSettings` | after `SourceStarted`, and at each resume, before the destination is contacted (it changes no phase) |
//! | `TargetCreated` | after the `Open` was checked whole (a refused `Open` leaves no record), before the image is created (so no image exists that the journal does not know) |
//! | `TargetReceived` | after the fdatasync that made its blocks durable |
//! | `SourceSwitchoverBegun` | writes held and drained, before the commit is sent |
//! | `TargetCommitted` | after the target's fdatasync, before it is served and before `CommitOk` |
//! | `SourceSwitched` | after `CommitOk` (or a "committed" answer), before forwarding and releasing writes |
//! | `SourceSwitchoverCancelled` | after the target refused the commit stream, or answered "not committed" (final: the target fenced every stream of the job before answering) |
//! | `SourceAborted` / `TargetAborted` | before anything is removed |
//! | `SourceFinished` | before the forwarding export and the image are removed |
//! | `SourceHolder` | after `SourceStarted` of a job moving a disk that arrived from elsewhere, before the destination is contacted (no phase change) |
//! | `TargetHolder` | after `TargetCreated`, when the `Open` names a holder other than this agent (no phase change) |
//! | `SourceRepointed` | at the holder, before its route switches to the disk's new place (no phase change) |
//! | `SourceHolderTold` | reports the holder's answer to the re-point after a switchover (no phase change) |
//!
//! # Invariants
//!
//! - An append returns `Ok` only after the record is durable (`File::sync_data`); a record
//!   the fold refuses is never written ([`fold::check`] runs first). After a failed append the
//!   journal refuses more appends until it is reopened; the error says whether the failed
//!   record was cut off again, or may have reached the disk (then the next replay decides).
//! - Replay never misreads: every frame is checked (header and frame crc32c) before its
//!   record is decoded. A damaged *last* frame is dropped and reported
//!   ([`Replay::dropped_tail_bytes`]), because a torn append looks exactly like it; a
//!   damaged frame with anything after it is an error naming its offset, because everything
//!   before the last frame was synced and cannot be torn. A flipped bit in the last frame is
//!   therefore indistinguishable from a torn write and is dropped too: the journal defends
//!   against crashes, not against media that rot the one record written last.
//! - Sequence numbers start at 1 and strictly increase through the file (compaction leaves
//!   gaps, never reorders).
//! - One process per journal: the file is held with an OFD lock while a [`Journal`] lives.
//!
//! # Choices
//!
//! - Records are an explicit binary encoding (`record.rs`), not JSON: bitmap checkpoints
//!   dominate the file, and as raw words or run lengths they take a fraction of what JSON
//!   numbers would; the decoder is a pure function over bytes, fuzzed in its tests like
//!   `transfer/frame.rs`. For debugging, [`Journal::inspect`] reads a journal without
//!   changing it and every record prints with `Debug`.
//! - Compaction ([`Journal::compact`]) rewrites the file atomically (temp file, fsync,
//!   rename, directory fsync, as `dirty/persist.rs` does) without the checkpoints that a
//!   later one or the job's end superseded; the fold of the file is unchanged. Records of
//!   finished jobs are kept: dropping them needs a retention rule for `ferry status`
//!   history (future work).
//! - Job ids are keyed with the role, so one agent can be source and target of the same id.
//!   They are assigned by each source, so two sources could pick the same id for the same
//!   target: a second `TargetCreated` for a different disk is refused. Cluster-unique job
//!   ids (or the source host in the key) are needed before batches span many sources.
//! - Records carry no wall-clock time (core logic reads no clock it is not given); a later
//!   version can add one to the frame if `ferry status` wants "since when".

use std::path::PathBuf;

pub mod commit;
pub mod file;
pub mod fold;
pub mod record;
pub mod seed;
pub mod shared;
pub mod sim;
pub mod status;

pub use file::{Journal, Replay, MAX_BODY_BYTES};
pub use fold::{
    fold, Authority, JobKey, JobView, JobViews, Side, SourcePhase, SourceView, TargetPhase,
    TargetView,
};
pub use record::Entry;
pub use record::{JobSettings, Record, Role};
pub use seed::{SeedStep, SeedView};
pub use shared::SharedJournal;

/// Errors from opening, replaying, appending to and compacting a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The file could not be opened, created or locked (another agent holds it).
    #[error("cannot open journal {}", .path.display())]
    Open {
        /// The journal.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file could not be read.
    #[error("cannot read journal {}", .path.display())]
    Read {
        /// The journal.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The file header is not a ferry journal this build reads.
    #[error("journal {} has a bad header: {problem}", .path.display())]
    Header {
        /// The journal.
        path: PathBuf,
        /// Bad magic, unsupported version, checksum mismatch, truncated.
        problem: String,
    },
    /// A frame that is not the last one is damaged, or a checksummed frame holds what no
    /// ferry writes: nothing after `offset_bytes` can be trusted.
    #[error("journal {} is corrupt at offset {offset_bytes}: {problem}", .path.display())]
    Corrupt {
        /// The journal.
        path: PathBuf,
        /// Where the damaged frame starts.
        offset_bytes: u64,
        /// What is wrong.
        problem: String,
    },
    /// A record is not allowed after the records before it (the state machine refused it).
    #[error("record {seq} ({record}) of {role} job {job_id} refused: {problem}")]
    Transition {
        /// The record's sequence number (the one it would have had, for an append).
        seq: u64,
        /// The job.
        job_id: u64,
        /// The side the record belongs to.
        role: Role,
        /// The record's kind.
        record: &'static str,
        /// Why.
        problem: String,
    },
    /// A record is too large for a frame.
    #[error("{record} record of {body_bytes} bytes exceeds the {MAX_BODY_BYTES}-byte limit")]
    TooLarge {
        /// The record's kind.
        record: &'static str,
        /// Its encoded size.
        body_bytes: usize,
    },
    /// Writing or syncing a record failed.
    #[error(
        "cannot append to journal {} at offset {offset_bytes} (the record {})",
        .path.display(),
        append_outcome(*.rolled_back)
    )]
    Append {
        /// The journal.
        path: PathBuf,
        /// Where the record was written.
        offset_bytes: u64,
        /// Whether the file was truncated back and synced: then the record is surely not
        /// in the journal.
        rolled_back: bool,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// An earlier append or compaction failed; the journal must be reopened.
    #[error("journal {} refuses appends after a failed write: reopen it", .path.display())]
    Broken {
        /// The journal.
        path: PathBuf,
    },
    /// Writing the header of a new journal failed.
    #[error("cannot create journal {}", .path.display())]
    Create {
        /// The journal (or its directory, for the directory sync).
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Dropping a torn tail failed.
    #[error("cannot truncate journal {} to {offset_bytes} bytes", .path.display())]
    Truncate {
        /// The journal.
        path: PathBuf,
        /// The length it was cut to.
        offset_bytes: u64,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// Rewriting the journal failed; the old file is still in place unless the error came
    /// after the rename (then the journal is [`JournalError::Broken`] until reopened).
    #[error("cannot compact journal into {}", .path.display())]
    Compact {
        /// The file that failed (the temp file, the journal or its directory).
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
}

/// How a failed append left the file, for [`JournalError::Append`].
fn append_outcome(rolled_back: bool) -> &'static str {
    if rolled_back {
        "was cut off again"
    } else {
        "may or may not be durable"
    }
}
