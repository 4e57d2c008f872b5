//! The domain agent's local path: a peer process that is its domain's agent
//! ([`dombus_agent::Agent::serve`], as `dombusd` runs it), a peer process of many echoing
//! domains, and the agent's memory per connection and per link as the kernel counts it.
//!
//! The rows that use them (`agent_*` in `rpc-compare`, see [`crate::harness::rpc`]) put the
//! echo server in domain [`SERVER_DOM`] (a peer process, as for every `xen:` row) and the agent
//! in domain [`CLIENT_DOM`] (a second peer process, on the parent's CPU: both are processes of
//! one domain); the parent is a process of that domain that reaches the virtual sockets only
//! through the agent's Unix socket.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dombus_agent::proto::Target;
use dombus_agent::{Agent, AgentClient, AgentConfig, AgentStream};
use dombus_sim::{SimBackend, SimHypervisor};
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use dombus_transport_xen::vsock::session::SessionConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::PeerProcess;
use crate::harness::MemoryRow;
use crate::rpc::{CLIENT_DOM, Flavor, PAYLOAD, SERVER_DOM, SETUP_TIMEOUT, ScratchDir, XEN_PORTS};

/// Peer role of a domain's agent.
pub const AGENT_ROLE: &str = "agent";
/// Peer role of many domains in one process, each echoing [`PAYLOAD`]-byte messages on
/// [`ECHO_PORT`].
pub const DOMAINS_ROLE: &str = "echo-domains";
/// The port the echoing domains of [`DOMAINS_ROLE`] listen on (the raw stack's port of the RPC
/// server).
pub const ECHO_PORT: u32 = XEN_PORTS[3];
/// How long the agent's memory is left to settle before it is read.
const SETTLE: Duration = Duration::from_millis(200);

/// The session limits of a benchmark domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limits {
    /// [`SessionConfig::default`], as `dombusd` runs: at most 64 connections at once on a link.
    Default,
    /// Room for thousands of connections on one link, for the memory measurement.
    Many,
}

/// The virtual-socket configuration of a benchmark domain.
fn domain_config(spin: Option<Duration>, limits: Limits) -> VsockConfig {
    let mut c = crate::rpc::xen_config(spin);
    if limits == Limits::Many {
        c.session =
            SessionConfig { max_connections: 20_000, rx_budget: u64::MAX, ..SessionConfig::default() };
    }
    c
}

fn bad_arg(role: &str, s: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, format!("bad {role} peer argument {s:?}"))
}

/// What the agent peer needs, passed as one argument string.
#[derive(Debug, Clone, PartialEq)]
struct AgentArgs {
    /// The simulated hypervisor's socket; the agent's socket is beside it ([`agent_socket`]).
    sim: PathBuf,
    domid: DomId,
    spin: Option<Duration>,
    limits: Limits,
    flavor: Flavor,
}

impl AgentArgs {
    fn encode(&self) -> String {
        let spin = self.spin.map_or_else(|| "-".to_string(), |d| d.as_nanos().to_string());
        let limits = match self.limits {
            Limits::Default => "default",
            Limits::Many => "many",
        };
        format!("{}|{spin}|{limits}|{}|{}", self.flavor, self.domid.0, self.sim.display())
    }

    fn decode(s: &str) -> io::Result<AgentArgs> {
        let bad = || bad_arg(AGENT_ROLE, s);
        let mut parts = s.splitn(5, '|');
        let mut next = || parts.next().ok_or_else(bad);
        let (flavor, spin, limits, domid, sim) = (next()?, next()?, next()?, next()?, next()?);
        Ok(AgentArgs {
            flavor: flavor.parse().map_err(|_| bad())?,
            spin: match spin {
                "-" => None,
                ns => Some(Duration::from_nanos(ns.parse().map_err(|_| bad())?)),
            },
            limits: match limits {
                "default" => Limits::Default,
                "many" => Limits::Many,
                _ => return Err(bad()),
            },
            domid: DomId(domid.parse().map_err(|_| bad())?),
            sim: PathBuf::from(sim),
        })
    }
}

/// The agent's socket: beside the simulated hypervisor's.
fn agent_socket(sim: &Path) -> PathBuf {
    sim.with_file_name("agent.sock")
}

/// Peer that is its domain's agent: attaches as the domain its argument names and serves it
/// with [`Agent::serve`] until it is killed.
pub(crate) fn agent_child(arg: &str) -> io::Result<()> {
    let a = AgentArgs::decode(arg)?;
    let rt = crate::rpc::runtime(a.flavor)?;
    rt.block_on(async move {
        let backend = SimBackend::boot(&a.sim, Some(a.domid)).map_err(io::Error::other)?;
        let domain = VsockDomain::start(backend, domain_config(a.spin, a.limits))?;
        let _agent = Agent::serve(Arc::new(domain), AgentConfig::new(agent_socket(&a.sim)))?;
        std::future::pending::<()>().await;
        Ok(())
    })
}

