//! Hot path of every NBD request: parsing and validating the 28-byte header, and encoding the
//! reply headers (simple reply, and the OFFSET_DATA header that precedes structured read data).

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry::nbd::wire::{
    encode_offset_data_header, encode_simple_reply, parse_request, validate, ExportInfo,
    RequestHeader, CMD_FLAG_FUA, CMD_WRITE,
};

fn export() -> ExportInfo {
    ExportInfo {
        name: "bench".to_string(),
        description: String::new(),
        size_bytes: 1 << 40,
        read_only: false,
        multi_conn: true,
        can_trim: true,
        can_fast_zero: true,
        block_min: 1,
        block_preferred: 4096,
        block_max: 32 << 20,
        meta_contexts: vec!["base:allocation".to_string()],
    }
}

fn parse_and_validate(c: &mut Criterion) {
    let export = export();
    let bytes = RequestHeader {
        flags: CMD_FLAG_FUA,
        command: CMD_WRITE,
        cookie: 42,
        offset_bytes: 1 << 30,
        length_bytes: 4096,
    }
    .to_bytes();
    let mut group = c.benchmark_group("nbd_wire");
    group.throughput(Throughput::Elements(1));
    group.bench_function("parse_request+validate", |b| {
        b.iter(|| {
            let header = parse_request(black_box(&bytes)).expect("valid request");
            validate(&header, black_box(&export), true).expect("accepted")
        });
    });
    group.finish();
}

fn encode_replies(c: &mut Criterion) {
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut group = c.benchmark_group("nbd_wire");
    group.throughput(Throughput::Elements(1));
    group.bench_function("encode_simple_reply", |b| {
        b.iter(|| {
            out.clear();
            encode_simple_reply(&mut out, black_box(7), black_box(0));
            black_box(out.len())
        });
    });
    group.bench_function("encode_offset_data_header", |b| {
        b.iter(|| {
            out.clear();
            encode_offset_data_header(&mut out, black_box(7), black_box(1 << 30), 4096, true);
            black_box(out.len())
        });
    });
    group.finish();
}

criterion_group!(benches, parse_and_validate, encode_replies);
criterion_main!(benches);
