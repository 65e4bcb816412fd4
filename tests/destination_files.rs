//! A keyed peer against a real destination agent: the block stream's `Open` may create only
//! a new image of its own in the image directory. Every attack on other files is refused with
//! the files, the link targets and the journal as they were, and the peer is told no local
//! path; a good migration still lands, its image private (0600).

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use common::pair::{write_key, MIB};
use common::{free_port, scratch_dir, AgentProc};
use ferry::transfer::{ClusterKey, SendOptions, Sender, TargetSpec, TransferError};
use ferry_sys::DirectFile;

fn spec(export: &str, job_id: u64) -> TargetSpec {
    TargetSpec {
        export: export.into(),
        size_bytes: MIB,
        granularity_bytes: 64 << 10,
        job_id,
        batch: None,
        holder: None,
        seed: None,
        manager_epoch: None,
    }
}

/// A file of one MiB that is not zeros.
fn precious(path: &Path) {
    let bytes: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
    std::fs::write(path, bytes).unwrap();
}

/// Bytes, mtime and inode: what "untouched" means.
fn snapshot(path: &Path) -> (Vec<u8>, i64, i64, u64) {
    let meta = std::fs::metadata(path).unwrap();
    let bytes = std::fs::read(path).unwrap();
    (bytes, meta.mtime(), meta.mtime_nsec(), meta.ino())
}

struct Peer {
    addr: SocketAddr,
    key: ClusterKey,
    journal: PathBuf,
    local: String,
}

impl Peer {
    fn journal_len(&self) -> u64 {
        std::fs::metadata(&self.journal).map_or(0, |meta| meta.len())
    }

    /// Opens `spec` and expects the destination to refuse it, without journaling it and
    /// without naming a local path; returns what the peer was told.
    fn refused(&self, spec: &TargetSpec) -> String {
        let before = self.journal_len();
        let err = match Sender::connect(self.addr, &self.key, spec, SendOptions::default()) {
            Ok(_) => panic!("the Open of {spec:?} was accepted"),
            Err(err) => err,
        };
        let told = match &err {
            TransferError::Refused { reason } => reason.clone(),
            TransferError::Remote { message, .. } => message.clone(),
            other => panic!("{spec:?}: expected a refusal, got {other:?}"),
        };
        assert!(
            !told.contains(&self.local),
            "the peer was told a path: {told}"
        );
        assert_eq!(self.journal_len(), before, "the refused Open was journaled");
        told
    }
}

// Goal: each destination file attack of a keyed peer is refused with the files untouched:
// an existing unserved image of the Open's name, the file of an export the agent serves, a
// link in image_dir to a file outside, a dangling link, an absurd granularity (2^62); none
// is journaled and no answer names a local path; then a good Open still works and its image
// is 0600; the image_dir's open mode is warned about. Method: a destination agent serving
// "disk1" from image_dir/foo.img; the crate's Sender with the cluster key as the peer.
#[test]
fn a_keyed_peer_cannot_touch_files_it_did_not_create() {
    let dir = scratch_dir();
    let keys = scratch_dir();
    let key_path = write_key(keys.path());
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    std::fs::set_permissions(&images, std::fs::Permissions::from_mode(0o755)).unwrap();
    let served = images.join("foo.img");
    precious(&served);
    let unserved = images.join("vm1.img");
    precious(&unserved);
    let outside = dir.path().join("outside.img");
    precious(&outside);
    std::os::unix::fs::symlink(&outside, images.join("vm2.img")).unwrap();
    let nowhere = dir.path().join("nowhere.img");
    std::os::unix::fs::symlink(&nowhere, images.join("vm3.img")).unwrap();
    let before: Vec<_> = [&served, &unserved, &outside]
        .iter()
        .map(|path| snapshot(path))
        .collect();

    let transfer = format!("127.0.0.1:{}", free_port());
    let local = dir.path().to_string_lossy().into_owned();
    let agent = AgentProc::start_in(
        dir,
        &[format!("disk1={}", served.display())],
        &[
            "--transfer",
            &transfer,
            "--cluster-key",
            key_path.to_str().unwrap(),
            "--image-dir",
            images.to_str().unwrap(),
        ],
    );
    let peer = Peer {
        addr: transfer.parse().unwrap(),
        key: ClusterKey::load(&key_path).unwrap(),
        journal: agent.state_dir.join("journal"),
        local,
    };

    let told = peer.refused(&spec("vm1", 101));
    assert!(told.contains("exists"), "{told}");
    peer.refused(&spec("foo", 102));
    peer.refused(&spec("disk1", 103));
    peer.refused(&spec("vm2", 104));
    peer.refused(&spec("vm3", 105));
    let mut absurd = spec("vm4", 106);
    absurd.granularity_bytes = 1 << 62;
    peer.refused(&absurd);

    let after: Vec<_> = [&served, &unserved, &outside]
        .iter()
        .map(|path| snapshot(path))
        .collect();
    assert!(before == after, "a file was touched");
    assert!(
        nowhere.symlink_metadata().is_err(),
        "a link's target was made"
    );
    assert!(!images.join("vm4.img").exists());
    let log = agent.log();
    assert!(log.contains("chmod 700"), "no warning on image_dir:\n{log}");

    // A good Open of a new name still lands, private.
    let source = images.parent().unwrap().join("source.img");
    precious(&source);
    let source_file = Arc::new(DirectFile::open(&source, false).unwrap());
    let (mut sender, _) = Sender::connect(
        peer.addr,
        &peer.key,
        &spec("vm5", 107),
        SendOptions::default(),
    )
    .unwrap_or_else(|err| panic!("good Open refused: {err}\n{}", agent.log()));
    sender.send_extents(&source_file, &[(0, MIB)]).unwrap();
    sender.commit(None).unwrap();
    drop(sender);
    let landed = images.join("vm5.img");
    assert_eq!(
        std::fs::read(&landed).unwrap(),
        std::fs::read(&source).unwrap()
    );
    let mode = std::fs::metadata(&landed).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}
