//! The 4 KiB header at offset 0 of every seed volume: clear fields, authenticated by a keyed
//! BLAKE3 MAC.
//!
//! | bytes | field |
//! | --- | --- |
//! | 8 | magic `FERRYSED` |
//! | 4 | format version (1) |
//! | 16 | seed id |
//! | 4 | volume number |
//! | 1 | key source: 1 cluster key, 2 separate seed key |
//! | 32 | key check ([`SeedKeys::check_value`]) |
//! | 1 | state: 1 writing, 2 sealed |
//! | 8 | manifest offset (0 until sealed) |
//! | 8 | manifest length, unpadded (0 until sealed) |
//! | 32 | MAC: keyed BLAKE3 (header MAC key) of the 82 bytes above |
//! | rest | zeros, to 4096 |
//!
//! Invariants:
//! - The header is written twice at the same place (writing, then sealed). An AEAD tag under
//!   a fixed nonce would repeat the nonce with different AAD, and for AES-GCM two tags over
//!   an empty plaintext under one nonce reveal the authentication key. A keyed MAC has no
//!   nonce, so rewriting is safe; the header holds nothing secret, so it needs no encryption.
//! - [`verify`] tells apart, in this order: not a volume (magic), a newer format (version),
//!   the wrong key (check value), and an altered header (MAC, non-zero padding). Every byte of
//!   the 4 KiB is covered by one of these.
//! - [`decode_clear`] reads the fields without a key, for listing media; its result is
//!   unauthenticated and must not be acted on.

use super::{keys, FormatError, SeedKeys};
use crate::codec::Reader;

/// First bytes of every seed volume.
pub const MAGIC: [u8; 8] = *b"FERRYSED";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of the header on the volume: the data region starts here.
pub const HEADER_BYTES: usize = 4096;
/// Bytes of the fields the MAC covers.
const FIELDS_BYTES: usize = 8 + 4 + 16 + 4 + 1 + 32 + 1 + 8 + 8;
/// Where the key check starts (after magic, version, seed id, volume, key source).
const KEY_CHECK_AT: usize = 8 + 4 + 16 + 4 + 1;

/// Where the seed key comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeySource {
    /// Derived from the cluster key and the seed id.
    Cluster,
    /// A separate seed key (`--seed-key FILE`).
    SeparateKey,
}

/// Whether the volume is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VolumeState {
    /// Being written: no manifest yet (an interrupted export leaves this).
    Writing,
    /// Sealed: the manifest is at the header's offset.
    Sealed,
}

/// The fields of a volume header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The seed.
    pub seed_id: [u8; 16],
    /// The volume's number in the seed (0, 1, ...).
    pub volume: u32,
    /// Where the key comes from.
    pub key_source: KeySource,
    /// The key's check value.
    pub key_check: [u8; 32],
    /// Writing or sealed.
    pub state: VolumeState,
    /// Offset of the manifest (4 KiB aligned; 0 until sealed).
    pub manifest_offset_bytes: u64,
    /// Length of the sealed manifest without padding (0 until sealed).
    pub manifest_len_bytes: u64,
}

impl Header {
    /// The header of a volume being written with `keys`.
    pub fn writing(keys: &SeedKeys, volume: u32, key_source: KeySource) -> Header {
        Header {
            seed_id: *keys.seed_id(),
            volume,
            key_source,
            key_check: keys.check_value(),
            state: VolumeState::Writing,
            manifest_offset_bytes: 0,
            manifest_len_bytes: 0,
        }
    }

    /// This header, sealed with the manifest at `offset_bytes`, `len_bytes` long.
    pub fn sealed(&self, offset_bytes: u64, len_bytes: u64) -> Header {
        Header {
            state: VolumeState::Sealed,
            manifest_offset_bytes: offset_bytes,
            manifest_len_bytes: len_bytes,
            ..*self
        }
    }
}

