//! Journal records and their binary encoding: one [`Record`] per state change of a migration.
//!
//! A record body is what the frame (`file.rs`) checksums; this file knows nothing of frames,
//! offsets or files, so it is tested on byte slices. Layout of a body, little-endian:
//!
//! | bytes | field |
//! | --- | --- |
//! | 1 | kind (see the `KIND_*` constants) |
//! | … | the kind's fields in declaration order |
//!
//! Field encodings: `u64` as 8 bytes; a string or path as a `u32` length then its bytes
//! (UTF-8 for strings, raw bytes for paths); an `Option<String>` or `Option<u64>` as one byte
//! (0 = none, 1 = some) then the value; a policy as one byte (1 = heat, 2 = naive); a block
//! set as `granularity_bytes` (8), `disk_bytes` (8), then one encoding byte:
//!
//! | encoding | then |
//! | --- | --- |
//! | 0 = words | `ceil(block_count / 64)` little-endian `u64` words (block `b` is bit `b % 64` of word `b / 64`) |
//! | 1 = runs | LEB128 run lengths, alternating clear and set, starting with clear (the first run may be 0, no other), summing to `block_count` |
//!
//! The encoder picks whichever is shorter: a received set filled in offset order is a
//! handful of runs, and a scattered one is never larger than its raw words (plus one byte).
//!
//! `SourceSettings` (kind 7) holds a [`JobSettings`]. It came after the other kinds: a
//! journal written before it still reads, and its jobs resume with default settings.
//!
//! | bytes | field |
//! | --- | --- |
//! | 1 | kind = 7 |
//! | 8 | job id |
//! | 1 | policy |
//! | 8 | `max_pause_ms` |
//! | 8 | `target_pause_ms` |
//! | 1 or 9 | `force_after_ms` (`Option<u64>`) |
//! | 1 or 9 | `bandwidth_bytes_per_s` (`Option<u64>`; none = uncapped) |
//! | 1 | `hot_threshold` |
//! | 1 | flags: bit 0 `mirror`, bit 1 `verify`, bit 2 `yield_to_guest`; other bits 0 |
//!
//! The holder records (kinds 8, 9, 10 and 20) came after that, the same way: a journal
//! without them reads, and its jobs have no holder to tell (their disks may forward
//! through more than one hop, as before). A holder is encoded as its address (string), its
//! job id (`u64`) and its moves (`u64`, at most `u32::MAX`); a re-point outcome as one byte
//! (1 = re-pointed, 2 = superseded, 3 = not forwarding).
//!
//! Invariants:
//! - [`Record::decode`] never panics and never reads past the body: any byte string is a
//!   record or an error naming the problem (a checksummed body can still be malformed when a
//!   newer ferry wrote it, or when this one has a bug).
//! - `decode(encode(r)) == r` (paired assertion in [`Record::encode`]). Run lists are
//!   canonical (no empty run but the first), so a run body decodes to one set only.
//! - Syntax only: whether a record is allowed after the others is the fold's business
//!   (`fold.rs`).

use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::seed::SeedStep;
use crate::codec::{self, CodecError};
use crate::dirty::bitmap::{checked_block_count, read_le_words};
use crate::dirty::DirtySet;
use crate::migrate::Policy;
use crate::transfer::{Holder, RepointOutcome};

const KIND_SOURCE_STARTED: u8 = 1;
const KIND_SOURCE_SWITCHOVER_BEGUN: u8 = 2;
const KIND_SOURCE_SWITCHOVER_CANCELLED: u8 = 3;
const KIND_SOURCE_SWITCHED: u8 = 4;
const KIND_SOURCE_ABORTED: u8 = 5;
const KIND_SOURCE_FINISHED: u8 = 6;
const KIND_SOURCE_SETTINGS: u8 = 7;
const KIND_SOURCE_HOLDER: u8 = 8;
const KIND_SOURCE_REPOINTED: u8 = 9;
const KIND_SOURCE_HOLDER_TOLD: u8 = 10;
const KIND_TARGET_CREATED: u8 = 16;
const KIND_TARGET_RECEIVED: u8 = 17;
const KIND_TARGET_COMMITTED: u8 = 18;
const KIND_TARGET_ABORTED: u8 = 19;
const KIND_TARGET_HOLDER: u8 = 20;
const KIND_SOURCE_SEED: u8 = 11;
const KIND_TARGET_SEED: u8 = 21;

const POLICY_HEAT: u8 = 1;
const POLICY_NAIVE: u8 = 2;

const SETTINGS_MIRROR: u8 = 1 << 0;
const SETTINGS_VERIFY: u8 = 1 << 1;
const SETTINGS_YIELD_TO_GUEST: u8 = 1 << 2;

const SET_ENCODING_WORDS: u8 = 0;
const SET_ENCODING_RUNS: u8 = 1;

