//! RPC benchmarks: a typed tarpc service ([`Echo`]) served in the peer process and called from
//! the parent, over dombus-rpc (`xen:`, `unix:`, `tcp:`) and over plain tarpc (the baselines).
//!
//! # Set-up
//!
//! [`RpcPingPong::new`] starts one peer process ([`SERVER_ROLE`]) that serves **every** stack of
//! one transport at once, each on its own port or socket:
//!
//! | [`Stack`] | what the peer runs |
//! |---|---|
//! | [`Stack::Rpc`] | `dombus_rpc::Server` (preamble, tower stack, metrics) serving [`Echo`] |
//! | [`Stack::RpcViaTarpc`] | the same, client and server on tarpc's channel (`CallPath::Tarpc`) |
//! | [`Stack::Tarpc`] | plain tarpc: `BaseChannel::with_defaults(..).execute(..)`, each call spawned |
//! | [`Stack::Framed`] | dombus-rpc's framing and codec with tarpc's message types, answered inline: no tarpc dispatch |
//! | [`Stack::Raw`] | the bare byte stream: reads [`PAYLOAD`] bytes, writes them back |
//!
//! The parent connects the one stack a benchmark measures. Over `xen:` the parent runs the
//! simulated hypervisor in-process and is domain [`CLIENT_DOM`]; the peer is domain
//! [`SERVER_DOM`]; each starts its own [`VsockDomain`] (the link between them is set up by the
//! first connection). Over [`Transport::Agent`] a third process, the agent of domain
//! [`CLIENT_DOM`] ([`crate::agent`]), holds that domain's virtual sockets and the parent reaches
//! them through its Unix socket. Plain tarpc over Unix and TCP uses tarpc's own transports
//! (`tarpc::serde_transport::{unix, tcp}` with `tokio_serde`'s `Bincode`); over `xen:` it runs on
//! a `VsockStream` with tarpc's default length-delimited framing.
//!
//! Both processes run a current-thread tokio runtime by default ([`Flavor::Current`]): every
//! task of a process (the caller, tarpc's dispatch task, the virtual-socket reader and writer)
//! shares one thread, so a wake-up inside a process is a queue push, not a cross-thread unpark.
//!
//! # Measuring
//!
//! [`RpcPingPong`] is a [`PingPong`]: one call at a time, for percentiles.
//! [`RpcPingPong::pipelined`] keeps `depth` calls in flight on one client (a refill as each
//! completes) and returns the wall time of `calls` calls.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dombus_rpc::codec::SerdeCodec;
use dombus_rpc::{Address, BoxStream, CallPath, ClientConfig, Codec, Net, Server, ServerConfig};
use dombus_sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_transport_xen::link::LinkConfig;
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::VsockAddr;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use tarpc::server::{BaseChannel, Channel};
use tarpc::tokio_serde::formats::Bincode;
use tarpc::{ClientMessage, Request, Response, context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Runtime;

use crate::agent::AgentProcess;
use crate::{PeerProcess, PingPong};

/// The service every RPC benchmark calls (generated items: `EchoClient`, `EchoRequest`,
/// `EchoResponse`, `ServeEcho`).
#[allow(missing_docs)]
mod service {
    /// An echo service.
    #[tarpc::service]
    pub trait Echo {
        /// Returns its argument.
        async fn echo(data: Vec<u8>) -> Vec<u8>;
    }
}
pub use service::{Echo, EchoClient, EchoRequest, EchoResponse, ServeEcho};

/// The same service through `#[dombus::service]`, for the dombus-rpc stacks (calls by method
/// name; generated items `typed::EchoClient`, …).
pub mod typed {
    /// An echo service.
    #[dombus::service(name = "echo")]
    pub trait Echo {
        /// Returns its argument.
        #[idempotent]
        async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    }

    /// The implementation the peer serves.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct EchoServer;

    impl Echo for EchoServer {
        async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
            data
        }
    }
}

/// The [`Echo`] implementation the peer serves.
#[derive(Debug, Clone, Copy, Default)]
pub struct EchoServer;

impl Echo for EchoServer {
    async fn echo(self, _: context::Context, data: Vec<u8>) -> Vec<u8> {
        data
    }
}

