//! [`Qemud`]: the device-model service on real qemus, one per guest.
//!
//! Each instance is a qemu ([`process`](super::process)), its QMP connection ([`Qmp`]) and
//! what the daemon knows of it: its run state (kept from qemu's events), its devices with the
//! block nodes and descriptor sets behind each, and the removals waiting for the guest. Calls
//! that change an instance's devices run one at a time per instance; qemu's events are handled
//! as they are read, without waiting for anything but a lock.

use std::collections::BTreeMap;
use std::os::fd::{AsFd as _, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use dombus::{Events, Topic, TopicLimits};
use serde_json::{Value, json};

use super::argv::{self, ROOT_PORTS, USB_BUS, USB_PORTS};
use super::process::{Qemu, Spawner};
use super::qmp::wire::tame;
use super::qmp::{Qmp, QmpError, QmpEvent, QmpNotice};
use super::{
    CDROM_ID, DeviceInfo, DeviceKind, DeviceModel, DeviceModelConfig, DeviceModelError, DeviceModelEvent,
    DeviceModelEventKind as Kind, DiskBus, DiskSpec, ExitReason, InstanceInfo, MAX_BACKING_DEPTH,
    MAX_INSTANCES, Machine, NicModel, NicSpec, RunState, SavedState, Unplug, UsbKind, UsbSpec,
};
use crate::network::{NetworkClient, VifId, VifKind};
use crate::storage::{Owner, StorageClient};

/// How long a removal that needs the guest waits for it, by default.
pub const DEFAULT_UNPLUG_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a removal is waited for within its call before it is reported pending.
const UNPLUG_WAIT: Duration = Duration::from_millis(500);
/// How long qemu has to greet and answer each command.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a saved state may take to load.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(60);
/// `stop`'s default deadline for `quit`, and its most.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// How the daemon runs its qemus.
#[derive(Debug, Clone)]
pub struct QemudConfig {
    /// The qemu program (`qemu-system-x86_64`, a path or a name in `PATH`).
    pub qemu: PathBuf,
    /// The accelerator (`tcg` without Xen or KVM).
    pub accel: String,
    /// Where each qemu's working directory (`dom<guest>`) is made.
    pub dir: PathBuf,
    /// The storage service's image directory, as this domain sees it.
    pub images: PathBuf,
    /// The storage service: what it says of an image (format, owner, backing) decides how it
    /// is opened; `None`: no disk can be used.
    pub storage: Option<dombus::Address>,
    /// The network service, for NICs; `None`: no NIC can be used.
    pub network: Option<dombus::Address>,
    /// The domains that are the toolstack: the only callers.
    pub toolstack_domains: Vec<u32>,
    /// Whether each qemu runs in its Landlock sandbox (refusing to start without Landlock).
    pub sandbox: bool,
    /// How long a removal that needs the guest waits for it.
    pub unplug_timeout: Duration,
}

impl QemudConfig {
    /// A configuration running `qemu-system-x86_64` with `tcg`, sandboxed, in `dir`, the images
    /// in `images`; without storage or network service, the toolstack domain 0.
    pub fn new(dir: PathBuf, images: PathBuf) -> QemudConfig {
        QemudConfig {
            qemu: "qemu-system-x86_64".into(),
            accel: "tcg".into(),
            dir,
            images,
            storage: None,
            network: None,
            toolstack_domains: vec![0],
            sandbox: true,
            unplug_timeout: DEFAULT_UNPLUG_TIMEOUT,
        }
    }
}

/// The device-model service: one qemu per guest.
#[derive(Clone)]
pub struct Qemud {
    inner: Arc<Inner>,
}

struct Inner {
    config: QemudConfig,
    spawner: Spawner,
    net: dombus::Net,
    instances: Mutex<BTreeMap<u32, Arc<Instance>>>,
    /// The guests whose device model a `start` is bringing up.
    starting: Mutex<std::collections::BTreeSet<u32>>,
    topic: Topic<DeviceModelEvent, Vec<InstanceInfo>>,
}

/// One guest's device model.
struct Instance {
    guest: u32,
    machine: Machine,
    workdir: PathBuf,
    qemu: Qemu,
    qmp: OnceLock<Qmp>,
    version: OnceLock<String>,
    /// What changes the devices, one call at a time.
    ops: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    quit_asked: AtomicBool,
    /// Numbers block nodes and descriptor names uniquely within the instance.
    serial: AtomicU64,
}

/// What changes with qemu's events and the calls.
struct State {
    run: RunState,
    config: DeviceModelConfig,
    devices: Vec<Device>,
    cdrom: Option<Medium>,
}

/// Where a device is plugged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// A PCI Express root port.
    Pci(usize),
    /// A port of the USB controller.
    Usb(usize),
}

/// A device and what it holds in qemu.
struct Device {
    info: DeviceInfo,
    slot: Slot,
    backend: Backend,
    /// A removal's waiter: told when the device is gone.
    waiter: Option<tokio::sync::oneshot::Sender<Backend>>,
}

/// The block nodes or netdev behind a device, and the descriptor sets they use.
#[derive(Default, Debug)]
struct Backend {
    /// Block nodes, top first.
    nodes: Vec<String>,
    fdsets: Vec<i64>,
    netdev: Option<String>,
}

/// The CD-ROM's medium.
struct Medium {
    image: String,
    backend: Backend,
}

/// An image's file, one layer of its chain.
struct Layer {
    file: OwnedFd,
    format: &'static str,
    read_only: bool,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn qmp_err(command: &str, e: QmpError) -> DeviceModelError {
    match e {
        QmpError::CommandNotFound { command, version } => {
            DeviceModelError::CommandNotFound { command, version: version.to_string() }
        }
        QmpError::Timeout { command } => DeviceModelError::Timeout(format!("qemu did not answer {command}")),
        e => DeviceModelError::Qemu { command: command.to_owned(), message: e.to_string() },
    }
}

impl Qemud {
    /// The service running qemus as `config` says. Fails if qemu is not found, or the sandbox
    /// is asked for and the kernel has no Landlock.
    pub fn new(config: QemudConfig, net: dombus::Net) -> anyhow::Result<Qemud> {
        use anyhow::Context as _;
        std::fs::create_dir_all(&config.dir).with_context(|| format!("creating {}", config.dir.display()))?;
        let spawner = Spawner::new(&config.qemu, config.sandbox, tokio::runtime::Handle::current())
            .with_context(|| {
                format!(
                    "preparing to run {} (in a Landlock sandbox: {}; start with --no-sandbox to accept running it unconfined)",
                    config.qemu.display(),
                    config.sandbox
                )
            })?;
        tracing::info!(qemu = %spawner.program().display(), sandbox = config.sandbox, "device models ready");
        Ok(Qemud {
            inner: Arc::new(Inner {
                config,
                spawner,
                net,
                instances: Mutex::new(BTreeMap::new()),
                starting: Mutex::new(std::collections::BTreeSet::new()),
                topic: Topic::new(TopicLimits::default()),
            }),
        })
    }

