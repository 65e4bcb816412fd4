//! What `ferry manager` serves: its status and the fleet's hosts.
//!
//! DTOs only; the manager (`crate::manager`) fills them, the CLI renders them.

use serde::{Deserialize, Serialize};

use crate::lease::role::WitnessChoice;

/// `GET /v1/manager/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManagerStatus {
    /// This manager's id.
    pub id: String,
    /// The pair's name.
    pub pair: String,
    /// Whether it acts as active now.
    pub active: bool,
    /// The epoch it acts under, when active.
    pub epoch: Option<u64>,
    /// The highest epoch it knows of.
    pub known_epoch: u64,
    /// The witness both managers recorded.
    pub witness: Option<WitnessChoice>,
    /// A witness move this manager proposed and the peer has not confirmed.
    pub pending: Option<WitnessChoice>,
    /// Time left before it must stop acting, by its own clock (0 when standby).
    pub lease_remaining_ms: u64,
    /// The lease it runs with.
    pub lease_ms: u32,
    /// Its renewal interval.
    pub renew_interval_ms: u32,
    /// The other manager as this one sees it.
    pub peer: PeerView,
    /// Role changes since start.
    pub role_changes: u64,
    /// The latest role change and why.
    pub last_change: Option<RoleChange>,
    /// Hosts drained (never witness).
    pub drained: Vec<String>,
    /// The managed agents.
    pub agents: Vec<AgentView>,
}

/// The peer manager, as seen from this one.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerView {
    /// Its id.
    pub id: String,
    /// Its API address.
    pub address: String,
    /// Time since its last message, if any came.
    pub heard_ms_ago: Option<u64>,
    /// Whether its last heartbeat said it was active.
    pub active: bool,
}

/// A role change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleChange {
    /// When (Unix ms).
    pub at_unix_ms: u64,
    /// Active afterwards.
    pub active: bool,
    /// The epoch held or last known.
    pub epoch: u64,
    /// Why.
    pub reason: String,
}

/// One managed agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentView {
    /// Host name.
    pub name: String,
    /// API address.
    pub address: String,
    /// Time since it last answered, if it did.
    pub heard_ms_ago: Option<u64>,
}

/// `POST /v1/manager/takeover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakeoverRequest {
    /// Must be true: a takeover otherwise happens only through the witness.
    pub force: bool,
    /// The host to record as witness (one this manager reaches).
    pub witness: String,
}

/// `POST /v1/hosts`: one more agent for the managers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostAdd {
    /// The host's name.
    pub name: String,
    /// Its agent's control API address.
    pub address: String,
    /// Its block-stream address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<String>,
}

/// `POST /v1/manager/batches`: a batch the active manager drives across agents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchPlan {
    /// The batch's name (journaled on both sides of every job).
    pub name: String,
    /// Jobs running at once across the fleet.
    pub concurrency: usize,
    /// What moves where.
    pub items: Vec<BatchItem>,
    /// Options of every job (its `to` and `batch` are set per item).
    pub options: crate::api::types::MigrateRequest,
    /// A seed replication instead of migrations: each item's seed (exported, shipped and
    /// imported by the operator) is caught up to its destination with these options (its
    /// `to` set per item); `options` is then unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_sync: Option<crate::jobs::seeding::SeedSyncRequest>,
}

/// One export of a batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItem {
    /// The export (VM disk).
    pub export: String,
    /// The managed host serving it; found by the manager when absent.
    #[serde(default)]
    pub source: Option<String>,
    /// The destination's block-stream address, or a managed host's name whose `transfer`
    /// address the manager knows.
    pub to: String,
}

/// A batch as the active manager last saw it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchView {
    /// The batch's name.
    pub name: String,
    /// Every item's state.
    pub items: Vec<BatchItemView>,
    /// Every item reached a final state.
    pub done: bool,
}

/// One item's state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchItemView {
    /// The export.
    pub export: String,
    /// Its source host.
    pub source: String,
    /// The destination's address.
    pub to: String,
    /// waiting, running, resuming, migrated, not-migrated, needs-attention, unknown.
    pub state: String,
    /// The job, unique across the fleet: `SOURCE:ID`.
    pub job: Option<String>,
    /// Why, when not migrated.
    pub reason: Option<String>,
}
