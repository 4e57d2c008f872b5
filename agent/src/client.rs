//! A process's side: finds its domain's agent and opens, accepts and inspects virtual sockets
//! through it ([`crate::proto`] is the protocol).

use std::io;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use dombus_transport_xen::DomId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::UnixStream;

use crate::fdpass;
use crate::proto::{
    ACCEPTED_LEN, Accepted, AgentStatus, BUFFER_UNIT, End, Frame, MAX_FRAME, Op, REPLY_LEN, Reply, Request,
    Target,
};

/// The environment variable naming the agent's socket.
pub const AGENT_ENV: &str = "DOMBUS_AGENT";

/// Where a process finds its domain's agent when told nothing: `$DOMBUS_AGENT`; else, for root,
/// `/run/dombus/agent.sock`; else `$XDG_RUNTIME_DIR/dombus/agent.sock`; else
/// `/tmp/dombus-<uid>/agent.sock`.
pub fn default_socket() -> PathBuf {
    if let Some(p) = std::env::var_os(AGENT_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let uid = rustix::process::geteuid().as_raw();
    if uid == 0 {
        return PathBuf::from("/run/dombus/agent.sock");
    }
    if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR").filter(|p| !p.is_empty()) {
        return PathBuf::from(run).join("dombus/agent.sock");
    }
    std::env::temp_dir().join(format!("dombus-{uid}/agent.sock"))
}

/// A domain's agent, as a process of the domain reaches it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AgentClient {
    socket: Arc<PathBuf>,
    /// The receive buffer asked for each connection, in [`BUFFER_UNIT`]s (0: the default).
    recv_buffer: u8,
}

impl AgentClient {
    /// The agent at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> AgentClient {
        AgentClient { socket: Arc::new(socket.into()), recv_buffer: 0 }
    }

    /// Asks the agent to give every connection this client makes or accepts a receive buffer of
    /// `bytes` (rounded up to 64 KiB), as `SO_VM_SOCKETS_BUFFER_SIZE` does for a virtual socket:
    /// the peer may then have that much in flight, which a bulk stream needs to keep a fast link
    /// busy. `InvalidInput` past what a request carries (255 × 64 KiB). A connect then fails with
    /// the agent's reason if its domain cannot give that much: `InvalidInput` below the default
    /// or above the maximum (1 MiB unless configured), `Other` when the link's receive budget
    /// has no room left; a connection accepted for a listener keeps the default instead (the
    /// agent logs why).
    pub fn with_recv_buffer(mut self, bytes: u32) -> io::Result<AgentClient> {
        let units = bytes.div_ceil(BUFFER_UNIT);
        self.recv_buffer = u8::try_from(units).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a receive buffer of {bytes} bytes is more than the agent protocol carries ({} bytes)",
                    u32::from(u8::MAX) * BUFFER_UNIT
                ),
            )
        })?;
        Ok(self)
    }

    /// The agent at [`default_socket`].
    pub fn from_env() -> AgentClient {
        AgentClient::new(default_socket())
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends `request` on a new connection to the agent and reads the reply.
    async fn request(&self, request: &Request) -> io::Result<(UnixStream, Reply)> {
        let mut sock = UnixStream::connect(&*self.socket).await.map_err(|e| self.unreachable(e))?;
        sock.write_all(&request.encode()).await.map_err(|e| self.lost(e))?;
        let reply = read_reply(&mut sock).await.map_err(|e| self.lost(e))?.into_result()?;
        Ok((sock, reply))
    }

    fn unreachable(&self, e: io::Error) -> io::Error {
        let why = match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => "no domain agent runs there",
            io::ErrorKind::PermissionDenied => "this user may not use it (its socket's permissions)",
            _ => "cannot reach it",
        };
        io::Error::new(
            e.kind(),
            format!(
                "domain agent at {}: {why} ({e}); start dombusd, or name the agent's socket with --agent or ${AGENT_ENV}",
                self.socket.display()
            ),
        )
    }

    fn lost(&self, e: io::Error) -> io::Error {
        let kind = if e.kind() == io::ErrorKind::UnexpectedEof {
            io::ErrorKind::ConnectionAborted
        } else {
            e.kind()
        };
        io::Error::new(kind, format!("domain agent at {} went away: {e}", self.socket.display()))
    }

    /// Connects to `port` of `target` through the agent, waiting up to `wait` for the listener
    /// to be announced (cut to whole milliseconds, at most 49 days).
    pub async fn connect(
        &self,
        target: Target,
        port: u32,
        wait: Option<Duration>,
    ) -> io::Result<AgentStream> {
        let wait_ms = wait.map_or(0, |w| u32::try_from(w.as_millis().max(1)).unwrap_or(u32::MAX));
        let (sock, reply) = self
            .request(&Request { op: Op::Connect, target, port, wait_ms, recv_buffer: self.recv_buffer })
            .await?;
        Ok(AgentStream::new(sock, self.socket.clone(), reply.domain, reply.local_port, port))
    }

    /// Listens on `port` of this domain through the agent, until the listener is dropped.
    pub async fn listen(&self, port: u32) -> io::Result<AgentListener> {
        self.listen_as(port, None).await
    }

    /// Like [`AgentClient::listen`], saying that the port serves the service `name` while the
    /// listener lives (rules of the host's connection manager may name it).
    pub async fn listen_as(&self, port: u32, name: Option<&str>) -> io::Result<AgentListener> {
        let target = name.map_or(Target::Cid(0), |n| Target::Name(n.to_string()));
        let listen = Request { op: Op::Listen, target, port, wait_ms: 0, recv_buffer: self.recv_buffer };
        let (sock, reply) = self.request(&listen).await?;
        let domain = u16::try_from(reply.domain).map(DomId).unwrap_or(DomId::INVALID);
        Ok(AgentListener { sock, port, domain, agent: self.socket.clone() })
    }

    /// What the agent holds.
    pub async fn status(&self) -> io::Result<AgentStatus> {
        let (_, reply) = self
            .request(&Request { op: Op::Status, target: Target::Cid(0), port: 0, wait_ms: 0, recv_buffer: 0 })
            .await?;
        Ok(AgentStatus::decode(reply.domain, &reply.body)?)
    }

    /// Whether an agent answers at the socket (a blocking check, for tools).
    pub fn is_up(&self) -> bool {
        StdUnixStream::connect(&*self.socket).is_ok()
    }
}

