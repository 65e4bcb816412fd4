//! `ferry export`, `ferry tracker` and `ferry heat`: manage what an agent serves and tracks,
//! and show the write heat.

use super::{client, print_json, ApiTarget, CliError, ExportAction, TrackerAction};
use crate::api::render;
use crate::api::types::{ExportSpec, TrackerAdd};
use crate::units::parse_size;

/// `ferry export add|ls|rm|gc`.
pub fn export(action: ExportAction, target: &ApiTarget) -> Result<(), CliError> {
    let client = client(target)?;
    match action {
        ExportAction::Add {
            name,
            path,
            read_only,
            granularity,
            trackers,
        } => {
            let granularity_bytes = parse_size(&granularity).map_err(|source| CliError::Size {
                flag: "--granularity",
                source,
            })?;
            // The agent's working directory is `/`: it gets an absolute path.
            let path = std::fs::canonicalize(&path).map_err(|source| CliError::File {
                flag: "image",
                path,
                source,
            })?;
            let spec = ExportSpec {
                name,
                path,
                read_only,
                granularity_bytes,
                trackers,
            };
            let status = client.add_export(&spec)?;
            if target.json {
                print_json(&status);
            } else {
                print!("{}", render::exports_table(&[status]));
            }
        }
        ExportAction::Ls => {
            let exports = client.exports()?;
            if target.json {
                print_json(&exports);
            } else {
                print!("{}", render::exports_table(&exports));
            }
        }
        ExportAction::Rm { name, force } => client.remove_export(&name, force)?,
        ExportAction::Gc { dry_run } => {
            let images = client.collect_stale(dry_run)?;
            if target.json {
                print_json(&images);
            } else {
                print!("{}", render::stale_images(&images, dry_run));
            }
        }
    }
    Ok(())
}

/// `ferry tracker add|ls|rm`.
pub fn tracker(action: TrackerAction, target: &ApiTarget) -> Result<(), CliError> {
    let client = client(target)?;
    match action {
        TrackerAction::Add {
            export,
            name,
            granularity,
            half_life_ms,
            durable,
        } => {
            let granularity_bytes = granularity
                .map(|text| parse_size(&text))
                .transpose()
                .map_err(|source| CliError::Size {
                    flag: "--granularity",
                    source,
                })?;
            let add = TrackerAdd {
                name,
                granularity_bytes,
                half_life_ms,
                durable,
            };
            let status = client.add_tracker(&export, &add)?;
            if target.json {
                print_json(&status);
            } else {
                print!("{}", render::trackers_table(&[status]));
            }
        }
        TrackerAction::Ls { export } => {
            let trackers = client.trackers(&export)?;
            if target.json {
                print_json(&trackers);
            } else {
                print!("{}", render::trackers_table(&trackers));
            }
        }
        TrackerAction::Rm { export, name } => client.remove_tracker(&export, &name)?,
    }
    Ok(())
}

/// `ferry heat EXPORT`: the heat map in `width` x `rows` cells.
pub fn heat(
    export: &str,
    tracker: Option<&str>,
    width: usize,
    rows: usize,
    target: &ApiTarget,
) -> Result<(), CliError> {
    let client = client(target)?;
    let (width, rows) = (width.max(1), rows.max(1));
    let map = client.heat(export, tracker, width * rows)?;
    if target.json {
        print_json(&map);
    } else {
        let color = std::io::IsTerminal::is_terminal(&std::io::stdout());
        print!("{}", render::heat_map(&map, width, color));
    }
    Ok(())
}
