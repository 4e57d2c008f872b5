//! Virtual sockets on a link (issue 3, in progress): addressing and the packet header.
//!
//! Many connections between two domains share one link; each packet names its source and
//! destination port. This module holds the parts that are complete and tested on their own:
//! [`VsockAddr`] and the wire header ([`packet`]). The per-connection state machine with
//! credit flow control, the multiplexer and the async `Listener`/`connect` API arrive next.

mod addr;
pub mod packet;

pub use addr::{AddrParseError, CID_BACKEND, CID_SELF, FIRST_UNPRIVILEGED_PORT, VsockAddr};
