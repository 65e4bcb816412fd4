//! The fold: replayed records reduced to one [`JobView`] per job, and the transition rules
//! every record must obey.
//!
//! Pure: no I/O, no clock. [`check`] says whether a record may follow the journal so far,
//! [`apply`] checks and then updates, [`fold`] applies a whole replay. The journal calls
//! [`check`] before it writes a record, so a record the fold refuses never reaches the disk;
//! a replay the fold refuses therefore means a ferry bug (or a hand-edited file), and it is
//! an error naming the record, never a guess.
//!
//! Invariants (the state machine itself is in the docs of [`crate::journal`]):
//! - A job is keyed by ([`Role`], job id): an agent can be the source of its job 5 and the
//!   target of a peer's job 5 at once.
//! - Every job starts with `SourceStarted` or `TargetCreated`; a second `TargetCreated` for
//!   a job still receiving is a resume and must describe the same disk and image.
//! - A target's received set only grows, and has the job's geometry.
//! - `TargetAborted` is refused once the target committed, and `SourceAborted` once the
//!   source began a switchover it has not cancelled: aborting then could leave no side
//!   authoritative, or two.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use super::record::Entry;
use super::record::{JobSettings, Record, Role};
use super::seed::{SeedStep, SeedView};
use super::JournalError;
use crate::dirty::bitmap::checked_block_count;
use crate::dirty::DirtySet;
use crate::migrate::Policy;
use crate::transfer::{Holder, RepointOutcome};

/// Identifies a job in one agent's journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobKey {
    /// The source's job id.
    pub job_id: u64,
    /// This agent's side of the job.
    pub role: Role,
}

impl JobKey {
    /// The job `record` is about.
    pub fn of(record: &Record) -> JobKey {
        JobKey {
            job_id: record.job_id(),
            role: record.role(),
        }
    }
}

/// Where a source is in its migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourcePhase {
    /// Copy passes run (or ran until a fault): the source is authoritative.
    Copying,
    /// Writes are held and the commit was (maybe) sent: in doubt until the target answers.
    SwitchingOver,
    /// The target committed; the source forwards guest I/O to it.
    Switched,
    /// Given up before a switchover: the source stays authoritative.
    Aborted,
    /// Forwarding ended; the local image is debris, never to be served again.
    Finished,
}

/// Where a target is in its migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetPhase {
    /// Blocks arrive; the image is not served and the source is authoritative.
    Receiving,
    /// The commit point passed: the target is authoritative and served.
    Committed,
    /// Dropped: the image is debris.
    Aborted,
}

impl SourcePhase {
    /// Lower-case name, as `ferry status` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Copying => "copying",
            Self::SwitchingOver => "switching-over",
            Self::Switched => "switched",
            Self::Aborted => "aborted",
            Self::Finished => "finished",
        }
    }
}

impl TargetPhase {
    /// Lower-case name, as `ferry status` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Receiving => "receiving",
            Self::Committed => "committed",
            Self::Aborted => "aborted",
        }
    }
}

impl fmt::Display for SourcePhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for TargetPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which side holds the current disk, as far as this agent's journal can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Authority {
    /// The source: the target has not committed.
    Source,
    /// The target: it committed.
    Target,
    /// Unknown here: a source between `SourceSwitchoverBegun` and the outcome. It must ask
    /// the target (whose journal holds the commit point) before serving any write.
    InDoubt,
}

/// What a source knows of its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceView {
    /// Latest phase.
    pub phase: SourcePhase,
    /// The target agent's block-stream address.
    pub destination: String,
    /// Copy policy.
    pub policy: Policy,
    /// Where guest I/O is forwarded, once switched.
    pub forward_addr: Option<String>,
    /// Switchovers begun so far (`SourceSwitchoverBegun` records): the number of the
    /// latest attempt, which an in-doubt query names so that an answer about an earlier
    /// attempt is never taken for the current one.
    pub switchovers: u32,
    /// The settings of the latest run (`SourceSettings`); `None` in journals written before
    /// settings were journaled (a resume then uses the defaults).
    pub settings: Option<JobSettings>,
    /// Who holds the guest's connection to the disk, when it is another agent
    /// (`SourceHolder`): told at the switchover where the disk went.
    pub holder: Option<Holder>,
    /// The holder's answer (`SourceHolderTold`); until then it may forward through here.
    pub holder_told: Option<RepointOutcome>,
    /// The moves of the latest `SourceRepointed` (0: never re-pointed; `forward_addr` is
    /// then the job's own destination).
    pub repointed_moves: u32,
    /// The job's seed, when its bulk copy went to a medium (`SourceSeed`).
    pub seed: Option<SeedView>,
}

