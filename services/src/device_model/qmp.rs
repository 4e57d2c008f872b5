//! A QMP client: one connection to one qemu's QMP unix socket, typed commands in, typed answers
//! and events out.
//!
//! The commands, their answers and the events are `qapi-qmp`'s types (generated from QEMU 9.1's
//! schema); [`Qmp::execute_raw`] reaches commands newer than that schema. The transport is
//! written here rather than taken from `qapi`'s `QmpStreamTokio`, because a qemu serving a guest
//! may be compromised and that stream trusts it:
//! - its line reader (`JsonLinesCodec`) searches for a newline with no bound on the line's length:
//!   a qemu that never sends one makes us allocate without limit. Here a line is at most
//!   [`MAX_LINE`] bytes.
//! - it reads every message as `QmpMessage<Any>`, an untagged enum over the 9.1 schema's events:
//!   an event that schema cannot parse (a newer qemu's, or a known one with other data) is a
//!   decoding error that ends the whole stream. Here it is a [`QmpEvent::Other`].
//! - it writes through `AsyncWrite` and cannot pass a file descriptor (`SCM_RIGHTS`), which
//!   `getfd` and `add-fd` need ([`Qmp::execute_with_fd`]).
//! - without the `oob` capability every command has id 0; a call cancelled (by a timeout) leaves
//!   its id pending and the next command panics ("QAPI duplicate command id"). Here ids are
//!   unique, and a cancelled call's slot stays taken until its late answer arrives and is dropped.
//!
//! One reader task per connection reads qemu's lines ([`wire`]: the pure part), completes the
//! pending calls, and hands events to the caller's `on_notice` in order; anything that breaks the
//! protocol ends the connection, fails the calls in flight, and gives one final
//! [`QmpNotice::Closed`].

pub mod wire;

use std::collections::HashMap;
use std::fmt;
use std::os::fd::BorrowedFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot, watch};

use wire::{Failure, LineSplitter, Message};
pub use wire::{MAX_LINE, QemuVersion, QmpEvent};

/// The oldest qemu dombus drives (major, minor): 7.0.
pub const MIN_VERSION: (u32, u32) = (7, 0);

/// The most commands in flight on one connection; more calls wait for a slot (within their
/// deadline).
pub const MAX_IN_FLIGHT: usize = 8;

/// What the reader task tells the connection's owner, in order.
#[derive(Debug, Clone)]
pub enum QmpNotice {
    /// qemu sent an event.
    Event(QmpEvent),
    /// The connection ended, and why ("qemu closed its QMP socket", "line longer than 1 MiB",
    /// …); the last notice.
    Closed(String),
}

/// What went wrong with a QMP call or connection; each names the command (`connect` for the
/// connection itself).
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// Reading or writing the socket failed.
    #[error("QMP {command}: {source}")]
    Io {
        /// The command.
        command: String,
        /// The socket's error.
        #[source]
        source: std::io::Error,
    },
    /// The connection ended before the answer.
    #[error("QMP {command}: the connection to qemu ended: {reason}")]
    Closed {
        /// The command.
        command: String,
        /// Why the connection ended.
        reason: String,
    },
    /// No answer (or no greeting, for `connect`) within the deadline; the call is forgotten.
    #[error("QMP {command}: qemu did not answer in time")]
    Timeout {
        /// The command.
        command: String,
    },
    /// qemu broke the protocol (the connection is dropped), or its answer does not match the
    /// command's schema (the call fails, the connection stays).
    #[error("QMP {command}: protocol violation: {reason}")]
    Protocol {
        /// The command.
        command: String,
        /// What was wrong.
        reason: String,
    },
    /// This qemu does not have the command.
    #[error("qemu {version} has no command '{command}'")]
    CommandNotFound {
        /// The command.
        command: String,
        /// The qemu's version.
        version: QemuVersion,
    },
    /// qemu's error answer.
    #[error("QMP {command}: {class}: {desc}")]
    Command {
        /// The command.
        command: String,
        /// The error class (`GenericError`, `DeviceNotFound`, …).
        class: String,
        /// qemu's description.
        desc: String,
    },
    /// The qemu is older than [`MIN_VERSION`].
    #[error("qemu {version} is too old: dombus needs qemu {}.{} or newer", need.0, need.1)]
    TooOld {
        /// The qemu's version.
        version: QemuVersion,
        /// The oldest version dombus drives (major, minor).
        need: (u32, u32),
    },
}

