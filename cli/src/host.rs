//! `dombus host up | down | status`: a whole dombus host on one machine without Xen — the
//! simulated hypervisor; dom0, the backend domain with the connection manager, which is also the
//! toolstack's domain as on Xen; the service domains (the storage domain, the network domain
//! in a network namespace of its own where this user may make one, and the device-model domain
//! where qemu is installed, in the network domain's namespace); and a guest — each a
//! separate process with its own domain id, all state in one directory. Every domain has an
//! agent: dom0's runs in the backend daemon, and every `dombus` command reaches the host through
//! it (any number at once); each service daemon is its domain's agent in-process and serves the
//! domain's other processes on its domain's socket; the guest's is a `dombusd` of its own.
//!
//! ```text
//! <state>/host.json               what runs: processes, domain ids, services and addresses
//! <state>/simxen.sock             the simulated hypervisor's socket
//! <state>/agent.sock              dom0's agent (the toolstack's processes)
//! <state>/manager.sock            the connection manager's admin service, for dom0's processes
//! <state>/policy/*.policy         the connection manager's policy
//! <state>/manager/                its labels and audit trail (audit.jsonl)
//! <state>/domains/<name>/agent.sock  each other domain's agent
//! <state>/logs/*.log              one log per process
//! <state>/images/                 the storage domain's disk images
//! <state>/netns/dom<id>           the guests' network namespaces (the network domain's vifs)
//! <state>/qemu/dom<id>            each guest's qemu's working directory (the device-model domain)
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use dombus::rpc::cli::NetArgs;
use dombus::rpc::transport::AgentClient;
use dombus::rpc::{Address, ClientConfig, Net, RawClient, wire};
use dombus::sim::{SimBackend, TOKEN_ENV};
use dombus::transport::types::DomId;
use dombus_manager::PolicyAdminClient;
use dombus_manager::admin::DomainInfo;
use dombus_services::ports;
use serde::{Deserialize, Serialize};

/// The backend domain's id on a simulated host: dom0, also the toolstack's (this tool's).
pub const BACKEND: DomId = DomId(0);
/// The storage domain's id on a simulated host.
pub const STORAGE: DomId = DomId(2);
/// The guest's id on a simulated host.
pub const GUEST: DomId = DomId(3);
/// The network domain's id on a simulated host.
pub const NETWORK: DomId = DomId(4);
/// The device-model domain's id on a simulated host.
pub const DEVICE_MODEL: DomId = DomId(5);
/// The guest's name.
pub const GUEST_NAME: &str = "guest1";

/// The policy a new host starts with: the toolstack may call every domain; nothing else.
pub const DEFAULT_POLICY: &str = "\
# The policy a dombus host starts with (dombus host up). Rules: SERVICE SOURCE TARGET ACTION,
# first match wins, no match denies; see docs/manager.md. Add rules with `dombus policy add`
# (into 50-admin.policy, read before this file) or in a file of your own.

# The toolstack may call every service of every domain.
*    @toolstack    *    allow

# The device-model domain asks the storage and network domains about the images and vifs the
# toolstack gives its guests' device models.
storage    device-model    storage    allow
network    device-model    network    allow
";

/// A service a process of the host serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEntry {
    /// The service's name (`storage`).
    pub name: String,
    /// Its address (`xen:2:5100`).
    pub addr: String,
}

/// How long each start-up step may take.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a process has to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a host keeps its state.
#[derive(Debug, Clone)]
pub struct StateDir(pub PathBuf);

impl StateDir {
    /// `--state`, else `$DOMBUS_STATE`, else `$XDG_RUNTIME_DIR/dombus`, else
    /// `~/.local/state/dombus`, else `/tmp/dombus-<uid>`.
    pub fn resolve(explicit: Option<PathBuf>) -> StateDir {
        if let Some(p) = explicit.or_else(|| std::env::var_os("DOMBUS_STATE").map(PathBuf::from)) {
            return StateDir(p);
        }
        if let Some(run) = std::env::var_os("XDG_RUNTIME_DIR") {
            return StateDir(PathBuf::from(run).join("dombus"));
        }
        if let Some(home) = std::env::var_os("HOME") {
            return StateDir(PathBuf::from(home).join(".local/state/dombus"));
        }
        StateDir(std::env::temp_dir().join(format!("dombus-{}", rustix::process::getuid().as_raw())))
    }

