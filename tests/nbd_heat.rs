//! Write heat over NBD (`ferry:heat`, `ferry:heat:NAME`) read by clients nobody here wrote:
//! nbdinfo `--map` and nbdsh (libnbd), after writes through qemu-io against a real agent.
//!
//! The levels in the extent flags are the heat bucket indexes (0 = cold, 1 = one write,
//! 2 = 2-3, 3 = 4-7, 4 = 8-15, ...), per 1 MiB region; see `src/nbd/blockstatus.rs`.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::process::Command;

use common::{require, run_ok, sparse_image, stdout, AgentProc};

const MIB: u64 = 1 << 20;

/// Runs qemu-io commands against `uri`; every one must succeed.
fn qemu_io(uri: &str, commands: &[String]) {
    require("qemu-io");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for c in commands {
        cmd.arg("-c").arg(c);
    }
    let out = stdout(&run_ok(cmd.arg(uri)));
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );
}

/// `(offset, length, type)` of each extent of nbdinfo's `--map` of `context`.
fn map_extents(context: &str, uri: &str) -> Vec<(u64, u64, u64)> {
    require("nbdinfo");
    let out = run_ok(
        Command::new("nbdinfo")
            .arg(format!("--map={context}"))
            .arg("--json")
            .arg(uri),
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("nbdinfo json: {e}: {}", stdout(&out)));
    value
        .as_array()
        .expect("map is an array")
        .iter()
        .map(|e| {
            let field = |name: &str| e[name].as_u64().expect("extent field");
            (field("offset"), field("length"), field("type"))
        })
        .collect()
}

/// An agent serving a sparse `size_bytes` export `vm1` with tracker `boot` (default half-life)
/// and tracker `hot` (30 days: in practice no half-life boundary falls inside the test), and
/// the writes made: region 0 once, region 5 three times, region 10 eight times (heat levels
/// 1, 2 and 4).
fn agent_with_heat(size_bytes: u64) -> AgentProc {
    let dir = common::scratch_dir();
    let image = dir.path().join("disk.img");
    sparse_image(&image, size_bytes);
    let agent = AgentProc::start_in(dir, &[format!("vm1={},tracker=boot", image.display())], &[]);
    let added = agent.cli(&[
        "tracker",
        "add",
        "vm1",
        "hot",
        "--half-life-ms",
        "2592000000",
    ]);
    assert!(
        added.status.success(),
        "{}",
        String::from_utf8_lossy(&added.stderr)
    );
    let mut writes = vec![format!("write -P 1 4096 4096")];
    writes.extend((0..3).map(|i| format!("write -P 2 {} 4096", 5 * MIB + i * 8192)));
    writes.extend((0..8).map(|i| format!("write -P 3 {} 512", 10 * MIB + i * 65_536)));
    qemu_io(&agent.uri("vm1"), &writes);
    agent
}

// Goal: `ferry:heat:NAME` and `ferry:heat` map each 1 MiB region to its heat level, merged,
// covering the whole export. Method: known write counts per region through qemu-io, then
// nbdinfo --map of both contexts (nbdinfo asks again until the export is covered).
#[test]
fn nbdinfo_maps_heat_levels() {
    let agent = agent_with_heat(64 * MIB);
    let uri = agent.uri("vm1");
    let want = vec![
        (0, MIB, 1),
        (MIB, 4 * MIB, 0),
        (5 * MIB, MIB, 2),
        (6 * MIB, 4 * MIB, 0),
        (10 * MIB, MIB, 4),
        (11 * MIB, 53 * MIB, 0),
    ];
    assert_eq!(map_extents("ferry:heat:hot", &uri), want, "one tracker");
    // The boot tracker saw the same writes with a 30 s half-life: at most as hot.
    assert_eq!(map_extents("ferry:heat", &uri), want, "hottest tracker");
    let boot = map_extents("ferry:heat:boot", &uri);
    assert_eq!(boot.iter().map(|e| e.1).sum::<u64>(), 64 * MIB, "{boot:?}");
}

// Goal: the heat contexts are listed under the `ferry:` query, and a BLOCK_STATUS with
// REQ_ONE or a range inside one region gets one extent of the right level, never past the
// request. Method: an nbdsh (libnbd) script: opt_list_meta_context("ferry:"), then
// block_status on ferry:heat:hot.
#[test]
fn nbdsh_lists_heat_contexts_and_honours_req_one() {
    let agent = agent_with_heat(64 * MIB);
    let script = format!(
        r#"
import nbd
uri = {uri:?}
h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
h.clear_meta_contexts()
h.add_meta_context("ferry:")
names = []
h.opt_list_meta_context(lambda name: names.append(name) or 0)
print("LIST", ",".join(sorted(names)))
h.clear_meta_contexts()
h.add_meta_context("ferry:heat:hot")
h.opt_go()
assert h.can_meta_context("ferry:heat:hot")
def ask(offset, length, flags):
    got = []
    def cb(context, off, entries, err):
        got.extend(entries)
        return 0
    h.block_status(length, offset, cb, flags)
    return got
print("ONE", ask(4 << 20, 8 << 20, nbd.CMD_FLAG_REQ_ONE))
print("INSIDE", ask((5 << 20) + 4096, 100, 0))
print("SPAN", ask((10 << 20) - 4096, 8192, 0))
print("ok")
"#,
        uri = agent.uri("vm1")
    );
    let out = stdout(&run_ok(common::nbdsh_command().arg("-c").arg(script)));
    assert!(out.trim_end().ends_with("ok"), "{out}");
    let line = |tag: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(tag))
            .unwrap_or_else(|| panic!("no {tag} in {out}"))
            .trim()
            .to_string()
    };
    assert_eq!(
        line("LIST"),
        "ferry:heat,ferry:heat:boot,ferry:heat:hot",
        "{out}"
    );
    assert_eq!(line("ONE"), "[1048576, 0]", "REQ_ONE: one extent");
    assert_eq!(line("INSIDE"), "[100, 2]", "clipped to the request");
    assert_eq!(line("SPAN"), "[4096, 0, 4096, 4]", "split at the region");
}
