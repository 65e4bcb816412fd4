use super::*;
use crate::transfer::ClusterKey;

const MANIFEST_AT: u64 = 64 << 20;

fn keys() -> SeedKeys {
    SeedKeys::from_cluster(&ClusterKey::from_bytes([5; 32]), [1; 16])
}

fn data(offset_bytes: u64, len_bytes: u32, volume_offset_bytes: u64, sequence: u64) -> Extent {
    Extent {
        offset_bytes,
        len_bytes,
        kind: ExtentKind::Data {
            volume_offset_bytes,
            sequence,
            digest: [sequence as u8; 32],
        },
    }
}

fn zero(offset_bytes: u64, len_bytes: u32) -> Extent {
    Extent {
        offset_bytes,
        len_bytes,
        kind: ExtentKind::Zero,
    }
}

fn disk(index: u32, size_bytes: u64, first: u64, end: u64, extents: Vec<Extent>) -> DiskManifest {
    DiskManifest {
        index,
        export: format!("vm{index}"),
        size_bytes,
        block_bytes: BLOCK_BYTES,
        job_id: 42,
        tracker: format!("seed-{index}"),
        tracker_generation: 0xfeed,
        start_unix_ms: 1_000,
        end_unix_ms: 2_000,
        first_offset_bytes: first,
        end_offset_bytes: end,
        extents,
    }
}

/// Two disks: one of 3 MiB + 1000 bytes (unaligned end), one wholly zero.
fn sample() -> Manifest {
    let mib = 1u64 << 20;
    let one = disk(
        0,
        3 * mib + 1000,
        0,
        3 * mib + 1000,
        vec![
            data(0, 1 << 20, 4096, 0),
            zero(mib, 1 << 20),
            data(2 * mib, 1 << 20, 4096 + (mib + 4096), 1),
            data(3 * mib, 1000, 4096 + 2 * (mib + 4096), 2),
        ],
    );
    let two = disk(7, 8 * mib, 0, 8 * mib, vec![zero(0, 8 << 20)]);
    Manifest {
        seed_id: [1; 16],
        source_agent: "agent-a".into(),
        volume: 0,
        volume_count: 1,
        disks: vec![one, two],
    }
}

fn invalid(manifest: &Manifest) -> String {
    match decode(&encode(manifest), MANIFEST_AT) {
        Err(FormatError::ManifestInvalid(what)) => what,
        other => panic!("expected ManifestInvalid, got {other:?}"),
    }
}

#[test]
fn manifest_round_trips_plain_and_sealed() {
    // Goal: decode reads what encode wrote, open what seal wrote; a data extent is compact.
    // Method: a two-disk sample both ways; compare sizes of one-extent manifests.
    let manifest = sample();
    assert_eq!(
        decode(&encode(&manifest), MANIFEST_AT).expect("decodes"),
        manifest
    );
    let sealed = seal(&keys(), &manifest);
    assert_eq!(
        open(&keys(), 0, &sealed, MANIFEST_AT).expect("opens"),
        manifest
    );
    assert!(padded_len(sealed.len() as u64).is_multiple_of(4096));
    let mut one = sample();
    one.disks[1].extents.clear();
    one.disks[1].end_offset_bytes = 0;
    let without = encode(&one).len();
    one.disks.truncate(1);
    let with_four = encode(&one).len();
    one.disks[0].extents.truncate(1);
    one.disks[0].end_offset_bytes = 1 << 20;
    assert_eq!(with_four - encode(&one).len(), 13 + 2 * 61);
    assert!(without > with_four);
}

#[test]
fn every_flipped_byte_of_a_sealed_manifest_is_damage() {
    // Goal: any single changed byte is caught by the MAC, before decryption. Method: flip
    // each byte of the sealed manifest.
    let sealed = seal(&keys(), &sample());
    for at in 0..sealed.len() {
        let mut flipped = sealed.clone();
        flipped[at] ^= 0x01;
        let err = open(&keys(), 0, &flipped, MANIFEST_AT).expect_err("flipped");
        assert!(
            matches!(err, FormatError::ManifestDamaged),
            "byte {at}: {err}"
        );
    }
    let other = SeedKeys::from_cluster(&ClusterKey::from_bytes([6; 32]), [1; 16]);
    assert!(matches!(
        open(&other, 0, &sealed, MANIFEST_AT),
        Err(FormatError::ManifestDamaged)
    ));
    assert!(matches!(
        open(&keys(), 1, &sealed, MANIFEST_AT),
        Err(FormatError::ManifestForged)
    ));
}

