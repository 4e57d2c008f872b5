use std::collections::BTreeSet;

use proptest::prelude::*;

use super::*;

fn limits(max_events: usize) -> TopicLimits {
    TopicLimits { max_events, max_bytes: 1 << 20 }
}

fn poll(from: Option<Cursor>, max_events: u32, wait_ms: u32) -> PollArgs {
    PollArgs { from, max_events, wait_ms }
}

async fn batch<S: Serialize + Send + DeserializeOwned + 'static>(
    events: Events<u64, S>,
    p: PollArgs,
) -> Batch<u64, S> {
    let bytes = serve(events, p, Codec::Bincode).await.expect("poll answered");
    Codec::Bincode.decode(&bytes).expect("batch decodes")
}

#[test]
fn cursors_print_and_parse() {
    let c = Cursor { epoch: 0xdead_beef, seq: 42 };
    assert_eq!(c.to_string(), "00000000deadbeef:42");
    assert_eq!("00000000deadbeef:42".parse::<Cursor>(), Ok(c));
    for bad in ["", "1", "x:1", "1:x", "1:-1", "1:2:3"] {
        assert!(bad.parse::<Cursor>().is_err(), "{bad:?}");
    }
}

#[test]
fn the_ring_keeps_the_newest_within_its_bounds() {
    let topic: Topic<u64> = Topic::new(TopicLimits { max_events: 4, max_bytes: 1 << 20 });
    for i in 1..=10 {
        assert_eq!(topic.publish(i).seq, i);
    }
    let stats = topic.stats();
    assert_eq!((stats.published, stats.retained, stats.evicted, stats.retained_bytes), (10, 4, 6, 32));
    // Bytes bound: 8 bytes each, 20 bytes hold two.
    let topic: Topic<u64> = Topic::new(TopicLimits { max_events: 100, max_bytes: 20 });
    for i in 1..=10 {
        topic.publish(i);
    }
    assert_eq!(topic.stats().retained, 2);
    // Exactly at the bytes bound is within it.
    let topic: Topic<u64> = Topic::new(TopicLimits { max_events: 100, max_bytes: 16 });
    for i in 1..=10 {
        topic.publish(i);
    }
    assert_eq!(topic.stats().retained, 2);
    // The newest stays even when it alone is over the bound.
    let topic: Topic<Vec<u8>> = Topic::new(TopicLimits { max_events: 100, max_bytes: 10 });
    topic.publish(vec![0; 100]);
    assert_eq!(topic.stats().retained, 1);
    topic.publish(vec![0; 100]);
    assert_eq!(topic.stats().retained, 1);
}

#[test]
fn epochs_differ_between_topics() {
    let a: Topic<u64> = Topic::new(TopicLimits::default());
    let b: Topic<u64> = Topic::new(TopicLimits::default());
    assert_ne!(a.cursor().epoch, b.cursor().epoch);
}

#[tokio::test]
async fn a_new_subscription_gets_the_state_then_only_later_events() {
    let topic: Topic<u64, Vec<u64>> = Topic::with_snapshot(limits(16), || vec![7, 8]);
    topic.publish(1);
    let b = batch(topic.events(), poll(None, 10, 0)).await;
    let resync = b.resync.expect("a start is a resync");
    assert_eq!((resync.reason, resync.at, resync.snapshot), (ResyncReason::Start, 1, Some(vec![7, 8])));
    assert!(b.events.is_empty());
    topic.publish(2);
    topic.publish(3);
    let b = batch(topic.events(), poll(Some(Cursor { epoch: b.epoch, seq: 1 }), 10, 0)).await;
    assert_eq!((b.resync, b.events, b.next), (None, vec![(2, 2), (3, 3)], 3));
}

#[tokio::test]
async fn a_view_may_carry_a_snapshot_of_its_own() {
    let topic: Topic<u64, Vec<u64>> = Topic::with_snapshot(limits(16), || vec![1, 2, 3]);
    let mine = topic.events_where(|e| e % 2 == 1).with_snapshot(|| vec![1, 3]);
    let r = batch(mine, poll(None, 10, 0)).await.resync.expect("a start is a resync");
    assert_eq!(r.snapshot, Some(vec![1, 3]));
    let r = batch(topic.events(), poll(None, 10, 0)).await.resync.expect("a start is a resync");
    assert_eq!(r.snapshot, Some(vec![1, 2, 3]));
}

