//! `dombus-storaged`: hosts the storage service of a storage domain (and, when asked, its
//! metrics for a Prometheus scrape).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use dombus::rpc::ScrapeEndpoint;
use dombus::rpc::cli::NetArgs;
use dombus::{Address, Server, ServerConfig};

use super::{DEFAULT_MAX_IMAGES, DEFAULT_QUOTA_IMAGES, QemuImg, Size, Storage, StorageConfig};

/// How the storage daemon runs.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// The directory holding the images (created if missing); callers' names resolve inside it.
    #[arg(long, value_name = "DIR")]
    pub root: PathBuf,
    /// Where to serve (repeatable): xen:<this domain>:5100 between domains, unix:PATH locally.
    #[arg(long = "listen", value_name = "ADDR", required = true)]
    pub listen: Vec<Address>,
    /// The qemu-img to run.
    #[arg(long, value_name = "PATH", default_value = "qemu-img")]
    pub qemu_img: PathBuf,
    /// Most images in the root (a create or clone past it is refused).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_IMAGES)]
    pub max_images: usize,
    /// Most bytes the images' virtual sizes may add up to (`500G`, `2T`, bytes); default: four
    /// times the size of the root's filesystem.
    #[arg(long, value_name = "SIZE")]
    pub max_virtual_bytes: Option<Size>,
    /// A domain that is the toolstack (repeatable; default 0): it sees and acts on every image,
    /// and the images it makes have no quota. Callers over Unix or TCP are the toolstack too.
    #[arg(long = "toolstack-domain", value_name = "N", default_values_t = [0u32])]
    pub toolstack_domain: Vec<u32>,
    /// Most images one domain may own (a create or clone past it is refused).
    #[arg(long, value_name = "N", default_value_t = DEFAULT_QUOTA_IMAGES)]
    pub quota_images: usize,
    /// Most bytes the virtual sizes of one domain's images may add up to (`100G`, `1T`, bytes).
    #[arg(long, value_name = "SIZE", default_value = "1T")]
    pub quota_bytes: Size,
    /// Run qemu-img WITHOUT its Landlock sandbox: it can then read and write every file this
    /// daemon can, on behalf of images guests write. Only for a kernel without Landlock.
    #[arg(long)]
    pub no_sandbox: bool,
    /// A path (and what is beneath it) qemu-img may also read and execute in its sandbox
    /// (repeatable; for a wrapper script around qemu-img).
    #[arg(long, value_name = "PATH")]
    pub sandbox_read: Vec<PathBuf>,
    /// A path (and what is beneath it) qemu-img may also write in its sandbox (repeatable; for
    /// a wrapper script's state files).
    #[arg(long, value_name = "PATH")]
    pub sandbox_write: Vec<PathBuf>,
    /// Also serve the service's metrics for a Prometheus scrape, as `GET /metrics` over HTTP on
    /// this TCP address (e.g. 127.0.0.1:9464; keep it loopback or host-local).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
    /// How to reach xen: addresses.
    #[command(flatten)]
    pub net: NetArgs,
}

impl DaemonArgs {
    /// The service's configuration these arguments ask for.
    pub fn config(&self) -> StorageConfig {
        StorageConfig {
            max_images: self.max_images,
            max_virtual_bytes: self.max_virtual_bytes.map(Size::bytes),
            sandbox: !self.no_sandbox,
            sandbox_read: self.sandbox_read.clone(),
            sandbox_write: self.sandbox_write.clone(),
            toolstack_domains: self.toolstack_domain.clone(),
            quota_images: self.quota_images,
            quota_bytes: self.quota_bytes.bytes(),
        }
    }
}

/// Serves the storage service on every `--listen` address until SIGTERM or SIGINT, then stops
/// accepting, drops the connections and returns.
pub async fn run_daemon(args: DaemonArgs) -> anyhow::Result<()> {
    let config = args.config();
    let storage = QemuImg::with_config(args.root.clone(), args.qemu_img.clone(), config)
        .with_context(|| format!("storage root {}", args.root.display()))?;
    let net = args.net.net().context("transports")?;
    let server = Server::new(net, ServerConfig::default());
    let scrape = ScrapeEndpoint::bind_if(args.metrics_listen, server.metrics()).await?;
    let root = args.root.display().to_string();
    let served = crate::serve_until_stopped(&server, &args.listen, storage.into_service(), |h| {
        tracing::info!(addr = %h.addr(), %root, "storage service ready");
    })
    .await;
    if let Some(scrape) = scrape {
        scrape.stop().await;
    }
    tracing::info!("stopped");
    served
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: DaemonArgs,
    }

    fn config(args: &[&str]) -> StorageConfig {
        let base = ["dombus-storaged", "--root", "/srv/images", "--listen", "unix:/run/s.sock"];
        Cli::try_parse_from(base.iter().chain(args)).unwrap().args.config()
    }

    /// The defaults are `StorageConfig`'s; the owner options reach the configuration.
    #[test]
    fn owner_options_reach_the_configuration() {
        assert_eq!(config(&[]), StorageConfig::default());
        let c = config(&[
            "--toolstack-domain",
            "0",
            "--toolstack-domain",
            "3",
            "--quota-images",
            "5",
            "--quota-bytes",
            "10G",
        ]);
        assert_eq!((c.toolstack_domains, c.quota_images, c.quota_bytes), (vec![0, 3], 5, 10 << 30));
        assert_eq!(config(&["--toolstack-domain", "4"]).toolstack_domains, [4]);
    }
}
