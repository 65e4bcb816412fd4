//! The NBD listeners (unix socket, optional TCP) and one thread per connection: handshake,
//! then a [`Session`].
//!
//! With TLS credentials the TCP listener requires TLS: nothing but STARTTLS is answered
//! before the TLS handshake (see [`handshake::await_starttls`]), and the session runs over
//! TLS. The unix socket stays plaintext, guarded by its mode (0600 from its creation).
//!
//! Invariants: a failed handshake or session ends that connection only; stopping the server
//! first stops accepting, then shuts down the read side of every connection, so each session
//! answers what it already received before its thread exits.
//!
//! Bounds (DESIGN invariant 6, [`ServerLimits`]): each listener admits connections through
//! its own [`Admission`] (handshaking and serving peers capped apart, the oldest handshake
//! evicted for a newcomer, a handshake deadline), so idle or trickling peers cost at most
//! the handshaking cap in threads and descriptors; every session's buffers come from a pool
//! bounded by the connection's budget and the agent's [`Budget`]; a failing `accept`
//! (EMFILE) backs off and the listener keeps listening.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rustls::ServerConfig;

use crate::disk::{Export, Route};
use crate::io::{open_engine, EngineKind};
use crate::nbd::admission::{
    accept_failed, out_of_descriptors, AcceptBackoff, Admission, AdmissionLimits, Ticket,
};
use crate::nbd::blockstatus;
use crate::nbd::bufpool::{Budget, BufPool};
use crate::nbd::conn::Conn;
use crate::nbd::forward::{ForwardEngine, ForwardTarget};
use crate::nbd::handshake;
use crate::nbd::session::{EngineFactory, Session, SessionLimits};
use crate::nbd::tls::{self, TlsCreds};
use crate::nbd::wire::{ExportCatalog, ExportInfo, BLOCK_MAX_BYTES, BLOCK_PREFERRED_BYTES};

/// What the NBD handshake advertises for `export`.
pub fn export_info(export: &Export) -> ExportInfo {
    let mut meta_contexts = vec!["base:allocation".to_string()];
    let trackers = export.trackers().list();
    for tracker in &trackers {
        meta_contexts.push(format!("qemu:dirty-bitmap:{}", tracker.name()));
    }
    if !trackers.is_empty() {
        meta_contexts.push(blockstatus::HEAT_CONTEXT.to_string());
    }
    for tracker in &trackers {
        meta_contexts.push(format!("{}{}", blockstatus::HEAT_PREFIX, tracker.name()));
    }
    let read_only = export.read_only();
    ExportInfo {
        name: export.name().to_string(),
        // Forwarders check the lineage: another disk under this name and size says so.
        description: format!(
            "ferry export {} {}",
            export.name(),
            crate::disk::lineage_token(export.lineage())
        ),
        size_bytes: export.size_bytes(),
        read_only,
        // Every connection's writes reach the same file, O_DIRECT or through the one page
        // cache, and FLUSH is an fdatasync of that file: a flush on any connection covers
        // writes completed on all of them, which is what MULTI_CONN promises.
        multi_conn: true,
        can_trim: !read_only,
        can_fast_zero: !read_only,
        block_min: 1,
        block_preferred: BLOCK_PREFERRED_BYTES,
        block_max: BLOCK_MAX_BYTES,
        meta_contexts,
    }
}

/// What the server needs from the agent: the catalog for the handshake and the live export.
pub trait ExportLookup: ExportCatalog + Send + Sync {
    /// The export a negotiated name refers to.
    fn export(&self, name: &str) -> Option<Arc<Export>>;
}

/// Per-connection settings.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// io engine of each connection.
    pub engine: EngineKind,
    /// Requests in flight per connection.
    pub queue_depth: u32,
    /// The engine also waits for the socket (one wait for disk and network).
    pub engine_watches_socket: bool,
    /// How long a forwarded request waits for a destination that is away before it fails
    /// with EIO (the forwarding engine reconnects meanwhile), for exports without their own.
    pub forward_hold: Duration,
    /// TLS credentials: the TCP listener requires TLS with their server identity, and
    /// forwarding dials with their client identity. None: plaintext on both.
    pub tls: Option<TlsCreds>,
    /// Connection caps, deadlines and byte budgets.
    pub limits: ServerLimits,
}

