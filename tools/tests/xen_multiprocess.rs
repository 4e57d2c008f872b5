//! The multi-process link and session scenarios of `link_multiprocess.rs`, unchanged, on real
//! Xen: run inside the VM harness (`tests/vm/run-xen`, dom0 processes), where
//! `/dev/xen/*` and xenstored exist. On any other machine these tests are ignored.
//!
//! ```text
//! DOMBUS_LINK_BIN=/payload/dombus-link ./xen_multiprocess --ignored --test-threads 1
//! ```
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::scenarios::{self, Xen};

fn xen() -> Xen {
    let domid = std::env::var("DOMBUS_TEST_DOMID").ok().and_then(|d| d.parse().ok()).unwrap_or(0);
    Xen { domid }
}

#[test]
#[ignore = "needs real Xen: run by tests/vm/run-xen"]
fn xen_stream_with_matching_checksum() {
    scenarios::stream_with_matching_checksum(&mut xen(), "data/xstream");
}

#[test]
#[ignore = "needs real Xen: run by tests/vm/run-xen"]
fn xen_peer_killed_mid_stream_is_detected() {
    scenarios::peer_killed_mid_stream_is_detected(&mut xen(), "data/xkill");
}

#[test]
#[ignore = "needs real Xen: run by tests/vm/run-xen"]
fn xen_ring_scribbler_is_disconnected() {
    scenarios::ring_scribbler_is_disconnected(&mut xen(), "x");
}

#[test]
#[ignore = "needs real Xen: run by tests/vm/run-xen"]
fn xen_virtual_socket_sessions_on_one_link() {
    scenarios::sessions_on_one_link(&mut xen(), "data/xmux");
}
