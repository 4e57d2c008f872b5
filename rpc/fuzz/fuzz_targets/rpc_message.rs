//! Fuzz target: RPC messages from a hostile peer, and the dispatch `#[dombus::service]`
//! generates.
//!
//! Input: arbitrary bytes, used three ways, each with both codecs (bincode and postcard):
//!
//! * **A frame to the server**: `Codec::decode::<tarpc::ClientMessage<Call>>` (what the server's
//!   transport does with every frame on tarpc's channel). A message that decodes re-encodes,
//!   and decodes again to the same message (the deadline, sent as time remaining, within 10 s);
//!   a decoded request's call then goes to the service's dispatch, as the server would send it.
//!   The direct path's decoding (`envelope::ClientMessage::decode`, by hand for bincode, then
//!   `Context::at`) must accept exactly the frames tarpc's accepts, as the same message.
//! * **A frame to the client**: `Codec::decode::<tarpc::Response<Reply>>`. Same round trip:
//!   equal with bincode; with postcard equal except for tarpc's error-kind quirk (the kind goes
//!   out as a zigzagged `i32` and comes back as a `u32`, see codec.rs `tarpc_quirk`), which is
//!   modelled exactly. A decoded reply's bytes go to the generated client's `decode_response`
//!   for every method (the client's parser of results): errors are fine, panics are not.
//! * **A call**: first byte < 0x80 picks a method name from a list (the service's methods,
//!   built-ins and near misses), the rest are the arguments; first byte >= 0x80 takes the next
//!   `byte & 0x7f` bytes (lossy UTF-8) as the name. Into `Dispatch::dispatch` of the service
//!   below (arguments: `String`, `Vec<u8>`, `Option<u64>`, a struct, an enum, a tuple, `char`,
//!   `f64`, none), its future polled to completion.
//!
//! Dispatch must agree with an independent decoding of the arguments (as the tuple of the
//! method's argument types): unknown names are refused with `NotFound` / "unknown method",
//! arguments that do not decode with `InvalidData` / "arguments of fuzzed.<method>", both with a
//! bounded detail; arguments that decode run the method, whose future is ready at once and
//! answers exactly the encoded result of the same function on the same values (which the
//! generated `decode_response` then decodes). The generated client's `encode_args` for those
//! values must give the bytes the server decodes them from. Decoding a frame allocates at most
//! 1 KiB plus twice the frame's size at once; decoding arguments at most serde's 1 MiB
//! preallocation cap more than that.
//!
//! The dispatch is generated code, but the only way to it from outside dombus-rpc is through a
//! `Service`, whose `dispatch()` is crate-private. So this file names itself `dombus` (`extern
//! crate self as dombus`) and provides what the expansion refers to (`::dombus::rpc::…`,
//! `::dombus::__private::…`): everything re-exported from the real crates, except
//! `rpc::Service`, replaced by a stand-in that keeps the dispatcher where this target can call
//! it. The generated code is compiled unchanged against the real `Dispatch`, `Codec`, `wire`
//! error helpers and tarpc.
#![no_main]

extern crate self as dombus;

mod common;

use std::borrow::Cow;
use std::io;
use std::time::{Duration, Instant};

use dombus_rpc::Request as _;
use dombus_rpc::codec::Codec;
use dombus_rpc::envelope;
use dombus_rpc::wire::{Call, Reply, UNKNOWN_METHOD};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tarpc::{ClientMessage, Response, ServerError};

#[global_allocator]
static ALLOC: common::Probe = common::Probe;

pub use dombus_facade::{__private, service};

/// `::dombus::rpc` for the generated code: the real crate, but a `Service` that hands out its
/// dispatcher.
pub mod rpc {
    pub use dombus_rpc::*;

    /// Stand-in for `dombus_rpc::Service` (same constructor).
    pub struct Service {
        pub dispatch: Box<dyn Dispatch>,
    }

    impl Service {
        pub fn new(_descriptor: ServiceDescriptor, dispatch: impl Dispatch) -> Service {
            Service { dispatch: Box::new(dispatch) }
        }
    }
}

/// A struct argument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub name: String,
    pub size: u64,
    pub tags: Vec<String>,
    pub extra: Option<Vec<u8>>,
}

/// An enum argument.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Choice {
    Empty,
    Number(u32),
    Pair(i16, bool),
    Named { key: String, data: Vec<u8> },
}

/// A method's error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Failure {
    Unnamed,
    TooBig { size: u64 },
}

