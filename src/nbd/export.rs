//! One served export: the open image, its trackers, its counters and its live connections.
//!
//! Invariants: the image is opened once (O_DIRECT + a buffered descriptor) and held with an
//! OFD lock, so a second agent cannot serve the same image; a removed export refuses new
//! connections and closes the read side of live ones, which then drain and exit.

use std::collections::BTreeMap;
use std::net::Shutdown;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_sys::DirectFile;

use crate::api::types::{ExportStats, TrackerStatus};
use crate::dirty::{Tracker, TrackerSet};
use crate::metrics::LatencyRecorder;
use crate::nbd::conn::Conn;
use crate::nbd::mirror::MirrorSlot;
use crate::nbd::route::ExportRoute;
use crate::nbd::wire::ExportInfo;

/// Largest request ferry accepts (NBD_INFO_BLOCK_SIZE maximum).
pub const BLOCK_MAX_BYTES: u32 = 32 * 1024 * 1024;
/// Preferred request alignment advertised to clients.
pub const BLOCK_PREFERRED_BYTES: u32 = 4096;

/// Errors opening an export.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The image could not be opened.
    #[error("cannot open image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another process serves the image.
    #[error("image {path} is in use by another process")]
    Locked {
        /// The image.
        path: PathBuf,
        /// The lock error.
        #[source]
        source: std::io::Error,
    },
    /// The image has a size ferry cannot serve.
    #[error("image {path} has size {size_bytes}: {problem}")]
    BadSize {
        /// The image.
        path: PathBuf,
        /// Its size.
        size_bytes: u64,
        /// Why not.
        problem: &'static str,
    },
}

/// Counters shared by every connection of an export; sessions add their local counts in
/// batches, so the hot path does not bounce these cache lines per request.
#[derive(Debug, Default)]
pub struct ExportCounters {
    /// READ commands completed.
    pub read_ops: AtomicU64,
    /// Bytes returned by READ.
    pub read_bytes: AtomicU64,
    /// WRITE commands completed.
    pub write_ops: AtomicU64,
    /// Bytes written by WRITE.
    pub write_bytes: AtomicU64,
    /// FLUSH commands completed.
    pub flush_ops: AtomicU64,
    /// TRIM commands completed.
    pub trim_ops: AtomicU64,
    /// WRITE_ZEROES commands completed.
    pub zero_ops: AtomicU64,
}

/// A live connection as the export sees it: a clone of its socket, enough to shut it down.
#[derive(Debug)]
pub struct ConnectionHandle {
    /// Shutting down its read side makes the session drain and exit.
    pub conn: Conn,
}

/// A served export.
#[derive(Debug)]
pub struct Export {
    /// NBD export name.
    pub name: String,
    /// Image path as configured.
    pub path: PathBuf,
    /// Open image.
    pub file: Arc<DirectFile>,
    /// Image size.
    pub size_bytes: u64,
    /// Writes refused.
    pub read_only: bool,
    /// Default granularity of its trackers.
    pub granularity_bytes: u64,
    /// Default heat half-life of its trackers.
    pub half_life_ms: u64,
    /// Write trackers.
    pub trackers: TrackerSet,
    /// Request counters.
    pub counters: ExportCounters,
    /// Request latency, merged from the sessions.
    pub latency: Mutex<LatencyRecorder>,
    /// Latency of write-type requests only (what a migration report quotes).
    pub write_latency: Mutex<LatencyRecorder>,
    /// Where requests go (local image, or forwarded after a migration) and the write gate.
    pub route: ExportRoute,
    /// Where guest writes are mirrored while a migration runs in active-mirroring mode.
    pub mirror: MirrorSlot,
    removed: AtomicBool,
    next_connection: AtomicU64,
    connections: Mutex<BTreeMap<u64, ConnectionHandle>>,
}

