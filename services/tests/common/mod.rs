//! What the storage tests share: prerequisites that fail in CI instead of skipping, and a
//! qemu-img whose `convert` the test can hold or slow down.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// True where every test must run: in CI (`CI` set) and under `scripts/test-all`, which
/// installs every prerequisite and sets `DOMBUS_TEST_REQUIRE_ALL=1`.
pub fn all_required() -> bool {
    let set = |v: &str| std::env::var(v).is_ok_and(|s| !s.is_empty() && s != "0" && s != "false");
    set("CI") || set("DOMBUS_TEST_REQUIRE_ALL")
}

/// This machine lacks `what`, which `test` needs: a failure where every test must run
/// ([`all_required`]), else a loud note that the test did not run. The test returns after it.
pub fn missing_prerequisite(test: &str, what: &str) {
    assert!(!all_required(), "{test}: {what} (CI or DOMBUS_TEST_REQUIRE_ALL: every test must run)");
    // Straight to the process's stderr: libtest's capture (which hides eprintln! of a passing
    // test) must not hide that this test did not run.
    let _ = writeln!(
        std::io::stderr().lock(),
        "\n*** SKIPPED {test}: {what}: this test did NOT run (scripts/test-all installs what it needs) ***\n"
    );
}

/// The real qemu-img behind a wrapper script in a directory of its own, so that a test decides
/// how long a `convert` (the copy of a full clone) takes instead of guessing how fast this
/// machine copies:
/// - [`QemuImgGate::hold_converts`]: qemu-img runs at full speed, but its `-p` output reaches
///   the service only up to the first progress strictly between 0 and 100 %; the rest (and so
///   the end of the operation, as the service sees it) waits until [`QemuImgGate::release`].
/// - [`QemuImgGate::slow_converts`]: qemu-img copies at a rate limit (`convert -r`), so that it
///   is still copying when the test cancels it, and the cancellation kills a real copy.
///
/// Every other command, and `convert` by default, is qemu-img unchanged.
pub struct QemuImgGate {
    dir: PathBuf,
}

const WRAPPER: &str = r#"#!/usr/bin/env bash
# qemu-img for the storage tests: the real one; `convert` held or slowed as the file `mode`
# beside this script says (written by the test: see services/tests/common/mod.rs).
set -euo pipefail
here=$(dirname "$0")
mode=$(cat "$here/mode" 2>/dev/null || echo pass)
if [ "${1-}" != convert ] || [ "$mode" = pass ]; then
    exec qemu-img "$@"
fi
shift
hold_after_progress() {
    # Passes qemu-img's -p output (records ending in \r) through up to the first progress
    # strictly between 0 and 100, then holds the rest until `release` exists (at most 120 s,
    # so that a test that died leaves nothing behind for long).
    local line held=
    while IFS= read -r -d $'\r' line; do
        printf '%s\r' "$line"
        if [ -z "$held" ] && [[ $line =~ \(([0-9]+\.[0-9]+)/100%\) ]] &&
            [ "${BASH_REMATCH[1]}" != 0.00 ] && [ "${BASH_REMATCH[1]}" != 100.00 ]; then
            held=1
            : >"$here/held"
            for _ in $(seq 12000); do
                [ -e "$here/release" ] && break
                sleep 0.01
            done
        fi
    done
    printf '%s' "$line"
}
case $mode in
hold)
    # qemu-img stays the process the service started (its kill reaches qemu-img itself).
    exec qemu-img convert "$@" > >(hold_after_progress)
    ;;
slow\ *)
    exec qemu-img convert -r "${mode#slow }" "$@"
    ;;
*)
    echo "qemu-img wrapper: unknown mode '$mode'" >&2
    exit 99
    ;;
esac
"#;

