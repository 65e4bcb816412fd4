//! Zeroed heap buffers aligned for `O_DIRECT`.
//!
//! Invariants: the allocation's address and length are multiples of the requested alignment,
//! the length is never zero, and the heap address never changes while the buffer lives, so
//! the io_uring ring may hand it to the kernel while it owns the buffer.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

/// The alignment (bytes) ferry uses for every `O_DIRECT` offset, length and buffer address.
pub const DIRECT_ALIGN: usize = 4096;

/// Zeroed heap buffer whose address and length are multiples of `align` (for `O_DIRECT`).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

// SAFETY: AlignedBuf owns its allocation exclusively; sending it moves that ownership, and
// the heap address never changes.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references only give out `&[u8]` views; mutation needs `&mut self`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// Allocates `len_bytes` zeroed bytes aligned to `align`.
    ///
    /// Panics if `len_bytes` is 0, `align` is not a power of two, or `len_bytes` is not a
    /// multiple of `align` (all are caller bugs), or if the allocation fails.
    pub fn zeroed(len_bytes: usize, align: usize) -> AlignedBuf {
        assert!(len_bytes > 0, "AlignedBuf of zero bytes");
        assert!(
            align.is_power_of_two(),
            "alignment {align} is not a power of two"
        );
        assert!(
            len_bytes.is_multiple_of(align),
            "length {len_bytes} is not a multiple of {align}"
        );
        let layout = Layout::from_size_align(len_bytes, align).expect("valid layout");
        // SAFETY: `layout` has non-zero size, asserted above.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf { ptr, layout }
    }

    /// Length in bytes (never 0).
    pub fn len(&self) -> usize {
        self.layout.size()
    }

    /// Always false: an `AlignedBuf` is never empty.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The alignment the buffer was allocated with.
    pub fn align(&self) -> usize {
        self.layout.align()
    }

    /// The whole buffer.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialized (zeroed) bytes owned by self,
        // and the shared borrow of self prevents mutation for the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// The whole buffer, mutably.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the exclusive borrow of self makes this the only view.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// Raw pointer for the kernel (crate-internal: the ring keeps the buffer alive).
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was returned by `alloc_zeroed(self.layout)` and is freed only here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) };
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlignedBuf")
            .field("len_bytes", &self.len())
            .field("align", &self.align())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goal: buffers are zeroed, aligned and writable. Method: allocate, check, write, read.
    #[test]
    fn zeroed_is_aligned_and_writable() {
        let mut buf = AlignedBuf::zeroed(2 * DIRECT_ALIGN, DIRECT_ALIGN);
        assert_eq!(buf.len(), 8192);
        assert_eq!(buf.as_slice().as_ptr() as usize % DIRECT_ALIGN, 0);
        assert!(buf.as_slice().iter().all(|&b| b == 0));
        buf.as_mut_slice()[100] = 7;
        assert_eq!(buf.as_slice()[100], 7);
        assert!(format!("{buf:?}").contains("8192"));
    }

    // Goal: a zero length is rejected. Method: expect the panic.
    #[test]
    #[should_panic(expected = "zero bytes")]
    fn zero_len_panics() {
        let _ = AlignedBuf::zeroed(0, DIRECT_ALIGN);
    }

    // Goal: a length that is not a multiple of the alignment is rejected. Method: expect panic.
    #[test]
    #[should_panic(expected = "not a multiple")]
    fn unaligned_len_panics() {
        let _ = AlignedBuf::zeroed(100, DIRECT_ALIGN);
    }
}
