//! A hostile peer that floods a domain's multiplexer with packets that each ask for an answer
//! (`CREDIT_REQUEST`s, and packets for connections that do not exist, each answered with an
//! `RST`) and never reads the answers: the victim's heap stays bounded, and another domain's
//! connection to the victim keeps working meanwhile. And one that fills its connections' credit
//! with payloads split to waste the victim's receive buffers: they stay within their bound.
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

/// The tests measure this binary's whole heap: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn a_peer_flooding_requests_for_answers_and_never_reading_cannot_grow_the_victim() {
    let _one = ONE_AT_A_TIME.lock().await;
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

/// Connections the data-splitting peer fills.
const FILLED: u32 = 8;

#[tokio::test]
async fn data_split_to_waste_receive_buffers_stays_within_their_bound() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = Scratch::new("vsock-hostile-data");
    let sock = dir.path("hv.sock");
    let _hv = SimHypervisor::spawn(&sock).unwrap();
    let victim = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let hostile = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    let cfg = LinkConfig::default();
    let config = SessionConfig::default();
    let listener = Link::listen(&victim, "data/evil", DomId(2), &cfg).unwrap();
    let (lv, raw) = tokio::join!(listener.accept(), Link::connect(&hostile, "data/evil", DomId(1), &cfg));
    let vm = Mux::spawn(lv.unwrap(), config.clone());
    // The victim accepts every connection and never reads from one.
    let l = vm.listen(80).unwrap();
    let (rd, mut wr) = tokio::io::split(raw.unwrap());
    let mut answers = Answers(rd);
    // Each connection's whole credit, as a 1-byte payload then a 4 KiB one, over and over: a
    // 1-byte payload after a large one starts a buffer of its own, so without a bound the
    // queue would hold twice its bytes.
    let credit = config.buf_alloc as usize;
    let mut packets = Vec::new();
    for c in 0..FILLED {
        let mut sent = 0;
        for len in [1usize, 4096].into_iter().cycle() {
            let len = len.min(credit - sent);
            if len == 0 {
                break;
            }
            let mut h = Header::rw(5000 + c, 80, len as u32);
            h.buf_alloc = 1 << 16;
            packets.extend_from_slice(&h.packet(&vec![c as u8; len]));
            sent += len;
        }
    }
    let live0 = live_bytes();
    let held = tokio::spawn(async move {
        let mut held = Vec::new();
        for _ in 0..FILLED {
            held.push(l.accept().await.unwrap());
        }
        held
    });
    for c in 0..FILLED {
        wr.write_all(&Header::new(Op::Request, 5000 + c, 80).encode()).await.unwrap();
        answers.until(Op::Response, 5000 + c).await;
    }
    wr.write_all(&packets).await.unwrap();
    // Packets are handled in order: the answer to this request means all the data was taken.
    wr.write_all(&Header::new(Op::CreditRequest, 5000, 80).encode()).await.unwrap();
    answers.until(Op::CreditUpdate, 5000).await;
    let grown = live_bytes() - live0;
    // The documented bound per connection (docs/vsock.md, "Memory"): nothing was read, so no
    // front buffer is partly read; plus 16 KiB per connection for its stream and session entry.
    let per_conn = credit + credit / 8 + (32 << 10) + (16 << 10);
    let bound = (FILLED as usize * per_conn) as i64;
    let data = i64::from(FILLED) * credit as i64;
    eprintln!(
        "{FILLED} connections, {data} bytes queued: the victim's heap grew {grown} bytes (bound {bound})"
    );
    assert!(
        grown >= data,
        "implausibly little heap ({grown} bytes) for {data} bytes queued: is the allocator counting?"
    );
    assert!(grown <= bound, "{grown} heap bytes for {data} bytes queued (bound {bound})");
    assert!(vm.stopped().is_none(), "{:?}", vm.stopped());
    drop(held.await.unwrap());
}

/// The victim's packets to the hostile peer, read by hand.
struct Answers<R>(R);

impl<R: tokio::io::AsyncRead + Unpin> Answers<R> {
    /// Reads packets until one of `op` to port `to`.
    async fn until(&mut self, op: Op, to: u32) {
        tokio::time::timeout(LIVENESS, async {
            loop {
                let mut b = [0u8; HEADER_LEN];
                self.0.read_exact(&mut b).await.unwrap();
                let h = Header::decode(&b).unwrap();
                assert_eq!(h.len, 0, "the victim sent data: {h:?}");
                if h.op == op && h.dst_port == to {
                    return;
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("no {op:?} for port {to}"));
    }
}
