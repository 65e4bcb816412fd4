//! The seed steps of a job (`docs/seed-format.md`): a disk that travels on portable media is
//! a migration job whose bulk copy went to a medium instead of the block stream. These
//! records say where the seed stands at each end, so that `ferry status` and a restarted
//! agent know it.
//!
//! Invariants:
//! - A job carries at most one seed: every seed record of a job names the seed id of its
//!   first one (the fold refuses another).
//! - Source steps only go `Exporting → Exported → InSync*`; target steps `Importing →
//!   Imported`, then `CatchingUp` and `InSync` in any order (`CatchingUp` before a catch-up
//!   stream writes, `InSync` at each in-sync point; both repeat).
//! - The target's `fingerprint` is of the image file as ferry left it (inode, size, mtime,
//!   ctime): a later Open that finds another fingerprint knows the image was written outside
//!   ferry, and compares digests instead of trusting it.

use serde::{Deserialize, Serialize};

/// Where a seed stands at one end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SeedStep {
    /// Source: the copy onto the medium runs (or was interrupted: `--resume`).
    Exporting,
    /// Source: the medium is sealed; it may be shipped.
    Exported,
    /// Target: the medium is being verified into the image (or was interrupted).
    Importing,
    /// Target: every extent verified and written; the image waits for a catch-up.
    Imported,
    /// Both ends: a catch-up reached a point in time; the target equals the source as it was
    /// then.
    InSync,
    /// Target: a catch-up stream may write the image: it is consistent with no point in time
    /// until the next `InSync`.
    CatchingUp,
}

impl SeedStep {
    /// Lower-case name, as `ferry status` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exporting => "exporting",
            Self::Exported => "exported",
            Self::Importing => "importing",
            Self::Imported => "imported",
            Self::InSync => "in-sync",
            Self::CatchingUp => "catching-up",
        }
    }

    /// The byte a journal stores.
    pub(super) fn to_byte(self) -> u8 {
        match self {
            Self::Exporting => 1,
            Self::Exported => 2,
            Self::Importing => 3,
            Self::Imported => 4,
            Self::InSync => 5,
            Self::CatchingUp => 6,
        }
    }

    /// The step of a stored byte.
    pub(super) fn from_byte(byte: u8) -> Result<Self, String> {
        Ok(match byte {
            1 => Self::Exporting,
            2 => Self::Exported,
            3 => Self::Importing,
            4 => Self::Imported,
            5 => Self::InSync,
            6 => Self::CatchingUp,
            other => return Err(format!("unknown seed step {other}")),
        })
    }

    /// Whether `next` may follow `self` at the same end (`None`: the first seed record).
    pub fn may_follow(previous: Option<SeedStep>, next: SeedStep) -> bool {
        use SeedStep::{CatchingUp, Exported, Exporting, Imported, Importing, InSync};
        matches!(
            (previous, next),
            (None, Exporting | Importing)
                | (Some(Exporting), Exporting | Exported)
                | (Some(Importing), Importing | Imported)
                | (Some(Exported), InSync)
                | (Some(Imported | InSync | CatchingUp), CatchingUp)
                | (Some(InSync | CatchingUp), InSync)
        )
    }

    /// Whether this step is written by the source.
    pub fn is_source(self) -> bool {
        matches!(self, Self::Exporting | Self::Exported | Self::InSync)
    }

    /// Whether this step is written by the target.
    pub fn is_target(self) -> bool {
        matches!(
            self,
            Self::Importing | Self::Imported | Self::InSync | Self::CatchingUp
        )
    }
}

impl std::fmt::Display for SeedStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What one end's journal says of a job's seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedView {
    /// The seed (a random UUID, as the medium's header carries it).
    pub seed_id: [u8; 16],
    /// The latest step.
    pub step: SeedStep,
    /// When the latest step was recorded (Unix ms).
    pub at_unix_ms: u64,
    /// When the seed's tracker was created (the first `Exporting`), source only.
    pub started_unix_ms: u64,
    /// The latest in-sync point (Unix ms), if any.
    pub in_sync_unix_ms: Option<u64>,
    /// Target only: the image's fingerprint as ferry last left it.
    pub fingerprint: u64,
}

impl SeedView {
    /// The view of a job's first seed record.
    pub fn first(seed_id: [u8; 16], step: SeedStep, at_unix_ms: u64, fingerprint: u64) -> Self {
        SeedView {
            seed_id,
            step,
            at_unix_ms,
            started_unix_ms: at_unix_ms,
            in_sync_unix_ms: (step == SeedStep::InSync).then_some(at_unix_ms),
            fingerprint,
        }
    }

    /// Applies a later record of the same seed.
    pub fn advance(&mut self, step: SeedStep, at_unix_ms: u64, fingerprint: u64) {
        self.step = step;
        self.at_unix_ms = at_unix_ms;
        self.fingerprint = fingerprint;
        if step == SeedStep::InSync {
            self.in_sync_unix_ms = Some(at_unix_ms);
        }
    }
}

/// The seed id as text: 32 lower-case hex digits, as media file names and the CLI show it.
pub fn seed_id_hex(seed_id: &[u8; 16]) -> String {
    seed_id.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Parses [`seed_id_hex`]'s form (dashes allowed, as in a UUID).
pub fn parse_seed_id(text: &str) -> Option<[u8; 16]> {
    let digits: Vec<u8> = text.bytes().filter(|&b| b != b'-').collect();
    if digits.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, pair) in digits.chunks(2).enumerate() {
        let text = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(text, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_follow_each_other_only_forward() {
        // Goal: each end's order is enforced and in-sync repeats.
        use SeedStep::*;
        assert!(SeedStep::may_follow(None, Exporting));
        assert!(SeedStep::may_follow(Some(Exporting), Exporting));
        assert!(SeedStep::may_follow(Some(Exporting), Exported));
        assert!(SeedStep::may_follow(Some(Exported), InSync));
        assert!(SeedStep::may_follow(Some(InSync), InSync));
        assert!(SeedStep::may_follow(Some(Imported), CatchingUp));
        assert!(SeedStep::may_follow(Some(CatchingUp), InSync));
        assert!(!SeedStep::may_follow(Some(Imported), InSync));
        assert!(!SeedStep::may_follow(Some(Exported), CatchingUp));
        assert!(!SeedStep::may_follow(Some(Exporting), InSync));
        assert!(!SeedStep::may_follow(Some(Exported), Exporting));
        assert!(!SeedStep::may_follow(None, InSync));
        assert!(!SeedStep::may_follow(Some(Importing), InSync));
        for step in [Exporting, Exported, Importing, Imported, InSync, CatchingUp] {
            assert_eq!(SeedStep::from_byte(step.to_byte()), Ok(step));
        }
        assert!(SeedStep::from_byte(9).is_err());
    }

    #[test]
    fn seed_ids_print_and_parse() {
        let id = [0xab; 16];
        let text = seed_id_hex(&id);
        assert_eq!(text.len(), 32);
        assert_eq!(parse_seed_id(&text), Some(id));
        assert_eq!(
            parse_seed_id("abababab-abab-abab-abab-abababababab"),
            Some(id)
        );
        assert_eq!(parse_seed_id("xyz"), None);
        assert_eq!(parse_seed_id(&"g".repeat(32)), None);
    }
}
