//! `dombus_tools::ticks` end to end over a Unix socket: the subscriber that `dombus-link
//! ticks-watch` runs on real Xen receives every tick once and in order, and across a restart of
//! the server gets one new-epoch resync, then the new server's ticks.

use std::time::Duration;

use dombus::{Address, Net, Server, ServerConfig};
use dombus_tools::ticks::{self, Phase, TickSource, Ticks, TicksClient};

/// A directory of this test's own, removed when dropped.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("dombus-ticks-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temporary directory");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn addr(dir: &TempDir) -> Address {
    format!("unix:{}", dir.0.join("ticks.sock").display()).parse().expect("address")
}

#[tokio::test]
async fn every_tick_arrives_once_in_order() {
    let dir = TempDir::new("order");
    let addr = addr(&dir);
    let server = Server::new(Net::new(), ServerConfig::default());
    let source = TickSource::new();
    let epoch = source.epoch();
    let _serving = server.serve(&addr, source.into_service()).await.expect("serve");
    let client = TicksClient::new(Net::new(), addr);
    // Ticks published before the subscription are not its own: it starts after them.
    assert_eq!(client.publish(dombus::context::current(), 5).await.expect("publish"), 5);
    let report =
        ticks::watch(&client, 1000, None::<fn(&Phase)>, Duration::from_secs(30)).await.expect("watch");
    assert_eq!(report.first, Phase { epoch, ticks: (6, 1005), events: 1000, failed_polls: 0 });
    assert_eq!(report.restarted, None);
}

#[tokio::test]
async fn a_server_restart_is_one_new_epoch_resync_then_the_new_ticks() {
    let dir = TempDir::new("restart");
    let addr = addr(&dir);
    let server = Server::new(Net::new(), ServerConfig::default());
    let first = TickSource::new();
    let old_epoch = first.epoch();
    let serving = server.serve(&addr, first.into_service()).await.expect("serve");
    let (restart, restarted) = tokio::sync::oneshot::channel::<()>();
    let again = addr.clone();
    let restarter = tokio::spawn(async move {
        restarted.await.expect("the subscriber asks for the restart");
        // The subscriber's poll is waiting on the server: stopping it cuts the connection (the
        // client may make a new one within the same poll: polls are retried like idempotent calls).
        serving.stop().await;
        drop(server);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let server = Server::new(Net::new(), ServerConfig::default());
        let source = TickSource::new();
        let epoch = source.epoch();
        let serving = server.serve(&again, source.into_service()).await.expect("serve again");
        (server, serving, epoch)
    });
    let client = TicksClient::new(Net::new(), addr);
    let ask = move |phase: &Phase| {
        assert_eq!(phase.events, 100);
        restart.send(()).expect("the restarter waits");
    };
    let report = ticks::watch(&client, 100, Some(ask), Duration::from_secs(30)).await.expect("watch");
    let (_server, _serving, new_epoch) = restarter.await.expect("restarted");
    assert_eq!(report.first, Phase { epoch: old_epoch, ticks: (1, 100), events: 100, failed_polls: 0 });
    let (previous, after) = report.restarted.expect("a restart was awaited");
    assert_eq!(previous, old_epoch);
    assert_eq!((after.epoch, after.ticks, after.events), (new_epoch, (1, 100), 100));
    assert_ne!(new_epoch, old_epoch);
}

#[tokio::test]
async fn a_count_past_the_ring_is_refused_before_subscribing() {
    let client = TicksClient::new(Net::new(), "unix:/nonexistent/ticks.sock".parse().expect("address"));
    let e = ticks::watch(&client, ticks::MAX_PUBLISH + 1, None::<fn(&Phase)>, Duration::from_secs(1))
        .await
        .expect_err("too many");
    assert!(e.to_string().contains("count must be 1 to 1024"), "{e}");
}
