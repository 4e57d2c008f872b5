//! The `dombus` tool beside other users of one simulated host (docs/services.md). Every command
//! reaches the host's domains through the toolstack domain's agent, so any number run at once:
//! several commands call the storage domain together while another one keeps pinging it, and
//! `host status` lists every domain's links as their agents hold them — here also the one a
//! guest made to the storage domain.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{DOMBUS, Down, dombus, guest_net, stderr, stdout};

use dombus::rpc::cli::NetArgs;
use dombus::rpc::{ClientConfig, RawClient, wire};

#[test]
fn commands_run_at_once_and_status_lists_every_link() {
    let state = std::env::temp_dir().join(format!("dombus-concurrent-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let _down = Down(state.clone());
    let up = dombus(&state, &["host", "up"]);
    assert!(up.status.success(), "{up:?}");
    let sim = state.join("simxen.sock");

    // One command watches (pings for a while) while eight others call, all at the same time.
    let spawn = |args: &[&str]| {
        Command::new(DOMBUS)
            .arg("--state")
            .arg(&state)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let watcher = spawn(&["ping", "xen:2:5100", "--count", "400"]);
    let callers: Vec<_> = (0..8)
        .map(|i| match i % 3 {
            0 => spawn(&["storage", "list"]),
            1 => spawn(&["describe", "xen:2:5100"]),
            _ => spawn(&["ping", "xen:storage:5100", "--count", "20"]),
        })
        .collect();
    for c in callers {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "{o:?}");
    }
    let o = watcher.wait_with_output().unwrap();
    assert!(o.status.success(), "{o:?}");
    assert!(stdout(&o).contains("400 round trips"), "{o:?}");

    // A guest, domain 7, calls the storage domain (once the toolstack allows it): `host status`
    // lists their link (from the storage domain's agent), in JSON and in text, beside the
    // toolstack's own.
    let o = dombus(&state, &["policy", "add", "5100 guest7 @tag:storage allow"]);
    assert!(o.status.success(), "{o:?}");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let guest = rt.block_on(async {
        let args = NetArgs::through_agent(None, Duration::from_secs(10));
        let net = guest_net(&sim, 7);
        let addr = "xen:2:5100".parse().unwrap();
        let client = RawClient::new(net, addr, wire::BUILTIN_SERVICE, ClientConfig::default());
        client.ping(args.context()).await.unwrap();
        client
    });
    let o = dombus(&state, &["--json", "host", "status"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let links = v["links"].as_array().unwrap();
    assert!(links.contains(&serde_json::json!([2, 7])), "{v}");
    assert!(links.contains(&serde_json::json!([0, 2])), "the toolstack's link to storage: {v}");
    let o = dombus(&state, &["host", "status"]);
    assert!(stdout(&o).contains("2 ↔ 7"), "{o:?}");
    drop(guest);
    drop(rt);

    // Without the toolstack's agent, a command says where it looked.
    let o = dombus(&state, &["--agent", "/nonexistent/agent.sock", "storage", "list"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(stderr(&o).contains("no domain agent runs there"), "{o:?}");

    let down = dombus(&state, &["host", "down"]);
    assert!(down.status.success(), "{down:?}");
}
