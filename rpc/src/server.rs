//! Serving typed services on any [`Address`].
//!
//! Each connection: the preamble (service name, version, codec), then tarpc's messages in
//! length-delimited frames, carrying [`Call`]s (method by name) and [`Reply`]s, served from the
//! connection's own task (the direct call path, module `direct`) or by tarpc's channel
//! ([`ServerConfig::call_path`]). Every server
//! also answers the built-in [`DESCRIBE`], [`PING`] and [`METRICS`]. Every request goes through
//! the server's tower stack — `Trace(Metrics(Shed(handler)))`, the
//! policies of [`layer`](crate::layer): it runs in a tracing span (service, method, peer), is
//! counted in [`Metrics`], and beyond `max_concurrent` calls in progress across all
//! connections, new calls fail at once ([`is_overloaded`]) instead of queueing. Deadlines come with each request
//! (tarpc's context) and are enforced here: a call past its deadline is abandoned. A connection
//! that sends an oversize, truncated or undecodable frame is closed with the reason logged; the
//! others go on.
//!
//! What a client can make the server hold is bounded: at most `max_connections` connections
//! (more are refused in the preamble, [`preamble::TooManyConnections`]); per connection, a
//! partial frame of at most `max_frame` (memory following the bytes received, [`codec::Frames`])
//! and at most `max_in_flight` calls read and not yet answered, weighing `max_in_flight_bytes`
//! (past either, the connection is not read until replies drain). docs/rpc.md has the sums.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use futures::{StreamExt, future};
use tarpc::context::Context;
use tarpc::server::{BaseChannel, Channel, Serve};
use tarpc::{ClientMessage, RequestName, Response, ServerError};
use tower::{BoxError, Service as _, ServiceBuilder, ServiceExt};
use tracing::{Instrument, Span};

use crate::codec::{self, Codec, FrameTransport, Frames};
use crate::direct::{self, CallPath};
use crate::in_flight::{InFlight, Ticket};
use crate::layer::metrics::MetricsService;
use crate::layer::shed::Shed;
use crate::layer::trace::TraceService;
use crate::layer::{CallName, MetricsLayer, ShedLayer, TraceLayer};
use crate::metrics::{MAX_METRICS_TEXT, Metrics};
use crate::preamble::{self, Refusal};
use crate::wire::{
    self, BUILTIN_SERVICE, Call, Caller, DESCRIBE, METRICS, PING, Reply, ReplyFuture, Service,
    ServiceDescriptor,
};
use crate::{Address, Net};

/// Start of the detail of a shed call's `ServerError` (kind `WouldBlock`).
pub const OVERLOADED: &str = "overloaded";

/// True if the call was shed by an overloaded server (it did not run; try again later).
pub fn is_overloaded(e: &tarpc::client::RpcError) -> bool {
    matches!(e, tarpc::client::RpcError::Server(s)
        if s.kind == io::ErrorKind::WouldBlock && s.detail.starts_with(OVERLOADED))
}

