//! The simulator daemon: domains, grant tables, event channels and the store.
//!
//! One thread accepts connections; each connection has a reader thread (requests, handled under
//! the one state lock) and a writer thread fed by a bounded queue. Nothing is written to a socket
//! while the lock is held: handlers only `try_send` into queues, and a domain whose queue
//! overflows is disconnected (and so dies) without affecting anyone else.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;

use rustix::event::{PollFd, PollFlags};
use rustix::net::{AddressFamily, Shutdown, SocketAddrUnix, SocketFlags, SocketType};

use super::fdpass::{self, Received};
use super::mem;
use super::proto::{self, ClientMsg, Event, MAX_FDS, Op, Reply, ServerMsg, WireError};
use super::store::{Fire, StoreTree};
use super::token::{self, Credential, Secret};
use dombus_transport_xen::types::{DomId, PAGE_SIZE};

/// Messages queued for one domain before it is considered unresponsive and disconnected.
pub const QUEUE_LEN: usize = 4096;
/// Bytes queued for one domain before it is considered unresponsive and disconnected (its
/// replies can be up to [`proto::MAX_MSG`] each: without this, a domain asking for large
/// directories and never reading would make the daemon hold `QUEUE_LEN` × 64 KiB = 256 MiB).
pub const QUEUE_BYTES: usize = 4 << 20;
/// How long the daemon waits on a domain's full socket before disconnecting it.
pub const SEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Largest allocation of one `share_pages` call, in pages.
pub const MAX_SHARE_PAGES: u32 = 8192;
/// Grants one domain may have live.
pub const MAX_GRANTS: usize = 65_536;
/// Pages one domain may have mapped from others at once, over all its live mappings (Xen bounds
/// this with the mapper's maptrack table). Past it, `map_grants` fails with `Limit`; every
/// mapping record costs the daemon about 24 bytes per page, so this bounds what one domain
/// makes the daemon hold for its mappings to about 1.5 MiB.
pub const MAX_MAPPED_PAGES: usize = 65_536;
/// Descriptors the daemon holds for one domain: one memfd per live allocation, two eventfds per
/// port. Without it one domain could take every descriptor of the daemon (65,536 one-page
/// allocations, or 4,096 ports) and so deny every other domain new grants and ports. The
/// daemon raises its own descriptor limit to the hard limit at start.
pub const MAX_DOMAIN_FDS: usize = 2048;
/// Descriptors the daemon holds for dom0, which (as the backend domain with the connection
/// manager) serves one link to every other domain: three descriptors per link with one-page
/// rings, five with the default rings, so room for 3,276 to 5,461 domains — past the 4,096 ports
/// ([`MAX_PORTS`]) a domain has anyway.
pub const MAX_DOM0_FDS: usize = 16_384;

/// The descriptors the daemon holds at most for domain `d`.
pub fn fd_limit(d: DomId) -> usize {
    if d == DomId::DOM0 { MAX_DOM0_FDS } else { MAX_DOMAIN_FDS }
}
/// Event-channel ports per domain (Xen's 2-level ABI limit on 64-bit).
pub const MAX_PORTS: u32 = 4096;
/// Domains created and not attached yet (each holds an id and a token).
pub const MAX_CREATED: usize = 1024;
/// First grant ref handed out (Xen reserves the first few entries).
pub const FIRST_REF: u32 = 8;

type Fds = Vec<Arc<OwnedFd>>;

/// Sends to one domain through its bounded queue.
#[derive(Clone)]
struct Outbox {
    tx: SyncSender<(Vec<u8>, Fds)>,
    sock: Arc<OwnedFd>,
    kicked: Arc<AtomicBool>,
    /// Bytes in `tx` not yet written (bounded by [`QUEUE_BYTES`]).
    queued: Arc<AtomicUsize>,
    /// Set when this connection's domain is migrated (to its new id): the connection is frozen,
    /// none of its requests acts any more.
    migrated: Arc<OnceLock<DomId>>,
    domid: DomId,
}

impl Outbox {
    fn push(&self, msg: &ServerMsg, fds: Fds) {
        let bytes = match proto::encode(msg) {
            Ok(b) => b,
            Err(e) => {
                // Only replies can be that large (a huge directory listing): answer with the error.
                let ServerMsg::Reply { id, .. } = msg else {
                    tracing::warn!("dropping unencodable message to domain {}: {e}", self.domid);
                    return;
                };
                let reply = ServerMsg::Reply { id: *id, result: Err(e) };
                match proto::encode(&reply) {
                    Ok(b) => return self.push_bytes(b, Vec::new()),
                    Err(_) => return,
                }
            }
        };
        self.push_bytes(bytes, fds);
    }

    fn push_bytes(&self, bytes: Vec<u8>, fds: Fds) {
        let n = bytes.len();
        let before = self.queued.fetch_add(n, Ordering::SeqCst);
        if before + n > QUEUE_BYTES {
            self.queued.fetch_sub(n, Ordering::SeqCst);
            return self.kick(format_args!("{before} bytes queued"));
        }
        match self.tx.try_send((bytes, fds)) {
            Ok(()) => {}
            Err(TrySendError::Disconnected(_)) => {
                self.queued.fetch_sub(n, Ordering::SeqCst);
            }
            Err(TrySendError::Full(_)) => {
                self.queued.fetch_sub(n, Ordering::SeqCst);
                self.kick(format_args!("{QUEUE_LEN} messages queued"));
            }
        }
    }

    /// Disconnects a domain that does not read what it is sent.
    fn kick(&self, why: std::fmt::Arguments<'_>) {
        if !self.kicked.swap(true, Ordering::SeqCst) {
            tracing::warn!("domain {} does not read its connection ({why}): disconnecting it", self.domid);
        }
        let _ = rustix::net::shutdown(&*self.sock, Shutdown::Both);
    }
}

struct Grant {
    remote: DomId,
    writable: bool,
    alloc: u64,
    page: u32,
    fd: Arc<OwnedFd>,
}

struct Alloc {
    fd: Arc<OwnedFd>,
    refs: Vec<u32>,
    notify: Option<(u64, Option<u32>)>,
}