/// A domain's agent running in a peer process of its own, ready; killed on drop.
#[derive(Debug)]
pub struct AgentProcess {
    client: AgentClient,
    process: PeerProcess,
}

impl AgentProcess {
    /// Starts the agent of domain `domid` on the simulated hypervisor at `sim` and waits until
    /// it answers at its socket.
    pub fn spawn(
        sim: &Path,
        domid: DomId,
        spin: Option<Duration>,
        limits: Limits,
        flavor: Flavor,
    ) -> io::Result<AgentProcess> {
        let args = AgentArgs { sim: sim.to_path_buf(), domid, spin, limits, flavor };
        let mut process = PeerProcess::spawn_beside_parent(AGENT_ROLE, &args.encode(), &[])?;
        let client = AgentClient::new(agent_socket(sim));
        let deadline = Instant::now() + SETUP_TIMEOUT;
        while !client.is_up() {
            process.check_alive()?;
            if Instant::now() >= deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "the domain agent did not start"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(AgentProcess { client, process })
    }

    /// The agent, as a process of its domain reaches it.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    /// The agent's process.
    pub fn process(&self) -> &PeerProcess {
        &self.process
    }
}

/// Domains `first`, `first + 1`, … of one [`DOMAINS_ROLE`] peer.
#[derive(Debug, Clone, PartialEq)]
struct DomainsArgs {
    sim: PathBuf,
    first: u16,
    count: u16,
}

impl DomainsArgs {
    fn encode(&self) -> String {
        format!("{}|{}|{}", self.first, self.count, self.sim.display())
    }

    fn decode(s: &str) -> io::Result<DomainsArgs> {
        let bad = || bad_arg(DOMAINS_ROLE, s);
        let mut parts = s.splitn(3, '|');
        let mut next = || parts.next().ok_or_else(bad);
        let (first, count, sim) = (next()?, next()?, next()?);
        Ok(DomainsArgs {
            first: first.parse().map_err(|_| bad())?,
            count: count.parse().map_err(|_| bad())?,
            sim: PathBuf::from(sim),
        })
    }
}

/// Peer of many domains: attaches as each domain its argument names (room for thousands of
/// connections on each link, wake-ups only) and echoes [`PAYLOAD`]-byte messages on
/// [`ECHO_PORT`] of each, until it is killed.
pub(crate) fn domains_child(arg: &str) -> io::Result<()> {
    let a = DomainsArgs::decode(arg)?;
    let rt = crate::rpc::runtime(Flavor::Current)?;
    rt.block_on(async move {
        let mut domains = Vec::new();
        let mut set = tokio::task::JoinSet::new();
        for i in 0..a.count {
            let id = a.first.checked_add(i).ok_or_else(|| bad_arg(DOMAINS_ROLE, arg))?;
            let backend = SimBackend::boot(&a.sim, Some(DomId(id))).map_err(io::Error::other)?;
            let domain = VsockDomain::start(backend, domain_config(None, Limits::Many))?;
            let mut listener = domain.listen(ECHO_PORT)?;
            domains.push(domain);
            set.spawn(async move {
                loop {
                    let s = listener.accept().await?;
                    tokio::spawn(async move {
                        let _ = crate::rpc::serve_raw(s).await;
                    });
                }
            });
        }
        match set.join_next().await {
            Some(r) => r.map_err(io::Error::other)?,
            None => std::future::pending::<io::Result<()>>().await,
        }
    })
}

/// What the kernel counts of a process's memory (`/proc/<pid>/status`), in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    /// Resident set (`VmRSS`): pages of the process in memory, private or shared.
    pub rss: u64,
    /// Of which anonymous (`RssAnon`): heap, stacks.
    pub anon: u64,
    /// Of which shared memory (`RssShmem`): the simulated grants the process maps.
    pub shmem: u64,
}

impl Memory {
    /// The memory of process `pid` now.
    pub fn of(pid: u32) -> io::Result<Memory> {
        Memory::parse(&std::fs::read_to_string(format!("/proc/{pid}/status"))?)
    }

    /// Reads the figures out of the text of a `/proc/<pid>/status` file.
    pub fn parse(status: &str) -> io::Result<Memory> {
        let field = |name: &str| -> io::Result<u64> {
            let line =
                status.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, format!("no {name} in the status"))
                })?;
            let kib =
                line.trim().strip_suffix("kB").and_then(|n| n.trim().parse::<u64>().ok()).ok_or_else(
                    || io::Error::new(io::ErrorKind::InvalidData, format!("bad {name}: {line:?}")),
                )?;
            Ok(kib * 1024)
        };
        Ok(Memory { rss: field("VmRSS")?, anon: field("RssAnon")?, shmem: field("RssShmem")? })
    }
}

