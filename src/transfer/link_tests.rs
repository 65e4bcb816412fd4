//! Tests of the framing: the handshake over loopback TCP, and the sealed record layer on
//! byte buffers (tampered, replayed, dropped and reordered frames).

use super::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};

fn run_pair(
    source_key: ClusterKey,
    target_key: ClusterKey,
) -> (Result<(), TransferError>, Result<(), TransferError>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        authenticate(stream, &target_key, Role::Destination).map(drop)
    });
    let stream = TcpStream::connect(addr).unwrap();
    let source = authenticate(stream, &source_key, Role::Source).map(drop);
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
        let (stream, _) = listener.accept().unwrap();
        authenticate(stream, &peer_key, Role::Source).map(drop)
    });
    let stream = TcpStream::connect(addr).unwrap();
    let ours = authenticate(stream, &key, Role::Source).map(drop);
    assert!(ours.is_err());
    assert!(peer.join().unwrap().is_err());
}

/// A source's sending half and the destination's receiving half of one connection.
fn sealed_halves() -> (Tx, Rx) {
    let key = ClusterKey::from_bytes([5; 32]);
    let hellos = Transcript {
        source_nonce: [1; 32],
        target_nonce: [2; 32],
        source_public: [3; 32],
        target_public: [4; 32],
    };
    let shared = [6; 32];
    let sealer = seal::derive(&key, Role::Source, &hellos, &shared).0;
    let opener = seal::derive(&key, Role::Destination, &hellos, &shared).1;
    (
        Tx {
            sealer: Some(sealer),
            copy: Vec::new(),
        },
        Rx {
            opener: Some(opener),
        },
    )
}

const PAYLOAD: [u8; 4096] = [0x5A; 4096];

/// Sync{1}, Data(PAYLOAD at 8192), Sync{2} sealed into bytes; returns them and where
/// each of the three frames starts (and the end).
fn three_frames(tx: &mut Tx) -> (Vec<u8>, [usize; 4]) {
    let (mut wire, mut scratch) = (Vec::new(), Vec::new());
    let mut starts = [0; 4];
    tx.write_frame(&mut wire, &Frame::Sync { seq: 1 }, &mut scratch)
        .unwrap();
    starts[1] = wire.len();
    let digest = *blake3::hash(&PAYLOAD).as_bytes();
    tx.write_data(&mut wire, 8192, &PAYLOAD, digest, &mut scratch)
        .unwrap();
    starts[2] = wire.len();
    tx.write_frame(&mut wire, &Frame::Sync { seq: 2 }, &mut scratch)
        .unwrap();
    starts[3] = wire.len();
    (wire, starts)
}

/// Reads frames (and Data payloads) until the bytes end or one fails; returns the
/// frames read and the error, if any.
fn read_all(rx: &mut Rx, wire: &[u8]) -> (Vec<Frame>, Option<TransferError>) {
    let mut input = wire;
    let (mut frames, mut meta) = (Vec::new(), Vec::new());
    while !input.is_empty() {
        let frame = match rx.read_frame(&mut input, &mut meta) {
            Ok(frame) => frame,
            Err(err) => return (frames, Some(err)),
        };
        if let Frame::Data { len_bytes, .. } = frame {
            let mut buf = vec![0u8; len_bytes as usize];
            if let Err(err) = rx.read_payload(&mut input, &mut buf) {
                return (frames, Some(err));
            }
            assert_eq!(buf, PAYLOAD);
        }
        frames.push(frame);
    }
    (frames, None)
}

// Goal: sealed frames read back in order, and neither meta nor payload crosses in clear.
// Method: seal three frames into bytes; read them; look for the payload's bytes.
#[test]
fn sealed_frames_round_trip_and_hide_the_payload() {
    let (mut tx, mut rx) = sealed_halves();
    let (wire, starts) = three_frames(&mut tx);
    assert_eq!(starts[2] - starts[1], HEADER_BYTES + 40 + 16 + 4096 + 16);
    assert!(!wire.windows(64).any(|window| window == &PAYLOAD[..64]));
    let (frames, err) = read_all(&mut rx, &wire);
    assert!(err.is_none(), "{err:?}");
    assert_eq!(frames.len(), 3);
    assert_eq!(frames[2], Frame::Sync { seq: 2 });
}

fn is_forged_or_bad(err: &Option<TransferError>) -> bool {
    matches!(err, Some(TransferError::BadFrame(_)))
}

