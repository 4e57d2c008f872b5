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
    dombus_agent::daemon::init_logs();
    let cli = Cli::parse();
    dombus_agent::daemon::runtime()?.block_on(dombus_manager::daemon::run(cli.args))
}
