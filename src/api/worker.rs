//! The control API's workers: each answers one request at a time on a connection whose head
//! the listener ([`super::listen`]) has read, then hands the connection back (kept alive)
//! or closes it.
//!
//! A body is read only when the [`Service`] admits it (the API: a valid token), up to
//! [`MAX_BODY_BYTES`] within [`BODY_DEADLINE`]. A refused body is never read from an
//! unauthenticated peer: the connection is answered and closed. For an admitted peer whose
//! body is too large, the answer is followed by a short lingering close (at most
//! [`LINGER_MAX_BYTES`] discarded within [`LINGER_DEADLINE`], into a fixed stack buffer), so
//! the client reads the 413 instead of a connection reset while it is still sending. Every
//! answer is sent within [`WRITE_DEADLINE`], so a peer that does not read cannot hold a
//! worker longer.
//!
//! A worker sees a connection only after its TLS handshake (if any) is over; it reads and
//! writes through the session ([`super::tls::Stream`]) with the same deadlines, set on the
//! socket underneath.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use super::http::{self, Head, Reply, MAX_BODY_BYTES};
use super::tls::Stream;

/// Time to receive a whole admitted body.
pub const BODY_DEADLINE: Duration = Duration::from_secs(15);
/// Time to send a whole answer.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(15);
/// Bytes discarded at most, after a 413, from an admitted peer still sending its body.
pub const LINGER_MAX_BYTES: u64 = 16 << 20;
/// Time spent at most discarding them.
pub const LINGER_DEADLINE: Duration = Duration::from_secs(2);
/// Bytes of a body read in one go (into the body's own buffer, reserved whole up front).
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// What answers requests: the API's routes, or `/metrics` alone.
pub trait Service: Send + Sync {
    /// Whether a request with this head may send its body: checked before any body byte is
    /// read. `Err` is the answer, after which the connection closes.
    fn admit_body(&self, head: &Head) -> Result<(), Reply>;
    /// The answer to a request whose body (empty when none) was read whole.
    fn answer(&self, head: &Head, body: &[u8], peer: SocketAddr) -> Reply;
}

/// A connection and what was read from it but not yet used.
pub(super) struct Conn {
    /// Plain, or TLS (its handshake over once a worker holds it).
    pub(super) stream: Stream,
    pub(super) peer: SocketAddr,
    /// Bytes read and not yet consumed: the head being read, or the start of the next one.
    pub(super) buf: Vec<u8>,
    /// When it last became idle: the oldest is evicted first.
    pub(super) since: Instant,
    /// Closed if its head is not complete by then.
    pub(super) deadline: Instant,
}

/// A request for a worker: `head` parsed from the start of `conn.buf`.
pub(super) struct Job {
    pub(super) conn: Conn,
    pub(super) head: Head,
}

/// What a worker hands back to the listener for each job.
pub(super) enum Back {
    /// Kept alive: poll it for the next request.
    Idle(Conn),
    /// Closed.
    Closed,
}

/// Makes the listener's poll return. A full wake pipe already holds a wake-up, so
/// WouldBlock (and any other error: the listener is gone) is ignored.
pub(super) fn wake(waker: &UnixStream) {
    let _ = (&*waker).write(&[1]);
}

/// Best effort, without blocking: a short error answer on a connection about to close.
/// Nothing is sent on a TLS connection whose handshake is not over.
#[cold]
pub(super) fn refuse(stream: &mut Stream, status: u16, message: &str) {
    let bytes = Reply::error(status, message).encode(true, false);
    if matches!(stream, Stream::Handshake(_) | Stream::Failed) {
        return;
    }
    // A few hundred bytes fit the socket buffer of any live peer; a peer that does not read
    // loses the answer, not the agent's time.
    if stream
        .socket()
        .is_some_and(|sock| sock.set_nonblocking(true).is_ok())
    {
        let _ = stream.write(&bytes);
    }
}

/// One worker: answers jobs until the listener is gone.
pub(super) fn work(
    jobs: &Receiver<Job>,
    back: &Sender<Back>,
    waker: &UnixStream,
    service: &dyn Service,
) {
    while let Ok(job) = jobs.recv() {
        let kept = serve(job, service);
        // Fails only when the listener has stopped: the connection closes with it.
        let _ = back.send(kept.map_or(Back::Closed, Back::Idle));
        wake(waker);
    }
}

