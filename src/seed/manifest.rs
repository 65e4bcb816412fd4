//! The manifest of a seed volume: which disks the volume carries, and for each the extents of
//! its part, in disk order, with where each data chunk lies on the volume.
//!
//! Encoding (little-endian, before sealing):
//!
//! | bytes | field |
//! | --- | --- |
//! | 4 | encoding version (1) |
//! | 16 | seed id |
//! | 1 + n | source agent (length, UTF-8, at most 255 bytes) |
//! | 4, 4 | volume, volume count (0 until known) |
//! | 4 | disk count, then per disk: |
//! | 4 | disk index |
//! | 1 + n | export name ([`crate::name`] rule) |
//! | 8, 4 | disk size, block size (4096) |
//! | 8 | job id |
//! | 1 + n | tracker name ([`crate::name`] rule) |
//! | 8 | tracker generation |
//! | 8, 8 | start and end times (Unix ms) |
//! | 8, 8 | first and end offset of the disk's part on this volume (end exclusive) |
//! | 4 | extent count, then per extent: kind (1: 0 zero, 1 data), disk offset (8), length (4), and for data: volume offset (8), chunk sequence (8), digest (32) |
//!
//! Sealed: `AES-256-GCM(nonce = volume ‖ u64::MAX, AAD = seed id ‖ volume)` of the encoding,
//! its tag, then the keyed BLAKE3 MAC (manifest MAC key) of ciphertext and tag, in clear.
//! The header records this unpadded length; on the volume it is padded with zeros to 4 KiB.
//!
//! Invariants:
//! - [`decode`] checks every count against the bytes left (divided by the smallest record)
//!   before it reserves memory, and every string's length before it reads it.
//! - A decoded manifest is consistent: each disk's extents are in order and contiguous and
//!   cover exactly `[first, end)` of the disk; only the disk's last extent may end unaligned,
//!   at the disk's size; data extents are at most one chunk; chunks lie inside the volume's
//!   data region (after the header, before the manifest), in volume order without overlap,
//!   with strictly increasing sequences below the reserved ones; disk indexes are distinct.
//! - [`open`] checks the MAC before decrypting, decrypts before decoding, and bounds the
//!   length first ([`MAX_MANIFEST_BYTES`]).

use ring::aead::{Aad, Nonce};

use super::chunk::{self, ALIGN_BYTES, MAX_CHUNK_BYTES, TAG_BYTES};
use super::header::HEADER_BYTES;
use super::{keys, FormatError, SeedKeys};
use crate::codec::{CodecError, Reader};

mod coverage;
#[cfg(test)]
mod tests;

pub use coverage::{check_coverage, data_chunks, ExtentBuilder, MAX_LISTED_MISSING};

/// Encoding version of the manifest.
pub const ENCODING_VERSION: u32 = 1;
/// Block size of every disk in a seed.
pub const BLOCK_BYTES: u32 = 4096;
/// Longest sealed manifest accepted: 1 GiB. It is read and decrypted whole in memory, and at
/// about 61 bytes per 1 MiB data extent this describes over 16 TiB of data per volume.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;
/// Longest zero extent: the largest multiple of 4096 that fits the u32 length field.
pub const MAX_ZERO_EXTENT_BYTES: u32 = !(BLOCK_BYTES - 1);
/// Bytes of the MAC after a sealed manifest's ciphertext and tag.
pub const MAC_BYTES: usize = 32;
/// Chunk sequences at and above this are reserved (header, manifest).
pub const FIRST_RESERVED_SEQUENCE: u64 = u64::MAX - 1;

/// Smallest encoded disk record (empty strings, no extents): bounds the disk count.
const MIN_DISK_BYTES: usize = 4 + 1 + 8 + 4 + 8 + 1 + 8 * 6 + 4;
/// Smallest encoded extent (a zero extent): bounds the extent count.
const MIN_EXTENT_BYTES: usize = 1 + 8 + 4;
const KIND_ZERO: u8 = 0;
const KIND_DATA: u8 = 1;

/// What one volume carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The seed.
    pub seed_id: [u8; 16],
    /// The agent that wrote the seed (at most 255 bytes).
    pub source_agent: String,
    /// This volume's number.
    pub volume: u32,
    /// Volumes in the seed; 0 until known (only the last volume's manifest knows it).
    pub volume_count: u32,
    /// The disks with a part on this volume.
    pub disks: Vec<DiskManifest>,
}

