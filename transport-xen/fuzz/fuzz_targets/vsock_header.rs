//! Fuzz target: the virtual-socket packet header decoder on arbitrary bytes.
//!
//! Invariants: decoding never panics; a header that decodes re-encodes to exactly the input's
//! first 24 bytes (one encoding per header); a decoded RW length is within 1..=MAX_PAYLOAD and
//! every other op carries no payload.
#![no_main]

use dombus_transport_xen::vsock::packet::{HEADER_LEN, Header, MAX_PAYLOAD, Op};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = Header::decode(data) {
        assert_eq!(&h.encode()[..], &data[..HEADER_LEN]);
        match h.op {
            Op::Rw => assert!((1..=MAX_PAYLOAD).contains(&h.len)),
            _ => assert_eq!(h.len, 0),
        }
    }
});
