//! The real xenstore client (`XenStore`) against the simulator's store model served over the
//! xenstore wire protocol (`dombus_sim::xenstored`).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use dombus_sim::store::StoreTree;
use dombus_sim::xenstored::Xenstored;
use dombus_transport_xen::backend::{BackendError, Perm, PermKind, Store, StoreWatch};
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::xen::store::{XenStore, XenWatch, is_conflict};
use rustix::event::{PollFd, PollFlags, Timespec};

const HOME: &str = "/local/domain/5";
const DOM: DomId = DomId(5);

/// A xenstored whose socket acts for domain 5, which may create nodes under `/` (so that the
/// tests can use short absolute paths) but may not read `/secret/x`.
struct Server {
    xsd: Xenstored,
    dir: PathBuf,
    sock: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Server {
    fn new() -> Server {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dombus-xsd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("socket");
        let xsd = Xenstored::default();
        xsd.with_tree(|t: &mut StoreTree| {
            t.introduce(DOM, "guest").unwrap();
            let root =
                [Perm { domid: DomId(0), kind: PermKind::None }, Perm { domid: DOM, kind: PermKind::Both }];
            t.set_perms(DomId::DOM0, "/", &root).unwrap();
            t.write(DomId::DOM0, "/secret/x", b"s").unwrap();
            t.set_perms(DomId::DOM0, "/secret/x", &[Perm { domid: DomId(0), kind: PermKind::None }]).unwrap();
        });
        xsd.listen(&sock, DOM).unwrap();
        Server { xsd, dir, sock }
    }

    fn open(&self) -> XenStore {
        XenStore::open_path(&self.sock).unwrap()
    }
}

/// Runs `f` on another thread, failing the test if it takes more than 10 s.
fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || tx.send(f()));
    rx.recv_timeout(Duration::from_secs(10)).expect("timed out")
}

fn eventually(cond: impl Fn() -> bool) {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(10), "condition never became true");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn readable(fd: impl AsFd, ms: i64) -> bool {
    let mut fds = [PollFd::new(&fd, PollFlags::IN)];
    let timeout = Timespec { tv_sec: ms / 1000, tv_nsec: (ms % 1000) * 1_000_000 };
    rustix::event::poll(&mut fds, Some(&timeout)).unwrap() == 1
}

/// The next event of `w`, waiting for its fd to poll readable.
fn next(w: &XenWatch) -> String {
    assert!(readable(w, 5000), "no watch event");
    w.try_next().unwrap().unwrap()
}

#[test]
fn every_method_round_trips_and_errors_are_mapped() {
    let server = Server::new();
    let xs = server.open();
    xs.write("/a/b", b"hello\0bytes").unwrap();
    assert_eq!(xs.read("/a/b").unwrap(), b"hello\0bytes");
    xs.write("data/x", b"rel").unwrap();
    assert_eq!(xs.read(&format!("{HOME}/data/x")).unwrap(), b"rel");
    xs.mkdir("/a/c").unwrap();
    assert_eq!(xs.read("/a/c").unwrap(), b"");
    assert_eq!(xs.directory("/a").unwrap(), ["b", "c"]);
    assert_eq!(xs.directory("/a/b").unwrap(), Vec::<String>::new());
    let perms =
        [Perm { domid: DomId(5), kind: PermKind::None }, Perm { domid: DomId(3), kind: PermKind::Read }];
    xs.set_perms("/a/b", &perms).unwrap();
    assert_eq!(xs.get_perms("/a/b").unwrap(), perms);
    xs.rm("/a").unwrap();
    assert!(matches!(xs.read("/a/b"), Err(BackendError::NotFound(_))));
    // As xenstored: removing a missing node whose parent exists succeeds; below a missing
    // parent it is ENOENT.
    xs.rm("/a").unwrap();
    assert!(matches!(xs.rm("/a/b"), Err(BackendError::NotFound(_))));
    assert!(matches!(xs.read("/secret/x"), Err(BackendError::PermissionDenied(_))));
    assert!(matches!(xs.read("bad\0path"), Err(BackendError::InvalidArgument(_))));
    assert!(matches!(xs.write("/big", &[0; 5000]), Err(BackendError::Limit(_))));
    assert_eq!(xs.read_domid().unwrap(), DomId(5));
    // A domain's id is the toolstack's (dom0's) node: the domain reads it, cannot remove it.
    assert!(matches!(xs.rm("domid"), Err(BackendError::PermissionDenied(_))));
    server.xsd.with_tree(|t: &mut StoreTree| t.rm(DomId::DOM0, "/local/domain/5/domid").map(|_| ()).unwrap());
    assert!(matches!(xs.read_domid(), Err(BackendError::NotFound(m)) if m.contains("xen-init-dom0")));
    assert_eq!(
        xs.read("/still/working").map_err(|e| e.to_string()).unwrap_err(),
        "not found: xenstore Read /still/working: ENOENT"
    );
}

