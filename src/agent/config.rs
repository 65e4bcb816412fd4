//! Agent configuration: the TOML file (`scripts/deploy/ferry.toml`) and the qemu-nbd-like
//! command-line form (`--export NAME=PATH`), merged into one validated [`AgentConfig`].
//!
//! Invariants: every path and address is configurable, so several agents can run side by side;
//! every error names the field (or the flag) and what is wrong with it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dirty::{DEFAULT_GRANULARITY_BYTES, DEFAULT_HALF_LIFE_MS};
use crate::name;

/// Default unix socket of the NBD server.
pub const DEFAULT_SOCKET: &str = "/run/ferry/nbd.sock";
/// Default TCP address when TCP is switched on without an address.
pub const DEFAULT_TCP: &str = "127.0.0.1:10809";
/// Default state directory (trackers, runtime exports, API token).
pub const DEFAULT_STATE_DIR: &str = crate::api::DEFAULT_STATE_DIR;
/// Default control API address.
pub const DEFAULT_API: &str = crate::api::DEFAULT_API;
/// Default hold of forwarded requests while the destination is away.
pub const DEFAULT_FORWARD_HOLD_MS: u64 = crate::nbd::forward::DEFAULT_HOLD_MS;
/// Accepted holds: at least a few reconnect attempts, at most an hour.
const FORWARD_HOLD_MS: std::ops::RangeInclusive<u64> = 100..=3_600_000;
/// Default address of the block-stream listener that receives migrated disks.
pub const DEFAULT_TRANSFER: &str = "127.0.0.1:7451";

/// Errors from reading or validating the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML for this schema.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message, which names the field and line.
        message: String,
    },
    /// A field has a value ferry cannot use.
    #[error("{field}: {problem}")]
    Invalid {
        /// Which field or flag, e.g. `export[1].granularity` or `--export`.
        field: String,
        /// What is wrong.
        problem: String,
    },
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The `[agent]` table plus the `[[export]]` list, as written in the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    agent: FileAgent,
    #[serde(default, rename = "export")]
    exports: Vec<FileExport>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileAgent {
    socket: Option<PathBuf>,
    tcp: Option<String>,
    state_dir: Option<PathBuf>,
    api: Option<String>,
    api_tls_creds: Option<PathBuf>,
    api_insecure: Option<bool>,
    metrics_auth: Option<bool>,
    metrics: Option<String>,
    engine: Option<String>,
    queue_depth: Option<u32>,
    half_life_ms: Option<u64>,
    tracker_log_extents: Option<usize>,
    forward_hold_ms: Option<u64>,
    transfer: Option<String>,
    cluster_key: Option<PathBuf>,
    image_dir: Option<PathBuf>,
    tls_creds: Option<PathBuf>,
    tcp_insecure: Option<bool>,
    socket_group: Option<String>,
    stream_insecure: Option<bool>,
    limits: Option<super::limits::FileLimits>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileExport {
    name: String,
    path: PathBuf,
    #[serde(default)]
    read_only: bool,
    granularity: Option<SizeValue>,
    #[serde(default)]
    trackers: Vec<String>,
    #[serde(default)]
    durable_trackers: Vec<String>,
    forward_hold_ms: Option<u64>,
}

/// A size written either as a number of bytes or as a string with a unit ("64K", "1M").
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// Which io engine serves the exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineChoice {
    /// io_uring when the kernel has it, else the sync engine (logged).
    Auto,
    /// io_uring or fail.
    Uring,
    /// pread/pwrite.
    Sync,
}

/// One export as the agent serves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportConfig {
    /// NBD export name.
    pub name: String,
    /// Raw image file or block device.
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// Tracking granularity of the export's trackers.
    pub granularity_bytes: u64,
    /// Trackers created at start when not restored from the state directory.
    pub trackers: Vec<String>,
    /// Durable trackers (an activity log each) created at start likewise.
    pub durable_trackers: Vec<String>,
    /// Hold of this export's forwarded requests, instead of the agent's `forward_hold_ms`.
    pub forward_hold_ms: Option<u64>,
}

