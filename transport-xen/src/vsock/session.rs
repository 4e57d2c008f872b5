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

use std::collections::{HashMap, VecDeque};

use super::packet::{Header, MAX_PAYLOAD, Op, PacketError, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// A connection on a link: (local port, peer port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId {
    /// Our port.
    pub local: u32,
    /// The peer's port.
    pub peer: u32,
}

/// Tunables of a session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Receive buffer per connection, in bytes (advertised as `buf_alloc`).
    pub buf_alloc: u32,
    /// Most connections (in any state) on the link; further `REQUEST`s are refused.
    pub max_connections: usize,
}

impl Default for SessionConfig {
    /// 256 KiB per connection, 65,536 connections.
    fn default() -> Self {
        SessionConfig { buf_alloc: 256 << 10, max_connections: 1 << 16 }
    }
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
    rx: VecDeque<u8>,
    rx_cnt: u32,
    fwd_cnt: u32,
    announced_fwd_cnt: u32,
    peer_shut_send: bool,
}

impl Conn {
    fn new(state: State) -> Conn {
        Conn {
            state,
            tx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            send_blocked: false,
            local_shut_send: false,
            peer_shut_rcv: false,
            rx: VecDeque::new(),
            rx_cnt: 0,
            fwd_cnt: 0,
            announced_fwd_cnt: 0,
            peer_shut_send: false,
        }
    }

    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
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
    events: VecDeque<Event>,
    /// Payload buffers handed back by [`Session::recycle`], reused by [`Session::send`]: a
    /// stream of 64 KiB packets does not allocate (and fault in) a fresh buffer per packet.
    spare: Vec<Vec<u8>>,
}

/// Most payload buffers [`Session`] keeps for reuse.
const SPARE_BUFFERS: usize = 32;

impl Session {
    /// An empty session.
    pub fn new(config: SessionConfig) -> Session {
        Session {
            config,
            conns: HashMap::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            spare: Vec::new(),
        }
    }

    /// Hands back the payload buffer of a [`Transmit`] that has been put on the link, for reuse.
    pub fn recycle(&mut self, mut payload: Vec<u8>) {
        if payload.capacity() > 0 && self.spare.len() < SPARE_BUFFERS {
            payload.clear();
            self.spare.push(payload);
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

    /// The next packet to put on the link.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmit.pop_front()
    }

    /// The next event for the local side.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    fn header(&self, op: Op, id: ConnId, conn: Option<&Conn>) -> Header {
        let mut h = Header::new(op, id.local, id.peer);
        if let Some(c) = conn {
            h.buf_alloc = self.config.buf_alloc;
            h.fwd_cnt = c.fwd_cnt;
        }
        h
    }

    fn send_control(&mut self, op: Op, id: ConnId, flags: u16) {
        let mut header = self.header(op, id, self.conns.get(&id));
        header.flags = flags;
        if let Some(c) = self.conns.get_mut(&id) {
            c.announced_fwd_cnt = c.fwd_cnt;
        }
        self.transmit.push_back(Transmit { header, payload: Vec::new() });
    }

