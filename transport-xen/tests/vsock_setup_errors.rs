//! A link one domain cannot set up: the waiting peer fails at once with the reason, a later
//! attempt is not failed by the stale reason, and a peer's orderly exit is no warning.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{LIVENESS, Scratch};
use dombus_sim::{SimBackend, SimHypervisor, SimHypervisorHandle, SimMappedPages, SimSharedPages};
use dombus_tools::diag;
use dombus_transport_xen::backend::{Backend, BackendError, SharedPages, Store};
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use dombus_transport_xen::vsock::{PeerSetupFailed, VsockAddr};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The link timeout of every domain here: a failure must be reported well before it.
const LINK_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon a failure the peer reports must reach the caller.
const AT_ONCE: Duration = Duration::from_secs(2);
/// The largest allocation the simulator grants at once (`dombus_sim`'s `MAX_SHARE_PAGES`).
const MAX_SHARE_PAGES: usize = 8192;

fn hv(tag: &str) -> (Scratch, SimHypervisorHandle, std::path::PathBuf) {
    let dir = Scratch::new(tag);
    let sock = dir.path("hv.sock");
    let hv = SimHypervisor::spawn(&sock).unwrap();
    (dir, hv, sock)
}

/// Domain `id` with its backend (to exhaust its tables through it).
fn domain(sock: &std::path::Path, id: u16) -> (VsockDomain<SimBackend>, SimBackend) {
    let backend = SimBackend::boot(sock, Some(DomId(id))).unwrap();
    let cfg = VsockConfig { link_timeout: LINK_TIMEOUT, ..VsockConfig::default() };
    (VsockDomain::start(backend.clone(), cfg).unwrap(), backend)
}

fn echo_service(d: &VsockDomain<SimBackend>, port: u32) {
    let mut l = d.listen(port).unwrap();
    tokio::spawn(async move {
        while let Ok(mut s) = l.accept().await {
            tokio::spawn(async move {
                let _ = diag::echo(&mut s).await;
            });
        }
    });
}

/// Grants pages of `granter` to `to` until its grant table is full; the grants, held.
fn fill_grant_table(granter: &SimBackend, to: DomId) -> Vec<SimSharedPages> {
    let mut held = Vec::new();
    let mut count = MAX_SHARE_PAGES;
    while count > 0 {
        match granter.share_pages(to, count, false) {
            Ok(pages) => held.push(pages),
            Err(BackendError::Limit(_)) => count /= 2,
            Err(e) => panic!("granting {count} pages: {e}"),
        }
    }
    match granter.share_pages(to, 1, true) {
        Err(BackendError::Limit(why)) => assert!(why.contains("grants"), "{why}"),
        other => panic!("domain {}'s grant table is not full: {:?}", granter.domid(), other.err()),
    }
    held
}

/// Maps pages into `mapper` until it may map no more (its maptrack table is full), from grants
/// of `granter`; the grants and mappings, held.
fn fill_map_table(mapper: &SimBackend, granter: &SimBackend) -> (Vec<SimSharedPages>, Vec<SimMappedPages>) {
    let shared = fill_grant_table(granter, mapper.domid());
    let mut mapped = Vec::new();
    let refs: Vec<_> = shared.iter().flat_map(|s| s.refs().iter().copied()).collect();
    let mut refs = refs.as_slice();
    let mut count = MAX_SHARE_PAGES;
    while count > 0 && !refs.is_empty() {
        let n = count.min(refs.len());
        match mapper.map_grants(granter.domid(), &refs[..n], false) {
            Ok(m) => {
                mapped.push(m);
                refs = &refs[n..];
            }
            Err(BackendError::Limit(_)) => count /= 2,
            Err(e) => panic!("mapping {n} pages: {e}"),
        }
    }
    (shared, mapped)
}

/// Connects `from` to `to`, expecting a failure well before the link timeout; its message.
async fn connect_fails_at_once(from: &VsockDomain<SimBackend>, to: VsockAddr) -> std::io::Error {
    let began = Instant::now();
    let outcome = tokio::time::timeout(LIVENESS, from.connect(to)).await.expect("connect hung");
    let took = began.elapsed();
    let Err(e) = outcome else { panic!("domain {} connected to {to}", from.domid()) };
    assert!(took < AT_ONCE, "domain {} took {took:?} to fail to connect to {to}: {e}", from.domid());
    e
}

async fn echo_once(from: &VsockDomain<SimBackend>, to: VsockAddr) {
    let mut s = tokio::time::timeout(LIVENESS, from.connect(to)).await.unwrap().unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    tokio::time::timeout(LIVENESS, s.read_exact(&mut back)).await.unwrap().unwrap();
    assert_eq!(&back, b"ping");
}

/// The failure account `writer` keeps for `reader`, as `reader` reads it.
fn account(reader: &SimBackend, writer: DomId) -> Result<Vec<u8>, BackendError> {
    reader.store().read(&format!("/local/domain/{}/data/dombus/error/{}", writer.0, reader.domid().0))
}

