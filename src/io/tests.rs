//! Conformance suite run for every engine, and the differential test of io_uring against the
//! pread/pwrite reference model.

use crate::prng::SplitMix64 as Prng;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_sys::{AlignedBuf, DirectFile, DIRECT_ALIGN};

use super::{
    open_engine, probe_uring, read_buf_len, BlockIo, EngineKind, IoCompletion, IoKind, IoRequest,
};

const IMAGE_BYTES: u64 = 4 << 20;

fn scratch() -> tempfile::TempDir {
    // O_DIRECT needs a real file system: /tmp may be tmpfs.
    tempfile::Builder::new()
        .prefix("ferry-io-")
        .tempdir_in("/var/tmp")
        .expect("tempdir")
}

fn image(dir: &Path, name: &str, len_bytes: u64) -> (PathBuf, Arc<DirectFile>) {
    let path = dir.join(name);
    std::fs::File::create(&path)
        .and_then(|f| f.set_len(len_bytes))
        .expect("create image");
    let file = DirectFile::open(&path, true).expect("open image");
    (path, Arc::new(file))
}

/// The engines available here; io_uring is skipped (with a message) where the kernel lacks it.
fn engines() -> Vec<EngineKind> {
    match probe_uring() {
        Ok(()) => vec![EngineKind::Sync, EngineKind::Uring],
        Err(err) => {
            eprintln!("skipped io_uring engine: {err}");
            vec![EngineKind::Sync]
        }
    }
}

/// Submits every request, then completes them all; panics if one is refused.
fn run_batch(engine: &mut dyn BlockIo, requests: Vec<IoRequest>) -> Vec<IoCompletion> {
    let count = requests.len();
    for request in requests {
        engine
            .submit(request)
            .map_err(|(err, _)| err)
            .expect("submit");
    }
    let mut done = Vec::new();
    while done.len() < count {
        engine
            .complete(count - done.len(), &mut done)
            .expect("complete");
    }
    assert_eq!(engine.in_flight(), 0);
    done
}

fn write(tag: u64, offset_bytes: u64, data: &[u8], fua: bool) -> IoRequest {
    let len = data.len().div_ceil(DIRECT_ALIGN).max(1) * DIRECT_ALIGN;
    let mut buf = AlignedBuf::zeroed(len, DIRECT_ALIGN);
    buf.as_mut_slice()[..data.len()].copy_from_slice(data);
    let len_bytes = u32::try_from(data.len()).unwrap();
    IoRequest {
        tag,
        kind: IoKind::Write { fua },
        offset_bytes,
        len_bytes,
        buf: Some(buf),
    }
}

fn read(tag: u64, offset_bytes: u64, len_bytes: u32) -> IoRequest {
    let buf = AlignedBuf::zeroed(read_buf_len(offset_bytes, len_bytes), DIRECT_ALIGN);
    IoRequest {
        tag,
        kind: IoKind::Read,
        offset_bytes,
        len_bytes,
        buf: Some(buf),
    }
}

fn other(tag: u64, kind: IoKind, offset_bytes: u64, len_bytes: u32) -> IoRequest {
    IoRequest {
        tag,
        kind,
        offset_bytes,
        len_bytes,
        buf: None,
    }
}

fn read_back(engine: &mut dyn BlockIo, offset_bytes: u64, len_bytes: u32) -> Vec<u8> {
    let mut done = run_batch(engine, vec![read(7, offset_bytes, len_bytes)]);
    let completion = done.pop().unwrap();
    completion.result.expect("read");
    let start = completion.data_start;
    completion.buf.unwrap().as_slice()[start..start + len_bytes as usize].to_vec()
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (seed.wrapping_mul(31).wrapping_add(i as u64 * 7) % 251) as u8)
        .collect()
}

// Goal: each engine reads back what it wrote, aligned or not, and hands every tag and buffer
// back once. Method: a batch of non-overlapping writes of many shapes (two sharing a 4 KiB
// block), then reads of each, for every engine.
#[test]
fn read_after_write_all_shapes() {
    for kind in engines() {
        let dir = scratch();
        let (_, file) = image(dir.path(), "rw.img", IMAGE_BYTES);
        let mut engine = open_engine(kind, file, 32, None).expect("engine");
        let shapes: [(u64, usize); 8] = [
            (0, 4096),
            (4196, 1),
            (6143, 2),
            (8192, 65536),
            (200_000, 12_345),
            (1 << 20, 1 << 20),
            (IMAGE_BYTES - 8192, 4096),
            (IMAGE_BYTES - 513, 513),
        ];
        let writes = shapes
            .iter()
            .enumerate()
            .map(|(i, &(offset, len))| write(i as u64, offset, &pattern(i as u64, len), i % 2 == 0))
            .collect();
        let done = run_batch(engine.as_mut(), writes);
        let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        assert_eq!(
            tags,
            (0..shapes.len() as u64).collect::<Vec<_>>(),
            "{kind:?}"
        );
        assert!(
            done.iter().all(|c| c.result.is_ok() && c.buf.is_some()),
            "{kind:?}: {done:?}"
        );
        for (i, &(offset, len)) in shapes.iter().enumerate() {
            let got = read_back(engine.as_mut(), offset, len as u32);
            assert!(
                got == pattern(i as u64, len),
                "{kind:?}: shape {i} ({offset}, {len}) differs"
            );
        }
    }
}