    /// Stops every qemu: `quit`, then a kill at `timeout`.
    pub async fn shut_down(&self, timeout: Duration) {
        let guests: Vec<u32> = self.instances().keys().copied().collect();
        for guest in guests {
            if let Ok(reason) = self.stop_guest(guest, timeout).await {
                tracing::info!(guest, %reason, "device model stopped");
            }
        }
    }

    /// `stop`: quit, a kill at `timeout`; forgets the instance.
    async fn stop_guest(&self, guest: u32, timeout: Duration) -> Result<ExitReason, DeviceModelError> {
        let i = self.instance(guest)?;
        if i.qemu.exited().is_none() {
            i.quit_asked.store(true, Ordering::Relaxed);
            if let Some(qmp) = i.qmp.get() {
                // qemu answers `quit` and exits; a qemu gone deaf is killed at the deadline.
                let _ = tokio::time::timeout(timeout, qmp.execute(qapi::qmp::quit {})).await;
            }
            if tokio::time::timeout(timeout, i.qemu.wait()).await.is_err() {
                tracing::warn!(guest, "qemu did not quit within {timeout:?}: killing it");
                i.qemu.kill_at_deadline().await;
            }
        }
        let exit = i.qemu.wait().await;
        let reason = exit.reason(i.quit_asked.load(Ordering::Relaxed));
        self.instances().remove(&guest);
        Ok(reason)
    }

    fn require_toolstack(&self, operation: &str) -> Result<(), DeviceModelError> {
        match dombus::rpc::current_caller().and_then(|c| c.domain) {
            Some(d) if !self.inner.config.toolstack_domains.contains(&d) => {
                Err(DeviceModelError::PermissionDenied {
                    operation: operation.to_owned(),
                    reason: format!(
                        "domain {d} is not the toolstack (domains {:?}): only the toolstack manages device models",
                        self.inner.config.toolstack_domains
                    ),
                })
            }
            _ => Ok(()),
        }
    }

