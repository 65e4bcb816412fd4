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
//! - Decoding never panics, whatever the input (fuzz test below).
//! - Encoders append to a caller-owned `Vec<u8>`; a Data frame's payload is not copied: the
//!   caller writes it after the encoded header and meta.

use thiserror::Error;

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

/// Decodes and verifies a header: checksum first (a corrupt header is never misread), then
/// magic, version, kind and bounds.
pub fn decode_header(bytes: &[u8; HEADER_BYTES]) -> Result<FrameHeader, FrameError> {
    if crc32c::crc32c(&bytes[..20]) != be_u32(&bytes[20..24]) {
        // A wrong magic with a matching checksum is someone else's protocol; report that.
        return Err(if be_u32(&bytes[0..4]) != MAGIC {
            FrameError::BadMagic
        } else {
            FrameError::HeaderChecksum
        });
    }
    if be_u32(&bytes[0..4]) != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(FrameError::BadVersion(bytes[4]));
    }
    let header = FrameHeader {
        kind: bytes[5],
        meta_len: be_u32(&bytes[8..12]),
        data_len: be_u32(&bytes[12..16]),
        meta_crc: be_u32(&bytes[16..20]),
    };
    if !(kind::HELLO..=kind::MARK_OK).contains(&header.kind) {
        return Err(FrameError::UnknownKind(header.kind));
    }
    if be_u16(&bytes[6..8]) != 0 {
        return Err(FrameError::BadField("flags"));
    }
    if header.meta_len as usize > MAX_META_BYTES {
        return Err(FrameError::TooLong("meta"));
    }
    if header.data_len as usize > MAX_DATA_BYTES {
        return Err(FrameError::TooLong("payload"));
    }
    if (header.kind == kind::DATA) != (header.data_len > 0) {
        return Err(FrameError::BadField("payload length"));
    }
    Ok(header)
}