// Goal: FLUSH, TRIM and WRITE_ZEROES do what NBD asks, on every engine. Method: fill a range,
// trim part, zero part with and without holes, flush, read back; check allocation with
// SEEK_DATA for the trimmed range.
#[test]
fn flush_trim_and_zeroes() {
    for kind in engines() {
        let dir = scratch();
        let (path, file) = image(dir.path(), "tz.img", IMAGE_BYTES);
        let mut engine = open_engine(kind, file.clone(), 8, None).expect("engine");
        let fill = vec![0xAB; 1 << 20];
        run_batch(engine.as_mut(), vec![write(1, 0, &fill, false)]);
        let done = run_batch(
            engine.as_mut(),
            vec![
                other(2, IoKind::Trim { fua: false }, 0, 256 << 10),
                other(
                    3,
                    IoKind::WriteZeroes {
                        may_trim: true,
                        fua: true,
                    },
                    512 << 10,
                    128 << 10,
                ),
                other(
                    4,
                    IoKind::WriteZeroes {
                        may_trim: false,
                        fua: false,
                    },
                    700_001,
                    999,
                ),
            ],
        );
        assert!(done.iter().all(|c| c.result.is_ok()), "{kind:?}: {done:?}");
        let flushed = run_batch(engine.as_mut(), vec![other(5, IoKind::Flush, 0, 0)]);
        assert!(flushed[0].result.is_ok());
        let got = read_back(engine.as_mut(), 0, 1 << 20);
        for (offset, &byte) in got.iter().enumerate() {
            let zero = offset < 256 << 10
                || (512 << 10..640 << 10).contains(&offset)
                || (700_001..701_000).contains(&offset);
            assert_eq!(byte, if zero { 0 } else { 0xAB }, "{kind:?}: byte {offset}");
        }
        assert_eq!(
            file.seek_data(0).unwrap(),
            Some(256 << 10),
            "{kind:?}: trim punched a hole"
        );
        drop(engine);
        std::fs::remove_file(path).unwrap();
    }
}

// Goal: a full engine refuses and hands the request back with its buffer. Method: depth 2,
// submit 3 without completing.
#[test]
fn full_engine_returns_the_request() {
    for kind in engines() {
        let dir = scratch();
        let (_, file) = image(dir.path(), "full.img", IMAGE_BYTES);
        let mut engine = open_engine(kind, file, 2, None).expect("engine");
        engine
            .submit(write(1, 0, &[1; 4096], false))
            .map_err(|(e, _)| e)
            .unwrap();
        engine
            .submit(write(2, 4096, &[2; 4096], false))
            .map_err(|(e, _)| e)
            .unwrap();
        let (err, back) = engine
            .submit(write(3, 8192, &[3; 4096], false))
            .unwrap_err();
        assert!(matches!(err, super::IoError::Full), "{kind:?}: {err}");
        assert_eq!(back.tag, 3);
        assert_eq!(back.buf.unwrap().as_slice()[0], 3);
        let mut done = Vec::new();
        while done.len() < 2 {
            engine.complete(2, &mut done).unwrap();
        }
    }
}

/// A random request inside its own 64 KiB lane, so requests of one batch never overlap
/// (NBD leaves overlapping requests in flight unordered; the engines may too).
fn random_request(prng: &mut Prng, tag: u64, lane: u64) -> IoRequest {
    let lane_bytes = 64 * 1024;
    let aligned = prng.below(2) == 0;
    let (offset, len) = if aligned {
        let blocks = prng.below(16) + 1;
        (
            lane * lane_bytes + prng.below(16 - blocks + 1) * 4096,
            blocks * 4096,
        )
    } else {
        let len = prng.below(20_000) + 1;
        (lane * lane_bytes + prng.below(lane_bytes - len), len)
    };
    let len = u32::try_from(len).unwrap();
    match prng.below(10) {
        0..=5 => write(
            tag,
            offset,
            &pattern(prng.next_u64(), len as usize),
            prng.below(8) == 0,
        ),
        6 | 7 => read(tag, offset, len),
        8 => other(tag, IoKind::Trim { fua: false }, offset, len),
        _ => other(
            tag,
            IoKind::WriteZeroes {
                may_trim: prng.below(2) == 0,
                fua: false,
            },
            offset,
            len,
        ),
    }
}