/// What a target knows of its job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetView {
    /// Latest phase.
    pub phase: TargetPhase,
    /// The source agent, as last seen (a resume may come from another address).
    pub source: String,
    /// Where the image lives.
    pub image_path: PathBuf,
    /// Blocks durably received, from the latest checkpoint; `None` before the first one
    /// and once the job is over (nothing resumes it then).
    pub received: Option<DirtySet>,
    /// How many `TargetCreated` records resumed the job after the first.
    pub resumes: u32,
    /// Who holds the guest's connection to the disk (`TargetHolder`), when another agent
    /// does; `None` when this agent does (the disk came home) or the source did not say.
    pub holder: Option<Holder>,
    /// The job's seed, when its image came from a medium (`TargetSeed`).
    pub seed: Option<SeedView>,
}

/// One side's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    /// This agent is the source.
    Source(SourceView),
    /// This agent is the target.
    Target(TargetView),
}

/// Everything one agent's journal says about one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobView {
    /// The source's job id.
    pub job_id: u64,
    /// Batch, if the job belongs to one.
    pub batch: Option<String>,
    /// The export being moved.
    pub export: String,
    /// Size of the disk.
    pub size_bytes: u64,
    /// Block size of bitmaps.
    pub granularity_bytes: u64,
    /// Role-specific state.
    pub side: Side,
    /// The latest reason recorded (a cancelled switchover, an abort).
    pub reason: Option<String>,
    /// Sequence number of the record that started the job.
    pub first_seq: u64,
    /// Sequence number of the job's latest record.
    pub last_seq: u64,
}

impl JobView {
    /// This agent's side of the job.
    pub fn role(&self) -> Role {
        match self.side {
            Side::Source(_) => Role::Source,
            Side::Target(_) => Role::Target,
        }
    }

    /// The latest phase's name.
    pub fn phase_name(&self) -> &'static str {
        match &self.side {
            Side::Source(view) => view.phase.as_str(),
            Side::Target(view) => view.phase.as_str(),
        }
    }

    /// Which side holds the disk according to this journal. Exhaustive on purpose: a new
    /// phase must decide.
    pub fn authority(&self) -> Authority {
        match &self.side {
            Side::Source(view) => match view.phase {
                SourcePhase::Copying | SourcePhase::Aborted => Authority::Source,
                SourcePhase::SwitchingOver => Authority::InDoubt,
                SourcePhase::Switched | SourcePhase::Finished => Authority::Target,
            },
            Side::Target(view) => match view.phase {
                TargetPhase::Receiving | TargetPhase::Aborted => Authority::Source,
                TargetPhase::Committed => Authority::Target,
            },
        }
    }

    /// Whether this agent has nothing left to do for the job (a switched source still
    /// forwards, so it is not over).
    pub fn is_over(&self) -> bool {
        match &self.side {
            Side::Source(view) => match view.phase {
                SourcePhase::Aborted | SourcePhase::Finished => true,
                SourcePhase::Copying | SourcePhase::SwitchingOver | SourcePhase::Switched => false,
            },
            Side::Target(view) => match view.phase {
                TargetPhase::Committed | TargetPhase::Aborted => true,
                TargetPhase::Receiving => false,
            },
        }
    }
}

/// Every job of a journal.
pub type JobViews = BTreeMap<JobKey, JobView>;

/// Reduces replayed entries to one view per job; the first record the rules refuse is an
/// error naming it.
pub fn fold<'a>(entries: impl IntoIterator<Item = &'a Entry>) -> Result<JobViews, JournalError> {
    let mut jobs = JobViews::new();
    for entry in entries {
        apply(&mut jobs, entry.seq, &entry.record)?;
    }
    Ok(jobs)
}

/// Checks `record` (number `seq`) against `jobs`, then applies it.
pub fn apply(jobs: &mut JobViews, seq: u64, record: &Record) -> Result<(), JournalError> {
    check(jobs, seq, record)?;
    update(jobs, seq, record);
    Ok(())
}

