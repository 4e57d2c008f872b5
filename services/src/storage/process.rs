//! Running `qemu-img`: each call a child process in the storage root, in a Landlock sandbox
//! that lets it open only the files of that call, its output read up to a bound, killed when
//! the call is dropped (its deadline passed, its client went away), its `-p` progress lines
//! reported as they come, and its failure turned into a [`StorageError`].

use std::ffi::OsString;
use std::io::{self, Read as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::{Child, Command};

use super::StorageError;
use super::root::io_error;
use crate::sandbox::{self, Access, Ruleset, Sandbox};

/// The tool's name in [`StorageError::ToolFailed`].
pub(super) const TOOL: &str = "qemu-img";
/// How much of a tool's stderr is kept in an error.
const MAX_MESSAGE: usize = 4096;
/// How much of a tool's stderr is read (the rest is drained).
const MAX_STDERR: usize = 64 << 10;
/// How much of a tool's stdout is read (qemu-img info of an image with many snapshots).
const MAX_STDOUT: usize = 16 << 20;
/// Longest progress line looked at.
const MAX_PROGRESS_LINE: usize = 256;

/// The `qemu-img` of a storage root, and how each of its processes is started.
#[derive(Debug)]
pub(super) struct QemuImgProgram {
    /// The program (resolved to a path).
    program: PathBuf,
    /// The root: the processes' working directory, and what their messages are relative to.
    root: PathBuf,
    /// The Landlock base of every qemu-img's ruleset; `None` if the sandbox is off.
    sandbox: Option<Sandbox>,
    /// qemu-img processes started.
    runs: AtomicU64,
}

impl QemuImgProgram {
    /// The `qemu-img` at `program` (a path or a name looked up in `PATH`) for the root `root`,
    /// and its version line. Fails if `qemu-img --version` does not run, or if `sandbox` and
    /// the kernel has no Landlock; `sandbox_read` and `sandbox_write` are what the sandbox
    /// allows besides the files of each call (see `StorageConfig`).
    pub(super) fn start(
        program: &Path,
        root: &Path,
        sandbox: bool,
        sandbox_read: &[PathBuf],
        sandbox_write: &[PathBuf],
    ) -> io::Result<(QemuImgProgram, String)> {
        let version = std::process::Command::new(program)
            .arg("--version")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot run {} ({e}); install it (Debian: apt-get install qemu-utils) or give its path",
                        program.display()
                    ),
                )
            })?;
        if !version.status.success() {
            return Err(io::Error::other(format!(
                "{} --version failed ({}): {}; install qemu-img (Debian: apt-get install qemu-utils)",
                program.display(),
                version.status,
                bounded_message(&version.stderr)
            )));
        }
        let version = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or_default().to_owned();
        let program = sandbox::resolve(program)?;

        let sandbox = if sandbox {
            let s = Sandbox::new(&program, sandbox_read, sandbox_write).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot sandbox qemu-img with Landlock ({e}); refusing to run it unconfined on \
                         images guests write: enable Landlock (CONFIG_SECURITY_LANDLOCK, lsm=landlock), \
                         or start with --no-sandbox to accept the risk"
                    ),
                )
            })?;
            Some(s)
        } else {
            tracing::warn!(root = %root.display(), "the qemu-img sandbox is OFF (--no-sandbox): qemu-img can reach every file this process can");
            None
        };
        let qemu_img = QemuImgProgram { program, root: root.to_owned(), sandbox, runs: AtomicU64::new(0) };
        Ok((qemu_img, version))
    }

    /// The program's path.
    pub(super) fn path(&self) -> &Path {
        &self.program
    }

    /// Whether its processes run in the sandbox.
    pub(super) fn sandboxed(&self) -> bool {
        self.sandbox.is_some()
    }

    /// How many processes it has started.
    pub(super) fn runs(&self) -> u64 {
        self.runs.load(Ordering::Relaxed)
    }

    /// The command running qemu-img with `args` in the root, confined (if the sandbox is on) to
    /// the call's `files`; the ruleset must live until the child is spawned.
    fn command(
        &self,
        name: &str,
        args: &[OsString],
        files: &[(&Path, Access)],
    ) -> Result<(std::process::Command, Option<Ruleset>), StorageError> {
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(args).current_dir(&self.root).env("LC_ALL", "C").stdin(Stdio::null());
        let Some(sandbox) = &self.sandbox else { return Ok((cmd, None)) };
        let mut fds = Vec::with_capacity(files.len());
        for (path, access) in files {
            fds.push((sandbox::open_file(path).map_err(|e| io_error(name, e))?, *access));
        }
        let refs: Vec<_> = fds.iter().map(|(fd, a)| (fd, *a)).collect();
        let ruleset = sandbox.ruleset(&refs).map_err(|e| StorageError::ToolFailed {
            tool: TOOL.into(),
            status: "not started".into(),
            message: format!("cannot build its Landlock sandbox: {e}"),
        })?;
        let fd = ruleset.raw();
        // SAFETY: the closure runs in the child between fork and exec; restrict_self makes two
        // syscalls on a descriptor inherited from the parent (alive: `ruleset` is returned to
        // the caller, which keeps it until the spawn), and allocates nothing.
        unsafe {
            cmd.pre_exec(move || sandbox::restrict_self(fd));
        }
        Ok((cmd, Some(ruleset)))
    }

    /// Runs `qemu-img args` (killed if this future is dropped) in the root, in its sandbox
    /// allowing `files`; its stdout, or the error its failure means. With `progress`, each `-p`
    /// line of stdout is reported to it as a percentage.
    pub(super) async fn run(
        &self,
        name: &str,
        args: Vec<OsString>,
        progress: Option<&(dyn Fn(f32) + Sync)>,
        files: &[(&Path, Access)],
    ) -> Result<Vec<u8>, StorageError> {
        tracing::debug!(qemu_img = %self.program.display(), ?args, "running");
        let (cmd, ruleset) = self.command(name, &args, files)?;
        let mut cmd = Command::from(cmd);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        self.runs.fetch_add(1, Ordering::Relaxed);
        let spawned = cmd.spawn();
        drop(ruleset);
        let mut child = spawned.map_err(|e| self.not_started(e))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut child = ChildGuard(Some(child));
        let (out, err, status) =
            tokio::join!(read_stdout(stdout, progress), read_bounded(stderr, MAX_STDERR), child.wait(),);
        let status = status.map_err(wait_failed)?;
        tracing::debug!(%status, "qemu-img ended");
        self.outcome(name, status, out, &err)
    }

    /// [`Self::run`] blocking, for adoption (at start, or of an image the operator placed since).
    pub(super) fn run_sync(
        &self,
        name: &str,
        args: &[OsString],
        files: &[(&Path, Access)],
    ) -> Result<Vec<u8>, StorageError> {
        let (mut cmd, ruleset) = self.command(name, args, files)?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.runs.fetch_add(1, Ordering::Relaxed);
        let spawned = cmd.spawn();
        drop(ruleset);
        let mut child = spawned.map_err(|e| self.not_started(e))?;
        // stderr on a thread of its own (kept up to MAX_STDERR, the rest drained), so that
        // neither pipe can fill while the other is read.
        let stderr = child.stderr.take();
        let stderr = std::thread::spawn(move || {
            let mut err = Vec::new();
            if let Some(mut e) = stderr {
                let _ = (&mut e).take(MAX_STDERR as u64).read_to_end(&mut err);
                let _ = io::copy(&mut e, &mut io::sink());
            }
            err
        });
        let mut out = Vec::new();
        if let Some(stdout) = child.stdout.take() {
            let _ = stdout.take(MAX_STDOUT as u64 + 1).read_to_end(&mut out);
        }
        if out.len() > MAX_STDOUT {
            // Past the bound: killed (its output is not trusted to end), and a failure.
            let _ = child.kill();
        }
        let err = stderr.join().unwrap_or_default();
        let status = child.wait().map_err(wait_failed)?;
        self.outcome(name, status, out, &err)
    }

    /// The error of a qemu-img that could not be started.
    fn not_started(&self, e: io::Error) -> StorageError {
        StorageError::ToolFailed {
            tool: TOOL.into(),
            status: "not started".into(),
            message: format!("cannot run {}: {e}", self.program.display()),
        }
    }

    /// Its stdout `out` if the process ended well, else the error its stderr `err` means.
    fn outcome(
        &self,
        name: &str,
        status: ExitStatus,
        out: Vec<u8>,
        err: &[u8],
    ) -> Result<Vec<u8>, StorageError> {
        if status.success() { Ok(out) } else { Err(failure(name, status, &self.root, err)) }
    }
}