impl QemuImgGate {
    /// A wrapper in a new directory (outside any storage root), passing everything through.
    pub fn new(tag: &str) -> QemuImgGate {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("dombus-qemu-img-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        let script = dir.join("qemu-img");
        std::fs::write(&script, WRAPPER).unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        QemuImgGate { dir }
    }

    /// The program to give the service as its qemu-img.
    pub fn program(&self) -> PathBuf {
        self.dir.join("qemu-img")
    }

    /// What the service's sandbox must let the wrapper do besides running qemu-img: execute
    /// bash and the tools it calls (in `/usr/bin`), and read and write its state files (in its
    /// own directory, outside the root) and `/dev/null`. Given to the service explicitly (the
    /// default sandbox allows none of it).
    pub fn sandbox_paths(&self) -> (Vec<PathBuf>, Vec<PathBuf>) {
        (vec!["/usr/bin".into()], vec![self.dir.clone(), "/dev/null".into()])
    }

    /// The service configuration running this wrapper: the default, plus [`Self::sandbox_paths`].
    pub fn config(&self) -> dombus_services::storage::StorageConfig {
        let (sandbox_read, sandbox_write) = self.sandbox_paths();
        dombus_services::storage::StorageConfig { sandbox_read, sandbox_write, ..Default::default() }
    }

    /// The daemon's command-line arguments for [`Self::sandbox_paths`].
    pub fn sandbox_args(&self) -> Vec<std::ffi::OsString> {
        let (read, write) = self.sandbox_paths();
        let mut args = Vec::new();
        for p in read {
            args.extend(["--sandbox-read".into(), p.into_os_string()]);
        }
        for p in write {
            args.extend(["--sandbox-write".into(), p.into_os_string()]);
        }
        args
    }

    fn set_mode(&self, mode: &str) {
        let _ = std::fs::remove_file(self.dir.join("held"));
        let _ = std::fs::remove_file(self.dir.join("release"));
        // Written under another name and renamed: a qemu-img starting now reads all of it.
        std::fs::write(self.dir.join("mode.new"), mode).unwrap();
        std::fs::rename(self.dir.join("mode.new"), self.dir.join("mode")).unwrap();
    }

    /// From the next `convert` on: hold each at its first progress between 0 and 100 %.
    pub fn hold_converts(&self) {
        self.set_mode("hold");
    }

    /// From the next `convert` on: copy at `rate` (qemu-img's `-r`, e.g. `4M` a second).
    pub fn slow_converts(&self, rate: &str) {
        self.set_mode(&format!("slow {rate}"));
    }

    /// Whether a held `convert` has reached its hold.
    pub fn held(&self) -> bool {
        self.dir.join("held").exists()
    }

    /// Lets held converts finish.
    pub fn release(&self) {
        std::fs::write(self.dir.join("release"), b"").unwrap();
    }
}

impl Drop for QemuImgGate {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("release"), b"");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How long a step may take before the test calls it hung: a liveness limit, minutes of
/// headroom over what each step takes here, never a measure of speed.
pub const LIVENESS: Duration = Duration::from_secs(120);

/// Pids of live (not zombie) processes whose command line mentions `needle`.
pub fn processes_mentioning(needle: &Path) -> Vec<u32> {
    let needle = needle.to_string_lossy().into_owned();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        if String::from_utf8_lossy(&cmdline).contains(&needle) && pid != std::process::id() {
            pids.push(pid);
        }
    }
    pids
}

/// A unique temporary directory (canonical path), removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new directory named after `tag`, this process and the time.
    pub fn new(tag: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let dir = std::env::temp_dir().join(format!("dombus-storage-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir.canonicalize().unwrap())
    }

    /// `name` inside it.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The error `r` must be.
pub fn err<T: std::fmt::Debug, E>(r: Result<T, E>) -> E {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e,
    }
}

/// The network of simulated domain `id` on the hypervisor at `sock` (a domain boots once).
pub fn sim_net(sock: &Path, id: u16) -> dombus::Net {
    use dombus::sim::SimBackend;
    use dombus::transport::types::DomId;
    use dombus::transport::vsock::domain::{VsockConfig, VsockDomain};
    let domain =
        VsockDomain::start(SimBackend::boot(sock, Some(DomId(id))).unwrap(), VsockConfig::default()).unwrap();
    let mut net = dombus::Net::new().with_xen(domain);
    net.xen_connect_wait = Some(Duration::from_secs(10));
    net
}