/// Whether `record` may follow the records folded into `jobs`; `seq` only names it in
/// the error.
pub fn check(jobs: &JobViews, seq: u64, record: &Record) -> Result<(), JournalError> {
    let key = JobKey::of(record);
    let refuse = |problem: String| JournalError::Transition {
        seq,
        job_id: key.job_id,
        role: key.role,
        record: record.kind_name(),
        problem,
    };
    let Some(view) = jobs.get(&key) else {
        return match record {
            Record::SourceStarted {
                size_bytes,
                granularity_bytes,
                ..
            }
            | Record::TargetCreated {
                size_bytes,
                granularity_bytes,
                ..
            } => checked_block_count(*size_bytes, *granularity_bytes)
                .map(drop)
                .map_err(|err| refuse(err.to_string())),
            _ => Err(refuse("no record started this job".to_owned())),
        };
    };
    let allowed = match (record, &view.side) {
        (Record::SourceStarted { .. }, _) => {
            return Err(refuse(format!(
                "the job was already started by record {}",
                view.first_seq
            )))
        }
        (Record::TargetCreated { .. }, Side::Target(target)) => {
            return check_resume(view, target, record).map_err(refuse)
        }
        (Record::TargetReceived { received, .. }, Side::Target(target)) => {
            if target.phase == TargetPhase::Receiving {
                check_received(view, target, received).map_err(refuse)?;
            }
            target.phase == TargetPhase::Receiving
        }
        (Record::SourceSwitchoverBegun { .. }, Side::Source(source)) => {
            source.phase == SourcePhase::Copying
        }
        // A run (the first or a resume) starts while copying.
        (Record::SourceSettings { .. }, Side::Source(source)) => {
            source.phase == SourcePhase::Copying
        }
        (
            Record::SourceSwitchoverCancelled { .. } | Record::SourceSwitched { .. },
            Side::Source(source),
        ) => source.phase == SourcePhase::SwitchingOver,
        (Record::SourceAborted { .. }, Side::Source(source)) => {
            source.phase == SourcePhase::Copying
        }
        (Record::SourceFinished { .. }, Side::Source(source)) => {
            source.phase == SourcePhase::Switched
        }
        (Record::SourceHolder { .. }, Side::Source(source)) => {
            source.phase == SourcePhase::Copying && source.holder.is_none()
        }
        (Record::SourceRepointed { .. }, Side::Source(source)) => {
            source.phase == SourcePhase::Switched
        }
        (Record::SourceHolderTold { .. }, Side::Source(source)) => {
            matches!(source.phase, SourcePhase::Switched | SourcePhase::Finished)
                && source.holder.is_some()
        }
        (Record::TargetHolder { .. }, Side::Target(target)) => {
            target.phase == TargetPhase::Receiving
        }
        (Record::TargetCommitted { .. } | Record::TargetAborted { .. }, Side::Target(target)) => {
            target.phase == TargetPhase::Receiving
        }
        (Record::SourceSeed { seed_id, step, .. }, Side::Source(source)) => {
            source.phase == SourcePhase::Copying
                && step.is_source()
                && seed_may_follow(source.seed.as_ref(), seed_id, *step)
        }
        (Record::TargetSeed { seed_id, step, .. }, Side::Target(target)) => {
            target.phase == TargetPhase::Receiving
                && step.is_target()
                && seed_may_follow(target.seed.as_ref(), seed_id, *step)
        }
        // Keys include the role, so a source record never meets a target view.
        (_, Side::Source(_) | Side::Target(_)) => false,
    };
    if allowed {
        Ok(())
    } else {
        Err(refuse(format!(
            "not allowed in phase {}",
            view.phase_name()
        )))
    }
}

/// A job keeps one seed, and its steps go forward ([`SeedStep::may_follow`]).
fn seed_may_follow(current: Option<&SeedView>, seed_id: &[u8; 16], step: SeedStep) -> bool {
    match current {
        None => SeedStep::may_follow(None, step),
        Some(view) => view.seed_id == *seed_id && SeedStep::may_follow(Some(view.step), step),
    }
}

/// Applies a seed record [`seed_may_follow`] accepted.
fn advance_seed(
    seed: &mut Option<SeedView>,
    seed_id: &[u8; 16],
    step: SeedStep,
    at_unix_ms: u64,
    fingerprint: u64,
) {
    match seed {
        Some(view) => view.advance(step, at_unix_ms, fingerprint),
        None => *seed = Some(SeedView::first(*seed_id, step, at_unix_ms, fingerprint)),
    }
}

