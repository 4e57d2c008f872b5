//! The tokio shell around [`Endpoint`]: handshake, event-channel waits, `AsyncRead`/`AsyncWrite`.

use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::endpoint::{Endpoint, EndpointError, RecvStatus, Wait};
use super::{LinkConfig, LinkError, server_path};
use crate::backend::{
    Backend, BackendError, EventChannel, MappedPages, Perm, PermKind, SharedPages, Store, StoreWatch,
};
use crate::layout::{self, Placement, RingOrders};
use crate::ring::PeerMisbehaved;
use crate::shmem::{Region, SharedMem};
use crate::types::{DomId, EvtchnPort, GrantRef};

/// Wakes pending in one poll before yielding to the executor, so that a peer that signals
/// without ever writing cannot keep a task spinning inside `poll_read`.
const MAX_WAKES_PER_POLL: usize = 64;

/// Which half of the stream is waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

/// Makes a backend handle usable with tokio's `AsyncFd` (which wants `AsRawFd`).
pub(crate) struct Pollable<T>(pub(crate) T);

impl<T: AsFd> AsRawFd for Pollable<T> {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// Registers a backend handle's fd with tokio's reactor for readability.
pub(crate) fn register<T: AsFd>(handle: T) -> io::Result<AsyncFd<Pollable<T>>> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other("dombus links must be set up inside a tokio runtime (with IO enabled)"));
    }
    // SAFETY: the backend traits require `as_fd` to return the same open descriptor, owned by the
    // handle, for the handle's whole life; the handle is moved into the AsyncFd and lives exactly
    // as long as the registration.
    Ok(unsafe { AsyncFd::register_with_interest(Pollable(handle), tokio::io::Interest::READABLE) }?)
}

/// The pages behind a link: owned as granter (server) or mapper (client).
enum Pages<B: Backend> {
    Server { _ctl: B::Shared, _rings: Vec<B::Shared> },
    Client { _ctl: B::Mapped, _rings: Vec<B::Mapped> },
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
        let orders = RingOrders::for_sizes(cfg.client_to_server, cfg.server_to_client).ok_or_else(|| {
            LinkError::Config(format!(
                "ring sizes {}/{} exceed the 1 MiB maximum",
                cfg.client_to_server, cfg.server_to_client
            ))
        })?;
        let evtchn = backend.open_evtchn()?;
        let port = evtchn.bind_unbound(client)?;
        let mut ctl = backend.share_pages(client, 1, true)?;
        // If we die, the hypervisor clears our live byte and signals the client.
        ctl.set_unmap_notify(layout::SRV_LIVE, Some(port))?;
        let page = ctl.region().clone();

        let mut rings = Vec::new();
        let mut next_grant = 0usize;
        let mut ring_region = |order: u32, rings: &mut Vec<B::Shared>| -> Result<Region, LinkError> {
            match RingOrders::placement(order) {
                Placement::InPage(off) => Ok(page.sub(off, 1 << order)),
                Placement::Pages(n) => {
                    let shared = backend.share_pages(client, n, true)?;
                    for r in shared.refs() {
                        page.store_u32(layout::GRANTS + 4 * next_grant, r.0);
                        next_grant += 1;
                    }
                    let region = shared.region().clone();
                    rings.push(shared);
                    Ok(region)
                }
            }
        };
        let left = ring_region(orders.left, &mut rings)?;
        let right = ring_region(orders.right, &mut rings)?;
        let endpoint = Endpoint::init_server(page.clone(), left, right, orders);

