//! 10,000 idle connections on one link plus one busy one: the memory an idle connection costs is
//! bounded, and the busy connection keeps working beside them.
//!
//! Memory is counted by this test binary's own global allocator: the heap bytes live at a moment
//! (allocated minus freed, at the sizes asked for). Unlike the resident set size, that count does
//! not depend on the allocator's arenas, page granularity or trimming, nor on the machine's load,
//! and it counts nothing a debug build adds (layouts and allocations are the same in every
//! profile). The only run-to-run freedom is the capacity the burst of 10,000 connects leaves in
//! queues that never shrink (the sessions' packet and event queues, the listener's backlog),
//! which depends on scheduling; in practice the figure is the same in every run.
//!
//! Latency is not measured here (a debug build on a shared machine proves nothing about it): the
//! cost of a round trip beside 10,000 idle connections is the `vsock_wakeup_64_idle10000` row of
//! `cargo run --release -p dombus-benches --bin compare`, interleaved with its 1-connection
//! baseline (docs/benchmarks.md).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::Scratch;
use dombus_sim::{SimBackend, SimHypervisor};
use dombus_tools::diag;
use dombus_transport_xen::link::{Link, LinkConfig};
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::mux::Mux;
use dombus_transport_xen::vsock::session::SessionConfig;

const IDLE: usize = 10_000;

/// Most heap bytes one idle connection may keep live, both ends together (the connecting and the
/// accepting multiplexer and session, the two `VsockStream` handles' own allocations; not the
/// vectors this test keeps the handles in). Measured: 399 bytes (docs/benchmarks.md). A
/// connection that grew a buffer of its own (a receive queue allocated up front, a task per
/// connection) breaks it: 384 bytes more per connection in the session (768 per pair) fail.
const MAX_BYTES_PER_IDLE_CONNECTION: i64 = 1024;

#[global_allocator]
static ALLOCATOR: dombus_tools::diag::CountingAlloc = dombus_tools::diag::CountingAlloc;

fn live_bytes() -> i64 {
    dombus_tools::diag::CountingAlloc::live() as i64
}

#[tokio::test]
async fn ten_thousand_idle_connections_cost_bounded_memory_beside_a_busy_one() {
    let dir = Scratch::new("vsock-scale");
    let sock = dir.path("hv.sock");
    let _hv = SimHypervisor::spawn(&sock).unwrap();
    let a = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let b = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    let cfg = LinkConfig::default();
    let listener = Link::listen(&a, "data/scale", DomId(2), &cfg).unwrap();
    let (la, lb) = tokio::join!(listener.accept(), Link::connect(&b, "data/scale", DomId(1), &cfg));
    // Room for 10,001 connections: the defaults bound a link from a guest to 64.
    let cfg = SessionConfig { max_connections: IDLE + 1, rx_budget: u64::MAX, ..SessionConfig::default() };
    let (ma, mb) = (Mux::spawn(la.unwrap(), cfg.clone()), Mux::spawn(lb.unwrap(), cfg));

    // The busy connection, used before the idle ones exist (so its buffers and the writers'
    // batches are allocated before the count starts) and beside them.
    let echo = ma.listen(7).unwrap();
    let echoer = tokio::spawn(async move {
        let mut s = echo.accept().await.unwrap();
        diag::echo(&mut s).await.unwrap();
    });
    let mut busy = mb.connect(7).await.unwrap();
    let before = diag::ping(&mut busy, 64, 10, 200).await.unwrap().unwrap();
    assert_eq!(before.count, 200);

    // The vectors that hold the handles are the test's, not the connections': allocate them
    // before counting.
    let idle_port = ma.listen(1).unwrap();
    let mut held = Vec::with_capacity(IDLE);
    let mut idle = Vec::with_capacity(IDLE);
    let live0 = live_bytes();
    let accepting = tokio::spawn(async move {
        for _ in 0..IDLE {
            held.push(idle_port.accept().await.unwrap());
        }
        held
    });
    for _ in 0..IDLE {
        idle.push(mb.connect(1).await.unwrap());
    }
    let held = tokio::time::timeout(Duration::from_secs(60), accepting).await.unwrap().unwrap();
    assert_eq!(held.len(), IDLE);
    assert_eq!(ma.connections(), IDLE + 1);
    assert_eq!(mb.connections(), IDLE + 1);

    // The busy connection still works with 10,001 open, and every packet queued by the burst
    // has been through both sessions once its round trips are back.
    let after = diag::ping(&mut busy, 64, 10, 200).await.unwrap().unwrap();
    assert_eq!(after.count, 200);
    let grown = live_bytes() - live0;
    let per_conn = grown / IDLE as i64;
    eprintln!(
        "{IDLE} idle connections: {grown} heap bytes, {per_conn} per connection (both ends, counted \
         by the allocator; bound {MAX_BYTES_PER_IDLE_CONNECTION})"
    );
    assert!(
        per_conn <= MAX_BYTES_PER_IDLE_CONNECTION,
        "an idle connection keeps {per_conn} heap bytes live (both ends), more than the \
         {MAX_BYTES_PER_IDLE_CONNECTION} bytes allowed"
    );
    // A count that went nowhere would pass any upper bound: each end keeps at least its entry
    // in the session's and the multiplexer's maps.
    assert!(
        per_conn >= 64,
        "implausibly few heap bytes per connection ({per_conn}): is the allocator counting?"
    );

    drop(busy);
    echoer.await.unwrap();
    drop((idle, held));
}
