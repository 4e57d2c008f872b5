//! Fuzz target: the connection preamble, both directions, from a hostile peer.
//!
//! Input: one control byte, then the peer's bytes. Control bits 0..=3: the peer delivers its
//! bytes in chunks of that many (0: all at once); bit 4: the peer answers `Pending` (with a
//! wake-up) before every chunk; bit 5: the client asks for postcard (else bincode); bits 6..=7:
//! the refusal for the `answer` round trip. After its bytes the peer has closed its side: reads
//! give EOF.
//!
//! * **Server side**: the bytes as a client hello, into `preamble::read_hello`. It must return
//!   exactly what an independent reading of the format gives (`Hello` for a well-formed hello,
//!   `Refusal::Malformed` for anything else, including a short one), consume exactly the hello's
//!   bytes (what follows is the first RPC frame) and write nothing.
//! * **Client side**: the bytes as the server's answer, into `preamble::client`. It must send
//!   exactly the hello for its service and codec, and return what the answer says: `Ok` for
//!   status 0, `NotFound` / `Unsupported` / `ConnectionRefused` (5, too many connections) /
//!   `InvalidData` for the refusals with the server's message in the error, `InvalidData` for a bad magic, `UnexpectedEof` for a short answer;
//!   and consume exactly the answer's bytes.
//! * **Round trips**: the bytes (if UTF-8) as a service name: `check_name` accepts exactly the
//!   names of 1 to 64 `A-Z a-z 0-9 _ . -`; a client with an accepted name sends a hello that
//!   `read_hello` reads back as that name, version and codec; a refused name is refused before
//!   anything is sent. `answer` with the bytes (lossy UTF-8) as message reaches the client as
//!   the matching error, with the message when it fits the 255 bytes.
//! * **Bounds**: nothing waits (every call is ready once its input is used up: polled with a
//!   no-op waker a bounded number of times), and no call allocates more than 4 KiB at once
//!   whatever lengths the bytes claim.
#![no_main]

mod common;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use dombus_rpc::codec::Codec;
use dombus_rpc::preamble::{self, Hello, MAX_NAME, Refusal, VERSION};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

#[global_allocator]
static ALLOC: common::Probe = common::Probe;

/// Longer than any fuzz run: an answer can never come from the timeout firing (and with no
/// runtime driving the clock, it cannot fire anyway).
const NEVER: Duration = Duration::from_secs(24 * 3600);
/// Largest single allocation allowed to a preamble call: names are at most 64 bytes, messages
/// at most 255, so anything near this means a claimed length was trusted.
const ALLOC_LIMIT: usize = 4096;

/// A peer that sent `input` and closed its side; what we write is collected.
struct Peer<'a> {
    input: &'a [u8],
    pos: usize,
    chunk: usize,
    stall: bool,
    stalled: bool,
    written: Vec<u8>,
}

impl<'a> Peer<'a> {
    fn new(input: &'a [u8], control: u8) -> Peer<'a> {
        Peer {
            input,
            pos: 0,
            chunk: usize::from(control & 0x0f),
            stall: control & 0x10 != 0,
            stalled: false,
            written: Vec::new(),
        }
    }

    /// Enough polls for every chunk and every stall, plus a few.
    fn max_polls(&self) -> usize {
        2 * self.input.len() + 16
    }
}

impl AsyncRead for Peer<'_> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.stall && !this.stalled && this.pos < this.input.len() {
            this.stalled = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        this.stalled = false;
        let rest = &this.input[this.pos..];
        let mut n = rest.len().min(buf.remaining());
        if this.chunk > 0 {
            n = n.min(this.chunk);
        }
        buf.put_slice(&rest[..n]);
        this.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Peer<'_> {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.get_mut().written.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn name_ok(name: &[u8]) -> bool {
    (1..=MAX_NAME).contains(&name.len())
        && name.iter().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(b))
}

/// The format, read independently: `DOMBUS` version codec len name.
fn expected_hello(b: &[u8]) -> Option<(Hello, usize)> {
    if b.len() < 9 || &b[..6] != b"DOMBUS" {
        return None;
    }
    let len = usize::from(b[8]);
    if b.len() < 9 + len || !name_ok(&b[9..9 + len]) {
        return None;
    }
    let service = String::from_utf8(b[9..9 + len].to_vec()).expect("checked ASCII");
    Some((Hello { version: b[6], codec: b[7], service }, 9 + len))
}

fn hello_bytes(service: &str, codec: Codec) -> Vec<u8> {
    let mut v = b"DOMBUS".to_vec();
    v.extend_from_slice(&[VERSION, codec.id(), service.len() as u8]);
    v.extend_from_slice(service.as_bytes());
    v
}

/// The format, read independently: `DB` status len message. `Ok(status, message, used)` or
/// the error kind.
fn expected_answer(b: &[u8]) -> Result<(u8, String, usize), io::ErrorKind> {
    if b.len() < 4 {
        return Err(io::ErrorKind::UnexpectedEof);
    }
    if &b[..2] != b"DB" {
        return Err(io::ErrorKind::InvalidData);
    }
    let len = usize::from(b[3]);
    if b.len() < 4 + len {
        return Err(io::ErrorKind::UnexpectedEof);
    }
    Ok((b[2], String::from_utf8_lossy(&b[4..4 + len]).into_owned(), 4 + len))
}

