//! Framed I/O on a stream socket, the mutual key challenge, and the sealing of every frame
//! after it ([`super::seal`]); shared by both sides.
//!
//! ```text
//!  handshake (Hello, Proof):  header ‖ meta                     in the clear (X25519 publics
//!                                                               in the Hellos)
//!  after it, every frame:     header ‖ meta* ‖ tag              meta* sealed, header as AAD
//!  and a Data frame's payload:         payload* ‖ tag           the next record
//! ```
//!
//! Invariants:
//! - A frame is read header first (24 bytes, crc32c and bounds checked), then its meta
//!   (bounded by [`frame::MAX_META_BYTES`]) and tag, never more; nothing of a sealed frame
//!   is decoded before its tag verified. A Data payload is left in the socket for the
//!   caller to read into its own aligned buffer ([`read_payload`]), where it is opened in
//!   place.
//! - Each direction's records are sealed and opened in wire order under one counter (the
//!   writer lock orders the sender's frames), so a frame forged, replayed, reordered or
//!   dropped on the way fails to open, and the connection ends.
//! - A Data frame goes out as one vectored write of header, payload and tag; the payload is
//!   sealed in the caller's buffer when it may be changed, else in one bounded copy.
//! - Both sides must run the same mode (sealed, or insecure for measurement); a mismatch is
//!   refused at the handshake, and the mode is part of each proof.

use std::io::{self, IoSlice, Read, Write};

use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::SystemRandom;

use super::frame::{self, Frame, Role, HEADER_BYTES};
use super::key::{random_bytes, ClusterKey, Transcript};
use super::seal::{self, Opener, SealError, Sealer, TAG_BYTES};
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
        Frame::Mark { .. } => "Mark",
        Frame::MarkOk { .. } => "MarkOk",
        Frame::Abort => "Abort",
        Frame::Error { .. } => "Error",
    }
}

/// The sending half of a connection's framing: seals every frame after the handshake (or
/// none, on an insecure stream).
#[derive(Debug)]
pub(crate) struct Tx {
    sealer: Option<Sealer>,
    /// A payload's sealed copy when the caller's buffer may not be changed (mirrored guest
    /// writes); grows to the largest payload sent, at most [`frame::MAX_DATA_BYTES`].
    copy: Vec<u8>,
}

/// The receiving half: opens every frame after the handshake (or none, on an insecure
/// stream).
#[derive(Debug)]
pub(crate) struct Rx {
    opener: Option<Opener>,
}

/// A connection after its handshake: the socket and both halves of its framing. Deref
/// gives the socket for its options and for draining at close; frames go through
/// [`read_frame`], [`write_frame`] and [`read_payload`].
#[derive(Debug)]
pub(crate) struct Link<S> {
    stream: S,
    tx: Tx,
    rx: Rx,
}

impl<S> Link<S> {
    /// The socket and the two halves, for a sender that reads and writes on two threads.
    pub(crate) fn into_parts(self) -> (S, Tx, Rx) {
        (self.stream, self.tx, self.rx)
    }
}

impl<S> std::ops::Deref for Link<S> {
    type Target = S;
    fn deref(&self) -> &S {
        &self.stream
    }
}

impl<S> std::ops::DerefMut for Link<S> {
    fn deref_mut(&mut self) -> &mut S {
        &mut self.stream
    }
}

/// A record that did not open, as the frame error it is.
fn forged(err: SealError) -> TransferError {
    match err {
        SealError::Forged => TransferError::BadFrame(frame::FrameError::Forged),
        SealError::Exhausted => TransferError::BadFrame(frame::FrameError::TooLong("stream")),
    }
}

impl Rx {
    /// Reads one frame (without a Data payload). `meta` is scratch space reused between
    /// calls. The header is checked (crc32c, bounds) before anything else is read; a sealed
    /// frame's meta is authenticated, with the header, before it is decoded.
    pub(crate) fn read_frame(
        &mut self,
        stream: &mut impl Read,
        meta: &mut Vec<u8>,
    ) -> Result<Frame, TransferError> {
        let mut head = [0u8; HEADER_BYTES];
        stream
            .read_exact(&mut head)
            .map_err(TransferError::from_socket)?;
        let header = frame::decode_header(&head).map_err(TransferError::BadFrame)?;
        let meta_len = header.meta_len as usize;
        let tag_len = if self.opener.is_some() { TAG_BYTES } else { 0 };
        meta.clear();
        meta.resize(meta_len + tag_len, 0);
        stream
            .read_exact(meta)
            .map_err(TransferError::from_socket)?;
        if let Some(opener) = &mut self.opener {
            let (text, tag) = meta.split_at_mut(meta_len);
            let tag: &[u8; TAG_BYTES] = (&*tag).try_into().expect("TAG_BYTES long");
            opener.open(&head, text, tag).map_err(forged)?;
            meta.truncate(meta_len);
        }
        frame::decode_meta(&header, meta).map_err(TransferError::BadFrame)
    }

