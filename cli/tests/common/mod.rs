//! What the `dombus` tool's end-to-end tests share: running the tool against a host's state
//! directory, reading its output, and bringing the host down whatever happens.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub const DOMBUS: &str = env!("CARGO_BIN_EXE_dombus");

/// `dombus --state STATE ARGS…`, run to completion.
pub fn dombus(state: &Path, args: &[&str]) -> Output {
    Command::new(DOMBUS).arg("--state").arg(state).args(args).output().unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

pub fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {o:?}"))
}

/// Brings the host of a state directory down, and removes the directory, even if the test
/// fails half-way.
pub struct Down(pub PathBuf);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = Command::new(DOMBUS).arg("--state").arg(&self.0).args(["host", "down"]).output();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The transports of a guest, domain `domid` named `guest<domid>`, of the host whose simulator
/// listens on `sim`, its sockets under the host's connection manager (dom0). The test is both
/// the toolstack that creates the domain and the process that runs as it. Must run inside a
/// tokio runtime.
#[allow(dead_code)]
pub fn guest_net(sim: &Path, domid: u16) -> dombus::rpc::Net {
    use dombus::sim::SimBackend;
    use dombus::transport::types::DomId;
    use dombus::transport::vsock::LinkSetUp;
    use dombus::transport::vsock::domain::{VsockConfig, VsockDomain};
    let backend = SimBackend::boot_named(sim, Some(DomId(domid)), &format!("guest{domid}")).unwrap();
    let config = VsockConfig { set_up: LinkSetUp::Introduced, ..VsockConfig::default() };
    let domain = VsockDomain::start(backend, config).unwrap();
    dombus::rpc::Net::new()
        .with_domain(std::sync::Arc::new(dombus_agent::Managed::start(domain, DomId::DOM0)), None)
}
