//! Reading a seed's volumes (`ferry seed import|ls|show|verify`): every header and manifest
//! verified before any chunk is read, then every chunk read with O_DIRECT through one
//! io_uring, opened (AES-256-GCM, bound to its place), its keyed digest compared with the
//! manifest's, and only then written to the image.
//!
//! Invariants:
//! - Nothing reaches an image before its chunk authenticated and its digest matched; the
//!   first bad chunk stops the import with its disk, offset and volume.
//! - The volumes must be of one seed, sealed, and cover every disk exactly once
//!   (`check_coverage`): a missing volume is named before anything is written.
//! - Every buffer handed to the ring comes back (drained on every exit path).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use ferry_sys::uring::{Completion, Op, Ring};
use ferry_sys::{AlignedBuf, DirectFile, DIRECT_ALIGN};

use super::{SeedProgress, SeedRunError};
use crate::seed::chunk::{self, sealed_len, ChunkPlace, MAX_CHUNK_BYTES};
use crate::seed::header::{Header, VolumeState};
use crate::seed::manifest::{check_coverage, ExtentKind, Manifest};
use crate::seed::volume::{self, Media};
use crate::seed::{FormatError, SeedKeys};

/// Chunk reads in flight.
const READ_DEPTH: usize = 8;
/// Ring depth: reads, then as many writes.
const RING_DEPTH: u32 = 2 * READ_DEPTH as u32;
/// Tag bit of an image write.
const WRITE_TAG: u64 = 1 << 63;

/// A volume opened and verified: its header and manifest authenticated.
#[derive(Debug)]
pub struct OpenedVolume {
    /// Where it is.
    pub path: PathBuf,
    /// The file or device, O_DIRECT.
    pub file: DirectFile,
    /// Its header.
    pub header: Header,
    /// Its manifest.
    pub manifest: Manifest,
}

/// The volume files `media` names: a directory's volumes (of one seed), or a raw medium.
pub fn volume_paths(media: &[PathBuf]) -> Result<Vec<PathBuf>, SeedRunError> {
    let mut paths = Vec::new();
    for path in media {
        match Media::classify(path)? {
            Media::Dir(dir) => {
                let listed = volume::list_in_dir(&dir)?;
                if let Some(first) = listed.first() {
                    if listed.iter().any(|v| v.seed_id != first.seed_id) {
                        return Err(SeedRunError::Refused(format!(
                            "{} holds volumes of several seeds; give their files",
                            dir.display()
                        )));
                    }
                }
                paths.extend(listed.into_iter().map(|v| v.path));
            }
            Media::Raw(raw) => paths.push(raw),
        }
    }
    if paths.is_empty() {
        return Err(SeedRunError::Refused(
            "no seed volume on the media given".into(),
        ));
    }
    Ok(paths)
}

/// The seed id a volume's header claims (unauthenticated: it only picks the keys).
pub fn claimed_seed_id(path: &Path) -> Result<[u8; 16], SeedRunError> {
    let file = volume::open_raw(path, false)?;
    Ok(volume::read_header_clear(&file)?.seed_id)
}

/// Opens every volume with `keys`: headers verified (a wrong key is said so), sealed,
/// manifests authenticated, one seed, each volume once, every disk covered.
pub fn open_volumes(paths: &[PathBuf], keys: &SeedKeys) -> Result<Vec<OpenedVolume>, SeedRunError> {
    let mut volumes: Vec<OpenedVolume> = Vec::new();
    for path in paths {
        let file = volume::open_raw(path, false)?;
        let header = volume::read_header(&file, keys).map_err(|err| at(path, err))?;
        if header.state != VolumeState::Sealed {
            return Err(SeedRunError::Refused(format!(
                "{}: volume {} was never sealed (an export stopped before its end)",
                path.display(),
                header.volume
            )));
        }
        let manifest = volume::read_manifest(&file, &header, keys).map_err(|err| at(path, err))?;
        if volumes.iter().any(|v| v.header.volume == header.volume) {
            return Err(SeedRunError::Refused(format!(
                "volume {} given twice",
                header.volume
            )));
        }
        volumes.push(OpenedVolume {
            path: path.clone(),
            file,
            header,
            manifest,
        });
    }
    volumes.sort_by_key(|v| v.header.volume);
    let manifests: Vec<Manifest> = volumes.iter().map(|v| v.manifest.clone()).collect();
    check_coverage(&manifests)?;
    Ok(volumes)
}