/// The header's 4 KiB as written to the volume.
/// `header` must be of `keys`' seed and key, with a manifest place its state allows.
pub fn encode(header: &Header, keys: &SeedKeys) -> [u8; HEADER_BYTES] {
    assert_eq!(&header.seed_id, keys.seed_id(), "header of another seed");
    assert!(keys.matches(&header.key_check), "header of another key");
    assert!(
        check_manifest_place(header).is_ok(),
        "manifest place {header:?}"
    );
    let mut out = [0u8; HEADER_BYTES];
    let mut fields = Vec::with_capacity(FIELDS_BYTES);
    fields.extend_from_slice(&MAGIC);
    fields.extend_from_slice(&VERSION.to_le_bytes());
    fields.extend_from_slice(&header.seed_id);
    fields.extend_from_slice(&header.volume.to_le_bytes());
    fields.push(match header.key_source {
        KeySource::Cluster => 1,
        KeySource::SeparateKey => 2,
    });
    fields.extend_from_slice(&header.key_check);
    fields.push(match header.state {
        VolumeState::Writing => 1,
        VolumeState::Sealed => 2,
    });
    fields.extend_from_slice(&header.manifest_offset_bytes.to_le_bytes());
    fields.extend_from_slice(&header.manifest_len_bytes.to_le_bytes());
    assert_eq!(fields.len(), FIELDS_BYTES);
    out[..FIELDS_BYTES].copy_from_slice(&fields);
    out[FIELDS_BYTES..FIELDS_BYTES + 32].copy_from_slice(&keys.header_mac(&fields));
    debug_assert!(verify(&out, keys).is_ok_and(|read| read == *header));
    out
}

/// The header's fields without checking the MAC (for listing media): unauthenticated.
/// Refuses a short buffer, a bad magic, another version and values outside the format.
pub fn decode_clear(bytes: &[u8]) -> Result<Header, FormatError> {
    let truncated = |_| FormatError::Truncated {
        what: "volume header",
    };
    if bytes.len() < HEADER_BYTES {
        return Err(FormatError::Truncated {
            what: "volume header",
        });
    }
    let mut reader = Reader::new(bytes);
    if reader.array::<8>().map_err(truncated)? != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = reader.u32_le().map_err(truncated)?;
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion { found: version });
    }
    let seed_id = reader.array::<16>().map_err(truncated)?;
    let volume = reader.u32_le().map_err(truncated)?;
    let key_source = match reader.u8().map_err(truncated)? {
        1 => KeySource::Cluster,
        2 => KeySource::SeparateKey,
        _ => return Err(FormatError::HeaderInvalid("key source")),
    };
    let key_check = reader.array::<32>().map_err(truncated)?;
    let state = match reader.u8().map_err(truncated)? {
        1 => VolumeState::Writing,
        2 => VolumeState::Sealed,
        _ => return Err(FormatError::HeaderInvalid("state")),
    };
    let header = Header {
        seed_id,
        volume,
        key_source,
        key_check,
        state,
        manifest_offset_bytes: reader.u64_le().map_err(truncated)?,
        manifest_len_bytes: reader.u64_le().map_err(truncated)?,
    };
    check_manifest_place(&header)?;
    Ok(header)
}

/// A sealed header's manifest lies after the header, aligned; a writing one has none.
fn check_manifest_place(header: &Header) -> Result<(), FormatError> {
    let (offset, len) = (header.manifest_offset_bytes, header.manifest_len_bytes);
    let ok = match header.state {
        VolumeState::Writing => offset == 0 && len == 0,
        VolumeState::Sealed => {
            offset >= HEADER_BYTES as u64 && offset % HEADER_BYTES as u64 == 0 && len > 0
        }
    };
    if ok {
        Ok(())
    } else {
        Err(FormatError::HeaderInvalid("manifest offset or length"))
    }
}

