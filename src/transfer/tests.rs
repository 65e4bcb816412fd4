//! End-to-end tests of the block stream over loopback TCP: a real [`Sender`] against a real
//! receiver whose [`TargetHost`] writes images into a temp dir under /var/tmp (O_DIRECT).

use crate::prng::SplitMix64;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ferry_sys::DirectFile;

use super::frame::{ErrorCode, Frame, Role, TargetSpec};
use super::link;
use super::*;

const MIB: u64 = 1 << 20;

/// A host that creates `<export>.img` in its dir, reopens it on resume, and records commits
/// and aborts.
#[derive(Debug, Default)]
struct DirHost {
    dir: PathBuf,
    refuse: Option<String>,
    committed: Mutex<Vec<String>>,
    aborted: Mutex<Vec<String>>,
    repointed: Mutex<Vec<Repoint>>,
}

impl DirHost {
    fn image(&self, export: &str) -> PathBuf {
        self.dir.join(format!("{export}.img"))
    }
}

impl TargetHost for DirHost {
    fn create_target(
        &self,
        spec: &TargetSpec,
        _source: &str,
    ) -> Result<Arc<DirectFile>, TargetError> {
        if let Some(reason) = &self.refuse {
            return Err(TargetError::Refused(reason.clone()));
        }
        let path = self.image(&spec.export);
        if !path.exists() {
            return create_sparse_target(&path, spec.size_bytes);
        }
        let file = DirectFile::open(&path, true).map_err(TargetError::io("open", &path))?;
        match file.size_bytes() {
            Ok(size) if size == spec.size_bytes => Ok(Arc::new(file)),
            Ok(size) => Err(TargetError::WrongSize {
                have_bytes: size,
                want_bytes: spec.size_bytes,
            }),
            Err(err) => Err(TargetError::io("size", &path)(err)),
        }
    }

    fn commit_target(
        &self,
        spec: &TargetSpec,
        _manager_epoch: Option<u64>,
    ) -> Result<(), TargetError> {
        self.committed.lock().unwrap().push(spec.export.clone());
        Ok(())
    }

    fn abort_target(&self, spec: &TargetSpec) {
        self.aborted.lock().unwrap().push(spec.export.clone());
        let _ = std::fs::remove_file(self.image(&spec.export));
    }

    fn nbd_tcp(&self) -> Option<String> {
        Some("127.0.0.1:10809".into())
    }

    fn checkpoint(&self, _spec: &TargetSpec, _received: &crate::dirty::DirtySet) {}

    fn end_stream(&self, _spec: &TargetSpec) {}

    fn repoint(&self, repoint: &Repoint) -> Result<RepointOutcome, TargetError> {
        if let Some(reason) = &self.refuse {
            return Err(TargetError::Refused(reason.clone()));
        }
        self.repointed.lock().unwrap().push(repoint.clone());
        Ok(RepointOutcome::Repointed)
    }

