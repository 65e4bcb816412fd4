//! The link thread of a [`super::ForwardEngine`]: the connection's life. It reads replies and
//! turns them into completions; when the connection breaks it reconnects with backoff, checks
//! the image, installs the new connection and resends what is held (on a scoped sender
//! thread, so replies are read while requests are written); it fails held requests with EIO
//! as their hold ends; it tells the export's gauge when it starts and stops holding. The
//! invariants and the lock order are in the parent's `//!`.

use std::io::{self, Read};
use std::net::Shutdown;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};

use super::{
    eio, expired, expired_tags, lock, next_expiry, send, Pending, Shared, BACKOFF_FIRST,
    BACKOFF_MAX,
};
use crate::nbd::client::NbdClient;
use crate::nbd::conn::Conn;
use crate::nbd::wire;

/// Bound on connecting and on each handshake step of one attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a connection to the destination ended, or an attempt to open one failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum LinkError {
    /// Connecting or the handshake failed (the destination is down or restarting).
    #[error("cannot connect")]
    Connect(#[source] io::Error),
    /// Another image answers under the export's name.
    #[error("it serves {found_bytes} bytes, expected {expected_bytes}: not the same image")]
    WrongImage {
        /// Size the destination advertised.
        found_bytes: u64,
        /// Size of the export.
        expected_bytes: u64,
    },
    /// The destination serves another disk under the export's name and size (its NBD
    /// description names another lineage).
    #[error("the destination serves another disk ({description:?}, expected lineage {lineage})")]
    OtherDisk {
        /// What the destination says of its export.
        description: String,
        /// The disk's lineage.
        lineage: u64,
    },
    /// The socket failed or closed.
    #[error("connection lost")]
    Lost(#[source] io::Error),
    /// Requests waited past the hold and the destination sent nothing meanwhile.
    #[error("nothing received for {hold_ms} ms while requests wait")]
    Silent {
        /// The hold.
        hold_ms: u64,
    },
    /// The destination broke the protocol (bad reply, unknown cookie).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The engine is being dropped.
    #[error("engine closed")]
    Stopped,
}

/// Delays between reconnect attempts: [`BACKOFF_FIRST`], doubling up to [`BACKOFF_MAX`].
#[derive(Debug, Clone)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: BACKOFF_FIRST,
        }
    }

    /// The delay before the next attempt; each call doubles the following one.
    fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(BACKOFF_MAX);
        delay
    }
}

impl Shared {
    /// One attempt: connect, handshake, and check that the same image answers.
    pub(super) fn dial(&self) -> Result<Conn, LinkError> {
        let client = NbdClient::connect_tcp_within(
            &self.addr,
            &self.export,
            ATTEMPT_TIMEOUT,
            self.tls.as_ref(),
        )
        .map_err(LinkError::Connect)?;
        if client.size_bytes() != self.size_bytes {
            return Err(LinkError::WrongImage {
                found_bytes: client.size_bytes(),
                expected_bytes: self.size_bytes,
            });
        }
        if let Some(lineage) = self.lineage {
            if !crate::disk::lineage_matches(client.description(), lineage) {
                return Err(LinkError::OtherDisk {
                    description: client.description().unwrap_or_default().to_owned(),
                    lineage,
                });
            }
        }
        Ok(client.into_conn())
    }

    /// Makes `conn` the one `Drop` shuts down; false when the engine is stopping (then the
    /// caller must not use it). Under `closer`, so `Drop` (store `stop`, then lock) either
    /// finds this connection or is seen here.
    fn register(&self, conn: &Conn) -> Result<(), LinkError> {
        let handle = conn.try_clone().map_err(LinkError::Lost)?;
        let mut closer = lock(&self.closer);
        if self.stopping() {
            return Err(LinkError::Stopped);
        }
        *closer = Some(handle);
        Ok(())
    }

    /// Fails, with EIO, every ready request that waited past the hold.
    fn expire(&self, now: Instant) {
        let due: Vec<(u64, Pending)> = {
            let mut pending = lock(&self.pending);
            let tags = expired_tags(&pending, now, self.hold);
            let due: Vec<(u64, Pending)> = tags
                .into_iter()
                .filter_map(|tag| pending.remove(&tag).map(|entry| (tag, entry)))
                .collect();
            self.count_out(&pending, due.len());
            due
        };
        if due.is_empty() {
            return;
        }
        log::warn!(
            "forward target {}: {} requests waited over {} ms: failed with EIO",
            self.name(),
            due.len(),
            self.hold_ms()
        );
        for (tag, entry) in due {
            self.finish(tag, entry, Err(eio()));
        }
    }

    /// Whether a ready request has waited past the hold (the connection may be dead silent).
    fn holds_expired(&self, now: Instant) -> bool {
        next_expiry(&lock(&self.pending), self.hold).is_some_and(|due| due <= now)
    }
}