    fn instances(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, Arc<Instance>>> {
        self.inner.instances.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn instance(&self, guest: u32) -> Result<Arc<Instance>, DeviceModelError> {
        self.instances().get(&guest).cloned().ok_or(DeviceModelError::NotFound { guest })
    }

    /// The instance, running (not exited), with its QMP connection.
    fn live(&self, guest: u32) -> Result<(Arc<Instance>, Qmp), DeviceModelError> {
        let i = self.instance(guest)?;
        if let RunState::Exited(reason) = &i.lock().run {
            return Err(DeviceModelError::Exited { guest, reason: reason.clone() });
        }
        let qmp = i.qmp.get().cloned().ok_or(DeviceModelError::StartFailed("still starting".into()))?;
        Ok((i, qmp))
    }

    fn publish(&self, guest: u32, kind: Kind) {
        publish(&self.inner.topic, guest, kind);
    }

    fn snapshot(&self) -> Vec<InstanceInfo> {
        let all: Vec<_> = self.instances().values().cloned().collect();
        all.iter().map(|i| i.info()).collect()
    }

    // ---- images and vifs ----

    /// The layers of the image `name` (top first), opened for the guest `guest`.
    async fn open_image(
        &self,
        guest: u32,
        name: &str,
        read_only: bool,
    ) -> Result<Vec<Layer>, DeviceModelError> {
        let image_err = |reason: String| DeviceModelError::Image { image: name.to_owned(), reason };
        let Some(addr) = self.inner.config.storage.clone() else {
            return Err(image_err("this device-model domain has no storage service configured".into()));
        };
        let storage = StorageClient::new(self.inner.net.clone(), addr);
        let mut layers = Vec::new();
        let mut next = Some(name.to_owned());
        while let Some(n) = next.take() {
            if layers.len() == MAX_BACKING_DEPTH {
                return Err(image_err(format!("its backing chain is longer than {MAX_BACKING_DEPTH}")));
            }
            let info = storage
                .info(dombus::context::current(), n.clone())
                .await
                .map_err(|e| image_err(format!("the storage service: {e}")))?
                .map_err(|e| image_err(format!("the storage service: {e}")))?;
            if !matches!(info.owner, Owner::Toolstack) && info.owner != Owner::Domain(guest) {
                return Err(image_err(format!("{n} belongs to {}, not to guest {guest}", info.owner)));
            }
            // Only the top layer is written; a backing image is read.
            let ro = read_only || !layers.is_empty();
            let path = self.inner.config.images.join(&n);
            let file = open_regular(&path, ro).map_err(|e| image_err(format!("{}: {e}", path.display())))?;
            layers.push(Layer { file, format: info.format.as_str(), read_only: ro });
            next = info.backing;
        }
        Ok(layers)
    }

    /// Adds the block nodes of `layers` (bottom first, each backed by the one below); the top
    /// node's name, and the backend to undo.
    async fn add_nodes(
        &self,
        i: &Instance,
        qmp: &Qmp,
        layers: Vec<Layer>,
    ) -> Result<Backend, DeviceModelError> {
        let mut backend = Backend::default();
        let mut below: Option<String> = None;
        for layer in layers.into_iter().rev() {
            let r = async {
                let added = qmp
                    .execute_with_fd(qapi::qmp::add_fd { fdset_id: None, opaque: None }, layer.file.as_fd())
                    .await
                    .map_err(|e| qmp_err("add-fd", e))?;
                backend.fdsets.push(added.fdset_id);
                let node = format!("dm-n{}", i.serial.fetch_add(1, Ordering::Relaxed));
                let options = json!({
                    "driver": layer.format,
                    "node-name": node,
                    "read-only": layer.read_only,
                    "file": {"driver": "file", "filename": format!("/dev/fdset/{}", added.fdset_id), "read-only": layer.read_only},
                    "backing": below.as_ref().map_or(Value::Null, |b| Value::String(b.clone())),
                });
                let options = serde_json::from_value(options)
                    .map_err(|e| DeviceModelError::Qemu { command: "blockdev-add".into(), message: e.to_string() })?;
                qmp.execute(qapi::qmp::blockdev_add(options)).await.map_err(|e| qmp_err("blockdev-add", e))?;
                backend.nodes.insert(0, node.clone());
                below = Some(node);
                Ok::<(), DeviceModelError>(())
            }
            .await;
            if let Err(e) = r {
                release(qmp, std::mem::take(&mut backend)).await;
                return Err(e);
            }
        }
        Ok(backend)
    }

    /// Opens the tap of the vif `vif` (the network service's, this guest's); its MAC.
    async fn open_vif(&self, guest: u32, vif: &str) -> Result<(OwnedFd, Option<String>), DeviceModelError> {
        let vif_err = |reason: String| DeviceModelError::Vif { vif: vif.to_owned(), reason };
        let id = vif.parse::<VifId>().map_err(|e| vif_err(e.to_string()))?;
        if id.domid != guest {
            return Err(vif_err(format!("it is guest {}'s, not guest {guest}'s", id.domid)));
        }
        let Some(addr) = self.inner.config.network.clone() else {
            return Err(vif_err("this device-model domain has no network service configured".into()));
        };
        let network = NetworkClient::new(self.inner.net.clone(), addr);
        let info = network
            .vif_info(dombus::context::current(), id)
            .await
            .map_err(|e| vif_err(format!("the network service: {e}")))?
            .map_err(|e| vif_err(format!("the network service: {e}")))?;
        if info.kind != VifKind::Tap {
            return Err(vif_err("it is not a tap (a device model's NIC needs a tap vif)".into()));
        }
        let fd = open_tap(&info.name).map_err(|e| vif_err(format!("opening the tap {}: {e}", info.name)))?;
        Ok((fd, info.mac.map(|m| m.to_string())))
    }

    // ---- devices ----

    async fn add_disk(
        &self,
        i: &Instance,
        qmp: &Qmp,
        disk: &DiskSpec,
    ) -> Result<DeviceInfo, DeviceModelError> {
        let slot = i.take_slot(disk.slot, disk.bus == DiskBus::Usb)?;
        let layers = self.open_image(i.guest, &disk.image, disk.read_only).await?;
        let backend = self.add_nodes(i, qmp, layers).await?;
        let top = backend.nodes.first().cloned().unwrap_or_default();
        let mut props = vec![("drive".to_owned(), json!(top))];
        if disk.read_only {
            props.push(("read-only".to_owned(), json!(true)));
        }
        let driver = match slot {
            Slot::Pci(_) => "virtio-blk-pci",
            Slot::Usb(_) => "usb-storage",
        };
        if let Err(e) = plug(qmp, driver, &disk.id, slot, props).await {
            release(qmp, backend).await;
            return Err(e);
        }
        let disk = DiskSpec { slot: Some(slot.number()), ..disk.clone() };
        let info =
            DeviceInfo { id: disk.id.clone(), kind: DeviceKind::Disk(disk.clone()), unplug_deadline: None };
        let mut s = i.lock();
        s.devices.push(Device { info: info.clone(), slot, backend, waiter: None });
        s.config.disks.push(disk);
        Ok(info)
    }

    async fn add_nic(&self, i: &Instance, qmp: &Qmp, nic: &NicSpec) -> Result<DeviceInfo, DeviceModelError> {
        let slot = i.take_slot(nic.slot, false)?;
        let (tap, mac) = self.open_vif(i.guest, &nic.vif).await?;
        let n = i.serial.fetch_add(1, Ordering::Relaxed);
        let fdname = format!("dm-tap{n}");
        let netdev = format!("dm-net{n}");
        qmp.execute_with_fd(qapi::qmp::getfd { fdname: fdname.clone() }, tap.as_fd())
            .await
            .map_err(|e| qmp_err("getfd", e))?;
        let options = serde_json::from_value(json!({"type": "tap", "id": netdev, "fd": fdname}))
            .map_err(|e| DeviceModelError::Qemu { command: "netdev_add".into(), message: e.to_string() })?;
        qmp.execute(qapi::qmp::netdev_add(options)).await.map_err(|e| qmp_err("netdev_add", e))?;
        let driver = match nic.model {
            NicModel::E1000 => "e1000",
            NicModel::Virtio => "virtio-net-pci",
        };
        let mut props = vec![("netdev".to_owned(), json!(netdev)), ("romfile".to_owned(), json!(""))];
        if let Some(mac) = mac {
            props.push(("mac".to_owned(), json!(mac)));
        }
        let backend = Backend { netdev: Some(netdev), ..Backend::default() };
        if let Err(e) = plug(qmp, driver, &nic.id, slot, props).await {
            release(qmp, backend).await;
            return Err(e);
        }
        let nic = NicSpec { slot: Some(slot.number()), ..nic.clone() };
        let info =
            DeviceInfo { id: nic.id.clone(), kind: DeviceKind::Nic(nic.clone()), unplug_deadline: None };
        let mut s = i.lock();
        s.devices.push(Device { info: info.clone(), slot, backend, waiter: None });
        s.config.nics.push(nic);
        Ok(info)
    }

    async fn add_usb(&self, i: &Instance, qmp: &Qmp, usb: &UsbSpec) -> Result<DeviceInfo, DeviceModelError> {
        let slot = i.take_slot(usb.slot, true)?;
        plug(qmp, usb.kind.driver(), &usb.id, slot, Vec::new()).await?;
        let usb = UsbSpec { slot: Some(slot.number()), ..usb.clone() };
        let info =
            DeviceInfo { id: usb.id.clone(), kind: DeviceKind::Usb(usb.clone()), unplug_deadline: None };
        let mut s = i.lock();
        s.devices.push(Device { info: info.clone(), slot, backend: Backend::default(), waiter: None });
        s.config.usb.push(usb);
        Ok(info)
    }

    #[allow(deprecated)] // the commands' `device` field, which the drive's `id` replaces
    async fn change_medium(&self, i: &Instance, qmp: &Qmp, image: &str) -> Result<(), DeviceModelError> {
        if i.machine != Machine::Q35 {
            return Err(DeviceModelError::Unsupported("machine none has no CD-ROM drive".into()));
        }
        let layers = self.open_image(i.guest, image, true).await?;
        let backend = self.add_nodes(i, qmp, layers).await?;
        let top = backend.nodes.first().cloned().unwrap_or_default();
        let old = self.remove_medium(i, qmp).await;
        let inserted = async {
            qmp.execute(qapi::qmp::blockdev_insert_medium { id: CDROM_ID.into(), node_name: top.clone() })
                .await
                .map_err(|e| qmp_err("blockdev-insert-medium", e))?;
            qmp.execute(qapi::qmp::blockdev_close_tray { id: Some(CDROM_ID.into()), device: None })
                .await
                .map_err(|e| qmp_err("blockdev-close-tray", e))
        }
        .await;
        if let Err(e) = old.and(inserted.map(|_| ())) {
            release(qmp, backend).await;
            return Err(e);
        }
        let mut s = i.lock();
        s.cdrom = Some(Medium { image: image.to_owned(), backend });
        s.config.cdrom = Some(image.to_owned());
        Ok(())
    }

    /// Opens the tray and takes out the medium (if any), letting its nodes go.
    #[allow(deprecated)] // the commands' `device` field, which the drive's `id` replaces
    async fn remove_medium(&self, i: &Instance, qmp: &Qmp) -> Result<(), DeviceModelError> {
        qmp.execute(qapi::qmp::blockdev_open_tray {
            id: Some(CDROM_ID.into()),
            device: None,
            force: Some(true),
        })
        .await
        .map_err(|e| qmp_err("blockdev-open-tray", e))?;
        qmp.execute(qapi::qmp::blockdev_remove_medium { id: CDROM_ID.into() })
            .await
            .map_err(|e| qmp_err("blockdev-remove-medium", e))?;
        let old = {
            let mut s = i.lock();
            s.config.cdrom = None;
            s.cdrom.take()
        };
        if let Some(m) = old {
            release(qmp, m.backend).await;
        }
        Ok(())
    }

    /// Asks qemu to remove the device `id`; done, or pending on the guest.
    async fn unplug(
        &self,
        i: &Arc<Instance>,
        qmp: &Qmp,
        id: &str,
        disk: bool,
    ) -> Result<Unplug, DeviceModelError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut s = i.lock();
            let d = s
                .devices
                .iter_mut()
                .find(|d| d.info.id == id && matches!(d.info.kind, DeviceKind::Disk(_)) == disk)
                .ok_or_else(|| DeviceModelError::DeviceNotFound { guest: i.guest, id: id.to_owned() })?;
            if d.info.unplug_deadline.is_some() {
                return Err(DeviceModelError::UnplugPending { id: id.to_owned() });
            }
            d.waiter = Some(tx);
        }
        if let Err(e) = qmp.execute(qapi::qmp::device_del { id: id.to_owned() }).await {
            if let Some(d) = i.lock().devices.iter_mut().find(|d| d.info.id == id) {
                d.waiter = None;
            }
            return Err(qmp_err("device_del", e));
        }
        match tokio::time::timeout(UNPLUG_WAIT, rx).await {
            Ok(Ok(backend)) => {
                release(qmp, backend).await;
                self.publish(i.guest, Kind::DeviceDeleted { id: id.to_owned() });
                return Ok(Unplug::Done);
            }
            Ok(Err(_)) => return Ok(Unplug::Done), // released by the event's handler
            Err(_) => {}
        }
        let deadline = now_secs() + self.inner.config.unplug_timeout.as_secs();
        {
            let mut s = i.lock();
            match s.devices.iter_mut().find(|d| d.info.id == id) {
                Some(d) => d.info.unplug_deadline = Some(deadline),
                None => return Ok(Unplug::Done),
            }
        }
        let (service, inst, id) = (self.clone(), i.clone(), id.to_owned());
        let timeout = self.inner.config.unplug_timeout;
        tokio::spawn(async move {
            tokio::time::sleep(timeout.saturating_sub(UNPLUG_WAIT)).await;
            let timed_out = {
                let mut s = inst.lock();
                match s.devices.iter_mut().find(|d| d.info.id == id) {
                    Some(d) if d.info.unplug_deadline == Some(deadline) => {
                        d.info.unplug_deadline = None;
                        d.waiter = None;
                        true
                    }
                    _ => false,
                }
            };
            if timed_out {
                tracing::warn!(guest = inst.guest, device = %id, "the guest did not let the device go in time");
                service.publish(inst.guest, Kind::UnplugTimedOut { id });
            }
        });
        Ok(Unplug::Pending { deadline })
    }