/// Server settings. The defaults bound what one client can make the server hold to a few MiB
/// per connection (docs/rpc.md, "What a client can make a server hold").
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest call frame accepted, bytes; a longer length prefix closes the connection. Calls
    /// are small (the largest in dombus's services, a registry entry, is under 40 KiB).
    pub max_frame: usize,
    /// Largest reply frame sent, bytes; a longer reply is answered with an error instead (the
    /// clients' own limit, `ClientConfig::max_frame`, is 16 MiB by default).
    pub max_reply_frame: usize,
    /// Calls in progress at once, all connections together; more are shed ([`is_overloaded`]).
    pub max_concurrent: usize,
    /// Connections open at once (those still in their preamble included); more are refused
    /// with [`TOO_MANY_CONNECTIONS`](crate::preamble::TOO_MANY_CONNECTIONS), and counted in
    /// [`Metrics::connections`].
    pub max_connections: usize,
    /// Connections open at once from one domain (over `xen:` and `vsock:`, where the transport
    /// names the caller's domain), so that one guest cannot take every connection; more are
    /// refused as for `max_connections`. With the default virtual-socket budget a link carries
    /// at most 64 connections anyway; this keeps one guest to a sixteenth of the server.
    pub max_connections_per_domain: usize,
    /// Calls in flight on one connection — read and not yet answered: running, or their reply
    /// not yet written. At the bound the server stops reading that connection until replies
    /// drain (a client that never reads its replies stalls only itself). At least 1.
    pub max_in_flight: usize,
    /// Bytes the calls in flight on one connection may weigh (their frames, then their
    /// replies) before the server stops reading it, as for `max_in_flight`; one more call is
    /// read while under it, so the most held is this plus one `max_frame`. At least 1.
    pub max_in_flight_bytes: usize,
    /// How long a new connection may take to send its preamble.
    pub preamble_timeout: Duration,
    /// Polls of stream methods waiting at once, all connections together (a subscription
    /// holds one while it waits for events, up to 30 s): counted apart from `max_concurrent`,
    /// so that subscribers waiting never shed calls. More are shed ([`is_overloaded`]; the
    /// subscription polls again after a backoff).
    pub max_polls: usize,
    /// Polls waiting at once from one domain (over `xen:` and `vsock:`), so that one guest
    /// cannot take every poll.
    pub max_polls_per_domain: usize,
    /// Run each call in a task of its own, instead of inside its connection's task. Inline
    /// (the default) saves a spawn and a task switch per call (about 0.8 µs, docs/rpc.md): a
    /// connection's calls still run concurrently, but on one thread at a time, so a method that
    /// computes for long (rather than awaiting) should set this.
    pub spawn_calls: bool,
    /// What carries the calls: dombus's own loop (the default) or tarpc's channel (for
    /// comparison; the wire is the same, [`CallPath`]).
    pub call_path: CallPath,
}

impl Default for ServerConfig {
    /// 1 MiB call frames, 16 MiB reply frames, 1,024 concurrent calls, 256 connections (16 from
    /// one domain), 128 calls and 1 MiB in flight per connection, 5 s for the preamble, 4,096
    /// waiting polls (128 from one domain), calls inline, on the direct call path.
    fn default() -> Self {
        ServerConfig {
            max_frame: 1 << 20,
            max_reply_frame: 16 << 20,
            max_concurrent: 1024,
            max_connections: 256,
            max_connections_per_domain: 16,
            max_in_flight: 128,
            max_in_flight_bytes: 1 << 20,
            preamble_timeout: Duration::from_secs(5),
            max_polls: 4096,
            max_polls_per_domain: 128,
            spawn_calls: false,
            call_path: CallPath::default(),
        }
    }
}

/// A call as the connection's transport hands it to tarpc: with its place among the
/// connection's calls in flight, which it keeps until its reply is written.
pub(crate) struct Admitted {
    pub(crate) call: Call,
    pub(crate) ticket: Ticket,
    /// When the server read the call, if it read the clock then (the direct path does, for
    /// the deadline): the call's latency counts from there.
    pub(crate) arrived: Option<Instant>,
}

impl RequestName for Admitted {
    fn name(&self) -> &str {
        &self.call.method
    }
}

/// A call's outcome, still holding the call's place in flight (until the transport writes it).
/// Errors travel here too, so that an error waiting to be written is counted like a reply.
pub(crate) struct Answer {
    pub(crate) outcome: Result<Reply, ServerError>,
    pub(crate) ticket: Ticket,
}

/// One call as it goes through the server's tower stack.
struct Incoming {
    ctx: Context,
    call: Call,
    /// The service the connection chose (`None`: the built-in methods only).
    target: Option<Service>,
    /// What the call is counted and traced under.
    name: Counted,
    codec: Codec,
    caller: Caller,
}

/// The server's tower stack, a concrete type: cloning it for a call bumps reference counts
/// only.
type Stack = TraceService<MetricsService<Shed<Answering>, fn(&Incoming) -> Counted>, fn(&Incoming) -> Span>;

/// The span a call runs in. At debug level, as tower-http's `TraceLayer` makes its spans: the
/// daemons log at info, and an enabled span costs every call its fields' formatting and a slot
/// in the subscriber's registry: 1.6–1.9 µs of a 10 µs call on one thread under
/// `tracing_subscriber::fmt` at info (the `rpc_one_thread/ping_direct_logged` bench), where a
/// disabled one costs a few nanoseconds.
/// `RUST_LOG=dombus_rpc=debug` puts every call's service, method and peer back in the logs.
fn rpc_span(incoming: &Incoming) -> Span {
    let (service, method) = (incoming.name.service(), incoming.name.method());
    tracing::debug_span!("rpc", service = %service, method = %method, peer = %incoming.caller.peer)
}

