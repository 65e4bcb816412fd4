//! Seed volumes as files: a file `ferry-seed-<seed id in hex>.vol<N>` in a directory (a
//! mounted medium), or a whole block device or existing file given directly (raw medium),
//! and the reading and writing of their header, chunks and manifest.
//!
//! Invariants:
//! - Volumes are opened `O_DIRECT` and `O_NOFOLLOW`: a medium is hostile, so a link on it is
//!   never followed, and every transfer uses 4 KiB aligned offsets, lengths and buffers
//!   ([`AlignedBuf`]).
//! - A volume file is created with `O_CREAT | O_EXCL` (never over an existing entry), mode
//!   0600, and its directory is synced.
//! - A block device is opened for writing only if neither it nor a partition of it is
//!   mounted, used as swap or held by another device (device mapper, md).
//! - Sealing is ordered: the manifest is written and synced before the header that points
//!   at it, so a crash leaves a writing volume or a sealed one, never a sealed header
//!   pointing at a partial manifest.
//! - Lengths read from a medium are bounded by the volume's size before a buffer is made.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use ferry_sys::{AlignedBuf, DirectFile, DIRECT_ALIGN};
use nix::sys::stat::{major, minor};

use super::header::{self, Header, VolumeState, HEADER_BYTES};
use super::manifest::{self, Manifest, MAX_MANIFEST_BYTES};
use super::{FormatError, SealedChunk, SeedKeys};
use crate::durable;

mod busy;
#[cfg(test)]
mod tests;

/// Start of a volume file's name.
pub const FILE_PREFIX: &str = "ferry-seed-";
/// Mode of volume files (they hold encrypted data, but no one else needs them).
pub const VOLUME_MODE: u32 = 0o600;

/// Where a seed is written to or read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Media {
    /// A directory holding volume files.
    Dir(PathBuf),
    /// A block device or a regular file that is one volume.
    Raw(PathBuf),
}

impl Media {
    /// What `path` is, without following a link: a directory, or a block device or regular
    /// file; anything else (a link included) is refused.
    pub fn classify(path: &Path) -> Result<Media, FormatError> {
        let file_type = fs::symlink_metadata(path)
            .map_err(FormatError::io("inspect", path))?
            .file_type();
        if file_type.is_dir() {
            Ok(Media::Dir(path.to_owned()))
        } else if file_type.is_block_device() || file_type.is_file() {
            Ok(Media::Raw(path.to_owned()))
        } else {
            Err(FormatError::NotAVolume {
                path: path.to_owned(),
                reason: "not a directory, block device or regular file (links are not followed)",
            })
        }
    }
}

/// A volume file found in a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedVolume {
    /// The seed its name gives.
    pub seed_id: [u8; 16],
    /// The volume number its name gives.
    pub volume: u32,
    /// The file.
    pub path: PathBuf,
}

/// The file name of volume `volume` of seed `seed_id`.
pub fn file_name(seed_id: &[u8; 16], volume: u32) -> String {
    let hex: String = seed_id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{FILE_PREFIX}{hex}.vol{volume}")
}

/// The seed id and volume of a file name made by [`file_name`]; None for any other name
/// (upper-case hex, leading zeros and out-of-range numbers included).
pub fn parse_file_name(name: &str) -> Option<([u8; 16], u32)> {
    let rest = name.strip_prefix(FILE_PREFIX)?;
    let (hex, number) = rest.split_once(".vol")?;
    if hex.len() != 32 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let digits_ok = !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit());
    if !digits_ok || (number.len() > 1 && number.starts_with('0')) {
        return None;
    }
    let volume = number.parse().ok()?;
    let mut seed_id = [0u8; 16];
    for (i, byte) in seed_id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some((seed_id, volume))
}

/// Creates volume `volume` of seed `seed_id` in `dir` (never over an existing file, never
/// through a link), opened `O_DIRECT` for writing; the directory is synced.
pub fn create_in_dir(
    dir: &Path,
    seed_id: &[u8; 16],
    volume: u32,
) -> Result<DirectFile, FormatError> {
    let path = dir.join(file_name(seed_id, volume));
    let file =
        DirectFile::create_new(&path, VOLUME_MODE).map_err(FormatError::io("create", &path))?;
    durable::sync_dir(dir).map_err(FormatError::io("sync", dir))?;
    Ok(file)
}

/// Opens volume `volume` of seed `seed_id` in `dir`, without following a link.
pub fn open_in_dir(
    dir: &Path,
    seed_id: &[u8; 16],
    volume: u32,
    writable: bool,
) -> Result<DirectFile, FormatError> {
    let path = dir.join(file_name(seed_id, volume));
    DirectFile::open_no_follow(&path, writable).map_err(FormatError::io("open", &path))
}

