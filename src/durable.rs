//! Durable file replacement: the one place ferry writes a whole file atomically and syncs the
//! directory that names it.
//!
//! [`write_atomic`] writes `<path>.tmp`, fsyncs it, renames it over `path` and fsyncs the
//! directory, so a crash leaves the old file or the new one, never a mix, and a completed call
//! survives power loss. [`sync_dir`] and [`sync_parent`] make a creation, rename or removal
//! durable for callers that manage their own file (the journal keeps its compaction file open
//! and locked across the rename).
//!
//! Invariants:
//! - The temp file is `<path>` + [`TEMP_SUFFIX`] in the same directory (a rename never crosses
//!   file systems). Callers that clean up after a crash look for that name.
//! - Hostile input: a state directory may hold anything, so the temp file is never opened
//!   through an existing entry: a stale one (a crashed write, or a planted symlink) is
//!   unlinked, and the new one is created with `O_CREAT | O_EXCL` (which never follows a
//!   symlink) and mode 0600.
//! - Writers of one path must be serialized by the caller: two concurrent writers would share
//!   the temp name.
//! - Bottom layer: std only, nothing from the rest of the crate.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Suffix appended to a file's path to name its temp file.
pub const TEMP_SUFFIX: &str = ".tmp";

/// Why [`write_atomic`] failed, by step. After `WriteTemp` or `Rename` the old file is intact;
/// after `SyncDir` the new file is in place but may not survive a crash.
#[derive(Debug, Error)]
pub enum DurableError {
    /// Creating, writing or syncing the temp file failed.
    #[error("cannot write temp file {}", path.display())]
    WriteTemp {
        /// The temp file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Renaming the temp file over the destination failed.
    #[error("cannot rename temp file over {}", path.display())]
    Rename {
        /// The destination.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Syncing the directory after the rename failed.
    #[error("cannot sync directory {}", path.display())]
    SyncDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

impl DurableError {
    /// The file or directory the failed step was about.
    pub fn path(&self) -> &Path {
        match self {
            Self::WriteTemp { path, .. }
            | Self::Rename { path, .. }
            | Self::SyncDir { path, .. } => path,
        }
    }

    /// The path and the I/O error, for callers whose errors carry both.
    pub fn into_parts(self) -> (PathBuf, io::Error) {
        match self {
            Self::WriteTemp { path, source }
            | Self::Rename { path, source }
            | Self::SyncDir { path, source } => (path, source),
        }
    }
}

/// The temp file [`write_atomic`] uses for `path`: `<path>.tmp`.
pub fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(TEMP_SUFFIX);
    PathBuf::from(name)
}

/// Replaces `path` with `bytes` atomically and durably; see the module docs.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DurableError> {
    replace_unsynced(path, bytes)?;
    sync_parent(path).map_err(|source| DurableError::SyncDir {
        path: parent_dir(path).to_owned(),
        source,
    })
}

/// [`write_atomic`] without the directory sync: the new file is complete and synced, but its
/// name may not survive a crash until the caller syncs the directory ([`sync_dir`]), once
/// for many files written into it.
pub fn replace_unsynced(path: &Path, bytes: &[u8]) -> Result<(), DurableError> {
    let temp = temp_path(path);
    if let Err(source) = write_temp(&temp, bytes) {
        // Best effort here and below: a leftover is removed by the next write anyway.
        let _ = fs::remove_file(&temp);
        return Err(DurableError::WriteTemp { path: temp, source });
    }
    if let Err(source) = fs::rename(&temp, path) {
        let _ = fs::remove_file(&temp);
        return Err(DurableError::Rename {
            path: path.to_owned(),
            source,
        });
    }
    Ok(())
}

/// Creates `temp` afresh (never through an existing entry), writes `bytes` and fsyncs it.
fn write_temp(temp: &Path, bytes: &[u8]) -> io::Result<()> {
    match fs::remove_file(temp) {
        Ok(()) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(temp)?;
    // The umask can only remove bits; the mode is explicit anyway (secrets go through here).
    file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Creates `path` holding `bytes` (mode 0600) if nothing is there, durably: the bytes go to a
/// private temp name (created with `O_EXCL`), are fsynced, then hard-linked to `path`, which
/// fails with `AlreadyExists` and leaves `path` untouched when another writer was first. So a
/// reader never sees a partial file, and two processes creating the same secret at once agree
/// on one. The temp name carries the pid, so concurrent creators never share it.
pub fn write_new(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = parent_dir(path).join(format!(".{name}.{}{TEMP_SUFFIX}", std::process::id()));
    let linked = write_temp(&temp, bytes).and_then(|()| fs::hard_link(&temp, path));
    // The link (if made) holds the data; the temp name is not needed either way.
    let _ = fs::remove_file(&temp);
    linked?;
    sync_parent(path)
}

/// Fsyncs directory `dir`, so that creations, renames and removals in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Fsyncs the directory holding `path` (`.` for a bare file name).
pub fn sync_parent(path: &Path) -> io::Result<()> {
    sync_dir(parent_dir(path))
}

/// The directory holding `path`; `.` for a bare file name.
fn parent_dir(path: &Path) -> &Path {
    path.parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{symlink, PermissionsExt};

    use super::*;

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temp() {
        // Goal: a write creates or replaces the whole file, mode 0600, and cleans up after
        // itself. Method: write, overwrite with shorter content, read back, list the dir.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.json");
        write_atomic(&path, b"first, longer content").expect("write");
        write_atomic(&path, b"second").expect("overwrite");
        assert_eq!(fs::read(&path).expect("read"), b"second");
        let mode = fs::metadata(&path).expect("metadata").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|entry| entry.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec!["state.json"]);
        assert_eq!(temp_path(&path), dir.path().join("state.json.tmp"));
    }

    #[test]
    fn stale_temp_and_planted_symlink_are_replaced_not_followed() {
        // Goal: a leftover temp file is overwritten from scratch, and a symlink planted at the
        // temp name never redirects the write. Method: leave a long stale temp, then a symlink
        // to a victim file; write; the result is exact and the victim is untouched.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.tracker");
        fs::write(temp_path(&path), b"a stale, much longer temp file").expect("stale");
        write_atomic(&path, b"new").expect("write over stale temp");
        assert_eq!(fs::read(&path).expect("read"), b"new");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep me").expect("victim");
        symlink(&victim, temp_path(&path)).expect("symlink");
        write_atomic(&path, b"newer").expect("write over symlink");
        assert_eq!(fs::read(&path).expect("read"), b"newer");
        assert_eq!(fs::read(&victim).expect("victim"), b"keep me");
        assert!(!fs::symlink_metadata(&path)
            .expect("metadata")
            .file_type()
            .is_symlink());
    }

    #[test]
    fn failures_name_the_step_and_path() {
        // Goal: a failed write says which step failed and about which path, and leaves
        // nothing behind. Method: a missing directory (temp fails); a directory in the way
        // of the destination (rename fails); syncing a missing directory.
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("missing").join("file");
        let err = write_atomic(&missing, b"x").expect_err("no directory");
        assert!(matches!(err, DurableError::WriteTemp { .. }), "{err}");
        assert_eq!(err.path(), temp_path(&missing));
        let in_the_way = dir.path().join("sub");
        fs::create_dir(&in_the_way).expect("mkdir");
        fs::write(in_the_way.join("occupant"), b"x").expect("occupant");
        let err = write_atomic(&in_the_way, b"x").expect_err("a directory is in the way");
        assert!(matches!(err, DurableError::Rename { .. }), "{err}");
        let (path, source) = err.into_parts();
        assert_eq!(path, in_the_way);
        assert_ne!(source.kind(), io::ErrorKind::NotFound);
        assert!(!temp_path(&in_the_way).exists());
        assert!(sync_dir(&dir.path().join("missing")).is_err());
        sync_parent(&in_the_way.join("any")).expect("sync parent");
        assert_eq!(parent_dir(Path::new("bare")), Path::new("."));
    }

    // Goal: write_new creates once, 0600, and never replaces what is there (the second
    // writer gets AlreadyExists and the first file's bytes stay). Method: two calls.
    #[test]
    fn write_new_creates_once() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_new(&path, b"first").unwrap();
        let err = write_new(&path, b"second").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"first");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "temp left behind"
        );
    }
}
