//! Pure encode and decode of the block-stream frames (no I/O), so every function is tested and
//! fuzzed on byte slices.
//!
//! ```text
//!  0      4   5    6     8          12          16         20          24
//!  ┌──────┬───┬────┬─────┬──────────┬───────────┬──────────┬───────────┐
//!  │magic │ver│kind│flags│ meta_len │ data_len  │ meta_crc │header_crc │  header (24 bytes, BE)
//!  └──────┴───┴────┴─────┴──────────┴───────────┴──────────┴───────────┘
//!  meta: meta_len bytes of kind-specific fields (≤ 4 KiB), crc32c in meta_crc
//!  data: data_len payload bytes, only for Data (≤ 8 MiB), BLAKE3 digest carried in meta
//! ```
//!
//! After the handshake, `link` seals each frame's meta (the header as associated data) and
//! each payload, and a 16-byte tag follows each; the lengths here are the plaintext ones.
//!
//! Invariants:
//! - Integers are big-endian. `header_crc` is the crc32c of bytes 0..20, `meta_crc` of the
//!   meta bytes: a flipped bit is a [`FrameError`], never a different frame.
//! - Every length is bounded before anything is allocated or read: meta ≤ [`MAX_META_BYTES`],
//!   payload ≤ [`MAX_DATA_BYTES`], export names ≤ [`MAX_EXPORT_BYTES`], messages ≤
//!   [`MAX_MESSAGE_BYTES`].
//! - Decoding never panics, whatever the input (the fuzz loop in `frame/tests.rs`).
//! - Encoders append to a caller-owned `Vec<u8>`; a Data frame's payload is not copied: the
//!   caller writes it after the encoded header and meta.

use thiserror::Error;

mod decode;
mod encode;

pub use decode::{decode, decode_header, decode_meta};
pub use encode::{encode, encode_for_version};

/// Cuts a message to a bounded string field (here for the frame's users).
pub use crate::codec::truncate_utf8;
use crate::codec::{self, CodecError};
use crate::dirty::{MAX_GRANULARITY_BYTES, MIN_GRANULARITY_BYTES};

/// First four bytes of every frame: "FRYB" (ferry block stream).
pub const MAGIC: u32 = 0x4652_5942;
/// Protocol version this code speaks. 2: frames after the handshake are sealed
/// ([`super::seal`]) and Hello carries the stream mode; a version-1 peer is refused at its
/// first header ([`FrameError::BadVersion`]), never misread.
pub const VERSION: u8 = 2;
/// Fixed header size.
pub const HEADER_BYTES: usize = 24;
/// Largest meta section.
pub const MAX_META_BYTES: usize = 4096;
/// Largest Data payload (8 MiB).
pub const MAX_DATA_BYTES: usize = 8 << 20;
/// Most digests one DigestsOk carries (they travel in the meta).
pub const MAX_DIGESTS: u32 = 120;
/// Longest export or batch name: the name rule's limit.
pub const MAX_EXPORT_BYTES: usize = crate::name::NAME_MAX_BYTES;
/// Longest error message or address string.
pub const MAX_MESSAGE_BYTES: usize = 1024;
/// Most blocks a target may have at its granularity (the destination keeps a bitmap of
/// them: 2^30 bits = 128 MiB at most, e.g. 64 TiB at 64 KiB blocks).
pub const MAX_BLOCKS: u64 = 1 << 30;

/// Which side of the stream a peer is; part of each proof so a proof cannot be reflected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The agent that owns the disk and sends extents.
    Source,
    /// The agent that receives and writes them.
    Destination,
}

impl Role {
    /// Wire value.
    pub fn to_wire(self) -> u8 {
        match self {
            Role::Source => 1,
            Role::Destination => 2,
        }
    }

    fn from_wire(value: u8) -> Option<Role> {
        match value {
            1 => Some(Role::Source),
            2 => Some(Role::Destination),
            _ => None,
        }
    }
}

