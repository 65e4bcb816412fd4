//! How the manager reaches agents and its peer: the [`Transport`] its workers call, over the
//! agents' and the peer's HTTP APIs ([`HttpTransport`]), or in-process in tests and the
//! scale benchmark.
//!
//! Invariants: every call is bounded by a timeout shorter than the renewal interval, so a
//! dead host costs its worker one interval, never the lease loop; lease requests never carry
//! the manager epoch (the witness is not fenced), pings of the active do.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use super::config::ManagerConfig;
use super::fleet::Fleet;
use crate::api::leases::LeaseCall;
use crate::api::tls::ClientTlsOptions;
use crate::api::{Client, ClientError};
use crate::lease::role::PeerMessage;
use crate::lease::witness::{LeaseReply, LeaseRequest};

/// Why a call did not get an answer.
#[derive(Debug, Error)]
pub enum LinkError {
    /// The host is not one this manager manages.
    #[error("host {0} is not managed")]
    UnknownHost(String),
    /// The call failed.
    #[error("call failed")]
    Call(#[from] ClientError),
}

/// What the manager's workers call.
pub trait Transport: Send + Sync {
    /// Asks the witness agent on `host`.
    fn lease(&self, host: &str, request: &LeaseRequest) -> Result<LeaseReply, LinkError>;
    /// A cheap call proving `host` reachable; the active passes its epoch.
    fn ping(&self, host: &str, epoch: Option<u64>) -> Result<(), LinkError>;
    /// Sends one message to the peer manager.
    fn to_peer(&self, message: &PeerMessage) -> Result<(), LinkError>;
}

/// The HTTP transport: the fleet's agents' quick clients, and one for the peer.
#[derive(Debug)]
pub struct HttpTransport {
    fleet: Arc<Fleet>,
    peer: Client,
    pair: String,
    lease_ms: u32,
    write_timeout_ms: u32,
}

impl HttpTransport {
    /// Calls to `fleet`'s agents and to `config`'s peer, sending `token`, over TLS with
    /// `tls`.
    pub fn new(
        config: &ManagerConfig,
        fleet: Arc<Fleet>,
        token: &str,
        tls: Option<&ClientTlsOptions>,
    ) -> Self {
        let peer = Client::new(&config.peer_address, Some(token.to_string()))
            .with_timeout(quick_timeout(config));
        Self {
            fleet,
            peer: match tls {
                Some(tls) => peer.with_tls(tls),
                None => peer,
            },
            pair: config.pair.clone(),
            lease_ms: config.lease.lease_ms,
            write_timeout_ms: config.lease.write_timeout_ms,
        }
    }

    fn agent(&self, host: &str) -> Result<Arc<super::fleet::Agent>, LinkError> {
        self.fleet
            .get(host)
            .ok_or_else(|| LinkError::UnknownHost(host.to_string()))
    }
}

/// How long a lease request or ping may take: one renewal interval (a later answer is
/// useless anyway).
pub fn quick_timeout(config: &ManagerConfig) -> Duration {
    Duration::from_millis(u64::from(config.lease.renew_interval_ms))
}

impl Transport for HttpTransport {
    fn lease(&self, host: &str, request: &LeaseRequest) -> Result<LeaseReply, LinkError> {
        let call = LeaseCall {
            lease_ms: self.lease_ms,
            write_timeout_ms: self.write_timeout_ms,
            request: request.clone(),
        };
        Ok(self.agent(host)?.quick.lease(&self.pair, &call)?)
    }

    fn ping(&self, host: &str, epoch: Option<u64>) -> Result<(), LinkError> {
        let agent = &self.agent(host)?.quick;
        match epoch {
            Some(epoch) => agent.at_epoch(epoch).exports()?,
            None => agent.exports()?,
        };
        Ok(())
    }

    fn to_peer(&self, message: &PeerMessage) -> Result<(), LinkError> {
        Ok(self.peer.manager_peer(message)?)
    }
}
