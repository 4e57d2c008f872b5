//! Page memory of the simulator: memfds for granted pages and the mappings built from them.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

pub use dombus_transport_xen::shmem::Mapping;
use dombus_transport_xen::shmem::SharedMem;
use dombus_transport_xen::types::PAGE_SIZE;

fn prot(writable: bool) -> ProtFlags {
    if writable { ProtFlags::READ | ProtFlags::WRITE } else { ProtFlags::READ }
}

/// A zeroed, sealed (cannot shrink or grow) memfd of `pages` pages.
pub fn memfd(pages: usize) -> io::Result<OwnedFd> {
    let fd = rustix::fs::memfd_create("dombus-sim-grant", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
    rustix::fs::ftruncate(&fd, (pages * PAGE_SIZE) as u64)?;
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
    Ok(fd)
}

/// Reopens a memfd read-only (so the holder cannot map it writable).
pub fn reopen_read_only(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    Ok(rustix::fs::open(
        path.as_str(),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

/// Maps `len` bytes of `fd` from offset 0, shared.
pub fn map_fd(fd: impl AsFd, len: usize, writable: bool) -> io::Result<Mapping> {
    dombus_transport_xen::shmem::map_shared(fd, len, writable, 0)
}

/// Maps single pages of several fds contiguously: page `i` of the result is page `pages[i].1` of
/// `fds[pages[i].0]`.
pub fn map_pages<F: AsFd>(fds: &[F], pages: &[(u32, u32)], writable: bool) -> io::Result<Mapping> {
    if pages.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no pages to map"));
    }
    let len = pages.len() * PAGE_SIZE;
    // SAFETY: a fresh inaccessible reservation chosen by the kernel.
    let base = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len,
            ProtFlags::empty(),
            MapFlags::PRIVATE | MapFlags::NORESERVE,
        )?
    };
    let base = NonNull::new(base.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
    // SAFETY: `base..base+len` is the reservation just made, owned from here (and unmapped on
    // error) by `area` alone.
    let area = unsafe { Mapping::from_raw(base, len) };
    for (i, &(fd_idx, page)) in pages.iter().enumerate() {
        let fd = fds
            .get(fd_idx as usize)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "page names a missing fd"))?;
        // SAFETY: the target page lies inside our own reservation `area` (i < pages.len()), which
        // nothing else uses, so replacing it with MAP_FIXED cannot clobber foreign memory.
        unsafe {
            rustix::mm::mmap(
                base.as_ptr().add(i * PAGE_SIZE).cast::<c_void>(),
                PAGE_SIZE,
                prot(writable),
                MapFlags::SHARED | MapFlags::FIXED,
                fd,
                u64::from(page) * PAGE_SIZE as u64,
            )?;
        }
    }
    Ok(area)
}

/// Clears the byte at `offset` of `fd` (as an unmap notification does).
pub fn clear_byte(fd: impl AsFd, offset: u64) -> io::Result<()> {
    let page_off = offset & !(PAGE_SIZE as u64 - 1);
    let page = dombus_transport_xen::shmem::map_shared(fd, PAGE_SIZE, true, page_off)?.into_region();
    // SeqCst like the peer's own accesses to the byte (a read-modify-write, as `store` is Release).
    page.fetch_and_u8((offset - page_off) as usize, 0);
    Ok(())
}

/// Clears an eventfd (the daemon's tests observe ports with it).
#[cfg(test)]
pub use dombus_transport_xen::backend::client::drain;
/// The eventfd helpers the daemon and the clients share.
pub use dombus_transport_xen::backend::client::{eventfd, signal};
