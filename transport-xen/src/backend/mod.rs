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

pub mod client;

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
    /// This domain was migrated: its old id ended as a death does (grants revoked, event
    /// channels closed, store home removed) and it runs on as domain `to`. Nothing done through
    /// the old attachment acts any more; attach again as `to` (the simulator's
    /// `SimBackend::resume`).
    #[error("this domain was migrated; it is domain {to} now: attach again as it")]
    Migrated {
        /// The domain's new id.
        to: DomId,
    },
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

/// Events queued per watch (by both store clients) before the queue collapses: a writer that
/// changes paths faster than the consumer takes them must not exhaust the consumer's memory.
pub const MAX_QUEUED_EVENTS: usize = 4096;

/// Events queued per child of the watched path (for a watch on `/local/domain`: per domain)
/// before that child's events collapse.
pub const MAX_QUEUED_PER_CHILD: usize = 64;

/// The events of one store watch not taken yet, bounded.
///
/// Nothing is lost silently past a bound: events collapse into one event for an ancestor, which
/// by xenstore's convention (the watched path's event is also the one every new watch gets)
/// means "something at or beneath this path changed: read it again". Events are counted per
/// child of the watched path, so one writer (a domain writing beneath its own home) that outruns
/// the reader by [`MAX_QUEUED_PER_CHILD`] events collapses only its own events, into one for
/// `<watched>/<child>`, and never drowns another child's. Past [`MAX_QUEUED_EVENTS`] in all, the
/// whole queue collapses into one event for the watched path.
#[derive(Debug)]
pub struct WatchEvents {
    root: String,
    paths: std::collections::VecDeque<String>,
    /// Events queued per child of `root` (children with none are absent).
    per_child: std::collections::HashMap<String, usize>,
    collapsed: u64,
}

impl WatchEvents {
    /// An empty queue for a watch on `root`.
    pub fn new(root: &str) -> WatchEvents {
        WatchEvents {
            root: root.trim_end_matches('/').to_string(),
            paths: Default::default(),
            per_child: Default::default(),
            collapsed: 0,
        }
    }

    /// `<root>/<child>` for a path beneath the watched one (`None` for the watched path itself,
    /// special names and paths elsewhere).
    fn child_of<'a>(&self, path: &'a str) -> Option<&'a str> {
        let rest = path.strip_prefix(self.root.as_str())?.strip_prefix('/')?;
        let child = rest.split('/').next().filter(|c| !c.is_empty())?;
        Some(&path[..self.root.len() + 1 + child.len()])
    }

    /// Queues `path`, collapsing as the bounds require.
    pub fn push(&mut self, path: String) {
        if self.paths.len() >= MAX_QUEUED_EVENTS {
            self.collapse_all();
            return;
        }
        let Some(child) = self.child_of(&path).map(str::to_string) else {
            self.paths.push_back(path);
            return;
        };
        let n = self.per_child.entry(child.clone()).or_default();
        if *n < MAX_QUEUED_PER_CHILD {
            *n += 1;
            self.paths.push_back(path);
            return;
        }
        // This child's writer outran the reader: its events go, one for the child stays.
        self.note_collapse(&child);
        self.paths
            .retain(|p| !(p.starts_with(child.as_str()) && p[child.len()..].starts_with('/')) && *p != child);
        self.paths.push_back(child.clone());
        self.per_child.insert(child, 1);
    }

    fn collapse_all(&mut self) {
        self.note_collapse(&self.root.clone());
        self.paths.clear();
        self.per_child.clear();
        self.paths.push_back(self.root.clone());
    }

    fn note_collapse(&mut self, at: &str) {
        if self.collapsed == 0 || self.collapsed.is_power_of_two() {
            tracing::warn!(
                "store watch on {}: events not taken; those beneath {at} collapsed into one ({} times so far)",
                self.root,
                self.collapsed + 1
            );
        }
        self.collapsed += 1;
    }

    /// The oldest event.
    pub fn pop(&mut self) -> Option<String> {
        let path = self.paths.pop_front()?;
        if let Some(child) = self.child_of(&path) {
            if let Some(n) = self.per_child.get_mut(child) {
                *n -= 1;
                if *n == 0 {
                    self.per_child.remove(child);
                }
            }
        }
        Some(path)
    }

    /// Events queued.
    pub fn len(&self) -> usize {
        self.paths.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }

    /// How many times events have collapsed.
    pub fn collapsed(&self) -> u64 {
        self.collapsed
    }
}

