//! io engine hot path: 4 KiB random writes and reads at queue depth 32 through the io_uring
//! engine (O_DIRECT) and the pread/pwrite engine, on a 256 MiB file in /var/tmp. The io_uring
//! case is skipped, with a message, where the kernel has no io_uring.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry::io::{open_engine, probe_uring, BlockIo, EngineKind, IoCompletion, IoKind, IoRequest};
use ferry_sys::{AlignedBuf, DirectFile, DIRECT_ALIGN};

const FILE_BYTES: u64 = 256 << 20;
const DEPTH: usize = 32;
const BLOCK: u32 = 4096;

/// Runs `ops` requests keeping `DEPTH` in flight; offsets from an xorshift sequence.
fn run(engine: &mut dyn BlockIo, kind: IoKind, ops: u64, seed: &mut u64) -> Duration {
    let mut bufs: Vec<AlignedBuf> = (0..DEPTH)
        .map(|_| AlignedBuf::zeroed(BLOCK as usize, DIRECT_ALIGN))
        .collect();
    let mut done: Vec<IoCompletion> = Vec::with_capacity(DEPTH);
    let (mut issued, mut finished) = (0u64, 0u64);
    let started = Instant::now();
    while finished < ops {
        while issued < ops && engine.in_flight() < DEPTH {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            let offset_bytes = (*seed % (FILE_BYTES / u64::from(BLOCK))) * u64::from(BLOCK);
            let buf = bufs.pop().expect("one buffer per slot");
            let request = IoRequest {
                tag: issued,
                kind,
                offset_bytes,
                len_bytes: BLOCK,
                buf: Some(buf),
            };
            engine
                .submit(request)
                .map_err(|(err, _)| err)
                .expect("submit");
            issued += 1;
        }
        engine.complete(1, &mut done).expect("complete");
        for completion in done.drain(..) {
            completion.result.expect("io");
            bufs.push(completion.buf.expect("buffer back"));
            finished += 1;
        }
    }
    started.elapsed()
}

fn bench_engines(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-io-")
        .tempdir_in("/var/tmp")
        .expect("tempdir");
    let path = dir.path().join("bench.img");
    std::fs::write(&path, vec![0x5a; FILE_BYTES as usize]).expect("fill");
    let file = Arc::new(DirectFile::open(&path, true).expect("open"));
    let mut kinds = vec![EngineKind::Sync];
    match probe_uring() {
        Ok(()) => kinds.push(EngineKind::Uring),
        Err(err) => eprintln!("skipped io_uring engine: {err}"),
    }
    let mut group = c.benchmark_group("io_engine_4k_qd32");
    group.throughput(Throughput::Elements(1));
    group.sample_size(10);
    for engine_kind in kinds {
        let mut engine =
            open_engine(engine_kind, file.clone(), DEPTH as u32, None).expect("engine");
        for (name, kind) in [
            ("randwrite", IoKind::Write { fua: false }),
            ("randread", IoKind::Read),
        ] {
            let mut seed = 0x9e37_79b9_7f4a_7c15u64;
            group.bench_function(format!("{engine_kind:?}/{name}"), |b| {
                b.iter_custom(|iters| run(engine.as_mut(), kind, iters, &mut seed))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_engines);
criterion_main!(benches);