#[tokio::test]
async fn a_poll_waits_for_the_next_event() {
    let topic: Topic<u64> = Topic::new(limits(16));
    let at = topic.cursor();
    let publisher = topic.clone();
    let waiting = tokio::spawn(batch(topic.events(), poll(Some(at), 10, 5_000)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "answered before any event");
    publisher.publish(9);
    let b = tokio::time::timeout(Duration::from_secs(2), waiting).await.expect("woken").expect("joined");
    assert_eq!(b.events, vec![(1, 9)]);
}

#[tokio::test]
async fn an_empty_wait_moves_the_cursor_past_filtered_events() {
    let topic: Topic<u64> = Topic::new(limits(16));
    let at = topic.cursor();
    for i in 1..=5 {
        topic.publish(i * 2 + 1); // odd: filtered out
    }
    let started = Instant::now();
    let b = batch(topic.events_where(|e| e % 2 == 0), poll(Some(at), 10, 100)).await;
    assert!(started.elapsed() >= Duration::from_millis(100));
    assert_eq!((b.resync, b.events, b.next), (None, vec![], 5));
}

#[tokio::test]
async fn a_poll_answers_within_its_deadline() {
    let topic: Topic<u64> = Topic::new(limits(16));
    let mut ctx = tarpc::context::current();
    ctx.deadline = Instant::now() + Duration::from_millis(500);
    let caller = wire::Caller { peer: "test".into(), domain: None };
    let started = Instant::now();
    // Polled as the server polls a service's future: each poll as the call.
    let mut answer = Box::pin(serve(topic.events(), poll(Some(topic.cursor()), 10, 30_000), Codec::Bincode));
    let bytes = std::future::poll_fn(|cx| {
        let info = wire::CallInfo { ctx, caller: caller.clone() };
        wire::in_call(info, || answer.as_mut().poll(cx))
    })
    .await
    .expect("answered");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(500), "took {took:?}, past the deadline");
    let b: Batch<u64, ()> = Codec::Bincode.decode(&bytes).expect("decodes");
    assert!(b.events.is_empty());
}

#[tokio::test]
async fn falling_behind_resyncs_explicitly() {
    // Without a snapshot: resumes at the oldest event held, counting what is lost.
    let topic: Topic<u64> = Topic::new(limits(4));
    let start = topic.cursor();
    for i in 1..=10 {
        topic.publish(i);
    }
    let b = batch(topic.events(), poll(Some(start), 100, 0)).await;
    let r = b.resync.expect("resync");
    assert_eq!((r.reason, r.at), (ResyncReason::Missed { count: 6 }, 6));
    let b = batch(topic.events(), poll(Some(Cursor { seq: 6, ..start }), 100, 0)).await;
    assert_eq!(b.events, vec![(7, 7), (8, 8), (9, 9), (10, 10)]);
    // With a snapshot: at the newest, the snapshot standing for the rest.
    let topic: Topic<u64, u64> = Topic::with_snapshot(limits(4), || 99);
    let start = topic.cursor();
    for i in 1..=10 {
        topic.publish(i);
    }
    let b = batch(topic.events(), poll(Some(start), 100, 0)).await;
    let r = b.resync.expect("resync");
    assert_eq!((r.reason, r.at, r.snapshot), (ResyncReason::Missed { count: 10 }, 10, Some(99)));
}

#[tokio::test]
async fn another_epoch_or_a_cursor_from_the_future_resyncs() {
    let topic: Topic<u64> = Topic::new(limits(4));
    topic.publish(1);
    let epoch = topic.cursor().epoch;
    let b = batch(topic.events(), poll(Some(Cursor { epoch: epoch ^ 1, seq: 1 }), 10, 0)).await;
    let r = b.resync.expect("resync");
    assert_eq!((r.reason, r.at), (ResyncReason::NewEpoch { previous: epoch ^ 1 }, 0));
    assert_eq!(b.epoch, epoch);
    let b = batch(topic.events(), poll(Some(Cursor { epoch, seq: 2 }), 10, 0)).await;
    assert_eq!(b.resync.map(|r| (r.reason, r.at)), Some((ResyncReason::UnknownCursor, 1)));
}

/// Fails to serialize when odd.
#[derive(Clone, Debug, PartialEq, Deserialize)]
struct Picky(u64);

impl Serialize for Picky {
    fn serialize<Ser: serde::Serializer>(&self, s: Ser) -> Result<Ser::Ok, Ser::Error> {
        if self.0 % 2 == 1 { Err(serde::ser::Error::custom("odd")) } else { s.serialize_u64(self.0) }
    }
}

