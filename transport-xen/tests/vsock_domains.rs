//! Virtual sockets between any two of several domains (in-process simulated hypervisor).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::{LIVENESS, Scratch, parked_on_watch};
use dombus_sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_tools::diag;
use dombus_transport_xen::backend::{Backend, Store};
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::VsockAddr;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use dombus_transport_xen::vsock::mux::VsockStream;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

fn hv(tag: &str) -> (Scratch, SimHypervisorHandle, std::path::PathBuf) {
    let dir = Scratch::new(tag);
    let sock = dir.path("hv.sock");
    let hv = SimHypervisor::spawn(&sock).unwrap();
    (dir, hv, sock)
}

fn domain(sock: &std::path::Path, id: u16) -> VsockDomain<SimBackend> {
    VsockDomain::start(SimBackend::boot(sock, Some(DomId(id))).unwrap(), VsockConfig::default()).unwrap()
}

async fn echo_service(d: &VsockDomain<SimBackend>, port: u32) -> tokio::task::JoinHandle<()> {
    let mut l = d.listen(port).unwrap();
    tokio::spawn(async move {
        while let Ok(mut s) = l.accept().await {
            tokio::spawn(async move {
                let _ = diag::echo(&mut s).await;
            });
        }
    })
}

async fn roundtrip(d: &VsockDomain<SimBackend>, to: VsockAddr, msg: &[u8]) {
    let mut s = tokio::time::timeout(T, d.connect(to)).await.unwrap().unwrap();
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(T, s.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, msg);
}

#[tokio::test]
async fn three_domains_connect_in_every_direction() {
    let (_dir, _hv, sock) = hv("vsock-three");
    let doms = [domain(&sock, 1), domain(&sock, 2), domain(&sock, 3)];
    let mut services = Vec::new();
    for d in &doms {
        services.push(echo_service(d, 5000).await);
    }
    // Every ordered pair, several connections each, concurrently: links are set up on demand
    // from whichever side connects first, and shared afterwards.
    let mut calls = Vec::new();
    for (i, from) in doms.iter().enumerate() {
        for (j, to) in doms.iter().enumerate() {
            if i == j {
                continue;
            }
            for k in 0..3u8 {
                let from = from.clone();
                let to = VsockAddr::new(u32::from(to.domid().0), 5000);
                calls.push(tokio::spawn(async move {
                    roundtrip(&from, to, &[k; 1000]).await;
                }));
            }
        }
    }
    for c in calls {
        tokio::time::timeout(T, c).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn refused_and_wrong_addresses_are_clear_errors() {
    let (_dir, _hv, sock) = hv("vsock-refused");
    let (a, b) = (domain(&sock, 1), domain(&sock, 2));
    let err = tokio::time::timeout(T, b.connect(VsockAddr::new(1, 4242))).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let err = b.connect(VsockAddr::new(0x9000, 1)).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    let err = a.listen(80).map(|_| ()).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    let _l = a.listen(6000).unwrap();
    assert_eq!(a.listen(6000).map(|_| ()).unwrap_err().kind(), std::io::ErrorKind::AddrInUse);
}

#[tokio::test]
async fn the_backend_domain_may_use_low_ports_and_is_reachable_as_backend() {
    let (_dir, _hv, sock) = hv("vsock-backend");
    let (d0, d4) = (domain(&sock, 0), domain(&sock, 4));
    let _svc = echo_service(&d0, 1).await;
    roundtrip(&d4, VsockAddr::new(dombus_transport_xen::vsock::CID_BACKEND, 1), b"to the backend").await;
}

#[tokio::test]
async fn a_port_is_free_again_as_soon_as_its_listener_is_dropped() {
    let (_dir, _hv, sock) = hv("vsock-relisten");
    let (a, b) = (domain(&sock, 1), domain(&sock, 2));
    for round in 0..3 {
        // Listening on a domain with a live link: the listener is also registered on that link,
        // through a forwarding task. Dropping it must free the port before that task runs again
        // (this single-threaded runtime does not run it in between).
        let mut l = a.listen(7100).unwrap();
        let mut s = tokio::time::timeout(T, b.connect(VsockAddr::new(1, 7100))).await.unwrap().unwrap();
        let mut got = tokio::time::timeout(T, l.accept()).await.unwrap().unwrap();
        s.write_all(&[round]).await.unwrap();
        let mut byte = [0u8; 1];
        got.read_exact(&mut byte).await.unwrap();
        assert_eq!(byte[0], round);
        drop(l);
        assert!(a.listen(7100).is_ok(), "round {round}: port still taken right after the drop");
    }
}

#[tokio::test]
async fn connect_wait_is_woken_when_the_listener_appears() {
    let (_dir, _hv, sock) = hv("vsock-wait");
    let a = domain(&sock, 1);
    let b_backend = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    let b = VsockDomain::start(b_backend.clone(), VsockConfig::default()).unwrap();
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.connect_wait(VsockAddr::new(1, 7000), T).await })
    };
    // Domain 2 is parked on its watch of the announcement, having found none.
    parked_on_watch(&b_backend, "/local/domain/1/data/dombus/listen/7000").await;
    assert!(!waiting.is_finished());
    // While nothing changes it asks the store nothing: no timed retries. (However long this
    // pause, a watch-driven waiter makes no request; a poller shows in the count.)
    let before = b_backend.requests();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b_backend.requests(), before, "connect_wait asked the store while nothing changed: it polls");
    // The listener's announcement is what wakes it.
    let started = Instant::now();
    let _svc = echo_service(&a, 7000).await;
    let mut s = tokio::time::timeout(T, waiting).await.unwrap().unwrap().unwrap();
    eprintln!("connected {:?} after the listener appeared", started.elapsed());
    s.write_all(b"late").await.unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"late");
    // And a deadline is honoured when nothing ever listens.
    let err = b.connect_wait(VsockAddr::new(1, 7001), Duration::from_millis(200)).await.unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
}

