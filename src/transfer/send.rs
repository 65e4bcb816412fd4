//! The source side of a block stream: connect, authenticate, open a target, then send
//! extents read from the source disk, sync and commit.
//!
//! Pipeline of [`Sender::send_extents`]: up to `read_depth` chunks' worth of reads in flight on an
//! io engine (io_uring + O_DIRECT when the kernel has it) while earlier chunks go out on the
//! socket, so disk and network overlap. Chunks are emitted in offset order whatever order
//! the reads complete in; a chunk of zeros becomes (part of) one `Zero` frame, any other chunk
//! a `Data` frame whose payload is written straight from the aligned read buffer.
//!
//! A reader thread takes the destination's frames off the socket into a bounded channel: the
//! send loop notices an `Error` frame between chunks (and stops), and `sync`/`commit` wait on
//! the channel with a timeout.
//!
//! While a migration mirrors guest writes ([`Sender::mirror_link`]), the stream's writer is
//! shared with the export's sessions ([`super::outbound`]): each read remembers the mirror
//! sequence number from before it was submitted, and its chunk is sent without the ranges
//! mirrored since (those are at the destination already, newer); zero runs are not coalesced
//! across chunks then, so each chunk is carved and sent under one writer lock.
//!
//! Invariants:
//! - Every count in [`SendStats`] is incremented when the bytes were handed to the socket.
//! - Reads in flight plus reads completed but not yet sent hold at most `read_depth` full
//!   chunks' bytes (one read always may): shorter reads go more at a time ([`pump`]).

use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use ferry_sys::{DirectFile, DIRECT_ALIGN};

use super::frame::{self, Frame, Role, TargetSpec, TargetState};
use super::link::{self, read_frame, unexpected, write_frame};
use super::outbound::{FenceError, MirrorLink, Outbound};
use super::{ClusterKey, Pacer, TransferError};
use crate::env::{Clock, MonotonicClock};
use crate::io::{probe_uring, EngineKind};
use crate::nbd::bufpool::BufPool;

mod pump;

use pump::MIRROR_CHUNK_BYTES;

/// How a [`Sender`] behaves.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// Bandwidth cap of the stream (None: uncapped).
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Source reads in flight.
    pub read_depth: usize,
    /// Largest read (and Data frame); rounded down to 4 KiB, at most 8 MiB.
    pub chunk_bytes: usize,
    /// TCP connect timeout.
    pub connect_timeout_ms: u64,
    /// How long to wait for an answer (OpenOk, SyncOk, CommitOk) or a blocked socket write.
    pub reply_timeout_ms: u64,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            bandwidth_bytes_per_s: None,
            read_depth: 8,
            chunk_bytes: 1 << 20,
            connect_timeout_ms: 10_000,
            reply_timeout_ms: 300_000,
        }
    }
}

/// The destination's answer to Open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReply {
    /// Where the destination serves NBD over TCP, if it does.
    pub nbd_tcp: Option<String>,
    /// The destination's seeded image was written outside ferry: compare, do not trust.
    pub changed_outside: bool,
}

/// What one [`Sender::send_extents`] call put on the wire (measured).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Payload bytes of Data frames.
    pub data_bytes: u64,
    /// Bytes covered by Zero frames (not sent as data).
    pub zero_bytes: u64,
    /// Data frames sent.
    pub data_frames: u64,
    /// Zero frames sent.
    pub zero_frames: u64,
    /// Every byte written to the socket (headers included).
    pub wire_bytes: u64,
    /// Wall time of the call.
    pub elapsed_ns: u64,
}

impl SendStats {
    fn add(&mut self, other: &SendStats) {
        self.data_bytes += other.data_bytes;
        self.zero_bytes += other.zero_bytes;
        self.data_frames += other.data_frames;
        self.zero_frames += other.zero_frames;
        self.wire_bytes += other.wire_bytes;
        self.elapsed_ns += other.elapsed_ns;
    }
}

/// The source end of one block stream.
#[derive(Debug)]
pub struct Sender {
    out: Arc<Outbound>,
    /// A [`MirrorLink`] is out: chunks are carved against mirrored writes.
    mirroring: bool,
    replies: Receiver<Result<Frame, TransferError>>,
    reader: Option<JoinHandle<()>>,
    options: SendOptions,
    engine_kind: EngineKind,
    pacer: Pacer,
    clock: MonotonicClock,
    scratch: Vec<u8>,
    pool: BufPool,
    next_seq: u64,
    /// Sums of every `send_extents` call, failed ones included.
    totals: SendStats,
}

