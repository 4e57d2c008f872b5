//! The simulator against misbehaving clients.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dombus_sim::proto::{self, ClientMsg, MAX_MSG, Op, ServerMsg};
use dombus_sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_transport_xen::backend::{Backend, MappedPages, SharedPages, Store, StoreWatch};
use dombus_transport_xen::shmem::SharedMem;
use dombus_transport_xen::types::DomId;
use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketAddrUnix, SocketFlags, SocketType};

fn sock_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "dombus-simr-{tag}-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn daemon(tag: &str) -> (SimHypervisorHandle, PathBuf) {
    let path = sock_path(tag);
    (SimHypervisor::spawn(&path).unwrap(), path)
}

fn raw(sock: &Path) -> OwnedFd {
    let fd = rustix::net::socket_with(AddressFamily::UNIX, SocketType::SEQPACKET, SocketFlags::CLOEXEC, None)
        .unwrap();
    rustix::net::connect(&fd, &SocketAddrUnix::new(sock).unwrap()).unwrap();
    fd
}

fn send(fd: &OwnedFd, bytes: &[u8]) -> rustix::io::Result<usize> {
    rustix::net::send(fd, bytes, SendFlags::NOSIGNAL)
}

fn msg(id: u64, op: Op) -> Vec<u8> {
    proto::encode(&ClientMsg { id, op }).unwrap()
}

/// The next message from the daemon, `None` on EOF; panics after `timeout`.
fn recv(fd: &OwnedFd, timeout: Duration) -> Option<ServerMsg> {
    let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
    let ts = rustix::event::Timespec { tv_sec: timeout.as_secs() as i64, tv_nsec: 0 };
    assert!(
        rustix::event::poll(&mut fds, Some(&ts)).unwrap() > 0,
        "daemon neither answered nor disconnected"
    );
    let mut buf = vec![0u8; MAX_MSG];
    match rustix::net::recv(fd, &mut buf[..], RecvFlags::empty()) {
        Ok((0, _)) | Err(_) => None,
        Ok((n, _)) => Some(proto::decode(&buf[..n]).expect("daemon sent garbage")),
    }
}

/// Reads until EOF (bounded): the daemon must end by saying why (one `Fatal`, its reason
/// returned) and disconnecting.
fn expect_disconnect(fd: &OwnedFd) -> String {
    let mut got = Vec::new();
    while let Some(m) = recv(fd, Duration::from_secs(30)) {
        got.push(m);
        assert!(got.len() < 10, "daemon keeps talking to a broken client: {got:?}");
    }
    match got.as_slice() {
        [ServerMsg::Fatal { reason }] => reason.clone(),
        other => panic!("expected one Fatal before the disconnect, got {other:?}"),
    }
}

fn hello(fd: &OwnedFd, sock: &Path, domid: u16) {
    let (_, token) = SimBackend::create_domain(sock, Some(DomId(domid)), "raw").unwrap();
    send(fd, &msg(1, Op::Hello { token })).unwrap();
    match recv(fd, Duration::from_secs(5)) {
        Some(ServerMsg::Reply { id: 1, result: Ok(proto::Reply::Attached { domid: d }) }) => {
            assert_eq!(d, DomId(domid))
        }
        other => panic!("bad hello reply {other:?}"),
    }
}

