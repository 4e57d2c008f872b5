//! The demo's device-model step: the toolstack starts a qemu device model for the guest with a
//! disk from the storage domain and a NIC from the network domain, hot-plugs a second disk and a
//! USB tablet, saves the model's state, starts a new qemu from it, and stops it — with the
//! device model's events as they come.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dombus::Update;
use dombus_services::device_model::{
    DeviceKind, DeviceModelClient, DeviceModelConfig, DeviceModelError, DeviceModelEvent,
    DeviceModelEventKind as Kind, DiskBus, DiskSpec, InstanceInfo, Machine, NicSpec, Unplug, UsbKind,
};
use dombus_services::network::{NetworkClient, VifId, VifKind};
use dombus_services::storage::{Format, Size, StorageClient};
use futures::StreamExt as _;

use crate::host::{self, Host, context};

/// A device-model event, in a few words.
fn event(e: &DeviceModelEvent) -> String {
    match &e.kind {
        Kind::Started => "started".into(),
        Kind::Stopped => "vCPUs stopped".into(),
        Kind::Resumed => "vCPUs resumed".into(),
        Kind::Shutdown { reason, .. } => format!("shutdown ({reason})"),
        Kind::DeviceDeleted { id } => format!("device {id} deleted"),
        Kind::UnplugTimedOut { id } => format!("the guest did not let {id} go in time"),
        Kind::BlockIoError { device, operation, reason, .. } => {
            format!("{operation} error on {device}: {reason}")
        }
        Kind::MediumChanged { image } => format!("CD-ROM: {}", image.as_deref().unwrap_or("ejected")),
        Kind::Exited(why) => format!("qemu {why}"),
    }
}

fn refused<T>(what: &str, r: Result<T, DeviceModelError>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("{what}: the device-model domain refused: {e}"))
}

fn devices(i: &InstanceInfo) -> String {
    let all: Vec<String> = i
        .devices
        .iter()
        .map(|d| match &d.kind {
            DeviceKind::Disk(disk) => format!("{} (disk {})", d.id, disk.image),
            DeviceKind::Nic(nic) => format!("{} (NIC on vif {})", d.id, nic.vif),
            DeviceKind::Usb(usb) => format!("{} ({})", d.id, usb.kind.driver()),
        })
        .collect();
    all.join(", ")
}

