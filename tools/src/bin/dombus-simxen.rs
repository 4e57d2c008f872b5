//! `dombus-simxen`: the simulated Xen hypervisor daemon.
//!
//! Domains (processes using `SimBackend`) attach over the Unix socket given by `--socket`.
//! Logs go to stderr (`RUST_LOG`, default `info`). SIGTERM or SIGINT stops the daemon cleanly:
//! every domain is disconnected and the socket is removed.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use dombus_sim::SimHypervisor;
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
    hv.run_until_signalled().context("simulator failed")?;
    tracing::info!("simulated hypervisor stopped");
    Ok(())
}
