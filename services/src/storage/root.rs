//! The storage root, the one directory holding the images: the names that may become paths in
//! it, the lock that makes one process its owner, the temporary files new images are written
//! to and their publishing without replacing anything, and what the root holds.
//!
//! An image is `<root>/<name>` and must be a regular file there: anything else at that path (a
//! symlink, a directory) is refused. New images are written as `<root>/.tmp-<name>-<random>`
//! and renamed into place; since one process owns a root at a time (`.dombus-storage.lock`),
//! the temporary files found when it takes the root are left-overs of a crash and removed.

use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::StorageError;
use super::image::QCOW2_HEADER;

/// Prefix of the temporary files of operations in progress.
const TMP_PREFIX: &str = ".tmp-";
/// The lock file making one process the owner of a root.
const LOCK_FILE: &str = ".dombus-storage.lock";
/// Longest image or snapshot name.
const MAX_NAME: usize = 64;

/// Checks an image name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting with `.`.
pub(crate) fn check_name(name: &str) -> Result<(), StorageError> {
    let bad =
        |reason: &str| Err(StorageError::InvalidName { name: name.to_owned(), reason: reason.to_owned() });
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_NAME {
        return bad("longer than 64 characters");
    }
    if name.starts_with('.') {
        return bad("starts with '.'");
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return bad("only A-Z a-z 0-9 . _ - may be used (names, not paths)");
    }
    Ok(())
}

/// A snapshot name: an image name that is not all digits (qemu-img takes those as snapshot ids).
pub(super) fn check_snapshot_name(snapshot: &str) -> Result<(), StorageError> {
    check_name(snapshot)?;
    if snapshot.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StorageError::InvalidName {
            name: snapshot.to_owned(),
            reason: "a snapshot name cannot be all digits (qemu-img would take it for a snapshot id)".into(),
        });
    }
    Ok(())
}

/// The directory `root`, created if missing, as a canonical path.
pub(super) fn prepare(root: &Path) -> io::Result<PathBuf> {
    std::fs::create_dir_all(root)?;
    let root = root.canonicalize()?;
    if !root.is_dir() {
        return Err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is not a directory", root.display()),
        ));
    }
    Ok(root)
}

/// A storage root this process owns.
#[derive(Debug)]
pub(super) struct Root {
    /// Its canonical path.
    path: PathBuf,
    /// Held (flock) while the root is owned.
    _lock: File,
}

