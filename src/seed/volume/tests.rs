use super::*;
use crate::seed::chunk::{self, ChunkPlace};
use crate::seed::header::KeySource;
use crate::seed::manifest::{check_coverage, DiskManifest, ExtentBuilder, ExtentKind, BLOCK_BYTES};
use crate::transfer::ClusterKey;

/// A fresh directory under /var/tmp (O_DIRECT does not work on tmpfs).
fn var_tmp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-seed-test-")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp")
}

fn keys() -> SeedKeys {
    SeedKeys::from_cluster(&ClusterKey::from_bytes([2; 32]), [0xab; 16])
}

#[test]
fn file_names_round_trip_and_nothing_else_parses() {
    // Goal: the name made for a volume parses back; near misses do not. Method: a made name,
    // then names with a case, length, number or suffix changed.
    let seed_id = [0xab; 16];
    let name = file_name(&seed_id, 12);
    assert_eq!(name, format!("ferry-seed-{}.vol12", "ab".repeat(16)));
    assert_eq!(parse_file_name(&name), Some((seed_id, 12)));
    let hex = "ab".repeat(16);
    for bad in [
        format!("ferry-seed-{}.vol12", hex.to_uppercase()),
        format!("ferry-seed-{}.vol012", hex),
        format!("ferry-seed-{}.vol", hex),
        format!("ferry-seed-{}.vol1x", hex),
        format!("ferry-seed-{}.vol4294967296", hex),
        format!("ferry-seed-{}a.vol1", hex),
        format!("ferry-seed-{}.vol+1", hex),
        format!("xferry-seed-{}.vol1", hex),
    ] {
        assert_eq!(parse_file_name(&bad), None, "{bad}");
    }
    assert_eq!(
        parse_file_name(&format!("ferry-seed-{hex}.vol0")),
        Some((seed_id, 0))
    );
}

#[test]
fn listing_ignores_links_and_other_names() {
    // Goal: list_in_dir finds volume files only, sorted, and never a link to one. Method:
    // create two volumes, a link with a volume's name, a directory and another file.
    let dir = var_tmp_dir();
    let seed_id = [0xab; 16];
    drop(create_in_dir(dir.path(), &seed_id, 1).expect("create 1"));
    drop(create_in_dir(dir.path(), &seed_id, 0).expect("create 0"));
    let err = create_in_dir(dir.path(), &seed_id, 0).expect_err("exists");
    assert!(matches!(err, FormatError::Io { .. }), "{err}");
    std::os::unix::fs::symlink(
        dir.path().join(file_name(&seed_id, 0)),
        dir.path().join(file_name(&seed_id, 2)),
    )
    .expect("link");
    fs::create_dir(dir.path().join(file_name(&seed_id, 3))).expect("dir");
    fs::write(dir.path().join("notes.txt"), b"x").expect("file");
    let listed = list_in_dir(dir.path()).expect("list");
    let volumes: Vec<u32> = listed.iter().map(|v| v.volume).collect();
    assert_eq!(volumes, vec![0, 1]);
    assert!(
        open_in_dir(dir.path(), &seed_id, 2, false).is_err(),
        "link followed"
    );
    assert_eq!(
        Media::classify(dir.path()).expect("dir"),
        Media::Dir(dir.path().to_owned())
    );
    let file = dir.path().join("notes.txt");
    assert_eq!(
        Media::classify(&file).expect("file"),
        Media::Raw(file.clone())
    );
    let link = dir.path().join(file_name(&seed_id, 2));
    assert!(matches!(
        Media::classify(&link),
        Err(FormatError::NotAVolume { .. })
    ));
    assert!(open_raw(&link, false).is_err());
    open_raw(&file, true).expect("a regular file is a raw medium");
}

