//! A xenstored on a Unix socket: the simulator's store model ([`StoreTree`]) served over the
//! xenstore wire protocol ([`wire`]), so that the real xenstore client
//! ([`XenStore`](dombus_transport_xen::xen::store::XenStore)) is tested against the same
//! permission, quota and watch rules the simulated domains see.
//!
//! Every connection to a socket made with [`Xenstored::listen`] acts for the domain given
//! there; all sockets of one [`Xenstored`] share one tree. Each connection has a thread that
//! decodes requests with [`wire::FrameReader`] (a header is checked, and a payload bounded by
//! [`wire::PAYLOAD_MAX`], before it is buffered), applies them, and replies in order; watch
//! events go to the connection that registered the watch, after the reply of the request that
//! caused them. A request that does not decode ends that connection only.
//!
//! **Transactions** ([`MAX_TRANSACTIONS`] open per connection) are a copy of the tree taken at
//! `XS_TRANSACTION_START`: the transaction's requests read and change that copy, and the
//! changes it made are recorded. Conflicts are coarse, as in xenstored before 4.6: the commit
//! fails with `EAGAIN` if the tree changed in any way since the transaction started (a
//! generation counter counts every change); otherwise the recorded changes are applied to the
//! tree, firing their watches. `XS_TRANSACTION_END` with `F` aborts; a closed connection aborts
//! its transactions.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dombus_transport_xen::backend::Perm;
use dombus_transport_xen::backend::client::lock;
use dombus_transport_xen::types::DomId;
use dombus_transport_xen::xen::store::wire::{self, Msg, MsgType};

use crate::proto::WireError;
use crate::store::{Fire, StoreTree};

/// Transactions one connection may have open at once (xenstored's default quota is 10).
pub const MAX_TRANSACTIONS: usize = 10;
/// Connections one [`Xenstored`] serves at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a send to a connection may block before the connection is dropped (a client that
/// stops reading cannot stall the store).
pub const SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// A change made in a transaction, applied to the tree at commit.
#[derive(Clone)]
enum Change {
    Write(String, Vec<u8>),
    Mkdir(String),
    Rm(String),
    SetPerms(String, Vec<Perm>),
}

impl Change {
    fn apply(&self, tree: &mut StoreTree, dom: DomId) -> Result<Vec<Fire>, WireError> {
        match self {
            Change::Write(path, value) => tree.write(dom, path, value),
            Change::Mkdir(path) => tree.mkdir(dom, path),
            Change::Rm(path) => tree.rm(dom, path),
            Change::SetPerms(path, perms) => tree.set_perms(dom, path, perms),
        }
    }
}

struct Transaction {
    conn: u64,
    /// The tree as this transaction sees it.
    view: StoreTree,
    /// The tree's generation when the transaction started.
    generation: u64,
    changes: Vec<Change>,
}

/// A connection's sending half.
struct Peer {
    stream: UnixStream,
}

