//! Unit tests of the log file format: round trips, torn tails, hostile records.

use super::*;

/// 4 KiB blocks over 64 MiB: 16 extents of 1024 blocks.
const GEOMETRY: Geometry = Geometry {
    granularity_bytes: 4096,
    disk_bytes: 64 << 20,
    extent_blocks: 1024,
};

fn set_of(blocks: &[u64]) -> DirtySet {
    let mut set = DirtySet::empty(GEOMETRY.granularity_bytes, GEOMETRY.disk_bytes);
    for &block in blocks {
        set.insert(block);
    }
    set
}

fn blocks(set: &DirtySet) -> Vec<u64> {
    set.iter_blocks().collect()
}

/// A log holding {3, 5000} with extent 1 open, then: close 1 holding block 1030 only, open
/// 7, merge {9000}.
fn sample(dir: &Path) -> (PathBuf, u64) {
    let path = log_path(dir, "t");
    let mut log = LogFile::create(&path, &GEOMETRY, &set_of(&[3, 5000]), &[1]).expect("create");
    let base = log.len_bytes();
    let mut records = Vec::new();
    encode_close(&mut records, 1, &[(1030 / 64, 1 << (1030 % 64))]);
    encode_open(&mut records, &[7]);
    encode_merge(&mut records, &set_of(&[9000]));
    log.append(&records).expect("append");
    (path, base)
}

#[test]
fn replay_applies_records_in_order_and_opens_whole_extents() {
    // Goal: merge ORs, close replaces an extent's bits, open extents come back whole, and
    // the bound is their bytes. Method: the sample log, replayed.
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _) = sample(dir.path());
    let replayed = replay(&path, &GEOMETRY).expect("replay");
    let mut expected = vec![3, 1030, 5000, 9000];
    expected.extend(7 * 1024..8 * 1024);
    expected.sort_unstable();
    assert_eq!(blocks(&replayed.set), expected);
    assert_eq!(replayed.open_extents, 1);
    assert_eq!(replayed.bound_bytes, 4 << 20);
    assert_eq!(replayed.torn_bytes, 0);
}

#[test]
fn a_torn_tail_is_ignored_at_every_cut() {
    // Goal: a crash in the middle of the last append loses only that append. Method: cut
    // the file at every byte of the appended records; the replay is the base's or a prefix's.
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, base) = sample(dir.path());
    let full = std::fs::read(&path).expect("read");
    for cut in base as usize..full.len() {
        std::fs::write(&path, &full[..cut]).expect("write");
        let replayed = replay(&path, &GEOMETRY).expect("torn tail replays");
        let got = blocks(&replayed.set);
        for block in [3, 5000] {
            assert!(got.contains(&block), "cut {cut}: base block {block} lost");
        }
        // Before the close record is whole extent 1 is open (all dirty), after it 1030 is.
        assert!(got.contains(&1030), "cut {cut}");
    }
}

/// Appends hostile records to a log's bytes.
type Append = dyn Fn(&mut Vec<u8>);

#[test]
fn hostile_headers_and_records_are_refused() {
    // Goal: another tracker's log, or records outside the geometry, never load. Method:
    // replay with another geometry; append records with bad extents, words, runs, kinds.
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _) = sample(dir.path());
    let other = Geometry {
        disk_bytes: 128 << 20,
        ..GEOMETRY
    };
    let err = replay(&path, &other).expect_err("other geometry");
    assert!(err.to_string().contains("geometry"), "{err}");
    let cases: Vec<(Box<Append>, &str)> = vec![
        (Box::new(|out| encode_open(out, &[16])), "past the disk"),
        (
            Box::new(|out| encode_close(out, 2, &[(0, 1)])),
            "outside extent",
        ),
        (
            Box::new(|out| {
                let mut payload = 16383u64.to_le_bytes().to_vec();
                payload.extend_from_slice(&2u64.to_le_bytes());
                push_record(out, KIND_MERGE, &payload);
            }),
            "past the disk",
        ),
        (
            Box::new(|out| push_record(out, 9, &[])),
            "unknown record kind",
        ),
        (
            Box::new(|out| push_record(out, KIND_OPEN, &[1, 2, 3])),
            "truncated",
        ),
    ];
    for (record, problem) in cases {
        let (path, _) = sample(dir.path());
        let mut bytes = Vec::new();
        record(&mut bytes);
        let mut file = OpenOptions::new().append(true).open(&path).expect("open");
        file.write_all(&bytes).expect("append");
        let err = replay(&path, &GEOMETRY).expect_err(problem);
        assert!(err.to_string().contains(problem), "{problem}: {err}");
    }
}

#[test]
fn an_oversized_length_reads_as_a_torn_tail_without_allocating() {
    // Goal: a length field of 4 GiB allocates nothing. Method: append such a header.
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, _) = sample(dir.path());
    let mut file = OpenOptions::new().append(true).open(&path).expect("open");
    file.write_all(&[0xff, 0xff, 0xff, 0xff, KIND_MERGE])
        .expect("append");
    let replayed = replay(&path, &GEOMETRY).expect("replay");
    assert_eq!(replayed.torn_bytes, 5);
}

#[test]
fn a_large_merge_splits_into_bounded_records() {
    // Goal: no record exceeds the limit. Method: a merge of 100k separate runs.
    let mut set = DirtySet::empty(4096, 1 << 40);
    for block in (0..200_000u64).step_by(2) {
        set.insert(block);
    }
    let mut out = Vec::new();
    encode_merge(&mut out, &set);
    let mut reader = &out[..];
    let mut records = 0;
    while let Some((kind, payload)) = read_record(&mut reader).expect("read") {
        assert_eq!(kind, KIND_MERGE);
        assert!(payload.len() <= MAX_RECORD_BYTES);
        records += 1;
    }
    assert_eq!(records, 2);
}
