//! Raw errno handling: the one place where C return conventions become `io::Result`.
//!
//! Invariants: a negative (or -1) return is turned into `io::Error` right after the call, before
//! any other libc call can overwrite `errno`; `EFAULT` means ferry passed a bad pointer, which is a
//! bug, so it panics instead of becoming an operating error.

use std::io;

/// A libc return type whose negative values signal failure (`-1` plus `errno`).
pub(crate) trait IsMinusOne: Copy {
    /// True when the value reports a failure.
    fn is_negative(self) -> bool;
}

impl IsMinusOne for i32 {
    fn is_negative(self) -> bool {
        self < 0
    }
}

impl IsMinusOne for i64 {
    fn is_negative(self) -> bool {
        self < 0
    }
}

impl IsMinusOne for isize {
    fn is_negative(self) -> bool {
        self < 0
    }
}

/// Converts a libc return value into `io::Result`, reading `errno` on failure.
pub(crate) fn cvt<T: IsMinusOne>(ret: T) -> io::Result<T> {
    if ret.is_negative() {
        let err = io::Error::last_os_error();
        check_not_efault(&err);
        Err(err)
    } else {
        Ok(ret)
    }
}

/// Like [`cvt`], retrying while the call fails with `EINTR`.
pub(crate) fn cvt_retry<T: IsMinusOne>(mut call: impl FnMut() -> T) -> io::Result<T> {
    loop {
        match cvt(call()) {
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => continue,
            other => return other,
        }
    }
}

/// Converts an io_uring completion result (`-errno` on failure) into bytes transferred.
pub(crate) fn cvt_cqe(res: i32) -> io::Result<u32> {
    if res < 0 {
        let err = io::Error::from_raw_os_error(-res);
        check_not_efault(&err);
        Err(err)
    } else {
        Ok(res.unsigned_abs())
    }
}

/// What a failed io_uring completion asks of the ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CqeAction {
    /// The operation completed (successfully or not): hand it back.
    Done,
    /// Interrupted or temporarily out of resources: push the same op again.
    Requeue,
}

/// Classifies a completion result: `EINTR`/`EAGAIN` re-enqueue, everything else is final.
pub(crate) fn cqe_action(res: i32) -> CqeAction {
    if res == -libc::EINTR || res == -libc::EAGAIN {
        CqeAction::Requeue
    } else {
        CqeAction::Done
    }
}

/// `EFAULT` means a pointer ferry handed to the kernel was bad: a bug, never an operating error.
fn check_not_efault(err: &io::Error) {
    assert_ne!(
        err.raw_os_error(),
        Some(libc::EFAULT),
        "kernel reported EFAULT: ferry passed a bad pointer"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: negative returns become errors carrying errno; others pass. Method: fake returns.
    #[test]
    fn cvt_maps_negative_to_errno() {
        assert_eq!(cvt(5_i32).unwrap(), 5);
        assert!(cvt(-1_i64).is_err());
        let err = cvt_cqe(-libc::EIO).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(cvt_cqe(4096).unwrap(), 4096);
    }

    // Goal: only EINTR/EAGAIN are re-enqueued. Method: classify a few results.
    #[test]
    fn cqe_action_requeues_transient_errors() {
        assert_eq!(cqe_action(-libc::EINTR), CqeAction::Requeue);
        assert_eq!(cqe_action(-libc::EAGAIN), CqeAction::Requeue);
        assert_eq!(cqe_action(-libc::EIO), CqeAction::Done);
        assert_eq!(cqe_action(0), CqeAction::Done);
    }

    // Goal: EFAULT is treated as a bug. Method: convert it and expect a panic.
    #[test]
    #[should_panic(expected = "EFAULT")]
    fn efault_panics() {
        let _ = cvt_cqe(-libc::EFAULT);
    }
}
