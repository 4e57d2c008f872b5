//! `dombus`: the toolstack's command-line tool, modelled on `xl`.
//!
//! ```text
//! dombus demo                                   a whole simulated host, driven end to end
//! dombus host up | down | status                the simulated host (hypervisor, backend, storage, network and device-model domains, a guest)
//! dombus storage create disk0 --size 10G --format qcow2 [--domain 2 | --addr ADDR]
//! dombus storage list | info NAME | snapshot-create NAME SNAP | clone-disk SRC NAME [--linked] | …
//! dombus network bridge-create xenbr0 | vif-create 3.0 --bridge xenbr0 | vif-list | events | …
//! dombus qemu start '{"guest":3,"memory_mib":128,"vcpus":1}' | status 3 | disk-add 3 --disk '{…}' | save 3 --path F | …
//! dombus policy rules | add RULE | remove FILE LINE [--teardown] | explain SRC TGT SERVICE
//! dombus policy decision ID | audit | domains | label NAME --type T --tags a,b | links | revoke A B
//! dombus policy status | xsm | lint DIR      the connection manager (the toolstack's side)
//! dombus describe ADDR                          what a server hosts
//! dombus ping ADDR [--count N]                  round-trip latency, p50/p99
//! dombus metrics ADDR                           a server's metrics (Prometheus text)
//! ```
//! Options for every command: `--json` (output for scripts), `--state DIR` (where the host
//! lives), `--sim SOCKET --domid N` or `--xen` (how to reach `xen:` addresses; by default those
//! of the host that is up), `--timeout SECONDS`.
//!
//! Exit status: 0 success, 1 the service answered with an error, 2 usage, 3 refused (nothing
//! there, no such service, denied), 4 the call failed (deadline, connection lost).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Arg, ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use dombus::rpc::cli::{self, NetArgs, ServiceCli, exit};
use dombus::rpc::{Address, Client, ClientConfig, Net, RawClient, error_text, wire};
use dombus::transport::types::DomId;
use dombus_manager::PolicyAdminRequest;
use dombus_services::device_model::DeviceModelRequest;
use dombus_services::network::NetworkRequest;
use dombus_services::storage::{StorageClient, StorageRequest};

mod daemons;
mod demo;
mod host;

use host::StateDir;

#[derive(Parser)]
#[command(name = "dombus", about = "Drive a dombus host: its domains and their services", version)]
struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// Where the host keeps its state [default: $XDG_RUNTIME_DIR/dombus or ~/.local/state/dombus].
    #[arg(long, value_name = "DIR", global = true)]
    state: Option<PathBuf>,
    #[command(flatten)]
    net: NetArgs,
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Bring a simulated host up, call its storage domain as the toolstack, bring it down.
    Demo,
    /// The simulated host: hypervisor, backend domain, service domains.
    Host {
        #[command(subcommand)]
        command: HostCommand,
    },
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
    /// The metrics of the server at ADDR (the built-in call every server answers), in the
    /// Prometheus text format.
    Metrics {
        /// Where.
        addr: Address,
    },
    /// Run one of the host's processes (used by `host up`).
    #[command(hide = true)]
    Daemon {
        #[command(subcommand)]
        daemon: Box<daemons::Daemon>,
    },
}

#[derive(Subcommand)]
enum HostCommand {
    /// Start the simulated hypervisor, the backend domain, the storage and network domains and a
    /// guest.
    Up,
    /// Stop every process of the host (logs and images stay in the state directory).
    Down,
    /// Domains, services (with a ping), links.
    Status,
}

/// A failure and its exit status.
struct Failure(u8, String);

impl Failure {
    fn refused(e: impl std::fmt::Display) -> Failure {
        Failure(exit::REFUSED, e.to_string())
    }
}

