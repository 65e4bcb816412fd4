//! Seeds on portable media, run on real exports and images (`docs/seed-format.md`): the copy
//! of live disks onto a medium ([`export`]), the verified copy of a medium into images at the
//! destination ([`import`]), and what both report while they run.
//!
//! Invariants: these engines only read and write the files they are given; what is recorded
//! where (journal steps, trackers, image files) is decided by the agent that calls them,
//! before and after. Errors name the volume, disk and offset concerned, never a key.

pub mod checkpoint;
pub mod export;
pub mod import;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::seed::{FormatError, SeedError};

pub use super::sync::unix_ms;

/// Why a seed export or import stopped.
#[derive(Debug, thiserror::Error)]
pub enum SeedRunError {
    /// The medium's format refused something (or its I/O failed).
    #[error(transparent)]
    Format(#[from] FormatError),
    /// A chunk failed authentication or is malformed.
    #[error(transparent)]
    Chunk(#[from] SeedError),
    /// A chunk opened but its digest differs from the manifest's.
    #[error("extent at disk {disk} offset {offset_bytes} (volume {volume}): digest mismatch")]
    DigestMismatch {
        /// Index of the disk.
        disk: u32,
        /// Offset of the extent.
        offset_bytes: u64,
        /// Volume it was read from.
        volume: u32,
    },
    /// Reading the source image failed.
    #[error("reading the source image")]
    Source(#[source] std::io::Error),
    /// A file operation failed.
    #[error("cannot {what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The io_uring could not be used.
    #[error("io_uring: {0}")]
    Ring(String),
    /// No medium left for the next volume.
    #[error("volume {volume} needs a medium: give another --media")]
    MediaFull {
        /// The volume without a medium.
        volume: u32,
    },
    /// A write to the medium wrote fewer bytes than asked.
    #[error("short write to the medium")]
    MediaShortWrite,
    /// Asked to stop.
    #[error("stopped")]
    Stopped,
    /// Something about the request or the state.
    #[error("{0}")]
    Refused(String),
}

impl SeedRunError {
    /// A constructor for `map_err`.
    pub fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SeedRunError {
        let path = path.to_path_buf();
        move |source| SeedRunError::Io { what, path, source }
    }
}

/// Progress of one seed run, shared with the status the API reports.
#[derive(Debug, Default)]
pub struct SeedProgress {
    /// Bytes of the disks to go through.
    pub total_bytes: AtomicU64,
    /// Plaintext bytes written as data chunks (export) or verified and written (import).
    pub data_bytes: AtomicU64,
    /// Bytes recorded as zeros.
    pub zero_bytes: AtomicU64,
    /// Bytes written to (export) or read from (import) the media.
    pub media_bytes: AtomicU64,
    /// The volume in use.
    pub volume: AtomicU64,
}

impl SeedProgress {
    /// A data chunk of `len` bytes went through, `media` bytes on the medium.
    pub fn add_data(&self, len: u64, media: u64) {
        self.data_bytes.fetch_add(len, Ordering::Relaxed);
        self.media_bytes.fetch_add(media, Ordering::Relaxed);
    }

    /// A zero extent of `len` bytes went through.
    pub fn add_zero(&self, len: u64) {
        self.zero_bytes.fetch_add(len, Ordering::Relaxed);
    }

    /// Bytes of the disks gone through.
    pub fn done_bytes(&self) -> u64 {
        self.data_bytes.load(Ordering::Relaxed) + self.zero_bytes.load(Ordering::Relaxed)
    }
}

/// What `GET /v1/seeds/{id}` returns: a seed export or import of this agent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeedRunStatus {
    /// The seed (hex).
    pub seed_id: String,
    /// "export" or "import".
    pub kind: String,
    /// "running", "done" or "failed".
    pub state: String,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// The disks, in seed order.
    pub disks: Vec<SeedDisk>,
    /// Bytes of the disks.
    pub total_bytes: u64,
    /// Plaintext bytes written as data (export) or verified and written (import).
    pub data_bytes: u64,
    /// Bytes recorded as zeros.
    pub zero_bytes: u64,
    /// Bytes written to or read from the media.
    pub media_bytes: u64,
    /// The volume in use.
    pub volume: u32,
    /// The volumes, as paths.
    #[serde(default)]
    pub volumes: Vec<PathBuf>,
    /// Time so far (ms).
    pub elapsed_ms: f64,
}

/// One disk of a seed run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeedDisk {
    /// The export (at the destination: the name it is imported as).
    pub export: String,
    /// The seed's job.
    pub job_id: u64,
    /// Size of the disk.
    pub size_bytes: u64,
    /// The image written (import).
    #[serde(default)]
    pub image_path: Option<PathBuf>,
}

/// Body of `POST /v1/seeds/export`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedExportRequest {
    /// Exports to put on the seed.
    pub exports: Vec<String>,
    /// Media in volume order: directories or raw devices.
    pub media: Vec<PathBuf>,
    /// Back off while the guest's write p99 exceeds this many ms (none: full speed).
    #[serde(default)]
    pub max_impact_ms: Option<u64>,
    /// A file holding a separate 32-byte seed key (hex), instead of the cluster key's.
    #[serde(default)]
    pub seed_key_file: Option<PathBuf>,
    /// Continue the stopped export of this seed (hex) instead of starting a new one
    /// (`exports` must name its disks).
    #[serde(default)]
    pub resume: Option<String>,
}

