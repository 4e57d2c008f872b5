//! The device-model service: what the toolstack asks of a guest's qemu device model (in a stub
//! domain or a device-model domain), the job libxl does over QMP.
//!
//! The daemon (`dombus-qemud`) runs one qemu per guest and speaks QMP to it ([`qmp`]): it starts
//! qemu from a typed [`DeviceModelConfig`] — paused, then continued, as libxl does — and drives
//! its disks, CD-ROM and USB devices, its run state and its saved state. Disks are the storage
//! service's images by name and NICs the network service's tap vifs by id: the daemon resolves
//! them with those services, opens the files itself and hands qemu only their descriptors.
//!
//! Each qemu runs in a working directory of its own (`<dir>/dom<guest>`), in a Landlock sandbox
//! that lets it read what it needs to start (its program, libraries and firmware) and write only
//! that directory: an image that was not given to it cannot be opened by it. It dies with the
//! daemon (`PR_SET_PDEATHSIG`), even when the daemon is killed with SIGKILL, and a qemu that exits
//! behind the daemon's back is noticed at once (an event, and its status says why).
//!
//! A device whose removal needs the guest's cooperation (a PCI disk: the guest must let go of
//! it) is reported as [`Unplug::Pending`]; the call returns at once, and the removal completes
//! ([`DeviceModelEventKind::DeviceDeleted`]) or times out ([`DeviceModelEventKind::UnplugTimedOut`])
//! visibly. Only the toolstack's domains may call.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod argv;
mod daemon;
mod process;
pub mod qmp;
mod service;

pub use daemon::{DaemonArgs, enter_namespace, run_daemon};
pub use service::{Qemud, QemudConfig};

/// The most guests one daemon runs a device model for.
pub const MAX_INSTANCES: usize = 64;
/// The most disks (of every bus) one device model has.
pub const MAX_DISKS: usize = 16;
/// The most NICs one device model has.
pub const MAX_NICS: usize = 8;
/// The most USB devices (of every kind, disks included) one device model has.
pub const MAX_USB: usize = 8;
/// The most guest memory a device model may be given, MiB.
pub const MAX_MEMORY_MIB: u32 = 65_536;
/// The most vCPUs a device model may be given.
pub const MAX_VCPUS: u32 = 64;
/// The longest a backing chain of an image may be.
pub const MAX_BACKING_DEPTH: usize = 16;

/// The machine qemu emulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// A PCI Express machine (`q35`) with hot-plug slots, a USB controller and an IDE CD-ROM.
    #[default]
    Q35,
    /// No machine at all (`none`): a qemu with a monitor and nothing to plug into.
    None,
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Machine::Q35 => "q35",
            Machine::None => "none",
        })
    }
}

impl FromStr for Machine {
    type Err = DeviceModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "q35" => Ok(Machine::Q35),
            "none" => Ok(Machine::None),
            _ => Err(DeviceModelError::InvalidConfig(format!("unknown machine {s:?} (q35 or none)"))),
        }
    }
}

/// The bus a disk is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    /// A virtio block device in a PCI Express slot; its removal needs the guest.
    #[default]
    Virtio,
    /// A USB mass-storage device; removed without the guest.
    Usb,
}

impl FromStr for DiskBus {
    type Err = DeviceModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "virtio" => Ok(DiskBus::Virtio),
            "usb" => Ok(DiskBus::Usb),
            _ => Err(DeviceModelError::InvalidConfig(format!("unknown disk bus {s:?} (virtio or usb)"))),
        }
    }
}

/// A disk of a device model: an image of the storage service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// The device's id in the guest's device model (`xvdb`): see [`check_id`].
    pub id: String,
    /// The storage service's image name.
    pub image: String,
    /// Its bus.
    #[serde(default)]
    pub bus: DiskBus,
    /// Whether the guest may only read it.
    #[serde(default)]
    pub read_only: bool,
    /// Where it is plugged: its PCI Express root port (0 to 23) or USB port (1 to 8); the
    /// service chooses when it is left out. The configuration a save answers names every
    /// device's: restored devices must be where they were.
    #[serde(default)]
    pub slot: Option<u32>,
}