/// Answers one request; the connection back when it stays open.
fn serve(job: Job, service: &dyn Service) -> Option<Conn> {
    let Job { mut conn, head } = job;
    conn.buf.drain(..head.head_bytes);
    if let Err(err) = conn.stream.socket()?.set_nonblocking(false) {
        log::debug!("control API: {}: {err}: closed", conn.peer);
        return None;
    }
    let body = if head.body_bytes == 0 {
        Vec::new()
    } else {
        read_admitted_body(&mut conn, &head, service)?
    };
    let reply = service.answer(&head, &body, conn.peer);
    let keep = head.keep_alive;
    respond(&mut conn, &head, &reply, !keep).ok()?;
    let nonblocking = conn.stream.socket().map(|sock| sock.set_nonblocking(true));
    if !keep || !matches!(nonblocking, Some(Ok(()))) {
        return None;
    }
    Some(conn)
}

/// The body of `head`, if `service` admits it and it fits; otherwise answers and closes.
fn read_admitted_body(conn: &mut Conn, head: &Head, service: &dyn Service) -> Option<Vec<u8>> {
    if let Err(reply) = service.admit_body(head) {
        // Unauthenticated: not one more byte is read.
        let _ = respond(conn, head, &reply, true);
        return None;
    }
    let Some(body_bytes) = usize::try_from(head.body_bytes)
        .ok()
        .filter(|&n| n <= MAX_BODY_BYTES)
    else {
        let reply = Reply::error(
            413,
            format!("request body larger than {MAX_BODY_BYTES} bytes"),
        );
        if respond(conn, head, &reply, true).is_ok() {
            linger(conn);
        }
        return None;
    };
    let continued = Instant::now() + WRITE_DEADLINE;
    if head.expect_continue && write_within(&mut conn.stream, http::CONTINUE, continued).is_err() {
        return None;
    }
    match read_body(conn, body_bytes) {
        Ok(body) => Some(body),
        Err(err) => {
            log::debug!("control API: {}: body: {err}: closed", conn.peer);
            if err.kind() == io::ErrorKind::TimedOut {
                let _ = respond(
                    conn,
                    head,
                    &Reply::error(408, "request body too slow"),
                    true,
                );
            }
            None
        }
    }
}

/// Reads exactly `body_bytes` (what the head buffer holds first), within [`BODY_DEADLINE`].
fn read_body(conn: &mut Conn, body_bytes: usize) -> io::Result<Vec<u8>> {
    let mut body = Vec::with_capacity(body_bytes);
    let buffered = conn.buf.len().min(body_bytes);
    body.extend(conn.buf.drain(..buffered));
    let deadline = Instant::now() + BODY_DEADLINE;
    while body.len() < body_bytes {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        socket(&conn.stream)?.set_read_timeout(Some(left))?;
        let start = body.len();
        body.resize(body_bytes.min(start + READ_CHUNK_BYTES), 0);
        let result = conn.stream.read(&mut body[start..]);
        body.truncate(start + *result.as_ref().unwrap_or(&0));
        match result {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(body)
}

/// Sends `reply` (its head only for HEAD) within [`WRITE_DEADLINE`].
fn respond(conn: &mut Conn, head: &Head, reply: &Reply, close: bool) -> io::Result<()> {
    let bytes = reply.encode(close, head.method == http::Method::Head);
    write_within(&mut conn.stream, &bytes, Instant::now() + WRITE_DEADLINE).inspect_err(|err| {
        log::debug!("control API: {}: answer not sent: {err}", conn.peer);
    })
}

/// Writes all of `bytes` by `deadline` (a peer that reads slowly cannot hold a worker
/// longer).
fn write_within(stream: &mut Stream, mut bytes: &[u8], deadline: Instant) -> io::Result<()> {
    while !bytes.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        socket(stream)?.set_write_timeout(Some(left))?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            // SO_SNDTIMEO expired: the deadline check above ends it.
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// After answering an admitted peer that is still sending a refused body: stop sending,
/// then discard what arrives for a bounded time, so that closing does not reset the
/// connection before the peer has read the answer.
fn linger(conn: &mut Conn) {
    // Discarded as received: on TLS too, the socket is read directly (nothing is decrypted).
    let Some(mut sock) = conn.stream.socket() else {
        return;
    };
    let _ = sock.shutdown(Shutdown::Write);
    let mut scratch = [0u8; 16 * 1024];
    let mut discarded_bytes = 0u64;
    let deadline = Instant::now() + LINGER_DEADLINE;
    while discarded_bytes < LINGER_MAX_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match sock.read(&mut scratch) {
            Ok(0) => return,
            Ok(n) => discarded_bytes += n as u64,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// The socket of a connection a worker holds (a failed handshake never reaches one).
fn socket(stream: &Stream) -> io::Result<&std::net::TcpStream> {
    stream
        .socket()
        .ok_or_else(|| io::Error::other("connection failed"))
}