        // Publish: event-channel first, ring-ref last, each readable by the client only, so that
        // a client that sees ring-ref also finds event-channel (libxenvchan uses a transaction).
        // `publish` makes sure the client's watch hears of each node.
        let store = backend.store();
        let path = server_path(backend.domid(), path);
        let perms = [
            Perm { domid: backend.domid(), kind: PermKind::None },
            Perm { domid: client, kind: PermKind::Read },
        ];
        let ring_ref = ctl.refs().first().copied().ok_or_else(|| {
            LinkError::Backend(BackendError::InvalidArgument("share_pages returned no grant ref".into()))
        })?;
        for (key, value) in [("event-channel", port.0), ("ring-ref", ring_ref.0)] {
            let node = format!("{path}/{key}");
            crate::backend::publish(store, &node, value.to_string().as_bytes(), &perms)?;
        }
        tracing::debug!(%path, %client, %port, ?orders, "link published");

        let link = Link::assemble(
            backend.clone(),
            endpoint,
            client,
            evtchn,
            port,
            Pages::Server { _ctl: ctl, _rings: rings },
            Some(path),
            cfg,
        )?;
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
        let path = server_path(server, path);
        let (ring_ref, remote_port) = wait_published(backend, &path, server).await?;
        let evtchn = backend.open_evtchn()?;
        let port = evtchn.bind_interdomain(server, remote_port)?;
        let misbehaved = |violation| LinkError::PeerMisbehaved { peer: server, violation };

        let mut ctl = backend.map_grants(server, &[ring_ref], true)?;
        // If we die, the hypervisor clears our live byte and signals the server.
        ctl.set_unmap_notify(layout::CLI_LIVE, Some(port))?;
        let page = ctl.region().clone();
        let orders = RingOrders::from_control_word(page.load_u32(layout::ORDERS)).map_err(misbehaved)?;

