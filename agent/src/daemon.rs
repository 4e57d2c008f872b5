//! `dombusd`: the agent as a process of its own (`dombus daemon agent` in the `dombus` tool).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Args;
use dombus_transport_xen::DomId;
use dombus_transport_xen::vsock::LinkSetUp;

use crate::attach::{Attach, Hypervisor};
use crate::server::{Agent, AgentConfig};

/// The agent's options.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    /// Attach to the simulated hypervisor listening on SOCKET.
    #[arg(long, value_name = "SOCKET", env = "DOMBUS_SIM", conflicts_with = "xen")]
    pub sim: Option<PathBuf>,
    /// Our domain id on the simulated hypervisor (0: the toolstack's domain).
    #[arg(long, value_name = "DOMID", default_value_t = DomId::DOM0)]
    pub domid: DomId,
    /// Attach to real Xen (/dev/xen/*, xenstored).
    #[arg(long)]
    pub xen: bool,
    /// The backend domain (what xen:backend:PORT names), whose connection manager introduces
    /// this domain to others.
    #[arg(long, value_name = "DOMID", default_value_t = DomId::DOM0)]
    pub backend_domain: DomId,
    /// No connection manager on this host: any domain may ask any other for a link (two
    /// domains of a test, a host without a backend domain's manager).
    #[arg(long)]
    pub open_links: bool,
    /// Where the domain's processes reach the agent [default: $DOMBUS_AGENT, else
    /// /run/dombus/agent.sock for root, else $XDG_RUNTIME_DIR/dombus/agent.sock]
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The socket's permission bits, in octal: who may use the agent.
    #[arg(long, value_name = "OCTAL", default_value = "600", value_parser = octal)]
    pub mode: u32,
    /// A local user id that may listen on ports below 1024 (repeatable) [default: root and the
    /// agent's own user]
    #[arg(long = "privileged-uid", value_name = "UID")]
    pub privileged_uids: Vec<u32>,
}

fn octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not permission bits in octal (e.g. 600, 660)"))
}

impl AgentArgs {
    /// How to attach.
    pub fn attach(&self) -> anyhow::Result<Attach> {
        let hypervisor = match (&self.sim, self.xen) {
            (Some(s), _) => Hypervisor::Sim(s.clone()),
            (None, true) => Hypervisor::Xen,
            (None, false) => anyhow::bail!("which hypervisor? give --sim SOCKET or --xen"),
        };
        let links = if self.open_links { LinkSetUp::Open } else { LinkSetUp::Introduced };
        Ok(Attach { hypervisor, domid: self.domid, backend_domain: self.backend_domain, links })
    }

    /// How to serve.
    pub fn config(&self) -> AgentConfig {
        let mut cfg = AgentConfig::new(self.socket.clone().unwrap_or_else(crate::client::default_socket));
        cfg.mode = self.mode;
        if !self.privileged_uids.is_empty() {
            cfg.privileged_uids = self.privileged_uids.clone();
        }
        cfg
    }
}

/// Logs of a daemon to stderr: `RUST_LOG` (default `info`), colour only on a terminal. For
/// `dombusd`, `dombus-managerd` and the `dombus` tool's daemons alike.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// The runtime the agent runs on: one thread. Its work is moving bytes between sockets and
/// links, each step short; one thread keeps a process's hand-off to the link a queue push, not a
/// cross-thread wake-up (which costs most on a virtual CPU, and under emulation many times
/// more).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// Runs the agent until SIGTERM or SIGINT (inside a tokio runtime, e.g. [`runtime`]).
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let domain = args.attach()?.start().context("attaching to the hypervisor")?;
    let agent = Agent::serve(domain, args.config())?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
    }
    agent.stop().await;
    tracing::info!("stopped");
    Ok(())
}
