//! Pure parse and encode of the NBD transmission phase, plus the protocol constants the
//! handshake shares (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>).
//!
//! Nothing here does I/O, so every function is tested and fuzzed on byte slices.
//!
//! ```text
//!  client ── 28-byte request ──► parse_request ─► RequestHeader (syntax: magic only)
//!                                                     │
//!                                validate(export) ────┘─► Command | NbdErrno (semantics)
//!  client ◄── encode_* (simple reply, or structured chunks when negotiated) ── session
//! ```
//!
//! Invariants:
//! - All integers on the wire are big-endian; flag and type values are exactly the spec's.
//! - `validate` is the only gate between the network and the disk: a request it accepts
//!   lies inside the export, is non-empty, respects the advertised block sizes and carries
//!   only flags that apply to its command, so the session never checks these again.
//! - Encoders append to a caller-owned `Vec<u8>` and never allocate when it has capacity.
//!   Read data is never copied: the OFFSET_DATA header is encoded alone and the caller
//!   writes the data right after it.

use thiserror::Error;

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes of the greeting, and the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every fixed-newstyle option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Largest request ferry accepts (NBD_INFO_BLOCK_SIZE maximum).
pub const BLOCK_MAX_BYTES: u32 = 32 * 1024 * 1024;
/// Preferred request alignment advertised to clients.
pub const BLOCK_PREFERRED_BYTES: u32 = 4096;

/// `NBD_REQUEST_MAGIC`: first 4 bytes of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// `NBD_SIMPLE_REPLY_MAGIC`.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// `NBD_STRUCTURED_REPLY_MAGIC`.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Longest string (export name, query, message) the spec allows, in bytes.
pub const MAX_STRING_BYTES: usize = 4096;
/// Size of a transmission request header (without WRITE data).
pub const REQUEST_BYTES: usize = 28;
/// Size of a simple reply (without READ data).
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Size of a structured reply chunk header (without payload).
pub const CHUNK_HEADER_BYTES: usize = 20;
/// Size of an OFFSET_DATA chunk up to its data: chunk header plus the 8-byte offset.
pub const OFFSET_DATA_HEADER_BYTES: usize = CHUNK_HEADER_BYTES + 8;

/// Handshake flag `NBD_FLAG_FIXED_NEWSTYLE`.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag `NBD_FLAG_NO_ZEROES`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag `NBD_FLAG_C_FIXED_NEWSTYLE`.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag `NBD_FLAG_C_NO_ZEROES`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flag `NBD_FLAG_HAS_FLAGS` (always set).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
/// Transmission flag `NBD_FLAG_READ_ONLY`.
pub const FLAG_READ_ONLY: u16 = 1 << 1;
/// Transmission flag `NBD_FLAG_SEND_FLUSH`.
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
/// Transmission flag `NBD_FLAG_SEND_FUA`.
pub const FLAG_SEND_FUA: u16 = 1 << 3;
/// Transmission flag `NBD_FLAG_ROTATIONAL` (never set by ferry).
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
/// Transmission flag `NBD_FLAG_SEND_TRIM`.
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
/// Transmission flag `NBD_FLAG_SEND_WRITE_ZEROES`.
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// Transmission flag `NBD_FLAG_SEND_DF`.
pub const FLAG_SEND_DF: u16 = 1 << 7;
/// Transmission flag `NBD_FLAG_CAN_MULTI_CONN`.
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// Transmission flag `NBD_FLAG_SEND_FAST_ZERO`.
pub const FLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Option `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// Option `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// Option `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// Option `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// Option `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// Option `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// Option `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// Option `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// Option `NBD_OPT_EXTENDED_HEADERS` (not supported: answered with `REP_ERR_UNSUP`).
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// Option reply `NBD_REP_SERVER`.
pub const REP_SERVER: u32 = 2;
/// Option reply `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// Option reply `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
/// Option reply `NBD_REP_ERR_UNSUP`.
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
/// Option reply `NBD_REP_ERR_POLICY`.
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
/// Option reply `NBD_REP_ERR_INVALID`.
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// Option reply `NBD_REP_ERR_TLS_REQD`.
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
/// Option reply `NBD_REP_ERR_UNKNOWN`.
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
/// Option reply `NBD_REP_ERR_TOO_BIG`.
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

/// Information type `NBD_INFO_EXPORT`.
pub const INFO_EXPORT: u16 = 0;
/// Information type `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// Information type `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// Information type `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// Command `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// Command `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// Command `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// Command `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// Command `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// Command `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag `NBD_CMD_FLAG_FUA`.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag `NBD_CMD_FLAG_NO_HOLE`.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag `NBD_CMD_FLAG_DF`.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag `NBD_CMD_FLAG_REQ_ONE`.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag `NBD_CMD_FLAG_FAST_ZERO`.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag `NBD_REPLY_FLAG_DONE`.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type `NBD_REPLY_TYPE_NONE`.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type `NBD_REPLY_TYPE_OFFSET_DATA`.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type `NBD_REPLY_TYPE_OFFSET_HOLE`.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type `NBD_REPLY_TYPE_BLOCK_STATUS`.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type `NBD_REPLY_TYPE_ERROR`.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;

/// `base:allocation` extent flag `NBD_STATE_HOLE`: not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` extent flag `NBD_STATE_ZERO`: reads as zeroes.
pub const STATE_ZERO: u32 = 1 << 1;