    // ---- lifecycle ----

    async fn start_instance(
        &self,
        config: DeviceModelConfig,
        start: &mut Starting<'_>,
    ) -> Result<Arc<Instance>, DeviceModelError> {
        let guest = config.guest;
        let workdir = self.inner.config.dir.join(format!("dom{guest}"));
        let file_err = |p: &Path, e: std::io::Error| DeviceModelError::File {
            path: p.display().to_string(),
            reason: e.to_string(),
        };
        // A fresh working directory: nothing of an earlier qemu's is left for this one.
        match std::fs::remove_dir_all(&workdir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(file_err(&workdir, e)),
        }
        std::fs::create_dir_all(&workdir).map_err(|e| file_err(&workdir, e))?;
        let restore = match &config.restore_from {
            Some(p) => Some(open_regular(Path::new(p), true).map_err(|e| file_err(Path::new(p), e))?),
            None => None,
        };
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(|e| file_err(&workdir, e))?;
        let args = argv::args(&config, &self.inner.config.accel, restore.is_some());
        let qemu = self.inner.spawner.spawn(&args, &workdir, theirs.into()).await.map_err(|e| {
            DeviceModelError::StartFailed(format!("{}: {e}", self.inner.spawner.program().display()))
        })?;
        let mut recorded = config.clone();
        recorded.restore_from = None;
        recorded.disks.clear();
        recorded.nics.clear();
        recorded.usb.clear();
        recorded.cdrom = None;
        let instance = Arc::new(Instance {
            guest,
            machine: config.machine,
            workdir: workdir.clone(),
            qemu,
            qmp: OnceLock::new(),
            version: OnceLock::new(),
            ops: tokio::sync::Mutex::new(()),
            state: Mutex::new(State {
                run: RunState::Starting,
                config: recorded,
                devices: Vec::new(),
                cdrom: None,
            }),
            quit_asked: AtomicBool::new(false),
            serial: AtomicU64::new(0),
        });
        self.instances().insert(guest, instance.clone());
        start.instance = Some(instance.clone());
        self.watch_exit(&instance);
        let started = self.bring_up(&instance, ours, &config, restore).await;
        start.finished = true;
        if let Err(e) = started {
            let exit = instance.qemu.kill("its start failed").await;
            let why =
                if exit.stderr.is_empty() { String::new() } else { format!(" (qemu said: {})", exit.stderr) };
            self.instances().remove(&guest);
            return Err(match e {
                DeviceModelError::Qemu { command, message } => {
                    DeviceModelError::Qemu { command, message: format!("{message}{why}") }
                }
                DeviceModelError::StartFailed(m) => DeviceModelError::StartFailed(format!("{m}{why}")),
                e => e,
            });
        }
        Ok(instance)
    }