    fn query(&self, _job_id: u64, _finalize: bool) -> (TargetState, u64) {
        if self.committed.lock().unwrap().is_empty() {
            (TargetState::Unknown, 0)
        } else {
            (TargetState::Committed, 0)
        }
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    source_path: PathBuf,
    host: Arc<DirHost>,
    server: ReceiverServer,
    key: ClusterKey,
}

/// A source of `size_bytes`: PRNG data, with `zero_ranges` written as real zeros (allocated,
/// so only the sender's zero detection can turn them into holes).
/// A good stream after a failed one: the whole source into target `name`, committed.
fn send_whole_and_commit(s: &Setup, name: &str, size: u64) {
    let (mut sender, _) = Sender::connect(
        s.server.local_addr(),
        &s.key,
        &spec(name, size),
        SendOptions::default(),
    )
    .unwrap();
    sender
        .send_extents(&open_source(&s.source_path), &[(0, size)])
        .unwrap();
    sender.commit(None).unwrap();
}

fn setup(size_bytes: u64, zero_ranges: &[(u64, u64)], refuse: Option<String>) -> Setup {
    let dir = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
    let source_path = dir.path().join("source.img");
    let mut rng = SplitMix64::new(size_bytes);
    let mut bytes: Vec<u8> = (0..size_bytes.div_ceil(8))
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    bytes.truncate(size_bytes as usize);
    for &(offset, len) in zero_ranges {
        bytes[offset as usize..(offset + len) as usize].fill(0);
    }
    std::fs::write(&source_path, &bytes).unwrap();
    let targets = dir.path().join("targets");
    std::fs::create_dir(&targets).unwrap();
    let host = Arc::new(DirHost {
        dir: targets,
        refuse,
        ..DirHost::default()
    });
    let key = ClusterKey::from_bytes([0x42; 32]);
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = serve(
        addr,
        key.clone(),
        Arc::clone(&host) as Arc<dyn TargetHost>,
        crate::nbd::admission::AdmissionLimits::STREAM,
    )
    .unwrap();
    Setup {
        _dir: dir,
        source_path,
        host,
        server,
        key,
    }
}

fn spec(export: &str, size_bytes: u64) -> TargetSpec {
    TargetSpec {
        export: export.into(),
        size_bytes,
        granularity_bytes: 65536,
        job_id: 7,
        batch: None,
        holder: None,
        seed: None,
        manager_epoch: None,
    }
}

fn open_source(path: &Path) -> Arc<DirectFile> {
    Arc::new(DirectFile::open(path, false).unwrap())
}

// Goal: a whole disk arrives byte for byte, zeros become holes and are counted, sync and
// commit work, and throughput is measured. Method: 64 MiB + 1234 bytes of PRNG data with two
// zero regions (one chunk-aligned, one not), sent as one extent over loopback; compare files,
// query holes with SEEK_DATA and st_blocks.
#[test]
fn loopback_whole_disk() {
    let size = 64 * MIB + 1234;
    let zeros = [(4 * MIB, 8 * MIB), (40 * MIB, MIB + MIB / 2)];
    let s = setup(size, &zeros, None);
    let target_spec = spec("vm1", size);
    let (mut sender, reply) = Sender::connect(
        s.server.local_addr(),
        &s.key,
        &target_spec,
        SendOptions::default(),
    )
    .unwrap();
    assert_eq!(reply.nbd_tcp.as_deref(), Some("127.0.0.1:10809"));
    let source = open_source(&s.source_path);
    let stats = sender.send_extents(&source, &[(0, size)]).unwrap();
    let received_blocks = sender.sync().unwrap();
    sender.commit(None).unwrap();
    drop(sender);
    let mib_per_s = (size as f64 / MIB as f64) / (stats.elapsed_ns as f64 / 1e9);
    eprintln!("loopback 64 MiB: {stats:?}, {mib_per_s:.0} MiB/s");

    // 8 MiB + the one whole zero MiB of the second region; its half MiB travels as data.
    assert_eq!(stats.zero_bytes, 9 * MIB);
    assert_eq!(stats.data_bytes, size - 9 * MIB);
    assert_eq!(stats.zero_frames, 2);
    assert_eq!(stats.data_frames, 56);
    assert_eq!(received_blocks, size.div_ceil(65536));
    assert_eq!(*s.host.committed.lock().unwrap(), vec!["vm1".to_string()]);

    let target_path = s.host.image("vm1");
    let source_bytes = std::fs::read(&s.source_path).unwrap();
    let target_bytes = std::fs::read(&target_path).unwrap();
    assert_eq!(source_bytes.len(), target_bytes.len());
    assert!(source_bytes == target_bytes, "target differs from source");
    let target = DirectFile::open(&target_path, false).unwrap();
    assert_eq!(target.seek_data(4 * MIB).unwrap(), Some(12 * MIB));
    assert_eq!(target.seek_data(40 * MIB).unwrap(), Some(41 * MIB));
    let allocated = std::fs::metadata(&target_path).unwrap().blocks() * 512;
    assert!(
        allocated <= size - 9 * MIB + MIB,
        "{allocated} bytes allocated"
    );
    s.server.shutdown();
}

// Goal: a bad digest is caught before the write, reported with its offset, and the target
// is neither written nor committed; the receiver keeps serving. Method: raw frames with a
// wrong digest, then a normal Sender on the same receiver.
#[test]
fn corrupted_data_is_refused() {
    let size = 4 * MIB;
    let s = setup(size, &[], None);
    let stream = TcpStream::connect(s.server.local_addr()).unwrap();
    let mut stream = link::authenticate(stream, &s.key, Role::Source).unwrap();
    let mut scratch = Vec::new();
    link::write_frame(&mut stream, &Frame::Open(spec("bad", size)), &mut scratch).unwrap();
    let mut meta = Vec::new();
    let reply = link::read_frame(&mut stream, &mut meta).unwrap();
    assert!(matches!(reply, Frame::OpenOk { .. }), "{reply:?}");
    let payload = vec![0xEEu8; 65536];
    let mut digest = *blake3::hash(&payload).as_bytes();
    digest[0] ^= 1;
    link::write_data(&mut stream, MIB, &payload, digest, &mut scratch).unwrap();
    let answer = link::read_frame(&mut stream, &mut meta).unwrap();
    let Frame::Error {
        code, offset_bytes, ..
    } = answer.clone()
    else {
        panic!("expected Error, got {answer:?}");
    };
    assert_eq!((code, offset_bytes), (ErrorCode::Digest, MIB));
    assert!(matches!(
        link::unexpected(answer, "nothing"),
        TransferError::Digest { offset_bytes } if offset_bytes == MIB
    ));
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(s.host.committed.lock().unwrap().is_empty());
    let target = std::fs::read(s.host.image("bad")).unwrap();
    assert!(target.iter().all(|&b| b == 0), "corrupt data was written");

    send_whole_and_commit(&s, "good", size);
}

// Goal: a connection cut mid-stream fails the sender with a reconnectable error, the receiver
// survives, and a new stream resumes into the same target. Method: a proxy that forwards
// 3 MiB of the source's bytes then closes both sides; then a direct Sender finishes the job.
#[test]
fn dropped_connection_then_resume() {
    let size = 16 * MIB;
    let s = setup(size, &[], None);
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let upstream_addr = s.server.local_addr();
    let cutter = std::thread::spawn(move || {
        let (client, _) = proxy.accept().unwrap();
        let upstream = TcpStream::connect(upstream_addr).unwrap();
        let (mut from_client, mut to_client) = (client.try_clone().unwrap(), client);
        let (mut from_upstream, mut to_upstream) = (upstream.try_clone().unwrap(), upstream);
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut from_upstream, &mut to_client);
        });
        let _ = std::io::copy(&mut (&mut from_client).take(3 * MIB), &mut to_upstream);
        let _ = to_upstream.shutdown(std::net::Shutdown::Both);
        let _ = from_client.shutdown(std::net::Shutdown::Both);
        back.join().unwrap();
    });
    let target_spec = spec("vm2", size);
    let source = open_source(&s.source_path);
    let (mut sender, _) =
        Sender::connect(proxy_addr, &s.key, &target_spec, SendOptions::default()).unwrap();
    let err = sender
        .send_extents(&source, &[(0, size)])
        .and_then(|_| sender.sync())
        .unwrap_err();
    assert!(err.should_reconnect(), "{err:?}");
    let sent = sender.totals();
    assert!(
        sent.data_bytes > 0 && sent.wire_bytes <= 16 * MIB + 4096,
        "{sent:?}"
    );
    drop(sender);
    cutter.join().unwrap();

    let (mut sender, _) =
        Sender::connect(upstream_addr, &s.key, &target_spec, SendOptions::default()).unwrap();
    sender.send_extents(&source, &[(0, size)]).unwrap();
    sender.commit(None).unwrap();
    drop(sender);
    let source_bytes = std::fs::read(&s.source_path).unwrap();
    assert!(source_bytes == std::fs::read(s.host.image("vm2")).unwrap());
}

