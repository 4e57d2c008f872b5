//! What a hostile domain can make another domain do, bounded: link set-up requests.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{LIVENESS, Scratch, parked_on_watch};
use dombus_sim::{SimBackend, SimHypervisor};
use dombus_tools::diag;
use dombus_transport_xen::backend::{Backend, MAX_QUEUED_EVENTS, Perm, PermKind, Store, publish};
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::VsockAddr;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Writes domain `from`'s request for a link to `to` `times` times, as a hostile domain would in a
/// loop (the first write publishes it readable by `to`).
fn flood_requests(from: &SimBackend, to: DomId, times: usize) {
    let path = format!("/local/domain/{}/data/dombus/want/{}", from.domid().0, to.0);
    let perms =
        [Perm { domid: from.domid(), kind: PermKind::None }, Perm { domid: to, kind: PermKind::Read }];
    publish(from.store(), &path, b"1", &perms).unwrap();
    for i in 0..times {
        from.store().write(&path, i.to_string().as_bytes()).unwrap();
    }
}

fn config(link_timeout: Duration) -> VsockConfig {
    VsockConfig { link_timeout, ..VsockConfig::default() }
}

async fn echo_once(d: &VsockDomain<SimBackend>, to: VsockAddr) {
    let mut s = tokio::time::timeout(LIVENESS, d.connect(to)).await.unwrap().unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(LIVENESS, s.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"ping");
}

/// A higher domain rewriting its link request in a loop costs the lower domain one set-up at a
/// time, not a task per write; another domain's link comes up meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_link_requests_costs_one_set_up() {
    let dir = Scratch::new("hostile-requests");
    let sock = dir.path("hv.sock");
    let _hv = SimHypervisor::spawn(&sock).unwrap();
    let victim_backend = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    // The hostile domain never joins: its set-up waits out the whole link timeout.
    let victim = VsockDomain::start(victim_backend.clone(), config(LIVENESS * 2)).unwrap();
    let mut listener = victim.listen(5000).unwrap();
    tokio::spawn(async move {
        while let Ok(mut s) = listener.accept().await {
            tokio::spawn(async move {
                let _ = diag::echo(&mut s).await;
            });
        }
    });
    parked_on_watch(&victim_backend, "/local/domain").await;

    let hostile = SimBackend::boot(&sock, Some(DomId(9))).unwrap();
    let writes = 20_000;
    tokio::task::spawn_blocking(move || flood_requests(&hostile, DomId(1), writes)).await.unwrap();
    let friend =
        VsockDomain::start(SimBackend::boot(&sock, Some(DomId(8))).unwrap(), config(LIVENESS)).unwrap();
    echo_once(&friend, VsockAddr::new(1, 5000)).await;
    parked_on_watch(&victim_backend, "/local/domain").await;
    let attempts = victim.setup_attempts();
    assert!(
        attempts <= 3,
        "{writes} requests from domain 9 and one from domain 8 made domain 1 attempt {attempts} set-ups"
    );
}

