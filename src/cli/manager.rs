//! `ferry manager` (run one, or ask one for its status, or force a takeover) and `ferry host
//! drain|undrain`.

use super::{client, print_json, ApiTarget, CliError, HostAction, ManagerAction, ManagerArgs};
use crate::api::fleet::{BatchItem, BatchPlan, BatchView, HostAdd, ManagerStatus, TakeoverRequest};
use crate::api::types::MigrateRequest;
use crate::api::Client;
use crate::manager::{ManagerConfig, Overrides};

/// `ferry manager [status | takeover]`.
pub fn manager(args: ManagerArgs) -> Result<(), CliError> {
    match &args.action {
        None => run(&args),
        Some(ManagerAction::Status) => {
            let status = client(&args.target)?
                .manager_status()
                .map_err(CliError::Api)?;
            if args.target.json {
                print_json(&status);
            } else {
                print!("{}", render(&status));
            }
            Ok(())
        }
        Some(ManagerAction::Takeover { force, witness }) => {
            if !force {
                return Err(CliError::TakeoverNotForced);
            }
            eprintln!(
                "warning: recording {witness} as witness without the other manager; if it is \
                 still running, two managers may act until agents see the new epoch"
            );
            let request = TakeoverRequest {
                force: true,
                witness: witness.clone(),
            };
            let status = client(&args.target)?
                .manager_takeover(&request)
                .map_err(CliError::Api)?;
            print!("{}", render(&status));
            Ok(())
        }
    }
}

fn run(args: &ManagerArgs) -> Result<(), CliError> {
    let overrides = Overrides {
        id: args.id.clone(),
        pair: args.pair.clone(),
        listen: args.listen.clone(),
        state_dir: args.manager_dir.clone(),
        token_file: args.target.token_file.clone(),
        tls_creds: args.target.api_tls_creds.clone(),
        peer: args.peer.clone(),
        agents: args.agents.clone(),
    };
    let config =
        ManagerConfig::load(args.config.as_deref(), &overrides).map_err(CliError::ManagerConfig)?;
    crate::manager::run(config).map_err(CliError::Manager)
}

/// `ferry host add|drain|undrain NAME`.
pub fn host(action: &HostAction, target: &ApiTarget) -> Result<(), CliError> {
    let (name, drained) = match action {
        HostAction::Drain { name } => (name, true),
        HostAction::Undrain { name } => (name, false),
        HostAction::Add {
            name,
            address,
            transfer,
        } => {
            let host = HostAdd {
                name: name.clone(),
                address: address.clone(),
                transfer: transfer.clone(),
            };
            client(target)?
                .host_add(&host, false)
                .map_err(CliError::Api)?;
            println!("{name}: managed (at {address})");
            return Ok(());
        }
    };
    client(target)?
        .host_drain(name, drained, false)
        .map_err(CliError::Api)?;
    println!(
        "{name}: {}",
        if drained {
            "drained"
        } else {
            "back in service"
        }
    );
    Ok(())
}

/// The status as lines.
fn render(status: &ManagerStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let role = match status.epoch {
        Some(epoch) if status.active => format!(
            "ACTIVE, epoch {epoch} ({:.1} s of the {:.1} s lease left)",
            status.lease_remaining_ms as f64 / 1e3,
            status.lease_ms as f64 / 1e3
        ),
        _ => format!("standby (highest epoch known {})", status.known_epoch),
    };
    let _ = writeln!(out, "manager {} (pair {}): {role}", status.id, status.pair);
    let witness = status
        .witness
        .as_ref()
        .map_or("none chosen yet".to_string(), |w| {
            format!("{} (generation {})", w.host, w.generation)
        });
    let _ = writeln!(out, "witness: {witness}");
    if let Some(pending) = &status.pending {
        let _ = writeln!(
            out,
            "witness move proposed, not yet confirmed: {}",
            pending.host
        );
    }
    let heard = status
        .peer
        .heard_ms_ago
        .map_or("never heard".to_string(), |ms| {
            format!("heard {:.1} s ago", ms as f64 / 1e3)
        });
    let peer_role = if status.peer.active {
        "active"
    } else {
        "not active"
    };
    let _ = writeln!(
        out,
        "peer {} at {}: {heard}, {peer_role}",
        status.peer.id, status.peer.address
    );
    if let Some(change) = &status.last_change {
        let _ = writeln!(
            out,
            "last change: {} at epoch {} ({} ms Unix): {} ({} changes)",
            if change.active { "active" } else { "standby" },
            change.epoch,
            change.at_unix_ms,
            change.reason,
            status.role_changes
        );
    }
    if !status.drained.is_empty() {
        let _ = writeln!(out, "drained: {}", status.drained.join(", "));
    }
    for agent in &status.agents {
        let heard = agent
            .heard_ms_ago
            .map_or("not answering".to_string(), |ms| {
                format!("heard {:.1} s ago", ms as f64 / 1e3)
            });
        let _ = writeln!(out, "  {} {}: {heard}", agent.name, agent.address);
    }
    out
}

/// The plan of `batch`: each `(export, to)` pair an item, with `options`.
pub fn batch_plan(
    batch: &str,
    pairs: Vec<(String, String)>,
    options: MigrateRequest,
    concurrency: usize,
) -> BatchPlan {
    BatchPlan {
        name: batch.to_string(),
        concurrency,
        items: pairs
            .into_iter()
            .map(|(export, to)| BatchItem {
                export,
                source: None,
                to,
            })
            .collect(),
        options,
        seed_sync: None,
    }
}

/// `ferry migrate --batch ... --api MANAGER` (or `ferry seed sync ... --api MANAGER`): hands
/// `plan` to the active manager (a standby answers with a redirect naming it), then follows
/// the batch until every item is final.
pub fn drive_batch(
    client: &Client,
    plan: &BatchPlan,
    no_wait: bool,
    json: bool,
) -> Result<(), CliError> {
    let batch = plan.name.as_str();
    let peer = client
        .manager_status()
        .ok()
        .map(|status| status.peer.address);
    let mut view = client
        .manager_submit_batch(plan, false)
        .map_err(CliError::Api)?;
    let mut managers = vec![client.for_address(&client_addr(client))];
    managers.extend(peer.map(|addr| client.for_address(&addr)));
    let mut printed: Vec<String> = Vec::new();
    loop {
        let lines = batch_lines(&view);
        for line in lines.iter().filter(|line| !printed.contains(line)) {
            if !json {
                println!("{line}");
            }
        }
        printed = lines;
        if view.done || no_wait {
            break;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
        // After a failover the other manager knows the plan too: ask whichever answers.
        match managers
            .iter()
            .find_map(|manager| manager.manager_batch(batch).ok())
        {
            Some(next) => view = next,
            None => eprintln!("ferry: no manager answers about batch {batch} (retrying)"),
        }
    }
    if json {
        print_json(&view);
    }
    let failed = view
        .items
        .iter()
        .filter(|item| item.state != "migrated" && item.state != "in-sync")
        .count();
    if view.done && failed > 0 {
        return Err(CliError::BatchFailed {
            batch: batch.to_string(),
            failed,
            total: view.items.len(),
        });
    }
    Ok(())
}

fn batch_lines(view: &BatchView) -> Vec<String> {
    view.items
        .iter()
        .map(|item| {
            let job = item.job.as_deref().unwrap_or("-");
            let why = item
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            format!(
                "{} {} -> {} [{job}]: {}{why}",
                item.export, item.source, item.to, item.state
            )
        })
        .collect()
}

fn client_addr(client: &Client) -> String {
    client.addr().to_string()
}
