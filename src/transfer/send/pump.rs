//! The read → send pipeline of [`Sender::send_extents`]: reads of the next chunks kept in
//! flight on an io engine while the chunks already read go out in offset order, zero runs
//! coalesced into `Zero` frames, and (while mirroring) each chunk carved against the guest
//! writes mirrored since its read was submitted, with a bounded window of fences.
//!
//! Invariants: the bytes of reads in flight plus chunks read but not yet sent never exceed
//! the read depth's worth of full chunks (`read_depth × chunk_bytes`; one read always may
//! go), nor [`MAX_READS`] reads: short reads (a later pass's scattered blocks) go as many
//! at a time as fit the disk time the depth allows, not one by one. A chunk's buffer goes
//! back to the pool once the chunk is on the wire.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_sys::{AlignedBuf, DirectFile, DIRECT_ALIGN};

use super::super::frame::{self, Frame};
use super::super::TransferError;
use super::{SendStats, Sender};
use crate::io::{open_engine, read_buf_len, IoCompletion, IoKind, IoRequest};

/// Most reads in flight, however short.
const MAX_READS: usize = 64;
/// Largest copy chunk while mirroring.
pub(super) const MIRROR_CHUNK_BYTES: usize = 256 << 10;
/// Copy bytes between two fences while mirroring.
const MIRROR_FENCE_BYTES: u64 = 1 << 20;
/// Fences the copy may have unanswered while mirroring.
const MIRROR_FENCES_AHEAD: usize = 2;

/// The copy's unanswered fences while mirroring.
#[derive(Debug, Default)]
struct FenceWindow {
    /// Copy bytes since the last fence.
    sent_bytes: u64,
    /// Seqs of fences not yet waited for, oldest first.
    pending: std::collections::VecDeque<u64>,
}

/// What may be read ahead of the sends: reads and their bytes.
#[derive(Debug, Clone, Copy)]
struct ReadBudget {
    reads: usize,
    bytes: u64,
}

impl ReadBudget {
    /// The budget of `read_depth` reads of `chunk_bytes`: their bytes, in as many shorter
    /// reads as fit (at least `read_depth`, at most [`MAX_READS`]).
    fn for_shape(read_depth: usize, chunk_bytes: usize) -> Self {
        let depth = read_depth.clamp(1, MAX_READS);
        let bytes = depth as u64 * chunk_bytes as u64;
        let short_reads = usize::try_from(bytes / DIRECT_ALIGN as u64).unwrap_or(MAX_READS);
        ReadBudget {
            reads: short_reads.clamp(depth, MAX_READS),
            bytes,
        }
    }

    /// Whether one more read of `len_bytes` may go while `reads` reads of `bytes` in all
    /// are in flight or waiting to be sent (the first always may).
    fn admits(self, reads: usize, bytes: u64, len_bytes: u32) -> bool {
        reads < self.reads && (reads == 0 || bytes + u64::from(len_bytes) <= self.bytes)
    }
}

/// The chunks still to read, the next one visible before it is taken.
type Chunks<'a> = std::iter::Peekable<&'a mut dyn Iterator<Item = (u64, u32)>>;

/// A run of zero chunks not yet sent.
#[derive(Debug, Clone, Copy)]
struct ZeroRun {
    offset_bytes: u64,
    len_bytes: u64,
}

/// A chunk read and waiting for its turn on the wire.
#[derive(Debug)]
struct ReadChunk {
    offset_bytes: u64,
    len_bytes: u32,
    /// Mirror sequence number sampled before the read was submitted.
    since_seq: u64,
    buf: AlignedBuf,
    data_start: usize,
}

impl Sender {
    /// The read → send loop of `send_extents`.
    pub(super) fn pump(
        &mut self,
        file: &Arc<DirectFile>,
        chunks: &mut dyn Iterator<Item = (u64, u32)>,
        on_chunk: &mut dyn FnMut(u64) -> Option<u64>,
        stats: &mut SendStats,
    ) -> Result<(), TransferError> {
        let budget = ReadBudget::for_shape(self.options.read_depth, self.options.chunk_bytes);
        let queue_depth = u32::try_from(budget.reads).expect("at most MAX_READS");
        let mut engine = open_engine(self.engine_kind, Arc::clone(file), queue_depth, None)
            .map_err(TransferError::Engine)?;
        if self.mirroring {
            self.out.set_copying(true);
        }
        let result = self.pump_reads(&mut *engine, chunks, on_chunk, stats, budget);
        if self.mirroring {
            self.out.set_copying(false);
        }
        result
    }

