//! The tokio shell of a [`Session`]: connections as async byte streams over one [`Link`].
//!
//! [`Mux::spawn`] takes an established link and runs two tasks: a reader that takes packets off
//! the link into the session, and a writer that puts the session's packets on it. Applications
//! [`Mux::listen`] on ports and [`Mux::connect`] to the peer's ports; each connection is a
//! [`VsockStream`] (`AsyncRead` + `AsyncWrite`). Session events wake exactly the tasks of the
//! connections they name.
//!
//! When the link is gone — the peer's domain (or ours) died or was migrated, or the peer let the
//! link go — every connection, listener and pending connect of the multiplexer fails with a
//! [`TransportReset`] (see [`super::reset`]); the link's owner ends a link whose pages it knows
//! are dead (its own domain migrated) with [`Mux::reset`].
//!
//! Which ports a domain may listen on, and how links between domains are set up and shared, is
//! the business of the layer above ([`VsockDomain`](super::domain::VsockDomain)).

use crate::types::DomId;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::Notify;

use super::packet::{HEADER_LEN, Header};
use super::reset::TransportReset;
use super::session::{
    CloseReason, ConnId, Event, OWN_BUFFER, Read, Session, SessionConfig, SessionError, SessionStats,
    Violation,
};
use crate::backend::Backend;
use crate::link::Link;

/// First port [`Mux::connect`] picks for the local end of a connection.
pub const FIRST_EPHEMERAL_PORT: u32 = 49152;
/// Most bytes the writer task takes from the session per write to the link.
const WRITE_BATCH: usize = 256 << 10;
/// Payloads at least this long are written to the link straight from the session's buffer
/// instead of being copied into the batch first.
const DIRECT_PAYLOAD: usize = 4 << 10;

/// Why the whole multiplexer stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MuxError {
    /// The peer broke the session protocol; the link was closed.
    #[error("peer broke the virtual-socket protocol: {0}")]
    Violation(Violation),
    /// The peer broke the link's (ring) protocol; the link was closed.
    #[error("peer broke the link protocol: {0}")]
    LinkViolation(String),
    /// The link is gone: the peer's domain or ours died or was migrated, the peer closed the
    /// link, or [`Mux::reset`] ended it. Connections fail with a [`TransportReset`].
    #[error("link to the peer lost: {0}")]
    LinkLost(String),
    /// Every handle to the multiplexer was dropped.
    #[error("closed locally")]
    Closed,
}

#[derive(Default)]
struct Waiters {
    read: Option<Waker>,
    write: Option<Waker>,
    connected: Option<Result<(), CloseReason>>,
}

#[derive(Default)]
struct Listening {
    /// Which `MuxListener` this is (a port may be listened on again after a close).
    id: u64,
    ready: VecDeque<ConnId>,
    waker: Option<Waker>,
}

struct State {
    session: Session,
    waiters: HashMap<ConnId, Waiters>,
    listeners: HashMap<u32, Listening>,
    stopped: Option<MuxError>,
    next_port: u32,
    next_listener: u64,
    /// The writer task holds packets it took from the session and has not finished writing:
    /// a connection's own task must not write past them.
    writing: bool,
    /// A data packet whose header the reader task has read and whose payload waits on the
    /// link for its connection's reader to copy it straight into its own buffer.
    handoff: Option<Handoff>,
}

/// A data packet offered to its connection's reader ([`offer_to_reader`]).
#[derive(Clone, Copy)]
struct Handoff {
    header: Header,
    /// Bytes of the payload the reader has taken.
    taken: usize,
}

struct Shared {
    /// The domain at the other end of the link.
    peer: DomId,
    state: Mutex<State>,
    transmit: Notify,
    /// The writer task put packets on the link: a reader waiting for the session's answers to
    /// drain ([`Session::wants_input`]) looks again.
    drained: Notify,
    /// The reader task waits for the answers it queued to drain before it reads on.
    reading_paused: std::sync::atomic::AtomicBool,
    /// Tells the reader task to stop (the last handle was dropped).
    closing: Notify,
    /// The link as the connections' own tasks use it ([`VsockStream`]'s `poll_write` and
    /// `poll_read`).
    direct: Box<dyn DirectLink>,
}

/// The link, reached from a connection's own task: [`Link::try_write_all`] and
/// [`Link::try_read`], never waiting. Only ever tries the link's lock: a connection's task
/// never waits for the reader task's poll (which may spin for data). `None` if the link is
/// busy (a task of this multiplexer is in one of its polls) or gone.
trait DirectLink: Send + Sync {
    fn try_write_all(&self, parts: &[&[u8]]) -> Option<io::Result<bool>>;
    fn try_read(&self, buf: &mut [u8]) -> Option<io::Result<usize>>;
}

impl<B: Backend + Clone> DirectLink for std::sync::Weak<Mutex<Link<B>>> {
    fn try_write_all(&self, parts: &[&[u8]]) -> Option<io::Result<bool>> {
        let link = self.upgrade()?;
        let mut link = link.try_lock().ok()?;
        Some(link.try_write_all(parts))
    }

