//! The domain side: a connection to the daemon and the backend types built on it.
//!
//! One connection per [`SimBackend`]. Requests are synchronous calls; a reader thread demuxes
//! replies (by request id) and asynchronous events. The reader applies every cache update
//! (port table, peer eventfds, watch queues) itself, in the order the daemon sent the messages,
//! so a reply and an event about the same port can never be applied out of order.

use std::collections::HashMap;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use rustix::event::epoll;
use rustix::net::{AddressFamily, Shutdown, SocketAddrUnix, SocketFlags, SocketType};

use super::fdpass::{self, Received};
use super::mem;
use super::proto::{self, ClientMsg, Event, Op, Reply, ServerMsg, WireError};
use dombus_transport_xen::backend::client::{ClientCore, WatchQueue, drain, lock, signal};
use dombus_transport_xen::backend::{
    Backend, BackendError, EventChannel, MappedPages, Perm, Result, SharedPages, Store, StoreWatch,
};
use dombus_transport_xen::shmem::{Region, SharedMem};
use dombus_transport_xen::types::{DomId, EvtchnPort, GrantRef, PAGE_SIZE};

type Fds = Vec<Arc<OwnedFd>>;
type Answer = (std::result::Result<Reply, WireError>, Fds);

struct PortEntry {
    handle: u64,
    /// Where this port receives.
    own: Arc<OwnedFd>,
    /// Where the peer receives: `notify` writes it (see the daemon's `Port`).
    slot: Arc<OwnedFd>,
}

/// How an attachment ended (see [`SimBackend::ended`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The toolstack migrated the domain: the old id is dead, and [`SimBackend::resume`]
    /// attaches as `to` (once).
    Migrated {
        /// The domain's new id.
        to: DomId,
    },
    /// The connection to the simulator was lost (the simulator stopped, disconnected this
    /// domain, or every handle was dropped).
    Lost {
        /// Why.
        reason: String,
    },
}

/// What the reader learned about the end of the attachment.
#[derive(Default)]
struct End {
    ended: Option<Ended>,
    /// The one-time token to attach as the new id, until [`SimBackend::resume`] spends it.
    token: Option<String>,
}

struct Shared {
    /// Waiters by request id, watch queues by watch id.
    core: ClientCore<u64, SyncSender<Answer>, u64>,
    ports: Mutex<HashMap<u32, PortEntry>>,
    end: Mutex<End>,
    /// An eventfd made readable (and never drained) once `end.ended` is set.
    ended_fd: OwnedFd,
}

impl Shared {
    /// The new id, if the domain was migrated.
    fn migrated(&self) -> Option<DomId> {
        match lock(&self.end).ended {
            Some(Ended::Migrated { to }) => Some(to),
            _ => None,
        }
    }

    /// Records how the attachment ended (the first word wins) and wakes whoever waits for it.
    fn set_ended(&self, how: Ended, token: Option<String>) {
        let mut end = lock(&self.end);
        if end.ended.is_none() {
            end.ended = Some(how);
            end.token = token;
            signal(&self.ended_fd);
        }
    }

    /// The error an operation fails with once the connection is dead: `Migrated` if the domain
    /// was migrated, else `Disconnected` with the reason.
    fn gone(&self, fallback: impl FnOnce() -> String) -> BackendError {
        match self.migrated() {
            Some(to) => BackendError::Migrated { to },
            None => BackendError::Disconnected(self.core.dead().unwrap_or_else(fallback)),
        }
    }