impl Sender {
    /// Connects to the destination at `addr`, authenticates with `key` and opens `spec`.
    pub fn connect(
        addr: SocketAddr,
        key: &ClusterKey,
        spec: &TargetSpec,
        options: SendOptions,
    ) -> Result<(Sender, OpenReply), TransferError> {
        if let Err(err) = crate::name::validate(&spec.export) {
            return Err(TransferError::Refused {
                reason: err.to_string(),
            });
        }
        let timeout = Duration::from_millis(options.connect_timeout_ms.max(1));
        let stream = TcpStream::connect_timeout(&addr, timeout).map_err(TransferError::Connect)?;
        let reply_timeout = Some(Duration::from_millis(options.reply_timeout_ms.max(1)));
        stream.set_nodelay(true).map_err(TransferError::Socket)?;
        stream
            .set_read_timeout(reply_timeout)
            .map_err(TransferError::Socket)?;
        stream
            .set_write_timeout(reply_timeout)
            .map_err(TransferError::Socket)?;
        let mut link = link::authenticate(stream, key, Role::Source)?;
        let mut scratch = Vec::new();
        write_frame(&mut link, &Frame::Open(spec.clone()), &mut scratch)?;
        let reply = match read_frame(&mut link, &mut Vec::new())? {
            Frame::OpenOk {
                nbd_tcp,
                changed_outside,
            } => OpenReply {
                nbd_tcp,
                changed_outside,
            },
            other => return Err(unexpected(other, "OpenOk")),
        };
        // From here the reader thread waits for answers as long as it takes; callers wait on
        // the channel with their own timeout.
        let (stream, link_tx, link_rx) = link.into_parts();
        stream
            .set_read_timeout(None)
            .map_err(TransferError::Socket)?;
        let reader_stream = stream.try_clone().map_err(TransferError::Socket)?;
        let out = Arc::new(Outbound::new(stream, link_tx));
        let (tx, replies) = crossbeam_channel::bounded(16);
        let reader_out = Arc::clone(&out);
        let reader = std::thread::Builder::new()
            .name("ferry-send-rx".into())
            .spawn(move || read_replies(reader_stream, link_rx, tx, &reader_out))
            .map_err(TransferError::Spawn)?;
        let engine_kind = if probe_uring().is_ok() {
            EngineKind::Uring
        } else {
            log::info!("io_uring unavailable: the sender reads with the sync engine");
            EngineKind::Sync
        };
        let sender = Sender {
            out,
            mirroring: false,
            replies,
            reader: Some(reader),
            pacer: Pacer::new(options.bandwidth_bytes_per_s),
            options,
            engine_kind,
            clock: MonotonicClock::new(),
            scratch,
            pool: BufPool::new(),
            next_seq: 1,
            totals: SendStats::default(),
        };
        Ok((sender, reply))
    }

    /// Sends `extents` (offset, length) of `file`: zeros as Zero frames, the rest as Data.
    /// Extents must lie inside the file; only one ending at the end of the file may be
    /// unaligned.
    pub fn send_extents(
        &mut self,
        file: &Arc<DirectFile>,
        extents: &[(u64, u64)],
    ) -> Result<SendStats, TransferError> {
        let cap = self.pacer.bytes_per_s();
        self.send_extents_paced(file, extents, &mut |_| cap)
    }

