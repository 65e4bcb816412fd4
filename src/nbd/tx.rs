//! Reply queue of one connection: reply headers gathered in one byte vector and read data kept
//! in its own buffers, written with vectored writes (no copy of read data).
//!
//! Invariant: segments are written in the order they were queued, so a reply's header is
//! always followed by its own data.

use std::io::{self, IoSlice};

use ferry_sys::AlignedBuf;

use crate::nbd::bufpool::BufPool;
use crate::nbd::conn::Conn;

/// Slices handed to one `writev` (well below IOV_MAX).
const SLICES_PER_WRITE: usize = 64;

#[derive(Debug)]
enum Segment {
    /// `bytes[start..end]` of the queue.
    Bytes { start: usize, end: usize },
    /// `buf[start..end]`, the data of a READ reply.
    Data {
        buf: AlignedBuf,
        start: usize,
        end: usize,
    },
}

/// Replies waiting to be written.
#[derive(Debug, Default)]
pub struct TxQueue {
    bytes: Vec<u8>,
    segments: Vec<Segment>,
    /// Start of the bytes not yet covered by a segment.
    open_from: usize,
}

impl TxQueue {
    /// An empty queue.
    pub fn new() -> Self {
        TxQueue {
            bytes: Vec::with_capacity(64 * 1024),
            segments: Vec::new(),
            open_from: 0,
        }
    }

    /// The byte vector that reply headers are encoded into; whatever is appended is queued.
    pub fn header_bytes(&mut self) -> &mut Vec<u8> {
        &mut self.bytes
    }

    /// Queues read data after the headers appended so far.
    pub fn push_data(&mut self, buf: AlignedBuf, start: usize, end: usize) {
        debug_assert!(start <= end && end <= buf.len());
        self.close_bytes();
        self.segments.push(Segment::Data { buf, start, end });
    }

    fn close_bytes(&mut self) {
        if self.bytes.len() > self.open_from {
            self.segments.push(Segment::Bytes {
                start: self.open_from,
                end: self.bytes.len(),
            });
            self.open_from = self.bytes.len();
        }
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty() && self.bytes.len() == self.open_from
    }

    /// Writes everything queued (blocking) and gives data buffers back to `pool`.
    pub fn flush(&mut self, conn: &mut Conn, pool: &mut BufPool) -> io::Result<()> {
        self.close_bytes();
        let mut result = Ok(());
        let mut index = 0;
        while index < self.segments.len() && result.is_ok() {
            let chunk_end = (index + SLICES_PER_WRITE).min(self.segments.len());
            let mut slices: [IoSlice<'_>; SLICES_PER_WRITE] = [IoSlice::new(&[]); SLICES_PER_WRITE];
            for (slot, segment) in slices.iter_mut().zip(&self.segments[index..chunk_end]) {
                *slot = match segment {
                    Segment::Bytes { start, end } => IoSlice::new(&self.bytes[*start..*end]),
                    Segment::Data { buf, start, end } => {
                        IoSlice::new(&buf.as_slice()[*start..*end])
                    }
                };
            }
            result = conn.write_all_slices(&mut slices[..chunk_end - index]);
            index = chunk_end;
        }
        for segment in self.segments.drain(..) {
            if let Segment::Data { buf, .. } = segment {
                pool.give(buf);
            }
        }
        self.bytes.clear();
        self.open_from = 0;
        result
    }
}