/// The link thread: serves a connection until it breaks, reconnects, and again, until the
/// engine is dropped; then fails whatever is left (nobody waits for it any more). `first`:
/// a handle on the connection `connect` installed as generation 1, if it made one.
pub(super) fn run_link(shared: &Shared, first: Option<Conn>, stop: &Receiver<()>) {
    let mut lost_at = None;
    let mut generation = 0;
    match first {
        Some(reader) => {
            generation = 1;
            let err = serve_installed(shared, reader, generation);
            if !shared.stopping() {
                lost_at = Some(lost(shared, &err));
            }
        }
        None => {
            shared.start_holding();
            lost_at = Some(Instant::now());
        }
    }
    while !shared.stopping() {
        let Some(conn) = reconnect(shared, stop) else {
            break;
        };
        if let Some(lost_at) = lost_at.take() {
            // Before the connection is served: replies are read only while not holding.
            shared.stop_holding(true);
            log::info!(
                "forward target {}: connected again after {} ms",
                shared.name(),
                lost_at.elapsed().as_millis()
            );
        }
        generation += 1;
        let err = serve(shared, conn, generation);
        if !shared.stopping() {
            lost_at = Some(lost(shared, &err));
        }
    }
    let left: Vec<(u64, Pending)> = {
        let mut pending = lock(&shared.pending);
        let left: Vec<(u64, Pending)> = pending.drain().collect();
        shared.count_out(&pending, left.len());
        left
    };
    shared.stop_holding(false);
    for (tag, entry) in left {
        shared.finish(tag, entry, Err(eio()));
    }
}

/// Starts holding after a lost connection (logged); returns when it was lost.
fn lost(shared: &Shared, err: &LinkError) -> Instant {
    shared.start_holding();
    log::warn!(
        "forward target {}: {}: holding requests up to {} ms while reconnecting",
        shared.name(),
        crate::error::error_chain(err),
        shared.hold_ms()
    );
    Instant::now()
}

/// Tries to connect with backoff, failing held requests as their hold ends; None when the
/// engine is dropped. No lock is held while connecting: submitters keep recording requests.
fn reconnect(shared: &Shared, stop: &Receiver<()>) -> Option<Conn> {
    let mut backoff = Backoff::new();
    let mut dial_at = Instant::now();
    let mut told_wrong_image = false;
    loop {
        let now = Instant::now();
        shared.expire(now);
        if shared.stopping() {
            return None;
        }
        if now >= dial_at {
            match shared.dial() {
                Ok(conn) => return Some(conn),
                Err(err @ (LinkError::WrongImage { .. } | LinkError::OtherDisk { .. }))
                    if !told_wrong_image =>
                {
                    told_wrong_image = true;
                    log::warn!(
                        "forward target {}: {err}: refused; requests stay held",
                        shared.name()
                    );
                }
                Err(err) => log::debug!("forward target {}: {err}", shared.name()),
            }
            dial_at = Instant::now() + backoff.next_delay();
        }
        let wake_at = next_expiry(&lock(&shared.pending), shared.hold)
            .map_or(dial_at, |due| due.min(dial_at));
        let wait = wake_at.saturating_duration_since(Instant::now());
        match stop.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return None,
        }
    }
}

/// Runs one connection: a scoped thread installs it for the submitters and resends what is
/// held, while this thread reads replies until the connection fails. Returns why it ended.
fn serve(shared: &Shared, conn: Conn, generation: u64) -> LinkError {
    if let Err(err) = shared.register(&conn) {
        return err;
    }
    let mut reader = match conn.try_clone() {
        Ok(reader) => reader,
        Err(err) => return LinkError::Lost(err),
    };
    let ended = std::thread::scope(|scope| {
        let sender = std::thread::Builder::new()
            .name("nbd-forward-send".into())
            .spawn_scoped(scope, || install_and_resend(shared, conn, generation));
        let ended = match sender {
            Ok(_) => read_replies(shared, &mut reader),
            Err(err) => LinkError::Lost(err),
        };
        // A resend blocked on a full socket fails now, so the scope can end.
        let _ = reader.shutdown(Shutdown::Both);
        ended
    });
    uninstall(shared, generation);
    ended
}

/// Reads replies on the connection `connect` installed (nothing to resend: no request was
/// submitted before it), until it fails.
fn serve_installed(shared: &Shared, mut reader: Conn, generation: u64) -> LinkError {
    if let Err(err) = shared.register(&reader) {
        return err;
    }
    let ended = read_replies(shared, &mut reader);
    let _ = reader.shutdown(Shutdown::Both);
    uninstall(shared, generation);
    ended
}

/// Removes connection `generation` (if still installed) and the last handles on it.
fn uninstall(shared: &Shared, generation: u64) {
    let mut writer = lock(&shared.writer);
    if writer.generation == generation {
        writer.conn = None;
    }
    drop(writer);
    *lock(&shared.closer) = None; // the last handle: the socket is closed
}

