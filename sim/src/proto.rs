//! The wire protocol between a domain and the simulator daemon.
//!
//! Every message is one `SOCK_SEQPACKET` record of at most [`MAX_MSG`] bytes, encoded with
//! postcard, optionally carrying file descriptors (`SCM_RIGHTS`). A domain sends
//! [`ClientMsg`]s (a request id and an [`Op`]); the daemon answers each with a
//! [`ServerMsg::Reply`] carrying the same id, and pushes [`ServerMsg::Event`]s at any time.
//! Replies are self-describing (they repeat the port or handle they concern) so that the client's
//! reader thread can update its caches in exactly the order the daemon sent them.

use serde::{Deserialize, Serialize};

use dombus_transport_xen::backend::{BackendError, Perm};
use dombus_transport_xen::types::DomId;

/// Largest message either side sends or accepts, in bytes.
pub const MAX_MSG: usize = 64 * 1024;
/// Largest number of file descriptors carried by one message.
pub const MAX_FDS: usize = 250;
/// Longest token a client accepts in [`ServerMsg::Migrated`], in bytes (a token is
/// `<domid>-<64 hex digits>`).
pub const MAX_TOKEN: usize = 128;

/// A request from a domain.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientMsg {
    /// Chosen by the client; echoed in the reply.
    pub id: u64,
    /// What to do.
    pub op: Op,
}

/// Operations a domain can ask for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// Become a domain: the first message a domain sends. Reply: [`Reply::Attached`].
    Hello {
        /// A one-time token from [`Op::Create`] (the domain it names), or the toolstack key
        /// (domain 0).
        token: String,
    },
    /// Create a domain for a process to attach as; allowed on any connection that presents the
    /// toolstack key, attached or not. Reply: [`Reply::Created`].
    Create {
        /// The toolstack key (the daemon's key file, see `SimHypervisor::key_path`).
        key: String,
        /// Requested id (`None`: the lowest free id >= 1).
        domid: Option<DomId>,
        /// Its name, stored at `/local/domain/<id>/name` when it attaches.
        name: String,
    },
    /// Migrate a domain, as the toolstack (any connection that presents the key): its old id
    /// ends as a death does, the same name is introduced under a new id, and the attachment of
    /// the old id alone is told the new id and a one-time token to attach as it with
    /// ([`ServerMsg::Migrated`]). Reply: [`Reply::Migrated`].
    Migrate {
        /// The toolstack key.
        key: String,
        /// The attached guest domain to migrate.
        domid: DomId,
    },
    /// Allocate and grant pages. Reply: [`Reply::Shared`] + the memfd.
    SharePages {
        /// Domain allowed to map them.
        remote: DomId,
        /// Number of pages.
        count: u32,
        /// Whether the remote may map them writable.
        writable: bool,
    },
    /// Revoke an allocation's grants. Reply: [`Reply::Done`].
    Revoke {
        /// The allocation.
        alloc: u64,
    },
    /// Register the unmap notification of an allocation (performed by the daemon on death).
    SetShareNotify {
        /// The allocation.
        alloc: u64,
        /// Byte to clear.
        offset: u64,
        /// Port to signal.
        port: Option<u32>,
    },
    /// Map another domain's grants. Reply: [`Reply::Mapped`] + deduplicated memfds.
    MapGrants {
        /// Granting domain.
        granter: DomId,
        /// Grant refs, in mapping order.
        refs: Vec<u32>,
        /// Map writable.
        writable: bool,
    },
    /// Forget a mapping (the client unmapped it). Reply: [`Reply::Done`].
    Unmap {
        /// The mapping.
        map: u64,
    },
    /// Register the unmap notification of a mapping (performed by the daemon on death).
    SetMapNotify {
        /// The mapping.
        map: u64,
        /// Byte to clear.
        offset: u64,
        /// Port to signal.
        port: Option<u32>,
    },
    /// Allocate an unbound port for `remote`. Reply: [`Reply::Port`] + two eventfds.
    BindUnbound {
        /// Client-side event-channel handle the port belongs to.
        handle: u64,
        /// Domain that may bind to it.
        remote: DomId,
    },
    /// Bind to `remote`'s unbound port. Reply: [`Reply::Port`] + two eventfds.
    BindInterdomain {
        /// Client-side event-channel handle the port belongs to.
        handle: u64,
        /// Remote domain.
        remote: DomId,
        /// Its unbound port.
        remote_port: u32,
    },
    /// Close a port. Reply: [`Reply::Unbound`].
    Unbind {
        /// Local port.
        port: u32,
    },
    /// Store read. Reply: [`Reply::Value`].
    Read {
        /// Path.
        path: String,
    },
    /// Store write. Reply: [`Reply::Done`].
    Write {
        /// Path.
        path: String,
        /// Value.
        value: Vec<u8>,
    },
    /// Store mkdir. Reply: [`Reply::Done`].
    Mkdir {
        /// Path.
        path: String,
    },
    /// Store rm. Reply: [`Reply::Done`].
    Rm {
        /// Path.
        path: String,
    },
    /// Store directory. Reply: [`Reply::Names`].
    Directory {
        /// Path.
        path: String,
    },
    /// Store get_perms. Reply: [`Reply::Perms`].
    GetPerms {
        /// Path.
        path: String,
    },
    /// Store set_perms. Reply: [`Reply::Done`].
    SetPerms {
        /// Path.
        path: String,
        /// New permissions.
        perms: Vec<Perm>,
    },
    /// Register a watch with a client-chosen id. Reply: [`Reply::Done`], then events.
    Watch {
        /// Client-chosen watch id (unique per connection).
        watch: u64,
        /// Path or special name.
        path: String,
    },
    /// Remove a watch. Reply: [`Reply::Done`].
    Unwatch {
        /// The watch id.
        watch: u64,
    },
}