/// The command of a service domain's service (`storage`, `network`): every method, from its
/// generated glue, with `--domain` and `--addr` to say which domain.
fn service_command(command: clap::Command, service: &str, about: &'static str) -> clap::Command {
    command
        .about(about)
        .arg(
            Arg::new("domain")
                .long("domain")
                .value_name("DOMID")
                .global(true)
                .value_parser(clap::value_parser!(DomId))
                .help(format!("The {service} domain [default: the host's]")),
        )
        .arg(
            Arg::new("addr")
                .long("addr")
                .value_name("ADDR")
                .global(true)
                .help(format!("The {service} service's address")),
        )
}

/// The `policy` command: the connection manager's admin service, from its generated glue, and
/// `lint DIR`, which checks a policy directory here without any manager.
fn policy_command() -> clap::Command {
    PolicyAdminRequest::command()
        .about("The connection manager's policy, domains, links and audit trail (the toolstack's)")
        .arg(
            Arg::new("addr")
                .long("addr")
                .value_name("ADDR")
                .global(true)
                .help("The admin service [default: the host's, else unix:/run/dombus/manager.sock]"),
        )
        .subcommand(
            clap::Command::new("lint")
                .about("Checks a policy directory as the manager would load it: errors (file:line), rules that never match, skipped files")
                .arg(Arg::new("dir").value_name("DIR").required(true).value_parser(clap::value_parser!(PathBuf))),
        )
}

/// The admin service's address on a host without `--addr` or a simulated host: dom0's local
/// socket, as `dombus-managerd` serves it on a Xen host.
const DEFAULT_ADMIN: &str = "unix:/run/dombus/manager.sock";

async fn run_policy(global: &NetArgs, state: &StateDir, json: bool, m: &ArgMatches) -> Result<u8, Failure> {
    if let Some(("lint", sub)) = m.subcommand() {
        let Some(dir) = sub.get_one::<PathBuf>("dir") else { return Ok(exit::USAGE) };
        let report = dombus_manager::policy::lint(dir);
        if json {
            println!("{}", serde_json::to_string_pretty(&report).unwrap_or_default());
        } else {
            for e in &report.errors {
                println!("error: {e}");
            }
            for w in &report.warnings {
                println!("warning: {w}");
            }
            if report.errors.is_empty() && report.warnings.is_empty() {
                println!("{}: no errors, no warnings", dir.display());
            }
        }
        return Ok(if report.errors.is_empty() { exit::OK } else { exit::FAILED });
    }
    let manifest = state.load().map_err(Failure::refused)?;
    let addr: Address = match (m.get_one::<String>("addr"), &manifest) {
        (Some(a), _) => a.parse().map_err(|e| Failure(exit::USAGE, format!("--addr: {e}")))?,
        (None, Some(h)) => format!("unix:{}", h.admin_socket.display()).parse().map_err(Failure::refused)?,
        (None, None) => DEFAULT_ADMIN.parse().map_err(Failure::refused)?,
    };
    let net = match &addr {
        Address::Unix(_) => Net::new(),
        _ => net_for(global, state)?.0,
    };
    let client =
        Client::<PolicyAdminRequest>::connect(net, addr.clone(), ClientConfig::default(), global.timeout())
            .await
            .map_err(|e| Failure::refused(format!("{addr}: {e}")))?;
    cli::run(&client, global.context(), m, json)
        .await
        .map_err(|e| Failure(cli::call_error_status(&e), cli::cli_error_text(&e)))
}

/// How to reach `xen:` addresses: as the options say if they name a way (`--agent`, `--sim`,
/// `--xen`), else through the toolstack agent of the host that is up, else through the domain's
/// agent at its default socket.
fn net_for(net: &NetArgs, state: &StateDir) -> Result<(Net, Option<host::Manifest>), Failure> {
    let manifest = state.load().map_err(Failure::refused)?;
    let args = match (&manifest, net.sim.is_some() || net.xen || net.agent.is_some()) {
        (Some(m), false) => m.net_args(net.timeout()),
        _ => net.clone(),
    };
    let net = args.net().map_err(Failure::refused)?;
    Ok((net, manifest))
}