/// The validated configuration of one agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Unix socket of the NBD server.
    pub socket: PathBuf,
    /// Optional TCP address of the NBD server.
    pub tcp: Option<SocketAddr>,
    /// Trackers, runtime exports and the API token live here.
    pub state_dir: PathBuf,
    /// Control API address (port 0 picks a free port).
    pub api: SocketAddr,
    /// TLS credentials of the control API (the NBD layout): every API connection is then
    /// mutual TLS (and still needs the token). Required when `api` is not loopback.
    pub api_tls_creds: Option<PathBuf>,
    /// Serve the API in plain HTTP on a routable address (else refused): the token and every
    /// command travel readable by anyone on the path.
    pub api_insecure: bool,
    /// `/metrics` on the API address needs the token (the default: it shows export names,
    /// sizes and each guest's I/O to anyone who reaches the port).
    pub metrics_auth: bool,
    /// Also serve `/metrics` alone, without the token, here (for a Prometheus scraper on a
    /// trusted network).
    pub metrics: Option<SocketAddr>,
    /// io engine.
    pub engine: EngineChoice,
    /// Requests in flight per NBD connection.
    pub queue_depth: u32,
    /// Half-life of the heat counters.
    pub half_life_ms: u64,
    /// Extents of 4 MiB (at least) each durable tracker's activity log holds open at most:
    /// the most a crash over-marks, and how far writes range before they wait for a log
    /// append.
    pub tracker_log_extents: usize,
    /// How long a request forwarded to a destination that is away waits (while the source
    /// reconnects) before it fails with EIO.
    pub forward_hold_ms: u64,
    /// Exports served from the start.
    pub exports: Vec<ExportConfig>,
    /// Block-stream listener (migrations into this host), cluster-key authenticated.
    pub transfer: SocketAddr,
    /// File holding the cluster key shared by the agents that migrate between each other.
    pub cluster_key: PathBuf,
    /// Where images of disks migrated into this host are created.
    pub image_dir: PathBuf,
    /// NBD TLS credentials (QEMU's `tls-creds-x509` layout): the TCP listener requires TLS
    /// and forwarding dials with TLS.
    pub tls_creds: Option<PathBuf>,
    /// Serve NBD over TCP in plaintext when no TLS credentials are given (else refused).
    pub tcp_insecure: bool,
    /// Group allowed to connect to the unix socket (mode 0660 then; else 0600, owner only).
    pub socket_group: Option<String>,
    /// Block-stream frames after the handshake travel unsealed (plaintext, no record
    /// authentication): for measurement only; every peer must say the same.
    pub stream_insecure: bool,
    /// `[agent.limits]`: connection caps, deadlines, byte budgets.
    pub limits: super::limits::Limits,
}

/// Command-line overrides: each `Some` wins over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--socket`.
    pub socket: Option<PathBuf>,
    /// `--tcp` (empty string: the default TCP address).
    pub tcp: Option<String>,
    /// `--state-dir`.
    pub state_dir: Option<PathBuf>,
    /// `--api`.
    pub api: Option<String>,
    /// `--api-tls-creds`.
    pub api_tls_creds: Option<PathBuf>,
    /// `--api-insecure` (only ever turns it on).
    pub api_insecure: bool,
    /// `--metrics-auth BOOL`.
    pub metrics_auth: Option<bool>,
    /// `--metrics ADDR`.
    pub metrics: Option<String>,
    /// `--engine`.
    pub engine: Option<String>,
    /// `--export NAME=PATH[,ro][,granularity=N][,tracker=T][,forward_hold=MS]`, repeated.
    pub exports: Vec<String>,
    /// `--granularity` for the `--export` exports.
    pub granularity: Option<String>,
    /// Block-stream listener address.
    pub transfer: Option<String>,
    /// Cluster key file.
    pub cluster_key: Option<PathBuf>,
    /// Directory for migrated-in images.
    pub image_dir: Option<PathBuf>,
    /// `--forward-hold` (milliseconds).
    pub forward_hold_ms: Option<u64>,
    /// `--tls-creds`.
    pub tls_creds: Option<PathBuf>,
    /// `--tcp-insecure`.
    pub tcp_insecure: bool,
    /// `--socket-group`.
    pub socket_group: Option<String>,
    /// `--stream-insecure` (only ever turns it on).
    pub stream_insecure: bool,
}

