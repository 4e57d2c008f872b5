//! Fuzz target: the protocol between a domain's agent and the connection manager
//! (`dombus_agent::manager`), on bytes from a hostile peer (an agent for the manager, the manager
//! for an agent).
//!
//! Input: a selector byte, then the bytes. Every input is read three ways:
//!
//! 1. **As a message body**, with `decode::<ToManager>` and `decode::<FromManager>`. Whatever
//!    decodes re-encodes (`encode`) to bytes that decode to the same value, and re-encoding those
//!    gives them again. Postcard's encoding is *not* canonical: its decoder accepts over-long
//!    varints (`80 00` for 0, in integers, lengths and variant indices), which `encode` writes in
//!    their shortest form; everything else (bools, options, variant indices in range, UTF-8) is
//!    checked. So a decoded body re-encodes to exactly its bytes, or to fewer bytes, and then the
//!    body holds an over-long varint (a byte with the continuation bit followed by `00`). Every
//!    name a decoded message carries (`Peer::Name`, `Call::Service`, `FromManager::Welcome`), and the bytes themselves if
//!    UTF-8, are checked against an independent reading of `valid_name`.
//! 2. **As a stream**, with `read_message` (a `ToManager` stream for an even selector, a
//!    `FromManager` one for an odd), polled with a no-op waker, message after message. Each read
//!    gives what an independent reading of the framing gives: `Ok(None)` once nothing is left,
//!    `UnexpectedEof` for a stream that stops inside a length or a body, an
//!    `InvalidData` error for a length over `MAX_MESSAGE`, and
//!    otherwise exactly `decode` of the body's bytes; reading stops at the first end or error. A
//!    read never waits (the bytes are all there, then EOF).
//! 3. **Bounds**: no panic anywhere; no single allocation exceeds the bound, whatever lengths and
//!    counts the bytes claim. A read allocates the body it was promised (at most `MAX_MESSAGE`
//!    bytes) before reading it; decoding a body of n bytes allocates at most `LINK_SIZE` × n: a
//!    sequence's announced count is believed up to the bytes left (postcard's slice reader), and a
//!    `ToManager::Links` entry takes 8 bytes in memory and as little as 2 on the wire. The bound
//!    is the larger of the two plus `SLACK` (error messages).
#![no_main]

mod common;

use std::io;

use dombus_agent::manager::{
    Call, FromManager, MAX_MESSAGE, Peer, ToManager, decode, encode, read_message, valid_name,
};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: common::Probe = common::Probe;

/// Bytes one `ToManager::Links` entry takes in memory: the most any byte on the wire can make
/// postcard preallocate.
const LINK_SIZE: usize = size_of::<(u16, u32)>();
/// Allocations besides the body and the decoded values (error messages).
const SLACK: usize = 4 << 10;

fuzz_target!(|data: &[u8]| {
    let [selector, input @ ..] = data else { return };
    body::<ToManager>(input, |m, names| to_manager_names(m, names));
    body::<FromManager>(input, |m, names| from_manager_names(m, names));
    if let Ok(s) = std::str::from_utf8(input) {
        assert_eq!(valid_name(s), name_reference(s), "valid_name({s:?})");
    }
    if selector % 2 == 0 {
        stream::<ToManager>(input);
    } else {
        stream::<FromManager>(input);
    }
});

/// Decodes `input` as one `M`, checks the re-encoding and the names in it.
fn body<M>(input: &[u8], names: impl Fn(&M, &mut Vec<String>))
where
    M: serde::Serialize + for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let (got, largest) = common::largest_allocation(|| decode::<M>(input));
    assert!(
        largest <= LINK_SIZE * input.len() + SLACK,
        "{largest} bytes allocated at once decoding {} bytes",
        input.len()
    );
    let m = match got {
        Ok(m) => m,
        Err(e) => {
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
            return;
        }
    };
    // A value decoded from at most MAX_MESSAGE bytes encodes to at most as many.
    let again = match encode(&m) {
        Ok(b) => b,
        Err(e) => {
            assert!(input.len() > MAX_MESSAGE, "{m:?} from {} bytes does not encode: {e}", input.len());
            return;
        }
    };
    assert_eq!(decode::<M>(&again).ok().as_ref(), Some(&m), "{m:?} re-encoded as {again:02x?}");
    assert_eq!(encode(&decode::<M>(&again).unwrap()).unwrap(), again, "{m:?}: a second re-encoding differs");
    if again != input {
        assert!(again.len() < input.len(), "{m:?}: {input:02x?} re-encoded longer, as {again:02x?}");
        assert!(
            input.windows(2).any(|w| w[0] & 0x80 != 0 && w[1] == 0),
            "{m:?}: {input:02x?} re-encoded as {again:02x?} without an over-long varint"
        );
    }
    let mut found = Vec::new();
    names(&m, &mut found);
    for n in found {
        assert_eq!(valid_name(&n), name_reference(&n), "valid_name({n:?})");
    }
}