impl Root {
    /// Takes the root at the canonical `path` (see [`prepare`]): AddrInUse if another process
    /// owns it. Removes the temporary files left there by a crashed owner; returns how many.
    pub(super) fn take(path: PathBuf) -> io::Result<(Root, usize)> {
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(path.join(LOCK_FILE))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
            let e = io::Error::from(e);
            if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another storage process", path.display()),
                )
            } else {
                e
            }
        })?;
        let mut stale = 0;
        for entry in std::fs::read_dir(&path)? {
            let entry = entry?;
            let is_tmp = entry.file_name().to_str().is_some_and(|n| n.starts_with(TMP_PREFIX));
            if is_tmp && entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
                stale += 1;
            }
        }
        Ok((Root { path, _lock: lock }, stale))
    }

    /// Its canonical path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// The path of the image `name` (a checked name).
    pub(super) fn image(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Bytes the filesystem holding the root has in all.
    pub(super) fn capacity(&self) -> io::Result<u64> {
        let s = rustix::fs::statvfs(&self.path)?;
        Ok(s.f_blocks.saturating_mul(s.f_frsize))
    }

    /// Bytes available to unprivileged users on the filesystem holding the root.
    pub(super) fn free_space(&self) -> io::Result<u64> {
        let s = rustix::fs::statvfs(&self.path)?;
        Ok(s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Whether `name` is a regular file of the root (no error: anything else is not).
    pub(super) fn holds(&self, name: &str) -> bool {
        std::fs::symlink_metadata(self.image(name)).is_ok_and(|m| m.file_type().is_file())
    }

    /// `Ok(true)` if `name` is a regular file in the root, `Ok(false)` if nothing is there;
    /// InvalidName for anything else (symlink, directory, fifo, device).
    pub(super) fn exists(&self, name: &str) -> Result<bool, StorageError> {
        match std::fs::symlink_metadata(self.image(name)) {
            Ok(m) if m.file_type().is_file() => Ok(true),
            Ok(m) => Err(not_regular(name, &m.file_type())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error(name, e)),
        }
    }

    /// The image `name` must exist.
    pub(super) fn existing(&self, name: &str) -> Result<(), StorageError> {
        if self.exists(name)? { Ok(()) } else { Err(StorageError::NotFound { name: name.to_owned() }) }
    }

    /// The images of the root (valid names, regular files), sorted.
    pub(super) fn names(&self) -> Result<Vec<String>, StorageError> {
        let dir = std::fs::read_dir(&self.path).map_err(|e| io_error("", e))?;
        let mut names = Vec::new();
        for entry in dir {
            let entry = entry.map_err(|e| io_error("", e))?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            if check_name(&name).is_ok() && entry.file_type().is_ok_and(|t| t.is_file()) {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The first bytes (up to [`QCOW2_HEADER`]) of the image `name`, a regular file opened
    /// without following a symlink or blocking on a fifo (for adoption only).
    pub(super) fn read_header(&self, name: &str) -> Result<Vec<u8>, StorageError> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
            .open(self.image(name))
            .map_err(|e| match e.raw_os_error() {
                Some(code) if code == rustix::io::Errno::LOOP.raw_os_error() => StorageError::InvalidName {
                    name: name.to_owned(),
                    reason: "a symlink in the storage root".into(),
                },
                _ => io_error(name, e),
            })?;
        let m = f.metadata().map_err(|e| io_error(name, e))?;
        if !m.file_type().is_file() {
            return Err(not_regular(name, &m.file_type()));
        }
        let mut head = Vec::with_capacity(QCOW2_HEADER);
        f.take(QCOW2_HEADER as u64).read_to_end(&mut head).map_err(|e| io_error(name, e))?;
        Ok(head)
    }

    /// A new empty temporary file for a new `name` (qemu-img writes into it; the sandbox lets
    /// it write that file only), removed on drop unless published.
    pub(super) fn temp_for(&self, name: &str) -> Result<TempFile, StorageError> {
        let path = self.image(&format!("{TMP_PREFIX}{name}-{}", random_suffix()));
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&path)
            .map_err(|e| io_error(name, e))?;
        Ok(TempFile { path, keep: false })
    }

    /// Moves `tmp` to `<root>/<name>`, never replacing: AlreadyExists if `name` appeared.
    pub(super) fn publish(&self, mut tmp: TempFile, name: &str) -> Result<(), StorageError> {
        let target = self.image(name);
        let renamed = rustix::fs::renameat_with(
            rustix::fs::CWD,
            &tmp.path,
            rustix::fs::CWD,
            &target,
            rustix::fs::RenameFlags::NOREPLACE,
        );
        let result = match renamed {
            Ok(()) => Ok(()),
            // A filesystem without RENAME_NOREPLACE: link (fails if the name exists) + unlink.
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOSYS) => {
                std::fs::hard_link(&tmp.path, &target)
            }
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(()) => {
                tmp.keep = std::fs::symlink_metadata(&tmp.path).is_err();
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(StorageError::AlreadyExists { name: name.to_owned() })
            }
            Err(e) => Err(io_error(name, e)),
        }
    }
}

/// A temporary file of an operation: removed when dropped, unless kept (renamed into place).
#[derive(Debug)]
pub(super) struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl TempFile {
    /// Where it is.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => tracing::debug!(path = %self.path.display(), "temporary file removed"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => tracing::warn!(path = %self.path.display(), error = %e, "cannot remove temporary file"),
        }
        // qemu-img may have been killed in the middle of creating it: look again once it is gone.
        let path = self.path.clone();
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let _ = std::fs::remove_file(path);
            });
        }
    }
}

/// An I/O error on the image `name`.
pub(super) fn io_error(name: &str, e: io::Error) -> StorageError {
    let errno = e.raw_os_error();
    if errno == Some(rustix::io::Errno::NOSPC.raw_os_error())
        || errno == Some(rustix::io::Errno::DQUOT.raw_os_error())
    {
        return StorageError::NoSpace { message: e.to_string() };
    }
    match e.kind() {
        io::ErrorKind::NotFound => StorageError::NotFound { name: name.to_owned() },
        _ => StorageError::ToolFailed {
            tool: "filesystem".into(),
            status: "error".into(),
            message: format!("{name:?}: {e}"),
        },
    }
}

