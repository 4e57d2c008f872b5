//! Links between domain processes through the `dombus-simxen` daemon (the scenarios in
//! `common/scenarios.rs` run unchanged on real Xen in `xen_multiprocess.rs`).
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use common::scenarios::{self, Sim};
use common::{Scratch, simxen};
use dombus_sim::SimBackend;
use dombus_transport_xen::backend::{Backend, BackendError, SharedPages};
use dombus_transport_xen::types::DomId;

#[test]
fn one_gib_streams_with_matching_checksum() {
    scenarios::stream_with_matching_checksum(&mut Sim::start("stream"), "data/stream");
}

#[test]
fn peer_killed_mid_stream_is_detected() {
    scenarios::peer_killed_mid_stream_is_detected(&mut Sim::start("kill"), "data/k");
}

#[test]
fn virtual_socket_sessions_on_one_link() {
    scenarios::sessions_on_one_link(&mut Sim::start("mux"), "data/mux");
}

#[test]
fn mapping_a_grant_meant_for_another_domain_is_refused() {
    let dir = Scratch::new("wrongdom");
    let (_daemon, sock) = simxen(&dir);
    let granter = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let intended = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    let intruder = SimBackend::boot(&sock, Some(DomId(3))).unwrap();
    let pages = granter.share_pages(DomId(2), 2, true).unwrap();
    match intruder.map_grants(DomId(1), pages.refs(), false) {
        Err(BackendError::PermissionDenied(_)) => {}
        other => panic!("intruder mapped a grant meant for dom2: {:?}", other.map(|_| ())),
    }
    assert!(intended.map_grants(DomId(1), pages.refs(), true).is_ok());
}

#[test]
fn ring_scribbler_is_disconnected_while_other_links_live_on() {
    let mut sim = Sim::start("scribble");
    scenarios::ring_scribbler_is_disconnected(&mut sim, "s");
    let a = SimBackend::boot(sim.sock(), Some(DomId(7)));
    assert!(a.is_ok(), "daemon no longer accepts domains");
}
