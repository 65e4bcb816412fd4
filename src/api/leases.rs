//! The witness routes of the control API (their wire types and checks; routed in
//! [`super::server`]): a manager's lease requests to the agent that keeps its pair's lease
//! (`docs/manager-lease.md`), and the list of leases kept.
//!
//! | method | path              | body      | answer             |
//! |--------|-------------------|-----------|--------------------|
//! | POST   | /v1/leases/{pair} | LeaseCall | 200 LeaseReply     |
//! | GET    | /v1/leases        |           | 200 [LeaseStatus]  |
//!
//! Invariants:
//! - Token-protected like every route, but never fenced: a lease request is how a manager
//!   *gets* an epoch, so it must neither raise nor check the agent's epoch fence. A request
//!   carrying [`super::http::MANAGER_EPOCH_HEADER`] on these routes is refused with 400
//!   (rather than ignored), so a caller never believes a lease request was fenced; the
//!   [`super::Client`] never sends it here.
//! - A call is checked before it reaches the witness ([`LeaseCall::check`]): the pair by the
//!   name rule, `lease_ms` in [`LEASE_MS_MIN`]..=[`LEASE_MS_MAX`], `write_timeout_ms` in
//!   1..=`lease_ms / 2` (a write slower than half a lease costs renewals; the witness must
//!   still answer well within one).
//! - Refusals of the lease itself (epoch or holder mismatch, write failed) are answers, 200
//!   with [`LeaseReply::Refused`]; HTTP errors mean the request was not decided at all.

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::lease::witness::{LeaseReply, LeaseRequest, Refusal};
pub use crate::lease::{Lease, ManagerId};

/// Shortest lease a call may give.
pub const LEASE_MS_MIN: u32 = 100;
/// Longest lease a call may give (10 minutes).
pub const LEASE_MS_MAX: u32 = 600_000;

/// The body of `POST /v1/leases/{pair}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseCall {
    /// The lease a pair new at this witness starts with (the pair's configured lease).
    pub lease_ms: u32,
    /// How long the witness may wait for a record write to be confirmed.
    pub write_timeout_ms: u32,
    /// What the manager asks.
    pub request: LeaseRequest,
}

/// Why a [`LeaseCall`] is refused before it reaches the witness.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseCallError {
    /// `lease_ms` is out of range.
    #[error("lease_ms must be from {LEASE_MS_MIN} to {LEASE_MS_MAX}, not {lease_ms}")]
    LeaseMs {
        /// The value given.
        lease_ms: u32,
    },
    /// `write_timeout_ms` is 0 or more than half the lease.
    #[error("write_timeout_ms must be from 1 to lease_ms / 2 ({half_ms}), not {write_timeout_ms}")]
    WriteTimeout {
        /// The value given.
        write_timeout_ms: u32,
        /// Half the lease.
        half_ms: u32,
    },
}

impl LeaseCall {
    /// Checks the numbers against the module's rule.
    pub fn check(&self) -> Result<(), LeaseCallError> {
        if !(LEASE_MS_MIN..=LEASE_MS_MAX).contains(&self.lease_ms) {
            return Err(LeaseCallError::LeaseMs {
                lease_ms: self.lease_ms,
            });
        }
        let half_ms = self.lease_ms / 2;
        if !(1..=half_ms).contains(&self.write_timeout_ms) {
            return Err(LeaseCallError::WriteTimeout {
                write_timeout_ms: self.write_timeout_ms,
                half_ms,
            });
        }
        Ok(())
    }

    /// `write_timeout_ms` as a duration.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.write_timeout_ms))
    }
}

/// One pair in `GET /v1/leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    /// The manager pair.
    pub pair: String,
    /// Its lease; `null` before the first record, or when `error` is set.
    pub lease: Option<Lease>,
    /// Time until it expires, by the witness's clock.
    pub remaining_ms: u64,
    /// Why the lease file cannot be used; requests for the pair fail until it is repaired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The witness's numbers for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WitnessCounters {
    /// Manager pairs kept (`ferry_witness_pairs`).
    pub pairs: u64,
    /// Record writes that failed or timed out (`ferry_witness_write_failures_total`).
    pub write_failures: u64,
}

#[cfg(test)]
mod tests;
