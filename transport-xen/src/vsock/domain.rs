//! Virtual sockets between any two domains: one link per pair of domains, set up on demand
//! through the store and shared by all their connections.
//!
//! Link set-up: of two domains, the one with the lower id serves the link, at
//! `/local/domain/<low>/data/dombus/link/<high>`. The higher one asks for it by writing
//! `/local/domain/<high>/data/dombus/want/<low>`, readable by the lower one only. Every domain
//! watches `/local/domain` and reacts to exactly two kinds of change it may read: a request for a
//! link from a higher domain (it publishes the link), and a link published for it by a lower
//! domain (it connects). Both sides also create the link on their own first `connect`.
//!
//! A request costs the lower domain at most one set-up task per peer, whatever the requester
//! writes: a request that arrives while a set-up for that peer runs (or waits out its back-off
//! after failures) makes it try once more afterwards, rather than start another. When one
//! domain's watch events collapse into one for `/local/domain/<id>` (it wrote faster than we read,
//! see [`crate::backend::MAX_QUEUED_PER_CHILD`]), this domain reads that domain's request again;
//! when all of them collapse into one for `/local/domain`, it reads every domain's (which needs
//! the right to list `/local/domain`: dom0's). So a flood loses nobody's request.
//!
//! A domain that cannot set up its half of a link a peer waits for (a full grant table, a refused
//! map, a store error) tells that peer why at once, in a node only the two of them may read (see
//! [`super::setup_failure`]); the waiting peer, woken by the same watch, fails its set-up with
//! [`PeerSetupFailed`] instead of waiting out [`VsockConfig::link_timeout`]. Each attempt of the
//! waiting side carries a fresh number (its request's value, or the published link's `attempt`
//! node) and only an account naming it counts, so an account left from an earlier attempt never
//! fails a fresh one; a domain removes its account once the link to that peer is up.
//!
//! With [`LinkSetUp::Introduced`] (what agents run under a connection manager) a domain keeps
//! the request above only for its link with the backend domain, which serves every domain's
//! link whatever the ids; only the backend domain watches `/local/domain`, and every other link
//! is built in the rendezvous the manager made for the pair ([`VsockDomain::introduce`], see
//! [`super::introduce`]). Every incoming connection then passes this domain's [`Gate`].
//!
//! Listeners announce themselves at `/local/domain/<id>/data/dombus/listen/<port>` (readable by
//! all), so that [`VsockDomain::connect_wait`] can wait for a service that is not up yet, woken
//! by a store watch rather than by timed retries.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{Mutex, Notify, mpsc};
use tokio::task::JoinHandle;

use super::addr::{CID_BACKEND, CID_SELF, FIRST_UNPRIVILEGED_PORT, VsockAddr};
use super::introduce::{Gate, LinkSetUp, check_rendezvous, rendezvous_path, rendezvous_perms};
use super::mux::{ListenerCloser, Mux, MuxListener, VsockStream};
use super::session::SessionConfig;
use super::setup_failure::{
    ATTEMPT_KEY, PeerSetupFailed, decode_failure, encode_failure, failure_path, failure_writer, parse_attempt,
};
use crate::backend::{Backend, BackendError, Perm, PermKind, Store, StoreWatch, publish};
use crate::link::{Link, LinkConfig, LinkError, Pollable, register};
use crate::types::DomId;

/// This domain could not set up its half of the link to `peer` (carried in the `io::Error` a
/// connect fails with; the hypervisor's or the link's error is its `source`).
#[derive(Debug, thiserror::Error)]
#[error("could not set up the link to domain {peer}: {source}")]
pub struct OwnSetupFailed {
    /// The peer the link was for.
    pub peer: DomId,
    /// What failed.
    #[source]
    pub source: LinkError,
}

/// How a domain's virtual sockets behave.
#[derive(Debug, Clone)]
pub struct VsockConfig {
    /// Rings of the links this domain sets up.
    pub link: LinkConfig,
    /// Per-connection buffers.
    pub session: SessionConfig,
    /// The backend domain (`CID_BACKEND`).
    pub backend_domain: DomId,
    /// Domains that may listen on ports below 1024 (besides the backend domain).
    pub privileged: Vec<DomId>,
    /// How long a domain waits for its peer to join a link it published or asked for.
    pub link_timeout: Duration,
    /// How links with other domains come about.
    pub set_up: LinkSetUp,
}

impl Default for VsockConfig {
    /// Default rings and buffers; dom0 is the backend and the toolstack; links time out in 10 s.
    fn default() -> Self {
        VsockConfig {
            link: LinkConfig::default(),
            session: SessionConfig::default(),
            backend_domain: DomId::DOM0,
            privileged: vec![DomId::DOM0],
            link_timeout: Duration::from_secs(10),
            set_up: LinkSetUp::Open,
        }
    }
}