impl AgentConfig {
    /// Loads the optional TOML file and applies command-line overrides.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let parsed = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                toml::from_str::<FileConfig>(&text).map_err(|err| ConfigError::Parse {
                    path: path.to_path_buf(),
                    message: err.to_string(),
                })?
            }
            None => FileConfig::default(),
        };
        Self::build(parsed, overrides)
    }

    /// Parses a TOML text (tests and the demo).
    pub fn from_toml(text: &str, overrides: &Overrides) -> Result<Self, ConfigError> {
        let parsed = toml::from_str::<FileConfig>(text).map_err(|err| ConfigError::Parse {
            path: PathBuf::from("<inline>"),
            message: err.to_string(),
        })?;
        Self::build(parsed, overrides)
    }

    fn build(file: FileConfig, ov: &Overrides) -> Result<Self, ConfigError> {
        let agent = file.agent;
        let socket = ov
            .socket
            .clone()
            .or(agent.socket)
            .unwrap_or_else(|| DEFAULT_SOCKET.into());
        let tcp = match ov.tcp.clone().or(agent.tcp) {
            None => None,
            Some(text) if text.is_empty() => Some(parse_addr("tcp", DEFAULT_TCP)?),
            Some(text) => Some(parse_addr("tcp", &text)?),
        };
        let state_dir = ov
            .state_dir
            .clone()
            .or(agent.state_dir)
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into());
        let api = parse_addr(
            "api",
            &ov.api.clone().or(agent.api).unwrap_or(DEFAULT_API.into()),
        )?;
        let api_tls_creds = ov.api_tls_creds.clone().or(agent.api_tls_creds);
        let api_insecure = ov.api_insecure || agent.api_insecure.unwrap_or(false);
        check_api_tls(api, api_tls_creds.is_some(), api_insecure)?;
        let metrics_auth = ov.metrics_auth.or(agent.metrics_auth).unwrap_or(true);
        let metrics = match ov.metrics.clone().or(agent.metrics) {
            None => None,
            Some(text) => Some(parse_addr("metrics", &text)?),
        };
        let transfer_text = ov.transfer.clone().or(agent.transfer);
        let transfer = parse_addr(
            "transfer",
            &transfer_text.unwrap_or(DEFAULT_TRANSFER.into()),
        )?;
        let cluster_key = ov
            .cluster_key
            .clone()
            .or(agent.cluster_key)
            .unwrap_or_else(|| state_dir.join("cluster.key"));
        let image_dir = ov
            .image_dir
            .clone()
            .or(agent.image_dir)
            .unwrap_or_else(|| state_dir.join("images"));
        let engine = match ov.engine.clone().or(agent.engine).as_deref() {
            None | Some("auto") => EngineChoice::Auto,
            Some("uring") | Some("io_uring") => EngineChoice::Uring,
            Some("sync") => EngineChoice::Sync,
            Some(other) => {
                return Err(invalid(
                    "engine",
                    format!("'{other}' is not one of auto, uring, sync"),
                ))
            }
        };
        let queue_depth = agent.queue_depth.unwrap_or(128);
        if !(1..=4096).contains(&queue_depth) {
            return Err(invalid(
                "queue_depth",
                format!("{queue_depth} is not in 1..=4096"),
            ));
        }
        let half_life_ms = agent.half_life_ms.unwrap_or(DEFAULT_HALF_LIFE_MS);
        if half_life_ms == 0 {
            return Err(invalid("half_life_ms", "must be at least 1"));
        }
        let tracker_log_extents = agent
            .tracker_log_extents
            .unwrap_or(crate::dirty::activity::DEFAULT_LOG_EXTENTS);
        if !(4..=1 << 20).contains(&tracker_log_extents) {
            return Err(invalid(
                "tracker_log_extents",
                format!("{tracker_log_extents} is not in 4..=1048576"),
            ));
        }
        let forward_hold_ms = ov
            .forward_hold_ms
            .or(agent.forward_hold_ms)
            .unwrap_or(DEFAULT_FORWARD_HOLD_MS);
        check_forward_hold("forward_hold_ms", forward_hold_ms)?;
        let stream_insecure = ov.stream_insecure || agent.stream_insecure.unwrap_or(false);
        let limits = super::limits::Limits::build(agent.limits.as_ref())
            .map_err(|err| invalid(err.field, err.problem))?;
        let mut exports = Vec::new();
        for (index, export) in file.exports.into_iter().enumerate() {
            let field = format!("export[{index}]");
            let granularity_bytes = match &export.granularity {
                None => DEFAULT_GRANULARITY_BYTES,
                Some(SizeValue::Bytes(n)) => *n,
                Some(SizeValue::Text(text)) => parse_size(text)
                    .map_err(|p| invalid(format!("{field}.granularity"), p.to_string()))?,
            };
            if let Some(hold_ms) = export.forward_hold_ms {
                check_forward_hold(&format!("{field}.forward_hold_ms"), hold_ms)?;
            }
            exports.push(ExportConfig {
                name: export.name,
                path: export.path,
                read_only: export.read_only,
                granularity_bytes,
                trackers: export.trackers,
                durable_trackers: export.durable_trackers,
                forward_hold_ms: export.forward_hold_ms,
            });
        }
        let cli_granularity = match &ov.granularity {
            Some(text) => parse_size(text).map_err(|p| invalid("--granularity", p.to_string()))?,
            None => DEFAULT_GRANULARITY_BYTES,
        };
        for spec in &ov.exports {
            exports.push(parse_export_flag(spec, cli_granularity)?);
        }
        let tls_creds = ov.tls_creds.clone().or(agent.tls_creds);
        let tcp_insecure = ov.tcp_insecure || agent.tcp_insecure.unwrap_or(false);
        if let (Some(addr), None, false) = (tcp, &tls_creds, tcp_insecure) {
            return Err(invalid(
                "tcp",
                format!(
                    "NBD over TCP ({addr}) requires TLS: give --tls-creds DIR (tls_creds; \
                     `ferry tls init DIR` creates one), or --tcp-insecure (tcp_insecure = true) \
                     to serve every export to anyone who reaches the port"
                ),
            ));
        }
        let config = AgentConfig {
            socket,
            tcp,
            tls_creds,
            tcp_insecure,
            socket_group: ov.socket_group.clone().or(agent.socket_group),
            state_dir,
            api,
            api_tls_creds,
            api_insecure,
            metrics_auth,
            metrics,
            engine,
            queue_depth,
            half_life_ms,
            tracker_log_extents,
            forward_hold_ms,
            exports,
            transfer,
            cluster_key,
            image_dir,
            stream_insecure,
            limits,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::BTreeSet::new();
        for (index, export) in self.exports.iter().enumerate() {
            let field = format!("export[{index}]");
            name::validate(&export.name)
                .map_err(|err| invalid(format!("{field}.name"), err.to_string()))?;
            if !seen.insert(export.name.as_str()) {
                return Err(invalid(
                    format!("{field}.name"),
                    format!("export '{}' is defined twice", export.name),
                ));
            }
            crate::dirty::validate_granularity(export.granularity_bytes)
                .map_err(|p| invalid(format!("{field}.granularity"), p.to_string()))?;
            for tracker in export.trackers.iter().chain(&export.durable_trackers) {
                name::validate(tracker)
                    .map_err(|err| invalid(format!("{field}.trackers"), err.to_string()))?;
            }
        }
        Ok(())
    }
}

