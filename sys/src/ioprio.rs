//! I/O priority of the calling thread (`ioprio_set(2)`): the bulk copy of a migration reads
//! at a lower class than the guest's requests, so a scheduler that honours classes
//! (mq-deadline, BFQ) serves the guest first.
//!
//! Invariants: only the calling thread changes (`IOPRIO_WHO_PROCESS` with id 0 names the
//! caller's own thread); io_uring requests issued from it inherit its class; on a device
//! whose scheduler ignores classes (`none`) the call succeeds and changes nothing.

use std::io;

use crate::errno;

/// A scheduling class of `ioprio_set(2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoClass {
    /// The default: the class follows the thread's CPU niceness.
    BestEffort,
    /// Served only when no other class waits on the device (after a scheduler-set grace).
    Idle,
}

/// `IOPRIO_WHO_PROCESS`: the id names a thread.
const WHO_PROCESS: libc::c_long = 1;
/// Bits of the class above the level (`IOPRIO_CLASS_SHIFT`).
const CLASS_SHIFT: libc::c_long = 13;

/// Sets the calling thread's I/O class.
pub fn set_thread_class(class: IoClass) -> io::Result<()> {
    let value = match class {
        // Class 2 (best effort) at its middle level, 4: the kernel's default for niceness 0.
        IoClass::BestEffort => (2 << CLASS_SHIFT) | 4,
        IoClass::Idle => 3 << CLASS_SHIFT,
    };
    // SAFETY: ioprio_set takes three integers and touches no memory of ours; id 0 is the
    // calling thread.
    let ret = unsafe { libc::syscall(libc::SYS_ioprio_set, WHO_PROCESS, 0 as libc::c_long, value) };
    errno::cvt(i32::try_from(ret).unwrap_or(-1)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_can_go_idle_and_back() {
        std::thread::spawn(|| {
            set_thread_class(IoClass::Idle).expect("idle");
            set_thread_class(IoClass::BestEffort).expect("best effort");
        })
        .join()
        .expect("thread");
    }
}