fn clone_request(request: &IoRequest) -> IoRequest {
    let buf = request.buf.as_ref().map(|b| {
        let mut copy = AlignedBuf::zeroed(b.len(), DIRECT_ALIGN);
        copy.as_mut_slice().copy_from_slice(b.as_slice());
        copy
    });
    IoRequest { buf, ..*request }
}

// Goal: the io_uring engine does exactly what the reference model does. Method: for several
// seeds, batches of random non-overlapping reads, writes (aligned or not, some FUA), trims and
// zeroes go to both engines on two images; every read returns the same bytes and the images
// end identical. Replay one seed with IO_SEED=N.
#[test]
fn uring_matches_sync_model() {
    if let Err(err) = probe_uring() {
        eprintln!("skipped: io_uring unavailable: {err}");
        return;
    }
    let seeds: Vec<u64> = match std::env::var("IO_SEED") {
        Ok(seed) => vec![seed.parse().expect("IO_SEED is a number")],
        Err(_) => (1..=8).collect(),
    };
    for seed in seeds {
        let dir = scratch();
        let (model_path, model_file) = image(dir.path(), "model.img", IMAGE_BYTES);
        let (uring_path, uring_file) = image(dir.path(), "uring.img", IMAGE_BYTES);
        let mut model = open_engine(EngineKind::Sync, model_file, 64, None).unwrap();
        let mut uring = open_engine(EngineKind::Uring, uring_file, 64, None).unwrap();
        let mut prng = Prng::new(seed);
        let lanes = IMAGE_BYTES / (64 * 1024);
        for _batch in 0..40 {
            let mut lane_order: Vec<u64> = (0..lanes).collect();
            for i in (1..lane_order.len()).rev() {
                lane_order.swap(i, prng.below(i as u64 + 1) as usize);
            }
            let batch: Vec<IoRequest> = (0..prng.below(48) + 1)
                .map(|i| random_request(&mut prng, i, lane_order[i as usize]))
                .collect();
            let copies: Vec<IoRequest> = batch.iter().map(clone_request).collect();
            let mut want = run_batch(model.as_mut(), batch);
            let mut got = run_batch(uring.as_mut(), copies);
            want.sort_by_key(|c| c.tag);
            got.sort_by_key(|c| c.tag);
            for (w, g) in want.iter().zip(&got) {
                assert!(
                    w.result.is_ok() && g.result.is_ok(),
                    "seed {seed}: {w:?} / {g:?}"
                );
            }
        }
        run_batch(uring.as_mut(), vec![other(0, IoKind::Flush, 0, 0)]);
        let model_bytes = std::fs::read(&model_path).unwrap();
        let uring_bytes = std::fs::read(&uring_path).unwrap();
        let first_diff = model_bytes
            .iter()
            .zip(&uring_bytes)
            .position(|(a, b)| a != b);
        assert_eq!(
            first_diff, None,
            "seed {seed}: images differ (replay with IO_SEED={seed})"
        );
    }
}

// Goal: one wait covers the disk and the connection: an armed wake-up ends `complete` when the
// socket gets data, is not counted as a request, and an engine dropped with it still armed does
// not hang. Method: a unix socket pair watched by a ring; a thread writes after 50 ms while
// `complete(1)` waits with nothing else in flight; then arm again and drop.
#[test]
fn readable_wake_up_ends_the_wait() {
    use std::io::Write;
    use std::os::fd::AsFd;
    if let Err(err) = probe_uring() {
        eprintln!("skipped: io_uring unavailable: {err}");
        return;
    }
    let dir = scratch();
    let (_, file) = image(dir.path(), "wake.img", IMAGE_BYTES);
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let mut engine = open_engine(EngineKind::Uring, file, 4, Some(ours.as_fd())).unwrap();
    assert!(engine.arm_readable());
    assert_eq!(engine.in_flight(), 0, "the wake-up is not a request");
    let writer = std::thread::spawn(move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        theirs.write_all(b"x").unwrap();
        theirs
    });
    let started = std::time::Instant::now();
    let mut done = Vec::new();
    engine.complete(1, &mut done).unwrap();
    assert!(done.is_empty());
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(40),
        "waited for the socket"
    );
    let _theirs = writer.join().unwrap();
    // Data is still unread: arming again fires at once, and writes still complete normally.
    assert!(engine.arm_readable());
    let done = run_batch(engine.as_mut(), vec![write(1, 0, &[7; 4096], false)]);
    assert!(done[0].result.is_ok());
    let mut ours = ours;
    let mut byte = [0u8; 1];
    std::io::Read::read_exact(&mut ours, &mut byte).unwrap();
    engine.arm_readable();
    drop(engine); // a wake-up that never fires must not block the drop
}
