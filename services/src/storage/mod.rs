//! The storage service: disk images (qcow2 or raw) in one directory of the storage domain,
//! managed with the real `qemu-img`.
//!
//! Callers name images; they never give paths. A name is 1 to 64 characters of
//! `A-Z a-z 0-9 . _ -`, not starting with `.`; the image is `<root>/<name>`, and anything at that
//! path that is not a regular file (a symlink, a directory) is refused. Long operations (a full
//! [`Storage::clone_disk`]) write to a temporary name and rename on success, so a call cancelled
//! by its deadline leaves no partial image; their progress is readable with
//! [`Storage::progress`] while they run, and comes as a stream ([`Storage::progress_events`]).
//!
//! Every change the service makes to its images (and every image it adopts) is published, once
//! it succeeded, as an [`ImageEvent`] of the stream [`Storage::events`]; a failed call publishes
//! none.
//!
//! Guests write the content of the images they use, so [`QemuImg`] decides an image's format
//! and backing image once — when it creates, clones or adopts it — and keeps them in a record
//! (in memory and in the root); it never reads them from the image again, and runs each
//! `qemu-img` in a Landlock sandbox that lets it open only the files of its call. See
//! `docs/services.md` ("Where the trust boundary is").
//!
//! Every image has an [`Owner`]: the domain whose call made it, or the toolstack (the domains
//! [`StorageConfig::toolstack_domains`] names, and callers over Unix or TCP). A domain sees and
//! acts on its own images only — another's image is `NotFound`, exactly as a missing one — and
//! is held to a quota of images and bytes ([`StorageError::OwnerQuotaExceeded`]); the toolstack
//! sees and acts on every image, unbounded by quotas.

use serde::{Deserialize, Serialize};

mod daemon;
mod image;
mod index;
mod ops;
mod process;
mod qemu;
mod root;

pub use daemon::{DaemonArgs, run_daemon};
/// Sizes: `10G`, `512M` or bytes on the command line, a `u64` on the wire (see
/// [`dombus::rpc::size`]).
pub use dombus::Size;
pub use qemu::{DEFAULT_MAX_IMAGES, DEFAULT_QUOTA_BYTES, DEFAULT_QUOTA_IMAGES, QemuImg, StorageConfig};

/// An image format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// QEMU copy-on-write v2: sparse, snapshots, backing files.
    #[default]
    Qcow2,
    /// A plain byte-for-byte image: no snapshots, no backing file.
    Raw,
}

impl Format {
    /// The name `qemu-img` uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }
}

/// Who owns an image: the domain whose call made it, or the toolstack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Owner {
    /// The toolstack: its calls made the image, or the operator placed it in the root.
    #[default]
    Toolstack,
    /// The domain of that id.
    Domain(u32),
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Owner::Toolstack => f.write_str("toolstack"),
            Owner::Domain(d) => write!(f, "domain {d}"),
        }
    }
}

/// Which per-owner quota a call would exceed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quota {
    /// The number of images an owner has (`StorageConfig::quota_images`).
    Images,
    /// The sum of the virtual sizes of its images, bytes (`StorageConfig::quota_bytes`).
    Bytes,
}

impl std::fmt::Display for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quota::Images => "images",
            Quota::Bytes => "bytes of virtual size",
        })
    }
}

/// What `info` and `list` say about an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Its name.
    pub name: String,
    /// Its format.
    pub format: Format,
    /// The size the guest sees, bytes (shown as a size: `10G`).
    #[serde(with = "dombus::rpc::size")]
    pub virtual_size: u64,
    /// Bytes it takes on disk (shown as a size).
    #[serde(with = "dombus::rpc::size")]
    pub actual_size: u64,
    /// The image it is a linked clone of (by name), if any.
    pub backing: Option<String>,
    /// Its internal snapshots.
    pub snapshots: usize,
    /// Who owns it (absent from an older service's answer in JSON: the toolstack).
    #[serde(default)]
    pub owner: Owner,
}

/// An internal snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Its name.
    pub name: String,
    /// `qemu-img`'s id for it.
    pub id: String,
    /// When it was taken, seconds since the Unix epoch.
    pub date: u64,
    /// Saved VM state, bytes (0 for a disk-only snapshot; shown as a size).
    #[serde(with = "dombus::rpc::size")]
    pub vm_state_size: u64,
}

/// A long operation in progress on an image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// What runs ("clone from base").
    pub operation: String,
    /// How far, 0 to 100.
    pub percent: f32,
}

