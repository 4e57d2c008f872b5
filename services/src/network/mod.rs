//! The network service: what a network driver domain does for the toolstack — bridges, and the
//! vifs of guests on them — on the kernel's own netlink (the job of `xl network-attach` and
//! Xen's vif hotplug scripts).
//!
//! A vif is a guest's network device, named by the guest's domain id and the device's number
//! ([`VifId`], `3.0`); its end in this domain is the link `vif3.0`, as Xen's netback names it.
//! It is either
//! - a **veth** pair, whose other end (`eth<devid>`) is in the network namespace that stands in
//!   for the guest (`<guest-netns-dir>/dom<domid>`, made with the guest's first vif and let go
//!   with its last), or
//! - a **tap**, whose other end is a file descriptor a device model opens by the tap's name.
//!
//! As Xen's `vif-bridge` does, this domain's end gets the MAC address `fe:ff:ff:ff:ff:ff` (so
//! that a bridge never takes it as its own), the MTU of its bridge unless told otherwise, and
//! goes up once attached; the guest's MAC address is the guest's end's.
//!
//! With addresses given ([`Network::vif_set_addresses`]), only those source addresses may leave
//! a vif, as `vif-common`'s anti-spoofing rules allow (nftables, in the `netdev` family on this
//! domain's end). A rate ([`Rate`], netback's `rate` key) limits what the guest sends, with the
//! kernel's token-bucket queue (`tbf`) on the guest's end.
//!
//! Every change to a bridge or a vif in the daemon's namespace is published as a
//! [`NetworkEvent`] ([`Network::events`]) from the kernel's own link notifications, so changes
//! made behind the daemon's back (`ip link set vif3.0 down`) are seen as well as its own.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

mod daemon;
pub mod guest;
mod kernel;
mod kernel_error;
mod monitor;
pub mod netns;
mod service;
mod shape;
mod spoof;
#[cfg(test)]
mod testutil;

pub use daemon::{DaemonArgs, enter_namespace, run_daemon};
pub use service::{DEFAULT_MAX_BRIDGES, DEFAULT_MAX_VIFS, DEFAULT_MTU, Netlink, NetworkConfig};

/// A guest's network device: the guest's domain id and the device's number (`3.0`, the link
/// `vif3.0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VifId {
    /// The guest's domain id.
    pub domid: u32,
    /// The device's number within the guest.
    pub devid: u32,
}

impl VifId {
    /// The name of this domain's end: `vif<domid>.<devid>` (at most 15 bytes, as every link
    /// name: domain ids below 32,768 and device numbers below 10,000 fit).
    pub fn link_name(&self) -> String {
        format!("vif{}.{}", self.domid, self.devid)
    }

    /// The vif whose end in this domain is the link `name`, if it is one's.
    pub fn from_link_name(name: &str) -> Option<VifId> {
        name.strip_prefix("vif")?.parse().ok()
    }

    /// The name of the guest's end of a veth vif, in the guest's namespace: `eth<devid>`.
    pub fn guest_name(&self) -> String {
        format!("eth{}", self.devid)
    }
}

impl fmt::Display for VifId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.domid, self.devid)
    }
}

impl FromStr for VifId {
    type Err = String;

    /// `DOMID.DEVID` (`3.0`): both decimal, the domain id below 32,768 (Xen's domain ids), the
    /// device number below 10,000 (so that the link's name fits the kernel's 15 bytes).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a vif (DOMID.DEVID, as 3.0)");
        let (d, n) = s.split_once('.').ok_or_else(bad)?;
        let num = |t: &str, max: u32| {
            (!t.is_empty() && t.len() <= 5 && t.bytes().all(|b| b.is_ascii_digit()))
                .then(|| t.parse::<u32>().ok())
                .flatten()
                .filter(|v| *v < max)
        };
        Ok(VifId { domid: num(d, 32_768).ok_or_else(bad)?, devid: num(n, 10_000).ok_or_else(bad)? })
    }
}

