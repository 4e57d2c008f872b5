//! Migration on the simulated hypervisor: the old id ends as a death does, the name moves to a
//! new id, and only the migrated process can attach as it, once.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::os::fd::{AsFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use dombus_sim::{Ended, SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_transport_xen::backend::{
    Backend, BackendError, EventChannel, MappedPages, SharedPages, Store, StoreWatch,
};
use dombus_transport_xen::shmem::SharedMem;
use dombus_transport_xen::types::DomId;

/// A liveness limit, not a performance claim.
const T: Duration = Duration::from_secs(10);

fn daemon(tag: &str) -> (SimHypervisorHandle, PathBuf) {
    static N: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "dombus-simmig-{tag}-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
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

/// Waits (bounded) until `w` reports `path`.
fn saw<W: StoreWatch>(w: &W, path: &str) -> bool {
    let deadline = Instant::now() + T;
    loop {
        while let Some(p) = w.try_next().unwrap() {
            if p == path {
                return true;
            }
        }
        let Some(left) = deadline.checked_duration_since(Instant::now()) else { return false };
        readable(w.as_fd(), left);
    }
}

fn migrated(e: BackendError) -> DomId {
    match e {
        BackendError::Migrated { to } => to,
        other => panic!("expected Migrated, got {other}"),
    }
}

#[test]
fn migration_ends_the_old_id_as_a_death_and_moves_the_name() {
    let (_hv, path) = daemon("death");
    let dom0 = SimBackend::toolstack(&path).unwrap();
    let dom1 = SimBackend::boot_named(&path, Some(DomId(1)), "web").unwrap();
    let dom2 = SimBackend::boot(&path, Some(DomId(2))).unwrap();
    dom1.store().write("data/x", b"1").unwrap();
    let release = dom0.store().watch("@releaseDomain").unwrap();
    let introduce = dom0.store().watch("@introduceDomain").unwrap();
    // A grant of domain 1 mapped by domain 2, and an event channel between them.
    let shared = dom1.share_pages(DomId(2), 1, true).unwrap();
    let refs = shared.refs().to_vec();
    let mapping = dom2.map_grants(DomId(1), &refs, true).unwrap();
    let ev2 = dom2.open_evtchn().unwrap();
    let p2 = ev2.bind_unbound(DomId(1)).unwrap();
    let ev1 = dom1.open_evtchn().unwrap();
    ev1.bind_interdomain(DomId(2), p2).unwrap();
    while ev2.pending().unwrap().is_some() {}
    assert_eq!(dom1.ended(), None);

    let to = SimBackend::migrate(&path, DomId(1)).unwrap();
    assert_ne!(to, DomId(1), "a migrated domain gets a new id");

    // The process attached as the old id learns it at once, without asking.
    assert!(readable(dom1.ended_fd(), T), "the migrated attachment was never told");
    assert_eq!(dom1.ended(), Some(Ended::Migrated { to }));
    // Every later operation of the old attachment fails, distinctly.
    assert_eq!(migrated(dom1.store().read("name").unwrap_err()), to);
    assert_eq!(migrated(dom1.share_pages(DomId(2), 1, true).map(|_| ()).unwrap_err()), to);
    assert_eq!(migrated(dom1.store().watch("data").map(|_| ()).unwrap_err()), to);
    assert_eq!(migrated(ev1.bind_unbound(DomId(2)).unwrap_err()), to);

    // As a death: grants revoked (mappings held elsewhere stay valid), the peer's port closed
    // and signalled, the home removed and @releaseDomain fired.
    assert!(matches!(dom2.map_grants(DomId(1), &refs, true), Err(BackendError::NotFound(_))));
    mapping.region().store_u8(7, 0x5a);
    assert_eq!(mapping.region().load_u8(7), 0x5a);
    assert!(readable(ev2.as_fd(), T), "the peer of the old id's channel was not told");
    assert_eq!(ev2.pending().unwrap(), Some(p2));
    assert!(saw(&release, "@releaseDomain"));
    assert!(matches!(dom0.store().read("/local/domain/1/name"), Err(BackendError::NotFound(_))));
    // The name lives on under the new id, at once (the toolstack introduced it), without the
    // old home's data.
    assert!(saw(&introduce, "@introduceDomain"));
    assert_eq!(dom0.store().read(&format!("/local/domain/{}/name", to.0)).unwrap(), b"web");
    assert!(dom0.store().read(&format!("/local/domain/{}/data/x", to.0)).is_err());

    // The migrated process attaches as the new id, once.
    let moved = dom1.resume().unwrap();
    assert_eq!(moved.domid(), to);
    assert_eq!(moved.store().read("name").unwrap(), b"web");
    assert_eq!(moved.store().read("domid").unwrap(), to.0.to_string().as_bytes());
    assert!(matches!(dom1.resume(), Err(BackendError::PermissionDenied(_))), "the token is one-time");
    assert_eq!(moved.ended(), None);
    // And works as any domain: its grants map.
    let again = moved.share_pages(DomId(2), 1, false).unwrap();
    dom2.map_grants(to, again.refs(), false).unwrap();
    drop((shared, ev1));
}

#[test]
fn migrating_needs_the_toolstack_and_an_attached_guest() {
    let (_hv, path) = daemon("rules");
    let dom1 = SimBackend::boot(&path, Some(DomId(1))).unwrap();
    assert!(matches!(SimBackend::migrate(&path, DomId(0)), Err(BackendError::InvalidArgument(_))));
    assert!(matches!(SimBackend::migrate(&path, DomId(5)), Err(BackendError::NotFound(_))));
    // Without the key (an attached guest asking) the daemon refuses: only the key file's reader
    // is the toolstack. A wrong key is a plain refusal.
    let key_path = SimHypervisor::key_path(&path);
    let key = std::fs::read_to_string(&key_path).unwrap();
    std::fs::write(&key_path, format!("toolstack-{}", "0".repeat(64))).unwrap();
    assert!(matches!(SimBackend::migrate(&path, DomId(1)), Err(BackendError::PermissionDenied(_))));
    std::fs::write(&key_path, key).unwrap();
    assert_eq!(dom1.ended(), None, "a refused migration leaves the domain alone");
    dom1.store().read("name").unwrap();
    // A domain that was never migrated has nothing to resume.
    assert!(matches!(dom1.resume(), Err(BackendError::InvalidArgument(_))));
    // Nobody else can attach as the new id: the token went to the old attachment alone.
    let to = SimBackend::migrate(&path, DomId(1)).unwrap();
    let guess = format!("{}-{}", to.0, "ab".repeat(32));
    assert!(matches!(SimBackend::attach(&path, &guess), Err(BackendError::PermissionDenied(_))));
    // Not even the toolstack can hand out another token for it.
    assert!(matches!(
        SimBackend::create_domain(&path, Some(to), "thief"),
        Err(BackendError::AlreadyExists(_))
    ));
    assert_ne!(SimBackend::create_domain(&path, None, "other").unwrap().0, to);
    assert_eq!(dom1.resume().unwrap().domid(), to);
}

#[tokio::test]
async fn a_migration_wakes_an_async_waiter_and_migrates_again() {
    let (_hv, path) = daemon("async");
    let dom3 = SimBackend::boot_named(&path, Some(DomId(3)), "db").unwrap();
    let waiter = {
        let dom3 = dom3.clone();
        tokio::spawn(async move { dom3.wait_ended().await })
    };
    tokio::task::yield_now().await;
    let to = SimBackend::migrate(&path, DomId(3)).unwrap();
    let ended = tokio::time::timeout(T, waiter).await.expect("wait_ended hung").unwrap().unwrap();
    assert_eq!(ended, Ended::Migrated { to });
    // The resumed domain can be migrated in turn; the name follows.
    let moved = dom3.resume().unwrap();
    let to2 = SimBackend::migrate(&path, to).unwrap();
    assert_ne!(to2, to);
    let ended = tokio::time::timeout(T, moved.wait_ended()).await.unwrap().unwrap();
    assert_eq!(ended, Ended::Migrated { to: to2 });
    let last = moved.resume().unwrap();
    assert_eq!(last.store().read("name").unwrap(), b"db");
    // A lost connection is told apart from a migration.
    drop(_hv);
    let ended = tokio::time::timeout(T, last.wait_ended()).await.unwrap().unwrap();
    assert!(matches!(ended, Ended::Lost { .. }), "{ended:?}");
}
