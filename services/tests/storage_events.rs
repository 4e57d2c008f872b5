//! The storage service's streams through the real service (`QemuImg`, the real qemu-img) served
//! on transport-xen link sockets between simulated domains (domain 1 serves storage, domain 0 is
//! the toolstack, domains 7 and 8 are guests): every change an image event, in order, with the
//! image as it is after it; a failed call none; a domain's subscription only its own images'
//! events and snapshot; the `name` filter; a new subscription's snapshot the current list; the
//! progress of a long clone as a stream that ends with the operation's outcome.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{LIVENESS, QemuImgGate, TempDir, sim_net};
use dombus::rpc::ServeHandle;
use dombus::rpc::events::is_final;
use dombus::sim::{SimHypervisor, SimHypervisorHandle};
use dombus::{Address, Net, ResyncReason, Server, ServerConfig, Subscription, Update};
use dombus_services::storage::{
    DiskInfo, Format, ImageEvent, Outcome, Owner, ProgressUpdate, QemuImg, Size, Storage, StorageClient,
    StorageConfig, StorageError,
};
use futures::StreamExt as _;

const MIB: u64 = 1 << 20;
const TOOLSTACK: u16 = 0;
const SERVER: u16 = 1;
const A: u16 = 7;
const B: u16 = 8;

/// A simulated host: its hypervisor, the storage domain serving `QemuImg` on a root of its own.
struct Host {
    dir: TempDir,
    sock: PathBuf,
    _server: Server,
    _handle: ServeHandle,
    /// Each domain's network (a simulated domain boots once).
    nets: Mutex<HashMap<u16, Net>>,
    _hv: SimHypervisorHandle,
}

impl Host {
    async fn start(tag: &str, program: PathBuf, config: StorageConfig) -> Host {
        let dir = TempDir::new(tag);
        let sock = dir.path("simxen.sock");
        let hv = SimHypervisor::spawn(&sock).unwrap();
        let server = Server::new(sim_net(&sock, SERVER), ServerConfig::default());
        let root = dir.path("images");
        std::fs::create_dir_all(&root).unwrap();
        let storage = QemuImg::with_config(root, program, config).unwrap();
        let handle = server.serve(&Host::addr(), storage.into_service()).await.unwrap();
        Host { dir, sock, _server: server, _handle: handle, nets: Mutex::default(), _hv: hv }
    }

    fn root(&self) -> PathBuf {
        self.dir.path("images")
    }

    fn addr() -> Address {
        format!("xen:{SERVER}:5100").parse().unwrap()
    }

    /// A client of the storage service in domain `domain`.
    async fn client(&self, domain: u16) -> StorageClient {
        let net =
            self.nets.lock().unwrap().entry(domain).or_insert_with(|| sim_net(&self.sock, domain)).clone();
        StorageClient::connect(net, Host::addr()).await.unwrap()
    }
}

fn ctx() -> dombus::context::Context {
    let mut c = dombus::context::current();
    c.deadline = Instant::now() + LIVENESS;
    c
}

/// The next update of `s` (a failed poll that is not final is retried; a final one fails the
/// test), within the liveness limit.
async fn next<T, S>(s: &mut Subscription<T, S>) -> Update<T, S>
where
    T: serde::de::DeserializeOwned + Send + Unpin + 'static,
    S: serde::de::DeserializeOwned + Send + Unpin + 'static,
{
    loop {
        match tokio::time::timeout(LIVENESS, s.next()).await.expect("an update within the liveness limit") {
            Some(Ok(u)) => return u,
            Some(Err(e)) => assert!(!is_final(&e), "the subscription ended: {e}"),
            None => panic!("the subscription ended"),
        }
    }
}

/// The snapshot of a new subscription's first update (a start).
async fn start<T, S>(s: &mut Subscription<T, S>) -> S
where
    T: serde::de::DeserializeOwned + Send + Unpin + 'static + std::fmt::Debug,
    S: serde::de::DeserializeOwned + Send + Unpin + 'static + std::fmt::Debug,
{
    match next(s).await {
        Update::Resync { reason: ResyncReason::Start, snapshot: Some(snapshot), .. } => snapshot,
        other => panic!("a new subscription starts with the state: {other:?}"),
    }
}

