//! One NBD connection in the transmission phase: the write-trapping data path.
//!
//! One thread per connection runs a loop over three steps: take every request already
//! received (blocking only when nothing is in flight), push them to the connection's io
//! engine in one batch, then turn every completion into a reply and write the replies with one
//! vectored write. Replies go out in completion order.
//!
//! Invariants:
//! - Every write-type request admitted through the export's write gate leaves through the
//!   export's write trap ([`crate::disk::trap`]) exactly once: after the engine reported it
//!   and before its reply (the trap marks the trackers, mirrors, and leaves the gate), or,
//!   when it never reached the engine, through `write_not_started`.
//! - FLUSH and FUA replies are sent only after fdatasync (or RWF_DSYNC) completed (invariant 2).
//! - A malformed request gets an NBD error reply and the connection goes on; only a bad magic
//!   or a broken stream ends the connection (invariant 3). Nothing here panics on input.
//! - At most `engine.capacity()` requests are in flight, and their buffers stay within the
//!   connection's and the agent's byte budgets ([`BufPool::bounded`]); beyond either the
//!   socket is not read, which back-pressures the client (DESIGN invariant 6).
//! - A WRITE enters the export's write gate only once its whole payload has been read: a
//!   client that stalls in the middle of a payload holds no gate, so it delays neither a
//!   switchover's drain nor other clients' writes. A request whose first byte arrived must be
//!   complete within the request deadline, or the connection is closed.
//! - The session waits for the socket's readiness only when no received byte waits inside
//!   the process ([`Conn::has_buffered_input`], TLS), so no request is left unread.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_sys::AlignedBuf;

use crate::dirty::Admission;
use crate::disk::{CounterSnapshot, Export, Route, WriteOutcome};
use crate::io::{read_buf_len, BlockIo, IoCompletion, IoKind, IoRequest};
use crate::metrics::LatencyRecorder;
use crate::nbd::blockstatus;
use crate::nbd::bufpool::BufPool;
use crate::nbd::conn::Conn;
use crate::nbd::tx::TxQueue;
use crate::nbd::wire::{self, Command, NbdErrno, RequestHeader, REQUEST_BYTES};
use crate::nbd::wire::{BLOCK_MAX_BYTES, BLOCK_PREFERRED_BYTES};

mod receive;

use receive::{Incoming, Ready};

/// Receive buffer size: many small requests per read, and the start of large ones.
const RX_BYTES: usize = 256 * 1024;
/// How often session-local latency is merged into the export's.
/// Well within the copy controller's window (`migrate::steer::WINDOW_NS`), whose judgement
/// would otherwise lag the gear it judges.
const MERGE_EVERY: Duration = Duration::from_millis(50);

/// Why a session ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The socket failed.
    #[error("connection failed")]
    Socket(#[source] io::Error),
    /// The client sent something that is not an NBD request.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The io engine failed as a whole (not one request), or could not be opened.
    #[error("io engine failed")]
    Engine(#[source] io::Error),
}

/// What a request in flight was, to build its reply.
#[derive(Debug)]
struct Pending {
    cookie: u64,
    command: Command,
    offset_bytes: u64,
    len_bytes: u32,
    started: Instant,
    /// Admitted through the export's write gate: leaves it through the write trap.
    gated: bool,
    /// A gated write's admission into the durable trackers' activity logs, dropped after
    /// the trap marked it (or at once if it never reached the engine).
    admission: Admission,
}

/// Opens the engine for a route (the session's connection is watched for readability).
pub struct EngineFactory(pub Box<OpenEngine>);

/// The function behind an [`EngineFactory`].
pub type OpenEngine = dyn Fn(&Route, &Conn) -> Result<Box<dyn BlockIo>, std::io::Error> + Send;

impl std::fmt::Debug for EngineFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EngineFactory")
    }
}