/// A connection to one qemu's QMP socket; cheap to clone (the clones share the connection),
/// `Send + Sync`. The connection ends when qemu closes it, breaks the protocol, or the last
/// clone is dropped.
#[derive(Clone)]
pub struct Qmp {
    inner: Arc<Inner>,
}

impl fmt::Debug for Qmp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Qmp").field("version", &self.inner.version).finish_non_exhaustive()
    }
}

/// What the clones of a [`Qmp`] share; dropping it stops the reader.
struct Inner {
    version: QemuVersion,
    timeout: Duration,
    writer: tokio::sync::Mutex<Writer>,
    state: Arc<State>,
    slots: Arc<Semaphore>,
    next_id: AtomicU64,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.state.stop("the QMP client was dropped");
    }
}

/// The socket's write half, and whether a write was cut in the middle of a line (a cancelled
/// call): then the stream is corrupt and the connection must end.
struct Writer {
    half: OwnedWriteHalf,
    torn: bool,
}

/// What the reader task shares with the callers.
struct State {
    pending: Mutex<Pending>,
    /// `Some(reason)` once the connection has ended.
    closed: watch::Sender<Option<String>>,
    /// Wakes the reader to end the connection (the client dropped, a torn write).
    stop: Notify,
    stop_reason: Mutex<Option<String>>,
}

/// The calls awaiting an answer; each holds one of the [`MAX_IN_FLIGHT`] slots, so the map never
/// grows past that.
#[derive(Default)]
struct Pending {
    calls: HashMap<u64, Call>,
    /// Why the connection ended, once it has: no call is added after.
    ended: Option<String>,
}

/// One call in flight. Its slot is released when the answer arrives (or the connection ends),
/// even if the caller gave up: a late answer is then dropped.
struct Call {
    reply: oneshot::Sender<Result<Value, Failure>>,
    _slot: OwnedSemaphorePermit,
}

impl State {
    fn stop(&self, reason: &str) {
        if let Ok(mut r) = self.stop_reason.lock() {
            r.get_or_insert_with(|| reason.to_owned());
        }
        self.stop.notify_one();
    }

    /// Ends the connection for the callers: pending calls fail, no new call starts.
    fn end(&self, reason: &str) {
        let calls = match self.pending.lock() {
            Ok(mut p) => {
                p.ended.get_or_insert_with(|| reason.to_owned());
                std::mem::take(&mut p.calls)
            }
            Err(_) => HashMap::new(),
        };
        // Dropping the senders fails the receivers: they read `ended`.
        drop(calls);
        self.closed.send_replace(Some(reason.to_owned()));
    }

    fn ended(&self) -> Option<String> {
        match self.pending.lock() {
            Ok(p) => p.ended.clone(),
            Err(_) => Some("the QMP client's state is poisoned".to_owned()),
        }
    }
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting (one line of at most
    /// [`MAX_LINE`] bytes), checks the version (at least [`MIN_VERSION`], else
    /// [`QmpError::TooOld`]) and leaves capabilities negotiation (`qmp_capabilities`), all within
    /// `timeout`, which is also every later call's deadline.
    ///
    /// `on_notice` is called from the reader task for every event, in order, and once with
    /// [`QmpNotice::Closed`] at the end (EOF, I/O error, protocol violation, the last clone
    /// dropped); it must not block.
    pub async fn connect(
        path: &Path,
        timeout: Duration,
        on_notice: impl Fn(QmpNotice) + Send + Sync + 'static,
    ) -> Result<Qmp, QmpError> {
        let io = |source| QmpError::Io { command: format!("connect {}", path.display()), source };
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout { command: "connect".into() })?
            .map_err(io)?;
        Qmp::from_stream(stream, timeout, on_notice).await
    }

