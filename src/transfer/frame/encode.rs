//! Encoding of block-stream frames into a caller-owned buffer (a Data frame's payload is
//! written by the caller after the header and meta).

use super::*;

/// Appends the header and meta of `frame` to `out`. A Data frame's payload is not included:
/// the caller writes its `len_bytes` right after.
///
/// Panics when the frame breaks a bound (a caller bug: names and messages are validated
/// where they enter, and the sender never builds a payload beyond [`MAX_DATA_BYTES`]).
pub fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let start = out.len();
    out.resize(start + HEADER_BYTES, 0);
    let (kind, data_len) = encode_meta(frame, out);
    let meta_len = out.len() - start - HEADER_BYTES;
    assert!(meta_len <= MAX_META_BYTES, "frame meta of {meta_len} bytes");
    assert!(data_len as usize <= MAX_DATA_BYTES, "payload of {data_len}");
    let meta_crc = crc32c::crc32c(&out[start + HEADER_BYTES..]);
    let head = &mut out[start..start + HEADER_BYTES];
    head[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    head[4] = VERSION;
    head[5] = kind;
    head[6..8].copy_from_slice(&0u16.to_be_bytes());
    let meta_len = u32::try_from(meta_len).expect("bounded above");
    head[8..12].copy_from_slice(&meta_len.to_be_bytes());
    head[12..16].copy_from_slice(&data_len.to_be_bytes());
    head[16..20].copy_from_slice(&meta_crc.to_be_bytes());
    let header_crc = crc32c::crc32c(&head[..20]);
    head[20..24].copy_from_slice(&header_crc.to_be_bytes());
    // Pair assertion: what we write is what decode accepts.
    debug_assert!(
        decode_header(&<[u8; HEADER_BYTES]>::try_from(&*head).expect("24 bytes")).is_ok()
    );
}

/// `frame` encoded under the header of protocol `version` (an older one): how a peer of that
/// version is told, in words it can read, why it is refused. Only for frames whose meta is
/// the same in that version (Error is, in every version so far).
pub fn encode_for_version(frame: &Frame, version: u8, out: &mut Vec<u8>) {
    let start = out.len();
    encode(frame, out);
    let head = &mut out[start..start + HEADER_BYTES];
    head[4] = version;
    let header_crc = crc32c::crc32c(&head[..20]);
    head[20..24].copy_from_slice(&header_crc.to_be_bytes());
}