impl Export {
    /// Opens the image (locking it) and wraps the given trackers.
    pub fn open(
        name: &str,
        path: &Path,
        read_only: bool,
        granularity_bytes: u64,
        half_life_ms: u64,
        trackers: impl FnOnce(u64) -> TrackerSet,
    ) -> Result<Self, ExportError> {
        let file = DirectFile::open(path, !read_only).map_err(|source| ExportError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        file.lock_exclusive()
            .map_err(|source| ExportError::Locked {
                path: path.to_path_buf(),
                source,
            })?;
        let size_bytes = file.size_bytes().map_err(|source| ExportError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        if size_bytes == 0 {
            return Err(ExportError::BadSize {
                path: path.to_path_buf(),
                size_bytes,
                problem: "an empty image cannot be served",
            });
        }
        Ok(Export {
            name: name.to_string(),
            path: path.to_path_buf(),
            file: Arc::new(file),
            size_bytes,
            read_only,
            granularity_bytes,
            half_life_ms,
            trackers: trackers(size_bytes),
            counters: ExportCounters::default(),
            latency: Mutex::new(LatencyRecorder::new()),
            write_latency: Mutex::new(LatencyRecorder::new()),
            route: ExportRoute::default(),
            mirror: MirrorSlot::default(),
            removed: AtomicBool::new(false),
            next_connection: AtomicU64::new(1),
            connections: Mutex::new(BTreeMap::new()),
        })
    }

    /// What the NBD handshake advertises for this export.
    pub fn info(&self) -> ExportInfo {
        let mut meta_contexts = vec!["base:allocation".to_string()];
        for tracker in self.trackers.list() {
            meta_contexts.push(format!("qemu:dirty-bitmap:{}", tracker.name()));
        }
        ExportInfo {
            name: self.name.clone(),
            description: format!("ferry export {}", self.name),
            size_bytes: self.size_bytes,
            read_only: self.read_only,
            // Every connection's writes reach the same file, O_DIRECT or through the one page
            // cache, and FLUSH is an fdatasync of that file: a flush on any connection covers
            // writes completed on all of them, which is what MULTI_CONN promises.
            multi_conn: true,
            can_trim: !self.read_only,
            can_fast_zero: !self.read_only,
            block_min: 1,
            block_preferred: BLOCK_PREFERRED_BYTES,
            block_max: BLOCK_MAX_BYTES,
            meta_contexts,
        }
    }

    /// True once the export was removed: sessions stop taking requests.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Registers a live connection; None if the export is being removed.
    pub fn attach(&self, handle: ConnectionHandle) -> Option<u64> {
        let mut connections = self.connections.lock().expect("connections lock");
        if self.is_removed() {
            return None;
        }
        let id = self.next_connection.fetch_add(1, Ordering::Relaxed);
        connections.insert(id, handle);
        Some(id)
    }

    /// Forgets a connection that ended.
    pub fn detach(&self, id: u64) {
        self.connections
            .lock()
            .expect("connections lock")
            .remove(&id);
    }

    /// Live connections.
    pub fn connection_count(&self) -> u64 {
        self.connections.lock().expect("connections lock").len() as u64
    }

    /// Marks the export removed and closes the read side of every connection: each session
    /// answers what it already received, then exits.
    pub fn close_connections(&self) {
        let connections = self.connections.lock().expect("connections lock");
        self.removed.store(true, Ordering::Release);
        for handle in connections.values() {
            // The peer may be gone already; the session notices on its own then.
            let _ = handle.conn.shutdown(Shutdown::Read);
        }
    }

    /// Snapshot of the counters and latency for the API.
    pub fn stats(&self) -> ExportStats {
        let c = &self.counters;
        ExportStats {
            read_ops: c.read_ops.load(Ordering::Relaxed),
            read_bytes: c.read_bytes.load(Ordering::Relaxed),
            write_ops: c.write_ops.load(Ordering::Relaxed),
            write_bytes: c.write_bytes.load(Ordering::Relaxed),
            flush_ops: c.flush_ops.load(Ordering::Relaxed),
            trim_ops: c.trim_ops.load(Ordering::Relaxed),
            zero_ops: c.zero_ops.load(Ordering::Relaxed),
            latency_us: self.latency.lock().expect("latency lock").summary(),
        }
    }

    /// Status of one tracker for the API.
    pub fn tracker_status(tracker: &Tracker) -> TrackerStatus {
        let dirty_blocks = tracker.dirty_count();
        TrackerStatus {
            name: tracker.name().to_string(),
            granularity_bytes: tracker.granularity_bytes(),
            block_count: tracker.block_count(),
            dirty_blocks,
            dirty_bytes: dirty_blocks * tracker.granularity_bytes(),
            lost: tracker.is_lost(),
            half_life_ms: tracker.half_life_ms(),
        }
    }
}