    /// [`Sender::send_extents`], telling `on_chunk` the bytes of each chunk once it is sent
    /// (or joined to a run of zeros still to be sent); its answer is the bandwidth cap from
    /// the next chunk on. A caller whose pace changes while it sends (a share among jobs)
    /// follows it chunk by chunk, and the reads stay in flight across the whole call: no
    /// need to cut a send into pieces, each draining the pipeline.
    pub fn send_extents_paced(
        &mut self,
        file: &Arc<DirectFile>,
        extents: &[(u64, u64)],
        on_chunk: &mut dyn FnMut(u64) -> Option<u64>,
    ) -> Result<SendStats, TransferError> {
        let started_ns = self.clock.now_ns();
        let size_bytes = file.size_bytes().map_err(TransferError::SourceRead)?;
        for &(offset_bytes, len_bytes) in extents {
            if offset_bytes
                .checked_add(len_bytes)
                .is_none_or(|end| end > size_bytes)
            {
                return Err(TransferError::OutOfRange {
                    offset_bytes,
                    len_bytes,
                });
            }
        }
        // While mirroring, smaller chunks keep the writer lock (which guest writes wait for)
        // short.
        let chunk_limit = if self.mirroring {
            self.options.chunk_bytes.min(MIRROR_CHUNK_BYTES)
        } else {
            self.options.chunk_bytes
        };
        let chunk_bytes = (chunk_limit / DIRECT_ALIGN * DIRECT_ALIGN)
            .clamp(DIRECT_ALIGN, frame::MAX_DATA_BYTES) as u64;
        let mut chunks = extents.iter().flat_map(|&(offset_bytes, len_bytes)| {
            (0..len_bytes.div_ceil(chunk_bytes)).map(move |index| {
                let start = offset_bytes + index * chunk_bytes;
                let len = (offset_bytes + len_bytes - start).min(chunk_bytes);
                (start, u32::try_from(len).expect("chunk_bytes ≤ 8 MiB"))
            })
        });
        let mut stats = SendStats::default();
        let outcome = self.pump(file, &mut chunks, on_chunk, &mut stats);
        stats.elapsed_ns = self.clock.now_ns() - started_ns;
        self.totals.add(&stats);
        outcome.map(|()| stats).map_err(|err| self.explain(err))
    }

    /// Hands out the stream's mirror face: from now on the export's sessions may write
    /// mirrored guest writes into the stream, and chunks are carved against them.
    pub fn mirror_link(&mut self) -> MirrorLink {
        self.mirroring = true;
        MirrorLink::new(Arc::clone(&self.out))
    }

    /// Mirroring is over (the export no longer feeds the link): chunks go out uncarved again.
    pub fn end_mirroring(&mut self) {
        self.mirroring = false;
    }

    /// Guest write bytes mirrored into this stream so far.
    pub fn mirrored_bytes(&self) -> u64 {
        self.out.mirrored_bytes()
    }

    /// What this stream has sent so far, over every `send_extents` call including failed
    /// ones (what was handed to the socket before the failure counts).
    pub fn totals(&self) -> SendStats {
        self.totals
    }

    /// Paces and writes a frame without payload; returns its size on the wire.
    fn send_frame(&mut self, frame: &Frame) -> Result<u64, TransferError> {
        self.scratch.clear();
        frame::encode(frame, &mut self.scratch);
        let wire_bytes = self.scratch.len() as u64;
        self.pace(wire_bytes);
        self.out.lock().write_frame(frame)?;
        Ok(wire_bytes)
    }

    /// Sleeps as long as the bandwidth cap requires before `wire_bytes` go out.
    fn pace(&mut self, wire_bytes: u64) {
        let delay = self.pacer.delay_now(wire_bytes, &self.clock);
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
    }

    /// Tells the destination that a range was discarded at the source.
    pub fn send_trim(&mut self, offset_bytes: u64, len_bytes: u64) -> Result<(), TransferError> {
        if len_bytes == 0 {
            return Ok(());
        }
        let frame = Frame::Trim {
            offset_bytes,
            len_bytes,
        };
        self.send_frame(&frame)
            .map(|_| ())
            .map_err(|err| self.explain(err))
    }

    /// Waits until the destination has written (not synced) everything sent so far: the
    /// cheap acknowledgement between passes; [`Sender::sync`] and the commit make it durable.
    pub fn fence(&mut self) -> Result<(), TransferError> {
        let timeout = Duration::from_millis(self.options.reply_timeout_ms.max(1));
        match self.out.fence(timeout) {
            Ok(()) => self.check_peer(),
            Err(err) => Err(self.fence_error(err)),
        }
    }

