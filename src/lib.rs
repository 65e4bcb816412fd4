//! ferry: a per-host storage agent that serves VM disks over NBD, tracks every write, and
//! moves live disks between hosts, with a durable journal that says after any fault where
//! each disk is authoritative.
//!
//! ```text
//!  NBD client (QEMU, qemu-io, nbdcopy, fio ...)            ferry CLI / demo / manager
//!    │ unix socket / TCP                                          │ api::Client (HTTP/JSON)
//!  ┌─▼───────────────────────────── ferry agent ──────────────────▼──────────────────────┐
//!  │ nbd::server ─► nbd::session ─► io engine (io_uring, O_DIRECT) ─► image              │
//!  │                   │ each completed write: disk::WriteTrap (mark trackers,          │
//!  │                   │ mirror, leave the write gate)                                   │
//!  │ jobs (migrate::run on a real export) ─► transfer (block stream) ─► peer agent       │
//!  │ journal (every step durable first)      api::server ─► agent::AgentControl          │
//!  └─────────────────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! # Layers
//!
//! Each module names only modules below it; nothing names `agent` or `cli`.
//! `tests/layering.rs` reads `src/` and fails on an import that goes up or closes a loop.
//! Bottom to top:
//!
//! | layer | modules | what |
//! | --- | --- | --- |
//! | 1 | [`error`] [`env`] [`prng`] [`codec`] [`durable`] [`name`] [`units`] | error chains; the clock trait core logic takes; the seeded PRNG; the checked byte cursor; atomic write + directory sync; the one name rule; sizes as operators type them |
//! | 2 | [`metrics`] | latency recorders (hdrhistogram) |
//! | 3 | [`io`] | block engines behind `BlockIo` (io_uring, pread/pwrite); the `ferry-sys` crate holds all code the compiler cannot check |
//! | 4 | [`dirty`] | write trackers: dirty bitmaps, heat, their files |
//! | 5 | [`disk`] | one served export: image, trackers, route and write gate, mirror hook, the one write trap, the gauge its forwarding engines report holding through |
//! | 6 | [`nbd`] | the NBD protocol: wire, handshake, sessions, listeners and their admission (also the block stream's), bounded buffer pools, client, forwarding engine |
//! | 7 | [`transfer`] | the authenticated block stream between agents; peer addresses |
//! | 7 | [`lease`] | witness leases of the manager pair: records, the lease file, the witness's and holder's pure decisions, the agents' epoch fence, and their simulation |
//! | 8 | [`migrate`] | the pure live-migration algorithm (heat and naive policies, forecast, switchover) and its simulation |
//! | 8 | [`seed`] | seeds on portable media: their keys, sealed chunks, volume headers, manifests, and volumes as files or raw media (`docs/seed-format.md`) |
//! | 9 | [`journal`] | the durable record of every migration and the commit protocol's pure decisions, simulated |
//! | 10 | [`jobs`] | the algorithm run on real exports: the job environment and the job table; seed catch-ups, and seed export and import on real images |
//! | 11 | [`api`] | DTOs, the HTTP server over a `Control` trait, the client, rendering, the batch driver |
//! | 12 | [`agent`] | the composition root: config, exports, trackers, migrations, targets, recovery, the witness service, the epoch fence |
//! | 12 | [`manager`] | `ferry manager`: the active/standby control plane over many agents (its lease loop, batches across agents, its API) |
//! | 13 | [`demo`] | `ferry demo`: agents as child processes, driven through the API |
//! | 14 | [`cli`] | argument parsing and the commands, each an API call and a rendering |
#![forbid(unsafe_code)]

pub mod agent;
pub mod api;
pub mod cli;
pub mod codec;
pub mod demo;
pub mod dirty;
pub mod disk;
pub mod durable;
pub mod env;
pub mod error;
pub mod io;
pub mod jobs;
pub mod journal;
pub mod lease;
pub mod manager;
pub mod metrics;
pub mod migrate;
pub mod name;
pub mod nbd;
pub mod prng;
pub mod seed;
pub mod transfer;
pub mod units;
