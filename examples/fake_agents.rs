//! Many fake agents in one process, for the manager scale benchmark
//! (`scripts/bench-manager-scale`): each a real control API listener and router over an
//! in-memory agent (`tests/support/fake_agents.rs` says what each route answers).
//!
//! Usage: `cargo run --release --example fake_agents -- --count 1000 --token-file F
//! --base-port 20000 --disks-per-agent 4 --addresses-out FILE`. Agent `i` is `h{i}` on
//! `127.0.0.1:(base-port + i)` (`--base-port 0`: any free port). Once every listener is up,
//! FILE gets one `h{i}=127.0.0.1:PORT` line per agent (written to `FILE.tmp`, then renamed),
//! and `ready N` goes to stdout. On SIGTERM or SIGINT it prints request counts by route to
//! stdout (`requests exports=.. status=.. lease=.. leases=.. stale=..`) and exits.
//!
//! Threads: a listener and `--workers` workers per agent (2000 for 1000 agents with one
//! worker); descriptors: 3 per agent plus the callers' kept-alive connections.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;

#[path = "../tests/support/fake_agents.rs"]
mod fake_agents;

use fake_agents::{Fleet, Options};

/// Command line.
#[derive(Debug, Parser)]
struct Args {
    /// Agents to run.
    #[arg(long, default_value_t = 1000)]
    count: usize,
    /// The fleet's API token (the managers' `token_file`).
    #[arg(long)]
    token_file: PathBuf,
    /// Port of agent 0; agent i listens on base-port + i (0: any free port).
    #[arg(long, default_value_t = 0)]
    base_port: u16,
    /// `DiskStatus` lines each agent's `GET /v1/status` returns.
    #[arg(long, default_value_t = 4)]
    disks_per_agent: usize,
    /// Exports each agent's `GET /v1/exports` (the managers' ping) returns.
    #[arg(long, default_value_t = 2)]
    exports_per_agent: usize,
    /// API worker threads per agent (the listener thread comes on top).
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// This many agents, spread evenly, answer `GET /v1/status` only after --stall-ms (an
    /// agent whose destinations do not answer).
    #[arg(long, default_value_t = 0)]
    stall_agents: usize,
    /// How long a stalled agent's `GET /v1/status` takes.
    #[arg(long, default_value_t = 3000)]
    stall_ms: u64,
    /// Where the `h{i}=ADDRESS` lines go.
    #[arg(long)]
    addresses_out: PathBuf,
}

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let token = match ferry::api::token::read(&args.token_file) {
        Ok(token) => token,
        Err(err) => fail(&format!("token {}: {err}", args.token_file.display())),
    };
    let mut signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ])
    .unwrap_or_else(|err| fail(&format!("signals: {err}")));
    let options = Options {
        base_port: args.base_port,
        disks_per_agent: args.disks_per_agent,
        exports_per_agent: args.exports_per_agent,
        workers: args.workers,
        stall_agents: args.stall_agents,
        stall_ms: args.stall_ms,
    };
    let started = Instant::now();
    let mut fleet = Fleet::start(args.count, &token, &options).unwrap_or_else(|err| fail(&err));
    let tmp = args.addresses_out.with_extension("tmp");
    let written = std::fs::write(&tmp, fleet.lines.join("\n") + "\n")
        .and_then(|()| std::fs::rename(&tmp, &args.addresses_out));
    if let Err(err) = written {
        fail(&format!("{}: {err}", args.addresses_out.display()));
    }
    eprintln!(
        "fake_agents: {} agents up in {:.2} s ({} workers each, {} stalled by {} ms)",
        args.count,
        started.elapsed().as_secs_f64(),
        args.workers,
        args.stall_agents,
        args.stall_ms
    );
    println!("ready {}", args.count);
    let _signal = signals.forever().next();
    fleet.stop();
    println!("{}", fleet.counts_line());
}

fn fail(message: &str) -> ! {
    eprintln!("fake_agents: {message}");
    std::process::exit(1);
}
