//! The `dombus` tool beside other users of one simulated host (docs/services.md). A command that
//! reaches the host's domains acts as the toolstack, domain 0, attached to the simulated
//! hypervisor while it runs, and the simulator allows one attachment per domain id: while one
//! holds domain 0, every other such command is refused (exit 3, saying why). `host status` lists
//! the links the store records, here the one a guest made to the storage domain.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::{Down, dombus, guest_net, stderr, stdout};

use dombus::rpc::cli::NetArgs;
use dombus::rpc::{ClientConfig, RawClient, wire};
use dombus::sim::SimBackend;
use dombus::transport::types::DomId;

#[test]
fn one_toolstack_command_at_a_time_and_status_lists_a_guests_link() {
    let state = std::env::temp_dir().join(format!("dombus-concurrent-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&state);
    let _down = Down(state.clone());
    let up = dombus(&state, &["host", "up"]);
    assert!(up.status.success(), "{up:?}");
    let sim = state.join("simxen.sock");
    // Commands run back to back below, each attaching as domain 0 right after the last one let
    // go: the simulator hands the id over at once.

    // A guest, domain 7, calls the storage domain: the store records their link (served by the
    // lower domain, 2) and `host status` lists it, in JSON and in text.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let guest = rt.block_on(async {
        let args = NetArgs {
            sim: Some(sim.clone()),
            domid: DomId(7),
            xen: false,
            backend_domain: DomId(1),
            timeout: 10.0,
        };
        let net = guest_net(&sim, 7);
        let addr = "xen:2:5100".parse().unwrap();
        let client = RawClient::new(net, addr, wire::BUILTIN_SERVICE, ClientConfig::default());
        client.ping(args.context()).await.unwrap();
        client
    });
    let o = dombus(&state, &["--json", "host", "status"]);
    assert!(o.status.success(), "{o:?}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["links"], serde_json::json!([[2, 7]]), "{v}");
    let o = dombus(&state, &["host", "status"]);
    assert!(stdout(&o).contains("links: 2 ↔ 7"), "{o:?}");
    drop(guest);
    drop(rt);

    // With nobody else acting as domain 0, a command runs.
    let o = dombus(&state, &["storage", "list"]);
    assert!(o.status.success(), "{o:?}");

    // While something else holds domain 0 (here this test, as a running command would), every
    // command that needs the host's domains is refused before calling, and says why.
    let toolstack = SimBackend::boot(&sim, Some(DomId(0))).unwrap();
    for args in
        [&["storage", "list"][..], &["ping", "xen:2:5100", "--count", "1"], &["describe", "xen:2:5100"]]
    {
        let o = dombus(&state, args);
        assert_eq!(o.status.code(), Some(3), "{args:?}: {o:?}");
        let err = stderr(&o);
        assert!(
            err.contains("domain 0 is already attached")
                && err.contains("another dombus command is running as the toolstack"),
            "{args:?}: {err}"
        );
    }
    let o = dombus(&state, &["host", "status"]);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(stderr(&o).contains("domain 0 is already attached"), "{o:?}");
    drop(toolstack);

    let down = dombus(&state, &["host", "down"]);
    assert!(down.status.success(), "{down:?}");
}
