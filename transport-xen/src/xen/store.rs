//! The real xenstore client: [`XenStore`] speaks the xenstore wire protocol ([`wire`]) to
//! xenstored's Unix socket or to the `/dev/xen/xenbus` device.
//!
//! * **One connection, one reader thread** (the waiters and watch queues are a [`ClientCore`],
//!   as in the simulator's client). Every request of every handle goes out on the same
//!   connection (one `write(2)` per whole message, as the xenbus device requires). A reader
//!   thread takes every incoming message and matches replies to their callers by `req_id`: each
//!   call registers a one-shot channel under a fresh id, sends, and blocks on the channel. A
//!   reply must have the request's type or `XS_ERROR`; `XS_ERROR` carries an errno name that is
//!   mapped onto [`BackendError`].
//! * **Watches.** Each [`XenWatch`] has a unique token (`dombus-<n>`), a queue and a
//!   non-blocking eventfd. The reader routes `XS_WATCH_EVENT`s by token into the queue and
//!   signals the eventfd, so the watch polls readable while its queue is non-empty. Dropping the
//!   watch sends `XS_UNWATCH`. Drops never wait for xenstored: the `XS_UNWATCH` of a watch and
//!   the abort of an unfinished transaction are sent without waiting for their replies.
//! * **Transactions** are inherent methods ([`XenStore::transaction`],
//!   [`XenStore::with_transaction`]): a transaction id in the header of each request, and
//!   `XS_TRANSACTION_END` answering `EAGAIN` when the transaction conflicted and must be retried.
//! * **Untrusted input.** A header is checked (defined type, length at most 4096) before its
//!   payload is buffered; a message that is malformed, unexpected (a reply nobody waits for, or
//!   of the wrong type) or a closed connection fails every pending and later call, and every
//!   watch, with [`BackendError::Disconnected`]. Nothing read is trusted enough to panic on.
//! * **Shutdown.** The reader waits in `poll(2)` on the connection and a stop eventfd, so
//!   dropping the last handle (every [`XenStore`] clone and [`XenWatch`]) stops and joins it
//!   promptly even if xenstored has sent half a message, then closes the connection.
//!
//! Relative paths are sent as given: xenstored resolves them against the connection's domain
//! home `/local/domain/<domid>`. `XS_DIRECTORY_PART` is not used: a directory whose names exceed
//! 4096 bytes fails with [`BackendError::Limit`] (xenstored's `E2BIG`).

pub mod wire;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use rustix::event::{PollFd, PollFlags};
use rustix::io::Errno;

use self::wire::{FrameReader, Msg, MsgType, WireError};
use crate::backend::client::{ClientCore, WatchQueue, lock, signal};
use crate::backend::{BackendError, Perm, Result, Store, StoreWatch};
use crate::types::DomId;

/// Where xenstored listens, in the order [`XenStore::open`] tries them.
pub const SOCKET_PATHS: [&str; 2] = ["/var/run/xenstored/socket", "/run/xenstored/socket"];
/// The xenbus device, tried when no socket works (guests, or dom0 with a stub xenstored).
pub const XENBUS_PATH: &str = "/dev/xen/xenbus";
/// How many times [`XenStore::with_transaction`] runs a conflicting transaction.
pub const MAX_TX_ATTEMPTS: u32 = 16;

/// Maps an `XS_ERROR` errno name onto a [`BackendError`]; `what` names the request. Names
/// without a variant of their own (`EAGAIN`, `EBUSY`, ...) become [`BackendError::Io`] with that
/// OS error (see [`is_conflict`]), or [`std::io::ErrorKind::Other`] for names not known here.
pub fn error_from_errno(name: &str, what: &str) -> BackendError {
    let msg = format!("{what}: {name}");
    let errno = match name {
        "ENOENT" => return BackendError::NotFound(msg),
        "EACCES" | "EPERM" => return BackendError::PermissionDenied(msg),
        "EINVAL" => return BackendError::InvalidArgument(msg),
        "EEXIST" => return BackendError::AlreadyExists(msg),
        "ENOSPC" | "E2BIG" | "EQUOTA" => return BackendError::Limit(msg),
        "EAGAIN" => Errno::AGAIN,
        "EBUSY" => Errno::BUSY,
        "EROFS" => Errno::ROFS,
        "EISCONN" => Errno::ISCONN,
        "ENOSYS" => Errno::NOSYS,
        "EIO" => Errno::IO,
        _ => return BackendError::io(what, std::io::Error::other(format!("xenstored answered {name}"))),
    };
    BackendError::io(msg, errno.into())
}

