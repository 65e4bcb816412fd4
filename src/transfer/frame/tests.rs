//! Unit tests of the frame codec: round trips, bounds, corruption, and a fuzz loop.
use super::decode::be_u32;
use super::*;
use crate::prng::SplitMix64;

fn every_kind() -> Vec<Frame> {
    vec![
        Frame::Hello {
            nonce: [7; 32],
            role: Role::Source,
            insecure: false,
            public: [8; 32],
        },
        Frame::Hello {
            nonce: [9; 32],
            role: Role::Destination,
            insecure: true,
            public: [10; 32],
        },
        Frame::Proof { mac: [0xAB; 32] },
        Frame::Open(TargetSpec {
            export: "vm-disk-é".into(),
            size_bytes: (1 << 40) + 123,
            granularity_bytes: 65536,
            job_id: 42,
            batch: Some("evacuate-a".into()),
            holder: None,
            seed: None,
            manager_epoch: None,
        }),
        Frame::Open(TargetSpec {
            export: "vm1".into(),
            size_bytes: 1 << 30,
            granularity_bytes: 4096,
            job_id: 43,
            batch: None,
            holder: Some(Holder {
                addr: "10.0.0.1:7451".into(),
                job_id: 7,
                moves: 2,
            }),
            seed: None,
            manager_epoch: None,
        }),
        Frame::Repoint(Repoint {
            job_id: 7,
            export: "vm1".into(),
            size_bytes: 1 << 30,
            nbd_tcp: "10.0.0.3:10809".into(),
            moves: 3,
        }),
        Frame::RepointOk {
            job_id: 7,
            outcome: RepointOutcome::Repointed,
        },
        Frame::RepointOk {
            job_id: 7,
            outcome: RepointOutcome::Superseded,
        },
        Frame::RepointOk {
            job_id: 7,
            outcome: RepointOutcome::NotForwarding,
        },
        Frame::OpenOk {
            nbd_tcp: None,
            changed_outside: false,
        },
        Frame::OpenOk {
            nbd_tcp: Some("10.0.0.2:10809".into()),
            changed_outside: true,
        },
        Frame::Open(TargetSpec {
            export: "seeded".into(),
            size_bytes: 1 << 30,
            granularity_bytes: 4096,
            job_id: 44,
            batch: None,
            holder: None,
            seed: Some([0x5e; 16]),
            manager_epoch: None,
        }),
        Frame::Mark {
            seq: 9,
            at_unix_ms: 1_700_000_000_000,
        },
        Frame::MarkOk { seq: 9 },
        Frame::Data {
            offset_bytes: 1 << 30,
            len_bytes: 5,
            digest: *blake3::hash(b"hello").as_bytes(),
        },
        Frame::Zero {
            offset_bytes: 4096,
            len_bytes: 1 << 33,
        },
        Frame::Trim {
            offset_bytes: 0,
            len_bytes: 512,
        },
        Frame::Sync { seq: 3 },
        Frame::Verify { seq: 5 },
        Frame::Fence { seq: 6 },
        Frame::FenceOk { seq: 6 },
        Frame::VerifyOk {
            seq: 5,
            digest: [7; 32],
        },
        Frame::SyncOk {
            seq: 3,
            received_blocks: 99,
        },
        Frame::Commit {
            seq: 4,
            manager_epoch: None,
        },
        Frame::Commit {
            seq: 4,
            manager_epoch: Some(u64::MAX),
        },
        Frame::CommitOk { seq: 4 },
        Frame::Open(TargetSpec {
            export: "managed".into(),
            size_bytes: 1 << 30,
            granularity_bytes: 4096,
            job_id: 45,
            batch: Some("b".into()),
            holder: None,
            seed: None,
            manager_epoch: Some(7),
        }),
        Frame::Open(TargetSpec {
            export: "managed-seeded".into(),
            size_bytes: 1 << 30,
            granularity_bytes: 4096,
            job_id: 46,
            batch: None,
            holder: Some(Holder {
                addr: "10.0.0.1:7451".into(),
                job_id: 7,
                moves: 1,
            }),
            seed: Some([0x5e; 16]),
            manager_epoch: Some(8),
        }),
        Frame::Digests {
            seq: 8,
            offset_bytes: 1 << 20,
            block_bytes: 65536,
            count: MAX_DIGESTS,
        },
        Frame::DigestsOk {
            seq: 8,
            digests: vec![[3; 32]; MAX_DIGESTS as usize],
        },
        Frame::Query {
            job_id: 9,
            finalize: true,
        },
        Frame::QueryOk {
            job_id: 9,
            state: TargetState::Receiving,
            received_blocks: 77,
            nbd_tcp: Some("127.0.0.1:10809".into()),
        },
        Frame::Abort,
        Frame::Error {
            code: ErrorCode::Digest,
            offset_bytes: 8192,
            message: "digest mismatch at 8192".into(),
        },
    ]
}

