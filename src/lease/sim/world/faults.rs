//! Faults the world injects, and their repair.

use super::{Event, NodeClock, World, MS};
use crate::lease::sim::host_name;
use crate::lease::sim::Scripted;
use crate::lease::witness::Witness;

impl World {
    pub(super) fn fault_event(&mut self, event: Event) {
        match event {
            Event::Fault if self.faults_on => {
                self.inject();
                let next_ns = self.prng.below(2 * self.options.fault_every_ms * MS) + MS;
                self.queue.push(self.now_ns + next_ns, Event::Fault);
            }
            Event::Script(scripted) => self.scripted(scripted),
            Event::Heal => self.heal(),
            Event::RestartManager(manager) if self.managers[manager].role.is_none() => {
                self.start_manager(manager);
            }
            Event::RestartHost(host) => self.restart_host(host),
            Event::Reconnect(a, b) => {
                self.cut[a][b] = false;
                self.cut[b][a] = false;
            }
            Event::Undrain(host) => self.set_drained(host, false),
            Event::DiskFast(host) => self.hosts[host].slow = false,
            _ => {}
        }
    }

    /// A random duration between `min_ms` and `max_ms`, in nanoseconds.
    fn span_ns(&mut self, min_ms: u64, max_ms: u64) -> u64 {
        (min_ms + self.prng.below(max_ms - min_ms + 1)) * MS
    }

    fn inject(&mut self) {
        let nodes = 2 + self.hosts.len();
        match self.prng.below(7) {
            0 => {
                let (a, b) = (self.prng.index(nodes), self.prng.index(nodes));
                if a != b && (a < 2 || b < 2) {
                    self.cut_for(a, b);
                }
            }
            1 => {
                let node = self.prng.index(nodes);
                for other in 0..nodes {
                    if other != node {
                        self.cut_for(node, other);
                    }
                }
            }
            2 => {
                let manager = self.prng.index(2);
                self.managers[manager].role = None; // kill -9: only the durable state stays
                let back_ns = self.span_ns(500, 10_000);
                self.queue
                    .push(self.now_ns + back_ns, Event::RestartManager(manager));
            }
            3 => self.crash_host(),
            4 => {
                let manager = self.prng.index(2);
                let until_ns = self.now_ns + self.span_ns(1_000, 10_000);
                let node = &mut self.managers[manager];
                node.paused_until_ns = node.paused_until_ns.max(until_ns);
            }
            5 => {
                let host = self.prng.index(self.hosts.len());
                self.set_drained(host, true);
                let back_ns = self.span_ns(5_000, 30_000);
                self.queue.push(self.now_ns + back_ns, Event::Undrain(host));
            }
            _ => {
                let host = self.prng.index(self.hosts.len());
                self.hosts[host].slow = true;
                let back_ns = self.span_ns(2_000, 20_000);
                self.queue
                    .push(self.now_ns + back_ns, Event::DiskFast(host));
            }
        }
    }

    fn cut_for(&mut self, a: usize, b: usize) {
        let back_ns = self.span_ns(1_000, 15_000);
        self.cut_ns(a, b, back_ns);
    }

    fn cut_ns(&mut self, a: usize, b: usize, duration_ns: u64) {
        self.cut[a][b] = true;
        self.cut[b][a] = true;
        self.queue
            .push(self.now_ns + duration_ns, Event::Reconnect(a, b));
    }

    /// The witness host both managers recorded (the active's view first).
    fn witness_host(&self, active: usize) -> Option<usize> {
        let choice = self.managers[active].durable.choice.as_ref()?;
        Some(super::host_index(&choice.host))
    }

    fn scripted(&mut self, scripted: Scripted) {
        let Some(active) = self.active_manager() else {
            return; // nothing to aim at: the run's report shows no recovery timed
        };
        let witness = self.witness_host(active).unwrap_or(0);
        let nodes = 2 + self.hosts.len();
        let duration_ms = match scripted {
            Scripted::KillActive(ms) => {
                self.managers[active].role = None;
                self.queue
                    .push(self.now_ns + ms * MS, Event::RestartManager(active));
                ms
            }
            Scripted::IsolateActive(ms) => {
                for other in (0..nodes).filter(|other| *other != active) {
                    self.cut_ns(active, other, ms * MS);
                }
                ms
            }
            Scripted::CutActiveFromWitness(ms) => {
                self.cut_ns(active, 2 + witness, ms * MS);
                ms
            }
            Scripted::CutManagers(ms) => {
                self.cut_ns(0, 1, ms * MS);
                ms
            }
            Scripted::CrashWitness(ms) => {
                self.crash_host_for(witness, ms * MS);
                ms
            }
            Scripted::RestartWitness => {
                self.crash_host_for(witness, 0);
                0
            }
            Scripted::DrainWitness(ms) => {
                self.set_drained(witness, true);
                self.queue
                    .push(self.now_ns + ms * MS, Event::Undrain(witness));
                ms
            }
            Scripted::PauseActive(ms) => {
                self.managers[active].paused_until_ns = self.now_ns + ms * MS;
                ms
            }
        };
        self.start_recovery(duration_ms);
    }

    fn crash_host(&mut self) {
        let host = self.prng.index(self.hosts.len());
        let back_ns = self.span_ns(1_000, 15_000);
        self.crash_host_for(host, back_ns);
    }

    fn crash_host_for(&mut self, host: usize, down_ns: u64) {
        let node = &mut self.hosts[host];
        if node.witness.is_none() {
            return;
        }
        node.witness = None;
        node.crash_count += 1;
        node.busy = false;
        node.landing = false;
        node.waiting.clear();
        self.queue
            .push(self.now_ns + down_ns, Event::RestartHost(host));
    }

    /// The host's agent starts again: a new clock origin, its witness recovered from disk
    /// and counting every lease as renewed now.
    fn restart_host(&mut self, host: usize) {
        let clock = NodeClock::drawn(&mut self.prng, self.options.drift_ppm);
        let node = &mut self.hosts[host];
        if node.witness.is_some() {
            return;
        }
        node.clock = clock;
        let local_ns = node.clock.local(self.now_ns);
        node.witness = Some(Witness::recovered(node.disk.clone(), local_ns));
    }

    fn set_drained(&mut self, host: usize, drained: bool) {
        self.drained[host] = drained;
        let name = host_name(host);
        for node in &mut self.managers {
            if let Some(role) = node.role.as_mut() {
                if drained {
                    role.drain(&name);
                } else {
                    role.undrain(&name);
                }
            }
        }
    }

    /// Faults stop; every link, process, host and disk comes back.
    fn heal(&mut self) {
        self.faults_on = false;
        for row in &mut self.cut {
            row.fill(false);
        }
        for manager in 0..2 {
            self.managers[manager].paused_until_ns = 0;
            if self.managers[manager].role.is_none() {
                self.start_manager(manager);
            }
        }
        for host in 0..self.hosts.len() {
            self.restart_host(host);
            self.hosts[host].slow = false;
            self.set_drained(host, false);
        }
    }
}
