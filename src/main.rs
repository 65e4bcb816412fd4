//! The `ferry` binary: parses the command line, sets up logging, runs the subcommand, and
//! turns errors into a message (with its cause chain) and an exit code.

use std::process::ExitCode;

use clap::Parser;

use ferry::agent::config::{parse_size, AgentConfig, Overrides};
use ferry::api::types::{ExportSpec, JobPhase, MigrateRequest, TrackerAdd};
use ferry::api::{render, token, Client};
use ferry::cli::{ApiTarget, Cli, Command, ExportAction, TrackerAction};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ferry: {}", ferry::error::error_chain(err.as_ref()));
            ExitCode::FAILURE
        }
    }
}

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Agent(args) => {
            let overrides = Overrides {
                socket: args.socket,
                tcp: args.tcp,
                state_dir: args.state_dir,
                api: args.api,
                engine: args.engine,
                exports: args.exports,
                granularity: args.granularity,
                transfer: args.transfer,
                cluster_key: args.cluster_key,
                image_dir: args.image_dir,
            };
            let config = AgentConfig::load(args.config.as_deref(), &overrides)?;
            ferry::agent::run(&config)?;
            Ok(())
        }
        Command::Export { action, target } => export(action, &target),
        Command::Tracker { action, target } => tracker(action, &target),
        Command::Heat {
            export,
            tracker,
            width,
            rows,
            target,
        } => {
            let client = client(&target)?;
            let map = client.heat(&export, tracker.as_deref(), width.max(1) * rows.max(1))?;
            if target.json {
                println!("{}", serde_json::to_string_pretty(&map)?);
            } else {
                let color = std::io::IsTerminal::is_terminal(&std::io::stdout());
                print!("{}", render::heat_map(&map, width.max(1), color));
            }
            Ok(())
        }
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
            mirror,
            target,
        } => {
            let client = client(&target)?;
            let bandwidth_bytes_per_s = bandwidth
                .map(|b| {
                    parse_size(b.trim_end_matches("/s")).map_err(|p| format!("--bandwidth: {p}"))
                })
                .transpose()?;
            let request = MigrateRequest {
                to: to.clone().unwrap_or_default(),
                policy: Some(policy),
                max_pause_ms: Some(max_pause),
                target_pause_ms: None,
                force_after_ms: force_after,
                bandwidth_bytes_per_s,
                hot_threshold: None,
                verify,
                yield_to_guest,
                mirror,
                batch: batch.clone(),
                resume_job: None,
            };
            let mut pairs: Vec<(String, String)> = match &plan {
                Some(path) => ferry::api::batch::parse_plan(
                    &std::fs::read_to_string(path)
                        .map_err(|err| format!("--plan {}: {err}", path.display()))?,
                )?,
                None => Vec::new(),
            };
            if let Some(to) = &to {
                pairs.extend(exports.iter().map(|export| (export.clone(), to.clone())));
            }
            if pairs.is_empty() {
                return Err("name an export (or give --plan)".into());
            }
            if pairs.len() == 1 && batch.is_none() && plan.is_none() {
                return migrate_one(&client, &pairs[0].0, request, no_wait, target.json);
            }
            let batch = batch.unwrap_or_else(|| {
                let secs = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                format!("batch-{secs}")
            });
            let items = pairs
                .into_iter()
                .map(|(export, to)| ferry::api::batch::Item {
                    export,
                    request: MigrateRequest {
                        to,
                        batch: Some(batch.clone()),
                        ..request.clone()
                    },
                })
                .collect();
            run_batch(&client, &batch, items, concurrency, target.json)
        }
        Command::Resume {
            batch,
            concurrency,
            target,
        } => {
            let client = client(&target)?;
            let views = batch_jobs(&target, &batch)?;
            let items: Vec<_> = views
                .iter()
                .filter_map(|view| match &view.side {
                    ferry::journal::Side::Source(source)
                        if source.phase == ferry::journal::SourcePhase::Copying =>
                    {
                        Some(ferry::api::batch::Item {
                            export: view.export.clone(),
                            request: MigrateRequest {
                                to: source.destination.clone(),
                                policy: Some(source.policy.to_string()),
                                max_pause_ms: None,
                                target_pause_ms: None,
                                force_after_ms: None,
                                bandwidth_bytes_per_s: None,
                                hot_threshold: None,
                                verify: false,
                                yield_to_guest: false,
                                mirror: false,
                                batch: Some(batch.clone()),
                                resume_job: Some(view.job_id),
                            },
                        })
                    }
                    _ => None,
                })
                .collect();
            if items.is_empty() {
                if target.json {
                    println!("[]");
                } else {
                    println!("batch {batch}: nothing to resume");
                }
                return Ok(());
            }
            run_batch(&client, &batch, items, concurrency, target.json)
        }
        Command::Abort { batch, target } => {
            let client = client(&target)?;
            let mut outcomes = Vec::new();
            for view in batch_jobs(&target, &batch)? {
                let abortable = matches!(
                    &view.side,
                    ferry::journal::Side::Source(source) if matches!(
                        source.phase,
                        ferry::journal::SourcePhase::Copying | ferry::journal::SourcePhase::Aborted
                    )
                );
                if abortable {
                    outcomes.push(client.abort_job(view.job_id)?);
                }
            }
            if target.json {
                println!("{}", serde_json::to_string_pretty(&outcomes)?);
            } else if outcomes.is_empty() {
                println!("batch {batch}: nothing to abort");
            } else {
                for outcome in &outcomes {
                    println!(
                        "job {} ({}): source {}, destination {}",
                        outcome.job_id, outcome.export, outcome.source, outcome.destination
                    );
                }
            }
            Ok(())
        }
        Command::Jobs { id, target } => {
            let client = client(&target)?;
            let jobs = match id {
                Some(id) => vec![client.job(id)?],
                None => client.jobs()?,
            };
            if target.json {
                println!("{}", serde_json::to_string_pretty(&jobs)?);
            } else {
                for job in &jobs {
                    print!("{}", ferry::api::view::render(job));
                }
            }
            Ok(())
        }
        Command::Status {
            batch,
            cluster_key,
            target,
        } => {
            let key_path = cluster_key.unwrap_or_else(|| target.state_dir.join("cluster.key"));
            let key = match ferry::transfer::ClusterKey::load(&key_path) {
                Ok(key) => Some(key),
                Err(err) => {
                    eprintln!("ferry: cannot read the cluster key ({err}); destinations not asked");
                    None
                }
            };
            let journal = target.state_dir.join(ferry::journal::shared::FILE_NAME);
            let lines = ferry::journal::status::gather(&journal, key.as_ref(), batch.as_deref())?;
            if target.json {
                println!("{}", serde_json::to_string_pretty(&lines)?);
            } else {
                print!("{}", ferry::journal::status::render(&lines));
            }
            Ok(())
        }
        Command::Demo(args) => Ok(ferry::demo::run(&args)?),
    }
}

