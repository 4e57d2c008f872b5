//! Network namespaces: the one the daemon runs in (never the machine's own unless told so), and
//! the ones that stand in for guests.
//!
//! A guest's namespace is held by a bind mount of its namespace file at `<dir>/dom<domid>`, as
//! `ip netns` holds `/run/netns/NAME`, so that other processes (a test, the demo, a device
//! model) can enter it by path. A namespace belongs to a thread, so work inside another namespace
//! runs on a thread of its own ([`run_in`]).

use std::ffi::CString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Where [`run_in`] runs its work.
#[derive(Debug, Clone)]
pub enum Namespace {
    /// A new, empty network namespace (only `lo`, down), gone when the work ends unless
    /// something holds it.
    New,
    /// The namespace whose file is at this path (`/run/netns/NAME`, `/proc/PID/ns/net`).
    Path(PathBuf),
}

/// The inode of the kernel's first network namespace (`init_net`, `PROC_NET_INIT_INO`), fixed
/// since Linux 5.8.
const INIT_NET_INO: u64 = 0xEFFF_FFF9;

/// Whether this thread is in the machine's own network namespace: the kernel's first one, or
/// pid 1's (a container's own, where pid 1's can be read).
pub fn in_root_namespace() -> io::Result<bool> {
    let ours = std::fs::metadata("/proc/thread-self/ns/net")?;
    if ours.ino() == INIT_NET_INO {
        return Ok(true);
    }
    // Reading pid 1's namespace takes the right to trace it, which a process with fewer
    // capabilities than pid 1 lacks even as root: then only the kernel's first one is known.
    Ok(std::fs::metadata("/proc/1/ns/net")
        .is_ok_and(|init| (ours.dev(), ours.ino()) == (init.dev(), init.ino())))
}

/// Moves this thread into a new, empty network namespace (`unshare(CLONE_NEWNET)`). The
/// threads it starts afterwards inherit it; call it before starting a runtime.
pub fn unshare() -> io::Result<()> {
    // SAFETY: unshare takes flags only; CLONE_NEWNET changes this thread's network namespace
    // and touches no memory of the process.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("unshare(CLONE_NEWNET): {e}")));
    }
    Ok(())
}

/// Moves this thread into the network namespace whose file is at `path`.
pub fn enter(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("opening {}: {e}", path.display())))?;
    // SAFETY: `file` is an open namespace file for the duration of the call; setns reads only
    // the descriptor.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("entering the namespace {}: {e}", path.display())));
    }
    Ok(())
}

