//! Subscriptions under load and failure, each scenario run over Unix sockets, TCP and
//! transport-xen virtual sockets between two domains of the simulated hypervisor: a slow
//! subscriber of 100,000 events, connections cut mid-stream, a server restart, 100 subscribers
//! at once, subscribers that never read, a refused stream, a poll's deadline, and a hostile
//! server whose answers break the protocol.
#![allow(clippy::unwrap_used, missing_docs)]

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dombus::rpc::codec::Codec;
use dombus::rpc::events::{Batch, PollArgs, StreamCall, is_final};
use dombus::rpc::wire::Call;
use dombus::rpc::{ClientConfig, RawClient, ServeHandle, error_text, preamble};
use dombus::sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus::transport::types::DomId;
use dombus::transport::vsock::domain::{VsockConfig, VsockDomain};
use dombus::{
    Address, Cursor, Events, Net, ResyncReason, Server, ServerConfig, Subscription, Topic, TopicLimits,
    Update,
};
use futures::StreamExt;
use tokio::io::AsyncWriteExt;

/// A feed of numbers.
#[dombus::service(name = "feed")]
pub trait Feed {
    /// Every number published, in order; resyncs carry the last one published (when the feed
    /// has a snapshot).
    async fn events(&self) -> Events<u64, u64>;
    /// Refused to every caller but dom0.
    async fn guarded(&self) -> Events<u64, u64>;
}

/// The service: a topic, and the last number published (its state).
#[derive(Clone)]
struct Source {
    topic: Topic<u64, u64>,
    last: Arc<AtomicU64>,
}

impl Source {
    fn new(limits: TopicLimits, snapshot: bool) -> Source {
        let last = Arc::new(AtomicU64::new(0));
        let state = last.clone();
        let topic = if snapshot {
            Topic::with_snapshot(limits, move || state.load(Ordering::SeqCst))
        } else {
            Topic::new(limits)
        };
        Source { topic, last }
    }

    fn publish(&self, n: u64) -> Cursor {
        self.last.store(n, Ordering::SeqCst);
        self.topic.publish(n)
    }

    fn epoch(&self) -> u64 {
        self.topic.cursor().epoch
    }
}

impl Feed for Source {
    async fn events(&self) -> Events<u64, u64> {
        self.topic.events()
    }

    async fn guarded(&self) -> Events<u64, u64> {
        match dombus::rpc::current_caller().and_then(|c| c.domain) {
            Some(0) => self.topic.events(),
            _ => Events::refused(std::io::ErrorKind::PermissionDenied, "only dom0 may watch this"),
        }
    }
}

/// Liveness limit: only a hung subscription or server reaches it.
const T: Duration = Duration::from_secs(60);

/// Where a scenario runs: the server's and the client's transports, and the service's address.
struct Place {
    name: &'static str,
    server: Net,
    client: Net,
    addr: Address,
    dir: PathBuf,
    _hypervisor: Option<SimHypervisorHandle>,
}

impl Drop for Place {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn scratch(transport: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dombus-subs-{transport}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn unix(tag: &str) -> Place {
    let dir = scratch("unix", tag);
    Place {
        name: "unix",
        server: Net::new(),
        client: Net::new(),
        addr: Address::Unix(dir.join("feed.sock")),
        dir,
        _hypervisor: None,
    }
}

fn tcp(tag: &str) -> Place {
    // A port free now, so that a restarted server listens where the first did.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    Place {
        name: "tcp",
        server: Net::new(),
        client: Net::new(),
        addr: format!("tcp:127.0.0.1:{port}").parse().unwrap(),
        dir: scratch("tcp", tag),
        _hypervisor: None,
    }
}

fn xen(tag: &str) -> Place {
    let dir = scratch("xen", tag);
    let sock = dir.join("simxen.sock");
    let hv = SimHypervisor::spawn(&sock).unwrap();
    let domain = |id| {
        VsockDomain::start(SimBackend::boot(&sock, Some(DomId(id))).unwrap(), VsockConfig::default()).unwrap()
    };
    let mut client = Net::new().with_xen(domain(2));
    client.xen_connect_wait = Some(Duration::from_secs(10));
    Place {
        name: "xen",
        server: Net::new().with_xen(domain(1)),
        client,
        addr: "xen:1:6000".parse().unwrap(),
        dir,
        _hypervisor: Some(hv),
    }
}

impl Place {
    /// Serves `source` at the place's address (again, after a stop).
    async fn serve(&self, source: &Source) -> (Server, ServeHandle) {
        self.serve_service(source.clone().into_service()).await
    }

