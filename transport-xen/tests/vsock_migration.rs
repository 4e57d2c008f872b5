//! Transport resets: virtual sockets across a migration on the simulated hypervisor (Xen moves
//! no grants and the domain id changes), and a link ended by its owner.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io;
use std::time::{Duration, Instant};

use common::{LIVENESS, Scratch, fill_window};
use dombus_sim::{Ended, SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_tools::diag;
use dombus_transport_xen::backend::{Backend, BackendError, Store};
use dombus_transport_xen::link::{Link, LinkConfig, LinkError};
use dombus_transport_xen::types::{DomId, GrantRef};
use dombus_transport_xen::vsock::domain::OwnSetupFailed;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain, VsockListener};
use dombus_transport_xen::vsock::mux::{Mux, VsockStream};
use dombus_transport_xen::vsock::session::SessionConfig;
use dombus_transport_xen::vsock::{VsockAddr, is_transport_reset, transport_reset};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A reset must reach the connections this soon: well under the 10 s a link set-up waits, so
/// a pass cannot come from a timeout (a liveness limit, not a performance claim).
const PROMPT: Duration = Duration::from_secs(5);

fn hv(tag: &str) -> (Scratch, SimHypervisorHandle, std::path::PathBuf) {
    let dir = Scratch::new(tag);
    let sock = dir.path("hv.sock");
    let hv = SimHypervisor::spawn(&sock).unwrap();
    (dir, hv, sock)
}

fn start(b: &SimBackend) -> VsockDomain<SimBackend> {
    VsockDomain::start(b.clone(), VsockConfig::default()).unwrap()
}

fn addr(d: DomId, port: u32) -> VsockAddr {
    VsockAddr::new(u32::from(d.0), port)
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

async fn roundtrip(s: &mut VsockStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(LIVENESS, s.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(back, msg);
}

async fn connect(d: &VsockDomain<SimBackend>, to: VsockAddr) -> VsockStream {
    tokio::time::timeout(LIVENESS, d.connect(to)).await.expect("connect hung").unwrap()
}

async fn accept(l: &mut VsockListener<SimBackend>) -> VsockStream {
    tokio::time::timeout(LIVENESS, l.accept()).await.expect("accept hung").unwrap()
}

/// Checks that `e` is a transport reset of the link to `peer`.
fn assert_reset(e: &io::Error, peer: DomId) {
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
    assert!(is_transport_reset(e), "not a transport reset: {e:?}");
    assert_eq!(transport_reset(e).map(|r| r.peer), Some(peer), "{e}");
}

/// Awaits `task` (which must end with an error) within [`PROMPT`] of `since`; its error.
async fn fails_promptly<T: std::fmt::Debug>(
    what: &str,
    since: Instant,
    task: tokio::task::JoinHandle<io::Result<T>>,
) -> io::Error {
    let r = tokio::time::timeout(LIVENESS, task)
        .await
        .unwrap_or_else(|_| panic!("{what}: hung for {LIVENESS:?}"))
        .unwrap();
    let e = r.expect_err(what);
    let took = since.elapsed();
    eprintln!("{what}: failed after {took:?}: {e}");
    assert!(took < PROMPT, "{what}: failed only after {took:?}");
    e
}

/// A task reading `s` until it fails (or ends); gives the stream back with the error.
fn read_until_error(mut s: VsockStream) -> tokio::task::JoinHandle<io::Result<VsockStream>> {
    tokio::spawn(async move {
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return Ok(s),
                Ok(_) => {}
                Err(e) => return Err(e),
            }
        }
    })
}

/// The process that was migrated learns it, and attaches as its new id.
async fn resumed(b: &SimBackend, to: DomId) -> SimBackend {
    let ended = tokio::time::timeout(LIVENESS, b.wait_ended()).await.expect("never told").unwrap();
    assert_eq!(ended, Ended::Migrated { to });
    let b = b.resume().unwrap();
    assert_eq!(b.domid(), to);
    b
}

