//! Framed I/O on a stream socket and the mutual key challenge; shared by both sides.
//!
//! Invariants: a frame is read header first (24 bytes), then its meta (bounded by
//! [`frame::MAX_META_BYTES`]), never more; a Data payload is left in the socket for the caller
//! to read into its own aligned buffer. A Data frame goes out as one vectored write of
//! header and payload, without copying the payload.

use std::io::{self, IoSlice, Read, Write};

use super::frame::{self, Frame, Role, HEADER_BYTES};
use super::key::{random_bytes, ClusterKey};
use super::TransferError;

/// Name of a frame's kind, for errors.
pub(crate) fn frame_name(frame: &Frame) -> &'static str {
    match frame {
        Frame::Hello { .. } => "Hello",
        Frame::Proof { .. } => "Proof",
        Frame::Open(_) => "Open",
        Frame::OpenOk { .. } => "OpenOk",
        Frame::Data { .. } => "Data",
        Frame::Zero { .. } => "Zero",
        Frame::Trim { .. } => "Trim",
        Frame::Sync { .. } => "Sync",
        Frame::SyncOk { .. } => "SyncOk",
        Frame::Commit { .. } => "Commit",
        Frame::CommitOk { .. } => "CommitOk",
        Frame::Verify { .. } => "Verify",
        Frame::VerifyOk { .. } => "VerifyOk",
        Frame::Fence { .. } => "Fence",
        Frame::FenceOk { .. } => "FenceOk",
        Frame::Query { .. } => "Query",
        Frame::Digests { .. } => "Digests",
        Frame::DigestsOk { .. } => "DigestsOk",
        Frame::QueryOk { .. } => "QueryOk",
        Frame::Repoint(_) => "Repoint",
        Frame::RepointOk { .. } => "RepointOk",
        Frame::Abort => "Abort",
        Frame::Error { .. } => "Error",
    }
}

/// Reads one frame (without a Data payload). `meta` is scratch space reused between calls.
pub(crate) fn read_frame(
    stream: &mut impl Read,
    meta: &mut Vec<u8>,
) -> Result<Frame, TransferError> {
    let mut head = [0u8; HEADER_BYTES];
    stream
        .read_exact(&mut head)
        .map_err(TransferError::from_socket)?;
    let header = frame::decode_header(&head).map_err(TransferError::BadFrame)?;
    meta.clear();
    meta.resize(header.meta_len as usize, 0);
    stream
        .read_exact(meta)
        .map_err(TransferError::from_socket)?;
    frame::decode_meta(&header, meta).map_err(TransferError::BadFrame)
}

/// Writes one frame that has no payload. `scratch` is reused between calls.
pub(crate) fn write_frame(
    stream: &mut impl Write,
    frame: &Frame,
    scratch: &mut Vec<u8>,
) -> Result<(), TransferError> {
    debug_assert!(!matches!(frame, Frame::Data { .. }), "use write_data");
    scratch.clear();
    frame::encode(frame, scratch);
    stream
        .write_all(scratch)
        .map_err(TransferError::from_socket)
}

/// Writes a Data frame and its payload with vectored writes (the payload is not copied);
/// the caller computed the payload's BLAKE3 digest (outside any lock).
pub(crate) fn write_data(
    stream: &mut impl Write,
    offset_bytes: u64,
    payload: &[u8],
    digest: [u8; 32],
    scratch: &mut Vec<u8>,
) -> Result<(), TransferError> {
    let frame = Frame::Data {
        offset_bytes,
        len_bytes: u32::try_from(payload.len()).expect("payload bounded by MAX_DATA_BYTES"),
        digest,
    };
    scratch.clear();
    frame::encode(&frame, scratch);
    write_all_vectored(stream, &mut [IoSlice::new(scratch), IoSlice::new(payload)])
        .map_err(TransferError::from_socket)
}

