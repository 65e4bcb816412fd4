//! The copy controller: steers how the bulk copy reads (its gear: reads in flight, read
//! size, pace) so that the guest's latency stays within a target (`--max-impact`), and says
//! when that target and convergence conflict.
//!
//! Purpose: on a disk the guest and the copy share, a guest request that arrives while the
//! copy's reads are queued waits for them. What it waits for is set by the reads ahead of it
//! (8 × 1 MiB costs it tens of ms, one 64 KiB read a fraction of one), and how often it waits
//! by the copy's rate; its p99 counts the waits once more than 1% of requests meet one. So
//! fewer, shorter reads lower the guest's p99 a lot at little cost in copy rate, while pacing
//! a copy of short reads lowers it little until the copy is slow. The controller therefore
//! walks a ladder of gears ([`GEARS`]): first the reads' shape, then the pace. Every window of
//! at least [`WINDOW_NS`] it reads the guest's p99 on the export (every request) and:
//! - above the bound: shifts one gear slower;
//! - below [`GROW_BELOW_PCT`] of it: shifts one gear faster, unless a faster gear overshot
//!   lately (it waits [`PROBE_HOLD_WINDOWS`], doubling after each failed probe, up to
//!   [`PROBE_HOLD_MAX_WINDOWS`]);
//! - a quiet guest (fewer than [`QUIET_OPS`] requests) has nothing to protect: the fastest
//!   gear.
//!
//! A window stays open until it holds [`JUDGE_MIN_OPS`] requests (or lasts
//! [`WINDOW_MAX_NS`]): the p99 of a few hundred requests is their few worst, which one disk
//! hiccup decides whatever the copy does, and a judgement on it shifts gears for nothing.
//!
//! An explicit bound (`2x`, `5ms`) is strict: the rules above, down to the floor if that is
//! what holds it, whatever it costs in time. With [`ImpactTarget::Auto`] (the default) the
//! controller keeps, per gear, the guest's p99 and the copy's rate it last measured (figures
//! older than [`STALE_WINDOWS`] are measured again; a gear returned to after a while starts
//! its figures afresh) and heads for the fastest gear that holds the bound at a useful rate
//! (at least [`USEFUL_RATE_PCT`] of the fastest rate measured): above the bound it measures
//! the next slower gear when unknown; below 70% of it it probes the next faster one as
//! above; otherwise it moves one gear toward that gear. Where no gear holds the bound at a
//! useful rate, it heads instead for the gear that scores best by the guest's added latency
//! per byte copied, `(p99 − own) / rate`, the harm the whole copy does (another gear must
//! score [`SWITCH_GAIN_PCT`] better): a slower copy that does not lower the guest's p99 in
//! proportion only stretches the same harm over a longer job, so the copy does not crawl at
//! the floor because the floor alone holds the bound. One bad window (a disk hiccup while
//! the copy ran) is not the copy's doing for good: its gear is measured afresh the next time.
//!
//! The copy must also outrun the guest's dirty rate, or it never converges. When the gear's
//! pace stays below [`CONFLICT_MARGIN_PCT`] of the dirty rate for [`CONFLICT_WINDOWS`]
//! windows in a row, [`Steer::conflict`] says so (sticky): the job then mirrors guest writes
//! instead of copying forever, and its status says why.
//!
//! Invariants: pure (time, latency and rates come in as arguments; production and the
//! simulation call the same code); the slowest gear still copies at
//! [`FLOOR_BYTES_PER_S`], so the copy always progresses; a gear never reads more or longer
//! than the job's own read shape (the caller takes the least of both).

mod target;

pub use target::{
    ImpactParseError, ImpactTarget, BASELINE_MIN_OPS, DEFAULT_TARGET_US, MIN_TARGET_US,
};