/// One state change of one migration, as the journal stores it. `Source*` records are
/// written by the agent that serves the disk being moved, `Target*` records by the agent
/// receiving it; the state machine they drive is in the module docs of [`crate::journal`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// The source starts a migration; appended before the destination is contacted.
    SourceStarted {
        /// The job's id (assigned by the source, sent to the destination in `Open`).
        job_id: u64,
        /// Batch the job belongs to, if any (`ferry status BATCH`).
        batch: Option<String>,
        /// The export being moved.
        export: String,
        /// Size of the disk.
        size_bytes: u64,
        /// Block size of the migration tracker and of the received bitmap.
        granularity_bytes: u64,
        /// The destination agent's block-stream address.
        destination: String,
        /// Copy policy.
        policy: Policy,
    },
    /// The settings the job runs with; appended right after `SourceStarted`, and again by
    /// each resume (whose request may have changed some), before the destination is
    /// contacted. The latest one is what a resume without options continues with.
    SourceSettings {
        /// The job.
        job_id: u64,
        /// Its settings.
        settings: JobSettings,
    },
    /// The disk this job moves arrived here from elsewhere, and `holder` holds the guest's
    /// connection to it: at the switchover it is told where the disk went. Appended right
    /// after `SourceStarted`, before the destination is contacted.
    SourceHolder {
        /// The job.
        job_id: u64,
        /// Who to tell.
        holder: Holder,
    },
    /// This agent holds the guest's connection and forwarded it to this job's destination;
    /// the disk has moved on since (a later switchover elsewhere): it forwards to
    /// `forward_addr` now. Appended before the route switches.
    SourceRepointed {
        /// The job (the one that first moved the disk away from here).
        job_id: u64,
        /// Where the disk is served now.
        forward_addr: String,
        /// The move that put it there (a later re-point with fewer moves is older).
        moves: u32,
    },
    /// The holder answered the re-point of this job's switchover: nothing forwards through
    /// this agent for this job's disk any more (other than guests connected here).
    SourceHolderTold {
        /// The job.
        job_id: u64,
        /// What the holder did.
        outcome: RepointOutcome,
    },
    /// Guest writes are held and the commit is about to be sent: from here until
    /// `SourceSwitched` or `SourceSwitchoverCancelled` the source does not know which side is
    /// authoritative, and a restarted source must ask the destination before serving writes.
    SourceSwitchoverBegun {
        /// The job.
        job_id: u64,
    },
    /// The destination said it has not committed and never will for that attempt: the
    /// source is authoritative again and goes on copying (or aborts).
    SourceSwitchoverCancelled {
        /// The job.
        job_id: u64,
        /// Why (the destination's refusal, a verification mismatch, an in-doubt answer).
        reason: String,
    },
    /// The destination committed: the source forwards guest I/O to it from now on.
    SourceSwitched {
        /// The job.
        job_id: u64,
        /// Where the destination serves NBD over TCP.
        forward_addr: String,
    },
    /// The source gave the migration up before any switchover; it stays authoritative.
    SourceAborted {
        /// The job.
        job_id: u64,
        /// Why (operator's abort, unrecoverable error).
        reason: String,
    },
    /// The guest no longer uses the forwarding export: it is removed, and the local image
    /// is debris that must never be served again.
    SourceFinished {
        /// The job.
        job_id: u64,
    },
    /// The destination accepted a migration (or its resume); appended before the image is
    /// created, so that a crash never leaves an image the journal does not know.
    TargetCreated {
        /// The source's job id.
        job_id: u64,
        /// Batch the job belongs to, if any.
        batch: Option<String>,
        /// Name the disk will be served under.
        export: String,
        /// Size of the disk.
        size_bytes: u64,
        /// Block size of the received bitmap.
        granularity_bytes: u64,
        /// The source agent, as the destination knows it (its address).
        source: String,
        /// Where the target image lives.
        image_path: PathBuf,
    },
    /// Checkpoint: every block in `received` was written to the target and fdatasynced
    /// before this record was appended. Cumulative: it supersedes earlier checkpoints.
    TargetReceived {
        /// The job.
        job_id: u64,
        /// Blocks durably received since `TargetCreated`.
        received: DirtySet,
    },
    /// THE commit point of the migration: the target is synced and authoritative. Appended
    /// before the target is served and before `CommitOk` is sent.
    TargetCommitted {
        /// The job.
        job_id: u64,
    },
    /// The destination dropped the target (the source aborted); appended before the image
    /// is removed, so a restart removes what is left.
    TargetAborted {
        /// The job.
        job_id: u64,
        /// Why.
        reason: String,
    },
    /// Who holds the guest's connection to the disk being received (the `Open` said so and
    /// this agent is not that holder): a later move of the disk from here tells it.
    TargetHolder {
        /// The job.
        job_id: u64,
        /// The holder.
        holder: Holder,
    },
    /// A seed step at the source (`journal/seed.rs`): the job's bulk copy goes to a medium.
    /// `Exporting` is appended before the seed tracker is created, `Exported` after the
    /// medium is sealed and synced, `InSync` after the destination confirmed an in-sync point.
    SourceSeed {
        /// The job.
        job_id: u64,
        /// The seed's id.
        seed_id: [u8; 16],
        /// The step.
        step: SeedStep,
        /// When (Unix ms).
        at_unix_ms: u64,
    },
    /// A seed step at the target: `Importing` after `TargetCreated` and before the first
    /// extent is written, `Imported` after every extent verified and the image was synced,
    /// `InSync` after the image was synced at an in-sync point (before it is confirmed).
    TargetSeed {
        /// The job.
        job_id: u64,
        /// The seed's id.
        seed_id: [u8; 16],
        /// The step.
        step: SeedStep,
        /// When (Unix ms).
        at_unix_ms: u64,
        /// The image file's fingerprint as ferry left it.
        fingerprint: u64,
    },
}

/// What a source job was asked to run with (`ferry migrate` options): journaled in
/// [`Record::SourceSettings`] so that `ferry resume` continues with the same cap and
/// budgets instead of the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSettings {
    /// Copy policy.
    pub policy: Policy,
    /// Longest write pause the switchover may cause.
    pub max_pause_ms: u64,
    /// The pause aimed for while the dirty set still shrinks.
    pub target_pause_ms: u64,
    /// Switch over after this long even if the pause bound is not met (`None`: never).
    pub force_after_ms: Option<u64>,
    /// Bandwidth cap of the block stream (`None`: uncapped).
    pub bandwidth_bytes_per_s: Option<u64>,
    /// Heat at and above which a block counts as hot.
    pub hot_threshold: u8,
    /// Guest writes mirrored to the destination from the start.
    pub mirror: bool,
    /// Both images compared at the switchover point.
    pub verify: bool,
    /// The bulk copy backs off while the guest's write latency is high.
    pub yield_to_guest: bool,
}

