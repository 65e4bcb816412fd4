//! The agent as lease witness: keeps the lease of each manager pair that asks
//! (`docs/manager-lease.md`), one [`Witness`] (the pure decisions of [`crate::lease::witness`])
//! and one [`LeaseFile`] per pair, in `<state-dir>/leases/<pair>.lease`.
//!
//! Invariants:
//! - Restart rule: at start every `*.lease` file is read and its lease counts as renewed at
//!   that moment ([`Witness::recovered`]), so a holder gets at least the time it counted on,
//!   and a candidate waits a full lease. A pair first met later (its file created, or read
//!   only then) is recovered at that later moment, which is later still, so as safe.
//! - A lease file that cannot be opened or read (corrupt, foreign, locked, an I/O error) is
//!   never taken for "no lease": every request for its pair fails ([`WitnessError::Store`])
//!   and is retried against the file, so an operator's repair takes effect without a restart.
//! - One request of a pair at a time: its mutex is held across decide, write and
//!   [`Witness::written`], so no decision is made against a state a pending write is about to
//!   change. Pairs do not wait for each other; a new pair's file is opened under its own
//!   mutex, not the table's.
//! - A change is granted only once its record is confirmed on disk. A write that timed out or
//!   may have landed leaves its epoch held by nobody ([`Witness::written`] with `ok = false`);
//!   a write refused before anything was written (the file busy with an earlier timed-out
//!   write, a bad file) changes nothing. Both answer [`Refusal::WriteFailed`].
//! - Bounded: a request that would create a pair beyond [`PAIRS_MAX`] is refused; requests
//!   that change nothing (a read, a renewal) never create a pair or its file.
//! - A panic while serving a pair (a bug) drops that pair's memory; the next request reads its
//!   file again under the restart rule.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use crate::api::leases::LeaseStatus;
use crate::api::ControlError;
use crate::env::Clock;
use crate::error::error_chain;
use crate::lease::store::{LeaseFile, StoreError, FILE_SUFFIX};
use crate::lease::witness::{Decision, LeaseReply, LeaseRequest, Refusal, Witness};
use crate::lease::Lease;
use crate::name::{self, NameError};

/// The lease directory's name in the state directory.
pub const LEASE_DIR: &str = "leases";
/// Most manager pairs one agent keeps leases for; requests come from the network.
pub const PAIRS_MAX: usize = 64;

/// Why a lease request was not decided.
#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    /// The pair's name breaks the name rule.
    #[error("bad manager pair name")]
    BadPair(#[source] NameError),
    /// Keeping one more pair would pass [`PAIRS_MAX`].
    #[error("this agent already keeps the leases of {max} manager pairs; refusing pair '{pair}'")]
    TooManyPairs {
        /// The pair refused.
        pair: String,
        /// The limit.
        max: usize,
    },
    /// The pair's lease file cannot be opened or read: nothing is decided from it.
    #[error(
        "the lease file of manager pair '{pair}' cannot be opened or read (never taken for \
         no lease; an operator must repair or remove it)"
    )]
    Store {
        /// The pair.
        pair: String,
        /// Why (boxed: the error stays small on the success path).
        #[source]
        source: Box<StoreError>,
    },
}

impl From<WitnessError> for ControlError {
    fn from(err: WitnessError) -> Self {
        let message = error_chain(&err);
        match err {
            WitnessError::BadPair(_) => ControlError::Invalid(message),
            WitnessError::TooManyPairs { .. } => ControlError::Busy(message),
            WitnessError::Store { .. } => ControlError::Io(message),
        }
    }
}

/// What is known of one pair.
#[derive(Debug)]
enum PairState {
    /// Not loaded yet: just added, or forgotten after a panic. Loaded by the next request.
    New,
    /// The lease as decided, and its file.
    Ready { witness: Witness, file: LeaseFile },
    /// The file could not be opened or read; `error` is the last reason (for listings).
    Broken { error: String },
}

type PairEntry = Arc<Mutex<PairState>>;

/// The leases this agent keeps as witness; see the module docs.
#[derive(Debug)]
pub struct WitnessService {
    dir: PathBuf,
    clock: Arc<dyn Clock>,
    pairs_max: usize,
    /// The table is locked only to find or add an entry, never across I/O.
    pairs: Mutex<BTreeMap<String, PairEntry>>,
    write_failures: AtomicU64,
}