/// Reads from each stream until it ends; the error each ended with (`None`: a clean
/// end-of-stream), and how long the last one took from `since`.
async fn ends(streams: &mut [VsockStream], since: Instant) -> (Vec<Option<std::io::ErrorKind>>, Duration) {
    let mut how = Vec::new();
    for s in streams.iter_mut() {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(LIVENESS, s.read_to_end(&mut rest)).await.unwrap_or_else(|_| {
            panic!(
                "a connection was still open {:?} after its peer domain closed (a liveness limit)",
                LIVENESS
            )
        });
        assert!(rest.is_empty(), "{} unexpected bytes", rest.len());
        how.push(r.err().map(|e| e.kind()));
    }
    (how, since.elapsed())
}

#[tokio::test]
async fn closing_a_domain_ends_its_connections_and_others_live_on() {
    let (_dir, _hv, sock) = hv("vsock-close");
    let (a, b, c) = (domain(&sock, 1), domain(&sock, 2), domain(&sock, 3));
    // Connections between domains 1 and 2 in both directions, each end held; and one from
    // domain 1 to domain 3.
    let mut at_a_listener = a.listen(5000).unwrap();
    let mut at_b_listener = b.listen(6000).unwrap();
    let _svc_c = echo_service(&c, 5000).await;
    let (mut at_a, mut at_b) = (Vec::new(), Vec::new());
    for i in 0..5u8 {
        let mut from_b = tokio::time::timeout(T, b.connect(VsockAddr::new(1, 5000))).await.unwrap().unwrap();
        let mut accepted = tokio::time::timeout(T, at_a_listener.accept()).await.unwrap().unwrap();
        from_b.write_all(&[i]).await.unwrap();
        let mut byte = [0u8; 1];
        tokio::time::timeout(T, accepted.read_exact(&mut byte)).await.unwrap().unwrap();
        assert_eq!(byte[0], i);
        at_a.push(accepted);
        at_b.push(from_b);
    }
    for i in 0..3u8 {
        let mut from_a = tokio::time::timeout(T, a.connect(VsockAddr::new(2, 6000))).await.unwrap().unwrap();
        let mut accepted = tokio::time::timeout(T, at_b_listener.accept()).await.unwrap().unwrap();
        accepted.write_all(&[i]).await.unwrap();
        let mut byte = [0u8; 1];
        tokio::time::timeout(T, from_a.read_exact(&mut byte)).await.unwrap().unwrap();
        assert_eq!(byte[0], i);
        at_a.push(from_a);
        at_b.push(accepted);
    }
    // Domain 2 stops listening first. (Its listener's forwarding task holds the link open until
    // the runtime reaps it; had it been dropped together with everything else, the streams'
    // closes could get out before the link closed, and some of domain 1's connections would end
    // cleanly instead.) The round trip to domain 3 runs the runtime, which reaps that task.
    drop(at_b_listener);
    let mut to_c = tokio::time::timeout(T, a.connect(VsockAddr::new(3, 5000))).await.unwrap().unwrap();
    to_c.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    tokio::time::timeout(T, to_c.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"hello");

    // Domain 2 closes: its streams and its domain (and with them its hypervisor connection) go
    // at once. (A close, not a death: see vsock_multiprocess.rs for a SIGKILL.)
    let closed = Instant::now();
    drop((at_b, b));
    // Every connection domain 1 had with it ends, none is left open: as a lost link (the link
    // closed with the last handle), or cleanly where a stream's own close reached the link
    // before that (a stream writes its close itself when the link has room).
    let (how, took) = ends(&mut at_a, closed).await;
    eprintln!("all {} connections to the closed domain ended {took:?} after the close: {how:?}", how.len());
    assert_eq!(how.len(), 8);
    for h in &how {
        assert!(matches!(h, None | Some(std::io::ErrorKind::ConnectionAborted)), "{how:?}");
    }

    // The connection to domain 3, on another link, goes on; and so do new ones.
    to_c.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    tokio::time::timeout(T, to_c.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"still here");
    roundtrip(&a, VsockAddr::new(3, 5000), b"and a new one").await;
    drop(at_a_listener);
}

