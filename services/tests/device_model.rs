//! The device-model service on Debian's real qemu-system-x86_64 (software emulation), between
//! simulated domains: domain 1 serves storage (the real qemu-img), domain 5 the device models,
//! domain 0 is the toolstack, domain 7 another guest's domain. Every method and its errors; a
//! hot-plug of a qcow2 linked clone made through the storage service; unplugs completed (USB)
//! and timed out (PCI, no guest to let go); CD-ROM change and eject; a saved state written and a
//! qemu started from it; a qemu killed behind the daemon's back; other domains refused.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{LIVENESS, TempDir, sim_net};
use dombus::rpc::ServeHandle;
use dombus::rpc::events::is_final;
use dombus::sim::{SimHypervisor, SimHypervisorHandle};
use dombus::{Address, Net, ResyncReason, Server, ServerConfig, Subscription, Update};
use dombus_services::device_model::{
    DeviceKind, DeviceModel as _, DeviceModelClient, DeviceModelConfig, DeviceModelError, DeviceModelEvent,
    DeviceModelEventKind as Kind, DiskBus, DiskSpec, ExitReason, InstanceInfo, Machine, Qemud, QemudConfig,
    RunState, Unplug, UsbKind, UsbSpec,
};
use dombus_services::network::netns::{Namespace, block_on_in};
use dombus_services::network::{
    Netlink, Network as _, NetworkClient, NetworkConfig, OperState, VifId, VifKind,
};
use dombus_services::storage::{Format, QemuImg, Size, Storage as _, StorageClient, StorageConfig};
use futures::StreamExt as _;

const TOOLSTACK: u16 = 0;
const STORAGE: u16 = 1;
const DM: u16 = 5;
const OTHER: u16 = 7;
const NETWORK: u16 = 4;
const GUEST: u32 = 3;

/// A simulated host: storage in domain 1, device models in domain 5.
struct Host {
    dir: TempDir,
    sock: PathBuf,
    /// Each domain's network (a simulated domain boots once).
    nets: Mutex<HashMap<u16, Net>>,
    _servers: Vec<(Server, ServeHandle)>,
    _hv: SimHypervisorHandle,
}

fn qemu_present(test: &str) -> bool {
    for tool in ["qemu-system-x86_64", "qemu-img"] {
        let found = std::process::Command::new(tool)
            .arg("--version")
            .stdout(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            common::missing_prerequisite(
                test,
                &format!("{tool} (apt-get install qemu-system-x86 qemu-utils)"),
            );
            return false;
        }
    }
    true
}

impl Host {
    async fn start(tag: &str, unplug_timeout: Duration) -> Host {
        Host::start_with(tag, unplug_timeout, None, |_| {}).await
    }

    /// With the network service `network` for NICs.
    async fn start_with(
        tag: &str,
        unplug_timeout: Duration,
        network: Option<Netlink>,
        configure: impl FnOnce(&mut QemudConfig),
    ) -> Host {
        let dir = TempDir::new(tag);
        let sock = dir.path("simxen.sock");
        let hv = SimHypervisor::spawn(&sock).unwrap();
        let images = dir.path("images");
        std::fs::create_dir_all(&images).unwrap();
        let storage_config =
            StorageConfig { toolstack_domains: vec![0, u32::from(DM)], ..StorageConfig::default() };
        let storage = QemuImg::with_config(images.clone(), "qemu-img".into(), storage_config).unwrap();
        let storage_server = Server::new(sim_net(&sock, STORAGE), ServerConfig::default());
        let h1 = storage_server.serve(&addr(STORAGE, 5100), storage.into_service()).await.unwrap();
        let dm_net = sim_net(&sock, DM);
        let mut config = QemudConfig::new(dir.path("dm"), images);
        configure(&mut config);
        config.storage = Some(addr(STORAGE, 5100));
        config.unplug_timeout = unplug_timeout;
        let mut servers = Vec::new();
        if let Some(n) = network {
            let server = Server::new(sim_net(&sock, NETWORK), ServerConfig::default());
            let h = server.serve(&addr(NETWORK, 5200), n.into_service()).await.unwrap();
            servers.push((server, h));
            config.network = Some(addr(NETWORK, 5200));
        }
        let qemud = Qemud::new(config, dm_net.clone()).unwrap();
        let dm_server = Server::new(dm_net.clone(), ServerConfig::default());
        let h2 = dm_server.serve(&addr(DM, 5300), qemud.into_service()).await.unwrap();
        servers.extend([(storage_server, h1), (dm_server, h2)]);
        let nets = Mutex::new(HashMap::from([(DM, dm_net)]));
        Host { dir, sock, nets, _servers: servers, _hv: hv }
    }