/// A second `TargetCreated`: allowed while receiving, for the same disk and image.
fn check_resume(view: &JobView, target: &TargetView, record: &Record) -> Result<(), String> {
    let Record::TargetCreated {
        batch,
        export,
        size_bytes,
        granularity_bytes,
        image_path,
        ..
    } = record
    else {
        unreachable!("called for TargetCreated only");
    };
    if target.phase != TargetPhase::Receiving {
        return Err(format!("cannot resume in phase {}", target.phase));
    }
    let same = (
        &view.batch,
        &view.export,
        view.size_bytes,
        view.granularity_bytes,
        &target.image_path,
    ) == (batch, export, *size_bytes, *granularity_bytes, image_path);
    if same {
        Ok(())
    } else {
        Err(format!(
            "a resume must describe the disk of record {} (export {:?}, {} bytes, granularity {}, image {}, batch {:?})",
            view.first_seq,
            view.export,
            view.size_bytes,
            view.granularity_bytes,
            target.image_path.display(),
            view.batch
        ))
    }
}

/// A checkpoint of the job's geometry that loses no block of the previous one.
fn check_received(view: &JobView, target: &TargetView, received: &DirtySet) -> Result<(), String> {
    let geometry = (received.granularity_bytes(), received.disk_bytes());
    if geometry != (view.granularity_bytes, view.size_bytes) {
        return Err(format!(
            "received set covers {} bytes at granularity {}, the job {} bytes at {}",
            geometry.1, geometry.0, view.size_bytes, view.granularity_bytes
        ));
    }
    let Some(previous) = &target.received else {
        return Ok(());
    };
    match received.first_missing(previous) {
        None => Ok(()),
        Some(block) => Err(format!(
            "received blocks shrink: block {block} was received by record {}",
            view.last_seq
        )),
    }
}

/// Applies a record [`check`] accepted.
fn update(jobs: &mut JobViews, seq: u64, record: &Record) {
    let key = JobKey::of(record);
    let Some(view) = jobs.get_mut(&key) else {
        jobs.insert(key, start(seq, record));
        return;
    };
    view.last_seq = seq;
    match (record, &mut view.side) {
        // A resume: the job keeps what it received.
        (Record::TargetCreated { source, .. }, Side::Target(target)) => {
            target.source.clone_from(source);
            target.resumes += 1;
        }
        (Record::SourceSettings { settings, .. }, Side::Source(source)) => {
            source.settings = Some(settings.clone());
        }
        (Record::SourceSwitchoverBegun { .. }, Side::Source(source)) => {
            source.phase = SourcePhase::SwitchingOver;
            source.switchovers += 1;
        }
        (Record::SourceSwitchoverCancelled { reason, .. }, Side::Source(source)) => {
            source.phase = SourcePhase::Copying;
            view.reason = Some(reason.clone());
        }
        (Record::SourceSwitched { forward_addr, .. }, Side::Source(source)) => {
            source.phase = SourcePhase::Switched;
            source.forward_addr = Some(forward_addr.clone());
        }
        (Record::SourceAborted { reason, .. }, Side::Source(source)) => {
            source.phase = SourcePhase::Aborted;
            view.reason = Some(reason.clone());
        }
        (Record::SourceFinished { .. }, Side::Source(source)) => {
            source.phase = SourcePhase::Finished;
        }
        (Record::SourceHolder { holder, .. }, Side::Source(source)) => {
            source.holder = Some(holder.clone());
        }
        (
            Record::SourceRepointed {
                forward_addr,
                moves,
                ..
            },
            Side::Source(source),
        ) => {
            source.forward_addr = Some(forward_addr.clone());
            source.repointed_moves = *moves;
        }
        (Record::SourceHolderTold { outcome, .. }, Side::Source(source)) => {
            source.holder_told = Some(*outcome);
        }
        (Record::TargetHolder { holder, .. }, Side::Target(target)) => {
            target.holder = Some(holder.clone());
        }
        (Record::TargetReceived { received, .. }, Side::Target(target)) => {
            target.received = Some(received.clone());
        }
        (Record::TargetCommitted { .. }, Side::Target(target)) => {
            target.phase = TargetPhase::Committed;
            target.received = None;
        }
        (Record::TargetAborted { reason, .. }, Side::Target(target)) => {
            target.phase = TargetPhase::Aborted;
            target.received = None;
            view.reason = Some(reason.clone());
        }
        (
            Record::SourceSeed {
                seed_id,
                step,
                at_unix_ms,
                ..
            },
            Side::Source(source),
        ) => advance_seed(&mut source.seed, seed_id, *step, *at_unix_ms, 0),
        (
            Record::TargetSeed {
                seed_id,
                step,
                at_unix_ms,
                fingerprint,
                ..
            },
            Side::Target(target),
        ) => advance_seed(&mut target.seed, seed_id, *step, *at_unix_ms, *fingerprint),
        (record, _) => unreachable!("check refuses {} here", record.kind_name()),
    }
}

