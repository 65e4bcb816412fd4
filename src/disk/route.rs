//! Where an export's requests go (the local image, or another agent after a switchover), and
//! the write gate a switchover closes.
//!
//! Protocol between a migration job and the sessions of the export:
//! - Sessions call [`ExportRoute::enter_write`] before dispatching a write-type request and
//!   [`ExportRoute::exit_write`] after it completed and was marked in the trackers. A job calls
//!   [`ExportRoute::hold`], then [`ExportRoute::wait_drained`]: once that returns true, no
//!   write is in flight and none starts until [`ExportRoute::release`].
//!   Both sides use SeqCst on `held` and `writes_in_flight` (a Dekker pair): either the
//!   session sees `held` and backs off, or the job sees its increment and waits for it.
//! - Every request (reads too) is dispatched only by a session whose engine matches the
//!   current [`ExportRoute::generation`]; a session that sees a newer generation finishes
//!   what it has in flight, opens the engine of the new route, then goes on. A job changes the
//!   route with writes held, so after `release` no request reaches the old side.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A destination for requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// The export's own image.
    Local,
    /// Another agent's NBD server (TCP `host:port`), serving the same export name.
    Forward {
        /// NBD TCP address of the destination agent.
        addr: String,
        /// The disk's lineage (see [`lineage_token`]): the forwarder refuses an export of
        /// that name and size that says it is another disk. `None`: not checked.
        lineage: Option<u64>,
    },
}

/// Marks the lineage in an export's NBD description.
const LINEAGE_KEY: &str = "ferry-lineage=";

/// The word an export's NBD description carries about the disk's lineage: the id of the
/// job that first moved the disk away from the agent holding its guest's connection (the
/// same at every agent the disk passes through), or `local` for a disk that never left
/// that agent.
pub fn lineage_token(lineage: Option<u64>) -> String {
    match lineage {
        Some(job_id) => format!("{LINEAGE_KEY}{job_id}"),
        None => format!("{LINEAGE_KEY}local"),
    }
}

/// Whether an export whose NBD description is `description` may be the disk of `lineage`:
/// yes when it names that lineage, or names none at all (an agent from before lineages);
/// no when it names another (a different disk under the same name and size).
pub fn lineage_matches(description: Option<&str>, lineage: u64) -> bool {
    let claimed = description
        .unwrap_or_default()
        .split_whitespace()
        .find_map(|word| word.strip_prefix(LINEAGE_KEY));
    claimed.is_none_or(|claimed| claimed.parse::<u64>() == Ok(lineage))
}

/// The route of one export and its write gate.
#[derive(Debug)]
pub struct ExportRoute {
    route: Mutex<Arc<Route>>,
    generation: AtomicU64,
    held: AtomicBool,
    writes_in_flight: AtomicU64,
}

impl Default for ExportRoute {
    fn default() -> Self {
        ExportRoute {
            route: Mutex::new(Arc::new(Route::Local)),
            generation: AtomicU64::new(0),
            held: AtomicBool::new(false),
            writes_in_flight: AtomicU64::new(0),
        }
    }
}

impl ExportRoute {
    /// Generation of the current route; changes with every [`ExportRoute::set`].
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The current route and its generation.
    pub fn current(&self) -> (u64, Arc<Route>) {
        let route = self.route.lock().expect("route lock");
        (self.generation.load(Ordering::SeqCst), route.clone())
    }

    /// Whether requests are forwarded.
    pub fn is_forwarded(&self) -> bool {
        matches!(*self.current().1, Route::Forward { .. })
    }

    /// Switches the route; call with writes held (see the module docs).
    pub fn set(&self, route: Route) {
        let mut current = self.route.lock().expect("route lock");
        *current = Arc::new(route);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// A session is about to dispatch a write-type request: false (and nothing counted) when
    /// writes are held.
    pub fn enter_write(&self) -> bool {
        self.writes_in_flight.fetch_add(1, Ordering::SeqCst);
        if self.held.load(Ordering::SeqCst) {
            self.writes_in_flight.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// A write admitted by [`ExportRoute::enter_write`] completed (and was marked).
    pub fn exit_write(&self) {
        let before = self.writes_in_flight.fetch_sub(1, Ordering::SeqCst);
        debug_assert!(before > 0, "exit_write without enter_write");
    }

    /// Whether writes are held.
    pub fn is_held(&self) -> bool {
        self.held.load(Ordering::SeqCst)
    }

    /// Holds new writes (in-flight ones go on; see [`ExportRoute::wait_drained`]).
    pub fn hold(&self) {
        self.held.store(true, Ordering::SeqCst);
    }

    /// Waits until no admitted write is in flight, up to `timeout`; true when drained.
    pub fn wait_drained(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.writes_in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            // Writes in flight finish within a disk latency: poll finely, the pause counts.
            std::thread::sleep(Duration::from_micros(50));
        }
    }

    /// Lets writes through again.
    pub fn release(&self) {
        self.held.store(false, Ordering::SeqCst);
    }

    /// Waits (up to `timeout`) while writes are held; true once released.
    pub fn wait_released(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_held() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: once hold + wait_drained return, no write is inside the gate until release.
    // Method: 2 threads admit writes in a loop and flag a violation if they find themselves
    // inside while the main thread claims exclusivity (between wait_drained and release).
    #[test]
    fn gate_excludes_writes_while_held() {
        let route = Arc::new(ExportRoute::default());
        let stop = Arc::new(AtomicBool::new(false));
        let exclusive = Arc::new(AtomicBool::new(false));
        let violations = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..2)
            .map(|_| {
                let (route, stop) = (route.clone(), stop.clone());
                let (exclusive, violations) = (exclusive.clone(), violations.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        if route.enter_write() {
                            if exclusive.load(Ordering::SeqCst) {
                                violations.fetch_add(1, Ordering::Relaxed);
                            }
                            std::hint::spin_loop();
                            route.exit_write();
                        }
                    }
                })
            })
            .collect();
        for _ in 0..2000 {
            route.hold();
            assert!(route.wait_drained(Duration::from_secs(5)));
            exclusive.store(true, Ordering::SeqCst);
            std::hint::spin_loop();
            exclusive.store(false, Ordering::SeqCst);
            route.release();
        }
        stop.store(true, Ordering::Relaxed);
        for writer in writers {
            writer.join().unwrap();
        }
        assert_eq!(violations.load(Ordering::Relaxed), 0);
    }

    // Goal: a description naming another lineage (or a local disk) is refused, the same one
    // or none at all (an older agent) accepted; the token reads back. Method: table.
    #[test]
    fn lineages_tell_disks_apart() {
        let ours = format!("ferry export vm1 {}", lineage_token(Some(42)));
        assert!(lineage_matches(Some(&ours), 42));
        assert!(!lineage_matches(Some(&ours), 43));
        let local = format!("ferry export vm1 {}", lineage_token(None));
        assert!(!lineage_matches(Some(&local), 42));
        assert!(lineage_matches(Some("ferry export vm1"), 42));
        assert!(lineage_matches(None, 42));
        assert!(!lineage_matches(Some("ferry-lineage=42x"), 42));
    }

    // Goal: set() bumps the generation and current() returns the new route. Method: set twice.
    #[test]
    fn route_generations() {
        let route = ExportRoute::default();
        assert_eq!(route.current(), (0, Arc::new(Route::Local)));
        route.set(Route::Forward {
            lineage: None,
            addr: "127.0.0.1:1".into(),
        });
        assert_eq!(route.generation(), 1);
        assert!(route.is_forwarded());
    }
}
