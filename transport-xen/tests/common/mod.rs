//! Helpers for the transport's tests: scratch directories, watches and credit windows.
#![allow(dead_code, clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use dombus_sim::SimBackend;
use dombus_transport_xen::backend::{Backend, Store};
use dombus_transport_xen::vsock::mux::VsockStream;
use tokio::io::AsyncWrite;

/// How long a test waits for something that must happen before it calls it a hang: a liveness
/// limit, not a performance claim (tests also run on loaded machines and under emulation).
pub const LIVENESS: Duration = Duration::from_secs(30);

/// A unique scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "dombus-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ (std::ptr::addr_of!(tag) as usize as u128)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Waits until a task of this (current-thread) runtime that waits on a store watch of `path`
/// by `backend`'s domain is parked on it: the watch is set up and every event of it so far has
/// been taken. Yields to the runtime meanwhile; panics after [`LIVENESS`].
///
/// Events are fenced first with a request of the domain's own: the simulator sends a domain its
/// events and replies in order, so every event caused before the fence has arrived when its reply
/// has. A waiter takes a watch's events and looks at the store again in one go (no await in
/// between), so once the queue is empty it has seen everything there was to see.
pub async fn parked_on_watch(backend: &SimBackend, path: &str) {
    let deadline = Instant::now() + LIVENESS;
    loop {
        if backend.watches().iter().any(|(p, _)| p == path) {
            backend.store().read(&format!("/local/domain/{}/domid", backend.domid().0)).unwrap();
            if backend.watches().iter().any(|(p, queued)| p == path && *queued == 0) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "domain {} never parked on a watch of {path} (its watches: {:?})",
            backend.domid(),
            backend.watches()
        );
        tokio::task::yield_now().await;
    }
}

/// Writes to `s` until a write has to wait (polled once, it is pending: no credit left); the
/// bytes taken. Nothing is left waiting: a later write starts afresh.
pub fn fill_window(s: &mut VsockStream) -> usize {
    let chunk = vec![0u8; 64 << 10];
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut taken = 0;
    loop {
        match std::pin::Pin::new(&mut *s).poll_write(&mut cx, &chunk) {
            std::task::Poll::Ready(Ok(n)) => taken += n,
            std::task::Poll::Ready(Err(e)) => panic!("write to the stalled connection failed: {e}"),
            std::task::Poll::Pending => return taken,
        }
        assert!(taken <= 64 << 20, "64 MiB taken for a reader that never reads");
    }
}
