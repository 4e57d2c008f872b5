//! The RPC conformance suite, run against every transport this machine has: Unix, TCP and
//! transport-xen virtual sockets (two domains over the simulated hypervisor, in-process); and
//! AF_VSOCK, ignored here and run with `--ignored` inside the VM harness, where `vsock_loopback`
//! gives CID 1.
//!
//! Every test has its own scratch directory and TCP port, so the tests run in parallel. Calls
//! that must be in progress when the test acts (cancelled, cut off by a restart, shed beside)
//! are held by the server until the test releases them, and the test waits until the server has
//! them: nothing depends on how fast this machine is.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dombus_rpc::{
    Address, CallPath, ClientConfig, Codec, Net, RawClient, Server, ServerConfig, connection_lost,
    wire::Request as _,
};
use dombus_sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use tarpc::client::RpcError;
use tarpc::context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[dombus::service]
pub trait Echo {
    /// Returns its argument.
    #[idempotent]
    async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
    /// Waits until the test releases `tag`, returns it (not idempotent: never sent twice).
    async fn hold(&self, tag: u64) -> u64;
    /// Records `id` (duplicates are counted), returns it.
    #[idempotent]
    async fn record(&self, id: u64) -> u64;
    /// Waits until the test releases `tag`, returns it (idempotent: sent again after a
    /// connection loss).
    #[idempotent]
    async fn hold_idempotent(&self, tag: u64) -> u64;
    /// The caller's domain and the milliseconds left to the call's deadline, as the service
    /// sees them (after yielding once: they hold across the call's polls).
    #[idempotent]
    async fn whoami(&self) -> (Option<u32>, Option<u64>);
}

#[derive(Clone, Default)]
struct State {
    seen: Arc<Mutex<HashSet<u64>>>,
    duplicates: Arc<AtomicU64>,
    /// Set when a held call is dropped by the server before it was released.
    cancelled: Arc<AtomicBool>,
    /// How many times a held call with each tag has started on the server.
    started: Arc<Mutex<HashMap<u64, u32>>>,
    /// Tags the test has released, and the wake-up of the calls waiting for theirs.
    released: Arc<Mutex<HashSet<u64>>>,
    release: Arc<tokio::sync::Notify>,
}

impl State {
    /// Runs a held call: counts its start, returns when `tag` is released; marks the call
    /// cancelled if it is dropped before.
    async fn hold(&self, tag: u64) -> u64 {
        *self.started.lock().unwrap().entry(tag).or_default() += 1;
        let mut guard = CancelGuard(self.cancelled.clone(), false);
        loop {
            // Created before the check: notify_waiters() reaches it from here on.
            let woken = self.release.notified();
            if self.released.lock().unwrap().contains(&tag) {
                break;
            }
            woken.await;
        }
        guard.1 = true;
        tag
    }

    fn release(&self, tag: u64) {
        self.released.lock().unwrap().insert(tag);
        self.release.notify_waiters();
    }

    fn started(&self, tag: u64) -> u32 {
        self.started.lock().unwrap().get(&tag).copied().unwrap_or(0)
    }

