//! The write trap: the one place a completed guest write is accounted for.
//!
//! Every write-type request a session admitted through the write gate
//! ([`Export::enter_write`]) comes here exactly once, after the engine reported it (or after
//! the engine failed as a whole and will never report it). For each batch of completions:
//! 1. its blocks are marked in every tracker of the export, once (DESIGN invariant 1: after
//!    the data is on the image, before the reply, so a copier that clears the bit and then
//!    reads sees the new data; a failed write may have changed bytes, so it is marked too),
//!    with the admission the session took into the durable trackers' activity logs before
//!    it submitted the write ([`crate::dirty::TrackerSet::admit`]); the session drops the
//!    admission only after this;
//! 2. while a mirror is installed, it is handed to the mirror (a failed one as diverged), and
//!    the batch waits for the mirror's fence (the destination has it, or the mirror recorded
//!    that it does not, and the job will not commit);
//! 3. only then does it leave the gate, so a switchover that drained the gate sees its bits
//!    and its mirrored bytes; the session replies after [`WriteTrap::finish`].
//!
//! A forwarded export (after a switchover) lives at the destination: its writes only leave
//! the gate. A write answered without reaching the engine (refused, or an error reply) leaves
//! through [`Export::write_not_started`] and marks nothing: no byte of the image changed.

use std::sync::Arc;

use super::export::Export;
use super::mirror::WriteMirror;
use crate::dirty::Admission;

/// What became of one admitted write.
#[derive(Debug, Clone, Copy)]
pub enum WriteOutcome<'a> {
    /// A WRITE completed, with its bytes when the engine handed them back (a forwarding
    /// engine keeps them; a mirror that cannot see the bytes records the range as
    /// diverged, so the job does not commit on a guess).
    Written(Option<&'a [u8]>),
    /// A WRITE_ZEROES completed.
    Zeroed,
    /// A TRIM completed.
    Trimmed,
    /// The write failed, or its engine failed before reporting it: some bytes may have
    /// changed, so the range counts as dirty and as diverged from a mirror.
    Failed,
}

/// One batch of completed writes of one session, between the completions and the replies.
#[derive(Debug)]
pub struct WriteTrap<'e> {
    export: &'e Export,
    forwarded: bool,
    mirror: Option<Arc<dyn WriteMirror>>,
    mirrored: bool,
    admitted: u64,
}

impl Export {
    /// Opens the trap for one batch of completions. `forwarded`: the session's engine sends
    /// requests to another agent (the local trackers and mirror no longer apply).
    pub fn write_trap(&self, forwarded: bool) -> WriteTrap<'_> {
        let mirror = if forwarded {
            None
        } else {
            self.mirror.current()
        };
        WriteTrap {
            export: self,
            forwarded,
            mirror,
            mirrored: false,
            admitted: 0,
        }
    }

    /// An admitted write was answered without reaching the engine: it leaves the gate and
    /// marks nothing.
    pub fn write_not_started(&self) {
        self.route.exit_write();
    }
}

impl WriteTrap<'_> {
    /// A write admitted through the gate completed with `outcome`: marked and mirrored now,
    /// out of the gate at [`WriteTrap::finish`].
    pub fn completed(
        &mut self,
        offset_bytes: u64,
        len_bytes: u64,
        outcome: WriteOutcome<'_>,
        admission: &Admission,
    ) {
        self.admitted += 1;
        if self.forwarded {
            return;
        }
        self.export
            .trackers()
            .mark_admitted(offset_bytes, len_bytes, admission);
        let Some(mirror) = &self.mirror else {
            return;
        };
        self.mirrored = true;
        match outcome {
            WriteOutcome::Written(Some(data)) => mirror.write(offset_bytes, data),
            WriteOutcome::Written(None) => mirror.diverged(offset_bytes, len_bytes),
            WriteOutcome::Zeroed => mirror.zero(offset_bytes, len_bytes, false),
            WriteOutcome::Trimmed => mirror.zero(offset_bytes, len_bytes, true),
            WriteOutcome::Failed => mirror.diverged(offset_bytes, len_bytes),
        }
    }

    /// Waits for the mirror's fence (when anything was mirrored), then lets every write of
    /// the batch leave the gate. The session may reply once this returns.
    pub fn finish(mut self) {
        self.close();
    }

    fn close(&mut self) {
        if std::mem::take(&mut self.mirrored) {
            if let Some(mirror) = &self.mirror {
                mirror.fence();
            }
        }
        for _ in 0..std::mem::take(&mut self.admitted) {
            self.export.route.exit_write();
        }
    }
}