    fn try_read(&self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        let link = self.upgrade()?;
        let mut link = link.try_lock().ok()?;
        Some(link.try_read(buf))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes one packet to the link from the calling task if the link takes all of it now
    /// (the session's direct-write callbacks); a link failure goes to `failed`.
    fn write_now(&self, header: &[u8], payload: &[u8], failed: &mut Option<io::Error>) -> bool {
        match self.direct.try_write_all(&[header, payload]) {
            Some(Ok(written)) => written,
            Some(Err(e)) => {
                *failed = Some(e);
                false
            }
            None => false,
        }
    }

    /// Puts the packets the session queued on the link from the calling task, as far as the
    /// link takes them now, unless the writer task holds packets it took before them. True if
    /// the writer task is to be woken: packets are left for it, or the multiplexer stopped
    /// (it then ends).
    ///
    /// A connection's read that frees credit queues a `CREDIT_UPDATE`: written here, it costs
    /// no wake-up of the writer task, once per quarter of the receive buffer a stream reads.
    fn transmit_direct(&self, st: &mut State) -> bool {
        if st.stopped.is_some() {
            return true;
        }
        if st.writing || !st.session.has_transmit() {
            return st.session.has_transmit();
        }
        let mut failed = None;
        let sent = st.session.transmit_direct(|header, payload| self.write_now(header, payload, &mut failed));
        if let Some(e) = failed {
            st.stop(link_failed(&e));
            return true;
        }
        if sent > 0 {
            // As after the writer task's batch: senders waiting for room, and a reader task
            // waiting for the answers to drain, look again.
            st.dispatch();
            if self.reading_paused.load(std::sync::atomic::Ordering::Relaxed) {
                self.drained.notify_one();
            }
        }
        st.session.has_transmit()
    }

    /// [`Shared::transmit_direct`], then lets go of the state and wakes the writer task for
    /// what is left.
    fn send_queued(&self, mut st: MutexGuard<'_, State>) {
        let left = self.transmit_direct(&mut st);
        drop(st);
        if left {
            self.transmit.notify_one();
        }
    }
}

fn wake(slot: &mut Option<Waker>) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

impl State {
    /// After a packet from the peer: wakes the connections it changed; true if it queued
    /// packets for the writer task.
    fn after_packet(&mut self) -> bool {
        self.dispatch();
        self.session.has_transmit()
    }

    /// Turns session events into wake-ups of the connections they name.
    fn dispatch(&mut self) {
        while let Some(event) = self.session.poll_event() {
            match event {
                Event::Requested(id) => match self.listeners.get_mut(&id.local) {
                    Some(l) if self.session.accept(id).is_ok() => {
                        self.waiters.entry(id).or_default();
                        l.ready.push_back(id);
                        wake(&mut l.waker);
                    }
                    _ => {
                        let _ = self.session.refuse(id);
                    }
                },
                Event::Connected(id) => {
                    if let Some(w) = self.waiters.get_mut(&id) {
                        w.connected = Some(Ok(()));
                        wake(&mut w.write);
                    }
                }
                Event::Readable(id) => {
                    if let Some(w) = self.waiters.get_mut(&id) {
                        wake(&mut w.read);
                    }
                }
                Event::Writable(id) => {
                    if let Some(w) = self.waiters.get_mut(&id) {
                        wake(&mut w.write);
                    }
                }
                Event::Closed(id, reason) => {
                    if let Some(w) = self.waiters.get_mut(&id) {
                        w.connected.get_or_insert(Err(reason));
                        wake(&mut w.read);
                        wake(&mut w.write);
                    }
                }
            }
        }
    }

    fn add_listener(&mut self, mux: &Mux, port: u32) -> MuxListener {
        let id = self.next_listener;
        self.next_listener += 1;
        self.listeners.insert(port, Listening { id, ready: VecDeque::new(), waker: None });
        MuxListener { mux: mux.clone(), port, id }
    }

    /// Removes listener `id` from `port` (if it is still the one there): connections waiting
    /// to be accepted are closed, a pending `accept` fails.
    fn remove_listener(&mut self, port: u32, id: u64) {
        if self.listeners.get(&port).is_none_or(|l| l.id != id) {
            return;
        }
        if let Some(mut l) = self.listeners.remove(&port) {
            for conn in l.ready.drain(..) {
                self.session.close(conn);
                self.waiters.remove(&conn);
            }
            wake(&mut l.waker);
        }
    }

    fn stop(&mut self, why: MuxError) {
        if self.stopped.is_none() {
            match &why {
                MuxError::Violation(_) | MuxError::LinkViolation(_) => {
                    tracing::warn!(error = %why, "virtual-socket link stopped")
                }
                MuxError::LinkLost(_) => tracing::info!(error = %why, "virtual-socket link stopped"),
                MuxError::Closed => tracing::debug!(error = %why, "virtual-socket link stopped"),
            }
            self.stopped = Some(why);
        }
        self.session.peer_gone();
        self.dispatch();
        for l in self.listeners.values_mut() {
            wake(&mut l.waker);
        }
    }
}

/// The connections over one link. Cheap to clone; when the last clone, listener and stream are
/// dropped, the link is closed.
#[derive(Clone)]
pub struct Mux {
    shared: Arc<Shared>,
    _owner: Arc<Owner>,
}

/// Stops the tasks when the last handle goes.
struct Owner(Arc<Shared>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.lock().stop(MuxError::Closed);
        self.0.closing.notify_one();
        self.0.transmit.notify_one();
    }
}

