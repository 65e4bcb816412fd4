//! The lease file on disk: its directory and file created safely (`O_NOFOLLOW`, `O_EXCL`,
//! modes 0700 and 0600), its size checked, and whole-sector `O_DIRECT` reads and writes of
//! its two slots (see the invariants in [`super`]).

use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use ferry_sys::{AlignedBuf, DirectFile, DIRECT_ALIGN};

use super::{SlotIo, StoreError, DIR_MODE, FILE_BYTES, FILE_MODE};
use crate::durable;
use crate::lease::record::RECORD_BYTES;

/// The slots of a real lease file, through its `O_DIRECT` descriptor.
#[derive(Debug)]
pub(super) struct DirectSlots {
    pub(super) file: DirectFile,
}

impl SlotIo for DirectSlots {
    fn read_slot(&self, slot: usize, buf: &mut AlignedBuf) -> io::Result<()> {
        read_direct(&self.file, slot_offset_bytes(slot), buf)
    }

    fn write_slot(&self, slot: usize, buf: &AlignedBuf) -> io::Result<()> {
        write_direct(&self.file, slot_offset_bytes(slot), buf)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.datasync()
    }
}

pub(super) fn slot_offset_bytes(slot: usize) -> u64 {
    assert!(slot < 2, "slot {slot}");
    (slot * RECORD_BYTES) as u64
}

/// Creates `dir` (mode [`DIR_MODE`]) if missing, durably; refuses anything but a directory
/// there, a symbolic link included.
pub(super) fn ensure_dir(dir: &Path) -> Result<(), StoreError> {
    let dir_error = |source| StoreError::Dir {
        path: dir.to_owned(),
        source,
    };
    match DirBuilder::new().mode(DIR_MODE).create(dir) {
        Ok(()) => durable::sync_parent(dir).map_err(dir_error)?,
        Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {}
        Err(err) => return Err(dir_error(err)),
    }
    let metadata = fs::symlink_metadata(dir).map_err(dir_error)?;
    if !metadata.file_type().is_dir() {
        return Err(StoreError::NotADirectory {
            path: dir.to_owned(),
        });
    }
    Ok(())
}

/// Opens (or creates) the lease file at `path` in `dir`, locks it and checks its size.
pub(super) fn open_file(dir: &Path, path: &Path) -> Result<DirectFile, StoreError> {
    let open_error = |source: io::Error| {
        if source.raw_os_error() == Some(nix::errno::Errno::ELOOP as i32) {
            StoreError::Symlink {
                path: path.to_owned(),
            }
        } else {
            StoreError::Open {
                path: path.to_owned(),
                source,
            }
        }
    };
    let file = match DirectFile::open_no_follow(path, true) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            match DirectFile::create_new(path, FILE_MODE) {
                Ok(file) => file,
                // Another process created it between the two calls: open what it made.
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => {
                    DirectFile::open_no_follow(path, true).map_err(open_error)?
                }
                Err(err) => return Err(open_error(err)),
            }
        }
        Err(err) => return Err(open_error(err)),
    };
    file.lock_exclusive().map_err(|source| StoreError::Locked {
        path: path.to_owned(),
        source,
    })?;
    check_size(dir, &file)?;
    Ok(file)
}

/// Accepts a file of [`FILE_BYTES`]; fills one that a crash during creation left short and
/// all zeros; refuses anything else.
fn check_size(dir: &Path, file: &DirectFile) -> Result<(), StoreError> {
    let path = file.path();
    let open_error = |source| StoreError::Open {
        path: path.to_owned(),
        source,
    };
    let size_bytes = file.size_bytes().map_err(open_error)?;
    let wrong_size = || StoreError::WrongSize {
        path: path.to_owned(),
        size_bytes,
    };
    if file.is_block_device() || size_bytes > FILE_BYTES {
        return Err(wrong_size());
    }
    if size_bytes == FILE_BYTES {
        return Ok(());
    }
    let mut head = [0u8; FILE_BYTES as usize];
    let head = &mut head[..size_bytes as usize]; // below FILE_BYTES, checked above
    file.read_at(0, head).map_err(open_error)?;
    if head.iter().any(|&byte| byte != 0) {
        return Err(wrong_size());
    }
    let zeros = AlignedBuf::zeroed(FILE_BYTES as usize, DIRECT_ALIGN);
    write_direct(file, 0, &zeros).map_err(open_error)?;
    file.datasync().map_err(open_error)?;
    durable::sync_dir(dir).map_err(|source| StoreError::Dir {
        path: dir.to_owned(),
        source,
    })
}

/// Reads `buf` whole at `offset_bytes` through the `O_DIRECT` descriptor. One sector or
/// two: a short transfer would leave an unaligned rest, so it is an error, not a loop.
pub(super) fn read_direct(
    file: &DirectFile,
    offset_bytes: u64,
    buf: &mut AlignedBuf,
) -> io::Result<()> {
    let at = direct_offset(offset_bytes)?;
    let slice = buf.as_mut_slice();
    loop {
        match nix::sys::uio::pread(file.direct_fd(), slice, at) {
            Ok(read) if read == slice.len() => return Ok(()),
            Ok(_) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
}

/// Writes `buf` whole at `offset_bytes` through the `O_DIRECT` descriptor (as above).
pub(super) fn write_direct(
    file: &DirectFile,
    offset_bytes: u64,
    buf: &AlignedBuf,
) -> io::Result<()> {
    let at = direct_offset(offset_bytes)?;
    loop {
        match nix::sys::uio::pwrite(file.direct_fd(), buf.as_slice(), at) {
            Ok(written) if written == buf.len() => return Ok(()),
            Ok(_) => return Err(io::ErrorKind::WriteZero.into()),
            Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
}

fn direct_offset(offset_bytes: u64) -> io::Result<i64> {
    i64::try_from(offset_bytes).map_err(|_| io::ErrorKind::InvalidInput.into())
}
