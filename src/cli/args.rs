//! The command line (clap): `ferry agent` runs the daemon; the other subcommands talk to a
//! running agent through its control API; `ferry demo` shows the whole thing on a temporary
//! image.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// ferry: serves VM disks over NBD, tracks every write, moves live disks between hosts.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Where a client subcommand finds the agent.
#[derive(Debug, Args, Clone)]
pub struct ApiTarget {
    /// Control API address of the agent.
    #[arg(long, env = "FERRY_API", default_value = crate::api::DEFAULT_API, global = true)]
    pub api: String,
    /// File holding the API token (default: <state-dir>/api.token).
    #[arg(long, env = "FERRY_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// State directory of the agent (where its token is).
    #[arg(long, env = "FERRY_STATE_DIR", default_value = crate::api::DEFAULT_STATE_DIR, global = true)]
    pub state_dir: PathBuf,
    /// TLS credentials to call the agent with (ca-cert.pem, client-cert.pem, client-key.pem,
    /// the layout `ferry tls init` makes): calls go over TLS (https).
    #[arg(long, env = "FERRY_API_TLS_CREDS", value_name = "DIR", global = true)]
    pub api_tls_creds: Option<PathBuf>,
    /// The name the agent's certificate must carry [default: the host part of --api].
    #[arg(long, env = "FERRY_API_TLS_NAME", value_name = "NAME", global = true)]
    pub api_tls_name: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent (root daemon).
    Agent(AgentArgs),
    /// The manager pair: `ferry manager` runs one (config file and flags); `ferry manager
    /// status` and `ferry manager takeover` ask a running one (`--api` is its address).
    Manager(ManagerArgs),
    /// Add a host to the managers, drain one (the managers move the witness lease away from
    /// it) or return it; asks a manager (`--api`), which tells its peer.
    Host {
        /// Action.
        #[command(subcommand)]
        action: HostAction,
        /// Manager to talk to.
        #[command(flatten)]
        target: ApiTarget,
    },
    /// Manage exports of a running agent.
    Export {
        /// Action.
        #[command(subcommand)]
        action: ExportAction,
        /// Agent to talk to.
        #[command(flatten)]
        target: ApiTarget,
    },
    /// Manage write trackers of an export.
    Tracker {
        /// Action.
        #[command(subcommand)]
        action: TrackerAction,
        /// Agent to talk to.
        #[command(flatten)]
        target: ApiTarget,
    },
    /// Show the write-heat map of an export.
    Heat {
        /// Export name.
        export: String,
        /// Tracker (default: the export's first).
        #[arg(long)]
        tracker: Option<String>,
        /// Map width in characters.
        #[arg(long, default_value_t = 64)]
        width: usize,
        /// Rows of the map.
        #[arg(long, default_value_t = 16)]
        rows: usize,
        /// Agent to talk to.
        #[command(flatten)]
        target: ApiTarget,
    },
    /// Seed live disks over portable media: export, import, catch up over the network.
    Seed {
        /// Action.
        #[command(subcommand)]
        action: SeedAction,
        /// Agent to talk to.
        #[command(flatten)]
        target: ApiTarget,
    },
    /// Move a live export to another agent (copy passes, then a bounded switchover).
    Migrate {
        /// Exports to move (several, or a --plan, make a batch).
        exports: Vec<String>,
        /// Destination agent's block-stream address, HOST[:PORT] (port 7451 by default).
        #[arg(long, required_unless_present = "plan")]
        to: Option<String>,
        /// Run as a batch of this name (journaled on both sides; `ferry status NAME`).
        #[arg(long)]
        batch: Option<String>,
        /// File of `EXPORT HOST[:PORT]` lines: each export to its own destination.
        #[arg(long)]
        plan: Option<PathBuf>,
        /// Jobs of a batch running at once.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// Copy policy: heat (hot blocks last) or naive (offset order, then dirty passes).
        #[arg(long, default_value = "heat")]
        policy: String,
        /// Longest write pause the switchover may cause, in milliseconds.
        #[arg(long, default_value_t = 100)]
        max_pause: u64,
        /// Switch over after this many milliseconds even if the pause bound is not met.
        #[arg(long)]
        force_after: Option<u64>,
        /// Bandwidth cap of the block stream (e.g. 200M = 200 MiB/s).
        #[arg(long)]
        bandwidth: Option<String>,
        /// Return once the job started instead of following it.
        #[arg(long)]
        no_wait: bool,
        /// Compare BLAKE3 digests of both images at the switchover point (writes stay held
        /// while both are hashed).
        #[arg(long)]
        verify: bool,
        /// The same as --max-impact 4ms (kept for scripts written before it).
        #[arg(long = "yield")]
        yield_to_guest: bool,
        /// What the copy may cost the guest. `auto` (the default): twice its own p99 before
        /// the job where slowing the copy spares it, else the least harm in all (added p99
        /// per byte copied). A strict bound: `2x` its own p99, or `5ms`, held however slow
        /// the copy must go; when it would keep the copy behind the guest's writes, the job
        /// mirrors writes instead (and says so). `off`: flat out. The copy's reads and pace
        /// are steered to it.
        #[arg(long)]
        max_impact: Option<String>,
        /// The jobs' weight among the agent's copying jobs (1-100, default 1): while jobs
        /// copy at once, each gets its weighted share of their total rate.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
        weight: Option<u32>,
        /// Mirror guest writes to the destination from the start (each write is applied at
        /// both sides before the guest sees it complete): one copy pass, always converges.
        #[arg(long)]
        mirror: bool,
        /// Block size the job tracks and re-sends at (e.g. 64K); default 4K, or the
        /// export's granularity when finer.
        #[arg(long)]
        granularity: Option<String>,
        /// Agent to talk to.
        #[command(flatten)]
        target: ApiTarget,
    },
    /// Did each disk fully migrate? The agent reads its journal and asks each destination
    /// agent; prints migrated / not-migrated / resumable / needs-attention per disk, with
    /// the reason. With the agent down, `--offline` reads its journal file instead.
    Status {
        /// Only the jobs of this batch.
        batch: Option<String>,
        /// Read the journal in the state directory instead of asking the agent (for when the
        /// agent is down).
        #[arg(long)]
        offline: bool,
        /// With --offline: cluster key used to ask destinations (default:
        /// <state-dir>/cluster.key).
        #[arg(long, requires = "offline")]
        cluster_key: Option<PathBuf>,
        /// Agent to ask (or, with --offline, whose state directory is read).
        #[command(flatten)]
        target: ApiTarget,
    },
    /// Continue the interrupted migrations of a batch (from what the destinations already
    /// hold, when the source kept its tracker), each with the settings it was started with;
    /// the options given here override them.
    Resume {
        /// The batch.
        batch: String,
        /// Jobs running at once.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// Settings that override the journaled ones.
        #[command(flatten)]
        overrides: ResumeOverrides,
        /// Agent to talk to.
        #[command(flatten)]
        target: ApiTarget,
    },
    /// Roll back the uncommitted migrations of a batch: the source keeps the disk, the
    /// destinations drop their images.
    Abort {
        /// The batch.
        batch: String,
        /// Agent to talk to.
        #[command(flatten)]
        target: ApiTarget,
    },
    /// List migration jobs, or show one.
    Jobs {
        /// Job id.
        id: Option<u64>,
        /// Agent to talk to.
        #[command(flatten)]
        target: ApiTarget,
    },
    /// Walk through ferry on temporary images: write tracking and heat, then a live migration
    /// (heat vs naive policy), with agents run as child processes.
    Demo(crate::demo::DemoArgs),
    /// NBD TLS credentials.
    Tls {
        /// Action.
        #[command(subcommand)]
        action: TlsAction,
    },
}

