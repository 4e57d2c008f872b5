//! The local protocol between a domain's processes and its agent, byte by byte.
//!
//! Every request is a new connection to the agent's Unix stream socket. The process writes one
//! [`Request`]; the agent answers with one [`Reply`]. What follows depends on the request:
//!
//! - `CONNECT`: the socket carries the virtual-socket connection. Process → agent: the raw bytes
//!   to send (a `shutdown(SHUT_WR)` ends the process's sending, a close ends the connection).
//!   Agent → process: [`Frame`]s — data, and one final end frame that says how the connection
//!   ended (the peer finished, reset it, the link was lost, the agent is stopping). A stream that
//!   ends without an end frame means the agent itself went away.
//! - `LISTEN`: the socket holds the port for as long as it is open. Agent → process: one
//!   [`Accepted`] record per incoming connection, with the connection's own socket attached
//!   (`SCM_RIGHTS`), which then carries [`Frame`]s like a `CONNECT` socket.
//! - `STATUS`: the reply's body is an [`AgentStatus`]; the agent then closes the socket.
//!
//! Everything here is parsed from a peer (the agent parses what a local process sends and the
//! reverse): lengths are bounded before anything is allocated, and every reader returns an error
//! rather than panicking. All integers are little-endian.

use std::io;

use dombus_transport_xen::DomId;

/// The first four bytes of every request.
pub const MAGIC: [u8; 4] = *b"DBA1";
/// Bytes of a request before its name.
pub const REQUEST_LEN: usize = 20;
/// Longest domain name a request may carry.
pub const MAX_NAME: usize = 64;
/// Bytes of a reply before its body.
pub const REPLY_LEN: usize = 16;
/// Longest reply body (a status with many links; error texts are cut to [`MAX_TEXT`]).
pub const MAX_BODY: usize = 64 << 10;
/// Longest error text or end-frame reason.
pub const MAX_TEXT: usize = 1024;
/// Most bytes in one data frame.
pub const MAX_FRAME: usize = 64 << 10;
/// Bytes of an [`Accepted`] record.
pub const ACCEPTED_LEN: usize = 16;
/// The unit a request's receive buffer is counted in.
pub const BUFFER_UNIT: u32 = 64 << 10;

/// What a process asks its agent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// A connection to a port of a domain.
    Connect = 1,
    /// The connections to a port of this domain.
    Listen = 2,
    /// What the agent holds.
    Status = 3,
}

/// Whom a `CONNECT` goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A CID: a domain id, `CID_SELF` or `CID_BACKEND`.
    Cid(u32),
    /// A domain by its name in the store (`/local/domain/<id>/name`), resolved by the agent.
    Name(String),
}

/// One request (the first bytes a process writes on a new connection to its agent):
///
/// ```text
/// 0  magic "DBA1"
/// 4  op        u8    1 CONNECT, 2 LISTEN, 3 STATUS
/// 5  buffer    u8    CONNECT, LISTEN: the receive buffer of the connection (of each one
///                    accepted), in 64 KiB units; 0: the domain's default (STATUS: 0)
/// 6  name_len  u8    0..=64 (CONNECT by name when non-zero)
/// 7  reserved  u8    0
/// 8  cid       u32   CONNECT by CID (ignored with a name)
/// 12 port      u32   CONNECT: the peer's port; LISTEN: the port to listen on
/// 16 wait_ms   u32   CONNECT: how long to wait for the listener to be announced (0: not at all)
/// 20 name      name_len bytes of UTF-8
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// What is asked.
    pub op: Op,
    /// The domain (`CONNECT`).
    pub target: Target,
    /// The port.
    pub port: u32,
    /// How long a `CONNECT` waits for its listener to be announced, in milliseconds.
    pub wait_ms: u32,
    /// The receive buffer the agent gives the connection (`LISTEN`: each one it accepts), in
    /// [`BUFFER_UNIT`]s, as `SO_VM_SOCKETS_BUFFER_SIZE` would; 0 leaves the domain's default.
    pub recv_buffer: u8,
}

