//! Serving typed services on any [`Address`].
//!
//! Each connection: the preamble (service name, version, codec), then tarpc's channel over
//! length-delimited frames, carrying [`Call`]s (method by name) and [`Reply`]s. Every server
//! also answers the built-in [`DESCRIBE`] and [`PING`]. Every request goes through the server's tower stack —
//! `LoadShed(ConcurrencyLimit(handler))`: beyond `max_concurrent` calls in progress across all
//! connections, new calls fail at once ([`is_overloaded`]) instead of queueing — inside a tracing
//! span (service, method, peer), and is counted in [`Metrics`]. Deadlines come with each request
//! (tarpc's context) and are enforced here: a call past its deadline is abandoned. A connection
//! that sends an oversize, truncated or undecodable frame is closed with the reason logged; the
//! others go on.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use futures::{StreamExt, future};
use tarpc::ServerError;
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel, Serve};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service as _, ServiceBuilder, ServiceExt};
use tracing::Instrument;

use crate::codec::{self, Codec};
use crate::metrics::Metrics;
use crate::preamble::{self, Refusal};
use crate::wire::{self, BUILTIN_SERVICE, Call, Caller, DESCRIBE, PING, Reply, Service, ServiceDescriptor};
use crate::{Address, Net};

/// Start of the detail of a shed call's `ServerError` (kind `WouldBlock`).
pub const OVERLOADED: &str = "overloaded";

/// True if the call was shed by an overloaded server (it did not run; try again later).
pub fn is_overloaded(e: &tarpc::client::RpcError) -> bool {
    matches!(e, tarpc::client::RpcError::Server(s)
        if s.kind == io::ErrorKind::WouldBlock && s.detail.starts_with(OVERLOADED))
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest frame accepted, bytes; a longer length prefix closes the connection.
    pub max_frame: usize,
    /// Calls in progress at once, all connections together; more are shed ([`is_overloaded`]).
    pub max_concurrent: usize,
    /// How long a new connection may take to send its preamble.
    pub preamble_timeout: Duration,
    /// Run each call in a task of its own, instead of inside its connection's task. Inline
    /// (the default) saves a spawn and a task switch per call (about 0.8 µs, docs/rpc.md): a
    /// connection's calls still run concurrently, but on one thread at a time, so a method that
    /// computes for long (rather than awaiting) should set this.
    pub spawn_calls: bool,
}

impl Default for ServerConfig {
    /// 16 MiB frames, 1,024 concurrent calls, 5 s for the preamble, calls inline.
    fn default() -> Self {
        ServerConfig {
            max_frame: 16 << 20,
            max_concurrent: 1024,
            preamble_timeout: Duration::from_secs(5),
            spawn_calls: false,
        }
    }
}

/// One call as it goes through the server's tower stack.
struct Incoming {
    ctx: Context,
    call: Call,
    /// The service the connection chose (`None`: the built-in methods only).
    target: Option<Service>,
    codec: Codec,
    caller: Caller,
}

type Stack = BoxCloneSyncService<Incoming, Vec<u8>, BoxError>;

/// The tarpc [`Serve`] that runs each call through the tower stack, a span and the metrics.
#[derive(Clone)]
struct Stacked {
    target: Option<Service>,
    codec: Codec,
    caller: Caller,
    stack: Stack,
    metrics: Metrics,
}

impl Stacked {
    fn service_name(&self) -> &str {
        self.target.as_ref().map_or(BUILTIN_SERVICE, |s| s.name())
    }

    /// The method's name for metrics: only names the service has (or the built-ins), so that
    /// a client inventing names cannot grow the metrics without bound.
    fn metric_name(&self, method: &str) -> String {
        let known = [DESCRIBE, PING].contains(&method)
            || self.target.as_ref().is_some_and(|s| s.descriptor().methods.iter().any(|m| m.name == method));
        if known { method.to_string() } else { "<unknown>".to_string() }
    }
}

impl Serve for Stacked {
    type Req = Call;
    type Resp = Reply;

