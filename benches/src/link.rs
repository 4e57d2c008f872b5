//! Link benchmarks: a real [`Link`] between two processes over the simulated hypervisor.
//!
//! The parent runs [`SimHypervisor`] in-process on a socket in a private temporary directory,
//! attaches as domain [`SERVER`] and listens on [`PATH`]; the peer process attaches as domain
//! [`CLIENT`], connects and either echoes fixed-size messages ([`LinkPingPong`]) or sinks a byte
//! stream and acknowledges each batch ([`LinkStream`]). Both sides use a current-thread tokio
//! runtime (the lowest-latency flavour: no cross-thread hand-off between reactor and task).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dombus_sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_transport_xen::link::{Link, LinkConfig, LinkError};
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::mux::{Mux, VsockStream};
use dombus_transport_xen::vsock::session::SessionConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Runtime;

use crate::baseline::CHUNK;
use crate::{PeerProcess, PingPong};

/// Peer role of [`LinkPingPong`].
pub const ECHO_ROLE: &str = "link-echo";
/// Peer role of [`LinkStream`].
pub const SINK_ROLE: &str = "link-sink";
/// The parent's (server's) domain id.
pub const SERVER: DomId = DomId(1);
/// The peer's (client's) domain id.
pub const CLIENT: DomId = DomId(2);
/// Store path of the benchmark link, relative to the server's home.
pub const PATH: &str = "data/bench";
/// How long setting up a link may take before the benchmark gives up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Round trips done before a constructor returns.
const HANDSHAKE_ROUND_TRIPS: u64 = 16;

/// Everything a link benchmark's peer needs, passed as one argument string.
#[derive(Debug, Clone)]
struct PeerArgs {
    socket: PathBuf,
    payload: usize,
    cfg: LinkConfig,
}

impl PeerArgs {
    fn encode(&self) -> String {
        let spin = self.cfg.spin.map_or_else(|| "-".to_string(), |d| d.as_nanos().to_string());
        format!(
            "{}|{}|{}|{}|{}",
            self.payload,
            spin,
            self.cfg.client_to_server,
            self.cfg.server_to_client,
            self.socket.display()
        )
    }

    fn decode(s: &str) -> io::Result<PeerArgs> {
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("bad link peer argument {s:?}"));
        let mut parts = s.splitn(5, '|');
        let mut next = || parts.next().ok_or_else(bad);
        let payload = next()?.parse().map_err(|_| bad())?;
        let spin = match next()? {
            "-" => None,
            ns => Some(Duration::from_nanos(ns.parse().map_err(|_| bad())?)),
        };
        let client_to_server = next()?.parse().map_err(|_| bad())?;
        let server_to_client = next()?.parse().map_err(|_| bad())?;
        let socket = PathBuf::from(next()?);
        Ok(PeerArgs { socket, payload, cfg: LinkConfig { client_to_server, server_to_client, spin } })
    }
}

/// A private directory under the system temp dir, removed on drop.
#[derive(Debug)]
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> io::Result<TempDir> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dombus-bench-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn current_thread_runtime() -> io::Result<Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

fn to_io(e: impl std::error::Error + Send + Sync + 'static) -> io::Error {
    io::Error::other(e)
}

/// The parent's half of a link benchmark: hypervisor, backend, runtime, peer and the link.
///
/// Field order is drop order: the link closes first (inside its runtime), then the peer is
/// killed, then the hypervisor stops and its directory goes.
struct Session {
    link: Link<SimBackend>,
    rt: Runtime,
    peer: PeerProcess,
    _backend: SimBackend,
    _hv: SimHypervisorHandle,
    _dir: TempDir,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("link", &self.link).field("peer", &self.peer).finish()
    }
}

/// The parts of an established benchmark link, before a benchmark takes them over.
struct Parts {
    link: Link<SimBackend>,
    rt: Runtime,
    peer: PeerProcess,
    backend: SimBackend,
    hv: SimHypervisorHandle,
    dir: TempDir,
}

