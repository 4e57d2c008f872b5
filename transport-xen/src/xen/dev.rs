//! The Linux Xen devices: `/dev/xen/gntalloc`, `/dev/xen/gntdev` and `/dev/xen/evtchn`.
//!
//! Direct ioctls through `rustix` rather than bindings to libxengnttab / libxenevtchn: the
//! interface is six small structs fixed by the kernel's uapi headers (`include/uapi/xen/*.h`),
//! the crate then builds and runs with no C library and no Xen headers, and every ioctl is
//! visible here in one page. The structs are laid out by hand as little-endian byte buffers
//! (the kernel copies them in and out with `copy_from_user`, so alignment does not matter, and the
//! grant arrays at their ends have a length only known at run time).

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use rustix::fs::{Mode, OFlags};
use rustix::ioctl::{Direction, Ioctl, IoctlOutput, Opcode, opcode};

use crate::backend::{BackendError, EventChannel, MappedPages, Result, SharedPages};
use crate::shmem::{Region, SharedMem, map_shared};
use crate::types::{DomId, EvtchnPort, GrantRef, PAGE_SIZE};

/// Path of the event-channel device.
pub const EVTCHN: &str = "/dev/xen/evtchn";
/// Path of the grant-allocation device.
pub const GNTALLOC: &str = "/dev/xen/gntalloc";
/// Path of the grant-mapping device.
pub const GNTDEV: &str = "/dev/xen/gntdev";

/// `UNMAP_NOTIFY_CLEAR_BYTE`.
const NOTIFY_CLEAR_BYTE: u32 = 0x1;
/// `UNMAP_NOTIFY_SEND_EVENT`.
const NOTIFY_SEND_EVENT: u32 = 0x2;
/// `GNTALLOC_FLAG_WRITABLE`.
const GNTALLOC_WRITABLE: u16 = 1;
/// Most pages one call may share or map (the largest link ring is 256 pages, plus the control
/// page); bounds the ioctl buffers.
const MAX_PAGES: usize = 1024;

/// Opens a Xen device read-write, with a message that says what is missing.
pub(crate) fn open_device(path: &str, module: &str) -> Result<OwnedFd> {
    let flags = OFlags::RDWR | OFlags::CLOEXEC;
    rustix::fs::open(path, flags, Mode::empty()).map_err(|e| {
        let e = io::Error::from(e);
        match e.kind() {
            io::ErrorKind::NotFound if !Path::new("/dev/xen").exists() && !is_xen() => {
                BackendError::Unavailable(format!("{path} not found: not a Xen domain"))
            }
            io::ErrorKind::NotFound => BackendError::Unavailable(format!(
                "{path} not found: not a Xen domain or {module} not loaded (modprobe {module})"
            )),
            io::ErrorKind::PermissionDenied => BackendError::PermissionDenied(format!(
                "{path}: {e} (dombus needs access to the Xen devices)"
            )),
            _ => BackendError::io(format!("opening {path}"), e),
        }
    })
}

/// True if `/sys/hypervisor/type` says `xen`.
pub fn is_xen() -> bool {
    std::fs::read_to_string("/sys/hypervisor/type").is_ok_and(|t| t.trim() == "xen")
}

/// One ioctl whose argument is a byte buffer and whose result is the return value.
struct Call<'a> {
    opcode: Opcode,
    arg: &'a mut [u8],
}

// SAFETY: `as_ptr` points at a buffer at least as large as the size encoded in the opcode (checked
// by `call`), live for the duration of the ioctl; the output is the plain return value.
unsafe impl Ioctl for Call<'_> {
    type Output = u32;
    const IS_MUTATING: bool = true;

    fn opcode(&self) -> Opcode {
        self.opcode
    }

    fn as_ptr(&mut self) -> *mut c_void {
        self.arg.as_mut_ptr().cast()
    }

    unsafe fn output_from_ptr(out: IoctlOutput, _: *mut c_void) -> rustix::io::Result<u32> {
        Ok(out as u32)
    }
}

/// Runs ioctl `_IOC(_IOC_NONE, group, nr, size)` on `fd` with `arg` (at least `size` bytes, more
/// for the variable-length grant arrays the kernel reads past the fixed part).
fn call(fd: BorrowedFd<'_>, group: u8, nr: u8, size: usize, arg: &mut [u8]) -> io::Result<u32> {
    assert!(arg.len() >= size, "ioctl buffer shorter than its struct");
    let opcode = opcode::from_components(Direction::None, group, nr, size);
    // SAFETY: the kernel reads and writes at most `arg.len()` bytes: the fixed struct (`size`,
    // checked above) and the grant array whose length the caller sized `arg` for.
    Ok(unsafe { rustix::ioctl::ioctl(fd, Call { opcode, arg })? })
}

fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], off: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(w)
}
fn get_u64(b: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(w)
}

/// Checks a page count for a share or map call.
fn page_count(count: usize) -> Result<u32> {
    if count == 0 || count > MAX_PAGES {
        return Err(BackendError::InvalidArgument(format!("{count} pages (1 to {MAX_PAGES})")));
    }
    Ok(count as u32)
}

/// Maps a kernel errno from a grant or event-channel ioctl onto the backend's errors.
fn ioctl_error(what: String, e: io::Error) -> BackendError {
    match e.raw_os_error() {
        Some(libc_enoent) if libc_enoent == rustix::io::Errno::NOENT.raw_os_error() => {
            BackendError::NotFound(format!("{what}: {e}"))
        }
        Some(n) if n == rustix::io::Errno::INVAL.raw_os_error() => {
            BackendError::InvalidArgument(format!("{what}: {e}"))
        }
        Some(n)
            if n == rustix::io::Errno::PERM.raw_os_error()
                || n == rustix::io::Errno::ACCESS.raw_os_error() =>
        {
            BackendError::PermissionDenied(format!("{what}: {e}"))
        }
        Some(n)
            if n == rustix::io::Errno::NOSPC.raw_os_error()
                || n == rustix::io::Errno::NOMEM.raw_os_error() =>
        {
            BackendError::Limit(format!("{what}: {e}"))
        }
        _ => BackendError::io(what, e),
    }
}

/// Pages granted with `/dev/xen/gntalloc`.
pub struct XenSharedPages {
    dev: Arc<OwnedFd>,
    index: u64,
    refs: Vec<GrantRef>,
    region: Region,
}

impl std::fmt::Debug for XenSharedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenSharedPages").field("index", &self.index).field("refs", &self.refs).finish()
    }
}

/// `IOCTL_GNTALLOC_ALLOC_GREF` + mmap.
pub(crate) fn share_pages(
    dev: &Arc<OwnedFd>,
    remote: DomId,
    count: usize,
    writable: bool,
) -> Result<XenSharedPages> {
    let n = page_count(count)?;
    // struct ioctl_gntalloc_alloc_gref { u16 domid; u16 flags; u32 count; u64 index;
    //                                    u32 gref_ids[count]; }  (sizeof with [1]: 24)
    let mut arg = vec![0u8; (16 + 4 * count).max(24)];
    put_u16(&mut arg, 0, remote.0);
    put_u16(&mut arg, 2, if writable { GNTALLOC_WRITABLE } else { 0 });
    put_u32(&mut arg, 4, n);
    call(dev.as_fd(), b'G', 5, 24, &mut arg)
        .map_err(|e| ioctl_error(format!("granting {count} pages to domain {}", remote.0), e))?;
    let index = get_u64(&arg, 8);
    let refs: Vec<GrantRef> = (0..count).map(|i| GrantRef(get_u32(&arg, 16 + 4 * i))).collect();
    let dealloc = |e: BackendError| {
        let _ = dealloc_gref(dev, index, n);
        e
    };
    // gntalloc maps our own pages read-write whatever the remote's access.
    let mapping = map_shared(&**dev, count * PAGE_SIZE, true, index)
        .map_err(|e| dealloc(BackendError::io("mapping granted pages", e)))?;
    // The device fd rides along with the mapping: the pages stay valid until the last Region goes.
    let region = mapping.into_region_with(dev.clone());
    Ok(XenSharedPages { dev: dev.clone(), index, refs, region })
}

/// `IOCTL_GNTALLOC_DEALLOC_GREF`: the grants end once the pages are also unmapped here.
fn dealloc_gref(dev: &OwnedFd, index: u64, count: u32) -> io::Result<u32> {
    // struct ioctl_gntalloc_dealloc_gref { u64 index; u32 count; }  (sizeof: 16)
    let mut arg = [0u8; 16];
    put_u64(&mut arg, 0, index);
    put_u32(&mut arg, 8, count);
    call(dev.as_fd(), b'G', 6, 16, &mut arg)
}

