//! Helpers for multi-process tests: the simulator daemon and domain processes.
#![allow(dead_code, clippy::unwrap_used, missing_docs)]

pub mod scenarios;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use dombus_transport_xen::backend::{Backend, Store};
use dombus_transport_xen::sim::SimBackend;
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::mux::VsockStream;
use tokio::io::AsyncWrite;

/// How long a test waits for something that must happen before it calls it a hang: a liveness
/// limit, not a performance claim (tests also run on loaded machines and under emulation).
pub const LIVENESS: Duration = Duration::from_secs(30);

/// A unique scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!(
            "dombus-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos() ^ (std::ptr::addr_of!(tag) as usize as u128)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A child process whose stdout lines arrive on a channel; killed on drop.
pub struct Proc {
    pub child: Child,
    lines: Receiver<String>,
    pub seen: Vec<String>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// Closed when the stderr reader has seen EOF (everything the process wrote is in `stderr`).
    stderr_done: Receiver<()>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let (done, stderr_done) = channel::<()>();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
            drop(done);
        });
        Proc { child, lines, seen: Vec::new(), stderr, stderr_done }
    }

    /// Waits for a stdout line starting with `prefix`; panics with what was seen on timeout.
    pub fn expect_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => panic!(
                    "no line starting with {prefix:?} within {timeout:?}; stdout: {:?}; stderr: {}",
                    self.seen,
                    self.stderr()
                ),
            }
        }
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits for exit up to `timeout`; then also (briefly) for the reader of its stderr to
    /// reach EOF, so that [`Proc::stderr`] has all of it (a process can exit before its last
    /// line is read: a race seen once in CI).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                let _ = self.stderr_done.recv_timeout(Duration::from_secs(2));
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `dombus-simxen` on a socket in `dir` and waits until it accepts domains.
pub fn simxen(dir: &Scratch) -> (Proc, PathBuf) {
    let sock = dir.path("simxen.sock");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dombus-simxen"));
    cmd.arg("--socket").arg(&sock);
    let p = Proc::spawn(cmd);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        assert!(Instant::now() < deadline, "dombus-simxen did not create its socket");
        std::thread::sleep(Duration::from_millis(5));
    }
    (p, sock)
}

/// A `dombus-link` process attached as `domid`: the test, as the toolstack, creates the domain
/// and hands the process its one-time token.
pub fn link_cmd(sock: &Path, domid: u16, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dombus-link"));
    cmd.arg("--socket").arg(sock).arg("--domid").arg(domid.to_string()).args(args);
    if domid != 0 {
        let (_, token) = SimBackend::create_domain(sock, Some(DomId(domid)), "dombus-link").unwrap();
        cmd.env(dombus_transport_xen::sim::TOKEN_ENV, token);
    }
    cmd
}

/// Waits until a task of this (current-thread) runtime that waits on a store watch of `path`
/// by `backend`'s domain is parked on it: the watch is set up and every event of it so far has
/// been taken. Yields to the runtime meanwhile; panics after [`LIVENESS`].
///
/// Events are fenced first with a request of the domain's own: the simulator sends a domain its
/// events and replies in order, so every event caused before the fence has arrived when its reply
/// has. A waiter takes a watch's events and looks at the store again in one go (no await in
/// between), so once the queue is empty it has seen everything there was to see.
pub async fn parked_on_watch(backend: &SimBackend, path: &str) {
    let deadline = Instant::now() + LIVENESS;
    loop {
        if backend.watches().iter().any(|(p, _)| p == path) {
            backend.store().read(&format!("/local/domain/{}/domid", backend.domid().0)).unwrap();
            if backend.watches().iter().any(|(p, queued)| p == path && *queued == 0) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "domain {} never parked on a watch of {path} (its watches: {:?})",
            backend.domid(),
            backend.watches()
        );
        tokio::task::yield_now().await;
    }
}

/// Writes to `s` until a write has to wait (polled once, it is pending: no credit left); the
/// bytes taken. Nothing is left waiting: a later write starts afresh.
pub fn fill_window(s: &mut VsockStream) -> usize {
    let chunk = vec![0u8; 64 << 10];
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let mut taken = 0;
    loop {
        match std::pin::Pin::new(&mut *s).poll_write(&mut cx, &chunk) {
            std::task::Poll::Ready(Ok(n)) => taken += n,
            std::task::Poll::Ready(Err(e)) => panic!("write to the stalled connection failed: {e}"),
            std::task::Poll::Pending => return taken,
        }
        assert!(taken <= 64 << 20, "64 MiB taken for a reader that never reads");
    }
}

/// Value of `key=` in a `key=value` line.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}
