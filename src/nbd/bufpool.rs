//! Per-connection pool of O_DIRECT-aligned buffers, by power-of-two size class, so the data
//! path allocates nothing per request once warm.
//!
//! Invariant: every buffer handed out has a length that is a multiple of
//! [`ferry_sys::DIRECT_ALIGN`] and at least what was asked.

use ferry_sys::{AlignedBuf, DIRECT_ALIGN};

/// Size classes from 4 KiB (2^12) to 64 MiB (2^26).
const CLASS_MIN_SHIFT: u32 = 12;
const CLASS_COUNT: usize = 15;

/// Buffers kept per class: many small ones (deep queues of 4 KiB I/O), few large ones.
fn keep_per_class(class: usize) -> usize {
    match class {
        0..=4 => 256, // up to 64 KiB
        5..=8 => 16,  // up to 1 MiB
        _ => 2,
    }
}

/// A free list per size class.
#[derive(Debug)]
pub struct BufPool {
    classes: Vec<Vec<AlignedBuf>>,
}

impl Default for BufPool {
    fn default() -> Self {
        Self::new()
    }
}

impl BufPool {
    /// An empty pool.
    pub fn new() -> Self {
        BufPool {
            classes: (0..CLASS_COUNT).map(|_| Vec::new()).collect(),
        }
    }

    fn class_of(len_bytes: usize) -> usize {
        let rounded = len_bytes.max(DIRECT_ALIGN).next_power_of_two();
        let class = (rounded.trailing_zeros() - CLASS_MIN_SHIFT) as usize;
        assert!(
            class < CLASS_COUNT,
            "buffer of {len_bytes} bytes is beyond the largest class"
        );
        class
    }

    /// A buffer of at least `len_bytes` (contents unspecified).
    pub fn take(&mut self, len_bytes: usize) -> AlignedBuf {
        let class = Self::class_of(len_bytes);
        self.classes[class].pop().unwrap_or_else(|| {
            AlignedBuf::zeroed(1 << (class as u32 + CLASS_MIN_SHIFT), DIRECT_ALIGN)
        })
    }

    /// Returns a buffer; beyond the class's quota it is freed.
    pub fn give(&mut self, buf: AlignedBuf) {
        let len = buf.len();
        if !len.is_power_of_two() || len < DIRECT_ALIGN {
            return; // not one of ours
        }
        let class = Self::class_of(len);
        if self.classes[class].len() < keep_per_class(class) {
            self.classes[class].push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: sizes round up to an aligned class and buffers are reused; method: take/give.
    #[test]
    fn classes_and_reuse() {
        let mut pool = BufPool::new();
        let a = pool.take(1);
        assert_eq!(a.len(), 4096);
        let b = pool.take(4097);
        assert_eq!(b.len(), 8192);
        let big = pool.take(32 * 1024 * 1024 + 8192);
        assert_eq!(big.len(), 64 * 1024 * 1024);
        pool.give(a);
        assert_eq!(pool.classes[0].len(), 1);
        let again = pool.take(100);
        assert_eq!(again.len(), 4096);
        assert!(pool.classes[0].is_empty());
    }
}