/// Peer role of every RPC benchmark: serves all [`Stack`]s of one transport.
pub const SERVER_ROLE: &str = "rpc-server";
/// Bytes of the echoed argument.
pub const PAYLOAD: usize = 64;
/// The peer's (RPC server's) domain id.
pub const SERVER_DOM: DomId = DomId(2);
/// The parent's (client's) domain id: the parent's own, or its agent's (a second peer).
pub const CLIENT_DOM: DomId = DomId(1);
/// The service name in the dombus-rpc preamble.
pub const SERVICE: &str = "echo";
/// `xen:` ports of the stacks (in [`Stack::index`] order).
pub(crate) const XEN_PORTS: [u32; 5] = [5000, 5001, 5002, 5003, 5004];
/// How long setting up a benchmark may take before it gives up.
pub(crate) const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Calls done before a constructor returns (checked: the echo must come back unchanged).
const HANDSHAKE_CALLS: u64 = 16;
/// Largest frame of the framed stack (dombus-rpc's default).
const MAX_FRAME: usize = 16 << 20;

/// Where the calls go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// transport-xen virtual sockets between two domains over the simulated hypervisor, with
    /// this adaptive-polling budget on both sides' links (`None`: wake-ups only).
    Xen {
        /// [`LinkConfig::spin`] of both domains.
        spin: Option<Duration>,
    },
    /// The same virtual sockets, reached through this domain's agent: a second peer process
    /// attached as domain [`CLIENT_DOM`] runs [`dombus_agent::Agent::serve`] and the parent is a
    /// process of that domain (see [`crate::agent`]).
    Agent {
        /// [`LinkConfig::spin`] of both domains.
        spin: Option<Duration>,
    },
    /// A Unix stream socket.
    Unix,
    /// TCP over 127.0.0.1 (`TCP_NODELAY` on both ends, for every stack).
    Tcp,
}

/// What carries the calls over the [`Transport`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stack {
    /// dombus-rpc: `Server` / `Client` (preamble, tower stacks, metrics) with this codec.
    Rpc(Codec),
    /// dombus-rpc with bincode, client and server carrying the calls on tarpc's channel
    /// (`CallPath::Tarpc`) instead of dombus's direct path.
    RpcViaTarpc,
    /// Plain tarpc with bincode, no dombus-rpc.
    Tarpc,
    /// Length-delimited frames and dombus-rpc's bincode codec carrying tarpc's own
    /// `ClientMessage` / `Response`, answered inline by the peer: codec and framing without
    /// tarpc's client dispatch task, server channel or per-call task.
    Framed,
    /// [`PAYLOAD`] bytes written and read back on the bare byte stream.
    Raw,
}

impl Stack {
    /// Which of the peer's four listeners serves this stack.
    fn index(self) -> usize {
        match self {
            Stack::Rpc(_) => 0,
            Stack::Tarpc => 1,
            Stack::Framed => 2,
            Stack::Raw => 3,
            Stack::RpcViaTarpc => 4,
        }
    }

    /// True if [`RpcPingPong::pipelined`] supports it (the typed-client stacks).
    pub fn pipelines(self) -> bool {
        matches!(self, Stack::Rpc(_) | Stack::RpcViaTarpc | Stack::Tarpc)
    }
}

/// The tokio runtime of both processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Flavor {
    /// `new_current_thread`: everything of a process on one thread (the default; lowest
    /// latency here).
    #[default]
    Current,
    /// `new_multi_thread` with this many workers (pinned like the process: on one CPU).
    Multi(usize),
}

impl std::str::FromStr for Flavor {
    type Err = String;
    fn from_str(s: &str) -> Result<Flavor, String> {
        match s {
            "current" => Ok(Flavor::Current),
            "multi" => Ok(Flavor::Multi(2)),
            other => match other.strip_prefix("multi").and_then(|n| n.parse().ok()).filter(|&n| n > 0) {
                Some(n) => Ok(Flavor::Multi(n)),
                None => Err(format!("runtime must be current, multi or multiN, not {other:?}")),
            },
        }
    }
}

impl std::fmt::Display for Flavor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Flavor::Current => f.write_str("current"),
            Flavor::Multi(n) => write!(f, "multi{n}"),
        }
    }
}