/// The emulated network card a NIC is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    /// An Intel e1000, which every guest has a driver for.
    #[default]
    E1000,
    /// A virtio network device.
    Virtio,
}

/// A NIC of a device model: a tap vif of the network service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NicSpec {
    /// The device's id (`nic0`): see [`check_id`].
    pub id: String,
    /// The network service's vif (`3.0`): a tap of this guest's.
    pub vif: String,
    /// The card emulated.
    #[serde(default)]
    pub model: NicModel,
    /// Where it is plugged: its PCI Express root port (0 to 23) or USB port (1 to 8); the
    /// service chooses when it is left out. The configuration a save answers names every
    /// device's: restored devices must be where they were.
    #[serde(default)]
    pub slot: Option<u32>,
}

/// A USB device that is not a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UsbKind {
    /// A tablet (absolute pointer).
    Tablet,
    /// A keyboard.
    Keyboard,
    /// A mouse.
    Mouse,
}

impl UsbKind {
    /// qemu's driver.
    pub fn driver(self) -> &'static str {
        match self {
            UsbKind::Tablet => "usb-tablet",
            UsbKind::Keyboard => "usb-kbd",
            UsbKind::Mouse => "usb-mouse",
        }
    }
}

impl FromStr for UsbKind {
    type Err = DeviceModelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tablet" => Ok(UsbKind::Tablet),
            "keyboard" => Ok(UsbKind::Keyboard),
            "mouse" => Ok(UsbKind::Mouse),
            _ => Err(DeviceModelError::InvalidConfig(format!(
                "unknown USB device {s:?} (tablet, keyboard or mouse)"
            ))),
        }
    }
}

/// A USB device that is not a disk, as a configuration names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsbSpec {
    /// The device's id: see [`check_id`].
    pub id: String,
    /// What it is.
    pub kind: UsbKind,
    /// Where it is plugged: its PCI Express root port (0 to 23) or USB port (1 to 8); the
    /// service chooses when it is left out. The configuration a save answers names every
    /// device's: restored devices must be where they were.
    #[serde(default)]
    pub slot: Option<u32>,
}

/// What a device model is started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceModelConfig {
    /// The guest's domain id: each guest has at most one device model.
    pub guest: u32,
    /// The machine.
    #[serde(default)]
    pub machine: Machine,
    /// Guest memory, MiB (1 to [`MAX_MEMORY_MIB`]).
    pub memory_mib: u32,
    /// vCPUs (1 to [`MAX_VCPUS`]).
    pub vcpus: u32,
    /// Disks (at most [`MAX_DISKS`]).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// NICs (at most [`MAX_NICS`]).
    #[serde(default)]
    pub nics: Vec<NicSpec>,
    /// The storage image in the CD-ROM drive, if any (the drive is always there on q35).
    #[serde(default)]
    pub cdrom: Option<String>,
    /// USB devices that are not disks.
    #[serde(default)]
    pub usb: Vec<UsbSpec>,
    /// A saved state to start from (a file of this domain, written by [`DeviceModel::save`]);
    /// the devices must be those it was saved with (the config `save` returned).
    #[serde(default)]
    pub restore_from: Option<String>,
    /// Whether to leave it paused once started (libxl continues it; a restore may not).
    #[serde(default)]
    pub paused: bool,
}

impl DeviceModelConfig {
    /// A configuration of `machine` with `memory_mib` and `vcpus` and no devices.
    pub fn new(guest: u32, machine: Machine, memory_mib: u32, vcpus: u32) -> Self {
        DeviceModelConfig {
            guest,
            machine,
            memory_mib,
            vcpus,
            disks: Vec::new(),
            nics: Vec::new(),
            cdrom: None,
            usb: Vec::new(),
            restore_from: None,
            paused: false,
        }
    }