/// True if `e` is xenstored's `EAGAIN`: the transaction conflicted and should be run again.
pub fn is_conflict(e: &BackendError) -> bool {
    matches!(e, BackendError::Io { source, .. } if source.raw_os_error() == Some(Errno::AGAIN.raw_os_error()))
}

/// A caller waiting for the reply to its request.
struct Waiter {
    expect: MsgType,
    reply: SyncSender<Msg>,
}

/// What the callers and the reader thread share.
struct Shared {
    /// Waiters by `req_id`, watch queues by token.
    core: ClientCore<u32, Waiter, String>,
    /// Signalled to stop the reader thread.
    stop: OwnedFd,
}

impl Shared {
    fn disconnected(&self) -> BackendError {
        BackendError::Disconnected(self.core.dead().unwrap_or_else(|| "xenstore connection lost".into()))
    }

    /// Marks the connection dead (the first reason wins): pending calls fail, watches wake up and
    /// the reader stops.
    fn fail(&self, reason: String) {
        self.core.fail(reason);
        signal(&self.stop);
    }

    /// Routes one incoming message. `Err` is a protocol violation.
    fn dispatch(&self, msg: Msg) -> std::result::Result<(), String> {
        if msg.ty == MsgType::WatchEvent {
            let (path, token) =
                wire::parse_watch_event(&msg.payload).map_err(|e| format!("bad watch event: {e}"))?;
            // Not delivered: a watch being removed.
            self.core.deliver(&token, path);
            return Ok(());
        }
        let waiter = self.core.complete(msg.req_id);
        match waiter {
            None => Err(format!("{:?} reply to request {}, which nobody sent", msg.ty, msg.req_id)),
            Some(w) if msg.ty != w.expect && msg.ty != MsgType::Error => {
                Err(format!("{:?} reply to a {:?} request", msg.ty, w.expect))
            }
            Some(w) => {
                // The receiver is gone if the request came from a drop that does not wait.
                let _ = w.reply.try_send(msg);
                Ok(())
            }
        }
    }

