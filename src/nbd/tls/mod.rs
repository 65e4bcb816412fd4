//! TLS for NBD over TCP: the credentials (QEMU's `tls-creds-x509` directory layout), the
//! rustls configurations built from them, and the upgrade of a TCP connection after
//! `NBD_OPT_STARTTLS` on either side.
//!
//! One directory serves both sides, as with QEMU: `ca-cert.pem` (the CA both sides trust),
//! `server-cert.pem`/`server-key.pem` (the listener's identity) and
//! `client-cert.pem`/`client-key.pem` (ferry's own identity when it dials another agent,
//! i.e. the forwarder after a switchover). [`init`] creates such a directory.
//!
//! Invariants:
//! - Mutual TLS: the server requires a client certificate chaining to `ca-cert.pem`, and the
//!   client checks that the server's certificate chains to it and names the host it dialled.
//! - Files are read with a size bound ([`MAX_PEM_BYTES`]); nothing here panics on their
//!   content.
//! - The crypto provider is ring, pinned (not the process default), so the choice does not
//!   depend on which crates happen to be linked. TLS 1.2 and 1.3 (QEMU and libnbd speak
//!   both, through GnuTLS).

pub mod init;
mod stream;

use std::io::{self, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use thiserror::Error;

pub use stream::TlsConn;

/// The CA certificate both sides trust.
pub const CA_CERT: &str = "ca-cert.pem";
/// The listener's certificate chain.
pub const SERVER_CERT: &str = "server-cert.pem";
/// The listener's private key.
pub const SERVER_KEY: &str = "server-key.pem";
/// ferry's certificate when it dials another agent.
pub const CLIENT_CERT: &str = "client-cert.pem";
/// ferry's private key when it dials another agent.
pub const CLIENT_KEY: &str = "client-key.pem";
/// Largest credential file read (a chain of a few certificates is a few KiB).
pub const MAX_PEM_BYTES: u64 = 1024 * 1024;
/// Encrypted bytes rustls may hold for sending: one write encrypts at most this much.
const SEND_LIMIT_BYTES: usize = 256 * 1024;

/// Why credentials could not be loaded or a TLS session set up.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A credential file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A credential file is larger than [`MAX_PEM_BYTES`].
    #[error("{} is larger than {MAX_PEM_BYTES} bytes", path.display())]
    TooBig {
        /// The file.
        path: PathBuf,
    },
    /// A credential file holds no usable PEM item of the expected kind.
    #[error("{} holds no valid {what}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was looked for ("certificate", "private key").
        what: &'static str,
    },
    /// rustls refused the configuration (key not matching the certificate, bad CA, ...).
    #[error("TLS configuration refused")]
    Config(#[source] rustls::Error),
    /// The client-certificate verifier could not be built from the CA.
    #[error("cannot verify client certificates with this CA")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The address dialled has no host part usable as a TLS server name.
    #[error("'{0}' is not a host name or address usable for TLS")]
    ServerName(String),
}

/// The loaded credentials: a server configuration when the directory has a server identity,
/// and a client configuration (with the client identity when the directory has one).
#[derive(Debug, Clone)]
pub struct TlsCreds {
    dir: PathBuf,
    server: Option<Arc<ServerConfig>>,
    client: ClientTls,
}

impl TlsCreds {
    /// Loads `dir`. `serve`: the server identity is required (a TCP listener will use it).
    pub fn load(dir: &Path, serve: bool) -> Result<TlsCreds, TlsError> {
        // ring, although rustls marks it deprecated for lacking post-quantum key exchange:
        // it builds with no C toolchain beyond cc (aws-lc-rs needs cmake and minutes).
        #[allow(deprecated)]
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let roots = Arc::new(load_roots(&dir.join(CA_CERT))?);
        let server_cert = dir.join(SERVER_CERT);
        let server = if serve || server_cert.exists() {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.clone(),
                provider.clone(),
            )
            .build()
            .map_err(TlsError::Verifier)?;
            let mut config = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(TlsError::Config)?
                .with_client_cert_verifier(verifier)
                .with_single_cert(load_certs(&server_cert)?, load_key(&dir.join(SERVER_KEY))?)
                .map_err(TlsError::Config)?;
            // No resumption: connections are long-lived, and tickets would be extra writes.
            config.send_tls13_tickets = 0;
            Some(Arc::new(config))
        } else {
            None
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_root_certificates(roots);
        let client_cert = dir.join(CLIENT_CERT);
        let client = if client_cert.exists() {
            builder
                .with_client_auth_cert(load_certs(&client_cert)?, load_key(&dir.join(CLIENT_KEY))?)
                .map_err(TlsError::Config)?
        } else {
            builder.with_no_client_auth()
        };
        Ok(TlsCreds {
            dir: dir.to_path_buf(),
            server,
            client: ClientTls(Arc::new(client)),
        })
    }