    /// Checks the bounds and names a configuration must respect, before anything is started.
    pub fn check(&self) -> Result<(), DeviceModelError> {
        let invalid = |m: String| Err(DeviceModelError::InvalidConfig(m));
        if !(1..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return invalid(format!("memory {} MiB is not between 1 and {MAX_MEMORY_MIB}", self.memory_mib));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return invalid(format!("{} vCPUs is not between 1 and {MAX_VCPUS}", self.vcpus));
        }
        too_many("disks", self.disks.len(), MAX_DISKS)?;
        too_many("NICs", self.nics.len(), MAX_NICS)?;
        let usb_disks = self.disks.iter().filter(|d| d.bus == DiskBus::Usb).count();
        too_many("USB devices", self.usb.len() + usb_disks, MAX_USB)?;
        let mut ids = std::collections::BTreeSet::new();
        let all = self
            .disks
            .iter()
            .map(|d| d.id.as_str())
            .chain(self.nics.iter().map(|n| n.id.as_str()))
            .chain(self.usb.iter().map(|u| u.id.as_str()));
        for id in all {
            check_id(id)?;
            if !ids.insert(id) {
                return Err(DeviceModelError::DeviceExists { guest: self.guest, id: id.to_owned() });
            }
        }
        if self.machine == Machine::None
            && (!self.disks.is_empty()
                || !self.nics.is_empty()
                || self.cdrom.is_some()
                || !self.usb.is_empty())
        {
            return Err(DeviceModelError::Unsupported(
                "machine none has no bus: it takes no disk, NIC, CD-ROM or USB device".into(),
            ));
        }
        Ok(())
    }
}

fn too_many(what: &'static str, n: usize, max: usize) -> Result<(), DeviceModelError> {
    if n > max { Err(DeviceModelError::TooMany { what: what.into(), max }) } else { Ok(()) }
}

/// The id of the CD-ROM drive of a q35 machine.
pub const CDROM_ID: &str = "cd0";

/// Checks a device id: 1 to 32 characters of `a-z 0-9 _ -`, starting with a letter (qemu's rule
/// for ids, without the characters its option syntax gives a meaning to), and not one the
/// daemon uses itself (`cd0`, `dm-…`).
pub fn check_id(id: &str) -> Result<(), DeviceModelError> {
    let ok = (1..=32).contains(&id.len())
        && id.as_bytes()[0].is_ascii_lowercase()
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
        && id != CDROM_ID
        && !id.starts_with("dm-");
    if ok {
        Ok(())
    } else {
        Err(DeviceModelError::InvalidConfig(format!(
            "device id {id:?}: 1 to 32 characters of a-z 0-9 _ -, starting with a letter, not `cd0` or `dm-…`"
        )))
    }
}

/// A device model's run state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// Being started (or restored).
    Starting,
    /// Running.
    Running,
    /// Paused (`pause`, a save, or started paused).
    Paused,
    /// The guest shut down; qemu still runs until stopped.
    Shutdown,
    /// qemu has exited.
    Exited(ExitReason),
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunState::Starting => f.write_str("starting"),
            RunState::Running => f.write_str("running"),
            RunState::Paused => f.write_str("paused"),
            RunState::Shutdown => f.write_str("shut down"),
            RunState::Exited(why) => write!(f, "exited: {why}"),
        }
    }
}

