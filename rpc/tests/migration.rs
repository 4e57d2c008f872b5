//! Typed calls across a migration on the simulated hypervisor (docs/agent.md, "Migration"): the
//! domain comes back under a new id with no grants, its links are reset, its agent attaches
//! again and its listeners are announced under the new id. A client reconnects — by name where
//! the address named the domain — and re-issues only idempotent calls; a call that is not
//! idempotent and was in flight reports that its outcome is unknown; nothing waits past its
//! deadline.
#![allow(clippy::unwrap_used, missing_docs)]

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dombus_agent::attach::follow;
use dombus_agent::{Agent, AgentClient, AgentConfig};
use dombus_rpc::{Address, Net, ServeHandle, Server, ServerConfig, connection_lost};
use dombus_sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_transport_xen::DomId;
use dombus_transport_xen::vsock::domain::VsockConfig;
use tarpc::context;

#[dombus::service]
pub trait Counter {
    /// Counts the call (not idempotent). With `hold` set, the first call never returns: it is
    /// in flight until its connection goes.
    async fn bump(&self) -> u64;
    /// Counts the call; idempotent.
    #[idempotent]
    async fn touch(&self) -> u64;
    /// The counts `bump` reached, as they come.
    async fn bumps(&self) -> dombus::Events<u64>;
}

#[derive(Clone)]
struct Runs {
    bump: Arc<AtomicU64>,
    touch: Arc<AtomicU64>,
    hold: bool,
    bumps: dombus::Topic<u64>,
}

impl Default for Runs {
    fn default() -> Runs {
        Runs {
            bump: Arc::default(),
            touch: Arc::default(),
            hold: false,
            bumps: dombus::Topic::new(dombus::TopicLimits::default()),
        }
    }
}

impl Counter for Runs {
    async fn bump(&self) -> u64 {
        let n = self.bump.fetch_add(1, Ordering::SeqCst) + 1;
        self.bumps.publish(n);
        if self.hold && n == 1 {
            std::future::pending::<()>().await;
        }
        n
    }
    async fn touch(&self) -> u64 {
        self.touch.fetch_add(1, Ordering::SeqCst) + 1
    }
    async fn bumps(&self) -> dombus::Events<u64> {
        self.bumps.events()
    }
}

/// How long a test waits for what must happen before calling it a hang.
const LIVENESS: Duration = Duration::from_secs(30);
/// Every call's deadline.
const DEADLINE: Duration = Duration::from_secs(10);

struct Host {
    dir: PathBuf,
    _hv: SimHypervisorHandle,
}

