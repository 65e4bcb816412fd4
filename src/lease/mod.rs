//! Witness leases: how the two instances of `ferry manager` agree which one is active
//! (DESIGN.md capability 4, `docs/manager-lease.md`).
//!
//! The active manager holds a lease kept by the agent of one managed host, the witness, in a
//! file of sector-sized checksummed records. The witness grants, renews and hands over by
//! compare-and-swap on (epoch, holder) and judges expiry by its own monotonic clock; the
//! holder stops acting at a local deadline computed from when it *sent* its renewal, shrunk
//! by the bound on clock-rate drift, so it always stops before the witness could grant the
//! lease to anyone else.
//!
//! - [`witness`]: the witness's pure decisions (grant, renew, install at a new witness).
//! - [`holder`]: the holder's local deadline.
//! - [`role`]: a manager's role (standby, active, moving the witness), its pure decisions.
//! - [`record`]: the on-disk record (magic, version, checksum); a torn or corrupt record
//!   never counts as a lease.
//! - [`store`]: the lease file, O_DIRECT + fdatasync, read back and verified, with a bounded
//!   write time.
//! - [`fence`]: the agent's epoch fence: the highest epoch seen, lower ones refused.
//! - [`sim`]: the deterministic simulation of two managers, hosts, partitions, crashes,
//!   drifting clocks and witness moves.
//!
//! Invariants (checked by [`sim`] at every step): at most one manager acts as active at any
//! true time; epochs only grow; no agent executes a command older than an epoch it has seen.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::name::{self, NameError};

pub mod fence;
pub mod holder;
pub mod record;
pub mod role;
pub mod sim;
pub mod store;
pub mod witness;

/// A manager's id (`ferry manager --id`), under the one name rule of [`crate::name`].
/// In JSON, a plain string, checked against the rule when read.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ManagerId(String);

impl ManagerId {
    /// Checks `id` against the name rule.
    pub fn new(id: &str) -> Result<Self, NameError> {
        name::validate(id)?;
        Ok(Self(id.to_string()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ManagerId {
    type Error = NameError;

    fn try_from(id: String) -> Result<Self, NameError> {
        name::validate(&id)?;
        Ok(Self(id))
    }
}

impl From<ManagerId> for String {
    fn from(id: ManagerId) -> String {
        id.0
    }
}

impl fmt::Display for ManagerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a witness keeps for one manager pair: the content of a lease record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Raised by every takeover; commands of a lower epoch are refused by agents.
    pub epoch: u64,
    /// The manager holding the lease at `epoch`; `None` before anyone acquired it.
    pub holder: Option<ManagerId>,
    /// Which choice of witness this lease belongs to; raised by every witness move.
    pub witness_generation: u64,
    /// How long a grant or renewal lasts, by the witness's clock.
    pub lease_ms: u32,
}