struct MapRec {
    pages: Vec<(Arc<OwnedFd>, u32)>,
    writable: bool,
    notify: Option<(u64, Option<u32>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortState {
    Unbound { remote: DomId },
    Bound { remote: DomId, remote_port: u32 },
}

/// An event-channel port. The two eventfds belong to the *channel*, not to a binding: `own` is
/// where this port receives, `slot` is where whoever binds to it (its peer) receives. Binding to
/// `p` creates `q` with `q.own = p.slot` and `q.slot = p.own`, so the eventfd a domain caches for
/// signalling (`slot`) never goes stale: when the peer closes and another binds, the new peer
/// receives on the same eventfd (drained at bind time, so events sent while unbound are
/// dropped, as on Xen).
struct Port {
    own: Arc<OwnedFd>,
    slot: Arc<OwnedFd>,
    state: PortState,
}

/// Fails with `Limit` if `dom` may not hold `more` descriptors more.
fn fd_room(d: DomId, dom: &Domain, more: usize) -> Result<(), WireError> {
    let held = dom.allocs.len() + 2 * dom.ports.len();
    let limit = fd_limit(d);
    if held + more > limit {
        return Err(WireError::Limit(format!(
            "domain {d} holds {held} descriptors of the hypervisor (one per allocation, two per port); the limit is {limit}"
        )));
    }
    Ok(())
}

struct Domain {
    name: String,
    out: Outbox,
    grants: BTreeMap<u32, Grant>,
    next_ref: u32,
    allocs: HashMap<u64, Alloc>,
    maps: HashMap<u64, MapRec>,
    /// Pages over all of `maps` (bounded by [`MAX_MAPPED_PAGES`]).
    mapped_pages: usize,
    ports: BTreeMap<u32, Port>,
}

struct State {
    domains: BTreeMap<DomId, Domain>,
    store: StoreTree,
    next_id: u64,
    /// The toolstack key.
    key: Secret,
    /// Domains created and waiting for their process: name and token.
    created: BTreeMap<DomId, (String, Secret)>,
    /// Those of `created` that a migration made: their token is the migrated process's alone,
    /// so creating them again (which would hand out a new token) is refused.
    migrated: std::collections::BTreeSet<DomId>,
}

type Answer = (Result<Reply, WireError>, Fds);

fn not_found(msg: impl Into<String>) -> WireError {
    WireError::NotFound(msg.into())
}

fn io_err(what: &str, e: io::Error) -> WireError {
    WireError::Unavailable(format!("{what}: {e}"))
}

impl State {
    fn new(key: Secret) -> State {
        State {
            domains: BTreeMap::new(),
            store: StoreTree::default(),
            next_id: 0,
            key,
            created: BTreeMap::new(),
            migrated: std::collections::BTreeSet::new(),
        }
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn dom(&mut self, d: DomId) -> Result<&mut Domain, WireError> {
        self.domains.get_mut(&d).ok_or_else(|| not_found(format!("no domain {d}")))
    }

    fn push(&self, d: DomId, msg: &ServerMsg, fds: Fds) {
        if let Some(dom) = self.domains.get(&d) {
            dom.out.push(msg, fds);
        }
    }

    fn deliver(&self, fires: Vec<Fire>) {
        for f in fires {
            self.push(f.dom, &ServerMsg::Event(Event::Watch { watch: f.watch, path: f.path }), Vec::new());
        }
    }

    /// The peer port `remote_port` of `remote` goes back to unbound (towards `closer`), receives
    /// one final event, and its domain learns that its cached peer eventfd is stale.
    fn close_peer(&mut self, remote: DomId, remote_port: u32, closer: DomId) {
        let Some(dom) = self.domains.get_mut(&remote) else {
            return;
        };
        let Some(p) = dom.ports.get_mut(&remote_port) else {
            return;
        };
        p.state = PortState::Unbound { remote: closer };
        mem::signal(&*p.own);
    }

    /// Signals the other end of port `port` in `ports` (a removed domain's port table).
    fn signal_peer(ports: &BTreeMap<u32, Port>, port: u32) {
        if let Some(p) = ports.get(&port) {
            if matches!(p.state, PortState::Bound { .. }) {
                mem::signal(&*p.slot);
            }
        }
    }

    /// Whether domain `id` is attached by a live connection. One whose holder has let go (and
    /// whose connection's thread has not buried it yet) is buried now, so that an id is free
    /// again as soon as its process exits.
    fn attached(&mut self, id: DomId) -> bool {
        match self.domains.get(&id) {
            Some(dom) if !hung_up(&dom.out.sock) => true,
            Some(_) => {
                tracing::info!("domain {id}: its holder hung up; buried now");
                self.death(id);
                false
            }
            None => false,
        }
    }

    /// Creates domain `requested` (or the lowest free id >= 1) for a process to attach as:
    /// the toolstack's privilege, checked against its key. Creating an id again replaces the
    /// token it was created with.
    fn create(&mut self, key: &str, requested: Option<DomId>, name: &str) -> Result<Reply, WireError> {
        self.check_key(key, "creating a domain")?;
        if name.len() > 256 {
            return Err(WireError::InvalidArgument("domain name longer than 256 bytes".into()));
        }
        let id = match requested {
            Some(DomId::DOM0) => {
                return Err(WireError::InvalidArgument(
                    "domain 0 is the toolstack's: it attaches with the toolstack key".into(),
                ));
            }
            Some(id) if !id.is_guest_id() => {
                return Err(WireError::InvalidArgument(format!(
                    "domain id {id} is reserved (guest ids are 0..={})",
                    DomId::MAX_GUEST.0
                )));
            }
            Some(id) if self.attached(id) => {
                return Err(WireError::AlreadyExists(format!("domain {id} is already attached")));
            }
            Some(id) if self.migrated.contains(&id) => {
                return Err(WireError::AlreadyExists(format!(
                    "domain {id} is a migrated domain waiting for its process to attach"
                )));
            }
            Some(id) => id,
            None => {
                let free = (1..=DomId::MAX_GUEST.0)
                    .map(DomId)
                    .find(|i| !self.created.contains_key(i) && !self.domains.contains_key(i));
                match free {
                    Some(id) => id,
                    None => return Err(WireError::Limit("no free domain id".into())),
                }
            }
        };
        if !self.created.contains_key(&id) && self.created.len() >= MAX_CREATED {
            return Err(WireError::Limit(format!("{MAX_CREATED} domains created and not attached yet")));
        }
        let secret = Secret::random().map_err(|e| io_err("cannot make a token", e))?;
        self.created.insert(id, (name.to_string(), secret));
        Ok(Reply::Created { domid: id, token: token::token_text(id, &secret) })
    }

    /// Fails with `PermissionDenied` unless `key` is the toolstack key (`what` needs it).
    fn check_key(&self, key: &str, what: &str) -> Result<(), WireError> {
        match Credential::parse(key) {
            Some(Credential::Key(k)) if k.matches(&self.key) => Ok(()),
            _ => Err(WireError::PermissionDenied(format!("{what} needs the toolstack key"))),
        }
    }

    /// Migrates domain `d`, as the toolstack: Xen moves no grants and the domain id changes.
    ///
    /// Freeze: from this call on, no request of `d`'s attachment acts (the connection answers
    /// each with `Migrated`); then `d` ends exactly as a death does ([`State::death`]); its name
    /// is introduced under a new id (the lowest free one other than `d`), which waits, like a
    /// created domain, for its process to attach with a one-time token. That token goes to the
    /// old attachment alone, as its connection's last message, and the connection is closed.
    fn migrate(&mut self, key: &str, d: DomId) -> Result<Reply, WireError> {
        self.check_key(key, "migrating a domain")?;
        if d == DomId::DOM0 {
            return Err(WireError::InvalidArgument(
                "domain 0 is the toolstack's: it does not migrate".into(),
            ));
        }
        if !self.attached(d) {
            return Err(not_found(format!("domain {d} is not attached")));
        }
        if self.created.len() >= MAX_CREATED {
            return Err(WireError::Limit(format!("{MAX_CREATED} domains created and not attached yet")));
        }
        let to = (1..=DomId::MAX_GUEST.0)
            .map(DomId)
            .find(|&i| i != d && !self.created.contains_key(&i) && !self.domains.contains_key(&i))
            .ok_or_else(|| WireError::Limit("no free domain id to migrate to".into()))?;
        let secret = Secret::random().map_err(|e| io_err("cannot make a token", e))?;
        let (name, out) = match self.domains.get(&d) {
            Some(dom) => (dom.name.clone(), dom.out.clone()),
            None => return Err(not_found(format!("domain {d} is not attached"))),
        };
        // Freeze first: the connection's thread checks this under the state lock we hold.
        let _ = out.migrated.set(to);
        self.death(d);
        match self.store.introduce(to, &name) {
            Ok(fires) => self.deliver(fires),
            Err(e) => tracing::warn!("migrating domain {d} to {to}: cannot introduce its name: {e}"),
        }
        self.created.insert(to, (name.clone(), secret));
        self.migrated.insert(to);
        out.push(&ServerMsg::Migrated { to, token: token::token_text(to, &secret) }, Vec::new());
        // No more requests: the connection's thread reads what is queued, then the end.
        let _ = rustix::net::shutdown(&*out.sock, Shutdown::Read);
        tracing::info!("domain {d} ({name}) migrated: it is domain {to} once its process attaches again");
        Ok(Reply::Migrated { to })
    }

    /// Attaches the connection `out` as the domain its credential names: domain 0 for the
    /// toolstack key, a created domain for its token (spent by this).
    fn attach(&mut self, credential: &str, out: Outbox) -> Result<DomId, WireError> {
        let (id, name) = match Credential::parse(credential) {
            Some(Credential::Key(k)) if k.matches(&self.key) => (DomId::DOM0, "Domain-0".to_string()),
            Some(Credential::Token(id, t)) if self.created.get(&id).is_some_and(|(_, s)| s.matches(&t)) => {
                self.migrated.remove(&id);
                (id, self.created.remove(&id).map(|(name, _)| name).unwrap_or_default())
            }
            _ => {
                return Err(WireError::PermissionDenied(
                    "not a valid credential: attach with a token from the toolstack (spent once used) or the toolstack key"
                        .into(),
                ));
            }
        };
        if self.attached(id) {
            return Err(WireError::AlreadyExists(format!("domain {id} is already attached")));
        }
        let name = name.as_str();
        let fires = self.store.introduce(id, name)?;
        let out = Outbox { domid: id, ..out };
        self.domains.insert(
            id,
            Domain {
                name: name.to_string(),
                out,
                grants: BTreeMap::new(),
                next_ref: FIRST_REF,
                allocs: HashMap::new(),
                maps: HashMap::new(),
                mapped_pages: 0,
                ports: BTreeMap::new(),
            },
        );
        self.deliver(fires);
        Ok(id)
    }

    /// Death of `d`, in Xen's order: unmap notifications, event channels, watches, the store
    /// home and `@releaseDomain`, then the grant table (existing mappings stay valid).
    fn death(&mut self, d: DomId) {
        let Some(dom) = self.domains.remove(&d) else {
            return;
        };
        // (1) Unmap notifications.
        let shares =
            dom.allocs.values().filter_map(|a| a.notify.map(|(off, port)| (a.fd.clone(), off, port)));
        let maps = dom.maps.values().filter_map(|m| {
            let (off, port) = m.notify?;
            let (fd, page) = m.pages.get(off as usize / PAGE_SIZE)?;
            Some((fd.clone(), u64::from(*page) * PAGE_SIZE as u64 + off % PAGE_SIZE as u64, port))
        });
        for (fd, off, port) in shares.chain(maps).collect::<Vec<_>>() {
            if let Err(e) = mem::clear_byte(&*fd, off) {
                tracing::warn!("unmap notification of dead domain {d}: cannot clear byte {off}: {e}");
            }
            if let Some(port) = port {
                State::signal_peer(&dom.ports, port);
            }
        }
        // (2) Event channels.
        for p in dom.ports.values() {
            if let PortState::Bound { remote, remote_port } = p.state {
                self.close_peer(remote, remote_port, d);
            }
        }
        // (3) Watches, (4) home and @releaseDomain.
        self.store.remove_watches(d);
        let fires = self.store.release(d);
        self.deliver(fires);
        // (5) The grant table goes with `dom`; mappings elsewhere hold their own fds.
        tracing::info!(
            "domain {d} ({}) died: {} grants revoked, {} ports closed",
            dom.name,
            dom.grants.len(),
            dom.ports.len()
        );
    }

    fn share(&mut self, d: DomId, remote: DomId, count: u32, writable: bool) -> Answer {
        let r = (|| {
            if !remote.is_guest_id() {
                return Err(WireError::InvalidArgument(format!(
                    "cannot grant to reserved domain id {remote}"
                )));
            }
            if count == 0 || count > MAX_SHARE_PAGES {
                return Err(WireError::InvalidArgument(format!(
                    "page count {count} not in 1..={MAX_SHARE_PAGES}"
                )));
            }
            if self.dom(d)?.grants.len() + count as usize > MAX_GRANTS {
                return Err(WireError::Limit(format!("domain {d} would exceed {MAX_GRANTS} grants")));
            }
            fd_room(d, self.dom(d)?, 1)?;
            let fd = Arc::new(mem::memfd(count as usize).map_err(|e| io_err("cannot allocate pages", e))?);
            let alloc = self.fresh_id();
            let dom = self.dom(d)?;
            let mut refs = Vec::with_capacity(count as usize);
            for page in 0..count {
                let mut r = dom.next_ref;
                while dom.grants.contains_key(&r) {
                    r = r.checked_add(1).unwrap_or(FIRST_REF);
                }
                dom.next_ref = r.checked_add(1).unwrap_or(FIRST_REF);
                dom.grants.insert(r, Grant { remote, writable, alloc, page, fd: fd.clone() });
                refs.push(r);
            }
            dom.allocs.insert(alloc, Alloc { fd: fd.clone(), refs: refs.clone(), notify: None });
            Ok((Reply::Shared { alloc, refs }, vec![fd]))
        })();
        split(r)
    }

    fn map(&mut self, d: DomId, granter: DomId, refs: &[u32], writable: bool) -> Answer {
        let r = (|| {
            if refs.is_empty() || refs.len() > MAX_SHARE_PAGES as usize {
                return Err(WireError::InvalidArgument(format!(
                    "{} refs not in 1..={MAX_SHARE_PAGES}",
                    refs.len()
                )));
            }
            let mapped = self.dom(d)?.mapped_pages;
            if mapped + refs.len() > MAX_MAPPED_PAGES {
                return Err(WireError::Limit(format!(
                    "domain {d} has {mapped} pages mapped; {} more would exceed {MAX_MAPPED_PAGES}",
                    refs.len()
                )));
            }
            let g = self
                .domains
                .get(&granter)
                .ok_or_else(|| not_found(format!("domain {granter} has no grants")))?;
            let mut fds: Vec<(u64, Arc<OwnedFd>)> = Vec::new();
            let mut pages = Vec::with_capacity(refs.len());
            let mut keep = Vec::with_capacity(refs.len());
            for r in refs {
                let grant =
                    g.grants.get(r).ok_or_else(|| not_found(format!("grant ref {r} of domain {granter}")))?;
                if grant.remote != d {
                    return Err(WireError::PermissionDenied(format!(
                        "grant ref {r} of domain {granter} is for domain {}, not {d}",
                        grant.remote
                    )));
                }
                if writable && !grant.writable {
                    return Err(WireError::PermissionDenied(format!(
                        "grant ref {r} of domain {granter} is read-only"
                    )));
                }
                let idx = match fds.iter().position(|(a, _)| *a == grant.alloc) {
                    Some(i) => i,
                    None => {
                        fds.push((grant.alloc, grant.fd.clone()));
                        fds.len() - 1
                    }
                };
                if fds.len() > MAX_FDS {
                    return Err(WireError::Limit(format!("refs span more than {MAX_FDS} allocations")));
                }
                pages.push((idx as u32, grant.page));
                keep.push((grant.fd.clone(), grant.page));
            }
            let mut out = Vec::with_capacity(fds.len());
            for (_, fd) in fds {
                if writable {
                    out.push(fd);
                } else {
                    let ro =
                        mem::reopen_read_only(fd.as_fd()).map_err(|e| io_err("cannot reopen pages", e))?;
                    out.push(Arc::new(ro));
                }
            }
            let map = self.fresh_id();
            let dom = self.dom(d)?;
            dom.mapped_pages += keep.len();
            dom.maps.insert(map, MapRec { pages: keep, writable, notify: None });
            Ok((Reply::Mapped { map, pages }, out))
        })();
        split(r)
    }

    fn bind_unbound(&mut self, d: DomId, handle: u64, remote: DomId) -> Answer {
        let r = (|| {
            let remote = if remote == DomId::SELF { d } else { remote };
            if !remote.is_guest_id() {
                return Err(WireError::InvalidArgument(format!("invalid remote domain {remote}")));
            }
            let own = Arc::new(mem::eventfd().map_err(|e| io_err("cannot create eventfd", e))?);
            let slot = Arc::new(mem::eventfd().map_err(|e| io_err("cannot create eventfd", e))?);
            let dom = self.dom(d)?;
            fd_room(d, dom, 2)?;
            let port = free_port(dom)?;
            dom.ports.insert(
                port,
                Port { own: own.clone(), slot: slot.clone(), state: PortState::Unbound { remote } },
            );
            Ok((Reply::Port { handle, port }, vec![own, slot]))
        })();
        split(r)
    }

    fn bind_interdomain(&mut self, d: DomId, handle: u64, remote: DomId, remote_port: u32) -> Answer {
        let r = (|| {
            let remote = if remote == DomId::SELF { d } else { remote };
            let rdom = self.domains.get(&remote).ok_or_else(|| not_found(format!("no domain {remote}")))?;
            let rp = rdom
                .ports
                .get(&remote_port)
                .ok_or_else(|| not_found(format!("no port {remote_port} in domain {remote}")))?;
            match rp.state {
                PortState::Unbound { remote: allowed } if allowed == d => {}
                PortState::Unbound { remote: allowed } => {
                    return Err(WireError::PermissionDenied(format!(
                        "port {remote_port} of domain {remote} was allocated for domain {allowed}, not {d}"
                    )));
                }
                PortState::Bound { .. } => {
                    return Err(WireError::InvalidArgument(format!(
                        "port {remote_port} of domain {remote} is already bound"
                    )));
                }
            }
            // As Xen: notifications sent to the unbound end may have been lost, so the new local
            // port starts out pending (Xen's evtchn_bind_interdomain sets it conservatively).
            mem::signal(&*rp.slot);
            let (own, slot) = (rp.slot.clone(), rp.own.clone());
            let dom = self.dom(d)?;
            fd_room(d, dom, 2)?;
            let port = free_port(dom)?;
            dom.ports.insert(
                port,
                Port {
                    own: own.clone(),
                    slot: slot.clone(),
                    state: PortState::Bound { remote, remote_port },
                },
            );
            if let Some(rp) = self.dom(remote)?.ports.get_mut(&remote_port) {
                rp.state = PortState::Bound { remote: d, remote_port: port };
            }
            Ok((Reply::Port { handle, port }, vec![own, slot]))
        })();
        split(r)
    }

    fn unbind(&mut self, d: DomId, port: u32) -> Result<Reply, WireError> {
        let p = self.dom(d)?.ports.remove(&port).ok_or_else(|| not_found(format!("no port {port}")))?;
        if let PortState::Bound { remote, remote_port } = p.state {
            self.close_peer(remote, remote_port, d);
        }
        Ok(Reply::Unbound { port })
    }

    fn set_notify(
        &mut self,
        d: DomId,
        share: Option<u64>,
        map: Option<u64>,
        offset: u64,
        port: Option<u32>,
    ) -> Result<Reply, WireError> {
        let dom = self.dom(d)?;
        let (pages, slot) = if let Some(a) = share {
            let a = dom.allocs.get_mut(&a).ok_or_else(|| not_found(format!("no allocation {a}")))?;
            (a.refs.len(), &mut a.notify)
        } else if let Some(m) = map {
            let m = dom.maps.get_mut(&m).ok_or_else(|| not_found(format!("no mapping {m}")))?;
            if !m.writable {
                // Clearing a byte through a read-only mapping would let a read-only mapper write
                // the granter's page (Linux's gntdev refuses UNMAP_NOTIFY_CLEAR_BYTE there too).
                return Err(WireError::PermissionDenied(
                    "an unmap notification clears a byte: the mapping is read-only".into(),
                ));
            }
            (m.pages.len(), &mut m.notify)
        } else {
            return Err(WireError::InvalidArgument("nothing to notify about".into()));
        };
        if offset >= (pages * PAGE_SIZE) as u64 {
            return Err(WireError::InvalidArgument(format!("notify offset {offset} outside {pages} pages")));
        }
        *slot = Some((offset, port));
        Ok(Reply::Done)
    }

    /// Handles one request of domain `d`: the reply, its fds, and the watch events it caused
    /// (sent after the reply).
    fn handle(&mut self, d: DomId, op: Op) -> (Result<Reply, WireError>, Fds, Vec<Fire>) {
        let store = |r: Result<Vec<Fire>, WireError>| match r {
            Ok(fires) => (Ok(Reply::Done), Vec::new(), fires),
            Err(e) => (Err(e), Vec::new(), Vec::new()),
        };
        let plain = |(r, fds): Answer| (r, fds, Vec::new());
        match op {
            Op::Hello { .. } => {
                plain((Err(WireError::InvalidArgument("already attached".into())), Vec::new()))
            }
            Op::Create { key, domid, name } => plain((self.create(&key, domid, &name), Vec::new())),
            Op::Migrate { key, domid } => plain((self.migrate(&key, domid), Vec::new())),
            Op::SharePages { remote, count, writable } => plain(self.share(d, remote, count, writable)),
            Op::Revoke { alloc } => {
                let r = self.dom(d).and_then(|dom| {
                    let a = dom
                        .allocs
                        .remove(&alloc)
                        .ok_or_else(|| not_found(format!("no allocation {alloc}")))?;
                    for r in a.refs {
                        dom.grants.remove(&r);
                    }
                    Ok(Reply::Done)
                });
                plain((r, Vec::new()))
            }
            Op::SetShareNotify { alloc, offset, port } => {
                plain((self.set_notify(d, Some(alloc), None, offset, port), Vec::new()))
            }
            Op::MapGrants { granter, refs, writable } => plain(self.map(d, granter, &refs, writable)),
            Op::Unmap { map } => {
                let r = self.dom(d).and_then(|dom| {
                    let m = dom.maps.remove(&map).ok_or_else(|| not_found(format!("no mapping {map}")))?;
                    dom.mapped_pages -= m.pages.len();
                    Ok(Reply::Done)
                });
                plain((r, Vec::new()))
            }
            Op::SetMapNotify { map, offset, port } => {
                plain((self.set_notify(d, None, Some(map), offset, port), Vec::new()))
            }
            Op::BindUnbound { handle, remote } => plain(self.bind_unbound(d, handle, remote)),
            Op::BindInterdomain { handle, remote, remote_port } => {
                plain(self.bind_interdomain(d, handle, remote, remote_port))
            }
            Op::Unbind { port } => plain((self.unbind(d, port), Vec::new())),
            Op::Read { path } => plain((self.store.read(d, &path).map(Reply::Value), Vec::new())),
            Op::Directory { path } => plain((self.store.directory(d, &path).map(Reply::Names), Vec::new())),
            Op::GetPerms { path } => plain((self.store.get_perms(d, &path).map(Reply::Perms), Vec::new())),
            Op::Write { path, value } => store(self.store.write(d, &path, &value)),
            Op::Mkdir { path } => store(self.store.mkdir(d, &path)),
            Op::Rm { path } => store(self.store.rm(d, &path)),
            Op::SetPerms { path, perms } => store(self.store.set_perms(d, &path, &perms)),
            Op::Watch { watch, path } => store(self.store.watch(d, watch, &path)),
            Op::Unwatch { watch } => plain((self.store.unwatch(d, watch).map(|()| Reply::Done), Vec::new())),
        }
    }
}

fn split(r: Result<(Reply, Fds), WireError>) -> Answer {
    match r {
        Ok((reply, fds)) => (Ok(reply), fds),
        Err(e) => (Err(e), Vec::new()),
    }
}

fn free_port(dom: &Domain) -> Result<u32, WireError> {
    (1..MAX_PORTS)
        .find(|p| !dom.ports.contains_key(p))
        .ok_or_else(|| WireError::Limit(format!("all {MAX_PORTS} event-channel ports in use")))
}

struct Daemon {
    state: Mutex<State>,
    conns: Mutex<HashMap<u64, Arc<OwnedFd>>>,
    next_conn: AtomicU64,
}

impl Daemon {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; keep serving the other domains anyway.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn conns(&self) -> MutexGuard<'_, HashMap<u64, Arc<OwnedFd>>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serves one connection until it closes, then buries its domain.
    fn serve(self: &Arc<Daemon>, conn: u64, sock: Arc<OwnedFd>) {
        // A writer stuck for this long on a domain that does not read is treated as its death.
        if let Err(e) = rustix::net::sockopt::set_socket_timeout(
            &*sock,
            rustix::net::sockopt::Timeout::Send,
            Some(SEND_TIMEOUT),
        ) {
            tracing::warn!("connection {conn}: cannot set send timeout: {e}");
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LEN);
        let queued = Arc::new(AtomicUsize::new(0));
        let out = Outbox {
            tx,
            sock: sock.clone(),
            kicked: Arc::new(AtomicBool::new(false)),
            queued: queued.clone(),
            migrated: Arc::new(OnceLock::new()),
            domid: DomId::INVALID,
        };
        let writer_sock = sock.clone();
        let writer = std::thread::Builder::new()
            .name(format!("simxen-w{conn}"))
            .spawn(move || writer_loop(writer_sock, rx, queued));
        if let Err(e) = writer {
            tracing::warn!("connection {conn}: cannot start writer thread: {e}");
            return;
        }
        let mut domid: Option<DomId> = None;
        let mut buf = fdpass::buffer();
        let reason = loop {
            let (len, fds) = match fdpass::recv(&*sock, &mut buf) {
                Ok(Received::Msg { len, fds }) => (len, fds),
                Ok(Received::Eof) => break None,
                Ok(Received::Oversize { reason }) => break Some(reason),
                Err(e) => break Some(format!("receive failed: {e}")),
            };
            if !fds.is_empty() {
                break Some(format!("unexpected {} fds from a domain", fds.len()));
            }
            let msg: ClientMsg = match proto::decode(&buf[..len]) {
                Ok(m) => m,
                Err(e) => break Some(e),
            };
            let id = msg.id;
            let mut st = self.lock();
            // Migrated: nothing it asks acts any more.
            let frozen = out.migrated.get().copied().filter(|_| domid.is_some());
            let (result, fds, fires) = match (domid, msg.op) {
                (Some(_), _) if frozen.is_some() => {
                    let to = frozen.unwrap_or(DomId::INVALID);
                    (Err(WireError::Migrated { to }), Vec::new(), Vec::new())
                }
                (None, Op::Hello { token }) => match st.attach(&token, out.clone()) {
                    Ok(d) => {
                        domid = Some(d);
                        let name = st.domains.get(&d).map(|dom| dom.name.clone()).unwrap_or_default();
                        tracing::info!("domain {d} ({name}) attached");
                        (Ok(Reply::Attached { domid: d }), Vec::new(), Vec::new())
                    }
                    Err(e) => {
                        tracing::warn!("connection {conn}: attach refused: {e}");
                        (Err(e), Vec::new(), Vec::new())
                    }
                },
                (None, Op::Create { key, domid: requested, name }) => {
                    (st.create(&key, requested, &name), Vec::new(), Vec::new())
                }
                (None, Op::Migrate { key, domid: d }) => (st.migrate(&key, d), Vec::new(), Vec::new()),
                (None, _) => {
                    drop(st);
                    break Some("request before Hello".to_string());
                }
                (Some(d), _) if !st.domains.get(&d).is_some_and(|dom| Arc::ptr_eq(&dom.out.sock, &sock)) => {
                    // Buried when it hung up, its id now another connection's: what this one
                    // still had queued must not act on the new domain.
                    drop(st);
                    break Some(format!("domain {d} hung up and was attached again"));
                }
                (Some(d), op) => {
                    let r = st.handle(d, op);
                    if let Err(e) = &r.0 {
                        tracing::debug!("domain {d}: request {id} failed: {e}");
                    }
                    r
                }
            };
            let reply = ServerMsg::Reply { id, result };
            match domid.and_then(|d| st.domains.get(&d)).filter(|dom| Arc::ptr_eq(&dom.out.sock, &sock)) {
                Some(dom) => dom.out.push(&reply, fds),
                None => out.push(&reply, fds),
            }
            st.deliver(fires);
        };
        if let Some(reason) = &reason {
            tracing::warn!("connection {conn} (domain {domid:?}): disconnecting: {reason}");
            out.push(&ServerMsg::Fatal { reason: reason.clone() }, Vec::new());
        }
        if let Some(d) = domid {
            let mut st = self.lock();
            // Unless it was buried already (it hung up, and its id was attached again).
            if st.domains.get(&d).is_some_and(|dom| Arc::ptr_eq(&dom.out.sock, &sock)) {
                st.death(d);
            }
        }
        drop(out);
        // Let the writer flush what is queued (e.g. the Fatal message); it exits when the queue
        // is empty and all senders are gone, or when the socket breaks.
        let _ = rustix::net::shutdown(&*sock, Shutdown::Read);
        self.conns().remove(&conn);
    }
}

/// Whether the domain at the other end of `sock` has closed its connection (its process exited
/// or dropped its attachment), whether or not its thread here has read to the end yet.
fn hung_up(sock: &OwnedFd) -> bool {
    let mut fds = [rustix::event::PollFd::new(sock, rustix::event::PollFlags::RDHUP)];
    let now = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    matches!(rustix::event::poll(&mut fds, Some(&now)), Ok(1))
        && fds[0].revents().intersects(rustix::event::PollFlags::HUP | rustix::event::PollFlags::RDHUP)
}

fn writer_loop(sock: Arc<OwnedFd>, rx: Receiver<(Vec<u8>, Fds)>, queued: Arc<AtomicUsize>) {
    while let Ok((bytes, fds)) = rx.recv() {
        let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
        let sent = fdpass::send(sock.as_fd(), &bytes, &borrowed);
        queued.fetch_sub(bytes.len(), Ordering::SeqCst);
        if let Err(e) = sent {
            tracing::debug!("send to domain failed: {e}");
            break;
        }
    }
    let _ = rustix::net::shutdown(&*sock, Shutdown::Both);
}

/// The simulated hypervisor: a daemon that domains (processes) attach to over a Unix socket.
pub struct SimHypervisor {
    listener: OwnedFd,
    path: PathBuf,
    stop: Arc<OwnedFd>,
    daemon: Arc<Daemon>,
}

/// Stops a running [`SimHypervisor`] (from another thread or a signal handler thread).
#[derive(Clone)]
pub struct SimStopper {
    stop: Arc<OwnedFd>,
}

impl SimStopper {
    /// Asks the daemon to stop: it disconnects every domain and [`SimHypervisor::run`] returns.
    pub fn stop(&self) {
        mem::signal(&*self.stop);
    }
}

/// An in-process daemon on background threads; dropping the handle stops it and removes the
/// socket.
pub struct SimHypervisorHandle {
    stopper: SimStopper,
    thread: Option<JoinHandle<io::Result<()>>>,
    path: PathBuf,
}

impl SimHypervisorHandle {
    /// The socket path domains attach to.
    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// A stopper for this daemon.
    pub fn stopper(&self) -> SimStopper {
        self.stopper.clone()
    }
}

impl Drop for SimHypervisorHandle {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(t) = self.thread.take() {
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("simulator stopped with an error: {e}"),
                Err(_) => tracing::warn!("simulator thread panicked"),
            }
        }
    }
}

impl SimHypervisor {
    /// Creates the listening socket at `socket` (replacing a stale one; refusing if a daemon is
    /// still listening there).
    pub fn bind(socket: &Path) -> io::Result<SimHypervisor> {
        let addr = SocketAddrUnix::new(socket)?;
        if socket.exists() {
            let probe = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::SEQPACKET,
                SocketFlags::CLOEXEC,
                None,
            )?;
            if rustix::net::connect(&probe, &addr).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("a simulator is already listening on {}", socket.display()),
                ));
            }
            std::fs::remove_file(socket)?;
        }
        let listener =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)?;
        // The key first: once the socket exists, so does the key a toolstack attaches with.
        let key = Secret::random()?;
        write_private(&SimHypervisor::key_path(socket), token::key_text(&key).as_bytes())?;
        // The socket appears at its path only once it listens: whoever waits for the path to
        // exist may connect at once. Bound under a name of its own in the same directory, then
        // renamed into place (or, if that name does not fit a socket address, bound in place).
        let name = socket.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let staging = socket.with_file_name(format!(".{name}.new"));
        let (bound_at, staged) = match SocketAddrUnix::new(&staging) {
            Ok(staged_addr) => {
                let _ = std::fs::remove_file(&staging);
                rustix::net::bind(&listener, &staged_addr)?;
                (staging.as_path(), true)
            }
            Err(_) => {
                rustix::net::bind(&listener, &addr)?;
                (socket, false)
            }
        };
        // Only the owner may connect; nobody can before `listen`.
        std::fs::set_permissions(bound_at, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        rustix::net::listen(&listener, 128)?;
        if staged {
            std::fs::rename(&staging, socket)?;
        }
        Ok(SimHypervisor {
            listener,
            path: socket.to_path_buf(),
            stop: Arc::new(mem::eventfd()?),
            daemon: Arc::new(Daemon {
                state: Mutex::new(State::new(key)),
                conns: Mutex::new(HashMap::new()),
                next_conn: AtomicU64::new(1),
            }),
        })
    }

    /// Where the daemon on `socket` keeps the toolstack key (beside the socket, readable by its
    /// owner only): whoever can read it may create domains and attach as domain 0.
    pub fn key_path(socket: &Path) -> PathBuf {
        let mut p = socket.as_os_str().to_owned();
        p.push(".key");
        PathBuf::from(p)
    }

    /// A handle that makes [`SimHypervisor::run`] return.
    pub fn stopper(&self) -> SimStopper {
        SimStopper { stop: self.stop.clone() }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.path
    }

    /// [`SimHypervisor::run`] until the process gets SIGTERM or SIGINT (what a daemon
    /// serving the simulator does; the handlers are installed before serving starts).
    pub fn run_until_signalled(self) -> io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let stopper = self.stopper();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let (mut term, mut int) = {
            let _guard = rt.enter();
            (signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?)
        };
        std::thread::Builder::new().name("signals".into()).spawn(move || {
            rt.block_on(async move {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    _ = int.recv() => tracing::info!("SIGINT received"),
                }
            });
            stopper.stop();
        })?;
        self.run()
    }

    /// Serves domains until stopped (see [`SimHypervisor::stopper`]); then disconnects every
    /// domain, waits for their connections to wind down and removes the socket.
    pub fn run(self) -> io::Result<()> {
        tracing::info!("simulated hypervisor listening on {}", self.path.display());
        raise_fd_limit();
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let result = loop {
            let mut fds =
                [PollFd::new(&self.listener, PollFlags::IN), PollFd::new(&*self.stop, PollFlags::IN)];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) => {}
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => break Err(e.into()),
            }
            if !fds[1].revents().is_empty() {
                break Ok(());
            }
            if fds[0].revents().is_empty() {
                continue;
            }
            let sock = match rustix::net::accept_with(&self.listener, SocketFlags::CLOEXEC) {
                Ok(s) => Arc::new(s),
                Err(rustix::io::Errno::INTR | rustix::io::Errno::AGAIN | rustix::io::Errno::CONNABORTED) => {
                    continue;
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    continue;
                }
            };
            let conn = self.daemon.next_conn.fetch_add(1, Ordering::Relaxed);
            self.daemon.conns().insert(conn, sock.clone());
            let daemon = self.daemon.clone();
            threads.retain(|t| !t.is_finished());
            match std::thread::Builder::new()
                .name(format!("simxen-r{conn}"))
                .spawn(move || daemon.serve(conn, sock))
            {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::warn!("cannot start connection thread: {e}");
                    if let Some(s) = self.daemon.conns().remove(&conn) {
                        let _ = rustix::net::shutdown(&*s, Shutdown::Both);
                    }
                }
            }
        };
        tracing::info!("simulated hypervisor stopping");
        for s in self.daemon.conns().values() {
            let _ = rustix::net::shutdown(&**s, Shutdown::Both);
        }
        for t in threads {
            let _ = t.join();
        }
        result
    }

    /// Runs a daemon on `socket` on background threads (for tests and in-process use).
    pub fn spawn(socket: &Path) -> io::Result<SimHypervisorHandle> {
        let hv = SimHypervisor::bind(socket)?;
        let stopper = hv.stopper();
        let thread = std::thread::Builder::new().name("simxen-accept".into()).spawn(move || hv.run())?;
        Ok(SimHypervisorHandle { stopper, thread: Some(thread), path: socket.to_path_buf() })
    }
}

