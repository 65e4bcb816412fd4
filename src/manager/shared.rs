//! What the manager's threads share: the inputs of the lease loop ([`Input`], [`HostJob`]),
//! and the [`Shared`] state it publishes (status, the epoch it acts under and until when, the
//! stop flag). Below the lease loop ([`super::runtime`]) and the threads that feed it
//! ([`super::workers`]), so neither imports the other.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use crate::api::fleet::ManagerStatus;
use crate::env::Clock;
use crate::lease::role::PeerMessage;
use crate::lease::witness::{LeaseReply, LeaseRequest};

/// What the loop is told.
#[derive(Debug)]
pub enum Input {
    /// The witness on `host` answered `request`, queued at local time `sent_ns`.
    Reply {
        /// The host.
        host: String,
        /// The request.
        request: LeaseRequest,
        /// When it was queued.
        sent_ns: u64,
        /// The answer.
        reply: LeaseReply,
    },
    /// `host`'s agent answered a ping.
    Heard(String),
    /// A message from the peer manager.
    Peer(PeerMessage),
    /// The operator drained (or returned) a host.
    Drain {
        /// The host.
        host: String,
        /// Drained or back.
        drained: bool,
    },
    /// `ferry manager takeover --force --witness HOST`.
    Force(String),
}

/// A request for one host's worker.
#[derive(Debug)]
pub struct HostJob {
    pub(super) request: LeaseRequest,
    pub(super) sent_ns: u64,
}

/// What the loop shares with the API, the workers and the batch driver: the status, and the
/// epoch the manager acts under with the deadline it must stop by.
#[derive(Debug)]
pub struct Shared {
    /// The latest status.
    pub status: Mutex<ManagerStatus>,
    /// The lease loop's clock (deadlines are in its time).
    pub clock: Arc<dyn Clock>,
    /// `(epoch, until_ns)` while active; `None` when standby.
    acting: Mutex<Option<(u64, u64)>>,
    /// Set to stop every thread.
    pub stop: AtomicBool,
}

impl Shared {
    /// Shared state starting with `status`, timed by `clock`.
    pub fn new(status: ManagerStatus, clock: Arc<dyn Clock>) -> Self {
        Self {
            status: Mutex::new(status),
            clock,
            acting: Mutex::new(None),
            stop: AtomicBool::new(false),
        }
    }

    /// The epoch to send a command under, read against the clock right now: `None` once the
    /// deadline passed, even if the lease loop has not ticked since (a process woken from a
    /// pause must not send one more command under its old epoch). Call it right before each
    /// command.
    pub fn acting_epoch(&self) -> Option<u64> {
        let acting = *self.acting.lock().unwrap_or_else(|p| p.into_inner());
        let (epoch, until_ns) = acting?;
        (self.clock.now_ns() < until_ns).then_some(epoch)
    }

    pub(super) fn set_acting(&self, acting: Option<(u64, u64)>) {
        *self.acting.lock().unwrap_or_else(|p| p.into_inner()) = acting;
    }
}
