//! QMP's wire format without IO: bytes from qemu cut into bounded lines, and each line read once
//! into what it is (the greeting, an answer to one of our commands, an event) or a protocol
//! violation.
//!
//! Everything here is a pure function of its input, so that property tests and the `qmp_lines`
//! fuzz target (services/fuzz, which includes this file by path to stay free of the service
//! crate's dependencies) drive it directly. It depends only on `serde_json` and `qapi`'s types.
//!
//! A qemu serving a guest may be compromised: every byte it sends is hostile input. Lines are
//! bounded ([`MAX_LINE`]), text that reaches our errors and logs is shortened and stripped of
//! control characters ([`tame`]), and nothing here panics on any input.

use std::fmt;

use serde_json::{Map, Value};

/// The longest line qemu may send, newline excluded (1 MiB). qemu's largest answers
/// (`query-qmp-schema`, about 200 KiB on 7.2) fit; a longer line ends the connection.
pub const MAX_LINE: usize = 1 << 20;

/// The longest text taken from qemu into an error or notice (class, description, event name,
/// version package), in characters.
pub const MAX_TEXT: usize = 512;

/// A qemu's version, from its QMP greeting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVersion {
    /// The major version (7 for 7.2.22).
    pub major: u32,
    /// The minor version (2 for 7.2.22).
    pub minor: u32,
    /// The micro version (22 for 7.2.22).
    pub micro: u32,
    /// The distribution's package string (`Debian 1:7.2+dfsg-7+deb12u12`), possibly empty;
    /// shortened to [`MAX_TEXT`] characters without control characters.
    pub package: String,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)?;
        let package = self.package.trim();
        if !package.is_empty() {
            write!(f, " ({package})")?;
        }
        Ok(())
    }
}

/// An event qemu sent.
#[derive(Debug, Clone)]
pub enum QmpEvent {
    /// An event of the schema `qapi-qmp` was generated from, with its data typed.
    Typed {
        /// The event and its data.
        event: qapi::qmp::Event,
        /// Its timestamp, in microseconds since the Unix epoch (qemu's host clock).
        micros: u64,
    },
    /// An event the schema does not know (a newer qemu's) or whose data does not match it.
    Other {
        /// Its name (shortened to [`MAX_TEXT`] characters, without control characters).
        name: String,
        /// Its data (`{}` when it had none).
        data: Value,
        /// Its timestamp, in microseconds since the Unix epoch (qemu's host clock).
        micros: u64,
    },
}

impl QmpEvent {
    /// The event's name (`STOP`, `RESUME`, …).
    pub fn name(&self) -> String {
        match self {
            // The generated enum has no name accessor: its serialization (`tag = "event"`)
            // says the name.
            QmpEvent::Typed { event, .. } => serde_json::to_value(event)
                .ok()
                .and_then(|v| v.get("event").and_then(Value::as_str).map(str::to_owned))
                .unwrap_or_default(),
            QmpEvent::Other { name, .. } => name.clone(),
        }
    }

    /// Its timestamp, in microseconds since the Unix epoch.
    pub fn micros(&self) -> u64 {
        match self {
            QmpEvent::Typed { micros, .. } | QmpEvent::Other { micros, .. } => *micros,
        }
    }
}

/// An error answer's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Its class (`GenericError`, `CommandNotFound`, `DeviceNotFound`, …), tamed.
    pub class: String,
    /// Its description, tamed.
    pub desc: String,
}

/// One line from qemu, read.
#[derive(Debug, Clone)]
pub enum Message {
    /// The answer to the command with this `id`.
    Answer {
        /// The id the command carried.
        id: u64,
        /// Its `return` value, or its `error`.
        result: Result<Value, Failure>,
    },
    /// An event.
    Event(QmpEvent),
}

