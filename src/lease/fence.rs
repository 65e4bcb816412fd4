//! The agent's epoch fence: the highest manager epoch this agent has seen, and the pure
//! decision whether a command carrying an epoch may act (DESIGN.md capability 4,
//! `docs/manager-lease.md`).
//!
//! Each takeover by a `ferry manager` raises the epoch, and every manager command to an agent
//! carries it. An agent admits a command of its highest epoch, admits a higher one only once it
//! has persisted that epoch ([`Admission::Raise`]), and refuses a lower one ([`StaleEpoch`]): a
//! paused or partitioned old active that wakes up changes nothing.
//!
//! The fence also defines the file that persists it (`<state-dir>/manager-epoch`, written by
//! `agent::fencing`), one checked line:
//!
//! ```text
//! ferry-epoch v1 <epoch> <blake3>\n
//! ```
//!
//! | field     | form                                                              |
//! |-----------|-------------------------------------------------------------------|
//! | `<epoch>` | decimal u64, no sign, no leading zero (`0` alone is zero)         |
//! | `<blake3>`| 64 lowercase hex digits: BLAKE3 of `ferry-epoch v1 <epoch>`        |
//!
//! Invariants:
//! - Pure: no I/O, no clock. The caller persists and serializes ([`Admission::Raise`] says
//!   when it must); [`EpochFence::raise`] only ever moves the fence up.
//! - [`decode_file`] accepts exactly what [`encode_file`] writes: a torn, truncated or edited
//!   file is [`EpochFileError`], never an epoch (in particular never a silent 0).

use thiserror::Error;

/// The first two fields of the epoch file: what it is and its format version.
const FILE_PREFIX: &str = "ferry-epoch v1";
/// Hex digits of the BLAKE3 checksum.
const CHECKSUM_HEX_DIGITS: usize = 64;
/// Longest valid epoch file: prefix, u64::MAX (20 digits), checksum, separators, newline.
pub const FILE_MAX_BYTES: usize = FILE_PREFIX.len() + 1 + 20 + 1 + CHECKSUM_HEX_DIGITS + 1;

/// The highest manager epoch an agent has seen (0 before any manager command).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EpochFence {
    /// Commands of a lower epoch are refused.
    pub highest: u64,
}

/// How a command's epoch may be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The epoch is the highest seen: the command may act.
    Current,
    /// The epoch is higher than any seen: a newer manager took over. The caller must persist
    /// the epoch durably, then [`EpochFence::raise`], and only then let the command act, so a
    /// crash can never forget an epoch some command acted under.
    Raise,
}

/// A command from a manager older than one this agent already obeyed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error(
    "manager epoch {epoch} is older than epoch {highest} already seen by this agent; a newer \
     manager took over"
)]
pub struct StaleEpoch {
    /// The epoch the refused command carried.
    pub epoch: u64,
    /// The highest epoch the agent has seen.
    pub highest: u64,
}

impl EpochFence {
    /// Decides whether a command of `epoch` may act; see [`Admission`].
    pub fn check(&self, epoch: u64) -> Result<Admission, StaleEpoch> {
        match epoch.cmp(&self.highest) {
            std::cmp::Ordering::Less => Err(StaleEpoch {
                epoch,
                highest: self.highest,
            }),
            std::cmp::Ordering::Equal => Ok(Admission::Current),
            std::cmp::Ordering::Greater => Ok(Admission::Raise),
        }
    }

    /// Moves the fence up to `epoch`, once it is persisted.
    pub fn raise(&mut self, epoch: u64) {
        assert!(
            epoch > self.highest,
            "the fence only rises: {epoch} after {}",
            self.highest
        );
        self.highest = epoch;
        debug_assert_eq!(self.check(epoch), Ok(Admission::Current));
    }
}

/// Why the bytes of an epoch file are not an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum EpochFileError {
    /// Not one `\n`-terminated line of UTF-8 of at most [`FILE_MAX_BYTES`].
    #[error("not one line of text")]
    NotALine,
    /// The line does not start with `ferry-epoch v1`.
    #[error("not a ferry epoch file (or another version)")]
    NotAnEpochFile,
    /// The epoch field is not a canonical decimal u64.
    #[error("the epoch is not a number")]
    BadEpoch,
    /// The checksum is missing, malformed or does not match: a torn or edited file.
    #[error("checksum mismatch")]
    Checksum,
}

/// The epoch file holding `epoch`; see the module docs.
pub fn encode_file(epoch: u64) -> String {
    let body = format!("{FILE_PREFIX} {epoch}");
    let text = format!("{body} {}\n", blake3::hash(body.as_bytes()).to_hex());
    // Pair assertion: what we write is what decode accepts.
    debug_assert_eq!(decode_file(text.as_bytes()), Ok(epoch));
    text
}