// Goal: one flipped bit in the Data frame's header, meta, meta tag, payload or payload
// tag stops the stream before the frame is used. Method: flip one bit at each place;
// read; only the frame before it may come out.
#[test]
fn one_flipped_bit_anywhere_fails() {
    let meta_at = HEADER_BYTES;
    let places = [
        ("header", 9),
        ("meta", meta_at + 3),
        ("meta tag", meta_at + 40 + 5),
        ("payload", meta_at + 40 + 16 + 100),
        ("payload tag", meta_at + 40 + 16 + 4096 + 15),
    ];
    for (name, at) in places {
        let (mut tx, mut rx) = sealed_halves();
        let (mut wire, starts) = three_frames(&mut tx);
        wire[starts[1] + at] ^= 0x10;
        let (frames, err) = read_all(&mut rx, &wire);
        assert_eq!(frames.len(), 1, "{name}: {frames:?}");
        assert!(is_forged_or_bad(&err), "{name}: {err:?}");
    }
}

// Goal: a header altered with its crc32c fixed up (what a relay would do) still fails:
// the header is authenticated with the meta. Method: change the last
// frame's kind byte in its header (Sync → Commit share a meta layout), recompute the crc.
#[test]
fn altered_header_with_valid_crc_fails() {
    let (mut tx, mut rx) = sealed_halves();
    let (mut wire, starts) = three_frames(&mut tx);
    let head = &mut wire[starts[2]..starts[2] + HEADER_BYTES];
    head[5] = 10; // Commit
    let crc = crc32c::crc32c(&head[..20]);
    head[20..24].copy_from_slice(&crc.to_be_bytes());
    let (frames, err) = read_all(&mut rx, &wire);
    assert_eq!(frames.len(), 2);
    assert!(
        matches!(
            err,
            Some(TransferError::BadFrame(frame::FrameError::Forged))
        ),
        "{err:?}"
    );
}

// Goal: a replayed, dropped or reordered frame fails, and nothing after it is read.
// Method: rebuild the bytes with a frame repeated, left out, or moved ahead.
#[test]
fn replayed_dropped_or_reordered_frames_fail() {
    let (mut tx, _) = sealed_halves();
    let (wire, starts) = three_frames(&mut tx);
    let part = |index: usize| &wire[starts[index]..starts[index + 1]];
    let cases: [(&str, Vec<&[u8]>, usize); 4] = [
        ("replay", vec![part(0), part(0), part(1)], 1),
        ("replay data", vec![part(0), part(1), part(1), part(2)], 2),
        ("drop", vec![part(0), part(2)], 1),
        ("reorder", vec![part(0), part(2), part(1)], 1),
    ];
    for (name, parts, good) in cases {
        let (_, mut rx) = sealed_halves();
        let (frames, err) = read_all(&mut rx, &parts.concat());
        assert_eq!(frames.len(), good, "{name}");
        assert!(
            matches!(
                err,
                Some(TransferError::BadFrame(frame::FrameError::Forged))
            ),
            "{name}: {err:?}"
        );
    }
}

// Goal: a sealed agent and an insecure one refuse each other at the handshake, the
// source told why (Refused); two insecure agents talk in plaintext. Method: run the
// challenge with differing, then equal insecure modes; check a frame crosses.
#[test]
fn mode_mismatch_is_refused() {
    let key = ClusterKey::from_bytes([5; 32]);
    let (source, target) = run_pair(key.clone(), key.clone().with_insecure_stream(true));
    assert!(
        matches!(source, Err(TransferError::Refused { .. })),
        "{source:?}"
    );
    assert!(
        matches!(target, Err(TransferError::Auth { .. })),
        "{target:?}"
    );
    let insecure = key.with_insecure_stream(true);
    let (source, target) = run_pair(insecure.clone(), insecure);
    source.unwrap();
    target.unwrap();
}

// Goal: after a real handshake both directions are sealed with matching keys.
// Method: authenticate over loopback, then send a frame each way.
#[test]
fn handshake_then_sealed_frames_both_ways() {
    let key = ClusterKey::from_bytes([5; 32]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target_key = key.clone();
    let target = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut link = authenticate(stream, &target_key, Role::Destination).unwrap();
        assert!(link.tx.sealer.is_some());
        let frame = read_frame(&mut link, &mut Vec::new()).unwrap();
        write_frame(
            &mut link,
            &Frame::SyncOk {
                seq: 7,
                received_blocks: 3,
            },
            &mut Vec::new(),
        )
        .unwrap();
        frame
    });
    let mut link = authenticate(TcpStream::connect(addr).unwrap(), &key, Role::Source).unwrap();
    write_frame(&mut link, &Frame::Sync { seq: 7 }, &mut Vec::new()).unwrap();
    let answer = read_frame(&mut link, &mut Vec::new()).unwrap();
    assert_eq!(target.join().unwrap(), Frame::Sync { seq: 7 });
    assert_eq!(
        answer,
        Frame::SyncOk {
            seq: 7,
            received_blocks: 3
        }
    );
}

