//! What a guest does with its end of a veth vif, for the tests and the demo, whose guests are
//! network namespaces: give the end an address and bring it up, and open sockets inside.
//!
//! The service never does this: a guest's addresses are the guest's business, as on Xen.

use std::io;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};

use super::kernel::Kernel;
use super::netns::{Namespace, block_on_in, run_in};

/// Brings `lo` and the link `ifname` of the guest namespace at `ns` up, with `address/prefix`
/// (one more address per call: a guest may have several).
pub fn configure(ns: &Path, ifname: &str, address: IpAddr, prefix: u8) -> io::Result<()> {
    let ifname = ifname.to_owned();
    let ns = PathBuf::from(ns);
    block_on_in(Namespace::Path(ns), move || async move {
        let k = Kernel::connect().map_err(io::Error::other)?;
        for (name, addr) in [("lo", None), (ifname.as_str(), Some(address))] {
            let link = k.link(name).await.map_err(io::Error::other)?.ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("no link {name} in the guest"))
            })?;
            if let Some(addr) = addr {
                k.handle()
                    .address()
                    .add(link.index, addr, prefix)
                    .execute()
                    .await
                    .map_err(|e| io::Error::other(format!("adding {addr}/{prefix} to {name}: {e}")))?;
            }
            k.change(link.index, &format!("{name} up"), |b| b.up()).await.map_err(io::Error::other)?;
        }
        Ok(())
    })?
}

/// A UDP socket bound to `addr` inside the guest namespace at `ns` (usable from any thread
/// once made: a socket stays in the namespace it was made in).
pub fn udp_socket(ns: &Path, addr: SocketAddr) -> io::Result<UdpSocket> {
    run_in(Namespace::Path(ns.to_owned()), move || UdpSocket::bind(addr))?
}