pub(crate) fn runtime(flavor: Flavor) -> io::Result<Runtime> {
    match flavor {
        Flavor::Current => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        Flavor::Multi(n) => {
            tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()
        }
    }
}

fn bad_input(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Where the peer listens: a simulator socket, a directory of Unix sockets, or four TCP ports.
#[derive(Debug, Clone, PartialEq)]
enum Place {
    Xen { socket: PathBuf, spin: Option<Duration> },
    Unix { dir: PathBuf },
    Tcp { ports: [u16; 5] },
}

/// Everything the peer needs, passed as one argument string.
#[derive(Debug, Clone, PartialEq)]
struct ServerArgs {
    place: Place,
    flavor: Flavor,
}

impl ServerArgs {
    fn encode(&self) -> String {
        let flavor = self.flavor;
        match &self.place {
            Place::Xen { socket, spin } => {
                let spin = spin.map_or_else(|| "-".to_string(), |d| d.as_nanos().to_string());
                format!("xen|{flavor}|{spin}|{}", socket.display())
            }
            Place::Unix { dir } => format!("unix|{flavor}|-|{}", dir.display()),
            Place::Tcp { ports } => {
                let p: Vec<String> = ports.iter().map(u16::to_string).collect();
                format!("tcp|{flavor}|-|{}", p.join(","))
            }
        }
    }

    fn decode(s: &str) -> io::Result<ServerArgs> {
        let bad = || bad_input(format!("bad rpc peer argument {s:?}"));
        let mut parts = s.splitn(4, '|');
        let mut next = || parts.next().ok_or_else(bad);
        let (kind, flavor, spin, rest) = (next()?, next()?, next()?, next()?);
        let flavor: Flavor = flavor.parse().map_err(|_| bad())?;
        let place = match kind {
            "xen" => {
                let spin = match spin {
                    "-" => None,
                    ns => Some(Duration::from_nanos(ns.parse().map_err(|_| bad())?)),
                };
                Place::Xen { socket: PathBuf::from(rest), spin }
            }
            "unix" => Place::Unix { dir: PathBuf::from(rest) },
            "tcp" => {
                let ports: Vec<u16> =
                    rest.split(',').map(str::parse).collect::<Result<_, _>>().map_err(|_| bad())?;
                Place::Tcp { ports: ports.try_into().map_err(|_| bad())? }
            }
            _ => return Err(bad()),
        };
        Ok(ServerArgs { place, flavor })
    }
}

/// A private directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub(crate) struct ScratchDir(PathBuf);

impl ScratchDir {
    pub(crate) fn new() -> io::Result<ScratchDir> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dombus-rpc-bench-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(ScratchDir(dir))
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The Unix socket of stack `i` in `dir`.
fn unix_path(dir: &Path, i: usize) -> PathBuf {
    dir.join(["rpc.sock", "tarpc.sock", "framed.sock", "raw.sock", "rpc-via-tarpc.sock"][i])
}

pub(crate) fn xen_config(spin: Option<Duration>) -> VsockConfig {
    VsockConfig { link: LinkConfig { spin, ..LinkConfig::default() }, ..VsockConfig::default() }
}

// ---------------------------------------------------------------------------------------------
// The peer: serves every stack.

/// Peer of every RPC benchmark: serves every stack on the transport its argument names,
/// until it is killed.
pub(crate) fn server_child(arg: &str) -> io::Result<()> {
    let args = ServerArgs::decode(arg)?;
    let rt = runtime(args.flavor)?;
    rt.block_on(async move {
        match args.place {
            Place::Xen { socket, spin } => {
                let backend = SimBackend::boot(&socket, Some(SERVER_DOM)).map_err(io::Error::other)?;
                let domain = VsockDomain::start(backend, xen_config(spin))?;
                let net = Net::new().with_xen(domain.clone());
                let rpc = Address::Xen(VsockAddr::new(u32::from(SERVER_DOM.0), XEN_PORTS[0]));
                let _handle = serve_rpc(&net, &rpc, CallPath::Direct).await?;
                let via_tarpc = Address::Xen(VsockAddr::new(u32::from(SERVER_DOM.0), XEN_PORTS[4]));
                let _via_tarpc = serve_rpc(&net, &via_tarpc, CallPath::Tarpc).await?;
                let mut listeners = Vec::new();
                for port in &XEN_PORTS[1..4] {
                    listeners.push(domain.listen(*port)?);
                }
                let mut set = tokio::task::JoinSet::new();
                for (i, mut l) in listeners.into_iter().enumerate() {
                    set.spawn(async move {
                        loop {
                            let s = l.accept().await?;
                            serve_stream(Box::new(s), i + 1);
                        }
                    });
                }
                join_first(set).await
            }
            Place::Unix { dir } => {
                let _handle =
                    serve_rpc(&Net::new(), &Address::Unix(unix_path(&dir, 0)), CallPath::Direct).await?;
                let via_tarpc = Address::Unix(unix_path(&dir, 4));
                let _via_tarpc = serve_rpc(&Net::new(), &via_tarpc, CallPath::Tarpc).await?;
                let mut tarpc =
                    tarpc::serde_transport::unix::listen(unix_path(&dir, 1), Bincode::default).await?;
                let mut set = tokio::task::JoinSet::new();
                set.spawn(async move {
                    while let Some(t) = tarpc.next().await {
                        tokio::spawn(serve_tarpc(t?));
                    }
                    Ok(())
                });
                for i in [2, 3] {
                    let l = tokio::net::UnixListener::bind(unix_path(&dir, i))?;
                    set.spawn(async move {
                        loop {
                            let (s, _) = l.accept().await?;
                            serve_stream(Box::new(s), i);
                        }
                    });
                }
                join_first(set).await
            }
            Place::Tcp { ports } => {
                let rpc = Address::Tcp { host: "127.0.0.1".into(), port: ports[0] };
                let _handle = serve_rpc(&Net::new(), &rpc, CallPath::Direct).await?;
                let via_tarpc = Address::Tcp { host: "127.0.0.1".into(), port: ports[4] };
                let _via_tarpc = serve_rpc(&Net::new(), &via_tarpc, CallPath::Tarpc).await?;
                let mut tarpc =
                    tarpc::serde_transport::tcp::listen(("127.0.0.1", ports[1]), Bincode::default).await?;
                let mut set = tokio::task::JoinSet::new();
                set.spawn(async move {
                    while let Some(t) = tarpc.next().await {
                        let t = t?;
                        t.get_ref().set_nodelay(true)?;
                        tokio::spawn(serve_tarpc(t));
                    }
                    Ok(())
                });
                for i in [2, 3] {
                    let l = tokio::net::TcpListener::bind(("127.0.0.1", ports[i])).await?;
                    set.spawn(async move {
                        loop {
                            let (s, _) = l.accept().await?;
                            s.set_nodelay(true)?;
                            serve_stream(Box::new(s), i);
                        }
                    });
                }
                join_first(set).await
            }
        }
    })
}

/// Waits for the first of the accept loops to end (they end only on an error).
async fn join_first(mut set: tokio::task::JoinSet<io::Result<()>>) -> io::Result<()> {
    match set.join_next().await {
        Some(r) => r.map_err(io::Error::other)?,
        None => Ok(()),
    }
}

/// Serves [`Echo`] through dombus-rpc on `addr`, its calls on `path`.
async fn serve_rpc(net: &Net, addr: &Address, path: CallPath) -> io::Result<dombus_rpc::ServeHandle> {
    Server::new(net.clone(), ServerConfig { call_path: path, ..ServerConfig::default() })
        .serve(addr, typed::Echo::into_service(typed::EchoServer))
        .await
}

/// Serves one connection of stack `index` (1 tarpc, 2 framed, 3 raw) in its own task.
fn serve_stream(s: BoxStream, index: usize) {
    match index {
        1 => {
            tokio::spawn(serve_tarpc(tarpc::serde_transport::Transport::from((s, Bincode::default()))));
        }
        2 => {
            tokio::spawn(async move {
                let _ = serve_framed(s).await;
            });
        }
        _ => {
            tokio::spawn(async move {
                let _ = serve_raw(s).await;
            });
        }
    }
}

/// Plain tarpc: the channel executes each request in a task of its own (as dombus-rpc does).
async fn serve_tarpc<T>(transport: T)
where
    T: tarpc::Transport<Response<EchoResponse>, ClientMessage<EchoRequest>> + Send + 'static,
{
    BaseChannel::with_defaults(transport)
        .execute(EchoServer.serve())
        .for_each(|call| {
            tokio::spawn(call);
            futures::future::ready(())
        })
        .await;
}

/// Framing and codec only: decodes each request and sends the response inline.
async fn serve_framed(s: BoxStream) -> io::Result<()> {
    let mut t = dombus_rpc::codec::transport::<ClientMessage<EchoRequest>, Response<EchoResponse>>(
        s,
        Codec::Bincode,
        MAX_FRAME,
    );
    while let Some(msg) = t.next().await {
        if let ClientMessage::Request(Request { id, message: EchoRequest::Echo { data }, .. }) = msg? {
            t.send(Response { request_id: id, message: Ok(EchoResponse::Echo(data)) }).await?;
        }
    }
    Ok(())
}

/// The bare stream: [`PAYLOAD`] bytes back for [`PAYLOAD`] bytes in.
pub(crate) async fn serve_raw<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) -> io::Result<()> {
    let mut buf = [0u8; PAYLOAD];
    loop {
        match s.read_exact(&mut buf).await {
            Ok(_) => s.write_all(&buf).await?,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The parent: one client of one stack.

type RpcClient = typed::EchoClient;
type FramedTransport = tarpc::serde_transport::Transport<
    BoxStream,
    Response<EchoResponse>,
    ClientMessage<EchoRequest>,
    SerdeCodec,
>;

/// The client side of one stack.
enum Caller {
    Rpc(RpcClient),
    Tarpc(EchoClient),
    Framed { t: Box<FramedTransport>, next_id: u64 },
    Raw { s: BoxStream, back: Vec<u8> },
}

fn rpc_error(e: tarpc::client::RpcError) -> io::Error {
    io::Error::other(e)
}

fn check_echo(sent: &[u8], got: &[u8]) -> io::Result<()> {
    if sent == got { Ok(()) } else { Err(io::Error::other("the peer echoed the wrong bytes")) }
}

impl Caller {
    /// One call, checked.
    async fn call(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Caller::Rpc(c) => {
                let back = c.echo(context::current(), data.to_vec()).await.map_err(rpc_error)?;
                check_echo(data, &back)
            }
            Caller::Tarpc(c) => {
                let back = c.echo(context::current(), data.to_vec()).await.map_err(rpc_error)?;
                check_echo(data, &back)
            }
            Caller::Framed { t, next_id } => {
                let id = *next_id;
                *next_id += 1;
                let message = EchoRequest::Echo { data: data.to_vec() };
                t.send(ClientMessage::Request(Request { context: context::current(), id, message })).await?;
                let r = t.next().await.ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))??;
                match r.message {
                    Ok(EchoResponse::Echo(back)) if r.request_id == id => check_echo(data, &back),
                    other => Err(io::Error::other(format!("unexpected response {other:?}"))),
                }
            }
            Caller::Raw { s, back } => {
                s.write_all(data).await?;
                s.read_exact(back).await?;
                check_echo(data, back)
            }
        }
    }

    /// A handle for calls that do not borrow `self`, for pipelining (typed-client stacks only).
    fn detached(&self) -> Option<Detached> {
        match self {
            Caller::Rpc(c) => Some(Detached::Rpc(c.clone())),
            Caller::Tarpc(c) => Some(Detached::Tarpc(c.clone())),
            _ => None,
        }
    }
}

/// A clone of a typed client.
enum Detached {
    Rpc(RpcClient),
    Tarpc(EchoClient),
}

impl Detached {
    /// One call, checked.
    async fn call(&self, data: &[u8]) -> io::Result<()> {
        let back = match self {
            Detached::Rpc(c) => c.echo(context::current(), data.to_vec()).await,
            Detached::Tarpc(c) => c.echo(context::current(), data.to_vec()).await,
        }
        .map_err(rpc_error)?;
        check_echo(data, &back)
    }
}

/// How the parent reaches its domain's virtual sockets in a `xen:` benchmark.
enum ParentDomain {
    /// It attached itself: its own [`VsockDomain`].
    InProcess(VsockDomain<SimBackend>),
    /// Through its domain's agent, a peer process of its own.
    Agent(AgentProcess),
}

/// The parent's half of a `xen:` benchmark: the hypervisor, our domain's virtual sockets.
struct XenParent {
    domain: ParentDomain,
    _hv: SimHypervisorHandle,
}

/// Calls of one [`Stack`] over one [`Transport`] to an echoing peer process.
///
/// Field order is drop order: the client goes first, then the runtime (and the parent's
/// virtual-socket tasks with it), then the peer is killed, then the agent (if any) is killed,
/// the hypervisor stops and the scratch directory goes.
pub struct RpcPingPong {
    /// Taken by the task that runs the calls, and put back.
    caller: Option<Caller>,
    /// How the parent reaches the raw echo stack, for [`RpcPingPong::connects`] (`xen:` only).
    raw: Option<(Net, Address)>,
    rt: Runtime,
    peer: PeerProcess,
    data: Vec<u8>,
    _xen: Option<XenParent>,
    _dir: ScratchDir,
}

impl std::fmt::Debug for RpcPingPong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RpcPingPong").field("peer", &self.peer).finish()
    }
}

