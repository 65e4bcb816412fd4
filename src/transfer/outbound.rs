//! The outbound half of a block stream, shared by the copy ([`super::Sender`]) and, while a
//! migration mirrors, by the export's sessions ([`MirrorLink`]): one ordered byte stream, so
//! the destination applies frames in the order they were written (it serializes overlapping
//! writes), and a newer frame for a range always lands after an older one.
//!
//! The race this module closes: the copy reads a range from the source disk, a guest write
//! to that range completes and is mirrored, then the copy's (now stale) bytes are sent and
//! would overwrite the mirrored ones at the destination. So each copy read remembers the
//! mirror sequence number before it was submitted, every mirrored range is logged with its
//! number while a copy runs, and when the copy emits a read it carves out of it every range
//! mirrored after its read began ([`OutboundGuard::carve`]). A range mirrored before the read
//! began is in the read's bytes already.
//!
//! Invariants:
//! - Every frame goes out under the one writer lock; frames never interleave.
//! - `mirror_seq` is incremented, and the range logged, under the writer lock, in the same
//!   critical section that writes the mirrored frame; the copy carves under the lock too.
//! - Fences are answered in order (the destination handles frames in order), so `fenced`
//!   only grows; once the stream failed, `failed` is set for good and waiters return.
//! - A mirror never fails a guest write; it records the failure ([`Outbound::failed`]) and
//!   the job refuses to commit.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::frame::Frame;
use super::link::Tx;
use super::TransferError;
use crate::disk::mirror::WriteMirror;

/// How long a mirrored write waits for the destination before the mirror counts as failed
/// (the guest write is answered anyway: the source is authoritative until the commit).
const FENCE_TIMEOUT: Duration = Duration::from_secs(10);

/// The shared writer of one stream.
#[derive(Debug)]
pub(crate) struct Outbound {
    state: Mutex<State>,
    /// Mirrored operations written so far.
    mirror_seq: AtomicU64,
    /// Payload bytes of mirrored Data frames written so far.
    mirrored_bytes: AtomicU64,
    /// Highest fence the destination answered, and whether waiting is over for good.
    fences: Mutex<Fences>,
    fenced: Condvar,
    /// The mirror could not deliver something (or a mirrored write failed locally).
    failed: AtomicBool,
}

#[derive(Debug)]
struct State {
    stream: TcpStream,
    /// The sending half of the stream's framing: its record counter is the wire order.
    tx: Tx,
    scratch: Vec<u8>,
    /// A copy is running: mirrored ranges are logged for it.
    copying: bool,
    /// (mirror seq, offset, length) of ranges mirrored while the copy runs, oldest first.
    log: VecDeque<(u64, u64, u64)>,
    next_fence: u64,
}

#[derive(Debug, Default)]
struct Fences {
    answered: u64,
    closed: bool,
}

/// Why a fence was not answered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FenceError {
    /// Writing the Fence failed.
    #[error("cannot write the fence")]
    Write(#[source] TransferError),
    /// The stream ended first.
    #[error("the stream closed before the fence was answered")]
    Closed,
    /// No answer in time.
    #[error("the destination did not answer the fence in time")]
    Timeout,
}

/// The writer lock held: frames written through it go out in order.
#[derive(Debug)]
pub(crate) struct OutboundGuard<'a> {
    state: MutexGuard<'a, State>,
}

impl Outbound {
    pub(crate) fn new(stream: TcpStream, tx: Tx) -> Outbound {
        Outbound {
            state: Mutex::new(State {
                stream,
                tx,
                scratch: Vec::new(),
                copying: false,
                log: VecDeque::new(),
                next_fence: 1,
            }),
            mirror_seq: AtomicU64::new(0),
            mirrored_bytes: AtomicU64::new(0),
            fences: Mutex::new(Fences::default()),
            fenced: Condvar::new(),
            failed: AtomicBool::new(false),
        }
    }