/// Appends the meta of `frame`; returns its kind number and payload length.
fn encode_meta(frame: &Frame, out: &mut Vec<u8>) -> (u8, u32) {
    match frame {
        Frame::Hello {
            nonce,
            role,
            insecure,
            public,
        } => {
            out.push(role.to_wire());
            out.push(u8::from(*insecure));
            out.extend_from_slice(nonce);
            out.extend_from_slice(public);
            (kind::HELLO, 0)
        }
        Frame::Proof { mac } => {
            out.extend_from_slice(mac);
            (kind::PROOF, 0)
        }
        Frame::Open(spec) => {
            out.extend_from_slice(&spec.job_id.to_be_bytes());
            out.extend_from_slice(&spec.size_bytes.to_be_bytes());
            out.extend_from_slice(&spec.granularity_bytes.to_be_bytes());
            put_string(out, &spec.export, MAX_EXPORT_BYTES);
            out.push(u8::from(spec.batch.is_some()));
            if let Some(batch) = &spec.batch {
                put_string(out, batch, MAX_EXPORT_BYTES);
            }
            if let Some(holder) = &spec.holder {
                out.push(1);
                put_string(out, &holder.addr, MAX_MESSAGE_BYTES);
                out.extend_from_slice(&holder.job_id.to_be_bytes());
                out.extend_from_slice(&holder.moves.to_be_bytes());
            } else if spec.seed.is_some() || spec.manager_epoch.is_some() {
                out.push(0);
            }
            if let Some(seed) = &spec.seed {
                out.push(1);
                out.extend_from_slice(seed);
            } else if spec.manager_epoch.is_some() {
                out.push(0);
            }
            put_optional_epoch(out, spec.manager_epoch);
            (kind::OPEN, 0)
        }
        Frame::OpenOk {
            nbd_tcp,
            changed_outside,
        } => {
            put_optional_string(out, nbd_tcp.as_deref());
            if *changed_outside {
                out.push(1);
            }
            (kind::OPEN_OK, 0)
        }
        Frame::Data {
            offset_bytes,
            len_bytes,
            digest,
        } => {
            assert!(*len_bytes > 0, "empty Data frame");
            out.extend_from_slice(&offset_bytes.to_be_bytes());
            out.extend_from_slice(digest);
            (kind::DATA, *len_bytes)
        }
        Frame::Zero {
            offset_bytes,
            len_bytes,
        }
        | Frame::Trim {
            offset_bytes,
            len_bytes,
        } => {
            out.extend_from_slice(&offset_bytes.to_be_bytes());
            out.extend_from_slice(&len_bytes.to_be_bytes());
            let kind = if matches!(frame, Frame::Zero { .. }) {
                kind::ZERO
            } else {
                kind::TRIM
            };
            (kind, 0)
        }
        Frame::Commit { seq, manager_epoch } => {
            out.extend_from_slice(&seq.to_be_bytes());
            put_optional_epoch(out, *manager_epoch);
            (kind::COMMIT, 0)
        }
        Frame::Sync { seq }
        | Frame::CommitOk { seq }
        | Frame::Verify { seq }
        | Frame::Fence { seq }
        | Frame::FenceOk { seq } => {
            out.extend_from_slice(&seq.to_be_bytes());
            let kind = match frame {
                Frame::Sync { .. } => kind::SYNC,
                Frame::Verify { .. } => kind::VERIFY,
                Frame::Fence { .. } => kind::FENCE,
                Frame::FenceOk { .. } => kind::FENCE_OK,
                _ => kind::COMMIT_OK,
            };
            (kind, 0)
        }
        Frame::VerifyOk { seq, digest } => {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(digest);
            (kind::VERIFY_OK, 0)
        }
        Frame::SyncOk {
            seq,
            received_blocks,
        } => {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&received_blocks.to_be_bytes());
            (kind::SYNC_OK, 0)
        }
        Frame::Abort => (kind::ABORT, 0),
        Frame::Digests {
            seq,
            offset_bytes,
            block_bytes,
            count,
        } => {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&offset_bytes.to_be_bytes());
            out.extend_from_slice(&block_bytes.to_be_bytes());
            out.extend_from_slice(&count.to_be_bytes());
            (kind::DIGESTS, 0)
        }
        Frame::DigestsOk { seq, digests } => {
            assert!(
                digests.len() <= MAX_DIGESTS as usize,
                "{} digests",
                digests.len()
            );
            out.extend_from_slice(&seq.to_be_bytes());
            let count = u32::try_from(digests.len()).expect("bounded above");
            out.extend_from_slice(&count.to_be_bytes());
            for digest in digests {
                out.extend_from_slice(digest);
            }
            (kind::DIGESTS_OK, 0)
        }
        Frame::Query { job_id, finalize } => {
            out.extend_from_slice(&job_id.to_be_bytes());
            out.push(u8::from(*finalize));
            (kind::QUERY, 0)
        }
        Frame::QueryOk {
            job_id,
            state,
            received_blocks,
            nbd_tcp,
        } => {
            out.extend_from_slice(&job_id.to_be_bytes());
            out.push(state.to_wire());
            out.extend_from_slice(&received_blocks.to_be_bytes());
            put_optional_string(out, nbd_tcp.as_deref());
            (kind::QUERY_OK, 0)
        }
        Frame::Repoint(repoint) => {
            out.extend_from_slice(&repoint.job_id.to_be_bytes());
            out.extend_from_slice(&repoint.size_bytes.to_be_bytes());
            out.extend_from_slice(&repoint.moves.to_be_bytes());
            put_string(out, &repoint.export, MAX_EXPORT_BYTES);
            put_string(out, &repoint.nbd_tcp, MAX_MESSAGE_BYTES);
            (kind::REPOINT, 0)
        }
        Frame::Mark { seq, at_unix_ms } => {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(&at_unix_ms.to_be_bytes());
            (kind::MARK, 0)
        }
        Frame::MarkOk { seq } => {
            out.extend_from_slice(&seq.to_be_bytes());
            (kind::MARK_OK, 0)
        }
        Frame::RepointOk { job_id, outcome } => {
            out.extend_from_slice(&job_id.to_be_bytes());
            out.push(outcome.to_wire());
            (kind::REPOINT_OK, 0)
        }
        Frame::Error {
            code,
            offset_bytes,
            message,
        } => {
            out.extend_from_slice(&code.to_wire().to_be_bytes());
            out.extend_from_slice(&offset_bytes.to_be_bytes());
            put_string(
                out,
                truncate_utf8(message, MAX_MESSAGE_BYTES),
                MAX_MESSAGE_BYTES,
            );
            (kind::ERROR, 0)
        }
    }
}

/// Appends a trailing manager epoch (nothing when absent).
fn put_optional_epoch(out: &mut Vec<u8>, epoch: Option<u64>) {
    if let Some(epoch) = epoch {
        out.push(1);
        out.extend_from_slice(&epoch.to_be_bytes());
    }
}

fn put_optional_string(out: &mut Vec<u8>, text: Option<&str>) {
    out.push(u8::from(text.is_some()));
    if let Some(text) = text {
        put_string(out, text, MAX_MESSAGE_BYTES);
    }
}

fn put_string(out: &mut Vec<u8>, text: &str, max_bytes: usize) {
    assert!(text.len() <= max_bytes, "string of {} bytes", text.len());
    let len = u16::try_from(text.len()).expect("bounded strings fit in u16");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(text.as_bytes());
}
