//! A counting global allocator: the system allocator plus counters of
//! allocations, bytes requested, and each thread's live and peak heap bytes.
//!
//! Principal items: [`Counting`] (installed by the `nocturne` binary and by the
//! tests with `#[global_allocator] static GLOBAL: Counting = Counting;`),
//! [`measure`] (a closure's peak heap on its thread, as the memory plan uses it
//! for the tract graphs), [`bytes_allocated_by`].
//!
//! Invariants: the counters never change the memory returned; they are exact
//! (tests may assert them). Live bytes are per thread: memory freed on another
//! thread than the one that allocated it lowers that other thread's figure, so
//! [`measure`] is exact for work that allocates and frees on one thread.
//! Without `Counting` installed every figure stays 0 and [`is_installed`] says so.

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
    /// Bytes this thread allocated minus the bytes it freed.
    static THREAD_LIVE: Cell<isize> = const { Cell::new(0) };
    /// The highest `THREAD_LIVE` since the last reset by [`measure`].
    static THREAD_PEAK: Cell<isize> = const { Cell::new(0) };
}

/// Bytes this thread requested while `f` ran, and its result.
pub fn bytes_allocated_by<T>(f: impl FnOnce() -> T) -> (usize, T) {
    let before = THREAD_BYTES.with(Cell::get);
    let out = f();
    (THREAD_BYTES.with(Cell::get) - before, out)
}

/// What [`measure`] saw of a closure's heap use on the calling thread, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeapUse {
    /// The highest live heap above the level at the start.
    pub peak: usize,
    /// Live heap at the end above the level at the start (what it kept).
    pub kept: usize,
}

/// Runs `f` and returns its peak and kept heap on this thread (zeros when
/// [`Counting`] is not the global allocator). Nested calls are not supported:
/// the inner one resets the peak.
pub fn measure<T>(f: impl FnOnce() -> T) -> (HeapUse, T) {
    let start = THREAD_LIVE.with(Cell::get);
    THREAD_PEAK.with(|p| p.set(start));
    let out = f();
    let peak = THREAD_PEAK.with(Cell::get);
    let end = THREAD_LIVE.with(Cell::get);
    let above = |v: isize| usize::try_from(v - start).unwrap_or(0);
    (HeapUse { peak: above(peak), kept: above(end) }, out)
}

/// Whether [`Counting`] is the global allocator (a probe allocation moved the counters).
pub fn is_installed() -> bool {
    let (bytes, probe) = bytes_allocated_by(|| Box::new(std::hint::black_box(0u64)));
    drop(probe);
    bytes > 0
}

/// The system allocator, counting.
pub struct Counting;

impl Counting {
    fn count(bytes: usize) {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(bytes, Ordering::Relaxed);
        let _ = THREAD_ALLOCATIONS.try_with(|c| c.set(c.get() + 1));
        let _ = THREAD_BYTES.try_with(|c| c.set(c.get() + bytes));
    }

    fn live(delta: isize) {
        let _ = THREAD_LIVE.try_with(|live| {
            let now = live.get() + delta;
            live.set(now);
            let _ = THREAD_PEAK.try_with(|peak| peak.set(peak.get().max(now)));
        });
    }
}

// Sizes come from `Layout`, which guarantees they fit in `isize`.
fn signed(bytes: usize) -> isize {
    bytes as isize
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// `GlobalAlloc` contract; the counters have no effect on the memory returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        Counting::count(layout.size());
        Counting::live(signed(layout.size()));
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        Counting::count(layout.size());
        Counting::live(signed(layout.size()));
        // SAFETY: the caller's contract for `alloc_zeroed` is passed on unchanged
        // (forwarded so that zeroed memory stays untouched, as with `System`).
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        Counting::live(-signed(layout.size()));
        // SAFETY: `ptr` was allocated by `System` with `layout` (every allocation goes there).
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        Counting::count(new_size);
        Counting::live(signed(new_size) - signed(layout.size()));
        // SAFETY: as for `dealloc`; the caller's contract for `realloc` is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