#[tokio::test]
async fn an_event_that_does_not_encode_is_an_explicit_gap() {
    let topic: Topic<Picky> = Topic::new(limits(16));
    let start = topic.cursor();
    for i in [2, 4, 6, 5, 7, 8] {
        topic.publish(Picky(i));
    }
    assert_eq!(topic.stats().unencodable, 2);
    let ask = |from| {
        let topic = topic.clone();
        async move {
            let bytes =
                serve(topic.events(), poll(Some(from), 10, 0), Codec::Bincode).await.expect("answered");
            Codec::Bincode.decode::<Batch<Picky, ()>>(&bytes).expect("decodes")
        }
    };
    let b = ask(start).await;
    assert_eq!((b.resync, b.events, b.next), (None, vec![(1, Picky(2)), (2, Picky(4)), (3, Picky(6))], 3));
    let b = ask(Cursor { seq: 3, ..start }).await;
    let r = b.resync.expect("the gap is a resync");
    assert_eq!((r.reason, r.at), (ResyncReason::Missed { count: 2 }, 5));
    let b = ask(Cursor { seq: 5, ..start }).await;
    assert_eq!(b.events, vec![(6, Picky(8))]);
}

#[tokio::test]
async fn a_batch_holds_at_most_its_bytes_but_always_one_event() {
    // Each weighs 128 KiB as bincode (an 8-byte length, then the bytes): two fill a batch exactly.
    let event = vec![0u8; (MAX_BATCH_BYTES / 2) - 8];
    let topic: Topic<Vec<u8>> = Topic::new(TopicLimits { max_events: 16, max_bytes: 4 << 20 });
    let start = topic.cursor();
    for _ in 0..3 {
        topic.publish(event.clone());
    }
    let big = vec![0u8; MAX_BATCH_BYTES + 1];
    topic.publish(big.clone());
    let ask = |from: Cursor| {
        let events = topic.events();
        async move {
            let bytes = serve(events, poll(Some(from), 100, 0), Codec::Bincode).await.expect("answered");
            Codec::Bincode.decode::<Batch<Vec<u8>, ()>>(&bytes).expect("decodes")
        }
    };
    let b = ask(start).await;
    assert_eq!((b.events.len(), b.next), (2, 2), "two events of half a batch each");
    let b = ask(Cursor { seq: 2, ..start }).await;
    assert_eq!((b.events.len(), b.next), (1, 3), "the third, alone: the big one does not fit beside it");
    let b = ask(Cursor { seq: 3, ..start }).await;
    assert_eq!((b.events.len(), b.next), (1, 4), "an event larger than a batch goes alone");
    assert_eq!(b.events[0].1.len(), big.len());
}

#[tokio::test]
async fn a_refusal_answers_every_poll() {
    let refused: Events<u64> = Events::refused(io::ErrorKind::PermissionDenied, "not yours");
    let e = serve(refused, poll(None, 1, 0), Codec::Bincode).await.expect_err("refused");
    assert_eq!((e.kind, e.detail.as_str()), (io::ErrorKind::PermissionDenied, "not yours"));
    assert!(is_final(&RpcError::Server(e)));
    assert!(!is_final(&RpcError::Server(ServerError::new(io::ErrorKind::WouldBlock, "overloaded".into()))));
    // A connection the connection manager denies ends it; one refused for now does not.
    let connect = |kind| {
        RpcError::Send(Box::new(crate::client::ConnectFailed {
            addr: "xen:3:5000".into(),
            cause: io::Error::new(kind, "connecting"),
        }))
    };
    assert!(is_final(&connect(io::ErrorKind::PermissionDenied)));
    assert!(!is_final(&connect(io::ErrorKind::ConnectionRefused)));
}

#[test]
fn client_side_checks_refuse_a_batch_that_breaks_the_rules() {
    let c = |seq| Some(Cursor { epoch: 1, seq });
    let ok = Batch::<u64, ()> { epoch: 1, resync: None, events: vec![(3, 0), (5, 0)], next: 6 };
    let (delivered, next) = updates(ok.clone(), c(2), 10).expect("valid");
    assert_eq!((delivered.len(), next), (2, Cursor { epoch: 1, seq: 6 }));
    // An event at or before the cursor (delivered twice), out of order, too many, ending early,
    // or events of another epoch without a resync.
    for (batch, cursor) in [
        (Batch { events: vec![(2, 0)], ..ok.clone() }, c(2)),
        (Batch { events: vec![(5, 0), (4, 0)], ..ok.clone() }, c(2)),
        (Batch { events: vec![(5, 0), (5, 0)], ..ok.clone() }, c(2)),
        (Batch { events: (3..20).map(|s| (s, 0)).collect(), next: 20, ..ok.clone() }, c(2)),
        (Batch { next: 4, ..ok.clone() }, c(2)),
        (Batch { epoch: 2, ..ok.clone() }, c(2)),
        (ok.clone(), None),
    ] {
        assert!(updates(batch.clone(), cursor, 10).is_err(), "{batch:?} after {cursor:?}");
    }
}

/// A subscriber of the model check: its cursor, the events delivered, how many of those it
/// wanted a resync declared lost, and where it started.
type Subscriber = (Option<Cursor>, BTreeSet<u64>, u64, Option<u64>);