impl Drop for WriteTrap<'_> {
    /// A batch dropped without `finish` (an unwinding session) still leaves the gate, so a
    /// switchover never waits for it forever.
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    use super::*;
    use crate::dirty::{TrackerSet, TrackerSpec};
    use crate::disk::Route;
    use crate::env::MonotonicClock;

    const DISK_BYTES: u64 = 1 << 20;

    fn export(dir: &tempfile::TempDir) -> Export {
        let path = dir.path().join("disk.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(DISK_BYTES)
            .unwrap();
        let export = Export::open("vm", &path, false, 4096, 1000, |size_bytes| {
            TrackerSet::new(size_bytes, Arc::new(MonotonicClock::new()))
        })
        .unwrap();
        export
            .trackers()
            .add(TrackerSpec::new("t").with_granularity_bytes(4096))
            .unwrap();
        export
    }

    /// A mirror that records what it was handed.
    #[derive(Debug, Default)]
    struct Recording {
        writes: Mutex<Vec<(u64, Vec<u8>)>>,
        diverged: AtomicU64,
        fences: AtomicU64,
    }

    impl WriteMirror for Recording {
        fn write(&self, offset_bytes: u64, data: &[u8]) {
            self.writes
                .lock()
                .unwrap()
                .push((offset_bytes, data.to_vec()));
        }
        fn zero(&self, _offset_bytes: u64, _len_bytes: u64, _trim: bool) {}
        fn diverged(&self, _offset_bytes: u64, _len_bytes: u64) {
            self.diverged.fetch_add(1, Ordering::SeqCst);
        }
        fn fence(&self) {
            self.fences.fetch_add(1, Ordering::SeqCst);
        }
    }

    // Goal: a completed write is marked once and stays inside the gate until `finish`, so a
    // switchover that drained the gate sees its bit (DESIGN invariant 1). Method: admit a
    // write, trap it, check the gate does not drain before `finish` and does after, and
    // that exactly its block is dirty.
    #[test]
    fn marks_before_leaving_the_gate() {
        let dir = tempfile::tempdir().unwrap();
        let export = export(&dir);
        assert!(export.enter_write());
        let mut trap = export.write_trap(false);
        trap.completed(
            8192,
            4096,
            WriteOutcome::Written(Some(&[7; 4096])),
            &Admission::none(),
        );
        export.hold_writes();
        assert!(!export.wait_drained(Duration::from_millis(20)));
        assert_eq!(export.trackers().get("t").unwrap().dirty_count(), 1);
        trap.finish();
        assert!(export.wait_drained(Duration::from_millis(20)));
        export.release_writes();
    }

    // Goal: with a mirror installed, each write reaches it with its bytes, one fence per
    // batch, and a write whose bytes are not at hand is recorded as diverged (the job will
    // not commit on a guess). Method: two writes in one batch, one without bytes.
    #[test]
    fn mirrors_with_one_fence_per_batch() {
        let dir = tempfile::tempdir().unwrap();
        let export = export(&dir);
        let mirror = Arc::new(Recording::default());
        export.hold_writes();
        export.install_mirror(mirror.clone());
        export.release_writes();
        assert!(export.enter_write() && export.enter_write());
        let mut trap = export.write_trap(false);
        trap.completed(
            0,
            4,
            WriteOutcome::Written(Some(b"abcd")),
            &Admission::none(),
        );
        trap.completed(4096, 4096, WriteOutcome::Written(None), &Admission::none());
        trap.finish();
        assert_eq!(*mirror.writes.lock().unwrap(), [(0, b"abcd".to_vec())]);
        assert_eq!(mirror.diverged.load(Ordering::SeqCst), 1);
        assert_eq!(mirror.fences.load(Ordering::SeqCst), 1);
        export.hold_writes();
        assert!(export.wait_drained(Duration::from_millis(20)));
    }

    // Goal: a forwarded export marks nothing locally (the destination holds the disk), and a
    // batch dropped without `finish` still leaves the gate. Method: forward, trap, drop.
    #[test]
    fn forwarded_writes_only_leave_the_gate() {
        let dir = tempfile::tempdir().unwrap();
        let export = export(&dir);
        export.hold_writes();
        export.switch_route(Route::Forward {
            lineage: None,
            addr: "127.0.0.1:1".into(),
        });
        export.release_writes();
        assert!(export.enter_write());
        {
            let mut trap = export.write_trap(true);
            trap.completed(0, 4096, WriteOutcome::Failed, &Admission::none());
        }
        assert_eq!(export.trackers().get("t").unwrap().dirty_count(), 0);
        export.hold_writes();
        assert!(export.wait_drained(Duration::from_millis(20)));
    }
}
