//! Calling a service on any [`Address`]: a tarpc [`Stub`] that reconnects.
//!
//! [`Client`] is the stub of the typed clients `#[dombus::service]` generates
//! (`StorageClient::connect(net, addr)`), [`RawClient`] its untyped core (calls by method name,
//! the built-in `describe`, `ping` and `metrics`). Every call goes through a tower stack —
//! `Trace(Metrics(ConnectionLost(ConcurrencyLimit(Retry(Attempt)))))`, the policies of
//! [`layer`](crate::layer):
//!
//! * **Deadlines** travel with each call in tarpc's context (the server abandons a call past its
//!   deadline, the client returns `DeadlineExceeded`); connecting and retrying are bounded by the
//!   same deadline, so a caller never hangs.
//! * **Reconnect.** When the connection goes (peer restart, migration, a link torn down), the
//!   next call connects again, with exponential backoff between attempts.
//! * **Retries**: a call that never left (connecting failed) is sent again, whatever it is; a
//!   call to a method marked `#[idempotent]` is also sent again after the connection went while
//!   it was in flight. Any other call whose connection went fails with [`ConnectionLost`]
//!   (inside `RpcError::Channel`; see [`connection_lost`]): it may or may not have run. (A
//!   connection that died while idle is noticed by the next call's read, on either call path,
//!   so a non-idempotent call there also gets `ConnectionLost`: the conservative answer. On the
//!   direct path, a call on a connection already known to have failed never leaves and is sent
//!   again on a new one.)
//! * **Concurrency limit**: at most `max_in_flight` calls at once from this client.
//! * **Metrics and tracing**: each call is counted in [`RawClient::stats`] (latency including
//!   the wait for its turn) and runs in a `call` span (service, method, address).

use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use tarpc::client::RpcError;
use tarpc::client::stub::Stub;
use tarpc::context::Context;
use tarpc::{ChannelError, ClientMessage, Response};
use tower::limit::ConcurrencyLimit;
use tower::retry::Policy;
use tower::{Service, ServiceBuilder, ServiceExt};
use tracing::Span;

use crate::codec::{self, Codec};
use crate::direct::CallPath;
use crate::direct::client::{DirectChannel, PendingCall};
use crate::layer::connection_lost::ConnectionLostService;
use crate::layer::metrics::MetricsService;
use crate::layer::trace::TraceService;
use crate::layer::{CallName, ConnectionLostLayer, MayRetry, MetricsLayer, TraceLayer};
use crate::metrics::Metrics;
use crate::wire::{self, BUILTIN_SERVICE, Call, DESCRIBE, METRICS, PING, Reply, Request, ServiceDescriptor};
use crate::{Address, Net, preamble};

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Serialization format (offered in the preamble).
    pub codec: Codec,
    /// Largest frame, bytes, each way: a reply announcing more closes the connection, a call
    /// encoding to more fails.
    pub max_frame: usize,
    /// Calls in flight at once; more wait their turn.
    pub max_in_flight: usize,
    /// Most extra attempts of a call: of any call that never left (the connect or the preamble
    /// failed), and of an idempotent call whose connection was lost with it in flight.
    pub retries: u32,
    /// First backoff between attempts; doubles up to `max_backoff`.
    pub backoff: Duration,
    /// Longest backoff between attempts.
    pub max_backoff: Duration,
    /// How long the server may take to answer the preamble.
    pub preamble_timeout: Duration,
    /// What carries the calls: dombus's own channel (the default) or tarpc's (for comparison;
    /// the wire is the same, [`CallPath`]).
    pub call_path: CallPath,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            codec: Codec::default(),
            max_frame: 16 << 20,
            max_in_flight: 1024,
            retries: 5,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            preamble_timeout: Duration::from_secs(5),
            call_path: CallPath::default(),
        }
    }
}

/// A call that was in flight when the connection was lost and is not idempotent, so it was not
/// sent again: it may or may not have run on the server.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "connection to {addr} lost with the call in flight: its outcome is unknown (it may or may not have run; not idempotent, so not sent again): {cause}"
)]
pub struct ConnectionLost {
    /// Where the call went.
    pub addr: String,
    /// What the transport said.
    pub cause: String,
}

