//! Fuzz target: command-line values (`dombus_rpc::cli::parse_value`) and the rendering of
//! results for people (`cli::render`, `cli::render_error`).
//!
//! Input: arbitrary bytes; non-UTF-8 inputs are skipped (arguments arrive as `String`s).
//!
//! Invariants, for `T` in `u8`, `u64`, `i64`, `bool`, `char`, `f64`, `String`, `Option<u64>`,
//! `Option<String>`, `Vec<u32>`, `Vec<String>`, `(u16, String)`, a struct, an enum and
//! `serde_json::Value`: parsing never panics; `String`, `Option<String>` and `Value` always
//! parse (a value that is not JSON is a string), a `String` to the JSON string's contents when
//! the input is one and to the input itself otherwise; a parsed value's JSON text parses back
//! to the same value (so a value printed with `--json` can be passed back on a command line;
//! not checked for floats, which serde_json reads back only approximately). Any parsed `Value`
//! renders without panicking, as a result and as an error.
#![no_main]

use std::fmt::Debug;

use dombus_rpc::cli::{parse_value, render, render_error};
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Disk {
    name: String,
    size_mb: u64,
    backing: Option<String>,
    tags: Vec<String>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Mode {
    Off,
    Level(u8),
    Range { from: i32, to: i32 },
}

/// Parses `s` as `T`; a parsed value's JSON text must parse back to the same value.
fn round_trip<T: DeserializeOwned + Serialize + PartialEq + Debug>(s: &str) -> Option<T> {
    let v = parse_value::<T>(s).ok()?;
    let json = serde_json::to_string(&v).expect("a parsed value serializes");
    assert_eq!(parse_value::<T>(&json).as_ref(), Ok(&v), "{s:?} parsed as {v:?}, whose JSON is {json}");
    Some(v)
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    round_trip::<u8>(s);
    round_trip::<u64>(s);
    round_trip::<i64>(s);
    round_trip::<bool>(s);
    round_trip::<char>(s);
    round_trip::<Option<u64>>(s);
    round_trip::<Vec<u32>>(s);
    round_trip::<Vec<String>>(s);
    round_trip::<(u16, String)>(s);
    round_trip::<Disk>(s);
    round_trip::<Mode>(s);
    let _ = parse_value::<f64>(s);

    let string = round_trip::<String>(s).expect("anything is a string");
    match serde_json::from_str::<String>(s) {
        Ok(inner) => assert_eq!(string, inner, "{s:?}"),
        Err(_) => assert_eq!(string, s),
    }
    round_trip::<Option<String>>(s).expect("anything is an optional string");

    let value = parse_value::<Value>(s).expect("anything is a JSON value");
    let _ = render(&value);
    let _ = render_error(&value);
});
