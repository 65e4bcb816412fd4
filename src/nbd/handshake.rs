//! Server side of the NBD fixed-newstyle handshake, over any `Read + Write` stream
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>, "Fixed newstyle
//! negotiation" and "Option types").
//!
//! ```text
//! S: NBDMAGIC IHAVEOPT flags(FIXED_NEWSTYLE|NO_ZEROES)   C: client flags
//! loop { C: IHAVEOPT option length data   S: option replies }
//!   EXPORT_NAME ─► size, flags, [124 zeroes] ─► transmission     (errors: close)
//!   GO ─► INFO*, ACK ─► transmission                              (errors: reply, go on)
//!   ABORT ─► ACK ─► close                   everything else ─► reply, go on
//! ```
//!
//! Supported: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT,
//! SET_META_CONTEXT and STARTTLS; extended headers and unknown options get
//! `NBD_REP_ERR_UNSUP`.
//!
//! TLS (the spec's "TLS support", in its mandatory mode): on a listener that requires TLS the
//! caller runs [`greet`], then [`await_starttls`], which answers every option but STARTTLS
//! and ABORT with `NBD_REP_ERR_TLS_REQD` (and closes on EXPORT_NAME, which cannot be answered)
//! and sees no export at all; after STARTTLS is acknowledged the caller runs the TLS
//! handshake on the socket and [`haggle`]s over TLS, where STARTTLS again is invalid. Without
//! TLS ([`negotiate`]) STARTTLS is refused by policy.
//!
//! Metadata contexts are those of `ExportInfo::meta_contexts` (`base:allocation`,
//! `qemu:dirty-bitmap:NAME`, `ferry:heat`, `ferry:heat:NAME`, see `blockstatus.rs`).
//! LIST_META_CONTEXT with no query lists them all, and a query ending in ':' (`base:`,
//! `qemu:`, `qemu:dirty-bitmap:`, `ferry:`) lists those it prefixes; it is
//! answered even before STRUCTURED_REPLY (the spec allows it). SET_META_CONTEXT takes exact
//! names only, requires structured replies (else `NBD_REP_ERR_INVALID`), and replaces the
//! previous selection, even when it fails.
//!
//! Invariants:
//! - No input panics `negotiate`: every length is checked before it is used, option data is
//!   bounded (`MAX_OPTION_BYTES` read, up to `MAX_DISCARD_BYTES` skipped, more closes), and
//!   so is the number of options (`MAX_OPTIONS`).
//! - A client error in an option gets an error reply and negotiation goes on, as the spec
//!   requires; the connection is closed (an `Err`) only when the spec allows a hard
//!   disconnect: bad magic or flags, a failed EXPORT_NAME, absurd sizes, or I/O failure.
//! - Metadata context ids are non-zero, unique within the connection, and reach transmission
//!   only if the last SET_META_CONTEXT named the export that GO / EXPORT_NAME selected.

use std::io::{self, Read, Write};

use thiserror::Error;

use crate::codec;
use crate::nbd::wire::{
    self, Command, ExportInfo, NbdErrno, RequestHeader, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_DESCRIPTION, INFO_EXPORT,
    INFO_NAME, MAX_STRING_BYTES, NBD_MAGIC, OPTION_REPLY_MAGIC, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO,
    OPT_INFO, OPT_LIST, OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS,
    OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID, REP_ERR_POLICY, REP_ERR_TLS_REQD,
    REP_ERR_TOO_BIG, REP_ERR_UNKNOWN, REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER,
};

/// Longest option data read into memory; longer options are skipped and refused.
pub const MAX_OPTION_BYTES: u32 = 64 * 1024;
/// Longest option data skipped with `NBD_REP_ERR_TOO_BIG`; longer closes the connection.
pub const MAX_DISCARD_BYTES: u32 = 1024 * 1024;
/// Longest EXPORT_NAME data: the spec's string limit, as the u32 the option header carries.
const MAX_NAME_BYTES: u32 = MAX_STRING_BYTES as u32;
const _: () = assert!(MAX_NAME_BYTES as usize == MAX_STRING_BYTES);
/// Options accepted in one handshake before the client is deemed abusive.
pub const MAX_OPTIONS: u32 = 4096;

/// The catalog trait lives with `ExportInfo` in `wire`; it is re-exported here because the
/// handshake is its one user.
pub use crate::nbd::wire::ExportCatalog;

/// What a successful handshake agreed on: the session's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The export selected by `NBD_OPT_GO` or `NBD_OPT_EXPORT_NAME`.
    pub export: ExportInfo,
    /// Structured replies were negotiated: READ must be answered with chunks.
    pub structured_replies: bool,
    /// Selected metadata contexts, `(id, name)` in selection order; ids are non-zero and
    /// unique. Empty unless structured replies were negotiated.
    pub meta_contexts: Vec<(u32, String)>,
}

impl Negotiated {
    /// The transmission flags sent to the client.
    pub fn transmission_flags(&self) -> u16 {
        self.export.transmission_flags(self.structured_replies)
    }

    /// [`wire::validate`] for this connection, which also refuses BLOCK_STATUS with `Inval`
    /// when no metadata context was selected (as the spec recommends).
    pub fn validate(&self, header: &RequestHeader) -> Result<Command, NbdErrno> {
        let command = wire::validate(header, &self.export, self.structured_replies)?;
        if command == Command::BlockStatus && self.meta_contexts.is_empty() {
            return Err(NbdErrno::Inval);
        }
        Ok(command)
    }
}

/// Why a handshake ended without reaching transmission (the connection is then closed).
#[derive(Debug, Error)]
pub enum HandshakeError {
    /// Reading or writing the stream failed.
    #[error("handshake I/O failed")]
    Io(#[source] io::Error),
    /// The client went away (EOF, reset, broken pipe) before transmission.
    #[error("client closed the connection during the handshake")]
    ClientClosed(#[source] io::Error),
    /// The client set flags the server does not know (the spec mandates a close).
    #[error("unknown client flags {0:#x}")]
    BadClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// Option data too long to read or skip (or an over-long EXPORT_NAME).
    #[error("option {option} too big: {len_bytes} bytes")]
    OptionTooBig {
        /// The option number.
        option: u32,
        /// The announced data length.
        len_bytes: u32,
    },
    /// EXPORT_NAME carried a name that is not a valid NBD string (it cannot be answered
    /// with an error, so the spec mandates a close).
    #[error("invalid export name in EXPORT_NAME")]
    BadExportName,
    /// EXPORT_NAME named an export that does not exist (the spec mandates a close).
    #[error("unknown export {0:?}")]
    UnknownExport(String),
    /// More than `MAX_OPTIONS` options.
    #[error("too many options")]
    TooManyOptions,
    /// EXPORT_NAME before STARTTLS on a listener that requires TLS (it cannot be refused
    /// with an error reply, so the spec has the server close).
    #[error("EXPORT_NAME before STARTTLS: this listener requires TLS")]
    TlsRequired,
}

impl HandshakeError {
    /// Sorts socket errors: a client leaving is ordinary, anything else is worth a warning.
    pub fn from_io(err: io::Error) -> Self {
        use io::ErrorKind as Kind;
        match err.kind() {
            Kind::UnexpectedEof
            | Kind::ConnectionReset
            | Kind::ConnectionAborted
            | Kind::BrokenPipe => Self::ClientClosed(err),
            _ => Self::Io(err),
        }
    }

    /// True when the client simply went away (log quietly). Exhaustive on purpose.
    pub fn is_client_gone(&self) -> bool {
        match self {
            Self::ClientClosed(_) => true,
            Self::Io(_) | Self::BadClientFlags(_) | Self::BadOptionMagic(_) => false,
            Self::OptionTooBig { .. } | Self::BadExportName | Self::UnknownExport(_) => false,
            Self::TooManyOptions | Self::TlsRequired => false,
        }
    }
}

/// Runs the handshake without TLS: greeting, then options until one enters transmission.
/// Ok(None) when the client aborted (after listing or querying, typically).
pub fn negotiate<S: Read + Write>(
    stream: &mut S,
    catalog: &dyn ExportCatalog,
) -> Result<Option<Negotiated>, HandshakeError> {
    let greeting = greet(stream)?;
    haggle(stream, catalog, greeting, Tls::Unavailable)
}

/// What the greeting agreed on; it holds across STARTTLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Greeting {
    /// The client set NO_ZEROES: EXPORT_NAME's reply omits the 124 zero bytes.
    no_zeroes: bool,
}

/// Whether TLS protects the options being haggled, which decides how STARTTLS is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tls {
    /// This listener offers no TLS: STARTTLS is refused by policy.
    Unavailable,
    /// TLS is on (STARTTLS succeeded): STARTTLS again is invalid.
    Established,
}

