//! `dombus-link`: one domain's end of a link, for tests, demos and the VM harness.
//!
//! ```text
//! dombus-link --socket /tmp/simxen.sock --domid 1 serve   --path data/t --peer 2 recv
//! dombus-link --socket /tmp/simxen.sock --domid 2 connect --path data/t --peer 1 send --bytes 1G
//! dombus-link --xen serve --path data/t --peer 0 echo      # on real Xen (e.g. two dom0 processes)
//! dombus-link --agent /run/dombus/agent.sock vsock-ping --to xen:1:5000 --reconnect-s 60
//! dombus-link --agent /run/dombus/agent.sock ticks-serve --port 5200
//! dombus-link --agent /run/dombus/agent.sock ticks-watch --to xen:0:5200 --count 1000 --restart
//! ```
//! With `--agent`, the virtual-socket roles go through the domain's agent (`dombusd`) instead of
//! attaching to the hypervisor: any number of them run at once in one domain, over its one link
//! to each peer.
//! Results are printed as `key=value` lines on stdout; errors on stderr with exit status 1.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use dombus_agent::AgentClient;
use dombus_agent::proto::Target;
use dombus_rpc::{Address, Size};
use dombus_sim::SimBackend;
use dombus_tools::diag;
use dombus_tools::reconnect::{self, Reconnect};
use dombus_tools::ticks::{self, Ticks as _};
use dombus_transport_xen::backend::{Backend, EventChannel, MappedPages, Store};
use dombus_transport_xen::layout;
use dombus_transport_xen::link::{Link, LinkConfig, server_path};
use dombus_transport_xen::shmem::SharedMem;
use dombus_transport_xen::types::{DomId, EvtchnPort, GrantRef};
use dombus_transport_xen::vsock::VsockAddr;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use dombus_transport_xen::vsock::mux::Mux;
use dombus_transport_xen::vsock::session::SessionConfig;
use dombus_transport_xen::xen::XenBackend;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

#[derive(Parser)]
#[command(about = "One end of a dombus link, over the simulated hypervisor or real Xen")]
struct Args {
    /// The simulated hypervisor's socket.
    #[arg(long, required_unless_present_any = ["xen", "agent"], conflicts_with = "xen")]
    socket: Option<PathBuf>,
    /// Domain id to attach as (simulator only): any id but 0 needs the one-time token the
    /// toolstack got when it created the domain, in $DOMBUS_SIM_TOKEN; without this option, the
    /// domain that token names, or domain 0 (the toolstack, with the simulator's key) if none.
    #[arg(long, conflicts_with = "xen")]
    domid: Option<u16>,
    /// Create domain `--domid` first, as the toolstack (with the simulator's key), then attach
    /// as it: for scripts that play the toolstack, e.g. the hostile-peer soak.
    #[arg(long, requires = "domid", conflicts_with = "xen")]
    boot: bool,
    /// Use real Xen (/dev/xen/* and xenstore) instead of the simulator.
    #[arg(long)]
    xen: bool,
    /// Go through this domain's agent (`dombusd`), listening at PATH, instead of attaching to
    /// the hypervisor: for the virtual-socket roles `vsock-echo`, `vsock-ping`, `agent-status`,
    /// `ticks-serve` and `ticks-watch`.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["socket", "xen", "domid", "boot"])]
    agent: Option<PathBuf>,
    #[command(subcommand)]
    role: Role,
}

