//! Owners and quotas of images, through the real service (`QemuImg`, the real qemu-img) served
//! on transport-xen link sockets between simulated domains, where the caller's domain is the
//! one the transport established: domain 1 serves storage, domain 0 is the toolstack, domains 7
//! and 8 are guests. A guest acts only on its own images (another's is `NotFound`, word for word
//! the error of a missing name), the toolstack on all; quotas per owning domain, refused with
//! `OwnerQuotaExceeded` and nothing left behind, also between concurrent calls; owners survive a
//! restart; a record written before images had owners loads as the toolstack's.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{LIVENESS, QemuImgGate, TempDir, sim_net};
use dombus::rpc::ServeHandle;
use dombus::sim::{SimHypervisor, SimHypervisorHandle};
use dombus::{Address, Net, Server, ServerConfig};
use dombus_services::storage::{
    DiskInfo, Format, Owner, QemuImg, Quota, Size, Storage, StorageClient, StorageConfig, StorageError,
};

const MIB: u64 = 1 << 20;
const TOOLSTACK: u16 = 0;
const SERVER: u16 = 1;
const A: u16 = 7;
const B: u16 = 8;

/// A simulated host: its hypervisor, the storage domain serving `QemuImg` on `root`.
struct Host {
    dir: TempDir,
    sock: PathBuf,
    server: Server,
    handle: Option<ServeHandle>,
    /// The qemu-img the service runs.
    program: PathBuf,
    /// Each domain's network (a simulated domain boots once).
    nets: Mutex<HashMap<u16, Net>>,
    _hv: SimHypervisorHandle,
}

impl Host {
    /// A host whose storage domain serves a root of its own, with `config`.
    async fn start(tag: &str, config: StorageConfig) -> Host {
        Host::start_with(tag, "qemu-img".into(), config).await
    }

    /// The same, running the qemu-img `program`.
    async fn start_with(tag: &str, program: PathBuf, config: StorageConfig) -> Host {
        let dir = TempDir::new(tag);
        let sock = dir.path("simxen.sock");
        let hv = SimHypervisor::spawn(&sock).unwrap();
        let server = Server::new(sim_net(&sock, SERVER), ServerConfig::default());
        let mut host = Host { dir, sock, server, handle: None, program, nets: Mutex::default(), _hv: hv };
        std::fs::create_dir_all(host.root()).unwrap();
        host.serve(config).await;
        host
    }

    fn root(&self) -> PathBuf {
        self.dir.path("images")
    }

    fn addr() -> Address {
        format!("xen:{SERVER}:5100").parse().unwrap()
    }

    /// Serves a new `QemuImg` on the root (waiting for the one stopped before to let it go).
    async fn serve(&mut self, config: StorageConfig) {
        let t = Instant::now();
        let storage = loop {
            match QemuImg::with_config(self.root(), self.program.clone(), config.clone()) {
                Ok(s) => break s,
                Err(e) if e.to_string().contains("in use") && t.elapsed() < LIVENESS => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => panic!("storage root: {e}"),
            }
        };
        self.handle = Some(self.server.serve(&Host::addr(), storage.into_service()).await.unwrap());
    }

    /// Stops serving; the service ends with its last connection.
    async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.stop().await;
        }
    }

    /// A client of the storage service in domain `domain`.
    async fn client(&self, domain: u16) -> StorageClient {
        let net =
            self.nets.lock().unwrap().entry(domain).or_insert_with(|| sim_net(&self.sock, domain)).clone();
        StorageClient::connect(net, Host::addr()).await.unwrap()
    }

    /// The files of the root besides the service's own (record, lock), sorted: images and
    /// temporary files.
    fn files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.root())
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter(|n| !n.starts_with(".dombus-storage."))
            .collect();
        v.sort();
        v
    }
}

/// The network of simulated domain `id` on the hypervisor at `sock`.
fn ctx() -> dombus::context::Context {
    let mut c = dombus::context::current();
    c.deadline = Instant::now() + LIVENESS;
    c
}

/// What a call returned, as text.
fn e<T: std::fmt::Debug>(r: Result<T, StorageError>) -> String {
    match r {
        Ok(v) => format!("succeeded: {v:?}"),
        Err(e) => e.to_string(),
    }
}

fn names(list: &[DiskInfo]) -> Vec<&str> {
    list.iter().map(|d| d.name.as_str()).collect()
}