/// What the destination is asked to create and fill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetSpec {
    /// Export name the disk will be served under (1..=64 bytes of UTF-8).
    pub export: String,
    /// Disk size.
    pub size_bytes: u64,
    /// Block size of the destination's received-blocks bitmap (a power of two, 4 KiB..=64 MiB).
    pub granularity_bytes: u64,
    /// Migration job this stream belongs to (journal key).
    pub job_id: u64,
    /// Batch the job belongs to, if any (≤ 64 bytes; journal grouping).
    pub batch: Option<String>,
    /// The agent that holds the guest's connection to this disk (absent from older
    /// sources): the destination tells it at its own later switchover where the disk went.
    pub holder: Option<Holder>,
    /// The seed the destination's image came from (`ferry seed sync`): the destination
    /// continues that seeded job only if it imported exactly this seed for it.
    pub seed: Option<[u8; 16]>,
    /// The manager epoch the source's job runs under (absent for jobs an operator started,
    /// and from older sources): the destination refuses an epoch older than the highest it
    /// has seen, so a deposed manager's job cannot open a target.
    pub manager_epoch: Option<u64>,
}

/// The agent holding the guest's connection to a disk that has moved away from it: it
/// forwards the guest's requests to whichever agent holds the disk, and is told at every
/// later switchover so that the hop stays one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its block-stream address (≤ 1024 bytes).
    pub addr: String,
    /// Its job that first moved the disk away: the forwarding that is re-pointed.
    pub job_id: u64,
    /// Switchovers of the disk since (and including) the holder's own: of two re-points,
    /// the one with more moves is the newer.
    pub moves: u32,
}

/// A disk the holder forwards to has moved on (a later switchover): forward to `nbd_tcp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Repoint {
    /// The holder's job (its [`Holder::job_id`]).
    pub job_id: u64,
    /// The export, as the holder serves it.
    pub export: String,
    /// The disk's size: a holder refuses a re-point to a disk of another size.
    pub size_bytes: u64,
    /// Where the disk is served now (NBD over TCP).
    pub nbd_tcp: String,
    /// The move that put it there ([`Holder::moves`] of that move).
    pub moves: u32,
}

/// What a holder did with a [`Repoint`]; each is final for the agent that asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepointOutcome {
    /// It forwards to the new address now (or already did).
    Repointed,
    /// A newer move already re-pointed it; this one is ignored.
    Superseded,
    /// It no longer forwards that disk under that job (it came home, or was removed).
    NotForwarding,
}

impl RepointOutcome {
    fn to_wire(self) -> u8 {
        match self {
            Self::Repointed => 1,
            Self::Superseded => 2,
            Self::NotForwarding => 3,
        }
    }

    fn from_wire(value: u8) -> Option<Self> {
        Some(match value {
            1 => Self::Repointed,
            2 => Self::Superseded,
            3 => Self::NotForwarding,
            _ => return None,
        })
    }

    /// Lower-case name for logs and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Repointed => "re-pointed",
            Self::Superseded => "superseded",
            Self::NotForwarding => "not forwarding",
        }
    }
}

/// A job's state in the destination's journal, as [`Frame::QueryOk`] carries it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetState {
    /// The destination never heard of the job (or forgot it).
    Unknown,
    /// Blocks were received; not committed (and, after a finalizing Query, never will be).
    Receiving,
    /// Committed: the destination is authoritative.
    Committed,
    /// Aborted: the destination dropped the target.
    Aborted,
}

impl TargetState {
    fn to_wire(self) -> u8 {
        match self {
            Self::Unknown => 0,
            Self::Receiving => 1,
            Self::Committed => 2,
            Self::Aborted => 3,
        }
    }

    fn from_wire(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::Unknown,
            1 => Self::Receiving,
            2 => Self::Committed,
            3 => Self::Aborted,
            _ => return None,
        })
    }

    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unknown => "unknown",
            Self::Receiving => "receiving",
            Self::Committed => "committed",
            Self::Aborted => "aborted",
        }
    }
}

/// Why the peer stopped; carried by [`Frame::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The peer did not prove the cluster key.
    Auth,
    /// The destination refused the Open or the Commit.
    Refused,
    /// A Data payload did not match its digest (offset in the frame).
    Digest,
    /// A malformed or unexpected frame.
    BadFrame,
    /// Writing the target failed.
    TargetWrite,
    /// Anything else (the message says what).
    Internal,
}

impl ErrorCode {
    fn to_wire(self) -> u16 {
        match self {
            ErrorCode::Auth => 1,
            ErrorCode::Refused => 2,
            ErrorCode::Digest => 3,
            ErrorCode::BadFrame => 4,
            ErrorCode::TargetWrite => 5,
            ErrorCode::Internal => 6,
        }
    }