/// Sends the server's greeting and reads the client's flags.
pub fn greet<S: Read + Write>(stream: &mut S) -> Result<Greeting, HandshakeError> {
    let mut haggle = Haggle::new(
        stream,
        &NoExports,
        Greeting { no_zeroes: false },
        Tls::Unavailable,
    );
    haggle.greet()?;
    Ok(Greeting {
        no_zeroes: haggle.no_zeroes,
    })
}

/// The options before TLS on a listener that requires it: every option but STARTTLS and
/// ABORT is refused with `NBD_REP_ERR_TLS_REQD`, and no export is visible (the catalog is
/// not even given). Ok(true): STARTTLS was acknowledged, the TLS handshake comes next on the
/// socket. Ok(false): the client aborted.
pub fn await_starttls<S: Read + Write>(
    stream: &mut S,
    greeting: Greeting,
) -> Result<bool, HandshakeError> {
    let mut haggle = Haggle::new(stream, &NoExports, greeting, Tls::Unavailable);
    let mut data = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let decided = match haggle.read_option(&mut data)? {
            Some(option) => haggle.before_tls(option, &data)?,
            None => None,
        };
        let flushed = haggle.stream.flush().map_err(HandshakeError::from_io);
        match decided {
            None => flushed?,
            Some(false) => return Ok(false),
            Some(true) => return flushed.map(|()| true),
        }
    }
    Err(HandshakeError::TooManyOptions)
}

/// The options after the greeting (and after STARTTLS when `tls` is established), until one
/// enters transmission. Ok(None) when the client aborted.
pub fn haggle<S: Read + Write>(
    stream: &mut S,
    catalog: &dyn ExportCatalog,
    greeting: Greeting,
    tls: Tls,
) -> Result<Option<Negotiated>, HandshakeError> {
    let mut haggle = Haggle::new(stream, catalog, greeting, tls);
    let mut data = Vec::new();
    for _ in 0..MAX_OPTIONS {
        let step = haggle.option(&mut data)?;
        let flushed = haggle.stream.flush().map_err(HandshakeError::from_io);
        match step {
            Step::Continue => flushed?,
            // The client may close without reading the ack: nothing left to report.
            Step::Abort => return Ok(None),
            Step::Transmit(negotiated) => return flushed.map(|()| Some(negotiated)),
        }
    }
    Err(HandshakeError::TooManyOptions)
}

/// What the handshake does after one option.
enum Step {
    Continue,
    Abort,
    Transmit(Negotiated),
}

/// The contexts selected by the last SET_META_CONTEXT, and the export it named.
struct Selection {
    export_name: String,
    contexts: Vec<(u32, String)>,
}

/// The catalog before TLS: nothing to list or open.
struct NoExports;

impl ExportCatalog for NoExports {
    fn list(&self) -> Vec<ExportInfo> {
        Vec::new()
    }
    fn lookup(&self, _name: &str) -> Option<ExportInfo> {
        None
    }
}

/// State of one handshake.
struct Haggle<'a, S> {
    stream: &'a mut S,
    catalog: &'a dyn ExportCatalog,
    tls: Tls,
    no_zeroes: bool,
    structured: bool,
    selection: Option<Selection>,
    next_context_id: u32,
    reply: Vec<u8>,
}

impl<'a, S: Read + Write> Haggle<'a, S> {
    fn new(
        stream: &'a mut S,
        catalog: &'a dyn ExportCatalog,
        greeting: Greeting,
        tls: Tls,
    ) -> Self {
        Haggle {
            stream,
            catalog,
            tls,
            no_zeroes: greeting.no_zeroes,
            structured: false,
            selection: None,
            next_context_id: 1,
            reply: Vec::with_capacity(256),
        }
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), HandshakeError> {
        self.stream.read_exact(buf).map_err(HandshakeError::from_io)
    }

    fn write_all(&mut self, bytes: &[u8]) -> Result<(), HandshakeError> {
        self.stream
            .write_all(bytes)
            .map_err(HandshakeError::from_io)
    }

