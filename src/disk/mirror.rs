//! The hook through which an export's sessions mirror guest writes to another agent while a
//! migration runs in active-mirroring mode (DESIGN capability 1: "guest writes go to both
//! sides before they are acknowledged").
//!
//! Protocol between a migration job and the sessions (with [`super::route::ExportRoute`]):
//! - The job installs a [`WriteMirror`] with writes held and drained, so every write that
//!   starts afterwards sees it; it removes the mirror with writes held too (switchover) or
//!   when it gives up (error path).
//! - A session, after a gated write completed locally and was marked in the trackers, hands
//!   its bytes to the mirror, then calls [`WriteMirror::fence`] once for the batch of
//!   completions, and only then leaves the write gate and answers the guest. So a drained
//!   gate means every mirrored write is at the destination (or the mirror recorded that it
//!   failed, and the job does not commit).
//! - The mirror never fails a guest write: the local image stays authoritative until the
//!   commit; a mirror that cannot deliver records it, and the job refuses to commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Where mirrored writes go. Methods are called from session threads concurrently.
pub trait WriteMirror: Send + Sync + std::fmt::Debug {
    /// A write of `data` at `offset_bytes` completed locally.
    fn write(&self, offset_bytes: u64, data: &[u8]);
    /// A zeroing (`trim == false`) or a discard completed locally.
    fn zero(&self, offset_bytes: u64, len_bytes: u64, trim: bool);
    /// A write failed locally (its bytes may have changed): the two sides may differ there.
    fn diverged(&self, offset_bytes: u64, len_bytes: u64);
    /// Returns once everything handed over before it is written at the other side, or the
    /// mirror recorded that it cannot be.
    fn fence(&self);
}

/// An export's current mirror, if any.
#[derive(Debug, Default)]
pub struct MirrorSlot {
    /// Fast path for sessions: whether `mirror` may hold something.
    active: AtomicBool,
    mirror: Mutex<Option<Arc<dyn WriteMirror>>>,
}

impl MirrorSlot {
    /// Installs `mirror`; call with the export's writes held and drained.
    pub fn set(&self, mirror: Arc<dyn WriteMirror>) {
        *self.mirror.lock().expect("mirror lock") = Some(mirror);
        self.active.store(true, Ordering::SeqCst);
    }

    /// Removes the mirror, if any.
    pub fn clear(&self) {
        self.active.store(false, Ordering::SeqCst);
        self.mirror.lock().expect("mirror lock").take();
    }

    /// The mirror a session must feed now. The write gate orders `set`/`clear` with the
    /// writes that see them (both happen with writes held), so a relaxed fast path would do;
    /// SeqCst keeps the reasoning local.
    pub fn current(&self) -> Option<Arc<dyn WriteMirror>> {
        if !self.active.load(Ordering::SeqCst) {
            return None;
        }
        self.mirror.lock().expect("mirror lock").clone()
    }
}