fn encoded(frame: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    encode(frame, &mut out);
    if let Frame::Data { len_bytes, .. } = frame {
        out.extend(std::iter::repeat_n(0x5A, *len_bytes as usize));
    }
    out
}

// Goal: every kind survives encode → decode unchanged, and decode uses exactly its bytes.
// Method: round-trip each frame, with trailing garbage after it.
#[test]
fn round_trip_every_kind() {
    for frame in every_kind() {
        let mut bytes = encoded(&frame);
        let len = bytes.len();
        bytes.extend_from_slice(b"next frame");
        let (decoded, used) = decode(&bytes).expect("decodes");
        assert_eq!(decoded, frame);
        assert_eq!(used, len, "{frame:?}");
    }
}

// Goal: a Commit from a source that predates manager epochs (its meta is the seq alone)
// still decodes, as a job without an epoch; a bad epoch flag is refused, not guessed.
#[test]
fn a_commit_without_an_epoch_is_an_older_sources() {
    let mut out = Vec::new();
    encode(&Frame::Sync { seq: 4 }, &mut out);
    out[5] = kind::COMMIT;
    reseal(&mut out, 0);
    let (decoded, _) = decode(&out).expect("decodes");
    assert_eq!(
        decoded,
        Frame::Commit {
            seq: 4,
            manager_epoch: None
        }
    );
    let mut flagged = encoded(&Frame::Commit {
        seq: 4,
        manager_epoch: Some(9),
    });
    flagged[HEADER_BYTES + 8] = 2;
    reseal(&mut flagged, 0);
    assert!(decode(&flagged).is_err());
}

// Goal: bounds are enforced. Method: oversize export name, payload length, zero lengths,
// bad granularity, overflowing ranges; each must be an error.
#[test]
fn bounds_are_enforced() {
    let mut bytes = encoded(&Frame::Open(TargetSpec {
        export: "x".repeat(MAX_EXPORT_BYTES),
        size_bytes: 1,
        granularity_bytes: 4096,
        job_id: 1,
        batch: None,
        holder: None,
        seed: None,
        manager_epoch: None,
    }));
    assert!(decode(&bytes).is_ok());
    // Rewrite the name length to 65 and fix both checksums: still refused (TooLong).
    let name_len_at = HEADER_BYTES + 24;
    bytes[name_len_at..name_len_at + 2].copy_from_slice(&65u16.to_be_bytes());
    bytes.push(b'y');
    reseal(&mut bytes, 1);
    assert_eq!(decode(&bytes), Err(FrameError::TooLong("string")));

    let mut zero = encoded(&Frame::Zero {
        offset_bytes: u64::MAX - 10,
        len_bytes: 5,
    });
    assert!(decode(&zero).is_ok());
    zero[HEADER_BYTES + 8..HEADER_BYTES + 16].copy_from_slice(&11u64.to_be_bytes());
    reseal(&mut zero, 0);
    assert_eq!(decode(&zero), Err(FrameError::BadField("range overflows")));
    zero[HEADER_BYTES + 8..HEADER_BYTES + 16].copy_from_slice(&0u64.to_be_bytes());
    reseal(&mut zero, 0);
    assert_eq!(decode(&zero), Err(FrameError::BadField("zero length")));

    let mut data = encoded(&Frame::Data {
        offset_bytes: 0,
        len_bytes: 1,
        digest: [0; 32],
    });
    data[12..16].copy_from_slice(&(MAX_DATA_BYTES as u32 + 1).to_be_bytes());
    reseal(&mut data, 0);
    assert_eq!(decode(&data), Err(FrameError::TooLong("payload")));

    let huge = encoded(&Frame::Open(TargetSpec {
        export: "huge".into(),
        size_bytes: u64::MAX,
        granularity_bytes: 4096,
        job_id: 1,
        batch: None,
        holder: None,
        seed: None,
        manager_epoch: None,
    }));
    let refused = Err(FrameError::BadField("too many blocks for the granularity"));
    assert_eq!(decode(&huge), refused);

    for granularity_bytes in [1 << 62, MAX_GRANULARITY_BYTES * 2, 2048] {
        let absurd = encoded(&Frame::Open(TargetSpec {
            export: "absurd".into(),
            size_bytes: 1 << 20,
            granularity_bytes,
            job_id: 1,
            batch: None,
            holder: None,
            seed: None,
            manager_epoch: None,
        }));
        assert_eq!(decode(&absurd), Err(FrameError::BadField("granularity")));
    }
}