    fn greet(&mut self) -> Result<(), HandshakeError> {
        let mut greeting = [0u8; 18];
        greeting[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
        greeting[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        greeting[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.write_all(&greeting)?;
        self.stream.flush().map_err(HandshakeError::from_io)?;
        let mut flags = [0u8; 4];
        self.read_exact(&mut flags)?;
        let flags = u32::from_be_bytes(flags);
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(HandshakeError::BadClientFlags(flags));
        }
        // A client without FIXED_NEWSTYLE is served as fixed newstyle anyway (the spec
        // allows it); such clients only ever send EXPORT_NAME.
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        Ok(())
    }

    /// Reads one option header and its data into `data`, then handles it.
    fn option(&mut self, data: &mut Vec<u8>) -> Result<Step, HandshakeError> {
        match self.read_option(data)? {
            Some(option) => self.dispatch(option, data),
            None => Ok(Step::Continue),
        }
    }

    /// Reads one option header and its data into `data`; None when the data was too long and
    /// the option has been refused already.
    fn read_option(&mut self, data: &mut Vec<u8>) -> Result<Option<u32>, HandshakeError> {
        let mut header = [0u8; 16];
        self.read_exact(&mut header)?;
        let [magic @ .., _, _, _, _, _, _, _, _] = header;
        let magic = u64::from_be_bytes(magic);
        if magic != IHAVEOPT {
            return Err(HandshakeError::BadOptionMagic(magic));
        }
        let option = u32::from_be_bytes([header[8], header[9], header[10], header[11]]);
        let len_bytes = u32::from_be_bytes([header[12], header[13], header[14], header[15]]);
        log::debug!("nbd handshake: option {option}, {len_bytes} bytes");
        let limit = if option == OPT_EXPORT_NAME {
            MAX_NAME_BYTES
        } else {
            MAX_OPTION_BYTES
        };
        if len_bytes > limit {
            self.refuse_too_big(option, len_bytes)?;
            return Ok(None);
        }
        data.clear();
        data.resize(
            usize::try_from(len_bytes).expect("bounded by MAX_OPTION_BYTES"),
            0,
        );
        self.read_exact(data)?;
        Ok(Some(option))
    }

    /// One option before TLS on a listener that requires it: Some(true) STARTTLS acked,
    /// Some(false) aborted, None refused (go on).
    fn before_tls(&mut self, option: u32, data: &[u8]) -> Result<Option<bool>, HandshakeError> {
        match option {
            OPT_STARTTLS if data.is_empty() => {
                self.reply(option, REP_ACK, &[])?;
                Ok(Some(true))
            }
            OPT_STARTTLS => self.invalid(option, "option takes no data").map(|_| None),
            OPT_ABORT => self.dispatch(option, data).map(|_| Some(false)),
            OPT_EXPORT_NAME => Err(HandshakeError::TlsRequired),
            _ => {
                let message = b"TLS required: send NBD_OPT_STARTTLS first";
                self.reply(option, REP_ERR_TLS_REQD, &[message])?;
                Ok(None)
            }
        }
    }

    /// Skips over-long option data and answers TOO_BIG, or closes when even skipping is
    /// unreasonable (or the option is EXPORT_NAME, which cannot be answered with an error).
    #[cold]
    fn refuse_too_big(&mut self, option: u32, len_bytes: u32) -> Result<(), HandshakeError> {
        if option == OPT_EXPORT_NAME || len_bytes > MAX_DISCARD_BYTES {
            return Err(HandshakeError::OptionTooBig { option, len_bytes });
        }
        let skipped = io::copy(
            &mut (&mut *self.stream).take(u64::from(len_bytes)),
            &mut io::sink(),
        )
        .map_err(HandshakeError::from_io)?;
        if skipped != u64::from(len_bytes) {
            let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
            return Err(HandshakeError::ClientClosed(eof));
        }
        self.reply(option, REP_ERR_TOO_BIG, &[b"option data too long"])
    }

    fn dispatch(&mut self, option: u32, data: &[u8]) -> Result<Step, HandshakeError> {
        match option {
            OPT_EXPORT_NAME => self.export_name(data),
            OPT_ABORT => {
                // The client may close without reading the ack, so a failed write is fine.
                if let Err(err) = self.reply(option, REP_ACK, &[]) {
                    log::debug!("nbd handshake: abort ack not delivered: {err}");
                }
                Ok(Step::Abort)
            }
            OPT_LIST if data.is_empty() => self.list(),
            OPT_STRUCTURED_REPLY if data.is_empty() => {
                self.structured = true;
                self.reply(option, REP_ACK, &[])?;
                Ok(Step::Continue)
            }
            OPT_LIST | OPT_STRUCTURED_REPLY => self.invalid(option, "option takes no data"),
            OPT_STARTTLS if self.tls == Tls::Established => {
                self.invalid(option, "TLS is already on")
            }
            OPT_STARTTLS => {
                self.reply(option, REP_ERR_POLICY, &[b"TLS is not offered"])?;
                Ok(Step::Continue)
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data),
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data),
            _ => {
                self.reply(option, REP_ERR_UNSUP, &[])?;
                Ok(Step::Continue)
            }
        }
    }

    /// Writes one option reply: magic, option, type, length, then `parts` concatenated.
    fn reply(
        &mut self,
        option: u32,
        reply_type: u32,
        parts: &[&[u8]],
    ) -> Result<(), HandshakeError> {
        let len_bytes: usize = parts.iter().map(|part| part.len()).sum();
        let len_bytes = u32::try_from(len_bytes).expect("option replies are small");
        let mut reply = std::mem::take(&mut self.reply);
        reply.clear();
        reply.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
        reply.extend_from_slice(&option.to_be_bytes());
        reply.extend_from_slice(&reply_type.to_be_bytes());
        reply.extend_from_slice(&len_bytes.to_be_bytes());
        for part in parts {
            reply.extend_from_slice(part);
        }
        let written = self.write_all(&reply);
        self.reply = reply;
        written
    }

    fn invalid(&mut self, option: u32, message: &str) -> Result<Step, HandshakeError> {
        self.reply(option, REP_ERR_INVALID, &[message.as_bytes()])?;
        Ok(Step::Continue)
    }

    fn unknown_export(&mut self, option: u32, name: &str) -> Result<Step, HandshakeError> {
        let message = format!("no export named {name:?}");
        self.reply(option, REP_ERR_UNKNOWN, &[message.as_bytes()])?;
        Ok(Step::Continue)
    }

    /// The export for `name`; "" falls back to the only export there is.
    fn resolve(&self, name: &str) -> Option<ExportInfo> {
        if let Some(export) = self.catalog.lookup(name) {
            return Some(export);
        }
        if !name.is_empty() {
            return None;
        }
        let mut all = self.catalog.list();
        if all.len() == 1 {
            all.pop()
        } else {
            None
        }
    }

    /// The result of the handshake for `export`.
    fn finish(&mut self, export: ExportInfo) -> Negotiated {
        let meta_contexts = match self.selection.take() {
            Some(selection) if selection.export_name == export.name => selection.contexts,
            _ => Vec::new(),
        };
        Negotiated {
            export,
            structured_replies: self.structured,
            meta_contexts,
        }
    }

    fn export_name(&mut self, data: &[u8]) -> Result<Step, HandshakeError> {
        let name = nbd_string(data).ok_or(HandshakeError::BadExportName)?;
        let export = self
            .resolve(name)
            .ok_or_else(|| HandshakeError::UnknownExport(name.to_string()))?;
        let mut reply = [0u8; 10 + 124];
        reply[0..8].copy_from_slice(&export.size_bytes.to_be_bytes());
        reply[8..10].copy_from_slice(&export.transmission_flags(self.structured).to_be_bytes());
        let len_bytes = if self.no_zeroes { 10 } else { reply.len() };
        self.write_all(&reply[..len_bytes])?;
        Ok(Step::Transmit(self.finish(export)))
    }

    fn list(&mut self) -> Result<Step, HandshakeError> {
        for export in self.catalog.list() {
            if !valid_name(&export.name) {
                log::warn!("nbd handshake: export name not listable: {:?}", export.name);
                continue;
            }
            let name_len = u32::try_from(export.name.len()).expect("at most 4096 bytes");
            let description = codec::truncate_utf8(&export.description, MAX_STRING_BYTES);
            let parts: [&[u8]; 3] = [
                &name_len.to_be_bytes(),
                export.name.as_bytes(),
                description.as_bytes(),
            ];
            self.reply(OPT_LIST, REP_SERVER, &parts)?;
        }
        self.reply(OPT_LIST, REP_ACK, &[])?;
        Ok(Step::Continue)
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) -> Result<Step, HandshakeError> {
        let Some(request) = InfoRequest::parse(data) else {
            return self.invalid(option, "malformed INFO/GO request");
        };
        let Some(export) = self.resolve(request.name) else {
            return self.unknown_export(option, request.name);
        };
        let mut info = [0u8; 14];
        info[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
        info[2..10].copy_from_slice(&export.size_bytes.to_be_bytes());
        info[10..12].copy_from_slice(&export.transmission_flags(self.structured).to_be_bytes());
        self.reply(option, REP_INFO, &[&info[..12]])?;
        if request.wants_name {
            self.reply(
                option,
                REP_INFO,
                &[&INFO_NAME.to_be_bytes(), export.name.as_bytes()],
            )?;
        }
        if request.wants_description {
            let description = codec::truncate_utf8(&export.description, MAX_STRING_BYTES);
            self.reply(
                option,
                REP_INFO,
                &[&INFO_DESCRIPTION.to_be_bytes(), description.as_bytes()],
            )?;
        }
        info[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        info[2..6].copy_from_slice(&export.block_min.to_be_bytes());
        info[6..10].copy_from_slice(&export.block_preferred.to_be_bytes());
        info[10..14].copy_from_slice(&export.block_max.to_be_bytes());
        self.reply(option, REP_INFO, &[&info])?;
        self.reply(option, REP_ACK, &[])?;
        if option == OPT_GO {
            return Ok(Step::Transmit(self.finish(export)));
        }
        Ok(Step::Continue)
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<Step, HandshakeError> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // The spec: SET replaces the earlier selection even when it fails.
            self.selection = None;
            if !self.structured {
                return self.invalid(option, "negotiate structured replies first");
            }
        }
        let Some(request) = MetaRequest::parse(data) else {
            return self.invalid(option, "malformed meta context request");
        };
        let Some(export) = self.resolve(request.export_name) else {
            return self.unknown_export(option, request.export_name);
        };
        let matched = match_contexts(&export.meta_contexts, &request.queries, set);
        if !set {
            for name in matched {
                self.reply(
                    option,
                    REP_META_CONTEXT,
                    &[&0u32.to_be_bytes(), name.as_bytes()],
                )?;
            }
            self.reply(option, REP_ACK, &[])?;
            return Ok(Step::Continue);
        }
        let first_id = self.next_context_id;
        let next_id = u32::try_from(matched.len())
            .ok()
            .and_then(|count| first_id.checked_add(count));
        let Some(next_id) = next_id else {
            self.reply(option, REP_ERR_TOO_BIG, &[b"out of context ids"])?;
            return Ok(Step::Continue);
        };
        self.next_context_id = next_id;
        let mut contexts = Vec::with_capacity(matched.len());
        for (id, name) in (first_id..next_id).zip(matched) {
            self.reply(
                option,
                REP_META_CONTEXT,
                &[&id.to_be_bytes(), name.as_bytes()],
            )?;
            contexts.push((id, name.to_string()));
        }
        self.reply(option, REP_ACK, &[])?;
        self.selection = Some(Selection {
            export_name: export.name,
            contexts,
        });
        Ok(Step::Continue)
    }
}

/// The contexts of `available` that `queries` select, each once, in `available` order.
/// No query: LIST lists everything, SET selects nothing. A query ending in ':' (a namespace
/// or a namespace prefix such as `qemu:dirty-bitmap:`) lists every context under it; SET
/// takes exact names only.
fn match_contexts<'a>(available: &'a [String], queries: &[&str], set: bool) -> Vec<&'a str> {
    if queries.is_empty() {
        return if set {
            Vec::new()
        } else {
            available.iter().map(String::as_str).collect()
        };
    }
    let matches = |context: &str| {
        queries.iter().any(|query| {
            context == *query || (!set && query.ends_with(':') && context.starts_with(query))
        })
    };
    available
        .iter()
        .map(String::as_str)
        .filter(|context| matches(context))
        .collect()
}