/// One disk's part on a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskManifest {
    /// Index of the disk in the seed (bound into each chunk's AAD).
    pub index: u32,
    /// Export name.
    pub export: String,
    /// Size of the disk.
    pub size_bytes: u64,
    /// Block size ([`BLOCK_BYTES`]).
    pub block_bytes: u32,
    /// The export job's id on the source agent.
    pub job_id: u64,
    /// The seed tracker's name.
    pub tracker: String,
    /// The tracker's generation: a random id of one tracker lifetime.
    pub tracker_generation: u64,
    /// When the tracker was created, before the first block was read (Unix ms).
    pub start_unix_ms: u64,
    /// When the disk's last extent was read (Unix ms).
    pub end_unix_ms: u64,
    /// Where this volume's part of the disk starts.
    pub first_offset_bytes: u64,
    /// Where it ends (exclusive); the extents cover exactly `[first, end)`.
    pub end_offset_bytes: u64,
    /// The extents, in disk order.
    pub extents: Vec<Extent>,
}

/// A range of a disk and where its bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start on the disk.
    pub offset_bytes: u64,
    /// Length (a multiple of 4096, except a disk's last extent ending at its size).
    pub len_bytes: u32,
    /// Zeros, or a chunk on the volume.
    pub kind: ExtentKind,
}

/// What an extent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// All zeros: nothing on the volume.
    Zero,
    /// A sealed chunk on the volume.
    Data {
        /// Where the chunk starts on the volume (4 KiB aligned).
        volume_offset_bytes: u64,
        /// The chunk's sequence (its nonce) on the volume.
        sequence: u64,
        /// Keyed BLAKE3 digest of the plaintext ([`SeedKeys::digest`]).
        digest: [u8; 32],
    },
}

impl Extent {
    /// End of the extent on the disk (exclusive).
    pub fn end_bytes(&self) -> u64 {
        self.offset_bytes + u64::from(self.len_bytes)
    }
}

/// The manifest's plain encoding (see the module docs).
pub fn encode(manifest: &Manifest) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&ENCODING_VERSION.to_le_bytes());
    out.extend_from_slice(&manifest.seed_id);
    put_str(&mut out, &manifest.source_agent);
    out.extend_from_slice(&manifest.volume.to_le_bytes());
    out.extend_from_slice(&manifest.volume_count.to_le_bytes());
    out.extend_from_slice(&len_u32(manifest.disks.len()).to_le_bytes());
    for disk in &manifest.disks {
        encode_disk(&mut out, disk);
    }
    out
}

fn encode_disk(out: &mut Vec<u8>, disk: &DiskManifest) {
    out.extend_from_slice(&disk.index.to_le_bytes());
    put_str(out, &disk.export);
    out.extend_from_slice(&disk.size_bytes.to_le_bytes());
    out.extend_from_slice(&disk.block_bytes.to_le_bytes());
    out.extend_from_slice(&disk.job_id.to_le_bytes());
    put_str(out, &disk.tracker);
    for value in [
        disk.tracker_generation,
        disk.start_unix_ms,
        disk.end_unix_ms,
        disk.first_offset_bytes,
        disk.end_offset_bytes,
    ] {
        out.extend_from_slice(&value.to_le_bytes());
    }
    out.extend_from_slice(&len_u32(disk.extents.len()).to_le_bytes());
    for extent in &disk.extents {
        let kind = match extent.kind {
            ExtentKind::Zero => KIND_ZERO,
            ExtentKind::Data { .. } => KIND_DATA,
        };
        out.push(kind);
        out.extend_from_slice(&extent.offset_bytes.to_le_bytes());
        out.extend_from_slice(&extent.len_bytes.to_le_bytes());
        if let ExtentKind::Data {
            volume_offset_bytes,
            sequence,
            digest,
        } = extent.kind
        {
            out.extend_from_slice(&volume_offset_bytes.to_le_bytes());
            out.extend_from_slice(&sequence.to_le_bytes());
            out.extend_from_slice(&digest);
        }
    }
}

