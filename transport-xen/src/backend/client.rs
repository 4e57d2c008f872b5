//! The client side of a request/reply connection served by one reader thread.
//!
//! Both store clients (the simulator's and xenstore's) are built the same way: callers send
//! requests tagged with an id and block on a one-shot channel; a reader thread takes every
//! incoming message, completes the waiter registered under the reply's id, and routes watch
//! events into per-watch queues that poll readable through an eventfd. [`ClientCore`] is that
//! shared state, without any transport: the waiter table, the watch queues and the reason the
//! connection died. Each transport (a `SOCK_SEQPACKET` socket with fd passing, a byte stream of
//! xenstore frames) only reads, decodes and calls [`ClientCore::complete`],
//! [`ClientCore::deliver`] and, when it stops, [`ClientCore::fail`].
//!
//! Death is final and sticky: the first reason wins, every waiter is failed at once (its
//! channel sender is dropped), every later registration is refused with that reason, and every
//! watch's fd stays readable so that a poller keeps learning about the loss from
//! [`ClientCore::try_next`].

use std::collections::HashMap;
use std::hash::Hash;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use super::WatchEvents;

/// Locks `m`, ignoring poisoning: the data behind every mutex of a client stays consistent
/// across a panic (each critical section is one insert, remove or push).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A new non-blocking, close-on-exec eventfd.
pub fn eventfd() -> io::Result<OwnedFd> {
    Ok(rustix::event::eventfd(
        0,
        rustix::event::EventfdFlags::NONBLOCK | rustix::event::EventfdFlags::CLOEXEC,
    )?)
}

/// Sends one event on an eventfd (a full counter means an event is already pending).
pub fn signal(fd: impl AsFd) {
    match rustix::io::write(fd, &1u64.to_ne_bytes()) {
        Ok(_) | Err(rustix::io::Errno::AGAIN) => {}
        Err(e) => tracing::debug!("eventfd write failed: {e}"),
    }
}

/// Clears an eventfd; true if an event was pending.
pub fn drain(fd: impl AsFd) -> bool {
    let mut buf = [0u8; 8];
    matches!(rustix::io::read(fd, &mut buf), Ok(8))
}

/// A request id: made from a running counter (`u32` ids wrap, as xenstore's `req_id` does).
pub trait RequestId: Copy + Eq + Hash + Send {
    /// The id for the `n`-th request.
    fn from_counter(n: u64) -> Self;
}

impl RequestId for u64 {
    fn from_counter(n: u64) -> u64 {
        n
    }
}

impl RequestId for u32 {
    fn from_counter(n: u64) -> u32 {
        // Truncation is the wrap-around of a 32-bit request id.
        n as u32
    }
}

/// The events of one watch: a bounded queue ([`WatchEvents`]) and an eventfd that is readable
/// while the queue is non-empty, or once the connection is dead.
#[derive(Debug)]
pub struct WatchQueue {
    path: String,
    events: Mutex<WatchEvents>,
    efd: OwnedFd,
}

impl WatchQueue {
    /// The watched path, as given.
    pub fn path(&self) -> &str {
        &self.path
    }
}

impl AsFd for WatchQueue {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.efd.as_fd()
    }
}

struct Waiters<Id, W> {
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
    waiters: HashMap<Id, W>,
}

/// What the callers of a connection and its reader thread share (see the
/// [module documentation](self)): waiters of type `W` keyed by request ids of type `Id`, and
/// watch queues keyed by `K` (a watch id or token).
pub struct ClientCore<Id, W, K> {
    state: Mutex<Waiters<Id, W>>,
    next_id: AtomicU64,
    watches: Mutex<HashMap<K, Arc<WatchQueue>>>,
}

impl<Id, W, K> std::fmt::Debug for ClientCore<Id, W, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCore").field("dead", &lock(&self.state).dead).finish_non_exhaustive()
    }
}

impl<Id: RequestId, W, K: Eq + Hash> Default for ClientCore<Id, W, K> {
    fn default() -> Self {
        ClientCore::new()
    }
}