/// The next `n` events of `s` (no resync on the way).
async fn events<T, S>(s: &mut Subscription<T, S>, n: usize) -> Vec<T>
where
    T: serde::de::DeserializeOwned + Send + Unpin + 'static + std::fmt::Debug,
    S: serde::de::DeserializeOwned + Send + Unpin + 'static + std::fmt::Debug,
{
    let mut out = Vec::new();
    while out.len() < n {
        match next(s).await {
            Update::Event { event, .. } => out.push(event),
            other => panic!("an unexpected resync after {out:?}: {other:?}"),
        }
    }
    out
}

/// Whether `s` delivers nothing more within a while (its polls answered empty meanwhile).
async fn quiet<T, S>(s: &mut Subscription<T, S>) -> Option<Update<T, S>>
where
    T: serde::de::DeserializeOwned + Send + Unpin + 'static,
    S: serde::de::DeserializeOwned + Send + Unpin + 'static,
{
    tokio::time::timeout(Duration::from_millis(600), next(s)).await.ok()
}

/// `d` without its allocated bytes (which the filesystem decides), to compare with what a test
/// expects.
fn shape(mut d: DiskInfo) -> DiskInfo {
    d.actual_size = 0;
    d
}

/// `e` with [`shape`]d images.
fn shaped(e: ImageEvent) -> ImageEvent {
    match e {
        ImageEvent::Created(d) => ImageEvent::Created(shape(d)),
        ImageEvent::Resized(d) => ImageEvent::Resized(shape(d)),
        ImageEvent::Adopted(d) => ImageEvent::Adopted(shape(d)),
        ImageEvent::Cloned { source, linked, image } => {
            ImageEvent::Cloned { source, linked, image: shape(image) }
        }
        ImageEvent::SnapshotCreated { image, snapshot } => {
            ImageEvent::SnapshotCreated { image: shape(image), snapshot }
        }
        ImageEvent::SnapshotReverted { image, snapshot } => {
            ImageEvent::SnapshotReverted { image: shape(image), snapshot }
        }
        ImageEvent::SnapshotDeleted { image, snapshot } => {
            ImageEvent::SnapshotDeleted { image: shape(image), snapshot }
        }
        deleted @ ImageEvent::Deleted { .. } => deleted,
    }
}

/// An image as a test expects it (no allocated bytes).
fn image(
    name: &str,
    format: Format,
    size: u64,
    backing: Option<&str>,
    snapshots: usize,
    owner: Owner,
) -> DiskInfo {
    DiskInfo {
        name: name.into(),
        format,
        virtual_size: size,
        actual_size: 0,
        backing: backing.map(Into::into),
        snapshots,
        owner,
    }
}

fn names(list: &[DiskInfo]) -> Vec<&str> {
    list.iter().map(|d| d.name.as_str()).collect()
}

fn host_program() -> PathBuf {
    "qemu-img".into()
}