    /// Applies one message from the daemon. Returns `Err` on a protocol violation.
    fn dispatch(&self, msg: ServerMsg, fds: Vec<OwnedFd>) -> std::result::Result<(), String> {
        let mut fds: Fds = fds.into_iter().map(Arc::new).collect();
        match msg {
            ServerMsg::Reply { id, mut result } => {
                match &result {
                    Ok(Reply::Port { handle, port }) => match fds.as_slice() {
                        [own, slot] => {
                            let entry = PortEntry { handle: *handle, own: own.clone(), slot: slot.clone() };
                            lock(&self.ports).insert(*port, entry);
                        }
                        _ => {
                            result =
                                Err(WireError::Unavailable(format!("daemon sent {} fds, not 2", fds.len())))
                        }
                    },
                    Ok(Reply::Unbound { port }) => {
                        lock(&self.ports).remove(port);
                    }
                    _ => {}
                }
                if let Some(w) = self.core.complete(id) {
                    let _ = w.try_send((result, std::mem::take(&mut fds)));
                }
            }
            ServerMsg::Event(Event::Watch { watch, path }) => {
                self.core.deliver(&watch, path);
            }
            ServerMsg::Migrated { to, token } => {
                if token.len() > proto::MAX_TOKEN {
                    return Err(format!("migration token of {} bytes from the simulator", token.len()));
                }
                if lock(&self.end).ended.is_some() {
                    return Err("a second migration notice from the simulator".into());
                }
                tracing::info!("this domain was migrated: it is domain {to} now");
                self.set_ended(Ended::Migrated { to }, Some(token));
            }
            ServerMsg::Fatal { reason } => {
                return Err(format!("disconnected by the simulator: {reason}"));
            }
        }
        Ok(())
    }

    fn reader(self: Arc<Shared>, sock: OwnedFd, domid: String) {
        let mut buf = fdpass::buffer();
        let reason = loop {
            match fdpass::recv(&sock, &mut buf) {
                Ok(Received::Msg { len, fds }) => {
                    let r = proto::decode::<ServerMsg>(&buf[..len]).and_then(|m| self.dispatch(m, fds));
                    if let Err(e) = r {
                        break e;
                    }
                }
                Ok(Received::Eof) => break "the simulator closed the connection".to_string(),
                Ok(Received::Oversize { reason }) => {
                    break format!("bad message from the simulator: {reason}");
                }
                Err(e) => break format!("receive from the simulator failed: {e}"),
            }
        };
        tracing::debug!("domain {domid}: connection closed: {reason}");
        let _ = rustix::net::shutdown(&sock, Shutdown::Both);
        self.set_ended(Ended::Lost { reason: reason.clone() }, None);
        self.core.fail(reason);
    }
}

struct Conn {
    sock: OwnedFd,
    shared: Arc<Shared>,
    domid: DomId,
    /// The simulator's socket (to attach again after a migration).
    path: PathBuf,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // Wakes the reader thread (which holds a duplicate of the socket) and tells the daemon
        // that this domain is gone.
        let _ = rustix::net::shutdown(&self.sock, Shutdown::Both);
    }
}

