//! `rpc-compare`: the RPC suite of the comparison harness ([`dombus_benches::harness::rpc`]):
//! 64-byte `Echo` calls over dombus-rpc against plain tarpc, measured in the same run,
//! interleaved; prints Markdown tables of call latency, pipelined calls/s, the cost of each layer
//! of the `xen:` path, the domain agent's local path (round trips, connections per second,
//! memory), and the targets.
//!
//! ```text
//! cargo run --release -p dombus-benches --bin rpc-compare            # 20,000 calls per row
//! cargo run --release -p dombus-benches --bin rpc-compare -- --quick # CI smoke run, every row
//! cargo run --release -p dombus-benches --bin rpc-compare -- --only tarpc_unix,xen_spin
//! # The domain agent's local path against the same calls in-process:
//! cargo run --release -p dombus-benches --bin rpc-compare -- --only agent,xen_wakeup_vsock_64,xen_wakeup_64,xen_wakeup_connect
//! ```

fn main() {
    dombus_benches::harness::main::<dombus_benches::harness::rpc::RpcSuite>();
}