// Goal: a peer of protocol version 1 is refused in words it can read: an Error frame under a
// version-1 header (an old source reports "refused" instead of retrying), never misread.
// Method: send a Hello under a version-1 header to a destination; read the answer's header.
#[test]
fn older_version_is_refused_in_its_own_framing() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let key = ClusterKey::from_bytes([5; 32]);
        authenticate(stream, &key, Role::Destination).map(drop)
    });
    let mut stream = TcpStream::connect(addr).unwrap();
    let hello = Frame::Hello {
        nonce: [1; 32],
        role: Role::Source,
        insecure: false,
        public: [2; 32],
    };
    let mut bytes = Vec::new();
    frame::encode_for_version(&hello, 1, &mut bytes);
    stream.write_all(&bytes).unwrap();
    let mut head = [0u8; HEADER_BYTES];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(head[4], 1, "answered in version 1");
    assert_eq!(head[5], 13, "an Error frame");
    let meta_len = u32::from_be_bytes(head[8..12].try_into().unwrap()) as usize;
    let mut meta = vec![0u8; meta_len];
    stream.read_exact(&mut meta).unwrap();
    assert!(String::from_utf8_lossy(&meta).contains("version 2 here"));
    assert!(matches!(
        target.join().unwrap(),
        Err(TransferError::BadFrame(frame::FrameError::BadVersion(1)))
    ));
}

// Goal: whatever a relay changes, no frame from the first changed byte on is ever handed out,
// and reading never panics. Method: 2000 rounds of 1-3 random bytes changed (XOR with a
// non-zero value) in the sealed Sync, Data, Sync bytes; read all; the frames read must all
// end before the first changed byte.
#[test]
fn random_changes_never_pass() {
    let mut rng = crate::prng::SplitMix64::new(0x5EA1);
    let (mut tx, _) = sealed_halves();
    let (wire, starts) = three_frames(&mut tx);
    for _ in 0..2000 {
        let mut changed = wire.clone();
        let mut first = usize::MAX;
        for _ in 0..1 + rng.index(3) {
            let at = rng.index(changed.len());
            changed[at] ^= rng.byte().max(1);
            first = first.min(at);
        }
        let (_, mut rx) = sealed_halves();
        let (frames, err) = read_all(&mut rx, &changed);
        assert!(err.is_some(), "a change at byte {first} went unnoticed");
        let whole_before = starts.iter().filter(|&&start| start <= first).count() - 1;
        assert!(
            frames.len() <= whole_before,
            "change at {first}: {frames:?}"
        );
    }
}

// Goal: a relay that puts its own ephemeral public key into a Hello (to learn the X25519
// secret) fails the handshake: the proofs cover both public keys. Method: a relay that
// changes the source's Hello's public key (crc32c fixed up) and passes the rest through.
#[test]
fn substituted_public_key_fails_the_handshake() {
    let key = ClusterKey::from_bytes([5; 32]);
    let target_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target_addr = target_listener.local_addr().unwrap();
    let target_key = key.clone();
    let target = std::thread::spawn(move || {
        let (stream, _) = target_listener.accept().unwrap();
        authenticate(stream, &target_key, Role::Destination).map(drop)
    });
    let relay_listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay_listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut source, _) = relay_listener.accept().unwrap();
        let mut upstream = TcpStream::connect(target_addr).unwrap();
        let mut hello = vec![0u8; HEADER_BYTES + 66];
        source.read_exact(&mut hello).unwrap();
        hello[HEADER_BYTES + 34] ^= 0x55; // the public key
        let meta_crc = crc32c::crc32c(&hello[HEADER_BYTES..]);
        hello[16..20].copy_from_slice(&meta_crc.to_be_bytes());
        let header_crc = crc32c::crc32c(&hello[..20]);
        hello[20..24].copy_from_slice(&header_crc.to_be_bytes());
        upstream.write_all(&hello).unwrap();
        let (mut back_from, mut back_to) =
            (upstream.try_clone().unwrap(), source.try_clone().unwrap());
        std::thread::spawn(move || std::io::copy(&mut back_from, &mut back_to));
        let _ = std::io::copy(&mut source, &mut upstream);
    });
    let source = authenticate(TcpStream::connect(relay_addr).unwrap(), &key, Role::Source);
    assert!(
        matches!(source, Err(TransferError::Auth { .. })),
        "{source:?}"
    );
    assert!(
        matches!(target.join().unwrap(), Err(TransferError::Auth { .. })),
        "the destination refuses the source's proof"
    );
}
