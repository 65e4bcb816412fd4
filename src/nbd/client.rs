//! A small NBD client (fixed newstyle, OPT_GO, simple replies, pipelined requests, STARTTLS
//! over TCP), used by the forwarder, by the demo to drive a real NBD connection and by tests
//! that need exact control of the bytes.
//!
//! Invariant: every request sent is matched to its reply by cookie; read replies are sized
//! from the request, as simple replies carry no length.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::codec;
use crate::nbd::conn::Conn;
use crate::nbd::tls::ClientTls;
use crate::nbd::wire::{
    self, RequestHeader, CMD_DISC, CMD_FLAG_FUA, CMD_FLUSH, CMD_READ, CMD_WRITE,
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_DESCRIPTION, INFO_EXPORT, NBD_MAGIC,
    OPTION_REPLY_MAGIC, OPT_GO, OPT_STARTTLS, REP_ACK, REP_INFO,
};

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
    /// The server's description of the export (`NBD_INFO_DESCRIPTION`), if it sent one.
    description: Option<String>,
    next_cookie: u64,
    reads: HashMap<u64, u32>,
}

impl NbdClient {
    /// Connects to a unix socket and selects `export` with OPT_GO.
    pub fn connect_unix(socket: &Path, export: &str) -> io::Result<NbdClient> {
        Self::negotiate(Conn::Unix(UnixStream::connect(socket)?), export, None)
    }

    /// Connects over TCP and negotiates `export` (Nagle off: requests are sent whole), through
    /// STARTTLS when `tls` is given.
    pub fn connect_tcp(addr: &str, export: &str, tls: Option<&ClientTls>) -> io::Result<NbdClient> {
        let stream = std::net::TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        Self::negotiate(Conn::Tcp(stream), export, tls.map(|tls| (tls, addr)))
    }

