//! The witness's decisions: grant, renew and install a manager pair's lease by
//! compare-and-swap, expiry judged by the witness's own monotonic clock.
//!
//! Pure: the agent that is witness (and the simulation) feed requests with the time they
//! arrived and persist what [`Decision::Write`] asks for before replying.
//!
//! Invariants:
//! - A lease changes hands only when expired by this clock: `lease_ms` after the last grant,
//!   renewal or install, or after [`Witness::recovered`] (a witness that restarted, or a host
//!   that just became witness, counts every lease it holds as renewed at that moment).
//! - Compare-and-swap on (epoch, holder, generation): a renewal must name the current holder
//!   and epoch; an acquisition must name the epoch it saw and raises it by one; a request for
//!   an older witness generation is refused, a newer one starts this witness over (counted as
//!   renewed now, held by nobody) so that nothing is granted before a full lease has passed.
//! - A change of the record is granted only once written ([`Witness::written`]); a write that
//!   failed or timed out leaves the new epoch held by nobody, so neither the old holder nor
//!   the candidate acts on it, and it is counted as renewed at that moment.
//! - Renewals change nothing on disk: expiry lives in memory only, which the restart rule
//!   makes safe.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Lease, ManagerId};

/// What a manager asks of the witness. In JSON, tagged by `op`:
/// `{"op": "acquire", "candidate": "m2", "seen_epoch": 1, "generation": 1}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum LeaseRequest {
    /// The holder keeps its lease.
    Renew {
        /// The holder.
        holder: ManagerId,
        /// Its epoch.
        epoch: u64,
        /// The witness generation it holds the lease under.
        generation: u64,
    },
    /// A manager takes the lease once it has expired, raising the epoch.
    Acquire {
        /// Who asks.
        candidate: ManagerId,
        /// The epoch it last saw (compare-and-swap).
        seen_epoch: u64,
        /// The witness generation it uses.
        generation: u64,
    },
    /// The active carries its lease over to this witness after a move both managers recorded.
    Install {
        /// The lease as held at the previous witness, with the new generation.
        lease: Lease,
    },
    /// The lease and its time left, for status and for a candidate's next `seen_epoch`.
    Read,
}

/// Why a request was refused. In JSON, snake case: `"write_failed"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The epoch named is not the current one.
    EpochMismatch,
    /// The lease is held by another manager.
    HolderMismatch,
    /// The request names an older witness generation than this witness has.
    OldGeneration,
    /// No lease is kept here for this generation yet.
    NoLease,
    /// The record could not be written in time; nothing was granted.
    WriteFailed,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::EpochMismatch => "the epoch named is not the current one",
            Self::HolderMismatch => "the lease is held by another manager",
            Self::OldGeneration => "the witness generation named is older than this witness's",
            Self::NoLease => "no lease is kept here for this witness generation",
            Self::WriteFailed => "the lease record could not be written in time",
        })
    }
}

/// The witness's answer. In JSON, tagged by `outcome`:
/// `{"outcome": "held", "lease": {..}, "remaining_ms": 4000}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum LeaseReply {
    /// The requester holds `lease`, from when it sent the request.
    Granted {
        /// The lease now.
        lease: Lease,
    },
    /// Not expired yet: held by someone (or by nobody, while a fresh witness waits).
    Held {
        /// The lease now.
        lease: Lease,
        /// Time until it expires, by the witness's clock.
        remaining_ms: u64,
    },
    /// Refused; the lease as it is, when there is one.
    Refused {
        /// Why.
        reason: Refusal,
        /// The lease now.
        lease: Option<Lease>,
    },
    /// The answer to [`LeaseRequest::Read`].
    State {
        /// The lease now, if any.
        lease: Option<Lease>,
        /// Time until it expires, by the witness's clock.
        remaining_ms: u64,
    },
}

/// What the caller does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Reply; nothing changes.
    Reply(LeaseReply),
    /// Count the lease as renewed at the arrival time and reply.
    Renew(LeaseReply),
    /// Write `lease` durably, then call [`Witness::written`] with the outcome; `reply` is
    /// sent only if the write succeeded.
    Write {
        /// The new record.
        lease: Lease,
        /// The reply once written.
        reply: LeaseReply,
    },
}