#[test]
fn garbage_truncated_and_oversize_messages() {
    let (_hv, sock) = daemon("garbage");
    let good = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    good.store().write("k", b"v").unwrap();

    // Garbage before Hello.
    let fd = raw(&sock);
    send(&fd, &[0xff; 37]).unwrap();
    let reason = expect_disconnect(&fd);
    assert!(reason.starts_with("undecodable message"), "{reason}");

    // A request before Hello.
    let fd = raw(&sock);
    send(&fd, &msg(5, Op::Read { path: "x".into() })).unwrap();
    assert_eq!(expect_disconnect(&fd), "request before Hello");

    // Truncated message after a good Hello.
    let fd = raw(&sock);
    hello(&fd, &sock, 2);
    let full = msg(2, Op::Write { path: "some/path".into(), value: vec![1; 100] });
    send(&fd, &full[..full.len() / 2]).unwrap();
    let reason = expect_disconnect(&fd);
    assert!(reason.starts_with("undecodable message"), "{reason}");

    // Oversize message (a SOCK_SEQPACKET record may be larger than the daemon reads).
    let fd = raw(&sock);
    hello(&fd, &sock, 3);
    let big = vec![0u8; MAX_MSG + 1000];
    assert_eq!(send(&fd, &big).unwrap(), big.len());
    let reason = expect_disconnect(&fd);
    assert!(reason.contains("larger than"), "{reason}");

    // Bad requests get error replies and the connection stays usable.
    let fd = raw(&sock);
    hello(&fd, &sock, 4);
    for (id, op) in [
        (10, Op::Read { path: "a//b".into() }),
        (11, Op::MapGrants { granter: DomId(1), refs: vec![12345], writable: true }),
        (12, Op::Unmap { map: 77 }),
        (13, Op::Unbind { port: 0 }),
        (14, Op::Revoke { alloc: 999 }),
        (15, Op::Hello { token: "toolstack-00".into() }),
        (16, Op::SharePages { remote: DomId(1), count: 1_000_000, writable: true }),
        (17, Op::BindUnbound { handle: 1, remote: DomId(0x7FF5) }),
        (18, Op::Write { path: "x".into(), value: vec![0; 5000] }),
        (19, Op::SetPerms { path: "domid".into(), perms: vec![] }),
    ] {
        send(&fd, &msg(id, op)).unwrap();
        match recv(&fd, Duration::from_secs(5)) {
            Some(ServerMsg::Reply { id: got, result: Err(e) }) => {
                assert_eq!(got, id);
                assert!(!e.to_string().is_empty());
            }
            other => panic!("request {id}: expected an error reply, got {other:?}"),
        }
    }
    send(&fd, &msg(20, Op::Read { path: "domid".into() })).unwrap();
    assert!(matches!(
        recv(&fd, Duration::from_secs(5)),
        Some(ServerMsg::Reply { id: 20, result: Ok(proto::Reply::Value(v)) }) if v == b"4"
    ));
    drop(fd);

    // The well-behaved domain never noticed.
    assert_eq!(good.store().read("k").unwrap(), b"v");
    let shared = good.share_pages(DomId(1), 1, true).unwrap();
    let mapped = good.map_grants(DomId(1), shared.refs(), true).unwrap();
    shared.region().store_u8(0, 3);
    assert_eq!(mapped.region().load_u8(0), 3);
}

#[test]
fn a_domain_that_does_not_read_is_disconnected() {
    let (_hv, sock) = daemon("slow");
    let good = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let w = good.store().watch("@releaseDomain").unwrap();
    let fd = raw(&sock);
    hello(&fd, &sock, 2);
    // Flood requests without ever reading the replies.
    let req = msg(3, Op::Read { path: "domid".into() });
    let start = Instant::now();
    let mut sent = 0u64;
    while start.elapsed() < Duration::from_secs(30) {
        match send(&fd, &req) {
            Ok(_) => sent += 1,
            Err(_) => break,
        }
        // Meanwhile everybody else keeps working.
        if sent % 5000 == 0 {
            assert_eq!(good.store().read("domid").unwrap(), b"1");
        }
    }
    assert!(start.elapsed() < Duration::from_secs(30), "flooding client never disconnected ({sent} sent)");
    // Its death is visible like any other.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut released = 0;
    while released < 2 && Instant::now() < deadline {
        match w.try_next().unwrap() {
            Some(p) => {
                assert_eq!(p, "@releaseDomain");
                released += 1;
            }
            None => {
                let mut fds = [rustix::event::PollFd::new(&w, rustix::event::PollFlags::IN)];
                let ts = rustix::event::Timespec { tv_sec: 1, tv_nsec: 0 };
                let _ = rustix::event::poll(&mut fds, Some(&ts));
            }
        }
    }
    assert_eq!(released, 2, "initial event + the release of the flooding domain");
    assert_eq!(good.store().read("domid").unwrap(), b"1");
    let again = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    assert_eq!(again.domid(), DomId(2));
}

