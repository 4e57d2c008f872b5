//! `events-compare`: the subscription suite of the comparison harness
//! ([`dombus_benches::harness::events`]): publish-to-subscriber latency of 64-byte events over
//! `xen:` with wake-ups and with adaptive polling beside a 64-byte call in the same run, events
//! per second to one and to 100 subscribers beside pipelined calls, wake-ups per event, and every
//! event a resync said was missed.
//!
//! ```text
//! cargo run --release -p dombus-benches --bin events-compare            # 20,000 samples per row
//! cargo run --release -p dombus-benches --bin events-compare -- --quick # CI smoke run, every row
//! cargo run --release -p dombus-benches --bin events-compare -- --only xen_wakeup --subscribers 10
//! ```

fn main() {
    dombus_benches::harness::main::<dombus_benches::harness::events::EventsSuite>();
}