impl Session {
    /// Starts the simulated hypervisor, the peer in `role`, and establishes the link.
    fn start(role: &str, payload: usize, cfg: &LinkConfig) -> io::Result<Session> {
        let Parts { link, rt, peer, backend, hv, dir } = establish(role, payload, cfg)?;
        Ok(Session { link, rt, peer, _backend: backend, _hv: hv, _dir: dir })
    }
}

/// Starts the simulated hypervisor, the peer in `role`, and establishes the link.
fn establish(role: &str, payload: usize, cfg: &LinkConfig) -> io::Result<Parts> {
    {
        let dir = TempDir::new()?;
        let socket = dir.path().join("simxen.sock");
        let hv = SimHypervisor::spawn(&socket)?;
        let backend = SimBackend::boot(socket.as_path(), Some(SERVER)).map_err(to_io)?;
        let rt = current_thread_runtime()?;
        let args = PeerArgs { socket, payload, cfg: cfg.clone() };
        let mut peer = PeerProcess::spawn(role, &args.encode(), &[])?;
        let link = rt.block_on(async {
            // The client domain appears when the peer attaches: retry until listen can grant to it.
            let deadline = Instant::now() + SETUP_TIMEOUT;
            let listener = loop {
                match Link::listen(&backend, PATH, CLIENT, cfg) {
                    Ok(l) => break l,
                    Err(e) if Instant::now() < deadline && retryable(&e) => {
                        peer.check_alive()?;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err(e) => return Err(to_io(e)),
                }
            };
            match tokio::time::timeout(SETUP_TIMEOUT, listener.accept()).await {
                Ok(r) => r.map_err(to_io),
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "peer did not connect")),
            }
        })?;
        Ok(Parts { link, rt, peer, backend, hv, dir })
    }
}

impl Drop for Session {
    /// Shuts the link down cleanly (the peer reads end-of-stream and exits) before the fields
    /// drop; a peer that does not exit in time is killed.
    fn drop(&mut self) {
        let Session { link, rt, peer, .. } = self;
        let _ = rt.block_on(async { tokio::time::timeout(Duration::from_secs(1), link.shutdown()).await });
        peer.wait_exit(Duration::from_secs(1));
    }
}

/// Errors of `Link::listen` that mean "the client domain is not there yet".
fn retryable(e: &LinkError) -> bool {
    use dombus_transport_xen::backend::BackendError;
    matches!(e, LinkError::Backend(BackendError::NotFound(_) | BackendError::PermissionDenied(_)))
}

/// The peer's half: attach as the client, connect, run `body` on the link.
fn peer_session<F, Fut>(arg: &str, body: F) -> io::Result<()>
where
    F: FnOnce(Link<SimBackend>, usize) -> Fut,
    Fut: std::future::Future<Output = io::Result<()>>,
{
    let args = PeerArgs::decode(arg)?;
    let backend = SimBackend::boot(args.socket.as_path(), Some(CLIENT)).map_err(to_io)?;
    let rt = current_thread_runtime()?;
    rt.block_on(async {
        let path = format!("/local/domain/{}/{PATH}", SERVER.0);
        let link = match tokio::time::timeout(
            SETUP_TIMEOUT,
            Link::connect(&backend, &path, SERVER, &args.cfg),
        )
        .await
        {
            Ok(r) => r.map_err(to_io)?,
            Err(_) => {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "server did not publish the link"));
            }
        };
        body(link, args.payload).await
    })
}

/// Peer of [`LinkPingPong`]: reads exactly `payload` bytes, writes them back, until end of stream.
pub(crate) fn echo_child(arg: &str) -> io::Result<()> {
    peer_session(arg, |mut link, payload| async move {
        let mut buf = vec![0u8; payload.max(1)];
        loop {
            match link.read_exact(&mut buf).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            link.write_all(&buf).await?;
        }
    })
}

/// Peer of [`LinkStream`]: sinks batches on the link until end of stream.
pub(crate) fn sink_child(arg: &str) -> io::Result<()> {
    peer_session(arg, |mut link, _| async move { sink(&mut link).await })
}

/// The sinking side of a stream benchmark: reads a little-endian u64 length (0 or end of stream
/// = stop), sinks that many bytes, answers one byte; repeats.
async fn sink<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let mut len = match s.read_u64_le().await {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        };
        while len > 0 {
            let want = usize::try_from(len).unwrap_or(usize::MAX).min(buf.len());
            let n = s.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "stream ended mid-batch"));
            }
            len -= n as u64;
        }
        s.write_all(&[1]).await?;
    }
}

