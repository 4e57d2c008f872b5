//! `dombus-netd`: the network service of a network driver domain, on netlink.
//!
//! ```text
//! dombus-netd --unshare-netns --listen xen:4:5200 --xen
//! dombus-netd --listen unix:/tmp/network.sock          # inside `ip netns exec NS`
//! ```
//! Refuses the machine's own network namespace unless `--allow-root-netns`. Logs with tracing
//! (`RUST_LOG`, default `info`) on stderr; exits 0 on SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use dombus_services::network::{DaemonArgs, enter_namespace, run_daemon};

#[derive(Parser)]
#[command(name = "dombus-netd", about = "Serve bridges and vifs (netlink) to other domains", version)]
struct Cli {
    #[command(flatten)]
    args: DaemonArgs,
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    // Before the runtime's threads start: they inherit the namespace.
    let ran = enter_namespace(&cli.args).and_then(|()| {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(run_daemon(cli.args))
    });
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dombus-netd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