fn to_manager_names(m: &ToManager, out: &mut Vec<String>) {
    match m {
        ToManager::Call { call: Call::Introduce { target: Peer::Name(n), .. }, .. } => out.push(n.clone()),
        ToManager::Call { call: Call::Service { name: Some(n), .. }, .. } => out.push(n.clone()),
        _ => {}
    }
}

fn from_manager_names(m: &FromManager, out: &mut Vec<String>) {
    match m {
        FromManager::Welcome { name: Some(n), .. } => out.push(n.clone()),
        _ => {}
    }
}

/// An independent reading of the protocol's rule for names.
fn name_reference(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0] != b'-'
        && b[0] != b'.'
        && b.iter().all(|&c| {
            c.is_ascii_digit() || c.is_ascii_lowercase() || c.is_ascii_uppercase() || b"_.-".contains(&c)
        })
}

/// What an independent reading of the framing gives for the next message of `rest`.
#[derive(Debug)]
enum Want<'a> {
    /// Nothing left: a clean end.
    End,
    /// 1 to 3 bytes left: a stream cut inside a length.
    CutLength,
    /// A length over the bound.
    TooLong,
    /// A body cut short.
    Cut,
    /// A whole body, and what follows it.
    Body(&'a [u8], &'a [u8]),
}

fn framing(rest: &[u8]) -> Want<'_> {
    if rest.is_empty() {
        return Want::End;
    }
    let Some((len, after)) = rest.split_first_chunk::<4>() else { return Want::CutLength };
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_MESSAGE {
        return Want::TooLong;
    }
    match after.split_at_checked(len) {
        Some((body, next)) => Want::Body(body, next),
        None => Want::Cut,
    }
}

/// Reads `input` as a stream of `M`, message after message.
fn stream<M>(input: &[u8])
where
    M: for<'de> serde::Deserialize<'de> + PartialEq + std::fmt::Debug,
{
    let mut reader = input;
    let mut rest = input;
    loop {
        let want = framing(rest);
        let (got, largest) =
            common::largest_allocation(|| common::poll_to_end(read_message::<_, M>(&mut reader), 1));
        let (claimed, body_len) = match want {
            Want::Body(body, _) => (body.len(), body.len()),
            _ => (rest.get(..4).map_or(0, |l| u32::from_le_bytes(l.try_into().unwrap()) as usize), 0),
        };
        let bound = claimed.min(MAX_MESSAGE).max(LINK_SIZE * body_len) + SLACK;
        assert!(largest <= bound, "{largest} bytes allocated at once reading {want:?} (bound {bound})");
        match (got, want) {
            (Ok(None), Want::End) => return,
            (Err(e), Want::TooLong) => {
                assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                assert!(e.to_string().contains("exceeds"), "{e}");
                return;
            }
            (Err(e), Want::Cut | Want::CutLength) => {
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{e}");
                return;
            }
            (got, Want::Body(body, next)) => {
                let alone = decode::<M>(body);
                match (got, alone) {
                    (Ok(Some(m)), Ok(w)) => assert_eq!(m, w),
                    (Err(e), Err(w)) => {
                        assert_eq!((e.kind(), e.to_string()), (w.kind(), w.to_string()));
                        return;
                    }
                    (got, alone) => panic!("read_message gave {got:?} where decode gave {alone:?}"),
                }
                assert_eq!(reader, next, "read_message consumed other than one message");
                rest = next;
            }
            (got, want) => panic!("read_message gave {got:?} where {want:?} was expected, at {rest:02x?}"),
        }
    }
}
