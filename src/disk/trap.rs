//! The write trap: the one place a completed guest write is accounted for.
//!
//! Every write-type request a session admitted through the write gate
//! ([`Export::enter_write`]) comes here exactly once, after the engine reported it (or after
//! the engine failed as a whole and will never report it). For each batch of completions:
//! 1. its blocks are marked in every tracker of the export, once (DESIGN invariant 1: after
//!    the data is on the image, before the reply, so a copier that clears the bit and then
//!    reads sees the new data; a failed write may have changed bytes, so it is marked too);
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

/// What became of one admitted write.
#[derive(Debug, Clone, Copy)]
pub enum WriteOutcome<'a> {
    /// A WRITE of these bytes completed.
    Written(&'a [u8]),
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
    pub fn completed(&mut self, offset_bytes: u64, len_bytes: u64, outcome: WriteOutcome<'_>) {
        self.admitted += 1;
        if self.forwarded {
            return;
        }
        self.export.trackers().mark_range(offset_bytes, len_bytes);
        let Some(mirror) = &self.mirror else {
            return;
        };
        self.mirrored = true;
        match outcome {
            WriteOutcome::Written(data) => mirror.write(offset_bytes, data),
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
