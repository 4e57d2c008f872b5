//! `dombus-storaged` as a process, called through the generated client: calls over a Unix
//! socket, a full clone whose caller's deadline passes mid-copy (cancelled on the server: no
//! partial image, no temporary file, no qemu-img left), progress while a clone runs, and a clean
//! exit (status 0) on SIGTERM.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_cancels_by_deadline_and_exits_cleanly() {
    let dir = std::env::temp_dir().join(format!("dombus-storaged-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("images");
    std::fs::create_dir_all(&root).unwrap();
    let sock = dir.join("storage.sock");
    let child = Command::new(STORAGED)
        .arg("--root")
        .arg(&root)
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child, dir.clone());
    let addr = Address::Unix(sock.clone());
    let t = Instant::now();
    let storage = loop {
        match StorageClient::connect(Net::new(), addr.clone()).await {
            Ok(c) => break c,
            Err(_) if t.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            Err(e) => panic!("dombus-storaged did not come up: {e}"),
        }
    };
    let d = Duration::from_secs(30);

    let info = storage
        .create(ctx(d), "small".into(), Size(1 << 20), Some(Format::Qcow2), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((info.name.as_str(), info.virtual_size), ("small", 1 << 20));
    let e = storage.info(ctx(d), "../etc/passwd".into()).await.unwrap().unwrap_err();
    assert!(matches!(e, StorageError::InvalidName { .. }), "{e:?}");

    // A source big enough that a full copy takes a while: 384 MiB of non-zero data.
    {
        let mut f = std::fs::File::create(root.join("big")).unwrap();
        let chunk: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251 + 1) as u8).collect();
        for _ in 0..384 {
            f.write_all(&chunk).unwrap();
        }
    }
    // Progress, seen from a second call while the clone runs.
    let cloning = {
        let storage = storage.clone();
        tokio::spawn(async move {
            storage.clone_disk(ctx(d), "big".into(), "copy".into(), false, Some(Format::Raw)).await
        })
    };
    let mut seen = None;
    let t = Instant::now();
    while !cloning.is_finished() && t.elapsed() < d {
        if let Ok(Some(p)) = storage.progress(ctx(d), "copy".into()).await {
            seen = Some(p);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let copied = cloning.await.unwrap().unwrap().unwrap();
    assert_eq!(copied.virtual_size, 384 << 20);
    let p = seen.expect("no progress seen while a 384 MiB clone ran");
    assert!(p.operation.contains("big"), "{p:?}");
    assert_eq!(storage.progress(ctx(d), "copy".into()).await.unwrap(), None);

    // The same clone with a deadline that passes mid-copy: the caller gets DeadlineExceeded,
    // the server drops the call — qemu-img killed, its temporary file removed.
    let before = entries(&root);
    let r = storage
        .clone_disk(ctx(Duration::from_millis(150)), "big".into(), "late".into(), false, Some(Format::Raw))
        .await;
    assert!(matches!(r, Err(RpcError::DeadlineExceeded)), "{r:?}");
    let t = Instant::now();
    loop {
        let now = entries(&root);
        let busy = storage.progress(ctx(d), "late".into()).await.unwrap();
        if now == before && busy.is_none() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "left behind after the deadline: {now:?} (before: {before:?}), {busy:?}"
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
        assert!(t.elapsed() < Duration::from_secs(10), "dombus-storaged did not stop on SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(status.success(), "{status:?}");
    assert!(!sock.exists(), "the socket outlived the daemon");
}
