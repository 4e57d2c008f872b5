//! Fuzz target: address strings (`Address::from_str`), as given on command lines and in
//! configuration.
//!
//! Input: arbitrary bytes; non-UTF-8 inputs are skipped (addresses arrive as `&str`).
//!
//! Invariants: parsing never panics and neither does displaying its error; a parsed address
//! displays as a string that parses back to the same address (so `Display` is what logs,
//! `ServeHandle::addr` and `dombus describe` can hand back to a user to type in again).
#![no_main]

mod common;

use dombus_rpc::Address;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    match s.parse::<Address>() {
        Err(e) => {
            let _ = e.to_string();
        }
        Ok(a) => {
            let shown = a.to_string();
            assert_eq!(
                shown.parse::<Address>(),
                Ok(a.clone()),
                "{s:?} parsed as {a:?}, displayed as {shown:?}"
            );
        }
    }
});