/// Why a session stopped dispatching before the receive buffer was empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stall {
    /// The export's route changed: drain, then reopen the engine.
    Route,
    /// Writes are held (a switchover): wait for the release.
    Held,
    /// The byte budget is spent: wait for buffers to come back.
    Budget,
}

/// Limits of one session (the agent's `[agent.limits]`).
#[derive(Debug)]
pub struct SessionLimits {
    /// Buffers of this connection, bounded by its budget and the agent's.
    pub pool: BufPool,
    /// Time from a request's first byte to its last (header and WRITE payload).
    pub request_deadline: Duration,
    /// Longest a reply write may make no progress (a client that stopped reading).
    pub reply_deadline: Duration,
}

/// The state of one connection after the handshake.
#[derive(Debug)]
pub struct Session {
    conn: Conn,
    export: Arc<Export>,
    engine: Box<dyn BlockIo>,
    structured: bool,
    contexts: Vec<(u32, String)>,
    rx: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    tx: TxQueue,
    slots: Vec<Option<Pending>>,
    free_slots: Vec<u32>,
    pool: BufPool,
    completions: Vec<IoCompletion>,
    counts: CounterSnapshot,
    latency: LatencyRecorder,
    write_latency: LatencyRecorder,
    last_merge: Instant,
    closing: bool,
    factory: EngineFactory,
    /// Route generation the engine was opened for.
    route_gen: u64,
    /// The engine forwards to another agent (the local trackers no longer apply).
    forwarded: bool,
    stall: Option<Stall>,
    /// The request being dispatched was admitted through the write gate.
    gated_next: bool,
    /// Received whole, waiting for a slot, the gate, the route or a buffer.
    ready: Option<Ready>,
    /// A WRITE payload being received.
    incoming: Option<Incoming>,
    /// When the bytes after the last request taken began (the start of a partial header).
    request_started: Instant,
    request_deadline: Duration,
    /// The receive timeout set on the socket (None: none, an idle client may wait forever).
    read_timeout: Option<Duration>,
}

impl Session {
    /// A session on a negotiated connection; on failure the connection comes back (the
    /// caller may free resources and try again).
    pub fn new(
        conn: Conn,
        export: Arc<Export>,
        factory: EngineFactory,
        structured: bool,
        contexts: Vec<(u32, String)>,
        limits: SessionLimits,
    ) -> Result<Self, (SessionError, Conn)> {
        let timeouts = conn
            .set_write_timeout(Some(limits.reply_deadline))
            .and_then(|()| conn.set_read_timeout(None));
        if let Err(err) = timeouts {
            return Err((SessionError::Socket(err), conn));
        }
        let (route_gen, route) = export.route();
        let engine = match (factory.0)(&route, &conn) {
            Ok(engine) => engine,
            Err(err) => return Err((SessionError::Engine(err), conn)),
        };
        let capacity = engine.capacity();
        Ok(Session {
            conn,
            export,
            engine,
            structured,
            contexts,
            rx: vec![0; RX_BYTES],
            rx_start: 0,
            rx_end: 0,
            tx: TxQueue::new(),
            slots: (0..capacity).map(|_| None).collect(),
            free_slots: (0..capacity as u32).rev().collect(),
            pool: limits.pool,
            completions: Vec::with_capacity(capacity),
            counts: CounterSnapshot::default(),
            latency: LatencyRecorder::new(),
            write_latency: LatencyRecorder::new(),
            last_merge: Instant::now(),
            closing: false,
            factory,
            route_gen,
            forwarded: matches!(*route, Route::Forward { .. }),
            stall: None,
            gated_next: false,
            ready: None,
            incoming: None,
            request_started: Instant::now(),
            request_deadline: limits.request_deadline,
            read_timeout: None,
        })
    }

    /// Serves requests until the client disconnects (or the read side is shut down), then
    /// answers everything in flight.
    pub fn run(mut self) -> Result<(), SessionError> {
        let result = self.run_loop();
        self.drain();
        self.release_gate();
        self.publish(true);
        result
    }