    /// Connects QMP, adds the devices, loads the state, continues.
    async fn bring_up(
        &self,
        i: &Arc<Instance>,
        ours: std::os::unix::net::UnixStream,
        config: &DeviceModelConfig,
        restore: Option<OwnedFd>,
    ) -> Result<(), DeviceModelError> {
        ours.set_nonblocking(true).map_err(|e| DeviceModelError::StartFailed(e.to_string()))?;
        let stream = tokio::net::UnixStream::from_std(ours)
            .map_err(|e| DeviceModelError::StartFailed(e.to_string()))?;
        let handler = NoticeHandler { service: Arc::downgrade(&self.inner), instance: Arc::downgrade(i) };
        let qmp = tokio::select! {
            q = Qmp::from_stream(stream, QMP_TIMEOUT, move |n| handler.handle(n)) => q,
            exit = i.qemu.wait() => return Err(DeviceModelError::StartFailed(exit.reason(false).to_string())),
        }
        .map_err(|e| DeviceModelError::StartFailed(format!("QMP: {e}")))?;
        let _ = i.version.set(qmp.version().to_string());
        let _ = i.qmp.set(qmp.clone());
        let _ops = i.ops.lock().await;
        for disk in &config.disks {
            self.add_disk(i, &qmp, disk).await?;
        }
        for nic in &config.nics {
            self.add_nic(i, &qmp, nic).await?;
        }
        for usb in &config.usb {
            self.add_usb(i, &qmp, usb).await?;
        }
        if let Some(image) = &config.cdrom {
            self.change_medium(i, &qmp, image).await?;
        }
        if let Some(file) = restore {
            qmp.execute_with_fd(qapi::qmp::getfd { fdname: "dm-restore".into() }, file.as_fd())
                .await
                .map_err(|e| qmp_err("getfd", e))?;
            drop(file);
            qmp.execute_raw("migrate-incoming", json!({"uri": "fd:dm-restore"}))
                .await
                .map_err(|e| qmp_err("migrate-incoming", e))?;
            wait_incoming(&qmp)
                .await
                .map_err(|e| DeviceModelError::StartFailed(format!("loading the saved state: {e}")))?;
        }
        if config.paused {
            i.lock().run = RunState::Paused;
        } else {
            qmp.execute(qapi::qmp::cont {}).await.map_err(|e| qmp_err("cont", e))?;
            let mut s = i.lock();
            if s.run == RunState::Starting {
                s.run = RunState::Running;
            }
        }
        Ok(())
    }

    /// Notices the exit of `i`'s qemu at once: its state, the event.
    fn watch_exit(&self, i: &Arc<Instance>) {
        let (weak, inst) = (Arc::downgrade(&self.inner), i.clone());
        tokio::spawn(async move {
            let exit = inst.qemu.wait().await;
            let reason = exit.reason(inst.quit_asked.load(Ordering::Relaxed));
            tracing::info!(guest = inst.guest, %reason, "qemu ended");
            inst.lock().run = RunState::Exited(reason.clone());
            if let Some(inner) = weak.upgrade() {
                publish(&inner.topic, inst.guest, Kind::Exited(reason));
            }
        });
    }
}

/// A `start` in progress: the guest reserved (no second start of it, counted against
/// [`MAX_INSTANCES`]) until it ends; a start that ends unfinished — its call cancelled — takes
/// its qemu down with it.
struct Starting<'a> {
    service: &'a Qemud,
    guest: u32,
    instance: Option<Arc<Instance>>,
    finished: bool,
}

impl<'a> Starting<'a> {
    /// Reserves `guest`, refusing a guest whose model runs or starts, or one past the bound; an
    /// exited model of the guest is forgotten.
    fn reserve(service: &'a Qemud, guest: u32) -> Result<Starting<'a>, DeviceModelError> {
        let mut all = service.instances();
        let mut starting = service.inner.starting.lock().unwrap_or_else(|e| e.into_inner());
        let running = all.get(&guest).is_some_and(|old| !matches!(old.lock().run, RunState::Exited(_)));
        if running || starting.contains(&guest) {
            return Err(DeviceModelError::AlreadyRunning { guest });
        }
        all.remove(&guest);
        if all.len() + starting.len() >= MAX_INSTANCES {
            return Err(DeviceModelError::TooMany { what: "device models".into(), max: MAX_INSTANCES });
        }
        starting.insert(guest);
        Ok(Starting { service, guest, instance: None, finished: false })
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        self.service.inner.starting.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.guest);
        if !self.finished
            && let Some(i) = self.instance.take()
        {
            tracing::warn!(guest = self.guest, "a start was cancelled: its qemu is killed");
            i.qemu.start_kill("its start was cancelled");
            let mut all = self.service.instances();
            if all.get(&self.guest).is_some_and(|x| Arc::ptr_eq(x, &i)) {
                all.remove(&self.guest);
            }
        }
    }
}

