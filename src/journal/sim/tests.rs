//! Hand-picked runs of the commit simulation: each scripts the scheduler's choices through
//! one fault of docs/commit-protocol.md and checks every invariant after every step.

use super::*;

/// A world whose random choices are never used (scripted steps only).
fn world() -> World {
    World::new(1, SimOptions::swarm(1))
}

impl World {
    /// Runs `action`; panics on a broken invariant, with the problem.
    fn ok(&mut self, action: Action) {
        self.step(action)
            .unwrap_or_else(|problem| panic!("{action:?}: {problem}"));
    }

    /// Delivers the first deliverable message of kind `kind` to `to`.
    fn deliver(&mut self, to: Node, kind: &str) {
        let msg = self
            .net
            .deliverable()
            .into_iter()
            .find(|&id| {
                let msg = self.net.get(id).expect("in flight");
                msg.to == to && msg.body.name() == kind
            })
            .unwrap_or_else(|| panic!("no {kind} for the {to}: {:?}", self.net.in_flight()));
        self.ok(Action::Deliver { msg });
    }

    /// Delivers the head of connection `conn` to the target; it must be of kind `kind`.
    fn deliver_on(&mut self, conn: u64, kind: &str) {
        let msg = self
            .net
            .deliverable()
            .into_iter()
            .find(|&id| {
                self.net
                    .get(id)
                    .is_some_and(|msg| msg.conn == conn && msg.to == Node::Target)
            })
            .unwrap_or_else(|| panic!("nothing on conn {conn}: {:?}", self.net.in_flight()));
        assert_eq!(self.net.get(msg).map(|msg| msg.body.name()), Some(kind));
        self.ok(Action::Deliver { msg });
    }

    fn crash_now(&mut self, node: Node, lands: bool) {
        let lose_outgoing = true;
        self.ok(Action::Crash {
            node,
            lands,
            lose_outgoing,
        });
    }

    /// Writes once and says which image took it ("source", "target" or "none").
    fn write(&mut self) -> &'static str {
        let (source, target) = (self.source.applied_writes, self.target.applied_writes);
        self.ok(Action::GuestWrite);
        match (
            self.source.applied_writes > source,
            self.target.applied_writes > target,
        ) {
            (true, false) => "source",
            (false, true) => "target",
            (false, false) => "none",
            (true, true) => panic!("both images took the write"),
        }
    }

    fn source_phase(&self) -> &'static str {
        phase(self.source.log.view(SOURCE_KEY))
    }

    fn target_phase(&self) -> &'static str {
        phase(self.target.log.view(TARGET_KEY))
    }

    /// Start, open, copy with writes, hold, begin: the Commit is on its way and the target
    /// has received nothing of the final set yet.
    fn up_to_commit_sent(&mut self) {
        self.ok(Action::Start);
        self.ok(Action::Complete { node: Node::Source });
        self.ok(Action::Open);
        self.deliver(Node::Target, "Open");
        self.ok(Action::Complete { node: Node::Target });
        self.deliver(Node::Source, "OpenOk");
        for _ in 0..3 {
            assert_eq!(self.write(), "source");
        }
        self.ok(Action::Copy);
        self.deliver(Node::Target, "Blocks");
        assert_eq!(self.write(), "source");
        self.ok(Action::Hold);
        assert_eq!(self.write(), "none", "held");
        self.ok(Action::Begin);
        self.ok(Action::Complete { node: Node::Source });
        assert_eq!(self.source_phase(), "switching-over");
        assert!(matches!(self.source.mode, SourceMode::Committing { .. }));
    }

    /// Up to the target's `TargetCommitted` being appended (not yet durable).
    fn up_to_commit_appending(&mut self) {
        self.up_to_commit_sent();
        self.deliver(Node::Target, "Blocks");
        self.deliver(Node::Target, "Commit");
        assert!(self.target.log.is_appending());
    }

    /// The source times out, asks, gets the answer and records the outcome.
    fn ask_and_resolve(&mut self) {
        self.ok(Action::Timeout);
        self.deliver(Node::Target, "Query");
        self.deliver(Node::Source, "Answer");
        self.ok(Action::Complete { node: Node::Source });
    }
}