/// The sending side of a stream benchmark: one batch of `chunks` chunks, then the acknowledgement.
async fn send_batch<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    chunk: &[u8],
    chunks: u64,
) -> io::Result<()> {
    if chunks == 0 {
        return Ok(());
    }
    s.write_u64_le(chunks * chunk.len() as u64).await?;
    for _ in 0..chunks {
        s.write_all(chunk).await?;
    }
    let mut ack = [0u8; 1];
    s.read_exact(&mut ack).await?;
    Ok(())
}

/// Round trips of `payload`-byte messages through a link to an echoing peer process.
#[derive(Debug)]
pub struct LinkPingPong {
    session: Session,
    out: Vec<u8>,
    back: Vec<u8>,
}

impl LinkPingPong {
    /// Sets up the hypervisor, the echo peer and the link (`cfg` on both sides).
    pub fn new(payload: usize, cfg: &LinkConfig) -> io::Result<LinkPingPong> {
        let session = Session::start(ECHO_ROLE, payload, cfg)?;
        let out = (0..payload).map(|i| i as u8).collect();
        let mut me = LinkPingPong { session, out, back: vec![0; payload] };
        me.run(HANDSHAKE_ROUND_TRIPS, None)?;
        if me.back != me.out {
            return Err(io::Error::other("link peer echoed the wrong bytes"));
        }
        Ok(me)
    }

    /// A link configuration with default ring sizes and the given spin budget.
    pub fn config(spin: Option<Duration>) -> LinkConfig {
        LinkConfig { spin, ..LinkConfig::default() }
    }
}

impl PingPong for LinkPingPong {
    fn run(&mut self, n: u64, samples: Option<&mut Vec<Duration>>) -> io::Result<Duration> {
        let LinkPingPong { session, out, back } = self;
        let Session { link, rt, .. } = session;
        rt.block_on(async {
            let mut laps = crate::Laps::start(samples);
            for _ in 0..n {
                link.write_all(out).await?;
                link.read_exact(back).await?;
                laps.lap();
            }
            Ok(laps.elapsed())
        })
    }

    fn peer(&self) -> &PeerProcess {
        &self.session.peer
    }
}

/// Ring size of the stream benchmark, both directions.
pub const STREAM_RING: usize = 1 << 20;

/// A one-way byte stream of 64 KiB chunks through a link with 1 MiB rings into a sinking peer.
#[derive(Debug)]
pub struct LinkStream {
    session: Session,
    chunk: Vec<u8>,
}

impl LinkStream {
    /// Sets up the hypervisor, the sink peer and a link with [`STREAM_RING`]-byte rings.
    pub fn new(spin: Option<Duration>) -> io::Result<LinkStream> {
        let cfg = LinkConfig { client_to_server: STREAM_RING, server_to_client: STREAM_RING, spin };
        let session = Session::start(SINK_ROLE, 0, &cfg)?;
        let mut me = LinkStream { session, chunk: (0..CHUNK).map(|i| i as u8).collect() };
        me.run(16)?;
        Ok(me)
    }

    /// Sends `chunks` 64 KiB chunks and waits for the peer to acknowledge having read them all;
    /// returns the wall time (one header and one 1-byte acknowledgement per call).
    pub fn run(&mut self, chunks: u64) -> io::Result<Duration> {
        let LinkStream { session, chunk } = self;
        let Session { link, rt, .. } = session;
        if chunks == 0 {
            return Ok(Duration::ZERO);
        }
        rt.block_on(async {
            let start = Instant::now();
            send_batch(link, chunk, chunks).await?;
            Ok(start.elapsed())
        })
    }

    /// The peer process.
    pub fn peer(&self) -> &PeerProcess {
        &self.session.peer
    }

    /// The peer's CPU clock (usable while [`LinkStream::run`] borrows `self`).
    pub fn peer_cpu_clock(&self) -> crate::CpuClock {
        self.session.peer.cpu_clock()
    }
}

