//! TLS on the control API, for an agent whose API listens on a routable address: the
//! listener's side (a handshake the poll loop drives without blocking, then the connection
//! the workers read and write) and the client's (a `ureq` connector).
//!
//! Credentials are the NBD ones' ([`crate::nbd::tls`], QEMU's `tls-creds-x509` layout, made
//! by `ferry tls init`): the agent serves `server-cert.pem`/`server-key.pem` and trusts
//! `ca-cert.pem`; a client trusts `ca-cert.pem` and shows `client-cert.pem`/`client-key.pem`.
//!
//! Invariants:
//! - Mutual TLS, as NBD over TCP: the agent requires a client certificate chaining to its
//!   `ca-cert.pem`, and the client checks that the agent's certificate chains to its own
//!   `ca-cert.pem` and names the host it dialled (or the name the operator gave). The bearer
//!   token is still required on every route: a certificate admits a peer to the HTTP layer,
//!   the token to the API. Either alone does not let a caller in.
//! - On a TLS listener no HTTP byte is read or written before the handshake is over, and the
//!   handshake of a connection never blocks the listener: it advances only as far as its
//!   socket allows ([`Stream::advance`]) and must end within the head deadline of
//!   [`super::listen`], counted from the accept.
//! - Decrypted bytes the session holds are never left behind while the listener waits for
//!   the socket: [`Stream::read_ready`] takes all it can, and a connection handed back by a
//!   worker is read at once when [`Stream::has_buffered_input`].
//! - A worker's TLS write that times out ends the connection (it is reported as `TimedOut`,
//!   never as `WouldBlock`): the plaintext was already encrypted, so a retry would send it
//!   twice.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nix::poll::PollFlags;
use rustls::ServerConfig;

use crate::nbd::tls::{ClientTls, TlsConn, TlsCreds, TlsError};

/// Longest wait for each read or write of the client's handshake.
const CLIENT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether an API on `addr` may serve plain HTTP: only on loopback (127.0.0.0/8, `::1`, and
/// their IPv4-mapped forms). The unspecified address (`0.0.0.0`, `::`) listens on every
/// interface, so it is routable.
pub fn is_local(addr: SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// The listener's TLS configuration (server identity, client CA), compared by identity.
#[derive(Debug, Clone)]
pub struct ServerTls(pub Arc<ServerConfig>);

impl PartialEq for ServerTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ServerTls {}

impl ServerTls {
    /// Loads the server identity and the client CA from the credential directory `dir`.
    pub fn load(dir: &Path) -> Result<ServerTls, TlsError> {
        let creds = TlsCreds::load(dir, true)?;
        let config = creds.server().expect("loaded with serve = true").clone();
        Ok(ServerTls(config))
    }
}

/// What a [`super::Client`] dials an agent with over TLS: the CA (and client identity) of a
/// credential directory, and the name the agent's certificate must carry.
#[derive(Debug, Clone)]
pub struct ClientTlsOptions {
    tls: ClientTls,
    server_name: Option<String>,
}

impl ClientTlsOptions {
    /// Loads `dir` (`ca-cert.pem`, and `client-cert.pem`/`client-key.pem` when present: an
    /// agent refuses a client without them). `server_name`: the name the agent's certificate
    /// must carry; `None` takes the host part of the address dialled.
    pub fn load(dir: &Path, server_name: Option<String>) -> Result<Self, TlsError> {
        let creds = TlsCreds::load(dir, false)?;
        Ok(ClientTlsOptions {
            tls: creds.client().clone(),
            server_name,
        })
    }

    /// The `ureq` connector dialling with these options.
    pub(super) fn connector(&self) -> Arc<Connector> {
        Arc::new(Connector(self.clone()))
    }
}

/// Runs the client's handshake on the connections `ureq` opens for `https://` URLs.
#[derive(Debug)]
pub(super) struct Connector(ClientTlsOptions);

impl ureq::TlsConnector for Connector {
    fn connect(
        &self,
        dns_name: &str,
        io: Box<dyn ureq::ReadWrite>,
    ) -> Result<Box<dyn ureq::ReadWrite>, ureq::Error> {
        let sock = io
            .socket()
            .ok_or_else(|| io::Error::other("not a TCP connection"))?
            .try_clone()?;
        // The clone shares the connection; the original descriptor may go.
        drop(io);
        let host = dns_name.trim_start_matches('[').trim_end_matches(']');
        let name = self.0.server_name.as_deref().unwrap_or(host);
        let (read_timeout, write_timeout) = (sock.read_timeout()?, sock.write_timeout()?);
        sock.set_read_timeout(Some(CLIENT_HANDSHAKE_TIMEOUT))?;
        sock.set_write_timeout(Some(CLIENT_HANDSHAKE_TIMEOUT))?;
        let conn = self.0.tls.connect_as(sock, name)?;
        conn.socket().set_read_timeout(read_timeout)?;
        conn.socket().set_write_timeout(write_timeout)?;
        Ok(Box::new(ClientStream(conn)))
    }
}

/// A client's TLS connection, as `ureq` uses it.
#[derive(Debug)]
struct ClientStream(TlsConn);

impl Read for ClientStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for ClientStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf).map_err(no_retry)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl ureq::ReadWrite for ClientStream {
    fn socket(&self) -> Option<&TcpStream> {
        Some(self.0.socket())
    }
}

/// A TLS write that failed part-way cannot be retried: WouldBlock (the socket's timeout)
/// becomes TimedOut.
fn no_retry(err: io::Error) -> io::Error {
    if err.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, err)
    } else {
        err
    }
}

