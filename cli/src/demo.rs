//! `dombus demo`: brings a simulated host up, drives its storage domain as the toolstack through
//! the generated clients (each call printed with what it did and its round trip, and the image
//! events it caused as a subscription receives them), prints a latency summary, shows the
//! connection manager at work, drives the network domain (bridge, vifs, real traffic between
//! two guests' namespaces), and brings the host down.

mod device_model;
mod network;

use std::fmt;
use std::future::Future;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dombus::Update;
use dombus::rpc::transport::AgentClient;
use dombus::rpc::{Address, ClientConfig, RawClient, RpcError, error_text, wire};
use dombus_services::storage::{
    DiskInfo, Format, ImageEvent, Size, SnapshotInfo, StorageClient, StorageError,
};
use dombus_tools::diag::percentile;
use futures::StreamExt as _;

use crate::host::{self, Host, StateDir, context};

/// Latency figures of a series of round trips.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Summary {
    /// Median, µs.
    pub p50_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Slowest, µs.
    pub max_us: f64,
}

impl Summary {
    /// Of `laps` (sorted in place), by the project's one percentile definition (nearest rank,
    /// [`percentile`]); all zero for no laps.
    pub fn of(laps: &mut [Duration]) -> Summary {
        laps.sort_unstable();
        let at = |p: f64| percentile(laps, p).as_secs_f64() * 1e6;
        Summary { p50_us: at(50.0), p99_us: at(99.0), max_us: at(100.0) }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs", self.p50_us, self.p99_us, self.max_us)
    }
}

/// Makes sure `qemu-img` runs (the storage domain needs it) and, if it can, that
/// `qemu-system-x86_64` does (the device-model domain's): as root, installs Debian's packages if
/// they are missing; otherwise says how.
pub fn ensure_tools() -> anyhow::Result<()> {
    ensure_tool("qemu-img", "qemu-utils", "the storage domain runs it")?;
    // The device-model domain runs qemu; a host without it runs without that domain.
    if let Err(e) = ensure_tool("qemu-system-x86_64", "qemu-system-x86", "the device-model domain runs it") {
        eprintln!("dombus: {e:#}: the host runs without a device-model domain");
    }
    Ok(())
}

/// Installs Debian's `package` (as root, with apt-get) if `tool` does not run.
fn ensure_tool(tool: &str, package: &str, why: &str) -> anyhow::Result<()> {
    let works = || Command::new(tool).arg("--version").output().is_ok_and(|o| o.status.success());
    if works() {
        return Ok(());
    }
    if !rustix::process::geteuid().is_root() {
        bail!("{tool} is not installed ({why}): apt-get install {package}");
    }
    eprintln!("{tool} is missing: installing Debian's {package} (apt-get)…");
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
    };
    if !apt(&["install", "-y", "-q", package]).unwrap_or(false) {
        apt(&["update", "-q"]).context("apt-get update")?;
        if !apt(&["install", "-y", "-q", package]).with_context(|| format!("apt-get install {package}"))? {
            bail!("apt-get install {package} failed");
        }
    }
    if !works() {
        bail!("{package} installed but {tool} does not run");
    }
    Ok(())
}

fn size(bytes: u64) -> String {
    // One decimal in the largest unit that keeps the number ≥ 1.
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift {
            return format!("{:.1}{unit}", bytes as f64 / (1u64 << shift) as f64).replace(".0", "");
        }
    }
    format!("{bytes}B")
}

fn disk(d: &DiskInfo) -> String {
    let backing = d.backing.as_ref().map(|b| format!(", linked clone of {b:?}")).unwrap_or_default();
    let snaps = if d.snapshots > 0 { format!(", {} snapshot(s)", d.snapshots) } else { String::new() };
    format!(
        "{} {:?}: {} virtual, {} on disk{backing}{snaps}",
        d.format.as_str(),
        d.name,
        size(d.virtual_size),
        size(d.actual_size)
    )
}

