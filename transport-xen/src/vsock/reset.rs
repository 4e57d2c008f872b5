//! The transport reset: the error every connection of a link reports once the link is gone
//! because a domain at either end died, was migrated, or let the link go.
//!
//! A reset arrives as an [`io::Error`] of kind [`io::ErrorKind::ConnectionAborted`] (the
//! transport under the connection ended it, as `ECONNABORTED` says) carrying a
//! [`TransportReset`]; [`is_transport_reset`] tells it apart from every other error. A
//! connection reset by a live peer (its `RST`) stays `ConnectionReset` without it, and a peer
//! that broke the protocol stays [`MuxError::Violation`](super::mux::MuxError::Violation) or
//! [`MuxError::LinkViolation`](super::mux::MuxError::LinkViolation): neither is a reset.
//!
//! What to do with one: the connection is gone and whatever was in flight on it may or may
//! not have been delivered; connect again (the peer's domain may have a new id after a
//! migration: resolve its address again) and re-issue only what is safe to repeat.

use std::io;

use crate::types::DomId;

/// The link a connection ran over is gone: the domain at the other end (or this one) died, was
/// migrated, or closed the link. Carried inside the connection's `io::Error`
/// (kind `ConnectionAborted`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("transport reset: the link to domain {peer} is gone ({why})")]
pub struct TransportReset {
    /// The domain at the other end of the link (its id when the link was set up).
    pub peer: DomId,
    /// What ended the link, for people.
    pub why: String,
}

impl From<TransportReset> for io::Error {
    fn from(reset: TransportReset) -> io::Error {
        io::Error::new(io::ErrorKind::ConnectionAborted, reset)
    }
}

/// The transport reset inside `e`, if it is one: `e`'s payload, or any error in its source
/// chain (so that a layer that wraps the error keeps it recognisable).
pub fn transport_reset(e: &io::Error) -> Option<&TransportReset> {
    let mut next = e.get_ref().map(|inner| inner as &(dyn std::error::Error + 'static));
    // Bounded: a source chain is finite, but a buggy error type could loop.
    for _ in 0..32 {
        let err = next?;
        if let Some(reset) = err.downcast_ref::<TransportReset>() {
            return Some(reset);
        }
        if let Some(io) = err.downcast_ref::<io::Error>() {
            if let Some(inner) = io.get_ref() {
                next = Some(inner);
                continue;
            }
        }
        next = err.source();
    }
    None
}

/// Whether `e` is a transport reset (see [`TransportReset`]).
pub fn is_transport_reset(e: &io::Error) -> bool {
    transport_reset(e).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_is_recognised_and_nothing_else_is() {
        let reset = TransportReset { peer: DomId(3), why: "domain 3 was migrated".into() };
        let e = io::Error::from(reset.clone());
        assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted);
        assert!(is_transport_reset(&e));
        assert_eq!(transport_reset(&e), Some(&reset));
        assert!(e.to_string().contains("domain 3"), "{e}");
        // Wrapped by a layer above, as an io::Error's payload or as another error's source,
        // it is still one.
        #[derive(Debug, thiserror::Error)]
        #[error("call failed")]
        struct CallFailed(#[source] io::Error);
        let wrapped = io::Error::other(CallFailed(io::Error::other(e)));
        assert!(is_transport_reset(&wrapped));
        assert_eq!(transport_reset(&wrapped), Some(&reset));
        // A live peer's RST, or any plain error, is not.
        assert!(!is_transport_reset(&io::Error::new(
            io::ErrorKind::ConnectionReset,
            "connection closed: Reset"
        )));
        assert!(!is_transport_reset(&io::Error::from(io::ErrorKind::ConnectionAborted)));
        assert!(!is_transport_reset(&io::Error::other("x")));
    }
}
