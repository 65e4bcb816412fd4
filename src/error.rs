//! Error helpers shared by every layer.
//!
//! Module errors keep a short `Display` and chain their causes through `source()` (see each
//! module's error enum); this is the one place that flattens such a chain into a single line
//! for a log message or an API answer.

use std::fmt;

/// An error and its sources on one line, `outer: inner: innermost`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    Chain(err).to_string()
}

/// Displays an error followed by its sources, without allocating up front (for log lines).
#[derive(Debug, Clone, Copy)]
pub struct Chain<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(inner) = source {
            write!(f, ": {inner}")?;
            source = inner.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    // Goal: every cause appears once, outermost first. Method: two levels.
    #[test]
    fn chain_lists_every_cause_once() {
        let err = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&err), "outer: inner");
    }
}