impl WitnessService {
    /// Loads every lease file in `dir` (the restart rule); a file that cannot be read is
    /// logged and its pair refuses requests. A directory that cannot be listed is logged too:
    /// its files are then loaded by their pair's first request.
    pub fn open(dir: PathBuf, clock: Arc<dyn Clock>, pairs_max: usize) -> WitnessService {
        assert!(pairs_max > 0, "a witness keeps at least one pair");
        let service = WitnessService {
            dir,
            clock,
            pairs_max,
            pairs: Mutex::new(BTreeMap::new()),
            write_failures: AtomicU64::new(0),
        };
        let mut pairs = BTreeMap::new();
        for pair in lease_files(&service.dir) {
            let mut state = PairState::New;
            if service.load(&pair, &mut state).is_ok() {
                log::info!(
                    "witness: lease of manager pair '{pair}' recovered (counted as renewed now)"
                );
            }
            pairs.insert(pair, Arc::new(Mutex::new(state)));
        }
        *service.table() = pairs;
        service
    }

    /// Decides `request` for `pair`: `lease_ms` is the lease a pair new here starts with, and
    /// a record to write must be confirmed within `write_timeout`.
    pub fn serve(
        &self,
        pair: &str,
        request: &LeaseRequest,
        lease_ms: u32,
        write_timeout: Duration,
    ) -> Result<LeaseReply, WitnessError> {
        name::validate(pair).map_err(WitnessError::BadPair)?;
        let entry = match self.find(pair) {
            Some(entry) => entry,
            None if self.file_exists(pair) => self.add(pair)?,
            None => {
                // Nothing kept for this pair: what changes nothing is answered as is, without
                // creating the pair or its file.
                let empty = Witness::default();
                match empty.decide(request, self.clock.now_ns(), lease_ms) {
                    Decision::Reply(reply) | Decision::Renew(reply) => return Ok(reply),
                    Decision::Write { .. } => self.add(pair)?,
                }
            }
        };
        let mut state = lock_pair(&entry);
        self.load(pair, &mut state)?;
        let PairState::Ready { witness, file } = &mut *state else {
            unreachable!("loaded above");
        };
        Ok(self.decide(witness, file, request, lease_ms, write_timeout))
    }

    /// Every pair kept, by name: its lease and time left, or why its file is unusable.
    pub fn statuses(&self) -> Vec<LeaseStatus> {
        let entries: Vec<(String, PairEntry)> = self
            .table()
            .iter()
            .map(|(pair, entry)| (pair.clone(), entry.clone()))
            .collect();
        entries
            .into_iter()
            .map(|(pair, entry)| {
                let state = lock_pair(&entry);
                let (lease, remaining_ms, error) = match &*state {
                    PairState::New => (None, 0, None),
                    PairState::Ready { witness, .. } => (
                        witness.lease().cloned(),
                        witness.remaining_ms(self.clock.now_ns()),
                        None,
                    ),
                    PairState::Broken { error } => (None, 0, Some(error.clone())),
                };
                LeaseStatus {
                    pair,
                    lease,
                    remaining_ms,
                    error,
                }
            })
            .collect()
    }

    /// How many pairs are kept (the `ferry_witness_pairs` gauge).
    pub fn pair_count(&self) -> usize {
        self.table().len()
    }

    /// Lease writes that failed or timed out since start.
    pub fn write_failures(&self) -> u64 {
        // Relaxed: a counter for /metrics.
        self.write_failures.load(Ordering::Relaxed)
    }

    /// Decides `request` against a loaded pair and applies the decision.
    fn decide(
        &self,
        witness: &mut Witness,
        file: &mut LeaseFile,
        request: &LeaseRequest,
        lease_ms: u32,
        write_timeout: Duration,
    ) -> LeaseReply {
        let decided_ns = self.clock.now_ns();
        match witness.decide(request, decided_ns, lease_ms) {
            Decision::Reply(reply) => reply,
            Decision::Renew(reply) => {
                witness.renewed(decided_ns);
                reply
            }
            Decision::Write { lease, reply } => {
                let written = file.write_within(&lease, write_timeout);
                self.written(witness, file, lease, reply, written, decided_ns)
            }
        }
    }

