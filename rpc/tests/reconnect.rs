//! The client's reconnect and retry rules (docs/rpc.md, "Client"), and what a restarted server
//! finds at its Unix address, checked by what happened: connection attempts counted where they
//! are made (a stand-in for `xen:` sockets that refuses or hangs, or a Unix proxy in front of a
//! real server that refuses, passes or cuts connections), the calls the server ran counted on
//! the server, and the error a call ends with.
#![allow(clippy::unwrap_used, missing_docs)]

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dombus_rpc::client::ConnectFailed;
use dombus_rpc::transport::{DomainSockets, PortListener};
use dombus_rpc::{Address, ClientConfig, Net, RpcError, ServeHandle, Server, ServerConfig, connection_lost};
use dombus_transport_xen::DomId;
use dombus_transport_xen::vsock::VsockAddr;
use dombus_transport_xen::vsock::mux::VsockStream;
use tarpc::context;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

#[dombus::service]
pub trait Counter {
    /// Counts the call and returns the count (not idempotent). With `hold` set, the first
    /// call never returns: it is in flight until its connection goes.
    async fn bump(&self) -> u64;
    /// The same, idempotent.
    #[idempotent]
    async fn touch(&self) -> u64;
}

#[derive(Clone, Default)]
struct Runs {
    bump: Arc<AtomicU64>,
    touch: Arc<AtomicU64>,
    hold: bool,
}

impl Runs {
    async fn run(&self, count: &AtomicU64) -> u64 {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        if self.hold && n == 1 {
            std::future::pending::<()>().await;
        }
        n
    }
}

impl Counter for Runs {
    async fn bump(&self) -> u64 {
        self.run(&self.bump).await
    }
    async fn touch(&self) -> u64 {
        self.run(&self.touch).await
    }
}

/// `xen:` sockets that connect nowhere: every `connect` is counted with its time, then refused
/// (`ConnectionRefused`, what a domain with nothing listening answers) or never answered.
#[derive(Clone, Default)]
struct Nowhere {
    attempts: Arc<Mutex<Vec<Instant>>>,
    hang: bool,
}

type ConnectFuture<'a> = Pin<Box<dyn Future<Output = io::Result<VsockStream>> + Send + 'a>>;

impl DomainSockets for Nowhere {
    fn connect(&self, addr: VsockAddr, _wait: Option<Duration>) -> ConnectFuture<'_> {
        self.attempts.lock().unwrap().push(Instant::now());
        let hang = self.hang;
        Box::pin(async move {
            if hang {
                std::future::pending::<()>().await;
            }
            Err(io::Error::new(io::ErrorKind::ConnectionRefused, format!("nothing listens on {addr}")))
        })
    }
    fn listen(&self, _port: u32) -> io::Result<Box<dyn PortListener>> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    fn domid(&self) -> DomId {
        DomId(2)
    }
    fn resolve(&self, name: &str) -> io::Result<DomId> {
        Err(io::Error::new(io::ErrorKind::NotFound, format!("no domain is named {name:?}")))
    }
    fn links(&self) -> Vec<(DomId, usize)> {
        Vec::new()
    }
}

impl Nowhere {
    fn net(&self) -> Net {
        Net::new().with_xen(self.clone())
    }
    fn attempts(&self) -> Vec<Instant> {
        self.attempts.lock().unwrap().clone()
    }
}

fn nowhere_addr() -> Address {
    "xen:9:5000".parse().unwrap()
}

/// A directory of this test's own, removed when the test ends.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for Scratch {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