/// Why a request or a frame is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The first four bytes are not [`MAGIC`].
    #[error("not a dombus agent request (bad magic); is this an agent's socket?")]
    Magic,
    /// An op this agent does not know.
    #[error("unknown operation {0}")]
    Op(u8),
    /// A reserved byte is not zero.
    #[error("reserved bytes must be zero")]
    Reserved,
    /// A name longer than [`MAX_NAME`] or not UTF-8.
    #[error("a domain name must be 1 to {MAX_NAME} bytes of UTF-8 without '/' or control characters")]
    Name,
    /// A length past its bound.
    #[error("{what} of {len} bytes exceeds the {max}-byte limit")]
    TooLong {
        /// What was too long.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An end frame of an unknown kind.
    #[error("unknown end kind {0}")]
    EndKind(u8),
    /// A record or body whose length or contents do not match its format.
    #[error("malformed {0}")]
    Malformed(&'static str),
}

impl From<ProtoError> for io::Error {
    fn from(e: ProtoError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

impl Request {
    /// The request's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let (cid, name) = match &self.target {
            Target::Cid(c) => (*c, &[][..]),
            Target::Name(n) => (0, n.as_bytes()),
        };
        let mut b = Vec::with_capacity(REQUEST_LEN + name.len());
        b.extend_from_slice(&MAGIC);
        // A name longer than the bound is cut here and refused by the agent's decode.
        b.extend_from_slice(&[self.op as u8, self.recv_buffer, name.len().min(255) as u8, 0]);
        b.extend_from_slice(&cid.to_le_bytes());
        b.extend_from_slice(&self.port.to_le_bytes());
        b.extend_from_slice(&self.wait_ms.to_le_bytes());
        b.extend_from_slice(&name[..name.len().min(255)]);
        b
    }

    /// How many name bytes follow the fixed part `head`.
    pub fn name_len(head: &[u8; REQUEST_LEN]) -> Result<usize, ProtoError> {
        if head[..4] != MAGIC {
            return Err(ProtoError::Magic);
        }
        let n = usize::from(head[6]);
        if n > MAX_NAME {
            return Err(ProtoError::Name);
        }
        Ok(n)
    }

    /// Parses the fixed part `head` and the name after it.
    pub fn decode(head: &[u8; REQUEST_LEN], name: &[u8]) -> Result<Request, ProtoError> {
        if Request::name_len(head)? != name.len() {
            return Err(ProtoError::Name);
        }
        let op = match head[4] {
            1 => Op::Connect,
            2 => Op::Listen,
            3 => Op::Status,
            o => return Err(ProtoError::Op(o)),
        };
        if head[7] != 0 || (op == Op::Status && head[5] != 0) {
            return Err(ProtoError::Reserved);
        }
        let target = if name.is_empty() {
            Target::Cid(u32_at(head, 8))
        } else {
            let name = std::str::from_utf8(name).map_err(|_| ProtoError::Name)?;
            if name.contains(|c: char| c == '/' || c.is_control()) {
                return Err(ProtoError::Name);
            }
            Target::Name(name.to_string())
        };
        Ok(Request { op, target, port: u32_at(head, 12), wait_ms: u32_at(head, 16), recv_buffer: head[5] })
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

/// How a request failed, as the reply's status byte: the `io::ErrorKind` the process sees.
const KINDS: [(u8, io::ErrorKind); 10] = [
    (1, io::ErrorKind::NotFound),
    (2, io::ErrorKind::PermissionDenied),
    (3, io::ErrorKind::ConnectionRefused),
    (4, io::ErrorKind::AddrInUse),
    (5, io::ErrorKind::TimedOut),
    (6, io::ErrorKind::InvalidInput),
    (7, io::ErrorKind::Unsupported),
    (8, io::ErrorKind::ConnectionAborted),
    (9, io::ErrorKind::ConnectionReset),
    (10, io::ErrorKind::InvalidData),
];
/// Refused by the connection manager: the body is the decision's id (`u64`) and the text.
pub const DENIED: u8 = 11;
/// Any other failure.
const OTHER: u8 = 255;

/// The status byte for `kind` (never 0, which is success).
pub fn status_of(kind: io::ErrorKind) -> u8 {
    KINDS.iter().find(|(_, k)| *k == kind).map_or(OTHER, |(s, _)| *s)
}

/// The `io::ErrorKind` of status byte `s` (not 0).
pub fn kind_of(s: u8) -> io::ErrorKind {
    KINDS.iter().find(|(c, _)| *c == s).map_or(io::ErrorKind::Other, |(_, k)| *k)
}

/// The agent's answer to a request:
///
/// ```text
/// 0  status     u8    0 success, else why (see `status_of`)
/// 1  reserved   u8    0
/// 2  reserved   u16   0
/// 4  domain     u32   CONNECT: the peer's domain; LISTEN, STATUS: the agent's
/// 8  local_port u32   CONNECT: this end's port; LISTEN: the port
/// 12 body_len   u32   ≤ 64 KiB
/// 16 body       error text (UTF-8, ≤ 1024 bytes) or, for STATUS, an `AgentStatus`
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// 0, or the failure's status.
    pub status: u8,
    /// The domain the reply is about.
    pub domain: u32,
    /// The local port.
    pub local_port: u32,
    /// The error text or status body.
    pub body: Vec<u8>,
}

impl Reply {
    /// A success.
    pub fn ok(domain: u32, local_port: u32, body: Vec<u8>) -> Reply {
        Reply { status: 0, domain, local_port, body }
    }

    /// A failure saying `e` (a connection manager's refusal keeps its decision).
    pub fn error(e: &io::Error) -> Reply {
        if let Some(decision) = crate::managed::denied(e) {
            let mut body = decision.to_le_bytes().to_vec();
            body.extend_from_slice(&text(&e.to_string()));
            return Reply { status: DENIED, domain: 0, local_port: 0, body };
        }
        Reply { status: status_of(e.kind()), domain: 0, local_port: 0, body: text(&e.to_string()) }
    }

    /// The reply's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let body = &self.body[..self.body.len().min(MAX_BODY)];
        let mut b = Vec::with_capacity(REPLY_LEN + body.len());
        b.extend_from_slice(&[self.status, 0, 0, 0]);
        b.extend_from_slice(&self.domain.to_le_bytes());
        b.extend_from_slice(&self.local_port.to_le_bytes());
        b.extend_from_slice(&(body.len() as u32).to_le_bytes());
        b.extend_from_slice(body);
        b
    }

    /// The body length the fixed part `head` announces (checked against [`MAX_BODY`]).
    pub fn body_len(head: &[u8; REPLY_LEN]) -> Result<usize, ProtoError> {
        let n = u32_at(head, 12) as usize;
        if n > MAX_BODY {
            return Err(ProtoError::TooLong { what: "a reply body", len: n, max: MAX_BODY });
        }
        Ok(n)
    }

    /// Parses the fixed part and the body after it.
    pub fn decode(head: &[u8; REPLY_LEN], body: Vec<u8>) -> Result<Reply, ProtoError> {
        if Reply::body_len(head)? != body.len() {
            return Err(ProtoError::Malformed("reply: the body's length differs from its header's"));
        }
        if head[1..4] != [0, 0, 0] {
            return Err(ProtoError::Reserved);
        }
        Ok(Reply { status: head[0], domain: u32_at(head, 4), local_port: u32_at(head, 8), body })
    }

    /// A failed reply as the error the process sees; `Ok(self)` on success.
    pub fn into_result(self) -> io::Result<Reply> {
        if self.status == 0 {
            return Ok(self);
        }
        if self.status == DENIED {
            let Some(id) = self.body.first_chunk::<8>() else {
                return Err(ProtoError::Malformed("denial without its decision").into());
            };
            return Err(crate::managed::Denied { decision: u64::from_le_bytes(*id) }.into());
        }
        Err(io::Error::new(kind_of(self.status), printable(&self.body)))
    }
}

/// `s` cut to [`MAX_TEXT`] bytes on a character boundary.
pub fn text(s: &str) -> Vec<u8> {
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.as_bytes()[..end].to_vec()
}

/// Text from a peer for an error message: UTF-8 (lossy), control characters replaced, at most
/// [`MAX_TEXT`] bytes (cut on a character boundary).
pub fn printable(b: &[u8]) -> String {
    let mut out = String::new();
    for c in String::from_utf8_lossy(&b[..b.len().min(MAX_TEXT)]).chars() {
        let c = if c.is_control() { '?' } else { c };
        if out.len() + c.len_utf8() > MAX_TEXT {
            break;
        }
        out.push(c);
    }
    out
}

/// How a connection ended, as its end frame says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum End {
    /// The peer finished sending (what a read of 0 bytes means); the process may still send.
    Eof = 0,
    /// The peer reset the connection.
    Reset = 1,
    /// The link to the peer's domain was lost (its domain or ours died or migrated): a transport
    /// reset.
    TransportReset = 2,
    /// The agent is stopping.
    AgentStopping = 3,
    /// Another failure (the reason says which).
    Failed = 4,
}