    /// The reader thread's loop; returns why it stopped.
    fn read_loop(&self, conn: &OwnedFd) -> String {
        let mut frames = FrameReader::default();
        let mut chunk = vec![0u8; wire::HEADER_LEN + wire::PAYLOAD_MAX];
        loop {
            let mut fds = [PollFd::new(conn, PollFlags::IN), PollFd::new(&self.stop, PollFlags::IN)];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return format!("poll on the xenstore connection failed: {e}"),
            }
            if !fds[1].revents().is_empty() {
                return "xenstore connection closed".into();
            }
            if fds[0].revents().is_empty() {
                continue;
            }
            let n = match rustix::io::read(conn, &mut chunk[..]) {
                Ok(0) => return "xenstored closed the connection".into(),
                Ok(n) => n,
                Err(Errno::INTR | Errno::AGAIN) => continue,
                Err(e) => return format!("reading from xenstore failed: {e}"),
            };
            frames.push(chunk.get(..n).unwrap_or_default());
            loop {
                match frames.next_message() {
                    Ok(Some(msg)) => {
                        if let Err(e) = self.dispatch(msg) {
                            return format!("xenstore protocol violation: {e}");
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return format!("malformed message from xenstore: {e}"),
                }
            }
        }
    }
}

/// The connection; dropped with the last handle.
struct Conn {
    fd: Arc<OwnedFd>,
    is_socket: bool,
    shared: Arc<Shared>,
    write_lock: Mutex<()>,
    reader: Option<JoinHandle<()>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.shared.fail("xenstore connection closed".into());
        if self.is_socket {
            let _ = rustix::net::shutdown(&*self.fd, rustix::net::Shutdown::Both);
        }
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

impl Conn {
    fn send(&self, bytes: &[u8]) -> std::result::Result<(), Errno> {
        let _guard = lock(&self.write_lock);
        let mut rest = bytes;
        while !rest.is_empty() {
            let sent = if self.is_socket {
                rustix::net::send(&*self.fd, rest, rustix::net::SendFlags::NOSIGNAL)
            } else {
                rustix::io::write(&*self.fd, rest)
            };
            match sent {
                Ok(0) => return Err(Errno::PIPE),
                Ok(n) => rest = rest.get(n..).unwrap_or_default(),
                Err(Errno::INTR) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Sends a request and returns the channel its reply will arrive on.
    fn start(
        &self,
        ty: MsgType,
        tx_id: u32,
        payload: &[u8],
        what: &dyn Fn() -> String,
    ) -> Result<Receiver<Msg>> {
        if payload.len() > wire::PAYLOAD_MAX {
            return Err(BackendError::Limit(format!(
                "{}: request exceeds {} bytes",
                what(),
                wire::PAYLOAD_MAX
            )));
        }
        let (reply_tx, reply_rx) = sync_channel(1);
        let req_id = self
            .shared
            .core
            .register(Waiter { expect: ty, reply: reply_tx })
            .map_err(BackendError::Disconnected)?;
        let sent = wire::encode_message(ty, req_id, tx_id, payload)
            .map_err(|e| e.to_string())
            .and_then(|bytes| self.send(&bytes).map_err(|e| format!("writing to xenstore failed: {e}")));
        if let Err(reason) = sent {
            self.shared.fail(reason);
            return Err(self.shared.disconnected());
        }
        Ok(reply_rx)
    }

    /// Sends a request and waits for its reply's payload; `XS_ERROR` becomes the mapped error.
    fn call(&self, ty: MsgType, tx_id: u32, payload: &[u8], path: &str) -> Result<Vec<u8>> {
        let what = || format!("xenstore {ty:?} {path}");
        let reply = self.start(ty, tx_id, payload, &what)?.recv().map_err(|_| self.shared.disconnected())?;
        if reply.ty != MsgType::Error {
            return Ok(reply.payload);
        }
        match wire::parse_error(&reply.payload) {
            Ok(name) => Err(error_from_errno(name, &what())),
            Err(e) => Err(self.malformed(&what(), e)),
        }
    }

    /// A reply whose payload does not parse: xenstore is broken, stop using it.
    fn malformed(&self, what: &str, e: WireError) -> BackendError {
        self.shared.fail(format!("malformed reply to {what}: {e}"));
        self.shared.disconnected()
    }
}

fn arg(parts: &[&str]) -> Result<Vec<u8>> {
    wire::strings(parts).map_err(|e| BackendError::InvalidArgument(e.to_string()))
}

/// The store operations, in transaction `tx` (0: none).
struct Ops<'a> {
    conn: &'a Conn,
    tx: u32,
}

impl Ops<'_> {
    fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.conn.call(MsgType::Read, self.tx, &arg(&[path])?, path)
    }

    fn write(&self, path: &str, value: &[u8]) -> Result<()> {
        let payload =
            wire::write_payload(path, value).map_err(|e| BackendError::InvalidArgument(e.to_string()))?;
        self.conn.call(MsgType::Write, self.tx, &payload, path).map(drop)
    }

    fn mkdir(&self, path: &str) -> Result<()> {
        self.conn.call(MsgType::Mkdir, self.tx, &arg(&[path])?, path).map(drop)
    }

    fn rm(&self, path: &str) -> Result<()> {
        self.conn.call(MsgType::Rm, self.tx, &arg(&[path])?, path).map(drop)
    }

    fn directory(&self, path: &str) -> Result<Vec<String>> {
        let reply = self.conn.call(MsgType::Directory, self.tx, &arg(&[path])?, path)?;
        wire::parse_directory(&reply).map_err(|e| self.conn.malformed(&format!("directory {path}"), e))
    }

    fn get_perms(&self, path: &str) -> Result<Vec<Perm>> {
        let reply = self.conn.call(MsgType::GetPerms, self.tx, &arg(&[path])?, path)?;
        wire::parse_perms(&reply).map_err(|e| self.conn.malformed(&format!("get_perms {path}"), e))
    }

    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<()> {
        let mut payload = arg(&[path])?;
        payload.extend(wire::encode_perms(perms));
        self.conn.call(MsgType::SetPerms, self.tx, &payload, path).map(drop)
    }
}

/// A connection to xenstore (see the [module documentation](self)). Cheap to clone; the
/// connection closes when the last clone and the last [`XenWatch`] are dropped.
#[derive(Clone)]
pub struct XenStore {
    conn: Arc<Conn>,
}

impl std::fmt::Debug for XenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenStore").field("socket", &self.conn.is_socket).finish_non_exhaustive()
    }
}

