//! Subscriptions: events a service pushes to its callers, never silently lost.
//!
//! tarpc has no server streaming, so a subscription is a long poll (docs/rpc.md,
//! "Subscriptions"). A service publishes into a [`Topic`]: a bounded ring of recent events with
//! an *epoch* (random, new with every topic, so with every server start). A stream method of a
//! `#[dombus::service]` trait returns [`Events`] — a view of a topic, filtered by the method's
//! arguments — and the generated client turns it into a [`Subscription`], a `futures::Stream`
//! of [`Update`]s that polls `method(cursor)` again and again:
//!
//! * Every event carries its [`Cursor`] (epoch, sequence number). A poll answers the events
//!   after its cursor, or waits (up to its wait and within its deadline) until there are some.
//! * When the server cannot answer every event after the cursor — the ring no longer holds
//!   them, the cursor is of another epoch (the server restarted), or it is no cursor of this
//!   topic — the answer is an explicit [`Update::Resync`] with the reason, the new cursor and
//!   the current state where the topic offers a snapshot. Gaps are never silent, and no event
//!   is delivered twice: a subscription takes only events after its cursor.
//! * A subscription keeps its cursor across failed polls, reconnections, server restarts,
//!   transport resets and migrations, so it resumes where it was (or resyncs, explicitly).
//!
//! What a subscriber can make the server hold is bounded: the ring is bounded per topic in
//! events and bytes whatever the number of subscribers, a poll holds no more than one batch
//! (at most [`MAX_BATCH_EVENTS`] events, [`MAX_BATCH_BYTES`] bytes), and a subscriber that
//! never polls costs nothing. Publishing never waits for a subscriber.
//!
//! A resync's snapshot is taken after its cursor is read: every change after the cursor comes
//! as an event, and the newest of them may already show in the snapshot (apply events as
//! updates of state, as after a list-then-watch).

use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll as TaskPoll};
use std::time::{Duration, Instant};

use futures::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tarpc::ServerError;
use tarpc::client::RpcError;

use crate::client::RawClient;
use crate::codec::Codec;
use crate::wire;

/// Most events one poll answers.
pub const MAX_BATCH_EVENTS: u32 = 1024;
/// Most bytes of events one poll answers (as the topic weighs them; one larger event still goes
/// alone).
pub const MAX_BATCH_BYTES: usize = 256 << 10;
/// Longest a poll waits for an event on the server.
pub const MAX_WAIT: Duration = Duration::from_secs(30);
/// Least time between polls that found nothing, when the server answers them at once.
const EMPTY_POLL_FLOOR: Duration = Duration::from_millis(10);

/// A position in a topic's history: after the event `seq` of the topic whose epoch is `epoch`
/// (`seq` 0: before the first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Cursor {
    /// The topic's epoch: random, new with every start of the server.
    pub epoch: u64,
    /// The last event seen (events are numbered from 1).
    pub seq: u64,
}

impl fmt::Display for Cursor {
    /// `EPOCH:SEQ`, the epoch in hexadecimal (what `--from` takes back).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}:{}", self.epoch, self.seq)
    }
}

impl FromStr for Cursor {
    type Err = String;

    fn from_str(s: &str) -> Result<Cursor, String> {
        let bad = || format!("{s:?} is not a cursor (EPOCH:SEQ, the epoch in hexadecimal)");
        let (epoch, seq) = s.split_once(':').ok_or_else(bad)?;
        let epoch = u64::from_str_radix(epoch, 16).map_err(|_| bad())?;
        let seq = seq.parse().map_err(|_| bad())?;
        Ok(Cursor { epoch, seq })
    }
}

/// Why a subscription's history was cut short: the events between its cursor and the new one
/// are not delivered, and the state comes again as a snapshot (where the topic has one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResyncReason {
    /// The subscription started without a cursor: here is the state, and where it stands.
    Start,
    /// The cursor is of another epoch: the server restarted (or the topic was made again), and
    /// what happened in between is not known.
    NewEpoch {
        /// The cursor's epoch.
        previous: u64,
    },
    /// The server no longer holds events after the cursor (its ring is bounded, and the
    /// subscriber fell behind), or could not encode them: the `count` events between the cursor
    /// and the resync's will not be delivered.
    Missed {
        /// Events not delivered.
        count: u64,
    },
    /// The cursor is ahead of the topic: not a cursor this topic gave.
    UnknownCursor,
}