fn counted(incoming: &Incoming) -> Counted {
    incoming.name.clone()
}

/// The innermost service of the server's stack: answers a call ([`answer`]).
#[derive(Clone)]
struct Answering {
    hosted: Arc<Vec<ServiceDescriptor>>,
    metrics: Metrics,
}

impl tower::Service<Incoming> for Answering {
    type Response = Vec<u8>;
    type Error = BoxError;
    type Future = Answered;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, incoming: Incoming) -> Answered {
        answer(&self.hosted, &self.metrics, incoming)
    }
}

/// A call's answer: known at once (a built-in method, a refusal), or the service's own future,
/// run as the call (its context and caller set while it is polled). A named, `Unpin` type
/// rather than a boxed `async` block: the service's future is boxed already (by its dispatch),
/// and a second box per call, with the moves of a large future into it, cost more than the
/// rest of the stack's layers.
pub(crate) enum Answered {
    Now { result: Option<Result<Vec<u8>, ServerError>> },
    Running { reply: ReplyFuture, ctx: Context, caller: Caller },
}

impl Future for Answered {
    type Output = Result<Vec<u8>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let result = match self.get_mut() {
            // Polled after its answer (which `Future` leaves open): it stays pending.
            Answered::Now { result } => std::task::ready!(result.take().map_or(Poll::Pending, Poll::Ready)),
            // The call's context, set for each poll (a clone: a context and a reference count).
            Answered::Running { reply, ctx, caller } => {
                let info = wire::CallInfo { ctx: *ctx, caller: caller.clone() };
                std::task::ready!(wire::in_call(info, || reply.as_mut().poll(cx)))
            }
        };
        Poll::Ready(result.map_err(BoxError::from))
    }
}

/// A call's method as named in the metrics and spans: only names the service has (or the
/// built-ins), so that a client inventing names cannot grow the metrics without bound.
#[derive(Clone, Copy)]
enum MethodName {
    Builtin(&'static str),
    /// The index of the method in its service's descriptor.
    Service(usize),
    Unknown,
}

/// What a call is counted under in the server's metrics: its service and [`MethodName`],
/// without copying either name.
#[derive(Clone)]
struct Counted {
    target: Option<Service>,
    method: MethodName,
    /// When the server read the call, if it knows ([`Admitted::arrived`]).
    arrived: Option<Instant>,
}

impl Counted {
    fn new(target: &Option<Service>, method: &str, arrived: Option<Instant>) -> Counted {
        let known = |s: &Service| s.descriptor().methods.iter().position(|m| m.name == method);
        let method = match wire::BUILTIN_METHODS.into_iter().find(|&b| b == method) {
            Some(builtin) => MethodName::Builtin(builtin),
            None => target.as_ref().and_then(known).map_or(MethodName::Unknown, MethodName::Service),
        };
        Counted { target: target.clone(), method, arrived }
    }

    /// Whether the call is a poll of one of its service's stream methods.
    fn is_stream(&self) -> bool {
        match (self.method, &self.target) {
            (MethodName::Service(i), Some(s)) => s.descriptor().methods.get(i).is_some_and(|m| m.stream),
            _ => false,
        }
    }
}

impl CallName for Counted {
    fn service(&self) -> &str {
        self.target.as_ref().map_or(BUILTIN_SERVICE, |s| s.name())
    }

    fn started(&self) -> Option<Instant> {
        self.arrived
    }

