//! The control API's HTTP/1.1 server: one listener thread that accepts connections and reads
//! request heads with poll(2), and a few fixed workers that read bodies, answer, and hand
//! kept-alive connections back.
//!
//! ```text
//!            accept ─► idle set (≤ MAX_CONNECTIONS, oldest evicted) ─poll─► head complete?
//!  listener ─┘   ▲                                                          │ try_send
//!                └────────── Back::Idle(conn) + wake ◄── worker ◄── jobs (≤ QUEUE_DEPTH)
//! ```
//!
//! Everything a peer can make the agent spend is bounded before authentication: at most
//! [`MAX_CONNECTIONS`] connections (a newcomer evicts the longest idle one), each with a
//! head buffer of at most [`MAX_HEAD_BYTES`] that must complete within [`HEAD_DEADLINE`];
//! no thread is started after [`start`] returns, so a thread limit cannot stop the API; and
//! accept errors (out of descriptors) back off from [`BACKOFF_MIN`] to [`BACKOFF_MAX`]
//! instead of ending the loop, so the API serves again once descriptors are free.
//!
//! On a TLS listener ([`start_tls`]) each connection's handshake runs here, without
//! blocking, before its head is read ([`super::tls`]); it must end within [`HEAD_DEADLINE`]
//! of the accept (the head's own deadline starts at its first decrypted byte), and a
//! connection that never finishes it counts against [`MAX_CONNECTIONS`] like any idle one.
//!
//! Bodies, answers and the [`Service`] that makes them are the workers' side
//! ([`super::worker`]).

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::http::{self, Head, MAX_HEAD_BYTES};
use super::tls::{ServerTls, Stream};
use super::worker::{refuse, wake, work, Back, Conn, Job};
use super::ApiError;

pub use super::worker::{
    Service, BODY_DEADLINE, LINGER_DEADLINE, LINGER_MAX_BYTES, WRITE_DEADLINE,
};

/// Most connections open at once (idle, queued and being answered).
pub const MAX_CONNECTIONS: usize = 64;
/// Requests with a complete head waiting for a worker; beyond, a request gets 503.
pub const QUEUE_DEPTH: usize = 16;
/// Time from a connection's first head byte (from the accept, on a new connection) to the
/// end of its head.
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// How long a kept-alive connection may wait for its next request.
pub const KEEP_ALIVE_IDLE: Duration = Duration::from_secs(60);
/// First pause after an accept error (out of descriptors or memory).
pub const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after repeated accept errors.
pub const BACKOFF_MAX: Duration = Duration::from_millis(100);
/// Bytes read from a connection in one go while its head is incomplete.
const READ_CHUNK_BYTES: usize = 4096;
/// Connections accepted in one turn of the loop, so one flood cannot starve the rest.
const ACCEPT_BURST: usize = 16;
/// Longest poll, so `stopping` is seen even if a wake-up is lost.
const POLL_MAX: Duration = Duration::from_secs(1);
/// At most one warning about accept or poll failures per this long (a flood must not fill
/// the log).
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A running server: a listener thread and its workers.
pub struct Running {
    local_addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    waker: Arc<UnixStream>,
    listener: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("local_addr", &self.local_addr)
            .field("workers", &self.workers.len())
            .finish_non_exhaustive()
    }
}

/// Binds `addr` and starts a listener thread and `workers` workers answering with
/// `service`. Every thread is started here: failing to start one is an error, and nothing
/// starts a thread later.
pub fn start(
    addr: SocketAddr,
    workers: usize,
    name: &str,
    service: Arc<dyn Service>,
) -> Result<Running, ApiError> {
    start_tls(addr, workers, name, service, None)
}