impl End {
    fn from_u8(b: u8) -> Result<End, ProtoError> {
        Ok(match b {
            0 => End::Eof,
            1 => End::Reset,
            2 => End::TransportReset,
            3 => End::AgentStopping,
            4 => End::Failed,
            k => return Err(ProtoError::EndKind(k)),
        })
    }
}

/// One frame agent → process on a connection's socket:
///
/// ```text
/// data: len u32 (1..=65536), then len bytes
/// end:  0 u32, kind u8 (End), reason_len u16 (≤ 1024), then the reason (UTF-8)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame<'a> {
    /// Bytes of the connection.
    Data(&'a [u8]),
    /// The connection ended.
    End(End, String),
}

/// Bytes of a data frame's header.
pub const DATA_HEADER: usize = 4;

/// Writes the header of a data frame of `len` bytes (1..=[`MAX_FRAME`]).
pub fn data_header(len: usize) -> [u8; DATA_HEADER] {
    debug_assert!((1..=MAX_FRAME).contains(&len));
    (len as u32).to_le_bytes()
}

/// An end frame's bytes.
pub fn end_frame(kind: End, reason: &str) -> Vec<u8> {
    let reason = text(reason);
    let mut b = Vec::with_capacity(7 + reason.len());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.push(kind as u8);
    b.extend_from_slice(&(reason.len() as u16).to_le_bytes());
    b.extend_from_slice(&reason);
    b
}

