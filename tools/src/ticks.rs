//! A subscription checked end to end: the `ticks` service, which publishes numbered ticks on
//! demand into a [`Topic`], and a subscriber that checks that every tick arrives once and in
//! order, and that a restart of the server comes as one explicit new-epoch resync — what
//! `dombus-link ticks-serve` and `ticks-watch` run between two domains on real Xen.
//!
//! A [`TickSource`] numbers its ticks from 1, one event each, so in a topic's epoch a tick's
//! number is its event's sequence number: [`TickCheck`] (no IO) holds a subscriber to exactly
//! that — each event one after the last, in the current epoch, and carrying its own sequence
//! number. [`watch`] drives a subscription against it.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use dombus::{Address, Net};
//! use dombus_tools::ticks::{self, TicksClient};
//! let client = TicksClient::new(Net::new(), "xen:0:5200".parse::<Address>()?);
//! // Subscribe, have 100 ticks published, receive them; no restart awaited.
//! let report = ticks::watch(&client, 100, None::<fn(&ticks::Phase)>, std::time::Duration::from_secs(60)).await?;
//! println!("{}", report.first);
//! # Ok(()) }
//! ```

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use dombus::rpc::events::is_final;
use dombus::{Cursor, Events, ResyncReason, Subscription, Topic, TopicLimits, Update};
use futures::StreamExt;

/// Most ticks one `publish` call makes: the ring's size, so that one call never pushes an event
/// a subscriber has not read out of the ring.
pub const MAX_PUBLISH: u64 = 1024;

/// How long a subscriber's poll waits on the server for a tick.
const POLL_WAIT: Duration = Duration::from_secs(5);

/// Numbered ticks, published on demand.
#[dombus::service(name = "ticks")]
pub trait Ticks {
    /// Publishes the next `n` ticks (at most [`MAX_PUBLISH`]), numbered on from the last one;
    /// answers the number of the last tick published so far (0: none).
    async fn publish(&self, n: u64) -> u64;
    /// Every tick after the subscription's cursor: its number.
    async fn ticks(&self) -> Events<u64>;
}

/// The `ticks` service: one topic, whose epoch is new with every `TickSource`.
#[derive(Debug)]
pub struct TickSource {
    topic: Topic<u64>,
    /// The last tick's number; held while a tick is published so that numbers go out in order.
    last: Mutex<u64>,
}

impl TickSource {
    /// A source that has published nothing yet, with a ring of [`MAX_PUBLISH`] events.
    pub fn new() -> TickSource {
        let limits = TopicLimits { max_events: MAX_PUBLISH as usize, ..TopicLimits::default() };
        TickSource { topic: Topic::new(limits), last: Mutex::new(0) }
    }

    /// The topic's epoch.
    pub fn epoch(&self) -> u64 {
        self.topic.cursor().epoch
    }
}

impl Default for TickSource {
    fn default() -> Self {
        TickSource::new()
    }
}

impl Ticks for TickSource {
    async fn publish(&self, n: u64) -> u64 {
        // A poisoned lock only means another call panicked between two ticks: the count is whole.
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for _ in 0..n.min(MAX_PUBLISH) {
            *last += 1;
            self.topic.publish(*last);
        }
        *last
    }

    async fn ticks(&self) -> Events<u64> {
        self.topic.events()
    }
}

/// How a subscription broke [`TickCheck`]'s rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broken {
    /// An event of another epoch than the subscription's, without a resync before it.
    OtherEpoch {
        /// The subscription's epoch.
        want: u64,
        /// The event's.
        got: u64,
    },
    /// Events between the last one and this one were skipped without a resync.
    Gap {
        /// The last sequence number seen.
        after: u64,
        /// This event's.
        got: u64,
    },
    /// An event at or before the last one seen: delivered twice, or out of order.
    Repeated {
        /// The last sequence number seen.
        after: u64,
        /// This event's.
        got: u64,
    },
    /// A tick whose number is not its event's sequence number (the source numbers both alike).
    WrongTick {
        /// The event's sequence number.
        seq: u64,
        /// The tick it carried.
        tick: u64,
    },
}

impl fmt::Display for Broken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Broken::OtherEpoch { want, got } => {
                write!(f, "an event of epoch {got:016x} in epoch {want:016x}, with no resync")
            }
            Broken::Gap { after, got } => write!(f, "event {got} after {after}: a silent gap"),
            Broken::Repeated { after, got } => {
                write!(f, "event {got} after {after}: delivered twice or out of order")
            }
            Broken::WrongTick { seq, tick } => write!(f, "event {seq} carried tick {tick}"),
        }
    }
}

