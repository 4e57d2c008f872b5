//! The connection manager at scale: many simulated domains, each with its agent's sockets
//! ([`Managed`]) linked to the backend domain and registered with the manager there; how long
//! they take to come up, what a policy decision costs with few and with many registered, and
//! what each linked domain costs the backend domain and the simulator daemon in memory.
//!
//! Three processes per host, so that each one's memory is its own: the simulated hypervisor
//! ([`SIMXEN_ROLE`], a peer process), the guests ([`GUESTS_ROLE`], a peer process with one
//! [`SimBackend`] attachment, one [`VsockDomain`] and one [`Managed`] per domain), and the backend
//! domain, which is the parent: it attaches as domain 0 (the backend and the toolstack), starts
//! its [`VsockDomain`] as `Attach::start_backend` does (introduced links, served by the backend)
//! but with the rings of [`ScaleConfig::rings`], and runs [`Manager::start`] on it. The parent
//! drives the guests over a Unix socket, one command a line ([`Host::bring_up`], [`Host::checks`]).

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dombus_agent::manager::{MANAGER_PORT, Peer};
use dombus_agent::{DomainSockets, Managed, ManagerOps, denied};
use dombus_manager::{Manager, ManagerConfig};
use dombus_sim::{SimBackend, SimHypervisor};
use dombus_transport_xen::DomId;
use dombus_transport_xen::layout::RingOrders;
use dombus_transport_xen::link::LinkConfig;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use dombus_transport_xen::vsock::{CID_BACKEND, LinkSetUp, VsockAddr};

use crate::PeerProcess;
use crate::agent::Memory;

/// Peer role: the simulated hypervisor of one host (argument: its socket's path).
pub const SIMXEN_ROLE: &str = "scale-simxen";
/// Peer role: the guest domains of one host (argument: the hypervisor's socket; descriptor 0
/// of the inherited ones: the command socket).
pub const GUESTS_ROLE: &str = "scale-guests";

/// The port of the guests' end-to-end checks: every guest is denied it on the backend domain
/// (`@anyvm @backend deny`), so each check is one introduction round trip to the manager.
pub const DENIED_PORT: u32 = 5000;
/// The port the in-process decisions ask about: `guest-1` may connect to it on `guest-2`.
pub const ALLOWED_PORT: u32 = 7;

/// The policy of every host: two rules, so that a decision walks a rule that does not match
/// before the one that does.
const POLICY: &str = "\
# The scale bench's policy (benches/src/scale.rs).
7 guest-1 guest-2 allow
5000 @anyvm @backend deny
";

/// The smallest rings a link has: 1 KiB client → server and 2 KiB server → client, both inside
/// the control page (libxenvchan's orders 10 and 11), so a link takes one grant.
pub fn small_rings() -> LinkConfig {
    LinkConfig { client_to_server: 1 << 10, server_to_client: 2 << 10, spin: None }
}

/// What one link costs the domain that serves it (the backend domain, for every guest's link
/// under introductions) in the simulator's per-domain limits, and how many links those allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkLimits {
    /// Grants per link: the control page and the pages of rings too large for it.
    pub grants: usize,
    /// Simulator descriptors per link: one per allocation (the control page, each ring of its
    /// own pages) and two for the event-channel port.
    pub descriptors: usize,
    /// Links the grant table allows.
    pub by_grants: usize,
    /// Links the descriptor bound allows.
    pub by_descriptors: usize,
    /// Links the event-channel ports allow (one port per link).
    pub by_ports: usize,
}

impl LinkLimits {
    /// The limits for links with rings `rings`; `None` for rings no link can have.
    pub fn of(rings: &LinkConfig) -> Option<LinkLimits> {
        let orders = RingOrders::for_sizes(rings.client_to_server, rings.server_to_client)?;
        let (left, right) = orders.page_counts();
        let grants = 1 + left + right;
        let descriptors = 1 + usize::from(left > 0) + usize::from(right > 0) + 2;
        Some(LinkLimits {
            grants,
            descriptors,
            by_grants: dombus_sim::MAX_GRANTS / grants,
            by_descriptors: dombus_sim::fd_limit(DomId::DOM0) / descriptors,
            by_ports: dombus_sim::MAX_PORTS as usize - 1,
        })
    }

