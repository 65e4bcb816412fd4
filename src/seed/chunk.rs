//! Sealing the data chunks of a seed: AES-256-GCM under the seed's key, the nonce unique per
//! chunk of a volume, the chunk's place in the AAD, padded to 4 KiB for O_DIRECT.
//!
//! Invariants:
//! - The nonce is the volume number (4 bytes) and the chunk's sequence on that volume (8
//!   bytes). A writer gives each chunk of a volume a new sequence (a resumed export continues
//!   after the last one), and the key is the seed's alone, so no (key, nonce) pair repeats.
//!   The sequence `u64::MAX` is reserved for the volume's manifest.
//! - The AAD is the seed id, the disk index, the disk offset, the length and the volume: a
//!   chunk opened at any other place fails, so a medium cannot be rearranged undetected.
//! - A sealed chunk is `ciphertext ‖ tag ‖ zero padding` to a multiple of 4 KiB; the length
//!   comes from the manifest (authenticated), never from the chunk.

use ring::aead::{Aad, Nonce};

use super::{SeedError, SeedKeys};

/// Bytes of the tag after each chunk's ciphertext.
pub const TAG_BYTES: usize = 16;
/// Alignment of chunks on a volume (O_DIRECT).
pub const ALIGN_BYTES: usize = 4096;
/// Most plaintext bytes in one chunk: 1 MiB.
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// Where a chunk belongs: what its AAD and nonce bind it to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlace {
    /// Index of the disk in the seed.
    pub disk: u32,
    /// Offset of the chunk's bytes on the disk.
    pub offset_bytes: u64,
    /// Volume the chunk is on.
    pub volume: u32,
    /// Sequence of the chunk on its volume (below `u64::MAX`).
    pub sequence: u64,
}

/// A sealed chunk as it goes onto the medium.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedChunk {
    /// Ciphertext, tag and padding: a multiple of [`ALIGN_BYTES`].
    pub bytes: Vec<u8>,
}

/// Bytes a chunk of `len_bytes` of plaintext takes on the medium.
pub fn sealed_len(len_bytes: usize) -> usize {
    (len_bytes + TAG_BYTES).div_ceil(ALIGN_BYTES) * ALIGN_BYTES
}

fn nonce(place: &ChunkPlace) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&place.volume.to_le_bytes());
    bytes[4..].copy_from_slice(&place.sequence.to_le_bytes());
    Nonce::assume_unique_for_key(bytes)
}

fn aad(keys: &SeedKeys, place: &ChunkPlace, len_bytes: usize) -> [u8; 36] {
    let mut out = [0u8; 36];
    out[..16].copy_from_slice(keys.seed_id());
    out[16..20].copy_from_slice(&place.disk.to_le_bytes());
    out[20..28].copy_from_slice(&place.offset_bytes.to_le_bytes());
    out[28..32].copy_from_slice(&(len_bytes as u32).to_le_bytes());
    out[32..36].copy_from_slice(&place.volume.to_le_bytes());
    out
}

/// Seals `data` (at most [`MAX_CHUNK_BYTES`]) for `place`.
pub fn seal(keys: &SeedKeys, place: &ChunkPlace, data: &[u8]) -> SealedChunk {
    assert!(
        data.len() <= MAX_CHUNK_BYTES,
        "chunk of {} bytes",
        data.len()
    );
    assert!(
        place.sequence < u64::MAX,
        "sequence u64::MAX is the manifest's"
    );
    let mut bytes = Vec::with_capacity(sealed_len(data.len()));
    bytes.extend_from_slice(data);
    let tag = keys
        .aead
        .seal_in_place_separate_tag(
            nonce(place),
            Aad::from(aad(keys, place, data.len())),
            &mut bytes,
        )
        .expect("AES-GCM seals any chunk of at most 1 MiB");
    bytes.extend_from_slice(tag.as_ref());
    bytes.resize(sealed_len(data.len()), 0);
    SealedChunk { bytes }
}