impl fmt::Display for ResyncReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResyncReason::Start => write!(f, "subscribed"),
            ResyncReason::NewEpoch { previous } => {
                write!(f, "the server's history restarted (epoch {previous:016x} is gone)")
            }
            ResyncReason::Missed { count } => {
                write!(f, "{count} events missed (fell behind the server's ring)")
            }
            ResyncReason::UnknownCursor => write!(f, "the cursor is not one of this topic's"),
        }
    }
}

/// What a subscription delivers.
#[derive(Debug, Clone, PartialEq)]
pub enum Update<T, S> {
    /// One event, in order.
    Event {
        /// Where the subscription stands after it.
        cursor: Cursor,
        /// The event.
        event: T,
    },
    /// History was cut short ([`ResyncReason`]): the events before `cursor` that the
    /// subscription has not seen will never come; `snapshot` is the current state, where the
    /// topic offers one. Events after `cursor` follow.
    Resync {
        /// Where the subscription stands now.
        cursor: Cursor,
        /// Why.
        reason: ResyncReason,
        /// The current state (taken after `cursor` was read).
        snapshot: Option<S>,
    },
}

impl<T, S> Update<T, S> {
    /// Where the subscription stands after this update.
    pub fn cursor(&self) -> Cursor {
        match self {
            Update::Event { cursor, .. } | Update::Resync { cursor, .. } => *cursor,
        }
    }
}

/// Bounds of a [`Topic`]'s ring: the oldest events go when either is passed (the newest event
/// always stays).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopicLimits {
    /// Events held.
    pub max_events: usize,
    /// Bytes of events held (each weighed as its bincode encoding).
    pub max_bytes: usize,
}

impl Default for TopicLimits {
    /// 1,024 events, 1 MiB.
    fn default() -> Self {
        TopicLimits { max_events: 1024, max_bytes: 1 << 20 }
    }
}

/// A topic's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TopicStats {
    /// Events published since the topic was made (the last sequence number).
    pub published: u64,
    /// Events in the ring now.
    pub retained: usize,
    /// Their weight, bytes.
    pub retained_bytes: usize,
    /// Events that left the ring (the oldest, to keep within its limits).
    pub evicted: u64,
    /// Events that could not be encoded, delivered as gaps ([`ResyncReason::Missed`]).
    pub unencodable: u64,
}

struct Entry<T> {
    seq: u64,
    bytes: usize,
    /// `None`: an event that did not encode, kept as a gap.
    event: Option<T>,
}

struct Ring<T> {
    entries: VecDeque<Entry<T>>,
    bytes: usize,
    stats: TopicStats,
}

type Snapshot<S> = Arc<dyn Fn() -> S + Send + Sync>;
type Filter<T> = Arc<dyn Fn(&T) -> bool + Send + Sync>;

struct Shared<T, S> {
    epoch: u64,
    limits: TopicLimits,
    ring: Mutex<Ring<T>>,
    /// The last sequence number published: polls wait on it.
    head: tokio::sync::watch::Sender<u64>,
    snapshot: Option<Snapshot<S>>,
}

/// Where a service publishes the events of one stream: a bounded ring of recent events, read
/// by the subscribers' polls. Cheap to clone (clones publish into the same topic).
pub struct Topic<T, S = ()> {
    shared: Arc<Shared<T, S>>,
}

impl<T, S> Clone for Topic<T, S> {
    fn clone(&self) -> Self {
        Topic { shared: self.shared.clone() }
    }
}

impl<T, S> fmt::Debug for Topic<T, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Topic")
            .field("epoch", &self.shared.epoch)
            .field("limits", &self.shared.limits)
            .finish()
    }
}

/// A new random epoch (the OS's randomness, through std's hasher keys, mixed with the time).
fn new_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

impl<T: Serialize + Clone + Send + Sync + 'static, S: Send + 'static> Topic<T, S> {
    /// A topic whose resyncs carry no snapshot.
    pub fn new(limits: TopicLimits) -> Topic<T, S> {
        Topic::make(limits, None)
    }

