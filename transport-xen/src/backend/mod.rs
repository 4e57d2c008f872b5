//! The hypervisor interface the rest of transport-xen is written against.
//!
//! Each trait maps one-to-one onto a Linux Xen device or the xenstore protocol, so that the `xen`
//! backend is a thin layer over ioctls and the `sim` backend can keep Xen's semantics exactly:
//!
//! | trait / method                         | Xen                                              |
//! |----------------------------------------|--------------------------------------------------|
//! | [`Backend::share_pages`]               | `/dev/xen/gntalloc` `IOCTL_GNTALLOC_ALLOC_GREF` + mmap |
//! | [`SharedPages::set_unmap_notify`]      | `IOCTL_GNTALLOC_SET_UNMAP_NOTIFY`                |
//! | drop of [`SharedPages`]                | munmap + `IOCTL_GNTALLOC_DEALLOC_GREF` (revoke)  |
//! | [`Backend::map_grants`]                | `/dev/xen/gntdev` `IOCTL_GNTDEV_MAP_GRANT_REF` + mmap |
//! | [`MappedPages::set_unmap_notify`]      | `IOCTL_GNTDEV_SET_UNMAP_NOTIFY`                  |
//! | drop of [`MappedPages`]                | munmap + `IOCTL_GNTDEV_UNMAP_GRANT_REF`          |
//! | [`Backend::open_evtchn`]               | open `/dev/xen/evtchn` (one handle, many ports)  |
//! | [`EventChannel::bind_unbound`]         | `IOCTL_EVTCHN_BIND_UNBOUND_PORT`                 |
//! | [`EventChannel::bind_interdomain`]     | `IOCTL_EVTCHN_BIND_INTERDOMAIN`                  |
//! | [`EventChannel::notify`]               | `IOCTL_EVTCHN_NOTIFY`                            |
//! | [`EventChannel::pending`]              | `read()` of a port number (port is then masked)  |
//! | [`EventChannel::unmask`]               | `write()` of the port number                     |
//! | [`EventChannel::unbind`]               | `IOCTL_EVTCHN_UNBIND`                            |
//! | [`Store`]                              | xenstore wire protocol (`XS_READ`, `XS_WRITE`, `XS_MKDIR`, `XS_RM`, `XS_DIRECTORY`, `XS_GET_PERMS`/`XS_SET_PERMS`, `XS_WATCH`/`XS_UNWATCH`) |
//!
//! Death of a domain is observable as on Xen: its event channels close (the peer's port goes
//! back to unbound and receives one final event), unmap notifications it registered fire (the
//! byte is cleared and the event sent), and the store fires the `@releaseDomain` watch.

use std::os::fd::AsFd;

use crate::shmem::Region;
use crate::types::{DomId, EvtchnPort, GrantRef};

/// Errors of the hypervisor interface, named after what Xen would return.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `ENOENT`: no such grant, port, store node or domain.
    #[error("not found: {0}")]
    NotFound(String),
    /// `EACCES`/`EPERM`: the calling domain may not do this (wrong domid, store permissions).
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// `EINVAL`: a malformed argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// `EEXIST`.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// `ENOSPC`/`E2BIG`: a quota or table is full.
    #[error("resource limit: {0}")]
    Limit(String),
    /// The hypervisor (real or simulated) is not reachable.
    #[error("hypervisor unavailable: {0}")]
    Unavailable(String),
    /// The connection to the hypervisor (or simulator) broke.
    #[error("hypervisor connection lost: {0}")]
    Disconnected(String),
    /// An OS error while talking to the device or simulator.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl BackendError {
    /// Wraps an OS error with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> BackendError {
        BackendError::Io { context: context.into(), source }
    }
}

/// Result of backend operations.
pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// A hypervisor: grants, event channels and the store, as seen from one domain.
pub trait Backend: Send + Sync + 'static {
    /// Pages this domain granted to another.
    type Shared: SharedPages;
    /// Another domain's pages mapped here.
    type Mapped: MappedPages;
    /// An open event-channel handle.
    type Evtchn: EventChannel;
    /// A connection to the store.
    type Store: Store;

    /// The id of the domain this backend runs in.
    fn domid(&self) -> DomId;

    /// Allocates `count` zeroed pages and grants each to `remote` (read-only unless `writable`).
    /// The pages are mapped here, contiguously, as one [`Region`].
    fn share_pages(&self, remote: DomId, count: usize, writable: bool) -> Result<Self::Shared>;

    /// Maps pages that `granter` granted to this domain, contiguously in `refs` order.
    /// Fails with [`BackendError::PermissionDenied`] if a grant names another domain, or
    /// [`BackendError::NotFound`] if a ref is not a live grant of `granter`.
    fn map_grants(&self, granter: DomId, refs: &[GrantRef], writable: bool) -> Result<Self::Mapped>;

    /// Opens a new event-channel handle (one pollable fd for any number of ports).
    fn open_evtchn(&self) -> Result<Self::Evtchn>;

    /// The store connection of this domain.
    fn store(&self) -> &Self::Store;
}

/// Pages granted by this domain (`gntalloc`). Dropping unmaps and revokes the grants; a domain
/// that mapped them keeps its mapping until it unmaps, as on Xen.
pub trait SharedPages: Send + Sync + 'static {
    /// One grant ref per page, in page order.
    fn refs(&self) -> &[GrantRef];
    /// The pages, mapped here.
    fn region(&self) -> &Region;
    /// When this domain unmaps the pages or dies, clear the byte at `offset` (within the pages)
    /// and, if `port` is given, send an event on it. At most one notification per allocation.
    fn set_unmap_notify(&mut self, offset: usize, port: Option<EvtchnPort>) -> Result<()>;
}

