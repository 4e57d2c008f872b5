//! Addresses: which transport, and where.
//!
//! | address | transport |
//! |---|---|
//! | `xen:<cid>:<port>` | transport-xen virtual sockets (CID = domain id, `self`, `backend`; shown by `VsockAddr`'s `Display`) |
//! | `xen:<name>:<port>` | the same, to the domain of that name in the store, looked up at each connect (so a reconnect finds a domain that came back under a new id) |
//! | `vsock:<cid>:<port>` | AF_VSOCK through `tokio-vsock` (KVM/Firecracker guests, vsock loopback) |
//! | `unix:<path>` | a Unix stream socket (development, tests) |
//! | `tcp:<host>:<port>` | TCP (development, tests); IPv6 hosts in brackets: `tcp:[::1]:80` |

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use dombus_transport_xen::vsock::{CID_BACKEND, CID_SELF, VsockAddr};

/// Where to connect or listen.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// A transport-xen virtual socket.
    Xen(VsockAddr),
    /// A transport-xen virtual socket of the domain named `name` (looked up at each connect).
    XenName {
        /// The domain's name: a letter, then letters, digits, `_`, `.` or `-`; at most 64 bytes.
        name: String,
        /// The port.
        port: u32,
    },
    /// An AF_VSOCK socket.
    Vsock {
        /// Context id (1 = local, 2 = host, 3+ guests; `u32::MAX` = any when listening).
        cid: u32,
        /// Port.
        port: u32,
    },
    /// A Unix stream socket path.
    Unix(PathBuf),
    /// A TCP host (name or IP literal, without brackets) and port.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port.
        port: u16,
    },
}

/// Why an address string is not an address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// No known scheme.
    #[error(
        "{0:?}: unknown transport; expected xen:<cid>:<port>, vsock:<cid>:<port>, unix:<path> or tcp:<host>:<port>"
    )]
    Scheme(String),
    /// A bad `xen:` address.
    #[error(transparent)]
    Xen(#[from] XenAddrError),
    /// A bad `vsock:` address.
    #[error("{0:?}: expected vsock:<cid>:<port> with decimal cid and port (cid `any` when listening)")]
    Vsock(String),
    /// A bad `unix:` address.
    #[error("{0:?}: expected unix:<path> with a non-empty path")]
    Unix(String),
    /// A bad `tcp:` address.
    #[error("{0:?}: expected tcp:<host>:<port> with a port from 0 to 65535 (IPv6 hosts in brackets)")]
    Tcp(String),
}

/// Why a `xen:` address is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XenAddrError {
    /// The CID part is not a number, `self`, `backend` or a domain name.
    #[error(
        "{0:?} is not a CID: expected a domain id, `self`, `backend` or a domain name (a letter, then letters, digits, `_`, `.`, `-`; at most 64)"
    )]
    Cid(String),
    /// The port part is not a 32-bit number.
    #[error("{0:?} is not a port: expected a number from 0 to 4294967295")]
    Port(String),
    /// Wrong number of `:`-separated parts.
    #[error("{0:?}: expected xen:<cid>:<port>")]
    Shape(String),
}

