//! Sizes as operators type them: `65536`, `64K`, `64KiB`, `512M`, `2G`, `1T` (binary units;
//! `KB` is read as KiB, as `qemu-img` does), and rates as `200M` or `200M/s`. One parser for
//! the config file, the CLI and the demo; the API itself takes plain byte counts.
//!
//! Invariant: a size that does not fit in a `u64` is an error, never a wrapped number.

/// A size that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No number where it starts.
    #[error("'{0}' is not a size like 64K or 2G")]
    NotASize(String),
    /// A unit other than B, K, M, G, T (with or without `iB`/`B`).
    #[error("'{text}' has unknown unit '{unit}'")]
    Unit {
        /// What was given.
        text: String,
        /// The unit part.
        unit: String,
    },
    /// More than `u64::MAX` bytes.
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// Bytes in `text`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    let number: u64 = digits
        .parse()
        .map_err(|_| SizeError::NotASize(text.to_string()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        other => {
            return Err(SizeError::Unit {
                text: text.to_string(),
                unit: other.to_string(),
            })
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| SizeError::TooLarge(text.to_string()))
}

/// A rate in bytes per second: a size, optionally followed by `/s` ("200M/s").
pub fn parse_rate(text: &str) -> Result<u64, SizeError> {
    parse_size(text.trim().trim_end_matches("/s"))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: the forms operators type are read, the rest refused by name. Method: examples.
    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size(" 2GiB "), Ok(2 << 30));
        assert_eq!(parse_size("512mb"), Ok(512 << 20));
        assert!(matches!(parse_size("12Q"), Err(SizeError::Unit { .. })));
        assert!(matches!(parse_size("G"), Err(SizeError::NotASize(_))));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::TooLarge(_))
        ));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_rate("32M/s"), Ok(32 << 20));
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(
            parse_size("10X").unwrap_err().to_string(),
            "'10X' has unknown unit 'x'"
        );
    }
}
