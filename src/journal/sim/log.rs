//! An agent's journal in memory: an append-only list of real [`Record`]s whose appends take
//! time, so a crash can catch one in progress.
//!
//! It keeps the production rules: [`SimLog::begin_append`] runs the real [`fold::check`]
//! first (a record the state machine refuses is a protocol bug, reported, never written),
//! and [`SimLog::replay`] folds the records from scratch as `Journal::open` does. A crash
//! during an append either lands the record (the frame reached the disk before the power
//! went) or tears it (the replay drops a torn last frame), as `file.rs` replays a file.
//!
//! Invariant: `views` is always the fold of `records`; the pending record is in neither.

use crate::journal::fold::{self, JobKey, JobView, JobViews};
use crate::journal::{Entry, Record};

/// One agent's in-memory journal; see the module docs.
#[derive(Debug, Clone, Default)]
pub struct SimLog {
    /// Durable records, in append order.
    records: Vec<Record>,
    /// The fold of `records`.
    views: JobViews,
    /// The record being appended: written, not yet synced.
    pending: Option<Record>,
}

impl SimLog {
    /// Starts appending `record`; `Err` when the state machine refuses it after the
    /// durable records (the protocol asked for an illegal transition).
    pub fn begin_append(&mut self, record: Record) -> Result<(), String> {
        assert!(self.pending.is_none(), "one append at a time");
        let seq = self.records.len() as u64 + 1;
        fold::check(&self.views, seq, &record).map_err(|err| err.to_string())?;
        self.pending = Some(record);
        Ok(())
    }

    /// The pending append's fdatasync returned: the record is durable.
    pub fn complete_append(&mut self) -> Record {
        let record = self.pending.take().expect("an append in progress");
        let seq = self.records.len() as u64 + 1;
        fold::apply(&mut self.views, seq, &record).expect("checked when the append began");
        self.records.push(record.clone());
        record
    }

    /// Whether an append is in progress.
    pub fn is_appending(&self) -> bool {
        self.pending.is_some()
    }

    /// The agent crashed: the pending record lands or is torn (dropped by the replay).
    pub fn crash(&mut self, lands: bool) {
        if lands && self.pending.is_some() {
            self.complete_append();
        }
        self.pending = None;
    }

    /// What a restarted agent reads: the records folded from scratch. Panics if that
    /// differs from the views kept while appending (the fold must be a function of the
    /// records alone).
    pub fn replay(&self) -> JobViews {
        let views = fold::fold(&self.entries()).expect("every record passed fold::check");
        assert_eq!(views, self.views, "replay folds to the appended state");
        views
    }

    /// The durable records as replayed entries (offsets are not modelled).
    fn entries(&self) -> Vec<Entry> {
        (1..)
            .zip(&self.records)
            .map(|(seq, record)| Entry {
                seq,
                offset_bytes: 0,
                frame_bytes: 0,
                record: record.clone(),
            })
            .collect()
    }

    /// The durable view of job `key`.
    pub fn view(&self, key: JobKey) -> Option<&JobView> {
        self.views.get(&key)
    }

    /// The view of job `key` if the pending record lands too.
    pub fn view_if_landed(&self, key: JobKey) -> Option<JobView> {
        let mut views = self.views.clone();
        if let Some(record) = &self.pending {
            let seq = self.records.len() as u64 + 1;
            fold::apply(&mut views, seq, record).expect("checked when the append began");
        }
        views.remove(&key)
    }

    /// The durable records.
    pub fn records(&self) -> &[Record] {
        &self.records
    }

    /// The record being appended.
    pub fn pending(&self) -> Option<&Record> {
        self.pending.as_ref()
    }
}
