//! The Landlock sandbox the services' children run in: each `qemu-img` of the storage service,
//! each qemu of the device-model service.
//!
//! A ruleset is built in the parent for each child (allocation and `open` are fine there), from
//! a fixed base — read and execute on the program and on what the dynamic loader needs to start
//! it (the system library directories, `/etc/ld.so.cache`), plus the paths the configuration
//! names explicitly — and the files of that one call: read on the images it reads, read-write on
//! the image or the temporary file it writes. The child applies it in `pre_exec` with two raw
//! syscalls (`prctl(PR_SET_NO_NEW_PRIVS)`, `landlock_restrict_self`), which allocate nothing.
//! Every file-system right the kernel knows is handled, so anything not named here (the rest of
//! the root, `/tmp`, `/home`, `/etc`, other roots) is refused with `EACCES`; from ABI 4 on TCP
//! bind and connect are refused too, and from ABI 6 on signals and abstract unix sockets outside
//! the sandbox.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::{Path, PathBuf};

/// `LANDLOCK_CREATE_RULESET_VERSION`: ask for the ABI version.
const CREATE_RULESET_VERSION: u32 = 1;
/// `LANDLOCK_RULE_PATH_BENEATH`.
const RULE_PATH_BENEATH: libc::c_int = 1;

const EXECUTE: u64 = 1 << 0;
const WRITE_FILE: u64 = 1 << 1;
const READ_FILE: u64 = 1 << 2;
const READ_DIR: u64 = 1 << 3;
const TRUNCATE: u64 = 1 << 14;
const IOCTL_DEV: u64 = 1 << 15;
/// The rights that apply to a file (not a directory) in a rule.
const FILE_RIGHTS: u64 = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV;

/// Every file-system right of ABI `abi` (1: bits 0-12, 2: + REFER, 3: + TRUNCATE, 5: + IOCTL_DEV).
fn fs_rights(abi: u32) -> u64 {
    match abi {
        0 => 0,
        1 => (1 << 13) - 1,
        2 => (1 << 14) - 1,
        3 | 4 => (1 << 15) - 1,
        _ => (1 << 16) - 1,
    }
}

/// `struct landlock_ruleset_attr` (ABI 6).
#[repr(C)]
struct RulesetAttr {
    handled_access_fs: u64,
    handled_access_net: u64,
    scoped: u64,
}

/// `struct landlock_path_beneath_attr` (packed in the kernel's UAPI).
#[repr(C, packed)]
struct PathBeneathAttr {
    allowed_access: u64,
    parent_fd: i32,
}

/// The Landlock ABI version of the running kernel; `None` if it has none (or it is disabled).
pub(crate) fn abi() -> Option<u32> {
    // SAFETY: landlock_create_ruleset with a null attribute, size 0 and the VERSION flag reads
    // nothing and creates nothing; it returns the ABI version or -1.
    let v = unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<RulesetAttr>(),
            0usize,
            CREATE_RULESET_VERSION,
        )
    };
    u32::try_from(v).ok().filter(|v| *v > 0)
}

/// What a call's child may do with one of its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// Read it.
    Read,
    /// Read, write and truncate it.
    ReadWrite,
}

/// The base of every child's ruleset.
#[derive(Debug)]
pub(crate) struct Sandbox {
    abi: u32,
    /// O_PATH descriptors of the base paths, and the rights each gets.
    base: Vec<(OwnedFd, u64)>,
}

/// The directories and files the dynamic loader and the C library need to start a program.
const LOADER_PATHS: &[&str] = &[
    "/lib",
    "/lib32",
    "/lib64",
    "/usr/lib",
    "/usr/lib32",
    "/usr/lib64",
    "/usr/local/lib",
    "/etc/ld.so.cache",
];

