//! The `[agent.limits]` table: what the agent spends on peers before and after they
//! authenticate (DESIGN invariant 6). Every field is optional; the defaults suit a host
//! serving a few hundred VM disks.
//!
//! ```toml
//! [agent.limits]
//! nbd_handshaking_max = 64          # per NBD listener (unix socket, TCP)
//! nbd_serving_max = 1024
//! nbd_handshake_timeout_ms = 10000
//! request_timeout_ms = 60000        # a request's header and payload, from its first byte
//! reply_timeout_ms = 60000          # a reply write without progress (client not reading)
//! connection_bytes = "64M"          # buffers of one NBD connection
//! agent_bytes = "1G"                # buffers in flight of all NBD connections
//! stream_handshaking_max = 16       # block-stream listener
//! stream_serving_max = 64
//! stream_handshake_timeout_ms = 5000
//! ```

use std::time::Duration;

use serde::Deserialize;

use crate::nbd::admission::AdmissionLimits;
use crate::nbd::bufpool::Budget;
use crate::nbd::server::ServerLimits;
use crate::units::parse_size;

/// `[agent.limits]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileLimits {
    nbd_handshaking_max: Option<usize>,
    nbd_serving_max: Option<usize>,
    nbd_handshake_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    reply_timeout_ms: Option<u64>,
    connection_bytes: Option<SizeValue>,
    agent_bytes: Option<SizeValue>,
    stream_handshaking_max: Option<usize>,
    stream_serving_max: Option<usize>,
    stream_handshake_timeout_ms: Option<u64>,
}

/// A size written either as a number of bytes or as a string with a unit ("64M").
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

/// A field of `[agent.limits]` out of range, as the config error names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct LimitsError {
    /// `limits.FIELD`.
    pub field: String,
    /// What is wrong.
    pub problem: String,
}

/// The resource limits of the agent, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Per NBD listener.
    pub nbd: AdmissionLimits,
    /// A request's header and payload, from its first byte.
    pub request_timeout: Duration,
    /// A reply write without progress.
    pub reply_timeout: Duration,
    /// Buffers of one NBD connection.
    pub connection_bytes: u64,
    /// Buffers in flight of all NBD connections.
    pub agent_bytes: u64,
    /// The block-stream listener.
    pub stream: AdmissionLimits,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nbd: AdmissionLimits::NBD,
            request_timeout: Duration::from_secs(60),
            reply_timeout: Duration::from_secs(60),
            connection_bytes: 64 << 20,
            agent_bytes: 1 << 30,
            stream: AdmissionLimits::STREAM,
        }
    }
}

fn invalid(field: &str, problem: String) -> LimitsError {
    LimitsError {
        field: format!("limits.{field}"),
        problem,
    }
}

fn count(field: &str, value: Option<usize>, default: usize) -> Result<usize, LimitsError> {
    let value = value.unwrap_or(default);
    if !(1..=1_000_000).contains(&value) {
        return Err(invalid(field, format!("{value} is not in 1..=1000000")));
    }
    Ok(value)
}

fn millis(field: &str, value: Option<u64>, default: Duration) -> Result<Duration, LimitsError> {
    let Some(ms) = value else { return Ok(default) };
    if !(100..=3_600_000).contains(&ms) {
        return Err(invalid(field, format!("{ms} ms is not in 100..=3600000")));
    }
    Ok(Duration::from_millis(ms))
}

fn bytes(field: &str, value: Option<&SizeValue>, default: u64) -> Result<u64, LimitsError> {
    let value = match value {
        None => default,
        Some(SizeValue::Bytes(n)) => *n,
        Some(SizeValue::Text(text)) => {
            parse_size(text).map_err(|p| invalid(field, p.to_string()))?
        }
    };
    // At least one 4 KiB buffer; at most what a 64-bit host could address sensibly.
    if !(4096..=1 << 44).contains(&value) {
        return Err(invalid(field, format!("{value} bytes is not in 4K..=16T")));
    }
    Ok(value)
}