/// The errors `c` gets from every method naming the image `name` (as the image to act on, the
/// backing image of a create, the source of clones, the target of a clone), and its progress.
async fn everything_on(c: &StorageClient, name: &str) -> Vec<String> {
    let n = || name.to_owned();
    vec![
        e(c.info(ctx(), n()).await.unwrap()),
        e(c.resize(ctx(), n(), Size(8 * MIB), false).await.unwrap()),
        e(c.resize(ctx(), n(), Size(MIB / 2), true).await.unwrap()),
        e(c.snapshot_create(ctx(), n(), "s2".into()).await.unwrap()),
        e(c.snapshot_list(ctx(), n()).await.unwrap()),
        e(c.snapshot_revert(ctx(), n(), "s1".into()).await.unwrap()),
        e(c.snapshot_delete(ctx(), n(), "s1".into()).await.unwrap()),
        e(c.create(ctx(), "on-it".into(), Size(MIB), None, Some(n())).await.unwrap()),
        e(c.clone_disk(ctx(), n(), "linked-copy".into(), true, None).await.unwrap()),
        e(c.clone_disk(ctx(), n(), "full-copy".into(), false, None).await.unwrap()),
        e(c.delete(ctx(), n()).await.unwrap()),
        format!("progress {:?}", c.progress(ctx(), n()).await.unwrap()),
    ]
}

/// Domain A's image is, to domain B, exactly a missing name: every method gets the error it
/// gets once the image is gone, and nothing of it changes; B's list does not show it, and a
/// name taken by it is "already exists" to B. The toolstack sees and acts on both domains'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_domain_acts_only_on_its_own_images_the_toolstack_on_all() {
    let host = Host::start("owners", StorageConfig::default()).await;
    let (a, b, ts) = (host.client(A).await, host.client(B).await, host.client(TOOLSTACK).await);

    let mine = a.create(ctx(), "a-disk".into(), Size(MIB), None, None).await.unwrap().unwrap();
    assert_eq!(mine.owner, Owner::Domain(A.into()));
    a.snapshot_create(ctx(), "a-disk".into(), "s1".into()).await.unwrap().unwrap();
    let b_disk = b.create(ctx(), "b-disk".into(), Size(MIB), Some(Format::Raw), None).await.unwrap().unwrap();
    assert_eq!(b_disk.owner, Owner::Domain(B.into()));
    let t_disk = ts.create(ctx(), "t-disk".into(), Size(MIB), None, None).await.unwrap().unwrap();
    assert_eq!(t_disk.owner, Owner::Toolstack);

    // What B gets on A's image, then on the same name with no image: the same, word for word.
    let while_there = everything_on(&b, "a-disk").await;
    assert!(while_there[..11].iter().all(|e| e == "no image \"a-disk\""), "{while_there:#?}");
    assert_eq!(while_there[11], "progress None");
    let a_now = a.info(ctx(), "a-disk".into()).await.unwrap().unwrap();
    assert_eq!((a_now.virtual_size, a_now.snapshots), (MIB, 1), "B changed A's image");
    assert_eq!(host.files(), ["a-disk", "b-disk", "t-disk"], "B made something from A's image");
    // The toolstack's image is another owner's too.
    let on_toolstacks = everything_on(&b, "t-disk").await;
    assert!(on_toolstacks[..11].iter().all(|e| e == "no image \"t-disk\""), "{on_toolstacks:#?}");

    // Lists: each domain its own, the toolstack all, with owners.
    assert_eq!(names(&a.list(ctx()).await.unwrap().unwrap()), ["a-disk"]);
    assert_eq!(names(&b.list(ctx()).await.unwrap().unwrap()), ["b-disk"]);
    let all = ts.list(ctx()).await.unwrap().unwrap();
    let owners: Vec<_> = all.iter().map(|d| (d.name.as_str(), d.owner)).collect();
    assert_eq!(
        owners,
        [("a-disk", Owner::Domain(7)), ("b-disk", Owner::Domain(8)), ("t-disk", Owner::Toolstack)]
    );
    // A name taken by another's image: one namespace, refused without saying whose.
    for r in [
        b.create(ctx(), "a-disk".into(), Size(MIB), None, None).await.unwrap(),
        b.clone_disk(ctx(), "b-disk".into(), "a-disk".into(), false, None).await.unwrap(),
    ] {
        assert_eq!(r.unwrap_err(), StorageError::AlreadyExists { name: "a-disk".into() });
    }

    // The toolstack acts on A's image: info, snapshot, resize, a linked clone (its own).
    assert_eq!(ts.info(ctx(), "a-disk".into()).await.unwrap().unwrap().owner, Owner::Domain(7));
    ts.resize(ctx(), "a-disk".into(), Size(2 * MIB), false).await.unwrap().unwrap();
    let clone = ts.clone_disk(ctx(), "a-disk".into(), "t-clone".into(), true, None).await.unwrap().unwrap();
    assert_eq!((clone.owner, clone.backing.as_deref()), (Owner::Toolstack, Some("a-disk")));
    // A cannot delete its image under the toolstack's clone, and is not told the clone's name.
    let e = a.delete(ctx(), "a-disk".into()).await.unwrap().unwrap_err().to_string();
    assert!(e.contains("busy") && !e.contains("t-clone"), "{e}");
    ts.delete(ctx(), "t-clone".into()).await.unwrap().unwrap();
    // A acts on its own.
    a.clone_disk(ctx(), "a-disk".into(), "a-copy".into(), false, None).await.unwrap().unwrap();
    a.delete(ctx(), "a-copy".into()).await.unwrap().unwrap();
    // The toolstack deletes a guest's image.
    ts.delete(ctx(), "b-disk".into()).await.unwrap().unwrap();

    a.delete(ctx(), "a-disk".into()).await.unwrap().unwrap();
    let once_gone = everything_on(&b, "a-disk").await;
    assert_eq!(while_there, once_gone);
    assert_eq!(host.files(), ["t-disk"]);
}