    /// The most links the backend domain can serve: the tightest of the three.
    pub fn most(&self) -> usize {
        self.by_grants.min(self.by_descriptors).min(self.by_ports)
    }
}

/// How a host is set up.
#[derive(Debug, Clone)]
pub struct ScaleConfig {
    /// The rings of every link (the backend domain serves them all, so its rings count).
    pub rings: LinkConfig,
    /// How long a bring-up waits for every domain to register before it reports how many did.
    pub up_timeout: Duration,
    /// A bring-up also ends when no more domain registered for this long (the rest are
    /// failing: the report says why).
    pub stall: Duration,
}

impl Default for ScaleConfig {
    fn default() -> Self {
        ScaleConfig {
            rings: small_rings(),
            up_timeout: Duration::from_secs(60),
            stall: Duration::from_secs(5),
        }
    }
}

/// What one bring-up achieved.
#[derive(Debug, Clone)]
pub struct BringUp {
    /// Domains asked for.
    pub asked: usize,
    /// Domains created and attached in the simulator.
    pub attached: usize,
    /// Domains the manager registered at the end (all of the host's, earlier bring-ups too).
    pub registered: usize,
    /// From the command to create the first domain until the manager registered the last one
    /// that registered.
    pub elapsed: Duration,
    /// Of which creating and attaching the domains in the simulator (the guests' side).
    pub attaching: Duration,
    /// Why the domains that did not come up did not (the first error seen), if any.
    pub error: Option<String>,
}