impl Peer {
    /// Sends one message; a failed or timed-out send ends the connection.
    fn send(&self, ty: MsgType, req_id: u32, tx_id: u32, payload: &[u8]) {
        let sent = wire::encode_message(ty, req_id, tx_id, payload)
            .map_err(io::Error::other)
            .and_then(|bytes| (&self.stream).write_all(&bytes));
        if let Err(e) = sent {
            tracing::debug!("xenstored: dropping a connection: {e}");
            let _ = self.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

struct State {
    tree: StoreTree,
    /// Counts changes of `tree`.
    generation: u64,
    /// Registered watches by the id the tree knows them by: the connection, its peer and the
    /// token.
    watches: HashMap<u64, (u64, Arc<Peer>, String)>,
    transactions: HashMap<u32, Transaction>,
    next_tx: u32,
}

struct Inner {
    state: Mutex<State>,
    next_id: AtomicU64,
    connections: AtomicUsize,
}

/// A xenstored serving one [`StoreTree`] (see the [module documentation](self)). Cheap to
/// clone; its sockets serve until the process exits.
#[derive(Clone)]
pub struct Xenstored {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Xenstored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Xenstored").finish_non_exhaustive()
    }
}

impl Default for Xenstored {
    fn default() -> Self {
        Xenstored::new(StoreTree::new())
    }
}

/// A request's failure: the errno name of its `XS_ERROR` reply.
struct Errno(&'static str);

impl From<WireError> for Errno {
    fn from(e: WireError) -> Errno {
        Errno(match e {
            WireError::NotFound(_) => "ENOENT",
            WireError::PermissionDenied(_) => "EACCES",
            WireError::InvalidArgument(_) => "EINVAL",
            WireError::AlreadyExists(_) => "EEXIST",
            WireError::Limit(_) => "E2BIG",
            WireError::Unavailable(_) | WireError::Migrated { .. } => "EIO",
        })
    }
}

/// A malformed request: `EINVAL`, whatever the detail.
fn einval<E>(_: E) -> Errno {
    Errno("EINVAL")
}

/// The open transaction `id` of connection `conn` (`ENOENT` for any other id).
fn open_tx(st: &mut State, conn: u64, id: u32) -> Result<&mut Transaction, Errno> {
    st.transactions.get_mut(&id).filter(|t| t.conn == conn).ok_or(Errno("ENOENT"))
}

impl Xenstored {
    /// A xenstored serving `tree`.
    pub fn new(tree: StoreTree) -> Xenstored {
        let state =
            State { tree, generation: 0, watches: HashMap::new(), transactions: HashMap::new(), next_tx: 0 };
        Xenstored {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                next_id: AtomicU64::new(1),
                connections: AtomicUsize::new(0),
            }),
        }
    }

    /// Binds a Unix socket at `path` whose connections act for domain `dom`, and serves it from
    /// a thread.
    pub fn listen(&self, path: &Path, dom: DomId) -> io::Result<()> {
        let listener = UnixListener::bind(path)?;
        let inner = self.inner.clone();
        std::thread::Builder::new().name("xenstored-accept".into()).spawn(move || {
            for stream in listener.incoming() {
                let stream = match stream {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!("xenstored: accept failed: {e}");
                        continue;
                    }
                };
                if inner.connections.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                    inner.connections.fetch_sub(1, Ordering::Relaxed);
                    continue;
                }
                let inner = inner.clone();
                let spawned = std::thread::Builder::new().name("xenstored-conn".into()).spawn({
                    let inner = inner.clone();
                    move || {
                        if let Err(e) = inner.serve(stream, dom) {
                            tracing::debug!("xenstored: connection of domain {dom} ends: {e}");
                        }
                        inner.connections.fetch_sub(1, Ordering::Relaxed);
                    }
                });
                if spawned.is_err() {
                    inner.connections.fetch_sub(1, Ordering::Relaxed);
                }
            }
        })?;
        Ok(())
    }

    /// Runs `f` on the tree directly (to set a test up, e.g. [`StoreTree::introduce`]); counts
    /// as a change for transactions. Watch events `f`'s operations return are not delivered.
    pub fn with_tree<T>(&self, f: impl FnOnce(&mut StoreTree) -> T) -> T {
        let mut st = lock(&self.inner.state);
        st.generation += 1;
        f(&mut st.tree)
    }

    /// The tokens of the registered watches, sorted.
    pub fn watch_tokens(&self) -> Vec<String> {
        let mut v: Vec<String> = lock(&self.inner.state).watches.values().map(|w| w.2.clone()).collect();
        v.sort();
        v
    }

    /// How many transactions are open.
    pub fn transactions(&self) -> usize {
        lock(&self.inner.state).transactions.len()
    }
}

impl Inner {
    fn serve(&self, stream: UnixStream, dom: DomId) -> io::Result<()> {
        stream.set_write_timeout(Some(SEND_TIMEOUT))?;
        let peer = Arc::new(Peer { stream: stream.try_clone()? });
        let conn = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frames = wire::FrameReader::default();
        let mut chunk = vec![0u8; wire::HEADER_LEN + wire::PAYLOAD_MAX];
        let result = 'read: loop {
            let n = match (&stream).read(&mut chunk) {
                Ok(0) => break Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => break Err(e),
            };
            frames.push(chunk.get(..n).unwrap_or_default());
            loop {
                match frames.next_message() {
                    Ok(Some(m)) => self.request(&peer, conn, dom, &m),
                    Ok(None) => break,
                    Err(e) => break 'read Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                }
            }
        };
        let mut st = lock(&self.state);
        let st = &mut *st;
        let mine: Vec<u64> = st.watches.iter().filter(|(_, w)| w.0 == conn).map(|(id, _)| *id).collect();
        for id in mine {
            st.watches.remove(&id);
            let _ = st.tree.unwatch(dom, id);
        }
        st.transactions.retain(|_, tx| tx.conn != conn);
        let _ = peer.stream.shutdown(std::net::Shutdown::Both);
        result
    }

    /// Applies one request and sends its reply, then the watch events it caused.
    fn request(&self, peer: &Arc<Peer>, conn: u64, dom: DomId, m: &Msg) {
        let mut st = lock(&self.state);
        let mut fires = Vec::new();
        match self.apply(&mut st, peer, conn, dom, m, &mut fires) {
            Ok(payload) => peer.send(m.ty, m.req_id, m.tx_id, &payload),
            Err(Errno(e)) => {
                let name = wire::strings(&[e]).unwrap_or_default();
                peer.send(MsgType::Error, m.req_id, m.tx_id, &name);
            }
        }
        for f in fires {
            if let Some((_, to, token)) = st.watches.get(&f.watch) {
                match wire::strings(&[f.path.as_str(), token.as_str()]) {
                    Ok(event) => to.send(MsgType::WatchEvent, 0, 0, &event),
                    Err(e) => tracing::debug!("xenstored: watch event not sent: {e}"),
                }
            }
        }
    }