/// Peer role of [`VsockPingPong`].
pub const VSOCK_ECHO_ROLE: &str = "vsock-echo";
/// Port of the measured connection in [`VsockPingPong`].
const VSOCK_ECHO_PORT: u32 = 7;
/// The sessions of [`VsockPingPong`]: its idle connections are far past the defaults for a link
/// from a guest (64 connections by receive budget), so both ends raise the limits on purpose.
fn many_connections() -> SessionConfig {
    SessionConfig { max_connections: 20_000, rx_budget: u64::MAX, ..SessionConfig::default() }
}

/// Port the idle connections of [`VsockPingPong`] go to.
const VSOCK_IDLE_PORT: u32 = 1;

/// Round trips of 64-byte messages over one virtual-socket connection on a link (wake-ups, no
/// spinning), with `idle` other connections open on the same link.
pub struct VsockPingPong {
    stream: VsockStream,
    idle: Vec<VsockStream>,
    mux: Mux,
    out: Vec<u8>,
    back: Vec<u8>,
    rt: Runtime,
    peer: PeerProcess,
    _backend: SimBackend,
    _hv: SimHypervisorHandle,
    _dir: TempDir,
}

impl std::fmt::Debug for VsockPingPong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockPingPong").field("idle", &self.idle.len()).field("mux", &self.mux).finish()
    }
}

impl VsockPingPong {
    /// Sets up the link, the echoing peer, the measured connection and `idle` idle ones.
    pub fn new(idle: usize) -> io::Result<VsockPingPong> {
        let Parts { link, rt, peer, backend, hv, dir } =
            establish(VSOCK_ECHO_ROLE, idle, &LinkConfig::default())?;
        let (mux, stream, idle) = rt.block_on(async {
            let mux = Mux::spawn(link, many_connections());
            let stream = mux.connect(VSOCK_ECHO_PORT).await?;
            let mut held = Vec::with_capacity(idle);
            for _ in 0..idle {
                held.push(mux.connect(VSOCK_IDLE_PORT).await?);
            }
            io::Result::Ok((mux, stream, held))
        })?;
        let mut me = VsockPingPong {
            stream,
            idle,
            mux,
            out: vec![0x5a; 64],
            back: vec![0; 64],
            rt,
            peer,
            _backend: backend,
            _hv: hv,
            _dir: dir,
        };
        me.run(HANDSHAKE_ROUND_TRIPS, None)?;
        Ok(me)
    }
}

impl PingPong for VsockPingPong {
    fn run(&mut self, n: u64, samples: Option<&mut Vec<Duration>>) -> io::Result<Duration> {
        let VsockPingPong { stream, out, back, rt, .. } = self;
        rt.block_on(async {
            let mut laps = crate::Laps::start(samples);
            for _ in 0..n {
                stream.write_all(out).await?;
                stream.read_exact(back).await?;
                laps.lap();
            }
            Ok(laps.elapsed())
        })
    }

    fn peer(&self) -> &PeerProcess {
        &self.peer
    }
}

impl Drop for VsockPingPong {
    fn drop(&mut self) {
        let _ = self
            .rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(1), self.stream.shutdown()).await });
        self.peer.wait_exit(Duration::from_secs(1));
    }
}

/// Peer of [`VsockPingPong`]: holds every idle connection, echoes 64-byte messages on the
/// measured one until it ends.
pub(crate) fn vsock_echo_child(arg: &str) -> io::Result<()> {
    peer_session(arg, |link, _idle| async move {
        let mux = Mux::spawn(link, many_connections());
        let idle = mux.listen(VSOCK_IDLE_PORT)?;
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok(s) = idle.accept().await {
                held.push(s);
            }
        });
        let echo = mux.listen(VSOCK_ECHO_PORT)?;
        let mut s = echo.accept().await?;
        let mut buf = [0u8; 64];
        loop {
            match s.read_exact(&mut buf).await {
                Ok(_) => s.write_all(&buf).await?,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                Err(e) => return Err(e),
            }
        }
        holder.abort();
        Ok(())
    })
}

/// Peer role of [`VsockStreams`].
pub const VSOCK_SINK_ROLE: &str = "vsock-sink";
/// Port the connections of [`VsockStreams`] go to.
const VSOCK_SINK_PORT: u32 = 9;