    /// Takes the writer lock.
    pub(crate) fn lock(&self) -> OutboundGuard<'_> {
        OutboundGuard {
            state: self.state.lock().expect("outbound lock"),
        }
    }

    /// Mirrored operations written so far; a copy read samples it before it is submitted.
    pub(crate) fn mirror_seq(&self) -> u64 {
        self.mirror_seq.load(Ordering::SeqCst)
    }

    /// A copy starts (`true`) or ends: the log of mirrored ranges starts empty either way.
    pub(crate) fn set_copying(&self, copying: bool) {
        let mut state = self.state.lock().expect("outbound lock");
        state.copying = copying;
        state.log.clear();
    }

    /// Payload bytes of mirrored Data frames written so far.
    pub(crate) fn mirrored_bytes(&self) -> u64 {
        self.mirrored_bytes.load(Ordering::Relaxed)
    }

    /// Whether a mirrored write could not be delivered (or failed locally).
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// Called by the reply reader: the destination answered fence `seq`.
    pub(crate) fn fence_answered(&self, seq: u64) {
        let mut fences = self.fences.lock().expect("fence lock");
        fences.answered = fences.answered.max(seq);
        self.fenced.notify_all();
    }

    /// Called by the reply reader when the stream ends: nobody will answer fences any more.
    pub(crate) fn close(&self) {
        self.fences.lock().expect("fence lock").closed = true;
        self.fenced.notify_all();
    }

    /// Shuts the socket down (both directions), which also ends the reply reader.
    pub(crate) fn shutdown(&self) {
        let state = self.state.lock().expect("outbound lock");
        let _ = state.stream.shutdown(Shutdown::Both);
    }

    /// Writes a mirrored frame covering `len_bytes` at `offset_bytes` (`payload` for Data)
    /// and logs that range for a running copy.
    fn mirror_frame(&self, frame: &Frame, offset_bytes: u64, len_bytes: u64, payload: &[u8]) {
        if self.failed() {
            // The job will not commit; the trackers hold the write.
            return;
        }
        let digest = match frame {
            Frame::Data { .. } => Some(*blake3::hash(payload).as_bytes()),
            _ => None,
        };
        let mut guard = self.lock();
        let seq = self.mirror_seq.fetch_add(1, Ordering::SeqCst) + 1;
        if guard.state.copying {
            guard.state.log.push_back((seq, offset_bytes, len_bytes));
        }
        let written = match digest {
            Some(digest) => guard.write_data(offset_bytes, payload, digest),
            None => guard.write_frame(frame),
        };
        match written {
            Ok(()) => {
                self.mirrored_bytes
                    .fetch_add(payload.len() as u64, Ordering::Relaxed);
            }
            Err(err) => self.fail(&format!("mirrored write at {offset_bytes}: {err}")),
        }
    }

    /// Sends a Fence and waits (at most `timeout`) until the destination answered it:
    /// everything written before it is then written at the destination.
    pub(crate) fn fence(&self, timeout: Duration) -> Result<(), FenceError> {
        let seq = self.send_fence()?;
        self.wait_fence(seq, timeout)
    }

    /// Writes a Fence; returns its seq for [`Outbound::wait_fence`].
    pub(crate) fn send_fence(&self) -> Result<u64, FenceError> {
        let mut guard = self.lock();
        let seq = guard.state.next_fence;
        guard.state.next_fence += 1;
        guard
            .write_frame(&Frame::Fence { seq })
            .map_err(FenceError::Write)?;
        Ok(seq)
    }

    /// Waits (at most `timeout`) until the destination answered fence `seq`.
    pub(crate) fn wait_fence(&self, seq: u64, timeout: Duration) -> Result<(), FenceError> {
        let deadline = Instant::now() + timeout;
        let mut fences = self.fences.lock().expect("fence lock");
        while fences.answered < seq {
            if fences.closed {
                return Err(FenceError::Closed);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(FenceError::Timeout);
            }
            fences = self
                .fenced
                .wait_timeout(fences, deadline - now)
                .expect("fence lock")
                .0;
        }
        Ok(())
    }

    #[cold]
    fn fail(&self, reason: &str) {
        if !self.failed.swap(true, Ordering::SeqCst) {
            log::warn!("active mirroring failed, the migration will not commit: {reason}");
        }
    }
}