/// The epoch in the bytes of an epoch file; checks everything [`encode_file`] writes.
pub fn decode_file(bytes: &[u8]) -> Result<u64, EpochFileError> {
    if bytes.len() > FILE_MAX_BYTES {
        return Err(EpochFileError::NotALine);
    }
    let text = std::str::from_utf8(bytes).map_err(|_| EpochFileError::NotALine)?;
    let line = text.strip_suffix('\n').ok_or(EpochFileError::NotALine)?;
    if line.contains('\n') {
        return Err(EpochFileError::NotALine);
    }
    let rest = line
        .strip_prefix(FILE_PREFIX)
        .and_then(|rest| rest.strip_prefix(' '))
        .ok_or(EpochFileError::NotAnEpochFile)?;
    let (epoch_text, checksum) = rest.split_once(' ').ok_or(EpochFileError::Checksum)?;
    let body = &line[..FILE_PREFIX.len() + 1 + epoch_text.len()];
    let expected = blake3::hash(body.as_bytes()).to_hex();
    if checksum.len() != CHECKSUM_HEX_DIGITS || checksum != expected.as_str() {
        return Err(EpochFileError::Checksum);
    }
    parse_epoch(epoch_text.as_bytes()).ok_or(EpochFileError::BadEpoch)
}

/// A canonical decimal u64: digits only, no sign, no leading zero (`0` alone is zero). The
/// same text rule serves the epoch file and the `Ferry-Manager-Epoch` request header.
pub fn parse_epoch(text: &[u8]) -> Option<u64> {
    let canonical = match text {
        [] => false,
        [b'0'] => true,
        [b'0', ..] => false,
        digits => digits.iter().all(u8::is_ascii_digit),
    };
    if !canonical {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse::<u64>().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lower_is_refused_equal_admitted_higher_raises() {
        // Goal: the three outcomes of a check, and the refusal names both epochs.
        // Method: check 4, 5 and 6 against a fence at 5; raise it; check again.
        let mut fence = EpochFence { highest: 5 };
        let stale = fence.check(4).expect_err("older");
        assert_eq!(
            stale,
            StaleEpoch {
                epoch: 4,
                highest: 5
            }
        );
        assert_eq!(
            stale.to_string(),
            "manager epoch 4 is older than epoch 5 already seen by this agent; a newer manager \
             took over"
        );
        assert_eq!(fence.check(5), Ok(Admission::Current));
        assert_eq!(fence.check(6), Ok(Admission::Raise));
        assert_eq!(fence.highest, 5, "checking never moves the fence");
        fence.raise(6);
        assert_eq!(fence.check(6), Ok(Admission::Current));
        assert!(fence.check(5).is_err());
        assert_eq!(EpochFence::default().check(0), Ok(Admission::Current));
        assert_eq!(EpochFence::default().check(u64::MAX), Ok(Admission::Raise));
    }

    #[test]
    #[should_panic(expected = "the fence only rises")]
    fn raising_to_the_same_epoch_is_a_bug() {
        // Goal: a caller that raises without a Raise admission panics. Method: raise 5 to 5.
        EpochFence { highest: 5 }.raise(5);
    }

    #[test]
    fn file_round_trips_at_the_edges() {
        // Goal: every epoch survives encode/decode. Method: 0, 1, a middle value, u64::MAX;
        // the longest file fits FILE_MAX_BYTES exactly.
        for epoch in [0, 1, 42, 1 << 40, u64::MAX] {
            let text = encode_file(epoch);
            assert!(text.starts_with("ferry-epoch v1 "), "{text}");
            assert_eq!(decode_file(text.as_bytes()), Ok(epoch));
        }
        assert_eq!(encode_file(u64::MAX).len(), FILE_MAX_BYTES);
    }

    #[test]
    fn torn_or_edited_files_are_refused() {
        // Goal: no damaged file reads as an epoch. Method: every truncation, every single
        // byte flip, a changed epoch with the old checksum, and foreign content.
        let text = encode_file(1234).into_bytes();
        for len in 0..text.len() {
            assert!(decode_file(&text[..len]).is_err(), "truncated to {len}");
        }
        for at in 0..text.len() {
            let mut flipped = text.clone();
            flipped[at] ^= 0x01;
            assert!(decode_file(&flipped).is_err(), "byte {at} flipped");
        }
        let edited = String::from_utf8(text.clone())
            .expect("text")
            .replace("1234", "9999");
        assert_eq!(
            decode_file(edited.as_bytes()),
            Err(EpochFileError::Checksum)
        );
        let mut twice = text.clone();
        twice.extend_from_slice(&text);
        assert!(decode_file(&twice).is_err());
        assert_eq!(decode_file(b"7\n"), Err(EpochFileError::NotAnEpochFile));
        assert_eq!(decode_file(b"\xff\n"), Err(EpochFileError::NotALine));
        let body = "ferry-epoch v1 007";
        let leading_zero = format!("{body} {}\n", blake3::hash(body.as_bytes()).to_hex());
        assert_eq!(
            decode_file(leading_zero.as_bytes()),
            Err(EpochFileError::BadEpoch)
        );
    }

    #[test]
    fn epoch_text_is_canonical_decimal() {
        // Goal: only canonical decimal u64 text is an epoch. Method: good and bad examples.
        assert_eq!(parse_epoch(b"0"), Some(0));
        assert_eq!(parse_epoch(b"5"), Some(5));
        assert_eq!(parse_epoch(b"18446744073709551615"), Some(u64::MAX));
        for bad in [
            &b""[..],
            b"05",
            b"00",
            b"+5",
            b"-5",
            b" 5",
            b"5 ",
            b"0x5",
            b"5a",
            b"18446744073709551616",
            b"\xff",
        ] {
            assert_eq!(parse_epoch(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
