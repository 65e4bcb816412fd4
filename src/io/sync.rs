//! The pread/pwrite engine: every request runs to the end inside `submit`, through the page
//! cache, with exact byte ranges.
//!
//! Purpose: the fallback where io_uring is unavailable (probed at start, logged) and the
//! reference model the conformance and differential tests compare the io_uring engine with.
//! It is deliberately simple: no alignment tricks, no batching.
//!
//! Invariant: `in_flight` counts completions not yet handed out; `submit` refuses beyond
//! `capacity`, as the io_uring engine does, so the session sees the same back-pressure.

use std::sync::Arc;

use ferry_sys::DirectFile;

use super::{
    check_request, read_data_start, zero_or_trim, BlockIo, IoCompletion, IoError, IoKind, IoRequest,
};

/// The reference engine.
#[derive(Debug)]
pub struct SyncEngine {
    file: Arc<DirectFile>,
    capacity: usize,
    done: Vec<IoCompletion>,
}

impl SyncEngine {
    /// An engine on `file` accepting up to `queue_depth` requests before `complete`.
    pub fn new(file: Arc<DirectFile>, queue_depth: u32) -> Self {
        let capacity = usize::try_from(queue_depth.max(1)).expect("u32 fits in usize");
        SyncEngine {
            file,
            capacity,
            done: Vec::with_capacity(capacity),
        }
    }

    fn run(&self, request: &mut IoRequest) -> std::io::Result<usize> {
        let len = request.len_bytes as usize;
        match request.kind {
            IoKind::Read => {
                let start = read_data_start(request.offset_bytes);
                let buf = request.buf.as_mut().expect("checked").as_mut_slice();
                self.file
                    .read_at(request.offset_bytes, &mut buf[start..start + len])?;
                Ok(start)
            }
            IoKind::Write { fua } => {
                let buf = request.buf.as_ref().expect("checked").as_slice();
                self.file.write_at(request.offset_bytes, &buf[..len])?;
                if fua {
                    self.file.datasync()?;
                }
                Ok(0)
            }
            IoKind::Flush => self.file.datasync().map(|()| 0),
            IoKind::Trim { .. } | IoKind::WriteZeroes { .. } => zero_or_trim(
                &self.file,
                request.kind,
                request.offset_bytes,
                request.len_bytes,
            )
            .map(|()| 0),
        }
    }
}

impl BlockIo for SyncEngine {
    fn capacity(&self) -> usize {
        self.capacity
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn submit(&mut self, mut request: IoRequest) -> Result<(), (IoError, IoRequest)> {
        if self.done.len() >= self.capacity {
            return Err((IoError::Full, request));
        }
        if let Err(reason) = check_request(&request) {
            return Err((IoError::BadRequest(reason), request));
        }
        let outcome = self.run(&mut request);
        let data_start = *outcome.as_ref().unwrap_or(&0);
        self.done.push(IoCompletion {
            tag: request.tag,
            result: outcome.map(|_| ()),
            buf: request.buf,
            data_start,
        });
        Ok(())
    }

    fn complete(
        &mut self,
        _min_complete: usize,
        out: &mut Vec<IoCompletion>,
    ) -> Result<(), IoError> {
        out.append(&mut self.done);
        Ok(())
    }
}
