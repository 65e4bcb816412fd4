//! The agent's side of manager fencing: the highest manager epoch seen, persisted in
//! `<state-dir>/manager-epoch` ([`crate::lease::fence`] defines the file and the decision).
//!
//! Every command from a `ferry manager` carries its epoch; [`Fencing::admit`] refuses an epoch
//! lower than the highest seen, and writes a higher one durably
//! ([`crate::durable::write_atomic`]) *before* admitting it, so after a crash or a kill -9 the
//! agent still refuses every epoch older than one it acted under.
//!
//! Invariants:
//! - The persisted epoch never decreases: raises are serialized by the write lock, each
//!   re-checked under it, and the in-memory fence moves only after its file is durable.
//! - A corrupt or unreadable epoch file stops the agent at start ([`FenceError::Corrupt`],
//!   [`FenceError::Read`]); only a missing file means 0. Forgetting an epoch would let a
//!   paused old manager act again.
//! - While an [`Admitted`] lives (the command it admitted runs), no higher epoch is admitted:
//!   a newer manager's first command starts only after every older command has ended.
//!   Commands without an epoch (the operator's CLI) are not fenced.

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::api::ControlError;
use crate::durable::{self, DurableError};
use crate::error::error_chain;
use crate::jobs::job::ManagerEpoch;
use crate::lease::fence::{self, Admission, EpochFence, EpochFileError, StaleEpoch};
use crate::transfer::TargetError;

/// The epoch file's name in the state directory.
pub const EPOCH_FILE: &str = "manager-epoch";

/// Why the fence cannot be loaded, or a command is not admitted.
#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    /// The epoch file exists but cannot be read.
    #[error("cannot read the manager epoch file {}", path.display())]
    Read {
        /// The epoch file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The epoch file is damaged: the agent will not guess its epoch.
    #[error(
        "manager epoch file {} is corrupt (never read as epoch 0, which would let an old \
         manager act again)",
        path.display()
    )]
    Corrupt {
        /// The epoch file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: EpochFileError,
    },
    /// The command's epoch is older than one already seen.
    #[error(transparent)]
    Stale(#[from] StaleEpoch),
    /// A higher epoch could not be made durable, so its command was not admitted.
    #[error("cannot persist manager epoch {epoch}")]
    Persist {
        /// The epoch.
        epoch: u64,
        /// Why.
        #[source]
        source: DurableError,
    },
}

impl From<FenceError> for ControlError {
    fn from(err: FenceError) -> Self {
        match err {
            FenceError::Stale(stale) => ControlError::StaleEpoch(stale),
            FenceError::Read { .. } | FenceError::Corrupt { .. } | FenceError::Persist { .. } => {
                ControlError::Io(error_chain(&err))
            }
        }
    }
}

/// The agent's epoch fence and its file.
#[derive(Debug)]
pub struct Fencing {
    path: PathBuf,
    fence: RwLock<EpochFence>,
    /// `fence.highest`, readable without the lock: a command holding an [`Admitted`] may ask
    /// for it (`/metrics`), and a second read lock on one thread deadlocks behind a waiting
    /// writer.
    highest: AtomicU64,
}

impl ManagerEpoch for Fencing {
    fn highest(&self) -> u64 {
        Fencing::highest(self)
    }
}

/// A command admitted at the fence's current epoch; see the module invariants.
#[derive(Debug)]
pub struct Admitted<'a> {
    fence: RwLockReadGuard<'a, EpochFence>,
}

impl Admitted<'_> {
    /// The epoch the command was admitted at (the highest seen).
    pub fn epoch(&self) -> u64 {
        self.fence.highest
    }
}

impl Fencing {
    /// Loads the fence of the agent keeping `state_dir`: 0 when the epoch file is missing.
    pub fn load(state_dir: &Path) -> Result<Fencing, FenceError> {
        let path = state_dir.join(EPOCH_FILE);
        let highest = read_epoch_file(&path)?.unwrap_or(0);
        if highest > 0 {
            log::info!("manager epoch {highest} (from {})", path.display());
        }
        Ok(Fencing {
            path,
            fence: RwLock::new(EpochFence { highest }),
            highest: AtomicU64::new(highest),
        })
    }

    /// The highest epoch seen (and persisted). Takes no lock.
    pub fn highest(&self) -> u64 {
        // Relaxed: a gauge; admission decisions read the fence under its lock.
        self.highest.load(Ordering::Relaxed)
    }

