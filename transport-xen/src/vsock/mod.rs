//! Virtual sockets on a link (issue 3, in progress): addressing, the packet header, the session.
//!
//! Many connections between two domains share one link; each packet names its source and
//! destination port. This module holds the parts that are complete and tested on their own:
//! [`VsockAddr`], the wire header ([`packet`]) and the sans-IO [`session`] of all connections on
//! a link, with credit flow control. The tokio shell (`Listener`, `connect`) arrives next.

mod addr;
pub mod packet;
pub mod session;

pub use addr::{AddrParseError, CID_BACKEND, CID_SELF, FIRST_UNPRIVILEGED_PORT, VsockAddr};