/// The error of a process that could not be waited for.
fn wait_failed(e: io::Error) -> StorageError {
    StorageError::ToolFailed {
        tool: TOOL.into(),
        status: "unknown".into(),
        message: format!("waiting for it: {e}"),
    }
}

/// A `qemu-img -p` progress line (`    (12.34/100%)`), as a percentage.
fn parse_progress(line: &str) -> Option<f32> {
    let inner = line.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    let p: f32 = inner.trim().parse().ok()?;
    (p.is_finite() && (0.0..=100.0).contains(&p)).then_some(p)
}

/// The error a failed `qemu-img` run on `name` in `root` means (paths in its message are shown
/// relative to the root: callers know names, not where the root is).
fn failure(name: &str, status: ExitStatus, root: &Path, stderr: &[u8]) -> StorageError {
    let message = bounded_message(stderr).replace(&format!("{}/", root.display()), "");
    if message.contains("No space left on device") || message.contains("Disk quota exceeded") {
        StorageError::NoSpace { message }
    } else if message.contains("Failed to get") && message.contains("lock") {
        StorageError::Busy {
            name: name.to_owned(),
            operation: format!("in use by another process: {message}"),
        }
    } else {
        StorageError::ToolFailed { tool: TOOL.into(), status: status.to_string(), message }
    }
}

