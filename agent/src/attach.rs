//! Attaching this process to its domain's hypervisor: the simulated one (a socket) or real Xen
//! (`/dev/xen/*` and xenstored). What the agent does at start, and what a process that is its
//! own agent does (`--sim`/`--xen` in the tools).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use dombus_transport_xen::DomId;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};

use crate::sockets::DomainSockets;

/// Which hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hypervisor {
    /// The simulated hypervisor listening on this socket.
    Sim(PathBuf),
    /// Real Xen.
    Xen,
}

/// How to attach.
#[derive(Debug, Clone)]
pub struct Attach {
    /// Which hypervisor.
    pub hypervisor: Hypervisor,
    /// Our domain id on the simulated hypervisor (real Xen says which domain we are). Domain 0
    /// attaches as the toolstack; any other with the one-time token its creator handed this
    /// process (`DOMBUS_SIM_TOKEN`).
    pub domid: DomId,
    /// The backend domain (what `xen:backend:PORT` names).
    pub backend_domain: DomId,
}

impl Attach {
    /// Attaches and starts the domain's virtual sockets (inside a tokio runtime).
    pub fn start(&self) -> io::Result<Arc<dyn DomainSockets>> {
        let config = VsockConfig { backend_domain: self.backend_domain, ..VsockConfig::default() };
        Ok(match &self.hypervisor {
            Hypervisor::Sim(sock) => {
                let backend = dombus_sim::SimBackend::attach_from_env(sock, self.domid).map_err(|e| {
                    io::Error::other(format!("simulated hypervisor at {}: {e}", sock.display()))
                })?;
                Arc::new(VsockDomain::start(backend, config)?)
            }
            Hypervisor::Xen => {
                let backend = dombus_transport_xen::xen::XenBackend::open()
                    .map_err(|e| io::Error::other(format!("real Xen: {e}")))?;
                Arc::new(VsockDomain::start(backend, config)?)
            }
        })
    }
}