#[test]
fn truncated_manifests_are_refused_at_every_length() {
    // Goal: no prefix of a manifest decodes or opens. Method: every shorter length.
    let plain = encode(&sample());
    for len in 0..plain.len() {
        assert!(decode(&plain[..len], MANIFEST_AT).is_err(), "plain {len}");
    }
    let sealed = seal(&keys(), &sample());
    for len in 0..sealed.len() {
        assert!(
            open(&keys(), 0, &sealed[..len], MANIFEST_AT).is_err(),
            "sealed {len}"
        );
    }
    let mut longer = plain.clone();
    longer.push(0);
    assert!(decode(&longer, MANIFEST_AT).is_err());
}

#[test]
fn every_flipped_plain_byte_is_refused_or_decodes_to_a_valid_manifest() {
    // Goal: decode never panics, and what it accepts after a change is itself consistent
    // (it re-encodes to the same bytes). Method: flip each byte of the plain encoding.
    let plain = encode(&sample());
    for at in 0..plain.len() {
        for bit in [0x01, 0x80] {
            let mut flipped = plain.clone();
            flipped[at] ^= bit;
            if let Ok(manifest) = decode(&flipped, MANIFEST_AT) {
                assert_eq!(encode(&manifest), flipped, "byte {at}");
            }
        }
    }
}

#[test]
fn inconsistent_extents_are_refused() {
    // Goal: extents out of order, overlapping, with gaps, past the part, too long, badly
    // aligned, or with chunks outside the data region or out of sequence are refused.
    // Method: alter one thing of the sample at a time.
    const MIB: u64 = 1 << 20;
    type Alter = Box<dyn Fn(&mut Manifest)>;
    let cases: Vec<(&str, Alter)> = vec![
        (
            "gap",
            Box::new(|m| m.disks[0].extents[1].offset_bytes += 4096),
        ),
        ("swap", Box::new(|m| m.disks[0].extents.swap(0, 1))),
        ("past", Box::new(|m| m.disks[0].end_offset_bytes = MIB)),
        (
            "short",
            Box::new(|m| {
                m.disks[0].extents.pop();
            }),
        ),
        (
            "unaligned",
            Box::new(|m| m.disks[0].extents[1].len_bytes -= 1),
        ),
        (
            "too long",
            Box::new(|m| m.disks[1].extents[0] = data(0, 8 << 20, 4096 * 1000, 9)),
        ),
        (
            "chunk in header",
            Box::new(|m| m.disks[0].extents[0] = data(0, 1 << 20, 0, 0)),
        ),
        (
            "chunk unaligned",
            Box::new(|m| m.disks[0].extents[0] = data(0, 1 << 20, 4097, 0)),
        ),
        (
            "chunk overlaps",
            Box::new(|m| m.disks[0].extents[2] = data(2 * MIB, 1 << 20, 8192, 1)),
        ),
        (
            "chunk past",
            Box::new(|m| m.disks[0].extents[2] = data(2 * MIB, 1 << 20, MANIFEST_AT - 4096, 1)),
        ),
        (
            "sequence",
            Box::new(|m| m.disks[0].extents[2] = data(2 * MIB, 1 << 20, 4096 + MIB + 4096, 0)),
        ),
        (
            "reserved",
            Box::new(|m| {
                m.disks[0].extents[3] = data(3 * MIB, 1000, 4096 + 2 * (MIB + 4096), u64::MAX - 1)
            }),
        ),
        (
            "empty",
            Box::new(|m| m.disks[1].extents = vec![zero(0, 0), zero(0, 8 << 20)]),
        ),
        ("twice", Box::new(|m| m.disks[1].index = 0)),
        ("name", Box::new(|m| m.disks[1].export = "../x".into())),
        ("block", Box::new(|m| m.disks[1].block_bytes = 512)),
        (
            "part unaligned",
            Box::new(|m| m.disks[1].first_offset_bytes = 1),
        ),
        ("volume count", Box::new(|m| m.volume = 1)),
    ];
    for (name, alter) in cases {
        let mut manifest = sample();
        alter(&mut manifest);
        let what = invalid(&manifest);
        assert!(!what.is_empty(), "{name}");
    }
    let mut later = sample();
    later.disks[0].extents[0] = data(0, 1 << 20, 4096, 0);
    decode(&encode(&later), MANIFEST_AT).expect("the sample is valid");
}