#[cfg(test)]
impl JobSettings {
    /// Settings of a capped, yielding heat job with `max_pause_ms`: what tests journal.
    pub(crate) fn sample(policy: Policy, max_pause_ms: u64) -> Self {
        JobSettings {
            policy,
            max_pause_ms,
            target_pause_ms: 10,
            force_after_ms: None,
            bandwidth_bytes_per_s: Some(32 << 20),
            hot_threshold: 8,
            mirror: false,
            verify: false,
            yield_to_guest: true,
        }
    }
}

/// Which side of a migration a record (or a job) belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// The agent the disk moves away from.
    Source,
    /// The agent the disk moves to.
    Target,
}

impl Role {
    /// Lower-case name, as `ferry status` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Target => "target",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Record {
    /// The job the record is about.
    pub fn job_id(&self) -> u64 {
        match self {
            Self::SourceStarted { job_id, .. }
            | Self::SourceSwitchoverBegun { job_id }
            | Self::SourceSwitchoverCancelled { job_id, .. }
            | Self::SourceSwitched { job_id, .. }
            | Self::SourceAborted { job_id, .. }
            | Self::SourceFinished { job_id }
            | Self::SourceSettings { job_id, .. }
            | Self::SourceHolder { job_id, .. }
            | Self::SourceRepointed { job_id, .. }
            | Self::SourceHolderTold { job_id, .. }
            | Self::SourceSeed { job_id, .. }
            | Self::TargetSeed { job_id, .. }
            | Self::TargetHolder { job_id, .. }
            | Self::TargetCreated { job_id, .. }
            | Self::TargetReceived { job_id, .. }
            | Self::TargetCommitted { job_id }
            | Self::TargetAborted { job_id, .. } => *job_id,
        }
    }

    /// Which side writes this kind of record.
    pub fn role(&self) -> Role {
        match self {
            Self::SourceStarted { .. }
            | Self::SourceSwitchoverBegun { .. }
            | Self::SourceSwitchoverCancelled { .. }
            | Self::SourceSwitched { .. }
            | Self::SourceAborted { .. }
            | Self::SourceFinished { .. }
            | Self::SourceSettings { .. }
            | Self::SourceHolder { .. }
            | Self::SourceRepointed { .. }
            | Self::SourceHolderTold { .. }
            | Self::SourceSeed { .. } => Role::Source,
            Self::TargetHolder { .. }
            | Self::TargetSeed { .. }
            | Self::TargetCreated { .. }
            | Self::TargetReceived { .. }
            | Self::TargetCommitted { .. }
            | Self::TargetAborted { .. } => Role::Target,
        }
    }

