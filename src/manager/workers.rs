//! The threads that carry the lease loop's requests to the network and bring the answers
//! back as [`Input`]s: a lease worker per host the lease loop has written to (the witness,
//! and a host it moves to: a few, started when first needed), a pool that pings every
//! managed agent once per interval, and the peer sender.
//!
//! Invariants:
//! - Nothing here blocks the lease loop: it hands work over with `try_send` to bounded
//!   queues; a full queue drops the request (the protocol treats it as lost).
//! - Lease requests to one host go out one at a time, in the order the loop made them (one
//!   worker per host), and never wait behind a ping: pings have their own pool.
//! - Threads are bounded whatever the fleet's size: at most [`PING_THREADS`] pingers, and a
//!   host has at most one ping in flight (a dead host costs one pinger one call timeout per
//!   interval, never a queue that grows).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use super::fleet::Fleet;
use super::link::Transport;
use super::shared::{HostJob, Input, Shared};
use crate::lease::role::PeerMessage;

/// Requests queued per host, and messages to the peer, before new ones are dropped.
const QUEUE_DEPTH: usize = 8;
/// Most threads pinging agents at once.
pub const PING_THREADS: usize = 32;

/// What a worker needs to reach hosts and report back.
#[derive(Clone)]
struct Reach {
    fleet: Arc<Fleet>,
    transport: Arc<dyn Transport>,
    inputs: Sender<Input>,
    shared: Arc<Shared>,
}

/// The lease workers' queues, the pinger and the peer sender.
#[allow(missing_debug_implementations)] // holds a transport trait object and channels
pub struct Workers {
    reach: Reach,
    leases: HashMap<String, Sender<HostJob>>,
    peer: Sender<PeerMessage>,
}

impl Workers {
    /// Starts the pinger (every agent of `fleet` every `ping_interval`) and the peer sender,
    /// all reporting to `inputs`.
    pub fn start(
        fleet: Arc<Fleet>,
        transport: Arc<dyn Transport>,
        inputs: &Sender<Input>,
        ping_interval: Duration,
        shared: &Arc<Shared>,
    ) -> std::io::Result<Self> {
        let reach = Reach {
            fleet,
            transport,
            inputs: inputs.clone(),
            shared: shared.clone(),
        };
        let pinger = Pinger {
            reach: reach.clone(),
            interval: ping_interval,
            in_flight: Arc::new(Mutex::new(HashSet::new())),
        };
        std::thread::Builder::new()
            .name("mgr-pings".into())
            .spawn(move || pinger.run())?;
        let (peer_tx, peer_rx) = crossbeam_channel::bounded::<PeerMessage>(QUEUE_DEPTH);
        let peer = reach.clone();
        std::thread::Builder::new()
            .name("mgr-peer".into())
            .spawn(move || {
                while let Ok(message) = peer_rx.recv() {
                    if peer.shared.stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(err) = peer.transport.to_peer(&message) {
                        log::debug!("peer: {}", crate::error::error_chain(&err));
                    }
                }
            })?;
        Ok(Self {
            reach,
            leases: HashMap::new(),
            peer: peer_tx,
        })
    }

    /// The managed agents.
    pub fn fleet(&self) -> Arc<Fleet> {
        Arc::clone(&self.reach.fleet)
    }

    /// Queues a lease request to `host`'s worker, starting it on first use.
    pub fn lease(&mut self, host: &str, job: HostJob) {
        if !self.leases.contains_key(host) {
            if self.reach.fleet.get(host).is_none() {
                log::warn!("witness {host} is not a managed agent");
                return;
            }
            let (tx, rx) = crossbeam_channel::bounded(QUEUE_DEPTH);
            let reach = self.reach.clone();
            let name = host.to_string();
            let spawned = std::thread::Builder::new()
                .name(format!("mgr-lease-{host}"))
                .spawn(move || lease_worker(&reach, &name, &rx));
            if let Err(err) = spawned {
                log::error!("cannot start the lease worker of {host}: {err}");
                return;
            }
            self.leases.insert(host.to_string(), tx);
        }
        if let Some(queue) = self.leases.get(host) {
            // Full: dropped, as a lost message would be.
            let _ = queue.try_send(job);
        }
    }

    /// Queues a message to the peer manager.
    pub fn to_peer(&self, message: PeerMessage) {
        match self.peer.try_send(message) {
            Ok(()) | Err(TrySendError::Full(_)) => {}
            Err(TrySendError::Disconnected(_)) => log::warn!("peer sender stopped"),
        }
    }
}

/// Sends `host`'s lease requests one at a time until the manager stops.
fn lease_worker(reach: &Reach, host: &str, jobs: &Receiver<HostJob>) {
    while !reach.shared.stop.load(Ordering::Relaxed) {
        let job = match jobs.recv_timeout(Duration::from_millis(200)) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match reach.transport.lease(host, &job.request) {
            Ok(reply) => {
                let _ = reach.inputs.send(Input::Heard(host.to_string()));
                let _ = reach.inputs.send(Input::Reply {
                    host: host.to_string(),
                    request: job.request,
                    sent_ns: job.sent_ns,
                    reply,
                });
            }
            Err(err) => log::debug!("witness {host}: {}", crate::error::error_chain(&err)),
        }
    }
}

/// Pings every managed agent once per interval from a bounded pool.
struct Pinger {
    reach: Reach,
    interval: Duration,
    /// Hosts whose ping is queued or running: never two at once.
    in_flight: Arc<Mutex<HashSet<String>>>,
}

impl Pinger {
    fn run(self) {
        let (tx, rx) = crossbeam_channel::unbounded::<String>();
        let mut threads = 0;
        let mut next = Instant::now();
        while !self.reach.shared.stop.load(Ordering::Relaxed) {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next += self.interval;
            if next < Instant::now() {
                next = Instant::now() + self.interval; // late: do not burst
            }
            let agents = self.reach.fleet.all();
            // Grown with the fleet (agents are added at run time), never past the bound.
            while threads < agents.len().min(PING_THREADS) {
                let (reach, rx, in_flight) =
                    (self.reach.clone(), rx.clone(), Arc::clone(&self.in_flight));
                let spawned = std::thread::Builder::new()
                    .name(format!("mgr-ping-{threads}"))
                    .spawn(move || ping_worker(&reach, &rx, &in_flight));
                if let Err(err) = spawned {
                    log::error!("cannot start a pinger: {err}");
                    break;
                }
                threads += 1;
            }
            let mut in_flight = self
                .in_flight
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            for agent in agents {
                if in_flight.insert(agent.entry.name.clone()) {
                    let _ = tx.send(agent.entry.name.clone());
                }
            }
        }
    }
}

/// Pings the hosts it is handed. An answer proves the host reachable; the active's epoch
/// rides along, so agents' fences meet a new epoch before its first real command.
fn ping_worker(reach: &Reach, hosts: &Receiver<String>, in_flight: &Mutex<HashSet<String>>) {
    while let Ok(host) = hosts.recv() {
        if reach.shared.stop.load(Ordering::Relaxed) {
            break;
        }
        match reach.transport.ping(&host, reach.shared.acting_epoch()) {
            Ok(()) => {
                let _ = reach.inputs.send(Input::Heard(host.clone()));
            }
            Err(err) => log::debug!("agent {host}: {}", crate::error::error_chain(&err)),
        }
        in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&host);
    }
}