/// Decodes the meta section of a frame whose header was accepted by [`decode_header`].
pub fn decode_meta(header: &FrameHeader, meta: &[u8]) -> Result<Frame, FrameError> {
    if meta.len() != header.meta_len as usize {
        return Err(FrameError::Truncated);
    }
    if crc32c::crc32c(meta) != header.meta_crc {
        return Err(FrameError::MetaChecksum);
    }
    let mut fields = codec::Reader::new(meta);
    let frame = match header.kind {
        kind::HELLO => {
            let role = Role::from_wire(fields.u8()?).ok_or(FrameError::BadField("role"))?;
            let insecure = match fields.u8()? {
                0 => false,
                1 => true,
                _ => return Err(FrameError::BadField("stream mode")),
            };
            Frame::Hello {
                nonce: fields.array()?,
                public: fields.array()?,
                role,
                insecure,
            }
        }
        kind::PROOF => Frame::Proof {
            mac: fields.array()?,
        },
        kind::OPEN => Frame::Open(decode_spec(&mut fields)?),
        kind::OPEN_OK => Frame::OpenOk {
            nbd_tcp: optional_string(&mut fields, "nbd_tcp flag")?,
            // Older destinations end the OpenOk here.
            changed_outside: match fields.is_empty() {
                true => false,
                false => flag(fields.u8()?, "changed_outside")?,
            },
        },
        kind::MARK => Frame::Mark {
            seq: fields.u64_be()?,
            at_unix_ms: fields.u64_be()?,
        },
        kind::MARK_OK => Frame::MarkOk {
            seq: fields.u64_be()?,
        },
        kind::DATA => Frame::Data {
            offset_bytes: range(fields.u64_be()?, u64::from(header.data_len))?,
            len_bytes: header.data_len,
            digest: fields.array()?,
        },
        kind::ZERO | kind::TRIM => {
            let offset_bytes = fields.u64_be()?;
            let len_bytes = fields.u64_be()?;
            if len_bytes == 0 {
                return Err(FrameError::BadField("zero length"));
            }
            range(offset_bytes, len_bytes)?;
            if header.kind == kind::ZERO {
                Frame::Zero {
                    offset_bytes,
                    len_bytes,
                }
            } else {
                Frame::Trim {
                    offset_bytes,
                    len_bytes,
                }
            }
        }
        kind::COMMIT => Frame::Commit {
            seq: fields.u64_be()?,
            // Older sources, and jobs without a manager epoch, end the Commit here.
            manager_epoch: optional_epoch(&mut fields)?,
        },
        kind::SYNC | kind::COMMIT_OK | kind::VERIFY | kind::FENCE | kind::FENCE_OK => {
            let seq = fields.u64_be()?;
            match header.kind {
                kind::SYNC => Frame::Sync { seq },
                kind::VERIFY => Frame::Verify { seq },
                kind::FENCE => Frame::Fence { seq },
                kind::FENCE_OK => Frame::FenceOk { seq },
                _ => Frame::CommitOk { seq },
            }
        }
        kind::SYNC_OK => Frame::SyncOk {
            seq: fields.u64_be()?,
            received_blocks: fields.u64_be()?,
        },
        kind::VERIFY_OK => Frame::VerifyOk {
            seq: fields.u64_be()?,
            digest: fields.array()?,
        },
        kind::ABORT => Frame::Abort,
        kind::DIGESTS => {
            let seq = fields.u64_be()?;
            let offset_bytes = fields.u64_be()?;
            let block_bytes = fields.u32_be()?;
            let count = fields.u32_be()?;
            if block_bytes == 0 || count == 0 || count > MAX_DIGESTS {
                return Err(FrameError::BadField("digest range"));
            }
            Frame::Digests {
                seq,
                offset_bytes,
                block_bytes,
                count,
            }
        }
        kind::DIGESTS_OK => {
            let seq = fields.u64_be()?;
            let count = fields.u32_be()?;
            if count > MAX_DIGESTS {
                return Err(FrameError::BadField("digest count"));
            }
            let digests = (0..count)
                .map(|_| fields.array())
                .collect::<Result<Vec<_>, _>>()?;
            Frame::DigestsOk { seq, digests }
        }
        kind::QUERY => Frame::Query {
            job_id: fields.u64_be()?,
            finalize: match fields.u8()? {
                0 => false,
                1 => true,
                _ => return Err(FrameError::BadField("finalize")),
            },
        },
        kind::QUERY_OK => Frame::QueryOk {
            job_id: fields.u64_be()?,
            state: TargetState::from_wire(fields.u8()?).ok_or(FrameError::BadField("state"))?,
            received_blocks: fields.u64_be()?,
            nbd_tcp: optional_string(&mut fields, "nbd_tcp flag")?,
        },
        kind::REPOINT => Frame::Repoint(Repoint {
            job_id: fields.u64_be()?,
            size_bytes: fields.u64_be()?,
            moves: fields.u32_be()?,
            export: read_string(&mut fields, MAX_EXPORT_BYTES)?,
            nbd_tcp: read_string(&mut fields, MAX_MESSAGE_BYTES)?,
        }),
        kind::REPOINT_OK => Frame::RepointOk {
            job_id: fields.u64_be()?,
            outcome: RepointOutcome::from_wire(fields.u8()?)
                .ok_or(FrameError::BadField("outcome"))?,
        },
        kind::ERROR => Frame::Error {
            code: ErrorCode::from_wire(fields.u16_be()?).ok_or(FrameError::BadField("code"))?,
            offset_bytes: fields.u64_be()?,
            message: read_string(&mut fields, MAX_MESSAGE_BYTES)?,
        },
        other => return Err(FrameError::UnknownKind(other)),
    };
    if !fields.is_empty() {
        return Err(FrameError::BadField("trailing meta bytes"));
    }
    Ok(frame)
}

/// Decodes one whole frame from the start of `bytes`: the frame and the bytes it used
/// (header + meta + payload). For Data the payload is `bytes[used - len_bytes..used]`.
pub fn decode(bytes: &[u8]) -> Result<(Frame, usize), FrameError> {
    let head: &[u8; HEADER_BYTES] = bytes
        .get(..HEADER_BYTES)
        .and_then(|head| head.try_into().ok())
        .ok_or(FrameError::Truncated)?;
    let header = decode_header(head)?;
    let meta_end = HEADER_BYTES + header.meta_len as usize;
    let meta = bytes
        .get(HEADER_BYTES..meta_end)
        .ok_or(FrameError::Truncated)?;
    let frame = decode_meta(&header, meta)?;
    let used = meta_end + header.data_len as usize;
    if bytes.len() < used {
        return Err(FrameError::Truncated);
    }
    Ok((frame, used))
}