    /// A topic whose resyncs carry the state `snapshot` returns (called as a resync is
    /// answered, outside the topic's lock).
    pub fn with_snapshot(
        limits: TopicLimits,
        snapshot: impl Fn() -> S + Send + Sync + 'static,
    ) -> Topic<T, S> {
        Topic::make(limits, Some(Arc::new(snapshot)))
    }

    fn make(limits: TopicLimits, snapshot: Option<Snapshot<S>>) -> Topic<T, S> {
        let limits = TopicLimits { max_events: limits.max_events.max(1), max_bytes: limits.max_bytes };
        Topic {
            shared: Arc::new(Shared {
                epoch: new_epoch(),
                limits,
                ring: Mutex::new(Ring { entries: VecDeque::new(), bytes: 0, stats: TopicStats::default() }),
                head: tokio::sync::watch::Sender::new(0),
                snapshot,
            }),
        }
    }

    /// Publishes `event`; answers its cursor. Never waits for a subscriber: the oldest events
    /// leave the ring when it is full, and subscribers that had not read them get a resync.
    pub fn publish(&self, event: T) -> Cursor {
        // Weighed (and checked to encode) outside the lock.
        let (bytes, event) = match Codec::Bincode.encode(&event) {
            Ok(b) => (b.len(), Some(event)),
            Err(e) => {
                tracing::error!(error = %e, "an event does not encode: delivered as a gap");
                (0, None)
            }
        };
        let seq = {
            let mut ring = lock(&self.shared.ring);
            let seq = ring.stats.published + 1;
            ring.stats.published = seq;
            if event.is_none() {
                ring.stats.unencodable += 1;
            }
            ring.entries.push_back(Entry { seq, bytes, event });
            ring.bytes += bytes;
            let limits = self.shared.limits;
            while ring.entries.len() > 1
                && (ring.entries.len() > limits.max_events || ring.bytes > limits.max_bytes)
            {
                if let Some(old) = ring.entries.pop_front() {
                    ring.bytes -= old.bytes;
                    ring.stats.evicted += 1;
                }
            }
            seq
        };
        self.shared.head.send_replace(seq);
        Cursor { epoch: self.shared.epoch, seq }
    }

    /// The cursor after the last event published.
    pub fn cursor(&self) -> Cursor {
        Cursor { epoch: self.shared.epoch, seq: *self.shared.head.borrow() }
    }

    /// The counters.
    pub fn stats(&self) -> TopicStats {
        let ring = lock(&self.shared.ring);
        TopicStats { retained: ring.entries.len(), retained_bytes: ring.bytes, ..ring.stats }
    }

    /// Every event of the topic, for a stream method to return.
    pub fn events(&self) -> Events<T, S> {
        Events {
            topic: Some(self.clone()),
            filter: None,
            snapshot: self.shared.snapshot.clone(),
            refusal: None,
        }
    }

    /// The events for which `keep` is true (the others still move the subscriber's cursor).
    pub fn events_where(&self, keep: impl Fn(&T) -> bool + Send + Sync + 'static) -> Events<T, S> {
        Events { filter: Some(Arc::new(keep)), ..self.events() }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a stream method returns: a view of a [`Topic`] (maybe filtered), or a refusal.
pub struct Events<T, S = ()> {
    topic: Option<Topic<T, S>>,
    filter: Option<Filter<T>>,
    snapshot: Option<Snapshot<S>>,
    refusal: Option<(io::ErrorKind, String)>,
}

impl<T, S> fmt::Debug for Events<T, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Events")
            .field("topic", &self.topic)
            .field("filtered", &self.filter.is_some())
            .field("refusal", &self.refusal)
            .finish()
    }
}

impl<T, S> Events<T, S> {
    /// A refusal: every poll is answered with this error (the caller may not watch this, or
    /// the arguments are wrong). `NotFound`, `InvalidInput`, `InvalidData` and
    /// `PermissionDenied` end the caller's subscription; other kinds are retried.
    pub fn refused(kind: io::ErrorKind, why: impl Into<String>) -> Events<T, S> {
        Events { topic: None, filter: None, snapshot: None, refusal: Some((kind, why.into())) }
    }

