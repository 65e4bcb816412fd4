//! Unit tests of the witness service on real lease files (under /var/tmp: `O_DIRECT` does not
//! work on tmpfs) with a [`ManualClock`].

use super::*;
use crate::env::ManualClock;
use crate::lease::ManagerId;
const LEASE_MS: u32 = 4_000;
const MS: u64 = 1_000_000;
const TIMEOUT: Duration = Duration::from_secs(5);

/// A fresh directory under /var/tmp.
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ferry-witness-")
        .tempdir_in("/var/tmp")
        .expect("tempdir in /var/tmp")
}

fn service(dir: &Path, clock: &Arc<ManualClock>, pairs_max: usize) -> WitnessService {
    let clock: Arc<dyn Clock> = clock.clone();
    WitnessService::open(dir.join(LEASE_DIR), clock, pairs_max)
}

fn id(name: &str) -> ManagerId {
    ManagerId::new(name).expect("valid")
}

fn acquire(candidate: &str, seen_epoch: u64) -> LeaseRequest {
    LeaseRequest::Acquire {
        candidate: id(candidate),
        seen_epoch,
        generation: 1,
    }
}

fn renew(holder: &str, epoch: u64) -> LeaseRequest {
    LeaseRequest::Renew {
        holder: id(holder),
        epoch,
        generation: 1,
    }
}

fn serve(witness: &WitnessService, pair: &str, request: &LeaseRequest) -> LeaseReply {
    witness
        .serve(pair, request, LEASE_MS, TIMEOUT)
        .expect("decided")
}

/// The epoch granted, or a panic naming the reply.
fn granted(reply: &LeaseReply) -> u64 {
    match reply {
        LeaseReply::Granted { lease } => lease.epoch,
        other => panic!("not granted: {other:?}"),
    }
}

/// The time left of a Held reply, or a panic naming the reply.
fn held_ms(reply: &LeaseReply) -> u64 {
    match reply {
        LeaseReply::Held { remaining_ms, .. } => *remaining_ms,
        other => panic!("not held: {other:?}"),
    }
}

fn lease_path(dir: &Path, pair: &str) -> PathBuf {
    dir.join(LEASE_DIR).join(format!("{pair}{FILE_SUFFIX}"))
}

/// The record in a pair's file, read by a second open (the service must not hold it).
fn record_on_disk(dir: &Path, pair: &str) -> Option<Lease> {
    let file = LeaseFile::open_or_create(&dir.join(LEASE_DIR), pair).expect("open");
    file.read().expect("read").map(|record| record.lease)
}

#[test]
fn a_new_pair_starts_held_by_nobody_then_grants_after_a_full_lease() {
    // Goal: bootstrap. Method: a read and a renewal of an unknown pair answer without
    // creating anything; the first acquisition writes a record held by nobody and answers
    // Held for a full lease; one ms before the lease it is still Held, at the lease Granted
    // epoch 1, written; the holder's renewal is granted.
    let dir = scratch();
    let clock = Arc::new(ManualClock::new(1_000 * MS));
    let witness = service(dir.path(), &clock, PAIRS_MAX);
    let reply = serve(&witness, "pair-a", &LeaseRequest::Read);
    assert_eq!(
        reply,
        LeaseReply::State {
            lease: None,
            remaining_ms: 0
        }
    );
    let reply = serve(&witness, "pair-a", &renew("m1", 0));
    assert!(matches!(
        reply,
        LeaseReply::Refused {
            reason: Refusal::NoLease,
            ..
        }
    ));
    assert!(
        !lease_path(dir.path(), "pair-a").exists(),
        "nothing created"
    );
    assert_eq!(witness.pair_count(), 0);

    assert_eq!(
        held_ms(&serve(&witness, "pair-a", &acquire("m1", 0))),
        4_000
    );
    assert_eq!(witness.pair_count(), 1);
    clock.advance_ms(3_999);
    assert_eq!(held_ms(&serve(&witness, "pair-a", &acquire("m1", 0))), 1);
    clock.advance_ms(1);
    assert_eq!(granted(&serve(&witness, "pair-a", &acquire("m1", 0))), 1);
    clock.advance_ms(1_000);
    assert_eq!(granted(&serve(&witness, "pair-a", &renew("m1", 1))), 1);
    let statuses = witness.statuses();
    assert_eq!(statuses.len(), 1);
    assert_eq!(statuses[0].pair, "pair-a");
    assert_eq!(statuses[0].remaining_ms, 4_000);
    assert_eq!(statuses[0].error, None);
    let holder = statuses[0].lease.as_ref().and_then(|l| l.holder.clone());
    assert_eq!(holder, Some(id("m1")));
    assert_eq!(witness.write_failures(), 0);
}