    /// Domain `domain`'s network.
    fn net(&self, domain: u16) -> Net {
        self.nets.lock().unwrap().entry(domain).or_insert_with(|| sim_net(&self.sock, domain)).clone()
    }

    fn dm(&self, domain: u16) -> DeviceModelClient {
        DeviceModelClient::new(self.net(domain), addr(DM, 5300))
    }

    fn storage(&self) -> StorageClient {
        StorageClient::new(self.net(TOOLSTACK), addr(STORAGE, 5100))
    }

    /// Creates the image `name` through the storage service (a linked clone of `backing`, if given).
    async fn image(&self, name: &str, backing: Option<&str>) {
        let s = self.storage();
        match backing {
            None => s
                .create(ctx(), name.into(), Size(16 << 20), Some(Format::Qcow2), None)
                .await
                .unwrap()
                .unwrap(),
            Some(b) => s.clone_disk(ctx(), b.into(), name.into(), true, None).await.unwrap().unwrap(),
        };
    }
}

fn addr(domain: u16, port: u32) -> Address {
    format!("xen:{domain}:{port}").parse().unwrap()
}

fn ctx() -> dombus::context::Context {
    let mut c = dombus::context::current();
    c.deadline = Instant::now() + LIVENESS;
    c
}

fn q35() -> DeviceModelConfig {
    DeviceModelConfig::new(GUEST, Machine::Q35, 64, 1)
}

fn usb(id: &str, kind: UsbKind) -> UsbSpec {
    UsbSpec { id: id.into(), kind, slot: None }
}

fn disk(id: &str, image: &str, bus: DiskBus) -> DiskSpec {
    DiskSpec { id: id.into(), image: image.into(), bus, read_only: false, slot: None }
}

/// A subscription to the device models' events (of `guest` only, if given), started: its
/// first update (the start's resync, with the snapshot) read, so that nothing after this is
/// missed; and the snapshot.
async fn subscribe(
    dm: &DeviceModelClient,
    guest: Option<u32>,
) -> (Subscription<DeviceModelEvent, Vec<InstanceInfo>>, Vec<InstanceInfo>) {
    let mut s = dm.events(guest).wait(Duration::from_millis(500));
    match tokio::time::timeout(LIVENESS, s.next()).await.unwrap().unwrap().unwrap() {
        Update::Resync { reason: ResyncReason::Start, snapshot: Some(snapshot), .. } => (s, snapshot),
        other => panic!("a subscription starts with a resync: {other:?}"),
    }
}

/// The next event of `s` (resyncs skipped), within the liveness limit.
async fn next(s: &mut Subscription<DeviceModelEvent, Vec<InstanceInfo>>) -> DeviceModelEvent {
    loop {
        match tokio::time::timeout(LIVENESS, s.next()).await.expect("an event in time") {
            Some(Ok(Update::Event { event, .. })) => return event,
            Some(Ok(Update::Resync { .. })) => {}
            Some(Err(e)) => assert!(!is_final(&e), "the subscription ended: {e}"),
            None => panic!("the subscription ended"),
        }
    }
}