/// How qemu broke the protocol: the connection ends with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// A line longer than [`MAX_LINE`].
    LineTooLong,
    /// A line that is not JSON (serde's reason).
    NotJson(String),
    /// JSON that is not an object.
    NotObject,
    /// An answer whose `id` is missing or not one dombus sends (a non-negative integer).
    BadId,
    /// An answer that is neither `return` nor a well-formed `error`.
    BadAnswer,
    /// An event without a name or a well-formed timestamp.
    BadEvent,
    /// An object that is neither an answer nor an event.
    Unknown,
    /// A greeting that is not `{"QMP": {"version": {"qemu": {…}, "package": …}, …}}`.
    BadGreeting,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::LineTooLong => write!(f, "line longer than 1 MiB"),
            Violation::NotJson(e) => write!(f, "a line that is not JSON ({e})"),
            Violation::NotObject => write!(f, "a JSON line that is not an object"),
            Violation::BadId => write!(f, "an answer whose id dombus never sent"),
            Violation::BadAnswer => write!(f, "an answer with neither `return` nor a valid `error`"),
            Violation::BadEvent => write!(f, "an event without a name or a valid timestamp"),
            Violation::Unknown => write!(f, "a message that is neither an answer nor an event"),
            Violation::BadGreeting => write!(f, "a greeting that is not QMP's"),
        }
    }
}

/// Cuts a byte stream into lines of at most `max` bytes (newline excluded). A pending partial
/// line is refused as soon as it exceeds the bound, so memory stays bounded whatever the peer
/// sends; after an error the splitter is spent (the connection ends).
#[derive(Debug)]
pub struct LineSplitter {
    partial: Vec<u8>,
    max: usize,
}

impl LineSplitter {
    /// A splitter of lines up to `max` bytes.
    pub fn new(max: usize) -> Self {
        LineSplitter { partial: Vec::new(), max }
    }

    /// Takes `bytes`, appends each line it completes to `lines` (without its `\n`; a `\r`
    /// before it stays, as JSON whitespace), and keeps the rest for the next call.
    pub fn push(&mut self, mut bytes: &[u8], lines: &mut Vec<Vec<u8>>) -> Result<(), Violation> {
        while let Some(end) = bytes.iter().position(|&b| b == b'\n') {
            let (piece, rest) = bytes.split_at(end);
            if self.partial.len() + piece.len() > self.max {
                return Err(Violation::LineTooLong);
            }
            self.partial.extend_from_slice(piece);
            lines.push(std::mem::take(&mut self.partial));
            bytes = rest.get(1..).unwrap_or_default();
        }
        if self.partial.len() + bytes.len() > self.max {
            return Err(Violation::LineTooLong);
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }

    /// The bytes of the line not yet ended.
    pub fn pending(&self) -> usize {
        self.partial.len()
    }
}

/// Whether a line holds nothing but JSON whitespace (skipped, not a message).
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// Reads the greeting line: qemu's version.
pub fn parse_greeting(line: &[u8]) -> Result<QemuVersion, Violation> {
    let value = parse_object(line)?;
    let version = value.get("QMP").and_then(|q| q.get("version")).ok_or(Violation::BadGreeting)?;
    let triple = version.get("qemu").ok_or(Violation::BadGreeting)?;
    let part = |name: &str| -> Result<u32, Violation> {
        triple
            .get(name)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .ok_or(Violation::BadGreeting)
    };
    let package = match version.get("package") {
        None => String::new(),
        Some(Value::String(s)) => tame(s),
        Some(_) => return Err(Violation::BadGreeting),
    };
    Ok(QemuVersion { major: part("major")?, minor: part("minor")?, micro: part("micro")?, package })
}

/// Reads one line after the greeting: an answer, an event, or a violation.
pub fn classify(line: &[u8]) -> Result<Message, Violation> {
    let mut object = parse_object(line)?;
    if object.contains_key("event") {
        return read_event(object).map(Message::Event);
    }
    let answer = object.contains_key("return") || object.contains_key("error");
    if !answer {
        return Err(Violation::Unknown);
    }
    let id = object.get("id").and_then(Value::as_u64).ok_or(Violation::BadId)?;
    if let Some(value) = object.remove("return") {
        if object.contains_key("error") {
            return Err(Violation::BadAnswer);
        }
        return Ok(Message::Answer { id, result: Ok(value) });
    }
    let error = object.get("error").ok_or(Violation::BadAnswer)?;
    let text = |name: &str| error.get(name).and_then(Value::as_str).map(tame);
    match (text("class"), text("desc")) {
        (Some(class), Some(desc)) => Ok(Message::Answer { id, result: Err(Failure { class, desc }) }),
        _ => Err(Violation::BadAnswer),
    }
}

/// Reads an event object: typed when the schema knows it and its data fits, else `Other`.
fn read_event(object: Map<String, Value>) -> Result<QmpEvent, Violation> {
    let name = object.get("event").and_then(Value::as_str).ok_or(Violation::BadEvent)?;
    let stamp = object.get("timestamp").ok_or(Violation::BadEvent)?;
    let seconds = stamp.get("seconds").and_then(Value::as_u64).ok_or(Violation::BadEvent)?;
    let micro = stamp.get("microseconds").and_then(Value::as_u64).ok_or(Violation::BadEvent)?;
    if micro >= 1_000_000 {
        return Err(Violation::BadEvent);
    }
    let micros = seconds.saturating_mul(1_000_000).saturating_add(micro);
    let name = tame(name);
    let data = object.get("data").cloned().unwrap_or_else(|| Value::Object(Map::new()));
    match serde_json::from_value::<qapi::qmp::Event>(Value::Object(object)) {
        Ok(event) => Ok(QmpEvent::Typed { event, micros }),
        Err(_) => Ok(QmpEvent::Other { name, data, micros }),
    }
}

/// Parses a line as one JSON object (serde_json bounds nesting at 128 levels).
fn parse_object(line: &[u8]) -> Result<Map<String, Value>, Violation> {
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(object)) => Ok(object),
        Ok(_) => Err(Violation::NotObject),
        Err(e) => Err(Violation::NotJson(e.to_string())),
    }
}

