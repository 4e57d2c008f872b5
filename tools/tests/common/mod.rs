//! Helpers for multi-process tests: the simulator daemon and domain processes running the tools.
#![allow(dead_code, clippy::unwrap_used, missing_docs)]

pub mod scenarios;

// The transport's own test helpers (scratch directories, watches, credit windows): one copy.
#[path = "../../../transport-xen/tests/common/mod.rs"]
mod transport;
pub use transport::*;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use dombus_sim::SimBackend;
use dombus_transport_xen::types::DomId;

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
        cmd.env(dombus_sim::TOKEN_ENV, token);
    }
    cmd
}

/// Value of `key=` in a `key=value` line.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}
