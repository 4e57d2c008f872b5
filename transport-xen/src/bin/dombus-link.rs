//! `dombus-link`: one domain's end of a link, for tests, demos and the VM harness.
//!
//! ```text
//! dombus-link --socket /tmp/simxen.sock --domid 1 serve   --path data/t --peer 2 recv
//! dombus-link --socket /tmp/simxen.sock --domid 2 connect --path data/t --peer 1 send --bytes 1G
//! ```
//! Results are printed as `key=value` lines on stdout; errors on stderr with exit status 1.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use dombus_transport_xen::backend::{Backend, EventChannel, MappedPages, Store};
use dombus_transport_xen::link::{Link, LinkConfig, server_path};
use dombus_transport_xen::shmem::SharedMem;
use dombus_transport_xen::sim::SimBackend;
use dombus_transport_xen::types::{DomId, EvtchnPort, GrantRef};
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use dombus_transport_xen::{diag, layout};

#[derive(Parser)]
#[command(about = "One end of a dombus link over the simulated hypervisor")]
struct Args {
    /// The simulated hypervisor's socket.
    #[arg(long)]
    socket: std::path::PathBuf,
    /// Domain id to attach as (default: the next free one).
    #[arg(long)]
    domid: Option<u16>,
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Publish a link for a client domain and wait for it.
    Serve(LinkArgs),
    /// Connect to a link a server domain published.
    Connect(LinkArgs),
    /// Virtual sockets: echo every connection to `--port`, from any domain, until killed.
    VsockEcho {
        /// The port to listen on.
        #[arg(long)]
        port: u32,
        /// Also accept connections on this port and never read from them (a stalled reader,
        /// for flow-control tests).
        #[arg(long)]
        park: Option<u32>,
    },
    /// Virtual sockets: `--conns` concurrent connections to `--to`, each doing `--count` round
    /// trips of 64 bytes; prints the percentiles.
    VsockPing {
        /// Where to connect, e.g. xen:1:5000.
        #[arg(long)]
        to: dombus_transport_xen::vsock::VsockAddr,
        /// Concurrent connections.
        #[arg(long, default_value_t = 1)]
        conns: usize,
        /// Round trips per connection.
        #[arg(long, default_value_t = 100)]
        count: usize,
        /// Wait this many seconds for the listener to appear.
        #[arg(long, default_value_t = 10)]
        wait_s: u64,
    },
    /// Hostile client: connect by hand and scribble on the ring indices.
    Scribble {
        /// Store path of the server's link.
        #[arg(long)]
        path: String,
        /// The server domain.
        #[arg(long)]
        peer: u16,
    },
}

#[derive(clap::Args)]
struct LinkArgs {
    /// Store path of the link (relative paths live under the server's home).
    #[arg(long)]
    path: String,
    /// The other domain.
    #[arg(long)]
    peer: u16,
    /// Ring size in bytes, each direction (suffixes K, M).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    ring: u64,
    /// Adaptive polling budget in microseconds (0 = sleep at once).
    #[arg(long, default_value_t = 0)]
    spin_us: u64,
    /// Give up if the peer has not connected after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout_s: u64,
    #[command(subcommand)]
    action: Action,
}

#[derive(Subcommand)]
enum Action {
    /// Echo everything back until end-of-stream.
    Echo,
    /// Read until end-of-stream; print the byte count and CRC-32.
    Recv,
    /// Write a pattern of `--bytes` bytes, then shut down; print the byte count and CRC-32.
    Send {
        /// Bytes to send (suffixes K, M, G).
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
        /// Size of each write.
        #[arg(long, default_value_t = 64 << 10)]
        chunk: usize,
    },
    /// Round trips against an echoing peer; print percentiles.
    Ping {
        /// Measured round trips.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Message size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Unmeasured round trips first.
        #[arg(long, default_value_t = 100)]
        warmup: usize,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("not a size: {s:?} (use e.g. 4096, 64K, 1G)"))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    let backend = SimBackend::attach(&args.socket, args.domid.map(DomId))
        .with_context(|| format!("attaching to the simulated hypervisor at {}", args.socket.display()))?;
    println!("domid={}", backend.domid());
    match args.role {
        Role::Serve(l) => {
            let cfg = config(&l);
            let listener =
                Link::listen(&backend, &l.path, DomId(l.peer), &cfg).context("publishing the link")?;
            println!("listening path={}", server_path(backend.domid(), &l.path));
            let link = tokio::time::timeout(Duration::from_secs(l.timeout_s), listener.accept())
                .await
                .context("no client connected in time")?
                .context("accepting the client")?;
            act(link, l.action).await
        }
        Role::Connect(l) => {
            let cfg = config(&l);
            let link = tokio::time::timeout(
                Duration::from_secs(l.timeout_s),
                Link::connect(&backend, &l.path, DomId(l.peer), &cfg),
            )
            .await
            .context("the server did not publish the link in time")?
            .context("connecting")?;
            act(link, l.action).await
        }
        Role::Scribble { path, peer } => scribble(&backend, &path, DomId(peer)).await,
        Role::VsockEcho { port, park } => {
            let vs = VsockDomain::start(backend, VsockConfig::default())?;
            let mut listener = vs.listen(port)?;
            if let Some(park) = park {
                let mut parking = vs.listen(park)?;
                tokio::spawn(async move {
                    let mut parked = Vec::new();
                    while let Ok(s) = parking.accept().await {
                        parked.push(s);
                    }
                });
            }
            println!("vsock listening port={port}");
            loop {
                let mut s = listener.accept().await?;
                tokio::spawn(async move {
                    let _ = diag::echo(&mut s).await;
                });
            }
        }
        Role::VsockPing { to, conns, count, wait_s } => {
            let vs = VsockDomain::start(backend, VsockConfig::default())?;
            let mut tasks = Vec::new();
            for _ in 0..conns {
                let vs = vs.clone();
                tasks.push(tokio::spawn(async move {
                    let mut s = vs.connect_wait(to, Duration::from_secs(wait_s)).await?;
                    let lat = diag::ping(&mut s, 64, 10, count).await?;
                    tokio::io::AsyncWriteExt::shutdown(&mut s).await?;
                    std::io::Result::Ok(lat)
                }));
            }
            let mut samples = 0;
            let mut worst = None;
            for t in tasks {
                let lat = t.await??.context("no samples")?;
                samples += lat.count;
                worst = Some(worst.map_or(lat.p50, |w: Duration| w.max(lat.p50)));
            }
            println!(
                "vsock-ping to={to} conns={conns} round_trips={samples} worst_p50_us={:.2}",
                worst.map_or(0.0, diag::us)
            );
            Ok(())
        }
    }
}

