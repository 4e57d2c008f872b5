//! 10,000 idle connections on one link plus one busy one.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::Scratch;
use dombus_transport_xen::diag;
use dombus_transport_xen::link::{Link, LinkConfig};
use dombus_transport_xen::sim::{SimBackend, SimHypervisor};
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::mux::Mux;
use dombus_transport_xen::vsock::session::SessionConfig;

const IDLE: usize = 10_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test]
async fn ten_thousand_idle_connections_and_one_busy_one() {
    let dir = Scratch::new("vsock-scale");
    let sock = dir.path("hv.sock");
    let _hv = SimHypervisor::spawn(&sock).unwrap();
    let a = SimBackend::attach(&sock, Some(DomId(1))).unwrap();
    let b = SimBackend::attach(&sock, Some(DomId(2))).unwrap();
    let cfg = LinkConfig::default();
    let listener = Link::listen(&a, "data/scale", DomId(2), &cfg).unwrap();
    let (la, lb) = tokio::join!(listener.accept(), Link::connect(&b, "data/scale", DomId(1), &cfg));
    let (ma, mb) = (
        Mux::spawn(la.unwrap(), SessionConfig::default()),
        Mux::spawn(lb.unwrap(), SessionConfig::default()),
    );

    // The busy connection, measured before and after the idle ones exist.
    let echo = ma.listen(7).unwrap();
    let echoer = tokio::spawn(async move {
        let mut s = echo.accept().await.unwrap();
        diag::echo(&mut s).await.unwrap();
    });
    let mut busy = mb.connect(7).await.unwrap();
    let before = diag::ping(&mut busy, 64, 100, 2000).await.unwrap().unwrap();

    let idle_port = ma.listen(1).unwrap();
    let rss0 = rss_bytes();
    let started = Instant::now();
    let accepting = tokio::spawn(async move {
        let mut held = Vec::with_capacity(IDLE);
        for _ in 0..IDLE {
            held.push(idle_port.accept().await.unwrap());
        }
        held
    });
    let mut idle = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        idle.push(mb.connect(1).await.unwrap());
    }
    let held = tokio::time::timeout(Duration::from_secs(60), accepting).await.unwrap().unwrap();
    let setup = started.elapsed();
    let per_conn = (rss_bytes().saturating_sub(rss0)) as f64 / IDLE as f64;
    assert_eq!(held.len(), IDLE);
    assert_eq!(ma.connections(), IDLE + 1);
    assert_eq!(mb.connections(), IDLE + 1);

    let after = diag::ping(&mut busy, 64, 100, 2000).await.unwrap().unwrap();
    eprintln!(
        "{IDLE} idle connections opened in {setup:?}; memory per idle connection (both ends, one process): {per_conn:.0} bytes"
    );
    eprintln!("busy connection, 1 open: {before}");
    eprintln!("busy connection, {} open: {after}", IDLE + 1);
    eprintln!("p50 ratio {:.2}", after.p50.as_secs_f64() / before.p50.as_secs_f64());
    drop(busy);
    echoer.await.unwrap();
    drop((idle, held));
}