impl<Id: RequestId, W, K: Eq + Hash> ClientCore<Id, W, K> {
    /// A live connection with no waiters and no watches; request ids start at 1.
    pub fn new() -> Self {
        ClientCore {
            state: Mutex::new(Waiters { dead: None, waiters: HashMap::new() }),
            next_id: AtomicU64::new(1),
            watches: Mutex::new(HashMap::new()),
        }
    }

    /// Registers `waiter` under a fresh request id, skipping ids still in use (after a `u32`
    /// wrap-around). `Err` is the reason the connection died.
    pub fn register(&self, waiter: W) -> Result<Id, String> {
        let mut st = lock(&self.state);
        if let Some(reason) = &st.dead {
            return Err(reason.clone());
        }
        let mut id = Id::from_counter(self.next_id.fetch_add(1, Ordering::Relaxed));
        while st.waiters.contains_key(&id) {
            id = Id::from_counter(self.next_id.fetch_add(1, Ordering::Relaxed));
        }
        st.waiters.insert(id, waiter);
        Ok(id)
    }

    /// Removes and returns the waiter of request `id`: the reader completes it with the reply,
    /// a caller whose send failed withdraws it. `None` if nobody waits under `id`.
    pub fn complete(&self, id: Id) -> Option<W> {
        lock(&self.state).waiters.remove(&id)
    }

    /// How many request ids were handed out (ids skipped as in use count too).
    pub fn issued(&self) -> u64 {
        self.next_id.load(Ordering::Relaxed) - 1
    }

    /// Why the connection died, if it did.
    pub fn dead(&self) -> Option<String> {
        lock(&self.state).dead.clone()
    }

    /// Marks the connection dead with `reason` (the first reason wins): every waiter is dropped
    /// (its caller's channel reports the loss), later registrations fail, every watch's fd
    /// becomes readable for good. True if this call killed it.
    pub fn fail(&self, reason: String) -> bool {
        let waiters = {
            let mut st = lock(&self.state);
            if st.dead.is_some() {
                return false;
            }
            st.dead = Some(reason);
            std::mem::take(&mut st.waiters)
        };
        // Dropped outside the lock: a waiter's drop may do anything.
        drop(waiters);
        for q in lock(&self.watches).values() {
            signal(&q.efd);
        }
        true
    }

    /// A new watch queue for `path` under `key`, registered before the watch request is sent
    /// so that the event a watch fires at once finds it. On a dead connection its fd starts
    /// readable.
    pub fn add_watch(&self, key: K, path: &str) -> io::Result<Arc<WatchQueue>> {
        let q = Arc::new(WatchQueue {
            path: path.into(),
            events: Mutex::new(WatchEvents::new(path)),
            efd: eventfd()?,
        });
        lock(&self.watches).insert(key, q.clone());
        if self.dead().is_some() {
            signal(&q.efd);
        }
        Ok(q)
    }

    /// Forgets the watch under `key`: its later events are dropped.
    pub fn remove_watch(&self, key: &K) {
        lock(&self.watches).remove(key);
    }

    /// Queues an event for the watch under `key` and wakes it. False if no such watch exists
    /// (one being removed).
    pub fn deliver(&self, key: &K, path: String) -> bool {
        let Some(q) = lock(&self.watches).get(key).cloned() else { return false };
        lock(&q.events).push(path);
        signal(&q.efd);
        true
    }

    /// The next event of `q` without blocking; `Err` with the reason once the connection is
    /// dead and nothing is queued. The fd is drained only when the queue is empty and the
    /// connection alive: once dead it stays readable, so a poller keeps learning about it.
    pub fn try_next(&self, q: &WatchQueue) -> Result<Option<String>, String> {
        let mut events = lock(&q.events);
        let next = events.pop();
        let dead = self.dead();
        if events.is_empty() && dead.is_none() {
            drain(&q.efd);
        }
        match (next, dead) {
            (Some(path), _) => Ok(Some(path)),
            (None, Some(reason)) => Err(reason),
            (None, None) => Ok(None),
        }
    }

