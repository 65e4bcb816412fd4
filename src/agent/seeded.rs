//! The destination's side of a seed catch-up: which Open may continue an imported seed, what
//! the image's fingerprint says about writes outside ferry, and the seed steps the target
//! records (`journal/seed.rs`).
//!
//! Invariants:
//! - A seeded Open continues only the job whose imported seed it names: same job, same seed
//!   id, the import finished (`Imported`, `CatchingUp` or `InSync`). Anything else is refused
//!   with what this agent holds instead, and records nothing.
//! - `CatchingUp` is durable before the stream writes the image, and `InSync` after the
//!   image's fdatasync at the point: the journal never calls a half-updated image in sync.
//! - The fingerprint (inode, size, mtime, ctime) is recorded with every seed step; an Open
//!   that finds another one was preceded by a write ferry did not make (or an unclean stop
//!   mid-stream), and the source is told to compare digests of the whole disk. That Open
//!   records the fingerprint 0 (matches no image), so every later Open is told the same until
//!   an in-sync point proves the image equal again.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::journal::seed::seed_id_hex;
use crate::journal::{Record, Role, SeedStep, SharedJournal, Side, TargetPhase};
use crate::transfer::{TargetError, TargetSpec};

/// The fingerprint of the image at `path` (0 when it cannot be read: never equal to a real
/// one, so it counts as changed).
pub fn fingerprint(path: &Path) -> u64 {
    let Ok(meta) = path.symlink_metadata() else {
        return 0;
    };
    let mut hasher = blake3::Hasher::new();
    for field in [
        meta.ino(),
        meta.size(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
        meta.ctime() as u64,
        meta.ctime_nsec() as u64,
    ] {
        hasher.update(&field.to_le_bytes());
    }
    let digest = hasher.finalize();
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest.as_bytes()[..8]);
    u64::from_le_bytes(bytes).max(1)
}

/// `spec` as this agent knows its seeded job: under the export name the seed was imported
/// as (`seed import --as`). Unseeded specs pass unchanged.
pub fn resolve(journal: &SharedJournal, spec: TargetSpec) -> Result<TargetSpec, TargetError> {
    let Some(seed_id) = spec.seed else {
        return Ok(spec);
    };
    let view = journal.view(spec.job_id, Role::Target);
    let found = view.as_ref().and_then(|view| match &view.side {
        Side::Target(target) => Some((view, target)),
        Side::Source(_) => None,
    });
    let Some((view, target)) = found else {
        return Err(no_such_seed(journal, &spec, seed_id));
    };
    let Some(seed) = &target.seed else {
        return Err(TargetError::Refused(format!(
            "job {} here is a migration, not seed {}",
            spec.job_id,
            seed_id_hex(&seed_id)
        )));
    };
    if seed.seed_id != seed_id {
        return Err(TargetError::Refused(format!(
            "job {} here holds seed {}, not seed {}",
            spec.job_id,
            seed_id_hex(&seed.seed_id),
            seed_id_hex(&seed_id)
        )));
    }
    if target.phase != TargetPhase::Receiving {
        return Err(TargetError::Refused(format!(
            "seed {} here is {}",
            seed_id_hex(&seed_id),
            target.phase.as_str()
        )));
    }
    if matches!(seed.step, SeedStep::Importing) {
        return Err(TargetError::Refused(format!(
            "seed {} is not fully imported here (finish `ferry seed import`)",
            seed_id_hex(&seed_id)
        )));
    }
    Ok(TargetSpec {
        export: view.export.clone(),
        ..spec
    })
}

/// The refusal when this agent has no seeded job `spec.job_id`: names the seeds it holds of
/// a disk of that size, so an old or foreign seed is recognised as such.
fn no_such_seed(journal: &SharedJournal, spec: &TargetSpec, seed_id: [u8; 16]) -> TargetError {
    let others: Vec<String> = journal
        .views()
        .iter()
        .filter_map(|view| match &view.side {
            Side::Target(target) if view.size_bytes == spec.size_bytes => {
                let seed = target.seed.as_ref()?;
                Some(format!(
                    "{} (export {}, job {}, {})",
                    seed_id_hex(&seed.seed_id),
                    view.export,
                    view.job_id,
                    seed.step
                ))
            }
            _ => None,
        })
        .collect();
    let held = if others.is_empty() {
        "no seed of a disk that size".to_string()
    } else {
        format!("only {}", others.join(", "))
    };
    TargetError::Refused(format!(
        "seed {} of job {} was not imported here ({held}): import it first, or export a new seed",
        seed_id_hex(&seed_id),
        spec.job_id
    ))
}

/// The seed of `job_id` here and its latest fingerprint, if it is a seeded target still
/// receiving.
fn seed_of(journal: &SharedJournal, job_id: u64) -> Option<([u8; 16], SeedStep, u64)> {
    match journal.view(job_id, Role::Target)?.side {
        Side::Target(target) if target.phase == TargetPhase::Receiving => {
            let seed = target.seed?;
            Some((seed.seed_id, seed.step, seed.fingerprint))
        }
        Side::Target(_) | Side::Source(_) => None,
    }
}

