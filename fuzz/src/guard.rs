//! A global allocator for the driver that refuses any single allocation over
//! [`MAX_ALLOCATION`] bytes, or any that would take the process past
//! [`MAX_LIVE`] bytes in all. Before refusing (Rust then aborts: allocation
//! failure cannot be caught), it saves the input being run as `oom-*` in the
//! corpus, so the input is kept and the machine, shared with others, is not
//! swapped to a halt as a plain run would.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

pub const MAX_ALLOCATION: usize = 2 << 30;
pub const MAX_LIVE: usize = 6 << 30;

pub struct Guard;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static REFUSING: AtomicBool = AtomicBool::new(false);

/// The input being run and where to save it if it asks for too much memory.
pub static CURRENT: Mutex<Option<(PathBuf, Vec<u8>)>> = Mutex::new(None);

impl Guard {
    fn refuse(size: usize) {
        if REFUSING.swap(true, Ordering::SeqCst) {
            return;
        }
        // try_lock: the lock is free while a target runs; never wait inside the allocator.
        if let Ok(current) = CURRENT.try_lock() {
            if let Some((dir, data)) = current.as_ref() {
                let path = dir.join(format!("oom-{:016x}", crate::corpus::fnv1a(data)));
                let _ = std::fs::create_dir_all(dir);
                let _ = std::fs::write(&path, data);
                eprintln!(
                    "an allocation of {size} bytes (with {} live) is over the driver's limit; input saved as {}",
                    LIVE.load(Ordering::Relaxed),
                    path.display()
                );
            }
        }
    }
}

// SAFETY: delegates to the system allocator, only refusing (null) some requests.
unsafe impl GlobalAlloc for Guard {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let size = layout.size();
        if size > MAX_ALLOCATION || LIVE.load(Ordering::Relaxed) + size > MAX_LIVE {
            Guard::refuse(size);
            return std::ptr::null_mut();
        }
        // SAFETY: the caller's layout contract passes through.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(size, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: ptr came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}