fn open_error(path: &Path, e: &std::io::Error) -> BackendError {
    let msg = format!("cannot open xenstore at {}: {e}", path.display());
    if e.kind() == std::io::ErrorKind::PermissionDenied {
        BackendError::PermissionDenied(format!("{msg} (talking to xenstore needs root)"))
    } else {
        BackendError::Unavailable(msg)
    }
}

impl XenStore {
    /// Connects to xenstored's socket ([`SOCKET_PATHS`]) or, failing that, the xenbus device
    /// ([`XENBUS_PATH`]). [`BackendError::Unavailable`] if none exists.
    pub fn open() -> Result<XenStore> {
        let mut last_err = None;
        for path in SOCKET_PATHS.iter().chain([&XENBUS_PATH]) {
            if !Path::new(path).exists() {
                continue;
            }
            match XenStore::open_path(path) {
                Ok(store) => return Ok(store),
                Err(e) => {
                    tracing::debug!("xenstore at {path}: {e}");
                    last_err = Some(e);
                }
            }
        }
        Err(last_err.unwrap_or_else(|| {
            BackendError::Unavailable(
                "xenstore not found: neither /var/run/xenstored/socket nor /dev/xen/xenbus exists \
                 (not a Xen domain, or xenstored not running)"
                    .into(),
            )
        }))
    }

    /// Connects to the xenstored socket or xenbus device at `path` (a Unix socket is connected
    /// to, anything else is opened read-write).
    pub fn open_path(path: impl AsRef<Path>) -> Result<XenStore> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| open_error(path, &e))?;
        let is_socket = meta.file_type().is_socket();
        let fd: OwnedFd = if is_socket {
            UnixStream::connect(path).map_err(|e| open_error(path, &e))?.into()
        } else {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .map_err(|e| open_error(path, &e))?
                .into()
        };
        let fd = Arc::new(fd);
        let stop = crate::backend::client::eventfd().map_err(|e| BackendError::io("eventfd", e))?;
        let shared = Arc::new(Shared { core: ClientCore::new(), stop });
        let (reader_fd, reader_shared) = (fd.clone(), shared.clone());
        let reader = std::thread::Builder::new()
            .name("xenstore-reader".into())
            .spawn(move || {
                let reason = reader_shared.read_loop(&reader_fd);
                tracing::debug!("xenstore reader stops: {reason}");
                reader_shared.fail(reason);
            })
            .map_err(|e| BackendError::io("spawning the xenstore reader thread", e))?;
        let conn = Conn { fd, is_socket, shared, write_lock: Mutex::new(()), reader: Some(reader) };
        Ok(XenStore { conn: Arc::new(conn) })
    }

    fn ops(&self) -> Ops<'_> {
        Ops { conn: &self.conn, tx: 0 }
    }

    /// This domain's id, from the relative key `domid` (which the toolstack writes; in dom0,
    /// `xen-init-dom0`).
    pub fn read_domid(&self) -> Result<DomId> {
        let value = self.read("domid").map_err(|e| match e {
            BackendError::NotFound(m) => BackendError::NotFound(format!(
                "{m}: this domain's home has no `domid` key (in dom0, run xen-init-dom0)"
            )),
            e => e,
        })?;
        wire::parse_domid(&value)
            .map_err(|e| BackendError::InvalidArgument(format!("xenstore key `domid`: {e}")))
    }

    /// Starts a transaction (`XS_TRANSACTION_START`). It is aborted on drop unless committed.
    pub fn transaction(&self) -> Result<XenTransaction<'_>> {
        let reply = self.conn.call(MsgType::TransactionStart, 0, b"\0", "of a transaction")?;
        let id = wire::parse_tx_id(&reply).map_err(|e| self.conn.malformed("transaction start", e))?;
        Ok(XenTransaction { store: self, id, done: false })
    }

    /// Runs `f` in a transaction and commits it, running it again (up to [`MAX_TX_ATTEMPTS`]
    /// times) while the commit, or an operation of `f`, answers that the transaction conflicted
    /// (see [`is_conflict`]). Any other error of `f` aborts the transaction and is returned.
    pub fn with_transaction<T>(&self, mut f: impl FnMut(&XenTransaction<'_>) -> Result<T>) -> Result<T> {
        for _ in 0..MAX_TX_ATTEMPTS {
            let tx = self.transaction()?;
            match f(&tx) {
                Ok(value) => {
                    if tx.commit()? {
                        return Ok(value);
                    }
                }
                Err(e) if is_conflict(&e) => drop(tx),
                Err(e) => return Err(e),
            }
        }
        Err(BackendError::io(
            format!("xenstore transaction still conflicting after {MAX_TX_ATTEMPTS} attempts"),
            Errno::AGAIN.into(),
        ))
    }
}