impl Conn {
    fn call(&self, op: Op) -> Result<(Reply, Fds)> {
        if let Some(to) = self.shared.migrated() {
            return Err(BackendError::Migrated { to });
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let id = self.shared.core.register(tx).map_err(|e| self.shared.gone(|| e))?;
        let sent = proto::encode(&ClientMsg { id, op }).map_err(BackendError::from).and_then(|bytes| {
            fdpass::send(self.sock.as_fd(), &bytes, &[])
                .map_err(|e| self.shared.gone(|| format!("send to the simulator failed: {e}")))
        });
        if let Err(e) = sent {
            self.shared.core.complete(id);
            return Err(e);
        }
        match rx.recv() {
            Ok((Ok(reply), fds)) => Ok((reply, fds)),
            Ok((Err(e), _)) => Err(e.into()),
            Err(_) => Err(self.shared.gone(|| "connection to the simulator lost".into())),
        }
    }

    fn call_done(&self, op: Op) -> Result<()> {
        match self.call(op)? {
            (Reply::Done, _) => Ok(()),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// Sends an event on `port` (of handle `handle`, if given): one lock and one `write(2)` on
    /// the eventfd the peer receives on. If the port is unbound nobody watches that eventfd and
    /// the daemon drains it when someone binds, so the event is dropped, as on Xen.
    fn notify(&self, port: EvtchnPort, handle: Option<u64>) -> Result<()> {
        let ports = lock(&self.shared.ports);
        match ports.get(&port.0) {
            Some(e) if handle.is_none_or(|h| h == e.handle) => {
                signal(&*e.slot);
                Ok(())
            }
            _ => Err(BackendError::NotFound(format!("port {port} is not bound to this handle"))),
        }
    }
}

/// The environment variable a process started for a domain finds its one-time token in.
pub const TOKEN_ENV: &str = "DOMBUS_SIM_TOKEN";

/// The toolstack key of the daemon at `socket`.
fn read_key(socket: &Path) -> Result<String> {
    let path = crate::SimHypervisor::key_path(socket);
    let key = std::fs::read(&path).map_err(|e| {
        BackendError::PermissionDenied(format!(
            "the toolstack key {} cannot be read ({e}): only the simulator's owner is the toolstack",
            path.display()
        ))
    })?;
    String::from_utf8(key)
        .map(|k| k.trim().to_string())
        .map_err(|_| BackendError::InvalidArgument(format!("{} is not a toolstack key", path.display())))
}

fn create(conn: &Conn, key: &str, domid: Option<DomId>, name: &str) -> Result<(DomId, String)> {
    match conn.call(Op::Create { key: key.to_string(), domid, name: name.to_string() })? {
        (Reply::Created { domid, token }, _) => Ok((domid, token)),
        (other, _) => Err(unexpected(&other)),
    }
}

impl Conn {
    /// A connection to the daemon at `path`, not attached yet; `tag` names its reader thread's
    /// log lines.
    fn open(path: &Path, tag: &str) -> Result<Conn> {
        let unavailable = |e: rustix::io::Errno| {
            BackendError::Unavailable(format!("cannot connect to the simulator at {}: {e}", path.display()))
        };
        let addr = SocketAddrUnix::new(path).map_err(unavailable)?;
        let sock =
            rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
                .map_err(|e| BackendError::io("socket", e.into()))?;
        rustix::net::connect(&sock, &addr).map_err(unavailable)?;
        let dup = rustix::io::fcntl_dupfd_cloexec(&sock, 0).map_err(|e| BackendError::io("dup", e.into()))?;
        let ended_fd = rustix::event::eventfd(
            0,
            rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
        )
        .map_err(|e| BackendError::io("eventfd", e.into()))?;
        let shared = Arc::new(Shared {
            core: ClientCore::default(),
            ports: Mutex::default(),
            end: Mutex::default(),
            ended_fd,
        });
        let reader_shared = shared.clone();
        let tag = tag.to_string();
        std::thread::Builder::new()
            .name("simxen-client".into())
            .spawn(move || reader_shared.reader(dup, tag))
            .map_err(|e| BackendError::io("spawning the simulator reader thread", e))?;
        Ok(Conn { sock, shared, domid: DomId::INVALID, path: path.to_path_buf() })
    }
}

fn unexpected(r: &Reply) -> BackendError {
    BackendError::Disconnected(format!("unexpected reply from the simulator: {r:?}"))
}

/// A domain attached to the simulated hypervisor. Cheap to clone; the domain dies when the last
/// clone and every object made from it are dropped (or the process exits).
#[derive(Clone)]
pub struct SimBackend {
    conn: Arc<Conn>,
    store: SimStore,
}

impl std::fmt::Debug for SimBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimBackend").field("domid", &self.conn.domid).finish()
    }
}

impl SimBackend {
    /// Attaches to the simulator at `socket` as the domain `credential` names: a one-time token
    /// the toolstack got when it created the domain ([`SimBackend::create_domain`]), or the
    /// toolstack key (domain 0).
    pub fn attach(socket: impl AsRef<Path>, credential: &str) -> Result<SimBackend> {
        SimBackend::hello(Conn::open(socket.as_ref(), "?")?, credential)
    }

    /// Attaches as domain 0, the toolstack, with the key the daemon keeps beside its socket.
    pub fn toolstack(socket: impl AsRef<Path>) -> Result<SimBackend> {
        let path = socket.as_ref();
        let conn = Conn::open(path, "0")?;
        SimBackend::hello(conn, &read_key(path)?)
    }