async fn read_reply(sock: &mut UnixStream) -> io::Result<Reply> {
    let mut head = [0u8; REPLY_LEN];
    sock.read_exact(&mut head).await?;
    let mut body = vec![0u8; Reply::body_len(&head)?];
    sock.read_exact(&mut body).await?;
    Ok(Reply::decode(&head, body)?)
}

/// A listening port of this domain, held through the agent.
#[derive(Debug)]
pub struct AgentListener {
    sock: UnixStream,
    port: u32,
    domain: DomId,
    agent: Arc<PathBuf>,
}

impl AgentListener {
    /// The next connection.
    pub async fn accept(&mut self) -> io::Result<AgentStream> {
        let agent_gone = || {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!(
                    "domain agent at {} closed the listener on port {} (the agent stopped, or the domain is gone)",
                    self.agent.display(),
                    self.port
                ),
            )
        };
        let (record, fd) = fdpass::recv::<ACCEPTED_LEN>(&self.sock).await?.ok_or_else(agent_gone)?;
        let a = Accepted::decode(&record)?;
        let std = StdUnixStream::from(fd);
        std.set_nonblocking(true)?;
        let sock = UnixStream::from_std(std)?;
        Ok(AgentStream::new(sock, self.agent.clone(), u32::from(a.peer_domain.0), a.local_port, a.peer_port))
    }

    /// The port.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// This domain's id, as the agent reported it.
    pub fn domain(&self) -> DomId {
        self.domain
    }
}

/// A virtual-socket connection through the agent.
///
/// Reads take the agent's frames apart; writes go to the agent as they are. A connection that
/// ends says how: `Ok(0)` after the peer finished sending; an error of kind `ConnectionReset`
/// when the peer reset it; `ConnectionAborted` with a
/// [`TransportReset`](dombus_transport_xen::vsock::TransportReset)
/// inside when the link was lost (its domain or ours died or migrated), or when the agent
/// stopped or went away.
pub struct AgentStream {
    sock: UnixStream,
    agent: Arc<PathBuf>,
    peer_domain: u32,
    local_port: u32,
    peer_port: u32,
    /// Bytes read from the agent and not yet taken apart or handed out.
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// Bytes of the current data frame not yet handed out.
    data_left: usize,
    ended: Option<(End, String)>,
}

