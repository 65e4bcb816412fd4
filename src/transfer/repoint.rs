//! Telling the agent that holds a disk's guest connection where the disk went: after a
//! switchover of a disk that arrived here from that holder, the holder forwards straight to
//! the new destination, so the guest's requests never cross more than one hop and this host
//! can be shut down once the holder answered.
//!
//! Invariant: [`tell_until_final`] returns only an answer the holder gave (each is final:
//! re-pointed, superseded by a newer move, or not forwarding that disk any more); until then
//! it keeps asking, because this agent still forwards what the holder sends it meanwhile.

use std::net::SocketAddr;
use std::time::Duration;

use crate::error::error_chain;

use super::frame::{Frame, Holder, Repoint, RepointOutcome};
use super::link::{self, read_frame, unexpected, write_frame};
use super::{resolve_peer, ClusterKey, TransferError};

/// How long one attempt waits for the holder.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// First pause between attempts while the holder cannot be reached; doubles to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
/// Longest pause between attempts.
const RETRY_MAX: Duration = Duration::from_secs(10);

/// One attempt: connect to the holder's block stream, prove the cluster key, send the
/// Repoint, read its answer.
pub fn tell_holder(
    addr: SocketAddr,
    key: &ClusterKey,
    repoint: &Repoint,
    timeout: Duration,
) -> Result<RepointOutcome, TransferError> {
    let mut stream = link::dial_authenticated(addr, key, timeout)?;
    let frame = Frame::Repoint(repoint.clone());
    write_frame(&mut stream, &frame, &mut Vec::new())?;
    match read_frame(&mut stream, &mut Vec::new())? {
        Frame::RepointOk { job_id, outcome } if job_id == repoint.job_id => Ok(outcome),
        Frame::Error {
            code,
            offset_bytes,
            message,
        } => Err(TransferError::from_remote(code, offset_bytes, message)),
        other => Err(unexpected(other, "RepointOk")),
    }
}

/// Tells `holder` until it answers (backing off while it is away or refuses).
pub fn tell_until_final(holder: &Holder, key: &ClusterKey, repoint: &Repoint) -> RepointOutcome {
    let mut pause = RETRY_FIRST;
    let mut attempts = 0u64;
    loop {
        let answer = resolve_peer(&holder.addr)
            .map_err(|err| error_chain(&err))
            .and_then(|addr| {
                tell_holder(addr, key, repoint, ATTEMPT_TIMEOUT).map_err(|err| error_chain(&err))
            });
        match answer {
            Ok(outcome) => return outcome,
            Err(err) => {
                if attempts % 10 == 0 {
                    log::warn!(
                        "export {}: holder {} (job {}) not told where the disk went yet: {err}",
                        repoint.export,
                        holder.addr,
                        holder.job_id
                    );
                }
                attempts += 1;
                std::thread::sleep(pause);
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }
}