    /// Applies the outcome of writing `lease` (decided at `decided_ns`); see the module docs.
    fn written(
        &self,
        witness: &mut Witness,
        file: &LeaseFile,
        lease: Lease,
        reply: LeaseReply,
        written: Result<crate::lease::record::Record, StoreError>,
        decided_ns: u64,
    ) -> LeaseReply {
        let err = match written {
            Ok(_) => return witness.written(lease, reply, true, decided_ns, self.clock.now_ns()),
            Err(err) => err,
        };
        // Relaxed: a counter for /metrics.
        self.write_failures.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "witness: lease of manager pair '{}' (epoch {}) not written: {}",
            file.pair(),
            lease.epoch,
            error_chain(&err)
        );
        if err.is_maybe_written() {
            // It may still land: its epoch is held by nobody, and nothing is granted for a
            // full lease from now.
            return witness.written(lease, reply, false, decided_ns, self.clock.now_ns());
        }
        // Nothing was written (an earlier write still in flight, a bad file): nothing changes.
        LeaseReply::Refused {
            reason: Refusal::WriteFailed,
            lease: witness.lease().cloned(),
        }
    }

    /// Makes `state` Ready by reading the pair's file, unless it already is.
    fn load(&self, pair: &str, state: &mut PairState) -> Result<(), WitnessError> {
        if matches!(state, PairState::Ready { .. }) {
            return Ok(());
        }
        let opened = LeaseFile::open_or_create(&self.dir, pair).and_then(|file| {
            let lease = file.read()?.map(|record| record.lease);
            // The clock is read after the file: the lease counts as renewed no earlier.
            let witness = Witness::recovered(lease, self.clock.now_ns());
            Ok(PairState::Ready { witness, file })
        });
        match opened {
            Ok(ready) => {
                if let PairState::Broken { .. } = state {
                    log::info!("witness: the lease file of manager pair '{pair}' is usable again");
                }
                *state = ready;
                Ok(())
            }
            Err(source) => {
                let error = error_chain(&source);
                if !matches!(state, PairState::Broken { error: last } if *last == error) {
                    log::error!("witness: manager pair '{pair}': requests refused: {error}");
                }
                *state = PairState::Broken { error };
                Err(WitnessError::Store {
                    pair: pair.to_owned(),
                    source: Box::new(source),
                })
            }
        }
    }

    fn find(&self, pair: &str) -> Option<PairEntry> {
        self.table().get(pair).cloned()
    }

    /// The entry of `pair`, added (not loaded) if missing and the table has room.
    fn add(&self, pair: &str) -> Result<PairEntry, WitnessError> {
        let mut table = self.table();
        if let Some(entry) = table.get(pair) {
            return Ok(entry.clone());
        }
        if table.len() >= self.pairs_max {
            return Err(WitnessError::TooManyPairs {
                pair: pair.to_owned(),
                max: self.pairs_max,
            });
        }
        let entry = Arc::new(Mutex::new(PairState::New));
        table.insert(pair.to_owned(), entry.clone());
        Ok(entry)
    }

    /// Whether something (a file, or anything else to refuse) is at the pair's file path.
    fn file_exists(&self, pair: &str) -> bool {
        let path = self.dir.join(format!("{pair}{FILE_SUFFIX}"));
        !matches!(path.symlink_metadata(), Err(err) if err.kind() == io::ErrorKind::NotFound)
    }

    // Nothing panics while the table is locked (lookups and inserts): poisoning is ignored.
    fn table(&self) -> MutexGuard<'_, BTreeMap<String, PairEntry>> {
        self.pairs.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Locks a pair. After a panic while it was held (a bug), its memory may differ from its
/// file: it is forgotten, and the next request reads the file again (the restart rule).
fn lock_pair(entry: &Mutex<PairState>) -> MutexGuard<'_, PairState> {
    entry.lock().unwrap_or_else(|poisoned| {
        let mut state = poisoned.into_inner();
        entry.clear_poison();
        log::error!("witness: a request panicked; the pair's lease is read again from its file");
        *state = PairState::New;
        state
    })
}

/// The pairs of the `*.lease` files in `dir`, by name; other names are skipped (logged).
fn lease_files(dir: &Path) -> Vec<String> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(err) => {
            log::error!(
                "witness: cannot list {} ({err}); each pair's file is read at its first request",
                dir.display()
            );
            return Vec::new();
        }
    };
    let mut pairs = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pair) = file_name.to_str().and_then(|n| n.strip_suffix(FILE_SUFFIX)) else {
            continue;
        };
        match name::validate(pair) {
            Ok(()) => pairs.push(pair.to_owned()),
            Err(err) => log::warn!(
                "witness: skipping {:?} in {}: {err}",
                file_name,
                dir.display()
            ),
        }
    }
    pairs.sort();
    pairs
}

#[cfg(test)]
mod tests;