    /// The variant's name, for errors and logs.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Self::SourceStarted { .. } => "SourceStarted",
            Self::SourceSwitchoverBegun { .. } => "SourceSwitchoverBegun",
            Self::SourceSwitchoverCancelled { .. } => "SourceSwitchoverCancelled",
            Self::SourceSwitched { .. } => "SourceSwitched",
            Self::SourceAborted { .. } => "SourceAborted",
            Self::SourceFinished { .. } => "SourceFinished",
            Self::SourceSettings { .. } => "SourceSettings",
            Self::SourceHolder { .. } => "SourceHolder",
            Self::SourceRepointed { .. } => "SourceRepointed",
            Self::SourceHolderTold { .. } => "SourceHolderTold",
            Self::TargetHolder { .. } => "TargetHolder",
            Self::TargetCreated { .. } => "TargetCreated",
            Self::TargetReceived { .. } => "TargetReceived",
            Self::TargetCommitted { .. } => "TargetCommitted",
            Self::TargetAborted { .. } => "TargetAborted",
            Self::SourceSeed { .. } => "SourceSeed",
            Self::TargetSeed { .. } => "TargetSeed",
        }
    }

    /// Appends the record's body to `out`; see the module docs for the layout.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        let mut writer = Writer { out };
        match self {
            Self::SourceStarted {
                job_id,
                batch,
                export,
                size_bytes,
                granularity_bytes,
                destination,
                policy,
            } => {
                writer.u8(KIND_SOURCE_STARTED);
                writer.u64(*job_id);
                writer.optional_str(batch.as_deref());
                writer.str(export);
                writer.u64(*size_bytes);
                writer.u64(*granularity_bytes);
                writer.str(destination);
                writer.u8(policy_byte(*policy));
            }
            Self::SourceSwitchoverBegun { job_id } => {
                writer.u8(KIND_SOURCE_SWITCHOVER_BEGUN);
                writer.u64(*job_id);
            }
            Self::SourceSwitchoverCancelled { job_id, reason } => {
                writer.u8(KIND_SOURCE_SWITCHOVER_CANCELLED);
                writer.u64(*job_id);
                writer.str(reason);
            }
            Self::SourceSwitched {
                job_id,
                forward_addr,
            } => {
                writer.u8(KIND_SOURCE_SWITCHED);
                writer.u64(*job_id);
                writer.str(forward_addr);
            }
            Self::SourceAborted { job_id, reason } => {
                writer.u8(KIND_SOURCE_ABORTED);
                writer.u64(*job_id);
                writer.str(reason);
            }
            Self::SourceFinished { job_id } => {
                writer.u8(KIND_SOURCE_FINISHED);
                writer.u64(*job_id);
            }
            Self::SourceSettings { job_id, settings } => {
                writer.u8(KIND_SOURCE_SETTINGS);
                writer.u64(*job_id);
                encode_settings(settings, &mut writer);
            }
            Self::TargetCreated { .. } | Self::TargetReceived { .. } => {
                self.encode_target_data(&mut writer);
            }
            Self::TargetCommitted { job_id } => {
                writer.u8(KIND_TARGET_COMMITTED);
                writer.u64(*job_id);
            }
            Self::TargetAborted { job_id, reason } => {
                writer.u8(KIND_TARGET_ABORTED);
                writer.u64(*job_id);
                writer.str(reason);
            }
            Self::SourceHolder { .. }
            | Self::SourceRepointed { .. }
            | Self::SourceHolderTold { .. }
            | Self::TargetHolder { .. } => self.encode_holding(&mut writer),
            Self::SourceSeed {
                job_id,
                seed_id,
                step,
                at_unix_ms,
            } => {
                writer.u8(KIND_SOURCE_SEED);
                writer.u64(*job_id);
                writer.out.extend_from_slice(seed_id);
                writer.u8(step.to_byte());
                writer.u64(*at_unix_ms);
            }
            Self::TargetSeed {
                job_id,
                seed_id,
                step,
                at_unix_ms,
                fingerprint,
            } => {
                writer.u8(KIND_TARGET_SEED);
                writer.u64(*job_id);
                writer.out.extend_from_slice(seed_id);
                writer.u8(step.to_byte());
                writer.u64(*at_unix_ms);
                writer.u64(*fingerprint);
            }
        }
        // Pair assertion: what we write is what decode accepts.
        debug_assert!(Self::decode(&out[start..]).is_ok_and(|read| read == *self));
    }

    /// The two records that carry more than an id and a string.
    fn encode_target_data(&self, writer: &mut Writer<'_>) {
        match self {
            Self::TargetCreated {
                job_id,
                batch,
                export,
                size_bytes,
                granularity_bytes,
                source,
                image_path,
            } => {
                writer.u8(KIND_TARGET_CREATED);
                writer.u64(*job_id);
                writer.optional_str(batch.as_deref());
                writer.str(export);
                writer.u64(*size_bytes);
                writer.u64(*granularity_bytes);
                writer.str(source);
                writer.bytes(image_path.as_os_str().as_bytes());
            }
            Self::TargetReceived { job_id, received } => {
                writer.u8(KIND_TARGET_RECEIVED);
                writer.u64(*job_id);
                encode_set(received, writer);
            }
            _ => unreachable!("only TargetCreated and TargetReceived"),
        }
    }

    /// The records of the guest connection's holder.
    fn encode_holding(&self, writer: &mut Writer<'_>) {
        match self {
            Self::SourceHolder { job_id, holder } | Self::TargetHolder { job_id, holder } => {
                let kind = if matches!(self, Self::SourceHolder { .. }) {
                    KIND_SOURCE_HOLDER
                } else {
                    KIND_TARGET_HOLDER
                };
                writer.u8(kind);
                writer.u64(*job_id);
                writer.str(&holder.addr);
                writer.u64(holder.job_id);
                writer.u64(u64::from(holder.moves));
            }
            Self::SourceRepointed {
                job_id,
                forward_addr,
                moves,
            } => {
                writer.u8(KIND_SOURCE_REPOINTED);
                writer.u64(*job_id);
                writer.str(forward_addr);
                writer.u64(u64::from(*moves));
            }
            Self::SourceHolderTold { job_id, outcome } => {
                writer.u8(KIND_SOURCE_HOLDER_TOLD);
                writer.u64(*job_id);
                writer.u8(outcome_byte(*outcome));
            }
            _ => unreachable!("only the holder records"),
        }
    }

    /// Parses one record body; the error names the problem.
    pub fn decode(body: &[u8]) -> Result<Record, String> {
        let mut fields = Fields {
            reader: codec::Reader::new(body),
        };
        let kind = fields.u8()?;
        let job_id = fields.u64()?;
        let record = match kind {
            KIND_SOURCE_STARTED => Self::SourceStarted {
                job_id,
                batch: fields.optional_string()?,
                export: fields.string()?,
                size_bytes: fields.u64()?,
                granularity_bytes: fields.u64()?,
                destination: fields.string()?,
                policy: policy_of(fields.u8()?)?,
            },
            KIND_SOURCE_SWITCHOVER_BEGUN => Self::SourceSwitchoverBegun { job_id },
            KIND_SOURCE_SWITCHOVER_CANCELLED => Self::SourceSwitchoverCancelled {
                job_id,
                reason: fields.string()?,
            },
            KIND_SOURCE_SWITCHED => Self::SourceSwitched {
                job_id,
                forward_addr: fields.string()?,
            },
            KIND_SOURCE_ABORTED => Self::SourceAborted {
                job_id,
                reason: fields.string()?,
            },
            KIND_SOURCE_FINISHED => Self::SourceFinished { job_id },
            KIND_SOURCE_SETTINGS => Self::SourceSettings {
                job_id,
                settings: decode_settings(&mut fields)?,
            },
            KIND_TARGET_CREATED => Self::TargetCreated {
                job_id,
                batch: fields.optional_string()?,
                export: fields.string()?,
                size_bytes: fields.u64()?,
                granularity_bytes: fields.u64()?,
                source: fields.string()?,
                image_path: PathBuf::from(std::ffi::OsStr::from_bytes(fields.bytes()?)),
            },
            KIND_TARGET_RECEIVED => Self::TargetReceived {
                job_id,
                received: decode_set(&mut fields)?,
            },
            KIND_TARGET_COMMITTED => Self::TargetCommitted { job_id },
            KIND_TARGET_ABORTED => Self::TargetAborted {
                job_id,
                reason: fields.string()?,
            },
            KIND_SOURCE_HOLDER => Self::SourceHolder {
                job_id,
                holder: fields.holder()?,
            },
            KIND_TARGET_HOLDER => Self::TargetHolder {
                job_id,
                holder: fields.holder()?,
            },
            KIND_SOURCE_REPOINTED => Self::SourceRepointed {
                job_id,
                forward_addr: fields.string()?,
                moves: fields.u32()?,
            },
            KIND_SOURCE_HOLDER_TOLD => Self::SourceHolderTold {
                job_id,
                outcome: outcome_of(fields.u8()?)?,
            },
            KIND_SOURCE_SEED => Self::SourceSeed {
                job_id,
                seed_id: fields.seed_id()?,
                step: SeedStep::from_byte(fields.u8()?)?,
                at_unix_ms: fields.u64()?,
            },
            KIND_TARGET_SEED => Self::TargetSeed {
                job_id,
                seed_id: fields.seed_id()?,
                step: SeedStep::from_byte(fields.u8()?)?,
                at_unix_ms: fields.u64()?,
                fingerprint: fields.u64()?,
            },
            other => return Err(format!("unknown record kind {other}")),
        };
        if !fields.reader.is_empty() {
            return Err(format!(
                "{} bytes after a {} record",
                fields.reader.remaining(),
                record.kind_name()
            ));
        }
        Ok(record)
    }
}