    fn manifest(&self) -> PathBuf {
        self.0.join("host.json")
    }
    /// The simulated hypervisor's socket.
    pub fn socket(&self) -> PathBuf {
        self.0.join("simxen.sock")
    }
    /// The toolstack domain's agent: what the tool reaches the host through.
    pub fn agent(&self) -> PathBuf {
        self.0.join("agent.sock")
    }
    /// The agent of the domain `name` (other than dom0).
    pub fn domain_agent(&self, name: &str) -> PathBuf {
        self.0.join("domains").join(name).join("agent.sock")
    }
    /// The connection manager's admin service, for dom0's processes.
    pub fn admin_socket(&self) -> PathBuf {
        self.0.join("manager.sock")
    }
    /// The connection manager's policy directory.
    pub fn policy(&self) -> PathBuf {
        self.0.join("policy")
    }
    /// The connection manager's labels and audit trail.
    pub fn manager(&self) -> PathBuf {
        self.0.join("manager")
    }
    fn logs(&self) -> PathBuf {
        self.0.join("logs")
    }
    /// Where the network domain holds the guests' network namespaces.
    pub fn guest_netns(&self) -> PathBuf {
        self.0.join("netns")
    }
    /// The device-model domain's directory: each guest's qemu works in `dom<guest>` there.
    pub fn device_models(&self) -> PathBuf {
        self.0.join("qemu")
    }
    /// The storage domain's image directory.
    pub fn images(&self) -> PathBuf {
        self.0.join("images")
    }

    /// The running host's manifest, if there is one.
    pub fn load(&self) -> anyhow::Result<Option<Manifest>> {
        match std::fs::read(self.manifest()) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).with_context(|| {
                format!(
                    "{} is damaged; remove it after checking no dombus process runs",
                    self.manifest().display()
                )
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", self.manifest().display())),
        }
    }

    fn save(&self, m: &Manifest) -> anyhow::Result<()> {
        let tmp = self.0.join("host.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(m)?)?;
        std::fs::rename(&tmp, self.manifest())?;
        Ok(())
    }
}

/// One process of the host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proc {
    /// Its name (`hypervisor`, `backend`, `storage`).
    pub name: String,
    /// Its domain id (none for the hypervisor).
    pub domid: Option<DomId>,
    /// What it is for.
    pub role: String,
    /// Its process id.
    pub pid: u32,
    /// Its log.
    pub log: PathBuf,
    /// What it serves.
    pub services: Vec<ServiceEntry>,
    /// Its domain's agent, if it is one.
    #[serde(default)]
    pub agent: Option<PathBuf>,
}

/// What runs on a host (`host.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The simulated hypervisor's socket.
    pub sim_socket: PathBuf,
    /// dom0's agent (the toolstack's processes).
    pub agent_socket: PathBuf,
    /// The connection manager's admin service.
    #[serde(default)]
    pub admin_socket: PathBuf,
    /// The backend domain.
    pub backend_domid: DomId,
    /// Seconds since the epoch when it came up.
    pub started: u64,
    /// Its processes, in start order (the hypervisor first).
    pub procs: Vec<Proc>,
}

impl Manifest {
    /// How this tool reaches the host's domains: through the toolstack domain's agent.
    pub fn net_args(&self, timeout: Duration) -> NetArgs {
        NetArgs::through_agent(Some(self.agent_socket.clone()), timeout)
    }

    /// The connection manager's admin service, as this tool (a process of dom0) reaches it.
    pub async fn admin(&self) -> anyhow::Result<PolicyAdminClient> {
        let addr: Address = format!("unix:{}", self.admin_socket.display()).parse()?;
        PolicyAdminClient::connect(Net::new(), addr).await.context("the connection manager's admin service")
    }

    /// The address of `service` on this host.
    pub fn service_addr(&self, service: &str) -> Option<Address> {
        self.procs
            .iter()
            .flat_map(|p| &p.services)
            .find(|s| s.name == service)
            .and_then(|s| s.addr.parse().ok())
    }
}

