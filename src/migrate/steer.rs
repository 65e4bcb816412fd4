//! The copy controller: steers the bulk copy's rate so that the guest's latency stays within
//! a target (`--max-impact`), and says when that target and convergence conflict.
//!
//! Purpose: on a disk the guest and the copy share, a copy at full speed queues the guest's
//! I/O behind it. No fixed speed limit fits every guest, so the job measures what the guest
//! feels (its latency histogram on the export, windows of at least [`WINDOW_NS`]) and sets
//! the copy's rate from it:
//! - above the target: the rate drops in proportion to the overshoot (at most halved per
//!   window, at least by 15%), from the copy's measured rate when the cap is still open;
//! - below [`GROW_BELOW_PCT`] of the target: the cap grows by a quarter per window, and is
//!   lifted once past [`CEILING_BYTES_PER_S`]; in between it holds;
//! - a quiet guest (fewer than [`QUIET_OPS`] requests in a window) has nothing to protect:
//!   the cap doubles per window until lifted.
//!
//! The copy must also outrun the guest's dirty rate, or it never converges. When what the
//! target allows stays below [`CONFLICT_MARGIN_PCT`] of the dirty rate for
//! [`CONFLICT_WINDOWS`] windows in a row, [`Steer::conflict`] says so (sticky): the job then
//! mirrors guest writes instead of copying forever (the mirror costs the guest one round
//! trip per write and always converges), and its status says why.
//!
//! The cap also shapes the copy's reads ([`read_shape`]): fewer and shorter reads in flight
//! at a lower cap, since on a shared disk a guest request waits for the reads queued ahead
//! of it whatever the average rate.
//!
//! Invariants: pure (time, latency and rates come in as arguments; production and the
//! simulation call the same code); the cap never drops below [`FLOOR_BYTES_PER_S`], so the
//! copy always progresses; [`ImpactTarget::Off`] never caps.

use std::fmt;

/// Shortest window the guest's latency is judged over.
pub const WINDOW_NS: u64 = 250_000_000;
/// The copy never goes slower than this.
pub const FLOOR_BYTES_PER_S: u64 = 16 << 20;
/// Above this the cap is lifted altogether.
pub const CEILING_BYTES_PER_S: u64 = 4 << 30;
/// Fewer guest requests than this in a window: the guest is quiet, nothing to protect.
pub const QUIET_OPS: u64 = 20;
/// The cap grows only while the guest's p99 is below this share of the target (percent).
pub const GROW_BELOW_PCT: u64 = 70;
/// What the target allows must reach this share of the dirty rate (percent) to converge.
pub const CONFLICT_MARGIN_PCT: u64 = 125;
/// Windows in a row of too little rate before the conflict is declared.
pub const CONFLICT_WINDOWS: u32 = 8;
/// A relative target never goes below this (µs): a guest on a RAM disk measures a few µs,
/// and twice that is noise, not a guest's experience.
pub const MIN_TARGET_US: u64 = 500;
/// The target when the guest's own latency is unknown (too few requests before the job).
pub const DEFAULT_TARGET_US: u64 = 4_000;
/// Fewest requests before the job for their p99 to count as the guest's own latency.
pub const BASELINE_MIN_OPS: u64 = 200;

/// How the copy reads at a cap: reads in flight and the largest read. A guest request that
/// queues behind the copy on a shared disk waits for the reads ahead of it, so a lower cap
/// also means fewer, shorter reads (uncapped: 8 × 1 MiB, the block stream's default; at
/// the floor one 128 KiB read at a time).
pub fn read_shape(cap_bytes_per_s: Option<u64>) -> (usize, usize) {
    match cap_bytes_per_s {
        None => (8, 1 << 20),
        Some(cap) if cap >= 256 << 20 => (8, 1 << 20),
        Some(cap) if cap >= 64 << 20 => (4, 512 << 10),
        Some(cap) if cap >= 32 << 20 => (2, 256 << 10),
        Some(_) => (1, 128 << 10),
    }
}