/// `ferry tls ...`
#[derive(Debug, Subcommand)]
pub enum TlsAction {
    /// Create a CA and a server and a client certificate it signed in DIR, in the layout of
    /// QEMU's tls-creds-x509 and libnbd's tls-certificates (ca-cert.pem, server-cert.pem,
    /// server-key.pem, client-cert.pem, client-key.pem; ca-key.pem to sign more later).
    /// Existing files are never overwritten.
    Init {
        /// Directory to create the files in (created 0700 if missing).
        dir: PathBuf,
        /// A name or IP address clients connect to the server with; repeatable
        /// [default: localhost, 127.0.0.1 and ::1].
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

/// `ferry resume` options: each replaces the setting the job was started with; the ones
/// left out keep it.
#[derive(Debug, Args, Clone, Default)]
pub struct ResumeOverrides {
    /// Copy policy: heat or naive.
    #[arg(long)]
    pub policy: Option<String>,
    /// Longest write pause the switchover may cause, in milliseconds.
    #[arg(long)]
    pub max_pause: Option<u64>,
    /// Switch over after this many milliseconds even if the pause bound is not met.
    #[arg(long)]
    pub force_after: Option<u64>,
    /// Bandwidth cap of the block stream (e.g. 200M); 0 lifts the cap.
    #[arg(long)]
    pub bandwidth: Option<String>,
    /// Compare both images at the switchover point (--verify=false turns it off).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub verify: Option<bool>,
    /// Yield to the guest during the bulk copy (--yield=false turns it off).
    #[arg(long = "yield", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub yield_to_guest: Option<bool>,
    /// Mirror guest writes from the start (--mirror=false turns it off).
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub mirror: Option<bool>,
}

/// `ferry agent` flags; each overrides the config file.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// TOML config file (see scripts/deploy/ferry.toml).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Serve an export:
    /// NAME=PATH[,ro][,granularity=SIZE][,tracker=NAME][,durable_tracker=NAME][,forward_hold=MS];
    /// repeatable.
    #[arg(long = "export", short = 'e')]
    pub exports: Vec<String>,
    /// Unix socket of the NBD server [default: /run/ferry/nbd.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Also serve NBD over TCP [default address when given bare: 127.0.0.1:10809].
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    pub tcp: Option<String>,
    /// State directory [default: /var/lib/ferry].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Control API address [default: 127.0.0.1:7450]; an address that is not loopback needs
    /// --api-tls-creds (or --api-insecure).
    #[arg(long)]
    pub api: Option<String>,
    /// TLS credentials of the control API (the --tls-creds layout; `ferry tls init DIR --host
    /// NAME` creates one): every API connection is then TLS with client certificates, and
    /// the token is still required.
    #[arg(long, value_name = "DIR")]
    pub api_tls_creds: Option<PathBuf>,
    /// Serve the control API in plain HTTP on an address that is not loopback (refused
    /// otherwise without --api-tls-creds): the token and every command cross the network
    /// readable.
    #[arg(long)]
    pub api_insecure: bool,
    /// Whether /metrics on the API address needs the API token [default: true]; false
    /// shows export names, sizes and guest I/O to anyone who reaches the port.
    #[arg(long, value_name = "BOOL")]
    pub metrics_auth: Option<bool>,
    /// Also serve /metrics alone, without the token, on this address (for a Prometheus
    /// scraper on a trusted network).
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,
    /// io engine: auto, uring or sync.
    #[arg(long)]
    pub engine: Option<String>,
    /// Tracking granularity of --export exports (e.g. 64K).
    #[arg(long)]
    pub granularity: Option<String>,
    /// Block-stream listener for migrations into this host [default: 127.0.0.1:7451].
    #[arg(long)]
    pub transfer: Option<String>,
    /// Cluster key file shared by agents that migrate to each other
    /// [default: <state-dir>/cluster.key, created if missing].
    #[arg(long)]
    pub cluster_key: Option<PathBuf>,
    /// Directory for images of disks migrated into this host [default: <state-dir>/images].
    #[arg(long)]
    pub image_dir: Option<PathBuf>,
    /// After a switchover, how long (milliseconds) a request forwarded to a destination that
    /// is away (restarting) waits before it fails with EIO [default: 60000].
    #[arg(long = "forward-hold", value_name = "MS")]
    pub forward_hold_ms: Option<u64>,
    /// TLS credentials directory (QEMU's tls-creds-x509 layout: ca-cert.pem,
    /// server-cert.pem, server-key.pem, client-cert.pem, client-key.pem; `ferry tls init`
    /// creates one): NBD over TCP then requires TLS with client certificates, and forwarding
    /// after a switchover dials with TLS.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Serve NBD over TCP without TLS (refused otherwise when --tls-creds is not given).
    #[arg(long)]
    pub tcp_insecure: bool,
    /// Let this group connect to the NBD unix socket (mode 0660; else 0600, owner only).
    #[arg(long, value_name = "GROUP")]
    pub socket_group: Option<String>,
    /// Run the block stream without sealing its frames (plaintext, no protection against a
    /// relay): for measurement only; the peer agents must run it too, or they refuse.
    #[arg(long)]
    pub stream_insecure: bool,
}

/// `ferry export ...`
#[derive(Debug, Subcommand)]
pub enum ExportAction {
    /// Serve a new export.
    Add {
        /// Export name.
        name: String,
        /// Raw image file or block device.
        path: PathBuf,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Tracking granularity (e.g. 64K).
        #[arg(long, default_value = "64K")]
        granularity: String,
        /// Create trackers with these names.
        #[arg(long = "tracker")]
        trackers: Vec<String>,
    },
    /// List exports.
    Ls,
    /// Stop serving an export.
    Rm {
        /// Export name.
        name: String,
        /// Close its connections.
        #[arg(long)]
        force: bool,
    },
    /// Remove the images migrations left stale here (`<file>.stale-<job>`, never served)
    Gc {
        /// Only list them.
        #[arg(long)]
        dry_run: bool,
    },
}

/// `ferry tracker ...`
#[derive(Debug, Subcommand)]
pub enum TrackerAction {
    /// Start tracking writes.
    Add {
        /// Export name.
        export: String,
        /// Tracker name.
        name: String,
        /// Granularity (default: the export's).
        #[arg(long)]
        granularity: Option<String>,
        /// Heat half-life in milliseconds.
        #[arg(long)]
        half_life_ms: Option<u64>,
        /// Keep an activity log: after a crash the tracker comes back `recovered` (every
        /// write it tracked is still dirty), not `lost`.
        #[arg(long)]
        durable: bool,
    },
    /// List trackers of an export.
    Ls {
        /// Export name.
        export: String,
    },
    /// Remove a tracker.
    Rm {
        /// Export name.
        export: String,
        /// Tracker name.
        name: String,
    },
}

/// `ferry seed` actions.
#[derive(Debug, Subcommand)]
pub enum SeedAction {
    /// Copy live exports onto a medium (at the source): prints the seed id.
    Export {
        /// Exports to put on the seed.
        #[arg(required = true)]
        exports: Vec<String>,
        /// Medium: a directory (a mounted USB disk) or a raw device; repeat for the next
        /// volumes when one medium is too small.
        #[arg(long, required = true)]
        media: Vec<PathBuf>,
        /// Yield to the guest while its write p99 exceeds this many milliseconds.
        #[arg(long)]
        max_impact: Option<u64>,
        /// A file with a separate 32-byte seed key (64 hex digits) instead of the cluster's.
        #[arg(long)]
        seed_key: Option<PathBuf>,
        /// Continue the stopped export of this seed (name the same exports and media).
        #[arg(long)]
        resume: Option<String>,
        /// Return once started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Verify a seed into images here (at the destination); they stay unserved until a
    /// catch-up reaches an in-sync point.
    Import {
        /// The seed's media (directories or raw devices), every volume.
        #[arg(long, required = true)]
        media: Vec<PathBuf>,
        /// Import a one-disk seed under this export name.
        #[arg(long = "as")]
        as_name: Option<String>,
        /// The separate seed key's file, if the seed was made with one.
        #[arg(long)]
        seed_key: Option<PathBuf>,
        /// Return once started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Send what changed since the seed to the destination that imported it, until in sync.
    Sync {
        /// The export whose seed to catch up (several, against a manager: one plan).
        #[arg(required = true)]
        exports: Vec<String>,
        /// Destination agent's block-stream address, HOST[:PORT] (against a manager: a
        /// managed host's name also).
        #[arg(long)]
        to: String,
        /// Against a manager: the plan's name [default: seed-sync-<unix seconds>].
        #[arg(long)]
        batch: Option<String>,
        /// End once at most this many bytes remain dirty (e.g. 64M); the write hold at the
        /// in-sync point stays within --max-pause.
        #[arg(long)]
        threshold: Option<String>,
        /// Keep the destination in sync (continuous replication) until `ferry seed stop`.
        #[arg(long, conflicts_with = "then")]
        follow: bool,
        /// Once in sync: `migrate` switches over as a live migration does.
        #[arg(long)]
        then: Option<String>,
        /// Longest write hold at the in-sync point, in milliseconds.
        #[arg(long)]
        max_pause: Option<u64>,
        /// Bandwidth cap of the block stream (e.g. 200M = 200 MiB/s).
        #[arg(long)]
        bandwidth: Option<String>,
        /// Return once started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop a seed export or import (by seed id; an export continues with --resume), or
    /// end a continuous replication (`sync --follow`, by job id) after its current pass.
    Stop {
        /// A seed id, or a sync job's id.
        id: String,
    },
    /// List the seeds and volumes on media (headers only).
    Ls {
        /// Media: directories or raw devices.
        #[arg(long, required = true)]
        media: Vec<PathBuf>,
        /// The separate seed key's file, if any.
        #[arg(long)]
        seed_key: Option<PathBuf>,
    },
    /// Show a seed's disks (manifests authenticated with the key).
    Show {
        /// Media: directories or raw devices.
        #[arg(long, required = true)]
        media: Vec<PathBuf>,
        /// The separate seed key's file, if any.
        #[arg(long)]
        seed_key: Option<PathBuf>,
    },
    /// Read and verify every chunk of a seed.
    Verify {
        /// Media: directories or raw devices.
        #[arg(long, required = true)]
        media: Vec<PathBuf>,
        /// The separate seed key's file, if any.
        #[arg(long)]
        seed_key: Option<PathBuf>,
    },
}

/// `ferry manager`.
#[derive(Debug, Args)]
pub struct ManagerArgs {
    /// `status` or `takeover`; without one, runs the manager.
    #[command(subcommand)]
    pub action: Option<ManagerAction>,
    /// Configuration file (TOML; see `src/manager/config.rs`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// This manager's id.
    #[arg(long)]
    pub id: Option<String>,
    /// The pair's name (its lease file on the witness).
    #[arg(long)]
    pub pair: Option<String>,
    /// This manager's API address (host:port).
    #[arg(long)]
    pub listen: Option<String>,
    /// Where the manager keeps its role state.
    #[arg(long)]
    pub manager_dir: Option<PathBuf>,
    /// The peer manager, ID=ADDRESS.
    #[arg(long, value_name = "ID=ADDRESS")]
    pub peer: Option<String>,
    /// A managed agent, NAME=ADDRESS (repeat; added to the file's).
    #[arg(long = "agent", value_name = "NAME=ADDRESS")]
    pub agents: Vec<String>,
    /// Manager to ask (status, takeover); the run uses `--token-file` for the fleet token.
    #[command(flatten)]
    pub target: ApiTarget,
}

/// `ferry manager` actions on a running manager.
#[derive(Debug, Subcommand)]
pub enum ManagerAction {
    /// Who is active, the epoch, the witness, the lease's age, the last role change.
    Status,
    /// Make this manager active without the witness: for when the other manager and the
    /// witness are lost together. Dangerous if the other manager is alive.
    Takeover {
        /// Required: says you know the other manager is gone.
        #[arg(long)]
        force: bool,
        /// The host to record as the new witness.
        #[arg(long)]
        witness: String,
    },
}

/// `ferry host` actions.
#[derive(Debug, Subcommand)]
pub enum HostAction {
    /// No witness on this host: the managers move the lease away (no failover).
    Drain {
        /// The host's name in the managers' configuration.
        name: String,
    },
    /// The host may be witness again.
    Undrain {
        /// The host's name.
        name: String,
    },
    /// Manage one more agent (both managers keep it across restarts).
    Add {
        /// The host's name (witness choices, plans and status name it).
        name: String,
        /// Its agent's control API address (host:port).
        address: String,
        /// Its block-stream address, so that plans may name the host as a destination.
        #[arg(long)]
        transfer: Option<String>,
    },
}