/// The [`ConnectionLost`] inside an `RpcError`, if that is what it is.
pub fn connection_lost(e: &RpcError) -> Option<&ConnectionLost> {
    match e {
        RpcError::Channel(ChannelError::Read(inner)) => inner.downcast_ref::<ConnectionLost>(),
        _ => None,
    }
}

/// Errors that mean the connection (not the call) failed: the call may be retried elsewhere.
pub(crate) fn is_transport_error(e: &RpcError) -> bool {
    matches!(e, RpcError::Shutdown | RpcError::Send(_) | RpcError::Channel(_)) && connection_lost(e).is_none()
}

/// Why a call never left: could not connect. Wrapped as `RpcError::Send` (nothing was sent).
#[derive(Debug, thiserror::Error)]
#[error("could not connect to {addr}: {cause}")]
pub struct ConnectFailed {
    /// Where.
    pub addr: String,
    /// Why.
    pub cause: io::Error,
}

/// A connection's calls: dombus's own channel, or tarpc's.
#[derive(Clone)]
enum Channel {
    Direct(DirectChannel),
    Tarpc(tarpc::client::Channel<Arc<Call>, Reply>),
}

impl Channel {
    async fn call(&self, ctx: Context, call: Arc<Call>) -> Result<Reply, RpcError> {
        match self {
            Channel::Direct(channel) => channel.call(ctx, &call).await,
            Channel::Tarpc(channel) => channel.call(ctx, call).await,
        }
    }
}

/// The connection, made again when it goes.
struct Connection {
    net: Net,
    addr: Address,
    service: &'static str,
    config: ClientConfig,
    /// The current channel and its generation (so that a failure of an old one does not drop a
    /// newer one). A plain mutex, held only to clone or swap: calls on a live connection never
    /// wait on `connecting`.
    current: Mutex<Option<(u64, Channel)>>,
    /// Held while connecting, so that one caller connects and the others wait for it.
    connecting: tokio::sync::Mutex<()>,
    generation: Mutex<u64>,
}

impl Connection {
    fn live(&self) -> Option<(u64, Channel)> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn channel(&self) -> Result<(u64, Channel), RpcError> {
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let _connecting = self.connecting.lock().await;
        if let Some(c) = self.live() {
            return Ok(c);
        }
        let failed =
            |cause: io::Error| RpcError::Send(Box::new(ConnectFailed { addr: self.addr.to_string(), cause }));
        let mut stream = self.net.connect(&self.addr).await.map_err(failed)?;
        preamble::client(&mut stream, self.service, self.config.codec, self.config.preamble_timeout)
            .await
            .map_err(failed)?;
        let (codec, max_frame) = (self.config.codec, self.config.max_frame);
        let channel = match self.config.call_path {
            CallPath::Direct => Channel::Direct(DirectChannel::new(stream, codec, max_frame)),
            CallPath::Tarpc => {
                let transport =
                    codec::framed::<Response<Reply>, ClientMessage<Arc<Call>>>(stream, codec, max_frame);
                Channel::Tarpc(tarpc::client::new(tarpc::client::Config::default(), transport).spawn())
            }
        };
        let g = {
            let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
            *g += 1;
            *g
        };
        tracing::debug!(addr = %self.addr, generation = g, "connected");
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((g, channel.clone()));
        Ok((g, channel))
    }

    /// Forgets connection `generation` if `r` says the transport failed under it.
    fn forget_on<T>(&self, generation: u64, r: &Result<T, RpcError>) {
        if r.as_ref().is_err_and(is_transport_error) {
            self.forget(generation);
        }
    }

    fn forget(&self, generation: u64) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.as_ref().is_some_and(|(g, _)| *g == generation) {
            tracing::info!(addr = %self.addr, "connection lost; the next call reconnects");
            *cur = None;
        }
    }
}

