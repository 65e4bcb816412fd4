//! What the agent's journal says, for the control API: the `ferry status` verdicts
//! (`GET /v1/status`), the journal's jobs (`GET /v1/journal/jobs`, what `ferry resume` and
//! `ferry abort` pick from), and the settings a resumed job continues with.
//!
//! Free functions of the journal and the cluster key the agent's migrations hold, so that the
//! `Control` methods only delegate here.
//!
//! Invariants: a verdict comes from both journals (the destination is asked, never
//! guessed: [`crate::journal::status::judge`]); a batch name is checked by the API before it
//! gets here; an agent without a journal answers "no journal", never an empty list that
//! would read as "nothing was migrated".

use crate::api::types::{DiskStatus, Forwarding, JournalJob, MigrateRequest};
use crate::api::ControlError;
use std::collections::BTreeMap;

use crate::journal::{Role, SharedJournal, Side, SourcePhase};
use crate::transfer::ClusterKey;

/// `ferry status [BATCH]` as this agent sees it: each job of its journal (of `batch` only,
/// if given), judged with what its destination answers (asked with `key`).
pub fn disks(
    journal: Option<&SharedJournal>,
    key: Option<&ClusterKey>,
    batch: Option<&str>,
) -> Result<Vec<DiskStatus>, ControlError> {
    let journal = journal.ok_or_else(no_journal)?;
    let views = journal.views();
    Ok(crate::journal::status::judge(&views, key, batch))
}

/// Puts what each export forwarded now does (`forwarding_of` its name: where, since when,
/// holding) on the line of its newest switched source job among `lines`: the job whose
/// switchover made it forward. Other lines are left alone.
pub fn attach_forwarding(
    lines: &mut [DiskStatus],
    forwarding_of: impl Fn(&str) -> Option<Forwarding>,
) {
    let switched = |line: &DiskStatus| {
        line.role == Role::Source.as_str() && line.phase == SourcePhase::Switched.as_str()
    };
    let mut newest: BTreeMap<String, u64> = BTreeMap::new();
    for line in lines.iter().filter(|line| switched(line)) {
        let job_id = newest.entry(line.export.clone()).or_insert(line.job_id);
        *job_id = (*job_id).max(line.job_id);
    }
    for line in lines.iter_mut().filter(|line| switched(line)) {
        if newest.get(&line.export) == Some(&line.job_id) {
            line.forwarding = forwarding_of(&line.export);
        }
    }
}

/// The jobs of this agent's journal (of `batch` only, if given), oldest id first.
pub fn journal_jobs(
    journal: Option<&SharedJournal>,
    batch: Option<&str>,
) -> Result<Vec<JournalJob>, ControlError> {
    let journal = journal.ok_or_else(no_journal)?;
    Ok(journal
        .views()
        .iter()
        .filter(|view| batch.is_none_or(|batch| view.batch.as_deref() == Some(batch)))
        .map(JournalJob::of)
        .collect())
}

/// `request` with the options it leaves out taken from the settings journaled for the job
/// it resumes ([`MigrateRequest::resumed_with`]). A job journaled before settings were
/// keeps only its policy (from `SourceStarted`) and runs with the defaults otherwise, as it
/// did then. A request that resumes nothing, or a job this journal does not know as a
/// source, is left alone (the registry refuses the latter).
pub fn with_journaled_settings(
    journal: Option<&SharedJournal>,
    request: MigrateRequest,
) -> MigrateRequest {
    let view = request
        .resume_job
        .and_then(|job_id| journal?.view(job_id, Role::Source));
    let Some(view) = view else {
        return request;
    };
    // The granularity is the job's geometry (its tracker's bits, the destination's received
    // blocks, its journal records): a resume keeps the journaled one, whatever was asked.
    let request = MigrateRequest {
        granularity_bytes: Some(view.granularity_bytes),
        ..request
    };
    match view.side {
        Side::Source(source) => match &source.settings {
            Some(settings) => request.resumed_with(settings),
            None => MigrateRequest {
                policy: request
                    .policy
                    .or_else(|| Some(source.policy.as_str().to_string())),
                ..request
            },
        },
        Side::Target(_) => request,
    }
}