/// The first whole frame at the start of `buf` and its length in bytes, or `None` if `buf`
/// holds only part of one.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, ProtoError> {
    let Some(head) = buf.get(..4) else { return Ok(None) };
    let len = u32_at(head, 0) as usize;
    if len > MAX_FRAME {
        return Err(ProtoError::TooLong { what: "a data frame", len, max: MAX_FRAME });
    }
    if len > 0 {
        return Ok(buf.get(4..4 + len).map(|d| (Frame::Data(d), 4 + len)));
    }
    let Some(&[kind, l0, l1]) = buf.get(4..7) else { return Ok(None) };
    let kind = End::from_u8(kind)?;
    let rlen = usize::from(u16::from_le_bytes([l0, l1]));
    if rlen > MAX_TEXT {
        return Err(ProtoError::TooLong { what: "an end reason", len: rlen, max: MAX_TEXT });
    }
    Ok(buf.get(7..7 + rlen).map(|r| (Frame::End(kind, printable(r)), 7 + rlen)))
}

/// One incoming connection on a listening socket (the connection's socket rides along as
/// `SCM_RIGHTS`):
///
/// ```text
/// 0  kind        u8   1
/// 1  reserved    u8 ×3
/// 4  peer domain u32
/// 8  local port  u32
/// 12 peer port   u32
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// The peer's domain, as the link's set-up established it.
    pub peer_domain: DomId,
    /// This end's port (the listening port).
    pub local_port: u32,
    /// The peer's port.
    pub peer_port: u32,
}

impl Accepted {
    /// The record's bytes.
    pub fn encode(&self) -> [u8; ACCEPTED_LEN] {
        let mut b = [0u8; ACCEPTED_LEN];
        b[0] = 1;
        b[4..8].copy_from_slice(&u32::from(self.peer_domain.0).to_le_bytes());
        b[8..12].copy_from_slice(&self.local_port.to_le_bytes());
        b[12..16].copy_from_slice(&self.peer_port.to_le_bytes());
        b
    }

    /// Parses a record.
    pub fn decode(b: &[u8; ACCEPTED_LEN]) -> Result<Accepted, ProtoError> {
        if b[0] != 1 {
            return Err(ProtoError::Op(b[0]));
        }
        if b[1..4] != [0, 0, 0] {
            return Err(ProtoError::Reserved);
        }
        let dom =
            u16::try_from(u32_at(b, 4)).map_err(|_| ProtoError::Malformed("accepted record: domain id"))?;
        Ok(Accepted { peer_domain: DomId(dom), local_port: u32_at(b, 8), peer_port: u32_at(b, 12) })
    }
}

