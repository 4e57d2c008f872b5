//! `dombus-storaged` as a process, called through the generated client: calls over a Unix
//! socket, a full clone whose caller's deadline passes mid-copy (cancelled on the server: no
//! partial image, no temporary file, no qemu-img left), progress while a clone runs, and a clean
//! exit (status 0) on SIGTERM. The daemon runs the tests' qemu-img wrapper
//! (`common::QemuImgGate`), so that a clone lasts as long as the test needs it to.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{LIVENESS, QemuImgGate, processes_mentioning};
use dombus::rpc::{Address, Net, RpcError};
use dombus_services::storage::{Format, Size, StorageClient, StorageError};

const STORAGED: &str = env!("CARGO_BIN_EXE_dombus-storaged");

struct Daemon(Child, PathBuf);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn ctx(d: Duration) -> dombus::context::Context {
    let mut c = dombus::context::current();
    c.deadline = Instant::now() + d;
    c
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().filter_map(|e| e.unwrap().file_name().into_string().ok()).collect();
    v.sort();
    v
}

/// A fresh scratch directory for one test: (the directory, the image root in it, the daemon's
/// socket path in it).
fn scratch(tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("dombus-storaged-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("images");
    std::fs::create_dir_all(&root).unwrap();
    let sock = dir.join("storage.sock");
    (dir, root, sock)
}

/// `dombus-storaged` on `root`, serving on the Unix socket `sock`, running `gate`'s qemu-img.
fn storaged(root: &Path, sock: &Path, gate: &QemuImgGate) -> Command {
    let mut cmd = Command::new(STORAGED);
    cmd.arg("--root")
        .arg(root)
        .arg("--qemu-img")
        .arg(gate.program())
        .args(gate.sandbox_args())
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()));
    cmd
}

/// A client of the daemon serving on `sock`, once it is up.
async fn connect(sock: &Path) -> StorageClient {
    let t = Instant::now();
    loop {
        match StorageClient::connect(Net::new(), Address::Unix(sock.to_path_buf())).await {
            Ok(c) => return c,
            Err(_) if t.elapsed() < LIVENESS => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => panic!("dombus-storaged did not come up: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_cancels_by_deadline_and_exits_cleanly() {
    let (dir, root, sock) = scratch("test");
    let gate = QemuImgGate::new("daemon");
    let mut daemon = Daemon(storaged(&root, &sock, &gate).spawn().unwrap(), dir);
    let storage = connect(&sock).await;
    let d = Duration::from_secs(30);

    let info = storage
        .create(ctx(d), "small".into(), Size(1 << 20), Some(Format::Qcow2), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((info.name.as_str(), info.virtual_size), ("small", 1 << 20));
    let e = storage.info(ctx(d), "../etc/passwd".into()).await.unwrap().unwrap_err();
    assert!(matches!(e, StorageError::InvalidName { .. }), "{e:?}");

    // A source big enough that qemu-img reports progress between 0 and 100 %: 64 MiB of
    // non-zero data.
    {
        let mut f = std::fs::File::create(root.join("big")).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251 + 1) as u8).collect();
        for _ in 0..64 {
            f.write_all(&chunk).unwrap();
        }
    }
    // Progress, seen from a second call while the clone runs (held at its first progress
    // between 0 and 100 % until the test has seen it).
    gate.hold_converts();
    let cloning = {
        let storage = storage.clone();
        tokio::spawn(async move {
            storage.clone_disk(ctx(d), "big".into(), "copy".into(), false, Some(Format::Raw)).await
        })
    };
    let t = Instant::now();
    let p = loop {
        assert!(!cloning.is_finished(), "the clone finished while held");
        assert!(t.elapsed() < LIVENESS, "no progress seen while a clone ran (liveness limit)");
        if let Some(p) = storage.progress(ctx(d), "copy".into()).await.unwrap() {
            if p.percent > 0.0 && p.percent < 100.0 {
                break p;
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert!(p.operation.contains("big"), "{p:?}");
    gate.release();
    let copied = cloning.await.unwrap().unwrap().unwrap();
    assert_eq!(copied.virtual_size, 64 << 20);
    assert_eq!(storage.progress(ctx(d), "copy".into()).await.unwrap(), None);

    // The same clone at 1 MiB/s (about a minute) with a 150 ms deadline, which passes mid-copy:
    // the caller gets DeadlineExceeded, the server drops the call — qemu-img killed, its
    // temporary file removed.
    gate.slow_converts("1M");
    let before = entries(&root);
    let r = storage
        .clone_disk(ctx(Duration::from_millis(150)), "big".into(), "late".into(), false, Some(Format::Raw))
        .await;
    assert!(matches!(r, Err(RpcError::DeadlineExceeded)), "{r:?}");
    let t = Instant::now();
    loop {
        let now = entries(&root);
        let busy = storage.progress(ctx(d), "late".into()).await.unwrap();
        let daemon_pid = daemon.0.id();
        let running: Vec<u32> =
            processes_mentioning(&root).into_iter().filter(|&p| p != daemon_pid).collect();
        if now == before && busy.is_none() && running.is_empty() {
            break;
        }
        // The copy alone would take most of a minute: 30 s is not a kill.
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "left behind after the deadline: {now:?} (before: {before:?}), {busy:?}, qemu-img {running:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let e = storage.info(ctx(d), "late".into()).await.unwrap().unwrap_err();
    assert!(matches!(e, StorageError::NotFound { .. }), "{e:?}");

    // SIGTERM: a clean exit, the socket gone.
    let pid = rustix::process::Pid::from_raw(daemon.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < LIVENESS, "dombus-storaged did not stop on SIGTERM (liveness limit)");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "the socket outlived the daemon");
}

/// `--metrics-listen`: the daemon serves its calls' metrics for a Prometheus scrape over HTTP on
/// the address it was given (here port 0 on loopback: the daemon logs the address it got).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_its_metrics_for_a_scrape_when_asked() {
    use std::io::{BufRead, BufReader, Read};
    let (dir, root, sock) = scratch("metrics");
    let gate = QemuImgGate::new("metrics");
    let mut child = storaged(&root, &sock, &gate)
        .args(["--metrics-listen", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let _daemon = Daemon(child, dir);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(url) = line.split_whitespace().find(|w| w.starts_with("http://")) {
                let _ = tx.send(url.to_string());
            }
        }
    });
    let url = rx.recv_timeout(LIVENESS).expect("the daemon never said where it serves its metrics");
    let scrape_addr = url.trim_start_matches("http://").trim_end_matches("/metrics").to_string();

    let storage = connect(&sock).await;
    for _ in 0..3 {
        assert!(storage.list(ctx(Duration::from_secs(30))).await.unwrap().unwrap().is_empty());
    }

    let scrape = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(&scrape_addr).unwrap();
        s.set_read_timeout(Some(LIVENESS)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer
    })
    .await
    .unwrap();
    assert!(scrape.starts_with("HTTP/1.1 200"), "{scrape}");
    let calls = scrape
        .lines()
        .find(|l| l.starts_with("dombus_rpc_server_calls_total{") && l.contains("method=\"list\""))
        .unwrap_or_else(|| panic!("no count of list calls in the scrape:\n{scrape}"));
    assert!(calls.ends_with(" 3"), "{calls}");
}