fn config(l: &LinkArgs) -> LinkConfig {
    LinkConfig {
        client_to_server: usize::try_from(l.ring).unwrap_or(usize::MAX),
        server_to_client: usize::try_from(l.ring).unwrap_or(usize::MAX),
        spin: (l.spin_us > 0).then(|| Duration::from_micros(l.spin_us)),
    }
}

async fn act(mut link: Link<SimBackend>, action: Action) -> Result<()> {
    println!("connected peer={} rings={:?}", link.peer(), link.ring_sizes());
    match action {
        Action::Echo => {
            let n = diag::echo(&mut link).await.context("echoing")?;
            println!("echoed bytes={n}");
        }
        Action::Recv => {
            let (n, crc) = diag::recv_all(&mut link).await.context("receiving")?;
            println!("received bytes={n} crc={crc:08x}");
        }
        Action::Send { bytes, chunk } => {
            let t = std::time::Instant::now();
            let crc = diag::send_pattern(&mut link, bytes, chunk).await.context("sending")?;
            let secs = t.elapsed().as_secs_f64();
            println!("sent bytes={bytes} crc={crc:08x} secs={secs:.3} gbps={:.3}", bytes as f64 / secs / 1e9);
            // Wait for the peer to finish reading and close before we unmap.
            let mut sink = [0u8; 1];
            let _ = tokio::io::AsyncReadExt::read(&mut link, &mut sink).await;
        }
        Action::Ping { count, size, warmup } => {
            let lat = diag::ping(&mut link, size, warmup, count).await.context("pinging")?;
            if let Some(l) = lat {
                println!(
                    "ping size={size} count={} p50_us={:.2} p99_us={:.2} min_us={:.2} max_us={:.2}",
                    l.count,
                    diag::us(l.p50),
                    diag::us(l.p99),
                    diag::us(l.min),
                    diag::us(l.max)
                );
            }
            tokio::io::AsyncWriteExt::shutdown(&mut link).await?;
        }
    }
    Ok(())
}

/// A hostile client: joins by hand, then writes a producer index far beyond the ring.
async fn scribble(backend: &SimBackend, path: &str, server: DomId) -> Result<()> {
    let path = server_path(server, path);
    let store = backend.store();
    let read = |key: &str| -> Result<u32> {
        let v = store.read(&format!("{path}/{key}")).with_context(|| format!("reading {path}/{key}"))?;
        Ok(std::str::from_utf8(&v)?.parse()?)
    };
    let (ring_ref, remote_port) = (read("ring-ref")?, read("event-channel")?);
    let evtchn = backend.open_evtchn()?;
    let port: EvtchnPort = evtchn.bind_interdomain(server, EvtchnPort(remote_port))?;
    let page = backend.map_grants(server, &[GrantRef(ring_ref)], true)?;
    let ctl = page.region();
    ctl.store_u8(layout::CLI_LIVE, 1);
    evtchn.notify(port)?;
    // The server reads the left ring; claim far more data than it can hold.
    ctl.store_u32(layout::LEFT_PROD, 0xdead_beef);
    evtchn.notify(port)?;
    println!("scribbled");
    // Stay alive (so the server reacts to the scribble, not to our death) until it closes.
    for _ in 0..1000 {
        if ctl.load_u8(layout::SRV_LIVE) == 0 {
            println!("server closed the link");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    bail!("the server did not close the link after the scribble")
}
