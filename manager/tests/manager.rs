//! The connection manager on the simulated hypervisor, end to end: a backend domain (dom0, the
//! toolstack too) running the manager, and guests whose sockets are managed, each attached in
//! this process as its own domain, with real links between them.
//!
//! Default deny and the decision ids; introductions and direct links (the manager carries no
//! data); a port the policy denies on a linked pair; a guest bypassing its own agent; forged
//! links and rendezvous; the admin service refusing guests; revocation; a bad policy file; the
//! manager restarting; the admin service's watch (the live audit view).
#![allow(clippy::unwrap_used, missing_docs)]

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dombus_agent::{DomainSockets, Managed, denied};
use dombus_manager::Labels;
use dombus_manager::admin::AdminError;
use dombus_manager::watch::{ManagerEvent, WatchState, WatchedDomain};
use dombus_manager::{Manager, ManagerConfig, PolicyAdmin};
use dombus_sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_transport_xen::DomId;
use dombus_transport_xen::backend::{Backend, Perm, PermKind, Store};
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use dombus_transport_xen::vsock::{LinkSetUp, VsockAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIVENESS: Duration = Duration::from_secs(30);
const ALPHA: DomId = DomId(3);
const BETA: DomId = DomId(4);

struct Host {
    dir: PathBuf,
    _hv: SimHypervisorHandle,
    backend: VsockDomain<SimBackend>,
}

impl Host {
    /// A simulated host whose backend domain (dom0) has `policy` in its policy directory.
    fn new(tag: &str, policy: &str) -> Host {
        let dir = std::env::temp_dir().join(format!("dombus-manager-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policy")).unwrap();
        std::fs::write(dir.join("policy/90-test.policy"), policy).unwrap();
        let hv = SimHypervisor::spawn(&dir.join("simxen.sock")).unwrap();
        let b = SimBackend::toolstack(dir.join("simxen.sock")).unwrap();
        let backend = VsockDomain::start(b, config(LinkSetUp::Introduced)).unwrap();
        Host { dir, _hv: hv, backend }
    }

    fn sim(&self) -> PathBuf {
        self.dir.join("simxen.sock")
    }

    fn policy(&self) -> PathBuf {
        self.dir.join("policy")
    }

    /// Starts the manager (again, after a stop: the port frees once the old listener's task
    /// has gone).
    async fn manager(&self) -> Manager {
        let deadline = Instant::now() + LIVENESS;
        loop {
            let cfg = ManagerConfig::new(self.policy(), self.dir.join("state"));
            match Manager::start(Arc::new(self.backend.clone()), Arc::new(self.backend.clone()), cfg) {
                Ok(m) => return m,
                Err(e) if e.kind() == io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("starting the manager: {e}"),
            }
        }
    }

    /// Guest `id` named `name`, its sockets managed.
    fn guest(&self, id: DomId, name: &str) -> Arc<Managed<SimBackend>> {
        let b = SimBackend::boot_named(self.sim(), Some(id), name).unwrap();
        let d = VsockDomain::start(b, config(LinkSetUp::Introduced)).unwrap();
        Arc::new(Managed::start(d, DomId::DOM0))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(set_up: LinkSetUp) -> VsockConfig {
    VsockConfig { set_up, link_timeout: Duration::from_secs(5), ..VsockConfig::default() }
}

async fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + LIVENESS;
    while !f() {
        assert!(Instant::now() < deadline, "{what} did not happen within {LIVENESS:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn registered(m: &Manager, doms: &[DomId]) {
    until("registration", || m.registered() == doms).await;
}

/// Echoes every connection on `port` of `d`.
fn echo(d: &Arc<Managed<SimBackend>>, port: u32) -> tokio::task::JoinHandle<()> {
    let mut l = d.listen(port).unwrap();
    tokio::spawn(async move {
        while let Ok(mut s) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 << 10];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    })
}

async fn round_trip(s: &mut dombus_transport_xen::vsock::mux::VsockStream, len: usize) -> io::Result<()> {
    let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(s);
    let writer = async { w.write_all(&data).await };
    let mut got = vec![0u8; len];
    let reader = async { r.read_exact(&mut got).await.map(|_| ()) };
    let (a, b) = tokio::join!(writer, reader);
    a?;
    b?;
    assert!(got == data, "echo differs");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_are_denied_by_default_then_introduced_and_linked_directly() {
    let host = Host::new("intro", "* @toolstack * allow\n");
    let m = host.manager().await;
    let admin = m.admin();
    let a = host.guest(ALPHA, "alpha");
    let b = host.guest(BETA, "beta");
    registered(&m, &[ALPHA, BETA]).await;
    let _echo = echo(&b, 5000);

    // Default deny, with a decision the toolstack looks up.
    let e = a.connect(VsockAddr::new(4, 5000), Some(Duration::from_secs(2))).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    let id = denied(&e).unwrap_or_else(|| panic!("not a denial: {e}"));
    let r = admin.decision(id).await.unwrap();
    assert_eq!((r.source.name.as_str(), r.source.domid, r.target.domid), ("alpha", 3, Some(4)));
    assert_eq!((r.result, r.rule, r.port), (dombus_manager::audit::Verdict::Deny, None, 5000));
    // A domain that does not exist, by id or by name: the same error, another decision.
    for e in [
        a.connect(VsockAddr::new(9, 5000), Some(Duration::from_secs(2))).await.unwrap_err(),
        a.connect_name("nosuch", 5000, Some(Duration::from_secs(2))).await.unwrap_err(),
        a.connect_name("beta", 5000, Some(Duration::from_secs(2))).await.unwrap_err(),
    ] {
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        let other = denied(&e).unwrap_or_else(|| panic!("not a denial: {e}"));
        assert!(other > id);
        assert_eq!(
            e.to_string().replace(&other.to_string(), "N"),
            e.to_string().replace(&other.to_string(), "N")
        );
    }
    assert!(!a.links().iter().any(|(d, _)| *d == BETA), "a link before any introduction");

    // The toolstack allows it; the link is direct and the manager carries none of its data.
    admin.add("5000 alpha beta allow".into(), None, None).await.unwrap();
    let before = m.bytes_received();
    let mut s = a.connect(VsockAddr::new(4, 5000), Some(Duration::from_secs(5))).await.unwrap();
    assert_eq!(s.peer_domain(), BETA);
    round_trip(&mut s, 1 << 20).await.unwrap();
    let carried = m.bytes_received() - before;
    assert!(carried < 4096, "the manager received {carried} bytes while 1 MiB moved");
    assert!(a.links().contains(&(BETA, 1)), "{:?}", a.links());
    assert!(b.links().contains(&(ALPHA, 1)), "{:?}", b.links());
    // By name too, on the same link.
    let mut by_name = a.connect_name("beta", 5000, Some(Duration::from_secs(5))).await.unwrap();
    round_trip(&mut by_name, 10).await.unwrap();
    assert!(a.links().contains(&(BETA, 2)), "{:?}", a.links());

    // A port the policy does not allow, on the linked pair: denied.
    let e = a.connect(VsockAddr::new(4, 5001), None).await.unwrap_err();
    assert!(denied(&e).is_some(), "{e}");
    // Allowed but nobody listens: refused (not denied); waiting for a listener: timed out.
    admin.add("5001 alpha beta allow".into(), None, None).await.unwrap();
    let e = a.connect(VsockAddr::new(4, 5001), None).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
    assert!(denied(&e).is_none());
    let e = a.connect(VsockAddr::new(4, 5001), Some(Duration::from_millis(300))).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");

    // The audit trail holds every decision, with the deciding rule.
    let trail = admin.audit(Some(100)).await.unwrap();
    let allowed =
        trail.iter().find(|r| r.result == dombus_manager::audit::Verdict::Allow && r.port == 5000).unwrap();
    assert_eq!(allowed.rule.as_deref(), Some("50-admin.policy:1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_bypassing_its_agent_is_refused_by_the_target() {
    let host = Host::new("bypass", "5000 alpha beta allow\n");
    let m = host.manager().await;
    let a = host.guest(ALPHA, "alpha");
    let b = host.guest(BETA, "beta");
    registered(&m, &[ALPHA, BETA]).await;
    let _echo = echo(&b, 5000);
    let mut l = b.listen(5002).unwrap();
    let mut s = a.connect(VsockAddr::new(4, 5000), Some(Duration::from_secs(5))).await.unwrap();
    round_trip(&mut s, 10).await.unwrap();
    // Straight on the link, past the manager: the target's gate refuses it.
    let mut rogue = a.domain().connect(VsockAddr::new(4, 5002)).await.unwrap();
    let mut buf = [0u8; 1];
    let r = tokio::time::timeout(LIVENESS, rogue.read(&mut buf)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    let accepted = tokio::time::timeout(Duration::from_millis(500), l.accept()).await;
    assert!(accepted.is_err(), "the listener got a connection the policy denies");
    // The allowed connection goes on.
    round_trip(&mut s, 10).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_links_and_rendezvous_are_refused() {
    let host = Host::new("forged", "* @toolstack * allow\n");
    let m = host.manager().await;
    let a = host.guest(ALPHA, "alpha");
    registered(&m, &[ALPHA]).await;
    let _echo = echo(&a, 5000);
    // A hostile domain that sets up links the old way, on its own.
    let hb = SimBackend::boot_named(host.sim(), Some(DomId(5)), "hostile").unwrap();
    let h = VsockDomain::start(hb.clone(), config(LinkSetUp::Open)).unwrap();
    let e = h.connect(VsockAddr::new(3, 5000)).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert!(!a.links().iter().any(|(d, _)| *d == DomId(5)), "{:?}", a.links());
    // It cannot make a rendezvous where the manager makes them.
    let store = hb.store();
    let under_backend = "/local/domain/0/data/dombus/rendezvous/77";
    assert!(store.mkdir(under_backend).is_err(), "a guest wrote under the backend's home");
    // One of its own, given to the victim as if introduced: refused.
    let own = "/local/domain/5/data/dombus/rendezvous/77";
    store.mkdir(own).unwrap();
    let perms = [
        Perm { domid: DomId(5), kind: PermKind::None },
        Perm { domid: ALPHA, kind: PermKind::Both },
        Perm { domid: DomId(5), kind: PermKind::Both },
    ];
    store.set_perms(own, &perms).unwrap();
    let e = a.domain().introduce(DomId(5), own).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    // Even at the right place, a directory the backend did not make is refused.
    let e = a.domain().introduce(DomId(5), under_backend).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    assert!(!a.links().iter().any(|(d, _)| *d == DomId(5)), "{:?}", a.links());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_service_refuses_guests() {
    use dombus_manager::PolicyAdminClient;
    let host = Host::new("admin", "* @toolstack * allow\n");
    let m = host.manager().await;
    let server = dombus::Server::new(
        dombus::Net::new().with_domain(m.sockets(), None),
        dombus::ServerConfig::default(),
    );
    let addr: dombus::Address = "xen:backend:1".parse().unwrap();
    let _h = server.serve(&addr, m.admin().into_service()).await.unwrap();
    let a = host.guest(ALPHA, "alpha");
    registered(&m, &[ALPHA]).await;
    let net = dombus::Net::new().with_domain(a.clone(), None);
    // The policy does not let the guest reach the port.
    let Err(e) = PolicyAdminClient::connect(net.clone(), addr.clone()).await else { panic!("connected") };
    assert!(e.to_string().contains("refused by the host's connection manager"), "{e}");
    // Where it does, the service itself refuses a caller that is not the toolstack.
    m.admin().add("1 alpha @backend allow".into(), None, None).await.unwrap();
    let client = PolicyAdminClient::connect(net, addr).await.unwrap();
    let r = client.rules(tarpc::context::current()).await.unwrap();
    assert_eq!(r, Err(AdminError::NotToolstack { caller: 3 }));
    let r = client.add(tarpc::context::current(), "* alpha * allow".into(), None, None).await.unwrap();
    assert_eq!(r, Err(AdminError::NotToolstack { caller: 3 }));
    // Nor may it watch: the refusal ends its subscription.
    use futures::StreamExt;
    let mut watch = client.watch(None, false);
    let first = tokio::time::timeout(LIVENESS, watch.next()).await.unwrap();
    let Some(Err(e)) = first else { panic!("a guest watches the manager: {first:?}") };
    assert!(dombus::rpc::events::is_final(&e), "{e}");
    let tarpc::client::RpcError::Server(refusal) = &e else { panic!("not a refusal: {e}") };
    assert_eq!(refusal.kind, io::ErrorKind::PermissionDenied, "{refusal:?}");
    assert!(refusal.detail.contains("only the toolstack"), "{refusal:?}");
    assert!(tokio::time::timeout(LIVENESS, watch.next()).await.unwrap().is_none());
}

/// The admin service of `m` served on a local socket of the test's (where callers are the
/// backend domain's own processes), and a client of it.
async fn admin_client(
    host: &Host,
    m: &Manager,
) -> (dombus::Server, dombus_manager::PolicyAdminClient, dombus::rpc::ServeHandle) {
    let server = dombus::Server::new(dombus::Net::new(), dombus::ServerConfig::default());
    let addr: dombus::Address = format!("unix:{}", host.dir.join("admin.sock").display()).parse().unwrap();
    let serving = server.serve(&addr, m.admin().into_service()).await.unwrap();
    let client = dombus_manager::PolicyAdminClient::connect(dombus::Net::new(), addr).await.unwrap();
    (server, client, serving)
}

type Watch = dombus::Subscription<ManagerEvent, WatchState>;

/// The next event of `watch` that `pick` takes (skipping the others, and failing on a resync
/// or an error: a watcher that keeps up sees every event).
async fn next_event<R>(watch: &mut Watch, what: &str, mut pick: impl FnMut(&ManagerEvent) -> Option<R>) -> R {
    use futures::StreamExt;
    let deadline = tokio::time::Instant::now() + LIVENESS;
    loop {
        let update = tokio::time::timeout_at(deadline, watch.next())
            .await
            .unwrap_or_else(|_| panic!("{what} did not come within {LIVENESS:?}"));
        match update {
            Some(Ok(dombus::Update::Event { event, .. })) => {
                if let Some(r) = pick(&event) {
                    return r;
                }
            }
            other => panic!("waiting for {what}: {other:?}"),
        }
    }
}

/// The state a new watch starts with.
async fn started(watch: &mut Watch) -> WatchState {
    use futures::StreamExt;
    match tokio::time::timeout(LIVENESS, watch.next()).await.unwrap() {
        Some(Ok(dombus::Update::Resync {
            reason: dombus::ResyncReason::Start, snapshot: Some(s), ..
        })) => s,
        other => panic!("a watch starts with the state: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watcher_sees_domains_come_and_go_denials_and_introductions() {
    let host = Host::new("watch", "* @toolstack * allow\n");
    let m = host.manager().await;
    m.admin().label("alpha".into(), Some("guest".into()), vec!["blue".into()]).await.unwrap();
    let a = host.guest(ALPHA, "alpha");
    registered(&m, &[ALPHA]).await;
    let (_server, client, _serving) = admin_client(&host, &m).await;

    // A new watch starts with the domains registered now.
    let mut all = client.watch(None, false);
    let state = started(&mut all).await;
    let alpha = WatchedDomain {
        domid: 3,
        name: Some("alpha".into()),
        labels: Labels { type_: Some("guest".into()), tags: vec!["blue".into()] },
    };
    assert!(state.domains.contains(&alpha), "{state:?}");
    assert!(state.domains.iter().any(|d| d.domid == 0), "the backend domain: {state:?}");
    // Narrowed to alpha's denials: its state is alpha alone.
    let mut denials = client.watch(Some("alpha".into()), true);
    assert_eq!(started(&mut denials).await.domains, [alpha]);

    // A guest registers.
    let b = host.guest(BETA, "beta");
    let _echo = echo(&b, 5000);
    let seen = next_event(&mut all, "beta registering", |e| match e {
        ManagerEvent::DomainRegistered { domid: 4, name, .. } => Some(name.clone()),
        _ => None,
    })
    .await;
    assert_eq!(seen.as_deref(), Some("beta"));

    // A denial, with the id the caller's error carries: the narrowed watch's first event.
    let e = a.connect(VsockAddr::new(4, 5000), Some(Duration::from_secs(2))).await.unwrap_err();
    let id = denied(&e).unwrap_or_else(|| panic!("not a denial: {e}"));
    let record = next_event(&mut all, "the denial", |e| match e {
        ManagerEvent::Denied(r) => Some(r.clone()),
        _ => None,
    })
    .await;
    assert_eq!(
        (record.decision, record.source.domid, record.target.domid, record.port),
        (id, 3, Some(4), 5000)
    );
    let first = next_event(&mut denials, "the denial, narrowed", |e| Some(e.clone())).await;
    assert!(matches!(&first, ManagerEvent::Denied(r) if r.decision == id), "{first:?}");

    // The toolstack adds a rule: the policy reloads, and the connection is allowed and
    // introduced under one decision.
    client.add(tarpc::context::current(), "5000 alpha beta allow".into(), None, None).await.unwrap().unwrap();
    next_event(&mut all, "the policy reloading", |e| {
        matches!(e, ManagerEvent::PolicyReloaded { files, .. } if files.iter().any(|f| f == "50-admin.policy"))
            .then_some(())
    })
    .await;
    let _s = a.connect(VsockAddr::new(4, 5000), Some(Duration::from_secs(5))).await.unwrap();
    let allowed = next_event(&mut all, "the allowing decision", |e| match e {
        ManagerEvent::Allowed(r) if r.source.domid == 3 => Some(r.decision),
        _ => None,
    })
    .await;
    let (decision, source, target, port) = next_event(&mut all, "the introduction", |e| match e {
        ManagerEvent::Introduced { decision, source, target, port, .. } => {
            Some((*decision, source.name.clone(), target.name.clone(), *port))
        }
        _ => None,
    })
    .await;
    assert_eq!((decision, source.as_str(), target.as_str(), port), (allowed, "alpha", "beta", 5000));

    // A guest goes away.
    let c = host.guest(DomId(5), "gamma");
    registered(&m, &[ALPHA, BETA, DomId(5)]).await;
    drop(c);
    let gone = next_event(&mut all, "gamma going", |e| match e {
        ManagerEvent::DomainGone { domid: 5, name } => Some(name.clone()),
        _ => None,
    })
    .await;
    assert_eq!(gone.as_deref(), Some("gamma"));
    // The narrowed watch saw nothing else (an allowed decision is not a denial).
    let more = tokio::time::timeout(Duration::from_millis(300), futures::StreamExt::next(&mut denials)).await;
    assert!(more.is_err(), "{more:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_rule_with_teardown_revokes_its_connections_and_links() {
    let host = Host::new("revoke", "* @toolstack * allow\n");
    let m = host.manager().await;
    let admin = m.admin();
    let a = host.guest(ALPHA, "alpha");
    let b = host.guest(BETA, "beta");
    registered(&m, &[ALPHA, BETA]).await;
    let _echo = echo(&b, 5000);
    let rule = admin.add("5000 alpha beta allow".into(), None, None).await.unwrap();
    let mut s = a.connect(VsockAddr::new(4, 5000), Some(Duration::from_secs(5))).await.unwrap();
    round_trip(&mut s, 10).await.unwrap();
    // Without teardown, what was allowed goes on.
    let (file, line) = rule.at.rsplit_once(':').unwrap();
    let r = admin.remove(file.into(), line.parse().unwrap(), false).await.unwrap();
    assert_eq!((r.connections_revoked, r.links_ended), (0, 0));
    round_trip(&mut s, 10).await.unwrap();
    // Allowed again, then removed with teardown: the connection and the link end.
    let rule = admin.add("5000 alpha beta allow".into(), None, None).await.unwrap();
    let (file, line) = rule.at.rsplit_once(':').unwrap();
    let r = admin.remove(file.into(), line.parse().unwrap(), true).await.unwrap();
    assert_eq!((r.connections_revoked, r.links_ended), (1, 1));
    let broke = tokio::time::timeout(LIVENESS, async {
        loop {
            if round_trip(&mut s, 10).await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(broke.is_ok(), "the revoked connection still works");
    until("the link to end", || !a.links().iter().any(|(d, _)| *d == BETA)).await;
    until("the link to end at the peer", || !b.links().iter().any(|(d, _)| *d == ALPHA)).await;
    let e = a.connect(VsockAddr::new(4, 5000), Some(Duration::from_secs(2))).await.unwrap_err();
    assert!(denied(&e).is_some(), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_policy_file_keeps_the_last_good_policy() {
    let host = Host::new("bad", "5000 alpha beta allow\n");
    let m = host.manager().await;
    let admin = m.admin();
    let a = host.guest(ALPHA, "alpha");
    let b = host.guest(BETA, "beta");
    registered(&m, &[ALPHA, BETA]).await;
    let _echo = echo(&b, 5000);
    std::fs::write(host.policy().join("10-bad.policy"), "* * * allow\n5000 alpha beta maybe\n").unwrap();
    assert!(!m.reload());
    let st = admin.status().await.unwrap();
    let error = st.policy_error.unwrap_or_default();
    assert!(error.contains("10-bad.policy:2:"), "{error}");
    assert_eq!(st.rules, 1, "the last good policy stays in force");
    // Still what the good policy says: allowed, and nothing more.
    let mut s = a.connect(VsockAddr::new(4, 5000), Some(Duration::from_secs(5))).await.unwrap();
    round_trip(&mut s, 10).await.unwrap();
    assert!(denied(&a.connect(VsockAddr::new(4, 6000), None).await.unwrap_err()).is_some());
    // An edit through the service that would leave the directory invalid is refused.
    assert!(matches!(admin.add("6000 alpha beta".into(), None, None).await, Err(AdminError::Invalid(_))));
    std::fs::remove_file(host.policy().join("10-bad.policy")).unwrap();
    assert!(m.reload());
    assert_eq!(admin.status().await.unwrap().policy_error, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manager_restarting() {
    let host = Host::new("restart", "5000 alpha @tag:svc allow\n5001 alpha @tag:svc allow\n");
    let m = host.manager().await;
    m.admin().label("beta".into(), Some("service-domain".into()), vec!["svc".into()]).await.unwrap();
    let a = host.guest(ALPHA, "alpha");
    let b = host.guest(BETA, "beta");
    registered(&m, &[ALPHA, BETA]).await;
    let _echo = echo(&b, 5000);
    let _echo1 = echo(&b, 5001);
    let mut s = a.connect(VsockAddr::new(4, 5000), Some(Duration::from_secs(5))).await.unwrap();
    round_trip(&mut s, 10).await.unwrap();

    drop(m);
    until("the agents to notice", || !a.registered() && !b.registered()).await;
    // Existing links and connections keep working.
    round_trip(&mut s, 64 << 10).await.unwrap();
    // A connection that needs a decision waits up to its deadline, then fails clearly.
    let t = Instant::now();
    let e = a.connect(VsockAddr::new(4, 5001), Some(Duration::from_millis(500))).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    assert!(e.to_string().contains("connection manager"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));

    // Back: the agents register again; rules and labels survived.
    let m = host.manager().await;
    registered(&m, &[ALPHA, BETA]).await;
    let domains = m.admin().domains().await.unwrap();
    let beta = domains.iter().find(|d| d.name.as_deref() == Some("beta")).unwrap();
    assert_eq!((beta.type_.as_deref(), &beta.tags[..]), (Some("service-domain"), &["svc".to_string()][..]));
    let mut s1 = a.connect(VsockAddr::new(4, 5001), Some(Duration::from_secs(5))).await.unwrap();
    round_trip(&mut s1, 10).await.unwrap();
    round_trip(&mut s, 10).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_one_port_resets_its_connections_and_keeps_the_link() {
    let host = Host::new("revoke-port", "* @toolstack * allow\n5001 alpha beta allow\n");
    let m = host.manager().await;
    let admin = m.admin();
    let a = host.guest(ALPHA, "alpha");
    let b = host.guest(BETA, "beta");
    registered(&m, &[ALPHA, BETA]).await;
    let (_e0, _e1) = (echo(&b, 5000), echo(&b, 5001));
    // dom0 (the toolstack) calls beta over the backend link too.
    let own = m.sockets();
    let mut from_dom0 = own.connect(VsockAddr::new(4, 5000), Some(Duration::from_secs(5))).await.unwrap();
    round_trip(&mut from_dom0, 10).await.unwrap();
    let rule = admin.add("5000 alpha beta allow".into(), None, None).await.unwrap();
    let mut revoked = a.connect(VsockAddr::new(4, 5000), Some(Duration::from_secs(5))).await.unwrap();
    let mut kept = a.connect(VsockAddr::new(4, 5001), Some(Duration::from_secs(5))).await.unwrap();
    round_trip(&mut revoked, 10).await.unwrap();
    round_trip(&mut kept, 10).await.unwrap();
    let (file, line) = rule.at.rsplit_once(':').unwrap();
    let r = admin.remove(file.into(), line.parse().unwrap(), true).await.unwrap();
    assert_eq!((r.connections_revoked, r.links_ended), (1, 0));
    let broke =
        tokio::time::timeout(LIVENESS, async { while round_trip(&mut revoked, 10).await.is_ok() {} }).await;
    assert!(broke.is_ok(), "the revoked connection still works");
    // The other port's connection and the link stay; so does the toolstack's.
    round_trip(&mut kept, 64 << 10).await.unwrap();
    round_trip(&mut from_dom0, 10).await.unwrap();
    assert!(a.links().iter().any(|(d, _)| *d == BETA), "{:?}", a.links());
    // A rule the toolstack relies on, removed with teardown: its connection over the backend
    // link is reset at both ends.
    std::fs::write(host.policy().join("90-test.policy"), "5001 alpha beta allow\n").unwrap();
    assert!(m.reload());
    let r = admin.remove("90-test.policy".into(), 1, true).await.unwrap();
    assert_eq!(r.links_ended, 1);
    let broke =
        tokio::time::timeout(LIVENESS, async { while round_trip(&mut from_dom0, 10).await.is_ok() {} }).await;
    assert!(broke.is_ok(), "the toolstack's revoked connection still works");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_is_cut_off_and_rate_limited_and_others_go_on() {
    use dombus_agent::manager::{
        Answer, Call, FromManager, Peer, ToManager, VERSION, read_message, write_message,
    };
    let host = Host::new("hostile", "* @toolstack * allow\n5000 alpha beta allow\n");
    let m = host.manager().await;
    let a = host.guest(ALPHA, "alpha");
    let b = host.guest(BETA, "beta");
    registered(&m, &[ALPHA, BETA]).await;
    let _echo = echo(&b, 5000);
    // A hostile domain speaks to the manager directly, past any agent.
    let hb = SimBackend::boot_named(host.sim(), Some(DomId(5)), "hostile").unwrap();
    let h = VsockDomain::start(hb, config(LinkSetUp::Introduced)).unwrap();
    let manager =
        VsockAddr::new(dombus_transport_xen::vsock::CID_BACKEND, dombus_agent::manager::MANAGER_PORT);
    let ends = |mut s: dombus_transport_xen::vsock::mux::VsockStream| async move {
        let mut buf = [0u8; 64];
        let r = tokio::time::timeout(LIVENESS, async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(r.is_ok(), "the manager kept a bad session open");
    };
    // Garbage, a length past the bound, a call before the hello, a second hello: each session
    // ends.
    let mut s = h.connect(manager).await.unwrap();
    s.write_all(&[0xff; 64]).await.unwrap();
    ends(s).await;
    let mut s = h.connect(manager).await.unwrap();
    s.write_all(&(u32::MAX).to_le_bytes()).await.unwrap();
    ends(s).await;
    let mut s = h.connect(manager).await.unwrap();
    write_message(&mut s, &ToManager::Call { id: 1, call: Call::Check { source: 3, port: 1 } })
        .await
        .unwrap();
    ends(s).await;
    let mut s = h.connect(manager).await.unwrap();
    write_message(&mut s, &ToManager::Hello { version: VERSION }).await.unwrap();
    let w: FromManager = read_message(&mut s).await.unwrap().unwrap();
    assert!(matches!(w, FromManager::Welcome { domid: 5, .. }), "{w:?}");
    write_message(&mut s, &ToManager::Hello { version: VERSION }).await.unwrap();
    ends(s).await;
    // A flood of decisions: past the budget, answered without a decision (and not audited).
    let before = m.admin().status().await.unwrap().decisions;
    let mut s = h.connect(manager).await.unwrap();
    write_message(&mut s, &ToManager::Hello { version: VERSION }).await.unwrap();
    let _: Option<FromManager> = read_message(&mut s).await.unwrap();
    let n = 2000u32;
    for id in 1..=n {
        let call = Call::Introduce { target: Peer::Name("beta".into()), port: 5000, link: false };
        write_message(&mut s, &ToManager::Call { id, call }).await.unwrap();
    }
    let (mut denied_n, mut limited) = (0, 0);
    while denied_n + limited < n {
        match read_message::<_, FromManager>(&mut s).await.unwrap().unwrap() {
            FromManager::Reply { answer: Answer::Denied { .. }, .. } => denied_n += 1,
            FromManager::Reply { answer: Answer::Failed { reason }, .. } => {
                assert!(reason.contains("decisions a second"), "{reason}");
                limited += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(limited > 0 && denied_n >= 1, "{denied_n} decided, {limited} limited");
    let made = m.admin().status().await.unwrap().decisions - before;
    assert!(made < u64::from(n) / 2, "{made} decisions made for {n} calls");
    // The others go on.
    let mut c = a.connect(VsockAddr::new(4, 5000), Some(Duration::from_secs(5))).await.unwrap();
    round_trip(&mut c, 10).await.unwrap();
}