fn outcome_byte(outcome: RepointOutcome) -> u8 {
    match outcome {
        RepointOutcome::Repointed => 1,
        RepointOutcome::Superseded => 2,
        RepointOutcome::NotForwarding => 3,
    }
}

fn outcome_of(byte: u8) -> Result<RepointOutcome, String> {
    match byte {
        1 => Ok(RepointOutcome::Repointed),
        2 => Ok(RepointOutcome::Superseded),
        3 => Ok(RepointOutcome::NotForwarding),
        other => Err(format!("unknown re-point outcome {other}")),
    }
}

/// Appends fields to a body.
struct Writer<'a> {
    out: &'a mut Vec<u8>,
}

impl Writer<'_> {
    fn u8(&mut self, value: u8) {
        self.out.push(value);
    }

    fn u64(&mut self, value: u64) {
        self.out.extend_from_slice(&value.to_le_bytes());
    }

    fn bytes(&mut self, value: &[u8]) {
        // Bodies are bounded far below 4 GiB (`MAX_BODY_BYTES` in file.rs).
        let len = u32::try_from(value.len()).expect("a field is shorter than 4 GiB");
        self.out.extend_from_slice(&len.to_le_bytes());
        self.out.extend_from_slice(value);
    }

    fn str(&mut self, value: &str) {
        self.bytes(value.as_bytes());
    }

    fn optional_str(&mut self, value: Option<&str>) {
        match value {
            None => self.u8(0),
            Some(value) => {
                self.u8(1);
                self.str(value);
            }
        }
    }

    fn optional_u64(&mut self, value: Option<u64>) {
        match value {
            None => self.u8(0),
            Some(value) => {
                self.u8(1);
                self.u64(value);
            }
        }
    }

    fn varint(&mut self, mut value: u64) {
        while value >= 0x80 {
            self.out.push((value & 0x7f) as u8 | 0x80);
            value >>= 7;
        }
        self.out.push(value as u8);
    }
}

/// Reads the field encodings of a body over the checked cursor; running out is an error
/// naming the truncation, never a panic.
struct Fields<'a> {
    reader: codec::Reader<'a>,
}

impl<'a> Fields<'a> {
    fn u8(&mut self) -> Result<u8, String> {
        self.reader.u8().map_err(truncated)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.reader.u64_le().map_err(truncated)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let len = self.reader.u32_le().map_err(truncated)?;
        self.reader.bytes(len as usize).map_err(truncated)
    }

    fn string(&mut self) -> Result<String, String> {
        let bytes = self.bytes()?;
        String::from_utf8(bytes.to_vec()).map_err(|_| "string is not UTF-8".to_owned())
    }

    /// A `u64` field that must fit in 32 bits.
    fn u32(&mut self) -> Result<u32, String> {
        let value = self.u64()?;
        u32::try_from(value).map_err(|_| format!("{value} does not fit in 32 bits"))
    }

    fn seed_id(&mut self) -> Result<[u8; 16], String> {
        self.reader.array().map_err(truncated)
    }

    fn holder(&mut self) -> Result<Holder, String> {
        Ok(Holder {
            addr: self.string()?,
            job_id: self.u64()?,
            moves: self.u32()?,
        })
    }

    fn optional_string(&mut self) -> Result<Option<String>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.string().map(Some),
            other => Err(format!("option tag {other} is neither 0 nor 1")),
        }
    }

    fn optional_u64(&mut self) -> Result<Option<u64>, String> {
        match self.u8()? {
            0 => Ok(None),
            1 => self.u64().map(Some),
            other => Err(format!("option tag {other} is neither 0 nor 1")),
        }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.u8()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err("run length overflows 64 bits".to_owned());
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("run length longer than 10 bytes".to_owned())
    }
}

/// A body that ends inside a field.
fn truncated(err: CodecError) -> String {
    format!("truncated body: {err}")
}

/// A policy's byte.
fn policy_byte(policy: Policy) -> u8 {
    match policy {
        Policy::Heat => POLICY_HEAT,
        Policy::Naive => POLICY_NAIVE,
    }
}

/// The policy a byte names.
fn policy_of(byte: u8) -> Result<Policy, String> {
    match byte {
        POLICY_HEAT => Ok(Policy::Heat),
        POLICY_NAIVE => Ok(Policy::Naive),
        other => Err(format!("unknown policy {other}")),
    }
}

/// Writes a job's settings (the table in the module docs).
fn encode_settings(settings: &JobSettings, writer: &mut Writer<'_>) {
    writer.u8(policy_byte(settings.policy));
    writer.u64(settings.max_pause_ms);
    writer.u64(settings.target_pause_ms);
    writer.optional_u64(settings.force_after_ms);
    writer.optional_u64(settings.bandwidth_bytes_per_s);
    writer.u8(settings.hot_threshold);
    let flags = [
        (settings.mirror, SETTINGS_MIRROR),
        (settings.verify, SETTINGS_VERIFY),
        (settings.yield_to_guest, SETTINGS_YIELD_TO_GUEST),
    ];
    writer.u8(flags
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |acc, (_, bit)| acc | bit));
}