/// A watch as an async stream of changed paths.
struct AsyncWatch<W: StoreWatch>(AsyncFd<Pollable<W>>);

impl<W: StoreWatch> AsyncWatch<W> {
    fn new(w: W) -> io::Result<Self> {
        Ok(AsyncWatch(register(w)?))
    }

    async fn next(&self) -> io::Result<Vec<String>> {
        loop {
            let mut guard = self.0.readable().await?;
            let mut paths = Vec::new();
            while let Some(p) = self.0.get_ref().0.try_next().map_err(io::Error::other)? {
                paths.push(p);
            }
            guard.clear_ready();
            if !paths.is_empty() {
                return Ok(paths);
            }
        }
    }
}

struct Registered {
    /// Unbounded as a channel, bounded by what it carries: every stream in it is a connection
    /// its link's session counts against `max_connections` and `rx_budget` until the stream is
    /// dropped, so a peer fills it no further than its own link's limits.
    sender: mpsc::UnboundedSender<VsockStream>,
    /// One per link: the task moving its accepted connections to `sender`, and what closes its
    /// listener at once (aborting the task frees the port only when the task next runs).
    forwarders: Vec<(JoinHandle<()>, ListenerCloser)>,
}

struct Inner<B: Backend + Clone> {
    backend: B,
    me: DomId,
    cfg: VsockConfig,
    /// One slot per peer domain; the async lock serialises link set-up for that peer.
    links: StdMutex<HashMap<DomId, Arc<Mutex<Option<Mux>>>>>,
    /// Listeners and the links they listen on, under one lock so that a listener registered
    /// while a link comes up is attached to it exactly once.
    listening: StdMutex<Listening>,
    /// Set-ups on request, one at most per peer.
    setups: StdMutex<HashMap<DomId, Setup>>,
    /// Set-up attempts made on request, ever (an observable for tests and status).
    setup_attempts: AtomicU64,
    /// The number of this domain's next set-up attempt (random start, so that a restarted
    /// domain does not reuse the numbers its peers' old accounts name).
    next_attempt: AtomicU64,
    /// Set-ups waiting for a peer's half, by peer (at most one each: set-up for a peer is
    /// serialised), woken when that peer's failure account may have changed.
    awaiting: StdMutex<HashMap<DomId, Arc<Notify>>>,
    /// The rendezvous the connection manager introduced this domain to, by peer.
    introductions: StdMutex<HashMap<DomId, String>>,
    /// What every incoming connection passes.
    gate: Arc<GateSlot>,
    /// Whether this domain watches `/local/domain` (else a set-up waiting for a peer watches
    /// that peer's failure account itself).
    watches_all: bool,
}

type GateSlot = StdMutex<Option<Arc<dyn Gate>>>;

/// The set-up on request of the link to one peer.
#[derive(Default)]
struct Setup {
    /// A task runs (or waits out its back-off) for this peer.
    running: bool,
    /// A request arrived since that task's attempt began: it tries once more.
    again: bool,
    /// Failed attempts in a row (the back-off grows with them).
    failures: u32,
}

/// The wait before set-up attempt `failures + 1` on request: none at first, then doubling from
/// 250 ms to at most 30 s, so a peer that keeps asking and never joins costs one attempt per
/// 30 s.
fn setup_backoff(failures: u32) -> Duration {
    match failures {
        0 => Duration::ZERO,
        n => Duration::from_millis(250u64.saturating_mul(1 << (n - 1).min(7))).min(Duration::from_secs(30)),
    }
}

#[derive(Default)]
struct Listening {
    ports: HashMap<u32, Registered>,
    links: HashMap<DomId, Mux>,
}

/// This domain's virtual sockets. Cheap to clone.
pub struct VsockDomain<B: Backend + Clone> {
    inner: Arc<Inner<B>>,
    watcher: Arc<JoinHandle<()>>,
}

impl<B: Backend + Clone> Clone for VsockDomain<B> {
    fn clone(&self) -> Self {
        VsockDomain { inner: self.inner.clone(), watcher: self.watcher.clone() }
    }
}

impl<B: Backend + Clone> Drop for VsockDomain<B> {
    fn drop(&mut self) {
        if Arc::strong_count(&self.watcher) == 1 {
            self.watcher.abort();
        }
    }
}

fn link_path(server: DomId, client: DomId) -> String {
    format!("/local/domain/{}/data/dombus/link/{}", server.0, client.0)
}

fn want_path(me: DomId, server: DomId) -> String {
    format!("/local/domain/{}/data/dombus/want/{}", me.0, server.0)
}

fn listen_path(dom: DomId, port: u32) -> String {
    format!("/local/domain/{}/data/dombus/listen/{}", dom.0, port)
}