/// While domain A's full clone runs, domain B is told neither its progress nor what it is: the
/// target name is Busy with "another owner's operation", the source not found; A and the
/// toolstack see the progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_owners_running_operation_stays_hidden() {
    let gate = QemuImgGate::new("owners-progress");
    let host = Host::start_with("progress", gate.program(), gate.config()).await;
    let (a, b, ts) = (host.client(A).await, host.client(B).await, host.client(TOOLSTACK).await);
    a.create(ctx(), "src".into(), Size(64 * MIB), Some(Format::Raw), None).await.unwrap().unwrap();
    // Content (as the guest using it would write): a copy long enough to report progress.
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new().write(true).open(host.root().join("src")).unwrap();
        let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251 + 1) as u8).collect();
        for _ in 0..64 {
            f.write_all(&chunk).unwrap();
        }
    }
    gate.hold_converts();
    let cloning = {
        let a = a.clone();
        tokio::spawn(async move { a.clone_disk(ctx(), "src".into(), "dst".into(), false, None).await })
    };
    let t = Instant::now();
    while !gate.held() {
        assert!(t.elapsed() < LIVENESS, "the clone did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = a.progress(ctx(), "dst".into()).await.unwrap().unwrap();
    assert_eq!(seen.operation, "clone from src");
    assert_eq!(ts.progress(ctx(), "dst".into()).await.unwrap().unwrap().operation, "clone from src");
    assert_eq!(b.progress(ctx(), "dst".into()).await.unwrap(), None);
    let busy = StorageError::Busy { name: "dst".into(), operation: "another owner's operation".into() };
    assert_eq!(b.create(ctx(), "dst".into(), Size(MIB), None, None).await.unwrap().unwrap_err(), busy);
    // The source is A's: B is told it does not exist, not that it is being read.
    assert_eq!(
        b.delete(ctx(), "src".into()).await.unwrap().unwrap_err(),
        StorageError::NotFound { name: "src".into() }
    );
    gate.release();
    let copy = cloning.await.unwrap().unwrap().unwrap();
    assert_eq!((copy.owner, copy.virtual_size), (Owner::Domain(A.into()), 64 * MIB));
}

/// Quotas of images and bytes per owning domain: each refused call gets the typed error and
/// leaves no file, temporary file or record behind; another domain and the toolstack are not
/// counted against it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_per_owner_refuse_with_the_typed_error_and_leave_nothing() {
    let config = StorageConfig { quota_images: 2, quota_bytes: 4 * MIB, ..StorageConfig::default() };
    let host = Host::start("quotas", config).await;
    let (a, b, ts) = (host.client(A).await, host.client(B).await, host.client(TOOLSTACK).await);
    let images = |used| StorageError::OwnerQuotaExceeded { what: Quota::Images, used, limit: 2 };
    let bytes = |used| StorageError::OwnerQuotaExceeded { what: Quota::Bytes, used, limit: 4 * MIB };

    a.create(ctx(), "q1".into(), Size(MIB), None, None).await.unwrap().unwrap();
    let e = a.create(ctx(), "big".into(), Size(4 * MIB), None, None).await.unwrap().unwrap_err();
    assert_eq!(e, bytes(MIB));
    a.create(ctx(), "q2".into(), Size(3 * MIB), None, None).await.unwrap().unwrap();
    assert_eq!(a.create(ctx(), "q3".into(), Size(MIB), None, None).await.unwrap().unwrap_err(), images(2));
    assert_eq!(
        a.create(ctx(), "q3".into(), Size(MIB), None, Some("q1".into())).await.unwrap().unwrap_err(),
        images(2)
    );
    assert_eq!(
        a.clone_disk(ctx(), "q1".into(), "q3".into(), true, None).await.unwrap().unwrap_err(),
        images(2)
    );
    assert_eq!(
        a.clone_disk(ctx(), "q1".into(), "q3".into(), false, None).await.unwrap().unwrap_err(),
        images(2)
    );
    assert_eq!(
        a.resize(ctx(), "q1".into(), Size(2 * MIB), false).await.unwrap().unwrap_err(),
        bytes(4 * MIB)
    );
    // Shrinking is never refused by a quota.
    a.resize(ctx(), "q2".into(), Size(2 * MIB), true).await.unwrap().unwrap();
    a.resize(ctx(), "q1".into(), Size(2 * MIB), false).await.unwrap().unwrap();
    a.delete(ctx(), "q2".into()).await.unwrap().unwrap();
    // A clone counts the source's virtual size.
    assert_eq!(
        a.clone_disk(ctx(), "q1".into(), "q3".into(), false, None).await.unwrap().unwrap(),
        a.info(ctx(), "q3".into()).await.unwrap().unwrap()
    );
    assert_eq!(
        a.clone_disk(ctx(), "q1".into(), "q4".into(), true, None).await.unwrap().unwrap_err(),
        images(2)
    );
    a.delete(ctx(), "q3".into()).await.unwrap().unwrap();
    a.resize(ctx(), "q1".into(), Size(3 * MIB), false).await.unwrap().unwrap();
    assert_eq!(
        a.clone_disk(ctx(), "q1".into(), "q4".into(), true, None).await.unwrap().unwrap_err(),
        bytes(3 * MIB)
    );
    assert_eq!(host.files(), ["q1"], "a refused call left something behind");
    assert_eq!(names(&ts.list(ctx()).await.unwrap().unwrap()), ["q1"], "a refused call left a record");

    // Another domain has a quota of its own; the toolstack none.
    b.create(ctx(), "b1".into(), Size(4 * MIB), None, None).await.unwrap().unwrap();
    for n in ["t1", "t2", "t3"] {
        ts.create(ctx(), n.into(), Size(64 * MIB), None, None).await.unwrap().unwrap();
    }
    // The toolstack growing a domain's image: the owner's quota still holds.
    assert_eq!(
        ts.resize(ctx(), "b1".into(), Size(8 * MIB), false).await.unwrap().unwrap_err(),
        bytes(4 * MIB)
    );
    assert_eq!(host.files(), ["b1", "q1", "t1", "t2", "t3"]);
}