static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

impl Store for XenStore {
    type Watch = XenWatch;

    fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.ops().read(path)
    }

    fn write(&self, path: &str, value: &[u8]) -> Result<()> {
        self.ops().write(path, value)
    }

    fn mkdir(&self, path: &str) -> Result<()> {
        self.ops().mkdir(path)
    }

    fn rm(&self, path: &str) -> Result<()> {
        self.ops().rm(path)
    }

    fn directory(&self, path: &str) -> Result<Vec<String>> {
        self.ops().directory(path)
    }

    fn get_perms(&self, path: &str) -> Result<Vec<Perm>> {
        self.ops().get_perms(path)
    }

    fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<()> {
        self.ops().set_perms(path, perms)
    }

    fn watch(&self, path: &str) -> Result<XenWatch> {
        let token = format!("dombus-{}", NEXT_TOKEN.fetch_add(1, Ordering::Relaxed));
        let payload = arg(&[path, &token])?;
        let core = &self.conn.shared.core;
        let queue = core.add_watch(token.clone(), path).map_err(|e| BackendError::io("eventfd", e))?;
        if let Err(e) = self.conn.call(MsgType::Watch, 0, &payload, path) {
            core.remove_watch(&token);
            return Err(e);
        }
        Ok(XenWatch { conn: self.conn.clone(), payload, token, queue })
    }
}

/// A registered watch (see [`StoreWatch`]): its fd polls readable while changed paths are
/// queued, or once the connection is lost. Dropping it sends `XS_UNWATCH`.
pub struct XenWatch {
    conn: Arc<Conn>,
    /// `path\0token\0`, for `XS_UNWATCH`.
    payload: Vec<u8>,
    token: String,
    queue: Arc<WatchQueue>,
}

impl XenWatch {
    /// The token xenstored knows this watch by.
    pub fn token(&self) -> &str {
        &self.token
    }
}

impl std::fmt::Debug for XenWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenWatch").field("token", &self.token).finish_non_exhaustive()
    }
}

impl AsFd for XenWatch {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.queue.as_fd()
    }
}

impl StoreWatch for XenWatch {
    fn try_next(&self) -> Result<Option<String>> {
        self.conn.shared.core.try_next(&self.queue).map_err(BackendError::Disconnected)
    }
}

impl Drop for XenWatch {
    fn drop(&mut self) {
        self.conn.shared.core.remove_watch(&self.token);
        // Not waiting for the reply: a drop must not block on xenstored.
        if let Err(e) = self.conn.start(MsgType::Unwatch, 0, &self.payload, &|| self.token.clone()) {
            tracing::debug!("xenstore unwatch {}: {e}", self.token);
        }
    }
}

/// A xenstore transaction ([`XenStore::transaction`]): its operations see a snapshot and take
/// effect together at [`commit`](XenTransaction::commit). Dropped without `commit` or `abort`,
/// it is aborted.
pub struct XenTransaction<'a> {
    store: &'a XenStore,
    id: u32,
    done: bool,
}

impl std::fmt::Debug for XenTransaction<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenTransaction").field("id", &self.id).finish_non_exhaustive()
    }
}