    /// [`Qmp::connect`] over a socket already connected to qemu's monitor (the daemon's end of
    /// the socket pair whose other end qemu was started with).
    pub async fn from_stream(
        stream: UnixStream,
        timeout: Duration,
        on_notice: impl Fn(QmpNotice) + Send + Sync + 'static,
    ) -> Result<Qmp, QmpError> {
        let (read, write, splitter, version) = tokio::time::timeout(timeout, async {
            let (mut read, write) = stream.into_split();
            let mut splitter = LineSplitter::new(MAX_LINE);
            let greeting = read_greeting(&mut read, &mut splitter).await?;
            let version = wire::parse_greeting(&greeting)
                .map_err(|v| QmpError::Protocol { command: "connect".into(), reason: v.to_string() })?;
            Ok::<_, QmpError>((read, write, splitter, version))
        })
        .await
        .map_err(|_| QmpError::Timeout { command: "connect (the QMP greeting)".into() })??;
        if (version.major, version.minor) < MIN_VERSION {
            return Err(QmpError::TooOld { version, need: MIN_VERSION });
        }
        let (closed, _) = watch::channel(None);
        let state = Arc::new(State {
            pending: Mutex::new(Pending::default()),
            closed,
            stop: Notify::new(),
            stop_reason: Mutex::new(None),
        });
        tokio::spawn(read_loop(read, splitter, state.clone(), on_notice));
        let qmp = Qmp {
            inner: Arc::new(Inner {
                version,
                timeout,
                writer: tokio::sync::Mutex::new(Writer { half: write, torn: false }),
                state,
                slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
                next_id: AtomicU64::new(0),
            }),
        };
        qmp.execute(qapi::qmp::qmp_capabilities { enable: None }).await?;
        Ok(qmp)
    }

    /// The qemu's version, from its greeting.
    pub fn version(&self) -> &QemuVersion {
        &self.inner.version
    }

    /// Runs a typed command and returns its typed answer, within the connection's deadline
    /// ([`QmpError::Timeout`] after it; the call is then forgotten and its late answer dropped).
    pub async fn execute<C: qapi::qmp::QmpCommand>(&self, cmd: C) -> Result<C::Ok, QmpError> {
        self.execute_within(cmd, self.inner.timeout).await
    }

    /// [`Qmp::execute`] with a deadline of its own (a command known to be slow).
    pub async fn execute_within<C: qapi::qmp::QmpCommand>(
        &self,
        cmd: C,
        timeout: Duration,
    ) -> Result<C::Ok, QmpError> {
        let value = self.call(C::NAME, Body::Typed(&cmd), None, timeout).await?;
        typed::<C>(value)
    }

    /// Runs a typed command passing `fd` with it (`SCM_RIGHTS`), for `getfd` and `add-fd`.
    pub async fn execute_with_fd<C: qapi::qmp::QmpCommand>(
        &self,
        cmd: C,
        fd: BorrowedFd<'_>,
    ) -> Result<C::Ok, QmpError> {
        let value = self.call(C::NAME, Body::Typed(&cmd), Some(fd), self.inner.timeout).await?;
        typed::<C>(value)
    }

    /// Runs the command `name` with the JSON arguments `args` (an object, or `null` for none),
    /// for commands newer than the schema; its answer as JSON.
    pub async fn execute_raw(&self, name: &str, args: Value) -> Result<Value, QmpError> {
        self.call(name, Body::Raw(args), None, self.inner.timeout).await
    }