#[test]
fn huge_counts_are_refused_before_allocating() {
    // Goal: a count field claiming billions of records fails at once (no allocation of that
    // size, no long loop). Method: patch the disk count, then an extent count, to u32::MAX.
    let plain = encode(&sample());
    let disk_count_at = 4 + 16 + 1 + "agent-a".len() + 8;
    let mut huge = plain.clone();
    huge[disk_count_at..disk_count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&huge, MANIFEST_AT),
        Err(FormatError::ManifestInvalid(_))
    ));
    let extent_count_at = disk_count_at + 4 + 4 + 1 + 3 + 8 + 4 + 8 + 1 + 6 + 5 * 8;
    assert_eq!(
        plain[extent_count_at..extent_count_at + 4],
        4u32.to_le_bytes()
    );
    let mut huge = plain;
    huge[extent_count_at..extent_count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(&huge, MANIFEST_AT),
        Err(FormatError::ManifestInvalid(_))
    ));
    let too_long = vec![0u8; 1];
    let err = open(&keys(), 0, &too_long, MANIFEST_AT).expect_err("one byte");
    assert!(matches!(err, FormatError::Truncated { .. }), "{err}");
}

#[test]
fn builder_merges_zeros_and_yields_decodable_extents() {
    // Goal: adjacent zero ranges become one extent (split at the u32 bound), data extents
    // stay, the unaligned disk end is allowed last, and decode accepts the result. Method:
    // build a part from mixed ranges, check the extents, decode a manifest holding them.
    let mut builder = ExtentBuilder::new(0);
    builder.push_zero(0, 4096);
    builder.push_zero(4096, 8192);
    builder.push_data(12288, 4096, 4096, 0, [1; 32]);
    builder.push_zero(16384, u64::from(MAX_ZERO_EXTENT_BYTES) + 8192);
    let at = builder.end_bytes();
    builder.push_data(at, 100, 12288, 1, [2; 32]);
    let extents = builder.into_extents();
    let lens: Vec<u32> = extents.iter().map(|e| e.len_bytes).collect();
    assert_eq!(lens, vec![12288, 4096, MAX_ZERO_EXTENT_BYTES, 8192, 100]);
    let end = at + 100;
    let mut manifest = sample();
    manifest.disks = vec![disk(0, end, 0, end, extents)];
    decode(&encode(&manifest), MANIFEST_AT).expect("builder output decodes");
    let chunks: Vec<(u64, u32)> = data_chunks(4096, (2 << 20) + 4096).collect();
    assert_eq!(
        chunks,
        vec![
            (4096, 1 << 20),
            (4096 + (1 << 20), 1 << 20),
            (4096 + (2 << 20), 4096)
        ]
    );
}

#[test]
fn coverage_names_missing_volumes_and_gaps() {
    // Goal: a disk split over three volumes is covered only with all three; a missing one is
    // named; a gap or overlap is named by disk and offset. Method: split one disk's part in
    // three manifests and check subsets.
    let mib = 1u64 << 20;
    let part = |volume: u32, first: u64, end: u64, count: u32| Manifest {
        seed_id: [1; 16],
        source_agent: "a".into(),
        volume,
        volume_count: count,
        disks: vec![disk(
            0,
            3 * mib,
            first,
            end,
            vec![zero(first, (end - first) as u32)],
        )],
    };
    let all = vec![
        part(0, 0, mib, 0),
        part(1, mib, 2 * mib, 0),
        part(2, 2 * mib, 3 * mib, 3),
    ];
    check_coverage(&all).expect("covered");
    let err = check_coverage(&[all[0].clone(), all[2].clone()]).expect_err("1 missing");
    assert!(
        matches!(&err, FormatError::MissingVolumes { missing, count_known: true, .. } if missing == &[1]),
        "{err}"
    );
    assert!(err.to_string().contains('1'), "{err}");
    let err = check_coverage(&all[..2]).expect_err("last missing");
    assert!(
        matches!(&err, FormatError::MissingVolumes { missing, count_known: false, .. } if missing == &[2]),
        "{err}"
    );
    let gap = vec![part(0, 0, mib, 0), part(1, 2 * mib, 3 * mib, 2)];
    let err = check_coverage(&gap).expect_err("gap");
    assert!(
        matches!(err, FormatError::Coverage { offset_bytes, .. } if offset_bytes == mib),
        "{err}"
    );
    let overlap = vec![part(0, 0, 2 * mib, 0), part(1, mib, 3 * mib, 2)];
    assert!(matches!(
        check_coverage(&overlap),
        Err(FormatError::Coverage { .. })
    ));
    // A count from the medium of a billion volumes is counted, not listed.
    let mut huge = all[2].clone();
    huge.volume_count = 1 << 30;
    let err = check_coverage(&[huge]).expect_err("almost all missing");
    match &err {
        FormatError::MissingVolumes {
            missing,
            missing_count,
            ..
        } => {
            assert_eq!(missing.len(), MAX_LISTED_MISSING);
            assert_eq!(*missing_count, (1 << 30) - 1);
        }
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("1073741823 in all"), "{err}");
    let twice = vec![all[0].clone(), all[0].clone()];
    assert!(matches!(
        check_coverage(&twice),
        Err(FormatError::ManifestInvalid(_))
    ));
}
