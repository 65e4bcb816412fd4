//! Fuzzes the journal's decoding (a state file is hostile input): a record body through the
//! record decoder (past the frame checksums, so every kind's fields are reached; a decoded
//! record re-encodes to the same record), or whole file contents through replay and fold.
//! Every outcome is a value or a typed error, never a panic.
#![no_main]

use ferry::journal::file::Journal;
use ferry::journal::record::Record;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector & 1 == 0 {
        if let Ok(record) = Record::decode(rest) {
            let mut again = Vec::new();
            record.encode(&mut again);
            let round = Record::decode(&again).expect("an encoded record decodes");
            assert_eq!(format!("{record:?}"), format!("{round:?}"));
        }
    } else {
        let _ = Journal::replay_bytes(rest);
    }
});
