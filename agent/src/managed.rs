//! A domain's virtual sockets under the host's connection manager: what an agent runs.
//!
//! [`Managed`] keeps one session with the manager ([`super::manager`]) over the domain's link
//! with the backend domain, registering the domain when it starts and again whenever the session
//! comes back (a restarted manager, a migrated domain). Every connection it makes, to any port
//! but the manager's, is first allowed by the manager: the answer names the decision, and where
//! the pair has no link yet, the rendezvous both agents build it in; a denial is the error
//! [`Denied`], the same for a domain that does not exist. Every connection that arrives passes
//! the domain's gate, which asks the manager about the connecting domain and port. Decisions are
//! cached per (domain, port, direction) until the manager says the policy changed; the manager
//! being away costs no existing link or connection, and a connection that needs a decision
//! waits for it up to the caller's deadline (an arriving one up to [`CHECK_WAIT`]) and then
//! fails (is refused), never opens.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use dombus_transport_xen::DomId;
use dombus_transport_xen::backend::Backend;
use dombus_transport_xen::vsock::domain::VsockDomain;
use dombus_transport_xen::vsock::mux::VsockStream;
use dombus_transport_xen::vsock::{CID_BACKEND, CID_SELF, Gate, VsockAddr};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::manager::{
    Answer, Call, FromManager, MANAGER_PORT, Peer, ToManager, VERSION, read_message, write_message,
};
use crate::sockets::{BoxFuture, DomainSockets, PortListener};

/// How long a connection waits for the manager's decision when its caller gave no deadline.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5);
/// How long an arriving connection waits for the manager's decision before it is refused.
pub const CHECK_WAIT: Duration = Duration::from_secs(2);
/// Most cached decisions (the cache is emptied when full).
const MAX_CACHED: usize = 65_536;
/// Longest pause between attempts to reach the manager.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The connection manager refused a connection: the policy does not allow it, or the domain
/// does not exist (the caller cannot tell which; the toolstack looks the decision up).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "refused by the host's connection manager (decision {decision}): no such domain, or the policy does not allow this connection; the toolstack can look it up with `dombus policy decision {decision}`"
)]
pub struct Denied {
    /// The decision's id in the manager's audit trail.
    pub decision: u64,
}

impl From<Denied> for io::Error {
    fn from(d: Denied) -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, d)
    }
}

/// The decision an error carries, if it is a [`Denied`] (also across the local protocol).
pub fn denied(e: &io::Error) -> Option<u64> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<Denied>()).map(|d| d.decision)
}

/// What the connection manager needs of the backend domain's sockets, beyond [`DomainSockets`].
pub trait ManagerOps: Send + Sync + 'static {
    /// Makes rendezvous `id` for domains `a` and `b`; its path.
    fn create_rendezvous(&self, a: DomId, b: DomId, id: u64) -> io::Result<String>;
    /// Removes a rendezvous.
    fn remove_rendezvous(&self, path: &str) -> io::Result<()>;
    /// The name the toolstack gave `dom`.
    fn domain_name(&self, dom: DomId) -> Option<String>;
    /// Resets this domain's connections with `peer` involving `port` (ours or the peer's).
    fn reset_port(&self, peer: DomId, port: u32, ours: bool) -> usize;
    /// Sets the gate of this domain's incoming connections.
    fn set_gate(&self, gate: Arc<dyn Gate>);
}

impl<B: Backend + Clone> ManagerOps for VsockDomain<B> {
    fn create_rendezvous(&self, a: DomId, b: DomId, id: u64) -> io::Result<String> {
        VsockDomain::create_rendezvous(self, a, b, id)
    }
    fn remove_rendezvous(&self, path: &str) -> io::Result<()> {
        VsockDomain::remove_rendezvous(self, path)
    }
    fn domain_name(&self, dom: DomId) -> Option<String> {
        VsockDomain::domain_name(self, dom)
    }
    fn reset_port(&self, peer: DomId, port: u32, ours: bool) -> usize {
        VsockDomain::reset_port(self, peer, port, ours)
    }
    fn set_gate(&self, gate: Arc<dyn Gate>) {
        VsockDomain::set_gate(self, gate)
    }
}

/// A domain's virtual sockets under the connection manager. Dropping it ends its session.
pub struct Managed<B: Backend + Clone> {
    domain: VsockDomain<B>,
    shared: Arc<Shared>,
    session: JoinHandle<()>,
}

impl<B: Backend + Clone> Drop for Managed<B> {
    fn drop(&mut self) {
        self.session.abort();
    }
}

/// One session with the manager, as callers use it.
#[derive(Clone)]
struct Session {
    tx: mpsc::Sender<ToManager>,
    pending: Arc<StdMutex<HashMap<u32, oneshot::Sender<Answer>>>>,
}

