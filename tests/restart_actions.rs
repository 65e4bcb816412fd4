//! The restart actions of the commit protocol (`journal::commit::restart`, the table the
//! simulation checks) carried out by real agents, for the two aborted cases: a source whose
//! job was aborted while its destination was down tells the destination to drop its image
//! when it restarts, and a destination that restarts with the image of an aborted target
//! still on disk removes it. (Forward, hold-and-ask, serve-and-resume and serve are exercised
//! by `tests/journal_recovery.rs` and the fault soak.)
//!
//! How this proves no acknowledged write is lost: an abort happens only before the commit,
//! while the source is authoritative; the test checks the source still serves the guest's
//! data from its own image after both restarts (qemu-io reads the prefilled pattern).

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::pair::{pair, prefill, slow_migration, MIB};
use common::{require, run_ok, sparse_image, stdout};

/// Waits up to `timeout` for `done`.
fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    done()
}

// Goal: both `Aborted` restart actions happen with real agents. Method: a 64 MiB disk
// (48 MiB of data) migrated at 8 MiB/s; kill -9 the destination after 3 s (its image holds
// part of the disk); `ferry abort` at the source (journaled; the destination cannot be told);
// restart the source, then the destination: the source's restart tells it, and its image
// disappears. Then stop the destination, put a file back where the image was (as if the
// agent had stopped between `TargetAborted` and the removal), start it: the file is gone.
// The source serves its data throughout.
#[test]
fn aborted_jobs_are_carried_out_at_restart() {
    require("nbdcopy");
    let dir = common::scratch_dir();
    let image = dir.path().join("vm1.img");
    sparse_image(&image, 64 * MIB);
    prefill(&image, 48 * MIB);
    let mut pair = pair(&image, "64K");
    let target_image = pair.destination.state_dir.join("images").join("vm1.img");

    let child = slow_migration(&pair, "vm1", "ab");
    std::thread::sleep(Duration::from_millis(3000));
    pair.destination.kill();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success(), "the migration should have failed");
    assert!(
        target_image.exists(),
        "the destination kept no partial image"
    );

    let aborted = pair.source.cli(&["abort", "ab", "--json"]);
    let text = stdout(&aborted);
    assert!(
        text.contains("not told"),
        "the destination is down, so it cannot have been told: {text}\n{}",
        String::from_utf8_lossy(&aborted.stderr)
    );
    assert!(pair.source.stop(), "source stop\n{}", pair.source.log());
    pair.restart_source();
    pair.restart_destination();
    assert!(
        eventually(Duration::from_secs(30), || !target_image.exists()),
        "the source's restart did not make the destination drop its image\nsource:\n{}\n\
         destination:\n{}",
        pair.source.log(),
        pair.destination.log()
    );

    assert!(pair.destination.stop(), "{}", pair.destination.log());
    std::fs::write(&target_image, b"left over by an unclean stop").unwrap();
    pair.restart_destination();
    assert!(
        eventually(Duration::from_secs(10), || !target_image.exists()),
        "the destination kept an aborted target's image\n{}",
        pair.destination.log()
    );
    source_still_serves(&pair.source.uri("vm1"), &image);
}

/// The whole export, read through the source agent with nbdcopy, equals the source image.
fn source_still_serves(uri: &str, image: &Path) {
    let copy = image.with_extension("read-back");
    run_ok(Command::new("nbdcopy").arg(uri).arg(&copy));
    run_ok(Command::new("cmp").arg(image).arg(&copy));
}
