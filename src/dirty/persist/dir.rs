//! Tracker files in a directory: saving every tracker of an export, loading them back
//! (Clean as saved, Active as lost or, for a durable tracker, recovered from its activity
//! log), and removing one tracker's files. The file format itself is in `mod.rs`.
//!
//! Invariants: the ones of `mod.rs` about directories: files are replaced atomically and each
//! directory is synced once after its files; temp files a crash left are removed; a log is
//! read only beside an Active durable tracker's file, and a log of no durable tracker is
//! removed at restore.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{decode, encode, tracker_path, FileState, TEMP_SUFFIX};
use crate::dirty::activity::extent_blocks_for;
use crate::dirty::logfile;
use crate::dirty::{DirtyError, Tracker};
use crate::durable;
use crate::env::Clock;

/// Fsyncs a directory so that renames and removals in it are durable.
fn sync_dir(dir: &Path) -> Result<(), DirtyError> {
    durable::sync_dir(dir).map_err(|source| DirtyError::Save {
        path: dir.to_owned(),
        source,
    })
}

/// What a directory entry is to us.
enum Entry {
    /// `<name>.tracker`.
    Tracker(String),
    /// `<name>.log`, a durable tracker's activity log.
    Log(String),
    /// A temp file a crashed save left.
    Temp,
    /// Anything else: left alone.
    Other,
}

/// Classifies a file name found in a tracker directory.
fn classify(file_name: &str) -> Entry {
    if file_name.ends_with(TEMP_SUFFIX) {
        Entry::Temp
    } else if let Some(name) = file_name.strip_suffix(".tracker") {
        Entry::Tracker(name.to_owned())
    } else if let Some(name) = file_name.strip_suffix(".log") {
        Entry::Log(name.to_owned())
    } else {
        Entry::Other
    }
}

/// Lists the entries of `dir` (sorted, for a deterministic order); `None` if it is missing.
fn list_dir(dir: &Path) -> Result<Option<Vec<(PathBuf, Entry)>>, DirtyError> {
    let load_error = |source| DirtyError::Load {
        path: dir.to_owned(),
        source,
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(load_error(err)),
    };
    let mut listed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(load_error)?;
        let file_name = entry.file_name();
        let kind = file_name.to_str().map_or(Entry::Other, classify);
        listed.push((entry.path(), kind));
    }
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(Some(listed))
}

/// Writes every tracker's file in `state`, removes temp files a crashed save left, then syncs
/// the directory. A missing `dir` is created when there is something to write. Files of other
/// trackers are left alone (one that failed to restore stays for inspection): removing a
/// tracker's file is [`remove_saved`]'s job.
pub(crate) fn save_all(
    dir: &Path,
    trackers: &[Arc<Tracker>],
    state: FileState,
) -> Result<(), DirtyError> {
    if trackers.is_empty() && !dir.exists() {
        return Ok(());
    }
    fs::create_dir_all(dir).map_err(|source| DirtyError::Save {
        path: dir.to_owned(),
        source,
    })?;
    for tracker in trackers {
        // The directory is synced once, below.
        write_unsynced(dir, tracker, state)?;
    }
    if state == FileState::Clean {
        // The Clean files hold every bit now; a log is read only beside an Active file.
        for tracker in trackers.iter().filter(|t| t.wants_log()) {
            tracker.close_log();
            remove_if_present(&logfile::log_path(dir, tracker.name()))?;
        }
    }
    for (path, entry) in list_dir(dir)?.unwrap_or_default() {
        if let Entry::Temp = entry {
            log::info!("removing stale temp file {}", path.display());
            fs::remove_file(&path).map_err(|source| DirtyError::Save { path, source })?;
        }
    }
    sync_dir(dir)
}

/// Writes one tracker's file in `state` (atomically, durably) into an existing `dir`.
pub(crate) fn save_one(dir: &Path, tracker: &Tracker, state: FileState) -> Result<(), DirtyError> {
    write_unsynced(dir, tracker, state)?;
    sync_dir(dir)
}

/// Replaces one tracker's file with a synced new one; the caller syncs `dir`.
fn write_unsynced(dir: &Path, tracker: &Tracker, state: FileState) -> Result<(), DirtyError> {
    let bytes = encode(tracker, state);
    durable::replace_unsynced(&tracker_path(dir, tracker.name()), &bytes).map_err(|err| {
        let (path, source) = err.into_parts();
        DirtyError::Save { path, source }
    })?;
    tracker.record_save(bytes.len() as u64);
    Ok(())
}