    /// Creates domain `domid` (`None`: the lowest free id >= 1) named `name`, as the toolstack:
    /// the id and the one-time token the process that will run as it attaches with. The token
    /// is a secret: hand it only to that process (e.g. in [`TOKEN_ENV`]).
    pub fn create_domain(
        socket: impl AsRef<Path>,
        domid: Option<DomId>,
        name: &str,
    ) -> Result<(DomId, String)> {
        let path = socket.as_ref();
        let conn = Conn::open(path, "toolstack")?;
        create(&conn, &read_key(path)?, domid, name)
    }

    /// Creates a domain as the toolstack and attaches as it, in one go (domain 0: attaches as
    /// the toolstack): for a process that is its own toolstack, as tests, benches and demos are.
    /// Named after this process.
    pub fn boot(socket: impl AsRef<Path>, domid: Option<DomId>) -> Result<SimBackend> {
        let name = format!("pid{}", rustix::process::getpid().as_raw_nonzero());
        SimBackend::boot_named(socket, domid, &name)
    }

    /// [`SimBackend::boot`] with the given name (stored at `/local/domain/<id>/name`).
    pub fn boot_named(socket: impl AsRef<Path>, domid: Option<DomId>, name: &str) -> Result<SimBackend> {
        let path = socket.as_ref();
        let conn = Conn::open(path, &domid.map_or_else(|| "?".to_string(), |d| d.to_string()))?;
        let key = read_key(path)?;
        if domid == Some(DomId::DOM0) {
            return SimBackend::hello(conn, &key);
        }
        let (_, token) = create(&conn, &key, domid, name)?;
        SimBackend::hello(conn, &token)
    }

    /// Migrates domain `domid`, as the toolstack: the new id it runs on. The old id ends exactly
    /// as a death does (its grants are revoked, its event channels closed and their peers
    /// signalled, its store home removed and `@releaseDomain` fired); its name is introduced
    /// under the new id. The process attached as `domid` learns of it at once
    /// ([`SimBackend::ended`], [`SimBackend::wait_ended`]), every later operation of it fails
    /// with [`BackendError::Migrated`], and [`SimBackend::resume`] attaches it as the new id
    /// with a one-time token the simulator handed that process alone.
    pub fn migrate(socket: impl AsRef<Path>, domid: DomId) -> Result<DomId> {
        let path = socket.as_ref();
        let conn = Conn::open(path, "toolstack")?;
        match conn.call(Op::Migrate { key: read_key(path)?, domid })? {
            (Reply::Migrated { to }, _) => Ok(to),
            (other, _) => Err(unexpected(&other)),
        }
    }

    /// How this attachment ended, once it has: migrated (to which id) or lost.
    pub fn ended(&self) -> Option<Ended> {
        lock(&self.conn.shared.end).ended.clone()
    }

    /// A descriptor that becomes readable once this attachment has ended
    /// ([`SimBackend::ended`] says how) and stays readable: poll it (epoll, tokio's `AsyncFd`)
    /// to learn of a migration without polling the simulator. Do not read it.
    pub fn ended_fd(&self) -> BorrowedFd<'_> {
        self.conn.shared.ended_fd.as_fd()
    }

