//! Building a disk's extents as an export reads it, and checking that the volumes of a seed
//! cover every disk exactly once.
//!
//! Invariants:
//! - [`ExtentBuilder`] yields what [`super::decode`] accepts: contiguous extents, adjacent
//!   zero ranges merged up to [`MAX_ZERO_EXTENT_BYTES`], data extents of at most one chunk.
//! - [`check_coverage`] accepts a set of volumes only if they are of one seed, their numbers
//!   are `0..count` with none missing or repeated, and each disk's parts tile `[0, size)`.

use std::collections::BTreeMap;

use super::{DiskManifest, Extent, ExtentKind, Manifest, BLOCK_BYTES, MAX_ZERO_EXTENT_BYTES};
use crate::seed::chunk::MAX_CHUNK_BYTES;
use crate::seed::FormatError;

/// Most missing volume numbers an error lists (the rest are counted).
pub const MAX_LISTED_MISSING: usize = 32;

/// Turns the ranges an export reads, in disk order, into a disk part's extents.
#[derive(Debug, Clone)]
pub struct ExtentBuilder {
    extents: Vec<Extent>,
    end_bytes: u64,
}

impl ExtentBuilder {
    /// A part starting at `first_offset_bytes` (4 KiB aligned).
    pub fn new(first_offset_bytes: u64) -> Self {
        assert!(first_offset_bytes % u64::from(BLOCK_BYTES) == 0);
        Self {
            extents: Vec::new(),
            end_bytes: first_offset_bytes,
        }
    }

    /// Where the next range must start: the end of the extents so far.
    pub fn end_bytes(&self) -> u64 {
        self.end_bytes
    }

    /// Adds `len_bytes` of zeros at `offset_bytes` (the current end), merged with a zero
    /// extent before it; split at [`MAX_ZERO_EXTENT_BYTES`]. Only a disk's last range may
    /// have an unaligned length.
    pub fn push_zero(&mut self, offset_bytes: u64, mut len_bytes: u64) {
        self.check_next(offset_bytes);
        while len_bytes > 0 {
            let mergeable = self.extents.last().is_some_and(|last| {
                last.kind == ExtentKind::Zero && last.len_bytes < MAX_ZERO_EXTENT_BYTES
            });
            if !mergeable {
                self.extents.push(Extent {
                    offset_bytes: self.end_bytes,
                    len_bytes: 0,
                    kind: ExtentKind::Zero,
                });
            }
            let last = self.extents.last_mut().expect("a zero extent at the end");
            let take = len_bytes.min(u64::from(MAX_ZERO_EXTENT_BYTES - last.len_bytes));
            last.len_bytes += u32::try_from(take).expect("at most MAX_ZERO_EXTENT_BYTES");
            self.end_bytes += take;
            len_bytes -= take;
        }
    }

    /// Adds a data extent of `len_bytes` (at most one chunk) at `offset_bytes` (the current
    /// end), sealed as chunk `sequence` at `volume_offset_bytes` with `digest`.
    pub fn push_data(
        &mut self,
        offset_bytes: u64,
        len_bytes: u32,
        volume_offset_bytes: u64,
        sequence: u64,
        digest: [u8; 32],
    ) {
        self.check_next(offset_bytes);
        assert!(
            len_bytes > 0 && len_bytes as usize <= MAX_CHUNK_BYTES,
            "data extent of {len_bytes} bytes"
        );
        self.extents.push(Extent {
            offset_bytes,
            len_bytes,
            kind: ExtentKind::Data {
                volume_offset_bytes,
                sequence,
                digest,
            },
        });
        self.end_bytes += u64::from(len_bytes);
    }

    fn check_next(&self, offset_bytes: u64) {
        assert_eq!(
            offset_bytes, self.end_bytes,
            "ranges must be contiguous, in order"
        );
        if let Some(last) = self.extents.last() {
            assert!(
                last.len_bytes % BLOCK_BYTES == 0,
                "range after the disk's end"
            );
        }
    }

    /// The extents so far.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// The extents, in disk order.
    pub fn into_extents(self) -> Vec<Extent> {
        self.extents
    }
}

