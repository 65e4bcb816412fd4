//! Fuzzes the NBD transmission-phase request parser and its validation against an export:
//! any 28 bytes (plus a flag byte choosing the export's shape) must parse or be refused,
//! never panic, and a validated request must lie inside the export.
#![no_main]

use ferry::nbd::wire::{self, ExportInfo, REQUEST_BYTES};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((shape, rest)) = data.split_first() else {
        return;
    };
    let Some(bytes) = rest.get(..REQUEST_BYTES) else {
        return;
    };
    let bytes: &[u8; REQUEST_BYTES] = bytes.try_into().expect("length checked");
    let Ok(header) = wire::parse_request(bytes) else {
        return;
    };
    let export = ExportInfo {
        name: "fuzz".to_string(),
        description: String::new(),
        size_bytes: if shape & 1 == 0 {
            1 << 30
        } else {
            (1 << 20) + 511
        },
        read_only: shape & 2 != 0,
        multi_conn: true,
        can_trim: shape & 4 != 0,
        can_fast_zero: shape & 8 != 0,
        block_min: if shape & 16 == 0 { 1 } else { 512 },
        block_preferred: wire::BLOCK_PREFERRED_BYTES,
        block_max: wire::BLOCK_MAX_BYTES,
        meta_contexts: vec!["base:allocation".to_string()],
    };
    let structured = shape & 32 != 0;
    if let Ok(command) = wire::validate(&header, &export, structured) {
        if command.writes() && export.read_only {
            panic!("a write was validated on a read-only export");
        }
    }
});