    fn from_wire(value: u16) -> Option<ErrorCode> {
        Some(match value {
            1 => ErrorCode::Auth,
            2 => ErrorCode::Refused,
            3 => ErrorCode::Digest,
            4 => ErrorCode::BadFrame,
            5 => ErrorCode::TargetWrite,
            6 => ErrorCode::Internal,
            _ => return None,
        })
    }
}

/// One frame, without a Data frame's payload (which follows it on the wire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// First frame of each side: a fresh nonce and the sender's role.
    Hello {
        /// Random bytes, never reused.
        nonce: [u8; 32],
        /// Who sends this Hello.
        role: Role,
        /// The sender runs its frames unsealed after the handshake (measurement only).
        insecure: bool,
        /// The sender's ephemeral X25519 public key for this connection (record keys).
        public: [u8; 32],
    },
    /// Proof of the cluster key: keyed BLAKE3 over both Hellos and the prover's role.
    Proof {
        /// The MAC.
        mac: [u8; 32],
    },
    /// Source asks the destination to create (or reopen, on resume) a target.
    Open(TargetSpec),
    /// Destination accepted the Open.
    OpenOk {
        /// Where the destination serves NBD over TCP (for forwarding after switchover).
        nbd_tcp: Option<String>,
        /// A seeded image was changed since ferry last wrote it (a write outside ferry): the
        /// source must compare digests rather than trust its tracker.
        changed_outside: bool,
    },
    /// `len_bytes` payload bytes for `offset_bytes` follow this frame.
    Data {
        /// Target offset.
        offset_bytes: u64,
        /// Payload length (1..=8 MiB).
        len_bytes: u32,
        /// BLAKE3 of the payload, checked before it is written.
        digest: [u8; 32],
    },
    /// The range reads as zeros (a hole at the destination); no payload travels.
    Zero {
        /// Target offset.
        offset_bytes: u64,
        /// Length (> 0).
        len_bytes: u64,
    },
    /// The range was discarded at the source.
    Trim {
        /// Target offset.
        offset_bytes: u64,
        /// Length (> 0).
        len_bytes: u64,
    },
    /// Write everything received, fdatasync, answer SyncOk.
    Sync {
        /// Echoed in the answer.
        seq: u64,
    },
    /// Everything before the Sync is durable.
    SyncOk {
        /// The Sync's seq.
        seq: u64,
        /// Blocks (of the spec's granularity) written on this connection.
        received_blocks: u64,
    },
    /// Sync, then make the target authoritative (start serving it).
    Commit {
        /// Echoed in the answer.
        seq: u64,
        /// The manager epoch the source's job commits under (see
        /// [`TargetSpec::manager_epoch`]); absent for operator jobs and older sources.
        manager_epoch: Option<u64>,
    },
    /// The destination is authoritative from now on.
    CommitOk {
        /// The Commit's seq.
        seq: u64,
    },
    /// Write everything received, then answer the BLAKE3 digest of the whole target image
    /// (the source compares it with its own at the switchover point).
    Verify {
        /// Echoed in the answer.
        seq: u64,
    },
    /// The digest of the target image after everything before the Verify was written.
    VerifyOk {
        /// The Verify's seq.
        seq: u64,
        /// BLAKE3 of the whole image.
        digest: [u8; 32],
    },
    /// Answer once every extent before it has been written (not synced): the ordering
    /// point of mirrored guest writes, which the source acknowledges to the guest only after
    /// the FenceOk.
    Fence {
        /// Echoed in the answer.
        seq: u64,
    },
    /// Everything before the Fence with this seq is written at the destination.
    FenceOk {
        /// The Fence's seq.
        seq: u64,
    },
    /// BLAKE3 digests of `count` consecutive blocks of `block_bytes` from `offset_bytes` of
    /// the target image (the last clipped to the disk), after everything before it is
    /// written: a resume without the source's tracker sends only the blocks that differ.
    Digests {
        /// Echoed in the answer.
        seq: u64,
        /// First block's offset.
        offset_bytes: u64,
        /// Block size.
        block_bytes: u32,
        /// Blocks asked for (≤ [`MAX_DIGESTS`]).
        count: u32,
    },
    /// The answer to Digests, in block order.
    DigestsOk {
        /// The Digests' seq.
        seq: u64,
        /// One BLAKE3 digest per block.
        digests: Vec<[u8; 32]>,
    },
    /// Instead of Open: what does the destination's journal say about job `job_id`? With
    /// `finalize`, a job not committed is made uncommittable first (a source in doubt asks
    /// so, and may then serve locally: no delayed Commit can succeed afterwards).
    Query {
        /// The source's job id.
        job_id: u64,
        /// Make "not committed" final.
        finalize: bool,
    },
    /// The answer to Query; the connection ends after it.
    QueryOk {
        /// The job asked about.
        job_id: u64,
        /// Its state at the destination.
        state: TargetState,
        /// Blocks durably received (Receiving only, else 0).
        received_blocks: u64,
        /// Where the destination serves NBD over TCP (a source forwards there).
        nbd_tcp: Option<String>,
    },
    /// Instead of Open: to the agent holding a disk's guest connection, from the agent
    /// that just switched the disk over to another: forward there now.
    Repoint(Repoint),
    /// The answer to Repoint; the connection ends after it.
    RepointOk {
        /// The Repoint's job.
        job_id: u64,
        /// What the holder did.
        outcome: RepointOutcome,
    },
    /// Sync, then record an in-sync point of a seeded job at `at_unix_ms`: the target
    /// equals the source as it was when its writes were held for this point.
    Mark {
        /// Echoed in the answer.
        seq: u64,
        /// The source's time of the point (Unix ms).
        at_unix_ms: u64,
    },
    /// The in-sync point is durable at the destination.
    MarkOk {
        /// The Mark's seq.
        seq: u64,
    },
    /// Drop the target (source side), or the acknowledgment of that (destination side).
    Abort,
    /// The sender of this frame stops; the connection closes after it.
    Error {
        /// Category.
        code: ErrorCode,
        /// Offset concerned (Digest), else 0.
        offset_bytes: u64,
        /// Human-readable reason (≤ 1024 bytes).
        message: String,
    },
}

