//! Tests of the lease routes' checks and wire shapes, through [`crate::api::server::route`].

use std::time::Duration;

use super::*;
use crate::api::http::{Method, Reply};
use crate::api::{Control, ControlError};

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
    fn exports(&self) -> Vec<crate::api::types::ExportStatus> {
        Vec::new()
    }
    fn add_export(
        &self,
        _: crate::api::types::ExportSpec,
    ) -> Result<crate::api::types::ExportStatus, ControlError> {
        Err(ControlError::Invalid("no".into()))
    }
    fn remove_export(&self, _: &str, _: bool) -> Result<(), ControlError> {
        Err(ControlError::Invalid("no".into()))
    }
    fn trackers(&self, _: &str) -> Result<Vec<crate::api::types::TrackerStatus>, ControlError> {
        Ok(Vec::new())
    }
    fn add_tracker(
        &self,
        _: &str,
        _: crate::api::types::TrackerAdd,
    ) -> Result<crate::api::types::TrackerStatus, ControlError> {
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
    ) -> Result<crate::api::types::HeatMap, ControlError> {
        Err(ControlError::Invalid("no".into()))
    }
    fn admit_epoch(&self, epoch: u64) -> Result<crate::api::EpochHold<'_>, ControlError> {
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
    let context = crate::api::server::Context::new("tok".into(), true, witness.clone());
    let mut body = body.as_bytes();
    crate::api::server::route(&method, url, Some("Bearer tok"), epoch, &mut body, &context)
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
