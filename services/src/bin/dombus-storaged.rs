//! `dombus-storaged`: the storage service of a storage domain, on real `qemu-img`.
//!
//! ```text
//! dombus-storaged --root /var/lib/dombus/images --listen xen:3:5100 --xen
//! dombus-storaged --root /tmp/images --listen unix:/tmp/storage.sock
//! ```
//! Logs with tracing (`RUST_LOG`, default `info`) on stderr; exits 0 on SIGTERM or SIGINT.

use std::process::ExitCode;

use clap::Parser;
use dombus_services::storage::{DaemonArgs, run_daemon};

#[derive(Parser)]
#[command(name = "dombus-storaged", about = "Serve disk images (qemu-img) to other domains", version)]
struct Cli {
    #[command(flatten)]
    args: DaemonArgs,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    let cli = Cli::parse();
    match run_daemon(cli.args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dombus-storaged: {e:#}");
            ExitCode::FAILURE
        }
    }
}
