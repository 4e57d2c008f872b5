//! Running a qemu: started from one long-lived thread so that it dies with the daemon, confined,
//! and watched until it exits.
//!
//! `PR_SET_PDEATHSIG` sends the child SIGKILL when the *thread* that forked it exits, so every
//! qemu is forked by the spawner thread, which lives as long as the process: the daemon killed
//! with SIGKILL takes its qemus with it. The child checks after `prctl` that its parent is still
//! the daemon (it may have died between the fork and the `prctl`), and exits if not.
//!
//! The child gets exactly one inherited descriptor, its end of the QMP socket pair, as fd 3;
//! everything else it is given later over QMP (`getfd`, `add-fd`). It runs in its working
//! directory under Landlock (read and execute on its program, the loader's paths and the
//! firmware directories; everything beneath its working directory; nothing else) and with
//! qemu's own seccomp filter (`-sandbox on,…`).

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, mpsc};

use tokio::io::AsyncReadExt as _;
use tokio::sync::{oneshot, watch};

use super::ExitReason;
use crate::sandbox::{self, Ruleset, Sandbox};

/// The descriptor number of qemu's end of its QMP socket pair.
pub(super) const QMP_FD: RawFd = 3;
/// How much of the end of qemu's stderr is kept, bytes (for an exit's reason).
const STDERR_TAIL: usize = 4096;

/// The directories qemu reads its firmware and option ROMs from (those that exist are allowed).
const FIRMWARE_PATHS: &[&str] = &[
    "/usr/share/qemu",
    "/usr/share/seabios",
    "/usr/lib/ipxe/qemu",
    "/usr/share/ipxe",
    "/usr/share/misc",
    "/etc/qemu",
];

/// How to start qemus.
#[derive(Debug)]
pub(super) struct Spawner {
    program: PathBuf,
    sandbox: Option<Sandbox>,
    requests: Mutex<mpsc::Sender<Request>>,
}

struct Request {
    cmd: tokio::process::Command,
    ruleset: Option<Ruleset>,
    reply: oneshot::Sender<io::Result<tokio::process::Child>>,
}

impl Spawner {
    /// A spawner of `program` (a path, or a name in `PATH`), confined by Landlock unless
    /// `sandboxed` is false; its thread starts here, in the runtime `handle`'s context.
    pub(super) fn new(
        program: &Path,
        sandboxed: bool,
        handle: tokio::runtime::Handle,
    ) -> io::Result<Spawner> {
        let program = sandbox::resolve(program)?;
        let sandbox = if sandboxed {
            let read: Vec<PathBuf> =
                FIRMWARE_PATHS.iter().map(PathBuf::from).filter(|p| p.exists()).collect();
            Some(Sandbox::new(&program, &read, &[])?)
        } else {
            None
        };
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new().name("qemu-spawner".into()).spawn(move || {
            let _runtime = handle.enter();
            for mut req in rx {
                let child = req.cmd.spawn();
                drop(req.ruleset.take());
                let _ = req.reply.send(child);
            }
            // The daemon dropped its spawner: its children must not die with this thread
            // while they still run, so it stays.
            loop {
                std::thread::park();
            }
        })?;
        Ok(Spawner { program, sandbox, requests: Mutex::new(tx) })
    }

    /// The program it runs.
    pub(super) fn program(&self) -> &Path {
        &self.program
    }

    /// Starts qemu with `args` in `workdir` (which it may write), its QMP end `qmp` as fd 3.
    pub(super) async fn spawn(&self, args: &[String], workdir: &Path, qmp: OwnedFd) -> io::Result<Qemu> {
        let mut cmd = tokio::process::Command::new(&self.program);
        cmd.args(args)
            .current_dir(workdir)
            .env_clear()
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let ruleset = match &self.sandbox {
            Some(s) => {
                let dir = sandbox::open_dir(workdir)?;
                Some(s.ruleset_with_dirs(&[], &[&dir])?)
            }
            None => None,
        };
        let landlock = ruleset.as_ref().map(|r| r.raw());
        let parent = rustix::process::getpid();
        let qmp_raw = qmp.as_raw_fd();
        // SAFETY: the closure runs in the child between fork and exec and makes only
        // async-signal-safe syscalls on descriptors the parent keeps open until the spawn
        // returns (`qmp`, the ruleset); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || child_setup(parent, qmp_raw, landlock));
        }
        let (reply, rx) = oneshot::channel();
        self.requests
            .lock()
            .map_err(|_| io::Error::other("the qemu spawner is poisoned"))?
            .send(Request { cmd, ruleset, reply })
            .map_err(|_| io::Error::other("the qemu spawner thread is gone"))?;
        let child = rx.await.map_err(|_| io::Error::other("the qemu spawner thread is gone"))??;
        drop(qmp);
        Ok(Qemu::watch(child))
    }
}

