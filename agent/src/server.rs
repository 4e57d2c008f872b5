//! The agent's side: serves one domain's virtual sockets to every local process on a Unix
//! socket ([`crate::proto`] is the protocol).
//!
//! Each local socket is one request and then one connection or one listener, with a task of its
//! own: a process that exits closes its sockets, which ends exactly its connections and frees
//! its ports; the domain's links and every other process's connections go on. Who may connect
//! is decided by the socket file's permissions ([`AgentConfig::mode`]); who may listen on a port
//! below 1024, by the caller's user id ([`AgentConfig::privileged_uids`], read from the socket's
//! peer credentials).

use std::collections::BTreeMap;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dombus_transport_xen::vsock::mux::VsockStream;
use dombus_transport_xen::vsock::{FIRST_UNPRIVILEGED_PORT, VsockAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::fdpass;
use crate::proto::{self, Accepted, AgentStatus, DATA_HEADER, End, Op, REQUEST_LEN, Reply, Request, Target};
use crate::sockets::DomainSockets;

/// Bytes a connection's task reads at once, in each direction.
const CHUNK: usize = 16 << 10;
/// How often a half-closed process's socket is checked for a whole close.
const HANG_UP_CHECK: Duration = Duration::from_secs(1);

/// How an agent serves.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The Unix socket processes reach the agent at.
    pub socket: PathBuf,
    /// The socket file's permission bits: who may use the agent (default `0o600`, the agent's
    /// user only, like xenstored's socket in dom0).
    pub mode: u32,
    /// Local users who may listen on ports below 1024 (default: root and the agent's own user).
    pub privileged_uids: Vec<u32>,
    /// Most local sockets open to the agent at once (requests, connections and listeners).
    pub max_local: usize,
    /// How long a process has to send its request after connecting.
    pub request_timeout: Duration,
}

impl AgentConfig {
    /// The defaults, serving at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> AgentConfig {
        let me = rustix::process::geteuid().as_raw();
        let mut privileged_uids = vec![0];
        if me != 0 {
            privileged_uids.push(me);
        }
        AgentConfig {
            socket: socket.into(),
            mode: 0o600,
            privileged_uids,
            max_local: 4096,
            request_timeout: Duration::from_secs(5),
        }
    }
}

struct Shared {
    cfg: AgentConfig,
    /// The domain's sockets ([`crate::sockets::Following`] ones follow it across migrations).
    domain: Arc<dyn DomainSockets>,
    /// Set when the agent stops: every task ends, connections with an `AgentStopping` frame.
    stop: watch::Sender<bool>,
    local: AtomicUsize,
    /// Ports listened on through the agent, and by how many listeners (one, or for a moment
    /// two: a port is free again in the domain before its old listener's task has ended).
    listening: Mutex<BTreeMap<u32, usize>>,
}

/// A running agent: serves until [`Agent::stop`] or drop.
pub struct Agent {
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("socket", &self.shared.cfg.socket)
            .field("domain", &self.shared.domain.domid())
            .finish()
    }
}

/// Counts one local socket for as long as it lives.
struct LocalSlot(Arc<Shared>);

impl Drop for LocalSlot {
    fn drop(&mut self) {
        self.0.local.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Agent {
    /// Serves `domain` at `cfg.socket` (must run inside a tokio runtime). A stale socket file
    /// (nobody accepting on it) is replaced; a live one is an error.
    pub fn serve(domain: Arc<dyn DomainSockets>, cfg: AgentConfig) -> io::Result<Agent> {
        let listener = bind(&cfg.socket, cfg.mode)?;
        let (stop, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            cfg,
            domain,
            stop,
            local: AtomicUsize::new(0),
            listening: Mutex::new(BTreeMap::new()),
        });
        let s = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                match listener.accept().await {
                    Ok((sock, _)) => {
                        let shared = s.clone();
                        tokio::spawn(async move { shared.serve_local(sock).await });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a local connection failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        tracing::info!(socket = %shared.cfg.socket.display(), domain = %shared.domain.domid(), "domain agent ready");
        Ok(Agent { shared, accept })
    }

    /// The socket it serves at.
    pub fn socket(&self) -> &Path {
        &self.shared.cfg.socket
    }

    /// What the agent holds.
    pub fn status(&self) -> AgentStatus {
        self.shared.status()
    }

    /// Stops serving: the socket file is removed, every connection ends with an
    /// `AgentStopping` end frame and every listener closes. Waits (at most a second) until
    /// every local socket is closed, so that a process exiting right after still sent the end
    /// frames. Dropping an `Agent` stops it the same way without waiting.
    pub async fn stop(self) {
        let shared = self.shared.clone();
        drop(self);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        while shared.local.load(Ordering::Relaxed) > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.stop.send_replace(true);
        let _ = std::fs::remove_file(&self.shared.cfg.socket);
    }
}

/// Binds `path` with permission bits `mode`, replacing a stale socket file.
fn bind(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let context = |e: io::Error| io::Error::new(e.kind(), format!("agent socket {}: {e}", path.display()));
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(context)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("another agent serves {} already", path.display()),
            ));
        }
        std::fs::remove_file(path).map_err(context)?;
    }
    // Created private, then opened up to `mode`: no moment where it is wider than asked.
    let old = rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o177));
    let bound = UnixListener::bind(path);
    rustix::process::umask(old);
    let listener = bound.map_err(context)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(context)?;
    Ok(listener)
}