    /// Waits (on the tokio runtime it is polled on) until this attachment has ended: the moment
    /// the simulator's migration notice arrives, or the connection is lost.
    pub async fn wait_ended(&self) -> std::io::Result<Ended> {
        if let Some(e) = self.ended() {
            return Ok(e);
        }
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(std::io::Error::other("wait_ended must be polled inside a tokio runtime"));
        }
        let dup = rustix::io::fcntl_dupfd_cloexec(self.ended_fd(), 0)?;
        // SAFETY: `dup` is an open descriptor owned by the AsyncFd for exactly as long as it is
        // registered (it is moved in and closed when the AsyncFd is dropped).
        let fd =
            unsafe { tokio::io::unix::AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE) }?;
        loop {
            let mut guard = fd.readable().await?;
            if let Some(e) = self.ended() {
                return Ok(e);
            }
            guard.clear_ready();
        }
    }

    /// After a migration ([`Ended::Migrated`]): attaches as the domain's new id with the
    /// one-time token the simulator sent this attachment, which this spends. Fails with
    /// `InvalidArgument` if the domain was not migrated, `PermissionDenied` if the token was
    /// spent already.
    pub fn resume(&self) -> Result<SimBackend> {
        let shared = &self.conn.shared;
        let (to, token) = {
            let end = lock(&shared.end);
            match (&end.ended, &end.token) {
                (Some(Ended::Migrated { to }), Some(token)) => (*to, token.clone()),
                (Some(Ended::Migrated { to }), None) => {
                    return Err(BackendError::PermissionDenied(format!(
                        "this attachment already resumed as domain {to}: its token is spent"
                    )));
                }
                _ => {
                    return Err(BackendError::InvalidArgument(
                        "this domain was not migrated: there is nothing to resume".into(),
                    ));
                }
            }
        };
        let resumed = SimBackend::hello(Conn::open(&self.conn.path, &to.to_string())?, &token)?;
        lock(&shared.end).token = None;
        Ok(resumed)
    }

    /// How a process started for a domain attaches as domain `domid`: with the token in
    /// [`TOKEN_ENV`] (which must name `domid`), or, for domain 0, as the toolstack.
    pub fn attach_from_env(socket: impl AsRef<Path>, domid: DomId) -> Result<SimBackend> {
        let path = socket.as_ref();
        let Some(token) = std::env::var_os(TOKEN_ENV) else {
            if domid == DomId::DOM0 {
                return SimBackend::toolstack(path);
            }
            return Err(BackendError::PermissionDenied(format!(
                "domain {domid} attaches with the one-time token the toolstack got when it created the domain, in ${TOKEN_ENV}; none is set"
            )));
        };
        let token = token.to_str().unwrap_or_default();
        let named = token.split_once('-').and_then(|(d, _)| d.parse::<u16>().ok());
        if named != Some(domid.0) {
            return Err(BackendError::InvalidArgument(format!(
                "${TOKEN_ENV} is not a token for domain {domid}"
            )));
        }
        SimBackend::attach(path, token)
    }

    fn hello(mut conn: Conn, credential: &str) -> Result<SimBackend> {
        conn.domid = match conn.call(Op::Hello { token: credential.to_string() })? {
            (Reply::Attached { domid }, _) => domid,
            (other, _) => return Err(unexpected(&other)),
        };
        let conn = Arc::new(conn);
        Ok(SimBackend { store: SimStore { conn: conn.clone() }, conn })
    }

    /// How many requests this domain (every clone of this backend and every object made from
    /// it) has sent to the simulator, its `Hello` included. For tests, which observe with it
    /// that a waiting side makes no requests while it waits (it is woken by a watch, it does not
    /// poll). Costs nothing: it reads the counter that numbers the requests.
    pub fn requests(&self) -> u64 {
        self.conn.shared.core.issued()
    }

    /// The store watches this domain holds: each watched path (as given to
    /// [`Store::watch`]) with the number of its events that arrived but were not taken yet
    /// ([`StoreWatch::try_next`]). For tests, which observe with it that a waiting side has set
    /// up its watch and taken every event so far, i.e. is parked on the watch, before they act.
    pub fn watches(&self) -> Vec<(String, usize)> {
        self.conn.shared.core.watches()
    }

    /// How many times the event queues of this domain's live watches have collapsed into one
    /// event for the watched path (a writer outran the reader by
    /// [`MAX_QUEUED_EVENTS`](dombus_transport_xen::backend::MAX_QUEUED_EVENTS) events).
    pub fn watch_collapses(&self) -> u64 {
        self.conn.shared.core.watch_collapses()
    }
}

static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

impl Backend for SimBackend {
    type Shared = SimSharedPages;
    type Mapped = SimMappedPages;
    type Evtchn = SimEvtchn;
    type Store = SimStore;

    fn domid(&self) -> DomId {
        self.conn.domid
    }