/// In the child: die with the daemon, fd 3 = the QMP end, Landlock. No allocation.
fn child_setup(parent: rustix::process::Pid, qmp: RawFd, landlock: Option<RawFd>) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG, SIGKILL) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // The daemon may have died between the fork and the prctl: then nothing would kill this.
    if rustix::process::getppid() != Some(parent) {
        return Err(io::Error::other("the daemon died while starting qemu"));
    }
    if qmp == QMP_FD {
        // dup2 onto itself would keep close-on-exec set: clear it.
        // SAFETY: fcntl on a descriptor this process owns.
        if unsafe { libc::fcntl(qmp, libc::F_SETFD, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
    } else {
        // SAFETY: dup2 onto fd 3; the new descriptor has close-on-exec cleared.
        if unsafe { libc::dup2(qmp, QMP_FD) } != QMP_FD {
            return Err(io::Error::last_os_error());
        }
    }
    if let Some(fd) = landlock {
        sandbox::restrict_self(fd)?;
    }
    Ok(())
}

/// A running (or exited) qemu.
#[derive(Debug, Clone)]
pub(super) struct Qemu {
    pid: Option<u32>,
    exit: watch::Receiver<Option<Exit>>,
    kill: Arc<tokio::sync::Notify>,
    /// Why the daemon kills it, if it does for a reason other than `stop`'s deadline.
    kill_reason: Arc<Mutex<Option<String>>>,
}

/// How a qemu ended: its status, and the end of its stderr.
#[derive(Debug, Clone)]
pub(super) struct Exit {
    /// The exit code, if it exited.
    pub code: Option<i32>,
    /// The signal, if one killed it.
    pub signal: Option<i32>,
    /// Whether this daemon killed it.
    pub killed_here: bool,
    /// Why, if not for `stop`'s deadline.
    pub kill_reason: Option<String>,
    /// The last lines of its stderr.
    pub stderr: String,
}

impl Exit {
    /// Why it ended, as [`ExitReason`]; `quit_asked` if `stop` had asked it to quit.
    pub(super) fn reason(&self, quit_asked: bool) -> ExitReason {
        if self.killed_here {
            return match &self.kill_reason {
                Some(reason) => ExitReason::Killed { reason: reason.clone() },
                None => ExitReason::KilledAfterDeadline,
            };
        }
        match (self.code, self.signal) {
            (Some(0), _) if quit_asked => ExitReason::Quit,
            (Some(code), _) => ExitReason::Exited { code, message: self.stderr.clone() },
            (None, signal) => {
                ExitReason::Signalled { signal: signal.unwrap_or(0), message: self.stderr.clone() }
            }
        }
    }
}

impl Qemu {
    fn watch(mut child: tokio::process::Child) -> Qemu {
        let pid = child.id();
        let (tx, exit) = watch::channel(None);
        let kill = Arc::new(tokio::sync::Notify::new());
        let stderr = child.stderr.take();
        let killer = kill.clone();
        let kill_reason = Arc::new(Mutex::new(None));
        let why = kill_reason.clone();
        tokio::spawn(async move {
            let tail = tokio::spawn(read_tail(stderr));
            let mut killed_here = false;
            let status = tokio::select! {
                s = child.wait() => s,
                () = killer.notified() => match child.try_wait() {
                    // It had exited already: its own status, not a kill.
                    Ok(Some(s)) => Ok(s),
                    _ => {
                        killed_here = true;
                        let _ = child.start_kill();
                        child.wait().await
                    }
                }
            };
            let kill_reason = if killed_here { why.lock().ok().and_then(|r| r.clone()) } else { None };
            let stderr = tail.await.unwrap_or_default();
            let (code, signal) = match &status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt as _;
                    (s.code(), s.signal())
                }
                Err(_) => (None, None),
            };
            let _ = tx.send(Some(Exit { code, signal, killed_here, kill_reason, stderr }));
        });
        Qemu { pid, exit, kill, kill_reason }
    }

    /// Its process id.
    pub(super) fn pid(&self) -> Option<u32> {
        self.pid
    }

    /// How it ended, if it has.
    pub(super) fn exited(&self) -> Option<Exit> {
        self.exit.borrow().clone()
    }

    /// Waits until it has exited.
    pub(super) async fn wait(&self) -> Exit {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Exit {
                    code: None,
                    signal: None,
                    killed_here: false,
                    kill_reason: None,
                    stderr: String::new(),
                };
            }
        }
    }

    /// Kills it (SIGKILL) at `stop`'s deadline and waits until it has exited.
    pub(super) async fn kill_at_deadline(&self) -> Exit {
        self.kill.notify_one();
        self.wait().await
    }

    /// Kills it (SIGKILL) for `reason` and waits until it has exited.
    pub(super) async fn kill(&self, reason: &str) -> Exit {
        self.start_kill(reason);
        self.wait().await
    }

    /// Kills it (SIGKILL) for `reason`, without waiting.
    pub(super) fn start_kill(&self, reason: &str) {
        if let Ok(mut r) = self.kill_reason.lock() {
            r.get_or_insert_with(|| reason.to_owned());
        }
        self.kill.notify_one();
    }
}

