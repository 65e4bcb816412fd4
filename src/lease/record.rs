//! The on-disk lease record: one 4096-byte sector holding a manager pair's [`Lease`], written
//! whole with `O_DIRECT` by [`super::store`] and checked whole when read.
//!
//! Layout, little-endian, at fixed offsets (`docs/manager-lease.md`, "Lease file format"):
//!
//! | offset | bytes | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `FERRYLSE` |
//! | 8 | 2 | format version (1) |
//! | 10 | 1 | pair name length, 1..=64 |
//! | 11 | 64 | pair name ([`crate::name`] rule), zero padded |
//! | 75 | 8 | write sequence: raised by every write of the file |
//! | 83 | 8 | lease epoch |
//! | 91 | 1 | holder length: 0 for no holder, else 1..=64 |
//! | 92 | 64 | holder ([`ManagerId`]), zero padded |
//! | 156 | 8 | witness generation |
//! | 164 | 4 | `lease_ms` |
//! | 168 | 3896 | zeros |
//! | 4064 | 32 | BLAKE3 of bytes 0..4064 |
//!
//! Invariants:
//! - The checksum's place and algorithm are the same in every format version, so
//!   [`Record::decode`] checks it before anything else: a torn or damaged sector (any byte)
//!   reads as [`RecordError::BadChecksum`], and a version field that fails to parse was
//!   written on purpose (a newer ferry), never a flipped bit.
//! - Decoding, in this order: length, all zeros ([`RecordError::Empty`]: a slot never
//!   written), checksum, magic, version, then the fields. Every error after the checksum
//!   means a writer put those exact bytes there, which [`super::store`] does not overwrite.
//! - The encoding is canonical: lengths in range, name tails and padding zero, so a decoded
//!   record re-encodes to the same sector.
//! - Decoding hostile bytes never panics and allocates only the two names (at most 64 bytes
//!   each); it reads fields through [`Reader`].

use thiserror::Error;

use super::{Lease, ManagerId};
use crate::codec::Reader;
use crate::name::{self, NameError, NAME_MAX_BYTES};

/// Bytes of one record: one sector of the lease file.
pub const RECORD_BYTES: usize = 4096;
/// First bytes of every record.
pub const MAGIC: [u8; 8] = *b"FERRYLSE";
/// The format version this build writes and reads.
pub const VERSION: u16 = 1;
/// Bytes of the fields before the zero padding.
const FIELDS_BYTES: usize = 8 + 2 + NAME_FIELD_BYTES + 8 + 8 + NAME_FIELD_BYTES + 8 + 4;
/// Bytes of a name field: a length byte, then the name padded to the longest name.
const NAME_FIELD_BYTES: usize = 1 + NAME_MAX_BYTES;
/// Bytes of the checksum, at the end of the sector.
const CHECKSUM_BYTES: usize = 32;
/// Where the checksum starts: it covers every byte before it.
const CHECKSUM_AT: usize = RECORD_BYTES - CHECKSUM_BYTES;
const _: () = assert!(FIELDS_BYTES == 168);
const _: () = assert!(FIELDS_BYTES <= CHECKSUM_AT);
const _: () = assert!(NAME_MAX_BYTES <= u8::MAX as usize);

/// One lease record: the lease of manager pair `pair`, as of write number `sequence`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The manager pair the lease file belongs to (the [`crate::name`] rule).
    pub pair: String,
    /// Raised by one for every write of the lease file; the higher of two valid records is
    /// the newer.
    pub sequence: u64,
    /// The lease itself.
    pub lease: Lease,
}

