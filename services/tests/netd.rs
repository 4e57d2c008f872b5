//! `dombus-netd` as a process: it refuses the machine's own network namespace (exit 1, saying
//! why) unless told so; with `--unshare-netns` it serves from a namespace of its own, whose
//! links are not the machine's; on SIGTERM it exits 0 and lets its guests' namespaces go.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{TempDir, missing_prerequisite};
use dombus::rpc::{Address, Net};
use dombus_services::network::netns::{Namespace, in_root_namespace, run_in};
use dombus_services::network::{NetworkClient, VifId};

const NETD: &str = env!("CARGO_BIN_EXE_dombus-netd");

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ctx() -> dombus::context::Context {
    let mut c = dombus::context::current();
    c.deadline = Instant::now() + Duration::from_secs(30);
    c
}

/// Whether this machine lets the test make namespaces (where it does not, a failure in CI).
fn namespaces(test: &str) -> bool {
    if let Err(e) = run_in(Namespace::New, || ()) {
        missing_prerequisite(test, &format!("cannot make a network namespace ({e}): run as root"));
        return false;
    }
    true
}

#[test]
fn the_daemon_refuses_the_machines_own_namespace() {
    if !namespaces("the_daemon_refuses_the_machines_own_namespace") {
        return;
    }
    if !in_root_namespace().unwrap() {
        // Then there is no machine's namespace to refuse from here: the unit test of
        // `enter_namespace` covers the rule.
        missing_prerequisite(
            "the_daemon_refuses_the_machines_own_namespace",
            "the tests do not run in the machine's own network namespace",
        );
        return;
    }
    let dir = TempDir::new("netd-refuses");
    let out = Command::new(NETD)
        .args(["--listen", &format!("unix:{}", dir.path("n.sock").display())])
        .arg("--guest-netns-dir")
        .arg(dir.path("netns"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refusing to run in the machine's own network namespace"), "{err}");
    assert!(!dir.path("n.sock").exists(), "it served nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_serves_from_its_own_namespace_and_exits_cleanly() {
    if !namespaces("the_daemon_serves_from_its_own_namespace_and_exits_cleanly") {
        return;
    }
    let dir = TempDir::new("netd-serves");
    let sock = dir.path("n.sock");
    let netns: PathBuf = dir.path("netns");
    let child = Command::new(NETD)
        .args(["--unshare-netns", "--listen", &format!("unix:{}", sock.display())])
        .arg("--guest-netns-dir")
        .arg(&netns)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut daemon = Daemon(child);
    let addr: Address = format!("unix:{}", sock.display()).parse().unwrap();
    let t = Instant::now();
    while !sock.exists() {
        assert!(t.elapsed() < Duration::from_secs(30), "the daemon did not listen within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let network = NetworkClient::connect(Net::new(), addr).await.unwrap();
    network.bridge_create(ctx(), "xenbr0".into(), None).await.unwrap().unwrap();
    let v = network
        .vif_create(ctx(), VifId { domid: 3, devid: 0 }, None, Some("xenbr0".into()), None, None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(v.guest_netns.as_deref(), Some(netns.join("dom3").to_str().unwrap()));
    // Its links are its namespace's, not this machine's.
    let here = Command::new("ip").args(["link", "show", "xenbr0"]).output().unwrap();
    assert!(!here.status.success(), "the daemon's bridge is in this namespace: {here:?}");
    let theirs = Command::new("nsenter")
        .arg(format!("--net=/proc/{}/ns/net", daemon.0.id()))
        .args(["ip", "link", "show", "xenbr0"])
        .output()
        .unwrap();
    assert!(theirs.status.success(), "the bridge is in the daemon's namespace: {theirs:?}");
    assert!(netns.join("dom3").exists());

    rustix::process::kill_process(
        rustix::process::Pid::from_raw(daemon.0.id() as i32).unwrap(),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let t = Instant::now();
    let status = loop {
        if let Some(s) = daemon.0.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the daemon did not exit within 30 s of SIGTERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");
    assert!(!netns.join("dom3").exists(), "the guests' namespaces went with the daemon");
}
