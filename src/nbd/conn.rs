//! A client connection, over a unix socket or TCP, with the two ways the session reads it:
//! blocking (nothing else to do) and non-blocking (I/O is in flight, take only what is there).
//!
//! The socket stays in blocking mode: replies are written with blocking vectored writes, and
//! the non-blocking read is a `recv(MSG_DONTWAIT)`, so no mode switch costs a syscall.
//!
//! Over TLS ([`Conn::Tls`]) decrypted bytes may wait inside the process while the socket is
//! empty: [`Conn::has_buffered_input`] says so, and whoever waits for the socket's readiness
//! must ask it first.

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;

use nix::sys::socket::{recv, MsgFlags};

use crate::nbd::tls::TlsConn;

/// One accepted NBD connection.
#[derive(Debug)]
pub enum Conn {
    /// Unix domain socket.
    Unix(UnixStream),
    /// TCP (Nagle off: replies are whole batches already).
    Tcp(TcpStream),
    /// TLS over TCP, after `NBD_OPT_STARTTLS`.
    Tls(Box<TlsConn>),
}

impl Conn {
    /// A second handle on the same socket (for shutting it down from another thread).
    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Tls(s) => Conn::Tls(Box::new(s.try_clone()?)),
        })
    }

    /// Sets the receive timeout of the socket underneath.
    pub fn set_read_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(timeout),
            Conn::Tcp(s) => s.set_read_timeout(timeout),
            Conn::Tls(s) => s.set_read_timeout(timeout),
        }
    }

    /// Sets the send timeout of the socket underneath (a reply write that makes no progress
    /// for that long fails).
    pub fn set_write_timeout(&self, timeout: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_write_timeout(timeout),
            Conn::Tcp(s) => s.set_write_timeout(timeout),
            Conn::Tls(s) => s.socket().set_write_timeout(timeout),
        }
    }

    /// True when a read would return bytes already held in this process (decrypted TLS
    /// data), whether or not the socket is readable. Always false without TLS.
    pub fn has_buffered_input(&self) -> bool {
        match self {
            Conn::Unix(_) | Conn::Tcp(_) => false,
            Conn::Tls(s) => s.has_buffered_input(),
        }
    }

    /// Shuts down one or both directions.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
            Conn::Tls(s) => s.shutdown(how),
        }
    }

    /// Reads what is already buffered, without blocking: Ok(None) when nothing is.
    pub fn recv_ready(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        if let Conn::Tls(s) = self {
            return s.read_plain(buf, false);
        }
        match recv(self.as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
            Ok(n) => Ok(Some(n)),
            Err(nix::errno::Errno::EAGAIN) => Ok(None),
            Err(nix::errno::Errno::EINTR) => Ok(None),
            Err(errno) => Err(io::Error::from(errno)),
        }
    }

    /// Writes every byte of `slices`, looping over short writes.
    pub fn write_all_slices(&mut self, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
        while !slices.is_empty() {
            match self.write_vectored(slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Unix(s) => s.as_fd(),
            Conn::Tcp(s) => s.as_fd(),
            Conn::Tls(s) => s.socket().as_fd(),
        }
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Conn::Unix(s) => s.as_raw_fd(),
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Tls(s) => s.socket().as_raw_fd(),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write_vectored(bufs),
            Conn::Tcp(s) => s.write_vectored(bufs),
            Conn::Tls(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl crate::nbd::admission::Closer for Conn {
    fn close(&self, how: std::net::Shutdown) {
        let _ = self.shutdown(how);
    }
}

impl crate::disk::ConnectionHandle for Conn {
    fn stop_reading(&self) {
        // The peer may be gone already; the session notices on its own then.
        let _ = self.shutdown(std::net::Shutdown::Read);
    }
}
