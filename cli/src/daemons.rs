//! The processes of a simulated host, run by `dombus host up` as `dombus daemon …` (one binary:
//! `cargo run --bin dombus` builds everything the host needs).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use dombus::rpc::ScrapeEndpoint;
use dombus::rpc::cli::NetArgs;
use dombus::{Address, Server, ServerConfig};
use dombus_services::ports;
use dombus_services::registry::{HostRegistry, Registry};
use dombus_services::storage::{DaemonArgs, run_daemon};

/// `dombus daemon …`.
#[derive(Debug, Subcommand)]
pub enum Daemon {
    /// The simulated hypervisor (what `dombus-simxen` runs).
    Hypervisor {
        /// Its socket.
        #[arg(long)]
        socket: PathBuf,
    },
    /// The backend domain: the host registry on xen:backend:1.
    Backend(BackendArgs),
    /// A storage domain (what `dombus-storaged` runs).
    Storage(DaemonArgs),
    /// A domain's agent (what `dombusd` runs).
    Agent(dombus_agent::daemon::AgentArgs),
}

/// The backend domain's options.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Also serve the registry's metrics for a Prometheus scrape, as `GET /metrics` over HTTP
    /// on this TCP address (e.g. 127.0.0.1:9465; keep it loopback or host-local).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
    /// How to reach xen: addresses.
    #[command(flatten)]
    net: NetArgs,
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs a daemon until SIGTERM or SIGINT.
pub fn run(daemon: Daemon) -> anyhow::Result<()> {
    init_logs();
    match daemon {
        Daemon::Hypervisor { socket } => hypervisor(socket),
        Daemon::Backend(args) => runtime()?.block_on(backend(args)),
        Daemon::Storage(args) => runtime()?.block_on(run_daemon(args)),
        Daemon::Agent(args) => dombus_agent::daemon::runtime()?.block_on(dombus_agent::daemon::run(args)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")
}

fn hypervisor(socket: PathBuf) -> anyhow::Result<()> {
    let hv = dombus::sim::SimHypervisor::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "simulated hypervisor ready");
    hv.run_until_signalled().context("simulated hypervisor failed")?;
    tracing::info!("stopped");
    Ok(())
}

async fn backend(args: BackendArgs) -> anyhow::Result<()> {
    let net = args.net.net().context("transports")?;
    let addr: Address = format!("xen:backend:{}", ports::REGISTRY).parse()?;
    let server = Server::new(net, ServerConfig::default());
    let handle =
        server.serve(&addr, HostRegistry::default().into_service()).await.context("serving the registry")?;
    tracing::info!(addr = %handle.addr(), "host registry ready");
    let scrape = ScrapeEndpoint::bind_if(args.metrics_listen, server.metrics()).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
    handle.stop().await;
    if let Some(scrape) = scrape {
        scrape.stop().await;
    }
    tracing::info!("stopped");
    Ok(())
}
