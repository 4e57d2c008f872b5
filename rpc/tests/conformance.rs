//! The RPC conformance suite, run against every transport this machine has: Unix, TCP and
//! transport-xen virtual sockets (two domains over the simulated hypervisor, in-process); and
//! AF_VSOCK when `DOMBUS_TEST_VSOCK=1` (inside the VM harness, where `vsock_loopback` gives CID 1).
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dombus_rpc::{Address, ClientConfig, Codec, Net, RawClient, Server, ServerConfig, connection_lost};
use dombus_transport_xen::sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
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
    /// Sleeps `ms`, returns it (not idempotent, for the in-flight-loss test).
    async fn sleep(&self, ms: u64) -> u64;
    /// Records `id` (duplicates are counted), returns it.
    #[idempotent]
    async fn record(&self, id: u64) -> u64;
    /// Sleeps `ms`, returns it (idempotent: retried after a connection loss).
    #[idempotent]
    async fn nap(&self, ms: u64) -> u64;
}

#[derive(Clone, Default)]
struct State {
    seen: Arc<Mutex<HashSet<u64>>>,
    duplicates: Arc<AtomicU64>,
    cancelled: Arc<AtomicBool>,
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
    async fn sleep(&self, ms: u64) -> u64 {
        let mut guard = CancelGuard(self.0.cancelled.clone(), false);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        guard.1 = true;
        ms
    }
    async fn nap(&self, ms: u64) -> u64 {
        tokio::time::sleep(Duration::from_millis(ms)).await;
        ms
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
    _keep: Vec<Box<dyn std::any::Any + Send>>,
}

fn scratch(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("dombus-rpc-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn unix() -> Fixture {
    let d = scratch("unix");
    Fixture {
        name: "unix",
        server_net: Net::new(),
        client_net: Net::new(),
        addr: Address::Unix(d.join("echo.sock")),
        _keep: vec![],
    }
}

async fn tcp() -> Fixture {
    // Pick a free loopback port.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    Fixture {
        name: "tcp",
        server_net: Net::new(),
        client_net: Net::new(),
        addr: Address::Tcp { host: "127.0.0.1".into(), port },
        _keep: vec![],
    }
}

fn xen() -> Fixture {
    let d = scratch("xen");
    let sock = d.join("simxen.sock");
    let hv: SimHypervisorHandle = SimHypervisor::spawn(&sock).unwrap();
    let server =
        VsockDomain::start(SimBackend::attach(&sock, Some(DomId(1))).unwrap(), VsockConfig::default())
            .unwrap();
    let client =
        VsockDomain::start(SimBackend::attach(&sock, Some(DomId(2))).unwrap(), VsockConfig::default())
            .unwrap();
    let mut client_net = Net::new().with_xen(client);
    client_net.xen_connect_wait = Some(Duration::from_secs(10));
    Fixture {
        name: "xen",
        server_net: Net::new().with_xen(server),
        client_net,
        addr: "xen:1:5000".parse().unwrap(),
        _keep: vec![Box::new(hv)],
    }
}

fn vsock() -> Option<Fixture> {
    if std::env::var("DOMBUS_TEST_VSOCK").as_deref() != Ok("1") {
        eprintln!("AF_VSOCK: not tested here (set DOMBUS_TEST_VSOCK=1 where vsock_loopback is loaded)");
        return None;
    }
    Some(Fixture {
        name: "vsock",
        server_net: Net::new(),
        client_net: Net::new(),
        addr: Address::Vsock { cid: 1, port: 5000 },
        _keep: vec![],
    })
}

async fn start(f: &Fixture, state: &State, config: ServerConfig) -> (Server, dombus_rpc::ServeHandle) {
    let server = Server::new(f.server_net.clone(), config);
    let st = state.clone();
    let h = server.serve(&f.addr, EchoServer(st).into_service()).await.unwrap();
    (server, h)
}

fn client(f: &Fixture, codec: Codec) -> EchoClient {
    let config = ClientConfig { codec, ..ClientConfig::default() };
    EchoClient::with_config(f.client_net.clone(), f.addr.clone(), config)
}

fn ctx_for(d: Duration) -> context::Context {
    let mut c = context::current();
    c.deadline = Instant::now() + d;
    c
}

const T: Duration = Duration::from_secs(30);

async fn suite(f: Fixture) {
    let name = f.name;
    let state = State::default();
    let (server, handle) = start(&f, &state, ServerConfig::default()).await;

    for codec in [Codec::Postcard, Codec::Bincode] {
        let c = client(&f, codec);
        // Echo, small and large (1 MiB).
        assert_eq!(c.echo(ctx_for(T), b"hello".to_vec()).await.unwrap(), b"hello", "{name}/{codec}");
        let big: Vec<u8> = (0..1 << 20).map(|i| (i * 7) as u8).collect();
        assert_eq!(c.echo(ctx_for(T), big.clone()).await.unwrap(), big, "{name}/{codec}: 1 MiB");
        // Concurrent calls on one client.
        let calls = (0..200u64).map(|i| {
            let c = c.clone();
            async move { c.echo(ctx_for(T), i.to_le_bytes().to_vec()).await.unwrap() == i.to_le_bytes() }
        });
        assert!(
            futures::future::join_all(calls).await.into_iter().all(|ok| ok),
            "{name}/{codec}: concurrent"
        );
    }
    let c = client(&f, Codec::default());

    // Deadline expiry: the client gives up on time and the server abandons the call.
    let t = Instant::now();
    let r = c.sleep(ctx_for(Duration::from_millis(100)), 5_000).await;
    assert!(matches!(r, Err(RpcError::DeadlineExceeded)), "{name}: {r:?}");
    assert!(t.elapsed() < Duration::from_secs(2), "{name}: deadline took {:?}", t.elapsed());

    // Cancellation: dropping a call cancels it on the server.
    state.cancelled.store(false, Ordering::SeqCst);
    let call = c.sleep(ctx_for(T), 10_000);
    let _ = tokio::time::timeout(Duration::from_millis(100), call).await;
    let t = Instant::now();
    while !state.cancelled.load(Ordering::SeqCst) {
        assert!(t.elapsed() < Duration::from_secs(5), "{name}: the server never saw the cancellation");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The wrong service name is a clear error.
    let e = RawClient::new(f.client_net.clone(), f.addr.clone(), "storage", ClientConfig::default())
        .connect_now(T)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{name}: {e}");
    assert!(e.to_string().contains("not \"storage\""), "{name}: {e}");

    // Bad frames: an oversize length prefix and undecodable bytes each close that connection
    // only; calls on another connection go on.
    for frame in [&[0xff, 0xff, 0xff, 0xf0][..], &[0, 0, 0, 5, 0xde, 0xad, 0xbe, 0xef, 0x99][..]] {
        let mut raw = f.client_net.connect(&f.addr).await.unwrap();
        dombus_rpc::preamble::client(&mut raw, "echo", Codec::Postcard, T).await.unwrap();
        raw.write_all(frame).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(T, raw.read(&mut buf)).await.expect("bad-frame connection not closed");
        assert!(matches!(n, Ok(0) | Err(_)), "{name}: server answered garbage: {n:?}");
        assert_eq!(c.echo(ctx_for(T), b"still".to_vec()).await.unwrap(), b"still", "{name}");
    }

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

    // Reconnect: a call in flight when the server goes fails with ConnectionLost if it is not
    // idempotent; after a restart on the same address, calls work again without a new client.
    let in_flight = tokio::spawn({
        let c = c.clone();
        async move { c.sleep(ctx_for(T), 10_000).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    handle.stop().await;
    let r = tokio::time::timeout(T, in_flight).await.expect("in-flight call hung").unwrap();
    let e = r.unwrap_err();
    assert!(connection_lost(&e).is_some(), "{name}: {e:?}");
    let (_server2, handle2) = start(&f, &state, ServerConfig::default()).await;
    assert_eq!(c.echo(ctx_for(T), b"again".to_vec()).await.unwrap(), b"again", "{name}: after restart");

    // An idempotent call in flight when the server goes is sent again once it is back.
    let in_flight = tokio::spawn({
        let c = c.clone();
        async move { c.nap(ctx_for(T), 300).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    handle2.stop().await;
    let (_server3, handle3) = start(&f, &state, ServerConfig::default()).await;
    let r = tokio::time::timeout(T, in_flight).await.expect("retried call hung").unwrap();
    assert_eq!(r.unwrap(), 300, "{name}: the idempotent call was not retried");
    handle3.stop().await;
    eprintln!("{name}: conformance suite passed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_unix() {
    suite(unix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_tcp() {
    suite(tcp().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_xen_sim() {
    suite(xen()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_vsock() {
    if let Some(f) = vsock() {
        suite(f).await;
    }
}

#[tokio::test]
async fn load_shedding_refuses_beyond_the_limit() {
    let f = unix();
    let state = State::default();
    let (_s, _h) = start(&f, &state, ServerConfig { max_concurrent: 2, ..ServerConfig::default() }).await;
    let c = client(&f, Codec::default());
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.sleep(ctx_for(T), 500).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    match c.echo(ctx_for(T), vec![1]).await {
        Err(e) if dombus_rpc::is_overloaded(&e) => {}
        other => panic!("expected the call to be shed, got {other:?}"),
    }
    for s in slow {
        assert_eq!(s.await.unwrap().unwrap(), 500);
    }
    assert_eq!(c.echo(ctx_for(T), vec![2]).await.unwrap(), vec![2]);
}

#[tokio::test]
async fn connecting_to_nothing_fails_within_the_deadline() {
    let d = scratch("nothing");
    let f = Fixture {
        name: "nothing",
        server_net: Net::new(),
        client_net: Net::new(),
        addr: Address::Unix(d.join("none.sock")),
        _keep: vec![],
    };
    let c = client(&f, Codec::default());
    let t = Instant::now();
    let r = c.echo(ctx_for(Duration::from_millis(300)), vec![]).await;
    assert!(r.is_err());
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
}
