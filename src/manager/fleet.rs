//! The agents a manager manages: those of its configuration, and those an operator added
//! while it runs (`ferry host add`), kept in `<state-dir>/hosts.json` so that a restart
//! keeps them. Every part of the manager (lease workers, pings, the batch driver, the fleet
//! status) reads the agents from here, so an added agent is pinged, may become the witness,
//! and may take part in batches from the moment it is added.
//!
//! Invariants:
//! - A name is one agent: adding a known name with its own address again is a no-op (the
//!   peer manager's copy of an add is idempotent), with another address a [`FleetError::Conflict`]
//!   (moving a host is drain + a new name, never a silent re-point of the witness).
//! - The file holds only run-time additions; the configuration wins over it at start (an
//!   entry of the file that contradicts it is logged and ignored).
//! - An addition is durable before it is used or acknowledged; at most [`MAX_AGENTS`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use thiserror::Error;

use super::config::AgentEntry;
use crate::api::tls::ClientTlsOptions;
use crate::api::Client;

/// Most agents one manager manages.
pub const MAX_AGENTS: usize = 4096;
/// The file of agents added at run time.
pub const HOSTS_FILE: &str = "hosts.json";
/// Largest hosts file read back.
const MAX_FILE_BYTES: u64 = 4 << 20;
/// How long a batch command to an agent may take.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one agent may take to give its status (the fleet status waits for the slowest).
pub const STATUS_TIMEOUT: Duration = Duration::from_millis(1_500);

/// Why an agent was not added.
#[derive(Debug, Error)]
pub enum FleetError {
    /// The name or address is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// The name is managed at another address.
    #[error("{name} is managed at {address} already")]
    Conflict {
        /// The agent's name.
        name: String,
        /// The address it has.
        address: String,
    },
    /// [`MAX_AGENTS`] are managed.
    #[error("{MAX_AGENTS} agents are managed already")]
    Full,
    /// The addition could not be made durable.
    #[error("cannot save {}", path.display())]
    Save {
        /// The hosts file.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::durable::DurableError,
    },
}

/// One managed agent and its API clients, each bounded for its use.
#[derive(Debug)]
pub struct Agent {
    /// Its name (witness choices, status and plans name it).
    pub entry: AgentEntry,
    /// Lease requests and pings: bounded by one renewal interval.
    pub quick: Client,
    /// Batch commands and reads.
    pub command: Client,
    /// The fleet status.
    pub status: Client,
}

/// The managed agents.
#[derive(Debug)]
pub struct Fleet {
    path: PathBuf,
    token: String,
    tls: Option<ClientTlsOptions>,
    quick_timeout: Duration,
    agents: RwLock<BTreeMap<String, Arc<Agent>>>,
    /// Those added at run time (what the file holds).
    added: RwLock<Vec<AgentEntry>>,
}

impl Fleet {
    /// The agents of `configured` and those of `<state_dir>/hosts.json`; pings and lease
    /// requests are bounded by `quick_timeout`.
    pub fn load(
        state_dir: &Path,
        configured: &[AgentEntry],
        token: &str,
        tls: Option<&ClientTlsOptions>,
        quick_timeout: Duration,
    ) -> Fleet {
        let fleet = Fleet {
            path: state_dir.join(HOSTS_FILE),
            token: token.to_string(),
            tls: tls.cloned(),
            quick_timeout,
            agents: RwLock::new(BTreeMap::new()),
            added: RwLock::new(Vec::new()),
        };
        for entry in configured {
            fleet.insert(entry.clone());
        }
        for entry in read_file(&fleet.path) {
            match fleet.get(&entry.name) {
                Some(known) if known.entry.address != entry.address => log::warn!(
                    "{}: {} at {} is ignored: the configuration has it at {}",
                    fleet.path.display(),
                    entry.name,
                    entry.address,
                    known.entry.address
                ),
                Some(_) => {}
                None if fleet.len() >= MAX_AGENTS => {
                    log::warn!(
                        "{}: {} ignored: too many agents",
                        fleet.path.display(),
                        entry.name
                    );
                }
                None => {
                    fleet.insert(entry.clone());
                    fleet.write_added().push(entry);
                }
            }
        }
        fleet
    }