/// One migration, followed with a progress bar (or not, with `no_wait`).
fn migrate_one(
    client: &Client,
    export: &str,
    request: MigrateRequest,
    no_wait: bool,
    json: bool,
) -> Result<()> {
    let disk_bytes = client
        .exports()?
        .iter()
        .find(|e| e.name == export)
        .map_or(0, |e| e.size_bytes);
    let started = client.migrate(export, &request)?;
    let status = if no_wait {
        started
    } else {
        let bar = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
        ferry::api::view::follow(client, started.id, disk_bytes, bar)?
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print!("{}", ferry::api::view::render(&status));
    }
    if status.phase == JobPhase::Failed {
        return Err(format!("migration of {export} failed").into());
    }
    Ok(())
}

/// Runs a batch's items and prints each job as it ends (or every status as JSON).
fn run_batch(
    client: &Client,
    batch: &str,
    items: Vec<ferry::api::batch::Item>,
    concurrency: usize,
    json: bool,
) -> Result<()> {
    let statuses = ferry::api::batch::run(client, items, concurrency, |status| {
        if !json {
            println!(
                "batch {batch}: job {} {} -> {}: {:?}, {} authoritative{}",
                status.id,
                status.export,
                status.to,
                status.phase,
                status.authoritative,
                status
                    .error
                    .as_deref()
                    .map(|err| format!(" ({err})"))
                    .unwrap_or_default()
            );
        }
    })?;
    if json {
        println!("{}", serde_json::to_string_pretty(&statuses)?);
    }
    let failed = statuses
        .iter()
        .filter(|status| status.phase == JobPhase::Failed)
        .count();
    if failed > 0 {
        return Err(format!(
            "batch {batch}: {failed} of {} migrations failed",
            statuses.len()
        )
        .into());
    }
    Ok(())
}