// Goal: the host's refusal and a wrong key reach the sender as clear errors; Abort reaches
// the host. Method: a refusing host; a sender with another key; a sender that aborts.
#[test]
fn refusal_auth_and_abort() {
    let s = setup(MIB, &[], Some("export vm3 exists".into()));
    let err = Sender::connect(
        s.server.local_addr(),
        &s.key,
        &spec("vm3", MIB),
        SendOptions::default(),
    )
    .unwrap_err();
    match &err {
        TransferError::Refused { reason } => assert!(reason.contains("exists"), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    assert!(!err.should_reconnect());
    let wrong = ClusterKey::from_bytes([1; 32]);
    let err = Sender::connect(
        s.server.local_addr(),
        &wrong,
        &spec("vm3", MIB),
        SendOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, TransferError::Auth { .. }), "{err:?}");

    let s = setup(MIB, &[], None);
    let (sender, _) = Sender::connect(
        s.server.local_addr(),
        &s.key,
        &spec("vm4", MIB),
        SendOptions::default(),
    )
    .unwrap();
    sender.abort().unwrap();
    assert_eq!(*s.host.aborted.lock().unwrap(), vec!["vm4".to_string()]);
    assert!(!s.host.image("vm4").exists());
}

// Goal: the bandwidth cap holds end to end. Method: 4 MiB at 16 MiB/s must take ≥ 150 ms
// (250 ms minus the 100 ms burst credit).
#[test]
fn bandwidth_cap_is_applied() {
    let size = 4 * MIB;
    let s = setup(size, &[], None);
    let options = SendOptions {
        bandwidth_bytes_per_s: Some(16 * MIB),
        ..SendOptions::default()
    };
    let (mut sender, _) =
        Sender::connect(s.server.local_addr(), &s.key, &spec("slow", size), options).unwrap();
    let stats = sender
        .send_extents(&open_source(&s.source_path), &[(0, size)])
        .unwrap();
    sender.sync().unwrap();
    assert!(stats.elapsed_ns >= 150_000_000, "{stats:?}");
}

// Goal: garbage never panics the receiver: before auth it just closes; after Open it answers
// Error{BadFrame} and closes that connection only. Method: PRNG bytes on fresh connections,
// then a normal transfer on the same receiver.
#[test]
fn garbage_input_closes_only_that_connection() {
    let size = MIB;
    let s = setup(size, &[], None);
    let mut rng = SplitMix64::new(99);
    let garbage: Vec<u8> = (0..512)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    for _ in 0..4 {
        let mut stream = TcpStream::connect(s.server.local_addr()).unwrap();
        let _ = stream.write_all(&garbage);
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    }
    let stream = TcpStream::connect(s.server.local_addr()).unwrap();
    let mut stream = link::authenticate(stream, &s.key, Role::Source).unwrap();
    let mut scratch = Vec::new();
    link::write_frame(&mut stream, &Frame::Open(spec("noise", size)), &mut scratch).unwrap();
    let mut meta = Vec::new();
    assert!(matches!(
        link::read_frame(&mut stream, &mut meta).unwrap(),
        Frame::OpenOk { .. }
    ));
    stream.write_all(&garbage).unwrap();
    match link::read_frame(&mut stream, &mut meta).unwrap() {
        Frame::Error { code, .. } => assert_eq!(code, ErrorCode::BadFrame),
        other => panic!("expected Error, got {other:?}"),
    }
    drop(stream);

    send_whole_and_commit(&s, "after", size);
}

/// A sender of `export` to the setup's receiver, with a slow copy (`chunk_bytes` reads,
/// capped at `bytes_per_s`) and the mirror link a guest's writes go through beside it.
fn mirroring_sender(
    s: &Setup,
    export: &str,
    size_bytes: u64,
    chunk_bytes: usize,
    bytes_per_s: u64,
) -> (Sender, MirrorLink) {
    let (mut sender, _) = Sender::connect(
        s.server.local_addr(),
        &s.key,
        &spec(export, size_bytes),
        SendOptions {
            chunk_bytes,
            bandwidth_bytes_per_s: Some(bytes_per_s),
            ..SendOptions::default()
        },
    )
    .unwrap();
    let link = sender.mirror_link();
    (sender, link)
}

// Goal: while guest writes are mirrored into the stream, the copy never lets stale bytes land
// after a mirrored write (the carve-out), and mirrored writes of any size and alignment
// arrive. Method: 8 MiB of PRNG data copied once with a 16 MiB/s cap (the pacing sleeps
// between a chunk's read and its emission, which widens the race window); meanwhile a "guest"
// thread writes random ranges (512 B to 96 KiB, unaligned too, some zeroed) into the source
// file and then into the mirror link, fencing every few writes, until the copy is done.
// The committed target must equal the source file byte for byte. With the carve-out
// disabled the images differ on every run (checked by hand).
#[test]
fn mirrored_writes_racing_the_copy_land_last() {
    use crate::disk::mirror::WriteMirror;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    let size = 8 * MIB;
    let s = setup(size, &[], None);
    let (mut sender, link) = mirroring_sender(&s, "mirrored", size, 128 << 10, 16 * MIB);
    let copied = Arc::new(AtomicBool::new(false));
    let guest = {
        let (path, link, copied) = (s.source_path.clone(), link.clone(), Arc::clone(&copied));
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let mut rng = SplitMix64::new(99);
            let mut writes = 0u64;
            while !copied.load(Ordering::SeqCst) {
                let len = 512 + rng.next_u64() % (96 << 10);
                let offset = rng.next_u64() % (size - len);
                let zeros = writes % 16 == 0;
                let data = vec![if zeros { 0 } else { (writes % 251) as u8 + 1 }; len as usize];
                file.write_all_at(&data, offset).unwrap();
                if zeros {
                    link.zero(offset, len, false);
                } else {
                    link.write(offset, &data);
                }
                writes += 1;
                if writes % 4 == 0 {
                    link.fence();
                }
            }
            link.fence();
            writes
        })
    };
    let source = open_source(&s.source_path);
    sender.send_extents(&source, &[(0, size)]).unwrap();
    copied.store(true, Ordering::SeqCst);
    let writes = guest.join().unwrap();
    assert!(!link.failed());
    sender.commit(None).unwrap();
    let source_bytes = std::fs::read(&s.source_path).unwrap();
    let target_bytes = std::fs::read(s.host.image("mirrored")).unwrap();
    let first_difference = source_bytes
        .iter()
        .zip(&target_bytes)
        .position(|(a, b)| a != b);
    assert_eq!(first_difference, None, "after {writes} mirrored writes");
}

