//! `--max-impact`: what the copy may cost the guest, as the operator writes it, and the p99
//! bound the job resolves it to from the guest's own latency before the job.
//!
//! Invariants: every form that parses prints back to the same target; a relative bound is
//! never below [`MIN_TARGET_US`]; an unknown baseline gives [`DEFAULT_TARGET_US`].

use std::fmt;

/// A relative target never goes below this (µs): a guest on a RAM disk measures a few µs,
/// and twice that is noise, not a guest's experience.
pub const MIN_TARGET_US: u64 = 500;
/// The target when the guest's own latency is unknown (too few requests before the job).
pub const DEFAULT_TARGET_US: u64 = 4_000;
/// Fewest requests before the job for their p99 to count as the guest's own latency.
pub const BASELINE_MIN_OPS: u64 = 200;

/// What the copy may cost the guest: its p99 latency during the job at most ...
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImpactTarget {
    /// ... unbounded: the copy runs flat out.
    Off,
    /// ... twice its own where slowing the copy spares it; where it does not (a slower
    /// copy stretches the same harm over a longer job), whatever costs it least in all
    /// (the default; see [`super::Steer`]).
    #[default]
    Auto,
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

/// Why a `--max-impact` text is not a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--max-impact {0:?}: give `auto`, `off`, a factor of the guest's own p99 (`2x`, `1.5x`) or a latency (`5ms`, `800us`)")]
pub struct ImpactParseError(String);

impl std::str::FromStr for ImpactTarget {
    type Err = ImpactParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let bad = || ImpactParseError(text.to_string());
        let trimmed = text.trim();
        if trimmed.eq_ignore_ascii_case("off") {
            return Ok(ImpactTarget::Off);
        }
        if trimmed.eq_ignore_ascii_case("auto") {
            return Ok(ImpactTarget::Auto);
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
            ImpactTarget::Auto => write!(f, "auto"),
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
    /// Whether the bound holds whatever it costs in time (an operator's explicit bound),
    /// rather than only while slowing down spares the guest ([`ImpactTarget::Auto`]).
    pub fn strict(self) -> bool {
        !matches!(self, ImpactTarget::Auto)
    }

    /// The p99 bound in µs, given the guest's own p99 before the job (`None`: unknown, too
    /// few requests); `None` for [`ImpactTarget::Off`].
    pub fn bound_us(self, baseline_p99_us: Option<u64>) -> Option<u64> {
        match self {
            ImpactTarget::Off => None,
            ImpactTarget::Absolute { p99_us } => Some(p99_us.max(1)),
            ImpactTarget::Auto => {
                ImpactTarget::Relative { factor_pct: 200 }.bound_us(baseline_p99_us)
            }
            ImpactTarget::Relative { factor_pct } => Some(match baseline_p99_us {
                Some(base) => (base.saturating_mul(u64::from(factor_pct)) / 100).max(MIN_TARGET_US),
                None => DEFAULT_TARGET_US,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: every documented form parses, and round-trips through Display; nonsense does
    // not; the bounds follow the baseline. Method: a table.
    #[test]
    fn targets_parse() {
        for (text, target) in [
            ("off", ImpactTarget::Off),
            ("auto", ImpactTarget::Auto),
            ("2x", ImpactTarget::Relative { factor_pct: 200 }),
            ("1.5x", ImpactTarget::Relative { factor_pct: 150 }),
            ("5ms", ImpactTarget::Absolute { p99_us: 5000 }),
            ("800us", ImpactTarget::Absolute { p99_us: 800 }),
        ] {
            assert_eq!(text.parse::<ImpactTarget>(), Ok(target), "{text}");
            assert_eq!(target.to_string().parse::<ImpactTarget>(), Ok(target));
        }
        for bad in [
            "", "2", "0.5x", "-1ms", "nanx", "0ms", "5 s", "infx", "autox",
        ] {
            assert!(bad.parse::<ImpactTarget>().is_err(), "{bad}");
        }
        assert_eq!(ImpactTarget::default(), ImpactTarget::Auto);
        assert!(!ImpactTarget::Auto.strict());
        assert!(ImpactTarget::Relative { factor_pct: 200 }.strict());
        assert_eq!(ImpactTarget::Auto.bound_us(Some(1000)), Some(2000));
        assert_eq!(ImpactTarget::Auto.bound_us(Some(10)), Some(MIN_TARGET_US));
        assert_eq!(ImpactTarget::Auto.bound_us(None), Some(DEFAULT_TARGET_US));
        assert_eq!(ImpactTarget::Off.bound_us(Some(1000)), None);
    }
}