/// The volume files in `dir`, sorted by seed and volume: regular files whose names match
/// [`file_name`] exactly; everything else (links, other names) is ignored.
pub fn list_in_dir(dir: &Path) -> Result<Vec<ListedVolume>, FormatError> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).map_err(FormatError::io("list", dir))? {
        let entry = entry.map_err(FormatError::io("list", dir))?;
        let Some((seed_id, volume)) = entry.file_name().to_str().and_then(parse_file_name) else {
            continue;
        };
        // DirEntry::file_type does not follow links.
        if entry.file_type().is_ok_and(|kind| kind.is_file()) {
            found.push(ListedVolume {
                seed_id,
                volume,
                path: entry.path(),
            });
        }
    }
    found.sort_by_key(|v| (v.seed_id, v.volume));
    Ok(found)
}

/// Opens a raw medium: a block device or an existing regular file, never through a link,
/// `O_DIRECT`. For writing, a block device in use (see the module docs) is refused.
pub fn open_raw(path: &Path, writable: bool) -> Result<DirectFile, FormatError> {
    let file = DirectFile::open_no_follow(path, writable).map_err(FormatError::io("open", path))?;
    if writable && file.is_block_device() {
        let rdev = fs::metadata(path)
            .map_err(FormatError::io("inspect", path))?
            .rdev();
        if busy::device_in_use(major(rdev), minor(rdev))
            .map_err(FormatError::io("check the use of", path))?
        {
            return Err(FormatError::NotAVolume {
                path: path.to_owned(),
                reason: "the device or a partition of it is mounted or in use",
            });
        }
    }
    Ok(file)
}