/// Seals the first `len_bytes` of `buf` (at most [`MAX_CHUNK_BYTES`]) for `place` in place:
/// the ciphertext over the data, the tag after it, zeros to [`sealed_len`]. `buf` must hold
/// `sealed_len(len_bytes)` bytes. The same bytes as [`seal`], without a copy (the export's
/// read buffer becomes the medium's write buffer).
pub fn seal_in_place(keys: &SeedKeys, place: &ChunkPlace, buf: &mut [u8], len_bytes: usize) {
    assert!(len_bytes <= MAX_CHUNK_BYTES, "chunk of {len_bytes} bytes");
    assert!(buf.len() >= sealed_len(len_bytes), "buffer too short");
    assert!(
        place.sequence < u64::MAX,
        "sequence u64::MAX is the manifest's"
    );
    let tag = keys
        .aead
        .seal_in_place_separate_tag(
            nonce(place),
            Aad::from(aad(keys, place, len_bytes)),
            &mut buf[..len_bytes],
        )
        .expect("AES-GCM seals any chunk of at most 1 MiB");
    buf[len_bytes..len_bytes + TAG_BYTES].copy_from_slice(tag.as_ref());
    buf[len_bytes + TAG_BYTES..sealed_len(len_bytes)].fill(0);
}

/// Opens a chunk read from the medium whose manifest says it holds `len_bytes` of data at
/// `place`; the plaintext, or why not.
pub fn open(
    keys: &SeedKeys,
    place: &ChunkPlace,
    len_bytes: usize,
    sealed: &[u8],
) -> Result<Vec<u8>, SeedError> {
    if len_bytes > MAX_CHUNK_BYTES || sealed.len() != sealed_len(len_bytes) {
        return Err(SeedError::Malformed {
            len_bytes: sealed.len(),
        });
    }
    let forged = SeedError::Forged {
        disk: place.disk,
        offset_bytes: place.offset_bytes,
        volume: place.volume,
    };
    // The padding is not under the tag: it must be zeros, so a medium carries nothing else.
    if sealed[len_bytes + TAG_BYTES..].iter().any(|&b| b != 0) {
        return Err(forged);
    }
    let mut bytes = sealed[..len_bytes + TAG_BYTES].to_vec();
    let opened = keys
        .aead
        .open_in_place(
            nonce(place),
            Aad::from(aad(keys, place, len_bytes)),
            &mut bytes,
        )
        .map_err(|_| forged)?;
    let len = opened.len();
    bytes.truncate(len);
    Ok(bytes)
}