/// The jobs of `batch` in the journal of the agent whose state directory `target` names.
fn batch_jobs(target: &ApiTarget, batch: &str) -> Result<Vec<ferry::journal::JobView>> {
    let path = target.state_dir.join(ferry::journal::shared::FILE_NAME);
    let replay = ferry::journal::Journal::inspect(&path)?;
    let jobs = ferry::journal::fold(&replay.entries)?;
    Ok(jobs
        .into_values()
        .filter(|view| view.batch.as_deref() == Some(batch))
        .collect())
}

fn client(target: &ApiTarget) -> Result<Client> {
    let path = target
        .token_file
        .clone()
        .unwrap_or_else(|| target.state_dir.join("api.token"));
    let token = token::read(&path)
        .map_err(|err| format!("cannot read the API token from {}: {err}", path.display()))?;
    Ok(Client::new(&target.api, Some(token)))
}

fn export(action: ExportAction, target: &ApiTarget) -> Result<()> {
    let client = client(target)?;
    match action {
        ExportAction::Add {
            name,
            path,
            read_only,
            granularity,
            trackers,
        } => {
            let granularity_bytes =
                parse_size(&granularity).map_err(|p| format!("--granularity: {p}"))?;
            let path =
                std::fs::canonicalize(&path).map_err(|err| format!("{}: {err}", path.display()))?;
            let spec = ExportSpec {
                name,
                path,
                read_only,
                granularity_bytes,
                trackers,
            };
            let status = client.add_export(&spec)?;
            if target.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render::exports_table(&[status]));
            }
        }
        ExportAction::Ls => {
            let exports = client.exports()?;
            if target.json {
                println!("{}", serde_json::to_string_pretty(&exports)?);
            } else {
                print!("{}", render::exports_table(&exports));
            }
        }
        ExportAction::Rm { name, force } => client.remove_export(&name, force)?,
    }
    Ok(())
}

fn tracker(action: TrackerAction, target: &ApiTarget) -> Result<()> {
    let client = client(target)?;
    match action {
        TrackerAction::Add {
            export,
            name,
            granularity,
            half_life_ms,
        } => {
            let granularity_bytes = granularity
                .map(|g| parse_size(&g).map_err(|p| format!("--granularity: {p}")))
                .transpose()?;
            let status = client.add_tracker(
                &export,
                &TrackerAdd {
                    name,
                    granularity_bytes,
                    half_life_ms,
                },
            )?;
            if target.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", render::trackers_table(&[status]));
            }
        }
        TrackerAction::Ls { export } => {
            let trackers = client.trackers(&export)?;
            if target.json {
                println!("{}", serde_json::to_string_pretty(&trackers)?);
            } else {
                print!("{}", render::trackers_table(&trackers));
            }
        }
        TrackerAction::Rm { export, name } => client.remove_tracker(&export, &name)?,
    }
    Ok(())
}
