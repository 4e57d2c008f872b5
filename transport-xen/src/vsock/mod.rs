//! Virtual sockets: many connections between two domains over one link.
//!
//! Each packet names its source and destination port. Here: [`VsockAddr`], the wire header ([`packet`]), the sans-IO [`session`]
//! of all connections on a link with credit flow control, and its tokio shell over one link
//! ([`mux`]), and [`domain::VsockDomain`]: connections between any two domains, one link per
//! pair set up on demand through the store, where a domain that cannot set up its half of a link
//! tells the waiting peer why ([`setup_failure`]). A connection whose link is gone fails with a
//! [`TransportReset`].

mod addr;
pub mod domain;
pub mod introduce;
pub mod mux;
pub mod packet;
pub mod reset;
mod rx;
pub mod session;
pub mod setup_failure;

pub use addr::{CID_BACKEND, CID_SELF, FIRST_UNPRIVILEGED_PORT, VsockAddr};
pub use introduce::{Gate, LinkSetUp};
pub use reset::{TransportReset, is_transport_reset, transport_reset};
pub use setup_failure::PeerSetupFailed;
