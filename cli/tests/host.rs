//! End to end, as an operator would: `dombus host up`, `dombus storage …` calls across domains
//! (toolstack → storage domain over transport-xen link sockets on the simulated hypervisor),
//! `dombus host status`, `dombus policy …` (a guest denied, the decision looked up, lint),
//! `dombus network …` calls (toolstack → network domain, in a network namespace of its own),
//! `dombus host down` — and no stray processes after; `dombus policy watch` prints a denial as it
//! happens; `dombus demo` runs to completion.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{DOMBUS, Down, dombus, guest_net, json, stderr, stdout};

use dombus::rpc::cli::NetArgs;
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
    // The network domain runs where this user may make a network namespace (root, as in CI).
    let network =
        dombus_services::network::netns::run_in(dombus_services::network::netns::Namespace::New, || ())
            .is_ok();
    // The device-model domain runs where qemu is installed (as in CI).
    let dm = std::process::Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert_eq!(
        pids.len(),
        4 + usize::from(network) + usize::from(dm),
        "hypervisor, backend (dom0), storage, guest1, network, device-model: {manifest}"
    );
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

    if network {
        network_commands(&state);
    }

    // Status: processes, the manager's domains, services answering, links. The daemons keep no
    // link open between calls, so the test holds one (domain 7 to the storage domain, which the
    // toolstack allows first) while it asks, and asks again once that link is gone.
    let sim = state.join("simxen.sock");
    assert!(dombus(&state, &["policy", "add", "storage guest7 @tag:storage allow"]).status.success());
    let held = LinkHolder::open(&sim, 7, "xen:2:5100");
    let v = json(&dombus(&state, &["--json", "host", "status"]));
    let procs: Vec<(&str, bool)> = v["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["running"].as_bool().unwrap()))
        .collect();
    let mut want = vec![("hypervisor", true), ("backend", true), ("storage", true), ("guest1", true)];
    want.extend(network.then_some(("network", true)));
    want.extend(dm.then_some(("device-model", true)));
    assert_eq!(procs, want, "{v}");
    let names: Vec<&str> =
        v["domains"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    let mut want = vec!["Domain-0", "storage", "guest1"];
    want.extend(network.then_some("network"));
    want.extend(dm.then_some("device-model"));
    want.push("guest7");
    assert_eq!(names, want, "{v}");
    let services: Vec<(&str, bool)> = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["ping_p50_us"].as_f64().is_some_and(|us| us > 0.0)))
        .collect();
    let mut want = vec![("policy", true), ("storage", true)];
    want.extend(network.then_some(("network", true)));
    want.extend(dm.then_some(("device-model", true)));
    assert_eq!(services, want, "{v}");
    // Every domain links to the backend (dom0, where the toolstack's commands run); domain 7's
    // link to the storage domain was introduced by the manager.
    let mut backend: Vec<u32> = vec![2, 3];
    backend.extend(network.then_some(4));
    backend.extend(dm.then_some(5));
    let links = |extra: &[[u32; 2]]| {
        let mut l: Vec<[u32; 2]> = backend.iter().map(|d| [0, *d]).collect();
        l.extend_from_slice(extra);
        l.sort();
        l
    };
    let want = links(&[[0, 7], [2, 7]]);
    assert_eq!(
        v["links"],
        serde_json::json!(want),
        "the backend's links, and the one domain 7 holds to the storage domain: {v}"
    );
    let text = stdout(&dombus(&state, &["host", "status"]));
    assert!(text.contains("storage") && text.contains("xen:2:5100") && text.contains("running"), "{text}");
    let want =
        format!("links: {}", want.iter().map(|[a, b]| format!("{a} ↔ {b}")).collect::<Vec<_>>().join(", "));
    assert!(text.contains(&want), "{text}");
    drop(held);
    let v = json(&dombus(&state, &["--json", "host", "status"]));
    assert_eq!(v["links"], serde_json::json!(links(&[])), "domain 7 is gone, and its links with it: {v}");

    if dm {
        qemu_commands(&state, network);
    }

    policy_commands(&state);

    let down = dombus(&state, &["host", "down"]);
    assert!(down.status.success(), "{down:?}");
    assert!(stdout(&down).contains(&format!("{} processes stopped", pids.len())), "{down:?}");
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