/// [`start`], every connection TLS when `tls` is given.
pub fn start_tls(
    addr: SocketAddr,
    workers: usize,
    name: &str,
    service: Arc<dyn Service>,
    tls: Option<ServerTls>,
) -> Result<Running, ApiError> {
    assert!(workers > 0, "a server needs a worker");
    let bind_err = |source| ApiError::Bind { addr, source };
    let listener = TcpListener::bind(addr).map_err(bind_err)?;
    listener.set_nonblocking(true).map_err(bind_err)?;
    let local_addr = listener.local_addr().map_err(bind_err)?;
    let (wake_rx, waker) = UnixStream::pair().map_err(ApiError::Setup)?;
    wake_rx.set_nonblocking(true).map_err(ApiError::Setup)?;
    waker.set_nonblocking(true).map_err(ApiError::Setup)?;
    let (job_tx, job_rx) = crossbeam_channel::bounded::<Job>(QUEUE_DEPTH);
    // Each connection held by a worker sends exactly one Back: this bound never blocks.
    let (back_tx, back_rx) = crossbeam_channel::bounded::<Back>(MAX_CONNECTIONS);
    let mut running = Running {
        local_addr,
        stopping: Arc::new(AtomicBool::new(false)),
        waker: Arc::new(waker),
        listener: None,
        workers: Vec::with_capacity(workers),
    };
    for index in 0..workers {
        let (jobs, back) = (job_rx.clone(), back_tx.clone());
        let (waker, service) = (running.waker.clone(), service.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-{index}"))
            .spawn(move || work(&jobs, &back, &waker, service.as_ref()));
        match spawned {
            Ok(worker) => running.workers.push(worker),
            Err(err) => {
                // Without a sender, the workers already started end; `running` joins them.
                drop(job_tx);
                return Err(ApiError::Spawn(err));
            }
        }
    }
    let mut event_loop = Loop {
        listener,
        wake_rx,
        jobs: job_tx,
        back: back_rx,
        idle: Vec::with_capacity(MAX_CONNECTIONS),
        busy: 0,
        backoff: None,
        warned: None,
        stopping: running.stopping.clone(),
        tls,
    };
    // On failure the closure, and with it the job sender, is dropped: the workers end.
    let listener = std::thread::Builder::new()
        .name(format!("{name}-listen"))
        .spawn(move || event_loop.run())
        .map_err(ApiError::Spawn)?;
    running.listener = Some(listener);
    Ok(running)
}

impl Running {
    /// The bound address (the real port when the configured one was 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes idle connections, lets each worker finish the request it
    /// holds, and joins every thread. Idempotent.
    pub fn stop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        wake(&self.waker);
        if let Some(listener) = self.listener.take() {
            if listener.join().is_err() {
                log::error!("the API listener thread panicked");
            }
        }
        // The listener's end of the job queue is gone: each worker ends after its request.
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                log::error!("an API worker panicked");
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The listener thread's state.
struct Loop {
    listener: TcpListener,
    wake_rx: UnixStream,
    jobs: Sender<Job>,
    back: Receiver<Back>,
    /// Connections waiting for (the rest of) a head, owned here.
    idle: Vec<Conn>,
    /// Connections queued or held by workers.
    busy: usize,
    /// Accepting paused until then, after an accept error; the current pause.
    backoff: Option<(Instant, Duration)>,
    /// When the last accept or poll failure was logged.
    warned: Option<Instant>,
    stopping: Arc<AtomicBool>,
    /// Every connection is TLS when set.
    tls: Option<ServerTls>,
}

impl Loop {
    fn run(&mut self) {
        while !self.stopping.load(Ordering::Acquire) {
            self.take_back();
            self.expire(Instant::now());
            let (wake, accept, readable) = match self.poll() {
                Ok(ready) => ready,
                Err(err) => {
                    self.poll_failed(err);
                    continue;
                }
            };
            if wake {
                self.drain_wakes();
            }
            // Highest index first: `read` may remove the connection it reads.
            for index in readable.into_iter().rev() {
                self.read(index);
            }
            if accept {
                self.accept();
            }
        }
        log::debug!(
            "API listener on {:?} stopping: {} idle connections closed",
            self.listener.local_addr().ok(),
            self.idle.len()
        );
    }

    /// Polls the wake pipe, the listening socket (unless backing off) and every idle
    /// connection; returns what is ready.
    fn poll(&mut self) -> nix::Result<(bool, bool, Vec<usize>)> {
        let now = Instant::now();
        let backing_off = self.backoff.is_some_and(|(until, _)| now < until);
        let mut fds = Vec::with_capacity(self.idle.len() + 2);
        fds.push(PollFd::new(self.wake_rx.as_fd(), PollFlags::POLLIN));
        if !backing_off {
            fds.push(PollFd::new(self.listener.as_fd(), PollFlags::POLLIN));
        }
        for conn in &self.idle {
            let sock = conn
                .stream
                .socket()
                .expect("idle connections have a socket");
            fds.push(PollFd::new(sock.as_fd(), conn.stream.interest()));
        }
        nix::poll::poll(&mut fds, self.timeout(now))?;
        let ready = |fd: &PollFd| fd.revents().is_some_and(|events| !events.is_empty());
        let wake = ready(&fds[0]);
        let first_conn = if backing_off { 1 } else { 2 };
        let accept = !backing_off && ready(&fds[1]);
        let readable = (first_conn..fds.len())
            .filter(|&i| ready(&fds[i]))
            .map(|i| i - first_conn)
            .collect();
        Ok((wake, accept, readable))
    }

    /// Until the next deadline or the end of the backoff, at most [`POLL_MAX`].
    fn timeout(&self, now: Instant) -> PollTimeout {
        let next = self
            .idle
            .iter()
            .map(|conn| conn.deadline)
            // A pause already over is no deadline (polling with 0 would spin).
            .chain(
                self.backoff
                    .map(|(until, _)| until)
                    .filter(|until| *until > now),
            )
            .min();
        let wait = next.map_or(POLL_MAX, |at| at.saturating_duration_since(now));
        // Rounded up, so the loop does not spin for the last partial millisecond.
        let millis = wait.min(POLL_MAX).as_micros().div_ceil(1000);
        PollTimeout::from(u16::try_from(millis).unwrap_or(u16::MAX))
    }

    /// poll(2) failed: EINTR is nothing; anything else (EINVAL when the descriptor limit
    /// fell below the number polled, ENOMEM) costs the oldest idle connection and a pause.
    #[cold]
    fn poll_failed(&mut self, err: nix::errno::Errno) {
        if err == nix::errno::Errno::EINTR {
            return;
        }
        if self.may_warn() {
            log::warn!("control API: poll failed ({err}); closing the oldest idle connection");
        }
        self.evict_oldest();
        std::thread::sleep(BACKOFF_MIN);
    }

    /// Whether a failure may be logged now (once per [`WARN_EVERY`]).
    fn may_warn(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .warned
            .is_none_or(|at| now.duration_since(at) >= WARN_EVERY);
        if due {
            self.warned = Some(now);
        }
        due
    }

    fn drain_wakes(&mut self) {
        let mut scratch = [0u8; 64];
        while matches!(self.wake_rx.read(&mut scratch), Ok(n) if n > 0) {}
    }

    /// Takes back what workers finished: kept-alive connections become idle (and are read
    /// at once if they already hold a pipelined head).
    fn take_back(&mut self) {
        while let Ok(back) = self.back.try_recv() {
            self.busy = self.busy.saturating_sub(1);
            let Back::Idle(mut conn) = back else { continue };
            let now = Instant::now();
            conn.since = now;
            conn.deadline = now
                + if conn.buf.is_empty() {
                    KEEP_ALIVE_IDLE
                } else {
                    HEAD_DEADLINE
                };
            self.idle.push(conn);
            let last = self.idle.len() - 1;
            if self.idle[last].stream.has_buffered_input() {
                // Decrypted bytes poll(2) cannot see (a pipelined request).
                self.read(last);
            } else if !self.idle[last].buf.is_empty() {
                self.parse(last);
            }
        }
    }

    /// Closes idle connections past their deadline.
    fn expire(&mut self, now: Instant) {
        self.idle.retain(|conn| {
            let alive = now < conn.deadline;
            if !alive {
                log::debug!("control API: {} idle or slow head: closed", conn.peer);
            }
            alive
        });
    }

    /// Accepts what is pending, up to [`ACCEPT_BURST`].
    fn accept(&mut self) {
        for _ in 0..ACCEPT_BURST {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    self.backoff = None;
                    self.admit(stream, peer);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if is_transient(&err) => continue,
                Err(err) => {
                    self.accept_failed(&err);
                    return;
                }
            }
        }
    }

    /// Out of descriptors (or memory, or anything unexpected): the pending connection stays
    /// in the backlog; pause accepting, and give up the oldest idle connection so that a
    /// descriptor frees up for the next try.
    #[cold]
    fn accept_failed(&mut self, err: &io::Error) {
        let pause = match self.backoff {
            None => BACKOFF_MIN,
            Some((_, pause)) => (pause * 2).min(BACKOFF_MAX),
        };
        if self.may_warn() {
            log::warn!(
                "control API: cannot accept a connection ({err}); backing off, closing the \
                 oldest idle connection ({} idle, {} busy)",
                self.idle.len(),
                self.busy
            );
        }
        self.backoff = Some((Instant::now() + pause, pause));
        self.evict_oldest();
    }

    fn admit(&mut self, sock: TcpStream, peer: SocketAddr) {
        let accepted = sock
            .set_nonblocking(true)
            .and_then(|()| Stream::accepted(sock, self.tls.as_ref()));
        let mut stream = match accepted {
            Ok(stream) => stream,
            Err(err) => {
                log::debug!("control API: {peer}: {err}: closed");
                return;
            }
        };
        if self.idle.len() + self.busy >= MAX_CONNECTIONS && !self.evict_oldest() {
            // Every connection is queued or being answered: the newcomer waits for none
            // (on TLS it is closed unanswered: no HTTP before a handshake).
            log::debug!("control API: {peer}: {MAX_CONNECTIONS} connections busy: closed");
            refuse(&mut stream, 503, "too many connections");
            return;
        }
        let now = Instant::now();
        self.idle.push(Conn {
            stream,
            peer,
            buf: Vec::new(),
            since: now,
            deadline: now + HEAD_DEADLINE,
        });
    }

    /// Closes the longest idle connection; false when there is none.
    fn evict_oldest(&mut self) -> bool {
        let oldest = (0..self.idle.len()).min_by_key(|&i| self.idle[i].since);
        let Some(index) = oldest else { return false };
        let conn = self.idle.swap_remove(index);
        log::debug!("control API: {}: evicted (oldest idle)", conn.peer);
        true
    }

    /// Reads what connection `index` sent (one chunk without blocking; on TLS, what the
    /// handshake needs first, then every decrypted byte up to the head's room), then parses.
    fn read(&mut self, index: usize) {
        let conn = &mut self.idle[index];
        match conn.stream.advance() {
            Ok(true) => {}
            Ok(false) => return,
            Err(err) => {
                log::debug!("control API: {}: TLS handshake: {err}: closed", conn.peer);
                self.idle.swap_remove(index);
                return;
            }
        }
        let room = MAX_HEAD_BYTES.saturating_sub(conn.buf.len());
        let start = conn.buf.len();
        let chunk = match conn.stream {
            Stream::Plain(_) => room.min(READ_CHUNK_BYTES),
            // Decrypted bytes left in the session would not wake poll(2): take them all.
            _ => room,
        };
        conn.buf.resize(start + chunk, 0);
        let result = conn.stream.read_ready(&mut conn.buf[start..]);
        conn.buf.truncate(start + *result.as_ref().unwrap_or(&0));
        match result {
            Ok(0) if room > 0 => {
                self.idle.swap_remove(index);
            }
            Ok(_) => {
                if start == 0 && !conn.buf.is_empty() {
                    // The first byte of a head starts its deadline.
                    conn.deadline = Instant::now() + HEAD_DEADLINE;
                }
                self.parse(index);
            }
            Err(err) if is_transient(&err) || err.kind() == io::ErrorKind::WouldBlock => {}
            Err(err) => {
                log::debug!("control API: {}: {err}: closed", conn.peer);
                self.idle.swap_remove(index);
            }
        }
    }

    /// Hands connection `index` to a worker if its head is complete; refuses and closes it
    /// if the head is bad or too large.
    fn parse(&mut self, index: usize) {
        match http::parse_head(&self.idle[index].buf) {
            Ok(None) => {}
            Ok(Some(head)) => {
                let conn = self.idle.swap_remove(index);
                self.dispatch(conn, head);
            }
            Err(err) => {
                let mut conn = self.idle.swap_remove(index);
                log::debug!("control API: {}: {err}: refused", conn.peer);
                refuse(&mut conn.stream, err.http_status(), &err.to_string());
            }
        }
    }

    fn dispatch(&mut self, conn: Conn, head: Head) {
        match self.jobs.try_send(Job { conn, head }) {
            Ok(()) => self.busy += 1,
            Err(TrySendError::Full(mut job) | TrySendError::Disconnected(mut job)) => {
                log::warn!("control API: {}: request queue full: 503", job.conn.peer);
                refuse(&mut job.conn.stream, 503, "the agent is busy, try again");
            }
        }
    }
}

/// Accept and read errors after which the next try may work at once.
fn is_transient(err: &io::Error) -> bool {
    use io::ErrorKind as Kind;
    matches!(
        err.kind(),
        Kind::Interrupted | Kind::ConnectionAborted | Kind::ConnectionReset
    )
}
