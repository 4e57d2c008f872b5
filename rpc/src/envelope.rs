//! tarpc's client messages as the direct call path writes and reads them: the same bytes as
//! `tarpc::ClientMessage`, with the deadline kept as what travels — the time left — instead of
//! an `Instant`.
//!
//! tarpc's `Context` converts in its serde impls: writing reads the clock to turn the deadline
//! into the time left, reading reads it again to turn it back, and a server must check the
//! result once more (a deadline beyond any `Instant` panics tarpc's reader, which
//! [`check_deadline`](crate::codec::check_deadline) guards against). On a polling link a clock
//! read is a measurable part of a call, so here the caller reads the clock once per call on
//! each side and gives the instant: the client to [`ClientMessage::request`], the server to
//! [`Context::at`], which also refuses a deadline no `Instant` can hold.
//!
//! The types mirror tarpc 0.38's field for field, names included, so every serde format
//! writes them as it writes tarpc's; the tests check the bytes against tarpc's own types with
//! both codecs, and `tests/conformance.rs` checks both call paths against plain tarpc.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A message from a client: tarpc's `ClientMessage`, the deadline as the time left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientMessage<C> {
    /// A call (tarpc's `ClientMessage::Request`).
    Request(Request<C>),
    /// The client no longer wants the answer of `request_id` (tarpc's `ClientMessage::Cancel`).
    Cancel {
        /// Trace context of the cancellation.
        #[serde(default)]
        trace_context: tarpc::trace::Context,
        /// The call cancelled.
        request_id: u64,
    },
}

/// A call: tarpc's `Request`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request<C> {
    /// Its deadline and trace context.
    pub context: Context,
    /// The id its answer comes back under (the client's choice).
    pub id: u64,
    /// The call itself.
    pub message: C,
}

/// A call's context as it travels: tarpc's `context::Context`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Context {
    /// The time the call has left, as the client wrote it (zero: already past). A format that
    /// may omit fields gives tarpc's default, ten seconds.
    #[serde(rename = "deadline", default = "ten_seconds")]
    pub time_left: Duration,
    /// Trace context.
    pub trace_context: tarpc::trace::Context,
}

fn ten_seconds() -> Duration {
    Duration::from_secs(10)
}

impl<C> ClientMessage<C> {
    /// A call with `ctx`'s deadline, as the time left at `now` (zero if it has passed).
    pub fn request(ctx: &tarpc::context::Context, id: u64, message: C, now: Instant) -> ClientMessage<C> {
        let context = Context {
            time_left: ctx.deadline.saturating_duration_since(now),
            trace_context: ctx.trace_context,
        };
        ClientMessage::Request(Request { context, id, message })
    }
}