    /// Each live watch's path (as given) and how many of its events are queued, sorted: for
    /// diagnostics and tests.
    pub fn watches(&self) -> Vec<(String, usize)> {
        let mut v: Vec<(String, usize)> =
            lock(&self.watches).values().map(|q| (q.path.clone(), lock(&q.events).len())).collect();
        v.sort();
        v
    }

    /// How many times the queues of the live watches collapsed (see [`WatchEvents::collapsed`]).
    pub fn watch_collapses(&self) -> u64 {
        lock(&self.watches).values().map(|q| lock(&q.events).collapsed()).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

    use super::*;

    type Core = ClientCore<u32, SyncSender<&'static str>, u64>;

    fn waiter() -> (SyncSender<&'static str>, Receiver<&'static str>) {
        sync_channel(1)
    }

    fn readable(fd: impl AsFd) -> bool {
        let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
        let zero = rustix::event::Timespec { tv_sec: 0, tv_nsec: 0 };
        rustix::event::poll(&mut fds, Some(&zero)).unwrap_or(0) == 1
    }

    #[test]
    fn a_waiter_is_completed_by_its_id() {
        let core = Core::new();
        let (t1, r1) = waiter();
        let (t2, r2) = waiter();
        let (a, b) = (core.register(t1).unwrap(), core.register(t2).unwrap());
        assert_ne!(a, b);
        core.complete(b).unwrap().send("b").unwrap();
        assert_eq!(r2.recv(), Ok("b"));
        assert!(r1.try_recv().is_err());
        assert!(core.complete(b).is_none(), "a waiter completes once");
        core.complete(a).unwrap().send("a").unwrap();
        assert_eq!(r1.recv(), Ok("a"));
        assert_eq!(core.issued(), 2);
    }

    #[test]
    fn death_fails_every_waiter_and_wakes_every_watch() {
        let core = Core::new();
        let (t1, r1) = waiter();
        let (t2, r2) = waiter();
        core.register(t1).unwrap();
        core.register(t2).unwrap();
        let q = core.add_watch(7, "/w").unwrap();
        assert!(core.deliver(&7, "/w".into()));
        assert_eq!(core.try_next(&q), Ok(Some("/w".into())));
        assert!(!readable(&*q), "an empty queue of a live connection is not readable");
        assert_eq!(core.try_next(&q), Ok(None));
        assert!(core.fail("first".into()));
        assert!(!core.fail("second".into()), "the first reason wins");
        assert!(r1.recv().is_err() && r2.recv().is_err());
        assert_eq!(core.register(waiter().0), Err("first".into()));
        for _ in 0..2 {
            assert!(readable(&*q), "a dead connection's watch stays readable");
            assert_eq!(core.try_next(&q), Err("first".into()));
        }
        let late = core.add_watch(8, "/late").unwrap();
        assert!(readable(&*late));
    }

    #[test]
    fn queued_events_drain_before_the_loss_shows() {
        let core = Core::new();
        let q = core.add_watch(1, "/w").unwrap();
        core.deliver(&1, "/w/a".into());
        core.deliver(&1, "/w/b".into());
        core.fail("gone".into());
        assert_eq!(core.try_next(&q), Ok(Some("/w/a".into())));
        assert!(readable(&*q));
        assert_eq!(core.try_next(&q), Ok(Some("/w/b".into())));
        assert_eq!(core.try_next(&q), Err("gone".into()));
        assert_eq!(core.watches(), [("/w".to_string(), 0)]);
        core.remove_watch(&1);
        assert!(!core.deliver(&1, "/w/c".into()));
        assert!(core.watches().is_empty());
    }

    #[test]
    fn ids_in_use_are_skipped_after_wrapping() {
        let core = Core::new();
        let (t, _r) = waiter();
        let first = core.register(t).unwrap();
        assert_eq!(first, 1);
        // The counter wraps to id 0, then 1 (still waiting), which must be skipped.
        core.next_id.store(u64::from(u32::MAX), Ordering::Relaxed);
        let ids: Vec<u32> = (0..3).map(|_| core.register(waiter().0).unwrap()).collect();
        assert_eq!(ids, [u32::MAX, 0, 2]);
    }
}
