//! The receiving side of a [`Session`]: reading the socket into the receive buffer (or
//! straight into an arriving WRITE's payload buffer), the request deadline, and taking
//! requests whole out of the buffer.
//!
//! Invariants:
//! - A request is handed on ([`Ready`]) only once it was received whole: a WRITE's payload
//!   is read before the WRITE goes anywhere near the export's write gate.
//! - Between requests a client may stay silent as long as it likes; from a request's first
//!   byte to its last it has the request deadline, however slowly the bytes trickle.
//! - A WRITE's buffer comes from the bounded pool before its payload is read: when the
//!   budget is spent the header stays unread (back-pressure), nothing is allocated.

use std::io::{self, Read};
use std::time::{Duration, Instant};

use ferry_sys::AlignedBuf;

use super::{Session, SessionError, Stall, RX_BYTES};
use crate::nbd::wire::{self, NbdErrno, RequestHeader, REQUEST_BYTES};

/// A request received whole (header, and a WRITE's payload) and not yet dispatched.
#[derive(Debug)]
pub(super) struct Ready {
    pub(super) header: RequestHeader,
    /// A WRITE's payload.
    pub(super) payload: Option<AlignedBuf>,
}

/// A WRITE whose payload is arriving.
#[derive(Debug)]
pub(super) struct Incoming {
    pub(super) header: RequestHeader,
    /// Where the payload goes; None when the WRITE was refused and its payload is skipped.
    pub(super) buf: Option<AlignedBuf>,
    /// Why it was refused.
    pub(super) refused: Option<NbdErrno>,
    /// Payload bytes received so far.
    pub(super) have: usize,
    /// When its header was taken.
    pub(super) since: Instant,
}

impl Session {
    /// Reads more bytes: blocking when `block`, else only what is already there.
    pub(super) fn fill(&mut self, block: bool) -> Result<(), SessionError> {
        if self.rx_start == self.rx_end {
            self.rx_start = 0;
            self.rx_end = 0;
        } else if self.rx_start > RX_BYTES / 2 {
            self.rx.copy_within(self.rx_start..self.rx_end, 0);
            self.rx_end -= self.rx_start;
            self.rx_start = 0;
        }
        let was_empty = self.rx_start == self.rx_end;
        let read = if block {
            // Between requests a client may stay silent as long as it likes; within one,
            // it has the request deadline.
            let deadline = (!was_empty).then(|| self.request_started + self.request_deadline);
            self.set_deadline(deadline)?;
            match self.conn.read(&mut self.rx[self.rx_end..]) {
                Ok(n) => Some(n),
                Err(err) if err.kind() == io::ErrorKind::Interrupted => None,
                Err(err) => return Err(self.read_failed(err)),
            }
        } else {
            let space = &mut self.rx[self.rx_end..];
            self.conn
                .recv_ready(space)
                .map_err(|err| self.socket_closed(err))?
        };
        match read {
            Some(0) => self.closing = true,
            Some(n) => {
                if was_empty {
                    self.request_started = Instant::now();
                }
                self.rx_end += n;
            }
            None => {}
        }
        Ok(())
    }

    /// True when a WRITE payload is arriving and nothing of it waits in the receive buffer:
    /// the rest is read straight into the payload's buffer.
    pub(super) fn awaits_payload(&self) -> bool {
        self.rx_start == self.rx_end
            && self
                .incoming
                .as_ref()
                .is_some_and(|incoming| incoming.buf.is_some())
    }

    /// Reads more of the arriving WRITE payload into its buffer: blocking when `block` (up
    /// to the request deadline), else only what is already there.
    pub(super) fn fill_payload(&mut self, block: bool) -> Result<(), SessionError> {
        let Some(incoming) = self.incoming.as_ref() else {
            return Ok(());
        };
        if block {
            self.set_deadline(Some(incoming.since + self.request_deadline))?;
        }
        let result = {
            let Some(incoming) = self.incoming.as_mut() else {
                return Ok(());
            };
            let Some(buf) = incoming.buf.as_mut() else {
                return Ok(());
            };
            let len = incoming.header.length_bytes as usize;
            let space = &mut buf.as_mut_slice()[incoming.have..len];
            if block {
                self.conn.read(space).map(Some)
            } else {
                self.conn.recv_ready(space)
            }
        };
        let read = match result {
            Ok(read) => read,
            Err(err) if block && err.kind() == io::ErrorKind::Interrupted => None,
            Err(err) if block => return Err(self.read_failed(err)),
            Err(err) => return Err(self.socket_closed(err)),
        };
        match (read, self.incoming.as_mut()) {
            (Some(0), _) => self.closing = true,
            (Some(n), Some(incoming)) => incoming.have += n,
            _ => {}
        }
        Ok(())
    }