impl std::error::Error for Broken {}

/// Holds a subscription to the ticks stream to its promises: after a resync at a cursor, every
/// event is the next one of that epoch, carrying its own sequence number as its tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickCheck {
    at: Cursor,
    events: u64,
}

impl TickCheck {
    /// A subscription that stands at `cursor` (its first resync's).
    pub fn new(cursor: Cursor) -> TickCheck {
        TickCheck { at: cursor, events: 0 }
    }

    /// A resync: the subscription now stands at `cursor`, in whatever epoch it names.
    pub fn resync(&mut self, cursor: Cursor) {
        self.at = cursor;
    }

    /// One event; `Err` if it breaks the rules (the check's position is then unchanged).
    pub fn event(&mut self, cursor: Cursor, tick: u64) -> Result<(), Broken> {
        let after = self.at.seq;
        if cursor.epoch != self.at.epoch {
            return Err(Broken::OtherEpoch { want: self.at.epoch, got: cursor.epoch });
        }
        if cursor.seq <= after {
            return Err(Broken::Repeated { after, got: cursor.seq });
        }
        if cursor.seq != after + 1 {
            return Err(Broken::Gap { after, got: cursor.seq });
        }
        if tick != cursor.seq {
            return Err(Broken::WrongTick { seq: cursor.seq, tick });
        }
        self.at = cursor;
        self.events += 1;
        Ok(())
    }

    /// Where the subscription stands.
    pub fn cursor(&self) -> Cursor {
        self.at
    }

    /// Events accepted so far.
    pub fn events(&self) -> u64 {
        self.events
    }
}

/// What one epoch of a [`watch`] delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Phase {
    /// The server's epoch.
    pub epoch: u64,
    /// The first and the last tick received.
    pub ticks: (u64, u64),
    /// Ticks received, each once and in order.
    pub events: u64,
    /// Polls that failed (reported by the subscription, then retried) from the last phase's end
    /// to this phase's end. A lost connection the client makes again within a poll (polls are
    /// retried like idempotent calls) does not count.
    pub failed_polls: u64,
}

impl fmt::Display for Phase {
    /// `epoch=… events=N ticks=FIRST..LAST failed_polls=K`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "epoch={:016x} events={} ticks={}..{} failed_polls={}",
            self.epoch, self.events, self.ticks.0, self.ticks.1, self.failed_polls
        )
    }
}

/// What a [`watch`] saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    /// From the subscription's start.
    pub first: Phase,
    /// After the server's restart, if one was awaited: the resync's previous epoch, then the
    /// new epoch's phase.
    pub restarted: Option<(u64, Phase)>,
}

/// Subscribes to `client`'s ticks and checks, with [`TickCheck`], that it starts with a resync,
/// then has `count` ticks published and receives exactly those, in order. With `restart`, it
/// then calls `restart` with what it saw so far and goes on polling until the server comes back: the next update
/// must be a new-epoch resync naming the old epoch, after which it has `count` ticks published
/// again and receives them. Failed polls in between are retried (unless final); every wait for
/// the next update is bounded by `patience`.
pub async fn watch(
    client: &TicksClient,
    count: u64,
    restart: Option<impl FnOnce(&Phase)>,
    patience: Duration,
) -> Result<Report> {
    if count == 0 || count > MAX_PUBLISH {
        bail!("count must be 1 to {MAX_PUBLISH}, not {count}");
    }
    let mut sub = client.ticks().wait(POLL_WAIT);
    let mut failed = 0;
    let cursor = match next(&mut sub, &mut failed, patience).await? {
        Update::Resync { reason: ResyncReason::Start, cursor, .. } => cursor,
        other => bail!("a new subscription must start with a resync, not {other:?}"),
    };
    let mut check = TickCheck::new(cursor);
    let first = receive(client, &mut sub, &mut check, count, failed, patience).await?;
    let Some(restart) = restart else {
        return Ok(Report { first, restarted: None });
    };
    restart(&first);
    let mut failed = 0;
    let cursor = loop {
        match next(&mut sub, &mut failed, patience).await? {
            Update::Resync { reason: ResyncReason::NewEpoch { previous }, cursor, .. } => {
                if previous != first.epoch || cursor.epoch == first.epoch {
                    bail!(
                        "the resync after the restart names epoch {previous:016x} -> {:016x}; \
                         the subscription was in {:016x}",
                        cursor.epoch,
                        first.epoch
                    );
                }
                break cursor;
            }
            Update::Event { cursor, event } => check.event(cursor, event).context("before the restart")?,
            other => bail!("after the restart, a new-epoch resync was due, not {other:?}"),
        }
    };
    check.resync(cursor);
    let after = receive(client, &mut sub, &mut check, count, failed, patience).await?;
    Ok(Report { first, restarted: Some((first.epoch, after)) })
}