    /// Reads the payload of the Data frame just read into `buf` (its `len_bytes`), opening
    /// it in place on a sealed stream.
    pub(crate) fn read_payload(
        &mut self,
        stream: &mut impl Read,
        buf: &mut [u8],
    ) -> Result<(), TransferError> {
        stream.read_exact(buf).map_err(TransferError::from_socket)?;
        if let Some(opener) = &mut self.opener {
            let mut tag = [0u8; TAG_BYTES];
            stream
                .read_exact(&mut tag)
                .map_err(TransferError::from_socket)?;
            opener.open(&[], buf, &tag).map_err(forged)?;
        }
        Ok(())
    }
}

impl Tx {
    /// Writes one frame that has no payload. `scratch` is reused between calls.
    pub(crate) fn write_frame(
        &mut self,
        stream: &mut impl Write,
        frame: &Frame,
        scratch: &mut Vec<u8>,
    ) -> Result<(), TransferError> {
        debug_assert!(!matches!(frame, Frame::Data { .. }), "use write_data");
        self.encode(frame, scratch)?;
        stream
            .write_all(scratch)
            .map_err(TransferError::from_socket)
    }

    /// Header and meta of `frame` into `scratch`, the meta sealed and its tag appended.
    fn encode(&mut self, frame: &Frame, scratch: &mut Vec<u8>) -> Result<(), TransferError> {
        scratch.clear();
        frame::encode(frame, scratch);
        if let Some(sealer) = &mut self.sealer {
            let (head, meta) = scratch.split_at_mut(HEADER_BYTES);
            let tag = sealer.seal(head, meta).map_err(forged)?;
            scratch.extend_from_slice(&tag);
        }
        Ok(())
    }

    /// Writes a Data frame and its payload with vectored writes; the caller computed the
    /// payload's BLAKE3 digest (outside any lock). On a sealed stream the payload is sealed
    /// in a copy (`payload` is someone else's, e.g. a guest write being mirrored).
    pub(crate) fn write_data(
        &mut self,
        stream: &mut impl Write,
        offset_bytes: u64,
        payload: &[u8],
        digest: [u8; 32],
        scratch: &mut Vec<u8>,
    ) -> Result<(), TransferError> {
        if self.sealer.is_none() {
            self.encode(&data_frame(offset_bytes, payload.len(), digest), scratch)?;
            return write_all_vectored(stream, &mut [IoSlice::new(scratch), IoSlice::new(payload)])
                .map_err(TransferError::from_socket);
        }
        let mut copy = std::mem::take(&mut self.copy);
        copy.clear();
        copy.extend_from_slice(payload);
        let written = self.write_data_in_place(stream, offset_bytes, &mut copy, digest, scratch);
        self.copy = copy;
        written
    }

    /// Like [`Tx::write_data`], sealing `payload` in place (no copy): the caller's buffer
    /// holds ciphertext afterwards.
    pub(crate) fn write_data_in_place(
        &mut self,
        stream: &mut impl Write,
        offset_bytes: u64,
        payload: &mut [u8],
        digest: [u8; 32],
        scratch: &mut Vec<u8>,
    ) -> Result<(), TransferError> {
        self.encode(&data_frame(offset_bytes, payload.len(), digest), scratch)?;
        let Some(sealer) = &mut self.sealer else {
            return write_all_vectored(stream, &mut [IoSlice::new(scratch), IoSlice::new(payload)])
                .map_err(TransferError::from_socket);
        };
        let tag = sealer.seal(&[], payload).map_err(forged)?;
        write_all_vectored(
            stream,
            &mut [
                IoSlice::new(scratch),
                IoSlice::new(payload),
                IoSlice::new(&tag),
            ],
        )
        .map_err(TransferError::from_socket)
    }

    /// Sends an `Error` frame, ignoring failure (the connection is being closed anyway).
    #[cold]
    pub(crate) fn send_error(
        &mut self,
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
        let _ = self.write_frame(stream, &frame, &mut Vec::new());
        let _ = stream.flush();
    }
}

