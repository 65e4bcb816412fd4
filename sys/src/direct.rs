//! Disk images and block devices opened twice: once `O_DIRECT` (for the io_uring data path)
//! and once buffered (for unaligned requests, allocation queries and the sync engine).
//!
//! Invariants: both descriptors refer to the same inode; `O_DIRECT` I/O on the direct fd must
//! be aligned to [`DIRECT_ALIGN`](crate::DIRECT_ALIGN) in offset, length and buffer address
//! (the kernel answers `EINVAL` otherwise). The kernel keeps the two paths coherent: a direct
//! read first writes back dirty cached pages of its range, a direct write invalidates them.
//! Nothing here uses the file position, so sharing a `DirectFile` between threads is safe.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::{blkdev, errno, lock};

/// Zeros written by the `zero_range` fallback, one chunk at a time.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// A regular file or block device open both with `O_DIRECT` and buffered.
#[derive(Debug)]
pub struct DirectFile {
    direct: File,
    buffered: File,
    /// A third open, used only to hold the OFD lock: rings register `direct` and `buffered`,
    /// and a ring of a killed process keeps its registered files open until the kernel's
    /// asynchronous teardown; the lock must not wait for that.
    lock: std::sync::OnceLock<File>,
    path: PathBuf,
    block_device: bool,
    writable: bool,
}

impl DirectFile {
    /// Opens `path` (a regular file or a block device) for reading, and for writing if
    /// `writable`. Fails with `InvalidInput` on other file types and when the filesystem
    /// refuses `O_DIRECT` (tmpfs does).
    pub fn open(path: &Path, writable: bool) -> io::Result<DirectFile> {
        Self::open_flags(path, writable, 0)
    }

    /// Like [`open`](Self::open), but refuses (`ELOOP`) when the last component of `path` is
    /// a symbolic link, for images in a directory where a link could point anywhere.
    pub fn open_no_follow(path: &Path, writable: bool) -> io::Result<DirectFile> {
        Self::open_flags(path, writable, libc::O_NOFOLLOW)
    }

    /// Creates a new regular file at `path` with `mode` and opens it for writing: never over
    /// an existing entry and never through a symbolic link (`O_CREAT | O_EXCL | O_NOFOLLOW`).
    /// The `O_DIRECT` descriptor is checked to be the created file; if it cannot be opened
    /// (tmpfs refuses `O_DIRECT`), the new file is removed again.
    pub fn create_new(path: &Path, mode: u32) -> io::Result<DirectFile> {
        let created = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
            .open(path)?;
        let opened = Self::open_flags(path, true, libc::O_NOFOLLOW).and_then(|file| {
            let (ours, theirs) = (created.metadata()?, file.direct.metadata()?);
            if (ours.dev(), ours.ino()) == (theirs.dev(), theirs.ino()) {
                Ok(file)
            } else {
                Err(io::Error::other(format!(
                    "{} was replaced while it was created",
                    path.display()
                )))
            }
        });
        if opened.is_err() {
            // Ours: created above with O_EXCL. Best effort; the error says what failed.
            let _ = std::fs::remove_file(path);
        }
        opened
    }

