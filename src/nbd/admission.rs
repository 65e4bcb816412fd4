//! Connection admission of one listener (DESIGN invariant 6): how many peers may be
//! handshaking (not yet authenticated) and how many serving, how long a handshake may take,
//! and how the accept loop backs off when `accept` fails.
//!
//! Shared by the NBD listeners and the block stream's (`transfer` sits above `nbd`).
//!
//! Invariants:
//! - Handshaking and serving peers are counted apart: unauthenticated peers can never take
//!   the places of authenticated ones.
//! - When the handshaking cap is full, the oldest handshaking connection is closed for the
//!   newcomer, so peers that trickle bytes to stay alive cannot lock real peers out: each
//!   one lives at most until `handshaking_max` newer connections arrive, or its deadline.
//! - A handshake that has not finished by its deadline is closed by the reaper thread,
//!   however slowly its bytes trickle in (a per-read timeout would not bound it).
//! - A connection leaves the count when its [`Ticket`] drops (its thread ends) or when it is
//!   evicted or reaped, whichever comes first; never twice.
//! - Accept failures (EMFILE, ENFILE, ENOBUFS) back off from 10 ms to 100 ms and the loop
//!   goes on listening.

use std::collections::BTreeMap;
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The caps and deadline of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionLimits {
    /// Connections still in their handshake (unauthenticated) at once.
    pub handshaking_max: usize,
    /// Connections past their handshake at once.
    pub serving_max: usize,
    /// Time from accept to the end of the handshake.
    pub handshake_deadline: Duration,
}

impl AdmissionLimits {
    /// NBD listener defaults: 64 handshaking, 1024 serving, 10 s to finish the handshake.
    pub const NBD: AdmissionLimits = AdmissionLimits {
        handshaking_max: 64,
        serving_max: 1024,
        handshake_deadline: Duration::from_secs(10),
    };
    /// Block-stream listener defaults: 16 handshaking, 64 serving, 5 s.
    pub const STREAM: AdmissionLimits = AdmissionLimits {
        handshaking_max: 16,
        serving_max: 64,
        handshake_deadline: Duration::from_secs(5),
    };
}

/// How admission closes a connection it evicts, reaps or stops.
pub trait Closer: Send + Sync + std::fmt::Debug {
    /// Shuts the socket down (`how`); the connection's thread then sees EOF or an error.
    fn close(&self, how: Shutdown);
}