/// The witness's view of one manager pair's lease.
#[derive(Debug, Clone, Default)]
pub struct Witness {
    lease: Option<Lease>,
    renewed_at_ns: u64,
}

impl Witness {
    /// A witness that (re)started at `now_ns` with `lease` read from its file: the lease
    /// counts as renewed now, since the clock that timed it is gone.
    pub fn recovered(lease: Option<Lease>, now_ns: u64) -> Self {
        Self {
            lease,
            renewed_at_ns: now_ns,
        }
    }

    /// The lease kept, if any.
    pub fn lease(&self) -> Option<&Lease> {
        self.lease.as_ref()
    }

    /// Time until expiry at `now_ns`, in milliseconds.
    pub fn remaining_ms(&self, now_ns: u64) -> u64 {
        let Some(lease) = &self.lease else { return 0 };
        let expires_ns = self
            .renewed_at_ns
            .saturating_add(u64::from(lease.lease_ms) * 1_000_000);
        expires_ns.saturating_sub(now_ns).div_ceil(1_000_000)
    }

    fn expired(&self, now_ns: u64) -> bool {
        self.remaining_ms(now_ns) == 0
    }

    /// Decides `request`, arrived at `now_ns`. `lease_ms` is the duration given to a lease
    /// this witness starts (the pair's configured lease).
    pub fn decide(&self, request: &LeaseRequest, now_ns: u64, lease_ms: u32) -> Decision {
        match request {
            LeaseRequest::Read => Decision::Reply(LeaseReply::State {
                lease: self.lease.clone(),
                remaining_ms: self.remaining_ms(now_ns),
            }),
            LeaseRequest::Renew {
                holder,
                epoch,
                generation,
            } => self.decide_renew(holder, *epoch, *generation),
            LeaseRequest::Acquire {
                candidate,
                seen_epoch,
                generation,
            } => self.decide_acquire(candidate, *seen_epoch, *generation, now_ns, lease_ms),
            LeaseRequest::Install { lease } => self.decide_install(lease),
        }
    }

    fn refuse(&self, reason: Refusal) -> Decision {
        Decision::Reply(LeaseReply::Refused {
            reason,
            lease: self.lease.clone(),
        })
    }

    fn decide_renew(&self, holder: &ManagerId, epoch: u64, generation: u64) -> Decision {
        let Some(lease) = &self.lease else {
            return self.refuse(Refusal::NoLease);
        };
        if generation < lease.witness_generation {
            return self.refuse(Refusal::OldGeneration);
        }
        if generation > lease.witness_generation {
            return self.refuse(Refusal::NoLease);
        }
        if epoch != lease.epoch {
            return self.refuse(Refusal::EpochMismatch);
        }
        if lease.holder.as_ref() != Some(holder) {
            return self.refuse(Refusal::HolderMismatch);
        }
        // Expired or not: nobody else acquired this epoch, so the holder may go on.
        Decision::Renew(LeaseReply::Granted {
            lease: lease.clone(),
        })
    }

    fn decide_acquire(
        &self,
        candidate: &ManagerId,
        seen_epoch: u64,
        generation: u64,
        now_ns: u64,
        lease_ms: u32,
    ) -> Decision {
        let current = match &self.lease {
            Some(lease) if lease.witness_generation == generation => lease,
            Some(lease) if lease.witness_generation > generation => {
                return self.refuse(Refusal::OldGeneration)
            }
            // No lease for this generation yet: start one held by nobody, counted as renewed
            // now, so the first grant comes a full lease later.
            _ => {
                let epoch = seen_epoch.max(self.lease.as_ref().map_or(0, |l| l.epoch));
                let lease = Lease {
                    epoch,
                    holder: None,
                    witness_generation: generation,
                    lease_ms,
                };
                let reply = LeaseReply::Held {
                    lease: lease.clone(),
                    remaining_ms: u64::from(lease_ms),
                };
                return Decision::Write { lease, reply };
            }
        };
        if current.epoch != seen_epoch {
            return self.refuse(Refusal::EpochMismatch);
        }
        if current.holder.as_ref() == Some(candidate) {
            return Decision::Renew(LeaseReply::Granted {
                lease: current.clone(),
            });
        }
        if !self.expired(now_ns) {
            return Decision::Reply(LeaseReply::Held {
                lease: current.clone(),
                remaining_ms: self.remaining_ms(now_ns),
            });
        }
        let lease = Lease {
            epoch: current.epoch + 1,
            holder: Some(candidate.clone()),
            witness_generation: generation,
            lease_ms: current.lease_ms,
        };
        let reply = LeaseReply::Granted {
            lease: lease.clone(),
        };
        Decision::Write { lease, reply }
    }

