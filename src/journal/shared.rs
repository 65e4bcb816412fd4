//! The journal as an agent shares it between its migration jobs (source side) and its
//! block-stream targets (destination side): one file, one mutex, records totally ordered.
//!
//! Invariant: [`SharedJournal::append`] returns only after the record is durable; callers
//! act on the change it announces only after `Ok`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{JobKey, JobView, Journal, JournalError, Record, Role};

/// File name of the journal in an agent's state directory.
pub const FILE_NAME: &str = "journal";
/// A journal longer than this is compacted when the agent starts.
const COMPACT_ABOVE_BYTES: u64 = 4 << 20;

/// The journal, shared by the agent's jobs and targets.
#[derive(Debug, Clone)]
pub struct SharedJournal(Arc<Mutex<Journal>>);

impl SharedJournal {
    /// Opens (or creates) the journal in `state_dir` and replays it.
    pub fn open(state_dir: &Path) -> Result<SharedJournal, JournalError> {
        let (mut journal, replay) = Journal::open(&state_dir.join(FILE_NAME))?;
        if replay.dropped_tail_bytes > 0 {
            log::warn!(
                "journal {}: a torn last record ({} bytes) was dropped",
                journal.path().display(),
                replay.dropped_tail_bytes
            );
        }
        log::info!(
            "journal {}: {} records, {} jobs",
            journal.path().display(),
            replay.entries.len(),
            journal.jobs().len()
        );
        if journal.len_bytes() > COMPACT_ABOVE_BYTES {
            // Received-blocks checkpoints pile up; the fold is unchanged by dropping the
            // superseded ones.
            let compaction = journal.compact()?;
            log::info!(
                "journal {}: compacted {} -> {} bytes ({} superseded checkpoints)",
                journal.path().display(),
                compaction.before_bytes,
                compaction.after_bytes,
                compaction.dropped_records
            );
        }
        Ok(SharedJournal(Arc::new(Mutex::new(journal))))
    }

    /// Appends `record` durably. A failure is logged here by the record's kind and job (never
    /// its contents: a received-blocks record holds a whole bitmap).
    pub fn append(&self, record: &Record) -> Result<(), JournalError> {
        let mut journal = self.0.lock().expect("journal lock");
        journal.append(record).map(drop).inspect_err(|err| {
            log::error!(
                "journal: cannot record {} of job {}: {}",
                record.kind_name(),
                record.job_id(),
                crate::error::error_chain(err)
            );
        })
    }

    /// The job's view on `role`'s side, if this journal knows it.
    pub fn view(&self, job_id: u64, role: Role) -> Option<JobView> {
        let journal = self.0.lock().expect("journal lock");
        journal.jobs().get(&JobKey { job_id, role }).cloned()
    }

    /// Every job this journal knows.
    pub fn views(&self) -> Vec<JobView> {
        let journal = self.0.lock().expect("journal lock");
        journal.jobs().values().cloned().collect()
    }
}
