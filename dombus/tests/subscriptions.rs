//! Subscriptions end to end: a `#[dombus::service]` with a stream method, served and subscribed
//! to over real transports.

use std::time::Duration;

use dombus::rpc::events::is_final;
use dombus::{Address, Events, Net, ResyncReason, Server, ServerConfig, Topic, TopicLimits, Update};
use futures::StreamExt;

/// A counter that announces every change.
#[dombus::service(name = "counter")]
pub trait Counter {
    /// Adds `n`; answers the new value.
    async fn add(&self, n: u64) -> u64;
    /// The changes: every new value, or only those at least `min`.
    async fn changes(&self, min: Option<u64>) -> Events<u64, u64>;
}

struct Impl {
    value: std::sync::Arc<std::sync::atomic::AtomicU64>,
    topic: Topic<u64, u64>,
}

impl Impl {
    fn new(limits: TopicLimits) -> Impl {
        let value = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let v = value.clone();
        let topic = Topic::with_snapshot(limits, move || v.load(std::sync::atomic::Ordering::SeqCst));
        Impl { value, topic }
    }
}

impl Counter for Impl {
    async fn add(&self, n: u64) -> u64 {
        let now = self.value.fetch_add(n, std::sync::atomic::Ordering::SeqCst) + n;
        self.topic.publish(now);
        now
    }

    async fn changes(&self, min: Option<u64>) -> Events<u64, u64> {
        match min {
            Some(min) => self.topic.events_where(move |v| *v >= min),
            None => self.topic.events(),
        }
    }
}

/// A directory of this test's own, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("dombus-subscriptions-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary directory");
        TempDir(dir)
    }

    fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unix_addr(dir: &TempDir) -> Address {
    format!("unix:{}", dir.path().join("counter.sock").display()).parse().expect("address")
}

#[tokio::test]
async fn a_subscriber_sees_the_state_then_every_change_in_order() {
    let dir = TempDir::new("order");
    let addr = unix_addr(&dir);
    let server = Server::new(Net::new(), ServerConfig::default());
    let _serving =
        server.serve(&addr, Impl::new(TopicLimits::default()).into_service()).await.expect("serve");
    let client = CounterClient::connect(Net::new(), addr.clone()).await.expect("connect");
    client.add(tarpc::context::current(), 5).await.expect("add");

    let mut changes = client.changes(None);
    let first = changes.next().await.expect("an update").expect("ok");
    let Update::Resync { reason: ResyncReason::Start, snapshot: Some(5), cursor } = first else {
        panic!("a new subscription starts with the state: {first:?}")
    };
    for n in 1..=3 {
        client.add(tarpc::context::current(), n).await.expect("add");
    }
    let mut seen = Vec::new();
    for _ in 0..3 {
        match changes.next().await.expect("an update").expect("ok") {
            Update::Event { event, cursor: c } => {
                assert_eq!(c.epoch, cursor.epoch);
                seen.push((c.seq, event));
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, vec![(2, 6), (3, 8), (4, 11)]);

    // A filtered subscription, resumed from a cursor.
    let mut big = client.changes(Some(10)).from(cursor);
    let update = big.next().await.expect("an update").expect("ok");
    assert!(matches!(update, Update::Event { event: 11, .. }), "{update:?}");
}

#[tokio::test]
async fn a_server_restart_is_a_resync_with_a_new_epoch() {
    let dir = TempDir::new("restart");
    let addr = unix_addr(&dir);
    let server = Server::new(Net::new(), ServerConfig::default());
    let serving = server.serve(&addr, Impl::new(TopicLimits::default()).into_service()).await.expect("serve");
    let client = CounterClient::new(Net::new(), addr.clone());
    let mut changes = client.changes(None).wait(Duration::from_millis(200));
    let Some(Ok(Update::Resync { cursor: before, .. })) = changes.next().await else { panic!("start") };
    serving.stop().await;
    drop(server);
    let _ = std::fs::remove_file(dir.path().join("counter.sock"));
    let server = Server::new(Net::new(), ServerConfig::default());
    let _serving =
        server.serve(&addr, Impl::new(TopicLimits::default()).into_service()).await.expect("serve");
    let update = loop {
        match tokio::time::timeout(Duration::from_secs(20), changes.next()).await.expect("in time") {
            Some(Ok(u)) => break u,
            Some(Err(e)) => assert!(!is_final(&e), "{e}"),
            None => panic!("ended"),
        }
    };
    match update {
        Update::Resync { reason: ResyncReason::NewEpoch { previous }, cursor, snapshot: Some(0) } => {
            assert_eq!(previous, before.epoch);
            assert_ne!(cursor.epoch, before.epoch);
        }
        other => panic!("expected a new-epoch resync: {other:?}"),
    }
}