    fn share_pages(&self, remote: DomId, count: usize, writable: bool) -> Result<SimSharedPages> {
        let pages =
            u32::try_from(count).map_err(|_| BackendError::InvalidArgument(format!("{count} pages")))?;
        let (reply, fds) = self.conn.call(Op::SharePages { remote, count: pages, writable })?;
        let Reply::Shared { alloc, refs } = reply else {
            return Err(unexpected(&reply));
        };
        let revoke = |e: BackendError| {
            let _ = self.conn.call(Op::Revoke { alloc });
            e
        };
        let fd = fds.first().ok_or_else(|| revoke(BackendError::Disconnected("no memfd in reply".into())))?;
        if refs.len() != count {
            return Err(revoke(BackendError::Disconnected("wrong number of grant refs in reply".into())));
        }
        let region = mem::map_fd(&**fd, count * PAGE_SIZE, true)
            .map_err(|e| revoke(BackendError::io("mapping granted pages", e)))?
            .into_region();
        Ok(SimSharedPages {
            conn: self.conn.clone(),
            alloc,
            refs: refs.into_iter().map(GrantRef).collect(),
            region,
            notify: None,
        })
    }

    fn map_grants(&self, granter: DomId, refs: &[GrantRef], writable: bool) -> Result<SimMappedPages> {
        let op = Op::MapGrants { granter, refs: refs.iter().map(|r| r.0).collect(), writable };
        let (reply, fds) = self.conn.call(op)?;
        let Reply::Mapped { map, pages } = reply else {
            return Err(unexpected(&reply));
        };
        let unmap = |e: BackendError| {
            let _ = self.conn.call(Op::Unmap { map });
            e
        };
        if pages.len() != refs.len() {
            return Err(unmap(BackendError::Disconnected("wrong number of pages in reply".into())));
        }
        let region = mem::map_pages(&fds, &pages, writable)
            .map_err(|e| unmap(BackendError::io("mapping grants", e)))?
            .into_region();
        Ok(SimMappedPages { conn: self.conn.clone(), map, region, notify: None })
    }

    fn open_evtchn(&self) -> Result<SimEvtchn> {
        let epfd = epoll::create(epoll::CreateFlags::CLOEXEC)
            .map_err(|e| BackendError::io("epoll_create", e.into()))?;
        Ok(SimEvtchn { conn: self.conn.clone(), id: NEXT_HANDLE.fetch_add(1, Ordering::Relaxed), epfd })
    }

    fn store(&self) -> &SimStore {
        &self.store
    }
}

fn check_notify(region: &Region, offset: usize) -> Result<()> {
    if offset >= region.len() {
        return Err(BackendError::InvalidArgument(format!(
            "notify offset {offset} outside {} bytes",
            region.len()
        )));
    }
    Ok(())
}

/// Performs an unmap notification locally (as the kernel does on release).
fn local_notify(conn: &Conn, region: &Region, notify: Option<(usize, Option<EvtchnPort>)>) {
    if let Some((offset, port)) = notify {
        region.store_u8(offset, 0);
        if let Some(port) = port {
            if let Err(e) = conn.notify(port, None) {
                tracing::debug!("unmap notification on port {port}: {e}");
            }
        }
    }
}

/// Pages this domain granted (see [`SharedPages`]).
pub struct SimSharedPages {
    conn: Arc<Conn>,
    alloc: u64,
    refs: Vec<GrantRef>,
    region: Region,
    notify: Option<(usize, Option<EvtchnPort>)>,
}

impl SharedPages for SimSharedPages {
    fn refs(&self) -> &[GrantRef] {
        &self.refs
    }

    fn region(&self) -> &Region {
        &self.region
    }

    fn set_unmap_notify(&mut self, offset: usize, port: Option<EvtchnPort>) -> Result<()> {
        check_notify(&self.region, offset)?;
        self.conn.call_done(Op::SetShareNotify {
            alloc: self.alloc,
            offset: offset as u64,
            port: port.map(|p| p.0),
        })?;
        self.notify = Some((offset, port));
        Ok(())
    }
}

impl Drop for SimSharedPages {
    fn drop(&mut self) {
        local_notify(&self.conn, &self.region, self.notify);
        if let Err(e) = self.conn.call_done(Op::Revoke { alloc: self.alloc }) {
            tracing::debug!("revoking grants {:?}: {e}", self.refs);
        }
    }
}