    #[cold]
    fn fence_error(&mut self, err: FenceError) -> TransferError {
        match err {
            FenceError::Write(err) => self.explain(err),
            FenceError::Closed => self.explain(peer_gone()),
            FenceError::Timeout => TransferError::Timeout(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no FenceOk from the destination",
            )),
        }
    }

    /// Waits until the destination has written and fdatasynced everything sent so far;
    /// returns the blocks it has received on this stream.
    pub fn sync(&mut self) -> Result<u64, TransferError> {
        let seq = self.take_seq();
        self.send_frame(&Frame::Sync { seq })
            .map_err(|err| self.explain(err))?;
        match self.wait_reply("SyncOk")? {
            Frame::SyncOk {
                seq: answered,
                received_blocks,
            } if answered == seq => Ok(received_blocks),
            other => Err(unexpected(other, "SyncOk")),
        }
    }

    /// Syncs, then has the destination commit the target: after Ok the destination is
    /// authoritative for the disk. `manager_epoch`: the epoch the job commits under, if a
    /// manager started it (see [`TargetSpec::manager_epoch`]).
    pub fn commit(&mut self, manager_epoch: Option<u64>) -> Result<(), TransferError> {
        let seq = self.take_seq();
        self.send_frame(&Frame::Commit { seq, manager_epoch })
            .map_err(|err| self.explain(err))?;
        match self.wait_reply("CommitOk")? {
            Frame::CommitOk { seq: answered } if answered == seq => Ok(()),
            other => Err(unexpected(other, "CommitOk")),
        }
    }

    /// Syncs, then has the destination record an in-sync point of its seeded image at
    /// `at_unix_ms`; after Ok the point is durable there.
    pub fn mark_in_sync(&mut self, at_unix_ms: u64) -> Result<(), TransferError> {
        let seq = self.take_seq();
        self.send_frame(&Frame::Mark { seq, at_unix_ms })
            .map_err(|err| self.explain(err))?;
        match self.wait_reply("MarkOk")? {
            Frame::MarkOk { seq: answered } if answered == seq => Ok(()),
            other => Err(unexpected(other, "MarkOk")),
        }
    }

    /// BLAKE3 digests of the destination's blocks `first_block..first_block + count` of
    /// `block_bytes` (the last clipped to the disk), in windows the frame can carry.
    pub fn digests(
        &mut self,
        first_block: u64,
        count: u64,
        block_bytes: u32,
    ) -> Result<Vec<[u8; 32]>, TransferError> {
        let mut digests = Vec::new();
        let mut block = first_block;
        while block < first_block + count {
            let window = (first_block + count - block).min(u64::from(frame::MAX_DIGESTS));
            let seq = self.take_seq();
            let asked = Frame::Digests {
                seq,
                offset_bytes: block * u64::from(block_bytes),
                block_bytes,
                count: u32::try_from(window).expect("≤ MAX_DIGESTS"),
            };
            self.send_frame(&asked).map_err(|err| self.explain(err))?;
            match self.wait_reply("DigestsOk")? {
                Frame::DigestsOk {
                    seq: answered,
                    digests: some,
                } if answered == seq => digests.extend(some),
                other => return Err(unexpected(other, "DigestsOk")),
            }
            block += window;
        }
        Ok(digests)
    }

    /// Changes how the next [`Sender::send_extents`] reads: `read_depth` reads in flight of
    /// at most `chunk_bytes` each (a guest request queued behind the copy waits for fewer,
    /// shorter reads).
    pub fn set_read_shape(&mut self, read_depth: usize, chunk_bytes: usize) {
        self.options.read_depth = read_depth.clamp(1, 64);
        self.options.chunk_bytes = chunk_bytes.clamp(DIRECT_ALIGN, frame::MAX_DATA_BYTES);
    }

    /// Changes the bandwidth cap from the next frame on (None: uncapped).
    pub fn set_bandwidth(&mut self, bytes_per_s: Option<u64>) {
        if self.pacer.bytes_per_s() != bytes_per_s {
            self.pacer = Pacer::new(bytes_per_s);
        }
    }

    /// Has the destination write everything sent so far and hash its whole target image;
    /// returns that BLAKE3 digest.
    pub fn verify(&mut self) -> Result<[u8; 32], TransferError> {
        let seq = self.take_seq();
        self.send_frame(&Frame::Verify { seq })
            .map_err(|err| self.explain(err))?;
        match self.wait_reply("VerifyOk")? {
            Frame::VerifyOk {
                seq: answered,
                digest,
            } if answered == seq => Ok(digest),
            other => Err(unexpected(other, "VerifyOk")),
        }
    }

    /// Asks the destination to drop the target, and waits (bounded) until it has.
    pub fn abort(mut self) -> Result<(), TransferError> {
        self.send_frame(&Frame::Abort)
            .map_err(|err| self.explain(err))?;
        match self.wait_reply("Abort")? {
            Frame::Abort => Ok(()),
            other => Err(unexpected(other, "Abort")),
        }
    }

    fn take_seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq - 1
    }

    fn wait_reply(&mut self, expected: &'static str) -> Result<Frame, TransferError> {
        let timeout = Duration::from_millis(self.options.reply_timeout_ms.max(1));
        match self.replies.recv_timeout(timeout) {
            Ok(reply) => reply,
            Err(RecvTimeoutError::Timeout) => Err(TransferError::Timeout(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no {expected} from the destination"),
            ))),
            Err(RecvTimeoutError::Disconnected) => Err(peer_gone()),
        }
    }

    /// Fails fast when the destination has already stopped the stream.
    fn check_peer(&mut self) -> Result<(), TransferError> {
        match self.replies.try_recv() {
            Ok(Ok(frame)) => Err(unexpected(frame, "nothing")),
            Ok(Err(err)) => Err(err),
            Err(_) => Ok(()),
        }
    }

    /// A socket error while sending usually means the destination stopped: if it said why
    /// (an Error frame the reader thread has or will soon have), that reason wins.
    #[cold]
    fn explain(&mut self, err: TransferError) -> TransferError {
        if !matches!(
            err,
            TransferError::PeerGone(_) | TransferError::Socket(_) | TransferError::Timeout(_)
        ) {
            return err;
        }
        match self.replies.recv_timeout(Duration::from_secs(2)) {
            Ok(Err(
                reason @ (TransferError::Remote { .. }
                | TransferError::Refused { .. }
                | TransferError::Digest { .. }
                | TransferError::Auth { .. }),
            )) => reason,
            _ => err,
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.out.shutdown();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// What a destination said about a job ([`query_target`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryAnswer {
    /// The job's state there.
    pub state: TargetState,
    /// Blocks durably received there.
    pub received_blocks: u64,
    /// Where it serves NBD over TCP.
    pub nbd_tcp: Option<String>,
}

/// Asks the destination agent at `addr` what its journal says about `job_id` (see
/// [`Frame::Query`]).
pub fn query_target(
    addr: SocketAddr,
    key: &ClusterKey,
    job_id: u64,
    finalize: bool,
    timeout: Duration,
) -> Result<QueryAnswer, TransferError> {
    let mut stream = link::dial_authenticated(addr, key, timeout)?;
    write_frame(
        &mut stream,
        &Frame::Query { job_id, finalize },
        &mut Vec::new(),
    )?;
    match read_frame(&mut stream, &mut Vec::new())? {
        Frame::QueryOk {
            job_id: answered,
            state,
            received_blocks,
            nbd_tcp,
        } if answered == job_id => Ok(QueryAnswer {
            state,
            received_blocks,
            nbd_tcp,
        }),
        Frame::Error {
            code,
            offset_bytes,
            message,
        } => Err(TransferError::from_remote(code, offset_bytes, message)),
        other => Err(unexpected(other, "QueryOk")),
    }
}

/// The reader thread: forwards the destination's frames until the socket closes.
fn read_replies(
    mut stream: TcpStream,
    mut link_rx: link::Rx,
    tx: crossbeam_channel::Sender<Result<Frame, TransferError>>,
    out: &Outbound,
) {
    read_until_closed(&mut stream, &mut link_rx, &tx, out);
    out.close();
}

/// Fence answers go to the mirror's waiters, every other frame to the channel.
fn read_until_closed(
    stream: &mut TcpStream,
    link_rx: &mut link::Rx,
    tx: &crossbeam_channel::Sender<Result<Frame, TransferError>>,
    out: &Outbound,
) {
    let mut meta = Vec::new();
    loop {
        let reply = link_rx.read_frame(stream, &mut meta);
        if let Ok(Frame::FenceOk { seq }) = reply {
            out.fence_answered(seq);
            continue;
        }
        let stop = match &reply {
            Ok(Frame::Error { .. }) | Err(_) => true,
            Ok(Frame::Data { .. }) => {
                let _ = tx.send(Err(TransferError::Unexpected {
                    expected: "a reply",
                    got: "Data",
                }));
                return;
            }
            Ok(_) => false,
        };
        // An Error frame is delivered as the error it stands for.
        let reply = match reply {
            Ok(Frame::Error {
                code,
                offset_bytes,
                message,
            }) => Err(TransferError::from_remote(code, offset_bytes, message)),
            other => other,
        };
        if tx.send(reply).is_err() || stop {
            return;
        }
    }
}

#[cold]
fn peer_gone() -> TransferError {
    TransferError::PeerGone(std::io::Error::new(
        std::io::ErrorKind::UnexpectedEof,
        "the destination closed the stream",
    ))
}