/// A format error with the volume's path in front.
fn at(path: &Path, err: FormatError) -> SeedRunError {
    SeedRunError::Refused(format!(
        "{}: {}",
        path.display(),
        crate::error::error_chain(&err)
    ))
}

/// Where each disk's verified bytes go: its image (None: verify only).
pub type Images<'a> = BTreeMap<u32, &'a DirectFile>;

/// Reads, verifies and (where `images` has the disk) writes every data chunk of `volumes`;
/// zero extents are punched when `punch_zeros` (an image that may hold older bytes).
pub fn copy_volumes(
    keys: &SeedKeys,
    volumes: &[OpenedVolume],
    images: &Images<'_>,
    punch_zeros: bool,
    progress: &SeedProgress,
    stop: &AtomicBool,
) -> Result<(), SeedRunError> {
    for volume in volumes {
        progress
            .volume
            .store(u64::from(volume.header.volume), Ordering::Relaxed);
        let mut copy = VolumeCopy::new(volume, images)?;
        let result = copy.run(keys, images, punch_zeros, progress, stop);
        let drained = copy.drain(keys, images, progress);
        result.and(drained)?;
    }
    Ok(())
}

/// A chunk to read: its disk, offset, length, place on the volume.
struct Pending {
    disk: u32,
    offset_bytes: u64,
    len_bytes: u32,
    volume_offset_bytes: u64,
    sequence: u64,
    digest: [u8; 32],
}

/// One volume's copy through one ring (the volume file first, then the images).
struct VolumeCopy<'a> {
    volume: &'a OpenedVolume,
    ring: Ring,
    /// Ring file index of each disk's image.
    image_index: BTreeMap<u32, u32>,
    /// Reads in flight, by tag.
    reading: BTreeMap<u64, Pending>,
    writes_in_flight: usize,
    next_tag: u64,
}

impl<'a> VolumeCopy<'a> {
    fn new(volume: &'a OpenedVolume, images: &Images<'_>) -> Result<Self, SeedRunError> {
        let mut fds = vec![volume.file.direct_fd()];
        let mut image_index = BTreeMap::new();
        for (&disk, image) in images {
            image_index.insert(disk, u32::try_from(fds.len()).expect("few disks"));
            fds.push(image.direct_fd());
        }
        let ring =
            Ring::new(RING_DEPTH, &fds).map_err(|err| SeedRunError::Ring(err.to_string()))?;
        Ok(VolumeCopy {
            volume,
            ring,
            image_index,
            reading: BTreeMap::new(),
            writes_in_flight: 0,
            next_tag: 0,
        })
    }

    fn run(
        &mut self,
        keys: &SeedKeys,
        images: &Images<'_>,
        punch_zeros: bool,
        progress: &SeedProgress,
        stop: &AtomicBool,
    ) -> Result<(), SeedRunError> {
        let volume_number = self.volume.header.volume;
        let extents = self
            .volume
            .manifest
            .disks
            .iter()
            .flat_map(|disk| disk.extents.iter().map(move |extent| (disk.index, extent)));
        let mut completions = Vec::new();
        for (disk, extent) in extents {
            if stop.load(Ordering::Acquire) {
                return Err(SeedRunError::Stopped);
            }
            let ExtentKind::Data {
                volume_offset_bytes,
                sequence,
                digest,
            } = extent.kind
            else {
                let len = u64::from(extent.len_bytes);
                if let (true, Some(image)) = (punch_zeros, images.get(&disk)) {
                    image
                        .punch_hole(extent.offset_bytes, len)
                        .map_err(SeedRunError::io("punch", image.path()))?;
                }
                progress.add_zero(len);
                continue;
            };
            while self.reading.len() + self.writes_in_flight >= READ_DEPTH {
                self.wait(keys, images, progress, &mut completions)?;
            }
            let pending = Pending {
                disk,
                offset_bytes: extent.offset_bytes,
                len_bytes: extent.len_bytes,
                volume_offset_bytes,
                sequence,
                digest,
            };
            self.start_read(pending, volume_number)?;
        }
        while !self.reading.is_empty() || self.writes_in_flight > 0 {
            self.wait(keys, images, progress, &mut completions)?;
        }
        Ok(())
    }

