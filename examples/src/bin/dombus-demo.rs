//! The dombus demo: a simulated Xen host on this machine, two domains pinging over a link.
//!
//! ```text
//! cargo run --release -p dombus-examples --bin dombus-demo
//! ```
//! Starts the simulated hypervisor and two domain processes (a server and a client domain), sets
//! up a link between them through the store handshake, and prints round-trip latency with
//! event-channel wake-ups and with adaptive polling, and stream throughput. Each part runs as its
//! own process (this binary re-executed with an internal role), as domains would on Xen.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use dombus_sim::{SimBackend, SimHypervisor, TOKEN_ENV};
use dombus_tools::diag;
use dombus_transport_xen::backend::Backend;
use dombus_transport_xen::link::{Link, LinkConfig};
use dombus_transport_xen::types::DomId;
use tokio::io::AsyncWriteExt;

const SERVER: DomId = DomId(1);
const CLIENT: DomId = DomId(2);
/// The links of the demo: (store path, adaptive polling budget).
const LINKS: [(&str, Option<Duration>); 2] =
    [("data/demo/wakeup", None), ("data/demo/spin", Some(Duration::from_micros(50)))];
const STREAM_PATH: &str = "data/demo/stream";
const STREAM_BYTES: u64 = 2 << 30;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["__simxen", sock] => run_hypervisor(Path::new(sock)),
        ["__server", sock] => runtime().and_then(|rt| rt.block_on(server(Path::new(sock)))),
        ["__client", sock, count] => runtime().and_then(|rt| {
            let count = count.parse().context("round-trip count")?;
            rt.block_on(client(Path::new(sock), count))
        }),
        [] => host(2000),
        ["--count", n] => n.parse().context("--count takes a number").and_then(host),
        _ => {
            eprintln!("usage: dombus-demo [--count ROUND_TRIPS]");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dombus-demo: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// Kills a child process when dropped (so an error path never leaves strays).
struct Reaped(Child, &'static str);

impl Reaped {
    fn wait_ok(mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.try_wait()? {
                if status.success() {
                    return Ok(());
                }
                bail!("{} exited with {status}", self.1);
            }
            if Instant::now() > deadline {
                bail!("{} did not finish within {timeout:?}", self.1);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SIGTERM first so the hypervisor removes its socket; then make sure.
            let _ = Command::new("kill").arg(self.0.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(2);
            while matches!(self.0.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn spawn(role: &[&str], what: &'static str) -> Result<Reaped> {
    spawn_with(Command::new(std::env::current_exe().context("locating the demo binary")?).args(role), what)
}

fn spawn_with(cmd: &mut Command, what: &'static str) -> Result<Reaped> {
    let child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    Ok(Reaped(child, what))
}

/// Starts the process of domain `domid`: this parent, as the toolstack, creates the domain and
/// hands the process the one-time token it attaches with.
fn spawn_domain(sock: &Path, domid: DomId, role: &[&str], what: &'static str) -> Result<Reaped> {
    let (_, token) = SimBackend::create_domain(sock, Some(domid), what)
        .with_context(|| format!("creating domain {domid} for the {what}"))?;
    let exe = std::env::current_exe().context("locating the demo binary")?;
    spawn_with(Command::new(exe).args(role).env(TOKEN_ENV, token), what)
}

/// The parent: starts the host, waits for the domains, tears everything down.
fn host(count: usize) -> Result<()> {
    let dir: PathBuf = std::env::temp_dir().join(format!("dombus-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let sock = dir.join("simxen.sock");
    let sock_s = sock.to_str().context("temp dir path is not UTF-8")?.to_string();

    println!("dombus demo: a simulated Xen host with two domains (state in {})", dir.display());
    let hv = spawn(&["__simxen", &sock_s], "the simulated hypervisor")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if Instant::now() > deadline {
            bail!("the simulated hypervisor did not start");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("  hypervisor up (pid {}), socket {}", hv.0.id(), sock.display());
    let server = spawn_domain(&sock, SERVER, &["__server", &sock_s], "server domain")?;
    let client = spawn_domain(&sock, CLIENT, &["__client", &sock_s, &count.to_string()], "client domain")?;
    let outcome =
        client.wait_ok(Duration::from_secs(300)).and_then(|()| server.wait_ok(Duration::from_secs(30)));
    drop(hv);
    let _ = std::fs::remove_dir_all(&dir);
    outcome?;
    println!("host down: all domains and the hypervisor stopped");
    Ok(())
}

fn run_hypervisor(sock: &Path) -> Result<()> {
    let hv = SimHypervisor::bind(sock).context("binding the hypervisor socket")?;
    hv.run().context("running the simulated hypervisor")
}

/// Domain 1: publishes the links for domain 2 and echoes on them.
async fn server(sock: &Path) -> Result<()> {
    let backend = SimBackend::attach_from_env(sock, SERVER).context("attaching domain 1")?;
    println!("  domain {} (server) attached", backend.domid());
    // Publish every link up front (the client may connect in any order), then serve them in
    // the order the client uses them.
    let mut listeners = Vec::new();
    for (path, spin) in LINKS {
        let cfg = LinkConfig { spin, ..LinkConfig::default() };
        listeners.push(Link::listen(&backend, path, CLIENT, &cfg)?);
    }
    let big = LinkConfig { client_to_server: 1 << 20, server_to_client: 1 << 20, spin: None };
    let stream = Link::listen(&backend, STREAM_PATH, CLIENT, &big)?;
    for listener in listeners {
        let mut link = listener.accept().await?;
        diag::echo(&mut link).await?;
    }
    let mut link = stream.accept().await?;
    let (n, crc) = diag::recv_all(&mut link).await?;
    println!("  domain 1 received {} MiB, crc32 {crc:08x}", n >> 20);
    link.shutdown().await?;
    Ok(())
}

/// Domain 2: connects to each link and measures.
async fn client(sock: &Path, count: usize) -> Result<()> {
    let backend = SimBackend::attach_from_env(sock, CLIENT).context("attaching domain 2")?;
    println!("  domain {} (client) attached", backend.domid());
    let timeout = Duration::from_secs(30);
    for (path, spin) in LINKS {
        let cfg = LinkConfig { spin, ..LinkConfig::default() };
        let mut link = tokio::time::timeout(timeout, Link::connect(&backend, path, SERVER, &cfg))
            .await
            .context("server domain did not publish the link")??;
        let mode = match spin {
            None => "event-channel wake-ups".to_string(),
            Some(d) => format!("adaptive polling ({} µs spin)", d.as_micros()),
        };
        println!("link dom{CLIENT} -> dom{SERVER} over {path}, {mode}:");
        for size in [64usize, 4096] {
            let lat = diag::ping(&mut link, size, count / 10, count).await?.context("no samples")?;
            println!("  {size:>5} B round trip: {lat}");
        }
        link.shutdown().await?;
    }
    let big = LinkConfig { client_to_server: 1 << 20, server_to_client: 1 << 20, spin: None };
    let mut link = tokio::time::timeout(timeout, Link::connect(&backend, STREAM_PATH, SERVER, &big))
        .await
        .context("server domain did not publish the stream link")??;
    let t = Instant::now();
    let crc = diag::send_pattern(&mut link, STREAM_BYTES, 64 << 10).await?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "stream dom{CLIENT} -> dom{SERVER}: {} MiB in {secs:.2} s = {:.2} GB/s (1 MiB rings, 64 KiB writes), crc32 {crc:08x}",
        STREAM_BYTES >> 20,
        STREAM_BYTES as f64 / secs / 1e9
    );
    // Wait for the server's end of stream: it has read and checked everything.
    let (_, _) = diag::recv_all(&mut link).await?;
    Ok(())
}