use crate::units::parse_size;

/// Refuses a hold of forwarded requests outside [`FORWARD_HOLD_MS`], naming `field`.
/// The control API may serve plain HTTP on loopback only: elsewhere the token and every
/// command would cross the network readable, so TLS credentials (or the explicit insecure
/// override) are required, as for NBD over TCP.
fn check_api_tls(api: SocketAddr, tls: bool, insecure: bool) -> Result<(), ConfigError> {
    if tls || insecure || crate::api::tls::is_local(api) {
        return Ok(());
    }
    Err(invalid(
        "api",
        format!(
            "the control API on {api} (not loopback) requires TLS: give --api-tls-creds DIR \
             (api_tls_creds; `ferry tls init DIR --host NAME` creates one), or --api-insecure \
             (api_insecure = true) to send the API token and every command in plaintext"
        ),
    ))
}

fn check_forward_hold(field: &str, hold_ms: u64) -> Result<(), ConfigError> {
    if FORWARD_HOLD_MS.contains(&hold_ms) {
        return Ok(());
    }
    Err(invalid(
        field,
        format!(
            "{hold_ms} is not in {}..={} (a shorter hold fails requests during an ordinary \
             reconnect)",
            FORWARD_HOLD_MS.start(),
            FORWARD_HOLD_MS.end()
        ),
    ))
}

