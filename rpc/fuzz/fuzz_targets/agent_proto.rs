//! Fuzz target: the pure parsers of the domain agent's local protocol (`dombus_agent::proto`),
//! on bytes from a hostile peer (a local process for requests, an agent for the rest).
//!
//! Input: a selector byte, then the bytes. The selector (modulo 5) picks what the bytes are:
//!
//! 0. **A request**: the first 20 bytes as its fixed part (`Request::name_len`), then the name
//!    (`Request::decode` with the `name_len` bytes that follow, and with all that follow).
//!    Decoding succeeds exactly when an independent reading accepts: magic `DBA1`, op 1..=3,
//!    reserved bytes 0, `name_len` ≤ 64 and equal to the name's length, the name UTF-8 without
//!    `/`. A request re-encodes to its bytes, except that a request by name is written with CID
//!    0 (the CID field is ignored with a name): requests are canonical exactly when a named one
//!    carries CID 0.
//! 1. **A reply**: the first 16 bytes as its fixed part (`Reply::body_len`), then the body
//!    (`Reply::decode` with the announced length, and with all that follow). `body_len` is the
//!    announced length and at most 64 KiB; decoding succeeds exactly when the reserved bytes are 0
//!    and the body has that length; replies are canonical (a decoded reply re-encodes to its
//!    bytes). `into_result` gives `Ok` for status 0, for `DENIED` (11) the connection manager's
//!    refusal with the decision the body's first 8 bytes give (`InvalidData` if it is shorter),
//!    and otherwise the error of `kind_of(status)` with the body as `printable` text.
//! 2. **Frames**: `parse_frame` applied over the bytes, frame after frame, until it needs more
//!    (`None`) or fails. Each result equals an independent reading (data: `len` 1..=64 KiB and
//!    that many bytes; end: `0`, a kind 0..=4, a reason length ≤ 1 KiB and the reason; a length
//!    or kind outside those is an error as soon as its bytes are in, however few follow); the
//!    length consumed never exceeds the bytes given; every proper prefix of a whole frame gives
//!    `None` (what the client's de-framer relies on). Data frames are canonical; end frames are
//!    canonical exactly when the reason is UTF-8 without control characters (the parser
//!    replaces those, see `printable`).
//! 3. **An accepted record**: the first 16 bytes (`Accepted::decode`). Succeeds exactly when the
//!    kind is 1, the reserved bytes 0 and the peer domain fits a `u16`; canonical.
//! 4. **A status**: a `u32` (the reply's domain), then the body (`AgentStatus::decode`).
//!    Succeeds exactly when the domain fits a `u16` and the body is the two lists and the `u32`
//!    with nothing after. Canonical while each list has at most `MAX_STATUS_ITEMS` entries;
//!    longer lists (which a body of 64 KiB can hold) decode but re-encode cut to that many.
//!
//! For every input: nothing panics; text from the peer (`printable`) has no control characters
//! and at most `MAX_TEXT` characters; no single allocation exceeds 32 KiB plus four times the
//! input, whatever counts and lengths the bytes claim.
#![no_main]

mod common;

use dombus_agent::proto::{
    ACCEPTED_LEN, DENIED, Accepted, AgentStatus, End, Frame, MAGIC, MAX_BODY, MAX_FRAME, MAX_NAME, MAX_STATUS_ITEMS,
    MAX_TEXT, Op, ProtoError, REPLY_LEN, REQUEST_LEN, Reply, Request, Target, data_header, end_frame,
    kind_of, parse_frame, printable, status_of,
};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: common::Probe = common::Probe;

/// Largest single allocation allowed beyond four bytes per input byte: the status decoder's
/// preallocation of at most `MAX_STATUS_ITEMS` links of 8 bytes.
const ALLOC_BASE: usize = 8 * MAX_STATUS_ITEMS;

fuzz_target!(|data: &[u8]| {
    let [selector, input @ ..] = data else { return };
    let ((), largest) = common::largest_allocation(|| match selector % 5 {
        0 => request(input),
        1 => reply(input),
        2 => frames(input),
        3 => accepted(input),
        _ => status(input),
    });
    assert!(
        largest <= ALLOC_BASE + 4 * input.len(),
        "{largest} bytes allocated at once for {} input bytes (selector {selector})",
        input.len()
    );
});

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Checks what `printable` promises for text that came from a peer.
fn check_printable(raw: &[u8], text: &str) {
    assert!(!text.chars().any(char::is_control), "control characters in {text:?}");
    // `printable` reads at most MAX_TEXT of the peer's bytes and gives at most MAX_TEXT bytes of
    // text (each invalid byte becomes U+FFFD, 3 bytes, so the text may stop early).
    let chars = text.chars().count();
    assert!(chars <= MAX_TEXT.min(raw.len()), "{chars} characters from {} bytes", raw.len());
    assert!(text.len() <= MAX_TEXT, "{} bytes of text", text.len());
}