/// Why a sector is not a lease record.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RecordError {
    /// The bytes are not one sector long (a caller bug or a short read).
    #[error("a lease record is {RECORD_BYTES} bytes, not {len_bytes}")]
    WrongLength {
        /// Bytes given.
        len_bytes: usize,
    },
    /// All zeros: a slot never written.
    #[error("empty: never written")]
    Empty,
    /// The checksum does not match: a torn write or damage.
    #[error("checksum mismatch: torn or damaged")]
    BadChecksum,
    /// Checksummed, but not a lease record.
    #[error("not a lease record (bad magic)")]
    BadMagic,
    /// A lease record of a format this build does not know (written by a newer ferry).
    #[error("lease record format version {version} is not supported (this build reads {VERSION})")]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// Checksummed, but a field is outside the format.
    #[error("malformed lease record: {what}")]
    Malformed {
        /// Which field, and how.
        what: &'static str,
    },
    /// A name field breaks the name rule.
    #[error("malformed lease record: bad {field} name")]
    BadName {
        /// `pair` or `holder`.
        field: &'static str,
        /// Why.
        #[source]
        source: NameError,
    },
}

impl Record {
    /// The record's sector. `pair` must satisfy the name rule ([`super::store`] checks it
    /// when it opens the file; anything else is a caller bug, so it panics).
    pub fn encode(&self) -> [u8; RECORD_BYTES] {
        assert!(
            name::validate(&self.pair).is_ok(),
            "lease pair {:?} breaks the name rule",
            self.pair
        );
        let mut out = [0u8; RECORD_BYTES];
        let mut at = 0;
        let mut put = |bytes: &[u8]| {
            out[at..at + bytes.len()].copy_from_slice(bytes);
            at += bytes.len();
        };
        put(&MAGIC);
        put(&VERSION.to_le_bytes());
        put(&name_field(&self.pair));
        put(&self.sequence.to_le_bytes());
        put(&self.lease.epoch.to_le_bytes());
        put(&name_field(
            self.lease.holder.as_ref().map_or("", ManagerId::as_str),
        ));
        put(&self.lease.witness_generation.to_le_bytes());
        put(&self.lease.lease_ms.to_le_bytes());
        assert_eq!(at, FIELDS_BYTES);
        let checksum = blake3::hash(&out[..CHECKSUM_AT]);
        out[CHECKSUM_AT..].copy_from_slice(checksum.as_bytes());
        // Pair assertion: what we write is what decode accepts.
        debug_assert!(Self::decode(&out).is_ok_and(|read| read == *self));
        out
    }

    /// The record in `sector`, checked in the order of the module docs. `sector` is hostile:
    /// any bytes give a record or an error, never a panic.
    pub fn decode(sector: &[u8]) -> Result<Record, RecordError> {
        if sector.len() != RECORD_BYTES {
            return Err(RecordError::WrongLength {
                len_bytes: sector.len(),
            });
        }
        if sector.iter().all(|&byte| byte == 0) {
            return Err(RecordError::Empty);
        }
        let (covered, checksum) = sector.split_at(CHECKSUM_AT);
        if blake3::hash(covered) != *checksum {
            return Err(RecordError::BadChecksum);
        }
        let (fields, padding) = covered.split_at(FIELDS_BYTES);
        let record = decode_fields(fields)?;
        if padding.iter().any(|&byte| byte != 0) {
            return Err(RecordError::Malformed {
                what: "non-zero padding",
            });
        }
        Ok(record)
    }
}

/// The fields of a checksummed sector: magic and version first.
fn decode_fields(fields: &[u8]) -> Result<Record, RecordError> {
    let mut reader = Reader::new(fields);
    if read(reader.array::<8>())? != MAGIC {
        return Err(RecordError::BadMagic);
    }
    let version = u16::from_le_bytes(read(reader.array::<2>())?);
    if version != VERSION {
        return Err(RecordError::UnsupportedVersion { version });
    }
    let pair = read_name(&mut reader, "pair")?.ok_or(RecordError::BadName {
        field: "pair",
        source: NameError::Empty,
    })?;
    let sequence = read(reader.u64_le())?;
    let epoch = read(reader.u64_le())?;
    let holder = match read_name(&mut reader, "holder")? {
        Some(holder) => Some(
            ManagerId::new(holder).map_err(|source| RecordError::BadName {
                field: "holder",
                source,
            })?,
        ),
        None => None,
    };
    let witness_generation = read(reader.u64_le())?;
    let lease_ms = read(reader.u32_le())?;
    debug_assert!(reader.is_empty());
    Ok(Record {
        pair: pair.to_owned(),
        sequence,
        lease: Lease {
            epoch,
            holder,
            witness_generation,
            lease_ms,
        },
    })
}

