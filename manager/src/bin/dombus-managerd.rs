//! `dombus-managerd`: the backend domain's daemon — its agent and the host's connection manager.

use clap::Parser;

/// The backend domain's daemon: the connection manager and the domain's agent.
#[derive(Parser)]
#[command(name = "dombus-managerd", version)]
struct Cli {
    #[command(flatten)]
    args: dombus_manager::daemon::BackendArgs,
}

fn main() -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let cli = Cli::parse();
    dombus_agent::daemon::runtime()?.block_on(dombus_manager::daemon::run(cli.args))
}
