//! What a seed catch-up adds to a job: its request (the seed, what to do once in sync,
//! whether the tracker can be trusted) and what the job tells the catch-up driver.

use serde::{Deserialize, Serialize};

use super::JobEnv;
use crate::dirty::DirtySet;
use crate::migrate::MigrationEnv;

/// What a seed catch-up does once in sync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncThen {
    /// Stop at the first in-sync point.
    Stop,
    /// Keep the destination in sync: a new in-sync point after every run, until stopped.
    Follow,
    /// Switch over to the destination, as a migration does.
    Migrate,
}

/// A seed catch-up's part of a job request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedSync {
    /// The seed the destination imported.
    pub seed_id: [u8; 16],
    /// What to do once in sync.
    pub then: SyncThen,
    /// The seed's tracker is gone (or lost): every block is a candidate and only digests
    /// say what travels.
    pub compare_all: bool,
}

impl JobEnv {
    /// The export this job copies.
    pub fn export_name(&self) -> &str {
        self.export.name()
    }

    /// Whether the next run compares digests of every block (no tracker to trust, or the
    /// destination's image changed outside ferry).
    pub fn compares_all(&self) -> bool {
        self.compare_all
    }

    /// Every block of the disk, holes too.
    pub(super) fn every_block(&self) -> DirtySet {
        let mut all = DirtySet::empty(self.tracker.granularity_bytes(), self.disk_bytes());
        let blocks = all.block_count();
        all.insert_range(0, blocks);
        all
    }

    /// Bytes read from the source image so far, to send or to compare digests.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read
    }
}
