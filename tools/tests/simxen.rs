//! The `dombus-simxen` binary: serves domains and stops cleanly on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod common;

use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Scratch;
use dombus_sim::SimBackend;
use dombus_transport_xen::backend::{Backend, BackendError, MappedPages, SharedPages, Store};
use dombus_transport_xen::shmem::SharedMem;
use dombus_transport_xen::types::DomId;

#[test]
fn the_binary_serves_and_stops_on_sigterm() {
    let dir = Scratch::new("simxen-bin");
    let sock = dir.path("simxen.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_dombus-simxen"))
        .arg("--socket")
        .arg(&sock)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let a = loop {
        match SimBackend::boot(&sock, Some(DomId(1))) {
            Ok(a) => break a,
            Err(BackendError::Unavailable(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("cannot attach to dombus-simxen: {e}"),
        }
    };
    let b = SimBackend::boot(&sock, Some(DomId(2))).unwrap();
    let shared = a.share_pages(DomId(2), 1, true).unwrap();
    let mapped = b.map_grants(DomId(1), shared.refs(), true).unwrap();
    shared.region().write_bytes(0, b"ping");
    let mut buf = [0u8; 4];
    mapped.region().read_bytes(0, &mut buf);
    assert_eq!(&buf, b"ping");
    mapped.region().write_bytes(0, b"pong");
    shared.region().read_bytes(0, &mut buf);
    assert_eq!(&buf, b"pong");

    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "dombus-simxen did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut log = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut log);
    }
    assert!(status.success(), "exit status {status:?}; log:\n{log}");
    assert!(!sock.exists(), "socket not removed");
    assert!(log.contains("attached"), "{log}");
    // The domains see the loss, and their mappings stay usable.
    assert!(matches!(a.store().read("domid"), Err(BackendError::Disconnected(_))));
    mapped.region().read_bytes(0, &mut buf);
    assert_eq!(&buf, b"pong");
    let w = b.store().watch("x");
    assert!(matches!(w, Err(BackendError::Disconnected(_))));
    assert!(matches!(a.open_evtchn().map(|e| e.as_fd().try_clone_to_owned().is_ok()), Ok(true)));
}