    /// The agent called `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Agent>> {
        self.read().get(name).cloned()
    }

    /// Every agent, by name.
    pub fn all(&self) -> Vec<Arc<Agent>> {
        self.read().values().cloned().collect()
    }

    /// How many agents are managed.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no agent is managed.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Adds `entry` (durably first); `Ok(false)` when it was managed already, as it is.
    pub fn add(&self, entry: AgentEntry) -> Result<bool, FleetError> {
        check_entry(&entry)?;
        // One writer at a time: the file and the map move together.
        let mut added = self.write_added();
        if let Some(known) = self.get(&entry.name) {
            return if known.entry.address == entry.address && known.entry.transfer == entry.transfer
            {
                Ok(false)
            } else {
                Err(FleetError::Conflict {
                    name: entry.name,
                    address: known.entry.address.clone(),
                })
            };
        }
        if self.len() >= MAX_AGENTS {
            return Err(FleetError::Full);
        }
        let mut next = added.clone();
        next.push(entry.clone());
        let bytes = serde_json::to_vec_pretty(&next).expect("entries serialize");
        crate::durable::write_atomic(&self.path, &bytes).map_err(|source| FleetError::Save {
            path: self.path.clone(),
            source,
        })?;
        *added = next;
        self.insert(entry);
        Ok(true)
    }

    fn insert(&self, entry: AgentEntry) {
        let client = |timeout: Duration| {
            let client =
                Client::new(&entry.address, Some(self.token.clone())).with_timeout(timeout);
            match &self.tls {
                Some(tls) => client.with_tls(tls),
                None => client,
            }
        };
        let agent = Agent {
            quick: client(self.quick_timeout),
            command: client(COMMAND_TIMEOUT),
            status: client(STATUS_TIMEOUT),
            entry,
        };
        self.agents
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(agent.entry.name.clone(), Arc::new(agent));
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Agent>>> {
        self.agents.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write_added(&self) -> std::sync::RwLockWriteGuard<'_, Vec<AgentEntry>> {
        self.added.write().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The checks of the configuration's agents, for one added at run time.
fn check_entry(entry: &AgentEntry) -> Result<(), FleetError> {
    crate::name::validate(&entry.name).map_err(|err| FleetError::Invalid(err.to_string()))?;
    for address in std::iter::once(&entry.address).chain(entry.transfer.as_ref()) {
        if address.is_empty()
            || address.len() > 256
            || address.contains(|c: char| c.is_whitespace() || c.is_control())
        {
            return Err(FleetError::Invalid(format!(
                "{address:?} is not an address"
            )));
        }
    }
    Ok(())
}

/// The entries of the hosts file; a missing file is none, a damaged one is logged and none.
fn read_file(path: &Path) -> Vec<AgentEntry> {
    use std::io::Read;
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(err) => {
            log::warn!("{}: {err}", path.display());
            return Vec::new();
        }
    };
    let mut bytes = Vec::new();
    if let Err(err) = file.take(MAX_FILE_BYTES).read_to_end(&mut bytes) {
        log::warn!("{}: {err}", path.display());
        return Vec::new();
    }
    match serde_json::from_slice::<Vec<AgentEntry>>(&bytes) {
        Ok(entries) => entries
            .into_iter()
            .filter(|entry| match check_entry(entry) {
                Ok(()) => true,
                Err(err) => {
                    log::warn!("{}: {} ignored: {err}", path.display(), entry.name);
                    false
                }
            })
            .collect(),
        Err(err) => {
            log::warn!("{}: not a hosts file: {err}", path.display());
            Vec::new()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, address: &str) -> AgentEntry {
        AgentEntry {
            name: name.into(),
            address: address.into(),
            transfer: None,
        }
    }

    fn load(dir: &Path) -> Fleet {
        let configured = [entry("h1", "127.0.0.1:7601")];
        Fleet::load(dir, &configured, "t", None, Duration::from_secs(1))
    }

    // Goal: an added agent survives a restart; the configuration wins over the file; a
    // name is one address; bad names and addresses are refused before anything is saved.
    // Method: add, re-add (no-op), conflict, invalid; reload; a file entry contradicting
    // the configuration; a damaged file.
    #[test]
    fn added_agents_are_kept_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let fleet = load(dir.path());
        assert_eq!(fleet.len(), 1);
        assert!(fleet.add(entry("h2", "127.0.0.1:7602")).unwrap());
        assert!(!fleet.add(entry("h2", "127.0.0.1:7602")).unwrap());
        let conflict = fleet.add(entry("h1", "127.0.0.1:9999")).unwrap_err();
        assert!(
            matches!(conflict, FleetError::Conflict { .. }),
            "{conflict}"
        );
        for bad in [
            entry("../h3", "127.0.0.1:1"),
            entry("h3", "a b"),
            entry("h3", ""),
        ] {
            assert!(matches!(fleet.add(bad), Err(FleetError::Invalid(_))));
        }
        let names: Vec<String> = load(dir.path())
            .all()
            .iter()
            .map(|agent| agent.entry.name.clone())
            .collect();
        assert_eq!(names, ["h1", "h2"]);

        let file = dir.path().join(HOSTS_FILE);
        std::fs::write(&file, br#"[{"name":"h1","address":"10.9.9.9:1"}]"#).unwrap();
        let fleet = load(dir.path());
        assert_eq!(fleet.get("h1").unwrap().entry.address, "127.0.0.1:7601");
        std::fs::write(&file, b"{not json").unwrap();
        assert_eq!(load(dir.path()).len(), 1);
    }
}