/// A name field: None for length 0, else the name, checked against the name rule.
fn read_name<'a>(
    reader: &mut Reader<'a>,
    field: &'static str,
) -> Result<Option<&'a str>, RecordError> {
    let len = usize::from(read(reader.u8())?);
    let slot = read(reader.bytes(NAME_MAX_BYTES))?;
    let Some((name, tail)) = slot.split_at_checked(len) else {
        return Err(RecordError::Malformed {
            what: "name length over 64",
        });
    };
    if tail.iter().any(|&byte| byte != 0) {
        return Err(RecordError::Malformed {
            what: "bytes after a name",
        });
    }
    if len == 0 {
        return Ok(None);
    }
    let name = std::str::from_utf8(name).map_err(|_| RecordError::Malformed {
        what: "name is not UTF-8",
    })?;
    name::validate(name).map_err(|source| RecordError::BadName { field, source })?;
    Ok(Some(name))
}

/// A read off the fixed-size field area: it cannot run short, but hostile input gets an
/// error rather than an `unwrap`.
fn read<T>(field: Result<T, crate::codec::CodecError>) -> Result<T, RecordError> {
    field.map_err(|_| RecordError::Malformed {
        what: "fields cut short",
    })
}

/// `name` as a name field: its length, then its bytes, zero padded.
fn name_field(name: &str) -> [u8; NAME_FIELD_BYTES] {
    assert!(name.len() <= NAME_MAX_BYTES, "name {name:?} too long");
    let mut field = [0u8; NAME_FIELD_BYTES];
    field[0] = name.len() as u8; // at most NAME_MAX_BYTES, which fits (asserted above)
    field[1..1 + name.len()].copy_from_slice(name.as_bytes());
    field
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prng::SplitMix64;

    fn lease(epoch: u64, holder: Option<&str>) -> Lease {
        Lease {
            epoch,
            holder: holder.map(|id| ManagerId::new(id).expect("valid id")),
            witness_generation: 3,
            lease_ms: 10_000,
        }
    }

    fn record(sequence: u64, epoch: u64, holder: Option<&str>) -> Record {
        Record {
            pair: "mgr-pair.1".to_owned(),
            sequence,
            lease: lease(epoch, holder),
        }
    }

    /// `sector` with its checksum recomputed: how a test reaches the checks behind it.
    fn resealed(mut sector: [u8; RECORD_BYTES]) -> [u8; RECORD_BYTES] {
        let checksum = blake3::hash(&sector[..CHECKSUM_AT]);
        sector[CHECKSUM_AT..].copy_from_slice(checksum.as_bytes());
        sector
    }

    #[test]
    fn records_round_trip_at_fixed_offsets() {
        // Goal: decode gives back what encode wrote, for a holder and none, extreme values
        // and the longest names; the fields sit where the module docs say. Method:
        // round trips, then read the offsets of one sector by hand.
        let longest = "m".repeat(NAME_MAX_BYTES);
        let cases = [
            record(1, 0, None),
            record(7, 42, Some("manager-a")),
            Record {
                pair: longest.clone(),
                sequence: u64::MAX,
                lease: Lease {
                    epoch: u64::MAX,
                    holder: Some(ManagerId::new(&longest).expect("id")),
                    witness_generation: u64::MAX,
                    lease_ms: u32::MAX,
                },
            },
        ];
        for case in cases {
            let sector = case.encode();
            assert_eq!(Record::decode(&sector), Ok(case.clone()));
        }
        let sector = record(0x0102, 0x0304, Some("ab")).encode();
        assert_eq!(&sector[0..8], b"FERRYLSE");
        assert_eq!(&sector[8..10], &[1, 0]);
        assert_eq!(sector[10], 10);
        assert_eq!(&sector[11..21], b"mgr-pair.1");
        assert_eq!(&sector[75..83], &0x0102u64.to_le_bytes());
        assert_eq!(&sector[83..91], &0x0304u64.to_le_bytes());
        assert_eq!(&sector[91..94], &[2, b'a', b'b']);
        assert_eq!(&sector[156..164], &3u64.to_le_bytes());
        assert_eq!(&sector[164..168], &10_000u32.to_le_bytes());
        assert!(sector[168..CHECKSUM_AT].iter().all(|&byte| byte == 0));
    }

    #[test]
    fn every_flipped_byte_is_refused() {
        // Goal: damage anywhere in the sector, checksum included, never reads as a lease.
        // Method: flip each of the 4096 bytes in turn (two patterns); each decodes to
        // BadChecksum, since the checksum is checked before any field.
        let sector = record(9, 5, Some("manager-b")).encode();
        for at in 0..RECORD_BYTES {
            for pattern in [0x01u8, 0xff] {
                let mut damaged = sector;
                damaged[at] ^= pattern;
                assert_eq!(
                    Record::decode(&damaged),
                    Err(RecordError::BadChecksum),
                    "byte {at} ^ {pattern:#x}"
                );
            }
        }
    }

    #[test]
    fn torn_writes_are_refused() {
        // Goal: a sector only partly overwritten (new over old, or new over a never-written
        // slot) is refused. Method: tear at every 512-byte device sector boundary and in the
        // middle of the fields, both ways round.
        let old = record(4, 2, Some("manager-a")).encode();
        let new = record(5, 3, Some("manager-b")).encode();
        let zeros = [0u8; RECORD_BYTES];
        let tears = (1..8).map(|sectors| sectors * 512).chain([80, 100]);
        for tear in tears {
            for (first, second) in [(&new, &old), (&old, &new), (&new, &zeros)] {
                let mut torn = *second;
                torn[..tear].copy_from_slice(&first[..tear]);
                assert!(torn != *first && torn != *second, "a real tear at {tear}");
                assert_eq!(
                    Record::decode(&torn),
                    Err(RecordError::BadChecksum),
                    "torn at {tear}"
                );
            }
        }
    }

    #[test]
    fn empty_and_wrong_length_sectors_are_named() {
        // Goal: a never-written slot is Empty (not corrupt), and a buffer of the wrong size
        // is refused without indexing. Method: zeros; short, long and empty slices.
        assert_eq!(
            Record::decode(&[0u8; RECORD_BYTES]),
            Err(RecordError::Empty)
        );
        let sector = record(1, 1, None).encode();
        for len_bytes in [0, 1, RECORD_BYTES - 1] {
            assert_eq!(
                Record::decode(&sector[..len_bytes]),
                Err(RecordError::WrongLength { len_bytes })
            );
        }
        let long = [0u8; RECORD_BYTES + 1];
        assert_eq!(
            Record::decode(&long),
            Err(RecordError::WrongLength {
                len_bytes: RECORD_BYTES + 1
            })
        );
    }

    #[test]
    fn checksummed_foreign_sectors_are_named() {
        // Goal: a sector whose checksum holds but which another format or version wrote is
        // told apart from damage. Method: change magic, version, reseal, decode.
        let sector = record(1, 1, None).encode();
        let mut magic = sector;
        magic[0..8].copy_from_slice(b"FERRYJNL");
        assert_eq!(Record::decode(&resealed(magic)), Err(RecordError::BadMagic));
        let mut version = sector;
        version[8..10].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            Record::decode(&resealed(version)),
            Err(RecordError::UnsupportedVersion { version: 2 })
        );
        let mut padding = sector;
        padding[2000] = 1;
        assert_eq!(
            Record::decode(&resealed(padding)),
            Err(RecordError::Malformed {
                what: "non-zero padding"
            })
        );
    }

    #[test]
    fn bad_names_are_refused() {
        // Goal: names in the sector obey the name rule and the canonical layout, whatever
        // the writer did. Method: edit the pair and holder fields of a valid sector, reseal,
        // and decode; an encode of a bad pair panics (caller bug).
        let sector = record(1, 1, Some("ab")).encode();
        let with = |at: usize, bytes: &[u8]| {
            let mut edited = sector;
            edited[at..at + bytes.len()].copy_from_slice(bytes);
            Record::decode(&resealed(edited))
        };
        let bad_name = |field, source| Err(RecordError::BadName { field, source });
        let bad_char = |name: &str, found| NameError::BadCharacter {
            name: name.to_owned(),
            found,
        };
        let leading_dot = NameError::LeadingDot { name: ".b".into() };
        let malformed = |what| Err(RecordError::Malformed { what });
        assert_eq!(with(10, &[0]), malformed("bytes after a name"));
        assert_eq!(
            with(10, &raw(3, b"a/b")),
            bad_name("pair", bad_char("a/b", '/'))
        );
        assert_eq!(with(10, &raw(0, b"")), bad_name("pair", NameError::Empty));
        assert_eq!(with(10, &[65]), malformed("name length over 64"));
        assert_eq!(with(10, &[255]), malformed("name length over 64"));
        assert_eq!(with(10, &raw(2, b"ab\0c")), malformed("bytes after a name"));
        assert_eq!(
            with(10, &raw(2, &[0xc3, 0x28])),
            malformed("name is not UTF-8")
        );
        assert_eq!(with(91, &raw(2, b".b")), bad_name("holder", leading_dot));
        assert_eq!(with(91, &[1]), malformed("bytes after a name"));
        assert_eq!(
            with(91, &raw(1, b"\0")),
            bad_name("holder", bad_char("\0", '\0'))
        );
        assert_eq!(with(91, &raw(0, b"")), Ok(record(1, 1, None)));
        let longest = [b'x'; NAME_MAX_BYTES];
        let pair = with(10, &raw(64, &longest)).expect("longest pair").pair;
        assert_eq!(pair, "x".repeat(NAME_MAX_BYTES));
        let message = with(91, &raw(2, b".b")).expect_err("bad").to_string();
        assert_eq!(message, "malformed lease record: bad holder name");
    }

    /// A name field of length byte `len` followed by `bytes`, zero padded.
    fn raw(len: u8, bytes: &[u8]) -> [u8; NAME_FIELD_BYTES] {
        let mut field = [0u8; NAME_FIELD_BYTES];
        field[0] = len;
        field[1..1 + bytes.len()].copy_from_slice(bytes);
        field
    }

    #[test]
    #[should_panic(expected = "breaks the name rule")]
    fn encoding_a_bad_pair_is_a_caller_bug() {
        // Goal: the writer never puts a name on disk that its reader would refuse. Method:
        // encode a pair with a slash.
        let bad = Record {
            pair: "a/b".to_owned(),
            ..record(1, 1, None)
        };
        let _ = bad.encode();
    }

    #[test]
    fn random_sectors_never_panic_and_decode_canonically() {
        // Goal: hostile bytes never panic, and whatever decodes re-encodes to the same
        // sector. Method: PRNG sectors, raw and resealed (so the field checks are reached),
        // some built by mutating a valid sector's field bytes.
        let mut prng = SplitMix64::new(0x1ea5e);
        let valid = record(3, 2, Some("manager-a")).encode();
        let mut decoded = 0;
        for round in 0..3_000 {
            let mut sector = if round % 2 == 0 {
                valid
            } else {
                [0u8; RECORD_BYTES]
            };
            for _ in 0..prng.below(8) {
                let at = prng.index(FIELDS_BYTES + 8);
                sector[at] = prng.byte();
            }
            assert!(Record::decode(&sector).is_err() || sector == valid);
            let sector = resealed(sector);
            if let Ok(record) = Record::decode(&sector) {
                assert_eq!(record.encode(), sector);
                decoded += 1;
            }
        }
        assert!(decoded > 0, "some mutations keep a valid record");
    }
}
