//! Fuzzes the decoders of a seed medium (a medium is hostile input): the manifest's decoder,
//! on arbitrary bytes or after a valid version field (so the fields behind it are reached),
//! and the volume header's clear decoder and verification. Never a panic; a decoded manifest
//! re-encodes to exactly the input and goes through the coverage check without panicking;
//! a decoded header, given the fuzzer's key, re-encodes to one that verifies as itself.
#![no_main]

use ferry::seed::{check_coverage, header, manifest, SeedKeys};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    match selector % 3 {
        0 => fuzz_manifest(selector, rest),
        1 => {
            let mut bytes = manifest::ENCODING_VERSION.to_le_bytes().to_vec();
            bytes.extend_from_slice(rest);
            fuzz_manifest(selector, &bytes);
        }
        _ => fuzz_header(rest),
    }
});

fn fuzz_manifest(selector: u8, bytes: &[u8]) {
    // The data region's end: small, large, or unbounded, picked by the selector.
    let manifest_offset_bytes = match selector >> 6 {
        0 => 4096,
        1 => 1 << 20,
        2 => 1 << 40,
        _ => u64::MAX,
    };
    if let Ok(decoded) = manifest::decode(bytes, manifest_offset_bytes) {
        assert_eq!(manifest::encode(&decoded), bytes, "encoding is canonical");
        let _ = check_coverage(std::slice::from_ref(&decoded));
    }
}

fn fuzz_header(bytes: &[u8]) {
    let keys = SeedKeys::from_seed_key([7; 32], [1; 16]);
    let clear = header::decode_clear(bytes);
    if let Ok(verified) = header::verify(bytes, &keys) {
        assert_eq!(clear.as_ref().ok(), Some(&verified));
    }
    if let Ok(decoded) = clear {
        let ours = header::Header {
            seed_id: *keys.seed_id(),
            key_check: keys.check_value(),
            ..decoded
        };
        let encoded = header::encode(&ours, &keys);
        assert_eq!(header::verify(&encoded, &keys).ok(), Some(ours));
    }
}
