//! The witness routes of the control API: a manager's lease requests to the agent that keeps
//! its pair's lease (`docs/manager-lease.md`), and the list of leases kept.
//!
//! | method | path              | body      | answer             |
//! |--------|-------------------|-----------|--------------------|
//! | POST   | /v1/leases/{pair} | LeaseCall | 200 LeaseReply     |
//! | GET    | /v1/leases        |           | 200 [LeaseStatus]  |
//!
//! Invariants:
//! - Token-protected like every route, but never fenced: a lease request is how a manager
//!   *gets* an epoch, so it must neither raise nor check the agent's epoch fence. A request
//!   carrying [`super::http::MANAGER_EPOCH_HEADER`] on these routes is refused with 400
//!   (rather than ignored), so a caller never believes a lease request was fenced; the
//!   [`super::Client`] never sends it here.
//! - A call is checked before it reaches the witness ([`LeaseCall::check`]): the pair by the
//!   name rule, `lease_ms` in [`LEASE_MS_MIN`]..=[`LEASE_MS_MAX`], `write_timeout_ms` in
//!   1..=`lease_ms / 2` (a write slower than half a lease costs renewals; the witness must
//!   still answer well within one).
//! - Refusals of the lease itself (epoch or holder mismatch, write failed) are answers, 200
//!   with [`LeaseReply::Refused`]; HTTP errors mean the request was not decided at all.

use std::io::Read;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::http::{Method, Reply};
use super::server::{decode, method_not_allowed};
use super::Control;
pub use crate::lease::witness::{LeaseReply, LeaseRequest, Refusal};
pub use crate::lease::{Lease, ManagerId};

/// Shortest lease a call may give.
pub const LEASE_MS_MIN: u32 = 100;
/// Longest lease a call may give (10 minutes).
pub const LEASE_MS_MAX: u32 = 600_000;

/// The body of `POST /v1/leases/{pair}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseCall {
    /// The lease a pair new at this witness starts with (the pair's configured lease).
    pub lease_ms: u32,
    /// How long the witness may wait for a record write to be confirmed.
    pub write_timeout_ms: u32,
    /// What the manager asks.
    pub request: LeaseRequest,
}

/// Why a [`LeaseCall`] is refused before it reaches the witness.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseCallError {
    /// `lease_ms` is out of range.
    #[error("lease_ms must be from {LEASE_MS_MIN} to {LEASE_MS_MAX}, not {lease_ms}")]
    LeaseMs {
        /// The value given.
        lease_ms: u32,
    },
    /// `write_timeout_ms` is 0 or more than half the lease.
    #[error("write_timeout_ms must be from 1 to lease_ms / 2 ({half_ms}), not {write_timeout_ms}")]
    WriteTimeout {
        /// The value given.
        write_timeout_ms: u32,
        /// Half the lease.
        half_ms: u32,
    },
}

impl LeaseCall {
    /// Checks the numbers against the module's rule.
    pub fn check(&self) -> Result<(), LeaseCallError> {
        if !(LEASE_MS_MIN..=LEASE_MS_MAX).contains(&self.lease_ms) {
            return Err(LeaseCallError::LeaseMs {
                lease_ms: self.lease_ms,
            });
        }
        let half_ms = self.lease_ms / 2;
        if !(1..=half_ms).contains(&self.write_timeout_ms) {
            return Err(LeaseCallError::WriteTimeout {
                write_timeout_ms: self.write_timeout_ms,
                half_ms,
            });
        }
        Ok(())
    }

    /// `write_timeout_ms` as a duration.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.write_timeout_ms))
    }
}

/// One pair in `GET /v1/leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseStatus {
    /// The manager pair.
    pub pair: String,
    /// Its lease; `null` before the first record, or when `error` is set.
    pub lease: Option<Lease>,
    /// Time until it expires, by the witness's clock.
    pub remaining_ms: u64,
    /// Why the lease file cannot be used; requests for the pair fail until it is repaired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The witness's numbers for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WitnessCounters {
    /// Manager pairs kept (`ferry_witness_pairs`).
    pub pairs: u64,
    /// Record writes that failed or timed out (`ferry_witness_write_failures_total`).
    pub write_failures: u64,
}

