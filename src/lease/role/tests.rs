//! Unit tests of the role: one scripted exchange each; the simulation covers the rest.

use super::*;
use crate::lease::witness::{LeaseReply, LeaseRequest, Witness};

const MS: u64 = 1_000_000;

fn config(me: &str, peer: &str) -> RoleConfig {
    RoleConfig {
        me: ManagerId::new(me).expect("valid"),
        peer: ManagerId::new(peer).expect("valid"),
        bounds: HolderBounds {
            lease_ms: 4_000,
            drift_ppm: 1_000,
            margin_ms: 50,
        },
        renew_interval_ms: 1_000,
        reach_timeout_ms: 2_500,
        rules: Rules::default(),
    }
}

/// The witness on `host` answers `request`, every write succeeding.
fn witness_answer(
    witnesses: &mut [(String, Witness)],
    host: &str,
    request: &LeaseRequest,
    now_ns: u64,
) -> LeaseReply {
    let witness = &mut witnesses
        .iter_mut()
        .find(|(name, _)| name == host)
        .expect("a host")
        .1;
    witness.answer_in_memory(request, now_ns, 4_000)
}

/// Delivers every message between two roles and one witness per host, instantly, at
/// `now_ns`, until nothing is left.
fn deliver(
    roles: &mut [Role; 2],
    witnesses: &mut [(String, Witness)],
    first: [Vec<Out>; 2],
    now_ns: u64,
) {
    let mut queue: Vec<(usize, Out)> = Vec::new();
    for (index, outs) in first.into_iter().enumerate() {
        queue.extend(outs.into_iter().map(|out| (index, out)));
    }
    while !queue.is_empty() {
        let (from, out) = queue.remove(0);
        let (origin, produced) = match out {
            Out::Peer(message) => (1 - from, roles[1 - from].on_peer(&message, now_ns)),
            Out::Witness { host, request } => {
                let reply = witness_answer(witnesses, &host, &request, now_ns);
                (
                    from,
                    roles[from].on_witness(&host, &request, now_ns, &reply, now_ns),
                )
            }
            Out::Persist(_) | Out::Changed { .. } => (from, Vec::new()),
        };
        queue.extend(produced.into_iter().map(|out| (origin, out)));
    }
}

fn step(roles: &mut [Role; 2], witnesses: &mut [(String, Witness)], now_ns: u64) {
    for role in roles.iter_mut() {
        for host in ["h1", "h2", "h3"] {
            role.heard_host(host, now_ns);
        }
    }
    let first = [roles[0].tick(now_ns), roles[1].tick(now_ns)];
    deliver(roles, witnesses, first, now_ns);
}

fn pair() -> ([Role; 2], Vec<(String, Witness)>) {
    let roles = [
        Role::new(config("m1", "m2"), RoleDurable::default()),
        Role::new(config("m2", "m1"), RoleDurable::default()),
    ];
    let witnesses = ["h1", "h2", "h3"]
        .iter()
        .map(|host| (host.to_string(), Witness::default()))
        .collect();
    (roles, witnesses)
}

#[test]
fn the_pair_chooses_a_witness_and_one_becomes_active() {
    // Goal: bootstrap: the lower id proposes, the peer records, a full lease later exactly
    // one is active at epoch 1 (each first waits the reach timeout to know what the other
    // reaches). Method: scripted steps of one second with instant delivery.
    let (mut roles, mut witnesses) = pair();
    for second in 0..12 {
        step(&mut roles, &mut witnesses, second * 1_000 * MS);
    }
    let now_ns = 12_000 * MS;
    let active: Vec<_> = roles.iter().filter(|r| r.is_active(now_ns)).collect();
    assert_eq!(active.len(), 1, "{roles:?}");
    assert_eq!(active[0].active_epoch(now_ns), Some(1));
    assert_eq!(roles[0].durable().choice, roles[1].durable().choice);
    assert_eq!(
        roles[0].durable().choice.as_ref().map(|c| c.host.as_str()),
        Some("h1")
    );
}

#[test]
fn a_drained_witness_moves_without_a_failover() {
    // Goal: draining the witness moves the lease to another host and the active stays
    // active throughout with the same epoch. Method: bootstrap, drain h1 at both, step.
    let (mut roles, mut witnesses) = pair();
    for second in 0..12 {
        step(&mut roles, &mut witnesses, second * 1_000 * MS);
    }
    let active = roles
        .iter()
        .position(|r| r.is_active(12_000 * MS))
        .expect("one active");
    for role in roles.iter_mut() {
        role.drain("h1");
    }
    for second in 12..20 {
        step(&mut roles, &mut witnesses, second * 1_000 * MS);
        assert_eq!(
            roles[active].active_epoch(second * 1_000 * MS + MS),
            Some(1)
        );
        assert!(!roles[1 - active].is_active(second * 1_000 * MS + MS));
    }
    let choice = roles[0].durable().choice.clone().expect("a choice");
    assert_eq!((choice.generation, choice.host.as_str()), (2, "h2"));
    assert_eq!(roles[1].durable().choice, Some(choice));
}

#[test]
fn a_forced_takeover_skips_an_epoch_at_a_witness_chosen_alone() {
    // Goal: `takeover --force` records a witness without the peer, and the epoch it gets
    // stays above anything the lost side could still be granted at the old witness (one
    // takeover there: known + 1). Method: bootstrap, then the standby alone forces h3 and
    // steps with the peer silent; it is active a full lease later at known + 2.
    let (mut roles, mut witnesses) = pair();
    for second in 0..12 {
        step(&mut roles, &mut witnesses, second * 1_000 * MS);
    }
    let active = roles
        .iter()
        .position(|r| r.is_active(12_000 * MS))
        .expect("one active");
    let standby = 1 - active;
    let known = roles[standby].durable().known_epoch;
    let outs = roles[standby].force_choice("h3");
    assert!(matches!(outs.as_slice(), [Out::Persist(_)]), "{outs:?}");
    let choice = roles[standby].durable().choice.clone().expect("forced");
    assert_eq!((choice.host.as_str(), choice.generation), ("h3", 2));
    // The other manager is gone: only the standby ticks from now on.
    for second in 12..20 {
        let now_ns = second * 1_000 * MS;
        roles[standby].heard_host("h3", now_ns);
        let outs = roles[standby].tick(now_ns);
        for out in outs {
            if let Out::Witness { host, request } = out {
                let reply = witness_answer(&mut witnesses, &host, &request, now_ns);
                roles[standby].on_witness(&host, &request, now_ns, &reply, now_ns);
            }
        }
    }
    assert_eq!(roles[standby].active_epoch(20_000 * MS), Some(known + 2));
}