    fn pump_reads(
        &mut self,
        engine: &mut dyn crate::io::BlockIo,
        chunks: &mut dyn Iterator<Item = (u64, u32)>,
        on_chunk: &mut dyn FnMut(u64) -> Option<u64>,
        stats: &mut SendStats,
        budget: ReadBudget,
    ) -> Result<(), TransferError> {
        // Reads in flight (tag → range) and reads done but not yet sent (tag → chunk).
        let mut reading: BTreeMap<u64, (u64, u32, u64)> = BTreeMap::new();
        let mut ready: BTreeMap<u64, ReadChunk> = BTreeMap::new();
        let mut chunks = chunks.peekable();
        let (mut next_tag, mut next_emit) = (0u64, 0u64);
        let mut zero_run: Option<ZeroRun> = None;
        let mut done = Vec::with_capacity(budget.reads);
        let mut window = FenceWindow::default();
        // Reads in flight plus chunks ready only drop when a chunk is sent, so the first
        // reads are submitted here and each later one right after a send (below).
        self.refill(
            engine,
            &mut chunks,
            &mut reading,
            &ready,
            &mut next_tag,
            budget,
        )?;
        loop {
            if reading.is_empty() && ready.is_empty() {
                break;
            }
            engine
                .complete(1, &mut done)
                .map_err(TransferError::Engine)?;
            gather(&mut done, &mut reading, &mut ready)?;
            while let Some(mut chunk) = ready.remove(&next_emit) {
                if self.mirroring {
                    let oldest_seq = reading
                        .values()
                        .map(|&(_, _, seq)| seq)
                        .chain(ready.values().map(|chunk| chunk.since_seq))
                        .chain([chunk.since_seq])
                        .min()
                        .unwrap_or(chunk.since_seq);
                    self.emit_carved(&mut chunk, oldest_seq, stats)?;
                    window.sent_bytes += u64::from(chunk.len_bytes);
                    self.keep_window(&mut window)?;
                } else {
                    self.emit(&mut chunk, &mut zero_run, stats)?;
                }
                self.pool.give(chunk.buf);
                next_emit += 1;
                let cap = on_chunk(u64::from(chunk.len_bytes));
                self.set_bandwidth(cap);
                // The disk reads the next chunk while this thread sends the ones ready:
                // refilled (and handed to the kernel: a queued read is not submitted until
                // the engine is entered) only after all were sent, reads and sends would
                // take turns.
                self.refill(
                    engine,
                    &mut chunks,
                    &mut reading,
                    &ready,
                    &mut next_tag,
                    budget,
                )?;
                engine
                    .complete(0, &mut done)
                    .map_err(TransferError::Engine)?;
                gather(&mut done, &mut reading, &mut ready)?;
            }
            self.check_peer()?;
        }
        if let Some(run) = zero_run.take() {
            self.send_zero(run, stats)?;
        }
        Ok(())
    }

