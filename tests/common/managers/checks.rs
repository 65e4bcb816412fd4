//! Checks over what the manager scenarios recorded (tests/manager_scenarios.rs): the polls'
//! role timeline, polls that prove two actives, and the active intervals the managers' logs
//! give.

use super::{LabManager, RoleLine, Sample, Watch};

/// A role change is logged at the lease loop's first tick (100 ms) after a deadline passed:
/// the logs place the end of an active interval only that closely.
pub const LOG_TICK_MS: u64 = 150;
/// How stale a polled status may be: one tick, plus scheduling.
pub const PUBLISH_LAG_MS: u64 = 150;

/// What the test did to a manager process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// kill -9, or its host crashed.
    Killed,
    /// SIGSTOP.
    Paused,
}

/// A poll's role: `A<epoch>` active, `s` standby, `-` no answer.
pub fn role_of(sample: &Sample) -> String {
    match &sample.status {
        None => "-".into(),
        Some(_) => match sample.active_epoch() {
            Some(epoch) => format!("A{epoch}"),
            None => "s".into(),
        },
    }
}

/// Every change of either manager's polled role in `[from_ms, to_ms]`, as
/// `+MS id=ROLE` (milliseconds after `from_ms`).
pub fn timeline(watch: &Watch, managers: &[LabManager], from_ms: u64, to_ms: u64) -> String {
    let mut samples: Vec<(usize, Sample)> = (0..managers.len())
        .flat_map(|i| {
            watch
                .between(i, from_ms, to_ms)
                .into_iter()
                .map(move |s| (i, s))
        })
        .collect();
    samples.sort_by_key(|(_, s)| s.recv_ms);
    let mut current = vec![String::new(); managers.len()];
    let mut changes = Vec::new();
    for (i, sample) in samples {
        let role = role_of(&sample);
        if role != current[i] {
            changes.push(format!(
                "+{} {}={role}",
                sample.recv_ms - from_ms,
                managers[i].id
            ));
            current[i] = role;
        }
    }
    changes.join(" ")
}

/// Every poll as CSV (`recv_ms,manager,role,known_epoch,witness,lease_remaining_ms`).
pub fn polls_csv(watch: &Watch, managers: &[LabManager]) -> String {
    let mut text = String::from("recv_ms,manager,role,known_epoch,witness,lease_remaining_ms\n");
    for (i, manager) in managers.iter().enumerate() {
        for sample in watch.between(i, 0, u64::MAX) {
            let (known, witness, remaining) =
                sample
                    .status
                    .as_ref()
                    .map_or((String::new(), String::new(), String::new()), |s| {
                        (
                            s.known_epoch.to_string(),
                            s.witness
                                .as_ref()
                                .map_or(String::new(), |w| format!("{}:g{}", w.host, w.generation)),
                            s.lease_remaining_ms.to_string(),
                        )
                    });
            text.push_str(&format!(
                "{},{},{},{known},{witness},{remaining}\n",
                sample.recv_ms,
                manager.id,
                role_of(&sample)
            ));
        }
    }
    text
}

/// Pairs of polls (one of each manager) that prove both active at one instant: each status
/// was published at most `PUBLISH_LAG_MS` before its request and shows the manager active
/// until at least its publication plus `lease_remaining_ms`; if those spans intersect
/// whatever the publication times were, two managers were active at once.
pub fn proven_overlaps(watch: &Watch, from_ms: u64, to_ms: u64) -> usize {
    let (a, b) = (
        watch.between(0, from_ms, to_ms),
        watch.between(1, from_ms, to_ms),
    );
    let span = |s: &Sample| {
        let rem = s.status.as_ref().map_or(0, |st| st.lease_remaining_ms);
        (s.recv_ms, (s.sent_ms + rem).saturating_sub(PUBLISH_LAG_MS))
    };
    let mut count = 0;
    for x in a.iter().filter(|s| s.active_epoch().is_some()) {
        for y in b.iter().filter(|s| s.active_epoch().is_some()) {
            let ((x_lo, x_hi), (y_lo, y_hi)) = (span(x), span(y));
            if x_lo.max(y_lo) < x_hi.min(y_hi) {
                count += 1;
            }
        }
    }
    count
}

/// Polls where both managers said active within one poll interval of each other.
pub fn both_active_polls(watch: &Watch) -> usize {
    let (a, b) = (watch.between(0, 0, u64::MAX), watch.between(1, 0, u64::MAX));
    a.iter()
        .filter(|x| x.active_epoch().is_some())
        .filter(|x| {
            b.iter()
                .any(|y| y.active_epoch().is_some() && x.recv_ms.abs_diff(y.recv_ms) <= 100)
        })
        .count()
}

/// One active interval from the logs.
#[derive(Debug, Clone)]
pub struct Interval {
    pub manager: usize,
    pub start_ms: u64,
    pub end_ms: u64,
    pub epoch: u64,
    pub end_by: &'static str,
}

/// Active intervals from the role-change lines, ended by the next standby line, or by the
/// test's kill -9 (or host crash) or SIGSTOP of that manager (a stopped process does not act;
/// scenario 8 checks that it logs standby when woken and that agents refuse its epoch).
pub fn intervals(
    roles: &[Vec<RoleLine>],
    events: &[(u64, usize, Event)],
    now: u64,
) -> Vec<Interval> {
    let mut all = Vec::new();
    for (manager, lines) in roles.iter().enumerate() {
        let mut items: Vec<(u64, Option<&RoleLine>, Option<Event>)> =
            lines.iter().map(|l| (l.at_ms, Some(l), None)).collect();
        items.extend(
            events
                .iter()
                .filter(|(_, m, _)| *m == manager)
                .map(|(at, _, e)| (*at, None, Some(*e))),
        );
        items.sort_by_key(|item| item.0);
        let mut open: Option<(u64, u64)> = None;
        for (at_ms, line, event) in items {
            let end_by = match (line, event) {
                (Some(line), _) if line.active => "replaced",
                (Some(_), _) => "logged standby",
                (None, Some(Event::Killed)) => "killed",
                (None, _) => "paused",
            };
            if let Some((start_ms, epoch)) = open.take() {
                all.push(Interval {
                    manager,
                    start_ms,
                    end_ms: at_ms,
                    epoch,
                    end_by,
                });
            }
            if let Some(line) = line.filter(|l| l.active) {
                open = Some((line.at_ms, line.epoch));
            }
        }
        if let Some((start_ms, epoch)) = open {
            all.push(Interval {
                manager,
                start_ms,
                end_ms: now,
                epoch,
                end_by: "still active",
            });
        }
    }
    all.sort_by_key(|i| i.start_ms);
    all
}