    async fn serve(self, ctx: Context, call: Call) -> Result<Reply, ServerError> {
        let method = self.metric_name(&call.method);
        let service = self.service_name().to_string();
        let span = tracing::info_span!("rpc", service = %service, method = %method, peer = %self.caller.peer);
        let start = Instant::now();
        let mut stack = self.stack;
        let incoming = Incoming { ctx, call, target: self.target, codec: self.codec, caller: self.caller };
        let result = async {
            let svc = stack.ready().await?;
            svc.call(incoming).await
        }
        .instrument(span.clone())
        .await;
        self.metrics.record(&service, &method, result.is_ok(), start.elapsed());
        result.map(Reply).map_err(|e| {
            span.in_scope(|| tracing::debug!(error = %e, "call failed"));
            if e.is::<tower::load_shed::error::Overloaded>() {
                // tarpc carries only the classic io::ErrorKinds: WouldBlock = try again later.
                ServerError::new(
                    io::ErrorKind::WouldBlock,
                    format!("{OVERLOADED}: too many calls in progress"),
                )
            } else {
                match e.downcast::<ServerError>() {
                    Ok(e) => *e,
                    Err(e) => ServerError::new(io::ErrorKind::Other, e.to_string()),
                }
            }
        })
    }
}

/// Answers one call: a built-in method, or the chosen service's.
async fn answer(hosted: Arc<Vec<ServiceDescriptor>>, incoming: Incoming) -> Result<Vec<u8>, ServerError> {
    let Incoming { ctx, call, target, codec, caller } = incoming;
    match &*call.method {
        DESCRIBE => {
            codec.encode(&*hosted).map_err(|e| wire::unencodable_result(BUILTIN_SERVICE, DESCRIBE, e))
        }
        PING => Ok(Vec::new()),
        method => match target {
            None => Err(wire::unknown_method(BUILTIN_SERVICE, method)),
            Some(service) => {
                let reply = service.dispatch().dispatch(method, &call.args, codec)?;
                wire::in_call(ctx, caller, reply).await
            }
        },
    }
}

/// A server: serves services on addresses, with one configuration and one set of metrics.
#[derive(Debug, Clone)]
pub struct Server {
    net: Net,
    config: ServerConfig,
    metrics: Metrics,
}

/// A running service; dropping the handle does not stop it, [`ServeHandle::stop`] does.
#[derive(Debug)]
pub struct ServeHandle {
    addr: Address,
    task: tokio::task::JoinHandle<()>,
}

impl ServeHandle {
    /// Where the service listens (for `tcp:…:0`, with the chosen port).
    pub fn addr(&self) -> &Address {
        &self.addr
    }

    /// Stops accepting connections and drops the open ones; when it returns, the address is
    /// free to serve again.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

impl Server {
    /// A server using `net`'s transports.
    pub fn new(net: Net, config: ServerConfig) -> Server {
        Server { net, config, metrics: Metrics::new("server") }
    }

    /// Call statistics of everything this server served.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves `service` (from `#[dombus::service]`: `my_impl.into_service()`) on `addr`.
    pub async fn serve(&self, addr: &Address, service: Service) -> io::Result<ServeHandle> {
        self.serve_many(addr, vec![service]).await
    }

    /// Serves several services on one address; each connection names the one it calls in its
    /// preamble. Every connection may also call the built-in methods ([`DESCRIBE`], [`PING`]).
    pub async fn serve_many(&self, addr: &Address, services: Vec<Service>) -> io::Result<ServeHandle> {
        let mut names = std::collections::HashSet::new();
        for s in &services {
            preamble::check_name(s.name())?;
            if s.name() == BUILTIN_SERVICE || !names.insert(s.name().to_string()) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("service name {:?} reserved or given twice", s.name()),
                ));
            }
        }
        let hosted: Arc<Vec<ServiceDescriptor>> =
            Arc::new(services.iter().map(|s| s.descriptor().clone()).collect());
        let services: Arc<[Service]> = services.into();
        let mut listener = self.net.listen(addr).await?;
        let bound = listener.local_addr()?;
        let stack: Stack = BoxCloneSyncService::new(
            ServiceBuilder::new().load_shed().concurrency_limit(self.config.max_concurrent).service(
                tower::service_fn(move |incoming: Incoming| {
                    let hosted = hosted.clone();
                    async move { answer(hosted, incoming).await.map_err(BoxError::from) }
                }),
            ),
        );
        let config = self.config.clone();
        let metrics = self.metrics.clone();
        let names: Vec<String> = names.into_iter().collect();
        tracing::info!(%bound, services = ?names, "serving");
        let task = tokio::spawn(async move {
            // Owned here, so that stopping the service (aborting this task) drops every open
            // connection too.
            let mut connections = tokio::task::JoinSet::new();
            loop {
                while connections.try_join_next().is_some() {}
                let accepted = match listener.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        // A transient accept error (e.g. out of fds) must not end the service.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let peer: Arc<str> = accepted.peer.into();
                let hosting = Hosting {
                    services: services.clone(),
                    caller: Caller { peer: peer.clone(), domain: accepted.peer_domain },
                    stack: stack.clone(),
                    metrics: metrics.clone(),
                };
                let config = config.clone();
                let span = tracing::info_span!("conn", peer = %peer);
                connections.spawn(connection(accepted.stream, hosting, config).instrument(span));
            }
        });
        Ok(ServeHandle { addr: bound, task })
    }
}

