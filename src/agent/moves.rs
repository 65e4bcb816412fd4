//! Where each export's image is after the migrations the journal records: away (renamed to
//! its stale name at the switchover) or home again (the image received and committed here).
//! A restarted agent opens an export whose configured path is gone where these moves left
//! its image.
//!
//! Invariant: the moves are replayed in journal order (each job by its first record), so the
//! answer is the last thing that happened to the disk, whatever the job ids.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::journal::{SharedJournal, Side, SourcePhase, TargetPhase};

/// One move of an export's disk, as the journal records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Move {
    /// A migration from here switched over: the image took its stale name
    /// (`disk::stale_path(image, job)`), and requests are forwarded.
    Retired {
        /// The job.
        job_id: u64,
        /// The disk's size (an export whose stale image was collected opens with it).
        size_bytes: u64,
    },
    /// A migration to here committed: the disk is the image at this path.
    Home {
        /// The received image.
        image: PathBuf,
    },
}

/// Export name -> the moves of its disk that the journal records, oldest first (by the
/// sequence number of each job's first record).
pub fn moves(journal: &SharedJournal) -> BTreeMap<String, Vec<Move>> {
    let mut views = journal.views();
    views.sort_by_key(|view| view.first_seq);
    let mut moves: BTreeMap<String, Vec<Move>> = BTreeMap::new();
    for view in views {
        let step = match &view.side {
            Side::Source(source) if source.phase == SourcePhase::Switched => Move::Retired {
                job_id: view.job_id,
                size_bytes: view.size_bytes,
            },
            Side::Target(target) if target.phase == TargetPhase::Committed => Move::Home {
                image: target.image_path.clone(),
            },
            _ => continue,
        };
        moves.entry(view.export.clone()).or_default().push(step);
    }
    moves
}

/// Where an image first at `configured` is after `moves`.
pub fn locate(configured: &Path, moves: &[Move]) -> PathBuf {
    moves
        .iter()
        .fold(configured.to_path_buf(), |image, step| match step {
            Move::Retired { job_id, .. } => crate::disk::stale_path(&image, *job_id),
            Move::Home { image } => image.clone(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: an image is found where the journal's moves left it: away (stale name), home
    // again (the received image), away again (that image's stale name). Method: replay.
    #[test]
    fn locate_replays_the_moves() {
        let configured = Path::new("/images/vm1.img");
        let home = PathBuf::from("/var/lib/ferry/images/vm1.img");
        assert_eq!(locate(configured, &[]), configured);
        let away = [Move::Retired {
            job_id: 3,
            size_bytes: 1,
        }];
        assert_eq!(
            locate(configured, &away),
            Path::new("/images/vm1.img.stale-3")
        );
        let back = [
            Move::Retired {
                job_id: 3,
                size_bytes: 1,
            },
            Move::Home {
                image: home.clone(),
            },
        ];
        assert_eq!(locate(configured, &back), home);
        let again = [
            Move::Retired {
                job_id: 3,
                size_bytes: 1,
            },
            Move::Home { image: home },
            Move::Retired {
                job_id: 9,
                size_bytes: 1,
            },
        ];
        assert_eq!(
            locate(configured, &again),
            Path::new("/var/lib/ferry/images/vm1.img.stale-9")
        );
    }
}