/// Every change of every kind gives exactly one event, in the order of the calls, with the
/// image as it is after it (as the call answered it); each failed call between them gives none,
/// and so does a resize to the size the image has.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_change_gives_its_event_in_order_and_a_failed_call_none() {
    let host = Host::start("events-order", host_program(), StorageConfig::default()).await;
    let ts = host.client(TOOLSTACK).await;
    let mut sub = ts.events(None).wait(Duration::from_millis(500));
    assert_eq!(start(&mut sub).await, Vec::<DiskInfo>::new());

    let t = Owner::Toolstack;
    let created = ts.create(ctx(), "a".into(), Size(MIB), None, None).await.unwrap().unwrap();
    // Failures: none publishes.
    let failures = [
        ts.create(ctx(), "a".into(), Size(MIB), None, None).await.unwrap().map(drop),
        ts.resize(ctx(), "a".into(), Size(MIB / 2), false).await.unwrap().map(drop),
        ts.snapshot_delete(ctx(), "a".into(), "nope".into()).await.unwrap(),
        ts.delete(ctx(), "nope".into()).await.unwrap(),
        ts.clone_disk(ctx(), "nope".into(), "x".into(), false, None).await.unwrap().map(drop),
        ts.create(ctx(), "r".into(), Size(MIB), Some(Format::Raw), Some("a".into())).await.unwrap().map(drop),
    ];
    assert!(failures.iter().all(Result::is_err), "{failures:?}");
    ts.snapshot_create(ctx(), "a".into(), "s1".into()).await.unwrap().unwrap();
    let resized = ts.resize(ctx(), "a".into(), Size(2 * MIB), false).await.unwrap().unwrap();
    // The size it has: no change, no event.
    ts.resize(ctx(), "a".into(), Size(2 * MIB), false).await.unwrap().unwrap();
    ts.snapshot_revert(ctx(), "a".into(), "s1".into()).await.unwrap().unwrap();
    let reverted = ts.info(ctx(), "a".into()).await.unwrap().unwrap();
    let reverted_size = reverted.virtual_size;
    let linked = ts.clone_disk(ctx(), "a".into(), "b".into(), true, None).await.unwrap().unwrap();
    // The source backs a linked clone: its snapshot may not be reverted (Busy), no event.
    assert!(ts.snapshot_revert(ctx(), "a".into(), "s1".into()).await.unwrap().is_err());
    let full = ts.clone_disk(ctx(), "a".into(), "c".into(), false, Some(Format::Raw)).await.unwrap().unwrap();
    ts.snapshot_delete(ctx(), "a".into(), "s1".into()).await.unwrap().unwrap();
    assert!(ts.delete(ctx(), "a".into()).await.unwrap().is_err(), "a backs b");
    ts.delete(ctx(), "b".into()).await.unwrap().unwrap();
    ts.delete(ctx(), "c".into()).await.unwrap().unwrap();
    ts.delete(ctx(), "a".into()).await.unwrap().unwrap();

    let expected = vec![
        ImageEvent::Created(shape(created.clone())),
        ImageEvent::SnapshotCreated {
            image: image("a", Format::Qcow2, MIB, None, 1, t),
            snapshot: "s1".into(),
        },
        ImageEvent::Resized(shape(resized.clone())),
        ImageEvent::SnapshotReverted { image: shape(reverted), snapshot: "s1".into() },
        ImageEvent::Cloned { source: "a".into(), linked: true, image: shape(linked.clone()) },
        ImageEvent::Cloned { source: "a".into(), linked: false, image: shape(full.clone()) },
        ImageEvent::SnapshotDeleted {
            image: image("a", Format::Qcow2, reverted_size, None, 0, t),
            snapshot: "s1".into(),
        },
        ImageEvent::Deleted { name: "b".into(), owner: t },
        ImageEvent::Deleted { name: "c".into(), owner: t },
        ImageEvent::Deleted { name: "a".into(), owner: t },
    ];
    let mut seen = Vec::new();
    let mut cursors = Vec::new();
    while seen.len() < expected.len() {
        match next(&mut sub).await {
            Update::Event { event, cursor } => {
                seen.push(shaped(event));
                cursors.push(cursor.seq);
            }
            other => panic!("an unexpected resync after {seen:#?}: {other:?}"),
        }
    }
    assert_eq!(seen, expected);
    // The toolstack's view is unfiltered: one event per change, numbered one after another.
    assert!(cursors.windows(2).all(|w| w[1] == w[0] + 1), "{cursors:?}");
    assert_eq!(shape(created), image("a", Format::Qcow2, MIB, None, 0, t));
    assert_eq!(shape(linked), image("b", Format::Qcow2, reverted_size, Some("a"), 0, t));
    assert_eq!(shape(full).format, Format::Raw);
    assert!(quiet(&mut sub).await.is_none(), "an event past the last change");
}

