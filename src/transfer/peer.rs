//! Reaching a peer agent's block stream by name: the address an operator types
//! (`host[:port]`) resolved to a socket address, and the persistent query a source in doubt
//! uses to learn whether its destination committed.
//!
//! Invariant: [`ask_until_final`] never guesses: it returns only an answer the destination
//! gave, and a "not committed" answer it returns is final (the query fenced the job there).

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use crate::error::error_chain;

use super::{
    query_target, ClusterKey, QueryAnswer, SendOptions, Sender, TargetSpec, TransferError,
};

/// The block stream's port when an address names none.
pub const DEFAULT_PORT: u16 = 7451;

/// How long one query of an in-doubt destination waits.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between queries while the destination cannot be reached.
const QUERY_RETRY: Duration = Duration::from_secs(1);

/// Why a destination was not told to drop a target.
#[derive(Debug, thiserror::Error)]
pub enum AbortError {
    /// Its address does not resolve.
    #[error("destination address")]
    Address(#[source] PeerError),
    /// The stream failed or the destination refused.
    #[error("destination did not confirm")]
    Stream(#[source] TransferError),
}

/// Tells the destination at `destination` to drop the target of `spec` (its image and
/// state); returns once it confirmed. Idempotent at the destination.
pub fn abort_target(
    destination: &str,
    key: &ClusterKey,
    spec: &TargetSpec,
) -> Result<(), AbortError> {
    let addr = resolve_peer(destination).map_err(AbortError::Address)?;
    let options = SendOptions {
        reply_timeout_ms: 10_000,
        connect_timeout_ms: 3_000,
        ..SendOptions::default()
    };
    let (sender, _) = Sender::connect(addr, key, spec, options).map_err(AbortError::Stream)?;
    sender.abort().map_err(AbortError::Stream)
}

/// A peer address that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Name resolution failed.
    #[error("cannot resolve '{text}'")]
    Resolve {
        /// The address as given.
        text: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The name resolved to nothing.
    #[error("'{text}' resolves to no address")]
    NoAddress {
        /// The address as given.
        text: String,
    },
}

/// `host[:port]` of a peer agent's block stream (port [`DEFAULT_PORT`] by default), resolved.
pub fn resolve_peer(text: &str) -> Result<SocketAddr, PeerError> {
    let has_port = text
        .rsplit_once(':')
        .is_some_and(|(_, port)| port.parse::<u16>().is_ok());
    let with_port = if has_port {
        text.to_string()
    } else {
        format!("{text}:{DEFAULT_PORT}")
    };
    with_port
        .to_socket_addrs()
        .map_err(|source| PeerError::Resolve {
            text: text.to_string(),
            source,
        })?
        .next()
        .ok_or_else(|| PeerError::NoAddress {
            text: text.to_string(),
        })
}

/// Queries the destination, finalizing, until it answers: committed, or not (and then, the
/// query having fenced the job there, never).
pub fn ask_until_final(destination: &str, key: &ClusterKey, job_id: u64) -> QueryAnswer {
    let mut attempts = 0u64;
    loop {
        let answer = resolve_peer(destination)
            .map_err(|err| error_chain(&err))
            .and_then(|addr| {
                query_target(addr, key, job_id, true, QUERY_TIMEOUT)
                    .map_err(|err| error_chain(&err))
            });
        match answer {
            Ok(answer) => return answer,
            Err(err) => {
                if attempts % 30 == 0 {
                    log::warn!("job {job_id}: destination {destination} not answering: {err}");
                }
                attempts += 1;
                std::thread::sleep(QUERY_RETRY);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: a bare host gets the default port, an explicit one is kept. Method: loopback.
    #[test]
    fn default_port_only_when_none_given() {
        assert_eq!(resolve_peer("127.0.0.1").unwrap().port(), DEFAULT_PORT);
        assert_eq!(resolve_peer("127.0.0.1:9").unwrap().port(), 9);
        assert!(resolve_peer("").is_err());
    }
}
