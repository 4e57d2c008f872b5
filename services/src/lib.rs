//! dombus services: the traits service domains offer the toolstack, their implementations on
//! real tools, and the daemons hosting them.
//!
//! * [`storage`]: disk images on `qemu-img` (`dombus-storaged`).
//! * [`registry`]: who runs what on the host, kept by the backend domain.

pub mod registry;
pub mod storage;

/// Well-known virtual-socket ports of the services in a service domain (`xen:<domid>:<port>`).
pub mod ports {
    /// The storage service.
    pub const STORAGE: u32 = 5100;
    /// The host registry, in the backend domain (`xen:backend:1`; a privileged port).
    pub const REGISTRY: u32 = 1;
}