impl std::fmt::Debug for Mux {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.shared.lock();
        f.debug_struct("Mux").field("connections", &st.session.len()).field("stopped", &st.stopped).finish()
    }
}

impl Mux {
    /// Runs the session over `link` (on the current tokio runtime) until the link fails or the
    /// peer breaks the protocol.
    pub fn spawn<B: Backend + Clone>(link: Link<B>, config: SessionConfig) -> Mux {
        Mux::spawn_listening(link, config, &[]).0
    }

    /// Like [`Mux::spawn`], with listeners on `ports` in place before the first packet is read
    /// (so that a `REQUEST` racing the set-up is never refused).
    pub fn spawn_listening<B: Backend + Clone>(
        link: Link<B>,
        config: SessionConfig,
        ports: &[u32],
    ) -> (Mux, Vec<MuxListener>) {
        let peer = link.peer();
        let link = Arc::new(Mutex::new(link));
        let shared = Arc::new(Shared {
            peer,
            state: Mutex::new(State {
                session: Session::new(config),
                waiters: HashMap::new(),
                listeners: HashMap::new(),
                stopped: None,
                next_port: FIRST_EPHEMERAL_PORT,
                next_listener: 0,
                writing: false,
                handoff: None,
            }),
            transmit: Notify::new(),
            drained: Notify::new(),
            reading_paused: std::sync::atomic::AtomicBool::new(false),
            closing: Notify::new(),
            direct: Box::new(Arc::downgrade(&link)),
        });
        let mux = Mux { _owner: Arc::new(Owner(shared.clone())), shared: shared.clone() };
        let listeners = {
            let mut st = shared.lock();
            ports.iter().map(|&port| st.add_listener(&mux, port)).collect()
        };
        tokio::spawn(read_packets(shared.clone(), SharedLink(link.clone())));
        tokio::spawn(write_packets(shared, SharedLink(link)));
        (mux, listeners)
    }

    /// Why the multiplexer stopped, if it did.
    pub fn stopped(&self) -> Option<MuxError> {
        self.shared.lock().stopped.clone()
    }

    /// Ends the link now as lost ([`MuxError::LinkLost`] with `why`): every connection,
    /// listener and pending connect fails with a [`TransportReset`], and the tasks let the link
    /// go. For the link's owner when it knows the link is dead though the rings do not say so
    /// yet: its own domain was migrated or died (Xen moves no grants, so the pages and event
    /// channel of every link are gone). No effect on a multiplexer that stopped already.
    pub fn reset(&self, why: impl Into<String>) {
        self.shared.lock().stop(MuxError::LinkLost(why.into()));
        self.shared.closing.notify_one();
        self.shared.transmit.notify_one();
    }

    /// Resets every connection whose ports `which` selects (our port, the peer's port): each
    /// fails with `ConnectionReset` on our side and is reset at the peer. How many there were.
    pub fn reset_connections(&self, which: impl Fn(ConnId) -> bool) -> usize {
        let mut st = self.shared.lock();
        let ids: Vec<ConnId> = st.session.connections().into_iter().filter(|&id| which(id)).collect();
        for &id in &ids {
            st.session.reset(id);
        }
        st.dispatch();
        drop(st);
        self.shared.transmit.notify_one();
        ids.len()
    }

    /// The domain at the other end of the link.
    pub fn peer(&self) -> DomId {
        self.shared.peer
    }

    /// Number of connections (any state).
    pub fn connections(&self) -> usize {
        self.shared.lock().session.len()
    }

    /// What the link's session holds and refused, and whether the reader is holding back
    /// because the peer does not take the answers it asked for.
    pub fn stats(&self) -> MuxStats {
        let session = self.shared.lock().session.stats();
        MuxStats {
            session,
            reading_paused: self.shared.reading_paused.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Accepts connections to our `port` from the peer.
    pub fn listen(&self, port: u32) -> io::Result<MuxListener> {
        let mut st = self.shared.lock();
        if st.listeners.contains_key(&port) {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("port {port} already has a listener"),
            ));
        }
        Ok(st.add_listener(self, port))
    }