    /// Submits reads of the next chunks while those in flight or ready to send stay within
    /// `budget` (one always may).
    fn refill(
        &mut self,
        engine: &mut dyn crate::io::BlockIo,
        chunks: &mut Chunks<'_>,
        reading: &mut BTreeMap<u64, (u64, u32, u64)>,
        ready: &BTreeMap<u64, ReadChunk>,
        next_tag: &mut u64,
        budget: ReadBudget,
    ) -> Result<(), TransferError> {
        let mut reads = reading.len() + ready.len();
        let mut bytes: u64 = reading
            .values()
            .map(|&(_, len, _)| u64::from(len))
            .sum::<u64>()
            + ready
                .values()
                .map(|chunk| u64::from(chunk.len_bytes))
                .sum::<u64>();
        while let Some(&(offset_bytes, len_bytes)) = chunks.peek() {
            if !budget.admits(reads, bytes, len_bytes) {
                break;
            }
            chunks.next();
            reads += 1;
            bytes += u64::from(len_bytes);
            let since_seq = self.out.mirror_seq();
            let request = IoRequest {
                tag: *next_tag,
                kind: IoKind::Read,
                offset_bytes,
                len_bytes,
                buf: Some(self.pool.take(read_buf_len(offset_bytes, len_bytes))),
            };
            engine
                .submit(request)
                .map_err(|(err, _)| TransferError::Engine(err))?;
            reading.insert(*next_tag, (offset_bytes, len_bytes, since_seq));
            *next_tag += 1;
        }
        Ok(())
    }

    /// Sends one chunk: extends the zero run, or flushes it and sends the chunk as Data.
    fn emit(
        &mut self,
        chunk: &mut ReadChunk,
        zero_run: &mut Option<ZeroRun>,
        stats: &mut SendStats,
    ) -> Result<(), TransferError> {
        let data = &mut chunk.buf.as_mut_slice()
            [chunk.data_start..chunk.data_start + chunk.len_bytes as usize];
        let len_bytes = u64::from(chunk.len_bytes);
        if is_all_zero(data) {
            if let Some(run) = zero_run.as_mut() {
                if run.offset_bytes + run.len_bytes == chunk.offset_bytes {
                    run.len_bytes += len_bytes;
                    return Ok(());
                }
            }
            if let Some(run) = zero_run.replace(ZeroRun {
                offset_bytes: chunk.offset_bytes,
                len_bytes,
            }) {
                self.send_zero(run, stats)?;
            }
            return Ok(());
        }
        if let Some(run) = zero_run.take() {
            self.send_zero(run, stats)?;
        }
        let wire_bytes = (frame::HEADER_BYTES + 40) as u64 + len_bytes;
        self.pace(wire_bytes);
        let digest = *blake3::hash(data).as_bytes();
        // Sealed in the read buffer itself: it goes back to the pool after this.
        self.out
            .lock()
            .write_data_in_place(chunk.offset_bytes, data, digest)?;
        stats.data_bytes += len_bytes;
        stats.data_frames += 1;
        stats.wire_bytes += wire_bytes;
        Ok(())
    }

    /// While mirroring: a fence every [`MIRROR_FENCE_BYTES`] of copy, and at most
    /// [`MIRROR_FENCES_AHEAD`] unanswered, so a mirrored guest write (whose fence waits for
    /// everything queued before it) never queues behind more than a few MiB of copy.
    fn keep_window(&mut self, window: &mut FenceWindow) -> Result<(), TransferError> {
        if window.sent_bytes < MIRROR_FENCE_BYTES {
            return Ok(());
        }
        window.sent_bytes = 0;
        let timeout = Duration::from_millis(self.options.reply_timeout_ms.max(1));
        let seq = self.out.send_fence().map_err(|err| self.fence_error(err))?;
        window.pending.push_back(seq);
        while window.pending.len() > MIRROR_FENCES_AHEAD {
            let oldest = window.pending.pop_front().expect("non-empty");
            self.out
                .wait_fence(oldest, timeout)
                .map_err(|err| self.fence_error(err))?;
        }
        Ok(())
    }

