//! NBD_CMD_BLOCK_STATUS: the `base:allocation` context from SEEK_DATA/SEEK_HOLE on the image,
//! one `qemu:dirty-bitmap:NAME` context per tracker (bit 0 set = dirty since the tracker
//! was created or last taken, the meaning backup tools already read), and write heat.
//!
//! Heat contexts, named like the dirty-bitmap ones: `ferry:heat:NAME` is the heat of tracker
//! NAME (each tracker has its own half-life), and `ferry:heat` (offered when the export has a
//! tracker) is the hottest of all its trackers at each byte. The extent flags carry the heat
//! *level*, the bucket index of [`crate::dirty::heat_bucket`]: 0 = cold, 1 = one write in
//! about the last half-life, 2 = 2-3, 3 = 4-7, ..., 8 = 128-255 (the counter saturates).
//! Heat is kept per region (1 MiB, or a block when larger, or coarser on disks over 64 GiB:
//! see [`crate::dirty::heat_shift_for`]), so extents follow region boundaries, clipped to the
//! request; adjacent regions of equal level are one extent. When the export forwards to
//! another agent, the local counters say nothing: all cold.
//!
//! Invariants: every context answers at least one extent; extents have non-zero lengths, are
//! contiguous from the request's offset and never extend past the requested range; at most
//! [`EXTENTS_MAX`] descriptors per context, one with NBD_CMD_FLAG_REQ_ONE (the client asks
//! again for the rest).

use crate::dirty::heat::heat_bucket;
use crate::disk::Export;
use crate::nbd::wire::{self, NbdErrno, RequestHeader};

/// Descriptors per context per reply.
pub const EXTENTS_MAX: usize = 1024;
/// `base:allocation` flag: the range is a hole.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the range reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:` flag: the range is dirty.
pub const STATE_DIRTY: u32 = 1;

const DIRTY_PREFIX: &str = "qemu:dirty-bitmap:";
/// The heat context of all trackers (the hottest at each byte).
pub const HEAT_CONTEXT: &str = "ferry:heat";
/// Prefix of the heat context of one tracker: `ferry:heat:NAME`.
pub const HEAT_PREFIX: &str = "ferry:heat:";

/// Appends one BLOCK_STATUS chunk per selected context to `out`, the last with DONE.
/// `forwarded`: the disk lives at another agent now, so the local image and trackers say
/// nothing about it; the answer is then the safe one (all data, all dirty).
pub fn encode_reply(
    export: &Export,
    contexts: &[(u32, String)],
    header: &RequestHeader,
    forwarded: bool,
    out: &mut Vec<u8>,
) -> Result<(), NbdErrno> {
    if contexts.is_empty() {
        return Err(NbdErrno::Inval);
    }
    let offset_bytes = header.offset_bytes;
    let len_bytes = u64::from(header.length_bytes);
    let limit = if header.req_one() { 1 } else { EXTENTS_MAX };
    let mut all = Vec::with_capacity(contexts.len());
    for (id, name) in contexts {
        let extents = if forwarded {
            let state = if name.starts_with(DIRTY_PREFIX) {
                STATE_DIRTY
            } else {
                0
            };
            vec![(header.length_bytes, state)]
        } else {
            context_extents(export, name, offset_bytes, len_bytes, limit)?
        };
        all.push((*id, extents));
    }
    let last = all.len() - 1;
    for (index, (id, extents)) in all.iter().enumerate() {
        wire::encode_block_status(out, header.cookie, *id, extents, index == last);
    }
    Ok(())
}

/// Extents of context `name` over `[offset, offset+len)` on the local image and trackers.
fn context_extents(
    export: &Export,
    name: &str,
    offset_bytes: u64,
    len_bytes: u64,
    limit: usize,
) -> Result<Vec<(u32, u32)>, NbdErrno> {
    if name == "base:allocation" {
        return Ok(allocation(export, offset_bytes, len_bytes, limit));
    }
    if let Some(tracker_name) = name.strip_prefix(DIRTY_PREFIX) {
        // A tracker removed after SET_META_CONTEXT can no longer answer.
        let tracker = export.trackers().get(tracker_name).ok_or(NbdErrno::Inval)?;
        let runs = tracker.dirty_runs(offset_bytes, len_bytes);
        return Ok(runs
            .into_iter()
            .take(limit)
            .map(|(run_bytes, dirty)| (to_u32(run_bytes), if dirty { STATE_DIRTY } else { 0 }))
            .collect());
    }
    let runs = if name == HEAT_CONTEXT {
        let trackers = export.trackers().list();
        let mut runs: Option<Vec<(u64, u8)>> = None;
        for tracker in &trackers {
            let next = tracker.heat_runs(offset_bytes, len_bytes);
            runs = Some(match runs {
                None => next,
                Some(runs) => max_runs(&runs, &next),
            });
        }
        // Every tracker removed since SET_META_CONTEXT: nothing can answer.
        runs.ok_or(NbdErrno::Inval)?
    } else if let Some(tracker_name) = name.strip_prefix(HEAT_PREFIX) {
        let tracker = export.trackers().get(tracker_name).ok_or(NbdErrno::Inval)?;
        tracker.heat_runs(offset_bytes, len_bytes)
    } else {
        return Err(NbdErrno::Inval);
    };
    Ok(heat_extents(&runs, limit))
}

