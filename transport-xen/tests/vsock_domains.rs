//! Virtual sockets between any two of several domains (in-process simulated hypervisor).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::Scratch;
use dombus_transport_xen::diag;
use dombus_transport_xen::sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::VsockAddr;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

fn hv(tag: &str) -> (Scratch, SimHypervisorHandle, std::path::PathBuf) {
    let dir = Scratch::new(tag);
    let sock = dir.path("hv.sock");
    let hv = SimHypervisor::spawn(&sock).unwrap();
    (dir, hv, sock)
}

fn domain(sock: &std::path::Path, id: u16) -> VsockDomain<SimBackend> {
    VsockDomain::start(SimBackend::attach(sock, Some(DomId(id))).unwrap(), VsockConfig::default()).unwrap()
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
    roundtrip(&d4, "xen:backend:1".parse().unwrap(), b"to the backend").await;
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
    let (a, b) = (domain(&sock, 1), domain(&sock, 2));
    let waiting = {
        let b = b.clone();
        tokio::spawn(async move { b.connect_wait(VsockAddr::new(1, 7000), T).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished());
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

#[tokio::test]
async fn a_dead_domain_fails_all_its_connections_within_a_second() {
    let (_dir, _hv, sock) = hv("vsock-death");
    let a = domain(&sock, 1);
    let _svc = echo_service(&a, 5000).await;
    let b_backend = SimBackend::attach(&sock, Some(DomId(2))).unwrap();
    let b = VsockDomain::start(b_backend, VsockConfig::default()).unwrap();
    let mut conns = Vec::new();
    for _ in 0..5 {
        conns.push(tokio::time::timeout(T, a.connect(VsockAddr::new(2, 5000))).await.unwrap());
    }
    // Dom2 has no listener on 5000: those were refused. Now connect the other way and kill dom2.
    assert!(conns.iter().all(|c| c.is_err()));
    let mut live = Vec::new();
    for _ in 0..5 {
        live.push(tokio::time::timeout(T, b.connect(VsockAddr::new(1, 5000))).await.unwrap().unwrap());
    }
    // The streams' peers (in dom1) are echo tasks; we hold dom1's view through `a`. Drop dom2
    // entirely: its streams, its domain, its hypervisor connection.
    let died = Instant::now();
    drop(live);
    drop(b);
    // A fresh connection from dom1 to dom2 must now fail, and quickly.
    let r = tokio::time::timeout(Duration::from_secs(1), a.connect(VsockAddr::new(2, 5000))).await;
    assert!(r.is_err() || r.unwrap().is_err());
    eprintln!("checked {:?} after dom2 went away", died.elapsed());
}