/// A client of the service `service` (at `port` of a service domain) that a command's
/// `--addr` or `--domain` names, else the host's.
async fn service_client<Req>(
    global: &NetArgs,
    state: &StateDir,
    m: &ArgMatches,
    service: &str,
    port: u32,
) -> Result<Client<Req>, Failure>
where
    Req: dombus::rpc::wire::Request,
{
    let (net, manifest) = net_for(global, state)?;
    let addr: Address = match (m.get_one::<String>("addr"), m.get_one::<DomId>("domain"), &manifest) {
        (Some(a), _, _) => a.parse().map_err(|e| Failure(exit::USAGE, format!("--addr: {e}")))?,
        (None, Some(d), _) => format!("xen:{d}:{port}").parse().map_err(Failure::refused)?,
        (None, None, Some(m)) => m
            .service_addr(service)
            .ok_or_else(|| Failure::refused(format!("the host has no {service} domain")))?,
        (None, None, None) => {
            return Err(Failure(
                exit::USAGE,
                format!("no host is up in {} and no --domain or --addr given", state.0.display()),
            ));
        }
    };
    Client::<Req>::connect(net, addr.clone(), ClientConfig::default(), global.timeout())
        .await
        .map_err(|e| Failure::refused(format!("{addr}: {e}")))
}

async fn run_network(global: &NetArgs, state: &StateDir, json: bool, m: &ArgMatches) -> Result<u8, Failure> {
    let client =
        service_client::<NetworkRequest>(global, state, m, "network", dombus_services::ports::NETWORK)
            .await?;
    cli::run(&client, global.context(), m, json)
        .await
        .map_err(|e| Failure(cli::call_error_status(&e), cli::cli_error_text(&e)))
}

async fn run_qemu(global: &NetArgs, state: &StateDir, json: bool, m: &ArgMatches) -> Result<u8, Failure> {
    let client = service_client::<DeviceModelRequest>(
        global,
        state,
        m,
        "device-model",
        dombus_services::ports::DEVICE_MODEL,
    )
    .await?;
    cli::run(&client, global.context(), m, json)
        .await
        .map_err(|e| Failure(cli::call_error_status(&e), cli::cli_error_text(&e)))
}

async fn run_storage(global: &NetArgs, state: &StateDir, json: bool, m: &ArgMatches) -> Result<u8, Failure> {
    let client =
        service_client::<StorageRequest>(global, state, m, "storage", dombus_services::ports::STORAGE)
            .await?;
    let progress = watch_progress(&client, m, json);
    let status = cli::run(&client, global.context(), m, json).await;
    progress.finish().await;
    status.map_err(|e| Failure(cli::call_error_status(&e), cli::cli_error_text(&e)))
}