impl Drop for SimHypervisor {
    fn drop(&mut self) {
        for path in [self.path.clone(), SimHypervisor::key_path(&self.path)] {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!("cannot remove {}: {e}", path.display()),
            }
        }
    }
}

/// Raises this process's descriptor limit to its hard limit: the daemon holds up to
/// [`MAX_DOMAIN_FDS`] descriptors per domain, and logs how many domains that serves at the most.
fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    if limit.current < limit.maximum {
        limit.current = limit.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            tracing::warn!("cannot raise the descriptor limit: {e}");
        }
    }
    let now = getrlimit(Resource::Nofile).current;
    tracing::info!(
        "descriptor limit {}: room for {} domains at their {MAX_DOMAIN_FDS} descriptors each",
        now.map_or_else(|| "unlimited".to_string(), |n| n.to_string()),
        now.map_or_else(|| "any number of".to_string(), |n| (n / MAX_DOMAIN_FDS as u64).to_string())
    );
}

/// Writes `bytes` to `path` readable and writable by the owner only (replacing what was there;
/// never readable by others, not even for a moment).
fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dombus_transport_xen::shmem::SharedMem;

    struct Harness {
        st: State,
        _rx: Vec<Receiver<(Vec<u8>, Fds)>>,
    }

    fn harness(doms: &[u16]) -> Harness {
        let key = Secret::random().unwrap_or_else(|e| panic!("{e}"));
        let mut h = Harness { st: State::new(key), _rx: Vec::new() };
        for d in doms.iter().copied().map(DomId) {
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LEN);
            let sock = Arc::new(mem::eventfd().unwrap_or_else(|e| panic!("eventfd: {e}")));
            let out = Outbox {
                tx,
                sock,
                kicked: Arc::new(AtomicBool::new(false)),
                queued: Arc::new(AtomicUsize::new(0)),
                migrated: Arc::new(OnceLock::new()),
                domid: d,
            };
            let credential = if d == DomId::DOM0 {
                token::key_text(&key)
            } else {
                match h.st.create(&token::key_text(&key), Some(d), "t") {
                    Ok(Reply::Created { token, .. }) => token,
                    other => panic!("create {d}: {other:?}"),
                }
            };
            assert_eq!(h.st.attach(&credential, out).ok(), Some(d));
            h._rx.push(rx);
        }
        h
    }

    fn shared(a: Answer) -> (u64, Vec<u32>, Fds) {
        match a {
            (Ok(Reply::Shared { alloc, refs }), fds) => (alloc, refs, fds),
            other => panic!("share failed: {:?}", other.0),
        }
    }

    fn port(a: Answer) -> (u32, Fds) {
        match a {
            (Ok(Reply::Port { port, .. }), fds) => (port, fds),
            other => panic!("bind failed: {:?}", other.0),
        }
    }

    #[test]
    fn grant_table_rules() {
        let mut h = harness(&[1, 2, 3]);
        let st = &mut h.st;
        let (alloc, refs, _) = shared(st.share(DomId(1), DomId(2), 2, false));
        assert!(refs.iter().all(|r| *r >= FIRST_REF));
        // Refs are per granting domain: domain 2's first grant gets the same number.
        let (_, refs2, _) = shared(st.share(DomId(2), DomId(1), 1, true));
        assert_eq!(refs2[0], refs[0]);
        assert!(matches!(st.map(DomId(2), DomId(1), &refs, false), (Ok(Reply::Mapped { .. }), _)));
        assert!(matches!(st.map(DomId(3), DomId(1), &refs, false).0, Err(WireError::PermissionDenied(_))));
        assert!(matches!(st.map(DomId(2), DomId(1), &refs, true).0, Err(WireError::PermissionDenied(_))));
        assert!(matches!(st.map(DomId(2), DomId(1), &[0], false).0, Err(WireError::NotFound(_))));
        assert!(matches!(st.map(DomId(2), DomId(9), &refs, false).0, Err(WireError::NotFound(_))));
        // Read-only maps get an O_RDONLY fd: it cannot be mapped writable.
        let (_, fds) = match st.map(DomId(2), DomId(1), &refs[..1], false) {
            (Ok(Reply::Mapped { pages, .. }), fds) => (pages, fds),
            other => panic!("{:?}", other.0),
        };
        assert!(mem::map_fd(&*fds[0], PAGE_SIZE, true).is_err());
        assert!(mem::map_fd(&*fds[0], PAGE_SIZE, false).is_ok());
        // Revocation.
        assert!(matches!(st.handle(DomId(1), Op::Revoke { alloc }).0, Ok(Reply::Done)));
        assert!(matches!(st.map(DomId(2), DomId(1), &refs, false).0, Err(WireError::NotFound(_))));
        assert!(matches!(st.handle(DomId(1), Op::Revoke { alloc }).0, Err(WireError::NotFound(_))));
        assert!(matches!(st.share(DomId(1), DomId(2), 0, true).0, Err(WireError::InvalidArgument(_))));
        assert!(matches!(
            st.share(DomId(1), DomId(2), MAX_SHARE_PAGES + 1, true).0,
            Err(WireError::InvalidArgument(_))
        ));
    }

    #[test]
    fn mapped_pages_are_bounded_per_domain() {
        let mut h = harness(&[1, 2, 3]);
        let st = &mut h.st;
        let (_, refs, _) = shared(st.share(DomId(1), DomId(2), 1, true));
        let (_, refs3, _) = shared(st.share(DomId(1), DomId(3), 1, true));
        // Mapping the same grant again and again: each mapping counts.
        let mut maps = Vec::new();
        for i in 0..MAX_MAPPED_PAGES {
            match st.map(DomId(2), DomId(1), &refs, false) {
                (Ok(Reply::Mapped { map, .. }), _) => maps.push(map),
                other => panic!("map {i} failed: {:?}", other.0),
            }
        }
        assert!(
            matches!(st.map(DomId(2), DomId(1), &refs, false).0, Err(WireError::Limit(_))),
            "mapping {} pages must fail",
            MAX_MAPPED_PAGES + 1
        );
        assert_eq!(st.domains.get(&DomId(2)).map(|d| d.maps.len()), Some(MAX_MAPPED_PAGES));
        // Another domain is not affected, and unmapping frees room.
        assert!(matches!(st.map(DomId(3), DomId(1), &refs3, true).0, Ok(Reply::Mapped { .. })));
        let first = maps[0];
        assert!(matches!(st.handle(DomId(2), Op::Unmap { map: first }).0, Ok(Reply::Done)));
        assert!(matches!(st.map(DomId(2), DomId(1), &refs, false).0, Ok(Reply::Mapped { .. })));
    }

    #[test]
    fn descriptors_held_for_a_domain_are_bounded() {
        let mut h = harness(&[1, 2]);
        let st = &mut h.st;
        let mut allocs = 0;
        loop {
            match st.share(DomId(1), DomId(2), 1, true).0 {
                Ok(_) => allocs += 1,
                Err(WireError::Limit(_)) => break,
                Err(e) => panic!("{e}"),
            }
            assert!(allocs <= MAX_DOMAIN_FDS, "more than {MAX_DOMAIN_FDS} allocations held");
        }
        assert_eq!(allocs, MAX_DOMAIN_FDS);
        assert!(matches!(st.bind_unbound(DomId(1), 0, DomId(2)).0, Err(WireError::Limit(_))));
        // Another domain is not affected; a revoke makes room.
        assert!(st.share(DomId(2), DomId(1), 1, true).0.is_ok());
        assert!(st.bind_unbound(DomId(2), 0, DomId(1)).0.is_ok());
        let alloc = *st.domains.get(&DomId(1)).and_then(|d| d.allocs.keys().next()).unwrap_or(&0);
        assert!(matches!(st.handle(DomId(1), Op::Revoke { alloc }).0, Ok(Reply::Done)));
        assert!(st.share(DomId(1), DomId(2), 1, true).0.is_ok());
    }

    #[test]
    fn a_read_only_mapping_cannot_clear_a_byte() {
        let mut h = harness(&[1, 2]);
        let st = &mut h.st;
        let (_, refs, fds) = shared(st.share(DomId(1), DomId(2), 1, false));
        let region = mem::map_fd(&*fds[0], PAGE_SIZE, true).unwrap_or_else(|e| panic!("{e}")).into_region();
        region.store_u8(5, 0xaa);
        let map = match st.map(DomId(2), DomId(1), &refs, false) {
            (Ok(Reply::Mapped { map, .. }), _) => map,
            other => panic!("{:?}", other.0),
        };
        assert!(matches!(
            st.set_notify(DomId(2), None, Some(map), 5, None),
            Err(WireError::PermissionDenied(_))
        ));
        st.death(DomId(2));
        assert_eq!(region.load_u8(5), 0xaa, "the granter's byte must survive a read-only mapper's death");
        // A writable mapping may register one.
        let mut h = harness(&[1, 2]);
        let st = &mut h.st;
        let (_, refs, _) = shared(st.share(DomId(1), DomId(2), 1, true));
        let map = match st.map(DomId(2), DomId(1), &refs, true) {
            (Ok(Reply::Mapped { map, .. }), _) => map,
            other => panic!("{:?}", other.0),
        };
        assert!(matches!(st.set_notify(DomId(2), None, Some(map), 5, None), Ok(Reply::Done)));
    }

    #[test]
    fn event_channel_rules() {
        let mut h = harness(&[1, 2, 3]);
        let st = &mut h.st;
        let (pa, fa) = port(st.bind_unbound(DomId(1), 0, DomId(2)));
        assert_eq!(pa, 1, "ports start at 1");
        assert!(matches!(
            st.bind_interdomain(DomId(3), 0, DomId(1), pa).0,
            Err(WireError::PermissionDenied(_))
        ));
        assert!(matches!(st.bind_interdomain(DomId(2), 0, DomId(1), 99).0, Err(WireError::NotFound(_))));
        // As on Xen, the newly bound local port starts out pending, whatever was sent before.
        let (pb, fb) = port(st.bind_interdomain(DomId(2), 0, DomId(1), pa));
        assert!(mem::drain(&*fb[0]), "a freshly bound port must start out pending");
        assert!(!mem::drain(&*fa[0]), "the unbound end gets nothing from the bind");
        assert!(matches!(
            st.bind_interdomain(DomId(2), 0, DomId(1), pa).0,
            Err(WireError::InvalidArgument(_))
        ));
        // The channel's eventfds are crossed.
        mem::signal(&*fa[1]);
        assert!(mem::drain(&*fb[0]));
        mem::signal(&*fb[1]);
        assert!(mem::drain(&*fa[0]));
        // Close: the peer returns to unbound and gets one event.
        assert!(matches!(st.unbind(DomId(2), pb), Ok(Reply::Unbound { .. })));
        assert!(mem::drain(&*fa[0]));
        assert_eq!(
            st.domains.get(&DomId(1)).and_then(|d| d.ports.get(&pa)).map(|p| p.state),
            Some(PortState::Unbound { remote: DomId(2) })
        );
        assert!(matches!(st.unbind(DomId(2), pb), Err(WireError::NotFound(_))));
    }

    /// One step of a domain, for the property test: small numbers so that ids and refs collide.
    fn arbitrary_op() -> impl proptest::strategy::Strategy<Value = (DomId, Op)> {
        use proptest::prelude::*;
        let dom = (1u16..5).prop_map(DomId);
        let id = || (0u16..6).prop_map(DomId);
        let op = prop_oneof![
            (id(), 1u32..4, any::<bool>()).prop_map(|(remote, count, writable)| Op::SharePages {
                remote,
                count,
                writable
            }),
            (id(), proptest::collection::vec(0u32..20, 0..4), any::<bool>())
                .prop_map(|(granter, refs, writable)| Op::MapGrants { granter, refs, writable }),
            (0u64..40).prop_map(|map| Op::Unmap { map }),
            (0u64..40, 0u64..20_000, proptest::option::of(0u32..6))
                .prop_map(|(map, offset, port)| Op::SetMapNotify { map, offset, port }),
            (0u64..40, 0u64..20_000, proptest::option::of(0u32..6))
                .prop_map(|(alloc, offset, port)| Op::SetShareNotify { alloc, offset, port }),
            (0u64..40).prop_map(|alloc| Op::Revoke { alloc }),
            id().prop_map(|remote| Op::BindUnbound { handle: 1, remote }),
            (id(), 0u32..6).prop_map(|(remote, remote_port)| Op::BindInterdomain {
                handle: 1,
                remote,
                remote_port
            }),
            (0u32..6).prop_map(|port| Op::Unbind { port }),
            "[a-c/]{0,6}".prop_map(|path| Op::Write { path, value: vec![1] }),
            "[a-c/]{0,6}".prop_map(|path| Op::Rm { path }),
            ("[a-c/@]{0,6}", 0u64..4).prop_map(|(path, watch)| Op::Watch { watch, path }),
            (0u64..4).prop_map(|watch| Op::Unwatch { watch }),
            Just(Op::Hello { token: String::new() }),
        ];
        (dom, op)
    }

    proptest::proptest! {
        /// Whatever domains ask, in any order, and however they die, the daemon never panics and
        /// its per-domain accounting matches what it holds.
        #[test]
        fn any_requests_keep_the_accounting(steps in proptest::collection::vec((arbitrary_op(), 0u8..40), 0..200)) {
            let mut h = harness(&[1, 2, 3, 4]);
            for ((d, op), die) in steps {
                if die == 0 && h.st.domains.contains_key(&d) {
                    h.st.death(d);
                    continue;
                }
                if h.st.domains.contains_key(&d) {
                    let _ = h.st.handle(d, op);
                }
                for dom in h.st.domains.values() {
                    let pages: usize = dom.maps.values().map(|m| m.pages.len()).sum();
                    proptest::prop_assert_eq!(dom.mapped_pages, pages);
                    proptest::prop_assert!(dom.maps.values().all(|m| m.writable || m.notify.is_none()));
                    proptest::prop_assert!(dom.grants.len() <= MAX_GRANTS);
                }
            }
        }
    }

    #[test]
    fn migration_hands_the_old_attachment_alone_a_one_time_token() {
        let mut h = harness(&[0, 1, 2]);
        let key = token::key_text(&h.st.key);
        let to = match h.st.migrate(&key, DomId(1)) {
            Ok(Reply::Migrated { to }) => to,
            other => panic!("{other:?}"),
        };
        assert!(!h.st.domains.contains_key(&DomId(1)), "the old id ended");
        // The notice is the old attachment's, and no one else's.
        let notices = |rx: &Receiver<(Vec<u8>, Fds)>| -> Vec<(DomId, String)> {
            rx.try_iter()
                .filter_map(|(bytes, _)| match proto::decode::<ServerMsg>(&bytes) {
                    Ok(ServerMsg::Migrated { to, token }) => Some((to, token)),
                    _ => None,
                })
                .collect()
        };
        assert!(notices(&h._rx[0]).is_empty() && notices(&h._rx[2]).is_empty());
        let got = notices(&h._rx[1]);
        assert_eq!(got.len(), 1, "one notice to the old attachment");
        let (notice_to, token) = got[0].clone();
        assert_eq!(notice_to, to);
        assert!(token.len() <= proto::MAX_TOKEN);
        let out = |d: DomId| {
            let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LEN);
            let out = Outbox {
                tx,
                sock: Arc::new(mem::eventfd().unwrap_or_else(|e| panic!("eventfd: {e}"))),
                kicked: Arc::new(AtomicBool::new(false)),
                queued: Arc::new(AtomicUsize::new(0)),
                migrated: Arc::new(OnceLock::new()),
                domid: d,
            };
            (out, rx)
        };
        let (o1, _r1) = out(to);
        assert_eq!(h.st.attach(&token, o1).ok(), Some(to));
        assert_eq!(
            h.st.store.read(DomId(0), &format!("/local/domain/{}/name", to.0)).ok(),
            Some(b"t".to_vec())
        );
        h.st.death(to);
        let (o2, _r2) = out(to);
        assert!(matches!(h.st.attach(&token, o2), Err(WireError::PermissionDenied(_))), "the token is spent");
        // Only the toolstack migrates, and only an attached guest.
        assert!(matches!(h.st.migrate("toolstack-00", DomId(2)), Err(WireError::PermissionDenied(_))));
        assert!(matches!(h.st.migrate(&key, DomId(0)), Err(WireError::InvalidArgument(_))));
        assert!(matches!(h.st.migrate(&key, DomId(1)), Err(WireError::NotFound(_))));
    }

    #[test]
    fn death_runs_unmap_notify_then_closes_channels() {
        let mut h = harness(&[1, 2]);
        let st = &mut h.st;
        let (p2, f2) = port(st.bind_unbound(DomId(2), 0, DomId(1)));
        let (p1, f1) = port(st.bind_interdomain(DomId(1), 0, DomId(2), p2));
        let (alloc, refs, fds) = shared(st.share(DomId(2), DomId(1), 1, true));
        let region = mem::map_fd(&*fds[0], PAGE_SIZE, true).unwrap_or_else(|e| panic!("{e}")).into_region();
        region.store_u8(21, 0xaa);
        assert!(matches!(st.set_notify(DomId(2), Some(alloc), None, 21, Some(p2)), Ok(Reply::Done)));
        assert!(st.set_notify(DomId(2), Some(alloc), None, PAGE_SIZE as u64, None).is_err());
        let mapped = match st.map(DomId(1), DomId(2), &refs, true) {
            (Ok(Reply::Mapped { pages, .. }), fds) => mem::map_pages(&fds, &pages, true),
            other => panic!("{:?}", other.0),
        };
        let mapped = mapped.unwrap_or_else(|e| panic!("{e}")).into_region();
        st.death(DomId(2));
        assert_eq!(mapped.load_u8(21), 0);
        assert!(mem::drain(&*f1[0]), "peer of the notify port signalled");
        assert_eq!(
            st.domains.get(&DomId(1)).and_then(|d| d.ports.get(&p1)).map(|p| p.state),
            Some(PortState::Unbound { remote: DomId(2) })
        );
        assert!(matches!(st.map(DomId(1), DomId(2), &refs, true).0, Err(WireError::NotFound(_))));
        mapped.store_u8(0, 1);
        assert_eq!(region.load_u8(0), 1, "mappings survive the granter's death");
        assert!(st.store.read(DomId(0), "/local/domain/2").is_err());
        drop(f2);
    }
}
