//! The lease file's tests: torn and corrupt slots, bounded writes, links and foreign files refused.

use std::fs;
use std::os::unix::fs::{symlink, FileExt, PermissionsExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::*;
use crate::lease::ManagerId;

const PAIR: &str = "pair-1";

/// A fresh directory under /var/tmp (`O_DIRECT` does not work on tmpfs).
fn temp_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-lease-")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp")
}

fn lease(epoch: u64, holder: &str) -> Lease {
    Lease {
        epoch,
        holder: Some(ManagerId::new(holder).expect("id")),
        witness_generation: 1,
        lease_ms: 5_000,
    }
}

/// The file's two sectors, decoded, read around the store (buffered).
fn raw_slots(path: &Path) -> [Result<Record, RecordError>; 2] {
    let bytes = fs::read(path).expect("read file");
    assert_eq!(bytes.len() as u64, FILE_BYTES);
    let (slot0, slot1) = bytes.split_at(RECORD_BYTES);
    [Record::decode(slot0), Record::decode(slot1)]
}

/// Overwrites `bytes` at `offset_bytes` of the file, around the store.
fn scribble(path: &Path, offset_bytes: u64, bytes: &[u8]) {
    let file = fs::OpenOptions::new().write(true).open(path).expect("open");
    file.write_all_at(bytes, offset_bytes).expect("scribble");
    file.sync_all().expect("sync");
}

#[test]
fn create_write_read_and_reopen() {
    // Goal: a new file is made 0600 in a new 0700 directory, reads as never written, and
    // a confirmed write is what a read and a reopened file see. Method: open in a missing
    // directory, read, write, read, drop, reopen, read.
    let root = temp_dir();
    let dir = root.path().join("leases");
    let mut file = LeaseFile::open_or_create(&dir, PAIR).expect("create");
    assert_eq!(file.path(), dir.join("pair-1.lease"));
    assert_eq!(file.pair(), PAIR);
    let mode = |path: &Path| fs::metadata(path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), DIR_MODE);
    assert_eq!(mode(file.path()), FILE_MODE);
    assert_eq!(fs::metadata(file.path()).expect("stat").len(), FILE_BYTES);
    assert_eq!(file.read().expect("read"), None);
    let written = file.write(&lease(1, "manager-a")).expect("write");
    assert_eq!(written.sequence, 1);
    assert_eq!(written.pair, PAIR);
    assert_eq!(written.lease, lease(1, "manager-a"));
    assert_eq!(file.read().expect("read"), Some(written.clone()));
    drop(file);
    let file = LeaseFile::open_or_create(&dir, PAIR).expect("reopen");
    assert_eq!(file.read().expect("read"), Some(written));
}

#[test]
fn writes_alternate_slots_and_keep_the_previous_record() {
    // Goal: each write goes to the slot not holding the newest record, with the next
    // sequence, so the previous confirmed record survives every write. Method: five
    // writes; after each, decode both sectors of the file directly.
    let dir = temp_dir();
    let mut file = LeaseFile::open_or_create(dir.path(), PAIR).expect("create");
    let mut previous: Option<Record> = None;
    for sequence in 1..=5u64 {
        let written = file
            .write_within(&lease(sequence, "manager-a"), Duration::from_secs(10))
            .expect("write");
        assert_eq!(written.sequence, sequence);
        let slot = usize::from(sequence % 2 == 0);
        let slots = raw_slots(file.path());
        assert_eq!(slots[slot], Ok(written.clone()), "sequence {sequence}");
        match &previous {
            Some(previous) => assert_eq!(slots[1 - slot].as_ref(), Ok(previous)),
            None => assert_eq!(slots[1 - slot], Err(RecordError::Empty)),
        }
        previous = Some(written);
    }
}

