//! Many connections over one link between two domains (in-process simulated hypervisor).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::{LIVENESS, Scratch, fill_window};
use dombus_sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_tools::diag;
use dombus_transport_xen::link::{Link, LinkConfig};
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::mux::{Mux, MuxError};
use dombus_transport_xen::vsock::packet::{HEADER_LEN, Header, Op};
use dombus_transport_xen::vsock::session::{SessionConfig, Violation};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

struct Host {
    _dir: Scratch,
    _hv: SimHypervisorHandle,
    a: SimBackend,
    b: SimBackend,
}

fn host(tag: &str) -> Host {
    let dir = Scratch::new(tag);
    let sock = dir.path("hv.sock");
    let hv = SimHypervisor::spawn(&sock).unwrap();
    let a = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let b = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    Host { _dir: dir, _hv: hv, a, b }
}

async fn links(h: &Host, path: &str) -> (Link<SimBackend>, Link<SimBackend>) {
    let cfg = LinkConfig::default();
    let listener = Link::listen(&h.a, path, DomId(2), &cfg).unwrap();
    let (s, c) = tokio::join!(listener.accept(), Link::connect(&h.b, path, DomId(1), &cfg));
    (s.unwrap(), c.unwrap())
}

async fn muxes(h: &Host, path: &str) -> (Mux, Mux) {
    let (s, c) = links(h, path).await;
    (Mux::spawn(s, SessionConfig::default()), Mux::spawn(c, SessionConfig::default()))
}

#[tokio::test]
async fn concurrent_connections_in_both_directions() {
    let h = host("mux-concurrent");
    let (ma, mb) = muxes(&h, "data/mux").await;
    // Echo services on both domains.
    let mut servers = Vec::new();
    for m in [ma.clone(), mb.clone()] {
        let l = m.listen(80).unwrap();
        servers.push(tokio::spawn(async move {
            loop {
                let mut s = l.accept().await?;
                tokio::spawn(async move { diag::echo(&mut s).await });
            }
            #[allow(unreachable_code)]
            std::io::Result::Ok(())
        }));
    }
    let mut clients = Vec::new();
    for i in 0..20u64 {
        let m = if i % 2 == 0 { ma.clone() } else { mb.clone() };
        clients.push(tokio::spawn(async move {
            let mut s = m.connect(80).await?;
            let n = 10_000 + i * 997;
            let sent: Vec<u8> = (0..n).map(|j| (j * 7 + i) as u8).collect();
            s.write_all(&sent).await?;
            let mut back = vec![0u8; sent.len()];
            s.read_exact(&mut back).await?;
            assert_eq!(back, sent);
            std::io::Result::Ok(())
        }));
    }
    for c in clients {
        tokio::time::timeout(T, c).await.unwrap().unwrap().unwrap();
    }
    assert!(ma.stopped().is_none() && mb.stopped().is_none());
    // Both sides wrote packets from the connections' own tasks (and the bytes above were right).
    let direct = [ma.stats().session.direct, mb.stats().session.direct];
    assert!(direct.iter().all(|&n| n > 0), "packets written directly: {direct:?}");
}

/// Reads `s` to its end with buffers of the given sizes in turn.
async fn read_to_end_in(s: &mut dombus_transport_xen::vsock::mux::VsockStream, sizes: &[usize]) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; sizes.iter().copied().max().unwrap_or(1)];
    for i in 0.. {
        let n = s.read(&mut buf[..sizes[i % sizes.len()]]).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    got
}

fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len).map(|j| (j.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8).collect()
}