/// A guest whose virtual sockets start after the toolstack's domain published a link for it (its
/// agent was restarted while a caller kept trying) joins that link at once: a guest may not list
/// the domains, so it reads the known ones' (the backend's and the privileged) at start rather
/// than wait for an event that came before it watched.
#[tokio::test]
async fn a_guest_starting_late_joins_a_link_the_toolstack_published_already() {
    let (_dir, _hv, sock) = hv("late-guest");
    let dom0 = domain(&sock, 0);
    let guest = SimBackend::boot(&sock, Some(DomId(5))).unwrap();
    let connecting = {
        let dom0 = dom0.clone();
        tokio::spawn(async move { dom0.connect_wait(VsockAddr::new(5, 7000), Duration::from_secs(30)).await })
    };
    // The guest's listener is announced by hand (as a previous run of its agent left it), so
    // that dom0 goes on to publish the link while nothing of the guest's runs yet.
    guest.store().write("/local/domain/5/data/dombus/listen/7000", b"1").unwrap();
    let published = "/local/domain/0/data/dombus/link/5/ring-ref";
    let t = Instant::now();
    while dom0.backend().store().read(published).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "dom0 never published the link");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let since = Instant::now();
    let d5 = VsockDomain::start(guest, VsockConfig::default()).unwrap();
    let _svc = echo_service(&d5, 7000).await;
    let s = tokio::time::timeout(Duration::from_secs(30), connecting).await.expect("connect hung").unwrap();
    assert!(s.is_ok(), "{s:?}");
    assert!(
        since.elapsed() < Duration::from_secs(5),
        "joined only after {:?} (the set-up timed out)",
        since.elapsed()
    );
}
