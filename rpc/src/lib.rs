//! dombus RPC: typed calls ([tarpc]) over any byte-stream transport — transport-xen virtual
//! sockets (`xen:`), AF_VSOCK (`vsock:`), Unix and TCP — with a connection preamble, a
//! swappable codec, frame limits, tower client and server stacks (deadlines, retries of
//! idempotent calls, concurrency limits, load shedding, tracing spans and metrics as tower
//! layers), Prometheus metrics (a built-in call, and a scrape endpoint for daemons). Calls keep
//! tarpc's messages and programming model but, by default, not its channel: [`CallPath`].
//! See `docs/rpc.md`. The command-line glue (module `cli`) is built with the `cli` feature.
//!
//! Typed clients and services come from `#[dombus::service]`; underneath, any server answers
//! the built-in calls through a [`RawClient`]:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use dombus_rpc::{Address, ClientConfig, Net, RawClient};
//! let addr: Address = "xen:2:5100".parse()?; // or vsock:, unix:, tcp:
//! let client = RawClient::new(Net::new(), addr, "storage", ClientConfig::default());
//! let ctx = tarpc::context::current();
//! client.ping(ctx).await?;
//! for service in client.describe(ctx).await? {
//!     println!("{} v{}", service.name, service.version);
//! }
//! print!("{}", client.metrics(ctx).await?); // Prometheus text
//! # Ok(()) }
//! ```

pub mod addr;
#[cfg(feature = "cli")]
pub mod cli;
pub mod client;
pub mod codec;
mod direct;
pub mod envelope;
pub mod events;
mod in_flight;
pub mod layer;
pub mod metrics;
pub mod preamble;
pub mod scrape;
pub mod server;
pub mod size;
pub mod transport;
pub mod wire;

pub use addr::{Address, AddressError, XenAddrError};
pub use client::{Client, ClientConfig, ConnectionLost, RawClient, connection_lost, describe};
pub use codec::Codec;
pub use direct::CallPath;
pub use metrics::{ConnectionStats, Metrics};
pub use preamble::{TooManyConnections, too_many_connections};
pub use scrape::ScrapeEndpoint;
pub use server::{ServeHandle, Server, ServerConfig, is_overloaded};
pub use size::Size;
/// Why a call failed (tarpc's): see [`error_text`] for the whole story of one.
pub use tarpc::client::RpcError;
pub use transport::{Accepted, BoxStream, Listener, Net};
pub use wire::{
    Dispatch, Request, Service, ServiceDescriptor, current_caller, current_context, error_text,
    is_unknown_method,
};