/// Answers a request under `/v1/leases` (`segments` are the decoded path's); `None` when the
/// path is another route's.
pub(super) fn route(
    method: &Method,
    segments: &[String],
    manager_epoch: Option<u64>,
    body: &mut dyn Read,
    control: &dyn Control,
) -> Option<Reply> {
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let ["v1", "leases", rest @ ..] = segments.as_slice() else {
        return None;
    };
    if manager_epoch.is_some() {
        return Some(Reply::error(
            400,
            "lease requests are not manager commands: send no manager epoch header",
        ));
    }
    Some(match (rest, method) {
        ([], Method::Get) => Reply::json(200, &control.leases()),
        ([], _) => method_not_allowed("GET"),
        ([pair], Method::Post) => lease(control, pair, body),
        ([_], _) => method_not_allowed("POST"),
        _ => Reply::error(404, "no API route under /v1/leases"),
    })
}

fn lease(control: &dyn Control, pair: &str, body: &mut dyn Read) -> Reply {
    if crate::name::validate(pair).is_err() {
        // The reply never echoes the hostile text; the rule is enough to fix the request.
        return Reply::error(
            400,
            format!(
                "pair: 1 to {} of letters, digits, '.', '_', '-' (no leading '.')",
                crate::name::NAME_MAX_BYTES
            ),
        );
    }
    let call = match decode::<LeaseCall>(body) {
        Ok(call) => call,
        Err(reply) => return reply,
    };
    if let Err(err) = call.check() {
        return Reply::error(400, err.to_string());
    }
    match control.lease(pair, &call) {
        Ok(reply) => Reply::json(200, &reply),
        Err(err) => Reply::from_error(&err),
    }
}

#[cfg(test)]
mod tests {
    use super::super::ControlError;
    use super::*;

    fn call(lease_ms: u32, write_timeout_ms: u32) -> LeaseCall {
        LeaseCall {
            lease_ms,
            write_timeout_ms,
            request: LeaseRequest::Read,
        }
    }

    #[test]
    fn calls_are_checked() {
        // Goal: the numbers are bounded before the witness sees them. Method: the edges.
        assert!(call(100, 50).check().is_ok());
        assert!(call(600_000, 1).check().is_ok());
        assert!(call(4_000, 2_000).check().is_ok());
        for (lease_ms, timeout_ms) in [(99, 1), (600_001, 1), (0, 0)] {
            let err = call(lease_ms, timeout_ms).check().expect_err("lease_ms");
            assert!(matches!(err, LeaseCallError::LeaseMs { .. }), "{err}");
        }
        for (lease_ms, timeout_ms) in [(4_000, 0), (4_000, 2_001), (101, 51)] {
            let err = call(lease_ms, timeout_ms).check().expect_err("timeout");
            assert!(matches!(err, LeaseCallError::WriteTimeout { .. }), "{err}");
        }
    }

    /// A control keeping no exports whose fence panics: lease routes must never reach it.
    #[derive(Debug, Default)]
    struct Witness {
        calls: std::sync::Mutex<Vec<(String, LeaseCall)>>,
    }

