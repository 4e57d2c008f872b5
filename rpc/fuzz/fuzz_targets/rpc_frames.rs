//! Fuzz target: the frame decoder ([`dombus_rpc::codec::Frames`]) reading a hostile peer's
//! byte stream, as a connection reads it (`tokio_util`'s `FramedRead`, the read side of the
//! `Framed` every dombus transport uses).
//!
//! Input: two control bytes, then the peer's bytes. Control byte 0 picks the largest frame
//! allowed (0, 1, 16, 255, 4 KiB, 64 KiB, 1 MiB or 16 MiB); byte 1 seeds the sizes of the
//! chunks the peer's bytes arrive in (1 byte to 64 KiB each, and the peer answers `Pending`
//! before some of them). After its bytes the peer has closed its side: reads give EOF.
//!
//! * **Frames**: the messages read are exactly those of an independent reading of the format
//!   (4-byte big-endian length, then that many bytes), in order; then the stream ends with a
//!   `FrameTooLong` error if a length over the limit came (refused on its 4 bytes, not after
//!   waiting for the frame), with another error if the peer stopped inside a frame or its
//!   header, and cleanly otherwise.
//! * **Memory**: no allocation while reading is larger than twice the bytes the peer has sent
//!   so far plus 16 KiB (the read buffer starts at 8 KiB and doubles as bytes fill it), whatever
//!   length a header announces: a header announcing 16 MiB must not reserve 16 MiB.
//! * **Encoding**: the frames read, written back with the same limit (out), give the peer's
//!   bytes up to the end of the last whole frame; a message over the limit is refused with
//!   `FrameTooLong` and writes nothing.
#![no_main]

mod common;

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::BytesMut;
use dombus_rpc::codec::{FrameTooLong, Frames};
use futures::Stream;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::codec::{Encoder, FramedRead};

#[global_allocator]
static ALLOC: common::Probe = common::Probe;

const LIMITS: [usize; 8] = [0, 1, 16, 255, 4 << 10, 64 << 10, 1 << 20, 16 << 20];

/// A peer that sends `input` in chunks (sizes from a seed), sometimes pausing, then closes.
struct Peer<'a> {
    input: &'a [u8],
    pos: usize,
    seed: u32,
    paused: bool,
}

impl Peer<'_> {
    fn next_random(&mut self) -> u32 {
        // A small LCG: deterministic per input, different per seed.
        self.seed = self.seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        self.seed >> 8
    }
}

impl AsyncRead for Peer<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let r = self.next_random();
        if !self.paused && r % 4 == 0 {
            self.paused = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.paused = false;
        let chunk = match r % 3 {
            0 => 1 + (r as usize >> 4) % 16,
            1 => 1 + (r as usize >> 4) % 4096,
            _ => 1 + (r as usize >> 4) % (64 << 10),
        };
        let n = chunk.min(buf.remaining()).min(self.input.len() - self.pos);
        buf.put_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// How a peer's stream ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// After a whole frame (or no bytes at all).
    Clean,
    /// At a length over the limit, as soon as its 4 bytes are in.
    TooLong,
    /// Inside a frame or its header.
    Truncated,
}

/// What an independent reading of `data` gives: the frames, and how the stream ends.
fn reference(data: &[u8], max: usize) -> (Vec<&[u8]>, End) {
    let mut frames = Vec::new();
    let mut rest = data;
    loop {
        if rest.is_empty() {
            return (frames, End::Clean);
        }
        let Some((head, body)) = rest.split_first_chunk::<4>() else { return (frames, End::Truncated) };
        let len = u32::from_be_bytes(*head) as usize;
        if len > max {
            return (frames, End::TooLong);
        }
        if body.len() < len {
            return (frames, End::Truncated);
        }
        frames.push(&body[..len]);
        rest = &body[len..];
    }
}

fuzz_target!(|data: &[u8]| {
    let [limit, seed, input @ ..] = data else { return };
    let max = LIMITS[usize::from(*limit) % LIMITS.len()];
    let (want, want_end) = reference(input, max);

    let peer = Peer { input, pos: 0, seed: u32::from(*seed), paused: false };
    let mut reader = FramedRead::new(peer, Frames::new(max, max));
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let mut got: Vec<BytesMut> = Vec::new();
    let mut end = None;
    // Every poll yields a frame, pauses (at most once per chunk) or ends.
    for _ in 0..3 * input.len() + 16 {
        let (r, largest) = common::largest_allocation(|| Pin::new(&mut reader).poll_next(&mut cx));
        let sent = reader.get_ref().pos;
        assert!(
            largest <= 2 * sent + (16 << 10),
            "{largest} bytes allocated at once with {sent} sent (limit {max})"
        );
        match r {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) => got.push(frame),
            Poll::Ready(Some(Err(e))) => {
                end = Some(if Frames::is_too_long(&e) { End::TooLong } else { End::Truncated });
                break;
            }
            Poll::Ready(None) => {
                end = Some(End::Clean);
                break;
            }
        }
    }
    let got_slices: Vec<&[u8]> = got.iter().map(|f| &f[..]).collect();
    assert_eq!(got_slices, want, "frames (limit {max})");
    assert_eq!(end, Some(want_end), "the stream's end (limit {max})");

    // Written back: the same bytes, up to the end of the last whole frame.
    let mut out = BytesMut::new();
    let mut frames = Frames::new(max, max);
    for f in &want {
        frames.encode(f.to_vec(), &mut out).expect("a frame read within the limit is written");
    }
    let whole: usize = want.iter().map(|f| 4 + f.len()).sum();
    assert_eq!(&out[..], &input[..whole]);
    if max <= 64 << 10 {
        let before = out.len();
        let e = frames.encode(vec![0u8; max + 1], &mut out).expect_err("a message over the limit is refused");
        assert!(Frames::is_too_long(&e), "{e}");
        assert!(e.get_ref().is_some_and(|i| i.is::<FrameTooLong>()), "{e}");
        assert_eq!(out.len(), before, "a refused message wrote something");
    }
});