/// Resource bounds of the NBD server (the agent's `[agent.limits]`).
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Caps and handshake deadline, per listener.
    pub admission: AdmissionLimits,
    /// Time from a request's first byte to its last (header and WRITE payload).
    pub request_deadline: Duration,
    /// Longest a reply write may make no progress.
    pub reply_deadline: Duration,
    /// Buffers of one connection (bytes in flight plus kept).
    pub connection_bytes: usize,
    /// Buffers in flight of all connections (the agent's budget, shared).
    pub budget: Arc<Budget>,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            admission: AdmissionLimits::NBD,
            request_deadline: Duration::from_secs(60),
            reply_deadline: Duration::from_secs(60),
            connection_bytes: 64 << 20,
            budget: Budget::new(1 << 30),
        }
    }
}

/// A running NBD server.
#[derive(Debug)]
pub struct NbdServer {
    stop: Arc<AtomicBool>,
    /// One per listener, with its reaper thread.
    admissions: Vec<(Arc<Admission>, JoinHandle<()>)>,
    acceptors: Vec<(JoinHandle<()>, Wake)>,
    /// Bound TCP address, if TCP is on.
    pub tcp_addr: Option<SocketAddr>,
    /// Unix socket path.
    pub socket: Option<PathBuf>,
}

/// How to wake a blocked `accept`: connect to it.
#[derive(Debug, Clone)]
enum Wake {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl NbdServer {
    /// Binds the listeners and starts accepting.
    pub fn start(
        socket: Option<&Path>,
        tcp: Option<SocketAddr>,
        lookup: Arc<dyn ExportLookup>,
        options: SessionOptions,
    ) -> io::Result<NbdServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut server = NbdServer {
            stop,
            admissions: Vec::new(),
            acceptors: Vec::new(),
            tcp_addr: None,
            socket: None,
        };
        if let Some(path) = socket {
            let listener = bind_unix(path)?;
            let ctx = (
                server.stop.clone(),
                server.admit("nbd-unix", &options)?,
                lookup.clone(),
            );
            let options = options.clone();
            let thread = std::thread::Builder::new()
                .name("nbd-unix".into())
                .spawn(move || {
                    accept_loop(
                        || listener.accept().map(|(s, _)| Conn::Unix(s)),
                        ctx,
                        options,
                        None,
                    )
                })?;
            server
                .acceptors
                .push((thread, Wake::Unix(path.to_path_buf())));
            server.socket = Some(path.to_path_buf());
        }
        if let Some(addr) = tcp {
            let tls = options.tls.as_ref().and_then(TlsCreds::server).cloned();
            if options.tls.is_some() && tls.is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the TLS credentials have no server identity for the TCP listener",
                ));
            }
            let listener = TcpListener::bind(addr)?;
            let bound = listener.local_addr()?;
            let ctx = (
                server.stop.clone(),
                server.admit("nbd-tcp", &options)?,
                lookup.clone(),
            );
            let accept = move || {
                let (stream, _) = listener.accept()?;
                stream.set_nodelay(true)?;
                Ok(Conn::Tcp(stream))
            };
            let thread = std::thread::Builder::new()
                .name("nbd-tcp".into())
                .spawn(move || accept_loop(accept, ctx, options, tls))?;
            server.acceptors.push((thread, Wake::Tcp(bound)));
            server.tcp_addr = Some(bound);
        }
        Ok(server)
    }

    /// The admission of a new listener, its reaper started.
    fn admit(
        &mut self,
        what: &'static str,
        options: &SessionOptions,
    ) -> io::Result<Arc<Admission>> {
        let admission = Admission::new(what, options.limits.admission);
        let reaper = admission.start_reaper()?;
        self.admissions.push((admission.clone(), reaper));
        Ok(admission)
    }

    /// Connections (handshaking, serving) of all listeners.
    pub fn connection_counts(&self) -> (usize, usize) {
        self.admissions
            .iter()
            .map(|(admission, _)| admission.counts())
            .fold((0, 0), |(h, s), (h1, s1)| (h + h1, s + s1))
    }

    /// Stops accepting, asks every connection to finish, and waits up to `grace` for them.
    /// Returns the number of connections still alive after the wait.
    pub fn shutdown(&mut self, grace: Duration) -> usize {
        self.stop.store(true, Ordering::Release);
        for (thread, wake) in self.acceptors.drain(..) {
            // A connection wakes the blocked accept, which then sees the stop flag.
            let _ = match &wake {
                Wake::Unix(path) => UnixStream::connect(path).map(drop),
                Wake::Tcp(addr) => TcpStream::connect(addr).map(drop),
            };
            let _ = thread.join();
            if let Wake::Unix(path) = wake {
                let _ = std::fs::remove_file(path);
            }
        }
        for (admission, _) in &self.admissions {
            admission.stop(Shutdown::Read);
        }
        let deadline = std::time::Instant::now() + grace;
        let mut alive = 0;
        for (admission, reaper) in self.admissions.drain(..) {
            let _ = reaper.join();
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            alive += admission.wait_empty(left);
        }
        alive
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        if !self.acceptors.is_empty() || !self.admissions.is_empty() {
            self.shutdown(Duration::from_secs(5));
        }
    }
}

