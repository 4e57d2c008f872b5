//! Attaching this process to its domain's hypervisor: the simulated one (a socket) or real Xen
//! (`/dev/xen/*` and xenstored). What the agent does at start, and what a process that is its
//! own agent does (`--sim`/`--xen` in the tools).
//!
//! On the simulated hypervisor the attachment follows the domain across migrations: when the
//! simulator says the domain was migrated, every link of the old incarnation is reset (Xen moves
//! no grants), the process attaches again as the new id, and the sockets ([`Following`]) move
//! there, listeners and their announcements with them.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use dombus_sim::{Ended, SimBackend};
use dombus_transport_xen::DomId;
use dombus_transport_xen::backend::Backend;
use dombus_transport_xen::vsock::LinkSetUp;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use tokio::sync::watch;

use crate::managed::{Managed, ManagerOps};
use crate::sockets::{DomainSockets, Following};

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
    /// How links come about: under the backend domain's connection manager
    /// ([`LinkSetUp::Introduced`], what a host runs), or open (a host without one).
    pub links: LinkSetUp,
}

impl Attach {
    /// Attaching as `domid` under the connection manager of `backend_domain`.
    pub fn managed(hypervisor: Hypervisor, domid: DomId, backend_domain: DomId) -> Attach {
        Attach { hypervisor, domid, backend_domain, links: LinkSetUp::Introduced }
    }

    fn config(&self) -> VsockConfig {
        VsockConfig { backend_domain: self.backend_domain, set_up: self.links, ..VsockConfig::default() }
    }

    /// Attaches as the backend domain, whose connection manager introduces the others: its
    /// sockets, and what the manager needs of them (inside a tokio runtime). Its links are set
    /// up on request, and its gate is the manager's to set.
    pub fn start_backend(&self) -> io::Result<(Arc<dyn DomainSockets>, Arc<dyn ManagerOps>)> {
        if self.domid != self.backend_domain && self.hypervisor != Hypervisor::Xen {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("domain {} is not the backend domain ({})", self.domid, self.backend_domain),
            ));
        }
        fn both<B: Backend + Clone>(d: VsockDomain<B>) -> (Arc<dyn DomainSockets>, Arc<dyn ManagerOps>) {
            (Arc::new(d.clone()), Arc::new(d))
        }
        let cfg = VsockConfig { set_up: LinkSetUp::Introduced, ..self.config() };
        Ok(match &self.hypervisor {
            Hypervisor::Sim(sock) => {
                let backend = SimBackend::attach_from_env(sock, self.domid).map_err(|e| {
                    io::Error::other(format!("simulated hypervisor at {}: {e}", sock.display()))
                })?;
                both(VsockDomain::start(backend, cfg)?)
            }
            Hypervisor::Xen => {
                let backend = dombus_transport_xen::xen::XenBackend::open()
                    .map_err(|e| io::Error::other(format!("real Xen: {e}")))?;
                if backend.domid() != self.backend_domain {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "this is domain {}, not the backend domain ({})",
                            backend.domid(),
                            self.backend_domain
                        ),
                    ));
                }
                both(VsockDomain::start(backend, cfg)?)
            }
        })
    }

    /// Attaches and starts the domain's virtual sockets (inside a tokio runtime).
    pub fn start(&self) -> io::Result<Arc<dyn DomainSockets>> {
        Ok(match &self.hypervisor {
            Hypervisor::Sim(sock) => {
                let backend = SimBackend::attach_from_env(sock, self.domid).map_err(|e| {
                    io::Error::other(format!("simulated hypervisor at {}: {e}", sock.display()))
                })?;
                Arc::new(follow(backend, self.config())?)
            }
            Hypervisor::Xen => {
                let backend = dombus_transport_xen::xen::XenBackend::open()
                    .map_err(|e| io::Error::other(format!("real Xen: {e}")))?;
                let config = self.config();
                sockets_of(VsockDomain::start(backend, config.clone())?, &config)
            }
        })
    }
}

/// The sockets a process uses of `domain`: under the connection manager when links are
/// introduced (except in the backend domain, the manager's own).
fn sockets_of<B: Backend + Clone>(domain: VsockDomain<B>, config: &VsockConfig) -> Arc<dyn DomainSockets> {
    if config.set_up == LinkSetUp::Introduced && domain.domid() != config.backend_domain {
        Arc::new(Managed::start(domain, config.backend_domain))
    } else {
        Arc::new(domain)
    }
}

/// The virtual sockets of the domain `backend` is attached as, following it across migrations
/// (inside a tokio runtime): a task waits for the simulator's word that the attachment ended.
pub fn follow(backend: SimBackend, config: VsockConfig) -> io::Result<Following> {
    let domain = VsockDomain::start(backend.clone(), config.clone())?;
    let (tx, rx) = watch::channel(sockets_of(domain.clone(), &config));
    tokio::spawn(async move {
        let (mut backend, mut domain) = (backend, domain);
        loop {
            let ended = tokio::select! {
                e = backend.wait_ended() => e,
                // Nobody uses the sockets any more: let the attachment go.
                () = tx.closed() => return,
            };
            let to = match ended {
                Ok(Ended::Migrated { to }) => to,
                Ok(Ended::Lost { reason }) => {
                    tracing::warn!(domain = %domain.domid(), %reason, "the hypervisor attachment was lost");
                    domain.reset_links(&format!("this domain's hypervisor attachment was lost: {reason}"));
                    return;
                }
                Err(e) => {
                    tracing::warn!(domain = %domain.domid(), error = %e, "cannot watch the hypervisor attachment");
                    return;
                }
            };
            let from = domain.domid();
            tracing::info!(%from, %to, "this domain was migrated: resetting its links and attaching as the new id");
            domain.reset_links(&format!("domain {from} was migrated (now domain {to})"));
            let resumed = backend
                .resume()
                .map_err(|e| io::Error::other(e.to_string()))
                .and_then(|b| Ok((VsockDomain::start(b.clone(), config.clone())?, b)));
            match resumed {
                Ok((d, b)) => {
                    tx.send_replace(sockets_of(d.clone(), &config));
                    (backend, domain) = (b, d);
                }
                Err(e) => {
                    tracing::error!(%from, %to, error = %e, "cannot attach as the domain's new id");
                    return;
                }
            }
        }
    });
    Ok(Following::new(rx))
}
