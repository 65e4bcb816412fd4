//! The simulated world of [`super`]: its nodes, network, faults and the invariant checker.

use std::collections::VecDeque;

use super::{
    host_name, Event, PendingWrite, Queue, SimOptions, SimReport, SplitMix64, Violation, MS,
};
use crate::lease::fence::{Admission, EpochFence};
use crate::lease::role::{Out, Role, RoleDurable};
use crate::lease::witness::{Decision, LeaseReply, LeaseRequest, Refusal, Witness};
use crate::lease::Lease;

/// Simulated time between two ticks of a manager.
const TICK_MS: u64 = 100;

/// A node's monotonic clock: `offset + rate · true time`.
#[derive(Debug, Clone, Copy)]
struct NodeClock {
    offset_ns: u64,
    rate: f64,
}

impl NodeClock {
    fn drawn(prng: &mut SplitMix64, drift_ppm: u32) -> Self {
        let drift = drift_ppm as f64 / 1e6;
        Self {
            offset_ns: prng.below(1_000_000) * MS,
            rate: 1.0 + drift * (2.0 * prng.unit() - 1.0),
        }
    }

    fn local(&self, true_ns: u64) -> u64 {
        self.offset_ns + (true_ns as f64 * self.rate) as u64
    }
}

#[derive(Debug)]
struct ManagerNode {
    role: Option<Role>,
    durable: RoleDurable,
    clock: NodeClock,
    paused_until_ns: u64,
    incarnation: u32,
}

#[derive(Debug)]
struct HostNode {
    witness: Option<Witness>,
    disk: Option<Lease>,
    clock: NodeClock,
    crash_count: u32,
    busy: bool,
    /// A timed-out write still in flight: the store refuses the next one (busy).
    landing: bool,
    slow: bool,
    waiting: VecDeque<(usize, LeaseRequest, u64)>,
    /// The agent's fence (production code), persisted at once in this model.
    fence: EpochFence,
    /// The checker's own record of the highest epoch this agent executed.
    executed_highest: u64,
}

/// The world: nodes, links, queue, checker state.
pub(super) struct World {
    options: SimOptions,
    prng: SplitMix64,
    queue: Queue,
    now_ns: u64,
    managers: Vec<ManagerNode>,
    hosts: Vec<HostNode>,
    /// `cut[a][b]`: nodes 0 and 1 are the managers, 2.. the hosts.
    cut: Vec<Vec<bool>>,
    drained: Vec<bool>,
    faults_on: bool,
    last_active: Option<(usize, u64)>,
    idle_since_ns: Option<u64>,
    /// A scripted fault being timed: when it struck, whether no one was active since, and
    /// until when an uninterrupted active counts as "no recovery needed".
    recovery: Option<(u64, bool, u64)>,
    report: SimReport,
}

impl World {
    pub(super) fn new(seed: u64, options: SimOptions) -> Self {
        let mut prng = SplitMix64::new(seed);
        let managers = (0..2)
            .map(|_| ManagerNode {
                role: None,
                durable: RoleDurable::default(),
                clock: NodeClock::drawn(&mut prng, options.drift_ppm),
                paused_until_ns: 0,
                incarnation: 0,
            })
            .collect();
        let hosts = (0..options.hosts)
            .map(|_| HostNode {
                witness: Some(Witness::default()),
                disk: None,
                clock: NodeClock::drawn(&mut prng, options.drift_ppm),
                crash_count: 0,
                busy: false,
                landing: false,
                slow: false,
                waiting: VecDeque::new(),
                fence: EpochFence::default(),
                executed_highest: 0,
            })
            .collect();
        let nodes = 2 + options.hosts;
        Self {
            cut: vec![vec![false; nodes]; nodes],
            drained: vec![false; options.hosts],
            options,
            prng,
            queue: Queue::default(),
            now_ns: 0,
            managers,
            hosts,
            faults_on: true,
            last_active: None,
            idle_since_ns: None,
            recovery: None,
            report: SimReport::default(),
        }
    }