/// A cached decision's key: the other domain, the port, whether we connect (else it does).
type Key = (DomId, u32, bool);

struct Shared {
    me: DomId,
    backend: DomId,
    session: watch::Sender<Option<Session>>,
    next_id: AtomicU32,
    cache: StdMutex<HashMap<Key, bool>>,
    /// Bumped whenever the cache is emptied: an answer to a call made before is not cached.
    epoch: AtomicU64,
    /// Names of this domain's ports, sent again to every new session.
    services: StdMutex<HashMap<u32, String>>,
    /// The name the manager knows this domain by.
    name: StdMutex<Option<String>>,
}

impl Shared {
    fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cached(&self, key: Key) -> Option<bool> {
        Self::lock(&self.cache).get(&key).copied()
    }

    fn remember(&self, key: Key, allowed: bool, epoch: u64) {
        let mut cache = Self::lock(&self.cache);
        if self.epoch.load(Ordering::Acquire) != epoch {
            return;
        }
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key, allowed);
    }

    fn forget_all(&self) {
        let mut cache = Self::lock(&self.cache);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        cache.clear();
    }

    fn forget_peer(&self, peer: DomId) {
        let mut cache = Self::lock(&self.cache);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        cache.retain(|k, _| k.0 != peer);
    }

    fn unreachable(&self, within: Duration) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the host's connection manager (backend domain {}, port {MANAGER_PORT}) did not answer within {within:?}; existing links keep working, new connections need it",
                self.backend
            ),
        )
    }

    /// Makes `call` on the current session (or the next one, up to `deadline`).
    async fn call(&self, call: Call, deadline: Instant) -> io::Result<Answer> {
        let started = Instant::now();
        let mut sessions = self.session.subscribe();
        loop {
            let current = sessions.borrow_and_update().clone();
            if let Some(s) = current {
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let (tx, answer) = oneshot::channel();
                Self::lock(&s.pending).insert(id, tx);
                let sent = s.tx.send(ToManager::Call { id, call: call.clone() }).await.is_ok();
                if sent {
                    match tokio::time::timeout_at(deadline, answer).await {
                        Ok(Ok(a)) => return Ok(a),
                        Ok(Err(_)) => {} // That session ended: the next one.
                        Err(_) => {
                            Self::lock(&s.pending).remove(&id);
                            return Err(self.unreachable(deadline - started));
                        }
                    }
                } else {
                    Self::lock(&s.pending).remove(&id);
                }
            }
            match tokio::time::timeout_at(deadline, sessions.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return Err(self.unreachable(deadline - started)),
            }
        }
    }
}