/// The kind of I/O error a hypervisor or store error is.
fn backend_kind(e: &BackendError) -> io::ErrorKind {
    match e {
        BackendError::NotFound(_) => io::ErrorKind::NotFound,
        BackendError::PermissionDenied(_) => io::ErrorKind::PermissionDenied,
        _ => io::ErrorKind::Other,
    }
}

fn store_io(e: BackendError) -> io::Error {
    io::Error::new(backend_kind(&e), e)
}

impl<B: Backend + Clone> VsockDomain<B> {
    /// Starts this domain's virtual sockets (must run inside a tokio runtime).
    pub fn start(backend: B, cfg: VsockConfig) -> io::Result<VsockDomain<B>> {
        let me = backend.domid();
        // Under introductions only the backend domain, which serves every domain's link, reads
        // requests; no other domain acts on what it sees in `/local/domain`.
        let watches_all = cfg.set_up == LinkSetUp::Open || me == cfg.backend_domain;
        let watch = if watches_all {
            Some(AsyncWatch::new(backend.store().watch("/local/domain").map_err(store_io)?)?)
        } else {
            None
        };
        let inner = Arc::new(Inner {
            backend,
            me,
            cfg,
            links: StdMutex::new(HashMap::new()),
            listening: StdMutex::new(Listening::default()),
            setups: StdMutex::new(HashMap::new()),
            setup_attempts: AtomicU64::new(0),
            next_attempt: AtomicU64::new(RandomState::new().hash_one(me)),
            awaiting: StdMutex::new(HashMap::new()),
            introductions: StdMutex::new(HashMap::new()),
            gate: Arc::new(StdMutex::new(None)),
            watches_all,
        });
        let weak = Arc::downgrade(&inner);
        let watcher = tokio::spawn(async move {
            let Some(watch) = watch else { return };
            while let Ok(paths) = watch.next().await {
                let Some(inner) = weak.upgrade() else { return };
                for p in paths {
                    inner.failure_changed(&p);
                    let peers = match p.strip_prefix("/local/domain").map(|r| r.trim_start_matches('/')) {
                        // The watch's first event, or its events collapsed: read them all again.
                        Some("") => inner.all_wanted(),
                        // One domain's events collapsed (it wrote faster than we read).
                        Some(d) if !d.contains('/') => {
                            d.parse().ok().map(DomId).filter(|&d| inner.wants(d)).into_iter().collect()
                        }
                        _ => inner.link_wanted(&p).into_iter().collect(),
                    };
                    for peer in peers {
                        inner.set_up_on_request(peer);
                    }
                }
            }
        });
        Ok(VsockDomain { inner, watcher: Arc::new(watcher) })
    }

    /// This domain's id.
    pub fn domid(&self) -> DomId {
        self.inner.me
    }

    /// Link set-up attempts this domain made because a peer asked (requests that arrive while
    /// one runs do not start another): what a peer's requests have cost it so far.
    pub fn setup_attempts(&self) -> u64 {
        self.inner.setup_attempts.load(Ordering::Relaxed)
    }

