//! What the destination side of a block stream asks of its agent (the [`TargetHost`]), the
//! checks every host makes on an `Open` before it acts on it, and the one safe way to create
//! a target image.
//!
//! Invariants:
//! - A [`TargetSpec`] from the network is checked with [`validate_spec`] before a host records
//!   or creates anything for it: the name follows the name rule, the granularity is one the
//!   trackers accept, the size and block count are bounded, the job id is not 0.
//! - A peer is told [`TargetError::peer_reason`] only: a short text that never names a local
//!   path, an image's size or the free space (the `Display` with those details goes to the
//!   local log).
//! - [`create_sparse_target`] never follows a symbolic link and never opens a file that was
//!   there before: `O_CREAT|O_EXCL|O_NOFOLLOW`, mode 0600.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_sys::DirectFile;

use super::frame::{Repoint, RepointOutcome, TargetSpec, TargetState, MAX_BLOCKS};
use crate::dirty::DirtySet;

/// Largest disk a target may have: file offsets are `i64`.
pub const MAX_TARGET_BYTES: u64 = i64::MAX as u64;

/// Mode of a target image the agent creates: the disk of a guest is for root only.
pub const IMAGE_MODE: u32 = 0o600;

/// Why a host refused to create or commit a target. Its `Display` (with its sources) is for
/// the local log; the source is told [`TargetError::peer_reason`].
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The host will not take this target now (busy, wrong state, already served). The text
    /// is told to the peer as it is: it names no local path, size or free space.
    #[error("{0}")]
    Refused(String),
    /// A field the source chose is out of bounds.
    #[error("invalid {field} in the target spec")]
    Invalid {
        /// Which field.
        field: &'static str,
    },
    /// A file this job did not create is where the target image goes (or a link is).
    #[error("{} exists and is not this job's image", path.display())]
    Exists {
        /// The file.
        path: PathBuf,
    },
    /// The file system lacks room for the disk.
    #[error("not enough space: {need_bytes} bytes needed, {free_bytes} available")]
    NoSpace {
        /// The disk's size.
        need_bytes: u64,
        /// What is available to this process.
        free_bytes: u64,
    },
    /// An image of another size sits where the target goes.
    #[error(
        "wrong size: the image there holds {have_bytes} bytes, the source disk has {want_bytes}"
    )]
    WrongSize {
        /// The existing image's size.
        have_bytes: u64,
        /// The source disk's size.
        want_bytes: u64,
    },
    /// The image or its directory could not be created, sized, opened or locked.
    #[error("cannot {action} the target image {}", path.display())]
    Io {
        /// What failed.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The host's journal could not record the step, so it was not taken.
    #[error("the destination cannot record it")]
    Journal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl TargetError {
    /// An I/O failure of `action` on `path`.
    pub fn io(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TargetError {
        let path = path.to_path_buf();
        move |source| TargetError::Io {
            action,
            path,
            source,
        }
    }

    /// What the peer is told: short, without local paths, sizes or free space.
    pub fn peer_reason(&self) -> String {
        match self {
            TargetError::Refused(reason) => reason.clone(),
            TargetError::Invalid { field } => format!("invalid {field}"),
            TargetError::Exists { .. } => "an image of that name exists here".into(),
            TargetError::NoSpace { .. } => "not enough space".into(),
            TargetError::WrongSize { .. } => "the image here has another size".into(),
            TargetError::Io { action, .. } => format!("cannot {action} the target image"),
            TargetError::Journal(_) => "the destination cannot record it".into(),
        }
    }
}

/// What the agent provides to streams: target creation and commitment.
pub trait TargetHost: Send + Sync {
    /// Creates (or, for the same job on resume, reopens) the target image for `spec`, of
    /// `spec.size_bytes`, sparse. Refuses with a reason when `spec` is out of bounds
    /// ([`validate_spec`]), an export of that name is already served, a file the job did not
    /// create is where the image goes, or the disk lacks space ([`check_free_space`]); a
    /// refusal records nothing. `source` is the peer's address as this agent sees it.
    fn create_target(
        &self,
        spec: &TargetSpec,
        source: &str,
    ) -> Result<Arc<DirectFile>, TargetError>;
    /// Makes the target authoritative: start serving it. Called after an fdatasync.
    /// `manager_epoch` is the Commit's (see [`TargetSpec::manager_epoch`]): a host refuses
    /// an epoch older than the highest it has seen, as it does at `create_target`.
    fn commit_target(
        &self,
        spec: &TargetSpec,
        manager_epoch: Option<u64>,
    ) -> Result<(), TargetError>;
    /// Drops the target (the source asked to abort).
    fn abort_target(&self, spec: &TargetSpec);
    /// Where this agent serves NBD over TCP, told to sources for forwarding.
    fn nbd_tcp(&self) -> Option<String>;
    /// Blocks durably received so far (called after each Sync's fdatasync): the host may
    /// record them, so a resumed migration sends only what is missing.
    fn checkpoint(&self, spec: &TargetSpec, received: &DirtySet);
    /// The job's state here and the blocks durably received; with `finalize`, a job not
    /// committed is made uncommittable before the answer (see [`Frame::Query`]).
    ///
    /// [`Frame::Query`]: super::Frame::Query
    fn query(&self, job_id: u64, finalize: bool) -> (TargetState, u64);
    /// The stream that `create_target` accepted has ended and every write it submitted
    /// has completed: another stream may fill the target now.
    fn end_stream(&self, spec: &TargetSpec);
    /// This agent holds the guest's connection to a disk it forwards, which has moved on:
    /// forward to the new holder of the disk (durably, before answering), unless a newer
    /// move already did or it no longer forwards that disk under that job.
    fn repoint(&self, repoint: &Repoint) -> Result<RepointOutcome, TargetError>;
    /// `spec` as this host knows the job (a seeded job may be imported under another export
    /// name); refuses a seeded Open it cannot continue. Called before every other check.
    fn resolve_spec(&self, spec: TargetSpec) -> Result<TargetSpec, TargetError> {
        match spec.seed {
            None => Ok(spec),
            Some(_) => Err(TargetError::Refused(
                "this destination keeps no seeds".into(),
            )),
        }
    }
    /// Records an in-sync point of a seeded target (called after an fdatasync): the image
    /// equals the source's at `at_unix_ms`. A host without seeds refuses.
    fn mark_in_sync(&self, spec: &TargetSpec, at_unix_ms: u64) -> Result<(), TargetError> {
        let _ = at_unix_ms;
        Err(TargetError::Refused(format!(
            "export '{}' is not a seeded target here",
            spec.export
        )))
    }
    /// Whether the seeded image `create_target` just opened was written outside ferry since
    /// ferry last left it (the source then compares digests). False for unseeded targets.
    fn changed_outside(&self, spec: &TargetSpec) -> bool {
        let _ = spec;
        false
    }
}

/// Checks every field of an `Open` the source chose, before anything is recorded or created.
pub fn validate_spec(spec: &TargetSpec) -> Result<(), TargetError> {
    let invalid = |field| Err(TargetError::Invalid { field });
    if crate::name::validate(&spec.export).is_err() {
        return invalid("export name");
    }
    if spec
        .batch
        .as_deref()
        .is_some_and(|batch| crate::name::validate(batch).is_err())
    {
        return invalid("batch name");
    }
    if crate::dirty::validate_granularity(spec.granularity_bytes).is_err() {
        return invalid("granularity");
    }
    if spec.size_bytes == 0
        || spec.size_bytes > MAX_TARGET_BYTES
        || spec.size_bytes.div_ceil(spec.granularity_bytes) > MAX_BLOCKS
    {
        return invalid("size");
    }
    if spec.job_id == 0 {
        return invalid("job id");
    }
    if spec
        .holder
        .as_ref()
        .is_some_and(|holder| holder.addr.is_empty() || holder.moves == 0)
    {
        return invalid("holder");
    }
    Ok(())
}

/// Refuses when the filesystem holding `dir` has fewer than `need_bytes` available.
pub fn check_free_space(dir: &Path, need_bytes: u64) -> Result<(), TargetError> {
    let stat = nix::sys::statvfs::statvfs(dir)
        .map_err(|errno| TargetError::io("inspect the file system of", dir)(errno.into()))?;
    let free_bytes = stat.blocks_available().saturating_mul(stat.fragment_size());
    if free_bytes < need_bytes {
        return Err(TargetError::NoSpace {
            need_bytes,
            free_bytes,
        });
    }
    Ok(())
}

/// Creates a new file at `path`, mode 0600: never over an existing file and never through a
/// symbolic link (a dangling link's target is not created either).
pub fn create_image_file(path: &Path) -> Result<std::fs::File, TargetError> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(IMAGE_MODE)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
        .map_err(|source| match source.kind() {
            std::io::ErrorKind::AlreadyExists => TargetError::Exists {
                path: path.to_path_buf(),
            },
            _ => TargetError::io("create", path)(source),
        })
}

/// Creates a new sparse image of `size_bytes` at `path` (refusing an existing file, a link or
/// too little space), opens it O_DIRECT and locks it.
pub fn create_sparse_target(path: &Path, size_bytes: u64) -> Result<Arc<DirectFile>, TargetError> {
    let dir = path.parent().filter(|dir| !dir.as_os_str().is_empty());
    check_free_space(dir.unwrap_or(Path::new(".")), size_bytes)?;
    let file = create_image_file(path)?;
    file.set_len(size_bytes)
        .map_err(TargetError::io("size", path))?;
    drop(file);
    let image = DirectFile::open_no_follow(path, true).map_err(TargetError::io("open", path))?;
    image
        .lock_exclusive()
        .map_err(TargetError::io("lock", path))?;
    Ok(Arc::new(image))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::Holder;

    fn spec() -> TargetSpec {
        TargetSpec {
            export: "vm1".into(),
            size_bytes: 1 << 20,
            granularity_bytes: 64 << 10,
            job_id: 7,
            batch: Some("b1".into()),
            holder: Some(Holder {
                addr: "10.0.0.1:7000".into(),
                job_id: 3,
                moves: 1,
            }),
            seed: None,
            manager_epoch: None,
        }
    }

    // Goal: every peer-chosen field out of bounds is refused, naming the field and nothing
    // local. Method: one change to a valid spec at a time.
    #[test]
    fn validate_spec_refuses_each_bad_field() {
        validate_spec(&spec()).expect("a valid spec");
        type Change = Box<dyn Fn(&mut TargetSpec)>;
        let cases: Vec<(&str, Change)> = vec![
            ("export name", Box::new(|s| s.export = "../etc".into())),
            ("export name", Box::new(|s| s.export = ".hidden".into())),
            ("batch name", Box::new(|s| s.batch = Some("a/b".into()))),
            ("granularity", Box::new(|s| s.granularity_bytes = 1 << 62)),
            ("granularity", Box::new(|s| s.granularity_bytes = 512)),
            ("granularity", Box::new(|s| s.granularity_bytes = 3 << 12)),
            ("size", Box::new(|s| s.size_bytes = 0)),
            ("size", Box::new(|s| s.size_bytes = u64::MAX)),
            ("job id", Box::new(|s| s.job_id = 0)),
            (
                "holder",
                Box::new(|s| s.holder.as_mut().unwrap().addr.clear()),
            ),
        ];
        for (field, change) in cases {
            let mut bad = spec();
            change(&mut bad);
            match validate_spec(&bad) {
                Err(err @ TargetError::Invalid { field: got }) => {
                    assert_eq!(got, field, "{bad:?}");
                    assert_eq!(err.peer_reason(), format!("invalid {field}"));
                }
                other => panic!("{bad:?}: expected Invalid({field}), got {other:?}"),
            }
        }
    }

    // Goal: what a peer is told names no path, size or free space, while the log line does.
    // Method: each detailed variant, its Display against its peer_reason.
    #[test]
    fn peer_reason_hides_local_details() {
        let path = PathBuf::from("/srv/secret/images/vm1.img");
        let errors = [
            TargetError::Exists { path: path.clone() },
            TargetError::NoSpace {
                need_bytes: 123_456_789,
                free_bytes: 98_765_432,
            },
            TargetError::WrongSize {
                have_bytes: 123_456_789,
                want_bytes: 98_765_432,
            },
            TargetError::io("open", &path)(std::io::Error::other("boom")),
        ];
        for err in errors {
            let told = err.peer_reason();
            for secret in ["/srv", "123456789", "98765432"] {
                assert!(!told.contains(secret), "{told}");
            }
            let logged = crate::error::error_chain(&err);
            assert!(
                logged.contains("/srv") || logged.contains("123456789"),
                "{logged}"
            );
        }
    }

    // Goal: a new image is never made through a link or over a file, and is mode 0600.
    // Method: a dangling link, a link to a file outside, an existing file, a fresh name.
    #[test]
    fn create_image_file_refuses_links_and_existing_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::write(&outside, b"keep").unwrap();
        let to_outside = dir.path().join("a.img");
        std::os::unix::fs::symlink(&outside, &to_outside).unwrap();
        let dangling = dir.path().join("b.img");
        let nowhere = dir.path().join("created-through-link");
        std::os::unix::fs::symlink(&nowhere, &dangling).unwrap();
        let existing = dir.path().join("c.img");
        std::fs::write(&existing, b"old").unwrap();
        for path in [&to_outside, &dangling, &existing] {
            assert!(
                matches!(create_image_file(path), Err(TargetError::Exists { .. })),
                "{}",
                path.display()
            );
        }
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep");
        assert!(nowhere.symlink_metadata().is_err());
        assert_eq!(std::fs::read(&existing).unwrap(), b"old");
        let fresh = dir.path().join("d.img");
        create_image_file(&fresh).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, IMAGE_MODE);
    }
}