/// One API connection on the listener's side.
#[derive(Debug)]
pub(super) enum Stream {
    /// Plain HTTP (a loopback listener without credentials).
    Plain(TcpStream),
    /// TLS, handshake under way.
    Handshake(Box<Handshake>),
    /// TLS, handshake over.
    Tls(Box<TlsConn>),
    /// The handshake failed; only closing is left.
    Failed,
}

/// A server handshake, advanced without blocking.
#[derive(Debug)]
pub(super) struct Handshake {
    sock: TcpStream,
    tls: rustls::ServerConnection,
}

impl Stream {
    /// A connection accepted on a listener serving with `tls` (plain when `None`).
    pub(super) fn accepted(sock: TcpStream, tls: Option<&ServerTls>) -> io::Result<Stream> {
        let Some(tls) = tls else {
            return Ok(Stream::Plain(sock));
        };
        let conn = rustls::ServerConnection::new(tls.0.clone()).map_err(io::Error::other)?;
        Ok(Stream::Handshake(Box::new(Handshake { sock, tls: conn })))
    }

    /// The TCP socket underneath (None once failed).
    pub(super) fn socket(&self) -> Option<&TcpStream> {
        match self {
            Stream::Plain(sock) => Some(sock),
            Stream::Handshake(handshake) => Some(&handshake.sock),
            Stream::Tls(conn) => Some(conn.socket()),
            Stream::Failed => None,
        }
    }

    /// What the listener polls this connection for: input, and output while a handshake
    /// has bytes to send that did not fit the socket.
    pub(super) fn interest(&self) -> PollFlags {
        match self {
            Stream::Handshake(handshake) if handshake.tls.wants_write() => {
                PollFlags::POLLIN | PollFlags::POLLOUT
            }
            _ => PollFlags::POLLIN,
        }
    }

    /// True when decrypted (or received, not yet decrypted) bytes wait in this process.
    pub(super) fn has_buffered_input(&self) -> bool {
        match self {
            Stream::Tls(conn) => conn.has_buffered_input(),
            Stream::Plain(_) | Stream::Handshake(_) | Stream::Failed => false,
        }
    }

    /// Advances a handshake as far as the (non-blocking) socket allows. Ok(true): HTTP may
    /// flow (at once for a plain connection); Ok(false): wait for the socket.
    pub(super) fn advance(&mut self) -> io::Result<bool> {
        let Stream::Handshake(handshake) = self else {
            return match self {
                Stream::Failed => Err(io::Error::other("TLS handshake failed")),
                _ => Ok(true),
            };
        };
        match handshake.advance() {
            Ok(false) => Ok(false),
            Ok(true) => {
                let Stream::Handshake(handshake) = std::mem::replace(self, Stream::Failed) else {
                    unreachable!("matched above");
                };
                let Handshake { sock, tls } = *handshake;
                *self = Stream::Tls(Box::new(TlsConn::established(sock, tls.into())));
                Ok(true)
            }
            Err(err) => {
                *self = Stream::Failed;
                Err(err)
            }
        }
    }