/// Body of `POST /v1/seeds/import`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedImportRequest {
    /// The seed's volumes (or directories holding them).
    pub media: Vec<PathBuf>,
    /// Import a one-disk seed under this export name.
    #[serde(default)]
    pub as_name: Option<String>,
    /// The separate seed key's file, if the seed was made with one.
    #[serde(default)]
    pub seed_key_file: Option<PathBuf>,
}

/// Body of `POST /v1/seeds/inspect`: what is on a medium.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedInspectRequest {
    /// The volumes (or directories holding them).
    pub media: Vec<PathBuf>,
    /// Read and verify every chunk, too.
    #[serde(default)]
    pub verify: bool,
    /// The separate seed key's file, if any.
    #[serde(default)]
    pub seed_key_file: Option<PathBuf>,
}

/// Body of `POST /v1/exports/{name}/seed-sync`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedSyncRequest {
    /// The destination's block-stream address.
    pub to: String,
    /// End when at most this many dirty bytes remain (besides the pause bound).
    #[serde(default)]
    pub threshold_bytes: Option<u64>,
    /// What to do once in sync.
    #[serde(default = "stop")]
    pub then: super::sync::SyncThen,
    /// Longest write hold at an in-sync point (ms; default 100).
    #[serde(default)]
    pub max_pause_ms: Option<u64>,
    /// Bandwidth cap of the stream.
    #[serde(default)]
    pub bandwidth_bytes_per_s: Option<u64>,
    /// The manager epoch the request was admitted at (set by the API server from the
    /// `Ferry-Manager-Epoch` header, never read from the body): the catch-up's Open and
    /// Commit are fenced at the destination.
    #[serde(skip)]
    pub manager_epoch: Option<u64>,
}

fn stop() -> super::sync::SyncThen {
    super::sync::SyncThen::Stop
}

/// What is on a medium (`ferry seed ls|show|verify`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeedInfo {
    /// The seed (hex).
    pub seed_id: String,
    /// Each volume found.
    pub volumes: Vec<VolumeInfo>,
    /// The disks (from the manifests; empty without the key).
    pub disks: Vec<SeedDiskInfo>,
    /// Whether every volume is present and covers every disk.
    pub complete: bool,
    /// Every chunk read and verified (`verify` only).
    #[serde(default)]
    pub verified: Option<bool>,
    /// What is wrong, each naming its place.
    pub problems: Vec<String>,
}

/// One volume of a medium.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Where it is.
    pub path: PathBuf,
    /// Its number.
    pub volume: u32,
    /// "writing" or "sealed".
    pub state: String,
}

/// One disk on a medium.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeedDiskInfo {
    /// The export it was copied from.
    pub export: String,
    /// Its size.
    pub size_bytes: u64,
    /// The source's job.
    pub job_id: u64,
    /// The seed tracker's generation.
    pub tracker_generation: u64,
    /// When the copy began (the tracker's creation) and ended (Unix ms).
    pub start_unix_ms: u64,
    /// When it ended.
    pub end_unix_ms: u64,
    /// Bytes stored as data and recorded as zeros.
    pub data_bytes: u64,
    /// Bytes recorded as zeros.
    pub zero_bytes: u64,
}