    /// Connects to the peer's `port` from a free local port. Fails with `ConnectionRefused` if
    /// nothing listens there.
    pub async fn connect(&self, port: u32) -> io::Result<VsockStream> {
        let id = {
            let mut st = self.shared.lock();
            if let Some(e) = &st.stopped {
                return Err(stopped_io(self.shared.peer, e));
            }
            let id = loop {
                let candidate = ConnId { local: st.next_port, peer: port };
                st.next_port = st.next_port.checked_add(1).unwrap_or(FIRST_EPHEMERAL_PORT);
                if !st.waiters.contains_key(&candidate) {
                    break candidate;
                }
            };
            st.session.connect(id).map_err(session_io)?;
            st.waiters.insert(id, Waiters::default());
            self.shared.send_queued(st);
            id
        };
        let stream = VsockStream { mux: self.clone(), id };
        std::future::poll_fn(|cx| {
            let mut st = self.shared.lock();
            let Some(w) = st.waiters.get_mut(&id) else {
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::NotConnected, "connection vanished")));
            };
            match w.connected {
                Some(Ok(())) => Poll::Ready(Ok(())),
                Some(Err(CloseReason::Refused)) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("nothing listens on port {port} of the peer"),
                ))),
                Some(Err(r)) => Poll::Ready(Err(st.closed_io(self.shared.peer, r))),
                None => {
                    w.write = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await?;
        Ok(stream)
    }
}

/// Counters of one link's multiplexer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MuxStats {
    /// The session's counters (queued bytes and control packets, refusals, coalesced answers).
    pub session: SessionStats,
    /// The reader is not reading the link until the answers already queued for the peer drain.
    pub reading_paused: bool,
}

/// Connections accepted on one port. Dropping it stops accepting (pending ones are reset).
pub struct MuxListener {
    mux: Mux,
    port: u32,
    id: u64,
}

/// Closes a [`MuxListener`] from elsewhere (the task that owns it may be stopped only later):
/// once [`ListenerCloser::close`] returns, the port is free again. Does not keep the link open.
#[derive(Clone)]
pub struct ListenerCloser {
    shared: std::sync::Weak<Shared>,
    port: u32,
    id: u64,
}

impl ListenerCloser {
    /// Stops the listener now.
    pub fn close(&self) {
        if let Some(shared) = self.shared.upgrade() {
            shared.lock().remove_listener(self.port, self.id);
            shared.transmit.notify_one();
        }
    }
}

impl std::fmt::Debug for ListenerCloser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerCloser").field("port", &self.port).field("id", &self.id).finish()
    }
}

impl MuxListener {
    /// The next connection to this port.
    pub async fn accept(&self) -> io::Result<VsockStream> {
        let id = std::future::poll_fn(|cx| {
            let mut st = self.mux.shared.lock();
            if let Some(e) = &st.stopped {
                return Poll::Ready(Err(stopped_io(self.mux.shared.peer, e)));
            }
            let Some(l) = st.listeners.get_mut(&self.port).filter(|l| l.id == self.id) else {
                return Poll::Ready(Err(io::Error::other("listener removed")));
            };
            match l.ready.pop_front() {
                Some(id) => Poll::Ready(Ok(id)),
                None => {
                    l.waker = Some(cx.waker().clone());
                    Poll::Pending
                }
            }
        })
        .await?;
        Ok(VsockStream { mux: self.mux.clone(), id })
    }
}

impl MuxListener {
    /// A handle that can close this listener without owning it.
    pub fn closer(&self) -> ListenerCloser {
        ListenerCloser { shared: Arc::downgrade(&self.mux.shared), port: self.port, id: self.id }
    }
}

impl Drop for MuxListener {
    fn drop(&mut self) {
        self.mux.shared.lock().remove_listener(self.port, self.id);
        self.mux.shared.transmit.notify_one();
    }
}

/// One connection: a byte stream to a port of the peer.
pub struct VsockStream {
    mux: Mux,
    id: ConnId,
}

impl std::fmt::Debug for VsockStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockStream")
            .field("local_port", &self.id.local)
            .field("peer_port", &self.id.peer)
            .finish()
    }
}

impl VsockStream {
    /// (local port, peer port).
    pub fn ports(&self) -> (u32, u32) {
        (self.id.local, self.id.peer)
    }

    /// The domain at the other end: established by the link's set-up through the store (the
    /// hypervisor's word, not the peer's), so a server may trust it to tell callers apart.
    pub fn peer_domain(&self) -> DomId {
        self.mux.shared.peer
    }

    /// Gives this connection a receive buffer of `bytes` (as `SO_VM_SOCKETS_BUFFER_SIZE` does a
    /// kernel socket's): the peer may have that much of it unread at once. A bulk stream wants
    /// about the link's ring size, so that its sender seldom waits for credit; the default
    /// ([`SessionConfig::buf_alloc`]) suits calls. It only grows, up to
    /// [`SessionConfig::max_buf_alloc`], within the link's receive budget
    /// ([`Session::set_buf_alloc`](crate::vsock::session::Session::set_buf_alloc)); otherwise
    /// an error and the buffer stays as it was.
    pub fn set_recv_buffer_size(&self, bytes: u32) -> io::Result<()> {
        let shared = &self.mux.shared;
        let mut st = shared.lock();
        if let Some(why) = &st.stopped {
            return Err(stopped_io(shared.peer, why));
        }
        let r = st.session.set_buf_alloc(self.id, bytes).map_err(|e| st.session_io(shared.peer, e));
        shared.send_queued(st);
        r
    }
}

