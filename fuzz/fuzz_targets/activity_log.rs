//! Fuzzes the activity log's replay (a log file is hostile input): arbitrary records after a
//! valid header of a small geometry (so records are reached), or arbitrary whole files.
//! Every outcome is a value or a typed error, never a panic, and a replay never marks a
//! block past the disk.
#![no_main]

use std::path::Path;

use ferry::dirty::logfile::{encode_header, replay_bytes, Geometry};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let granularity_bytes = 4096u64 << (selector % 4);
    let geometry = Geometry {
        granularity_bytes,
        disk_bytes: u64::from(selector >> 2) * (1 << 20) + 12345,
        extent_blocks: (4 << 20) / granularity_bytes.min(64 << 10),
    };
    let path = Path::new("fuzz.log");
    let replayed = if selector & 0x80 == 0 {
        let mut bytes = encode_header(&geometry);
        bytes.extend_from_slice(rest);
        replay_bytes(&bytes, &geometry, path)
    } else {
        replay_bytes(rest, &geometry, path)
    };
    if let Ok(replayed) = replayed {
        assert!(replayed.set.block_count() == geometry.block_count());
        assert!(replayed.set.iter_blocks().all(|b| b < geometry.block_count()));
    }
});
