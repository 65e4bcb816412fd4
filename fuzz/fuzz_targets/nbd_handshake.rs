//! Fuzzes the NBD option haggling: the fuzz input is everything the client sends; the server
//! side must end in transmission, an abort or an error, never panic, and never allocate more
//! than its option bound for one option. The first byte picks the listener: plaintext, or one
//! that requires TLS, where nothing about an export may be written before STARTTLS (the
//! options after it are haggled on the same bytes, as they would be inside TLS).
#![no_main]

use std::io::{self, Read, Write};

use ferry::nbd::handshake;
use ferry::nbd::wire::{ExportCatalog, ExportInfo, BLOCK_MAX_BYTES, BLOCK_PREFERRED_BYTES};
use libfuzzer_sys::fuzz_target;

/// The client's bytes as the read side; replies are kept for the checks.
struct Scripted<'a> {
    input: &'a [u8],
    written: Vec<u8>,
}

impl Read for Scripted<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Scripted<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // Bounded: only what the pre-TLS check needs is kept.
        let room: usize = 1 << 20;
        let keep = buf.len().min(room.saturating_sub(self.written.len()));
        self.written.extend_from_slice(&buf[..keep]);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct OneExport;

impl OneExport {
    fn info() -> ExportInfo {
        ExportInfo {
            name: "vm1".to_string(),
            description: "ferry export vm1".to_string(),
            size_bytes: 1 << 30,
            read_only: false,
            multi_conn: true,
            can_trim: true,
            can_fast_zero: true,
            block_min: 1,
            block_preferred: BLOCK_PREFERRED_BYTES,
            block_max: BLOCK_MAX_BYTES,
            meta_contexts: vec![
                "base:allocation".to_string(),
                "qemu:dirty-bitmap:backup".to_string(),
            ],
        }
    }
}

impl ExportCatalog for OneExport {
    fn list(&self) -> Vec<ExportInfo> {
        vec![Self::info()]
    }
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        (name == "vm1").then(Self::info)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, input)) = data.split_first() else {
        return;
    };
    let mut stream = Scripted {
        input,
        written: Vec::new(),
    };
    if selector & 1 == 0 {
        let _ = handshake::negotiate(&mut stream, &OneExport);
        return;
    }
    let Ok(greeting) = handshake::greet(&mut stream) else {
        return;
    };
    let started_tls = handshake::await_starttls(&mut stream, greeting);
    assert!(
        !stream.written.windows(3).any(|w| w == b"vm1"),
        "an export was named before STARTTLS"
    );
    if let Ok(true) = started_tls {
        let _ = handshake::haggle(
            &mut stream,
            &OneExport,
            greeting,
            handshake::Tls::Established,
        );
    }
});