/// A host brought up by this process: its children are waited for when it goes down.
pub struct Host {
    /// Its state directory.
    pub state: StateDir,
    /// What runs.
    pub manifest: Manifest,
    /// This process as the toolstack (domain 0) on the host, once it is up.
    pub net: Option<Net>,
    children: Vec<Child>,
}

/// Whether `pid` runs: exists and is not a zombie (a process that exited but whose parent —
/// after `host up` exits, init — has not reaped it yet).
fn alive(pid: u32) -> bool {
    let Some(p) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) else { return false };
    if rustix::process::test_kill_process(p).is_err() {
        return false;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses and may hold anything.
        Ok(stat) => !stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

fn signal(pid: u32, sig: rustix::process::Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(rustix::process::Pid::from_raw) {
        let _ = rustix::process::kill_process(pid, sig);
    }
}

/// The last lines of a log, for error messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

/// Starts one process of the host: `dombus daemon ARGS`, logging to its own file, with `env`.
fn spawn(state: &StateDir, name: &str, args: &[String]) -> anyhow::Result<(Child, PathBuf)> {
    spawn_with(state, name, args, &[])
}

fn spawn_with(
    state: &StateDir,
    name: &str,
    args: &[String],
    env: &[(&str, &str)],
) -> anyhow::Result<(Child, PathBuf)> {
    let exe = std::env::current_exe().context("finding this executable")?;
    let log = state.logs().join(format!("{name}.log"));
    let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(exe);
    cmd.arg("daemon").args(args).envs(env.iter().copied()).stdin(Stdio::null()).stdout(out).stderr(err);
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    // Its own process group: a Ctrl-C meant for the tool that started the host does not stop it.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let child = cmd.spawn().with_context(|| format!("starting the {name} process"))?;
    Ok((child, log))
}

/// Waits until `ready()` says yes, failing early if the process died.
async fn wait_ready(
    name: &str,
    child: &mut Child,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "the {name} process exited ({status}) while starting; its log ({}):\n{}",
                log.display(),
                tail(log)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the {name} process did not come up within {START_TIMEOUT:?}; its log ({}):\n{}",
                log.display(),
                tail(log)
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A line of progress: `  what (elapsed)`.
fn step(quiet: bool, what: impl std::fmt::Display, since: Instant) {
    if !quiet {
        println!("  {what} ({:.1} ms)", since.elapsed().as_secs_f64() * 1e3);
    }
}

/// `dombus host up`: starts the hypervisor, the backend domain and the storage domain, registers
/// them with the backend's registry and waits until every service answers.
pub async fn up(state: StateDir, quiet: bool) -> anyhow::Result<Host> {
    if let Some(m) = state.load()? {
        if m.procs.iter().any(|p| alive(p.pid)) {
            bail!(
                "a host is already up in {} (hypervisor pid {}); `dombus host down` first, or use another --state",
                state.0.display(),
                m.procs.first().map_or(0, |p| p.pid)
            );
        }
        std::fs::remove_file(state.manifest())?;
    }
    std::fs::create_dir_all(state.logs()).with_context(|| format!("creating {}", state.0.display()))?;
    // The hypervisor's socket and key live here: the owner's only.
    std::fs::set_permissions(&state.0, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("making {} private", state.0.display()))?;
    std::fs::create_dir_all(state.images())?;
    let _ = std::fs::remove_file(state.socket());
    let sock = state.socket();
    let sim = sock.display().to_string();
    let started = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut host = Host {
        state: state.clone(),
        manifest: Manifest {
            sim_socket: sock.clone(),
            agent_socket: state.agent(),
            admin_socket: state.admin_socket(),
            backend_domid: BACKEND,
            started,
            procs: vec![],
        },
        net: None,
        children: vec![],
    };
    match start(&mut host, &sim, quiet).await {
        Ok(()) => Ok(host),
        Err(e) => {
            // Leave nothing running behind a failed start.
            let _ = host.down(true).await;
            Err(e)
        }
    }
}

async fn start(host: &mut Host, sim: &str, quiet: bool) -> anyhow::Result<()> {
    let t = Instant::now();
    let state = host.state.clone();
    let sock = state.socket();
    let (mut child, log) =
        spawn(&state, "hypervisor", &["hypervisor".into(), "--socket".into(), sim.into()])?;
    host.manifest.procs.push(Proc {
        name: "hypervisor".into(),
        domid: None,
        role: "simulated Xen: grants, event channels, store".into(),
        pid: child.id(),
        log: log.clone(),
        services: vec![],
        agent: None,
    });
    state.save(&host.manifest)?;
    let waited = wait_ready("hypervisor", &mut child, &log, || sock.exists()).await;
    host.children.push(child);
    waited?;
    step(quiet, format_args!("hypervisor       pid {:<7} {}", host.children[0].id(), sim), t);

    // dom0: the backend domain, with the connection manager and the agent of dom0's processes
    // (this tool's and every later command's, as the toolstack).
    let t = Instant::now();
    let policy = state.policy();
    if !policy.exists() {
        std::fs::create_dir_all(&policy)?;
        std::fs::write(policy.join("90-default.policy"), DEFAULT_POLICY)?;
    }
    let agent = state.agent();
    let admin = state.admin_socket();
    let _ = std::fs::remove_file(&admin);
    let args: Vec<String> = vec![
        "backend".into(),
        "--sim".into(),
        sim.into(),
        "--domid".into(),
        BACKEND.to_string(),
        "--serve-agent".into(),
        agent.display().to_string(),
        "--policy-dir".into(),
        policy.display().to_string(),
        "--state-dir".into(),
        state.manager().display().to_string(),
        "--admin-socket".into(),
        admin.display().to_string(),
    ];
    let (mut child, log) = spawn(&state, "backend", &args)?;
    host.manifest.procs.push(Proc {
        name: "backend".into(),
        domid: Some(BACKEND),
        role: "backend domain (dom0, also the toolstack's): the connection manager, dom0's agent".into(),
        pid: child.id(),
        log: log.clone(),
        services: vec![ServiceEntry { name: "policy".into(), addr: format!("unix:{}", admin.display()) }],
        agent: Some(agent.clone()),
    });
    state.save(&host.manifest)?;
    let client = AgentClient::new(&agent);
    let waited = wait_ready("backend", &mut child, &log, || client.is_up() && admin.exists()).await;
    host.children.push(child);
    waited?;
    step(
        quiet,
        format_args!(
            "backend domain   pid {:<7} domain {BACKEND}: connection manager, dom0's agent {}",
            host.children[1].id(),
            agent.display()
        ),
        t,
    );

    // The toolstack labels the domains it is about to start (labels go by name).
    let manager = host.manifest.admin().await?;
    for (name, type_, tags) in [
        ("storage", "service-domain", vec!["storage".to_string()]),
        ("network", "service-domain", vec!["network".to_string()]),
        ("device-model", "service-domain", vec!["device-model".to_string()]),
        (GUEST_NAME, "guest", vec![]),
    ] {
        manager
            .label(context(START_TIMEOUT), name.into(), Some(type_.into()), tags)
            .await
            .map_err(|e| anyhow::anyhow!(dombus::rpc::error_text(&e)))?
            .map_err(|e| anyhow::anyhow!("labelling {name}: {e}"))?;
    }

    let storage_addr = format!("xen:{STORAGE}:{}", ports::STORAGE);
    let images = state.images().display().to_string();
    let guest_agent = state.domain_agent(GUEST_NAME);
    let network_addr = format!("xen:{NETWORK}:{}", ports::NETWORK);
    let mut domains = vec![
        (
            STORAGE,
            "storage",
            "storage domain: disk images on qemu-img",
            vec![
                "storage".to_string(),
                "--root".into(),
                images,
                "--listen".into(),
                storage_addr.clone(),
                "--serve-agent".into(),
                state.domain_agent("storage").display().to_string(),
                // The device-model domain opens the toolstack's images for its guests.
                "--toolstack-domain".into(),
                BACKEND.0.to_string(),
                "--toolstack-domain".into(),
                DEVICE_MODEL.0.to_string(),
            ],
            vec![ServiceEntry { name: "storage".into(), addr: storage_addr.clone() }],
        ),
        (
            GUEST,
            GUEST_NAME,
            "a guest: its agent (dombusd), nothing served",
            vec!["agent".to_string(), "--socket".into(), guest_agent.display().to_string()],
            vec![],
        ),
    ];
    // The network domain changes the links of its namespace: it runs in a new one, which only a
    // privileged user may make. Without, the host runs without it, and says so.
    match network_namespaces_possible() {
        Ok(()) => domains.push((
            NETWORK,
            "network",
            "network domain: bridges and vifs on netlink, in a network namespace of its own",
            vec![
                "network".to_string(),
                "--unshare-netns".into(),
                "--guest-netns-dir".into(),
                state.guest_netns().display().to_string(),
                "--listen".into(),
                network_addr.clone(),
                "--serve-agent".into(),
                state.domain_agent("network").display().to_string(),
                // The device-model domain opens the toolstack's taps for its guests.
                "--toolstack-domain".into(),
                BACKEND.0.to_string(),
                "--toolstack-domain".into(),
                DEVICE_MODEL.0.to_string(),
            ],
            vec![ServiceEntry { name: "network".into(), addr: network_addr.clone() }],
        )),
        Err(why) => {
            if !quiet {
                println!("  network domain   not started: {why}");
            }
        }
    }
    let network_up = domains.iter().any(|d| d.0 == NETWORK);
    let first = host.manifest.procs.len();
    for (domid, name, role, args, services) in domains {
        spawn_domain(host, sim, domid, name, role, args, services)?;
    }
    // As the toolstack: wait until every domain registered with the manager and every service
    // answers (connecting waits for its listener).
    let net = host.manifest.net_args(START_TIMEOUT).net().context("dom0's agent")?;
    for i in first..host.manifest.procs.len() {
        wait_domain(host, i, &manager, &net, quiet).await?;
    }

    // The device-model domain, where qemu runs. qemu's NICs are the network domain's taps, so it
    // joins the network domain's namespace, which exists once that domain serves.
    if let Err(why) = device_models_possible() {
        if !quiet {
            println!("  device-model domain not started: {why}");
        }
        host.net = Some(net);
        return Ok(());
    }
    let dm_addr = format!("xen:{DEVICE_MODEL}:{}", ports::DEVICE_MODEL);
    let mut args = vec![
        "device-model".to_string(),
        "--listen".into(),
        dm_addr.clone(),
        "--dir".into(),
        state.device_models().display().to_string(),
        "--images".into(),
        state.images().display().to_string(),
        "--storage".into(),
        storage_addr.clone(),
        "--serve-agent".into(),
        state.domain_agent("device-model").display().to_string(),
    ];
    if network_up && let Some(p) = host.manifest.procs.iter().find(|p| p.domid == Some(NETWORK)) {
        args.extend([
            "--network".into(),
            network_addr.clone(),
            "--netns".into(),
            format!("/proc/{}/ns/net", p.pid),
        ]);
    }
    spawn_domain(
        host,
        sim,
        DEVICE_MODEL,
        "device-model",
        "device-model domain: one qemu per guest, over QMP",
        args,
        vec![ServiceEntry { name: "device-model".into(), addr: dm_addr }],
    )?;
    let i = host.manifest.procs.len() - 1;
    wait_domain(host, i, &manager, &net, quiet).await?;
    host.net = Some(net);
    Ok(())
}

/// Starts the process of the domain `domid` (`name`), created as the toolstack, with `args`
/// and the domain's own options.
fn spawn_domain(
    host: &mut Host,
    sim: &str,
    domid: DomId,
    name: &str,
    role: &str,
    mut args: Vec<String>,
    services: Vec<ServiceEntry>,
) -> anyhow::Result<()> {
    let state = host.state.clone();
    args.extend([
        "--sim".to_string(),
        sim.to_string(),
        "--domid".into(),
        domid.to_string(),
        "--backend-domain".into(),
        BACKEND.to_string(),
    ]);
    let agent = state.domain_agent(name);
    std::fs::create_dir_all(agent.parent().unwrap_or(&state.0))?;
    // As the toolstack: create the domain, and hand its process the one-time token.
    let (_, token) = SimBackend::create_domain(state.socket(), Some(domid), name)
        .map_err(|e| anyhow::anyhow!("creating the {name} domain: {e}"))?;
    let (child, log) = spawn_with(&state, name, &args, &[(TOKEN_ENV, &token)])?;
    host.manifest.procs.push(Proc {
        name: name.into(),
        domid: Some(domid),
        role: role.into(),
        pid: child.id(),
        log,
        services,
        agent: Some(agent),
    });
    host.children.push(child);
    state.save(&host.manifest)?;
    Ok(())
}

/// Waits until the `i`th process's domain registered with the manager and its services answer.
async fn wait_domain(
    host: &mut Host,
    i: usize,
    manager: &PolicyAdminClient,
    net: &Net,
    quiet: bool,
) -> anyhow::Result<()> {
    let p = host.manifest.procs[i].clone();
    let t = Instant::now();
    let registered = async {
        loop {
            let domains =
                manager.domains(context(START_TIMEOUT)).await.ok().and_then(Result::ok).unwrap_or_default();
            if domains.iter().any(|d| d.domid == p.domid.map(|d| d.0) && d.name.as_deref() == Some(&p.name)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::select! {
        () = registered => {}
        died = wait_exit(&mut host.children[i]) => bail!(
            "the {} domain's process exited ({died}) while starting; its log ({}):\n{}",
            p.name, p.log.display(), tail(&p.log)
        ),
        () = tokio::time::sleep(START_TIMEOUT) => bail!(
            "the {} domain did not register with the connection manager within {START_TIMEOUT:?}; its log ({}):\n{}",
            p.name, p.log.display(), tail(&p.log)
        ),
    }
    for s in &p.services {
        let addr: Address = s.addr.parse()?;
        let client = RawClient::new(net.clone(), addr, wire::BUILTIN_SERVICE, ClientConfig::default());
        let ready = tokio::select! {
            r = client.connect_now(START_TIMEOUT) => r,
            died = wait_exit(&mut host.children[i]) => Err(std::io::Error::other(format!("exited: {died}"))),
        };
        if let Err(e) = ready {
            bail!(
                "the {} domain's {} service at {} did not come up: {e}; its log ({}):\n{}",
                p.name,
                s.name,
                s.addr,
                p.log.display(),
                tail(&p.log)
            );
        }
    }
    let what = if p.services.is_empty() {
        format!("agent {}", p.agent.as_ref().map_or(String::new(), |a| a.display().to_string()))
    } else {
        services_text(&p.services)
    };
    step(
        quiet,
        format_args!(
            "{:<16} pid {:<7} domain {}, {}",
            format!("{} domain", p.name),
            p.pid,
            p.domid.map_or("-".to_string(), |d| d.to_string()),
            what
        ),
        t,
    );
    Ok(())
}

async fn wait_exit(child: &mut Child) -> String {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) => tokio::time::sleep(Duration::from_millis(20)).await,
            Err(e) => return e.to_string(),
        }
    }
}

fn services_text(s: &[ServiceEntry]) -> String {
    s.iter().map(|s| format!("{} on {}", s.name, s.addr)).collect::<Vec<_>>().join(", ")
}

/// A call context with a deadline `d` from now.
pub fn context(d: Duration) -> dombus::context::Context {
    let mut ctx = dombus::context::current();
    ctx.deadline = Instant::now() + d;
    ctx
}

impl Host {
    /// Stops every process (services first, the hypervisor last): SIGTERM, then SIGKILL after
    /// 5 s; removes the manifest and the socket (logs and images stay). Returns how many
    /// processes were stopped.
    pub async fn down(mut self, quiet: bool) -> anyhow::Result<usize> {
        // Leave the host as the toolstack first.
        drop(self.net.take());
        stop_all(&self.state, &self.manifest, &mut self.children, quiet).await
    }
}

/// `dombus host down` for a host started by another process.
pub async fn down(state: StateDir, quiet: bool) -> anyhow::Result<usize> {
    let Some(m) = state.load()? else {
        bail!("no host is up in {} (no host.json)", state.0.display());
    };
    stop_all(&state, &m, &mut Vec::new(), quiet).await
}

async fn stop_all(
    state: &StateDir,
    m: &Manifest,
    children: &mut [Child],
    quiet: bool,
) -> anyhow::Result<usize> {
    let mut stopped = 0;
    let mut stubborn = Vec::new();
    for p in m.procs.iter().rev() {
        let child = children.iter_mut().find(|c| c.id() == p.pid);
        let gone = |child: &mut Option<&mut Child>| match child {
            // Our own child: reap it (a zombie would still answer kill(0)).
            Some(c) => matches!(c.try_wait(), Ok(Some(_)) | Err(_)),
            None => !alive(p.pid),
        };
        let mut child = child;
        if gone(&mut child) {
            continue;
        }
        let t = Instant::now();
        signal(p.pid, rustix::process::Signal::TERM);
        while !gone(&mut child) && t.elapsed() < STOP_TIMEOUT {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if !gone(&mut child) {
            signal(p.pid, rustix::process::Signal::KILL);
            stubborn.push(p.name.clone());
            let t = Instant::now();
            while !gone(&mut child) && t.elapsed() < STOP_TIMEOUT {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        stopped += 1;
        step(quiet, format_args!("stopped {:<10} pid {}", p.name, p.pid), t);
    }
    let _ = std::fs::remove_file(state.manifest());
    let _ = std::fs::remove_file(&m.sim_socket);
    // The network domain lets its guests' namespaces go when it stops; after a kill, here.
    if state.guest_netns().exists()
        && let Err(e) = dombus_services::network::netns::GuestNamespaces::new(state.guest_netns())
            .and_then(|g| g.remove_all())
    {
        eprintln!("dombus: letting the guests' network namespaces go: {e}");
    }
    if !stubborn.is_empty() {
        eprintln!(
            "dombus: killed after {STOP_TIMEOUT:?} without stopping on SIGTERM: {}",
            stubborn.join(", ")
        );
    }
    if let Some(p) = m.procs.iter().find(|p| alive(p.pid) && !children.iter().any(|c| c.id() == p.pid)) {
        bail!("{} (pid {}) is still running", p.name, p.pid);
    }
    Ok(stopped)
}

/// What `dombus host status` shows.
#[derive(Debug, Serialize)]
pub struct Status {
    /// The state directory.
    pub state: PathBuf,
    /// Processes and whether they run.
    pub processes: Vec<ProcStatus>,
    /// Domains as the connection manager knows them.
    pub domains: Vec<DomainInfo>,
    /// Links between domains, as their agents hold them: (lower domain, higher domain).
    pub links: Vec<(DomId, DomId)>,
    /// Each service's answer to pings.
    pub services: Vec<ServiceStatus>,
}

/// A process of the host.
#[derive(Debug, Serialize)]
pub struct ProcStatus {
    /// Name.
    pub name: String,
    /// Domain id.
    pub domid: Option<DomId>,
    /// Process id.
    pub pid: u32,
    /// Whether it runs.
    pub running: bool,
}

/// A service of the host.
#[derive(Debug, Serialize)]
pub struct ServiceStatus {
    /// Name.
    pub name: String,
    /// Address.
    pub addr: String,
    /// Version (from describe).
    pub version: Option<u32>,
    /// Median of 20 round trips, µs; `None` if it did not answer.
    pub ping_p50_us: Option<f64>,
    /// Why not, if it did not.
    pub error: Option<String>,
}

/// `dombus host status`.
pub async fn status(state: StateDir) -> anyhow::Result<Status> {
    let Some(m) = state.load()? else {
        bail!("no host is up in {} (no host.json); `dombus host up` starts one", state.0.display());
    };
    let processes: Vec<ProcStatus> = m
        .procs
        .iter()
        .map(|p| ProcStatus { name: p.name.clone(), domid: p.domid, pid: p.pid, running: alive(p.pid) })
        .collect();
    if !processes.first().is_some_and(|p| p.running) {
        return Ok(Status { state: state.0, processes, domains: vec![], links: vec![], services: vec![] });
    }
    // Each domain's links, as its agent holds them (asked before this command makes any).
    let mut links = Vec::new();
    for p in &m.procs {
        let (Some(agent), Some(_)) = (&p.agent, p.domid) else { continue };
        let Ok(st) = AgentClient::new(agent).status().await else { continue };
        for (peer, _) in st.links {
            let pair = (st.domain.min(peer), st.domain.max(peer));
            if !links.contains(&pair) {
                links.push(pair);
            }
        }
    }
    links.sort_unstable();
    let mut net = m.net_args(Duration::from_secs(5)).net()?;
    net.xen_connect_wait = Some(Duration::from_secs(5));
    let domains = match m.admin().await {
        Ok(a) => {
            a.domains(context(Duration::from_secs(5))).await.ok().and_then(Result::ok).unwrap_or_default()
        }
        Err(_) => Vec::new(),
    };
    let mut services = Vec::new();
    for s in m.procs.iter().flat_map(|p| &p.services) {
        services.push(ping_service(&net, s).await);
    }
    Ok(Status { state: state.0, processes, domains, links, services })
}

async fn ping_service(net: &Net, s: &ServiceEntry) -> ServiceStatus {
    let mut st = ServiceStatus {
        name: s.name.clone(),
        addr: s.addr.clone(),
        version: None,
        ping_p50_us: None,
        error: None,
    };
    let addr: Address = match s.addr.parse() {
        Ok(a) => a,
        Err(e) => {
            st.error = Some(format!("{e}"));
            return st;
        }
    };
    let client = RawClient::new(net.clone(), addr, wire::BUILTIN_SERVICE, ClientConfig::default());
    let d = Duration::from_secs(5);
    match client.describe(context(d)).await {
        Ok(ds) => st.version = ds.iter().find(|x| x.name == s.name).map(|x| x.version),
        Err(e) => {
            st.error = Some(dombus::rpc::error_text(&e));
            return st;
        }
    }
    let mut laps = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        if let Err(e) = client.ping(context(d)).await {
            st.error = Some(dombus::rpc::error_text(&e));
            return st;
        }
        laps.push(t.elapsed());
    }
    laps.sort_unstable();
    st.ping_p50_us = Some(dombus_tools::diag::percentile(&laps, 50.0).as_secs_f64() * 1e6);
    st
}

/// `status` for people.
pub fn render_status(s: &Status) -> String {
    let mut out = vec![format!("host in {}", s.state.display()), String::new()];
    out.push(format!("{:<12} {:<6} {:<8} STATE", "PROCESS", "DOMAIN", "PID"));
    for p in &s.processes {
        let dom = p.domid.map_or("-".to_string(), |d| d.to_string());
        out.push(format!(
            "{:<12} {:<6} {:<8} {}",
            p.name,
            dom,
            p.pid,
            if p.running { "running" } else { "gone" }
        ));
    }
    if !s.domains.is_empty() {
        out.push(String::new());
        out.push(format!("{:<6} {:<10} {:<16} LABELS", "DOMAIN", "NAME", "ROLES"));
        for d in &s.domains {
            let mut labels: Vec<String> = d.type_.iter().map(|t| format!("@type:{t}")).collect();
            labels.extend(d.tags.iter().map(|t| format!("@tag:{t}")));
            out.push(format!(
                "{:<6} {:<10} {:<16} {}",
                d.domid.map_or("-".to_string(), |d| d.to_string()),
                d.name.as_deref().unwrap_or("-"),
                d.roles.join(","),
                labels.join(" ")
            ));
        }
    }
    if !s.services.is_empty() {
        out.push(String::new());
        out.push(format!("{:<10} {:<16} {:<8} PING p50", "SERVICE", "ADDRESS", "VERSION"));
        for x in &s.services {
            let v = x.version.map_or("-".into(), |v| v.to_string());
            let ping = match (&x.ping_p50_us, &x.error) {
                (Some(us), _) => format!("{us:.0} µs"),
                (None, Some(e)) => format!("no answer: {e}"),
                (None, None) => "-".into(),
            };
            out.push(format!("{:<10} {:<16} {:<8} {ping}", x.name, x.addr, v));
        }
    }
    out.push(String::new());
    let links: Vec<String> = s.links.iter().map(|(a, b)| format!("{a} ↔ {b}")).collect();
    out.push(format!("links: {}", if links.is_empty() { "none".to_string() } else { links.join(", ") }));
    out.join("\n")
}

/// Whether the device-model domain can run here: why not, if it cannot.
pub fn device_models_possible() -> Result<(), String> {
    match Command::new("qemu-system-x86_64").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)".into()),
    }
}

/// Whether this user may make network namespaces (the network domain needs one): why not, if
/// not.
pub fn network_namespaces_possible() -> Result<(), String> {
    use dombus_services::network::netns::{Namespace, run_in};
    run_in(Namespace::New, || ()).map_err(|e| format!("making a network namespace needs root ({e})"))
}