impl Host {
    fn new(tag: &str) -> Host {
        let dir = std::env::temp_dir().join(format!("dombus-migration-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let hv = SimHypervisor::spawn(&dir.join("simxen.sock")).unwrap();
        Host { dir, _hv: hv }
    }

    fn sim(&self) -> PathBuf {
        self.dir.join("simxen.sock")
    }

    /// Domain `id` named `name`, attached in this process and following its migrations.
    fn domain(&self, id: u16, name: &str) -> Arc<dombus_agent::sockets::Following> {
        let backend = SimBackend::boot_named(self.sim(), Some(DomId(id)), name).unwrap();
        Arc::new(follow(backend, VsockConfig::default()).unwrap())
    }

    /// Domain `id`'s agent, and a process of the domain that calls through it.
    fn agent(&self, id: u16, name: &str) -> (Agent, Net) {
        let agent =
            Agent::serve(self.domain(id, name), AgentConfig::new(self.dir.join(format!("{name}.sock"))))
                .unwrap();
        let mut net = Net::new().with_agent(AgentClient::new(agent.socket()));
        net.xen_connect_wait = Some(DEADLINE);
        (agent, net)
    }

    /// Serves `runs` on port 5000 of domain `id`, which is its own agent.
    async fn serve(&self, id: u16, name: &str, runs: &Runs) -> (Server, ServeHandle) {
        let net = Net::new().with_domain(self.domain(id, name), None);
        let server = Server::new(net, ServerConfig::default());
        let addr: Address = "xen:self:5000".parse().unwrap();
        let handle = server.serve(&addr, runs.clone().into_service()).await.unwrap();
        (server, handle)
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ctx() -> context::Context {
    let mut c = context::current();
    c.deadline = Instant::now() + DEADLINE;
    c
}

async fn until(count: &AtomicU64, n: u64) {
    let t = Instant::now();
    while count.load(Ordering::SeqCst) < n {
        assert!(t.elapsed() < LIVENESS, "the server never saw call {n}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_servers_domain_migrated_calls_by_name_find_it_under_its_new_id() {
    let host = Host::new("server");
    let runs = Runs { hold: true, ..Runs::default() };
    let _server = host.serve(2, "counter", &runs).await;
    // The toolstack's domain calls it by name, through its agent.
    let (_agent, net) = host.agent(0, "Domain-0");
    let client = CounterClient::connect(net, "xen:counter:5000".parse().unwrap()).await.unwrap();
    assert_eq!(client.touch(ctx()).await.unwrap(), 1);

    // A call that is not idempotent is in flight (the server ran it and holds it) when the
    // server's domain is migrated.
    let held = {
        let client = client.clone();
        tokio::spawn(async move { client.bump(ctx()).await })
    };
    until(&runs.bump, 1).await;
    let to = SimBackend::migrate(host.sim(), DomId(2)).unwrap();
    assert_ne!(to, DomId(2));
    let t = Instant::now();
    let e = tokio::time::timeout(LIVENESS, held).await.expect("the held call hung").unwrap().unwrap_err();
    assert!(t.elapsed() < DEADLINE, "it failed with the transport, not at its deadline");
    let lost = connection_lost(&e).unwrap_or_else(|| panic!("not ConnectionLost: {e:?}"));
    assert!(lost.to_string().contains("outcome is unknown"), "{lost}");
    assert_eq!(runs.bump.load(Ordering::SeqCst), 1, "not sent again");

    // An idempotent call reconnects — the name now resolves to the new id — and runs.
    let t = Instant::now();
    assert_eq!(client.touch(ctx()).await.unwrap(), 2);
    assert!(t.elapsed() < DEADLINE);
    // And so does the next call that is not idempotent (it never left before the reconnect).
    assert_eq!(client.bump(ctx()).await.unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_domain_migrated_its_agent_follows_and_calls_go_on() {
    let host = Host::new("client");
    let runs = Runs::default();
    let _server = host.serve(2, "counter", &runs).await;
    let (agent, net) = host.agent(3, "guest");
    let client = CounterClient::connect(net, "xen:2:5000".parse().unwrap()).await.unwrap();
    assert_eq!(client.touch(ctx()).await.unwrap(), 1);
    assert_eq!(agent.status().domain, DomId(3));

    let to = SimBackend::migrate(host.sim(), DomId(3)).unwrap();
    // The agent attaches again as the new id; the process keeps the same agent socket.
    let t = Instant::now();
    while agent.status().domain != to {
        assert!(t.elapsed() < LIVENESS, "the agent never attached as domain {to}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t = Instant::now();
    assert_eq!(client.touch(ctx()).await.unwrap(), 2);
    assert!(t.elapsed() < DEADLINE);
    assert_eq!(agent.status().links.iter().map(|l| l.0).collect::<Vec<_>>(), [DomId(2)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_through_the_agent_is_announced_under_the_new_id() {
    let host = Host::new("listener");
    // Domain 4's agent; a process of it listens through the agent.
    let (agent, net) = host.agent(4, "svc");
    let runs = Runs::default();
    let server = Server::new(net, ServerConfig::default());
    let _handle = server.serve(&"xen:self:6000".parse().unwrap(), runs.clone().into_service()).await.unwrap();
    let (_caller_agent, caller) = host.agent(0, "Domain-0");
    let client = CounterClient::connect(caller, "xen:svc:6000".parse().unwrap()).await.unwrap();
    assert_eq!(client.touch(ctx()).await.unwrap(), 1);

    let to = SimBackend::migrate(host.sim(), DomId(4)).unwrap();
    let t = Instant::now();
    while agent.status().domain != to {
        assert!(t.elapsed() < LIVENESS, "the agent never attached as domain {to}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The serving process never noticed: its listener listens under the new id.
    assert_eq!(client.touch(ctx()).await.unwrap(), 2);
    assert_eq!(agent.status().listening, vec![6000]);
}

/// The subscription's next update, within the liveness bound.
async fn next(
    bumps: &mut dombus::Subscription<u64, ()>,
) -> Option<Result<dombus::Update<u64, ()>, dombus::RpcError>> {
    use futures::StreamExt;
    tokio::time::timeout(LIVENESS, bumps.next()).await.expect("an update in time")
}

/// A subscription across a migration of the server's domain: its poll is waiting when the link
/// is reset; it resumes from its cursor under the new id and misses nothing published meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_resumes_from_its_cursor_across_a_migration() {
    let host = Host::new("subscription");
    let runs = Runs::default();
    let _server = host.serve(2, "counter", &runs).await;
    let (_agent, net) = host.agent(0, "Domain-0");
    let client = CounterClient::connect(net, "xen:counter:5000".parse().unwrap()).await.unwrap();
    let mut bumps = client.bumps().wait(Duration::from_secs(5));
    let start = next(&mut bumps).await;
    assert!(matches!(start, Some(Ok(dombus::Update::Resync { .. }))), "{start:?}");
    assert_eq!(client.bump(ctx()).await.unwrap(), 1);
    assert!(matches!(next(&mut bumps).await, Some(Ok(dombus::Update::Event { event: 1, .. }))));

    // The subscription's next poll waits on the server when its domain is migrated; events
    // are published while the link is down.
    let waiting = tokio::spawn(async move {
        let mut seen = Vec::new();
        while seen.len() < 3 {
            match next(&mut bumps).await {
                Some(Ok(dombus::Update::Event { event, .. })) => seen.push(event),
                Some(Ok(other)) => panic!("a resync across a migration of the same server: {other:?}"),
                Some(Err(e)) => assert!(!dombus::rpc::events::is_final(&e), "{e}"),
                None => panic!("the subscription ended"),
            }
        }
        seen
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let to = SimBackend::migrate(host.sim(), DomId(2)).unwrap();
    assert_ne!(to, DomId(2));
    for _ in 0..3 {
        runs.bump.fetch_add(1, Ordering::SeqCst);
        runs.bumps.publish(runs.bump.load(Ordering::SeqCst));
    }
    let seen = tokio::time::timeout(LIVENESS, waiting).await.expect("resumed").unwrap();
    assert_eq!(seen, [2, 3, 4], "every event once, in order");
}