/// The error of an operation on a stopped multiplexer: a [`TransportReset`] if the link is
/// gone, the [`MuxError`] itself otherwise (a violation, or closed locally).
fn stopped_io(peer: DomId, why: &MuxError) -> io::Error {
    match why {
        MuxError::LinkLost(why) => TransportReset { peer, why: why.clone() }.into(),
        MuxError::Violation(_) | MuxError::LinkViolation(_) => {
            io::Error::new(io::ErrorKind::ConnectionAborted, why.clone())
        }
        MuxError::Closed => io::Error::new(io::ErrorKind::NotConnected, why.clone()),
    }
}

impl State {
    /// The error of a connection that closed for `reason`: a link that went away reports why
    /// it went ([`stopped_io`]), anything else as [`closed_io`].
    fn closed_io(&self, peer: DomId, reason: CloseReason) -> io::Error {
        match (reason, &self.stopped) {
            (CloseReason::PeerGone, Some(why)) => stopped_io(peer, why),
            (reason, _) => closed_io(reason),
        }
    }

    /// [`session_io`], with a connection closed by the link's loss reported as
    /// [`State::closed_io`] does.
    fn session_io(&self, peer: DomId, e: SessionError) -> io::Error {
        match e {
            SessionError::Closed(_, reason) => self.closed_io(peer, reason),
            e => session_io(e),
        }
    }
}

fn closed_io(reason: CloseReason) -> io::Error {
    let kind = match reason {
        CloseReason::Refused => io::ErrorKind::ConnectionRefused,
        CloseReason::Reset => io::ErrorKind::ConnectionReset,
        CloseReason::Finished => io::ErrorKind::BrokenPipe,
        CloseReason::PeerGone => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, format!("connection closed: {reason:?}"))
}

fn session_io(e: SessionError) -> io::Error {
    match e {
        SessionError::Closed(_, r) => closed_io(r),
        SessionError::SendShut(_) => io::Error::new(io::ErrorKind::BrokenPipe, e),
        SessionError::InUse(_) => io::Error::new(io::ErrorKind::AddrInUse, e),
        SessionError::NotFound(_) | SessionError::NotConnected(_) => {
            io::Error::new(io::ErrorKind::NotConnected, e)
        }
        SessionError::BufferSize { .. } => io::Error::new(io::ErrorKind::InvalidInput, e),
        SessionError::TooManyConnections | SessionError::OverBudget { .. } => io::Error::other(e),
    }
}

