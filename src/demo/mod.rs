//! `ferry demo`: ferry on one host, told step by step in the terminal.
//!
//! Act 1, write tracking ([`tracking`]): an agent serves a sparse image; a guest writes a
//! skewed workload through a real NBD connection (4 KiB writes, 32 in flight, hot spots drawn
//! from a Zipf law), a second tracker is added half-way, a sample is read back and checked, and
//! the trackers and the heat map are printed from the control API (the calls `ferry tracker ls`
//! and `ferry heat` make). Act 2, live migration ([`migrate`]): a disk moves between two agents
//! while its guest writes, once with each copy policy (heat, naive), with a progress bar per
//! copy and a table comparing the two.
//!
//! The agents are child processes ([`agents`]: this executable's `ferry agent --config`), each
//! with its own config, state directory and log file in the demo's work directory. The demo
//! reaches them only as any client would: through the control API ([`crate::api::Client`]) and
//! NBD ([`crate::nbd::client`]). So their logs stay out of the terminal, and the demo depends
//! on nothing above it (it imports neither `agent` nor `cli`).
//!
//! Invariants:
//! - Every agent the demo starts is stopped before [`run`] returns, on error too: a guard sends
//!   SIGTERM (the agent drains, syncs its image and saves its trackers) and kills an agent that
//!   has not exited within a timeout. Two ways around the guard: a panic aborts the process in
//!   release builds, and Ctrl-C kills the demo (leaving its work directory); in the second case
//!   the agents, which share the terminal's process group, get the SIGINT too and stop cleanly
//!   on their own.
//! - The work directory is removed after a successful run. After a failure it is kept and its
//!   path printed, so the agents' logs can be read; every agent error names its log file.

use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use crate::api::ClientError;

mod agents;
mod guest;
mod migrate;
mod tracking;

/// Where the work directory goes when `--dir` is not given: on disk (O_DIRECT), unlike /tmp on
/// some hosts.
const DEFAULT_BASE_DIR: &str = "/var/tmp";
/// Smallest image the workloads make sense on (256 Zipf regions of at least 256 KiB).
const SIZE_MIN_BYTES: u64 = 64 << 20;