/// An image event, in a few words.
fn event(e: &ImageEvent) -> String {
    match e {
        ImageEvent::Created(d) => format!("created {}", disk(d)),
        ImageEvent::Cloned { source, linked, image } => {
            format!("cloned {source:?} ({}) → {}", if *linked { "linked" } else { "full" }, disk(image))
        }
        ImageEvent::Resized(d) => format!("resized {}", disk(d)),
        ImageEvent::SnapshotCreated { image, snapshot } => {
            format!("snapshot {snapshot:?} of {:?} taken", image.name)
        }
        ImageEvent::SnapshotReverted { image, snapshot } => {
            format!("{:?} reverted to snapshot {snapshot:?}", image.name)
        }
        ImageEvent::SnapshotDeleted { image, snapshot } => {
            format!("snapshot {snapshot:?} of {:?} deleted", image.name)
        }
        ImageEvent::Deleted { name, .. } => format!("deleted {name:?}"),
        ImageEvent::Adopted(d) => format!("adopted {}", disk(d)),
    }
}

/// Subscribes to the storage domain's image events and prints each as it arrives, until it has
/// printed the deletion of `last` (or the task is aborted); answers how many it printed. Says on
/// `subscribed` when the subscription stands (its first update came).
async fn print_events(
    storage: StorageClient,
    last: &'static str,
    subscribed: tokio::sync::oneshot::Sender<()>,
) -> usize {
    let mut subscribed = Some(subscribed);
    let mut events = storage.events(None).wait(Duration::from_secs(5));
    let mut seen = 0;
    while let Some(update) = events.next().await {
        match update {
            Ok(Update::Resync { snapshot, reason, .. }) => {
                let images = snapshot.map_or(0, |s| s.len());
                println!("  {:<46} {reason}: {images} image(s) now", "events() subscription");
                if let Some(tx) = subscribed.take() {
                    let _ = tx.send(());
                }
            }
            Ok(Update::Event { cursor, event: e }) => {
                seen += 1;
                println!("  {:<46} {}", format!("  event {cursor}"), event(&e));
                if matches!(&e, ImageEvent::Deleted { name, .. } if name == last) {
                    break;
                }
            }
            Err(e) if dombus::rpc::events::is_final(&e) => {
                println!("  events() subscription ended: {}", error_text(&e));
                break;
            }
            Err(_) => {}
        }
    }
    seen
}

/// A list result as `N <what>: a, b, c`.
fn names<T>(r: &Result<Vec<T>, StorageError>, what: &str, name: impl Fn(&T) -> &str) -> String {
    match r {
        Ok(l) => format!("{} {what}: {}", l.len(), l.iter().map(name).collect::<Vec<_>>().join(", ")),
        Err(e) => format!("error: {e}"),
    }
}

/// Runs one toolstack call: prints what it asked, what came back, and how long it took.
async fn call<T, F>(
    what: &str,
    fut: F,
    show: impl FnOnce(&Result<T, StorageError>) -> String,
) -> anyhow::Result<Result<T, StorageError>>
where
    F: Future<Output = Result<Result<T, StorageError>, RpcError>>,
{
    let t = Instant::now();
    let r = fut.await.map_err(|e| anyhow::anyhow!("{what}: {}", error_text(&e)))?;
    let took = t.elapsed();
    println!("  {what:<46} {:>8.2} ms  {}", took.as_secs_f64() * 1e3, show(&r));
    Ok(r)
}

fn ok_or<T>(what: &str, r: Result<T, StorageError>) -> anyhow::Result<T> {
    r.map_err(|e| anyhow::anyhow!("{what}: the storage domain refused: {e}"))
}

/// `n` calls of `f`, one at a time: prints and returns their latency (a method's own `Err`
/// counts as a round trip; a failed call stops the series).
async fn timed<T, F, Fut>(what: &str, n: usize, mut f: F) -> anyhow::Result<Summary>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RpcError>>,
{
    let mut laps = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f().await.map_err(|e| anyhow::anyhow!("{what}: {}", error_text(&e)))?;
        laps.push(t.elapsed());
    }
    let summary = Summary::of(&mut laps);
    println!("  {what:<46} {summary}");
    Ok(summary)
}

