//! Links between domains attached from one process to an in-process simulated hypervisor.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::Duration;

use common::{LIVENESS, Scratch, parked_on_watch};
use dombus_sim::{SimBackend, SimHypervisor};
use dombus_tools::diag;
use dombus_transport_xen::backend::{Backend, BackendError, Store};
use dombus_transport_xen::link::{Link, LinkConfig};
use dombus_transport_xen::types::DomId;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

struct Host {
    _dir: Scratch,
    hv: dombus_sim::SimHypervisorHandle,
    srv: SimBackend,
    cli: SimBackend,
}

fn host(tag: &str) -> Host {
    let dir = Scratch::new(tag);
    let sock = dir.path("hv.sock");
    let hv = SimHypervisor::spawn(&sock).unwrap();
    let srv = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let cli = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    Host { _dir: dir, hv, srv, cli }
}

fn cfg(c2s: usize, s2c: usize) -> LinkConfig {
    LinkConfig { client_to_server: c2s, server_to_client: s2c, spin: None }
}

async fn pair(h: &Host, path: &str, cfg: &LinkConfig) -> (Link<SimBackend>, Link<SimBackend>) {
    let listener = Link::listen(&h.srv, path, DomId(2), cfg).unwrap();
    let (s, c) = tokio::join!(listener.accept(), Link::connect(&h.cli, path, DomId(1), cfg));
    (s.unwrap(), c.unwrap())
}

#[tokio::test]
async fn every_ring_placement_carries_data_both_ways() {
    let h = host("placements");
    // In-page pairs (10/11 and 11/10), page rings of several orders, the 1 MiB maximum.
    for (i, (c2s, s2c)) in [(1024, 2048), (2048, 1024), (4096, 4096), (1024, 1 << 16), (1 << 20, 1 << 20)]
        .into_iter()
        .enumerate()
    {
        let cfg = cfg(c2s, s2c);
        let (mut s, mut c) = pair(&h, &format!("data/p{i}"), &cfg).await;
        let (tx, rx) = c.ring_sizes();
        assert!(tx as usize >= c2s && rx as usize >= s2c, "{:?} for {c2s}/{s2c}", c.ring_sizes());
        assert_eq!(s.ring_sizes(), (rx, tx));
        let n = 3 * c2s.max(s2c) as u64 + 17;
        let (sent, got) = tokio::time::timeout(T, async {
            tokio::join!(diag::send_pattern(&mut c, n, 1000), diag::recv_all(&mut s))
        })
        .await
        .unwrap();
        assert_eq!(got.unwrap(), (n, sent.unwrap()));
        s.write_all(b"back").await.unwrap();
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"back");
    }
}

#[tokio::test]
async fn half_close_then_close_reads_as_clean_end_of_stream() {
    let h = host("halfclose");
    let (mut s, mut c) = pair(&h, "data/hc", &LinkConfig::default()).await;
    c.write_all(b"request").await.unwrap();
    c.shutdown().await.unwrap();
    let mut req = Vec::new();
    tokio::time::timeout(T, s.read_to_end(&mut req)).await.unwrap().unwrap();
    assert_eq!(req, b"request");
    // The client's read half still works after its write half is shut.
    s.write_all(b"reply").await.unwrap();
    drop(s);
    let mut reply = Vec::new();
    tokio::time::timeout(T, c.read_to_end(&mut reply)).await.unwrap().unwrap();
    assert_eq!(reply, b"reply");
    // Writing to a closed peer fails instead of blocking.
    let err =
        tokio::time::timeout(T, c.write_all(b"x")).await.unwrap().expect_err("a write to a closed peer");
    assert_eq!(err.kind(), std::io::ErrorKind::BrokenPipe, "{err}");
}

#[tokio::test]
async fn server_path_is_removed_from_the_store_on_close() {
    let h = host("cleanup");
    let (s, _c) = pair(&h, "data/gone", &LinkConfig::default()).await;
    assert!(h.srv.store().read("data/gone/ring-ref").is_ok());
    drop(s);
    assert!(matches!(h.srv.store().read("data/gone/ring-ref"), Err(BackendError::NotFound(_))));
}