impl VsockStream {
    /// Takes what is on the link of the payload the reader task offers this connection
    /// ([`State::handoff`]), copying it straight into `buf`. `None` if nothing is offered to
    /// us or the link has none of it now: then the reader task reads the rest. Else the poll's
    /// outcome, and whether the writer task has packets to take.
    fn read_direct(&self, st: &mut State, buf: &mut ReadBuf<'_>) -> Option<(Poll<io::Result<()>>, bool)> {
        let shared = &self.mux.shared;
        let Handoff { header, taken } = st.handoff?;
        if buf.remaining() == 0
            || st.stopped.is_some()
            || st.session.direct_receiver(&header) != Some(self.id)
        {
            return None;
        }
        let len = header.len as usize;
        let want = (len - taken).min(buf.remaining());
        let n = match shared.direct.try_read(buf.initialize_unfilled_to(want))? {
            Ok(0) => return None,
            Ok(n) => n.min(want),
            Err(e) => {
                st.handoff = None;
                let why = link_failed(&e);
                st.stop(why.clone());
                return Some((Poll::Ready(Err(stopped_io(shared.peer, &why))), true));
            }
        };
        buf.advance(n);
        if taken + n < len {
            st.handoff = Some(Handoff { header, taken: taken + n });
            return Some((Poll::Ready(Ok(())), false));
        }
        st.handoff = None;
        match st.session.handle_direct(&header, len, Vec::new()) {
            Ok(()) => Some((Poll::Ready(Ok(())), st.after_packet())),
            Err(v) => {
                let why = MuxError::Violation(v);
                st.stop(why.clone());
                Some((Poll::Ready(Err(stopped_io(shared.peer, &why))), true))
            }
        }
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = this.mux.shared.lock();
        if let Some((poll, answer)) = this.read_direct(&mut st, buf) {
            if answer {
                this.mux.shared.send_queued(st);
            }
            return poll;
        }
        // Only as much of the caller's buffer is zeroed as there is to read: a reader offering
        // 8 KiB of fresh room for a 40-byte message is not charged an 8 KiB memset.
        let room = st.session.buffered(this.id).clamp(1, buf.remaining().max(1)).min(buf.remaining());
        let result = st.session.recv(this.id, buf.initialize_unfilled_to(room));
        let answered = matches!(result, Ok(Read::Data(_))) && st.session.has_transmit();
        let poll = match result {
            Ok(Read::Data(n)) => {
                buf.advance(n);
                Poll::Ready(Ok(()))
            }
            Ok(Read::Eof) => Poll::Ready(Ok(())),
            Ok(Read::WouldBlock) => match &st.stopped {
                Some(e) => Poll::Ready(Err(stopped_io(this.mux.shared.peer, e))),
                None => {
                    if let Some(w) = st.waiters.get_mut(&this.id) {
                        w.read = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
            },
            Err(e) => Poll::Ready(Err(st.session_io(this.mux.shared.peer, e))),
        };
        // Reading may have queued a credit update: it goes to the link from here.
        if answered {
            this.mux.shared.send_queued(st);
        }
        poll
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let shared = &this.mux.shared;
        let mut st = shared.lock();
        // Nothing waits to go before this packet: write it to the link from this task, with no
        // copy into a packet buffer and no hand-off to the writer task. Under the state's lock,
        // so that the credit the packet announces is the latest on the link.
        if !st.writing && st.stopped.is_none() && !st.session.has_transmit() {
            let mut failed = None;
            let sent = st
                .session
                .send_direct(this.id, data, |header, payload| shared.write_now(header, payload, &mut failed));
            if let Some(e) = failed {
                let why = link_failed(&e);
                st.stop(why.clone());
                drop(st);
                shared.transmit.notify_one();
                return Poll::Ready(Err(stopped_io(shared.peer, &why)));
            }
            match sent {
                Ok(Some(n)) => return Poll::Ready(Ok(n)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(st.session_io(shared.peer, e))),
            }
        }
        match st.session.send(this.id, data) {
            Ok(0) if !data.is_empty() => {
                if let Some(w) = st.waiters.get_mut(&this.id) {
                    w.write = Some(cx.waker().clone());
                }
                Poll::Pending
            }
            Ok(n) => {
                drop(st);
                this.mux.shared.transmit.notify_one();
                Poll::Ready(Ok(n))
            }
            Err(e) => Poll::Ready(Err(st.session_io(this.mux.shared.peer, e))),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let mut st = this.mux.shared.lock();
        let r = st.session.shutdown_send(this.id).map_err(|e| st.session_io(this.mux.shared.peer, e));
        this.mux.shared.send_queued(st);
        Poll::Ready(r)
    }
}

impl Drop for VsockStream {
    fn drop(&mut self) {
        let mut st = self.mux.shared.lock();
        st.session.close(self.id);
        st.waiters.remove(&self.id);
        self.mux.shared.send_queued(st);
    }
}

/// Waits until the session wants input again (its queued answers drained below the bound).
/// False if the multiplexer is closing or stopped meanwhile.
///
/// Backpressure rather than closing the link: the queue fills only while the peer does not
/// read the answers it asked for, and a correct peer may be briefly slow to read (a busy guest);
/// not reading stalls only this link (the peer's own), keeps the session's memory at its bound,
/// and resumes by itself once the peer reads. A peer that never reads holds nothing but its own
/// link and the bounded queue.
async fn wait_for_room(shared: &Shared) -> bool {
    use std::sync::atomic::Ordering;
    loop {
        {
            let st = shared.lock();
            if st.stopped.is_some() {
                return false;
            }
            if st.session.wants_input() {
                shared.reading_paused.store(false, Ordering::Relaxed);
                return true;
            }
        }
        shared.reading_paused.store(true, Ordering::Relaxed);
        // The writer's `notify_one` leaves a permit if it ran between the check and this wait.
        tokio::select! {
            () = shared.drained.notified() => {}
            () = shared.closing.notified() => return false,
        }
    }
}

/// What the reader task reads packets from: the link, and what it knows of the link's
/// next read.
trait ReadSide: AsyncRead + Unpin {
    /// [`Link::spins`].
    fn spins(&self) -> bool;
    /// [`Link::has_input_seen`].
    fn has_input_seen(&self) -> bool;
}

impl<B: Backend + Clone> ReadSide for SharedLink<B> {
    fn spins(&self) -> bool {
        self.lock().spins()
    }

    fn has_input_seen(&self) -> bool {
        self.lock().has_input_seen()
    }
}

/// The link, shared by the reader task and the writer task (each polls it under the lock, as
/// `tokio::io::split` would) and, weakly, by the connections' direct writes: the link closes
/// once both tasks have ended.
struct SharedLink<B: Backend + Clone>(Arc<Mutex<Link<B>>>);

impl<B: Backend + Clone> SharedLink<B> {
    fn lock(&self) -> MutexGuard<'_, Link<B>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<B: Backend + Clone> AsyncRead for SharedLink<B> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_read(cx, buf)
    }
}

impl<B: Backend + Clone> AsyncWrite for SharedLink<B> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.lock()).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.lock()).poll_shutdown(cx)
    }
}

/// Why the link failed, from its read or write error: the peer broke the ring protocol
/// (`InvalidData`), or the link is gone (anything else: the peer's domain died, was migrated or
/// closed the link; end of stream).
fn link_failed(e: &io::Error) -> MuxError {
    match e.kind() {
        io::ErrorKind::InvalidData => MuxError::LinkViolation(e.to_string()),
        io::ErrorKind::UnexpectedEof => MuxError::LinkLost("the peer closed the link".into()),
        _ => MuxError::LinkLost(e.to_string()),
    }
}