#[tokio::test]
async fn the_servers_domain_migrated() {
    let (_dir, _hv, sock) = hv("mig-server");
    let b1 = SimBackend::boot_named(&sock, Some(DomId(1)), "server").unwrap();
    let d1 = start(&b1);
    let _svc = echo_service(&d1, 5000).await;
    let d2 = start(&SimBackend::boot(&sock, Some(DomId(2))).unwrap());
    let mut s = connect(&d2, addr(DomId(1), 5000)).await;
    roundtrip(&mut s, b"before").await;
    let mut idle = connect(&d2, addr(DomId(1), 5000)).await;
    let reader = read_until_error(s);
    tokio::task::yield_now().await;

    let since = Instant::now();
    let to = SimBackend::migrate(&sock, DomId(1)).unwrap();
    // A blocked reader and a later writer both get the reset, promptly.
    let e = fails_promptly("the client's read", since, reader).await;
    assert_reset(&e, DomId(1));
    let e = idle.write_all(b"x").await.expect_err("a write over a dead link succeeded");
    assert_reset(&e, DomId(1));

    // The server's process resumes as the new id and listens again: a connect to the new id
    // works (the old one's link is not reused).
    let b1 = resumed(&b1, to).await;
    drop((_svc, d1));
    let d1 = start(&b1);
    let _svc = echo_service(&d1, 5000).await;
    let mut s = connect(&d2, addr(to, 5000)).await;
    roundtrip(&mut s, b"after the migration").await;
    assert_eq!(s.peer_domain(), to);
    assert_eq!(b1.store().read("name").unwrap(), b"server");
}

#[tokio::test]
async fn the_clients_domain_migrated() {
    let (_dir, _hv, sock) = hv("mig-client");
    let d1 = start(&SimBackend::boot(&sock, Some(DomId(1))).unwrap());
    let mut l = d1.listen(5000).unwrap();
    let b2 = SimBackend::boot_named(&sock, Some(DomId(2)), "client").unwrap();
    let d2 = start(&b2);
    let mut c = connect(&d2, addr(DomId(1), 5000)).await;
    let mut s = accept(&mut l).await;
    c.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    s.read_exact(&mut got).await.unwrap();
    let (server_side, client_side) = (read_until_error(s), read_until_error(c));
    tokio::task::yield_now().await;

    let since = Instant::now();
    let to = SimBackend::migrate(&sock, DomId(2)).unwrap();
    let e = fails_promptly("the server's read", since, server_side).await;
    assert_reset(&e, DomId(2));
    let e = fails_promptly("the migrated client's own read", since, client_side).await;
    assert_reset(&e, DomId(1));

    // The client resumes under its new id and connects again; the server sees the new id.
    let b2 = resumed(&b2, to).await;
    let d2 = start(&b2);
    let mut c = connect(&d2, addr(DomId(1), 5000)).await;
    let mut s = accept(&mut l).await;
    assert_eq!(s.peer_domain(), to);
    c.write_all(b"again").await.unwrap();
    let mut got = [0u8; 5];
    tokio::time::timeout(LIVENESS, s.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(&got, b"again");
}

#[tokio::test]
async fn a_migration_mid_frame_is_a_reset_not_an_end_of_stream() {
    let (_dir, _hv, sock) = hv("mig-frame");
    let d1 = start(&SimBackend::boot(&sock, Some(DomId(1))).unwrap());
    let mut l = d1.listen(5000).unwrap();
    let d2 = start(&SimBackend::boot(&sock, Some(DomId(2))).unwrap());
    let mut c = connect(&d2, addr(DomId(1), 5000)).await;
    let mut s = accept(&mut l).await;
    // A frame of 1000 bytes announced, half of it written and read.
    c.write_all(&1000u32.to_be_bytes()).await.unwrap();
    c.write_all(&[7u8; 500]).await.unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body[..500]).await.unwrap();
    let rest = tokio::spawn(async move { s.read_exact(&mut body[500..]).await });
    tokio::task::yield_now().await;

    let since = Instant::now();
    SimBackend::migrate(&sock, DomId(2)).unwrap();
    let e = fails_promptly("the rest of the frame", since, rest).await;
    assert_ne!(e.kind(), io::ErrorKind::UnexpectedEof, "a torn frame must not look like an end of stream");
    assert_reset(&e, DomId(2));
    // The writer's second half fails the same way.
    let deadline = Instant::now() + PROMPT;
    let e = loop {
        match c.write_all(&[7u8; 500]).await {
            Err(e) => break e,
            // The reset may reach the migrated side a moment after the staying side.
            Ok(()) if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(10)).await,
            Ok(()) => panic!("writes over a dead link kept succeeding for {PROMPT:?}"),
        }
    };
    assert_reset(&e, DomId(1));
}