/// The toolstack's calls, through the generated clients.
async fn drive(host: &Host) -> anyhow::Result<serde_json::Value> {
    let net = host.net.clone().context("the host has no toolstack connection")?;
    let storage_addr: Address = host.manifest.service_addr("storage").context("no storage domain")?;
    println!(
        "\n2. The toolstack (domain {}) calls the storage domain (domain {}) at {storage_addr}",
        host::BACKEND,
        host::STORAGE
    );
    let storage = StorageClient::connect(net.clone(), storage_addr.clone())
        .await
        .context("connecting to the storage service")?;
    let d = Duration::from_secs(60);
    let show_disk = |r: &Result<DiskInfo, StorageError>| match r {
        Ok(d) => disk(d),
        Err(e) => format!("error: {e}"),
    };
    let show_unit = |r: &Result<(), StorageError>| match r {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("error: {e}"),
    };
    // The toolstack watches the images while it changes them: each change the storage domain
    // makes comes as an event of this subscription (its first update is the list as it is).
    let (subscribed, standing) = tokio::sync::oneshot::channel();
    let watcher = tokio::spawn(print_events(storage.clone(), "demo", subscribed));
    // Its start before the first call: otherwise the snapshot, not an event, would show it.
    if tokio::time::timeout(Duration::from_secs(10), standing).await.map_or(true, |r| r.is_err()) {
        bail!("the events subscription did not start within 10 s");
    }

    let r = call(
        "create(\"demo\", 1G, qcow2)",
        storage.create(context(d), "demo".into(), Size(1 << 30), Some(Format::Qcow2), None),
        show_disk,
    )
    .await?;
    ok_or("create", r)?;
    let r = call(
        "snapshot_create(\"demo\", \"fresh\")",
        storage.snapshot_create(context(d), "demo".into(), "fresh".into()),
        |r| match r {
            Ok(s) => format!("snapshot {:?} (id {})", s.name, s.id),
            Err(e) => format!("error: {e}"),
        },
    )
    .await?;
    ok_or("snapshot_create", r)?;
    let r = call(
        "resize(\"demo\", 2G)",
        storage.resize(context(d), "demo".into(), Size(2 << 30), false),
        show_disk,
    )
    .await?;
    ok_or("resize", r)?;
    let r = call(
        "resize(\"demo\", 1G) without force",
        storage.resize(context(d), "demo".into(), Size(1 << 30), false),
        |r| match r {
            Ok(d) => format!("unexpectedly allowed: {}", disk(d)),
            Err(e) => format!("refused, as it must be: {e}"),
        },
    )
    .await?;
    if r.is_ok() {
        bail!("the storage domain shrank an image without force");
    }
    let r = call(
        "clone_disk(\"demo\" → \"vm1\", linked)",
        storage.clone_disk(context(d), "demo".into(), "vm1".into(), true, None),
        show_disk,
    )
    .await?;
    ok_or("clone_disk", r)?;
    let r = call("list()", storage.list(context(d)), |r| names(r, "images", |d: &DiskInfo| d.name.as_str()))
        .await?;
    ok_or("list", r)?;
    let r = call("info(\"vm1\")", storage.info(context(d), "vm1".into()), show_disk).await?;
    ok_or("info", r)?;
    let r = call("snapshot_list(\"demo\")", storage.snapshot_list(context(d), "demo".into()), |r| {
        names(r, "snapshot(s)", |s: &SnapshotInfo| s.name.as_str())
    })
    .await?;
    ok_or("snapshot_list", r)?;
    let r =
        call("delete(\"demo\") while vm1 is on it", storage.delete(context(d), "demo".into()), |r| match r {
            Ok(()) => "unexpectedly allowed".to_string(),
            Err(e) => format!("refused, as it must be: {e}"),
        })
        .await?;
    if r.is_ok() {
        bail!("the storage domain deleted an image a linked clone uses");
    }
    ok_or("delete", call("delete(\"vm1\")", storage.delete(context(d), "vm1".into()), show_unit).await?)?;
    ok_or("delete", call("delete(\"demo\")", storage.delete(context(d), "demo".into()), show_unit).await?)?;
    let r = call("info(\"demo\")", storage.info(context(d), "demo".into()), show_disk).await?;
    if !matches!(r, Err(StorageError::NotFound { .. })) {
        bail!("a deleted image is still there");
    }
    // The last event (the deletion of "demo") is published before the call answers: it is on
    // its way, if not printed yet.
    let events = match tokio::time::timeout(Duration::from_secs(5), watcher).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => bail!("the events subscription failed: {e}"),
        Err(_) => bail!("the events of the storage calls did not all arrive within 5 s"),
    };
    if events != 6 {
        bail!("the subscription received {events} image events; the calls made 6 changes");
    }

    println!("\n3. Round trips over the Xen link (simulated hypervisor, event-channel wake-ups)");
    let raw =
        RawClient::new(net.clone(), storage_addr.clone(), wire::BUILTIN_SERVICE, ClientConfig::default());
    let ping = timed("ping, storage domain (1000 round trips)", 1000, || raw.ping(context(d))).await?;
    let list = timed("storage.list(), typed call (200)", 200, || storage.list(context(d))).await?;
    let together = together(host, &storage_addr).await?;
    let policy = policy(host).await?;
    let network = network::run(host).await?;
    let device_model = device_model::run(host).await?;
    Ok(serde_json::json!({
        "network": network,
        "device_model": device_model,
        "ping": ping,
        "storage_list": list,
        "storage_events": events,
        "commands_at_once": together,
        "policy": policy,
    }))
}