/// A scratch directory removed on drop.
#[derive(Debug)]
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> io::Result<Scratch> {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("dombus-scale-{}-{tag}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One simulated host: its hypervisor and guests (peer processes), and its backend domain with
/// the connection manager (in this process, inside the tokio runtime it was made in).
pub struct Host {
    manager: Manager,
    /// The backend domain's sockets (kept for as long as the manager runs on them).
    _backend: VsockDomain<SimBackend>,
    commands: UnixStream,
    replies: BufReader<UnixStream>,
    guests: PeerProcess,
    sim: PeerProcess,
    next_id: u16,
    // Last: the directory goes after the processes that use it.
    _dir: Scratch,
}

impl Host {
    /// Starts a host with no guest yet. Call inside a tokio runtime (the manager's tasks run
    /// there); the calls below block the calling thread, so make them outside `block_on`.
    pub fn start(tag: &str, cfg: &ScaleConfig) -> io::Result<Host> {
        let dir = Scratch::new(tag)?;
        let sock = dir.0.join("hv.sock");
        let sock_arg = path_arg(&sock)?;
        let sim = PeerProcess::spawn_beside_parent(SIMXEN_ROLE, &sock_arg, &[])?;
        let backend = wait_for_hypervisor(&sock)?;
        let policy_dir = dir.0.join("policy");
        std::fs::create_dir_all(&policy_dir)?;
        std::fs::write(policy_dir.join("10-bench.policy"), POLICY)?;
        let domain = VsockDomain::start(backend, domain_config(cfg))?;
        let sockets: Arc<dyn DomainSockets> = Arc::new(domain.clone());
        let ops: Arc<dyn ManagerOps> = Arc::new(domain.clone());
        let manager = Manager::start(sockets, ops, ManagerConfig::new(policy_dir, dir.0.join("state")))?;
        let (ours, theirs) = UnixStream::pair()?;
        let guests = PeerProcess::spawn_beside_parent(
            GUESTS_ROLE,
            &format!(
                "{}|{}|{}|{}",
                sock_arg,
                cfg.up_timeout.as_millis(),
                cfg.stall.as_millis(),
                rings_arg(&cfg.rings)
            ),
            &[theirs.as_fd()],
        )?;
        drop(theirs);
        let replies = BufReader::new(ours.try_clone()?);
        Ok(Host { manager, _backend: domain, commands: ours, replies, guests, sim, next_id: 1, _dir: dir })
    }

    /// The connection manager.
    pub fn manager(&self) -> &Manager {
        &self.manager
    }

    /// The guests' process.
    pub fn guests(&self) -> &PeerProcess {
        &self.guests
    }

    /// The simulated hypervisor's process.
    pub fn hypervisor(&self) -> &PeerProcess {
        &self.sim
    }

    /// Domains registered with the manager now.
    pub fn registered(&self) -> usize {
        self.manager.registered_for_bench()
    }

    fn ask(&mut self, command: &str) -> io::Result<String> {
        writeln!(self.commands, "{command}")?;
        read_reply(&mut self.replies)
    }

    /// Creates `count` more domains (ids after the last ones), starts each one's managed sockets
    /// and waits until the manager has registered every one of them (or the timeout: then the
    /// domains that did not register are stopped, and the result says why).
    pub fn bring_up(&mut self, count: u16) -> io::Result<BringUp> {
        let first = self.next_id;
        let before = self.registered();
        let started = Instant::now();
        writeln!(self.commands, "up {first} {count}")?;
        // The manager's count is the figure: polled while the guests bring their domains up,
        // the time is when it last grew (the guests answer later: once all are registered, or
        // after a stall and a look at why the rest failed).
        let (manager, replies) = (&self.manager, &mut self.replies);
        let (reply, last) = std::thread::scope(|s| {
            let answer = s.spawn(|| read_reply(replies));
            let (mut seen, mut last) = (before, started);
            while !answer.is_finished() {
                let now = manager.registered_for_bench();
                if now != seen {
                    (seen, last) = (now, Instant::now());
                }
                std::thread::sleep(Duration::from_micros(100));
            }
            let reply = answer.join().unwrap_or_else(|_| Err(io::Error::other("the reply reader panicked")));
            (reply, last)
        });
        let reply = reply?;
        let mut fields = reply.splitn(4, ' ');
        let bad = || io::Error::other(format!("bad reply to up: {reply:?}"));
        let attached: usize = fields.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
        let registered_there: usize = fields.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
        let attaching = Duration::from_micros(fields.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?);
        let error = fields.next().filter(|e| *e != "-").map(str::to_string);
        // Every domain the guests saw registered is the manager's (it registers one before it
        // welcomes it): a count still short is a session that ended again since.
        let mut elapsed = last - started;
        let want = before + registered_there;
        let settle = Instant::now() + Duration::from_secs(5);
        while self.registered() < want && Instant::now() < settle {
            std::thread::sleep(Duration::from_micros(100));
            elapsed = started.elapsed();
        }
        self.next_id = first.saturating_add(count);
        Ok(BringUp {
            asked: usize::from(count),
            attached,
            registered: self.registered(),
            elapsed,
            attaching,
            error,
        })
    }

    /// `n` in-process decisions: `guest-1` to port [`ALLOWED_PORT`] of `guest-2`, by id
    /// (`by_name`: by its name, which the manager resolves among the registered domains). Each
    /// is timed; every one must be allowed.
    pub fn decisions(&self, n: usize, by_name: bool) -> io::Result<Vec<Duration>> {
        let target = if by_name { Peer::Name("guest-2".into()) } else { Peer::Id(2) };
        let mut samples = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let allowed = self.manager.decide_for_bench(DomId(1), &target, ALLOWED_PORT);
            samples.push(t.elapsed());
            if !allowed {
                return Err(io::Error::other(format!(
                    "the manager denied guest-1 → {target:?} port {ALLOWED_PORT}"
                )));
            }
        }
        Ok(samples)
    }

    /// `n` end-to-end checks by domain `dom`'s agent: a connect to [`DENIED_PORT`] of the
    /// backend domain, which its `Managed` sockets put to the manager over the domain's link
    /// (denials are not cached) and which must come back denied. Each round trip is timed in
    /// the guests' process.
    pub fn checks(&mut self, dom: u16, n: usize) -> io::Result<Vec<Duration>> {
        let reply = self.ask(&format!("check {dom} {n}"))?;
        reply
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<u64>().map(Duration::from_nanos))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| io::Error::other(format!("bad reply to check: {e}")))
    }

    /// The memory of (this process: the backend domain, the hypervisor, the guests) now.
    pub fn memory(&self) -> io::Result<(Memory, Memory, Memory)> {
        Ok((Memory::of(std::process::id())?, Memory::of(self.sim.id())?, Memory::of(self.guests.id())?))
    }
}

/// The guests' reply to one command (an `err …` line is the command's error).
fn read_reply(replies: &mut BufReader<UnixStream>) -> io::Result<String> {
    let mut line = String::new();
    if replies.read_line(&mut line)? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the guests' process ended"));
    }
    let line = line.trim_end();
    match line.strip_prefix("err ") {
        Some(e) => Err(io::Error::other(format!("the guests' process: {e}"))),
        None => Ok(line.to_string()),
    }
}