/// Waits for an incoming migration (a restore) to end.
async fn wait_incoming(qmp: &Qmp) -> Result<(), DeviceModelError> {
    let deadline = tokio::time::Instant::now() + RESTORE_TIMEOUT;
    loop {
        let info = qmp.execute(qapi::qmp::query_migrate {}).await.map_err(|e| qmp_err("query-migrate", e))?;
        match info.status {
            Some(qapi::qmp::MigrationStatus::completed) => return Ok(()),
            Some(qapi::qmp::MigrationStatus::failed | qapi::qmp::MigrationStatus::cancelled) => {
                return Err(DeviceModelError::Qemu {
                    command: "migrate-incoming".into(),
                    message: info.error_desc.unwrap_or_else(|| "loading the saved state failed".into()),
                });
            }
            _ => {}
        }
        if tokio::time::Instant::now() > deadline {
            return Err(DeviceModelError::Timeout("loading the saved state".into()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Lets go of a backend: its block nodes (top first), netdev and descriptor sets. Failures are
/// logged: the device is gone, what is left is qemu's to hold until it exits.
async fn release(qmp: &Qmp, backend: Backend) {
    for node in &backend.nodes {
        if let Err(e) = qmp.execute(qapi::qmp::blockdev_del { node_name: node.clone() }).await {
            tracing::warn!(%node, "blockdev-del: {e}");
        }
    }
    if let Some(id) = &backend.netdev
        && let Err(e) = qmp.execute(qapi::qmp::netdev_del { id: id.clone() }).await
    {
        tracing::warn!(netdev = %id, "netdev_del: {e}");
    }
    for set in &backend.fdsets {
        if let Err(e) = qmp.execute(qapi::qmp::remove_fd { fdset_id: *set, fd: None }).await {
            tracing::warn!(fdset = set, "remove-fd: {e}");
        }
    }
}

/// Adds the device `id` (`driver`, with `props`) where `slot` says.
async fn plug(
    qmp: &Qmp,
    driver: &str,
    id: &str,
    slot: Slot,
    mut props: Vec<(String, Value)>,
) -> Result<(), DeviceModelError> {
    let bus = match slot {
        Slot::Pci(p) => argv::root_port(p),
        Slot::Usb(p) => {
            props.push(("port".to_owned(), json!(p.to_string())));
            USB_BUS.to_owned()
        }
    };
    qmp.execute(qapi::qmp::device_add::new(driver, Some(id.to_owned()), Some(bus), props))
        .await
        .map(|_| ())
        .map_err(|e| qmp_err("device_add", e))
}

impl Slot {
    /// Its number, as a configuration names it.
    fn number(self) -> u32 {
        match self {
            Slot::Pci(n) | Slot::Usb(n) => u32::try_from(n).unwrap_or(u32::MAX),
        }
    }
}

fn publish(topic: &Topic<DeviceModelEvent, Vec<InstanceInfo>>, guest: u32, kind: Kind) {
    topic.publish(DeviceModelEvent { guest, kind });
}

impl State {
    /// Removes the device `id` from the instance's devices and configuration; what it was.
    fn forget_device(&mut self, id: &str) -> Option<Device> {
        let pos = self.devices.iter().position(|d| d.info.id == id)?;
        let d = self.devices.remove(pos);
        match &d.info.kind {
            DeviceKind::Disk(_) => self.config.disks.retain(|x| x.id != id),
            DeviceKind::Nic(_) => self.config.nics.retain(|x| x.id != id),
            DeviceKind::Usb(_) => self.config.usb.retain(|x| x.id != id),
        }
        Some(d)
    }
}

impl Instance {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn info(&self) -> InstanceInfo {
        let s = self.lock();
        InstanceInfo {
            guest: self.guest,
            state: s.run.clone(),
            pid: if matches!(s.run, RunState::Exited(_)) { None } else { self.qemu.pid() },
            qemu: self.version.get().cloned().unwrap_or_default(),
            machine: self.machine,
            devices: s.devices.iter().map(|d| d.info.clone()).collect(),
            cdrom: s.cdrom.as_ref().map(|m| m.image.clone()),
            workdir: self.workdir.display().to_string(),
        }
    }

    /// A free slot: `want` if given (and free), else the first free one; a USB port if `usb`,
    /// else a PCI Express root port.
    fn take_slot(&self, want: Option<u32>, usb: bool) -> Result<Slot, DeviceModelError> {
        if self.machine != Machine::Q35 {
            return Err(DeviceModelError::Unsupported("machine none has no PCI or USB bus".into()));
        }
        let (range, make, what): (std::ops::RangeInclusive<usize>, fn(usize) -> Slot, &str) = if usb {
            (1..=USB_PORTS, Slot::Usb, "USB port")
        } else {
            (0..=ROOT_PORTS - 1, Slot::Pci, "PCI Express root port")
        };
        let s = self.lock();
        let taken = |n: usize| s.devices.iter().any(|d| d.slot == make(n));
        match want {
            Some(n) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if !range.contains(&n) {
                    return Err(DeviceModelError::InvalidConfig(format!(
                        "{what} {n} does not exist ({}..={})",
                        range.start(),
                        range.end()
                    )));
                }
                if taken(n) {
                    return Err(DeviceModelError::InvalidConfig(format!("{what} {n} is taken")));
                }
                Ok(make(n))
            }
            None => range
                .clone()
                .find(|n| !taken(*n))
                .map(make)
                .ok_or(DeviceModelError::TooMany { what: format!("devices on {what}s"), max: range.count() }),
        }
    }

    fn check_new_id(&self, id: &str) -> Result<(), DeviceModelError> {
        super::check_id(id)?;
        if self.lock().devices.iter().any(|d| d.info.id == id) {
            return Err(DeviceModelError::DeviceExists { guest: self.guest, id: id.to_owned() });
        }
        Ok(())
    }
}

/// Handles qemu's notices for one instance, from its QMP reader.
struct NoticeHandler {
    service: std::sync::Weak<Inner>,
    instance: std::sync::Weak<Instance>,
}

impl NoticeHandler {
    fn handle(&self, notice: QmpNotice) {
        let (Some(inner), Some(i)) = (self.service.upgrade(), self.instance.upgrade()) else { return };
        match notice {
            // A QMP connection that ends while qemu runs and was not asked to quit (a qemu that
            // broke the protocol, or closed its monitor): the model cannot be driven any more,
            // so it is cut off — killed, its exit reported with the reason.
            QmpNotice::Closed(why) => {
                if i.quit_asked.load(Ordering::Relaxed) || i.qemu.exited().is_some() {
                    tracing::debug!(guest = i.guest, %why, "QMP closed");
                } else {
                    // A qemu exiting by itself closes its monitor first: a moment for its exit.
                    let qemu = i.qemu.clone();
                    let guest = i.guest;
                    tokio::spawn(async move {
                        if tokio::time::timeout(Duration::from_secs(1), qemu.wait()).await.is_err() {
                            tracing::warn!(guest, %why, "QMP connection lost: killing qemu");
                            qemu.start_kill(&format!("its QMP connection ended: {why}"));
                        }
                    });
                }
            }
            QmpNotice::Event(event) => {
                if let Some(kind) = on_event(&inner, &i, event) {
                    publish(&inner.topic, i.guest, kind);
                }
            }
        }
    }
}

/// What qemu's event `event` changes in the state of `i`, and the event to publish, if any.
fn on_event(inner: &Arc<Inner>, i: &Arc<Instance>, event: QmpEvent) -> Option<Kind> {
    use qapi::qmp::Event;
    let QmpEvent::Typed { event, .. } = event else { return None };
    match event {
        Event::STOP { .. } => {
            let mut s = i.lock();
            if matches!(s.run, RunState::Running | RunState::Starting) {
                s.run = RunState::Paused;
            }
            Some(Kind::Stopped)
        }
        Event::RESUME { .. } => {
            let mut s = i.lock();
            if !matches!(s.run, RunState::Exited(_)) {
                s.run = RunState::Running;
            }
            Some(Kind::Resumed)
        }
        Event::SHUTDOWN { data, .. } => {
            let mut s = i.lock();
            if !matches!(s.run, RunState::Exited(_)) {
                s.run = RunState::Shutdown;
            }
            Some(Kind::Shutdown { guest_initiated: data.guest, reason: wire_name(&data.reason) })
        }
        Event::DEVICE_DELETED { data, .. } => {
            // qemu also reports the deletion of a device's children, by path only.
            let id = data.device?;
            let gone = i.lock().forget_device(&id)?;
            // The removal's call lets the backend go if it still waits; else this does.
            let backend = match gone.waiter {
                Some(w) => w.send(gone.backend).err()?,
                None => gone.backend,
            };
            let qmp = i.qmp.get().cloned()?;
            let (inner, guest) = (inner.clone(), i.guest);
            tokio::spawn(async move {
                release(&qmp, backend).await;
                publish(&inner.topic, guest, Kind::DeviceDeleted { id });
            });
            None
        }
        Event::BLOCK_IO_ERROR { data, .. } => Some(block_io_error(&i.lock().devices, &data)),
        _ => None,
    }
}

/// `BLOCK_IO_ERROR` as the service reports it: the disk by its id (qemu names its node), qemu's
/// texts bounded.
fn block_io_error(devices: &[Device], data: &qapi::qmp::BLOCK_IO_ERROR) -> Kind {
    let device = data
        .node_name
        .as_ref()
        .and_then(|n| devices.iter().find(|d| d.backend.nodes.contains(n)))
        .map_or_else(|| tame(data.node_name.as_deref().unwrap_or(&data.device)), |d| d.info.id.clone());
    Kind::BlockIoError {
        device,
        operation: wire_name(&data.operation),
        action: wire_name(&data.action),
        reason: tame(&data.reason),
    }
}

/// An enum of qapi's by its name on the wire (`read`, `host-qmp-quit`).
fn wire_name<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => tame(&s),
        Ok(v) => tame(&v.to_string()),
        Err(_) => String::new(),
    }
}

/// Opens the regular file `path` (not through a symlink) for reading, or reading and writing.
fn open_regular(path: &Path, read_only: bool) -> std::io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    let access = if read_only { OFlags::RDONLY } else { OFlags::RDWR };
    let fd = rustix::fs::open(path, access | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())?;
    let st = rustix::fs::fstat(&fd)?;
    if !rustix::fs::FileType::from_raw_mode(st.st_mode).is_file() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"));
    }
    Ok(fd)
}

