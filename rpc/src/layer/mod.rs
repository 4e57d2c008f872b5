//! The call policies of the client's and the server's tower stacks, each a [`tower::Layer`]:
//! per-method [`Metrics`](crate::Metrics) ([`metrics`]), a tracing span around each call
//! ([`trace`]) and, on the client, the mapping of a connection lost under a call that is not
//! idempotent ([`connection_lost`]); on the server, the refusal of calls past the concurrency
//! limit ([`shed`]). Each wraps its inner service's future in a small
//! pin-projected one: no allocation per call.

pub mod connection_lost;
pub mod metrics;
pub mod shed;
pub mod trace;

pub use connection_lost::{ConnectionLostLayer, MayRetry};
pub use metrics::{CallName, MetricsLayer};
pub use shed::ShedLayer;
pub use trace::TraceLayer;
