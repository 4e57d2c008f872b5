//! The link's byte stream: `AsyncRead`/`AsyncWrite` over an [`Endpoint`], waiting on the event
//! channel.
//!
//! The protocol is the endpoint's; this shell performs what it asks for (notify the peer, sleep
//! on the event channel) through the backend and tokio. The pages and the event channel come
//! from the [`handshake`](super::handshake); a wait may first spin ([`Spin`]); the event
//! channel's one tokio waker wakes both halves through the [`Fanout`].

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::endpoint::{Endpoint, EndpointError, RecvStatus, Wait};
use super::handshake::{self, Handshake, Pages};
use super::reactor::{Pollable, register};
use super::spin::Spin;
use super::wake::Fanout;
use super::{LinkConfig, LinkError};
use crate::backend::{Backend, BackendError, EventChannel, Store};
use crate::layout;
use crate::shmem::Region;
use crate::types::{DomId, EvtchnPort};

/// Wakes pending in one poll before yielding to the executor, so that a peer that signals
/// without ever writing cannot keep a task spinning inside `poll_read`.
const MAX_WAKES_PER_POLL: usize = 64;

/// Which half of the stream is waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

/// A server link waiting for its client to connect. Returned by [`Link::listen`].
pub struct LinkListener<B: Backend + Clone> {
    link: Link<B>,
}

/// One end of an established link: a byte stream to the peer domain.
///
/// Reads return end-of-stream once the peer has shut down its write half (or closed after doing
/// so) and the ring is drained; a peer that vanishes without that (crash, kill, or a libxenvchan
/// peer's close) gives `ConnectionReset`. A peer that breaks the protocol gives `InvalidData` and
/// the link is closed on our side at once.
pub struct Link<B: Backend + Clone> {
    endpoint: Endpoint<Region>,
    backend: B,
    peer: DomId,
    evtchn: AsyncFd<Pollable<B::Evtchn>>,
    port: EvtchnPort,
    _pages: Pages<B>,
    /// Store path the server published (removed on close).
    published: Option<String>,
    spin: Spin,
    wakers: Arc<Fanout>,
    fanout: Waker,
}

// Nothing in a Link is address-sensitive: it is moved freely between polls.
impl<B: Backend + Clone> Unpin for Link<B> {}

impl<B: Backend + Clone> std::fmt::Debug for Link<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("side", &self.endpoint.side())
            .field("peer", &self.peer)
            .field("port", &self.port)
            .field("rings", &self.endpoint.ring_sizes())
            .finish()
    }
}

impl<B: Backend + Clone> Link<B> {
    /// Server side: grants the pages to `client`, allocates the event channel and publishes
    /// `ring-ref` and `event-channel` under `path` (relative paths live under this domain's
    /// home). Returns at once; [`LinkListener::accept`] waits for the client.
    pub fn listen(
        backend: &B,
        path: &str,
        client: DomId,
        cfg: &LinkConfig,
    ) -> Result<LinkListener<B>, LinkError> {
        let parts = handshake::listen(backend, path, client, cfg)?;
        let link = Link::assemble(backend.clone(), parts, cfg)?;
        Ok(LinkListener { link })
    }

    /// Client side: waits (via a store watch, no polling) until the server at `path` has published
    /// the link, then binds the event channel, maps the pages and connects. A relative `path` is
    /// resolved under the *server's* home. Wrap in `tokio::time::timeout` for a deadline.
    pub async fn connect(
        backend: &B,
        path: &str,
        server: DomId,
        cfg: &LinkConfig,
    ) -> Result<Link<B>, LinkError> {
        let parts = handshake::connect(backend, path, server).await?;
        let link = Link::assemble(backend.clone(), parts, cfg)?;
        // Wake the server, which waits for our live byte.
        link.kick()?;
        tracing::debug!(%path, %server, port = %link.port, rings = ?link.ring_sizes(), "link connected");
        Ok(link)
    }

    /// The stream over a finished handshake: registers the event channel with tokio.
    fn assemble(backend: B, parts: Handshake<B>, cfg: &LinkConfig) -> Result<Link<B>, LinkError> {
        let Handshake { endpoint, peer, evtchn, port, pages, published } = parts;
        let evtchn = register(evtchn)?;
        let wakers = Arc::new(Fanout::default());
        Ok(Link {
            endpoint,
            backend,
            peer,
            evtchn,
            port,
            _pages: pages,
            published,
            spin: Spin::new(cfg.spin),
            fanout: Waker::from(wakers.clone()),
            wakers,
        })
    }

    /// The peer domain.
    pub fn peer(&self) -> DomId {
        self.peer
    }

    /// Whether a read or write that finds nothing to do spins for a while before waiting for
    /// the event channel ([`LinkConfig::spin`]): such a poll keeps its thread until the peer
    /// answers or the spin budget runs out.
    pub fn spins(&self) -> bool {
        self.spin.enabled()
    }