fn write_all_vectored(stream: &mut impl Write, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        match stream.write_vectored(slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => IoSlice::advance_slices(&mut slices, written),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(())
}

/// Sends an `Error` frame, ignoring failure (the connection is being closed anyway).
#[cold]
pub(crate) fn send_error(
    stream: &mut impl Write,
    code: frame::ErrorCode,
    offset_bytes: u64,
    message: &str,
) {
    let frame = Frame::Error {
        code,
        offset_bytes,
        message: frame::truncate_utf8(message, frame::MAX_MESSAGE_BYTES).to_owned(),
    };
    let _ = write_frame(stream, &frame, &mut Vec::new());
    let _ = stream.flush();
}

/// Turns a frame that is not the expected one into the error it means.
#[cold]
pub(crate) fn unexpected(frame: Frame, expected: &'static str) -> TransferError {
    match frame {
        Frame::Error {
            code,
            offset_bytes,
            message,
        } => TransferError::from_remote(code, offset_bytes, message),
        other => TransferError::Unexpected {
            expected,
            got: frame_name(&other),
        },
    }
}

/// A short exchange on its own connection (a query, a re-point): connect within `timeout`,
/// every read and write bounded by it too, and prove the cluster key as the asking side.
pub(crate) fn dial_authenticated(
    addr: std::net::SocketAddr,
    key: &ClusterKey,
    timeout: std::time::Duration,
) -> Result<std::net::TcpStream, TransferError> {
    let mut stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(TransferError::Connect)?;
    stream.set_nodelay(true).map_err(TransferError::Socket)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(TransferError::Socket)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(TransferError::Socket)?;
    authenticate(&mut stream, key, Role::Source)?;
    Ok(stream)
}

/// Runs the mutual challenge as `role` (see the module diagram in `transfer`). The source
/// proves first; the destination proves only to a peer that proved, so an unauthenticated
/// peer learns nothing. A destination that rejects a proof tells the peer with `Error{Auth}`.
pub(crate) fn authenticate<S: Read + Write>(
    stream: &mut S,
    key: &ClusterKey,
    role: Role,
) -> Result<(), TransferError> {
    let own_nonce = random_bytes().map_err(TransferError::Socket)?;
    let mut scratch = Vec::new();
    let mut meta = Vec::new();
    let peer_role = match role {
        Role::Source => Role::Destination,
        Role::Destination => Role::Source,
    };
    let hello = Frame::Hello {
        nonce: own_nonce,
        role,
    };
    if role == Role::Source {
        write_frame(stream, &hello, &mut scratch)?;
    }
    let peer_nonce = match read_frame(stream, &mut meta)? {
        Frame::Hello { nonce, role } if role == peer_role => nonce,
        Frame::Hello { .. } => {
            send_error(
                stream,
                frame::ErrorCode::Auth,
                0,
                "both peers claim the same role",
            );
            return Err(TransferError::Auth {
                reason: "the peer claims our role",
            });
        }
        other => return Err(unexpected(other, "Hello")),
    };
    let (source_nonce, target_nonce) = match role {
        Role::Source => (own_nonce, peer_nonce),
        Role::Destination => (peer_nonce, own_nonce),
    };
    let own_proof = Frame::Proof {
        mac: key.prove(role, &source_nonce, &target_nonce),
    };
    if role == Role::Source {
        write_frame(stream, &own_proof, &mut scratch)?;
    } else {
        write_frame(stream, &hello, &mut scratch)?;
    }
    let peer_mac = match read_frame(stream, &mut meta)? {
        Frame::Proof { mac } => mac,
        other => return Err(unexpected(other, "Proof")),
    };
    if !key.verify(peer_role, &source_nonce, &target_nonce, &peer_mac) {
        if role == Role::Destination {
            send_error(stream, frame::ErrorCode::Auth, 0, "authentication failed");
        }
        return Err(TransferError::Auth {
            reason: "the peer did not prove the cluster key",
        });
    }
    if role == Role::Destination {
        write_frame(stream, &own_proof, &mut scratch)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn run_pair(
        source_key: ClusterKey,
        target_key: ClusterKey,
    ) -> (Result<(), TransferError>, Result<(), TransferError>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let target = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            authenticate(&mut stream, &target_key, Role::Destination)
        });
        let mut stream = TcpStream::connect(addr).unwrap();
        let source = authenticate(&mut stream, &source_key, Role::Source);
        (source, target.join().unwrap())
    }

    // Goal: the same key authenticates both sides; different keys fail on both sides with
    // Auth. Method: run the challenge over loopback TCP with equal, then different keys.
    #[test]
    fn auth_right_and_wrong_key() {
        let key = ClusterKey::from_bytes([5; 32]);
        let (source, target) = run_pair(key.clone(), key);
        source.unwrap();
        target.unwrap();

        let (source, target) = run_pair(
            ClusterKey::from_bytes([5; 32]),
            ClusterKey::from_bytes([6; 32]),
        );
        assert!(
            matches!(source, Err(TransferError::Auth { .. })),
            "{source:?}"
        );
        assert!(
            matches!(target, Err(TransferError::Auth { .. })),
            "{target:?}"
        );
    }

    // Goal: a peer that answers with the source role (a reflected Hello) is refused.
    // Method: two sources talk to each other.
    #[test]
    fn reflected_role_is_refused() {
        let key = ClusterKey::from_bytes([5; 32]);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let peer_key = key.clone();
        let peer = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            authenticate(&mut stream, &peer_key, Role::Source)
        });
        let mut stream = TcpStream::connect(addr).unwrap();
        let ours = authenticate(&mut stream, &key, Role::Source);
        assert!(ours.is_err());
        assert!(peer.join().unwrap().is_err());
    }
}