/// What the copy may cost the guest: its p99 latency during the job at most ...
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImpactTarget {
    /// ... unbounded: the copy runs flat out.
    Off,
    /// ... this many hundredths of its own p99 before the job (200: twice).
    Relative {
        /// Hundredths of the baseline.
        factor_pct: u32,
    },
    /// ... this many µs.
    Absolute {
        /// The bound.
        p99_us: u64,
    },
}

impl Default for ImpactTarget {
    /// Twice the guest's own p99.
    fn default() -> Self {
        ImpactTarget::Relative { factor_pct: 200 }
    }
}

/// Why a `--max-impact` text is not a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--max-impact {0:?}: give `off`, a factor of the guest's own p99 (`2x`, `1.5x`) or a latency (`5ms`, `800us`)")]
pub struct ImpactParseError(String);

impl std::str::FromStr for ImpactTarget {
    type Err = ImpactParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ImpactParseError(text.to_string());
        let trimmed = text.trim();
        if trimmed.eq_ignore_ascii_case("off") {
            return Ok(ImpactTarget::Off);
        }
        let number = |digits: &str| -> Result<f64, ImpactParseError> {
            let value: f64 = digits.trim().parse().map_err(|_| bad())?;
            if value.is_finite() && value > 0.0 {
                Ok(value)
            } else {
                Err(bad())
            }
        };
        if let Some(factor) = trimmed.strip_suffix('x') {
            let factor_pct = (number(factor)? * 100.0).round();
            if !(100.0..=100_000.0).contains(&factor_pct) {
                return Err(bad());
            }
            return Ok(ImpactTarget::Relative {
                factor_pct: factor_pct as u32,
            });
        }
        let (digits, scale_us) = if let Some(ms) = trimmed.strip_suffix("ms") {
            (ms, 1000.0)
        } else if let Some(us) = trimmed.strip_suffix("us") {
            (us, 1.0)
        } else {
            return Err(bad());
        };
        let p99_us = (number(digits)? * scale_us).round();
        if !(1.0..=60e6).contains(&p99_us) {
            return Err(bad());
        }
        Ok(ImpactTarget::Absolute {
            p99_us: p99_us as u64,
        })
    }
}

impl fmt::Display for ImpactTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImpactTarget::Off => write!(f, "off"),
            ImpactTarget::Relative { factor_pct } => {
                write!(f, "{}x", f64::from(*factor_pct) / 100.0)
            }
            ImpactTarget::Absolute { p99_us } if p99_us % 1000 == 0 => {
                write!(f, "{}ms", p99_us / 1000)
            }
            ImpactTarget::Absolute { p99_us } => write!(f, "{p99_us}us"),
        }
    }
}

impl ImpactTarget {
    /// The p99 bound in µs, given the guest's own p99 before the job (`None`: unknown, too
    /// few requests); `None` for [`ImpactTarget::Off`].
    pub fn bound_us(self, baseline_p99_us: Option<u64>) -> Option<u64> {
        match self {
            ImpactTarget::Off => None,
            ImpactTarget::Absolute { p99_us } => Some(p99_us.max(1)),
            ImpactTarget::Relative { factor_pct } => Some(match baseline_p99_us {
                Some(base) => (base.saturating_mul(u64::from(factor_pct)) / 100).max(MIN_TARGET_US),
                None => DEFAULT_TARGET_US,
            }),
        }
    }
}

/// What the guest did in one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestWindow {
    /// Requests completed in the window.
    pub ops: u64,
    /// Their p99 latency, µs.
    pub p99_us: u64,
}

/// The controller of one job; see the module docs.
#[derive(Debug, Clone)]
pub struct Steer {
    /// The p99 bound (µs); `None`: off.
    target_us: Option<u64>,
    cap_bytes_per_s: Option<u64>,
    window_start_ns: u64,
    short_windows: u32,
    conflict: bool,
    last: GuestWindow,
}

impl Steer {
    /// A controller holding the guest's p99 to `target_us` (`None`: never caps), judging
    /// from `now_ns` on.
    pub fn new(target_us: Option<u64>, now_ns: u64) -> Self {
        Steer {
            target_us,
            cap_bytes_per_s: None,
            window_start_ns: now_ns,
            short_windows: 0,
            conflict: false,
            last: GuestWindow::default(),
        }
    }

