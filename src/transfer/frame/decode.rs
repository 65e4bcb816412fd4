//! Decoding of block-stream frames: header first (checksum, then magic, version, kind and
//! bounds), then the kind's meta fields, each bounded before it is read; never panics.

use super::*;

/// Decodes and verifies a header: checksum first (a corrupt header is never misread), then
/// magic, version, kind and bounds.
pub fn decode_header(bytes: &[u8; HEADER_BYTES]) -> Result<FrameHeader, FrameError> {
    if crc32c::crc32c(&bytes[..20]) != be_u32(&bytes[20..24]) {
        // A wrong magic with a matching checksum is someone else's protocol; report that.
        return Err(if be_u32(&bytes[0..4]) != MAGIC {
            FrameError::BadMagic
        } else {
            FrameError::HeaderChecksum
        });
    }
    if be_u32(&bytes[0..4]) != MAGIC {
        return Err(FrameError::BadMagic);
    }
    if bytes[4] != VERSION {
        return Err(FrameError::BadVersion(bytes[4]));
    }
    let header = FrameHeader {
        kind: bytes[5],
        meta_len: be_u32(&bytes[8..12]),
        data_len: be_u32(&bytes[12..16]),
        meta_crc: be_u32(&bytes[16..20]),
    };
    if !(kind::HELLO..=kind::MARK_OK).contains(&header.kind) {
        return Err(FrameError::UnknownKind(header.kind));
    }
    if be_u16(&bytes[6..8]) != 0 {
        return Err(FrameError::BadField("flags"));
    }
    if header.meta_len as usize > MAX_META_BYTES {
        return Err(FrameError::TooLong("meta"));
    }
    if header.data_len as usize > MAX_DATA_BYTES {
        return Err(FrameError::TooLong("payload"));
    }
    if (header.kind == kind::DATA) != (header.data_len > 0) {
        return Err(FrameError::BadField("payload length"));
    }
    Ok(header)
}