#[tokio::test]
async fn a_writer_blocked_on_credit_gets_the_reset() {
    let (_dir, _hv, sock) = hv("mig-credit");
    let d1 = start(&SimBackend::boot(&sock, Some(DomId(1))).unwrap());
    let mut l = d1.listen(5000).unwrap();
    let d2 = start(&SimBackend::boot(&sock, Some(DomId(2))).unwrap());
    let mut c = connect(&d2, addr(DomId(1), 5000)).await;
    let _s = accept(&mut l).await; // never reads
    let taken = fill_window(&mut c);
    assert!(taken > 0);
    let writer = tokio::spawn(async move { c.write_all(&[1u8; 64 << 10]).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!writer.is_finished(), "the writer had credit left: the test proves nothing");

    let since = Instant::now();
    SimBackend::migrate(&sock, DomId(1)).unwrap();
    let e = fails_promptly("the blocked write", since, writer).await;
    assert_reset(&e, DomId(1));
}

#[tokio::test]
async fn a_migration_during_link_set_up_fails_the_connect_at_once() {
    let (_dir, _hv, sock) = hv("mig-setup");
    // Domain 1 is up but serves no link yet: domain 2's connect waits in the set-up, on a
    // store watch, for domain 1 to publish the link.
    let b1 = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let b2 = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    let d2 = start(&b2);
    let connecting = {
        let d2 = d2.clone();
        tokio::spawn(async move { d2.connect(addr(DomId(1), 5000)).await })
    };
    common::parked_on_watch(&b2, "/local/domain/1/data/dombus/link/2").await;

    let since = Instant::now();
    let to = SimBackend::migrate(&sock, DomId(2)).unwrap();
    let e = fails_promptly("the connect in set-up", since, connecting).await;
    // The set-up failed because this domain's hypervisor attachment is gone: it says so.
    let cause = e.get_ref().and_then(|i| i.downcast_ref::<OwnSetupFailed>()).map(|f| &f.source);
    assert!(matches!(cause, Some(LinkError::Backend(BackendError::Migrated { to: t })) if *t == to), "{e:?}");

    // Once resumed, the link comes up with the new id.
    let b2 = resumed(&b2, to).await;
    let d1 = start(&b1);
    let _svc = echo_service(&d1, 5000).await;
    let mut s = connect(&start(&b2), addr(DomId(1), 5000)).await;
    roundtrip(&mut s, b"set up after all").await;
}

#[tokio::test]
async fn a_peer_that_never_unmaps_the_old_pages_blocks_nobody() {
    let (_dir, _hv, sock) = hv("mig-unmap");
    let d1 = start(&SimBackend::boot(&sock, Some(DomId(1))).unwrap());
    let mut l = d1.listen(5000).unwrap();
    let b2 = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    let d2 = start(&b2);
    let _c = connect(&d2, addr(DomId(1), 5000)).await;
    let s = accept(&mut l).await;
    // Domain 2 also maps the link's control page itself, and never lets go of it (nor of its
    // link: `d2` and `_c` live to the end of the test).
    let ring_ref = b2.store().read("/local/domain/1/data/dombus/link/2/ring-ref").unwrap();
    let ring_ref: u32 = String::from_utf8(ring_ref).unwrap().parse().unwrap();
    let held = b2.map_grants(DomId(1), &[GrantRef(ring_ref)], true).unwrap();
    let server_side = read_until_error(s);
    tokio::task::yield_now().await;

    let since = Instant::now();
    let to = SimBackend::migrate(&sock, DomId(2)).unwrap();
    let e = fails_promptly("the staying side's read", since, server_side).await;
    assert_reset(&e, DomId(2));
    // The staying side serves on at once: another domain, and the migrated one under its new
    // id, set up new links and connect, while the old pages are still mapped.
    let d3 = start(&SimBackend::boot(&sock, None).unwrap());
    let mut c3 = connect(&d3, addr(DomId(1), 5000)).await;
    let mut s3 = accept(&mut l).await;
    c3.write_all(b"3").await.unwrap();
    s3.read_exact(&mut [0u8; 1]).await.unwrap();
    let d2new = start(&resumed(&b2, to).await);
    let _c2 = connect(&d2new, addr(DomId(1), 5000)).await;
    let s2 = accept(&mut l).await;
    assert_eq!(s2.peer_domain(), to);
    assert!(since.elapsed() < LIVENESS);
    // The old mapping is still there, and no longer anyone's link.
    use dombus_transport_xen::backend::MappedPages as _;
    use dombus_transport_xen::shmem::SharedMem as _;
    let _ = held.region().load_u8(0);
    drop(held);
}

#[tokio::test]
async fn reset_by_the_links_owner_fails_every_operation() {
    let dir = Scratch::new("mig-reset");
    let sock = dir.path("hv.sock");
    let _hv = SimHypervisor::spawn(&sock).unwrap();
    let a = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let b = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    let cfg = LinkConfig::default();
    let listener = Link::listen(&a, "data/reset", DomId(2), &cfg).unwrap();
    let (la, lb) = tokio::join!(listener.accept(), Link::connect(&b, "data/reset", DomId(1), &cfg));
    let small = SessionConfig { buf_alloc: 4096, ..SessionConfig::default() };
    let (ma, mb) = (Mux::spawn(la.unwrap(), small.clone()), Mux::spawn(lb.unwrap(), small));
    assert_eq!(mb.peer(), DomId(1));
    let la9 = ma.listen(9).unwrap();
    let mut c = mb.connect(9).await.unwrap();
    let far = la9.accept().await.unwrap();
    fill_window(&mut c);
    let blocked = tokio::spawn(async move { c.write_all(&[0u8; 8192]).await });
    let mut c2 = mb.connect(9).await.unwrap();
    let _far2 = la9.accept().await.unwrap();
    let reader = tokio::spawn(async move { c2.read(&mut [0u8; 8]).await.map(|_| ()) });
    let lb10 = mb.listen(10).unwrap();
    let accepting = tokio::spawn(async move { lb10.accept().await.map(|_| ()) });
    let mut connecting = Box::pin(mb.connect(9));
    assert!(futures::poll!(&mut connecting).is_pending(), "the connect must be in flight");
    tokio::task::yield_now().await;

    // As the agent does when its own domain is migrated (every link's pages are gone).
    let since = Instant::now();
    mb.reset("this domain was migrated");
    for (what, task) in [("blocked write", blocked), ("read", reader), ("accept", accepting)] {
        assert_reset(&fails_promptly(what, since, task).await, DomId(1));
    }
    let e = tokio::time::timeout(LIVENESS, connecting).await.unwrap().unwrap_err();
    assert_reset(&e, DomId(1));
    let e = mb.connect(9).await.unwrap_err();
    assert_reset(&e, DomId(1));
    assert!(e.to_string().contains("this domain was migrated"), "{e}");
    // The other end sees its link end too: a reset of the link to domain 2.
    let e = fails_promptly("the far side's read", since, read_until_error(far)).await;
    assert_reset(&e, DomId(2));
}