/// Installs `conn` and resends, in submission order, every request that was ready at that
/// moment, all under the writer lock: a request a submitter sends later is sent on this
/// connection by that submitter, never twice.
fn install_and_resend(shared: &Shared, conn: Conn, generation: u64) {
    let mut writer = lock(&shared.writer);
    writer.generation = generation;
    writer.conn = Some(conn);
    let mut held: Vec<(u64, u64)> = lock(&shared.pending)
        .iter()
        .filter(|(_, entry)| entry.ready)
        .map(|(tag, entry)| (entry.seq, *tag))
        .collect();
    held.sort_unstable();
    let conn = writer.conn.as_mut().expect("installed above");
    for &(_, tag) in &held {
        // The payload leaves the map while it is written: no socket I/O under `pending`.
        let taken = lock(&shared.pending).get_mut(&tag).map(|entry| {
            let writes = entry.header.command == wire::CMD_WRITE;
            (entry.header, if writes { entry.buf.take() } else { None })
        });
        let Some((header, payload)) = taken else {
            continue; // answered meanwhile
        };
        let sent = send(conn, &header, payload.as_ref());
        if let Some(buf) = payload {
            if let Some(entry) = lock(&shared.pending).get_mut(&tag) {
                entry.buf = Some(buf);
            } // else answered while written: completes without its buffer
        }
        if let Err(err) = sent {
            log::debug!("forward target {}: resend failed: {err}", shared.name());
            let _ = conn.shutdown(Shutdown::Both);
            writer.conn = None;
            return;
        }
    }
    if !held.is_empty() {
        log::info!(
            "forward target {}: resent {} held requests",
            shared.name(),
            held.len()
        );
    }
}

/// Reads replies until the connection fails (or stays silent past the hold while requests
/// wait). A READ whose data was cut off goes back to the held requests.
fn read_replies(shared: &Shared, conn: &mut Conn) -> LinkError {
    // Replies leave `pending` below without telling the gauge: only right while not holding.
    debug_assert!(!shared.holding.load(std::sync::atomic::Ordering::Relaxed));
    // The socket's receive timeout is a tick to look at the hold; reads resume after it.
    let tick = (shared.hold / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    if let Err(err) = conn.set_read_timeout(Some(tick)) {
        return LinkError::Lost(err);
    }
    let mut heard = Instant::now();
    loop {
        let mut head = [0u8; wire::SIMPLE_REPLY_BYTES];
        if let Err(err) = read_full(shared, conn, &mut head, &mut heard) {
            return err;
        }
        let reply = match wire::parse_simple_reply(&head) {
            Ok(reply) => reply,
            Err(err) => return LinkError::Protocol(err.to_string()),
        };
        let tag = reply.cookie;
        let Some(mut entry) = lock(&shared.pending).remove(&tag) else {
            return LinkError::Protocol(format!("reply for unknown request {tag}"));
        };
        if reply.error == 0 && entry.header.command == wire::CMD_READ {
            let start = entry.data_start;
            let len = entry.header.length_bytes as usize;
            let buf = entry.buf.as_mut().expect("a read has a buffer");
            let data = &mut buf.as_mut_slice()[start..start + len];
            if let Err(err) = read_full(shared, conn, data, &mut heard) {
                lock(&shared.pending).insert(tag, entry);
                return err;
            }
        }
        let result = match reply.error {
            0 => Ok(()),
            code => Err(io::Error::from_raw_os_error(nbd_to_errno(code))),
        };
        shared.finish(tag, entry, result);
    }
}

/// Fills `buf` from the socket, across receive-timeout ticks; on each tick, gives up when the
/// engine stops or when a request waited past the hold and nothing came for as long.
fn read_full(
    shared: &Shared,
    conn: &mut Conn,
    buf: &mut [u8],
    heard: &mut Instant,
) -> Result<(), LinkError> {
    let mut filled = 0;
    while filled < buf.len() {
        match conn.read(&mut buf[filled..]) {
            Ok(0) => return Err(LinkError::Lost(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => {
                filled += n;
                *heard = Instant::now();
            }
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                if shared.stopping() {
                    return Err(LinkError::Stopped);
                }
                let now = Instant::now();
                if expired(*heard, now, shared.hold) && shared.holds_expired(now) {
                    return Err(LinkError::Silent {
                        hold_ms: shared.hold_ms(),
                    });
                }
            }
            Err(err) => return Err(LinkError::Lost(err)),
        }
    }
    Ok(())
}

/// NBD error values are Linux errno values for the ones that exist (spec: "Error values").
fn nbd_to_errno(code: u32) -> i32 {
    i32::try_from(code).unwrap_or(nix::libc::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: reconnect attempts start fast and settle at five a second. Method: the first
    // delays of a fresh backoff.
    #[test]
    fn backoff_doubles_to_its_cap() {
        let mut backoff = Backoff::new();
        let delays: Vec<u64> = (0..8)
            .map(|_| backoff.next_delay().as_millis() as u64)
            .collect();
        assert_eq!(delays, [50, 100, 200, 200, 200, 200, 200, 200]);
    }
}
