//! [`QemuImg`]: the [`Storage`] service on the real `qemu-img`.
//!
//! Everything lives in one directory, the root. Callers name images (see [`check_name`]); the
//! image is `<root>/<name>` and must be a regular file there.
//!
//! Guests write the content of the images they use, so nothing is decided from an image's
//! bytes after the service has recorded it. The record (see [`Index`]: format, backing image,
//! virtual size, snapshot count) is made when the service creates or clones an image, or adopts
//! one the operator placed in the root (at start, or when a call first names it: its first
//! bytes give the format, a sandboxed `qemu-img info` the rest; its backing file must be an
//! image of the root, adopted first). From then on qemu-img opens an image only through a
//! `json:` spec built from the record: the recorded driver (never probed), and for qcow2 the
//! recorded backing chain or `"backing": null`, never what the header names now. External data
//! files are refused at adoption and never recorded; a qcow2 header rewritten later to name one
//! (only possible if the image was also given to a guest as raw) cannot reach it, because each
//! qemu-img runs in a Landlock sandbox (see [`Sandbox`]) that lets it open only the files of
//! its call — the image it changes, the recorded chain it reads, the temporary file it writes —
//! besides the program and its libraries. Linked clones record their backing image by its
//! relative name, so the root can be moved.
//!
//! New images (create, clones) are written as `<root>/.tmp-<name>-<random>` and renamed into
//! place without replacing anything; a dropped call (deadline, client gone) kills its
//! `qemu-img` and removes the temporary file. One process owns a root at a time (a lock file,
//! `.dombus-storage.lock`), so the temporary files found at start are left-overs of a crash and
//! are removed.

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Component, Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::process::{Child, Command};

use super::index::{Index, Record};
use super::sandbox::{self, Access, Ruleset, Sandbox};
use super::{DiskInfo, Format, Progress, SnapshotInfo, Storage, StorageError};
use crate::storage::Size;

/// The tool's name in [`StorageError::ToolFailed`].
const TOOL: &str = "qemu-img";
/// Prefix of the temporary files of operations in progress.
const TMP_PREFIX: &str = ".tmp-";
/// The lock file making one process the owner of a root.
const LOCK_FILE: &str = ".dombus-storage.lock";
/// Longest image or snapshot name.
const MAX_NAME: usize = 64;
/// Largest size accepted (2^60 bytes, 1 EiB).
const MAX_SIZE: u64 = 1 << 60;
/// How much of a tool's stderr is kept in an error.
const MAX_MESSAGE: usize = 4096;
/// How much of a tool's stdout is read (qemu-img info of an image with many snapshots).
const MAX_STDOUT: usize = 16 << 20;
/// Longest backing chain followed.
const MAX_CHAIN: usize = 16;

/// How a [`QemuImg`] runs: its bounds and the sandbox of its `qemu-img`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageConfig {
    /// Most images in the root; a create or clone past it is refused
    /// ([`StorageError::TooManyImages`]). Default 4,096.
    pub max_images: usize,
    /// Most bytes the virtual sizes of the images may add up to; a create, clone or resize past
    /// it is refused ([`StorageError::QuotaExceeded`]). `None` (the default): four times the
    /// size of the filesystem holding the root, measured at start (thin provisioning).
    pub max_virtual_bytes: Option<u64>,
    /// Run every `qemu-img` in a Landlock sandbox (the default). With `false`, qemu-img runs
    /// unconfined; only for a kernel without Landlock, and only when asked for explicitly.
    pub sandbox: bool,
    /// Paths (and what is beneath them) the sandbox lets `qemu-img` read and execute besides
    /// the program, the system libraries and the root's files of each call. Empty by default;
    /// for a wrapper script around qemu-img (the tests'), say.
    pub sandbox_read: Vec<PathBuf>,
    /// Paths (and what is beneath them) the sandbox lets `qemu-img` read, write and create
    /// files in. Empty by default; for the state files of a wrapper script (the tests').
    pub sandbox_write: Vec<PathBuf>,
}

/// Default [`StorageConfig::max_images`].
pub const DEFAULT_MAX_IMAGES: usize = 4096;
/// Default overcommit of virtual sizes over the filesystem's size.
const DEFAULT_OVERCOMMIT: u64 = 4;

impl Default for StorageConfig {
    fn default() -> StorageConfig {
        StorageConfig {
            max_images: DEFAULT_MAX_IMAGES,
            max_virtual_bytes: None,
            sandbox: true,
            sandbox_read: Vec::new(),
            sandbox_write: Vec::new(),
        }
    }
}

/// Disk images in a directory, managed with `qemu-img`. Cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct QemuImg {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    qemu_img: PathBuf,
    running: Mutex<HashMap<String, Running>>,
    /// The record of the images (format, backing, sizes): the only source of formats and
    /// backing images after an image is recorded.
    index: Mutex<Index>,
    /// The Landlock base of every qemu-img's ruleset; `None` if the sandbox is off.
    sandbox: Option<Sandbox>,
    max_images: usize,
    max_virtual_bytes: u64,
    /// qemu-img processes started.
    runs: AtomicU64,
    /// Held (flock) while this storage lives.
    _lock: File,
}

/// An operation running on an image name.
#[derive(Debug)]
struct Running {
    operation: String,
    percent: f32,
    /// Images it reads (the source of a clone, a backing image): they must not change meanwhile.
    reads: Vec<String>,
    /// Whether it adds an image, and the virtual bytes it adds: counted against the bounds
    /// until it is recorded.
    reserved: (bool, u64),
}

/// The pieces of an image's `qemu-img` spec: name and record, top first.
type Chain = Vec<(String, Record)>;

impl QemuImg {
    /// Storage in `root` (created if missing) using the `qemu-img` at `qemu_img` (a path or a
    /// name looked up in `PATH`), with the default [`StorageConfig`] (sandboxed, 4,096 images).
    pub fn new(root: PathBuf, qemu_img: PathBuf) -> io::Result<QemuImg> {
        QemuImg::with_config(root, qemu_img, StorageConfig::default())
    }