impl XenTransaction<'_> {
    fn ops(&self) -> Ops<'_> {
        Ops { conn: &self.store.conn, tx: self.id }
    }

    /// The transaction id xenstored gave.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// [`Store::read`] in this transaction.
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        self.ops().read(path)
    }

    /// [`Store::write`] in this transaction.
    pub fn write(&self, path: &str, value: &[u8]) -> Result<()> {
        self.ops().write(path, value)
    }

    /// [`Store::mkdir`] in this transaction.
    pub fn mkdir(&self, path: &str) -> Result<()> {
        self.ops().mkdir(path)
    }

    /// [`Store::rm`] in this transaction.
    pub fn rm(&self, path: &str) -> Result<()> {
        self.ops().rm(path)
    }

    /// [`Store::directory`] in this transaction.
    pub fn directory(&self, path: &str) -> Result<Vec<String>> {
        self.ops().directory(path)
    }

    /// [`Store::get_perms`] in this transaction.
    pub fn get_perms(&self, path: &str) -> Result<Vec<Perm>> {
        self.ops().get_perms(path)
    }

    /// [`Store::set_perms`] in this transaction.
    pub fn set_perms(&self, path: &str, perms: &[Perm]) -> Result<()> {
        self.ops().set_perms(path, perms)
    }

    fn end(&mut self, commit: bool) -> Result<()> {
        self.done = true;
        let payload: &[u8] = if commit { b"T\0" } else { b"F\0" };
        self.store
            .conn
            .call(MsgType::TransactionEnd, self.id, payload, &format!("of transaction {}", self.id))
            .map(drop)
    }

    /// Commits: `Ok(true)` if it took effect, `Ok(false)` if it conflicted with another change
    /// (xenstored's `EAGAIN`; nothing took effect, run it again).
    pub fn commit(mut self) -> Result<bool> {
        match self.end(true) {
            Ok(()) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Aborts: nothing done in the transaction takes effect.
    pub fn abort(mut self) -> Result<()> {
        self.end(false)
    }
}

impl Drop for XenTransaction<'_> {
    fn drop(&mut self) {
        // Not waiting for the reply: a drop must not block on xenstored.
        if !self.done {
            if let Err(e) = self.store.conn.start(MsgType::TransactionEnd, self.id, b"F\0", &String::new) {
                tracing::debug!("aborting xenstore transaction {}: {e}", self.id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::atomic::AtomicU32;
    use std::sync::mpsc;
    use std::time::Duration;

    use proptest::prelude::*;
    use rustix::event::Timespec;

    use super::wire::*;
    use super::*;
    use crate::backend::PermKind;

    fn send(out: &UnixStream, ty: MsgType, req_id: u32, payload: &[u8]) {
        let _ = (&*out).write_all(&encode_message(ty, req_id, 0, payload).unwrap());
    }

    /// A raw server: every request on every connection is answered by `serve`.
    struct RawServer {
        dir: PathBuf,
        sock: PathBuf,
    }

    impl Drop for RawServer {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    impl RawServer {
        /// Serves every connection with `serve(stream, request)`.
        fn with(serve: impl Fn(&UnixStream, Msg) + Send + Sync + 'static) -> RawServer {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "dombus-xs-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let sock = dir.join("socket");
            let listener = UnixListener::bind(&sock).unwrap();
            let serve = Arc::new(serve);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let (serve, stream) = (serve.clone(), stream.unwrap());
                    std::thread::spawn(move || {
                        let (mut frames, mut buf) = (FrameReader::default(), [0u8; 8192]);
                        while let Ok(n @ 1..) = (&stream).read(&mut buf) {
                            frames.push(&buf[..n]);
                            let mut batch = Vec::new();
                            while let Ok(Some(m)) = frames.next_message() {
                                batch.push(m);
                            }
                            // In reverse: concurrent callers must match replies by req_id.
                            for m in batch.into_iter().rev() {
                                serve(&stream, m);
                            }
                        }
                    });
                }
            });
            RawServer { dir, sock }
        }

        fn open(&self) -> XenStore {
            XenStore::open_path(&self.sock).unwrap()
        }
    }

    /// Runs `f` on another thread, failing the test if it takes more than 10 s.
    fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || tx.send(f()));
        rx.recv_timeout(Duration::from_secs(10)).expect("timed out")
    }

    fn readable(fd: impl AsFd, ms: i64) -> bool {
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let timeout = Timespec { tv_sec: ms / 1000, tv_nsec: (ms % 1000) * 1_000_000 };
        rustix::event::poll(&mut fds, Some(&timeout)).unwrap() == 1
    }

    #[test]
    fn handles_are_send_sync_static() {
        fn check<T: Send + Sync + 'static>() {}
        check::<XenStore>();
        check::<XenWatch>();
    }

    #[test]
    fn errno_names_map_to_variants() {
        use BackendError as E;
        assert!(matches!(error_from_errno("EPERM", "x"), E::PermissionDenied(_)));
        assert!(matches!(error_from_errno("EINVAL", "x"), E::InvalidArgument(_)));
        assert!(matches!(error_from_errno("EEXIST", "x"), E::AlreadyExists(_)));
        for name in ["ENOSPC", "E2BIG", "EQUOTA"] {
            assert!(matches!(error_from_errno(name, "x"), E::Limit(_)));
        }
        assert!(is_conflict(&error_from_errno("EAGAIN", "x")));
        assert!(!is_conflict(&error_from_errno("EBUSY", "x")));
        assert!(error_from_errno("EWHATEVER", "x").to_string().contains("EWHATEVER"));
    }

    /// A server answering every request with `garbage(request)` (after answering watches).
    fn garbage_server(garbage: fn(&Msg) -> Vec<u8>) -> RawServer {
        RawServer::with(move |out, m| {
            if m.ty == MsgType::Watch {
                send(out, MsgType::Watch, m.req_id, b"OK\0");
                return;
            }
            let bytes = garbage(&m);
            let _ = (&*out).write_all(&bytes);
            if bytes.len() < HEADER_LEN + 4 {
                let _ = out.shutdown(std::net::Shutdown::Both);
            }
        })
    }

    fn header(ty: u32, req_id: u32, len: u32) -> Vec<u8> {
        [ty, req_id, 0, len].iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    #[test]
    fn garbage_from_the_server_disconnects_without_panic_or_hang() {
        let cases: [fn(&Msg) -> Vec<u8>; 7] = [
            |m| header(MsgType::Read as u32, m.req_id, 5000),
            |m| header(99, m.req_id, 0),
            |m| header(20, m.req_id, 0),
            |m| [header(MsgType::Read as u32, m.req_id, 10), b"abc".to_vec()].concat(),
            |m| encode_message(MsgType::Read, m.req_id + 1000, 0, b"x").unwrap(),
            |m| encode_message(MsgType::Directory, m.req_id, 0, b"x\0").unwrap(),
            |m| encode_message(MsgType::Error, m.req_id, 0, b"\xff\0").unwrap(),
        ];
        for (i, case) in cases.into_iter().enumerate() {
            let server = garbage_server(case);
            let xs = server.open();
            let w = xs.watch("/w").unwrap();
            let (r1, r2, xs) = within(move || (xs.read("/x"), xs.read("/y"), xs));
            assert!(matches!(r1, Err(BackendError::Disconnected(_))), "case {i}: {r1:?}");
            assert!(matches!(r2, Err(BackendError::Disconnected(_))), "case {i}: {r2:?}");
            assert!(readable(&w, 5000), "case {i}");
            assert!(matches!(w.try_next(), Err(BackendError::Disconnected(_))), "case {i}");
            within(move || drop((w, xs)));
        }
        // Malformed payloads of well-formed replies.
        let server = garbage_server(|m| encode_message(m.ty, m.req_id, 0, b"r5\0zz\0").unwrap());
        let xs = server.open();
        assert!(matches!(within(move || xs.get_perms("/p")), Err(BackendError::Disconnected(_))));
    }

    #[test]
    fn drops_do_not_wait_for_xenstored() {
        // Answers a transaction start and a watch, then sends half a message and nothing else.
        let server = RawServer::with(|out, m| {
            let reply = match m.ty {
                MsgType::TransactionStart => encode_message(m.ty, m.req_id, 0, b"1\0").unwrap(),
                MsgType::Watch => {
                    let half = &header(MsgType::Read as u32, 7, 100)[..9];
                    [encode_message(m.ty, m.req_id, 0, b"OK\0").unwrap(), half.to_vec()].concat()
                }
                _ => return,
            };
            let _ = (&*out).write_all(&reply);
        });
        let xs = server.open();
        within(move || {
            let tx = xs.transaction().unwrap();
            let w = xs.watch("/w").unwrap();
            drop(w); // XS_UNWATCH, never answered
            drop(tx); // abort, never answered
            drop(xs); // the reader waits for the rest of the half message
        });
    }

    #[test]
    fn open_reports_missing_xenstore() {
        let err = XenStore::open_path("/nonexistent/xenstored/socket").unwrap_err();
        assert!(matches!(err, BackendError::Unavailable(m) if m.contains("/nonexistent")));
        let present = SOCKET_PATHS.iter().chain([&XENBUS_PATH]).any(|p| Path::new(p).exists());
        if !present {
            let err = XenStore::open().unwrap_err().to_string();
            assert!(
                err.contains("xenstore not found: neither /var/run/xenstored/socket nor /dev/xen/xenbus"),
                "{err}"
            );
        }
    }

    #[test]
    fn wire_rejects_bad_headers_and_payloads() {
        assert!(decode_header(&header(20, 1, 0)).is_err());
        assert!(decode_header(&header(2, 1, 4097)).is_err());
        assert!(decode_header(&header(2, 1, 4096)).is_ok());
        assert!(decode_header(&header(2, 1, 0)[..15]).is_err());
        assert!(encode_message(MsgType::Write, 1, 0, &[0; 4097]).is_err());
        assert_eq!(parse_error(b"ENOENT\0"), Ok("ENOENT"));
        assert!(parse_error(b"EN OENT\0").is_err() && parse_error(b"").is_err());
        assert!(parse_directory(b"a\0\0b\0").is_err());
        assert!(
            parse_perms(b"").is_err() && parse_perms(b"r70000\0").is_err() && parse_perms(b"x1\0").is_err()
        );
        assert!(parse_watch_event(b"/p\0").is_err() && parse_watch_event(b"/p\0t\0x\0").is_err());
        assert_eq!(parse_tx_id(b"42\0"), Ok(42));
        assert!(parse_tx_id(b"0\0").is_err() && parse_tx_id(b"+4\0").is_err());
        assert!(parse_domid(b"32752").is_err());
    }

    fn perm_strategy() -> impl Strategy<Value = Perm> {
        let kind = prop_oneof![
            Just(PermKind::None),
            Just(PermKind::Read),
            Just(PermKind::Write),
            Just(PermKind::Both)
        ];
        (any::<u16>(), kind).prop_map(|(d, kind)| Perm { domid: DomId(d), kind })
    }

    proptest! {
        #[test]
        fn messages_round_trip_through_any_chunking(
            msgs in prop::collection::vec(
                (prop::sample::select(MsgType::ALL), any::<u32>(), any::<u32>(),
                 prop::collection::vec(any::<u8>(), 0..=PAYLOAD_MAX)), 1..6),
            chunk in 1usize..5000,
        ) {
            let mut stream = Vec::new();
            for (ty, req, tx, payload) in &msgs {
                let bytes = encode_message(*ty, *req, *tx, payload).unwrap();
                let h = decode_header(&bytes).unwrap();
                prop_assert_eq!(h, Header { ty: *ty, req_id: *req, tx_id: *tx, len: payload.len() as u32 });
                stream.extend(bytes);
            }
            let mut frames = FrameReader::default();
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                frames.push(piece);
                while let Some(m) = frames.next_message().unwrap() {
                    got.push((m.ty, m.req_id, m.tx_id, m.payload));
                }
            }
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn payloads_round_trip(
            perms in prop::collection::vec(perm_strategy(), 1..8),
            names in prop::collection::vec("[a-zA-Z0-9_@-]{1,12}", 0..8),
            path in "[a-z/@]{1,20}", token in "[a-z0-9-]{0,12}",
        ) {
            prop_assert_eq!(parse_perms(&encode_perms(&perms)).unwrap(), perms);
            let listed = strings(&names).unwrap();
            prop_assert_eq!(parse_strings(&listed).unwrap(), names.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert_eq!(parse_directory(&listed).unwrap(), names);
            let event = strings(&[&path, &token]).unwrap();
            prop_assert_eq!(parse_strings(&event).unwrap(), [path.as_str(), token.as_str()]);
            let value = token.as_bytes();
            let written = write_payload(&path, value).unwrap();
            prop_assert_eq!(parse_write(&written).unwrap(), (path.as_str(), value));
            prop_assert_eq!(parse_watch_event(&event).unwrap(), (path, token));
        }

        #[test]
        fn decoders_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_message(&bytes);
            let _ = (parse_error(&bytes), parse_directory(&bytes), parse_perms(&bytes));
            let _ = (parse_watch_event(&bytes), parse_tx_id(&bytes), parse_domid(&bytes));
            let _ = (parse_strings(&bytes), parse_write(&bytes));
        }
    }
}
