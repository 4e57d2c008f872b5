//! The agent on the simulated hypervisor: many local users of one domain's links at once,
//! ports that belong to the domain, privileged ports, local processes and agents that go away.
#![allow(clippy::unwrap_used, missing_docs)]

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dombus_agent::proto::Target;
use dombus_agent::{Agent, AgentClient, AgentConfig, AgentStream, DomainSockets};
use dombus_sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_transport_xen::DomId;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long a test waits for what must happen before calling it a hang (a liveness limit, not a
/// performance claim).
const LIVENESS: Duration = Duration::from_secs(30);

struct Host {
    dir: PathBuf,
    _hv: SimHypervisorHandle,
}

impl Host {
    fn new(tag: &str) -> Host {
        let dir = std::env::temp_dir().join(format!("dombus-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let hv = SimHypervisor::spawn(&dir.join("simxen.sock")).unwrap();
        Host { dir, _hv: hv }
    }

    fn sim(&self) -> PathBuf {
        self.dir.join("simxen.sock")
    }

    /// Domain `id` (0: the toolstack's) attached in this process, named `name`.
    fn domain(&self, id: u16, name: &str) -> Arc<dyn DomainSockets> {
        let backend = SimBackend::boot_named(self.sim(), Some(DomId(id)), name).unwrap();
        Arc::new(VsockDomain::start(backend, VsockConfig::default()).unwrap())
    }

    fn agent_config(&self, id: u16) -> AgentConfig {
        AgentConfig::new(self.dir.join(format!("dom{id}/agent.sock")))
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Echoes every connection to `port` of `domain`, and holds it open after the other side
/// finishes sending: a connection ends only when a side closes it.
fn echo(domain: &Arc<dyn DomainSockets>, port: u32) {
    let mut l = domain.listen(port).unwrap();
    tokio::spawn(async move {
        while let Ok(s) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                std::future::pending::<()>().await;
            });
        }
    });
}

async fn round_trip(s: &mut AgentStream, msg: &[u8]) {
    s.write_all(msg).await.unwrap();
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(LIVENESS, s.read_exact(&mut back)).await.expect("echo hung").unwrap();
    assert_eq!(back, msg);
}

async fn eventually<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + LIVENESS;
    loop {
        if let Some(t) = f().await {
            return t;
        }
        assert!(Instant::now() < deadline, "{what} did not happen");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn many_local_users_share_the_domains_one_link() {
    let host = Host::new("share");
    let server = host.domain(2, "server");
    echo(&server, 5000);
    let agent = Agent::serve(host.domain(1, "client"), host.agent_config(1)).unwrap();
    let client = AgentClient::new(agent.socket());

    // Eight users of domain 1 connect at once; each stream carries its own bytes.
    let mut streams = Vec::new();
    for i in 0..8u8 {
        let c = client.clone();
        streams.push(tokio::spawn(async move {
            let mut s = c.connect(Target::Cid(2), 5000, Some(LIVENESS)).await.unwrap();
            assert_eq!(s.peer_domain(), DomId(2));
            round_trip(&mut s, &[i; 300]).await;
            s
        }));
    }
    let mut streams: Vec<AgentStream> = futures_join(streams).await;
    let status = client.status().await.unwrap();
    assert_eq!(status.domain, DomId(1));
    assert_eq!(status.links, vec![(DomId(2), 8)], "one link, every connection on it");

    // One user goes away (its socket closes, as when its process exits): its connection ends,
    // the others go on.
    drop(streams.remove(3));
    eventually("the closed connection ending", async || {
        let s = client.status().await.unwrap();
        (s.links == vec![(DomId(2), 7)]).then_some(())
    })
    .await;
    for (i, s) in streams.iter_mut().enumerate() {
        round_trip(s, format!("still here {i}").as_bytes()).await;
    }
}

async fn futures_join<T: Send + 'static>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test]
async fn a_process_listens_through_the_agent() {
    let host = Host::new("listen");
    let peer = host.domain(1, "peer");
    let agent = Agent::serve(host.domain(2, "service"), host.agent_config(2)).unwrap();
    let client = AgentClient::new(agent.socket());
    let mut listener = client.listen(7000).await.unwrap();
    assert_eq!(listener.domain(), DomId(2));
    assert_eq!(client.status().await.unwrap().listening, vec![7000]);

    let mut outside =
        peer.connect(dombus_transport_xen::vsock::VsockAddr::new(2, 7000), Some(LIVENESS)).await.unwrap();
    let mut inside = tokio::time::timeout(LIVENESS, listener.accept()).await.unwrap().unwrap();
    assert_eq!(inside.peer_domain(), DomId(1), "the peer's domain as the link established it");
    assert_eq!(inside.ports(), (7000, outside.ports().0));

    outside.write_all(b"hello").await.unwrap();
    let mut b = [0u8; 5];
    inside.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"hello");
    // The peer finishes sending: the process reads the end, and may still answer.
    outside.shutdown().await.unwrap();
    assert_eq!(inside.read(&mut b).await.unwrap(), 0);
    assert_eq!(inside.read(&mut b).await.unwrap(), 0, "the end stays the end");
    inside.write_all(b"bye").await.unwrap();
    let mut got = [0u8; 3];
    outside.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"bye");
    // The process closes: the peer sees the connection end.
    drop(inside);
    let end = tokio::time::timeout(LIVENESS, outside.read(&mut got)).await.expect("peer never saw the close");
    assert!(matches!(end, Ok(0) | Err(_)), "{end:?}");
}

#[tokio::test]
async fn ports_are_the_domains() {
    let host = Host::new("ports");
    let domain = host.domain(2, "service");
    let agent = Agent::serve(domain.clone(), host.agent_config(2)).unwrap();
    let (a, b) = (AgentClient::new(agent.socket()), AgentClient::new(agent.socket()));
    let first = a.listen(6000).await.unwrap();
    let e = b.listen(6000).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::AddrInUse, "{e}");
    // The agent's own process (the daemon that is the domain's agent) is no different.
    assert_eq!(domain.listen(6000).err().map(|e| e.kind()), Some(io::ErrorKind::AddrInUse));
    // Free again as soon as its listener is gone.
    drop(first);
    let again = eventually("the port coming free", async || b.listen(6000).await.ok()).await;
    assert_eq!(again.port(), 6000);
}

