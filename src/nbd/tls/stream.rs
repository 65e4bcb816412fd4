//! A TLS connection over a blocking TCP socket that two threads can use at once, one reading
//! and one writing (the forwarder does), and that reads without blocking when asked to (the
//! session does, with `MSG_DONTWAIT`).
//!
//! The rustls state sits behind a mutex shared by every handle ([`TlsConn::try_clone`]); the
//! socket is never read or written with the mutex held, so a blocked read cannot stop a write
//! and the other way round. Each handle keeps its own buffers of encrypted bytes.
//!
//! Invariants:
//! - Decrypted bytes rustls holds are always handed out before the socket is read again, so
//!   "the socket is empty" never means "nothing to read": [`TlsConn::has_buffered_input`]
//!   tells the session not to wait on the socket's readiness then.
//! - Encrypted input is fed to rustls only once its decrypted bytes are all taken, which keeps
//!   rustls's receive buffer below its limit; output is encrypted in steps of at most
//!   `SEND_LIMIT_BYTES`, so neither grows with the size of a request.
//! - Records are encrypted and sent in one order: writers are one thread at a time (the
//!   session, or the forwarder under its writer lock), and a write sends what it encrypted
//!   before returning.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nix::sys::socket::{recv, MsgFlags};

use super::SEND_LIMIT_BYTES;

/// Encrypted bytes read from the socket at once: a few full records.
const CIPHER_BYTES: usize = 64 * 1024;

/// One TLS connection (a handle on it: clones share the TLS state and the socket).
#[derive(Debug)]
pub struct TlsConn {
    sock: TcpStream,
    tls: Arc<Mutex<rustls::Connection>>,
    /// Encrypted bytes read and not yet fed to rustls: `cipher[cipher_start..cipher_end]`.
    /// Allocated at the first read (handles used only to shut down never read).
    cipher: Vec<u8>,
    cipher_start: usize,
    cipher_end: usize,
    /// Encrypted output of one write, sent once the lock is released.
    out: Vec<u8>,
}

fn invalid_data(err: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err)
}

impl TlsConn {
    /// Runs the TLS handshake to its end on the blocking `sock`.
    pub(super) fn handshake(
        mut sock: TcpStream,
        mut conn: rustls::Connection,
    ) -> io::Result<TlsConn> {
        while conn.is_handshaking() {
            let (read_bytes, written_bytes) = conn.complete_io(&mut sock)?;
            if read_bytes == 0 && written_bytes == 0 && conn.is_handshaking() {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        Ok(TlsConn::established(sock, conn))
    }

    /// A connection whose handshake someone else ran to its end (the control API runs it
    /// without blocking, on its poll loop). Decrypted bytes rustls already holds are read
    /// first.
    pub fn established(sock: TcpStream, mut conn: rustls::Connection) -> TlsConn {
        assert!(!conn.is_handshaking(), "the handshake must be over");
        conn.set_buffer_limit(Some(SEND_LIMIT_BYTES));
        TlsConn {
            sock,
            tls: Arc::new(Mutex::new(conn)),
            cipher: Vec::new(),
            cipher_start: 0,
            cipher_end: 0,
            out: Vec::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, rustls::Connection> {
        // A panic elsewhere cannot leave the TLS state half-updated in a way reads care about
        // more than the error they would get anyway.
        self.tls.lock().unwrap_or_else(|poison| poison.into_inner())
    }

    /// A second handle: shares the TLS state and the socket, with buffers of its own.
    pub fn try_clone(&self) -> io::Result<TlsConn> {
        Ok(TlsConn {
            sock: self.sock.try_clone()?,
            tls: self.tls.clone(),
            cipher: Vec::new(),
            cipher_start: 0,
            cipher_end: 0,
            out: Vec::new(),
        })
    }

    /// The TCP socket underneath.
    pub fn socket(&self) -> &TcpStream {
        &self.sock
    }

    /// Shuts the socket down (every handle sees it).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.sock.shutdown(how)
    }

    /// Sets the socket's receive timeout.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.sock.set_read_timeout(timeout)
    }

    /// True when decrypted bytes, or encrypted bytes not yet decrypted, wait in this process:
    /// a read returns something without the socket being readable.
    pub fn has_buffered_input(&self) -> bool {
        if self.cipher_start < self.cipher_end {
            return true;
        }
        match self.lock().process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0,
            // Only an error a read already returned (rustls keeps it): the session has ended
            // or is ending, and nothing waits to be read.
            Err(_) => false,
        }
    }

    /// Reads decrypted bytes: what rustls holds first, then from the socket, blocking or
    /// not (`wait`). Ok(None): nothing without blocking. Ok(Some(0)): end of stream.
    pub fn read_plain(&mut self, buf: &mut [u8], wait: bool) -> io::Result<Option<usize>> {
        if buf.is_empty() {
            return Ok(Some(0));
        }
        loop {
            if let Some(n) = self.take_decrypted(buf)? {
                return Ok(Some(n));
            }
            if self.cipher.is_empty() {
                self.cipher = vec![0; CIPHER_BYTES];
            }
            self.cipher_start = 0;
            self.cipher_end = 0;
            let read = if wait {
                self.sock.read(&mut self.cipher)
            } else {
                match recv(
                    self.sock.as_raw_fd(),
                    &mut self.cipher,
                    MsgFlags::MSG_DONTWAIT,
                ) {
                    Ok(n) => Ok(n),
                    Err(nix::errno::Errno::EAGAIN) | Err(nix::errno::Errno::EINTR) => {
                        return Ok(None)
                    }
                    Err(errno) => Err(io::Error::from(errno)),
                }
            };
            match read {
                // The peer closed (with or without close_notify): the stream ends here.
                Ok(0) => return Ok(Some(0)),
                Ok(n) => self.cipher_end = n,
                Err(err) => return Err(err),
            }
        }
    }

    /// Decrypted bytes rustls holds, feeding it the encrypted bytes of this handle as long as
    /// it has none. None: rustls holds nothing and every encrypted byte here was fed.
    fn take_decrypted(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut tls = self.tls.lock().unwrap_or_else(|poison| poison.into_inner());
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => return Err(err),
            }
            if self.cipher_start == self.cipher_end {
                return Ok(None);
            }
            let mut pending = &self.cipher[self.cipher_start..self.cipher_end];
            let fed = tls.read_tls(&mut pending)?;
            self.cipher_start += fed;
            if let Err(err) = tls.process_new_packets() {
                // rustls may have queued an alert saying why; the peer may be gone already.
                self.out.clear();
                let _ = tls.write_tls(&mut self.out);
                let _ = self.sock.write_all(&self.out);
                return Err(invalid_data(err));
            }
        }
    }

    /// Encrypts some of `bufs` and sends it; returns how many plaintext bytes that was.
    pub fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let written = {
            let mut tls = self.tls.lock().unwrap_or_else(|poison| poison.into_inner());
            let written = tls.writer().write_vectored(bufs)?;
            self.out.clear();
            while tls.wants_write() {
                tls.write_tls(&mut self.out)?;
            }
            written
        };
        self.sock.write_all(&self.out)?;
        Ok(written)
    }
}