        let mut rings = Vec::new();
        let mut next_grant = 0usize;
        let mut ring_region =
            |order: u32, writable: bool, rings: &mut Vec<B::Mapped>| -> Result<Region, LinkError> {
                match RingOrders::placement(order) {
                    Placement::InPage(off) => Ok(page.sub(off, 1 << order)),
                    Placement::Pages(n) => {
                        // Each grant ref is read once from the (untrusted) page; the hypervisor
                        // checks that it is a live grant to us.
                        let refs: Vec<GrantRef> = (next_grant..next_grant + n)
                            .map(|i| GrantRef(page.load_u32(layout::GRANTS + 4 * i)))
                            .collect();
                        next_grant += n;
                        let mapped = backend.map_grants(server, &refs, writable)?;
                        let region = mapped.region().clone();
                        if region.len() != n * crate::types::PAGE_SIZE {
                            return Err(LinkError::Backend(BackendError::InvalidArgument(format!(
                                "mapped {} bytes for {n} ring pages",
                                region.len()
                            ))));
                        }
                        rings.push(mapped);
                        Ok(region)
                    }
                }
            };
        // We write the left ring and only read the right one (libxenvchan maps it read-only).
        let left = ring_region(orders.left, true, &mut rings)?;
        let right = ring_region(orders.right, false, &mut rings)?;
        let endpoint = Endpoint::join_client(page.clone(), left, right, orders);
        let link = Link::assemble(
            backend.clone(),
            endpoint,
            server,
            evtchn,
            port,
            Pages::Client { _ctl: ctl, _rings: rings },
            None,
            cfg,
        )?;
        // Wake the server, which waits for our live byte.
        link.kick()?;
        tracing::debug!(%path, %server, %port, ?orders, "link connected");
        Ok(link)
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        backend: B,
        endpoint: Endpoint<Region>,
        peer: DomId,
        evtchn: B::Evtchn,
        port: EvtchnPort,
        pages: Pages<B>,
        published: Option<String>,
        cfg: &LinkConfig,
    ) -> Result<Link<B>, LinkError> {
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

    /// After a read or write made no progress: spin (if configured), then ask the peer for an
    /// event and wait for it. `Ready(Ok)` means "try the operation again"; `Pending` means the
    /// task's waker is registered.
    fn wait(&mut self, cx: &Context<'_>, dir: Direction) -> Poll<io::Result<()>> {
        let spun = match dir {
            Direction::Read => {
                self.spin_until(|ep| ep.readable().map_or(true, |n| n > 0), |ep| ep.peer_done())
            }
            Direction::Write => self.spin_until(
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

    /// Spins (bounded) until `ready` holds; true if it did.
    ///
    /// The first microseconds are a pure spin (the peer on another core answers in well under a
    /// microsecond); after that each check also yields the CPU, so that a peer scheduled on the
    /// same core gets to run instead of waiting for our spin budget to run out.
    ///
    /// `ready` is checked every round (one load of the peer's index); `done` (the peer's state,
    /// which changes rarely) every 64 rounds.
    fn spin_until(
        &mut self,
        ready: impl Fn(&mut Endpoint<Region>) -> bool,
        done: impl Fn(&mut Endpoint<Region>) -> bool,
    ) -> bool {
        const PURE_SPIN: Duration = Duration::from_micros(2);
        let Some(budget) = self.spin.budget() else { return false };
        // The clock is read lazily: a peer on another core usually answers within the first
        // 64 rounds, and then the spin costs no clock read at all.
        let mut start: Option<Instant> = None;
        let mut rounds = 0u32;
        loop {
            if ready(&mut self.endpoint) {
                self.spin.record(true);
                return true;
            }
            rounds = rounds.wrapping_add(1);
            // Reading the clock costs more than a ring check: look at it every 64 rounds.
            if rounds % 64 == 0 {
                if done(&mut self.endpoint) {
                    self.spin.record(true);
                    return true;
                }
                let spent = start.get_or_insert_with(Instant::now).elapsed();
                if spent >= budget {
                    self.spin.record(false);
                    return false;
                }
                if spent >= PURE_SPIN {
                    std::thread::yield_now();
                }
            }
            std::hint::spin_loop();
        }
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
        let this = self.get_mut();
        for _ in 0..MAX_WAKES_PER_POLL {
            match this.endpoint.recv(buf.initialize_unfilled()) {
                Ok(RecvStatus::Data(t)) => {
                    buf.advance(t.bytes);
                    if t.notify {
                        this.kick()?;
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(RecvStatus::Eof) => return Poll::Ready(Ok(())),
                Ok(RecvStatus::Empty { notify }) => {
                    if notify {
                        this.kick()?;
                    }
                    if buf.remaining() == 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                Err(e) => return Poll::Ready(Err(this.fail(e, false))),
            }
            match this.wait(cx, Direction::Read) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<B: Backend + Clone> AsyncWrite for Link<B> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        for _ in 0..MAX_WAKES_PER_POLL {
            match this.endpoint.send(buf) {
                Ok(t) if t.bytes > 0 => {
                    if t.notify {
                        this.kick()?;
                    }
                    return Poll::Ready(Ok(t.bytes));
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(this.fail(e, true))),
            }
            match this.wait(cx, Direction::Write) {
                Poll::Ready(Ok(())) => continue,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
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

/// Waits until `ring-ref` and `event-channel` under `path` are published and parses them.
async fn wait_published<B: Backend>(
    backend: &B,
    path: &str,
    server: DomId,
) -> Result<(GrantRef, EvtchnPort), LinkError> {
    let store = backend.store();
    let watch = register(store.watch(path)?)?;
    loop {
        if let Some(found) = read_published(store, path, server)? {
            return Ok(found);
        }
        let mut guard = watch.readable().await?;
        while watch.get_ref().0.try_next()?.is_some() {}
        guard.clear_ready();
    }
}

fn read_published<S: Store>(
    store: &S,
    path: &str,
    server: DomId,
) -> Result<Option<(GrantRef, EvtchnPort)>, LinkError> {
    let read = |key: &'static str| -> Result<Option<u32>, LinkError> {
        match store.read(&format!("{path}/{key}")) {
            // Created but not yet written (see `listen`).
            Ok(v) if v.is_empty() => Ok(None),
            Ok(v) => parse_decimal(key, &v)
                .map(Some)
                .map_err(|violation| LinkError::PeerMisbehaved { peer: server, violation }),
            Err(BackendError::NotFound(_)) | Err(BackendError::PermissionDenied(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    };
    // ring-ref is written last: once it is there, event-channel must be too.
    let Some(ring_ref) = read("ring-ref")? else { return Ok(None) };
    let Some(port) = read("event-channel")? else { return Ok(None) };
    Ok(Some((GrantRef(ring_ref), EvtchnPort(port))))
}

/// Parses a non-zero decimal u32 published by the (untrusted) server.
fn parse_decimal(what: &'static str, raw: &[u8]) -> Result<u32, PeerMisbehaved> {
    let bad = || PeerMisbehaved::BadStoreValue {
        what,
        value: String::from_utf8_lossy(&raw[..raw.len().min(32)]).into(),
    };
    let text = std::str::from_utf8(raw).map_err(|_| bad())?;
    match text.trim_end_matches('\0').parse::<u32>() {
        Ok(v) if v != 0 => Ok(v),
        _ => Err(bad()),
    }
}

/// Adaptive spin budget: spins while spinning pays off, backs off when it keeps failing so that an
/// idle link does not burn CPU on every wait.
#[derive(Debug)]
struct Spin {
    budget: Option<Duration>,
    failures: u32,
    skip: u32,
}

impl Spin {
    fn new(budget: Option<Duration>) -> Spin {
        Spin { budget: budget.filter(|d| !d.is_zero()), failures: 0, skip: 0 }
    }

    fn budget(&mut self) -> Option<Duration> {
        let budget = self.budget?;
        if self.skip > 0 {
            self.skip -= 1;
            return None;
        }
        Some(budget)
    }

    fn record(&mut self, success: bool) {
        if success {
            self.failures = 0;
        } else {
            // After 4 misses in a row, skip 1, 2, 4 … up to 64 waits before spinning again.
            self.failures = self.failures.saturating_add(1);
            if self.failures >= 4 {
                self.skip = 1 << (self.failures - 4).min(6);
            }
        }
    }
}

/// One waker registered with tokio for the event-channel fd that wakes both the reading and the
/// writing task: tokio keeps only one read waker per fd, and both directions wait on the same fd.
#[derive(Default)]
struct Fanout {
    reader: Mutex<Option<Waker>>,
    writer: Mutex<Option<Waker>>,
}

impl Fanout {
    fn register_reader(&self, w: &Waker) {
        store_waker(&self.reader, w);
    }
    fn register_writer(&self, w: &Waker) {
        store_waker(&self.writer, w);
    }
}

fn store_waker(slot: &Mutex<Option<Waker>>, w: &Waker) {
    let mut slot = slot.lock().unwrap_or_else(|p| p.into_inner());
    match &*slot {
        Some(old) if old.will_wake(w) => {}
        _ => *slot = Some(w.clone()),
    }
}

impl Wake for Fanout {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }
    fn wake_by_ref(self: &Arc<Self>) {
        for slot in [&self.reader, &self.writer] {
            let w = slot.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_values_are_parsed_strictly() {
        assert_eq!(parse_decimal("ring-ref", b"42").ok(), Some(42));
        assert_eq!(parse_decimal("ring-ref", b"42\0").ok(), Some(42));
        for bad in [&b"0"[..], b"-1", b"", b"4294967296", b"12ab", b"\xff\xfe"] {
            assert!(parse_decimal("ring-ref", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn spin_backs_off_when_it_keeps_missing() {
        let mut s = Spin::new(Some(Duration::from_micros(10)));
        for _ in 0..4 {
            assert!(s.budget().is_some());
            s.record(false);
        }
        assert!(s.budget().is_none(), "after four misses the next wait skips spinning");
        assert!(s.budget().is_some());
        s.record(true);
        assert!(s.budget().is_some());
        assert!(Spin::new(None).budget().is_none());
    }
}
