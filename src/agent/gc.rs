//! `ferry export gc`: the images migrations left stale here (renamed `<file>.stale-<job>` at
//! each switchover away), found by replaying the journal's moves of every served export
//! from the path it was configured with, listed, and removed on request.
//!
//! Invariants: only a path the moves name as stale is ever removed, and only a regular file
//! (never a symlink, directory or device); never an image an export serves locally; a
//! forwarding export whose stale image is removed closes it and keeps forwarding (a
//! restart opens it without an image, `Exports::open`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::api::types::StaleImage;
use crate::disk::{stale_path, Export};
use crate::journal::SharedJournal;

use super::exports::Exports;
use super::moves::{moves, Move};

/// The stale images of the served exports: (export, path, job) for every switchover away
/// the journal records, in journal order.
pub fn stale_paths(journal: &SharedJournal, exports: &Exports) -> Vec<(String, PathBuf, u64)> {
    let all_moves = moves(journal);
    let mut stale = Vec::new();
    for (name, configured) in exports.configured_paths() {
        let mut image = configured;
        for step in all_moves.get(&name).into_iter().flatten() {
            match step {
                Move::Retired { job_id, .. } => {
                    image = stale_path(&image, *job_id);
                    stale.push((name.clone(), image.clone(), *job_id));
                }
                Move::Home { image: home } => image.clone_from(home),
            }
        }
    }
    stale
}

/// Lists the stale images that exist, and removes them unless `dry_run`.
pub fn collect(journal: &SharedJournal, exports: &Exports, dry_run: bool) -> Vec<StaleImage> {
    let mut report = Vec::new();
    for (name, path, job_id) in stale_paths(journal, exports) {
        let Ok(meta) = path.symlink_metadata() else {
            continue; // removed already, or never renamed
        };
        let mut image = StaleImage {
            export: name.clone(),
            path: path.clone(),
            job_id,
            allocated_bytes: meta.blocks().saturating_mul(512),
            removed: false,
            kept_because: None,
        };
        let export = exports.export(&name);
        image.kept_because = if !meta.file_type().is_file() {
            Some("not a regular file".into())
        } else if export.as_deref().is_some_and(|e| serves_locally(e, &path)) {
            Some("the export serves it".into())
        } else {
            None
        };
        if image.kept_because.is_none() && !dry_run {
            match remove(export.as_deref(), &path) {
                Ok(()) => image.removed = true,
                Err(err) => image.kept_because = Some(format!("cannot remove it: {err}")),
            }
        }
        report.push(image);
    }
    report
}

/// Whether `export` reads `path` as its disk (it never should a stale one; checked anyway).
fn serves_locally(export: &Export, path: &Path) -> bool {
    !export.is_forwarded() && export.path() == path
}

fn remove(export: Option<&Export>, path: &Path) -> std::io::Result<()> {
    std::fs::remove_file(path)?;
    crate::durable::sync_parent(path)?;
    log::info!("stale image {} removed", path.display());
    if let Some(export) = export.filter(|export| export.path() == path) {
        // The forwarding export held it open for its size and lock only.
        export.release_image();
    }
    Ok(())
}
