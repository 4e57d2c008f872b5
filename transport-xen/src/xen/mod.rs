//! The `xen` backend: the real hypervisor through the Linux Xen devices and xenstore.
//!
//! | backend call | Linux |
//! |---|---|
//! | [`Backend::share_pages`] | `/dev/xen/gntalloc` (`IOCTL_GNTALLOC_ALLOC_GREF`, mmap) |
//! | [`Backend::map_grants`] | `/dev/xen/gntdev` (`IOCTL_GNTDEV_MAP_GRANT_REF`, mmap) |
//! | [`Backend::open_evtchn`] | `/dev/xen/evtchn` (one fd per handle, bind/notify/unbind ioctls) |
//! | [`Backend::store`] | xenstored's Unix socket or `/dev/xen/xenbus` ([`store`]) |
//!
//! ```no_run
//! # fn demo() -> Result<(), dombus_transport_xen::backend::BackendError> {
//! use dombus_transport_xen::backend::Backend;
//! let xen = dombus_transport_xen::xen::XenBackend::open()?;
//! println!("running in domain {}", xen.domid().0);
//! # Ok(()) }
//! ```

pub mod dev;
pub mod store;

use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};

use crate::backend::{Backend, BackendError, Result};
use crate::types::{DomId, GrantRef};
pub use dev::{XenEvtchn, XenMappedPages, XenSharedPages};
pub use store::XenStore;

/// This domain's view of the real hypervisor.
///
/// The grant devices are opened on first use, so a domain that only maps (or only shares) pages
/// needs only the one module loaded.
#[derive(Clone)]
pub struct XenBackend {
    inner: Arc<Inner>,
}

struct Inner {
    domid: DomId,
    store: XenStore,
    gntalloc: OnceLock<Arc<OwnedFd>>,
    gntdev: OnceLock<Arc<OwnedFd>>,
}

impl std::fmt::Debug for XenBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenBackend").field("domid", &self.inner.domid).finish()
    }
}

impl XenBackend {
    /// Connects to xenstore (socket, else `/dev/xen/xenbus`), reads this domain's id from its
    /// `domid` key, and checks that the event-channel device is there.
    pub fn open() -> Result<XenBackend> {
        Self::with_store(XenStore::open()?)
    }

    /// Like [`XenBackend::open`] over a given store connection.
    pub fn with_store(store: XenStore) -> Result<XenBackend> {
        // Fail early with the clear message rather than at the first link.
        drop(XenEvtchn::open()?);
        let domid = store.read_domid()?;
        Ok(XenBackend {
            inner: Arc::new(Inner { domid, store, gntalloc: OnceLock::new(), gntdev: OnceLock::new() }),
        })
    }

    fn device(cell: &OnceLock<Arc<OwnedFd>>, path: &str, module: &str) -> Result<Arc<OwnedFd>> {
        if let Some(fd) = cell.get() {
            return Ok(fd.clone());
        }
        let fd = Arc::new(dev::open_device(path, module)?);
        // A racing opener may have won; either fd works, keep the first.
        Ok(cell.get_or_init(|| fd).clone())
    }
}

impl Backend for XenBackend {
    type Shared = XenSharedPages;
    type Mapped = XenMappedPages;
    type Evtchn = XenEvtchn;
    type Store = XenStore;

    fn domid(&self) -> DomId {
        self.inner.domid
    }

    fn share_pages(&self, remote: DomId, count: usize, writable: bool) -> Result<XenSharedPages> {
        let dev = Self::device(&self.inner.gntalloc, dev::GNTALLOC, "xen-gntalloc")?;
        dev::share_pages(&dev, remote, count, writable)
    }

    fn map_grants(&self, granter: DomId, refs: &[GrantRef], writable: bool) -> Result<XenMappedPages> {
        let dev = Self::device(&self.inner.gntdev, dev::GNTDEV, "xen-gntdev")?;
        dev::map_grants(&dev, granter, refs, writable)
    }

    fn open_evtchn(&self) -> Result<XenEvtchn> {
        XenEvtchn::open()
    }

    fn store(&self) -> &XenStore {
        &self.inner.store
    }
}

/// Why the `xen` backend cannot be used here, if it cannot (for `--backend auto` choices and
/// error messages): `None` when the devices and a store are present.
pub fn unavailable_reason() -> Option<BackendError> {
    XenEvtchn::open().err()
}