fn request(input: &[u8]) {
    let Some((head, rest)) = input.split_first_chunk::<REQUEST_LEN>() else { return };
    let n = usize::from(head[6]);
    match Request::name_len(head) {
        Ok(len) => {
            assert_eq!(head[..4], MAGIC);
            assert_eq!(len, n);
            assert!(len <= MAX_NAME);
        }
        Err(ProtoError::Magic) => assert_ne!(head[..4], MAGIC),
        Err(ProtoError::Name) => assert!(head[..4] == MAGIC && n > MAX_NAME),
        Err(e) => panic!("name_len: unexpected {e:?}"),
    }
    // With the announced name (or what there is of it), then with everything after the head.
    let announced = &rest[..n.min(rest.len())];
    for name in [announced, rest] {
        let want = head[..4] == MAGIC
            && n <= MAX_NAME
            && name.len() == n
            && (1..=3).contains(&head[4])
            // The receive buffer: any size for a CONNECT or LISTEN, none for a STATUS.
            && (head[5] == 0 || head[4] != 3)
            && head[7] == 0
            && std::str::from_utf8(name).is_ok_and(|s| !s.contains(|c: char| c == '/' || c.is_control()));
        let got = Request::decode(head, name);
        assert_eq!(got.is_ok(), want, "{got:?} for head {head:02x?}, name {name:02x?}");
        let Ok(r) = got else { continue };
        assert_eq!(r.op as u8, head[4]);
        assert_eq!((r.port, r.wait_ms, r.recv_buffer), (u32_at(head, 12), u32_at(head, 16), head[5]));
        let mut canonical = head.to_vec();
        canonical.extend_from_slice(name);
        match &r.target {
            Target::Cid(c) => {
                assert!(name.is_empty());
                assert_eq!(*c, u32_at(head, 8));
            }
            Target::Name(s) => {
                assert_eq!(s.as_bytes(), name);
                canonical[8..12].fill(0);
            }
        }
        assert_eq!(r.encode(), canonical, "{r:?} re-encoded");
        assert!(matches!(r.op, Op::Connect | Op::Listen | Op::Status));
    }
}

fn reply(input: &[u8]) {
    let Some((head, rest)) = input.split_first_chunk::<REPLY_LEN>() else { return };
    let announced = u32_at(head, 12) as usize;
    match Reply::body_len(head) {
        Ok(len) => assert!(len == announced && len <= MAX_BODY),
        Err(e) => assert!(announced > MAX_BODY, "{e:?} for {announced} bytes"),
    }
    let body = &rest[..announced.min(rest.len())];
    for body in [body, rest] {
        let want = announced <= MAX_BODY && body.len() == announced && head[1..4] == [0, 0, 0];
        let got = Reply::decode(head, body.to_vec());
        assert_eq!(got.is_ok(), want, "{got:?} for head {head:02x?}, {} body bytes", body.len());
        let Ok(r) = got else { continue };
        assert_eq!((r.status, r.domain, r.local_port), (head[0], u32_at(head, 4), u32_at(head, 8)));
        let mut canonical = head.to_vec();
        canonical.extend_from_slice(body);
        assert_eq!(r.encode(), canonical, "reply re-encoded");
        match r.into_result() {
            Ok(r) => assert_eq!(r.status, 0),
            Err(e) if head[0] == DENIED => {
                // The connection manager's refusal: its decision's id, then the text.
                match body.first_chunk::<8>() {
                    Some(id) => {
                        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
                        assert_eq!(dombus_agent::denied(&e), Some(u64::from_le_bytes(*id)));
                    }
                    None => assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}"),
                }
            }
            Err(e) => {
                assert_ne!(head[0], 0);
                assert_eq!(e.kind(), kind_of(head[0]));
                let text = e.to_string();
                assert_eq!(text, printable(body));
                check_printable(body, &text);
                // Known statuses map back to themselves, the rest to "other" (255).
                let known = (1..=10).contains(&head[0]) || head[0] == 255;
                assert_eq!(status_of(e.kind()) == head[0], known, "status {}", head[0]);
                assert_ne!(status_of(e.kind()), 0);
            }
        }
    }
}

/// What an independent reading of the first frame of `buf` gives.
#[derive(Debug, PartialEq, Eq)]
enum Want<'a> {
    /// A data frame's payload.
    Data(&'a [u8]),
    /// An end frame's kind byte and raw reason.
    End(u8, &'a [u8]),
    /// Only part of a frame.
    Partial,
    /// A data length over 64 KiB, an unknown end kind, or a reason over 1 KiB.
    Invalid,
}

fn reference(buf: &[u8]) -> Want<'_> {
    let Some((len, rest)) = buf.split_first_chunk::<4>() else { return Want::Partial };
    let len = u32::from_le_bytes(*len) as usize;
    if len > MAX_FRAME {
        return Want::Invalid;
    }
    if len > 0 {
        return rest.get(..len).map_or(Want::Partial, Want::Data);
    }
    let Some((&[kind, l0, l1], reason)) = rest.split_first_chunk::<3>() else { return Want::Partial };
    let rlen = usize::from(u16::from_le_bytes([l0, l1]));
    if kind > 4 || rlen > MAX_TEXT {
        return Want::Invalid;
    }
    reason.get(..rlen).map_or(Want::Partial, |r| Want::End(kind, r))
}