impl<B: Backend + Clone> Managed<B> {
    /// The sockets of `domain` (started with [`LinkSetUp::Introduced`](dombus_transport_xen::vsock::LinkSetUp))
    /// under the manager of its backend domain: starts the session with the manager and the
    /// gate of incoming connections (inside a tokio runtime).
    pub fn start(domain: VsockDomain<B>, backend: DomId) -> Managed<B> {
        let (session, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            me: domain.domid(),
            backend,
            session,
            next_id: AtomicU32::new(1),
            cache: StdMutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            services: StdMutex::new(HashMap::new()),
            name: StdMutex::new(None),
        });
        domain.set_gate(Arc::new(ManagedGate(shared.clone())));
        let task = tokio::spawn(run_sessions(domain.clone(), shared.clone()));
        Managed { domain, shared, session: task }
    }

    /// The domain's virtual sockets underneath.
    pub fn domain(&self) -> &VsockDomain<B> {
        &self.domain
    }

    /// Whether a session with the manager is up.
    pub fn registered(&self) -> bool {
        self.shared.session.borrow().is_some()
    }

    /// The name the manager knows this domain by (once registered).
    pub fn name(&self) -> Option<String> {
        Shared::lock(&self.shared.name).clone()
    }

    fn peer_of(&self, cid: u32) -> io::Result<DomId> {
        match cid {
            CID_BACKEND => Ok(self.shared.backend),
            CID_SELF => Ok(self.shared.me),
            c => u16::try_from(c).map(DomId).map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, format!("CID {c} is not a domain id"))
            }),
        }
    }

    /// Asks the manager for `target`'s `port` (and a link if needed); the peer it named.
    async fn allow(&self, target: Peer, port: u32, deadline: Instant) -> io::Result<DomId> {
        let shared = &self.shared;
        if let Peer::Id(p) = target {
            let peer = DomId(p);
            let linked = peer == shared.backend || self.domain.has_link(peer);
            if linked && shared.cached((peer, port, true)) == Some(true) {
                return Ok(peer);
            }
        }
        let epoch = shared.epoch.load(Ordering::Acquire);
        let link = match &target {
            Peer::Id(p) => DomId(*p) != shared.backend && !self.domain.has_link(DomId(*p)),
            // The name's domain is not known yet: the manager names it first.
            Peer::Name(_) => false,
        };
        match shared.call(Call::Introduce { target: target.clone(), port, link }, deadline).await? {
            Answer::Allowed { peer, rendezvous, decision } => {
                let peer = DomId(peer);
                if let Some(r) = rendezvous {
                    tracing::debug!(%peer, %r, decision, "introduced");
                    self.domain.introduce(peer, &r)?;
                } else if matches!(target, Peer::Name(_))
                    && peer != shared.backend
                    && !self.domain.has_link(peer)
                {
                    return Box::pin(self.allow(Peer::Id(peer.0), port, deadline)).await;
                }
                shared.remember((peer, port, true), true, epoch);
                Ok(peer)
            }
            Answer::Denied { decision } => Err(Denied { decision }.into()),
            Answer::Failed { reason } => Err(io::Error::other(format!("the connection manager: {reason}"))),
            Answer::Done => Err(io::Error::other("the connection manager answered out of turn")),
        }
    }

    async fn connect_to(&self, target: Peer, port: u32, wait: Option<Duration>) -> io::Result<VsockStream> {
        let deadline = Instant::now() + wait.unwrap_or(DEFAULT_WAIT);
        if target == Peer::Id(self.shared.me.0) {
            // Connections to the own domain are the sockets' own error, not a decision.
            return self.domain.connect(VsockAddr::new(CID_SELF, port)).await;
        }
        let peer = match target {
            Peer::Id(p) if DomId(p) == self.shared.backend && port == MANAGER_PORT => DomId(p),
            t => self.allow(t, port, deadline).await?,
        };
        let addr = VsockAddr::new(u32::from(peer.0), port);
        match wait {
            Some(_) => {
                self.domain.connect_wait(addr, deadline.saturating_duration_since(Instant::now())).await
            }
            None => self.domain.connect(addr).await,
        }
    }
}

impl<B: Backend + Clone> DomainSockets for Managed<B> {
    fn domid(&self) -> DomId {
        self.domain.domid()
    }

    fn connect(&self, addr: VsockAddr, wait: Option<Duration>) -> BoxFuture<'_, io::Result<VsockStream>> {
        Box::pin(async move {
            let peer = self.peer_of(addr.cid)?;
            self.connect_to(Peer::Id(peer.0), addr.port, wait).await
        })
    }

    fn connect_name(
        &self,
        name: &str,
        port: u32,
        wait: Option<Duration>,
    ) -> BoxFuture<'_, io::Result<VsockStream>> {
        let name = name.to_string();
        Box::pin(async move { self.connect_to(Peer::Name(name), port, wait).await })
    }

    fn listen(&self, port: u32) -> io::Result<Box<dyn PortListener>> {
        Ok(Box::new(self.domain.listen(port)?))
    }

    fn name_port(&self, port: u32, name: Option<&str>) {
        {
            let mut services = Shared::lock(&self.shared.services);
            match name {
                Some(n) => services.insert(port, n.to_string()),
                None => services.remove(&port),
            };
        }
        if let Some(s) = self.shared.session.borrow().clone() {
            let call = Call::Service { port, name: name.map(str::to_string) };
            // Id 0: nobody waits for the answer; the next session sends every name again.
            let _ = s.tx.try_send(ToManager::Call { id: 0, call });
        }
    }

    fn resolve(&self, name: &str) -> io::Result<DomId> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("domain names (here {name:?}) are resolved by the connection manager when connecting"),
        ))
    }

    fn links(&self) -> Vec<(DomId, usize)> {
        self.domain.links()
    }
}

/// The gate of a managed domain: a connection from `peer` to `port` is admitted if the manager
/// allows it (cached).
struct ManagedGate(Arc<Shared>);

