//! Copying live disks onto a seed's volumes (`ferry seed export`): the image read with
//! O_DIRECT and each sealed chunk written with O_DIRECT, both in one io_uring, several of
//! each in flight; holes and zero chunks recorded, never written.
//!
//! Invariants:
//! - The caller created each disk's seed tracker before calling: every block written from
//!   then on is in its bits, so whatever this copy reads (old or new contents) is corrected
//!   by the catch-up.
//! - Chunks are sealed, digested and placed in disk order (completions are reordered), so a
//!   volume's sequences and offsets only grow and no (key, nonce) pair repeats.
//! - A volume is sealed only after every chunk on it completed: its manifest never lists a
//!   chunk that is not on the medium. A medium too small for the next chunk and its
//!   manifest is sealed and the copy continues on the next volume.
//! - Every buffer handed to the ring comes back (the ring is drained on every exit path).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ferry_sys::uring::{Completion, Op, Ring};
use ferry_sys::{AlignedBuf, DirectFile, DIRECT_ALIGN};

use super::checkpoint::{Checkpoint, Line, Resume, RESERVE_SEQUENCES};
use super::{SeedProgress, SeedRunError};

mod pacing;
mod resumed;

use crate::disk::Export;
use crate::migrate::backoff::GuestBackoff;
use crate::seed::chunk::{self, sealed_len, ChunkPlace, MAX_CHUNK_BYTES};
use crate::seed::header::{Header, KeySource, HEADER_BYTES};
use crate::seed::manifest::{DiskManifest, ExtentBuilder, Manifest, BLOCK_BYTES};
use crate::seed::volume::{self, Media};
use crate::seed::SeedKeys;
use pacing::{fits, is_zero, seed_path, Holes};

/// Chunk reads in flight.
const READ_DEPTH: usize = 8;
/// Ring depth: the reads and as many writes.
const RING_DEPTH: u32 = 2 * READ_DEPTH as u32;
/// Data bytes between two checkpoints (a resumed export redoes at most this much).
const CHECKPOINT_BYTES: u64 = 64 << 20;
/// Room a volume keeps for its manifest per extent on it (the encoding's largest record,
/// rounded up), besides a fixed page.
const MANIFEST_BYTES_PER_EXTENT: u64 = 64;

/// One disk of a seed, as the caller prepared it.
#[derive(Debug)]
pub struct ExportDisk {
    /// Its index in the seed.
    pub index: u32,
    /// The served export.
    pub export: Arc<Export>,
    /// The seed's job on this agent.
    pub job_id: u64,
    /// The seed tracker's name and generation.
    pub tracker: (String, u64),
    /// When the tracker was created (Unix ms).
    pub start_unix_ms: u64,
}

/// What an export did.
#[derive(Debug, Clone, Default)]
pub struct ExportOutcome {
    /// Volumes written (each sealed).
    pub volumes: Vec<PathBuf>,
}

/// The volume being written.
struct VolumeWriter {
    file: DirectFile,
    header: Header,
    number: u32,
    /// Where the next chunk goes.
    next_offset_bytes: u64,
    next_sequence: u64,
    /// A raw medium's size; a directory volume grows.
    capacity_bytes: Option<u64>,
    manifest: Manifest,
    extents_on_volume: u64,
    /// Sequences below this are reserved in the checkpoint.
    reserved_until: u64,
    /// A resumed export: the part of a disk already on this volume, to continue.
    resumed_part: Option<(u32, Vec<crate::seed::manifest::Extent>)>,
}

/// Everything one export run shares.
#[derive(Debug)]
pub struct SeedWriter<'a> {
    pub keys: &'a SeedKeys,
    pub key_source: KeySource,
    pub source_agent: String,
    /// `--media` in order: volume N goes to the Nth (a directory takes every later one).
    pub media: Vec<PathBuf>,
    pub progress: &'a SeedProgress,
    pub stop: &'a AtomicBool,
    /// Back off when the guest's write p99 exceeds this (µs).
    pub max_impact_us: Option<u64>,
    /// Where the export records its progress (a resume continues from it).
    pub checkpoint: Option<std::sync::Mutex<Checkpoint>>,
    /// A stopped export's state, to continue from.
    pub resume: Option<Resume>,
}