impl Limits {
    pub(super) fn build(file: Option<&FileLimits>) -> Result<Limits, LimitsError> {
        let empty = FileLimits::default();
        let file = file.unwrap_or(&empty);
        let d = Limits::default();
        let limits = Limits {
            nbd: AdmissionLimits {
                handshaking_max: count(
                    "nbd_handshaking_max",
                    file.nbd_handshaking_max,
                    d.nbd.handshaking_max,
                )?,
                serving_max: count("nbd_serving_max", file.nbd_serving_max, d.nbd.serving_max)?,
                handshake_deadline: millis(
                    "nbd_handshake_timeout_ms",
                    file.nbd_handshake_timeout_ms,
                    d.nbd.handshake_deadline,
                )?,
            },
            request_timeout: millis(
                "request_timeout_ms",
                file.request_timeout_ms,
                d.request_timeout,
            )?,
            reply_timeout: millis("reply_timeout_ms", file.reply_timeout_ms, d.reply_timeout)?,
            connection_bytes: bytes(
                "connection_bytes",
                file.connection_bytes.as_ref(),
                d.connection_bytes,
            )?,
            agent_bytes: bytes("agent_bytes", file.agent_bytes.as_ref(), d.agent_bytes)?,
            stream: AdmissionLimits {
                handshaking_max: count(
                    "stream_handshaking_max",
                    file.stream_handshaking_max,
                    d.stream.handshaking_max,
                )?,
                serving_max: count(
                    "stream_serving_max",
                    file.stream_serving_max,
                    d.stream.serving_max,
                )?,
                handshake_deadline: millis(
                    "stream_handshake_timeout_ms",
                    file.stream_handshake_timeout_ms,
                    d.stream.handshake_deadline,
                )?,
            },
        };
        if limits.connection_bytes > limits.agent_bytes {
            return Err(invalid(
                "connection_bytes",
                format!(
                    "{} is more than agent_bytes ({})",
                    limits.connection_bytes, limits.agent_bytes
                ),
            ));
        }
        Ok(limits)
    }

    /// The NBD server's bounds (a fresh agent budget: call once).
    pub fn nbd(&self) -> ServerLimits {
        let to_usize = |bytes: u64| usize::try_from(bytes).unwrap_or(usize::MAX);
        ServerLimits {
            admission: self.nbd,
            request_deadline: self.request_timeout,
            reply_deadline: self.reply_timeout,
            connection_bytes: to_usize(self.connection_bytes),
            budget: Budget::new(to_usize(self.agent_bytes)),
        }
    }

    /// The block-stream listener's bounds.
    pub fn stream(&self) -> AdmissionLimits {
        self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(text: &str) -> Result<Limits, LimitsError> {
        let file: FileLimits = toml::from_str(text).expect("parses");
        Limits::build(Some(&file))
    }

    // Goal: defaults without a table, every field read, bad values named. Method: TOML
    // texts of the table's body (config.rs tests it in place, under `[agent.limits]`).
    #[test]
    fn limits_table_parses_and_validates() {
        assert_eq!(Limits::build(None), Ok(Limits::default()));
        let text = "nbd_handshaking_max = 8\nnbd_serving_max = 9\n\
                    nbd_handshake_timeout_ms = 2000\nrequest_timeout_ms = 3000\n\
                    reply_timeout_ms = 4000\nconnection_bytes = \"16M\"\n\
                    agent_bytes = 134217728\nstream_handshaking_max = 2\n\
                    stream_serving_max = 3\nstream_handshake_timeout_ms = 1000\n";
        let limits = build(text).unwrap();
        assert_eq!(limits.nbd.handshaking_max, 8);
        assert_eq!(limits.nbd.serving_max, 9);
        assert_eq!(limits.nbd.handshake_deadline, Duration::from_secs(2));
        assert_eq!(limits.request_timeout, Duration::from_secs(3));
        assert_eq!(limits.reply_timeout, Duration::from_secs(4));
        assert_eq!(limits.connection_bytes, 16 << 20);
        assert_eq!(limits.agent_bytes, 128 << 20);
        assert_eq!(limits.stream.handshaking_max, 2);
        assert_eq!(limits.stream.serving_max, 3);
        assert_eq!(limits.stream.handshake_deadline, Duration::from_secs(1));
        for (bad, field) in [
            ("nbd_serving_max = 0", "limits.nbd_serving_max"),
            ("request_timeout_ms = 5", "limits.request_timeout_ms"),
            ("connection_bytes = \"2G\"", "limits.connection_bytes"),
            ("agent_bytes = \"lots\"", "limits.agent_bytes"),
        ] {
            assert_eq!(build(bad).unwrap_err().field, field, "{bad}");
        }
        assert!(toml::from_str::<FileLimits>("threads = 3").is_err());
    }
}