impl Serialize for VifId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VifId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A MAC address, `00:16:3e:12:34:56` on the wire and the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The address Xen's `vif-bridge` gives the backend's end of every vif, so that a bridge
    /// never takes it as its own.
    pub const BACKEND: Mac = Mac([0xfe, 0xff, 0xff, 0xff, 0xff, 0xff]);

    /// A random address in Xen's range (`00:16:3e`), as `xl` gives a vif without one.
    pub fn random_xen() -> Mac {
        let mut b = [0u8; 3];
        let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
        Mac([0x00, 0x16, 0x3e, b[0] & 0x7f, b[1], b[2]])
    }

    /// A random, locally administered unicast address: a bridge's own, so that it never takes
    /// one of its ports' (the kernel gives a bridge without a set address its lowest port's).
    pub fn random_local() -> Mac {
        let mut b = [0u8; 6];
        let _ = rustix::rand::getrandom(&mut b, rustix::rand::GetRandomFlags::empty());
        b[0] = (b[0] & 0xfc) | 0x02;
        Mac(b)
    }

    /// Why this address cannot be a device's own: multicast (and broadcast), or all zeros.
    pub fn unusable(&self) -> Option<&'static str> {
        if self.0[0] & 1 == 1 {
            Some("a multicast address")
        } else if self.0 == [0; 6] {
            Some("all zeros")
        } else {
            None
        }
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

impl FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a MAC address (six hex bytes: 00:16:3e:12:34:56)");
        let mut out = [0u8; 6];
        let mut parts = s.split([':', '-']);
        for byte in &mut out {
            let p = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A rate limit on what a guest sends through a vif, as netback's `rate` key: `bytes` per
/// second, in credits of `bytes × interval` (the largest burst). `10M/s@50ms` on the wire and
/// the command line: a size (`K`, `M`, `G`: powers of 1,024; bytes without a unit) per second,
/// and an interval in `ms` or `us` (50 ms when left out, Xen's default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Bytes per second (at least 1,024).
    pub bytes_per_sec: u64,
    /// The credit interval, microseconds (1 ms to 10 s).
    pub interval_us: u32,
}

impl Rate {
    /// Xen's default credit interval: 50 ms.
    pub const DEFAULT_INTERVAL_US: u32 = 50_000;

    /// The largest burst: the credit of one interval, bytes.
    pub fn burst_bytes(&self) -> u64 {
        self.bytes_per_sec.saturating_mul(u64::from(self.interval_us)) / 1_000_000
    }

    /// Why this rate cannot be applied, if it cannot.
    pub fn invalid(&self) -> Option<String> {
        if self.bytes_per_sec < 1024 {
            Some(format!("{} bytes/s is below the least rate, 1K/s", self.bytes_per_sec))
        } else if !(1_000..=10_000_000).contains(&self.interval_us) {
            Some(format!("an interval of {} us is not within 1 ms to 10 s", self.interval_us))
        } else if self.burst_bytes() > u64::from(u32::MAX) {
            Some("the burst (rate × interval) exceeds 4 GiB".into())
        } else {
            None
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Exact, as it travels on the wire: the largest unit that divides it, else bytes.
        let b = self.bytes_per_sec;
        match [(30, "G"), (20, "M"), (10, "K")]
            .into_iter()
            .find(|(shift, _)| b != 0 && b % (1u64 << shift) == 0)
        {
            Some((shift, unit)) => write!(f, "{}{unit}/s@", b >> shift)?,
            None => write!(f, "{b}/s@")?,
        }
        if self.interval_us % 1000 == 0 {
            write!(f, "{}ms", self.interval_us / 1000)
        } else {
            write!(f, "{}us", self.interval_us)
        }
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| format!("{s:?} is not a rate ({why}; as 10M/s or 10M/s@20ms)");
        let (rate, interval) = match s.split_once('@') {
            Some((r, i)) => (r, Some(i)),
            None => (s, None),
        };
        let amount = rate.strip_suffix("/s").ok_or_else(|| bad("no /s"))?;
        let bytes_per_sec = amount.parse::<dombus::Size>().map_err(|e| bad(&e.to_string()))?.bytes();
        let interval_us = match interval {
            None => Rate::DEFAULT_INTERVAL_US,
            Some(i) => {
                let (n, scale) = if let Some(n) = i.strip_suffix("ms") {
                    (n, 1000)
                } else if let Some(n) = i.strip_suffix("us") {
                    (n, 1)
                } else {
                    return Err(bad("the interval needs ms or us"));
                };
                n.parse::<u32>()
                    .ok()
                    .and_then(|n| n.checked_mul(scale))
                    .ok_or_else(|| bad("a bad interval"))?
            }
        };
        Ok(Rate { bytes_per_sec, interval_us })
    }
}

impl Serialize for Rate {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a vif is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VifKind {
    /// A veth pair, the guest's end in the guest's network namespace.
    #[default]
    Veth,
    /// A tap, for a device model to open by name.
    Tap,
}

/// A link's operational state, as the kernel reports it (`IFLA_OPERSTATE`, RFC 2863).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OperState {
    /// Up: it can pass packets.
    Up,
    /// Down (set down, or no carrier).
    Down,
    /// Down because a link under it is (a veth whose peer is down).
    LowerLayerDown,
    /// Waiting for something outside (802.1X).
    Dormant,
    /// In a test mode.
    Testing,
    /// Its hardware is missing.
    NotPresent,
    /// The driver does not say (a bridge without ports, `lo`).
    Unknown,
}

/// What was counted on this domain's end of a vif (so `rx` is what the guest sent): the
/// kernel's counters, and the anti-spoofing rules' drops.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Counters {
    /// Bytes received from the guest.
    pub rx_bytes: u64,
    /// Packets received from the guest.
    pub rx_packets: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Packets received and dropped.
    pub rx_dropped: u64,
    /// Bytes sent to the guest.
    pub tx_bytes: u64,
    /// Packets sent to the guest.
    pub tx_packets: u64,
    /// Transmit errors.
    pub tx_errors: u64,
    /// Packets to the guest dropped.
    pub tx_dropped: u64,
    /// Packets from the guest its anti-spoofing rules dropped.
    pub spoofed_dropped: u64,
}

