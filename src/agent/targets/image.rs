//! A target image's file, opened and locked safely: reopened for a resume without following
//! a link, OFD-locked (a served export's image holds the lock already, so it is refused), and
//! checked to be the regular file of the job's size that was locked.

use std::fs::File;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use ferry_sys::{DirectFile, OfdLock};

use crate::transfer::TargetError;

/// A target image opened for a stream, and the lock that keeps it the job's own.
pub(super) struct Image {
    pub(super) file: Arc<DirectFile>,
    pub(super) lock: OfdLock,
}

/// Warns when `dir` exists with group or other access: the images in it are guests' disks.
pub(super) fn warn_if_open(dir: &Path) {
    if let Ok(meta) = std::fs::metadata(dir) {
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            log::warn!(
                "image directory {} has mode {mode:o}: migrated-in disks are readable beyond \
                 root's (chmod 700)",
                dir.display()
            );
        }
    }
}

/// Opens the image at `path` for a resume, without following a link: None when it is gone.
pub(super) fn open_existing(path: &Path) -> Result<Option<File>, TargetError> {
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path);
    match opened {
        Ok(file) => Ok(Some(file)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) if err.raw_os_error() == Some(nix::libc::ELOOP) => Err(TargetError::Exists {
            path: path.to_path_buf(),
        }),
        Err(err) => Err(TargetError::io("open", path)(err)),
    }
}

/// Locks `file` (a served export's image is locked already, so it is refused here) and
/// checks it is a regular file of `size_bytes`.
pub(super) fn lock_image(file: File, path: &Path, size_bytes: u64) -> Result<OfdLock, TargetError> {
    let lock = OfdLock::lock_open(file, path).map_err(TargetError::io("lock", path))?;
    let meta = lock
        .file()
        .metadata()
        .map_err(TargetError::io("inspect", path))?;
    if !meta.is_file() {
        return Err(TargetError::Exists {
            path: path.to_path_buf(),
        });
    }
    if meta.len() != size_bytes {
        return Err(TargetError::WrongSize {
            have_bytes: meta.len(),
            want_bytes: size_bytes,
        });
    }
    Ok(lock)
}

/// Opens the locked image for the data path, checking it is still the file locked.
pub(super) fn open_locked(path: &Path, lock: OfdLock) -> Result<Image, TargetError> {
    let file = DirectFile::open_no_follow(path, true).map_err(TargetError::io("open", path))?;
    let same = nix::sys::stat::fstat(file.buffered_raw_fd())
        .ok()
        .zip(lock.file().metadata().ok())
        .is_some_and(|(opened, locked)| {
            opened.st_dev == locked.dev() && opened.st_ino == locked.ino()
        });
    if !same {
        return Err(TargetError::Exists {
            path: path.to_path_buf(),
        });
    }
    Ok(Image {
        file: Arc::new(file),
        lock,
    })
}