/// What the server tells clients about one export, and what requests are checked against.
///
/// Block sizes follow the spec's constraints: `block_min` a power of two in 1..=65536,
/// `block_preferred` a power of two >= max(block_min, 512), `block_max` a multiple of
/// `block_min` (or `u32::MAX`). The catalog that builds this upholds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Name clients select with `NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`.
    pub name: String,
    /// Human-readable description (`NBD_INFO_DESCRIPTION`, `NBD_OPT_LIST`).
    pub description: String,
    /// Export size in bytes.
    pub size_bytes: u64,
    /// Writes, trims and zeroes are refused with `EPERM`.
    pub read_only: bool,
    /// Advertise `NBD_FLAG_CAN_MULTI_CONN`: flush on one connection covers all.
    pub multi_conn: bool,
    /// Advertise and accept `NBD_CMD_TRIM`.
    pub can_trim: bool,
    /// Advertise and accept `NBD_CMD_FLAG_FAST_ZERO`.
    pub can_fast_zero: bool,
    /// Minimum block size: offsets and lengths must be multiples of it.
    pub block_min: u32,
    /// Preferred block size (advertised only).
    pub block_preferred: u32,
    /// Longest READ or WRITE accepted, in bytes.
    pub block_max: u32,
    /// Metadata contexts clients may select, e.g. `base:allocation`, `qemu:dirty-bitmap:T`.
    pub meta_contexts: Vec<String>,
}

impl ExportInfo {
    /// Transmission flags for this export. `SEND_DF` only when structured replies were
    /// negotiated (the spec forbids it otherwise); ferry never splits a read into several
    /// content chunks, so DF is honoured for every read.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_WRITE_ZEROES;
        let optional = [
            (self.read_only, FLAG_READ_ONLY),
            (self.multi_conn, FLAG_CAN_MULTI_CONN),
            (self.can_trim, FLAG_SEND_TRIM),
            (self.can_fast_zero, FLAG_SEND_FAST_ZERO),
            (structured, FLAG_SEND_DF),
        ];
        for (enabled, flag) in optional {
            if enabled {
                flags |= flag;
            }
        }
        flags
    }
}

/// The exports a handshake may offer. "" names the default export: implementations may
/// resolve it themselves; if `lookup("")` returns None, the handshake falls back to the only
/// export of `list()` when there is exactly one.
pub trait ExportCatalog {
    /// Every export, in the order `NBD_OPT_LIST` shows them.
    fn list(&self) -> Vec<ExportInfo>;
    /// The export with this name, if any.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
}

/// Syntax errors in a transmission request: the stream cannot be trusted any more, so the
/// session closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum WireError {
    /// The first 4 bytes were not `NBD_REQUEST_MAGIC`.
    #[error("bad request magic {magic:#010x}")]
    BadRequestMagic {
        /// The magic received.
        magic: u32,
    },
    /// A reply (read by a client) did not start with `NBD_SIMPLE_REPLY_MAGIC`.
    #[error("bad reply magic {magic:#010x}")]
    BadReplyMagic {
        /// The magic received.
        magic: u32,
    },
}

/// One transmission request header, as received (not yet validated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`CMD_*`); may be unknown until `validate`.
    pub command: u16,
    /// Opaque client value, echoed in every reply (the spec's "handle").
    pub cookie: u64,
    /// Start of the range.
    pub offset_bytes: u64,
    /// Length of the range.
    pub length_bytes: u32,
}

impl RequestHeader {
    /// `NBD_CMD_FLAG_FUA`: persist before replying (meaningful on write-like commands).
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }

    /// `NBD_CMD_FLAG_NO_HOLE`: WRITE_ZEROES must allocate, not punch a hole.
    pub fn no_hole(&self) -> bool {
        self.flags & CMD_FLAG_NO_HOLE != 0
    }

    /// `NBD_CMD_FLAG_DF`: READ must be answered with at most one content chunk.
    pub fn df(&self) -> bool {
        self.flags & CMD_FLAG_DF != 0
    }

    /// `NBD_CMD_FLAG_REQ_ONE`: BLOCK_STATUS wants one extent per context.
    pub fn req_one(&self) -> bool {
        self.flags & CMD_FLAG_REQ_ONE != 0
    }

    /// `NBD_CMD_FLAG_FAST_ZERO`: WRITE_ZEROES must fail with `ENOTSUP` unless it is fast.
    pub fn fast_zero(&self) -> bool {
        self.flags & CMD_FLAG_FAST_ZERO != 0
    }

    /// Bytes of data that follow this header on the wire: `length_bytes` for `NBD_CMD_WRITE`
    /// (whether or not `validate` accepts the request, the session must consume them or
    /// close the connection), 0 for every other command.
    pub fn payload_bytes(&self) -> u32 {
        if self.command == CMD_WRITE {
            self.length_bytes
        } else {
            0
        }
    }

    /// Encodes the header as a client sends it: the one request encoder, used by
    /// `client.rs`, the forwarding engine, tests and benches.
    pub fn to_bytes(&self) -> [u8; REQUEST_BYTES] {
        let mut bytes = [0u8; REQUEST_BYTES];
        bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        bytes[4..6].copy_from_slice(&self.flags.to_be_bytes());
        bytes[6..8].copy_from_slice(&self.command.to_be_bytes());
        bytes[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        bytes[16..24].copy_from_slice(&self.offset_bytes.to_be_bytes());
        bytes[24..28].copy_from_slice(&self.length_bytes.to_be_bytes());
        // Pair assertion: what we encode is what parse_request reads back.
        debug_assert_eq!(parse_request(&bytes), Ok(*self));
        bytes
    }
}

