//! The destination's file safety, at the [`TargetHost`] level: a real [`Targets`] with a real
//! journal and exports in a temp dir under /var/tmp (O_DIRECT), driven as a keyed peer's
//! `Open` drives it. Each refused Open must leave every file and the journal as they were.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::*;
use crate::agent::config::ExportConfig;
use crate::env::MonotonicClock;

const SIZE_BYTES: u64 = 1 << 20;

struct Site {
    dir: tempfile::TempDir,
    image_dir: PathBuf,
    exports: Arc<Exports>,
    targets: Targets,
    epochs: Arc<Fencing>,
}

impl Site {
    /// An agent's targets; `image_dir` not created yet.
    fn new() -> Site {
        let dir = tempfile::Builder::new().tempdir_in("/var/tmp").unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let journal = SharedJournal::open(&state).unwrap();
        let clock = Arc::new(MonotonicClock::new());
        let exports = Arc::new(Exports::new(&state, clock, 30_000, BTreeMap::new()));
        let image_dir = dir.path().join("images");
        let epochs = Arc::new(Fencing::load(&state).unwrap());
        let targets = Targets::new(
            exports.clone(),
            image_dir.clone(),
            None,
            journal,
            Arc::clone(&epochs),
        );
        Site {
            dir,
            image_dir,
            exports,
            targets,
            epochs,
        }
    }

    fn journal_len(&self) -> u64 {
        let path = self
            .dir
            .path()
            .join("state")
            .join(crate::journal::shared::FILE_NAME);
        std::fs::metadata(path).map_or(0, |meta| meta.len())
    }

    fn serve(&self, name: &str, path: &Path) {
        let config = ExportConfig {
            name: name.into(),
            path: path.to_path_buf(),
            read_only: false,
            granularity_bytes: 64 << 10,
            trackers: Vec::new(),
            durable_trackers: Vec::new(),
            forward_hold_ms: None,
        };
        self.exports.open(&config).unwrap();
    }

    /// Opens `spec` as a stream would, expecting a refusal: returns what the peer is told,
    /// after checking the journal did not grow.
    fn refused(&self, spec: &TargetSpec) -> String {
        let before = self.journal_len();
        let err = self
            .targets
            .create_target(spec, "127.0.0.1:9")
            .expect_err("the Open must be refused");
        assert_eq!(self.journal_len(), before, "a refused Open was journaled");
        let told = err.peer_reason();
        let local = self.dir.path().to_string_lossy().into_owned();
        assert!(!told.contains(&local), "the peer was told a path: {told}");
        assert!(!told.contains(&SIZE_BYTES.to_string()), "{told}");
        told
    }
}

fn spec(export: &str, job_id: u64) -> TargetSpec {
    TargetSpec {
        export: export.into(),
        size_bytes: SIZE_BYTES,
        granularity_bytes: 64 << 10,
        job_id,
        batch: None,
        holder: None,
        seed: None,
        manager_epoch: None,
    }
}

/// The bytes and identity of a file, to show it untouched.
#[derive(Debug, PartialEq, Eq)]
struct Snapshot {
    bytes: Vec<u8>,
    mtime_ns: (i64, i64),
    ino: u64,
}

fn snapshot(path: &Path) -> Snapshot {
    let meta = std::fs::metadata(path).unwrap();
    Snapshot {
        bytes: std::fs::read(path).unwrap(),
        mtime_ns: (meta.mtime(), meta.mtime_nsec()),
        ino: meta.ino(),
    }
}

/// A file of `SIZE_BYTES` that is not zeros.
fn precious(path: &Path) {
    let bytes: Vec<u8> = (0..SIZE_BYTES).map(|i| (i % 251) as u8).collect();
    std::fs::write(path, bytes).unwrap();
}

// Goal: an existing image that no job of this journal created is neither reused (written)
// nor removed, whatever its size, and the refusal is not journaled. Method: a same-size file
// where the Open's image goes, a new job's Open, then the file compared.
#[test]
fn an_existing_unserved_image_is_not_reused() {
    let site = Site::new();
    std::fs::create_dir(&site.image_dir).unwrap();
    let path = site.image_dir.join("vm1.img");
    precious(&path);
    let before = snapshot(&path);
    let told = site.refused(&spec("vm1", 11));
    assert!(told.contains("exists"), "{told}");
    assert_eq!(snapshot(&path), before);
}