/// A change the service made to its images, published once it succeeded ([`Storage::events`]).
///
/// Every variant but [`ImageEvent::Deleted`] carries the image as it is after the change (as
/// `list` shows it), so that a subscriber keeping the list from a resync's snapshot replaces its
/// entry of that name, or removes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageEvent {
    /// `create` made it.
    Created(DiskInfo),
    /// `clone_disk` made it from `source`: a linked clone (`backing` names the source) or a
    /// full copy.
    Cloned {
        /// The image cloned.
        source: String,
        /// Whether it is a linked clone.
        linked: bool,
        /// The new image.
        image: DiskInfo,
    },
    /// `resize` changed its virtual size (a resize to the size it has changes nothing and
    /// publishes nothing).
    Resized(DiskInfo),
    /// `snapshot_create` took the snapshot `snapshot` of it.
    SnapshotCreated {
        /// The image, with its new snapshot count.
        image: DiskInfo,
        /// The snapshot's name (`snapshot_list` says the rest).
        snapshot: String,
    },
    /// `snapshot_revert` returned it to its snapshot `snapshot` (its size may have changed).
    SnapshotReverted {
        /// The image after the revert.
        image: DiskInfo,
        /// The snapshot's name.
        snapshot: String,
    },
    /// `snapshot_delete` deleted its snapshot `snapshot`.
    SnapshotDeleted {
        /// The image, with its new snapshot count.
        image: DiskInfo,
        /// The snapshot's name.
        snapshot: String,
    },
    /// `delete` deleted it.
    Deleted {
        /// Its name.
        name: String,
        /// Whose it was.
        owner: Owner,
    },
    /// The service recorded an image it did not make (the operator placed it in the root), as
    /// its content says: at start, or when a call first named it. The toolstack's.
    Adopted(DiskInfo),
}

impl ImageEvent {
    /// The image's name.
    pub fn name(&self) -> &str {
        match self {
            ImageEvent::Deleted { name, .. } => name,
            _ => self.image().map_or("", |i| i.name.as_str()),
        }
    }

    /// Who owns the image (owned, for [`ImageEvent::Deleted`]): who may see the event.
    pub fn owner(&self) -> Owner {
        match self {
            ImageEvent::Deleted { owner, .. } => *owner,
            _ => self.image().map_or(Owner::Toolstack, |i| i.owner),
        }
    }

    /// The image after the change; `None` for [`ImageEvent::Deleted`].
    pub fn image(&self) -> Option<&DiskInfo> {
        match self {
            ImageEvent::Created(i) | ImageEvent::Resized(i) | ImageEvent::Adopted(i) => Some(i),
            ImageEvent::Cloned { image, .. }
            | ImageEvent::SnapshotCreated { image, .. }
            | ImageEvent::SnapshotReverted { image, .. }
            | ImageEvent::SnapshotDeleted { image, .. } => Some(image),
            ImageEvent::Deleted { .. } => None,
        }
    }
}

/// How a long operation ended ([`ProgressUpdate::outcome`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It succeeded.
    Done,
    /// It failed. `error` is the error its caller got, when the caller is the image's owner;
    /// `None` when the toolstack acted on a domain's image (the error may name images the
    /// domain does not own).
    Failed {
        /// The caller's error.
        error: Option<StorageError>,
    },
    /// It was dropped unfinished: its call's deadline passed or its client went away (a
    /// running `qemu-img` was killed and its temporary file removed).
    Cancelled,
}

/// How far an operation on an image is ([`Storage::progress_events`]): one update when it
/// starts (`percent` 0), one as its `qemu-img` reports each further percent (full clones), and a
/// final one with its [`Outcome`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProgressUpdate {
    /// The image it creates or changes.
    pub name: String,
    /// Who owns that image (who may see the update).
    pub owner: Owner,
    /// What runs ("clone from base", "resize to 2G", "delete").
    pub operation: String,
    /// How far, 0 to 100.
    pub percent: f32,
    /// How it ended: `None` while it runs, and in the last update `Some`.
    pub outcome: Option<Outcome>,
}