/// Step 5: the connection manager. The guest's call to the storage domain is denied (default
/// deny), the toolstack adds a rule, the same call succeeds; the audit trail's lines.
async fn policy(host: &Host) -> anyhow::Result<serde_json::Value> {
    let guest_agent = host.state.domain_agent(host::GUEST_NAME);
    println!(
        "\n5. The connection manager: a process of the guest ({}, domain {}) calls the storage domain",
        host::GUEST_NAME,
        host::GUEST
    );
    let exe = std::env::current_exe().context("finding this executable")?;
    let guest_call = || {
        tokio::process::Command::new(&exe)
            .arg("--state")
            .arg(&host.state.0)
            .arg("--agent")
            .arg(&guest_agent)
            .args(["--timeout", "10", "storage", "list"])
            .kill_on_drop(true)
            .output()
    };
    let first = guest_call().await.context("running the guest's command")?;
    let denied = String::from_utf8_lossy(&first.stderr).trim().to_string();
    if first.status.success() {
        bail!("the guest reached the storage domain without a rule allowing it");
    }
    println!("  dombus storage list (as {})   refused: {denied}", host::GUEST_NAME);
    let manager = host.manifest.admin().await?;
    let d = Duration::from_secs(10);
    let rule = format!("storage {} @tag:storage allow", host::GUEST_NAME);
    let added = manager
        .add(context(d), rule.clone(), None, None)
        .await
        .map_err(|e| anyhow::anyhow!(error_text(&e)))?
        .map_err(|e| anyhow::anyhow!("adding {rule:?}: {e}"))?;
    println!("  the toolstack adds a rule: dombus policy add {rule:?}   → {}", added.at);
    let second = guest_call().await.context("running the guest's command")?;
    let listed = String::from_utf8_lossy(&second.stdout).trim().to_string();
    if !second.status.success() {
        bail!(
            "the guest's call failed after the rule allowed it: {}",
            String::from_utf8_lossy(&second.stderr)
        );
    }
    println!(
        "  dombus storage list (as {})   ok: {}",
        host::GUEST_NAME,
        if listed.is_empty() { "no images" } else { &listed }
    );
    let audit = manager
        .audit(context(d), Some(4))
        .await
        .map_err(|e| anyhow::anyhow!(error_text(&e)))?
        .map_err(|e| anyhow::anyhow!("reading the audit trail: {e}"))?;
    println!("  the audit trail's newest decisions (dombus policy audit):");
    for r in &audit {
        println!(
            "    {} decision {} {} {}({}) → {}({}) {} port {} rule {}",
            r.time,
            r.decision,
            if r.result == dombus_manager::audit::Verdict::Allow { "allow" } else { "deny " },
            r.source.name,
            r.source.domid,
            r.target.name.as_deref().unwrap_or(&r.target.requested),
            r.target.domid.map_or("-".to_string(), |d| d.to_string()),
            r.service,
            r.port,
            r.rule.as_deref().unwrap_or("(none: default deny)")
        );
    }
    Ok(serde_json::json!({ "denied": denied, "rule": added.at, "audit": audit }))
}

