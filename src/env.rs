//! The environment core logic runs in: time comes only through [`Clock`].
//!
//! Purpose: heat decay, lease expiry, journal and transfer logic never read the system time
//! directly; `agent::run` passes a [`MonotonicClock`], tests and the simulation pass a
//! [`ManualClock`] (or a simulated one) so that time-dependent behaviour is reproducible.
//!
//! Invariants:
//! - Every clock is monotonic: `now_ns` never returns less than an earlier call returned.
//!   Wall clocks are never used, so clock steps (NTP, manual changes) cannot move time back.
//! - Nanoseconds count from an arbitrary origin (the clock's creation); only differences mean
//!   something, and they are never compared across processes or hosts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// A monotonic source of time in nanoseconds since an arbitrary origin.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Nanoseconds since this clock's origin; never decreases.
    fn now_ns(&self) -> u64;
}

/// The real clock: nanoseconds elapsed since [`MonotonicClock::new`] (CLOCK_MONOTONIC).
#[derive(Debug)]
pub struct MonotonicClock {
    origin: Instant,
}

impl MonotonicClock {
    /// Creates a clock whose origin is now.
    pub fn new() -> Self {
        Self {
            origin: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now_ns(&self) -> u64 {
        // u64 nanoseconds last 584 years; saturating keeps the clock monotonic past that.
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// A clock that moves only when told to; for tests and deterministic runs. Starts at 0.
///
/// Shared between threads through `Arc`; moving it backwards is a bug and panics.
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ns: AtomicU64,
}

impl ManualClock {
    /// Creates a clock reading `start_ns`.
    pub fn new(start_ns: u64) -> Self {
        Self {
            now_ns: AtomicU64::new(start_ns),
        }
    }

    /// Sets the time to `now_ns`, which must not be earlier than the current reading.
    pub fn set_ns(&self, now_ns: u64) {
        // fetch_max keeps the clock monotonic even if the assertion is caught by a test.
        let previous_ns = self.now_ns.fetch_max(now_ns, Ordering::SeqCst);
        assert!(
            previous_ns <= now_ns,
            "ManualClock moved backwards: {previous_ns} ns -> {now_ns} ns"
        );
    }

    /// Moves the time forward by `delta_ns` nanoseconds (saturating).
    pub fn advance_ns(&self, delta_ns: u64) {
        let _ = self
            .now_ns
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |now_ns| {
                Some(now_ns.saturating_add(delta_ns))
            });
    }

    /// Moves the time forward by `delta_ms` milliseconds (saturating).
    pub fn advance_ms(&self, delta_ms: u64) {
        self.advance_ns(delta_ms.saturating_mul(1_000_000));
    }
}

impl Clock for ManualClock {
    fn now_ns(&self) -> u64 {
        self.now_ns.load(Ordering::SeqCst)
    }
}

/// Milliseconds since the Unix epoch on the wall clock (0 before it): the times ferry records
/// for operators (seed steps, in-sync points), never used to order events.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_never_goes_back() {
        // Goal: MonotonicClock is monotonic. Method: read it many times, compare neighbours.
        let clock = MonotonicClock::new();
        let mut previous_ns = clock.now_ns();
        for _ in 0..10_000 {
            let now_ns = clock.now_ns();
            assert!(now_ns >= previous_ns);
            previous_ns = now_ns;
        }
    }

    #[test]
    fn monotonic_clock_advances_with_real_time() {
        // Goal: the real clock measures elapsed time. Method: sleep 2 ms, expect >= 2 ms later.
        let clock = MonotonicClock::default();
        let start_ns = clock.now_ns();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(clock.now_ns() - start_ns >= 2_000_000);
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        // Goal: ManualClock reads what was set. Method: set, advance in ms and ns, read back.
        let clock = ManualClock::default();
        assert_eq!(clock.now_ns(), 0);
        clock.set_ns(5);
        assert_eq!(clock.now_ns(), 5);
        clock.advance_ms(2);
        assert_eq!(clock.now_ns(), 2_000_005);
        clock.advance_ns(1);
        assert_eq!(clock.now_ns(), 2_000_006);
        clock.advance_ns(u64::MAX);
        assert_eq!(clock.now_ns(), u64::MAX);
        assert_eq!(ManualClock::new(7).now_ns(), 7);
    }

    #[test]
    #[should_panic(expected = "moved backwards")]
    fn manual_clock_refuses_to_go_back() {
        // Goal: a backwards step is caught as a bug. Method: set 10 then 9, expect a panic.
        let clock = ManualClock::new(10);
        clock.set_ns(9);
    }
}
