//! ferry: a per-host storage agent that serves VM disks over NBD, tracks every write, and
//! (in later stages) moves live disks between hosts.
//!
//! ```text
//!  NBD client (QEMU, qemu-io, nbdcopy, fio ...)
//!    │ unix socket / TCP
//!  ┌─▼──────────────────────── ferry agent ─────────────────────────────┐
//!  │ nbd::server ─► nbd::session ─► io engine (io_uring, O_DIRECT) ─► image │
//!  │                  │ after each completed write: dirty::TrackerSet      │
//!  │ api (HTTP/JSON, /metrics)         agent (config, registry, signals)  │
//!  └────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! Module map: [`agent`] the daemon, [`nbd`] the protocol and data path, [`io`] the engines
//! (the `ferry-sys` crate holds all code the compiler cannot check), [`dirty`] write
//! trackers, [`api`] the control API and its client, [`metrics`] latency recording, [`env`]
//! the clock trait that core logic takes so it can run under simulation, [`prng`] the seeded
//! generator of tests and simulations, [`demo`] the `ferry demo` walkthrough, [`transfer`]
//! the authenticated block stream between agents (framed extents, BLAKE3 per extent, holes
//! for zeros, bandwidth cap), [`migrate`] the live-migration algorithm (heat and naive
//! policies, switchover), the job that runs it on a real export, and its simulation, [`journal`]
//! the durable, checksummed record of every migration this agent takes part in (source or
//! target), replayed at start-up and folded into per-job state (which side is authoritative).
//! At the bottom, used by all of the above and importing none of them: [`codec`] the checked
//! byte cursor every decoder reads through, [`durable`] atomic file replacement and directory
//! sync, [`name`] the one rule for export, tracker and batch names.
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod cli;
pub mod codec;
pub mod demo;
pub mod dirty;
pub mod durable;
pub mod env;
pub mod io;
pub mod journal;
pub mod metrics;
pub mod migrate;
pub mod name;
pub mod nbd;
pub mod prng;
pub mod transfer;