    /// Sets the socket's receive timeout for a blocking read that must end by `deadline`
    /// (None: no deadline); a deadline already past fails at once.
    fn set_deadline(&mut self, deadline: Option<Instant>) -> Result<(), SessionError> {
        let timeout = match deadline {
            None => None,
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(self.read_failed(io::ErrorKind::TimedOut.into()));
                }
                Some(left)
            }
        };
        // Rounded to 100 ms, so steady streaming does not cost a syscall per read.
        let differs = match (timeout, self.read_timeout) {
            (None, None) => false,
            (Some(new), Some(old)) => new.abs_diff(old) > Duration::from_millis(100),
            _ => true,
        };
        if differs {
            self.conn
                .set_read_timeout(timeout)
                .map_err(|err| self.socket_closed(err))?;
            self.read_timeout = timeout;
        }
        Ok(())
    }

    /// A blocking read failed: a timeout means the request deadline passed.
    fn read_failed(&mut self, err: io::Error) -> SessionError {
        if matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            self.closing = true;
            return SessionError::Protocol(format!(
                "request not received within {:?}",
                self.request_deadline
            ));
        }
        self.socket_closed(err)
    }

    /// Takes the next request from the receive buffer into `ready` (a WRITE once its
    /// payload is complete). False when more bytes (or a buffer) are needed first.
    pub(super) fn receive_next(&mut self) -> Result<bool, SessionError> {
        if self.incoming.is_some() {
            return Ok(self.advance_incoming());
        }
        if self.rx_end - self.rx_start < REQUEST_BYTES {
            return Ok(false);
        }
        let mut header_bytes = [0u8; REQUEST_BYTES];
        header_bytes.copy_from_slice(&self.rx[self.rx_start..self.rx_start + REQUEST_BYTES]);
        let header = wire::parse_request(&header_bytes)
            .map_err(|err| SessionError::Protocol(err.to_string()))?;
        if header.command != wire::CMD_WRITE {
            self.rx_start += REQUEST_BYTES;
            self.request_started = Instant::now();
            self.ready = Some(Ready {
                header,
                payload: None,
            });
            return Ok(true);
        }
        let (buf, refused) = match self.validate(&header) {
            Ok(_) => match self.pool.try_take(header.length_bytes as usize) {
                Some(buf) => (Some(buf), None),
                None => {
                    self.stall = Some(Stall::Budget);
                    return Ok(false);
                }
            },
            Err(errno) => (None, Some(errno)),
        };
        self.rx_start += REQUEST_BYTES;
        self.incoming = Some(Incoming {
            header,
            buf,
            refused,
            have: 0,
            since: Instant::now(),
        });
        Ok(self.advance_incoming())
    }

    /// Moves received payload bytes into the arriving WRITE; when it is complete, moves it
    /// to `ready` (or answers its refusal) and returns true.
    fn advance_incoming(&mut self) -> bool {
        let Some(incoming) = self.incoming.as_mut() else {
            return true;
        };
        let len = incoming.header.length_bytes as usize;
        let take = (self.rx_end - self.rx_start).min(len - incoming.have);
        if let Some(buf) = incoming.buf.as_mut() {
            buf.as_mut_slice()[incoming.have..incoming.have + take]
                .copy_from_slice(&self.rx[self.rx_start..self.rx_start + take]);
        }
        self.rx_start += take;
        incoming.have += take;
        if incoming.have < len {
            return false;
        }
        let incoming = self.incoming.take().expect("matched above");
        self.request_started = Instant::now();
        if let Some(errno) = incoming.refused {
            self.reply_error(incoming.header.cookie, errno);
            return true;
        }
        self.ready = Some(Ready {
            header: incoming.header,
            payload: incoming.buf,
        });
        true
    }
}
