//! One served export: the open image, its trackers, its counters, its route and write gate,
//! its mirror hook, and its live connections. Its state is private: sessions reach it through
//! the write gate and the write trap ([`super::trap`]), jobs through the methods that say
//! what a job may do (hold and drain writes, install a mirror, switch the route).
//!
//! Invariants: the image is opened once (O_DIRECT + a buffered descriptor) and held with an
//! OFD lock, so a second agent cannot serve the same image; a removed export refuses new
//! connections and closes the read side of live ones, which then drain and exit; the route
//! changes and the mirror is installed only while writes are held and drained.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use ferry_sys::DirectFile;

use crate::dirty::TrackerSet;
use crate::metrics::LatencyRecorder;

use super::forwarding::{unix_ms_now, ForwardGauge, Forwarding};
use super::mirror::{MirrorSlot, WriteMirror};
use super::route::{ExportRoute, Route};

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
struct ExportCounters {
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

/// A live connection as the export sees it: enough to make its session drain and exit.
pub trait ConnectionHandle: Send + Sync + std::fmt::Debug {
    /// Stops reading requests (shuts the socket's read side); the session answers what it
    /// already received, then exits. The peer may be gone already: failures are ignored.
    fn stop_reading(&self);
}

/// Opens an image to serve (O_DIRECT + buffered), locks it (OFD, so no second agent serves
/// it) and reads its size, which must not be zero.
fn open_image(path: &Path, read_only: bool) -> Result<(DirectFile, u64), ExportError> {
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
    Ok((file, size_bytes))
}

/// The name an image takes when a migration's switchover made it stale:
/// `<file name>.stale-<job id>`, in the same directory.
pub fn stale_path(path: &Path, job_id: u64) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!("{name}.stale-{job_id}"))
}

/// Whether `path` is already the stale name job `job_id` gives an image.
pub fn is_stale_name(path: &Path, job_id: u64) -> bool {
    path.file_name().is_some_and(|name| {
        name.to_string_lossy()
            .ends_with(&format!(".stale-{job_id}"))
    })
}

/// A snapshot of an export's request counters (also what the API reports).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CounterSnapshot {
    /// READ commands completed.
    pub read_ops: u64,
    /// Bytes returned by READ.
    pub read_bytes: u64,
    /// WRITE commands completed.
    pub write_ops: u64,
    /// Bytes written by WRITE.
    pub write_bytes: u64,
    /// FLUSH commands completed.
    pub flush_ops: u64,
    /// TRIM commands completed.
    pub trim_ops: u64,
    /// WRITE_ZEROES commands completed.
    pub zero_ops: u64,
}

/// What an export is apart from its image: its size and how it is served and tracked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// Disk size.
    pub size_bytes: u64,
    /// Served read-only.
    pub read_only: bool,
    /// Default granularity of its trackers.
    pub granularity_bytes: u64,
    /// Default heat half-life of its trackers.
    pub half_life_ms: u64,
}

