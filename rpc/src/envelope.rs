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

use std::io;
use std::time::{Duration, Instant};

use bytes::{BufMut, BytesMut};
use serde::{Deserialize, Serialize};
use tarpc::trace::{SamplingDecision, SpanId, TraceId};

use crate::codec::Codec;
use crate::wire::Call;

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

/// With bincode — fixed-width integers, little-endian, the format of every call by default —
/// what precedes the call in a message is written and read by hand, and only the call
/// (`Call`) through serde. serde's path visits the trace id's 16 bytes one at a time and each
/// fixed field through the codec's generic reader: the two sides' envelope took 1,700 of a
/// typed call's 16,430 instructions, by hand 800 (`scripts/call-cost`). No crate reads a fixed
/// layout such as this one faster than these few lines; the tests check them against serde's
/// own encoding and decoding of the same types, byte for byte, and the `rpc_message` fuzz
/// target against tarpc's.
impl ClientMessage<Call> {
    /// Reads a client's message: a whole frame (bytes after the message are an error).
    pub fn decode(codec: Codec, frame: &[u8]) -> io::Result<ClientMessage<Call>> {
        match codec {
            Codec::Bincode => fixed::read(frame),
            Codec::Postcard => codec.decode(frame),
        }
    }
}

impl ClientMessage<&Call> {
    /// Writes the message at the end of `dst` (on an error, some of it may be written: the
    /// caller truncates, as [`Frames::encode_with`](crate::codec::Frames::encode_with) does).
    pub fn write(&self, codec: Codec, dst: &mut BytesMut) -> io::Result<()> {
        match codec {
            Codec::Bincode => fixed::write(self, dst),
            Codec::Postcard => codec.encode(self).map(|bytes| dst.extend_from_slice(&bytes)),
        }
    }
}

/// bincode's fixed-width layout of a [`ClientMessage`] up to its call (see above).
mod fixed {
    use super::*;
    use crate::codec::invalid;

    const REQUEST: u32 = 0;
    const CANCEL: u32 = 1;