/// A bridge of the network domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BridgeInfo {
    /// Its name.
    pub name: String,
    /// Its MTU, bytes.
    pub mtu: u32,
    /// Its MAC address.
    pub mac: Option<Mac>,
    /// Whether it is set up.
    pub up: bool,
    /// Its operational state.
    pub state: OperState,
    /// The links attached to it, by name.
    pub members: Vec<String>,
}

/// A vif as the network domain holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VifInfo {
    /// Which guest device it is.
    pub vif: VifId,
    /// This domain's end (`vif3.0`).
    pub name: String,
    /// What it is made of.
    pub kind: VifKind,
    /// The guest's MAC address (its end's, for a veth).
    pub mac: Option<Mac>,
    /// Its MTU, bytes.
    pub mtu: u32,
    /// The bridge it is attached to.
    pub bridge: Option<String>,
    /// Whether this domain's end is set up.
    pub up: bool,
    /// This domain's end's operational state.
    pub state: OperState,
    /// The only source addresses it lets the guest send from (every address when empty).
    pub addresses: Vec<IpAddr>,
    /// The limit on what the guest sends.
    pub rate: Option<Rate>,
    /// The guest's network namespace (a veth's other end is `eth<devid>` in it).
    pub guest_netns: Option<String>,
}

/// The state a subscriber starts from: every bridge and vif.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetworkState {
    /// The bridges, by name.
    pub bridges: Vec<BridgeInfo>,
    /// The vifs, by id.
    pub vifs: Vec<VifInfo>,
}

/// A change to the bridges and vifs of the network domain, through the service or behind its
/// back ([`Network::events`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkEvent {
    /// A bridge appeared.
    BridgeAdded(BridgeInfo),
    /// A bridge's state, MTU, address or members changed: as it is now.
    BridgeChanged(BridgeInfo),
    /// A bridge went away.
    BridgeRemoved {
        /// Its name.
        name: String,
    },
    /// A vif appeared.
    VifAdded(VifInfo),
    /// A vif's state, MTU, address, bridge, addresses or rate changed: as it is now.
    VifChanged(VifInfo),
    /// A vif went away.
    VifRemoved {
        /// Which it was.
        vif: VifId,
    },
}

