//! A counting global allocator for the tests that assert allocation counts
//! and heap bytes (exact figures, so tests may assert them). A test binary
//! installs it with
//! `#[global_allocator] static GLOBAL: Counting = Counting;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Allocations (and reallocations) by every thread of the process.
pub static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
/// Bytes requested by allocations and reallocations, process-wide.
pub static BYTES: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Allocations by this thread (so a helper thread does not count against the caller).
    pub static THREAD_ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
    /// Bytes requested by this thread.
    pub static THREAD_BYTES: Cell<usize> = const { Cell::new(0) };
}

/// Bytes this thread requested while `f` ran, and its result.
pub fn bytes_allocated_by<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let before = THREAD_BYTES.with(Cell::get);
    let out = f();
    (THREAD_BYTES.with(Cell::get) - before, out)
}

/// The system allocator, counting.
pub struct Counting;

impl Counting {
    fn count(bytes: usize) {
        ALLOCATIONS.fetch_add(1, Ordering::SeqCst);
        BYTES.fetch_add(bytes, Ordering::SeqCst);
        let _ = THREAD_ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        let _ = THREAD_BYTES.try_with(|c| c.set(c.get() + bytes));
    }
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the counters have no effect on the memory returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Counting::count(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Counting::count(layout.size());
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on unchanged
        // (forwarded so that zeroed memory stays untouched, as with `System`).
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Counting::count(new_size);
        // SAFETY: as for `dealloc`; the caller's contract for `realloc` is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