/// Whether `n` is a domain name an address may carry.
fn is_domain_name(n: &str) -> bool {
    n.len() <= 64
        && n.starts_with(|c: char| c.is_ascii_alphabetic())
        && n.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// The `<cid>:<port>` after `xen:` in `s`.
fn xen(s: &str, rest: &str) -> Result<Address, XenAddrError> {
    let (cid, port) = rest.split_once(':').ok_or_else(|| XenAddrError::Shape(s.to_string()))?;
    if port.contains(':') {
        return Err(XenAddrError::Shape(s.to_string()));
    }
    let port = || decimal(port).ok_or_else(|| XenAddrError::Port(port.to_string()));
    let cid = match cid {
        "self" => CID_SELF,
        "backend" => CID_BACKEND,
        n if is_domain_name(n) => return Ok(Address::XenName { name: n.to_string(), port: port()? }),
        n => decimal(n).ok_or_else(|| XenAddrError::Cid(n.to_string()))?,
    };
    Ok(Address::Xen(VsockAddr::new(cid, port()?)))
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(s: &str) -> Result<Address, AddressError> {
        let (scheme, rest) = s.split_once(':').ok_or_else(|| AddressError::Scheme(s.to_string()))?;
        match scheme {
            "xen" => Ok(xen(s, rest)?),
            "vsock" => {
                let bad = || AddressError::Vsock(s.to_string());
                let (cid, port) = rest.split_once(':').ok_or_else(bad)?;
                let cid = match cid {
                    "any" => u32::MAX,
                    c => decimal(c).ok_or_else(bad)?,
                };
                Ok(Address::Vsock { cid, port: decimal(port).ok_or_else(bad)? })
            }
            "unix" if !rest.is_empty() => Ok(Address::Unix(PathBuf::from(rest))),
            "unix" => Err(AddressError::Unix(s.to_string())),
            "tcp" => {
                let bad = || AddressError::Tcp(s.to_string());
                let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                let host = match host.strip_prefix('[') {
                    Some(h) => h.strip_suffix(']').ok_or_else(bad)?,
                    None if host.contains(':') => return Err(bad()),
                    None => host,
                };
                // Brackets only around the whole host, so that every address displays as one that
                // parses back (not so for `tcp:[[1]:80`; the rpc_address fuzz target checks it).
                if host.is_empty() || host.contains(['[', ']']) {
                    return Err(bad());
                }
                let port = decimal(port).and_then(|p| u16::try_from(p).ok()).ok_or_else(bad)?;
                Ok(Address::Tcp { host: host.to_string(), port })
            }
            _ => Err(AddressError::Scheme(s.to_string())),
        }
    }
}

/// A decimal u32 with digits only (no sign, no spaces).
fn decimal(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Xen(a) => write!(f, "{a}"),
            Address::XenName { name, port } => write!(f, "xen:{name}:{port}"),
            Address::Vsock { cid: u32::MAX, port } => write!(f, "vsock:any:{port}"),
            Address::Vsock { cid, port } => write!(f, "vsock:{cid}:{port}"),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_every_transport() {
        assert_eq!("xen:3:5000".parse(), Ok(Address::Xen(VsockAddr::new(3, 5000))));
        assert_eq!("xen:self:80".parse(), Ok(Address::Xen(VsockAddr::new(CID_SELF, 80))));
        assert_eq!("xen:backend:1".parse(), Ok(Address::Xen(VsockAddr::new(CID_BACKEND, 1))));
        assert_eq!("xen:storage-1:7".parse(), Ok(Address::XenName { name: "storage-1".into(), port: 7 }));
        assert_eq!("xen:Domain-0:7".parse(), Ok(Address::XenName { name: "Domain-0".into(), port: 7 }));
        assert_eq!("vsock:1:5000".parse(), Ok(Address::Vsock { cid: 1, port: 5000 }));
        assert_eq!("vsock:any:5000".parse(), Ok(Address::Vsock { cid: u32::MAX, port: 5000 }));
        assert_eq!("unix:/run/x.sock".parse(), Ok(Address::Unix("/run/x.sock".into())));
        assert_eq!("tcp:127.0.0.1:80".parse(), Ok(Address::Tcp { host: "127.0.0.1".into(), port: 80 }));
        assert_eq!("tcp:[::1]:80".parse(), Ok(Address::Tcp { host: "::1".into(), port: 80 }));
        for bad in ["tcp:[[1]:8080", "tcp:[a]]:1", "tcp:a]:1", "tcp:[]:1"] {
            assert!(bad.parse::<Address>().is_err(), "{bad} accepted");
        }
        assert_eq!("tcp:localhost:0".parse(), Ok(Address::Tcp { host: "localhost".into(), port: 0 }));
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        let e = |s: &str| s.parse::<Address>().unwrap_err();
        assert!(matches!(e("http://x"), AddressError::Scheme(_)));
        assert!(matches!(e("nocolon"), AddressError::Scheme(_)));
        assert!(matches!(e("xen:1"), AddressError::Xen(_)));
        assert!(matches!(e("vsock:1"), AddressError::Vsock(_)));
        assert!(matches!(e("vsock:x:1"), AddressError::Vsock(_)));
        assert!(matches!(e("unix:"), AddressError::Unix(_)));
        assert!(matches!(e("tcp:host"), AddressError::Tcp(_)));
        assert!(matches!(e("tcp:host:70000"), AddressError::Tcp(_)));
        assert!(matches!(e("tcp:::1:80"), AddressError::Tcp(_)));
        assert!(matches!(e("tcp::80"), AddressError::Tcp(_)));
        assert!(e("ftp:x").to_string().contains("tcp:<host>:<port>"));
    }

    #[test]
    fn bad_xen_addresses_say_what_is_wrong() {
        let e = |s: &str| match s.parse::<Address>() {
            Err(AddressError::Xen(e)) => e,
            other => panic!("{s}: {other:?}"),
        };
        assert!(matches!(e("xen:1"), XenAddrError::Shape(_)));
        assert!(matches!(e("xen:1:2:3"), XenAddrError::Shape(_)));
        assert!(matches!(e("xen:0dom:2"), XenAddrError::Cid(_)));
        assert!(matches!(e("xen:a/b:2"), XenAddrError::Cid(_)));
        assert!(matches!(e(&format!("xen:{}:2", "a".repeat(65))), XenAddrError::Cid(_)));
        assert!(matches!(e("xen:storage:x"), XenAddrError::Port(_)));
        assert!(matches!(e("xen:-1:2"), XenAddrError::Cid(_)));
        assert!(matches!(e("xen:4294967296:2"), XenAddrError::Cid(_)));
        assert!(matches!(e("xen:1:"), XenAddrError::Port(_)));
        assert!(matches!(e("xen:1:+5"), XenAddrError::Port(_)));
        assert!(matches!(e("xen:1:99999999999"), XenAddrError::Port(_)));
        assert!(e("xen:1x:1").to_string().contains("`self`, `backend` or a domain name"));
        assert_eq!(e("xen:1:x").to_string(), "\"x\" is not a port: expected a number from 0 to 4294967295");
        assert_eq!(
            "xen:1".parse::<Address>().unwrap_err().to_string(),
            "\"xen:1\": expected xen:<cid>:<port>"
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,60}") {
            let _ = s.parse::<Address>();
        }

        #[test]
        fn display_round_trips(cid in any::<u32>(), port in any::<u32>(), tport in any::<u16>(), path in "/[a-z/]{1,20}", name in "[a-zA-Z][a-zA-Z0-9_.-]{0,63}") {
            prop_assume!(name != "self" && name != "backend");
            for a in [
                Address::Xen(VsockAddr::new(cid, port)),
                Address::Xen(VsockAddr::new(CID_SELF, port)),
                Address::Xen(VsockAddr::new(CID_BACKEND, port)),
                Address::XenName { name: name.clone(), port },
                Address::Vsock { cid, port },
                Address::Unix(path.clone().into()),
                Address::Tcp { host: "::1".into(), port: tport },
                Address::Tcp { host: "example.org".into(), port: tport },
            ] {
                prop_assert_eq!(a.to_string().parse::<Address>(), Ok(a));
            }
        }
    }
}