/// Why a network call failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum NetworkError {
    /// No bridge or vif of that name.
    #[error("no {what} {name:?}")]
    NotFound {
        /// `bridge` or `vif`.
        what: String,
        /// The name asked for.
        name: String,
    },
    /// A link of that name exists already.
    #[error("{name:?} already exists")]
    AlreadyExists {
        /// The name.
        name: String,
    },
    /// The bridge still has members (detach or delete its vifs first).
    #[error("bridge {name:?} is busy: {members:?} attached")]
    Busy {
        /// The bridge.
        name: String,
        /// What is attached to it.
        members: Vec<String>,
    },
    /// A name that cannot be a bridge's (1 to 15 bytes of `A-Z a-z 0-9 _ -`, not `vif…`).
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// Why.
        reason: String,
    },
    /// An MTU the link cannot have.
    #[error("invalid MTU {mtu}: {reason}")]
    InvalidMtu {
        /// The MTU given.
        mtu: u32,
        /// Why.
        reason: String,
    },
    /// A MAC address a device cannot have.
    #[error("invalid MAC address {mac}: {reason}")]
    InvalidMac {
        /// The address given.
        mac: Mac,
        /// Why.
        reason: String,
    },
    /// An address that cannot be a guest's (multicast, unspecified).
    #[error("invalid address {address}: {reason}")]
    InvalidAddress {
        /// The address given.
        address: String,
        /// Why.
        reason: String,
    },
    /// A rate that cannot be applied.
    #[error("invalid rate {rate}: {reason}")]
    InvalidRate {
        /// The rate given.
        rate: String,
        /// Why.
        reason: String,
    },
    /// The caller may not do this (only the toolstack manages the network), or the daemon
    /// lacks the privilege for it.
    #[error("permission denied: {operation}: {reason}")]
    PermissionDenied {
        /// What was refused.
        operation: String,
        /// Why.
        reason: String,
    },
    /// What the call asks does not apply (a rate on a tap).
    #[error("unsupported: {reason}")]
    Unsupported {
        /// Why.
        reason: String,
    },
    /// The kernel refused an operation: which, and its error.
    #[error("{operation}: the kernel said: {message} (errno {errno})")]
    Kernel {
        /// What was asked of it (`RTM_NEWLINK bridge xenbr0`).
        operation: String,
        /// Its error number.
        errno: i32,
        /// Its text.
        message: String,
    },
    /// The service holds as many of these as it may.
    #[error("too many {what}: at most {limit}")]
    TooMany {
        /// What (`vifs`, `bridges`).
        what: String,
        /// The bound.
        limit: u64,
    },
    /// A tool the service runs failed (`nft`).
    #[error("{tool} failed: {message}")]
    ToolFailed {
        /// Which tool.
        tool: String,
        /// What it said.
        message: String,
    },
}

/// The bridges and vifs of a network driver domain.
#[dombus::service(name = "network", version = 1)]
pub trait Network {
    /// Creates the bridge `name` (MTU 1500 unless `mtu`), up.
    async fn bridge_create(&self, name: String, mtu: Option<u32>) -> Result<BridgeInfo, NetworkError>;

    /// Deletes the bridge `name` (refused while links are attached to it).
    async fn bridge_delete(&self, name: String) -> Result<(), NetworkError>;

    /// Every bridge, with its members, MTU and state.
    #[idempotent]
    async fn bridge_list(&self) -> Result<Vec<BridgeInfo>, NetworkError>;

    /// Creates the vif `vif` (a veth pair unless `kind` says tap) with the guest's MAC address
    /// `mac` (a random one of Xen's range by default), attached to `bridge` if given, with the
    /// bridge's MTU unless `mtu` (1500 without a bridge); this domain's end is up.
    async fn vif_create(
        &self,
        vif: VifId,
        kind: Option<VifKind>,
        bridge: Option<String>,
        mac: Option<Mac>,
        mtu: Option<u32>,
    ) -> Result<VifInfo, NetworkError>;

    /// Deletes the vif `vif` (both ends, its rules and its rate).
    async fn vif_delete(&self, vif: VifId) -> Result<(), NetworkError>;

    /// Attaches the vif `vif` to the bridge `bridge` (moving it from another).
    #[idempotent]
    async fn vif_attach(&self, vif: VifId, bridge: String) -> Result<VifInfo, NetworkError>;