/// One step of the model check.
#[derive(Debug, Clone)]
enum Op {
    Publish(u8),
    Poll { sub: usize, max: u32 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u8..12).prop_map(Op::Publish),
        (0usize..3, 1u32..6).prop_map(|(sub, max)| Op::Poll { sub, max }),
    ]
}

/// What the topic answers, by a model: every event ever published, the ring being the last
/// `cap` of them.
fn model_collect(
    published: u64,
    cap: u64,
    from: Option<u64>,
    keep: fn(u64) -> bool,
    snap: bool,
    max: usize,
) -> (Option<(ResyncReason, u64)>, Vec<u64>, u64) {
    let oldest = published.saturating_sub(cap); // events 1..=oldest are gone
    let Some(from) = from else { return (Some((ResyncReason::Start, published)), vec![], published) };
    if from < oldest {
        let at = if snap { published } else { oldest };
        return (Some((ResyncReason::Missed { count: at - from }, at)), vec![], at);
    }
    let mut events = vec![];
    let mut next = from;
    for seq in from + 1..=published {
        if keep(seq) {
            if events.len() == max {
                break;
            }
            events.push(seq);
        }
        next = seq;
    }
    (None, events, next)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The ring against the model, and the subscribers' accounting: every event published
    /// after a subscriber started is delivered once or counted in a resync, never twice.
    #[test]
    fn cursor_semantics_follow_the_model(
        cap in 1usize..8,
        snap in any::<bool>(),
        ops in proptest::collection::vec(op(), 1..80),
    ) {
        let topic: Topic<u64, u64> = if snap {
            Topic::with_snapshot(limits(cap), || 0)
        } else {
            Topic::new(limits(cap))
        };
        let keeps: [fn(u64) -> bool; 3] = [|_| true, |s| s % 2 == 0, |s| s % 3 != 0];
        let epoch = topic.cursor().epoch;
        let mut published = 0u64;
        // Per subscriber: its cursor, the events delivered, and those a resync declared lost.
        let mut subs: Vec<Subscriber> = vec![(None, BTreeSet::new(), 0, None); 3];
        for op in ops {
            match op {
                Op::Publish(n) => for _ in 0..n {
                    published += 1;
                    let c = topic.publish(published);
                    prop_assert_eq!(c, Cursor { epoch, seq: published });
                },
                Op::Poll { sub, max } => {
                    let (cursor, delivered, lost, started) = &mut subs[sub];
                    let keep = keeps[sub];
                    let filter: Filter<u64> = Arc::new(move |e: &u64| keep(*e));
                    let want = model_collect(published, cap as u64, cursor.map(|c| c.seq), keep, snap, max as usize);
                    let got = match topic.collect(*cursor, Some(&filter), snap, max as usize) {
                        Found::Resync(r, at) => (Some((r, at)), vec![], at),
                        Found::Events(e, next) => (None, e.iter().map(|(s, _)| *s).collect(), next),
                    };
                    prop_assert_eq!(&got, &want);
                    let batch = Batch::<u64, u64> {
                        epoch,
                        resync: got.0.map(|(reason, at)| Resync { reason, at, snapshot: snap.then_some(0) }),
                        events: got.1.iter().map(|s| (*s, *s)).collect(),
                        next: got.2,
                    };
                    let (updates, next) = updates(batch, *cursor, max).map_err(TestCaseError::fail)?;
                    for u in updates {
                        match u {
                            Update::Event { cursor: c, event } => {
                                prop_assert_eq!(c.seq, event);
                                prop_assert!(delivered.insert(event), "event {} delivered twice", event);
                            }
                            Update::Resync { cursor: c, reason, .. } => match reason {
                                ResyncReason::Start => *started = Some(c.seq),
                                ResyncReason::Missed { count } => {
                                    let before = cursor.map_or(0, |c| c.seq);
                                    prop_assert_eq!(count, c.seq - before);
                                    *lost += (before + 1..=c.seq).filter(|s| keep(*s)).count() as u64;
                                }
                                other => prop_assert!(false, "unexpected {:?}", other),
                            },
                        }
                    }
                    *cursor = Some(next);
                }
            }
        }
        // Accounting: up to each subscriber's cursor, every event it wanted after it started
        // was delivered or declared lost.
        for ((cursor, delivered, lost, started), keep) in subs.iter().zip(keeps) {
            let (Some(cursor), Some(started)) = (cursor, started) else { continue };
            let wanted = (started + 1..=cursor.seq).filter(|s| keep(*s)).count() as u64;
            prop_assert_eq!(delivered.len() as u64 + lost, wanted);
        }
    }
}