impl Shared {
    fn status(&self) -> AgentStatus {
        let domain = &self.domain;
        AgentStatus {
            domain: domain.domid(),
            links: domain
                .links()
                .into_iter()
                .map(|(d, n)| (d, u32::try_from(n).unwrap_or(u32::MAX)))
                .collect(),
            listening: self.listening.lock().unwrap_or_else(|p| p.into_inner()).keys().copied().collect(),
            local: u32::try_from(self.local.load(Ordering::Relaxed)).unwrap_or(u32::MAX),
        }
    }

    async fn serve_local(self: Arc<Self>, mut sock: UnixStream) {
        if self.local.fetch_add(1, Ordering::Relaxed) >= self.cfg.max_local {
            self.local.fetch_sub(1, Ordering::Relaxed);
            let e = io::Error::other(format!(
                "the agent has {} local connections open, its limit",
                self.cfg.max_local
            ));
            let _ = sock.write_all(&Reply::error(&e).encode()).await;
            return;
        }
        let slot = LocalSlot(self.clone());
        let request = match tokio::time::timeout(self.cfg.request_timeout, read_request(&mut sock)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "a local process sent a bad request");
                let _ = sock.write_all(&Reply::error(&e).encode()).await;
                return;
            }
            Err(_) => return,
        };
        match request.op {
            Op::Connect => self.connect(sock, request, slot).await,
            Op::Listen => self.listen(sock, request, slot).await,
            Op::Status => {
                let status = self.status();
                let reply = Reply::ok(u32::from(status.domain.0), 0, status.encode());
                let _ = sock.write_all(&reply.encode()).await;
            }
        }
    }

    async fn connect(self: Arc<Self>, mut sock: UnixStream, r: Request, slot: LocalSlot) {
        let domain = &self.domain;
        let opened = async {
            let wait = (r.wait_ms > 0).then(|| Duration::from_millis(u64::from(r.wait_ms)));
            match &r.target {
                Target::Cid(c) => domain.connect(VsockAddr::new(*c, r.port), wait).await,
                Target::Name(n) => domain.connect_name(n, r.port, wait).await,
            }
        };
        // The process may give up (close its socket) while the connect waits, and the agent
        // may stop.
        let mut stop = self.stop.subscribe();
        let stream = tokio::select! {
            s = opened => s,
            _ = gone(&sock) => return,
            _ = stop.changed() => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "the domain agent is stopping")),
        };
        let stream = match stream.and_then(|s| grow_buffer(&s, r.recv_buffer).map(|()| s)) {
            Ok(s) => s,
            Err(e) => {
                let _ = sock.write_all(&Reply::error(&e).encode()).await;
                return;
            }
        };
        let reply = Reply::ok(u32::from(stream.peer_domain().0), stream.ports().0, Vec::new());
        if sock.write_all(&reply.encode()).await.is_ok() {
            proxy(sock, stream, self.stop.subscribe(), slot).await;
        }
    }

    async fn listen(self: Arc<Self>, mut sock: UnixStream, r: Request, _slot: LocalSlot) {
        if r.port < FIRST_UNPRIVILEGED_PORT {
            let uid = sock.peer_cred().map(|c| c.uid()).ok();
            if !uid.is_some_and(|u| self.cfg.privileged_uids.contains(&u)) {
                let e = io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "port {} is below {FIRST_UNPRIVILEGED_PORT}: only privileged local users may listen on it (uids {:?}; the caller is {})",
                        r.port,
                        self.cfg.privileged_uids,
                        uid.map_or("unknown".to_string(), |u| format!("uid {u}"))
                    ),
                );
                let _ = sock.write_all(&Reply::error(&e).encode()).await;
                return;
            }
        }
        let mut listener = match self.domain.listen(r.port) {
            Ok(l) => l,
            Err(e) => {
                let _ = sock.write_all(&Reply::error(&e).encode()).await;
                return;
            }
        };
        let _held = self.hold_port(r.port);
        let _named = match &r.target {
            Target::Name(n) => Some(PortName::new(self.domain.clone(), r.port, n)),
            Target::Cid(_) => None,
        };
        let reply = Reply::ok(u32::from(self.domain.domid().0), r.port, Vec::new());
        if sock.write_all(&reply.encode()).await.is_err() {
            return;
        }
        let mut stop = self.stop.subscribe();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(stream) => {
                        // On failure the connection works with the default buffer, only slower.
                        // A size the domain never allows is the listener's mistake; a full
                        // receive budget is the peer's doing, and not worth a warning each time.
                        match grow_buffer(&stream, r.recv_buffer) {
                            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
                                tracing::warn!(port = r.port, error = %e, "an accepted connection keeps the default receive buffer")
                            }
                            Err(e) => {
                                tracing::debug!(port = r.port, error = %e, "an accepted connection keeps the default receive buffer")
                            }
                            Ok(()) => {}
                        }
                        if let Err(e) = self.clone().hand_over(&sock, stream).await {
                            tracing::debug!(port = r.port, error = %e, "a listening process went away");
                            return;
                        }
                    }
                    Err(e) => {
                        // The domain's listener ended for good (its domain is gone): closing the
                        // socket tells the process.
                        tracing::info!(port = r.port, error = %e, "listener ended");
                        return;
                    }
                },
                _ = gone(&sock) => return,
                _ = stop.changed() => return,
            }
        }
    }

    fn hold_port(self: &Arc<Self>, port: u32) -> PortHold {
        *self.listening.lock().unwrap_or_else(|p| p.into_inner()).entry(port).or_default() += 1;
        PortHold(self.clone(), port)
    }

    /// Gives an accepted connection to the listening process: a new socket pair, one end sent
    /// with an [`Accepted`] record, the other proxied to the connection.
    async fn hand_over(self: Arc<Self>, sock: &UnixStream, stream: VsockStream) -> io::Result<()> {
        let (mine, theirs) = UnixStream::pair()?;
        let (local_port, peer_port) = stream.ports();
        let record = Accepted { peer_domain: stream.peer_domain(), local_port, peer_port }.encode();
        fdpass::send(sock, &record, theirs.as_fd()).await?;
        drop(theirs);
        if self.local.fetch_add(1, Ordering::Relaxed) >= self.cfg.max_local {
            self.local.fetch_sub(1, Ordering::Relaxed);
            // Over the limit: the process sees the connection end at once.
            let mut mine = mine;
            let _ = mine
                .write_all(&proto::end_frame(End::Failed, "the agent is at its limit of local connections"))
                .await;
            return Ok(());
        }
        let slot = LocalSlot(self.clone());
        let stop = self.stop.subscribe();
        tokio::spawn(proxy(mine, stream, stop, slot));
        Ok(())
    }
}