    /// Detaches the vif `vif` from its bridge.
    #[idempotent]
    async fn vif_detach(&self, vif: VifId) -> Result<VifInfo, NetworkError>;

    /// Sets the guest's MAC address of the vif `vif`.
    #[idempotent]
    async fn vif_set_mac(&self, vif: VifId, mac: Mac) -> Result<VifInfo, NetworkError>;

    /// Sets the MTU of both ends of the vif `vif`.
    #[idempotent]
    async fn vif_set_mtu(&self, vif: VifId, mtu: u32) -> Result<VifInfo, NetworkError>;

    /// Sets this domain's end of the vif `vif` up (`up`) or down.
    #[idempotent]
    async fn vif_set_up(&self, vif: VifId, up: bool) -> Result<VifInfo, NetworkError>;

    /// Lets only the source addresses `addresses` leave the vif `vif` (every address when
    /// empty), as Xen's anti-spoofing rules do.
    #[idempotent]
    async fn vif_set_addresses(&self, vif: VifId, addresses: Vec<IpAddr>) -> Result<VifInfo, NetworkError>;

    /// Limits what the guest sends through the vif `vif` to `rate` (`10M/s@50ms`), or lifts
    /// the limit when `rate` is left out.
    #[idempotent]
    async fn vif_set_rate(&self, vif: VifId, rate: Option<Rate>) -> Result<VifInfo, NetworkError>;

    /// What the vif `vif` is: kind, MAC, MTU, bridge, state, addresses, rate.
    #[idempotent]
    async fn vif_info(&self, vif: VifId) -> Result<VifInfo, NetworkError>;

    /// Every vif (of the guest domain `guest` only, if given), by id.
    #[idempotent]
    async fn vif_list(&self, guest: Option<u32>) -> Result<Vec<VifInfo>, NetworkError>;

    /// What the kernel counted on this domain's end of the vif `vif`, and the packets its
    /// anti-spoofing rules dropped.
    #[idempotent]
    async fn vif_counters(&self, vif: VifId) -> Result<Counters, NetworkError>;

    /// Every change to the bridges and vifs, as it happens (also behind the service's back); a
    /// resync's snapshot is every bridge and vif now.
    async fn events(&self) -> dombus::Events<NetworkEvent, NetworkState>;
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use proptest::prelude::*;

    use super::*;