#[tokio::test]
async fn connect_waits_for_a_late_listener_by_watch() {
    let h = host("late");
    let cli = h.cli.clone();
    let connecting = tokio::spawn(async move {
        let mut c = Link::connect(&cli, "data/late", DomId(1), &LinkConfig::default()).await.unwrap();
        let mut b = [0u8; 5];
        c.read_exact(&mut b).await.unwrap();
        b
    });
    // The client is parked on its watch of the link's path, having found nothing there.
    parked_on_watch(&h.cli, "/local/domain/1/data/late").await;
    assert!(!connecting.is_finished());
    // While nothing changes it asks the store nothing: no timed retries. (However long this
    // pause, a watch-driven waiter makes no request; a poller shows in the count.)
    let before = h.cli.requests();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        h.cli.requests(),
        before,
        "the waiting client asked the store while nothing changed: it polls"
    );
    // The listener's publication is what wakes it.
    let mut s =
        Link::listen(&h.srv, "data/late", DomId(2), &LinkConfig::default()).unwrap().accept().await.unwrap();
    s.write_all(b"hello").await.unwrap();
    assert_eq!(&tokio::time::timeout(T, connecting).await.unwrap().unwrap(), b"hello");
}

#[tokio::test]
async fn a_full_ring_applies_backpressure_without_losing_bytes() {
    let h = host("backpressure");
    let (mut s, mut c) = pair(&h, "data/bp", &cfg(4096, 4096)).await;
    let writer =
        tokio::spawn(async move { diag::send_pattern(&mut c, 4 << 20, 64 << 10).await.map(|crc| (crc, c)) });
    // A slow reader: small reads with pauses; the writer must wait, not fail or spin.
    let mut total = 0u64;
    let mut crc = crc32fast::Hasher::new();
    let mut buf = [0u8; 3000];
    loop {
        let n = tokio::time::timeout(T, s.read(&mut buf)).await.unwrap().unwrap();
        if n == 0 {
            break;
        }
        crc.update(&buf[..n]);
        total += n as u64;
        if total % (1 << 20) < 3000 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (sent_crc, _c) = writer.await.unwrap().unwrap();
    assert_eq!(total, 4 << 20);
    assert_eq!(crc.finalize(), sent_crc);
}

#[tokio::test]
async fn a_whole_write_goes_in_at_once_or_not_at_all() {
    let h = host("try-write");
    let (mut s, mut c) = pair(&h, "data/try", &cfg(4096, 4096)).await;
    // More than the ring holds: nothing is written.
    let big = vec![7u8; 4097];
    assert!(!c.try_write_all(&[&big[..24], &big[24..]]).unwrap());
    // What fits goes in whole, its parts in order; then only what fits in the rest.
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    assert!(c.try_write_all(&[b"head", &data]).unwrap());
    assert!(!c.try_write_all(&[&[1u8; 1093]]).unwrap(), "1,092 bytes of room are left");
    assert!(c.try_write_all(&[&[1u8; 1092]]).unwrap());
    let mut got = vec![0u8; 4096];
    tokio::time::timeout(T, s.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got[..4], b"head");
    assert_eq!(&got[4..3004], &data[..]);
    assert!(got[3004..].iter().all(|&b| b == 1), "a declined write left nothing in the ring");
    // Read out, the room is back.
    assert!(c.try_write_all(&[&big[..4096]]).unwrap());
}

#[tokio::test]
async fn a_read_that_never_waits_takes_what_the_ring_holds() {
    let h = host("try-read");
    let (mut s, mut c) = pair(&h, "data/tryread", &cfg(4096, 4096)).await;
    let mut buf = vec![0u8; 4096];
    assert_eq!(s.try_read(&mut buf).unwrap(), 0, "the ring is empty");
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
    c.write_all(&data).await.unwrap();
    assert_eq!(s.try_read(&mut buf[..10]).unwrap(), 10);
    assert_eq!(s.try_read(&mut buf[10..]).unwrap(), 2990, "only what is there");
    assert_eq!(&buf[..3000], &data[..]);
    // Across the ring's end, in two reads of one write.
    c.write_all(&data[..2000]).await.unwrap();
    assert_eq!(s.try_read(&mut buf[..1500]).unwrap(), 1500);
    assert_eq!(s.try_read(&mut buf[1500..]).unwrap(), 500);
    assert_eq!(&buf[..2000], &data[..2000]);
    assert_eq!(s.try_read(&mut buf).unwrap(), 0);
    // The writer got its room back: a full ring's worth goes in; after its end, nothing to read.
    assert!(c.try_write_all(&[&[5u8; 4096]]).unwrap());
    c.shutdown().await.unwrap();
    tokio::time::timeout(T, s.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(s.try_read(&mut buf).unwrap(), 0, "end of stream");
}

#[tokio::test]
async fn adaptive_polling_link_pings() {
    let h = host("spin");
    let cfg = LinkConfig { spin: Some(Duration::from_micros(50)), ..LinkConfig::default() };
    let (mut s, mut c) = pair(&h, "data/spin", &cfg).await;
    let echo = tokio::spawn(async move { diag::echo(&mut s).await });
    let lat = tokio::time::timeout(T, diag::ping(&mut c, 64, 10, 200)).await.unwrap().unwrap().unwrap();
    assert_eq!(lat.count, 200);
    c.shutdown().await.unwrap();
    assert_eq!(echo.await.unwrap().unwrap(), 210 * 64);
}

#[tokio::test]
async fn wrong_client_domain_cannot_see_the_link() {
    let h = host("wrongclient");
    let listener = Link::listen(&h.srv, "data/private", DomId(3), &LinkConfig::default()).unwrap();
    // Domain 2 is not the intended client: the store hides the keys from it.
    let path = "/local/domain/1/data/private";
    let err = h.cli.store().read(&format!("{path}/ring-ref")).unwrap_err();
    assert!(matches!(err, BackendError::PermissionDenied(_)), "{err}");
    // So a connect from domain 2 waits for a link it will never see: it is parked on its watch,
    // having looked at the store after the link was published (and found nothing it may read).
    let cli = h.cli.clone();
    let wrong = tokio::spawn(async move {
        Link::connect(&cli, "data/private", DomId(1), &LinkConfig::default()).await.map(|_| ())
    });
    parked_on_watch(&h.cli, path).await;
    assert!(!wrong.is_finished(), "domain 2's connect ended: {:?}", wrong.await);
    // The intended client, domain 3, joins the same link.
    let dom3 = SimBackend::boot(h.hv.socket(), Some(DomId(3))).unwrap();
    let cfg = LinkConfig::default();
    let (s, c) = tokio::time::timeout(T, async {
        tokio::join!(listener.accept(), Link::connect(&dom3, path, DomId(1), &cfg))
    })
    .await
    .unwrap();
    let (mut s, mut c) = (s.unwrap(), c.unwrap());
    c.write_all(b"mine").await.unwrap();
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"mine");
    assert!(!wrong.is_finished(), "domain 2's connect ended: {:?}", wrong.await);
    wrong.abort();
}

#[tokio::test]
async fn split_halves_wait_at_the_same_time_without_losing_wakeups() {
    // Both halves of each end block at once: the readers for data, the writers for space in a
    // small ring. Both wait on the same event-channel fd, so each wake-up must reach both tasks.
    let h = host("split");
    let (s, c) = pair(&h, "data/split", &cfg(1024, 1024)).await;
    let (mut s_rd, mut s_wr) = tokio::io::split(s);
    let (mut c_rd, mut c_wr) = tokio::io::split(c);
    const N: u64 = 2 << 20;
    // Four tasks, four different wakers.
    let c_send =
        tokio::spawn(async move { diag::send_pattern(&mut c_wr, N, 3000).await.map(|crc| (crc, c_wr)) });
    let s_send =
        tokio::spawn(async move { diag::send_pattern(&mut s_wr, N, 5000).await.map(|crc| (crc, s_wr)) });
    let s_recv = tokio::spawn(async move { diag::recv_all(&mut s_rd).await });
    let c_recv = tokio::spawn(async move { diag::recv_all(&mut c_rd).await });
    let all = tokio::time::timeout(T, async { tokio::try_join!(c_send, s_send, s_recv, c_recv) })
        .await
        .expect("a half never woke up")
        .unwrap();
    let ((c_crc, _), (s_crc, _), s_got, c_got) =
        (all.0.unwrap(), all.1.unwrap(), all.2.unwrap(), all.3.unwrap());
    assert_eq!(s_got, (N, c_crc));
    assert_eq!(c_got, (N, s_crc));
}

/// What [`storm_beside_a_read`] saw.
struct StormVerdict {
    /// Ticks of the other task done while the read was pending.
    ticked: u32,
    /// Whether the storm was still going when the ticks were done.
    during: bool,
    /// Events the storm sent.
    sent: u64,
    /// From the start of the read to the last tick.
    took: Duration,
}

/// A client that joins a link by hand and then only signals its event channel, in a tight loop;
/// meanwhile a read on the server's end (which never gets data) and a ticking task share one
/// single-threaded runtime.
async fn storm_beside_a_read() -> StormVerdict {
    use dombus_transport_xen::backend::{EventChannel, MappedPages};
    use dombus_transport_xen::layout;
    use dombus_transport_xen::shmem::SharedMem;
    use dombus_transport_xen::types::{EvtchnPort, GrantRef};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let h = host("eventstorm");
    let listener = Link::listen(&h.srv, "data/storm", DomId(2), &LinkConfig::default()).unwrap();
    let read = |key: &str| -> u32 {
        let v = h.cli.store().read(&format!("/local/domain/1/data/storm/{key}")).unwrap();
        std::str::from_utf8(&v).unwrap().parse().unwrap()
    };
    let evtchn = h.cli.open_evtchn().unwrap();
    let port = evtchn.bind_interdomain(DomId(1), EvtchnPort(read("event-channel"))).unwrap();
    let page = h.cli.map_grants(DomId(1), &[GrantRef(read("ring-ref"))], true).unwrap();
    page.region().store_u8(layout::CLI_LIVE, 1);
    evtchn.notify(port).unwrap();
    let mut link = tokio::time::timeout(T, listener.accept()).await.unwrap().unwrap();
    let (stop, storming) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(true)));
    let storm = {
        let (stop, storming) = (stop.clone(), storming.clone());
        std::thread::spawn(move || {
            let mut sent = 0u64;
            // Normally stopped when the ticks are done; bounded by a liveness limit.
            let until = std::time::Instant::now() + LIVENESS;
            while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < until {
                evtchn.notify(port).unwrap();
                sent += 1;
            }
            storming.store(false, Ordering::SeqCst);
            (sent, page)
        })
    };
    let ticks = tokio::spawn(async {
        let mut n = 0;
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            n += 1;
        }
        n
    });
    let mut buf = [0u8; 16];
    let started = std::time::Instant::now();
    // The read has no data to return, ever: it stays pending while the ticks go on.
    let ticked = tokio::select! {
        r = link.read(&mut buf) => panic!("read returned without data: {r:?}"),
        n = ticks => n.unwrap(),
    };
    let took = started.elapsed();
    let during = storming.load(Ordering::SeqCst);
    stop.store(true, Ordering::Relaxed);
    let (sent, _page) = storm.join().unwrap();
    StormVerdict { ticked, during, sent, took }
}

#[test]
fn a_peer_that_only_sends_events_cannot_starve_the_executor() {
    // On a runtime of its own, in a thread of its own: a read that never yields to the other
    // task shows here as ticks that never come (or come only after the storm), not as a hang.
    let (tx, rx) = std::sync::mpsc::channel();
    let scenario = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _ = tx.send(rt.block_on(storm_beside_a_read()));
    });
    let v = match rx.recv_timeout(2 * LIVENESS) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("no ticks within {:?} (a liveness limit): the read holds the executor", 2 * LIVENESS)
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            std::panic::resume_unwind(scenario.join().expect_err("the scenario ended without a verdict"))
        }
    };
    eprintln!("10 ticks in {:?} beside a pending read under a storm of {} events", v.took, v.sent);
    assert_eq!(v.ticked, 10);
    // The ticks could run only because the read yielded to them: during the storm, not after it.
    assert!(v.during, "the ticks came only after the storm: the read held the executor for {:?}", v.took);
    assert!(v.sent > 1000, "the storm was too weak to prove anything ({} events)", v.sent);
}