fn put_str(out: &mut Vec<u8>, text: &str) {
    let len = u8::try_from(text.len()).expect("manifest strings are at most 255 bytes");
    out.push(len);
    out.extend_from_slice(text.as_bytes());
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).expect("manifest counts fit u32")
}

fn truncated(_: CodecError) -> FormatError {
    FormatError::Truncated { what: "manifest" }
}

/// Decodes and checks a manifest whose volume holds it at `manifest_offset_bytes` (the end
/// of the data region); see the module docs for what is checked.
pub fn decode(bytes: &[u8], manifest_offset_bytes: u64) -> Result<Manifest, FormatError> {
    let mut reader = Reader::new(bytes);
    let version = reader.u32_le().map_err(truncated)?;
    if version != ENCODING_VERSION {
        return Err(FormatError::UnsupportedVersion { found: version });
    }
    let seed_id = reader.array::<16>().map_err(truncated)?;
    let source_agent = get_str(&mut reader, "source agent")?;
    let volume = reader.u32_le().map_err(truncated)?;
    let volume_count = reader.u32_le().map_err(truncated)?;
    if volume_count != 0 && volume >= volume_count {
        return Err(FormatError::invalid("volume beyond the volume count"));
    }
    let disk_count = bounded_count(&mut reader, MIN_DISK_BYTES)?;
    let mut disks = Vec::with_capacity(disk_count);
    let mut chunks = ChunkOrder::new(manifest_offset_bytes);
    for _ in 0..disk_count {
        let disk = decode_disk(&mut reader, &mut chunks)?;
        if disks.iter().any(|d: &DiskManifest| d.index == disk.index) {
            return Err(FormatError::invalid(format!(
                "disk index {} twice",
                disk.index
            )));
        }
        disks.push(disk);
    }
    if !reader.is_empty() {
        return Err(FormatError::invalid("bytes after the last disk"));
    }
    Ok(Manifest {
        seed_id,
        source_agent,
        volume,
        volume_count,
        disks,
    })
}

/// A count field, refused when the bytes left cannot hold that many records of `min_bytes`.
fn bounded_count(reader: &mut Reader<'_>, min_bytes: usize) -> Result<usize, FormatError> {
    let count = reader.u32_le().map_err(truncated)?;
    let count = usize::try_from(count).map_err(|_| FormatError::invalid("count"))?;
    if count > reader.remaining() / min_bytes {
        return Err(FormatError::invalid(format!(
            "count {count} exceeds the bytes left"
        )));
    }
    Ok(count)
}

fn get_str(reader: &mut Reader<'_>, what: &str) -> Result<String, FormatError> {
    let len = reader.u8().map_err(truncated)?;
    let bytes = reader.bytes(usize::from(len)).map_err(truncated)?;
    String::from_utf8(bytes.to_vec())
        .map_err(|_| FormatError::invalid(format!("{what} is not UTF-8")))
}

fn get_name(reader: &mut Reader<'_>, what: &str) -> Result<String, FormatError> {
    let name = get_str(reader, what)?;
    crate::name::validate(&name).map_err(|err| FormatError::invalid(format!("{what}: {err}")))?;
    Ok(name)
}

fn decode_disk(
    reader: &mut Reader<'_>,
    chunks: &mut ChunkOrder,
) -> Result<DiskManifest, FormatError> {
    let index = reader.u32_le().map_err(truncated)?;
    let export = get_name(reader, "export")?;
    let size_bytes = reader.u64_le().map_err(truncated)?;
    let block_bytes = reader.u32_le().map_err(truncated)?;
    let job_id = reader.u64_le().map_err(truncated)?;
    let tracker = get_name(reader, "tracker")?;
    let mut next = || reader.u64_le().map_err(truncated);
    let (tracker_generation, start_unix_ms, end_unix_ms) = (next()?, next()?, next()?);
    let (first_offset_bytes, end_offset_bytes) = (next()?, next()?);
    let mut disk = DiskManifest {
        index,
        export,
        size_bytes,
        block_bytes,
        job_id,
        tracker,
        tracker_generation,
        start_unix_ms,
        end_unix_ms,
        first_offset_bytes,
        end_offset_bytes,
        extents: Vec::new(),
    };
    check_disk_fields(&disk)?;
    let count = bounded_count(reader, MIN_EXTENT_BYTES)?;
    disk.extents.reserve_exact(count);
    let mut at_bytes = first_offset_bytes;
    for _ in 0..count {
        let extent = decode_extent(reader)?;
        check_extent(&disk, &extent, at_bytes, chunks)?;
        at_bytes = extent.end_bytes();
        disk.extents.push(extent);
    }
    if at_bytes != end_offset_bytes {
        return Err(disk_invalid(&disk, "extents do not reach the part's end"));
    }
    Ok(disk)
}