impl Context {
    /// The tarpc context of a call read at `now`: `base` (made once by
    /// `tarpc::context::current()`, tarpc's only way to make one) with this call's deadline
    /// and trace context. `None` if the deadline lies beyond what an `Instant` can hold: a
    /// hostile or broken peer, refused as an undecodable message.
    pub fn at(&self, now: Instant, base: tarpc::context::Context) -> Option<tarpc::context::Context> {
        let mut ctx = base;
        ctx.deadline = now.checked_add(self.time_left)?;
        ctx.trace_context = self.trace_context;
        Some(ctx)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tarpc::trace::{SamplingDecision, SpanId, TraceId};

    use super::*;
    use crate::codec::Codec;
    use crate::wire::Call;

    const CODECS: [Codec; 2] = [Codec::Bincode, Codec::Postcard];

    fn trace(trace_id: u128, span_id: u64, sampled: bool) -> tarpc::trace::Context {
        tarpc::trace::Context {
            trace_id: TraceId::from(trace_id),
            span_id: SpanId::from(span_id),
            sampling_decision: if sampled { SamplingDecision::Sampled } else { SamplingDecision::Unsampled },
        }
    }

    /// tarpc's own request with the same fields, its deadline `left` after `now`.
    fn tarpc_request(
        left: Duration,
        trace_context: tarpc::trace::Context,
        id: u64,
        call: Call,
        now: Instant,
    ) -> tarpc::ClientMessage<Call> {
        let mut context = tarpc::context::current();
        context.deadline = now + left;
        context.trace_context = trace_context;
        tarpc::ClientMessage::Request(tarpc::Request { context, id, message: call })
    }

    proptest! {
        /// Each side decodes the other's request to the same call: ids, calls and trace
        /// contexts exactly, the deadline within the time tarpc's own clock reads took (with
        /// bincode, in bytes of the same length).
        #[test]
        fn a_request_is_tarpcs_request(
            left_ms in 1u64..1_000_000_000,
            trace_id: u128, span_id: u64, sampled: bool,
            id: u64,
            method in "[a-z.]{0,24}",
            args in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let call = Call { method: method.into(), args };
            let left = Duration::from_millis(left_ms);
            let trace_context = trace(trace_id, span_id, sampled);
            for codec in CODECS {
                let now = Instant::now();
                let mut ctx = tarpc::context::current();
                ctx.deadline = now + left;
                ctx.trace_context = trace_context;
                let ours = codec.encode(&ClientMessage::request(&ctx, id, &call, now)).unwrap();

                // tarpc reads ours: its clock read comes later than `now`.
                let before = Instant::now();
                let theirs = codec.decode::<tarpc::ClientMessage<Call>>(&ours).unwrap();
                let after = Instant::now();
                let tarpc::ClientMessage::Request(r) = theirs else { panic!("{codec}: not a request") };
                prop_assert_eq!((r.id, &r.message, r.context.trace_context), (id, &call, trace_context));
                prop_assert!(r.context.deadline >= before + left && r.context.deadline <= after + left);

                // We read tarpc's: the time left it wrote is at most `left`, by its clock read.
                let sent = tarpc_request(left, trace_context, id, call.clone(), Instant::now());
                let bytes = codec.encode(&sent).unwrap();
                if codec == Codec::Bincode {
                    // Fixed-width integers: whatever the time left, the same length.
                    prop_assert_eq!(bytes.len(), ours.len(), "{}: lengths differ", codec);
                }
                let read = codec.decode::<ClientMessage<Call>>(&bytes).unwrap();
                let ClientMessage::Request(r) = read else { panic!("{codec}: not a request") };
                prop_assert_eq!((r.id, &r.message, r.context.trace_context), (id, &call, trace_context));
                prop_assert!(r.context.time_left <= left && r.context.time_left + Duration::from_secs(1) > left);
            }
        }

        /// A cancel is tarpc's cancel, byte for byte.
        #[test]
        fn a_cancel_is_tarpcs_cancel(trace_id: u128, span_id: u64, sampled: bool, request_id: u64) {
            let trace_context = trace(trace_id, span_id, sampled);
            for codec in CODECS {
                let ours = codec.encode(&ClientMessage::<Call>::Cancel { trace_context, request_id }).unwrap();
                let theirs = codec.encode(&tarpc::ClientMessage::<Call>::Cancel { trace_context, request_id }).unwrap();
                prop_assert_eq!(&ours, &theirs, "{}", codec);
                prop_assert_eq!(codec.decode::<ClientMessage<Call>>(&theirs).unwrap(), ClientMessage::Cancel { trace_context, request_id });
            }
        }
    }

    #[test]
    fn a_past_deadline_travels_as_no_time_left() {
        let now = Instant::now();
        let mut ctx = tarpc::context::current();
        ctx.deadline = now;
        let call = Call { method: "m".into(), args: Vec::new() };
        let ClientMessage::Request(r) = ClientMessage::request(&ctx, 1, &call, now + Duration::from_secs(1))
        else {
            panic!("not a request")
        };
        assert_eq!(r.context.time_left, Duration::ZERO);
    }

    #[test]
    fn a_deadline_no_instant_holds_gives_no_context() {
        let base = tarpc::context::current();
        let now = Instant::now();
        let far = Context { time_left: Duration::MAX, trace_context: trace(7, 8, true) };
        assert!(far.at(now, base).is_none());
        let near = Context { time_left: Duration::from_secs(3), ..far };
        let ctx = near.at(now, base).unwrap();
        assert_eq!((ctx.deadline, ctx.trace_context), (now + Duration::from_secs(3), trace(7, 8, true)));
    }
}
