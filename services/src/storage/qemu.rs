//! [`QemuImg`]: the [`Storage`] service on the real `qemu-img`, composed of the storage root
//! ([`Root`]: names, lock, temporary files, publishing), the record of its images ([`Index`]),
//! the operations running ([`Operations`]), the rules of images ([`image`]: parsing, backing
//! chains, specs) and the qemu-img processes ([`QemuImgProgram`]).
//!
//! Guests write the content of the images they use, so nothing is decided from an image's
//! bytes after the service has recorded it. The record (format, backing image, virtual size,
//! snapshot count) is made when the service creates or clones an image, or adopts one the
//! operator placed in the root (at start, or when a call first names it: its first bytes give
//! the format, a sandboxed `qemu-img info` the rest; its backing file must be an image of the
//! root, adopted first). From then on qemu-img opens an image only through a `json:` spec built
//! from the record: the recorded driver (never probed), and for qcow2 the recorded backing
//! chain or `"backing": null`, never what the header names now. External data files are
//! refused at adoption and never recorded; a qcow2 header rewritten later to name one (only
//! possible if the image was also given to a guest as raw) cannot reach it, because each
//! qemu-img runs in a Landlock sandbox (see [`Sandbox`](crate::sandbox::Sandbox)) that lets it
//! open only the files of its call — the image it changes, the recorded chain it reads, the
//! temporary file it writes — besides the program and its libraries. Linked clones record their
//! backing image by its relative name, so the root can be moved.
//!
//! New images (create, clones) are written to a temporary file of the root and published
//! without replacing anything; a dropped call (deadline, client gone) kills its `qemu-img` and
//! removes the temporary file.
//!
//! Each change that succeeds is published as an [`ImageEvent`] (one per change, in the order of
//! the changes of each image: published while the change's operation is registered), and the
//! operations' progress as [`ProgressUpdate`]s (see [`Operations`]). The streams show a domain
//! the events of its own images only.
//!
//! Each call acts for its caller ([`Owner`]): the toolstack (a domain of
//! [`StorageConfig::toolstack_domains`], or a caller with no domain: over Unix or TCP, only local
//! tools) on every image; any other domain only on the images it owns, every other name being
//! `NotFound` to it, decided from the record before anything else (no adoption, no Busy).

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::image::{self, Chain, MAX_CHAIN, SnapshotJson, check_size};
use super::index::{Index, Record};
use super::ops::{Bounds, Held, OpGuard, Operations};
use super::process::{QemuImgProgram, TOOL};
use super::root::{self, Root, TempFile, check_name, check_snapshot_name, io_error};
use super::{
    DiskInfo, Format, ImageEvent, Owner, Progress, ProgressUpdate, SnapshotInfo, Storage, StorageError,
};
use crate::sandbox::Access;
use crate::storage::Size;
use dombus::{Events, Topic, TopicLimits};

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
    /// The domains that are the toolstack: they see and act on every image, and the images
    /// they make are the toolstack's. Default: domain 0. A caller without a domain (over Unix or
    /// TCP, which only local tools reach) is the toolstack too.
    pub toolstack_domains: Vec<u32>,
    /// Most images one domain may own; a create or clone past it is refused
    /// ([`StorageError::OwnerQuotaExceeded`]). Default 64. The toolstack has no quota.
    pub quota_images: usize,
    /// Most bytes the virtual sizes of one domain's images may add up to; a create, clone or
    /// growing resize past it is refused ([`StorageError::OwnerQuotaExceeded`]). Default 1 TiB.
    pub quota_bytes: u64,
}