/// The ranges of a data range split into chunk-sized extents (offset, length).
pub fn data_chunks(offset_bytes: u64, len_bytes: u64) -> impl Iterator<Item = (u64, u32)> {
    let end = offset_bytes + len_bytes;
    (offset_bytes..end).step_by(MAX_CHUNK_BYTES).map(move |at| {
        (
            at,
            u32::try_from((end - at).min(MAX_CHUNK_BYTES as u64)).expect("1 MiB"),
        )
    })
}

/// Checks that `manifests` are all the volumes of one seed and cover each of its disks
/// exactly once; names the missing volumes otherwise.
pub fn check_coverage(manifests: &[Manifest]) -> Result<(), FormatError> {
    let Some(first) = manifests.first() else {
        return Err(FormatError::MissingVolumes {
            missing: vec![0],
            missing_count: 1,
            count_known: false,
        });
    };
    let mut volumes = BTreeMap::new();
    let mut count = None;
    for manifest in manifests {
        if manifest.seed_id != first.seed_id {
            return Err(FormatError::invalid("volumes of different seeds"));
        }
        if volumes.insert(manifest.volume, manifest).is_some() {
            return Err(FormatError::invalid(format!(
                "volume {} given twice",
                manifest.volume
            )));
        }
        if manifest.volume_count != 0 {
            if count.is_some_and(|count| count != manifest.volume_count) {
                return Err(FormatError::invalid("volumes disagree on the volume count"));
            }
            count = Some(manifest.volume_count);
        }
    }
    check_volume_numbers(&volumes, count)?;
    let mut disks: BTreeMap<u32, Vec<&DiskManifest>> = BTreeMap::new();
    for manifest in volumes.values() {
        for disk in &manifest.disks {
            disks.entry(disk.index).or_default().push(disk);
        }
    }
    disks
        .values_mut()
        .try_for_each(|parts| check_disk_tiling(parts))
}

fn check_volume_numbers(
    volumes: &BTreeMap<u32, &Manifest>,
    count: Option<u32>,
) -> Result<(), FormatError> {
    let last_present = *volumes.keys().next_back().expect("at least one volume");
    let (end, count_known) = match count {
        Some(count) if last_present >= count => {
            return Err(FormatError::invalid(format!(
                "volume {last_present} beyond the count"
            )));
        }
        Some(count) => (count, true),
        None => (last_present.saturating_add(2), false),
    };
    // The count comes from a medium: never list more than MAX_LISTED_MISSING numbers.
    let present_below_end = volumes.range(..end).count() as u64;
    let missing_count = u64::from(end) - present_below_end;
    let missing: Vec<u32> = (0..end)
        .filter(|v| !volumes.contains_key(v))
        .take(MAX_LISTED_MISSING)
        .collect();
    if missing_count == 0 {
        Ok(())
    } else {
        Err(FormatError::MissingVolumes {
            missing,
            missing_count,
            count_known,
        })
    }
}

/// The parts of one disk (from all volumes) tile `[0, size)`, and agree on what the disk is.
fn check_disk_tiling(parts: &mut [&DiskManifest]) -> Result<(), FormatError> {
    parts.sort_by_key(|part| (part.first_offset_bytes, part.end_offset_bytes));
    let first = parts[0];
    let same = |part: &DiskManifest| {
        (
            &part.export,
            part.size_bytes,
            part.job_id,
            &part.tracker,
            part.tracker_generation,
        ) == (
            &first.export,
            first.size_bytes,
            first.job_id,
            &first.tracker,
            first.tracker_generation,
        )
    };
    let not_covered = |offset_bytes| FormatError::Coverage {
        disk: first.index,
        export: first.export.clone(),
        offset_bytes,
    };
    let mut at_bytes = 0;
    for part in parts
        .iter()
        .filter(|part| part.first_offset_bytes < part.end_offset_bytes)
    {
        if !same(part) {
            return Err(FormatError::invalid(format!(
                "disk {} is not the same disk on every volume",
                first.index
            )));
        }
        if part.first_offset_bytes != at_bytes {
            return Err(not_covered(at_bytes.min(part.first_offset_bytes)));
        }
        at_bytes = part.end_offset_bytes;
    }
    if at_bytes != first.size_bytes {
        return Err(not_covered(at_bytes));
    }
    Ok(())
}
