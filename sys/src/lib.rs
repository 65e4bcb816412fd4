//! ferry-sys: the only crate of ferry with `unsafe` code.
//!
//! Purpose: wrap the few Linux interfaces ferry needs (aligned buffers for `O_DIRECT`,
//! `O_DIRECT` files and block devices, OFD locks, block-device ioctls, io_uring) behind safe
//! types, so that the `ferry` crate can `#![forbid(unsafe_code)]`.
//!
//! Invariants:
//! - Every `unsafe` block carries a `// SAFETY:` comment naming the invariant and who upholds it.
//! - Raw errno values exist only here (`errno`); callers see `std::io::Error`.
//! - The io_uring [`uring::Ring`] owns every buffer it reads into or writes from, from `push`
//!   until `reap`, so no caller can free memory the kernel may still touch.

mod errno;

pub mod aligned;
pub mod blkdev;
pub mod direct;
pub mod lock;
pub mod uring;

pub use aligned::{AlignedBuf, DIRECT_ALIGN};
pub use direct::DirectFile;
pub use lock::OfdLock;