/// Reads a job's settings; flag bits this version does not know are refused.
fn decode_settings(fields: &mut Fields<'_>) -> Result<JobSettings, String> {
    let policy = policy_of(fields.u8()?)?;
    let max_pause_ms = fields.u64()?;
    let target_pause_ms = fields.u64()?;
    let force_after_ms = fields.optional_u64()?;
    let bandwidth_bytes_per_s = fields.optional_u64()?;
    let hot_threshold = fields.u8()?;
    let flags = fields.u8()?;
    let known = SETTINGS_MIRROR | SETTINGS_VERIFY | SETTINGS_YIELD_TO_GUEST;
    if flags & !known != 0 {
        return Err(format!("unknown settings flags {:#04x}", flags & !known));
    }
    Ok(JobSettings {
        policy,
        max_pause_ms,
        target_pause_ms,
        force_after_ms,
        bandwidth_bytes_per_s,
        hot_threshold,
        mirror: flags & SETTINGS_MIRROR != 0,
        verify: flags & SETTINGS_VERIFY != 0,
        yield_to_guest: flags & SETTINGS_YIELD_TO_GUEST != 0,
    })
}

/// Bytes of `value` as a LEB128 varint.
fn varint_len(value: u64) -> usize {
    let bits = 64 - value.leading_zeros() as usize;
    bits.div_ceil(7).max(1)
}

/// Lengths of the alternating clear and set runs of `set`, starting with a clear run (which
/// is 0 when block 0 is set). A set of no blocks is one clear run of 0.
fn run_lengths(set: &DirtySet) -> Vec<u64> {
    let mut runs = Vec::new();
    let mut position = 0;
    for (first, end) in set.iter_runs() {
        runs.push(first - position);
        runs.push(end - first);
        position = end;
    }
    if runs.is_empty() || position < set.block_count() {
        runs.push(set.block_count() - position);
    }
    runs
}

/// Writes a block set: geometry, then words or runs, whichever is shorter.
fn encode_set(set: &DirtySet, writer: &mut Writer<'_>) {
    writer.u64(set.granularity_bytes());
    writer.u64(set.disk_bytes());
    let runs = run_lengths(set);
    let runs_bytes: usize = runs.iter().map(|&run| varint_len(run)).sum();
    let word_count = set.word_count();
    if (runs_bytes as u64) < word_count * 8 {
        writer.u8(SET_ENCODING_RUNS);
        for run in runs {
            writer.varint(run);
        }
    } else {
        // Dense: only when the runs are longer, so the set is dense and its words few.
        writer.u8(SET_ENCODING_WORDS);
        let mut next = 0;
        for (word, bits) in set.iter_words() {
            for _ in next..word {
                writer.u64(0);
            }
            writer.u64(bits);
            next = word + 1;
        }
        for _ in next..word_count {
            writer.u64(0);
        }
    }
}

/// Reads a block set, checking the geometry before allocating anything; memory then follows
/// the input (dense words are bounded by the bytes present, each run costs at most three
/// spans of the sparse set).
fn decode_set(fields: &mut Fields<'_>) -> Result<DirtySet, String> {
    let granularity_bytes = fields.u64()?;
    let disk_bytes = fields.u64()?;
    let block_count = checked_block_count(disk_bytes, granularity_bytes)
        .map_err(|problem| format!("block set: {problem}"))?;
    match fields.u8()? {
        SET_ENCODING_WORDS => {
            let words = read_le_words(&mut fields.reader, block_count)
                .map_err(|err| format!("block set: {}", crate::error::error_chain(&err)))?;
            Ok(DirtySet::from_words(
                granularity_bytes,
                disk_bytes,
                block_count,
                words,
            ))
        }
        SET_ENCODING_RUNS => {
            let mut set = DirtySet::empty(granularity_bytes, disk_bytes);
            decode_runs(fields, &mut set)?;
            Ok(set)
        }
        other => Err(format!("unknown block set encoding {other}")),
    }
}

/// Reads alternating runs summing to the set's block count into `set`.
fn decode_runs(fields: &mut Fields<'_>, set: &mut DirtySet) -> Result<(), String> {
    let block_count = set.block_count();
    let (mut in_set, mut block, mut first) = (false, 0u64, true);
    loop {
        let run = fields.varint()?;
        if run == 0 && !first {
            return Err(format!("empty run after block {block}"));
        }
        let end = block
            .checked_add(run)
            .filter(|&end| end <= block_count)
            .ok_or_else(|| format!("runs pass block count {block_count}"))?;
        if in_set {
            set.insert_range(block, end);
        }
        block = end;
        if block == block_count {
            return Ok(());
        }
        (in_set, first) = (!in_set, false);
    }
}