    /// Resolves when the connection has ended; the reason.
    pub async fn closed(&self) -> String {
        let mut rx = self.inner.state.closed.subscribe();
        match rx.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "the QMP reader ended".to_owned(),
        }
    }

    /// One command: a slot, an id, the line written (with `fd` if any), the answer awaited,
    /// all within `timeout`.
    async fn call(
        &self,
        name: &str,
        body: Body<'_>,
        fd: Option<BorrowedFd<'_>>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let inner = &self.inner;
        let closed = |reason: String| QmpError::Closed { command: name.to_owned(), reason };
        let work = async {
            let slot = inner.slots.clone().acquire_owned().await.map_err(|_| closed("no slot".into()))?;
            let id = inner.next_id.fetch_add(1, Ordering::Relaxed);
            let line = body.line(name, id)?;
            let (reply, answer) = oneshot::channel();
            {
                let mut p = inner.state.pending.lock().map_err(|_| closed("poisoned".into()))?;
                if let Some(reason) = &p.ended {
                    return Err(closed(reason.clone()));
                }
                p.calls.insert(id, Call { reply, _slot: slot });
            }
            if let Err(e) = self.write(name, &line, fd).await {
                // Not sent: its slot is free again.
                if let Ok(mut p) = inner.state.pending.lock() {
                    p.calls.remove(&id);
                }
                return Err(e);
            }
            match answer.await {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(failure)) => Err(self.failure(name, failure)),
                Err(_) => {
                    Err(closed(inner.state.ended().unwrap_or_else(|| "the call was dropped".to_owned())))
                }
            }
        };
        tokio::time::timeout(timeout, work)
            .await
            .map_err(|_| QmpError::Timeout { command: name.to_owned() })?
    }

    /// Writes one command line; a write cut short (the call cancelled) marks the stream torn,
    /// which ends the connection at the next write.
    async fn write(&self, name: &str, line: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<(), QmpError> {
        let io = |source| QmpError::Io { command: name.to_owned(), source };
        let mut w = self.inner.writer.lock().await;
        if w.torn {
            let reason = "a command was cancelled while being written";
            self.inner.state.stop(reason);
            return Err(QmpError::Closed { command: name.to_owned(), reason: reason.to_owned() });
        }
        w.torn = true;
        let mut rest = line;
        if let Some(fd) = fd {
            let sent = send_with_fd(w.half.as_ref(), line, fd).await.map_err(io)?;
            rest = line.get(sent..).unwrap_or_default();
        }
        w.half.write_all(rest).await.map_err(io)?;
        w.torn = false;
        Ok(())
    }

    fn failure(&self, name: &str, failure: Failure) -> QmpError {
        if failure.class == "CommandNotFound" {
            QmpError::CommandNotFound { command: name.to_owned(), version: self.inner.version.clone() }
        } else {
            QmpError::Command { command: name.to_owned(), class: failure.class, desc: failure.desc }
        }
    }
}

/// A command's arguments: typed (serialized as `qapi::Execute`) or raw JSON.
enum Body<'a> {
    Typed(&'a dyn erased::Typed),
    Raw(Value),
}

/// Object-safe serialization of a typed command with its id (so that `call` is not generic).
mod erased {
    /// A typed command that writes its `Execute` line.
    pub trait Typed: Send + Sync {
        fn line(&self, id: u64) -> serde_json::Result<Vec<u8>>;
    }

    impl<C: qapi::qmp::QmpCommand> Typed for C {
        fn line(&self, id: u64) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec(&qapi::Execute::<&C, u64>::with_id(self, id))
        }
    }
}

impl Body<'_> {
    fn line(&self, name: &str, id: u64) -> Result<Vec<u8>, QmpError> {
        let mut line = match self {
            Body::Typed(cmd) => cmd.line(id),
            Body::Raw(args) => {
                let mut object = serde_json::Map::new();
                object.insert("execute".into(), Value::String(name.to_owned()));
                if !args.is_null() {
                    object.insert("arguments".into(), args.clone());
                }
                object.insert("id".into(), Value::from(id));
                serde_json::to_vec(&object)
            }
        }
        .map_err(|e| QmpError::Protocol {
            command: name.to_owned(),
            reason: format!("cannot serialize: {e}"),
        })?;
        line.push(b'\n');
        Ok(line)
    }
}

/// A `return` value read as the command's answer type.
fn typed<C: qapi::qmp::QmpCommand>(value: Value) -> Result<C::Ok, QmpError> {
    serde_json::from_value(value).map_err(|e| QmpError::Protocol {
        command: C::NAME.to_owned(),
        reason: format!("the answer does not match the schema: {e}"),
    })
}