    fn open_flags(path: &Path, writable: bool, flags: libc::c_int) -> io::Result<DirectFile> {
        let buffered = open_with(path, writable, flags)?;
        let file_type = buffered.metadata()?.file_type();
        let block_device = file_type.is_block_device();
        if !block_device && !file_type.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} is neither a regular file nor a block device",
                    path.display()
                ),
            ));
        }
        let direct = open_with(path, writable, libc::O_DIRECT | flags).map_err(|err| {
            if err.raw_os_error() == Some(libc::EINVAL) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "the filesystem of {} does not support O_DIRECT",
                        path.display()
                    ),
                )
            } else {
                err
            }
        })?;
        Ok(DirectFile {
            direct,
            buffered,
            lock: std::sync::OnceLock::new(),
            path: path.to_owned(),
            block_device,
            writable,
        })
    }

    /// The path this file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Current size in bytes (`fstat` for regular files, `BLKGETSIZE64` for block devices).
    pub fn size_bytes(&self) -> io::Result<u64> {
        if self.block_device {
            blkdev::size_bytes(self.buffered.as_fd())
        } else {
            Ok(self.buffered.metadata()?.len())
        }
    }

    /// True for a block device, false for a regular file.
    pub fn is_block_device(&self) -> bool {
        self.block_device
    }

    /// True when opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Reads exactly `buf.len()` bytes at `offset_bytes` through the buffered fd;
    /// `UnexpectedEof` if the file ends first.
    pub fn read_at(&self, offset_bytes: u64, buf: &mut [u8]) -> io::Result<()> {
        self.buffered.read_exact_at(buf, offset_bytes)
    }

    /// Writes all of `buf` at `offset_bytes` through the buffered fd.
    pub fn write_at(&self, offset_bytes: u64, buf: &[u8]) -> io::Result<()> {
        self.buffered.write_all_at(buf, offset_bytes)
    }

    /// `fdatasync`: after Ok, every completed write (direct or buffered) is durable.
    pub fn datasync(&self) -> io::Result<()> {
        self.buffered.sync_data()
    }

    /// Deallocates the range (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`); reads of it
    /// return zeros afterwards. `Unsupported` when the filesystem or device cannot.
    pub fn punch_hole(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.fallocate(mode, offset_bytes, len_bytes)
    }

    /// Zeroes the range (`FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE`), falling back to
    /// writing zeros when the filesystem or device does not support it.
    pub fn zero_range(&self, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset_bytes, len_bytes) {
            Err(err) if self.should_write_zeros(&err) => self.write_zeros(offset_bytes, len_bytes),
            other => other,
        }
    }

    /// The first offset >= `offset_bytes` holding data, or None past the last data (`ENXIO`).
    pub fn seek_data(&self, offset_bytes: u64) -> io::Result<Option<u64>> {
        self.seek(offset_bytes, libc::SEEK_DATA)
    }

    /// The first offset >= `offset_bytes` in a hole (the end of file counts as one), or None
    /// when `offset_bytes` is at or past the end (`ENXIO`).
    pub fn seek_hole(&self, offset_bytes: u64) -> io::Result<Option<u64>> {
        self.seek(offset_bytes, libc::SEEK_HOLE)
    }

    /// Takes an OFD lock on the whole file, held until this `DirectFile` is dropped: a write
    /// lock when writable, a read lock when read-only (a read-only fd cannot hold a write
    /// lock; read-only opens may share, but never with a writer). Fails at once with
    /// `WouldBlock`, naming the file and holder, if a conflicting lock is held by another open
    /// (another agent, or another `DirectFile` of this process).
    pub fn lock_exclusive(&self) -> io::Result<()> {
        if self.lock.get().is_some() {
            return Ok(());
        }
        let holder = open_with(&self.path, self.writable, 0)?;
        lock::lock_fd(holder.as_fd(), &self.path, self.writable)?;
        // A concurrent caller may have won the race; its lock is held either way.
        let _ = self.lock.set(holder);
        Ok(())
    }

    /// The `O_DIRECT` descriptor (for registering with a ring).
    pub fn direct_fd(&self) -> BorrowedFd<'_> {
        self.direct.as_fd()
    }

    /// The buffered descriptor.
    pub fn buffered_fd(&self) -> BorrowedFd<'_> {
        self.buffered.as_fd()
    }

    /// The raw `O_DIRECT` descriptor number.
    pub fn direct_raw_fd(&self) -> RawFd {
        self.direct.as_raw_fd()
    }

    /// The raw buffered descriptor number.
    pub fn buffered_raw_fd(&self) -> RawFd {
        self.buffered.as_raw_fd()
    }

    fn fallocate(&self, mode: libc::c_int, offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        if len_bytes == 0 {
            return Ok(());
        }
        let offset = to_off_t(offset_bytes)?;
        let len = to_off_t(len_bytes)?;
        let fd = self.buffered.as_raw_fd();
        // SAFETY: fallocate takes no pointers; `fd` stays open because self owns the File.
        errno::cvt_retry(|| unsafe { libc::fallocate(fd, mode, offset, len) })?;
        Ok(())
    }

    /// `zero_range` writes zeros itself when the kernel cannot zero the range: the filesystem
    /// lacks `ZERO_RANGE`, or a block device refuses a range not aligned to its sectors.
    fn should_write_zeros(&self, err: &io::Error) -> bool {
        match err.raw_os_error() {
            Some(libc::EOPNOTSUPP | libc::ENOSYS) => true,
            Some(libc::EINVAL) => self.block_device,
            _ => false,
        }
    }

    #[cold]
    fn write_zeros(&self, mut offset_bytes: u64, len_bytes: u64) -> io::Result<()> {
        let end_bytes = offset_bytes
            .checked_add(len_bytes)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        while offset_bytes < end_bytes {
            let chunk = usize::try_from(end_bytes - offset_bytes)
                .unwrap_or(usize::MAX)
                .min(ZEROS.len());
            self.buffered.write_all_at(&ZEROS[..chunk], offset_bytes)?;
            offset_bytes += chunk as u64;
        }
        Ok(())
    }

    fn seek(&self, offset_bytes: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let offset = to_off_t(offset_bytes)?;
        let fd = self.buffered.as_raw_fd();
        // SAFETY: lseek takes no pointers; `fd` stays open because self owns the File. The file
        // position it moves is never used (all I/O is positioned).
        match errno::cvt(unsafe { libc::lseek(fd, offset, whence) }) {
            Ok(found) => Ok(Some(found.unsigned_abs())),
            Err(err) if err.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            Err(err) => Err(err),
        }
    }
}