fn scratch(tag: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("dombus-reconnect-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

/// A Unix proxy in front of a server: counts the connections it accepts, closes the first
/// `refuse` of them at once (the client's preamble fails: the call never left), passes the
/// others through, and cuts every open one on demand.
struct Front {
    addr: Address,
    accepted: Arc<AtomicU32>,
    refuse: Arc<AtomicU32>,
    open: Arc<Mutex<Vec<JoinHandle<()>>>>,
    _accept: JoinHandle<()>,
    _server: Option<(Server, ServeHandle)>,
}

impl Front {
    async fn start(dir: &std::path::Path, upstream: PathBuf, refuse: u32) -> Front {
        let path = dir.join("front.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let accepted = Arc::new(AtomicU32::new(0));
        let refuse = Arc::new(AtomicU32::new(refuse));
        let open = Arc::new(Mutex::new(Vec::new()));
        let (a, r, o) = (accepted.clone(), refuse.clone(), open.clone());
        let accept = tokio::spawn(async move {
            loop {
                let (mut client, _) = listener.accept().await.unwrap();
                a.fetch_add(1, Ordering::SeqCst);
                if r.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                o.lock().unwrap().push(tokio::spawn(async move {
                    let mut server = UnixStream::connect(&upstream).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                }));
            }
        });
        Front { addr: Address::Unix(path), accepted, refuse, open, _accept: accept, _server: None }
    }

    fn accepted(&self) -> u32 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes every connection open through the proxy, both ways, and returns once they are.
    async fn cut(&self) {
        let open: Vec<_> = std::mem::take(&mut *self.open.lock().unwrap());
        for task in open {
            task.abort();
            assert!(task.await.unwrap_err().is_cancelled(), "a proxied connection ended on its own");
        }
    }
}

/// A server of `Counter` on a Unix socket in `dir`, behind a [`Front`].
async fn served(dir: &std::path::Path, runs: &Runs, refuse: u32) -> Front {
    let upstream = dir.join("server.sock");
    let server = Server::new(Net::new(), ServerConfig::default());
    let handle = server.serve(&Address::Unix(upstream.clone()), runs.clone().into_service()).await.unwrap();
    Front { _server: Some((server, handle)), ..Front::start(dir, upstream, refuse).await }
}

fn ctx_for(d: Duration) -> context::Context {
    let mut c = context::current();
    c.deadline = Instant::now() + d;
    c
}

/// The connect failure inside a call's error, if that is what ended it.
fn connect_failure(e: &RpcError) -> Option<&ConnectFailed> {
    match e {
        RpcError::Send(inner) => inner.downcast_ref::<ConnectFailed>(),
        _ => None,
    }
}

/// Waits (a liveness limit, not a verdict) until `count` reaches `n`.
async fn until(count: &AtomicU64, n: u64) {
    let t = Instant::now();
    while count.load(Ordering::SeqCst) < n {
        assert!(t.elapsed() < Duration::from_secs(30), "the server never saw call {n}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const LONG: Duration = Duration::from_secs(60);

/// Default client: 10 ms backoff doubling each attempt, at most 5 retries; a call to an address
/// where nothing listens (even a non-idempotent one: it never left) is tried 6 times, then
/// fails with the connect error, long before its deadline.
#[tokio::test]
async fn a_call_to_nothing_backs_off_exponentially_then_fails_with_the_connect_error() {
    let config = ClientConfig::default();
    assert_eq!(
        (config.backoff, config.max_backoff, config.retries),
        (Duration::from_millis(10), Duration::from_secs(1), 5),
        "docs/rpc.md quotes these defaults"
    );
    let nowhere = Nowhere::default();
    let c = CounterClient::with_config(nowhere.net(), nowhere_addr(), config);
    let e = c.bump(ctx_for(LONG)).await.unwrap_err();
    let failed = connect_failure(&e).unwrap_or_else(|| panic!("not a connect failure: {e:?}"));
    assert_eq!(failed.cause.kind(), io::ErrorKind::ConnectionRefused, "{failed}");
    let attempts = nowhere.attempts();
    assert_eq!(attempts.len(), 6, "1 attempt + 5 retries");
    for (i, pair) in attempts.windows(2).enumerate() {
        let (gap, wait) = (pair[1] - pair[0], Duration::from_millis(10 << i));
        assert!(
            gap >= wait,
            "attempt {} came {gap:?} after the previous one, before its backoff {wait:?}",
            i + 2
        );
    }
}

/// The backoff doubles only up to `max_backoff`. With 5 ms doubling to at most 10 ms, 12
/// retries fit a 10 s deadline (about 115 ms of waiting); uncapped they would need 20 s, and
/// the client gives up on a retry whose wait would end past the deadline, so it would make
/// only 11 attempts. (10 s is a liveness limit for the 13 attempts, far above what they need.)
#[tokio::test]
async fn the_backoff_stops_doubling_at_max_backoff() {
    let config = ClientConfig {
        backoff: Duration::from_millis(5),
        max_backoff: Duration::from_millis(10),
        retries: 12,
        ..ClientConfig::default()
    };
    let nowhere = Nowhere::default();
    let c = CounterClient::with_config(nowhere.net(), nowhere_addr(), config);
    let e = c.touch(ctx_for(Duration::from_secs(10))).await.unwrap_err();
    assert!(connect_failure(&e).is_some(), "{e:?}");
    let attempts = nowhere.attempts();
    assert_eq!(attempts.len(), 13, "1 attempt + 12 retries, each wait capped at 10 ms");
    for (i, pair) in attempts.windows(2).enumerate() {
        let wait = Duration::from_millis(5 << i).min(Duration::from_millis(10));
        assert!(pair[1] - pair[0] >= wait, "retry {} before its backoff {wait:?}", i + 1);
    }
}

/// Retrying stays within the call's deadline: no retry is made whose backoff would end past
/// it. With 100 ms doubling and a 250 ms deadline that allows at most 2 attempts (the third
/// would start at 300 ms); the call then fails with the connect error.
#[tokio::test]
async fn no_retry_waits_past_the_deadline() {
    let config = ClientConfig { backoff: Duration::from_millis(100), ..ClientConfig::default() };
    let nowhere = Nowhere::default();
    let c = CounterClient::with_config(nowhere.net(), nowhere_addr(), config);
    let e = c.touch(ctx_for(Duration::from_millis(250))).await.unwrap_err();
    assert!(connect_failure(&e).is_some(), "{e:?}");
    let n = nowhere.attempts().len();
    assert!(
        (1..=2).contains(&n),
        "{n} attempts: a third starts at 300 ms at the earliest, past the deadline"
    );
}

/// A connect that never completes ends at the call's deadline with `DeadlineExceeded`, after
/// one attempt: callers never hang on a connect. (The outer 10 s is a liveness limit.)
#[tokio::test]
async fn a_connect_that_hangs_fails_at_the_deadline() {
    let nowhere = Nowhere { hang: true, ..Nowhere::default() };
    let c = CounterClient::with_config(nowhere.net(), nowhere_addr(), ClientConfig::default());
    let ctx = ctx_for(Duration::from_millis(200));
    let deadline = ctx.deadline;
    let r = tokio::time::timeout(Duration::from_secs(10), c.touch(ctx))
        .await
        .expect("the call hung past its deadline");
    assert!(matches!(r, Err(RpcError::DeadlineExceeded)), "{r:?}");
    assert!(Instant::now() >= deadline, "gave up before the deadline");
    assert_eq!(nowhere.attempts().len(), 1);
}

/// A call that never left (its connections were closed before the preamble was answered) is
/// sent again even though it is not idempotent, and runs once.
#[tokio::test]
async fn a_call_that_never_left_is_retried_even_if_not_idempotent() {
    let dir = scratch("never-left");
    let runs = Runs::default();
    let front = served(&dir, &runs, 3).await;
    let c = CounterClient::with_config(Net::new(), front.addr.clone(), ClientConfig::default());
    assert_eq!(front.accepted(), 0, "the client connects on first use, not before");
    assert_eq!(c.bump(ctx_for(LONG)).await.unwrap(), 1);
    assert_eq!(front.accepted(), 4, "3 refused connections, then the one that carried the call");
    assert_eq!(front.refuse.load(Ordering::SeqCst), 0);
    assert_eq!(runs.bump.load(Ordering::SeqCst), 1, "the server ran the call once");
}

/// A non-idempotent call in flight when its connection goes is not sent again (although a new
/// connection would have carried it): it fails with `ConnectionLost` and ran once. The next
/// call reconnects.
#[tokio::test]
async fn a_non_idempotent_call_whose_connection_went_is_not_sent_again() {
    let dir = scratch("not-again");
    let runs = Runs { hold: true, ..Runs::default() };
    let front = served(&dir, &runs, 0).await;
    let c = CounterClient::with_config(Net::new(), front.addr.clone(), ClientConfig::default());
    let call = tokio::spawn({
        let c = c.clone();
        async move { c.bump(ctx_for(LONG)).await }
    });
    until(&runs.bump, 1).await;
    front.cut().await;
    let e = call.await.unwrap().unwrap_err();
    assert!(connection_lost(&e).is_some(), "{e:?}");
    assert_eq!(runs.bump.load(Ordering::SeqCst), 1, "the server ran the call once");
    assert_eq!(front.accepted(), 1, "no new connection for it");
    assert_eq!(c.bump(ctx_for(LONG)).await.unwrap(), 2, "the next call reconnects");
    assert_eq!(front.accepted(), 2);
}

/// An idempotent call in flight when its connection goes is sent again on a new connection.
#[tokio::test]
async fn an_idempotent_call_whose_connection_went_is_sent_again() {
    let dir = scratch("again");
    let runs = Runs { hold: true, ..Runs::default() };
    let front = served(&dir, &runs, 0).await;
    let c = CounterClient::with_config(Net::new(), front.addr.clone(), ClientConfig::default());
    let call = tokio::spawn({
        let c = c.clone();
        async move { c.touch(ctx_for(LONG)).await }
    });
    until(&runs.touch, 1).await;
    front.cut().await;
    assert_eq!(call.await.unwrap().unwrap(), 2, "answered by its second run");
    assert_eq!(runs.touch.load(Ordering::SeqCst), 2);
    assert_eq!(front.accepted(), 2, "sent again on a new connection");
}

/// A connection that went while idle is noticed only by the next call, which cannot tell that
/// from a loss in flight: a non-idempotent call gets `ConnectionLost` although it never
/// reached the server (the conservative answer); the call after it reconnects.
#[tokio::test]
async fn a_connection_lost_while_idle_fails_the_next_non_idempotent_call() {
    let dir = scratch("idle");
    let runs = Runs::default();
    let front = served(&dir, &runs, 0).await;
    let c = CounterClient::with_config(Net::new(), front.addr.clone(), ClientConfig::default());
    assert_eq!(c.touch(ctx_for(LONG)).await.unwrap(), 1);
    front.cut().await;
    let e = c.bump(ctx_for(LONG)).await.unwrap_err();
    assert!(connection_lost(&e).is_some(), "{e:?}");
    assert_eq!(runs.bump.load(Ordering::SeqCst), 0, "it never reached the server");
    assert_eq!(c.bump(ctx_for(LONG)).await.unwrap(), 1, "the next call reconnects");
    assert_eq!(front.accepted(), 2);
}

/// A server that died without removing its Unix socket file leaves it behind: a server started
/// again on that address replaces the stale file (nobody accepts on it), and clients reach the
/// new one. A file someone still accepts on is not taken over; a server that stops removes its
/// file.
#[tokio::test]
async fn a_restarted_server_replaces_its_stale_socket_file() {
    let dir = scratch("stale");
    let path = dir.join("echo.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap()); // leaves the file, as a crash does
    assert!(path.exists());
    let addr = Address::Unix(path.clone());
    let runs = Runs::default();
    let server = Server::new(Net::new(), ServerConfig::default());
    let handle = server.serve(&addr, runs.clone().into_service()).await.unwrap();
    let c = CounterClient::with_config(Net::new(), addr.clone(), ClientConfig::default());
    assert_eq!(c.touch(ctx_for(LONG)).await.unwrap(), 1);
    let e = server.serve(&addr, runs.clone().into_service()).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    let fresh = CounterClient::with_config(Net::new(), addr.clone(), ClientConfig::default());
    assert_eq!(fresh.touch(ctx_for(LONG)).await.unwrap(), 2, "the live server kept its socket");
    handle.stop().await;
    assert!(!path.exists(), "the stopped server left its socket file");
}