    /// Listens on `port` for connections from any domain. Ports below 1024 need the backend
    /// domain or a domain listed in [`VsockConfig::privileged`].
    pub fn listen(&self, port: u32) -> io::Result<VsockListener<B>> {
        let inner = &self.inner;
        if port < FIRST_UNPRIVILEGED_PORT
            && inner.me != inner.cfg.backend_domain
            && !inner.cfg.privileged.contains(&inner.me)
        {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "port {port} is reserved for the backend domain and the toolstack (domain {})",
                    inner.me
                ),
            ));
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        {
            let mut l = inner.listening.lock().unwrap_or_else(|p| p.into_inner());
            if l.ports.contains_key(&port) {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("port {port} already has a listener"),
                ));
            }
            let mut forwarders = Vec::new();
            for (&peer, mux) in l.links.iter().filter(|(_, m)| m.stopped().is_none()) {
                forwarders.push(forward(mux.listen(port)?, sender.clone(), peer, port, inner.gate.clone()));
            }
            l.ports.insert(port, Registered { sender, forwarders });
        }
        // Announce, readable by every domain, for connect_wait.
        let store = inner.backend.store();
        let path = listen_path(inner.me, port);
        publish(store, &path, b"1", &[Perm { domid: inner.me, kind: PermKind::Read }]).map_err(store_io)?;
        Ok(VsockListener { domain: self.clone(), port, receiver })
    }

    /// Connects to `addr`. Fails with `ConnectionRefused` if nothing listens there.
    pub async fn connect(&self, addr: VsockAddr) -> io::Result<VsockStream> {
        let peer = self.resolve(addr.cid)?;
        let mux = self.inner.mux(peer).await?;
        mux.connect(addr.port).await
    }

    /// Like [`VsockDomain::connect`], but first waits up to `deadline` for a listener on `addr`
    /// to be announced — woken by a store watch, not by retries.
    pub async fn connect_wait(&self, addr: VsockAddr, deadline: Duration) -> io::Result<VsockStream> {
        let peer = self.resolve(addr.cid)?;
        let path = listen_path(peer, addr.port);
        let store = self.inner.backend.store();
        let watch = AsyncWatch::new(store.watch(&path).map_err(store_io)?)?;
        tokio::time::timeout(deadline, async {
            loop {
                match store.read(&path) {
                    Ok(_) => return Ok(()),
                    Err(BackendError::NotFound(_)) | Err(BackendError::PermissionDenied(_)) => {}
                    Err(e) => return Err(store_io(e)),
                }
                watch.next().await?;
            }
        })
        .await
        .map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, format!("no listener on {addr} within {deadline:?}"))
        })??;
        self.connect(addr).await
    }

    /// This domain's links that are up: the peer and the connections open on the link.
    pub fn links(&self) -> Vec<(DomId, usize)> {
        let l = self.inner.listening.lock().unwrap_or_else(|p| p.into_inner());
        let mut links: Vec<(DomId, usize)> = l
            .links
            .iter()
            .filter(|(_, m)| m.stopped().is_none())
            .map(|(&d, m)| (d, m.connections()))
            .collect();
        links.sort_unstable();
        links
    }

    /// Ends every link of this domain now as lost (each of their connections, listeners and
    /// pending connects fails with a transport reset): for the owner of the domain's attachment
    /// once it knows the links are dead though their rings do not say so yet — its domain was
    /// migrated or died, and Xen moves no grants.
    pub fn reset_links(&self, why: &str) {
        let l = self.inner.listening.lock().unwrap_or_else(|p| p.into_inner());
        for mux in l.links.values() {
            mux.reset(why);
        }
    }

    /// Records that the connection manager introduced this domain to `peer` at the rendezvous
    /// `path`, once the store shows it to be the manager's for exactly the two domains (else
    /// `PermissionDenied`, and nothing is recorded), and starts this domain's half of the link.
    /// A link with `peer` at another rendezvous is ended: the manager introduces a pair again
    /// only when one of them lost the link.
    pub fn introduce(&self, peer: DomId, path: &str) -> io::Result<()> {
        let inner = &self.inner;
        if inner.on_request(peer) || peer == inner.me {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the link with domain {peer} is not set up by introduction"),
            ));
        }
        inner.check_rendezvous(path, peer)?;
        let old =
            inner.introductions.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, path.to_string());
        if old.as_deref().is_some_and(|o| o != path) {
            self.end_link(peer, "the connection manager introduced the pair again");
        }
        inner.set_up_on_request(peer);
        Ok(())
    }

    /// Forgets the introduction to `peer` and ends the link with it (its connections fail with a
    /// transport reset saying `why`). Whether there was a link.
    pub fn forget(&self, peer: DomId, why: &str) -> bool {
        self.inner.introductions.lock().unwrap_or_else(|p| p.into_inner()).remove(&peer);
        self.end_link(peer, why)
    }

    fn end_link(&self, peer: DomId, why: &str) -> bool {
        let l = self.inner.listening.lock().unwrap_or_else(|p| p.into_inner());
        match l.links.get(&peer).filter(|m| m.stopped().is_none()) {
            Some(mux) => {
                mux.reset(why);
                true
            }
            None => false,
        }
    }

    /// Resets the connections with `peer` that involve `port`: this domain's port when `ours`
    /// (connections `peer` made to us), else the peer's (connections we made to it). How many.
    pub fn reset_port(&self, peer: DomId, port: u32, ours: bool) -> usize {
        let l = self.inner.listening.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mux) = l.links.get(&peer) else { return 0 };
        mux.reset_connections(|id| if ours { id.local == port } else { id.peer == port })
    }

    /// Sets what every incoming connection passes from now on (see [`Gate`]).
    pub fn set_gate(&self, gate: Arc<dyn Gate>) {
        *self.inner.gate.lock().unwrap_or_else(|p| p.into_inner()) = Some(gate);
    }

    /// Whether a link with `peer` is up.
    pub fn has_link(&self, peer: DomId) -> bool {
        let l = self.inner.listening.lock().unwrap_or_else(|p| p.into_inner());
        l.links.get(&peer).is_some_and(|m| m.stopped().is_none())
    }

    /// Makes rendezvous `id` for domains `a` and `b` (the backend domain's connection manager
    /// does): a directory under this domain's home, owned by it, usable by exactly the two.
    /// Its path.
    pub fn create_rendezvous(&self, a: DomId, b: DomId, id: u64) -> io::Result<String> {
        let store = self.inner.backend.store();
        let path = rendezvous_path(self.inner.me, id);
        // A left-over directory of that id (a restarted manager) goes first, with its contents.
        match store.rm(&path) {
            Ok(()) | Err(BackendError::NotFound(_)) => {}
            Err(e) => return Err(store_io(e)),
        }
        store.mkdir(&path).map_err(store_io)?;
        store.set_perms(&path, &rendezvous_perms(self.inner.me, a, b)).map_err(store_io)?;
        Ok(path)
    }

    /// Removes a rendezvous this domain made (and what the two domains wrote in it).
    pub fn remove_rendezvous(&self, path: &str) -> io::Result<()> {
        match self.inner.backend.store().rm(path) {
            Ok(()) | Err(BackendError::NotFound(_)) => Ok(()),
            Err(e) => Err(store_io(e)),
        }
    }

    /// The name the toolstack gave domain `dom` (`/local/domain/<id>/name`), if this domain may
    /// read it and there is one.
    pub fn domain_name(&self, dom: DomId) -> Option<String> {
        let raw = self.inner.backend.store().read(&format!("/local/domain/{}/name", dom.0)).ok()?;
        String::from_utf8(raw).ok()
    }

    /// The hypervisor backend this domain is attached with.
    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    fn resolve(&self, cid: u32) -> io::Result<DomId> {
        let dom = match cid {
            CID_BACKEND => self.inner.cfg.backend_domain,
            CID_SELF => self.inner.me,
            c => u16::try_from(c).ok().map(DomId).filter(|d| d.is_guest_id()).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("CID {c} is not a domain id"))
            })?,
        };
        if dom == self.inner.me {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "connections to the own domain are not supported",
            ));
        }
        Ok(dom)
    }
}