    /// Waits until held calls with `tag` have started `n` times on the server (a liveness limit:
    /// only a hung server reaches it).
    async fn wait_started(&self, tag: u64, n: u32, what: &str) {
        let t = Instant::now();
        while self.started(tag) < n {
            assert!(
                t.elapsed() < T,
                "{what}: call {tag} started {} times, not {n}, in {T:?}",
                self.started(tag)
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

#[derive(Clone)]
struct EchoServer(State);

struct CancelGuard(Arc<AtomicBool>, bool);
impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

impl Echo for EchoServer {
    async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }
    async fn hold(&self, tag: u64) -> u64 {
        self.0.hold(tag).await
    }
    async fn hold_idempotent(&self, tag: u64) -> u64 {
        self.0.hold(tag).await
    }
    async fn whoami(&self) -> (Option<u32>, Option<u64>) {
        tokio::task::yield_now().await;
        let domain = dombus_rpc::current_caller().and_then(|c| c.domain);
        let left = dombus_rpc::current_context()
            .map(|c| c.deadline.saturating_duration_since(Instant::now()).as_millis() as u64);
        (domain, left)
    }
    async fn record(&self, id: u64) -> u64 {
        if !self.0.seen.lock().unwrap().insert(id) {
            self.0.duplicates.fetch_add(1, Ordering::SeqCst);
        }
        id
    }
}

/// A transport under test: where the server listens and how both sides reach it.
struct Fixture {
    name: &'static str,
    server_net: Net,
    client_net: Net,
    addr: Address,
    /// What carries the calls in the client and in the server (the wire is the same).
    paths: (CallPath, CallPath),
    /// Whether the server runs each call in a task of its own (`ServerConfig::spawn_calls`).
    spawn_calls: bool,
    _keep: Vec<Box<dyn std::any::Any + Send>>,
}

impl Fixture {
    /// The same fixture with the client's calls on `client` and the server's on `server`.
    fn via(self, client: CallPath, server: CallPath) -> Fixture {
        Fixture { paths: (client, server), ..self }
    }

    /// The same fixture with the server running each call in a task of its own.
    fn spawning(self) -> Fixture {
        Fixture { spawn_calls: true, ..self }
    }
}

/// A directory of this test's own (created here, never shared with another test), removed when
/// the fixture holding it is dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("dombus-rpc-{tag}-{}-{n}", std::process::id()));
        // create_dir (not _all): fails rather than share a directory left by someone else.
        std::fs::create_dir(&d).unwrap_or_else(|e| panic!("scratch directory {}: {e}", d.display()));
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unix() -> Fixture {
    let d = Scratch::new("unix");
    Fixture {
        name: "unix",
        server_net: Net::new(),
        client_net: Net::new(),
        addr: Address::Unix(d.0.join("echo.sock")),
        paths: (CallPath::Direct, CallPath::Direct),
        spawn_calls: false,
        _keep: vec![Box::new(d)],
    }
}

/// Port 0: the first server takes a free port, the suite reads it from the serve handle.
fn tcp() -> Fixture {
    Fixture {
        name: "tcp",
        server_net: Net::new(),
        client_net: Net::new(),
        addr: Address::Tcp { host: "127.0.0.1".into(), port: 0 },
        paths: (CallPath::Direct, CallPath::Direct),
        spawn_calls: false,
        _keep: vec![],
    }
}

fn xen() -> Fixture {
    let d = Scratch::new("xen");
    let sock = d.0.join("simxen.sock");
    let hv: SimHypervisorHandle = SimHypervisor::spawn(&sock).unwrap();
    let server =
        VsockDomain::start(SimBackend::boot(&sock, Some(DomId(1))).unwrap(), VsockConfig::default()).unwrap();
    let client =
        VsockDomain::start(SimBackend::boot(&sock, Some(DomId(2))).unwrap(), VsockConfig::default()).unwrap();
    let mut client_net = Net::new().with_xen(client);
    client_net.xen_connect_wait = Some(Duration::from_secs(10));
    Fixture {
        name: "xen",
        server_net: Net::new().with_xen(server),
        client_net,
        addr: "xen:1:5000".parse().unwrap(),
        // Dropped in order: the hypervisor before the directory holding its socket.
        paths: (CallPath::Direct, CallPath::Direct),
        spawn_calls: false,
        _keep: vec![Box::new(hv), Box::new(d)],
    }
}

/// CID 1 is this machine itself (`vsock_loopback`): only inside the VM harness's guest.
fn vsock() -> Fixture {
    Fixture {
        name: "vsock",
        server_net: Net::new(),
        client_net: Net::new(),
        addr: Address::Vsock { cid: 1, port: 5000 },
        paths: (CallPath::Direct, CallPath::Direct),
        spawn_calls: false,
        _keep: vec![],
    }
}

async fn start(f: &Fixture, state: &State, config: ServerConfig) -> (Server, dombus_rpc::ServeHandle) {
    let config = ServerConfig { call_path: f.paths.1, spawn_calls: f.spawn_calls, ..config };
    let server = Server::new(f.server_net.clone(), config);
    let st = state.clone();
    let h = server.serve(&f.addr, EchoServer(st).into_service()).await.unwrap();
    (server, h)
}

fn client(f: &Fixture, codec: Codec) -> EchoClient {
    let config = ClientConfig { codec, call_path: f.paths.0, ..ClientConfig::default() };
    EchoClient::with_config(f.client_net.clone(), f.addr.clone(), config)
}

fn ctx_for(d: Duration) -> context::Context {
    let mut c = context::current();
    c.deadline = Instant::now() + d;
    c
}

const T: Duration = Duration::from_secs(30);

/// The suite's server: the defaults, but calls of up to 2 MiB (its 1 MiB echo is 1 MiB of
/// arguments plus the call's own bytes, over the default 1 MiB call frame).
fn suite_config() -> ServerConfig {
    ServerConfig { max_frame: 2 << 20, ..ServerConfig::default() }
}

async fn suite(mut f: Fixture) {
    let spawned = if f.spawn_calls { ", calls spawned" } else { "" };
    let name = &*format!("{} ({} client, {} server{spawned})", f.name, f.paths.0, f.paths.1);
    let state = State::default();
    let (server, handle) = start(&f, &state, suite_config()).await;
    // The address as bound (tcp:…:0 becomes the chosen port); restarts below reuse it.
    f.addr = handle.addr().clone();

    for codec in [Codec::Postcard, Codec::Bincode] {
        let c = client(&f, codec);
        // Echo, small and large (1 MiB).
        assert_eq!(c.echo(ctx_for(T), b"hello".to_vec()).await.unwrap(), b"hello", "{name}/{codec}");
        let big: Vec<u8> = (0..1 << 20).map(|i| (i * 7) as u8).collect();
        assert_eq!(c.echo(ctx_for(T), big.clone()).await.unwrap(), big, "{name}/{codec}: 1 MiB");
        // Concurrent calls on one client, each answered with its own bytes.
        let calls = (0..200u64).map(|i| {
            let c = c.clone();
            async move { c.echo(ctx_for(T), i.to_le_bytes().to_vec()).await.unwrap() }
        });
        let answers = futures::future::join_all(calls).await;
        assert_eq!(answers.len(), 200, "{name}/{codec}");
        for (i, a) in answers.into_iter().enumerate() {
            assert_eq!(a, (i as u64).to_le_bytes(), "{name}/{codec}: concurrent call {i}");
        }
    }
    let c = client(&f, Codec::default());

    // The service sees who called and the call's deadline. The caller's domain: over xen:,
    // the client's (2); over vsock:, the peer's CID as the kernel gives it (1: the loopback);
    // over Unix and TCP, none.
    let (domain, left) = c.whoami(ctx_for(Duration::from_secs(20))).await.unwrap();
    let expected = match f.name {
        "xen" => Some(2),
        "vsock" => Some(1),
        _ => None,
    };
    assert_eq!(domain, expected, "{name}: the caller's domain");
    assert!(
        left.is_some_and(|ms| (10_000..=20_000).contains(&ms)),
        "{name}: the call's deadline: {left:?} ms left"
    );

    // Deadline expiry: a call the server never finishes ends with DeadlineExceeded (the outer
    // timeout only catches a client that ignores its deadline), and the server drops the call.
    state.cancelled.store(false, Ordering::SeqCst);
    let t = Instant::now();
    let r = tokio::time::timeout(T, c.hold(ctx_for(Duration::from_millis(100)), 1)).await;
    let r = r.unwrap_or_else(|_| panic!("{name}: a 100 ms deadline did not end the call in {T:?}"));
    assert!(matches!(r, Err(RpcError::DeadlineExceeded)), "{name}: {r:?}");
    eprintln!("{name}: a 100 ms deadline ended the call after {:?}", t.elapsed());
    assert_eq!(state.started(1), 1, "{name}: the call never reached the server");
    wait_until(
        || state.cancelled.load(Ordering::SeqCst),
        &format!("{name}: server dropping the expired call"),
    )
    .await;

    // Cancellation: dropping a call (once the server runs it) cancels it on the server.
    state.cancelled.store(false, Ordering::SeqCst);
    let call = tokio::spawn({
        let c = c.clone();
        async move { c.hold(ctx_for(T), 2).await }
    });
    state.wait_started(2, 1, name).await;
    call.abort();
    assert!(call.await.unwrap_err().is_cancelled());
    wait_until(|| state.cancelled.load(Ordering::SeqCst), &format!("{name}: server seeing the cancellation"))
        .await;

    // The wrong service name is a clear error.
    let e = RawClient::new(f.client_net.clone(), f.addr.clone(), "storage", ClientConfig::default())
        .connect_now(T)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{name}: {e}");
    assert!(e.to_string().contains("not \"storage\""), "{name}: {e}");

    // Bad frames: an oversize length prefix and undecodable bytes each close that connection
    // only (end of stream, or a reset); calls on another connection go on.
    for frame in [&[0xff, 0xff, 0xff, 0xf0][..], &[0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0x99][..]] {
        let mut raw = f.client_net.connect(&f.addr).await.unwrap();
        dombus_rpc::preamble::client(&mut raw, "echo", Codec::Postcard, T).await.unwrap();
        raw.write_all(frame).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(T, raw.read(&mut buf)).await.expect("bad-frame connection not closed");
        assert!(matches!(n, Ok(0) | Err(_)), "{name}: server answered garbage: {n:?}");
        assert_eq!(c.echo(ctx_for(T), b"still".to_vec()).await.unwrap(), b"still", "{name}");
    }

    // A second request with the id of one still running is ignored (tarpc's rule): only the
    // first runs and only it is answered.
    let mut raw = f.client_net.connect(&f.addr).await.unwrap();
    dombus_rpc::preamble::client(&mut raw, "echo", Codec::Bincode, T).await.unwrap();
    let request = |id: u64, r: EchoRequest| {
        let (method, args) = (r.method(), r.encode_args(Codec::Bincode).unwrap());
        let call = dombus_rpc::wire::Call { method: method.into(), args };
        tarpc::ClientMessage::Request(tarpc::Request { context: ctx_for(T), id, message: call })
    };
    let (frames, mut wire) = (dombus_rpc::codec::Frames::new(1 << 20, 1 << 20), bytes::BytesMut::new());
    for r in [request(7, EchoRequest::Hold { tag: 20 }), request(7, EchoRequest::Hold { tag: 21 })] {
        frames.encode_item(Codec::Bincode, &r, &mut wire).unwrap();
    }
    let after = request(8, EchoRequest::Echo { data: b"after".to_vec() });
    frames.encode_item(Codec::Bincode, &after, &mut wire).unwrap();
    raw.write_all(&wire).await.unwrap();
    // The server reads in order: the echo's reply comes after the duplicate was read.
    assert_eq!(read_reply(&mut raw).await.request_id, 8, "{name}");
    state.release(20);
    state.release(21);
    let held = read_reply(&mut raw).await;
    assert_eq!(held.request_id, 7, "{name}");
    let bytes = held.message.expect("the held call failed").0;
    assert_eq!(Codec::Bincode.decode::<u64>(&bytes).unwrap(), 20, "{name}: not the first request's reply");
    assert_eq!(state.started(21), 0, "{name}: the duplicate request ran");
    let mut more = [0u8; 1];
    let extra = tokio::time::timeout(Duration::from_millis(200), raw.read(&mut more)).await;
    assert!(extra.is_err(), "{name}: a second reply to the duplicate id: {extra:?}");
    drop(raw);

    // 1,000 concurrent calls from 10 clients: nothing lost, nothing duplicated.
    let clients: Vec<_> = (0..10).map(|_| client(&f, Codec::default())).collect();
    let calls = (0..1000u64).map(|id| {
        let c = clients[(id % 10) as usize].clone();
        async move { c.record(ctx_for(T), id).await }
    });
    let answers = futures::future::join_all(calls).await;
    for (id, a) in answers.into_iter().enumerate() {
        assert_eq!(a.unwrap(), id as u64, "{name}");
    }
    assert_eq!(state.seen.lock().unwrap().len(), 1000, "{name}: lost calls");
    assert_eq!(state.duplicates.load(Ordering::SeqCst), 0, "{name}: duplicated calls");
    let text = server.metrics().prometheus();
    assert!(
        text.contains("dombus_rpc_server_calls_total{service=\"echo\",method=\"record\"} 1000"),
        "{text}"
    );
    // The same counts from outside the process: the built-in metrics call, on a connection to
    // the built-in methods only.
    let builtin = RawClient::new(
        f.client_net.clone(),
        f.addr.clone(),
        dombus_rpc::wire::BUILTIN_SERVICE,
        ClientConfig::default(),
    );
    let remote = builtin.metrics(ctx_for(T)).await.unwrap();
    assert!(
        remote.contains("dombus_rpc_server_calls_total{service=\"echo\",method=\"record\"} 1000\n"),
        "{name}: {remote}"
    );

    // Reconnect: a call in flight when the server goes fails with ConnectionLost if it is not
    // idempotent, and is not sent again; after a restart on the same address, calls work again
    // without a new client.
    let in_flight = tokio::spawn({
        let c = c.clone();
        async move { c.hold(ctx_for(T), 3).await }
    });
    state.wait_started(3, 1, name).await;
    handle.stop().await;
    let r = tokio::time::timeout(T, in_flight).await.expect("in-flight call hung").unwrap();
    let e = r.unwrap_err();
    assert!(connection_lost(&e).is_some(), "{name}: {e:?}");
    let (_server2, handle2) = start(&f, &state, suite_config()).await;
    assert_eq!(c.echo(ctx_for(T), b"again".to_vec()).await.unwrap(), b"again", "{name}: after restart");
    assert_eq!(state.started(3), 1, "{name}: a call that is not idempotent was sent again");

    // An idempotent call in flight when the server goes is sent again once it is back: the
    // second server sees it start, and its answer reaches the caller.
    let in_flight = tokio::spawn({
        let c = c.clone();
        async move { c.hold_idempotent(ctx_for(T), 4).await }
    });
    state.wait_started(4, 1, name).await;
    handle2.stop().await;
    let (_server3, handle3) = start(&f, &state, suite_config()).await;
    state.wait_started(4, 2, &format!("{name}: the idempotent call sent again")).await;
    state.release(4);
    let r = tokio::time::timeout(T, in_flight).await.expect("retried call hung").unwrap();
    assert_eq!(r.unwrap(), 4, "{name}: the idempotent call was not retried");
    assert_eq!(state.started(4), 2, "{name}: sent more than once again");
    handle3.stop().await;
    eprintln!("{name}: conformance suite passed");
}

/// The next reply on a raw connection.
async fn read_reply(raw: &mut dombus_rpc::BoxStream) -> tarpc::Response<dombus_rpc::wire::Reply> {
    let len = tokio::time::timeout(T, raw.read_u32()).await.expect("no reply").unwrap();
    let mut body = vec![0; usize::try_from(len).unwrap()];
    raw.read_exact(&mut body).await.unwrap();
    Codec::Bincode.decode(&body).unwrap()
}

/// Waits until `cond` holds (a liveness limit of [`T`]: only a hung peer reaches it).
async fn wait_until(cond: impl Fn() -> bool, what: &str) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < T, "{what}: not within {T:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_unix() {
    suite(unix()).await;
}

/// Stopping a service stops the calls its connections are running, inline or in tasks of
/// their own (on the direct server; tarpc's channel leaves spawned calls running to their end
/// or deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_service_stops_its_running_calls() {
    for f in [unix(), unix().spawning()] {
        let state = State::default();
        let (_server, handle) = start(&f, &state, ServerConfig::default()).await;
        let c = client(&f, Codec::default());
        // A deadline past the wait below: only the stopping can end the call in time.
        let call = tokio::spawn(async move { c.hold(ctx_for(4 * T), 30).await });
        state.wait_started(30, 1, f.name).await;
        handle.stop().await;
        wait_until(|| state.cancelled.load(Ordering::SeqCst), "the stopped service's call stopped").await;
        let r = tokio::time::timeout(T, call).await.expect("the call outlived its server").unwrap();
        assert!(r.is_err(), "{r:?}");
    }
}

/// Every call in a task of its own (`spawn_calls`), on either server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_unix_spawned_calls() {
    suite(unix().spawning()).await;
    suite(unix().spawning().via(CallPath::Tarpc, CallPath::Tarpc)).await;
}