    /// Requests the engine never handed back (it failed as a whole) go through the write
    /// trap as failed: counted as dirty and out of the gate, so a later switchover neither
    /// waits for them forever nor trusts their blocks.
    fn release_gate(&mut self) {
        let mut trap = self.export.write_trap(self.forwarded);
        for pending in self.slots.iter_mut().filter_map(Option::take) {
            if pending.gated {
                let len = u64::from(pending.len_bytes);
                trap.completed(
                    pending.offset_bytes,
                    len,
                    WriteOutcome::Failed,
                    &pending.admission,
                );
            }
        }
        trap.finish();
    }

    fn run_loop(&mut self) -> Result<(), SessionError> {
        loop {
            if self.stall.is_some() && self.engine.in_flight() == 0 {
                self.unstall()?;
                continue;
            }
            let mut dispatched = 0;
            if !self.closing && !self.free_slots.is_empty() {
                let idle = self.engine.in_flight() == 0;
                if self.awaits_payload() {
                    self.fill_payload(idle)?;
                } else if self.ready.is_none() && self.rx_end - self.rx_start < REQUEST_BYTES {
                    self.fill(idle)?;
                }
                dispatched = self.dispatch_all()?;
            }
            if self.closing && self.engine.in_flight() == 0 {
                return self
                    .tx
                    .flush(&mut self.conn, &mut self.pool)
                    .map_err(SessionError::Socket);
            }
            let waiting = self.engine.in_flight() > 0;
            let mut min_complete =
                usize::from(waiting && (dispatched == 0 || self.free_slots.is_empty()));
            let can_take = !self.closing && self.stall.is_none() && !self.free_slots.is_empty();
            if min_complete > 0 && can_take && self.conn.has_buffered_input() {
                // TLS: requests already decrypted in this process do not make the socket
                // readable, so waiting for it (or for the disk) would leave them unread.
                min_complete = 0;
            }
            if min_complete > 0 && can_take {
                // Wait for the disk and for the next request at once: a request arriving
                // while the disk is busy is submitted now, not after the next completion.
                self.engine.arm_readable();
            }
            self.engine
                .complete(min_complete, &mut self.completions)
                .map_err(|err| SessionError::Engine(err.into()))?;
            self.reply_completions();
            self.tx
                .flush(&mut self.conn, &mut self.pool)
                .map_err(SessionError::Socket)?;
            self.publish(false);
        }
    }

    /// Resolves a stall once nothing is in flight: reopens the engine for the new route, or
    /// waits a little for held writes to be released.
    fn unstall(&mut self) -> Result<(), SessionError> {
        self.tx
            .flush(&mut self.conn, &mut self.pool)
            .map_err(SessionError::Socket)?;
        match self.stall.take() {
            Some(Stall::Route) => {
                let (generation, route) = self.export.route();
                let engine = (self.factory.0)(&route, &self.conn).map_err(|err| {
                    log::error!(
                        "export {}: cannot open the engine for {route:?}: {err}",
                        self.export.name()
                    );
                    SessionError::Engine(err)
                })?;
                log::info!(
                    "export {}: connection now served by {route:?}",
                    self.export.name()
                );
                self.engine = engine;
                self.route_gen = generation;
                self.forwarded = matches!(*route, Route::Forward { .. });
            }
            Some(Stall::Held) => {
                self.export.wait_released(Duration::from_millis(10));
            }
            Some(Stall::Budget) => {
                // Nothing of this connection is out (all flushed): other connections hold
                // the agent's budget.
                self.pool.wait_budget(Duration::from_millis(10));
            }
            None => {}
        }
        Ok(())
    }

    /// A reset from the peer is an ordinary end; other errors are reported.
    fn socket_closed(&mut self, err: io::Error) -> SessionError {
        self.closing = true;
        SessionError::Socket(err)
    }

