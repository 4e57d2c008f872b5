//! Criterion benches of subscriptions over `xen:` (simulator), server in the peer process.
//!
//! Groups:
//! * `events`: `xen_wakeup_call_64` / `xen_spin_call_64` (a 64-byte call of the bench service,
//!   one at a time) and `xen_wakeup_event_64` / `xen_spin_event_64` (one 64-byte event
//!   published while the subscriber's long poll waits; the time per event includes the next
//!   poll's trip to the server), wake-ups / adaptive polling with a [`SPIN`] budget;
//! * `events_burst`: events per second published as fast as the server can and delivered to
//!   1 and to [`MANY`] subscribers (a throughput element is one event every subscriber had).
//!
//! Each benchmark starts its peer once; `iter_custom` times only the calls or events. Run with
//! `cargo bench -p dombus-benches --bench events`; publish-to-subscriber percentiles, wake-ups
//! and missed counts come from `cargo run --release -p dombus-benches --bin events-compare`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use criterion::{Criterion, Throughput};
use dombus_benches::PingPong;
use dombus_benches::events::{EventsBench, Mode};

/// Adaptive-polling budget of the `xen_spin` benches.
const SPIN: Duration = Duration::from_micros(50);
/// Subscribers of the many-subscriber bench.
const MANY: usize = 100;
/// The burst ring: larger than any batch criterion asks for here.
const RING: u64 = 1 << 20;

fn latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("events");
    g.sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(4));
    for (mode, spin) in [("xen_wakeup", None), ("xen_spin", Some(SPIN))] {
        for (what, m) in [("call", Mode::Call), ("event", Mode::Paced)] {
            let mut bench = EventsBench::new(m, spin, RING).unwrap();
            g.bench_function(format!("{mode}_{what}_64"), |b| b.iter_custom(|n| bench.run(n, None).unwrap()));
        }
    }
    g.finish();
}

fn burst(c: &mut Criterion) {
    let mut g = c.benchmark_group("events_burst");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(1));
    for (mode, spin) in [("xen_wakeup", None), ("xen_spin", Some(SPIN))] {
        for k in [1, MANY] {
            let mut bench = EventsBench::new(Mode::Burst(k), spin, RING).unwrap();
            // Criterion's iteration counts grow large: bursts of at most a quarter of the ring.
            g.bench_function(format!("{mode}_events_x{k}"), |b| {
                b.iter_custom(|n| {
                    let mut total = Duration::ZERO;
                    let mut left = n;
                    while left > 0 {
                        let chunk = left.min(RING / 4);
                        total += bench.batch(chunk).unwrap();
                        left -= chunk;
                    }
                    total
                })
            });
        }
    }
    g.finish();
}

fn main() {
    dombus_benches::run_child_if_requested();
    // Parent on one CPU, peer on the other, as in `events-compare` (override: DOMBUS_BENCH_PIN).
    dombus_benches::pin_from_env(dombus_benches::Pinning::Split).unwrap();
    let mut c = Criterion::default().configure_from_args();
    latency(&mut c);
    burst(&mut c);
    c.final_summary();
}
