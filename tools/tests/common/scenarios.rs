//! Multi-process link scenarios, written once and run on every hypervisor: the simulator on the
//! host (`link_multiprocess.rs`) and real Xen inside the VM harness (`xen_multiprocess.rs`).
//!
//! Domains are named by logical number; [`Hv::peer`] maps that onto a real domain id (on Xen in
//! dom0 every process is domain 0, and grants from dom0 to itself work as to any domain).

use std::process::Command;
use std::time::{Duration, Instant};

use super::{LIVENESS, Proc, Scratch, field, link_cmd, simxen};

/// A hypervisor the scenarios can start `dombus-link` domain processes on.
pub trait Hv {
    /// A `dombus-link` process as logical domain `dom`.
    fn cmd(&self, dom: u16, args: &[&str]) -> Command;
    /// The real domain id of logical domain `dom`, as a command-line argument.
    fn peer(&self, dom: u16) -> String;
    /// True while the hypervisor (the simulator daemon) is alive.
    fn alive(&mut self) -> bool;
    /// Bytes for the checksummed stream (smaller under emulation).
    fn stream_bytes(&self) -> u64;
}

/// The simulator daemon on a scratch socket.
pub struct Sim {
    daemon: Proc,
    sock: std::path::PathBuf,
    _dir: Scratch,
}

impl Sim {
    pub fn start(tag: &str) -> Sim {
        let dir = Scratch::new(tag);
        let (daemon, sock) = simxen(&dir);
        Sim { daemon, sock, _dir: dir }
    }
    pub fn sock(&self) -> &std::path::Path {
        &self.sock
    }
}

impl Hv for Sim {
    fn cmd(&self, dom: u16, args: &[&str]) -> Command {
        link_cmd(&self.sock, dom, args)
    }
    fn peer(&self, dom: u16) -> String {
        dom.to_string()
    }
    fn alive(&mut self) -> bool {
        self.daemon.child.try_wait().unwrap().is_none()
    }
    fn stream_bytes(&self) -> u64 {
        1 << 30
    }
}

/// Real Xen, all processes in this domain (dom0 in the VM harness).
pub struct Xen {
    /// This domain's id.
    pub domid: u16,
}

impl Hv for Xen {
    fn cmd(&self, _dom: u16, args: &[&str]) -> Command {
        // In the VM the binaries sit next to each other, not at their build paths.
        let bin =
            std::env::var("DOMBUS_LINK_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_dombus-link").into());
        let mut cmd = Command::new(bin);
        cmd.arg("--xen").args(args);
        cmd
    }
    fn peer(&self, _dom: u16) -> String {
        self.domid.to_string()
    }
    fn alive(&mut self) -> bool {
        true
    }
    fn stream_bytes(&self) -> u64 {
        64 << 20
    }
}

/// A stream through 1 MiB rings arrives complete with the sender's checksum.
pub fn stream_with_matching_checksum(hv: &mut dyn Hv, path: &str) {
    let bytes = hv.stream_bytes().to_string();
    let (p1, p2) = (hv.peer(1), hv.peer(2));
    let mut server =
        Proc::spawn(hv.cmd(1, &["serve", "--path", path, "--peer", &p2, "--ring", "1M", "recv"]));
    server.expect_line("listening", Duration::from_secs(30));
    let mut client = Proc::spawn(
        hv.cmd(2, &["connect", "--path", path, "--peer", &p1, "--ring", "1M", "send", "--bytes", &bytes]),
    );
    let sent = client.expect_line("sent", Duration::from_secs(300));
    let got = server.expect_line("received", Duration::from_secs(60));
    assert_eq!(field(&sent, "bytes"), bytes);
    assert_eq!(field(&got, "bytes"), field(&sent, "bytes"));
    assert_eq!(field(&got, "crc"), field(&sent, "crc"), "checksums differ");
    assert!(client.wait_timeout(Duration::from_secs(10)).unwrap().success(), "{}", client.stderr());
    assert!(server.wait_timeout(Duration::from_secs(10)).unwrap().success(), "{}", server.stderr());
    eprintln!("stream: {sent}");
}