/// A served export.
#[derive(Debug)]
pub struct Export {
    name: String,
    /// Where the image file is: as configured, or its stale name once retired.
    path: Mutex<PathBuf>,
    /// The open image; replaced when a disk comes home ([`Export::adopt_image`]). `None`
    /// only while the export forwards and its stale image was collected
    /// ([`Export::open_forwarding`], [`Export::release_image`]): nothing reads it then.
    file: ArcSwapOption<DirectFile>,
    size_bytes: u64,
    read_only: bool,
    /// Default granularity of its trackers.
    granularity_bytes: u64,
    /// Default heat half-life of its trackers.
    half_life_ms: u64,
    trackers: TrackerSet,
    counters: ExportCounters,
    /// Request latency, merged from the sessions.
    latency: Mutex<LatencyRecorder>,
    /// Latency of write-type requests only (what a migration report quotes).
    write_latency: Mutex<LatencyRecorder>,
    /// Where requests go (local image, or forwarded after a migration) and the write gate.
    pub(super) route: ExportRoute,
    /// Where guest writes are mirrored while a migration runs in active-mirroring mode.
    pub(super) mirror: MirrorSlot,
    /// Wall-clock time of the last route switch, ms since the epoch (0: never switched). For
    /// display only: nothing orders events by it.
    route_since_unix_ms: AtomicU64,
    /// What the forwarding engines of its sessions report (holding, held requests).
    forward_gauge: Arc<ForwardGauge>,
    /// This export's hold of forwarded requests, when it is not the agent's.
    forward_hold: Option<Duration>,
    removed: AtomicBool,
    /// The disk's lineage ([`super::lineage_token`]); 0: none (the disk never left the agent
    /// holding its guest's connection). Job ids are never 0.
    lineage: AtomicU64,
    next_connection: AtomicU64,
    connections: Mutex<BTreeMap<u64, Box<dyn ConnectionHandle>>>,
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
        let (file, size_bytes) = open_image(path, read_only)?;
        let shape = Shape {
            size_bytes,
            read_only,
            granularity_bytes,
            half_life_ms,
        };
        Ok(Self::new(name, path, Some(file), shape, trackers))
    }

    /// An export whose disk lives elsewhere and whose stale image is gone (collected): it
    /// only forwards, so it needs no file; `size_bytes` comes from the journal. Its route
    /// must be set to forward before anything is served.
    pub fn open_forwarding(
        name: &str,
        path: &Path,
        shape: Shape,
        trackers: impl FnOnce(u64) -> TrackerSet,
    ) -> Self {
        Self::new(name, path, None, shape, trackers)
    }

    fn new(
        name: &str,
        path: &Path,
        file: Option<DirectFile>,
        shape: Shape,
        trackers: impl FnOnce(u64) -> TrackerSet,
    ) -> Self {
        Export {
            name: name.to_string(),
            path: Mutex::new(path.to_path_buf()),
            file: ArcSwapOption::from_pointee(file),
            size_bytes: shape.size_bytes,
            read_only: shape.read_only,
            granularity_bytes: shape.granularity_bytes,
            half_life_ms: shape.half_life_ms,
            trackers: trackers(shape.size_bytes),
            counters: ExportCounters::default(),
            latency: Mutex::new(LatencyRecorder::new()),
            write_latency: Mutex::new(LatencyRecorder::new()),
            route: ExportRoute::default(),
            mirror: MirrorSlot::default(),
            route_since_unix_ms: AtomicU64::new(0),
            forward_gauge: Arc::new(ForwardGauge::default()),
            forward_hold: None,
            removed: AtomicBool::new(false),
            lineage: AtomicU64::new(0),
            next_connection: AtomicU64::new(1),
            connections: Mutex::new(BTreeMap::new()),
        }
    }

    /// The same export, whose forwarded requests wait up to `hold` (instead of the agent's
    /// hold) for a destination that is away.
    pub fn with_forward_hold(self, hold: Option<Duration>) -> Self {
        Export {
            forward_hold: hold,
            ..self
        }
    }

    /// This export's own hold of forwarded requests, if it has one (else the agent's).
    pub fn forward_hold(&self) -> Option<Duration> {
        self.forward_hold
    }

    /// The gauge its sessions' forwarding engines update.
    pub fn forward_gauge(&self) -> &Arc<ForwardGauge> {
        &self.forward_gauge
    }

    /// Where its requests go when it no longer serves its own image, and whether they are
    /// held now; None while it serves locally.
    pub fn forwarding(&self) -> Option<Forwarding> {
        match &*self.route().1 {
            Route::Local => None,
            Route::Forward { addr, .. } => Some(Forwarding {
                to: addr.clone(),
                since_unix_ms: self.route_since_unix_ms(),
                holding: self.forward_gauge.holding(),
            }),
        }
    }

    /// NBD export name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Where the image file is now (its stale name once retired).
    pub fn path(&self) -> PathBuf {
        self.path.lock().expect("path lock").clone()
    }

    /// Job, at a switchover to forwarding: the local image is stale from now on, so its file
    /// is renamed to [`stale_path`] (never to be served again, kept for the operator). The
    /// open descriptor and its lock stay: the export still needs the file's size and lock.
    /// An existing file of that name is never replaced.
    pub fn retire_image(&self, job_id: u64) -> std::io::Result<PathBuf> {
        let mut path = self.path.lock().expect("path lock");
        let stale = stale_path(&path, job_id);
        if stale.symlink_metadata().is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists", stale.display()),
            ));
        }
        std::fs::rename(&*path, &stale)?;
        crate::durable::sync_parent(&stale)?;
        *path = stale.clone();
        Ok(stale)
    }

    /// The open image.
    pub fn file(&self) -> Option<Arc<DirectFile>> {
        self.file.load_full()
    }

    /// The open image, or NotFound when the export has none (it forwards; its stale image
    /// was collected).
    pub fn image(&self) -> std::io::Result<Arc<DirectFile>> {
        self.file.load_full().ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("export {} has no local image (it forwards)", self.name),
            )
        })
    }

    /// The stale image of a forwarding export was removed (`ferry export gc`): close it.
    /// Refused (false) unless the export forwards, so a served image is never dropped.
    pub fn release_image(&self) -> bool {
        if !self.is_forwarded() {
            return false;
        }
        self.file.store(None);
        true
    }

    /// A disk this export forwarded comes home: `file` (the image just received and
    /// committed here, opened and locked, of the export's size) becomes its image, and every
    /// request is served locally from now on. Sessions finish what they have in flight on the
    /// forwarding engine (those requests reach the local image through the agent that just
    /// handed the disk back) before they open the local one. Writes are held only for the
    /// swap, never drained: the in-flight ones wait for the very commit this is part of.
    pub fn adopt_image(&self, path: &Path) -> Result<(), ExportError> {
        let (file, size_bytes) = open_image(path, self.read_only)?;
        if size_bytes != self.size_bytes {
            return Err(ExportError::BadSize {
                path: path.to_path_buf(),
                size_bytes,
                problem: "not the size of the export it would replace",
            });
        }
        self.route.hold();
        // Its trackers saw none of the writes made while the disk lived elsewhere.
        for tracker in self.trackers.list() {
            tracker.mark_lost();
        }
        self.file.store(Some(Arc::new(file)));
        *self.path.lock().expect("path lock") = path.to_path_buf();
        self.switch_route(Route::Local);
        self.route.release();
        Ok(())
    }

    /// A forwarded disk moved on (a later switchover elsewhere): requests go to `route`
    /// from now on. As in [`Export::adopt_image`], writes are held only for the swap, not
    /// drained: sessions finish what they have in flight through the old route (whose agent
    /// forwards it to the new one) before they open the new.
    pub fn reroute(&self, route: Route) {
        self.route.hold();
        self.switch_route(route);
        self.route.release();
    }

    /// The disk's lineage, as the agent knows it from the migration that brought it here.
    pub fn lineage(&self) -> Option<u64> {
        Some(self.lineage.load(Ordering::Relaxed)).filter(|&job_id| job_id != 0)
    }

    /// Records the disk's lineage (a migration brought it here; `None`: it came home).
    pub fn set_lineage(&self, lineage: Option<u64>) {
        self.lineage.store(lineage.unwrap_or(0), Ordering::Relaxed);
    }

    /// Image size.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Default granularity of its trackers.
    pub fn granularity_bytes(&self) -> u64 {
        self.granularity_bytes
    }

    /// Default heat half-life of its trackers.
    pub fn half_life_ms(&self) -> u64 {
        self.half_life_ms
    }

    /// Its write trackers.
    pub fn trackers(&self) -> &TrackerSet {
        &self.trackers
    }

    /// Adds a session's local counts (batched, so the hot path does not bounce these lines).
    pub fn add_counts(&self, counts: &CounterSnapshot) {
        let c = &self.counters;
        for (local, shared) in [
            (counts.read_ops, &c.read_ops),
            (counts.read_bytes, &c.read_bytes),
            (counts.write_ops, &c.write_ops),
            (counts.write_bytes, &c.write_bytes),
            (counts.flush_ops, &c.flush_ops),
            (counts.trim_ops, &c.trim_ops),
            (counts.zero_ops, &c.zero_ops),
        ] {
            if local > 0 {
                shared.fetch_add(local, Ordering::Relaxed);
            }
        }
    }

    /// The counters now.
    pub fn counts(&self) -> CounterSnapshot {
        let c = &self.counters;
        CounterSnapshot {
            read_ops: c.read_ops.load(Ordering::Relaxed),
            read_bytes: c.read_bytes.load(Ordering::Relaxed),
            write_ops: c.write_ops.load(Ordering::Relaxed),
            write_bytes: c.write_bytes.load(Ordering::Relaxed),
            flush_ops: c.flush_ops.load(Ordering::Relaxed),
            trim_ops: c.trim_ops.load(Ordering::Relaxed),
            zero_ops: c.zero_ops.load(Ordering::Relaxed),
        }
    }

    /// Merges a session's latency samples (all requests, write-type requests) and resets them.
    pub fn merge_latency(&self, all: &mut LatencyRecorder, writes: &mut LatencyRecorder) {
        self.latency.lock().expect("latency lock").merge_from(all);
        all.reset();
        self.write_latency
            .lock()
            .expect("latency lock")
            .merge_from(writes);
        writes.reset();
    }

    /// Latency of every request so far.
    pub fn latency(&self) -> LatencyRecorder {
        self.latency.lock().expect("latency lock").clone()
    }

    /// Latency of write-type requests so far.
    pub fn write_latency(&self) -> LatencyRecorder {
        self.write_latency.lock().expect("latency lock").clone()
    }

    /// The current route and its generation.
    pub fn route(&self) -> (u64, Arc<Route>) {
        self.route.current()
    }

    /// Generation of the current route; changes with every switch.
    pub fn route_generation(&self) -> u64 {
        self.route.generation()
    }

    /// Whether requests are forwarded to another agent.
    pub fn is_forwarded(&self) -> bool {
        self.route.is_forwarded()
    }

    /// A session is about to dispatch a write-type request: false (nothing admitted) while
    /// writes are held. Every admitted write leaves through the write trap.
    pub fn enter_write(&self) -> bool {
        self.route.enter_write()
    }

    /// Waits (up to `timeout`) while writes are held; true once released.
    pub fn wait_released(&self, timeout: Duration) -> bool {
        self.route.wait_released(timeout)
    }

    /// Job: holds new writes (in-flight ones go on).
    pub fn hold_writes(&self) {
        self.route.hold();
    }

    /// Job: waits until no admitted write is in flight, up to `timeout`; true when drained.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        self.route.wait_drained(timeout)
    }

    /// Job: lets writes through again.
    pub fn release_writes(&self) {
        self.route.release();
    }

    /// Job: sends every request to `route` from now on. Call with writes held and drained
    /// (asserted in debug builds), so no request reaches the old side after the release.
    pub fn switch_route(&self, route: Route) {
        debug_assert!(self.route.is_held(), "route switched with writes flowing");
        self.route.set(route);
        self.route_since_unix_ms
            .store(unix_ms_now(), Ordering::Relaxed);
    }

    /// When the route last switched (ms since the Unix epoch), if it ever did.
    pub fn route_since_unix_ms(&self) -> Option<u64> {
        Some(self.route_since_unix_ms.load(Ordering::Relaxed)).filter(|ms| *ms > 0)
    }

    /// Job: mirrors every guest write to `mirror` from now on. Call with writes held and
    /// drained, so every write that starts afterwards sees it.
    pub fn install_mirror(&self, mirror: Arc<dyn WriteMirror>) {
        debug_assert!(self.route.is_held(), "mirror installed with writes flowing");
        self.mirror.set(mirror);
    }

    /// Job: stops mirroring (switchover, or the job gave up).
    pub fn remove_mirror(&self) {
        self.mirror.clear();
    }

    /// True once the export was removed: sessions stop taking requests.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }

    /// Registers a live connection; None if the export is being removed.
    pub fn attach(&self, handle: Box<dyn ConnectionHandle>) -> Option<u64> {
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
            handle.stop_reading();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::MonotonicClock;

    // Goal: a retired image takes its stale name, keeps serving its descriptor, and never
    // replaces a file already there. Method: open, retire, check names and a read; retire
    // another export onto an existing stale name.
    #[test]
    fn retire_renames_once_and_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let open = |name: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, vec![7u8; 8192]).unwrap();
            Export::open("vm", &path, false, 4096, 1000, |size_bytes| {
                TrackerSet::new(size_bytes, Arc::new(MonotonicClock::new()))
            })
            .unwrap()
        };
        let export = open("disk.img");
        let stale = export.retire_image(7).unwrap();
        assert_eq!(stale, dir.path().join("disk.img.stale-7"));
        assert!(is_stale_name(&export.path(), 7) && !is_stale_name(&export.path(), 8));
        assert!(!dir.path().join("disk.img").exists() && stale.exists());
        let mut byte = [0u8; 1];
        export.file().unwrap().read_at(4096, &mut byte).unwrap();
        assert_eq!(byte, [7]);

        let other = open("disk.img");
        let err = other.retire_image(7).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&stale).unwrap(), vec![7u8; 8192]);
    }
}