/// Parses a 28-byte request header. Only the magic is checked here; `validate` does the
/// semantics.
pub fn parse_request(bytes: &[u8; REQUEST_BYTES]) -> Result<RequestHeader, WireError> {
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if magic != REQUEST_MAGIC {
        return Err(WireError::BadRequestMagic { magic });
    }
    let mut cookie = [0u8; 8];
    cookie.copy_from_slice(&bytes[8..16]);
    let mut offset = [0u8; 8];
    offset.copy_from_slice(&bytes[16..24]);
    Ok(RequestHeader {
        flags: u16::from_be_bytes([bytes[4], bytes[5]]),
        command: u16::from_be_bytes([bytes[6], bytes[7]]),
        cookie: u64::from_be_bytes(cookie),
        offset_bytes: u64::from_be_bytes(offset),
        length_bytes: u32::from_be_bytes([bytes[24], bytes[25], bytes[26], bytes[27]]),
    })
}

/// The commands ferry serves. `NBD_CMD_CACHE` and `NBD_CMD_RESIZE` are not advertised and
/// are rejected as unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `NBD_CMD_READ`.
    Read,
    /// `NBD_CMD_WRITE` (data follows the header).
    Write,
    /// `NBD_CMD_DISC`: no reply; finish in-flight requests, then close.
    Disc,
    /// `NBD_CMD_FLUSH`: offset and length are ignored.
    Flush,
    /// `NBD_CMD_TRIM`.
    Trim,
    /// `NBD_CMD_WRITE_ZEROES`.
    WriteZeroes,
    /// `NBD_CMD_BLOCK_STATUS`.
    BlockStatus,
}

impl Command {
    /// The command for a wire type, None if ferry does not serve it.
    pub fn from_wire(command: u16) -> Option<Self> {
        match command {
            CMD_READ => Some(Self::Read),
            CMD_WRITE => Some(Self::Write),
            CMD_DISC => Some(Self::Disc),
            CMD_FLUSH => Some(Self::Flush),
            CMD_TRIM => Some(Self::Trim),
            CMD_WRITE_ZEROES => Some(Self::WriteZeroes),
            CMD_BLOCK_STATUS => Some(Self::BlockStatus),
            _ => None,
        }
    }

    /// The wire type of this command.
    pub fn to_wire(self) -> u16 {
        match self {
            Self::Read => CMD_READ,
            Self::Write => CMD_WRITE,
            Self::Disc => CMD_DISC,
            Self::Flush => CMD_FLUSH,
            Self::Trim => CMD_TRIM,
            Self::WriteZeroes => CMD_WRITE_ZEROES,
            Self::BlockStatus => CMD_BLOCK_STATUS,
        }
    }

    /// Modifies the export's contents (refused on read-only exports).
    pub fn writes(self) -> bool {
        match self {
            Self::Write | Self::Trim | Self::WriteZeroes => true,
            Self::Read | Self::Disc | Self::Flush | Self::BlockStatus => false,
        }
    }

    /// Uses offset and length (which must then lie inside the export).
    pub fn has_range(self) -> bool {
        match self {
            Self::Read | Self::Write | Self::Trim | Self::WriteZeroes | Self::BlockStatus => true,
            Self::Disc | Self::Flush => false,
        }
    }

    /// Command flags that may be set on this command. FUA is accepted on every command
    /// because the spec says a server advertising `SEND_FUA` MUST accept it everywhere
    /// (clients are known to set it on non-writes); it only has an effect on writes.
    pub fn allowed_flags(self) -> u16 {
        match self {
            Self::Read => CMD_FLAG_FUA | CMD_FLAG_DF,
            Self::WriteZeroes => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
            Self::BlockStatus => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
            Self::Write | Self::Disc | Self::Flush | Self::Trim => CMD_FLAG_FUA,
        }
    }
}

/// The error values a reply may carry (the spec's list; the numbers are the spec's, which
/// happen to equal Linux errno values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum NbdErrno {
    /// `NBD_EPERM`: write to a read-only export.
    Perm = 1,
    /// `NBD_EIO`.
    Io = 5,
    /// `NBD_ENOMEM`.
    NoMem = 12,
    /// `NBD_EINVAL`: malformed or out-of-range request.
    Inval = 22,
    /// `NBD_ENOSPC`: write past the end, or the disk is full.
    NoSpc = 28,
    /// `NBD_EOVERFLOW`: READ too long to send unfragmented.
    Overflow = 75,
    /// `NBD_ENOTSUP`: a FAST_ZERO write-zeroes that would not be fast.
    NotSup = 95,
    /// `NBD_ESHUTDOWN`: the server is stopping.
    ShutDown = 108,
}

impl NbdErrno {
    /// The value carried in the reply's error field.
    pub fn code(self) -> u32 {
        self as u32
    }
}

