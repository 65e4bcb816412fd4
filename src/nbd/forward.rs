//! The forwarding engine: a [`BlockIo`] that sends every request to another agent's NBD server
//! (TCP) instead of the local image. After a migration's switchover the source export serves
//! its clients through it, so the guest keeps its connection and never sees an error while the
//! disk lives at the destination.
//!
//! One connection per session; requests are pipelined (the NBD cookie is the request's tag)
//! and a reader thread turns replies into completions, which `complete` collects.
//!
//! Invariants:
//! - Every submitted request completes exactly once, with its buffer: from the reply, or with
//!   an error when the connection fails (then every pending request fails with EIO).
//! - A READ's data lands at `data_start` of its own buffer, as the local engines do.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use ferry_sys::AlignedBuf;

use crate::io::{read_data_start, BlockIo, IoCompletion, IoError, IoKind, IoRequest};
use crate::nbd::client::NbdClient;
use crate::nbd::conn::Conn;
use crate::nbd::wire;

/// A request sent and not yet answered.
#[derive(Debug)]
struct Pending {
    len_bytes: u32,
    data_start: usize,
    buf: Option<AlignedBuf>,
    reads: bool,
}

/// Requests awaiting replies; `closed` once the reader has failed them all and exited.
#[derive(Debug, Default)]
struct PendingState {
    map: HashMap<u64, Pending>,
    closed: bool,
}

type PendingMap = Arc<Mutex<PendingState>>;

/// Forwards requests to a remote NBD export.
#[derive(Debug)]
pub struct ForwardEngine {
    conn: Conn,
    capacity: usize,
    in_flight: usize,
    pending: PendingMap,
    done: Receiver<IoCompletion>,
    done_tx: Sender<IoCompletion>,
    reader: Option<JoinHandle<()>>,
}

impl ForwardEngine {
    /// Connects to `addr` (host:port of the destination's NBD TCP listener) and negotiates
    /// `export`, whose size must be `size_bytes`.
    pub fn connect(addr: &str, export: &str, size_bytes: u64, capacity: usize) -> io::Result<Self> {
        let client = NbdClient::connect_tcp(addr, export)?;
        if client.size_bytes() != size_bytes {
            return Err(io::Error::other(format!(
                "forward target {addr}/{export} has {} bytes, expected {size_bytes}",
                client.size_bytes()
            )));
        }
        let conn = client.into_conn();
        let reader_conn = conn.try_clone()?;
        let pending: PendingMap = Arc::new(Mutex::new(PendingState::default()));
        let (tx, rx) = crossbeam_channel::unbounded();
        let reader_pending = pending.clone();
        let reader_tx = tx.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-forward".into())
            .spawn(move || read_replies(reader_conn, &reader_pending, &reader_tx))?;
        Ok(ForwardEngine {
            conn,
            capacity: capacity.max(1),
            in_flight: 0,
            pending,
            done: rx,
            done_tx: tx,
            reader: Some(reader),
        })
    }

    fn send(&mut self, request: &IoRequest) -> io::Result<()> {
        let (command, flags) = match request.kind {
            IoKind::Read => (wire::CMD_READ, 0),
            IoKind::Write { fua } => (wire::CMD_WRITE, fua_flag(fua)),
            IoKind::Flush => (wire::CMD_FLUSH, 0),
            IoKind::Trim { fua } => (wire::CMD_TRIM, fua_flag(fua)),
            IoKind::WriteZeroes { may_trim, fua } => {
                let no_hole = if may_trim { 0 } else { wire::CMD_FLAG_NO_HOLE };
                (wire::CMD_WRITE_ZEROES, fua_flag(fua) | no_hole)
            }
        };
        let header = wire::RequestHeader {
            flags,
            command,
            cookie: request.tag,
            offset_bytes: request.offset_bytes,
            length_bytes: request.len_bytes,
        }
        .to_bytes();
        match (&request.kind, &request.buf) {
            (IoKind::Write { .. }, Some(buf)) => {
                let payload = &buf.as_slice()[..request.len_bytes as usize];
                let mut slices = [io::IoSlice::new(&header), io::IoSlice::new(payload)];
                self.conn.write_all_slices(&mut slices)
            }
            _ => self.conn.write_all(&header),
        }
    }
}

fn fua_flag(fua: bool) -> u16 {
    if fua {
        wire::CMD_FLAG_FUA
    } else {
        0
    }
}

impl BlockIo for ForwardEngine {
    fn capacity(&self) -> usize {
        self.capacity
    }

