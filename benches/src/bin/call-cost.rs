//! `call-cost`: the work of a typed call, without the host's noise. Makes `--calls` 64-byte
//! `Echo` calls with client and server on one thread of this process, over a Unix socket, so
//! that nothing waits on another thread or process: a call's time is the work of dombus-rpc,
//! tokio and the socket's syscalls.
//!
//! Alone it prints the time per call. Under callgrind it is a count: `scripts/call-cost` runs it
//! with collection only inside [`measured`] (after the connection is made and warmed) and
//! prints the instructions per call, in all and by function. Instruction counts do not move
//! with the host's load or memory bandwidth, so two builds compare exactly, on any machine; they
//! leave out the kernel's side of the syscalls and weigh every instruction alike (a clock read
//! counts its few dozen instructions, not its cycles).
//!
//! ```text
//! cargo run --release -p dombus-benches --bin call-cost -- --calls 20000 [--path direct|tarpc]
//! scripts/call-cost                  # instructions per call, both call paths
//! ```

use std::process::ExitCode;
use std::time::{Duration, Instant};

use dombus_benches::rpc::typed::{Echo, EchoClient, EchoServer};
use dombus_rpc::{Address, CallPath, ClientConfig, Net, Server, ServerConfig};
use tokio::runtime::Runtime;

/// Calls made before [`measured`]: the connection, its buffers and the metrics' entries.
const WARM_UP: usize = 100;

struct Args {
    calls: usize,
    path: CallPath,
}

fn parse() -> Result<Args, String> {
    let mut args = Args { calls: 2000, path: CallPath::Direct };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--calls" => args.calls = value()?.parse().map_err(|e| format!("--calls: {e}"))?,
            "--path" => {
                args.path = match value()?.as_str() {
                    "direct" => CallPath::Direct,
                    "tarpc" => CallPath::Tarpc,
                    other => return Err(format!("--path: direct or tarpc, not {other:?}")),
                }
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(args)
}

/// `n` calls, one after another; what callgrind counts.
#[inline(never)]
fn measured(rt: &Runtime, client: &EchoClient, n: usize) -> Result<Duration, String> {
    rt.block_on(calls(client, n))
}

async fn calls(client: &EchoClient, n: usize) -> Result<Duration, String> {
    let data = vec![7u8; 64];
    let start = Instant::now();
    for _ in 0..n {
        let back = client.echo(tarpc::context::current(), data.clone()).await.map_err(|e| e.to_string())?;
        if back != data {
            return Err("the server echoed other bytes".into());
        }
    }
    Ok(start.elapsed())
}

fn run(args: &Args) -> Result<Duration, String> {
    fn err(what: &'static str) -> impl Fn(std::io::Error) -> String {
        move |e| format!("{what}: {e}")
    }
    let dir = std::env::temp_dir().join(format!("dombus-call-cost-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(err("a scratch directory"))?;
    let addr = Address::Unix(dir.join("echo.sock"));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(err("a runtime"))?;
    let server = Server::new(Net::new(), ServerConfig { call_path: args.path, ..ServerConfig::default() });
    let handle = rt.block_on(server.serve(&addr, EchoServer.into_service())).map_err(err("serving"))?;
    let config = ClientConfig { call_path: args.path, ..ClientConfig::default() };
    let client = EchoClient::with_config(Net::new(), addr, config);
    rt.block_on(calls(&client, WARM_UP))?;
    let elapsed = measured(&rt, &client, args.calls)?;
    rt.block_on(handle.stop());
    let _ = std::fs::remove_dir_all(&dir);
    Ok(elapsed)
}

fn main() -> ExitCode {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("call-cost: {e}\nusage: call-cost [--calls N] [--path direct|tarpc]");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(elapsed) => {
            let per_call = elapsed.as_secs_f64() * 1e6 / args.calls.max(1) as f64;
            println!("{} calls on the {} path: {per_call:.2} µs per call", args.calls, args.path);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("call-cost: {e}");
            ExitCode::FAILURE
        }
    }
}