    /// Dispatches every request received whole while slots, the gate, the route and the
    /// budget allow.
    fn dispatch_all(&mut self) -> Result<usize, SessionError> {
        // Each stall is found again below if its cause remains.
        self.stall = None;
        let mut dispatched = 0;
        while !self.closing && !self.free_slots.is_empty() {
            if self.ready.is_none() && !self.receive_next()? {
                break;
            }
            let Some(ready) = self.ready.take() else {
                continue; // a refused WRITE, answered
            };
            let header = ready.header;
            if self.export.route_generation() != self.route_gen {
                self.ready = Some(ready);
                self.stall = Some(Stall::Route);
                break;
            }
            let writes = matches!(
                header.command,
                wire::CMD_WRITE | wire::CMD_TRIM | wire::CMD_WRITE_ZEROES
            );
            let mut payload = ready.payload;
            if header.command == wire::CMD_READ && self.validate(&header).is_ok() {
                let len = read_buf_len(header.offset_bytes, header.length_bytes);
                payload = self.pool.try_take(len);
                if payload.is_none() {
                    self.ready = Some(Ready { header, payload });
                    self.stall = Some(Stall::Budget);
                    break;
                }
            }
            // After the payload was read: the gate is never held across a socket read.
            if writes && !self.export.enter_write() {
                self.ready = Some(Ready { header, payload });
                self.stall = Some(Stall::Held);
                break;
            }
            self.gated_next = writes;
            let result = self.dispatch(&header, payload);
            if std::mem::take(&mut self.gated_next) {
                // Answered without reaching the engine (refused, or an error).
                self.export.write_not_started();
            }
            result?;
            dispatched += 1;
        }
        Ok(dispatched)
    }

    fn validate(&self, header: &RequestHeader) -> Result<Command, NbdErrno> {
        wire::validate(header, &self.export_info_cached(), self.structured)
    }

    /// Dispatches one request received whole; `payload`: a WRITE's data, or a READ's buffer.
    fn dispatch(
        &mut self,
        header: &RequestHeader,
        payload: Option<AlignedBuf>,
    ) -> Result<(), SessionError> {
        let command = match self.validate(header) {
            Ok(command) => command,
            Err(errno) => {
                if let Some(buf) = payload {
                    self.pool.give(buf);
                }
                self.reply_error(header.cookie, errno);
                return Ok(());
            }
        };
        let (Command::Read | Command::Write, Some(buf)) = (command, payload) else {
            self.dispatch_bufferless(header, command);
            return Ok(());
        };
        let kind = match command {
            Command::Read => IoKind::Read,
            _ => IoKind::Write { fua: header.fua() },
        };
        self.submit(header, command, kind, Some(buf));
        Ok(())
    }

    /// Dispatches a request that carries no buffer (a READ or WRITE here is a bug: answered
    /// EIO rather than trusted).
    fn dispatch_bufferless(&mut self, header: &RequestHeader, command: Command) {
        match command {
            Command::Disc => self.closing = true,
            Command::BlockStatus => self.block_status(header),
            Command::Read | Command::Write => {
                log::error!(
                    "export {}: {command:?} without a buffer",
                    self.export.name()
                );
                self.reply_error(header.cookie, NbdErrno::Io);
            }
            Command::Flush => self.submit(header, command, IoKind::Flush, None),
            Command::Trim => self.submit(header, command, IoKind::Trim { fua: header.fua() }, None),
            Command::WriteZeroes => {
                if header.fast_zero() && header.no_hole() {
                    // Zeroing without holes means writing every byte: not fast here.
                    self.reply_error(header.cookie, NbdErrno::NotSup);
                    return;
                }
                let kind = IoKind::WriteZeroes {
                    may_trim: !header.no_hole(),
                    fua: header.fua(),
                };
                self.submit(header, command, kind, None);
            }
        }
    }