/// Sends the start of `line` with `fd` attached (`SCM_RIGHTS`); how many bytes went.
async fn send_with_fd(stream: &UnixStream, line: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<usize> {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags, sendmsg};
    use std::mem::MaybeUninit;
    loop {
        stream.writable().await?;
        let sent = stream.try_io(tokio::io::Interest::WRITABLE, || {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            let fds = [fd];
            if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
                return Err(std::io::Error::other("no room for the descriptor's control message"));
            }
            let iov = [std::io::IoSlice::new(line)];
            sendmsg(stream, &iov, &mut control, SendFlags::NOSIGNAL).map_err(std::io::Error::from)
        });
        match sent {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads the greeting: the first non-blank line, within [`MAX_LINE`].
async fn read_greeting(read: &mut OwnedReadHalf, splitter: &mut LineSplitter) -> Result<Vec<u8>, QmpError> {
    let protocol = |reason: String| QmpError::Protocol { command: "connect".into(), reason };
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = Vec::new();
    loop {
        let n =
            read.read(&mut buf).await.map_err(|source| QmpError::Io { command: "connect".into(), source })?;
        if n == 0 {
            return Err(QmpError::Closed {
                command: "connect".into(),
                reason: "qemu closed its QMP socket before its greeting".into(),
            });
        }
        splitter.push(buf.get(..n).unwrap_or_default(), &mut lines).map_err(|v| protocol(v.to_string()))?;
        let mut found = lines.drain(..).filter(|l| !wire::is_blank(l));
        if let Some(greeting) = found.next() {
            if found.next().is_some() {
                return Err(protocol("a message before capabilities negotiation".into()));
            }
            return Ok(greeting);
        }
    }
}

/// The reader task: lines in, answers to their calls, events to `on_notice`, until the end.
async fn read_loop(
    mut read: OwnedReadHalf,
    mut splitter: LineSplitter,
    state: Arc<State>,
    on_notice: impl Fn(QmpNotice) + Send + Sync + 'static,
) {
    let reason = read_until_end(&mut read, &mut splitter, &state, &on_notice).await;
    state.end(&reason);
    on_notice(QmpNotice::Closed(reason));
}

/// Reads until the connection ends; why it ended.
async fn read_until_end(
    read: &mut OwnedReadHalf,
    splitter: &mut LineSplitter,
    state: &State,
    on_notice: &(impl Fn(QmpNotice) + Send + Sync),
) -> String {
    let mut buf = vec![0u8; 64 * 1024];
    let mut lines = Vec::new();
    loop {
        let n = tokio::select! {
            r = read.read(&mut buf) => match r {
                Ok(0) => return "qemu closed its QMP socket".to_owned(),
                Ok(n) => n,
                // qemu exiting with bytes of ours unread resets the connection: a close too.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return "qemu closed its QMP socket (connection reset)".to_owned();
                }
                Err(e) => return format!("reading the QMP socket: {e}"),
            },
            () = state.stop.notified() => {
                let reason = state.stop_reason.lock().ok().and_then(|r| r.clone());
                return reason.unwrap_or_else(|| "stopped".to_owned());
            }
        };
        if let Err(v) = splitter.push(buf.get(..n).unwrap_or_default(), &mut lines) {
            return v.to_string();
        }
        for line in lines.drain(..) {
            if wire::is_blank(&line) {
                continue;
            }
            match wire::classify(&line) {
                Ok(Message::Event(event)) => on_notice(QmpNotice::Event(event)),
                Ok(Message::Answer { id, result }) => {
                    let call = match state.pending.lock() {
                        Ok(mut p) => p.calls.remove(&id),
                        Err(_) => return "the QMP client's state is poisoned".to_owned(),
                    };
                    match call {
                        // The caller may have given up (timeout): the answer is dropped.
                        Some(call) => drop(call.reply.send(result)),
                        None => return format!("an answer with id {id}, which no call awaits"),
                    }
                }
                Err(v) => return v.to_string(),
            }
        }
    }
}
