//! A domain's virtual sockets as one object-safe interface: what an agent serves to the
//! processes of its domain, and what a process that is its own agent calls directly.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dombus_transport_xen::DomId;
use dombus_transport_xen::backend::{Backend, BackendError, Store};
use dombus_transport_xen::vsock::VsockAddr;
use dombus_transport_xen::vsock::domain::{VsockDomain, VsockListener};
use dombus_transport_xen::vsock::mux::VsockStream;
use tokio::sync::watch;

/// A boxed future, as the object-safe traits here return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A domain's virtual sockets, whatever its hypervisor backend.
pub trait DomainSockets: Send + Sync + 'static {
    /// This domain's id.
    fn domid(&self) -> DomId;
    /// Connects to `addr`, first waiting up to `wait` for its listener to be announced.
    fn connect(&self, addr: VsockAddr, wait: Option<Duration>) -> BoxFuture<'_, io::Result<VsockStream>>;
    /// Listens on `port` of this domain.
    fn listen(&self, port: u32) -> io::Result<Box<dyn PortListener>>;
    /// The domain named `name` in the store (`/local/domain/<id>/name`).
    fn resolve(&self, name: &str) -> io::Result<DomId>;
    /// Connects to `port` of the domain named `name` (under a connection manager, the manager
    /// resolves the name, and an unknown name is refused like a denied connection).
    fn connect_name(
        &self,
        name: &str,
        port: u32,
        wait: Option<Duration>,
    ) -> BoxFuture<'_, io::Result<VsockStream>> {
        let name = name.to_string();
        Box::pin(async move {
            let dom = self.resolve(&name)?;
            self.connect(VsockAddr::new(u32::from(dom.0), port), wait).await
        })
    }
    /// Says that `port` of this domain serves the service `name` (`None`: no longer), for a
    /// connection manager's rules that name services. Nothing without one.
    fn name_port(&self, port: u32, name: Option<&str>) {
        let _ = (port, name);
    }
    /// The links that are up: peer domain and connections open on each.
    fn links(&self) -> Vec<(DomId, usize)>;
}

/// A listening port of a domain.
pub trait PortListener: Send + 'static {
    /// The next connection.
    fn accept(&mut self) -> BoxFuture<'_, io::Result<VsockStream>>;
}

impl<B: Backend + Clone> DomainSockets for VsockDomain<B> {
    fn domid(&self) -> DomId {
        VsockDomain::domid(self)
    }

    fn connect(&self, addr: VsockAddr, wait: Option<Duration>) -> BoxFuture<'_, io::Result<VsockStream>> {
        Box::pin(async move {
            match wait {
                Some(w) => self.connect_wait(addr, w).await,
                None => VsockDomain::connect(self, addr).await,
            }
        })
    }

    fn listen(&self, port: u32) -> io::Result<Box<dyn PortListener>> {
        Ok(Box::new(VsockDomain::listen(self, port)?))
    }

    fn resolve(&self, name: &str) -> io::Result<DomId> {
        resolve(self.backend().store(), name)
    }

    fn links(&self) -> Vec<(DomId, usize)> {
        VsockDomain::links(self)
    }
}

impl<B: Backend + Clone> PortListener for VsockListener<B> {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<VsockStream>> {
        Box::pin(VsockListener::accept(self))
    }
}

/// Listens on `port` of `sockets`, saying that it serves the service `name` while the returned
/// listener lives (see [`DomainSockets::name_port`]).
pub fn listen_as(
    sockets: Arc<dyn DomainSockets>,
    port: u32,
    name: &str,
) -> io::Result<Box<dyn PortListener>> {
    let inner = sockets.listen(port)?;
    sockets.name_port(port, Some(name));
    Ok(Box::new(Named { inner, sockets, port }))
}

/// A listener whose port has a service name, given up with the listener.
struct Named {
    inner: Box<dyn PortListener>,
    sockets: Arc<dyn DomainSockets>,
    port: u32,
}

impl PortListener for Named {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<VsockStream>> {
        self.inner.accept()
    }
}

impl Drop for Named {
    fn drop(&mut self) {
        self.sockets.name_port(self.port, None);
    }
}

/// Most domains [`resolve`] reads the names of.
const MAX_DOMAINS: usize = 4096;

