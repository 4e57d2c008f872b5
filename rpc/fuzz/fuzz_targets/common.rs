//! Shared by the rpc fuzz targets: an allocation probe, a bounded poll loop, and the switch for
//! the targets.
#![allow(dead_code)] // not every target uses every helper

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

/// The system allocator, recording the largest single allocation while [`largest_allocation`]
/// runs (the targets are single-threaded).
pub struct Probe;

static ARMED: AtomicBool = AtomicBool::new(false);
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to `System` unchanged; only reads `layout.size()` on the side.
unsafe impl GlobalAlloc for Probe {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

fn note(size: usize) {
    if ARMED.load(Ordering::Relaxed) {
        LARGEST.fetch_max(size, Ordering::Relaxed);
    }
}

/// Runs `f` and returns its result with the largest single allocation (or reallocation) made
/// meanwhile, bytes. Needs `#[global_allocator] static A: common::Probe = common::Probe;`.
pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.store(0, Ordering::Relaxed);
    ARMED.store(true, Ordering::Relaxed);
    let r = f();
    ARMED.store(false, Ordering::Relaxed);
    (r, LARGEST.load(Ordering::Relaxed))
}

/// Polls `fut` with a no-op waker until it is ready, at most `max_polls` times. Everything the
/// targets feed is in memory and every reader ends in EOF, so a future still pending after that
/// is waiting for bytes that will never come: a hang, reported as a panic.
pub fn poll_to_end<F: Future>(fut: F, max_polls: usize) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..max_polls {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
    }
    panic!("still pending after {max_polls} polls, with all input delivered and EOF behind it");
}