/// Lets the tasks woken so far run before the calling task goes on: it wakes itself and
/// yields, so the runtime queues it behind them. Tasks those wake in turn may run after it.
///
/// Not `tokio::task::yield_now`, which holds the task back until no task is ready and the
/// runtime has polled its I/O driver: on a current-thread runtime that is an `epoll_wait`
/// system call per yield, and the reader task yields at least twice per packet (measured: 1.6x
/// the pipelined calls with wake-ups, docs/benchmarks.md). The runtime still polls its driver
/// after every `event_interval` (61) tasks it runs, so yielding this way cannot keep I/O
/// events or timers from being seen. Where the task is about to hold its thread (a spinning
/// read), it must wait for every ready task instead: `yield_now`.
async fn run_others() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Times the reader task lets other tasks run while a connection's reader takes the packet
/// offered to it.
const HANDOFF_YIELDS: usize = 4;

/// Offers a large data packet, whose header has been read and whose payload is still on the
/// link, to the reader its connection has waiting with an empty queue: that reader copies
/// what is on the link of the payload straight into its own buffer, one copy where reading it
/// here takes two. Returns the bytes of the payload the reader took (all, some or none); the
/// caller reads the rest itself: the reader's buffer was full, its task went on to other work,
/// or the rest was not on the link yet.
async fn offer_to_reader(shared: &Shared, h: &Header) -> usize {
    let reader = {
        let mut st = shared.lock();
        let Some(id) = st.session.direct_receiver(h) else { return 0 };
        let Some(reader) = st.waiters.get_mut(&id).and_then(|w| w.read.take()) else { return 0 };
        st.handoff = Some(Handoff { header: *h, taken: 0 });
        reader
    };
    reader.wake();
    // On a current-thread runtime the woken reader runs before this task's first yield ends.
    for _ in 0..HANDOFF_YIELDS {
        run_others().await;
        if shared.lock().handoff.is_none() {
            return h.len as usize;
        }
    }
    shared.lock().handoff.take().map_or(h.len as usize, |left| left.taken)
}

/// Takes packets off the link into the session until the link or the peer fails. Each header
/// is decoded once; a large payload is offered to its connection's waiting reader
/// ([`offer_to_reader`]), and what that reader does not take is read into a buffer of its own
/// that becomes part of the connection's receive queue; a small one is read into a buffer
/// reused for every packet.
async fn read_packets<R: ReadSide>(shared: Arc<Shared>, mut rd: R) {
    let spins = rd.spins();
    let mut header = [0u8; HEADER_LEN];
    let mut small = Vec::with_capacity(OWN_BUFFER);
    let why = loop {
        // Before each read, let the tasks woken so far run — after a packet, the reader of the
        // connection it was for, then the writer task it hands its answer to. With adaptive
        // polling a read that finds the ring empty spins on this thread, and would otherwise
        // spin for the very answer those tasks have to send (measured: 50 µs → 2 µs per
        // virtual-socket round trip), so before such a read each yield waits until no task is
        // ready at all (a chain of hand-offs, as in plain tarpc's server, runs to its end), the
        // first read included. With calls pipelined, keep yielding (boundedly) while our own
        // packets wait for the writer task: a read that spins while this side still has
        // something to send only delays the peer's answer. A read that cannot spin (no
        // adaptive polling, or bytes seen in the ring: the tasks that run meanwhile read
        // nothing from the link, an offered payload being taken before this) returns at once
        // or only registers for the next packet: the cheap yield serves.
        let may_spin = spins && !rd.has_input_seen();
        for i in 0..16 {
            if may_spin {
                tokio::task::yield_now().await;
            } else {
                run_others().await;
            }
            if i >= 1 && !shared.lock().session.has_transmit() {
                break;
            }
        }
        if !wait_for_room(&shared).await {
            break MuxError::Closed;
        }
        let read = tokio::select! {
            r = rd.read_exact(&mut header) => r,
            () = shared.closing.notified() => break MuxError::Closed,
        };
        if let Err(e) = read {
            break link_failed(&e);
        }
        // Validate before trusting the length for the payload read.
        let h = match Header::decode(&header) {
            Ok(h) => h,
            Err(e) => break MuxError::Violation(Violation::Packet(e)),
        };
        let len = h.len as usize;
        let handled = if len >= OWN_BUFFER {
            let taken = offer_to_reader(&shared, &h).await;
            if taken == len {
                // The connection's reader took it all, and handled the packet.
                Ok(false)
            } else {
                let mut payload = shared.lock().session.payload_buffer(len - taken);
                // A reused buffer is overwritten as it is: only room it never had is zeroed.
                payload.resize(len - taken, 0);
                if let Err(e) = rd.read_exact(&mut payload).await {
                    break link_failed(&e);
                }
                let mut st = shared.lock();
                let handled = if taken == 0 {
                    st.session.handle_owned(&h, payload)
                } else {
                    st.session.handle_direct(&h, taken, payload)
                };
                handled.map(|()| st.after_packet())
            }
        } else {
            small.resize(len, 0);
            if let Err(e) = rd.read_exact(&mut small).await {
                break link_failed(&e);
            }
            let mut st = shared.lock();
            st.session.handle_parts(&h, &small).map(|()| st.after_packet())
        };
        match handled {
            // The packet asked for an answer (a credit update, an RST, a RESPONSE): it goes to
            // the link from here, or to the writer task if the link has no room for it now.
            // What the woken connections send they write or queue themselves.
            Ok(true) => shared.send_queued(shared.lock()),
            Ok(false) => {}
            Err(v) => break MuxError::Violation(v),
        }
    };
    shared.lock().stop(why);
    // Let the writer notice and end (dropping its half closes our side of the link).
    shared.transmit.notify_one();
}