#[test]
fn target_crash_after_commit_point_leaves_source_in_doubt_until_it_asks() {
    // Goal: a target that crashes right after TargetCommitted is durable, before CommitOk
    // reaches the source, ends migrated: the source, restarted in doubt, holds writes, asks
    // and switches. Method: script it; the crash loses CommitOk; the target is down during
    // the first query, then restarts serving; the source crashes too and restarts.
    let mut world = world();
    world.up_to_commit_appending();
    world.ok(Action::Complete { node: Node::Target });
    assert!(world.target.serving);
    world.crash_now(Node::Target, true);
    world.ok(Action::Timeout);
    assert_eq!(world.write(), "none", "in doubt: no side serves");
    assert!(matches!(
        world.source.mode,
        SourceMode::InDoubt { query: None, .. }
    ));
    world.ok(Action::Restart { node: Node::Target });
    assert!(world.target.serving, "committed: serves after restart");
    assert_eq!(world.write(), "none", "the source has not switched yet");
    world.crash_now(Node::Source, true);
    world.ok(Action::Restart { node: Node::Source });
    assert!(matches!(world.source.mode, SourceMode::InDoubt { .. }));
    world.ok(Action::OperatorAbort);
    assert_eq!(world.stats.aborts_refused, 1, "no abort in doubt");
    world.deliver(Node::Target, "Query");
    world.deliver(Node::Source, "Answer");
    world.ok(Action::Complete { node: Node::Source });
    assert_eq!(world.source_phase(), "switched");
    assert_eq!(world.write(), "target");
    assert_eq!(world.stats.answers_committed, 1);
    assert_eq!(world.target.synced_writes, world.acked_writes);
}

#[test]
fn lost_commit_ok_is_resolved_by_asking() {
    // Goal: when CommitOk is lost the source neither serves nor cancels; its query learns
    // the commit. Method: break the stream with CommitOk on it, time out, ask.
    let mut world = world();
    world.up_to_commit_appending();
    world.ok(Action::Complete { node: Node::Target });
    let stream = world.net.busy_conns()[0];
    world.ok(Action::Break { conn: stream });
    assert_eq!(world.write(), "none");
    world.ask_and_resolve();
    assert_eq!(world.source_phase(), "switched");
    assert!(world.source.forwards());
    assert_eq!(world.write(), "target");
}

#[test]
fn torn_target_commit_is_not_committed_and_the_source_cancels() {
    // Goal: a target crash that tears its TargetCommitted append leaves it receiving; the
    // source asks, cancels, serves again without losing a write, and a later attempt
    // migrates. Method: crash the target mid-append (torn), restart, ask; then resume.
    let mut world = world();
    world.up_to_commit_appending();
    world.crash_now(Node::Target, false);
    world.ok(Action::Restart { node: Node::Target });
    assert_eq!(world.target_phase(), "receiving");
    assert!(!world.target.serving);
    world.ask_and_resolve();
    assert_eq!(world.source_phase(), "copying");
    assert_eq!(world.stats.answers_not_committed, 1);
    assert_eq!(world.write(), "source");
    // The resume: a new stream, new blocks, a second attempt.
    world.ok(Action::Open);
    world.deliver(Node::Target, "Open");
    world.ok(Action::Complete { node: Node::Target });
    world.deliver(Node::Source, "OpenOk");
    world.ok(Action::Hold);
    world.ok(Action::Begin);
    world.ok(Action::Complete { node: Node::Source });
    world.deliver(Node::Target, "Blocks");
    world.deliver(Node::Target, "Commit");
    world.ok(Action::Complete { node: Node::Target });
    world.deliver(Node::Source, "CommitOk");
    world.ok(Action::Complete { node: Node::Source });
    assert_eq!(world.source_phase(), "switched");
    assert_eq!(world.write(), "target");
    assert_eq!(world.target.synced_writes, world.acked_writes);
}

#[test]
fn commit_arriving_after_not_committed_is_refused() {
    // Goal: "not committed" is final: a Commit still on its way when the target answered
    // is refused, and so are the final blocks before it. Method: ask before the Commit is
    // delivered, cancel, write on the source, then deliver the stale stream.
    let mut world = world();
    world.up_to_commit_sent();
    world.ask_and_resolve();
    assert_eq!(world.source_phase(), "copying");
    assert_eq!(world.write(), "source");
    world.deliver(Node::Target, "Blocks");
    world.deliver(Node::Target, "Commit");
    assert_eq!(world.target_phase(), "receiving");
    assert!(!world.target.log.is_appending());
    assert_eq!(world.stats.commits_refused, 1);
    assert_eq!(world.write(), "source");
}

