//! Migration policies and options: which blocks a pass copies, and the budgets a run keeps.
//!
//! Purpose: [`Policy::Heat`] implements US8560791B2 (copy cold blocks first, leave hot blocks
//! for the end, mirror when the copy cannot catch up); [`Policy::Naive`] is what QEMU's mirror
//! job does (copy everything in offset order, then iterate on dirty blocks), kept beside it so
//! every run can show the difference. The pass loop itself lives in `plan.rs`.
//!
//! Invariants:
//! - Heat only orders the work; it never decides whether a block is copied. Every block a
//!   policy skips in a pass is put back as dirty, so it is copied by a later pass or at the
//!   switchover (DESIGN.md capability 1).
//! - Options are checked by [`MigrateOptions::validate`] before the run touches the env.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::dirty::{DirtySet, HeatSnapshot, HOT_THRESHOLD};

/// How a migration orders its copy passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Cold blocks first, hot blocks last or during the switchover; mirror when the forecast
    /// says the copy cannot catch up with the guest.
    #[default]
    Heat,
    /// Every allocated block in offset order, then dirty passes until the rest fits the pause
    /// budget. After `max_passes` passes it falls back to active mirroring (what QEMU's
    /// `copy-mode=write-blocking` does), so it also terminates under write-heavy guests; it
    /// never forecasts, so it gets there only after spending every pass.
    Naive,
}

impl Policy {
    /// The policy's name as the CLI and the API spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Heat => "heat",
            Self::Naive => "naive",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy name that is neither `heat` nor `naive`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown migration policy {0:?} (expected \"heat\" or \"naive\")")]
pub struct PolicyParseError(pub String);

impl FromStr for Policy {
    type Err = PolicyParseError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "heat" => Ok(Self::Heat),
            "naive" => Ok(Self::Naive),
            other => Err(PolicyParseError(other.to_owned())),
        }
    }
}

/// Default bound on the guest write pause at switchover.
pub const DEFAULT_MAX_PAUSE_MS: u64 = 100;
/// Default pause the run aims for (see [`MigrateOptions::target_pause_ms`]).
pub const DEFAULT_TARGET_PAUSE_MS: u64 = 10;
/// Default number of copy passes before the run falls back to mirroring.
pub const DEFAULT_MAX_PASSES: u32 = 30;
/// Default number of blocks handed to one `send` call.
pub const DEFAULT_CHUNK_BLOCKS: u64 = 256;
/// Default number of passes without a shrinking dirty set after which the heat policy gives
/// up iterating and mirrors.
pub const DEFAULT_STALL_PASSES: u32 = 3;

/// What a migration run may do; see the field docs for each budget.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// How passes are ordered.
    pub policy: Policy,
    /// Longest guest write pause allowed at switchover; a switchover whose forecast exceeds
    /// it is deferred (counted in the report) and the run goes on.
    pub max_pause_ms: u64,
    /// The pause the run aims for: while the dirty set still shrinks, the switchover is
    /// attempted only once the remainder is forecast to fit this (clamped to `max_pause_ms`);
    /// once it stops shrinking, anything within `max_pause_ms` is taken. Most switchovers
    /// then pause far below the hard bound.
    pub target_pause_ms: u64,
    /// After this long since the run started, the switchover is no longer deferred: the pause
    /// may then exceed `max_pause_ms` (the report says `forced`). `None`: never.
    pub force_after_ms: Option<u64>,
    /// Heat at or above which a block is hot (heat policy only).
    pub hot_threshold: u8,
    /// Copy passes before the run falls back to active mirroring.
    pub max_passes: u32,
    /// Mirror guest writes from the start (QEMU's `copy-mode=write-blocking`): one pass
    /// copies what was there, the guest's writes wait for both sides, and the run always
    /// converges at the cost of guest write latency.
    #[serde(default)]
    pub mirror_from_start: bool,
    /// Heat policy: passes in a row whose dirty set did not shrink before it mirrors.
    pub stall_passes: u32,
    /// Blocks per `send` call: smaller chunks give finer progress and bandwidth samples.
    pub chunk_blocks: u64,
    /// `false`: a fresh run, which first marks every allocated block dirty. `true`: resume
    /// after a failed run: the tracker's dirty bits already hold everything the destination
    /// may lack (a failed run merges back what it took), so nothing is added (the allocated
    /// blocks are still asked for, for the report).
    pub resume: bool,
    /// How the run ends: a switchover (a migration) or an in-sync point (a seed catch-up).
    #[serde(default)]
    pub ending: Ending,
    /// The dirty bytes below which the run may end (besides the pause budget); `None`: the
    /// pause budget alone decides.
    #[serde(default)]
    pub threshold_bytes: Option<u64>,
    /// The guest's p99 (µs) the copy is steered to stay within ([`super::steer`]); `None`:
    /// the copy is not steered. The job resolves `--max-impact` to it.
    #[serde(default)]
    pub impact_target_us: Option<u64>,
    /// The guest's own p99 before the job (µs), when measured: what the copy adds is
    /// judged from it.
    #[serde(default)]
    pub impact_own_us: Option<u64>,
    /// The bound holds whatever it costs in time (an explicit `--max-impact`); `false`:
    /// only while slowing down spares the guest (`auto`).
    #[serde(default)]
    pub impact_strict: bool,
}

