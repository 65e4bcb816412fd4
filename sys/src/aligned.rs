//! Zeroed heap buffers aligned for `O_DIRECT`.
//!
//! A buffer of [`HUGE_MIN_BYTES`] or more is its own anonymous mapping, 2 MiB aligned and
//! advised for transparent huge pages: its pages are then physically contiguous, so one
//! `O_DIRECT` request of it is one segment to the block layer instead of one per 4 KiB page
//! (a device taking 254 segments per request split every 1 MiB read in two). The mapping is
//! rounded up to whole huge pages; without huge pages it is an ordinary zeroed mapping.
//!
//! Invariants: the allocation's address and length are multiples of the requested alignment,
//! the length is never zero, and the address never changes while the buffer lives, so
//! the io_uring ring may hand it to the kernel while it owns the buffer.

use std::alloc::{self, Layout};
use std::fmt;
use std::ptr::NonNull;

/// The alignment (bytes) ferry uses for every `O_DIRECT` offset, length and buffer address.
pub const DIRECT_ALIGN: usize = 4096;

/// Buffers this long or longer are huge-page mappings (see the module's note).
pub const HUGE_MIN_BYTES: usize = 1 << 20;
/// A transparent huge page on x86-64 and arm64 (4 KiB base pages).
const HUGE_PAGE_BYTES: usize = 2 << 20;

/// Zeroed heap buffer whose address and length are multiples of `align` (for `O_DIRECT`).
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
    /// Bytes of the buffer's own mapping (0: from the heap allocator).
    mapped_bytes: usize,
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
        if len_bytes >= HUGE_MIN_BYTES && align <= HUGE_PAGE_BYTES {
            if let Some(buf) = Self::mapped(layout) {
                return buf;
            }
        }
        // SAFETY: `layout` has non-zero size, asserted above.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        AlignedBuf {
            ptr,
            layout,
            mapped_bytes: 0,
        }
    }

    /// `layout`'s bytes as an anonymous mapping of whole huge pages, 2 MiB aligned and
    /// advised for huge pages (None if the kernel refuses the mapping: the heap then serves).
    fn mapped(layout: Layout) -> Option<AlignedBuf> {
        let mapped_bytes = layout.size().next_multiple_of(HUGE_PAGE_BYTES);
        let reserve_bytes = mapped_bytes + HUGE_PAGE_BYTES;
        // SAFETY: a fresh private anonymous mapping at an address of the kernel's choosing
        // touches no existing memory.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                reserve_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        let start = raw as usize;
        let aligned = start.next_multiple_of(HUGE_PAGE_BYTES);
        let head_bytes = aligned - start;
        let tail_bytes = reserve_bytes - head_bytes - mapped_bytes;
        // SAFETY: both ranges lie inside the reservation just made and outside the part kept;
        // nothing else refers to them. A failed unmap only leaves address space reserved.
        unsafe {
            if head_bytes > 0 {
                libc::munmap(raw, head_bytes);
            }
            if tail_bytes > 0 {
                libc::munmap((aligned + mapped_bytes) as *mut libc::c_void, tail_bytes);
            }
            // Advice only: without huge pages the mapping still works, page by page.
            libc::madvise(
                aligned as *mut libc::c_void,
                mapped_bytes,
                libc::MADV_HUGEPAGE,
            );
        }
        // Anonymous mappings read as zeros: the buffer is zeroed without touching it.
        let ptr = NonNull::new(aligned as *mut u8)?;
        #[cfg(test)]
        tests::LIVE_MAPPINGS.with(|live| live.set(live.get() + 1));
        Some(AlignedBuf {
            ptr,
            layout,
            mapped_bytes,
        })
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
        if self.mapped_bytes > 0 {
            // SAFETY: `ptr` starts the buffer's own mapping of `mapped_bytes`, unmapped only
            // here; the ring never holds a buffer past its owner (module invariant).
            let unmapped = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.mapped_bytes) };
            #[cfg(test)]
            if unmapped == 0 {
                tests::LIVE_MAPPINGS.with(|live| live.set(live.get() - 1));
            }
            #[cfg(not(test))]
            let _ = unmapped;
            return;
        }
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

    thread_local! {
        /// Huge mappings made on this thread and not yet unmapped (by any thread). Counted
        /// per thread: the process's mapped size moves with the other tests running beside.
        pub(super) static LIVE_MAPPINGS: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
    }

    // Goal: a buffer of HUGE_MIN_BYTES or more is its own mapping, 2 MiB aligned (so a huge
    // page can back it), zeroed and writable to its last byte, and unmapped on drop.
    // Method: allocate sizes at and above the threshold, check, write both ends; then drop
    // 256 of them: every mapping made on this thread was unmapped (munmap succeeded).
    #[test]
    fn large_buffers_are_huge_page_aligned_mappings() {
        for len_bytes in [HUGE_MIN_BYTES, 2 << 20, 3 << 20, 8 << 20] {
            let mut buf = AlignedBuf::zeroed(len_bytes, DIRECT_ALIGN);
            assert_eq!(buf.len(), len_bytes);
            assert_eq!(
                buf.mapped_bytes,
                len_bytes.next_multiple_of(HUGE_PAGE_BYTES)
            );
            assert_eq!(buf.as_slice().as_ptr() as usize % HUGE_PAGE_BYTES, 0);
            assert!(buf.as_slice().iter().all(|&b| b == 0));
            buf.as_mut_slice()[0] = 1;
            buf.as_mut_slice()[len_bytes - 1] = 2;
            assert_eq!(buf.as_slice()[len_bytes - 1], 2);
        }
        let before = LIVE_MAPPINGS.with(std::cell::Cell::get);
        for _ in 0..256 {
            let mut buf = AlignedBuf::zeroed(HUGE_MIN_BYTES, DIRECT_ALIGN);
            buf.as_mut_slice()[0] = 1;
            assert_eq!(LIVE_MAPPINGS.with(std::cell::Cell::get), before + 1);
        }
        assert_eq!(
            LIVE_MAPPINGS.with(std::cell::Cell::get),
            before,
            "huge buffers leak"
        );
        // Below the threshold: the heap, as before.
        assert_eq!(AlignedBuf::zeroed(512 << 10, DIRECT_ALIGN).mapped_bytes, 0);
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