/// A service with arguments of every common shape.
#[dombus::service]
pub trait Fuzzed {
    /// A string.
    async fn text(&self, s: String) -> String;
    /// Bytes (a sequence, as a user would write it) and an optional number.
    async fn blob(&self, data: Vec<u8>, limit: Option<u64>) -> u64;
    /// A struct, and a `Result`.
    async fn record(&self, r: Record) -> Result<Record, Failure>;
    /// An enum and an optional string.
    async fn choose(&self, c: Choice, tag: Option<String>) -> Vec<Choice>;
    /// Scalars and a tuple.
    async fn mixed(&self, a: u8, b: i64, c: bool, d: char, e: (u16, Option<i32>, f64)) -> Option<String>;
    /// No arguments, no result.
    async fn nothing(&self);
}

/// The methods' bodies, shared by the implementation and the oracle.
mod body {
    use super::{Choice, Failure, Record};

    pub fn text(s: String) -> String {
        s.chars().rev().collect()
    }
    pub fn blob(data: Vec<u8>, limit: Option<u64>) -> u64 {
        data.iter().map(|&b| u64::from(b)).sum::<u64>().min(limit.unwrap_or(u64::MAX))
    }
    pub fn record(mut r: Record) -> Result<Record, Failure> {
        if r.name.is_empty() {
            return Err(Failure::Unnamed);
        }
        if r.size > 1 << 40 {
            return Err(Failure::TooBig { size: r.size });
        }
        r.tags.reverse();
        Ok(r)
    }
    pub fn choose(c: Choice, tag: Option<String>) -> Vec<Choice> {
        vec![c, Choice::Named { key: tag.unwrap_or_default(), data: Vec::new() }]
    }
    pub fn mixed(a: u8, b: i64, c: bool, d: char, e: (u16, Option<i32>, f64)) -> Option<String> {
        c.then(|| format!("{a} {b} {d} {e:?}"))
    }
}

struct Host;

impl Fuzzed for Host {
    async fn text(&self, s: String) -> String {
        body::text(s)
    }
    async fn blob(&self, data: Vec<u8>, limit: Option<u64>) -> u64 {
        body::blob(data, limit)
    }
    async fn record(&self, r: Record) -> Result<Record, Failure> {
        body::record(r)
    }
    async fn choose(&self, c: Choice, tag: Option<String>) -> Vec<Choice> {
        body::choose(c, tag)
    }
    async fn mixed(&self, a: u8, b: i64, c: bool, d: char, e: (u16, Option<i32>, f64)) -> Option<String> {
        body::mixed(a, b, c, d, e)
    }
    async fn nothing(&self) {}
}

const SERVICE: &str = "fuzzed";
/// The service's methods.
const METHODS: [&str; 6] = ["text", "blob", "record", "choose", "mixed", "nothing"];
/// Names a raw call picks from: the methods, then near misses and the built-ins (which the
/// server answers itself, so a service's dispatch must not know them).
const NAMES: [&str; 12] = [
    "text",
    "blob",
    "record",
    "choose",
    "mixed",
    "nothing",
    "Text",
    "text ",
    "",
    "dombus.ping",
    "dombus.describe",
    "fuzzed.text",
];

const CODECS: [Codec; 2] = [Codec::Bincode, Codec::Postcard];

/// Largest single allocation allowed while decoding a frame of `len` bytes.
fn frame_alloc_limit(len: usize) -> usize {
    1024 + 2 * len
}

/// What dispatch must do with a call.
enum Expect {
    Unknown,
    BadArgs,
    Reply(Vec<u8>),
}

/// Decodes the arguments as the tuple `A` (the same encoding as the generated argument struct);
/// checks that the generated client encodes those values to the same bytes, and answers the
/// encoded result of `f`.
fn run<A, R>(args: &[u8], codec: Codec, f: impl FnOnce(A) -> (FuzzedRequest, R)) -> Expect
where
    A: Serialize + DeserializeOwned,
    R: Serialize,
{
    let Ok(a) = codec.decode::<A>(args) else { return Expect::BadArgs };
    let canonical = codec.encode(&a).expect("decoded arguments re-encode");
    let (request, result) = f(a);
    let method = request.method();
    let sent = request.encode_args(codec).expect("encode_args");
    assert_eq!(sent, canonical, "{codec}: the client encodes the arguments of {method} differently");
    Expect::Reply(codec.encode(&result).expect("results encode"))
}

fn expect(method: &str, args: &[u8], codec: Codec) -> Expect {
    use FuzzedRequest as Q;
    match method {
        "text" => run(args, codec, |(s,): (String,)| (Q::Text { s: s.clone() }, body::text(s))),
        "blob" => run(args, codec, |(data, limit): (Vec<u8>, Option<u64>)| {
            (Q::Blob { data: data.clone(), limit }, body::blob(data, limit))
        }),
        "record" => run(args, codec, |(r,): (Record,)| (Q::Record { r: r.clone() }, body::record(r))),
        "choose" => run(args, codec, |(c, tag): (Choice, Option<String>)| {
            (Q::Choose { c: c.clone(), tag: tag.clone() }, body::choose(c, tag))
        }),
        "mixed" => run(args, codec, |(a, b, c, d, e): (u8, i64, bool, char, (u16, Option<i32>, f64))| {
            (Q::Mixed { a, b, c, d, e }, body::mixed(a, b, c, d, e))
        }),
        "nothing" => run(args, codec, |(): ()| (Q::Nothing {}, ())),
        _ => Expect::Unknown,
    }
}

