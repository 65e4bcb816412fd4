//! Seeds on portable media (`docs/seed-format.md`): the protection of what a medium carries.
//!
//! Purpose: a seed carries live disks from one site to another on a medium that travels by
//! courier. This module holds the parts every seed operation shares and that need no I/O:
//! the keys of a seed ([`keys`]) and the sealing of its data chunks ([`chunk`]). Export,
//! import and catch-up build on it.
//!
//! Invariants:
//! - Every byte a seed puts on a medium is encrypted and authenticated, and every chunk is
//!   bound to its place (seed, disk, disk offset, volume): a chunk moved, swapped, altered or
//!   taken from another seed fails to open.
//! - Nothing read from a medium is trusted before its tag verified; errors name what failed,
//!   never the key.

pub mod chunk;
pub mod keys;

pub use chunk::{ChunkPlace, SealedChunk};
pub use keys::SeedKeys;

/// Why a sealed part of a medium was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SeedError {
    /// The chunk's tag did not verify: altered, moved, from another seed, or another key.
    #[error("chunk at disk {disk} offset {offset_bytes} (volume {volume}) failed authentication")]
    Forged {
        /// Index of the disk in the seed.
        disk: u32,
        /// Where the chunk belongs on the disk.
        offset_bytes: u64,
        /// The volume it was read from.
        volume: u32,
    },
    /// The chunk is shorter than its tag, or longer than a chunk may be.
    #[error("chunk of {len_bytes} bytes is not a sealed chunk")]
    Malformed {
        /// Bytes read.
        len_bytes: usize,
    },
}