#[test]
fn a_volume_round_trips_header_chunks_and_manifest() {
    // Goal: what an export writes, an import reads back and verifies: header (writing, then
    // sealed), chunks, manifest. Method: create a volume in /var/tmp, write three chunks and
    // a zero range, seal, reopen read-only, read the header and manifest, open every chunk.
    let dir = var_tmp_dir();
    let keys = keys();
    let file = create_in_dir(dir.path(), keys.seed_id(), 0).expect("create");
    let header = Header::writing(&keys, 0, KeySource::Cluster);
    write_header(&file, &header, &keys).expect("header");
    assert_eq!(read_header(&file, &keys).expect("writing header"), header);
    let payloads: Vec<Vec<u8>> = (0..3u8)
        .map(|i| vec![i + 1; 8192 + usize::from(i) * 4096])
        .collect();
    let mut builder = ExtentBuilder::new(0);
    let mut volume_offset = HEADER_BYTES as u64;
    for (sequence, data) in payloads.iter().enumerate() {
        let offset = builder.end_bytes();
        let place = ChunkPlace {
            disk: 0,
            offset_bytes: offset,
            volume: 0,
            sequence: sequence as u64,
        };
        let sealed = chunk::seal(&keys, &place, data);
        write_chunk(&file, volume_offset, &sealed).expect("chunk");
        builder.push_data(
            offset,
            data.len() as u32,
            volume_offset,
            sequence as u64,
            keys.digest(data),
        );
        volume_offset += sealed.bytes.len() as u64;
        builder.push_zero(builder.end_bytes(), 1 << 20);
    }
    let size_bytes = builder.end_bytes();
    let manifest = Manifest {
        seed_id: *keys.seed_id(),
        source_agent: "agent-a".into(),
        volume: 0,
        volume_count: 1,
        disks: vec![DiskManifest {
            index: 0,
            export: "vm1".into(),
            size_bytes,
            block_bytes: BLOCK_BYTES,
            job_id: 1,
            tracker: "seed-vm1".into(),
            tracker_generation: 99,
            start_unix_ms: 1,
            end_unix_ms: 2,
            first_offset_bytes: 0,
            end_offset_bytes: size_bytes,
            extents: builder.into_extents(),
        }],
    };
    assert!(matches!(
        read_manifest(&file, &header, &keys),
        Err(FormatError::NotSealed)
    ));
    let sealed =
        write_manifest_and_seal(&file, &header, &keys, &manifest, volume_offset).expect("seal");
    drop(file);
    let file = open_in_dir(dir.path(), keys.seed_id(), 0, false).expect("reopen");
    let read = read_header(&file, &keys).expect("sealed header");
    assert_eq!(read, sealed);
    assert_eq!(read_header_clear(&file).expect("clear"), sealed);
    let opened = read_manifest(&file, &read, &keys).expect("manifest");
    assert_eq!(opened, manifest);
    let data_extents = opened.disks[0].extents.iter().filter_map(|e| match e.kind {
        ExtentKind::Data {
            volume_offset_bytes,
            sequence,
            digest,
        } => Some((e, volume_offset_bytes, sequence, digest)),
        ExtentKind::Zero => None,
    });
    for ((extent, at, sequence, digest), want) in data_extents.zip(&payloads) {
        let place = ChunkPlace {
            disk: 0,
            offset_bytes: extent.offset_bytes,
            volume: 0,
            sequence,
        };
        let buf = read_chunk(&file, at, extent.len_bytes).expect("read chunk");
        let data =
            chunk::open(&keys, &place, extent.len_bytes as usize, buf.as_slice()).expect("opens");
        assert_eq!(&data, want);
        assert_eq!(keys.digest(&data), digest);
    }
    check_coverage(&[opened]).expect("one volume covers the disk");
}

#[test]
fn a_damaged_manifest_or_header_on_the_volume_is_refused() {
    // Goal: a changed byte on the medium (manifest, its padding, header) or a header that
    // claims a manifest past the end is refused before anything is trusted. Method: seal a
    // small volume, then alter the file with ordinary writes and read again.
    let dir = var_tmp_dir();
    let keys = keys();
    let file = create_in_dir(dir.path(), keys.seed_id(), 0).expect("create");
    let header = Header::writing(&keys, 0, KeySource::Cluster);
    write_header(&file, &header, &keys).expect("header");
    let manifest = Manifest {
        seed_id: *keys.seed_id(),
        source_agent: String::new(),
        volume: 0,
        volume_count: 0,
        disks: Vec::new(),
    };
    let sealed = write_manifest_and_seal(&file, &header, &keys, &manifest, 4096).expect("seal");
    let path = file.path().to_owned();
    let flip = |at: u64| {
        let mut byte = [0u8; 1];
        file.read_at(at, &mut byte).expect("read");
        file.write_at(at, &[byte[0] ^ 1]).expect("write");
    };
    flip(4096 + 3);
    assert!(matches!(
        read_manifest(&file, &sealed, &keys),
        Err(FormatError::ManifestDamaged)
    ));
    flip(4096 + 3);
    flip(4096 + sealed.manifest_len_bytes + 1);
    assert!(matches!(
        read_manifest(&file, &sealed, &keys),
        Err(FormatError::ManifestDamaged)
    ));
    flip(4096 + sealed.manifest_len_bytes + 1);
    assert_eq!(
        read_manifest(&file, &sealed, &keys).expect("restored"),
        manifest
    );
    let past = Header {
        manifest_len_bytes: 1 << 20,
        ..sealed
    };
    assert!(matches!(
        read_manifest(&file, &past, &keys),
        Err(FormatError::ManifestTooLong { .. })
    ));
    flip(100);
    assert!(matches!(
        read_header(&file, &keys),
        Err(FormatError::HeaderForged)
    ));
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(100)
        .expect("truncate");
    assert!(matches!(
        read_header(&file, &keys),
        Err(FormatError::Truncated { .. })
    ));
}

#[test]
fn mountinfo_and_swaps_are_parsed() {
    // Goal: the device numbers of mounts and the paths of swaps are found. Method: sample
    // lines in the kernel's formats.
    let mountinfo =
        "36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                     40 1 8:17 / /media/usb rw - vfat relative-source rw\n";
    let devs = busy::mounted_devices(mountinfo);
    assert!(devs.contains(&(98, 0)));
    assert!(devs.contains(&(8, 17)));
    let swaps =
        "Filename\tType\tSize\tUsed\tPriority\n/dev/sda2 partition 1 0 -2\n/swapfile file 1 0 -3\n";
    assert_eq!(
        busy::swap_paths(swaps).collect::<Vec<_>>(),
        vec!["/dev/sda2", "/swapfile"]
    );
}