/// A free TCP port on 127.0.0.1 per stack (bound at once, then released for the peer to take).
fn free_tcp_ports() -> io::Result<[u16; 5]> {
    let ls = (0..5).map(|_| std::net::TcpListener::bind("127.0.0.1:0")).collect::<io::Result<Vec<_>>>()?;
    let mut ports = [0u16; 5];
    for (p, l) in ports.iter_mut().zip(&ls) {
        *p = l.local_addr()?.port();
    }
    Ok(ports)
}

/// Connects to `addr` (Unix or TCP), retrying until the peer listens.
async fn connect_retry(addr: &Address, peer: &mut PeerProcess) -> io::Result<BoxStream> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        match Net::new().connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => {
                peer.check_alive()?;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    }
}

impl RpcPingPong {
    /// Starts the peer serving `transport` and connects `stack`, both processes on a
    /// current-thread runtime.
    pub fn new(transport: Transport, stack: Stack) -> io::Result<RpcPingPong> {
        RpcPingPong::with_runtime(transport, stack, Flavor::Current)
    }

    /// Like [`RpcPingPong::new`] with both processes on `flavor` runtimes.
    pub fn with_runtime(transport: Transport, stack: Stack, flavor: Flavor) -> io::Result<RpcPingPong> {
        let dir = ScratchDir::new()?;
        let rt = runtime(flavor)?;
        let i = stack.index();
        let (place, hv) = match transport {
            Transport::Xen { spin } | Transport::Agent { spin } => {
                let socket = dir.path().join("simxen.sock");
                let hv = SimHypervisor::spawn(&socket)?;
                (Place::Xen { socket, spin }, Some(hv))
            }
            Transport::Unix => (Place::Unix { dir: dir.path().to_path_buf() }, None),
            Transport::Tcp => (Place::Tcp { ports: free_tcp_ports()? }, None),
        };
        let args = ServerArgs { place: place.clone(), flavor };
        let mut peer = PeerProcess::spawn(SERVER_ROLE, &args.encode(), &[])?;
        let xen = match (&place, hv) {
            (Place::Xen { socket, spin }, Some(hv)) => {
                let domain = if let Transport::Agent { .. } = transport {
                    let limits = crate::agent::Limits::Default;
                    ParentDomain::Agent(AgentProcess::spawn(socket, CLIENT_DOM, *spin, limits, flavor)?)
                } else {
                    let backend = SimBackend::boot(socket, Some(CLIENT_DOM)).map_err(io::Error::other)?;
                    ParentDomain::InProcess(
                        rt.block_on(async { VsockDomain::start(backend, xen_config(*spin)) })?,
                    )
                };
                Some(XenParent { domain, _hv: hv })
            }
            _ => None,
        };
        let mut raw = None;
        let caller = rt.block_on(async {
            let setup = async {
                // Where stack `i` listens, and a way to reach it.
                let (net, addr) = match (&place, &xen) {
                    (Place::Xen { .. }, Some(x)) => {
                        let mut net = match &x.domain {
                            ParentDomain::InProcess(d) => Net::new().with_xen(d.clone()),
                            ParentDomain::Agent(a) => Net::new().with_agent(a.client().clone()),
                        };
                        // Connects of the timed loops find the listener up: no waiting.
                        let raw_addr = VsockAddr::new(u32::from(SERVER_DOM.0), XEN_PORTS[Stack::Raw.index()]);
                        raw = Some((net.clone(), Address::Xen(raw_addr)));
                        net.xen_connect_wait = Some(SETUP_TIMEOUT);
                        let addr = VsockAddr::new(u32::from(SERVER_DOM.0), XEN_PORTS[i]);
                        (net, Address::Xen(addr))
                    }
                    (Place::Unix { dir }, _) => (Net::new(), Address::Unix(unix_path(dir, i))),
                    (Place::Tcp { ports }, _) => {
                        (Net::new(), Address::Tcp { host: "127.0.0.1".into(), port: ports[i] })
                    }
                    _ => return Err(io::Error::other("xen without a domain")),
                };
                // Wait for the peer to listen (over xen: the listener is announced in the store,
                // connect_wait watches for it).
                let stream = match &addr {
                    Address::Xen(_) => net.connect(&addr).await?,
                    _ => connect_retry(&addr, &mut peer).await?,
                };
                Ok(match stack {
                    Stack::Rpc(codec) => {
                        drop(stream);
                        let config = ClientConfig { codec, ..ClientConfig::default() };
                        Caller::Rpc(typed::EchoClient::with_config(net, addr, config))
                    }
                    Stack::RpcViaTarpc => {
                        drop(stream);
                        let config = ClientConfig { call_path: CallPath::Tarpc, ..ClientConfig::default() };
                        Caller::Rpc(typed::EchoClient::with_config(net, addr, config))
                    }
                    Stack::Tarpc => {
                        let cfg = tarpc::client::Config::default();
                        let client = match (&place, &addr) {
                            (Place::Unix { .. }, Address::Unix(path)) => {
                                drop(stream);
                                let t = tarpc::serde_transport::unix::connect(path, Bincode::default).await?;
                                EchoClient::new(cfg, t).spawn()
                            }
                            (Place::Tcp { .. }, Address::Tcp { host, port }) => {
                                drop(stream);
                                let t = tarpc::serde_transport::tcp::connect(
                                    (host.as_str(), *port),
                                    Bincode::default,
                                )
                                .await?;
                                t.get_ref().set_nodelay(true)?;
                                EchoClient::new(cfg, t).spawn()
                            }
                            _ => {
                                let t = tarpc::serde_transport::Transport::from((stream, Bincode::default()));
                                EchoClient::new(cfg, t).spawn()
                            }
                        };
                        Caller::Tarpc(client)
                    }
                    Stack::Framed => Caller::Framed {
                        t: Box::new(dombus_rpc::codec::transport(stream, Codec::Bincode, MAX_FRAME)),
                        next_id: 0,
                    },
                    Stack::Raw => Caller::Raw { s: stream, back: vec![0; PAYLOAD] },
                })
            };
            match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "RPC benchmark set-up timed out")),
            }
        })?;
        let data = (0..PAYLOAD).map(|i| i as u8).collect();
        let mut me = RpcPingPong { caller: Some(caller), raw, rt, peer, data, _xen: xen, _dir: dir };
        me.run(HANDSHAKE_CALLS, None)?;
        if me.caller.as_ref().and_then(Caller::detached).is_some() {
            me.pipelined(HANDSHAKE_CALLS * 4, 32)?;
        }
        Ok(me)
    }

    /// Makes `calls` calls with `depth` of them in flight at any time (a new one starts as each
    /// completes); returns the wall time. Only the typed-client stacks ([`Stack::pipelines`]).
    pub fn pipelined(&mut self, calls: u64, depth: usize) -> io::Result<Duration> {
        let RpcPingPong { caller, rt, data, .. } = self;
        let client = caller
            .as_ref()
            .and_then(Caller::detached)
            .ok_or_else(|| io::Error::new(io::ErrorKind::Unsupported, "this stack does not pipeline"))?;
        let data: &[u8] = data;
        rt.block_on(async {
            let start = Instant::now();
            let mut in_flight = FuturesUnordered::new();
            let mut issued = 0u64;
            while issued < calls && in_flight.len() < depth.max(1) {
                in_flight.push(client.call(data));
                issued += 1;
            }
            while let Some(r) = in_flight.next().await {
                r?;
                if issued < calls {
                    in_flight.push(client.call(data));
                    issued += 1;
                }
            }
            Ok(start.elapsed())
        })
    }

    /// Opens `n` connections to the peer's raw echo stack one after another, each with one
    /// [`PAYLOAD`]-byte round trip, and closes each before the next (`xen:` only); returns the
    /// wall time. The peer's side of a connection may still be closing when the next opens.
    pub fn connects(&mut self, n: u64) -> io::Result<Duration> {
        let (net, addr) = self.raw.clone().ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, "connects are measured over xen: only")
        })?;
        let data = self.data.clone();
        self.rt.block_on(async move {
            let mut back = vec![0u8; data.len()];
            let start = Instant::now();
            for _ in 0..n {
                let mut s = net.connect(&addr).await?;
                s.write_all(&data).await?;
                s.read_exact(&mut back).await?;
                check_echo(&data, &back)?;
            }
            Ok(start.elapsed())
        })
    }

    /// The domain agent the parent reaches its virtual sockets through ([`Transport::Agent`]).
    pub fn agent(&self) -> Option<&AgentProcess> {
        match self._xen.as_ref().map(|x| &x.domain) {
            Some(ParentDomain::Agent(a)) => Some(a),
            _ => None,
        }
    }

    /// CPU time (user + system, all threads) of the peer and, through an agent, of the agent.
    pub fn peers_cpu_time(&self) -> io::Result<Duration> {
        let agent = match self.agent() {
            Some(a) => a.process().cpu_time()?,
            None => Duration::ZERO,
        };
        Ok(self.peer.cpu_time()? + agent)
    }
}