// Goal: a Fence that no longer drains still answers only once every write before it is on
// the target's disk, while the copy's writes keep flowing behind it (the mirrored write a
// guest sees acknowledged must be at the destination). Method: a slow copy runs while a
// guest thread mirrors a unique pattern, fences, and at once reads the target image there.
#[test]
fn a_fenced_mirrored_write_is_on_the_target_when_the_fence_returns() {
    use crate::disk::mirror::WriteMirror;
    use std::os::unix::fs::FileExt;
    use std::sync::atomic::{AtomicBool, Ordering};

    let size = 16 * MIB;
    let s = setup(size, &[], None);
    let (mut sender, link) = mirroring_sender(&s, "fenced", size, 256 << 10, 32 * MIB);
    let copied = Arc::new(AtomicBool::new(false));
    let image = s.host.image("fenced");
    let guest = {
        let (path, link, copied) = (s.source_path.clone(), link.clone(), Arc::clone(&copied));
        std::thread::spawn(move || {
            let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
            let mut rng = SplitMix64::new(7);
            let mut fenced = 0u64;
            while !copied.load(Ordering::SeqCst) {
                let offset = (rng.next_u64() % (size / 4096 - 16)) * 4096;
                let data: Vec<u8> = (0..16 * 1024).map(|_| rng.next_u64() as u8).collect();
                file.write_all_at(&data, offset).unwrap();
                link.write(offset, &data);
                link.fence();
                let mut seen = vec![0u8; data.len()];
                let target = std::fs::File::open(&image).unwrap();
                target.read_exact_at(&mut seen, offset).unwrap();
                assert!(seen == data, "write {fenced} at {offset} not on the target");
                fenced += 1;
            }
            fenced
        })
    };
    let source = open_source(&s.source_path);
    sender.send_extents(&source, &[(0, size)]).unwrap();
    copied.store(true, Ordering::SeqCst);
    let fenced = guest.join().unwrap();
    assert!(fenced > 10, "only {fenced} fenced writes during the copy");
    assert!(!link.failed());
    sender.commit(None).unwrap();
}