/// A string as the spec defines it: UTF-8, no NUL, at most 4096 bytes.
fn nbd_string(bytes: &[u8]) -> Option<&str> {
    if bytes.len() > MAX_STRING_BYTES || bytes.contains(&0) {
        return None;
    }
    std::str::from_utf8(bytes).ok()
}

/// Whether `name` can be sent as an NBD string in a LIST reply. Not [`crate::name::validate`]:
/// that rule is for names ferry creates things under; this one is the protocol's bound on
/// what may travel (exports are created valid, so this only guards the wire).
fn valid_name(name: &str) -> bool {
    nbd_string(name.as_bytes()).is_some()
}

/// A u32 length followed by that many bytes of NBD string; None if short or not a string.
fn read_string<'a>(reader: &mut codec::Reader<'a>) -> Option<&'a str> {
    let len = usize::try_from(reader.u32_be().ok()?).ok()?;
    nbd_string(reader.bytes(len).ok()?)
}

/// The data of NBD_OPT_INFO / NBD_OPT_GO.
struct InfoRequest<'a> {
    name: &'a str,
    wants_name: bool,
    wants_description: bool,
}

impl<'a> InfoRequest<'a> {
    /// None if malformed: the lengths must account for every byte.
    fn parse(data: &'a [u8]) -> Option<Self> {
        let mut reader = codec::Reader::new(data);
        let name = read_string(&mut reader)?;
        let count = usize::from(reader.u16_be().ok()?);
        if reader.remaining() != count * 2 {
            return None;
        }
        let mut request = InfoRequest {
            name,
            wants_name: false,
            wants_description: false,
        };
        for _ in 0..count {
            match reader.u16_be().ok()? {
                INFO_NAME => request.wants_name = true,
                INFO_DESCRIPTION => request.wants_description = true,
                _ => {} // EXPORT and BLOCK_SIZE are always sent; unknown ones are ignored.
            }
        }
        Some(request)
    }
}

/// The data of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT.
struct MetaRequest<'a> {
    export_name: &'a str,
    queries: Vec<&'a str>,
}