/// A pollable stream of changed paths; dropping it unregisters the watch. `as_fd` must return the
/// same open descriptor, owned by the watch, for its whole life.
///
/// Events are bounded (see [`MAX_QUEUED_EVENTS`] and [`MAX_QUEUED_PER_CHILD`]); past a bound
/// they collapse into one event for an ancestor (the watched path, or its child the flood came
/// from), so a consumer must treat an event for a path above the ones it cares about as "read
/// everything beneath it again".
pub trait StoreWatch: AsFd + Send + Sync + 'static {
    /// The next changed path without blocking (`None` if nothing is queued).
    fn try_next(&self) -> Result<Option<String>>;
}

#[cfg(test)]
mod watch_events_tests {
    use super::*;

    fn drain(q: &mut WatchEvents) -> Vec<String> {
        std::iter::from_fn(|| q.pop()).collect()
    }

    #[test]
    fn one_flooding_child_collapses_alone() {
        let mut q = WatchEvents::new("/local/domain");
        q.push("/local/domain".into());
        q.push("/local/domain/8/data/dombus/want/1".into());
        for i in 0..10 * MAX_QUEUED_PER_CHILD {
            q.push(format!("/local/domain/9/data/x{i}"));
        }
        q.push("/local/domain/7/data/y".into());
        assert!(q.len() <= MAX_QUEUED_PER_CHILD + 3, "{} queued", q.len());
        let events = drain(&mut q);
        assert_eq!(events[0], "/local/domain");
        assert_eq!(events[1], "/local/domain/8/data/dombus/want/1");
        assert!(events.contains(&"/local/domain/9".to_string()), "{events:?}");
        assert_eq!(events.last().map(String::as_str), Some("/local/domain/7/data/y"));
        assert!(q.per_child.is_empty());
        assert!(q.collapsed() >= 1);
        // Not a child of domain 9: domain 90.
        let mut q = WatchEvents::new("/local/domain");
        for _ in 0..MAX_QUEUED_PER_CHILD {
            q.push("/local/domain/90/x".into());
        }
        q.push("/local/domain/9".into());
        q.push("/local/domain/9/x".into());
        assert_eq!(q.collapsed(), 0);
    }

    #[test]
    fn many_children_collapse_into_the_watched_path() {
        let mut q = WatchEvents::new("/local/domain");
        for i in 0..MAX_QUEUED_EVENTS + 10 {
            q.push(format!("/local/domain/{i}/x"));
        }
        let events = drain(&mut q);
        assert!(events.len() <= 11, "{}", events.len());
        assert_eq!(events[0], "/local/domain");
        assert!(q.per_child.is_empty());
    }

    /// Takes `p` from the queue's consumer's point of view: an event for a path satisfies itself,
    /// an event for an ancestor satisfies everything beneath it.
    fn take(outstanding: &mut std::collections::HashMap<String, usize>, p: &str) {
        if p.contains("/data/") {
            if let Some(n) = outstanding.get_mut(p) {
                *n -= 1;
                if *n == 0 {
                    outstanding.remove(p);
                }
            }
        } else {
            let prefix = format!("{p}/");
            outstanding.retain(|o, _| !o.starts_with(&prefix));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Whatever is written, the queue stays within its bounds, its per-child counts match
        /// what it holds, and no event is lost: every path pushed is taken, or an event for an
        /// ancestor of it (or the watched path) is taken after it was pushed.
        #[test]
        fn bounded_and_nothing_lost(ops in proptest::collection::vec((0u8..4, 0u16..100, 0u16..50), 0..12_000)) {
            let mut q = WatchEvents::new("/local/domain");
            let mut outstanding = std::collections::HashMap::<String, usize>::new();
            for (op, child, leaf) in ops {
                if op == 0 {
                    if let Some(p) = q.pop() {
                        take(&mut outstanding, &p);
                    }
                } else {
                    let path = format!("/local/domain/{child}/data/{leaf}");
                    q.push(path.clone());
                    *outstanding.entry(path).or_default() += 1;
                }
                proptest::prop_assert!(q.len() <= MAX_QUEUED_EVENTS);
                let counted: usize = q.per_child.values().sum();
                let children = q.paths.iter().filter(|p| q.child_of(p).is_some()).count();
                proptest::prop_assert_eq!(counted, children);
                proptest::prop_assert!(q.per_child.values().all(|&n| n > 0 && n <= MAX_QUEUED_PER_CHILD));
            }
            while let Some(p) = q.pop() {
                take(&mut outstanding, &p);
            }
            proptest::prop_assert!(outstanding.is_empty(), "{} paths lost", outstanding.len());
        }
    }

    #[test]
    fn special_names_and_other_paths_queue_as_they_are() {
        let mut q = WatchEvents::new("@releaseDomain");
        for _ in 0..MAX_QUEUED_PER_CHILD * 2 {
            q.push("@releaseDomain".into());
        }
        assert_eq!(q.len(), MAX_QUEUED_PER_CHILD * 2);
        assert_eq!(q.collapsed(), 0);
    }
}
