//! The subscription benchmarks end to end, small: a paced subscriber gets one stamped event per
//! poll with a plausible latency, and a burst reaches every one of several subscribers, nothing
//! missed, each event once. A test binary without libtest's harness, so that it can play the
//! benchmark's peer process (the server domain) itself.

use std::io;
use std::time::Duration;

use dombus_benches::PingPong;
use dombus_benches::events::{EventsBench, Mode, Tally};

fn check(ok: bool, what: impl FnOnce() -> String) -> io::Result<()> {
    if ok { Ok(()) } else { Err(io::Error::other(what())) }
}

/// Each paced event is timed from the server's stamp to the subscriber: positive, under a
/// second, and one sample per event.
fn paced_events_are_stamped_and_timed() -> io::Result<()> {
    let mut b = EventsBench::new(Mode::Paced, None, 1024)?;
    let mut samples = Vec::new();
    b.run(20, Some(&mut samples))?;
    check(samples.len() == 20, || format!("{} samples", samples.len()))?;
    check(samples.iter().all(|s| *s > Duration::ZERO && *s < Duration::from_secs(1)), || {
        format!("samples {samples:?}")
    })
}

/// A burst of 300 events reaches each of 3 subscribers once; a second burst too.
fn bursts_reach_every_subscriber() -> io::Result<()> {
    let mut b = EventsBench::new(Mode::Burst(3), None, 1024)?;
    b.batch(300)?;
    b.batch(300)?;
    let t = b.tally().unwrap_or_default();
    let want = Tally { started: 3, delivered: 1800, missed: 0, resyncs: 0, errors: 0 };
    check(t == want, || format!("tally {t:?}, expected {want:?}"))
}

/// Calls of the same service, one at a time and pipelined.
fn calls_answer() -> io::Result<()> {
    let mut b = EventsBench::new(Mode::Call, None, 1024)?;
    let mut samples = Vec::new();
    b.run(10, Some(&mut samples))?;
    check(samples.len() == 10, || format!("{} samples", samples.len()))?;
    b.batch(100).map(|_| ())
}

/// One test: `Err` says what failed.
type Check = fn() -> io::Result<()>;

fn main() {
    dombus_benches::run_child_if_requested();
    let tests: [(&str, Check); 3] = [
        ("paced_events_are_stamped_and_timed", paced_events_are_stamped_and_timed),
        ("bursts_reach_every_subscriber", bursts_reach_every_subscriber),
        ("calls_answer", calls_answer),
    ];
    let mut failed = 0;
    for (name, test) in tests {
        match test() {
            Ok(()) => println!("test {name} ... ok"),
            Err(e) => {
                println!("test {name} ... FAILED: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        std::process::exit(1);
    }
}