    /// Reads without blocking (the listener's socket is non-blocking): Err(WouldBlock) when
    /// nothing is there. On TLS, takes every decrypted byte it can, up to `buf.len()`.
    pub(super) fn read_ready(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let conn = match self {
            Stream::Plain(sock) => return sock.read(buf),
            Stream::Tls(conn) => conn,
            Stream::Handshake(_) | Stream::Failed => return Err(not_ready()),
        };
        let mut filled = 0;
        while filled < buf.len() {
            match conn.read_plain(&mut buf[filled..], false)? {
                None => break,
                // The end; reported at the next poll if bytes came before it (the socket
                // stays readable at its end).
                Some(0) if filled == 0 => return Ok(0),
                Some(0) => break,
                Some(n) => filled += n,
            }
        }
        if filled == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(filled)
    }
}

fn not_ready() -> io::Error {
    io::Error::other("the TLS handshake is not over")
}

impl Handshake {
    /// Sends what rustls has to send, reads what the socket holds, until the handshake is
    /// over (true) or the socket would block (false).
    fn advance(&mut self) -> io::Result<bool> {
        loop {
            while self.tls.wants_write() {
                match self.tls.write_tls(&mut self.sock) {
                    Ok(_) => {}
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                    Err(err) => return Err(err),
                }
            }
            if !self.tls.is_handshaking() {
                return Ok(true);
            }
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => {}
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
            if let Err(err) = self.tls.process_new_packets() {
                // The alert saying why, if the socket takes it.
                let _ = self.tls.write_tls(&mut self.sock);
                return Err(io::Error::new(io::ErrorKind::InvalidData, err));
            }
        }
    }
}

