//! Fuzzes the block stream's frame decoder: as bytes off the wire (`decode`, and header then
//! meta as the receiver reads them), and past the checksums (a header built for the fuzz
//! input's meta, so the meta parser of every kind is reached). Never a panic, never a meta
//! beyond the header's bound, and a decoded frame re-encodes to one that decodes the same.
#![no_main]

use ferry::transfer::frame::{self, HEADER_BYTES, MAX_META_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector & 0x80 == 0 {
        past_the_checksums(selector, rest);
    } else {
        off_the_wire(rest);
    }
});

/// The meta parser of kind `selector`, reached through a header with valid checksums built
/// for `meta` (a Data frame announces one payload byte, as a real one announces its length).
fn past_the_checksums(selector: u8, meta: &[u8]) {
    let meta = &meta[..meta.len().min(MAX_META_BYTES)];
    let kind = selector % 32;
    let data_len: u32 = if kind == 5 { 1 } else { 0 };
    let mut head = [0u8; HEADER_BYTES];
    head[0..4].copy_from_slice(&frame::MAGIC.to_be_bytes());
    head[4] = frame::VERSION;
    head[5] = kind;
    head[8..12].copy_from_slice(&(meta.len() as u32).to_be_bytes());
    head[12..16].copy_from_slice(&data_len.to_be_bytes());
    head[16..20].copy_from_slice(&crc32c::crc32c(meta).to_be_bytes());
    let head_crc = crc32c::crc32c(&head[..20]);
    head[20..24].copy_from_slice(&head_crc.to_be_bytes());
    let Ok(header) = frame::decode_header(&head) else {
        return;
    };
    if let Ok(decoded) = frame::decode_meta(&header, meta) {
        round_trip(&decoded);
    }
}

fn off_the_wire(data: &[u8]) {
    if let Ok((decoded, _used)) = frame::decode(data) {
        round_trip(&decoded);
    }
    let Some(head) = data.get(..HEADER_BYTES) else {
        return;
    };
    let head: &[u8; HEADER_BYTES] = head.try_into().expect("length checked");
    if let Ok(header) = frame::decode_header(head) {
        assert!(header.meta_len as usize <= MAX_META_BYTES);
        let meta = &data[HEADER_BYTES..];
        let _ = frame::decode_meta(&header, &meta[..meta.len().min(header.meta_len as usize)]);
    }
}

fn round_trip(decoded: &frame::Frame) {
    let mut again = Vec::new();
    frame::encode(decoded, &mut again);
    match frame::decode(&again) {
        Ok((round, _)) => assert_eq!(format!("{decoded:?}"), format!("{round:?}")),
        // A Data frame's encoding carries no payload here; anything else must decode.
        Err(err) => assert!(matches!(decoded, frame::Frame::Data { .. }), "{err}"),
    }
}