/// One call as it goes through the client's tower stack, with what its span and metrics name
/// it by (so that the stack's policies are plain functions and the stack a concrete type:
/// nothing boxed or allocated to clone it for a call).
#[derive(Clone)]
struct Outgoing {
    ctx: Context,
    call: Arc<Call>,
    idempotent: bool,
    service: &'static str,
    addr: Arc<str>,
}

impl MayRetry for Outgoing {
    fn idempotent(&self) -> bool {
        self.idempotent
    }
}

/// What a call is counted under in the client's metrics.
struct Counted {
    service: &'static str,
    call: Arc<Call>,
}

impl CallName for Counted {
    fn service(&self) -> &str {
        self.service
    }

    fn method(&self) -> &str {
        &self.call.method
    }
}

/// The innermost tower service: one attempt over the current connection.
#[derive(Clone)]
struct Attempt(Arc<Connection>);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<Outgoing> for Attempt {
    type Response = Reply;
    type Error = RpcError;
    type Future = AttemptFuture;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), RpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, out: Outgoing) -> AttemptFuture {
        let conn = self.0.clone();
        if let Some((generation, Channel::Direct(channel))) = conn.live() {
            let call = channel.call(out.ctx, &out.call);
            return AttemptFuture::Direct { call, conn, generation };
        }
        AttemptFuture::Other(Box::pin(async move {
            // A live connection is taken as it is; only connecting waits, bounded by the deadline.
            let (g, channel) = match conn.live() {
                Some(live) => live,
                None => {
                    let connect = tokio::time::timeout_at(out.ctx.deadline.into(), conn.channel());
                    connect.await.map_err(|_| RpcError::DeadlineExceeded)??
                }
            };
            let r = channel.call(out.ctx, out.call).await;
            conn.forget_on(g, &r);
            r
        }))
    }
}

/// One attempt's future. On a live connection of the direct path (every call but those that
/// connect), the channel's own future, named: a boxed `async` block would cost every call an
/// allocation of a large future and its moves.
enum AttemptFuture {
    Direct { call: PendingCall, conn: Arc<Connection>, generation: u64 },
    Other(BoxFuture<Result<Reply, RpcError>>),
}

impl Future for AttemptFuture {
    type Output = Result<Reply, RpcError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            AttemptFuture::Direct { call, conn, generation } => {
                let r = std::task::ready!(Pin::new(call).poll(cx));
                conn.forget_on(*generation, &r);
                Poll::Ready(r)
            }
            AttemptFuture::Other(f) => f.as_mut().poll(cx),
        }
    }
}

/// Retries idempotent calls after transport failures, with backoff, within the deadline.
#[derive(Clone)]
struct Retry {
    left: u32,
    backoff: Duration,
    max_backoff: Duration,
}

impl Policy<Outgoing, Reply, RpcError> for Retry {
    type Future = BoxFuture<()>;

    fn retry(&mut self, out: &mut Outgoing, result: &mut Result<Reply, RpcError>) -> Option<Self::Future> {
        let Err(e) = result else { return None };
        let never_sent = matches!(e, RpcError::Send(_));
        if !is_transport_error(e) || self.left == 0 || !(never_sent || out.idempotent) {
            return None;
        }
        let wait = self.backoff;
        if Instant::now() + wait >= out.ctx.deadline {
            return None;
        }
        self.left -= 1;
        self.backoff = (self.backoff * 2).min(self.max_backoff);
        tracing::debug!(error = %e, ?wait, left = self.left, "retrying");
        Some(Box::pin(tokio::time::sleep(wait)))
    }

    fn clone_request(&mut self, out: &Outgoing) -> Option<Outgoing> {
        Some(out.clone())
    }
}

/// The client's tower stack, a concrete type: cloning it for a call bumps reference counts
/// only.
type Stack = TraceService<
    MetricsService<
        ConnectionLostService<ConcurrencyLimit<tower::retry::Retry<Retry, Attempt>>>,
        fn(&Outgoing) -> Counted,
    >,
    fn(&Outgoing) -> Span,
>;