/// Removes a stale socket file (only if nothing answers on it), creates the parent directory.
fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    // Whoever connects reads and writes every export: the owner only (the agent may open it
    // to a group afterwards, `socket_group`).
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

type Ctx = (Arc<AtomicBool>, Arc<Admission>, Arc<dyn ExportLookup>);

/// Accepts connections until stopped; `tls`: each must go through STARTTLS with it.
fn accept_loop(
    mut accept: impl FnMut() -> io::Result<Conn>,
    ctx: Ctx,
    options: SessionOptions,
    tls: Option<Arc<ServerConfig>>,
) {
    let (stop, admission, lookup) = ctx;
    let mut backoff = AcceptBackoff::default();
    let mut next_id = 0u64;
    loop {
        let conn = accept();
        if stop.load(Ordering::Acquire) {
            return;
        }
        let conn = match conn {
            Ok(conn) => conn,
            Err(err) => {
                // EMFILE and friends: the listener stays, a little later.
                accept_failed(&admission, &mut backoff, &err);
                continue;
            }
        };
        backoff.succeeded();
        let closer = match clone_for_admission(&conn, &admission) {
            Ok(clone) => Box::new(clone),
            Err(err) => {
                log::warn!("NBD connection refused: cannot clone its socket: {err}");
                continue;
            }
        };
        let Ok(ticket) = admission.admit(closer) else {
            continue; // stopping
        };
        next_id += 1;
        let (lookup, options, tls) = (lookup.clone(), options.clone(), tls.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("nbd-conn-{next_id}"))
            .spawn(move || serve_connection(conn, &ticket, &*lookup, options, tls.as_ref()));
        if let Err(err) = spawned {
            // The closure, and with it the ticket and the socket, is dropped.
            log::warn!("NBD connection dropped: cannot start its thread: {err}");
        }
    }
}

/// A clone of `conn` for its admission entry; out of descriptors, the oldest handshake is
/// closed and the clone tried once more.
fn clone_for_admission(conn: &Conn, admission: &Admission) -> io::Result<Conn> {
    match conn.try_clone() {
        Err(err) if out_of_descriptors(&err) && admission.evict_oldest() => conn.try_clone(),
        other => other,
    }
}