/// Opens the existing tap `name` (`/dev/net/tun`, `TUNSETIFF`).
fn open_tap(name: &str) -> std::io::Result<OwnedFd> {
    use rustix::fs::{Mode, OFlags};
    // The tap must exist: TUNSETIFF on a missing name would make a new one.
    let index = rustix::net::netdevice::name_to_index(
        &rustix::net::socket(rustix::net::AddressFamily::INET, rustix::net::SocketType::DGRAM, None)?,
        name,
    )?;
    if index == 0 || name.len() >= 16 {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, "no such link"));
    }
    let fd = rustix::fs::open("/dev/net/tun", OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
    /// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req =
        IfReq { name: [0; 16], flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short, _pad: [0; 22] };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    // SAFETY: TUNSETIFF reads a `struct ifreq` (40 bytes, name NUL-terminated) that lives
    // across the call.
    if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&fd), TUNSETIFF, &raw mut req) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

impl DeviceModel for Qemud {
    async fn start(&self, config: DeviceModelConfig) -> Result<InstanceInfo, DeviceModelError> {
        self.require_toolstack("start")?;
        config.check()?;
        let mut start = Starting::reserve(self, config.guest)?;
        let i = self.start_instance(config, &mut start).await?;
        self.publish(i.guest, Kind::Started);
        Ok(i.info())
    }

    async fn stop(&self, guest: u32, timeout_ms: Option<u64>) -> Result<ExitReason, DeviceModelError> {
        self.require_toolstack("stop")?;
        let timeout = timeout_ms.map_or(STOP_TIMEOUT, Duration::from_millis).min(MAX_STOP_TIMEOUT);
        self.stop_guest(guest, timeout).await
    }

    async fn pause(&self, guest: u32) -> Result<InstanceInfo, DeviceModelError> {
        self.require_toolstack("pause")?;
        let (i, qmp) = self.live(guest)?;
        qmp.execute(qapi::qmp::stop {}).await.map_err(|e| qmp_err("stop", e))?;
        i.lock().run = RunState::Paused;
        Ok(i.info())
    }

    async fn resume(&self, guest: u32) -> Result<InstanceInfo, DeviceModelError> {
        self.require_toolstack("resume")?;
        let (i, qmp) = self.live(guest)?;
        qmp.execute(qapi::qmp::cont {}).await.map_err(|e| qmp_err("cont", e))?;
        i.lock().run = RunState::Running;
        Ok(i.info())
    }

    async fn status(&self, guest: u32) -> Result<InstanceInfo, DeviceModelError> {
        self.require_toolstack("status")?;
        Ok(self.instance(guest)?.info())
    }

    async fn list(&self) -> Result<Vec<InstanceInfo>, DeviceModelError> {
        self.require_toolstack("list")?;
        Ok(self.snapshot())
    }

    async fn disk_add(&self, guest: u32, disk: DiskSpec) -> Result<DeviceInfo, DeviceModelError> {
        self.require_toolstack("disk-add")?;
        let (i, qmp) = self.live(guest)?;
        let _ops = i.ops.lock().await;
        i.check_new_id(&disk.id)?;
        if i.lock().devices.iter().filter(|d| matches!(d.info.kind, DeviceKind::Disk(_))).count()
            >= super::MAX_DISKS
        {
            return Err(DeviceModelError::TooMany { what: "disks".into(), max: super::MAX_DISKS });
        }
        self.add_disk(&i, &qmp, &disk).await
    }

    async fn disk_remove(&self, guest: u32, id: String) -> Result<Unplug, DeviceModelError> {
        self.require_toolstack("disk-remove")?;
        let (i, qmp) = self.live(guest)?;
        let _ops = i.ops.lock().await;
        self.unplug(&i, &qmp, &id, true).await
    }

    async fn cdrom_change(&self, guest: u32, image: String) -> Result<InstanceInfo, DeviceModelError> {
        self.require_toolstack("cdrom-change")?;
        let (i, qmp) = self.live(guest)?;
        let _ops = i.ops.lock().await;
        self.change_medium(&i, &qmp, &image).await?;
        self.publish(guest, Kind::MediumChanged { image: Some(image) });
        Ok(i.info())
    }