/// Appends the header and meta of `frame` to `out`. A Data frame's payload is not included:
/// the caller writes its `len_bytes` right after.
///
/// Panics when the frame breaks a bound (a caller bug: names and messages are validated
/// where they enter, and the sender never builds a payload beyond [`MAX_DATA_BYTES`]).
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + HEADER_BYTES, 0);
    let (kind, data_len) = encode_meta(frame, out);
    let meta_len = out.len() - start - HEADER_BYTES;
    assert!(meta_len <= MAX_META_BYTES, "frame meta of {meta_len} bytes");
    assert!(data_len as usize <= MAX_DATA_BYTES, "payload of {data_len}");
    let meta_crc = crc32c::crc32c(&out[start + HEADER_BYTES..]);
    let head = &mut out[start..start + HEADER_BYTES];
    head[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    head[4] = VERSION;
    head[5] = kind;
    head[6..8].copy_from_slice(&0u16.to_be_bytes());
    let meta_len = u32::try_from(meta_len).expect("bounded above");
    head[8..12].copy_from_slice(&meta_len.to_be_bytes());
    head[12..16].copy_from_slice(&data_len.to_be_bytes());
    head[16..20].copy_from_slice(&meta_crc.to_be_bytes());
    let header_crc = crc32c::crc32c(&head[..20]);
    head[20..24].copy_from_slice(&header_crc.to_be_bytes());
    // Pair assertion: what we write is what decode accepts.
    debug_assert!(
        decode_header(&<[u8; HEADER_BYTES]>::try_from(&*head).expect("24 bytes")).is_ok()
    );
}

/// `frame` encoded under the header of protocol `version` (an older one): how a peer of that
/// version is told, in words it can read, why it is refused. Only for frames whose meta is
/// the same in that version (Error is, in every version so far).
pub fn encode_for_version(frame: &Frame, version: u8, out: &mut Vec<u8>) {
    let start = out.len();
    encode(frame, out);
    let head = &mut out[start..start + HEADER_BYTES];
    head[4] = version;
    let header_crc = crc32c::crc32c(&head[..20]);
    head[20..24].copy_from_slice(&header_crc.to_be_bytes());
}

