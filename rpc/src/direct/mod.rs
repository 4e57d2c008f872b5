//! dombus's own call path: tarpc's messages and programming model without tarpc's channel.
//!
//! tarpc's client sends every call through a dispatch task (caller → dispatch → socket, and
//! back: two task hand-offs and a timer registered per call), and its server reads requests in
//! one stream, hands each to a response channel and writes answers from another. On a link
//! whose round trip is a fraction of a microsecond, those hand-offs were most of a call's cost
//! (docs/benchmarks.md). Here:
//!
//! * the **client** ([`client::DirectChannel`]) has no task: the caller's own future encodes
//!   its request straight into the connection's write buffer, writes it, reads the socket and
//!   routes the replies it finds by request id. One of the waiting calls at a time is the
//!   reader (it polled the socket last); the others wait to be woken with their reply. A lone
//!   call reads its own reply: no hand-off at all. Deadlines share one timer per connection.
//! * the **server** ([`server::serve`]) runs each connection in one task that reads frames,
//!   runs the calls (inline, or spawned with `spawn_calls`) and writes their replies into one
//!   buffer, flushed once per turn.
//!
//! The messages are tarpc's own (`ClientMessage` / `Response`, in the same frames and codec),
//! so either end may be plain tarpc: [`CallPath::Tarpc`] keeps tarpc's channel, per client or
//! per server, and the two interoperate both ways (tested in `tests/conformance.rs`).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use tokio::io::AsyncWrite;

use crate::transport::BoxStream;

pub(crate) mod client;
pub(crate) mod server;

/// Room a connection's read buffer keeps for the next read, bytes (it grows, doubling, as
/// frames need).
const READ_ROOM: usize = 8 << 10;

/// Reads what `stream` has into `rbuf` (0: the end of the stream), keeping room for a read.
fn poll_read(stream: &mut BoxStream, cx: &mut Context<'_>, rbuf: &mut BytesMut) -> Poll<io::Result<usize>> {
    if rbuf.capacity() - rbuf.len() < READ_ROOM / 2 {
        rbuf.reserve(READ_ROOM);
    }
    tokio_util::io::poll_read_buf(Pin::new(stream), cx, rbuf)
}

/// What [`write_out`] did.
struct Written {
    /// Some bytes went out.
    wrote: bool,
    /// Everything went out (and was flushed); otherwise the stream holds `cx`'s waker.
    done: bool,
}

/// Writes `wbuf` to `stream` as far as it takes it, then flushes once if anything went.
fn write_out(stream: &mut BoxStream, cx: &mut Context<'_>, wbuf: &mut BytesMut) -> io::Result<Written> {
    let mut wrote = false;
    while !wbuf.is_empty() {
        match tokio_util::io::poll_write_buf(Pin::new(&mut *stream), cx, wbuf)? {
            Poll::Pending => return Ok(Written { wrote, done: false }),
            Poll::Ready(0) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(_) => wrote = true,
        }
    }
    if wrote && Pin::new(&mut *stream).poll_flush(cx)?.is_pending() {
        return Ok(Written { wrote, done: false });
    }
    Ok(Written { wrote, done: true })
}

/// Which implementation carries the calls of a client or a server (the messages on the wire
/// are the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CallPath {
    /// dombus's own: the caller's future does the I/O, the server answers from the
    /// connection's task (module docs). The default.
    #[default]
    Direct,
    /// tarpc's `client::Channel` and `server::BaseChannel`: kept for comparison and for any
    /// tarpc feature the direct path does not carry.
    Tarpc,
}

impl std::fmt::Display for CallPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CallPath::Direct => "direct",
            CallPath::Tarpc => "tarpc",
        })
    }
}
