//! dombus services: the traits service domains offer the toolstack, their implementations on
//! real tools, and the daemons hosting them.
//!
//! * [`storage`]: disk images on `qemu-img` (`dombus-storaged`).
//! * [`network`]: bridges and vifs on netlink (`dombus-netd`).
//! * [`device_model`]: one qemu per guest, over QMP (`dombus-qemud`).
//!
//! A storage domain serves its images, and the toolstack calls it through the generated client:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use dombus::{Net, Server, ServerConfig, context::current};
//! use dombus_services::storage::{QemuImg, Size, Storage, StorageClient};
//! // In the storage domain (here over Unix; `xen:self:5100` in a domain).
//! let images = QemuImg::new("/var/lib/images".into(), "/usr/bin/qemu-img".into())?;
//! let addr: dombus::Address = "unix:/run/dombus/storage.sock".parse()?;
//! Server::new(Net::new(), ServerConfig::default()).serve(&addr, images.into_service()).await?;
//! // In the toolstack.
//! let storage = StorageClient::connect(Net::new(), addr).await?;
//! let disk = storage.create(current(), "disk0".into(), Size(10 << 30), None, None).await??;
//! println!("{} {:?}", disk.name, disk.format);
//! # Ok(()) }
//! ```

pub mod device_model;
pub mod network;
mod sandbox;
pub mod storage;

/// Serves `service` on every address of `listen` (`ready` says so for each), until SIGTERM or
/// SIGINT; then stops accepting and drops the connections: a daemon's life.
pub(crate) async fn serve_until_stopped(
    server: &dombus::Server,
    listen: &[dombus::Address],
    service: dombus::rpc::Service,
    ready: impl Fn(&dombus::rpc::ServeHandle),
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let mut handles = Vec::new();
    for addr in listen {
        let handle =
            server.serve(addr, service.clone()).await.with_context(|| format!("serving on {addr}"))?;
        ready(&handle);
        handles.push(handle);
    }
    stop_signal().await?;
    for h in handles {
        h.stop().await;
    }
    Ok(())
}

/// Waits for SIGTERM or SIGINT (a daemon's stop), and says which came.
async fn stop_signal() -> std::io::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
    Ok(())
}

/// Well-known virtual-socket ports of the services in a service domain (`xen:<domid>:<port>`).
pub mod ports {
    /// The storage service.
    pub const STORAGE: u32 = 5100;
    /// The network service.
    pub const NETWORK: u32 = 5200;
    /// The device-model service.
    pub const DEVICE_MODEL: u32 = 5300;
    /// The connection manager's admin service `policy`, in the backend domain
    /// (`xen:backend:1`; a privileged port). The agents reach the manager on port 2.
    pub const POLICY: u32 = 1;
}
