//! A small NBD client (fixed newstyle, OPT_GO, simple replies, pipelined requests), used by
//! the demo to drive a real NBD connection and by tests that need exact control of the bytes.
//!
//! Invariant: every request sent is matched to its reply by cookie; read replies are sized
//! from the request, as simple replies carry no length.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::nbd::conn::Conn;
use crate::nbd::wire;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const INFO_EXPORT: u16 = 0;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_FLAG_FUA: u16 = 1;

fn protocol(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

/// One reply.
#[derive(Debug)]
pub struct Reply {
    /// The request's cookie.
    pub cookie: u64,
    /// NBD errno (0 = success).
    pub error: u32,
    /// Data of a successful READ.
    pub data: Option<Vec<u8>>,
}

/// A connected client in the transmission phase.
#[derive(Debug)]
pub struct NbdClient {
    conn: Conn,
    size_bytes: u64,
    transmission_flags: u16,
    next_cookie: u64,
    reads: HashMap<u64, u32>,
}

impl NbdClient {
    /// Connects to a unix socket and selects `export` with OPT_GO.
    pub fn connect_unix(socket: &Path, export: &str) -> io::Result<NbdClient> {
        Self::negotiate(Conn::Unix(UnixStream::connect(socket)?), export)
    }

    /// Connects over TCP and negotiates `export` (Nagle off: requests are sent whole).
    pub fn connect_tcp(addr: &str, export: &str) -> io::Result<NbdClient> {
        let stream = std::net::TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Self::negotiate(Conn::Tcp(stream), export)
    }

    fn negotiate(mut conn: Conn, export: &str) -> io::Result<NbdClient> {
        let (size_bytes, transmission_flags) = handshake(&mut conn, export)?;
        Ok(NbdClient {
            conn,
            size_bytes,
            transmission_flags,
            next_cookie: 1,
            reads: HashMap::new(),
        })
    }

    /// The negotiated connection, for a caller that runs the transmission phase itself.
    pub fn into_conn(self) -> Conn {
        self.conn
    }

    /// Export size.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Transmission flags the server advertised.
    pub fn transmission_flags(&self) -> u16 {
        self.transmission_flags
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.reads.len()
    }

    fn send(
        &mut self,
        flags: u16,
        command: u16,
        offset_bytes: u64,
        len_bytes: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut header = [0u8; wire::REQUEST_BYTES];
        header[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        header[4..6].copy_from_slice(&flags.to_be_bytes());
        header[6..8].copy_from_slice(&command.to_be_bytes());
        header[8..16].copy_from_slice(&cookie.to_be_bytes());
        header[16..24].copy_from_slice(&offset_bytes.to_be_bytes());
        header[24..28].copy_from_slice(&len_bytes.to_be_bytes());
        self.conn.write_all(&header)?;
        if !payload.is_empty() {
            self.conn.write_all(payload)?;
        }
        // Zero-length entries mark non-read requests in flight.
        self.reads
            .insert(cookie, if command == CMD_READ { len_bytes } else { 0 });
        Ok(cookie)
    }

    /// Sends a WRITE; returns its cookie.
    pub fn send_write(&mut self, offset_bytes: u64, data: &[u8], fua: bool) -> io::Result<u64> {
        let len = u32::try_from(data.len()).map_err(|_| protocol("write larger than 4 GiB"))?;
        self.send(
            if fua { CMD_FLAG_FUA } else { 0 },
            CMD_WRITE,
            offset_bytes,
            len,
            data,
        )
    }

    /// Sends a READ; returns its cookie.
    pub fn send_read(&mut self, offset_bytes: u64, len_bytes: u32) -> io::Result<u64> {
        self.send(0, CMD_READ, offset_bytes, len_bytes, &[])
    }

    /// Sends a FLUSH; returns its cookie.
    pub fn send_flush(&mut self) -> io::Result<u64> {
        self.send(0, CMD_FLUSH, 0, 0, &[])
    }

    /// Sends any raw request (tests of malformed input).
    pub fn send_raw(
        &mut self,
        flags: u16,
        command: u16,
        offset_bytes: u64,
        len_bytes: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        self.send(flags, command, offset_bytes, len_bytes, payload)
    }

    /// Waits for the next reply.
    pub fn recv(&mut self) -> io::Result<Reply> {
        let mut head = [0u8; 16];
        self.conn.read_exact(&mut head)?;
        let magic = u32::from_be_bytes(head[0..4].try_into().expect("4 bytes"));
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(protocol(format!("unexpected reply magic {magic:#x}")));
        }
        let error = u32::from_be_bytes(head[4..8].try_into().expect("4 bytes"));
        let cookie = u64::from_be_bytes(head[8..16].try_into().expect("8 bytes"));
        let read_len = self
            .reads
            .remove(&cookie)
            .ok_or_else(|| protocol(format!("reply for unknown cookie {cookie}")))?;
        let data = if error == 0 && read_len > 0 {
            let mut data = vec![0u8; read_len as usize];
            self.conn.read_exact(&mut data)?;
            Some(data)
        } else {
            None
        };
        Ok(Reply {
            cookie,
            error,
            data,
        })
    }

    /// Writes and waits (no pipelining).
    pub fn write_at(&mut self, offset_bytes: u64, data: &[u8]) -> io::Result<()> {
        self.send_write(offset_bytes, data, false)?;
        check(self.recv()?).map(drop)
    }

    /// Reads and waits.
    pub fn read_at(&mut self, offset_bytes: u64, len_bytes: u32) -> io::Result<Vec<u8>> {
        self.send_read(offset_bytes, len_bytes)?;
        Ok(check(self.recv()?)?.data.unwrap_or_default())
    }

    /// Flushes and waits.
    pub fn flush(&mut self) -> io::Result<()> {
        self.send_flush()?;
        check(self.recv()?).map(drop)
    }

    /// Sends DISC and closes.
    pub fn disconnect(mut self) -> io::Result<()> {
        let _ = self.send(0, CMD_DISC, 0, 0, &[])?;
        self.conn.shutdown(std::net::Shutdown::Write)
    }
}

/// Turns an error reply into an io::Error.
pub fn check(reply: Reply) -> io::Result<Reply> {
    if reply.error != 0 {
        return Err(io::Error::other(format!(
            "NBD error {} for cookie {}",
            reply.error, reply.cookie
        )));
    }
    Ok(reply)
}

/// Fixed newstyle handshake with OPT_GO; returns (size, transmission flags).
fn handshake(conn: &mut Conn, export: &str) -> io::Result<(u64, u16)> {
    let mut greeting = [0u8; 18];
    conn.read_exact(&mut greeting)?;
    let magic = u64::from_be_bytes(greeting[0..8].try_into().expect("8 bytes"));
    let opt_magic = u64::from_be_bytes(greeting[8..16].try_into().expect("8 bytes"));
    if magic != NBDMAGIC || opt_magic != IHAVEOPT {
        return Err(protocol("not an NBD fixed newstyle server"));
    }
    let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("server lacks fixed newstyle"));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
    conn.write_all(&client_flags.to_be_bytes())?;
    let name = export.as_bytes();
    let mut option = Vec::with_capacity(16 + 6 + name.len());
    option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&OPT_GO.to_be_bytes());
    option.extend_from_slice(&((name.len() + 6) as u32).to_be_bytes());
    option.extend_from_slice(&(name.len() as u32).to_be_bytes());
    option.extend_from_slice(name);
    option.extend_from_slice(&0u16.to_be_bytes());
    conn.write_all(&option)?;
    let mut export_info = None;
    loop {
        let mut head = [0u8; 20];
        conn.read_exact(&mut head)?;
        if u64::from_be_bytes(head[0..8].try_into().expect("8 bytes")) != REPLY_MAGIC_OPT {
            return Err(protocol("bad option reply magic"));
        }
        let reply_type = u32::from_be_bytes(head[12..16].try_into().expect("4 bytes"));
        let len = u32::from_be_bytes(head[16..20].try_into().expect("4 bytes"));
        if len > 64 * 1024 {
            return Err(protocol("option reply too large"));
        }
        let mut payload = vec![0u8; len as usize];
        conn.read_exact(&mut payload)?;
        match reply_type {
            REP_ACK => break,
            REP_INFO
                if payload.len() >= 12
                    && u16::from_be_bytes([payload[0], payload[1]]) == INFO_EXPORT =>
            {
                let size = u64::from_be_bytes(payload[2..10].try_into().expect("8 bytes"));
                let flags = u16::from_be_bytes([payload[10], payload[11]]);
                export_info = Some((size, flags));
            }
            REP_INFO => {}
            error if error & 0x8000_0000 != 0 => {
                let message = String::from_utf8_lossy(&payload).into_owned();
                return Err(protocol(format!(
                    "export '{export}' refused ({error:#x}) {message}"
                )));
            }
            other => return Err(protocol(format!("unexpected option reply {other}"))),
        }
    }
    export_info.ok_or_else(|| protocol("server sent no NBD_INFO_EXPORT"))
}