fn frames(input: &[u8]) {
    let mut rest = input;
    loop {
        let want = reference(rest);
        let got = parse_frame(rest);
        let n = match (got, want) {
            (Ok(None), Want::Partial) => return,
            (Err(ProtoError::TooLong { len, max, .. }), Want::Invalid) => {
                assert!(len > max, "TooLong: {len} ≤ {max}");
                return;
            }
            (Err(ProtoError::EndKind(k)), Want::Invalid) => {
                assert!(k > 4 && rest.get(4) == Some(&k));
                return;
            }
            (Ok(Some((Frame::Data(d), n))), Want::Data(w)) => {
                assert_eq!(d, w);
                assert!((1..=MAX_FRAME).contains(&d.len()));
                assert_eq!(n, 4 + d.len());
                let mut again = data_header(d.len()).to_vec();
                again.extend_from_slice(d);
                assert_eq!(again, rest[..n], "data frame re-encoded");
                n
            }
            (Ok(Some((Frame::End(kind, reason), n))), Want::End(k, raw)) => {
                assert_eq!(kind as u8, k);
                assert_eq!(n, 7 + raw.len());
                assert_eq!(reason, printable(raw));
                check_printable(raw, &reason);
                let clean = std::str::from_utf8(raw).is_ok_and(|s| !s.chars().any(char::is_control));
                assert_eq!(end_frame(kind, &reason) == rest[..n], clean, "end frame {kind:?} {raw:02x?}");
                if kind == End::Eof {
                    assert_eq!(k, 0);
                }
                n
            }
            (got, want) => panic!("parse_frame gave {got:?} where {want:?} was expected, at {rest:02x?}"),
        };
        assert!(n <= rest.len(), "{n} bytes consumed of {}", rest.len());
        // A whole frame cut anywhere is only part of one.
        for cut in [0, 3, 4, 5, 6, n / 2, n - 1] {
            if cut < n {
                assert_eq!(parse_frame(&rest[..cut]), Ok(None), "{cut} bytes of a {n}-byte frame");
            }
        }
        rest = &rest[n..];
    }
}

fn accepted(input: &[u8]) {
    let Some(b) = input.first_chunk::<ACCEPTED_LEN>() else { return };
    let want = b[0] == 1 && b[1..4] == [0, 0, 0] && u32_at(b, 4) <= 0xffff;
    let got = Accepted::decode(b);
    assert_eq!(got.is_ok(), want, "{got:?} for {b:02x?}");
    if let Ok(a) = got {
        assert_eq!(
            (u32::from(a.peer_domain.0), a.local_port, a.peer_port),
            (u32_at(b, 4), u32_at(b, 8), u32_at(b, 12))
        );
        assert_eq!(a.encode(), *b, "accepted record re-encoded");
    }
}

/// An independent reading of a status body: the two lists and `local`, or `None`.
#[allow(clippy::type_complexity)]
fn status_reference(b: &[u8]) -> Option<(Vec<(u16, u32)>, Vec<u32>, u32)> {
    let u16_at = |at: usize| b.get(at..at + 2).map(|w| u16::from_le_bytes([w[0], w[1]]));
    let u32_get = |at: usize| b.get(at..at + 4).map(|_| u32_at(b, at));
    let mut at = 0;
    // Lists longer than the encoder ever writes are refused.
    if usize::from(u16_at(at)?) > MAX_STATUS_ITEMS {
        return None;
    }
    let links = (0..u16_at(at)?)
        .map(|i| {
            let o = 2 + 6 * usize::from(i);
            Some((u16_at(o)?, u32_get(o + 2)?))
        })
        .collect::<Option<Vec<_>>>()?;
    at += 2 + 6 * links.len();
    if usize::from(u16_at(at)?) > MAX_STATUS_ITEMS {
        return None;
    }
    let ports = (0..u16_at(at)?).map(|i| u32_get(at + 2 + 4 * usize::from(i))).collect::<Option<Vec<_>>>()?;
    at += 2 + 4 * ports.len();
    let local = u32_get(at)?;
    (at + 4 == b.len()).then_some((links, ports, local))
}

fn status(input: &[u8]) {
    let Some((domain, body)) = input.split_first_chunk::<4>() else { return };
    let domain = u32::from_le_bytes(*domain);
    let want = if domain <= 0xffff { status_reference(body) } else { None };
    let got = AgentStatus::decode(domain, body);
    let (s, (links, ports, local)) = match (got, want) {
        (Err(_), None) => return,
        (Ok(s), Some(w)) => (s, w),
        (got, want) => panic!("status: {got:?} where {want:?} was expected, for {body:02x?}"),
    };
    assert_eq!(u32::from(s.domain.0), domain);
    assert_eq!(s.links.iter().map(|(d, n)| (d.0, *n)).collect::<Vec<_>>(), links);
    assert_eq!((&s.listening, s.local), (&ports, local));
    assert_eq!(s.encode(), body, "status re-encoded");
}