// Goal: a peer that sends Fences faster than the target's writes complete gains no memory
// (at most MAX_PENDING_FENCES wait at once), and every Fence is still answered, in order.
// Method: an authenticated raw link sends rounds of eight 1 MiB Data frames, each followed by
// 4096 Fences with nothing read in between, while a second thread reads the FenceOks; then
// Commit. The most Fences that waited at once on any target must stay within the cap, and
// the committed image must hold every byte written. Without the cap they pile up to a round's 4096 (checked by hand).
#[test]
fn a_peer_flooding_fences_gains_no_memory() {
    use std::sync::atomic::Ordering;
    const ROUNDS: u64 = 4;
    const FENCES_PER_ROUND: u64 = 4096;

    let size = 16 * MIB;
    let s = setup(size, &[], None);
    let stream = TcpStream::connect(s.server.local_addr()).unwrap();
    let mut link = link::authenticate(stream, &s.key, Role::Source).unwrap();
    let (mut scratch, mut meta) = (Vec::new(), Vec::new());
    link::write_frame(&mut link, &Frame::Open(spec("flood", size)), &mut scratch).unwrap();
    assert!(matches!(
        link::read_frame(&mut link, &mut meta).unwrap(),
        Frame::OpenOk { .. }
    ));
    let (mut stream, mut tx, mut rx) = link.into_parts();
    let mut replies = stream.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut meta = Vec::new();
        for want in 0..ROUNDS * FENCES_PER_ROUND {
            match rx.read_frame(&mut replies, &mut meta).unwrap() {
                Frame::FenceOk { seq } => assert_eq!(seq, want),
                other => panic!("expected FenceOk {want}, got {other:?}"),
            }
        }
        rx.read_frame(&mut replies, &mut meta).unwrap()
    });
    let payload = vec![0x5a; MIB as usize];
    let digest = *blake3::hash(&payload).as_bytes();
    let mut seq = 0;
    for round in 0..ROUNDS {
        for chunk in 0..8 {
            let offset = (round * 8 + chunk) % 16 * MIB;
            tx.write_data(&mut stream, offset, &payload, digest, &mut scratch)
                .unwrap();
        }
        for _ in 0..FENCES_PER_ROUND {
            tx.write_frame(&mut stream, &Frame::Fence { seq }, &mut scratch)
                .unwrap();
            seq += 1;
        }
    }
    let commit = Frame::Commit {
        seq,
        manager_epoch: None,
    };
    tx.write_frame(&mut stream, &commit, &mut scratch).unwrap();
    assert!(matches!(reader.join().unwrap(), Frame::CommitOk { .. }));
    let most = recv::MOST_FENCES_WAITING.load(Ordering::Relaxed);
    assert!(
        most <= recv::MAX_PENDING_FENCES,
        "{most} Fences waited at once"
    );
    // The writes the flood surrounded all landed: the rounds cover the whole image.
    let image = std::fs::read(s.host.image("flood")).unwrap();
    assert_eq!(image.iter().position(|&byte| byte != 0x5a), None);
}