fn call_span(out: &Outgoing) -> Span {
    tracing::debug_span!("call", service = out.service, method = %out.call.method, addr = %out.addr)
}

fn counted(out: &Outgoing) -> Counted {
    Counted { service: out.service, call: out.call.clone() }
}

/// A reconnecting, retrying client of one service at one address, calling methods by name with
/// encoded arguments. [`Client`] is its typed form; this one serves the built-in methods
/// ([`RawClient::describe`], [`RawClient::ping`]) and tools that handle any service.
/// Cheap to clone (one reference count).
#[derive(Clone)]
pub struct RawClient(Arc<Inner>);

/// What a [`RawClient`] and its clones share.
struct Inner {
    conn: Arc<Connection>,
    addr: Arc<str>,
    service: &'static str,
    /// Cloned for each call (tower's `call` takes `&mut`).
    stack: Stack,
    metrics: Metrics,
}

impl std::fmt::Debug for RawClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawClient").field("addr", &self.0.addr).field("service", &self.0.service).finish()
    }
}

impl RawClient {
    /// A client of `service` at `addr` (use [`BUILTIN_SERVICE`] to reach only the built-in
    /// methods of whatever serves there). Connects on the first call, and again after a loss.
    pub fn new(net: Net, addr: Address, service: &'static str, config: ClientConfig) -> RawClient {
        let retry = Retry { left: config.retries, backoff: config.backoff, max_backoff: config.max_backoff };
        let max_in_flight = config.max_in_flight;
        let conn = Arc::new(Connection {
            net,
            addr: addr.clone(),
            service,
            config,
            current: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            generation: Mutex::new(0),
        });
        let addr: Arc<str> = addr.to_string().into();
        let metrics = Metrics::new("client");
        let stack = ServiceBuilder::new()
            .layer(TraceLayer::new(call_span as fn(&Outgoing) -> Span))
            .layer(MetricsLayer::new(metrics.clone(), counted as fn(&Outgoing) -> Counted))
            .layer(ConnectionLostLayer::new(addr.clone()))
            .concurrency_limit(max_in_flight)
            .layer(tower::retry::RetryLayer::new(retry))
            .service(Attempt(conn.clone()));
        RawClient(Arc::new(Inner { conn, addr, service, stack, metrics }))
    }

    /// Connects now (within `timeout`; the connection is kept for the calls), so that a wrong
    /// address, a missing service or an incompatible server is reported now, as the
    /// `io::Error` of the transport or the preamble.
    pub async fn connect_now(&self, timeout: Duration) -> io::Result<()> {
        let addr = &self.0.addr;
        match tokio::time::timeout(timeout, self.0.conn.channel()).await {
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr}"))),
            Ok(Err(RpcError::Send(e))) => match e.downcast::<ConnectFailed>() {
                Ok(f) => Err(f.cause),
                Err(e) => Err(io::Error::other(e)),
            },
            Ok(Err(e)) => Err(io::Error::other(e)),
            Ok(Ok(_)) => Ok(()),
        }
    }

    /// The codec arguments and results are encoded with.
    pub fn codec(&self) -> Codec {
        self.0.conn.config.codec
    }

    /// Where the calls go.
    pub fn addr(&self) -> &str {
        &self.0.addr
    }

    /// Call statistics of this client (and its clones).
    pub fn stats(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Calls `method` with encoded `args`; answers the encoded result. `idempotent` allows
    /// sending it again after the connection was lost with the call in flight.
    pub async fn call(
        &self,
        ctx: Context,
        method: Cow<'static, str>,
        args: Vec<u8>,
        idempotent: bool,
    ) -> Result<Vec<u8>, RpcError> {
        let call = Arc::new(Call { method, args });
        let out = Outgoing { ctx, call, idempotent, service: self.0.service, addr: self.0.addr.clone() };
        let mut stack = self.0.stack.clone();
        let Reply(bytes) = stack.ready().await?.call(out).await?;
        Ok(bytes)
    }

    /// The descriptors of the services hosted where this client calls (the built-in
    /// [`DESCRIBE`] method; any server answers it).
    pub async fn describe(&self, ctx: Context) -> Result<Vec<ServiceDescriptor>, RpcError> {
        let bytes = self.call(ctx, Cow::Borrowed(DESCRIBE), Vec::new(), true).await?;
        self.codec().decode(&bytes).map_err(|e| wire::undecodable_reply(DESCRIBE, e))
    }

    /// One round trip through the built-in [`PING`] method.
    pub async fn ping(&self, ctx: Context) -> Result<(), RpcError> {
        self.call(ctx, Cow::Borrowed(PING), Vec::new(), true).await.map(drop)
    }

    /// The metrics of the server this client calls, in the Prometheus text format (the
    /// built-in [`METRICS`] method; any server answers it).
    pub async fn metrics(&self, ctx: Context) -> Result<String, RpcError> {
        let bytes = self.call(ctx, Cow::Borrowed(METRICS), Vec::new(), true).await?;
        self.codec().decode(&bytes).map_err(|e| wire::undecodable_reply(METRICS, e))
    }
}

