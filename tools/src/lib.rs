//! dombus tools: the programs a person runs by hand to bring up, drive and measure links on a
//! machine, and the measurement helpers they share with the test suites.
//!
//! * `dombus-simxen` — the simulated hypervisor daemon ([`dombus_sim::SimHypervisor`]) on a
//!   Unix socket, for hosts without Xen.
//! * `dombus-link` — serves, connects, pings, streams and attacks links and virtual sockets over
//!   the simulator or real Xen (`dombus-link --help`).
//! * [`diag`] — echo, ping with latency percentiles, checksummed patterns and a counting
//!   allocator, for any byte stream.
//! * [`reconnect`] — round trips that go on across lost connections, reconnecting with bounded
//!   back-off (`dombus-link vsock-ping --reconnect-s`).
//! * [`ticks`] — a `#[dombus::service]` with a stream of numbered ticks, and a subscriber that
//!   checks it receives each once, in order, across a restart of the server
//!   (`dombus-link ticks-serve`, `ticks-watch`).
//!
//! ```no_run
//! # async fn demo(mut stream: tokio::net::UnixStream) -> std::io::Result<()> {
//! use dombus_tools::diag;
//! // 64-byte round trips against a peer running `diag::echo`: 10 warm-up, 1,000 measured.
//! if let Some(latency) = diag::ping(&mut stream, 64, 10, 1_000).await? {
//!     println!("p50 {:.1} µs", diag::us(latency.p50));
//! }
//! # Ok(()) }
//! ```

pub mod diag;
pub mod reconnect;
pub mod ticks;