#[test]
fn renewals_keep_the_lease_until_they_stop() {
    // Goal: renewals by this clock keep a candidate out; the candidate takes over exactly a
    // lease after the last one, and the record on disk says so. Method: m1 holds epoch 1 and
    // renews every second while m2 is Held; m1 stops; m2 is granted epoch 2 at the lease;
    // m1's renewal is then refused.
    let dir = scratch();
    let clock = Arc::new(ManualClock::new(0));
    let witness = service(dir.path(), &clock, PAIRS_MAX);
    serve(&witness, "p", &acquire("m1", 0));
    clock.advance_ms(4_000);
    assert_eq!(granted(&serve(&witness, "p", &acquire("m1", 0))), 1);
    for _ in 0..5 {
        clock.advance_ms(1_000);
        assert_eq!(granted(&serve(&witness, "p", &renew("m1", 1))), 1);
        assert_eq!(held_ms(&serve(&witness, "p", &acquire("m2", 1))), 4_000);
    }
    clock.advance_ms(3_999);
    assert_eq!(held_ms(&serve(&witness, "p", &acquire("m2", 1))), 1);
    clock.advance_ms(1);
    assert_eq!(granted(&serve(&witness, "p", &acquire("m2", 1))), 2);
    let reply = serve(&witness, "p", &renew("m1", 1));
    assert!(matches!(
        reply,
        LeaseReply::Refused {
            reason: Refusal::EpochMismatch,
            ..
        }
    ));
    drop(witness);
    let on_disk = record_on_disk(dir.path(), "p").expect("a record");
    assert_eq!((on_disk.epoch, on_disk.holder), (2, Some(id("m2"))));
}

#[test]
fn a_restarted_service_counts_its_leases_as_renewed() {
    // Goal: the restart rule. Method: m1 is granted epoch 1; the service is dropped and a
    // new one opens the same directory with the clock 100 s later (m1 stopped renewing long
    // ago by the old clock); m2 is Held for a full lease, granted epoch 2 only at its end.
    let dir = scratch();
    let clock = Arc::new(ManualClock::new(0));
    let witness = service(dir.path(), &clock, PAIRS_MAX);
    serve(&witness, "p", &acquire("m1", 0));
    clock.advance_ms(4_000);
    assert_eq!(granted(&serve(&witness, "p", &acquire("m1", 0))), 1);
    drop(witness);

    clock.advance_ms(100_000);
    let witness = service(dir.path(), &clock, PAIRS_MAX);
    assert_eq!(witness.pair_count(), 1);
    let status = &witness.statuses()[0];
    assert_eq!(status.remaining_ms, 4_000);
    assert_eq!(status.lease.as_ref().map(|l| l.epoch), Some(1));
    assert_eq!(held_ms(&serve(&witness, "p", &acquire("m2", 1))), 4_000);
    clock.advance_ms(3_999);
    assert_eq!(held_ms(&serve(&witness, "p", &acquire("m2", 1))), 1);
    // The holder may still renew meanwhile: nobody acquired its epoch.
    clock.advance_ms(1);
    assert_eq!(granted(&serve(&witness, "p", &acquire("m2", 1))), 2);
}

#[test]
fn an_unreadable_file_refuses_requests_until_repaired() {
    // Goal: a corrupt lease file is never "no lease". Method: a garbage file (right size)
    // and a short non-zero one; at open both are listed with an error; every request for
    // them (a read too) fails naming the pair; after the operator removes the file, the
    // next acquisition starts the pair afresh.
    let dir = scratch();
    let leases = dir.path().join(LEASE_DIR);
    std::fs::create_dir_all(&leases).expect("mkdir");
    let mut prng = crate::prng::SplitMix64::new(7);
    let garbage: Vec<u8> = (0..8192).map(|_| prng.below(256) as u8).collect();
    std::fs::write(lease_path(dir.path(), "bad"), &garbage).expect("write");
    std::fs::write(lease_path(dir.path(), "short"), b"not a lease").expect("write");
    let clock = Arc::new(ManualClock::new(0));
    let witness = service(dir.path(), &clock, PAIRS_MAX);
    let statuses = witness.statuses();
    assert_eq!(statuses.len(), 2);
    for status in &statuses {
        assert!(status.error.is_some(), "{status:?}");
        assert_eq!(status.lease, None);
    }
    for pair in ["bad", "short"] {
        for request in [LeaseRequest::Read, acquire("m1", 0), renew("m1", 1)] {
            let err = witness
                .serve(pair, &request, LEASE_MS, TIMEOUT)
                .expect_err("refused");
            assert!(matches!(err, WitnessError::Store { .. }), "{err}");
            assert!(err.to_string().contains(pair), "{err}");
            assert_eq!(ControlError::from(err).http_status(), 500);
        }
    }
    std::fs::remove_file(lease_path(dir.path(), "bad")).expect("rm");
    assert_eq!(held_ms(&serve(&witness, "bad", &acquire("m1", 0))), 4_000);
    assert!(witness.statuses()[0].error.is_none());
}

