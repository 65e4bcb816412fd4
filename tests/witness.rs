//! The agent as lease witness, over HTTP against a real agent process: a manager pair's lease
//! starts held by nobody, is granted a full lease later and renewed; after kill -9 and a
//! restart on the same state directory the record is the same and counts as renewed at the
//! restart (a candidate is held for a full lease); bad input is a 400.

// An integration test crate is compiled for tests only; the lint is for unit tests in src/.
#![allow(clippy::tests_outside_test_module)]

mod common;

use std::time::Duration;

use common::AgentProc;
use ferry::api::leases::{LeaseCall, LeaseReply, LeaseRequest, ManagerId};
use ferry::api::Client;

const PAIR: &str = "pair-1";
const LEASE_MS: u32 = 3_000;

fn call(request: LeaseRequest) -> LeaseCall {
    LeaseCall {
        lease_ms: LEASE_MS,
        write_timeout_ms: 1_000,
        request,
    }
}

fn acquire(candidate: &str, seen_epoch: u64) -> LeaseCall {
    call(LeaseRequest::Acquire {
        candidate: ManagerId::new(candidate).expect("id"),
        seen_epoch,
        generation: 1,
    })
}

fn renew(holder: &str, epoch: u64) -> LeaseCall {
    call(LeaseRequest::Renew {
        holder: ManagerId::new(holder).expect("id"),
        epoch,
        generation: 1,
    })
}

/// The time left of a Held reply, or a panic naming the reply.
fn held_ms(reply: &LeaseReply) -> u64 {
    match reply {
        LeaseReply::Held { remaining_ms, .. } => *remaining_ms,
        other => panic!("not held: {other:?}"),
    }
}

/// The (epoch, holder) of a Granted reply, or a panic naming the reply.
fn granted(reply: &LeaseReply) -> (u64, String) {
    match reply {
        LeaseReply::Granted { lease } => {
            let holder = lease.holder.as_ref().map(|h| h.to_string());
            (lease.epoch, holder.unwrap_or_default())
        }
        other => panic!("not granted: {other:?}"),
    }
}

/// The line of `name` in `/metrics`.
fn metric(client: &Client, name: &str) -> String {
    let text = client.metrics().expect("metrics");
    text.lines()
        .find(|line| line.starts_with(&format!("{name} ")))
        .unwrap_or_else(|| panic!("{name} not in /metrics:\n{text}"))
        .to_string()
}

/// The lease of `PAIR` as `GET /v1/leases` lists it: (epoch, holder).
fn listed(client: &Client) -> (u64, Option<String>) {
    let statuses = client.leases().expect("leases");
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert_eq!(statuses[0].pair, PAIR);
    assert_eq!(statuses[0].error, None);
    let lease = statuses[0].lease.as_ref().expect("a lease");
    (lease.epoch, lease.holder.as_ref().map(|h| h.to_string()))
}

