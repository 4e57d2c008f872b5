//! Links between domain processes through the `dombus-simxen` daemon.
#![allow(clippy::unwrap_used, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::{Proc, Scratch, field, link_cmd, simxen};
use dombus_transport_xen::backend::{Backend, BackendError, SharedPages};
use dombus_transport_xen::sim::SimBackend;
use dombus_transport_xen::types::DomId;

#[test]
fn one_gib_streams_with_matching_checksum() {
    let dir = Scratch::new("stream");
    let (_daemon, sock) = simxen(&dir);
    let mut server = Proc::spawn(link_cmd(
        &sock,
        1,
        &["serve", "--path", "data/stream", "--peer", "2", "--ring", "1M", "recv"],
    ));
    server.expect_line("listening", Duration::from_secs(10));
    let mut client = Proc::spawn(link_cmd(
        &sock,
        2,
        &["connect", "--path", "data/stream", "--peer", "1", "--ring", "1M", "send", "--bytes", "1G"],
    ));
    let sent = client.expect_line("sent", Duration::from_secs(120));
    let got = server.expect_line("received", Duration::from_secs(30));
    assert_eq!(field(&sent, "bytes"), (1u64 << 30).to_string());
    assert_eq!(field(&got, "bytes"), field(&sent, "bytes"));
    assert_eq!(field(&got, "crc"), field(&sent, "crc"), "checksums differ");
    assert!(client.wait_timeout(Duration::from_secs(10)).unwrap().success(), "{}", client.stderr());
    assert!(server.wait_timeout(Duration::from_secs(10)).unwrap().success(), "{}", server.stderr());
    eprintln!("1 GiB: {sent}");
}

#[test]
fn peer_killed_mid_stream_is_detected_within_a_second() {
    let dir = Scratch::new("kill");
    let (_daemon, sock) = simxen(&dir);
    let mut server = Proc::spawn(link_cmd(&sock, 1, &["serve", "--path", "data/k", "--peer", "2", "recv"]));
    server.expect_line("listening", Duration::from_secs(10));
    let mut client = Proc::spawn(link_cmd(
        &sock,
        2,
        &["connect", "--path", "data/k", "--peer", "1", "send", "--bytes", "1000G"],
    ));
    client.expect_line("connected", Duration::from_secs(10));
    server.expect_line("connected", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(200)); // let data flow
    let killed = Instant::now();
    client.kill();
    let status = server.wait_timeout(Duration::from_secs(5)).expect("server never noticed the dead peer");
    let noticed = killed.elapsed();
    assert!(!status.success(), "a killed writer must not look like a clean end of stream");
    assert!(server.stderr().contains("closed the link or died"), "{}", server.stderr());
    assert!(noticed < Duration::from_secs(1), "peer death noticed after {noticed:?}");
    eprintln!("peer death noticed after {noticed:?}");
}

#[test]
fn mapping_a_grant_meant_for_another_domain_is_refused() {
    let dir = Scratch::new("wrongdom");
    let (_daemon, sock) = simxen(&dir);
    let granter = SimBackend::attach(&sock, Some(DomId(1))).unwrap();
    let intended = SimBackend::attach(&sock, Some(DomId(2))).unwrap();
    let intruder = SimBackend::attach(&sock, Some(DomId(3))).unwrap();
    let pages = granter.share_pages(DomId(2), 2, true).unwrap();
    match intruder.map_grants(DomId(1), pages.refs(), false) {
        Err(BackendError::PermissionDenied(_)) => {}
        other => panic!("intruder mapped a grant meant for dom2: {:?}", other.map(|_| ())),
    }
    assert!(intended.map_grants(DomId(1), pages.refs(), true).is_ok());
}

#[test]
fn ring_scribbler_is_disconnected_while_other_links_live_on() {
    let dir = Scratch::new("scribble");
    let (mut daemon, sock) = simxen(&dir);
    // A well-behaved pair, busy during the attack.
    let mut echo = Proc::spawn(link_cmd(&sock, 4, &["serve", "--path", "data/good", "--peer", "5", "echo"]));
    echo.expect_line("listening", Duration::from_secs(10));
    let mut pinger = Proc::spawn(link_cmd(
        &sock,
        5,
        &["connect", "--path", "data/good", "--peer", "4", "ping", "--count", "3000", "--warmup", "10"],
    ));
    pinger.expect_line("connected", Duration::from_secs(10));

    let mut victim =
        Proc::spawn(link_cmd(&sock, 1, &["serve", "--path", "data/evil", "--peer", "3", "recv"]));
    victim.expect_line("listening", Duration::from_secs(10));
    let mut attacker = Proc::spawn(link_cmd(&sock, 3, &["scribble", "--path", "data/evil", "--peer", "1"]));
    attacker.expect_line("scribbled", Duration::from_secs(10));
    let status = victim.wait_timeout(Duration::from_secs(5)).expect("victim did not react to the scribble");
    assert!(!status.success());
    assert!(victim.stderr().contains("broke the link protocol"), "{}", victim.stderr());
    attacker.expect_line("server closed the link", Duration::from_secs(5));

    // The daemon and the other link are unaffected.
    let ping = pinger.expect_line("ping", Duration::from_secs(60));
    assert_eq!(field(&ping, "count"), "3000");
    assert!(daemon.child.try_wait().unwrap().is_none(), "dombus-simxen died");
    let a = SimBackend::attach(&sock, Some(DomId(7)));
    assert!(a.is_ok(), "daemon no longer accepts domains");
}
