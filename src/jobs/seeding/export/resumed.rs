//! Continuing a stopped export from its checkpoint: the volume being written reopened (its
//! header ours and still being written), its manifest so far rebuilt from the recorded
//! parts, and sequences taken above the highest reservation.

use super::{ExportDisk, ExportOutcome, SeedWriter, VolumeWriter};
use crate::jobs::seeding::checkpoint::Resume;
use crate::jobs::seeding::SeedRunError;
use crate::seed::chunk::{sealed_len, MAX_CHUNK_BYTES};
use crate::seed::header::{VolumeState, HEADER_BYTES};
use crate::seed::manifest::{
    DiskManifest, Extent, ExtentBuilder, ExtentKind, Manifest, BLOCK_BYTES,
};
use crate::seed::volume::{self, Media};
use crate::seed::FormatError;

/// The volume a stopped export was writing, ready to continue (a new one when the stop came
/// right after a seal).
pub(super) fn reopen_volume(
    seed: &SeedWriter<'_>,
    resume: &Resume,
    disks: &[ExportDisk],
    outcome: &mut ExportOutcome,
) -> Result<VolumeWriter, SeedRunError> {
    let number = resume.sealed;
    let index = usize::try_from(number).unwrap_or(usize::MAX);
    let path = seed
        .media
        .get(index)
        .or_else(|| seed.media.last().filter(|path| path.is_dir()))
        .ok_or(SeedRunError::MediaFull { volume: number })?;
    let (file, capacity_bytes, shown) = match Media::classify(path)? {
        Media::Dir(dir) => {
            let shown = dir.join(volume::file_name(seed.keys.seed_id(), number));
            match volume::open_in_dir(&dir, seed.keys.seed_id(), number, true) {
                Ok(file) => (file, None, shown),
                Err(FormatError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound && resume.parts.is_empty() =>
                {
                    return seed.open_volume(number, outcome);
                }
                Err(err) => return Err(err.into()),
            }
        }
        Media::Raw(raw) => {
            let file = volume::open_raw(&raw, true)?;
            let size = file.size_bytes().map_err(SeedRunError::io("size", &raw))?;
            (file, Some(size), raw)
        }
    };
    let header = volume::read_header(&file, seed.keys)?;
    if header.volume != number || header.state != VolumeState::Writing {
        return Err(SeedRunError::Refused(format!(
            "{}: not volume {number} of this seed being written",
            shown.display()
        )));
    }
    outcome.volumes.push(shown);
    let mut writer = VolumeWriter {
        file,
        header,
        number,
        next_offset_bytes: HEADER_BYTES as u64,
        // Every sequence below the reservation may have been used: start above it.
        next_sequence: resume.reserved_until,
        capacity_bytes,
        manifest: Manifest {
            seed_id: *seed.keys.seed_id(),
            source_agent: seed.source_agent.clone(),
            volume: number,
            volume_count: 0,
            disks: Vec::new(),
        },
        extents_on_volume: 0,
        reserved_until: resume.reserved_until,
        resumed_part: None,
    };
    for (disk_index, extents, end) in &resume.parts {
        let disk = disks
            .iter()
            .find(|disk| disk.index == *disk_index)
            .ok_or_else(|| SeedRunError::Refused("checkpoint names an unknown disk".into()))?;
        for extent in extents {
            if let ExtentKind::Data {
                volume_offset_bytes,
                ..
            } = extent.kind
            {
                let chunk_end = volume_offset_bytes + sealed_len(extent.len_bytes as usize) as u64;
                writer.next_offset_bytes = writer.next_offset_bytes.max(chunk_end);
            }
        }
        writer.extents_on_volume += extents.len() as u64;
        match end {
            Some(end_unix_ms) => {
                writer
                    .manifest
                    .disks
                    .push(part_manifest(disk, extents, *end_unix_ms)?)
            }
            None => writer.resumed_part = Some((*disk_index, extents.clone())),
        }
    }
    Ok(writer)
}

/// A complete part of `disk` on the volume, from its recorded extents.
fn part_manifest(
    disk: &ExportDisk,
    extents: &[Extent],
    end_unix_ms: u64,
) -> Result<DiskManifest, SeedRunError> {
    let first = extents.first().map_or(0, |e| e.offset_bytes);
    let builder = rebuild_all(first, extents)?;
    Ok(DiskManifest {
        index: disk.index,
        export: disk.export.name().to_string(),
        size_bytes: disk.export.size_bytes(),
        block_bytes: BLOCK_BYTES,
        job_id: disk.job_id,
        tracker: disk.tracker.0.clone(),
        tracker_generation: disk.tracker.1,
        start_unix_ms: disk.start_unix_ms,
        end_unix_ms,
        first_offset_bytes: first,
        end_offset_bytes: builder.end_bytes(),
        extents: builder.into_extents(),
    })
}

/// The builder of a part in progress: its recorded extents, less a trailing zero extent
/// (it would grow, and its range is simply read again).
pub(super) fn rebuild(extents: &[Extent]) -> Result<ExtentBuilder, SeedRunError> {
    let keep = match extents.last() {
        Some(last) if last.kind == ExtentKind::Zero => extents.len() - 1,
        _ => extents.len(),
    };
    let first = extents.first().map_or(0, |e| e.offset_bytes);
    rebuild_all(first, &extents[..keep])
}

/// A builder holding exactly `extents`, each checked before it is added.
fn rebuild_all(first: u64, extents: &[Extent]) -> Result<ExtentBuilder, SeedRunError> {
    let bad = || SeedRunError::Refused("damaged checkpoint: extents out of order".into());
    if first % u64::from(BLOCK_BYTES) != 0 {
        return Err(bad());
    }
    let mut builder = ExtentBuilder::new(first);
    for (i, extent) in extents.iter().enumerate() {
        let aligned = extent.len_bytes % BLOCK_BYTES == 0;
        if extent.offset_bytes != builder.end_bytes() || extent.len_bytes == 0 {
            return Err(bad());
        }
        if !aligned && i + 1 != extents.len() {
            return Err(bad());
        }
        match extent.kind {
            ExtentKind::Zero => builder.push_zero(extent.offset_bytes, u64::from(extent.len_bytes)),
            ExtentKind::Data {
                volume_offset_bytes,
                sequence,
                digest,
            } => {
                if extent.len_bytes as usize > MAX_CHUNK_BYTES {
                    return Err(bad());
                }
                builder.push_data(
                    extent.offset_bytes,
                    extent.len_bytes,
                    volume_offset_bytes,
                    sequence,
                    digest,
                );
            }
        }
    }
    Ok(builder)
}