impl Gate for ManagedGate {
    fn admit(
        &self,
        peer: DomId,
        port: u32,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> {
        let shared = self.0.clone();
        Box::pin(async move {
            if let Some(allowed) = shared.cached((peer, port, false)) {
                return allowed;
            }
            let epoch = shared.epoch.load(Ordering::Acquire);
            let call = Call::Check { source: peer.0, port };
            match shared.call(call, Instant::now() + CHECK_WAIT).await {
                Ok(Answer::Allowed { .. }) => {
                    shared.remember((peer, port, false), true, epoch);
                    true
                }
                Ok(Answer::Denied { decision }) => {
                    tracing::info!(%peer, port, decision, "connection refused by the policy");
                    shared.remember((peer, port, false), false, epoch);
                    false
                }
                Ok(other) => {
                    tracing::warn!(%peer, port, answer = ?other, "the connection manager gave no decision: refused");
                    false
                }
                Err(e) => {
                    tracing::warn!(%peer, port, error = %e, "no decision from the connection manager: refused");
                    false
                }
            }
        })
    }
}

/// Keeps a session with the manager up for as long as the domain's sockets live.
async fn run_sessions<B: Backend + Clone>(domain: VsockDomain<B>, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let started = Instant::now();
        match session(&domain, &shared).await {
            Ok(()) => tracing::info!(me = %shared.me, "the connection manager ended the session"),
            Err(e) => tracing::debug!(me = %shared.me, error = %e, "no session with the connection manager"),
        }
        shared.session.send_replace(None);
        shared.forget_all();
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(50);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// One session: registers, then answers notices and carries calls until either side ends it.
async fn session<B: Backend + Clone>(domain: &VsockDomain<B>, shared: &Arc<Shared>) -> io::Result<()> {
    let stream = domain.connect(VsockAddr::new(CID_BACKEND, MANAGER_PORT)).await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    write_message(&mut wr, &ToManager::Hello { version: VERSION }).await?;
    let welcome =
        tokio::time::timeout(CHECK_WAIT, read_message::<_, FromManager>(&mut rd)).await.map_err(|_| {
            io::Error::new(io::ErrorKind::TimedOut, "the connection manager did not welcome us")
        })??;
    match welcome {
        Some(FromManager::Welcome { domid, name, generation }) => {
            tracing::info!(me = %shared.me, domid, ?name, generation, "registered with the connection manager");
            *Shared::lock(&shared.name) = name;
        }
        Some(FromManager::Refused { reason }) => {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the connection manager refused us: {reason}"),
            ));
        }
        other => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("the connection manager opened with {other:?}"),
            ));
        }
    }
    let (tx, mut outgoing) = mpsc::channel::<ToManager>(256);
    let names: Vec<(u32, String)> =
        Shared::lock(&shared.services).iter().map(|(p, n)| (*p, n.clone())).collect();
    for (port, name) in names {
        write_message(&mut wr, &ToManager::Call { id: 0, call: Call::Service { port, name: Some(name) } })
            .await?;
    }
    let pending: Arc<StdMutex<HashMap<u32, oneshot::Sender<Answer>>>> = Arc::default();
    shared.forget_all();
    shared.session.send_replace(Some(Session { tx, pending: pending.clone() }));

    let writer = async {
        let mut reported = None;
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                m = outgoing.recv() => match m {
                    Some(m) => write_message(&mut wr, &m).await?,
                    None => return Ok(()),
                },
                _ = tick.tick() => {
                    let links: Vec<(u16, u32)> = domain
                        .links()
                        .into_iter()
                        .take(crate::manager::MAX_REPORTED_LINKS)
                        .map(|(d, n)| (d.0, u32::try_from(n).unwrap_or(u32::MAX)))
                        .collect();
                    if reported.as_ref() != Some(&links) {
                        write_message(&mut wr, &ToManager::Links(links.clone())).await?;
                        reported = Some(links);
                    }
                }
            }
        }
    };
    let reader = async {
        loop {
            let Some(m) = read_message::<_, FromManager>(&mut rd).await? else { return Ok(()) };
            match m {
                FromManager::Reply { id, answer } => {
                    if let Some(tx) = Shared::lock(&pending).remove(&id) {
                        let _ = tx.send(answer);
                    }
                }
                FromManager::Introduced { peer, rendezvous, decision } => {
                    let peer = DomId(peer);
                    tracing::debug!(%peer, %rendezvous, decision, "introduced by the connection manager");
                    if let Err(e) = domain.introduce(peer, &rendezvous) {
                        tracing::warn!(%peer, %rendezvous, error = %e, "cannot take up an introduction");
                    }
                }
                FromManager::PolicyChanged { generation } => {
                    tracing::debug!(generation, "the policy changed: cached decisions dropped");
                    shared.forget_all();
                }
                FromManager::Revoke { peer, port, ours } => {
                    let peer = DomId(peer);
                    shared.forget_peer(peer);
                    match port {
                        None => {
                            let had = domain.forget(peer, "the connection manager revoked the link");
                            tracing::info!(%peer, had, "link revoked");
                        }
                        Some(port) => {
                            let n = domain.reset_port(peer, port, ours);
                            tracing::info!(%peer, port, ours, reset = n, "connections revoked");
                        }
                    }
                }
                FromManager::Welcome { .. } | FromManager::Refused { .. } => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the connection manager welcomed us twice",
                    ));
                }
            }
        }
    };
    tokio::select! {
        r = writer => r,
        r = reader => r,
    }
}