    fn method(&self) -> &str {
        match (self.method, &self.target) {
            (MethodName::Builtin(name), _) => name,
            (MethodName::Service(i), Some(s)) => {
                s.descriptor().methods.get(i).map_or("<unknown>", |m| &m.name)
            }
            _ => "<unknown>",
        }
    }
}

/// The tarpc [`Serve`] that runs each call through the tower stack.
#[derive(Clone)]
pub(crate) struct Stacked {
    target: Option<Service>,
    codec: Codec,
    caller: Caller,
    stack: Stack,
    polls: Polls,
}

/// The stack of stream polls, and their count per domain.
#[derive(Clone)]
struct Polls {
    stack: Stack,
    per_domain: PerDomain,
    max_per_domain: usize,
}

impl Serve for Stacked {
    type Req = Admitted;
    type Resp = Answer;

    async fn serve(self, ctx: Context, admitted: Admitted) -> Result<Answer, ServerError> {
        Ok(self.run(ctx, admitted).await)
    }
}

impl Stacked {
    /// Runs one call through the tower stack (the polls' stack for a poll of a stream method);
    /// its answer keeps the call's place in flight. Clones only what the call needs.
    pub(crate) fn run(&self, ctx: Context, admitted: Admitted) -> Run {
        let Admitted { call, ticket, arrived } = admitted;
        let name = Counted::new(&self.target, &call.method, arrived);
        // A poll waits for events: it counts against the polls' budget, not the calls'.
        let (mut stack, slot) = if !name.is_stream() {
            (self.stack.clone(), None)
        } else {
            match self.caller.domain {
                Some(d) => match self.polls.per_domain.admit(d, self.polls.max_per_domain) {
                    Some(slot) => (self.polls.stack.clone(), Some(slot)),
                    None => {
                        let why = format!(
                            "{OVERLOADED}: {} polls waiting from domain {d}, the server's limit per domain",
                            self.polls.max_per_domain
                        );
                        let refused = ServerError::new(io::ErrorKind::WouldBlock, why);
                        return Run {
                            state: RunState::Refused(Some(refused)),
                            slot: None,
                            ticket: Some(ticket),
                        };
                    }
                },
                None => (self.polls.stack.clone(), None),
            }
        };
        let incoming = Incoming {
            ctx,
            call,
            target: self.target.clone(),
            name,
            codec: self.codec,
            caller: self.caller.clone(),
        };
        // Nothing in the stack waits to be ready (past the limit, `Shed` refuses), so the call
        // is made here and its future is named and `Unpin`: a call that answers at once is
        // never boxed. Were a layer to wait, the call waits in a boxed future instead.
        let mut ready = TaskContext::from_waker(std::task::Waker::noop());
        let state = match stack.poll_ready(&mut ready) {
            Poll::Ready(Ok(())) => RunState::Calling(stack.call(incoming)),
            Poll::Ready(Err(e)) => RunState::Refused(Some(server_error(e))),
            Poll::Pending => RunState::Waiting(Box::pin(async move {
                let svc = stack.ready().await?;
                svc.call(incoming).await
            })),
        };
        Run { state, slot, ticket: Some(ticket) }
    }
}

/// One call through the server's stack ([`Stacked::run`]): resolves to its [`Answer`].
pub(crate) struct Run {
    state: RunState,
    /// Its place among the polls waiting from its domain, if it is a poll.
    slot: Option<DomainSlot>,
    /// Its place in flight, until its answer is written.
    ticket: Option<Ticket>,
}

// The call is the common variant: keeping it out of a box is what this type is for.
#[allow(clippy::large_enum_variant)]
enum RunState {
    Calling(<Stack as tower::Service<Incoming>>::Future),
    Waiting(Pin<Box<dyn Future<Output = Result<Vec<u8>, BoxError>> + Send>>),
    /// Refused before it reached the stack, or by it.
    Refused(Option<ServerError>),
}

impl Future for Run {
    type Output = Answer;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Answer> {
        let this = self.get_mut();
        let outcome = match &mut this.state {
            RunState::Calling(call) => std::task::ready!(Pin::new(call).poll(cx)).map_err(server_error),
            RunState::Waiting(call) => std::task::ready!(call.as_mut().poll(cx)).map_err(server_error),
            // Polled after its answer (which `Future` leaves open): it stays pending.
            RunState::Refused(e) => Err(std::task::ready!(e.take().map_or(Poll::Pending, Poll::Ready))),
        };
        this.slot = None;
        let outcome = outcome.map(Reply);
        let Some(mut ticket) = this.ticket.take() else { return Poll::Pending };
        ticket.reweigh(outcome.as_ref().map_or_else(|e| e.detail.len(), |r| r.0.len()));
        Poll::Ready(Answer { outcome, ticket })
    }
}

/// What a call's failure in the stack is answered as.
fn server_error(e: BoxError) -> ServerError {
    if e.is::<tower::load_shed::error::Overloaded>() {
        // tarpc carries only the classic io::ErrorKinds: WouldBlock = try again later.
        ServerError::new(io::ErrorKind::WouldBlock, format!("{OVERLOADED}: too many calls in progress"))
    } else {
        match e.downcast::<ServerError>() {
            Ok(e) => *e,
            Err(e) => ServerError::new(io::ErrorKind::Other, e.to_string()),
        }
    }
}

/// The error answered instead of a reply of `len` bytes too long to send (`e`, a
/// [`codec::FrameTooLong`]).
pub(crate) fn oversize_reply(len: usize, e: &io::Error) -> ServerError {
    tracing::warn!(error = %e, "reply too long to send; answering an error");
    let detail = format!("the reply ({len} bytes) is longer than the server sends: {e}");
    ServerError::new(io::ErrorKind::InvalidData, detail)
}

/// Answers one call: a built-in method, or the chosen service's.
fn answer(hosted: &[ServiceDescriptor], metrics: &Metrics, incoming: Incoming) -> Answered {
    let Incoming { ctx, call, target, codec, caller, .. } = incoming;
    let now = |result| Answered::Now { result: Some(result) };
    match &*call.method {
        DESCRIBE => {
            now(codec.encode(hosted).map_err(|e| wire::unencodable_result(BUILTIN_SERVICE, DESCRIBE, e)))
        }
        PING => now(Ok(Vec::new())),
        METRICS => now(codec
            .encode(&metrics.prometheus_within(MAX_METRICS_TEXT))
            .map_err(|e| wire::unencodable_result(BUILTIN_SERVICE, METRICS, e))),
        method => match target {
            None => now(Err(wire::unknown_method(BUILTIN_SERVICE, method))),
            Some(service) => match service.dispatch().dispatch(method, &call.args, codec) {
                Ok(reply) => Answered::Running { reply, ctx, caller },
                Err(e) => now(Err(e)),
            },
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

    /// The tower stack calls go through, at most `max` at once.
    fn stack(&self, hosted: Arc<Vec<ServiceDescriptor>>, max: usize) -> Stack {
        ServiceBuilder::new()
            .layer(TraceLayer::new(rpc_span as fn(&Incoming) -> Span).log_failures())
            .layer(MetricsLayer::new(self.metrics.clone(), counted as fn(&Incoming) -> Counted))
            .layer(ShedLayer::new(max))
            .service(Answering { hosted, metrics: self.metrics.clone() })
    }

    /// Serves `service` (from `#[dombus::service]`: `my_impl.into_service()`) on `addr`.
    pub async fn serve(&self, addr: &Address, service: Service) -> io::Result<ServeHandle> {
        self.serve_many(addr, vec![service]).await
    }

    /// Serves several services on one address; each connection names the one it calls in its
    /// preamble. Every connection may also call the built-in methods ([`DESCRIBE`], [`PING`],
    /// [`METRICS`]).
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
        // A port serving one service goes by its name (the connection manager's rules may name it).
        let name = match &services[..] {
            [one] => Some(one.name()),
            _ => None,
        };
        let mut listener = self.net.listen_as(addr, name).await?;
        let bound = listener.local_addr()?;
        let stack = self.stack(hosted.clone(), self.config.max_concurrent);
        let polls = Polls {
            stack: self.stack(hosted, self.config.max_polls),
            per_domain: PerDomain::default(),
            max_per_domain: self.config.max_polls_per_domain,
        };
        let config = self.config.clone();
        let metrics = self.metrics.clone();
        let names: Vec<String> = names.into_iter().collect();
        tracing::info!(%bound, services = ?names, "serving");
        let task = tokio::spawn(async move {
            // Owned here, so that stopping the service (aborting this task) drops every open
            // connection too.
            let mut connections = tokio::task::JoinSet::new();
            let mut refusals = tokio::task::JoinSet::new();
            // Whether the last connection was refused (logged once per run of refusals).
            let mut refusing = false;
            let per_domain = PerDomain::default();
            loop {
                while connections.try_join_next().is_some() {}
                while refusals.try_join_next().is_some() {}
                let accepted = match listener.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        // A transient accept error (e.g. out of fds) must not end the service.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let admitted = match accepted.peer_domain {
                    Some(d) => {
                        per_domain.admit(d, config.max_connections_per_domain).map(Some).ok_or_else(|| {
                            format!(
                                "{} from domain {d}, the server's limit per domain",
                                config.max_connections_per_domain
                            )
                        })
                    }
                    None => Ok(None),
                };
                let open = admitted.and_then(|slot| {
                    Open::new(&metrics, config.max_connections, slot)
                        .ok_or_else(|| format!("{} open, the server's limit", config.max_connections))
                });
                let open = match open {
                    Ok(open) => open,
                    Err(why) => {
                        metrics.refused();
                        if !refusing {
                            tracing::warn!(
                                peer = %accepted.peer,
                                "refusing connections: too many connections: {why} (counted in the metrics)"
                            );
                        }
                        refusing = true;
                        // Answered in the preamble, a few at a time; past that, just closed.
                        if refusals.len() < MAX_REFUSALS {
                            refusals.spawn(refuse(accepted.stream, why));
                        }
                        continue;
                    }
                };
                refusing = false;
                let peer: Arc<str> = accepted.peer.into();
                let hosting = Hosting {
                    services: services.clone(),
                    caller: Caller { peer: peer.clone(), domain: accepted.peer_domain },
                    stack: stack.clone(),
                    polls: polls.clone(),
                    metrics: metrics.clone(),
                };
                let config = config.clone();
                let span = tracing::info_span!("conn", peer = %peer);
                connections.spawn(
                    async move {
                        let _open = open;
                        connection(accepted.stream, hosting, config).await;
                    }
                    .instrument(span),
                );
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
    polls: Polls,
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
    let service = target.as_ref().map_or(BUILTIN_SERVICE, |s| s.name());
    tracing::debug!(service, %codec, "connection accepted");
    let stacked =
        Stacked { target, codec, caller: hosting.caller, stack: hosting.stack, polls: hosting.polls };
    let frames = Frames::new(config.max_frame, config.max_reply_frame);
    let in_flight = InFlight::new(config.max_in_flight, config.max_in_flight_bytes, hosting.metrics.clone());
    let paused = Paused { paused: false, metrics: hosting.metrics };
    if config.call_path == CallPath::Direct {
        let spawn_calls = config.spawn_calls;
        let conn =
            direct::server::Connection { stream, codec, frames, in_flight, paused, stacked, spawn_calls };
        return direct::server::serve(conn).await;
    }
    let transport = CallTransport {
        inner: FrameTransport::new(stream, codec, frames).checking(codec::check_deadline),
        in_flight,
        paused,
    };
    let calls = BaseChannel::with_defaults(transport).execute(stacked);
    if config.spawn_calls {
        calls
            .for_each(|call| {
                tokio::spawn(call);
                future::ready(())
            })
            .await;
    } else {
        // Unbounded here, bounded by the transport: every call holds its ticket.
        calls.for_each_concurrent(None, |call| call).await;
    }
    tracing::debug!("connection closed");
}

/// Connections being refused at once (each reads the preamble, up to [`REFUSAL_TIMEOUT`],
/// then answers why); more are closed unanswered.
const MAX_REFUSALS: usize = 32;

/// How long a refused connection may take to send its preamble.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// A connection counted open in the server's metrics (against `max_connections`) and, if it
/// comes from a domain, against that domain's share (its slot), until dropped.
struct Open {
    metrics: Metrics,
    _slot: Option<DomainSlot>,
}

impl Open {
    fn new(metrics: &Metrics, max: usize, slot: Option<DomainSlot>) -> Option<Open> {
        metrics.try_open(max).then(|| Open { metrics: metrics.clone(), _slot: slot })
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.metrics.closed();
    }
}

/// Connections open per caller domain.
#[derive(Default, Clone)]
struct PerDomain(Arc<std::sync::Mutex<HashMap<u32, usize>>>);

impl PerDomain {
    /// A slot for one more connection from `domain`, unless it has `max` open.
    fn admit(&self, domain: u32, max: usize) -> Option<DomainSlot> {
        let mut open = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(domain).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(DomainSlot { domain, of: self.clone() })
    }
}

/// One connection of a domain, counted in [`PerDomain`] until dropped.
struct DomainSlot {
    domain: u32,
    of: PerDomain,
}

impl Drop for DomainSlot {
    fn drop(&mut self) {
        let mut open = self.of.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = open.get_mut(&self.domain) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.domain);
            }
        }
    }
}

/// Refuses a connection because too many are open (`why`: how many, which limit): reads its
/// preamble first (closing a socket with unread bytes resets a TCP connection, and the client
/// could lose the answer), then answers [`Refusal::TooManyConnections`].
async fn refuse(mut stream: crate::BoxStream, why: String) {
    let _ = preamble::read_hello(&mut stream, REFUSAL_TIMEOUT).await;
    let msg = format!("{}: {why}", preamble::TOO_MANY_CONNECTIONS);
    let _ = preamble::answer(&mut stream, Some(Refusal::TooManyConnections), &msg).await;
}

/// Whether a connection's reading is paused, counted in the metrics while it is.
pub(crate) struct Paused {
    paused: bool,
    metrics: Metrics,
}

impl Paused {
    pub(crate) fn set(&mut self, paused: bool) {
        if self.paused != paused {
            self.paused = paused;
            self.metrics.paused(paused);
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        self.set(false);
    }
}

pin_project_lite::pin_project! {
    /// A server connection's tarpc transport: reads calls only while the connection's calls in
    /// flight leave room ([`InFlight`]), gives each its [`Ticket`], and writes answers (giving
    /// their tickets back). Logs why its incoming side failed (the channel then closes).
    struct CallTransport {
        #[pin]
        inner: FrameTransport<ClientMessage<Call>, Response<Reply>>,
        in_flight: Arc<InFlight>,
        paused: Paused,
    }
}

impl futures::Stream for CallTransport {
    type Item = io::Result<ClientMessage<Admitted>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.project();
        if this.in_flight.poll_room(cx).is_pending() {
            this.paused.set(true);
            return Poll::Pending;
        }
        this.paused.set(false);
        let (message, bytes) = match futures::ready!(this.inner.poll_next_sized(cx)) {
            None => return Poll::Ready(None),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "closing the connection: bad frame from the client");
                return Poll::Ready(Some(Err(e)));
            }
            Some(Ok(m)) => m,
        };
        Poll::Ready(Some(Ok(match message {
            ClientMessage::Request(r) => ClientMessage::Request(tarpc::Request {
                context: r.context,
                id: r.id,
                message: Admitted { call: r.message, ticket: this.in_flight.admit(bytes), arrived: None },
            }),
            ClientMessage::Cancel { trace_context, request_id } => {
                ClientMessage::Cancel { trace_context, request_id }
            }
            // A message of a later tarpc: this server cannot tell what it holds.
            _ => {
                let e = io::Error::new(io::ErrorKind::InvalidData, "a message of unknown kind");
                tracing::warn!(error = %e, "closing the connection: bad frame from the client");
                return Poll::Ready(Some(Err(e)));
            }
        })))
    }
}

impl futures::Sink<Response<Answer>> for CallTransport {
    type Error = io::Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_ready(cx)
    }

    fn start_send(self: Pin<&mut Self>, response: Response<Answer>) -> io::Result<()> {
        let mut inner = self.project().inner;
        let Response { request_id, message } = response;
        // The ticket goes once the reply is in the write buffer (or is not sent).
        let (outcome, _ticket) = match message {
            Ok(Answer { outcome, ticket }) => (outcome, Some(ticket)),
            Err(e) => (Err(e), None),
        };
        let len = outcome.as_ref().map_or(0, |r| r.0.len());
        match inner.as_mut().start_send(Response { request_id, message: outcome }) {
            Err(e) if Frames::is_too_long(&e) => {
                let message = Err(oversize_reply(len, &e));
                inner.start_send(Response { request_id, message })
            }
            other => other,
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_close(cx)
    }
}