/// Events of `s` up to the first that `want` accepts (which is returned).
async fn until(
    s: &mut Subscription<DeviceModelEvent, Vec<InstanceInfo>>,
    want: impl Fn(&Kind) -> bool,
) -> (Vec<Kind>, Kind) {
    let mut seen = Vec::new();
    loop {
        let e = next(s).await;
        assert_eq!(e.guest, GUEST);
        if want(&e.kind) {
            return (seen, e.kind);
        }
        seen.push(e.kind);
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_on_machine_none_and_its_errors() {
    if !qemu_present("lifecycle_on_machine_none_and_its_errors") {
        return;
    }
    let host = Host::start("dm-life", Duration::from_secs(2)).await;
    let dm = host.dm(TOOLSTACK);
    let (mut events, snapshot) = subscribe(&dm, Some(GUEST)).await;
    assert!(snapshot.is_empty());

    let none = DeviceModelConfig::new(GUEST, Machine::None, 32, 1);
    let info = dm.start(ctx(), none.clone()).await.unwrap().unwrap();
    assert_eq!(info.state, RunState::Running, "{info:?}");
    assert!(
        info.qemu.starts_with("7.") || info.qemu.starts_with("8.") || info.qemu.starts_with("9."),
        "{info:?}"
    );
    let pid = info.pid.unwrap();
    assert!(alive(pid));
    assert!(Path::new(&info.workdir).ends_with(format!("dom{GUEST}")), "{info:?}");
    assert_eq!(until(&mut events, |k| *k == Kind::Started).await.1, Kind::Started);

    // Pause and resume, as qemu's events report them.
    assert_eq!(dm.pause(ctx(), GUEST).await.unwrap().unwrap().state, RunState::Paused);
    until(&mut events, |k| *k == Kind::Stopped).await;
    assert_eq!(dm.status(ctx(), GUEST).await.unwrap().unwrap().state, RunState::Paused);
    assert_eq!(dm.resume(ctx(), GUEST).await.unwrap().unwrap().state, RunState::Running);
    until(&mut events, |k| *k == Kind::Resumed).await;
    assert_eq!(dm.list(ctx()).await.unwrap().unwrap().len(), 1);

    // Two starts of one guest at once: one starts, the other is refused; one qemu.
    let twice = DeviceModelConfig::new(8, Machine::None, 32, 1);
    let (a, b) = tokio::join!(dm.start(ctx(), twice.clone()), dm.start(ctx(), twice.clone()));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert!(a.is_ok() != b.is_ok(), "{a:?} {b:?}");
    assert!(matches!(
        a.as_ref().err().or(b.as_ref().err()),
        Some(DeviceModelError::AlreadyRunning { guest: 8 })
    ));
    assert_eq!(dm.list(ctx()).await.unwrap().unwrap().len(), 2);
    assert_eq!(dm.stop(ctx(), 8, None).await.unwrap().unwrap(), ExitReason::Quit);

    // Errors: a second start, a bad configuration, devices on a machine without buses, a
    // guest without a device model.
    let e = dm.start(ctx(), none.clone()).await.unwrap().unwrap_err();
    assert_eq!(e, DeviceModelError::AlreadyRunning { guest: GUEST });
    let e = dm.start(ctx(), DeviceModelConfig::new(9, Machine::None, 0, 1)).await.unwrap().unwrap_err();
    assert!(matches!(e, DeviceModelError::InvalidConfig(_)), "{e}");
    let e = dm
        .start(
            ctx(),
            DeviceModelConfig { cdrom: Some("x".into()), ..DeviceModelConfig::new(9, Machine::None, 32, 1) },
        )
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, DeviceModelError::Unsupported(_)), "{e}");
    let e = dm.usb_add(ctx(), GUEST, "tab".into(), UsbKind::Tablet).await.unwrap().unwrap_err();
    assert!(matches!(e, DeviceModelError::Unsupported(_)), "{e}");
    let e = dm.disk_add(ctx(), GUEST, disk("xvdb", "nothing", DiskBus::Virtio)).await.unwrap().unwrap_err();
    assert!(matches!(e, DeviceModelError::Unsupported(_)), "{e}");
    let e = dm.status(ctx(), 99).await.unwrap().unwrap_err();
    assert_eq!(e, DeviceModelError::NotFound { guest: 99 });
    let e = dm.disk_remove(ctx(), GUEST, "nothing".into()).await.unwrap().unwrap_err();
    assert!(matches!(e, DeviceModelError::DeviceNotFound { .. }), "{e}");

    // Stop: quit, the exit seen, the instance forgotten, its qemu gone.
    assert_eq!(dm.stop(ctx(), GUEST, None).await.unwrap().unwrap(), ExitReason::Quit);
    let (seen, kind) = until(&mut events, |k| matches!(k, Kind::Exited(_))).await;
    assert_eq!(kind, Kind::Exited(ExitReason::Quit));
    let shutdown = Kind::Shutdown { guest_initiated: false, reason: "host-qmp-quit".into() };
    assert!(seen.contains(&shutdown), "qemu's SHUTDOWN before its exit: {seen:?}");
    assert!(!alive(pid));
    assert_eq!(
        dm.status(ctx(), GUEST).await.unwrap().unwrap_err(),
        DeviceModelError::NotFound { guest: GUEST }
    );
    drop(host.dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disks_hot_plug_and_unplug_done_pending_and_timed_out() {
    if !qemu_present("disks_hot_plug_and_unplug_done_pending_and_timed_out") {
        return;
    }
    let host = Host::start("dm-disks", Duration::from_secs(2)).await;
    host.image("base", None).await;
    host.image("clone", Some("base")).await; // a linked clone: a backing chain of two
    host.image("boot", None).await;
    host.image("stick", None).await;
    let dm = host.dm(TOOLSTACK);
    let (mut events, _) = subscribe(&dm, None).await;
    let mut config = q35();
    config.disks.push(disk("xvda", "boot", DiskBus::Virtio));
    let info = dm.start(ctx(), config).await.unwrap().unwrap();
    assert_eq!(info.devices.len(), 1, "{info:?}");

    // Hot-add the linked clone: qemu reaches both layers through the descriptors it was given.
    let added = dm.disk_add(ctx(), GUEST, disk("xvdb", "clone", DiskBus::Virtio)).await.unwrap().unwrap();
    assert!(matches!(&added.kind, DeviceKind::Disk(d) if d.image == "clone"));
    let usb = dm.disk_add(ctx(), GUEST, disk("usbd", "stick", DiskBus::Usb)).await.unwrap().unwrap();
    assert_eq!(usb.id, "usbd");
    let ids: Vec<_> =
        dm.status(ctx(), GUEST).await.unwrap().unwrap().devices.into_iter().map(|d| d.id).collect();
    assert_eq!(ids, ["xvda", "xvdb", "usbd"]);

    // Errors of an add.
    let e = dm.disk_add(ctx(), GUEST, disk("xvdb", "stick", DiskBus::Virtio)).await.unwrap().unwrap_err();
    assert!(matches!(e, DeviceModelError::DeviceExists { .. }), "{e}");
    let e = dm.disk_add(ctx(), GUEST, disk("xvdc", "missing", DiskBus::Virtio)).await.unwrap().unwrap_err();
    assert!(matches!(&e, DeviceModelError::Image { image, .. } if image == "missing"), "{e}");
    let e = dm.disk_add(ctx(), GUEST, disk("Bad,id", "stick", DiskBus::Virtio)).await.unwrap().unwrap_err();
    assert!(matches!(e, DeviceModelError::InvalidConfig(_)), "{e}");
    for (slot, why) in [(0, "root port 0 is taken"), (24, "root port 24 does not exist")] {
        let spec = DiskSpec { slot: Some(slot), ..disk("xvdc", "stick", DiskBus::Virtio) };
        let e = dm.disk_add(ctx(), GUEST, spec).await.unwrap().unwrap_err();
        assert!(matches!(&e, DeviceModelError::InvalidConfig(m) if m.contains(why)), "{e}");
    }

    // A USB disk goes without the guest: done, the device deleted, its image let go (so it
    // can be used again at once).
    assert_eq!(dm.disk_remove(ctx(), GUEST, "usbd".into()).await.unwrap().unwrap(), Unplug::Done);
    until(&mut events, |k| *k == Kind::DeviceDeleted { id: "usbd".into() }).await;
    dm.disk_add(ctx(), GUEST, disk("usbe", "stick", DiskBus::Usb)).await.unwrap().unwrap();

    // A PCI disk needs the guest, and there is none: pending, then timed out; it stays.
    let Unplug::Pending { deadline } = dm.disk_remove(ctx(), GUEST, "xvdb".into()).await.unwrap().unwrap()
    else {
        panic!("a PCI unplug without a guest is pending")
    };
    let status = dm.status(ctx(), GUEST).await.unwrap().unwrap();
    let xvdb = status.devices.iter().find(|d| d.id == "xvdb").unwrap();
    assert_eq!(xvdb.unplug_deadline, Some(deadline));
    let e = dm.disk_remove(ctx(), GUEST, "xvdb".into()).await.unwrap().unwrap_err();
    assert!(matches!(e, DeviceModelError::UnplugPending { .. }), "{e}");
    let (_, kind) = until(&mut events, |k| matches!(k, Kind::UnplugTimedOut { .. })).await;
    assert_eq!(kind, Kind::UnplugTimedOut { id: "xvdb".into() });
    let status = dm.status(ctx(), GUEST).await.unwrap().unwrap();
    assert!(status.devices.iter().any(|d| d.id == "xvdb" && d.unplug_deadline.is_none()), "{status:?}");

    assert_eq!(dm.stop(ctx(), GUEST, None).await.unwrap().unwrap(), ExitReason::Quit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cdrom_and_usb_devices() {
    if !qemu_present("cdrom_and_usb_devices") {
        return;
    }
    let host = Host::start("dm-cd", Duration::from_secs(2)).await;
    host.image("iso1", None).await;
    host.image("iso2", None).await;
    let dm = host.dm(TOOLSTACK);
    let (mut events, _) = subscribe(&dm, Some(GUEST)).await;
    let mut config = q35();
    config.cdrom = Some("iso1".into());
    config.usb.push(usb("kbd", UsbKind::Keyboard));
    let info = dm.start(ctx(), config).await.unwrap().unwrap();
    assert_eq!(info.cdrom.as_deref(), Some("iso1"));

    let info = dm.cdrom_change(ctx(), GUEST, "iso2".into()).await.unwrap().unwrap();
    assert_eq!(info.cdrom.as_deref(), Some("iso2"));
    until(&mut events, |k| *k == Kind::MediumChanged { image: Some("iso2".into()) }).await;
    let info = dm.cdrom_eject(ctx(), GUEST).await.unwrap().unwrap();
    assert_eq!(info.cdrom, None);
    until(&mut events, |k| *k == Kind::MediumChanged { image: None }).await;
    // The medium taken out was let go: it goes in again.
    dm.cdrom_change(ctx(), GUEST, "iso1".into()).await.unwrap().unwrap();
    let e = dm.cdrom_change(ctx(), GUEST, "missing".into()).await.unwrap().unwrap_err();
    assert!(matches!(e, DeviceModelError::Image { .. }), "{e}");

    let tablet = dm.usb_add(ctx(), GUEST, "tab".into(), UsbKind::Tablet).await.unwrap().unwrap();
    assert!(
        matches!(&tablet.kind, DeviceKind::Usb(u) if u.kind == UsbKind::Tablet && u.slot == Some(2)),
        "{tablet:?}"
    );
    let e = dm.usb_add(ctx(), GUEST, "tab".into(), UsbKind::Mouse).await.unwrap().unwrap_err();
    assert!(matches!(e, DeviceModelError::DeviceExists { .. }), "{e}");
    assert_eq!(dm.usb_remove(ctx(), GUEST, "tab".into()).await.unwrap().unwrap(), Unplug::Done);
    until(&mut events, |k| *k == Kind::DeviceDeleted { id: "tab".into() }).await;
    let ids: Vec<_> =
        dm.status(ctx(), GUEST).await.unwrap().unwrap().devices.into_iter().map(|d| d.id).collect();
    assert_eq!(ids, ["kbd"]);
    assert_eq!(dm.stop(ctx(), GUEST, None).await.unwrap().unwrap(), ExitReason::Quit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saved_state_is_written_and_a_qemu_starts_from_it() {
    if !qemu_present("a_saved_state_is_written_and_a_qemu_starts_from_it") {
        return;
    }
    let host = Host::start("dm-save", Duration::from_secs(2)).await;
    host.image("root", None).await;
    let dm = host.dm(TOOLSTACK);
    host.image("data", None).await;
    let mut config = q35();
    config.disks.push(disk("xvda", "root", DiskBus::Virtio));
    config.usb.extend([usb("mouse", UsbKind::Mouse), usb("tab", UsbKind::Tablet)]);
    dm.start(ctx(), config).await.unwrap().unwrap();
    // Devices come and go: the keyboard takes the mouse's USB port, before the tablet's (a
    // restore that plugged them in the configuration's order would swap their ports, and qemu
    // would find no keyboard where the state has one).
    assert_eq!(dm.usb_remove(ctx(), GUEST, "mouse".into()).await.unwrap().unwrap(), Unplug::Done);
    dm.usb_add(ctx(), GUEST, "kbd".into(), UsbKind::Keyboard).await.unwrap().unwrap();
    dm.disk_add(ctx(), GUEST, disk("xvdb", "data", DiskBus::Virtio)).await.unwrap().unwrap();

    let path = host.dir.path("guest3.state");
    let saved = dm.save(ctx(), GUEST, path.display().to_string()).await.unwrap().unwrap();
    assert!(saved.bytes > 1000, "{saved:?}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), saved.bytes);
    assert_eq!(dm.status(ctx(), GUEST).await.unwrap().unwrap().state, RunState::Paused);
    // The configuration to restore with has the hot-plugged devices, each where it is.
    assert_eq!(saved.config.restore_from.as_deref(), Some(path.to_str().unwrap()));
    let disks: Vec<_> = saved.config.disks.iter().map(|d| (d.id.as_str(), d.slot)).collect();
    assert_eq!(disks, [("xvda", Some(0)), ("xvdb", Some(1))]);
    let usbs: Vec<_> = saved.config.usb.iter().map(|u| (u.id.as_str(), u.slot)).collect();
    assert_eq!(usbs, [("tab", Some(2)), ("kbd", Some(1))]);
    // A save into a directory that does not exist fails and leaves nothing.
    let e = dm
        .save(ctx(), GUEST, host.dir.path("no/such.state").display().to_string())
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, DeviceModelError::File { .. }), "{e}");
    dm.stop(ctx(), GUEST, None).await.unwrap().unwrap();

    // Started from it: the state loads (qemu refuses a state that does not match its devices).
    let info = dm.start(ctx(), saved.config.clone()).await.unwrap().unwrap();
    assert_eq!(info.state, RunState::Running, "{info:?}");
    let ids: Vec<_> = info.devices.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["xvda", "xvdb", "tab", "kbd"]);
    dm.stop(ctx(), GUEST, None).await.unwrap().unwrap();

    // A file that is not a saved state: the start fails with qemu's reason, no qemu is left.
    let junk = host.dir.path("junk.state");
    std::fs::write(&junk, b"not a migration stream").unwrap();
    let mut bad = saved.config.clone();
    bad.restore_from = Some(junk.display().to_string());
    let e = dm.start(ctx(), bad).await.unwrap().unwrap_err();
    assert!(matches!(e, DeviceModelError::Qemu { .. } | DeviceModelError::StartFailed(_)), "{e}");
    assert_eq!(dm.list(ctx()).await.unwrap().unwrap(), []);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_killed_behind_the_daemons_back_is_reported() {
    if !qemu_present("a_qemu_killed_behind_the_daemons_back_is_reported") {
        return;
    }
    let host = Host::start("dm-kill", Duration::from_secs(2)).await;
    let dm = host.dm(TOOLSTACK);
    let (mut events, _) = subscribe(&dm, Some(GUEST)).await;
    let info = dm.start(ctx(), DeviceModelConfig::new(GUEST, Machine::None, 32, 1)).await.unwrap().unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(info.pid.unwrap() as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    let (_, kind) = until(&mut events, |k| matches!(k, Kind::Exited(_))).await;
    assert!(matches!(&kind, Kind::Exited(ExitReason::Signalled { signal: 9, .. })), "{kind:?}");
    let status = dm.status(ctx(), GUEST).await.unwrap().unwrap();
    assert!(matches!(status.state, RunState::Exited(ExitReason::Signalled { signal: 9, .. })), "{status:?}");
    assert_eq!(status.pid, None);
    let e = dm.pause(ctx(), GUEST).await.unwrap().unwrap_err();
    assert!(matches!(e, DeviceModelError::Exited { .. }), "{e}");
    // A new start replaces the exited one; stop forgets it.
    dm.start(ctx(), DeviceModelConfig::new(GUEST, Machine::None, 32, 1)).await.unwrap().unwrap();
    assert_eq!(dm.stop(ctx(), GUEST, Some(5000)).await.unwrap().unwrap(), ExitReason::Quit);

    // A qemu that does not quit (stopped with SIGSTOP: it cannot answer) is killed at the
    // deadline, and said so.
    let info = dm.start(ctx(), DeviceModelConfig::new(GUEST, Machine::None, 32, 1)).await.unwrap().unwrap();
    let pid = info.pid.unwrap();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::Signal::STOP,
    )
    .unwrap();
    let t = Instant::now();
    assert_eq!(dm.stop(ctx(), GUEST, Some(300)).await.unwrap().unwrap(), ExitReason::KilledAfterDeadline);
    assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    assert!(!alive(pid));
    assert_eq!(
        dm.status(ctx(), GUEST).await.unwrap().unwrap_err(),
        DeviceModelError::NotFound { guest: GUEST }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_domains_are_refused() {
    if !qemu_present("other_domains_are_refused") {
        return;
    }
    let host = Host::start("dm-deny", Duration::from_secs(2)).await;
    let other = host.dm(OTHER);
    let e = other
        .start(ctx(), DeviceModelConfig::new(OTHER.into(), Machine::None, 32, 1))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(e, DeviceModelError::PermissionDenied { .. }), "{e}");
    let e = other.list(ctx()).await.unwrap().unwrap_err();
    assert!(matches!(e, DeviceModelError::PermissionDenied { .. }), "{e}");
    let mut events = other.events(None);
    match tokio::time::timeout(LIVENESS, events.next()).await.unwrap() {
        Some(Err(e)) => {
            assert!(is_final(&e), "{e:?}");
            let dombus::RpcError::Server(s) = e else { panic!("not the server's refusal: {e:?}") };
            assert_eq!(s.kind, std::io::ErrorKind::PermissionDenied, "{s:?}");
            assert!(s.detail.contains("domain 7 is not the toolstack"), "{s:?}");
        }
        other => panic!("the stream is refused: {other:?}"),
    }
}

/// A qemu that breaks QMP (here a fake one: a script speaking QMP on fd 3 that answers `stop`
/// with a line that is not JSON) is cut off: the connection dropped, the qemu killed, its exit
/// reported with the reason; the daemon goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qemu_that_breaks_qmp_is_cut_off() {
    let dir = TempDir::new("dm-fake-qemu");
    let fake = dir.path("fake-qemu");
    std::fs::write(
        &fake,
        r#"#!/bin/bash
# A qemu as a hostile guest may make it: QMP on fd 3, fine until `stop`.
printf '%s\n' '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": []}}' >&3
while IFS= read -r line <&3; do
    [[ $line =~ \"id\":\ *([0-9]+) ]] && id=${BASH_REMATCH[1]}
    if [[ $line == *'"stop"'* ]]; then
        printf 'this is not JSON\n' >&3
    else
        printf '{"return": {}, "id": %s}\n' "$id" >&3
    fi
done
"#,
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let host = Host::start_with("dm-fake", Duration::from_secs(2), None, |c| {
        c.qemu = fake.clone();
        c.sandbox = false; // bash is not what the sandbox lets a qemu run
    })
    .await;
    let dm = host.dm(TOOLSTACK);
    let (mut events, _) = subscribe(&dm, Some(GUEST)).await;
    let info = dm.start(ctx(), DeviceModelConfig::new(GUEST, Machine::None, 32, 1)).await.unwrap().unwrap();
    assert_eq!(info.qemu, "7.2.0 (fake)");
    let pid = info.pid.unwrap();
    let e = dm.pause(ctx(), GUEST).await.unwrap().unwrap_err();
    assert!(matches!(&e, DeviceModelError::Qemu { command, .. } if command == "stop"), "{e}");
    let (_, kind) = until(&mut events, |k| matches!(k, Kind::Exited(_))).await;
    let Kind::Exited(ExitReason::Killed { reason }) = kind else { panic!("{kind:?}") };
    assert!(reason.contains("QMP connection ended") && reason.contains("not JSON"), "{reason}");
    assert!(!alive(pid));
    let status = dm.status(ctx(), GUEST).await.unwrap().unwrap();
    assert!(matches!(status.state, RunState::Exited(ExitReason::Killed { .. })), "{status:?}");
    // The daemon goes on: the guest's model is started again (and, the fake ignoring `quit`,
    // killed at stop's deadline).
    dm.start(ctx(), DeviceModelConfig::new(GUEST, Machine::None, 32, 1)).await.unwrap().unwrap();
    assert_eq!(dm.stop(ctx(), GUEST, Some(300)).await.unwrap().unwrap(), ExitReason::KilledAfterDeadline);
    drop(dir);
}

/// The daemon killed with SIGKILL takes its qemus with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_killed_with_sigkill_leaves_no_qemu() {
    if !qemu_present("the_daemon_killed_with_sigkill_leaves_no_qemu") {
        return;
    }
    let dir = TempDir::new("dm-sigkill");
    let sock = dir.path("dm.sock");
    let mut daemon = tokio::process::Command::new(env!("CARGO_BIN_EXE_dombus-qemud"))
        .args(["--listen", &format!("unix:{}", sock.display()), "--dir"])
        .arg(dir.path("dm"))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let until = Instant::now() + LIVENESS;
    while !sock.exists() {
        assert!(Instant::now() < until, "the daemon did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let dm = DeviceModelClient::new(dombus::Net::new(), format!("unix:{}", sock.display()).parse().unwrap());
    let mut pids = Vec::new();
    for guest in [3, 4] {
        let info =
            dm.start(ctx(), DeviceModelConfig::new(guest, Machine::None, 32, 1)).await.unwrap().unwrap();
        pids.push(info.pid.unwrap());
    }
    assert!(pids.iter().all(|p| alive(*p)));
    daemon.start_kill().unwrap();
    daemon.wait().await.unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|p| alive(*p)) {
        assert!(Instant::now() < until, "qemus outlived their daemon: {pids:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A NIC is a tap vif of the network service's, opened by the daemon and handed to qemu: the
/// tap's carrier comes up when qemu holds it. Run in a network namespace of the test's own.
#[test]
fn a_nic_is_the_network_services_tap() {
    if !qemu_present("a_nic_is_the_network_services_tap") {
        return;
    }
    if let Err(e) = block_on_in(Namespace::New, || async {}) {
        common::missing_prerequisite(
            "a_nic_is_the_network_services_tap",
            &format!("cannot make a network namespace ({e}): run as root"),
        );
        return;
    }
    block_on_in(Namespace::New, || async {
        let dir = TempDir::new("dm-nic-netns");
        // The device-model domain asks the network service about vifs as the toolstack does.
        let config = NetworkConfig {
            guest_netns_dir: dir.path("netns"),
            toolstack_domains: vec![0, u32::from(DM)],
            ..NetworkConfig::default()
        };
        let network = Netlink::start(config).await.unwrap();
        let host = Host::start_with("dm-nic", Duration::from_secs(2), Some(network.clone()), |_| {}).await;
        let net = NetworkClient::new(host.net(TOOLSTACK), addr(NETWORK, 5200));
        let tap = VifId { domid: GUEST, devid: 0 };
        let veth = VifId { domid: GUEST, devid: 1 };
        let others = VifId { domid: 9, devid: 0 };
        net.vif_create(ctx(), tap, Some(VifKind::Tap), None, None, None).await.unwrap().unwrap();
        net.vif_create(ctx(), veth, None, None, None, None).await.unwrap().unwrap();
        net.vif_create(ctx(), others, Some(VifKind::Tap), None, None, None).await.unwrap().unwrap();
        let before = net.vif_info(ctx(), tap).await.unwrap().unwrap();
        assert_ne!(before.state, OperState::Up, "{before:?}");

        let dm = host.dm(TOOLSTACK);
        let nic = |vif: VifId| dombus_services::device_model::NicSpec {
            id: "nic0".into(),
            vif: vif.to_string(),
            model: Default::default(),
            slot: None,
        };
        for (bad, why) in [(veth, "not a tap"), (others, "guest 9's")] {
            let mut config = q35();
            config.nics.push(nic(bad));
            let e = dm.start(ctx(), config).await.unwrap().unwrap_err();
            assert!(matches!(&e, DeviceModelError::Vif { reason, .. } if reason.contains(why)), "{e}");
        }
        let mut config = q35();
        config.nics.push(nic(tap));
        let info = dm.start(ctx(), config).await.unwrap().unwrap();
        assert!(matches!(&info.devices[0].kind, DeviceKind::Nic(n) if n.vif == "3.0"), "{info:?}");
        let until = Instant::now() + LIVENESS;
        loop {
            let v = net.vif_info(ctx(), tap).await.unwrap().unwrap();
            if v.state == OperState::Up {
                break;
            }
            assert!(Instant::now() < until, "the tap's carrier never came up: {v:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        dm.stop(ctx(), GUEST, None).await.unwrap().unwrap();
        for v in [tap, veth, others] {
            net.vif_delete(ctx(), v).await.unwrap().unwrap();
        }
        network.shut_down().await;
        drop(dir);
    })
    .unwrap();
}