/// The last [`STDERR_TAIL`] bytes of `stderr`, read to its end; its last lines, trimmed.
async fn read_tail(stderr: Option<tokio::process::ChildStderr>) -> String {
    let Some(mut stderr) = stderr else { return String::new() };
    let mut tail: VecDeque<u8> = VecDeque::with_capacity(STDERR_TAIL);
    let mut buf = [0u8; 1024];
    loop {
        match stderr.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                for b in &buf[..n] {
                    if tail.len() == STDERR_TAIL {
                        tail.pop_front();
                    }
                    tail.push_back(*b);
                }
            }
        }
    }
    let bytes: Vec<u8> = tail.into();
    String::from_utf8_lossy(&bytes).trim().to_owned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::fd::AsFd as _;
    use std::time::Duration;

    use serde_json::json;

    use super::*;
    use crate::device_model::qmp::Qmp;

    fn qemu_here() -> bool {
        let found = std::process::Command::new("qemu-system-x86_64")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        let required = std::env::var("DOMBUS_TEST_REQUIRE_ALL").is_ok_and(|v| !v.is_empty() && v != "0")
            || std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
        assert!(
            found || !required,
            "qemu-system-x86_64 is missing (CI or DOMBUS_TEST_REQUIRE_ALL: every test must run)"
        );
        if !found {
            eprintln!("\n*** SKIPPED: qemu-system-x86_64 is not installed: this test did NOT run ***\n");
        }
        found
    }

    /// A sandboxed qemu cannot open a file by its path (an image not given to it), and opens
    /// the same file through a descriptor the daemon hands it; it dies with its spawner's
    /// process, which here outlives it, and its exit is seen.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sandboxed_qemu_opens_only_what_it_is_given() {
        if !qemu_here() || sandbox::abi().is_none() {
            return;
        }
        let dir = std::env::temp_dir().join(format!("dombus-dm-sandbox-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("work")).unwrap();
        let image = dir.join("outside.raw");
        std::fs::write(&image, vec![0u8; 65536]).unwrap();
        let spawner =
            Spawner::new(Path::new("qemu-system-x86_64"), true, tokio::runtime::Handle::current()).unwrap();
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let args: Vec<String> = ["-machine", "none", "-nodefaults", "-display", "none", "-S", "-chardev"]
            .iter()
            .map(|s| (*s).to_owned())
            .chain([format!("socket,id=q,fd={QMP_FD}"), "-mon".into(), "chardev=q,mode=control".into()])
            .collect();
        let qemu = spawner.spawn(&args, &dir.join("work"), theirs.into()).await.unwrap();
        ours.set_nonblocking(true).unwrap();
        let qmp = Qmp::from_stream(
            tokio::net::UnixStream::from_std(ours).unwrap(),
            Duration::from_secs(10),
            |_| {},
        )
        .await
        .unwrap();

        let by_path = qmp
            .execute_raw(
                "blockdev-add",
                json!({"driver": "file", "node-name": "p", "filename": image.display().to_string()}),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(by_path.contains("Permission denied"), "{by_path}");
        // Its working directory is its own.
        let inside = dir.join("work/inside.raw");
        std::fs::write(&inside, vec![0u8; 4096]).unwrap();
        qmp.execute_raw(
            "blockdev-add",
            json!({"driver": "file", "node-name": "w", "filename": inside.display().to_string()}),
        )
        .await
        .unwrap();

        let file = std::fs::OpenOptions::new().read(true).write(true).open(&image).unwrap();
        let set = qmp
            .execute_with_fd(qapi::qmp::add_fd { fdset_id: None, opaque: None }, file.as_fd())
            .await
            .unwrap();
        qmp.execute_raw(
            "blockdev-add",
            json!({"driver": "file", "node-name": "d", "filename": format!("/dev/fdset/{}", set.fdset_id)}),
        )
        .await
        .unwrap();

        let _ = qmp.execute(qapi::qmp::quit {}).await;
        let exit = tokio::time::timeout(Duration::from_secs(10), qemu.wait()).await.unwrap();
        assert_eq!(exit.code, Some(0), "{exit:?}");
        assert_eq!(qemu.exited().map(|e| e.reason(true)), Some(ExitReason::Quit));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
