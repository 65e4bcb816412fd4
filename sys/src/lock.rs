//! Open-file-description (OFD) locks: keep a second local process off an image or state file.
//!
//! Invariants: the lock belongs to the open file description, so it is released only when the
//! last descriptor sharing it closes (not by closing some other descriptor of the same file, as
//! classic POSIX locks are), and it conflicts with every other open of the file, even one made
//! by the same process. It protects against a second agent on this host only; it is not a
//! lease across hosts.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::errno;

/// A whole-file write lock request (or, after `F_OFD_GETLK`, the conflicting lock).
fn whole_file_flock(lock_type: libc::c_int) -> libc::flock {
    // SAFETY: `flock` is a plain C struct of integers, for which all-zero bytes are valid.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = i16::try_from(lock_type).expect("lock type fits in i16");
    lock.l_whence = i16::try_from(libc::SEEK_SET).expect("SEEK_SET fits in i16");
    lock
}

/// Takes an OFD lock on the whole file open at `fd`, without waiting: a write lock if
/// `exclusive` (the fd must be open for writing), else a read lock (which still conflicts with
/// any write lock).
///
/// On conflict the error (kind `WouldBlock`) names `what` and, if known, the holder's pid.
pub(crate) fn lock_fd(fd: BorrowedFd<'_>, what: &Path, exclusive: bool) -> io::Result<()> {
    let lock = whole_file_flock(if exclusive {
        libc::F_WRLCK
    } else {
        libc::F_RDLCK
    });
    // SAFETY: F_OFD_SETLK reads one `flock` through the pointer, which points to a live local;
    // `fd` is borrowed, so it stays open during the call.
    let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, std::ptr::from_ref(&lock)) };
    match errno::cvt(ret) {
        Ok(_) => Ok(()),
        Err(err) if matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) => {
            Err(conflict_error(fd, what))
        }
        Err(err) => Err(err),
    }
}

/// Builds the error for a lock held elsewhere, naming the holder when the kernel knows it.
#[cold]
fn conflict_error(fd: BorrowedFd<'_>, what: &Path) -> io::Error {
    let mut probe = whole_file_flock(libc::F_WRLCK);
    // SAFETY: F_OFD_GETLK reads and writes one `flock` through the pointer, which points to a
    // live local; `fd` is borrowed, so it stays open during the call.
    let ret = unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_OFD_GETLK,
            std::ptr::from_mut(&mut probe),
        )
    };
    let holder = match errno::cvt(ret) {
        Ok(_) if probe.l_pid > 0 => format!("process {}", probe.l_pid),
        // OFD locks report pid -1: the holder is some other open of the file.
        _ => "another open file description (another ferry agent?)".to_owned(),
    };
    io::Error::new(
        io::ErrorKind::WouldBlock,
        format!("{} is locked by {holder}", what.display()),
    )
}

/// An exclusive OFD lock on a file, held while this value lives.
#[derive(Debug)]
pub struct OfdLock {
    file: File,
    path: PathBuf,
}

impl OfdLock {
    /// Opens (creating with mode 0600 if missing) `path` and locks it exclusively, without
    /// waiting. Fails with `WouldBlock` naming the file when another open holds the lock.
    pub fn acquire(path: &Path) -> io::Result<OfdLock> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        lock_fd(file.as_fd(), path, true)?;
        Ok(OfdLock {
            file,
            path: path.to_owned(),
        })
    }

    /// Locks `file`, already open for writing at `path` (which only names it in errors),
    /// exclusively without waiting: for a file whose open must not follow links.
    pub fn lock_open(file: File, path: &Path) -> io::Result<OfdLock> {
        lock_fd(file.as_fd(), path, true)?;
        Ok(OfdLock {
            file,
            path: path.to_owned(),
        })
    }

    /// The locked file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The locked file (for reading or writing its contents while holding the lock).
    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a second open of a locked file is refused with an error naming the file, and the
    // lock is free again after the holder drops. Method: two OfdLocks in one process.
    #[test]
    fn second_lock_conflicts_until_release() {
        let path = std::env::temp_dir().join(format!("ferry-sys-lock-{}", std::process::id()));
        let first = OfdLock::acquire(&path).expect("first lock");
        let err = OfdLock::acquire(&path).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(err.to_string().contains(&*path.to_string_lossy()), "{err}");
        assert_eq!(first.path(), path);
        drop(first);
        let again = OfdLock::acquire(&path).expect("lock after release");
        drop(again);
        std::fs::remove_file(&path).expect("cleanup");
    }

    // Goal: a file opened elsewhere locks like one opened here, and conflicts with acquire.
    // Method: lock_open on an open file, then acquire.
    #[test]
    fn lock_open_conflicts_with_acquire() {
        let path = std::env::temp_dir().join(format!("ferry-sys-lock-open-{}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .expect("open");
        let held = OfdLock::lock_open(file, &path).expect("lock");
        assert_eq!(
            OfdLock::acquire(&path).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        drop(held);
        std::fs::remove_file(&path).expect("cleanup");
    }
}
