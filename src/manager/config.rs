//! The manager's configuration: a TOML file with command-line flags over it.
//!
//! ```toml
//! id = "m1"                      # this manager
//! pair = "fleet"                 # the pair's name: its lease file on the witness
//! listen = "127.0.0.1:7700"      # this manager's API
//! state_dir = "/var/lib/ferry-manager"
//! token_file = "/etc/ferry/api.token"   # the fleet's API token (agents and managers)
//! tls_creds = "/etc/ferry/api-tls"      # TLS both ways (required off loopback)
//!
//! [peer]
//! id = "m2"
//! address = "127.0.0.1:7701"
//!
//! [lease]                        # all optional: these are the defaults
//! lease_ms = 4000
//! renew_interval_ms = 1000
//! drift_ppm = 1000
//! margin_ms = 50
//! write_timeout_ms = 500
//!
//! [[agents]]
//! name = "h1"
//! address = "10.0.0.1:7600"
//! transfer = "10.0.0.1:7451"     # optional: batches may then name h1 as a destination
//! ```
//!
//! `--agent NAME=ADDRESS[,TRANSFER]` adds one from the command line.
//!
//! Invariants: a listen address off loopback needs `tls_creds` (the manager then speaks TLS
//! to agents and its peer too); ids, the pair and host names follow the name rule; the two ids differ; the
//! timings leave two renewals inside every deadline (`renew_interval_ms ≤ lease_ms / 3`) and
//! a write timeout inside one renewal interval; at least one agent is managed; errors name
//! the field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::lease::holder::HolderBounds;
use crate::lease::ManagerId;

/// Why a configuration is refused; the message names the field.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML of this shape.
    #[error("{}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A value is missing or out of range.
    #[error("{field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// One managed agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentEntry {
    /// The host's name (witness choices and status name it).
    pub name: String,
    /// Its control API address.
    pub address: String,
    /// Its block-stream address, so batches may name it as a destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transfer: Option<String>,
}

/// The peer manager.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerEntry {
    /// Its id.
    pub id: String,
    /// Its API address.
    pub address: String,
}

/// Lease timings (`docs/manager-lease.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LeaseTimings {
    /// Lease duration.
    pub lease_ms: u32,
    /// Renewal interval.
    pub renew_interval_ms: u32,
    /// Clock-rate drift bound, parts per million.
    pub drift_ppm: u32,
    /// Margin subtracted from every deadline.
    pub margin_ms: u32,
    /// The witness's record write timeout.
    pub write_timeout_ms: u32,
}

impl Default for LeaseTimings {
    fn default() -> Self {
        Self {
            lease_ms: 4_000,
            renew_interval_ms: 1_000,
            drift_ppm: 1_000,
            margin_ms: 50,
            write_timeout_ms: 500,
        }
    }
}

impl LeaseTimings {
    /// The holder's bounds.
    pub fn bounds(&self) -> HolderBounds {
        HolderBounds {
            lease_ms: self.lease_ms,
            drift_ppm: self.drift_ppm,
            margin_ms: self.margin_ms,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |field, message: String| Err(ConfigError::Invalid { field, message });
        if !(300..=600_000).contains(&self.lease_ms) {
            return invalid("lease.lease_ms", "must be 300..=600000".into());
        }
        if self.renew_interval_ms == 0 || self.renew_interval_ms > self.lease_ms / 3 {
            return invalid(
                "lease.renew_interval_ms",
                format!("must be 1..={} (a third of the lease)", self.lease_ms / 3),
            );
        }
        if self.drift_ppm > 100_000 {
            return invalid("lease.drift_ppm", "must be at most 100000 (10%)".into());
        }
        if self.bounds().safe_span_ns() <= u64::from(self.renew_interval_ms) * 2_000_000 {
            return invalid(
                "lease.margin_ms",
                "drift and margin leave less than two renewals inside the lease".into(),
            );
        }
        if self.write_timeout_ms == 0 || self.write_timeout_ms >= self.renew_interval_ms {
            return invalid(
                "lease.write_timeout_ms",
                "must be 1..renew_interval_ms (a slow disk costs a renewal, not the lease)".into(),
            );
        }
        Ok(())
    }
}

/// The file's shape.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    id: Option<String>,
    pair: Option<String>,
    listen: Option<String>,
    state_dir: Option<PathBuf>,
    token_file: Option<PathBuf>,
    tls_creds: Option<PathBuf>,
    peer: Option<PeerEntry>,
    #[serde(default)]
    lease: LeaseTimings,
    #[serde(default)]
    agents: Vec<AgentEntry>,
}

