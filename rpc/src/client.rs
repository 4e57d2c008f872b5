//! Calling a typed service on any [`Address`]: a tarpc [`Stub`] that reconnects.
//!
//! [`Client`] plugs into the typed client tarpc generates (`XClient::from(client)`) and runs
//! every call through a tower stack — `ConcurrencyLimit(Retry(Reconnecting))`:
//!
//! * **Deadlines** travel with each call in tarpc's context (the server abandons a call past its
//!   deadline, the client returns `DeadlineExceeded`); connecting and retrying are bounded by the
//!   same deadline, so a caller never hangs.
//! * **Reconnect.** When the connection goes (peer restart, migration, a link torn down), the
//!   next call connects again, with exponential backoff between attempts.
//! * **Retries**: a call that never left (connecting failed) is sent again, whatever it is; a
//!   call the `idempotent` predicate accepts is also sent again after the connection went while
//!   it was in flight. Any other call whose connection went fails with [`ConnectionLost`]
//!   (inside `RpcError::Channel`; see [`connection_lost`]): it may or may not have run. (tarpc
//!   reports a connection found closed at send time like one lost in flight, so a
//!   non-idempotent call on a connection that died while idle also gets `ConnectionLost`: the
//!   conservative answer.)
//! * **Concurrency limit**: at most `max_in_flight` calls at once from this client.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tarpc::client::RpcError;
use tarpc::client::stub::Stub;
use tarpc::context::Context;
use tarpc::{ChannelError, ClientMessage, RequestName, Response};
use tower::retry::Policy;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::codec::{self, Codec};
use crate::metrics::Metrics;
use crate::{Address, Net, preamble};

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Serialization format (offered in the preamble).
    pub codec: Codec,
    /// Largest response frame accepted, bytes.
    pub max_frame: usize,
    /// Calls in flight at once; more wait their turn.
    pub max_in_flight: usize,
    /// Most extra attempts of an idempotent call.
    pub retries: u32,
    /// First backoff between attempts; doubles up to `max_backoff`.
    pub backoff: Duration,
    /// Longest backoff between attempts.
    pub max_backoff: Duration,
    /// How long the server may take to answer the preamble.
    pub preamble_timeout: Duration,
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
        }
    }
}

/// A call that was in flight when the connection was lost and is not idempotent, so it was not
/// sent again: it may or may not have run on the server.
#[derive(Debug, Clone, thiserror::Error)]
#[error("connection to {addr} lost with the call in flight; not retried (not idempotent): {cause}")]
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
fn is_transport_error(e: &RpcError) -> bool {
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

type Channel<Req, Resp> = tarpc::client::Channel<Arc<Req>, Resp>;

/// The connection, made again when it goes.
struct Connection<Req, Resp> {
    net: Net,
    addr: Address,
    service: &'static str,
    config: ClientConfig,
    /// The current channel and its generation (so that a failure of an old one does not drop a
    /// newer one). A plain mutex, held only to clone or swap: calls on a live connection never
    /// wait on `connecting`.
    current: Mutex<Option<(u64, Channel<Req, Resp>)>>,
    /// Held while connecting, so that one caller connects and the others wait for it.
    connecting: tokio::sync::Mutex<()>,
    generation: Mutex<u64>,
}

impl<Req, Resp> Connection<Req, Resp>
where
    Req: RequestName + Serialize + Send + Sync + 'static,
    Resp: for<'de> Deserialize<'de> + Send + 'static,
{
    fn live(&self) -> Option<(u64, Channel<Req, Resp>)> {
        self.current.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn channel(&self) -> Result<(u64, Channel<Req, Resp>), RpcError> {
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
        let transport = codec::transport::<Response<Resp>, ClientMessage<Arc<Req>>>(
            stream,
            self.config.codec,
            self.config.max_frame,
        );
        let channel = tarpc::client::new(tarpc::client::Config::default(), transport).spawn();
        let g = {
            let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
            *g += 1;
            *g
        };
        tracing::debug!(addr = %self.addr, generation = g, "connected");
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((g, channel.clone()));
        Ok((g, channel))
    }

    fn forget(&self, generation: u64) {
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if cur.as_ref().is_some_and(|(g, _)| *g == generation) {
            tracing::info!(addr = %self.addr, "connection lost; the next call reconnects");
            *cur = None;
        }
    }
}

/// The innermost tower service: one attempt over the current connection.
struct Attempt<Req, Resp>(Arc<Connection<Req, Resp>>);

impl<Req, Resp> Clone for Attempt<Req, Resp> {
    fn clone(&self) -> Self {
        Attempt(self.0.clone())
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<Req, Resp> Service<(Context, Arc<Req>)> for Attempt<Req, Resp>
where
    Req: RequestName + Serialize + Send + Sync + 'static,
    Resp: for<'de> Deserialize<'de> + Send + 'static,
{
    type Response = Resp;
    type Error = RpcError;
    type Future = BoxFuture<Result<Resp, RpcError>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), RpcError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (ctx, req): (Context, Arc<Req>)) -> Self::Future {
        let conn = self.0.clone();
        Box::pin(async move {
            let connect = tokio::time::timeout_at(ctx.deadline.into(), conn.channel());
            let (g, channel) = connect.await.map_err(|_| RpcError::DeadlineExceeded)??;
            let r = channel.call(ctx, req).await;
            if let Err(e) = &r {
                if is_transport_error(e) {
                    conn.forget(g);
                }
            }
            r
        })
    }
}

/// Retries idempotent calls after transport failures, with backoff, within the deadline.
struct Retry<Req> {
    idempotent: fn(&Req) -> bool,
    left: u32,
    backoff: Duration,
    max_backoff: Duration,
}

impl<Req> Clone for Retry<Req> {
    fn clone(&self) -> Self {
        Retry {
            idempotent: self.idempotent,
            left: self.left,
            backoff: self.backoff,
            max_backoff: self.max_backoff,
        }
    }
}

impl<Req: Send + Sync + 'static, Resp> Policy<(Context, Arc<Req>), Resp, RpcError> for Retry<Req> {
    type Future = BoxFuture<()>;

    fn retry(
        &mut self,
        (ctx, req): &mut (Context, Arc<Req>),
        result: &mut Result<Resp, RpcError>,
    ) -> Option<Self::Future> {
        let Err(e) = result else { return None };
        let never_sent = matches!(e, RpcError::Send(_));
        if !is_transport_error(e) || self.left == 0 || !(never_sent || (self.idempotent)(req)) {
            return None;
        }
        let wait = self.backoff;
        if Instant::now() + wait >= ctx.deadline {
            return None;
        }
        self.left -= 1;
        self.backoff = (self.backoff * 2).min(self.max_backoff);
        tracing::debug!(error = %e, ?wait, left = self.left, "retrying");
        Some(Box::pin(tokio::time::sleep(wait)))
    }

    fn clone_request(&mut self, req: &(Context, Arc<Req>)) -> Option<(Context, Arc<Req>)> {
        Some(req.clone())
    }
}

type Stack<Req, Resp> = tower::util::BoxCloneSyncService<(Context, Arc<Req>), Resp, RpcError>;

/// A reconnecting, retrying client of one service at one address; use it as the stub of a
/// tarpc-generated client: `EchoClient::from(client)`. Cheap to clone.
pub struct Client<Req, Resp> {
    conn: Arc<Connection<Req, Resp>>,
    addr: Arc<str>,
    service: &'static str,
    stack: Stack<Req, Resp>,
    idempotent: fn(&Req) -> bool,
    metrics: Metrics,
}

impl<Req, Resp> Clone for Client<Req, Resp> {
    fn clone(&self) -> Self {
        Client {
            conn: self.conn.clone(),
            addr: self.addr.clone(),
            service: self.service,
            stack: self.stack.clone(),
            idempotent: self.idempotent,
            metrics: self.metrics.clone(),
        }
    }
}

impl<Req, Resp> std::fmt::Debug for Client<Req, Resp> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.addr).field("service", &self.service).finish()
    }
}