#[tokio::test]
async fn ports_below_1024_need_a_privileged_local_user() {
    let host = Host::new("privileged");
    let dom0 = host.domain(0, "Domain-0");
    let mut cfg = host.agent_config(0);
    cfg.privileged_uids = vec![u32::MAX - 1];
    let strict = Agent::serve(dom0.clone(), cfg).unwrap();
    let e = AgentClient::new(strict.socket()).listen(80).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
    let me = rustix::process::geteuid().as_raw();
    assert!(e.to_string().contains(&format!("uid {me}")), "{e}");
    // Unprivileged ports stay open to every user of the agent.
    let _open = AgentClient::new(strict.socket()).listen(1024).await.unwrap();
    drop(strict);

    // By default the agent's own user and root are privileged.
    let agent = Agent::serve(dom0, host.agent_config(0)).unwrap();
    let l = AgentClient::new(agent.socket()).listen(80).await.unwrap();
    assert_eq!(l.port(), 80);
}

#[tokio::test]
async fn a_stopping_agent_fails_its_connections_at_once() {
    let host = Host::new("stop");
    let server = host.domain(2, "server");
    echo(&server, 5000);
    let agent = Agent::serve(host.domain(1, "client"), host.agent_config(1)).unwrap();
    let client = AgentClient::new(agent.socket());
    let mut s = client.connect(Target::Cid(2), 5000, Some(LIVENESS)).await.unwrap();
    let mut listener = client.listen(9000).await.unwrap();
    round_trip(&mut s, b"ping").await;
    agent.stop().await;
    let mut b = [0u8; 1];
    let e = tokio::time::timeout(LIVENESS, s.read(&mut b)).await.expect("read hung").unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
    assert!(e.to_string().contains("stopped"), "{e}");
    let e = tokio::time::timeout(LIVENESS, listener.accept()).await.expect("accept hung").unwrap_err();
    assert!(e.to_string().contains("closed the listener"), "{e}");
    let e = client.connect(Target::Cid(2), 5000, None).await.unwrap_err();
    assert!(e.to_string().contains("no domain agent runs there"), "{e}");
}

#[tokio::test]
async fn connect_by_domain_name() {
    let host = Host::new("names");
    let server = host.domain(3, "storage");
    echo(&server, 5000);
    let agent = Agent::serve(host.domain(0, "Domain-0"), host.agent_config(0)).unwrap();
    let client = AgentClient::new(agent.socket());
    let mut s = client.connect(Target::Name("storage".into()), 5000, Some(LIVENESS)).await.unwrap();
    assert_eq!(s.peer_domain(), DomId(3));
    round_trip(&mut s, b"by name").await;
    let e = client.connect(Target::Name("nobody".into()), 5000, None).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    assert!(e.to_string().contains("no domain is named \"nobody\""), "{e}");
}