impl<B: Backend + Clone> Inner<B> {
    /// Whether this domain serves (publishes) its link with `peer`: the backend domain serves
    /// every link under introductions, otherwise the lower id.
    fn serves(&self, peer: DomId) -> bool {
        match self.cfg.set_up {
            LinkSetUp::Introduced if self.me == self.cfg.backend_domain => true,
            LinkSetUp::Introduced if peer == self.cfg.backend_domain => false,
            _ => self.me < peer,
        }
    }

    /// Whether the link with `peer` is set up on request through the store (every link when
    /// open; only the backend domain's under introductions).
    fn on_request(&self, peer: DomId) -> bool {
        self.cfg.set_up == LinkSetUp::Open
            || self.me == self.cfg.backend_domain
            || peer == self.cfg.backend_domain
    }

    /// The rendezvous for the link with `peer`: `None` for a link on request, else the one the
    /// connection manager introduced (an error if there is none).
    fn rendezvous(&self, peer: DomId) -> io::Result<Option<String>> {
        if self.on_request(peer) {
            return Ok(None);
        }
        let intro = self.introductions.lock().unwrap_or_else(|p| p.into_inner()).get(&peer).cloned();
        intro.map(Some).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("domain {peer} was not introduced to this domain by the connection manager"),
            )
        })
    }

    /// Checks that `path` is the connection manager's rendezvous for this domain and `peer`.
    fn check_rendezvous(&self, path: &str, peer: DomId) -> io::Result<()> {
        let perms = self.backend.store().get_perms(path).map_err(|e| {
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("refusing the link with domain {peer}: cannot read the rendezvous {path}: {e}"),
            )
        })?;
        check_rendezvous(path, &perms, self.cfg.backend_domain, self.me, peer)
    }

    /// If `path` is a link request from a higher domain or a link published by a lower one for
    /// us, the peer to set up a link with.
    fn link_wanted(&self, path: &str) -> Option<DomId> {
        let rest = path.strip_prefix("/local/domain/")?;
        let (dom, rest) = rest.split_once('/')?;
        let dom = DomId(dom.parse().ok()?);
        if let Some(target) = rest.strip_prefix("data/dombus/want/") {
            (target.parse::<u16>().ok()? == self.me.0 && dom != self.me && self.serves(dom)).then_some(dom)
        } else if let Some(rest) = rest.strip_prefix("data/dombus/link/") {
            let (client, key) = rest.split_once('/')?;
            (key == "ring-ref"
                && client.parse::<u16>().ok()? == self.me.0
                && dom != self.me
                && !self.serves(dom))
            .then_some(dom)
        } else {
            None
        }
    }

    /// Every peer that has asked for a link or published one for this domain, read from the
    /// store (what the watch's events would have said, had none been collapsed).
    ///
    /// Only a domain that may list `/local/domain` (dom0, the backend, which serves every guest's
    /// link) can do this for every domain; a guest reads the backend's and the privileged
    /// domains' (and relies on the per-domain collapse, which names the domain, for the rest).
    fn all_wanted(&self) -> Vec<DomId> {
        match self.backend.store().directory("/local/domain") {
            Ok(doms) => {
                doms.iter().filter_map(|d| d.parse().ok().map(DomId)).filter(|&d| self.wants(d)).collect()
            }
            Err(e) => {
                // A guest may not list the domains; the ones it knows are the backend domain
                // and the privileged ones (the toolstack's): a link one of them published while
                // this domain's agent was away (restarted) is found here, not after the
                // publisher's set-up timed out.
                tracing::debug!(me = %self.me, error = %e, "cannot list the domains; reading the known ones' link requests");
                let mut known: Vec<DomId> = std::iter::once(self.cfg.backend_domain)
                    .chain(self.cfg.privileged.iter().copied())
                    .collect();
                known.sort_unstable();
                known.dedup();
                known.into_iter().filter(|&d| d != self.me && self.wants(d)).collect()
            }
        }
    }

    /// Whether `peer` has asked for a link (a higher domain) or published one for us (a lower).
    fn wants(&self, peer: DomId) -> bool {
        let path = if peer == self.me || !self.on_request(peer) {
            return false;
        } else if self.serves(peer) {
            want_path(peer, self.me)
        } else {
            format!("{}/ring-ref", link_path(peer, self.me))
        };
        self.backend.store().read(&path).is_ok()
    }

    /// Sets up the link `peer` asked for: starts the peer's one set-up task, or tells the running
    /// one to try once more.
    fn set_up_on_request(self: &Arc<Self>, peer: DomId) {
        {
            let mut setups = self.setups.lock().unwrap_or_else(|p| p.into_inner());
            let setup = setups.entry(peer).or_default();
            if setup.running {
                setup.again = true;
                return;
            }
            setup.running = true;
        }
        let inner = self.clone();
        tokio::spawn(async move {
            loop {
                let failures = {
                    let mut setups = inner.setups.lock().unwrap_or_else(|p| p.into_inner());
                    let setup = setups.entry(peer).or_default();
                    setup.again = false;
                    setup.failures
                };
                tokio::time::sleep(setup_backoff(failures)).await;
                inner.setup_attempts.fetch_add(1, Ordering::Relaxed);
                let result = inner.mux(peer).await;
                let mut setups = inner.setups.lock().unwrap_or_else(|p| p.into_inner());
                let setup = setups.entry(peer).or_default();
                match result {
                    Ok(_) => setup.failures = 0,
                    Err(e) => {
                        setup.failures = setup.failures.saturating_add(1);
                        tracing::debug!(%peer, error = %e, failures = setup.failures, "link set-up on request failed");
                    }
                }
                if !setup.again {
                    if setup.failures == 0 {
                        setups.remove(&peer);
                    } else {
                        setup.running = false;
                    }
                    return;
                }
            }
        });
    }

    /// The link to `peer`, set up if there is none (or the old one stopped).
    async fn mux(self: &Arc<Self>, peer: DomId) -> io::Result<Mux> {
        let slot = self.links.lock().unwrap_or_else(|p| p.into_inner()).entry(peer).or_default().clone();
        let mut guard = slot.lock().await;
        if let Some(mux) = guard.as_ref().filter(|m| m.stopped().is_none()) {
            return Ok(mux.clone());
        }
        let link = self.set_up(peer).await?;
        // Up: an account this domain gave of an earlier failure no longer holds. It goes before
        // the link carries anything, so once the peer's first connection is answered it is gone.
        self.clear_failure(peer);
        let mux = {
            // Every listener of this domain also listens on the new link, from its first packet.
            let mut l = self.listening.lock().unwrap_or_else(|p| p.into_inner());
            let ports: Vec<u32> = l.ports.keys().copied().collect();
            let (mux, listeners) = Mux::spawn_listening(link, self.cfg.session.clone(), &ports);
            for (&port, listener) in ports.iter().zip(listeners) {
                if let Some(reg) = l.ports.get_mut(&port) {
                    reg.forwarders.push(forward(listener, reg.sender.clone(), peer, port, self.gate.clone()));
                }
            }
            l.links.insert(peer, mux.clone());
            mux
        };
        tracing::debug!(me = %self.me, %peer, "virtual-socket link up");
        *guard = Some(mux.clone());
        Ok(mux)
    }

    /// Sets up this domain's half of the link to `peer`, then waits up to the link timeout for
    /// the peer's half, or for the peer's account of why it cannot set up its own.
    async fn set_up(&self, peer: DomId) -> io::Result<Link<B>> {
        if let Some(rdv) = self.rendezvous(peer)? {
            return self.set_up_introduced(peer, &rdv).await;
        }
        let attempt = self.next_attempt.fetch_add(1, Ordering::Relaxed);
        // Registered before the attempt is published: no change to the peer's account is missed.
        let awaiting = Awaiting::register(self, peer)?;
        let store = self.backend.store();
        let perms = self.perms_for(peer);
        let joined = if self.serves(peer) {
            let rel = format!("data/dombus/link/{}", peer.0);
            // The attempt's number before the link: a client that sees the link also finds it.
            let attempt_path = format!("{}/{ATTEMPT_KEY}", link_path(self.me, peer));
            let listener = publish(store, &attempt_path, attempt.to_string().as_bytes(), &perms)
                .map_err(LinkError::from)
                .and_then(|()| Link::listen(&self.backend, &rel, peer, &self.cfg.link))
                .map_err(|e| {
                    let _ = store.rm(&link_path(self.me, peer));
                    self.own_failure(peer, e)
                })?;
            tokio::time::timeout(self.cfg.link_timeout, async {
                tokio::select! {
                    accepted = listener.accept() => accepted.map_err(io::Error::from),
                    failed = awaiting.peer_failure(attempt) => Err(failed),
                }
            })
            .await
        } else {
            // Ask the lower domain to publish, then join.
            let want = want_path(self.me, peer);
            publish(store, &want, attempt.to_string().as_bytes(), &perms)
                .map_err(|e| self.own_failure(peer, e.into()))?;
            let path = link_path(peer, self.me);
            tokio::time::timeout(self.cfg.link_timeout, async {
                tokio::select! {
                    joined = Link::connect(&self.backend, &path, peer, &self.cfg.link) => {
                        joined.map_err(|e| self.own_failure(peer, e))
                    }
                    failed = awaiting.peer_failure(attempt) => Err(failed),
                }
            })
            .await
        };
        joined.map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, format!("domain {peer} did not join the link"))
        })?
    }

    /// Sets up this domain's half of the link to `peer` in the rendezvous `rdv` the connection
    /// manager made, once it proved to be one, then waits up to the link timeout for the peer.
    /// The lower id serves.
    async fn set_up_introduced(&self, peer: DomId, rdv: &str) -> io::Result<Link<B>> {
        self.check_rendezvous(rdv, peer)?;
        let joined = if self.me < peer {
            let listener = Link::listen(&self.backend, rdv, peer, &self.cfg.link)?;
            tokio::time::timeout(self.cfg.link_timeout, listener.accept())
                .await
                .map(|r| r.map_err(io::Error::from))
        } else {
            tokio::time::timeout(
                self.cfg.link_timeout,
                Link::connect(&self.backend, rdv, peer, &self.cfg.link),
            )
            .await
            .map(|r| r.map_err(io::Error::from))
        };
        joined.map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, format!("domain {peer} did not join the introduced link"))
        })?
    }

    /// Store permissions of a node this domain keeps for `peer` alone: the owner's, and `peer`'s
    /// to read.
    fn perms_for(&self, peer: DomId) -> [Perm; 2] {
        [Perm { domid: self.me, kind: PermKind::None }, Perm { domid: peer, kind: PermKind::Read }]
    }

    /// This domain's half of the link to `peer` failed with `why`: tells the peer (if it waits)
    /// and gives the caller the error, naming the link.
    fn own_failure(&self, peer: DomId, why: LinkError) -> io::Error {
        tracing::debug!(me = %self.me, %peer, error = %why, "could not set up our half of the link");
        self.report_failure(peer, &why);
        let kind = match &why {
            LinkError::Backend(e) => backend_kind(e),
            other => other.kind(),
        };
        io::Error::new(kind, OwnSetupFailed { peer, source: why })
    }

    /// Writes why this domain could not set up its half of the link to `peer`, for the peer's
    /// current attempt (read from its request, or from the link it published). A peer that has
    /// no attempt to name waits for nothing and is told nothing.
    fn report_failure(&self, peer: DomId, why: &LinkError) {
        let store = self.backend.store();
        let attempt_path = if self.serves(peer) {
            want_path(peer, self.me)
        } else {
            format!("{}/{ATTEMPT_KEY}", link_path(peer, self.me))
        };
        let Some(attempt) = store.read(&attempt_path).ok().and_then(|raw| parse_attempt(&raw)) else {
            return;
        };
        let account = encode_failure(attempt, &why.to_string());
        let path = failure_path(self.me, peer);
        if let Err(e) = publish(store, &path, account.as_bytes(), &self.perms_for(peer)) {
            tracing::debug!(%path, error = %e, "cannot tell the peer why the link could not be set up");
        }
    }

    /// Removes this domain's account of a failure to set up the link to `peer`, if any.
    fn clear_failure(&self, peer: DomId) {
        let path = failure_path(self.me, peer);
        match self.backend.store().rm(&path) {
            Ok(()) | Err(BackendError::NotFound(_)) => {}
            Err(e) => tracing::debug!(%path, error = %e, "cannot remove a stale link set-up failure"),
        }
    }

    /// Wakes the set-up waiting for the domain whose failure account `path` may have changed:
    /// the account itself, or a collapsed event for that domain (or for all of them).
    fn failure_changed(&self, path: &str) {
        let awaiting = self.awaiting.lock().unwrap_or_else(|p| p.into_inner());
        if awaiting.is_empty() {
            return;
        }
        match path.strip_prefix("/local/domain").map(|r| r.trim_start_matches('/')) {
            Some("") => awaiting.values().for_each(|n| n.notify_one()),
            Some(d) if !d.contains('/') => {
                if let Some(n) = d.parse().ok().and_then(|d| awaiting.get(&DomId(d))) {
                    n.notify_one();
                }
            }
            _ => {
                if let Some(n) = failure_writer(path, self.me).and_then(|d| awaiting.get(&d)) {
                    n.notify_one();
                }
            }
        }
    }
}

