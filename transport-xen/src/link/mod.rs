//! Links: two byte rings and one event channel between a server and a client domain.
//!
//! [`Link::listen`] (server) grants the control page and ring pages to the client domain, allocates
//! an unbound event channel for it and publishes `ring-ref` and `event-channel` under a store path;
//! [`Link::connect`] (client) waits for them with a store watch, binds the event channel, maps the
//! pages and marks itself live. The result on both sides is a [`Link`]: a tokio `AsyncRead` +
//! `AsyncWrite` byte stream that sleeps on the event channel only after asking the peer to wake it,
//! and optionally spins briefly first ([`LinkConfig::spin`]).
//!
//! The modules, from pure state to I/O:
//!
//! * [`endpoint`]: one side's protocol over the shared pages, a state machine with no I/O;
//! * `spin`: the adaptive spin policy (when and how long to watch a ring before sleeping);
//! * `wake`: the waker fan-out that lets both stream halves wait on the one event channel;
//! * `handshake`: the store handshake that grants or maps the pages and places the rings;
//! * `reactor`: registering backend handles with tokio;
//! * `stream`: the `AsyncRead`/`AsyncWrite` shell that runs the endpoint through the hypervisor
//!   [`Backend`](crate::backend::Backend) and tokio.

pub mod endpoint;
mod handshake;
mod reactor;
mod spin;
mod stream;
mod wake;

pub(crate) use reactor::{Pollable, register};
pub use stream::{Link, LinkListener};

use std::io;
use std::time::Duration;

use crate::backend::BackendError;
use crate::ring::PeerMisbehaved;
use crate::types::DomId;

/// Ring sizes and waiting policy of a link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Minimum size in bytes of the client → server ring (libxenvchan's "left" ring).
    pub client_to_server: usize,
    /// Minimum size in bytes of the server → client ring ("right").
    pub server_to_client: usize,
    /// Adaptive polling: before sleeping on the event channel, spin up to this long watching the
    /// ring. Off (`None`) by default: spinning trades CPU for latency (see docs/transport-xen.md).
    pub spin: Option<Duration>,
}

impl Default for LinkConfig {
    /// 64 KiB in each direction, no spinning.
    fn default() -> Self {
        LinkConfig { client_to_server: 64 << 10, server_to_client: 64 << 10, spin: None }
    }
}

/// Why a link could not be set up or stopped working.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The hypervisor refused or failed an operation.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The peer broke the protocol; the link was closed.
    #[error("domain {peer} broke the link protocol: {violation}")]
    PeerMisbehaved {
        /// The peer domain.
        peer: DomId,
        /// What it did.
        violation: PeerMisbehaved,
    },
    /// The peer closed the link or died.
    #[error("domain {0} closed the link or died")]
    PeerGone(DomId),
    /// The link was already closed on this side.
    #[error("link already closed")]
    Closed,
    /// The configuration cannot be satisfied.
    #[error("invalid link configuration: {0}")]
    Config(String),
    /// An OS error (event-channel readiness, runtime).
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl LinkError {
    /// The `io::ErrorKind` this error reads as (a hypervisor error: `Other`).
    pub fn kind(&self) -> io::ErrorKind {
        match self {
            LinkError::PeerMisbehaved { .. } => io::ErrorKind::InvalidData,
            LinkError::PeerGone(_) => io::ErrorKind::ConnectionReset,
            LinkError::Closed => io::ErrorKind::NotConnected,
            LinkError::Config(_) => io::ErrorKind::InvalidInput,
            LinkError::Io(e) => e.kind(),
            LinkError::Backend(_) => io::ErrorKind::Other,
        }
    }
}

impl From<LinkError> for io::Error {
    fn from(e: LinkError) -> io::Error {
        io::Error::new(e.kind(), e)
    }
}

/// Resolves a link path as the server sees it: relative paths live under the server's home.
pub fn server_path(server: DomId, path: &str) -> String {
    if path.starts_with('/') { path.to_string() } else { format!("/local/domain/{}/{}", server.0, path) }
}