/// The header in `bytes` (at least 4 KiB), verified with `keys`; see the module docs for
/// the order of the checks.
pub fn verify(bytes: &[u8], keys: &SeedKeys) -> Result<Header, FormatError> {
    if bytes.len() < HEADER_BYTES {
        return Err(FormatError::Truncated {
            what: "volume header",
        });
    }
    let bytes = &bytes[..HEADER_BYTES];
    if bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let mut reader = Reader::new(&bytes[8..]);
    let version = reader.u32_le().unwrap_or(0);
    if version != VERSION {
        return Err(FormatError::UnsupportedVersion { found: version });
    }
    let mut check = [0u8; 32];
    check.copy_from_slice(&bytes[KEY_CHECK_AT..KEY_CHECK_AT + 32]);
    if !keys.matches(&check) {
        return Err(FormatError::WrongKey);
    }
    let mut mac = [0u8; 32];
    mac.copy_from_slice(&bytes[FIELDS_BYTES..FIELDS_BYTES + 32]);
    let padding_zero = bytes[FIELDS_BYTES + 32..].iter().all(|&b| b == 0);
    if !keys::mac_eq(&mac, &keys.header_mac(&bytes[..FIELDS_BYTES])) || !padding_zero {
        return Err(FormatError::HeaderForged);
    }
    let header = decode_clear(bytes)?;
    if header.seed_id != *keys.seed_id() {
        return Err(FormatError::WrongKey);
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::ClusterKey;

    fn keys(seed: u8) -> SeedKeys {
        SeedKeys::from_cluster(&ClusterKey::from_bytes([3; 32]), [seed; 16])
    }

    #[test]
    fn header_round_trips_in_both_states() {
        // Goal: what encode writes, verify and decode_clear read back, in both states, with
        // zeros after the fields. Method: encode a writing and a sealed header, read both.
        let keys = keys(1);
        let writing = Header::writing(&keys, 3, KeySource::SeparateKey);
        let sealed = writing.sealed(1 << 30, 12_345);
        for header in [writing, sealed] {
            let bytes = encode(&header, &keys);
            assert_eq!(verify(&bytes, &keys).expect("verifies"), header);
            assert_eq!(decode_clear(&bytes).expect("decodes"), header);
            assert!(bytes[FIELDS_BYTES + 32..].iter().all(|&b| b == 0));
        }
        assert_ne!(encode(&writing, &keys), encode(&sealed, &keys));
    }

    #[test]
    fn every_flipped_byte_is_refused_with_its_reason() {
        // Goal: no single-byte change passes, and the error names the right cause. Method:
        // flip each of the 4096 bytes of a sealed header in turn and verify.
        let keys = keys(1);
        let bytes = encode(
            &Header::writing(&keys, 0, KeySource::Cluster).sealed(8192, 77),
            &keys,
        );
        for at in 0..HEADER_BYTES {
            let mut flipped = bytes;
            flipped[at] ^= 0x40;
            let err = verify(&flipped, &keys).expect_err("flipped byte refused");
            let ok = match at {
                0..8 => matches!(err, FormatError::BadMagic),
                8..12 => matches!(err, FormatError::UnsupportedVersion { .. }),
                KEY_CHECK_AT..=64 => matches!(err, FormatError::WrongKey),
                _ => matches!(err, FormatError::HeaderForged),
            };
            assert!(ok, "byte {at}: {err}");
        }
    }

    #[test]
    fn wrong_key_is_named_as_such_and_short_input_as_truncated() {
        // Goal: another seed's or cluster's key is "wrong key", not "forged"; short input is
        // truncated; decode_clear needs no key but checks the fields. Method: verify with
        // other keys, cut the buffer, decode bad values.
        let keys = keys(1);
        let bytes = encode(&Header::writing(&keys, 0, KeySource::Cluster), &keys);
        assert!(matches!(
            verify(&bytes, &self::keys(2)),
            Err(FormatError::WrongKey)
        ));
        let other_cluster = SeedKeys::from_cluster(&ClusterKey::from_bytes([4; 32]), [1; 16]);
        assert!(matches!(
            verify(&bytes, &other_cluster),
            Err(FormatError::WrongKey)
        ));
        // Same seed key, another seed id: the MAC holds, the seed does not.
        let same_key_other_id = SeedKeys::from_seed_key([5; 32], [9; 16]);
        let separate = SeedKeys::from_seed_key([5; 32], [8; 16]);
        let bytes_separate = encode(
            &Header::writing(&separate, 0, KeySource::SeparateKey),
            &separate,
        );
        assert!(matches!(
            verify(&bytes_separate, &same_key_other_id),
            Err(FormatError::WrongKey)
        ));
        for len in [0, 8, FIELDS_BYTES, HEADER_BYTES - 1] {
            assert!(matches!(
                verify(&bytes[..len], &keys),
                Err(FormatError::Truncated { .. })
            ));
            assert!(matches!(
                decode_clear(&bytes[..len]),
                Err(FormatError::Truncated { .. })
            ));
        }
        let mut bad_state = bytes;
        bad_state[KEY_CHECK_AT + 32] = 9;
        assert!(matches!(
            decode_clear(&bad_state),
            Err(FormatError::HeaderInvalid("state"))
        ));
        let mut unaligned = encode(
            &Header::writing(&keys, 0, KeySource::Cluster).sealed(4096, 1),
            &keys,
        );
        unaligned[FIELDS_BYTES - 16] = 1; // manifest offset 4097
        assert!(matches!(
            decode_clear(&unaligned),
            Err(FormatError::HeaderInvalid(_))
        ));
        unaligned[0] = b'X';
        assert!(matches!(
            decode_clear(&unaligned),
            Err(FormatError::BadMagic)
        ));
    }
}