#[tokio::test]
async fn a_stream_arrives_whole_whether_packets_go_straight_to_the_reader_or_through_its_queue() {
    let h = host("mux-direct-read");
    let (ma, mb) = muxes(&h, "data/mux").await;
    let l = mb.listen(7).unwrap();
    let sent = pattern(4 << 20, 0);
    let data = sent.clone();
    let writer = tokio::spawn(async move {
        let mut s = ma.connect(7).await?;
        s.write_all(&data).await?;
        s.shutdown().await?;
        std::io::Result::Ok(ma)
    });
    let mut s = l.accept().await.unwrap();
    // Buffers larger than a packet (it goes in whole), smaller (the rest is queued), tiny.
    let reader =
        tokio::spawn(async move { read_to_end_in(&mut s, &[96 << 10, 40 << 10, 1000, 64 << 10, 7]).await });
    let got = tokio::time::timeout(T, reader).await.unwrap().unwrap();
    let _ma = tokio::time::timeout(T, writer).await.unwrap().unwrap().unwrap();
    assert_eq!(got.len(), sent.len());
    assert!(got == sent, "the stream arrived changed");
    let stats = mb.stats().session;
    assert!(stats.direct_reads > 0, "no payload went straight to the reader: {stats:?}");
    assert!(stats.direct_answers > 0, "no credit update went to the link from the reader's task: {stats:?}");
    assert!(mb.stopped().is_none());
}

/// With adaptive polling the reader task spins on the link for the next packet, holding its
/// thread: before it does, every task a packet set going must have run to its end, or an
/// answer made by a chain of hand-offs waits out the spin budget. Each side on a thread of its
/// own, as two domains are; the budget (5 s) makes a stalled round trip unmistakable.
#[test]
fn with_adaptive_polling_an_answer_made_by_a_chain_of_tasks_is_not_held_up_by_the_spin() {
    let h = host("mux-spin-chain");
    let cfg = LinkConfig { spin: Some(Duration::from_secs(5)), ..LinkConfig::default() };
    let runtime = || tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let (listening, ready) = std::sync::mpsc::channel();
    let (a, server_cfg) = (h.a.clone(), cfg.clone());
    let server = std::thread::spawn(move || {
        runtime().block_on(async move {
            let listener = Link::listen(&a, "data/mux", DomId(2), &server_cfg).unwrap();
            listening.send(()).unwrap();
            let mux = Mux::spawn(listener.accept().await.unwrap(), SessionConfig::default());
            let (mut rd, mut wr) = tokio::io::split(mux.listen(7).unwrap().accept().await.unwrap());
            // The request goes through three tasks before a fourth writes the answer.
            let (to_b, mut at_b) = tokio::sync::mpsc::channel::<[u8; 8]>(1);
            let (to_c, mut at_c) = tokio::sync::mpsc::channel::<[u8; 8]>(1);
            let (to_d, mut at_d) = tokio::sync::mpsc::channel::<[u8; 8]>(1);
            tokio::spawn(async move {
                while let Some(m) = at_b.recv().await {
                    to_c.send(m).await.unwrap();
                }
            });
            tokio::spawn(async move {
                while let Some(m) = at_c.recv().await {
                    to_d.send(m).await.unwrap();
                }
            });
            let answering = tokio::spawn(async move {
                while let Some(m) = at_d.recv().await {
                    wr.write_all(&m).await.unwrap();
                }
            });
            let mut m = [0u8; 8];
            while rd.read_exact(&mut m).await.is_ok() {
                to_b.send(m).await.unwrap();
            }
            drop(to_b);
            answering.await.unwrap();
        })
    });
    ready.recv().unwrap();
    runtime().block_on(async {
        let mux = Mux::spawn(
            Link::connect(&h.b, "data/mux", DomId(1), &cfg).await.unwrap(),
            SessionConfig::default(),
        );
        let mut s = mux.connect(7).await.unwrap();
        let round_trips = async {
            for i in 0..20u64 {
                s.write_all(&i.to_le_bytes()).await.unwrap();
                let mut back = [0u8; 8];
                s.read_exact(&mut back).await.unwrap();
                assert_eq!(u64::from_le_bytes(back), i);
            }
        };
        tokio::time::timeout(T, round_trips)
            .await
            .expect("20 round trips took longer than 20 s: answers waited for the reader task's spin");
        // Until the server has seen the end and closed the connection.
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(T, s.read_to_end(&mut rest)).await.unwrap().unwrap();
        assert!(rest.is_empty());
    });
    server.join().unwrap();
}

