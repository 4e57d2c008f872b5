//! Stable method identity across versions of a service: v1 and v2 of the same service, calling
//! each other both ways over real transports (a Unix socket; transport-xen virtual sockets
//! between two domains of the simulated hypervisor). v2 adds a method (first in the trait, so
//! every position shifts), reorders the others and removes one: old methods still work both
//! ways, and a method one side does not have is a clear "unknown method" error on a connection
//! that goes on working.
#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dombus::context;
use dombus::rpc::{ClientConfig, RawClient, error_text, is_unknown_method};
use dombus::sim::{SimBackend, SimHypervisor};
use dombus::transport::types::DomId;
use dombus::transport::vsock::domain::{VsockConfig, VsockDomain};
use dombus::{Address, Net, Server, ServerConfig};

type Store = Arc<Mutex<BTreeMap<String, String>>>;

mod v1 {
    use super::Store;

    /// A key-value store, first version.
    #[dombus::service(name = "kv", version = 1)]
    pub trait Kv {
        /// The value of `key`.
        #[idempotent]
        async fn get(&self, key: String) -> Option<String>;
        /// Sets `key`; returns the previous value.
        async fn put(&self, key: String, value: String) -> Option<String>;
        /// Removed in version 2.
        async fn legacy(&self) -> u32;
    }

    pub struct Impl(pub Store);

    impl Kv for Impl {
        async fn get(&self, key: String) -> Option<String> {
            self.0.lock().unwrap().get(&key).cloned()
        }
        async fn put(&self, key: String, value: String) -> Option<String> {
            self.0.lock().unwrap().insert(key, value)
        }
        async fn legacy(&self) -> u32 {
            1
        }
    }
}

mod v2 {
    use super::Store;

    /// A key-value store, second version.
    #[dombus::service(name = "kv", version = 2)]
    pub trait Kv {
        /// New in version 2, and first: every method's position moved.
        #[idempotent]
        async fn count(&self) -> u64;
        /// Sets `key`; returns the previous value.
        async fn put(&self, key: String, value: String) -> Option<String>;
        /// The value of `key`.
        #[idempotent]
        async fn get(&self, key: String) -> Option<String>;
    }

    pub struct Impl(pub Store);

    impl Kv for Impl {
        async fn count(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        async fn put(&self, key: String, value: String) -> Option<String> {
            self.0.lock().unwrap().insert(key, value)
        }
        async fn get(&self, key: String) -> Option<String> {
            self.0.lock().unwrap().get(&key).cloned()
        }
    }
}

/// A build whose `get` takes another type: its calls must be refused clearly, not garble.
mod skewed {
    #[dombus::service(name = "kv", version = 3)]
    pub trait Kv {
        #[idempotent]
        async fn get(&self, key: u64) -> Option<String>;
    }
}

struct Place {
    name: &'static str,
    server: Net,
    client: Net,
    addr: Address,
    _keep: Option<dombus::sim::SimHypervisorHandle>,
}

fn unix() -> Place {
    let dir = std::env::temp_dir().join(format!("dombus-versions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Place {
        name: "unix",
        server: Net::new(),
        client: Net::new(),
        addr: Address::Unix(dir.join("kv.sock")),
        _keep: None,
    }
}

fn xen() -> Place {
    let dir = std::env::temp_dir().join(format!("dombus-versions-xen-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
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
        _keep: Some(hv),
    }
}

fn ctx() -> context::Context {
    let mut c = context::current();
    c.deadline = std::time::Instant::now() + Duration::from_secs(20);
    c
}

async fn across_versions(p: Place) {
    let name = p.name;
    let store = Store::default();
    let server = Server::new(p.server.clone(), ServerConfig::default());

    // An old server, a new client.
    let h = server.serve(&p.addr, v1::Kv::into_service(v1::Impl(store.clone()))).await.unwrap();
    let new = v2::KvClient::connect(p.client.clone(), p.addr.clone()).await.unwrap();
    assert_eq!(new.put(ctx(), "a".into(), "1".into()).await.unwrap(), None, "{name}");
    assert_eq!(new.get(ctx(), "a".into()).await.unwrap(), Some("1".into()), "{name}");
    let e = new.count(ctx()).await.unwrap_err();
    assert!(is_unknown_method(&e), "{name}: {e:?}");
    assert!(error_text(&e).contains("unknown method \"count\""), "{name}: {}", error_text(&e));
    // The connection survived the unknown method.
    assert_eq!(new.get(ctx(), "a".into()).await.unwrap(), Some("1".into()), "{name}");
    // Arguments of another type: refused with a clear error, the connection goes on.
    let skewed = skewed::KvClient::connect(p.client.clone(), p.addr.clone()).await.unwrap();
    let e = skewed.get(ctx(), 7).await.unwrap_err();
    assert!(error_text(&e).contains("arguments of kv.get do not decode"), "{name}: {}", error_text(&e));
    assert_eq!(new.get(ctx(), "a".into()).await.unwrap(), Some("1".into()), "{name}");
    // What the server says it is.
    let described =
        dombus::rpc::describe(p.client.clone(), p.addr.clone(), Duration::from_secs(10)).await.unwrap();
    assert_eq!(described.len(), 1, "{name}");
    assert_eq!((described[0].name.as_str(), described[0].version), ("kv", 1), "{name}");
    let methods: Vec<_> = described[0].methods.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(methods, ["get", "put", "legacy"], "{name}");
    h.stop().await;

    // A new server, an old client (and the data the old server's clients left).
    let h = server.serve(&p.addr, v2::Kv::into_service(v2::Impl(store.clone()))).await.unwrap();
    let old = v1::KvClient::connect(p.client.clone(), p.addr.clone()).await.unwrap();
    assert_eq!(old.get(ctx(), "a".into()).await.unwrap(), Some("1".into()), "{name}");
    assert_eq!(old.put(ctx(), "a".into(), "2".into()).await.unwrap(), Some("1".into()), "{name}");
    let e = old.legacy(ctx()).await.unwrap_err();
    assert!(is_unknown_method(&e), "{name}: {e:?}");
    assert_eq!(old.get(ctx(), "a".into()).await.unwrap(), Some("2".into()), "{name}");
    // And the new client with the new server, including the new method.
    let new = v2::KvClient::connect(p.client.clone(), p.addr.clone()).await.unwrap();
    assert_eq!(new.count(ctx()).await.unwrap(), 1, "{name}");
    // The built-ins answer on a connection made for them alone.
    let raw = RawClient::new(p.client.clone(), p.addr.clone(), "dombus", ClientConfig::default());
    raw.ping(ctx()).await.unwrap();
    let described = raw.describe(ctx()).await.unwrap();
    assert_eq!(described[0].version, 2, "{name}");
    assert!(described[0].methods[0].idempotent && !described[0].methods[1].idempotent, "{name}");
    assert_eq!(described[0].methods[0].doc, "New in version 2, and first: every method's position moved.");
    assert_eq!(described[0].methods[2].args[0].ty, "String", "{name}");
    assert_eq!(described[0].methods[2].result, "Option<String>", "{name}");
    // On that connection, the service's own methods are unknown.
    let e = raw.call(ctx(), "get".into(), Vec::new(), true).await.unwrap_err();
    assert!(is_unknown_method(&e), "{name}: {e:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_and_new_versions_call_each_other_over_unix() {
    across_versions(unix()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_and_new_versions_call_each_other_over_xen_link_sockets() {
    across_versions(xen()).await;
}