/// Another domain's pages mapped here (see [`MappedPages`]).
pub struct SimMappedPages {
    conn: Arc<Conn>,
    map: u64,
    region: Region,
    notify: Option<(usize, Option<EvtchnPort>)>,
}

impl MappedPages for SimMappedPages {
    fn region(&self) -> &Region {
        &self.region
    }

    fn set_unmap_notify(&mut self, offset: usize, port: Option<EvtchnPort>) -> Result<()> {
        check_notify(&self.region, offset)?;
        self.conn.call_done(Op::SetMapNotify {
            map: self.map,
            offset: offset as u64,
            port: port.map(|p| p.0),
        })?;
        self.notify = Some((offset, port));
        Ok(())
    }
}

impl Drop for SimMappedPages {
    fn drop(&mut self) {
        local_notify(&self.conn, &self.region, self.notify);
        if let Err(e) = self.conn.call_done(Op::Unmap { map: self.map }) {
            tracing::debug!("forgetting mapping {}: {e}", self.map);
        }
    }
}

/// An event-channel handle: an epoll fd over one eventfd per port.
///
/// Masking: [`EventChannel::pending`] clears the port's eventfd when it reports it, and
/// [`EventChannel::unmask`] is a no-op. An event that arrives after `pending` (masked or not)
/// makes the port pending again, so no event is ever lost; several events before a `pending`
/// coalesce into one, as on Xen.
pub struct SimEvtchn {
    conn: Arc<Conn>,
    id: u64,
    epfd: OwnedFd,
}

impl SimEvtchn {
    fn own_fd(&self, port: EvtchnPort) -> Result<Arc<OwnedFd>> {
        match lock(&self.conn.shared.ports).get(&port.0) {
            Some(e) if e.handle == self.id => Ok(e.own.clone()),
            _ => Err(BackendError::NotFound(format!("port {port} is not bound to this handle"))),
        }
    }

    fn register(&self, reply: Reply) -> Result<EvtchnPort> {
        let Reply::Port { port, .. } = reply else {
            return Err(unexpected(&reply));
        };
        let port = EvtchnPort(port);
        let own = self.own_fd(port)?;
        epoll::add(&self.epfd, &*own, epoll::EventData::new_u64(u64::from(port.0)), epoll::EventFlags::IN)
            .map_err(|e| BackendError::io("epoll_ctl", e.into()))?;
        Ok(port)
    }
}

impl AsFd for SimEvtchn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.epfd.as_fd()
    }
}

impl EventChannel for SimEvtchn {
    fn bind_unbound(&self, remote: DomId) -> Result<EvtchnPort> {
        let (reply, _) = self.conn.call(Op::BindUnbound { handle: self.id, remote })?;
        self.register(reply)
    }

    fn bind_interdomain(&self, remote: DomId, remote_port: EvtchnPort) -> Result<EvtchnPort> {
        let op = Op::BindInterdomain { handle: self.id, remote, remote_port: remote_port.0 };
        let (reply, _) = self.conn.call(op)?;
        self.register(reply)
    }

    fn notify(&self, port: EvtchnPort) -> Result<()> {
        self.conn.notify(port, Some(self.id))
    }

    fn pending(&self) -> Result<Option<EvtchnPort>> {
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        // Bounded: a port reported ready but already drained (by a concurrent caller) is skipped.
        for _ in 0..64 {
            let mut evs = [MaybeUninit::<epoll::Event>::uninit(); 1];
            let (ready, _) = epoll::wait(&self.epfd, &mut evs, Some(&zero)).or_else(|e| match e {
                rustix::io::Errno::INTR => Ok((&mut [][..], &mut [][..])),
                e => Err(BackendError::io("epoll_wait", e.into())),
            })?;
            let Some(ev) = ready.first().copied() else {
                return Ok(None);
            };
            let data = ev.data;
            let port = EvtchnPort(u32::try_from(data.u64()).unwrap_or(0));
            let Ok(own) = self.own_fd(port) else { continue };
            if drain(&*own) {
                return Ok(Some(port));
            }
        }
        Ok(None)
    }