/// One [`PAYLOAD`]-byte round trip on `s`, checked.
async fn round_trip(s: &mut AgentStream) -> io::Result<()> {
    let data: Vec<u8> = (0..PAYLOAD).map(|i| i as u8).collect();
    let mut back = vec![0u8; PAYLOAD];
    s.write_all(&data).await?;
    s.read_exact(&mut back).await?;
    if back == data { Ok(()) } else { Err(io::Error::other("the peer echoed the wrong bytes")) }
}

/// Opens a connection through `agent` to [`ECHO_PORT`] of `domain`, with one round trip.
async fn open(agent: &AgentClient, domain: u16) -> io::Result<AgentStream> {
    let mut s = agent.connect(Target::Cid(u32::from(domain)), ECHO_PORT, Some(SETUP_TIMEOUT)).await?;
    round_trip(&mut s).await?;
    Ok(s)
}

/// The agent's memory after its allocations of the last step have settled.
async fn settled(agent: &AgentProcess) -> io::Result<Memory> {
    tokio::time::sleep(SETTLE).await;
    Memory::of(agent.process().id())
}

/// The agent's memory per connection and per link: an agent (domain [`CLIENT_DOM`]) and
/// `1 + links` echoing domains from [`SERVER_DOM`] on, in one peer process. With one connection
/// to [`SERVER_DOM`] open (its link up), the agent's memory is read before and after `conns`
/// more connections to it, and then before and after one connection to each of the `links`
/// other domains (each a new link). Every connection carries one round trip and stays open
/// until the end.
pub fn agent_memory(conns: u64, links: u16, flavor: Flavor) -> io::Result<Vec<MemoryRow>> {
    let dir = ScratchDir::new()?;
    let sim = dir.path().join("simxen.sock");
    let _hv = SimHypervisor::spawn(&sim)?;
    let count = links.checked_add(1).ok_or_else(|| io::Error::other("too many links"))?;
    let domains = DomainsArgs { sim: sim.clone(), first: SERVER_DOM.0, count };
    let mut peer = PeerProcess::spawn(DOMAINS_ROLE, &domains.encode(), &[])?;
    let agent = AgentProcess::spawn(&sim, CLIENT_DOM, None, Limits::Many, flavor)?;
    let rt = crate::rpc::runtime(flavor)?;
    let rows = rt.block_on(async {
        let client = agent.client();
        let mut held = vec![open(client, SERVER_DOM.0).await?];
        let before = settled(&agent).await?;
        for _ in 0..conns {
            held.push(open(client, SERVER_DOM.0).await?);
        }
        let after = settled(&agent).await?;
        let per_conn = MemoryRow {
            name: "agent_memory_connection".into(),
            what: format!("{conns} connections to one domain (one link)"),
            count: conns,
            before,
            after,
        };
        let before = after;
        for d in 1..count {
            held.push(open(client, SERVER_DOM.0 + d).await?);
        }
        let after = settled(&agent).await?;
        let per_link = MemoryRow {
            name: "agent_memory_link".into(),
            what: format!("{links} links to {links} more domains, one connection on each"),
            count: u64::from(links),
            before,
            after,
        };
        drop(held);
        Ok::<_, io::Error>(vec![per_conn, per_link])
    });
    peer.check_alive()?;
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_arguments_round_trip() {
        for spin in [None, Some(Duration::from_micros(50))] {
            for limits in [Limits::Default, Limits::Many] {
                let a = AgentArgs {
                    sim: "/tmp/a|b/simxen.sock".into(),
                    domid: DomId(1),
                    spin,
                    limits,
                    flavor: Flavor::Multi(2),
                };
                assert_eq!(AgentArgs::decode(&a.encode()).ok(), Some(a));
            }
        }
        assert!(AgentArgs::decode("current|-|lots|1|/tmp/s").is_err());
        let d = DomainsArgs { sim: "/tmp/x|y/s.sock".into(), first: 2, count: 17 };
        assert_eq!(DomainsArgs::decode(&d.encode()).ok(), Some(d));
        assert!(DomainsArgs::decode("2|x|/tmp/s").is_err());
    }

    #[test]
    fn memory_comes_from_the_status_file() {
        let status = "Name:\tdombusd\nVmPeak:\t  99999 kB\nVmRSS:\t    5120 kB\nRssAnon:\t    3072 kB\n\
                      RssFile:\t    1024 kB\nRssShmem:\t    1024 kB\nThreads:\t1\n";
        let m = Memory::parse(status).unwrap();
        assert_eq!(m, Memory { rss: 5 << 20, anon: 3 << 20, shmem: 1 << 20 });
        assert!(Memory::parse("VmRSS:\t5120 kB\n").is_err());
        assert!(Memory::parse("VmRSS:\tlots kB\nRssAnon:\t1 kB\nRssShmem:\t1 kB\n").is_err());
        // This process's own figures parse.
        let me = Memory::of(std::process::id()).unwrap();
        assert!(me.rss > 0 && me.anon <= me.rss, "{me:?}");
    }
}