#[test]
fn without_the_fence_a_late_commit_makes_two_authorities() {
    // Goal: the checker catches the flaw the fence prevents. Method: the same run as above
    // with an unfenced "not committed" answer; the stale Commit must break an invariant
    // (the blocks before it are accepted too: the stream was never fenced).
    let mut options = SimOptions::swarm(1);
    options.fence_queries = false;
    let mut world = World::new(1, options);
    world.up_to_commit_sent();
    world.ask_and_resolve();
    world.deliver(Node::Target, "Blocks");
    let commit = world.net.deliverable()[0];
    assert_eq!(
        world.net.get(commit).map(|msg| msg.body.name()),
        Some("Commit")
    );
    // Caught as soon as the TargetCommitted append begins: if it lands, two authorities.
    let problem = world
        .step(Action::Deliver { msg: commit })
        .expect_err("two authorities");
    assert!(problem.contains("journals disagree"), "{problem}");
}

#[test]
fn in_doubt_with_the_target_down_waits_and_needs_attention() {
    // Goal: an unreachable target leaves the source in doubt: no writes, no abort, status
    // needs-attention; it does not guess however often its timer fires. Method: crash the
    // target before the Commit arrives, fire the timer repeatedly.
    let mut world = world();
    world.up_to_commit_sent();
    world.crash_now(Node::Target, false);
    for _ in 0..5 {
        world.ok(Action::Timeout);
        assert_eq!(world.write(), "none");
    }
    world.ok(Action::OperatorAbort);
    assert_eq!(world.source_phase(), "switching-over");
    let source = world.source.log.view(SOURCE_KEY).expect("job");
    let status = commit::status(Peer::Job(source), Peer::Unreachable);
    assert_eq!(status.verdict, Verdict::NeedsAttention);
    world.ok(Action::Restart { node: Node::Target });
    world.ask_and_resolve();
    assert_eq!(world.source_phase(), "copying");
}

#[test]
fn abort_reaches_the_target_and_ends_not_migrated() {
    // Goal: an operator abort while copying ends not migrated on both sides. Method: abort,
    // deliver the Abort, then check the decided end as a run would.
    let mut world = world();
    world.ok(Action::Start);
    world.ok(Action::Complete { node: Node::Source });
    world.ok(Action::Open);
    world.deliver(Node::Target, "Open");
    world.ok(Action::Complete { node: Node::Target });
    world.ok(Action::OperatorAbort);
    world.ok(Action::Complete { node: Node::Source });
    assert_eq!(world.write(), "source");
    world.deliver(Node::Target, "Abort");
    world.ok(Action::Complete { node: Node::Target });
    world.deliver(Node::Source, "AbortOk");
    assert_eq!(world.decided(), Some(Verdict::NotMigrated));
    world
        .check_end(Verdict::NotMigrated)
        .unwrap_or_else(|problem| panic!("{problem}"));
    assert_eq!(world.target_phase(), "aborted");
}

#[test]
fn a_few_seeds_decide() {
    // Goal: the random driver reaches a decided end. Method: 50 swarm seeds.
    for seed in 1..=50 {
        let outcome = run(seed, &SimOptions::swarm(seed)).unwrap_or_else(|failure| {
            panic!("{failure}");
        });
        assert!(matches!(
            outcome.verdict,
            Verdict::Migrated | Verdict::NotMigrated
        ));
    }
}

#[test]
fn blocks_of_a_fenced_stream_never_reach_the_image() {
    // Goal: after "not committed", the abandoned stream's final blocks, arriving late,
    // cannot roll the image back under a newer stream's commit (which sends no blocks when
    // nothing changed since its last pass). Method: cancel the first attempt with its final
    // blocks still in flight, migrate on a second stream, and deliver the stale blocks
    // between the second stream's last blocks and its Commit.
    let mut world = world();
    world.up_to_commit_sent();
    let Some(&stale) = world.net.deliverable().first() else {
        panic!("the first attempt's final blocks are in flight");
    };
    world.ask_and_resolve();
    assert_eq!(world.source_phase(), "copying");
    assert_eq!(world.write(), "source");
    world.ok(Action::Open);
    world.deliver(Node::Target, "Open");
    world.ok(Action::Complete { node: Node::Target });
    world.deliver(Node::Source, "OpenOk");
    let SourceMode::Copying {
        stream: Some(Stream { conn: second, .. }),
    } = world.source.mode
    else {
        panic!("a second stream");
    };
    world.ok(Action::Copy);
    world.deliver_on(second, "Blocks");
    world.ok(Action::Hold);
    world.ok(Action::Begin);
    world.ok(Action::Complete { node: Node::Source });
    world.ok(Action::Deliver { msg: stale });
    world.deliver_on(second, "Commit");
    world.ok(Action::Complete { node: Node::Target });
    world.deliver(Node::Source, "CommitOk");
    world.ok(Action::Complete { node: Node::Source });
    assert_eq!(world.write(), "target");
}