#[test]
fn a_lease_is_granted_renewed_and_survives_kill_9() {
    // Goal: the witness service end to end, and the restart rule across kill -9. Method: m1
    // acquires (Held, a fresh record), then again after a full lease (Granted epoch 1) and
    // renews, through a client carrying a manager epoch (not sent: the fence stays at 0);
    // m2 is Held. Kill -9, wait a full lease (by the old count m1's lease expires), restart:
    // the record is still epoch 1 held by m1 and m2 is Held for about a full lease.
    let mut agent = AgentProc::start(&[], &[]);
    let operator = agent.client();
    let reply = operator.lease(PAIR, &acquire("m1", 0)).expect("acquire");
    let wait_ms = held_ms(&reply);
    assert_eq!(wait_ms, u64::from(LEASE_MS));
    assert_eq!(listed(&operator), (0, None));
    // The witness's clock started the wait when it decided: a little more is enough.
    std::thread::sleep(Duration::from_millis(wait_ms + 50));
    let manager = agent.client().with_epoch(7);
    let reply = manager.lease(PAIR, &acquire("m1", 0)).expect("acquire");
    assert_eq!(granted(&reply), (1, "m1".to_string()));
    let reply = manager.lease(PAIR, &renew("m1", 1)).expect("renew");
    assert_eq!(granted(&reply), (1, "m1".to_string()));
    let remaining = held_ms(&operator.lease(PAIR, &acquire("m2", 1)).expect("m2"));
    assert!(remaining > u64::from(LEASE_MS) / 2, "{remaining}");
    assert_eq!(listed(&operator), (1, Some("m1".to_string())));
    assert_eq!(
        metric(&operator, "ferry_witness_pairs"),
        "ferry_witness_pairs 1"
    );
    assert_eq!(
        metric(&operator, "ferry_witness_write_failures_total"),
        "ferry_witness_write_failures_total 0"
    );
    assert_eq!(
        metric(&operator, "ferry_manager_epoch"),
        "ferry_manager_epoch 0"
    );

    agent.kill();
    std::thread::sleep(Duration::from_millis(u64::from(LEASE_MS)));
    agent.restart(&[], &[]);
    let operator = agent.client();
    assert_eq!(listed(&operator), (1, Some("m1".to_string())));
    let remaining = held_ms(&operator.lease(PAIR, &acquire("m2", 1)).expect("m2"));
    assert!(
        remaining > u64::from(LEASE_MS) / 2 && remaining <= u64::from(LEASE_MS),
        "{remaining}"
    );
    // m1 may go on: nobody acquired its epoch.
    let reply = operator.lease(PAIR, &renew("m1", 1)).expect("renew");
    assert_eq!(granted(&reply), (1, "m1".to_string()));
    assert_eq!(
        metric(&operator, "ferry_witness_pairs"),
        "ferry_witness_pairs 1"
    );
}

#[test]
fn bad_lease_requests_are_refused() {
    // Goal: bad input gets a 400 and changes nothing. Method: a garbage body, numbers out of
    // range, a bad pair name, an epoch header, sent raw; then the list is still empty.
    let agent = AgentProc::start(&[], &[]);
    let token = ferry::api::token::read(&agent.state_dir.join("api.token")).expect("token");
    let post = |path: &str, body: &str, epoch: Option<&str>| {
        let mut request = ureq::post(&format!("http://{}{path}", agent.api))
            .set("Authorization", &format!("Bearer {token}"))
            .set("Content-Type", "application/json");
        if let Some(epoch) = epoch {
            request = request.set("Ferry-Manager-Epoch", epoch);
        }
        match request.send_string(body) {
            Ok(response) => response.status(),
            Err(ureq::Error::Status(status, _)) => status,
            Err(err) => panic!("{path}: {err}"),
        }
    };
    let good = r#"{"lease_ms":3000,"write_timeout_ms":500,"request":{"op":"read"}}"#;
    assert_eq!(post("/v1/leases/p", "garbage", None), 400);
    assert_eq!(post("/v1/leases/p", r#"{"lease_ms":3000}"#, None), 400);
    let too_slow = r#"{"lease_ms":3000,"write_timeout_ms":1501,"request":{"op":"read"}}"#;
    assert_eq!(post("/v1/leases/p", too_slow, None), 400);
    assert_eq!(post("/v1/leases/..%2Fx", good, None), 400);
    assert_eq!(post("/v1/leases/p", good, Some("3")), 400);
    assert_eq!(post("/v1/leases/p", good, None), 200);
    let client = agent.client();
    assert!(
        client.leases().expect("leases").is_empty(),
        "a read creates nothing"
    );
    let reply = client.lease("p", &call(LeaseRequest::Read)).expect("read");
    assert!(
        matches!(reply, LeaseReply::State { lease: None, .. }),
        "{reply:?}"
    );
    let err = Client::new(&agent.api, Some("wrong".into()))
        .leases()
        .expect_err("wrong token");
    assert_eq!(err.status(), Some(401));
}