/// Recomputes the meta and header checksums after a test edited the meta, whose length
/// grew by `meta_growth` bytes.
fn reseal(bytes: &mut [u8], meta_growth: u32) {
    let meta_len = be_u32(&bytes[8..12]) + meta_growth;
    bytes[8..12].copy_from_slice(&meta_len.to_be_bytes());
    let meta = &bytes[HEADER_BYTES..HEADER_BYTES + meta_len as usize];
    let meta_crc = crc32c::crc32c(meta);
    bytes[16..20].copy_from_slice(&meta_crc.to_be_bytes());
    let header_crc = crc32c::crc32c(&bytes[..20]);
    bytes[20..24].copy_from_slice(&header_crc.to_be_bytes());
}

// Goal: a corrupt frame is an error, never a different frame, and nothing panics.
// Method: 200k inputs: PRNG noise (with and without a valid magic), truncations of every
// valid frame at every length, and every single-bit flip of every valid frame's header
// and meta.
#[test]
fn fuzz_decode_never_misreads() {
    let mut rng = SplitMix64::new(0x00f0_0dca_fe00_0042);
    for _ in 0..200_000 {
        let len = rng.below(96) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        if len >= 4 && rng.below(2) == 0 {
            bytes[..4].copy_from_slice(&MAGIC.to_be_bytes());
        }
        // Random bytes pass both crc32c checks with negligible probability; if they do,
        // the result must still be a well-formed frame (decode is total, never panics).
        let _ = decode(&bytes);
    }
    for frame in every_kind() {
        let bytes = encoded(&frame);
        for cut in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..cut]),
                Err(FrameError::Truncated),
                "{frame:?}"
            );
        }
        let checked = bytes.len() - payload_len(&frame);
        for bit in 0..checked * 8 {
            let mut flipped = bytes.clone();
            flipped[bit / 8] ^= 1 << (bit % 8);
            assert!(decode(&flipped).is_err(), "{frame:?} bit {bit} misread");
        }
    }
}

fn payload_len(frame: &Frame) -> usize {
    match frame {
        Frame::Data { len_bytes, .. } => *len_bytes as usize,
        _ => 0,
    }
}

// Goal: a header is rejected for the right reason. Method: wrong magic, version, kind.
#[test]
fn header_errors_are_specific() {
    let good = encoded(&Frame::Abort);
    let mut magic = good.clone();
    magic[0] = b'X';
    reseal(&mut magic, 0);
    assert_eq!(decode(&magic), Err(FrameError::BadMagic));
    let mut version = good.clone();
    version[4] = 9;
    reseal(&mut version, 0);
    assert_eq!(decode(&version), Err(FrameError::BadVersion(9)));
    let mut unknown = good;
    unknown[5] = 200;
    reseal(&mut unknown, 0);
    assert_eq!(decode(&unknown), Err(FrameError::UnknownKind(200)));
}
