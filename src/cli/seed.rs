//! `ferry seed`: each action one API call (export and import followed with a progress bar:
//! bytes, rate, ETA), then a rendering or JSON.

use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use super::{client, print_json, ApiTarget, CliError, SeedAction};
use crate::api::render::human_bytes;
use crate::api::types::{
    JobPhase, JobStatus, SeedExportRequest, SeedImportRequest, SeedInfo, SeedInspectRequest,
    SeedRunStatus, SeedSyncRequest, SyncThen,
};
use crate::api::{view, Client};

/// How often a followed run is polled.
const POLL: Duration = Duration::from_millis(200);

/// Runs one `ferry seed` action.
pub fn seed(action: SeedAction, target: &ApiTarget) -> Result<(), CliError> {
    let client = client(target)?;
    match action {
        SeedAction::Export {
            exports,
            media,
            max_impact,
            seed_key,
            resume,
            no_wait,
        } => {
            let request = SeedExportRequest {
                exports,
                media,
                max_impact_ms: max_impact,
                seed_key_file: seed_key,
                resume,
            };
            let started = client.seed_export(&request)?;
            finish_run(&client, started, no_wait, target.json)
        }
        SeedAction::Import {
            media,
            as_name,
            seed_key,
            no_wait,
        } => {
            let request = SeedImportRequest {
                media,
                as_name,
                seed_key_file: seed_key,
            };
            let started = client.seed_import(&request)?;
            finish_run(&client, started, no_wait, target.json)
        }
        SeedAction::Sync {
            exports,
            to,
            batch,
            threshold,
            follow,
            then,
            max_pause,
            bandwidth,
            no_wait,
        } => {
            let then = match (follow, then.as_deref()) {
                (true, _) => SyncThen::Follow,
                (false, None) => SyncThen::Stop,
                (false, Some("migrate")) => SyncThen::Migrate,
                (false, Some(_)) => return Err(CliError::Usage("--then takes `migrate`")),
            };
            let threshold_bytes = threshold
                .as_deref()
                .map(crate::units::parse_size)
                .transpose()
                .map_err(|source| CliError::Size {
                    flag: "--threshold",
                    source,
                })?;
            let request = SeedSyncRequest {
                to,
                threshold_bytes,
                then,
                max_pause_ms: max_pause,
                bandwidth_bytes_per_s: super::migrate::bandwidth(bandwidth.as_deref())?,
                manager_epoch: None,
            };
            // A manager (it answers its status) drives the catch-ups across the fleet.
            if client.manager_status().is_ok() {
                return sync_by_manager(&client, exports, request, batch, no_wait, target.json);
            }
            let [export] = exports.as_slice() else {
                return Err(CliError::Usage(
                    "one export per sync (several: against a manager, --api MANAGER)",
                ));
            };
            sync(&client, export, &request, no_wait, target.json)
        }
        SeedAction::Stop { id } => {
            if let Ok(job) = id.parse::<u64>() {
                let status = client.stop_job(job)?;
                println!(
                    "job {job}: stopping after its current pass ({:?})",
                    status.phase
                );
                return Ok(());
            }
            let status = client.seed_stop(&id)?;
            println!("seed {}: {} stopping", status.seed_id, status.kind);
            Ok(())
        }
        SeedAction::Ls { media, seed_key } => {
            inspect(&client, media, seed_key, false, false, target)
        }
        SeedAction::Show { media, seed_key } => {
            inspect(&client, media, seed_key, true, false, target)
        }
        SeedAction::Verify { media, seed_key } => {
            inspect(&client, media, seed_key, true, true, target)
        }
    }
}