fn status_kind(status: u8) -> Option<io::ErrorKind> {
    match status {
        0 => None,
        1 => Some(io::ErrorKind::NotFound),
        2 | 3 => Some(io::ErrorKind::Unsupported),
        5 => Some(io::ErrorKind::ConnectionRefused),
        _ => Some(io::ErrorKind::InvalidData),
    }
}

/// Runs `f` under the allocation probe and checks its bound.
fn bounded<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let (r, largest) = common::largest_allocation(f);
    assert!(largest <= ALLOC_LIMIT, "{what}: allocated {largest} bytes at once");
    r
}

fn server_side(bytes: &[u8], control: u8) {
    let mut peer = Peer::new(bytes, control);
    let polls = peer.max_polls();
    let got = bounded("read_hello", || common::poll_to_end(preamble::read_hello(&mut peer, NEVER), polls));
    assert!(peer.written.is_empty(), "read_hello wrote {:?}", peer.written);
    match expected_hello(bytes) {
        Some((hello, used)) => {
            assert_eq!(got, Ok(hello));
            assert_eq!(peer.pos, used, "read_hello must not read into the first frame");
        }
        None => assert_eq!(got, Err(Refusal::Malformed)),
    }
}

fn client_side(bytes: &[u8], control: u8, codec: Codec) {
    const SERVICE: &str = "fuzz.svc-1";
    let mut peer = Peer::new(bytes, control);
    let polls = peer.max_polls();
    let got =
        bounded("client", || common::poll_to_end(preamble::client(&mut peer, SERVICE, codec, NEVER), polls));
    assert_eq!(peer.written, hello_bytes(SERVICE, codec));
    match expected_answer(bytes) {
        Err(kind) => assert_eq!(got.map_err(|e| e.kind()), Err(kind)),
        Ok((status, msg, used)) => {
            assert_eq!(peer.pos, used, "client must read exactly the answer");
            match (status_kind(status), got) {
                (None, Ok(())) => {}
                (Some(kind), Err(e)) => {
                    assert_eq!(e.kind(), kind, "status {status}: {e}");
                    assert!(e.to_string().contains(&msg), "status {status}: {e} lacks {msg:?}");
                }
                (want, got) => panic!("status {status}: expected {want:?}, got {got:?}"),
            }
        }
    }
}

/// `bytes` as a service name: `check_name`, and a hello sent by `client` read back by `read_hello`.
fn name_round_trip(bytes: &[u8], codec: Codec) {
    let Ok(name) = std::str::from_utf8(bytes) else { return };
    assert_eq!(preamble::check_name(name).is_ok(), name_ok(bytes), "check_name({name:?})");
    let mut server = Peer::new(&[], 0);
    common::poll_to_end(preamble::answer(&mut server, None, ""), 4).expect("in memory");
    let mut client = Peer::new(&server.written, 0);
    let r = common::poll_to_end(preamble::client(&mut client, name, codec, NEVER), 16);
    if !name_ok(bytes) {
        assert_eq!(r.map_err(|e| e.kind()), Err(io::ErrorKind::InvalidInput));
        assert!(client.written.is_empty(), "a refused name was sent");
        return;
    }
    r.expect("accepted");
    let mut reader = Peer::new(&client.written, 0);
    let hello = common::poll_to_end(preamble::read_hello(&mut reader, NEVER), 16);
    assert_eq!(hello, Ok(Hello { version: VERSION, codec: codec.id(), service: name.to_string() }));
}

/// `answer` with the bytes as message, read by `client`.
fn answer_round_trip(bytes: &[u8], control: u8, codec: Codec) {
    let refusal = match control >> 6 {
        0 => None,
        1 => Some(Refusal::NoSuchService),
        2 => Some(Refusal::Version),
        _ => Some([Refusal::Codec, Refusal::Malformed, Refusal::TooManyConnections][bytes.len() % 3]),
    };
    let msg = String::from_utf8_lossy(bytes);
    let mut server = Peer::new(&[], 0);
    common::poll_to_end(preamble::answer(&mut server, refusal, &msg), 4).expect("in memory");
    assert!(server.written.len() <= 4 + 255, "answer of {} bytes", server.written.len());
    let mut client = Peer::new(&server.written, control);
    let polls = client.max_polls();
    let got = common::poll_to_end(preamble::client(&mut client, "x", codec, NEVER), polls);
    assert_eq!(client.pos, server.written.len());
    match (refusal, got) {
        (None, Ok(())) => {}
        (Some(r), Err(e)) => {
            assert_eq!(Some(e.kind()), status_kind(r as u8), "{r:?}: {e}");
            if msg.len() <= 255 {
                assert!(e.to_string().contains(&*msg), "{r:?}: {e} lacks {msg:?}");
            }
        }
        (want, got) => panic!("sent {want:?}, client got {got:?}"),
    }
}

thread_local! {
    /// `tokio::time::timeout` needs a runtime with a clock to register with; nothing here is
    /// ever run by it (the futures are polled by hand).
    static RUNTIME: tokio::runtime::Runtime =
        tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, bytes)) = data.split_first() else { return };
    let codec = if control & 0x20 != 0 { Codec::Postcard } else { Codec::Bincode };
    RUNTIME.with(|rt| {
        let _guard = rt.enter();
        server_side(bytes, control);
        client_side(bytes, control, codec);
        name_round_trip(bytes, codec);
        answer_round_trip(bytes, control, codec);
    });
});