/// Step 4: three `dombus` commands at once — three more processes of the toolstack's domain —
/// each pinging the storage domain through the domain's agent, then what the agent holds.
async fn together(host: &Host, storage: &Address) -> anyhow::Result<serde_json::Value> {
    const COMMANDS: usize = 3;
    println!(
        "\n4. {COMMANDS} more processes of the toolstack's domain at once, through its agent ({})",
        host.manifest.agent_socket.display()
    );
    let exe = std::env::current_exe().context("finding this executable")?;
    let children = (0..COMMANDS)
        .map(|_| {
            tokio::process::Command::new(&exe)
                .arg("--state")
                .arg(&host.state.0)
                .args(["ping", &storage.to_string(), "--count", "300"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .context("starting a dombus command")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut lines = Vec::new();
    for child in children {
        let pid = child.id().unwrap_or(0);
        let out = child.wait_with_output().await?;
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if !out.status.success() {
            bail!("a dombus command failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr));
        }
        println!("  dombus ping (pid {pid:<7}) {text}");
        lines.push(text);
    }
    let status =
        AgentClient::new(&host.manifest.agent_socket).status().await.context("the toolstack's agent")?;
    let links: Vec<String> =
        status.links.iter().map(|(d, n)| format!("domain {d} ({n} connection(s) open)")).collect();
    println!(
        "  dom0's agent holds one link per domain (every domain links to the backend): {}",
        links.join(", ")
    );
    Ok(
        serde_json::json!({ "commands": lines, "links": status.links.iter().map(|(d, n)| (d.0, *n)).collect::<Vec<_>>() }),
    )
}

/// `dombus demo`.
pub async fn run(state: Option<StateDir>, json: bool) -> anyhow::Result<()> {
    ensure_tools()?;
    let own = state.is_none();
    let state = state.unwrap_or_else(|| {
        StateDir(std::env::temp_dir().join(format!("dombus-demo-{}", std::process::id())))
    });
    println!("dombus demo: a Xen host simulated on this machine — separate processes, shared memory,");
    println!("event channels and a store with Xen's semantics — driven by the toolstack over dombus RPC.\n");
    println!("1. Host up (state in {})", state.0.display());
    // The host's processes have a process group of their own (a Ctrl-C meant for `dombus host
    // up` must not stop them): an interrupted demo brings its host down itself. Listening from
    // here on, so that a Ctrl-C while the host comes up waits for it and then takes it down.
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let t = Instant::now();
    let host = host::up(state.clone(), false).await?;
    println!("  host up in {:.0} ms", t.elapsed().as_secs_f64() * 1e3);
    let pids: Vec<u32> = host.manifest.procs.iter().map(|p| p.pid).collect();
    let result = tokio::select! {
        r = drive(&host) => r,
        _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted")),
    };
    println!("\n8. Host down");
    let stopped = host.down(false).await;
    let stray: Vec<u32> =
        pids.iter().copied().filter(|&p| std::path::Path::new(&format!("/proc/{p}")).exists()).collect();
    if own {
        let _ = std::fs::remove_dir_all(&state.0);
    }
    let figures = result?;
    let n = stopped?;
    if !stray.is_empty() {
        bail!("processes still running after host down: {stray:?}");
    }
    println!("  {n} processes stopped, none left running");
    if json {
        println!("{figures}");
    }
    println!("\ndemo complete");
    Ok(())
}