    fn in_flight(&self) -> usize {
        self.in_flight
    }

    fn submit(&mut self, mut request: IoRequest) -> Result<(), (IoError, IoRequest)> {
        if self.in_flight >= self.capacity {
            return Err((IoError::Full, request));
        }
        let reads = request.kind == IoKind::Read;
        let entry = Pending {
            len_bytes: request.len_bytes,
            data_start: if reads {
                read_data_start(request.offset_bytes)
            } else {
                0
            },
            // A read's buffer goes to the reader thread now; a write's stays until sent.
            buf: if reads { request.buf.take() } else { None },
            reads,
        };
        self.in_flight += 1;
        {
            let mut pending = self.pending.lock().expect("pending lock");
            if pending.closed {
                // The connection is gone: fail at once (the reader will not answer).
                let failed = IoCompletion {
                    tag: request.tag,
                    result: Err(io::Error::from_raw_os_error(nix::libc::EIO)),
                    buf: entry.buf.or(request.buf.take()),
                    data_start: entry.data_start,
                };
                let _ = self.done_tx.send(failed);
                return Ok(());
            }
            pending.map.insert(request.tag, entry);
        }
        let sent = self.send(&request);
        if !reads {
            // Hand the write's buffer back with the reply, unless the reply already came.
            if let Some(entry) = self
                .pending
                .lock()
                .expect("pending lock")
                .map
                .get_mut(&request.tag)
            {
                entry.buf = request.buf.take();
            }
        }
        if let Err(err) = sent {
            // The connection is broken: the reader thread fails every pending request.
            log::warn!("forwarding failed: {err}");
            let _ = self.conn.shutdown(std::net::Shutdown::Both);
        }
        Ok(())
    }

    fn complete(
        &mut self,
        min_complete: usize,
        out: &mut Vec<IoCompletion>,
    ) -> Result<(), IoError> {
        let want = min_complete.min(self.in_flight);
        let mut got = 0;
        while got < want {
            match self.done.recv() {
                Ok(completion) => {
                    out.push(completion);
                    got += 1;
                }
                Err(_) => break,
            }
        }
        while let Ok(completion) = self.done.try_recv() {
            out.push(completion);
            got += 1;
        }
        self.in_flight -= got;
        Ok(())
    }
}

impl Drop for ForwardEngine {
    fn drop(&mut self) {
        let _ = self.conn.shutdown(std::net::Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Reads replies until the connection ends, then fails whatever is still pending.
fn read_replies(mut conn: Conn, pending: &PendingMap, done: &Sender<IoCompletion>) {
    let outcome = (|| -> io::Result<()> {
        loop {
            let mut head = [0u8; wire::SIMPLE_REPLY_BYTES];
            conn.read_exact(&mut head)?;
            let wire::SimpleReply { error, cookie: tag } =
                wire::parse_simple_reply(&head).map_err(io::Error::other)?;
            let entry = pending.lock().expect("pending lock").map.remove(&tag);
            let Some(mut entry) = entry else {
                return Err(io::Error::other(format!("reply for unknown request {tag}")));
            };
            if error == 0 && entry.reads {
                let start = entry.data_start;
                let buf = entry.buf.as_mut().expect("a read has a buffer");
                conn.read_exact(&mut buf.as_mut_slice()[start..start + entry.len_bytes as usize])?;
            }
            let result = match error {
                0 => Ok(()),
                code => Err(io::Error::from_raw_os_error(nbd_to_errno(code))),
            };
            let completion = IoCompletion {
                tag,
                result,
                buf: entry.buf,
                data_start: entry.data_start,
            };
            if done.send(completion).is_err() {
                return Ok(());
            }
        }
    })();
    if let Err(err) = outcome {
        log::debug!("forward connection ended: {err}");
    }
    let drained: Vec<(u64, Pending)> = {
        let mut state = pending.lock().expect("pending lock");
        state.closed = true;
        state.map.drain().collect()
    };
    for (tag, entry) in drained {
        let failed = IoCompletion {
            tag,
            result: Err(io::Error::from_raw_os_error(nix::libc::EIO)),
            buf: entry.buf,
            data_start: entry.data_start,
        };
        let _ = done.send(failed);
    }
}

/// NBD error values are Linux errno values for the ones that exist (spec: "Error values").
fn nbd_to_errno(code: u32) -> i32 {
    i32::try_from(code).unwrap_or(nix::libc::EIO)
}