/// `ferry demo` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Size of the demo's disk images (at least 64M).
    #[arg(long, default_value = "1G")]
    pub size: String,
    /// Writes of the first act's workload.
    #[arg(long, default_value_t = 40_000)]
    pub writes: u64,
    /// Where to create the work directory (images, agent configs, state, logs). It must
    /// support O_DIRECT: not tmpfs. [default: /var/tmp]
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// Errors of the demo, one variant per failing step. The agent variants name the agent's log,
/// where the agent says why.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// A flag has a value the demo cannot use.
    #[error("{flag}: {problem}")]
    Args {
        /// The flag.
        flag: &'static str,
        /// What is wrong.
        problem: String,
    },
    /// A file or directory of the work directory could not be written.
    #[error("{path}")]
    WorkDir {
        /// The file or directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The agents' TLS credentials could not be created.
    #[error("TLS credentials")]
    Tls(#[source] crate::nbd::tls::init::InitError),
    /// The agent's config file could not be written as TOML.
    #[error("config of agent {agent}")]
    Config {
        /// The agent.
        agent: String,
        /// Why.
        #[source]
        source: toml::ser::Error,
    },
    /// The agent process could not be started, waited for or signalled.
    #[error("agent {agent} (log {log})")]
    Process {
        /// The agent.
        agent: String,
        /// Its log file.
        log: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The agent exited before its control API answered.
    #[error("agent {agent} exited during start-up ({status}); see its log {log}")]
    StartExited {
        /// The agent.
        agent: String,
        /// How it exited.
        status: ExitStatus,
        /// Its log file.
        log: PathBuf,
    },
    /// The agent's control API did not answer in time (the agent was then stopped).
    #[error("agent {agent} did not answer on {api} within {waited_s} s; see its log {log}")]
    StartTimeout {
        /// The agent.
        agent: String,
        /// The control API address it was given.
        api: String,
        /// How long the demo waited.
        waited_s: u64,
        /// Its log file.
        log: PathBuf,
    },
    /// The agent did not stop cleanly after SIGTERM.
    #[error("agent {agent} did not stop cleanly ({how}); see its log {log}")]
    Unclean {
        /// The agent.
        agent: String,
        /// Its exit status, or that it was killed.
        how: String,
        /// Its log file.
        log: PathBuf,
    },
    /// A control API call failed.
    #[error("control API")]
    Api(#[from] ClientError),
    /// The NBD connection of the demo's guest failed.
    #[error("NBD guest")]
    Nbd(#[source] io::Error),
    /// A block read back through NBD does not hold its last write.
    #[error("the block at offset {offset_bytes} does not hold its last write")]
    LostWrite {
        /// The block.
        offset_bytes: u64,
    },
    /// The cluster key shared by the migration's agents could not be created.
    #[error("cluster key {path}")]
    ClusterKey {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: crate::transfer::TransferError,
    },
    /// A migration ended in another phase than Done.
    #[error("{policy} migration ended {phase}: {reason}")]
    Migration {
        /// The copy policy.
        policy: &'static str,
        /// The phase it ended in.
        phase: String,
        /// The job's error, if it gave one.
        reason: String,
    },
    /// The guest thread panicked (a bug; its message went to stderr).
    #[error("the guest thread panicked")]
    GuestPanicked,
}

impl DemoError {
    /// A [`DemoError::WorkDir`] for `path`, for `map_err`.
    fn work(path: &Path) -> impl FnOnce(io::Error) -> DemoError + '_ {
        move |source| DemoError::WorkDir {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The demo's work directory: one subdirectory per act, and `logs/` with one file per agent.
#[derive(Debug)]
struct WorkDir {
    root: PathBuf,
}

impl WorkDir {
    fn create(root: PathBuf) -> Result<WorkDir, DemoError> {
        let logs = root.join("logs");
        std::fs::create_dir_all(&logs).map_err(DemoError::work(&logs))?;
        Ok(WorkDir { root })
    }

    /// A subdirectory, created.
    fn subdir(&self, relative: &str) -> Result<PathBuf, DemoError> {
        let dir = self.root.join(relative);
        std::fs::create_dir_all(&dir).map_err(DemoError::work(&dir))?;
        Ok(dir)
    }

    /// The log file of agent `name`.
    fn log(&self, name: &str) -> PathBuf {
        self.root.join("logs").join(format!("{name}.log"))
    }
}

/// Runs the demo: both acts, then the work directory is removed (or kept, on failure).
pub fn run(args: &DemoArgs) -> Result<(), DemoError> {
    let size_bytes = crate::units::parse_size(&args.size).map_err(|problem| DemoError::Args {
        flag: "--size",
        problem: problem.to_string(),
    })?;
    if size_bytes < SIZE_MIN_BYTES {
        return Err(DemoError::Args {
            flag: "--size",
            problem: "use at least 64M".into(),
        });
    }
    let base = args
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BASE_DIR));
    let work = WorkDir::create(base.join(format!("ferry-demo-{}", std::process::id())))?;
    println!(
        "ferry demo: work directory {} (images, agent configs and state, agent logs in logs/)",
        work.root.display()
    );
    let result = tracking::run(&work, size_bytes, args.writes)
        .and_then(|()| migrate::compare(&work, size_bytes));
    match &result {
        Ok(()) => match std::fs::remove_dir_all(&work.root) {
            Ok(()) => println!("\nferry demo: done; removed {}", work.root.display()),
            Err(err) => eprintln!(
                "\nferry demo: done, but {} could not be removed: {err}",
                work.root.display()
            ),
        },
        Err(_) => eprintln!(
            "\nferry demo: failed; kept {} (agent logs in {})",
            work.root.display(),
            work.root.join("logs").display()
        ),
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Goal: a demo with a bad `--size` fails before it creates anything.
    #[test]
    fn demo_rejects_small_size_before_creating_anything() {
        let base = tempfile::tempdir().expect("tempdir");
        let args = DemoArgs {
            size: "1M".into(),
            writes: 1,
            dir: Some(base.path().to_path_buf()),
        };
        let err = run(&args).expect_err("1M is below the minimum");
        assert!(matches!(err, DemoError::Args { flag: "--size", .. }));
        let entries = std::fs::read_dir(base.path()).expect("read_dir").count();
        assert_eq!(entries, 0);
    }
}
