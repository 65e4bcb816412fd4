//! The block stream between agents (DESIGN "Block stream between agents"): TCP on its own
//! port, framed extents with a BLAKE3 digest per data extent, a mutual keyed-hash challenge
//! on the cluster key with an ephemeral X25519 exchange, then every frame sealed
//! (AES-256-GCM, per-direction keys from the key, both Hellos and the X25519 secret,
//! [`seal`]), zero extents as holes, an optional bandwidth cap.
//!
//! ```text
//!  source agent (send::Sender)                        destination agent (recv::serve)
//!   ── Hello{nonce_s, Source, mode, X25519 pub_s} ─────►  mode differs: Error{Refused}
//!   ◄──────────────────── Hello{nonce_d, Destination, mode, pub_d}
//!   ── Proof{H_k(Source, mode, both Hellos)} ──────────►  verify (else Error{Auth}, close)
//!   ◄──────────────── Proof{H_k(Destination, mode, both Hellos)}   verify (else Auth error)
//!   ═══ from here every frame (and Data payload) sealed, one counter per direction ═══
//!   ── Open{export, size, granularity, job, epoch?} ──►  host.create_target (fenced)
//!   ◄──────────────────────── OpenOk{nbd_tcp} | Error{Refused}
//!   ── Data{offset, digest} + payload ────────────────►  digest checked, then written O_DIRECT
//!   ── Zero{offset, len} / Trim{offset, len} ─────────►  hole punched
//!   ── Sync{seq} ─────────────────────────────────────►  drain writes, fdatasync
//!   ◄────────────────────── SyncOk{seq, received_blocks}
//!   ── Commit{seq, epoch?} ───────────────────────────►  sync, host.commit_target (fenced)
//!   ◄────────────────────────────────────── CommitOk{seq}   (destination authoritative)
//!   either side, any time: Error{code, offset, message}, then close
//!
//!  instead of Open, to the agent holding the guest's connection, after a later switchover:
//!   ── Repoint{job, export, size, nbd_tcp, moves} ────►  journal, forward to nbd_tcp
//!   ◄──────────────────────────── RepointOk{job, outcome}   close
//!
//!  instead of Open (status, or a source in doubt after a lost CommitOk):
//!   ── Query{job, finalize} ─────────────────────────────►  journal lookup (finalize: make
//!   ◄──────────────────── QueryOk{job, state, received}     "not committed" final), close
//! ```
//!
//! Invariants:
//! - The key never travels; each proof covers both fresh nonces and ephemeral public keys,
//!   the prover's role and the stream mode.
//! - After the handshake no frame is acted on before its record authenticated: a frame
//!   altered, injected, replayed, reordered or dropped on the way ends the connection with
//!   `Error{BadFrame}`, before anything is written or committed. Plaintext only when both
//!   agents run `stream_insecure` (measurement).
//! - A Data payload is written only after its digest matched; a mismatch stops the stream
//!   with `Error{Digest}` naming the offset, and the target stays uncommitted.
//! - Zero extents never travel as data: the destination punches a hole.
//! - After `CommitOk` the destination is authoritative; before it, the source is. A stream
//!   that drops before Commit leaves the target for a later resume (never auto-aborted).
//! - Network input never panics the agent: a bad frame gets `Error` and closes that
//!   connection only (DESIGN invariant 3). Every byte count reported is measured.

pub mod frame;
pub mod host;
pub mod key;
mod link;
mod outbound;
pub mod pace;
pub mod peer;
pub mod recv;
pub mod repoint;
pub mod seal;
pub mod send;

use std::io;
use std::path::PathBuf;

use thiserror::Error;

pub use frame::{
    ErrorCode, Frame, FrameError, Holder, Repoint, RepointOutcome, Role, TargetSpec, TargetState,
};
pub use host::{
    check_free_space, create_image_file, create_sparse_target, validate_spec, TargetError,
    TargetHost,
};
pub use key::ClusterKey;
pub use outbound::MirrorLink;
pub use pace::Pacer;
pub use peer::{abort_target, ask_until_final, resolve_peer, AbortError, PeerError, DEFAULT_PORT};
pub use recv::{hash_image, serve, ReceiverServer};
pub use send::{query_target, OpenReply, QueryAnswer, SendOptions, SendStats, Sender};