fn read_direct(file: &DirectFile, offset_bytes: u64, buf: &mut AlignedBuf) -> io::Result<()> {
    let mut done = 0;
    let slice = buf.as_mut_slice();
    while done < slice.len() {
        let at =
            i64::try_from(offset_bytes + done as u64).map_err(|_| io::ErrorKind::InvalidInput)?;
        match nix::sys::uio::pread(file.direct_fd(), &mut slice[done..], at) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(read) => done += read,
            Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}

fn write_direct(file: &DirectFile, offset_bytes: u64, buf: &AlignedBuf) -> io::Result<()> {
    let mut done = 0;
    let slice = buf.as_slice();
    while done < slice.len() {
        let at =
            i64::try_from(offset_bytes + done as u64).map_err(|_| io::ErrorKind::InvalidInput)?;
        match nix::sys::uio::pwrite(file.direct_fd(), &slice[done..], at) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => done += written,
            Err(nix::errno::Errno::EINTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}

/// `bytes` in a zeroed aligned buffer padded to 4 KiB.
fn aligned_copy(bytes: &[u8]) -> AlignedBuf {
    let len = bytes.len().div_ceil(DIRECT_ALIGN).max(1) * DIRECT_ALIGN;
    let mut buf = AlignedBuf::zeroed(len, DIRECT_ALIGN);
    buf.as_mut_slice()[..bytes.len()].copy_from_slice(bytes);
    buf
}

fn read_header_bytes(file: &DirectFile) -> Result<AlignedBuf, FormatError> {
    let mut buf = AlignedBuf::zeroed(HEADER_BYTES, DIRECT_ALIGN);
    match read_direct(file, 0, &mut buf) {
        Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => Err(FormatError::Truncated {
            what: "volume header",
        }),
        other => other.map_err(FormatError::io("read the header of", file.path())),
    }?;
    Ok(buf)
}

/// The volume's header, verified with `keys`.
pub fn read_header(file: &DirectFile, keys: &SeedKeys) -> Result<Header, FormatError> {
    header::verify(read_header_bytes(file)?.as_slice(), keys)
}

/// The volume's header read without a key (for listing media): unauthenticated.
pub fn read_header_clear(file: &DirectFile) -> Result<Header, FormatError> {
    header::decode_clear(read_header_bytes(file)?.as_slice())
}

/// Writes `header` at offset 0 and syncs: after Ok it is durable.
pub fn write_header(
    file: &DirectFile,
    header: &Header,
    keys: &SeedKeys,
) -> Result<(), FormatError> {
    let buf = aligned_copy(&header::encode(header, keys));
    write_direct(file, 0, &buf).map_err(FormatError::io("write the header of", file.path()))?;
    file.datasync()
        .map_err(FormatError::io("sync", file.path()))
}

/// Writes a sealed chunk at `volume_offset_bytes` (4 KiB aligned, after the header); not
/// synced (sealing the volume syncs).
pub fn write_chunk(
    file: &DirectFile,
    volume_offset_bytes: u64,
    chunk: &SealedChunk,
) -> Result<(), FormatError> {
    assert!(
        volume_offset_bytes >= HEADER_BYTES as u64
            && volume_offset_bytes % DIRECT_ALIGN as u64 == 0
    );
    write_direct(file, volume_offset_bytes, &aligned_copy(&chunk.bytes))
        .map_err(FormatError::io("write a chunk to", file.path()))
}

/// Reads the sealed chunk of `len_bytes` of data (as a manifest lists it) at
/// `volume_offset_bytes`, for [`super::chunk::open`].
pub fn read_chunk(
    file: &DirectFile,
    volume_offset_bytes: u64,
    len_bytes: u32,
) -> Result<AlignedBuf, FormatError> {
    let sealed_bytes =
        super::chunk::sealed_len(len_bytes.min(super::chunk::MAX_CHUNK_BYTES as u32) as usize);
    let mut buf = AlignedBuf::zeroed(sealed_bytes, DIRECT_ALIGN);
    read_direct(file, volume_offset_bytes, &mut buf)
        .map_err(FormatError::io("read a chunk of", file.path()))?;
    Ok(buf)
}

/// Seals the volume: writes `manifest` sealed at `manifest_offset_bytes` (4 KiB aligned,
/// after the last chunk), syncs, then rewrites the header as sealed and syncs. Returns the
/// sealed header. The manifest is checked before anything is written.
pub fn write_manifest_and_seal(
    file: &DirectFile,
    header: &Header,
    keys: &SeedKeys,
    manifest: &Manifest,
    manifest_offset_bytes: u64,
) -> Result<Header, FormatError> {
    assert_eq!(header.state, VolumeState::Writing, "volume already sealed");
    assert_eq!(header.volume, manifest.volume, "manifest of another volume");
    manifest::decode(&manifest::encode(manifest), manifest_offset_bytes)?;
    let sealed = manifest::seal(keys, manifest);
    let padded_bytes = manifest::padded_len(sealed.len() as u64);
    let size_bytes = file
        .size_bytes()
        .map_err(FormatError::io("size", file.path()))?;
    if file.is_block_device() && manifest_offset_bytes.saturating_add(padded_bytes) > size_bytes {
        return Err(FormatError::ManifestTooLong {
            len_bytes: padded_bytes,
            max_bytes: size_bytes.saturating_sub(manifest_offset_bytes),
        });
    }
    write_direct(file, manifest_offset_bytes, &aligned_copy(&sealed))
        .map_err(FormatError::io("write the manifest to", file.path()))?;
    file.datasync()
        .map_err(FormatError::io("sync", file.path()))?;
    let sealed_header = header.sealed(manifest_offset_bytes, sealed.len() as u64);
    write_header(file, &sealed_header, keys)?;
    Ok(sealed_header)
}

/// The manifest of a sealed volume whose verified header is `header`: its length bounded by
/// [`MAX_MANIFEST_BYTES`] and the volume's size before it is read, its padding zero.
pub fn read_manifest(
    file: &DirectFile,
    header: &Header,
    keys: &SeedKeys,
) -> Result<Manifest, FormatError> {
    if header.state != VolumeState::Sealed {
        return Err(FormatError::NotSealed);
    }
    let size_bytes = file
        .size_bytes()
        .map_err(FormatError::io("size", file.path()))?;
    let room_bytes = size_bytes.saturating_sub(header.manifest_offset_bytes);
    let len_bytes = header.manifest_len_bytes;
    if len_bytes == 0 || room_bytes == 0 {
        // Sealed with a manifest the medium no longer holds: cut short.
        return Err(FormatError::Truncated {
            what: "volume (its manifest is missing)",
        });
    }
    let max_bytes = MAX_MANIFEST_BYTES.min(room_bytes);
    if len_bytes > max_bytes || manifest::padded_len(len_bytes) > room_bytes {
        return Err(FormatError::ManifestTooLong {
            len_bytes,
            max_bytes,
        });
    }
    let padded = usize::try_from(manifest::padded_len(len_bytes)).expect("at most 1 GiB");
    let mut buf = AlignedBuf::zeroed(padded, DIRECT_ALIGN);
    read_direct(file, header.manifest_offset_bytes, &mut buf)
        .map_err(FormatError::io("read the manifest of", file.path()))?;
    let (sealed, padding) = buf.as_slice().split_at(len_bytes as usize);
    if padding.iter().any(|&b| b != 0) {
        return Err(FormatError::ManifestDamaged);
    }
    manifest::open(keys, header.volume, sealed, header.manifest_offset_bytes)
}