/// A tool's stderr for an error: lossy UTF-8, trimmed, at most [`MAX_MESSAGE`] bytes.
fn bounded_message(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.len() <= MAX_MESSAGE {
        return text.to_owned();
    }
    let mut end = MAX_MESSAGE;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// Reads `stdout` (up to [`MAX_STDOUT`]), reporting `-p` progress lines to `progress`.
async fn read_stdout(
    stdout: Option<impl AsyncRead + Unpin>,
    progress: Option<&(dyn Fn(f32) + Sync)>,
) -> Vec<u8> {
    let Some(mut stdout) = stdout else { return Vec::new() };
    let mut out = Vec::new();
    let mut line = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match stdout.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let chunk = &buf[..n];
        if out.len() < MAX_STDOUT {
            out.extend_from_slice(&chunk[..n.min(MAX_STDOUT - out.len())]);
        }
        if let Some(report) = progress {
            for &b in chunk {
                if b == b'\r' || b == b'\n' {
                    if let Some(p) = std::str::from_utf8(&line).ok().and_then(parse_progress) {
                        report(p);
                    }
                    line.clear();
                } else if line.len() < MAX_PROGRESS_LINE {
                    line.push(b);
                }
            }
        }
    }
    out
}

/// Reads all of `r`, keeping the first `limit` bytes.
async fn read_bounded(r: Option<impl AsyncRead + Unpin>, limit: usize) -> Vec<u8> {
    let Some(mut r) = r else { return Vec::new() };
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.len() < limit {
                    out.extend_from_slice(&buf[..n.min(limit - out.len())]);
                }
            }
        }
    }
    out
}

/// A running child: waited for, or killed when dropped first (the call was cancelled).
struct ChildGuard(Option<Child>);