    /// The export's size and flags as the handshake advertised them. Recomputed cheaply: the
    /// fields `validate` reads do not change while the export is served.
    fn export_info_cached(&self) -> wire::ExportInfo {
        wire::ExportInfo {
            name: String::new(),
            description: String::new(),
            size_bytes: self.export.size_bytes(),
            read_only: self.export.read_only(),
            multi_conn: true,
            can_trim: !self.export.read_only(),
            can_fast_zero: !self.export.read_only(),
            block_min: 1,
            block_preferred: BLOCK_PREFERRED_BYTES,
            block_max: BLOCK_MAX_BYTES,
            meta_contexts: Vec::new(),
        }
    }

    fn submit(
        &mut self,
        header: &RequestHeader,
        command: Command,
        kind: IoKind,
        buf: Option<AlignedBuf>,
    ) {
        let slot = self
            .free_slots
            .pop()
            .expect("dispatch checks for a free slot");
        let gated = std::mem::take(&mut self.gated_next);
        // Before the write reaches the image: its extents are open in every durable
        // tracker's activity log (a forwarded write lives at the destination).
        let admission = if gated && !self.forwarded {
            self.export
                .trackers()
                .admit(header.offset_bytes, u64::from(header.length_bytes))
        } else {
            Admission::none()
        };
        self.slots[slot as usize] = Some(Pending {
            cookie: header.cookie,
            command,
            offset_bytes: header.offset_bytes,
            len_bytes: header.length_bytes,
            started: Instant::now(),
            gated,
            admission,
        });
        let request = IoRequest {
            tag: u64::from(slot),
            kind,
            offset_bytes: header.offset_bytes,
            len_bytes: header.length_bytes,
            buf,
        };
        if let Err((err, request)) = self.engine.submit(request) {
            log::warn!(
                "export {}: io engine refused a request: {err}",
                self.export.name()
            );
            let refused = self.slots[slot as usize].take().expect("filled above");
            if refused.gated {
                self.export.write_not_started();
            }
            self.free_slots.push(slot);
            if let Some(buf) = request.buf {
                self.pool.give(buf);
            }
            self.reply_error(header.cookie, NbdErrno::Io);
        }
    }

    fn reply_error(&mut self, cookie: u64, errno: NbdErrno) {
        let out = self.tx.header_bytes();
        if self.structured {
            wire::encode_error_chunk(out, cookie, errno, true);
        } else {
            wire::encode_simple_reply(out, cookie, errno as u32);
        }
    }

    fn reply_ok(&mut self, cookie: u64) {
        wire::encode_simple_reply(self.tx.header_bytes(), cookie, 0);
    }

    fn block_status(&mut self, header: &RequestHeader) {
        let contexts = std::mem::take(&mut self.contexts);
        let result = blockstatus::encode_reply(
            &self.export,
            &contexts,
            header,
            self.forwarded,
            self.tx.header_bytes(),
        );
        self.contexts = contexts;
        if let Err(errno) = result {
            self.reply_error(header.cookie, errno);
        }
    }

    fn reply_completions(&mut self) {
        self.trap_writes();
        let mut completions = std::mem::take(&mut self.completions);
        let now = Instant::now();
        for completion in completions.drain(..) {
            let slot = completion.tag as usize;
            let pending = self.slots[slot]
                .take()
                .expect("completion for an empty slot");
            self.free_slots.push(slot as u32);
            let latency_us = now.duration_since(pending.started).as_micros() as u64;
            self.latency.record_us(latency_us);
            if pending.gated {
                self.write_latency.record_us(latency_us);
            }
            self.reply_one(pending, completion);
        }
        self.completions = completions;
    }