/// Another domain's pages mapped here (`gntdev`). Dropping unmaps them.
pub trait MappedPages: Send + Sync + 'static {
    /// The mapped pages, contiguous in the order of the refs they were mapped from.
    fn region(&self) -> &Region;
    /// When this domain unmaps the pages or dies, clear the byte at `offset` and, if `port` is
    /// given, send an event on it.
    fn set_unmap_notify(&mut self, offset: usize, port: Option<EvtchnPort>) -> Result<()>;
}

/// An event-channel handle (`/dev/xen/evtchn`): ports bound through it deliver their events to
/// its file descriptor, which polls readable while any port is pending.
///
/// `as_fd` must return the same open descriptor, owned by the handle, for the handle's whole
/// life (the link layer registers it with tokio's reactor).
///
/// As on Xen, a port is masked once [`EventChannel::pending`] reports it and stays masked until
/// [`EventChannel::unmask`]; events that arrive meanwhile are coalesced, not lost.
pub trait EventChannel: AsFd + Send + Sync + 'static {
    /// Allocates a port that `remote` may bind to; returns the local port.
    fn bind_unbound(&self, remote: DomId) -> Result<EvtchnPort>;
    /// Binds to `remote`'s unbound port `remote_port` (which must have been allocated for this
    /// domain); returns the local port. As on Xen, the new local port starts out pending
    /// (notifications sent to the unbound end may have been lost, so Xen assumes one was).
    fn bind_interdomain(&self, remote: DomId, remote_port: EvtchnPort) -> Result<EvtchnPort>;
    /// Sends an event to the other end of `port`. Sending on a port whose peer has closed is
    /// silently dropped, as on Xen.
    fn notify(&self, port: EvtchnPort) -> Result<()>;
    /// Takes one pending port without blocking (`None` if none is pending).
    fn pending(&self) -> Result<Option<EvtchnPort>>;
    /// Unmasks `port` so that it can be reported pending again.
    fn unmask(&self, port: EvtchnPort) -> Result<()>;
    /// Closes `port`; the peer's port returns to the unbound state.
    fn unbind(&self, port: EvtchnPort) -> Result<()>;
}

/// Access rights in a store permission entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PermKind {
    /// `n`: no access.
    None,
    /// `r`: read.
    Read,
    /// `w`: write.
    Write,
    /// `b`: read and write.
    Both,
}

impl PermKind {
    /// True if this grants read access.
    pub fn can_read(self) -> bool {
        matches!(self, PermKind::Read | PermKind::Both)
    }
    /// True if this grants write access.
    pub fn can_write(self) -> bool {
        matches!(self, PermKind::Write | PermKind::Both)
    }
    /// The xenstore letter (`n`, `r`, `w`, `b`).
    pub fn letter(self) -> char {
        match self {
            PermKind::None => 'n',
            PermKind::Read => 'r',
            PermKind::Write => 'w',
            PermKind::Both => 'b',
        }
    }
}

/// One entry of a store node's permission list. As in xenstore, the first entry names the owner
/// (who always has full access) and the access of every domain not listed; later entries give
/// specific domains their access. Domain 0 may do anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Perm {
    /// The domain.
    pub domid: DomId,
    /// Its access.
    pub kind: PermKind,
}

/// A connection to the store (xenstore).
///
/// Paths are absolute (`/local/domain/3/data/x`) or relative to this domain's home
/// `/local/domain/<domid>`. Special watch paths `@introduceDomain` and `@releaseDomain` fire
/// when a domain appears or dies.
pub trait Store: Send + Sync + 'static {
    /// A registered watch.
    type Watch: StoreWatch;

    /// The value at `path`; [`BackendError::NotFound`] if there is no such node.
    fn read(&self, path: &str) -> Result<Vec<u8>>;
    /// Creates or replaces the value at `path` (creating missing parents).
    fn write(&self, path: &str, value: &[u8]) -> Result<()>;
    /// Creates `path` (and missing parents) with an empty value if it does not exist.
    fn mkdir(&self, path: &str) -> Result<()>;
    /// Removes `path` and everything under it. As on xenstored, removing a missing node
    /// succeeds if its parent exists, and is [`BackendError::NotFound`] otherwise.
    fn rm(&self, path: &str) -> Result<()>;
    /// Names of the children of `path`.
    fn directory(&self, path: &str) -> Result<Vec<String>>;
    /// The permission list of `path`.
    fn get_perms(&self, path: &str) -> Result<Vec<Perm>>;
    /// Replaces the permission list of `path` (owner or dom0 only).
    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<()>;
    /// Watches `path` and everything below it. As on xenstore, the watch fires once right
    /// after registration, then on every change the watcher may read.
    fn watch(&self, path: &str) -> Result<Self::Watch>;
}

/// Writes `value` at `path` readable as `perms` says, so that every domain `perms` lets read it
/// hears of it through its watches: the node is created empty, given its permissions, then
/// written. (xenstored tells a watcher of a permission change only if it could already read the
/// node, so writing first and setting permissions after would leave a newly allowed reader
/// unaware.) Readers treat the empty value as "not yet".
pub fn publish<S: Store + ?Sized>(store: &S, path: &str, value: &[u8], perms: &[Perm]) -> Result<()> {
    store.write(path, b"")?;
    store.set_perms(path, perms)?;
    store.write(path, value)
}

/// A pollable stream of changed paths; dropping it unregisters the watch. `as_fd` must return the
/// same open descriptor, owned by the watch, for its whole life.
pub trait StoreWatch: AsFd + Send + Sync + 'static {
    /// The next changed path without blocking (`None` if nothing is queued).
    fn try_next(&self) -> Result<Option<String>>;
}
