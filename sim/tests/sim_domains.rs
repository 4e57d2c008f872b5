//! The simulated hypervisor between domains: grants, event channels, store, death.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dombus_sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_transport_xen::backend::{
    Backend, BackendError, EventChannel, MappedPages, Perm, PermKind, SharedPages, Store, StoreWatch,
};
use dombus_transport_xen::shmem::SharedMem;
use dombus_transport_xen::types::{DomId, EvtchnPort, GrantRef, PAGE_SIZE};

fn sock_path(tag: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    std::env::temp_dir().join(format!(
        "dombus-sim-{tag}-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

fn daemon(tag: &str) -> (SimHypervisorHandle, PathBuf) {
    let path = sock_path(tag);
    (SimHypervisor::spawn(&path).unwrap(), path)
}

fn readable(fd: BorrowedFd<'_>, timeout: Duration) -> bool {
    let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    let ts = rustix::event::Timespec {
        tv_sec: timeout.as_secs() as i64,
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    matches!(rustix::event::poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
}

/// Waits (bounded) for the next pending port.
fn next_event<E: EventChannel>(ev: &E, timeout: Duration) -> Option<EvtchnPort> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = ev.pending().unwrap() {
            return Some(p);
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        readable(ev.as_fd(), left);
    }
}

/// Waits (bounded) for the next watch event.
fn next_path<W: StoreWatch>(w: &W, timeout: Duration) -> Option<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(p) = w.try_next().unwrap() {
            return Some(p);
        }
        let left = deadline.checked_duration_since(Instant::now())?;
        readable(w.as_fd(), left);
    }
}

/// The watch events before `fence` (a watch's events arrive in the order of the changes, so
/// nothing a change made before the fence's can fire comes after it).
fn paths_until<W: StoreWatch>(w: &W, fence: &str) -> Vec<String> {
    let mut v = Vec::new();
    loop {
        match next_path(w, T) {
            Some(p) if p == fence => return v,
            Some(p) => v.push(p),
            None => panic!("no event for {fence} within {T:?} (a liveness limit); before it: {v:?}"),
        }
    }
}

/// How long a test waits for an event that must come: a liveness limit, not a performance claim.
const T: Duration = Duration::from_secs(30);

#[test]
fn grants_are_mappable_only_as_granted() {
    let (_hv, sock) = daemon("grants");
    let a = SimBackend::boot_named(&sock, Some(DomId(1)), "a").unwrap();
    let b = SimBackend::boot_named(&sock, Some(DomId(2)), "b").unwrap();
    let c = SimBackend::boot_named(&sock, Some(DomId(3)), "c").unwrap();
    assert_eq!(a.domid(), DomId(1));

    let shared = a.share_pages(DomId(2), 2, true).unwrap();
    assert_eq!(shared.refs().len(), 2);
    assert!(shared.refs().iter().all(|r| r.0 >= 8));
    assert_eq!(shared.region().len(), 2 * PAGE_SIZE);
    assert_eq!(shared.region().load_u32(PAGE_SIZE), 0, "pages start zeroed");
    shared.region().write_bytes(PAGE_SIZE + 8, b"from A");

    let mapped = b.map_grants(DomId(1), shared.refs(), true).unwrap();
    assert_eq!(mapped.region().len(), 2 * PAGE_SIZE);
    let mut buf = [0u8; 6];
    mapped.region().read_bytes(PAGE_SIZE + 8, &mut buf);
    assert_eq!(&buf, b"from A");
    mapped.region().store_u32(0, 0xfeed_f00d);
    assert_eq!(shared.region().load_u32(0), 0xfeed_f00d);

    // Mapping in another order is contiguous in ref order.
    let swapped = [shared.refs()[1], shared.refs()[0]];
    let m2 = b.map_grants(DomId(1), &swapped, false).unwrap();
    m2.region().read_bytes(8, &mut buf);
    assert_eq!(&buf, b"from A");
    assert_eq!(m2.region().load_u32(PAGE_SIZE), 0xfeed_f00d);

    // Domain C is not the grantee.
    assert!(matches!(c.map_grants(DomId(1), shared.refs(), false), Err(BackendError::PermissionDenied(_))));
    // Unknown refs and granters.
    assert!(matches!(b.map_grants(DomId(1), &[GrantRef(0)], false), Err(BackendError::NotFound(_))));
    assert!(matches!(b.map_grants(DomId(1), &[GrantRef(99_999)], false), Err(BackendError::NotFound(_))));
    assert!(matches!(b.map_grants(DomId(9), shared.refs(), false), Err(BackendError::NotFound(_))));
    assert!(matches!(b.map_grants(DomId(1), &[], false), Err(BackendError::InvalidArgument(_))));

    // Read-only grants cannot be mapped writable; read-only mapping works and sees writes.
    let ro = a.share_pages(DomId(2), 1, false).unwrap();
    assert!(matches!(b.map_grants(DomId(1), ro.refs(), true), Err(BackendError::PermissionDenied(_))));
    let rom = b.map_grants(DomId(1), ro.refs(), false).unwrap();
    ro.region().store_u8(100, 42);
    assert_eq!(rom.region().load_u8(100), 42);
    assert!(matches!(a.share_pages(DomId(2), 0, true), Err(BackendError::InvalidArgument(_))));
    assert!(matches!(a.share_pages(DomId(0x7FF5), 1, true), Err(BackendError::InvalidArgument(_))));

    // Revocation: new maps fail, existing mappings stay valid.
    let refs = shared.refs().to_vec();
    drop(shared);
    assert!(matches!(b.map_grants(DomId(1), &refs, true), Err(BackendError::NotFound(_))));
    mapped.region().read_bytes(PAGE_SIZE + 8, &mut buf);
    assert_eq!(&buf, b"from A");
    mapped.region().store_u8(1, 1);
}

#[test]
fn unmap_notify_on_drop_clears_byte_and_signals() {
    let (_hv, sock) = daemon("unmapnotify");
    let a = SimBackend::boot(&sock, None).unwrap();
    let b = SimBackend::boot(&sock, None).unwrap();
    assert_ne!(a.domid(), b.domid());
    assert!(a.domid().0 >= 1);
    let ea = a.open_evtchn().unwrap();
    let eb = b.open_evtchn().unwrap();
    let pa = ea.bind_unbound(b.domid()).unwrap();
    let pb = eb.bind_interdomain(a.domid(), pa).unwrap();
    let shared = a.share_pages(b.domid(), 1, true).unwrap();
    let mut mapped = b.map_grants(a.domid(), shared.refs(), true).unwrap();
    shared.region().store_u8(5, 0xff);
    assert!(matches!(mapped.set_unmap_notify(PAGE_SIZE, Some(pb)), Err(BackendError::InvalidArgument(_))));
    mapped.set_unmap_notify(5, Some(pb)).unwrap();
    drop(mapped);
    assert_eq!(next_event(&ea, T), Some(pa));
    assert_eq!(shared.region().load_u8(5), 0);
}

#[test]
fn event_channels_bind_notify_and_close() {
    let (_hv, sock) = daemon("evtchn");
    let a = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let b = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    let c = SimBackend::boot(&sock, Some(DomId(3))).unwrap();
    let ea = a.open_evtchn().unwrap();
    let eb = b.open_evtchn().unwrap();
    let ec = c.open_evtchn().unwrap();

    let pa = ea.bind_unbound(DomId(2)).unwrap();
    assert!(pa.0 >= 1);
    // Notify on an unbound port is dropped silently.
    ea.notify(pa).unwrap();
    assert_eq!(ea.pending().unwrap(), None);
    // Only the named remote may bind.
    assert!(matches!(ec.bind_interdomain(DomId(1), pa), Err(BackendError::PermissionDenied(_))));
    assert!(matches!(eb.bind_interdomain(DomId(1), EvtchnPort(4000)), Err(BackendError::NotFound(_))));
    assert!(matches!(eb.bind_interdomain(DomId(7), pa), Err(BackendError::NotFound(_))));
    let pb = eb.bind_interdomain(DomId(1), pa).unwrap();
    assert!(pb.0 >= 1);
    assert!(eb.bind_interdomain(DomId(1), pa).is_err(), "already bound");

    // The bind leaves the new port pending (as on Xen): take that event first, so that the next
    // one can only be A's.
    assert_eq!(eb.pending().unwrap(), Some(pb));
    assert_eq!(eb.pending().unwrap(), None);
    // A notifies right after the bind: must not be lost.
    ea.notify(pa).unwrap();
    assert_eq!(next_event(&eb, T), Some(pb));
    assert_eq!(eb.pending().unwrap(), None);
    eb.unmask(pb).unwrap();
    eb.notify(pb).unwrap();
    assert_eq!(next_event(&ea, T), Some(pa));
    // Coalescing: many events, at least one report, and nothing left after.
    for _ in 0..10 {
        ea.notify(pa).unwrap();
    }
    assert_eq!(next_event(&eb, T), Some(pb));
    assert_eq!(eb.pending().unwrap(), None);
    // Ports belong to their handle.
    assert!(matches!(ec.notify(pa), Err(BackendError::NotFound(_))));
    let eb2 = b.open_evtchn().unwrap();
    assert!(matches!(eb2.notify(pb), Err(BackendError::NotFound(_))));

    // Unbind: the peer gets a final event, its port is unbound again, notify is dropped.
    eb.unbind(pb).unwrap();
    assert!(matches!(eb.notify(pb), Err(BackendError::NotFound(_))));
    assert_eq!(next_event(&ea, T), Some(pa));
    ea.notify(pa).unwrap();
    // The unbound port can be bound again by the same remote.
    let pb2 = eb.bind_interdomain(DomId(1), pa).unwrap();
    assert_eq!(eb.pending().unwrap(), Some(pb2), "a freshly bound port starts out pending");
    assert_eq!(eb.pending().unwrap(), None);
    ea.notify(pa).unwrap();
    assert_eq!(next_event(&eb, T), Some(pb2));

    // Dropping a handle closes its ports.
    drop(eb);
    assert_eq!(next_event(&ea, T), Some(pa));
    ea.notify(pa).unwrap();
}

#[test]
fn store_permissions_and_watches() {
    let (_hv, sock) = daemon("store");
    let a = SimBackend::boot_named(&sock, Some(DomId(1)), "alpha").unwrap();
    let b = SimBackend::boot_named(&sock, Some(DomId(2)), "beta").unwrap();
    let (sa, sb) = (a.store(), b.store());
    assert_eq!(sa.read("name").unwrap(), b"alpha");
    assert_eq!(sa.read("/local/domain/1/domid").unwrap(), b"1");
    assert!(sa.get_perms("").is_err());
    assert_eq!(
        sa.get_perms("/local/domain/1").unwrap(),
        vec![Perm { domid: DomId(1), kind: PermKind::None }]
    );
    assert!(matches!(sb.read("/local/domain/1/name"), Err(BackendError::PermissionDenied(_))));
    assert!(matches!(sb.write("/local/domain/1/x", b"v"), Err(BackendError::PermissionDenied(_))));
    assert!(sb.read("/local/domain/1/../x").is_err());
    assert!(matches!(sb.read("a//b"), Err(BackendError::InvalidArgument(_))));
    assert!(matches!(sb.read("bad path"), Err(BackendError::InvalidArgument(_))));
    assert!(matches!(sb.write("big", &vec![0u8; 5000]), Err(BackendError::InvalidArgument(_))));
    assert!(matches!(sb.read("missing"), Err(BackendError::NotFound(_))));

    // A node B may read, written at the end to mark how far B's events go.
    sa.write("data/fence", b"").unwrap();
    sa.set_perms(
        "data/fence",
        &[Perm { domid: DomId(1), kind: PermKind::None }, Perm { domid: DomId(2), kind: PermKind::Read }],
    )
    .unwrap();
    let wb = sb.watch("/local/domain/1/data").unwrap();
    assert_eq!(next_path(&wb, T).as_deref(), Some("/local/domain/1/data"));
    let wa = sa.watch("data").unwrap();
    assert_eq!(next_path(&wa, T).as_deref(), Some("data"));

    sa.write("data/x", b"hello").unwrap();
    sa.write("data/secret", b"s").unwrap();
    assert_eq!(next_path(&wa, T).as_deref(), Some("data/x"));
    assert_eq!(next_path(&wa, T).as_deref(), Some("data/secret"));
    sa.set_perms(
        "data/x",
        &[Perm { domid: DomId(1), kind: PermKind::None }, Perm { domid: DomId(2), kind: PermKind::Read }],
    )
    .unwrap();
    assert_eq!(sb.read("/local/domain/1/data/x").unwrap(), b"hello");
    assert!(matches!(sb.read("/local/domain/1/data/secret"), Err(BackendError::PermissionDenied(_))));
    assert!(matches!(sb.write("/local/domain/1/data/x", b"no"), Err(BackendError::PermissionDenied(_))));
    assert!(matches!(
        sb.set_perms("/local/domain/1/data/x", &[Perm { domid: DomId(2), kind: PermKind::Both }]),
        Err(BackendError::PermissionDenied(_))
    ));
    assert!(matches!(
        sa.set_perms("data/x", &[Perm { domid: DomId(2), kind: PermKind::Both }]),
        Err(BackendError::PermissionDenied(_))
    ));
    sa.write("data/x", b"again").unwrap();
    sa.write("data/secret", b"again").unwrap();
    sa.write("elsewhere", b"1").unwrap();
    sa.write("data/fence", b"1").unwrap();
    // B saw the write of x after it was allowed to read it — not the set_perms that allowed it
    // (xenstored checks the old permissions too) —, and never the secret.
    let seen = paths_until(&wb, "/local/domain/1/data/fence");
    assert_eq!(seen, vec!["/local/domain/1/data/x".to_string()]);
    // rm is judged by the permissions before removal.
    sa.rm("data/x").unwrap();
    assert_eq!(next_path(&wb, T).as_deref(), Some("/local/domain/1/data/x"));
    sa.rm("data/x").unwrap(); // already gone: fine, as on xenstored
    assert!(matches!(sa.rm("data/gone/x"), Err(BackendError::NotFound(_))));
    assert_eq!(sa.directory("data").unwrap(), vec!["fence".to_string(), "secret".to_string()]);
    sa.mkdir("data/dir/sub").unwrap();
    assert_eq!(sa.read("data/dir/sub").unwrap(), b"");

    // Special watches.
    let intro = sb.watch("@introduceDomain").unwrap();
    let release = sb.watch("@releaseDomain").unwrap();
    assert_eq!(next_path(&intro, T).as_deref(), Some("@introduceDomain"));
    assert_eq!(next_path(&release, T).as_deref(), Some("@releaseDomain"));
    let d = SimBackend::boot(&sock, Some(DomId(4))).unwrap();
    assert_eq!(next_path(&intro, T).as_deref(), Some("@introduceDomain"));
    assert!(sa.read("/local/domain/4/domid").is_err());
    d.store().write("x", b"1").unwrap();
    drop(d);
    assert_eq!(next_path(&release, T).as_deref(), Some("@releaseDomain"));
    assert!(matches!(sb.read("@releaseDomain"), Err(BackendError::InvalidArgument(_))));
    // A dropped watch is gone (that the simulator's store no longer fires an unwatched watch is
    // checked by its unit tests), and the store goes on.
    assert!(a.watches().iter().any(|(p, _)| p == "data"), "{:?}", a.watches());
    drop(wa);
    assert_eq!(a.watches(), Vec::<(String, usize)>::new());
    sa.write("data/y", b"1").unwrap();
    assert_eq!(sa.read("data/y").unwrap(), b"1");
}

#[test]
fn attach_rules_and_daemon_loss() {
    let (hv, sock) = daemon("attach");
    let a = SimBackend::boot(&sock, Some(DomId(5))).unwrap();
    assert!(matches!(SimBackend::boot(&sock, Some(DomId(5))), Err(BackendError::AlreadyExists(_))));
    assert!(matches!(SimBackend::boot(&sock, Some(DomId::SELF)), Err(BackendError::InvalidArgument(_))));
    let dom0 = SimBackend::boot(&sock, Some(DomId(0))).unwrap();
    // Dom0 is privileged in the store.
    a.store().write("private", b"p").unwrap();
    assert_eq!(dom0.store().read("/local/domain/5/private").unwrap(), b"p");
    dom0.store().write("/tool/x", b"1").unwrap();
    assert!(matches!(SimBackend::boot(sock.with_extension("nope"), None), Err(BackendError::Unavailable(_))));
    // The id becomes free when the domain dies.
    let w = dom0.store().watch("@releaseDomain").unwrap();
    assert_eq!(next_path(&w, T).as_deref(), Some("@releaseDomain"));
    drop(a);
    assert_eq!(next_path(&w, T).as_deref(), Some("@releaseDomain"));
    let a2 = SimBackend::boot(&sock, Some(DomId(5))).unwrap();
    assert!(matches!(a2.store().read("private"), Err(BackendError::NotFound(_))));
    // Daemon gone: calls fail, never hang.
    drop(hv);
    assert!(!sock.exists());
    assert!(matches!(a2.store().read("domid"), Err(BackendError::Disconnected(_))));
    assert!(matches!(a2.share_pages(DomId(0), 1, true), Err(BackendError::Disconnected(_))));
    // Queued events (other domains died as the daemon stopped) drain, then the loss shows.
    let deadline = Instant::now() + T;
    loop {
        match w.try_next() {
            Ok(Some(p)) => assert_eq!(p, "@releaseDomain"),
            Ok(None) => {
                readable(w.as_fd(), deadline.saturating_duration_since(Instant::now()));
            }
            Err(e) => {
                assert!(matches!(e, BackendError::Disconnected(_)), "{e}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "watch never reported the lost daemon");
    }
}

#[test]
fn in_process_domain_death_is_visible() {
    let (_hv, sock) = daemon("death-inproc");
    let a = SimBackend::boot(&sock, Some(DomId(1))).unwrap();
    let b = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    let release = a.store().watch("@releaseDomain").unwrap();
    assert_eq!(next_path(&release, T).as_deref(), Some("@releaseDomain"));
    let ea = a.open_evtchn().unwrap();
    let eb = b.open_evtchn().unwrap();
    let pb = eb.bind_unbound(DomId(1)).unwrap();
    let pa = ea.bind_interdomain(DomId(2), pb).unwrap();
    let mut shared = b.share_pages(DomId(1), 1, true).unwrap();
    let mapped = a.map_grants(DomId(2), shared.refs(), false).unwrap();
    shared.region().store_u8(21, 1);
    shared.region().store_u8(22, 9);
    shared.set_unmap_notify(21, Some(pb)).unwrap();
    let refs = shared.refs().to_vec();
    // The domain dies when the backend and every object made from it are gone; leak nothing
    // by forgetting: drop the objects (the Drop of `shared` itself performs the notification).
    drop((shared, eb, b));
    assert_eq!(next_event(&ea, T), Some(pa));
    assert_eq!(mapped.region().load_u8(21), 0);
    assert_eq!(mapped.region().load_u8(22), 9);
    assert_eq!(next_path(&release, T).as_deref(), Some("@releaseDomain"));
    assert!(a.map_grants(DomId(2), &refs, false).is_err());
    ea.notify(pa).unwrap();
}

const CHILD_ENV: &str = "DOMBUS_SIM_DEATH_CHILD";

/// Acts as the child domain of `a_killed_domain_is_buried_in_order` when re-executed with
/// `CHILD_ENV` set; a no-op otherwise.
#[test]
fn death_child() {
    let Ok(sock) = std::env::var(CHILD_ENV) else {
        return;
    };
    let peer = DomId(1);
    let me = SimBackend::boot_named(&sock, Some(DomId(7)), "child").unwrap();
    let ev = me.open_evtchn().unwrap();
    let port = ev.bind_unbound(peer).unwrap();
    let mut shared = me.share_pages(peer, 1, true).unwrap();
    shared.region().write_bytes(0, b"child data");
    shared.region().store_u8(21, 0x55);
    shared.set_unmap_notify(21, Some(port)).unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY ref={} port={}", shared.refs()[0].0, port.0).unwrap();
    out.flush().unwrap();
    drop(out);
    // Live until killed, or until the parent goes away (stdin closes).
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    drop((shared, ev, me));
}

#[test]
fn a_killed_domain_is_buried_in_order() {
    let (_hv, sock) = daemon("death-proc");
    let parent = SimBackend::boot_named(&sock, Some(DomId(1)), "parent").unwrap();
    let release = parent.store().watch("@releaseDomain").unwrap();
    assert_eq!(next_path(&release, T).as_deref(), Some("@releaseDomain"));
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "death_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, &sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The harness may have printed "test death_child ... " on the same line.
            if let Some(at) = line.find("READY ") {
                let _ = tx.send(line[at..].to_string());
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(30)).expect("child never became ready");
    let field = |k: &str| -> u32 {
        line.split_whitespace().find_map(|f| f.strip_prefix(k)).unwrap().parse().unwrap()
    };
    let (gref, cport) = (GrantRef(field("ref=")), EvtchnPort(field("port=")));
    let ev = parent.open_evtchn().unwrap();
    let port = ev.bind_interdomain(DomId(7), cport).unwrap();
    // The bind leaves our port pending (as on Xen): take that event first.
    assert_eq!(next_event(&ev, T), Some(port));
    ev.unmask(port).unwrap();
    let mapped = parent.map_grants(DomId(7), &[gref], true).unwrap();
    assert_eq!(mapped.region().load_u8(21), 0x55);

    child.kill().unwrap();
    let killed = Instant::now();
    assert_eq!(next_event(&ev, T), Some(port), "no event within {T:?} of the kill (a liveness limit)");
    eprintln!("the dead domain's event came {:?} after the kill", killed.elapsed());
    assert_eq!(mapped.region().load_u8(21), 0, "unmap notification byte not cleared");
    let mut buf = [0u8; 10];
    mapped.region().read_bytes(0, &mut buf);
    assert_eq!(&buf, b"child data", "the mapping must stay valid after the granter died");
    mapped.region().store_u8(100, 1);
    assert_eq!(next_path(&release, T).as_deref(), Some("@releaseDomain"));
    assert!(matches!(parent.map_grants(DomId(7), &[gref], false), Err(BackendError::NotFound(_))));
    assert!(matches!(parent.store().read("/local/domain/7"), Err(BackendError::NotFound(_))));
    // Our port is unbound again: notify is dropped.
    ev.notify(port).unwrap();
    let _ = child.wait();
}

/// A domain id is free again as soon as the process holding it lets go: the next attach does
/// not race the daemon's noticing of the departure (back-to-back `dombus` commands act as
/// domain 0 one after another).
#[test]
fn a_domain_id_is_free_again_as_soon_as_its_holder_lets_go() {
    let (_hv, sock) = daemon("reattach");
    for round in 0..300 {
        let a = SimBackend::boot_named(&sock, Some(DomId(5)), &format!("round-{round}"))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        // The new holder is domain 5 with its own home, not a remnant of the previous one.
        assert_eq!(a.store().read("name").unwrap(), format!("round-{round}").as_bytes());
        a.store().write("data/round", round.to_string().as_bytes()).unwrap();
        drop(a);
    }
    // A holder that is still there keeps its id.
    let held = SimBackend::boot(&sock, Some(DomId(5))).unwrap();
    let e = SimBackend::boot(&sock, Some(DomId(5))).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("already attached"), "{e}");
    drop(held);
}