fn open_with(path: &Path, writable: bool, extra_flags: libc::c_int) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(writable)
        .custom_flags(libc::O_CLOEXEC | extra_flags)
        .open(path)
}

fn to_off_t(value: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(value).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_image(name: &str, len_bytes: u64) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ferry-sys-{name}-{}", std::process::id()));
        let file = File::create(&path).expect("create");
        file.set_len(len_bytes).expect("set_len");
        path
    }

    // Goal: buffered read/write, size and sync work on a regular file. Method: round trip.
    #[test]
    fn buffered_round_trip() {
        let path = temp_image("rt", 1 << 20);
        let file = DirectFile::open(&path, true).expect("open");
        assert!(!file.is_block_device());
        assert!(file.is_writable());
        assert_eq!(file.size_bytes().unwrap(), 1 << 20);
        file.write_at(123, b"hello").unwrap();
        file.datasync().unwrap();
        let mut got = [0u8; 5];
        file.read_at(123, &mut got).unwrap();
        assert_eq!(&got, b"hello");
        let mut past = [0u8; 8];
        let err = file.read_at((1 << 20) - 4, &mut past).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        std::fs::remove_file(&path).unwrap();
    }

    // Goal: punch_hole and zero_range read back zeros; seek_data/hole see the hole. Method:
    // fill with 0xAA, deallocate/zero parts, read back, query allocation.
    #[test]
    fn punch_zero_and_seek() {
        let path = temp_image("punch", 1 << 20);
        let file = DirectFile::open(&path, true).expect("open");
        file.write_at(0, &vec![0xAA; 1 << 20]).unwrap();
        file.datasync().unwrap();
        file.punch_hole(65536, 65536).unwrap();
        file.zero_range(300, 1000).unwrap();
        let mut got = vec![0u8; 1 << 20];
        file.read_at(0, &mut got).unwrap();
        assert!(got[65536..131072].iter().all(|&b| b == 0));
        assert!(got[300..1300].iter().all(|&b| b == 0));
        assert_eq!(got[299], 0xAA);
        assert_eq!(got[1300], 0xAA);
        assert_eq!(got[131072], 0xAA);
        assert_eq!(file.seek_data(0).unwrap(), Some(0));
        assert_eq!(file.seek_hole(0).unwrap(), Some(65536));
        assert_eq!(file.seek_data(65536).unwrap(), Some(131072));
        assert_eq!(file.seek_data(1 << 20).unwrap(), None);
        std::fs::remove_file(&path).unwrap();
    }

    // Goal: the OFD lock keeps a second open off the image. Method: two opens, lock both.
    #[test]
    fn lock_exclusive_conflicts() {
        let path = temp_image("lock", 4096);
        let first = DirectFile::open(&path, true).expect("open");
        first.lock_exclusive().expect("first lock");
        let second = DirectFile::open(&path, false).expect("open");
        let err = second.lock_exclusive().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(err.to_string().contains("locked by"), "{err}");
        drop(first);
        second.lock_exclusive().expect("lock after release");
        std::fs::remove_file(&path).unwrap();
    }

    // Goal: open_no_follow refuses a link (ELOOP) and opens the file itself. Method: a link
    // to an image, opened both ways.
    #[test]
    fn open_no_follow_refuses_links() {
        let path = temp_image("nofollow", 4096);
        let link = path.with_extension("link");
        std::os::unix::fs::symlink(&path, &link).unwrap();
        let err = DirectFile::open_no_follow(&link, true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        DirectFile::open_no_follow(&path, true).expect("the file itself");
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    // Goal: create_new makes a 0600 file once, never over an existing file or a link.
    // Method: create in /var/tmp (O_DIRECT works there), again (exists), through a link.
    #[test]
    fn create_new_refuses_existing_files_and_links() {
        use std::os::unix::fs::PermissionsExt;
        let path = PathBuf::from(format!("/var/tmp/ferry-sys-create-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let file = DirectFile::create_new(&path, 0o600).expect("create");
        assert!(file.is_writable());
        assert_eq!(file.size_bytes().unwrap(), 0);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let err = DirectFile::create_new(&path, 0o600).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        let link = path.with_extension("link");
        std::os::unix::fs::symlink(path.with_extension("absent"), &link).unwrap();
        assert!(DirectFile::create_new(&link, 0o600).is_err());
        assert!(!path.with_extension("absent").exists());
        std::fs::remove_file(&link).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    // Goal: directories are refused with a clear error. Method: open the temp dir.
    #[test]
    fn directory_is_refused() {
        let err = DirectFile::open(&std::env::temp_dir(), false).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