/// The InvalidName of `name`, something of type `t` that is not a regular file.
fn not_regular(name: &str, t: &std::fs::FileType) -> StorageError {
    StorageError::InvalidName {
        name: name.to_owned(),
        reason: format!("{} in the storage root is not a regular file", kind_of(t)),
    }
}

fn kind_of(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt as _;
    if t.is_symlink() {
        "a symlink"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a fifo"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device"
    } else {
        "something"
    }
}

fn random_suffix() -> String {
    use std::hash::{BuildHasher as _, Hasher as _};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        h.write_u128(d.as_nanos());
    }
    format!("{:016x}", h.finish())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::super::image::backing_name;
    use super::*;

    #[test]
    fn names() {
        for good in ["a", "disk-1.qcow2", "A_b", "x".repeat(64).as_str(), "9", "-x"] {
            assert!(check_name(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "../x",
            "/etc/passwd",
            "a/b",
            "a b",
            "a\0",
            "é",
            &"x".repeat(65),
            "a:b",
            "a,b",
        ] {
            assert!(matches!(check_name(bad), Err(StorageError::InvalidName { .. })), "{bad:?}");
        }
        assert!(check_snapshot_name("s1").is_ok());
        assert!(check_snapshot_name("12").is_err());
    }

    /// A root: taken once at a time, its crash left-overs removed, its images only regular
    /// files with image names, a published temporary file never replacing an image.
    #[test]
    fn a_root_is_owned_once_and_publishes_without_replacing() {
        let dir = std::env::temp_dir().join(format!("dombus-root-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = prepare(&dir).unwrap();
        std::fs::write(path.join(".tmp-a-0123"), b"left over").unwrap();
        std::fs::write(path.join("img"), b"").unwrap();
        std::fs::create_dir(path.join("dir")).unwrap();
        std::os::unix::fs::symlink("img", path.join("link")).unwrap();
        let (root, stale) = Root::take(path.clone()).unwrap();
        assert_eq!(stale, 1);
        assert!(!path.join(".tmp-a-0123").exists());
        assert_eq!(Root::take(path.clone()).unwrap_err().kind(), io::ErrorKind::AddrInUse);
        assert_eq!(root.names().unwrap(), ["img"]);
        assert_eq!(root.exists("img"), Ok(true));
        assert_eq!(root.exists("none"), Ok(false));
        assert!(matches!(root.exists("link"), Err(StorageError::InvalidName { .. })));
        assert!(matches!(root.read_header("link"), Err(StorageError::InvalidName { .. })));
        assert!(matches!(root.existing("dir"), Err(StorageError::InvalidName { .. })));
        assert!(!root.holds("link") && !root.holds("dir") && root.holds("img"));

        let tmp = root.temp_for("img").unwrap();
        let tmp_path = tmp.path().to_owned();
        assert_eq!(root.publish(tmp, "img"), Err(StorageError::AlreadyExists { name: "img".into() }));
        assert!(!tmp_path.exists(), "a refused temporary file is removed");
        let tmp = root.temp_for("new").unwrap();
        std::fs::write(tmp.path(), b"new").unwrap();
        root.publish(tmp, "new").unwrap();
        assert_eq!(std::fs::read(path.join("new")).unwrap(), b"new");
        assert_eq!(root.read_header("new").unwrap(), b"new");
        assert_eq!(root.names().unwrap(), ["img", "new"]);
        drop(root);
        let _ = std::fs::remove_dir_all(&dir);
    }

    proptest! {
        #[test]
        fn accepted_names_are_plain(name in "[A-Za-z0-9._/-]{0,70}|\\PC{0,10}") {
            if check_name(&name).is_ok() {
                prop_assert!(!name.contains('/'));
                prop_assert!(!name.starts_with('.'));
                prop_assert!(!name.is_empty() && name.len() <= 64);
                prop_assert_eq!(backing_name(Path::new("/r"), &name), Some(name.clone()));
                let joined = Path::new("/r").join(&name);
                prop_assert_eq!(joined.parent(), Some(Path::new("/r")));
            }
        }
    }
}