impl Read for Stream {
    /// A worker's blocking read (timeouts on the socket).
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(sock) => sock.read(buf),
            Stream::Tls(conn) => conn.read(buf),
            Stream::Handshake(_) | Stream::Failed => Err(not_ready()),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(sock) => sock.write(buf),
            Stream::Tls(conn) => conn.write(buf).map_err(no_retry),
            Stream::Handshake(_) | Stream::Failed => Err(not_ready()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Shutdown;
    use std::path::PathBuf;

    use super::*;
    use crate::api::types::{ExportSpec, ExportStatus, HeatMap, TrackerAdd, TrackerStatus};
    use crate::api::{serve_with, ApiServer, Client, Control, ControlError, ServeOptions};
    use crate::nbd::tls::{init, CA_CERT};

    const TOKEN: &str = "feedfacefeedfacefeedfacefeedfacefeedfacefeedfacefeedfacefeedface";

    /// An agent with no exports.
    #[derive(Debug)]
    struct Empty;

    impl Control for Empty {
        fn exports(&self) -> Vec<ExportStatus> {
            Vec::new()
        }
        fn add_export(&self, _spec: ExportSpec) -> Result<ExportStatus, ControlError> {
            Err(ControlError::Invalid("no".into()))
        }
        fn remove_export(&self, name: &str, _force: bool) -> Result<(), ControlError> {
            Err(ControlError::NotFound(name.into()))
        }
        fn trackers(&self, export: &str) -> Result<Vec<TrackerStatus>, ControlError> {
            Err(ControlError::NotFound(export.into()))
        }
        fn add_tracker(&self, export: &str, _: TrackerAdd) -> Result<TrackerStatus, ControlError> {
            Err(ControlError::NotFound(export.into()))
        }
        fn remove_tracker(&self, export: &str, _tracker: &str) -> Result<(), ControlError> {
            Err(ControlError::NotFound(export.into()))
        }
        fn heat(&self, export: &str, _: Option<&str>, _: usize) -> Result<HeatMap, ControlError> {
            Err(ControlError::NotFound(export.into()))
        }
    }

    /// Credentials for 127.0.0.1 in a fresh directory, and a TLS API server using them.
    fn tls_server() -> (tempfile::TempDir, PathBuf, ApiServer) {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        init::generate(&creds, &["127.0.0.1".to_string()]).unwrap();
        let options = ServeOptions {
            tls: Some(ServerTls::load(&creds).unwrap()),
            ..ServeOptions::default()
        };
        let bind = "127.0.0.1:0".parse().unwrap();
        let server = serve_with(bind, TOKEN.into(), Arc::new(Empty), &options).unwrap();
        (dir, creds, server)
    }

    #[test]
    fn only_loopback_is_local() {
        // Goal: plain HTTP is allowed exactly on loopback; every other address, the
        // unspecified ones included (they listen everywhere), needs TLS.
        for local in [
            "127.0.0.1:7450",
            "127.0.0.2:1",
            "[::1]:7450",
            "[::ffff:127.0.0.1]:1",
        ] {
            assert!(is_local(local.parse().unwrap()), "{local}");
        }
        for routable in [
            "0.0.0.0:7450",
            "[::]:7450",
            "10.0.0.1:7450",
            "[fd00::1]:7450",
        ] {
            assert!(!is_local(routable.parse().unwrap()), "{routable}");
        }
    }

    #[test]
    fn tls_client_is_served_and_kept_alive() {
        // Goal: the Client over mutual TLS is answered, twice on one kept-alive connection,
        // and still needs the token. Method: two calls with the token, one without.
        let (_dir, creds, server) = tls_server();
        let addr = server.local_addr().to_string();
        let tls = ClientTlsOptions::load(&creds, None).unwrap();
        let client = Client::new(&addr, Some(TOKEN.into())).with_tls(&tls);
        assert!(client.exports().unwrap().is_empty());
        assert!(client.exports().unwrap().is_empty());
        let anonymous = Client::new(&addr, None).with_tls(&tls);
        assert_eq!(anonymous.exports().unwrap_err().status(), Some(401));
        server.shutdown();
    }

    #[test]
    fn pipelined_requests_over_tls_are_all_answered() {
        // Goal: decrypted bytes the session holds after a request (a pipelined second one)
        // are served although poll(2) cannot see them. Method: a POST head alone; then, in
        // one TLS record, its body and a second request: the worker decrypts both while
        // reading the body, and hands the second back undecoded. Both are answered.
        let (_dir, creds, server) = tls_server();
        let addr = server.local_addr().to_string();
        let client = TlsCreds::load(&creds, false).unwrap();
        let sock = TcpStream::connect(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut conn = client.client().connect(sock, &addr).unwrap();
        let auth = format!("Authorization: Bearer {TOKEN}\r\n");
        let body = "{}";
        let one = format!(
            "POST /v1/exports HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\n\r\n",
            body.len()
        );
        let two = format!("GET /v1/jobs HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n");
        conn.write_all(one.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        conn.write_all(format!("{body}{two}").as_bytes()).unwrap();
        let mut answer = Vec::new();
        conn.read_to_end(&mut answer).unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert_eq!(text.matches("HTTP/1.1 400").count(), 1, "{text}");
        assert_eq!(text.matches("HTTP/1.1 200").count(), 1, "{text}");
        server.shutdown();
    }

    #[test]
    fn plain_and_certificateless_clients_are_refused() {
        // Goal: on a TLS listener, plain HTTP gets no answer, and a client without a
        // certificate the CA signed fails (mutual TLS) even with the token. Method: a plain
        // request; a client whose directory holds the CA alone.
        let (dir, creds, server) = tls_server();
        let addr = server.local_addr().to_string();
        let mut plain = TcpStream::connect(&addr).unwrap();
        plain
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        plain
            .write_all(b"GET /v1/exports HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut answer = Vec::new();
        let _ = plain.read_to_end(&mut answer);
        assert!(!String::from_utf8_lossy(&answer).contains("HTTP/1.1"));
        let _ = plain.shutdown(Shutdown::Both);
        let ca_only = dir.path().join("ca-only");
        std::fs::create_dir(&ca_only).unwrap();
        std::fs::copy(creds.join(CA_CERT), ca_only.join(CA_CERT)).unwrap();
        let tls = ClientTlsOptions::load(&ca_only, None).unwrap();
        let client = Client::new(&addr, Some(TOKEN.into())).with_tls(&tls);
        let err = client.exports().unwrap_err();
        assert_eq!(err.status(), None, "{err:?}");
        server.shutdown();
    }
}