#[test]
fn a_damaged_or_torn_newest_slot_falls_back_to_the_older_record() {
    // Goal: a flipped byte or a torn write in the newest slot never counts; the older
    // record is read, and the next write replaces the damaged slot. Method: three
    // writes (slot 0 holds sequence 3), then damage slot 0 in several ways.
    let dir = temp_dir();
    let mut file = LeaseFile::open_or_create(dir.path(), PAIR).expect("create");
    let mut records = Vec::new();
    for epoch in 1..=3 {
        records.push(file.write(&lease(epoch, "manager-a")).expect("write"));
    }
    let newest = records[2].encode();
    let older_same_slot = records[0].encode();
    for tear in (1..8).map(|sectors| sectors * 512) {
        let mut torn = older_same_slot;
        torn[..tear].copy_from_slice(&newest[..tear]);
        scribble(file.path(), 0, &torn);
        assert_eq!(
            file.read().expect("read"),
            Some(records[1].clone()),
            "tear {tear}"
        );
    }
    scribble(file.path(), 0, &newest);
    assert_eq!(file.read().expect("read"), Some(records[2].clone()));
    scribble(file.path(), 100, &[0xff]);
    assert_eq!(file.read().expect("read"), Some(records[1].clone()));
    let next = file
        .write(&lease(4, "manager-b"))
        .expect("write over damage");
    assert_eq!(next.sequence, 3, "one more than the newest valid record");
    assert_eq!(raw_slots(file.path())[0], Ok(next.clone()));
    assert_eq!(file.read().expect("read"), Some(next));
}