/// Appends the meta of `frame`; returns its kind number and payload length.
fn encode_meta(frame: &Frame, out: &mut Vec<u8>) -> (u8, u32) {
    match frame {
        Frame::Hello {
            nonce,
            role,
            insecure,
            public,
        } => {
            out.push(role.to_wire());
            out.push(u8::from(*insecure));
            out.extend_from_slice(nonce);
            out.extend_from_slice(public);
            (kind::HELLO, 0)
        }
        Frame::Proof { mac } => {
            out.extend_from_slice(mac);
            (kind::PROOF, 0)
        }
        Frame::Open(spec) => {
            out.extend_from_slice(&spec.job_id.to_be_bytes());
            out.extend_from_slice(&spec.size_bytes.to_be_bytes());
            out.extend_from_slice(&spec.granularity_bytes.to_be_bytes());
            put_string(out, &spec.export, MAX_EXPORT_BYTES);
            out.push(u8::from(spec.batch.is_some()));
            if let Some(batch) = &spec.batch {
                put_string(out, batch, MAX_EXPORT_BYTES);
            }
            if let Some(holder) = &spec.holder {
                out.push(1);
                put_string(out, &holder.addr, MAX_MESSAGE_BYTES);
                out.extend_from_slice(&holder.job_id.to_be_bytes());
                out.extend_from_slice(&holder.moves.to_be_bytes());
            } else if spec.seed.is_some() || spec.manager_epoch.is_some() {
                out.push(0);
            }
            if let Some(seed) = &spec.seed {
                out.push(1);
                out.extend_from_slice(seed);
            } else if spec.manager_epoch.is_some() {
                out.push(0);
            }
            put_optional_epoch(out, spec.manager_epoch);
            (kind::OPEN, 0)
        }
        Frame::OpenOk {
            nbd_tcp,
            changed_outside,
        } => {
            put_optional_string(out, nbd_tcp.as_deref());
            if *changed_outside {
                out.push(1);
            }
            (kind::OPEN_OK, 0)
        }
        Frame::Data {
            offset_bytes,
            len_bytes,
            digest,
        } => {
            assert!(*len_bytes > 0, "empty Data frame");
            out.extend_from_slice(&offset_bytes.to_be_bytes());
            out.extend_from_slice(digest);
            (kind::DATA, *len_bytes)
        }
        Frame::Zero {
            offset_bytes,
            len_bytes,
        }
        | Frame::Trim {
            offset_bytes,
            len_bytes,
        } => {
            out.extend_from_slice(&offset_bytes.to_be_bytes());
            out.extend_from_slice(&len_bytes.to_be_bytes());
            let kind = if matches!(frame, Frame::Zero { .. }) {
                kind::ZERO
            } else {
                kind::TRIM
            };
            (kind, 0)
        }
        Frame::Commit { seq, manager_epoch } => {
            out.extend_from_slice(&seq.to_be_bytes());
            put_optional_epoch(out, *manager_epoch);
            (kind::COMMIT, 0)
        }
        Frame::Sync { seq }
        | Frame::CommitOk { seq }
        | Frame::Verify { seq }
        | Frame::Fence { seq }
        | Frame::FenceOk { seq } => {
            out.extend_from_slice(&seq.to_be_bytes());
            let kind = match frame {
                Frame::Sync { .. } => kind::SYNC,
                Frame::Verify { .. } => kind::VERIFY,
                Frame::Fence { .. } => kind::FENCE,
                Frame::FenceOk { .. } => kind::FENCE_OK,
                _ => kind::COMMIT_OK,
            };
            (kind, 0)
        }
        Frame::VerifyOk { seq, digest } => {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(digest);
            (kind::VERIFY_OK, 0)
        }
        Frame::SyncOk {
            seq,
            received_blocks,
        } => {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&received_blocks.to_be_bytes());
            (kind::SYNC_OK, 0)
        }
        Frame::Abort => (kind::ABORT, 0),
        Frame::Digests {
            seq,
            offset_bytes,
            block_bytes,
            count,
        } => {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&offset_bytes.to_be_bytes());
            out.extend_from_slice(&block_bytes.to_be_bytes());
            out.extend_from_slice(&count.to_be_bytes());
            (kind::DIGESTS, 0)
        }
        Frame::DigestsOk { seq, digests } => {
            assert!(
                digests.len() <= MAX_DIGESTS as usize,
                "{} digests",
                digests.len()
            );
            out.extend_from_slice(&seq.to_be_bytes());
            let count = u32::try_from(digests.len()).expect("bounded above");
            out.extend_from_slice(&count.to_be_bytes());
            for digest in digests {
                out.extend_from_slice(digest);
            }
            (kind::DIGESTS_OK, 0)
        }
        Frame::Query { job_id, finalize } => {
            out.extend_from_slice(&job_id.to_be_bytes());
            out.push(u8::from(*finalize));
            (kind::QUERY, 0)
        }
        Frame::QueryOk {
            job_id,
            state,
            received_blocks,
            nbd_tcp,
        } => {
            out.extend_from_slice(&job_id.to_be_bytes());
            out.push(state.to_wire());
            out.extend_from_slice(&received_blocks.to_be_bytes());
            put_optional_string(out, nbd_tcp.as_deref());
            (kind::QUERY_OK, 0)
        }
        Frame::Repoint(repoint) => {
            out.extend_from_slice(&repoint.job_id.to_be_bytes());
            out.extend_from_slice(&repoint.size_bytes.to_be_bytes());
            out.extend_from_slice(&repoint.moves.to_be_bytes());
            put_string(out, &repoint.export, MAX_EXPORT_BYTES);
            put_string(out, &repoint.nbd_tcp, MAX_MESSAGE_BYTES);
            (kind::REPOINT, 0)
        }
        Frame::Mark { seq, at_unix_ms } => {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&at_unix_ms.to_be_bytes());
            (kind::MARK, 0)
        }
        Frame::MarkOk { seq } => {
            out.extend_from_slice(&seq.to_be_bytes());
            (kind::MARK_OK, 0)
        }
        Frame::RepointOk { job_id, outcome } => {
            out.extend_from_slice(&job_id.to_be_bytes());
            out.push(outcome.to_wire());
            (kind::REPOINT_OK, 0)
        }
        Frame::Error {
            code,
            offset_bytes,
            message,
        } => {
            out.extend_from_slice(&code.to_wire().to_be_bytes());
            out.extend_from_slice(&offset_bytes.to_be_bytes());
            put_string(
                out,
                truncate_utf8(message, MAX_MESSAGE_BYTES),
                MAX_MESSAGE_BYTES,
            );
            (kind::ERROR, 0)
        }
    }
}