/// Has `count` ticks published, then reads them from `sub` through `check`.
async fn receive(
    client: &TicksClient,
    sub: &mut Subscription<u64, ()>,
    check: &mut TickCheck,
    count: u64,
    failed_polls: u64,
    patience: Duration,
) -> Result<Phase> {
    let last = tokio::time::timeout(patience, client.publish(dombus::context::current(), count))
        .await
        .context("publish: no answer in time")?
        .context("publish")?;
    let want_first = check.cursor().seq + 1;
    if last.checked_sub(want_first).and_then(|d| d.checked_add(1)) != Some(count) {
        bail!("published up to tick {last}, but the subscription stands at {}", check.cursor().seq);
    }
    let mut failed = 0;
    let start = check.events();
    while check.events() - start < count {
        match next(sub, &mut failed, patience).await? {
            Update::Event { cursor, event } => check.event(cursor, event)?,
            Update::Resync { reason, cursor, .. } => {
                bail!("a resync ({reason}, at {cursor}) after {} of {count} ticks", check.events() - start)
            }
        }
    }
    Ok(Phase {
        epoch: check.cursor().epoch,
        ticks: (want_first, last),
        events: count,
        failed_polls: failed_polls + failed,
    })
}

/// The next update, past failed polls that are not final (counted in `failed`), within
/// `patience`.
async fn next(
    sub: &mut Subscription<u64, ()>,
    failed: &mut u64,
    patience: Duration,
) -> Result<Update<u64, ()>> {
    let deadline = tokio::time::Instant::now() + patience;
    loop {
        match tokio::time::timeout_at(deadline, sub.next()).await {
            Err(_) => bail!("no update within {patience:?} ({failed} failed polls)"),
            Ok(None) => bail!("the subscription ended"),
            Ok(Some(Ok(update))) => return Ok(update),
            Ok(Some(Err(e))) if is_final(&e) => return Err(e).context("the subscription was refused"),
            Ok(Some(Err(e))) => {
                *failed += 1;
                tracing::info!("a poll failed ({e}); the subscription polls again from its cursor");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E: u64 = 0xabc;

    fn at(seq: u64) -> Cursor {
        Cursor { epoch: E, seq }
    }

    #[test]
    fn events_one_after_the_other_pass() {
        let mut c = TickCheck::new(at(3));
        for seq in 4..10 {
            assert_eq!(c.event(at(seq), seq), Ok(()));
        }
        assert_eq!((c.cursor(), c.events()), (at(9), 6));
    }

    #[test]
    fn a_gap_a_repeat_another_epoch_and_a_wrong_tick_are_each_named() {
        let mut c = TickCheck::new(at(3));
        assert_eq!(c.event(at(5), 5), Err(Broken::Gap { after: 3, got: 5 }));
        assert_eq!(c.event(at(3), 3), Err(Broken::Repeated { after: 3, got: 3 }));
        assert_eq!(c.event(at(2), 2), Err(Broken::Repeated { after: 3, got: 2 }));
        assert_eq!(
            c.event(Cursor { epoch: E + 1, seq: 4 }, 4),
            Err(Broken::OtherEpoch { want: E, got: E + 1 })
        );
        assert_eq!(c.event(at(4), 7), Err(Broken::WrongTick { seq: 4, tick: 7 }));
        // Refused events leave the check where it was.
        assert_eq!((c.cursor(), c.events()), (at(3), 0));
        assert_eq!(c.event(at(4), 4), Ok(()));
    }

    #[test]
    fn after_a_resync_the_new_epoch_counts() {
        let mut c = TickCheck::new(at(3));
        c.resync(Cursor { epoch: E + 1, seq: 0 });
        assert!(c.event(at(4), 4).is_err());
        assert_eq!(c.event(Cursor { epoch: E + 1, seq: 1 }, 1), Ok(()));
    }
}
