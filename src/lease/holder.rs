//! Placeholder, filled in by the lease work in progress.
