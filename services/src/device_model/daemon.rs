//! `dombus-qemud`: hosts the device-model service of a device-model domain.
//!
//! Each guest's qemu works in `<dir>/dom<guest>`; disks come from the storage service (named by
//! `--storage`, its images seen at `--images`), NICs from the network service's taps (named by
//! `--network`; the daemon must be in the network namespace the taps are in: `--netns`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use dombus::rpc::cli::NetArgs;
use dombus::{Address, Server, ServerConfig};

use super::service::DEFAULT_UNPLUG_TIMEOUT;
use super::{DeviceModel as _, Qemud, QemudConfig};

/// How the device-model daemon runs.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Where to serve (repeatable): xen:<this domain>:5300 between domains, unix:PATH locally.
    #[arg(long = "listen", value_name = "ADDR", required = true)]
    pub listen: Vec<Address>,
    /// Where each guest's qemu gets its working directory (`DIR/dom<guest>`).
    #[arg(long, value_name = "DIR", default_value = "/run/dombus/qemu")]
    pub dir: PathBuf,
    /// The storage service's image directory, as this domain sees it.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/dombus/images")]
    pub images: PathBuf,
    /// The storage service (disks are its images).
    #[arg(long, value_name = "ADDR")]
    pub storage: Option<Address>,
    /// The network service (NICs are its tap vifs).
    #[arg(long, value_name = "ADDR")]
    pub network: Option<Address>,
    /// Join this network namespace at start (the network domain's, where its taps are).
    #[arg(long, value_name = "PATH")]
    pub netns: Option<PathBuf>,
    /// The qemu program.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
    /// qemu's accelerator.
    #[arg(long, value_name = "NAME", default_value = "tcg")]
    pub accel: String,
    /// Run qemu without its Landlock sandbox (where the kernel has no Landlock).
    #[arg(long)]
    pub no_sandbox: bool,
    /// How long a removal that needs the guest waits for it, seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_UNPLUG_TIMEOUT.as_secs())]
    pub unplug_timeout: u64,
    /// A domain that is the toolstack (repeatable; default 0): the only domains whose calls may
    /// manage device models. Callers over Unix or TCP are the toolstack too.
    #[arg(long = "toolstack-domain", value_name = "N", default_values_t = [0u32])]
    pub toolstack_domain: Vec<u32>,
    /// How to reach xen: addresses.
    #[command(flatten)]
    pub net: NetArgs,
}

impl DaemonArgs {
    /// The service's configuration these arguments ask for.
    pub fn config(&self) -> QemudConfig {
        QemudConfig {
            qemu: self.qemu.clone(),
            accel: self.accel.clone(),
            dir: self.dir.clone(),
            images: self.images.clone(),
            storage: self.storage.clone(),
            network: self.network.clone(),
            toolstack_domains: self.toolstack_domain.clone(),
            sandbox: !self.no_sandbox,
            unplug_timeout: Duration::from_secs(self.unplug_timeout),
        }
    }
}

/// Joins `--netns` if given. Call it before any runtime starts, so that every thread of the
/// daemon (and every qemu) is in that namespace.
pub fn enter_namespace(args: &DaemonArgs) -> anyhow::Result<()> {
    if let Some(path) = &args.netns {
        crate::network::netns::enter(path)
            .with_context(|| format!("joining the network namespace {}", path.display()))?;
    }
    Ok(())
}

/// Serves the device-model service on every `--listen` address until SIGTERM or SIGINT, then
/// stops every qemu (quit, then a kill at 5 s) and returns.
pub async fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let net = args.net.net().context("transports")?;
    let qemud = Qemud::new(args.config(), net.clone()).context("starting the device-model service")?;
    let server = Server::new(net, ServerConfig::default());
    let dir = args.dir.display().to_string();
    let served = crate::serve_until_stopped(&server, &args.listen, qemud.clone().into_service(), |h| {
        tracing::info!(addr = %h.addr(), %dir, "device-model service ready");
    })
    .await;
    qemud.shut_down(Duration::from_secs(5)).await;
    tracing::info!("stopped");
    served
}
