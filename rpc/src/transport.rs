//! Byte streams for every [`Address`]: one `connect` and one `listen` over all transports.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use dombus_agent::proto::Target;
pub use dombus_agent::{Agent, AgentClient, AgentListener, DomainSockets, PortListener};
use dombus_transport_xen::vsock::VsockAddr;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::Address;

/// A connected byte stream of any transport.
pub trait Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// A boxed [`Stream`].
pub type BoxStream = Box<dyn Stream>;

/// How this process reaches its domain's virtual sockets.
#[derive(Clone)]
enum Xen {
    /// This process is the domain's agent: its own connections go straight to the links.
    Local {
        /// The domain's virtual sockets.
        sockets: Arc<dyn DomainSockets>,
        /// The agent this process serves to the domain's other processes, if any: held (never
        /// read) so that it lives as long as the `Net`.
        _serving: Option<Arc<Agent>>,
    },
    /// Through the domain's agent.
    Agent(AgentClient),
}

/// The transports this process can use: Unix, TCP and AF_VSOCK always; `xen:` through the
/// domain's agent ([`Net::new`] finds it at [`dombus_agent::default_socket`]), or through
/// virtual sockets this process attached itself ([`Net::with_xen`]).
#[derive(Clone, Default)]
pub struct Net {
    xen: Option<Xen>,
    /// How long `xen:` connects wait for the listener to appear (default: not at all).
    pub xen_connect_wait: Option<Duration>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let xen = match &self.xen {
            Some(Xen::Local { sockets, .. }) => format!("domain {} in this process", sockets.domid()),
            Some(Xen::Agent(a)) => format!("agent at {}", a.socket().display()),
            None => format!("agent at {}", dombus_agent::default_socket().display()),
        };
        f.debug_struct("Net").field("xen", &xen).finish()
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
    /// transport-xen virtual sockets of this process's own domain.
    Xen(Box<dyn PortListener>, VsockAddr),
    /// transport-xen virtual sockets through the domain's agent.
    Agent(AgentListener, VsockAddr),
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
                let (domain, ports) = (s.peer_domain(), s.ports());
                xen_accepted(Box::new(s), domain, ports)
            }
            Listener::Agent(l, _) => {
                let s = l.accept().await?;
                let (domain, ports) = (s.peer_domain(), s.ports());
                xen_accepted(Box::new(s), domain, ports)
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
            Listener::Xen(_, a) | Listener::Agent(_, a) => Address::Xen(*a),
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

/// An accepted `xen:` connection from `domain`, with (local, remote) `ports`.
fn xen_accepted(stream: BoxStream, domain: dombus_transport_xen::DomId, ports: (u32, u32)) -> Accepted {
    let peer = format!("xen:{domain}:{} (to our port {})", ports.1, ports.0);
    Accepted { stream, peer, peer_domain: Some(u32::from(domain.0)) }
}

impl Net {
    /// Unix, TCP and AF_VSOCK; `xen:` through the domain's agent at
    /// [`dombus_agent::default_socket`] (`$DOMBUS_AGENT`, or the runtime directory's).
    pub fn new() -> Net {
        Net::default()
    }

    /// `xen:` through the domain's agent reached by `agent`.
    pub fn with_agent(mut self, agent: AgentClient) -> Net {
        self.xen = Some(Xen::Agent(agent));
        self
    }

    /// `xen:` through virtual sockets this process attached itself: it is its domain's agent,
    /// and its own connections skip the local hop.
    pub fn with_xen(mut self, sockets: impl DomainSockets) -> Net {
        self.xen = Some(Xen::Local { sockets: Arc::new(sockets), _serving: None });
        self
    }

    /// Like [`Net::with_xen`] with shared sockets; with `serving`, this process is also the
    /// agent of the domain's other processes for as long as this `Net` (or a clone) lives.
    pub fn with_domain(mut self, sockets: Arc<dyn DomainSockets>, serving: Option<Agent>) -> Net {
        self.xen = Some(Xen::Local { sockets, _serving: serving.map(Arc::new) });
        self
    }

    fn xen(&self) -> Xen {
        self.xen.clone().unwrap_or_else(|| Xen::Agent(AgentClient::from_env()))
    }

    /// A `xen:` connection to `port` of `target`.
    async fn connect_xen(&self, target: Target, port: u32) -> io::Result<BoxStream> {
        let wait = self.xen_connect_wait;
        Ok(match self.xen() {
            Xen::Local { sockets: d, .. } => Box::new(match target {
                Target::Cid(c) => d.connect(VsockAddr::new(c, port), wait).await?,
                Target::Name(n) => d.connect_name(&n, port, wait).await?,
            }),
            Xen::Agent(a) => Box::new(a.connect(target, port, wait).await?),
        })
    }

    /// Connects to `addr`.
    pub async fn connect(&self, addr: &Address) -> io::Result<BoxStream> {
        let context = |e: io::Error| io::Error::new(e.kind(), format!("connecting to {addr}: {e}"));
        Ok(match addr {
            Address::Xen(a) => self.connect_xen(Target::Cid(a.cid), a.port).await.map_err(context)?,
            Address::XenName { name, port } => {
                self.connect_xen(Target::Name(name.clone()), *port).await.map_err(context)?
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
        self.listen_as(addr, None).await
    }

    /// Like [`Net::listen`]; on a `xen:` address, says that the port serves the service `name`
    /// (rules of the host's connection manager may name it) while the listener lives.
    pub async fn listen_as(&self, addr: &Address, name: Option<&str>) -> io::Result<Listener> {
        let context = |e: io::Error| io::Error::new(e.kind(), format!("listening on {addr}: {e}"));
        Ok(match addr {
            Address::Xen(a) => match self.xen() {
                Xen::Local { sockets, .. } => {
                    let l = match name {
                        Some(n) => dombus_agent::sockets::listen_as(sockets.clone(), a.port, n),
                        None => sockets.listen(a.port),
                    };
                    Listener::Xen(l.map_err(context)?, *a)
                }
                Xen::Agent(agent) => {
                    Listener::Agent(agent.listen_as(a.port, name).await.map_err(context)?, *a)
                }
            },
            Address::XenName { .. } => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("listening on {addr}: a domain listens on its own ports (xen:self:PORT)"),
                ));
            }
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
