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

pub(crate) mod client;
pub(crate) mod server;

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