/// Shortest window the guest's latency is judged over.
pub const WINDOW_NS: u64 = 250_000_000;
/// Requests a window holds before it is judged (unless quiet or [`WINDOW_MAX_NS`] old): its
/// p99 is then the tenth worst, not the third.
pub const JUDGE_MIN_OPS: u64 = 1_000;
/// Longest window: a guest too slow to fill [`JUDGE_MIN_OPS`] is judged at this age.
pub const WINDOW_MAX_NS: u64 = 1_000_000_000;
/// The copy never goes slower than this.
pub const FLOOR_BYTES_PER_S: u64 = 16 << 20;
/// Fewer guest requests than this in a window: the guest is quiet, nothing to protect.
pub const QUIET_OPS: u64 = 20;
/// The controller shifts faster only while the guest's p99 is below this share of the
/// bound (percent).
pub const GROW_BELOW_PCT: u64 = 70;
/// What the gear gives must reach this share of the dirty rate (percent) to converge.
pub const CONFLICT_MARGIN_PCT: u64 = 125;
/// Windows in a row of too little rate before the conflict is declared.
pub const CONFLICT_WINDOWS: u32 = 8;
/// Windows a gear's figures stay current (30 s): the guest changes, so they are measured
/// again after this.
pub const STALE_WINDOWS: u64 = 120;
/// How much less harm per byte a neighbouring gear must promise before `auto` moves to it
/// (percent).
pub const SWITCH_GAIN_PCT: u64 = 10;
/// A gear's rate below this share (percent) of the fastest rate measured is no useful
/// place for `auto` to hold the bound: the job would take that many times longer.
pub const USEFUL_RATE_PCT: u64 = 25;
/// Windows the controller waits before probing a faster gear that overshot (1 s).
pub const PROBE_HOLD_WINDOWS: u64 = 4;
/// The longest such wait (16 s).
pub const PROBE_HOLD_MAX_WINDOWS: u64 = 64;
/// The gear a steered copy starts in: short reads, unpaced.
pub const START_GEAR: usize = 3;

/// How the copy reads: reads in flight, the largest read, and a pace (`None`: as fast as
/// the disk and the link give).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gear {
    /// Reads in flight.
    pub read_depth: usize,
    /// The largest read, bytes.
    pub chunk_bytes: usize,
    /// The pace, bytes per second.
    pub cap_bytes_per_s: Option<u64>,
}

const fn gear(read_depth: usize, chunk_bytes: usize, cap_bytes_per_s: Option<u64>) -> Gear {
    Gear {
        read_depth,
        chunk_bytes,
        cap_bytes_per_s,
    }
}

/// The ladder, fastest first: the block stream's default shape, shorter and fewer reads,
/// then one short read at falling paces down to the floor.
pub const GEARS: [Gear; 8] = [
    gear(8, 1 << 20, None),
    gear(4, 512 << 10, None),
    gear(2, 256 << 10, None),
    gear(1, 128 << 10, None),
    gear(1, 64 << 10, None),
    gear(1, 64 << 10, Some(64 << 20)),
    gear(1, 64 << 10, Some(32 << 20)),
    gear(1, 64 << 10, Some(FLOOR_BYTES_PER_S)),
];

/// The fastest gear: an unsteered copy's.
pub const FASTEST: Gear = GEARS[0];

/// What the guest did in one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GuestWindow {
    /// Requests completed in the window.
    pub ops: u64,
    /// Their p99 latency, µs.
    pub p99_us: u64,
}

/// The bound a job's copy is steered to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    /// The guest's p99 may reach this (µs).
    pub p99_us: u64,
    /// The guest's own p99 before the job (µs), when known: what a gear adds is measured
    /// from it.
    pub own_us: Option<u64>,
    /// Held whatever it costs in time (see the module docs).
    pub strict: bool,
}

/// What the controller last measured in one gear.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Figures {
    p99_us: u64,
    copy_bytes_per_s: f64,
    window: u64,
}

/// The controller of one job; see the module docs.
#[derive(Debug, Clone)]
pub struct Steer {
    bound: Option<Bound>,
    gear: usize,
    figures: [Option<Figures>; GEARS.len()],
    /// Windows judged so far.
    windows: u64,
    window_start_ns: u64,
    /// The window of the last shift to a faster gear, while that shift is on trial.
    probing: Option<u64>,
    /// No faster gear before this window.
    hold_until: u64,
    hold_windows: u64,
    short_windows: u32,
    conflict: bool,
    last: GuestWindow,
}

