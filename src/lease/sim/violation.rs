//! What the lease simulation checks after every event: a broken invariant, named with the
//! true time it was seen at.

use std::fmt;

/// A broken invariant, with the true time it was seen at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Both managers acted as active at once.
    TwoActives {
        /// True time, ms.
        at_ms: u64,
        /// Their epochs (m1, m2).
        epochs: (u64, u64),
    },
    /// An active interval began with an epoch not above the previous one's.
    EpochWentBack {
        /// True time, ms.
        at_ms: u64,
        /// The previous active's epoch.
        previous: u64,
        /// The new one.
        epoch: u64,
    },
    /// An agent executed a command older than an epoch it had seen.
    StaleCommand {
        /// True time, ms.
        at_ms: u64,
        /// The command's epoch.
        epoch: u64,
        /// The agent's highest.
        highest: u64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TwoActives { at_ms, epochs } => write!(
                f,
                "two active managers at {at_ms} ms (m1 epoch {}, m2 epoch {})",
                epochs.0, epochs.1
            ),
            Self::EpochWentBack {
                at_ms,
                previous,
                epoch,
            } => write!(
                f,
                "epoch {epoch} active at {at_ms} ms after epoch {previous}"
            ),
            Self::StaleCommand {
                at_ms,
                epoch,
                highest,
            } => write!(
                f,
                "agent executed epoch {epoch} after seeing {highest} at {at_ms} ms"
            ),
        }
    }
}
