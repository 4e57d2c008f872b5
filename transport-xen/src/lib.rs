//! dombus transport-xen: byte links between Xen domains over rings in granted pages.
//!
//! A *link* joins two domains: two byte rings (one per direction) in pages one domain grants to
//! the other, one event channel for wake-ups, and a handshake through the store. The layout and
//! handshake are libxenvchan's, so a vchan peer can talk to us. Everything the peer can write is
//! untrusted: indices are read once, validated, and a violation closes the link with a named
//! [`PeerMisbehaved`] error.
//!
//! The hypervisor sits behind the [`backend::Backend`] trait family. This crate ships the `xen`
//! backend (the grant and event-channel devices and a xenstore client); the `dombus-sim` crate
//! implements the same traits with a simulated hypervisor, for machines without Xen. Above the
//! links, [`vsock`] multiplexes virtual sockets on one link per pair of domains.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use dombus_sim::SimBackend;
//! use dombus_transport_xen::{link::{Link, LinkConfig}, types::DomId};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! // In domain 1 (the server); domain 2 runs `Link::connect` on the same path.
//! let backend = SimBackend::boot("/run/dombus/simxen.sock", Some(DomId(1)))?;
//! let listener = Link::listen(&backend, "data/ping", DomId(2), &LinkConfig::default())?;
//! let mut link = listener.accept().await?;
//! let mut buf = [0u8; 4];
//! link.read_exact(&mut buf).await?;
//! link.write_all(&buf).await?;
//! # Ok(()) }
//! ```

pub mod backend;
pub mod layout;
pub mod link;
pub mod ring;
pub mod shmem;
pub mod types;
pub mod vsock;
pub mod xen;

pub use ring::PeerMisbehaved;
pub use types::{DomId, EvtchnPort, GrantRef};