/// A typed client of a `#[dombus::service]` at one address: the stub of the generated
/// `<Trait>Client`, which is how it is normally made (`StorageClient::connect(net, addr)`).
/// Cheap to clone.
pub struct Client<Req> {
    raw: RawClient,
    _request: PhantomData<fn(Req)>,
}

impl<Req> Clone for Client<Req> {
    fn clone(&self) -> Self {
        Client { raw: self.raw.clone(), _request: PhantomData }
    }
}

impl<Req> std::fmt::Debug for Client<Req> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.raw.fmt(f)
    }
}

impl<Req: Request> Client<Req> {
    /// A client of `Req`'s service at `addr`. Connects on the first call (and again after a
    /// loss); use [`Client::connect`] to fail early instead.
    pub fn new(net: Net, addr: Address, config: ClientConfig) -> Client<Req> {
        Client { raw: RawClient::new(net, addr, Req::SERVICE, config), _request: PhantomData }
    }

    /// Like [`Client::new`], then connects (see [`RawClient::connect_now`]).
    pub async fn connect(
        net: Net,
        addr: Address,
        config: ClientConfig,
        timeout: Duration,
    ) -> io::Result<Client<Req>> {
        let client = Client::new(net, addr, config);
        client.raw.connect_now(timeout).await?;
        Ok(client)
    }

    /// The untyped client underneath (built-in methods, the server's metrics).
    pub fn raw(&self) -> &RawClient {
        &self.raw
    }

    /// Call statistics of this client (and its clones).
    pub fn stats(&self) -> &Metrics {
        self.raw.stats()
    }
}

impl<Req: Request> Stub for Client<Req> {
    type Req = Req;
    type Resp = Req::Response;

    async fn call(&self, ctx: Context, request: Req) -> Result<Req::Response, RpcError> {
        let method = request.method();
        let idempotent = request.idempotent();
        let codec = self.raw.codec();
        let stream = request.is_stream();
        let mut args = request.encode_args(codec).map_err(wire::unencodable_arguments)?;
        if stream {
            // One poll, from nothing: a stream's current state (subscriptions poll on).
            let poll = crate::events::PollArgs { from: None, max_events: 1, wait_ms: 0 };
            args = codec
                .encode(&crate::events::StreamCall { poll, args })
                .map_err(wire::unencodable_arguments)?;
        }
        let bytes = self.raw.call(ctx, Cow::Borrowed(method), args, idempotent).await?;
        Req::decode_response(method, &bytes, codec).map_err(|e| wire::undecodable_reply(method, e))
    }
}

/// The services hosted at `addr` (connects for the built-in [`DESCRIBE`] call only).
pub async fn describe(net: Net, addr: Address, timeout: Duration) -> io::Result<Vec<ServiceDescriptor>> {
    let client = RawClient::new(net, addr, BUILTIN_SERVICE, ClientConfig::default());
    client.connect_now(timeout).await?;
    let mut ctx = Context::current();
    ctx.deadline = Instant::now() + timeout;
    client.describe(ctx).await.map_err(io::Error::other)
}