    /// Resyncs of this view carry `snapshot`'s state instead of the topic's.
    pub fn with_snapshot(self, snapshot: impl Fn() -> S + Send + Sync + 'static) -> Events<T, S> {
        Events { snapshot: Some(Arc::new(snapshot)), ..self }
    }
}

/// The event and snapshot types of an [`Events`], for generated code.
pub trait EventStream {
    /// What each update carries.
    type Event;
    /// What a resync carries.
    type Snapshot;
}

impl<T, S> EventStream for Events<T, S> {
    type Event = T;
    type Snapshot = S;
}

/// The [`Batch`] of a stream method returning `E`.
pub type BatchOf<E> = Batch<<E as EventStream>::Event, <E as EventStream>::Snapshot>;
/// The [`Subscription`] of a stream method returning `E`.
pub type SubscriptionOf<E> = Subscription<<E as EventStream>::Event, <E as EventStream>::Snapshot>;

/// A poll, as its call carries it (with the stream method's own arguments).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollArgs {
    /// Where the subscriber stands (`None`: a new subscription).
    pub from: Option<Cursor>,
    /// Most events wanted (the server answers at most [`MAX_BATCH_EVENTS`]).
    pub max_events: u32,
    /// How long the server may wait for an event, milliseconds (at most [`MAX_WAIT`], and
    /// within the call's deadline).
    pub wait_ms: u32,
}

/// The arguments of a stream method's call: the poll, then the method's arguments encoded on
/// their own (so that the subscription encodes them once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCall {
    /// The poll.
    pub poll: PollArgs,
    /// The method's arguments.
    #[serde(with = "serde_bytes")]
    pub args: Vec<u8>,
}

/// What a poll answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch<T, S> {
    /// The topic's epoch.
    pub epoch: u64,
    /// History was cut short: the subscription jumps to `resync.at` before the events.
    pub resync: Option<Resync<S>>,
    /// Events after the cursor (or after `resync.at`), in order, each with its sequence number.
    pub events: Vec<(u64, T)>,
    /// Where the subscription stands after this batch (past events the filter skipped too).
    pub next: u64,
}

/// The resync part of a [`Batch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resync<S> {
    /// Why.
    pub reason: ResyncReason,
    /// The sequence number the subscription jumps to.
    pub at: u64,
    /// The state, where the topic offers one.
    pub snapshot: Option<S>,
}

/// What one look at the ring found.
enum Found<T> {
    Resync(ResyncReason, u64),
    Events(Vec<(u64, T)>, u64),
}

impl<T: Clone, S> Topic<T, S> {
    /// The events after `from` that `keep`, within the batch bounds; or why not. A resync
    /// resumes at the newest event when the view has a snapshot (the snapshot stands for what
    /// came before), else at the oldest the ring holds (the fewest events lost).
    fn collect(
        &self,
        from: Option<Cursor>,
        keep: Option<&Filter<T>>,
        has_snapshot: bool,
        max_events: usize,
    ) -> Found<T> {
        let ring = lock(&self.shared.ring);
        let head = ring.stats.published;
        let first = ring.entries.front().map_or(head + 1, |e| e.seq);
        let resume = if has_snapshot { head } else { first - 1 };
        let from = match from {
            None => return Found::Resync(ResyncReason::Start, head),
            Some(c) if c.epoch != self.shared.epoch => {
                return Found::Resync(ResyncReason::NewEpoch { previous: c.epoch }, resume);
            }
            Some(c) if c.seq > head => return Found::Resync(ResyncReason::UnknownCursor, head),
            Some(c) if c.seq + 1 < first => {
                return Found::Resync(ResyncReason::Missed { count: resume - c.seq }, resume);
            }
            Some(c) => c.seq,
        };
        // Sequence numbers in the ring are consecutive: the event after `from` is at this index.
        let start = usize::try_from(from + 1 - first).unwrap_or(usize::MAX);
        let mut events = Vec::new();
        let mut bytes = 0usize;
        let mut next = from;
        for entry in ring.entries.iter().skip(start) {
            let Some(event) = &entry.event else {
                if events.is_empty() {
                    // Events that did not encode: skipped, explicitly.
                    let at = if has_snapshot {
                        head
                    } else {
                        let gap = ring.entries.iter().skip(start).take_while(|e| e.event.is_none()).count();
                        from + gap as u64
                    };
                    return Found::Resync(ResyncReason::Missed { count: at - from }, at);
                }
                break; // the gap is the next poll's resync
            };
            if keep.is_none_or(|keep| keep(event)) {
                if events.len() >= max_events || (!events.is_empty() && bytes + entry.bytes > MAX_BATCH_BYTES)
                {
                    break;
                }
                bytes += entry.bytes;
                events.push((entry.seq, event.clone()));
            }
            next = entry.seq;
        }
        Found::Events(events, next)
    }
}

