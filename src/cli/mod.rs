//! The `ferry` front end: every subcommand but `ferry agent` is a client of an agent's
//! control API ([`crate::api::Client`]); answers are printed with [`crate::api::render`] and
//! [`crate::api::view`], or as JSON with `--json`. `main` parses the command line ([`Cli`])
//! and runs the agent itself; everything else comes here through [`run`].
//!
//! Files: `args.rs` (the clap definitions), `exports.rs` (export, tracker, heat),
//! `migrate.rs` (migrate, resume, abort: one job or a batch), `status.rs` (status, jobs).
//!
//! Invariants:
//! - Nothing here names the agent (tests/layering.rs): status, resume and the batch listing
//!   of abort all ask the agent, which reads its own journal and asks its peers. The one
//!   exception is the explicit `ferry status --offline`, which reads the journal file of a
//!   stopped agent and says so.
//! - Errors are [`CliError`]s with short messages; `main` prints each with its causes. A
//!   migration that ends failed is an error too, so the exit code says so.

mod args;
mod exports;
mod manager;
mod migrate;
mod seed;
mod status;

use std::path::PathBuf;

pub use args::*;

use crate::api::batch::PlanError;
use crate::api::tls::ClientTlsOptions;
use crate::api::{token, Client, ClientError};
use crate::journal::JournalError;
use crate::units::SizeError;