impl Sandbox {
    /// The base for children running `program` (a path, or a name looked up in `PATH`):
    /// read-execute on it and on [`LOADER_PATHS`] (those that exist), read-execute on
    /// `extra_read`, everything on `extra_write` (the configuration's explicit additions), read-write
    /// on `/dev/null`.
    /// Fails if the kernel has no Landlock.
    pub(crate) fn new(
        program: &Path,
        extra_read: &[PathBuf],
        extra_write: &[PathBuf],
    ) -> io::Result<Sandbox> {
        let abi = abi().ok_or_else(|| {
            io::Error::new(io::ErrorKind::Unsupported, "this kernel has no Landlock (or it is disabled)")
        })?;
        let all = fs_rights(abi);
        let read = EXECUTE | READ_FILE | READ_DIR;
        let mut base = Vec::new();
        let program = resolve(program)?;
        base.push((open_path(&program)?, read));
        for p in LOADER_PATHS {
            match open_path(Path::new(p)) {
                Ok(fd) => base.push((fd, read)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io::Error::new(e.kind(), format!("{p}: {e}"))),
            }
        }
        // qemu probes its file locks (OFD or POSIX) on /dev/null: without it, it falls back to
        // POSIX locks and no longer sees another process's lock on an image.
        base.push((open_path(Path::new("/dev/null"))?, READ_FILE | WRITE_FILE));
        for (paths, rights) in [(extra_read, read), (extra_write, all)] {
            for p in paths {
                let fd =
                    open_path(p).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", p.display())))?;
                base.push((fd, rights));
            }
        }
        Ok(Sandbox { abi, base })
    }

    /// The ruleset of one child: the base plus `files` (O_PATH descriptors of regular files).
    pub(crate) fn ruleset(&self, files: &[(&OwnedFd, Access)]) -> io::Result<Ruleset> {
        self.ruleset_with_dirs(files, &[])
    }

    /// The ruleset of one child: the base, `files` (O_PATH descriptors of regular files) and
    /// every right beneath the directories `dirs` (O_PATH descriptors, [`open_dir`]).
    pub(crate) fn ruleset_with_dirs(
        &self,
        files: &[(&OwnedFd, Access)],
        dirs: &[&OwnedFd],
    ) -> io::Result<Ruleset> {
        let attr = RulesetAttr {
            handled_access_fs: fs_rights(self.abi),
            // TCP bind and connect (ABI 4), abstract unix sockets and signals (ABI 6).
            handled_access_net: if self.abi >= 4 { 0b11 } else { 0 },
            scoped: if self.abi >= 6 { 0b11 } else { 0 },
        };
        let size = match self.abi {
            1..=3 => 8,
            4 | 5 => 16,
            _ => std::mem::size_of::<RulesetAttr>(),
        };
        // SAFETY: `attr` is a valid landlock_ruleset_attr of at least `size` bytes, which the
        // kernel only reads.
        let fd = unsafe { libc::syscall(libc::SYS_landlock_create_ruleset, &raw const attr, size, 0u32) };
        let fd = RawFd::try_from(fd).ok().filter(|fd| *fd >= 0).ok_or_else(io::Error::last_os_error)?;
        // SAFETY: the syscall returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let handled = fs_rights(self.abi);
        for (path, rights) in &self.base {
            add_rule(&fd, path, rights & handled)?;
        }
        for (file, access) in files {
            let rights = match access {
                Access::Read => READ_FILE,
                Access::ReadWrite => READ_FILE | WRITE_FILE | TRUNCATE,
            };
            add_rule(&fd, file, rights & handled)?;
        }
        for dir in dirs {
            add_rule(&fd, dir, handled)?;
        }
        Ok(Ruleset(fd))
    }
}

/// A ruleset ready to apply in a child.
#[derive(Debug)]
pub(crate) struct Ruleset(OwnedFd);

impl Ruleset {
    /// The descriptor to give [`restrict_self`] in the child.
    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// Confines the calling process (and what it executes) to the ruleset `fd`. For `pre_exec`:
/// two syscalls, no allocation, no lock.
pub(crate) fn restrict_self(fd: RawFd) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) takes no pointers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0 as libc::c_ulong, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: landlock_restrict_self takes a descriptor and flags, no pointers.
    if unsafe { libc::syscall(libc::SYS_landlock_restrict_self, fd, 0u32) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn add_rule(ruleset: &OwnedFd, path: &OwnedFd, rights: u64) -> io::Result<()> {
    let is_dir = rustix::fs::fstat(path).map(|s| rustix::fs::FileType::from_raw_mode(s.st_mode).is_dir())?;
    let rights = if is_dir { rights } else { rights & FILE_RIGHTS };
    if rights == 0 {
        return Ok(());
    }
    let attr = PathBeneathAttr { allowed_access: rights, parent_fd: path.as_raw_fd() };
    // SAFETY: `attr` is a valid landlock_path_beneath_attr the kernel only reads; both
    // descriptors are open.
    let r = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset.as_raw_fd(),
            RULE_PATH_BENEATH,
            &raw const attr,
            0u32,
        )
    };
    if r != 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// An `O_PATH` descriptor of `path` (following symlinks: the rule is on what it names).
