//! How much heap a fusion takes: [`Counting`] wraps a binary's
//! global allocator and counts the bytes live and their peak;
//! [`measure_peak`] reports the peak a closure reached above where it
//! started. Only allocations through Rust's global allocator count
//! (libtorch's own tensors do not).
//!
//! ```text
//! #[global_allocator]
//! static ALLOCATOR: fusion::heap::Counting<mimalloc::MiMalloc> =
//!     fusion::heap::Counting(mimalloc::MiMalloc);
//! ```

use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// While above zero, growth does not raise the peak ([`unmeasured`]).
static PAUSED: AtomicUsize = AtomicUsize::new(0);
/// One measurement at a time: the peak is process-wide.
static MEASURING: Mutex<()> = Mutex::new(());

/// A global allocator that counts live bytes and their peak.
pub struct Counting<A>(pub A);

fn grew(bytes: usize) {
    let live = LIVE.fetch_add(bytes, Ordering::Relaxed) + bytes;
    if PAUSED.load(Ordering::Relaxed) == 0 {
        PEAK.fetch_max(live, Ordering::Relaxed);
    }
}

fn shrank(bytes: usize) {
    LIVE.fetch_sub(bytes, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the wrapped allocator; the
// counters are only updated, never consulted, on the allocation paths.
unsafe impl<A: GlobalAlloc> GlobalAlloc for Counting<A> {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let p = unsafe { self.0.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let p = unsafe { self.0.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { self.0.dealloc(ptr, layout) };
        shrank(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let p = unsafe { self.0.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                grew(new_size - layout.size());
            } else {
                shrank(layout.size() - new_size);
            }
        }
        p
    }
}

/// Bytes live on the heap now; 0 when [`Counting`] is not the global allocator.
pub fn live() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Runs `f` and returns, with its result, the peak heap it reached above
/// the heap live when it started, in bytes. `None` when [`Counting`] is not
/// the global allocator. Measurements run one at a time; allocations of
/// other threads meanwhile count too (an upper bound).
pub fn measure_peak<R>(f: impl FnOnce() -> R) -> (R, Option<u64>) {
    let _one = MEASURING.lock().unwrap_or_else(|e| e.into_inner());
    let start = live();
    PEAK.store(start, Ordering::Relaxed);
    let out = f();
    let peak = PEAK.load(Ordering::Relaxed);
    let measured = (start > 0).then(|| peak.saturating_sub(start) as u64);
    (out, measured)
}

/// Runs `f` without letting what it allocates raise the peak a
/// [`measure_peak`] in progress reports: for checks that run inside a
/// measured piece of work but are not part of it. What `f` still holds when
/// it returns counts from then on.
pub fn unmeasured<R>(f: impl FnOnce() -> R) -> R {
    struct Resume;
    impl Drop for Resume {
        fn drop(&mut self) {
            PAUSED.fetch_sub(1, Ordering::Relaxed);
            PEAK.fetch_max(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }
    PAUSED.fetch_add(1, Ordering::Relaxed);
    let _resume = Resume;
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One test: both halves touch the process-wide counters.
    #[test]
    fn the_wrapper_counts_what_it_hands_out_and_only_then_is_there_a_measure() {
        // Test binaries use the system allocator unwrapped: nothing counted.
        let (v, peak) = measure_peak(|| vec![0u8; 1 << 20].len());
        assert_eq!(v, 1 << 20);
        assert_eq!(peak, None);

        let a = Counting(std::alloc::System);
        let layout = Layout::from_size_align(4096, 8).unwrap();
        let bigger = Layout::from_size_align(8192, 8).unwrap();
        // SAFETY: valid non-zero layouts; each block is freed with its layout.
        unsafe {
            let keep = a.alloc(layout);
            assert!(!keep.is_null());
            assert_eq!(live(), 4096);
            let ((), peak) = measure_peak(|| {
                let p = a.alloc(layout);
                assert!(!p.is_null());
                let q = a.realloc(p, layout, 8192);
                assert!(!q.is_null());
                a.dealloc(q, bigger);
            });
            assert_eq!(peak, Some(8192));
            // A check inside the measured work leaves no mark on the peak,
            // but what it keeps counts.
            let ((), peak) = measure_peak(|| {
                let kept = unmeasured(|| {
                    let p = a.alloc(bigger);
                    let q = a.alloc(layout);
                    a.dealloc(p, bigger);
                    q
                });
                a.dealloc(kept, layout);
            });
            assert_eq!(peak, Some(4096));
            a.dealloc(keep, layout);
        }
        assert_eq!(live(), 0);
    }
}