fn refusal(kind: io::ErrorKind, detail: String) -> ServerError {
    ServerError::new(kind, detail)
}

/// Answers one poll of `events` (generated code calls this for a stream method): the encoded
/// [`Batch`], once there are events after the cursor, a resync, or the wait is over.
pub async fn serve<T, S>(events: Events<T, S>, poll: PollArgs, codec: Codec) -> Result<Vec<u8>, ServerError>
where
    T: Serialize + Clone + Send + Sync + 'static,
    S: Serialize + Send + 'static,
{
    if let Some((kind, why)) = events.refusal {
        return Err(refusal(kind, why));
    }
    let Some(topic) = events.topic else {
        return Err(refusal(io::ErrorKind::Other, "a stream without a topic".into()));
    };
    let now = Instant::now();
    // Answer before the call's deadline, with room for the reply to travel.
    let budget = wire::current_context().map_or(MAX_WAIT, |c| c.deadline.saturating_duration_since(now));
    let margin = (budget / 10).max(Duration::from_millis(100));
    let wait = Duration::from_millis(poll.wait_ms.into()).min(MAX_WAIT).min(budget.saturating_sub(margin));
    let until = tokio::time::Instant::from_std(now + wait);
    let max_events = poll.max_events.clamp(1, MAX_BATCH_EVENTS) as usize;
    let epoch = topic.shared.epoch;
    let mut from = poll.from;
    let batch = loop {
        // Subscribed before looking, so that an event published in between wakes the wait.
        let mut head = topic.shared.head.subscribe();
        match topic.collect(from, events.filter.as_ref(), events.snapshot.is_some(), max_events) {
            Found::Resync(reason, at) => {
                let snapshot = events.snapshot.as_ref().map(|f| f());
                break Batch {
                    epoch,
                    resync: Some(Resync { reason, at, snapshot }),
                    events: Vec::new(),
                    next: at,
                };
            }
            Found::Events(found, next) => {
                if !found.is_empty() || tokio::time::Instant::now() >= until {
                    break Batch { epoch, resync: None, events: found, next };
                }
                // Past what the filter skipped: the next look starts there.
                from = Some(Cursor { epoch, seq: next });
                match tokio::time::timeout_at(until, head.changed()).await {
                    Ok(Ok(())) => continue,
                    Ok(Err(_)) | Err(_) => break Batch { epoch, resync: None, events: Vec::new(), next },
                }
            }
        }
    };
    codec
        .encode(&batch)
        .map_err(|e| refusal(io::ErrorKind::Other, format!("a batch of events does not encode: {e}")))
}

/// Whether a failed poll ends a subscription: the server refused it for good (no such method,
/// arguments it does not take, not allowed), rather than the connection or the server being
/// unavailable for now.
pub fn is_final(e: &RpcError) -> bool {
    use io::ErrorKind::{InvalidData, InvalidInput, NotFound, PermissionDenied};
    match e {
        RpcError::Server(s) => matches!(s.kind, NotFound | InvalidInput | InvalidData | PermissionDenied),
        RpcError::Send(inner) => inner
            .downcast_ref::<crate::client::ConnectFailed>()
            .is_some_and(|f| f.cause.kind() == PermissionDenied),
        _ => false,
    }
}

type PollFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, RpcError>> + Send>>;