#[test]
fn the_number_of_pairs_is_bounded() {
    // Goal: the network cannot make the agent keep unbounded pairs. Method: cap 2; two
    // pairs start; a third acquisition is refused (409), while reads of it and requests of
    // the two kept pairs still answer; a bad pair name is refused (400).
    let dir = scratch();
    let clock = Arc::new(ManualClock::new(0));
    let witness = service(dir.path(), &clock, 2);
    serve(&witness, "one", &acquire("m1", 0));
    serve(&witness, "two", &acquire("m1", 0));
    let err = witness
        .serve("three", &acquire("m1", 0), LEASE_MS, TIMEOUT)
        .expect_err("over the cap");
    assert!(
        matches!(err, WitnessError::TooManyPairs { max: 2, .. }),
        "{err}"
    );
    assert_eq!(ControlError::from(err).http_status(), 409);
    assert!(!lease_path(dir.path(), "three").exists());
    assert!(matches!(
        serve(&witness, "three", &LeaseRequest::Read),
        LeaseReply::State { lease: None, .. }
    ));
    assert_eq!(held_ms(&serve(&witness, "two", &acquire("m1", 0))), 4_000);
    assert_eq!(witness.pair_count(), 2);
    let err = witness
        .serve("../x", &LeaseRequest::Read, LEASE_MS, TIMEOUT)
        .expect_err("bad name");
    assert_eq!(ControlError::from(err).http_status(), 400);
}

#[test]
fn a_write_not_confirmed_in_time_grants_nothing() {
    // Goal: a slow disk costs a grant, never safety. Method: m2 acquires m1's expired lease
    // with no time to write: refused (write_failed), epoch 2 held by nobody, counted; m1
    // cannot renew epoch 1; m2's next acquisition waits a full lease from the failure, then
    // (once the late write has finished) is granted epoch 3.
    let dir = scratch();
    let clock = Arc::new(ManualClock::new(0));
    let witness = service(dir.path(), &clock, PAIRS_MAX);
    serve(&witness, "p", &acquire("m1", 0));
    clock.advance_ms(4_000);
    assert_eq!(granted(&serve(&witness, "p", &acquire("m1", 0))), 1);
    clock.advance_ms(10_000);
    let reply = witness
        .serve("p", &acquire("m2", 1), LEASE_MS, Duration::ZERO)
        .expect("decided");
    let LeaseReply::Refused {
        reason: Refusal::WriteFailed,
        lease: Some(lease),
    } = reply
    else {
        panic!("not a failed write: {reply:?}");
    };
    assert_eq!((lease.epoch, lease.holder), (2, None));
    assert_eq!(witness.write_failures(), 1);
    let reply = serve(&witness, "p", &renew("m1", 1));
    assert!(matches!(
        reply,
        LeaseReply::Refused {
            reason: Refusal::EpochMismatch,
            ..
        }
    ));
    clock.advance_ms(3_999);
    assert_eq!(held_ms(&serve(&witness, "p", &acquire("m2", 2))), 1);
    clock.advance_ms(1);
    // The late write may still be in flight: Busy answers write_failed and changes nothing.
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        match serve(&witness, "p", &acquire("m2", 2)) {
            LeaseReply::Refused {
                reason: Refusal::WriteFailed,
                lease: Some(lease),
            } if std::time::Instant::now() < deadline => {
                assert_eq!((lease.epoch, lease.holder), (2, None), "unchanged");
                std::thread::sleep(Duration::from_millis(10));
            }
            reply => {
                assert_eq!(granted(&reply), 3);
                break;
            }
        }
    }
}
