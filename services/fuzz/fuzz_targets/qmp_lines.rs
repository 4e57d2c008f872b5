//! Fuzz target: a hostile qemu's QMP bytes, through the line splitter and the message
//! classifier of `services/src/device_model/qmp/wire.rs` (included by path).
//!
//! Input: one control byte, then qemu's bytes. Control bits 0..=5: the bytes arrive in chunks of
//! that many (0: all at once); bits 6..=7: the line bound is 64 bytes, 256 bytes, 4 KiB or
//! `MAX_LINE`.
//!
//! * **Splitter**: the lines it gives are exactly the bytes between newlines, whatever the
//!   chunks, as long as every line (the unfinished last one included) fits the bound; it refuses
//!   the stream exactly when one does not, and its unfinished line never exceeds the bound.
//! * **Classifier**: every line (and the first as a greeting) reads as a message or a
//!   violation without a panic; an answer's id and result are what an independent reading of
//!   the JSON says; text taken from qemu is tamed (bounded, no control characters).
#![no_main]

#[path = "../../src/device_model/qmp/wire.rs"]
#[allow(dead_code)]
mod wire;

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use wire::{LineSplitter, MAX_LINE, MAX_TEXT, Message, QmpEvent, Violation};

fuzz_target!(|input: &[u8]| {
    let Some((&control, bytes)) = input.split_first() else { return };
    let chunk = usize::from(control & 0x3f);
    let max = [64, 256, 4096, MAX_LINE][usize::from(control >> 6)];

    let mut splitter = LineSplitter::new(max);
    let mut lines = Vec::new();
    let mut refused = false;
    let pieces: Vec<&[u8]> = if chunk == 0 { vec![bytes] } else { bytes.chunks(chunk).collect() };
    for piece in pieces {
        match splitter.push(piece, &mut lines) {
            Ok(()) => assert!(splitter.pending() <= max),
            Err(e) => {
                assert_eq!(e, Violation::LineTooLong);
                refused = true;
                break;
            }
        }
    }
    let mut expected: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let tail = expected.pop().unwrap_or_default();
    let too_long = expected.iter().any(|l| l.len() > max) || tail.len() > max;
    assert_eq!(refused, too_long, "refused {refused}, a line over {max}: {too_long}");
    if !refused {
        assert_eq!(lines, expected);
        assert_eq!(splitter.pending(), tail.len());
    }

    if let Some(first) = lines.first() {
        if let Ok(v) = wire::parse_greeting(first) {
            assert!(v.package.chars().count() <= MAX_TEXT + 1);
            let _ = v.to_string();
        }
    }
    for line in &lines {
        let independent = serde_json::from_slice::<Value>(line).ok();
        match wire::classify(line) {
            Ok(Message::Answer { id, result }) => {
                let object = independent.expect("an answer is JSON");
                assert_eq!(object.get("id").and_then(Value::as_u64), Some(id));
                match result {
                    Ok(value) => assert_eq!(object.get("return"), Some(&value)),
                    Err(f) => {
                        assert!(object.get("return").is_none());
                        for text in [&f.class, &f.desc] {
                            assert!(text.chars().count() <= MAX_TEXT + 1);
                            assert!(!text.chars().any(char::is_control));
                        }
                    }
                }
            }
            Ok(Message::Event(event)) => {
                let object = independent.expect("an event is JSON");
                assert!(object.get("event").and_then(Value::as_str).is_some());
                if let QmpEvent::Other { name, .. } = &event {
                    assert!(!name.chars().any(char::is_control));
                }
                let _ = event.name();
                let _ = event.micros();
            }
            Err(Violation::NotJson(_)) => assert!(independent.is_none()),
            Err(_) => assert!(independent.is_some()),
        }
    }
});