#[tokio::test]
async fn a_reader_that_does_not_come_for_its_packet_stalls_no_other_connection() {
    let h = host("mux-absent-reader");
    let (ma, mb) = muxes(&h, "data/mux").await;
    let l = mb.listen(7).unwrap();
    let (mut a1, mut a2) = (ma.connect(7).await.unwrap(), ma.connect(7).await.unwrap());
    let (mut b1, mut b2) = (l.accept().await.unwrap(), l.accept().await.unwrap());
    // b1's reader polls once (and so waits, as far as the multiplexer can tell), then its
    // task turns to other work and never polls that read again.
    let mut buf = vec![0u8; 64 << 10];
    let pending = std::future::poll_fn(|cx| {
        let mut rb = tokio::io::ReadBuf::new(&mut buf);
        std::task::Poll::Ready(
            tokio::io::AsyncRead::poll_read(std::pin::Pin::new(&mut b1), cx, &mut rb).is_pending(),
        )
    })
    .await;
    assert!(pending, "nothing was sent yet");
    let (first, second) = (pattern(64 << 10, 1), pattern(64 << 10, 2));
    a1.write_all(&first).await.unwrap();
    a2.write_all(&second).await.unwrap();
    // b2 gets its packet, which came after b1's.
    let mut got = vec![0u8; second.len()];
    tokio::time::timeout(T, b2.read_exact(&mut got)).await.unwrap().unwrap();
    assert!(got == second);
    // b1's packet waited in its queue.
    let mut got = vec![0u8; first.len()];
    tokio::time::timeout(T, b1.read_exact(&mut got)).await.unwrap().unwrap();
    assert!(got == first);
    assert!(mb.stopped().is_none());
}

#[tokio::test]
async fn connecting_to_a_port_nobody_listens_on_is_refused() {
    let h = host("mux-refused");
    let (_ma, mb) = muxes(&h, "data/mux").await;
    let err = tokio::time::timeout(T, mb.connect(4242)).await.unwrap().unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
}

#[tokio::test]
async fn a_slow_reader_does_not_delay_another_connection_on_the_same_link() {
    let h = host("mux-slow");
    let (ma, mb) = muxes(&h, "data/mux").await;
    let bulk = ma.listen(1).unwrap();
    let echo = ma.listen(2).unwrap();
    // Connection 1: nobody reads on the other end; the writer's writes are taken until the
    // 256 KiB credit is used up, then a write waits.
    let mut stuck = mb.connect(1).await.unwrap();
    let _parked = bulk.accept().await.unwrap();
    let window = fill_window(&mut stuck);
    assert_eq!(window, 256 << 10, "a reader that never reads was sent {window} bytes");
    // Connection 2 on the same link: round trips still flow.
    let echoer = tokio::spawn(async move {
        let mut s = echo.accept().await.unwrap();
        diag::echo(&mut s).await
    });
    let mut c = mb.connect(2).await.unwrap();
    let started = Instant::now();
    let lat = tokio::time::timeout(T, diag::ping(&mut c, 64, 10, 200)).await.unwrap().unwrap().unwrap();
    assert_eq!(lat.count, 200);
    eprintln!("200 round trips beside a stalled connection in {:?}: {lat}", started.elapsed());
    c.shutdown().await.unwrap();
    echoer.await.unwrap().unwrap();
    // And the stalled connection still takes nothing: no credit came back.
    assert_eq!(fill_window(&mut stuck), 0, "the stalled connection took more after the round trips");
}

#[tokio::test]
async fn half_close_and_reply() {
    let h = host("mux-halfclose");
    let (ma, mb) = muxes(&h, "data/mux").await;
    let l = ma.listen(7).unwrap();
    let server = tokio::spawn(async move {
        let mut s = l.accept().await.unwrap();
        let mut req = Vec::new();
        s.read_to_end(&mut req).await.unwrap();
        s.write_all(&req.iter().rev().copied().collect::<Vec<u8>>()).await.unwrap();
        s.shutdown().await.unwrap();
    });
    let mut c = mb.connect(7).await.unwrap();
    c.write_all(b"olleh").await.unwrap();
    c.shutdown().await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(T, c.read_to_end(&mut reply)).await.unwrap().unwrap();
    assert_eq!(reply, b"hello");
    server.await.unwrap();
}