    pub(super) fn run(&mut self) -> Result<SimReport, Violation> {
        for manager in 0..2 {
            self.start_manager(manager);
        }
        if self.options.fault_every_ms > 0 {
            self.queue
                .push(self.options.fault_every_ms * MS, Event::Fault);
        }
        for (at_ms, scripted) in self.options.script.clone() {
            self.queue.push(at_ms * MS, Event::Script(scripted));
        }
        let end_ns = self.options.duration_ms * MS;
        let heal_ns = end_ns.saturating_sub(self.options.heal_ms * MS);
        self.queue.push(heal_ns, Event::Heal);
        while let Some((at_ns, event)) = self.queue.pop() {
            if at_ns > end_ns {
                break;
            }
            self.now_ns = at_ns;
            self.report.events += 1;
            self.handle(event)?;
            self.check()?;
        }
        self.report.active_at_end = self.actives().iter().any(Option::is_some);
        // LEASE_SIM_DEBUG=1: the end state of a run that found no active, for diagnosis.
        if !self.report.active_at_end && std::env::var_os("LEASE_SIM_DEBUG").is_some() {
            for node in &self.managers {
                eprintln!("{:#?}", node.role);
            }
            for (host, node) in self.hosts.iter().enumerate() {
                eprintln!("h{}: {:?}, disk {:?}", host + 1, node.witness, node.disk);
            }
        }
        self.report.witness_moves = self
            .managers
            .iter()
            .filter_map(|node| node.durable.choice.as_ref().map(|c| c.generation))
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        Ok(self.report.clone())
    }

    fn start_manager(&mut self, manager: usize) {
        let node = &mut self.managers[manager];
        let mut role = Role::new(self.options.role_config(manager), node.durable.clone());
        for (host, drained) in self.drained.iter().enumerate() {
            if *drained {
                role.drain(&host_name(host));
            }
        }
        node.role = Some(role);
        node.incarnation += 1;
        let incarnation = node.incarnation;
        let first_ns = self.now_ns + self.prng.below(TICK_MS) * MS;
        self.queue.push(first_ns, Event::Tick(manager, incarnation));
    }

    /// The local time of manager `manager`, or `None` when it is down or paused (the
    /// event is then put back until it resumes).
    fn manager_now(&mut self, manager: usize, event: &Event) -> Option<u64> {
        let node = &self.managers[manager];
        node.role.as_ref()?;
        if node.paused_until_ns > self.now_ns {
            self.queue.push(node.paused_until_ns, event.clone());
            return None;
        }
        Some(node.clock.local(self.now_ns))
    }

    fn handle(&mut self, event: Event) -> Result<(), Violation> {
        match event {
            Event::Tick(manager, incarnation) => {
                if self.managers[manager].incarnation == incarnation {
                    self.tick(manager, &event);
                }
            }
            Event::Peer { to, ref message } => {
                if let Some(local_ns) = self.manager_now(to, &event) {
                    let outs = self.role(to).on_peer(message, local_ns);
                    self.carry_out(to, outs);
                }
            }
            Event::Reply {
                to,
                host,
                ref request,
                sent_ns,
                ref reply,
            } => {
                if let Some(local_ns) = self.manager_now(to, &event) {
                    let name = host_name(host);
                    let outs = self
                        .role(to)
                        .on_witness(&name, request, sent_ns, reply, local_ns);
                    self.carry_out(to, outs);
                }
            }
            Event::Pong { to, host } => {
                if let Some(local_ns) = self.manager_now(to, &event) {
                    self.role(to).heard_host(&host_name(host), local_ns);
                }
            }
            Event::AtWitness {
                host,
                from,
                request,
                sent_ns,
            } => {
                if self.hosts[host].witness.is_some() {
                    self.hosts[host].waiting.push_back((from, request, sent_ns));
                    self.serve(host);
                }
            }
            Event::Written {
                host,
                crash_count,
                pending,
                ok,
            } => self.written(host, crash_count, *pending, ok),
            Event::Landed {
                host,
                crash_count,
                lease,
            } => {
                let node = &mut self.hosts[host];
                if node.crash_count == crash_count {
                    node.disk = Some(lease);
                    node.landing = false;
                }
            }
            Event::Command { host, epoch } => return self.command(host, epoch),
            other => self.fault_event(other),
        }
        Ok(())
    }

    fn role(&mut self, manager: usize) -> &mut Role {
        self.managers[manager].role.as_mut().expect("checked up")
    }

    fn tick(&mut self, manager: usize, event: &Event) {
        let Some(local_ns) = self.manager_now(manager, event) else {
            return;
        };
        let outs = self.role(manager).tick(local_ns);
        self.carry_out(manager, outs);
        for host in 0..self.hosts.len() {
            if self.hosts[host].witness.is_some() {
                let delay_ns = self.delay_ns() * 2;
                self.send(
                    manager,
                    2 + host,
                    delay_ns,
                    Event::Pong { to: manager, host },
                );
            }
        }
        let epoch = self.role(manager).active_epoch(local_ns);
        if let Some(epoch) = epoch.filter(|_| self.prng.chance(300)) {
            let host = self.prng.index(self.hosts.len());
            let delay_ns = self.delay_ns();
            self.send(manager, 2 + host, delay_ns, Event::Command { host, epoch });
        }
        let incarnation = self.managers[manager].incarnation;
        self.queue.push(
            self.now_ns + TICK_MS * MS,
            Event::Tick(manager, incarnation),
        );
    }