/// Both ends on tarpc's channel, and each end on its own: the direct path speaks tarpc's
/// protocol with tarpc itself both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_unix_on_tarpc_channels_and_mixed() {
    use CallPath::{Direct, Tarpc};
    for (client, server) in [(Tarpc, Tarpc), (Direct, Tarpc), (Tarpc, Direct)] {
        suite(unix().via(client, server)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_xen_sim_mixed() {
    use CallPath::{Direct, Tarpc};
    for (client, server) in [(Direct, Tarpc), (Tarpc, Direct)] {
        suite(xen().via(client, server)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_tcp() {
    suite(tcp()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_xen_sim() {
    suite(xen()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs AF_VSOCK loopback (CID 1): run inside the VM by scripts/test-xen"]
async fn conformance_vsock() {
    suite(vsock()).await;
}

#[tokio::test]
async fn load_shedding_refuses_beyond_the_limit() {
    let f = unix();
    let state = State::default();
    let (_s, _h) = start(&f, &state, ServerConfig { max_concurrent: 2, ..ServerConfig::default() }).await;
    let c = client(&f, Codec::default());
    // Two calls in progress on the server (held there until released): the limit.
    let held: Vec<_> = [10, 11]
        .into_iter()
        .map(|tag| {
            let c = c.clone();
            tokio::spawn(async move { c.hold(ctx_for(T), tag).await })
        })
        .collect();
    state.wait_started(10, 1, "first held call").await;
    state.wait_started(11, 1, "second held call").await;
    match c.echo(ctx_for(T), vec![1]).await {
        Err(e) if dombus_rpc::is_overloaded(&e) => {}
        other => panic!("expected the call to be shed, got {other:?}"),
    }
    state.release(10);
    state.release(11);
    for (h, tag) in held.into_iter().zip([10, 11]) {
        assert_eq!(h.await.unwrap().unwrap(), tag);
    }
    assert_eq!(c.echo(ctx_for(T), vec![2]).await.unwrap(), vec![2]);
}

#[tokio::test]
async fn connecting_to_nothing_fails_with_the_connect_error() {
    let d = Scratch::new("nothing");
    let f = Fixture {
        name: "nothing",
        server_net: Net::new(),
        client_net: Net::new(),
        addr: Address::Unix(d.0.join("none.sock")),
        paths: (CallPath::Direct, CallPath::Direct),
        spawn_calls: false,
        _keep: vec![],
    };
    let c = client(&f, Codec::default());
    let t = Instant::now();
    let r = tokio::time::timeout(T, c.echo(ctx_for(Duration::from_millis(300)), vec![])).await;
    let e = r.unwrap_or_else(|_| panic!("a call with a 300 ms deadline ran for {T:?}")).unwrap_err();
    eprintln!("connecting to nothing failed after {:?}: {e}", t.elapsed());
    let RpcError::Send(inner) = &e else { panic!("expected the connect failure, got {e:?}") };
    let failed = inner.downcast_ref::<dombus_rpc::client::ConnectFailed>().unwrap_or_else(|| panic!("{e:?}"));
    assert_eq!(failed.cause.kind(), std::io::ErrorKind::NotFound, "{failed}");
}

#[tokio::test]
async fn a_reply_longer_than_the_server_sends_is_answered_with_an_error() {
    let f = unix();
    let state = State::default();
    let (_s, _h) = start(&f, &state, ServerConfig { max_reply_frame: 1024, ..ServerConfig::default() }).await;
    let c = client(&f, Codec::default());
    match c.echo(ctx_for(T), vec![7; 2048]).await {
        Err(RpcError::Server(e)) => {
            assert_eq!(e.kind, std::io::ErrorKind::InvalidData, "{e:?}");
            assert!(e.detail.contains("longer than the server sends"), "{e:?}");
        }
        other => panic!("expected the server's error, got {other:?}"),
    }
    assert_eq!(c.echo(ctx_for(T), vec![1; 100]).await.unwrap(), vec![1; 100]);
}
