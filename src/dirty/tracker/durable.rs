//! A tracker's side of its activity log: attaching it, admitting writes into it, and the
//! recovered state a replay leaves.
//!
//! Invariants: the log is attached before the tracker is published to the write path (so
//! [`Tracker::enter`] and [`Tracker::leave`] of one write always agree on whether there is a
//! log), and it is created holding the tracker's bits at that moment; a log that fails makes
//! the tracker lost (every block dirty), never silently incomplete.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use super::Tracker;
use crate::dirty::activity::{ActivityLog, DurableBits};
use crate::dirty::set::DirtySet;
use crate::dirty::DirtyError;

impl DurableBits for Tracker {
    fn words_in(&self, first_word: u64, end_word: u64) -> Vec<(u64, u64)> {
        let take = self
            .last_take
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let end_word = end_word.min(self.bitmap.word_count());
        (first_word..end_word)
            .map(|word| {
                let taken = take.as_ref().map_or(0, |set| set.word(word));
                (word, self.bitmap.load_word(word) | taken)
            })
            .filter(|&(_, bits)| bits != 0)
            .collect()
    }

    fn all(&self) -> DirtySet {
        self.bitmap_set()
    }
}

impl Tracker {
    /// Whether the tracker was created durable (it keeps, or kept until it failed, a log).
    pub fn wants_log(&self) -> bool {
        self.durable
    }

    /// Whether a log is attached (even a failed one): the write path admits writes into it.
    pub(crate) fn has_log(&self) -> bool {
        self.log.get().is_some()
    }

    /// Creates the activity log of a durable tracker at `path`, holding its bits now, with
    /// `capacity` extents open at most. Call once, before the tracker is published.
    pub(crate) fn attach_log(&self, path: &Path, capacity: usize) -> Result<(), DirtyError> {
        assert!(self.durable, "only a durable tracker keeps a log");
        let log = ActivityLog::create(
            path,
            self.granularity_bytes,
            self.disk_bytes,
            capacity,
            self,
        )
        .map_err(|err| DirtyError::Log {
            path: path.to_owned(),
            source: err,
        })?;
        assert!(self.log.set(log).is_ok(), "log attached twice");
        Ok(())
    }

    /// Admits a write of `[offset_bytes, offset_bytes + len_bytes)` into the log before it
    /// starts (a no-op without a log); pair with [`Tracker::leave`] after it was marked.
    pub fn enter(&self, offset_bytes: u64, len_bytes: u64) {
        if let Some(log) = self.log.get() {
            if !log.enter(self, offset_bytes, len_bytes) {
                self.mark_lost();
            }
        }
    }

    /// The write admitted by [`Tracker::enter`] was marked.
    pub fn leave(&self, offset_bytes: u64, len_bytes: u64) {
        if let Some(log) = self.log.get() {
            log.leave(offset_bytes, len_bytes);
        }
    }

    /// The blocks of `sent`, taken by the last [`Tracker::take_and_clear`], are at the
    /// destination now (sent and synced): a crash from here on need not count them. The log
    /// is compacted once an eighth of the take was settled, so that a recovery after a long
    /// pass over-marks little while a pass costs at most eight compactions.
    pub fn settle(&self, sent: &DirtySet) {
        let Some(log) = self.log.get() else {
            return;
        };
        let compact = log.exclusive(|| {
            let mut take = self
                .last_take
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let Some(take) = take.as_mut() else {
                return false;
            };
            take.remove_all(sent);
            let settled = self
                .settled_blocks
                .fetch_add(sent.count(), Ordering::Relaxed)
                + sent.count();
            settled * 8 >= self.take_blocks.load(Ordering::Relaxed)
        });
        if compact {
            self.settled_blocks.store(0, Ordering::Relaxed);
            log.compact(self);
        }
    }

    /// Closes the log after a clean save (see [`ActivityLog::close`]).
    pub(crate) fn close_log(&self) {
        if let Some(log) = self.log.get() {
            log.close();
        }
    }

    /// Bytes of disk the log holds open now: what a crash now would over-mark at most.
    pub fn open_bytes(&self) -> u64 {
        self.log.get().map_or(0, ActivityLog::open_bytes)
    }

    /// Marks the tracker recovered from its log, over-marking at most `bound_bytes`.
    pub(crate) fn set_recovered(&self, bound_bytes: u64) {
        *self
            .recovered
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(bound_bytes);
    }

    /// The bound of a recovered tracker (`None` when not recovered).
    pub(crate) fn recovered_bound(&self) -> Option<u64> {
        *self
            .recovered
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