    fn delay_ns(&mut self) -> u64 {
        self.prng
            .below(u64::from(self.options.delay_ms_max) * MS + 1)
    }

    /// Sends over the link `from`-`to` (node indices), unless cut or lost.
    /// Loss stops with the other faults at the heal.
    fn send(&mut self, from: usize, to: usize, delay_ns: u64, event: Event) {
        let lost = self.faults_on && self.prng.chance(self.options.loss_per_mille);
        if self.cut[from][to] || lost {
            return;
        }
        self.queue.push(self.now_ns + delay_ns, event);
    }

    fn carry_out(&mut self, manager: usize, outs: Vec<Out>) {
        let local_ns = self.managers[manager].clock.local(self.now_ns);
        for out in outs {
            match out {
                Out::Persist(durable) => self.managers[manager].durable = durable,
                Out::Witness { host, request } => {
                    let index = host_index(&host);
                    let event = Event::AtWitness {
                        host: index,
                        from: manager,
                        request,
                        sent_ns: local_ns,
                    };
                    let delay_ns = self.delay_ns();
                    self.send(manager, 2 + index, delay_ns, event);
                }
                Out::Peer(message) => {
                    let delay_ns = self.delay_ns();
                    let event = Event::Peer {
                        to: 1 - manager,
                        message,
                    };
                    self.send(manager, 1 - manager, delay_ns, event);
                }
                Out::Changed { .. } => {}
            }
        }
    }

    /// The witness on `host` serves its queue, one request at a time.
    fn serve(&mut self, host: usize) {
        while !self.hosts[host].busy {
            let Some((from, request, sent_ns)) = self.hosts[host].waiting.pop_front() else {
                return;
            };
            let local_ns = self.hosts[host].clock.local(self.now_ns);
            // The broken rule: the witness trusts the candidate's judgement of expiry.
            let judged_ns = match request {
                LeaseRequest::Acquire { .. } if !self.options.rules.expiry_by_witness => {
                    u64::MAX / 4
                }
                _ => local_ns,
            };
            let witness = self.hosts[host].witness.as_mut().expect("up");
            let reply = match witness.decide(&request, judged_ns, self.options.lease_ms) {
                Decision::Reply(reply) => reply,
                Decision::Renew(reply) => {
                    witness.renewed(local_ns);
                    reply
                }
                Decision::Write { lease, reply } => {
                    let pending = PendingWrite {
                        from,
                        request,
                        sent_ns,
                        lease,
                        reply,
                        decided_ns: local_ns,
                    };
                    self.start_write(host, pending);
                    continue;
                }
            };
            self.reply(host, from, request, sent_ns, reply);
        }
    }

    fn start_write(&mut self, host: usize, pending: PendingWrite) {
        let node = &self.hosts[host];
        if node.landing {
            // The store refuses a write while a timed-out one is still in flight.
            let reply = LeaseReply::Refused {
                reason: Refusal::WriteFailed,
                lease: node.witness.as_ref().and_then(|w| w.lease().cloned()),
            };
            self.reply(host, pending.from, pending.request, pending.sent_ns, reply);
            return;
        }
        let write_ms = if node.slow {
            self.prng
                .below(u64::from(self.options.slow_write_ms_max) + 1)
        } else {
            self.prng.below(5)
        };
        let timeout_ms = u64::from(self.options.write_timeout_ms);
        let crash_count = node.crash_count;
        let ok = write_ms <= timeout_ms;
        if !ok {
            let lease = pending.lease.clone();
            self.hosts[host].landing = true;
            let landed = Event::Landed {
                host,
                crash_count,
                lease,
            };
            self.queue.push(self.now_ns + write_ms * MS, landed);
        }
        self.hosts[host].busy = true;
        let done = Event::Written {
            host,
            crash_count,
            pending: Box::new(pending),
            ok,
        };
        self.queue
            .push(self.now_ns + write_ms.min(timeout_ms) * MS, done);
    }

    fn written(&mut self, host: usize, crash_count: u32, pending: PendingWrite, ok: bool) {
        let node = &mut self.hosts[host];
        if node.crash_count != crash_count {
            return;
        }
        node.busy = false;
        if ok {
            node.disk = Some(pending.lease.clone());
        }
        let local_ns = node.clock.local(self.now_ns);
        let witness = node.witness.as_mut().expect("up while not crashed");
        let reply = witness.written(
            pending.lease,
            pending.reply,
            ok,
            pending.decided_ns,
            local_ns,
        );
        self.reply(host, pending.from, pending.request, pending.sent_ns, reply);
        self.serve(host);
    }