/// Removes `path`; whether it was there.
fn remove_if_present(path: &Path) -> Result<bool, DirtyError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(DirtyError::Save {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes the file of tracker `name` under `dir` (after the tracker was removed from its
/// set), durably; returns whether there was one. Without this, a removed tracker whose file
/// was Active would come back, lost, at the next start.
pub fn remove_saved(dir: &Path, name: &str) -> Result<bool, DirtyError> {
    let removed = remove_if_present(&tracker_path(dir, name))?;
    // After the tracker file: a log alone is never read, and is removed at restore.
    let log_removed = remove_if_present(&logfile::log_path(dir, name))?;
    if removed || log_removed {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// Loads every `<name>.tracker` under `dir` (none when `dir` is missing) into trackers for a
/// disk of `disk_bytes` bytes: Clean files as saved; Active files as lost, or, for a durable
/// tracker whose log replays, as recovered. Logs of no durable tracker are removed.
pub(crate) fn load_all(
    dir: &Path,
    disk_bytes: u64,
    clock: &Arc<dyn Clock>,
) -> Result<Vec<Tracker>, DirtyError> {
    let mut trackers = Vec::new();
    let mut logs = Vec::new();
    for (path, entry) in list_dir(dir)?.unwrap_or_default() {
        match entry {
            Entry::Tracker(file_name) => {
                trackers.push(load_one(dir, &path, &file_name, disk_bytes, clock)?);
            }
            Entry::Log(name) => logs.push((path, name)),
            Entry::Temp | Entry::Other => {}
        }
    }
    for (path, name) in logs {
        if !trackers.iter().any(|t| t.name() == name && t.wants_log()) {
            log::info!(
                "removing activity log {} of no durable tracker",
                path.display()
            );
            remove_if_present(&path)?;
        }
    }
    Ok(trackers)
}

/// Loads the tracker file at `path` (named `<file_name>.tracker`); see [`load_all`].
fn load_one(
    dir: &Path,
    path: &Path,
    file_name: &str,
    disk_bytes: u64,
    clock: &Arc<dyn Clock>,
) -> Result<Tracker, DirtyError> {
    let bytes = fs::read(path).map_err(|source| DirtyError::Load {
        path: path.to_owned(),
        source,
    })?;
    let saved = decode(path, &bytes)?;
    if saved.spec.name != file_name {
        return Err(DirtyError::Corrupt {
            path: path.to_owned(),
            problem: format!("holds tracker {:?}", saved.spec.name),
        });
    }
    if saved.disk_bytes != disk_bytes {
        return Err(DirtyError::Mismatch {
            path: path.to_owned(),
            problem: format!(
                "saved for {} bytes, disk has {disk_bytes}",
                saved.disk_bytes
            ),
        });
    }
    let tracker =
        Tracker::new(saved.spec.clone(), disk_bytes, Arc::clone(clock)).map_err(|err| {
            DirtyError::Corrupt {
                path: path.to_owned(),
                problem: err.to_string(),
            }
        })?;
    let unclean = saved.state == FileState::Active;
    if !unclean || saved.lost {
        tracker.load_saved(&saved.words, &saved.heat, saved.lost);
        if let (Some(bound_bytes), false) = (saved.recovered_bound, saved.lost) {
            tracker.set_recovered(bound_bytes);
        }
        return Ok(tracker);
    }
    if !saved.spec.durable {
        log::warn!(
            "tracker {} was in use at an unclean stop: all blocks dirty",
            path.display()
        );
        tracker.load_saved(&[], &[], true);
        return Ok(tracker);
    }
    recover(dir, &tracker, saved.recovered_bound.unwrap_or(0));
    Ok(tracker)
}

/// Rebuilds a durable tracker found Active from its log: recovered, or lost when the log is
/// missing or unusable (the error goes to the log, the tracker still loads).
fn recover(dir: &Path, tracker: &Tracker, earlier_bound_bytes: u64) {
    let path = logfile::log_path(dir, tracker.name());
    let geometry = logfile::Geometry {
        granularity_bytes: tracker.granularity_bytes(),
        disk_bytes: tracker.disk_bytes(),
        extent_blocks: extent_blocks_for(tracker.granularity_bytes()),
    };
    match logfile::replay(&path, &geometry) {
        Ok(replayed) => {
            tracker.merge(&replayed.set);
            // A second crash before the history was re-established adds its own bound.
            let bound_bytes = earlier_bound_bytes + replayed.bound_bytes;
            tracker.set_recovered(bound_bytes);
            log::warn!(
                "tracker {} was in use at an unclean stop: recovered from its activity log, \
                 {} blocks dirty, over-marking at most {bound_bytes} bytes ({} extents open, \
                 {} torn bytes ignored)",
                path.display(),
                tracker.dirty_count(),
                replayed.open_extents,
                replayed.torn_bytes
            );
        }
        Err(err) => {
            log::warn!(
                "tracker {}: {}; all blocks dirty",
                tracker.name(),
                crate::error::error_chain(&err)
            );
            tracker.load_saved(&[], &[], true);
        }
    }
}