impl Closer for TcpStream {
    fn close(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

impl Closer for UnixStream {
    fn close(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Handshaking { deadline: Instant },
    Serving,
}

#[derive(Debug)]
struct Entry {
    phase: Phase,
    closer: Box<dyn Closer>,
}

#[derive(Debug, Default)]
struct State {
    next_id: u64,
    /// By id, which is also the order of arrival: the first handshaking entry is the oldest.
    entries: BTreeMap<u64, Entry>,
    handshaking: usize,
    serving: usize,
    stopped: bool,
}

/// Admission of one listener: counts, eviction, deadlines.
#[derive(Debug)]
pub struct Admission {
    what: &'static str,
    limits: AdmissionLimits,
    state: Mutex<State>,
    /// Signalled when an entry leaves or the admission stops (the reaper and `wait_empty`).
    changed: Condvar,
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The listener is stopping.
    Stopped,
    /// The serving cap is full (at [`Ticket::promote`]).
    Full,
    /// The connection was evicted or reaped meanwhile.
    Gone,
}

impl Admission {
    /// Admission for a listener named `what` (in log lines).
    pub fn new(what: &'static str, limits: AdmissionLimits) -> Arc<Admission> {
        assert!(limits.handshaking_max > 0, "a listener admits someone");
        assert!(limits.serving_max > 0, "a listener serves someone");
        Arc::new(Admission {
            what,
            limits,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        })
    }

    /// The limits in force.
    pub fn limits(&self) -> AdmissionLimits {
        self.limits
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding it; a poisoned map is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits a new connection as handshaking, evicting the oldest handshaking one when the
    /// cap is full. `closer` shuts the connection down if it is evicted, reaped or stopped.
    pub fn admit(self: &Arc<Self>, closer: Box<dyn Closer>) -> Result<Ticket, Refusal> {
        self.admit_at(closer, Instant::now())
    }

    /// [`Admission::admit`] at a given time (tests).
    pub fn admit_at(
        self: &Arc<Self>,
        closer: Box<dyn Closer>,
        now: Instant,
    ) -> Result<Ticket, Refusal> {
        let mut state = self.lock();
        if state.stopped {
            return Err(Refusal::Stopped);
        }
        while state.handshaking >= self.limits.handshaking_max {
            if !Self::evict_oldest_in(&mut state) {
                break;
            }
            log::info!(
                "{}: {} connections handshaking: the oldest is closed for a new one",
                self.what,
                self.limits.handshaking_max
            );
        }
        let id = state.next_id;
        state.next_id += 1;
        let deadline = now + self.limits.handshake_deadline;
        state.entries.insert(
            id,
            Entry {
                phase: Phase::Handshaking { deadline },
                closer,
            },
        );
        state.handshaking += 1;
        drop(state);
        self.changed.notify_all();
        Ok(Ticket {
            admission: Arc::clone(self),
            id,
        })
    }

    /// Closes the oldest handshaking connection; false if there is none.
    fn evict_oldest_in(state: &mut State) -> bool {
        let oldest = state
            .entries
            .iter()
            .find(|(_, entry)| matches!(entry.phase, Phase::Handshaking { .. }))
            .map(|(id, _)| *id);
        let Some(entry) = oldest.and_then(|id| Self::remove(state, id)) else {
            return false;
        };
        // Its clone is freed here, its own socket when its thread sees the shutdown.
        entry.closer.close(Shutdown::Both);
        true
    }

    /// Out of descriptors (EMFILE at accept): closes the oldest handshaking connection, so
    /// unauthenticated peers holding descriptors cannot keep real peers from being accepted.
    /// False when no connection is handshaking.
    pub fn evict_oldest(&self) -> bool {
        let mut state = self.lock();
        let evicted = Self::evict_oldest_in(&mut state);
        drop(state);
        if evicted {
            self.changed.notify_all();
        }
        evicted
    }

    fn remove(state: &mut State, id: u64) -> Option<Entry> {
        let entry = state.entries.remove(&id)?;
        match entry.phase {
            Phase::Handshaking { .. } => state.handshaking -= 1,
            Phase::Serving => state.serving -= 1,
        }
        Some(entry)
    }

    /// Closes every handshaking connection whose deadline is at or before `now`; returns how
    /// many, and the next deadline still pending.
    pub fn reap(&self, now: Instant) -> (usize, Option<Instant>) {
        let mut state = self.lock();
        let expired: Vec<u64> = state
            .entries
            .iter()
            .filter(|(_, entry)| {
                matches!(entry.phase, Phase::Handshaking { deadline } if deadline <= now)
            })
            .map(|(id, _)| *id)
            .collect();
        if !expired.is_empty() {
            // Logged before the close, so whoever sees the close finds the reason logged.
            log::info!(
                "{}: {} connection(s) closed: no handshake within {:?}",
                self.what,
                expired.len(),
                self.limits.handshake_deadline
            );
        }
        for id in &expired {
            if let Some(entry) = Self::remove(&mut state, *id) {
                entry.closer.close(Shutdown::Both);
            }
        }
        let next = state
            .entries
            .values()
            .filter_map(|entry| match entry.phase {
                Phase::Handshaking { deadline } => Some(deadline),
                Phase::Serving => None,
            })
            .min();
        if !expired.is_empty() {
            drop(state);
            self.changed.notify_all();
        }
        (expired.len(), next)
    }

    /// Starts the thread that closes handshakes past their deadline, until [`Admission::stop`].
    pub fn start_reaper(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let admission = Arc::clone(self);
        std::thread::Builder::new()
            .name(format!("{}-reaper", self.what))
            .spawn(move || admission.reap_loop())
    }

    fn reap_loop(&self) {
        loop {
            let (_, next) = self.reap(Instant::now());
            let state = self.lock();
            if state.stopped {
                return;
            }
            // Woken by a new entry too: its deadline may be the next one.
            let wait = next.map_or(Duration::from_secs(1), |next| {
                next.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(5))
            });
            let _ = self
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Stops admitting, shuts down `how` every connection (Read: sessions answer what they
    /// already received), and stops the reaper.
    pub fn stop(&self, how: Shutdown) {
        let mut state = self.lock();
        state.stopped = true;
        for entry in state.entries.values() {
            entry.closer.close(how);
        }
        drop(state);
        self.changed.notify_all();
    }

    /// Waits up to `grace` until no connection is left; returns how many still are.
    pub fn wait_empty(&self, grace: Duration) -> usize {
        let state = self.lock();
        let (state, _) = self
            .changed
            .wait_timeout_while(state, grace, |state| !state.entries.is_empty())
            .unwrap_or_else(PoisonError::into_inner);
        state.entries.len()
    }

    /// Connections (handshaking, serving).
    pub fn counts(&self) -> (usize, usize) {
        let state = self.lock();
        (state.handshaking, state.serving)
    }
}

/// One admitted connection; dropping it (when the connection's thread ends) frees its place.
#[derive(Debug)]
pub struct Ticket {
    admission: Arc<Admission>,
    id: u64,
}

impl Ticket {
    /// The admission this ticket belongs to.
    pub fn admission(&self) -> &Admission {
        &self.admission
    }

    /// The handshake succeeded: the connection now counts as serving, without a deadline.
    /// Refused when the serving cap is full or the connection was evicted or reaped.
    pub fn promote(&self) -> Result<(), Refusal> {
        let admission = &self.admission;
        let mut state = admission.lock();
        let serving = state.serving;
        let Some(entry) = state.entries.get_mut(&self.id) else {
            return Err(Refusal::Gone);
        };
        match entry.phase {
            Phase::Serving => return Ok(()),
            Phase::Handshaking { .. } if serving >= admission.limits.serving_max => {
                log::warn!(
                    "{}: connection refused after its handshake: {} connections served already",
                    admission.what,
                    admission.limits.serving_max
                );
                return Err(Refusal::Full);
            }
            Phase::Handshaking { .. } => entry.phase = Phase::Serving,
        }
        state.handshaking -= 1;
        state.serving += 1;
        Ok(())
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.admission.lock();
        let removed = Admission::remove(&mut state, self.id);
        drop(state);
        if removed.is_some() {
            self.admission.changed.notify_all();
        }
    }
}

/// Back-off of an accept loop: 10 ms after the first failure, doubling up to 100 ms, back to
/// zero after a success. A failing `accept` (EMFILE) returns at once, so without it the loop
/// would spin and flood the log.
#[derive(Debug, Default)]
pub struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    /// First pause.
    pub const MIN: Duration = Duration::from_millis(10);
    /// Longest pause.
    pub const MAX: Duration = Duration::from_millis(100);

    /// A failure: how long to pause before the next `accept`.
    pub fn failed(&mut self) -> Duration {
        let shift = self.failures.min(4);
        self.failures = self.failures.saturating_add(1);
        (Self::MIN * (1 << shift)).min(Self::MAX)
    }

    /// A success: the next failure starts from the shortest pause.
    pub fn succeeded(&mut self) {
        self.failures = 0;
    }

    /// Whether this failure should be logged (the first of a run, then every 100th), so a
    /// long exhaustion does not fill the log.
    pub fn should_log(&self) -> bool {
        self.failures <= 1 || self.failures % 100 == 0
    }
}

/// True for the errors of a process or system out of descriptors (EMFILE, ENFILE).
pub fn out_of_descriptors(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(23 | 24))
}

/// An accept loop's handling of one failed `accept`: out of descriptors, the oldest
/// handshaking connection of `admission` is closed for the waiting peer; then log
/// (rate-limited) and pause.
pub fn accept_failed(admission: &Admission, backoff: &mut AcceptBackoff, err: &std::io::Error) {
    let evicted = out_of_descriptors(err) && admission.evict_oldest();
    let pause = backoff.failed();
    if backoff.should_log() {
        let what = admission.what;
        let freed = if evicted {
            ", the oldest handshake closed"
        } else {
            ""
        };
        log::warn!("{what}: accept failed (pausing {pause:?}{freed}, still listening): {err}");
    }
    std::thread::sleep(pause);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts its closes.
    #[derive(Debug, Default)]
    struct Probe(Arc<AtomicUsize>);
    impl Closer for Probe {
        fn close(&self, _how: Shutdown) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn probe() -> (Box<dyn Closer>, Arc<AtomicUsize>) {
        let closes = Arc::new(AtomicUsize::new(0));
        (Box::new(Probe(closes.clone())), closes)
    }

    fn limits(handshaking_max: usize, serving_max: usize) -> AdmissionLimits {
        AdmissionLimits {
            handshaking_max,
            serving_max,
            handshake_deadline: Duration::from_secs(10),
        }
    }

    // Goal: a full handshaking cap evicts the oldest handshaking connection, never a serving
    // one, and counts stay exact. Method: cap 2, promote the first, admit three more.
    #[test]
    fn full_cap_evicts_the_oldest_handshaking() {
        let admission = Admission::new("test", limits(2, 8));
        let now = Instant::now();
        let (c0, closed0) = probe();
        let t0 = admission.admit_at(c0, now).unwrap();
        t0.promote().unwrap();
        let (c1, closed1) = probe();
        let t1 = admission.admit_at(c1, now).unwrap();
        let (c2, closed2) = probe();
        let _t2 = admission.admit_at(c2, now).unwrap();
        assert_eq!(admission.counts(), (2, 1));
        let (c3, closed3) = probe();
        let _t3 = admission.admit_at(c3, now).unwrap();
        assert_eq!(
            closed1.load(Ordering::SeqCst),
            1,
            "oldest handshaking evicted"
        );
        assert_eq!(closed0.load(Ordering::SeqCst), 0, "serving kept");
        assert_eq!(closed2.load(Ordering::SeqCst), 0);
        assert_eq!(closed3.load(Ordering::SeqCst), 0);
        assert_eq!(admission.counts(), (2, 1));
        // The evicted one can neither be promoted nor free a place twice.
        assert_eq!(t1.promote(), Err(Refusal::Gone));
        drop(t1);
        assert_eq!(admission.counts(), (2, 1));
        drop(t0);
        assert_eq!(admission.counts(), (2, 0));
    }

    // Goal: the serving cap refuses a promotion and leaves the connection handshaking (its
    // thread closes it). Method: cap 1 serving, two promotions.
    #[test]
    fn serving_cap_refuses_promotion() {
        let admission = Admission::new("test", limits(4, 1));
        let a = admission.admit(probe().0).unwrap();
        let b = admission.admit(probe().0).unwrap();
        a.promote().unwrap();
        assert_eq!(a.promote(), Ok(()), "promoting twice is harmless");
        assert_eq!(b.promote(), Err(Refusal::Full));
        assert_eq!(admission.counts(), (1, 1));
        drop(a);
        b.promote().unwrap();
        assert_eq!(admission.counts(), (0, 1));
    }

    // Goal: reap closes exactly the handshakes past their deadline and reports the next
    // deadline; promoted connections have none. Method: explicit instants.
    #[test]
    fn reap_closes_expired_handshakes_only() {
        let admission = Admission::new("test", limits(8, 8));
        let t = Instant::now();
        let (old, old_closed) = probe();
        let _old = admission.admit_at(old, t).unwrap();
        let (young, young_closed) = probe();
        let _young = admission
            .admit_at(young, t + Duration::from_secs(5))
            .unwrap();
        let (served, served_closed) = probe();
        let served_ticket = admission.admit_at(served, t).unwrap();
        served_ticket.promote().unwrap();
        assert_eq!(
            admission.reap(t + Duration::from_secs(9)),
            (0, Some(t + Duration::from_secs(10)))
        );
        let (count, next) = admission.reap(t + Duration::from_secs(10));
        assert_eq!(count, 1);
        assert_eq!(next, Some(t + Duration::from_secs(15)));
        assert_eq!(old_closed.load(Ordering::SeqCst), 1);
        assert_eq!(young_closed.load(Ordering::SeqCst), 0);
        assert_eq!(admission.reap(t + Duration::from_secs(60)).0, 1);
        assert_eq!(served_closed.load(Ordering::SeqCst), 0);
        assert_eq!(admission.counts(), (0, 1));
    }

    // Goal: stop closes everyone, refuses newcomers, and wait_empty sees the tickets leave.
    #[test]
    fn stop_closes_all_and_refuses() {
        let admission = Admission::new("test", limits(8, 8));
        let (a, a_closed) = probe();
        let a = admission.admit(a).unwrap();
        admission.stop(Shutdown::Read);
        assert_eq!(a_closed.load(Ordering::SeqCst), 1);
        assert_eq!(admission.admit(probe().0).err(), Some(Refusal::Stopped));
        assert_eq!(admission.wait_empty(Duration::from_millis(1)), 1);
        drop(a);
        assert_eq!(admission.wait_empty(Duration::from_millis(1)), 0);
    }

    // Goal: the reaper thread closes a handshake past its deadline without being poked.
    #[test]
    fn reaper_thread_enforces_the_deadline() {
        let admission = Admission::new(
            "test",
            AdmissionLimits {
                handshaking_max: 4,
                serving_max: 4,
                handshake_deadline: Duration::from_millis(50),
            },
        );
        let reaper = admission.start_reaper().unwrap();
        let (c, closed) = probe();
        let _ticket = admission.admit(c).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while closed.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(closed.load(Ordering::SeqCst), 1);
        admission.stop(Shutdown::Both);
        reaper.join().unwrap();
    }

    // Goal: out of descriptors, the oldest handshaking connection is closed, never a
    // serving one. Method: one serving, two handshaking, evict three times.
    #[test]
    fn evict_oldest_spares_serving() {
        let admission = Admission::new("test", limits(8, 8));
        let (s, s_closed) = probe();
        let served = admission.admit(s).unwrap();
        served.promote().unwrap();
        let (a, a_closed) = probe();
        let _a = admission.admit(a).unwrap();
        let (b, b_closed) = probe();
        let _b = admission.admit(b).unwrap();
        assert!(admission.evict_oldest());
        assert_eq!(a_closed.load(Ordering::SeqCst), 1);
        assert_eq!(b_closed.load(Ordering::SeqCst), 0);
        assert!(admission.evict_oldest());
        assert!(!admission.evict_oldest());
        assert_eq!(s_closed.load(Ordering::SeqCst), 0);
        assert_eq!(admission.counts(), (0, 1));
        let emfile = std::io::Error::from_raw_os_error(24);
        assert!(out_of_descriptors(&emfile));
        assert!(!out_of_descriptors(&std::io::Error::from_raw_os_error(11)));
    }

    // Goal: back-off is 10, 20, 40, 80, 100, 100 ms and restarts after a success.
    #[test]
    fn accept_backoff_doubles_to_the_cap() {
        let mut backoff = AcceptBackoff::default();
        let pauses: Vec<u64> = (0..6)
            .map(|_| backoff.failed().as_millis() as u64)
            .collect();
        assert_eq!(pauses, [10, 20, 40, 80, 100, 100]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), Duration::from_millis(10));
    }
}