    /// A vif's id: `DOMID.DEVID` both ways, its link's name both ways, and everything else
    /// refused (a name the kernel could not take, a domain id Xen has not).
    #[test]
    fn vif_ids_are_read_and_written_as_domid_dot_devid() {
        let v: VifId = "3.0".parse().unwrap();
        assert_eq!(
            (v, v.to_string(), v.link_name(), v.guest_name()),
            (VifId { domid: 3, devid: 0 }, "3.0".into(), "vif3.0".into(), "eth0".into())
        );
        assert_eq!(VifId::from_link_name("vif32767.9999"), Some(VifId { domid: 32767, devid: 9999 }));
        assert!(VifId { domid: 32767, devid: 9999 }.link_name().len() <= 15);
        for bad in [
            "",
            "3",
            "3.",
            ".0",
            "3.0.1",
            "-1.0",
            "+3.0",
            "32768.0",
            "3.10000",
            "03a.0",
            " 3.0",
            "3.0 ",
            "99999999999.0",
        ] {
            assert!(bad.parse::<VifId>().is_err(), "{bad:?}");
        }
        assert_eq!(VifId::from_link_name("xenbr0"), None);
        assert_eq!(VifId::from_link_name("vif3"), None);
        assert_eq!(serde_json::to_string(&v).unwrap(), r#""3.0""#);
        assert!(serde_json::from_str::<VifId>(r#""3.x""#).is_err());
    }

    /// MAC addresses: six hex bytes with `:` or `-`, written lower case with `:`; which a device
    /// may not have.
    #[test]
    fn mac_addresses_are_read_written_and_judged() {
        let m: Mac = "00:16:3E:0a:0b:0c".parse().unwrap();
        assert_eq!(m.to_string(), "00:16:3e:0a:0b:0c");
        assert_eq!("00-16-3e-0a-0b-0c".parse::<Mac>().unwrap(), m);
        for bad in [
            "",
            "00:16:3e:0a:0b",
            "00:16:3e:0a:0b:0c:0d",
            "0:16:3e:0a:0b:0c",
            "00:16:3e:0a:0b:zz",
            "001:6:3e:0a:0b:0c",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad:?}");
        }
        assert_eq!(m.unusable(), None);
        assert!(Mac([0x01, 0, 0x5e, 0, 0, 1]).unusable().is_some());
        assert!(Mac([0xff; 6]).unusable().is_some());
        assert!(Mac([0; 6]).unusable().is_some());
        assert_eq!(Mac::BACKEND.unusable(), None);
        let r = Mac::random_xen();
        assert_eq!((r.0[..3].to_vec(), r.unusable()), (vec![0x00, 0x16, 0x3e], None));
        let l = Mac::random_local();
        assert_eq!((l.0[0] & 0x03, l.unusable()), (0x02, None));
    }

    /// Rates as `xl` writes them: a size per second and an interval (50 ms by default); the
    /// burst is one interval's credit; what cannot be applied says why.
    #[test]
    fn rates_are_read_written_and_checked() {
        let r: Rate = "10M/s@20ms".parse().unwrap();
        assert_eq!((r.bytes_per_sec, r.interval_us, r.burst_bytes()), (10 << 20, 20_000, (10 << 20) / 50));
        assert_eq!(r.to_string(), "10M/s@20ms");
        assert_eq!("1M/s".parse::<Rate>().unwrap().interval_us, Rate::DEFAULT_INTERVAL_US);
        assert_eq!("4096/s@1500us".parse::<Rate>().unwrap().to_string(), "4K/s@1500us");
        for bad in
            ["", "10M", "10M/s@", "10M/s@20", "10M/s@20s", "ten/s", "10M/s@99999999999ms", "10M/s@-1ms"]
        {
            assert!(bad.parse::<Rate>().is_err(), "{bad:?}");
        }
        assert!("1023/s".parse::<Rate>().unwrap().invalid().is_some());
        assert!("1K/s@999us".parse::<Rate>().unwrap().invalid().is_some());
        assert!("1K/s@10001ms".parse::<Rate>().unwrap().invalid().is_some());
        assert!("1K/s@10000ms".parse::<Rate>().unwrap().invalid().is_none());
        assert!(
            Rate { bytes_per_sec: u64::MAX, interval_us: 10_000_000 }.invalid().is_some(),
            "a burst beyond 4 GiB"
        );
        assert!(Rate { bytes_per_sec: u64::MAX, interval_us: 1_000 }.burst_bytes() > 0, "no overflow");
    }

    proptest! {
        /// Any string either is refused or reads as a value that writes back and reads the same.
        #[test]
        fn parsers_never_panic_and_round_trip(s in "\\PC{0,24}") {
            if let Ok(v) = s.parse::<VifId>() {
                prop_assert_eq!(v.to_string().parse::<VifId>().unwrap(), v);
            }
            if let Ok(m) = s.parse::<Mac>() {
                prop_assert_eq!(m.to_string().parse::<Mac>().unwrap(), m);
            }
            if let Ok(r) = s.parse::<Rate>() {
                prop_assert_eq!(r.to_string().parse::<Rate>().unwrap(), r);
            }
        }

        /// Every value writes as a string that reads back as itself.
        #[test]
        fn values_round_trip(domid in 0u32..32_768, devid in 0u32..10_000, mac in any::<[u8; 6]>(),
                             kib in 1u64..(1 << 30), interval_us in 1_000u32..10_000_000) {
            let v = VifId { domid, devid };
            prop_assert_eq!(v.to_string().parse::<VifId>().unwrap(), v);
            prop_assert_eq!(VifId::from_link_name(&v.link_name()), Some(v));
            prop_assert_eq!(Mac(mac).to_string().parse::<Mac>().unwrap(), Mac(mac));
            let r = Rate { bytes_per_sec: kib << 10, interval_us };
            prop_assert_eq!(r.to_string().parse::<Rate>().unwrap(), r);
        }
    }
}