    /// Admits a command of `epoch`: refused when older than the highest seen; a higher epoch
    /// is persisted first. The command may act while the returned [`Admitted`] lives.
    pub fn admit(&self, epoch: u64) -> Result<Admitted<'_>, FenceError> {
        loop {
            let fence = self.read();
            match fence.check(epoch)? {
                Admission::Current => return Ok(Admitted { fence }),
                Admission::Raise => drop(fence),
            }
            // Raised (by us or a racing caller), or refused; the next check decides.
            self.raise(epoch)?;
        }
    }

    /// Admits a block-stream Open or Commit of a manager's job (see
    /// [`crate::transfer::TargetSpec::manager_epoch`]); `None` (an operator's job) is not
    /// fenced. The step may act while the returned [`Admitted`] lives.
    pub fn admit_stream(&self, epoch: Option<u64>) -> Result<Option<Admitted<'_>>, TargetError> {
        let Some(epoch) = epoch else {
            return Ok(None);
        };
        match self.admit(epoch) {
            Ok(admitted) => Ok(Some(admitted)),
            Err(FenceError::Stale(stale)) => Err(TargetError::Refused(stale.to_string())),
            Err(err) => {
                log::error!("block stream: {}", error_chain(&err));
                Err(TargetError::Refused(
                    "the destination cannot record the manager epoch".into(),
                ))
            }
        }
    }

    /// Persists `epoch` and moves the fence to it, unless it is no longer higher.
    #[cold]
    fn raise(&self, epoch: u64) -> Result<(), FenceError> {
        let mut fence = self.write();
        if fence.check(epoch)? == Admission::Current {
            return Ok(());
        }
        durable::write_atomic(&self.path, fence::encode_file(epoch).as_bytes())
            .map_err(|source| FenceError::Persist { epoch, source })?;
        let previous = fence.highest;
        fence.raise(epoch);
        self.highest.store(epoch, Ordering::Relaxed);
        log::info!("manager epoch {epoch} (was {previous}): a manager took over");
        Ok(())
    }

    // The fence is only written after its file is durable, so a panic elsewhere while a guard
    // was held leaves it consistent: poisoning is ignored.
    fn read(&self) -> RwLockReadGuard<'_, EpochFence> {
        self.fence.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, EpochFence> {
        self.fence.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The epoch in the file at `path`; `None` when there is no file.
fn read_epoch_file(path: &Path) -> Result<Option<u64>, FenceError> {
    let read_error = |source| FenceError::Read {
        path: path.to_owned(),
        source,
    };
    let file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(read_error(err)),
    };
    let mut bytes = Vec::new();
    // One byte past the longest valid file is enough to call a larger one corrupt.
    let limit = u64::try_from(fence::FILE_MAX_BYTES).expect("small") + 1;
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    fence::decode_file(&bytes)
        .map(Some)
        .map_err(|source| FenceError::Corrupt {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    fn file_epoch(dir: &Path) -> Option<u64> {
        read_epoch_file(&dir.join(EPOCH_FILE)).expect("readable")
    }

    #[test]
    fn a_higher_epoch_is_durable_before_it_is_admitted() {
        // Goal: admitting a higher epoch writes the file first; an equal one writes nothing;
        // a lower one is refused naming both. Method: admit 5, look at the file while the
        // command is held, admit 5 again, then 4.
        let dir = tempfile::tempdir().expect("tempdir");
        let fencing = Fencing::load(dir.path()).expect("load");
        assert_eq!(fencing.highest(), 0);
        assert_eq!(
            file_epoch(dir.path()),
            None,
            "nothing written before a manager"
        );
        let admitted = fencing.admit(5).expect("higher");
        assert_eq!(admitted.epoch(), 5);
        assert_eq!(file_epoch(dir.path()), Some(5));
        drop(admitted);
        fencing.admit(5).expect("equal");
        let err = fencing.admit(4).expect_err("lower");
        assert!(matches!(
            err,
            FenceError::Stale(StaleEpoch {
                epoch: 4,
                highest: 5
            })
        ));
        let control = ControlError::from(err);
        assert_eq!(control.http_status(), 409);
        assert!(control.to_string().contains("epoch 4") && control.to_string().contains("5"));
        assert_eq!(fencing.highest(), 5);
    }

    #[test]
    fn a_raise_that_cannot_persist_is_not_admitted() {
        // Goal: no durable file, no admission, and the fence stays where it was. Method: put
        // a non-empty directory where the file goes (the rename fails), admit 5.
        let dir = tempfile::tempdir().expect("tempdir");
        let fencing = Fencing::load(dir.path()).expect("load");
        let in_the_way = dir.path().join(EPOCH_FILE);
        std::fs::create_dir(&in_the_way).expect("mkdir");
        std::fs::write(in_the_way.join("occupant"), b"x").expect("occupant");
        let err = fencing.admit(5).expect_err("cannot persist");
        assert!(matches!(err, FenceError::Persist { epoch: 5, .. }), "{err}");
        assert_eq!(ControlError::from(err).http_status(), 500);
        assert_eq!(fencing.highest(), 0);
        fencing.admit(0).expect("the old epoch still holds");
    }

    #[test]
    fn a_restart_keeps_the_highest_epoch() {
        // Goal: after a restart the agent refuses what it refused before. Method: admit 5
        // then 7, load the state directory again, admit 6 (refused), 7 and 8.
        let dir = tempfile::tempdir().expect("tempdir");
        let fencing = Fencing::load(dir.path()).expect("load");
        drop(fencing.admit(5).expect("5"));
        drop(fencing.admit(7).expect("7"));
        drop(fencing);
        let fencing = Fencing::load(dir.path()).expect("reload");
        assert_eq!(fencing.highest(), 7);
        assert!(matches!(fencing.admit(6), Err(FenceError::Stale(_))));
        drop(fencing.admit(7).expect("7"));
        drop(fencing.admit(8).expect("8"));
        assert_eq!(Fencing::load(dir.path()).expect("reload").highest(), 8);
    }

    #[test]
    fn a_damaged_file_stops_the_load() {
        // Goal: a corrupt or unreadable file is an error at start, never epoch 0.
        // Method: empty, garbage, truncated, oversized, and a directory in the file's place.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join(EPOCH_FILE);
        let good = fence::encode_file(9);
        let oversized = format!("{good}{}", " ".repeat(200));
        for bad in ["", "9\n", &good[..good.len() - 2], oversized.as_str()] {
            std::fs::write(&path, bad).expect("write");
            let err = Fencing::load(dir.path()).expect_err(bad);
            assert!(matches!(err, FenceError::Corrupt { .. }), "{bad:?}: {err}");
            assert!(err.to_string().contains(EPOCH_FILE), "{err}");
        }
        std::fs::remove_file(&path).expect("rm");
        std::fs::create_dir(&path).expect("mkdir");
        let err = Fencing::load(dir.path()).expect_err("a directory");
        assert!(matches!(err, FenceError::Read { .. }), "{err}");
    }

    #[test]
    fn concurrent_admits_never_persist_a_lower_epoch_last() {
        // Goal: racing raises leave the file at the highest epoch admitted, and the file
        // never goes down meanwhile. Method: 6 threads admit PRNG epochs while a watcher
        // re-reads the file and checks it only rises; at the end file = fence = max admitted.
        let dir = tempfile::tempdir().expect("tempdir");
        let fencing = Arc::new(Fencing::load(dir.path()).expect("load"));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let watcher = {
            let (path, stop) = (dir.path().join(EPOCH_FILE), stop.clone());
            std::thread::spawn(move || {
                let mut seen = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let now = read_epoch_file(&path).expect("whole file").unwrap_or(0);
                    assert!(now >= seen, "file went from {seen} down to {now}");
                    seen = now;
                }
            })
        };
        let workers: Vec<_> = (0..6u64)
            .map(|seed| {
                let fencing = fencing.clone();
                std::thread::spawn(move || {
                    let mut prng = crate::prng::SplitMix64::new(seed);
                    let mut admitted_max = 0;
                    for _ in 0..60 {
                        let epoch = 1 + prng.below(80);
                        if let Ok(admitted) = fencing.admit(epoch) {
                            assert_eq!(admitted.epoch(), epoch);
                            admitted_max = admitted_max.max(epoch);
                        }
                    }
                    admitted_max
                })
            })
            .collect();
        let max = workers.into_iter().map(|w| w.join().expect("worker")).max();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().expect("watcher");
        let max = max.expect("six workers");
        assert_eq!(fencing.highest(), max);
        assert_eq!(file_epoch(dir.path()), Some(max));
    }

    #[test]
    fn a_raise_waits_for_older_commands_to_end() {
        // Goal: a newer manager is admitted only after commands of the older epoch ended, and
        // the held command can still read the epoch. Method: hold an admission at 5; admit 6
        // on another thread; it must still wait (file at 5) after 100 ms while `highest`
        // answers, and finish once the hold is dropped.
        let dir = tempfile::tempdir().expect("tempdir");
        let fencing = Arc::new(Fencing::load(dir.path()).expect("load"));
        let older = fencing.admit(5).expect("5");
        let newer = {
            let fencing = fencing.clone();
            std::thread::spawn(move || fencing.admit(6).map(|admitted| admitted.epoch()).ok())
        };
        std::thread::sleep(Duration::from_millis(100));
        assert!(!newer.is_finished(), "6 admitted while a command of 5 runs");
        assert_eq!(file_epoch(dir.path()), Some(5));
        // The held command may still read the gauge (no second lock behind the writer).
        assert_eq!(fencing.highest(), 5);
        drop(older);
        assert_eq!(newer.join().expect("newer"), Some(6));
        assert_eq!(file_epoch(dir.path()), Some(6));
    }
}