impl ChildGuard {
    async fn wait(&mut self) -> io::Result<ExitStatus> {
        let Some(child) = self.0.as_mut() else { return Err(io::Error::other("no child")) };
        let status = child.wait().await?;
        self.0 = None;
        Ok(status)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let pid = child.id();
            let _ = child.start_kill();
            tracing::debug!(?pid, "qemu-img killed (call cancelled)");
            // Reap it (tokio would too, later); nothing waits for this.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    let _ = child.wait().await;
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_progress_lines() {
        assert_eq!(parse_progress("    (12.34/100%)"), Some(12.34));
        assert_eq!(parse_progress("    (0.00/100%)"), Some(0.0));
        assert_eq!(parse_progress("(100.00/100%)\r"), Some(100.0));
        for bad in [
            "",
            "(",
            "12.34",
            "(12.34/100)",
            "(x/100%)",
            "(-1.00/100%)",
            "(101.00/100%)",
            "(NaN/100%)",
            "(inf/100%)",
        ] {
            assert_eq!(parse_progress(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn failures_are_typed_and_bounded() {
        use std::os::unix::process::ExitStatusExt as _;
        let status = ExitStatus::from_raw(1 << 8);
        let root = Path::new("/srv/images");
        let e = failure(
            "d",
            status,
            root,
            b"qemu-img: /srv/images/.tmp-d-1: Could not write qcow2 header: Permission denied",
        );
        assert_eq!(
            e,
            StorageError::ToolFailed {
                tool: "qemu-img".into(),
                status: "exit status: 1".into(),
                message: "qemu-img: .tmp-d-1: Could not write qcow2 header: Permission denied".into()
            }
        );
        let e = failure(
            "d",
            status,
            root,
            b"qemu-img: error while writing at byte 2097152: No space left on device\n",
        );
        assert!(matches!(e, StorageError::NoSpace { .. }), "{e:?}");
        let e = failure("d", status, root, b"qemu-img: Could not open 'd': Failed to get \"write\" lock\nIs another process using the image [d]?");
        assert!(matches!(e, StorageError::Busy { .. }), "{e:?}");
        let long = "é".repeat(10_000);
        match failure("d", status, root, long.as_bytes()) {
            StorageError::ToolFailed { tool, status, message } => {
                assert_eq!(tool, "qemu-img");
                assert_eq!(status, "exit status: 1");
                assert!(message.len() <= MAX_MESSAGE + 4);
            }
            e => panic!("{e:?}"),
        }
    }

    /// Stdout is kept up to its bound and read to its end; the progress lines in it, split
    /// across reads and ended by `\r` or `\n`, are reported in order, the others ignored.
    #[tokio::test]
    async fn stdout_is_bounded_and_its_progress_reported() {
        let mut text = b"    (0.00/100%)\r    (12.".to_vec();
        text.extend_from_slice(b"50/100%)\rnot progress\n(101.00/100%)\n(100.00/100%)\n");
        let reported = Mutex::new(Vec::new());
        let report = |p: f32| reported.lock().unwrap().push(p);
        // A reader giving a few bytes at a time, so lines are split across reads.
        let (mut w, r) = tokio::io::duplex(7);
        let input = text.clone();
        let writer = async move {
            tokio::io::AsyncWriteExt::write_all(&mut w, &input).await.unwrap();
        };
        let (out, ()) = tokio::join!(read_stdout(Some(r), Some(&report)), writer);
        assert_eq!(out, text);
        assert_eq!(*reported.lock().unwrap(), [0.0, 12.5, 100.0]);

        let big = vec![b'x'; MAX_STDOUT + 10_000];
        let out = read_stdout(Some(&big[..]), None).await;
        assert_eq!(out.len(), MAX_STDOUT);
        let out = read_bounded(Some(&big[..]), 100).await;
        assert_eq!(out, vec![b'x'; 100]);
    }

    proptest! {
        #[test]
        fn progress_parsing_never_panics(line in "\\PC{0,40}") {
            let _ = parse_progress(&line);
        }
    }
}