/// Why a qemu exited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitReason {
    /// `stop` asked it to quit, and it did.
    Quit,
    /// `stop` asked it to quit, it did not within the deadline, and it was killed.
    KilledAfterDeadline,
    /// The daemon killed it: its QMP connection broke (a qemu breaking the protocol is cut
    /// off), or its start failed or was cancelled.
    Killed {
        /// Why.
        reason: String,
    },
    /// It exited by itself with this status; `message` is the end of what it wrote on stderr.
    Exited {
        /// Its exit status.
        code: i32,
        /// The last lines of its stderr.
        message: String,
    },
    /// A signal killed it, not sent by this daemon.
    Signalled {
        /// The signal's number.
        signal: i32,
        /// The last lines of its stderr.
        message: String,
    },
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::Quit => f.write_str("quit when asked"),
            ExitReason::KilledAfterDeadline => f.write_str("killed: it did not quit within the deadline"),
            ExitReason::Killed { reason } => write!(f, "killed: {reason}"),
            ExitReason::Exited { code, message } => {
                write!(f, "exited with status {code}")?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
            ExitReason::Signalled { signal, message } => {
                write!(f, "killed by signal {signal}")?;
                if !message.is_empty() {
                    write!(f, ": {message}")?;
                }
                Ok(())
            }
        }
    }
}

/// What kind of device a [`DeviceInfo`] is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// A disk.
    Disk(DiskSpec),
    /// A NIC.
    Nic(NicSpec),
    /// A USB device that is not a disk.
    Usb(UsbSpec),
}

/// A device of a device model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceInfo {
    /// Its id.
    pub id: String,
    /// What it is.
    pub kind: DeviceKind,
    /// Whether its removal was asked and waits for the guest: until when (seconds since the
    /// epoch).
    pub unplug_deadline: Option<u64>,
}

/// What a device model is now ([`DeviceModel::status`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// The guest.
    pub guest: u32,
    /// Its run state.
    pub state: RunState,
    /// qemu's process id (while it runs).
    pub pid: Option<u32>,
    /// qemu's version (`7.2.22`).
    pub qemu: String,
    /// The machine.
    pub machine: Machine,
    /// Its devices (disks, NICs, USB devices), in the order they were added.
    pub devices: Vec<DeviceInfo>,
    /// The image in the CD-ROM drive (`None`: empty, or no drive).
    pub cdrom: Option<String>,
    /// Its working directory.
    pub workdir: String,
}

/// What a device removal did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unplug {
    /// The device is gone (and its disk's image let go).
    Done,
    /// The guest must let go of the device; it is gone when
    /// [`DeviceModelEventKind::DeviceDeleted`] says so, or the removal gives up at `deadline`
    /// (seconds since the epoch) with [`DeviceModelEventKind::UnplugTimedOut`].
    Pending {
        /// When the removal gives up.
        deadline: u64,
    },
}

/// What [`DeviceModel::save`] wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedState {
    /// The file.
    pub path: String,
    /// Its size, bytes.
    pub bytes: u64,
    /// The configuration to start it again with (its `restore_from` set to `path`): the
    /// devices it had, hot-plugged ones included.
    pub config: DeviceModelConfig,
}

/// Something that happened to a device model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceModelEvent {
    /// The guest whose device model it is.
    pub guest: u32,
    /// What happened.
    pub kind: DeviceModelEventKind,
}

/// What happened to a device model ([`DeviceModelEvent`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceModelEventKind {
    /// It was started (or restored) and runs (or is paused, as asked).
    Started,
    /// The guest's CPUs stopped (`STOP`: a pause, a save, an error).
    Stopped,
    /// The guest's CPUs run again (`RESUME`).
    Resumed,
    /// The guest shut down (`SHUTDOWN`).
    Shutdown {
        /// Whether the guest asked for it (rather than the host).
        guest_initiated: bool,
        /// qemu's reason (`guest-shutdown`, `host-qmp-quit`).
        reason: String,
    },
    /// A device is gone (`DEVICE_DELETED`), and its disk's image let go.
    DeviceDeleted {
        /// Its id.
        id: String,
    },
    /// A removal the guest did not complete in time; the device stays.
    UnplugTimedOut {
        /// Its id.
        id: String,
    },
    /// A disk's I/O failed (`BLOCK_IO_ERROR`).
    BlockIoError {
        /// The disk (its id, or qemu's node name).
        device: String,
        /// `read` or `write`.
        operation: String,
        /// What qemu did (`report`, `stop`, `ignore`).
        action: String,
        /// The error.
        reason: String,
    },
    /// The CD-ROM drive's medium changed (`None`: ejected).
    MediumChanged {
        /// The image now in it.
        image: Option<String>,
    },
    /// qemu exited.
    Exited(ExitReason),
}

