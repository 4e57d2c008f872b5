//! Names for the things Xen hands out: domains, grant references, event-channel ports.

use std::fmt;

/// A Xen domain id (`domid_t`, 16 bits).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct DomId(pub u16);

impl DomId {
    /// Domain 0, the privileged toolstack domain.
    pub const DOM0: DomId = DomId(0);
    /// `DOMID_SELF`: "the calling domain" (also the vsock CID of the local domain).
    pub const SELF: DomId = DomId(0x7FF0);
    /// `DOMID_INVALID`: no domain (e.g. a connection not yet attached as one).
    pub const INVALID: DomId = DomId(0x7FF4);
    /// Largest id a real (guest) domain can have; ids above are reserved by Xen.
    pub const MAX_GUEST: DomId = DomId(0x7FEF);

    /// True for ids a real domain can have (not one of Xen's reserved ids).
    pub fn is_guest_id(self) -> bool {
        self.0 <= Self::MAX_GUEST.0
    }
}

impl fmt::Debug for DomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dom{}", self.0)
    }
}

impl std::str::FromStr for DomId {
    type Err = std::num::ParseIntError;

    /// A domain id in decimal (`0` to `65535`; whether it names a guest is [`DomId::is_guest_id`]).
    fn from_str(s: &str) -> Result<DomId, Self::Err> {
        s.parse().map(DomId)
    }
}

impl fmt::Display for DomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A grant reference: an index into the *granting* domain's grant table.
///
/// A reference is meaningful only together with the domain that issued it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, serde::Serialize, serde::Deserialize)]
pub struct GrantRef(pub u32);

impl fmt::Display for GrantRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// An event-channel port, local to the domain that holds it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, serde::Serialize, serde::Deserialize)]
pub struct EvtchnPort(pub u32);

impl fmt::Display for EvtchnPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Size of a Xen page, the unit of granting.
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
