//! Criterion benches of the link against its baselines, two processes each.
//!
//! Groups:
//! * `baseline`: `eventfd_pingpong` (wake-up floor), `shm_spin_pingpong_64` / `_4k` (polling
//!   floor), `memcpy_64k` (bandwidth floor, one process);
//! * `link`: `wakeup_64` / `wakeup_4k` (event-channel wake-ups), `spin_64` / `spin_4k` (adaptive
//!   polling, [`SPIN`] budget), `stream_64k` (64 KiB chunks through 1 MiB rings);
//! * `vsock`: `wakeup_64` / `wakeup_64_idle100` / `wakeup_64_idle10000` (one connection's round
//!   trip with that many other connections open on the link; compare with `link/wakeup_64`),
//!   `stream_64k_x16` (aggregate of 16 connections streaming at once through 1 MiB rings).
//!
//! Each benchmark starts its peer process once; `iter_custom` times only the round trips.
//! Processes are pinned parent to one CPU and peer to the other unless `DOMBUS_BENCH_PIN` says
//! `none` or `same`. Run with `cargo bench -p dombus-benches --bench link`; ratios and
//! percentiles come from
//! `cargo run --release -p dombus-benches --bin compare`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use criterion::{BenchmarkGroup, Criterion, Throughput, measurement::WallTime};
use dombus_benches::PingPong;
use dombus_benches::baseline::{CHUNK, EventfdPingPong, Memcpy, ShmSpinPingPong};

/// Spin budget of the adaptive-polling link benches.
const SPIN: Duration = Duration::from_micros(50);

fn pingpong(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, bench: &mut dyn PingPong) {
    group.bench_function(name, |b| b.iter_custom(|iters| bench.run(iters, None).unwrap()));
}

fn baseline(c: &mut Criterion) {
    let mut g = c.benchmark_group("baseline");
    g.sample_size(40).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(6));
    pingpong(&mut g, "eventfd_pingpong", &mut EventfdPingPong::new().unwrap());
    pingpong(&mut g, "shm_spin_pingpong_64", &mut ShmSpinPingPong::new(64).unwrap());
    pingpong(&mut g, "shm_spin_pingpong_4k", &mut ShmSpinPingPong::new(4096).unwrap());
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let mut m = Memcpy::new();
    g.bench_function("memcpy_64k", |b| b.iter_custom(|iters| m.run(iters)));
    g.finish();
}

fn link(c: &mut Criterion) {
    use dombus_benches::link::{LinkPingPong, LinkStream};

    let mut g = c.benchmark_group("link");
    g.sample_size(40).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(6));
    let wake = LinkPingPong::config(None);
    let spin = LinkPingPong::config(Some(SPIN));
    pingpong(&mut g, "wakeup_64", &mut LinkPingPong::new(64, &wake).unwrap());
    pingpong(&mut g, "wakeup_4k", &mut LinkPingPong::new(4096, &wake).unwrap());
    pingpong(&mut g, "spin_64", &mut LinkPingPong::new(64, &spin).unwrap());
    pingpong(&mut g, "spin_4k", &mut LinkPingPong::new(4096, &spin).unwrap());
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let mut s = LinkStream::new(None).unwrap();
    g.bench_function("stream_64k", |b| b.iter_custom(|iters| s.run(iters).unwrap()));
    g.finish();
}

fn vsock(c: &mut Criterion) {
    use dombus_benches::link::{VsockPingPong, VsockStreams};

    let mut g = c.benchmark_group("vsock");
    g.sample_size(40).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(6));
    pingpong(&mut g, "wakeup_64", &mut VsockPingPong::new(0).unwrap());
    pingpong(&mut g, "wakeup_64_idle100", &mut VsockPingPong::new(100).unwrap());
    pingpong(&mut g, "wakeup_64_idle10000", &mut VsockPingPong::new(10_000).unwrap());
    g.throughput(Throughput::Bytes(CHUNK as u64));
    let mut s = VsockStreams::new(16, None).unwrap();
    g.bench_function("stream_64k_x16", |b| b.iter_custom(|iters| s.run(iters).unwrap()));
    g.finish();
}

fn main() {
    dombus_benches::run_child_if_requested();
    // Parent on one CPU, peer on the other, as in `compare` (override: DOMBUS_BENCH_PIN).
    dombus_benches::pin_from_env(dombus_benches::Pinning::Split).unwrap();
    let mut c = Criterion::default().configure_from_args();
    baseline(&mut c);
    link(&mut c);
    vsock(&mut c);
    c.final_summary();
}
