//! `compare`: the link suite of the comparison harness ([`dombus_benches::harness::link`]): times
//! every round trip of each two-process link and virtual-socket benchmark, and prints Markdown
//! tables of percentiles, CPU cost and the ratios the performance targets are stated in.
//!
//! ```text
//! cargo run --release -p dombus-benches --bin compare            # 20,000 round trips each
//! cargo run --release -p dombus-benches --bin compare -- --quick # CI smoke run, every path
//! cargo run --release -p dombus-benches --bin compare -- --iters 50000 --spin 10,50
//! cargo run --release -p dombus-benches --bin compare -- --only eventfd,link_wakeup
//! ```

fn main() {
    dombus_benches::harness::main::<dombus_benches::harness::link::LinkSuite>();
}
