//! The disk as the rest of ferry sees it: one served [`Export`] (image, trackers, counters,
//! connections), where its requests go ([`Route`]) and the write gate a switchover closes,
//! the hook a migration mirrors guest writes through ([`WriteMirror`]), the one write trap
//! every completed guest write passes ([`WriteTrap`]), and the gauge a forwarded export's
//! engines report their holding state through ([`ForwardGauge`]).
//!
//! Invariants (each file says how it keeps its part):
//! - A write's blocks are marked in the trackers after it completed and before its reply
//!   (`trap.rs`), exactly once.
//! - No write is in flight while writes are held and drained; the route changes and a mirror
//!   is installed only then (`route.rs`, `export.rs`).
//! - A mirrored write is answered only after the mirror's fence (`mirror.rs`, `trap.rs`).

pub mod export;
pub mod forwarding;
pub mod mirror;
pub mod route;
pub mod trap;

pub use export::{
    is_stale_name, stale_path, ConnectionHandle, CounterSnapshot, Export, ExportError, Shape,
};
pub use forwarding::{ForwardGauge, Forwarding, Holding};
pub use mirror::WriteMirror;
pub use route::{lineage_matches, lineage_token, Route};
pub use trap::{WriteOutcome, WriteTrap};
