//! Fuzz target: the text of one policy file (`Policy::parse_file`), as an administrator or the
//! admin service writes it.
//!
//! Input: arbitrary bytes; non-UTF-8 inputs are skipped (`Policy::load_dir` refuses them before
//! parsing).
//!
//! Invariants: parsing never panics and neither does displaying its errors; at most
//! `MAX_ERRORS_PER_FILE` errors and one that counts the rest; a file that parses renders, one
//! rule a line, as text that parses back to the same rules (so what `dombus policy` shows can be
//! written back into a file).
//!
//! Run with the language's tokens as a dictionary (without it libFuzzer takes minutes to write
//! a whole valid rule):
//! `cargo +nightly fuzz run policy_parse -- -dict=policy_parse.dict -max_total_time=60`.
#![no_main]

use dombus_manager::policy::{MAX_ERRORS_PER_FILE, Policy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    match Policy::parse_file("fuzz.policy", text) {
        Err(errors) => {
            assert!(!errors.is_empty());
            assert!(errors.len() <= MAX_ERRORS_PER_FILE + 1, "{} errors", errors.len());
            for e in &errors {
                let _ = e.to_string();
            }
        }
        Ok(rules) => {
            let shown: String = rules.iter().map(|r| format!("{r}\n")).collect();
            let again = match Policy::parse_file("fuzz.policy", &shown) {
                Ok(again) => again,
                Err(e) => panic!("{text:?} parsed, but its rules displayed as {shown:?} do not: {e:?}"),
            };
            assert_eq!(again.len(), rules.len(), "{text:?} displayed as {shown:?}");
            for (i, (a, b)) in rules.iter().zip(&again).enumerate() {
                assert!(a.same_rule(b), "{text:?}: {a:?} displayed as {shown:?}, parsed back as {b:?}");
                assert_eq!(b.origin.line as usize, i + 1);
            }
        }
    }
});
