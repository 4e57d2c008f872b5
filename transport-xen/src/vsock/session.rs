//! The connections multiplexed on one link, as a pure state machine (sans-IO).
//!
//! A [`Session`] takes packets from the peer ([`Session::handle`]) and calls from the local side
//! (connect, accept, send, recv, shutdown, close) and produces packets to put on the link
//! ([`Session::poll_transmit`]) and events naming exactly the connections that changed
//! ([`Session::poll_event`]). The shell around it moves packets through the link and wakes the
//! tasks of those connections only: wake-up work is proportional to what changed, never a scan.
//!
//! **Credit.** Each side advertises, on every packet of a connection, its receive buffer for it
//! (`buf_alloc`) and how much of it its application has consumed (`fwd_cnt`). A sender keeps
//! `tx_cnt - peer_fwd_cnt <= peer_buf_alloc`: it never puts more on the link for a connection
//! than the receiver can buffer. So the receiver always drains the link into per-connection
//! queues, and one slow reader never blocks the other connections on the same link. A peer that
//! sends beyond its credit is a protocol violation ([`Violation::CreditOverrun`]): the link is
//! closed. Consumed space is announced with `CREDIT_UPDATE` once a quarter of the buffer has been freed
//! since the last announcement (or when asked with `CREDIT_REQUEST`).
//!
//! **Lifecycle.** `REQUEST` → the receiver's shell accepts (`RESPONSE`) or refuses (`RST`) it.
//! `SHUTDOWN(SEND)` half-closes; `SHUTDOWN(SEND|RCV)` closes, and the receiver answers `RST`,
//! after which the connection is gone on both sides. An `RST` ends a connection at once; a
//! packet for a connection that does not exist is answered with `RST` (never an `RST` for an
//! `RST`).
//!
//! **Bounds.** Everything the peer can make a session hold is bounded by [`SessionConfig`]:
//! connections (`max_connections`), the receive buffer promised across them (`rx_budget`: a
//! connection that would take the promise past it is refused, counted in [`SessionStats`]), and
//! the transmit queue. The answers a peer's packets ask for are coalesced: at most one pending
//! `CREDIT_UPDATE` per connection (it carries the credit of the moment it is put on the link),
//! at most one pending `RST` per port pair. What still grows — `RST`s to ever new port pairs —
//! is the shell's cue to stop reading the link ([`Session::wants_input`]) until the peer takes
//! the answers; data of ours waits for room in the queue (`max_transmit_bytes`) like it waits
//! for credit.

use std::collections::{HashMap, HashSet, VecDeque};

use super::packet::{HEADER_LEN, Header, MAX_PAYLOAD, Op, PacketError, SHUTDOWN_RCV, SHUTDOWN_SEND};
pub use super::rx::OWN_BUFFER;
use super::rx::{RxQueue, fits};

/// A connection on a link: (local port, peer port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// Our port.
    pub local: u32,
    /// The peer's port.
    pub peer: u32,
}

/// Tunables of a session. The defaults are safe for a link from an untrusted guest: one link
/// can make its multiplexer hold under 30 MiB of heap (docs/vsock.md, "Memory").
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Receive buffer of a new connection, in bytes (advertised as `buf_alloc`).
    pub buf_alloc: u32,
    /// Most receive buffer one connection may be given ([`Session::set_buf_alloc`], as
    /// `SO_VM_SOCKETS_BUFFER_SIZE` sets a kernel socket's).
    pub max_buf_alloc: u32,
    /// Most connections (in any state) on the link; further `REQUEST`s are refused with `RST`
    /// ([`SessionStats::refused_limit`]) and local connects fail
    /// ([`SessionError::TooManyConnections`]).
    pub max_connections: usize,
    /// Most receive buffer, in bytes, promised across the link's connections: each connection
    /// promises its own (`buf_alloc`, or what [`Session::set_buf_alloc`] gave it), so at most
    /// `rx_budget / buf_alloc` connections exist at once, fewer if some were given more.
    /// Further `REQUEST`s are refused with `RST` ([`SessionStats::refused_budget`]) and local
    /// connects fail ([`SessionError::OverBudget`]).
    pub rx_budget: u64,
    /// Most bytes (headers and payloads) of our own data waiting to be put on the link; a send
    /// beyond it takes nothing ([`Session::send`] returns `Ok(0)`) and [`Event::Writable`]
    /// follows when the queue has drained to half of it.
    pub max_transmit_bytes: usize,
    /// Most control packets (all but `RW`) waiting to be put on the link before the shell stops
    /// reading it ([`Session::wants_input`]). At least four per connection the limits allow is
    /// used ([`SessionConfig::control_bound`]): the local side's own packets (a `REQUEST` or
    /// `RESPONSE`, two `SHUTDOWN`s, a `CREDIT_UPDATE`) never stop the reader by themselves, and a
    /// correct peer asks for few answers more, so only a peer that asks for answers and never
    /// reads them is held back.
    pub max_queued_control: usize,
}

impl Default for SessionConfig {
    /// 256 KiB per connection, up to 1 MiB if the local side asks; 256 connections, of which
    /// at most 64 at once with the 16 MiB receive budget; 1 MiB of queued data; 1,024 queued
    /// control packets.
    fn default() -> Self {
        SessionConfig {
            buf_alloc: 256 << 10,
            max_buf_alloc: 1 << 20,
            max_connections: 256,
            rx_budget: 16 << 20,
            max_transmit_bytes: 1 << 20,
            max_queued_control: 1024,
        }
    }
}

impl SessionConfig {
    /// Most connections that can exist at once: `max_connections`, or fewer if the receive
    /// budget runs out first.
    pub fn connection_limit(&self) -> usize {
        let by_budget = self.rx_budget / u64::from(self.buf_alloc.max(1));
        self.max_connections.min(usize::try_from(by_budget).unwrap_or(usize::MAX))
    }

    /// The control-packet bound in force: `max_queued_control`, at least four per connection
    /// the limits allow.
    pub fn control_bound(&self) -> usize {
        self.max_queued_control.max(self.connection_limit().saturating_mul(4))
    }
}

/// Counters of a session: what it holds for the link, and what it refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Bytes (headers and payloads) waiting to be put on the link.
    pub queued_bytes: usize,
    /// The most `queued_bytes` has been.
    pub peak_queued_bytes: usize,
    /// Control packets (all but `RW`) waiting to be put on the link.
    pub queued_control: usize,
    /// The most `queued_control` has been.
    pub peak_queued_control: usize,
    /// The bound on `queued_control` past which the shell stops reading
    /// ([`SessionConfig::control_bound`]).
    pub max_queued_control: usize,
    /// `REQUEST`s refused because the link had `max_connections` connections.
    pub refused_limit: u64,
    /// `REQUEST`s refused because another connection would take the promised receive buffer
    /// past `rx_budget`.
    pub refused_budget: u64,
    /// Answers not queued because the same one was already waiting (a `CREDIT_UPDATE` for the
    /// connection, an `RST` for the port pair).
    pub coalesced: u64,
    /// Data packets written to the link by [`Session::send_direct`], past the transmit queue.
    pub direct: u64,
    /// Data packets whose payload the shell copied from the link straight into a reader's
    /// buffer ([`Session::handle_direct`]).
    pub direct_reads: u64,
    /// Queued packets (answers such as the credit update a read frees) the shell wrote to the
    /// link itself from a connection's task ([`Session::transmit_direct`]).
    pub direct_answers: u64,
}

/// What changed, for one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The peer asks to connect: [`Session::accept`] or [`Session::refuse`] it.
    Requested(ConnId),
    /// Our `REQUEST` was accepted.
    Connected(ConnId),
    /// Data or end-of-stream can be read.
    Readable(ConnId),
    /// Credit came back after a send found none, or the peer stopped receiving.
    Writable(ConnId),
    /// The connection ended; readable data, if any, stays readable.
    Closed(ConnId, CloseReason),
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer refused our `REQUEST` (no listener, or not allowed).
    Refused,
    /// The peer reset the connection.
    Reset,
    /// Both sides closed in order.
    Finished,
    /// The link to the peer went away.
    PeerGone,
}

/// A local call that cannot be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    /// The port pair is in use on this link.
    #[error("connection {0:?} already exists on this link")]
    InUse(ConnId),
    /// No such connection (never existed, or released).
    #[error("no connection {0:?} on this link")]
    NotFound(ConnId),
    /// The connection is not in a state that allows this.
    #[error("connection {0:?} is not established")]
    NotConnected(ConnId),
    /// The connection was shut for sending (by us, or the peer stopped receiving).
    #[error("connection {0:?} can send no more")]
    SendShut(ConnId),
    /// The connection ended.
    #[error("connection {0:?} closed: {1:?}")]
    Closed(ConnId, CloseReason),
    /// The link has as many connections as configured.
    #[error("too many connections on this link")]
    TooManyConnections,
    /// Another connection, or a larger buffer for one, would take the receive buffer promised
    /// on this link past its budget.
    #[error("the link's receive budget of {budget} bytes is promised to its connections")]
    OverBudget {
        /// [`SessionConfig::rx_budget`].
        budget: u64,
    },
    /// A receive buffer size the connection cannot be given: under what it has already
    /// promised the peer, or over [`SessionConfig::max_buf_alloc`].
    #[error("a receive buffer of {asked} bytes for connection {id:?}: it can be given {now} to {max} bytes")]
    BufferSize {
        /// The connection.
        id: ConnId,
        /// The size asked for.
        asked: u32,
        /// Its buffer now (the peer may already have sent that much: it never shrinks).
        now: u32,
        /// [`SessionConfig::max_buf_alloc`].
        max: u32,
    },
}

