//! dombus: typed RPC between Xen domains over virtual sockets.
//!
//! Service authors write a trait and mark it [`service`]; everything else is generated: the
//! typed client, the server dispatch, a descriptor, stable method identity on the wire and CLI
//! glue. Calls travel over any transport of [`rpc`] — Xen link sockets (`xen:`), AF_VSOCK
//! (`vsock:`), Unix or TCP. See `docs/codegen.md` for a service from trait to CLI call.
//!
//! ```
//! #[dombus::service(version = 1)]
//! pub trait Greeter {
//!     /// Says hello to `name`.
//!     #[idempotent]
//!     async fn hello(&self, name: String) -> String;
//! }
//! ```

pub use dombus_codegen::service;
pub use dombus_rpc as rpc;
pub use dombus_rpc::events::{Cursor, Events, ResyncReason, Subscription, Topic, TopicLimits, Update};
pub use dombus_rpc::{Address, Client, ClientConfig, Net, RpcError, Server, ServerConfig, Size};
pub use dombus_sim as sim;
pub use dombus_transport_xen as transport;

/// tarpc's call context (deadline, trace): every generated client method takes one.
pub mod context {
    pub use dombus_rpc::current_context;
    pub use tarpc::context::{Context, current};
}

/// What generated code refers to, so that a service crate needs only `dombus` as a dependency.
#[doc(hidden)]
pub mod __private {
    #[cfg(feature = "cli")]
    pub use clap;
    pub use serde;
    pub use serde_bytes;
    #[cfg(feature = "cli")]
    pub use serde_json;
    pub use tarpc;
}
