//! `dombus-link --agent` on the simulated hypervisor: processes of one domain reach a service
//! in another through their domains' agents (run in this test process), share their domain's one
//! link, and a ping with `--reconnect-s` keeps calling while the service's domain dies and comes
//! back.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{LIVENESS, Proc, Scratch, field, link_cmd, simxen};
use dombus_agent::{Agent, AgentConfig, DomainSockets};
use dombus_sim::SimBackend;
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};

/// Domain `id`, attached in this process, served by an agent at `<dir>/dom<id>.sock`.
fn agent(sim: &Path, dir: &Scratch, id: u16) -> (Agent, PathBuf) {
    let backend = SimBackend::boot_named(sim, Some(DomId(id)), &format!("dom{id}")).unwrap();
    let domain: Arc<dyn DomainSockets> =
        Arc::new(VsockDomain::start(backend, VsockConfig::default()).unwrap());
    let socket = dir.path(&format!("dom{id}.sock"));
    (Agent::serve(domain, AgentConfig::new(&socket)).unwrap(), socket)
}

/// `dombus-link --agent SOCKET ARGS...`.
fn through(socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dombus-link"));
    cmd.arg("--agent").arg(socket).args(args);
    cmd
}

/// Runs `dombus-link --agent SOCKET agent-status` and returns its line.
fn status(socket: &Path) -> String {
    let out = through(socket, &["agent-status"]).output().unwrap();
    assert!(out.status.success(), "agent-status failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_their_domains_one_link_through_the_agent() {
    let dir = Scratch::new("agent-link");
    let (_daemon, sim) = simxen(&dir);
    let (_a2, sock2) = agent(&sim, &dir, 2);
    let (_a1, sock1) = agent(&sim, &dir, 1);
    let mut echo = Proc::spawn(through(&sock2, &["vsock-echo", "--port", "5000"]));
    assert_eq!(echo.expect_line("domid=", LIVENESS), "domid=2");
    echo.expect_line("vsock listening port=5000", LIVENESS);

    // Two processes of domain 1 call domain 2 at once, paced so that both run a while.
    let ping = || {
        let args = ["vsock-ping", "--to", "xen:2:5000", "--count", "300", "--reconnect-s", "10"];
        Proc::spawn(through(&sock1, &[&args[..], &["--interval-ms", "5"]].concat()))
    };
    let (mut p1, mut p2) = (ping(), ping());
    // While both run, domain 1's agent holds one link to domain 2, carrying both connections.
    let deadline = Instant::now() + LIVENESS;
    let mut seen = Vec::new();
    loop {
        let line = tokio::task::spawn_blocking({
            let s = sock1.clone();
            move || status(&s)
        })
        .await
        .unwrap();
        if field(&line, "links") == "2:2" {
            assert_eq!(field(&line, "domain"), "1", "{line}");
            break;
        }
        seen.push(line);
        assert!(Instant::now() < deadline, "never one link with both connections: {seen:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for p in [&mut p1, &mut p2] {
        let line = tokio::task::block_in_place(|| p.expect_line("vsock-ping", LIVENESS));
        assert_eq!(field(&line, "round_trips"), "300", "{line}");
        assert_eq!(field(&line, "failed"), "0", "{line}");
        assert_eq!(field(&line, "reconnects"), "0", "{line}");
    }
    // The listener is the domain's: domain 2's agent reports it.
    assert!(status(&sock2).contains("listening=5000 "), "{}", status(&sock2));

    // The roles that attach to the hypervisor themselves refuse --agent, saying why.
    let out = through(&sock1, &["vsock-flood", "--peer", "2", "--kind", "rst"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("virtual-socket roles only"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_through_the_agent_keeps_calling_while_the_peer_domain_restarts() {
    let dir = Scratch::new("agent-reconnect");
    let (_daemon, sim) = simxen(&dir);
    let (_a1, sock1) = agent(&sim, &dir, 1);
    let start_echo = || {
        let mut p = Proc::spawn(link_cmd(&sim, 2, &["vsock-echo", "--port", "5000"]));
        p.expect_line("vsock listening", LIVENESS);
        p
    };
    let mut echo = tokio::task::block_in_place(start_echo);
    let mut ping = Proc::spawn(through(
        &sock1,
        &[
            "vsock-ping",
            "--to",
            "xen:2:5000",
            "--count",
            "200",
            "--interval-ms",
            "10",
            "--reconnect-s",
            "30",
            "--wait-s",
            "30",
        ],
    ));
    tokio::task::block_in_place(|| ping.expect_line("connected conn=0 reconnects=0", LIVENESS));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Domain 2 dies (its link with it) while the ping calls, and comes back a moment later.
    echo.kill();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _echo = tokio::task::block_in_place(start_echo);
    let line = tokio::task::block_in_place(|| ping.expect_line("vsock-ping", Duration::from_secs(60)));
    let n = |k| field(&line, k).parse::<usize>().unwrap();
    assert_eq!(n("round_trips"), 200, "{line}");
    assert!(n("failed") >= 1, "no round trip failed while the peer was gone: {line}");
    assert!(n("reconnects") >= 1, "{line}");
    assert!(n("after_reconnect") >= 1, "no round trip after the peer came back: {line}");
    assert!(n("after_reconnect") < 200, "{line}");
    assert!(ping.stderr().contains("reconnecting"), "{}", ping.stderr());
    assert!(tokio::task::block_in_place(|| ping.wait_timeout(LIVENESS)).unwrap().success());
}