/// A refusal's detail is sent back to the peer: it must stay small whatever the call was.
fn check_detail(e: &ServerError) {
    assert!(e.detail.len() <= 2048, "{} bytes of error detail: {:?}", e.detail.len(), e.detail);
}

/// One call through the generated dispatch, checked against [`expect`].
fn dispatch(service: &rpc::Service, method: &str, args: &[u8], codec: Codec) {
    let (started, largest) = common::largest_allocation(|| service.dispatch.dispatch(method, args, codec));
    assert!(
        largest <= (1 << 20) + frame_alloc_limit(args.len()),
        "{codec}: decoding {} bytes of arguments allocated {largest} bytes at once",
        args.len()
    );
    match (started, expect(method, args, codec)) {
        (Ok(reply), Expect::Reply(want)) => {
            let got = common::poll_to_end(reply, 4);
            let got = got.unwrap_or_else(|e| panic!("{codec}: {method} failed: {e}"));
            assert_eq!(got, want, "{codec}: {method} answered other bytes");
            if let Err(e) = FuzzedRequest::decode_response(method, &got, codec) {
                panic!("{codec}: the client cannot decode the result of {method}: {e}");
            }
        }
        (Err(e), Expect::Unknown) => {
            assert_eq!(e.kind, io::ErrorKind::NotFound, "{method:?}: {e}");
            assert!(e.detail.starts_with(UNKNOWN_METHOD), "{method:?}: {e}");
            check_detail(&e);
        }
        (Err(e), Expect::BadArgs) => {
            assert_eq!(e.kind, io::ErrorKind::InvalidData, "{method:?}: {e}");
            let prefix = format!("arguments of {SERVICE}.{method} ");
            assert!(e.detail.starts_with(&prefix), "{method:?}: {e}");
            check_detail(&e);
        }
        (Ok(_), Expect::Unknown) => panic!("{codec}: dispatch ran unknown method {method:?}"),
        (Ok(_), Expect::BadArgs) => panic!("{codec}: dispatch ran {method} on arguments that do not decode"),
        (Err(e), Expect::Reply(_)) => panic!("{codec}: dispatch refused {method} with good arguments: {e}"),
    }
}

fn client_message(data: &[u8], codec: Codec, service: &rpc::Service) {
    // What the server on tarpc's channel does with a frame: the deadline check, then tarpc's
    // decoding (which would panic on a deadline beyond any Instant without the check: found by
    // this target).
    let (decoded, largest) = common::largest_allocation(|| {
        dombus_rpc::codec::check_deadline(codec, data)
            .and_then(|()| codec.decode::<ClientMessage<Call>>(data))
    });
    assert!(largest <= frame_alloc_limit(data.len()), "{codec}: {} bytes: allocated {largest}", data.len());
    // What the direct path's server does: dombus's envelope, then the deadline from the
    // instant it read the call. It must take exactly what tarpc takes, as the same message.
    let (envelope, largest) = common::largest_allocation(|| envelope::ClientMessage::decode(codec, data));
    assert!(largest <= frame_alloc_limit(data.len()), "{codec}: {} bytes: allocated {largest}", data.len());
    let now = Instant::now();
    let envelope = envelope.ok().filter(|m| match m {
        envelope::ClientMessage::Request(r) => r.context.at(now, tarpc::context::current()).is_some(),
        envelope::ClientMessage::Cancel { .. } => true,
    });
    match (&decoded, &envelope) {
        (Ok(ClientMessage::Request(a)), Some(envelope::ClientMessage::Request(b))) => {
            assert_eq!(
                (a.id, &a.message, a.context.trace_context),
                (b.id, &b.message, b.context.trace_context)
            );
            let left = a.context.deadline.saturating_duration_since(now);
            assert!(
                left <= b.context.time_left,
                "{codec}: tarpc read {left:?} left, the envelope {:?}",
                b.context.time_left
            );
        }
        (
            Ok(ClientMessage::Cancel { trace_context: t1, request_id: r1 }),
            Some(envelope::ClientMessage::Cancel { trace_context: t2, request_id: r2 }),
        ) => assert_eq!((t1, r1), (t2, r2), "{codec}"),
        (Err(_), None) => {}
        (a, b) => panic!("{codec}: tarpc read {a:?}, the envelope {b:?}"),
    }
    let Ok(msg) = decoded else { return };
    let bytes = codec.encode(&msg).expect("a decoded message re-encodes");
    let again = codec.decode::<ClientMessage<Call>>(&bytes).expect("a re-encoded message decodes");
    match (&msg, &again) {
        (ClientMessage::Request(a), ClientMessage::Request(b)) => {
            assert_eq!((a.id, &a.message), (b.id, &b.message), "{codec}");
            assert_eq!(a.context.trace_context, b.context.trace_context, "{codec}");
            // Sent as time remaining: the second reading is later by the time in between.
            let drift = b.context.deadline.checked_duration_since(a.context.deadline);
            assert!(drift.is_some_and(|d| d < Duration::from_secs(10)), "{codec}: deadline drift {drift:?}");
        }
        (
            ClientMessage::Cancel { trace_context: t1, request_id: r1 },
            ClientMessage::Cancel { trace_context: t2, request_id: r2 },
        ) => assert_eq!((t1, r1), (t2, r2), "{codec}"),
        (a, b) => panic!("{codec}: {a:?} came back as {b:?}"),
    }
    if let ClientMessage::Request(r) = msg {
        dispatch(service, &r.message.method, &r.message.args, codec);
    }
}