    fn decide_install(&self, new: &Lease) -> Decision {
        if new.holder.is_none() {
            return self.refuse(Refusal::HolderMismatch);
        }
        let granted = LeaseReply::Granted { lease: new.clone() };
        match &self.lease {
            Some(current) if current.witness_generation > new.witness_generation => {
                self.refuse(Refusal::OldGeneration)
            }
            Some(current) if current.witness_generation == new.witness_generation => {
                if current.epoch != new.epoch {
                    self.refuse(Refusal::EpochMismatch)
                } else if current.holder == new.holder {
                    Decision::Renew(granted)
                } else if current.holder.is_none() {
                    // A fresh record the standby started for this generation: the active's
                    // lease continues; nobody acquired this epoch.
                    Decision::Write {
                        lease: new.clone(),
                        reply: granted,
                    }
                } else {
                    self.refuse(Refusal::HolderMismatch)
                }
            }
            // An older generation's record: epochs only grow, so one above the installed
            // lease (a grant nobody acted on, made after the move) refuses the install; the
            // standby then takes over here once a full lease has passed.
            Some(current) if current.epoch > new.epoch => self.refuse(Refusal::EpochMismatch),
            _ => Decision::Write {
                lease: new.clone(),
                reply: granted,
            },
        }
    }

    /// Decides `request` and applies the decision at once, as a witness whose record writes
    /// always land at once would (tests, the simulation, in-memory fake agents).
    pub fn answer_in_memory(
        &mut self,
        request: &LeaseRequest,
        now_ns: u64,
        lease_ms: u32,
    ) -> LeaseReply {
        match self.decide(request, now_ns, lease_ms) {
            Decision::Reply(reply) => reply,
            Decision::Renew(reply) => {
                self.renewed(now_ns);
                reply
            }
            Decision::Write { lease, reply } => self.written(lease, reply, true, now_ns, now_ns),
        }
    }

    /// Applies a [`Decision::Renew`] at `now_ns`.
    pub fn renewed(&mut self, now_ns: u64) {
        self.renewed_at_ns = now_ns;
    }