/// `dombus policy …` as the toolstack uses it: the rules, a denial looked up by its id, the
/// explanation, the audit trail, lint of a directory with an error.
fn policy_commands(state: &Path) {
    let v = json(&dombus(state, &["--json", "policy", "rules"]));
    let rules: Vec<&str> = v.as_array().unwrap().iter().map(|r| r["rule"].as_str().unwrap()).collect();
    assert_eq!(
        rules,
        [
            "storage guest7 @tag:storage allow",
            "* @toolstack * allow",
            "storage device-model storage allow",
            "network device-model network allow"
        ],
        "{v}"
    );
    // guest1 is not allowed: its command is refused with a decision the toolstack looks up.
    let agent = state.join("domains/guest1/agent.sock");
    let o = dombus(state, &["--agent", agent.to_str().unwrap(), "--timeout", "10", "storage", "list"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let err = stderr(&o);
    let id =
        err.split("(decision ").nth(1).and_then(|r| r.split(')').next()).unwrap_or_else(|| panic!("{err}"));
    let v = json(&dombus(state, &["--json", "policy", "decision", id]));
    assert_eq!(
        (v["result"].as_str(), v["source"]["name"].as_str(), v["rule"].as_str()),
        (Some("deny"), Some("guest1"), None),
        "{v}"
    );
    let v = json(&dombus(
        state,
        &["--json", "policy", "explain", "guest1", "--target", "storage", "--service", "storage"],
    ));
    assert_eq!((v["result"].as_str(), &v["rule"]), (Some("deny"), &serde_json::Value::Null), "{v}");
    let v = json(&dombus(
        state,
        &["--json", "policy", "explain", "guest7", "--target", "storage", "--service", "5100"],
    ));
    assert_eq!(
        (v["result"].as_str(), v["rule"]["at"].as_str()),
        (Some("allow"), Some("50-admin.policy:1")),
        "{v}"
    );
    let v = json(&dombus(state, &["--json", "policy", "audit", "--count", "1000"]));
    let id_n: u64 = id.parse().unwrap();
    assert!(v.as_array().unwrap().iter().any(|r| r["decision"].as_u64() == Some(id_n)), "{v}");
    // The FLASK fragment: the pairs of types the rules introduce (dom0 with every domain),
    // not a pair no rule allows (guest1 and storage), until a rule does.
    let xsm = stdout(&dombus(state, &["policy", "xsm"]));
    assert!(xsm.contains("allow dom0_t guest_t:grant"), "{xsm}");
    assert!(xsm.contains("allow dom0_t service_domain_t:grant"), "{xsm}");
    assert!(!xsm.contains("allow guest_t service_domain_t:grant"), "{xsm}");
    assert!(dombus(state, &["policy", "add", "5100 guest1 @tag:storage allow"]).status.success());
    let xsm = stdout(&dombus(state, &["policy", "xsm"]));
    assert!(xsm.contains("allow guest_t service_domain_t:grant"), "{xsm}");
    // A directory with an error: lint says where, exit 1.
    let dir = state.join("lint");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("10-a.policy"), "* @toolstack * allow\n5100 guest1 storage perhaps\n").unwrap();
    let o = dombus(state, &["policy", "lint", dir.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stdout(&o).contains("10-a.policy:2:"), "{o:?}");
}

/// `dombus --json storage events --count 2` against a host prints, one JSON object a line, the
/// subscription's start (the list as it is), then the events of a create and a delete made
/// meanwhile, and ends.
#[test]
fn storage_events_prints_the_events_of_changes_made_meanwhile() {
    use std::io::BufRead as _;
    let state = std::env::temp_dir().join(format!("dombus-host-events-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let _down = Down(state.clone());
    let up = dombus(&state, &["host", "up"]);
    assert!(up.status.success(), "{up:?}");

    let mut watch = Command::new(DOMBUS)
        .arg("--state")
        .arg(&state)
        .args(["--json", "storage", "events", "--count", "2"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let out = watch.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = |what: &str| -> serde_json::Value {
        let l = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{what}: no line ({e})"));
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {l}"))
    };
    // Subscribed (the list as it is: empty) before the changes are made.
    let start = line("the start");
    assert_eq!(start["resync"]["snapshot"], serde_json::json!([]), "{start}");
    assert!(dombus(&state, &["storage", "create", "e0", "--size", "1M"]).status.success());
    assert!(dombus(&state, &["storage", "delete", "e0"]).status.success());
    let created = line("the create");
    assert_eq!(created["event"]["created"]["name"], "e0", "{created}");
    assert_eq!(created["event"]["created"]["format"], "qcow2", "{created}");
    let deleted = line("the delete");
    assert_eq!(
        deleted["event"]["deleted"],
        serde_json::json!({"name": "e0", "owner": "toolstack"}),
        "{deleted}"
    );
    assert_ne!(created["cursor"], deleted["cursor"]);
    // Two events: done.
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = watch.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > Duration::from_secs(60) {
            let _ = watch.kill();
            panic!("`storage events --count 2` did not end after two events");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
    assert!(rx.recv_timeout(Duration::from_secs(5)).is_err(), "a line past --count");
}

#[test]
fn the_demo_runs_to_completion() {
    let o = Command::new(DOMBUS).arg("demo").output().unwrap();
    assert!(o.status.success(), "{}\n{}", stdout(&o), String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    for expected in [
        "1. Host up",
        "create(\"demo\", 1G, qcow2)",
        "events() subscription",
        "created qcow2 \"demo\"",
        "snapshot \"fresh\" of \"demo\" taken",
        "deleted \"vm1\"",
        "refused, as it must be",
        "ping, storage domain",
        "more processes of the toolstack's domain at once, through its agent",
        "300 round trips",
        "dom0's agent holds one link per domain",
        "5. The connection manager",
        "refused: dombus: xen:2:5100: connecting to xen:2:5100: refused by the host's connection manager (decision",
        "the toolstack adds a rule",
        "ok: (none)",
        "rule (none: default deny)",
        "rule 50-admin.policy:1",
        "none left running",
        "demo complete",
    ] {
        assert!(text.contains(expected), "{expected:?} missing from:\n{text}");
    }
}

/// `dombus policy watch` as an operator's live audit view: it starts with the host's domains,
/// then prints a denial made meanwhile (with the id the denied caller's error carries), and
/// ends after `--count` events.
#[test]
fn policy_watch_prints_a_denial_as_it_happens() {
    use std::io::BufRead;
    use std::process::Stdio;
    use std::sync::mpsc;

    let state = std::env::temp_dir().join(format!("dombus-watch-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let _down = Down(state.clone());
    let up = dombus(&state, &["host", "up"]);
    assert!(up.status.success(), "{up:?}");

    /// Ends the watch if the test fails before it does.
    struct Watch(std::process::Child);
    impl Drop for Watch {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut watch = Watch(
        Command::new(DOMBUS)
            .arg("--state")
            .arg(&state)
            .args(["--json", "policy", "watch", "--denials", "--count", "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, lines) = mpsc::channel();
    let out = watch.0.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    let line = |what: &str| -> serde_json::Value {
        let l = lines.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|e| panic!("{what}: {e}"));
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{what} is not JSON ({e}): {l}"))
    };

    // The watch starts with the state: the host's domains.
    let start = line("the start");
    assert_eq!(start["resync"]["reason"], "Start", "{start}");
    let names: Vec<&str> = start["resync"]["snapshot"]["domains"]
        .as_array()
        .unwrap_or_else(|| panic!("{start}"))
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert!(names.contains(&"storage") && names.contains(&"guest1"), "{start}");

    // guest1 is denied meanwhile: the watch prints it, with the id guest1 was given.
    let agent = state.join("domains/guest1/agent.sock");
    let o = dombus(&state, &["--agent", agent.to_str().unwrap(), "--timeout", "10", "storage", "list"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let err = stderr(&o);
    let id: u64 = err
        .split("(decision ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    let denial = line("the denial");
    let record = &denial["event"]["Denied"];
    assert_eq!(
        (record["decision"].as_u64(), record["source"]["name"].as_str(), record["result"].as_str()),
        (Some(id), Some("guest1"), Some("deny")),
        "{denial}"
    );
    assert!(denial["cursor"].as_str().is_some_and(|c| c.contains(':')), "{denial}");

    // One event asked for: the watch ends, status 0.
    let t = std::time::Instant::now();
    let status = loop {
        if let Some(s) = watch.0.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "the watch did not end after its one event");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

/// `dombus qemu …` against the host's device-model domain: a device model for the guest with a
/// disk of the storage domain (and a NIC on a tap of the network domain's, if it runs), shown
/// as a table and JSON, a hot-plugged USB tablet, a service error (exit 1), a usage error
/// (exit 2), stop.
fn qemu_commands(state: &Path, network: bool) {
    assert!(dombus(state, &["storage", "create", "vm3", "--size", "16M"]).status.success());
    let mut config = serde_json::json!({
        "guest": 3, "memory_mib": 64, "vcpus": 1,
        "disks": [{"id": "xvda", "image": "vm3"}],
    });
    if network {
        assert!(dombus(state, &["network", "vif-create", "3.5", "--kind", "tap"]).status.success());
        config["nics"] = serde_json::json!([{"id": "nic0", "vif": "3.5"}]);
    }
    let o = dombus(state, &["--json", "qemu", "start", &config.to_string()]);
    let v = json(&o);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["devices"][0]["id"], "xvda", "{v}");
    let pid = v["pid"].as_u64().unwrap();
    assert!(alive(pid));
    // The qemu runs in the device-model domain's working directory for the guest.
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
    assert!(cwd.ends_with("qemu/dom3"), "{cwd:?}");
    let o = dombus(state, &["qemu", "usb-add", "3", "--id", "tablet", "--kind", "tablet"]);
    assert!(o.status.success(), "{o:?}");
    let o = dombus(state, &["qemu", "list"]);
    assert!(stdout(&o).contains("running"), "{o:?}");
    let o = dombus(state, &["qemu", "usb-add", "3", "--id", "tablet", "--kind", "mouse"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains(r#"has a device "tablet" already"#), "{o:?}");
    let o = dombus(state, &["qemu", "usb-add", "3", "--id", "x", "--kind", "joystick"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    let o = dombus(state, &["--json", "qemu", "stop", "3"]);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(json(&o), "quit", "{o:?}");
    assert!(!alive(pid));
    if network {
        assert!(dombus(state, &["network", "vif-delete", "3.5"]).status.success());
    }
    assert!(dombus(state, &["storage", "delete", "vm3"]).status.success());
}

/// `dombus network …` against the host's network domain: a bridge and a vif made, shown as a
/// table and JSON, the kernel's state in the domain's namespace behind them, a service error
/// (exit 1), a usage error (exit 2), the events stream.
fn network_commands(state: &Path) {
    let o = dombus(state, &["network", "bridge-create", "xenbr0", "--mtu", "1400"]);
    assert!(o.status.success(), "{o:?}");
    let o =
        dombus(state, &["network", "vif-create", "3.0", "--bridge", "xenbr0", "--mac", "00:16:3e:00:00:03"]);
    assert!(o.status.success(), "{o:?}");
    let v = json(&dombus(state, &["--json", "network", "vif-info", "3.0"]));
    assert_eq!(
        (v["name"].as_str(), v["mtu"].as_u64(), v["bridge"].as_str()),
        (Some("vif3.0"), Some(1400), Some("xenbr0")),
        "{v}"
    );
    assert_eq!(v["mac"], "00:16:3e:00:00:03", "{v}");
    // The guest's end is in the namespace the host holds for domain 3.
    let ns = state.join("netns/dom3");
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["ip", "-j", "link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let link: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(link[0]["address"], "00:16:3e:00:00:03", "{link}");
    let o = dombus(state, &["network", "vif-list"]);
    assert!(stdout(&o).starts_with("VIF") && stdout(&o).contains("vif3.0"), "a table: {o:?}");
    let o = dombus(state, &["network", "bridge-delete", "xenbr0"]);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(stderr(&o).contains(r#"bridge "xenbr0" is busy"#), "{o:?}");
    let o = dombus(state, &["network", "vif-create", "3.x"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    // The events stream: a snapshot with the vif, then the change of its guest's MAC address
    // (one event: the guest's end is not in the network domain's namespace).
    let mut watch = Command::new(DOMBUS)
        .arg("--state")
        .arg(state)
        .args(["--json", "network", "events", "--count", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // A stream that never ends would hang the test: killed after 60 s.
    let pid = watch.id();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ended = done.clone();
    let guard = std::thread::spawn(move || {
        let t = std::time::Instant::now();
        while !ended.load(std::sync::atomic::Ordering::SeqCst) {
            if t.elapsed() > Duration::from_secs(60) {
                let _ = Command::new("kill").arg(pid.to_string()).status();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(watch.stdout.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    assert!(first.contains("resync") && first.contains("vif3.0"), "the snapshot shows the vif: {first}");
    assert!(dombus(state, &["network", "vif-set-mac", "3.0", "--mac", "00:16:3e:00:00:33"]).status.success());
    let rest: Vec<String> = lines.map(Result::unwrap).collect();
    let status = watch.wait().unwrap();
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    guard.join().unwrap();
    assert!(status.success(), "{status} {rest:?}");
    assert!(
        rest.len() == 1 && rest[0].contains("vif_changed") && rest[0].contains("00:16:3e:00:00:33"),
        "{rest:?}"
    );
    assert!(dombus(state, &["network", "vif-delete", "3.0"]).status.success());
    assert!(dombus(state, &["network", "bridge-delete", "xenbr0"]).status.success());
    assert!(!ns.exists(), "the guest's namespace goes with its last vif");
}