/// The lower domain serves the link; when its grant table is full, the domain asking for the link
/// hears why at once, and its own connect says why too. Once it has grants again, the next
/// connect works although the old account is still there, and the account is removed.
#[tokio::test]
async fn a_full_grant_table_fails_a_link_at_once_with_the_reason() {
    let (_dir, _hv, sock) = hv("setup-grants");
    let (full, full_backend) = domain(&sock, 1);
    let (peer, peer_backend) = domain(&sock, 2);
    echo_service(&full, 5000);
    echo_service(&peer, 5000);
    let grants = fill_grant_table(&full_backend, DomId(2));

    // The full domain serving: the peer that asked is told why.
    let e = connect_fails_at_once(&peer, VsockAddr::new(1, 5000)).await;
    let msg = e.to_string();
    assert!(msg.starts_with("domain 1 could not set up the link: "), "{msg}");
    assert!(msg.contains("grants"), "{msg}");
    let told = e.get_ref().and_then(|i| i.downcast_ref::<PeerSetupFailed>()).expect("a PeerSetupFailed");
    assert_eq!(told.peer, DomId(1));

    // The full domain connecting (it serves this link too): its own error says why.
    let e = connect_fails_at_once(&full, VsockAddr::new(2, 5000)).await;
    let msg = e.to_string();
    assert!(msg.starts_with("could not set up the link to domain 2: "), "{msg}");
    assert!(msg.contains("grants"), "{msg}");

    // Grants again: the stale account (of the peer's earlier attempt) does not fail the next.
    assert!(account(&peer_backend, DomId(1)).is_ok_and(|v| !v.is_empty()), "no account was left");
    drop(grants);
    echo_once(&peer, VsockAddr::new(1, 5000)).await;
    echo_once(&full, VsockAddr::new(2, 5000)).await;
    assert!(
        matches!(account(&peer_backend, DomId(1)), Err(BackendError::NotFound(_))),
        "the account outlived the link: {:?}",
        account(&peer_backend, DomId(1)).map(|v| String::from_utf8_lossy(&v).into_owned())
    );
}

/// The higher domain joins the link; when it can map no more pages, the domain that published
/// the link hears why at once, and the higher domain's own connect says why. Once it can map
/// again, connections work both ways.
#[tokio::test]
async fn a_full_map_table_fails_a_link_at_once_with_the_reason() {
    let (_dir, _hv, sock) = hv("setup-maps");
    let (server, _server_backend) = domain(&sock, 1);
    let (full, full_backend) = domain(&sock, 2);
    let granter = SimBackend::boot(&sock, Some(DomId(3))).unwrap();
    echo_service(&server, 5000);
    echo_service(&full, 5000);
    let held = fill_map_table(&full_backend, &granter);

    // The full domain joining a link the lower one published: the lower one is told why.
    let e = connect_fails_at_once(&server, VsockAddr::new(2, 5000)).await;
    let msg = e.to_string();
    assert!(msg.starts_with("domain 2 could not set up the link: "), "{msg}");
    assert!(msg.contains("mapped"), "{msg}");

    // The full domain connecting: its own error says why.
    let e = connect_fails_at_once(&full, VsockAddr::new(1, 5000)).await;
    let msg = e.to_string();
    assert!(msg.starts_with("could not set up the link to domain 1: "), "{msg}");
    assert!(msg.contains("mapped"), "{msg}");

    drop(held);
    echo_once(&server, VsockAddr::new(2, 5000)).await;
    echo_once(&full, VsockAddr::new(1, 5000)).await;
}

/// Levels and messages of the events logged on this thread.
#[derive(Clone, Default)]
struct Recorded(Arc<Mutex<Vec<(tracing::Level, String)>>>);

struct Message(String);

impl tracing::field::Visit for Message {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl tracing::Subscriber for Recorded {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        self.0.lock().unwrap().push((*event.metadata().level(), message.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A peer that closes its links and goes away is logged below warning level, on both sides (both
/// domains run on this test's one thread, so the recorder sees them both).
#[tokio::test]
async fn a_peers_orderly_exit_is_not_a_warning() {
    let recorded = Recorded::default();
    let _log = tracing::subscriber::set_default(recorded.clone());
    let (_dir, _hv, sock) = hv("setup-exit");
    let (leaving, _) = domain(&sock, 1);
    let (staying, _) = domain(&sock, 2);
    let mut listener = leaving.listen(5000).unwrap();
    let (s, accepted) = tokio::join!(
        tokio::time::timeout(LIVENESS, staying.connect(VsockAddr::new(1, 5000))),
        tokio::time::timeout(LIVENESS, listener.accept()),
    );
    let (mut s, mut accepted) = (s.unwrap().unwrap(), accepted.unwrap().unwrap());
    s.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tokio::time::timeout(LIVENESS, accepted.read_exact(&mut got)).await.unwrap().unwrap();

    // Domain 1 goes: its connection, its listener, its links and its store connection.
    drop((accepted, listener, leaving));
    // The staying side's connection ends when its link stops, which is logged first.
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(LIVENESS, s.read_to_end(&mut rest)).await.expect("the link never stopped");
    let events = recorded.0.lock().unwrap().clone();
    let stops: Vec<_> = events.iter().filter(|(_, m)| m.contains("virtual-socket link stopped")).collect();
    assert!(!stops.is_empty(), "no link stop was logged: {events:?}");
    let warnings: Vec<_> = events.iter().filter(|(l, _)| *l <= tracing::Level::WARN).collect();
    assert!(warnings.is_empty(), "an orderly exit logged warnings: {warnings:?}");
}
