//! Virtual-socket addresses: `(CID, port)`, where the CID is a Xen domain id. Their text form
//! is `xen:<cid>:<port>`, displayed here and parsed with every other address scheme by
//! dombus-rpc's `Address`.

use std::fmt;

/// The CID meaning "this domain" (`DOMID_SELF`).
pub const CID_SELF: u32 = 0x7FF0;
/// The CID meaning "the backend domain", where the connection manager runs.
pub const CID_BACKEND: u32 = 0x7FF1;
/// Ports below this may be bound only by the backend domain and the toolstack's domain.
pub const FIRST_UNPRIVILEGED_PORT: u32 = 1024;

/// A virtual-socket address: a domain (CID) and a port on it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct VsockAddr {
    /// The domain id, or [`CID_SELF`] / [`CID_BACKEND`].
    pub cid: u32,
    /// The port.
    pub port: u32,
}

impl VsockAddr {
    /// An address.
    pub const fn new(cid: u32, port: u32) -> VsockAddr {
        VsockAddr { cid, port }
    }

    /// True if binding this address's port needs the backend's or the toolstack's privilege.
    pub fn is_privileged_port(&self) -> bool {
        self.port < FIRST_UNPRIVILEGED_PORT
    }
}

impl fmt::Display for VsockAddr {
    /// `xen:<cid>:<port>`, with `self` and `backend` for the special CIDs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.cid {
            CID_SELF => write!(f, "xen:self:{}", self.port),
            CID_BACKEND => write!(f, "xen:backend:{}", self.port),
            cid => write!(f, "xen:{cid}:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints() {
        assert_eq!(VsockAddr::new(CID_BACKEND, 1).to_string(), "xen:backend:1");
        assert_eq!(VsockAddr::new(CID_SELF, 80).to_string(), "xen:self:80");
        assert_eq!(VsockAddr::new(7, 4294967295).to_string(), "xen:7:4294967295");
        assert!(VsockAddr::new(1, 1023).is_privileged_port());
        assert!(!VsockAddr::new(1, 1024).is_privileged_port());
    }
}