fn open_path(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

/// An `O_PATH` descriptor of the regular file `path`, not following a symlink.
pub(crate) fn open_file(path: &Path) -> io::Result<OwnedFd> {
    let fd = rustix::fs::open(
        path,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if !rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a regular file", path.display()),
        ));
    }
    Ok(fd)
}

/// An `O_PATH` descriptor of the directory `path`, not following a symlink.
pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        rustix::fs::OFlags::PATH
            | rustix::fs::OFlags::DIRECTORY
            | rustix::fs::OFlags::NOFOLLOW
            | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?)
}

/// `program` as a path: itself if it has a `/`, else the first executable of that name in `PATH`.
pub(crate) fn resolve(program: &Path) -> io::Result<PathBuf> {
    if program.as_os_str().as_bytes().contains(&b'/') {
        return Ok(program.to_owned());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(program);
        let Ok(c) = CString::new(candidate.as_os_str().as_bytes()) else { continue };
        // SAFETY: `c` is a valid NUL-terminated string.
        if unsafe { libc::access(c.as_ptr(), libc::X_OK) } == 0 && candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(io::ErrorKind::NotFound, format!("{} not found in PATH", program.display())))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::os::unix::process::CommandExt as _;
    use std::process::Command;

    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dombus-sandbox-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Runs `program args` in a sandbox allowing `files`; its exit status and stderr.
    fn run_in(program: &str, args: &[&Path], files: &[(&Path, Access)]) -> (bool, String) {
        let sandbox = Sandbox::new(Path::new(program), &[], &[]).unwrap();
        let fds: Vec<_> = files.iter().map(|(p, a)| (open_file(p).unwrap(), *a)).collect();
        let refs: Vec<_> = fds.iter().map(|(f, a)| (f, *a)).collect();
        let ruleset = sandbox.ruleset(&refs).unwrap();
        let raw = ruleset.raw();
        let mut cmd = Command::new(resolve(Path::new(program)).unwrap());
        cmd.args(args).env("LC_ALL", "C");
        // SAFETY: restrict_self makes two syscalls and allocates nothing.
        unsafe { cmd.pre_exec(move || restrict_self(raw)) };
        let out = cmd.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    #[test]
    fn a_child_reads_only_what_its_ruleset_names() {
        assert!(abi().is_some(), "this kernel has no Landlock: the storage service refuses to start");
        let root = temp_dir("root");
        let outside = temp_dir("outside");
        let (allowed, other, secret) = (root.join("allowed"), root.join("other"), outside.join("secret"));
        std::fs::write(&allowed, b"ok").unwrap();
        std::fs::write(&other, b"other").unwrap();
        std::fs::write(&secret, b"secret").unwrap();
        let files = [(allowed.as_path(), Access::Read)];

        assert_eq!(run_in("cat", &[&allowed], &files), (true, String::new()));
        for denied in [&secret, &other] {
            let (ok, err) = run_in("cat", &[denied], &files);
            assert!(!ok && err.contains("Permission denied"), "cat {}: {err}", denied.display());
        }
        let (ok, err) = run_in("qemu-img", &[Path::new("info"), &secret], &files);
        assert!(!ok && err.contains("Permission denied"), "qemu-img info: {err}");
        let (ok, err) = run_in("qemu-img", &[Path::new("info"), &allowed], &files);
        assert!(ok, "qemu-img info of the allowed file: {err}");
        // Read-only: no write, even to the allowed file.
        let (ok, err) =
            run_in("cp", &[&other, &allowed], &[(&allowed, Access::Read), (&other, Access::Read)]);
        assert!(!ok && err.contains("Permission denied"), "{err}");
        assert_eq!(std::fs::read(&allowed).unwrap(), b"ok");
        assert_eq!(std::fs::read(&secret).unwrap(), b"secret");
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&outside);
    }
}