#[tokio::test]
async fn dropping_one_side_fails_the_other_sides_connections() {
    let h = host("mux-gone");
    let (ma, mb) = muxes(&h, "data/mux").await;
    let l = ma.listen(9).unwrap();
    let mut c = mb.connect(9).await.unwrap();
    let s = l.accept().await.unwrap();
    let gone = Instant::now();
    // The side vanishes: its link ends first (as when its domain dies), so nothing it held
    // gets to close cleanly. (Dropped in order instead, its stream would write its own close
    // first, and the peer would read a clean end of that stream.)
    ma.reset("the domain went away");
    drop((s, l, ma));
    let mut buf = [0u8; 8];
    let r = tokio::time::timeout(LIVENESS, c.read(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("not noticed within {LIVENESS:?} (a liveness limit)"));
    eprintln!("noticed after {:?}", gone.elapsed());
    let err = r.expect_err("a vanished peer is not a clean end of stream");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
    assert!(matches!(mb.stopped(), Some(MuxError::LinkLost(_))), "{:?}", mb.stopped());
    let err = c.write_all(b"x").await.expect_err("a write to a vanished peer succeeded");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionAborted, "{err}");
}

#[tokio::test]
async fn a_larger_receive_buffer_lets_the_sender_put_that_much_in_flight() {
    let h = host("mux-rcvbuf");
    let (ma, mb) = muxes(&h, "data/rcvbuf").await;
    let l = mb.listen(80).unwrap();
    let cfg = SessionConfig::default();
    // Two connections whose readers do not read: what each sender gets in flight is its
    // reader's buffer, the default one's at first.
    let mut plain = ma.connect(80).await.unwrap();
    let _plain_reader = tokio::time::timeout(T, l.accept()).await.unwrap().unwrap();
    let mut bulk = ma.connect(80).await.unwrap();
    let mut bulk_reader = tokio::time::timeout(T, l.accept()).await.unwrap().unwrap();
    assert_eq!(fill_window(&mut plain), cfg.buf_alloc as usize);
    let mut taken = fill_window(&mut bulk);
    assert_eq!(taken, cfg.buf_alloc as usize);
    // The reader task takes what is on the link meanwhile, and the link falls quiet.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // One is given the most it may have. Its stalled sender learns of it from a credit update
    // the call sends (nothing else moves on the link), and fills the rest.
    bulk_reader.set_recv_buffer_size(cfg.max_buf_alloc).unwrap();
    let deadline = Instant::now() + T;
    while taken < cfg.max_buf_alloc as usize && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
        taken += fill_window(&mut bulk);
    }
    assert_eq!(taken, cfg.max_buf_alloc as usize);
    // It never shrinks, nor passes the most a connection may have; the stream lives on.
    for asked in [cfg.buf_alloc, cfg.max_buf_alloc + 1] {
        let err = bulk_reader.set_recv_buffer_size(asked).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{err}");
    }
    let mut got = vec![1u8; taken];
    tokio::time::timeout(T, bulk_reader.read_exact(&mut got)).await.unwrap().unwrap();
    assert!(got.iter().all(|&b| b == 0));
}

#[tokio::test]
async fn a_peer_that_overruns_its_credit_is_disconnected_and_others_live_on() {
    let h = host("mux-overrun");
    let (victim_link, mut raw) = links(&h, "data/evil").await;
    let victim = Mux::spawn(victim_link, SessionConfig { buf_alloc: 4096, ..SessionConfig::default() });
    let _l = victim.listen(80).unwrap();
    // The raw side speaks the protocol by hand: REQUEST, wait for RESPONSE, then too much data.
    raw.write_all(&Header::new(Op::Request, 5000, 80).encode()).await.unwrap();
    let mut resp = [0u8; HEADER_LEN];
    raw.read_exact(&mut resp).await.unwrap();
    assert_eq!(Header::decode(&resp).unwrap().op, Op::Response);
    let mut rw = Header::new(Op::Rw, 5000, 80);
    rw.len = 5000;
    raw.write_all(&rw.encode()).await.unwrap();
    raw.write_all(&[0u8; 5000]).await.unwrap();
    // The raw side sees the link end, cleanly (the victim's writer shuts its half down as the
    // mux stops), with nothing after the RESPONSE: the victim stopped before sending anything.
    let mut sink = Vec::new();
    let n = tokio::time::timeout(T, raw.read_to_end(&mut sink))
        .await
        .expect("the violator's link was not closed")
        .expect("the violator saw an error, not the end of the link");
    assert_eq!(n, 0, "{sink:?}");
    // By then the victim has stopped, for the violation.
    assert!(
        matches!(victim.stopped(), Some(MuxError::Violation(Violation::CreditOverrun { .. }))),
        "{:?}",
        victim.stopped()
    );
    // Another pair of domains' link is unaffected.
    let (ma, mb) = muxes(&h, "data/other").await;
    let l2 = ma.listen(1).unwrap();
    let mut c = tokio::time::timeout(T, mb.connect(1)).await.unwrap().unwrap();
    let mut s = tokio::time::timeout(T, l2.accept()).await.unwrap().unwrap();
    c.write_all(b"fine").await.unwrap();
    let mut b = [0u8; 4];
    tokio::time::timeout(T, s.read_exact(&mut b)).await.unwrap().unwrap();
    assert_eq!(&b, b"fine");
}

