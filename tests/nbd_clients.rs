//! The NBD server driven by clients nobody here wrote: qemu-io, qemu-img, nbdinfo, nbdcopy and
//! fio's nbd engine, each against a real `ferry agent` process.
//!
//! How these prove that no acknowledged write is lost: every client checks what it wrote by
//! reading it back through a fresh connection (qemu-io `-P`, fio `--verify`), or the image is
//! compared byte for byte against a reference file that received the same writes.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use ferry::prng::SplitMix64 as Prng;
use std::process::Command;

use common::{require, run_ok, sparse_image, stdout, AgentProc};

const MIB: u64 = 1 << 20;

fn qemu_io(uri: &str, commands: &[String]) -> String {
    require("qemu-io");
    let mut cmd = Command::new("qemu-io");
    cmd.arg("-f").arg("raw");
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(uri);
    let out = stdout(&run_ok(&mut cmd));
    assert!(!out.contains("Pattern verification failed"), "{out}");
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

/// Offsets and lengths that cover aligned, unaligned, sub-sector, block-straddling and large
/// requests; the ranges do not overlap.
fn shapes() -> Vec<(u64, u64)> {
    vec![
        (0, 4096),
        (4096, 512),
        (5000, 1),
        (8191, 2),
        (12_288, 65_536),
        (100_000, 12_345),
        (MIB, MIB),
        (3 * MIB + 17, 300_000),
        (5 * MIB, 4 * MIB),
        (16 * MIB - 4096, 4096),
    ]
}

// Goal: data written through ferry at many offsets and sizes reads back exactly, through the
// same and through a new connection. Method: qemu-io writes a distinct pattern per range, then
// a second qemu-io process verifies every range with `read -P`.
#[test]
fn qemu_io_patterns_aligned_and_not() {
    let dir = common::scratch_dir();
    let image = dir.path().join("disk.img");
    sparse_image(&image, 16 * MIB);
    let agent = AgentProc::start(&[format!("vm1={}", image.display())], &[]);
    let uri = agent.uri("vm1");
    let writes: Vec<String> = shapes()
        .iter()
        .enumerate()
        .map(|(i, (off, len))| format!("write -P {} {off} {len}", i + 1))
        .collect();
    qemu_io(&uri, &writes);
    let reads: Vec<String> = shapes()
        .iter()
        .enumerate()
        .map(|(i, (off, len))| format!("read -P {} {off} {len}", i + 1))
        .collect();
    let out = qemu_io(&uri, &reads);
    assert_eq!(out.matches("read ").count(), shapes().len(), "{out}");
    // Zeroes and discards read back as zeros.
    qemu_io(
        &uri,
        &[
            "write -z 12288 65536".into(),
            "discard 1048576 1048576".into(),
        ],
    );
    qemu_io(
        &uri,
        &[
            "read -P 0 12288 65536".into(),
            "read -P 0 1048576 1048576".into(),
        ],
    );
    qemu_io(
        &uri,
        &["read -P 1 0 4096".into(), "read -P 10 16773120 4096".into()],
    );
}

// Goal: after a random workload of writes, zeroes and discards (aligned or not), the export
// holds exactly what a plain file given the same commands holds. Method: the same qemu-io
// command list runs against ferry and against a reference raw file; qemu-img compare checks
// the export (over NBD) and then the image file itself after a clean stop.
#[test]
fn qemu_img_compare_after_random_workload() {
    require("qemu-img");
    let dir = common::scratch_dir();
    let image = dir.path().join("disk.img");
    let reference = dir.path().join("ref.img");
    sparse_image(&image, 32 * MIB);
    sparse_image(&reference, 32 * MIB);
    let mut agent = AgentProc::start(&[format!("vm1={},tracker=t", image.display())], &[]);
    let mut prng = Prng::new(42);
    let mut commands = Vec::new();
    for _ in 0..300 {
        let off = prng.below(32 * MIB - 256 * 1024);
        let off = if prng.below(2) == 0 { off & !4095 } else { off };
        let len = prng.below(256 * 1024) + 1;
        commands.push(match prng.below(10) {
            0 => format!("write -z {off} {len}"),
            1 => format!("discard {off} {len}"),
            _ => format!("write -P {} {off} {len}", prng.below(255) + 1),
        });
    }
    commands.push("flush".into());
    for chunk in commands.chunks(100) {
        qemu_io(&agent.uri("vm1"), chunk);
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for c in chunk {
            cmd.arg("-c").arg(c);
        }
        run_ok(cmd.arg(&reference));
    }
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&reference)
            .arg(agent.uri("vm1")),
    );
    assert!(agent.stop(), "clean stop:\n{}", agent.log());
    run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&reference)
            .arg(&image),
    );
}

