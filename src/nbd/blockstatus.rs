//! NBD_CMD_BLOCK_STATUS: the `base:allocation` context from SEEK_DATA/SEEK_HOLE on the image,
//! and one `qemu:dirty-bitmap:NAME` context per tracker (bit 0 set = dirty since the tracker
//! was created or last taken, the meaning backup tools already read).
//!
//! Invariants: extents are contiguous from the request's offset and never extend past the
//! requested range; at most [`EXTENTS_MAX`] descriptors per context (the client asks again
//! for the rest).

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
            let state = if name == "base:allocation" {
                0
            } else {
                STATE_DIRTY
            };
            vec![(header.length_bytes, state)]
        } else if name == "base:allocation" {
            allocation(export, offset_bytes, len_bytes, limit)
        } else if let Some(tracker_name) = name.strip_prefix(DIRTY_PREFIX) {
            // A tracker removed after SET_META_CONTEXT can no longer answer.
            let tracker = export.trackers().get(tracker_name).ok_or(NbdErrno::Inval)?;
            let runs = tracker.dirty_runs(offset_bytes, len_bytes);
            runs.into_iter()
                .take(limit)
                .map(|(run_bytes, dirty)| (to_u32(run_bytes), if dirty { STATE_DIRTY } else { 0 }))
                .collect()
        } else {
            return Err(NbdErrno::Inval);
        };
        all.push((*id, extents));
    }
    let last = all.len() - 1;
    for (index, (id, extents)) in all.iter().enumerate() {
        wire::encode_block_status(out, header.cookie, *id, extents, index == last);
    }
    Ok(())
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
