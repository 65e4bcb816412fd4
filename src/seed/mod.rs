//! Seeds on portable media (`docs/seed-format.md`): the format of what a medium carries.
//!
//! Purpose: a seed carries live disks from one site to another on a medium that travels by
//! courier. This module holds the parts every seed operation shares: the keys of a seed
//! ([`keys`]), the sealing of its data chunks ([`chunk`]), the volume header ([`header`]),
//! the manifest and its coverage check ([`manifest`]), and volumes as files or raw devices
//! ([`volume`]). Export, import and catch-up build on it.
//!
//! Invariants:
//! - Every byte a seed puts on a medium is encrypted or authenticated (the header is clear
//!   and authenticated; chunks and manifests are encrypted), and every chunk is bound to its
//!   place (seed, disk, disk offset, volume): a chunk moved, swapped, altered or taken from
//!   another seed fails to open.
//! - No (key, nonce) pair repeats: on a volume, chunk sequences are below `u64::MAX - 1`,
//!   the manifest uses `u64::MAX`, and the header uses no nonce at all (a keyed MAC).
//! - Nothing read from a medium is trusted before it verified, and every length read from
//!   it is bounded before anything is allocated; errors name what failed, never the key.

use std::io;
use std::path::PathBuf;

pub mod chunk;
pub mod header;
pub mod keys;
pub mod manifest;
pub mod volume;

pub use chunk::{ChunkPlace, SealedChunk};
pub use header::{Header, KeySource, VolumeState};
pub use keys::SeedKeys;
pub use manifest::{check_coverage, DiskManifest, Extent, ExtentBuilder, ExtentKind, Manifest};
pub use volume::Media;

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

/// Why a volume's header or manifest, or a set of volumes, was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Fewer bytes than the structure needs.
    #[error("{what} is truncated")]
    Truncated {
        /// The structure.
        what: &'static str,
    },
    /// The header does not start with `FERRYSED`: not a seed volume.
    #[error("not a ferry seed volume (bad magic)")]
    BadMagic,
    /// A format version this build does not read.
    #[error("seed format version {found} is not supported (this build reads 1)")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// The key's check value differs from the header's: the wrong cluster or seed key.
    #[error("wrong key for this seed")]
    WrongKey,
    /// The header's MAC does not verify (or its padding is not zero): altered or damaged.
    #[error("volume header failed authentication")]
    HeaderForged,
    /// An authenticated header holds a value this format does not allow.
    #[error("volume header is invalid: {0}")]
    HeaderInvalid(&'static str),
    /// The volume was never sealed (an interrupted export).
    #[error("volume is not sealed")]
    NotSealed,
    /// The manifest's MAC does not verify: damaged (or altered) on the medium.
    #[error("manifest damaged")]
    ManifestDamaged,
    /// The manifest's MAC verified but its AEAD tag did not: made with the MAC key but not
    /// by this seed's writer.
    #[error("manifest failed authentication")]
    ManifestForged,
    /// A manifest field breaks the format's rules (the field is named).
    #[error("manifest is invalid: {0}")]
    ManifestInvalid(String),
    /// The manifest is longer than a manifest may be, or than its volume.
    #[error("manifest of {len_bytes} bytes is longer than {max_bytes}")]
    ManifestTooLong {
        /// The length the header gives.
        len_bytes: u64,
        /// The bound.
        max_bytes: u64,
    },
    /// Volumes of the seed are missing: the disks are not fully covered without them.
    #[error("{}", missing_message(missing, *missing_count, *count_known))]
    MissingVolumes {
        /// The first volume numbers missing, at most 32 (when the count is unknown, the next
        /// after the last present is included).
        missing: Vec<u32>,
        /// How many are missing in all.
        missing_count: u64,
        /// Whether the seed's volume count is known (its last volume is present).
        count_known: bool,
    },
    /// The volumes present do not cover a disk exactly once.
    #[error("disk {disk} ({export}) is not covered exactly once at offset {offset_bytes}")]
    Coverage {
        /// Index of the disk.
        disk: u32,
        /// Its export name.
        export: String,
        /// The first offset covered twice or not at all.
        offset_bytes: u64,
    },
    /// The path is not usable as a volume (its type, or a mounted device to write).
    #[error("{} cannot hold a seed volume: {reason}", path.display())]
    NotAVolume {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// An I/O operation on a volume failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// The operation.
        what: &'static str,
        /// The volume or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn missing_message(missing: &[u32], missing_count: u64, count_known: bool) -> String {
    let list: Vec<String> = missing.iter().map(u32::to_string).collect();
    let listed = if missing_count > missing.len() as u64 {
        format!(", ... ({missing_count} in all)")
    } else {
        String::new()
    };
    let more = if count_known {
        ""
    } else {
        " (and any after it: the last volume is not present)"
    };
    format!("seed volumes missing: {}{listed}{more}", list.join(", "))
}

impl FormatError {
    /// A closure mapping an `io::Error` of operation `what` on `path` to [`FormatError::Io`].
    pub fn io<'a>(
        what: &'static str,
        path: &'a std::path::Path,
    ) -> impl FnOnce(io::Error) -> Self + 'a {
        move |source| Self::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }

    fn invalid(what: impl Into<String>) -> Self {
        Self::ManifestInvalid(what.into())
    }
}