    /// Applies the outcome of a [`Decision::Write`] of `lease` (decided at `decided_ns`):
    /// written, the record holds and counts as renewed then; not written (failed or timed
    /// out: it may still land), the new record is kept held by nobody and counted as renewed
    /// at `now_ns`, so no one acts on it and nothing is granted for a full lease. Returns the
    /// reply to send.
    pub fn written(
        &mut self,
        lease: Lease,
        reply: LeaseReply,
        ok: bool,
        decided_ns: u64,
        now_ns: u64,
    ) -> LeaseReply {
        if ok {
            self.lease = Some(lease);
            self.renewed_at_ns = decided_ns;
            return reply;
        }
        self.lease = Some(Lease {
            holder: None,
            ..lease
        });
        self.renewed_at_ns = now_ns;
        LeaseReply::Refused {
            reason: Refusal::WriteFailed,
            lease: self.lease.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEASE_MS: u32 = 4_000;
    const MS: u64 = 1_000_000;

    fn id(name: &str) -> ManagerId {
        ManagerId::new(name).expect("valid")
    }

    /// Runs `request` at `now_ns` with every write succeeding.
    fn run(witness: &mut Witness, request: LeaseRequest, now_ns: u64) -> LeaseReply {
        witness.answer_in_memory(&request, now_ns, LEASE_MS)
    }

    fn acquire(name: &str, seen_epoch: u64, generation: u64) -> LeaseRequest {
        LeaseRequest::Acquire {
            candidate: id(name),
            seen_epoch,
            generation,
        }
    }

    fn renew(name: &str, epoch: u64, generation: u64) -> LeaseRequest {
        LeaseRequest::Renew {
            holder: id(name),
            epoch,
            generation,
        }
    }

    fn granted_epoch(reply: &LeaseReply) -> Option<u64> {
        match reply {
            LeaseReply::Granted { lease } => Some(lease.epoch),
            _ => None,
        }
    }

    #[test]
    fn a_fresh_witness_grants_only_after_a_full_lease() {
        // Goal: nothing granted before a full lease has passed at a new witness. Method:
        // acquire at 0 (starts the record), at 3999 ms (held), at 4000 ms (granted, epoch 1).
        let mut witness = Witness::default();
        let reply = run(&mut witness, acquire("m1", 0, 1), 0);
        assert!(
            matches!(
                reply,
                LeaseReply::Held {
                    remaining_ms: 4000,
                    ..
                }
            ),
            "{reply:?}"
        );
        let reply = run(&mut witness, acquire("m1", 0, 1), 3_999 * MS);
        assert!(matches!(reply, LeaseReply::Held { .. }), "{reply:?}");
        let reply = run(&mut witness, acquire("m1", 0, 1), 4_000 * MS);
        assert_eq!(granted_epoch(&reply), Some(1));
    }

    #[test]
    fn renewals_keep_the_lease_from_a_candidate() {
        // Goal: compare-and-swap on (epoch, holder) and expiry by this clock. Method: m1
        // holds epoch 1 and renews every second; m2's acquisitions are held; m1 stops; m2
        // gets epoch 2 exactly a lease after the last renewal; m1's renewal is then refused.
        let mut witness = Witness::recovered(None, 0);
        run(&mut witness, acquire("m1", 0, 1), 0);
        run(&mut witness, acquire("m1", 0, 1), 4_000 * MS);
        for second in 5..10 {
            let reply = run(&mut witness, renew("m1", 1, 1), second * 1_000 * MS);
            assert_eq!(granted_epoch(&reply), Some(1));
            let reply = run(&mut witness, acquire("m2", 1, 1), second * 1_000 * MS + MS);
            assert!(matches!(reply, LeaseReply::Held { .. }), "{reply:?}");
        }
        let last_renewal_ns = 9_000 * MS;
        let reply = run(
            &mut witness,
            acquire("m2", 1, 1),
            last_renewal_ns + 3_999 * MS,
        );
        assert!(matches!(reply, LeaseReply::Held { .. }));
        let reply = run(
            &mut witness,
            acquire("m2", 1, 1),
            last_renewal_ns + 4_000 * MS,
        );
        assert_eq!(granted_epoch(&reply), Some(2));
        let reply = run(
            &mut witness,
            renew("m1", 1, 1),
            last_renewal_ns + 4_001 * MS,
        );
        assert!(matches!(
            reply,
            LeaseReply::Refused {
                reason: Refusal::EpochMismatch,
                ..
            }
        ));
        let reply = run(
            &mut witness,
            acquire("m1", 1, 1),
            last_renewal_ns + 9_000 * MS,
        );
        assert!(matches!(
            reply,
            LeaseReply::Refused {
                reason: Refusal::EpochMismatch,
                ..
            }
        ));
    }

    #[test]
    fn a_restarted_witness_counts_its_leases_as_renewed() {
        // Goal: the restart rule. Method: a record held by m1 read back at a restart at
        // 100 s: m2 is held until 104 s.
        let lease = Lease {
            epoch: 3,
            holder: Some(id("m1")),
            witness_generation: 2,
            lease_ms: LEASE_MS,
        };
        let mut witness = Witness::recovered(Some(lease), 100_000 * MS);
        let reply = run(&mut witness, acquire("m2", 3, 2), 103_999 * MS);
        assert!(matches!(reply, LeaseReply::Held { .. }));
        let reply = run(&mut witness, acquire("m2", 3, 2), 104_000 * MS);
        assert_eq!(granted_epoch(&reply), Some(4));
    }

    #[test]
    fn a_failed_write_grants_nothing_and_restarts_the_wait() {
        // Goal: a slow disk costs a grant, never safety. Method: m2's acquisition of an
        // expired lease fails to write: refused; m1 (old epoch) cannot renew; nobody holds
        // epoch 2 and the next grant waits a full lease from the failure.
        let mut witness = Witness::recovered(None, 0);
        run(&mut witness, acquire("m1", 0, 1), 0);
        run(&mut witness, acquire("m1", 0, 1), 4_000 * MS);
        let at_ns = 10_000 * MS;
        let Decision::Write { lease, reply } =
            witness.decide(&acquire("m2", 1, 1), at_ns, LEASE_MS)
        else {
            panic!("expected a write");
        };
        let reply = witness.written(lease, reply, false, at_ns, at_ns + 500 * MS);
        assert!(matches!(
            reply,
            LeaseReply::Refused {
                reason: Refusal::WriteFailed,
                ..
            }
        ));
        assert_eq!(witness.lease().map(|l| l.holder.clone()), Some(None));
        let reply = run(&mut witness, renew("m1", 1, 1), at_ns + 600 * MS);
        assert!(matches!(reply, LeaseReply::Refused { .. }), "{reply:?}");
        let reply = run(&mut witness, acquire("m2", 2, 1), at_ns + 4_499 * MS);
        assert!(matches!(reply, LeaseReply::Held { .. }), "{reply:?}");
        let reply = run(&mut witness, acquire("m2", 2, 1), at_ns + 4_500 * MS);
        assert_eq!(granted_epoch(&reply), Some(3));
    }

    #[test]
    fn generations_order_witness_moves() {
        // Goal: a move continues the lease at the new witness and never lets an older
        // generation act there. Method: install epoch 5 gen 2 at a witness holding gen 1:
        // granted; gen-1 requests refused; a standby's acquisition is held; a stale install of
        // epoch 4 is refused; the standby-started fresh record accepts the active's install.
        let old = Lease {
            epoch: 1,
            holder: Some(id("m1")),
            witness_generation: 1,
            lease_ms: LEASE_MS,
        };
        let mut witness = Witness::recovered(Some(old), 0);
        let moved = Lease {
            epoch: 5,
            holder: Some(id("m1")),
            witness_generation: 2,
            lease_ms: LEASE_MS,
        };
        let reply = run(
            &mut witness,
            LeaseRequest::Install {
                lease: moved.clone(),
            },
            MS,
        );
        assert_eq!(granted_epoch(&reply), Some(5));
        let reply = run(&mut witness, renew("m1", 1, 1), 2 * MS);
        assert!(matches!(
            reply,
            LeaseReply::Refused {
                reason: Refusal::OldGeneration,
                ..
            }
        ));
        let reply = run(&mut witness, acquire("m2", 5, 2), 3 * MS);
        assert!(matches!(reply, LeaseReply::Held { .. }));
        let stale = Lease {
            epoch: 4,
            ..moved.clone()
        };
        let reply = run(&mut witness, LeaseRequest::Install { lease: stale }, 4 * MS);
        assert!(matches!(reply, LeaseReply::Refused { .. }));

        let mut fresh = Witness::default();
        let reply = run(&mut fresh, acquire("m2", 5, 2), 0);
        assert!(matches!(reply, LeaseReply::Held { .. }));
        let reply = run(&mut fresh, LeaseRequest::Install { lease: moved }, MS);
        assert_eq!(granted_epoch(&reply), Some(5));
        let reply = run(&mut fresh, acquire("m2", 5, 2), 4_000 * MS);
        assert!(matches!(reply, LeaseReply::Held { .. }), "{reply:?}");
    }
}