#[test]
fn watch_fd_is_pollable() {
    let (_hv, sock) = daemon("watchfd");
    let a = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let w = a.store().watch("data").unwrap();
    let mut fds = [rustix::event::PollFd::new(&w, rustix::event::PollFlags::IN)];
    let ts = rustix::event::Timespec { tv_sec: 5, tv_nsec: 0 };
    assert_eq!(rustix::event::poll(&mut fds, Some(&ts)).unwrap(), 1);
    assert_eq!(w.try_next().unwrap().as_deref(), Some("data"));
    assert_eq!(w.try_next().unwrap(), None);
    let mut fds = [rustix::event::PollFd::new(&w, rustix::event::PollFlags::IN)];
    let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
    assert_eq!(rustix::event::poll(&mut fds, Some(&zero)).unwrap(), 0, "drained watch still readable");
}

/// A domain that asks for large replies and never reads them is disconnected once the bytes
/// queued for it pass the daemon's bound, long before the message count would: the daemon never
/// holds more than `QUEUE_BYTES` (4 MiB) for it, not `QUEUE_LEN` × 64 KiB.
#[test]
fn a_domain_that_does_not_read_large_replies_is_cut_off_by_bytes() {
    use dombus_sim::{QUEUE_BYTES, QUEUE_LEN};
    let (_hv, sock) = daemon("bytes");
    let good = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let fd = raw(&sock);
    hello(&fd, &sock, 2);
    send(&fd, &msg(2, Op::Write { path: "big".into(), value: vec![7; 4096] })).unwrap();
    assert!(matches!(recv(&fd, Duration::from_secs(30)), Some(ServerMsg::Reply { id: 2, result: Ok(_) })));
    // Three times the byte bound in replies, well under the message bound.
    let asks = 3 * QUEUE_BYTES / 4096;
    assert!(asks < QUEUE_LEN);
    for id in 0..asks as u64 {
        if send(&fd, &msg(10 + id, Op::Read { path: "big".into() })).is_err() {
            break; // already disconnected
        }
    }
    let mut replies = 0;
    loop {
        match recv(&fd, Duration::from_secs(30)) {
            Some(ServerMsg::Reply { .. }) => replies += 1,
            Some(ServerMsg::Fatal { .. }) | Some(ServerMsg::Event(_)) | Some(ServerMsg::Migrated { .. }) => {}
            None => break,
        }
        assert!(replies < asks, "all {asks} large replies were queued: never disconnected");
    }
    assert!(replies < asks);
    // Everyone else goes on.
    good.store().write("k", b"v").unwrap();
    assert_eq!(good.store().read("k").unwrap(), b"v");
}

#[test]
fn a_migrated_connection_gets_one_notice_then_the_end() {
    let (_hv, sock) = daemon("migrated");
    let fd = raw(&sock);
    hello(&fd, &sock, 4);
    let to = SimBackend::migrate(&sock, DomId(4)).unwrap();
    // Frozen: nothing more is taken from the old attachment.
    assert!(send(&fd, &msg(2, Op::Write { path: "after".into(), value: vec![1] })).is_err());
    let mut got = Vec::new();
    while let Some(m) = recv(&fd, Duration::from_secs(30)) {
        got.push(m);
        assert!(got.len() < 10, "the daemon keeps talking to a migrated attachment: {got:?}");
    }
    let token = match got.as_slice() {
        [ServerMsg::Migrated { to: t, token }] if *t == to => token.clone(),
        other => panic!("expected one Migrated notice, then the end; got {other:?}"),
    };
    assert!(token.len() <= proto::MAX_TOKEN);
    let dom0 = SimBackend::toolstack(&sock).unwrap();
    assert!(dom0.store().read(&format!("/local/domain/{}/after", to.0)).is_err());
    // The token attaches as the new id, once.
    assert_eq!(SimBackend::attach(&sock, &token).unwrap().domid(), to);
    assert!(SimBackend::attach(&sock, &token).is_err(), "a migration token is spent once used");
}