impl<'a> MetaRequest<'a> {
    /// None if malformed: the lengths must account for every byte.
    fn parse(data: &'a [u8]) -> Option<Self> {
        let mut reader = codec::Reader::new(data);
        let export_name = read_string(&mut reader)?;
        let count = reader.u32_be().ok()?;
        // Each query takes at least 4 bytes, which bounds the allocation.
        let mut queries = Vec::with_capacity(reader.remaining() / 4);
        for _ in 0..count {
            queries.push(read_string(&mut reader)?);
        }
        if !reader.is_empty() {
            return None;
        }
        Some(MetaRequest {
            export_name,
            queries,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::nbd::wire::{FLAG_SEND_DF, OPT_EXTENDED_HEADERS, REQUEST_MAGIC};
    use crate::prng::SplitMix64;

    /// In-memory connection: the client's bytes in, the server's bytes out.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }

    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Catalog(Vec<ExportInfo>);

    impl ExportCatalog for Catalog {
        fn list(&self) -> Vec<ExportInfo> {
            self.0.clone()
        }
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            self.0.iter().find(|export| export.name == name).cloned()
        }
    }

    fn export(name: &str) -> ExportInfo {
        ExportInfo {
            name: name.to_string(),
            description: format!("{name} disk"),
            size_bytes: 0x0010_0000,
            read_only: false,
            multi_conn: true,
            can_trim: true,
            can_fast_zero: false,
            block_min: 1,
            block_preferred: 4096,
            block_max: 0x0200_0000,
            meta_contexts: vec![
                "base:allocation".to_string(),
                "qemu:dirty-bitmap:a".to_string(),
                "qemu:dirty-bitmap:b".to_string(),
            ],
        }
    }

    fn catalog() -> Catalog {
        Catalog(vec![export("vm1"), export("vm2")])
    }

    /// Builds what a client sends.
    struct Client(Vec<u8>);

    impl Client {
        fn new(flags: u32) -> Self {
            Client(flags.to_be_bytes().to_vec())
        }

        fn option(mut self, option: u32, data: &[u8]) -> Self {
            self.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
            self.0.extend_from_slice(&option.to_be_bytes());
            let len = u32::try_from(data.len()).expect("test data is small");
            self.0.extend_from_slice(&len.to_be_bytes());
            self.0.extend_from_slice(data);
            self
        }
    }

    fn string(out: &mut Vec<u8>, text: &str) {
        let len = u32::try_from(text.len()).expect("short");
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }

    fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut data = Vec::new();
        string(&mut data, name);
        let count = u16::try_from(infos.len()).expect("short");
        data.extend_from_slice(&count.to_be_bytes());
        for info in infos {
            data.extend_from_slice(&info.to_be_bytes());
        }
        data
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut data = Vec::new();
        string(&mut data, name);
        let count = u32::try_from(queries.len()).expect("short");
        data.extend_from_slice(&count.to_be_bytes());
        for query in queries {
            string(&mut data, query);
        }
        data
    }

    const BOTH: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

    /// Runs the handshake; returns its result and what the server sent after the greeting.
    fn run(
        client: Client,
        catalog: &dyn ExportCatalog,
    ) -> (Result<Option<Negotiated>, HandshakeError>, Vec<u8>) {
        let mut duplex = Duplex {
            input: Cursor::new(client.0),
            output: Vec::new(),
        };
        let result = negotiate(&mut duplex, catalog);
        let after_greeting = duplex.output.get(18..).unwrap_or_default().to_vec();
        (result, after_greeting)
    }

    #[derive(Debug, PartialEq, Eq)]
    struct Reply {
        option: u32,
        kind: u32,
        data: Vec<u8>,
    }

    /// Splits server output into option replies; `rest` is what follows the last one.
    fn replies(mut bytes: &[u8]) -> Vec<Reply> {
        let mut out = Vec::new();
        while bytes.len() >= 20 && bytes[..8] == OPTION_REPLY_MAGIC.to_be_bytes() {
            let word = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4"));
            let len = usize::try_from(word(16)).expect("fits");
            out.push(Reply {
                option: word(8),
                kind: word(12),
                data: bytes[20..20 + len].to_vec(),
            });
            bytes = &bytes[20 + len..];
        }
        assert!(bytes.is_empty(), "trailing bytes after replies: {bytes:?}");
        out
    }

    fn ack(option: u32) -> Reply {
        Reply {
            option,
            kind: REP_ACK,
            data: Vec::new(),
        }
    }

    fn context(option: u32, id: u32, name: &str) -> Reply {
        let mut data = id.to_be_bytes().to_vec();
        data.extend_from_slice(name.as_bytes());
        Reply {
            option,
            kind: REP_META_CONTEXT,
            data,
        }
    }

    #[test]
    fn greeting_matches_spec_bytes() {
        // Goal: the greeting is NBDMAGIC, IHAVEOPT, FIXED_NEWSTYLE|NO_ZEROES. Method: the
        // client closes right after it; compare bytes and expect ClientClosed.
        let mut duplex = Duplex {
            input: Cursor::new(Vec::new()),
            output: Vec::new(),
        };
        let err = negotiate(&mut duplex, &catalog()).expect_err("client closed");
        assert!(err.is_client_gone(), "{err:?}");
        let expected = [
            b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
            b'P', b'T', 0x00, 0x03,
        ];
        assert_eq!(duplex.output, expected);
    }

    #[test]
    fn unknown_client_flags_close() {
        // Goal: unknown client flag bits end the handshake. Method: flags with bit 2 set.
        let (result, output) = run(Client::new(0x4 | BOTH), &catalog());
        assert!(
            matches!(result, Err(HandshakeError::BadClientFlags(0x7))),
            "{result:?}"
        );
        assert!(output.is_empty());
    }

    #[test]
    fn export_name_with_no_zeroes() {
        // Goal: EXPORT_NAME answers size + flags without padding when NO_ZEROES was set.
        // Method: compare the 10 reply bytes.
        let (result, output) = run(
            Client::new(BOTH).option(OPT_EXPORT_NAME, b"vm2"),
            &catalog(),
        );
        let negotiated = result.expect("no error").expect("transmission");
        assert_eq!(negotiated.export, export("vm2"));
        assert!(!negotiated.structured_replies);
        assert!(negotiated.meta_contexts.is_empty());
        assert_eq!(output, [0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x6d]);
        assert_eq!(negotiated.transmission_flags(), 0x016d);
    }

    #[test]
    fn export_name_pads_without_no_zeroes() {
        // Goal: 124 zero bytes follow the flags unless NO_ZEROES. Method: client flags 1.
        let client = Client::new(FLAG_C_FIXED_NEWSTYLE).option(OPT_EXPORT_NAME, b"vm1");
        let (result, output) = run(client, &catalog());
        assert!(result.expect("ok").is_some());
        assert_eq!(output.len(), 134);
        assert!(output[10..].iter().all(|byte| *byte == 0));
    }

    #[test]
    fn export_name_failures_close() {
        // Goal: EXPORT_NAME cannot carry an error, so bad names close. Method: an unknown
        // name, a name with NUL, a name over 4096 bytes.
        let (result, _) = run(
            Client::new(BOTH).option(OPT_EXPORT_NAME, b"nope"),
            &catalog(),
        );
        assert!(matches!(result, Err(HandshakeError::UnknownExport(ref n)) if n == "nope"));
        let (result, _) = run(
            Client::new(BOTH).option(OPT_EXPORT_NAME, b"a\0b"),
            &catalog(),
        );
        assert!(
            matches!(result, Err(HandshakeError::BadExportName)),
            "{result:?}"
        );
        let long = vec![b'a'; 4097];
        let (result, _) = run(Client::new(BOTH).option(OPT_EXPORT_NAME, &long), &catalog());
        let expected = HandshakeError::OptionTooBig {
            option: OPT_EXPORT_NAME,
            len_bytes: 4097,
        };
        assert_eq!(format!("{result:?}"), format!("Err({expected:?})"));
    }

    #[test]
    fn default_export_resolves_only_when_unique() {
        // Goal: "" selects the only export, and is unknown among several. Method: GO "" on
        // one- and two-export catalogs.
        let single = Catalog(vec![export("only")]);
        let client = || Client::new(BOTH).option(OPT_GO, &info_data("", &[]));
        let (result, _) = run(client(), &single);
        assert_eq!(result.expect("ok").expect("go").export.name, "only");
        let (result, output) = run(client().option(OPT_ABORT, &[]), &catalog());
        assert!(result.expect("ok").is_none());
        let replies = replies(&output);
        assert_eq!(replies[0].kind, REP_ERR_UNKNOWN);
        assert_eq!(replies[1], ack(OPT_ABORT));
    }

    #[test]
    fn abort_acks_and_ends() {
        // Goal: ABORT is acknowledged and negotiate returns None, even with (ignored) data.
        // Method: ABORT with 3 data bytes.
        let (result, output) = run(Client::new(BOTH).option(OPT_ABORT, b"xyz"), &catalog());
        assert!(result.expect("ok").is_none());
        let expected = [
            0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0,
        ];
        assert_eq!(output, expected);
    }

    #[test]
    fn list_sends_each_export_then_ack() {
        // Goal: LIST answers one SERVER (name length, name, description) per export, then
        // ACK; LIST with data is invalid. Method: LIST, LIST with data, ABORT.
        let client = Client::new(BOTH)
            .option(OPT_LIST, &[])
            .option(OPT_LIST, b"x")
            .option(OPT_ABORT, &[]);
        let (result, output) = run(client, &catalog());
        assert!(result.expect("ok").is_none());
        let replies = replies(&output);
        let server = |name: &str| {
            let mut data = Vec::new();
            string(&mut data, name);
            data.extend_from_slice(format!("{name} disk").as_bytes());
            Reply {
                option: OPT_LIST,
                kind: REP_SERVER,
                data,
            }
        };
        assert_eq!(replies[0], server("vm1"));
        assert_eq!(replies[1], server("vm2"));
        assert_eq!(replies[2], ack(OPT_LIST));
        assert_eq!(replies[3].kind, REP_ERR_INVALID);
        assert_eq!(replies[4], ack(OPT_ABORT));
        assert_eq!(replies.len(), 5);
    }

    #[test]
    fn starttls_extended_headers_and_unknown_are_refused() {
        // Goal: STARTTLS gets ERR_POLICY, extended headers and unknown options ERR_UNSUP,
        // and negotiation goes on. Method: the three options, then EXPORT_NAME.
        let client = Client::new(BOTH)
            .option(OPT_STARTTLS, &[])
            .option(OPT_EXTENDED_HEADERS, &[])
            .option(0x1234, b"junk")
            .option(OPT_EXPORT_NAME, b"vm1");
        let (result, output) = run(client, &catalog());
        assert!(result.expect("ok").is_some());
        let replies = replies(&output[..output.len() - 10]);
        let kinds: Vec<(u32, u32)> = replies.iter().map(|r| (r.option, r.kind)).collect();
        let expected = [
            (OPT_STARTTLS, REP_ERR_POLICY),
            (OPT_EXTENDED_HEADERS, REP_ERR_UNSUP),
            (0x1234, REP_ERR_UNSUP),
        ];
        assert_eq!(kinds, expected);
        assert!(replies[1].data.is_empty());
    }

    type Haggled = Result<Option<Negotiated>, HandshakeError>;

    /// Runs the TLS-required path: greet, await_starttls, and (if STARTTLS was acked) haggle
    /// as over TLS on the rest of the bytes. Returns both results and the output after the
    /// greeting.
    fn run_tls(client: Client) -> (Result<bool, HandshakeError>, Option<Haggled>, Vec<u8>) {
        let mut duplex = Duplex {
            input: Cursor::new(client.0),
            output: Vec::new(),
        };
        let greeting = greet(&mut duplex).expect("greeting");
        let started = await_starttls(&mut duplex, greeting);
        let after = match started {
            Ok(true) => Some(haggle(&mut duplex, &catalog(), greeting, Tls::Established)),
            _ => None,
        };
        let output = duplex.output.get(18..).unwrap_or_default().to_vec();
        (started, after, output)
    }

    #[test]
    fn tls_required_refuses_everything_before_starttls() {
        // Goal: before STARTTLS nothing is listed or opened: every option but STARTTLS and
        // ABORT gets TLS_REQD, STARTTLS with data is invalid; after STARTTLS, options work
        // and STARTTLS again is invalid. Method: one scripted client through both phases.
        let client = Client::new(BOTH)
            .option(OPT_LIST, &[])
            .option(OPT_INFO, &info_data("vm1", &[]))
            .option(OPT_STRUCTURED_REPLY, &[])
            .option(OPT_LIST_META_CONTEXT, &meta_data("vm1", &[]))
            .option(OPT_STARTTLS, b"x")
            .option(OPT_STARTTLS, &[])
            .option(OPT_STARTTLS, &[])
            .option(OPT_GO, &info_data("vm1", &[]));
        let (started, after, output) = run_tls(client);
        assert!(started.expect("ok"));
        let negotiated = after.expect("haggled").expect("ok").expect("go");
        assert_eq!(negotiated.export.name, "vm1");
        assert!(!negotiated.structured_replies, "nothing before TLS counts");
        let kinds: Vec<(u32, u32)> = replies(&output)
            .iter()
            .map(|r| (r.option, r.kind))
            .collect();
        assert_eq!(
            kinds[..7],
            [
                (OPT_LIST, REP_ERR_TLS_REQD),
                (OPT_INFO, REP_ERR_TLS_REQD),
                (OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD),
                (OPT_LIST_META_CONTEXT, REP_ERR_TLS_REQD),
                (OPT_STARTTLS, REP_ERR_INVALID),
                (OPT_STARTTLS, REP_ACK),
                (OPT_STARTTLS, REP_ERR_INVALID),
            ]
        );
        assert_eq!(kinds.last(), Some(&(OPT_GO, REP_ACK)));
    }

    #[test]
    fn tls_required_closes_on_export_name_and_honours_abort() {
        // Goal: EXPORT_NAME before STARTTLS closes (it cannot be refused), ABORT is acked.
        let (started, _, output) = run_tls(Client::new(BOTH).option(OPT_EXPORT_NAME, b"vm1"));
        assert!(
            matches!(started, Err(HandshakeError::TlsRequired)),
            "{started:?}"
        );
        assert!(output.is_empty(), "nothing sent: {output:?}");
        let (started, _, output) = run_tls(Client::new(BOTH).option(OPT_ABORT, &[]));
        assert!(!started.expect("ok"));
        assert_eq!(replies(&output), [ack(OPT_ABORT)]);
    }

    #[test]
    fn info_then_go_sends_spec_infos() {
        // Goal: INFO and GO send INFO_EXPORT, the requested NAME/DESCRIPTION, BLOCK_SIZE,
        // then ACK; GO enters transmission. Method: hand-written INFO payloads.
        let data = info_data("vm1", &[INFO_NAME, INFO_DESCRIPTION, 0x7777]);
        let client = Client::new(BOTH)
            .option(OPT_INFO, &data)
            .option(OPT_GO, &info_data("vm1", &[]));
        let (result, output) = run(client, &catalog());
        let negotiated = result.expect("ok").expect("go");
        assert_eq!(negotiated.export.name, "vm1");
        let replies = replies(&output);
        let info = |option: u32, data: &[u8]| Reply {
            option,
            kind: REP_INFO,
            data: data.to_vec(),
        };
        let export_info = [0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0x01, 0x6d];
        let block_size = [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0];
        let expected = [
            info(OPT_INFO, &export_info),
            info(OPT_INFO, b"\0\x01vm1"),
            info(OPT_INFO, b"\0\x02vm1 disk"),
            info(OPT_INFO, &block_size),
            ack(OPT_INFO),
            info(OPT_GO, &export_info),
            info(OPT_GO, &block_size),
            ack(OPT_GO),
        ];
        assert_eq!(replies, expected);
    }

    #[test]
    fn info_errors_keep_negotiating() {
        // Goal: an unknown export gets ERR_UNKNOWN and malformed data ERR_INVALID, without
        // closing. Method: INFO unknown, GO with a bad name length, GO with odd info list.
        let mut bad_len = info_data("vm1", &[]);
        bad_len[3] = 200;
        let mut odd = info_data("vm1", &[INFO_NAME]);
        odd.push(0);
        let client = Client::new(BOTH)
            .option(OPT_INFO, &info_data("nope", &[]))
            .option(OPT_GO, &bad_len)
            .option(OPT_GO, &odd)
            .option(OPT_GO, &[0, 0])
            .option(OPT_ABORT, &[]);
        let (result, output) = run(client, &catalog());
        assert!(result.expect("ok").is_none());
        let kinds: Vec<u32> = replies(&output).iter().map(|r| r.kind).collect();
        assert_eq!(
            kinds,
            [
                REP_ERR_UNKNOWN,
                REP_ERR_INVALID,
                REP_ERR_INVALID,
                REP_ERR_INVALID,
                REP_ACK
            ]
        );
    }

    #[test]
    fn structured_reply_negotiation() {
        // Goal: STRUCTURED_REPLY with data is invalid, without data it is acked and enables
        // DF in the transmission flags. Method: both, then GO.
        let client = Client::new(BOTH)
            .option(OPT_STRUCTURED_REPLY, b"x")
            .option(OPT_STRUCTURED_REPLY, &[])
            .option(OPT_GO, &info_data("vm1", &[]));
        let (result, output) = run(client, &catalog());
        let negotiated = result.expect("ok").expect("go");
        assert!(negotiated.structured_replies);
        assert_ne!(negotiated.transmission_flags() & FLAG_SEND_DF, 0);
        let replies = replies(&output);
        assert_eq!(replies[0].kind, REP_ERR_INVALID);
        assert_eq!(replies[1], ack(OPT_STRUCTURED_REPLY));
        assert_eq!(replies[2].data[10..12], [0x01, 0xed]);
    }

    #[test]
    fn list_meta_context_queries() {
        // Goal: LIST with no query lists all; a namespace prefix lists what it covers; an
        // unknown namespace lists nothing; ids are 0. Method: four LISTs.
        let client = Client::new(BOTH)
            .option(OPT_LIST_META_CONTEXT, &meta_data("vm1", &[]))
            .option(
                OPT_LIST_META_CONTEXT,
                &meta_data("vm1", &["qemu:dirty-bitmap:"]),
            )
            .option(
                OPT_LIST_META_CONTEXT,
                &meta_data("vm1", &["base:", "qemu:dirty-bitmap:b"]),
            )
            .option(
                OPT_LIST_META_CONTEXT,
                &meta_data("vm1", &["x-other:", "nocolon"]),
            )
            .option(OPT_LIST_META_CONTEXT, &meta_data("nope", &[]))
            .option(OPT_ABORT, &[]);
        let (result, output) = run(client, &catalog());
        assert!(result.expect("ok").is_none());
        let o = OPT_LIST_META_CONTEXT;
        let expected = [
            context(o, 0, "base:allocation"),
            context(o, 0, "qemu:dirty-bitmap:a"),
            context(o, 0, "qemu:dirty-bitmap:b"),
            ack(o),
            context(o, 0, "qemu:dirty-bitmap:a"),
            context(o, 0, "qemu:dirty-bitmap:b"),
            ack(o),
            context(o, 0, "base:allocation"),
            context(o, 0, "qemu:dirty-bitmap:b"),
            ack(o),
            ack(o),
        ];
        let replies = replies(&output);
        assert_eq!(replies[..11], expected);
        assert_eq!(replies[11].kind, REP_ERR_UNKNOWN);
        assert_eq!(replies[12], ack(OPT_ABORT));
    }

    #[test]
    fn set_meta_context_requires_structured_and_replaces() {
        // Goal: SET before STRUCTURED_REPLY is invalid; SET assigns fresh non-zero ids, takes
        // exact names only, and a later SET replaces the earlier one. Method: SET, SR, SET,
        // SET, GO; compare replies and the negotiated contexts.
        let s = OPT_SET_META_CONTEXT;
        let client = Client::new(BOTH)
            .option(s, &meta_data("vm1", &["base:allocation"]))
            .option(OPT_STRUCTURED_REPLY, &[])
            .option(
                s,
                &meta_data("vm1", &["base:allocation", "qemu:dirty-bitmap:a"]),
            )
            .option(
                s,
                &meta_data("vm1", &["qemu:dirty-bitmap:b", "qemu:", "base:allocation"]),
            )
            .option(OPT_GO, &info_data("vm1", &[]));
        let (result, output) = run(client, &catalog());
        let negotiated = result.expect("ok").expect("go");
        let replies = replies(&output);
        assert_eq!(replies[0].kind, REP_ERR_INVALID);
        assert_eq!(replies[1], ack(OPT_STRUCTURED_REPLY));
        let expected = [
            context(s, 1, "base:allocation"),
            context(s, 2, "qemu:dirty-bitmap:a"),
            ack(s),
            context(s, 3, "base:allocation"),
            context(s, 4, "qemu:dirty-bitmap:b"),
            ack(s),
        ];
        assert_eq!(replies[2..8], expected);
        let contexts = vec![
            (3, "base:allocation".to_string()),
            (4, "qemu:dirty-bitmap:b".to_string()),
        ];
        assert_eq!(negotiated.meta_contexts, contexts);
    }

    #[test]
    fn contexts_dropped_when_export_differs_or_set_fails() {
        // Goal: contexts reach transmission only if the last SET named the chosen export and
        // succeeded. Method: SET on vm1 then GO vm2; SET then a malformed SET then GO vm1.
        let base = || {
            Client::new(BOTH).option(OPT_STRUCTURED_REPLY, &[]).option(
                OPT_SET_META_CONTEXT,
                &meta_data("vm1", &["base:allocation"]),
            )
        };
        let (result, _) = run(base().option(OPT_GO, &info_data("vm2", &[])), &catalog());
        assert!(result.expect("ok").expect("go").meta_contexts.is_empty());
        let client = base()
            .option(OPT_SET_META_CONTEXT, b"bad")
            .option(OPT_GO, &info_data("vm1", &[]));
        let (result, _) = run(client, &catalog());
        assert!(result.expect("ok").expect("go").meta_contexts.is_empty());
        let (result, _) = run(base().option(OPT_EXPORT_NAME, b"vm1"), &catalog());
        let negotiated = result.expect("ok").expect("export name");
        assert_eq!(
            negotiated.meta_contexts,
            [(1, "base:allocation".to_string())]
        );
    }

    #[test]
    fn negotiated_validate_requires_context_for_block_status() {
        // Goal: BLOCK_STATUS is refused without a selected context. Method: validate one
        // request against two Negotiated values.
        let header = RequestHeader {
            flags: 0,
            command: wire::CMD_BLOCK_STATUS,
            cookie: 1,
            offset_bytes: 0,
            length_bytes: 4096,
        };
        let mut negotiated = Negotiated {
            export: export("vm1"),
            structured_replies: true,
            meta_contexts: Vec::new(),
        };
        assert_eq!(negotiated.validate(&header), Err(NbdErrno::Inval));
        negotiated
            .meta_contexts
            .push((1, "base:allocation".to_string()));
        assert_eq!(negotiated.validate(&header), Ok(Command::BlockStatus));
    }

    #[test]
    fn oversized_options_are_bounded() {
        // Goal: data over 64 KiB is skipped with ERR_TOO_BIG; over 1 MiB closes. Method: a
        // 70 KiB unknown option then EXPORT_NAME; then a header claiming 2 MiB.
        let big = vec![7u8; 70 * 1024];
        let client = Client::new(BOTH)
            .option(OPT_INFO, &big)
            .option(OPT_EXPORT_NAME, b"vm1");
        let (result, output) = run(client, &catalog());
        assert!(result.expect("ok").is_some());
        assert_eq!(
            replies(&output[..output.len() - 10])[0].kind,
            REP_ERR_TOO_BIG
        );

        let mut client = Client::new(BOTH);
        client.0.extend_from_slice(&IHAVEOPT.to_be_bytes());
        client.0.extend_from_slice(&OPT_INFO.to_be_bytes());
        client.0.extend_from_slice(&(2u32 << 20).to_be_bytes());
        let (result, _) = run(client, &catalog());
        assert!(
            matches!(result, Err(HandshakeError::OptionTooBig { option: 6, .. })),
            "{result:?}"
        );
    }

    #[test]
    fn truncated_and_corrupt_streams_fail_cleanly() {
        // Goal: EOF inside an option is ClientClosed, a wrong magic BadOptionMagic. Method:
        // cut an option short; send the request magic instead of IHAVEOPT.
        let mut client = Client::new(BOTH).option(OPT_GO, &info_data("vm1", &[]));
        client.0.truncate(client.0.len() - 3);
        let (result, _) = run(client, &catalog());
        let err = result.expect_err("truncated");
        assert!(err.is_client_gone());
        assert_eq!(
            err.to_string(),
            "client closed the connection during the handshake"
        );

        let mut client = Client::new(BOTH);
        client
            .0
            .extend_from_slice(&u64::from(REQUEST_MAGIC).to_be_bytes());
        client.0.extend_from_slice(&[0; 8]);
        let (result, _) = run(client, &catalog());
        assert!(matches!(
            result,
            Err(HandshakeError::BadOptionMagic(0x2560_9513))
        ));
    }

    #[test]
    fn too_many_options_close() {
        // Goal: the option count is bounded. Method: MAX_OPTIONS + 1 STRUCTURED_REPLY options.
        let mut client = Client::new(BOTH);
        for _ in 0..=MAX_OPTIONS {
            client = client.option(OPT_STRUCTURED_REPLY, &[]);
        }
        let (result, _) = run(client, &catalog());
        assert!(
            matches!(result, Err(HandshakeError::TooManyOptions)),
            "{result:?}"
        );
    }

    /// A plausible client session: a random run of valid options.
    fn valid_session(rng: &mut SplitMix64) -> Vec<u8> {
        let mut client = Client::new(u32::from(rng.byte() % 4));
        for _ in 0..rng.index(8) {
            client = match rng.index(9) {
                0 => client.option(OPT_LIST, &[]),
                1 => client.option(OPT_STRUCTURED_REPLY, &[]),
                2 => client.option(OPT_INFO, &info_data("vm1", &[INFO_NAME, INFO_DESCRIPTION])),
                3 => client.option(OPT_LIST_META_CONTEXT, &meta_data("vm2", &["qemu:"])),
                4 => client.option(
                    OPT_SET_META_CONTEXT,
                    &meta_data("vm1", &["base:allocation"]),
                ),
                5 => client.option(OPT_STARTTLS, &[]),
                6 => client.option(OPT_GO, &info_data("", &[INFO_BLOCK_SIZE])),
                7 => client.option(OPT_EXPORT_NAME, b"vm2"),
                _ => client.option(OPT_ABORT, &[]),
            };
        }
        client.0
    }

    /// Damages `bytes`: flips, overwrites, truncates or inserts at PRNG-chosen places.
    fn mutate(rng: &mut SplitMix64, bytes: &mut Vec<u8>) {
        for _ in 0..=rng.index(4) {
            let at = rng.index(bytes.len() + 1);
            match rng.index(4) {
                0 if at < bytes.len() => bytes[at] ^= 1 << rng.index(8),
                1 if at < bytes.len() => bytes[at] = rng.byte(),
                2 => bytes.truncate(at),
                _ => {
                    let noise: Vec<u8> = (0..rng.index(16)).map(|_| rng.byte()).collect();
                    bytes.splice(at..at, noise);
                }
            }
        }
    }

    #[test]
    fn fuzz_nothing_leaks_before_starttls() {
        // Goal: on a TLS-only listener no byte stream gets an export named, listed or sized
        // before STARTTLS, and none panics. Method: 5k valid and mutated sessions through
        // greet + await_starttls; the server's output up to its STARTTLS ack (or the end)
        // must not contain an export name.
        let mut rng = SplitMix64::new(0x00f0_0dca_fe00_0002);
        let mut started = 0u32;
        for iteration in 0..5_000 {
            let mut bytes = valid_session(&mut rng);
            if iteration % 2 == 1 {
                mutate(&mut rng, &mut bytes);
            }
            let mut duplex = Duplex {
                input: Cursor::new(bytes),
                output: Vec::new(),
            };
            let Ok(greeting) = greet(&mut duplex) else {
                continue;
            };
            if let Ok(true) = await_starttls(&mut duplex, greeting) {
                started += 1;
            }
            let shown = duplex.output.windows(3).any(|w| w == b"vm1" || w == b"vm2");
            assert!(!shown, "an export leaked before TLS: {:?}", duplex.output);
        }
        assert!(started > 500, "only {started} sessions reached STARTTLS");
    }

    #[test]
    fn fuzz_negotiate_never_panics() {
        // Goal: no client byte stream panics negotiate, and every transmission it grants is
        // consistent. Method: 20k SplitMix64 streams (pure noise, valid sessions, mutated
        // valid sessions); check the Negotiated invariants and that errors render.
        let catalog = catalog();
        let mut rng = SplitMix64::new(0x00f0_0dca_fe00_0001);
        let mut granted = 0u32;
        for iteration in 0..20_000 {
            let mut bytes = match iteration % 3 {
                0 => (0..rng.index(256)).map(|_| rng.byte()).collect(),
                1 => valid_session(&mut rng),
                _ => {
                    let mut bytes = valid_session(&mut rng);
                    mutate(&mut rng, &mut bytes);
                    bytes
                }
            };
            if iteration % 3 == 0 && rng.index(2) == 0 {
                // Noise after a valid greeting reply reaches the option parser.
                let mut prefix = Client::new(BOTH).0;
                prefix.extend_from_slice(&IHAVEOPT.to_be_bytes());
                prefix.append(&mut bytes);
                bytes = prefix;
            }
            match run(Client(bytes), &catalog).0 {
                Ok(Some(negotiated)) => {
                    granted += 1;
                    assert_eq!(
                        catalog.lookup(&negotiated.export.name),
                        Some(negotiated.export.clone())
                    );
                    assert!(negotiated.structured_replies || negotiated.meta_contexts.is_empty());
                    assert!(negotiated.meta_contexts.iter().all(|(id, _)| *id != 0));
                }
                Ok(None) => {}
                Err(err) => assert!(!err.to_string().is_empty()),
            }
        }
        assert!(
            granted > 1000,
            "only {granted} sessions reached transmission"
        );
    }
}