    /// The p99 bound it steers to (µs).
    pub fn target_us(&self) -> Option<u64> {
        self.target_us
    }

    /// The cap now (None: uncapped).
    pub fn cap_bytes_per_s(&self) -> Option<u64> {
        self.cap_bytes_per_s
    }

    /// Whether the target and convergence conflict (sticky).
    pub fn conflict(&self) -> bool {
        self.conflict
    }

    /// The latest window judged.
    pub fn last_window(&self) -> GuestWindow {
        self.last
    }

    /// Whether a window has passed since the last judgement, at `now_ns`: the caller then
    /// measures the guest's window and calls [`Steer::observe`].
    pub fn window_due(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.window_start_ns) >= WINDOW_NS
    }

    /// Judges the window that ends at `now_ns`: the guest's `window`, the copy's measured
    /// rate and the guest's dirty rate (bytes/s, `None` before they are known). Returns the
    /// cap for the next sends (None: uncapped).
    pub fn observe(
        &mut self,
        now_ns: u64,
        window: GuestWindow,
        copy_bytes_per_s: Option<f64>,
        dirty_bytes_per_s: Option<f64>,
    ) -> Option<u64> {
        self.window_start_ns = now_ns;
        self.last = window;
        let target_us = self.target_us?;
        let quiet = window.ops < QUIET_OPS;
        self.cap_bytes_per_s = if quiet {
            self.cap_bytes_per_s.map(|cap| cap.saturating_mul(2))
        } else if window.p99_us > target_us {
            let current = self
                .cap_bytes_per_s
                .or(copy_bytes_per_s.map(|rate| rate as u64))
                .unwrap_or(CEILING_BYTES_PER_S);
            // In proportion to the overshoot, between halving and -15%.
            let keep_pct = (target_us.saturating_mul(100) / window.p99_us.max(1)).clamp(50, 85);
            Some((current / 100 * keep_pct).max(FLOOR_BYTES_PER_S))
        } else if window.p99_us.saturating_mul(100) < target_us.saturating_mul(GROW_BELOW_PCT) {
            self.cap_bytes_per_s.map(|cap| cap + cap / 4)
        } else {
            self.cap_bytes_per_s
        }
        .filter(|&cap| cap < CEILING_BYTES_PER_S);
        self.judge_convergence(quiet, dirty_bytes_per_s);
        self.cap_bytes_per_s
    }

    /// Counts the windows in which what the target allows cannot outrun the dirty rate.
    fn judge_convergence(&mut self, quiet: bool, dirty_bytes_per_s: Option<f64>) {
        let allowed = self.cap_bytes_per_s.map(|cap| cap as f64);
        let short = match (quiet, allowed, dirty_bytes_per_s) {
            (false, Some(allowed), Some(dirty)) => {
                allowed * 100.0 < dirty * CONFLICT_MARGIN_PCT as f64
            }
            _ => false,
        };
        self.short_windows = if short { self.short_windows + 1 } else { 0 };
        if self.short_windows >= CONFLICT_WINDOWS && !self.conflict {
            self.conflict = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = (1 << 20) as f64;

    fn busy(p99_us: u64) -> GuestWindow {
        GuestWindow { ops: 500, p99_us }
    }

    // Goal: every documented form parses, and round-trips through Display; nonsense does
    // not. Method: a table.
    #[test]
    fn targets_parse() {
        for (text, target) in [
            ("off", ImpactTarget::Off),
            ("2x", ImpactTarget::Relative { factor_pct: 200 }),
            ("1.5x", ImpactTarget::Relative { factor_pct: 150 }),
            ("5ms", ImpactTarget::Absolute { p99_us: 5000 }),
            ("800us", ImpactTarget::Absolute { p99_us: 800 }),
        ] {
            assert_eq!(text.parse::<ImpactTarget>(), Ok(target), "{text}");
            assert_eq!(target.to_string().parse::<ImpactTarget>(), Ok(target));
        }
        for bad in ["", "2", "0.5x", "-1ms", "nanx", "0ms", "5 s", "infx"] {
            assert!(bad.parse::<ImpactTarget>().is_err(), "{bad}");
        }
        assert_eq!(ImpactTarget::default().bound_us(Some(1000)), Some(2000));
        assert_eq!(
            ImpactTarget::default().bound_us(Some(10)),
            Some(MIN_TARGET_US)
        );
        assert_eq!(
            ImpactTarget::default().bound_us(None),
            Some(DEFAULT_TARGET_US)
        );
        assert_eq!(ImpactTarget::Off.bound_us(Some(1000)), None);
        assert_eq!(read_shape(None), (8, 1 << 20));
        assert_eq!(read_shape(Some(FLOOR_BYTES_PER_S)), (1, 128 << 10));
        assert_eq!(read_shape(Some(100 << 20)), (4, 512 << 10));
    }

    // Goal: above the target the cap falls in proportion to the overshoot, never below the
    // floor; below 70% of it the cap grows back and is lifted; a quiet guest lifts it; off
    // never caps. Method: windows fed one by one.
    #[test]
    fn the_cap_follows_the_guests_latency() {
        let mut steer = Steer::new(Some(2000), 0);
        let cap = steer.observe(WINDOW_NS, busy(4000), Some(400.0 * MIB), None);
        assert_eq!(
            cap,
            Some((400 << 20) / 100 * 50),
            "halved at twice the target"
        );
        let cap = steer
            .observe(2 * WINDOW_NS, busy(2200), None, None)
            .unwrap();
        assert_eq!(cap, (200 << 20) / 100 * 85, "-15% at a small overshoot");
        let held = steer.observe(3 * WINDOW_NS, busy(1800), None, None);
        assert_eq!(held, Some(cap), "held between 70% and 100% of the target");
        let grown = steer.observe(4 * WINDOW_NS, busy(500), None, None).unwrap();
        assert_eq!(grown, cap + cap / 4);
        let mut now = 4 * WINDOW_NS;
        for _ in 0..100 {
            now += WINDOW_NS;
            steer.observe(now, busy(1_000_000), None, None);
        }
        assert_eq!(steer.cap_bytes_per_s(), Some(FLOOR_BYTES_PER_S));
        let mut lifted = false;
        for _ in 0..40 {
            now += WINDOW_NS;
            if steer
                .observe(now, GuestWindow::default(), None, None)
                .is_none()
            {
                lifted = true;
                break;
            }
        }
        assert!(lifted, "a quiet guest lifts the cap");
        let mut off = Steer::new(None, 0);
        assert_eq!(
            off.observe(WINDOW_NS, busy(1_000_000), Some(1e9), Some(1e9)),
            None
        );
        assert!(!off.conflict());
    }

    // Goal: the conflict is declared only after CONFLICT_WINDOWS windows in a row of too
    // little rate for the dirty rate, and a window with enough resets the count.
    // Method: a guest whose latency pins the cap at the floor, dirtying faster than it.
    #[test]
    fn a_target_that_cannot_converge_is_a_conflict() {
        let mut steer = Steer::new(Some(1000), 0);
        let dirty = Some(FLOOR_BYTES_PER_S as f64 * 2.0);
        let mut now = 0;
        for _ in 0..30 {
            now += WINDOW_NS;
            steer.observe(now, busy(5000), Some(100.0 * MIB), None);
        }
        for window in 1..CONFLICT_WINDOWS {
            now += WINDOW_NS;
            steer.observe(now, busy(5000), None, dirty);
            assert!(!steer.conflict(), "window {window}");
        }
        now += WINDOW_NS;
        steer.observe(now, busy(900), None, Some(1.0)); // enough this once: reset
        for _ in 0..CONFLICT_WINDOWS - 1 {
            now += WINDOW_NS;
            steer.observe(now, busy(5000), None, dirty);
        }
        assert!(!steer.conflict());
        now += WINDOW_NS;
        steer.observe(now, busy(5000), None, dirty);
        assert!(steer.conflict());
    }
}