    /// Sends one chunk while guest writes are mirrored: under the writer lock, without the
    /// ranges mirrored since its read was submitted; each piece as Zero or Data.
    fn emit_carved(
        &mut self,
        chunk: &mut ReadChunk,
        oldest_seq: u64,
        stats: &mut SendStats,
    ) -> Result<(), TransferError> {
        let data = &mut chunk.buf.as_mut_slice()
            [chunk.data_start..chunk.data_start + chunk.len_bytes as usize];
        self.pace((frame::HEADER_BYTES + 40) as u64 + u64::from(chunk.len_bytes));
        let mut out = self.out.lock();
        let pieces = out.carve(
            chunk.offset_bytes,
            u64::from(chunk.len_bytes),
            chunk.since_seq,
            oldest_seq,
        );
        for (offset_bytes, len_bytes) in pieces {
            let start = usize::try_from(offset_bytes - chunk.offset_bytes).expect("in chunk");
            let piece = &mut data[start..start + len_bytes as usize];
            if is_all_zero(piece) {
                out.write_frame(&Frame::Zero {
                    offset_bytes,
                    len_bytes,
                })?;
                stats.zero_bytes += len_bytes;
                stats.zero_frames += 1;
                stats.wire_bytes += (frame::HEADER_BYTES + 16) as u64;
            } else {
                let digest = *blake3::hash(piece).as_bytes();
                out.write_data_in_place(offset_bytes, piece, digest)?;
                stats.data_bytes += len_bytes;
                stats.data_frames += 1;
                stats.wire_bytes += (frame::HEADER_BYTES + 40) as u64 + len_bytes;
            }
        }
        Ok(())
    }

    fn send_zero(&mut self, run: ZeroRun, stats: &mut SendStats) -> Result<(), TransferError> {
        let frame = Frame::Zero {
            offset_bytes: run.offset_bytes,
            len_bytes: run.len_bytes,
        };
        let wire_bytes = self.send_frame(&frame)?;
        stats.zero_bytes += run.len_bytes;
        stats.zero_frames += 1;
        stats.wire_bytes += wire_bytes;
        Ok(())
    }
}

/// Moves the reads `done` from `reading` to `ready`; a failed read fails the send.
fn gather(
    done: &mut Vec<IoCompletion>,
    reading: &mut BTreeMap<u64, (u64, u32, u64)>,
    ready: &mut BTreeMap<u64, ReadChunk>,
) -> Result<(), TransferError> {
    for completion in done.drain(..) {
        completion.result.map_err(TransferError::SourceRead)?;
        let (offset_bytes, len_bytes, since_seq) = reading
            .remove(&completion.tag)
            .expect("every completion matches a submitted read");
        ready.insert(
            completion.tag,
            ReadChunk {
                offset_bytes,
                len_bytes,
                since_seq,
                buf: completion.buf.expect("a read returns its buffer"),
                data_start: completion.data_start,
            },
        );
    }
    Ok(())
}

/// Whether every byte is zero; checks a block at a time so random data stops early while
/// each block's check vectorizes.
fn is_all_zero(data: &[u8]) -> bool {
    data.chunks(4096)
        .all(|block| block.iter().fold(0u8, |acc, &byte| acc | byte) == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a gear's read shape bounds the disk time read ahead, not the count of reads: one
    // 64 KiB read at a time lets sixteen 4 KiB reads go together, never more bytes than the
    // shape's, never more than MAX_READS reads, and a read longer than the budget still goes
    // alone. Method: the budget's answers at its edges.
    #[test]
    fn the_read_shape_bounds_bytes_ahead_not_reads() {
        let one_short = ReadBudget::for_shape(1, 64 << 10);
        assert_eq!((one_short.reads, one_short.bytes), (16, 64 << 10));
        assert!(one_short.admits(15, 15 * 4096, 4096));
        assert!(!one_short.admits(16, 16 * 4096, 4096));
        assert!(one_short.admits(0, 0, 64 << 10));
        assert!(!one_short.admits(1, 4096, 64 << 10));
        assert!(
            one_short.admits(0, 0, 1 << 20),
            "a longer read still goes alone"
        );

        let full = ReadBudget::for_shape(8, 1 << 20);
        assert_eq!((full.reads, full.bytes), (MAX_READS, 8 << 20));
        assert!(full.admits(7, 7 << 20, 1 << 20));
        assert!(!full.admits(8, 8 << 20, 1 << 20));
        assert!(!full.admits(MAX_READS, 64 * 4096, 4096));

        let one_block = ReadBudget::for_shape(1, 4096);
        assert_eq!((one_block.reads, one_block.bytes), (1, 4096));
        assert!(!one_block.admits(1, 4096, 4096));
        assert_eq!(
            ReadBudget::for_shape(0, 4096).reads,
            1,
            "a depth of 0 reads one"
        );
    }
}