/// Step 7: the device-model domain, when the host has one.
pub async fn run(host: &Host) -> anyhow::Result<serde_json::Value> {
    let Some(addr) = host.manifest.service_addr("device-model") else {
        println!(
            "\n7. The device-model domain: not started on this host (qemu-system-x86_64 is not installed)"
        );
        return Ok(serde_json::Value::Null);
    };
    let net = host.net.clone().context("the host has no toolstack connection")?;
    println!("\n7. The toolstack calls the device-model domain (domain {}) at {addr}", host::DEVICE_MODEL);
    let dm = DeviceModelClient::connect(net.clone(), addr.clone())
        .await
        .context("connecting to the device-model service")?;
    let d = Duration::from_secs(60);
    let guest = host::GUEST.0 as u32;

    // The guest's disks, made in the storage domain; its NIC, a tap of the network domain's.
    let storage_addr = host.manifest.service_addr("storage").context("the host has no storage domain")?;
    let storage = StorageClient::new(net.clone(), storage_addr);
    for name in ["guest1-root", "guest1-data"] {
        storage
            .create(context(d), name.into(), Size(64 << 20), Some(Format::Qcow2), None)
            .await?
            .map_err(|e| anyhow::anyhow!("creating {name}: {e}"))?;
    }
    println!("  storage: create(\"guest1-root\"), create(\"guest1-data\")  ok: qcow2, 64 MiB each");
    let mut config = DeviceModelConfig::new(guest, Machine::Q35, 128, 1);
    config.disks.push(DiskSpec {
        id: "xvda".into(),
        image: "guest1-root".into(),
        bus: DiskBus::Virtio,
        read_only: false,
        slot: None,
    });
    let vif = VifId { domid: guest, devid: 1 };
    let network = host.manifest.service_addr("network").map(|a| NetworkClient::new(net.clone(), a));
    if let Some(network) = &network {
        let v = network
            .vif_create(context(d), vif, Some(VifKind::Tap), None, None, None)
            .await?
            .map_err(|e| anyhow::anyhow!("vif_create: {e}"))?;
        println!(
            "  network: vif_create({vif}, tap)  ok: {} ({})",
            v.name,
            v.mac.map(|m| m.to_string()).unwrap_or_default()
        );
        config.nics.push(NicSpec {
            id: "nic0".into(),
            vif: vif.to_string(),
            model: Default::default(),
            slot: None,
        });
    }

    let mut events = dm.events(Some(guest)).wait(Duration::from_secs(2));
    match tokio::time::timeout(d, events.next()).await {
        Ok(Some(Ok(Update::Resync { .. }))) => {}
        other => bail!("the device-model events subscription did not start: {other:?}"),
    }
    let (tx, mut seen) = tokio::sync::mpsc::unbounded_channel();
    let watcher = tokio::spawn(async move {
        while let Some(u) = events.next().await {
            if let Ok(Update::Event { event: e, .. }) = u {
                println!("    event: {}", event(&e));
                if tx.send(e.kind).is_err() {
                    return;
                }
            }
        }
    });

    let t = Instant::now();
    let info = refused("start", dm.start(context(d), config).await?)?;
    let started_ms = t.elapsed().as_secs_f64() * 1e3;
    println!(
        "  start(guest {guest}, q35, 128 MiB)  ok in {started_ms:.0} ms: qemu {} pid {}, {}; devices {}",
        info.qemu,
        info.pid.unwrap_or(0),
        info.state,
        devices(&info)
    );
    let t = Instant::now();
    let added = refused(
        "disk_add",
        dm.disk_add(
            context(d),
            guest,
            DiskSpec {
                id: "xvdb".into(),
                image: "guest1-data".into(),
                bus: DiskBus::Virtio,
                read_only: false,
                slot: None,
            },
        )
        .await?,
    )?;
    println!(
        "  disk_add(xvdb = \"guest1-data\")  ok in {:.1} ms: {} hot-plugged",
        t.elapsed().as_secs_f64() * 1e3,
        added.id
    );
    refused("usb_add", dm.usb_add(context(d), guest, "tablet".into(), UsbKind::Tablet).await?)?;
    let r = refused("usb_remove", dm.usb_remove(context(d), guest, "tablet".into()).await?)?;
    println!("  usb_add(tablet), usb_remove(tablet)  ok: {r:?}");
    if r != Unplug::Done {
        bail!("a USB device's removal waited for a guest");
    }
    let path = host.state.0.join("guest1.dm-state");
    let t = Instant::now();
    let saved = refused("save", dm.save(context(d), guest, path.display().to_string()).await?)?;
    println!(
        "  save(guest {guest}, {})  ok in {:.0} ms: {} bytes of device state; the model stays paused",
        path.display(),
        t.elapsed().as_secs_f64() * 1e3,
        saved.bytes
    );
    refused("stop", dm.stop(context(d), guest, None).await?)?;
    let t = Instant::now();
    let info = refused("start", dm.start(context(d), saved.config.clone()).await?)?;
    println!(
        "  start(from the saved state)  ok in {:.0} ms: {}; devices {}",
        t.elapsed().as_secs_f64() * 1e3,
        info.state,
        devices(&info)
    );
    let why = refused("stop", dm.stop(context(d), guest, None).await?)?;
    println!("  stop(guest {guest})  ok: {why}");

    // Every event of the calls, in order: the last (the exit) is on its way, if not printed yet.
    let mut kinds = Vec::new();
    let until = tokio::time::Instant::now() + Duration::from_secs(10);
    while kinds.iter().filter(|k| matches!(k, Kind::Exited(_))).count() < 2 {
        match tokio::time::timeout_at(until, seen.recv()).await {
            Ok(Some(k)) => kinds.push(k),
            _ => bail!("the device model's events did not all arrive within 10 s: {kinds:?}"),
        }
    }
    watcher.abort();
    if !kinds.contains(&Kind::DeviceDeleted { id: "tablet".into() }) || !kinds.contains(&Kind::Stopped) {
        bail!("the events missed the tablet's removal or the save's stop: {kinds:?}");
    }
    if let Some(network) = &network {
        network.vif_delete(context(d), vif).await?.map_err(|e| anyhow::anyhow!("vif_delete: {e}"))?;
    }
    Ok(serde_json::json!({
        "start_ms": started_ms,
        "saved_bytes": saved.bytes,
        "events": kinds.len(),
    }))
}
