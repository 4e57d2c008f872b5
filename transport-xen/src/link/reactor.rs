//! Registration of backend handles (event channels, store watches) with tokio's reactor.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};

use tokio::io::unix::AsyncFd;

/// Makes a backend handle usable with tokio's `AsyncFd` (which wants `AsRawFd`).
pub(crate) struct Pollable<T>(pub(crate) T);

impl<T: AsFd> AsRawFd for Pollable<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Registers a backend handle's fd with tokio's reactor for readability.
pub(crate) fn register<T: AsFd>(handle: T) -> io::Result<AsyncFd<Pollable<T>>> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other("dombus links must be set up inside a tokio runtime (with IO enabled)"));
    }
    // SAFETY: the backend traits require `as_fd` to return the same open descriptor, owned by the
    // handle, for the handle's whole life; the handle is moved into the AsyncFd and lives exactly
    // as long as the registration.
    Ok(unsafe { AsyncFd::register_with_interest(Pollable(handle), tokio::io::Interest::READABLE) }?)
}