/// NBD extents of heat `runs` (`(bytes, heat)`, from `Tracker::heat_runs`): flags are the heat
/// level ([`heat_bucket`]), runs of equal level are merged, at most `limit` extents. Pure:
/// the encoding the module docs promise, tested below.
pub fn heat_extents(runs: &[(u64, u8)], limit: usize) -> Vec<(u32, u32)> {
    assert!(limit > 0, "at least one extent per reply");
    let mut extents: Vec<(u32, u32)> = Vec::new();
    for &(run_bytes, heat) in runs.iter().filter(|&&(bytes, _)| bytes > 0) {
        let level = u32::try_from(heat_bucket(heat)).expect("bucket index 0-8");
        let full = extents.len() == limit;
        match extents.last_mut() {
            Some((bytes, last)) if *last == level => *bytes += to_u32(run_bytes),
            _ if full => break,
            _ => extents.push((to_u32(run_bytes), level)),
        }
    }
    extents
}

/// Per-byte maximum of two run lists covering the same range (`(bytes, heat)` each); the
/// result's runs split where either input's do (and may repeat a heat).
pub fn max_runs(left: &[(u64, u8)], right: &[(u64, u8)]) -> Vec<(u64, u8)> {
    let mut merged = Vec::with_capacity(left.len() + right.len());
    let (mut left, mut right) = (left.iter().copied(), right.iter().copied());
    let (mut a, mut b) = (left.next(), right.next());
    while let (Some((a_bytes, a_heat)), Some((b_bytes, b_heat))) = (a, b) {
        let step = a_bytes.min(b_bytes);
        merged.push((step, a_heat.max(b_heat)));
        a = if a_bytes > step {
            Some((a_bytes - step, a_heat))
        } else {
            left.next()
        };
        b = if b_bytes > step {
            Some((b_bytes - step, b_heat))
        } else {
            right.next()
        };
    }
    merged
}

/// Runs are bounded by the request length, which is a u32.
fn to_u32(bytes: u64) -> u32 {
    u32::try_from(bytes).expect("extent within a u32 request")
}

/// Data and hole extents of `[offset, offset+len)` from SEEK_DATA/SEEK_HOLE. Where the file
/// system cannot tell (a block device, an old file system), the range is reported as data:
/// the safe answer, since data is always allowed to read as zeros.
fn allocation(export: &Export, offset_bytes: u64, len_bytes: u64, limit: usize) -> Vec<(u32, u32)> {
    let end = offset_bytes + len_bytes;
    let mut extents = Vec::new();
    let mut pos = offset_bytes;
    while pos < end && extents.len() < limit {
        let next = match export.image().and_then(|image| image.seek_data(pos)) {
            Err(_) => {
                extents.push((to_u32(end - pos), 0));
                break;
            }
            Ok(None) => {
                extents.push((to_u32(end - pos), STATE_HOLE | STATE_ZERO));
                break;
            }
            Ok(Some(data)) if data > pos => {
                let stop = data.min(end);
                extents.push((to_u32(stop - pos), STATE_HOLE | STATE_ZERO));
                stop
            }
            Ok(Some(_)) => {
                let hole = export
                    .image()
                    .and_then(|image| image.seek_hole(pos))
                    .ok()
                    .flatten()
                    .unwrap_or(export.size_bytes());
                let stop = hole.clamp(pos + 1, end);
                extents.push((to_u32(stop - pos), 0));
                stop
            }
        };
        pos = next;
    }
    extents
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heat_extents_carry_levels_and_merge_equal_ones() {
        // Goal: flags are bucket indexes, equal levels merge, lengths add up. Method: runs of
        // heat 0, 2, 3 (both level 2), 255, 1, 1, 0-length; compare the extents.
        let runs = [(10, 0), (20, 2), (30, 3), (5, 255), (0, 9), (7, 1), (8, 1)];
        assert_eq!(
            heat_extents(&runs, EXTENTS_MAX),
            vec![(10, 0), (50, 2), (5, 8), (15, 1)]
        );
    }

    #[test]
    fn heat_extents_respect_the_limit() {
        // Goal: REQ_ONE gives one extent, a limit cuts at a level change but still merges the
        // run it ends on. Method: limits 1 and 2 over alternating levels.
        let runs = [(4, 1), (4, 1), (4, 0), (4, 16), (4, 0)];
        assert_eq!(heat_extents(&runs, 1), vec![(8, 1)]);
        assert_eq!(heat_extents(&runs, 2), vec![(8, 1), (4, 0)]);
        let levels: Vec<u32> = (0..=255u8)
            .map(|heat| heat_extents(&[(1, heat)], 1)[0].1)
            .collect();
        assert_eq!((levels[0], levels[1], levels[3], levels[4]), (0, 1, 2, 3));
        assert_eq!((levels[127], levels[128], levels[255]), (7, 8, 8));
    }

    #[test]
    fn max_runs_takes_the_hotter_at_each_byte() {
        // Goal: the all-trackers context is the per-byte maximum. Method: two run lists split
        // at different places over 30 bytes.
        let left = [(10, 4), (20, 0)];
        let right = [(5, 0), (10, 9), (15, 1)];
        let merged = max_runs(&left, &right);
        assert_eq!(merged, vec![(5, 4), (5, 9), (5, 9), (15, 1)]);
        assert_eq!(
            heat_extents(&merged, EXTENTS_MAX),
            vec![(5, 3), (10, 4), (15, 1)]
        );
    }
}
