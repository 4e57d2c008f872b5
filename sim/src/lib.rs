//! dombus-sim: a simulated hypervisor, a transport-xen backend like `xen`: Xen's grant,
//! event-channel and store semantics between real processes and real shared memory, for tests,
//! benches and demos on machines without Xen.
//!
//! ```no_run
//! # fn demo() -> Result<(), dombus_transport_xen::backend::BackendError> {
//! use dombus_sim::{SimBackend, SimHypervisor};
//! use dombus_transport_xen::{backend::{Backend, Store}, types::DomId};
//! // The hypervisor, in a thread of this process (or as the `dombus-simxen` program).
//! let hv = SimHypervisor::spawn("/tmp/hv.sock".as_ref()).map_err(|e| dombus_transport_xen::backend::BackendError::io("spawn", e))?;
//! // As the toolstack: create domain 1 and attach as it (a process started for the domain
//! // would attach with the token instead: `SimBackend::attach`).
//! let dom1 = SimBackend::boot(hv.socket(), Some(DomId(1)))?;
//! dom1.store().write("data/hello", b"world")?;
//! # Ok(()) }
//! ```
//!
//! A daemon ([`SimHypervisor`], program `dombus-simxen` in dombus-tools) plays the hypervisor and
//! xenstored.
//! Each domain is a process (or, in tests, a [`SimBackend`] in-process) connected over a Unix
//! `SOCK_SEQPACKET` socket; see [`proto`] for the messages.
//!
//! * **Grants.** `share_pages` makes the daemon create a sealed memfd, one grant ref per page in
//!   the granter's own table (refs start at 8), and pass the memfd to the granter. `map_grants`
//!   checks every ref (unknown: `NotFound`; granted to another domain, or read-only and asked
//!   writable: `PermissionDenied`) and passes the memfds (reopened read-only for read-only
//!   maps); the mapper maps each page `MAP_FIXED` into one reserved area, so the result is one
//!   contiguous [`Region`](dombus_transport_xen::shmem::Region). Data never passes through the daemon.
//! * **Event channels.** A handle is an epoll fd; each port is an eventfd made by the daemon.
//!   The two eventfds of a channel belong to the channel, not to one binding: a port receives on
//!   its own eventfd and signals by writing the one its peer receives on, which it holds from the
//!   moment the port exists. So `notify` is one uncontended lock and one `write(2)`, never asks
//!   the daemon, and can never write a stale eventfd: when the peer closes and another domain
//!   binds, the new peer receives on the same eventfd (which the daemon drains at bind time, so
//!   events sent while the port was unbound are dropped, as on Xen). `pending` clears the
//!   port's eventfd; `unmask` is a no-op: events are never lost, only coalesced.
//! * **Store.** xenstored's permission, quota and watch rules ([`store`]).
//!   [`xenstored`] serves the same model over the xenstore wire protocol, for testing the real
//!   xenstore client.
//! * **Death** (the connection closes: process exit, or every `SimBackend` clone and object
//!   dropped), in this order: (1) the unmap notifications the domain registered are performed
//!   (the daemon clears the byte through its own memfd and signals the peer of the port);
//!   (2) its event channels close: each peer port returns to unbound and gets one final event;
//!   (3) its watches go; (4) `/local/domain/<id>` is removed and `@releaseDomain` fires;
//!   (5) its grants are revoked (mappings other domains hold stay valid).
//! * **Identity.** No process picks its domain id: the toolstack, holding the key the daemon
//!   writes beside its socket ([`SimHypervisor::key_path`], mode 0600 like the socket), creates a
//!   domain ([`SimBackend::create_domain`]) and hands the process a one-time token to attach with
//!   ([`SimBackend::attach`], [`TOKEN_ENV`]); the key itself attaches as domain 0.
//! * **Migration.** The toolstack migrates a domain ([`SimBackend::migrate`]): the daemon stops
//!   acting on the attachment's requests (the freeze), ends the old id exactly as a death, and
//!   introduces the name under a new id; the old attachment alone gets the new id and a
//!   one-time token as its connection's last message. Its process learns it without polling
//!   ([`SimBackend::ended_fd`], [`SimBackend::wait_ended`]), every later operation of the old
//!   attachment fails with [`BackendError::Migrated`](dombus_transport_xen::backend::BackendError::Migrated),
//!   and [`SimBackend::resume`] attaches as the new id.
//! * **Robustness.** Every message is capped at [`proto::MAX_MSG`]; bad requests get an error
//!   reply; undecodable or oversize messages disconnect only that domain. Outbound messages go
//!   through a queue per domain bounded in messages and bytes; a domain that stops reading is
//!   disconnected. What one domain may make the daemon hold (mapped pages, descriptors) is
//!   bounded per domain (docs/bounds.md).

mod client;
mod daemon;
mod fdpass;
mod mem;
pub mod proto;
pub mod store;
mod token;
pub mod xenstored;

pub use client::{
    Ended, SimBackend, SimEvtchn, SimMappedPages, SimSharedPages, SimStore, SimWatch, TOKEN_ENV,
};
pub use daemon::{
    MAX_DOM0_FDS, MAX_DOMAIN_FDS, MAX_GRANTS, MAX_PORTS, QUEUE_BYTES, QUEUE_LEN, SimHypervisor,
    SimHypervisorHandle, SimStopper, fd_limit,
};
