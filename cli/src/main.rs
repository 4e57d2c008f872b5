//! `dombus`: the toolstack's command-line tool.
//!
//! ```text
//! dombus [--json] [--sim SOCKET --domid N | --xen] describe ADDR
//! dombus [--json] [...] ping ADDR [--count N]
//! ```
//! Exit status: 0 success, 1 the service answered with an error, 2 usage, 3 refused (nothing
//! there, no such service, denied), 4 the call failed (deadline, connection lost).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use dombus::rpc::cli::{self, NetArgs, exit};
use dombus::rpc::{Address, ClientConfig, RawClient, error_text, wire};

#[derive(Parser)]
#[command(name = "dombus", about = "Drive dombus services: describe them, ping them, call them", version)]
struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    net: NetArgs,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// The services at ADDR: their methods, arguments, results and docs.
    Describe {
        /// Where (xen:CID:PORT, vsock:CID:PORT, unix:PATH, tcp:HOST:PORT).
        addr: Address,
    },
    /// Round trips to ADDR (the built-in ping every server answers): p50/p99 latency.
    Ping {
        /// Where.
        addr: Address,
        /// How many round trips.
        #[arg(long, short = 'c', default_value_t = 100)]
        count: u32,
    },
}

/// A failure and its exit status.
struct Failure(u8, String);

async fn run(cli: Cli) -> Result<(), Failure> {
    let net = cli.net.net().map_err(|e| Failure(exit::REFUSED, e.to_string()))?;
    let (Top::Describe { addr } | Top::Ping { addr, .. }) = &cli.command;
    let client = RawClient::new(net, addr.clone(), wire::BUILTIN_SERVICE, ClientConfig::default());
    client
        .connect_now(cli.net.timeout())
        .await
        .map_err(|e| Failure(exit::REFUSED, format!("{addr}: {e}")))?;
    let failed = |e: dombus::rpc::RpcError| Failure(exit::CALL, error_text(&e));
    match cli.command {
        Top::Describe { .. } => {
            let services = client.describe(cli.net.context()).await.map_err(failed)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&services).unwrap_or_default());
            } else {
                println!("{}", cli::render_descriptors(&services));
            }
        }
        Top::Ping { count, .. } => {
            let mut laps = Vec::with_capacity(count as usize);
            for _ in 0..count.max(1) {
                let t = Instant::now();
                client.ping(cli.net.context()).await.map_err(failed)?;
                laps.push(t.elapsed());
            }
            laps.sort();
            let at = |q: f64| laps[((laps.len() - 1) as f64 * q).round() as usize];
            let us = |d: Duration| d.as_secs_f64() * 1e6;
            if cli.json {
                let v = serde_json::json!({ "addr": addr_text(&client), "count": laps.len(),
                    "p50_us": us(at(0.5)), "p99_us": us(at(0.99)), "max_us": us(at(1.0)) });
                println!("{v}");
            } else {
                println!(
                    "{}: {} round trips, p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs",
                    addr_text(&client),
                    laps.len(),
                    us(at(0.5)),
                    us(at(0.99)),
                    us(at(1.0))
                );
            }
        }
    }
    Ok(())
}

fn addr_text(c: &RawClient) -> String {
    c.addr().to_string()
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { exit::OK });
        }
    };
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(status, msg)) => {
            eprintln!("dombus: {msg}");
            ExitCode::from(status)
        }
    }
}