/// Follows a seed run to its end (unless `no_wait`) and prints it.
fn finish_run(
    client: &Client,
    started: SeedRunStatus,
    no_wait: bool,
    json: bool,
) -> Result<(), CliError> {
    let status = if no_wait {
        started
    } else {
        let bar = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
        follow_run(client, &started.seed_id, started.total_bytes, bar)?
    };
    if json {
        print_json(&run_json(&status));
    } else {
        print!("{}", render_run(&status));
    }
    match status.state.as_str() {
        "failed" => Err(CliError::SeedFailed {
            seed_id: status.seed_id,
            message: status.error.unwrap_or_default(),
        }),
        _ => Ok(()),
    }
}

/// Polls a run until it is no longer running, with a bar of bytes, rate and ETA.
fn follow_run(
    client: &Client,
    seed_id: &str,
    total_bytes: u64,
    bar: bool,
) -> Result<SeedRunStatus, CliError> {
    let progress = if bar {
        ProgressBar::new(total_bytes.max(1))
    } else {
        ProgressBar::hidden()
    };
    progress.set_style(
        ProgressStyle::with_template(
            "{spinner} volume {prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("constant template")
        .progress_chars("=> "),
    );
    loop {
        let status = client.seed(seed_id)?;
        progress.set_prefix(status.volume.to_string());
        progress.set_position(status.data_bytes + status.zero_bytes);
        if status.state != "running" {
            progress.finish_and_clear();
            return Ok(status);
        }
        std::thread::sleep(POLL);
    }
}

/// The run as JSON, with the byte counts also under the names scripts use.
fn run_json(status: &SeedRunStatus) -> serde_json::Value {
    let mut value = serde_json::to_value(status).expect("a status serializes");
    if let Some(object) = value.as_object_mut() {
        object.insert("bytes_data".into(), status.data_bytes.into());
        object.insert("bytes_zero".into(), status.zero_bytes.into());
        object.insert("bytes_media".into(), status.media_bytes.into());
        object.insert("bytes_verified".into(), status.data_bytes.into());
    }
    value
}

/// A run on a few lines.
fn render_run(status: &SeedRunStatus) -> String {
    let mut out = format!(
        "seed {}: {} {} in {:.1} s: {} data, {} zeros, {} on the media\n",
        status.seed_id,
        status.kind,
        status.state,
        status.elapsed_ms / 1000.0,
        human_bytes(status.data_bytes),
        human_bytes(status.zero_bytes),
        human_bytes(status.media_bytes),
    );
    for disk in &status.disks {
        out.push_str(&format!(
            "  {} (job {}, {}){}\n",
            disk.export,
            disk.job_id,
            human_bytes(disk.size_bytes),
            disk.image_path
                .as_ref()
                .map(|path| format!(" -> {}", path.display()))
                .unwrap_or_default()
        ));
    }
    for volume in &status.volumes {
        out.push_str(&format!("  volume {}\n", volume.display()));
    }
    if let Some(error) = &status.error {
        out.push_str(&format!("  error: {error}\n"));
    }
    out
}

/// Starts a catch-up and follows it to its in-sync point (or its switchover).
/// `ferry seed sync EXPORTS --to HOST --api MANAGER`: a seed-sync plan the active manager
/// drives (every item at once; a `--follow` plan is never final, so it is not waited for).
fn sync_by_manager(
    client: &Client,
    exports: Vec<String>,
    request: SeedSyncRequest,
    batch: Option<String>,
    no_wait: bool,
    json: bool,
) -> Result<(), CliError> {
    let batch = batch.unwrap_or_else(|| format!("seed-sync-{}", crate::env::unix_ms() / 1000));
    let pairs = exports
        .into_iter()
        .map(|export| (export, request.to.clone()))
        .collect::<Vec<_>>();
    let concurrency = pairs.len().min(64);
    let options = crate::api::types::MigrateRequest::new(&request.to);
    let mut plan = super::manager::batch_plan(&batch, pairs, options, concurrency);
    let follow = request.then == SyncThen::Follow;
    plan.seed_sync = Some(request);
    super::manager::drive_batch(client, &plan, no_wait || follow, json)
}

fn sync(
    client: &Client,
    export: &str,
    request: &SeedSyncRequest,
    no_wait: bool,
    json: bool,
) -> Result<(), CliError> {
    let started = client.seed_sync(export, request)?;
    let status = if no_wait || request.then == SyncThen::Follow {
        started
    } else {
        let bar = !json && std::io::IsTerminal::is_terminal(&std::io::stderr());
        view::follow(client, started.id, 0, bar)?
    };
    if json {
        print_json(&sync_json(&status));
    } else {
        print!("{}", view::render(&status));
        if let Some(sync) = &status.sync {
            println!(
                "seed {}: {}, {} in-sync point(s), {} sent, {} read at the source{}",
                sync.seed_id,
                sync.state,
                sync.in_sync_points,
                human_bytes(sync.bytes_sent),
                human_bytes(sync.bytes_read),
                if sync.compared_all {
                    " (no tracker to trust: digests of every block compared)"
                } else {
                    ""
                }
            );
        }
    }
    if status.phase == JobPhase::Failed {
        return Err(CliError::MigrationFailed {
            export: export.to_string(),
        });
    }
    Ok(())
}

/// The job with the catch-up's figures at the top level.
fn sync_json(status: &JobStatus) -> serde_json::Value {
    let sync = status.sync.clone().unwrap_or_default();
    let report = status.report.as_ref();
    serde_json::json!({
        "job_id": status.id,
        "seed_id": sync.seed_id,
        "state": sync.state,
        "phase": status.phase,
        "elapsed_ms": status.elapsed_s * 1000.0,
        "bytes_sent": sync.bytes_sent,
        "bytes_read": sync.bytes_read,
        "in_sync_points": sync.in_sync_points,
        "compared_all": sync.compared_all,
        "passes": report.map_or(0, |report| report.passes.len()),
        "pause_ms": report.map_or(0.0, |report| report.pause_ms),
        "error": status.error,
        "job": status,
    })
}

/// `seed ls|show|verify`.
fn inspect(
    client: &Client,
    media: Vec<std::path::PathBuf>,
    seed_key: Option<std::path::PathBuf>,
    disks: bool,
    verify: bool,
    target: &ApiTarget,
) -> Result<(), CliError> {
    let info = client.seed_inspect(&SeedInspectRequest {
        media,
        verify,
        seed_key_file: seed_key,
    })?;
    if target.json {
        print_json(&info);
    } else {
        print!("{}", render_info(&info, disks));
    }
    let bad = info.verified == Some(false) || (disks && !info.complete);
    if bad {
        return Err(CliError::SeedFailed {
            seed_id: info.seed_id,
            message: info.problems.join("; "),
        });
    }
    Ok(())
}

/// What is on the media.
fn render_info(info: &SeedInfo, disks: bool) -> String {
    let mut out = format!("seed {}\n", info.seed_id);
    for volume in &info.volumes {
        out.push_str(&format!(
            "  volume {} {} ({})\n",
            volume.volume,
            volume.path.display(),
            volume.state
        ));
    }
    if disks {
        for disk in &info.disks {
            out.push_str(&format!(
                "  disk {} ({}, job {}): {} data, {} zeros, copied {}..{} (Unix ms)\n",
                disk.export,
                human_bytes(disk.size_bytes),
                disk.job_id,
                human_bytes(disk.data_bytes),
                human_bytes(disk.zero_bytes),
                disk.start_unix_ms,
                disk.end_unix_ms
            ));
        }
        out.push_str(if info.complete {
            "  every volume present, every disk covered\n"
        } else {
            "  INCOMPLETE or unreadable\n"
        });
    }
    match info.verified {
        Some(true) => out.push_str("  every chunk verified\n"),
        Some(false) => out.push_str("  VERIFICATION FAILED\n"),
        None => {}
    }
    for problem in &info.problems {
        out.push_str(&format!("  problem: {problem}\n"));
    }
    out
}