/// Checks a request against the export before any I/O. The error is the NBD errno the reply
/// carries. `structured` says whether structured replies were negotiated. This function does
/// not know which metadata contexts were selected: sessions call
/// `handshake::Negotiated::validate`, which also refuses BLOCK_STATUS when none was.
///
/// Choices where the spec leaves room (all SHOULDs of the spec are followed):
/// - unknown command or flag, or a flag that does not apply to the command: `Inval`;
///   FUA is allowed on every command (see [`Command::allowed_flags`]);
/// - DF without structured replies, FAST_ZERO without `can_fast_zero`, TRIM without
///   `can_trim`, BLOCK_STATUS without structured replies: `Inval` (not advertised);
/// - WRITE, TRIM or WRITE_ZEROES on a read-only export: `Perm` (checked first);
/// - zero length on any ranged command: `Inval` (the spec leaves it unspecified);
/// - range past the end: `NoSpc` for WRITE and WRITE_ZEROES, `Inval` for READ, TRIM and
///   BLOCK_STATUS, as the spec's error section recommends;
/// - offset or length not a multiple of `block_min`: `Inval` (a length reaching exactly the
///   end of the export is accepted, so an unaligned export tail stays reachable);
/// - READ or WRITE longer than `block_max`: `Overflow` for a READ when structured replies
///   were negotiated (the reply would need fragmenting), `Inval` otherwise;
/// - FLUSH and DISC ignore offset and length.
pub fn validate(
    header: &RequestHeader,
    export: &ExportInfo,
    structured: bool,
) -> Result<Command, NbdErrno> {
    let command = Command::from_wire(header.command).ok_or(NbdErrno::Inval)?;
    if command.writes() && export.read_only {
        return Err(NbdErrno::Perm);
    }
    check_flags(command, header.flags, export, structured)?;
    let advertised = match command {
        Command::Trim => export.can_trim,
        Command::BlockStatus => structured,
        Command::Read | Command::Write | Command::WriteZeroes => true,
        Command::Disc | Command::Flush => true,
    };
    if !advertised {
        return Err(NbdErrno::Inval);
    }
    if command.has_range() {
        check_range(command, header, export, structured)?;
    }
    Ok(command)
}

/// Flag checks of `validate`.
fn check_flags(
    command: Command,
    flags: u16,
    export: &ExportInfo,
    structured: bool,
) -> Result<(), NbdErrno> {
    if flags & !command.allowed_flags() != 0 {
        return Err(NbdErrno::Inval);
    }
    if flags & CMD_FLAG_DF != 0 && !structured {
        return Err(NbdErrno::Inval);
    }
    if flags & CMD_FLAG_FAST_ZERO != 0 && !export.can_fast_zero {
        return Err(NbdErrno::Inval);
    }
    Ok(())
}

/// Range checks of `validate`, for commands with `has_range()`.
fn check_range(
    command: Command,
    header: &RequestHeader,
    export: &ExportInfo,
    structured: bool,
) -> Result<(), NbdErrno> {
    let length_bytes = u64::from(header.length_bytes);
    if length_bytes == 0 {
        return Err(NbdErrno::Inval);
    }
    let end = header.offset_bytes.checked_add(length_bytes);
    let Some(end) = end.filter(|end| *end <= export.size_bytes) else {
        return Err(match command {
            Command::Write | Command::WriteZeroes => NbdErrno::NoSpc,
            _ => NbdErrno::Inval,
        });
    };
    let block_min = u64::from(export.block_min.max(1));
    let length_aligned = length_bytes % block_min == 0 || end == export.size_bytes;
    if header.offset_bytes % block_min != 0 || !length_aligned {
        return Err(NbdErrno::Inval);
    }
    let bounded = matches!(command, Command::Read | Command::Write);
    if bounded && header.length_bytes > export.block_max {
        return Err(if command == Command::Read && structured {
            NbdErrno::Overflow
        } else {
            NbdErrno::Inval
        });
    }
    Ok(())
}

/// Appends a simple reply (16 bytes); READ data, if any, follows it (written by the caller).
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    let mut bytes = [0u8; SIMPLE_REPLY_BYTES];
    bytes[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    bytes[4..8].copy_from_slice(&error.to_be_bytes());
    bytes[8..16].copy_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&bytes);
}

/// A simple reply header, as a client reads it: READ data, if any, follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    /// NBD errno (0 = success).
    pub error: u32,
    /// The cookie of the request answered.
    pub cookie: u64,
}

/// Parses a simple reply header (the client side of [`encode_simple_reply`]).
pub fn parse_simple_reply(bytes: &[u8; SIMPLE_REPLY_BYTES]) -> Result<SimpleReply, WireError> {
    let [m0, m1, m2, m3, e0, e1, e2, e3, cookie @ ..] = *bytes;
    let magic = u32::from_be_bytes([m0, m1, m2, m3]);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(WireError::BadReplyMagic { magic });
    }
    Ok(SimpleReply {
        error: u32::from_be_bytes([e0, e1, e2, e3]),
        cookie: u64::from_be_bytes(cookie),
    })
}

/// Appends a structured reply chunk header (20 bytes); `payload_len` bytes must follow.
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    flags: u16,
    kind: u16,
    cookie: u64,
    payload_len: u32,
) {
    out.extend_from_slice(&chunk_header(flags, kind, cookie, payload_len));
}