/// Puts the session's packets on the link, batched.
async fn write_packets<W: AsyncWrite + Unpin>(shared: Arc<Shared>, mut wr: W) {
    let mut batch = Vec::with_capacity(WRITE_BATCH);
    let mut big = Vec::new();
    loop {
        shared.transmit.notified().await;
        loop {
            batch.clear();
            let stopped = {
                let mut st = shared.lock();
                st.writing = false;
                st.session.recycle(std::mem::take(&mut big));
                while batch.len() < WRITE_BATCH {
                    let Some(t) = st.session.poll_transmit() else { break };
                    batch.extend_from_slice(&t.header.encode());
                    if t.payload.len() >= DIRECT_PAYLOAD {
                        // Large payloads go to the link from their own buffer: no second copy.
                        big = t.payload;
                        break;
                    }
                    batch.extend_from_slice(&t.payload);
                    st.session.recycle(t.payload);
                }
                st.writing = !batch.is_empty();
                // Taking packets may have made room for a sender that waited for it.
                st.dispatch();
                st.stopped.is_some()
            };
            if stopped {
                let _ = wr.shutdown().await;
                return;
            }
            if batch.is_empty() {
                break;
            }
            let mut sent = wr.write_all(&batch).await;
            if sent.is_ok() && !big.is_empty() {
                sent = wr.write_all(&big).await;
            }
            if let Err(e) = sent {
                shared.lock().stop(link_failed(&e));
                shared.drained.notify_one();
                return;
            }
            shared.drained.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsock::is_transport_reset;

    fn state(stopped: Option<MuxError>) -> State {
        State {
            session: Session::new(SessionConfig::default()),
            waiters: HashMap::new(),
            listeners: HashMap::new(),
            stopped,
            next_port: FIRST_EPHEMERAL_PORT,
            next_listener: 0,
            writing: false,
            handoff: None,
        }
    }

    #[test]
    fn only_a_lost_link_is_a_transport_reset() {
        let peer = DomId(4);
        let lost = state(Some(MuxError::LinkLost("domain 4 was migrated".into())));
        let e = lost.closed_io(peer, CloseReason::PeerGone);
        assert!(is_transport_reset(&e), "{e:?}");
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        let id = ConnId { local: 1, peer: 2 };
        assert!(is_transport_reset(&lost.session_io(peer, SessionError::Closed(id, CloseReason::PeerGone))));
        assert!(is_transport_reset(&stopped_io(peer, &MuxError::LinkLost("eof".into()))));
        // A live peer's RST, a refusal, an orderly end: what they always were, and no reset.
        for (reason, kind) in [
            (CloseReason::Reset, io::ErrorKind::ConnectionReset),
            (CloseReason::Refused, io::ErrorKind::ConnectionRefused),
            (CloseReason::Finished, io::ErrorKind::BrokenPipe),
        ] {
            let e = lost.closed_io(peer, reason);
            assert_eq!(e.kind(), kind);
            assert!(!is_transport_reset(&e), "{reason:?}: {e:?}");
        }
        // A peer that broke the protocol, or a multiplexer closed here, is not a reset either.
        let violation = MuxError::Violation(Violation::DataAfterShutdown(id));
        for why in [violation, MuxError::LinkViolation("bad ring index".into()), MuxError::Closed] {
            let e = state(Some(why.clone())).closed_io(peer, CloseReason::PeerGone);
            assert!(!is_transport_reset(&e), "{why:?}: {e:?}");
            assert!(!is_transport_reset(&stopped_io(peer, &why)), "{why:?}");
        }
    }

    #[test]
    fn a_failed_link_is_lost_unless_the_peer_broke_it() {
        let lost =
            link_failed(&io::Error::new(io::ErrorKind::ConnectionReset, "domain 2 closed the link or died"));
        assert!(matches!(lost, MuxError::LinkLost(_)));
        assert!(matches!(link_failed(&io::ErrorKind::UnexpectedEof.into()), MuxError::LinkLost(_)));
        let broken = link_failed(&io::Error::new(io::ErrorKind::InvalidData, "bad index"));
        assert!(matches!(broken, MuxError::LinkViolation(_)));
    }
}
