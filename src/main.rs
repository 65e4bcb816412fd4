//! The `ferry` binary: parses the command line, sets up logging, runs the agent
//! (`ferry agent`) or hands every other subcommand to [`ferry::cli::run`], and turns errors
//! into a message (with its cause chain) and an exit code.

use std::process::ExitCode;

use clap::Parser;

use ferry::agent::config::{AgentConfig, Overrides};
use ferry::cli::{AgentArgs, Cli, Command};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Agent(args) => agent(args),
        command => ferry::cli::run(command).map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ferry: {}", ferry::error::error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// `ferry agent`: the config file with the flags over it, then the daemon until a signal.
fn agent(args: AgentArgs) -> Result<(), Box<dyn std::error::Error>> {
    let overrides = Overrides {
        socket: args.socket,
        tcp: args.tcp,
        state_dir: args.state_dir,
        api: args.api,
        metrics_auth: args.metrics_auth,
        metrics: args.metrics,
        engine: args.engine,
        exports: args.exports,
        granularity: args.granularity,
        transfer: args.transfer,
        cluster_key: args.cluster_key,
        image_dir: args.image_dir,
        forward_hold_ms: args.forward_hold_ms,
        tls_creds: args.tls_creds,
        tcp_insecure: args.tcp_insecure,
        api_tls_creds: args.api_tls_creds,
        api_insecure: args.api_insecure,
        socket_group: args.socket_group,
        stream_insecure: args.stream_insecure,
    };
    let config = AgentConfig::load(args.config.as_deref(), &overrides)?;
    ferry::agent::run(&config)?;
    Ok(())
}