    /// The local event-channel port of this link.
    pub fn port(&self) -> EvtchnPort {
        self.port
    }

    /// Sizes of the (send, receive) rings in bytes.
    pub fn ring_sizes(&self) -> (u32, u32) {
        self.endpoint.ring_sizes()
    }

    /// Closes the link now (as dropping it does): the peer reads end-of-stream after draining.
    pub fn close(&mut self) {
        if self.endpoint.close() {
            let _ = self.kick();
        }
    }

    /// Writes all of `parts`, in order, if the ring has room for all of them now; never waits.
    /// `Ok(false)`: they do not fit, nothing was written. The peer sees them all at once (one
    /// publication of the producer index). For a caller that must not split a message it
    /// writes from outside the task that otherwise writes (a packet of the multiplexer written
    /// by the connection's own task), and whose reader should find the whole message when it
    /// finds its first part.
    pub fn try_write_all(&mut self, parts: &[&[u8]]) -> io::Result<bool> {
        if parts.iter().all(|p| p.is_empty()) {
            return Ok(true);
        }
        let t = self.endpoint.send_whole(parts).map_err(|e| self.fail(e, true))?;
        if t.notify {
            self.kick()?;
        }
        Ok(t.bytes > 0)
    }

    /// Reads what the ring holds now, up to `buf.len()` bytes; never waits. `Ok(0)` if it is
    /// empty (or the peer ended its stream). For a caller that reads part of a message from
    /// outside the task that otherwise reads (a packet's payload copied by the multiplexer
    /// straight into the buffer of the connection it is for).
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let (bytes, notify) = match self.endpoint.recv(buf) {
            Ok(RecvStatus::Data(t)) => (t.bytes, t.notify),
            Ok(RecvStatus::Empty { notify }) => (0, notify),
            Ok(RecvStatus::Eof) => (0, false),
            Err(e) => return Err(self.fail(e, false)),
        };
        if notify {
            self.kick()?;
        }
        Ok(bytes)
    }

    /// Whether the receive ring is known to hold bytes not read yet, as of the last look at
    /// the peer's producer index: a read now returns at once. False says nothing (the peer
    /// may have written since). Reads no shared memory, so it costs the peer no cache-line
    /// transfer.
    pub fn has_input_seen(&self) -> bool {
        self.endpoint.seen_readable() > 0
    }

    /// Signals the peer through the event channel.
    fn kick(&self) -> io::Result<()> {
        self.evtchn.get_ref().0.notify(self.port).map_err(|e| io::Error::other(LinkError::from(e)))
    }

    /// Turns an endpoint error into an io::Error, closing the link on a protocol violation.
    fn fail(&mut self, e: EndpointError, writing: bool) -> io::Error {
        let err = match e {
            EndpointError::Misbehaved(violation) => {
                tracing::warn!(peer = %self.peer, %violation, "peer broke the link protocol; closing the link");
                self.close();
                LinkError::PeerMisbehaved { peer: self.peer, violation }
            }
            EndpointError::PeerGone => LinkError::PeerGone(self.peer),
            EndpointError::Closed => LinkError::Closed,
            EndpointError::WriteShut => {
                return io::Error::new(io::ErrorKind::BrokenPipe, "link was shut down for writing");
            }
        };
        let mut io_err = io::Error::from(err);
        if writing && io_err.kind() == io::ErrorKind::ConnectionReset {
            io_err = io::Error::new(
                io::ErrorKind::BrokenPipe,
                io_err.into_inner().unwrap_or_else(|| "peer gone".into()),
            );
        }
        io_err
    }

    /// Waits for event-channel activity. `Ready(Ok)` means events were consumed and the caller
    /// must re-check the rings; `Pending` means the fan-out waker is registered with tokio.
    fn poll_event(&self) -> Poll<io::Result<()>> {
        let mut cx = Context::from_waker(&self.fanout);
        match self.evtchn.poll_read_ready(&mut cx) {
            Poll::Ready(Ok(mut guard)) => {
                let ch = &self.evtchn.get_ref().0;
                loop {
                    match ch.pending() {
                        Ok(Some(port)) => {
                            ch.unmask(port).map_err(|e| io::Error::other(LinkError::from(e)))?
                        }
                        Ok(None) => break,
                        Err(e) => return Poll::Ready(Err(io::Error::other(LinkError::from(e)))),
                    }
                }
                guard.clear_ready();
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Runs `attempt` (a read or a write) until it has an outcome, waiting for the peer after
    /// each attempt that made no progress. After [`MAX_WAKES_PER_POLL`] wake-ups without one,
    /// yields to the executor (and asks to be polled again).
    fn poll_until<T>(
        &mut self,
        cx: &Context<'_>,
        dir: Direction,
        mut attempt: impl FnMut(&mut Self) -> Option<io::Result<T>>,
    ) -> Poll<io::Result<T>> {
        for _ in 0..MAX_WAKES_PER_POLL {
            if let Some(outcome) = attempt(self) {
                return Poll::Ready(outcome);
            }
            match self.wait(cx, dir) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// After a read or write made no progress: spin (if configured), then ask the peer for an
    /// event and wait for it. `Ready(Ok)` means "try the operation again"; `Pending` means the
    /// task's waker is registered.
    fn wait(&mut self, cx: &Context<'_>, dir: Direction) -> Poll<io::Result<()>> {
        let spun = match dir {
            Direction::Read => self.spin.spin_until(
                &mut self.endpoint,
                |ep| ep.readable().map_or(true, |n| n > 0),
                |ep| ep.peer_done(),
            ),
            Direction::Write => self.spin.spin_until(
                &mut self.endpoint,
                |ep| ep.writable().map_or(true, |n| n > 0),
                |ep| ep.peer_live().map_or(true, |l| l == layout::Live::Gone),
            ),
        };
        if spun {
            return Poll::Ready(Ok(()));
        }
        let prepared = match dir {
            Direction::Read => self.endpoint.prepare_wait_recv(),
            Direction::Write => self.endpoint.prepare_wait_send(),
        };
        match prepared {
            Ok(Wait::Retry) => return Poll::Ready(Ok(())),
            Ok(Wait::Sleep) => {}
            Err(e) => return Poll::Ready(Err(self.fail(e, dir == Direction::Write))),
        }
        match dir {
            Direction::Read => self.wakers.register_reader(cx.waker()),
            Direction::Write => self.wakers.register_writer(cx.waker()),
        }
        self.poll_event()
    }
}

impl<B: Backend + Clone> LinkListener<B> {
    /// Waits until the client has connected.
    pub async fn accept(mut self) -> Result<Link<B>, LinkError> {
        std::future::poll_fn(|_cx| {
            loop {
                let link = &mut self.link;
                match link.endpoint.client_connected() {
                    Ok(true) => return Poll::Ready(Ok(())),
                    Ok(false) => {}
                    Err(EndpointError::PeerGone) => return Poll::Ready(Err(LinkError::PeerGone(link.peer))),
                    Err(e) => return Poll::Ready(Err(LinkError::Io(link.fail(e, false)))),
                }
                match link.endpoint.prepare_wait_connect() {
                    Ok(Wait::Retry) => continue,
                    Ok(Wait::Sleep) => {}
                    Err(e) => return Poll::Ready(Err(LinkError::Io(link.fail(e, false)))),
                }
                // Whoever polls accept() is woken through the fan-out waker's reader slot.
                link.wakers.register_reader(_cx.waker());
                match link.poll_event() {
                    Poll::Ready(Ok(())) => continue,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(LinkError::Io(e))),
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await?;
        tracing::debug!(peer = %self.link.peer, "link accepted");
        Ok(self.link)
    }

    /// The client domain this listener waits for.
    pub fn client(&self) -> DomId {
        self.link.peer
    }
}

impl<B: Backend + Clone> AsyncRead for Link<B> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_until(cx, Direction::Read, |this| {
            match this.endpoint.recv(buf.initialize_unfilled()) {
                Ok(RecvStatus::Data(t)) => {
                    buf.advance(t.bytes);
                    Some(if t.notify { this.kick() } else { Ok(()) })
                }
                Ok(RecvStatus::Eof) => Some(Ok(())),
                Ok(RecvStatus::Empty { notify }) => {
                    if notify && let Err(e) = this.kick() {
                        return Some(Err(e));
                    }
                    (buf.remaining() == 0).then_some(Ok(()))
                }
                Err(e) => Some(Err(this.fail(e, false))),
            }
        })
    }
}

impl<B: Backend + Clone> AsyncWrite for Link<B> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.get_mut().poll_until(cx, Direction::Write, |this| match this.endpoint.send(buf) {
            Ok(t) if t.bytes > 0 => Some(if t.notify { this.kick() } else { Ok(()) }.map(|()| t.bytes)),
            Ok(_) => None,
            Err(e) => Some(Err(this.fail(e, true))),
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are in the ring and the peer was signalled if it asked: nothing buffered.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.endpoint.shutdown_write() {
            Ok(_) => Poll::Ready(this.kick()),
            Err(e) => Poll::Ready(Err(this.fail(e, true))),
        }
    }
}

impl<B: Backend + Clone> Drop for Link<B> {
    fn drop(&mut self) {
        self.close();
        let _ = self.evtchn.get_ref().0.unbind(self.port);
        if let Some(path) = self.published.take() {
            match self.backend.store().rm(&path) {
                Ok(()) | Err(BackendError::NotFound(_)) => {}
                Err(e) => tracing::warn!(%path, error = %e, "could not remove link path from the store"),
            }
        }
    }
}