/// The one domain named `name`, read from the store: every `/local/domain/<id>/name` this
/// domain may read (the toolstack's domain reads them all; a guest, only those the toolstack let
/// it read).
pub fn resolve(store: &impl Store, name: &str) -> io::Result<DomId> {
    let ids = store.directory("/local/domain").map_err(|e| store_error(e, name))?;
    let mut found = Vec::new();
    for id in ids.iter().take(MAX_DOMAINS).filter_map(|d| d.parse::<DomId>().ok()) {
        if let Ok(n) = store.read(&format!("/local/domain/{id}/name")) {
            if n == name.as_bytes() {
                found.push(id);
            }
        }
    }
    match found[..] {
        [id] => Ok(id),
        [] => Err(io::Error::new(io::ErrorKind::NotFound, format!("no domain is named {name:?}"))),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} domains are named {name:?} ({found:?}): use a domain id", found.len()),
        )),
    }
}

fn store_error(e: BackendError, name: &str) -> io::Error {
    let kind = match e {
        BackendError::PermissionDenied(_) => io::ErrorKind::PermissionDenied,
        BackendError::NotFound(_) => io::ErrorKind::NotFound,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, format!("looking up the domain named {name:?}: {e}"))
}

/// A domain's virtual sockets that follow the domain across migrations: each call goes to the
/// domain's current incarnation, and listeners listen again under the domain's new id (their
/// announcement moves with them), so a listening process never notices. Whoever owns the
/// attachment sends each new incarnation on the channel; when it drops the sender (the domain
/// ended for good), listeners end with their last error.
pub struct Following {
    current: watch::Receiver<Arc<dyn DomainSockets>>,
}

impl Following {
    /// Sockets that follow what `current` says.
    pub fn new(current: watch::Receiver<Arc<dyn DomainSockets>>) -> Following {
        Following { current }
    }

    fn now(&self) -> Arc<dyn DomainSockets> {
        self.current.borrow().clone()
    }
}

impl DomainSockets for Following {
    fn domid(&self) -> DomId {
        self.now().domid()
    }

    fn connect(&self, addr: VsockAddr, wait: Option<Duration>) -> BoxFuture<'_, io::Result<VsockStream>> {
        let now = self.now();
        Box::pin(async move { now.connect(addr, wait).await })
    }

    fn listen(&self, port: u32) -> io::Result<Box<dyn PortListener>> {
        let mut current = self.current.clone();
        let inner = current.borrow_and_update().listen(port)?;
        Ok(Box::new(FollowingListener { current, port, inner, ended: false }))
    }

    fn resolve(&self, name: &str) -> io::Result<DomId> {
        self.now().resolve(name)
    }

    fn connect_name(
        &self,
        name: &str,
        port: u32,
        wait: Option<Duration>,
    ) -> BoxFuture<'_, io::Result<VsockStream>> {
        let now = self.now();
        let name = name.to_string();
        Box::pin(async move { now.connect_name(&name, port, wait).await })
    }

    fn name_port(&self, port: u32, name: Option<&str>) {
        self.now().name_port(port, name)
    }

    fn links(&self) -> Vec<(DomId, usize)> {
        self.now().links()
    }
}

/// A listener of [`Following`] sockets.
struct FollowingListener {
    current: watch::Receiver<Arc<dyn DomainSockets>>,
    port: u32,
    inner: Box<dyn PortListener>,
    /// The owner dropped the sender: no new incarnation will come.
    ended: bool,
}

/// What a [`FollowingListener`] waited for.
enum Next {
    Accepted(io::Result<VsockStream>),
    Incarnation(bool),
}

impl FollowingListener {
    /// Listens on the domain's newest incarnation.
    fn relisten(&mut self) -> io::Result<()> {
        let domain = self.current.borrow_and_update().clone();
        self.inner = domain.listen(self.port)?;
        tracing::info!(port = self.port, domain = %domain.domid(), "listening again under the domain's new id");
        Ok(())
    }
}

impl PortListener for FollowingListener {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<VsockStream>> {
        Box::pin(async move {
            loop {
                let next = if self.ended {
                    Next::Accepted(self.inner.accept().await)
                } else {
                    tokio::select! {
                        r = self.inner.accept() => Next::Accepted(r),
                        changed = self.current.changed() => Next::Incarnation(changed.is_ok()),
                    }
                };
                match next {
                    Next::Accepted(Ok(s)) => return Ok(s),
                    Next::Accepted(Err(e)) => {
                        // The incarnation's listener ended (its domain is gone): wait for the
                        // next incarnation, if one is coming.
                        if self.ended || self.current.changed().await.is_err() {
                            return Err(e);
                        }
                        self.relisten()?;
                    }
                    Next::Incarnation(true) => self.relisten()?,
                    Next::Incarnation(false) => self.ended = true,
                }
            }
        })
    }
}