/// Default [`StorageConfig::max_images`].
pub const DEFAULT_MAX_IMAGES: usize = 4096;
/// Default [`StorageConfig::quota_images`].
pub const DEFAULT_QUOTA_IMAGES: usize = 64;
/// Default [`StorageConfig::quota_bytes`] (1 TiB).
pub const DEFAULT_QUOTA_BYTES: u64 = 1 << 40;
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
            toolstack_domains: vec![0],
            quota_images: DEFAULT_QUOTA_IMAGES,
            quota_bytes: DEFAULT_QUOTA_BYTES,
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
    root: Root,
    qemu_img: QemuImgProgram,
    /// The record of the images (format, backing, sizes): the only source of formats and
    /// backing images after an image is recorded.
    index: Mutex<Index>,
    ops: Arc<Operations>,
    /// The domains that are the toolstack.
    toolstack: BTreeSet<u32>,
    /// The changes to the images ([`Storage::events`]); resyncs carry each view's own snapshot.
    events: Topic<ImageEvent, Vec<DiskInfo>>,
}

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
        let root = root::prepare(&root)?;
        let (qemu_img, version) = QemuImgProgram::start(
            &qemu_img,
            &root,
            config.sandbox,
            &config.sandbox_read,
            &config.sandbox_write,
        )?;
        let (root, stale) = Root::take(root)?;

        let mut index = Index::load(root.path())?.unwrap_or_default();
        let gone: Vec<String> =
            index.iter().filter(|(name, _)| !root.holds(name)).map(|(name, _)| name.clone()).collect();
        for name in &gone {
            tracing::warn!(image = %name, "recorded image no longer in the root: record dropped");
            index.remove(name);
        }
        let max_virtual_bytes = match config.max_virtual_bytes {
            Some(b) => b,
            None => root.capacity()?.saturating_mul(DEFAULT_OVERCOMMIT),
        };
        let storage = QemuImg {
            inner: Arc::new(Inner {
                root,
                qemu_img,
                index: Mutex::new(index),
                ops: Operations::new(Bounds {
                    max_images: config.max_images,
                    max_virtual_bytes,
                    quota_images: config.quota_images,
                    quota_bytes: config.quota_bytes,
                }),
                toolstack: config.toolstack_domains.iter().copied().collect(),
                events: Topic::new(TopicLimits::default()),
            }),
        };
        storage.save().map_err(|e| io::Error::other(e.to_string()))?;
        let (mut adopted, mut refused) = (0, 0);
        for name in storage.inner.root.names().map_err(|e| io::Error::other(e.to_string()))? {
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
            root = %storage.root().display(), qemu_img = %storage.inner.qemu_img.path().display(), %version,
            stale_removed = stale, images, adopted, refused, sandbox = storage.inner.qemu_img.sandboxed(),
            "storage ready"
        );
        Ok(storage)
    }

    /// The storage root (canonical).
    pub fn root(&self) -> &Path {
        self.inner.root.path()
    }

    /// How many `qemu-img` processes this storage has started (for tests and metrics).
    pub fn qemu_img_runs(&self) -> u64 {
        self.inner.qemu_img.runs()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.inner.root.image(name)
    }

    /// Who makes the call being served: its domain (from the transport, not forgeable), the
    /// toolstack if that domain is one of the toolstack's or there is none (Unix, TCP, a call
    /// from this process).
    fn caller(&self) -> Owner {
        match dombus::rpc::current_caller().and_then(|c| c.domain) {
            Some(d) if !self.inner.toolstack.contains(&d) => Owner::Domain(d),
            _ => Owner::Toolstack,
        }
    }

    /// The record of the image `name` if `caller` may act on it: any image for the toolstack
    /// (adopting it first if it has none, see [`Self::record`]); for a domain, only a recorded
    /// image it owns. NotFound otherwise, the same error as for a name without an image, so
    /// that a domain cannot tell another owner's image from none.
    fn record_for(&self, name: &str, caller: Owner) -> Result<Record, StorageError> {
        if caller != Owner::Toolstack && self.index().get(name).is_none_or(|r| r.owner != caller) {
            return Err(StorageError::NotFound { name: name.to_owned() });
        }
        self.record(name)
    }

    /// The owner of `name` as the record says, for registering an operation on it before the
    /// claim: for a domain, NotFound unless it owns that recorded image (so that it is not told
    /// Busy about another's); for the toolstack, the recorded owner, or the toolstack's for a
    /// name without a record. The record is looked up again once claimed ([`Self::record_for`]).
    fn owner_of(&self, name: &str, caller: Owner) -> Result<Owner, StorageError> {
        match (caller, self.index().get(name)) {
            (Owner::Toolstack, r) => Ok(r.map_or(Owner::Toolstack, |r| r.owner)),
            (_, Some(r)) if r.owner == caller => Ok(caller),
            _ => Err(StorageError::NotFound { name: name.to_owned() }),
        }
    }

    fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.inner.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Saves the record.
    fn save(&self) -> Result<(), StorageError> {
        self.index().save(self.root()).map_err(|e| io_error("", e))
    }

    /// Changes the record with `f` and saves it.
    fn update<R>(&self, f: impl FnOnce(&mut Index) -> R) -> Result<R, StorageError> {
        let mut index = self.index();
        let r = f(&mut index);
        index.save(self.root()).map_err(|e| io_error("", e))?;
        Ok(r)
    }

    /// Registers `operation` of `caller` on `name` (which it changes, an image of `owner`)
    /// reading `reads` (see [`Operations::claim`]).
    fn claim(
        &self,
        name: &str,
        operation: String,
        reads: &[&str],
        owner: Owner,
        caller: Owner,
    ) -> Result<OpGuard, StorageError> {
        self.inner.ops.claim(name, operation, reads, owner, caller)
    }

    /// Reserves, for `op`, a new image (`new_image`) and `bytes` more of virtual size against
    /// the bounds and its image's owner's quota (see [`Operations::reserve`]).
    fn reserve(&self, op: &OpGuard, new_image: bool, bytes: u64) -> Result<(), StorageError> {
        self.inner.ops.reserve(op, new_image, bytes, |owner| {
            let index = self.index();
            let (images, bytes) = index.owned_by(owner);
            (Held { images: index.len(), bytes: index.total_virtual() }, Held { images, bytes })
        })
    }

    /// The record of the image `name`, which must be a regular file of the root; an image
    /// without one (the operator placed it there since the start) is adopted first.
    fn record(&self, name: &str) -> Result<Record, StorageError> {
        {
            // Under the record's lock, which publishing a new image holds until it is recorded:
            // an unrecorded file seen here is not one of ours in the middle of its creation.
            let index = self.index();
            self.inner.root.existing(name)?;
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
            return Err(image::chain_too_long(name));
        }
        let path = self.path(name);
        let (format, spec) = image::adoption_spec(&path, &self.inner.root.read_header(name)?);
        let args: Vec<OsString> = vec!["info".into(), "-U".into(), "--output=json".into(), spec];
        let out = self.inner.qemu_img.run_sync(name, &args, &[(&path, Access::Read)])?;
        let json = image::read_info(name, &out)?;
        json.check_format(name, format)?;
        if let Some(data_file) = json.data_file() {
            return Err(StorageError::InvalidName {
                name: name.to_owned(),
                reason: format!("the image has an external data file ({data_file:?}); not supported"),
            });
        }
        let backing = match &json.backing_filename {
            None => None,
            Some(file) => {
                let Some(backing) = image::backing_name(self.root(), file) else {
                    return Err(StorageError::InvalidName {
                        name: name.to_owned(),
                        reason: format!("its backing file {file:?} is not an image of the storage root"),
                    });
                };
                let bformat = image::backing_format(name, &backing, json.backing_format.as_deref())?;
                if backing == name {
                    return Err(image::chain_too_long(name));
                }
                self.inner.root.existing(&backing)?;
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
            snapshots: json.snapshot_count(),
            owner: Owner::Toolstack,
        };
        let (record, adopted) = self.update(|index| match index.get(name) {
            // Recorded meanwhile (adopted by another call): that record stands.
            Some(r) => (r.clone(), false),
            None => {
                index.insert(name, record.clone());
                (record, true)
            }
        })?;
        if adopted {
            self.announce(name, ImageEvent::Adopted);
        }
        tracing::info!(image = %name, format = format.as_str(), backing = ?record.backing, virtual_size = record.virtual_size, "adopted");
        Ok(record)
    }

    /// The recorded chain of `name`: its record, then its backing image's, and so on. Every
    /// image of it must be a regular file of the root.
    fn chain(&self, name: &str) -> Result<Chain, StorageError> {
        image::chain(name, |n| self.record(n))
    }

    /// The `json:` spec that opens `chain` as recorded (see [`image::spec`]).
    fn spec(&self, chain: &[(String, Record)], follow: bool) -> OsString {
        image::spec(self.root(), chain, follow)
    }

    /// What `qemu-img info` says about the recorded image `name`, opened as recorded (no
    /// backing): its DiskInfo (format and backing from the record), its snapshots. Refreshes the
    /// recorded virtual size and snapshot count.
    async fn inspect(&self, name: &str) -> Result<(DiskInfo, Vec<SnapshotJson>), StorageError> {
        let record = self.record(name)?;
        let chain = [(name.to_owned(), record.clone())];
        let args = vec!["info".into(), "-U".into(), "--output=json".into(), self.spec(&chain, false)];
        let out = self.inner.qemu_img.run(name, args, None, &[(&self.path(name), Access::Read)]).await?;
        let json = image::read_info(name, &out)?;
        json.check_format(name, record.format)?;
        let snapshots = json.snapshot_count();
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
            owner: record.owner,
        };
        Ok((info, json.snapshots))
    }

    /// Busy if linked clones use `name` as their backing image (changing it would corrupt them):
    /// a lookup in the record. A domain is told the names of its own clones only.
    fn refuse_if_backing(&self, name: &str, what: &str, caller: Owner) -> Result<(), StorageError> {
        let users: Vec<String> = {
            let index = self.index();
            index
                .users_of(name)
                .map(|u| match index.get(u) {
                    Some(r) if caller != Owner::Toolstack && r.owner != caller => {
                        "an image of another owner".to_owned()
                    }
                    _ => u.clone(),
                })
                .collect()
        };
        if users.is_empty() {
            Ok(())
        } else {
            Err(StorageError::Busy {
                name: name.to_owned(),
                operation: format!("backing image of {} (cannot {what} it)", users.join(", ")),
            })
        }
    }

    /// Publishes `tmp` as `name` and records it, holding the record's lock throughout (see
    /// [`Self::record`]).
    fn publish_recorded(&self, tmp: TempFile, name: &str, record: Record) -> Result<(), StorageError> {
        let mut index = self.index();
        self.inner.root.publish(tmp, name)?;
        index.insert(name, record);
        index.save(self.root()).map_err(|e| io_error(name, e))
    }

    /// The image `name` of record `r` as `list` shows it: from the record, its allocated bytes
    /// from the file's metadata (no qemu-img); `None` if it is no regular file.
    fn listed(&self, name: String, r: Record) -> Option<DiskInfo> {
        use std::os::unix::fs::MetadataExt as _;
        let m = std::fs::symlink_metadata(self.path(&name)).ok().filter(|m| m.file_type().is_file())?;
        Some(DiskInfo {
            name,
            format: r.format,
            virtual_size: r.virtual_size,
            actual_size: m.blocks().saturating_mul(512),
            backing: r.backing,
            snapshots: r.snapshots as usize,
            owner: r.owner,
        })
    }

    /// The images `caller` may see (all, for the toolstack), or only `name` of them, by name.
    fn listing(&self, caller: Owner, name: Option<&str>) -> Vec<DiskInfo> {
        let records: Vec<(String, Record)> = self
            .index()
            .iter()
            .filter(|(n, r)| {
                (caller == Owner::Toolstack || r.owner == caller)
                    && name.is_none_or(|name| name == n.as_str())
            })
            .map(|(n, r)| (n.clone(), r.clone()))
            .collect();
        records.into_iter().filter_map(|(n, r)| self.listed(n, r)).collect()
    }

    /// Publishes the change `event` says of the image `name`, as now recorded (see
    /// [`ImageEvent`]). Called while the change's operation is registered, so that the events of
    /// an image come in the order of its changes.
    fn announce(&self, name: &str, event: impl FnOnce(DiskInfo) -> ImageEvent) {
        let record = self.index().get(name).cloned();
        match record.and_then(|r| self.listed(name.to_owned(), r)) {
            Some(info) => {
                self.inner.events.publish(event(info));
            }
            None => tracing::warn!(image = %name, "changed, but no longer recorded: no event"),
        }
    }

    /// Runs `qemu-img args` on `name`, confined to `files` (see [`QemuImgProgram::run`]);
    /// with `progress`, its `-p` lines update that operation.
    async fn run(
        &self,
        name: &str,
        args: Vec<OsString>,
        progress: Option<&OpGuard>,
        files: &[(&Path, Access)],
    ) -> Result<Vec<u8>, StorageError> {
        match progress {
            Some(op) => self.inner.qemu_img.run(name, args, Some(&|p| op.set_percent(p)), files).await,
            None => self.inner.qemu_img.run(name, args, None, files).await,
        }
    }

    async fn do_create(
        &self,
        name: &str,
        size: Size,
        format: Option<Format>,
        backing: Option<&str>,
        caller: Owner,
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
        // A linked clone reads its backing image: the caller's own only (checked again once
        // claimed, when it can no longer be replaced; here so that a domain is not told Busy).
        if let Some(b) = backing {
            self.owner_of(b, caller)?;
        }
        let op = self.claim(name, "create".into(), backing.as_slice(), caller, caller)?;
        let made = async {
            if self.inner.root.exists(name)? {
                return Err(StorageError::AlreadyExists { name: name.to_owned() });
            }
            let backing_format = match backing {
                Some(b) => {
                    self.record_for(b, caller)?;
                    let chain = self.chain(b)?;
                    Some((b, chain.first().map(|(_, r)| r.format).unwrap_or_default()))
                }
                None => None,
            };
            self.reserve(&op, true, size.bytes())?;
            let tmp = self.inner.root.temp_for(name)?;
            let args = image::create_args(format, backing_format, tmp.path(), size.bytes());
            self.run(name, args, None, &[(tmp.path(), Access::ReadWrite)]).await?;
            let record = Record {
                format,
                backing: backing.map(str::to_owned),
                virtual_size: size.bytes(),
                snapshots: 0,
                owner: caller,
            };
            self.publish_recorded(tmp, name, record)?;
            op.recorded();
            self.announce(name, ImageEvent::Created);
            Ok(())
        }
        .await;
        op.end(made)?;
        self.inspect(name).await.map(|(info, _)| info)
    }

    async fn do_resize(
        &self,
        name: &str,
        size: Size,
        force: bool,
        caller: Owner,
    ) -> Result<DiskInfo, StorageError> {
        check_name(name)?;
        check_size(size)?;
        let owner = self.owner_of(name, caller)?;
        let op = self.claim(name, format!("resize to {size}"), &[], owner, caller)?;
        let resized = async {
            let record = self.record_for(name, caller)?;
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
                self.refuse_if_backing(name, "resize", caller)?;
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
                self.announce(name, ImageEvent::Resized);
            }
            Ok(())
        }
        .await;
        op.end(resized)?;
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

    async fn do_snapshot_create(
        &self,
        name: &str,
        snapshot: &str,
        caller: Owner,
    ) -> Result<SnapshotInfo, StorageError> {
        check_name(name)?;
        check_snapshot_name(snapshot)?;
        let owner = self.owner_of(name, caller)?;
        let op = self.claim(name, format!("snapshot {snapshot}"), &[], owner, caller)?;
        let taken = async {
            self.record_for(name, caller)?;
            let record = self.qcow2(name)?;
            let (_, snapshots) = self.inspect(name).await?;
            if snapshots.iter().any(|s| s.name == snapshot) {
                return Err(StorageError::AlreadyExists { name: format!("{name}@{snapshot}") });
            }
            self.snapshot_op(name, &record, "-c", snapshot).await?;
            // Refreshes the recorded snapshot count the event shows.
            let after = self.inspect(name).await;
            let snapshot = snapshot.to_owned();
            self.announce(name, |image| ImageEvent::SnapshotCreated { image, snapshot: snapshot.clone() });
            let (_, snapshots) = after?;
            // The newest of that name (there is one: duplicates are refused above).
            snapshots.iter().rev().find(|s| s.name == snapshot).map(SnapshotJson::to_info).ok_or_else(|| {
                StorageError::ToolFailed {
                    tool: TOOL.into(),
                    status: "exit status: 0".into(),
                    message: format!("snapshot {snapshot:?} of {name:?} not listed after its creation"),
                }
            })
        }
        .await;
        op.end(taken)
    }

    async fn do_snapshot_list(&self, name: &str, caller: Owner) -> Result<Vec<SnapshotInfo>, StorageError> {
        check_name(name)?;
        self.record_for(name, caller)?;
        let (_, snapshots) = self.inspect(name).await?;
        Ok(snapshots.iter().map(SnapshotJson::to_info).collect())
    }

    /// Reverts to or deletes (`flag` `-a`, `-d`) the snapshot `snapshot` of `name`.
    async fn do_snapshot_change(
        &self,
        name: &str,
        snapshot: &str,
        flag: &str,
        caller: Owner,
    ) -> Result<(), StorageError> {
        check_name(name)?;
        check_snapshot_name(snapshot)?;
        let what = if flag == "-a" { "revert" } else { "delete snapshot" };
        let owner = self.owner_of(name, caller)?;
        let op = self.claim(name, format!("{what} {snapshot}"), &[], owner, caller)?;
        let changed = async {
            self.record_for(name, caller)?;
            let record = self.qcow2(name)?;
            let (_, snapshots) = self.inspect(name).await?;
            if !snapshots.iter().any(|s| s.name == snapshot) {
                return Err(StorageError::SnapshotNotFound {
                    disk: name.to_owned(),
                    snapshot: snapshot.to_owned(),
                });
            }
            if flag == "-a" {
                self.refuse_if_backing(name, "revert", caller)?;
            }
            self.snapshot_op(name, &record, flag, snapshot).await?;
            // The recorded virtual size and snapshot count follow (a revert may change the size).
            let after = self.inspect(name).await.map(drop);
            let snapshot = snapshot.to_owned();
            self.announce(name, |image| match flag {
                "-a" => ImageEvent::SnapshotReverted { image, snapshot },
                _ => ImageEvent::SnapshotDeleted { image, snapshot },
            });
            after
        }
        .await;
        op.end(changed)
    }

    async fn do_clone(
        &self,
        source: &str,
        name: &str,
        linked: bool,
        format: Option<Format>,
        caller: Owner,
    ) -> Result<DiskInfo, StorageError> {
        check_name(source)?;
        check_name(name)?;
        if source == name {
            return Err(StorageError::AlreadyExists { name: name.to_owned() });
        }
        // A clone reads its source: the caller's own only (checked again once claimed).
        self.owner_of(source, caller)?;
        let op = self.claim(name, format!("clone from {source}"), &[source], caller, caller)?;
        let cloned = async {
            if self.inner.root.exists(name)? {
                return Err(StorageError::AlreadyExists { name: name.to_owned() });
            }
            self.record_for(source, caller)?;
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
                let tmp = self.inner.root.temp_for(name)?;
                let args =
                    image::create_args(Format::Qcow2, Some((source, src.format)), tmp.path(), src.virtual_size);
                self.run(name, args, None, &[(tmp.path(), Access::ReadWrite)]).await?;
                let record = Record {
                    format: Format::Qcow2,
                    backing: Some(source.to_owned()),
                    virtual_size: src.virtual_size,
                    snapshots: 0,
                    owner: caller,
                };
                self.publish_recorded(tmp, name, record)?;
                op.recorded();
                self.announce(name, |image| ImageEvent::Cloned { source: source.to_owned(), linked, image });
                return Ok(());
            }
            let record = Record {
                format: format.unwrap_or(src.format),
                backing: None,
                virtual_size: src.virtual_size,
                snapshots: 0,
                owner: caller,
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
            let free = self.inner.root.free_space().map_err(|e| io_error(name, e))?;
            if needed > free {
                return Err(StorageError::NoSpace {
                    message: format!(
                        "a full copy of {source:?} needs about {needed} bytes; {free} bytes free in the storage root"
                    ),
                });
            }
            let tmp = self.inner.root.temp_for(name)?;
            let args: Vec<OsString> = vec![
                "convert".into(),
                "-p".into(),
                "-O".into(),
                record.format.as_str().into(),
                self.spec(&chain, true),
                tmp.path().into(),
            ];
            let paths: Vec<PathBuf> = chain.iter().map(|(n, _)| self.path(n)).collect();
            let mut files: Vec<(&Path, Access)> = paths.iter().map(|p| (p.as_path(), Access::Read)).collect();
            files.push((tmp.path(), Access::ReadWrite));
            self.run(name, args, Some(&op), &files).await?;
            self.publish_recorded(tmp, name, record)?;
            op.recorded();
            self.announce(name, |image| ImageEvent::Cloned { source: source.to_owned(), linked, image });
            Ok(())
        }
        .await;
        op.end(cloned)?;
        self.inspect(name).await.map(|(info, _)| info)
    }

    async fn do_delete(&self, name: &str, caller: Owner) -> Result<(), StorageError> {
        check_name(name)?;
        let owner = self.owner_of(name, caller)?;
        let op = self.claim(name, "delete".into(), &[], owner, caller)?;
        let deleted = (|| {
            self.inner.root.existing(name)?;
            if caller != Owner::Toolstack {
                self.record_for(name, caller)?;
            }
            self.refuse_if_backing(name, "delete", caller)?;
            // The file first: a record without its file is dropped at the next start, while a
            // file without its record would be adopted again from its (guest-written) content.
            std::fs::remove_file(self.path(name)).map_err(|e| io_error(name, e))?;
            // Gone from the record in memory even if saving it fails: published either way.
            let saved = self.update(|index| index.remove(name)).map(drop);
            self.inner.events.publish(ImageEvent::Deleted { name: name.to_owned(), owner });
            saved
        })();
        op.end(deleted)
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
        log.finish(self.do_create(&name, size, format, backing.as_deref(), self.caller()).await)
    }

    async fn info(&self, name: String) -> Result<DiskInfo, StorageError> {
        check_name(&name)?;
        self.record_for(&name, self.caller())?;
        let r = self.inspect(&name).await.map(|(info, _)| info);
        tracing::debug!(%name, ok = r.is_ok(), "info");
        r
    }

    async fn list(&self) -> Result<Vec<DiskInfo>, StorageError> {
        let list = self.listing(self.caller(), None);
        tracing::debug!(images = list.len(), "list");
        Ok(list)
    }

    async fn resize(&self, name: String, size: Size, force: bool) -> Result<DiskInfo, StorageError> {
        let log = OpLog::new("resize", &name);
        log.finish(self.do_resize(&name, size, force, self.caller()).await)
    }

    async fn snapshot_create(&self, name: String, snapshot: String) -> Result<SnapshotInfo, StorageError> {
        let log = OpLog::new("snapshot-create", &name);
        log.finish(self.do_snapshot_create(&name, &snapshot, self.caller()).await)
    }

    async fn snapshot_list(&self, name: String) -> Result<Vec<SnapshotInfo>, StorageError> {
        let r = self.do_snapshot_list(&name, self.caller()).await;
        tracing::debug!(%name, ok = r.is_ok(), "snapshot list");
        r
    }

    async fn snapshot_revert(&self, name: String, snapshot: String) -> Result<(), StorageError> {
        let log = OpLog::new("snapshot-revert", &name);
        log.finish(self.do_snapshot_change(&name, &snapshot, "-a", self.caller()).await)
    }

    async fn snapshot_delete(&self, name: String, snapshot: String) -> Result<(), StorageError> {
        let log = OpLog::new("snapshot-delete", &name);
        log.finish(self.do_snapshot_change(&name, &snapshot, "-d", self.caller()).await)
    }

    async fn clone_disk(
        &self,
        source: String,
        name: String,
        linked: bool,
        format: Option<Format>,
    ) -> Result<DiskInfo, StorageError> {
        let log = OpLog::new(if linked { "clone-linked" } else { "clone-full" }, &name);
        log.finish(self.do_clone(&source, &name, linked, format, self.caller()).await)
    }

    async fn delete(&self, name: String) -> Result<(), StorageError> {
        let log = OpLog::new("delete", &name);
        log.finish(self.do_delete(&name, self.caller()).await)
    }

    async fn progress(&self, name: String) -> Option<Progress> {
        self.inner.ops.progress(&name, self.caller())
    }

    async fn events(&self, name: Option<String>) -> Events<ImageEvent, Vec<DiskInfo>> {
        if let Some(Err(e)) = name.as_deref().map(check_name) {
            return Events::refused(io::ErrorKind::InvalidInput, e.to_string());
        }
        let caller = self.caller();
        let only = name.clone();
        let visible = move |owner: Owner, n: &str| {
            (caller == Owner::Toolstack || owner == caller) && name.as_deref().is_none_or(|name| name == n)
        };
        let storage = self.clone();
        self.inner
            .events
            .events_where(move |e| visible(e.owner(), e.name()))
            .with_snapshot(move || storage.listing(caller, only.as_deref()))
    }

    async fn progress_events(&self, name: Option<String>) -> Events<ProgressUpdate, Vec<ProgressUpdate>> {
        if let Some(Err(e)) = name.as_deref().map(check_name) {
            return Events::refused(io::ErrorKind::InvalidInput, e.to_string());
        }
        self.inner.ops.updates(self.caller(), name)
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
        let tmp = s.inner.root.temp_for("x").unwrap();
        let convert = vec!["convert".into(), "-O".into(), "raw".into(), forged.clone(), tmp.path().into()];
        denied(
            s.run("x", convert, None, &[(a.as_path(), Access::Read), (tmp.path(), Access::ReadWrite)]).await,
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
}