    /// Opens a connection from our port `id.local` to the peer's `id.peer`.
    pub fn connect(&mut self, id: ConnId) -> Result<(), SessionError> {
        if self.conns.contains_key(&id) {
            return Err(SessionError::InUse(id));
        }
        if self.conns.len() >= self.config.max_connections {
            return Err(SessionError::TooManyConnections);
        }
        self.conns.insert(id, Conn::new(State::Connecting));
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
                self.conns.remove(&id);
                self.transmit.push_back(Transmit {
                    header: Header::new(Op::Rst, id.local, id.peer),
                    payload: Vec::new(),
                });
                Ok(())
            }
            Some(_) => Err(SessionError::NotConnected(id)),
            None => Err(SessionError::NotFound(id)),
        }
    }

    /// Sends up to `data.len()` bytes, as much as the peer's credit allows (at most one
    /// packet's worth per call). `Ok(0)` means no credit now: [`Event::Writable`] follows when
    /// there is.
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> Result<usize, SessionError> {
        let buf_alloc = self.config.buf_alloc;
        let conn = self.conns.get_mut(&id).ok_or(SessionError::NotFound(id))?;
        match conn.state {
            State::Established => {}
            State::Closed(r) => return Err(SessionError::Closed(id, r)),
            _ => return Err(SessionError::NotConnected(id)),
        }
        if conn.local_shut_send || conn.peer_shut_rcv {
            return Err(SessionError::SendShut(id));
        }
        let n = (data.len() as u64).min(conn.credit() as u64).min(MAX_PAYLOAD as u64) as u32;
        if n == 0 {
            conn.send_blocked = !data.is_empty();
            return Ok(0);
        }
        conn.tx_cnt = conn.tx_cnt.wrapping_add(n);
        conn.announced_fwd_cnt = conn.fwd_cnt;
        let mut header = Header::new(Op::Rw, id.local, id.peer);
        header.len = n;
        header.buf_alloc = buf_alloc;
        header.fwd_cnt = conn.fwd_cnt;
        let mut payload = self.spare.pop().unwrap_or_default();
        payload.extend_from_slice(&data[..n as usize]);
        self.transmit.push_back(Transmit { header, payload });
        Ok(n as usize)
    }

    /// Reads buffered data. Consuming frees credit; the peer is told once a quarter of the buffer has
    /// been freed since it was last told.
    pub fn recv(&mut self, id: ConnId, buf: &mut [u8]) -> Result<Read, SessionError> {
        let threshold = self.config.buf_alloc / 4;
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
        let n = buf.len().min(conn.rx.len());
        let (front, back) = conn.rx.as_slices();
        let first = n.min(front.len());
        buf[..first].copy_from_slice(&front[..first]);
        buf[first..n].copy_from_slice(&back[..n - first]);
        conn.rx.drain(..n);
        conn.fwd_cnt = conn.fwd_cnt.wrapping_add(n as u32);
        let live = matches!(conn.state, State::Established) && !conn.peer_shut_send;
        if live && conn.fwd_cnt.wrapping_sub(conn.announced_fwd_cnt) >= threshold {
            self.send_control(Op::CreditUpdate, id, 0);
        }
        Ok(Read::Data(n))
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
                conn.rx = VecDeque::new();
                self.send_control(Op::Shutdown, id, SHUTDOWN_SEND | SHUTDOWN_RCV);
            }
            State::Requested => {
                let _ = self.refuse(id);
            }
            State::Closing => {}
            State::Closed(_) => {
                self.conns.remove(&id);
            }
        }
    }

    /// The link went away: every connection ends with [`CloseReason::PeerGone`]. Data that
    /// arrived before stays readable until the connection is released.
    pub fn peer_gone(&mut self) {
        self.conns.retain(|_, c| c.state != State::Closing);
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
    }

    /// Processes one packet from the peer: `bytes` is the header followed by its payload.
    /// An error is a protocol violation: the caller closes the link.
    pub fn handle(&mut self, bytes: &[u8]) -> Result<(), Violation> {
        let h = Header::decode(bytes)?;
        let payload = &bytes[super::packet::HEADER_LEN..];
        if payload.len() != h.len as usize {
            return Err(Violation::PayloadMismatch { announced: h.len, got: payload.len() });
        }
        // The packet's ports are the sender's view: its source is our peer port.
        let id = ConnId { local: h.dst_port, peer: h.src_port };
        if h.op == Op::Request {
            self.on_request(id, &h);
            return Ok(());
        }
        let Some(conn) = self.conns.get_mut(&id) else {
            if h.op != Op::Rst {
                self.transmit.push_back(Transmit {
                    header: Header::new(Op::Rst, id.local, id.peer),
                    payload: Vec::new(),
                });
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
                let credit = self.config.buf_alloc.saturating_sub(in_buffer);
                if conn.peer_shut_send {
                    return Err(Violation::DataAfterShutdown(id));
                }
                if h.len > credit {
                    return Err(Violation::CreditOverrun { id, len: h.len, credit });
                }
                let was_empty = conn.rx.is_empty();
                conn.rx.extend(payload);
                conn.rx_cnt = conn.rx_cnt.wrapping_add(h.len);
                if was_empty {
                    self.events.push_back(Event::Readable(id));
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
                    self.transmit.push_back(Transmit {
                        header: Header::new(Op::Rst, id.local, id.peer),
                        payload: Vec::new(),
                    });
                    if closing {
                        self.conns.remove(&id);
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
                self.transmit.push_back(Transmit {
                    header: Header::new(Op::Rst, id.local, id.peer),
                    payload: Vec::new(),
                });
                self.end(id, CloseReason::Reset);
            }
        }
        Ok(())
    }

    fn on_request(&mut self, id: ConnId, h: &Header) {
        let refuse = Transmit { header: Header::new(Op::Rst, id.local, id.peer), payload: Vec::new() };
        if self.conns.contains_key(&id) {
            // The peer has forgotten this pair while we still hold it: our connection is stale
            // (reset it); the pair stays taken until the local side releases it.
            self.end(id, CloseReason::Reset);
            self.transmit.push_back(refuse);
            return;
        }
        if self.conns.len() >= self.config.max_connections {
            self.transmit.push_back(refuse);
            return;
        }
        let mut conn = Conn::new(State::Requested);
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
            State::Closing | State::Requested => {
                self.conns.remove(&id);
            }
            State::Closed(_) => {}
            _ => {
                conn.state = State::Closed(reason);
                if reason != CloseReason::Finished {
                    conn.rx = VecDeque::new();
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
        let mut b = t.header.encode().to_vec();
        b.extend_from_slice(&t.payload);
        b
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

    fn events(s: &mut Session) -> Vec<Event> {
        std::iter::from_fn(|| s.poll_event()).collect()
    }

    fn small() -> SessionConfig {
        SessionConfig { buf_alloc: 64, max_connections: 8 }
    }

    /// A connects (port 1000 -> 80) and B accepts.
    fn connected() -> (Session, Session, ConnId, ConnId) {
        let (mut a, mut b) = (Session::new(small()), Session::new(small()));
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
    fn a_peer_that_overruns_its_credit_is_a_violation() {
        let (_a, mut b, _ia, ib) = connected();
        let mut h = Header::new(Op::Rw, ib.peer, ib.local);
        h.len = 65;
        let mut bytes = h.encode().to_vec();
        bytes.extend_from_slice(&[0u8; 65]);
        assert!(matches!(b.handle(&bytes), Err(Violation::CreditOverrun { len: 65, credit: 64, .. })));
        // And a lying length is caught before anything else.
        h.len = 10;
        let mut short = h.encode().to_vec();
        short.extend_from_slice(&[0u8; 3]);
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
        let mut h = Header::new(Op::Rw, 9, 80);
        h.len = 1;
        let mut bytes = h.encode().to_vec();
        bytes.push(0);
        b.handle(&bytes).unwrap();
        assert_eq!(b.poll_transmit().map(|t| t.header.op), Some(Op::Rst));
        b.handle(&Header::new(Op::Rst, 9, 80).encode()).unwrap();
        assert_eq!(b.poll_transmit(), None);
    }

    #[test]
    fn peer_gone_ends_every_connection() {
        let (mut a, _b, ia, _ib) = connected();
        a.peer_gone();
        assert_eq!(events(&mut a), vec![Event::Closed(ia, CloseReason::PeerGone)]);
        assert_eq!(a.send(ia, b"x"), Err(SessionError::Closed(ia, CloseReason::PeerGone)));
    }

    #[derive(Debug, Clone)]
    enum Step {
        Connect(u8),
        Deliver(bool, u8),
        Send(bool, u8, u8),
        Recv(bool, u8, u8),
        Shutdown(bool, u8),
        Close(bool, u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..4).prop_map(Step::Connect),
            (any::<bool>(), 1u8..6).prop_map(|(d, n)| Step::Deliver(d, n)),
            (any::<bool>(), 0u8..4, 1u8..100).prop_map(|(s, c, n)| Step::Send(s, c, n)),
            (any::<bool>(), 0u8..4, 1u8..100).prop_map(|(s, c, n)| Step::Recv(s, c, n)),
            (any::<bool>(), 0u8..4).prop_map(|(s, c)| Step::Shutdown(s, c)),
            (any::<bool>(), 0u8..4).prop_map(|(s, c)| Step::Close(s, c)),
        ]
    }

    proptest! {
        /// Two correct sessions under random interleavings of connect / send / recv /
        /// shutdown / close on both sides and partial delivery: no protocol violation is ever
        /// reported, nothing exceeds its credit, and every connection delivers exactly a
        /// prefix of what was sent, in order — all of it if neither side closed.
        #[test]
        fn two_sessions_agree(steps in proptest::collection::vec(step(), 1..120)) {
            let mut s = [Session::new(small()), Session::new(small())];
            let mut wires: [VecDeque<Vec<u8>>; 2] = [VecDeque::new(), VecDeque::new()];
            // Per connection index c (A port 1000+c -> B port 80+c): bytes sent / received by
            // side 0 (A) and side 1 (B).
            let mut sent: [[Vec<u8>; 4]; 2] = Default::default();
            let mut got: [[Vec<u8>; 4]; 2] = Default::default();
            let mut closed = [false; 4];
            let id = |side: usize, c: u8| if side == 0 {
                ConnId { local: 1000 + c as u32, peer: 80 + c as u32 }
            } else {
                ConnId { local: 80 + c as u32, peer: 1000 + c as u32 }
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
                    Step::Connect(c) if !closed[c as usize] => { let _ = s[0].connect(id(0, c)); }
                    Step::Connect(_) => {}
                    Step::Deliver(dir, n) => {
                        let from = usize::from(dir);
                        for _ in 0..n {
                            if let Some(p) = wires[from].pop_front() {
                                prop_assert_eq!(s[1 - from].handle(&p), Ok(()));
                            }
                        }
                    }
                    Step::Send(side, c, n) => {
                        let side = usize::from(side);
                        let data: Vec<u8> = (0..n).map(|_| { next = next.wrapping_add(1); next }).collect();
                        if let Ok(k) = s[side].send(id(side, c), &data) {
                            sent[side][c as usize].extend_from_slice(&data[..k]);
                        }
                    }
                    Step::Recv(side, c, n) => {
                        let side = usize::from(side);
                        let mut buf = vec![0u8; n as usize];
                        if let Ok(Read::Data(k)) = s[side].recv(id(side, c), &mut buf) {
                            got[side][c as usize].extend_from_slice(&buf[..k]);
                        }
                    }
                    Step::Shutdown(side, c) => { let _ = s[usize::from(side)].shutdown_send(id(usize::from(side), c)); }
                    Step::Close(side, c) => {
                        s[usize::from(side)].close(id(usize::from(side), c));
                        closed[c as usize] = true;
                    }
                }
                pump(&mut s, &mut wires);
                for side in 0..2 {
                    for c in 0..4 {
                        let (g, o) = (&got[side][c], &sent[1 - side][c]);
                        prop_assert!(o.starts_with(g), "side {} conn {} received bytes that were not sent in that order", side, c);
                    }
                }
            }
            // Quiesce: deliver everything, reading as we go, until nothing moves.
            for _ in 0..10_000 {
                let mut moved = false;
                for from in 0..2 {
                    while let Some(p) = wires[from].pop_front() {
                        prop_assert_eq!(s[1 - from].handle(&p), Ok(()));
                        moved = true;
                    }
                }
                for side in 0..2 {
                    for c in 0..4u8 {
                        let mut buf = [0u8; 64];
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
        }
    }
}
