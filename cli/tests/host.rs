//! End to end, as an operator would: `dombus host up`, `dombus storage …` calls across domains
//! (toolstack → storage domain over transport-xen link sockets on the simulated hypervisor),
//! `dombus host status`, `dombus host down` — and no stray processes after; the registry refuses
//! a domain registering another; `dombus demo` runs to completion.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{DOMBUS, Down, dombus, guest_net, json, stdout};

use dombus::rpc::cli::NetArgs;
use dombus::transport::types::DomId;
use dombus_services::registry::{DomainEntry, RegistryClient, RegistryError};
use dombus_services::storage::StorageClient;

fn alive(pid: u64) -> bool {
    // A process that exited but was not yet reaped by init shows as a zombie: not running.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
}

#[test]
fn host_up_storage_calls_across_domains_status_and_down() {
    let state = std::env::temp_dir().join(format!("dombus-host-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let _down = Down(state.clone());

    let up = dombus(&state, &["host", "up"]);
    assert!(up.status.success(), "{up:?}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(state.join("host.json")).unwrap()).unwrap();
    let pids: Vec<u64> =
        manifest["procs"].as_array().unwrap().iter().map(|p| p["pid"].as_u64().unwrap()).collect();
    assert_eq!(pids.len(), 4, "hypervisor, toolstack agent, backend, storage: {manifest}");
    assert!(pids.iter().all(|&p| alive(p)));
    // A second host in the same state directory is refused.
    let again = dombus(&state, &["host", "up"]);
    assert_eq!(again.status.code(), Some(3), "{again:?}");

    // Storage calls: the toolstack (domain 0) → the storage domain (domain 2).
    let o = dombus(&state, &["storage", "create", "d0", "--size", "64M", "--format", "qcow2"]);
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("d0"), "{o:?}");
    let o = dombus(&state, &["--json", "storage", "info", "d0"]);
    let v = json(&o);
    assert_eq!((v["format"].as_str(), v["virtual_size"].as_u64()), (Some("qcow2"), Some(64 << 20)), "{v}");
    assert!(dombus(&state, &["storage", "snapshot-create", "d0", "--snapshot", "s1"]).status.success());
    let v = json(&dombus(&state, &["--json", "storage", "snapshot-list", "d0"]));
    assert_eq!(v[0]["name"], "s1", "{v}");
    let o = dombus(&state, &["storage", "clone-disk", "d0", "--name", "c0", "--linked"]);
    assert!(o.status.success(), "{o:?}");
    let o = dombus(&state, &["storage", "list"]);
    assert!(stdout(&o).starts_with("NAME"), "a table: {o:?}");
    assert!(stdout(&o).contains("c0") && stdout(&o).contains("d0"), "{o:?}");
    // Service errors: exit 1, the service's sentence.
    let o = dombus(&state, &["storage", "info", "nope"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains(r#"no image "nope""#), "{o:?}");
    let o = dombus(&state, &["storage", "delete", "d0"]);
    assert_eq!(o.status.code(), Some(1), "d0 backs c0: {o:?}");
    let o = dombus(&state, &["storage", "create", "../escape", "--size", "1M"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains(r#"invalid name "../escape""#), "{o:?}");
    // Usage errors: exit 2.
    let o = dombus(&state, &["storage", "create", "x", "--size", "ten"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(dombus(&state, &["storage", "delete", "c0"]).status.success());
    assert!(dombus(&state, &["storage", "delete", "d0"]).status.success());
    // Explicit domain, describe and ping across domains.
    assert!(dombus(&state, &["storage", "--domain", "2", "list"]).status.success());
    let o = dombus(&state, &["describe", "xen:2:5100"]);
    assert!(stdout(&o).starts_with("storage (version 1)"), "{o:?}");
    let v = json(&dombus(&state, &["--json", "ping", "xen:2:5100", "--count", "200"]));
    assert_eq!(v["count"], 200);

    // Status: processes, the registry's domains, services answering, links. The daemons keep no
    // link open between calls, so the test holds one (domain 7 to the storage domain) while it
    // asks, and asks again once that link is gone.
    let sim = state.join("simxen.sock");
    let held = LinkHolder::open(&sim, 7, "xen:2:5100");
    let v = json(&dombus(&state, &["--json", "host", "status"]));
    let procs: Vec<(&str, bool)> = v["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["running"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        procs,
        [("hypervisor", true), ("toolstack", true), ("backend", true), ("storage", true)],
        "{v}"
    );
    let names: Vec<&str> =
        v["domains"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["backend", "storage"], "{v}");
    let services: Vec<(&str, bool)> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["ping_p50_us"].as_f64().is_some_and(|us| us > 0.0)))
        .collect();
    assert_eq!(services, [("registry", true), ("storage", true)], "{v}");
    // The toolstack's agent keeps its links to the domains it called (the registry's and the
    // storage domain's) for every later command.
    assert_eq!(
        v["links"],
        serde_json::json!([[0, 1], [0, 2], [2, 7]]),
        "the toolstack's links, and the one domain 7 holds to the storage domain: {v}"
    );
    let text = stdout(&dombus(&state, &["host", "status"]));
    assert!(text.contains("storage") && text.contains("xen:2:5100") && text.contains("running"), "{text}");
    assert!(text.contains("links: 0 ↔ 1, 0 ↔ 2, 2 ↔ 7"), "{text}");
    drop(held);
    let v = json(&dombus(&state, &["--json", "host", "status"]));
    assert_eq!(
        v["links"],
        serde_json::json!([[0, 1], [0, 2]]),
        "domain 7 is gone, and its link with it: {v}"
    );

    // The registry knows who calls: a domain may register itself, not another.
    registry_checks_the_caller(&state.join("simxen.sock"));

    let down = dombus(&state, &["host", "down"]);
    assert!(down.status.success(), "{down:?}");
    assert!(stdout(&down).contains("4 processes stopped"), "{down:?}");
    // `down` waited for each process; init may take a moment to reap them (a liveness limit).
    let t = std::time::Instant::now();
    loop {
        let stray: Vec<u64> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if stray.is_empty() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(60), "stray processes after host down: {stray:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!state.join("host.json").exists());
    let o = dombus(&state, &["host", "status"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    // Without a host, storage needs an address.
    let o = dombus(&state, &["storage", "list"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
}

/// A domain (its own attachment to the simulated hypervisor) with a connection open to a
/// service, in a runtime of its own: the link between the two domains lives until this is
/// dropped.
struct LinkHolder {
    rt: Option<tokio::runtime::Runtime>,
    client: Option<StorageClient>,
}

impl LinkHolder {
    fn open(sim: &Path, domid: u16, addr: &str) -> LinkHolder {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let client = rt.block_on(async {
            let args = NetArgs::through_agent(None, Duration::from_secs(10));
            let c = StorageClient::connect(guest_net(sim, domid), addr.parse().unwrap()).await.unwrap();
            c.list(args.context()).await.unwrap().unwrap();
            c
        });
        LinkHolder { rt: Some(rt), client: Some(client) }
    }
}

impl Drop for LinkHolder {
    fn drop(&mut self) {
        drop(self.client.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

fn registry_checks_the_caller(sim: &Path) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let args = NetArgs::through_agent(None, Duration::from_secs(10));
        let registry =
            RegistryClient::connect(guest_net(sim, 7), "xen:backend:1".parse().unwrap()).await.unwrap();
        let entry = |domid| DomainEntry {
            domid: DomId(domid),
            name: "intruder".into(),
            role: "test".into(),
            services: vec![],
        };
        let r = registry.register(args.context(), entry(2)).await.unwrap();
        assert_eq!(r, Err(RegistryError::Denied { caller: "7".into(), domid: DomId(2) }));
        assert_eq!(
            registry.unregister(args.context(), DomId(2)).await.unwrap(),
            Err(RegistryError::Denied { caller: "7".into(), domid: DomId(2) })
        );
        assert_eq!(registry.register(args.context(), entry(7)).await.unwrap(), Ok(()));
        assert_eq!(registry.unregister(args.context(), DomId(7)).await.unwrap(), Ok(true));
    });
}

#[test]
fn the_demo_runs_to_completion() {
    let o = Command::new(DOMBUS).arg("demo").output().unwrap();
    assert!(o.status.success(), "{}\n{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    for expected in [
        "1. Host up",
        "create(\"demo\", 1G, qcow2)",
        "refused, as it must be",
        "ping, storage domain",
        "more processes of the toolstack's domain at once, through its agent",
        "300 round trips",
        "the toolstack's agent holds one link per domain it reached: domain 1",
        "none left running",
        "demo complete",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
    }
}