/// Aggregate throughput of several virtual-socket connections on one link, all streaming 64 KiB
/// chunks at once into a sinking peer (rings of [`STREAM_RING`] bytes; each sink gives its
/// connection [`sink_buffer`] of receive buffer, as a bulk reader does).
pub struct VsockStreams {
    streams: Vec<VsockStream>,
    mux: Mux,
    chunk: Vec<u8>,
    rt: Runtime,
    peer: PeerProcess,
    _backend: SimBackend,
    _hv: SimHypervisorHandle,
    _dir: TempDir,
}

impl std::fmt::Debug for VsockStreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockStreams").field("conns", &self.streams.len()).field("mux", &self.mux).finish()
    }
}

impl VsockStreams {
    /// Sets up the link (adaptive polling if `spin`), the sinking peer and `conns` connections.
    pub fn new(conns: usize, spin: Option<Duration>) -> io::Result<VsockStreams> {
        let conns = conns.max(1);
        let cfg = LinkConfig { client_to_server: STREAM_RING, server_to_client: STREAM_RING, spin };
        let Parts { link, rt, peer, backend, hv, dir } = establish(VSOCK_SINK_ROLE, conns, &cfg)?;
        let (mux, streams) = rt.block_on(async {
            let mux = Mux::spawn(link, SessionConfig::default());
            let mut streams = Vec::with_capacity(conns);
            for _ in 0..conns {
                streams.push(mux.connect(VSOCK_SINK_PORT).await?);
            }
            io::Result::Ok((mux, streams))
        })?;
        let chunk = (0..CHUNK).map(|i| i as u8).collect();
        let mut me = VsockStreams { streams, mux, chunk, rt, peer, _backend: backend, _hv: hv, _dir: dir };
        me.run(16 * conns as u64)?;
        Ok(me)
    }

    /// Sends `chunks` 64 KiB chunks spread evenly over the connections, all at once, and waits
    /// until the peer has acknowledged every connection's share; returns the wall time.
    pub fn run(&mut self, chunks: u64) -> io::Result<Duration> {
        let VsockStreams { streams, chunk, rt, .. } = self;
        let n = streams.len() as u64;
        rt.block_on(async {
            let start = Instant::now();
            let batches = streams.iter_mut().enumerate().map(|(i, s)| {
                let share = chunks / n + u64::from((i as u64) < chunks % n);
                send_batch(s, chunk, share)
            });
            futures::future::try_join_all(batches).await?;
            Ok(start.elapsed())
        })
    }

    /// The peer process.
    pub fn peer(&self) -> &PeerProcess {
        &self.peer
    }
}

impl Drop for VsockStreams {
    fn drop(&mut self) {
        let VsockStreams { streams, rt, peer, .. } = self;
        let _ = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(1), async {
                for s in streams.iter_mut() {
                    s.shutdown().await?;
                }
                io::Result::Ok(())
            })
            .await
        });
        peer.wait_exit(Duration::from_secs(1));
    }
}

/// The receive buffer each of `conns` bulk connections on one link gets: its share of the
/// ring (what the bare link's stream has in flight), at least the default and at most what a
/// connection may have.
pub fn sink_buffer(conns: usize) -> u32 {
    let config = SessionConfig::default();
    let share = u32::try_from(STREAM_RING / conns.max(1)).unwrap_or(u32::MAX);
    share.clamp(config.buf_alloc, config.max_buf_alloc)
}

/// Peer of [`VsockStreams`]: accepts the connections and sinks each in its own task; exits when
/// all of them have ended.
pub(crate) fn vsock_sink_child(arg: &str) -> io::Result<()> {
    peer_session(arg, |link, conns| async move {
        let mux = Mux::spawn(link, SessionConfig::default());
        let listener = mux.listen(VSOCK_SINK_PORT)?;
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..conns {
            let mut s = listener.accept().await?;
            s.set_recv_buffer_size(sink_buffer(conns))?;
            tasks.spawn(async move { sink(&mut s).await });
        }
        while let Some(r) = tasks.join_next().await {
            r.map_err(io::Error::other)??;
        }
        Ok(())
    })
}
