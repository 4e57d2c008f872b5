//! The processes of a simulated host, run by `dombus host up` as `dombus daemon …` (one binary:
//! `cargo run --bin dombus` builds everything the host needs).

use std::path::PathBuf;

use anyhow::Context as _;
use clap::Subcommand;
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
    Backend(dombus_manager::daemon::BackendArgs),
    /// A storage domain (what `dombus-storaged` runs).
    Storage(DaemonArgs),
    /// A network driver domain (what `dombus-netd` runs).
    Network(dombus_services::network::DaemonArgs),
    /// A device-model domain: one qemu per guest (what `dombus-qemud` runs).
    DeviceModel(dombus_services::device_model::DaemonArgs),
    /// A domain's agent (what `dombusd` runs).
    Agent(dombus_agent::daemon::AgentArgs),
}

/// Runs a daemon until SIGTERM or SIGINT.
pub fn run(daemon: Daemon) -> anyhow::Result<()> {
    dombus_agent::daemon::init_logs();
    match daemon {
        Daemon::Hypervisor { socket } => hypervisor(socket),
        Daemon::Backend(args) => runtime()?.block_on(dombus_manager::daemon::run(args)),
        Daemon::Storage(args) => runtime()?.block_on(run_daemon(args)),
        Daemon::Network(args) => {
            // Before the runtime's threads start: they inherit the namespace.
            dombus_services::network::enter_namespace(&args)?;
            runtime()?.block_on(dombus_services::network::run_daemon(args))
        }
        Daemon::DeviceModel(args) => {
            // Before the runtime's threads start: they (and the qemus) inherit the namespace.
            dombus_services::device_model::enter_namespace(&args)?;
            runtime()?.block_on(dombus_services::device_model::run_daemon(args))
        }
        Daemon::Agent(args) => dombus_agent::daemon::runtime()?.block_on(dombus_agent::daemon::run(args)),
    }
}

/// A daemon's runtime: one thread (blocking work goes to tokio's blocking pool). Chosen by
/// measurement (docs/benchmarks.md, "Results — 2026-12-07 (2)"): a 2-worker runtime measured
/// 7–38 % more CPU per call and slower round trips; on one thread a call's tasks — the link's
/// reader and writer, the connection's, the call's — hand each other on without waking
/// another thread.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")
}

fn hypervisor(socket: PathBuf) -> anyhow::Result<()> {
    let hv = dombus::sim::SimHypervisor::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    tracing::info!(socket = %socket.display(), "simulated hypervisor ready");
    hv.run_until_signalled().context("simulated hypervisor failed")?;
    tracing::info!("stopped");
    Ok(())
}