impl Read for TlsConn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Ok(self.read_plain(buf, true)?.unwrap_or(0))
    }
}

impl Write for TlsConn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_plain(&[IoSlice::new(buf)])
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.write_plain(bufs)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;
    use std::sync::Arc;

    use super::*;
    use crate::nbd::tls::{accept, init, TlsCreds};

    /// A connected pair over loopback: (client, server), both past the TLS handshake.
    fn pair() -> (TlsConn, TlsConn) {
        let dir = tempfile::tempdir().unwrap();
        init::generate(&dir.path().join("c"), &["127.0.0.1".to_string()]).unwrap();
        let creds = TlsCreds::load(&dir.path().join("c"), true).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let config = Arc::clone(creds.server().unwrap());
        let server = std::thread::spawn(move || {
            let (sock, _) = listener.accept().unwrap();
            accept(sock, &config).unwrap()
        });
        let sock = TcpStream::connect(&addr).unwrap();
        let client = creds.client().connect(sock, &addr).unwrap();
        (client, server.join().unwrap())
    }

    #[test]
    fn decrypted_bytes_are_read_without_the_socket() {
        // Goal: bytes rustls already decrypted are returned by a non-blocking read although
        // the socket is empty, and has_buffered_input says so (the session must not wait for
        // readiness then). Method: one 100-byte write (one record), read in 10-byte steps.
        let (mut client, mut server) = pair();
        let message: Vec<u8> = (0..100u8).collect();
        client.write_all(&message).unwrap();
        let mut buf = [0u8; 10];
        assert_eq!(server.read_plain(&mut buf, true).unwrap(), Some(10));
        let mut got = buf.to_vec();
        while got.len() < message.len() {
            assert!(server.has_buffered_input());
            let n = server
                .read_plain(&mut buf, false)
                .unwrap()
                .expect("buffered");
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, message);
        assert!(!server.has_buffered_input());
        assert_eq!(server.read_plain(&mut buf, false).unwrap(), None);
        client.shutdown(Shutdown::Both).unwrap();
        assert_eq!(server.read_plain(&mut buf, true).unwrap(), Some(0));
    }

    #[test]
    fn one_handle_reads_while_another_writes() {
        // Goal: clones share the session, one thread reading and one writing at once, as the
        // forwarder does, with large transfers both ways. Method: the server echoes 4 MiB in
        // 64 KiB chunks; the client writes on one handle and reads on a clone meanwhile.
        let (client, mut server) = pair();
        let total = 4 << 20;
        let echo = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            let mut echoed = 0;
            while echoed < total {
                let n = server.read(&mut buf).unwrap();
                server.write_all(&buf[..n]).unwrap();
                echoed += n;
            }
        });
        let mut reader = client.try_clone().unwrap();
        let mut writer = client;
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let sent = data.clone();
        let sender = std::thread::spawn(move || {
            for chunk in sent.chunks(64 * 1024) {
                writer.write_all(chunk).unwrap();
            }
        });
        let mut back = vec![0u8; total];
        reader.read_exact(&mut back).unwrap();
        sender.join().unwrap();
        echo.join().unwrap();
        assert!(back == data);
    }
}