/// The connecting side's own limits out of the way: only the victim's refuse.
fn roomy() -> SessionConfig {
    SessionConfig { rx_budget: u64::MAX, max_connections: 4096, ..SessionConfig::default() }
}

#[tokio::test]
async fn connections_past_the_receive_budget_are_refused_and_closing_one_lets_the_next_in() {
    let h = host("mux-budget");
    let (s, c) = links(&h, "data/budget").await;
    let cfg = SessionConfig::default();
    let fits = usize::try_from(cfg.rx_budget / u64::from(cfg.buf_alloc)).unwrap();
    let victim = Mux::spawn(s, cfg);
    let client = Mux::spawn(c, roomy());
    let l = victim.listen(80).unwrap();
    let _server = tokio::spawn(async move {
        while let Ok(mut s) = l.accept().await {
            tokio::spawn(async move { diag::echo(&mut s).await });
        }
    });
    let mut conns = Vec::new();
    for _ in 0..fits {
        conns.push(tokio::time::timeout(T, client.connect(80)).await.unwrap().unwrap());
    }
    let err = tokio::time::timeout(T, client.connect(80))
        .await
        .unwrap()
        .map(|_| ())
        .expect_err("a connection past the victim's receive budget was accepted");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let stats = victim.stats().session;
    assert_eq!((stats.refused_budget, stats.refused_limit), (1, 0), "{stats:?}");
    assert_eq!(victim.connections(), fits);
    // The earlier connections keep working.
    for c in [0, fits - 1] {
        let lat =
            tokio::time::timeout(T, diag::ping(&mut conns[c], 64, 1, 5)).await.unwrap().unwrap().unwrap();
        assert_eq!(lat.count, 5);
    }
    // Closing one lets the next in, once the victim has let go of it.
    drop(conns.remove(0));
    tokio::time::timeout(LIVENESS, async {
        while victim.connections() >= fits {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .expect("the victim did not let go of a closed connection");
    let mut again = tokio::time::timeout(T, client.connect(80)).await.unwrap().unwrap();
    assert_eq!(diag::ping(&mut again, 64, 1, 5).await.unwrap().unwrap().count, 5);
    assert!(victim.stopped().is_none() && client.stopped().is_none());
}

#[tokio::test]
async fn connections_nobody_accepts_are_bounded_by_the_budget() {
    let h = host("mux-backlog");
    let (s, c) = links(&h, "data/backlog").await;
    let cfg = SessionConfig::default();
    let fits = usize::try_from(cfg.rx_budget / u64::from(cfg.buf_alloc)).unwrap();
    let victim = Mux::spawn(s, cfg);
    let client = Mux::spawn(c, roomy());
    // A listener whose owner never calls accept: its backlog holds what the session accepted.
    let _never = victim.listen(80).unwrap();
    let (mut held, mut refused) = (Vec::new(), 0);
    for _ in 0..3 * fits {
        match tokio::time::timeout(T, client.connect(80)).await.unwrap() {
            Ok(s) => held.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => refused += 1,
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((held.len(), refused), (fits, 2 * fits));
    assert_eq!(victim.connections(), fits);
}