/// The progress of the operation a call runs on an image, shown on stderr while it runs.
struct ProgressWatch {
    task: Option<tokio::task::JoinHandle<()>>,
    /// Whether a progress line is on stderr (its end still to be shown).
    shown: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl ProgressWatch {
    /// Ends the watch once the call answered: lets a progress line on stderr show the
    /// operation's end (its final update, briefly awaited), then stops.
    async fn finish(self) {
        let Some(mut task) = self.task else { return };
        if self.shown.load(std::sync::atomic::Ordering::SeqCst) {
            let _ = tokio::time::timeout(Duration::from_millis(500), &mut task).await;
            if self.shown.load(std::sync::atomic::Ordering::SeqCst) {
                eprintln!();
            }
        }
        task.abort();
    }
}

/// While a call on an image runs, shows the progress of the operation on it (long operations:
/// a full clone) on stderr, from a subscription to the service's progress stream: nothing for
/// an operation that ends within 300 ms, then a line updated as the service reports each
/// percent, ended when the operation ends.
fn watch_progress(client: &Client<StorageRequest>, m: &ArgMatches, json: bool) -> ProgressWatch {
    let shown = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let name = m
        .subcommand()
        .filter(|(method, _)| !["progress", "events", "progress-events"].contains(method))
        .and_then(|(_, sub)| sub.try_get_one::<String>("name").ok().flatten().cloned())
        .and_then(|n| cli::parse_value::<String>(&n).ok());
    let Some(name) = name.filter(|_| !json) else { return ProgressWatch { task: None, shown } };
    let storage = StorageClient::from(client.clone());
    let on_stderr = shown.clone();
    let task = tokio::spawn(async move {
        use dombus::Update;
        use futures::StreamExt as _;
        let started = Instant::now();
        let mut updates = storage.progress_events(Some(name)).wait(Duration::from_secs(5));
        while let Some(update) = updates.next().await {
            let now: Vec<_> = match update {
                Ok(Update::Event { event, .. }) => vec![event],
                Ok(Update::Resync { snapshot, .. }) => snapshot.unwrap_or_default(),
                // A failed poll: the subscription retries (or has ended, after a final error).
                Err(_) => continue,
            };
            for p in now {
                let shown = on_stderr.load(std::sync::atomic::Ordering::SeqCst);
                if !shown && (p.outcome.is_some() || started.elapsed() < Duration::from_millis(300)) {
                    continue;
                }
                if p.outcome.is_some() {
                    // The line shows how far it came; the call's answer says how it ended.
                    eprintln!();
                    on_stderr.store(false, std::sync::atomic::Ordering::SeqCst);
                    return;
                }
                eprint!("\r  {}: {:5.1}%", p.operation, p.percent);
                on_stderr.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
    });
    ProgressWatch { task: Some(task), shown }
}

async fn run_builtin(cli: &Cli, state: &StateDir) -> Result<u8, Failure> {
    let (Top::Describe { addr } | Top::Ping { addr, .. } | Top::Metrics { addr }) = &cli.command else {
        return Ok(exit::USAGE);
    };
    let (net, _) = net_for(&cli.net, state)?;
    let client = RawClient::new(net, addr.clone(), wire::BUILTIN_SERVICE, ClientConfig::default());
    client.connect_now(cli.net.timeout()).await.map_err(|e| Failure::refused(format!("{addr}: {e}")))?;
    let failed = |e: dombus::rpc::RpcError| Failure(exit::CALL, error_text(&e));
    match &cli.command {
        Top::Describe { .. } => {
            let services = client.describe(cli.net.context()).await.map_err(failed)?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&services).unwrap_or_default());
            } else {
                println!("{}", cli::render_descriptors(&services));
            }
        }
        Top::Ping { count, .. } => {
            let mut laps = Vec::with_capacity(*count as usize);
            for _ in 0..(*count).max(1) {
                let t = Instant::now();
                client.ping(cli.net.context()).await.map_err(failed)?;
                laps.push(t.elapsed());
            }
            let s = demo::Summary::of(&mut laps);
            if cli.json {
                let v = serde_json::json!({ "addr": client.addr(), "count": laps.len(),
                    "p50_us": s.p50_us, "p99_us": s.p99_us, "max_us": s.max_us });
                println!("{v}");
            } else {
                println!("{}: {} round trips, {s}", client.addr(), laps.len());
            }
        }
        Top::Metrics { .. } => {
            let text = client.metrics(cli.net.context()).await.map_err(failed)?;
            if cli.json {
                println!("{}", serde_json::json!({ "addr": client.addr(), "prometheus": text }));
            } else {
                print!("{text}");
            }
        }
        _ => {}
    }
    Ok(exit::OK)
}

async fn run_host(cli: &Cli, state: StateDir, command: &HostCommand) -> Result<u8, Failure> {
    match command {
        HostCommand::Up => {
            if !cli.json {
                println!("bringing a simulated host up in {}", state.0.display());
            }
            demo::ensure_tools().map_err(Failure::refused)?;
            let host = host::up(state, cli.json).await.map_err(|e| Failure::refused(format!("{e:#}")))?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&host.manifest).unwrap_or_default());
            } else {
                println!(
                    "host up: `dombus host status`, `dombus storage list`, `dombus network vif-list`, `dombus qemu list`, `dombus host down`"
                );
            }
        }
        HostCommand::Down => {
            let n = host::down(state, cli.json).await.map_err(|e| Failure::refused(format!("{e:#}")))?;
            if cli.json {
                println!("{}", serde_json::json!({ "stopped": n }));
            } else {
                println!("host down: {n} processes stopped");
            }
        }
        HostCommand::Status => {
            let s = host::status(state).await.map_err(|e| Failure::refused(format!("{e:#}")))?;
            if cli.json {
                println!("{}", serde_json::to_string_pretty(&s).unwrap_or_default());
            } else {
                println!("{}", host::render_status(&s));
            }
        }
    }
    Ok(exit::OK)
}