    fn reply(
        &mut self,
        host: usize,
        to: usize,
        request: LeaseRequest,
        sent_ns: u64,
        reply: LeaseReply,
    ) {
        if let LeaseReply::Granted { lease } = &reply {
            self.report.highest_epoch = self.report.highest_epoch.max(lease.epoch);
        }
        let delay_ns = self.delay_ns();
        let event = Event::Reply {
            to,
            host,
            request,
            sent_ns,
            reply,
        };
        self.send(2 + host, to, delay_ns, event);
    }

    /// An agent receives a manager's command: its fence admits or refuses it; the checker
    /// verifies the admitted ones independently.
    fn command(&mut self, host: usize, epoch: u64) -> Result<(), Violation> {
        let node = &mut self.hosts[host];
        if node.witness.is_none() {
            return Ok(()); // down
        }
        match node.fence.check(epoch) {
            Err(_stale) => {
                self.report.commands_fenced += 1;
                return Ok(());
            }
            Ok(Admission::Raise) => node.fence.raise(epoch),
            Ok(Admission::Current) => {}
        }
        if epoch < node.executed_highest {
            return Err(Violation::StaleCommand {
                at_ms: self.now_ns / MS,
                epoch,
                highest: node.executed_highest,
            });
        }
        node.executed_highest = epoch;
        self.report.commands_executed += 1;
        Ok(())
    }

    /// Each manager's active epoch now (down or paused managers do not act).
    fn actives(&self) -> [Option<u64>; 2] {
        let mut actives = [None, None];
        for (slot, node) in actives.iter_mut().zip(&self.managers) {
            if node.paused_until_ns > self.now_ns {
                continue;
            }
            if let Some(role) = &node.role {
                *slot = role.active_epoch(node.clock.local(self.now_ns));
            }
        }
        actives
    }

    fn check(&mut self) -> Result<(), Violation> {
        let at_ms = self.now_ns / MS;
        let actives = self.actives();
        self.time_recovery(actives.iter().any(Option::is_some));
        if let [Some(first), Some(second)] = actives {
            return Err(Violation::TwoActives {
                at_ms,
                epochs: (first, second),
            });
        }
        let Some((manager, epoch)) = actives
            .iter()
            .enumerate()
            .find_map(|(manager, epoch)| epoch.map(|epoch| (manager, epoch)))
        else {
            if self.last_active.is_some() && self.idle_since_ns.is_none() {
                self.idle_since_ns = Some(self.now_ns);
            }
            return Ok(());
        };
        if let Some(idle_ns) = self.idle_since_ns.take() {
            let gap_ms = (self.now_ns - idle_ns) / MS;
            self.report.longest_gap_ms = self.report.longest_gap_ms.max(gap_ms);
        }
        match self.last_active {
            Some(last) if last == (manager, epoch) => {}
            Some((last_manager, previous)) => {
                if epoch < previous || (epoch == previous && manager != last_manager) {
                    return Err(Violation::EpochWentBack {
                        at_ms,
                        previous,
                        epoch,
                    });
                }
                if manager != last_manager {
                    self.report.failovers += 1;
                }
                self.report.activations += 1;
            }
            None => self.report.activations += 1,
        }
        self.last_active = Some((manager, epoch));
        Ok(())
    }
}

impl World {
    /// Starts timing the recovery from a scripted fault striking now and lasting
    /// `duration_ms`.
    pub(super) fn start_recovery(&mut self, duration_ms: u64) {
        let window_ns = (duration_ms + u64::from(self.options.lease_ms) * 2) * MS;
        self.recovery = Some((self.now_ns, false, self.now_ns + window_ns));
    }

    fn time_recovery(&mut self, any_active: bool) {
        let Some((struck_ns, went_idle, window_end_ns)) = self.recovery else {
            return;
        };
        if !any_active {
            self.recovery = Some((struck_ns, true, window_end_ns));
        } else if went_idle {
            self.report.recovery_ms.push((self.now_ns - struck_ns) / MS);
            self.recovery = None;
        } else if self.now_ns >= window_end_ns {
            self.report.recovery_ms.push(0);
            self.recovery = None;
        }
    }

    /// The manager active now, if any.
    pub(super) fn active_manager(&self) -> Option<usize> {
        self.actives().iter().position(Option::is_some)
    }
}

pub(super) fn host_index(name: &str) -> usize {
    name.trim_start_matches('h')
        .parse::<usize>()
        .map(|n| n - 1)
        .expect("a simulated host name")
}

mod faults;
