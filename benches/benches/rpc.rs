//! Criterion benches of typed RPC calls (a 64-byte `Echo`), server in the peer process.
//!
//! Groups:
//! * `rpc`: one call at a time — `xen_wakeup_64` / `xen_spin_64` (dombus-rpc over transport-xen
//!   virtual sockets over the simulated hypervisor, wake-ups / adaptive polling with a [`SPIN`]
//!   budget), `unix_64`, `unix_postcard_64`, `tcp_64` (dombus-rpc), and the baselines
//!   `tarpc_unix_64`, `tarpc_tcp_64` (plain tarpc with its own transports, no dombus-rpc);
//! * `rpc_pipelined`: [`DEPTH`] calls in flight on one client, throughput in calls/s —
//!   `xen_wakeup_x32`, `xen_spin_x32`, `unix_x32`, `tarpc_unix_x32`;
//! * `rpc_one_thread`: the built-in ping with client and server on one thread of this process
//!   over a Unix socket — no wake-up of another thread or process, so the row is the CPU cost of
//!   a call: the syscalls of its writes and reads plus dombus-rpc's own work, on the direct path
//!   (`ping_direct`) and on tarpc's channel (`ping_via_tarpc`), and on the direct path under the
//!   daemons' logging (`ping_direct_logged`: a `fmt` subscriber at info).
//!
//! Each benchmark starts its peer once; `iter_custom` times only the calls. Both processes run a
//! current-thread tokio runtime and are pinned to different CPUs unless `DOMBUS_BENCH_PIN` says
//! otherwise. Run with `cargo bench -p dombus-benches --bench rpc`; percentiles, ratios and the
//! per-layer breakdown come from `cargo run --release -p dombus-benches --bin rpc-compare`.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use dombus_benches::PingPong;
use dombus_benches::rpc::{RpcPingPong, Stack, Transport};
use dombus_rpc::{Address, CallPath, ClientConfig, Codec, Net, RawClient, Server, ServerConfig, wire};

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

fn one_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("rpc_one_thread");
    g.sample_size(30).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let dir = std::env::temp_dir().join(format!("dombus-bench-one-thread-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let rows = [
        ("ping_direct", CallPath::Direct, false),
        ("ping_via_tarpc", CallPath::Tarpc, false),
        ("ping_direct_logged", CallPath::Direct, true),
    ];
    for (name, path, logged) in rows {
        // The logged row runs as the daemons do: a `fmt` subscriber at info (writing nowhere),
        // for this thread only, where the client, the server and their runtime all run.
        let _logging = logged.then(|| {
            let subscriber = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
                .with_writer(std::io::sink)
                .finish();
            tracing::subscriber::set_default(subscriber)
        });
        let addr = Address::Unix(dir.join(format!("{name}.sock")));
        let server = Server::new(Net::new(), ServerConfig { call_path: path, ..ServerConfig::default() });
        let handle = rt.block_on(server.serve_many(&addr, Vec::new())).unwrap();
        let config = ClientConfig { call_path: path, ..ClientConfig::default() };
        let client = RawClient::new(Net::new(), addr, wire::BUILTIN_SERVICE, config);
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        client.ping(tarpc::context::current()).await.unwrap();
                    }
                    start.elapsed()
                })
            })
        });
        rt.block_on(handle.stop());
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    dombus_benches::run_child_if_requested();
    // Parent on one CPU, peer on the other, as in `rpc-compare` (override: DOMBUS_BENCH_PIN).
    dombus_benches::pin_from_env(dombus_benches::Pinning::Split).unwrap();
    let mut c = Criterion::default().configure_from_args();
    latency(&mut c);
    pipelined(&mut c);
    one_thread(&mut c);
    c.final_summary();
}