    /// The directory the credentials came from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The listener's configuration, if the directory has a server identity.
    pub fn server(&self) -> Option<&Arc<ServerConfig>> {
        self.server.as_ref()
    }

    /// The configuration ferry dials other agents with.
    pub fn client(&self) -> &ClientTls {
        &self.client
    }
}

/// A client configuration, compared by identity (a forward target keeps the one it was
/// given; two targets are the same only with the same configuration).
#[derive(Debug, Clone)]
pub struct ClientTls(pub Arc<ClientConfig>);

impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for ClientTls {}

impl ClientTls {
    /// Runs the client side of the TLS handshake on `sock` (after the server acknowledged
    /// `NBD_OPT_STARTTLS`); `addr` is the `host:port` dialled, whose host the server's
    /// certificate must name.
    pub fn connect(&self, sock: TcpStream, addr: &str) -> io::Result<TlsConn> {
        self.connect_as(sock, host_of(addr))
    }

    /// Like [`ClientTls::connect`], with the name (or address) the server's certificate
    /// must carry given as is: the control API client lets the operator name it.
    pub fn connect_as(&self, sock: TcpStream, server_name: &str) -> io::Result<TlsConn> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| io::Error::other(TlsError::ServerName(server_name.to_string())))?;
        let conn = rustls::ClientConnection::new(self.0.clone(), name).map_err(io::Error::other)?;
        TlsConn::handshake(sock, conn.into())
    }
}

/// Runs the server side of the TLS handshake on `sock` (after `NBD_OPT_STARTTLS` was
/// acknowledged); fails when the client offers no certificate the CA signed.
pub fn accept(sock: TcpStream, config: &Arc<ServerConfig>) -> io::Result<TlsConn> {
    let conn = rustls::ServerConnection::new(config.clone()).map_err(io::Error::other)?;
    TlsConn::handshake(sock, conn.into())
}

/// The host part of `host:port`, `[v6]:port` or a bare host.
fn host_of(addr: &str) -> &str {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => addr,
    }
}

/// The whole file, refusing more than [`MAX_PEM_BYTES`].
fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    let read_err = |source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsError::TooBig {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_bounded(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            path: path.to_path_buf(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_bounded(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| TlsError::Pem {
        path: path.to_path_buf(),
        what: "private key",
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots.add(cert).map_err(TlsError::Config)?;
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_splits_ports_and_brackets() {
        // Goal: the TLS server name is the host of every address form a target can have.
        assert_eq!(host_of("127.0.0.1:10809"), "127.0.0.1");
        assert_eq!(host_of("node-2.example:10809"), "node-2.example");
        assert_eq!(host_of("[::1]:10809"), "::1");
        assert_eq!(host_of("::1"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn generated_creds_load_on_both_sides() {
        // Goal: `init` writes a directory `load` accepts for a listener and a dialler, and a
        // missing or damaged file is named. Method: init, load; truncate the key, load again.
        let dir = tempfile::tempdir().unwrap();
        let creds_dir = dir.path().join("creds");
        init::generate(&creds_dir, &["localhost".to_string()]).unwrap();
        let creds = TlsCreds::load(&creds_dir, true).unwrap();
        assert!(creds.server().is_some());
        std::fs::write(creds_dir.join(SERVER_KEY), "garbage").unwrap();
        let err = TlsCreds::load(&creds_dir, true).unwrap_err();
        assert!(err.to_string().contains(SERVER_KEY), "{err}");
        let err = TlsCreds::load(dir.path(), false).unwrap_err();
        assert!(err.to_string().contains(CA_CERT), "{err}");
    }
}