#[tokio::test]
async fn without_an_agent_the_error_says_where_it_looked() {
    let e = AgentClient::new("/nonexistent/dombus/agent.sock")
        .connect(Target::Cid(1), 1, None)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::NotFound);
    let text = e.to_string();
    assert!(text.contains("/nonexistent/dombus/agent.sock") && text.contains("DOMBUS_AGENT"), "{text}");
}

#[tokio::test]
async fn bad_and_idle_local_requests_cost_nothing_lasting() {
    let host = Host::new("hostile");
    let server = host.domain(2, "server");
    echo(&server, 5000);
    let mut cfg = host.agent_config(1);
    cfg.request_timeout = Duration::from_millis(200);
    cfg.max_local = 4;
    let agent = Agent::serve(host.domain(1, "client"), cfg).unwrap();
    let path = agent.socket().to_path_buf();

    // Garbage: an error reply, and the socket is closed.
    let mut junk = tokio::net::UnixStream::connect(&path).await.unwrap();
    junk.write_all(&[0xAB; 20]).await.unwrap();
    let mut reply = Vec::new();
    tokio::time::timeout(LIVENESS, junk.read_to_end(&mut reply)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&reply).contains("bad magic"), "{reply:?}");
    // Silence: closed after the request timeout.
    let mut idle = tokio::net::UnixStream::connect(&path).await.unwrap();
    let n = tokio::time::timeout(LIVENESS, idle.read(&mut [0u8; 16])).await.unwrap().unwrap();
    assert_eq!(n, 0);
    // Past the bound of local sockets: refused with the reason, and the agent still serves.
    let client = AgentClient::new(&path);
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(client.connect(Target::Cid(2), 5000, Some(LIVENESS)).await.unwrap());
    }
    let e = client.connect(Target::Cid(2), 5000, None).await.unwrap_err();
    assert!(e.to_string().contains("limit"), "{e}");
    held.pop();
    let mut s =
        eventually("a slot coming free", async || client.connect(Target::Cid(2), 5000, None).await.ok())
            .await;
    round_trip(&mut s, b"served").await;
}

/// `dombusd` as its own process: killed, its processes' connections fail at once and its
/// peers see the link close; started again, it serves again.
#[tokio::test]
async fn a_killed_agent_fails_its_connections_and_a_restarted_one_serves() {
    let host = Host::new("killed");
    let server = host.domain(2, "server");
    echo(&server, 5000);
    let socket = host.dir.join("dom3/agent.sock");
    let start = |host: &Host| {
        let (_, token) = SimBackend::create_domain(host.sim(), Some(DomId(3)), "guest").unwrap();
        std::process::Command::new(env!("CARGO_BIN_EXE_dombusd"))
            .args([
                "--sim",
                host.sim().to_str().unwrap(),
                "--domid",
                "3",
                "--socket",
                socket.to_str().unwrap(),
                // No connection manager on this test's host.
                "--open-links",
            ])
            .env(dombus_sim::TOKEN_ENV, token)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap()
    };
    let mut child = start(&host);
    let client = AgentClient::new(&socket);
    wait_up(&client).await;
    let mut s = client.connect(Target::Cid(2), 5000, Some(LIVENESS)).await.unwrap();
    round_trip(&mut s, b"before").await;

    child.kill().unwrap();
    child.wait().unwrap();
    let e = tokio::time::timeout(LIVENESS, s.read(&mut [0u8; 8])).await.expect("read hung").unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
    assert!(e.to_string().contains("went away"), "{e}");
    // The peer's link to the dead domain closes.
    eventually("the server's link to domain 3 closing", async || {
        (!server.links().iter().any(|(d, _)| *d == DomId(3))).then_some(())
    })
    .await;

    let mut child = start(&host);
    wait_up(&client).await;
    let mut s = client.connect(Target::Cid(2), 5000, Some(LIVENESS)).await.unwrap();
    round_trip(&mut s, b"after").await;
    child.kill().unwrap();
    child.wait().unwrap();
}

async fn wait_up(client: &AgentClient) {
    eventually("the agent coming up", async || client.status().await.ok()).await;
}