fn disk_invalid(disk: &DiskManifest, what: &str) -> FormatError {
    FormatError::invalid(format!("disk {} ({}): {what}", disk.index, disk.export))
}

fn check_disk_fields(disk: &DiskManifest) -> Result<(), FormatError> {
    let block = u64::from(BLOCK_BYTES);
    if disk.block_bytes != BLOCK_BYTES {
        return Err(disk_invalid(disk, "block size is not 4096"));
    }
    if disk.start_unix_ms > disk.end_unix_ms {
        return Err(disk_invalid(disk, "ends before it starts"));
    }
    let (first, end) = (disk.first_offset_bytes, disk.end_offset_bytes);
    if first > end || end > disk.size_bytes || first % block != 0 {
        return Err(disk_invalid(disk, "part outside the disk"));
    }
    if end % block != 0 && end != disk.size_bytes {
        return Err(disk_invalid(
            disk,
            "part ends unaligned before the disk's end",
        ));
    }
    Ok(())
}

fn decode_extent(reader: &mut Reader<'_>) -> Result<Extent, FormatError> {
    let kind = reader.u8().map_err(truncated)?;
    let offset_bytes = reader.u64_le().map_err(truncated)?;
    let len_bytes = reader.u32_le().map_err(truncated)?;
    let kind = match kind {
        KIND_ZERO => ExtentKind::Zero,
        KIND_DATA => ExtentKind::Data {
            volume_offset_bytes: reader.u64_le().map_err(truncated)?,
            sequence: reader.u64_le().map_err(truncated)?,
            digest: reader.array::<32>().map_err(truncated)?,
        },
        _ => return Err(FormatError::invalid("extent kind")),
    };
    Ok(Extent {
        offset_bytes,
        len_bytes,
        kind,
    })
}

/// Checks one extent at `at_bytes` of `disk`'s part, and its chunk against the ones before.
fn check_extent(
    disk: &DiskManifest,
    extent: &Extent,
    at_bytes: u64,
    chunks: &mut ChunkOrder,
) -> Result<(), FormatError> {
    if extent.offset_bytes != at_bytes {
        return Err(disk_invalid(
            disk,
            "extents out of order, overlapping or with a gap",
        ));
    }
    let end = at_bytes.checked_add(u64::from(extent.len_bytes));
    if extent.len_bytes == 0 || end.is_none_or(|end| end > disk.end_offset_bytes) {
        return Err(disk_invalid(disk, "extent empty or past the part's end"));
    }
    let aligned = extent.len_bytes % BLOCK_BYTES == 0;
    if !aligned && end != Some(disk.size_bytes) {
        return Err(disk_invalid(disk, "unaligned extent before the disk's end"));
    }
    if let ExtentKind::Data {
        volume_offset_bytes,
        sequence,
        ..
    } = extent.kind
    {
        if extent.len_bytes as usize > MAX_CHUNK_BYTES {
            return Err(disk_invalid(disk, "data extent longer than a chunk"));
        }
        let sealed_bytes = chunk::sealed_len(extent.len_bytes as usize) as u64;
        chunks
            .take(volume_offset_bytes, sealed_bytes, sequence)
            .map_err(|what| disk_invalid(disk, what))?;
    }
    Ok(())
}

/// The chunks of a volume seen so far: the next must start after the last one's end and
/// carry a greater sequence, and all lie between the header and the manifest.
#[derive(Debug)]
struct ChunkOrder {
    next_offset_bytes: u64,
    next_sequence: u64,
    data_end_bytes: u64,
}

impl ChunkOrder {
    fn new(manifest_offset_bytes: u64) -> Self {
        Self {
            next_offset_bytes: HEADER_BYTES as u64,
            next_sequence: 0,
            data_end_bytes: manifest_offset_bytes,
        }
    }

