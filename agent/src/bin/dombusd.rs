//! `dombusd`: a domain's agent. Every process of the domain reaches the domain's virtual sockets
//! through it (see `dombus_agent`).

use clap::Parser;

/// A domain's agent: owns the domain's links and serves its processes' virtual sockets on a
/// Unix socket.
#[derive(Debug, Parser)]
#[command(name = "dombusd", version)]
struct Cli {
    #[command(flatten)]
    args: dombus_agent::daemon::AgentArgs,
}

fn main() -> std::process::ExitCode {
    dombus_agent::daemon::init_logs();
    let cli = Cli::parse();
    let runtime = match dombus_agent::daemon::runtime() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("dombusd: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dombus_agent::daemon::run(cli.args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dombusd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