fn data_frame(offset_bytes: u64, len: usize, digest: [u8; 32]) -> Frame {
    Frame::Data {
        offset_bytes,
        len_bytes: u32::try_from(len).expect("payload bounded by MAX_DATA_BYTES"),
        digest,
    }
}

/// Reads one frame of `link` (without a Data payload); see [`Rx::read_frame`].
pub(crate) fn read_frame<S: Read>(
    link: &mut Link<S>,
    meta: &mut Vec<u8>,
) -> Result<Frame, TransferError> {
    link.rx.read_frame(&mut link.stream, meta)
}

/// Reads the payload of the Data frame just read; see [`Rx::read_payload`].
pub(crate) fn read_payload<S: Read>(
    link: &mut Link<S>,
    buf: &mut [u8],
) -> Result<(), TransferError> {
    link.rx.read_payload(&mut link.stream, buf)
}

/// Writes one frame that has no payload on `link`; see [`Tx::write_frame`].
pub(crate) fn write_frame<S: Write>(
    link: &mut Link<S>,
    frame: &Frame,
    scratch: &mut Vec<u8>,
) -> Result<(), TransferError> {
    link.tx.write_frame(&mut link.stream, frame, scratch)
}

/// Writes a Data frame and its payload on `link`; see [`Tx::write_data`].
#[cfg(test)]
pub(crate) fn write_data<S: Write>(
    link: &mut Link<S>,
    offset_bytes: u64,
    payload: &[u8],
    digest: [u8; 32],
    scratch: &mut Vec<u8>,
) -> Result<(), TransferError> {
    link.tx
        .write_data(&mut link.stream, offset_bytes, payload, digest, scratch)
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

/// Sends an `Error` frame on `link`, ignoring failure (the connection is being closed).
#[cold]
pub(crate) fn send_error<S: Write>(
    link: &mut Link<S>,
    code: frame::ErrorCode,
    offset_bytes: u64,
    message: &str,
) {
    link.tx
        .send_error(&mut link.stream, code, offset_bytes, message);
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
) -> Result<Link<std::net::TcpStream>, TransferError> {
    let stream =
        std::net::TcpStream::connect_timeout(&addr, timeout).map_err(TransferError::Connect)?;
    stream.set_nodelay(true).map_err(TransferError::Socket)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(TransferError::Socket)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(TransferError::Socket)?;
    authenticate(stream, key, Role::Source)
}

/// Runs the mutual challenge as `role` (see the module diagram in `transfer`), then seals
/// the connection with keys derived from both Hellos and an ephemeral X25519 exchange
/// (unless both sides run insecure). The source proves first; the destination proves only
/// to a peer that proved, so an unauthenticated peer learns nothing. A destination that
/// rejects a proof tells the peer with `Error{Auth}`; one whose stream mode differs from the
/// source's tells it with `Error{Refused}`.
pub(crate) fn authenticate<S: Read + Write>(
    stream: S,
    key: &ClusterKey,
    role: Role,
) -> Result<Link<S>, TransferError> {
    let mut link = Link {
        stream,
        tx: Tx {
            sealer: None,
            copy: Vec::new(),
        },
        rx: Rx { opener: None },
    };
    let ephemeral = EphemeralPrivateKey::generate(&X25519, &SystemRandom::new())
        .map_err(|_| TransferError::Socket(io::Error::other("cannot make an X25519 key")))?;
    let (transcript, peer_public) = challenge(&mut link, key, role, &ephemeral)?;
    if !key.insecure_stream() {
        let shared = agree_ephemeral(
            ephemeral,
            &UnparsedPublicKey::new(&X25519, peer_public),
            |secret| <[u8; 32]>::try_from(secret).ok(),
        )
        .ok()
        .flatten()
        .ok_or(TransferError::Auth {
            reason: "the peer's ephemeral key is not a usable X25519 key",
        })?;
        let (sealer, opener) = seal::derive(key, role, &transcript, &shared);
        link.tx.sealer = Some(sealer);
        link.rx.opener = Some(opener);
    }
    Ok(link)
}

/// The Hello/Proof exchange in the clear; returns what both Hellos said and the peer's
/// ephemeral public key.
fn challenge<S: Read + Write>(
    link: &mut Link<S>,
    key: &ClusterKey,
    role: Role,
    ephemeral: &EphemeralPrivateKey,
) -> Result<(Transcript, [u8; 32]), TransferError> {
    let own_nonce = random_bytes().map_err(TransferError::Socket)?;
    let own_public: [u8; 32] = ephemeral
        .compute_public_key()
        .ok()
        .and_then(|public| public.as_ref().try_into().ok())
        .ok_or_else(|| TransferError::Socket(io::Error::other("cannot make an X25519 key")))?;
    let mut scratch = Vec::new();
    let mut meta = Vec::new();
    let peer_role = match role {
        Role::Source => Role::Destination,
        Role::Destination => Role::Source,
    };
    let insecure = key.insecure_stream();
    let hello = Frame::Hello {
        nonce: own_nonce,
        role,
        insecure,
        public: own_public,
    };
    if role == Role::Source {
        write_frame(link, &hello, &mut scratch)?;
    }
    let (peer_nonce, peer_public) = read_peer_hello(link, peer_role, insecure, &mut meta)?;
    let transcript = match role {
        Role::Source => Transcript {
            source_nonce: own_nonce,
            target_nonce: peer_nonce,
            source_public: own_public,
            target_public: peer_public,
        },
        Role::Destination => Transcript {
            source_nonce: peer_nonce,
            target_nonce: own_nonce,
            source_public: peer_public,
            target_public: own_public,
        },
    };
    let own_proof = Frame::Proof {
        mac: key.prove(role, &transcript),
    };
    if role == Role::Source {
        write_frame(link, &own_proof, &mut scratch)?;
    } else {
        write_frame(link, &hello, &mut scratch)?;
    }
    let peer_mac = match read_frame(link, &mut meta)? {
        Frame::Proof { mac } => mac,
        other => return Err(unexpected(other, "Proof")),
    };
    if !key.verify(peer_role, &transcript, &peer_mac) {
        if role == Role::Destination {
            send_error(link, frame::ErrorCode::Auth, 0, "authentication failed");
        }
        return Err(TransferError::Auth {
            reason: "the peer did not prove the cluster key",
        });
    }
    if role == Role::Destination {
        write_frame(link, &own_proof, &mut scratch)?;
    }
    Ok((transcript, peer_public))
}

/// Reads the peer's Hello: its nonce and ephemeral public key, if it has the other role and
/// our stream mode. A peer of an older version, of our own role or of the other mode is told
/// why it is refused.
fn read_peer_hello<S: Read + Write>(
    link: &mut Link<S>,
    peer_role: Role,
    insecure: bool,
    meta: &mut Vec<u8>,
) -> Result<([u8; 32], [u8; 32]), TransferError> {
    let peer_hello = match read_frame(link, meta) {
        Err(TransferError::BadFrame(frame::FrameError::BadVersion(version))) => {
            refuse_version(link, version);
            return Err(TransferError::BadFrame(frame::FrameError::BadVersion(
                version,
            )));
        }
        other => other?,
    };
    match peer_hello {
        Frame::Hello {
            nonce,
            role,
            insecure: peer_insecure,
            public,
        } if role == peer_role => {
            if peer_insecure != insecure {
                send_error(link, frame::ErrorCode::Refused, 0, MODE_MISMATCH);
                return Err(TransferError::Auth {
                    reason: MODE_MISMATCH,
                });
            }
            Ok((nonce, public))
        }
        Frame::Hello { .. } => {
            send_error(
                link,
                frame::ErrorCode::Auth,
                0,
                "both peers claim the same role",
            );
            Err(TransferError::Auth {
                reason: "the peer claims our role",
            })
        }
        other => Err(unexpected(other, "Hello")),
    }
}

/// Tells a peer of an older protocol version, in its own version's framing, why it is
/// refused (a newer one reads our version number and knows); ignores failure.
#[cold]
fn refuse_version<S: Write>(link: &mut Link<S>, version: u8) {
    if version == 0 || version >= frame::VERSION {
        return;
    }
    let message = format!(
        "block stream protocol version {} here, the peer speaks version {version}: run the \
         same ferry release on both agents",
        frame::VERSION
    );
    let error = Frame::Error {
        code: frame::ErrorCode::Refused,
        offset_bytes: 0,
        message,
    };
    let mut bytes = Vec::new();
    frame::encode_for_version(&error, version, &mut bytes);
    let _ = link.stream.write_all(&bytes);
    let _ = link.stream.flush();
}

/// Why a handshake between a sealed and an insecure agent stops.
const MODE_MISMATCH: &str =
    "stream mode mismatch: one agent runs the block stream insecure (stream_insecure), the other sealed";

#[cfg(test)]
#[path = "link_tests.rs"]
mod tests;