/// One replayed record and where it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its sequence number.
    pub seq: u64,
    /// Offset of its frame in the file.
    pub offset_bytes: u64,
    /// Length of its frame.
    pub frame_bytes: u64,
    /// The record.
    pub record: Record,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prng::SplitMix64;

    /// A set of `block_count` 64 KiB blocks (the last one partial) holding `blocks`.
    fn set_of(block_count: u64, blocks: impl IntoIterator<Item = u64>) -> DirtySet {
        let granularity_bytes = 64 << 10;
        let disk_bytes = (block_count * granularity_bytes).saturating_sub(512);
        let mut set = DirtySet::empty(granularity_bytes, disk_bytes);
        for block in blocks {
            set.insert(block);
        }
        set
    }

    /// One record of every kind, with fields that exercise every encoding.
    pub(crate) fn every_kind() -> Vec<Record> {
        vec![
            Record::SourceStarted {
                job_id: 7,
                batch: Some("rack-4".into()),
                export: "vm-a".into(),
                size_bytes: 10 << 30,
                granularity_bytes: 64 << 10,
                destination: "10.0.0.2:7410".into(),
                policy: Policy::Heat,
            },
            Record::SourceStarted {
                job_id: u64::MAX,
                batch: None,
                export: String::new(),
                size_bytes: 0,
                granularity_bytes: 4096,
                destination: "[::1]:7410".into(),
                policy: Policy::Naive,
            },
            Record::SourceSettings {
                job_id: 7,
                settings: settings(),
            },
            Record::SourceSettings {
                job_id: 8,
                settings: JobSettings {
                    policy: Policy::Naive,
                    max_pause_ms: u64::MAX,
                    target_pause_ms: 0,
                    force_after_ms: Some(0),
                    bandwidth_bytes_per_s: None,
                    hot_threshold: u8::MAX,
                    mirror: true,
                    verify: true,
                    yield_to_guest: true,
                },
            },
            Record::SourceSwitchoverBegun { job_id: 7 },
            Record::SourceSwitchoverCancelled {
                job_id: 7,
                reason: "verification failed: é".into(),
            },
            Record::SourceSwitched {
                job_id: 7,
                forward_addr: "10.0.0.2:10809".into(),
            },
            Record::SourceAborted {
                job_id: 8,
                reason: "operator".into(),
            },
            Record::SourceFinished { job_id: 7 },
            Record::TargetCreated {
                job_id: 9,
                batch: Some(String::new()),
                export: "vm-b".into(),
                size_bytes: 100 * (64 << 10) - 512,
                granularity_bytes: 64 << 10,
                source: "10.0.0.1:40122".into(),
                image_path: PathBuf::from(std::ffi::OsStr::from_bytes(b"/var/lib/ferry/\xffb.img")),
            },
            Record::TargetReceived {
                job_id: 9,
                received: set_of(100, 0..40),
            },
            Record::TargetReceived {
                job_id: 9,
                received: set_of(100, (0..100).step_by(3)),
            },
            Record::TargetCommitted { job_id: 9 },
            Record::TargetAborted {
                job_id: 10,
                reason: String::new(),
            },
            Record::SourceHolder {
                job_id: 11,
                holder: Holder {
                    addr: "10.0.0.1:7451".into(),
                    job_id: 3,
                    moves: 1,
                },
            },
            Record::TargetHolder {
                job_id: 12,
                holder: Holder {
                    addr: String::new(),
                    job_id: u64::MAX,
                    moves: u32::MAX,
                },
            },
            Record::SourceRepointed {
                job_id: 3,
                forward_addr: "10.0.0.3:10809".into(),
                moves: 2,
            },
            Record::SourceHolderTold {
                job_id: 11,
                outcome: RepointOutcome::Repointed,
            },
            Record::SourceHolderTold {
                job_id: 11,
                outcome: RepointOutcome::NotForwarding,
            },
            Record::SourceSeed {
                job_id: 13,
                seed_id: [7; 16],
                step: SeedStep::Exported,
                at_unix_ms: 1_700_000_000_000,
            },
            Record::TargetSeed {
                job_id: 13,
                seed_id: [7; 16],
                step: SeedStep::InSync,
                at_unix_ms: u64::MAX,
                fingerprint: 42,
            },
        ]
    }

    /// Settings of a capped job, as `ferry migrate --bandwidth 32M --force-after 60000` gives.
    pub(crate) fn settings() -> JobSettings {
        JobSettings {
            policy: Policy::Heat,
            max_pause_ms: 100,
            target_pause_ms: 10,
            force_after_ms: Some(60_000),
            bandwidth_bytes_per_s: Some(32 << 20),
            hot_threshold: 8,
            mirror: false,
            verify: true,
            yield_to_guest: false,
        }
    }

    fn round_trip(record: &Record) -> Vec<u8> {
        let mut body = Vec::new();
        record.encode(&mut body);
        assert_eq!(Record::decode(&body).as_ref(), Ok(record));
        body
    }

    #[test]
    fn a_whole_disk_run_decodes_in_memory_of_its_runs() {
        // Goal: the fuzz finding (a 44-byte record whose runs cover 2^32 blocks allocated the
        // dense 512 MiB) stays fixed: memory follows the runs. Method: encode an empty set of
        // 2^32 blocks (one clear run), rewrite its runs as "0 clear, 2^32 set", decode.
        let record = Record::TargetReceived {
            job_id: 1,
            received: DirtySet::empty(4096, 4096 << 32),
        };
        let mut body = round_trip(&record);
        let run = [0x80, 0x80, 0x80, 0x80, 0x10]; // varint 2^32
        assert!(body.ends_with(&run), "{body:?}");
        body.truncate(body.len() - run.len());
        body.push(0);
        body.extend_from_slice(&run);
        assert!(body.len() <= 44, "{} bytes", body.len());
        let Ok(Record::TargetReceived { received, .. }) = Record::decode(&body) else {
            panic!("decodes");
        };
        assert_eq!(received.count(), 1 << 32);
        assert!(
            received.allocated_bytes() < 100,
            "{}",
            received.allocated_bytes()
        );
    }

    #[test]
    fn every_record_kind_round_trips() {
        // Goal: each kind decodes to what was encoded, and a body cut short or lengthened is
        // refused. Method: encode one record of each kind (some with edge values), decode;
        // then drop the last byte and add one.
        for record in every_kind() {
            let body = round_trip(&record);
            let err = Record::decode(&body[..body.len() - 1]).expect_err("short body");
            assert!(err.contains("truncated") || err.contains("run"), "{err}");
            let mut longer = body.clone();
            longer.push(0);
            let err = Record::decode(&longer).expect_err("long body");
            assert!(err.contains("bytes after"), "{record:?}: {err}");
        }
    }

    #[test]
    fn settings_have_the_documented_layout() {
        // Goal: the SourceSettings body is exactly the table in the module docs (so a later
        // change of the encoding shows here), and flag bits this version does not know are
        // refused. Method: encode known settings and compare with bytes written out by hand;
        // then set an unknown flag bit and an unknown option tag.
        let body = round_trip(&Record::SourceSettings {
            job_id: 7,
            settings: settings(),
        });
        let mut expected = vec![KIND_SOURCE_SETTINGS];
        expected.extend_from_slice(&7u64.to_le_bytes());
        expected.push(POLICY_HEAT);
        expected.extend_from_slice(&100u64.to_le_bytes());
        expected.extend_from_slice(&10u64.to_le_bytes());
        expected.push(1);
        expected.extend_from_slice(&60_000u64.to_le_bytes());
        expected.push(1);
        expected.extend_from_slice(&(32u64 << 20).to_le_bytes());
        expected.push(8);
        expected.push(SETTINGS_VERIFY);
        assert_eq!(body, expected);
        let mut unknown_flag = body.clone();
        *unknown_flag.last_mut().expect("flags") |= 0x80;
        let err = Record::decode(&unknown_flag).expect_err("unknown flag");
        assert!(err.contains("unknown settings flags 0x80"), "{err}");
        let mut bad_tag = body.clone();
        bad_tag[1 + 8 + 1 + 8 + 8] = 2;
        let err = Record::decode(&bad_tag).expect_err("bad tag");
        assert!(err.contains("option tag 2"), "{err}");
    }

    #[test]
    fn older_record_kinds_keep_their_encoding() {
        // Goal: adding SourceSettings changed no existing encoding, so journals written
        // before it read the same. Method: a SourceStarted body written out by hand (the
        // layout of the first journal version) decodes to the record and re-encodes to it.
        let mut body = vec![KIND_SOURCE_STARTED];
        body.extend_from_slice(&7u64.to_le_bytes());
        body.push(1);
        body.extend_from_slice(&2u32.to_le_bytes());
        body.extend_from_slice(b"b1");
        body.extend_from_slice(&3u32.to_le_bytes());
        body.extend_from_slice(b"vm1");
        body.extend_from_slice(&(1u64 << 30).to_le_bytes());
        body.extend_from_slice(&(64u64 << 10).to_le_bytes());
        body.extend_from_slice(&9u32.to_le_bytes());
        body.extend_from_slice(b"host:7451");
        body.push(POLICY_NAIVE);
        let record = Record::decode(&body).expect("decodes");
        assert_eq!(
            record,
            Record::SourceStarted {
                job_id: 7,
                batch: Some("b1".into()),
                export: "vm1".into(),
                size_bytes: 1 << 30,
                granularity_bytes: 64 << 10,
                destination: "host:7451".into(),
                policy: Policy::Naive,
            }
        );
        assert_eq!(round_trip(&record), body);
    }

    #[test]
    fn block_sets_round_trip_in_the_shorter_encoding() {
        // Goal: any set survives encoding, contiguous sets take a few bytes and scattered ones
        // no more than their raw words. Method: edge sets (empty, full, first/last block, one
        // word boundary), then PRNG sets of random density and size.
        let mut sets = vec![
            set_of(0, []),
            set_of(1, [0]),
            set_of(64, 0..64),
            set_of(65, [64]),
            set_of(128, 63..65),
            set_of(1000, 0..1000),
            set_of(1000, [0, 999]),
        ];
        let mut prng = SplitMix64::new(0x5eed);
        for _ in 0..300 {
            let block_count = prng.below(700);
            let per_mille = prng.pick(&[0, 5, 300, 500, 995, 1000]);
            let blocks: Vec<u64> = (0..block_count)
                .filter(|_| prng.chance(per_mille))
                .collect();
            sets.push(set_of(block_count, blocks));
        }
        for set in sets {
            let record = Record::TargetReceived {
                job_id: 1,
                received: set.clone(),
            };
            let body = round_trip(&record);
            let header_bytes = 1 + 8 + 8 + 8 + 1;
            assert!(
                body.len() as u64 <= header_bytes as u64 + set.word_count() * 8,
                "{set:?}"
            );
            if set.iter_extents().count() <= 1 {
                assert!(body.len() <= header_bytes + 20, "{} bytes", body.len());
            }
        }
    }

    #[test]
    fn malformed_bodies_are_errors_not_panics() {
        // Goal: decode survives any bytes (invariant 3 of DESIGN.md, for the disk). Method:
        // PRNG bodies, and valid bodies with PRNG bytes overwritten; decode must return.
        let mut prng = SplitMix64::new(42);
        let valid: Vec<Vec<u8>> = every_kind().iter().map(round_trip).collect();
        for _ in 0..20_000 {
            let mut body = if prng.chance(500) {
                (0..prng.below(64)).map(|_| prng.byte()).collect()
            } else {
                valid[prng.index(valid.len())].clone()
            };
            for _ in 0..prng.below(3) {
                if !body.is_empty() {
                    let at = prng.index(body.len());
                    body[at] = prng.byte();
                }
            }
            let _ = Record::decode(&body);
        }
        assert!(Record::decode(&[]).is_err());
        assert!(Record::decode(&[99, 0, 0, 0, 0, 0, 0, 0, 0])
            .expect_err("kind 99")
            .contains("unknown record kind 99"));
    }

    #[test]
    fn non_canonical_runs_are_refused() {
        // Goal: a run list that does not sum to the block count, or has an empty inner run,
        // is refused. Method: hand-made run bodies for a 100-block set.
        let body = |runs: &[u8]| {
            let mut body = vec![KIND_TARGET_RECEIVED];
            body.extend_from_slice(&1u64.to_le_bytes());
            body.extend_from_slice(&(64u64 << 10).to_le_bytes());
            body.extend_from_slice(&(100u64 * (64 << 10)).to_le_bytes());
            body.push(SET_ENCODING_RUNS);
            body.extend_from_slice(runs);
            body
        };
        assert!(Record::decode(&body(&[0, 100])).is_ok());
        assert!(Record::decode(&body(&[40, 60])).is_ok());
        let cases: [(&[u8], &str); 4] = [
            (&[40, 0, 60], "empty run"),
            (&[40, 61], "pass block count"),
            (&[40], "truncated"),
            (&[0xff; 11], "overflows"),
        ];
        for (runs, problem) in cases {
            let err = Record::decode(&body(runs)).expect_err("refused");
            assert!(err.contains(problem), "{runs:?}: {err}");
        }
    }
}
