//! The domain agent's benchmarks end to end: the parent's calls and connections go through an
//! agent process, and the agent's memory grows with what is opened through it. A test binary
//! without libtest's harness, so that it can play the benchmark's peer processes itself.

use std::io;
use std::time::{Duration, Instant};

use dombus_benches::rpc::{RpcPingPong, SERVER_DOM, Stack, Transport};
use dombus_benches::{PingPong, agent};
use dombus_rpc::Codec;

const AGENT: Transport = Transport::Agent { spin: None };

fn check(ok: bool, what: impl FnOnce() -> String) -> io::Result<()> {
    if ok { Ok(()) } else { Err(io::Error::other(what())) }
}

fn runtime() -> io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// The agent's (local sockets open, connections on its link to the server).
fn agent_holds(b: &RpcPingPong) -> io::Result<(u32, u32)> {
    let a = b.agent().ok_or_else(|| io::Error::other("no agent"))?;
    let status = runtime()?.block_on(a.client().status())?;
    let on_link = status.links.iter().find(|(d, _)| *d == SERVER_DOM).map_or(0, |(_, n)| *n);
    Ok((status.local, on_link))
}

/// Calls of the raw and the dombus-rpc stack go through the agent, with the agent's CPU counted.
fn calls_go_through_the_agent() -> io::Result<()> {
    for stack in [Stack::Raw, Stack::Rpc(Codec::Bincode)] {
        let mut b = RpcPingPong::new(AGENT, stack)?;
        let cpu0 = b.peer_cpu_time()? - b.peer().cpu_time()?;
        b.run(200, None)?;
        let (local, on_link) = agent_holds(&b)?;
        check(local >= 1 && on_link >= 1, || {
            format!("{stack:?}: the agent holds {local} local sockets, {on_link} connections")
        })?;
        let agent_cpu = b.peer_cpu_time()? - b.peer().cpu_time()?;
        check(agent_cpu > cpu0, || {
            format!("{stack:?}: the agent's CPU time is not counted ({cpu0:?} → {agent_cpu:?})")
        })?;
    }
    let b = RpcPingPong::new(Transport::Xen { spin: None }, Stack::Raw)?;
    check(b.agent().is_none(), || "the in-process row has an agent".into())
}

/// Each connection of a connect batch goes through the agent and is closed before the next.
fn connects_go_through_the_agent_and_close() -> io::Result<()> {
    let mut b = RpcPingPong::new(AGENT, Stack::Raw)?;
    let before = agent_holds(&b)?;
    b.connects(30)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = agent_holds(&b)?;
        if now == before {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "after 30 connects the agent holds (local, on the link) {now:?}, before {before:?}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The agent's memory grows with connections held through it, and with links (mapped rings).
fn memory_grows_with_connections_and_links() -> io::Result<()> {
    let rows = agent::agent_memory(64, 2, Default::default())?;
    let [conn, link] = &rows[..] else {
        return Err(io::Error::other(format!("{} memory rows", rows.len())));
    };
    check(conn.count == 64 && link.count == 2, || format!("counts {} and {}", conn.count, link.count))?;
    let (rss, anon, _) = conn.per_unit();
    check(anon > 1024.0 && rss < f64::from(1u32 << 20), || format!("per connection: rss {rss} anon {anon}"))?;
    let (_, _, shmem) = link.per_unit();
    check(shmem >= 4096.0, || format!("per link: shared memory {shmem} (no ring pages mapped?)"))
}

/// One test: `Err` says what failed.
type Check = fn() -> io::Result<()>;

fn main() {
    dombus_benches::run_child_if_requested();
    let tests: [(&str, Check); 3] = [
        ("calls_go_through_the_agent", calls_go_through_the_agent),
        ("connects_go_through_the_agent_and_close", connects_go_through_the_agent_and_close),
        ("memory_grows_with_connections_and_links", memory_grows_with_connections_and_links),
    ];
    let mut failed = 0;
    for (name, test) in tests {
        match test() {
            Ok(()) => println!("test {name} ... ok"),
            Err(e) => {
                println!("test {name} ... FAILED: {e}");
                failed += 1;
            }
        }
    }
    println!("\n{} passed, {failed} failed", tests.len() - failed);
    if failed > 0 {
        std::process::exit(1);
    }
}