/// tarpc's `io::ErrorKind` numbering (`util::serde`).
fn kind_code(kind: io::ErrorKind) -> u32 {
    use io::ErrorKind::*;
    match kind {
        NotFound => 0,
        PermissionDenied => 1,
        ConnectionRefused => 2,
        ConnectionReset => 3,
        ConnectionAborted => 4,
        NotConnected => 5,
        AddrInUse => 6,
        AddrNotAvailable => 7,
        BrokenPipe => 8,
        AlreadyExists => 9,
        WouldBlock => 10,
        InvalidInput => 11,
        InvalidData => 12,
        TimedOut => 13,
        WriteZero => 14,
        Interrupted => 15,
        UnexpectedEof => 17,
        _ => 16,
    }
}

fn kind_from_code(code: u32) -> io::ErrorKind {
    use io::ErrorKind::*;
    [
        NotFound,
        PermissionDenied,
        ConnectionRefused,
        ConnectionReset,
        ConnectionAborted,
        NotConnected,
        AddrInUse,
        AddrNotAvailable,
        BrokenPipe,
        AlreadyExists,
        WouldBlock,
        InvalidInput,
        InvalidData,
        TimedOut,
        WriteZero,
        Interrupted,
        Other,
        UnexpectedEof,
    ]
    .get(code as usize)
    .copied()
    .unwrap_or(Other)
}

fn response(data: &[u8], codec: Codec) {
    let (decoded, largest) = common::largest_allocation(|| codec.decode::<Response<Reply>>(data));
    assert!(largest <= frame_alloc_limit(data.len()), "{codec}: {} bytes: allocated {largest}", data.len());
    let Ok(r) = decoded else { return };
    let bytes = codec.encode(&r).expect("a decoded response re-encodes");
    let again = codec.decode::<Response<Reply>>(&bytes).expect("a re-encoded response decodes");
    let want = match (&r.message, codec) {
        // tarpc writes the kind as an i32, which postcard zigzags (n -> 2n), and reads a u32.
        (Err(e), Codec::Postcard) => Response {
            request_id: r.request_id,
            message: Err(ServerError::new(kind_from_code(2 * kind_code(e.kind)), e.detail.clone())),
        },
        _ => r.clone(),
    };
    assert_eq!(again, want, "{codec}");
    if let Ok(reply) = &r.message {
        for method in METHODS.iter().chain(["unknown", ""].iter()) {
            let _ = FuzzedRequest::decode_response(method, &reply.0, codec);
        }
    }
}

fn raw_call(data: &[u8], service: &rpc::Service) {
    let Some((&pick, rest)) = data.split_first() else { return };
    let (method, args): (Cow<'_, str>, &[u8]) = if pick < 0x80 {
        (Cow::Borrowed(NAMES[usize::from(pick) % NAMES.len()]), rest)
    } else {
        let n = usize::from(pick & 0x7f).min(rest.len());
        (String::from_utf8_lossy(&rest[..n]), &rest[n..])
    };
    for codec in CODECS {
        dispatch(service, &method, args, codec);
    }
}

thread_local! {
    static SERVICE_UNDER_TEST: rpc::Service = Host.into_service();
}

fuzz_target!(|data: &[u8]| {
    SERVICE_UNDER_TEST.with(|service| {
        for codec in CODECS {
            client_message(data, codec, service);
            response(data, codec);
        }
        raw_call(data, service);
    });
});