#[tokio::test]
async fn a_process_that_half_closes_and_then_exits_ends_its_connection() {
    let host = Host::new("halfclose");
    let server = host.domain(2, "server");
    echo(&server, 5000);
    let agent = Agent::serve(host.domain(1, "client"), host.agent_config(1)).unwrap();
    let client = AgentClient::new(agent.socket());
    let mut s = client.connect(Target::Cid(2), 5000, Some(LIVENESS)).await.unwrap();
    round_trip(&mut s, b"one").await;
    // It finishes sending (the peer reads an end but never closes), then exits.
    s.shutdown().await.unwrap();
    eventually("the agent passing the half close on", async || {
        client.status().await.ok().filter(|st| st.links == vec![(DomId(2), 1)]).map(|_| ())
    })
    .await;
    drop(s);
    eventually("the exited process's connection ending", async || {
        let st = client.status().await.unwrap();
        (st.links == vec![(DomId(2), 0)]).then_some(())
    })
    .await;
}

/// How long a writer makes no progress before [`fill`] takes it as stalled.
const STALLED: Duration = Duration::from_secs(2);

/// Writes to `s` until nothing more goes for [`STALLED`] (its reader reads nothing) or the
/// connection ends, and returns how many bytes went: what the way to the reader holds.
async fn fill<S: tokio::io::AsyncWrite + Unpin>(s: &mut S) -> usize {
    let chunk = vec![7u8; 16 << 10];
    let mut sent = 0;
    while let Ok(Ok(n)) = tokio::time::timeout(STALLED, s.write(&chunk)).await {
        sent += n;
        assert!(sent < 64 << 20, "the writer never stalled");
    }
    sent
}

#[tokio::test]
async fn a_process_asks_the_agent_for_a_larger_receive_buffer() {
    use dombus_transport_xen::vsock::VsockAddr;
    let host = Host::new("rcvbuf");
    let peer = host.domain(2, "peer");
    let agent = Agent::serve(host.domain(1, "bulk"), host.agent_config(1)).unwrap();
    let plain = AgentClient::new(agent.socket());
    let bulk = AgentClient::new(agent.socket()).with_recv_buffer(1 << 20).unwrap();

    // The peer writes to each connection it accepts until it stalls, and says how far it got;
    // the process reads nothing. The agent relays into the process's socket until that is full,
    // so what differs between two connections is the receive buffer the peer was given.
    let mut l = peer.listen(5000).unwrap();
    let (tx, mut filled) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(mut s) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tx.send(fill(&mut s).await);
                std::future::pending::<()>().await;
            });
        }
    });
    let _a = plain.connect(Target::Cid(2), 5000, Some(LIVENESS)).await.unwrap();
    let default = filled.recv().await.unwrap();
    let _b = bulk.connect(Target::Cid(2), 5000, Some(LIVENESS)).await.unwrap();
    let larger = filled.recv().await.unwrap();
    // The peer may fill the whole 1 MiB (with the default, 256 KiB and what the agent has
    // passed on: 448 KiB here, the process's socket holding 192 KiB of it).
    assert!(default >= 256 << 10, "the default buffer alone takes 256 KiB: {default}");
    assert!(larger >= 1 << 20 && larger > default, "1 MiB of buffer: {larger} in flight, against {default}");

    // A listener's connections get it too.
    let mut plain_l = plain.listen(6000).await.unwrap();
    let mut bulk_l = bulk.listen(6001).await.unwrap();
    let mut sent = Vec::new();
    for (port, listener) in [(6000, &mut plain_l), (6001, &mut bulk_l)] {
        let mut outside = peer.connect(VsockAddr::new(1, port), Some(LIVENESS)).await.unwrap();
        let inside = tokio::time::timeout(LIVENESS, listener.accept()).await.unwrap().unwrap();
        sent.push((fill(&mut outside).await, outside, inside));
    }
    let (default, larger) = (sent[0].0, sent[1].0);
    assert!(larger >= 1 << 20 && larger > default, "accepted: {larger} in flight, against {default}");

    // What the domain cannot give is refused with the reason; what the protocol cannot carry
    // is refused before asking.
    for bytes in [64 << 10, 2 << 20] {
        let e = AgentClient::new(agent.socket())
            .with_recv_buffer(bytes)
            .unwrap()
            .connect(Target::Cid(2), 5000, Some(LIVENESS))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bytes}: {e}");
        assert!(e.to_string().contains("receive buffer"), "{e}");
    }
    let e = AgentClient::new(agent.socket()).with_recv_buffer(16 << 20).unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert!(e.to_string().contains("agent protocol"), "{e}");
}