fn chunk_header(flags: u16, kind: u16, cookie: u64, payload_len: u32) -> [u8; CHUNK_HEADER_BYTES] {
    let mut bytes = [0u8; CHUNK_HEADER_BYTES];
    bytes[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    bytes[4..6].copy_from_slice(&flags.to_be_bytes());
    bytes[6..8].copy_from_slice(&kind.to_be_bytes());
    bytes[8..16].copy_from_slice(&cookie.to_be_bytes());
    bytes[16..20].copy_from_slice(&payload_len.to_be_bytes());
    bytes
}

fn done_flag(done: bool) -> u16 {
    if done {
        REPLY_FLAG_DONE
    } else {
        0
    }
}

/// Appends an OFFSET_DATA chunk up to its data (28 bytes); the caller writes exactly
/// `data_len` bytes of data next. Panics if `data_len` is 0 or above `u32::MAX - 8`
/// (`validate` bounds reads by `block_max`, so either is a caller bug).
pub fn encode_offset_data_header(
    out: &mut Vec<u8>,
    cookie: u64,
    offset_bytes: u64,
    data_len: u32,
    done: bool,
) {
    assert!(data_len > 0, "OFFSET_DATA chunk must carry data");
    let payload_len = data_len
        .checked_add(8)
        .expect("OFFSET_DATA length fits in u32");
    let mut bytes = [0u8; OFFSET_DATA_HEADER_BYTES];
    bytes[..CHUNK_HEADER_BYTES].copy_from_slice(&chunk_header(
        done_flag(done),
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        payload_len,
    ));
    bytes[CHUNK_HEADER_BYTES..].copy_from_slice(&offset_bytes.to_be_bytes());
    out.extend_from_slice(&bytes);
}

/// Appends an OFFSET_HOLE chunk: `hole_len` bytes at `offset_bytes` read as zeroes.
/// Panics if `hole_len` is 0 (the spec requires a non-zero hole).
pub fn encode_offset_hole(
    out: &mut Vec<u8>,
    cookie: u64,
    offset_bytes: u64,
    hole_len: u32,
    done: bool,
) {
    assert!(hole_len > 0, "OFFSET_HOLE chunk must be non-empty");
    encode_chunk_header(out, done_flag(done), REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.extend_from_slice(&offset_bytes.to_be_bytes());
    out.extend_from_slice(&hole_len.to_be_bytes());
}

/// Appends an ERROR chunk with `errno` and an empty message (26 bytes).
pub fn encode_error_chunk(out: &mut Vec<u8>, cookie: u64, errno: NbdErrno, done: bool) {
    encode_chunk_header(out, done_flag(done), REPLY_TYPE_ERROR, cookie, 6);
    out.extend_from_slice(&errno.code().to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
}

/// Appends the NONE chunk that ends a structured reply (always with DONE; 20 bytes).
pub fn encode_none_chunk(out: &mut Vec<u8>, cookie: u64) {
    encode_chunk_header(out, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0);
}

/// Appends a BLOCK_STATUS chunk for one metadata context: `(length, flags)` descriptors of
/// consecutive extents. Panics if `extents` is empty or a length is 0 (the spec requires
/// at least one non-empty descriptor), or if the chunk would not fit a u32 length.
pub fn encode_block_status(
    out: &mut Vec<u8>,
    cookie: u64,
    context_id: u32,
    extents: &[(u32, u32)],
    done: bool,
) {
    assert!(
        !extents.is_empty(),
        "BLOCK_STATUS needs at least one extent"
    );
    let payload_len = extents
        .len()
        .checked_mul(8)
        .and_then(|bytes| bytes.checked_add(4))
        .and_then(|bytes| u32::try_from(bytes).ok())
        .expect("BLOCK_STATUS chunk length fits in u32");
    encode_chunk_header(
        out,
        done_flag(done),
        REPLY_TYPE_BLOCK_STATUS,
        cookie,
        payload_len,
    );
    out.extend_from_slice(&context_id.to_be_bytes());
    for &(length, flags) in extents {
        assert!(length > 0, "BLOCK_STATUS extent must be non-empty");
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prng::SplitMix64;

    const COOKIE: u64 = 0x0102_0304_0506_0708;

    fn export() -> ExportInfo {
        ExportInfo {
            name: "disk".to_string(),
            description: "test disk".to_string(),
            size_bytes: 1 << 20,
            read_only: false,
            multi_conn: true,
            can_trim: true,
            can_fast_zero: true,
            block_min: 1,
            block_preferred: 4096,
            block_max: 64 * 1024,
            meta_contexts: vec!["base:allocation".to_string()],
        }
    }

    fn request(command: u16, flags: u16, offset_bytes: u64, length_bytes: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: COOKIE,
            offset_bytes,
            length_bytes,
        }
    }

    type FlagHelper = fn(&RequestHeader) -> bool;

    #[test]
    fn parse_request_reads_spec_layout() {
        // Goal: parse_request decodes the spec's request layout. Method: hand-written bytes.
        let bytes: [u8; REQUEST_BYTES] = [
            0x25, 0x60, 0x95, 0x13, // magic
            0x00, 0x01, // flags: FUA
            0x00, 0x01, // type: WRITE
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // cookie
            0x00, 0x00, 0x00, 0x00, 0x00, 0x01, 0x00, 0x00, // offset 65536
            0x00, 0x00, 0x10, 0x00, // length 4096
        ];
        let header = parse_request(&bytes).expect("valid magic");
        assert_eq!(header, request(CMD_WRITE, CMD_FLAG_FUA, 65536, 4096));
        assert!(header.fua());
        assert_eq!(header.payload_bytes(), 4096);
        assert_eq!(header.to_bytes(), bytes);
    }

    #[test]
    fn parse_request_rejects_bad_magic() {
        // Goal: a wrong magic is a WireError naming it. Method: corrupt one magic byte.
        let mut bytes = request(CMD_READ, 0, 0, 512).to_bytes();
        bytes[0] = 0x26;
        let err = parse_request(&bytes).expect_err("bad magic");
        assert_eq!(err, WireError::BadRequestMagic { magic: 0x2660_9513 });
        assert_eq!(err.to_string(), "bad request magic 0x26609513");
    }

    #[test]
    fn simple_replies_round_trip_and_bad_magic_is_named() {
        // Goal: what the server encodes is what a client parses, and another magic (say a
        // structured reply's) is refused by name. Method: encode, parse; corrupt the magic.
        let mut out = Vec::new();
        encode_simple_reply(&mut out, 0x0102_0304_0506_0708, 28);
        let bytes: [u8; SIMPLE_REPLY_BYTES] = out.try_into().expect("16 bytes");
        let reply = parse_simple_reply(&bytes).expect("valid magic");
        assert_eq!(
            reply,
            SimpleReply {
                error: 28,
                cookie: 0x0102_0304_0506_0708
            }
        );
        let mut structured = bytes;
        structured[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let err = parse_simple_reply(&structured).expect_err("bad magic");
        assert_eq!(err.to_string(), "bad reply magic 0x668e33ef");
    }

    #[test]
    fn flag_helpers_read_each_bit() {
        // Goal: each helper reads its own bit only. Method: set one flag at a time.
        let cases: [(u16, FlagHelper); 5] = [
            (CMD_FLAG_FUA, RequestHeader::fua),
            (CMD_FLAG_NO_HOLE, RequestHeader::no_hole),
            (CMD_FLAG_DF, RequestHeader::df),
            (CMD_FLAG_REQ_ONE, RequestHeader::req_one),
            (CMD_FLAG_FAST_ZERO, RequestHeader::fast_zero),
        ];
        for (flag, helper) in cases {
            for (other, other_helper) in cases {
                let header = request(CMD_READ, flag, 0, 1);
                assert_eq!(
                    other_helper(&header),
                    other == flag,
                    "flag {flag:#x} vs {other:#x}"
                );
                assert!(helper(&header));
            }
        }
        assert_eq!(request(CMD_READ, 0, 0, 9).payload_bytes(), 0);
    }

    #[test]
    fn command_numbers_match_spec() {
        // Goal: wire numbers are the spec's and round-trip. Method: table plus from_wire/to_wire.
        let table = [
            (0, Command::Read),
            (1, Command::Write),
            (2, Command::Disc),
            (3, Command::Flush),
            (4, Command::Trim),
            (6, Command::WriteZeroes),
            (7, Command::BlockStatus),
        ];
        for (wire, command) in table {
            assert_eq!(Command::from_wire(wire), Some(command));
            assert_eq!(command.to_wire(), wire);
        }
        for unknown in [5, 8, 9, 0xffff] {
            assert_eq!(Command::from_wire(unknown), None);
        }
        let errnos = [
            (NbdErrno::Perm, 1),
            (NbdErrno::Io, 5),
            (NbdErrno::NoMem, 12),
            (NbdErrno::Inval, 22),
            (NbdErrno::NoSpc, 28),
            (NbdErrno::Overflow, 75),
            (NbdErrno::NotSup, 95),
            (NbdErrno::ShutDown, 108),
        ];
        for (errno, code) in errnos {
            assert_eq!(errno.code(), code);
        }
    }

    #[test]
    fn transmission_flags_follow_export() {
        // Goal: flags advertise exactly the export's features. Method: two opposite exports.
        let full = export();
        let expected = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_WRITE_ZEROES
            | FLAG_CAN_MULTI_CONN
            | FLAG_SEND_TRIM
            | FLAG_SEND_FAST_ZERO;
        assert_eq!(full.transmission_flags(false), expected);
        assert_eq!(full.transmission_flags(true), expected | FLAG_SEND_DF);
        assert_eq!(full.transmission_flags(true), 0x09ed);
        let bare = ExportInfo {
            read_only: true,
            multi_conn: false,
            can_trim: false,
            can_fast_zero: false,
            ..export()
        };
        assert_eq!(bare.transmission_flags(false), 0x004f);
    }

    #[test]
    fn validate_accepts_well_formed_requests() {
        // Goal: ordinary requests pass with the right Command. Method: one per command.
        let e = export();
        let cases = [
            (request(CMD_READ, 0, 0, 4096), Command::Read),
            (
                request(CMD_READ, CMD_FLAG_DF | CMD_FLAG_FUA, 4096, 65536),
                Command::Read,
            ),
            (
                request(CMD_WRITE, CMD_FLAG_FUA, (1 << 20) - 512, 512),
                Command::Write,
            ),
            (request(CMD_DISC, 0, 7, 7), Command::Disc),
            (request(CMD_FLUSH, 0, 0, 0), Command::Flush),
            (request(CMD_TRIM, CMD_FLAG_FUA, 0, 1 << 20), Command::Trim),
            (
                request(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    0,
                    1 << 20,
                ),
                Command::WriteZeroes,
            ),
            (
                request(
                    CMD_BLOCK_STATUS,
                    CMD_FLAG_REQ_ONE,
                    0,
                    u32::try_from(e.size_bytes).expect("1 MiB"),
                ),
                Command::BlockStatus,
            ),
        ];
        for (header, command) in cases {
            assert_eq!(validate(&header, &e, true), Ok(command), "{header:?}");
        }
    }

    #[test]
    fn validate_rejects_with_spec_errnos() {
        // Goal: each invalid request gets the documented errno. Method: table of cases.
        let e = export();
        let ro = ExportInfo {
            read_only: true,
            ..export()
        };
        let plain = ExportInfo {
            can_trim: false,
            can_fast_zero: false,
            block_min: 512,
            ..export()
        };
        let size = e.size_bytes;
        let cases: [(RequestHeader, &ExportInfo, bool, NbdErrno); 22] = [
            (request(5, 0, 0, 512), &e, true, NbdErrno::Inval),
            (request(99, 0, 0, 512), &e, true, NbdErrno::Inval),
            (request(CMD_WRITE, 0, 0, 512), &ro, true, NbdErrno::Perm),
            (request(CMD_TRIM, 0, 0, 512), &ro, true, NbdErrno::Perm),
            (
                request(CMD_WRITE_ZEROES, 0, 0, 512),
                &ro,
                true,
                NbdErrno::Perm,
            ),
            (request(CMD_READ, 1 << 5, 0, 512), &e, true, NbdErrno::Inval),
            (
                request(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512),
                &e,
                true,
                NbdErrno::Inval,
            ),
            (
                request(CMD_WRITE, CMD_FLAG_FAST_ZERO, 0, 512),
                &e,
                true,
                NbdErrno::Inval,
            ),
            (
                request(CMD_WRITE, CMD_FLAG_DF, 0, 512),
                &e,
                true,
                NbdErrno::Inval,
            ),
            (
                request(CMD_READ, CMD_FLAG_REQ_ONE, 0, 512),
                &e,
                true,
                NbdErrno::Inval,
            ),
            (
                request(CMD_READ, CMD_FLAG_DF, 0, 512),
                &e,
                false,
                NbdErrno::Inval,
            ),
            (
                request(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512),
                &plain,
                true,
                NbdErrno::Inval,
            ),
            (request(CMD_TRIM, 0, 0, 512), &plain, true, NbdErrno::Inval),
            (
                request(CMD_BLOCK_STATUS, 0, 0, 512),
                &e,
                false,
                NbdErrno::Inval,
            ),
            (request(CMD_READ, 0, 0, 0), &e, true, NbdErrno::Inval),
            (request(CMD_WRITE, 0, 0, 0), &e, true, NbdErrno::Inval),
            (
                request(CMD_READ, 0, size - 511, 512),
                &e,
                true,
                NbdErrno::Inval,
            ),
            (request(CMD_WRITE, 0, size, 1), &e, true, NbdErrno::NoSpc),
            (
                request(CMD_WRITE_ZEROES, 0, u64::MAX, 1),
                &e,
                true,
                NbdErrno::NoSpc,
            ),
            (
                request(CMD_READ, 0, 100, 512),
                &plain,
                true,
                NbdErrno::Inval,
            ),
            (
                request(CMD_READ, 0, 0, 65536 + 512),
                &e,
                true,
                NbdErrno::Overflow,
            ),
            (
                request(CMD_READ, 0, 0, 65536 + 512),
                &e,
                false,
                NbdErrno::Inval,
            ),
        ];
        for (header, export, structured, errno) in cases {
            assert_eq!(
                validate(&header, export, structured),
                Err(errno),
                "{header:?}"
            );
        }
        let write_too_long = request(CMD_WRITE, 0, 0, 65536 + 1);
        assert_eq!(validate(&write_too_long, &e, true), Err(NbdErrno::Inval));
        let trim_past_end = request(CMD_TRIM, 0, size, 512);
        assert_eq!(validate(&trim_past_end, &e, true), Err(NbdErrno::Inval));
    }

    #[test]
    fn validate_allows_unaligned_tail_and_long_zeroes() {
        // Goal: an unaligned export tail is reachable, and TRIM/WRITE_ZEROES are not bounded
        // by block_max. Method: 512-byte block_min over a size that is not a multiple of it.
        let e = ExportInfo {
            size_bytes: 10 * 512 + 100,
            block_min: 512,
            ..export()
        };
        assert_eq!(
            validate(&request(CMD_READ, 0, 10 * 512, 100), &e, false),
            Ok(Command::Read)
        );
        assert_eq!(
            validate(&request(CMD_READ, 0, 9 * 512, 100), &e, false),
            Err(NbdErrno::Inval)
        );
        let big = ExportInfo {
            size_bytes: 1 << 40,
            ..export()
        };
        let zeroes = request(CMD_WRITE_ZEROES, 0, 0, u32::MAX);
        assert_eq!(validate(&zeroes, &big, false), Ok(Command::WriteZeroes));
    }

    #[test]
    fn simple_reply_matches_spec_bytes() {
        // Goal: simple reply layout. Method: compare with hand-written bytes.
        let mut out = Vec::new();
        encode_simple_reply(&mut out, COOKIE, 22);
        let expected = [
            0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08,
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn chunk_encoders_match_spec_bytes() {
        // Goal: every structured chunk matches the spec layout. Method: hand-written bytes.
        let mut out = Vec::new();
        encode_chunk_header(&mut out, 0x0001, 0x8001, COOKIE, 6);
        let header = [
            0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x80, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 6,
        ];
        assert_eq!(out, header);

        out.clear();
        encode_offset_data_header(&mut out, COOKIE, 0x1000, 512, true);
        let data = [
            0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0x02,
            0x08, 0, 0, 0, 0, 0, 0, 0x10, 0x00,
        ];
        assert_eq!(out, data);

        out.clear();
        encode_offset_data_header(&mut out, COOKIE, 0, 1, false);
        assert_eq!(&out[4..6], &[0, 0]);
        assert_eq!(&out[16..20], &[0, 0, 0, 9]);

        out.clear();
        encode_offset_hole(&mut out, COOKIE, 0x200, 0x400, false);
        let hole = [
            0x66, 0x8e, 0x33, 0xef, 0x00, 0x00, 0x00, 0x02, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 12, 0,
            0, 0, 0, 0, 0, 0x02, 0x00, 0, 0, 0x04, 0x00,
        ];
        assert_eq!(out, hole);
    }

    #[test]
    fn error_and_none_chunks_match_spec_bytes() {
        // Goal: ERROR (empty message) and NONE chunk layouts. Method: hand-written bytes.
        let mut out = Vec::new();
        encode_error_chunk(&mut out, COOKIE, NbdErrno::Inval, true);
        let error = [
            0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x80, 0x01, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 6, 0,
            0, 0, 22, 0, 0,
        ];
        assert_eq!(out, error);

        out.clear();
        encode_error_chunk(&mut out, COOKIE, NbdErrno::Io, false);
        assert_eq!(&out[4..6], &[0, 0]);
        assert_eq!(&out[20..24], &[0, 0, 0, 5]);

        out.clear();
        encode_none_chunk(&mut out, COOKIE);
        let none = [
            0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x00, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0,
        ];
        assert_eq!(out, none);
    }

    #[test]
    fn block_status_matches_spec_bytes() {
        // Goal: BLOCK_STATUS chunk layout. Method: two descriptors against hand-written bytes.
        let mut out = Vec::new();
        encode_block_status(
            &mut out,
            COOKIE,
            1,
            &[(4096, 0), (8192, STATE_HOLE | STATE_ZERO)],
            true,
        );
        let expected = [
            0x66, 0x8e, 0x33, 0xef, 0x00, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 20, 0,
            0, 0, 1, // context id
            0, 0, 0x10, 0, 0, 0, 0, 0, // 4096, flags 0
            0, 0, 0x20, 0, 0, 0, 0, 3, // 8192, hole|zero
        ];
        assert_eq!(out, expected);
    }

    #[test]
    fn encoders_do_not_reallocate() {
        // Goal: encoders never allocate when the Vec has room. Method: compare the buffer
        // address and capacity after many appends into a pre-sized Vec.
        let mut out = Vec::with_capacity(4096);
        let (address, capacity) = (out.as_ptr(), out.capacity());
        for i in 0..16 {
            encode_simple_reply(&mut out, i, 0);
            encode_offset_data_header(&mut out, i, i * 512, 512, true);
            encode_error_chunk(&mut out, i, NbdErrno::Io, true);
            encode_none_chunk(&mut out, i);
            encode_block_status(&mut out, i, 1, &[(512, 0)], true);
        }
        assert_eq!(out.len(), 16 * (16 + 28 + 26 + 20 + 32));
        assert_eq!(out.as_ptr(), address);
        assert_eq!(out.capacity(), capacity);
    }

    /// A random request, biased towards valid-looking values so validate's deep paths run.
    fn random_request(rng: &mut SplitMix64, size_bytes: u64) -> [u8; REQUEST_BYTES] {
        let mut bytes = [0u8; REQUEST_BYTES];
        for chunk in bytes.chunks_mut(8) {
            let word = rng.next_u64().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
        if rng.below(4) != 0 {
            bytes[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        if rng.below(2) == 0 {
            let random_flags = u16::try_from(rng.below(1 << 5)).expect("5 bits");
            let flags = rng.pick(&[0, 0, CMD_FLAG_FUA, random_flags]);
            bytes[4..6].copy_from_slice(&flags.to_be_bytes());
            let command = u16::try_from(rng.below(9)).expect("small");
            bytes[6..8].copy_from_slice(&command.to_be_bytes());
            let aligned = rng.below(size_bytes / 4096 + 1) * 4096;
            let unaligned = rng.below(size_bytes + 2);
            let offset = rng.pick(&[aligned, aligned, unaligned]);
            bytes[16..24].copy_from_slice(&offset.to_be_bytes());
            let length = rng.pick(&[0u32, 1, 511, 512, 4096, 65536, 65537, u32::MAX]);
            bytes[24..28].copy_from_slice(&length.to_be_bytes());
        }
        bytes
    }

    #[test]
    fn fuzz_parse_and_validate_never_panic() {
        // Goal: no byte pattern panics parse_request/validate, and every accepted request is
        // safe to execute. Method: 20k SplitMix64 requests against random exports, checking
        // the postconditions of acceptance.
        let mut rng = SplitMix64::new(0x5eed_0ff3_775e_ed00);
        let mut accepted = 0u32;
        for _ in 0..20_000 {
            let export = ExportInfo {
                size_bytes: rng.pick(&[0, 512, 1 << 20, (1 << 20) + 100, u64::MAX]),
                read_only: rng.below(2) == 0,
                can_trim: rng.below(2) == 0,
                can_fast_zero: rng.below(2) == 0,
                block_min: rng.pick(&[0, 1, 512, 4096]),
                block_max: rng.pick(&[512, 65536, u32::MAX]),
                ..export()
            };
            let structured = rng.below(2) == 0;
            let bytes = random_request(&mut rng, export.size_bytes.min(1 << 30));
            let Ok(header) = parse_request(&bytes) else {
                assert_ne!(&bytes[0..4], &REQUEST_MAGIC.to_be_bytes());
                continue;
            };
            assert_eq!(header.to_bytes(), bytes);
            let Ok(command) = validate(&header, &export, structured) else {
                continue;
            };
            accepted += 1;
            assert_eq!(command.to_wire(), header.command);
            assert_eq!(header.flags & !command.allowed_flags(), 0);
            assert!(!(command.writes() && export.read_only));
            if command.has_range() {
                let end = header.offset_bytes + u64::from(header.length_bytes);
                assert!(header.length_bytes > 0);
                assert!(end <= export.size_bytes);
                assert_eq!(header.offset_bytes % u64::from(export.block_min.max(1)), 0);
            }
            if matches!(command, Command::Read | Command::Write) {
                assert!(header.length_bytes <= export.block_max);
            }
        }
        // The bias in random_request must keep the deep checks exercised.
        assert!(accepted > 1000, "only {accepted} requests accepted");
    }
}