/// A set-up waiting for a peer's half of the link: while it lives, the domain's watch wakes it
/// whenever that peer's failure account may have changed.
struct Awaiting<'a, B: Backend + Clone> {
    inner: &'a Inner<B>,
    peer: DomId,
    changed: Arc<Notify>,
    /// A watch on the peer's account, for a domain that does not watch `/local/domain`.
    own: Option<AsyncWatch<<B::Store as Store>::Watch>>,
}

impl<'a, B: Backend + Clone> Awaiting<'a, B> {
    fn register(inner: &'a Inner<B>, peer: DomId) -> io::Result<Self> {
        let changed = Arc::new(Notify::new());
        inner.awaiting.lock().unwrap_or_else(|p| p.into_inner()).insert(peer, changed.clone());
        let own = if inner.watches_all {
            None
        } else {
            let path = failure_path(peer, inner.me);
            Some(AsyncWatch::new(inner.backend.store().watch(&path).map_err(store_io)?)?)
        };
        Ok(Awaiting { inner, peer, changed, own })
    }

    /// Resolves once the peer's account names `attempt`, with the error to fail the set-up with.
    async fn peer_failure(&self, attempt: u64) -> io::Error {
        let path = failure_path(self.peer, self.inner.me);
        loop {
            // A change after this read leaves a permit in `changed`: none is missed.
            if let Ok(raw) = self.inner.backend.store().read(&path)
                && let Some(reason) = decode_failure(&raw, attempt)
            {
                tracing::debug!(me = %self.inner.me, peer = %self.peer, %reason, "the peer could not set up the link");
                return io::Error::other(PeerSetupFailed { peer: self.peer, reason });
            }
            match &self.own {
                Some(own) => {
                    tokio::select! {
                        () = self.changed.notified() => {}
                        changed = own.next() => if changed.is_err() { std::future::pending::<()>().await },
                    }
                }
                None => self.changed.notified().await,
            }
        }
    }
}