/// What an agent holds, as `STATUS` answers it.
///
/// ```text
/// links      u16, then per link: peer domain u16, connections u32
/// listening  u16, then per port: port u32
/// local      u32  local connections open (requests, connections, listeners)
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentStatus {
    /// The agent's domain.
    pub domain: DomId,
    /// Its links: peer domain and connections open on the link.
    pub links: Vec<(DomId, u32)>,
    /// Ports listened on through the agent.
    pub listening: Vec<u32>,
    /// Local sockets open to the agent.
    pub local: u32,
}

/// Most links or ports a status carries (the body bound allows more; nobody needs them).
pub const MAX_STATUS_ITEMS: usize = 4096;

impl AgentStatus {
    /// The body's bytes (lists past [`MAX_STATUS_ITEMS`] are cut).
    pub fn encode(&self) -> Vec<u8> {
        let links = &self.links[..self.links.len().min(MAX_STATUS_ITEMS)];
        let ports = &self.listening[..self.listening.len().min(MAX_STATUS_ITEMS)];
        let mut b = Vec::with_capacity(8 + links.len() * 6 + ports.len() * 4);
        b.extend_from_slice(&(links.len() as u16).to_le_bytes());
        for (d, n) in links {
            b.extend_from_slice(&d.0.to_le_bytes());
            b.extend_from_slice(&n.to_le_bytes());
        }
        b.extend_from_slice(&(ports.len() as u16).to_le_bytes());
        for p in ports {
            b.extend_from_slice(&p.to_le_bytes());
        }
        b.extend_from_slice(&self.local.to_le_bytes());
        b
    }

