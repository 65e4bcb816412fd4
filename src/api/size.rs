//! Sizes as an operator writes them for a client: `65536`, `64K`, `64KiB`, `1M`, `2G` (binary
//! units), and rates as `200M` or `200M/s` (`ferry migrate --bandwidth`, `ferry export add
//! --granularity`). The API itself takes plain byte counts; this is the client's side.
//!
//! Invariant: a size that does not fit in a `u64` is an error, never a wrapped number.

/// Why a size could not be read. Each message quotes the text as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No number where the size starts.
    #[error("'{0}' is not a size")]
    NotANumber(String),
    /// A unit other than B, K, M, G, T (with or without `iB` / `B`).
    #[error("'{text}' has unknown unit '{unit}'")]
    Unit {
        /// The size as given.
        text: String,
        /// The unit as given.
        unit: String,
    },
    /// More than `u64::MAX` bytes.
    #[error("'{0}' is too large")]
    TooLarge(String),
}

/// Parses "65536", "64K", "64KiB", "1M", "2G" (binary units, any case).
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(digits_end);
    let number: u64 = digits
        .parse()
        .map_err(|_| SizeError::NotANumber(text.to_string()))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" | "kb" => 10,
        "m" | "mib" | "mb" => 20,
        "g" | "gib" | "gb" => 30,
        "t" | "tib" | "tb" => 40,
        _ => {
            return Err(SizeError::Unit {
                text: text.to_string(),
                unit: unit.trim().to_string(),
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

    #[test]
    fn sizes_and_rates_parse_in_binary_units() {
        // Goal: the forms operators write parse to bytes. Method: examples of each unit.
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size(" 64KiB "), Ok(64 << 10));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("2 GB"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_rate("32M/s"), Ok(32 << 20));
        assert_eq!(parse_rate("0"), Ok(0));
    }

    #[test]
    fn bad_sizes_are_errors_naming_the_text() {
        // Goal: nonsense and overflow are refused with the text quoted. Method: examples.
        assert_eq!(
            parse_size("fast"),
            Err(SizeError::NotANumber("fast".into()))
        );
        assert_eq!(parse_size("").unwrap_err().to_string(), "'' is not a size");
        assert_eq!(
            parse_size("10X").unwrap_err().to_string(),
            "'10X' has unknown unit 'X'"
        );
        assert_eq!(
            parse_size("99999999999T"),
            Err(SizeError::TooLarge("99999999999T".into()))
        );
        assert!(parse_size("99999999999999999999999").is_err());
    }
}
