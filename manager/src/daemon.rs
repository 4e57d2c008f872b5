//! `dombus-managerd`: the backend domain's daemon (`dombus daemon backend` in the `dombus` tool)
//! — its agent, the connection manager on port 2 for the other domains' agents, and the admin
//! service `policy` on `xen:backend:1` and, for the domain's own processes, a Unix socket.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use dombus::rpc::ScrapeEndpoint;
use dombus::transport::types::DomId;
use dombus::{Address, Server, ServerConfig};
use dombus_agent::attach::{Attach, Hypervisor};

use crate::{Manager, ManagerConfig, PolicyAdmin};

/// The port of the admin service `policy` in the backend domain (`xen:backend:1`).
pub const ADMIN_PORT: u32 = 1;

/// The backend domain's options.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Attach to the simulated hypervisor listening on SOCKET.
    #[arg(long, value_name = "SOCKET", conflicts_with = "xen")]
    pub sim: Option<PathBuf>,
    /// Attach to real Xen (/dev/xen/*, xenstored).
    #[arg(long)]
    pub xen: bool,
    /// The backend domain's id on the simulated hypervisor.
    #[arg(long, value_name = "DOMID", default_value_t = DomId::DOM0)]
    pub domid: DomId,
    /// Be the agent of the domain's other processes (the toolstack's, in dom0) on this socket.
    #[arg(long, value_name = "PATH")]
    pub serve_agent: Option<PathBuf>,
    /// The policy directory (`*.policy`, read in name order).
    #[arg(long, value_name = "DIR")]
    pub policy_dir: PathBuf,
    /// Where the manager keeps its labels and its audit trail.
    #[arg(long, value_name = "DIR")]
    pub state_dir: PathBuf,
    /// Also serve the admin service on this Unix socket (for the domain's own processes).
    #[arg(long, value_name = "PATH")]
    pub admin_socket: Option<PathBuf>,
    /// A toolstack domain (repeatable) [default: 0]
    #[arg(long = "toolstack-domain", value_name = "DOMID")]
    pub toolstack: Vec<DomId>,
    /// Also serve the admin service's metrics for a Prometheus scrape, as `GET /metrics` over
    /// HTTP on this TCP address (e.g. 127.0.0.1:9465; keep it loopback or host-local).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Runs the backend domain's daemon until SIGTERM or SIGINT.
pub async fn run(args: BackendArgs) -> anyhow::Result<()> {
    let hypervisor = match (&args.sim, args.xen) {
        (Some(s), _) => Hypervisor::Sim(s.clone()),
        (None, true) => Hypervisor::Xen,
        (None, false) => anyhow::bail!("which hypervisor? give --sim SOCKET or --xen"),
    };
    let (sockets, ops) = Attach::managed(hypervisor, args.domid, args.domid)
        .start_backend()
        .context("attaching as the backend domain")?;
    let mut cfg = ManagerConfig::new(&args.policy_dir, &args.state_dir);
    if !args.toolstack.is_empty() {
        cfg.toolstack = args.toolstack.clone();
    }
    let manager = Manager::start(sockets, ops, cfg).context("starting the connection manager")?;
    let own = manager.sockets();
    let serving = match &args.serve_agent {
        Some(path) => {
            Some(dombus_agent::Agent::serve(own.clone(), dombus_agent::AgentConfig::new(path.clone()))?)
        }
        None => None,
    };
    let server = Server::new(dombus::Net::new().with_domain(own, serving), ServerConfig::default());
    let admin = manager.admin();
    let addr: Address = format!("xen:backend:{}", ADMIN_PORT).parse()?;
    let handle =
        server.serve(&addr, admin.clone().into_service()).await.context("serving the admin service")?;
    let local = match &args.admin_socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let addr: Address = format!("unix:{}", path.display()).parse()?;
            Some(
                server
                    .serve(&addr, admin.into_service())
                    .await
                    .context("serving the admin service locally")?,
            )
        }
        None => None,
    };
    tracing::info!(addr = %handle.addr(), local = ?args.admin_socket, "connection manager's admin service ready");
    let scrape = ScrapeEndpoint::bind_if(args.metrics_listen, server.metrics()).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
    handle.stop().await;
    if let Some(local) = local {
        local.stop().await;
    }
    drop(manager);
    if let Some(scrape) = scrape {
        scrape.stop().await;
    }
    tracing::info!("stopped");
    Ok(())
}