/// Decodes the meta section of a frame whose header was accepted by [`decode_header`].
pub fn decode_meta(header: &FrameHeader, meta: &[u8]) -> Result<Frame, FrameError> {
    if meta.len() != header.meta_len as usize {
        return Err(FrameError::Truncated);
    }
    if crc32c::crc32c(meta) != header.meta_crc {
        return Err(FrameError::MetaChecksum);
    }
    let mut fields = codec::Reader::new(meta);
    let frame = match header.kind {
        kind::HELLO => {
            let role = Role::from_wire(fields.u8()?).ok_or(FrameError::BadField("role"))?;
            let insecure = match fields.u8()? {
                0 => false,
                1 => true,
                _ => return Err(FrameError::BadField("stream mode")),
            };
            Frame::Hello {
                nonce: fields.array()?,
                public: fields.array()?,
                role,
                insecure,
            }
        }
        kind::PROOF => Frame::Proof {
            mac: fields.array()?,
        },
        kind::OPEN => Frame::Open(decode_spec(&mut fields)?),
        kind::OPEN_OK => Frame::OpenOk {
            nbd_tcp: optional_string(&mut fields, "nbd_tcp flag")?,
            // Older destinations end the OpenOk here.
            changed_outside: match fields.is_empty() {
                true => false,
                false => flag(fields.u8()?, "changed_outside")?,
            },
        },
        kind::MARK => Frame::Mark {
            seq: fields.u64_be()?,
            at_unix_ms: fields.u64_be()?,
        },
        kind::MARK_OK => Frame::MarkOk {
            seq: fields.u64_be()?,
        },
        kind::DATA => Frame::Data {
            offset_bytes: range(fields.u64_be()?, u64::from(header.data_len))?,
            len_bytes: header.data_len,
            digest: fields.array()?,
        },
        kind::ZERO | kind::TRIM => {
            let offset_bytes = fields.u64_be()?;
            let len_bytes = fields.u64_be()?;
            if len_bytes == 0 {
                return Err(FrameError::BadField("zero length"));
            }
            range(offset_bytes, len_bytes)?;
            if header.kind == kind::ZERO {
                Frame::Zero {
                    offset_bytes,
                    len_bytes,
                }
            } else {
                Frame::Trim {
                    offset_bytes,
                    len_bytes,
                }
            }
        }
        kind::COMMIT => Frame::Commit {
            seq: fields.u64_be()?,
            // Older sources, and jobs without a manager epoch, end the Commit here.
            manager_epoch: optional_epoch(&mut fields)?,
        },
        kind::SYNC | kind::COMMIT_OK | kind::VERIFY | kind::FENCE | kind::FENCE_OK => {
            let seq = fields.u64_be()?;
            match header.kind {
                kind::SYNC => Frame::Sync { seq },
                kind::VERIFY => Frame::Verify { seq },
                kind::FENCE => Frame::Fence { seq },
                kind::FENCE_OK => Frame::FenceOk { seq },
                _ => Frame::CommitOk { seq },
            }
        }
        kind::SYNC_OK => Frame::SyncOk {
            seq: fields.u64_be()?,
            received_blocks: fields.u64_be()?,
        },
        kind::VERIFY_OK => Frame::VerifyOk {
            seq: fields.u64_be()?,
            digest: fields.array()?,
        },
        kind::ABORT => Frame::Abort,
        kind::DIGESTS => {
            let seq = fields.u64_be()?;
            let offset_bytes = fields.u64_be()?;
            let block_bytes = fields.u32_be()?;
            let count = fields.u32_be()?;
            if block_bytes == 0 || count == 0 || count > MAX_DIGESTS {
                return Err(FrameError::BadField("digest range"));
            }
            Frame::Digests {
                seq,
                offset_bytes,
                block_bytes,
                count,
            }
        }
        kind::DIGESTS_OK => {
            let seq = fields.u64_be()?;
            let count = fields.u32_be()?;
            if count > MAX_DIGESTS {
                return Err(FrameError::BadField("digest count"));
            }
            let digests = (0..count)
                .map(|_| fields.array())
                .collect::<Result<Vec<_>, _>>()?;
            Frame::DigestsOk { seq, digests }
        }
        kind::QUERY => Frame::Query {
            job_id: fields.u64_be()?,
            finalize: match fields.u8()? {
                0 => false,
                1 => true,
                _ => return Err(FrameError::BadField("finalize")),
            },
        },
        kind::QUERY_OK => Frame::QueryOk {
            job_id: fields.u64_be()?,
            state: TargetState::from_wire(fields.u8()?).ok_or(FrameError::BadField("state"))?,
            received_blocks: fields.u64_be()?,
            nbd_tcp: optional_string(&mut fields, "nbd_tcp flag")?,
        },
        kind::REPOINT => Frame::Repoint(Repoint {
            job_id: fields.u64_be()?,
            size_bytes: fields.u64_be()?,
            moves: fields.u32_be()?,
            export: read_string(&mut fields, MAX_EXPORT_BYTES)?,
            nbd_tcp: read_string(&mut fields, MAX_MESSAGE_BYTES)?,
        }),
        kind::REPOINT_OK => Frame::RepointOk {
            job_id: fields.u64_be()?,
            outcome: RepointOutcome::from_wire(fields.u8()?)
                .ok_or(FrameError::BadField("outcome"))?,
        },
        kind::ERROR => Frame::Error {
            code: ErrorCode::from_wire(fields.u16_be()?).ok_or(FrameError::BadField("code"))?,
            offset_bytes: fields.u64_be()?,
            message: read_string(&mut fields, MAX_MESSAGE_BYTES)?,
        },
        other => return Err(FrameError::UnknownKind(other)),
    };
    if !fields.is_empty() {
        return Err(FrameError::BadField("trailing meta bytes"));
    }
    Ok(frame)
}

/// Decodes one whole frame from the start of `bytes`: the frame and the bytes it used
/// (header + meta + payload). For Data the payload is `bytes[used - len_bytes..used]`.
pub fn decode(bytes: &[u8]) -> Result<(Frame, usize), FrameError> {
    let head: &[u8; HEADER_BYTES] = bytes
        .get(..HEADER_BYTES)
        .and_then(|head| head.try_into().ok())
        .ok_or(FrameError::Truncated)?;
    let header = decode_header(head)?;
    let meta_end = HEADER_BYTES + header.meta_len as usize;
    let meta = bytes
        .get(HEADER_BYTES..meta_end)
        .ok_or(FrameError::Truncated)?;
    let frame = decode_meta(&header, meta)?;
    let used = meta_end + header.data_len as usize;
    if bytes.len() < used {
        return Err(FrameError::Truncated);
    }
    Ok((frame, used))
}

