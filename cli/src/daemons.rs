//! The processes of a simulated host, run by `dombus host up` as `dombus daemon …` (one binary:
//! `cargo run --bin dombus` builds everything the host needs).

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use dombus::rpc::ScrapeEndpoint;
use dombus::{Address, Server, ServerConfig};
use dombus_services::ports;
use dombus::transport::types::DomId;
use dombus_agent::attach::{Attach, Hypervisor};
use dombus_manager::{Manager, ManagerConfig, PolicyAdmin};
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
    /// The backend domain: the connection manager (agents on xen:backend:2, its admin service
    /// `policy` on xen:backend:1 and a local socket), and the domain's agent.
    Backend(BackendArgs),
    /// A storage domain (what `dombus-storaged` runs).
    Storage(DaemonArgs),
    /// A domain's agent (what `dombusd` runs).
    Agent(dombus_agent::daemon::AgentArgs),
}

/// The backend domain's options.
#[derive(Debug, Args)]
pub struct BackendArgs {
    /// Attach to the simulated hypervisor listening on SOCKET.
    #[arg(long, value_name = "SOCKET", conflicts_with = "xen")]
    sim: Option<PathBuf>,
    /// Attach to real Xen (/dev/xen/*, xenstored).
    #[arg(long)]
    xen: bool,
    /// The backend domain's id on the simulated hypervisor.
    #[arg(long, value_name = "DOMID", default_value_t = DomId::DOM0)]
    domid: DomId,
    /// Be the agent of the domain's other processes (the toolstack's, in dom0) on this socket.
    #[arg(long, value_name = "PATH")]
    serve_agent: Option<PathBuf>,
    /// The policy directory (`*.policy`, read in name order).
    #[arg(long, value_name = "DIR")]
    policy_dir: PathBuf,
    /// Where the manager keeps its labels and its audit trail.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Also serve the admin service on this Unix socket (for the domain's own processes).
    #[arg(long, value_name = "PATH")]
    admin_socket: Option<PathBuf>,
    /// A toolstack domain (repeatable) [default: 0]
    #[arg(long = "toolstack-domain", value_name = "DOMID")]
    toolstack: Vec<DomId>,
    /// Also serve the admin service's metrics for a Prometheus scrape, as `GET /metrics` over
    /// HTTP on this TCP address (e.g. 127.0.0.1:9465; keep it loopback or host-local).
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<SocketAddr>,
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
    let hypervisor = match (&args.sim, args.xen) {
        (Some(s), _) => Hypervisor::Sim(s.clone()),
        (None, true) => Hypervisor::Xen,
        (None, false) => anyhow::bail!("which hypervisor? give --sim SOCKET or --xen"),
    };
    let (sockets, ops) =
        Attach::managed(hypervisor, args.domid, args.domid).start_backend().context("attaching as the backend domain")?;
    let mut cfg = ManagerConfig::new(&args.policy_dir, &args.state_dir);
    if !args.toolstack.is_empty() {
        cfg.toolstack = args.toolstack.clone();
    }
    let manager = Manager::start(sockets, ops, cfg).context("starting the connection manager")?;
    let own = manager.sockets();
    let serving = match &args.serve_agent {
        Some(path) => Some(dombus_agent::Agent::serve(own.clone(), dombus_agent::AgentConfig::new(path.clone()))?),
        None => None,
    };
    let server = Server::new(dombus::Net::new().with_domain(own, serving), ServerConfig::default());
    let admin = manager.admin();
    let addr: Address = format!("xen:backend:{}", ports::POLICY).parse()?;
    let handle = server.serve(&addr, admin.clone().into_service()).await.context("serving the admin service")?;
    let local = match &args.admin_socket {
        Some(path) => {
            let _ = std::fs::remove_file(path);
            let addr: Address = format!("unix:{}", path.display()).parse()?;
            Some(server.serve(&addr, admin.into_service()).await.context("serving the admin service locally")?)
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
