//! The client's calls to `ferry manager` (its status, the pair's messages, takeover, drains)
//! and the per-call timeout the manager's lease loop needs.

use std::time::Duration;

use super::{encode, json, Client, ClientError};
use crate::api::fleet::{BatchPlan, BatchView, HostAdd, ManagerStatus, TakeoverRequest};
use crate::lease::role::PeerMessage;

impl Client {
    /// The same client with connect and call timeouts of `timeout` (the manager's lease
    /// calls must fail inside a renewal interval, not after a minute).
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = Some(timeout);
        self.http = self.build_http();
        self
    }

    /// A copy of this client carrying `epoch` on every call (see [`Client::with_epoch`]).
    pub fn at_epoch(&self, epoch: u64) -> Client {
        self.copy_with_epoch(Some(epoch))
    }

    /// A client of another address with this one's token, TLS and timeout (a manager's
    /// peer, after a failover).
    pub fn for_address(&self, addr: &str) -> Client {
        let mut other = Client::new(addr, self.token.clone());
        other.tls.clone_from(&self.tls);
        other.timeout = self.timeout;
        other.http = other.build_http();
        if other.tls.is_some() {
            if let Some(rest) = other.base_url.strip_prefix("http://") {
                other.base_url = format!("https://{rest}");
            }
        }
        other
    }

    /// The address this client calls.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// `GET /v1/manager/status`.
    pub fn manager_status(&self) -> Result<ManagerStatus, ClientError> {
        self.call_json("GET", "/v1/manager/status", &[], None)
    }

    /// `POST /v1/manager/peer`: one message of the pair's protocol.
    pub fn manager_peer(&self, message: &PeerMessage) -> Result<(), ClientError> {
        self.call("POST", "/v1/manager/peer", &[], Some(json(message)))
            .map(drop)
    }

    /// `POST /v1/manager/takeover`.
    pub fn manager_takeover(
        &self,
        request: &TakeoverRequest,
    ) -> Result<ManagerStatus, ClientError> {
        self.call_json("POST", "/v1/manager/takeover", &[], Some(json(request)))
    }

    /// `POST /v1/hosts/{name}/drain` (or `/undrain`), forwarded to the peer manager unless
    /// `from_peer`.
    pub fn host_drain(
        &self,
        name: &str,
        drained: bool,
        from_peer: bool,
    ) -> Result<(), ClientError> {
        let action = if drained { "drain" } else { "undrain" };
        let path = format!("/v1/hosts/{}/{action}", encode(name));
        let query: &[(&str, &str)] = if from_peer {
            &[("from_peer", "true")]
        } else {
            &[]
        };
        self.call("POST", &path, query, None).map(drop)
    }

    /// `POST /v1/hosts`: both managers manage one more agent (the one asked tells its peer,
    /// unless `from_peer`).
    pub fn host_add(&self, host: &HostAdd, from_peer: bool) -> Result<(), ClientError> {
        let query: &[(&str, &str)] = if from_peer {
            &[("from_peer", "true")]
        } else {
            &[]
        };
        self.call("POST", "/v1/hosts", query, Some(json(host)))
            .map(drop)
    }

    /// `POST /v1/manager/batches`: the active manager drives `plan` (`from_peer`: the
    /// active replicating it to the standby).
    pub fn manager_submit_batch(
        &self,
        plan: &BatchPlan,
        from_peer: bool,
    ) -> Result<BatchView, ClientError> {
        let query: &[(&str, &str)] = if from_peer {
            &[("from_peer", "true")]
        } else {
            &[]
        };
        self.call_json("POST", "/v1/manager/batches", query, Some(json(plan)))
    }

    /// `GET /v1/manager/batches/{name}`.
    pub fn manager_batch(&self, name: &str) -> Result<BatchView, ClientError> {
        self.call_json(
            "GET",
            &format!("/v1/manager/batches/{}", encode(name)),
            &[],
            None,
        )
    }

    /// `GET /v1/manager/batches`.
    pub fn manager_batches(&self) -> Result<Vec<BatchView>, ClientError> {
        self.call_json("GET", "/v1/manager/batches", &[], None)
    }
}
