//! `dombus-simxen`: the simulated Xen hypervisor daemon.
//!
//! Domains (processes using `SimBackend`) attach over the Unix socket given by `--socket`.
//! Logs go to stderr (`RUST_LOG`, default `info`). SIGTERM or SIGINT stops the daemon cleanly:
//! every domain is disconnected and the socket is removed.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use dombus_transport_xen::sim::SimHypervisor;
use tracing_subscriber::EnvFilter;

/// Simulated Xen hypervisor (grants, event channels, xenstore) for dombus.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Path of the Unix socket domains attach to.
    #[arg(long)]
    socket: PathBuf,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .init();
    let hv = SimHypervisor::bind(&args.socket)
        .with_context(|| format!("cannot listen on {}", args.socket.display()))?;
    let stopper = hv.stopper();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    // Install the handlers before serving, so that a signal can never hit the default action.
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        let _guard = rt.enter();
        (
            signal(SignalKind::terminate()).context("SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("SIGINT handler")?,
        )
    };
    std::thread::Builder::new().name("signals".into()).spawn(move || {
        rt.block_on(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        });
        stopper.stop();
    })?;
    hv.run().context("simulator failed")?;
    tracing::info!("simulated hypervisor stopped");
    Ok(())
}