impl OutboundGuard<'_> {
    /// Writes a frame without payload.
    pub(crate) fn write_frame(&mut self, frame: &Frame) -> Result<(), TransferError> {
        let State {
            stream,
            tx,
            scratch,
            ..
        } = &mut *self.state;
        tx.write_frame(&mut &*stream, frame, scratch)
    }

    /// Writes a Data frame whose payload digest the caller computed (outside the lock).
    pub(crate) fn write_data(
        &mut self,
        offset_bytes: u64,
        payload: &[u8],
        digest: [u8; 32],
    ) -> Result<(), TransferError> {
        let State {
            stream,
            tx,
            scratch,
            ..
        } = &mut *self.state;
        tx.write_data(&mut &*stream, offset_bytes, payload, digest, scratch)
    }

    /// Like [`OutboundGuard::write_data`], sealing `payload` in place (it holds ciphertext
    /// afterwards): no copy of the payload.
    pub(crate) fn write_data_in_place(
        &mut self,
        offset_bytes: u64,
        payload: &mut [u8],
        digest: [u8; 32],
    ) -> Result<(), TransferError> {
        let State {
            stream,
            tx,
            scratch,
            ..
        } = &mut *self.state;
        tx.write_data_in_place(&mut &*stream, offset_bytes, payload, digest, scratch)
    }

    /// The parts of `[offset_bytes, offset_bytes + len_bytes)` that no operation mirrored
    /// after `since_seq` touched, in offset order; forgets log entries at or before
    /// `oldest_seq` (no copy read still in progress began before them).
    pub(crate) fn carve(
        &mut self,
        offset_bytes: u64,
        len_bytes: u64,
        since_seq: u64,
        oldest_seq: u64,
    ) -> Vec<(u64, u64)> {
        let log = &mut self.state.log;
        while log.front().is_some_and(|&(seq, _, _)| seq <= oldest_seq) {
            log.pop_front();
        }
        carve(
            offset_bytes,
            len_bytes,
            log.iter()
                .filter(|&&(seq, _, _)| seq > since_seq)
                .map(|&(_, offset, len)| (offset, len)),
        )
    }
}

/// `[offset_bytes, offset_bytes + len_bytes)` minus every `holes` range, in offset order.
fn carve(
    offset_bytes: u64,
    len_bytes: u64,
    holes: impl Iterator<Item = (u64, u64)>,
) -> Vec<(u64, u64)> {
    let mut pieces = vec![(offset_bytes, len_bytes)];
    for (hole_start, hole_len) in holes {
        let hole_end = hole_start.saturating_add(hole_len);
        pieces = pieces
            .into_iter()
            .flat_map(|(start, len)| {
                let end = start + len;
                if hole_end <= start || end <= hole_start {
                    return vec![(start, len)];
                }
                let mut kept = Vec::with_capacity(2);
                if start < hole_start {
                    kept.push((start, hole_start - start));
                }
                if hole_end < end {
                    kept.push((hole_end, end - hole_end));
                }
                kept
            })
            .collect();
    }
    pieces
}

/// The export-side face of a stream while a migration mirrors: guest writes go to the
/// destination on the same ordered stream as the copy.
#[derive(Debug, Clone)]
pub struct MirrorLink {
    out: Arc<Outbound>,
}

impl MirrorLink {
    pub(crate) fn new(out: Arc<Outbound>) -> MirrorLink {
        MirrorLink { out }
    }

    /// Whether some mirrored write may be missing at the destination.
    pub fn failed(&self) -> bool {
        self.out.failed()
    }
}

impl WriteMirror for MirrorLink {
    fn write(&self, offset_bytes: u64, data: &[u8]) {
        // Guest writes are at most the NBD maximum request (32 MiB): split to frame size.
        let mut at = 0usize;
        while at < data.len() {
            let len = (data.len() - at).min(super::frame::MAX_DATA_BYTES);
            let piece = &data[at..at + len];
            let piece_offset = offset_bytes + at as u64;
            let frame = Frame::Data {
                offset_bytes: piece_offset,
                len_bytes: u32::try_from(len).expect("≤ 8 MiB"),
                digest: [0; 32],
            };
            self.out
                .mirror_frame(&frame, piece_offset, len as u64, piece);
            at += len;
        }
    }

    fn zero(&self, offset_bytes: u64, len_bytes: u64, trim: bool) {
        let frame = if trim {
            Frame::Trim {
                offset_bytes,
                len_bytes,
            }
        } else {
            Frame::Zero {
                offset_bytes,
                len_bytes,
            }
        };
        self.out.mirror_frame(&frame, offset_bytes, len_bytes, &[]);
    }

    fn diverged(&self, offset_bytes: u64, len_bytes: u64) {
        self.out.fail(&format!(
            "a mirrored write failed locally at {offset_bytes} (+{len_bytes})"
        ));
    }

    fn fence(&self) {
        if self.out.failed() {
            return;
        }
        if let Err(err) = self.out.fence(FENCE_TIMEOUT) {
            self.out.fail(&format!("mirror fence: {err}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::carve;

    #[test]
    fn carve_removes_every_hole() {
        // Goal: a copy never sends bytes a later mirrored write covered, and sends every
        // other byte. Method: holes at the start, middle, end, overlapping, outside.
        let holes = [(0, 10), (50, 10), (55, 20), (95, 100), (500, 5)];
        let pieces = carve(0, 100, holes.into_iter());
        assert_eq!(pieces, [(10, 40), (75, 20)]);
        assert_eq!(carve(0, 100, std::iter::empty()), [(0, 100)]);
        assert_eq!(carve(10, 10, [(0, 100)].into_iter()), []);
    }
}