/// When a flood makes the lower domain's watch queue collapse, a request that was queued before
/// it is not lost: the domain reads every request again.
#[test]
fn a_request_drowned_in_a_flood_is_still_served() {
    let dir = Scratch::new("hostile-drowned");
    let sock = dir.path("hv.sock");
    let _hv = SimHypervisor::spawn(&sock).unwrap();
    let victim_backend = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    // The victim's runtime is not driven until the flood is over, so its watch queue fills.
    let victim_rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (victim, mut listener) = victim_rt.block_on(async {
        let victim = VsockDomain::start(victim_backend.clone(), config(LIVENESS * 2)).unwrap();
        let listener = victim.listen(5000).unwrap();
        (victim, listener)
    });
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let friend = rt.block_on(async {
        VsockDomain::start(SimBackend::boot(&sock, Some(DomId(8))).unwrap(), config(LIVENESS)).unwrap()
    });
    let friend_call = {
        let friend = friend.clone();
        rt.spawn(async move { echo_once(&friend, VsockAddr::new(1, 5000)).await })
    };
    // The friend's request is queued at the victim; then the flood buries it.
    rt.block_on(async {
        let want = "/local/domain/8/data/dombus/want/1";
        let deadline = std::time::Instant::now() + LIVENESS;
        while victim_backend.store().read(want).is_err() {
            assert!(std::time::Instant::now() < deadline, "domain 8 never asked for a link");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    let hostile = SimBackend::boot(&sock, Some(DomId(9))).unwrap();
    flood_requests(&hostile, DomId(1), 2 * MAX_QUEUED_EVENTS);
    // A request of the victim's own: every event caused before it has arrived when it returns.
    victim_backend.store().read("/local/domain/1/domid").unwrap();
    assert!(victim_backend.watch_collapses() >= 1, "the flood did not collapse the watch queue");
    let queued: usize = victim_backend.watches().iter().map(|(_, n)| n).sum();
    assert!(queued <= MAX_QUEUED_EVENTS + 1, "{queued} events queued");

    let observer = victim.clone();
    let served = std::thread::spawn(move || {
        victim_rt.block_on(async move {
            let _victim = victim;
            while let Ok(mut s) = listener.accept().await {
                tokio::spawn(async move {
                    let _ = diag::echo(&mut s).await;
                });
            }
        })
    });
    rt.block_on(async { tokio::time::timeout(LIVENESS, friend_call).await.unwrap().unwrap() });
    // The flooder's own request, collapsed into one event for its domain, was read again too.
    let deadline = std::time::Instant::now() + LIVENESS;
    while observer.setup_attempts() < 2 {
        assert!(std::time::Instant::now() < deadline, "domain 9's collapsed request was never read again");
        std::thread::sleep(Duration::from_millis(5));
    }
    drop(served);
}

/// No process picks its own domain id: it needs the toolstack key (domain 0) or a one-time token
/// the toolstack got by creating the domain; tokens cannot be reused, forged or moved to
/// another id; the socket and key are the owner's only.
#[test]
fn a_domain_id_cannot_be_claimed() {
    use std::os::unix::fs::PermissionsExt;
    let dir = Scratch::new("hostile-identity");
    let sock = dir.path("hv.sock");
    let _hv = SimHypervisor::spawn(&sock).unwrap();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o600, "socket mode");
    assert_eq!(mode(&SimHypervisor::key_path(&sock)), 0o600, "key mode");
    let denied = |r: Result<SimBackend, dombus_transport_xen::backend::BackendError>| match r {
        Err(dombus_transport_xen::backend::BackendError::PermissionDenied(_)) => {}
        other => panic!("expected PermissionDenied, got {other:?}"),
    };
    // Nothing, or anything made up, attaches as nobody.
    denied(SimBackend::attach(&sock, ""));
    denied(SimBackend::attach(&sock, &format!("toolstack-{}", "0".repeat(64))));
    denied(SimBackend::attach(&sock, &format!("5-{}", "a".repeat(64))));

    let (five, token5) = SimBackend::create_domain(&sock, Some(DomId(5)), "five").unwrap();
    assert_eq!(five, DomId(5));
    let (_, token6) = SimBackend::create_domain(&sock, Some(DomId(6)), "six").unwrap();
    // Domain 6's secret does not make domain 5's token, and domain 0 cannot be created.
    let secret6 = token6.split_once('-').unwrap().1;
    denied(SimBackend::attach(&sock, &format!("5-{secret6}")));
    assert!(SimBackend::create_domain(&sock, Some(DomId(0)), "zero").is_err());
    // The token attaches its domain once, with the name the toolstack gave it.
    let d5 = SimBackend::attach(&sock, &token5).unwrap();
    assert_eq!(d5.domid(), DomId(5));
    assert_eq!(d5.store().read("/local/domain/5/name").unwrap(), b"five");
    denied(SimBackend::attach(&sock, &token5));
    // A service that exits cannot be replaced by whoever asks first: its token is spent.
    drop(d5);
    denied(SimBackend::attach(&sock, &token5));
    // A process started for a domain attaches with its token only as that domain.
    assert!(SimBackend::attach_from_env(&sock, DomId(7)).is_err());
    // The toolstack (the key's reader) is domain 0, and may create domain 5 again.
    let ts = SimBackend::toolstack(&sock).unwrap();
    assert_eq!(ts.domid(), DomId(0));
    let (_, again) = SimBackend::create_domain(&sock, Some(DomId(5)), "five").unwrap();
    assert_eq!(SimBackend::attach(&sock, &again).unwrap().domid(), DomId(5));
}