    /// Storage in `root` (created if missing) using the `qemu-img` at `qemu_img`. Fails if
    /// `qemu-img --version` does not run, if another process uses `root`, if the sandbox is on
    /// and the kernel has no Landlock, or if the root's record is damaged. Removes temporary
    /// files left by operations of a crashed process, forgets the records of images no longer
    /// there, and adopts (records, from what their content says now) the images without a
    /// record: those the operator placed in the root.
    pub fn with_config(root: PathBuf, qemu_img: PathBuf, config: StorageConfig) -> io::Result<QemuImg> {
        std::fs::create_dir_all(&root)?;
        let root = root.canonicalize()?;
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", root.display()),
            ));
        }
        let version = std::process::Command::new(&qemu_img)
            .arg("--version")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "cannot run {} ({e}); install it (Debian: apt-get install qemu-utils) or give its path",
                        qemu_img.display()
                    ),
                )
            })?;
        if !version.status.success() {
            return Err(io::Error::other(format!(
                "{} --version failed ({}): {}; install qemu-img (Debian: apt-get install qemu-utils)",
                qemu_img.display(),
                version.status,
                bounded_message(&version.stderr)
            )));
        }
        let version = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or_default().to_owned();
        let qemu_img = sandbox::resolve(&qemu_img)?;

        let sandbox = if config.sandbox {
            let s = Sandbox::new(&qemu_img, &config.sandbox_read, &config.sandbox_write).map_err(|e| {
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

        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(root.join(LOCK_FILE))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
            let e = io::Error::from(e);
            if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by another storage process", root.display()),
                )
            } else {
                e
            }
        })?;

        let mut stale = 0;
        for entry in std::fs::read_dir(&root)? {
            let entry = entry?;
            let is_tmp = entry.file_name().to_str().is_some_and(|n| n.starts_with(TMP_PREFIX));
            if is_tmp && entry.file_type()?.is_file() {
                std::fs::remove_file(entry.path())?;
                stale += 1;
            }
        }

        let mut index = Index::load(&root)?.unwrap_or_default();
        let gone: Vec<String> = index
            .iter()
            .filter(|(name, _)| {
                !std::fs::symlink_metadata(root.join(name)).is_ok_and(|m| m.file_type().is_file())
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in &gone {
            tracing::warn!(image = %name, "recorded image no longer in the root: record dropped");
            index.remove(name);
        }
        let max_virtual_bytes = match config.max_virtual_bytes {
            Some(b) => b,
            None => {
                let s = rustix::fs::statvfs(&root)?;
                s.f_blocks.saturating_mul(s.f_frsize).saturating_mul(DEFAULT_OVERCOMMIT)
            }
        };
        let storage = QemuImg {
            inner: Arc::new(Inner {
                root,
                qemu_img,
                running: Mutex::new(HashMap::new()),
                index: Mutex::new(index),
                sandbox,
                max_images: config.max_images,
                max_virtual_bytes,
                runs: AtomicU64::new(0),
                _lock: lock,
            }),
        };
        storage.save().map_err(|e| io::Error::other(e.to_string()))?;
        let (mut adopted, mut refused) = (0, 0);
        for name in storage.names().map_err(|e| io::Error::other(e.to_string()))? {
            if storage.index().get(&name).is_some() {
                continue;
            }
            match storage.adopt(&name, 0) {
                Ok(_) => adopted += 1,
                Err(e) => {
                    refused += 1;
                    tracing::warn!(image = %name, error = %e, "not adopted");
                }
            }
        }
        let images = storage.index().len();
        tracing::info!(
            root = %storage.inner.root.display(), qemu_img = %storage.inner.qemu_img.display(), %version,
            stale_removed = stale, images, adopted, refused, sandbox = storage.inner.sandbox.is_some(),
            "storage ready"
        );
        Ok(storage)
    }

    /// The storage root (canonical).
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// How many `qemu-img` processes this storage has started (for tests and metrics).
    pub fn qemu_img_runs(&self) -> u64 {
        self.inner.runs.load(Ordering::Relaxed)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.inner.root.join(name)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.inner.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.inner.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Saves the record.
    fn save(&self) -> Result<(), StorageError> {
        self.index().save(&self.inner.root).map_err(|e| io_error("", e))
    }

    /// Changes the record with `f` and saves it.
    fn update<R>(&self, f: impl FnOnce(&mut Index) -> R) -> Result<R, StorageError> {
        let mut index = self.index();
        let r = f(&mut index);
        index.save(&self.inner.root).map_err(|e| io_error("", e))?;
        Ok(r)
    }

    /// Registers `operation` on `name` (which it changes) reading `reads`; Busy if `name` or one
    /// of `reads` is being changed, or `name` is being read.
    fn claim(&self, name: &str, operation: String, reads: &[&str]) -> Result<OpGuard, StorageError> {
        let mut running = self.running();
        if let Some(r) = running.get(name) {
            return Err(StorageError::Busy { name: name.to_owned(), operation: r.operation.clone() });
        }
        if let Some((other, r)) = running.iter().find(|(_, r)| r.reads.iter().any(|n| n == name)) {
            return Err(StorageError::Busy {
                name: name.to_owned(),
                operation: format!("read by {:?} on {other:?}", r.operation),
            });
        }
        for read in reads {
            if let Some(r) = running.get(*read) {
                return Err(StorageError::Busy { name: (*read).to_owned(), operation: r.operation.clone() });
            }
        }
        running.insert(
            name.to_owned(),
            Running {
                operation,
                percent: 0.0,
                reads: reads.iter().map(|s| (*s).to_owned()).collect(),
                reserved: (false, 0),
            },
        );
        Ok(OpGuard { storage: self.clone(), name: name.to_owned() })
    }

    /// Reserves, for the operation `op`, a new image (`new_image`) and `bytes` more of virtual
    /// size, against the bounds: TooManyImages or QuotaExceeded past them, counting what the
    /// other running operations reserved.
    fn reserve(&self, op: &OpGuard, new_image: bool, bytes: u64) -> Result<(), StorageError> {
        let mut running = self.running();
        let (others_images, others_bytes) =
            running.iter().filter(|(n, _)| **n != op.name).fold((0usize, 0u128), |(i, b), (_, r)| {
                (i + usize::from(r.reserved.0), b + u128::from(r.reserved.1))
            });
        let (images, total) = {
            let index = self.index();
            (index.len(), index.total_virtual())
        };
        if new_image && images + others_images >= self.inner.max_images {
            return Err(StorageError::TooManyImages { limit: self.inner.max_images as u64 });
        }
        let wanted = total + others_bytes + u128::from(bytes);
        if bytes > 0 && wanted > u128::from(self.inner.max_virtual_bytes) {
            return Err(StorageError::QuotaExceeded {
                requested: bytes,
                used: u64::try_from(total + others_bytes).unwrap_or(u64::MAX),
                limit: self.inner.max_virtual_bytes,
            });
        }
        if let Some(r) = running.get_mut(&op.name) {
            r.reserved = (new_image, bytes);
        }
        Ok(())
    }

    /// `Ok(true)` if `name` is a regular file in the root, `Ok(false)` if nothing is there;
    /// InvalidName for anything else (symlink, directory, fifo, device).
    fn exists(&self, name: &str) -> Result<bool, StorageError> {
        match std::fs::symlink_metadata(self.path(name)) {
            Ok(m) if m.file_type().is_file() => Ok(true),
            Ok(m) => Err(StorageError::InvalidName {
                name: name.to_owned(),
                reason: format!("{} in the storage root is not a regular file", kind_of(&m.file_type())),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_error(name, e)),
        }
    }

    /// The image `name` must exist.
    fn existing(&self, name: &str) -> Result<(), StorageError> {
        if self.exists(name)? { Ok(()) } else { Err(StorageError::NotFound { name: name.to_owned() }) }
    }

    /// The record of the image `name`, which must be a regular file of the root; an image
    /// without one (the operator placed it there since the start) is adopted first.
    fn record(&self, name: &str) -> Result<Record, StorageError> {
        {
            // Under the record's lock, which publishing a new image holds until it is recorded:
            // an unrecorded file seen here is not one of ours in the middle of its creation.
            let index = self.index();
            self.existing(name)?;
            if let Some(r) = index.get(name) {
                return Ok(r.clone());
            }
        }
        self.adopt(name, 0)
    }

    /// Records the image `name` from what its content says now (its first bytes for the format,
    /// a sandboxed `qemu-img info` that may read only it for the rest) — for images the service
    /// did not make: those the operator placed in the root. Its backing file must be an image of
    /// the root, adopted first if it has no record, with the recorded format; an external data
    /// file is refused.
    fn adopt(&self, name: &str, depth: usize) -> Result<Record, StorageError> {
        if depth >= MAX_CHAIN {
            return Err(StorageError::Unsupported {
                reason: format!("image {name:?}: backing chain too long or circular"),
            });
        }
        let head = self.read_header(name)?;
        let format = format_from_header(&head);
        let mut spec = serde_json::json!({
            "driver": format.as_str(),
            "file": { "driver": "file", "filename": self.path(name) },
        });
        if format == Format::Qcow2 {
            spec["backing"] = serde_json::Value::Null;
            if qcow2_has_data_file(&head) {
                // Parsed without opening the file its header names, then refused below.
                spec["data-file"] = serde_json::json!({ "driver": "null-co" });
            }
        }
        let args: Vec<OsString> =
            vec!["info".into(), "-U".into(), "--output=json".into(), format!("json:{spec}").into()];
        let out = self.run_sync(name, &args, &[(&self.path(name), Access::Read)])?;
        let json = parse_info(&out).map_err(|e| unexpected_info(name, &e))?;
        if json.format != format.as_str() {
            return Err(StorageError::ToolFailed {
                tool: TOOL.into(),
                status: "exit status: 0".into(),
                message: format!(
                    "asked for {} of {name:?}, it reports format {:?}",
                    format.as_str(),
                    json.format
                ),
            });
        }
        if let Some(data_file) =
            json.format_specific.as_ref().and_then(|f| f.data.as_ref()).and_then(|d| d.data_file.as_ref())
        {
            return Err(StorageError::InvalidName {
                name: name.to_owned(),
                reason: format!("the image has an external data file ({data_file:?}); not supported"),
            });
        }
        let backing = match &json.backing_filename {
            None => None,
            Some(file) => {
                let Some(backing) = backing_name(&self.inner.root, file) else {
                    return Err(StorageError::InvalidName {
                        name: name.to_owned(),
                        reason: format!("its backing file {file:?} is not an image of the storage root"),
                    });
                };
                let bformat = match json.backing_format.as_deref() {
                    Some("qcow2") => Format::Qcow2,
                    Some("raw") => Format::Raw,
                    other => {
                        return Err(StorageError::Unsupported {
                            reason: format!(
                                "image {name:?}: its backing image {backing:?} has no (or an unsupported) recorded format {other:?}"
                            ),
                        });
                    }
                };
                if backing == name {
                    return Err(StorageError::Unsupported {
                        reason: format!("image {name:?}: backing chain too long or circular"),
                    });
                }
                self.existing(&backing)?;
                let known = self.index().get(&backing).cloned();
                let brecord = match known {
                    Some(r) => r,
                    None => self.adopt(&backing, depth + 1)?,
                };
                if brecord.format != bformat {
                    return Err(StorageError::Unsupported {
                        reason: format!(
                            "image {name:?} says its backing image {backing:?} is {}; it is recorded as {}",
                            bformat.as_str(),
                            brecord.format.as_str()
                        ),
                    });
                }
                Some(backing)
            }
        };
        let record = Record {
            format,
            backing,
            virtual_size: json.virtual_size,
            snapshots: u32::try_from(json.snapshots.len()).unwrap_or(u32::MAX),
        };
        let record = self.update(|index| match index.get(name) {
            // Recorded meanwhile (adopted by another call): that record stands.
            Some(r) => r.clone(),
            None => {
                index.insert(name, record.clone());
                record
            }
        })?;
        tracing::info!(image = %name, format = format.as_str(), backing = ?record.backing, virtual_size = record.virtual_size, "adopted");
        Ok(record)
    }

    /// The first bytes of the image `name` (for [`Self::adopt`] only).
    fn read_header(&self, name: &str) -> Result<Vec<u8>, StorageError> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32)
            .open(self.path(name))
            .map_err(|e| match e.raw_os_error() {
                Some(code) if code == rustix::io::Errno::LOOP.raw_os_error() => StorageError::InvalidName {
                    name: name.to_owned(),
                    reason: "a symlink in the storage root".into(),
                },
                _ => io_error(name, e),
            })?;
        let m = f.metadata().map_err(|e| io_error(name, e))?;
        if !m.file_type().is_file() {
            return Err(StorageError::InvalidName {
                name: name.to_owned(),
                reason: format!("{} in the storage root is not a regular file", kind_of(&m.file_type())),
            });
        }
        let mut head = Vec::with_capacity(QCOW2_HEADER);
        f.take(QCOW2_HEADER as u64).read_to_end(&mut head).map_err(|e| io_error(name, e))?;
        Ok(head)
    }

    /// The recorded chain of `name`: its record, then its backing image's, and so on. Every
    /// image of it must be a regular file of the root.
    fn chain(&self, name: &str) -> Result<Chain, StorageError> {
        let mut chain = vec![(name.to_owned(), self.record(name)?)];
        while let Some(backing) = chain.last().and_then(|(_, r)| r.backing.clone()) {
            if chain.len() >= MAX_CHAIN || chain.iter().any(|(n, _)| *n == backing) {
                return Err(StorageError::Unsupported {
                    reason: format!("image {name:?}: backing chain too long or circular"),
                });
            }
            let record = self.record(&backing)?;
            chain.push((backing, record));
        }
        Ok(chain)
    }

    /// The `json:` spec that opens `chain` as recorded: each image with its recorded driver;
    /// a qcow2's backing the next of `chain` if `follow`, else none (`null`) — never what its
    /// header names.
    fn spec(&self, chain: &[(String, Record)], follow: bool) -> OsString {
        fn node(storage: &QemuImg, chain: &[(String, Record)], follow: bool) -> serde_json::Value {
            let Some(((name, record), rest)) = chain.split_first() else { return serde_json::Value::Null };
            let mut v = serde_json::json!({
                "driver": record.format.as_str(),
                "file": { "driver": "file", "filename": storage.path(name) },
            });
            if record.format == Format::Qcow2 {
                v["backing"] = if follow && record.backing.is_some() {
                    node(storage, rest, follow)
                } else {
                    serde_json::Value::Null
                };
            }
            v
        }
        format!("json:{}", node(self, chain, follow)).into()
    }

    /// What `qemu-img info` says about the recorded image `name`, opened as recorded (no
    /// backing): its DiskInfo (format and backing from the record), its snapshots. Refreshes the
    /// recorded virtual size and snapshot count.
    async fn inspect(&self, name: &str) -> Result<(DiskInfo, Vec<SnapshotJson>), StorageError> {
        let record = self.record(name)?;
        let chain = [(name.to_owned(), record.clone())];
        let args = vec!["info".into(), "-U".into(), "--output=json".into(), self.spec(&chain, false)];
        let out = self.run(name, args, None, &[(&self.path(name), Access::Read)]).await?;
        let json = parse_info(&out).map_err(|e| unexpected_info(name, &e))?;
        if json.format != record.format.as_str() {
            return Err(StorageError::ToolFailed {
                tool: TOOL.into(),
                status: "exit status: 0".into(),
                message: format!(
                    "asked for {} of {name:?}, it reports format {:?}",
                    record.format.as_str(),
                    json.format
                ),
            });
        }
        let snapshots = u32::try_from(json.snapshots.len()).unwrap_or(u32::MAX);
        if (json.virtual_size, snapshots) != (record.virtual_size, record.snapshots) {
            let fresh = Record { virtual_size: json.virtual_size, snapshots, ..record.clone() };
            self.update(|index| {
                // Only if still the same image (not deleted or replaced meanwhile).
                if index.get(name) == Some(&record) {
                    index.insert(name, fresh);
                }
            })?;
        }
        let info = DiskInfo {
            name: name.to_owned(),
            format: record.format,
            virtual_size: json.virtual_size,
            actual_size: json.actual_size.unwrap_or(0),
            backing: record.backing,
            snapshots: json.snapshots.len(),
        };
        Ok((info, json.snapshots))
    }

    /// The images of the root (valid names, regular files), sorted.
    fn names(&self) -> Result<Vec<String>, StorageError> {
        let dir = std::fs::read_dir(&self.inner.root).map_err(|e| io_error("", e))?;
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

    /// Busy if linked clones use `name` as their backing image (changing it would corrupt them):
    /// a lookup in the record.
    fn refuse_if_backing(&self, name: &str, what: &str) -> Result<(), StorageError> {
        let users: Vec<String> = self.index().users_of(name).cloned().collect();
        if users.is_empty() {
            Ok(())
        } else {
            Err(StorageError::Busy {
                name: name.to_owned(),
                operation: format!("backing image of {} (cannot {what} it)", users.join(", ")),
            })
        }
    }

    /// A new empty temporary file for a new `name` (qemu-img writes into it; the sandbox lets
    /// it write that file only), removed on drop unless kept.
    fn temp_for(&self, name: &str) -> Result<TempFile, StorageError> {
        let path = self.path(&format!("{TMP_PREFIX}{name}-{}", random_suffix()));
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
    fn publish(&self, mut tmp: TempFile, name: &str) -> Result<(), StorageError> {
        let target = self.path(name);
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

    /// Publishes `tmp` as `name` and records it, holding the record's lock throughout (see
    /// [`Self::record`]).
    fn publish_recorded(&self, tmp: TempFile, name: &str, record: Record) -> Result<(), StorageError> {
        let mut index = self.index();
        self.publish(tmp, name)?;
        index.insert(name, record);
        index.save(&self.inner.root).map_err(|e| io_error(name, e))
    }

    /// The command running qemu-img with `args` in the root, confined (if the sandbox is on) to
    /// the call's `files`; the ruleset must live until the child is spawned.
    fn command(
        &self,
        name: &str,
        args: &[OsString],
        files: &[(&Path, Access)],
    ) -> Result<(std::process::Command, Option<Ruleset>), StorageError> {
        let mut cmd = std::process::Command::new(&self.inner.qemu_img);
        cmd.args(args).current_dir(&self.inner.root).env("LC_ALL", "C").stdin(Stdio::null());
        let Some(sandbox) = &self.inner.sandbox else { return Ok((cmd, None)) };
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
    /// allowing `files`; its stdout, or the error its failure means. With `progress`, `-p`
    /// lines of stdout update that operation.
    async fn run(
        &self,
        name: &str,
        args: Vec<OsString>,
        progress: Option<&OpGuard>,
        files: &[(&Path, Access)],
    ) -> Result<Vec<u8>, StorageError> {
        tracing::debug!(qemu_img = %self.inner.qemu_img.display(), ?args, "running");
        let (cmd, ruleset) = self.command(name, &args, files)?;
        let mut cmd = Command::from(cmd);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        self.inner.runs.fetch_add(1, Ordering::Relaxed);
        let spawned = cmd.spawn();
        drop(ruleset);
        let mut child = spawned.map_err(|e| self.not_started(e))?;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut child = ChildGuard(Some(child));
        let (out, err, status) =
            tokio::join!(read_stdout(stdout, progress), read_bounded(stderr, 64 << 10), child.wait(),);
        let status = status.map_err(|e| StorageError::ToolFailed {
            tool: TOOL.into(),
            status: "unknown".into(),
            message: format!("waiting for it: {e}"),
        })?;
        tracing::debug!(%status, "qemu-img ended");
        if status.success() { Ok(out) } else { Err(failure(name, status, &self.inner.root, &err)) }
    }

    /// The error of a qemu-img that could not be started.
    fn not_started(&self, e: io::Error) -> StorageError {
        StorageError::ToolFailed {
            tool: TOOL.into(),
            status: "not started".into(),
            message: format!("cannot run {}: {e}", self.inner.qemu_img.display()),
        }
    }

    /// [`Self::run`] blocking, for adoption (at start, or of an image the operator placed since).
    fn run_sync(
        &self,
        name: &str,
        args: &[OsString],
        files: &[(&Path, Access)],
    ) -> Result<Vec<u8>, StorageError> {
        let (mut cmd, ruleset) = self.command(name, args, files)?;
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        self.inner.runs.fetch_add(1, Ordering::Relaxed);
        let spawned = cmd.spawn();
        drop(ruleset);
        let mut child = spawned.map_err(|e| self.not_started(e))?;
        // stderr on a thread of its own (kept up to 64 KiB, the rest drained), so that neither
        // pipe can fill while the other is read.
        let stderr = child.stderr.take();
        let stderr = std::thread::spawn(move || {
            let mut err = Vec::new();
            if let Some(mut e) = stderr {
                let _ = (&mut e).take(64 << 10).read_to_end(&mut err);
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
        let status = child.wait().map_err(|e| StorageError::ToolFailed {
            tool: TOOL.into(),
            status: "unknown".into(),
            message: format!("waiting for it: {e}"),
        })?;
        if status.success() { Ok(out) } else { Err(failure(name, status, &self.inner.root, &err)) }
    }

    async fn do_create(
        &self,
        name: &str,
        size: Size,
        format: Option<Format>,
        backing: Option<&str>,
    ) -> Result<DiskInfo, StorageError> {
        check_name(name)?;
        if let Some(b) = backing {
            check_name(b)?;
        }
        check_size(size)?;
        let format = format.unwrap_or_default();
        if backing.is_some() && format == Format::Raw {
            return Err(StorageError::Unsupported {
                reason: "a raw image cannot have a backing image".into(),
            });
        }
        let op = self.claim(name, "create".into(), backing.as_slice())?;
        if self.exists(name)? {
            return Err(StorageError::AlreadyExists { name: name.to_owned() });
        }
        let mut args: Vec<OsString> = vec!["create".into(), "-q".into(), "-f".into(), format.as_str().into()];
        if let Some(b) = backing {
            let chain = self.chain(b)?;
            let bformat = chain.first().map(|(_, r)| r.format).unwrap_or_default();
            // -u: the backing image is not opened (the size is given); its format is recorded.
            args.extend(["-u".into(), "-b".into(), b.into(), "-F".into(), bformat.as_str().into()]);
        }
        self.reserve(&op, true, size.bytes())?;
        let tmp = self.temp_for(name)?;
        args.extend([tmp.path.clone().into(), size.bytes().to_string().into()]);
        self.run(name, args, None, &[(&tmp.path, Access::ReadWrite)]).await?;
        let record =
            Record { format, backing: backing.map(str::to_owned), virtual_size: size.bytes(), snapshots: 0 };
        self.publish_recorded(tmp, name, record)?;
        drop(op);
        self.inspect(name).await.map(|(info, _)| info)
    }

    async fn do_resize(&self, name: &str, size: Size, force: bool) -> Result<DiskInfo, StorageError> {
        check_name(name)?;
        check_size(size)?;
        let op = self.claim(name, format!("resize to {size}"), &[])?;
        let record = self.record(name)?;
        let current = record.virtual_size;
        let shrink = size.bytes() < current;
        if shrink && !force {
            return Err(StorageError::InvalidSize {
                reason: format!(
                    "{size} is smaller than the current {} of {name:?}: shrinking loses the data at the end; force it",
                    Size(current)
                ),
            });
        }
        if size.bytes() != current {
            self.refuse_if_backing(name, "resize")?;
            self.reserve(&op, false, size.bytes().saturating_sub(current))?;
            let mut args: Vec<OsString> = vec!["resize".into(), "-q".into()];
            if shrink {
                args.push("--shrink".into());
            }
            args.extend([
                self.spec(&[(name.to_owned(), record.clone())], false),
                size.bytes().to_string().into(),
            ]);
            self.run(name, args, None, &[(&self.path(name), Access::ReadWrite)]).await?;
            self.update(|index| index.insert(name, Record { virtual_size: size.bytes(), ..record }))?;
        }
        drop(op);
        self.inspect(name).await.map(|(info, _)| info)
    }

    /// Runs `qemu-img snapshot <flag> <snapshot>` on the qcow2 image `name` (opened as the
    /// recorded qcow2, without its backing image).
    async fn snapshot_op(
        &self,
        name: &str,
        record: &Record,
        flag: &str,
        snapshot: &str,
    ) -> Result<(), StorageError> {
        let spec = self.spec(&[(name.to_owned(), record.clone())], false);
        let args: Vec<OsString> = vec!["snapshot".into(), "-q".into(), flag.into(), snapshot.into(), spec];
        self.run(name, args, None, &[(&self.path(name), Access::ReadWrite)]).await.map(drop)
    }

    /// The record of the qcow2 image `name`; Unsupported for raw.
    fn qcow2(&self, name: &str) -> Result<Record, StorageError> {
        let record = self.record(name)?;
        if record.format != Format::Qcow2 {
            return Err(StorageError::Unsupported {
                reason: format!("{name:?} is raw: snapshots need qcow2"),
            });
        }
        Ok(record)
    }

    async fn do_snapshot_create(&self, name: &str, snapshot: &str) -> Result<SnapshotInfo, StorageError> {
        check_name(name)?;
        check_snapshot_name(snapshot)?;
        let _op = self.claim(name, format!("snapshot {snapshot}"), &[])?;
        let record = self.qcow2(name)?;
        let (_, snapshots) = self.inspect(name).await?;
        if snapshots.iter().any(|s| s.name == snapshot) {
            return Err(StorageError::AlreadyExists { name: format!("{name}@{snapshot}") });
        }
        self.snapshot_op(name, &record, "-c", snapshot).await?;
        let (_, snapshots) = self.inspect(name).await?;
        // The newest of that name (there is one: duplicates are refused above).
        snapshots.iter().rev().find(|s| s.name == snapshot).map(SnapshotJson::to_info).ok_or_else(|| {
            StorageError::ToolFailed {
                tool: TOOL.into(),
                status: "exit status: 0".into(),
                message: format!("snapshot {snapshot:?} of {name:?} not listed after its creation"),
            }
        })
    }

    async fn do_snapshot_list(&self, name: &str) -> Result<Vec<SnapshotInfo>, StorageError> {
        check_name(name)?;
        let (_, snapshots) = self.inspect(name).await?;
        Ok(snapshots.iter().map(SnapshotJson::to_info).collect())
    }

    /// Reverts to or deletes (`flag` `-a`, `-d`) the snapshot `snapshot` of `name`.
    async fn do_snapshot_change(&self, name: &str, snapshot: &str, flag: &str) -> Result<(), StorageError> {
        check_name(name)?;
        check_snapshot_name(snapshot)?;
        let what = if flag == "-a" { "revert" } else { "delete snapshot" };
        let _op = self.claim(name, format!("{what} {snapshot}"), &[])?;
        let record = self.qcow2(name)?;
        let (_, snapshots) = self.inspect(name).await?;
        if !snapshots.iter().any(|s| s.name == snapshot) {
            return Err(StorageError::SnapshotNotFound {
                disk: name.to_owned(),
                snapshot: snapshot.to_owned(),
            });
        }
        if flag == "-a" {
            self.refuse_if_backing(name, "revert")?;
        }
        self.snapshot_op(name, &record, flag, snapshot).await?;
        // The recorded virtual size and snapshot count follow (a revert may change the size).
        self.inspect(name).await.map(drop)
    }

    async fn do_clone(
        &self,
        source: &str,
        name: &str,
        linked: bool,
        format: Option<Format>,
    ) -> Result<DiskInfo, StorageError> {
        check_name(source)?;
        check_name(name)?;
        if source == name {
            return Err(StorageError::AlreadyExists { name: name.to_owned() });
        }
        let op = self.claim(name, format!("clone from {source}"), &[source])?;
        if self.exists(name)? {
            return Err(StorageError::AlreadyExists { name: name.to_owned() });
        }
        let chain = self.chain(source)?;
        let Some((_, src)) = chain.first() else {
            return Err(StorageError::NotFound { name: source.to_owned() });
        };
        let src = src.clone();
        if linked && format == Some(Format::Raw) {
            return Err(StorageError::Unsupported {
                reason: "a linked clone is qcow2 (raw has no backing image)".into(),
            });
        }
        self.reserve(&op, true, src.virtual_size)?;
        if linked {
            let tmp = self.temp_for(name)?;
            let args: Vec<OsString> = vec![
                "create".into(),
                "-q".into(),
                "-f".into(),
                "qcow2".into(),
                "-u".into(),
                "-b".into(),
                source.into(),
                "-F".into(),
                src.format.as_str().into(),
                tmp.path.clone().into(),
                src.virtual_size.to_string().into(),
            ];
            self.run(name, args, None, &[(&tmp.path, Access::ReadWrite)]).await?;
            let record = Record {
                format: Format::Qcow2,
                backing: Some(source.to_owned()),
                virtual_size: src.virtual_size,
                snapshots: 0,
            };
            self.publish_recorded(tmp, name, record)?;
            drop(op);
            return self.inspect(name).await.map(|(info, _)| info);
        }
        let record = Record {
            format: format.unwrap_or(src.format),
            backing: None,
            virtual_size: src.virtual_size,
            snapshots: 0,
        };
        let needed: u64 = chain
            .iter()
            .map(|(n, r)| {
                std::fs::symlink_metadata(self.path(n)).map_or(r.virtual_size, |m| {
                    use std::os::unix::fs::MetadataExt as _;
                    m.blocks().saturating_mul(512)
                })
            })
            .fold(0u64, u64::saturating_add);
        let free = free_space(&self.inner.root).map_err(|e| io_error(name, e))?;
        if needed > free {
            return Err(StorageError::NoSpace {
                message: format!(
                    "a full copy of {source:?} needs about {needed} bytes; {free} bytes free in the storage root"
                ),
            });
        }
        let tmp = self.temp_for(name)?;
        let args: Vec<OsString> = vec![
            "convert".into(),
            "-p".into(),
            "-O".into(),
            record.format.as_str().into(),
            self.spec(&chain, true),
            tmp.path.clone().into(),
        ];
        let paths: Vec<PathBuf> = chain.iter().map(|(n, _)| self.path(n)).collect();
        let mut files: Vec<(&Path, Access)> = paths.iter().map(|p| (p.as_path(), Access::Read)).collect();
        files.push((&tmp.path, Access::ReadWrite));
        self.run(name, args, Some(&op), &files).await?;
        self.publish_recorded(tmp, name, record)?;
        drop(op);
        self.inspect(name).await.map(|(info, _)| info)
    }

    async fn do_delete(&self, name: &str) -> Result<(), StorageError> {
        check_name(name)?;
        let _op = self.claim(name, "delete".into(), &[])?;
        self.existing(name)?;
        self.refuse_if_backing(name, "delete")?;
        // The file first: a record without its file is dropped at the next start, while a file
        // without its record would be adopted again from its (guest-written) content.
        std::fs::remove_file(self.path(name)).map_err(|e| io_error(name, e))?;
        self.update(|index| index.remove(name)).map(drop)
    }
}

impl Storage for QemuImg {
    async fn create(
        &self,
        name: String,
        size: Size,
        format: Option<Format>,
        backing: Option<String>,
    ) -> Result<DiskInfo, StorageError> {
        let log = OpLog::new("create", &name);
        log.finish(self.do_create(&name, size, format, backing.as_deref()).await)
    }

    async fn info(&self, name: String) -> Result<DiskInfo, StorageError> {
        check_name(&name)?;
        let r = self.inspect(&name).await.map(|(info, _)| info);
        tracing::debug!(%name, ok = r.is_ok(), "info");
        r
    }

    async fn list(&self) -> Result<Vec<DiskInfo>, StorageError> {
        use std::os::unix::fs::MetadataExt as _;
        let records: Vec<(String, Record)> =
            self.index().iter().map(|(n, r)| (n.clone(), r.clone())).collect();
        let mut list = Vec::with_capacity(records.len());
        for (name, r) in records {
            // From the record; the file's allocated bytes from its metadata (no qemu-img).
            let Ok(m) = std::fs::symlink_metadata(self.path(&name)) else { continue };
            if !m.file_type().is_file() {
                continue;
            }
            list.push(DiskInfo {
                name,
                format: r.format,
                virtual_size: r.virtual_size,
                actual_size: m.blocks().saturating_mul(512),
                backing: r.backing,
                snapshots: r.snapshots as usize,
            });
        }
        tracing::debug!(images = list.len(), "list");
        Ok(list)
    }

    async fn resize(&self, name: String, size: Size, force: bool) -> Result<DiskInfo, StorageError> {
        let log = OpLog::new("resize", &name);
        log.finish(self.do_resize(&name, size, force).await)
    }

    async fn snapshot_create(&self, name: String, snapshot: String) -> Result<SnapshotInfo, StorageError> {
        let log = OpLog::new("snapshot-create", &name);
        log.finish(self.do_snapshot_create(&name, &snapshot).await)
    }

    async fn snapshot_list(&self, name: String) -> Result<Vec<SnapshotInfo>, StorageError> {
        let r = self.do_snapshot_list(&name).await;
        tracing::debug!(%name, ok = r.is_ok(), "snapshot list");
        r
    }

    async fn snapshot_revert(&self, name: String, snapshot: String) -> Result<(), StorageError> {
        let log = OpLog::new("snapshot-revert", &name);
        log.finish(self.do_snapshot_change(&name, &snapshot, "-a").await)
    }

    async fn snapshot_delete(&self, name: String, snapshot: String) -> Result<(), StorageError> {
        let log = OpLog::new("snapshot-delete", &name);
        log.finish(self.do_snapshot_change(&name, &snapshot, "-d").await)
    }

    async fn clone_disk(
        &self,
        source: String,
        name: String,
        linked: bool,
        format: Option<Format>,
    ) -> Result<DiskInfo, StorageError> {
        let log = OpLog::new(if linked { "clone-linked" } else { "clone-full" }, &name);
        log.finish(self.do_clone(&source, &name, linked, format).await)
    }

    async fn delete(&self, name: String) -> Result<(), StorageError> {
        let log = OpLog::new("delete", &name);
        log.finish(self.do_delete(&name).await)
    }

    async fn progress(&self, name: String) -> Option<Progress> {
        self.running().get(&name).map(|r| Progress { operation: r.operation.clone(), percent: r.percent })
    }
}

/// The error for `info --output=json` output that does not parse.
fn unexpected_info(name: &str, e: &serde_json::Error) -> StorageError {
    StorageError::ToolFailed {
        tool: TOOL.into(),
        status: "exit status: 0".into(),
        message: format!("unexpected `info --output=json` output for {name:?}: {e}"),
    }
}

/// `qemu-img info --output=json`, the parts used.
#[derive(Debug, Deserialize)]
struct ImageJson {
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "actual-size", default)]
    actual_size: Option<u64>,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
    #[serde(rename = "backing-filename-format", default)]
    backing_format: Option<String>,
    #[serde(default)]
    snapshots: Vec<SnapshotJson>,
    #[serde(rename = "format-specific", default)]
    format_specific: Option<FormatSpecificJson>,
}

#[derive(Debug, Deserialize)]
struct FormatSpecificJson {
    #[serde(default)]
    data: Option<FormatDataJson>,
}

#[derive(Debug, Deserialize)]
struct FormatDataJson {
    #[serde(rename = "data-file", default)]
    data_file: Option<String>,
}

/// One entry of info's `snapshots`.
#[derive(Debug, Deserialize)]
struct SnapshotJson {
    name: String,
    id: String,
    #[serde(rename = "date-sec", default)]
    date_sec: u64,
    #[serde(rename = "vm-state-size", default)]
    vm_state_size: u64,
}

impl SnapshotJson {
    fn to_info(&self) -> SnapshotInfo {
        SnapshotInfo {
            name: self.name.clone(),
            id: self.id.clone(),
            date: self.date_sec,
            vm_state_size: self.vm_state_size,
        }
    }
}

fn parse_info(out: &[u8]) -> Result<ImageJson, serde_json::Error> {
    serde_json::from_slice(out)
}

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
fn check_snapshot_name(snapshot: &str) -> Result<(), StorageError> {
    check_name(snapshot)?;
    if snapshot.bytes().all(|b| b.is_ascii_digit()) {
        return Err(StorageError::InvalidName {
            name: snapshot.to_owned(),
            reason: "a snapshot name cannot be all digits (qemu-img would take it for a snapshot id)".into(),
        });
    }
    Ok(())
}

fn check_size(size: Size) -> Result<(), StorageError> {
    let reason = if size.bytes() == 0 {
        "zero".to_owned()
    } else if size.bytes() % 512 != 0 {
        format!("{} bytes is not a multiple of 512", size.bytes())
    } else if size.bytes() > MAX_SIZE {
        format!("{} bytes is more than 2^60", size.bytes())
    } else {
        return Ok(());
    };
    Err(StorageError::InvalidSize { reason })
}

/// Bytes of a qcow2 header read at adoption (version 3 header up to its incompatible features).
const QCOW2_HEADER: usize = 104;

/// Whether a qcow2 header (version 3) sets the incompatible feature "external data file".
fn qcow2_has_data_file(head: &[u8]) -> bool {
    match head.get(4..8).zip(head.get(72..80)) {
        Some((version, features)) => {
            version == [0, 0, 0, 3] && features.get(7).is_some_and(|low| low & 0b100 != 0)
        }
        None => false,
    }
}

/// qcow2 if the header has the qcow2 magic and version 2 or 3; raw otherwise (adoption only:
/// after that, the record says).
fn format_from_header(head: &[u8]) -> Format {
    match head {
        [b'Q', b'F', b'I', 0xfb, v0, v1, v2, v3, ..]
            if matches!(u32::from_be_bytes([*v0, *v1, *v2, *v3]), 2 | 3) =>
        {
            Format::Qcow2
        }
        _ => Format::Raw,
    }
}

/// The image name a backing file refers to, if it is an image of `root`: a plain name
/// (relative to the image's directory, the root) or `<root>/<name>`.
fn backing_name(root: &Path, file: &str) -> Option<String> {
    let path = Path::new(file);
    let name = if path.is_absolute() {
        if path.parent()? != root {
            return None;
        }
        path.file_name()?.to_str()?
    } else {
        let mut normal = path.components().filter(|c| !matches!(c, Component::CurDir));
        let Some(Component::Normal(n)) = normal.next() else { return None };
        if normal.next().is_some() {
            return None;
        }
        n.to_str()?
    };
    check_name(name).ok()?;
    Some(name.to_owned())
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

/// An I/O error on the image `name`.
fn io_error(name: &str, e: io::Error) -> StorageError {
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

/// Bytes available to unprivileged users on the filesystem of `path`.
fn free_space(path: &Path) -> io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
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

/// Reads `stdout` (up to [`MAX_STDOUT`]), publishing `-p` progress lines to `progress`.
async fn read_stdout(stdout: Option<impl AsyncRead + Unpin>, progress: Option<&OpGuard>) -> Vec<u8> {
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
        if let Some(op) = progress {
            for &b in chunk {
                if b == b'\r' || b == b'\n' {
                    if let Some(p) = std::str::from_utf8(&line).ok().and_then(parse_progress) {
                        op.set_percent(p);
                    }
                    line.clear();
                } else if line.len() < 256 {
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

/// A temporary file of an operation: removed when dropped, unless kept (renamed into place).
struct TempFile {
    path: PathBuf,
    keep: bool,
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

/// The registration of a running operation; unregistered when dropped.
struct OpGuard {
    storage: QemuImg,
    name: String,
}

impl OpGuard {
    fn set_percent(&self, percent: f32) {
        if let Some(r) = self.storage.running().get_mut(&self.name) {
            r.percent = percent;
        }
    }
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        self.storage.running().remove(&self.name);
    }
}

/// The info line of one operation: its outcome, or "cancelled" if dropped unfinished.
struct OpLog {
    op: &'static str,
    name: String,
    done: bool,
}

impl OpLog {
    fn new(op: &'static str, name: &str) -> OpLog {
        OpLog { op, name: name.to_owned(), done: false }
    }

    fn finish<T>(mut self, r: Result<T, StorageError>) -> Result<T, StorageError> {
        self.done = true;
        match &r {
            Ok(_) => tracing::info!(name = %self.name, op = self.op, "ok"),
            Err(e) => tracing::info!(name = %self.name, op = self.op, error = %e, "failed"),
        }
        r
    }
}

impl Drop for OpLog {
    fn drop(&mut self) {
        if !self.done {
            tracing::info!(name = %self.name, op = self.op, "cancelled");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use proptest::prelude::*;

    /// `qemu-img info --output=json` (7.2) of a linked clone with two snapshots.
    const INFO: &str = r#"{
    "snapshots": [
        {
            "icount": 0,
            "vm-clock-nsec": 0,
            "name": "before-upgrade",
            "date-sec": 1795621308,
            "date-nsec": 450158000,
            "vm-clock-sec": 0,
            "id": "1",
            "vm-state-size": 0
        },
        {
            "icount": 0,
            "vm-clock-nsec": 0,
            "name": "s2",
            "date-sec": 1795621400,
            "date-nsec": 0,
            "vm-clock-sec": 0,
            "id": "2",
            "vm-state-size": 4096
        }
    ],
    "backing-filename-format": "qcow2",
    "virtual-size": 1048576,
    "filename": "child",
    "cluster-size": 65536,
    "format": "qcow2",
    "actual-size": 200704,
    "format-specific": {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": false,
            "refcount-bits": 16,
            "corrupt": false,
            "extended-l2": false
        }
    },
    "full-backing-filename": "base",
    "backing-filename": "base",
    "dirty-flag": false
}"#;

    #[test]
    fn parses_captured_info() {
        let j = parse_info(INFO.as_bytes()).unwrap();
        assert_eq!(j.format, "qcow2");
        assert_eq!(j.virtual_size, 1 << 20);
        assert_eq!(j.actual_size, Some(200704));
        assert_eq!(j.backing_filename.as_deref(), Some("base"));
        assert_eq!(j.backing_format.as_deref(), Some("qcow2"));
        assert!(j.format_specific.unwrap().data.unwrap().data_file.is_none());
        let snaps: Vec<_> = j.snapshots.iter().map(SnapshotJson::to_info).collect();
        assert_eq!(
            snaps,
            [
                SnapshotInfo {
                    name: "before-upgrade".into(),
                    id: "1".into(),
                    date: 1795621308,
                    vm_state_size: 0
                },
                SnapshotInfo { name: "s2".into(), id: "2".into(), date: 1795621400, vm_state_size: 4096 },
            ]
        );
        let raw = r#"{"virtual-size": 1048576, "filename": "r", "format": "raw", "actual-size": 4096, "dirty-flag": false}"#;
        let j = parse_info(raw.as_bytes()).unwrap();
        assert!(j.snapshots.is_empty() && j.backing_filename.is_none() && j.format_specific.is_none());
        let data_file = r#"{"virtual-size": 512, "format": "qcow2",
            "format-specific": {"type": "qcow2", "data": {"data-file": "/etc/shadow", "data-file-raw": false}}}"#;
        let j = parse_info(data_file.as_bytes()).unwrap();
        assert_eq!(j.format_specific.unwrap().data.unwrap().data_file.as_deref(), Some("/etc/shadow"));
        for bad in ["", "{", "[]", r#"{"format": "raw"}"#, r#"{"format": "raw", "virtual-size": -1}"#] {
            assert!(parse_info(bad.as_bytes()).is_err(), "{bad:?}");
        }
    }

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

    #[test]
    fn sizes() {
        assert!(check_size(Size(512)).is_ok());
        assert!(check_size(Size(1 << 60)).is_ok());
        for bad in [0, 1, 1000, (1 << 60) + 512, u64::MAX] {
            assert!(matches!(check_size(Size(bad)), Err(StorageError::InvalidSize { .. })), "{bad}");
        }
    }

    #[test]
    fn formats_from_headers() {
        assert_eq!(format_from_header(b"QFI\xfb\0\0\0\x03rest"), Format::Qcow2);
        assert_eq!(format_from_header(b"QFI\xfb\0\0\0\x02"), Format::Qcow2);
        assert_eq!(format_from_header(b"QFI\xfb\0\0\0\x01"), Format::Raw);
        assert_eq!(format_from_header(b"QFI\xfb"), Format::Raw);
        assert_eq!(format_from_header(b"# Disk DescriptorFile"), Format::Raw);
        assert_eq!(format_from_header(b""), Format::Raw);
    }

    #[test]
    fn backing_names() {
        let root = Path::new("/var/images");
        assert_eq!(backing_name(root, "base").as_deref(), Some("base"));
        assert_eq!(backing_name(root, "./base").as_deref(), Some("base"));
        assert_eq!(backing_name(root, "/var/images/base").as_deref(), Some("base"));
        for bad in [
            "../base",
            "/etc/passwd",
            "/var/images/a/b",
            "a/b",
            "/var/images/.x",
            "json:{}",
            "",
            "nbd://h/x",
            "/",
        ] {
            assert_eq!(backing_name(root, bad), None, "{bad:?}");
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

    /// What the service's qemu-img may open: the files its call names, nothing else — even
    /// when its arguments (a forged `json:` backing) ask for more.
    #[tokio::test]
    async fn the_services_qemu_img_opens_only_the_files_of_its_call() {
        let base = std::env::temp_dir().join(format!("dombus-qemu-sandbox-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (root, outside) = (base.join("root"), base.join("outside"));
        std::fs::create_dir_all(&outside).unwrap();
        let secret = outside.join("secret");
        std::fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
        let s = QemuImg::new(root, "qemu-img".into()).unwrap();
        s.create("a".into(), Size(1 << 20), None, None).await.unwrap();
        s.create("b".into(), Size(1 << 20), Some(Format::Raw), None).await.unwrap();
        let a = s.path("a");
        let forged = serde_json::json!({
            "driver": "qcow2",
            "file": { "driver": "file", "filename": a },
            "backing": { "driver": "raw", "file": { "driver": "file", "filename": secret } },
        });
        let forged: OsString = format!("json:{forged}").into();
        let denied = |r: Result<Vec<u8>, StorageError>| match r {
            Err(StorageError::ToolFailed { message, .. }) => {
                assert!(message.contains("Permission denied"), "{message}")
            }
            r => panic!("expected EACCES, got {r:?}"),
        };
        let a_read = [(a.as_path(), Access::Read)];
        let info = |f: &OsString| vec!["info".into(), "-U".into(), "--backing-chain".into(), f.clone()];
        // (`info` opens no backing; `convert` reads through it.)
        let tmp = s.temp_for("x").unwrap();
        let convert =
            vec!["convert".into(), "-O".into(), "raw".into(), forged.clone(), tmp.path.clone().into()];
        denied(
            s.run("x", convert, None, &[(a.as_path(), Access::Read), (&tmp.path, Access::ReadWrite)]).await,
        );
        let secret_raw = || -> OsString {
            format!(
                "json:{}",
                serde_json::json!({"driver": "raw", "file": {"driver": "file", "filename": secret}})
            )
            .into()
        };
        denied(s.run("a", info(&secret_raw()), None, &a_read).await);
        let resize = vec!["resize".into(), secret_raw(), "2M".into()];
        denied(s.run("a", resize, None, &a_read).await);
        // Another image of the root, not named by the call.
        denied(s.run("a", info(&s.path("b").into_os_string()), None, &a_read).await);
        // A write to a file the call only reads.
        let resize_a =
            vec!["resize".into(), "-f".into(), "qcow2".into(), a.clone().into_os_string(), "2M".into()];
        denied(s.run("a", resize_a, None, &a_read).await);
        // What the call names, it may.
        s.run("a", info(&a.clone().into_os_string()), None, &a_read).await.unwrap();
        assert_eq!(std::fs::read(&secret).unwrap(), vec![0x5a; 1 << 20]);
        drop(tmp);
        drop(s);
        let _ = std::fs::remove_dir_all(&base);
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

        #[test]
        fn progress_parsing_never_panics(line in "\\PC{0,40}") {
            let _ = parse_progress(&line);
        }
    }
}
