//! Virtual sockets between domain processes through the `dombus-simxen` daemon: three domains,
//! connections in both directions, refused connects, a stalled reader beside a busy connection
//! on the same link, and the death of a domain.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::{Proc, Scratch, field, link_cmd, simxen};
use dombus_transport_xen::diag;
use dombus_transport_xen::sim::SimBackend;
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::VsockAddr;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_domain_processes_and_the_death_of_one() {
    let dir = Scratch::new("vsock-mp");
    let (mut daemon, sock) = simxen(&dir);
    // Domains 1 and 2 are processes running echo services; this test process is domain 3.
    // Domain 1 also parks every connection to port 5002 without ever reading from it.
    let mut d1 = Proc::spawn(link_cmd(&sock, 1, &["vsock-echo", "--port", "5000", "--park", "5002"]));
    let mut d2 = Proc::spawn(link_cmd(&sock, 2, &["vsock-echo", "--port", "5000"]));
    d1.expect_line("vsock listening", T);
    d2.expect_line("vsock listening", T);
    let me = VsockDomain::start(SimBackend::attach(&sock, Some(DomId(3))).unwrap(), VsockConfig::default())
        .unwrap();

    // The other direction at the same time: domain 4 (a process) opens 4 connections to a
    // service in this domain.
    let mut here = me.listen(6000).unwrap();
    let echo_here = tokio::spawn(async move {
        while let Ok(mut s) = here.accept().await {
            tokio::spawn(async move {
                let _ = diag::echo(&mut s).await;
            });
        }
    });
    let mut pinger = Proc::spawn(link_cmd(
        &sock,
        4,
        &["vsock-ping", "--to", "xen:3:6000", "--conns", "4", "--count", "200"],
    ));

    // From here: 5 connections to each of domains 1 and 2.
    let mut to1 = Vec::new();
    let mut to2 = Vec::new();
    for _ in 0..5 {
        to1.push(tokio::time::timeout(T, me.connect(VsockAddr::new(1, 5000))).await.unwrap().unwrap());
        to2.push(tokio::time::timeout(T, me.connect(VsockAddr::new(2, 5000))).await.unwrap().unwrap());
    }
    for s in to1.iter_mut().chain(to2.iter_mut()) {
        s.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        tokio::time::timeout(T, s.read_exact(&mut b)).await.unwrap().unwrap();
        assert_eq!(&b, b"ping");
    }
    // A reader that never reads: its writer stops at the credit window, and connections to the
    // same domain (the same link) keep flowing.
    let before = diag::ping(&mut to1[0], 64, 10, 200).await.unwrap().unwrap();
    let mut stalled = tokio::time::timeout(T, me.connect(VsockAddr::new(1, 5002))).await.unwrap().unwrap();
    let (sent_tx, mut sent_rx) = tokio::sync::watch::channel(0usize);
    let writer = tokio::spawn(async move {
        let chunk = vec![0u8; 64 << 10];
        for _ in 0..64 {
            if stalled.write_all(&chunk).await.is_err() {
                break;
            }
            sent_tx.send_modify(|n| *n += chunk.len());
        }
    });
    // Wait until the writer is stuck at its window: nothing more is accepted for 200 ms.
    loop {
        if tokio::time::timeout(Duration::from_millis(200), sent_rx.changed()).await.is_err() {
            break;
        }
    }
    let stuck_at = *sent_rx.borrow();
    assert!(!writer.is_finished() && stuck_at < (4 << 20), "4 MiB went to a reader that never reads");
    let beside =
        tokio::time::timeout(T, diag::ping(&mut to1[0], 64, 10, 200)).await.unwrap().unwrap().unwrap();
    assert_eq!(beside.count, 200);
    eprintln!(
        "a writer to a stalled reader stopped after {} KiB; round trips on the same link: {before} before, {beside} beside it",
        stuck_at >> 10
    );
    writer.abort();

    // A port nobody listens on is refused.
    let err = tokio::time::timeout(T, me.connect(VsockAddr::new(2, 5001))).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    let ping = pinger.expect_line("vsock-ping", T);
    assert_eq!(field(&ping, "round_trips"), "800", "{ping}");

    // Domain 2 dies: every connection to it fails within a second; those to domain 1 go on.
    let killed = Instant::now();
    d2.kill();
    for s in to2.iter_mut() {
        let mut b = [0u8; 4];
        let left = Duration::from_secs(1).saturating_sub(killed.elapsed());
        let r = tokio::time::timeout(left, s.read(&mut b)).await;
        let r = r.unwrap_or_else(|_| {
            panic!("a connection to the dead domain was still open after {:?}", killed.elapsed())
        });
        assert!(r.is_err(), "read from a dead domain returned {r:?}");
    }
    eprintln!("all 5 connections to the dead domain failed {:?} after the kill", killed.elapsed());
    for s in to1.iter_mut() {
        s.write_all(b"more").await.unwrap();
        let mut b = [0u8; 4];
        tokio::time::timeout(T, s.read_exact(&mut b)).await.unwrap().unwrap();
        assert_eq!(&b, b"more");
    }
    assert!(daemon.child.try_wait().unwrap().is_none(), "dombus-simxen died");
    echo_here.abort();
}
