//! Fuzz target: the xenstore wire decoders (the real xenstore client's reader) on arbitrary bytes.
//!
//! The first byte picks a chunk size; the rest is fed to a `FrameReader` in chunks of that size,
//! as the client's reader thread would receive it from xenstored.
//!
//! Invariants: nothing panics; every message yielded has a payload of at most PAYLOAD_MAX bytes
//! and re-encodes to exactly the input bytes it was decoded from; every payload parser either
//! rejects a payload or returns values whose encoding parses back to the same values.
#![no_main]

use dombus_transport_xen::xen::store::wire::{
    FrameReader, PAYLOAD_MAX, encode_message, encode_perms, parse_directory, parse_domid, parse_error,
    parse_perms, parse_tx_id, parse_watch_event, strings,
};
use libfuzzer_sys::fuzz_target;

fn check_payload(p: &[u8]) {
    if let Ok(name) = parse_error(p) {
        assert!(!name.is_empty() && name.len() <= 32);
    }
    if let Ok(names) = parse_directory(p) {
        assert_eq!(parse_directory(&strings(&names).unwrap()).unwrap(), names);
    }
    if let Ok(perms) = parse_perms(p) {
        assert_eq!(parse_perms(&encode_perms(&perms)).unwrap(), perms);
    }
    if let Ok((path, token)) = parse_watch_event(p) {
        assert_eq!(parse_watch_event(&strings(&[&path, &token]).unwrap()).unwrap(), (path, token));
    }
    if let Ok(id) = parse_tx_id(p) {
        assert_ne!(id, 0);
    }
    if let Ok(domid) = parse_domid(p) {
        assert!(domid.is_guest_id());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else { return };
    let mut frames = FrameReader::default();
    let mut consumed = 0;
    for piece in stream.chunks(usize::from(chunk).max(1)) {
        frames.push(piece);
        loop {
            match frames.next_message() {
                Ok(Some(m)) => {
                    assert!(m.payload.len() <= PAYLOAD_MAX);
                    let bytes = encode_message(m.ty, m.req_id, m.tx_id, &m.payload).unwrap();
                    assert_eq!(&stream[consumed..consumed + bytes.len()], &bytes[..]);
                    consumed += bytes.len();
                    check_payload(&m.payload);
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    check_payload(stream);
});