    fn start_read(&mut self, pending: Pending, volume: u32) -> Result<(), SeedRunError> {
        let len = pending.len_bytes as usize;
        if len > MAX_CHUNK_BYTES {
            return Err(SeedRunError::Chunk(crate::seed::SeedError::Malformed {
                len_bytes: len,
            }));
        }
        let sealed = sealed_len(len);
        let op = Op::Read {
            file_index: 0,
            offset_bytes: pending.volume_offset_bytes,
            len_bytes: u32::try_from(sealed).expect("1 MiB and a page"),
            buf: AlignedBuf::zeroed(sealed, DIRECT_ALIGN),
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        self.ring
            .push(tag, op)
            .map_err(|(err, _)| SeedRunError::Ring(err.to_string()))?;
        let _ = volume;
        self.reading.insert(tag, pending);
        self.ring
            .submit()
            .map_err(|err| SeedRunError::Ring(err.to_string()))?;
        Ok(())
    }

    fn wait(
        &mut self,
        keys: &SeedKeys,
        images: &Images<'_>,
        progress: &SeedProgress,
        completions: &mut Vec<Completion>,
    ) -> Result<(), SeedRunError> {
        self.ring
            .submit_and_wait(1)
            .map_err(|err| SeedRunError::Ring(err.to_string()))?;
        self.ring.reap(completions);
        let mut failed = None;
        for completion in completions.drain(..) {
            if let Err(err) = self.complete(keys, images, progress, completion) {
                failed.get_or_insert(err);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    /// A read is opened, checked and written; a write is done.
    fn complete(
        &mut self,
        keys: &SeedKeys,
        images: &Images<'_>,
        progress: &SeedProgress,
        completion: Completion,
    ) -> Result<(), SeedRunError> {
        let Completion {
            user_tag,
            result,
            op,
        } = completion;
        if user_tag & WRITE_TAG != 0 {
            self.writes_in_flight -= 1;
            let written = result.map_err(SeedRunError::io("write", Path::new("the image")))?;
            let Op::Write { len_bytes, .. } = op else {
                unreachable!("WRITE_TAG is a write");
            };
            return match written == len_bytes {
                true => Ok(()),
                false => Err(SeedRunError::Refused("short write to the image".into())),
            };
        }
        let pending = self.reading.remove(&user_tag).expect("a read in flight");
        let Op::Read { mut buf, .. } = op else {
            unreachable!("tags without WRITE_TAG are reads");
        };
        let read = result.map_err(SeedRunError::io("read", &self.volume.path))?;
        let len = pending.len_bytes as usize;
        let place = ChunkPlace {
            disk: pending.disk,
            offset_bytes: pending.offset_bytes,
            volume: self.volume.header.volume,
            sequence: pending.sequence,
        };
        if (read as usize) < sealed_len(len) {
            return Err(SeedRunError::Refused(format!(
                "{}: truncated at the chunk of disk {} offset {}",
                self.volume.path.display(),
                pending.disk,
                pending.offset_bytes
            )));
        }
        chunk::open_in_place(keys, &place, len, buf.as_mut_slice())?;
        if keys.digest(&buf.as_slice()[..len]) != pending.digest {
            return Err(SeedRunError::DigestMismatch {
                disk: pending.disk,
                offset_bytes: pending.offset_bytes,
                volume: place.volume,
            });
        }
        progress.add_data(len as u64, sealed_len(len) as u64);
        let (Some(image), Some(&file_index)) = (
            images.get(&pending.disk),
            self.image_index.get(&pending.disk),
        ) else {
            return Ok(());
        };
        if len % DIRECT_ALIGN != 0 {
            // A disk's unaligned tail: written through the page cache, exactly its bytes.
            return image
                .write_at(pending.offset_bytes, &buf.as_slice()[..len])
                .map_err(SeedRunError::io("write", image.path()));
        }
        let op = Op::Write {
            file_index,
            offset_bytes: pending.offset_bytes,
            len_bytes: u32::try_from(len).expect("1 MiB"),
            buf,
            dsync: false,
        };
        self.ring
            .push(WRITE_TAG | user_tag, op)
            .map_err(|(err, _)| SeedRunError::Ring(err.to_string()))?;
        self.writes_in_flight += 1;
        Ok(())
    }

    /// Waits for everything in flight; the first error is kept.
    fn drain(
        &mut self,
        keys: &SeedKeys,
        images: &Images<'_>,
        progress: &SeedProgress,
    ) -> Result<(), SeedRunError> {
        let mut completions = Vec::new();
        let mut failed = None;
        while !self.reading.is_empty() || self.writes_in_flight > 0 {
            if let Err(err) = self.wait(keys, images, progress, &mut completions) {
                if matches!(err, SeedRunError::Ring(_)) {
                    return Err(err);
                }
                failed.get_or_insert(err);
            }
        }
        failed.map_or(Ok(()), Err)
    }
}