/// Whether the image was changed since ferry recorded its fingerprint.
pub fn changed_since_recorded(journal: &SharedJournal, job_id: u64, image: &Path) -> bool {
    seed_of(journal, job_id).is_some_and(|(_, _, recorded)| recorded != fingerprint(image))
}

/// Appends the target's seed step for `job_id` with the image's fingerprint now, or 0 when
/// the image is `untrusted` (changed outside ferry, no in-sync point since).
pub fn record(
    journal: &SharedJournal,
    job_id: u64,
    step: SeedStep,
    at_unix_ms: u64,
    (image, untrusted): (&Path, bool),
) -> Result<(), TargetError> {
    let Some((seed_id, _, _)) = seed_of(journal, job_id) else {
        return Err(TargetError::Refused(format!(
            "job {job_id} is not a seeded target here"
        )));
    };
    journal
        .append(&Record::TargetSeed {
            job_id,
            seed_id,
            step,
            at_unix_ms,
            fingerprint: if untrusted { 0 } else { fingerprint(image) },
        })
        .map_err(|err| TargetError::Journal(Box::new(err)))
}

/// At a stream's end: when the stream changed the image since the last step, say it is
/// catching up (with the new fingerprint), so the next Open does not take ferry's own
/// writes for someone else's.
pub fn record_stream_end(journal: &SharedJournal, job_id: u64, image: &Path) {
    let Some((_, step, recorded)) = seed_of(journal, job_id) else {
        return;
    };
    // 0: untrusted until an in-sync point; it stays so.
    if step == SeedStep::Importing || recorded == 0 || recorded == fingerprint(image) {
        return;
    }
    let now = crate::env::unix_ms();
    if let Err(err) = record(journal, job_id, SeedStep::CatchingUp, now, (image, false)) {
        log::warn!("job {job_id}: seed step not recorded: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn spec(job_id: u64, seed: Option<[u8; 16]>) -> TargetSpec {
        TargetSpec {
            export: "vm1".into(),
            size_bytes: 1 << 20,
            granularity_bytes: 4096,
            job_id,
            batch: None,
            holder: None,
            seed,
            manager_epoch: None,
        }
    }

    fn imported(
        journal: &SharedJournal,
        job_id: u64,
        name: &str,
        seed_id: [u8; 16],
        step: SeedStep,
    ) {
        let records = [
            Record::TargetCreated {
                job_id,
                batch: None,
                export: name.into(),
                size_bytes: 1 << 20,
                granularity_bytes: 4096,
                source: "seed".into(),
                image_path: PathBuf::from(format!("/nonexistent/{name}.img")),
            },
            Record::TargetSeed {
                job_id,
                seed_id,
                step: SeedStep::Importing,
                at_unix_ms: 1,
                fingerprint: 0,
            },
        ];
        for record in &records {
            journal.append(record).unwrap();
        }
        if step != SeedStep::Importing {
            let done = Record::TargetSeed {
                job_id,
                seed_id,
                step,
                at_unix_ms: 2,
                fingerprint: 7,
            };
            journal.append(&done).unwrap();
        }
    }

    #[test]
    fn a_seeded_open_continues_only_its_own_imported_seed() {
        // Goal: the seeded Open is mapped to the name the seed was imported as; another
        // seed, an unfinished import, an unknown job and a seedless host are refused, the
        // refusal naming what is held. Method: a journal with two imported seeds.
        let dir = tempfile::tempdir().unwrap();
        let journal = SharedJournal::open(dir.path()).unwrap();
        imported(&journal, 7, "db-copy", [1; 16], SeedStep::Imported);
        imported(&journal, 8, "web", [2; 16], SeedStep::Importing);
        let resolved = resolve(&journal, spec(7, Some([1; 16]))).expect("its seed");
        assert_eq!(resolved.export, "db-copy");
        let plain = resolve(&journal, spec(7, None)).expect("no seed: unchanged");
        assert_eq!(plain.export, "vm1");
        let other = resolve(&journal, spec(7, Some([3; 16])))
            .unwrap_err()
            .to_string();
        assert!(other.contains(&seed_id_hex(&[1; 16])), "{other}");
        let unfinished = resolve(&journal, spec(8, Some([2; 16])))
            .unwrap_err()
            .to_string();
        assert!(unfinished.contains("not fully imported"), "{unfinished}");
        let unknown = resolve(&journal, spec(9, Some([4; 16])))
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("was not imported here"), "{unknown}");
        assert!(
            unknown.contains(&seed_id_hex(&[1; 16])),
            "names what is held: {unknown}"
        );
    }

    #[test]
    fn fingerprints_change_with_the_file() {
        // Goal: a write outside ferry changes the fingerprint; an absent file is never equal.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"one").unwrap();
        let before = fingerprint(&path);
        assert_eq!(before, fingerprint(&path));
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&path, b"two").unwrap();
        assert_ne!(before, fingerprint(&path));
        assert_eq!(fingerprint(&dir.path().join("absent")), 0);
    }
}