/// An error of the device-model service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
pub enum DeviceModelError {
    /// The guest has no device model here.
    #[error("guest {guest} has no device model")]
    NotFound {
        /// The guest.
        guest: u32,
    },
    /// The guest's device model runs already.
    #[error("guest {guest} has a device model already (stop it first)")]
    AlreadyRunning {
        /// The guest.
        guest: u32,
    },
    /// The device model has exited: only `status` and `stop` act on it.
    #[error("guest {guest}'s device model has exited ({reason})")]
    Exited {
        /// The guest.
        guest: u32,
        /// Why.
        reason: ExitReason,
    },
    /// No device of that id.
    #[error("guest {guest}'s device model has no device {id:?}")]
    DeviceNotFound {
        /// The guest.
        guest: u32,
        /// The id.
        id: String,
    },
    /// A device of that id exists.
    #[error("guest {guest}'s device model has a device {id:?} already")]
    DeviceExists {
        /// The guest.
        guest: u32,
        /// The id.
        id: String,
    },
    /// The device's removal waits for the guest already.
    #[error("the removal of {id:?} waits for the guest already")]
    UnplugPending {
        /// The device.
        id: String,
    },
    /// A configuration or argument is not valid.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// More of something than the service allows.
    #[error("too many {what} (at most {max})")]
    TooMany {
        /// What.
        what: String,
        /// The bound.
        max: usize,
    },
    /// Something this machine or configuration cannot do.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A disk's image cannot be used (the storage service's answer, or its file).
    #[error("image {image:?}: {reason}")]
    Image {
        /// The image.
        image: String,
        /// Why.
        reason: String,
    },
    /// A NIC's vif cannot be used (the network service's answer, or its tap).
    #[error("vif {vif}: {reason}")]
    Vif {
        /// The vif.
        vif: String,
        /// Why.
        reason: String,
    },
    /// The running qemu has no such command.
    #[error("qemu {version} has no command {command:?}")]
    CommandNotFound {
        /// The command.
        command: String,
        /// qemu's version.
        version: String,
    },
    /// qemu refused or failed a command.
    #[error("qemu: {command}: {message}")]
    Qemu {
        /// The command.
        command: String,
        /// qemu's error.
        message: String,
    },
    /// qemu could not be started, or died while starting.
    #[error("qemu did not start: {0}")]
    StartFailed(String),
    /// Something took longer than its deadline.
    #[error("timed out: {0}")]
    Timeout(String),
    /// A file of this domain could not be used.
    #[error("{path}: {reason}")]
    File {
        /// The path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The caller may not do this.
    #[error("permission denied: {operation}: {reason}")]
    PermissionDenied {
        /// What was refused.
        operation: String,
        /// Why.
        reason: String,
    },
}

/// The device models of a device-model domain: one qemu per guest.
#[dombus::service(name = "device-model", version = 1)]
pub trait DeviceModel {
    /// Starts a device model from `config`: paused, devices in place, then continued (unless
    /// `config.paused`); from a saved state if `config.restore_from`.
    async fn start(&self, config: DeviceModelConfig) -> Result<InstanceInfo, DeviceModelError>;

    /// Stops the guest's device model: `quit`, then a kill if it has not exited within
    /// `timeout_ms` (10 s by default, at most 60 s); why it ended. Forgets an exited one.
    async fn stop(&self, guest: u32, timeout_ms: Option<u64>) -> Result<ExitReason, DeviceModelError>;

    /// Pauses the guest's vCPUs.
    #[idempotent]
    async fn pause(&self, guest: u32) -> Result<InstanceInfo, DeviceModelError>;