/// Opens in place a chunk the manifest says holds `len_bytes` of data at `place`: `buf`
/// holds the sealed chunk (`sealed_len(len_bytes)` bytes) and, on Ok, its first
/// `len_bytes` are the plaintext (the importer writes them from the same aligned buffer).
pub fn open_in_place(
    keys: &SeedKeys,
    place: &ChunkPlace,
    len_bytes: usize,
    buf: &mut [u8],
) -> Result<(), SeedError> {
    if len_bytes > MAX_CHUNK_BYTES || buf.len() < sealed_len(len_bytes) {
        return Err(SeedError::Malformed {
            len_bytes: buf.len(),
        });
    }
    let forged = SeedError::Forged {
        disk: place.disk,
        offset_bytes: place.offset_bytes,
        volume: place.volume,
    };
    if buf[len_bytes + TAG_BYTES..sealed_len(len_bytes)]
        .iter()
        .any(|&b| b != 0)
    {
        return Err(forged);
    }
    keys.aead
        .open_in_place(
            nonce(place),
            Aad::from(aad(keys, place, len_bytes)),
            &mut buf[..len_bytes + TAG_BYTES],
        )
        .map(drop)
        .map_err(|_| forged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transfer::ClusterKey;

    fn keys(seed: u8) -> SeedKeys {
        SeedKeys::from_cluster(&ClusterKey::from_bytes([9; 32]), [seed; 16])
    }

    const PLACE: ChunkPlace = ChunkPlace {
        disk: 0,
        offset_bytes: 1 << 20,
        volume: 0,
        sequence: 5,
    };

    #[test]
    fn a_chunk_opens_only_at_its_place_under_its_seed() {
        // Goal: round trip, and every change of place, seed, byte or length is refused.
        // Method: seal 10 KiB, open as is, then with each field changed and bytes flipped.
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let sealed = seal(&keys(1), &PLACE, &data);
        assert_eq!(sealed.bytes.len() % ALIGN_BYTES, 0);
        assert_ne!(&sealed.bytes[..data.len()], &data[..], "encrypted");
        let opened = open(&keys(1), &PLACE, data.len(), &sealed.bytes).expect("opens");
        assert_eq!(opened, data);
        let moved = [
            ChunkPlace { disk: 1, ..PLACE },
            ChunkPlace {
                offset_bytes: 0,
                ..PLACE
            },
            ChunkPlace { volume: 1, ..PLACE },
            ChunkPlace {
                sequence: 6,
                ..PLACE
            },
        ];
        for place in moved {
            let err = open(&keys(1), &place, data.len(), &sealed.bytes).expect_err("moved");
            assert!(matches!(err, SeedError::Forged { .. }), "{place:?}");
        }
        assert!(open(&keys(2), &PLACE, data.len(), &sealed.bytes).is_err());
        for at in [
            0,
            data.len(),
            data.len() + TAG_BYTES,
            sealed.bytes.len() - 1,
        ] {
            let mut flipped = sealed.bytes.clone();
            flipped[at] ^= 1;
            assert!(
                open(&keys(1), &PLACE, data.len(), &flipped).is_err(),
                "byte {at}"
            );
        }
        let err = open(&keys(1), &PLACE, data.len() - 1, &sealed.bytes).expect_err("length");
        assert!(matches!(err, SeedError::Forged { .. }), "{err}");
        let err = open(&keys(1), &PLACE, data.len(), &sealed.bytes[..4096]).expect_err("short");
        assert!(matches!(err, SeedError::Malformed { .. }), "{err}");
    }

    #[test]
    fn sealing_in_place_gives_the_same_bytes() {
        // Goal: the exporter's in-place sealing writes what `open` reads. Method: seal 9 KiB
        // both ways, compare, open.
        let data: Vec<u8> = (0..9_000u32).map(|i| (i * 13) as u8).collect();
        let sealed = seal(&keys(3), &PLACE, &data);
        let mut buf = vec![0xEEu8; sealed_len(data.len())];
        buf[..data.len()].copy_from_slice(&data);
        seal_in_place(&keys(3), &PLACE, &mut buf, data.len());
        assert_eq!(buf, sealed.bytes);
        assert_eq!(
            open(&keys(3), &PLACE, data.len(), &buf).expect("opens"),
            data
        );
        open_in_place(&keys(3), &PLACE, data.len(), &mut buf).expect("opens in place");
        assert_eq!(&buf[..data.len()], &data[..]);
        let mut moved = sealed.bytes.clone();
        let elsewhere = ChunkPlace { disk: 2, ..PLACE };
        assert!(open_in_place(&keys(3), &elsewhere, data.len(), &mut moved).is_err());
    }

    #[test]
    fn sealed_lengths_are_aligned_and_tight() {
        // Goal: a chunk takes its bytes, its tag and padding to 4 KiB, no more.
        assert_eq!(sealed_len(0), 4096);
        assert_eq!(sealed_len(4096 - TAG_BYTES), 4096);
        assert_eq!(sealed_len(4096), 8192);
        assert_eq!(sealed_len(MAX_CHUNK_BYTES), MAX_CHUNK_BYTES + 4096);
    }
}
