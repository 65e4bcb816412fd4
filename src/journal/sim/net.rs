//! The simulated network between the source and the target agent: TCP-like connections.
//!
//! Model (what TCP gives the real block stream and queries):
//! - A connection delivers each direction in order and never invents a message; the
//!   scheduler picks which connection's head goes next, so connections reorder freely
//!   against each other and any message can wait (delay) as long as the scheduler likes.
//! - Loss breaks the connection: everything still queued on it, both ways, is gone.
//! - A crashed agent's ends close: messages *to* it are lost (its new process has no such
//!   connection); messages *from* it may still arrive (a killed process's kernel flushes its
//!   socket buffers) or be lost with them (a host that lost power).
//! - Delay: besides the scheduler's own choices, a connection may stall: from then on its
//!   messages are picked rarely, so they arrive long after later connections' (stale
//!   blocks and Commits of abandoned streams).
//! - Duplicates: only of the idempotent request/response messages (query, answer, abort),
//!   standing for a retry by the sender; a byte stream never duplicates a frame.
//!
//! Invariant: a message is delivered only to the end it was sent to, while that end is
//! open, after every earlier message of its connection and direction.

use std::fmt;

/// One of the two agents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Node {
    /// The agent the disk moves away from.
    Source,
    /// The agent the disk moves to.
    Target,
}

impl fmt::Display for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Source => "source",
            Self::Target => "target",
        })
    }
}

/// A protocol message (the frames of `transfer` that matter to the commit, plus the
/// in-doubt query).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Source → target, first frame of a stream: create or resume the job.
    Open,
    /// Source → target: the target's image now reflects the first `applied_writes` guest
    /// writes (a copy pass, or the final set).
    Blocks {
        /// Guest writes the blocks carry.
        applied_writes: u64,
    },
    /// Source → target: commit (after the final blocks, on the same stream).
    Commit {
        /// The switchover attempt (the source's `SourceSwitchoverBegun` count).
        attempt: u32,
    },
    /// Source → target, own connection: "what is the state of the job?"
    Query {
        /// The attempt the source is in doubt about.
        attempt: u32,
    },
    /// Source → target, own connection: drop the target image (the source aborted).
    Abort,
    /// Target → source: the Open was accepted (`TargetCreated` is durable).
    OpenOk,
    /// Target → source: the job is committed (`TargetCommitted` is durable).
    CommitOk,
    /// Target → source: this stream is refused and will never commit the job.
    Refused {
        /// The target's job is over (aborted): no stream will ever be accepted again.
        job_over: bool,
    },
    /// Target → source: the answer to a query.
    Answer {
        /// The attempt the query named.
        attempt: u32,
        /// Whether `TargetCommitted` is durable.
        committed: bool,
    },
    /// Target → source: the target dropped its image (or never had one).
    AbortOk,
}

impl Body {
    /// The message's kind, for traces and scripted tests.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Open => "Open",
            Self::Blocks { .. } => "Blocks",
            Self::Commit { .. } => "Commit",
            Self::Query { .. } => "Query",
            Self::Abort => "Abort",
            Self::OpenOk => "OpenOk",
            Self::CommitOk => "CommitOk",
            Self::Refused { .. } => "Refused",
            Self::Answer { .. } => "Answer",
            Self::AbortOk => "AbortOk",
        }
    }

    /// Whether a retry of this message is harmless, so the network may duplicate it.
    pub fn may_duplicate(&self) -> bool {
        match self {
            Self::Query { .. } | Self::Answer { .. } | Self::Abort | Self::AbortOk => true,
            Self::Open
            | Self::Blocks { .. }
            | Self::Commit { .. }
            | Self::OpenOk
            | Self::CommitOk
            | Self::Refused { .. } => false,
        }
    }
}

/// A message in flight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    /// Unique id, in send order.
    pub id: u64,
    /// The connection it travels on.
    pub conn: u64,
    /// Who receives it.
    pub to: Node,
    /// What it says.
    pub body: Body,
}

/// A connection's two ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Conn {
    id: u64,
    source_open: bool,
    target_open: bool,
    /// Its messages wait much longer than others (a congested path, a stalled sender).
    slow: bool,
}

impl Conn {
    fn open_at(&self, node: Node) -> bool {
        match node {
            Node::Source => self.source_open,
            Node::Target => self.target_open,
        }
    }
}

/// Every connection and every message in flight; see the module docs.
#[derive(Debug, Default)]
pub struct Net {
    conns: Vec<Conn>,
    /// In send order.
    msgs: Vec<Msg>,
    next_conn: u64,
    next_msg: u64,
}