/// Gives `stream` the receive buffer a request asked for (in [`proto::BUFFER_UNIT`]s; 0: none).
fn grow_buffer(stream: &VsockStream, units: u8) -> io::Result<()> {
    if units == 0 {
        return Ok(());
    }
    stream.set_recv_buffer_size(u32::from(units) * proto::BUFFER_UNIT)
}

/// Marks a port listened on through the agent, for [`AgentStatus`].
struct PortHold(Arc<Shared>, u32);

impl Drop for PortHold {
    fn drop(&mut self) {
        let mut l = self.0.listening.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = l.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                l.remove(&self.1);
            }
        }
    }
}

async fn read_request(sock: &mut UnixStream) -> io::Result<Request> {
    let mut head = [0u8; REQUEST_LEN];
    sock.read_exact(&mut head).await?;
    let mut name = vec![0u8; Request::name_len(&head)?];
    sock.read_exact(&mut name).await?;
    Ok(Request::decode(&head, &name)?)
}

/// Resolves once the process has closed `sock` (or sent what it may not: a listening or waiting
/// socket carries nothing from the process).
async fn gone(sock: &UnixStream) {
    let mut b = [0u8; 1];
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        match sock.try_read(&mut b) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            _ => return,
        }
    }
}

/// Whether the process closed its whole socket (not just its sending side): the kernel reports
/// both directions shut.
fn hung_up(sock: impl AsFd) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec};
    let mut fds = [PollFd::new(&sock, PollFlags::IN)];
    let zero = Timespec { tv_sec: 0, tv_nsec: 0 };
    matches!(rustix::event::poll(&mut fds, Some(&zero)), Ok(n) if n > 0)
        && fds[0].revents().contains(PollFlags::HUP)
}

