//! `dombus-qemud`: the device-model service of a device-model domain, one qemu per guest.
//!
//! ```text
//! dombus-qemud --listen xen:5:5300 --storage xen:2:5100 --images /srv/images --xen
//! dombus-qemud --listen unix:/tmp/dm.sock --dir /tmp/dm --storage unix:/tmp/storage.sock
//! ```
//! Logs with tracing (`RUST_LOG`, default `info`) on stderr; exits 0 on SIGTERM or SIGINT, having
//! stopped its qemus. Its qemus die with it, even when it is killed with SIGKILL.

use std::process::ExitCode;

use clap::Parser;
use dombus_services::device_model::{DaemonArgs, enter_namespace, run_daemon};

#[derive(Parser)]
#[command(name = "dombus-qemud", about = "Serve qemu device models (over QMP) to other domains", version)]
struct Cli {
    #[command(flatten)]
    args: DaemonArgs,
}

fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    let ran = enter_namespace(&cli.args).and_then(|()| {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(run_daemon(cli.args))
    });
    match ran {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dombus-qemud: {e:#}");
            ExitCode::FAILURE
        }
    }
}