    /// Parses a body (the reply's domain is the agent's).
    pub fn decode(domain: u32, b: &[u8]) -> Result<AgentStatus, ProtoError> {
        let short = || ProtoError::Malformed("status body");
        let mut r = Reader(b);
        let domain = DomId(u16::try_from(domain).map_err(|_| ProtoError::Malformed("status: domain id"))?);
        let n = usize::from(r.u16().ok_or_else(short)?);
        if n > MAX_STATUS_ITEMS {
            return Err(short());
        }
        let mut links = Vec::with_capacity(n.min(MAX_STATUS_ITEMS));
        for _ in 0..n {
            links.push((DomId(r.u16().ok_or_else(short)?), r.u32().ok_or_else(short)?));
        }
        let n = usize::from(r.u16().ok_or_else(short)?);
        if n > MAX_STATUS_ITEMS {
            return Err(short());
        }
        let mut listening = Vec::with_capacity(n.min(MAX_STATUS_ITEMS));
        for _ in 0..n {
            listening.push(r.u32().ok_or_else(short)?);
        }
        let local = r.u32().ok_or_else(short)?;
        if !r.0.is_empty() {
            return Err(short());
        }
        Ok(AgentStatus { domain, links, listening, local })
    }
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take::<2>().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take::<4>().map(u32::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(b: &[u8]) -> ([u8; REQUEST_LEN], &[u8]) {
        let mut head = [0u8; REQUEST_LEN];
        head.copy_from_slice(&b[..REQUEST_LEN]);
        (head, &b[REQUEST_LEN..])
    }

    #[test]
    fn a_request_is_these_bytes() {
        let r = Request { op: Op::Connect, target: Target::Cid(3), port: 5000, wait_ms: 250, recv_buffer: 0 };
        let b = r.encode();
        assert_eq!(b, [b'D', b'B', b'A', b'1', 1, 0, 0, 0, 3, 0, 0, 0, 0x88, 0x13, 0, 0, 250, 0, 0, 0]);
        let (head, name) = split(&b);
        assert_eq!(Request::decode(&head, name), Ok(r));
        let named = Request {
            op: Op::Connect,
            target: Target::Name("storage".into()),
            port: 1,
            wait_ms: 0,
            recv_buffer: 16,
        };
        let b = named.encode();
        assert_eq!(b[5], 16, "the receive buffer, in 64 KiB units");
        assert_eq!(b[6], 7);
        assert_eq!(&b[REQUEST_LEN..], b"storage");
        let (head, name) = split(&b);
        assert_eq!(Request::decode(&head, name), Ok(named));
    }

    #[test]
    fn bad_requests_say_why() {
        let good =
            Request { op: Op::Status, target: Target::Cid(0), port: 0, wait_ms: 0, recv_buffer: 0 }.encode();
        let (mut head, _) = split(&good);
        head[0] = b'X';
        assert_eq!(Request::decode(&head, &[]), Err(ProtoError::Magic));
        let (mut head, _) = split(&good);
        head[4] = 9;
        assert_eq!(Request::decode(&head, &[]), Err(ProtoError::Op(9)));
        // A status has no buffer to size; the byte after the name's length is reserved.
        let (mut head, _) = split(&good);
        head[5] = 1;
        assert_eq!(Request::decode(&head, &[]), Err(ProtoError::Reserved));
        let (mut head, _) = split(&good);
        head[7] = 1;
        assert_eq!(Request::decode(&head, &[]), Err(ProtoError::Reserved));
        let (mut head, _) = split(&good);
        head[6] = 65;
        assert_eq!(Request::name_len(&head), Err(ProtoError::Name));
        head[6] = 2;
        assert_eq!(Request::decode(&head, b"a/"), Err(ProtoError::Name));
        assert_eq!(Request::decode(&head, b"a\n"), Err(ProtoError::Name));
        assert_eq!(Request::decode(&head, &[0xff, 0xfe]), Err(ProtoError::Name));
        assert_eq!(Request::decode(&head, b"a"), Err(ProtoError::Name));
    }

    #[test]
    fn replies_carry_the_error_kind_and_text() {
        let e = io::Error::new(io::ErrorKind::AddrInUse, "port 80 already has a listener");
        let b = Reply::error(&e).encode();
        let mut head = [0u8; REPLY_LEN];
        head.copy_from_slice(&b[..REPLY_LEN]);
        assert_eq!(head[0], 4);
        let back = Reply::decode(&head, b[REPLY_LEN..].to_vec()).unwrap().into_result().unwrap_err();
        assert_eq!(back.kind(), io::ErrorKind::AddrInUse);
        assert_eq!(back.to_string(), "port 80 already has a listener");
        for (s, k) in KINDS {
            assert_eq!(status_of(k), s);
            assert_eq!(kind_of(s), k);
        }
        assert_eq!(status_of(io::ErrorKind::Interrupted), OTHER);
        let mut head = [0u8; REPLY_LEN];
        head[12..16].copy_from_slice(&(MAX_BODY as u32 + 1).to_le_bytes());
        assert!(Reply::body_len(&head).is_err());
    }

    #[test]
    fn frames_parse_whole_or_wait() {
        let mut b = data_header(3).to_vec();
        b.extend_from_slice(b"abc");
        b.extend_from_slice(&end_frame(End::TransportReset, "link lost\n"));
        assert_eq!(parse_frame(&b[..6]), Ok(None));
        let (f, n) = parse_frame(&b).unwrap().unwrap();
        assert_eq!((f, n), (Frame::Data(b"abc"), 7));
        assert_eq!(parse_frame(&b[7..9]), Ok(None));
        let (f, n) = parse_frame(&b[7..]).unwrap().unwrap();
        assert_eq!(f, Frame::End(End::TransportReset, "link lost?".into()));
        assert_eq!(n, b.len() - 7);
        assert!(parse_frame(&(MAX_FRAME as u32 + 1).to_le_bytes()).is_err());
        assert_eq!(parse_frame(&[0, 0, 0, 0, 9, 0, 0]), Err(ProtoError::EndKind(9)));
        assert!(parse_frame(&[0, 0, 0, 0, 0, 0xff, 0xff]).is_err());
    }

    #[test]
    fn printable_text_is_bounded_in_bytes() {
        // Each invalid byte becomes U+FFFD (3 bytes): as many whole ones as fit.
        let t = printable(&[0xff; MAX_TEXT]);
        assert_eq!(t.len(), MAX_TEXT / 3 * 3);
        assert_eq!(printable(&[b'a'; MAX_TEXT + 5]).len(), MAX_TEXT);
        assert_eq!(printable(b"a\x07b"), "a?b");
        // Our own text is cut on a character boundary.
        let s = format!("{}é", "a".repeat(MAX_TEXT - 1));
        assert_eq!(text(&s).len(), MAX_TEXT - 1);
        assert_eq!(text(&"a".repeat(MAX_TEXT)).len(), MAX_TEXT);
    }

    #[test]
    fn every_bound_is_inclusive() {
        let mut head = [0u8; REPLY_LEN];
        head[12..16].copy_from_slice(&(MAX_BODY as u32).to_le_bytes());
        assert_eq!(Reply::body_len(&head), Ok(MAX_BODY));
        let mut frame = data_header(MAX_FRAME).to_vec();
        frame.resize(4 + MAX_FRAME, 7);
        assert!(matches!(parse_frame(&frame), Ok(Some((Frame::Data(d), _))) if d.len() == MAX_FRAME));
        let end = end_frame(End::Failed, &"r".repeat(MAX_TEXT));
        assert!(
            matches!(parse_frame(&end), Ok(Some((Frame::End(End::Failed, r), _))) if r.len() == MAX_TEXT)
        );
        let most = AgentStatus {
            domain: DomId(1),
            links: vec![(DomId(2), 1); MAX_STATUS_ITEMS],
            listening: vec![5; MAX_STATUS_ITEMS],
            local: 0,
        };
        assert_eq!(AgentStatus::decode(1, &most.encode()), Ok(most.clone()));
        // One more than the encoder ever writes is refused, in either list.
        let mut links = (MAX_STATUS_ITEMS as u16 + 1).to_le_bytes().to_vec();
        links.extend(std::iter::repeat_n([2u8, 0, 1, 0, 0, 0], MAX_STATUS_ITEMS + 1).flatten());
        links.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        assert!(AgentStatus::decode(1, &links).is_err());
        let mut ports = vec![0u8, 0];
        ports.extend_from_slice(&(MAX_STATUS_ITEMS as u16 + 1).to_le_bytes());
        ports.extend(std::iter::repeat_n([5u8, 0, 0, 0], MAX_STATUS_ITEMS + 1).flatten());
        ports.extend_from_slice(&[0, 0, 0, 0]);
        assert!(AgentStatus::decode(1, &ports).is_err());
    }

    #[test]
    fn accepted_and_status_round_trip() {
        let a = Accepted { peer_domain: DomId(7), local_port: 80, peer_port: 49152 };
        assert_eq!(Accepted::decode(&a.encode()), Ok(a));
        let mut bad = a.encode();
        bad[6] = 1;
        assert!(Accepted::decode(&bad).is_err());
        let s = AgentStatus {
            domain: DomId(2),
            links: vec![(DomId(0), 3), (DomId(5), 0)],
            listening: vec![1, 5000],
            local: 4,
        };
        assert_eq!(AgentStatus::decode(2, &s.encode()), Ok(s.clone()));
        let b = s.encode();
        assert!(AgentStatus::decode(2, &b[..b.len() - 1]).is_err());
        let mut long = b.clone();
        long.push(0);
        assert!(AgentStatus::decode(2, &long).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(b in proptest::collection::vec(any::<u8>(), 0..96)) {
            let _ = parse_frame(&b);
            let _ = AgentStatus::decode(1, &b);
            if b.len() >= REQUEST_LEN {
                let (head, name) = split(&b);
                let _ = Request::decode(&head, name);
            }
            if let Some(a) = b.first_chunk::<ACCEPTED_LEN>() {
                let _ = Accepted::decode(a);
            }
        }

        #[test]
        fn requests_round_trip(op in 1u8..4, cid in any::<u32>(), port in any::<u32>(), wait in any::<u32>(), name in "[a-z0-9-]{0,64}", buffer in any::<u8>()) {
            let op = [Op::Connect, Op::Listen, Op::Status][usize::from(op - 1)];
            let target = if name.is_empty() { Target::Cid(cid) } else { Target::Name(name) };
            let recv_buffer = if op == Op::Status { 0 } else { buffer };
            let r = Request { op, target, port, wait_ms: wait, recv_buffer };
            let b = r.encode();
            let (head, rest) = split(&b);
            prop_assert_eq!(Request::decode(&head, rest), Ok(r));
        }

        #[test]
        fn frames_round_trip(data in proptest::collection::vec(any::<u8>(), 1..300), reason in "\\PC{0,40}") {
            let mut b = data_header(data.len()).to_vec();
            b.extend_from_slice(&data);
            b.extend_from_slice(&end_frame(End::Eof, &reason));
            let (f, n) = parse_frame(&b).unwrap().unwrap();
            prop_assert_eq!(f, Frame::Data(&data));
            let (f, _) = parse_frame(&b[n..]).unwrap().unwrap();
            prop_assert_eq!(f, Frame::End(End::Eof, reason));
        }
    }
}