impl Net {
    /// The source connects to the target; a target that is down leaves the far end closed
    /// (the connection is refused, and the source finds out by its timeout).
    pub fn connect(&mut self, target_up: bool) -> u64 {
        self.next_conn += 1;
        self.conns.push(Conn {
            id: self.next_conn,
            source_open: true,
            target_open: target_up,
            slow: false,
        });
        self.next_conn
    }

    /// The connection stalls: from now on its messages are delivered rarely, so they arrive
    /// late, after newer connections' (but still in order).
    pub fn stall(&mut self, conn: u64) {
        for c in self.conns.iter_mut().filter(|c| c.id == conn) {
            c.slow = true;
        }
    }

    /// Whether `conn` stalled.
    pub fn is_slow(&self, conn: u64) -> bool {
        self.conns.iter().any(|c| c.id == conn && c.slow)
    }

    /// Queues `body` to `to` on `conn`; returns false (and drops it) when `to`'s end is
    /// already closed, which the sender notices as an error.
    pub fn send(&mut self, conn: u64, to: Node, body: Body) -> bool {
        if !self.is_open(conn, to) {
            return false;
        }
        self.next_msg += 1;
        self.msgs.push(Msg {
            id: self.next_msg,
            conn,
            to,
            body,
        });
        true
    }

    /// Whether `node`'s end of `conn` is open.
    pub fn is_open(&self, conn: u64, node: Node) -> bool {
        self.conns.iter().any(|c| c.id == conn && c.open_at(node))
    }

    /// `node` closes its end of `conn`: messages to it are lost, its own still travel.
    pub fn close(&mut self, conn: u64, node: Node) {
        for c in self.conns.iter_mut().filter(|c| c.id == conn) {
            match node {
                Node::Source => c.source_open = false,
                Node::Target => c.target_open = false,
            }
        }
        self.purge();
    }

    /// `node` crashed: all its ends close; with `lose_outgoing` its unsent buffers die too.
    pub fn crash(&mut self, node: Node, lose_outgoing: bool) {
        for c in &mut self.conns {
            match node {
                Node::Source => c.source_open = false,
                Node::Target => c.target_open = false,
            }
        }
        if lose_outgoing {
            self.msgs.retain(|msg| msg.to == node);
        }
        self.purge();
    }

    /// The connection breaks: both ends close and every message on it is lost.
    pub fn break_conn(&mut self, conn: u64) {
        for c in self.conns.iter_mut().filter(|c| c.id == conn) {
            c.source_open = false;
            c.target_open = false;
        }
        self.purge();
    }

    /// Drops messages whose receiving end is closed, and connections with nothing left.
    fn purge(&mut self) {
        let conns = &self.conns;
        self.msgs
            .retain(|msg| conns.iter().any(|c| c.id == msg.conn && c.open_at(msg.to)));
        let msgs = &self.msgs;
        self.conns.retain(|c| {
            (c.source_open || c.target_open) || msgs.iter().any(|msg| msg.conn == c.id)
        });
    }

    /// Ids of the messages that may be delivered now: the head of each connection and
    /// direction.
    pub fn deliverable(&self) -> Vec<u64> {
        let mut heads: Vec<(u64, Node)> = Vec::new();
        let mut ids = Vec::new();
        for msg in &self.msgs {
            if !heads.contains(&(msg.conn, msg.to)) {
                heads.push((msg.conn, msg.to));
                ids.push(msg.id);
            }
        }
        ids
    }

    /// The message with `id`, if still in flight.
    pub fn get(&self, id: u64) -> Option<&Msg> {
        self.msgs.iter().find(|msg| msg.id == id)
    }

    /// Removes and returns a deliverable message.
    pub fn take(&mut self, id: u64) -> Msg {
        assert!(
            self.deliverable().contains(&id),
            "message {id} is not deliverable"
        );
        let index = self
            .msgs
            .iter()
            .position(|msg| msg.id == id)
            .expect("deliverable");
        self.msgs.remove(index)
    }

    /// Queues a copy of message `id` right behind it (a retry).
    pub fn duplicate(&mut self, id: u64) {
        let index = self
            .msgs
            .iter()
            .position(|msg| msg.id == id)
            .expect("in flight");
        assert!(self.msgs[index].body.may_duplicate(), "not idempotent");
        self.next_msg += 1;
        let copy = Msg {
            id: self.next_msg,
            ..self.msgs[index].clone()
        };
        self.msgs.insert(index + 1, copy);
    }

    /// Connections with a message in flight (candidates for a break).
    pub fn busy_conns(&self) -> Vec<u64> {
        let mut conns: Vec<u64> = self.msgs.iter().map(|msg| msg.conn).collect();
        conns.sort_unstable();
        conns.dedup();
        conns
    }

    /// Every message in flight, in send order.
    pub fn in_flight(&self) -> &[Msg] {
        &self.msgs
    }
}
