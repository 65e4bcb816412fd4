//! The copy's supporting pieces: where the image has data (SEEK_DATA / SEEK_HOLE), whether a
//! chunk is zeros, whether a raw medium has room, the guest back-off (`--max-impact`) and the
//! checkpoints of the extents placed (`checkpoint.rs`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferry_sys::DirectFile;

use super::{PartCopy, SeedWriter, VolumeWriter, MANIFEST_BYTES_PER_EXTENT};
use crate::jobs::seeding::checkpoint::{self, Line};
use crate::jobs::seeding::SeedRunError;
use crate::seed::chunk::sealed_len;
use crate::seed::header::HEADER_BYTES;
use crate::seed::manifest;

/// The image's next data and hole, from SEEK_DATA / SEEK_HOLE.
#[derive(Default)]
pub(super) struct Holes {
    /// `[data_start, data_end)`: the data range at or after the last query.
    data: Option<(u64, u64)>,
}

impl Holes {
    /// Whether `[offset, offset + len)` is all hole.
    pub(super) fn is_hole(&mut self, image: &DirectFile, offset: u64, len: u64, size: u64) -> bool {
        let stale = self.data.is_none_or(|(_, end)| end <= offset);
        if stale {
            let start = image.seek_data(offset).ok().flatten();
            self.data = Some(match start {
                None => (size, size),
                Some(start) => {
                    let end = image.seek_hole(start).ok().flatten().unwrap_or(size);
                    (start, end.max(start + 1))
                }
            });
        }
        let (start, _) = self.data.expect("set above");
        start >= offset + len
    }
}

impl PartCopy<'_> {
    /// Sleeps as the guest back-off asks (`--max-impact`), given the copy rate so far.
    pub(super) fn throttle(&mut self, seed: &SeedWriter<'_>) {
        let Some(backoff) = &mut self.backoff else {
            return;
        };
        let elapsed_s = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = seed.progress.done_bytes() as f64 / elapsed_s;
        let latency = self.disk.export.write_latency();
        if let Some(cap) = backoff.observe(elapsed_ns(self.started), &latency, Some(rate)) {
            if rate > cap as f64 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    /// Records the extents placed since the last checkpoint once their chunks are durable on
    /// the medium (`all`: the part is over, a trailing zero extent too; otherwise it may
    /// still grow and waits).
    pub(super) fn checkpoint(
        &mut self,
        seed: &SeedWriter<'_>,
        writer: &mut VolumeWriter,
        all: bool,
    ) -> Result<(), SeedRunError> {
        if seed.checkpoint.is_none() {
            return Ok(());
        }
        let mut completions = Vec::new();
        while self.writes_in_flight > 0 {
            self.ring
                .submit_and_wait(1)
                .map_err(|err| SeedRunError::Ring(err.to_string()))?;
            self.ring.reap(&mut completions);
            for completion in completions.drain(..) {
                self.complete(seed, completion)?;
            }
        }
        writer
            .file
            .datasync()
            .map_err(SeedRunError::io("sync", writer.file.path()))?;
        let extents = self.builder.extents();
        let growing = !all
            && extents
                .last()
                .is_some_and(|last| last.kind == crate::seed::manifest::ExtentKind::Zero);
        let end = extents.len() - usize::from(growing);
        if end > self.checkpointed {
            seed.record(&Line::Extents {
                volume: writer.number,
                disk: self.disk.index,
                extents: extents[self.checkpointed..end]
                    .iter()
                    .map(checkpoint::extent_line)
                    .collect(),
            })?;
            self.checkpointed = end;
        }
        self.since_checkpoint_bytes = 0;
        Ok(())
    }
}

/// Whether the volume has room for a chunk of `len` bytes and a manifest one extent longer.
pub(super) fn fits(writer: &VolumeWriter, len: u32) -> bool {
    let Some(capacity) = writer.capacity_bytes else {
        return true;
    };
    let manifest_room =
        (writer.extents_on_volume + 2) * MANIFEST_BYTES_PER_EXTENT + 2 * HEADER_BYTES as u64;
    let need = writer.next_offset_bytes + sealed_len(len as usize) as u64 + manifest_room;
    need <= capacity && manifest::padded_len(manifest_room) <= capacity
}

/// Whether every byte is zero (a zero chunk is recorded, not written).
pub(super) fn is_zero(bytes: &[u8]) -> bool {
    let words = bytes.chunks_exact(8);
    let tail = words.remainder();
    tail.iter().all(|&b| b == 0)
        && words
            .map(|chunk| u64::from_ne_bytes(chunk.try_into().expect("8 bytes")))
            .all(|word| word == 0)
}

/// Nanoseconds since `start` (the back-off's clock starts with the part).
pub(super) fn elapsed_ns(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

pub(super) fn seed_path(seed: &SeedWriter<'_>) -> PathBuf {
    seed.media.last().cloned().unwrap_or_default()
}