/// The view a starting record creates.
fn start(seq: u64, record: &Record) -> JobView {
    let view =
        |batch: &Option<String>, export: &String, size_bytes, granularity_bytes, side| JobView {
            job_id: record.job_id(),
            batch: batch.clone(),
            export: export.clone(),
            size_bytes,
            granularity_bytes,
            side,
            reason: None,
            first_seq: seq,
            last_seq: seq,
        };
    match record {
        Record::SourceStarted {
            batch,
            export,
            size_bytes,
            granularity_bytes,
            destination,
            policy,
            ..
        } => view(
            batch,
            export,
            *size_bytes,
            *granularity_bytes,
            Side::Source(SourceView {
                phase: SourcePhase::Copying,
                destination: destination.clone(),
                policy: *policy,
                forward_addr: None,
                switchovers: 0,
                settings: None,
                holder: None,
                holder_told: None,
                repointed_moves: 0,
                seed: None,
            }),
        ),
        Record::TargetCreated {
            batch,
            export,
            size_bytes,
            granularity_bytes,
            source,
            image_path,
            ..
        } => view(
            batch,
            export,
            *size_bytes,
            *granularity_bytes,
            Side::Target(TargetView {
                phase: TargetPhase::Receiving,
                source: source.clone(),
                image_path: image_path.clone(),
                received: None,
                resumes: 0,
                holder: None,
                seed: None,
            }),
        ),
        other => unreachable!("check refuses {} for an unknown job", other.kind_name()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::file::tests::{created, lifecycle, received, started};

    /// Applies `records` numbered from 1; panics on a refusal.
    fn folded(records: &[Record]) -> JobViews {
        let mut jobs = JobViews::new();
        for (seq, record) in (1..).zip(records) {
            apply(&mut jobs, seq, record).unwrap_or_else(|err| panic!("{err}"));
        }
        jobs
    }

    fn source_key(job_id: u64) -> JobKey {
        JobKey {
            job_id,
            role: Role::Source,
        }
    }

    fn target_key(job_id: u64) -> JobKey {
        JobKey {
            job_id,
            role: Role::Target,
        }
    }

    #[test]
    fn each_record_moves_its_job_to_the_right_phase() {
        // Goal: after every record of a lifecycle, each job shows the phase and authority the
        // state machine in the module docs gives. Method: apply the records one at a time and
        // compare the job they touch with the expected (phase, authority, over).
        use Authority::{InDoubt, Source as Src, Target as Tgt};
        let expected: [(&str, Authority, bool); 16] = [
            ("copying", Src, false),   // SourceStarted 7
            ("receiving", Src, false), // TargetCreated 9
            ("receiving", Src, false), // TargetReceived 9
            ("switching-over", InDoubt, false),
            ("copying", Src, false), // cancelled: the source is authoritative again
            ("receiving", Src, false), // TargetCreated 9 again: a resume
            ("receiving", Src, false), // TargetReceived 9
            ("switching-over", InDoubt, false),
            ("switched", Tgt, false),  // forwarding, so not over
            ("copying", Src, false),   // SourceStarted 8
            ("copying", Src, false),   // SourceSettings 8: no phase change
            ("committed", Tgt, true),  // THE commit point of job 9
            ("aborted", Src, true),    // SourceAborted 8
            ("finished", Tgt, true),   // SourceFinished 7
            ("receiving", Src, false), // TargetCreated 10
            ("aborted", Src, true),    // TargetAborted 10
        ];
        let records = lifecycle();
        assert_eq!(records.len(), expected.len());
        let mut jobs = JobViews::new();
        for (seq, (record, (phase, authority, over))) in (1..).zip(records.iter().zip(expected)) {
            apply(&mut jobs, seq, record).unwrap_or_else(|err| panic!("{err}"));
            let view = &jobs[&JobKey::of(record)];
            let step = format!("record {seq} ({})", record.kind_name());
            assert_eq!(view.phase_name(), phase, "{step}");
            assert_eq!(view.authority(), authority, "{step}");
            assert_eq!(view.is_over(), over, "{step}");
            assert_eq!(view.last_seq, seq, "{step}");
            assert_eq!(view.role(), record.role(), "{step}");
        }
        assert_eq!(fold(&[]).expect("empty"), JobViews::new());
    }

    #[test]
    fn views_keep_what_status_and_restart_need() {
        // Goal: the fold keeps batch, export, peer, forward address, reasons, the number of
        // switchover attempts and the latest received set (while receiving only). Method:
        // fold a prefix and the whole lifecycle, inspect the views.
        let records = lifecycle();
        let middle = folded(&records[..7]);
        let source = &middle[&source_key(7)];
        assert_eq!(source.batch.as_deref(), Some("rack-4"));
        assert_eq!(
            source.reason.as_deref(),
            Some("destination refused: disk full")
        );
        let Side::Target(target) = &middle[&target_key(9)].side else {
            panic!("target view");
        };
        assert_eq!(target.resumes, 1);
        let Record::TargetReceived { received: last, .. } = &records[6] else {
            panic!("record 7 is a checkpoint");
        };
        assert_eq!(target.received.as_ref(), Some(last));
        let jobs = folded(&records);
        assert_eq!(jobs.len(), 4);
        let Side::Source(source) = &jobs[&source_key(7)].side else {
            panic!("source view");
        };
        assert_eq!(source.forward_addr.as_deref(), Some("10.0.0.2:10809"));
        assert_eq!(source.destination, "10.0.0.2:7410");
        assert_eq!(source.switchovers, 2, "one cancelled, one switched");
        let Side::Target(target) = &jobs[&target_key(9)].side else {
            panic!("target view");
        };
        assert_eq!(target.received, None, "dropped once committed");
        assert_eq!(jobs[&target_key(9)].first_seq, 2);
        assert_eq!(jobs[&source_key(8)].reason.as_deref(), Some("operator"));
        let batch: Vec<u64> = jobs
            .values()
            .filter(|view| view.batch.as_deref() == Some("rack-4"))
            .map(|view| view.job_id)
            .collect();
        assert_eq!(batch, vec![7, 8]);
    }

    #[test]
    fn the_latest_settings_are_the_jobs() {
        // Goal: a source view carries the settings of its latest run (a resume's record
        // replaces the first), a job journaled without any has none (a resume then uses the
        // defaults), and settings are refused once the job left `copying`. Method: fold
        // started + settings + settings again; fold started alone; then try settings after a
        // switchover began and for a job never started.
        let settings = |bandwidth_bytes_per_s| Record::SourceSettings {
            job_id: 7,
            settings: JobSettings {
                policy: Policy::Naive,
                max_pause_ms: 250,
                target_pause_ms: 10,
                force_after_ms: None,
                bandwidth_bytes_per_s,
                hot_threshold: 8,
                mirror: false,
                verify: true,
                yield_to_guest: false,
            },
        };
        let jobs = folded(&[started(7), settings(Some(32 << 20)), settings(None)]);
        let Side::Source(source) = &jobs[&source_key(7)].side else {
            panic!("source view");
        };
        let kept = source.settings.as_ref().expect("settings folded");
        assert_eq!(
            kept.bandwidth_bytes_per_s, None,
            "the resume's settings win"
        );
        assert_eq!(kept.max_pause_ms, 250);
        assert_eq!(jobs[&source_key(7)].phase_name(), "copying");
        let jobs = folded(&[started(7)]);
        let Side::Source(source) = &jobs[&source_key(7)].side else {
            panic!("source view");
        };
        assert_eq!(source.settings, None);
        let mut jobs = folded(&[started(7), Record::SourceSwitchoverBegun { job_id: 7 }]);
        let err = apply(&mut jobs, 3, &settings(None)).expect_err("switching over");
        assert!(err.to_string().contains("phase switching-over"), "{err}");
        let err = apply(&mut JobViews::new(), 1, &settings(None)).expect_err("no job");
        assert!(err.to_string().contains("no record started"), "{err}");
    }

    #[test]
    fn holder_records_choose_where_the_holder_forwards() {
        // Goal: the holder records fold into the views without changing a phase: a job's
        // holder and its answer, a target's holder, and a re-point that replaces the forward
        // address with its move count; each only where it belongs. Method: fold the
        // sequences, then apply each record in a phase that refuses it.
        let holder = Holder {
            addr: "10.0.0.1:7451".into(),
            job_id: 3,
            moves: 2,
        };
        let switched = Record::SourceSwitched {
            job_id: 7,
            forward_addr: "10.0.0.3:10809".into(),
        };
        let told = Record::SourceHolderTold {
            job_id: 7,
            outcome: RepointOutcome::Repointed,
        };
        let source_holder = Record::SourceHolder {
            job_id: 7,
            holder: holder.clone(),
        };
        let repointed = Record::SourceRepointed {
            job_id: 7,
            forward_addr: "10.0.0.4:10809".into(),
            moves: 3,
        };
        let begun = Record::SourceSwitchoverBegun { job_id: 7 };
        let jobs = folded(&[
            started(7),
            source_holder.clone(),
            begun.clone(),
            switched.clone(),
            told.clone(),
        ]);
        let Side::Source(source) = &jobs[&source_key(7)].side else {
            panic!("source view");
        };
        assert_eq!(source.holder.as_ref(), Some(&holder));
        assert_eq!(source.holder_told, Some(RepointOutcome::Repointed));
        assert_eq!(jobs[&source_key(7)].phase_name(), "switched");

        let jobs = folded(&[
            started(7),
            begun.clone(),
            switched.clone(),
            repointed.clone(),
        ]);
        let Side::Source(source) = &jobs[&source_key(7)].side else {
            panic!("source view");
        };
        assert_eq!(source.forward_addr.as_deref(), Some("10.0.0.4:10809"));
        assert_eq!(source.repointed_moves, 3);

        let target_holder = Record::TargetHolder {
            job_id: 9,
            holder: holder.clone(),
        };
        let jobs = folded(&[
            created(9),
            target_holder.clone(),
            Record::TargetCommitted { job_id: 9 },
        ]);
        let Side::Target(target) = &jobs[&target_key(9)].side else {
            panic!("target view");
        };
        assert_eq!(target.holder.as_ref(), Some(&holder));

        let refused: Vec<(Vec<Record>, Record)> = vec![
            (vec![started(7), begun.clone()], source_holder.clone()),
            (
                vec![started(7), source_holder.clone()],
                source_holder.clone(),
            ),
            (vec![started(7)], repointed.clone()),
            (
                vec![started(7), begun.clone(), switched.clone()],
                told.clone(),
            ),
            (
                vec![created(9), Record::TargetCommitted { job_id: 9 }],
                target_holder,
            ),
        ];
        for (before, record) in refused {
            let mut jobs = folded(&before);
            let was = jobs.clone();
            let err = apply(&mut jobs, 99, &record).expect_err("refused");
            assert!(err.to_string().contains(record.kind_name()), "{err}");
            assert_eq!(jobs, was);
        }
    }

    #[test]
    fn one_id_as_source_and_as_target_is_two_jobs() {
        // Goal: an agent migrating its job 5 away while receiving a peer's job 5 keeps both.
        // Method: start both, commit the target only.
        let jobs = folded(&[
            started(5),
            created(5),
            Record::TargetCommitted { job_id: 5 },
        ]);
        assert_eq!(jobs[&source_key(5)].phase_name(), "copying");
        assert_eq!(jobs[&target_key(5)].phase_name(), "committed");
    }

    #[test]
    fn illegal_transitions_are_refused_and_change_nothing() {
        // Goal: every record out of order is refused with an error naming the record, its
        // job and the reason, and the views stay as they were. Method: a table of (records
        // before, refused record, expected problem).
        let begun = Record::SourceSwitchoverBegun { job_id: 7 };
        let switched = Record::SourceSwitched {
            job_id: 7,
            forward_addr: "a".into(),
        };
        let committed = Record::TargetCommitted { job_id: 9 };
        let mut bigger = created(9);
        if let Record::TargetCreated { size_bytes, .. } = &mut bigger {
            *size_bytes += 1;
        }
        let mut odd = started(7);
        if let Record::SourceStarted {
            granularity_bytes, ..
        } = &mut odd
        {
            *granularity_bytes = 3 << 10;
        }
        let mut other_disk = DirtySet::empty(4096, 4096 * 10);
        other_disk.insert(1);
        let cases: Vec<(Vec<Record>, Record, &str)> = vec![
            (vec![], switched.clone(), "no record started this job"),
            (
                vec![started(7)],
                switched.clone(),
                "not allowed in phase copying",
            ),
            (vec![started(7)], started(7), "already started by record 1"),
            (
                vec![started(7), begun.clone()],
                Record::SourceAborted {
                    job_id: 7,
                    reason: "x".into(),
                },
                "not allowed in phase switching-over",
            ),
            (
                vec![started(7), begun.clone()],
                begun.clone(),
                "phase switching-over",
            ),
            (
                vec![started(7)],
                Record::SourceFinished { job_id: 7 },
                "phase copying",
            ),
            (
                vec![created(9), committed.clone()],
                Record::TargetAborted {
                    job_id: 9,
                    reason: "x".into(),
                },
                "not allowed in phase committed",
            ),
            (
                vec![created(9), committed.clone()],
                committed.clone(),
                "phase committed",
            ),
            (
                vec![created(9), committed.clone()],
                created(9),
                "cannot resume in phase committed",
            ),
            (
                vec![created(9)],
                bigger,
                "a resume must describe the disk of record 1",
            ),
            (
                vec![created(9), received(9, 3..8)],
                received(9, 6..20),
                "received blocks shrink: block 3 was received by record 2",
            ),
            (
                vec![created(9)],
                Record::TargetReceived {
                    job_id: 9,
                    received: other_disk,
                },
                "covers 40960 bytes at granularity 4096",
            ),
            (vec![], odd, "granularity 3072 is not a power of two"),
        ];
        for (before, record, problem) in cases {
            let mut jobs = folded(&before);
            let unchanged = jobs.clone();
            let seq = before.len() as u64 + 1;
            let err = apply(&mut jobs, seq, &record).expect_err(problem);
            let JournalError::Transition {
                seq: err_seq,
                job_id,
                role,
                record: kind,
                ..
            } = &err
            else {
                panic!("expected Transition, got {err:?}");
            };
            assert_eq!(
                (*err_seq, *job_id, *role, *kind),
                (seq, record.job_id(), record.role(), record.kind_name())
            );
            let text = err.to_string();
            assert!(text.contains(problem), "{text}");
            assert_eq!(jobs, unchanged, "{text}");
        }
    }

    #[test]
    fn a_job_keeps_one_seed_and_its_steps_go_forward() {
        // Goal: seed records follow the order of `journal/seed.rs` at each end, name one
        // seed, and stop once the job is over. Method: a source and a target lifecycle with
        // seeds, then each wrong record refused with the journal unchanged.
        let seed = |job_id, step, seed_id| Record::SourceSeed {
            job_id,
            seed_id,
            step,
            at_unix_ms: 5,
        };
        let target_seed = |job_id, step, seed_id| Record::TargetSeed {
            job_id,
            seed_id,
            step,
            at_unix_ms: 6,
            fingerprint: 9,
        };
        let jobs = folded(&[
            started(3),
            seed(3, SeedStep::Exporting, [1; 16]),
            seed(3, SeedStep::Exported, [1; 16]),
            seed(3, SeedStep::InSync, [1; 16]),
            created(3),
            target_seed(3, SeedStep::Importing, [1; 16]),
            target_seed(3, SeedStep::Imported, [1; 16]),
            target_seed(3, SeedStep::CatchingUp, [1; 16]),
            target_seed(3, SeedStep::InSync, [1; 16]),
        ]);
        let Side::Source(source) = &jobs[&source_key(3)].side else {
            panic!("source");
        };
        let seed_view = source.seed.as_ref().expect("a seed");
        assert_eq!(seed_view.step, SeedStep::InSync);
        assert_eq!(seed_view.in_sync_unix_ms, Some(5));
        let Side::Target(target) = &jobs[&target_key(3)].side else {
            panic!("target");
        };
        assert_eq!(target.seed.as_ref().map(|s| s.fingerprint), Some(9));
        let refused = [
            seed(3, SeedStep::Exporting, [1; 16]),       // backwards
            seed(3, SeedStep::InSync, [2; 16]),          // another seed
            seed(3, SeedStep::Imported, [1; 16]),        // a target step
            target_seed(3, SeedStep::Exported, [1; 16]), // a source step
            target_seed(3, SeedStep::Importing, [1; 16]),
        ];
        for record in refused {
            let mut copy = jobs.clone();
            assert!(apply(&mut copy, 99, &record).is_err(), "{record:?}");
            assert_eq!(copy, jobs);
        }
        let mut over = jobs.clone();
        apply(&mut over, 20, &Record::TargetCommitted { job_id: 3 }).unwrap();
        let after = target_seed(3, SeedStep::InSync, [1; 16]);
        assert!(
            apply(&mut over, 21, &after).is_err(),
            "no seed step once committed"
        );
        let mut fresh = folded(&[created(4)]);
        let early = target_seed(4, SeedStep::InSync, [1; 16]);
        assert!(
            apply(&mut fresh, 2, &early).is_err(),
            "in sync before imported"
        );
    }
}