// Goal: the image of a served export is never a target, by its export's name or by its file
// name, nor through a hard link (the export's lock). Method: an export "disk1" served from
// image_dir/foo.img; Opens for "disk1", "foo", and a resume of a journaled job whose image
// name is a hard link to the served file.
#[test]
fn a_served_exports_image_is_refused() {
    let site = Site::new();
    std::fs::create_dir(&site.image_dir).unwrap();
    let served = site.image_dir.join("foo.img");
    precious(&served);
    site.serve("disk1", &served);
    let before = snapshot(&served);
    site.refused(&spec("disk1", 12));
    site.refused(&spec("foo", 13));
    // A job journaled as receiving "bar", whose file is now a link to the served image.
    site.targets
        .create_target(&spec("bar", 14), "127.0.0.1:9")
        .unwrap();
    site.targets.end_stream(&spec("bar", 14));
    let bar = site.image_dir.join("bar.img");
    std::fs::remove_file(&bar).unwrap();
    std::fs::hard_link(&served, &bar).unwrap();
    site.refused(&spec("bar", 14));
    assert_eq!(snapshot(&served), before);
}

// Goal: links in image_dir are never followed: a link to a file outside leaves that file as
// it was, a dangling link's target is not created. Method: both links where Opens' images go.
#[test]
fn links_in_the_image_dir_are_not_followed() {
    let site = Site::new();
    std::fs::create_dir(&site.image_dir).unwrap();
    let outside = site.dir.path().join("outside.img");
    precious(&outside);
    let before = snapshot(&outside);
    std::os::unix::fs::symlink(&outside, site.image_dir.join("vm2.img")).unwrap();
    let nowhere = site.dir.path().join("nowhere.img");
    std::os::unix::fs::symlink(&nowhere, site.image_dir.join("vm3.img")).unwrap();
    site.refused(&spec("vm2", 15));
    site.refused(&spec("vm3", 16));
    assert_eq!(snapshot(&outside), before);
    assert!(
        nowhere.symlink_metadata().is_err(),
        "the link's target was created"
    );
}

// Goal: peer-chosen fields out of bounds are refused before anything is journaled or created:
// an absurd granularity (2^62), a name with a slash, job 0. Method: Opens with each.
#[test]
fn absurd_fields_are_refused_before_the_journal() {
    let site = Site::new();
    let mut absurd = spec("vm4", 17);
    absurd.granularity_bytes = 1 << 62;
    assert_eq!(site.refused(&absurd), "invalid granularity");
    let mut slash = spec("vm4", 17);
    slash.export = "../vm4".into();
    site.refused(&slash);
    site.refused(&spec("vm4", 0));
    assert!(!site.image_dir.join("vm4.img").exists());
}

// Goal: a migrated-in image is 0600 in an image_dir created 0700; its own job resumes into
// it (same file), another job is refused, and Abort removes the job's own image. Method: an
// Open, the stream's end, a resume, a foreign job, an Abort.
#[test]
fn a_jobs_own_image_is_private_resumable_and_removed_on_abort() {
    let site = Site::new();
    let target = spec("vm5", 18);
    site.targets.create_target(&target, "127.0.0.1:9").unwrap();
    let path = site.image_dir.join("vm5.img");
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&path), 0o600);
    assert_eq!(mode(&site.image_dir), 0o700);
    // A second stream of the same export while the first is on.
    site.refused(&spec("vm5", 19));
    site.targets.end_stream(&target);
    let ino = std::fs::metadata(&path).unwrap().ino();
    site.targets.create_target(&target, "127.0.0.1:9").unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().ino(), ino, "not resumed");
    site.targets.abort_target(&target);
    site.targets.end_stream(&target);
    assert!(!path.exists(), "the aborted job's image is left");
    // Aborted is final: the job cannot come back to create it again.
    site.refused(&target);
}

// Goal: a deposed manager's job neither opens nor commits a target here, and the epoch a
// job's Open or Commit names is as durable as a command's.
// Method: epoch 5 opens; a command of epoch 7 arrives (the fence's own admit); the job's
// Commit at 5 is refused with both epochs named, and at 7 it commits; a new job's Open at 5
// is refused before anything is journaled; a restarted fence still says 7.
#[test]
fn a_deposed_managers_job_neither_opens_nor_commits() {
    let site = Site::new();
    let target = TargetSpec {
        manager_epoch: Some(5),
        ..spec("vm6", 20)
    };
    site.targets.create_target(&target, "127.0.0.1:9").unwrap();
    drop(site.epochs.admit(7).unwrap());
    let refused = site
        .targets
        .commit_target(&target, Some(5))
        .expect_err("a commit at a deposed epoch");
    let told = refused.peer_reason();
    assert!(
        told.contains("epoch 5") && told.contains("epoch 7"),
        "{told}"
    );
    site.targets.commit_target(&target, Some(7)).unwrap();
    let late = TargetSpec {
        manager_epoch: Some(5),
        ..spec("vm7", 21)
    };
    let told = site.refused(&late);
    assert!(told.contains("older than epoch 7"), "{told}");
    let state = site.dir.path().join("state");
    assert_eq!(Fencing::load(&state).unwrap().highest(), 7);
    // An operator's job (no epoch) is not fenced.
    site.targets
        .create_target(&spec("vm8", 22), "127.0.0.1:9")
        .unwrap();
}