/// Handshake, then the session; every error stays inside this connection.
fn serve_connection(
    conn: Conn,
    ticket: &Ticket,
    lookup: &dyn ExportLookup,
    options: SessionOptions,
    tls: Option<&Arc<ServerConfig>>,
) {
    let (conn, negotiated) = match handshake_on(conn, lookup, tls) {
        Ok(Some(agreed)) if ticket.promote().is_ok() => agreed,
        Ok(_) => return,
        Err(HandshakeFailed::Nbd(err)) => {
            log::info!("handshake failed: {err}");
            return;
        }
        Err(HandshakeFailed::Tls(err)) => {
            log::info!("TLS handshake failed: {err}");
            return;
        }
    };
    let Some(export) = lookup.export(&negotiated.export.name) else {
        log::info!(
            "export {} went away during the handshake",
            negotiated.export.name
        );
        return;
    };
    let Ok(handle) = clone_for_admission(&conn, ticket.admission()) else {
        return;
    };
    let Some(connection_id) = export.attach(Box::new(handle)) else {
        return; // removed meanwhile
    };
    let structured = negotiated.structured_replies;
    let mut conn = conn;
    let mut retried = false;
    let session = loop {
        let limits = SessionLimits {
            pool: BufPool::bounded(
                options.limits.connection_bytes,
                options.limits.budget.clone(),
            ),
            request_deadline: options.limits.request_deadline,
            reply_deadline: options.limits.reply_deadline,
        };
        let factory = engine_factory(export.clone(), options.clone());
        let contexts = negotiated.meta_contexts.clone();
        match Session::new(conn, export.clone(), factory, structured, contexts, limits) {
            Ok(session) => break Some(session),
            // Out of descriptors, most likely held by peers still in their handshake: an
            // authenticated client goes first (DESIGN invariant 6).
            Err((_, back)) if !retried && ticket.admission().evict_oldest() => {
                log::warn!(
                    "export {}: session start failed, once more after closing the oldest handshake",
                    export.name()
                );
                (conn, retried) = (back, true);
            }
            Err((err, _)) => {
                // The chain names the cause (e.g. the forwarding address refusing connections).
                let cause = crate::error::error_chain(&err);
                log::error!(
                    "export {}: cannot start the session: {cause}",
                    export.name()
                );
                break None;
            }
        }
    };
    if let Some(Err(err)) = session.map(Session::run) {
        log::info!("export {}: connection ended: {err}", export.name());
    }
    export.detach(connection_id);
}

/// Why a connection ended before transmission.
#[derive(Debug)]
enum HandshakeFailed {
    Nbd(handshake::HandshakeError),
    Tls(io::Error),
}

/// The NBD handshake, through STARTTLS and the TLS handshake when `tls` is given. Returns the
/// connection transmission runs on (TLS then) and what was agreed; None if the client aborted.
fn handshake_on(
    mut conn: Conn,
    lookup: &dyn ExportLookup,
    tls: Option<&Arc<ServerConfig>>,
) -> Result<Option<(Conn, handshake::Negotiated)>, HandshakeFailed> {
    let (Some(config), Conn::Tcp(_)) = (tls, &conn) else {
        let negotiated = handshake::negotiate(&mut conn, lookup).map_err(HandshakeFailed::Nbd)?;
        return Ok(negotiated.map(|negotiated| (conn, negotiated)));
    };
    let greeting = handshake::greet(&mut conn).map_err(HandshakeFailed::Nbd)?;
    if !handshake::await_starttls(&mut conn, greeting).map_err(HandshakeFailed::Nbd)? {
        return Ok(None);
    }
    let Conn::Tcp(stream) = conn else {
        unreachable!("matched as TCP above");
    };
    let mut conn = Conn::Tls(Box::new(
        tls::accept(stream, config).map_err(HandshakeFailed::Tls)?,
    ));
    let negotiated = handshake::haggle(&mut conn, lookup, greeting, handshake::Tls::Established)
        .map_err(HandshakeFailed::Nbd)?;
    Ok(negotiated.map(|negotiated| (conn, negotiated)))
}

/// How a session of `export` opens its engine for a route: the local io engine on the image
/// (watching the connection when enabled), or forwarding to another agent.
fn engine_factory(export: Arc<Export>, options: SessionOptions) -> EngineFactory {
    EngineFactory(Box::new(move |route: &Route, conn: &Conn| match route {
        Route::Local => {
            let watched = options.engine_watches_socket.then(|| conn.as_fd());
            open_engine(
                options.engine,
                export.image()?,
                options.queue_depth,
                watched,
            )
            .map_err(std::io::Error::from)
        }
        Route::Forward { addr, lineage } => {
            let depth = usize::try_from(options.queue_depth).unwrap_or(1);
            let target = ForwardTarget {
                tls: options.tls.as_ref().map(|creds| creds.client().clone()),
                addr: addr.clone(),
                export: export.name().to_string(),
                size_bytes: export.size_bytes(),
                lineage: *lineage,
            };
            // The export's own hold, when it has one, wins over the agent's.
            let hold = export.forward_hold().unwrap_or(options.forward_hold);
            let gauge = export.forward_gauge().clone();
            let engine = ForwardEngine::connect(target, depth, hold, gauge)?;
            Ok(Box::new(engine) as Box<dyn crate::io::BlockIo>)
        }
    }))
}