fn parse_addr(field: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.parse().map_err(|_| {
        invalid(
            field,
            format!("'{text}' is not an address like 127.0.0.1:7450"),
        )
    })
}

/// `NAME=PATH[,ro][,granularity=SIZE][,tracker=T]...[,durable_tracker=T]...[,forward_hold=MS]`
fn parse_export_flag(spec: &str, default_granularity: u64) -> Result<ExportConfig, ConfigError> {
    let field = "--export";
    let (name, rest) = spec
        .split_once('=')
        .ok_or_else(|| invalid(field, format!("'{spec}' is not NAME=PATH")))?;
    let mut parts = rest.split(',');
    let path = parts.next().filter(|p| !p.is_empty());
    let path = path.ok_or_else(|| invalid(field, format!("'{spec}' has no PATH")))?;
    let mut export = ExportConfig {
        name: name.to_string(),
        path: PathBuf::from(path),
        read_only: false,
        granularity_bytes: default_granularity,
        trackers: Vec::new(),
        durable_trackers: Vec::new(),
        forward_hold_ms: None,
    };
    for option in parts {
        match option.split_once('=') {
            None if option == "ro" || option == "read-only" => export.read_only = true,
            Some(("granularity", size)) => {
                export.granularity_bytes =
                    parse_size(size).map_err(|p| invalid(field, p.to_string()))?
            }
            Some(("tracker", tracker)) => export.trackers.push(tracker.to_string()),
            Some(("durable_tracker", tracker)) => export.durable_trackers.push(tracker.to_string()),
            Some(("forward_hold", ms)) => {
                let hold_ms = ms.parse().map_err(|_| {
                    invalid(field, format!("forward_hold={ms} is not a number of ms"))
                })?;
                check_forward_hold(field, hold_ms)?;
                export.forward_hold_ms = Some(hold_ms);
            }
            _ => {
                return Err(invalid(
                    field,
                    format!(
                        "unknown option '{option}' (ro, granularity=SIZE, tracker=NAME, \
                         durable_tracker=NAME, forward_hold=MS)"
                    ),
                ))
            }
        }
    }
    Ok(export)
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a full TOML file maps onto the config; method: parse the deploy example's shape.
    #[test]
    fn toml_file_parses() {
        let text = r#"
            [agent]
            socket = "/tmp/x.sock"
            tcp = "127.0.0.1:10900"
            tls_creds = "/etc/ferry/tls"
            state_dir = "/tmp/state"
            api = "127.0.0.1:7451"
            [[export]]
            name = "vm1"
            path = "/images/vm1.raw"
            granularity = "4K"
            trackers = ["backup"]
            durable_trackers = ["seed"]
            [[export]]
            name = "vm2"
            path = "/dev/vdb"
            read_only = true
        "#;
        let config = AgentConfig::from_toml(text, &Overrides::default()).unwrap();
        assert_eq!(config.socket, PathBuf::from("/tmp/x.sock"));
        assert_eq!(config.tcp.unwrap().port(), 10900);
        assert_eq!(config.tls_creds, Some(PathBuf::from("/etc/ferry/tls")));
        assert_eq!(config.exports.len(), 2);
        assert_eq!(config.exports[0].granularity_bytes, 4096);
        assert_eq!(config.exports[0].trackers, vec!["backup".to_string()]);
        assert_eq!(config.exports[0].durable_trackers, ["seed"]);
        assert!(config.exports[1].read_only);
        assert_eq!(
            config.exports[1].granularity_bytes,
            DEFAULT_GRANULARITY_BYTES
        );
    }

    // Goal: errors name the field; method: one bad value per field.
    #[test]
    fn errors_name_the_field() {
        let bad_gran = "[[export]]\nname='a'\npath='/x'\ngranularity=3000\n";
        let err = AgentConfig::from_toml(bad_gran, &Overrides::default()).unwrap_err();
        assert!(
            err.to_string().starts_with("export[0].granularity:"),
            "{err}"
        );
        let bad_name = "[[export]]\nname='a/b'\npath='/x'\n";
        let err = AgentConfig::from_toml(bad_name, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("export[0].name"), "{err}");
        let unknown = "[agent]\nsockets='/x'\n";
        let err = AgentConfig::from_toml(unknown, &Overrides::default()).unwrap_err();
        assert!(err.to_string().contains("sockets"), "{err}");
        let ov = Overrides {
            api: Some("nowhere".into()),
            ..Overrides::default()
        };
        let err = AgentConfig::from_toml("", &ov).unwrap_err();
        assert!(err.to_string().starts_with("api:"), "{err}");
    }

    // Goal: the API leaves loopback only with TLS credentials or the explicit insecure
    // override, and loopback stays plain. Method: routable addresses alone (refused, the
    // message naming both options), with api_insecure in the file, with --api-tls-creds;
    // loopback addresses alone.
    #[test]
    fn api_off_loopback_requires_tls_or_insecure() {
        let api = |addr: &str| Overrides {
            api: Some(addr.into()),
            ..Overrides::default()
        };
        for routable in ["0.0.0.0:7450", "10.1.2.3:7450", "[::]:7450"] {
            let err = AgentConfig::from_toml("", &api(routable))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with("api:"), "{err}");
            assert!(err.contains("not loopback"), "{err}");
            assert!(
                err.contains("--api-tls-creds") && err.contains("--api-insecure"),
                "{err}"
            );
        }
        let file = "[agent]\napi_insecure = true\n";
        let config = AgentConfig::from_toml(file, &api("0.0.0.0:7450")).unwrap();
        assert!(config.api_insecure && config.api_tls_creds.is_none());
        let with_tls = Overrides {
            api_tls_creds: Some("/etc/ferry/api-tls".into()),
            ..api("10.1.2.3:7450")
        };
        let config = AgentConfig::from_toml("", &with_tls).unwrap();
        assert_eq!(
            config.api_tls_creds,
            Some(PathBuf::from("/etc/ferry/api-tls"))
        );
        let file = "[agent]\napi = \"0.0.0.0:7450\"\napi_tls_creds = \"/etc/ferry/tls\"\n";
        let config = AgentConfig::from_toml(file, &Overrides::default()).unwrap();
        assert!(!config.api_insecure && config.api_tls_creds.is_some());
        for local in ["127.0.0.1:7450", "127.0.0.2:7450", "[::1]:7450"] {
            let config = AgentConfig::from_toml("", &api(local)).unwrap();
            assert!(config.api_tls_creds.is_none() && !config.api_insecure);
        }
    }

    // Goal: NBD over TCP without TLS credentials is refused unless asked for in plaintext.
    // Method: --tcp alone, then with tcp_insecure in the file, then with --tls-creds.
    #[test]
    fn tcp_requires_tls_or_insecure() {
        let tcp = Overrides {
            tcp: Some(String::new()),
            ..Overrides::default()
        };
        let err = AgentConfig::from_toml("", &tcp).unwrap_err().to_string();
        assert!(
            err.starts_with("tcp:") && err.contains("--tls-creds"),
            "{err}"
        );
        let config = AgentConfig::from_toml("[agent]\ntcp_insecure = true\n", &tcp).unwrap();
        assert!(config.tcp_insecure && config.tls_creds.is_none());
        let with_tls = Overrides {
            tls_creds: Some("/etc/ferry/tls".into()),
            ..tcp
        };
        let config = AgentConfig::from_toml("", &with_tls).unwrap();
        assert!(!config.tcp_insecure && config.tls_creds.is_some());
    }

    // Goal: the qemu-nbd-like flags build exports; method: parse several --export forms.
    #[test]
    fn export_flags() {
        let ov = Overrides {
            exports: vec![
                "d=/tmp/d.img".into(),
                "r=/tmp/r.img,ro,granularity=1M,tracker=t1".into(),
            ],
            tcp: Some(String::new()),
            tcp_insecure: true,
            ..Overrides::default()
        };
        let config = AgentConfig::from_toml("", &ov).unwrap();
        assert_eq!(config.tcp, Some(DEFAULT_TCP.parse().unwrap()));
        assert_eq!(config.exports[0].name, "d");
        assert!(config.exports[1].read_only);
        assert_eq!(config.exports[1].granularity_bytes, 1 << 20);
        assert_eq!(config.exports[1].trackers, vec!["t1".to_string()]);
        let dup = Overrides {
            exports: vec!["d=/a".into(), "d=/b".into()],
            ..Overrides::default()
        };
        assert!(AgentConfig::from_toml("", &dup)
            .unwrap_err()
            .to_string()
            .contains("twice"));
        let bad = Overrides {
            exports: vec!["d".into()],
            ..Overrides::default()
        };
        assert!(AgentConfig::from_toml("", &bad)
            .unwrap_err()
            .to_string()
            .contains("--export"));
    }

    // Goal: the forwarding hold comes from the file, the flag wins, and silly values are
    // refused naming the field. Method: default, file, flag over file, too short.
    #[test]
    fn forward_hold() {
        let none = Overrides::default();
        let config = AgentConfig::from_toml("", &none).unwrap();
        assert_eq!(config.forward_hold_ms, DEFAULT_FORWARD_HOLD_MS);
        let file = "[agent]\nforward_hold_ms = 5000\n";
        assert_eq!(
            AgentConfig::from_toml(file, &none).unwrap().forward_hold_ms,
            5000
        );
        let flag = Overrides {
            forward_hold_ms: Some(3000),
            ..Overrides::default()
        };
        assert_eq!(
            AgentConfig::from_toml(file, &flag).unwrap().forward_hold_ms,
            3000
        );
        let short = Overrides {
            forward_hold_ms: Some(10),
            ..Overrides::default()
        };
        let err = AgentConfig::from_toml("", &short).unwrap_err();
        assert!(err.to_string().starts_with("forward_hold_ms:"), "{err}");
    }

    // Goal: an export's own forwarding hold comes from its TOML table or its --export
    // option, other exports keep none (the agent's applies), and a value out of range or
    // not a number is refused naming the export's field or the flag. Method: parse each form.
    #[test]
    fn export_forward_hold() {
        let file = "[agent]\nforward_hold_ms = 5000\n\
                    [[export]]\nname='a'\npath='/a'\nforward_hold_ms = 120000\n\
                    [[export]]\nname='b'\npath='/b'\n";
        let flag = Overrides {
            exports: vec!["c=/c,tracker=t,durable_tracker=d,forward_hold=900".into()],
            ..Overrides::default()
        };
        let config = AgentConfig::from_toml(file, &flag).unwrap();
        assert_eq!(config.forward_hold_ms, 5000);
        let holds: Vec<Option<u64>> = config.exports.iter().map(|e| e.forward_hold_ms).collect();
        assert_eq!(holds, [Some(120_000), None, Some(900)]);
        assert_eq!(config.exports[2].trackers, ["t"]);
        assert_eq!(config.exports[2].durable_trackers, ["d"]);

        let short = "[[export]]\nname='a'\npath='/a'\nforward_hold_ms = 10\n";
        let err = AgentConfig::from_toml(short, &Overrides::default()).unwrap_err();
        assert!(
            err.to_string().starts_with("export[0].forward_hold_ms:"),
            "{err}"
        );
        for spec in [
            "d=/d,forward_hold=99",
            "d=/d,forward_hold=1m",
            "d=/d,forward_hold=",
        ] {
            let bad = Overrides {
                exports: vec![spec.into()],
                ..Overrides::default()
            };
            let err = AgentConfig::from_toml("", &bad).unwrap_err();
            assert!(err.to_string().starts_with("--export:"), "{spec}: {err}");
        }
    }

    // Goal: the block stream is sealed unless the file or the flag says insecure.
    // Method: parse without, with the key, and with the override.
    #[test]
    fn stream_insecure_from_file_or_flag() {
        let none = AgentConfig::from_toml("", &Overrides::default()).unwrap();
        assert!(!none.stream_insecure);
        let file = "[agent]\nstream_insecure = true\n";
        assert!(
            AgentConfig::from_toml(file, &Overrides::default())
                .unwrap()
                .stream_insecure
        );
        let flag = Overrides {
            stream_insecure: true,
            ..Overrides::default()
        };
        assert!(AgentConfig::from_toml("", &flag).unwrap().stream_insecure);
    }

    // Goal: `[agent.limits]` is read inside `[agent]`, defaults apply without it, and a bad
    // value is named with its table. Method: TOML texts.
    #[test]
    fn limits_table_in_the_agent_table() {
        let none = AgentConfig::from_toml("", &Overrides::default()).unwrap();
        assert_eq!(none.limits, crate::agent::limits::Limits::default());
        let text = "[agent.limits]\nnbd_handshaking_max = 8\nagent_bytes = \"2G\"\n";
        let config = AgentConfig::from_toml(text, &Overrides::default()).unwrap();
        assert_eq!(config.limits.nbd.handshaking_max, 8);
        assert_eq!(config.limits.agent_bytes, 2 << 30);
        let bad = "[agent.limits]\nstream_serving_max = 0\n";
        let err = AgentConfig::from_toml(bad, &Overrides::default()).unwrap_err();
        assert!(
            err.to_string().starts_with("limits.stream_serving_max:"),
            "{err}"
        );
    }

    // Goal: /metrics needs the token unless the file or the flag (which wins) says otherwise;
    // a separate metrics address parses or is refused by name. Method: parse combinations.
    #[test]
    fn metrics_auth_and_address() {
        let none = AgentConfig::from_toml("", &Overrides::default()).unwrap();
        assert!(none.metrics_auth);
        assert_eq!(none.metrics, None);
        let file = "[agent]\nmetrics_auth = false\nmetrics = \"10.0.0.1:9450\"\n";
        let open = AgentConfig::from_toml(file, &Overrides::default()).unwrap();
        assert!(!open.metrics_auth);
        assert_eq!(open.metrics, Some("10.0.0.1:9450".parse().unwrap()));
        let flag = Overrides {
            metrics_auth: Some(true),
            ..Overrides::default()
        };
        assert!(AgentConfig::from_toml(file, &flag).unwrap().metrics_auth);
        let bad = Overrides {
            metrics: Some("scraper".into()),
            ..Overrides::default()
        };
        let err = AgentConfig::from_toml("", &bad).unwrap_err();
        assert!(err.to_string().starts_with("metrics:"), "{err}");
    }
}
