//! Criterion benches of typed RPC calls (a 64-byte `Echo`), server in the peer process.
//!
//! Groups:
//! * `rpc`: one call at a time — `xen_wakeup_64` / `xen_spin_64` (dombus-rpc over transport-xen
//!   virtual sockets over the simulated hypervisor, wake-ups / adaptive polling with a [`SPIN`]
//!   budget), `unix_64`, `unix_postcard_64`, `tcp_64` (dombus-rpc), and the baselines
//!   `tarpc_unix_64`, `tarpc_tcp_64` (plain tarpc with its own transports, no dombus-rpc);
//! * `rpc_pipelined`: [`DEPTH`] calls in flight on one client, throughput in calls/s —
//!   `xen_wakeup_x32`, `xen_spin_x32`, `unix_x32`, `tarpc_unix_x32`.
//!
//! Each benchmark starts its peer once; `iter_custom` times only the calls. Both processes run a
//! current-thread tokio runtime and are pinned to different CPUs unless `DOMBUS_BENCH_PIN` says
//! otherwise. Run with `cargo bench -p dombus-benches --bench rpc`; percentiles, ratios and the
//! per-layer breakdown come from `cargo run --release -p dombus-benches --bin rpc-compare`.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use criterion::{Criterion, Throughput};
use dombus_benches::PingPong;
use dombus_benches::rpc::{RpcPingPong, Stack, Transport};
use dombus_rpc::Codec;

/// Adaptive-polling budget of the `xen_spin` benches.
const SPIN: Duration = Duration::from_micros(50);
/// Calls in flight in the pipelined benches.
const DEPTH: usize = 32;

const XEN_WAKEUP: Transport = Transport::Xen { spin: None };
const XEN_SPIN: Transport = Transport::Xen { spin: Some(SPIN) };
const RPC: Stack = Stack::Rpc(Codec::Bincode);

fn latency(c: &mut Criterion) {
    let mut g = c.benchmark_group("rpc");
    g.sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(4));
    let rows = [
        ("xen_wakeup_64", XEN_WAKEUP, RPC),
        ("xen_spin_64", XEN_SPIN, RPC),
        ("unix_64", Transport::Unix, RPC),
        ("unix_postcard_64", Transport::Unix, Stack::Rpc(Codec::Postcard)),
        ("tcp_64", Transport::Tcp, RPC),
        ("tarpc_unix_64", Transport::Unix, Stack::Tarpc),
        ("tarpc_tcp_64", Transport::Tcp, Stack::Tarpc),
    ];
    for (name, transport, stack) in rows {
        let mut bench = RpcPingPong::new(transport, stack).unwrap();
        g.bench_function(name, |b| b.iter_custom(|iters| bench.run(iters, None).unwrap()));
    }
    g.finish();
}

fn pipelined(c: &mut Criterion) {
    let mut g = c.benchmark_group("rpc_pipelined");
    g.sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(1));
    let rows = [
        ("xen_wakeup_x32", XEN_WAKEUP, RPC),
        ("xen_spin_x32", XEN_SPIN, RPC),
        ("unix_x32", Transport::Unix, RPC),
        ("tarpc_unix_x32", Transport::Unix, Stack::Tarpc),
    ];
    for (name, transport, stack) in rows {
        let mut bench = RpcPingPong::new(transport, stack).unwrap();
        g.bench_function(name, |b| b.iter_custom(|iters| bench.pipelined(iters, DEPTH).unwrap()));
    }
    g.finish();
}

fn main() {
    dombus_benches::run_child_if_requested();
    // Parent on one CPU, peer on the other, as in `rpc-compare` (override: DOMBUS_BENCH_PIN).
    dombus_benches::pin_from_env(dombus_benches::Pinning::Split).unwrap();
    let mut c = Criterion::default().configure_from_args();
    latency(&mut c);
    pipelined(&mut c);
    c.final_summary();
}