/// How the peer broke the protocol. The shell closes the link.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A malformed header.
    #[error(transparent)]
    Packet(#[from] PacketError),
    /// The payload length does not match the bytes that came with the header.
    #[error("header announces {announced} payload bytes, {got} arrived")]
    PayloadMismatch {
        /// From the header.
        announced: u32,
        /// Actually passed in.
        got: usize,
    },
    /// Data beyond the credit we granted.
    #[error("connection {id:?}: {len} bytes sent with only {credit} bytes of credit")]
    CreditOverrun {
        /// The connection.
        id: ConnId,
        /// Bytes in the packet.
        len: u32,
        /// Credit the peer had.
        credit: u32,
    },
    /// Data after the peer shut down its sending direction.
    #[error("connection {0:?}: data after the peer's SHUTDOWN(SEND)")]
    DataAfterShutdown(ConnId),
    /// The peer claims to have consumed more than we sent.
    #[error("connection {id:?}: peer claims {claimed} bytes consumed of {sent} sent")]
    BadFwdCnt {
        /// The connection.
        id: ConnId,
        /// Its `fwd_cnt` advance.
        claimed: u32,
        /// Our unacknowledged bytes.
        sent: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// We sent `REQUEST`.
    Connecting,
    /// The peer sent `REQUEST`; the shell has not decided.
    Requested,
    Established,
    /// We sent `SHUTDOWN(SEND|RCV)`; waiting for the peer's `RST`.
    Closing,
    /// Over; kept until the local side releases it (it may hold unread data).
    Closed(CloseReason),
}

#[derive(Debug)]
struct Conn {
    state: State,
    // Sending.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    send_blocked: bool,
    local_shut_send: bool,
    peer_shut_rcv: bool,
    // Receiving.
    rx: RxQueue,
    /// Our receive buffer for it (advertised as `buf_alloc`): only grows.
    buf_alloc: u32,
    rx_cnt: u32,
    fwd_cnt: u32,
    announced_fwd_cnt: u32,
    peer_shut_send: bool,
    // Queueing.
    /// A `CREDIT_UPDATE` for this connection waits in the transmit queue.
    credit_update_queued: bool,
    /// A send found the transmit queue full; [`Event::Writable`] follows when it drains.
    waits_for_room: bool,
}

impl Conn {
    fn new(state: State, buf_alloc: u32) -> Conn {
        Conn {
            buf_alloc,
            state,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            send_blocked: false,
            local_shut_send: false,
            peer_shut_rcv: false,
            rx: RxQueue::default(),
            rx_cnt: 0,
            fwd_cnt: 0,
            announced_fwd_cnt: 0,
            peer_shut_send: false,
            credit_update_queued: false,
            waits_for_room: false,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Puts this connection's receive credit as of now (`buf_alloc`, our `fwd_cnt`) on a packet
    /// of it.
    fn put_credit(&self, header: &mut Header) {
        header.buf_alloc = self.buf_alloc;
        header.fwd_cnt = self.fwd_cnt;
    }

    /// [`Conn::put_credit`], and remembers the credit as announced.
    fn announce_credit(&mut self, header: &mut Header) {
        self.put_credit(header);
        self.announced_fwd_cnt = self.fwd_cnt;
    }
}

/// A packet to put on the link: a header and, for `RW`, its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The header.
    pub header: Header,
    /// `header.len` bytes for `RW`, empty otherwise.
    pub payload: Vec<u8>,
}

impl Transmit {
    /// A packet without payload (every op but `RW`).
    fn control(header: Header) -> Transmit {
        Transmit { header, payload: Vec::new() }
    }
}

/// A packet's payload as the shell hands it over.
enum Payload<'a> {
    /// In the shell's read buffer: copied into the connection's queue.
    Copied(&'a [u8]),
    /// In a buffer of its own: moved into the queue if large.
    Owned(Vec<u8>),
    /// Its first `read` bytes already in the reader's buffer (read, not queued), the rest in
    /// a buffer of its own.
    Direct { read: usize, rest: Vec<u8> },
}

impl Payload<'_> {
    fn len(&self) -> usize {
        match self {
            Payload::Copied(b) => b.len(),
            Payload::Owned(b) => b.len(),
            Payload::Direct { read, rest } => read + rest.len(),
        }
    }
}

/// What a read found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// This many bytes were copied.
    Data(usize),
    /// Nothing yet.
    WouldBlock,
    /// The peer will send no more and everything was read.
    Eof,
}

/// All connections of one link.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    conns: HashMap<ConnId, Conn>,
    transmit: VecDeque<Transmit>,
    /// Port pairs with an `RST` in `transmit`: one per pair.
    rst_queued: HashSet<ConnId>,
    /// Connections whose send found no room in `transmit` (each once: `Conn::waits_for_room`).
    room_waiters: Vec<ConnId>,
    /// Bytes of data packets (header and payload) in `transmit`.
    queued_data: usize,
    /// Receive buffer promised beyond `buf_alloc` each: the sum over the connections of what
    /// [`Session::set_buf_alloc`] added.
    raised: u64,
    stats: SessionStats,
    events: VecDeque<Event>,
    /// Payload buffers handed back by [`Session::recycle`], reused by [`Session::send`]: a
    /// stream of 64 KiB packets does not allocate (and fault in) a fresh buffer per packet.
    spare: Vec<Vec<u8>>,
}

/// Most payload buffers [`Session`] keeps for reuse.
const SPARE_BUFFERS: usize = 32;

/// Keeps `payload`'s buffer for reuse, while there are fewer than [`SPARE_BUFFERS`]. Its bytes
/// stay (whoever takes it sets its length): a receive buffer resized to the length it had is
/// not zeroed again.
fn recycle(spare: &mut Vec<Vec<u8>>, payload: Vec<u8>) {
    if payload.capacity() > 0 && spare.len() < SPARE_BUFFERS {
        spare.push(payload);
    }
}

impl Session {
    /// An empty session.
    pub fn new(config: SessionConfig) -> Session {
        Session {
            conns: HashMap::new(),
            transmit: VecDeque::new(),
            rst_queued: HashSet::new(),
            room_waiters: Vec::new(),
            queued_data: 0,
            raised: 0,
            stats: SessionStats { max_queued_control: config.control_bound(), ..SessionStats::default() },
            events: VecDeque::new(),
            spare: Vec::new(),
            config,
        }
    }

    /// Hands back the payload buffer of a [`Transmit`] that has been put on the link, for reuse.
    pub fn recycle(&mut self, payload: Vec<u8>) {
        recycle(&mut self.spare, payload);
    }

    /// A buffer with room for a payload of `len` bytes, for [`Session::handle_owned`]: a spare
    /// one if one fits it closely enough to join a receive queue as it is (holding stale
    /// bytes: the caller sets its length), else a new, empty one.
    pub fn payload_buffer(&mut self, len: usize) -> Vec<u8> {
        match self.spare.iter().rposition(|b| fits(b.capacity(), len)) {
            Some(i) => self.spare.swap_remove(i),
            None => Vec::with_capacity(len),
        }
    }

    /// Number of connections in any state.
    pub fn len(&self) -> usize {
        self.conns.len()
    }

    /// The connections in any state (for diagnostics and tests).
    pub fn connections(&self) -> Vec<ConnId> {
        let mut ids: Vec<ConnId> = self.conns.keys().copied().collect();
        ids.sort_unstable();
        ids
    }

    /// True if there are no connections.
    pub fn is_empty(&self) -> bool {
        self.conns.is_empty()
    }

    /// True if packets are waiting to be put on the link.
    pub fn has_transmit(&self) -> bool {
        !self.transmit.is_empty()
    }