#[test]
fn watch_fires_at_once_and_on_change_and_polls_readable() {
    let server = Server::new();
    let xs = server.open();
    let w = xs.watch("/w").unwrap();
    assert_eq!(next(&w), "/w");
    assert_eq!(w.try_next().unwrap(), None);
    assert!(!readable(&w, 0));
    xs.write("/other", b"1").unwrap();
    xs.write("/w/a", b"1").unwrap();
    assert_eq!(next(&w), "/w/a");
    assert!(!readable(&w, 0));
    let rel = xs.watch("data").unwrap();
    xs.write("data/k", b"v").unwrap();
    assert_eq!((next(&rel), next(&rel)), ("data".into(), "data/k".into()));
}

#[test]
fn dropping_a_watch_unwatches() {
    let server = Server::new();
    let xs = server.open();
    let w = xs.watch("/w").unwrap();
    let token = w.token().to_string();
    assert_eq!(server.xsd.watch_tokens(), [token]);
    drop(w);
    eventually(|| server.xsd.watch_tokens().is_empty());
    xs.write("/w/x", b"still fine").unwrap();
}

#[test]
fn concurrent_callers_get_their_own_replies() {
    let server = Server::new();
    let xs = server.open();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let xs = xs.clone();
            std::thread::spawn(move || {
                for i in 0..200 {
                    let (key, value) = (format!("/c/{t}/{i}"), format!("{t}-{i}"));
                    xs.write(&key, value.as_bytes()).unwrap();
                    assert_eq!(xs.read(&key).unwrap(), value.as_bytes());
                }
            })
        })
        .collect();
    within(move || threads.into_iter().for_each(|t| t.join().unwrap()));
}

#[test]
fn transactions_commit_abort_and_retry() {
    let server = Server::new();
    let xs = server.open();
    // A second connection, whose writes conflict with the first one's transactions.
    let other = server.open();
    let tx = xs.transaction().unwrap();
    tx.write("/t/a", b"1").unwrap();
    assert_eq!(tx.read("/t/a").unwrap(), b"1");
    assert!(matches!(xs.read("/t/a"), Err(BackendError::NotFound(_))));
    assert!(tx.commit().unwrap());
    assert_eq!(xs.read("/t/a").unwrap(), b"1");

    let tx = xs.transaction().unwrap();
    tx.rm("/t/a").unwrap();
    tx.abort().unwrap();
    drop(xs.transaction().unwrap().mkdir("/t/b"));
    assert_eq!(xs.directory("/t").unwrap(), ["a"]);
    eventually(|| server.xsd.transactions() == 0);

    let tx = xs.transaction().unwrap();
    tx.write("/t/c", b"lost").unwrap();
    other.write("/t/elsewhere", b"conflict").unwrap();
    assert!(!tx.commit().unwrap());
    assert!(xs.read("/t/c").is_err());

    let mut runs = 0;
    let v = xs
        .with_transaction(|tx| {
            runs += 1;
            tx.write("/t/c", format!("run {runs}").as_bytes())?;
            if runs <= 2 {
                other.write("/t/elsewhere", b"conflict")?;
            }
            Ok(runs)
        })
        .unwrap();
    assert_eq!((v, xs.read("/t/c").unwrap()), (3, b"run 3".to_vec()));
    let err = xs
        .with_transaction(|tx| {
            tx.write("/t/d", b"x")?;
            other.write("/t/elsewhere", b"conflict")
        })
        .unwrap_err();
    assert!(is_conflict(&err), "{err}");
}

#[test]
fn a_transaction_commits_its_watch_events_and_open_transactions_are_capped() {
    let server = Server::new();
    let xs = server.open();
    let w = xs.watch("/t").unwrap();
    assert_eq!(next(&w), "/t");
    let tx = xs.transaction().unwrap();
    tx.write("/t/x", b"1").unwrap();
    assert!(!readable(&w, 50), "a transaction's change fires at commit, not before");
    assert!(tx.commit().unwrap());
    assert_eq!(next(&w), "/t/x");
    let open: Vec<_> =
        (0..dombus_sim::xenstored::MAX_TRANSACTIONS).map(|_| xs.transaction().unwrap()).collect();
    assert!(matches!(xs.transaction(), Err(BackendError::Limit(_))));
    drop(open);
    eventually(|| server.xsd.transactions() == 0);
    xs.transaction().unwrap().abort().unwrap();
}

#[test]
fn garbage_from_a_client_ends_only_its_connection() {
    use std::io::{Read, Write};
    let server = Server::new();
    let xs = server.open();
    xs.write("/g", b"1").unwrap();
    for garbage in [
        // An undefined message type, then a payload length above the codec's bound.
        [99u32, 1, 0, 0].iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<u8>>(),
        [2u32, 1, 0, 5000].iter().flat_map(|w| w.to_le_bytes()).collect(),
    ] {
        let mut raw = std::os::unix::net::UnixStream::connect(&server.sock).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        raw.write_all(&garbage).unwrap();
        let mut rest = Vec::new();
        assert_eq!(raw.read_to_end(&mut rest).unwrap(), 0, "the server closes without replying");
    }
    // A well-formed request with malformed arguments gets an error reply, not a disconnect.
    assert!(matches!(xs.read("/g/bad path"), Err(BackendError::InvalidArgument(_))));
    assert_eq!(xs.read("/g").unwrap(), b"1");
}
