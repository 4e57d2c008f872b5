//! What subscribers can make a server hold: waiting polls have a budget of their own, apart
//! from calls, so that subscribers never shed calls and a flood of polls is shed itself.

use std::time::Duration;

use dombus::rpc::is_overloaded;
use dombus::{Address, Events, Net, Server, ServerConfig, Topic, TopicLimits, Update};
use futures::StreamExt;

/// Ticks on demand.
#[dombus::service(name = "ticker")]
pub trait Ticker {
    /// Publishes one tick.
    async fn tick(&self) -> u64;
    /// Ticks so far (publishes nothing).
    async fn count(&self) -> u64;
    /// The ticks.
    async fn ticks(&self) -> Events<u64>;
}

struct Impl(Topic<u64>);

impl Ticker for Impl {
    async fn tick(&self) -> u64 {
        self.0.publish(7).seq
    }

    async fn count(&self) -> u64 {
        self.0.cursor().seq
    }

    async fn ticks(&self) -> Events<u64> {
        self.0.events()
    }
}

fn addr(tag: &str) -> (std::path::PathBuf, Address) {
    let path = std::env::temp_dir().join(format!("dombus-sublimits-{tag}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let addr = format!("unix:{}", path.display()).parse().expect("address");
    (path, addr)
}

#[tokio::test]
async fn waiting_polls_do_not_take_the_calls_budget_and_have_their_own() {
    let (path, addr) = addr("budget");
    let config = ServerConfig { max_concurrent: 2, max_polls: 4, ..ServerConfig::default() };
    let server = Server::new(Net::new(), config);
    let topic = Topic::new(TopicLimits::default());
    let _serving = server.serve(&addr, Impl(topic.clone()).into_service()).await.expect("serve");
    let client = TickerClient::connect(Net::new(), addr.clone()).await.expect("connect");

    // Four subscriptions, each past its start and waiting on the server for a tick.
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let mut s = client.ticks().wait(Duration::from_secs(20));
        assert!(matches!(s.next().await, Some(Ok(Update::Resync { .. }))));
        waiting.push(tokio::spawn(async move { (s.next().await, s) }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Calls still run (only two at a time are allowed, and four polls wait).
    for _ in 0..3 {
        let count = tokio::time::timeout(Duration::from_secs(5), client.count(tarpc::context::current()))
            .await
            .expect("a call is not held behind waiting polls")
            .expect("count");
        assert_eq!(count, 0);
    }
    // A fifth poll is shed, and says so.
    let mut fifth = client.ticks().from(topic.cursor());
    let shed =
        tokio::time::timeout(Duration::from_secs(5), fifth.next()).await.expect("answered").expect("an item");
    assert!(matches!(&shed, Err(e) if is_overloaded(e)), "{shed:?}");
    client.tick(tarpc::context::current()).await.expect("tick");

    // The waiting ones got the first tick.
    for w in waiting {
        let (first, _s) =
            tokio::time::timeout(Duration::from_secs(5), w).await.expect("woken").expect("joined");
        assert!(matches!(first, Some(Ok(Update::Event { event: 7, .. }))), "{first:?}");
    }
    let _ = std::fs::remove_file(path);
}