/// How a run ends once what remains fits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Ending {
    /// Commit at the destination and forward to it: the destination is authoritative.
    #[default]
    Switchover,
    /// Record an in-sync point at both ends with writes held, then release them: the
    /// destination equals the source as it was at that point; the source stays
    /// authoritative and its tracker goes on (a seed catch-up, continuous replication).
    InSync,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            policy: Policy::Heat,
            max_pause_ms: DEFAULT_MAX_PAUSE_MS,
            target_pause_ms: DEFAULT_TARGET_PAUSE_MS,
            force_after_ms: None,
            hot_threshold: HOT_THRESHOLD,
            max_passes: DEFAULT_MAX_PASSES,
            mirror_from_start: false,
            stall_passes: DEFAULT_STALL_PASSES,
            chunk_blocks: DEFAULT_CHUNK_BLOCKS,
            resume: false,
            ending: Ending::Switchover,
            threshold_bytes: None,
            impact_target_us: None,
            impact_own_us: None,
            impact_strict: false,
        }
    }
}

impl MigrateOptions {
    /// Default options with `policy`.
    pub fn with_policy(policy: Policy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Checks the budgets; the error names the bad field.
    pub fn validate(&self) -> Result<(), &'static str> {
        if self.max_passes == 0 {
            return Err("max_passes must be at least 1");
        }
        if self.stall_passes == 0 {
            return Err("stall_passes must be at least 1");
        }
        if self.chunk_blocks == 0 {
            return Err("chunk_blocks must be at least 1");
        }
        if self.hot_threshold == 0 {
            return Err("hot_threshold must be at least 1 (0 would make every block hot)");
        }
        Ok(())
    }
}

/// Splits `taken` into the blocks to copy now and the hot ones to put back, by `heat` (per
/// region) and `threshold`. Returns `(cold, hot)`; together they are `taken`. Walks runs of
/// `taken` against the hot regions, so the cost follows runs and regions, not blocks.
pub fn split_hot(taken: &DirtySet, heat: &HeatSnapshot, threshold: u8) -> (DirtySet, DirtySet) {
    let granularity_bytes = taken.granularity_bytes();
    let disk_bytes = taken.disk_bytes();
    let mut cold = DirtySet::empty(granularity_bytes, disk_bytes);
    let mut hot = DirtySet::empty(granularity_bytes, disk_bytes);
    let shift = heat.region_shift();
    // Hot block ranges, in order; a region missing from the snapshot reads as cold (copying
    // early is always safe).
    let mut hot_ranges = heat
        .regions()
        .filter(|&(_, region_heat)| region_heat >= threshold)
        .map(|(region, _)| (region << shift, (region + 1) << shift))
        .peekable();
    for (first, end) in taken.iter_runs() {
        let mut block = first;
        while block < end {
            while hot_ranges.next_if(|&(_, stop)| stop <= block).is_some() {}
            match hot_ranges.peek() {
                Some(&(start, stop)) if start < end => {
                    if start > block {
                        cold.insert_range(block, start);
                    }
                    let upto = stop.min(end);
                    hot.insert_range(block.max(start), upto);
                    block = upto;
                }
                _ => {
                    cold.insert_range(block, end);
                    block = end;
                }
            }
        }
    }
    debug_assert_eq!(cold.count() + hot.count(), taken.count());
    (cold, hot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_round_trip() {
        // Goal: CLI/API spelling is stable. Method: parse each Display form, reject others.
        for policy in [Policy::Heat, Policy::Naive] {
            assert_eq!(policy.to_string().parse::<Policy>(), Ok(policy));
        }
        assert_eq!(
            "Heat".parse::<Policy>(),
            Err(PolicyParseError("Heat".into()))
        );
        let json = serde_json::to_string(&MigrateOptions::default()).expect("serialize");
        assert!(json.contains("\"policy\":\"heat\""), "{json}");
    }

    #[test]
    fn options_validate_names_the_field() {
        // Goal: bad budgets are refused before any I/O. Method: zero each bounded field.
        assert_eq!(MigrateOptions::default().validate(), Ok(()));
        let mut options = MigrateOptions::with_policy(Policy::Naive);
        options.max_passes = 0;
        assert!(options.validate().unwrap_err().contains("max_passes"));
        let options = MigrateOptions {
            chunk_blocks: 0,
            ..MigrateOptions::default()
        };
        assert!(options.validate().unwrap_err().contains("chunk_blocks"));
    }

    #[test]
    fn split_hot_partitions_the_taken_set() {
        // Goal: hot blocks are put back, cold ones copied, none lost. Method: 8 blocks with
        // chosen heats, threshold 8; a short heat slice reads as cold.
        let mut taken = DirtySet::empty(4096, 8 * 4096);
        for block in [0, 2, 3, 7] {
            taken.insert(block);
        }
        let heat = HeatSnapshot::new(0, [(0, 9), (2, 8), (3, 7), (4, 255)]);
        let (cold, hot) = split_hot(&taken, &heat, 8);
        let regions = HeatSnapshot::new(2, [(0, 9)]);
        let (cold_regions, hot_regions) = split_hot(&taken, &regions, 8);
        assert_eq!(cold_regions.iter_blocks().collect::<Vec<_>>(), vec![7]);
        assert_eq!(hot_regions.iter_blocks().collect::<Vec<_>>(), vec![0, 2, 3]);
        assert_eq!(cold.iter_blocks().collect::<Vec<_>>(), vec![3, 7]);
        assert_eq!(hot.iter_blocks().collect::<Vec<_>>(), vec![0, 2]);
    }
}
