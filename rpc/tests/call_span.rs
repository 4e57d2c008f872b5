//! The span a call runs in on the server is a debug span: under the daemons' info-level logging
//! it is never made (an enabled one costs each call 1.6–1.9 µs of formatting and bookkeeping), and
//! with debug logging it is, named `rpc`.
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::{Arc, Mutex};

use dombus_rpc::{Address, ClientConfig, Net, RawClient, Server, ServerConfig, wire};
use tracing::{Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::{EnvFilter, Layer};

/// Every span the subscriber made: its name and level.
#[derive(Clone, Default)]
struct Made(Arc<Mutex<Vec<(&'static str, Level)>>>);

impl<S: Subscriber> Layer<S> for Made {
    fn on_new_span(&self, attrs: &tracing::span::Attributes<'_>, _: &tracing::span::Id, _: Context<'_, S>) {
        let m = attrs.metadata();
        self.0.lock().unwrap().push((m.name(), *m.level()));
    }
}

/// The spans made on this thread while a server answers one ping, logging at `filter`.
fn spans_of_one_call(filter: &str) -> Vec<(&'static str, Level)> {
    let made = Made::default();
    let subscriber = tracing_subscriber::registry().with(EnvFilter::new(filter)).with(made.clone());
    let _logging = tracing::subscriber::set_default(subscriber);
    let dir = std::env::temp_dir().join(format!("dombus-call-span-{filter}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let addr = Address::Unix(dir.join("ping.sock"));
        let handle =
            Server::new(Net::new(), ServerConfig::default()).serve_many(&addr, Vec::new()).await.unwrap();
        let client = RawClient::new(Net::new(), addr, wire::BUILTIN_SERVICE, ClientConfig::default());
        client.ping(tarpc::context::current()).await.unwrap();
        handle.stop().await;
    });
    let _ = std::fs::remove_dir_all(&dir);
    made.0.lock().unwrap().clone()
}

#[test]
fn a_calls_span_is_made_only_when_debug_is_logged() {
    let debug = spans_of_one_call("debug");
    assert!(debug.contains(&("rpc", Level::DEBUG)), "the call ran in its debug span: {debug:?}");
    let info = spans_of_one_call("info");
    assert!(!info.iter().any(|(name, _)| *name == "rpc"), "no call span at info: {info:?}");
}
