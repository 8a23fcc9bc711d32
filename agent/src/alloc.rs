//! The agent's global allocator: mimalloc, called the way Rust's own
//! `System` allocator calls `malloc`.
//!
//! The `mimalloc` crate's allocator passes every allocation to
//! `mi_malloc_aligned`, whatever its alignment. When the size class's page
//! has no free block at hand, mimalloc's aligned path over-allocates
//! (`size + align - 1` from a larger class) unless the class is a power
//! of two. For the agent that was six over-allocations per proxied
//! connection, 1.2k instructions (bench/RESULTS.md). Here an alignment
//! that `malloc` guarantees anyway (at most 16 bytes and at most the size,
//! the rule of the C standard and of `std`'s `System`) takes plain
//! `mi_malloc`; only larger alignments, such as tokio's 128-byte task
//! cells, take the aligned calls.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The largest alignment `mi_malloc` guarantees for a block of at least
/// that size (`MI_MAX_ALIGN_SIZE`, `alignof(max_align_t)` on x86-64 and
/// aarch64). A smaller block is aligned to the largest power of two not
/// above its size, as the C standard asks of `malloc`.
const MALLOC_ALIGN: usize = 16;

/// mimalloc as the global allocator (`#[global_allocator]` in the
/// `signpost` binary).
pub struct MiMalloc;

/// Whether plain `mi_malloc` of `size` bytes is aligned to `align`.
fn malloc_aligns(align: usize, size: usize) -> bool {
    align <= MALLOC_ALIGN && align <= size
}

// SAFETY (the whole impl): each call forwards to the mimalloc function
// with the same contract as the `GlobalAlloc` method (a block of at least
// `size` bytes, or null; `realloc` keeps the contents; `dealloc` takes a
// block this allocator returned). Alignment is kept either by mimalloc's
// aligned call or, in the plain calls, by `malloc`'s guarantee
// (`malloc_aligns`). `mi_free` frees blocks from both kinds of call.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for MiMalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if malloc_aligns(layout.align(), layout.size()) {
                mi::mi_malloc(layout.size()).cast()
            } else {
                mi::mi_malloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: see the impl.
        unsafe {
            if malloc_aligns(layout.align(), layout.size()) {
                mi::mi_zalloc(layout.size()).cast()
            } else {
                mi::mi_zalloc_aligned(layout.size(), layout.align()).cast()
            }
        }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: see the impl.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: see the impl; the block keeps `layout`'s alignment.
        unsafe {
            if malloc_aligns(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks of every size up to 1 KiB and in steps beyond, at every
    /// alignment up to 4 KiB, come back aligned, writable and reallocated
    /// with their contents; many at once, so that pages run out of free
    /// blocks and mimalloc takes its slower paths too.
    #[test]
    #[allow(unsafe_code)]
    fn blocks_are_aligned_and_keep_their_contents() {
        let sizes = (1..=1024).chain((1025..70_000).step_by(997));
        let mut live = Vec::new();
        for size in sizes {
            for align in [1, 2, 4, 8, 16, 32, 64, 128, 4096] {
                let layout = Layout::from_size_align(size, align).unwrap();
                // SAFETY: `layout` has a non-zero size; each block is
                // written within its size and freed once, with its layout.
                unsafe {
                    let zeroed = size % 3 == 0;
                    let ptr = if zeroed {
                        MiMalloc.alloc_zeroed(layout)
                    } else {
                        MiMalloc.alloc(layout)
                    };
                    assert!(!ptr.is_null());
                    assert_eq!(ptr as usize % align, 0, "size {size}, align {align}");
                    if zeroed {
                        assert!(
                            std::slice::from_raw_parts(ptr, size)
                                .iter()
                                .all(|b| *b == 0)
                        );
                    }
                    ptr.write_bytes(size as u8, size);
                    live.push((ptr, layout));
                }
            }
        }
        for (ptr, layout) in live {
            // SAFETY: as above; the new size is non-zero.
            unsafe {
                let grown = layout.size() * 2 + 5;
                let moved = MiMalloc.realloc(ptr, layout, grown);
                assert!(!moved.is_null());
                assert_eq!(moved as usize % layout.align(), 0);
                let old = std::slice::from_raw_parts(moved, layout.size());
                assert!(old.iter().all(|b| *b == layout.size() as u8));
                let new_layout = Layout::from_size_align(grown, layout.align()).unwrap();
                MiMalloc.dealloc(moved, new_layout);
            }
        }
    }
}