fn decode_spec(fields: &mut codec::Reader<'_>) -> Result<TargetSpec, FrameError> {
    let job_id = fields.u64_be()?;
    let size_bytes = fields.u64_be()?;
    let granularity_bytes = fields.u64_be()?;
    let export = read_string(fields, MAX_EXPORT_BYTES)?;
    if export.is_empty() {
        return Err(FrameError::BadField("empty export name"));
    }
    if !granularity_bytes.is_power_of_two()
        || !(MIN_GRANULARITY_BYTES..=MAX_GRANULARITY_BYTES).contains(&granularity_bytes)
    {
        return Err(FrameError::BadField("granularity"));
    }
    if size_bytes.div_ceil(granularity_bytes) > MAX_BLOCKS {
        return Err(FrameError::BadField("too many blocks for the granularity"));
    }
    let batch = match fields.u8()? {
        0 => None,
        1 => Some(read_string(fields, MAX_EXPORT_BYTES)?),
        _ => return Err(FrameError::BadField("batch flag")),
    };
    // Older sources end the Open here.
    let holder = if fields.is_empty() {
        None
    } else {
        match fields.u8()? {
            0 => None,
            1 => Some(Holder {
                addr: read_string(fields, MAX_MESSAGE_BYTES)?,
                job_id: fields.u64_be()?,
                moves: fields.u32_be()?,
            }),
            _ => return Err(FrameError::BadField("holder flag")),
        }
    };
    // Sources without seeds end the Open here.
    let seed = if fields.is_empty() {
        None
    } else {
        match fields.u8()? {
            0 => None,
            1 => Some(fields.array()?),
            _ => return Err(FrameError::BadField("seed flag")),
        }
    };
    // Sources of jobs without a manager epoch end the Open here.
    let manager_epoch = optional_epoch(fields)?;
    Ok(TargetSpec {
        export,
        size_bytes,
        granularity_bytes,
        job_id,
        batch,
        holder,
        seed,
        manager_epoch,
    })
}

/// A trailing manager epoch: nothing (absent), or a presence byte 1 and the epoch.
fn optional_epoch(fields: &mut codec::Reader<'_>) -> Result<Option<u64>, FrameError> {
    if fields.is_empty() {
        return Ok(None);
    }
    match fields.u8()? {
        1 => Ok(Some(fields.u64_be()?)),
        _ => Err(FrameError::BadField("manager epoch flag")),
    }
}

/// Appends a trailing manager epoch (nothing when absent).
fn put_optional_epoch(out: &mut Vec<u8>, epoch: Option<u64>) {
    if let Some(epoch) = epoch {
        out.push(1);
        out.extend_from_slice(&epoch.to_be_bytes());
    }
}

/// A boolean byte (0 or 1).
fn flag(byte: u8, what: &'static str) -> Result<bool, FrameError> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(FrameError::BadField(what)),
    }
}

/// A presence byte, then (when 1) a string of at most [`MAX_MESSAGE_BYTES`].
fn optional_string(
    fields: &mut codec::Reader<'_>,
    what: &'static str,
) -> Result<Option<String>, FrameError> {
    match fields.u8()? {
        0 => Ok(None),
        1 => Ok(Some(read_string(fields, MAX_MESSAGE_BYTES)?)),
        _ => Err(FrameError::BadField(what)),
    }
}

fn put_optional_string(out: &mut Vec<u8>, text: Option<&str>) {
    out.push(u8::from(text.is_some()));
    if let Some(text) = text {
        put_string(out, text, MAX_MESSAGE_BYTES);
    }
}

fn put_string(out: &mut Vec<u8>, text: &str, max_bytes: usize) {
    assert!(text.len() <= max_bytes, "string of {} bytes", text.len());
    let len = u16::try_from(text.len()).expect("bounded strings fit in u16");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}

/// Rejects a range whose end overflows u64; returns the offset.
fn range(offset_bytes: u64, len_bytes: u64) -> Result<u64, FrameError> {
    offset_bytes
        .checked_add(len_bytes)
        .map(|_| offset_bytes)
        .ok_or(FrameError::BadField("range overflows"))
}

fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().expect("4 bytes"))
}