async fn run(matches: ArgMatches) -> Result<u8, Failure> {
    let usage = |e: clap::Error| Failure(exit::USAGE, e.to_string());
    match matches.subcommand() {
        Some(("storage", m)) => {
            let net = NetArgs::from_arg_matches(&matches).map_err(usage)?;
            let state = StateDir::resolve(matches.get_one::<PathBuf>("state").cloned());
            return run_storage(&net, &state, matches.get_flag("json"), m).await;
        }
        Some(("network", m)) => {
            let net = NetArgs::from_arg_matches(&matches).map_err(usage)?;
            let state = StateDir::resolve(matches.get_one::<PathBuf>("state").cloned());
            return run_network(&net, &state, matches.get_flag("json"), m).await;
        }
        Some(("qemu", m)) => {
            let net = NetArgs::from_arg_matches(&matches).map_err(usage)?;
            let state = StateDir::resolve(matches.get_one::<PathBuf>("state").cloned());
            return run_qemu(&net, &state, matches.get_flag("json"), m).await;
        }
        Some(("policy", m)) => {
            let net = NetArgs::from_arg_matches(&matches).map_err(usage)?;
            let state = StateDir::resolve(matches.get_one::<PathBuf>("state").cloned());
            return run_policy(&net, &state, matches.get_flag("json"), m).await;
        }
        _ => {}
    }
    let cli = Cli::from_arg_matches(&matches).map_err(usage)?;
    let state = StateDir::resolve(cli.state.clone());
    match &cli.command {
        Top::Demo => demo::run(state_for_demo(&cli), cli.json)
            .await
            .map(|()| exit::OK)
            .map_err(|e| Failure(exit::CALL, format!("{e:#}"))),
        Top::Host { command } => run_host(&cli, state, command).await,
        Top::Describe { .. } | Top::Ping { .. } | Top::Metrics { .. } => run_builtin(&cli, &state).await,
        Top::Daemon { .. } => Ok(exit::USAGE),
    }
}

/// The demo's state: `--state` if given, else a fresh directory of its own (removed after), so
/// it never touches a host that is up.
fn state_for_demo(cli: &Cli) -> Option<StateDir> {
    cli.state.clone().map(StateDir)
}

fn main() -> ExitCode {
    let command = Cli::command()
        .subcommand(service_command(
            StorageRequest::command(),
            "storage",
            "Disk images in a storage domain (qemu-img)",
        ))
        .subcommand(service_command(
            NetworkRequest::command(),
            "network",
            "Bridges and vifs in a network domain (netlink)",
        ))
        .subcommand(service_command(
            DeviceModelRequest::command().name("qemu"),
            "device-model",
            "Guests' qemu device models in a device-model domain (QMP)",
        ))
        .subcommand(policy_command());
    let matches = match command.try_get_matches() {
        Ok(m) => m,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::USAGE } else { exit::OK });
        }
    };
    // The host's processes run without a tokio runtime of this function's making.
    if matches.subcommand_name() == Some("daemon") {
        let Ok(Cli { command: Top::Daemon { daemon }, .. }) = Cli::from_arg_matches(&matches) else {
            return ExitCode::from(exit::USAGE);
        };
        return match daemons::run(*daemon) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("dombus daemon: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    // One thread, as the daemons (daemons::runtime says why); blocking work goes to tokio's
    // blocking pool.
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dombus: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let status = rt.block_on(async move {
        match run(matches).await {
            Ok(status) => status,
            Err(Failure(status, msg)) => {
                eprintln!("dombus: {msg}");
                status
            }
        }
    });
    ExitCode::from(status)
}