// Goal: a re-point crosses the block stream to the holder's host, authenticated, and its
// answer comes back; a refusal is an error naming the reason, and a wrong key gets nothing
// through. Method: repoint::tell_holder against a real receiver with a recording host.
#[test]
fn repoint_reaches_the_holder() {
    let s = setup(MIB, &[], None);
    let repoint = Repoint {
        job_id: 3,
        export: "vm1".into(),
        size_bytes: MIB,
        nbd_tcp: "127.0.0.1:10810".into(),
        moves: 2,
    };
    let timeout = std::time::Duration::from_secs(5);
    let outcome = repoint::tell_holder(s.server.local_addr(), &s.key, &repoint, timeout);
    assert_eq!(outcome.unwrap(), RepointOutcome::Repointed);
    assert_eq!(*s.host.repointed.lock().unwrap(), vec![repoint.clone()]);

    let wrong = ClusterKey::from_bytes([0x43; 32]);
    let err = repoint::tell_holder(s.server.local_addr(), &wrong, &repoint, timeout);
    assert!(matches!(err, Err(TransferError::Auth { .. })), "{err:?}");
    assert_eq!(s.host.repointed.lock().unwrap().len(), 1);

    let refusing = setup(MIB, &[], Some("size differs".into()));
    let err = repoint::tell_holder(
        refusing.server.local_addr(),
        &refusing.key,
        &repoint,
        timeout,
    )
    .unwrap_err();
    assert!(err.to_string().contains("size differs"), "{err}");
}