impl PingPong for RpcPingPong {
    /// The calls run in a task of their own, as an application's would: a future polled by
    /// `block_on` itself is resumed only after the runtime's other tasks and an I/O poll
    /// (about 1 µs per call more; the same for every stack).
    fn run(&mut self, n: u64, samples: Option<&mut Vec<Duration>>) -> io::Result<Duration> {
        let mut caller = self.caller.take().ok_or_else(|| io::Error::other("a previous run failed"))?;
        let data = self.data.clone();
        let keep = samples.is_some();
        let task = self.rt.spawn(async move {
            let mut laps_out = Vec::new();
            let mut laps = crate::Laps::start(keep.then_some(&mut laps_out));
            let mut result = Ok(());
            for _ in 0..n {
                if let Err(e) = caller.call(&data).await {
                    result = Err(e);
                    break;
                }
                laps.lap();
            }
            let elapsed = laps.elapsed();
            (caller, result.map(|()| (elapsed, laps_out)))
        });
        let (caller, result) = self.rt.block_on(task).map_err(io::Error::other)?;
        self.caller = Some(caller);
        let (elapsed, laps) = result?;
        if let Some(s) = samples {
            s.extend(laps);
        }
        Ok(elapsed)
    }

    fn peer(&self) -> &PeerProcess {
        &self.peer
    }

    fn peer_cpu_time(&self) -> io::Result<Duration> {
        self.peers_cpu_time()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_arguments_round_trip() {
        let places = [
            Place::Xen { socket: "/tmp/a|b/s.sock".into(), spin: Some(Duration::from_micros(50)) },
            Place::Xen { socket: "/tmp/s.sock".into(), spin: None },
            Place::Unix { dir: "/tmp/d".into() },
            Place::Tcp { ports: [1, 2, 3, 4, 65535] },
        ];
        for place in places {
            for flavor in [Flavor::Current, Flavor::Multi(3)] {
                let a = ServerArgs { place: place.clone(), flavor };
                assert_eq!(ServerArgs::decode(&a.encode()).ok(), Some(a));
            }
        }
        assert!(ServerArgs::decode("ftp|current|-|x").is_err());
        assert_eq!("multi".parse(), Ok(Flavor::Multi(2)));
        assert!("multi0".parse::<Flavor>().is_err());
    }
}