/// Flags that override the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--id`.
    pub id: Option<String>,
    /// `--pair`.
    pub pair: Option<String>,
    /// `--listen`.
    pub listen: Option<String>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--token-file`.
    pub token_file: Option<PathBuf>,
    /// `--api-tls-creds`.
    pub tls_creds: Option<PathBuf>,
    /// `--peer ID=ADDRESS`.
    pub peer: Option<String>,
    /// `--agent NAME=ADDRESS`, repeated (added to the file's).
    pub agents: Vec<String>,
}

/// A checked configuration.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// This manager.
    pub id: ManagerId,
    /// The pair's name.
    pub pair: String,
    /// This manager's API address.
    pub listen: String,
    /// Where its durable role state lives.
    pub state_dir: PathBuf,
    /// The fleet's API token file.
    pub token_file: PathBuf,
    /// TLS credentials (ferry's layout) for the listener and every client, if any.
    pub tls_creds: Option<PathBuf>,
    /// The peer.
    pub peer_id: ManagerId,
    /// The peer's API address.
    pub peer_address: String,
    /// Lease timings.
    pub lease: LeaseTimings,
    /// Managed agents.
    pub agents: Vec<AgentEntry>,
}

/// Default pair name.
pub const DEFAULT_PAIR: &str = "fleet";

impl ManagerConfig {
    /// Reads `path` (if given) and applies `overrides`.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let file = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str(&text).map_err(|err| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: err.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        Self::checked(file, overrides)
    }

    fn checked(file: FileConfig, ov: &Overrides) -> Result<Self, ConfigError> {
        let missing = |field| ConfigError::Invalid {
            field,
            message: "missing".into(),
        };
        let id = ov.id.clone().or(file.id).ok_or_else(|| missing("id"))?;
        let id = manager_id("id", &id)?;
        let pair = ov.pair.clone().or(file.pair).unwrap_or(DEFAULT_PAIR.into());
        crate::name::validate(&pair).map_err(|err| invalid("pair", err.to_string()))?;
        let listen = ov
            .listen
            .clone()
            .or(file.listen)
            .ok_or_else(|| missing("listen"))?;
        let tls_creds = ov.tls_creds.clone().or(file.tls_creds);
        check_listen(&listen, tls_creds.is_some())?;
        let state_dir = ov
            .state_dir
            .clone()
            .or(file.state_dir)
            .ok_or_else(|| missing("state_dir"))?;
        let token_file = ov
            .token_file
            .clone()
            .or(file.token_file)
            .unwrap_or_else(|| state_dir.join("api.token"));
        let peer = match &ov.peer {
            Some(text) => {
                parse_pair("peer", text).map(|(id, address)| PeerEntry { id, address })?
            }
            None => file.peer.ok_or_else(|| missing("peer"))?,
        };
        let peer_id = manager_id("peer.id", &peer.id)?;
        if peer_id == id {
            return Err(invalid(
                "peer.id",
                format!("{peer_id} is this manager's own id"),
            ));
        }
        let mut agents = file.agents;
        for text in &ov.agents {
            let (name, addresses) = parse_pair("agent", text)?;
            let (address, transfer) = match addresses.split_once(',') {
                Some((address, transfer)) => (address.to_string(), Some(transfer.to_string())),
                None => (addresses, None),
            };
            agents.push(AgentEntry {
                name,
                address,
                transfer,
            });
        }
        check_agents(&agents)?;
        file.lease.validate()?;
        Ok(Self {
            id,
            pair,
            listen,
            state_dir,
            token_file,
            tls_creds,
            peer_id,
            peer_address: peer.address,
            lease: file.lease,
            agents,
        })
    }
}

/// `host:port`, and off loopback only with TLS (the token and every command would cross the
/// network readable otherwise).
fn check_listen(listen: &str, tls: bool) -> Result<(), ConfigError> {
    let addr: std::net::SocketAddr = listen
        .parse()
        .map_err(|_| invalid("listen", format!("{listen:?} is not host:port")))?;
    if !tls && !crate::api::tls::is_local(addr) {
        return Err(invalid(
            "listen",
            format!(
                "the manager API on {addr} (not loopback) requires TLS: give tls_creds \
                 (--api-tls-creds DIR; `ferry tls init DIR --host NAME` creates one)"
            ),
        ));
    }
    Ok(())
}

fn invalid(field: &'static str, message: String) -> ConfigError {
    ConfigError::Invalid { field, message }
}

fn manager_id(field: &'static str, text: &str) -> Result<ManagerId, ConfigError> {
    ManagerId::new(text).map_err(|err| invalid(field, err.to_string()))
}

/// `NAME=ADDRESS`.
fn parse_pair(field: &'static str, text: &str) -> Result<(String, String), ConfigError> {
    let (name, address) = text
        .split_once('=')
        .ok_or_else(|| invalid(field, format!("{text:?} is not NAME=ADDRESS")))?;
    check_address(field, address)?;
    Ok((name.to_string(), address.to_string()))
}

/// An address is a URL or `host:port`, and never holds a line break or space (it becomes a
/// `Location` header).
fn check_address(field: &'static str, address: &str) -> Result<(), ConfigError> {
    if address.is_empty() || address.contains(|c: char| c.is_whitespace() || c.is_control()) {
        return Err(invalid(field, format!("{address:?} is not an address")));
    }
    Ok(())
}

fn check_agents(agents: &[AgentEntry]) -> Result<(), ConfigError> {
    if agents.is_empty() {
        return Err(invalid(
            "agents",
            "at least one managed agent is needed".into(),
        ));
    }
    for (index, agent) in agents.iter().enumerate() {
        crate::name::validate(&agent.name)
            .map_err(|err| invalid("agents.name", err.to_string()))?;
        check_address("agents.address", &agent.address)?;
        if agents[..index].iter().any(|other| other.name == agent.name) {
            return Err(invalid(
                "agents.name",
                format!("{} is listed twice", agent.name),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
        id = "m1"
        listen = "127.0.0.1:7700"
        state_dir = "/var/lib/ferry-manager"
        [peer]
        id = "m2"
        address = "127.0.0.1:7701"
        [[agents]]
        name = "h1"
        address = "10.0.0.1:7600"
    "#;

    fn parse(text: &str, overrides: &Overrides) -> Result<ManagerConfig, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|err| ConfigError::Parse {
            path: "test".into(),
            message: err.to_string(),
        })?;
        ManagerConfig::checked(file, overrides)
    }

    #[test]
    fn a_file_with_defaults() {
        // Goal: the documented shape parses, defaults fill in. Method: the minimal file.
        let config = parse(FILE, &Overrides::default()).expect("valid");
        assert_eq!(config.id.as_str(), "m1");
        assert_eq!(config.pair, DEFAULT_PAIR);
        assert_eq!(config.lease, LeaseTimings::default());
        assert_eq!(
            config.token_file,
            PathBuf::from("/var/lib/ferry-manager/api.token")
        );
        assert_eq!(config.agents.len(), 1);
    }

    #[test]
    fn flags_override_and_add() {
        // Goal: flags win and agents add up. Method: --id, --peer, two --agent flags.
        let overrides = Overrides {
            id: Some("m3".into()),
            peer: Some("m4=127.0.0.1:7800".into()),
            agents: vec!["h2=10.0.0.2:7600".into(), "h3=10.0.0.3:7600".into()],
            ..Overrides::default()
        };
        let config = parse(FILE, &overrides).expect("valid");
        assert_eq!((config.id.as_str(), config.peer_id.as_str()), ("m3", "m4"));
        assert_eq!(config.peer_address, "127.0.0.1:7800");
        assert_eq!(config.agents.len(), 3);
    }

    #[test]
    fn errors_name_the_field() {
        // Goal: each mistake is named. Method: one broken field at a time.
        let cases = [
            (FILE.replace("\"m2\"", "\"m1\""), "peer.id"),
            (
                FILE.replace("name = \"h1\"", "name = \"../h1\""),
                "agents.name",
            ),
            (
                format!("{FILE}\n[lease]\nlease_ms = 4000\nrenew_interval_ms = 2000\n"),
                "lease.renew_interval_ms",
            ),
            (
                format!("{FILE}\n[lease]\nwrite_timeout_ms = 1000\n"),
                "lease.write_timeout_ms",
            ),
            (
                format!("{FILE}\n[lease]\nmargin_ms = 2000\n"),
                "lease.margin_ms",
            ),
            (FILE.replace("id = \"m1\"", ""), "id"),
            (FILE.replace("127.0.0.1:7700", "0.0.0.0:7700"), "listen"),
        ];
        for (text, field) in cases {
            let err = parse(&text, &Overrides::default()).expect_err(field);
            assert!(err.to_string().starts_with(field), "{field}: {err}");
        }
        let err = parse(
            FILE,
            &Overrides {
                peer: Some("m2".into()),
                ..Overrides::default()
            },
        )
        .expect_err("no address");
        assert!(err.to_string().starts_with("peer"), "{err}");
    }
}
