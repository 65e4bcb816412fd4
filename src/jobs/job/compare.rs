//! The source's side of comparing its image with the destination's: the whole-image digest
//! at the switchover ([`JobEnv::verify_images`]) and the per-block digests a resume uses to
//! send only the blocks that differ ([`JobEnv::differing`]).
//!
//! Invariants:
//! - Both run with the destination's answers bounded: digests are asked for a window of
//!   [`DIGEST_WINDOW_BLOCKS`] at a time, and a block whose digest is missing counts as
//!   differing (sent again, never skipped).
//! - Out of threads, the source image is hashed inline: slower, never an abort.

use super::{JobEnv, JobError, VerifyOutcome, DIGEST_WINDOW_BLOCKS};
use crate::dirty::DirtySet;
use crate::transfer::TransferError;

impl JobEnv {
    /// Hashes both images (writes are held: this is the switchover point) and refuses to
    /// commit when they differ.
    pub(super) fn verify_images(&mut self) -> Result<(), JobError> {
        let started = self.clock.now_ns();
        let file = self.export.image().map_err(JobError::Allocation)?;
        let size_bytes = self.export.size_bytes();
        let hasher = std::thread::Builder::new()
            .name("ferry-verify-hash".into())
            .spawn({
                let file = file.clone();
                move || crate::transfer::hash_image(&file, size_bytes)
            });
        let remote = self.sender.verify().map_err(JobError::Transfer);
        let local = match hasher {
            Ok(hasher) => hasher.join().unwrap_or_else(|_| {
                Err(TransferError::Refused {
                    reason: "hash thread panicked".into(),
                })
            }),
            // Out of threads: hash here, after the destination's (slower, never an abort).
            Err(err) => {
                log::warn!("cannot start a hash thread ({err}): hashing the source inline");
                crate::transfer::hash_image(&file, size_bytes)
            }
        }
        .map_err(JobError::VerifyRead)?;
        let remote = remote?;
        let outcome = VerifyOutcome {
            matched: local == remote,
            source_digest: hex(&local),
            destination_digest: hex(&remote),
            elapsed_ms: (self.clock.now_ns() - started) as f64 / 1e6,
        };
        if let Some(slot) = &self.verify {
            *slot.lock().expect("verify lock") = Some(outcome.clone());
        }
        if outcome.matched {
            Ok(())
        } else {
            Err(JobError::VerifyMismatch {
                source_digest: outcome.source_digest,
                destination_digest: outcome.destination_digest,
            })
        }
    }
}

impl JobEnv {
    /// The blocks of `set` whose content differs at the destination (BLAKE3 per block).
    pub(super) fn differing(&mut self, set: &DirtySet) -> Result<DirtySet, JobError> {
        let granularity = set.granularity_bytes();
        let block_bytes = u32::try_from(granularity)
            .map_err(|_| JobError::Allocation(std::io::Error::other("granularity above 4 GiB")))?;
        let disk = self.export.size_bytes();
        let mut differing = DirtySet::empty(granularity, disk);
        let mut buf = vec![0u8; block_bytes as usize];
        let image = self.export.image().map_err(JobError::Allocation)?;
        // A window of blocks at a time: a whole-disk extent at 4 KiB is 2^28 digests per TiB.
        let windows = set.iter_extents().flat_map(|(offset_bytes, len_bytes)| {
            let (first, end) = (
                offset_bytes / granularity,
                (offset_bytes + len_bytes).div_ceil(granularity),
            );
            (first..end)
                .step_by(DIGEST_WINDOW_BLOCKS as usize)
                .map(move |start| (start, (end - start).min(DIGEST_WINDOW_BLOCKS)))
        });
        for (first_block, count) in windows {
            let remote = self
                .sender
                .digests(first_block, count, block_bytes)
                .map_err(JobError::Transfer)?;
            for block in first_block..first_block + count {
                let at = block * granularity;
                let len = usize::try_from((disk - at).min(granularity)).expect("≤ block");
                image
                    .read_at(at, &mut buf[..len])
                    .map_err(JobError::Allocation)?;
                self.bytes_read += len as u64;
                let index = usize::try_from(block - first_block).expect("fits");
                let same = remote
                    .get(index)
                    .is_some_and(|digest| digest == blake3::hash(&buf[..len]).as_bytes());
                if !same {
                    differing.insert(block);
                }
            }
        }
        Ok(differing)
    }
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