impl Steer {
    /// A controller holding the guest's p99 to `bound` (`None`: never steers, the fastest
    /// gear), judging from `now_ns` on.
    pub fn new(bound: Option<Bound>, now_ns: u64) -> Self {
        Steer {
            bound,
            gear: if bound.is_some() { START_GEAR } else { 0 },
            figures: [None; GEARS.len()],
            windows: 0,
            window_start_ns: now_ns,
            probing: None,
            hold_until: 0,
            hold_windows: PROBE_HOLD_WINDOWS,
            short_windows: 0,
            conflict: false,
            last: GuestWindow::default(),
        }
    }

    /// The bound it steers to.
    pub fn bound(&self) -> Option<Bound> {
        self.bound
    }

    /// The gear now.
    pub fn gear(&self) -> Gear {
        GEARS[self.gear]
    }

    /// Whether the copy runs slower than it could: any gear but the fastest.
    pub fn slowed(&self) -> bool {
        self.gear != 0
    }

    /// Whether the target and convergence conflict (sticky).
    pub fn conflict(&self) -> bool {
        self.conflict
    }

    /// The latest window judged.
    pub fn last_window(&self) -> GuestWindow {
        self.last
    }

    /// Whether the shortest window has passed since the last judgement, at `now_ns`: the
    /// caller then measures the open window and asks [`Steer::window_closes`].
    pub fn window_due(&self, now_ns: u64) -> bool {
        now_ns.saturating_sub(self.window_start_ns) >= WINDOW_NS
    }

    /// Whether the open window, holding `ops` requests at `now_ns`, is judged now (the
    /// caller then closes it and calls [`Steer::observe`]) or stays open for more requests.
    pub fn window_closes(&self, now_ns: u64, ops: u64) -> bool {
        let age_ns = now_ns.saturating_sub(self.window_start_ns);
        // Between quiet and enough: more requests, unless the window is old.
        let waiting = (QUIET_OPS..JUDGE_MIN_OPS).contains(&ops);
        age_ns >= WINDOW_NS && (!waiting || age_ns >= WINDOW_MAX_NS)
    }

    /// Judges the window that ends at `now_ns`: the guest's `window`, the copy's rate over
    /// it and the guest's dirty rate (bytes/s, `None` when not measured). Returns the gear
    /// for the next sends.
    pub fn observe(
        &mut self,
        now_ns: u64,
        window: GuestWindow,
        copy_bytes_per_s: Option<f64>,
        dirty_bytes_per_s: Option<f64>,
    ) -> Gear {
        self.window_start_ns = now_ns;
        self.windows += 1;
        self.last = window;
        let Some(bound) = self.bound else {
            return self.gear();
        };
        let quiet = window.ops < QUIET_OPS;
        if quiet {
            self.shift_to(0);
        } else {
            if let Some(rate) = copy_bytes_per_s.filter(|&rate| rate > 0.0) {
                self.remember(window.p99_us, rate);
            }
            self.judge(bound, window.p99_us);
        }
        self.judge_convergence(quiet, dirty_bytes_per_s);
        self.gear()
    }

    /// Averages this window's figures into the current gear's, when those are from the
    /// windows just before; older ones are replaced (the guest and the disk have moved on).
    fn remember(&mut self, p99_us: u64, copy_bytes_per_s: f64) {
        let windows = self.windows;
        let slot = &mut self.figures[self.gear];
        *slot = Some(match *slot {
            Some(old) if windows - old.window <= 1 => Figures {
                p99_us: (old.p99_us + p99_us) / 2,
                copy_bytes_per_s: (old.copy_bytes_per_s + copy_bytes_per_s) / 2.0,
                window: windows,
            },
            _ => Figures {
                p99_us,
                copy_bytes_per_s,
                window: windows,
            },
        });
    }