impl<B: Backend + Clone> Drop for Awaiting<'_, B> {
    fn drop(&mut self) {
        let mut awaiting = self.inner.awaiting.lock().unwrap_or_else(|p| p.into_inner());
        if awaiting.get(&self.peer).is_some_and(|n| Arc::ptr_eq(n, &self.changed)) {
            awaiting.remove(&self.peer);
        }
    }
}

/// Moves connections accepted on one link to the domain-wide listener, each once the gate (if
/// any) admitted it; a refused one is closed at once.
fn forward(
    listener: MuxListener,
    to: mpsc::UnboundedSender<VsockStream>,
    peer: DomId,
    port: u32,
    gate: Arc<GateSlot>,
) -> (JoinHandle<()>, ListenerCloser) {
    let closer = listener.closer();
    let task = tokio::spawn(async move {
        while let Ok(stream) = listener.accept().await {
            let gate = gate.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(gate) = gate
                && !gate.admit(peer, port).await
            {
                tracing::info!(%peer, port, "connection refused by the gate");
                continue;
            }
            if to.send(stream).is_err() {
                return;
            }
        }
    });
    (task, closer)
}

/// Connections to one port of this domain, from any domain.
pub struct VsockListener<B: Backend + Clone> {
    domain: VsockDomain<B>,
    port: u32,
    receiver: mpsc::UnboundedReceiver<VsockStream>,
}

impl<B: Backend + Clone> VsockListener<B> {
    /// The next connection.
    pub async fn accept(&mut self) -> io::Result<VsockStream> {
        self.receiver.recv().await.ok_or_else(|| io::Error::other("listener closed"))
    }

    /// The port.
    pub fn port(&self) -> u32 {
        self.port
    }
}

impl<B: Backend + Clone> Drop for VsockListener<B> {
    fn drop(&mut self) {
        let inner = &self.domain.inner;
        if let Some(reg) = inner.listening.lock().unwrap_or_else(|p| p.into_inner()).ports.remove(&self.port)
        {
            for (task, closer) in reg.forwarders {
                closer.close();
                task.abort();
            }
        }
        let _ = inner.backend.store().rm(&listen_path(inner.me, self.port));
    }
}