/// The `ioctl_gntalloc_unmap_notify` / `ioctl_gntdev_unmap_notify` argument (same layout).
fn unmap_notify(
    dev: &OwnedFd,
    index: u64,
    offset: usize,
    len: usize,
    port: Option<EvtchnPort>,
) -> Result<()> {
    if offset >= len {
        return Err(BackendError::InvalidArgument(format!("notify offset {offset} outside {len} bytes")));
    }
    // struct { u64 index; u32 action; u32 event_channel_port; }  (sizeof: 16)
    let mut arg = [0u8; 16];
    put_u64(&mut arg, 0, index + offset as u64);
    put_u32(&mut arg, 8, NOTIFY_CLEAR_BYTE | if port.is_some() { NOTIFY_SEND_EVENT } else { 0 });
    put_u32(&mut arg, 12, port.map_or(0, |p| p.0));
    // IOCTL_GNTALLOC_SET_UNMAP_NOTIFY and IOCTL_GNTDEV_SET_UNMAP_NOTIFY are both _IOC(NONE, 'G', 7, 16).
    call(dev.as_fd(), b'G', 7, 16, &mut arg)
        .map_err(|e| ioctl_error("setting the unmap notification".into(), e))?;
    Ok(())
}

impl SharedPages for XenSharedPages {
    fn refs(&self) -> &[GrantRef] {
        &self.refs
    }

    fn region(&self) -> &Region {
        &self.region
    }

    fn set_unmap_notify(&mut self, offset: usize, port: Option<EvtchnPort>) -> Result<()> {
        unmap_notify(&self.dev, self.index, offset, SharedMem::len(&self.region), port)
    }
}

impl Drop for XenSharedPages {
    fn drop(&mut self) {
        if let Err(e) = dealloc_gref(&self.dev, self.index, self.refs.len() as u32) {
            tracing::warn!("IOCTL_GNTALLOC_DEALLOC_GREF failed: {e}");
        }
    }
}

/// Another domain's pages mapped with `/dev/xen/gntdev`.
pub struct XenMappedPages {
    dev: Arc<OwnedFd>,
    index: u64,
    count: u32,
    region: Region,
}

impl std::fmt::Debug for XenMappedPages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenMappedPages").field("index", &self.index).field("count", &self.count).finish()
    }
}

/// `IOCTL_GNTDEV_MAP_GRANT_REF` + mmap.
pub(crate) fn map_grants(
    dev: &Arc<OwnedFd>,
    granter: DomId,
    refs: &[GrantRef],
    writable: bool,
) -> Result<XenMappedPages> {
    let count = page_count(refs.len())?;
    // struct ioctl_gntdev_map_grant_ref { u32 count; u32 pad; u64 index;
    //                                     struct { u32 domid; u32 ref; } refs[count]; }  (sizeof with [1]: 24)
    let mut arg = vec![0u8; 16 + 8 * refs.len()];
    put_u32(&mut arg, 0, count);
    for (i, r) in refs.iter().enumerate() {
        put_u32(&mut arg, 16 + 8 * i, u32::from(granter.0));
        put_u32(&mut arg, 20 + 8 * i, r.0);
    }
    call(dev.as_fd(), b'G', 0, 24, &mut arg)
        .map_err(|e| ioctl_error(format!("reserving {count} grants of domain {}", granter.0), e))?;
    let index = get_u64(&arg, 8);
    // The grants are mapped (and checked by Xen) here: a ref that is not a live grant of
    // `granter` to us fails the mmap.
    let mapping = map_shared(&**dev, refs.len() * PAGE_SIZE, writable, index).map_err(|e| {
        let _ = unmap_grant_ref(dev, index, count);
        let what = format!("mapping grants {refs:?} of domain {}", granter.0);
        match e.raw_os_error() {
            // gntdev reports a refused grant map as EINVAL/EFAULT from mmap.
            Some(n)
                if n == rustix::io::Errno::INVAL.raw_os_error()
                    || n == rustix::io::Errno::FAULT.raw_os_error() =>
            {
                BackendError::NotFound(format!("{what}: {e} (not live grants of that domain to us)"))
            }
            _ => ioctl_error(what, e),
        }
    })?;
    let region = mapping.into_region_with(dev.clone());
    Ok(XenMappedPages { dev: dev.clone(), index, count, region })
}

/// `IOCTL_GNTDEV_UNMAP_GRANT_REF`: the grants are unmapped when the last mapping goes.
fn unmap_grant_ref(dev: &OwnedFd, index: u64, count: u32) -> io::Result<u32> {
    // struct ioctl_gntdev_unmap_grant_ref { u64 index; u32 count; u32 pad; }  (sizeof: 16)
    let mut arg = [0u8; 16];
    put_u64(&mut arg, 0, index);
    put_u32(&mut arg, 8, count);
    call(dev.as_fd(), b'G', 1, 16, &mut arg)
}

impl MappedPages for XenMappedPages {
    fn region(&self) -> &Region {
        &self.region
    }

    fn set_unmap_notify(&mut self, offset: usize, port: Option<EvtchnPort>) -> Result<()> {
        unmap_notify(&self.dev, self.index, offset, SharedMem::len(&self.region), port)
    }
}