    fn unmask(&self, port: EvtchnPort) -> Result<()> {
        // Events are never held back while "masked" (see the type's documentation).
        self.own_fd(port).map(|_| ())
    }

    fn unbind(&self, port: EvtchnPort) -> Result<()> {
        let own = self.own_fd(port)?;
        let _ = epoll::delete(&self.epfd, &*own);
        match self.conn.call(Op::Unbind { port: port.0 })? {
            (Reply::Unbound { .. }, _) => Ok(()),
            (other, _) => Err(unexpected(&other)),
        }
    }
}

impl Drop for SimEvtchn {
    fn drop(&mut self) {
        let mine: Vec<u32> = lock(&self.conn.shared.ports)
            .iter()
            .filter(|(_, e)| e.handle == self.id)
            .map(|(p, _)| *p)
            .collect();
        for port in mine {
            if let Err(e) = self.conn.call(Op::Unbind { port }) {
                tracing::debug!("closing port {port}: {e}");
            }
        }
    }
}

/// The store connection of a simulated domain.
#[derive(Clone)]
pub struct SimStore {
    conn: Arc<Conn>,
}

static NEXT_WATCH: AtomicU64 = AtomicU64::new(1);

impl Store for SimStore {
    type Watch = SimWatch;

    fn read(&self, path: &str) -> Result<Vec<u8>> {
        match self.conn.call(Op::Read { path: path.into() })? {
            (Reply::Value(v), _) => Ok(v),
            (other, _) => Err(unexpected(&other)),
        }
    }

    fn write(&self, path: &str, value: &[u8]) -> Result<()> {
        self.conn.call_done(Op::Write { path: path.into(), value: value.to_vec() })
    }

    fn mkdir(&self, path: &str) -> Result<()> {
        self.conn.call_done(Op::Mkdir { path: path.into() })
    }

    fn rm(&self, path: &str) -> Result<()> {
        self.conn.call_done(Op::Rm { path: path.into() })
    }

    fn directory(&self, path: &str) -> Result<Vec<String>> {
        match self.conn.call(Op::Directory { path: path.into() })? {
            (Reply::Names(v), _) => Ok(v),
            (other, _) => Err(unexpected(&other)),
        }
    }

    fn get_perms(&self, path: &str) -> Result<Vec<Perm>> {
        match self.conn.call(Op::GetPerms { path: path.into() })? {
            (Reply::Perms(v), _) => Ok(v),
            (other, _) => Err(unexpected(&other)),
        }
    }

    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<()> {
        self.conn.call_done(Op::SetPerms { path: path.into(), perms: perms.to_vec() })
    }

    fn watch(&self, path: &str) -> Result<SimWatch> {
        let id = NEXT_WATCH.fetch_add(1, Ordering::Relaxed);
        let core = &self.conn.shared.core;
        let queue = core.add_watch(id, path).map_err(|e| BackendError::io("eventfd", e))?;
        if let Err(e) = self.conn.call_done(Op::Watch { watch: id, path: path.into() }) {
            core.remove_watch(&id);
            return Err(e);
        }
        Ok(SimWatch { conn: self.conn.clone(), id, queue })
    }
}

/// A registered store watch: pollable (its fd is readable while paths are queued).
pub struct SimWatch {
    conn: Arc<Conn>,
    id: u64,
    queue: Arc<WatchQueue>,
}

impl AsFd for SimWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.queue.as_fd()
    }
}

impl StoreWatch for SimWatch {
    fn try_next(&self) -> Result<Option<String>> {
        self.conn.shared.core.try_next(&self.queue).map_err(|e| self.conn.shared.gone(|| e))
    }
}

impl Drop for SimWatch {
    fn drop(&mut self) {
        self.conn.shared.core.remove_watch(&self.id);
        if let Err(e) = self.conn.call_done(Op::Unwatch { watch: self.id }) {
            tracing::debug!("removing watch {}: {e}", self.id);
        }
    }
}