impl SeedWriter<'_> {
    /// Copies every disk, in order, onto as many volumes as it takes; each volume sealed.
    pub fn run(&self, disks: &[ExportDisk]) -> Result<ExportOutcome, SeedRunError> {
        let mut outcome = ExportOutcome::default();
        let (mut writer, (first_disk, first_bytes)) = match &self.resume {
            None => (self.open_volume(0, &mut outcome)?, (0, 0)),
            Some(resume) => (
                resumed::reopen_volume(self, resume, disks, &mut outcome)?,
                resume.position,
            ),
        };
        for disk in disks.iter().filter(|disk| disk.index >= first_disk) {
            let first = if disk.index == first_disk {
                first_bytes
            } else {
                0
            };
            writer = self.copy_disk(disk, writer, first, &mut outcome)?;
        }
        self.seal(writer, true)?;
        Ok(outcome)
    }

    /// Opens (creates, on a directory) volume `number` and writes its header.
    fn open_volume(
        &self,
        number: u32,
        outcome: &mut ExportOutcome,
    ) -> Result<VolumeWriter, SeedRunError> {
        let index = usize::try_from(number).unwrap_or(usize::MAX);
        let path = self
            .media
            .get(index)
            .or_else(|| self.media.last().filter(|path| path.is_dir()))
            .ok_or(SeedRunError::MediaFull { volume: number })?;
        let (file, capacity_bytes, shown) = match Media::classify(path)? {
            Media::Dir(dir) => {
                let file = volume::create_in_dir(&dir, self.keys.seed_id(), number)?;
                let shown = dir.join(volume::file_name(self.keys.seed_id(), number));
                (file, None, shown)
            }
            Media::Raw(raw) => {
                let file = volume::open_raw(&raw, true)?;
                let size = file.size_bytes().map_err(SeedRunError::io("size", &raw))?;
                (file, Some(size), raw)
            }
        };
        let header = Header::writing(self.keys, number, self.key_source);
        volume::write_header(&file, &header, self.keys)?;
        outcome.volumes.push(shown);
        self.progress
            .volume
            .store(u64::from(number), Ordering::Relaxed);
        Ok(VolumeWriter {
            file,
            header,
            number,
            next_offset_bytes: HEADER_BYTES as u64,
            next_sequence: 0,
            capacity_bytes,
            manifest: Manifest {
                seed_id: *self.keys.seed_id(),
                source_agent: self.source_agent.clone(),
                volume: number,
                volume_count: 0,
                disks: Vec::new(),
            },
            extents_on_volume: 0,
            reserved_until: 0,
            resumed_part: None,
        })
    }

    /// Appends `line` to the checkpoint, if there is one.
    fn record(&self, line: &Line) -> Result<(), SeedRunError> {
        match &self.checkpoint {
            Some(checkpoint) => checkpoint.lock().expect("checkpoint").append(line),
            None => Ok(()),
        }
    }

    /// Writes the volume's manifest and seals it (`last`: the seed's volume count is known).
    fn seal(&self, mut writer: VolumeWriter, last: bool) -> Result<(), SeedRunError> {
        if last {
            writer.manifest.volume_count = writer.number + 1;
        }
        let at = writer.next_offset_bytes;
        volume::write_manifest_and_seal(
            &writer.file,
            &writer.header,
            self.keys,
            &writer.manifest,
            at,
        )?;
        self.record(&Line::Sealed {
            volume: writer.number,
        })
    }

    /// Copies one disk from the volume `writer`; returns the volume the disk ended on.
    fn copy_disk(
        &self,
        disk: &ExportDisk,
        mut writer: VolumeWriter,
        mut first_bytes: u64,
        outcome: &mut ExportOutcome,
    ) -> Result<VolumeWriter, SeedRunError> {
        let image = disk.export.image().map_err(SeedRunError::Source)?;
        let size_bytes = disk.export.size_bytes();
        loop {
            let copied = self.copy_part(disk, &image, &mut writer, first_bytes)?;
            if copied.end_bytes >= size_bytes {
                return Ok(writer);
            }
            // The volume is full: seal it and go on with the next.
            let next = writer.number + 1;
            self.seal(writer, false)?;
            writer = self.open_volume(next, outcome)?;
            first_bytes = copied.end_bytes;
        }
    }

    /// Copies `[first_bytes, …)` of the disk onto `writer` until the disk ends or the volume
    /// is full; records the part in the volume's manifest.
    fn copy_part(
        &self,
        disk: &ExportDisk,
        image: &DirectFile,
        writer: &mut VolumeWriter,
        first_bytes: u64,
    ) -> Result<Part, SeedRunError> {
        let size_bytes = disk.export.size_bytes();
        let builder = match writer.resumed_part.take() {
            Some((index, extents)) if index == disk.index => resumed::rebuild(&extents)?,
            _ => ExtentBuilder::new(first_bytes),
        };
        let part_first_bytes = builder
            .extents()
            .first()
            .map_or(first_bytes, |e| e.offset_bytes);
        // A resumed part's extents are in the checkpoint already.
        let checkpointed = builder.extents().len();
        let mut part = PartCopy {
            disk,
            image,
            ring: Ring::new(RING_DEPTH, &[image.direct_fd(), writer.file.direct_fd()])
                .map_err(|err| SeedRunError::Ring(err.to_string()))?,
            next_read_bytes: builder.end_bytes(),
            builder,
            checkpointed,
            since_checkpoint_bytes: 0,
            next_index: 0,
            next_to_place: 0,
            ready: BTreeMap::new(),
            writes_in_flight: 0,
            reads_in_flight: 0,
            full: false,
            holes: Holes::default(),
            backoff: self.max_impact_us.map(|target_us| {
                GuestBackoff::new(0, &disk.export.write_latency()).with_target_us(target_us)
            }),
            started: Instant::now(),
        };
        let result = part.run(self, writer, size_bytes);
        // Whatever happened, no buffer stays with the kernel.
        let drained = part.drain(self, writer);
        result.and(drained)?;
        part.checkpoint(self, writer, true)?;
        let end_unix_ms = super::unix_ms();
        self.record(&Line::PartEnd {
            volume: writer.number,
            disk: disk.index,
            end_unix_ms,
        })?;
        let end_bytes = part.builder.end_bytes();
        writer.manifest.disks.push(DiskManifest {
            index: disk.index,
            export: disk.export.name().to_string(),
            size_bytes,
            block_bytes: BLOCK_BYTES,
            job_id: disk.job_id,
            tracker: disk.tracker.0.clone(),
            tracker_generation: disk.tracker.1,
            start_unix_ms: disk.start_unix_ms,
            end_unix_ms,
            first_offset_bytes: part_first_bytes,
            end_offset_bytes: end_bytes,
            extents: part.builder.into_extents(),
        });
        Ok(Part { end_bytes })
    }
}

