//! qemu's command line for a configuration: the machine and its fixed buses only.
//!
//! Every device of a configuration (disks, NICs, the CD-ROM's medium, USB devices) is added over
//! QMP while qemu waits paused, exactly as a hot-plug later is: one way of adding each device,
//! and a restore (`-incoming defer`, then `migrate-incoming` from a descriptor) sees the devices
//! in place before the state is loaded. Nothing of the caller's reaches this command line but
//! numbers and the machine's name.

use super::{CDROM_ID, DeviceModelConfig, Machine, process::QMP_FD};

/// The PCI Express root ports of a q35 machine: one hot-plug slot each, for virtio disks and
/// NICs.
pub(super) const ROOT_PORTS: usize = super::MAX_DISKS + super::MAX_NICS;
/// The id of the USB controller's bus.
pub(super) const USB_BUS: &str = "dm-usb.0";
/// The USB 2 ports of the controller (1 to this), one per USB device.
pub(super) const USB_PORTS: usize = super::MAX_USB;

/// The id of root port `i`.
pub(super) fn root_port(i: usize) -> String {
    format!("dm-rp{i}")
}

/// qemu's arguments for `config` with the accelerator `accel`; `restore` if the state is loaded
/// after the devices are added.
pub(super) fn args(config: &DeviceModelConfig, accel: &str, restore: bool) -> Vec<String> {
    let mut a: Vec<String> = Vec::with_capacity(32 + 2 * ROOT_PORTS);
    let mut push = |s: &[&str]| a.extend(s.iter().map(|s| (*s).to_owned()));
    // No vmdesc section and no configuration section: the save is the device state alone
    // (`xen-save-devices-state`), and the load must not expect them.
    let machine = match config.machine {
        Machine::Q35 => format!("q35,accel={accel},suppress-vmdesc=on"),
        Machine::None => format!("none,accel={accel}"),
    };
    push(&["-name", &format!("guest{},process=dm-{}", config.guest, config.guest)]);
    push(&["-machine", &machine]);
    push(&["-m", &config.memory_mib.to_string(), "-smp", &config.vcpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-S"]);
    push(&["-chardev", &format!("socket,id=dm-qmp,fd={QMP_FD}"), "-mon", "chardev=dm-qmp,mode=control"]);
    // qemu's own seccomp filter on top of the Landlock sandbox.
    push(&["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
    push(&["-global", "migration.send-configuration=off"]);
    if config.machine == Machine::Q35 {
        // The TPR patching of kvmvapic reads guest memory on load, which a device-state-only
        // restore does not have.
        push(&["-global", "apic-common.vapic=off"]);
        for i in 0..ROOT_PORTS {
            push(&["-device", &format!("pcie-root-port,id={},chassis={}", root_port(i), i + 1)]);
        }
        push(&["-device", &format!("qemu-xhci,id=dm-usb,p2={USB_PORTS},p3={USB_PORTS}")]);
        push(&["-device", &format!("ide-cd,id={CDROM_ID},bus=ide.1")]);
    }
    if restore {
        push(&["-incoming", "defer"]);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device_model::{DiskBus, DiskSpec};

    #[test]
    fn nothing_of_the_callers_reaches_the_command_line() {
        let mut c = DeviceModelConfig::new(7, Machine::Q35, 256, 2);
        c.disks.push(DiskSpec {
            id: "xvda".into(),
            image: "secret,file=/etc/shadow".into(),
            bus: DiskBus::Virtio,
            read_only: false,
            slot: None,
        });
        c.cdrom = Some("cd,image".into());
        let a = args(&c, "tcg", false).join(" ");
        assert!(!a.contains("secret") && !a.contains("shadow") && !a.contains("cd,image"), "{a}");
        assert!(a.contains("-machine q35,accel=tcg,suppress-vmdesc=on"), "{a}");
        assert!(a.contains("-m 256 -smp 2"), "{a}");
        assert!(a.contains("-S"), "{a}");
        assert!(!a.contains("-incoming"), "{a}");
        assert_eq!(a.matches("pcie-root-port").count(), ROOT_PORTS, "{a}");
        assert!(args(&c, "tcg", true).join(" ").contains("-incoming defer"));
    }

    #[test]
    fn machine_none_has_no_buses() {
        let c = DeviceModelConfig::new(7, Machine::None, 64, 1);
        let a = args(&c, "tcg", false).join(" ");
        assert!(a.contains("-machine none,accel=tcg"), "{a}");
        assert!(!a.contains("pcie-root-port") && !a.contains("ide-cd") && !a.contains("xhci"), "{a}");
    }
}