impl<Req, Resp> Client<Req, Resp>
where
    Req: RequestName + Serialize + Send + Sync + 'static,
    Resp: for<'de> Deserialize<'de> + Send + 'static,
{
    /// A client of `service` at `addr`. Connects on the first call (and again after a loss);
    /// use [`Client::connect`] to fail early instead. `idempotent` says which calls may be sent
    /// again after a connection loss.
    pub fn new(
        net: Net,
        addr: Address,
        service: &'static str,
        config: ClientConfig,
        idempotent: fn(&Req) -> bool,
    ) -> Client<Req, Resp> {
        let retry = Retry {
            idempotent,
            left: config.retries,
            backoff: config.backoff,
            max_backoff: config.max_backoff,
        };
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
        let stack = ServiceBuilder::new()
            .concurrency_limit(max_in_flight)
            .layer(tower::retry::RetryLayer::new(retry))
            .service(Attempt(conn.clone()));
        Client {
            conn,
            addr: addr.to_string().into(),
            service,
            stack: tower::util::BoxCloneSyncService::new(stack),
            idempotent,
            metrics: Metrics::new("client"),
        }
    }

    /// Like [`Client::new`], then connects (within `timeout`; the connection is kept for the
    /// calls) so that a wrong address, a missing service or an incompatible server is reported
    /// now, as the `io::Error` of the transport or the preamble.
    pub async fn connect(
        net: Net,
        addr: Address,
        service: &'static str,
        config: ClientConfig,
        idempotent: fn(&Req) -> bool,
        timeout: Duration,
    ) -> io::Result<Client<Req, Resp>> {
        let client = Client::new(net, addr.clone(), service, config, idempotent);
        match tokio::time::timeout(timeout, client.conn.channel()).await {
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr}"))),
            Ok(Err(RpcError::Send(e))) => match e.downcast::<ConnectFailed>() {
                Ok(f) => return Err(f.cause),
                Err(e) => return Err(io::Error::other(e)),
            },
            Ok(Err(e)) => return Err(io::Error::other(e)),
            Ok(Ok(_)) => {}
        }
        Ok(client)
    }

    /// Call statistics of this client (and its clones).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }
}

impl<Req, Resp> Stub for Client<Req, Resp>
where
    Req: RequestName + Serialize + Send + Sync + 'static,
    Resp: for<'de> Deserialize<'de> + Send + 'static,
{
    type Req = Req;
    type Resp = Resp;

    async fn call(&self, ctx: Context, request: Req) -> Result<Resp, RpcError> {
        let method = request.name().to_string();
        let idempotent = (self.idempotent)(&request);
        let span = tracing::debug_span!("call", service = self.service, method = %method, addr = %self.addr);
        let start = Instant::now();
        let mut stack = self.stack.clone();
        let result = tracing::Instrument::instrument(
            async move { stack.ready().await?.call((ctx, Arc::new(request))).await },
            span,
        )
        .await;
        let result = match result {
            Err(e) if is_transport_error(&e) && !matches!(e, RpcError::Send(_)) && !idempotent => {
                let lost = ConnectionLost { addr: self.addr.to_string(), cause: e.to_string() };
                Err(RpcError::Channel(ChannelError::Read(Arc::new(lost))))
            }
            other => other,
        };
        self.metrics.record(self.service, &method, result.is_ok(), start.elapsed());
        result
    }
}
