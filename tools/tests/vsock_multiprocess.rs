//! Virtual sockets between domain processes through the `dombus-simxen` daemon: three domains,
//! connections in both directions, refused connects, a stalled reader beside a busy connection
//! on the same link, and the death of a domain (SIGKILL).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::{LIVENESS, Proc, Scratch, field, fill_window, link_cmd, simxen};
use dombus_sim::SimBackend;
use dombus_tools::diag;
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
    let me =
        VsockDomain::start(SimBackend::boot(&sock, Some(DomId(3))).unwrap(), VsockConfig::default()).unwrap();

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
    // Writes are taken until the peer's window (256 KiB) is full; then a write waits.
    let window = fill_window(&mut stalled);
    assert_eq!(window, 256 << 10, "a reader that never reads was sent {window} bytes");
    let beside =
        tokio::time::timeout(T, diag::ping(&mut to1[0], 64, 10, 200)).await.unwrap().unwrap().unwrap();
    assert_eq!(beside.count, 200);
    // Still nothing more is taken: the reader has read nothing, so no credit came back.
    assert_eq!(fill_window(&mut stalled), 0, "the stalled connection took more after the round trips");
    eprintln!(
        "a writer to a stalled reader stopped after {} KiB; round trips on the same link: {before} before, {beside} beside it",
        window >> 10
    );
    drop(stalled);

    // A port nobody listens on is refused.
    let err = tokio::time::timeout(T, me.connect(VsockAddr::new(2, 5001))).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);

    let ping = pinger.expect_line("vsock-ping", T);
    assert_eq!(field(&ping, "round_trips"), "800", "{ping}");

    // Domain 2 dies: every connection to it fails, as on a lost link; those to domain 1 go on.
    let killed = Instant::now();
    d2.kill();
    for (i, s) in to2.iter_mut().enumerate() {
        let mut rest = Vec::new();
        let r = tokio::time::timeout(LIVENESS, s.read_to_end(&mut rest)).await.unwrap_or_else(|_| {
            panic!("connection {i} to the dead domain was still open {LIVENESS:?} after the kill (a liveness limit)")
        });
        assert!(rest.is_empty(), "{} bytes from a domain that was sent nothing", rest.len());
        let err = r.expect_err("a killed domain's connection ended as a clean end of stream");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "connection {i}: {err}");
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