    /// The bytes of a message, read from the front.
    struct Reader<'a>(&'a [u8]);

    impl Reader<'_> {
        fn take<const N: usize>(&mut self) -> io::Result<[u8; N]> {
            let (head, rest) =
                self.0.split_first_chunk::<N>().ok_or_else(|| invalid("the message ends early"))?;
            self.0 = rest;
            Ok(*head)
        }

        fn u32(&mut self) -> io::Result<u32> {
            self.take().map(u32::from_le_bytes)
        }

        fn u64(&mut self) -> io::Result<u64> {
            self.take().map(u64::from_le_bytes)
        }

        /// tarpc's `trace::Context`: the trace id as 16 bytes (little-endian), the span id, the
        /// sampling decision's variant.
        fn trace(&mut self) -> io::Result<tarpc::trace::Context> {
            let trace_id = TraceId::from(u128::from_le_bytes(self.take()?));
            let span_id = SpanId::from(self.u64()?);
            let sampling_decision = match self.u32()? {
                0 => SamplingDecision::Sampled,
                1 => SamplingDecision::Unsampled,
                v => return Err(invalid(format!("sampling decision {v}"))),
            };
            Ok(tarpc::trace::Context { trace_id, span_id, sampling_decision })
        }

        /// A `Duration` as serde reads one: seconds and nanoseconds, refused if the seconds
        /// overflow once the nanoseconds' whole seconds are added.
        fn duration(&mut self) -> io::Result<Duration> {
            let (secs, nanos) = (self.u64()?, self.u32()?);
            secs.checked_add(u64::from(nanos / 1_000_000_000))
                .ok_or_else(|| invalid("overflow deserializing Duration"))?;
            Ok(Duration::new(secs, nanos))
        }
    }

    pub(super) fn read(frame: &[u8]) -> io::Result<ClientMessage<Call>> {
        let mut r = Reader(frame);
        match r.u32()? {
            REQUEST => {
                let time_left = r.duration()?;
                let trace_context = r.trace()?;
                let id = r.u64()?;
                let message = Codec::Bincode.decode::<Call>(r.0)?;
                Ok(ClientMessage::Request(Request {
                    context: Context { time_left, trace_context },
                    id,
                    message,
                }))
            }
            CANCEL => {
                let trace_context = r.trace()?;
                let request_id = r.u64()?;
                if !r.0.is_empty() {
                    return Err(invalid(format!("{} bytes after the message", r.0.len())));
                }
                Ok(ClientMessage::Cancel { trace_context, request_id })
            }
            v => Err(invalid(format!("message kind {v}"))),
        }
    }

    fn put_trace(t: &tarpc::trace::Context, dst: &mut BytesMut) {
        dst.put_u128_le(u128::from(t.trace_id));
        dst.put_u64_le(u64::from(t.span_id));
        dst.put_u32_le(match t.sampling_decision {
            SamplingDecision::Sampled => 0,
            SamplingDecision::Unsampled => 1,
        });
    }

    pub(super) fn write(message: &ClientMessage<&Call>, dst: &mut BytesMut) -> io::Result<()> {
        match message {
            ClientMessage::Request(r) => {
                dst.put_u32_le(REQUEST);
                dst.put_u64_le(r.context.time_left.as_secs());
                dst.put_u32_le(r.context.time_left.subsec_nanos());
                put_trace(&r.context.trace_context, dst);
                dst.put_u64_le(r.id);
                bincode::serialize_into(dst.writer(), r.message).map_err(invalid)
            }
            ClientMessage::Cancel { trace_context, request_id } => {
                dst.put_u32_le(CANCEL);
                put_trace(trace_context, dst);
                dst.put_u64_le(*request_id);
                Ok(())
            }
        }
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

    /// Any message: a request (any deadline, trace context, id, call) or a cancel.
    fn any_message() -> impl Strategy<Value = ClientMessage<Call>> {
        let trace = (any::<u128>(), any::<u64>(), any::<bool>()).prop_map(|(t, s, b)| trace(t, s, b));
        let call = ("[a-z.]{0,24}", proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(method, args)| Call { method: method.into(), args });
        let time_left = (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n));
        let request = (time_left, trace.clone(), any::<u64>(), call).prop_map(
            |(time_left, trace_context, id, message)| {
                ClientMessage::Request(Request { context: Context { time_left, trace_context }, id, message })
            },
        );
        let cancel = (trace, any::<u64>())
            .prop_map(|(trace_context, request_id)| ClientMessage::Cancel { trace_context, request_id });
        prop_oneof![request, cancel]
    }

    fn borrowed(m: &ClientMessage<Call>) -> ClientMessage<&Call> {
        match m {
            ClientMessage::Request(r) => {
                ClientMessage::Request(Request { context: r.context, id: r.id, message: &r.message })
            }
            ClientMessage::Cancel { trace_context, request_id } => {
                ClientMessage::Cancel { trace_context: *trace_context, request_id: *request_id }
            }
        }
    }

    /// The same answer from the hand-written reader and serde's, for `bytes`.
    fn readers_agree(bytes: &[u8]) -> Result<(), TestCaseError> {
        let by_hand = ClientMessage::decode(Codec::Bincode, bytes);
        let by_serde = Codec::Bincode.decode::<ClientMessage<Call>>(bytes);
        match (&by_hand, &by_serde) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a, b),
            (Err(_), Err(_)) => {}
            _ => prop_assert!(false, "by hand {:?}, by serde {:?}, of {:?}", by_hand, by_serde, bytes),
        }
        Ok(())
    }

    proptest! {
        /// Written by hand or by serde, a message is the same bytes, with either codec; read
        /// back, the same message.
        #[test]
        fn writing_and_reading_match_serdes(m in any_message()) {
            for codec in CODECS {
                let mut ours = BytesMut::new();
                borrowed(&m).write(codec, &mut ours).unwrap();
                prop_assert_eq!(&ours[..], &codec.encode(&m).unwrap()[..], "{}", codec);
                prop_assert_eq!(ClientMessage::decode(codec, &ours).unwrap(), m.clone());
            }
        }

        /// A message cut short, with a byte changed, or with bytes after it: the reader by
        /// hand refuses what serde's refuses and reads what it reads.
        #[test]
        fn damaged_messages_are_read_as_serde_reads_them(
            m in any_message(), cut in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(),
            byte: u8, extra in proptest::collection::vec(any::<u8>(), 0..4),
        ) {
            let bytes = Codec::Bincode.encode(&m).unwrap();
            readers_agree(&bytes[..cut.index(bytes.len() + 1)])?;
            let mut changed = bytes.clone();
            changed[at.index(bytes.len())] = byte;
            readers_agree(&changed)?;
            readers_agree(&[&bytes[..], &extra].concat())?;
        }

        /// Any bytes at all.
        #[test]
        fn any_bytes_are_read_as_serde_reads_them(bytes in proptest::collection::vec(any::<u8>(), 0..96)) {
            readers_agree(&bytes)?;
        }
    }

    /// A time left whose nanoseconds carry its seconds past `u64::MAX`: refused, as serde
    /// refuses it, not a panic.
    #[test]
    fn a_time_left_that_overflows_is_refused() {
        for (secs, nanos) in [(u64::MAX, 1_000_000_000u32), (u64::MAX - 3, u32::MAX), (u64::MAX, 999_999_999)]
        {
            let mut bytes = Vec::new();
            bytes.extend_from_slice(&0u32.to_le_bytes());
            bytes.extend_from_slice(&secs.to_le_bytes());
            bytes.extend_from_slice(&nanos.to_le_bytes());
            bytes.extend_from_slice(&[0; 16 + 8]);
            bytes.extend_from_slice(&1u32.to_le_bytes());
            bytes.extend_from_slice(&7u64.to_le_bytes());
            bytes.extend_from_slice(
                &Codec::Bincode.encode(&Call { method: "m".into(), args: vec![] }).unwrap(),
            );
            readers_agree(&bytes).unwrap();
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