impl Drop for XenMappedPages {
    fn drop(&mut self) {
        if let Err(e) = unmap_grant_ref(&self.dev, self.index, self.count) {
            tracing::warn!("IOCTL_GNTDEV_UNMAP_GRANT_REF failed: {e}");
        }
    }
}

/// An open `/dev/xen/evtchn` handle. Non-blocking: `pending` never waits, and the fd polls
/// readable while a bound port has a pending event.
#[derive(Debug)]
pub struct XenEvtchn {
    fd: OwnedFd,
}

impl XenEvtchn {
    /// Opens a new handle.
    pub fn open() -> Result<XenEvtchn> {
        let fd = open_device(EVTCHN, "xen-evtchn")?;
        rustix::fs::fcntl_setfl(&fd, OFlags::NONBLOCK | OFlags::RDWR)
            .map_err(|e| BackendError::io("making the event channel non-blocking", e.into()))?;
        Ok(XenEvtchn { fd })
    }

    fn port_call(&self, nr: u8, what: &str, fields: &[u32]) -> Result<u32> {
        let mut arg = vec![0u8; 4 * fields.len()];
        for (i, f) in fields.iter().enumerate() {
            put_u32(&mut arg, 4 * i, *f);
        }
        let size = arg.len();
        call(self.fd.as_fd(), b'E', nr, size, &mut arg).map_err(|e| ioctl_error(what.to_string(), e))
    }
}

impl AsFd for XenEvtchn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl EventChannel for XenEvtchn {
    fn bind_unbound(&self, remote: DomId) -> Result<EvtchnPort> {
        // struct ioctl_evtchn_bind_unbound_port { unsigned int remote_domain; }
        let what = format!("allocating a port for domain {}", remote.0);
        self.port_call(2, &what, &[u32::from(remote.0)]).map(EvtchnPort)
    }

    fn bind_interdomain(&self, remote: DomId, remote_port: EvtchnPort) -> Result<EvtchnPort> {
        // struct ioctl_evtchn_bind_interdomain { unsigned int remote_domain, remote_port; }
        let what = format!("binding to port {} of domain {}", remote_port.0, remote.0);
        self.port_call(1, &what, &[u32::from(remote.0), remote_port.0]).map(EvtchnPort)
    }

    fn notify(&self, port: EvtchnPort) -> Result<()> {
        // struct ioctl_evtchn_notify { unsigned int port; }
        self.port_call(4, "notifying", &[port.0]).map(drop)
    }

    fn pending(&self) -> Result<Option<EvtchnPort>> {
        let mut b = [0u8; 4];
        match rustix::io::read(&self.fd, &mut b) {
            Ok(4) => Ok(Some(EvtchnPort(u32::from_le_bytes(b)))),
            Ok(n) => Err(BackendError::io(
                "reading a pending port",
                io::Error::other(format!("short read of {n} bytes")),
            )),
            Err(rustix::io::Errno::AGAIN) => Ok(None),
            Err(e) => Err(BackendError::io("reading a pending port", e.into())),
        }
    }

    fn unmask(&self, port: EvtchnPort) -> Result<()> {
        match rustix::io::write(&self.fd, &port.0.to_le_bytes()) {
            Ok(_) => Ok(()),
            Err(e) => Err(BackendError::io(format!("unmasking port {}", port.0), e.into())),
        }
    }

    fn unbind(&self, port: EvtchnPort) -> Result<()> {
        // struct ioctl_evtchn_unbind { unsigned int port; }
        self.port_call(3, "unbinding", &[port.0]).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opcodes_match_the_uapi_headers() {
        // _IOC(_IOC_NONE, 'G', 5, 24) etc., as the C macros compute them.
        let ioc = |group: u8, nr: u8, size: u32| (size << 16) | (u32::from(group) << 8) | u32::from(nr);
        assert_eq!(opcode::from_components(Direction::None, b'G', 5, 24) as u32, ioc(b'G', 5, 24));
        assert_eq!(opcode::from_components(Direction::None, b'E', 1, 8) as u32, ioc(b'E', 1, 8));
        assert_eq!(ioc(b'G', 0, 24), 0x0018_4700);
    }

    #[test]
    fn a_missing_device_is_a_clear_error() {
        let e = open_device("/dev/xen/no-such-device", "xen-nothing").unwrap_err().to_string();
        assert!(e.contains("not found"), "{e}");
        assert!(e.contains("/dev/xen/no-such-device"), "{e}");
    }

    #[test]
    fn page_counts_are_bounded() {
        assert!(page_count(0).is_err());
        assert!(page_count(MAX_PAGES + 1).is_err());
        assert_eq!(page_count(3).unwrap(), 3);
    }
}