/// A writer killed mid-stream is noticed by the reader, as an error (not an end of stream).
pub fn peer_killed_mid_stream_is_detected(hv: &mut dyn Hv, path: &str) {
    let (p1, p2) = (hv.peer(1), hv.peer(2));
    let mut server = Proc::spawn(hv.cmd(1, &["serve", "--path", path, "--peer", &p2, "recv"]));
    server.expect_line("listening", LIVENESS);
    let mut client =
        Proc::spawn(hv.cmd(2, &["connect", "--path", path, "--peer", &p1, "send", "--bytes", "1000G"]));
    client.expect_line("connected", LIVENESS);
    server.expect_line("connected", LIVENESS);
    // Killed wherever it is in its 1000 GB: the verdict does not depend on how far it got.
    let killed = Instant::now();
    client.kill();
    let status = server.wait_timeout(LIVENESS).unwrap_or_else(|| {
        panic!("server did not notice the dead peer within {LIVENESS:?} (a liveness limit)")
    });
    let noticed = killed.elapsed();
    eprintln!("peer death noticed after {noticed:?}");
    assert!(!status.success(), "a killed writer must not look like a clean end of stream");
    assert!(server.stderr().contains("closed the link or died"), "{}", server.stderr());
}

/// A client that scribbles on the ring indices is disconnected; another link keeps working.
pub fn ring_scribbler_is_disconnected(hv: &mut dyn Hv, tag: &str) {
    let (good, evil) = (format!("data/{tag}-good"), format!("data/{tag}-evil"));
    let (p1, p3, p4, p5) = (hv.peer(1), hv.peer(3), hv.peer(4), hv.peer(5));
    let mut echo = Proc::spawn(hv.cmd(4, &["serve", "--path", &good, "--peer", &p5, "echo"]));
    echo.expect_line("listening", Duration::from_secs(30));
    let mut pinger = Proc::spawn(
        hv.cmd(5, &["connect", "--path", &good, "--peer", &p4, "ping", "--count", "3000", "--warmup", "10"]),
    );
    pinger.expect_line("connected", Duration::from_secs(30));

    let mut victim = Proc::spawn(hv.cmd(1, &["serve", "--path", &evil, "--peer", &p3, "recv"]));
    victim.expect_line("listening", Duration::from_secs(30));
    let mut attacker = Proc::spawn(hv.cmd(3, &["scribble", "--path", &evil, "--peer", &p1]));
    attacker.expect_line("scribbled", Duration::from_secs(30));
    let status = victim.wait_timeout(LIVENESS).unwrap_or_else(|| {
        panic!("victim did not react to the scribble within {LIVENESS:?} (a liveness limit)")
    });
    assert!(!status.success());
    assert!(victim.stderr().contains("broke the link protocol"), "{}", victim.stderr());
    attacker.expect_line("server closed the link", LIVENESS);

    let ping = pinger.expect_line("ping", Duration::from_secs(300));
    assert_eq!(field(&ping, "count"), "3000");
    assert!(hv.alive(), "the hypervisor died");
}

/// Virtual-socket sessions over one link between two processes: several concurrent
/// connections, a refused port, and a writer held back by credit while the others go on.
pub fn sessions_on_one_link(hv: &mut dyn Hv, path: &str) {
    let (p1, p2) = (hv.peer(1), hv.peer(2));
    let mut server = Proc::spawn(hv.cmd(1, &["serve", "--path", path, "--peer", &p2, "mux-serve"]));
    server.expect_line("listening", Duration::from_secs(30));
    let mut client =
        Proc::spawn(hv.cmd(2, &["connect", "--path", path, "--peer", &p1, "mux-check", "--conns", "8"]));
    let refused = client.expect_line("mux refused", Duration::from_secs(60));
    assert_eq!(field(&refused, "port"), "3");
    let held = client.expect_line("mux credit", Duration::from_secs(60));
    assert_eq!(field(&held, "held"), "yes", "{held}");
    let done = client.expect_line("mux echo", Duration::from_secs(300));
    assert_eq!(field(&done, "conns"), "8");
    assert_eq!(field(&done, "ok"), "8", "{done}");
    assert!(client.wait_timeout(Duration::from_secs(10)).unwrap().success(), "{}", client.stderr());
    assert!(server.wait_timeout(Duration::from_secs(10)).unwrap().success(), "{}", server.stderr());
}