/// Runs `work` on a thread of its own inside `ns`, and returns what it returned. The thread
/// ends with the work, so the calling thread's namespace never changes.
pub fn run_in<T, F>(ns: Namespace, work: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let thread = std::thread::Builder::new().name("netns".into()).spawn(move || {
        match &ns {
            Namespace::New => unshare()?,
            Namespace::Path(p) => enter(p)?,
        }
        Ok(work())
    })?;
    // A panic inside is the caller's panic, with its own message.
    thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Runs the future `work` makes on a current-thread runtime of its own inside `ns` (for a
/// netlink socket of that namespace, or a guest's traffic).
pub fn block_on_in<T, F, Fut>(ns: Namespace, work: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    run_in(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        Ok(rt.block_on(work()))
    })?
}

/// The namespaces standing in for guests, one per guest domain, held at `<dir>/dom<domid>`.
#[derive(Debug, Clone)]
pub struct GuestNamespaces {
    dir: PathBuf,
}

impl GuestNamespaces {
    /// The namespaces under `dir` (created if missing).
    pub fn new(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
        Ok(Self { dir })
    }

    /// Where the namespace of `domid` is (or would be).
    pub fn path(&self, domid: u32) -> PathBuf {
        self.dir.join(format!("dom{domid}"))
    }

    /// Whether `domid` has a namespace.
    pub fn exists(&self, domid: u32) -> bool {
        is_mount_of_namespace(&self.path(domid))
    }

    /// The namespace of `domid`, made (new and empty) if it has none.
    pub fn ensure(&self, domid: u32) -> io::Result<PathBuf> {
        let path = self.path(domid);
        if is_mount_of_namespace(&path) {
            return Ok(path);
        }
        std::fs::File::create(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", path.display())))?;
        let target = path.clone();
        let held =
            run_in(Namespace::New, move || bind_mount(Path::new("/proc/thread-self/ns/net"), &target))?;
        if let Err(e) = held {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    }

    /// Lets the namespace of `domid` go (what is left in it goes with it once nothing else
    /// holds it). Nothing to do when it has none.
    pub fn remove(&self, domid: u32) -> io::Result<()> {
        release(&self.path(domid))
    }

    /// Lets every namespace under the directory go (the daemon's stop, and its start after a
    /// crash).
    pub fn remove_all(&self) -> io::Result<()> {
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.file_name().is_some_and(|n| n.as_bytes().starts_with(b"dom")) {
                release(&path)?;
            }
        }
        Ok(())
    }
}

/// Unmounts the namespace held at `path` (lazily, as `ip netns delete` does) and removes the
/// file.
fn release(path: &Path) -> io::Result<()> {
    if is_mount_of_namespace(path) {
        let c = c_path(path)?;
        // SAFETY: `c` is a NUL-terminated path that lives across the call.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            let e = io::Error::last_os_error();
            return Err(io::Error::new(e.kind(), format!("unmounting {}: {e}", path.display())));
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io::Error::new(e.kind(), format!("removing {}: {e}", path.display())))
        }
        _ => Ok(()),
    }
}

/// Whether `path` holds a network namespace: its file is nsfs's, not the empty file under it.
fn is_mount_of_namespace(path: &Path) -> bool {
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let Ok(c) = c_path(path) else { return false };
    let mut st = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is NUL-terminated and `st` has room for a statfs, which the call fills.
    if unsafe { libc::statfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: statfs returned 0, so it filled `st`.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libcs
    let magic = st.f_type as i64;
    magic == NSFS_MAGIC
}

fn bind_mount(from: &Path, to: &Path) -> io::Result<()> {
    let (f, t) = (c_path(from)?, c_path(to)?);
    // SAFETY: both paths are NUL-terminated and live across the call; a bind mount takes no
    // filesystem type or data.
    let r = unsafe { libc::mount(f.as_ptr(), t.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("bind-mounting a namespace at {}: {e}", to.display())));
    }
    Ok(())
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::other("a path with a NUL byte"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// A new namespace is not the root one; a guest's namespace is made once, entered by path,
    /// and let go.
    #[test]
    fn guest_namespaces_are_made_entered_and_released() {
        if !crate::network::testutil::namespaces_or_skip("guest_namespaces_are_made_entered_and_released") {
            return;
        }
        assert!(!run_in(Namespace::New, in_root_namespace).unwrap().unwrap());
        let dir = std::env::temp_dir().join(format!("dombus-netns-{}", std::process::id()));
        let guests = GuestNamespaces::new(dir.clone()).unwrap();
        assert!(!guests.exists(7));
        let path = guests.ensure(7).unwrap();
        assert!(guests.exists(7));
        assert_eq!(guests.ensure(7).unwrap(), path);
        let inside = |p: PathBuf| {
            run_in(Namespace::Path(p), || std::fs::metadata("/proc/thread-self/ns/net").map(|m| m.ino()))
                .unwrap()
                .unwrap()
        };
        assert_eq!(inside(path.clone()), inside(path.clone()));
        assert_ne!(inside(path.clone()), std::fs::metadata("/proc/thread-self/ns/net").unwrap().ino());
        guests.remove(7).unwrap();
        assert!(!guests.exists(7) && !path.exists());
        guests.ensure(8).unwrap();
        guests.remove_all().unwrap();
        assert!(!guests.exists(8));
        std::fs::remove_dir(&dir).unwrap();
    }
}