fn nbdinfo_json(args: &[&str], uri: &str) -> serde_json::Value {
    require("nbdinfo");
    let out = run_ok(Command::new("nbdinfo").args(args).arg("--json").arg(uri));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo json: {e}: {}", stdout(&out)))
}

/// `(offset, length, type)` of each extent of a `--map` listing.
fn map_extents(context: &str, uri: &str) -> Vec<(u64, u64, u64)> {
    let value = nbdinfo_json(&[&format!("--map={context}")], uri);
    value
        .as_array()
        .expect("map is an array")
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["type"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The ranges of a map whose type has `bit` set (adjacent extents merged).
fn ranges_with(extents: &[(u64, u64, u64)], bit: u64, set: bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(off, len, ty) in extents {
        if (ty & bit != 0) == set {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == off => last.1 += len,
                _ => out.push((off, len)),
            }
        }
    }
    out
}

// Goal: nbdinfo sees the size, flags and metadata contexts ferry advertises, base:allocation
// follows the sparse image, and a dirty bitmap lists exactly the blocks written since its
// tracker was created. Method: nbdinfo --json for the export; writes at known offsets before
// and after `ferry tracker add`; --map of both contexts.
#[test]
fn nbdinfo_size_flags_contexts_and_maps() {
    let dir = common::scratch_dir();
    let image = dir.path().join("disk.img");
    sparse_image(&image, 64 * MIB);
    let agent = AgentProc::start(&[format!("vm1={},tracker=boot", image.display())], &[]);
    let uri = agent.uri("vm1");
    qemu_io(
        &uri,
        &[
            format!("write -P 9 0 {}", MIB),
            format!("write -P 9 {} 4096", 40 * MIB),
        ],
    );
    let added = agent.cli(&["tracker", "add", "vm1", "later"]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    qemu_io(
        &uri,
        &[
            format!("write -P 5 {} 100", 10 * MIB + 70_000),
            format!("write -P 5 {} 65536", 20 * MIB),
        ],
    );

    let info = nbdinfo_json(&["--content"], &uri);
    let export = &info["exports"][0];
    assert_eq!(export["export-size"].as_u64(), Some(64 * MIB), "{info}");
    assert_eq!(export["is_read_only"].as_bool(), Some(false), "{info}");
    assert_eq!(export["can_multi_conn"].as_bool(), Some(true), "{info}");
    assert_eq!(export["can_trim"].as_bool(), Some(true), "{info}");
    assert_eq!(export["can_flush"].as_bool(), Some(true), "{info}");
    assert_eq!(export["can_fua"].as_bool(), Some(true), "{info}");
    assert_eq!(export["can_zero"].as_bool(), Some(true), "{info}");
    assert_eq!(
        export["block_size_preferred"].as_u64(),
        Some(4096),
        "{info}"
    );
    let contexts: Vec<&str> = export["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .filter_map(|c| c.as_str())
        .collect();
    for want in [
        "base:allocation",
        "qemu:dirty-bitmap:boot",
        "qemu:dirty-bitmap:later",
    ] {
        assert!(contexts.contains(&want), "{want} missing from {contexts:?}");
    }

    // base:allocation: bit 0 = hole. Data where written (file systems allocate whole blocks).
    let alloc = map_extents("base:allocation", &uri);
    let data = ranges_with(&alloc, 1, false);
    assert_eq!(data.first().map(|r| r.0), Some(0), "{alloc:?}");
    assert!(
        data.iter()
            .any(|r| r.0 <= 40 * MIB && r.0 + r.1 >= 40 * MIB + 4096),
        "{alloc:?}"
    );
    let total_data: u64 = data.iter().map(|r| r.1).sum();
    assert!(
        total_data < 4 * MIB,
        "a sparse image maps mostly holes: {alloc:?}"
    );

    // The dirty bitmaps at 64 KiB granularity.
    let block = 65_536;
    let boot = ranges_with(&map_extents("qemu:dirty-bitmap:boot", &uri), 1, true);
    assert_eq!(
        boot,
        vec![
            (0, MIB),
            (10 * MIB + block, block),
            (20 * MIB, block),
            (40 * MIB, block)
        ],
        "boot tracker sees every write"
    );
    let later = ranges_with(&map_extents("qemu:dirty-bitmap:later", &uri), 1, true);
    assert_eq!(
        later,
        vec![(10 * MIB + block, block), (20 * MIB, block)],
        "only writes after it"
    );
}

// Goal: nbdcopy moves a whole disk into and out of ferry over several connections (MULTI_CONN)
// without changing a byte. Method: random source file -> ferry with 4 connections, then
// ferry -> a new file with 4 connections; cmp all three.
#[test]
fn nbdcopy_both_ways_multi_conn() {
    require("nbdcopy");
    let dir = common::scratch_dir();
    let source = dir.path().join("source.img");
    let image = dir.path().join("disk.img");
    let back = dir.path().join("back.img");
    let mut prng = Prng::new(7);
    let mut bytes = vec![0u8; (48 * MIB) as usize];
    for chunk in bytes.chunks_mut(8) {
        chunk.copy_from_slice(&prng.next_u64().to_le_bytes());
    }
    bytes[(20 * MIB) as usize..(30 * MIB) as usize].fill(0); // a zero run nbdcopy may skip
    std::fs::write(&source, &bytes).unwrap();
    sparse_image(&image, 48 * MIB);
    let agent = AgentProc::start(&[format!("vm1={}", image.display())], &[]);
    let uri = agent.uri("vm1");
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4", "--requests=16"])
            .arg(&source)
            .arg(&uri),
    );
    run_ok(
        Command::new("nbdcopy")
            .args(["--connections=4"])
            .arg(&uri)
            .arg(&back),
    );
    run_ok(Command::new("cmp").arg(&source).arg(&back));
    run_ok(Command::new("cmp").arg(&source).arg(&image));
}

fn fio(uri: &str, extra: &[&str]) -> String {
    require("fio");
    let out = run_ok(
        Command::new("fio")
            .args([
                "--name=ferry",
                "--ioengine=nbd",
                "--output-format=normal",
                "--verify_state_save=0",
            ])
            .arg(format!("--uri={uri}"))
            .args(extra),
    );
    let text = stdout(&out);
    assert!(!text.contains("verify: bad"), "{text}");
    text
}

// Goal: fio's nbd engine writes at queue depth 32 and its crc32c verification passes, with
// one and with four connections. Method: randwrite with --verify=crc32c (fio verifies after
// writing), then four jobs on disjoint quarters at once.
#[test]
fn fio_verify_crc32c() {
    let dir = common::scratch_dir();
    let image = dir.path().join("disk.img");
    sparse_image(&image, 64 * MIB);
    let agent = AgentProc::start(&[format!("vm1={},tracker=t", image.display())], &[]);
    let uri = agent.uri("vm1");
    fio(
        &uri,
        &[
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--size=32M",
            "--verify=crc32c",
            "--do_verify=1",
        ],
    );
    fio(
        &uri,
        &[
            "--rw=randwrite",
            "--bsrange=512-64k",
            "--iodepth=8",
            "--numjobs=4",
            "--size=16M",
            "--offset_increment=16M",
            "--verify=crc32c",
            "--do_verify=1",
            "--group_reporting",
        ],
    );
    fio(&uri, &["--rw=read", "--bs=1M", "--iodepth=8", "--size=64M"]);
}

// Goal: NBD over TCP (off by default) serves the same export as the unix socket. Method: an
// agent started with --tcp --tcp-insecure (plaintext; TLS is tests/nbd_tls.rs); qemu-io writes over nbd://127.0.0.1:PORT/vm1 and reads the
// pattern back over the unix socket; nbdinfo lists both exports over TCP.
#[test]
fn tcp_listener_serves_the_same_exports() {
    let dir = common::scratch_dir();
    let image = dir.path().join("disk.img");
    let other = dir.path().join("other.img");
    sparse_image(&image, 8 * MIB);
    sparse_image(&other, 4 * MIB);
    let agent = AgentProc::start(
        &[
            format!("vm1={}", image.display()),
            format!("vm2={},ro", other.display()),
        ],
        &["--tcp", "--tcp-insecure"],
    );
    let tcp = agent.tcp.clone().expect("tcp address");
    qemu_io(
        &format!("nbd://{tcp}/vm1"),
        &["write -P 0x5a 4096 65536".into()],
    );
    qemu_io(&agent.uri("vm1"), &["read -P 0x5a 4096 65536".into()]);
    let list = stdout(&run_ok(
        Command::new("nbdinfo")
            .arg("--list")
            .arg(format!("nbd://{tcp}")),
    ));
    assert!(list.contains("vm1") && list.contains("vm2"), "{list}");
}
