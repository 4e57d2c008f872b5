//! Serving a typed service on any [`Address`].
//!
//! Each connection: the preamble (service name, version, codec), then tarpc's channel over
//! length-delimited frames. Every request goes through the server's tower stack —
//! `LoadShed(ConcurrencyLimit(handler))`: beyond `max_concurrent` calls in progress across all
//! connections, new calls fail at once ([`is_overloaded`]) instead of queueing — inside a tracing
//! span (service, method, peer), and is counted in [`Metrics`]. Deadlines come with each request
//! (tarpc's context) and are enforced here: a call past its deadline is abandoned. A connection
//! that sends an oversize, truncated or undecodable frame is closed with the reason logged; the
//! others go on.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use futures::{StreamExt, future};
use serde::{Deserialize, Serialize};
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel, Serve};
use tarpc::{ClientMessage, RequestName, Response, ServerError};
use tower::util::BoxCloneSyncService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};
use tracing::Instrument;

use crate::codec::{self, Codec};
use crate::metrics::Metrics;
use crate::preamble::{self, Refusal};
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
}

impl Default for ServerConfig {
    /// 16 MiB frames, 1,024 concurrent calls, 5 s for the preamble.
    fn default() -> Self {
        ServerConfig { max_frame: 16 << 20, max_concurrent: 1024, preamble_timeout: Duration::from_secs(5) }
    }
}

type Stack<Req, Resp> = BoxCloneSyncService<(Context, Req), Resp, BoxError>;

/// The tarpc [`Serve`] that runs each request through the tower stack, a span and the metrics.
struct Stacked<Req, Resp> {
    service: &'static str,
    peer: Arc<str>,
    stack: Stack<Req, Resp>,
    metrics: Metrics,
}

impl<Req, Resp> Clone for Stacked<Req, Resp> {
    fn clone(&self) -> Self {
        Stacked {
            service: self.service,
            peer: self.peer.clone(),
            stack: self.stack.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

impl<Req: RequestName + Send + 'static, Resp: Send + 'static> Serve for Stacked<Req, Resp> {
    type Req = Req;
    type Resp = Resp;

    async fn serve(self, ctx: Context, req: Req) -> Result<Resp, ServerError> {
        let method = req.name().to_string();
        let span = tracing::info_span!("rpc", service = self.service, method = %method, peer = %self.peer);
        let start = Instant::now();
        let mut stack = self.stack;
        let result = async {
            let svc = stack.ready().await?;
            svc.call((ctx, req)).await
        }
        .instrument(span.clone())
        .await;
        self.metrics.record(self.service, &method, result.is_ok(), start.elapsed());
        result.map_err(|e| {
            span.in_scope(|| tracing::debug!(error = %e, "call failed"));
            if e.is::<tower::load_shed::error::Overloaded>() {
                // tarpc carries only the classic io::ErrorKinds: WouldBlock = try again later.
                ServerError::new(
                    io::ErrorKind::WouldBlock,
                    format!("{OVERLOADED}: too many calls in progress"),
                )
            } else {
                ServerError::new(io::ErrorKind::Other, e.to_string())
            }
        })
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

    /// Serves `service` (its name, checked against each client's preamble) on `addr`:
    /// `handler(ctx, request)` answers each call. With a tarpc service `S` (from
    /// `#[tarpc::service]`), the handler is `move |ctx, req| S.serve().serve(ctx, req)`-style
    /// glue; `#[dombus::service]` generates it.
    pub async fn serve<Req, Resp, F, Fut>(
        &self,
        addr: &Address,
        service: &'static str,
        handler: F,
    ) -> io::Result<ServeHandle>
    where
        Req: for<'de> Deserialize<'de> + RequestName + Send + 'static,
        Resp: Serialize + Send + 'static,
        F: Fn(Context, Req) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<Resp, ServerError>> + Send + 'static,
    {
        preamble::check_name(service)?;
        let mut listener = self.net.listen(addr).await?;
        let bound = listener.local_addr()?;
        let stack: Stack<Req, Resp> = BoxCloneSyncService::new(
            ServiceBuilder::new().load_shed().concurrency_limit(self.config.max_concurrent).service(
                tower::service_fn(move |(ctx, req): (Context, Req)| {
                    let h = handler.clone();
                    async move { h(ctx, req).await.map_err(BoxError::from) }
                }),
            ),
        );
        let config = self.config.clone();
        let metrics = self.metrics.clone();
        tracing::info!(%bound, service, "serving");
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
                let stacked =
                    Stacked { service, peer: peer.clone(), stack: stack.clone(), metrics: metrics.clone() };
                let config = config.clone();
                let span = tracing::info_span!("conn", service, peer = %peer);
                connections.spawn(connection(accepted.stream, stacked, config).instrument(span));
            }
        });
        Ok(ServeHandle { addr: bound, task })
    }
}

/// One connection: preamble, then requests until the client goes or breaks the protocol.
async fn connection<Req, Resp>(mut stream: crate::BoxStream, serve: Stacked<Req, Resp>, config: ServerConfig)
where
    Req: for<'de> Deserialize<'de> + RequestName + Send + 'static,
    Resp: Serialize + Send + 'static,
{
    let hello = match preamble::read_hello(&mut stream, config.preamble_timeout).await {
        Ok(h) => h,
        Err(r) => {
            tracing::info!("closing: not a dombus preamble");
            let _ = preamble::answer(&mut stream, Some(r), "expected a dombus RPC preamble").await;
            return;
        }
    };
    let refusal = if hello.version != preamble::VERSION {
        Some((
            Refusal::Version,
            format!("protocol version {} (server speaks {})", hello.version, preamble::VERSION),
        ))
    } else if hello.service != serve.service {
        Some((Refusal::NoSuchService, format!("this is {:?}, not {:?}", serve.service, hello.service)))
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
    let transport = codec::transport::<ClientMessage<Req>, Response<Resp>>(stream, codec, config.max_frame);
    BaseChannel::with_defaults(Logged { inner: transport })
        .execute(serve)
        .for_each(|call| {
            tokio::spawn(call);
            future::ready(())
        })
        .await;
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