    fn apply(
        &self,
        st: &mut State,
        peer: &Arc<Peer>,
        conn: u64,
        dom: DomId,
        m: &Msg,
        fires: &mut Vec<Fire>,
    ) -> Result<Vec<u8>, Errno> {
        const OK: &[u8] = b"OK\0";
        let args = wire::parse_strings(&m.payload).map_err(einval)?;
        let arg = |i: usize| args.get(i).copied().ok_or(Errno("EINVAL"));
        let change = match m.ty {
            MsgType::Read | MsgType::Directory | MsgType::GetPerms => {
                let tree = match m.tx_id {
                    0 => &st.tree,
                    id => &open_tx(st, conn, id)?.view,
                };
                let path = arg(0)?;
                let reply = match m.ty {
                    MsgType::Read => tree.read(dom, path)?,
                    MsgType::Directory => wire::strings(&tree.directory(dom, path)?).map_err(einval)?,
                    _ => wire::encode_perms(&tree.get_perms(dom, path)?),
                };
                if reply.len() > wire::PAYLOAD_MAX {
                    return Err(Errno("E2BIG"));
                }
                return Ok(reply);
            }
            MsgType::Write => {
                let (path, value) = wire::parse_write(&m.payload).map_err(einval)?;
                Change::Write(path.into(), value.to_vec())
            }
            MsgType::Mkdir => Change::Mkdir(arg(0)?.into()),
            MsgType::Rm => Change::Rm(arg(0)?.into()),
            MsgType::SetPerms => {
                let perms = args
                    .get(1..)
                    .unwrap_or_default()
                    .iter()
                    .map(|p| wire::parse_perm(p.as_bytes()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(einval)?;
                Change::SetPerms(arg(0)?.into(), perms)
            }
            MsgType::Watch => {
                let (path, token) = (arg(0)?, arg(1)?);
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                fires.extend(st.tree.watch(dom, id, path)?);
                st.watches.insert(id, (conn, peer.clone(), token.into()));
                return Ok(OK.to_vec());
            }
            MsgType::Unwatch => {
                let token = arg(1)?;
                let id = st.watches.iter().find(|(_, w)| w.0 == conn && w.2 == token).map(|(id, _)| *id);
                let id = id.ok_or(Errno("ENOENT"))?;
                st.watches.remove(&id);
                st.tree.unwatch(dom, id)?;
                return Ok(OK.to_vec());
            }
            MsgType::TransactionStart => {
                if st.transactions.values().filter(|t| t.conn == conn).count() >= MAX_TRANSACTIONS {
                    return Err(Errno("EQUOTA"));
                }
                let mut id = st.next_tx.wrapping_add(1);
                while id == 0 || st.transactions.contains_key(&id) {
                    id = id.wrapping_add(1);
                }
                st.next_tx = id;
                let tx = Transaction {
                    conn,
                    view: st.tree.clone(),
                    generation: st.generation,
                    changes: Vec::new(),
                };
                st.transactions.insert(id, tx);
                return wire::strings(&[id.to_string()]).map_err(einval);
            }
            MsgType::TransactionEnd => {
                open_tx(st, conn, m.tx_id)?;
                let tx = st.transactions.remove(&m.tx_id).ok_or(Errno("ENOENT"))?;
                match arg(0)? {
                    "F" => return Ok(OK.to_vec()),
                    "T" if tx.generation != st.generation => return Err(Errno("EAGAIN")),
                    "T" => {
                        // The tree is as the transaction found it, so each change succeeds as
                        // it did in the transaction's view.
                        for c in &tx.changes {
                            fires.extend(c.apply(&mut st.tree, dom)?);
                        }
                        if !tx.changes.is_empty() {
                            st.generation += 1;
                        }
                        return Ok(OK.to_vec());
                    }
                    _ => return Err(Errno("EINVAL")),
                }
            }
            _ => return Err(Errno("ENOSYS")),
        };
        if m.tx_id == 0 {
            fires.extend(change.apply(&mut st.tree, dom)?);
            st.generation += 1;
        } else {
            let tx = open_tx(st, conn, m.tx_id)?;
            // Events of a transaction's view are not delivered: its changes fire at commit.
            change.apply(&mut tx.view, dom)?;
            tx.changes.push(change);
        }
        Ok(OK.to_vec())
    }
}