    async fn serve_service(&self, service: dombus::rpc::Service) -> (Server, ServeHandle) {
        if let Address::Unix(path) = &self.addr {
            let _ = std::fs::remove_file(path);
        }
        let server = Server::new(self.server.clone(), ServerConfig::default());
        let handle = server.serve(&self.addr, service).await.unwrap();
        (server, handle)
    }

    fn client(&self) -> FeedClient {
        FeedClient::new(self.client.clone(), self.addr.clone())
    }
}

/// Runs `scenario` on the transport `place` makes, named `tag`.
async fn run<F: Future<Output = ()>>(place: fn(&str) -> Place, tag: &str, scenario: fn(Place) -> F) {
    scenario(place(tag)).await;
}

/// The subscription's next update, counting the failed polls before it in `errors` (none may be
/// final).
async fn next_update(sub: &mut Subscription<u64, u64>, errors: &mut u32, name: &str) -> Update<u64, u64> {
    loop {
        match tokio::time::timeout(T, sub.next()).await {
            Err(_) => panic!("{name}: no update within {T:?}"),
            Ok(None) => panic!("{name}: the subscription ended"),
            Ok(Some(Ok(update))) => return update,
            Ok(Some(Err(e))) => {
                assert!(!is_final(&e), "{name}: a final error: {}", error_text(&e));
                *errors += 1;
            }
        }
    }
}

/// Waits until `cond` holds (a liveness limit of [`T`]).
async fn wait_until(cond: impl Fn() -> bool, what: &str) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < T, "{what}: not within {T:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Expects the start of a subscription: a resync at `seq`.
async fn started(sub: &mut Subscription<u64, u64>, seq: u64, name: &str) -> Cursor {
    let mut errors = 0;
    match next_update(sub, &mut errors, name).await {
        Update::Resync { reason: ResyncReason::Start, cursor, .. } if cursor.seq == seq => cursor,
        other => panic!("{name}: expected the start at {seq}: {other:?}"),
    }
}

/// Events published by the slow-subscriber scenario.
const MANY: u64 = 100_000;

/// 100,000 events published fast, a subscriber that sleeps between batches: the topic stays
/// within its limits, and the subscriber gets every event or an explicit count of those it
/// missed, in order, none twice.
async fn slow_subscriber(p: Place) {
    let name = p.name;
    let limits = TopicLimits { max_events: 2048, max_bytes: 8 << 10 };
    let source = Source::new(limits, false);
    let (_server, _serving) = p.serve(&source).await;
    let client = p.client();
    let mut sub = client.events().max_events(256).wait(Duration::from_secs(2));
    let epoch = started(&mut sub, 0, name).await.epoch;

    let publisher = tokio::spawn({
        let source = source.clone();
        async move {
            let mut most = (0, 0);
            for n in 1..=MANY {
                source.publish(n);
                if n % 64 == 0 {
                    let s = source.topic.stats();
                    assert!(
                        s.retained <= limits.max_events && s.retained_bytes <= limits.max_bytes,
                        "the topic holds more than its limits: {s:?}"
                    );
                    most = (most.0.max(s.retained), most.1.max(s.retained_bytes));
                }
                if n % 2000 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            most
        }
    });

    let (mut last, mut delivered, mut missed, mut resyncs, mut errors) = (0, 0, 0, 0, 0);
    let t = Instant::now();
    while last < MANY {
        match next_update(&mut sub, &mut errors, name).await {
            Update::Event { cursor, event } => {
                assert_eq!(cursor.epoch, epoch, "{name}");
                assert_eq!(
                    cursor.seq,
                    last + 1,
                    "{name}: after {last}, event {} without a resync",
                    cursor.seq
                );
                assert_eq!(event, cursor.seq, "{name}");
                last = cursor.seq;
                delivered += 1;
                if delivered % 256 == 0 {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Update::Resync { reason: ResyncReason::Missed { count }, cursor, snapshot: None } => {
                assert_eq!(cursor.epoch, epoch, "{name}");
                assert!(count > 0, "{name}: a resync that missed nothing");
                assert_eq!(cursor.seq, last + count, "{name}: after {last}, {count} missed, at {cursor:?}");
                last = cursor.seq;
                missed += count;
                resyncs += 1;
            }
            other => panic!("{name}: after {last}: {other:?}"),
        }
    }
    let (most_events, most_bytes) = publisher.await.unwrap();
    eprintln!(
        "{name}: {delivered} events delivered, {missed} missed in {resyncs} resyncs, {errors} failed polls, \
         {:?}; the ring held at most {most_events} events, {most_bytes} bytes",
        t.elapsed()
    );
    assert_eq!(delivered + missed, MANY, "{name}");
    assert!(delivered > 0 && missed > 0, "{name}: {delivered} delivered, {missed} missed");
    assert!(most_events > 0 && most_bytes <= limits.max_bytes, "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_of_100000_events_over_unix() {
    run(unix, "slow", slow_subscriber).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_of_100000_events_over_tcp() {
    run(tcp, "slow", slow_subscriber).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_of_100000_events_over_xen() {
    run(xen, "slow", slow_subscriber).await;
}

/// Reads a subscription of `n` events started at 0 to the end, each exactly once and in order
/// (no resync); publishes in `seen` how far it is; answers its failed polls.
fn read_all(
    mut sub: Subscription<u64, u64>,
    n: u64,
    seen: Arc<AtomicU64>,
    name: &'static str,
) -> tokio::task::JoinHandle<u32> {
    tokio::spawn(async move {
        let (mut last, mut errors) = (0, 0);
        while last < n {
            match next_update(&mut sub, &mut errors, name).await {
                Update::Event { cursor, event } => {
                    assert_eq!(cursor.seq, last + 1, "{name}: after {last}: event {}", cursor.seq);
                    assert_eq!(event, cursor.seq, "{name}");
                    last = cursor.seq;
                    seen.store(last, Ordering::SeqCst);
                    if last % 64 == 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                }
                other => panic!("{name}: after {last}: {other:?}"),
            }
        }
        errors
    })
}

/// Subscriptions whose connections are cut three times while events are published (the server
/// stops, dropping its connections, and serves the same topic again a moment later) resume from
/// their cursors each time: every event once, in order, no resync. One subscription's client
/// sends a poll cut in flight again itself (an idempotent call); the other's client makes no
/// second attempt, so the poll fails and the subscription polls again from its cursor.
async fn reconnect_mid_stream(p: Place) {
    const N: u64 = 20_000;
    let name = p.name;
    let source = Source::new(TopicLimits { max_events: N as usize, max_bytes: 1 << 20 }, false);
    let (server, serving) = p.serve(&source).await;
    let retrying = p.client();
    let once = FeedClient::with_config(
        p.client.clone(),
        p.addr.clone(),
        ClientConfig { retries: 0, ..ClientConfig::default() },
    );
    let mut subs = [retrying.events(), once.events()].map(|s| s.max_events(64).wait(Duration::from_secs(2)));
    for sub in &mut subs {
        started(sub, 0, name).await;
    }
    let seen: [Arc<AtomicU64>; 2] = Default::default();
    let [retried, resumed] = subs;
    let readers = [read_all(retried, N, seen[0].clone(), name), read_all(resumed, N, seen[1].clone(), name)];
    let least = || seen.iter().map(|s| s.load(Ordering::SeqCst)).min().unwrap_or(0);

    let (mut published, mut mid_stream) = (0, 0);
    let mut servers = vec![(server, serving)];
    for _ in 0..3 {
        for _ in 0..5 {
            for _ in 0..1000 {
                published += 1;
                source.publish(published);
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        // Mid-stream: the subscribers have read some of these and not all.
        wait_until(|| least() >= published - 2500, "the subscribers reading").await;
        let (_, serving) = servers.pop().unwrap();
        serving.stop().await;
        if least() < published {
            mid_stream += 1;
        }
        for _ in 0..1000 {
            published += 1;
            source.publish(published);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        servers.push(p.serve(&source).await);
    }
    while published < N {
        published += 1;
        source.publish(published);
    }
    let [retried, resumed] = readers;
    let retried = tokio::time::timeout(T, retried).await.unwrap().unwrap();
    let resumed = tokio::time::timeout(T, resumed).await.unwrap().unwrap();
    let (last_server, _) = servers.last().unwrap();
    let connections = last_server.metrics().connections();
    eprintln!(
        "{name}: {N} events through 3 cuts ({mid_stream} before a subscriber had read everything \
         published); failed polls: {retried} with retries, {resumed} without; the last server: \
         {connections:?}"
    );
    assert!(mid_stream > 0, "{name}: every cut came after the subscribers had read everything");
    assert!(resumed > 0, "{name}: no poll failed without retries: the connection was not cut");
    // Both connected to the last server anew.
    assert_eq!(connections.open, 2, "{name}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_resumes_after_its_connection_is_cut_over_unix() {
    run(unix, "cut", reconnect_mid_stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_resumes_after_its_connection_is_cut_over_tcp() {
    run(tcp, "cut", reconnect_mid_stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_resumes_after_its_connection_is_cut_over_xen() {
    run(xen, "cut", reconnect_mid_stream).await;
}

/// A new server instance (a new topic): one resync with the new epoch and the new state, then
/// the new server's events.
async fn restart(p: Place) {
    let name = p.name;
    let old = Source::new(TopicLimits::default(), true);
    let (_server, serving) = p.serve(&old).await;
    let client = p.client();
    let mut sub = client.events().wait(Duration::from_millis(500));
    let before = started(&mut sub, 0, name).await;
    let mut errors = 0;
    for n in 1..=2 {
        old.publish(n);
        let u = next_update(&mut sub, &mut errors, name).await;
        assert!(matches!(u, Update::Event { event, .. } if event == n), "{name}: {u:?}");
    }
    serving.stop().await;

    let new = Source::new(TopicLimits::default(), true);
    for n in [10, 11, 12] {
        new.publish(n);
    }
    let (_server, _serving) = p.serve(&new).await;
    match next_update(&mut sub, &mut errors, name).await {
        Update::Resync { reason: ResyncReason::NewEpoch { previous }, cursor, snapshot } => {
            assert_eq!(previous, before.epoch, "{name}");
            assert_eq!(cursor, Cursor { epoch: new.epoch(), seq: 3 }, "{name}");
            assert_eq!(snapshot, Some(12), "{name}: the new server's state");
        }
        other => panic!("{name}: expected a new-epoch resync: {other:?}"),
    }
    new.publish(13);
    match next_update(&mut sub, &mut errors, name).await {
        Update::Event { cursor, event: 13 } => assert_eq!(cursor, Cursor { epoch: new.epoch(), seq: 4 }),
        other => panic!("{name}: expected the new server's event: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_is_one_new_epoch_resync_over_unix() {
    run(unix, "restart", restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_is_one_new_epoch_resync_over_tcp() {
    run(tcp, "restart", restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_restart_is_one_new_epoch_resync_over_xen() {
    run(xen, "restart", restart).await;
}

/// 100 subscriptions at once, 25 on each of 4 clients: each gets every event, in order.
async fn hundred_subscribers(p: Place) {
    const EVENTS: u64 = 300;
    let name = p.name;
    let source = Source::new(TopicLimits::default(), false);
    let (_server, _serving) = p.serve(&source).await;
    let clients: Vec<_> = (0..4).map(|_| p.client()).collect();
    let mut subs: Vec<_> =
        (0..100).map(|i| clients[i % clients.len()].events().wait(Duration::from_secs(5))).collect();
    futures::future::join_all(subs.iter_mut().map(|s| started(s, 0, name))).await;
    let readers = subs.into_iter().enumerate().map(|(i, mut sub)| async move {
        let mut errors = 0;
        for n in 1..=EVENTS {
            match next_update(&mut sub, &mut errors, name).await {
                Update::Event { cursor, event } if cursor.seq == n && event == n => {}
                other => panic!("{name}: subscriber {i}, event {n}: {other:?}"),
            }
        }
    });
    let all = tokio::spawn(futures::future::join_all(readers));
    for n in 1..=EVENTS {
        source.publish(n);
        if n % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    tokio::time::timeout(T, all).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_subscribers_each_get_every_event_over_unix() {
    run(unix, "hundred", hundred_subscribers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_subscribers_each_get_every_event_over_tcp() {
    run(tcp, "hundred", hundred_subscribers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_subscribers_each_get_every_event_over_xen() {
    run(xen, "hundred", hundred_subscribers).await;
}

/// Polls sent on the raw connection that never reads its replies.
const STALLED_POLLS: u64 = 1000;

/// Subscribers that never read: a raw connection that sends polls and never reads a reply
/// (stalled: the server stops reading it), a subscription never polled and one polled once.
/// 100,000 publishes complete while they are stalled, and another subscriber gets every event.
async fn never_read(p: Place) {
    let name = p.name;
    let source = Source::new(TopicLimits { max_events: MANY as usize, max_bytes: 1 << 20 }, false);
    for n in 1..=2048 {
        source.publish(n);
    }
    let (server, _serving) = p.serve(&source).await;

    // Polls for full batches (1,024 events, 16 KiB each), never read.
    let mut raw = p.client.connect(&p.addr).await.unwrap();
    preamble::client(&mut raw, "feed", Codec::Bincode, T).await.unwrap();
    let (_unread, mut writer) = tokio::io::split(raw);
    let from = Cursor { epoch: source.epoch(), seq: 0 };
    let poll =
        StreamCall { poll: PollArgs { from: Some(from), max_events: 1024, wait_ms: 0 }, args: Vec::new() };
    let mut frames = Vec::new();
    for id in 0..STALLED_POLLS {
        let mut ctx = tarpc::context::current();
        ctx.deadline = Instant::now() + Duration::from_secs(3600);
        let msg = tarpc::ClientMessage::Request(tarpc::Request {
            context: ctx,
            id,
            message: Call { method: "events".into(), args: Codec::Bincode.encode(&poll).unwrap() },
        });
        let bytes = Codec::Bincode.encode(&msg).unwrap();
        frames.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
        frames.extend_from_slice(&bytes);
    }
    // Written from a task: the writes block once the server stops reading and the socket is full.
    let stalled_writer = tokio::spawn(async move {
        let _ = writer.write_all(&frames).await;
        std::future::pending::<()>().await;
    });
    wait_until(
        || server.metrics().connections().paused > 0,
        "the server pausing the connection that never reads",
    )
    .await;

    let never_polled = p.client().events();
    let polled_once_client = p.client();
    let mut polled_once = polled_once_client.events();
    started(&mut polled_once, 2048, name).await;

    let reader = tokio::spawn({
        let client = p.client();
        async move {
            let mut sub = client.events().from(from).max_events(1024).wait(Duration::from_secs(2));
            let (mut last, mut errors) = (0, 0);
            while last < MANY {
                match next_update(&mut sub, &mut errors, name).await {
                    Update::Event { cursor, event } if cursor.seq == last + 1 && event == cursor.seq => {
                        last = cursor.seq;
                    }
                    other => panic!("{name}: the reading subscriber after {last}: {other:?}"),
                }
            }
        }
    });

    let t = Instant::now();
    for n in 2049..=MANY {
        source.publish(n);
    }
    let publishing = t.elapsed();
    let stats = server.metrics().connections();
    assert!(stats.paused > 0, "{name}: the stalled connection was read again: {stats:?}");
    tokio::time::timeout(T, reader).await.unwrap().unwrap();
    eprintln!("{name}: {} publishes in {publishing:?} with a stalled connection ({stats:?})", MANY - 2048);
    drop((never_polled, polled_once));
    stalled_writer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_never_read_do_not_slow_publishing_over_unix() {
    run(unix, "unread", never_read).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_never_read_do_not_slow_publishing_over_tcp() {
    run(tcp, "unread", never_read).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_that_never_read_do_not_slow_publishing_over_xen() {
    run(xen, "unread", never_read).await;
}

/// A stream the service refuses to this caller: one final error, then the subscription ends;
/// the connection goes on serving.
async fn refused(p: Place) {
    let name = p.name;
    let source = Source::new(TopicLimits::default(), false);
    let (_server, _serving) = p.serve(&source).await;
    let client = p.client();
    let mut guarded = client.guarded();
    match tokio::time::timeout(T, guarded.next()).await.unwrap() {
        Some(Err(e)) => {
            assert!(is_final(&e), "{name}: not final: {}", error_text(&e));
            assert!(error_text(&e).contains("only dom0 may watch this"), "{name}: {}", error_text(&e));
        }
        other => panic!("{name}: expected a refusal: {other:?}"),
    }
    assert!(tokio::time::timeout(T, guarded.next()).await.unwrap().is_none(), "{name}: polled again");
    let mut sub = client.events();
    started(&mut sub, 0, name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_ends_with_a_final_error_over_unix() {
    run(unix, "refused", refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_ends_with_a_final_error_over_tcp() {
    run(tcp, "refused", refused).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_stream_ends_with_a_final_error_over_xen() {
    run(xen, "refused", refused).await;
}

/// A poll that may wait 30 s, in a call whose deadline is 2 s away: answered (with no events)
/// before the deadline.
async fn deadline(p: Place) {
    let name = p.name;
    let source = Source::new(TopicLimits::default(), false);
    let (_server, _serving) = p.serve(&source).await;
    let raw = RawClient::new(p.client.clone(), p.addr.clone(), "feed", ClientConfig::default());
    raw.connect_now(T).await.unwrap();
    let from = Cursor { epoch: source.epoch(), seq: 0 };
    let poll =
        StreamCall { poll: PollArgs { from: Some(from), max_events: 16, wait_ms: 30_000 }, args: Vec::new() };
    let mut ctx = tarpc::context::current();
    let t = Instant::now();
    ctx.deadline = t + Duration::from_secs(2);
    let reply = raw.call(ctx, "events".into(), raw.codec().encode(&poll).unwrap(), true).await;
    let waited = t.elapsed();
    let reply = reply.unwrap_or_else(|e| panic!("{name}: after {waited:?}: {}", error_text(&e)));
    let batch: Batch<u64, u64> = raw.codec().decode(&reply).unwrap();
    assert_eq!((batch.resync, batch.events, batch.next), (None, Vec::new(), 0), "{name}");
    assert!(waited >= Duration::from_secs(1), "{name}: answered after {waited:?}, without waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_answers_within_its_deadline_over_unix() {
    run(unix, "deadline", deadline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_answers_within_its_deadline_over_tcp() {
    run(tcp, "deadline", deadline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_answers_within_its_deadline_over_xen() {
    run(xen, "deadline", deadline).await;
}

/// A server of "feed" that answers polls as it likes: a unary method under the stream method's
/// name, so that the reply is whatever [`Answer`] it makes.
mod hostile {
    use dombus::rpc::events::{Batch, StreamCall};
    use serde::{Deserialize, Serialize};

    /// What the hostile server answers: a batch, or bytes that are no batch.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    #[serde(untagged)]
    pub enum Answer {
        Batch(Batch<u64, u64>),
        Garbage(String),
    }

    #[dombus::service(name = "feed")]
    pub trait HostileFeed {
        /// Answers a poll (its call decodes as the poll the subscription sent).
        async fn events(&self, call: StreamCall) -> Answer;
    }
}

use hostile::{Answer, HostileFeed};

/// How the hostile server breaks the protocol after a good start.
#[derive(Debug, Clone, Copy)]
enum Breach {
    /// The event at the cursor again, then a new one.
    AtTheCursor,
    /// An event before the cursor.
    BeforeTheCursor,
    /// Two events out of order.
    OutOfOrder,
    /// One more event than asked for.
    MoreThanAsked,
    /// Events of another epoch, without a resync.
    OtherEpoch,
    /// A batch whose end is before its last event.
    EndsBeforeItsEvents,
    /// Bytes that are no batch.
    Garbage,
}

const HOSTILE_EPOCH: u64 = 0x5eed;

/// The hostile server: a good start (a resync at 5, events 6 and 7), then `breach`.
struct Hostile(Breach);

impl HostileFeed for Hostile {
    async fn events(&self, call: StreamCall) -> Answer {
        let batch = |epoch, events: Vec<u64>, next| {
            Answer::Batch(Batch {
                epoch,
                resync: None,
                events: events.into_iter().map(|n| (n, n)).collect(),
                next,
            })
        };
        if call.poll.from.is_none() {
            return Answer::Batch(Batch {
                epoch: HOSTILE_EPOCH,
                resync: Some(dombus::rpc::events::Resync {
                    reason: ResyncReason::Start,
                    at: 5,
                    snapshot: None,
                }),
                events: vec![(6, 6), (7, 7)],
                next: 7,
            });
        }
        match self.0 {
            Breach::AtTheCursor => batch(HOSTILE_EPOCH, vec![7, 8], 8),
            Breach::BeforeTheCursor => batch(HOSTILE_EPOCH, vec![3], 8),
            Breach::OutOfOrder => batch(HOSTILE_EPOCH, vec![9, 8], 9),
            Breach::MoreThanAsked => {
                let n = u64::from(call.poll.max_events) + 1;
                batch(HOSTILE_EPOCH, (8..8 + n).collect(), 7 + n)
            }
            Breach::OtherEpoch => batch(HOSTILE_EPOCH + 1, vec![8], 8),
            Breach::EndsBeforeItsEvents => batch(HOSTILE_EPOCH, vec![8], 6),
            Breach::Garbage => Answer::Garbage("not a batch of events".into()),
        }
    }
}

/// Against each breach: the start and events 6 and 7, then one final error that names the
/// breach, then the end; no event twice, no event of the bad batch.
async fn hostile_server(p: Place) {
    let name = p.name;
    let breaches = [
        (Breach::AtTheCursor, "event 7 does not follow 7"),
        (Breach::BeforeTheCursor, "event 3 does not follow 7"),
        (Breach::OutOfOrder, "event 8 does not follow 9"),
        (Breach::MoreThanAsked, "5 events where at most 4 were asked for"),
        (Breach::OtherEpoch, "events without a resync for a new subscription or another epoch"),
        (Breach::EndsBeforeItsEvents, "the batch ends at 6 before its last event 8"),
        (Breach::Garbage, "the reply of events does not decode"),
    ];
    for (breach, why) in breaches {
        let (_server, serving) = p.serve_service(Hostile(breach).into_service()).await;
        let client = p.client();
        let mut sub = client.events().max_events(4).wait(Duration::from_millis(200));
        let mut seen = Vec::new();
        let error = loop {
            match tokio::time::timeout(T, sub.next()).await.unwrap() {
                Some(Ok(Update::Event { cursor, event })) => {
                    assert_eq!((cursor.epoch, cursor.seq), (HOSTILE_EPOCH, event), "{name} {breach:?}");
                    seen.push(event);
                    assert!(seen.len() <= 2, "{name} {breach:?}: delivered {seen:?}");
                }
                Some(Ok(Update::Resync { reason: ResyncReason::Start, cursor, .. })) if seen.is_empty() => {
                    assert_eq!(cursor, Cursor { epoch: HOSTILE_EPOCH, seq: 5 }, "{name} {breach:?}");
                }
                Some(Ok(other)) => panic!("{name} {breach:?}: {other:?}"),
                Some(Err(e)) => break e,
                None => panic!("{name} {breach:?}: ended without an error"),
            }
        };
        assert_eq!(seen, [6, 7], "{name} {breach:?}");
        assert!(error_text(&error).contains(why), "{name} {breach:?}: {}", error_text(&error));
        assert!(is_final(&error), "{name} {breach:?}: not final: {error}");
        assert_eq!(sub.cursor(), Some(Cursor { epoch: HOSTILE_EPOCH, seq: 7 }), "{name} {breach:?}");
        assert!(tokio::time::timeout(T, sub.next()).await.unwrap().is_none(), "{name} {breach:?}: went on");
        serving.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_servers_batches_are_refused_over_unix() {
    run(unix, "hostile", hostile_server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_servers_batches_are_refused_over_tcp() {
    run(tcp, "hostile", hostile_server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_servers_batches_are_refused_over_xen() {
    run(xen, "hostile", hostile_server).await;
}

/// A server that answers every poll at once with nothing (it does not wait for events),
/// counting the polls.
struct Impatient;

static IMPATIENT_POLLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl HostileFeed for Impatient {
    async fn events(&self, call: StreamCall) -> Answer {
        IMPATIENT_POLLS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let next = call.poll.from.map_or(0, |c| c.seq);
        let resync = call.poll.from.is_none().then_some(dombus::rpc::events::Resync {
            reason: ResyncReason::Start,
            at: 0,
            snapshot: None,
        });
        Answer::Batch(Batch { epoch: HOSTILE_EPOCH, resync, events: vec![], next })
    }
}

/// Against a server that answers none at once, a subscription polls at most every 10 ms
/// instead of as fast as the round trips go.
async fn impatient_server(p: Place) {
    let (_server, serving) = p.serve_service(Impatient.into_service()).await;
    let client = p.client();
    let mut sub = client.events().wait(Duration::from_secs(1));
    assert!(matches!(tokio::time::timeout(T, sub.next()).await.unwrap(), Some(Ok(Update::Resync { .. }))));
    let before = IMPATIENT_POLLS.load(std::sync::atomic::Ordering::SeqCst);
    let _ = tokio::time::timeout(Duration::from_millis(300), sub.next()).await;
    let n = IMPATIENT_POLLS.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(n <= 40, "{} {n} polls in 300 ms", p.name);
    serving.stop().await;
}

#[tokio::test]
async fn empty_answers_at_once_are_polled_at_a_bounded_rate() {
    run(unix, "impatient", impatient_server).await;
}