/// How far a part got.
struct Part {
    end_bytes: u64,
}

/// A chunk read, waiting for its turn to be placed.
enum Ready {
    /// Read: its bytes are in the buffer.
    Read(AlignedBuf),
    /// A hole: nothing was read.
    Hole,
}

/// The state of copying one part of a disk.
struct PartCopy<'a> {
    disk: &'a ExportDisk,
    image: &'a DirectFile,
    ring: Ring,
    builder: ExtentBuilder,
    /// Where the next read starts.
    next_read_bytes: u64,
    /// Index of the next chunk read (disk order).
    next_index: u64,
    /// Index of the next chunk to place on the volume.
    next_to_place: u64,
    /// Chunks read out of order, by index: (offset, length, contents).
    ready: BTreeMap<u64, (u64, u32, Ready)>,
    writes_in_flight: usize,
    reads_in_flight: usize,
    /// The volume has no room for the next chunk: read nothing more.
    full: bool,
    holes: Holes,
    backoff: Option<GuestBackoff>,
    started: Instant,
    /// Extents of `builder` recorded in the checkpoint.
    checkpointed: usize,
    /// Data bytes placed since the last checkpoint.
    since_checkpoint_bytes: u64,
}

const WRITE_TAG: u64 = 1 << 63;

impl PartCopy<'_> {
    /// Reads, seals and writes until the part ends (the disk's end or a full volume).
    fn run(
        &mut self,
        seed: &SeedWriter<'_>,
        writer: &mut VolumeWriter,
        size_bytes: u64,
    ) -> Result<(), SeedRunError> {
        let mut completions = Vec::new();
        loop {
            if seed.stop.load(Ordering::Acquire) {
                return Err(SeedRunError::Stopped);
            }
            self.throttle(seed);
            while !self.full
                && self.reads_in_flight < READ_DEPTH
                && self.ready.len() < READ_DEPTH * 2
                && self.next_read_bytes < size_bytes
            {
                self.start_read(size_bytes)?;
            }
            self.place_ready(seed, writer)?;
            let done = self.next_to_place == self.next_index
                && (self.full || self.next_read_bytes >= size_bytes);
            if done {
                return Ok(());
            }
            if self.reads_in_flight + self.writes_in_flight > 0 {
                self.ring
                    .submit_and_wait(1)
                    .map_err(|err| SeedRunError::Ring(err.to_string()))?;
                self.ring.reap(&mut completions);
                for completion in completions.drain(..) {
                    self.complete(seed, completion)?;
                }
            }
        }
    }

    /// Queues the read of the next chunk (or notes a hole).
    fn start_read(&mut self, size_bytes: u64) -> Result<(), SeedRunError> {
        let offset = self.next_read_bytes;
        let len = (size_bytes - offset).min(MAX_CHUNK_BYTES as u64);
        let len_u32 = u32::try_from(len).expect("at most 1 MiB");
        let index = self.next_index;
        self.next_index += 1;
        self.next_read_bytes += len;
        if self.holes.is_hole(self.image, offset, len, size_bytes) {
            self.ready.insert(index, (offset, len_u32, Ready::Hole));
            return Ok(());
        }
        // O_DIRECT reads whole blocks; the buffer also takes the tag and padding later.
        let read_len = u32::try_from(len.next_multiple_of(DIRECT_ALIGN as u64)).expect("1 MiB");
        let buf = AlignedBuf::zeroed(sealed_len(MAX_CHUNK_BYTES), DIRECT_ALIGN);
        let op = Op::Read {
            file_index: 0,
            offset_bytes: offset,
            len_bytes: read_len,
            buf,
        };
        self.ring
            .push(index, op)
            .map_err(|(err, _)| SeedRunError::Ring(err.to_string()))?;
        self.reads_in_flight += 1;
        self.ring
            .submit()
            .map_err(|err| SeedRunError::Ring(err.to_string()))?;
        Ok(())
    }

    /// Handles one completion: a read joins the ready chunks, a write is done.
    fn complete(
        &mut self,
        seed: &SeedWriter<'_>,
        completion: Completion,
    ) -> Result<(), SeedRunError> {
        let Completion {
            user_tag,
            result,
            op,
        } = completion;
        if user_tag & WRITE_TAG != 0 {
            self.writes_in_flight -= 1;
            let written = result.map_err(SeedRunError::io("write", &seed_path(seed)))?;
            let Op::Write { len_bytes, .. } = op else {
                unreachable!("WRITE_TAG is a write");
            };
            if written != len_bytes {
                return Err(SeedRunError::MediaShortWrite);
            }
            return Ok(());
        }
        self.reads_in_flight -= 1;
        let Op::Read {
            offset_bytes,
            len_bytes,
            buf,
            ..
        } = op
        else {
            unreachable!("tag without WRITE_TAG is a read");
        };
        let read = result.map_err(SeedRunError::Source)?;
        let size_bytes = self.disk.export.size_bytes();
        let len = (size_bytes - offset_bytes).min(MAX_CHUNK_BYTES as u64);
        if u64::from(read) < len.min(u64::from(len_bytes)) {
            return Err(SeedRunError::Source(std::io::Error::other(format!(
                "short read at {offset_bytes}: {read} bytes"
            ))));
        }
        let len = u32::try_from(len).expect("1 MiB");
        self.ready
            .insert(user_tag, (offset_bytes, len, Ready::Read(buf)));
        Ok(())
    }

    /// Places the ready chunks that are next in disk order: zeros into the manifest, data
    /// sealed and written.
    fn place_ready(
        &mut self,
        seed: &SeedWriter<'_>,
        writer: &mut VolumeWriter,
    ) -> Result<(), SeedRunError> {
        while let Some(entry) = self.ready.first_entry() {
            if *entry.key() != self.next_to_place || self.writes_in_flight >= READ_DEPTH {
                return Ok(());
            }
            let (offset, len, contents) = entry.remove();
            let data = match contents {
                Ready::Hole => None,
                Ready::Read(buf) if is_zero(&buf.as_slice()[..len as usize]) => None,
                Ready::Read(buf) => Some(buf),
            };
            let Some(mut buf) = data else {
                self.builder.push_zero(offset, u64::from(len));
                writer.extents_on_volume += 1;
                self.next_to_place += 1;
                seed.progress.add_zero(u64::from(len));
                continue;
            };
            if !fits(writer, len) {
                // Nothing after this chunk goes on this volume; the reads past it are dropped.
                self.full = true;
                self.ready.clear();
                self.next_index = self.next_to_place;
                self.next_read_bytes = offset;
                return Ok(());
            }
            if writer.next_sequence >= writer.reserved_until {
                let until = writer.next_sequence + RESERVE_SEQUENCES;
                seed.record(&Line::Reserve {
                    volume: writer.number,
                    until,
                })?;
                writer.reserved_until = until;
            }
            let place = ChunkPlace {
                disk: self.disk.index,
                offset_bytes: offset,
                volume: writer.number,
                sequence: writer.next_sequence,
            };
            let len_usize = len as usize;
            let digest = seed.keys.digest(&buf.as_slice()[..len_usize]);
            chunk::seal_in_place(seed.keys, &place, buf.as_mut_slice(), len_usize);
            let sealed = sealed_len(len_usize) as u64;
            let op = Op::Write {
                file_index: 1,
                offset_bytes: writer.next_offset_bytes,
                len_bytes: u32::try_from(sealed).expect("1 MiB and a page"),
                buf,
                dsync: false,
            };
            self.ring
                .push(WRITE_TAG | self.next_to_place, op)
                .map_err(|(err, _)| SeedRunError::Ring(err.to_string()))?;
            self.writes_in_flight += 1;
            self.builder.push_data(
                offset,
                len,
                writer.next_offset_bytes,
                writer.next_sequence,
                digest,
            );
            writer.next_offset_bytes += sealed;
            writer.next_sequence += 1;
            writer.extents_on_volume += 1;
            self.next_to_place += 1;
            seed.progress.add_data(u64::from(len), sealed);
            self.since_checkpoint_bytes += u64::from(len);
            if self.since_checkpoint_bytes >= CHECKPOINT_BYTES {
                self.checkpoint(seed, writer, false)?;
            }
        }
        Ok(())
    }

    /// Waits for everything in flight (reads are dropped, writes must succeed).
    fn drain(
        &mut self,
        seed: &SeedWriter<'_>,
        _writer: &mut VolumeWriter,
    ) -> Result<(), SeedRunError> {
        let mut completions = Vec::new();
        let mut failed = None;
        while self.reads_in_flight + self.writes_in_flight > 0 {
            if let Err(err) = self.ring.submit_and_wait(1) {
                return Err(SeedRunError::Ring(err.to_string()));
            }
            self.ring.reap(&mut completions);
            for completion in completions.drain(..) {
                if let Err(err) = self.complete(seed, completion) {
                    failed.get_or_insert(err);
                }
            }
        }
        self.ready.clear();
        failed.map_or(Ok(()), Err)
    }
}