    /// Resumes the guest's vCPUs.
    #[idempotent]
    async fn resume(&self, guest: u32) -> Result<InstanceInfo, DeviceModelError>;

    /// The guest's device model: state, process, devices.
    #[idempotent]
    async fn status(&self, guest: u32) -> Result<InstanceInfo, DeviceModelError>;

    /// Every device model (exited ones included, until stopped or started again).
    #[idempotent]
    async fn list(&self) -> Result<Vec<InstanceInfo>, DeviceModelError>;

    /// Hot-adds the disk `disk` (an image of the storage service).
    async fn disk_add(&self, guest: u32, disk: DiskSpec) -> Result<DeviceInfo, DeviceModelError>;

    /// Removes the disk `id`: the device first, its image once the device is gone.
    async fn disk_remove(&self, guest: u32, id: String) -> Result<Unplug, DeviceModelError>;

    /// Puts the image `image` in the CD-ROM drive (replacing what is in it).
    async fn cdrom_change(&self, guest: u32, image: String) -> Result<InstanceInfo, DeviceModelError>;

    /// Ejects the CD-ROM drive's medium.
    #[idempotent]
    async fn cdrom_eject(&self, guest: u32) -> Result<InstanceInfo, DeviceModelError>;

    /// Adds the USB device `kind` as `id`.
    async fn usb_add(&self, guest: u32, id: String, kind: UsbKind) -> Result<DeviceInfo, DeviceModelError>;

    /// Removes the USB device `id`.
    async fn usb_remove(&self, guest: u32, id: String) -> Result<Unplug, DeviceModelError>;

    /// Pauses the guest's device model and writes its state to `path`, a file of this domain
    /// (written whole or not at all); the model stays paused.
    async fn save(&self, guest: u32, path: String) -> Result<SavedState, DeviceModelError>;

    /// What happens to device models (of the guest `guest` only, if given); a resync's
    /// snapshot is every device model now.
    async fn events(&self, guest: Option<u32>) -> dombus::Events<DeviceModelEvent, Vec<InstanceInfo>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        for ok in ["a", "xvdb", "nic0", "usb_tablet-1", &"a".repeat(32)] {
            assert!(check_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "0a", "A", "a,b", "a=b", "a b", "cd0", "dm-x", &"a".repeat(33), "é"] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn configs_are_checked() {
        let mut c = DeviceModelConfig::new(3, Machine::Q35, 128, 1);
        assert!(c.check().is_ok());
        c.memory_mib = 0;
        assert!(matches!(c.check(), Err(DeviceModelError::InvalidConfig(_))));
        c.memory_mib = MAX_MEMORY_MIB + 1;
        assert!(c.check().is_err());
        c.memory_mib = 128;
        c.vcpus = MAX_VCPUS + 1;
        assert!(c.check().is_err());
        c.vcpus = 1;
        let disk = |id: &str| DiskSpec {
            id: id.into(),
            image: "i".into(),
            bus: DiskBus::Virtio,
            read_only: false,
            slot: None,
        };
        c.disks = vec![disk("a"), disk("a")];
        assert!(matches!(c.check(), Err(DeviceModelError::DeviceExists { .. })));
        c.disks = (0..=MAX_DISKS).map(|i| disk(&format!("d{i}"))).collect();
        assert!(matches!(c.check(), Err(DeviceModelError::TooMany { .. })));
        c.disks = vec![DiskSpec { bus: DiskBus::Usb, ..disk("u") }];
        c.usb = (0..MAX_USB)
            .map(|i| UsbSpec { id: format!("t{i}"), kind: UsbKind::Tablet, slot: None })
            .collect();
        assert!(matches!(c.check(), Err(DeviceModelError::TooMany { .. })));
        c.usb.pop();
        assert!(c.check().is_ok());
        c.machine = Machine::None;
        assert!(matches!(c.check(), Err(DeviceModelError::Unsupported(_))));
    }
}