/// Errors of the block stream. The same `io::Error` means different things from the socket,
/// the source disk and the target disk, so they get different variants.
#[derive(Debug, Error)]
pub enum TransferError {
    /// Connecting to the peer failed (refused, unreachable, timed out).
    #[error("cannot connect to the peer agent")]
    Connect(#[source] io::Error),
    /// The peer did not prove the cluster key (or refused ours).
    #[error("peer authentication failed: {reason}")]
    Auth {
        /// What failed (never any key material).
        reason: &'static str,
    },
    /// The connection was reset or closed.
    #[error("peer connection lost")]
    PeerGone(#[source] io::Error),
    /// The peer did not answer in time.
    #[error("peer timed out")]
    Timeout(#[source] io::Error),
    /// Another socket error.
    #[error("socket error")]
    Socket(#[source] io::Error),
    /// Listening for streams failed.
    #[error("cannot listen for block streams")]
    Listen(#[source] io::Error),
    /// The destination refused the Open or Commit.
    #[error("destination refused: {reason}")]
    Refused {
        /// The destination's words.
        reason: String,
    },
    /// Bytes that are not a valid frame.
    #[error("malformed frame")]
    BadFrame(#[source] FrameError),
    /// A valid frame where another was due.
    #[error("unexpected {got} frame (expected {expected})")]
    Unexpected {
        /// What the protocol state allows.
        expected: &'static str,
        /// What arrived.
        got: &'static str,
    },
    /// A Data payload did not match its digest.
    #[error("data digest mismatch at offset {offset_bytes}")]
    Digest {
        /// Offset of the Data frame.
        offset_bytes: u64,
    },
    /// A Data, Zero or Trim frame beyond the target's size.
    #[error("extent {offset_bytes}+{len_bytes} is outside the disk")]
    OutOfRange {
        /// Extent start.
        offset_bytes: u64,
        /// Extent length.
        len_bytes: u64,
    },
    /// The peer stopped with an error of another kind.
    #[error("peer error ({code:?}): {message}")]
    Remote {
        /// The peer's category.
        code: ErrorCode,
        /// The peer's words.
        message: String,
    },
    /// Reading the source disk failed.
    #[error("source read failed")]
    SourceRead(#[source] io::Error),
    /// Writing (or syncing) the target disk failed.
    #[error("target write failed")]
    TargetWrite(#[source] io::Error),
    /// An io engine could not be opened.
    #[error("io engine unavailable")]
    Engine(#[source] crate::io::IoError),
    /// Starting a thread failed.
    #[error("cannot start a thread")]
    Spawn(#[source] io::Error),
    /// The key file could not be read.
    #[error("cannot read cluster key {}", path.display())]
    KeyRead {
        /// Key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The key file is readable by group or others.
    #[error("cluster key {} has mode {mode:o}: group/other access must be off (chmod 600)", path.display())]
    KeyPermissions {
        /// Key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The key file does not hold 64 hex characters.
    #[error("cluster key {} is not 64 hex characters", path.display())]
    KeyFormat {
        /// Key file.
        path: PathBuf,
    },
    /// A fresh key could not be written.
    #[error("cannot create cluster key {}", path.display())]
    KeyCreate {
        /// Key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl TransferError {
    /// Classifies a socket error.
    pub fn from_socket(err: io::Error) -> Self {
        use io::ErrorKind as Kind;
        match err.kind() {
            Kind::WouldBlock | Kind::TimedOut => Self::Timeout(err),
            Kind::ConnectionReset
            | Kind::ConnectionAborted
            | Kind::BrokenPipe
            | Kind::UnexpectedEof
            | Kind::NotConnected => Self::PeerGone(err),
            _ => Self::Socket(err),
        }
    }

    /// Whether a supervisor should reconnect and resume the job. Exhaustive on purpose: a new
    /// variant must decide.
    pub fn should_reconnect(&self) -> bool {
        match self {
            Self::PeerGone(_) | Self::Timeout(_) | Self::Socket(_) => true,
            // The supervisor backs off instead of reconnecting at once.
            Self::Connect(_) => false,
            // Configuration or protocol problems: reconnecting gives the same answer.
            Self::Auth { .. }
            | Self::Refused { .. }
            | Self::BadFrame(_)
            | Self::Unexpected { .. }
            | Self::OutOfRange { .. }
            | Self::Remote { .. }
            | Self::Listen(_)
            | Self::Spawn(_)
            | Self::Engine(_)
            | Self::KeyRead { .. }
            | Self::KeyPermissions { .. }
            | Self::KeyFormat { .. }
            | Self::KeyCreate { .. } => false,
            // Corruption on the wire is rare and the extent is resent on the next attempt.
            Self::Digest { .. } => true,
            // Disk errors: the operator must look first.
            Self::SourceRead(_) | Self::TargetWrite(_) => false,
        }
    }

    /// The error a peer reported in an `Error` frame.
    #[cold]
    pub fn from_remote(code: ErrorCode, offset_bytes: u64, message: String) -> Self {
        match code {
            ErrorCode::Auth => Self::Auth {
                reason: "the peer refused our proof of the cluster key",
            },
            ErrorCode::Refused => Self::Refused { reason: message },
            ErrorCode::Digest => Self::Digest { offset_bytes },
            ErrorCode::BadFrame | ErrorCode::TargetWrite | ErrorCode::Internal => {
                Self::Remote { code, message }
            }
        }
    }
}

#[cfg(test)]
mod tests;