    /// The next packet to put on the link. A packet of a live connection carries that
    /// connection's credit as of now, so a coalesced `CREDIT_UPDATE` announces everything read
    /// until it leaves, and what a connection announces never goes backwards on the link.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let mut t = self.transmit.pop_front()?;
        let len = HEADER_LEN + t.payload.len();
        self.stats.queued_bytes -= len;
        let id = ConnId { local: t.header.src_port, peer: t.header.dst_port };
        match t.header.op {
            Op::Rw => self.queued_data -= len,
            op => {
                if op == Op::Rst {
                    self.rst_queued.remove(&id);
                }
                self.stats.queued_control -= 1;
            }
        }
        if t.header.op != Op::Rst
            && let Some(c) = self.conns.get_mut(&id)
        {
            if t.header.op == Op::CreditUpdate {
                c.credit_update_queued = false;
            }
            c.announce_credit(&mut t.header);
        }
        if !self.room_waiters.is_empty() && self.queued_data <= self.config.max_transmit_bytes / 2 {
            for id in std::mem::take(&mut self.room_waiters) {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.waits_for_room = false;
                    self.events.push_back(Event::Writable(id));
                }
            }
        }
        Some(t)
    }

    /// Offers the queued packets, oldest first, to `write` (the link, now) as
    /// [`Session::poll_transmit`] would hand them out: the encoded header, with its
    /// connection's credit as of now, and the payload. Each one `write` took (answered true)
    /// leaves the queue; the first it declines, and all after it, stay queued. Returns how
    /// many left.
    ///
    /// For a shell whose connection tasks put the session's answers on the link themselves
    /// (the credit update a read frees) when no other writer holds packets it took from the
    /// queue: the order on the link stays the queue's.
    pub fn transmit_direct(&mut self, mut write: impl FnMut(&[u8], &[u8]) -> bool) -> usize {
        let mut sent = 0;
        while let Some(t) = self.transmit.front() {
            let mut header = t.header;
            let id = ConnId { local: header.src_port, peer: header.dst_port };
            if header.op != Op::Rst
                && let Some(c) = self.conns.get(&id)
            {
                // What `poll_transmit` announces, committed only once the packet is out.
                c.put_credit(&mut header);
            }
            if !write(&header.encode(), &t.payload) {
                break;
            }
            if let Some(t) = self.poll_transmit() {
                self.recycle(t.payload);
            }
            sent += 1;
        }
        self.stats.direct_answers += sent as u64;
        sent
    }

    /// False while so many control packets wait for the link that the shell should stop
    /// reading it until they drain ([`SessionConfig::max_queued_control`]). Every answer to a
    /// peer's packet (an `RST`, a `CREDIT_UPDATE`, the `RESPONSE` to an accepted `REQUEST`) is
    /// a control packet, so what a peer that never reads makes the session queue stays at the
    /// bound; handling one more packet queues at most one more.
    pub fn wants_input(&self) -> bool {
        self.stats.queued_control < self.config.control_bound()
    }

    /// Bytes (headers and payloads) waiting to be put on the link.
    pub fn queued_bytes(&self) -> usize {
        self.stats.queued_bytes
    }

    /// The session's counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    fn push(&mut self, t: Transmit) {
        let len = HEADER_LEN + t.payload.len();
        if t.header.op == Op::Rw {
            self.queued_data += len;
        } else {
            self.stats.queued_control += 1;
            self.stats.peak_queued_control = self.stats.peak_queued_control.max(self.stats.queued_control);
        }
        self.stats.queued_bytes += len;
        self.stats.peak_queued_bytes = self.stats.peak_queued_bytes.max(self.stats.queued_bytes);
        self.transmit.push_back(t);
    }

    /// Queues an `RST` for `id`, unless one already waits.
    fn push_rst(&mut self, id: ConnId) {
        if self.rst_queued.insert(id) {
            self.push(Transmit::control(Header::rst(id.local, id.peer)));
        } else {
            self.stats.coalesced += 1;
        }
    }

    /// Whether one more connection fits the limits.
    fn admit(&self) -> Result<(), SessionError> {
        if self.conns.len() >= self.config.max_connections {
            return Err(SessionError::TooManyConnections);
        }
        if self.promised().saturating_add(u64::from(self.config.buf_alloc)) > self.config.rx_budget {
            return Err(SessionError::OverBudget { budget: self.config.rx_budget });
        }
        Ok(())
    }

    /// Receive buffer promised across the connections: `buf_alloc` each, and what
    /// [`Session::set_buf_alloc`] added.
    fn promised(&self) -> u64 {
        (self.conns.len() as u64).saturating_mul(u64::from(self.config.buf_alloc)).saturating_add(self.raised)
    }

    /// The next event for the local side.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Queues a control packet for `id` carrying its credit (a `CREDIT_UPDATE` only if none
    /// waits already).
    fn send_control(&mut self, op: Op, id: ConnId, flags: u16) {
        let mut header = Header { flags, ..Header::new(op, id.local, id.peer) };
        if let Some(c) = self.conns.get_mut(&id) {
            if op == Op::CreditUpdate {
                if c.credit_update_queued {
                    // The one waiting will carry the credit of the moment it leaves.
                    self.stats.coalesced += 1;
                    return;
                }
                c.credit_update_queued = true;
            }
            c.announce_credit(&mut header);
        }
        self.push(Transmit::control(header));
    }

    /// Opens a connection from our port `id.local` to the peer's `id.peer`.
    pub fn connect(&mut self, id: ConnId) -> Result<(), SessionError> {
        if self.conns.contains_key(&id) {
            return Err(SessionError::InUse(id));
        }
        self.admit()?;
        self.conns.insert(id, Conn::new(State::Connecting, self.config.buf_alloc));
        self.send_control(Op::Request, id, 0);
        Ok(())
    }

    /// Accepts a connection the peer requested ([`Event::Requested`]).
    pub fn accept(&mut self, id: ConnId) -> Result<(), SessionError> {
        let conn = self.conns.get_mut(&id).ok_or(SessionError::NotFound(id))?;
        if conn.state != State::Requested {
            return Err(SessionError::NotConnected(id));
        }
        conn.state = State::Established;
        self.send_control(Op::Response, id, 0);
        Ok(())
    }

    /// Refuses a connection the peer requested (no listener, or not allowed).
    pub fn refuse(&mut self, id: ConnId) -> Result<(), SessionError> {
        match self.conns.get(&id).map(|c| c.state) {
            Some(State::Requested) => {
                self.forget(id);
                self.push_rst(id);
                Ok(())
            }
            Some(_) => Err(SessionError::NotConnected(id)),
            None => Err(SessionError::NotFound(id)),
        }
    }

    /// Gives `id` a receive buffer of `bytes` (what `SO_VM_SOCKETS_BUFFER_SIZE` does for a
    /// kernel socket): the peer may then have that much of the connection's data unread at
    /// once, so a stream needs fewer credit updates, and its sender waits for them less. The
    /// peer learns it from a `CREDIT_UPDATE`, or from our `RESPONSE` for a connection it asked
    /// for and we have not accepted yet. The buffer only grows (the peer may already have sent
    /// under the larger credit), up to [`SessionConfig::max_buf_alloc`], and counts against
    /// [`SessionConfig::rx_budget`] like a connection's own.
    pub fn set_buf_alloc(&mut self, id: ConnId, bytes: u32) -> Result<(), SessionError> {
        let conn = self.conns.get(&id).ok_or(SessionError::NotFound(id))?;
        match conn.state {
            State::Closed(r) => return Err(SessionError::Closed(id, r)),
            State::Closing => return Err(SessionError::NotConnected(id)),
            State::Connecting | State::Requested | State::Established => {}
        }
        let (now, max) = (conn.buf_alloc, self.config.max_buf_alloc);
        if bytes < now || bytes > max {
            return Err(SessionError::BufferSize { id, asked: bytes, now, max });
        }
        let more = u64::from(bytes - now);
        if self.promised().saturating_add(more) > self.config.rx_budget {
            return Err(SessionError::OverBudget { budget: self.config.rx_budget });
        }
        if more == 0 {
            return Ok(());
        }
        self.raised += more;
        let conn = self.conns.get_mut(&id).ok_or(SessionError::NotFound(id))?;
        conn.buf_alloc = bytes;
        // A connection the peer asked for learns it from our `RESPONSE`.
        if conn.state != State::Requested {
            self.send_control(Op::CreditUpdate, id, 0);
        }
        Ok(())
    }

    /// Forgets a connection, and the buffer it promised.
    fn forget(&mut self, id: ConnId) {
        if let Some(c) = self.conns.remove(&id) {
            self.raised -= u64::from(c.buf_alloc.saturating_sub(self.config.buf_alloc));
        }
    }

    /// Sends up to `data.len()` bytes, as much as the peer's credit allows (at most one
    /// packet's worth per call). `Ok(0)` means no credit now: [`Event::Writable`] follows when
    /// there is.
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> Result<usize, SessionError> {
        let n = self.sendable(id, data.len())?;
        let room = self.config.max_transmit_bytes.saturating_sub(self.queued_data + HEADER_LEN);
        let conn = self.conns.get_mut(&id).ok_or(SessionError::NotFound(id))?;
        if n == 0 {
            conn.send_blocked = !data.is_empty();
            return Ok(0);
        }
        // Credit, but the queue to the link is full: wait for it to drain like for credit.
        let n = n.min(u32::try_from(room).unwrap_or(u32::MAX));
        if n == 0 {
            if !conn.waits_for_room {
                conn.waits_for_room = true;
                self.room_waiters.push(id);
            }
            return Ok(0);
        }
        conn.tx_cnt = conn.tx_cnt.wrapping_add(n);
        let mut header = Header::rw(id.local, id.peer, n);
        conn.announce_credit(&mut header);
        let mut payload = self.spare.pop().unwrap_or_default();
        payload.clear();
        payload.extend_from_slice(&data[..n as usize]);
        self.push(Transmit { header, payload });
        Ok(n as usize)
    }

    /// Like [`Session::send`], but the packet goes to `write` (the link, now) instead of the
    /// transmit queue: `write` gets the encoded header and the payload and says whether it
    /// wrote both. `Ok(None)` if there is no credit now or `write` declined: nothing was
    /// sent (then [`Session::send`] queues it, or waits for credit).
    ///
    /// For a shell that writes a connection's data from the connection's own task when nothing
    /// waits in the transmit queue: the packet then cannot overtake one queued before it.
    pub fn send_direct(
        &mut self,
        id: ConnId,
        data: &[u8],
        write: impl FnOnce(&[u8], &[u8]) -> bool,
    ) -> Result<Option<usize>, SessionError> {
        let n = self.sendable(id, data.len())?;
        let conn = self.conns.get_mut(&id).ok_or(SessionError::NotFound(id))?;
        if n == 0 {
            return Ok(None);
        }
        // The credit announced as of now, committed only once the packet is out.
        let mut header = Header::rw(id.local, id.peer, n);
        conn.put_credit(&mut header);
        if !write(&header.encode(), &data[..n as usize]) {
            return Ok(None);
        }
        conn.tx_cnt = conn.tx_cnt.wrapping_add(n);
        conn.announce_credit(&mut header);
        self.stats.direct += 1;
        Ok(Some(n as usize))
    }

    /// How many bytes of `len` one packet on `id` may carry now (0: no credit).
    fn sendable(&self, id: ConnId, len: usize) -> Result<u32, SessionError> {
        let conn = self.conns.get(&id).ok_or(SessionError::NotFound(id))?;
        match conn.state {
            State::Established => {}
            State::Closed(r) => return Err(SessionError::Closed(id, r)),
            _ => return Err(SessionError::NotConnected(id)),
        }
        if conn.local_shut_send || conn.peer_shut_rcv {
            return Err(SessionError::SendShut(id));
        }
        Ok((len as u64).min(conn.credit() as u64).min(MAX_PAYLOAD as u64) as u32)
    }

    /// Bytes buffered for reading on `id` (0 for a connection this session does not know).
    pub fn buffered(&self, id: ConnId) -> usize {
        self.conns.get(&id).map_or(0, |c| c.rx.len())
    }

    /// Reads buffered data. Consuming frees credit; the peer is told once a quarter of the buffer has
    /// been freed since it was last told.
    pub fn recv(&mut self, id: ConnId, buf: &mut [u8]) -> Result<Read, SessionError> {
        let conn = self.conns.get_mut(&id).ok_or(SessionError::NotFound(id))?;
        if conn.rx.is_empty() {
            return match conn.state {
                State::Closed(CloseReason::Finished) => Ok(Read::Eof),
                State::Closed(r) => Err(SessionError::Closed(id, r)),
                State::Connecting | State::Requested => Err(SessionError::NotConnected(id)),
                _ if conn.peer_shut_send => Ok(Read::Eof),
                _ => Ok(Read::WouldBlock),
            };
        }
        let spare = &mut self.spare;
        let n = conn.rx.read(buf, |b| recycle(spare, b));
        self.consumed(id, n);
        Ok(Read::Data(n))
    }

    /// Counts `n` bytes of `id` as read: the freed credit is announced once a quarter of the
    /// buffer has been freed since the peer was last told.
    fn consumed(&mut self, id: ConnId, n: usize) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        let threshold = conn.buf_alloc / 4;
        conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
        let live = matches!(conn.state, State::Established) && !conn.peer_shut_send;
        if live && conn.fwd_cnt.wrapping_sub(conn.announced_fwd_cnt) >= threshold {
            self.send_control(Op::CreditUpdate, id, 0);
        }
    }

    /// Shuts down our sending direction: the peer reads end-of-stream after the data sent.
    pub fn shutdown_send(&mut self, id: ConnId) -> Result<(), SessionError> {
        let conn = self.conns.get_mut(&id).ok_or(SessionError::NotFound(id))?;
        match conn.state {
            State::Established if !conn.local_shut_send => {
                conn.local_shut_send = true;
                self.send_control(Op::Shutdown, id, SHUTDOWN_SEND);
                Ok(())
            }
            State::Established => Ok(()),
            // The peer already closed both directions in order: nothing left to shut.
            State::Closed(CloseReason::Finished) => Ok(()),
            State::Closed(r) => Err(SessionError::Closed(id, r)),
            _ => Err(SessionError::NotConnected(id)),
        }
    }

    /// Closes the connection from our side and forgets it once the peer confirms (or at once
    /// if it already ended). Unread data is dropped.
    pub fn close(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        match conn.state {
            State::Established | State::Connecting => {
                conn.state = State::Closing;
                conn.rx.clear();
                self.send_control(Op::Shutdown, id, SHUTDOWN_SEND | SHUTDOWN_RCV);
            }
            State::Requested => {
                let _ = self.refuse(id);
            }
            State::Closing => {}
            State::Closed(_) => self.forget(id),
        }
    }

    /// Resets the connection from our side: the peer is sent a `RST`, and our end ends as if
    /// the peer had reset it ([`Event::Closed`] with [`CloseReason::Reset`], unread data dropped).
    /// What a domain does to connections a changed policy no longer allows.
    pub fn reset(&mut self, id: ConnId) {
        let Some(conn) = self.conns.get(&id) else { return };
        match conn.state {
            State::Closed(_) => {}
            State::Requested => {
                let _ = self.refuse(id);
            }
            _ => {
                self.push_rst(id);
                self.end(id, CloseReason::Reset);
            }
        }
    }

    /// The link went away: every connection ends with [`CloseReason::PeerGone`]. Data that
    /// arrived before stays readable until the connection is released.
    pub fn peer_gone(&mut self) {
        let (default, raised) = (self.config.buf_alloc, &mut self.raised);
        self.conns.retain(|_, c| {
            let keep = c.state != State::Closing;
            if !keep {
                *raised -= u64::from(c.buf_alloc.saturating_sub(default));
            }
            keep
        });
        let mut ids: Vec<ConnId> = Vec::new();
        for (id, conn) in self.conns.iter_mut() {
            if !matches!(conn.state, State::Closed(_)) {
                conn.state = State::Closed(CloseReason::PeerGone);
                ids.push(*id);
            }
        }
        ids.sort_unstable();
        self.events.extend(ids.into_iter().map(|id| Event::Closed(id, CloseReason::PeerGone)));
        self.transmit.clear();
        self.rst_queued.clear();
        self.room_waiters.clear();
        self.queued_data = 0;
        self.stats.queued_bytes = 0;
        self.stats.queued_control = 0;
        for c in self.conns.values_mut() {
            c.credit_update_queued = false;
            c.waits_for_room = false;
        }
    }

    /// Processes one packet from the peer: `bytes` is the header followed by its payload.
    /// An error is a protocol violation: the caller closes the link.
    pub fn handle(&mut self, bytes: &[u8]) -> Result<(), Violation> {
        let h = Header::decode(bytes)?;
        self.handle_parts(&h, &bytes[HEADER_LEN..])
    }

    /// Processes one packet from the peer given as its header, decoded with [`Header::decode`]
    /// (the shell reads the header first to learn the payload's length), and its payload.
    pub fn handle_parts(&mut self, h: &Header, payload: &[u8]) -> Result<(), Violation> {
        self.on_packet(h, Payload::Copied(payload))
    }

    /// As [`Session::handle_parts`], with the payload in a buffer of its own (from
    /// [`Session::payload_buffer`]): data of [`OWN_BUFFER`] bytes or more joins its
    /// connection's queue in that buffer, without a copy.
    pub fn handle_owned(&mut self, h: &Header, payload: Vec<u8>) -> Result<(), Violation> {
        self.on_packet(h, Payload::Owned(payload))
    }

    /// The connection whose reader may take this packet's payload straight from the link,
    /// with one copy: `h` is data of [`OWN_BUFFER`] bytes or more for an established
    /// connection with nothing queued for reading, which [`Session::handle_direct`] will
    /// accept whole. `None` for any other packet: the shell reads it and hands it over as
    /// usual (then [`Session::handle_owned`] judges it).
    pub fn direct_receiver(&self, h: &Header) -> Option<ConnId> {
        if h.op != Op::Rw || (h.len as usize) < OWN_BUFFER || h.len > MAX_PAYLOAD {
            return None;
        }
        let id = ConnId { local: h.dst_port, peer: h.src_port };
        let conn = self.conns.get(&id)?;
        let in_buffer = conn.rx_cnt.wrapping_sub(conn.fwd_cnt);
        let accepted = conn.state == State::Established
            && conn.rx.is_empty()
            && !conn.peer_shut_send
            && h.len <= conn.buf_alloc.saturating_sub(in_buffer)
            && h.fwd_cnt.wrapping_sub(conn.peer_fwd_cnt) <= conn.tx_cnt.wrapping_sub(conn.peer_fwd_cnt);
        accepted.then_some(id)
    }

    /// Processes a packet [`Session::direct_receiver`] named, with no other packet handled in
    /// between, after the shell copied the first `read` bytes of its payload into the
    /// connection's reader's buffer (they count as read) and the rest into `rest` (which joins
    /// the queue as [`Session::handle_owned`]'s payloads do). If the connection closed
    /// meanwhile, the packet is judged as any other.
    pub fn handle_direct(&mut self, h: &Header, read: usize, rest: Vec<u8>) -> Result<(), Violation> {
        self.stats.direct_reads += 1;
        self.on_packet(h, Payload::Direct { read, rest })
    }

    fn on_packet(&mut self, h: &Header, payload: Payload<'_>) -> Result<(), Violation> {
        if payload.len() != h.len as usize {
            return Err(Violation::PayloadMismatch { announced: h.len, got: payload.len() });
        }
        // A header built by hand rather than decoded: hold it to the same rule.
        if h.op == Op::Rw && (h.len == 0 || h.len > MAX_PAYLOAD) {
            return Err(PacketError::BadPayloadLength(h.len).into());
        }
        // The packet's ports are the sender's view: its source is our peer port.
        let id = ConnId { local: h.dst_port, peer: h.src_port };
        if h.op == Op::Request {
            self.on_request(id, h);
            return Ok(());
        }
        let Some(conn) = self.conns.get_mut(&id) else {
            if h.op != Op::Rst {
                self.push_rst(id);
            }
            return Ok(());
        };
        if h.op == Op::Rst {
            let reason =
                if conn.state == State::Connecting { CloseReason::Refused } else { CloseReason::Reset };
            self.end(id, reason);
            return Ok(());
        }
        // Every other packet carries the sender's credit for this connection.
        let advance = h.fwd_cnt.wrapping_sub(conn.peer_fwd_cnt);
        let unacked = conn.tx_cnt.wrapping_sub(conn.peer_fwd_cnt);
        if advance > unacked {
            return Err(Violation::BadFwdCnt { id, claimed: advance, sent: unacked });
        }
        let had_credit = conn.credit() > 0;
        conn.peer_fwd_cnt = h.fwd_cnt;
        conn.peer_buf_alloc = h.buf_alloc;
        if conn.send_blocked && !had_credit && conn.credit() > 0 {
            conn.send_blocked = false;
            self.events.push_back(Event::Writable(id));
        }
        match (h.op, conn.state) {
            (Op::Response, State::Connecting) => {
                conn.state = State::Established;
                self.events.push_back(Event::Connected(id));
            }
            (Op::Rw, State::Established) => {
                let in_buffer = conn.rx_cnt.wrapping_sub(conn.fwd_cnt);
                let credit = conn.buf_alloc.saturating_sub(in_buffer);
                if conn.peer_shut_send {
                    return Err(Violation::DataAfterShutdown(id));
                }
                if h.len > credit {
                    return Err(Violation::CreditOverrun { id, len: h.len, credit });
                }
                let was_empty = conn.rx.is_empty();
                let mut read = 0;
                match payload {
                    Payload::Copied(data) => conn.rx.extend_from_slice(data),
                    Payload::Owned(buffer) => {
                        if let Some(copied) = conn.rx.push(buffer) {
                            recycle(&mut self.spare, copied);
                        }
                    }
                    Payload::Direct { read: n, rest } => {
                        read = n;
                        if rest.is_empty() {
                            recycle(&mut self.spare, rest);
                        } else if let Some(copied) = conn.rx.push(rest) {
                            recycle(&mut self.spare, copied);
                        }
                    }
                }
                conn.rx_cnt = conn.rx_cnt.wrapping_add(h.len);
                if was_empty && !conn.rx.is_empty() {
                    self.events.push_back(Event::Readable(id));
                }
                if read > 0 {
                    self.consumed(id, read);
                }
            }
            // Data still in flight when we closed: counted as consumed, then dropped.
            (Op::Rw, State::Closing) => {}
            (Op::Shutdown, State::Established | State::Closing) => {
                let was_open = !conn.peer_shut_send;
                conn.peer_shut_send |= h.flags & SHUTDOWN_SEND != 0;
                if h.flags & SHUTDOWN_RCV != 0 && !conn.peer_shut_rcv {
                    conn.peer_shut_rcv = true;
                    self.events.push_back(Event::Writable(id));
                }
                if conn.peer_shut_send && conn.peer_shut_rcv {
                    // The peer closed: confirm with RST and end (unread data stays readable).
                    let closing = conn.state == State::Closing;
                    self.push_rst(id);
                    if closing {
                        self.forget(id);
                    } else {
                        self.end(id, CloseReason::Finished);
                    }
                } else if was_open && conn.peer_shut_send {
                    self.events.push_back(Event::Readable(id));
                }
            }
            (Op::CreditRequest, State::Established) => self.send_control(Op::CreditUpdate, id, 0),
            (Op::CreditUpdate, _) | (Op::CreditRequest, _) => {}
            // RESPONSE or RW in a state that does not expect it: the peer is confused about
            // this connection; reset it rather than the whole link.
            _ => {
                self.push_rst(id);
                self.end(id, CloseReason::Reset);
            }
        }
        Ok(())
    }

    fn on_request(&mut self, id: ConnId, h: &Header) {
        if self.conns.contains_key(&id) {
            // The peer has forgotten this pair while we still hold it: our connection is stale
            // (reset it); the pair stays taken until the local side releases it.
            self.end(id, CloseReason::Reset);
            self.push_rst(id);
            return;
        }
        match self.admit() {
            Ok(()) => {}
            Err(e) => {
                if e == SessionError::TooManyConnections {
                    self.stats.refused_limit += 1;
                } else {
                    self.stats.refused_budget += 1;
                }
                self.push_rst(id);
                return;
            }
        }
        let mut conn = Conn::new(State::Requested, self.config.buf_alloc);
        conn.peer_buf_alloc = h.buf_alloc;
        conn.peer_fwd_cnt = h.fwd_cnt;
        self.conns.insert(id, conn);
        self.events.push_back(Event::Requested(id));
    }

    /// Ends a connection: closed connections stay until released, a closing one is forgotten.
    fn end(&mut self, id: ConnId, reason: CloseReason) {
        let Some(conn) = self.conns.get_mut(&id) else { return };
        match conn.state {
            // Nobody holds a closing or a never-accepted connection: forget it.
            State::Closing | State::Requested => self.forget(id),
            State::Closed(_) => {}
            _ => {
                conn.state = State::Closed(reason);
                if reason != CloseReason::Finished {
                    conn.rx.clear();
                }
                self.events.push_back(Event::Closed(id, reason));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wire(t: &Transmit) -> Vec<u8> {
        t.header.packet(&t.payload)
    }

    /// Moves every queued packet from `from` to `to`; panics on a violation.
    fn deliver(from: &mut Session, to: &mut Session) -> usize {
        let mut n = 0;
        while let Some(t) = from.poll_transmit() {
            to.handle(&wire(&t)).unwrap();
            n += 1;
        }
        n
    }

    #[test]
    fn queued_packets_written_directly_leave_in_order_and_a_declined_one_stays() {
        let (mut a, mut b, ab, ba) = connected();
        a.send(ab, &[7; 40]).unwrap();
        deliver(&mut a, &mut b);
        // Reading frees a quarter of the buffer: a credit update is queued (announcing 20),
        // then an RST for a port pair nobody knows; then more is read (the update waiting
        // will carry it).
        let mut buf = [0u8; 20];
        assert_eq!(b.recv(ba, &mut buf).unwrap(), Read::Data(20));
        b.handle(&Header::rw(9, 9, 1).packet(&[0])).unwrap();
        assert_eq!(b.recv(ba, &mut buf).unwrap(), Read::Data(20));
        assert_eq!(b.stats().queued_control, 2);
        // The link declines: nothing leaves, nothing is committed.
        assert_eq!(b.transmit_direct(|_, _| false), 0);
        assert_eq!(b.stats().queued_control, 2);
        // It takes one: the credit update, with the credit as of now (all 40 bytes read), then
        // declines the RST, which stays queued.
        let mut out = Vec::new();
        let sent = b.transmit_direct(|header, payload| {
            if !out.is_empty() {
                return false;
            }
            out.push((Header::decode(header).unwrap(), payload.to_vec()));
            true
        });
        assert_eq!((sent, b.stats().direct_answers), (1, 1));
        assert_eq!(
            (out[0].0.op, out[0].0.fwd_cnt, out[0].0.buf_alloc),
            (Op::CreditUpdate, 40, small().buf_alloc)
        );
        assert!(out[0].1.is_empty());
        assert_eq!(b.stats().queued_control, 1);
        assert_eq!(b.poll_transmit().map(|t| t.header.op), Some(Op::Rst));
        assert_eq!(b.poll_transmit(), None);
        // A's side accepts the update as any other.
        a.handle(&[out[0].0.encode().as_slice(), &out[0].1].concat()).unwrap();
    }

    fn events(s: &mut Session) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn small() -> SessionConfig {
        SessionConfig {
            buf_alloc: 64,
            max_buf_alloc: 256,
            max_connections: 8,
            rx_budget: 8 * 64,
            max_transmit_bytes: 1 << 20,
            max_queued_control: 16,
        }
    }

    /// A connects (port 1000 -> 80) and B accepts.
    fn connected() -> (Session, Session, ConnId, ConnId) {
        connected_with(small())
    }

    fn connected_with(config: SessionConfig) -> (Session, Session, ConnId, ConnId) {
        let (mut a, mut b) = (Session::new(config.clone()), Session::new(config));
        let at_a = ConnId { local: 1000, peer: 80 };
        let at_b = ConnId { local: 80, peer: 1000 };
        a.connect(at_a).unwrap();
        deliver(&mut a, &mut b);
        assert_eq!(events(&mut b), vec![Event::Requested(at_b)]);
        b.accept(at_b).unwrap();
        deliver(&mut b, &mut a);
        assert_eq!(events(&mut a), vec![Event::Connected(at_a)]);
        (a, b, at_a, at_b)
    }

    #[test]
    fn a_larger_receive_buffer_is_announced_and_lets_the_peer_send_that_much() {
        let (mut a, mut b, ab, ba) = connected();
        assert_eq!(a.send(ab, &[1; 300]).unwrap(), 64, "the default buffer");
        deliver(&mut a, &mut b);
        b.set_buf_alloc(ba, 200).unwrap();
        let update = b.poll_transmit().unwrap();
        assert_eq!((update.header.op, update.header.buf_alloc), (Op::CreditUpdate, 200));
        a.handle(&wire(&update)).unwrap();
        // 64 unread of 200: 136 more may be in flight, and B takes them.
        assert_eq!(a.send(ab, &[2; 300]).unwrap(), 136);
        assert_eq!(a.send(ab, &[2; 300]).unwrap(), 0);
        deliver(&mut a, &mut b);
        assert_eq!(b.buffered(ba), 200);
        // Reading a quarter of the new buffer announces the freed credit.
        let mut buf = [0u8; 50];
        assert_eq!(b.recv(ba, &mut buf).unwrap(), Read::Data(50));
        let update = b.poll_transmit().unwrap();
        assert_eq!(
            (update.header.op, update.header.fwd_cnt, update.header.buf_alloc),
            (Op::CreditUpdate, 50, 200)
        );
        // A byte past the larger buffer is still an overrun.
        assert_eq!(
            b.handle(&Header::rw(1000, 80, 51).packet(&[0; 51])),
            Err(Violation::CreditOverrun { id: ba, len: 51, credit: 50 })
        );
    }

    #[test]
    fn a_receive_buffer_never_shrinks_nor_passes_the_maximum_or_the_budget() {
        let (_, mut b, _, ba) = connected();
        let refused = |asked, now| Err(SessionError::BufferSize { id: ba, asked, now, max: 256 });
        assert_eq!(b.set_buf_alloc(ba, 63), refused(63, 64));
        assert_eq!(b.set_buf_alloc(ba, 257), refused(257, 64));
        b.set_buf_alloc(ba, 256).unwrap();
        assert_eq!(b.set_buf_alloc(ba, 255), refused(255, 256));
        b.set_buf_alloc(ba, 256).unwrap();
        assert_eq!(b.stats().queued_control, 1, "one credit update, for the one change");
        // The budget (512) holds 256 + 64 each: four more connections, not seven.
        let new = |n: u32| ConnId { local: 2000 + n, peer: 80 };
        for n in 0..4 {
            b.connect(new(n)).unwrap();
        }
        assert_eq!(b.connect(new(4)), Err(SessionError::OverBudget { budget: 512 }));
        // The budget is promised to the byte: asking for the size a connection has is fine.
        b.set_buf_alloc(new(0), 64).unwrap();
        // Raising another past the budget fails and changes nothing.
        assert_eq!(b.set_buf_alloc(new(0), 65), Err(SessionError::OverBudget { budget: 512 }));
        // A connection gone gives back what it was promised: the large one, closed by the
        // peer's reset, and released.
        b.handle(&Header::rst(1000, 80).packet(&[])).unwrap();
        b.close(ba);
        for n in 4..8 {
            b.connect(new(n)).unwrap();
        }
        assert_eq!(b.connect(new(8)), Err(SessionError::TooManyConnections));
    }

    #[test]
    fn a_lost_link_gives_back_what_its_closing_connections_were_promised() {
        let (_, mut b, _, ba) = connected();
        let other = ConnId { local: 81, peer: 1001 };
        b.connect(other).unwrap();
        b.set_buf_alloc(ba, 256).unwrap();
        b.set_buf_alloc(other, 128).unwrap();
        // Closing: forgotten as the link goes; the other stays (closed) until released.
        b.close(ba);
        b.peer_gone();
        promises_within_budget(&b).unwrap();
        assert_eq!((b.len(), b.raised), (1, 64));
    }

    #[test]
    fn a_connection_asked_for_learns_its_larger_buffer_from_the_response() {
        let (mut a, mut b) = (Session::new(small()), Session::new(small()));
        let (ab, ba) = (ConnId { local: 1000, peer: 80 }, ConnId { local: 80, peer: 1000 });
        a.connect(ab).unwrap();
        deliver(&mut a, &mut b);
        b.set_buf_alloc(ba, 128).unwrap();
        b.accept(ba).unwrap();
        let response = b.poll_transmit().unwrap();
        assert_eq!((response.header.op, response.header.buf_alloc), (Op::Response, 128));
        assert_eq!(b.poll_transmit(), None, "no credit update besides");
        a.handle(&wire(&response)).unwrap();
        assert_eq!(a.send(ab, &[0; 200]).unwrap(), 128);
        // Our own connect: the update follows the REQUEST.
        let (ac, ca) = (ConnId { local: 1001, peer: 81 }, ConnId { local: 81, peer: 1001 });
        a.connect(ac).unwrap();
        a.set_buf_alloc(ac, 100).unwrap();
        deliver(&mut a, &mut b);
        b.accept(ca).unwrap();
        deliver(&mut b, &mut a);
        assert_eq!(b.send(ca, &[0; 200]).unwrap(), 100);
    }

    #[test]
    fn refused_request_ends_with_refused() {
        let (mut a, mut b) = (Session::new(small()), Session::new(small()));
        let id = ConnId { local: 5, peer: 6 };
        a.connect(id).unwrap();
        deliver(&mut a, &mut b);
        b.refuse(ConnId { local: 6, peer: 5 }).unwrap();
        deliver(&mut b, &mut a);
        assert_eq!(events(&mut a), vec![Event::Closed(id, CloseReason::Refused)]);
        assert_eq!(a.send(id, b"x"), Err(SessionError::Closed(id, CloseReason::Refused)));
        a.close(id);
        assert!(a.is_empty());
    }

    #[test]
    fn credit_bounds_what_is_in_flight_and_returns_on_read() {
        let (mut a, mut b, ia, ib) = connected();
        assert_eq!(a.send(ia, &[1u8; 100]).unwrap(), 64, "at most the advertised buffer");
        assert_eq!(a.send(ia, b"more").unwrap(), 0);
        deliver(&mut a, &mut b);
        assert_eq!(events(&mut b), vec![Event::Readable(ib)]);
        let mut buf = [0u8; 40];
        assert_eq!(b.recv(ib, &mut buf).unwrap(), Read::Data(40));
        // 40 >= 64/2 freed: B announces it, and A's blocked sender is told.
        deliver(&mut b, &mut a);
        assert_eq!(events(&mut a), vec![Event::Writable(ia)]);
        assert_eq!(a.send(ia, &[2u8; 100]).unwrap(), 40);
    }

    #[test]
    fn a_payload_read_straight_into_the_reader_counts_as_read_and_frees_its_credit() {
        let config = SessionConfig { buf_alloc: 128 << 10, rx_budget: 8 * (128 << 10), ..small() };
        let (mut a, mut b, ia, ib) = connected_with(config);
        let data: Vec<u8> = (0..40 << 10).map(|i: u32| (i % 253) as u8).collect();
        assert_eq!(a.send(ia, &data).unwrap(), data.len());
        assert_eq!(a.send(ia, &[9u8; 5000]).unwrap(), 5000);
        let (first, second) = (a.poll_transmit().unwrap(), a.poll_transmit().unwrap());
        // Only large data for a connection with nothing queued goes straight to its reader.
        let mut small = first.header;
        small.len = OWN_BUFFER as u32 - 1;
        assert_eq!(b.direct_receiver(&small), None);
        let mut elsewhere = first.header;
        elsewhere.dst_port = 81;
        assert_eq!(b.direct_receiver(&elsewhere), None);
        assert_eq!(b.direct_receiver(&first.header), Some(ib));
        // 30 KiB went to the reader; the rest waits in the queue.
        let read = 30 << 10;
        b.handle_direct(&first.header, read, first.payload[read..].to_vec()).unwrap();
        assert_eq!(b.stats().direct_reads, 1);
        assert_eq!(b.buffered(ib), data.len() - read);
        assert_eq!(b.direct_receiver(&second.header), None, "bytes are queued ahead of it");
        let mut buf = vec![0u8; 64 << 10];
        assert_eq!(b.recv(ib, &mut buf).unwrap(), Read::Data(data.len() - read));
        assert_eq!(&buf[..data.len() - read], &data[read..]);
        // All 40 KiB count as read: more than a quarter of the buffer, so the peer is told.
        let update = b.poll_transmit().unwrap();
        assert_eq!((update.header.op, update.header.fwd_cnt), (Op::CreditUpdate, data.len() as u32));
        // A packet read whole into the reader leaves nothing queued and wakes nobody.
        events(&mut b);
        assert_eq!(b.direct_receiver(&second.header), Some(ib));
        b.handle_direct(&second.header, 5000, Vec::new()).unwrap();
        assert_eq!((b.buffered(ib), events(&mut b)), (0, vec![]));
        assert_eq!(b.recv(ib, &mut buf).unwrap(), Read::WouldBlock);
    }

    #[test]
    fn a_peer_that_overruns_its_credit_is_a_violation() {
        let (_a, mut b, _ia, ib) = connected();
        let bytes = Header::rw(ib.peer, ib.local, 65).packet(&[0u8; 65]);
        assert!(matches!(b.handle(&bytes), Err(Violation::CreditOverrun { len: 65, credit: 64, .. })));
        // And a lying length is caught before anything else.
        let short = Header::rw(ib.peer, ib.local, 10).packet(&[0u8; 3]);
        assert_eq!(b.handle(&short), Err(Violation::PayloadMismatch { announced: 10, got: 3 }));
    }

    #[test]
    fn half_close_then_close_is_orderly() {
        let (mut a, mut b, ia, ib) = connected();
        a.send(ia, b"bye").unwrap();
        a.shutdown_send(ia).unwrap();
        assert_eq!(a.send(ia, b"x"), Err(SessionError::SendShut(ia)));
        deliver(&mut a, &mut b);
        let mut buf = [0u8; 8];
        assert_eq!(b.recv(ib, &mut buf).unwrap(), Read::Data(3));
        assert_eq!(b.recv(ib, &mut buf).unwrap(), Read::Eof);
        // B can still answer.
        assert_eq!(b.send(ib, b"ok").unwrap(), 2);
        deliver(&mut b, &mut a);
        assert_eq!(a.recv(ia, &mut buf).unwrap(), Read::Data(2));
        // B closes: A gets the RST-confirmed end; both sides forget the pair.
        b.close(ib);
        deliver(&mut b, &mut a);
        assert!(events(&mut a).contains(&Event::Closed(ia, CloseReason::Finished)));
        deliver(&mut a, &mut b);
        assert!(b.is_empty());
        a.close(ia);
        assert!(a.is_empty());
    }

    #[test]
    fn packets_for_unknown_connections_get_rst_and_rst_never_gets_rst() {
        let mut b = Session::new(small());
        b.handle(&Header::rw(9, 80, 1).packet(&[0])).unwrap();
        assert_eq!(b.poll_transmit().map(|t| t.header.op), Some(Op::Rst));
        b.handle(&Header::rst(9, 80).encode()).unwrap();
        assert_eq!(b.poll_transmit(), None);
    }

    #[test]
    fn peer_gone_ends_every_connection() {
        let (mut a, _b, ia, _ib) = connected();
        a.peer_gone();
        assert_eq!(events(&mut a), vec![Event::Closed(ia, CloseReason::PeerGone)]);
        assert_eq!(a.send(ia, b"x"), Err(SessionError::Closed(ia, CloseReason::PeerGone)));
    }

    fn packet(op: Op, src: u32, dst: u32) -> Vec<u8> {
        Header::new(op, src, dst).encode().to_vec()
    }

    fn drain(s: &mut Session) -> Vec<Transmit> {
        std::iter::from_fn(|| s.poll_transmit()).collect()
    }

    #[test]
    fn credit_requests_are_answered_by_one_pending_update_carrying_the_latest_credit() {
        let (mut a, mut b, ia, ib) = connected();
        assert_eq!(a.send(ia, &[7u8; 60]).unwrap(), 60);
        deliver(&mut a, &mut b);
        // A asks 1,000 times and never reads; B reads in between.
        for i in 0..1000 {
            b.handle(&packet(Op::CreditRequest, ia.local, ia.peer)).unwrap();
            if i == 500 {
                let mut buf = [0u8; 60];
                assert_eq!(b.recv(ib, &mut buf).unwrap(), Read::Data(60));
            }
        }
        assert_eq!(b.stats().queued_control, 1, "{:?}", b.stats());
        assert_eq!(b.stats().coalesced, 999 + 1, "999 requests and the read's own update");
        let out = drain(&mut b);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].header.op, Op::CreditUpdate);
        assert_eq!(out[0].header.fwd_cnt, 60, "the update announces what was read after it was queued");
        // The next request gets a new update.
        b.handle(&packet(Op::CreditRequest, ia.local, ia.peer)).unwrap();
        assert_eq!(drain(&mut b).len(), 1);
    }

    #[test]
    fn rsts_are_one_per_port_pair_and_a_flood_of_new_pairs_stops_the_input() {
        let mut b = Session::new(small());
        for _ in 0..1000 {
            b.handle(&packet(Op::CreditUpdate, 9, 80)).unwrap();
            b.handle(&packet(Op::CreditRequest, 9, 80)).unwrap();
        }
        assert_eq!(b.stats().queued_control, 1);
        let bound = small().control_bound();
        let mut port = 100;
        while b.wants_input() {
            b.handle(&packet(Op::CreditRequest, port, 80)).unwrap();
            port += 1;
            assert!(port < 1000, "still wants input after {port} RSTs");
        }
        assert_eq!(b.stats().queued_control, bound);
        assert_eq!(drain(&mut b).len(), bound);
        assert!(b.wants_input());
        // Once sent, an RST to the same pair is sent again.
        b.handle(&packet(Op::CreditUpdate, 9, 80)).unwrap();
        assert_eq!(drain(&mut b).len(), 1);
    }

    #[test]
    fn connections_past_the_receive_budget_are_refused_until_one_goes() {
        let cfg = SessionConfig { rx_budget: 3 * 64, ..small() };
        let (mut a, mut b) = (Session::new(small()), Session::new(cfg));
        let ids: Vec<ConnId> = (0..4).map(|i| ConnId { local: 1000 + i, peer: 80 }).collect();
        for id in &ids {
            a.connect(*id).unwrap();
        }
        deliver(&mut a, &mut b);
        for e in events(&mut b) {
            if let Event::Requested(id) = e {
                b.accept(id).unwrap();
            }
        }
        assert_eq!(b.len(), 3);
        assert_eq!(b.stats().refused_budget, 1);
        deliver(&mut b, &mut a);
        let got = events(&mut a);
        assert_eq!(got.iter().filter(|e| matches!(e, Event::Connected(_))).count(), 3, "{got:?}");
        assert!(got.contains(&Event::Closed(ids[3], CloseReason::Refused)), "{got:?}");
        assert_eq!(b.connect(ConnId { local: 5, peer: 5 }), Err(SessionError::OverBudget { budget: 3 * 64 }));
        // Closing one lets the next in.
        a.close(ids[0]);
        a.close(ids[3]);
        deliver(&mut a, &mut b);
        deliver(&mut b, &mut a);
        // B's side of the closed one stays until B's local side releases it.
        assert_eq!(b.len(), 3);
        assert!(
            events(&mut b).contains(&Event::Closed(ConnId { local: 80, peer: 1000 }, CloseReason::Finished))
        );
        b.close(ConnId { local: 80, peer: 1000 });
        assert_eq!(b.len(), 2);
        a.connect(ids[3]).unwrap();
        deliver(&mut a, &mut b);
        assert_eq!(events(&mut b), vec![Event::Requested(ConnId { local: 80, peer: 1003 })]);
    }

    #[test]
    fn at_most_a_bounded_number_of_buffers_wait_for_reuse_and_only_fitting_ones_are_reused() {
        let mut s = Session::new(small());
        s.recycle(Vec::new());
        assert!(s.spare.is_empty(), "a buffer without room kept");
        for _ in 0..3 * SPARE_BUFFERS {
            s.recycle(Vec::with_capacity(8192));
        }
        assert_eq!(s.spare.len(), SPARE_BUFFERS, "kept past the bound");

        let mut s = Session::new(small());
        let fitting = Vec::with_capacity(8192);
        let at = fitting.as_ptr();
        s.recycle(Vec::with_capacity(64 << 10));
        s.recycle(fitting);
        s.recycle(Vec::with_capacity(4096));
        let reused = s.payload_buffer(8000);
        assert_eq!(reused.as_ptr(), at, "the one buffer within an eighth is reused");
        let fresh = s.payload_buffer(8000);
        assert!(
            fresh.capacity() >= 8000 && fresh.capacity() <= 9000,
            "too small or too large a spare was taken"
        );
        assert_eq!(s.spare.len(), 2);
    }

    #[test]
    fn data_waits_for_room_in_the_transmit_queue() {
        let big =
            SessionConfig { buf_alloc: 1 << 20, rx_budget: u64::MAX, max_transmit_bytes: 1000, ..small() };
        let (mut a, mut b) = (Session::new(big.clone()), Session::new(big));
        let ia = ConnId { local: 1, peer: 2 };
        a.connect(ia).unwrap();
        deliver(&mut a, &mut b);
        b.accept(ConnId { local: 2, peer: 1 }).unwrap();
        deliver(&mut b, &mut a);
        events(&mut a);
        let mut sent = 0;
        loop {
            let n = a.send(ia, &[1u8; 300]).unwrap();
            if n == 0 {
                break;
            }
            sent += n;
        }
        assert!(a.queued_bytes() <= 1000 && sent > 900, "{sent} {}", a.queued_bytes());
        assert_eq!(events(&mut a), vec![]);
        drain(&mut a);
        assert_eq!(events(&mut a), vec![Event::Writable(ia)]);
        assert!(a.send(ia, &[1u8; 300]).unwrap() > 0);
    }

    #[derive(Debug, Clone)]
    enum Step {
        Connect(u8),
        Deliver(bool, u8),
        Send(bool, u8, u8),
        Recv(bool, u8, u8),
        Shutdown(bool, u8),
        Close(bool, u8),
        Grow(bool, u8, u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..4).prop_map(Step::Connect),
            (any::<bool>(), 1u8..6).prop_map(|(d, n)| Step::Deliver(d, n)),
            (any::<bool>(), 0u8..4, 1u8..100).prop_map(|(s, c, n)| Step::Send(s, c, n)),
            (any::<bool>(), 0u8..4, 1u8..100).prop_map(|(s, c, n)| Step::Recv(s, c, n)),
            (any::<bool>(), 0u8..4).prop_map(|(s, c)| Step::Shutdown(s, c)),
            (any::<bool>(), 0u8..4).prop_map(|(s, c)| Step::Close(s, c)),
            (any::<bool>(), 0u8..4, 0u8..100).prop_map(|(s, c, n)| Step::Grow(s, c, n)),
        ]
    }

    /// A packet a hostile peer might send: small port ranges so that it hits live
    /// connections, credit fields that are mostly plausible.
    fn hostile_packet() -> impl Strategy<Value = Vec<u8>> {
        (
            1u8..=7,
            0u32..3,
            prop_oneof![0u32..12, 0u32..10_000],
            any::<u8>(),
            0u32..80,
            prop_oneof![Just(0u32), any::<u32>()],
        )
            .prop_map(|(op, src, dst, flags, len, fwd_cnt)| {
                let op = Op::from_byte(op).unwrap_or(Op::Rw);
                let mut h = Header::new(op, src, dst);
                h.flags = match op {
                    Op::Shutdown => u16::from(flags % 3) + 1,
                    _ => 0,
                };
                h.len = if op == Op::Rw { len.max(1) } else { 0 };
                h.buf_alloc = 1 << 20;
                h.fwd_cnt = fwd_cnt;
                h.packet(&vec![0xA5; h.len as usize])
            })
    }

    /// What the session counts as promised beyond the default buffers is what its connections
    /// hold, and all of it stays within the budget.
    fn promises_within_budget(s: &Session) -> Result<(), TestCaseError> {
        let default = u64::from(s.config.buf_alloc);
        let raised: u64 = s.conns.values().map(|c| u64::from(c.buf_alloc) - default).sum();
        prop_assert_eq!(s.raised, raised);
        let promised: u64 = s.conns.values().map(|c| u64::from(c.buf_alloc)).sum();
        prop_assert!(promised <= s.config.rx_budget, "{} promised", promised);
        Ok(())
    }

    #[derive(Debug, Clone)]
    enum Hostile {
        /// The peer sends a packet (taken only while the session wants input, as the shell does).
        Packet(Vec<u8>),
        /// The link takes this many of our packets.
        Drain(u8),
        /// Local side: accept what was requested, read, send, close.
        Accept,
        Recv(u32, u32),
        Send(u32, u32),
        Close(u32, u32),
        Grow(u32, u32, u32),
    }

    fn hostile_step() -> impl Strategy<Value = Hostile> {
        prop_oneof![
            6 => hostile_packet().prop_map(Hostile::Packet),
            1 => (0u8..4).prop_map(Hostile::Drain),
            1 => Just(Hostile::Accept),
            1 => (0u32..12, 0u32..3).prop_map(|(l, p)| Hostile::Recv(l, p)),
            1 => (0u32..12, 0u32..3).prop_map(|(l, p)| Hostile::Send(l, p)),
            1 => (0u32..12, 0u32..3).prop_map(|(l, p)| Hostile::Close(l, p)),
            1 => (0u32..12, 0u32..3, 0u32..300).prop_map(|(l, p, n)| Hostile::Grow(l, p, n)),
        ]
    }

    proptest! {
        /// A hostile peer's arbitrary packets, read as the shell reads (only while the session
        /// wants input), with local calls and partial draining in between: the queued control
        /// packets never exceed the bound by more than what one packet and the local side's
        /// own calls add (at most four per connection), queued
        /// data never exceeds `max_transmit_bytes`, and at no moment do two `RST`s for one pair
        /// or two `CREDIT_UPDATE`s for one connection wait together.
        #[test]
        fn a_hostile_peer_cannot_grow_the_transmit_queue(steps in proptest::collection::vec(hostile_step(), 1..400)) {
            let cfg = SessionConfig { max_transmit_bytes: 512, ..small() };
            let bound = cfg.control_bound();
            let mut s = Session::new(cfg.clone());
            for st in steps {
                match st {
                    Hostile::Packet(p) => {
                        if s.wants_input() && s.handle(&p).is_err() {
                            // A violation closes the link.
                            return Ok(());
                        }
                    }
                    Hostile::Drain(n) => {
                        for _ in 0..n {
                            s.poll_transmit();
                        }
                    }
                    Hostile::Accept => {
                        while let Some(e) = s.poll_event() {
                            if let Event::Requested(id) = e {
                                if id.local % 2 == 0 { let _ = s.accept(id); } else { let _ = s.refuse(id); }
                            }
                        }
                    }
                    Hostile::Recv(l, p) => { let _ = s.recv(ConnId { local: l, peer: p }, &mut [0u8; 50]); }
                    Hostile::Send(l, p) => { let _ = s.send(ConnId { local: l, peer: p }, &[3u8; 200]); }
                    Hostile::Close(l, p) => s.close(ConnId { local: l, peer: p }),
                    Hostile::Grow(l, p, n) => { let _ = s.set_buf_alloc(ConnId { local: l, peer: p }, n); }
                }
                promises_within_budget(&s)?;
                let st = s.stats();
                prop_assert!(st.queued_control <= bound + 1 + 4 * cfg.connection_limit(), "{:?}", st);
                prop_assert!(s.queued_data <= cfg.max_transmit_bytes, "{} queued data bytes", s.queued_data);
                prop_assert!(s.len() <= cfg.max_connections);
                // The queue's content at this moment: no duplicate answers.
                let mut rsts = HashSet::new();
                let mut updates = HashSet::new();
                for t in &s.transmit {
                    let id = (t.header.src_port, t.header.dst_port);
                    match t.header.op {
                        Op::Rst => prop_assert!(rsts.insert(id), "two RSTs for {:?} wait together", id),
                        Op::CreditUpdate => prop_assert!(updates.insert(id), "two updates for {:?} wait together", id),
                        _ => {}
                    }
                }
                let counted = s.transmit.iter().map(|t| HEADER_LEN + t.payload.len()).sum::<usize>();
                prop_assert_eq!(counted, st.queued_bytes);
                prop_assert_eq!(s.transmit.iter().filter(|t| t.header.op != Op::Rw).count(), st.queued_control);
            }
        }
    }

    /// Two correct sessions under random interleavings of connect / send / recv / shutdown /
    /// close on both sides and partial delivery (sends and reads of `scale` times the steps'
    /// sizes): no protocol violation is ever reported, nothing exceeds its credit, and every
    /// connection delivers exactly a prefix of what was sent, in order — all of it if neither
    /// side closed.
    fn two_sessions_agree_under(
        steps: Vec<Step>,
        config: SessionConfig,
        scale: usize,
    ) -> Result<(), TestCaseError> {
        let mut s = [Session::new(config.clone()), Session::new(config)];
        // Packets are handed over in turn whole, with the payload in a buffer of its own (as
        // the shell does with large ones), and where the session allows it, copied straight
        // into the reader's buffer, all or only part of it (the rest joining the queue): those
        // bytes come back, with their connection, to be counted as received.
        let mut turn = 0u32;
        let mut deliver = |to: &mut Session, p: &[u8]| -> Result<Option<(ConnId, Vec<u8>)>, Violation> {
            turn = turn.wrapping_add(1);
            let Ok(h) = Header::decode(p) else { return to.handle(p).map(|()| None) };
            let payload = &p[HEADER_LEN..];
            match turn % 3 {
                0 => to.handle(p).map(|()| None),
                2 if to.direct_receiver(&h).is_some() => {
                    let id = to.direct_receiver(&h).unwrap_or_else(|| unreachable!());
                    let read = if turn % 2 == 0 { payload.len() } else { payload.len() / 3 };
                    to.handle_direct(&h, read, payload[read..].to_vec())?;
                    Ok(Some((id, payload[..read].to_vec())))
                }
                _ => {
                    // As the shell does: sets the length (a spare buffer holds stale bytes) and
                    // overwrites it.
                    let mut buffer = to.payload_buffer(h.len as usize);
                    buffer.resize(h.len as usize, 0xEE);
                    buffer.copy_from_slice(payload);
                    to.handle_owned(&h, buffer).map(|()| None)
                }
            }
        };
        // Counts bytes a delivery put straight into a reader's buffer as received by that side's
        // connection.
        fn received(got: &mut [[Vec<u8>; 4]; 2], direct: Option<(ConnId, Vec<u8>)>) {
            if let Some((id, bytes)) = direct {
                let (side, c) = if id.local >= 1000 { (0, id.local - 1000) } else { (1, id.local - 80) };
                got[side][c as usize].extend_from_slice(&bytes);
            }
        }
        let mut wires: [VecDeque<Vec<u8>>; 2] = [VecDeque::new(), VecDeque::new()];
        // Per connection index c (A port 1000+c -> B port 80+c): bytes sent / received by
        // side 0 (A) and side 1 (B).
        let mut sent: [[Vec<u8>; 4]; 2] = Default::default();
        let mut got: [[Vec<u8>; 4]; 2] = Default::default();
        let mut closed = [false; 4];
        let id = |side: usize, c: u8| {
            if side == 0 {
                ConnId { local: 1000 + c as u32, peer: 80 + c as u32 }
            } else {
                ConnId { local: 80 + c as u32, peer: 1000 + c as u32 }
            }
        };
        let mut next = 0u8;
        let pump = |s: &mut [Session; 2], wires: &mut [VecDeque<Vec<u8>>; 2]| {
            for side in 0..2 {
                while let Some(t) = s[side].poll_transmit() {
                    wires[side].push_back(wire(&t));
                }
                // B accepts every request.
                while let Some(e) = s[side].poll_event() {
                    // (It may have ended meanwhile: then accept says so.)
                    if let Event::Requested(r) = e {
                        let _ = s[side].accept(r);
                    }
                }
                while let Some(t) = s[side].poll_transmit() {
                    wires[side].push_back(wire(&t));
                }
            }
        };
        for st in steps {
            match st {
                // One incarnation per port pair, so that streams can be compared.
                Step::Connect(c) if !closed[c as usize] => {
                    let _ = s[0].connect(id(0, c));
                }
                Step::Connect(_) => {}
                Step::Deliver(dir, n) => {
                    let from = usize::from(dir);
                    for _ in 0..n {
                        if let Some(p) = wires[from].pop_front() {
                            let direct = deliver(&mut s[1 - from], &p);
                            prop_assert!(direct.is_ok(), "{:?}", direct);
                            received(&mut got, direct.ok().flatten());
                        }
                    }
                }
                Step::Send(side, c, n) => {
                    let side = usize::from(side);
                    let data: Vec<u8> = (0..n as usize * scale)
                        .map(|_| {
                            next = next.wrapping_add(1);
                            next
                        })
                        .collect();
                    // Some sends go straight to the wire while nothing is queued, as the shell
                    // writes them from the connection's task; some of those find no room there
                    // (the write declines) and are queued after all.
                    let mut k = None;
                    if n % 2 == 0 && !s[side].has_transmit() {
                        let wire = &mut wires[side];
                        let direct = s[side].send_direct(id(side, c), &data, |header, payload| {
                            if n % 3 == 0 {
                                return false;
                            }
                            wire.push_back([header, payload].concat());
                            true
                        });
                        k = direct.ok().flatten();
                    }
                    if k.is_none() {
                        k = s[side].send(id(side, c), &data).ok();
                    }
                    if let Some(k) = k {
                        sent[side][c as usize].extend_from_slice(&data[..k]);
                    }
                }
                Step::Recv(side, c, n) => {
                    let side = usize::from(side);
                    let mut buf = vec![0u8; n as usize * scale];
                    if let Ok(Read::Data(k)) = s[side].recv(id(side, c), &mut buf) {
                        got[side][c as usize].extend_from_slice(&buf[..k]);
                    }
                    // Some reads put what they queued (a credit update) on the wire themselves,
                    // as the shell does from the reader's task; the wire takes up to n % 3
                    // packets, and the rest stays queued.
                    if n % 2 == 1 {
                        let (wire, mut room) = (&mut wires[side], n % 3);
                        s[side].transmit_direct(|header, payload| {
                            if room == 0 {
                                return false;
                            }
                            room -= 1;
                            wire.push_back([header, payload].concat());
                            true
                        });
                    }
                }
                Step::Shutdown(side, c) => {
                    let _ = s[usize::from(side)].shutdown_send(id(usize::from(side), c));
                }
                Step::Close(side, c) => {
                    s[usize::from(side)].close(id(usize::from(side), c));
                    closed[c as usize] = true;
                }
                // A receive buffer grows (past the maximum or the budget: refused), and the
                // peer learns it in its time.
                Step::Grow(side, c, n) => {
                    let (s, id) = (&mut s[usize::from(side)], id(usize::from(side), c));
                    if let Some(now) = s.conns.get(&id).map(|c| c.buf_alloc) {
                        let _ = s.set_buf_alloc(id, now.saturating_add(u32::from(n) * scale as u32));
                    }
                }
            }
            pump(&mut s, &mut wires);
            for side in &s {
                promises_within_budget(side)?;
            }
            for side in 0..2 {
                for c in 0..4 {
                    let (g, o) = (&got[side][c], &sent[1 - side][c]);
                    prop_assert!(
                        o.starts_with(g),
                        "side {} conn {} received bytes that were not sent in that order",
                        side,
                        c
                    );
                }
            }
        }
        // Quiesce: deliver everything, reading as we go, until nothing moves.
        for _ in 0..10_000 {
            let mut moved = false;
            for from in 0..2 {
                while let Some(p) = wires[from].pop_front() {
                    let direct = deliver(&mut s[1 - from], &p);
                    prop_assert!(direct.is_ok(), "{:?}", direct);
                    received(&mut got, direct.ok().flatten());
                    moved = true;
                }
            }
            for side in 0..2 {
                for c in 0..4u8 {
                    let mut buf = vec![0u8; 64 * scale];
                    while let Ok(Read::Data(k)) = s[side].recv(id(side, c), &mut buf) {
                        got[side][c as usize].extend_from_slice(&buf[..k]);
                        moved = true;
                    }
                }
            }
            pump(&mut s, &mut wires);
            if !moved && wires.iter().all(|w| w.is_empty()) {
                break;
            }
        }
        for side in 0..2 {
            for c in 0..4 {
                let (g, o) = (&got[side][c], &sent[1 - side][c]);
                prop_assert!(o.starts_with(g));
                if !closed[c] {
                    prop_assert_eq!(g.len(), o.len(), "side {} conn {} lost data", side, c);
                }
            }
        }
        Ok(())
    }

    proptest! {
        /// Small payloads, small buffers: every credit and queue edge is hit often.
        #[test]
        fn two_sessions_agree(steps in proptest::collection::vec(step(), 1..120)) {
            two_sessions_agree_under(steps, small(), 1)?;
        }

        /// Payloads up to the largest packet, so that receive queues hold buffers handed over
        /// whole as well as copied ones.
        #[test]
        fn two_sessions_agree_on_large_payloads(steps in proptest::collection::vec(step(), 1..60)) {
            let config = SessionConfig {
                buf_alloc: 128 << 10,
                max_buf_alloc: 512 << 10,
                rx_budget: 8 * (128 << 10),
                ..small()
            };
            two_sessions_agree_under(steps, config, 1000)?;
        }
    }
}