    /// Hands every completed gated write of this batch to the export's write trap, which
    /// marks, mirrors and lets them leave the gate before any of them is answered.
    fn trap_writes(&mut self) {
        let mut trap = self.export.write_trap(self.forwarded);
        for completion in &self.completions {
            let Some(pending) = self.slots[completion.tag as usize].as_ref() else {
                continue;
            };
            if !pending.gated {
                continue;
            }
            let (offset_bytes, len_bytes) = (pending.offset_bytes, u64::from(pending.len_bytes));
            let outcome = match (&completion.result, pending.command) {
                (Err(_), _) => WriteOutcome::Failed,
                (Ok(()), Command::Write) => WriteOutcome::Written(
                    completion
                        .buf
                        .as_ref()
                        .map(|buf| &buf.as_slice()[..len_bytes as usize]),
                ),
                (Ok(()), Command::WriteZeroes) => WriteOutcome::Zeroed,
                (Ok(()), _) => WriteOutcome::Trimmed,
            };
            trap.completed(offset_bytes, len_bytes, outcome, &pending.admission);
        }
        trap.finish();
    }

    fn reply_one(&mut self, pending: Pending, completion: IoCompletion) {
        if let Err(err) = completion.result {
            if let Some(buf) = completion.buf {
                self.pool.give(buf);
            }
            log::debug!(
                "export {}: {:?} failed: {err}",
                self.export.name(),
                pending.command
            );
            self.reply_error(pending.cookie, errno_of(&err));
            return;
        }
        let len = u64::from(pending.len_bytes);
        match pending.command {
            Command::Read => {
                self.counts.read_ops += 1;
                self.counts.read_bytes += len;
                let buf = completion.buf.expect("a read hands its buffer back");
                let start = completion.data_start;
                let out = self.tx.header_bytes();
                if self.structured {
                    wire::encode_offset_data_header(
                        out,
                        pending.cookie,
                        pending.offset_bytes,
                        pending.len_bytes,
                        true,
                    );
                } else {
                    wire::encode_simple_reply(out, pending.cookie, 0);
                }
                self.tx
                    .push_data(buf, start, start + pending.len_bytes as usize);
                return;
            }
            Command::Write => {
                self.counts.write_ops += 1;
                self.counts.write_bytes += len;
            }
            Command::Trim => {
                self.counts.trim_ops += 1;
            }
            Command::WriteZeroes => {
                self.counts.zero_ops += 1;
            }
            Command::Flush => self.counts.flush_ops += 1,
            Command::Disc | Command::BlockStatus => {}
        }
        if let Some(buf) = completion.buf {
            self.pool.give(buf);
        }
        self.reply_ok(pending.cookie);
    }

    /// Waits for everything in flight and answers it (best effort: the socket may be gone).
    fn drain(&mut self) {
        while self.engine.in_flight() > 0 {
            if let Err(err) = self.engine.complete(1, &mut self.completions) {
                log::error!("export {}: draining io failed: {err}", self.export.name());
                break;
            }
            self.reply_completions();
        }
        let _ = self.tx.flush(&mut self.conn, &mut self.pool);
    }

    /// Adds local counts to the export's; merges latency every [`MERGE_EVERY`] or when `final_`.
    fn publish(&mut self, final_: bool) {
        self.export.add_counts(&std::mem::take(&mut self.counts));
        if final_ || self.last_merge.elapsed() >= MERGE_EVERY {
            self.export
                .merge_latency(&mut self.latency, &mut self.write_latency);
            self.last_merge = Instant::now();
        }
    }
}

/// The NBD error a failed request reports.
fn errno_of(err: &io::Error) -> NbdErrno {
    match err.raw_os_error() {
        Some(libc_errno) if libc_errno == nix::libc::ENOSPC || libc_errno == nix::libc::EDQUOT => {
            NbdErrno::NoSpc
        }
        Some(e) if e == nix::libc::EPERM || e == nix::libc::EROFS || e == nix::libc::EACCES => {
            NbdErrno::Perm
        }
        Some(e) if e == nix::libc::EINVAL => NbdErrno::Inval,
        Some(e) if e == nix::libc::ENOMEM => NbdErrno::NoMem,
        Some(e) if e == nix::libc::EOPNOTSUPP => NbdErrno::NotSup,
        _ => NbdErrno::Io,
    }
}