/// Frame kind numbers on the wire.
mod kind {
    pub const HELLO: u8 = 1;
    pub const PROOF: u8 = 2;
    pub const OPEN: u8 = 3;
    pub const OPEN_OK: u8 = 4;
    pub const DATA: u8 = 5;
    pub const ZERO: u8 = 6;
    pub const TRIM: u8 = 7;
    pub const SYNC: u8 = 8;
    pub const SYNC_OK: u8 = 9;
    pub const COMMIT: u8 = 10;
    pub const COMMIT_OK: u8 = 11;
    pub const ABORT: u8 = 12;
    pub const ERROR: u8 = 13;
    pub const VERIFY: u8 = 14;
    pub const VERIFY_OK: u8 = 15;
    pub const FENCE: u8 = 16;
    pub const FENCE_OK: u8 = 17;
    pub const QUERY: u8 = 18;
    pub const QUERY_OK: u8 = 19;
    pub const DIGESTS: u8 = 20;
    pub const DIGESTS_OK: u8 = 21;
    pub const REPOINT: u8 = 22;
    pub const REPOINT_OK: u8 = 23;
    pub const MARK: u8 = 24;
    /// The last kind: [`super::decode_header`] accepts `HELLO..=MARK_OK`.
    pub const MARK_OK: u8 = 25;
}

/// Why bytes are not a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// Fewer bytes than the header or its lengths announce.
    #[error("frame truncated")]
    Truncated,
    /// The first four bytes are not [`MAGIC`].
    #[error("bad frame magic")]
    BadMagic,
    /// A version this code does not speak.
    #[error("unsupported frame version {0}")]
    BadVersion(u8),
    /// The header checksum does not match.
    #[error("frame header checksum mismatch")]
    HeaderChecksum,
    /// The meta checksum does not match.
    #[error("frame meta checksum mismatch")]
    MetaChecksum,
    /// A kind number this code does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A length beyond its bound.
    #[error("frame {0} too long")]
    TooLong(&'static str),
    /// A field with an invalid value.
    #[error("bad frame field: {0}")]
    BadField(&'static str),
    /// A sealed record did not authenticate: altered, replayed, reordered, one before it
    /// dropped, or sealed with another key.
    #[error("frame failed authentication (altered, replayed, reordered or dropped)")]
    Forged,
}

/// A decoded, checksum-verified header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame kind number.
    pub kind: u8,
    /// Bytes of meta following the header.
    pub meta_len: u32,
    /// Payload bytes following the meta (Data only).
    pub data_len: u32,
    /// crc32c of the meta.
    pub meta_crc: u32,
}

#[cfg(test)]
mod tests;