    fn take(
        &mut self,
        offset_bytes: u64,
        len_bytes: u64,
        sequence: u64,
    ) -> Result<(), &'static str> {
        if offset_bytes % ALIGN_BYTES as u64 != 0 {
            return Err("chunk not aligned on the volume");
        }
        if offset_bytes < self.next_offset_bytes {
            return Err("chunk before the data region or overlapping the previous one");
        }
        let end = offset_bytes.checked_add(len_bytes);
        if end.is_none_or(|end| end > self.data_end_bytes) {
            return Err("chunk past the data region");
        }
        if sequence < self.next_sequence || sequence >= FIRST_RESERVED_SEQUENCE {
            return Err("chunk sequence not increasing or reserved");
        }
        self.next_offset_bytes = offset_bytes + len_bytes;
        self.next_sequence = sequence + 1;
        Ok(())
    }
}

fn nonce(volume: u32) -> Nonce {
    let mut bytes = [0u8; 12];
    bytes[..4].copy_from_slice(&volume.to_le_bytes());
    bytes[4..].copy_from_slice(&u64::MAX.to_le_bytes());
    Nonce::assume_unique_for_key(bytes)
}

fn aad(seed_id: &[u8; 16], volume: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[..16].copy_from_slice(seed_id);
    out[16..].copy_from_slice(&volume.to_le_bytes());
    out
}

/// The manifest sealed for its volume: ciphertext, tag and MAC (unpadded; see
/// [`padded_len`]). A volume's manifest is sealed once: its nonce is the volume's last.
pub fn seal(keys: &SeedKeys, manifest: &Manifest) -> Vec<u8> {
    assert_eq!(
        &manifest.seed_id,
        keys.seed_id(),
        "manifest of another seed"
    );
    let mut bytes = encode(manifest);
    let tag = keys
        .aead
        .seal_in_place_separate_tag(
            nonce(manifest.volume),
            Aad::from(aad(keys.seed_id(), manifest.volume)),
            &mut bytes,
        )
        .expect("AES-GCM seals a manifest of at most 1 GiB");
    bytes.extend_from_slice(tag.as_ref());
    let mac = keys.manifest_mac(&bytes);
    bytes.extend_from_slice(&mac);
    assert!(
        bytes.len() as u64 <= MAX_MANIFEST_BYTES,
        "manifest too long"
    );
    bytes
}

/// Bytes a sealed manifest of `len_bytes` takes on the volume (padded to 4 KiB).
pub fn padded_len(len_bytes: u64) -> u64 {
    len_bytes.div_ceil(ALIGN_BYTES as u64) * ALIGN_BYTES as u64
}

/// Opens the sealed manifest of `volume` (exactly the header's length, no padding) that its
/// volume holds at `manifest_offset_bytes`: MAC, then decryption, then [`decode`], then the
/// seed and volume against the keys and the header.
pub fn open(
    keys: &SeedKeys,
    volume: u32,
    bytes: &[u8],
    manifest_offset_bytes: u64,
) -> Result<Manifest, FormatError> {
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(FormatError::ManifestTooLong {
            len_bytes: bytes.len() as u64,
            max_bytes: MAX_MANIFEST_BYTES,
        });
    }
    let Some(sealed_len) = bytes
        .len()
        .checked_sub(MAC_BYTES)
        .filter(|&len| len >= TAG_BYTES)
    else {
        return Err(FormatError::Truncated { what: "manifest" });
    };
    let (sealed, mac) = bytes.split_at(sealed_len);
    let mac: [u8; 32] = mac.try_into().expect("32 bytes split off");
    if !keys::mac_eq(&mac, &keys.manifest_mac(sealed)) {
        return Err(FormatError::ManifestDamaged);
    }
    let mut plain = sealed.to_vec();
    let opened = keys
        .aead
        .open_in_place(
            nonce(volume),
            Aad::from(aad(keys.seed_id(), volume)),
            &mut plain,
        )
        .map_err(|_| FormatError::ManifestForged)?;
    let manifest = decode(opened, manifest_offset_bytes)?;
    if manifest.seed_id != *keys.seed_id() || manifest.volume != volume {
        return Err(FormatError::invalid(
            "seed id or volume differs from the header",
        ));
    }
    Ok(manifest)
}