fn decode_spec(fields: &mut codec::Reader<'_>) -> Result<TargetSpec, FrameError> {
    let job_id = fields.u64_be()?;
    let size_bytes = fields.u64_be()?;
    let granularity_bytes = fields.u64_be()?;
    let export = read_string(fields, MAX_EXPORT_BYTES)?;
    if export.is_empty() {
        return Err(FrameError::BadField("empty export name"));
    }
    if !granularity_bytes.is_power_of_two()
        || !(MIN_GRANULARITY_BYTES..=MAX_GRANULARITY_BYTES).contains(&granularity_bytes)
    {
        return Err(FrameError::BadField("granularity"));
    }
    if size_bytes.div_ceil(granularity_bytes) > MAX_BLOCKS {
        return Err(FrameError::BadField("too many blocks for the granularity"));
    }
    let batch = match fields.u8()? {
        0 => None,
        1 => Some(read_string(fields, MAX_EXPORT_BYTES)?),
        _ => return Err(FrameError::BadField("batch flag")),
    };
    // Older sources end the Open here.
    let holder = if fields.is_empty() {
        None
    } else {
        match fields.u8()? {
            0 => None,
            1 => Some(Holder {
                addr: read_string(fields, MAX_MESSAGE_BYTES)?,
                job_id: fields.u64_be()?,
                moves: fields.u32_be()?,
            }),
            _ => return Err(FrameError::BadField("holder flag")),
        }
    };
    // Sources without seeds end the Open here.
    let seed = if fields.is_empty() {
        None
    } else {
        match fields.u8()? {
            0 => None,
            1 => Some(fields.array()?),
            _ => return Err(FrameError::BadField("seed flag")),
        }
    };
    // Sources of jobs without a manager epoch end the Open here.
    let manager_epoch = optional_epoch(fields)?;
    Ok(TargetSpec {
        export,
        size_bytes,
        granularity_bytes,
        job_id,
        batch,
        holder,
        seed,
        manager_epoch,
    })
}

/// A trailing manager epoch: nothing (absent), or a presence byte 1 and the epoch.
fn optional_epoch(fields: &mut codec::Reader<'_>) -> Result<Option<u64>, FrameError> {
    if fields.is_empty() {
        return Ok(None);
    }
    match fields.u8()? {
        1 => Ok(Some(fields.u64_be()?)),
        _ => Err(FrameError::BadField("manager epoch flag")),
    }
}

/// A boolean byte (0 or 1).
fn flag(byte: u8, what: &'static str) -> Result<bool, FrameError> {
    match byte {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(FrameError::BadField(what)),
    }
}

/// A presence byte, then (when 1) a string of at most [`MAX_MESSAGE_BYTES`].
fn optional_string(
    fields: &mut codec::Reader<'_>,
    what: &'static str,
) -> Result<Option<String>, FrameError> {
    match fields.u8()? {
        0 => Ok(None),
        1 => Ok(Some(read_string(fields, MAX_MESSAGE_BYTES)?)),
        _ => Err(FrameError::BadField(what)),
    }
}

/// Rejects a range whose end overflows u64; returns the offset.
fn range(offset_bytes: u64, len_bytes: u64) -> Result<u64, FrameError> {
    offset_bytes
        .checked_add(len_bytes)
        .map(|_| offset_bytes)
        .ok_or(FrameError::BadField("range overflows"))
}

pub(super) fn be_u32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().expect("4 bytes"))
}

fn be_u16(bytes: &[u8]) -> u16 {
    u16::from_be_bytes(bytes.try_into().expect("2 bytes"))
}

/// A u16 length, then that many bytes of UTF-8 (at most `max_bytes`).
fn read_string(reader: &mut codec::Reader<'_>, max_bytes: usize) -> Result<String, FrameError> {
    let len = usize::from(reader.u16_be()?);
    if len > max_bytes {
        return Err(FrameError::TooLong("string"));
    }
    let bytes = reader.bytes(len)?;
    std::str::from_utf8(bytes)
        .map(str::to_owned)
        .map_err(|_| FrameError::BadField("string is not UTF-8"))
}

/// Running out of meta bytes: the lengths announced more than the meta holds.
impl From<CodecError> for FrameError {
    fn from(_: CodecError) -> Self {
        FrameError::Truncated
    }
}
