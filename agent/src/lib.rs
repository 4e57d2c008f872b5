//! The domain agent, `dombusd`: one per domain, it owns the domain's hypervisor attachment, its
//! links (one per pair of domains) and the session layer, and every process of the domain opens,
//! accepts and inspects virtual sockets through it at the same time — the job the kernel's vsock
//! transport does for AF_VSOCK.
//!
//! - [`proto`]: the local protocol, byte by byte.
//! - [`server`]: the agent's side ([`Agent::serve`]), run by `dombusd` or inside a daemon that
//!   is its domain's agent (its own connections then skip the local hop).
//! - [`client`]: a process's side ([`AgentClient`]).
//! - [`sockets`]: a domain's virtual sockets as one object-safe interface ([`DomainSockets`]).
//! - [`manager`]: the protocol between an agent and the host's connection manager;
//!   [`managed`]: a domain's sockets under the manager ([`Managed`]).
//! - `attach` (feature `attach`): attaching a process to the simulated hypervisor or real Xen.
//!
//! ```
//! # async fn run() -> std::io::Result<()> {
//! use dombus_agent::{AgentClient, proto::Target};
//!
//! // A process of the domain: a connection to port 5000 of domain 2, through the agent.
//! let agent = AgentClient::from_env();
//! let stream = agent.connect(Target::Cid(2), 5000, None).await?;
//! println!("connected to domain {} from port {}", stream.peer_domain(), stream.ports().0);
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "attach")]
pub mod attach;
pub mod client;
#[cfg(feature = "daemon")]
pub mod daemon;
mod fdpass;
pub mod managed;
pub mod manager;
pub mod proto;
pub mod server;
pub mod sockets;

pub use client::{AGENT_ENV, AgentClient, AgentListener, AgentStream, default_socket};
pub use managed::{Denied, Managed, ManagerOps, denied};
pub use server::{Agent, AgentConfig};
pub use sockets::{DomainSockets, PortListener};

use dombus_transport_xen::DomId;
use dombus_transport_xen::vsock::TransportReset;

/// The error a connection ends with when its link was lost: the peer's domain, or ours, died or
/// migrated (a transport reset, recognised by `is_transport_reset` like one in-process).
pub(crate) fn transport_reset(peer: DomId, reason: &str) -> std::io::Error {
    TransportReset { peer, why: reason.to_string() }.into()
}