/// Concurrent creates of one domain at the edge of its quotas: exactly as many win as the
/// quota allows, the others get the typed error, and only the winners' images exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_creates_at_the_quota_edge_exactly_the_quota_wins() {
    let config = StorageConfig { quota_images: 1, quota_bytes: 3 * MIB, ..StorageConfig::default() };
    let host = Host::start("race", config).await;
    let a = host.client(A).await;
    for (round, size) in [(0, MIB), (1, 2 * MIB), (2, MIB), (3, 2 * MIB)] {
        let calls: Vec<_> = (0..6)
            .map(|i| {
                let a = a.clone();
                tokio::spawn(async move {
                    a.create(ctx(), format!("r{round}-{i}"), Size(size), None, None).await.unwrap()
                })
            })
            .collect();
        let mut won = Vec::new();
        for call in calls {
            match call.await.unwrap() {
                Ok(info) => won.push(info.name),
                Err(StorageError::OwnerQuotaExceeded { what: Quota::Images, .. }) => {}
                Err(e) => panic!("round {round}: {e:?}"),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: {won:?} won");
        assert_eq!(host.files(), won, "round {round}");
        a.delete(ctx(), won[0].clone()).await.unwrap().unwrap();
    }
    // The bytes quota: two images allowed, 2 MiB each would overshoot 3 MiB together.
    let config = StorageConfig { quota_images: 8, quota_bytes: 3 * MIB, ..StorageConfig::default() };
    let mut host = host;
    host.stop().await;
    host.serve(config).await;
    let a = host.client(A).await;
    for round in 0..4 {
        let calls: Vec<_> = (0..6)
            .map(|i| {
                let a = a.clone();
                tokio::spawn(async move {
                    a.create(ctx(), format!("b{round}-{i}"), Size(2 * MIB), None, None).await.unwrap()
                })
            })
            .collect();
        let mut won = Vec::new();
        for call in calls {
            match call.await.unwrap() {
                Ok(info) => won.push(info.name),
                Err(StorageError::OwnerQuotaExceeded { what: Quota::Bytes, .. }) => {}
                Err(e) => panic!("round {round}: {e:?}"),
            }
        }
        assert_eq!(won.len(), 1, "round {round}: {won:?} won");
        assert_eq!(host.files(), won, "round {round}");
        a.delete(ctx(), won[0].clone()).await.unwrap().unwrap();
    }
}

/// Owners are in the root's record: a restarted service knows them; and a record written
/// before images had owners (and images without a record) load as the toolstack's, none lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owners_survive_a_restart_and_old_records_load_as_the_toolstacks() {
    let mut host = Host::start("restart", StorageConfig::default()).await;
    {
        let (a, b) = (host.client(A).await, host.client(B).await);
        a.create(ctx(), "a-disk".into(), Size(MIB), None, None).await.unwrap().unwrap();
        a.clone_disk(ctx(), "a-disk".into(), "a-clone".into(), true, None).await.unwrap().unwrap();
        b.create(ctx(), "b-disk".into(), Size(2 * MIB), Some(Format::Raw), None).await.unwrap().unwrap();
    }
    host.stop().await;
    // The same root in this process (the toolstack: no caller domain) after the restart.
    let t = Instant::now();
    let direct = loop {
        match QemuImg::new(host.root(), "qemu-img".into()) {
            Ok(s) => break s,
            Err(e) if e.to_string().contains("in use") && t.elapsed() < LIVENESS => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("{e}"),
        }
    };
    let owners: Vec<_> = direct.list().await.unwrap().into_iter().map(|d| (d.name, d.owner)).collect();
    assert_eq!(
        owners,
        [
            ("a-clone".to_owned(), Owner::Domain(7)),
            ("a-disk".to_owned(), Owner::Domain(7)),
            ("b-disk".to_owned(), Owner::Domain(8))
        ]
    );
    drop(direct);
    host.serve(StorageConfig::default()).await;
    let (a, b) = (host.client(A).await, host.client(B).await);
    assert_eq!(names(&a.list(ctx()).await.unwrap().unwrap()), ["a-clone", "a-disk"]);
    assert_eq!(
        b.info(ctx(), "a-disk".into()).await.unwrap().unwrap_err(),
        StorageError::NotFound { name: "a-disk".into() }
    );
    a.delete(ctx(), "a-clone".into()).await.unwrap().unwrap();

    // A record of the first form (no owners), its images, and one image without a record.
    host.stop().await;
    let root = host.root();
    for f in host.files() {
        std::fs::remove_file(root.join(f)).unwrap();
    }
    for (name, format) in [("old-base", "raw"), ("placed", "qcow2")] {
        let mut create = Command::new("qemu-img");
        create.args(["create", "-q", "-f", format]).arg(root.join(name)).arg("1M");
        assert!(create.status().unwrap().success());
    }
    let mut create = Command::new("qemu-img");
    create
        .args(["create", "-q", "-f", "qcow2", "-b", "old-base", "-F", "raw"])
        .arg(root.join("old-vm"))
        .arg("2M");
    assert!(create.status().unwrap().success());
    std::fs::write(
        root.join(".dombus-storage.index"),
        "dombus-storage-index 1\nold-base\traw\t1048576\t0\t\nold-vm\tqcow2\t2097152\t0\told-base\n",
    )
    .unwrap();
    host.serve(StorageConfig::default()).await;
    let (a, ts) = (host.client(A).await, host.client(TOOLSTACK).await);
    let all = ts.list(ctx()).await.unwrap().unwrap();
    let owners: Vec<_> = all.iter().map(|d| (d.name.as_str(), d.owner, d.backing.as_deref())).collect();
    assert_eq!(
        owners,
        [
            ("old-base", Owner::Toolstack, None),
            ("old-vm", Owner::Toolstack, Some("old-base")),
            ("placed", Owner::Toolstack, None)
        ]
    );
    assert!(a.list(ctx()).await.unwrap().unwrap().is_empty());
    assert_eq!(
        a.info(ctx(), "old-vm".into()).await.unwrap().unwrap_err(),
        StorageError::NotFound { name: "old-vm".into() }
    );
    // Rewritten in the form with owners.
    let text = std::fs::read_to_string(root.join(".dombus-storage.index")).unwrap();
    assert!(
        text.starts_with("dombus-storage-index 2\n")
            && text.contains("old-vm\tqcow2\t2097152\t0\told-base\ttoolstack\n"),
        "{text}"
    );
}