    async fn cdrom_eject(&self, guest: u32) -> Result<InstanceInfo, DeviceModelError> {
        self.require_toolstack("cdrom-eject")?;
        let (i, qmp) = self.live(guest)?;
        if i.machine != Machine::Q35 {
            return Err(DeviceModelError::Unsupported("machine none has no CD-ROM drive".into()));
        }
        let _ops = i.ops.lock().await;
        let had = i.lock().cdrom.is_some();
        self.remove_medium(&i, &qmp).await?;
        if had {
            self.publish(guest, Kind::MediumChanged { image: None });
        }
        Ok(i.info())
    }

    async fn usb_add(&self, guest: u32, id: String, kind: UsbKind) -> Result<DeviceInfo, DeviceModelError> {
        self.require_toolstack("usb-add")?;
        let (i, qmp) = self.live(guest)?;
        let _ops = i.ops.lock().await;
        i.check_new_id(&id)?;
        self.add_usb(&i, &qmp, &UsbSpec { id, kind, slot: None }).await
    }

    async fn usb_remove(&self, guest: u32, id: String) -> Result<Unplug, DeviceModelError> {
        self.require_toolstack("usb-remove")?;
        let (i, qmp) = self.live(guest)?;
        let _ops = i.ops.lock().await;
        self.unplug(&i, &qmp, &id, false).await
    }

    async fn save(&self, guest: u32, path: String) -> Result<SavedState, DeviceModelError> {
        self.require_toolstack("save")?;
        let (i, qmp) = self.live(guest)?;
        let _ops = i.ops.lock().await;
        if i.lock().devices.iter().any(|d| d.info.unplug_deadline.is_some()) {
            return Err(DeviceModelError::Unsupported(
                "a removal waits for the guest: the saved devices would not be known".into(),
            ));
        }
        let target = PathBuf::from(&path);
        let file_err =
            |e: std::io::Error| DeviceModelError::File { path: path.clone(), reason: e.to_string() };
        let name = target.file_name().ok_or_else(|| file_err(std::io::Error::other("not a file name")))?;
        let tmp =
            target.with_file_name(format!(".{}.dm-save-{}", name.to_string_lossy(), std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .mode(0o600)
            .open(&tmp)
            .map_err(file_err)?;
        let saved = async {
            qmp.execute(qapi::qmp::stop {}).await.map_err(|e| qmp_err("stop", e))?;
            i.lock().run = RunState::Paused;
            let added = qmp
                .execute_with_fd(qapi::qmp::add_fd { fdset_id: None, opaque: None }, file.as_fd())
                .await
                .map_err(|e| qmp_err("add-fd", e))?;
            let r = qmp
                .execute(qapi::qmp::xen_save_devices_state {
                    filename: format!("/dev/fdset/{}", added.fdset_id),
                    live: Some(false),
                })
                .await
                .map_err(|e| qmp_err("xen-save-devices-state", e));
            let _ = qmp.execute(qapi::qmp::remove_fd { fdset_id: added.fdset_id, fd: None }).await;
            r?;
            // The sync may take long: off the daemon's one thread.
            let (file, from, to) = (file.try_clone().map_err(file_err)?, tmp.clone(), target.clone());
            let stored = tokio::task::spawn_blocking(move || {
                file.sync_all()?;
                let bytes = file.metadata()?.len();
                std::fs::rename(&from, &to)?;
                Ok(bytes)
            });
            let bytes = stored.await.map_err(|e| file_err(std::io::Error::other(e)))?.map_err(file_err)?;
            Ok::<u64, DeviceModelError>(bytes)
        }
        .await;
        let bytes = match saved {
            Ok(b) => b,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let mut config = i.lock().config.clone();
        config.restore_from = Some(path.clone());
        Ok(SavedState { path, bytes, config })
    }

    async fn events(&self, guest: Option<u32>) -> Events<DeviceModelEvent, Vec<InstanceInfo>> {
        if let Err(e) = self.require_toolstack("events") {
            return Events::refused(std::io::ErrorKind::PermissionDenied, e.to_string());
        }
        let service = self.clone();
        match guest {
            None => self.inner.topic.events().with_snapshot(move || service.snapshot()),
            Some(g) => self
                .inner
                .topic
                .events_where(move |e: &DeviceModelEvent| e.guest == g)
                .with_snapshot(move || service.snapshot().into_iter().filter(|i| i.guest == g).collect()),
        }
    }
}

use std::os::unix::fs::OpenOptionsExt as _;

impl Drop for Inner {
    fn drop(&mut self) {
        // Every qemu goes with the service (kill_on_drop does it for each child as its watcher
        // ends; this makes it immediate).
        let all = std::mem::take(self.instances.get_mut().unwrap_or_else(|e| e.into_inner()));
        for i in all.values() {
            i.qemu.start_kill("the device-model service stopped");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    /// qemu's `BLOCK_IO_ERROR` names the block node: the event names the disk by its id, and
    /// keeps qemu's texts bounded.
    #[test]
    fn a_block_io_error_names_the_disk() {
        let data: qapi::qmp::BLOCK_IO_ERROR = serde_json::from_value(json!({
            "device": "", "node-name": "dm-n7", "operation": "write", "action": "stop",
            "reason": "No space left on device", "nospace": true,
        }))
        .unwrap();
        let disk = DiskSpec {
            id: "xvdb".into(),
            image: "data".into(),
            bus: DiskBus::Virtio,
            read_only: false,
            slot: Some(1),
        };
        let devices = vec![Device {
            info: DeviceInfo { id: "xvdb".into(), kind: DeviceKind::Disk(disk), unplug_deadline: None },
            slot: Slot::Pci(1),
            backend: Backend { nodes: vec!["dm-n7".into(), "dm-n6".into()], ..Backend::default() },
            waiter: None,
        }];
        assert_eq!(
            block_io_error(&devices, &data),
            Kind::BlockIoError {
                device: "xvdb".into(),
                operation: "write".into(),
                action: "stop".into(),
                reason: "No space left on device".into(),
            }
        );
        // A node of no disk of the service's: qemu's name for it, bounded.
        let long = "x".repeat(100_000);
        let data: qapi::qmp::BLOCK_IO_ERROR = serde_json::from_value(json!({
            "device": "", "node-name": long, "operation": "read", "action": "report", "reason": long,
        }))
        .unwrap();
        let Kind::BlockIoError { device, operation, reason, .. } = block_io_error(&devices, &data) else {
            panic!()
        };
        assert_eq!(operation, "read");
        assert!(
            device.len() <= 4 * super::super::qmp::wire::MAX_TEXT
                && reason.len() <= 4 * super::super::qmp::wire::MAX_TEXT
        );
    }
}