/// A domain's subscription shows its own images only — their events, whoever changed them (the
/// toolstack too), and its snapshot — and never another owner's, even when it asks for one by
/// name; the toolstack's shows every owner's. A domain's progress stream likewise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_sees_the_events_of_its_own_images_only() {
    let host = Host::start("events-owners", host_program(), StorageConfig::default()).await;
    let (a, b, ts) = (host.client(A).await, host.client(B).await, host.client(TOOLSTACK).await);
    b.create(ctx(), "b-old".into(), Size(MIB), None, None).await.unwrap().unwrap();
    a.create(ctx(), "a-old".into(), Size(MIB), None, None).await.unwrap().unwrap();
    ts.create(ctx(), "t-old".into(), Size(MIB), None, None).await.unwrap().unwrap();

    let wait = Duration::from_millis(500);
    let (mut a_sub, mut b_sub, mut t_sub) =
        (a.events(None).wait(wait), b.events(None).wait(wait), ts.events(None).wait(wait));
    let mut a_peek = a.events(Some("b-disk".into())).wait(wait);
    let mut a_progress = a.progress_events(None).wait(wait);
    assert_eq!(names(&start(&mut a_sub).await), ["a-old"]);
    assert_eq!(names(&start(&mut b_sub).await), ["b-old"]);
    assert_eq!(names(&start(&mut t_sub).await), ["a-old", "b-old", "t-old"]);
    assert_eq!(start(&mut a_peek).await, Vec::<DiskInfo>::new(), "another owner's image by name");
    assert_eq!(start(&mut a_progress).await, Vec::<ProgressUpdate>::new());

    b.create(ctx(), "b-disk".into(), Size(MIB), None, None).await.unwrap().unwrap();
    a.create(ctx(), "a-disk".into(), Size(MIB), None, None).await.unwrap().unwrap();
    ts.create(ctx(), "t-disk".into(), Size(MIB), None, None).await.unwrap().unwrap();
    b.snapshot_create(ctx(), "b-disk".into(), "s".into()).await.unwrap().unwrap();
    // The toolstack changes A's image: A hears of it.
    ts.resize(ctx(), "a-disk".into(), Size(2 * MIB), false).await.unwrap().unwrap();
    // B's attempts on A's image fail, and publish nothing.
    assert!(b.delete(ctx(), "a-disk".into()).await.unwrap().is_err());
    b.delete(ctx(), "b-disk".into()).await.unwrap().unwrap();
    a.delete(ctx(), "a-disk".into()).await.unwrap().unwrap();
    ts.delete(ctx(), "t-disk".into()).await.unwrap().unwrap();

    let (da, db) = (Owner::Domain(A.into()), Owner::Domain(B.into()));
    let said = |events: Vec<ImageEvent>| -> Vec<(String, String, Owner)> {
        events
            .into_iter()
            .map(|e| {
                let kind = format!("{e:?}").split(['(', ' ']).next().unwrap_or_default().to_owned();
                (kind, e.name().to_owned(), e.owner())
            })
            .collect()
    };
    let row = |kind: &str, name: &str, owner: Owner| (kind.to_owned(), name.to_owned(), owner);
    assert_eq!(
        said(events(&mut a_sub, 3).await),
        [row("Created", "a-disk", da), row("Resized", "a-disk", da), row("Deleted", "a-disk", da)]
    );
    assert_eq!(
        said(events(&mut b_sub, 3).await),
        [row("Created", "b-disk", db), row("SnapshotCreated", "b-disk", db), row("Deleted", "b-disk", db)]
    );
    let all = said(events(&mut t_sub, 8).await);
    assert_eq!(all.len(), 8);
    assert_eq!(all[0], row("Created", "b-disk", db));
    assert_eq!(all[7], row("Deleted", "t-disk", Owner::Toolstack));
    for (sub, who) in [(&mut a_sub, "A"), (&mut b_sub, "B"), (&mut t_sub, "the toolstack")] {
        assert!(quiet(sub).await.is_none(), "{who} was shown an event of another owner's image");
    }
    assert!(quiet(&mut a_peek).await.is_none(), "A was shown an event of B's image, asking for it by name");

    // A's progress stream: its own operations (a create, a delete), and the toolstack's resize
    // of its image — none of B's or of the toolstack's own images.
    let mut ops = Vec::new();
    while ops.len() < 3 {
        match next(&mut a_progress).await {
            Update::Event { event, .. } => {
                assert_eq!((event.name.as_str(), event.owner), ("a-disk", da), "{event:?}");
                if let Some(outcome) = event.outcome {
                    assert_eq!(outcome, Outcome::Done, "{}", event.operation);
                    ops.push(event.operation);
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ops, ["create", "resize to 2M", "delete"]);
    assert!(quiet(&mut a_progress).await.is_none(), "A was shown another owner's operation");
}

/// `name` narrows a subscription to one image (the others' events still move its cursor); a
/// name that is no image name ends the subscription.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_name_filter_narrows_to_one_image() {
    let host = Host::start("events-name", host_program(), StorageConfig::default()).await;
    let ts = host.client(TOOLSTACK).await;
    ts.create(ctx(), "y".into(), Size(MIB), None, None).await.unwrap().unwrap();
    let mut x = ts.events(Some("x".into())).wait(Duration::from_millis(500));
    assert_eq!(start(&mut x).await, Vec::<DiskInfo>::new(), "no image x yet");
    ts.resize(ctx(), "y".into(), Size(2 * MIB), false).await.unwrap().unwrap();
    ts.create(ctx(), "x".into(), Size(MIB), None, None).await.unwrap().unwrap();
    ts.delete(ctx(), "y".into()).await.unwrap().unwrap();
    ts.delete(ctx(), "x".into()).await.unwrap().unwrap();
    let seen: Vec<ImageEvent> = events(&mut x, 2).await.into_iter().map(shaped).collect();
    assert_eq!(
        seen,
        [
            ImageEvent::Created(image("x", Format::Qcow2, MIB, None, 0, Owner::Toolstack)),
            ImageEvent::Deleted { name: "x".into(), owner: Owner::Toolstack },
        ]
    );
    assert!(quiet(&mut x).await.is_none());
    // Resumed from where it stands, it has nothing more (the skipped events are behind it).
    let cursor = x.cursor().unwrap();
    let mut resumed = ts.events(Some("x".into())).from(cursor).wait(Duration::from_millis(300));
    assert!(quiet(&mut resumed).await.is_none());

    let mut bad = ts.events(Some("../etc".into()));
    match tokio::time::timeout(LIVENESS, bad.next()).await.unwrap() {
        Some(Err(e)) => {
            assert!(is_final(&e), "{e:?}");
            let dombus::RpcError::Server(s) = e else { panic!("not the server's refusal: {e:?}") };
            assert_eq!(s.kind, std::io::ErrorKind::InvalidInput, "{s:?}");
            assert!(s.detail.contains(r#"invalid name "../etc""#), "{s:?}");
        }
        other => panic!("a bad name is refused for good: {other:?}"),
    }
    assert!(bad.next().await.is_none());
}

/// A new subscription starts with the list as it is now — for a domain, its own images only —
/// and an image made outside the service and adopted is an event too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_subscription_starts_with_the_current_list() {
    let host = Host::start("events-snapshot", host_program(), StorageConfig::default()).await;
    let (a, b, ts) = (host.client(A).await, host.client(B).await, host.client(TOOLSTACK).await);
    a.create(ctx(), "a1".into(), Size(MIB), None, None).await.unwrap().unwrap();
    a.create(ctx(), "a2".into(), Size(2 * MIB), Some(Format::Raw), None).await.unwrap().unwrap();
    a.snapshot_create(ctx(), "a1".into(), "s".into()).await.unwrap().unwrap();
    b.create(ctx(), "b1".into(), Size(MIB), None, None).await.unwrap().unwrap();
    ts.clone_disk(ctx(), "a1".into(), "t1".into(), true, None).await.unwrap().unwrap();

    let mut a_sub = a.events(None);
    let snapshot = start(&mut a_sub).await;
    assert_eq!(snapshot, a.list(ctx()).await.unwrap().unwrap(), "A's snapshot is A's list");
    assert_eq!(
        snapshot.into_iter().map(shape).collect::<Vec<_>>(),
        [
            image("a1", Format::Qcow2, MIB, None, 1, Owner::Domain(A.into())),
            image("a2", Format::Raw, 2 * MIB, None, 0, Owner::Domain(A.into())),
        ]
    );
    let mut t_sub = ts.events(None).wait(Duration::from_millis(500));
    let all = start(&mut t_sub).await;
    assert_eq!(all, ts.list(ctx()).await.unwrap().unwrap());
    assert_eq!(names(&all), ["a1", "a2", "b1", "t1"]);
    let mut one = ts.events(Some("b1".into()));
    assert_eq!(names(&start(&mut one).await), ["b1"]);

    // An image the operator placed in the root is adopted when a call names it: an event.
    std::fs::write(host.root().join("placed"), vec![0u8; MIB as usize]).unwrap();
    ts.info(ctx(), "placed".into()).await.unwrap().unwrap();
    let adopted = events(&mut t_sub, 1).await.into_iter().map(shaped).collect::<Vec<_>>();
    assert_eq!(adopted, [ImageEvent::Adopted(image("placed", Format::Raw, MIB, None, 0, Owner::Toolstack))]);
}

/// The source of the full clones below: big enough that qemu-img reports progress between 0 and
/// 100 % on the way.
const BIG: u64 = 64 * MIB;

/// A long clone's progress comes as a stream: its start, a step between 0 and 100 % while the
/// copy runs (held there by the test's qemu-img), then its end, `Done`; an operation that fails
/// ends with the caller's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_clones_progress_arrives_as_a_stream_and_ends() {
    let gate = QemuImgGate::new("events-progress");
    let host = Host::start("events-progress", gate.program(), gate.config()).await;
    let ts = host.client(TOOLSTACK).await;
    ts.create(ctx(), "big".into(), Size(BIG), Some(Format::Raw), None).await.unwrap().unwrap();
    // Content, so that the copy has something to report progress on.
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new().write(true).open(host.root().join("big")).unwrap();
        let block: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8).collect();
        for _ in 0..BIG / MIB {
            f.write_all(&block).unwrap();
        }
    }
    let mut progress = ts.progress_events(Some("copy".into())).wait(Duration::from_millis(500));
    assert_eq!(start(&mut progress).await, Vec::<ProgressUpdate>::new(), "nothing runs on copy yet");

    gate.hold_converts();
    let clone = {
        let ts = ts.clone();
        tokio::spawn(async move {
            ts.clone_disk(ctx(), "big".into(), "copy".into(), false, Some(Format::Qcow2)).await
        })
    };
    let first = events(&mut progress, 1).await.remove(0);
    assert_eq!(
        (first.name.as_str(), first.owner, first.operation.as_str(), first.percent, first.outcome.clone()),
        ("copy", Owner::Toolstack, "clone from big", 0.0, None),
        "the start"
    );
    // Updates as the copy goes, until it is held (strictly between 0 and 100 %).
    let mut last = 0.0;
    let held = loop {
        let u = events(&mut progress, 1).await.remove(0);
        assert_eq!(u.outcome, None, "the clone ended while held: {u:?}");
        assert!(u.percent >= last, "progress went back: {u:?} after {last}");
        last = u.percent;
        if u.percent > 0.0 && u.percent < 100.0 {
            break u;
        }
    };
    assert!(!clone.is_finished());
    // (The wrapper marks its hold just after passing that line on.)
    let t = Instant::now();
    while !gate.held() {
        assert!(t.elapsed() < LIVENESS, "progress {held:?} published, but qemu-img's output was not held");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // A second subscriber joining now finds the operation running, as far as it is.
    let mut late = ts.progress_events(None);
    let now = start(&mut late).await;
    assert_eq!(now.len(), 1, "{now:?}");
    assert_eq!(
        (now[0].operation.as_str(), now[0].percent, now[0].outcome.is_none()),
        ("clone from big", held.percent, true)
    );

    gate.release();
    let end = loop {
        let u = events(&mut progress, 1).await.remove(0);
        assert!(u.percent >= last, "progress went back: {u:?} after {last}");
        last = u.percent;
        if u.outcome.is_some() {
            break u;
        }
    };
    assert_eq!(end.outcome, Some(Outcome::Done));
    assert_eq!(end.percent, 100.0);
    let copy = tokio::time::timeout(LIVENESS, clone).await.unwrap().unwrap().unwrap().unwrap();
    assert_eq!((copy.format, copy.virtual_size), (Format::Qcow2, BIG));
    assert!(quiet(&mut progress).await.is_none(), "an update after the end");

    // A failed operation: its start, then its end with the caller's error.
    let r = ts.clone_disk(ctx(), "big".into(), "copy".into(), false, None).await.unwrap();
    assert!(matches!(r, Err(StorageError::AlreadyExists { .. })), "{r:?}");
    let failed = events(&mut progress, 2).await;
    assert_eq!(failed[0].outcome, None);
    assert_eq!(
        failed[1].outcome,
        Some(Outcome::Failed { error: Some(StorageError::AlreadyExists { name: "copy".into() }) })
    );
}
