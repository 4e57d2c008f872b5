//! A hostile peer that floods a domain's multiplexer with packets that each ask for an answer
//! (`CREDIT_REQUEST`s, and packets for connections that do not exist, each answered with an
//! `RST`) and never reads the answers: the victim's heap stays bounded, and another domain's
//! connection to the victim keeps working meanwhile.
//!
//! Memory is counted by this test binary's own global allocator (live heap bytes, as in
//! `vsock_scale.rs`): independent of the allocator's arenas and of the machine's load.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{LIVENESS, Scratch};
use dombus_sim::{SimBackend, SimHypervisor};
use dombus_tools::diag;
use dombus_transport_xen::link::{Link, LinkConfig};
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::mux::Mux;
use dombus_transport_xen::vsock::packet::{HEADER_LEN, Header, Op};
use dombus_transport_xen::vsock::session::SessionConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[global_allocator]
static ALLOCATOR: dombus_tools::diag::CountingAlloc = dombus_tools::diag::CountingAlloc;

fn live_bytes() -> i64 {
    dombus_tools::diag::CountingAlloc::live() as i64
}

/// Packets the hostile peer writes: 4.8 MB on the wire, each one asking for an answer.
const FLOOD: usize = 200_000;

/// Most heap bytes the victim may grow by while flooded. Every answer the victim queues costs
/// it some 60 bytes: without bounds the flood's 100,000 distinct `RST`s alone cost 6 MB.
const MAX_GROWTH: i64 = 1 << 20;

#[tokio::test]
async fn a_peer_flooding_requests_for_answers_and_never_reading_cannot_grow_the_victim() {
    let dir = Scratch::new("vsock-hostile");
    let sock = dir.path("hv.sock");
    let _hv = SimHypervisor::spawn(&sock).unwrap();
    let victim = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let hostile = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    let good = SimBackend::boot(&sock, Some(DomId(3))).unwrap();
    let cfg = LinkConfig::default();

    // The good domain's link to the victim, with an echo service on the victim.
    let listener = Link::listen(&victim, "data/good", DomId(3), &cfg).unwrap();
    let (lv, lg) = tokio::join!(listener.accept(), Link::connect(&good, "data/good", DomId(1), &cfg));
    let (vm_good, gm) = (
        Mux::spawn(lv.unwrap(), SessionConfig::default()),
        Mux::spawn(lg.unwrap(), SessionConfig::default()),
    );
    let echo = vm_good.listen(7).unwrap();
    let echoer = tokio::spawn(async move {
        let mut s = echo.accept().await.unwrap();
        diag::echo(&mut s).await.unwrap();
    });
    let mut c = gm.connect(7).await.unwrap();
    assert_eq!(diag::ping(&mut c, 64, 10, 50).await.unwrap().unwrap().count, 50);

    // The hostile domain's link, spoken by hand: one real connection, then the flood.
    let listener = Link::listen(&victim, "data/evil", DomId(2), &cfg).unwrap();
    let (lv, raw) = tokio::join!(listener.accept(), Link::connect(&hostile, "data/evil", DomId(1), &cfg));
    let vm_evil = Mux::spawn(lv.unwrap(), SessionConfig::default());
    let _l = vm_evil.listen(80).unwrap();
    let mut raw = raw.unwrap();
    raw.write_all(&Header::new(Op::Request, 5000, 80).encode()).await.unwrap();
    let mut resp = [0u8; HEADER_LEN];
    raw.read_exact(&mut resp).await.unwrap();
    assert_eq!(Header::decode(&resp).unwrap().op, Op::Response);
    // Every other packet asks for a credit update on the real connection; the others go to
    // connections that never existed, from a new port each time (a distinct RST each).
    let mut flood = Vec::with_capacity(FLOOD * HEADER_LEN);
    for i in 0..FLOOD as u32 {
        let h = if i % 2 == 0 {
            Header::new(Op::CreditRequest, 5000, 80)
        } else {
            Header::new(Op::CreditUpdate, 10_000 + i, 81)
        };
        flood.extend_from_slice(&h.encode());
    }

    let live0 = live_bytes();
    let (mut rd, mut wr) = tokio::io::split(raw);
    let flooding = tokio::spawn(async move {
        for chunk in flood.chunks(16 << 10) {
            wr.write_all(chunk).await.unwrap();
        }
        wr
    });
    // Wait until the flood is either all written, or the victim stopped reading the link.
    let written = tokio::time::timeout(LIVENESS, async {
        loop {
            if flooding.is_finished() {
                return true;
            }
            if vm_evil.stats().reading_paused {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the flood neither finished nor was held back");

    // Meanwhile the good domain's connection to the victim works.
    assert_eq!(diag::ping(&mut c, 64, 10, 50).await.unwrap().unwrap().count, 50);
    let stats = vm_evil.stats();
    let grown = live_bytes() - live0;
    eprintln!("flood of {FLOOD} packets (all written: {written}): victim heap grew {grown} bytes; {stats:?}");
    assert!(
        grown <= MAX_GROWTH,
        "the victim's heap grew by {grown} bytes under the flood (bound {MAX_GROWTH}); {stats:?}"
    );
    let st = stats.session;
    // The bound, one more answer from the packet read last, and the one connection's own.
    assert!(st.peak_queued_control <= st.max_queued_control + 1 + 4, "{stats:?}");
    assert!(written || stats.reading_paused, "{stats:?}");
    // Half the flood asked for credit updates on one connection: coalesced into one at a time.
    assert!(st.coalesced + 3 >= st.max_queued_control as u64, "{stats:?}");
    assert!(vm_evil.stopped().is_none(), "{:?}", vm_evil.stopped());

    // The flooder reads at last: the victim resumes and its answers are coalesced — at most one
    // credit update for the connection, and one RST per unknown pair.
    drop(flooding);
    let mut sink = vec![0u8; 64 << 10];
    let _ = rd.read(&mut sink).await.unwrap();
    drop(c);
    echoer.await.unwrap();
}