impl std::fmt::Debug for AgentStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentStream")
            .field("peer_domain", &self.peer_domain)
            .field("local_port", &self.local_port)
            .field("peer_port", &self.peer_port)
            .finish()
    }
}

/// Room for the largest frame (data, or an end frame with the longest reason).
const BUF: usize = 4 + MAX_FRAME;

impl AgentStream {
    fn new(
        sock: UnixStream,
        agent: Arc<PathBuf>,
        peer_domain: u32,
        local_port: u32,
        peer_port: u32,
    ) -> AgentStream {
        AgentStream {
            sock,
            agent,
            peer_domain,
            local_port,
            peer_port,
            buf: vec![0u8; 16 << 10].into_boxed_slice(),
            start: 0,
            end: 0,
            data_left: 0,
            ended: None,
        }
    }

    /// The domain at the other end, as the link's set-up established it.
    pub fn peer_domain(&self) -> DomId {
        u16::try_from(self.peer_domain).map(DomId).unwrap_or(DomId::INVALID)
    }

    /// (local port, peer port).
    pub fn ports(&self) -> (u32, u32) {
        (self.local_port, self.peer_port)
    }

    fn ended_error(&self, kind: End, reason: &str) -> io::Error {
        match kind {
            End::Eof => io::Error::new(io::ErrorKind::UnexpectedEof, "connection finished"),
            End::Reset => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("connection reset by the peer: {reason}"),
            ),
            End::TransportReset => crate::transport_reset(self.peer_domain(), reason),
            End::AgentStopping => io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("domain agent at {} stopped: {reason}", self.agent.display()),
            ),
            End::Failed => io::Error::other(reason.to_string()),
        }
    }

    /// Takes frame headers apart until data is at hand (`true`), the stream ended, or more bytes
    /// are needed (`false`).
    fn parse(&mut self) -> io::Result<bool> {
        while self.ended.is_none() {
            if self.data_left > 0 {
                return Ok(self.start < self.end);
            }
            match crate::proto::parse_frame(&self.buf[self.start..self.end])? {
                None => return Ok(false),
                Some((Frame::Data(d), n)) => {
                    self.data_left = d.len();
                    self.start += n - d.len();
                }
                Some((Frame::End(kind, reason), n)) => {
                    self.start += n;
                    self.ended = Some((kind, reason));
                }
            }
        }
        Ok(false)
    }

    /// Makes room after `end` for more bytes: moves what is unread to the front, and grows the
    /// buffer (up to the largest frame) if a frame needs more.
    fn make_room(&mut self) {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() && self.buf.len() < BUF + 7 + crate::proto::MAX_TEXT {
            let mut bigger = vec![0u8; BUF + 7 + crate::proto::MAX_TEXT].into_boxed_slice();
            bigger[..self.end].copy_from_slice(&self.buf[..self.end]);
            self.buf = bigger;
        }
    }
}

impl AsyncRead for AgentStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.parse()? {
                let n = this.data_left.min(this.end - this.start).min(out.remaining());
                out.put_slice(&this.buf[this.start..this.start + n]);
                this.start += n;
                this.data_left -= n;
                return Poll::Ready(Ok(()));
            }
            if let Some((kind, reason)) = &this.ended {
                return Poll::Ready(match kind {
                    End::Eof => Ok(()),
                    k => Err(this.ended_error(*k, reason)),
                });
            }
            this.make_room();
            let mut rb = ReadBuf::new(&mut this.buf[this.end..]);
            ready!(Pin::new(&mut this.sock).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    format!(
                        "domain agent at {} went away: the connection ended without its end frame (the agent exited)",
                        this.agent.display()
                    ),
                )));
            }
            this.end += n;
        }
    }
}

impl AsyncWrite for AgentStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some((kind, reason)) = &this.ended {
            if *kind != End::Eof {
                return Poll::Ready(Err(this.ended_error(*kind, reason)));
            }
        }
        Pin::new(&mut this.sock).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().sock).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().sock).poll_shutdown(cx)
    }
}
