//! Fuzz target: the long poll of a subscription, from a hostile peer on either side.
//!
//! Input: one control byte, then the peer's bytes, used three ways with each codec (bincode and
//! postcard):
//!
//! * **A server's answer**: the bytes as a `Batch<u64, Vec<u8>>` (what a subscription decodes
//!   from every poll's reply), then through the client's check (`events::check_batch`, what
//!   `Subscription` applies) from five cursors (none, the batch's epoch at 0, at its `next`,
//!   just before its first event, another epoch) and a number of events asked for that the
//!   control byte picks. A batch the check accepts gives exactly: its resync first (at its
//!   `at`, with its reason and snapshot), then each of its events once, in strictly increasing
//!   order after where the subscription stood, all of the batch's epoch, no more than asked;
//!   and a cursor at the batch's `next`, not before the last update. A refusal's reason is short.
//! * **A poll**: the bytes as a `StreamCall` (what the server decodes from a stream method's
//!   call): a decoded call re-encodes and decodes to the same call.
//! * **A poll answered**: a decoded call's poll goes to `events::serve` on a topic that has
//!   dropped older events (with control bit 3, the cursor's epoch is the topic's, so that the
//!   sequence number is what is fuzzed), once as every event without a snapshot and once
//!   filtered with a snapshot, waiting for nothing. The answer must be ready at once, decode,
//!   and pass the client's check from the poll's cursor: a server never answers what its own
//!   clients refuse.
//!
//! Decoding n bytes allocates at most 1 KiB + 2n at once, plus serde's 1 MiB preallocation cap
//! (a sequence's claimed length is checked against the bytes left, not against its elements'
//! size).
#![no_main]

mod common;

use dombus_rpc::codec::Codec;
use dombus_rpc::events::{
    self, Batch, Cursor, MAX_BATCH_EVENTS, PollArgs, StreamCall, Topic, TopicLimits, Update,
};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: common::Probe = common::Probe;

const CODECS: [Codec; 2] = [Codec::Bincode, Codec::Postcard];

/// Event counts a subscription asks for, picked by control bits 0..=2.
const ASKED: [u32; 8] = [1, 2, 3, 4, 16, 256, 1000, MAX_BATCH_EVENTS];

/// Largest single allocation allowed while decoding `len` bytes.
fn alloc_limit(len: usize) -> usize {
    (1 << 20) + 1024 + 2 * len
}

/// The client's check of `batch` from `cursor`, and what an accepted batch must give.
fn check<S: Clone + PartialEq + std::fmt::Debug>(batch: &Batch<u64, S>, cursor: Option<Cursor>, asked: u32) {
    let result = events::check_batch(batch.clone(), cursor, asked);
    let (updates, after) = match result {
        Ok(ok) => ok,
        Err(why) => {
            assert!(why.len() <= 256, "a refusal of {} bytes: {why}", why.len());
            return;
        }
    };
    let epoch = batch.epoch;
    let mut updates = updates.into_iter();
    let mut at = match &batch.resync {
        Some(r) => {
            match updates.next() {
                Some(Update::Resync { cursor: c, reason, snapshot }) => {
                    assert_eq!(c, Cursor { epoch, seq: r.at });
                    assert_eq!((reason, &snapshot), (r.reason, &r.snapshot));
                }
                other => panic!("a batch with a resync gave {other:?} first"),
            }
            r.at
        }
        None => {
            let c = cursor.expect("events without a resync accepted for a new subscription");
            assert_eq!(c.epoch, epoch, "events of another epoch accepted without a resync");
            c.seq
        }
    };
    let mut events = 0;
    for u in updates {
        let Update::Event { cursor: c, event } = u else { panic!("a second resync: {u:?}") };
        assert_eq!(c.epoch, epoch);
        assert!(c.seq > at, "event {} delivered after {at}", c.seq);
        assert_eq!(Some(&(c.seq, event)), batch.events.get(events), "not the batch's event");
        at = c.seq;
        events += 1;
    }
    assert_eq!(events, batch.events.len(), "events dropped");
    assert!(events <= asked as usize, "{events} events delivered where {asked} were asked for");
    assert_eq!(after, Cursor { epoch, seq: batch.next });
    assert!(after.seq >= at, "the subscription's cursor {after:?} goes back before {at}");
}

fn answer(data: &[u8], codec: Codec, control: u8) {
    let (decoded, largest) = common::largest_allocation(|| codec.decode::<Batch<u64, Vec<u8>>>(data));
    assert!(largest <= alloc_limit(data.len()), "{codec}: {} bytes: allocated {largest}", data.len());
    let Ok(batch) = decoded else { return };
    let asked = ASKED[usize::from(control & 7)];
    let epoch = batch.epoch;
    let first = batch.events.first().map_or(batch.next, |e| e.0);
    let cursors = [
        None,
        Some(Cursor { epoch, seq: 0 }),
        Some(Cursor { epoch, seq: batch.next }),
        Some(Cursor { epoch, seq: first.saturating_sub(1) }),
        Some(Cursor { epoch: epoch ^ 1, seq: first }),
    ];
    for cursor in cursors {
        check(&batch, cursor, asked);
    }
}

/// The topic polls are answered from: 200 events published, the ring holding the last 64.
struct Served {
    topic: Topic<u64, u64>,
}

impl Served {
    fn new() -> Served {
        let topic = Topic::new(TopicLimits { max_events: 64, max_bytes: 1 << 20 });
        for n in 1..=200 {
            topic.publish(n);
        }
        Served { topic }
    }
}

thread_local! {
    static SERVED: Served = Served::new();
}

fn poll(data: &[u8], codec: Codec, control: u8) {
    let (decoded, largest) = common::largest_allocation(|| codec.decode::<StreamCall>(data));
    assert!(largest <= alloc_limit(data.len()), "{codec}: {} bytes: allocated {largest}", data.len());
    let Ok(call) = decoded else { return };
    let bytes = codec.encode(&call).expect("a decoded call re-encodes");
    let again = codec.decode::<StreamCall>(&bytes).expect("a re-encoded call decodes");
    assert_eq!(again, call, "{codec}");

    SERVED.with(|served| {
        let mut poll = PollArgs { wait_ms: 0, ..call.poll };
        if control & 8 != 0 {
            poll.from = poll.from.map(|c| Cursor { epoch: served.topic.cursor().epoch, ..c });
        }
        // A subscription asks for at least one event.
        let asked = poll.max_events.max(1);
        let views = [served.topic.events(), served.topic.events_where(|n| n % 3 == 0).with_snapshot(|| 7)];
        for view in views {
            let reply = common::poll_to_end(events::serve(view, poll, codec), 4)
                .unwrap_or_else(|e| panic!("{codec}: a poll of {poll:?} refused: {e}"));
            let batch: Batch<u64, u64> = codec.decode(&reply).expect("the server's answer decodes");
            if let Err(why) = events::check_batch(batch.clone(), poll.from, asked) {
                panic!("{codec}: the answer to {poll:?} breaks the protocol: {why}: {batch:?}");
            }
            check(&batch, poll.from, asked);
        }
    });
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else { return };
    for codec in CODECS {
        answer(rest, codec, control);
        poll(rest, codec, control);
    }
});