#[cold]
fn no_journal() -> ControlError {
    ControlError::NotFound("this agent keeps no journal".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{JobSettings, Record};
    use crate::migrate::Policy;

    fn journal_with(records: &[Record]) -> (tempfile::TempDir, SharedJournal) {
        let dir = tempfile::tempdir().expect("tempdir");
        let journal = SharedJournal::open(dir.path()).expect("open");
        for record in records {
            journal.append(record).expect("append");
        }
        (dir, journal)
    }

    fn started(job_id: u64, batch: &str) -> Record {
        Record::SourceStarted {
            job_id,
            batch: Some(batch.into()),
            export: format!("vm{job_id}"),
            size_bytes: 1 << 20,
            granularity_bytes: 64 << 10,
            destination: "127.0.0.1:9".into(),
            policy: Policy::Heat,
        }
    }

    fn capped(job_id: u64) -> Record {
        Record::SourceSettings {
            job_id,
            settings: JobSettings::sample(Policy::Naive, 300),
        }
    }

    fn resume(job_id: u64) -> MigrateRequest {
        serde_json::from_str(&format!(r#"{{"to":"127.0.0.1:9","resume_job":{job_id}}}"#))
            .expect("request")
    }

    #[test]
    fn journal_jobs_filter_by_batch_and_carry_settings() {
        // Goal: the journal's jobs are listed per batch, with the settings of a job that
        // journaled them and none for one that did not. Method: two jobs in two batches.
        let (_dir, journal) = journal_with(&[started(1, "a"), capped(1), started(2, "b")]);
        let all = journal_jobs(Some(&journal), None).expect("jobs");
        assert_eq!(all.len(), 2);
        let a = journal_jobs(Some(&journal), Some("a")).expect("jobs");
        assert_eq!(a.len(), 1);
        assert!(a[0].resumable() && a[0].abortable());
        let cap = a[0].settings.as_ref().and_then(|s| s.bandwidth_bytes_per_s);
        assert_eq!(cap, Some(32 << 20));
        let b = journal_jobs(Some(&journal), Some("b")).expect("jobs");
        assert_eq!(b[0].settings, None);
        assert!(journal_jobs(Some(&journal), Some("c"))
            .expect("jobs")
            .is_empty());
        assert!(matches!(
            journal_jobs(None, None),
            Err(ControlError::NotFound(_))
        ));
    }

    #[test]
    fn a_resume_takes_the_journaled_settings_unless_given() {
        // Goal: the agent fills a resume request from the job's journaled settings; a fresh
        // request and a job without settings are left alone. Method: merge requests against
        // a journal with one capped job and one without settings.
        let (_dir, journal) = journal_with(&[started(1, "a"), capped(1), started(2, "a")]);
        let merged = with_journaled_settings(Some(&journal), resume(1));
        assert_eq!(merged.bandwidth_bytes_per_s, Some(32 << 20));
        assert_eq!(merged.policy.as_deref(), Some("naive"));
        assert_eq!(merged.yield_to_guest, Some(true));
        let overridden = MigrateRequest {
            bandwidth_bytes_per_s: Some(64 << 20),
            ..resume(1)
        };
        let merged = with_journaled_settings(Some(&journal), overridden);
        assert_eq!(merged.bandwidth_bytes_per_s, Some(64 << 20));
        assert_eq!(merged.max_pause_ms, Some(300));
        let unsettled = with_journaled_settings(Some(&journal), resume(2));
        assert_eq!(
            unsettled.policy.as_deref(),
            Some("heat"),
            "from SourceStarted"
        );
        assert_eq!(unsettled.bandwidth_bytes_per_s, None);
        assert_eq!(
            unsettled.granularity_bytes,
            Some(64 << 10),
            "the job's journaled granularity"
        );
        assert_eq!(unsettled.max_pause_ms, None);
        let fresh = MigrateRequest {
            resume_job: None,
            ..resume(1)
        };
        assert_eq!(
            with_journaled_settings(Some(&journal), fresh.clone()),
            fresh
        );
        assert_eq!(with_journaled_settings(None, resume(1)), resume(1));
    }

    #[test]
    fn status_without_a_key_reports_destinations_not_asked() {
        // Goal: the agent's status covers its journal's jobs of the batch; without a key no
        // destination is asked. Method: two jobs, status of one batch, no key.
        let (_dir, journal) = journal_with(&[started(1, "a"), started(2, "b")]);
        let lines = disks(Some(&journal), None, Some("a")).expect("status");
        assert_eq!(lines.len(), 1);
        assert_eq!(lines[0].job_id, 1);
        assert_eq!(lines[0].peer_state, None);
        assert!(matches!(
            disks(None, None, None),
            Err(ControlError::NotFound(_))
        ));
    }

    #[test]
    fn forwarding_goes_on_the_newest_switched_source_line() {
        // Goal: an export forwarded now is said on the line of the job that made it forward
        // (its newest switched source job), not on older or other lines, and an export that
        // does not forward gets nothing. Method: lines of two exports, one moved twice, with
        // a target line and a copying line; a lookup that forwards vm1 only.
        let line = |job_id: u64, export: &str, role: &str, phase: &str| DiskStatus {
            job_id,
            batch: None,
            export: export.into(),
            role: role.into(),
            phase: phase.into(),
            peer_state: None,
            peer_unreachable: None,
            destination_bytes: None,
            verdict: "migrated".into(),
            reason: String::new(),
            action: "none".into(),
            forwarding: None,
            seed: None,
        };
        let mut lines = vec![
            line(1, "vm1", "source", "switched"),
            line(2, "vm1", "target", "committed"),
            line(3, "vm1", "source", "switched"),
            line(4, "vm2", "source", "switched"),
            line(5, "vm1", "source", "copying"),
        ];
        let forwarding = Forwarding {
            to: "10.0.0.2:10809".into(),
            since_unix_ms: Some(1),
            holding: None,
        };
        attach_forwarding(&mut lines, |name| {
            (name == "vm1").then(|| forwarding.clone())
        });
        let forwarded: Vec<u64> = lines
            .iter()
            .filter(|line| line.forwarding.is_some())
            .map(|line| line.job_id)
            .collect();
        assert_eq!(forwarded, [3]);
    }
}
