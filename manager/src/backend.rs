//! The backend domain's own sockets under its manager: the manager decides locally (no session,
//! no round trip) for the connections the backend domain's processes make and for those that
//! arrive at its ports. The manager's own port is open to every domain: it is how they register.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::Duration;

use dombus::transport::types::DomId;
use dombus::transport::vsock::mux::VsockStream;
use dombus::transport::vsock::{CID_BACKEND, CID_SELF, Gate, VsockAddr};
use dombus_agent::manager::{MANAGER_PORT, Peer};
use dombus_agent::sockets::BoxFuture;
use dombus_agent::{Denied, DomainSockets, PortListener};

use crate::core::Core;

/// The gate of the backend domain's ports.
pub(crate) struct BackendGate(pub Weak<Core>);

impl Gate for BackendGate {
    fn admit(&self, peer: DomId, port: u32) -> Pin<Box<dyn Future<Output = bool> + Send>> {
        let allowed = port == MANAGER_PORT
            || self.0.upgrade().is_some_and(|core| core.decide(peer, &Peer::Id(core.me.0), port).allowed);
        Box::pin(std::future::ready(allowed))
    }
}

/// The backend domain's sockets as its processes (and the toolstack's, when it shares the
/// domain, as dom0 does) use them: each connection decided by the manager first.
pub struct BackendSockets {
    pub(crate) core: Arc<Core>,
}

impl BackendSockets {
    fn allow(&self, target: Peer, port: u32) -> io::Result<DomId> {
        let d = self.core.decide(self.core.me, &target, port);
        match d.target {
            Some(t) if d.allowed => Ok(t),
            _ => Err(Denied { decision: d.id }.into()),
        }
    }
}

impl DomainSockets for BackendSockets {
    fn domid(&self) -> DomId {
        self.core.me
    }

    fn connect(&self, addr: VsockAddr, wait: Option<Duration>) -> BoxFuture<'_, io::Result<VsockStream>> {
        Box::pin(async move {
            let target = match addr.cid {
                CID_BACKEND | CID_SELF => self.core.me,
                c => u16::try_from(c).map(DomId).map_err(|_| {
                    io::Error::new(io::ErrorKind::InvalidInput, format!("CID {c} is not a domain id"))
                })?,
            };
            let peer = self.allow(Peer::Id(target.0), addr.port)?;
            self.core.sockets.connect(VsockAddr::new(u32::from(peer.0), addr.port), wait).await
        })
    }

    fn connect_name(
        &self,
        name: &str,
        port: u32,
        wait: Option<Duration>,
    ) -> BoxFuture<'_, io::Result<VsockStream>> {
        let name = name.to_string();
        Box::pin(async move {
            let peer = self.allow(Peer::Name(name), port)?;
            self.core.sockets.connect(VsockAddr::new(u32::from(peer.0), port), wait).await
        })
    }

    fn listen(&self, port: u32) -> io::Result<Box<dyn PortListener>> {
        self.core.sockets.listen(port)
    }

    fn name_port(&self, port: u32, name: Option<&str>) {
        let mut st = self.core.state();
        match name {
            Some(n) => st.backend_services.insert(port, n.to_string()),
            None => st.backend_services.remove(&port),
        };
    }

    fn resolve(&self, name: &str) -> io::Result<DomId> {
        let st = self.core.state();
        self.core.named(&st, name).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no registered domain is named {name:?}"))
        })
    }

    fn links(&self) -> Vec<(DomId, usize)> {
        self.core.sockets.links()
    }
}