/// Text from qemu made fit for an error or a log line: at most [`MAX_TEXT`] characters, control
/// characters replaced by `?`.
pub fn tame(text: &str) -> String {
    let mut out: String = text.chars().take(MAX_TEXT).map(|c| if c.is_control() { '?' } else { c }).collect();
    if text.chars().nth(MAX_TEXT).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use proptest::prelude::*;

    /// Splits `stream` fed in the chunks `cuts` says; the lines, or the error.
    fn split(stream: &[u8], cuts: &[usize], max: usize) -> Result<Vec<Vec<u8>>, Violation> {
        let mut splitter = LineSplitter::new(max);
        let mut lines = Vec::new();
        let mut at = 0;
        for &cut in cuts {
            let end = (at + cut).min(stream.len());
            splitter.push(&stream[at..end], &mut lines)?;
            assert!(splitter.pending() <= max);
            at = end;
        }
        splitter.push(&stream[at..], &mut lines)?;
        Ok(lines)
    }

    proptest! {
        /// However the bytes are cut, the lines are the stream's lines; a line over the bound
        /// is refused, and the partial line never exceeds it.
        #[test]
        fn lines_whatever_the_chunks(
            stream in proptest::collection::vec(prop_oneof![Just(b'\n'), any::<u8>(), Just(b'a')], 0..400),
            cuts in proptest::collection::vec(0usize..50, 0..20),
            max in 0usize..40,
        ) {
            let mut whole: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
            let tail = whole.pop().unwrap_or_default();
            let too_long = whole.iter().any(|l| l.len() > max) || tail.len() > max;
            match split(&stream, &cuts, max) {
                Ok(lines) => {
                    prop_assert!(!too_long);
                    prop_assert_eq!(lines, whole.iter().map(|l| l.to_vec()).collect::<Vec<_>>());
                }
                Err(e) => {
                    prop_assert!(too_long);
                    prop_assert_eq!(e, Violation::LineTooLong);
                }
            }
        }

        /// Any line classifies or is a violation, without a panic; an answer's id is ours.
        #[test]
        fn classify_never_panics(line in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = classify(&line);
            let _ = parse_greeting(&line);
        }

        /// Answers with any id and value read back as sent.
        #[test]
        fn answers_round_trip(id in any::<u64>(), n in any::<i64>(), error in any::<bool>()) {
            let line = if error {
                format!(r#"{{"error": {{"class": "GenericError", "desc": "d{n}"}}, "id": {id}}}"#)
            } else {
                format!(r#"{{"return": {{"n": {n}}}, "id": {id}}}"#)
            };
            match classify(line.as_bytes()).unwrap() {
                Message::Answer { id: got, result } => {
                    prop_assert_eq!(got, id);
                    if error {
                        prop_assert_eq!(result, Err(Failure { class: "GenericError".into(), desc: format!("d{n}") }));
                    } else {
                        prop_assert_eq!(result, Ok(serde_json::json!({"n": n})));
                    }
                }
                other => prop_assert!(false, "{other:?}"),
            }
        }

        /// Text from qemu is bounded and has no control characters.
        #[test]
        fn tamed_text(text in ".{0,700}") {
            let t = tame(&text);
            prop_assert!(t.chars().count() <= MAX_TEXT + 1);
            prop_assert!(!t.chars().any(char::is_control));
        }
    }

    #[test]
    fn greeting_of_qemu_7_2() {
        let line = br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}}"#;
        let v = parse_greeting(line).unwrap();
        assert_eq!((v.major, v.minor, v.micro), (7, 2, 22));
        assert_eq!(v.to_string(), "7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)");
        assert_eq!(
            parse_greeting(br#"{"QMP": {"version": {"qemu": {"major": -1}}}}"#),
            Err(Violation::BadGreeting)
        );
    }

    #[test]
    fn events_typed_and_other() {
        let stop = br#"{"timestamp": {"seconds": 2, "microseconds": 5}, "event": "STOP"}"#;
        match classify(stop).unwrap() {
            Message::Event(e @ QmpEvent::Typed { event: qapi::qmp::Event::STOP { .. }, .. }) => {
                assert_eq!(e.micros(), 2_000_005);
                assert_eq!(e.name(), "STOP");
            }
            other => panic!("{other:?}"),
        }
        let new =
            br#"{"timestamp": {"seconds": 1, "microseconds": 0}, "event": "FROM_QEMU_12", "data": {"x": 1}}"#;
        match classify(new).unwrap() {
            Message::Event(QmpEvent::Other { name, data, micros }) => {
                assert_eq!((name.as_str(), micros), ("FROM_QEMU_12", 1_000_000));
                assert_eq!(data, serde_json::json!({"x": 1}));
            }
            other => panic!("{other:?}"),
        }
        // A known event whose data does not fit the schema is an Other, not a violation.
        let odd = br#"{"timestamp": {"seconds": 1, "microseconds": 0}, "event": "SHUTDOWN", "data": 7}"#;
        assert!(matches!(classify(odd).unwrap(), Message::Event(QmpEvent::Other { .. })));
    }

    /// A line of exactly the bound passes, also when its end comes in a later chunk; one byte
    /// more does not; what waits for its end is counted.
    #[test]
    fn the_bound_is_inclusive() {
        let mut splitter = LineSplitter::new(8);
        let mut lines = Vec::new();
        splitter.push(b"1234", &mut lines).unwrap();
        assert_eq!(splitter.pending(), 4);
        splitter.push(b"5678", &mut lines).unwrap();
        assert_eq!(splitter.pending(), 8);
        splitter.push(b"\nab", &mut lines).unwrap();
        assert_eq!(lines, [b"12345678".to_vec()]);
        assert_eq!(splitter.pending(), 2);
        assert_eq!(splitter.push(b"cdefghi", &mut lines), Err(Violation::LineTooLong));
        assert_eq!(LineSplitter::new(8).push(b"123456789\n", &mut lines), Err(Violation::LineTooLong));
    }

    /// Blank lines are skipped, anything else is a message; a violation says what it was.
    #[test]
    fn blank_lines_and_violations_texts() {
        assert!(is_blank(b""));
        assert!(is_blank(b" \t\r"));
        assert!(!is_blank(b" {}"));
        assert_eq!(Violation::LineTooLong.to_string(), "line longer than 1 MiB");
        assert_eq!(Violation::BadId.to_string(), "an answer whose id dombus never sent");
    }

    #[test]
    fn violations() {
        assert_eq!(classify(br#"{"return": {}}"#).unwrap_err(), Violation::BadId);
        assert_eq!(classify(br#"{"return": {}, "id": "x"}"#).unwrap_err(), Violation::BadId);
        assert_eq!(classify(br#"{"return": {}, "error": {}, "id": 1}"#).unwrap_err(), Violation::BadAnswer);
        assert_eq!(classify(br#"{"error": {"class": 1}, "id": 1}"#).unwrap_err(), Violation::BadAnswer);
        assert_eq!(classify(br#"{"hello": 1}"#).unwrap_err(), Violation::Unknown);
        assert_eq!(classify(br#"[1]"#).unwrap_err(), Violation::NotObject);
        assert_eq!(classify(br#"{"event": "STOP"}"#).unwrap_err(), Violation::BadEvent);
        assert!(matches!(classify(b"{nope").unwrap_err(), Violation::NotJson(_)));
        // Deep nesting is refused by serde_json's recursion limit, not a stack overflow.
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(classify(deep.as_bytes()).unwrap_err(), Violation::NotJson(_)));
    }
}