/// `--to`: a `xen:` address in dombus-rpc's grammar (the one definition of every scheme).
fn domain_port(s: &str) -> Result<VsockAddr, String> {
    match s.parse::<Address>().map_err(|e| e.to_string())? {
        Address::Xen(addr) => Ok(addr),
        other => Err(format!("{other}: this tool speaks only xen: addresses")),
    }
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
    /// trips of 64 bytes; prints the percentiles. With `--reconnect-s`, a connection that fails
    /// is replaced and its round trips go on; the last line also counts the failed round trips,
    /// the reconnects and the round trips after the last reconnect of each connection.
    VsockPing {
        /// Where to connect: xen:<domid>:<port>, e.g. xen:1:5000.
        #[arg(long, value_parser = domain_port)]
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
        /// When a round trip fails, reconnect (with back-off) instead of failing, as long as a
        /// connection has had no successful round trip for less than this many seconds. Without
        /// it, the first failure ends the run.
        #[arg(long, value_name = "SECONDS")]
        reconnect_s: Option<u64>,
        /// Pause between two round trips of a connection, in milliseconds (with `--reconnect-s`).
        #[arg(long, default_value_t = 0, requires = "reconnect_s")]
        interval_ms: u64,
    },
    /// A `ticks` service (dombus_tools::ticks: ticks published on demand by its `publish` call,
    /// and their stream) on `--port`, through the domain's agent (needs `--agent`), until killed;
    /// prints `ticks serving port=P epoch=E` (the topic's epoch, new with every start).
    TicksServe {
        /// The port to serve on.
        #[arg(long)]
        port: u32,
        /// Keep trying to listen this long (a previous server's port may still be held for a
        /// moment after it died).
        #[arg(long, default_value_t = 10)]
        wait_s: u64,
    },
    /// Subscribe to the `ticks` service at `--to` (needs `--agent`), have `--count` ticks
    /// published and check that each arrives once, in order (dombus_tools::ticks::watch); prints
    /// `ticks phase=start …`. With `--restart`, then print `ticks waiting-for-restart` and keep
    /// polling until the server comes back: it must say so with one new-epoch resync, after
    /// which `--count` ticks are published and received again (`ticks phase=restart …`).
    TicksWatch {
        /// The service: xen:<domid>:<port>, e.g. xen:0:5200.
        #[arg(long, value_parser = domain_port)]
        to: VsockAddr,
        /// Ticks to have published and received (each phase), 1 to 1024.
        #[arg(long, default_value_t = 1000)]
        count: u64,
        /// Await a restart of the server after the first ticks.
        #[arg(long)]
        restart: bool,
        /// Longest wait for the next update (the server's restart included), in seconds.
        #[arg(long, default_value_t = 120)]
        patience_s: u64,
    },
    /// What the domain's agent holds (needs `--agent`): prints `agent domain=D local=N
    /// listening=PORT,... links=DOMAIN:CONNECTIONS,...`, one entry per link that is up.
    AgentStatus,
    /// Hostile domain: rewrite this domain's request for a link to `--peer` (a lower domain) in
    /// a loop for `--seconds`, never joining; prints `requests=N`.
    FloodRequests {
        /// The lower domain asked.
        #[arg(long)]
        peer: u16,
        /// How long to keep writing.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Hostile domain: grant itself a page and map it again and again, never unmapping, for
    /// `--seconds`; prints `maps=N refused=M` (maps past the hypervisor's limit are refused).
    FloodMaps {
        /// How long to keep mapping.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Hostile virtual-socket peer, for soaks: join the link to domain `--peer` (running
    /// `vsock-echo`) by hand and write `--count` packets that each ask for an answer, never
    /// reading one. `--kind credit`: CREDIT_REQUESTs on one connection to `--port`; `--kind rst`:
    /// packets for connections that do not exist, from a new port each (an RST each). A victim
    /// that bounds what it queues stops reading the link: after `--stall-s` seconds without
    /// progress this prints `stalled=yes` (else `stalled=no` once all are written).
    VsockFlood {
        /// The victim domain.
        #[arg(long)]
        peer: u16,
        /// What each packet asks for.
        #[arg(long, value_enum)]
        kind: FloodKind,
        /// The victim's listening port (`--kind credit` connects to it).
        #[arg(long, default_value_t = 5000)]
        port: u32,
        /// Packets to write.
        #[arg(long, default_value_t = 10_000_000)]
        count: u64,
        /// Seconds without progress after which the flood counts as held back.
        #[arg(long, default_value_t = 5)]
        stall_s: u64,
        /// Keep the link open after reporting, until killed (to sample the victim meanwhile).
        #[arg(long)]
        hold: bool,
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
    /// Read until end-of-stream from a `send` peer, comparing every byte with the pattern it
    /// sends; print the byte count and CRC-32 (`pattern=ok`), or fail naming the first byte
    /// that differs.
    Recv {
        /// Also fail unless exactly this many bytes arrive (suffixes K, M, G).
        #[arg(long, value_parser = parse_size)]
        bytes: Option<u64>,
    },
    /// Write a pattern of `--bytes` bytes, then shut down; print the byte count and CRC-32.
    Send {
        /// Bytes to send (suffixes K, M, G).
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
        /// Size of each write.
        #[arg(long, default_value_t = 64 << 10)]
        chunk: usize,
    },
    /// Write a pattern of `--bytes` bytes to an echoing peer while reading the echo back; check
    /// it, print the byte count and CRC-32, then close the link.
    Roundtrip {
        /// Bytes to send (suffixes K, M, G).
        #[arg(long, value_parser = parse_size)]
        bytes: u64,
        /// Size of each write.
        #[arg(long, default_value_t = 16 << 10)]
        chunk: usize,
    },
    /// Virtual sockets over this link (serving side): port 1 echoes every connection, port 2
    /// accepts connections and never reads them; ends when the link does.
    MuxServe,
    /// Virtual sockets over this link (connecting side, against `mux-serve`): a connect to port
    /// 3 must be refused; a writer to port 2 must be held back by credit; `--conns` concurrent
    /// connections to port 1 must each get a 256 KiB round trip back intact.
    MuxCheck {
        /// Concurrent echo connections.
        #[arg(long, default_value_t = 8)]
        conns: usize,
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

/// A byte count as every dombus tool reads one (`4096`, `64K`, `1G`: dombus-rpc's [`Size`]).
fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<Size>().map(|size| size.0)
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
    if let Some(agent) = &args.agent {
        return through_agent(AgentClient::new(agent), args.role).await;
    }
    match &args.socket {
        Some(socket) => {
            // With a token (from the toolstack that created the domain) it attaches as that domain;
            // without, as domain 0 (the toolstack, reading the simulator's key).
            let backend = match (std::env::var(dombus_sim::TOKEN_ENV), args.domid) {
                (_, Some(domid)) if args.boot => {
                    SimBackend::boot_named(socket, Some(DomId(domid)), "dombus-link")
                }
                (Ok(token), None) => SimBackend::attach(socket, &token),
                (_, domid) => SimBackend::attach_from_env(socket, DomId(domid.unwrap_or(0))),
            }
            .with_context(|| format!("attaching to the simulated hypervisor at {}", socket.display()))?;
            run_on(backend, args.role).await
        }
        None => run_on(XenBackend::open().context("opening the Xen backend")?, args.role).await,
    }
}

async fn run_on<B: Backend + Clone>(backend: B, role: Role) -> Result<()> {
    println!("domid={}", backend.domid());
    match role {
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
        Role::FloodRequests { peer, seconds } => flood_requests(&backend, DomId(peer), seconds),
        Role::FloodMaps { seconds } => flood_maps(&backend, seconds),
        Role::VsockFlood { peer, kind, port, count, stall_s, hold } => {
            vsock_flood(backend, DomId(peer), kind, port, count, Duration::from_secs(stall_s), hold).await
        }
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
        Role::VsockPing { to, conns, count, wait_s, reconnect_s, interval_ms } => {
            let vs = VsockDomain::start(backend, VsockConfig::default())?;
            let wait = Duration::from_secs(wait_s);
            let connect = move || {
                let vs = vs.clone();
                async move { vs.connect_wait(to, wait).await }
            };
            vsock_ping(connect, to, conns, count, reconnect_s.map(|r| (r, interval_ms))).await
        }
        Role::AgentStatus | Role::TicksServe { .. } | Role::TicksWatch { .. } => {
            bail!("agent-status, ticks-serve and ticks-watch go through a domain's agent: give --agent PATH")
        }
    }
}

/// The virtual-socket roles, through the domain's agent at `agent`.
async fn through_agent(agent: AgentClient, role: Role) -> Result<()> {
    let at = agent.socket().display().to_string();
    match role {
        Role::VsockEcho { port, park } => {
            let mut listener = agent
                .listen(port)
                .await
                .with_context(|| format!("listening on port {port} through the agent at {at}"))?;
            if let Some(park) = park {
                let mut parking = agent
                    .listen(park)
                    .await
                    .with_context(|| format!("listening on port {park} through the agent at {at}"))?;
                tokio::spawn(async move {
                    let mut parked = Vec::new();
                    while let Ok(s) = parking.accept().await {
                        parked.push(s);
                    }
                });
            }
            println!("domid={}", listener.domain());
            println!("vsock listening port={port}");
            loop {
                let mut s = listener.accept().await.context("accepting")?;
                tokio::spawn(async move {
                    let _ = diag::echo(&mut s).await;
                });
            }
        }
        Role::VsockPing { to, conns, count, wait_s, reconnect_s, interval_ms } => {
            let wait = Some(Duration::from_secs(wait_s));
            let connect = move || {
                let agent = agent.clone();
                async move { agent.connect(Target::Cid(to.cid), to.port, wait).await }
            };
            vsock_ping(connect, to, conns, count, reconnect_s.map(|r| (r, interval_ms))).await
        }
        Role::AgentStatus => {
            let st = agent.status().await.with_context(|| format!("asking the agent at {at}"))?;
            let listening: Vec<String> = st.listening.iter().map(u32::to_string).collect();
            let links: Vec<String> = st.links.iter().map(|(d, n)| format!("{d}:{n}")).collect();
            println!(
                "agent domain={} local={} listening={} links={}",
                st.domain,
                st.local,
                listening.join(","),
                links.join(",")
            );
            Ok(())
        }
        Role::TicksServe { port, wait_s } => ticks_serve(agent, port, Duration::from_secs(wait_s)).await,
        Role::TicksWatch { to, count, restart, patience_s } => {
            let net = dombus_rpc::Net::new().with_agent(agent);
            let client = ticks::TicksClient::new(net, Address::Xen(to));
            let waiting = |phase: &ticks::Phase| {
                println!("ticks phase=start {phase}");
                println!("ticks waiting-for-restart epoch={:016x}", phase.epoch);
            };
            let report =
                ticks::watch(&client, count, restart.then_some(waiting), Duration::from_secs(patience_s))
                    .await?;
            match report.restarted {
                Some((previous, after)) => println!("ticks phase=restart previous={previous:016x} {after}"),
                None => println!("ticks phase=start {}", report.first),
            }
            Ok(())
        }
        _ => bail!(
            "--agent serves the virtual-socket roles only (vsock-echo, vsock-ping, agent-status, \
             ticks-serve, ticks-watch); \
             the others attach to the hypervisor themselves (--socket or --xen)"
        ),
    }
}

/// `ticks-serve`: the ticks service on `port` through `agent`, until killed. Listening is
/// retried for `wait` (the agent frees a dead server's port when it notices its socket closed).
async fn ticks_serve(agent: AgentClient, port: u32, wait: Duration) -> Result<()> {
    let at = agent.socket().display().to_string();
    let server = dombus_rpc::Server::new(dombus_rpc::Net::new().with_agent(agent), Default::default());
    let source = ticks::TickSource::new();
    let epoch = source.epoch();
    let addr = Address::Xen(VsockAddr::new(dombus_transport_xen::vsock::CID_SELF, port));
    let service = source.into_service();
    let until = std::time::Instant::now() + wait;
    let _serving = loop {
        match server.serve(&addr, service.clone()).await {
            Ok(serving) => break serving,
            Err(e) if std::time::Instant::now() < until => {
                eprintln!("listening on port {port} failed ({e}); trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| format!("serving on port {port} through the agent at {at}"));
            }
        }
    };
    println!("ticks serving port={port} epoch={epoch:016x}");
    std::future::pending::<()>().await;
    Ok(())
}

/// `vsock-ping` over connections from `connect`: `conns` at once, `count` round trips each.
/// With `reconnect` (seconds, and the pause between round trips in milliseconds), failed
/// connections are replaced (see [`reconnect::ping`]).
async fn vsock_ping<S, C, F>(
    connect: C,
    to: VsockAddr,
    conns: usize,
    count: usize,
    reconnect: Option<(u64, u64)>,
) -> Result<()>
where
    C: Fn() -> F + Clone + Send + 'static,
    F: Future<Output = std::io::Result<S>> + Send + 'static,
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some((budget_s, interval_ms)) = reconnect else {
        let mut tasks = Vec::new();
        for _ in 0..conns {
            let connect = connect.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = connect().await?;
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
        return Ok(());
    };
    let policy = Reconnect::within(Duration::from_secs(budget_s));
    let interval = Duration::from_millis(interval_ms);
    let mut tasks = Vec::new();
    for i in 0..conns {
        let (connect, policy) = (connect.clone(), policy.clone());
        tasks.push(tokio::spawn(async move {
            reconnect::ping(connect, 64, count, interval, &policy, |event| match event {
                reconnect::Event::Connected { reconnects } => {
                    println!("connected conn={i} reconnects={reconnects}")
                }
                reconnect::Event::Lost { error } => eprintln!(
                    "conn {i}: a round trip failed ({error}); reconnecting, for up to {budget_s} s without a round trip"
                ),
                reconnect::Event::AttemptFailed { error, retry_in } => {
                    eprintln!("conn {i}: reconnect failed ({error}); next attempt in {retry_in:?}")
                }
            })
            .await
            .with_context(|| format!("connection {i}"))
        }));
    }
    let (mut round_trips, mut failed, mut reconnects, mut after) = (0, 0, 0, 0);
    let mut worst: Option<Duration> = None;
    for t in tasks {
        let calls = t.await??;
        round_trips += calls.round_trips;
        failed += calls.failed;
        reconnects += calls.reconnects;
        after += calls.after_reconnect;
        if let Some(lat) = calls.latency {
            worst = Some(worst.map_or(lat.p50, |w| w.max(lat.p50)));
        }
    }
    println!(
        "vsock-ping to={to} conns={conns} round_trips={round_trips} failed={failed} reconnects={reconnects} after_reconnect={after} worst_p50_us={:.2}",
        worst.map_or(0.0, diag::us)
    );
    Ok(())
}

fn config(l: &LinkArgs) -> LinkConfig {
    LinkConfig {
        client_to_server: usize::try_from(l.ring).unwrap_or(usize::MAX),
        server_to_client: usize::try_from(l.ring).unwrap_or(usize::MAX),
        spin: (l.spin_us > 0).then(|| Duration::from_micros(l.spin_us)),
    }
}

async fn act<B: Backend + Clone>(mut link: Link<B>, action: Action) -> Result<()> {
    println!("connected peer={} rings={:?}", link.peer(), link.ring_sizes());
    match action {
        Action::Echo => {
            // A libxenvchan peer has no half-close: it ends by clearing its live byte, which
            // the link reports as the peer gone. For an echo that is simply the end.
            let mut buf = vec![0u8; 64 << 10];
            let mut n = 0u64;
            let how = loop {
                match tokio::io::AsyncReadExt::read(&mut link, &mut buf).await {
                    Ok(0) => break "end-of-stream",
                    Ok(k) => {
                        link.write_all(&buf[..k]).await.context("echoing")?;
                        n += k as u64;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "peer-closed",
                    Err(e) => return Err(e).context("echoing"),
                }
            };
            let _ = link.shutdown().await;
            println!("echoed bytes={n} end={how}");
        }
        Action::Recv { bytes } => {
            let got = diag::recv_pattern(&mut link).await.context("receiving")?;
            let (n, crc) = (got.bytes, got.crc);
            // The counts and CRC are printed either way, for the sender's side to compare.
            let verdict = if got.first_difference.is_none() { "ok" } else { "bad" };
            println!("received bytes={n} crc={crc:08x} pattern={verdict}");
            if let Some(d) = got.first_difference {
                bail!("the stream is not the sent pattern: {} of {n} bytes differ; {d}", got.differing_bytes);
            }
            if let Some(want) = bytes.filter(|&want| want != n) {
                bail!("the stream ended after {n} bytes, expected {want}");
            }
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
        Action::Roundtrip { bytes, chunk } => {
            let t = std::time::Instant::now();
            let echo = diag::roundtrip_checked(&mut link, bytes, chunk).await.context("round trip")?;
            let secs = t.elapsed().as_secs_f64();
            let sent = echo.sent_crc;
            if let Some(d) = echo.first_difference {
                bail!("the echo differs in {} bytes: {d}", echo.differing_bytes);
            }
            if sent != echo.echo_crc {
                bail!("the echo differs: sent crc={sent:08x}, got back crc={:08x}", echo.echo_crc);
            }
            println!("roundtrip bytes={bytes} crc={sent:08x} echo=ok secs={secs:.3}");
            // Dropping the link closes it: the peer sees it go away.
        }
        Action::MuxServe => mux_serve(link).await?,
        Action::MuxCheck { conns } => mux_check(link, conns).await?,
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

/// Serving side of the virtual-socket check: echo on port 1, a reader that never reads on 2.
async fn mux_serve<B: Backend + Clone>(link: Link<B>) -> Result<()> {
    let mux = Mux::spawn(link, SessionConfig::default());
    let echo = mux.listen(1)?;
    let park = mux.listen(2)?;
    tokio::spawn(async move {
        let mut parked = Vec::new();
        while let Ok(s) = park.accept().await {
            parked.push(s);
        }
    });
    let mut served = 0usize;
    while let Ok(mut s) = echo.accept().await {
        served += 1;
        tokio::spawn(async move {
            // The client sends the pattern: check it here too, so that damage is pinned to
            // a direction.
            let port = s.ports().1;
            match diag::echo_pattern(&mut s).await {
                Ok((_, Some(d))) => {
                    eprintln!("what came in from port {port} differs from what was sent: {d}")
                }
                Ok((_, None)) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                Err(e) => eprintln!("echo to port {port} failed: {e}"),
            }
        });
    }
    println!("mux served conns={served}");
    Ok(())
}

/// Connecting side of the virtual-socket check (see `Action::MuxCheck`).
async fn mux_check<B: Backend + Clone>(link: Link<B>, conns: usize) -> Result<()> {
    let config = SessionConfig::default();
    let window = config.buf_alloc as usize;
    let mux = Mux::spawn(link, config);
    match mux.connect(3).await {
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => println!("mux refused port=3"),
        Err(e) => bail!("connect to a port nobody listens on: {e} (expected connection refused)"),
        Ok(_) => bail!("connect to a port nobody listens on succeeded"),
    }
    // A writer to a reader that never reads: it must stop at the credit window.
    let mut stalled = mux.connect(2).await.context("connecting to the parking port")?;
    let (tx, mut rx) = tokio::sync::watch::channel(0usize);
    let writer = tokio::spawn(async move {
        let chunk = vec![0u8; 64 << 10];
        loop {
            if stalled.write_all(&chunk).await.is_err() {
                return;
            }
            tx.send_modify(|n| *n += chunk.len());
        }
    });
    while tokio::time::timeout(Duration::from_millis(500), rx.changed()).await.is_ok_and(|r| r.is_ok()) {}
    let sent = *rx.borrow();
    let held = sent <= window + (64 << 10) && !writer.is_finished();
    println!("mux credit held={} sent={sent} window={window}", if held { "yes" } else { "no" });
    // Meanwhile, concurrent connections on the same link get their data echoed intact.
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mux = mux.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = mux.connect(1).await?;
            let ports = s.ports();
            let echo = diag::roundtrip_checked(&mut s, 256 << 10, 16 << 10).await?;
            std::io::Result::Ok((ports, echo))
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await? {
            Ok((_, echo)) if echo.sent_crc == echo.echo_crc && echo.first_difference.is_none() => ok += 1,
            Ok((ports, echo)) => eprintln!(
                "the echo on port {} came back different: {} bytes differ; {}",
                ports.0,
                echo.differing_bytes,
                echo.first_difference.map_or_else(|| "(only the CRC differs)".into(), |d| d.to_string())
            ),
            Err(e) => eprintln!("an echo connection failed: {e}"),
        }
    }
    println!("mux echo conns={conns} ok={ok}");
    writer.abort();
    Ok(())
}

/// A hostile client: joins by hand, then writes a producer index far beyond the ring.
async fn scribble<B: Backend>(backend: &B, path: &str, server: DomId) -> Result<()> {
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

/// Rewrites the request for a link to `peer` until `seconds` pass (see `Role::FloodRequests`).
fn flood_requests<B: Backend>(backend: &B, peer: DomId, seconds: u64) -> Result<()> {
    let me = backend.domid();
    let path = format!("/local/domain/{}/data/dombus/want/{}", me.0, peer.0);
    let perms = [
        dombus_transport_xen::backend::Perm {
            domid: me,
            kind: dombus_transport_xen::backend::PermKind::None,
        },
        dombus_transport_xen::backend::Perm {
            domid: peer,
            kind: dombus_transport_xen::backend::PermKind::Read,
        },
    ];
    dombus_transport_xen::backend::publish(backend.store(), &path, b"1", &perms)
        .context("publishing the request")?;
    let end = std::time::Instant::now() + Duration::from_secs(seconds);
    let mut n = 0u64;
    while std::time::Instant::now() < end {
        backend.store().write(&path, n.to_string().as_bytes()).context("rewriting the request")?;
        n += 1;
    }
    println!("requests={n}");
    Ok(())
}

/// Maps one self-granted page again and again until `seconds` pass (see `Role::FloodMaps`).
fn flood_maps<B: Backend>(backend: &B, seconds: u64) -> Result<()> {
    let shared = backend.share_pages(backend.domid(), 1, false).context("granting a page to itself")?;
    let refs = dombus_transport_xen::backend::SharedPages::refs(&shared).to_vec();
    let end = std::time::Instant::now() + Duration::from_secs(seconds);
    let (mut maps, mut refused) = (Vec::new(), 0u64);
    while std::time::Instant::now() < end {
        match backend.map_grants(backend.domid(), &refs, false) {
            Ok(m) => maps.push(m),
            Err(_) => refused += 1,
        }
        // Past the limit, do not spin the daemon's thread flat out: it is one request each way.
        if refused > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    println!("maps={} refused={refused}", maps.len());
    Ok(())
}

/// What `vsock-flood` asks the victim to answer.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum FloodKind {
    /// `CREDIT_REQUEST`s on one real connection (each asks for a `CREDIT_UPDATE`).
    Credit,
    /// Packets for connections that do not exist, from a new port each (each asks for an `RST`).
    Rst,
}

/// A hostile virtual-socket peer: joins the link to `peer` by hand, as `VsockDomain` would, and
/// writes `count` packets that each ask for an answer, never reading one. A victim that bounds
/// what it queues stops reading the link, and the flood stalls: after `stall` without progress
/// it reports and, with `hold`, keeps the link open until killed.
async fn vsock_flood<B: Backend + Clone>(
    backend: B,
    peer: DomId,
    kind: FloodKind,
    port: u32,
    count: u64,
    stall: Duration,
    hold: bool,
) -> Result<()> {
    use dombus_transport_xen::backend::{Perm, PermKind, publish};
    use dombus_transport_xen::vsock::packet::{HEADER_LEN, Header, Op};
    let me = backend.domid();
    let cfg = LinkConfig::default();
    // The link set-up of `vsock::domain`: the lower domain serves, the higher one asks for it.
    let mut link = if me < peer {
        let listener = Link::listen(&backend, &format!("data/dombus/link/{}", peer.0), peer, &cfg)
            .context("publishing the link")?;
        tokio::time::timeout(Duration::from_secs(30), listener.accept())
            .await
            .context("the victim did not join the link")?
            .context("accepting the victim")?
    } else {
        let want = format!("/local/domain/{}/data/dombus/want/{}", me.0, peer.0);
        let perms = [Perm { domid: me, kind: PermKind::None }, Perm { domid: peer, kind: PermKind::Read }];
        publish(backend.store(), &want, b"1", &perms).context("asking for the link")?;
        let path = format!("/local/domain/{}/data/dombus/link/{}", peer.0, me.0);
        tokio::time::timeout(Duration::from_secs(30), Link::connect(&backend, &path, peer, &cfg))
            .await
            .context("the victim did not publish the link")?
            .context("joining the link")?
    };
    const SRC: u32 = 50_000;
    if let FloodKind::Credit = kind {
        link.write_all(&Header::new(Op::Request, SRC, port).encode()).await.context("connecting")?;
    }
    let started = std::time::Instant::now();
    let (mut sent, mut next_port, mut stalled) = (0u64, 0u32, false);
    let mut batch = Vec::with_capacity(64 << 10);
    while sent < count {
        batch.clear();
        let n = (count - sent).min(((64 << 10) / HEADER_LEN) as u64);
        for _ in 0..n {
            let h = match kind {
                FloodKind::Credit => Header::new(Op::CreditRequest, SRC, port),
                FloodKind::Rst => {
                    next_port = next_port.wrapping_add(1);
                    Header::new(Op::CreditUpdate, next_port, port)
                }
            };
            batch.extend_from_slice(&h.encode());
        }
        match tokio::time::timeout(stall, link.write_all(&batch)).await {
            Ok(r) => r.context("flooding")?,
            Err(_) => {
                stalled = true;
                break;
            }
        }
        sent += n;
    }
    println!(
        "vsock-flood kind={} packets={sent} stalled={} secs={:.3}",
        match kind {
            FloodKind::Credit => "credit",
            FloodKind::Rst => "rst",
        },
        if stalled { "yes" } else { "no" },
        started.elapsed().as_secs_f64()
    );
    if hold {
        println!("holding the link until killed");
        std::future::pending::<()>().await;
    }
    Ok(())
}