/// A subscription to a stream method: a `futures::Stream` of [`Update`]s that polls the server
/// from its cursor, again and again (generated clients make these: `client.events(…)`).
///
/// An `Err` item is a failed poll. Unless it [`is_final`], the subscription goes on: it polls
/// again from its cursor after a backoff (up to 1 s), over a new connection if the old one went.
/// After a final error the stream ends.
pub struct Subscription<T, S> {
    raw: RawClient,
    method: &'static str,
    args: Result<Vec<u8>, Option<io::Error>>,
    cursor: Option<Cursor>,
    max_events: u32,
    wait: Duration,
    ready: VecDeque<Update<T, S>>,
    /// Where the subscription stands once `ready` is delivered.
    after_ready: Option<Cursor>,
    pending: Option<PollFuture>,
    /// When the poll in `pending` started.
    polled_at: Option<Instant>,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
    failures: u32,
    done: bool,
}

impl<T, S> fmt::Debug for Subscription<T, S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Subscription")
            .field("client", &self.raw)
            .field("method", &self.method)
            .field("cursor", &self.cursor)
            .finish()
    }
}

impl<T, S> Subscription<T, S> {
    /// A subscription to `method` of `raw`'s service with its encoded arguments (generated
    /// clients call this; an argument encoding error is the stream's first and last item).
    pub fn new(raw: RawClient, method: &'static str, args: io::Result<Vec<u8>>) -> Subscription<T, S> {
        Subscription {
            raw,
            method,
            args: args.map_err(Some),
            cursor: None,
            max_events: 256,
            wait: Duration::from_secs(10),
            ready: VecDeque::new(),
            after_ready: None,
            pending: None,
            polled_at: None,
            backoff: None,
            failures: 0,
            done: false,
        }
    }

    /// Resumes after `cursor` (one an earlier subscription delivered) instead of starting with
    /// the current state.
    pub fn from(mut self, cursor: Cursor) -> Self {
        self.cursor = Some(cursor);
        self
    }

    /// Most events per poll (default 256).
    pub fn max_events(mut self, n: u32) -> Self {
        self.max_events = n.clamp(1, MAX_BATCH_EVENTS);
        self
    }

    /// How long a poll waits on the server for an event (default 10 s, at most [`MAX_WAIT`]).
    pub fn wait(mut self, wait: Duration) -> Self {
        self.wait = wait.min(MAX_WAIT);
        self
    }

    /// Where the subscription stands: after the last update it delivered.
    pub fn cursor(&self) -> Option<Cursor> {
        self.cursor
    }
}

/// Checks a batch against the rules of the protocol (a server is a peer like any other) and
/// turns it into updates after `cursor`.
fn updates<T, S>(
    batch: Batch<T, S>,
    cursor: Option<Cursor>,
    max_events: u32,
) -> Result<(Vec<Update<T, S>>, Cursor), String> {
    let epoch = batch.epoch;
    if batch.events.len() > max_events as usize {
        return Err(format!("{} events where at most {max_events} were asked for", batch.events.len()));
    }
    let mut out = Vec::with_capacity(batch.events.len() + 1);
    let mut last = match (&batch.resync, cursor) {
        (Some(r), _) => r.at,
        (None, Some(c)) if c.epoch == epoch => c.seq,
        (None, _) => return Err("events without a resync for a new subscription or another epoch".into()),
    };
    if let Some(r) = batch.resync {
        out.push(Update::Resync {
            cursor: Cursor { epoch, seq: r.at },
            reason: r.reason,
            snapshot: r.snapshot,
        });
    }
    for (seq, event) in batch.events {
        if seq <= last {
            return Err(format!("event {seq} does not follow {last}"));
        }
        last = seq;
        out.push(Update::Event { cursor: Cursor { epoch, seq }, event });
    }
    if batch.next < last {
        return Err(format!("the batch ends at {} before its last event {last}", batch.next));
    }
    Ok((out, Cursor { epoch, seq: batch.next }))
}

/// The client's check of a batch ([`Subscription`] applies it to every answer), for the
/// `events_batch` fuzz target: the updates after `cursor`, and where the subscription stands
/// after them; or why the batch breaks the protocol.
#[doc(hidden)]
pub fn check_batch<T, S>(
    batch: Batch<T, S>,
    cursor: Option<Cursor>,
    max_events: u32,
) -> Result<(Vec<Update<T, S>>, Cursor), String> {
    updates(batch, cursor, max_events)
}