fn path_arg(p: &Path) -> io::Result<String> {
    p.to_str()
        .filter(|s| !s.contains('|'))
        .map(str::to_string)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("unusable path {}", p.display())))
}

fn rings_arg(r: &LinkConfig) -> String {
    format!("{},{}", r.client_to_server, r.server_to_client)
}

fn bad_arg(role: &str, s: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("bad {role} peer argument {s:?}"))
}

/// Every domain's sockets: links introduced by the manager of domain 0, which serves them all
/// with `cfg`'s rings.
fn domain_config(cfg: &ScaleConfig) -> VsockConfig {
    VsockConfig { link: cfg.rings.clone(), set_up: LinkSetUp::Introduced, ..VsockConfig::default() }
}

/// Attaches as domain 0 once the hypervisor at `sock` answers (up to 10 s).
fn wait_for_hypervisor(sock: &Path) -> io::Result<SimBackend> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match SimBackend::toolstack(sock) {
            Ok(b) => return Ok(b),
            Err(e) if Instant::now() >= deadline => {
                return Err(io::Error::other(format!("the simulated hypervisor at {}: {e}", sock.display())));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// [`SIMXEN_ROLE`]: runs the simulated hypervisor at the socket `arg` until killed.
pub(crate) fn simxen_child(arg: &str) -> io::Result<()> {
    SimHypervisor::bind(Path::new(arg))?.run()
}

/// [`GUESTS_ROLE`]: the guests of one host, driven by the parent's commands.
pub(crate) fn guests_child(fds: Vec<OwnedFd>, arg: &str) -> io::Result<()> {
    let bad = || bad_arg(GUESTS_ROLE, arg);
    let mut parts = arg.split('|');
    let sock = PathBuf::from(parts.next().ok_or_else(bad)?);
    let timeout = Duration::from_millis(parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?);
    let stall = Duration::from_millis(parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?);
    let (c2s, s2c) = parts.next().and_then(|s| s.split_once(',')).ok_or_else(bad)?;
    let rings = LinkConfig {
        client_to_server: c2s.parse().map_err(|_| bad())?,
        server_to_client: s2c.parse().map_err(|_| bad())?,
        spin: None,
    };
    let cfg = domain_config(&ScaleConfig { rings, up_timeout: timeout, stall });
    let fd = fds.into_iter().next().ok_or_else(bad)?;
    let stream = UnixStream::from(fd);
    let mut out = stream.try_clone()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
    let mut guests = Guests { sock, cfg, timeout, stall, up: Vec::new() };
    for line in BufReader::new(stream).lines() {
        let line = line?;
        let reply = guests.command(&rt, &line).unwrap_or_else(|e| format!("err {e}"));
        writeln!(out, "{}", reply.replace('\n', " "))?;
    }
    Ok(())
}

/// The guests' process's state: every domain that came up, in id order.
struct Guests {
    sock: PathBuf,
    cfg: VsockConfig,
    timeout: Duration,
    stall: Duration,
    up: Vec<(DomId, Arc<Managed<SimBackend>>)>,
}

impl Guests {
    fn command(&mut self, rt: &tokio::runtime::Runtime, line: &str) -> io::Result<String> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> io::Result<u64> {
            f.get(i)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("bad command {line:?}")))
        };
        match f.first().copied() {
            Some("up") => {
                let first = u16::try_from(num(1)?).map_err(io::Error::other)?;
                let count = u16::try_from(num(2)?).map_err(io::Error::other)?;
                self.up(rt, first, count)
            }
            Some("check") => {
                let dom = u16::try_from(num(1)?).map_err(io::Error::other)?;
                self.check(rt, DomId(dom), usize::try_from(num(2)?).map_err(io::Error::other)?)
            }
            _ => Err(io::Error::new(io::ErrorKind::InvalidInput, format!("unknown command {line:?}"))),
        }
    }

    /// Creates domains `first..first + count`, starts their managed sockets, waits for them to
    /// register: "ATTACHED REGISTERED ATTACH_MICROS ERROR-or--".
    fn up(&mut self, rt: &tokio::runtime::Runtime, first: u16, count: u16) -> io::Result<String> {
        let _in_runtime = rt.enter();
        let started = Instant::now();
        let mut fresh = Vec::new();
        let mut error = None;
        for id in (0..count).filter_map(|i| first.checked_add(i)).map(DomId) {
            let attached = SimBackend::boot_named(&self.sock, Some(id), &format!("guest-{}", id.0))
                .map_err(|e| io::Error::other(format!("creating domain {id}: {e}")))
                .and_then(|b| VsockDomain::start(b, self.cfg.clone()));
            match attached {
                Ok(d) => fresh.push((id, Arc::new(Managed::start(d, DomId::DOM0)))),
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        let attaching = started.elapsed();
        let deadline = started + self.timeout;
        let (mut progress, mut seen) = (Instant::now(), 0);
        loop {
            let now = fresh.iter().filter(|(_, m)| m.registered()).count();
            if now == fresh.len() || Instant::now() >= deadline {
                break;
            }
            if now != seen {
                (progress, seen) = (Instant::now(), now);
            } else if progress.elapsed() >= self.stall {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let attached = fresh.len();
        let (up, down): (Vec<_>, Vec<_>) = fresh.into_iter().partition(|(_, m)| m.registered());
        if let Some((id, m)) = down.first() {
            // Why it did not register: one session attempt of its own, with its error.
            let why = rt.block_on(async {
                let addr = VsockAddr::new(CID_BACKEND, MANAGER_PORT);
                match tokio::time::timeout(Duration::from_secs(15), m.domain().connect(addr)).await {
                    Ok(Ok(_)) => "its session came up late".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "no answer in 15 s".to_string(),
                }
            });
            let n = down.len();
            let first_down = id.0;
            error.get_or_insert(format!(
                "{n} domains did not register (none more for {:?}); the first, domain {first_down}: {why}",
                self.stall
            ));
        }
        // The ones that did not come up stop trying (and die in the simulator).
        drop(down);
        self.up.extend(up);
        Ok(format!(
            "{attached} {} {} {}",
            self.up.iter().filter(|(id, _)| id.0 >= first).count(),
            attaching.as_micros(),
            error.as_deref().unwrap_or("-")
        ))
    }

    /// `n` timed denied connects by `dom`'s agent to the backend's [`DENIED_PORT`]: the
    /// samples in nanoseconds, comma-separated.
    fn check(&mut self, rt: &tokio::runtime::Runtime, dom: DomId, n: usize) -> io::Result<String> {
        let m = self
            .up
            .iter()
            .find(|(id, _)| *id == dom)
            .map(|(_, m)| m.clone())
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("domain {dom} is not up")))?;
        let task = rt.spawn(async move {
            let addr = VsockAddr::new(CID_BACKEND, DENIED_PORT);
            let mut samples = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let r = m.connect(addr, Some(Duration::from_secs(5))).await;
                samples.push(t.elapsed());
                match r {
                    Err(e) if denied(&e).is_some() => {}
                    Err(e) => return Err(e),
                    Ok(_) => {
                        return Err(io::Error::other(format!("domain {dom} was allowed port {DENIED_PORT}")));
                    }
                }
            }
            Ok(samples)
        });
        let samples = rt.block_on(task).map_err(io::Error::other)??;
        Ok(samples.iter().map(|d| d.as_nanos().to_string()).collect::<Vec<_>>().join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_rings_take_one_grant_and_three_descriptors_per_link() {
        let l = LinkLimits::of(&small_rings()).unwrap();
        assert_eq!((l.grants, l.descriptors), (1, 3));
        // dom0, the backend, holds up to 16,384 simulator descriptors: the ports bind first.
        assert_eq!((l.by_grants, l.by_descriptors, l.by_ports), (65_536, 5461, 4095));
        assert_eq!(l.most(), 4095);
    }

    #[test]
    fn default_rings_take_thirty_three_grants_per_link() {
        // 64 KiB each way: 16 pages per ring, each ring its own allocation.
        let l = LinkLimits::of(&LinkConfig::default()).unwrap();
        assert_eq!((l.grants, l.descriptors), (33, 5));
        // The grant table binds first: the 1,986th domain's link fails.
        assert_eq!((l.by_grants, l.by_descriptors), (1985, 3276));
        assert_eq!(l.most(), 1985);
    }
}