    impl Control for Witness {
        fn exports(&self) -> Vec<super::super::types::ExportStatus> {
            Vec::new()
        }
        fn add_export(
            &self,
            _: super::super::types::ExportSpec,
        ) -> Result<super::super::types::ExportStatus, ControlError> {
            Err(ControlError::Invalid("no".into()))
        }
        fn remove_export(&self, _: &str, _: bool) -> Result<(), ControlError> {
            Err(ControlError::Invalid("no".into()))
        }
        fn trackers(
            &self,
            _: &str,
        ) -> Result<Vec<super::super::types::TrackerStatus>, ControlError> {
            Ok(Vec::new())
        }
        fn add_tracker(
            &self,
            _: &str,
            _: super::super::types::TrackerAdd,
        ) -> Result<super::super::types::TrackerStatus, ControlError> {
            Err(ControlError::Invalid("no".into()))
        }
        fn remove_tracker(&self, _: &str, _: &str) -> Result<(), ControlError> {
            Err(ControlError::Invalid("no".into()))
        }
        fn heat(
            &self,
            _: &str,
            _: Option<&str>,
            _: usize,
        ) -> Result<super::super::types::HeatMap, ControlError> {
            Err(ControlError::Invalid("no".into()))
        }
        fn admit_epoch(&self, epoch: u64) -> Result<super::super::EpochHold<'_>, ControlError> {
            panic!("the fence was asked about epoch {epoch} on a lease route");
        }
        fn lease(&self, pair: &str, call: &LeaseCall) -> Result<LeaseReply, ControlError> {
            let mut calls = self.calls.lock().expect("fake lock");
            calls.push((pair.to_owned(), call.clone()));
            Ok(LeaseReply::State {
                lease: None,
                remaining_ms: 0,
            })
        }
        fn leases(&self) -> Vec<LeaseStatus> {
            vec![LeaseStatus {
                pair: "p".into(),
                lease: None,
                remaining_ms: 0,
                error: Some("corrupt".into()),
            }]
        }
    }

    fn answer(
        witness: &std::sync::Arc<Witness>,
        method: Method,
        url: &str,
        epoch: Option<u64>,
        body: &str,
    ) -> Reply {
        let context = super::super::server::Context::new("tok".into(), true, witness.clone());
        let mut body = body.as_bytes();
        super::super::server::route(&method, url, Some("Bearer tok"), epoch, &mut body, &context)
    }

    #[test]
    fn lease_routes_check_input_and_are_never_fenced() {
        // Goal: bad input is a short 400 before the witness; the epoch header is refused, the
        // fence never consulted; a good call reaches the witness as sent. Method: a fake
        // control whose fence panics; garbage, bad numbers, a bad pair, an epoch header,
        // wrong methods, then a good POST and the GET listing.
        let witness = std::sync::Arc::new(Witness::default());
        let good = r#"{"lease_ms":4000,"write_timeout_ms":500,"request":{"op":"read"}}"#;
        let bad_bodies = [
            "garbage",
            "{}",
            r#"{"lease_ms":99,"write_timeout_ms":1,"request":{"op":"read"}}"#,
            r#"{"lease_ms":4000,"write_timeout_ms":2001,"request":{"op":"read"}}"#,
            r#"{"lease_ms":4000,"write_timeout_ms":500,"request":{"op":"steal"}}"#,
            r#"{"lease_ms":4000,"write_timeout_ms":500,"request":{"op":"read"},"x":1}"#,
        ];
        for body in bad_bodies {
            let reply = answer(&witness, Method::Post, "/v1/leases/p", None, body);
            assert_eq!(reply.status, 400, "{body}");
            assert!(reply.body.len() < 300, "{body}");
        }
        for url in ["/v1/leases/..%2Fetc", "/v1/leases/.hidden"] {
            let reply = answer(&witness, Method::Post, url, None, good);
            assert_eq!(reply.status, 400, "{url}");
            assert!(!String::from_utf8_lossy(&reply.body).contains("etc"));
        }
        let reply = answer(&witness, Method::Post, "/v1/leases/p", Some(3), good);
        assert_eq!(reply.status, 400);
        assert_eq!(
            answer(&witness, Method::Get, "/v1/leases", Some(3), "").status,
            400
        );
        assert_eq!(
            answer(&witness, Method::Get, "/v1/leases/p", None, "").status,
            405
        );
        assert_eq!(
            answer(&witness, Method::Post, "/v1/leases", None, good).status,
            405
        );
        assert_eq!(
            answer(&witness, Method::Post, "/v1/leases/p/x", None, good).status,
            404
        );
        assert!(witness.calls.lock().expect("fake lock").is_empty());

        let reply = answer(&witness, Method::Post, "/v1/leases/p", None, good);
        assert_eq!(reply.status, 200);
        let body: LeaseReply = serde_json::from_slice(&reply.body).expect("a reply");
        assert!(matches!(body, LeaseReply::State { lease: None, .. }));
        let calls = witness.calls.lock().expect("fake lock").clone();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].0, "p");
        assert_eq!(calls[0].1.write_timeout(), Duration::from_millis(500));
        let reply = answer(&witness, Method::Get, "/v1/leases", None, "");
        assert_eq!(reply.status, 200);
        let text = String::from_utf8_lossy(&reply.body);
        assert_eq!(
            text,
            r#"[{"pair":"p","lease":null,"remaining_ms":0,"error":"corrupt"}]"#
        );
    }

    #[test]
    fn json_shapes() {
        // Goal: the wire shapes documented in the API stay as they are. Method: encode each
        // request and reply kind, compare with literal JSON, decode back; a bad manager id
        // and an unknown field are refused.
        let id = |name: &str| ManagerId::new(name).expect("valid");
        let lease = Lease {
            epoch: 3,
            holder: Some(id("m1")),
            witness_generation: 1,
            lease_ms: 4000,
        };
        let lease_json =
            r#"{"epoch":3,"holder":"m1","witness_generation":1,"lease_ms":4000}"#.to_string();
        let requests = [
            (
                LeaseRequest::Acquire {
                    candidate: id("m2"),
                    seen_epoch: 3,
                    generation: 1,
                },
                r#"{"op":"acquire","candidate":"m2","seen_epoch":3,"generation":1}"#.to_string(),
            ),
            (
                LeaseRequest::Renew {
                    holder: id("m1"),
                    epoch: 3,
                    generation: 1,
                },
                r#"{"op":"renew","holder":"m1","epoch":3,"generation":1}"#.to_string(),
            ),
            (
                LeaseRequest::Install {
                    lease: lease.clone(),
                },
                format!(r#"{{"op":"install","lease":{lease_json}}}"#),
            ),
            (LeaseRequest::Read, r#"{"op":"read"}"#.to_string()),
        ];
        let replies = [
            (
                LeaseReply::Granted {
                    lease: lease.clone(),
                },
                format!(r#"{{"outcome":"granted","lease":{lease_json}}}"#),
            ),
            (
                LeaseReply::Held {
                    lease: lease.clone(),
                    remaining_ms: 12,
                },
                format!(r#"{{"outcome":"held","lease":{lease_json},"remaining_ms":12}}"#),
            ),
            (
                LeaseReply::Refused {
                    reason: Refusal::WriteFailed,
                    lease: None,
                },
                r#"{"outcome":"refused","reason":"write_failed","lease":null}"#.to_string(),
            ),
            (
                LeaseReply::State {
                    lease: Some(lease),
                    remaining_ms: 0,
                },
                format!(r#"{{"outcome":"state","lease":{lease_json},"remaining_ms":0}}"#),
            ),
        ];
        for (request, json) in requests {
            assert_eq!(serde_json::to_string(&request).expect("encode"), json);
            let back: LeaseRequest = serde_json::from_str(&json).expect("decode");
            assert_eq!(back, request);
        }
        for (reply, json) in replies {
            assert_eq!(serde_json::to_string(&reply).expect("encode"), json);
            let back: LeaseReply = serde_json::from_str(&json).expect("decode");
            assert_eq!(back, reply);
        }
        let bad_id = r#"{"op":"renew","holder":"../x","epoch":3,"generation":1}"#;
        assert!(serde_json::from_str::<LeaseRequest>(bad_id).is_err());
        let unknown = r#"{"op":"renew","holder":"m1","epoch":3,"generation":1,"x":1}"#;
        assert!(serde_json::from_str::<LeaseRequest>(unknown).is_err());
        let call = r#"{"lease_ms":4000,"write_timeout_ms":500,"request":{"op":"read"}}"#;
        let decoded: LeaseCall = serde_json::from_str(call).expect("call");
        assert_eq!(decoded.request, LeaseRequest::Read);
    }
}