    /// Like [`NbdClient::connect_tcp`], with every step bounded by `timeout` (connecting, and
    /// each read and write of the handshake, TLS included), so a caller that reconnects in a
    /// loop never hangs on a destination that accepts and then says nothing. The timeouts are
    /// off afterwards.
    pub fn connect_tcp_within(
        addr: &str,
        export: &str,
        timeout: std::time::Duration,
        tls: Option<&ClientTls>,
    ) -> io::Result<NbdClient> {
        use std::net::ToSocketAddrs;
        let mut last = io::Error::new(
            io::ErrorKind::NotFound,
            format!("{addr} resolves to nothing"),
        );
        for resolved in addr.to_socket_addrs()? {
            match std::net::TcpStream::connect_timeout(&resolved, timeout) {
                Ok(stream) => {
                    if stream.local_addr()? == stream.peer_addr()? {
                        // TCP simultaneous open with itself: nothing listens on `addr`, whose
                        // port the kernel also picked as our local port.
                        last = io::Error::new(io::ErrorKind::ConnectionRefused, "self-connect");
                        continue;
                    }
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(timeout))?;
                    stream.set_write_timeout(Some(timeout))?;
                    let tls = tls.map(|tls| (tls, addr));
                    let client = Self::negotiate(Conn::Tcp(stream.try_clone()?), export, tls)?;
                    stream.set_read_timeout(None)?;
                    stream.set_write_timeout(None)?;
                    return Ok(client);
                }
                Err(err) => last = err,
            }
        }
        Err(last)
    }

    /// The handshake: greeting, STARTTLS and the TLS handshake when `tls` names the
    /// configuration and the `host:port` dialled, then OPT_GO.
    fn negotiate(
        mut conn: Conn,
        export: &str,
        tls: Option<(&ClientTls, &str)>,
    ) -> io::Result<NbdClient> {
        greet(&mut conn)?;
        if let (Some((config, addr)), Conn::Tcp(_)) = (tls, &conn) {
            start_tls(&mut conn)?;
            let Conn::Tcp(stream) = conn else {
                unreachable!("matched as TCP above");
            };
            conn = Conn::Tls(Box::new(config.connect(stream, addr)?));
        }
        let info = go(&mut conn, export)?;
        Ok(NbdClient {
            conn,
            size_bytes: info.size_bytes,
            transmission_flags: info.transmission_flags,
            description: info.description,
            next_cookie: 1,
            reads: HashMap::new(),
        })
    }

    /// The server's description of the export, if it sent one.
    pub fn description(&self) -> Option<&str> {
        self.description.as_deref()
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

    /// Sends one request, any flags and command (tests send malformed ones); returns its
    /// cookie. A READ's reply is sized from `len_bytes`.
    pub fn send(
        &mut self,
        flags: u16,
        command: u16,
        offset_bytes: u64,
        len_bytes: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let header = RequestHeader {
            flags,
            command,
            cookie,
            offset_bytes,
            length_bytes: len_bytes,
        };
        self.conn.write_all(&header.to_bytes())?;
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

    /// Waits for the next reply.
    pub fn recv(&mut self) -> io::Result<Reply> {
        let mut head = [0u8; wire::SIMPLE_REPLY_BYTES];
        self.conn.read_exact(&mut head)?;
        let wire::SimpleReply { error, cookie } =
            wire::parse_simple_reply(&head).map_err(|err| protocol(err.to_string()))?;
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

/// What OPT_GO told of the export.
struct GoInfo {
    size_bytes: u64,
    transmission_flags: u16,
    description: Option<String>,
}

/// Reads the server's greeting and answers with the client flags.
fn greet(conn: &mut Conn) -> io::Result<()> {
    let mut greeting = [0u8; 18];
    conn.read_exact(&mut greeting)?;
    let [magic @ .., _, _, _, _, _, _, _, _, f0, f1] = greeting;
    if u64::from_be_bytes(magic) != NBD_MAGIC || greeting[8..16] != IHAVEOPT.to_be_bytes() {
        return Err(protocol("not an NBD fixed newstyle server"));
    }
    let server_flags = u16::from_be_bytes([f0, f1]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("server lacks fixed newstyle"));
    }
    let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
    conn.write_all(&client_flags.to_be_bytes())
}

/// Sends NBD_OPT_STARTTLS and waits for its acknowledgement; the TLS handshake comes next.
fn start_tls(conn: &mut Conn) -> io::Result<()> {
    let mut option = [0u8; 16];
    option[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    option[8..12].copy_from_slice(&OPT_STARTTLS.to_be_bytes());
    conn.write_all(&option)?;
    let (reply_type, payload) = read_option_reply(conn)?;
    if reply_type != REP_ACK {
        let message = String::from_utf8_lossy(&payload);
        return Err(protocol(format!(
            "server refused STARTTLS ({reply_type:#x}) {message}"
        )));
    }
    Ok(())
}

/// One option reply: its type and data (bounded).
fn read_option_reply(conn: &mut Conn) -> io::Result<(u32, Vec<u8>)> {
    let mut head = [0u8; 20];
    conn.read_exact(&mut head)?;
    let [magic @ .., _, _, _, _, t0, t1, t2, t3, l0, l1, l2, l3] = head;
    if u64::from_be_bytes(magic) != OPTION_REPLY_MAGIC {
        return Err(protocol("bad option reply magic"));
    }
    let reply_type = u32::from_be_bytes([t0, t1, t2, t3]);
    let len = u32::from_be_bytes([l0, l1, l2, l3]);
    if len > 64 * 1024 {
        return Err(protocol("option reply too large"));
    }
    let mut payload = vec![0u8; len as usize];
    conn.read_exact(&mut payload)?;
    Ok((reply_type, payload))
}

/// OPT_GO for `export`, asking for its description too.
fn go(conn: &mut Conn, export: &str) -> io::Result<GoInfo> {
    let name = export.as_bytes();
    let mut option = Vec::with_capacity(16 + 8 + name.len());
    option.extend_from_slice(&IHAVEOPT.to_be_bytes());
    option.extend_from_slice(&OPT_GO.to_be_bytes());
    option.extend_from_slice(&((name.len() + 8) as u32).to_be_bytes());
    option.extend_from_slice(&(name.len() as u32).to_be_bytes());
    option.extend_from_slice(name);
    option.extend_from_slice(&1u16.to_be_bytes());
    option.extend_from_slice(&INFO_DESCRIPTION.to_be_bytes());
    conn.write_all(&option)?;
    let mut export_info = None;
    let mut description = None;
    loop {
        let (reply_type, payload) = read_option_reply(conn)?;
        match reply_type {
            REP_ACK => break,
            REP_INFO => {
                let mut info = codec::Reader::new(&payload);
                match info.u16_be() {
                    Ok(INFO_EXPORT) => {
                        let size = info.u64_be();
                        let flags = info.u16_be();
                        if let (Ok(size), Ok(flags)) = (size, flags) {
                            export_info = Some((size, flags));
                        }
                    }
                    Ok(INFO_DESCRIPTION) => {
                        description = Some(String::from_utf8_lossy(&payload[2..]).into_owned());
                    }
                    _ => {}
                }
            }
            error if error & 0x8000_0000 != 0 => {
                let message = String::from_utf8_lossy(&payload).into_owned();
                return Err(protocol(format!(
                    "export '{export}' refused ({error:#x}) {message}"
                )));
            }
            other => return Err(protocol(format!("unexpected option reply {other}"))),
        }
    }
    let (size_bytes, transmission_flags) =
        export_info.ok_or_else(|| protocol("server sent no NBD_INFO_EXPORT"))?;
    Ok(GoInfo {
        size_bytes,
        transmission_flags,
        description,
    })
}
