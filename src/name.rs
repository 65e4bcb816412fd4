//! The one rule for names ferry creates things under: exports, trackers and batches.
//!
//! A name becomes a file name (`<name>.tracker`, `<name>.img`, `trackers/<name>/`), part of
//! an NBD metadata context (`qemu:dirty-bitmap:<name>`) and a field of the journal and of the
//! block stream, so it must be safe in all of them: 1..=[`NAME_MAX_BYTES`] bytes of
//! `[A-Za-z0-9._-]`, not starting with `.` (no hidden files, no `.` or `..`, no `/`, no NUL).
//!
//! Internally made names follow the same rule (a migration's tracker is `migrate-<job id>`,
//! at most 28 bytes). A name an NBD client asks for is not checked here: it is only looked
//! up, and the handshake bounds it by the protocol's own string rule.
//!
//! Bottom layer: nothing from the rest of the crate.

use thiserror::Error;

/// Longest name, in bytes (all allowed characters are ASCII, so also in characters).
pub const NAME_MAX_BYTES: usize = 64;

/// Why a name is refused; the message quotes the name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NameError {
    /// The empty string.
    #[error("name is empty")]
    Empty,
    /// More than [`NAME_MAX_BYTES`] bytes.
    #[error("name {name:?} is longer than {NAME_MAX_BYTES} bytes")]
    TooLong {
        /// The name.
        name: String,
    },
    /// Starts with `.`.
    #[error("name {name:?} starts with '.'")]
    LeadingDot {
        /// The name.
        name: String,
    },
    /// Holds a character outside `[A-Za-z0-9._-]`.
    #[error("name {name:?} has {found:?}: use letters, digits, '.', '_', '-'")]
    BadCharacter {
        /// The name.
        name: String,
        /// The first character refused.
        found: char,
    },
}

/// Checks `name` against the rule in the module docs.
pub fn validate(name: &str) -> Result<(), NameError> {
    let owned = || name.to_owned();
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > NAME_MAX_BYTES {
        return Err(NameError::TooLong { name: owned() });
    }
    if name.starts_with('.') {
        return Err(NameError::LeadingDot { name: owned() });
    }
    if let Some(found) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
    {
        return Err(NameError::BadCharacter {
            name: owned(),
            found,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_safe_as_path_components_are_accepted() {
        // Goal: the allowed alphabet, the longest name and internal names pass. Method: a
        // table of good names, including `migrate-<u64::MAX>`.
        let longest = "x".repeat(NAME_MAX_BYTES);
        let migrate = format!("migrate-{}", u64::MAX);
        for name in [
            "a",
            "vm-1",
            "mig-1_a.b",
            "A.Z_09-",
            "a..b",
            &longest,
            &migrate,
        ] {
            assert_eq!(validate(name), Ok(()), "{name:?}");
        }
    }

    #[test]
    fn each_unsafe_name_is_refused_for_its_reason() {
        // Goal: every way a name could escape its directory or confuse a reader is refused,
        // and the message quotes the name. Method: a table of bad names and expected errors.
        let too_long = "x".repeat(NAME_MAX_BYTES + 1);
        let cases: [(&str, NameError); 9] = [
            ("", NameError::Empty),
            (
                &too_long,
                NameError::TooLong {
                    name: too_long.clone(),
                },
            ),
            (".", NameError::LeadingDot { name: ".".into() }),
            ("..", NameError::LeadingDot { name: "..".into() }),
            (
                ".hidden",
                NameError::LeadingDot {
                    name: ".hidden".into(),
                },
            ),
            ("a/b", bad("a/b", '/')),
            ("a\0b", bad("a\0b", '\0')),
            ("sp ace", bad("sp ace", ' ')),
            ("é", bad("é", 'é')),
        ];
        for (name, expected) in cases {
            assert_eq!(validate(name), Err(expected), "{name:?}");
        }
        let message = validate("a/b").expect_err("slash").to_string();
        assert_eq!(
            message,
            "name \"a/b\" has '/': use letters, digits, '.', '_', '-'"
        );
        // 33 two-byte characters are 66 bytes: the limit is in bytes.
        assert!(matches!(
            validate(&"é".repeat(33)),
            Err(NameError::TooLong { .. })
        ));
    }

    fn bad(name: &str, found: char) -> NameError {
        NameError::BadCharacter {
            name: name.to_owned(),
            found,
        }
    }
}
