//! Byte streams for every [`Address`]: one `connect` and one `listen` over all transports.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use dombus_transport_xen::backend::Backend;
use dombus_transport_xen::vsock::VsockAddr;
use dombus_transport_xen::vsock::domain::{VsockDomain, VsockListener};
use dombus_transport_xen::vsock::mux::VsockStream;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Address;

/// A connected byte stream of any transport.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A boxed [`Stream`].
pub type BoxStream = Box<dyn Stream>;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A domain's transport-xen virtual sockets, whatever its hypervisor backend.
pub trait XenSockets: Send + Sync + 'static {
    /// Connects to `addr`, first waiting up to `wait` for its listener to be announced.
    fn connect(&self, addr: VsockAddr, wait: Option<Duration>) -> BoxFuture<'_, io::Result<VsockStream>>;
    /// Listens on `port` of this domain.
    fn listen(&self, port: u32) -> io::Result<Box<dyn XenListener>>;
    /// This domain's id.
    fn domid(&self) -> u32;
}

/// A listening transport-xen port.
pub trait XenListener: Send + 'static {
    /// The next connection.
    fn accept(&mut self) -> BoxFuture<'_, io::Result<VsockStream>>;
}

impl<B: Backend + Clone> XenSockets for VsockDomain<B> {
    fn connect(&self, addr: VsockAddr, wait: Option<Duration>) -> BoxFuture<'_, io::Result<VsockStream>> {
        Box::pin(async move {
            match wait {
                Some(w) => self.connect_wait(addr, w).await,
                None => VsockDomain::connect(self, addr).await,
            }
        })
    }

    fn listen(&self, port: u32) -> io::Result<Box<dyn XenListener>> {
        Ok(Box::new(VsockDomain::listen(self, port)?))
    }

    fn domid(&self) -> u32 {
        u32::from(VsockDomain::domid(self).0)
    }
}

impl<B: Backend + Clone> XenListener for VsockListener<B> {
    fn accept(&mut self) -> BoxFuture<'_, io::Result<VsockStream>> {
        Box::pin(VsockListener::accept(self))
    }
}

/// The transports this process can use: Unix, TCP and AF_VSOCK always; `xen:` once a domain's
/// virtual sockets are attached with [`Net::with_xen`].
#[derive(Clone, Default)]
pub struct Net {
    xen: Option<Arc<dyn XenSockets>>,
    /// How long `xen:` connects wait for the listener to appear (default: not at all).
    pub xen_connect_wait: Option<Duration>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net").field("xen", &self.xen.as_ref().map(|x| x.domid())).finish()
    }
}

/// An accepted connection and who it came from.
pub struct Accepted {
    /// The byte stream.
    pub stream: BoxStream,
    /// The peer, for logs.
    pub peer: String,
    /// The peer's domain (CID) as the transport established it — transport-xen's link set-up
    /// through the store, AF_VSOCK's kernel — or `None` (Unix, TCP).
    pub peer_domain: Option<u32>,
}

/// A listening socket of any transport.
pub enum Listener {
    /// transport-xen virtual sockets.
    Xen(Box<dyn XenListener>, VsockAddr),
    /// AF_VSOCK.
    Vsock(tokio_vsock::VsockListener),
    /// Unix; the socket file is removed on drop.
    Unix(tokio::net::UnixListener, std::path::PathBuf),
    /// TCP.
    Tcp(tokio::net::TcpListener),
}

impl std::fmt::Debug for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Listener({})", self.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()))
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    /// The next connection.
    pub async fn accept(&mut self) -> io::Result<Accepted> {
        Ok(match self {
            Listener::Xen(l, _) => {
                let s = l.accept().await?;
                let (local, remote) = s.ports();
                let domain = s.peer_domain();
                let peer = format!("xen:{domain}:{remote} (to our port {local})");
                Accepted { stream: Box::new(s), peer, peer_domain: Some(u32::from(domain.0)) }
            }
            Listener::Vsock(l) => {
                let (s, a) = l.accept().await?;
                Accepted {
                    stream: Box::new(s),
                    peer: format!("vsock:{}:{}", a.cid(), a.port()),
                    peer_domain: Some(a.cid()),
                }
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                Accepted { stream: Box::new(s), peer: "unix".into(), peer_domain: None }
            }
            Listener::Tcp(l) => {
                let (s, a) = l.accept().await?;
                s.set_nodelay(true)?;
                Accepted { stream: Box::new(s), peer: format!("tcp:{a}"), peer_domain: None }
            }
        })
    }

    /// The address actually bound (for `tcp:…:0`, with the port the system chose).
    pub fn local_addr(&self) -> io::Result<Address> {
        Ok(match self {
            Listener::Xen(_, a) => Address::Xen(*a),
            Listener::Vsock(l) => {
                let a = l.local_addr()?;
                Address::Vsock { cid: a.cid(), port: a.port() }
            }
            Listener::Unix(_, p) => Address::Unix(p.clone()),
            Listener::Tcp(l) => {
                let a = l.local_addr()?;
                Address::Tcp { host: a.ip().to_string(), port: a.port() }
            }
        })
    }
}

impl Net {
    /// Unix, TCP and AF_VSOCK only.
    pub fn new() -> Net {
        Net::default()
    }

    /// Also `xen:` addresses, through this domain's virtual sockets.
    pub fn with_xen(mut self, sockets: impl XenSockets) -> Net {
        self.xen = Some(Arc::new(sockets));
        self
    }

    fn xen(&self, addr: &Address) -> io::Result<&Arc<dyn XenSockets>> {
        self.xen.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                format!("{addr}: this process has no Xen domain attached (Net::with_xen)"),
            )
        })
    }

    /// Connects to `addr`.
    pub async fn connect(&self, addr: &Address) -> io::Result<BoxStream> {
        let context = |e: io::Error| io::Error::new(e.kind(), format!("connecting to {addr}: {e}"));
        Ok(match addr {
            Address::Xen(a) => {
                Box::new(self.xen(addr)?.connect(*a, self.xen_connect_wait).await.map_err(context)?)
            }
            Address::Vsock { cid, port } => Box::new(
                tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port))
                    .await
                    .map_err(context)?,
            ),
            Address::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await.map_err(context)?),
            Address::Tcp { host, port } => {
                let s = tokio::net::TcpStream::connect((host.as_str(), *port)).await.map_err(context)?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
        })
    }

    /// Listens on `addr`. A stale Unix socket file (nobody accepting on it) is replaced.
    pub async fn listen(&self, addr: &Address) -> io::Result<Listener> {
        let context = |e: io::Error| io::Error::new(e.kind(), format!("listening on {addr}: {e}"));
        Ok(match addr {
            Address::Xen(a) => Listener::Xen(self.xen(addr)?.listen(a.port).map_err(context)?, *a),
            Address::Vsock { cid, port } => Listener::Vsock(
                tokio_vsock::VsockListener::bind(tokio_vsock::VsockAddr::new(*cid, *port))
                    .map_err(context)?,
            ),
            Address::Unix(p) => {
                if p.exists() && tokio::net::UnixStream::connect(p).await.is_err() {
                    std::fs::remove_file(p).map_err(context)?;
                }
                Listener::Unix(tokio::net::UnixListener::bind(p).map_err(context)?, p.clone())
            }
            Address::Tcp { host, port } => {
                Listener::Tcp(tokio::net::TcpListener::bind((host.as_str(), *port)).await.map_err(context)?)
            }
        })
    }
}