/// Why a storage call failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StorageError {
    /// No image of that name.
    #[error("no image {name:?}")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// An image of that name exists already.
    #[error("image {name:?} already exists")]
    AlreadyExists {
        /// The name.
        name: String,
    },
    /// The storage domain's disk is full.
    #[error("no space left: {message}")]
    NoSpace {
        /// What the tool or the check said.
        message: String,
    },
    /// A size that cannot be (zero, not a multiple of 512, too large, a shrink without `force`).
    #[error("invalid size: {reason}")]
    InvalidSize {
        /// Why.
        reason: String,
    },
    /// A name that is not a plain image name, or a path outside the storage root.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why it was refused.
        reason: String,
    },
    /// No snapshot of that name on that image.
    #[error("image {disk:?} has no snapshot {snapshot:?}")]
    SnapshotNotFound {
        /// The image.
        disk: String,
        /// The snapshot asked for.
        snapshot: String,
    },
    /// The operation does not apply (snapshots of a raw image, a backing file for raw).
    #[error("unsupported: {reason}")]
    Unsupported {
        /// Why.
        reason: String,
    },
    /// Another operation is running on that image.
    #[error("image {name:?} is busy: {operation}")]
    Busy {
        /// The image.
        name: String,
        /// What runs on it.
        operation: String,
    },
    /// The root holds as many images as it may (`StorageConfig::max_images`).
    #[error("too many images: the storage root holds at most {limit}")]
    TooManyImages {
        /// The bound.
        limit: u64,
    },
    /// The virtual sizes of the images would add up to more than the root may hold
    /// (`StorageConfig::max_virtual_bytes`).
    #[error("quota exceeded: {requested} more bytes of virtual size; {used} of {limit} in use")]
    QuotaExceeded {
        /// Bytes of virtual size the call would add.
        requested: u64,
        /// Bytes of virtual size in use (recorded images and operations running).
        used: u64,
        /// The bound.
        limit: u64,
    },
    /// The tool failed; its message.
    #[error("{tool} failed ({status}): {message}")]
    ToolFailed {
        /// Which tool (`qemu-img`).
        tool: String,
        /// Its exit status, or how it ended.
        status: String,
        /// What it printed on stderr.
        message: String,
    },
    /// The images of the domain that owns (or would own) the image would exceed its quota
    /// (`StorageConfig::quota_images`, `quota_bytes`). Last of the variants, so the others keep
    /// their position on the wire.
    #[error("quota of the owning domain exceeded: {used} of {limit} {what} in use")]
    OwnerQuotaExceeded {
        /// Which quota.
        what: Quota,
        /// What the domain's images hold (recorded, and reserved by its running calls).
        used: u64,
        /// The quota.
        limit: u64,
    },
}

/// Disk images in the storage domain.
#[dombus::service(name = "storage", version = 1)]
pub trait Storage {
    /// Creates an empty image `name` of `size` bytes (qcow2 unless `format` says otherwise),
    /// optionally a linked clone of the image `backing` (qcow2 only), owned by the caller.
    async fn create(
        &self,
        name: String,
        size: Size,
        format: Option<Format>,
        backing: Option<String>,
    ) -> Result<DiskInfo, StorageError>;

    /// What `name` is: format, sizes, backing image, snapshots, owner.
    #[idempotent]
    async fn info(&self, name: String) -> Result<DiskInfo, StorageError>;

    /// Every image the caller owns (every image, for the toolstack), by name.
    #[idempotent]
    async fn list(&self) -> Result<Vec<DiskInfo>, StorageError>;

    /// Sets the virtual size of `name` to `size`; shrinking (which loses data at the end) is
    /// refused unless `force`.
    #[idempotent]
    async fn resize(&self, name: String, size: Size, force: bool) -> Result<DiskInfo, StorageError>;

    /// Takes the internal snapshot `snapshot` of `name` (qcow2).
    async fn snapshot_create(&self, name: String, snapshot: String) -> Result<SnapshotInfo, StorageError>;

    /// The snapshots of `name`, oldest first.
    #[idempotent]
    async fn snapshot_list(&self, name: String) -> Result<Vec<SnapshotInfo>, StorageError>;

    /// Returns `name` to the state of its snapshot `snapshot`.
    #[idempotent]
    async fn snapshot_revert(&self, name: String, snapshot: String) -> Result<(), StorageError>;

    /// Deletes the snapshot `snapshot` of `name`.
    async fn snapshot_delete(&self, name: String, snapshot: String) -> Result<(), StorageError>;

    /// Clones `source` as `name`: `linked`, a qcow2 image with `source` as its backing file
    /// (instant; `source` must then stay); otherwise a full copy in `format` (default: the
    /// source's), written under a temporary name and renamed when complete, with progress.
    async fn clone_disk(
        &self,
        source: String,
        name: String,
        linked: bool,
        format: Option<Format>,
    ) -> Result<DiskInfo, StorageError>;

    /// Deletes the image `name` (refused while linked clones use it as their backing image).
    async fn delete(&self, name: String) -> Result<(), StorageError>;

    /// How far the long operation creating or changing `name` is, if one runs (one look; the
    /// stream [`Storage::progress_events`] follows it).
    #[idempotent]
    async fn progress(&self, name: String) -> Option<Progress>;

    /// The changes to the caller's images (every image's, for the toolstack), or to the image
    /// `name` only, as they succeed; a resync's snapshot is the list of those images now.
    async fn events(&self, name: Option<String>) -> dombus::Events<ImageEvent, Vec<DiskInfo>>;

    /// How the operations on the caller's images (every image's, for the toolstack), or on the
    /// image `name` only, go: a start, progress, the end with its outcome. A resync's snapshot
    /// is the operations running now.
    async fn progress_events(
        &self,
        name: Option<String>,
    ) -> dombus::Events<ProgressUpdate, Vec<ProgressUpdate>>;
}