/// What a new connection may reach.
struct Hosting {
    services: Arc<[Service]>,
    caller: Caller,
    stack: Stack,
    metrics: Metrics,
}

/// One connection: preamble, then requests until the client goes or breaks the protocol.
async fn connection(mut stream: crate::BoxStream, hosting: Hosting, config: ServerConfig) {
    let hello = match preamble::read_hello(&mut stream, config.preamble_timeout).await {
        Ok(h) => h,
        Err(r) => {
            tracing::info!("closing: not a dombus preamble");
            let _ = preamble::answer(&mut stream, Some(r), "expected a dombus RPC preamble").await;
            return;
        }
    };
    let target = hosting.services.iter().find(|s| s.name() == hello.service).cloned();
    let here = || {
        let names: Vec<&str> = hosting.services.iter().map(|s| s.name()).collect();
        names.join(", ")
    };
    let refusal = if hello.version != preamble::VERSION {
        Some((
            Refusal::Version,
            format!("protocol version {} (server speaks {})", hello.version, preamble::VERSION),
        ))
    } else if target.is_none() && hello.service != BUILTIN_SERVICE {
        Some((Refusal::NoSuchService, format!("this is {:?}, not {:?}", here(), hello.service)))
    } else if Codec::from_id(hello.codec).is_none() {
        Some((Refusal::Codec, format!("unknown codec {}", hello.codec)))
    } else {
        None
    };
    if let Some((r, msg)) = refusal {
        tracing::info!(%msg, "refused");
        let _ = preamble::answer(&mut stream, Some(r), &msg).await;
        return;
    }
    if preamble::answer(&mut stream, None, "").await.is_err() {
        return;
    }
    let codec = Codec::from_id(hello.codec).unwrap_or_default();
    let stacked =
        Stacked { target, codec, caller: hosting.caller, stack: hosting.stack, metrics: hosting.metrics };
    tracing::debug!(service = stacked.service_name(), %codec, "connection accepted");
    let transport = codec::server_transport::<Call>(stream, codec, config.max_frame);
    let calls = BaseChannel::with_defaults(Logged { inner: transport }).execute(stacked);
    if config.spawn_calls {
        calls
            .for_each(|call| {
                tokio::spawn(call);
                future::ready(())
            })
            .await;
    } else {
        calls.for_each_concurrent(None, |call| call).await;
    }
    tracing::debug!("connection closed");
}

pin_project_lite::pin_project! {
    /// A transport that logs why its incoming side failed (the channel then closes).
    struct Logged<T> {
        #[pin]
        inner: T,
    }
}

impl<T, E: std::fmt::Display, I> futures::Stream for Logged<T>
where
    T: futures::Stream<Item = Result<I, E>>,
{
    type Item = Result<I, E>;
    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let r = self.project().inner.poll_next(cx);
        if let Poll::Ready(Some(Err(e))) = &r {
            tracing::warn!(error = %e, "closing the connection: bad frame from the client");
        }
        r
    }
}

impl<T: futures::Sink<S>, S> futures::Sink<S> for Logged<T> {
    type Error = T::Error;
    fn poll_ready(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), T::Error>> {
        self.project().inner.poll_ready(cx)
    }
    fn start_send(self: Pin<&mut Self>, item: S) -> Result<(), T::Error> {
        self.project().inner.start_send(item)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), T::Error>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Result<(), T::Error>> {
        self.project().inner.poll_close(cx)
    }
}