/// Successful results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// Nothing to return.
    Done,
    /// A domain was created: the process that will run as it attaches with `token`, once.
    Created {
        /// Its id.
        domid: DomId,
        /// The one-time token for [`Op::Hello`].
        token: String,
    },
    /// A domain was migrated (the token went to its old attachment only).
    Migrated {
        /// Its new id.
        to: DomId,
    },
    /// The domain id assigned by [`Op::Hello`].
    Attached {
        /// Assigned id.
        domid: DomId,
    },
    /// Pages allocated; the memfd is attached.
    Shared {
        /// Allocation id (for revoke / notify).
        alloc: u64,
        /// One grant ref per page.
        refs: Vec<u32>,
    },
    /// Grants mapped; the deduplicated memfds are attached.
    Mapped {
        /// Mapping id (for unmap / notify).
        map: u64,
        /// Per ref: (index of the attached fd, page index in that fd).
        pages: Vec<(u32, u32)>,
    },
    /// A port was created. Attached: the eventfd this port receives on, then the eventfd its
    /// peer receives on (write it to notify). Both belong to the channel for the port's whole
    /// life, so the second never goes stale when the peer closes or another domain binds.
    Port {
        /// Client-side handle it belongs to.
        handle: u64,
        /// The new local port.
        port: u32,
    },
    /// A port was closed.
    Unbound {
        /// The closed local port.
        port: u32,
    },
    /// A store value.
    Value(Vec<u8>),
    /// Child names.
    Names(Vec<String>),
    /// A permission list.
    Perms(Vec<Perm>),
}

/// Asynchronous notifications from the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Event {
    /// A watch fired.
    Watch {
        /// Client-chosen watch id.
        watch: u64,
        /// The changed path (relative if the watch was registered relative).
        path: String,
    },
}

/// A message from the daemon.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ServerMsg {
    /// The answer to request `id`.
    Reply {
        /// Request id.
        id: u64,
        /// Result.
        result: Result<Reply, WireError>,
    },
    /// An asynchronous event.
    Event(Event),
    /// This attachment's domain was migrated: its old id has ended, the daemon answers every
    /// later request with [`WireError::Migrated`] and closes the connection. The last message
    /// of the connection, sent to this attachment only, at most once.
    Migrated {
        /// The domain's new id.
        to: DomId,
        /// A one-time token to attach as `to` with ([`Op::Hello`]), at most
        /// [`MAX_TOKEN`] bytes.
        token: String,
    },
    /// The daemon is about to disconnect this domain (protocol violation).
    Fatal {
        /// Why.
        reason: String,
    },
}

/// Errors as they travel on the wire (the serialisable part of [`BackendError`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum WireError {
    /// See [`BackendError::NotFound`].
    #[error("not found: {0}")]
    NotFound(String),
    /// See [`BackendError::PermissionDenied`].
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// See [`BackendError::InvalidArgument`].
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// See [`BackendError::AlreadyExists`].
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// See [`BackendError::Limit`].
    #[error("resource limit: {0}")]
    Limit(String),
    /// See [`BackendError::Unavailable`].
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// See [`BackendError::Migrated`].
    #[error("migrated to domain {to}")]
    Migrated {
        /// The domain's new id.
        to: DomId,
    },
}

impl From<WireError> for BackendError {
    fn from(e: WireError) -> BackendError {
        match e {
            WireError::NotFound(s) => BackendError::NotFound(s),
            WireError::PermissionDenied(s) => BackendError::PermissionDenied(s),
            WireError::InvalidArgument(s) => BackendError::InvalidArgument(s),
            WireError::AlreadyExists(s) => BackendError::AlreadyExists(s),
            WireError::Limit(s) => BackendError::Limit(s),
            WireError::Unavailable(s) => BackendError::Unavailable(s),
            WireError::Migrated { to } => BackendError::Migrated { to },
        }
    }
}

/// Encodes a message, refusing anything larger than [`MAX_MSG`].
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let bytes = postcard::to_stdvec(msg)
        .map_err(|e| WireError::InvalidArgument(format!("cannot encode message: {e}")))?;
    if bytes.len() > MAX_MSG {
        return Err(WireError::Limit(format!(
            "message of {} bytes exceeds the {MAX_MSG}-byte limit",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Decodes a message; trailing bytes are an error.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    let (msg, rest) = postcard::take_from_bytes(bytes).map_err(|e| format!("undecodable message: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes after message", rest.len()));
    }
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_limits() {
        let m = ClientMsg { id: 7, op: Op::Read { path: "a/b".into() } };
        let bytes = encode(&m).unwrap_or_default();
        let back: ClientMsg =
            decode(&bytes).unwrap_or(ClientMsg { id: 0, op: Op::Mkdir { path: String::new() } });
        assert_eq!(back.id, 7);
        assert!(decode::<ClientMsg>(&[0xff, 0xff, 0xff]).is_err());
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(decode::<ClientMsg>(&extra).is_err());
        let big = ClientMsg { id: 1, op: Op::Write { path: "x".into(), value: vec![0; MAX_MSG] } };
        assert!(matches!(encode(&big), Err(WireError::Limit(_))));
    }
}
