//! Virtual-socket addresses: `(CID, port)`, where the CID is a Xen domain id.

use std::fmt;
use std::str::FromStr;

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

/// Why a string is not a `xen:<cid>:<port>` address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrParseError {
    /// The string does not start with `xen:`.
    #[error("{0:?} is not a xen address: expected xen:<cid>:<port>")]
    Scheme(String),
    /// The CID part is not a number, `self` or `backend`.
    #[error("{0:?} is not a CID: expected a domain id, `self` or `backend`")]
    Cid(String),
    /// The port part is not a 32-bit number.
    #[error("{0:?} is not a port: expected a number from 0 to 4294967295")]
    Port(String),
    /// Wrong number of `:`-separated parts.
    #[error("{0:?}: expected xen:<cid>:<port>")]
    Shape(String),
}

impl FromStr for VsockAddr {
    type Err = AddrParseError;

    fn from_str(s: &str) -> Result<VsockAddr, AddrParseError> {
        let rest = s.strip_prefix("xen:").ok_or_else(|| AddrParseError::Scheme(s.to_string()))?;
        let (cid, port) = rest.split_once(':').ok_or_else(|| AddrParseError::Shape(s.to_string()))?;
        if port.contains(':') {
            return Err(AddrParseError::Shape(s.to_string()));
        }
        let cid = match cid {
            "self" => CID_SELF,
            "backend" => CID_BACKEND,
            n if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                n.parse().map_err(|_| AddrParseError::Cid(n.to_string()))?
            }
            other => return Err(AddrParseError::Cid(other.to_string())),
        };
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(AddrParseError::Port(port.to_string()));
        }
        let port = port.parse().map_err(|_| AddrParseError::Port(port.to_string()))?;
        Ok(VsockAddr { cid, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints() {
        assert_eq!("xen:3:5000".parse(), Ok(VsockAddr::new(3, 5000)));
        assert_eq!("xen:self:80".parse(), Ok(VsockAddr::new(CID_SELF, 80)));
        assert_eq!("xen:backend:1".parse(), Ok(VsockAddr::new(CID_BACKEND, 1)));
        assert_eq!(VsockAddr::new(CID_BACKEND, 1).to_string(), "xen:backend:1");
        assert_eq!(VsockAddr::new(7, 4294967295).to_string(), "xen:7:4294967295");
        assert!(VsockAddr::new(1, 1023).is_privileged_port());
        assert!(!VsockAddr::new(1, 1024).is_privileged_port());
    }

    #[test]
    fn clear_errors() {
        let e = |s: &str| s.parse::<VsockAddr>().unwrap_err();
        assert!(matches!(e("vsock:1:2"), AddrParseError::Scheme(_)));
        assert!(matches!(e("xen:1"), AddrParseError::Shape(_)));
        assert!(matches!(e("xen:1:2:3"), AddrParseError::Shape(_)));
        assert!(matches!(e("xen:dom0:2"), AddrParseError::Cid(_)));
        assert!(matches!(e("xen:-1:2"), AddrParseError::Cid(_)));
        assert!(matches!(e("xen:4294967296:2"), AddrParseError::Cid(_)));
        assert!(matches!(e("xen:1:"), AddrParseError::Port(_)));
        assert!(matches!(e("xen:1:+5"), AddrParseError::Port(_)));
        assert!(matches!(e("xen:1:99999999999"), AddrParseError::Port(_)));
        assert!(e("xen:x:1").to_string().contains("`self` or `backend`"));
    }

    proptest! {
        #[test]
        fn display_then_parse_is_identity(cid in any::<u32>(), port in any::<u32>()) {
            let a = VsockAddr::new(cid, port);
            prop_assert_eq!(a.to_string().parse::<VsockAddr>(), Ok(a));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,40}") {
            let _ = s.parse::<VsockAddr>();
        }
    }
}