impl<T, S> Subscription<T, S>
where
    T: DeserializeOwned + Send + 'static,
    S: DeserializeOwned + Send + 'static,
{
    fn start_poll(&mut self, args: Vec<u8>) -> PollFuture {
        let raw = self.raw.clone();
        let poll = PollArgs {
            from: self.cursor,
            max_events: self.max_events,
            wait_ms: u32::try_from(self.wait.as_millis()).unwrap_or(u32::MAX),
        };
        let method = self.method;
        let wait = self.wait;
        Box::pin(async move {
            let call = raw.codec().encode(&StreamCall { poll, args }).map_err(wire::unencodable_arguments)?;
            let mut ctx = tarpc::context::current();
            ctx.deadline = Instant::now() + wait + Duration::from_secs(5);
            raw.call(ctx, std::borrow::Cow::Borrowed(method), call, true).await
        })
    }
}

impl<T, S> Stream for Subscription<T, S>
where
    T: DeserializeOwned + Send + Unpin + 'static,
    S: DeserializeOwned + Send + Unpin + 'static,
{
    type Item = Result<Update<T, S>, RpcError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> TaskPoll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(update) = this.ready.pop_front() {
                this.cursor = Some(update.cursor());
                if this.ready.is_empty() {
                    // Past the events the server's filter skipped after the last update.
                    this.cursor = this.after_ready.take().or(this.cursor);
                }
                return TaskPoll::Ready(Some(Ok(update)));
            }
            if this.done {
                return TaskPoll::Ready(None);
            }
            let args = match &mut this.args {
                Ok(args) => args.clone(),
                Err(e) => {
                    this.done = true;
                    let e = e.take().unwrap_or_else(|| io::Error::other("unencodable arguments"));
                    return TaskPoll::Ready(Some(Err(wire::unencodable_arguments(e))));
                }
            };
            if let Some(sleep) = &mut this.backoff {
                if sleep.as_mut().poll(cx).is_pending() {
                    return TaskPoll::Pending;
                }
                this.backoff = None;
            }
            if this.pending.is_none() {
                this.polled_at = Some(Instant::now());
                this.pending = Some(this.start_poll(args));
            }
            let Some(pending) = &mut this.pending else { continue };
            let result = match pending.as_mut().poll(cx) {
                TaskPoll::Pending => return TaskPoll::Pending,
                TaskPoll::Ready(r) => r,
            };
            this.pending = None;
            let codec = this.raw.codec();
            let checked = result.and_then(|bytes| {
                let batch: Batch<T, S> =
                    codec.decode(&bytes).map_err(|e| wire::undecodable_reply(this.method, e))?;
                updates(batch, this.cursor, this.max_events).map_err(|why| {
                    RpcError::Server(ServerError::new(
                        io::ErrorKind::InvalidData,
                        format!("a batch of {} breaks the subscription protocol: {why}", this.method),
                    ))
                })
            });
            match checked {
                Ok((updates, next)) => {
                    this.failures = 0;
                    this.ready.extend(updates);
                    if this.ready.is_empty() {
                        this.cursor = Some(next);
                        // A server waits for events before answering none; one that answers
                        // none at once (it may not wait) is polled at most every 10 ms.
                        let quick = this.polled_at.is_some_and(|t| t.elapsed() < EMPTY_POLL_FLOOR);
                        if quick && this.wait >= EMPTY_POLL_FLOOR {
                            this.backoff = Some(Box::pin(tokio::time::sleep(EMPTY_POLL_FLOOR)));
                        }
                    } else {
                        this.after_ready = Some(next);
                    }
                }
                Err(e) => {
                    if is_final(&e) {
                        this.done = true;
                    } else {
                        this.failures = this.failures.saturating_add(1);
                        let backoff =
                            Duration::from_millis(10 << this.failures.min(7)).min(Duration::from_secs(1));
                        this.backoff = Some(Box::pin(tokio::time::sleep(backoff)));
                    }
                    return TaskPoll::Ready(Some(Err(e)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
