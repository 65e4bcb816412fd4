//! What an export whose disk lives at another agent shows of its forwarding: the
//! [`ForwardGauge`] its sessions' forwarding engines update (`nbd::forward`), and the
//! [`Forwarding`] / [`Holding`] snapshot the control API reports.
//!
//! The gauge is lock-free: a forwarding engine touches it only when its link changes state
//! (lost, connected again) and, while it holds, when a held request arrives or leaves. A
//! connected engine never touches it per request, so the hot path is not slowed.
//!
//! Invariants:
//! - `episode` packs two fields into one word, so a reader sees them together: the number
//!   of engines holding (lost their connection, not yet connected again) and when the
//!   current holding episode began. Each engine adds 1 when it starts holding and takes it
//!   back exactly once, when it connects again or is dropped; the engine that takes the
//!   count from 0 to 1 stamps the time in the same update. So "since" is when some session
//!   of the export began holding with no moment since when none held: the earliest holding
//!   session, unless the holding ones took turns.
//! - `requests` is the sum over holding engines of the requests each holds; an engine adds
//!   and takes back its own share under its own lock, so its share never goes below zero and
//!   neither does the sum (read-modify-writes of one atomic follow that order).
//! - Wall-clock times are for display only: nothing orders events by them.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch now (0 if the clock is before it).
pub(super) fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Bits of [`ForwardGauge::episode`] holding the start time (ms since the epoch: enough
/// until the year 2500); the bits above count the holding engines.
const SINCE_BITS: u32 = 44;
const SINCE_MASK: u64 = (1 << SINCE_BITS) - 1;

/// Per-export holding state, updated by the export's forwarding engines (one per session).
#[derive(Debug, Default)]
pub struct ForwardGauge {
    /// Engines holding now (high bits) and when the current episode began (low
    /// [`SINCE_BITS`] bits, meaningful only while some engine holds).
    episode: AtomicU64,
    /// Requests held now, across the holding engines.
    requests: AtomicU64,
    /// Connections lost and made again, over the export's life.
    reconnects: AtomicU64,
}

/// `(engines holding, episode start)` of an `episode` word.
fn unpack(word: u64) -> (u64, u64) {
    (word >> SINCE_BITS, word & SINCE_MASK)
}

fn pack(sessions: u64, since_unix_ms: u64) -> u64 {
    (sessions << SINCE_BITS) | (since_unix_ms & SINCE_MASK)
}

impl ForwardGauge {
    /// An engine lost its connection to the destination and holds its requests from now on.
    pub fn hold_started(&self) {
        let now = unix_ms_now();
        // Relaxed throughout: a display gauge orders nothing else; each engine's own calls
        // are already ordered by its link thread and its lock.
        let update = |word| {
            let (sessions, since) = unpack(word);
            let since = if sessions == 0 { now } else { since };
            (sessions < (u64::MAX >> SINCE_BITS)).then(|| pack(sessions + 1, since))
        };
        let updated = self
            .episode
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, update);
        assert!(
            updated.is_ok(),
            "more holding engines than the gauge counts"
        );
    }

    /// An engine holds no more: connected again (`reconnected`) or dropped while holding.
    /// Call once per [`ForwardGauge::hold_started`], after its held requests left
    /// ([`ForwardGauge::release_requests`]).
    pub fn hold_ended(&self, reconnected: bool) {
        let before = self.episode.fetch_sub(1 << SINCE_BITS, Ordering::Relaxed);
        debug_assert!(unpack(before).0 > 0, "hold_ended without hold_started");
        if reconnected {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A holding engine holds `count` more requests.
    pub fn hold_requests(&self, count: u64) {
        if count > 0 {
            self.requests.fetch_add(count, Ordering::Relaxed);
        }
    }

    /// `count` requests a holding engine held left it (resent, failed, or the engine ends).
    pub fn release_requests(&self, count: u64) {
        if count > 0 {
            let before = self.requests.fetch_sub(count, Ordering::Relaxed);
            debug_assert!(
                before >= count,
                "released {count} of {before} held requests"
            );
        }
    }

    /// The holding state now; None while no engine holds.
    pub fn holding(&self) -> Option<Holding> {
        let (sessions, since) = unpack(self.episode.load(Ordering::Relaxed));
        (sessions > 0).then(|| Holding {
            since_unix_ms: since,
            requests: self.requests.load(Ordering::Relaxed),
        })
    }

    /// Connections to the destination lost and made again, over the export's life.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// An export whose disk lives at another agent: every request is forwarded there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Forwarding {
    /// The NBD TCP address requests go to.
    pub to: String,
    /// Since when (ms since the Unix epoch), when the agent saw the switch happen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix_ms: Option<u64>,
    /// Set while the destination is away and requests are held (absent from older agents'
    /// answers: read as not holding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holding: Option<Holding>,
}

/// Requests held for a destination that is away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holding {
    /// When the export's sessions began holding (ms since the Unix epoch): the earliest of
    /// them, unless the holding ones took turns (then when holding last began with none
    /// holding before).
    pub since_unix_ms: u64,
    /// Requests held now, across the export's sessions.
    pub requests: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the gauge says holding exactly while an engine holds, counts requests across
    // engines, keeps the episode's start while engines overlap, and counts reconnects.
    // Method: two engines' calls, interleaved as their link threads would make them.
    #[test]
    fn gauge_follows_overlapping_engines() {
        let gauge = ForwardGauge::default();
        assert_eq!(gauge.holding(), None);
        let before = unix_ms_now();
        gauge.hold_started(); // engine A lost its connection, holding 3
        gauge.hold_requests(3);
        let first = gauge.holding().expect("holding");
        assert!(first.since_unix_ms >= before && first.since_unix_ms <= unix_ms_now());
        assert_eq!(first.requests, 3);
        std::thread::sleep(std::time::Duration::from_millis(5));
        gauge.hold_started(); // engine B too, holding 2 and then 1 more
        gauge.hold_requests(2);
        gauge.hold_requests(1);
        let both = gauge.holding().expect("holding");
        assert_eq!(
            both.since_unix_ms, first.since_unix_ms,
            "the earliest start"
        );
        assert_eq!(both.requests, 6);
        gauge.release_requests(3); // A resent its requests and is connected again
        gauge.hold_ended(true);
        assert_eq!(gauge.holding().expect("B holds").requests, 3);
        gauge.release_requests(1); // one of B's expired
        gauge.release_requests(2); // B was dropped while holding
        gauge.hold_ended(false);
        assert_eq!(gauge.holding(), None);
        assert_eq!(gauge.reconnects(), 1);

        std::thread::sleep(std::time::Duration::from_millis(5));
        gauge.hold_started(); // a new episode starts later, with nothing held
        let again = gauge.holding().expect("holding again");
        assert!(again.since_unix_ms > first.since_unix_ms);
        assert_eq!(again.requests, 0);
        gauge.hold_ended(true);
        assert_eq!(gauge.holding(), None);
        assert_eq!(gauge.reconnects(), 2);
    }

    // Goal: counts stay exact under concurrent engines. Method: 4 threads each start
    // holding, hold and release 1000 requests one by one, and stop; the gauge ends at rest.
    #[test]
    fn gauge_is_exact_under_concurrency() {
        let gauge = std::sync::Arc::new(ForwardGauge::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let gauge = gauge.clone();
                std::thread::spawn(move || {
                    gauge.hold_started();
                    for _ in 0..1000 {
                        gauge.hold_requests(1);
                    }
                    for _ in 0..1000 {
                        gauge.release_requests(1);
                    }
                    gauge.hold_ended(true);
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(gauge.holding(), None);
        assert_eq!(gauge.requests.load(Ordering::Relaxed), 0);
        assert_eq!(gauge.reconnects(), 4);
    }

    // Goal: an older agent's JSON (no `holding`) still parses, as not holding. Method:
    // parse the JSON a forwarding export had before the field existed.
    #[test]
    fn forwarding_without_holding_parses() {
        let old: Forwarding =
            serde_json::from_str(r#"{"to":"10.0.0.2:10809","since_unix_ms":5}"#).unwrap();
        assert_eq!(old.holding, None);
        let text = serde_json::to_string(&old).unwrap();
        assert!(!text.contains("holding"), "{text}");
    }
}