    /// One window's shift, from the guest's p99 in it.
    fn judge(&mut self, bound: Bound, p99_us: u64) {
        let over = p99_us > bound.p99_us;
        if let Some(at) = self.probing {
            if over {
                // The faster gear overshot: back, and wait longer before the next probe.
                self.probing = None;
                self.hold_until = self.windows + self.hold_windows;
                self.hold_windows = (self.hold_windows * 2).min(PROBE_HOLD_MAX_WINDOWS);
                self.shift_to(self.gear + 1);
                return;
            }
            if self.windows - at >= PROBE_HOLD_WINDOWS {
                self.probing = None;
                self.hold_windows = PROBE_HOLD_WINDOWS;
            }
        }
        let under = p99_us.saturating_mul(100) < bound.p99_us.saturating_mul(GROW_BELOW_PCT);
        let probe_up = under && self.gear > 0 && self.windows >= self.hold_until;
        if bound.strict {
            if over {
                self.shift_to(self.gear + 1);
            } else if probe_up {
                self.probe_up();
            }
            return;
        }
        let slower = self.gear + 1;
        if over && slower < GEARS.len() && self.score(slower, bound).is_none() {
            // Unknown below: measure it (a slower gear is what the bound asks for).
            self.shift_to(slower);
        } else if probe_up {
            self.probe_up();
        } else {
            let aim = self
                .holding_gear(bound)
                .unwrap_or_else(|| self.least_harm(bound));
            match aim.cmp(&self.gear) {
                std::cmp::Ordering::Less => self.shift_to(self.gear - 1),
                std::cmp::Ordering::Equal => {}
                std::cmp::Ordering::Greater => self.shift_to(self.gear + 1),
            }
        }
    }

    /// The fastest gear whose current figures hold the bound at a useful rate
    /// ([`USEFUL_RATE_PCT`] of the fastest rate measured).
    fn holding_gear(&self, bound: Bound) -> Option<usize> {
        let current = |gear: usize| {
            self.figures[gear].filter(|figures| self.windows - figures.window <= STALE_WINDOWS)
        };
        let fastest_bytes_per_s = (0..GEARS.len())
            .filter_map(current)
            .map(|figures| figures.copy_bytes_per_s)
            .fold(0.0, f64::max);
        let useful_bytes_per_s = fastest_bytes_per_s * USEFUL_RATE_PCT as f64 / 100.0;
        (0..GEARS.len()).find(|&gear| {
            current(gear).is_some_and(|figures| {
                figures.p99_us <= bound.p99_us && figures.copy_bytes_per_s >= useful_bytes_per_s
            })
        })
    }

    /// Tries the next faster gear, on trial (see [`Steer::judge`]).
    fn probe_up(&mut self) {
        self.shift_to(self.gear - 1);
        self.probing = Some(self.windows);
    }

    /// The gear with current figures that costs the guest least per byte copied; another
    /// gear must beat the current one by [`SWITCH_GAIN_PCT`], so that noise does not flap
    /// between them.
    fn least_harm(&self, bound: Bound) -> usize {
        let Some(here) = self.score(self.gear, bound) else {
            return self.gear;
        };
        let mut best = (self.gear, here * (100 - SWITCH_GAIN_PCT) as f64 / 100.0);
        for gear in 0..GEARS.len() {
            if let Some(score) = self.score(gear, bound).filter(|&score| score < best.1) {
                best = (gear, score);
            }
        }
        best.0
    }

    /// The guest's added p99 per MiB/s the copy makes in `gear`, when current.
    fn score(&self, gear: usize, bound: Bound) -> Option<f64> {
        let figures = self.figures[gear]?;
        if self.windows - figures.window > STALE_WINDOWS {
            return None;
        }
        let added_us = figures
            .p99_us
            .saturating_sub(bound.own_us.unwrap_or(0))
            .max(1);
        Some(added_us as f64 / (figures.copy_bytes_per_s / f64::from(1 << 20)).max(1e-3))
    }

    fn shift_to(&mut self, gear: usize) {
        self.gear = gear.min(GEARS.len() - 1);
    }

    /// Counts the windows in which the gear's pace cannot outrun the dirty rate (an unpaced
    /// gear that cannot is the pass loop's to judge, as for an unsteered copy).
    fn judge_convergence(&mut self, quiet: bool, dirty_bytes_per_s: Option<f64>) {
        let short = match (quiet, self.gear().cap_bytes_per_s, dirty_bytes_per_s) {
            (false, Some(cap), Some(dirty)) => {
                cap as f64 * 100.0 < dirty * CONFLICT_MARGIN_PCT as f64
            }
            _ => false,
        };
        self.short_windows = if short { self.short_windows + 1 } else { 0 };
        if self.short_windows >= CONFLICT_WINDOWS {
            self.conflict = true;
        }
    }
}

#[cfg(test)]
mod tests;