/// How a connection's end reads to the process, and the reason it carries.
fn end_of(e: &io::Error) -> (End, String) {
    if let Some(reset) = dombus_transport_xen::vsock::transport_reset(e) {
        return (End::TransportReset, reset.why.clone());
    }
    let kind = match e.kind() {
        io::ErrorKind::ConnectionReset => End::Reset,
        _ => End::Failed,
    };
    (kind, e.to_string())
}

/// Moves one connection's bytes between the process's socket and the virtual socket until both
/// directions end, the process leaves, or the agent stops.
async fn proxy(sock: UnixStream, stream: VsockStream, mut stop: watch::Receiver<bool>, _slot: LocalSlot) {
    // The same socket, to see whether a process that half-closed has since gone: its reading
    // half is taken by `up` by then.
    let Ok(watched) = sock.as_fd().try_clone_to_owned() else { return };
    let (mut from_proc, mut to_proc) = sock.into_split();
    let (mut from_peer, mut to_peer) = tokio::io::split(stream);
    // Process → peer. Ends when the process stops sending: with `Ok(true)` if it closed its
    // whole socket (the connection ends), `Ok(false)` after a half close.
    let up = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from_proc.read(&mut buf).await?;
            if n == 0 {
                let whole = hung_up(from_proc.as_ref());
                if !whole {
                    to_peer.shutdown().await?;
                }
                return Ok::<bool, io::Error>(whole);
            }
            to_peer.write_all(&buf[..n]).await?;
        }
    };
    // Peer → process, framed. Ends with the end frame sent.
    let down = async {
        let mut buf = vec![0u8; DATA_HEADER + CHUNK];
        loop {
            match from_peer.read(&mut buf[DATA_HEADER..]).await {
                Ok(0) => {
                    to_proc.write_all(&proto::end_frame(End::Eof, "")).await?;
                    // Keep the socket open: the process may go on sending.
                    return Ok::<bool, io::Error>(false);
                }
                Ok(n) => {
                    buf[..DATA_HEADER].copy_from_slice(&proto::data_header(n));
                    to_proc.write_all(&buf[..DATA_HEADER + n]).await?;
                }
                Err(e) => {
                    let (kind, reason) = end_of(&e);
                    to_proc.write_all(&proto::end_frame(kind, &reason)).await?;
                    return Ok(true);
                }
            }
        }
    };
    // Ends with whether the agent is stopping (the futures, and their borrows, are gone then).
    let stopping = async {
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        // After a half close nothing reads the process's socket; once a second it is checked
        // for a whole close, so that the connection of a process that half-closed and then
        // exited ends even if the peer never closes.
        let mut check = tokio::time::interval(HANG_UP_CHECK);
        while !(up_done && down_done) {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    // The process left.
                    Ok(true) => return false,
                    // A half close, or the connection cannot carry the process's bytes any
                    // more (the peer's side then ends `down` with the reason).
                    Ok(false) | Err(_) => up_done = true,
                },
                r = &mut down, if !down_done => match r {
                    Ok(true) | Err(_) => return false,
                    Ok(false) => down_done = true,
                },
                _ = check.tick(), if up_done && !down_done => {
                    if hung_up(&watched) {
                        return false;
                    }
                }
                _ = stop.changed() => return true,
            }
        }
        false
    }
    .await;
    if stopping {
        let _ =
            to_proc.write_all(&proto::end_frame(End::AgentStopping, "the domain agent is stopping")).await;
    }
}

/// The service name a listening process gave its port, for as long as it listens.
struct PortName(Arc<dyn DomainSockets>, u32);

impl PortName {
    fn new(domain: Arc<dyn DomainSockets>, port: u32, name: &str) -> PortName {
        domain.name_port(port, Some(name));
        PortName(domain, port)
    }
}

impl Drop for PortName {
    fn drop(&mut self) {
        self.0.name_port(self.1, None);
    }
}