/// Why a client subcommand failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The API token file could not be read.
    #[error("cannot read the API token from {}", .path.display())]
    Token {
        /// The token file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The agent could not be reached, or refused or failed the call (the message names
    /// the agent).
    #[error(transparent)]
    Api(#[from] ClientError),
    /// `ferry status` could not reach the agent.
    #[error("cannot ask the agent for the status (if it is down: ferry status --offline)")]
    StatusUnreachable(#[source] ClientError),
    /// A flag's value is not a size.
    #[error("{flag}")]
    Size {
        /// The flag, e.g. `--bandwidth`.
        flag: &'static str,
        /// Why.
        #[source]
        source: SizeError,
    },
    /// A file named on the command line could not be read.
    #[error("{flag} {}", .path.display())]
    File {
        /// The flag or argument naming it.
        flag: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: std::io::Error,
    },
    /// The plan file is not a plan.
    #[error("--plan {}", .path.display())]
    Plan {
        /// The plan file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: PlanError,
    },
    /// The command line names nothing to do.
    #[error("{0}")]
    Usage(&'static str),
    /// `--max-impact` is not a target.
    #[error(transparent)]
    Impact(#[from] crate::migrate::steer::ImpactParseError),
    /// The journal file could not be read (`ferry status --offline`).
    #[error("offline status")]
    Offline(#[source] JournalError),
    /// A migration ended failed (its status was printed).
    #[error("migration of {export} failed")]
    MigrationFailed {
        /// The export.
        export: String,
    },
    /// A seed export, import or check ended failed (its status was printed).
    #[error("seed {seed_id}: {message}")]
    SeedFailed {
        /// The seed.
        seed_id: String,
        /// Why.
        message: String,
    },
    /// `ferry manager` could not run.
    #[error("manager")]
    Manager(#[source] crate::manager::ManagerError),
    /// The manager's configuration is refused.
    #[error("manager configuration")]
    ManagerConfig(#[source] crate::manager::ConfigError),
    /// `ferry manager takeover` without `--force`.
    #[error("a takeover happens only through the witness; pass --force if the other manager and the witness are really lost")]
    TakeoverNotForced,
    /// `ferry demo` failed.
    #[error("demo")]
    Demo(#[source] crate::demo::DemoError),
    /// `ferry tls init` failed.
    #[error("tls init")]
    TlsInit(#[source] crate::nbd::tls::init::InitError),
    /// The API TLS credentials (`--api-tls-creds`) could not be loaded.
    #[error("--api-tls-creds {}", .path.display())]
    ApiTls {
        /// The credential directory.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: crate::nbd::tls::TlsError,
    },
    /// Migrations of a batch ended failed (their statuses were printed).
    #[error("batch {batch}: {failed} of {total} migrations failed")]
    BatchFailed {
        /// The batch.
        batch: String,
        /// Jobs that failed.
        failed: usize,
        /// Jobs run.
        total: usize,
    },
}

/// Runs a client subcommand, or `ferry demo` (`ferry agent` is run by the binary's `main`,
/// the only place that may name the agent).
pub fn run(command: Command) -> Result<(), CliError> {
    match command {
        Command::Agent(_) => Err(CliError::Usage("`ferry agent` is run by the binary")),
        Command::Manager(args) => manager::manager(args),
        Command::Host { action, target } => manager::host(&action, &target),
        Command::Export { action, target } => exports::export(action, &target),
        Command::Tracker { action, target } => exports::tracker(action, &target),
        Command::Heat {
            export,
            tracker,
            width,
            rows,
            target,
        } => exports::heat(&export, tracker.as_deref(), width, rows, &target),
        Command::Migrate {
            exports,
            to,
            batch,
            plan,
            concurrency,
            policy,
            max_pause,
            force_after,
            bandwidth,
            no_wait,
            verify,
            yield_to_guest,
            max_impact,
            weight,
            mirror,
            granularity,
            target,
        } => {
            let request = migrate::Request {
                granularity,
                policy,
                max_pause_ms: max_pause,
                force_after_ms: force_after,
                bandwidth,
                verify,
                yield_to_guest,
                max_impact,
                weight,
                mirror,
            };
            let plan = migrate::Plan {
                exports,
                to,
                batch,
                file: plan,
            };
            migrate::migrate(plan, &request, concurrency, no_wait, &target)
        }
        Command::Resume {
            batch,
            concurrency,
            overrides,
            target,
        } => migrate::resume(&batch, concurrency, &overrides, &target),
        Command::Abort { batch, target } => migrate::abort(&batch, &target),
        Command::Seed { action, target } => seed::seed(action, &target),
        Command::Jobs { id, target } => status::jobs(id, &target),
        Command::Status {
            batch,
            offline,
            cluster_key,
            target,
        } => {
            if offline {
                status::offline(batch.as_deref(), cluster_key, &target)
            } else {
                status::online(batch.as_deref(), &target)
            }
        }
        Command::Demo(args) => demo(&args),
        Command::Tls {
            action: TlsAction::Init { dir, hosts },
        } => tls_init(&dir, hosts),
    }
}

/// `ferry tls init`: the server names `hosts`, or the loopback names by default.
fn tls_init(dir: &std::path::Path, mut hosts: Vec<String>) -> Result<(), CliError> {
    if hosts.is_empty() {
        hosts = ["localhost", "127.0.0.1", "::1"].map(String::from).to_vec();
    }
    crate::nbd::tls::init::generate(dir, &hosts).map_err(CliError::TlsInit)?;
    println!(
        "TLS credentials in {} (server names: {}); give --tls-creds {} to each agent",
        dir.display(),
        hosts.join(", "),
        dir.display()
    );
    Ok(())
}

/// `ferry demo`: runs agents of its own, so it needs no target.
fn demo(args: &crate::demo::DemoArgs) -> Result<(), CliError> {
    crate::demo::run(args).map_err(CliError::Demo)
}

/// A client of the agent `target` names, with the token from its state directory (or
/// `--token-file`).
fn client(target: &ApiTarget) -> Result<Client, CliError> {
    let path = target
        .token_file
        .clone()
        .unwrap_or_else(|| target.state_dir.join("api.token"));
    let token = token::read(&path).map_err(|source| CliError::Token { path, source })?;
    let client = Client::new(&target.api, Some(token));
    let Some(dir) = &target.api_tls_creds else {
        if target.api.trim().starts_with("https://") {
            return Err(CliError::Usage(
                "an https:// agent address needs --api-tls-creds DIR (FERRY_API_TLS_CREDS)",
            ));
        }
        return Ok(client);
    };
    let tls = ClientTlsOptions::load(dir, target.api_tls_name.clone()).map_err(|source| {
        CliError::ApiTls {
            path: dir.clone(),
            source,
        }
    })?;
    Ok(client.with_tls(&tls))
}

/// Prints `value` as pretty JSON (`--json`).
fn print_json(value: &impl serde::Serialize) {
    // API types always serialize (no maps with non-string keys, no failing impls).
    let text = serde_json::to_string_pretty(value).expect("API types serialize to JSON");
    println!("{text}");
}