#[test]
fn no_valid_record_is_an_error_unless_never_written() {
    // Goal: both slots empty reads as None; both damaged, or a torn first write (one
    // damaged, one empty), is Unreadable for read and write, since a lost lease must not
    // read as "never written" (module docs). Method: damage the slots of a file.
    let dir = temp_dir();
    let mut file = LeaseFile::open_or_create(dir.path(), PAIR).expect("create");
    let first = file.write(&lease(1, "manager-a")).expect("write").encode();
    scribble(file.path(), 0, &first[..512]);
    scribble(file.path(), 512, &[0u8; RECORD_BYTES - 512]);
    let err = file.read().expect_err("torn first write");
    assert!(
        matches!(
            &err,
            StoreError::Unreadable {
                slot0: RecordError::BadChecksum,
                slot1: RecordError::Empty,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("pair-1.lease"), "{err}");
    let err = file
        .write(&lease(2, "manager-a"))
        .expect_err("write refused");
    assert!(matches!(err, StoreError::Unreadable { .. }), "{err:?}");
    assert!(!err.is_maybe_written());
    scribble(file.path(), RECORD_BYTES as u64, &first[..100]);
    let err = file.read().expect_err("both damaged");
    assert!(matches!(err, StoreError::Unreadable { .. }), "{err:?}");
    scribble(file.path(), 0, &[0u8; FILE_BYTES as usize]);
    assert_eq!(file.read().expect("zeroed"), None);
}

#[test]
fn records_the_store_cannot_use_refuse_the_file() {
    // Goal: a checksummed slot this build cannot use (a newer version), another pair's
    // record, or two records of one sequence refuse the file rather than being skipped
    // or overwritten. Method: craft each into a slot, read and write.
    let dir = temp_dir();
    let mut file = LeaseFile::open_or_create(dir.path(), PAIR).expect("create");
    let record = file.write(&lease(1, "manager-a")).expect("write");
    let mut newer = record.encode();
    newer[8] = 2;
    let checksum = blake3::hash(&newer[..RECORD_BYTES - 32]);
    newer[RECORD_BYTES - 32..].copy_from_slice(checksum.as_bytes());
    scribble(file.path(), RECORD_BYTES as u64, &newer);
    let err = file
        .write(&lease(2, "manager-a"))
        .expect_err("newer version");
    assert!(
        matches!(
            err,
            StoreError::Foreign {
                slot: 1,
                source: RecordError::UnsupportedVersion { version: 2 },
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        raw_slots(file.path())[1],
        Err(RecordError::UnsupportedVersion { version: 2 })
    );
    let other = Record {
        pair: "pair-2".to_owned(),
        ..record.clone()
    };
    scribble(file.path(), RECORD_BYTES as u64, &other.encode());
    let err = file.read().expect_err("another pair");
    assert!(matches!(&err, StoreError::WrongPair { slot: 1, found, .. } if found == "pair-2"));
    let twin = Record {
        lease: lease(1, "manager-b"),
        ..record.clone()
    };
    scribble(file.path(), RECORD_BYTES as u64, &twin.encode());
    let err = file.read().expect_err("same sequence");
    assert!(
        matches!(err, StoreError::Conflict { sequence: 1, .. }),
        "{err:?}"
    );
    scribble(file.path(), RECORD_BYTES as u64, &record.encode());
    assert_eq!(file.read().expect("identical twins"), Some(record));
}

#[test]
fn a_lower_epoch_is_refused_before_it_is_written() {
    // Goal: the store keeps epochs from going down, so an older record never holds a
    // higher epoch than a newer one. Method: write epoch 5, then try 4; the file keeps 5.
    let dir = temp_dir();
    let mut file = LeaseFile::open_or_create(dir.path(), PAIR).expect("create");
    let kept = file.write(&lease(5, "manager-a")).expect("write");
    let err = file.write(&lease(4, "manager-b")).expect_err("lower epoch");
    assert!(
        matches!(
            err,
            StoreError::EpochRegression {
                current_epoch: 5,
                new_epoch: 4,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(file.read().expect("read"), Some(kept));
    let same = file
        .write(&lease(5, "manager-a"))
        .expect("same epoch renews");
    assert_eq!(same.sequence, 2);
}

#[test]
fn links_bad_names_and_foreign_files_are_refused() {
    // Goal: the lease file is never reached through a symbolic link (file or directory),
    // the pair must be a name, and a second open of the file is locked out. Method: plant
    // a link to a victim; link the directory; open twice; bad pair.
    let root = temp_dir();
    let dir = root.path().join("leases");
    fs::create_dir(&dir).expect("mkdir");
    let victim = root.path().join("victim");
    fs::write(&victim, vec![7u8; FILE_BYTES as usize]).expect("victim");
    symlink(&victim, dir.join("pair-1.lease")).expect("symlink");
    let err = LeaseFile::open_or_create(&dir, PAIR).expect_err("symlink");
    assert!(matches!(err, StoreError::Symlink { .. }), "{err:?}");
    assert!(err.to_string().contains("pair-1.lease"), "{err}");
    assert_eq!(
        fs::read(&victim).expect("victim"),
        vec![7u8; FILE_BYTES as usize]
    );
    let linked_dir = root.path().join("linked");
    symlink(&dir, &linked_dir).expect("dir symlink");
    let err = LeaseFile::open_or_create(&linked_dir, "pair-2").expect_err("dir link");
    assert!(matches!(err, StoreError::NotADirectory { .. }), "{err:?}");
    let err = LeaseFile::open_or_create(&dir, "a/pair").expect_err("bad pair");
    assert!(matches!(
        err,
        StoreError::BadPair(NameError::BadCharacter { .. })
    ));
    let _first = LeaseFile::open_or_create(&dir, "pair-3").expect("first open");
    let err = LeaseFile::open_or_create(&dir, "pair-3").expect_err("second open");
    assert!(matches!(err, StoreError::Locked { .. }), "{err:?}");
}

#[test]
fn wrong_sizes_are_refused_and_a_crashed_creation_is_completed() {
    // Goal: a file not two records long is refused with its size, except what a crash
    // during creation leaves (short and all zeros), which is filled. Method: files of
    // several sizes and contents at the lease path.
    let dir = temp_dir();
    let path = dir.path().join("pair-1.lease");
    for (len_bytes, byte) in [(100, 1u8), (FILE_BYTES + 4096, 0), (RECORD_BYTES as u64, 9)] {
        fs::write(&path, vec![byte; len_bytes as usize]).expect("plant");
        let err = LeaseFile::open_or_create(dir.path(), PAIR).expect_err("wrong size");
        assert!(
            matches!(err, StoreError::WrongSize { size_bytes, .. } if size_bytes == len_bytes),
            "{err:?}"
        );
        assert!(err.to_string().contains("pair-1.lease"), "{err}");
    }
    for len_bytes in [0, 512, RECORD_BYTES] {
        fs::write(&path, vec![0u8; len_bytes]).expect("plant");
        let file = LeaseFile::open_or_create(dir.path(), PAIR).expect("completed");
        assert_eq!(fs::metadata(&path).expect("stat").len(), FILE_BYTES);
        assert_eq!(file.read().expect("read"), None);
    }
}

/// Real slots whose sync waits for a permit, and whose writes can be made to fail.
#[derive(Debug)]
struct SlowSlots {
    inner: DirectSlots,
    permits: Receiver<()>,
    fail_writes: Arc<AtomicBool>,
}

impl SlotIo for SlowSlots {
    fn read_slot(&self, slot: usize, buf: &mut AlignedBuf) -> io::Result<()> {
        self.inner.read_slot(slot, buf)
    }

    fn write_slot(&self, slot: usize, buf: &AlignedBuf) -> io::Result<()> {
        if self.fail_writes.load(Ordering::Relaxed) {
            return Err(io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32));
        }
        self.inner.write_slot(slot, buf)
    }

    fn sync(&self) -> io::Result<()> {
        self.permits.recv().map_err(io::Error::other)?;
        self.inner.sync()
    }
}

/// A lease file whose syncs each need a permit sent on the returned sender.
fn slow_file(dir: &Path) -> (LeaseFile, Sender<()>, Arc<AtomicBool>) {
    let path = dir.join("pair-1.lease");
    let file = open_file(dir, &path).expect("open");
    let (permit_tx, permits) = crossbeam_channel::bounded(8);
    let fail_writes = Arc::new(AtomicBool::new(false));
    let io = SlowSlots {
        inner: DirectSlots { file },
        permits,
        fail_writes: Arc::clone(&fail_writes),
    };
    let slots = Slots {
        path,
        pair: PAIR.to_owned(),
        io: Box::new(io),
    };
    (
        LeaseFile::start(slots).expect("start"),
        permit_tx,
        fail_writes,
    )
}

#[test]
fn a_slow_write_times_out_then_busies_the_next_until_it_lands() {
    // Goal: a write stuck in sync returns TimedOut within about its timeout (maybe
    // written), the next write fails fast with Busy without queueing, and once the stuck
    // write lands the next write follows it. Method: syncs gated by permits.
    let dir = temp_dir();
    let (mut file, permits, _) = slow_file(dir.path());
    let timeout = Duration::from_millis(50);
    let started = Instant::now();
    let err = file
        .write_within(&lease(1, "manager-a"), timeout)
        .expect_err("stuck");
    assert!(matches!(err, StoreError::TimedOut { .. }), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5), "bounded wait");
    assert!(err.is_maybe_written());
    assert!(err.to_string().contains("may still land"), "{err}");
    let started = Instant::now();
    let long = Duration::from_secs(30);
    for _ in 0..3 {
        let err = file
            .write_within(&lease(2, "manager-a"), long)
            .expect_err("busy");
        assert!(matches!(err, StoreError::Busy { .. }), "{err:?}");
        assert!(!err.is_maybe_written());
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "Busy does not wait"
    );
    permits.send(()).expect("release the stuck sync");
    permits.send(()).expect("permit the next write's sync");
    // Busy until the late write has also been read back; then the next write follows it.
    let next = wait_for(|| match file.write_within(&lease(2, "manager-b"), long) {
        Err(StoreError::Busy { .. }) => None,
        other => Some(other),
    });
    let next = next.expect("the late write finishes").expect("next write");
    assert_eq!(next.sequence, 2, "the late write landed as sequence 1");
    let late = raw_slots(file.path())[0].clone().expect("late record");
    assert_eq!((late.sequence, late.lease), (1, lease(1, "manager-a")));
    assert_eq!(file.read().expect("read"), Some(next));
}

#[test]
fn a_failed_write_is_maybe_written_and_the_old_record_stands() {
    // Goal: an I/O error while writing is reported as maybe written, with its path, and
    // the previous confirmed record still reads. Method: make writes fail with EIO.
    let dir = temp_dir();
    let (mut file, permits, fail_writes) = slow_file(dir.path());
    permits.send(()).expect("permit");
    let kept = file.write(&lease(1, "manager-a")).expect("write");
    fail_writes.store(true, Ordering::Relaxed);
    let err = file.write(&lease(2, "manager-a")).expect_err("EIO");
    assert!(matches!(err, StoreError::Write { slot: 1, .. }), "{err:?}");
    assert!(err.is_maybe_written());
    assert!(std::error::Error::source(&err).is_some(), "chained");
    assert_eq!(file.read().expect("read"), Some(kept));
}

/// Polls `probe` until it gives Some, for at most 10 s.
fn wait_for<T>(mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(found) = probe() {
            return Some(found);
        }
        thread::sleep(Duration::from_millis(5));
    }
    None
}