fn be_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes(bytes.try_into().expect("2 bytes"))
}

/// A u16 length, then that many bytes of UTF-8 (at most `max_bytes`).
fn read_string(reader: &mut codec::Reader<'_>, max_bytes: usize) -> Result<String, FrameError> {
    let len = usize::from(reader.u16_be()?);
    if len > max_bytes {
        return Err(FrameError::TooLong("string"));
    }
    let bytes = reader.bytes(len)?;
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| FrameError::BadField("string is not UTF-8"))
}

/// Running out of meta bytes: the lengths announced more than the meta holds.
impl From<CodecError> for FrameError {
    fn from(_: CodecError) -> Self {
        FrameError::Truncated
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prng::SplitMix64;

    fn every_kind() -> Vec<Frame> {
        vec![
            Frame::Hello {
                nonce: [7; 32],
                role: Role::Source,
                insecure: false,
                public: [8; 32],
            },
            Frame::Hello {
                nonce: [9; 32],
                role: Role::Destination,
                insecure: true,
                public: [10; 32],
            },
            Frame::Proof { mac: [0xAB; 32] },
            Frame::Open(TargetSpec {
                export: "vm-disk-é".into(),
                size_bytes: (1 << 40) + 123,
                granularity_bytes: 65536,
                job_id: 42,
                batch: Some("evacuate-a".into()),
                holder: None,
                seed: None,
                manager_epoch: None,
            }),
            Frame::Open(TargetSpec {
                export: "vm1".into(),
                size_bytes: 1 << 30,
                granularity_bytes: 4096,
                job_id: 43,
                batch: None,
                holder: Some(Holder {
                    addr: "10.0.0.1:7451".into(),
                    job_id: 7,
                    moves: 2,
                }),
                seed: None,
                manager_epoch: None,
            }),
            Frame::Repoint(Repoint {
                job_id: 7,
                export: "vm1".into(),
                size_bytes: 1 << 30,
                nbd_tcp: "10.0.0.3:10809".into(),
                moves: 3,
            }),
            Frame::RepointOk {
                job_id: 7,
                outcome: RepointOutcome::Repointed,
            },
            Frame::RepointOk {
                job_id: 7,
                outcome: RepointOutcome::Superseded,
            },
            Frame::RepointOk {
                job_id: 7,
                outcome: RepointOutcome::NotForwarding,
            },
            Frame::OpenOk {
                nbd_tcp: None,
                changed_outside: false,
            },
            Frame::OpenOk {
                nbd_tcp: Some("10.0.0.2:10809".into()),
                changed_outside: true,
            },
            Frame::Open(TargetSpec {
                export: "seeded".into(),
                size_bytes: 1 << 30,
                granularity_bytes: 4096,
                job_id: 44,
                batch: None,
                holder: None,
                seed: Some([0x5e; 16]),
                manager_epoch: None,
            }),
            Frame::Mark {
                seq: 9,
                at_unix_ms: 1_700_000_000_000,
            },
            Frame::MarkOk { seq: 9 },
            Frame::Data {
                offset_bytes: 1 << 30,
                len_bytes: 5,
                digest: *blake3::hash(b"hello").as_bytes(),
            },
            Frame::Zero {
                offset_bytes: 4096,
                len_bytes: 1 << 33,
            },
            Frame::Trim {
                offset_bytes: 0,
                len_bytes: 512,
            },
            Frame::Sync { seq: 3 },
            Frame::Verify { seq: 5 },
            Frame::Fence { seq: 6 },
            Frame::FenceOk { seq: 6 },
            Frame::VerifyOk {
                seq: 5,
                digest: [7; 32],
            },
            Frame::SyncOk {
                seq: 3,
                received_blocks: 99,
            },
            Frame::Commit {
                seq: 4,
                manager_epoch: None,
            },
            Frame::Commit {
                seq: 4,
                manager_epoch: Some(u64::MAX),
            },
            Frame::CommitOk { seq: 4 },
            Frame::Open(TargetSpec {
                export: "managed".into(),
                size_bytes: 1 << 30,
                granularity_bytes: 4096,
                job_id: 45,
                batch: Some("b".into()),
                holder: None,
                seed: None,
                manager_epoch: Some(7),
            }),
            Frame::Open(TargetSpec {
                export: "managed-seeded".into(),
                size_bytes: 1 << 30,
                granularity_bytes: 4096,
                job_id: 46,
                batch: None,
                holder: Some(Holder {
                    addr: "10.0.0.1:7451".into(),
                    job_id: 7,
                    moves: 1,
                }),
                seed: Some([0x5e; 16]),
                manager_epoch: Some(8),
            }),
            Frame::Digests {
                seq: 8,
                offset_bytes: 1 << 20,
                block_bytes: 65536,
                count: MAX_DIGESTS,
            },
            Frame::DigestsOk {
                seq: 8,
                digests: vec![[3; 32]; MAX_DIGESTS as usize],
            },
            Frame::Query {
                job_id: 9,
                finalize: true,
            },
            Frame::QueryOk {
                job_id: 9,
                state: TargetState::Receiving,
                received_blocks: 77,
                nbd_tcp: Some("127.0.0.1:10809".into()),
            },
            Frame::Abort,
            Frame::Error {
                code: ErrorCode::Digest,
                offset_bytes: 8192,
                message: "digest mismatch at 8192".into(),
            },
        ]
    }

    fn encoded(frame: &Frame) -> Vec<u8> {
        let mut out = Vec::new();
        encode(frame, &mut out);
        if let Frame::Data { len_bytes, .. } = frame {
            out.extend(std::iter::repeat_n(0x5A, *len_bytes as usize));
        }
        out
    }

    // Goal: every kind survives encode → decode unchanged, and decode uses exactly its bytes.
    // Method: round-trip each frame, with trailing garbage after it.
    #[test]
    fn round_trip_every_kind() {
        for frame in every_kind() {
            let mut bytes = encoded(&frame);
            let len = bytes.len();
            bytes.extend_from_slice(b"next frame");
            let (decoded, used) = decode(&bytes).expect("decodes");
            assert_eq!(decoded, frame);
            assert_eq!(used, len, "{frame:?}");
        }
    }

    // Goal: a Commit from a source that predates manager epochs (its meta is the seq alone)
    // still decodes, as a job without an epoch; a bad epoch flag is refused, not guessed.
    #[test]
    fn a_commit_without_an_epoch_is_an_older_sources() {
        let mut out = Vec::new();
        encode(&Frame::Sync { seq: 4 }, &mut out);
        out[5] = kind::COMMIT;
        reseal(&mut out, 0);
        let (decoded, _) = decode(&out).expect("decodes");
        assert_eq!(
            decoded,
            Frame::Commit {
                seq: 4,
                manager_epoch: None
            }
        );
        let mut flagged = encoded(&Frame::Commit {
            seq: 4,
            manager_epoch: Some(9),
        });
        flagged[HEADER_BYTES + 8] = 2;
        reseal(&mut flagged, 0);
        assert!(decode(&flagged).is_err());
    }

    // Goal: bounds are enforced. Method: oversize export name, payload length, zero lengths,
    // bad granularity, overflowing ranges; each must be an error.
    #[test]
    fn bounds_are_enforced() {
        let mut bytes = encoded(&Frame::Open(TargetSpec {
            export: "x".repeat(MAX_EXPORT_BYTES),
            size_bytes: 1,
            granularity_bytes: 4096,
            job_id: 1,
            batch: None,
            holder: None,
            seed: None,
            manager_epoch: None,
        }));
        assert!(decode(&bytes).is_ok());
        // Rewrite the name length to 65 and fix both checksums: still refused (TooLong).
        let name_len_at = HEADER_BYTES + 24;
        bytes[name_len_at..name_len_at + 2].copy_from_slice(&65u16.to_be_bytes());
        bytes.push(b'y');
        reseal(&mut bytes, 1);
        assert_eq!(decode(&bytes), Err(FrameError::TooLong("string")));

        let mut zero = encoded(&Frame::Zero {
            offset_bytes: u64::MAX - 10,
            len_bytes: 5,
        });
        assert!(decode(&zero).is_ok());
        zero[HEADER_BYTES + 8..HEADER_BYTES + 16].copy_from_slice(&11u64.to_be_bytes());
        reseal(&mut zero, 0);
        assert_eq!(decode(&zero), Err(FrameError::BadField("range overflows")));
        zero[HEADER_BYTES + 8..HEADER_BYTES + 16].copy_from_slice(&0u64.to_be_bytes());
        reseal(&mut zero, 0);
        assert_eq!(decode(&zero), Err(FrameError::BadField("zero length")));

        let mut data = encoded(&Frame::Data {
            offset_bytes: 0,
            len_bytes: 1,
            digest: [0; 32],
        });
        data[12..16].copy_from_slice(&(MAX_DATA_BYTES as u32 + 1).to_be_bytes());
        reseal(&mut data, 0);
        assert_eq!(decode(&data), Err(FrameError::TooLong("payload")));

        let huge = encoded(&Frame::Open(TargetSpec {
            export: "huge".into(),
            size_bytes: u64::MAX,
            granularity_bytes: 4096,
            job_id: 1,
            batch: None,
            holder: None,
            seed: None,
            manager_epoch: None,
        }));
        let refused = Err(FrameError::BadField("too many blocks for the granularity"));
        assert_eq!(decode(&huge), refused);

        for granularity_bytes in [1 << 62, MAX_GRANULARITY_BYTES * 2, 2048] {
            let absurd = encoded(&Frame::Open(TargetSpec {
                export: "absurd".into(),
                size_bytes: 1 << 20,
                granularity_bytes,
                job_id: 1,
                batch: None,
                holder: None,
                seed: None,
                manager_epoch: None,
            }));
            assert_eq!(decode(&absurd), Err(FrameError::BadField("granularity")));
        }
    }

    /// Recomputes the meta and header checksums after a test edited the meta, whose length
    /// grew by `meta_growth` bytes.
    fn reseal(bytes: &mut [u8], meta_growth: u32) {
        let meta_len = be_u32(&bytes[8..12]) + meta_growth;
        bytes[8..12].copy_from_slice(&meta_len.to_be_bytes());
        let meta = &bytes[HEADER_BYTES..HEADER_BYTES + meta_len as usize];
        let meta_crc = crc32c::crc32c(meta);
        bytes[16..20].copy_from_slice(&meta_crc.to_be_bytes());
        let header_crc = crc32c::crc32c(&bytes[..20]);
        bytes[20..24].copy_from_slice(&header_crc.to_be_bytes());
    }

    // Goal: a corrupt frame is an error, never a different frame, and nothing panics.
    // Method: 200k inputs: PRNG noise (with and without a valid magic), truncations of every
    // valid frame at every length, and every single-bit flip of every valid frame's header
    // and meta.
    #[test]
    fn fuzz_decode_never_misreads() {
        let mut rng = SplitMix64::new(0x00f0_0dca_fe00_0042);
        for _ in 0..200_000 {
            let len = rng.below(96) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            if len >= 4 && rng.below(2) == 0 {
                bytes[..4].copy_from_slice(&MAGIC.to_be_bytes());
            }
            // Random bytes pass both crc32c checks with negligible probability; if they do,
            // the result must still be a well-formed frame (decode is total, never panics).
            let _ = decode(&bytes);
        }
        for frame in every_kind() {
            let bytes = encoded(&frame);
            for cut in 0..bytes.len() {
                assert_eq!(
                    decode(&bytes[..cut]),
                    Err(FrameError::Truncated),
                    "{frame:?}"
                );
            }
            let checked = bytes.len() - payload_len(&frame);
            for bit in 0..checked * 8 {
                let mut flipped = bytes.clone();
                flipped[bit / 8] ^= 1 << (bit % 8);
                assert!(decode(&flipped).is_err(), "{frame:?} bit {bit} misread");
            }
        }
    }

    fn payload_len(frame: &Frame) -> usize {
        match frame {
            Frame::Data { len_bytes, .. } => *len_bytes as usize,
            _ => 0,
        }
    }

    // Goal: a header is rejected for the right reason. Method: wrong magic, version, kind.
    #[test]
    fn header_errors_are_specific() {
        let good = encoded(&Frame::Abort);
        let mut magic = good.clone();
        magic[0] = b'X';
        reseal(&mut magic, 0);
        assert_eq!(decode(&magic), Err(FrameError::BadMagic));
        let mut version = good.clone();
        version[4] = 9;
        reseal(&mut version, 0);
        assert_eq!(decode(&version), Err(FrameError::BadVersion(9)));
        let mut unknown = good;
        unknown[5] = 200;
        reseal(&mut unknown, 0);
        assert_eq!(decode(&unknown), Err(FrameError::UnknownKind(200)));
    }
}
