//! Subscription benchmarks: a `#[dombus::service]` with stream methods over [`dombus::Topic`]s,
//! served over `xen:` in the peer process and subscribed to from the parent, beside a 64-byte
//! call of the same service on the same pair of processes.
//!
//! # Set-up
//!
//! As for [`crate::rpc`]: the parent runs the simulated hypervisor in-process and is domain
//! [`CLIENT_DOM`]; the peer ([`SERVER_ROLE`]) is domain [`SERVER_DOM`] and serves [`Ticks`]
//! through `dombus_rpc::Server`. Both sides' links wake up on event channels or poll adaptively
//! ([`EventsBench::new`]'s `spin`). Both processes run a current-thread tokio runtime: the
//! pacing of the latency benchmark relies on it (below).
//!
//! # What is measured ([`Mode`])
//!
//! * [`Mode::Call`]: one [`Ticks::echo`] call of [`PAYLOAD`] bytes at a time (the round trip the
//!   events are compared with); its throughput batches keep [`CALL_DEPTH`] calls in flight.
//! * [`Mode::Paced`]: publish-to-subscriber latency. The peer publishes one [`Tick`] each time
//!   the subscriber's poll is waiting on the server: every poll of [`Ticks::paced`] after the
//!   first (which answers the subscription's start) lets the peer's pacer publish one event,
//!   and the pacer runs only once the poll's task has parked on the topic (one thread per
//!   process), so each event finds a long poll outstanding. The tick carries the peer's
//!   `CLOCK_MONOTONIC` time at publishing; the parent's sample is its own `CLOCK_MONOTONIC`
//!   time when the subscription yields the event, minus that stamp (one clock for both: two
//!   processes of one machine).
//! * [`Mode::Burst`]: events per second. `k` subscriptions of [`Ticks::events`] (one client,
//!   one connection, `k` long polls, up to [`MAX_BATCH_EVENTS`] events each), then each batch
//!   asks the peer ([`Ticks::burst`]) to publish `n` events as fast as it can and times until
//!   every subscriber has had all `n`. The ring holds more than a batch, so nothing should be
//!   missed: the [`Tally`] counts what was delivered and every event a resync said was missed.
//!
//! Wake-ups on the path are counted as voluntary context switches (a thread that blocked and
//! was woken) of each process, all threads, per operation ([`ContextSwitches`]).

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use dombus::rpc::events::MAX_BATCH_EVENTS;
use dombus::{
    Address, ClientConfig, Events, Net, ResyncReason, Server, ServerConfig, Subscription, Topic, TopicLimits,
    Update,
};
use dombus_sim::{SimBackend, SimHypervisor, SimHypervisorHandle};
use dombus_transport_xen::vsock::VsockAddr;
use dombus_transport_xen::vsock::domain::VsockDomain;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use tokio::runtime::Runtime;
use tokio::sync::watch;

use crate::rpc::{CLIENT_DOM, Flavor, SERVER_DOM, SETUP_TIMEOUT, ScratchDir, runtime, xen_config};
use crate::{PeerProcess, PingPong};

/// Peer role of the subscription benchmarks: serves [`Ticks`] over `xen:` until killed.
pub const SERVER_ROLE: &str = "events-server";
/// Bytes of the echoed call argument and of an encoded [`Tick`].
pub const PAYLOAD: usize = 64;
/// Calls in flight in [`Mode::Call`]'s throughput batches.
pub const CALL_DEPTH: usize = 32;
/// The `xen:` port of the service.
const PORT: u32 = 5100;
/// Events [`Ticks::burst`] publishes before letting the peer's other tasks (the polls) run.
const PUBLISH_CHUNK: u64 = 256;
/// Longest a burst may take to reach every subscriber before the benchmark fails.
const BURST_TIMEOUT: Duration = Duration::from_secs(60);
/// Echo calls and paced events done before a constructor returns.
const HANDSHAKE: u64 = 16;
/// Longest a long poll waits on the server (the benchmarks publish long before).
const POLL_WAIT: Duration = Duration::from_secs(10);

/// One event: the publisher's `CLOCK_MONOTONIC` time and padding to [`PAYLOAD`] bytes encoded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tick {
    /// Nanoseconds of `CLOCK_MONOTONIC` when the event was published.
    pub stamp_ns: u64,
    /// Padding (bincode: 8 bytes of length and these 48).
    pub pad: Vec<u8>,
}

impl Tick {
    /// A tick stamped now.
    fn now() -> Tick {
        Tick { stamp_ns: monotonic_ns(), pad: vec![0xa5; PAYLOAD - 16] }
    }
}

/// Nanoseconds of `CLOCK_MONOTONIC`: one clock for every process of the machine.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer for the duration of the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// The service of the subscription benchmarks (generated items: `TicksClient`, …).
pub mod service {
    use super::Tick;

    /// Events for the benchmarks, and a call to compare them with.
    #[dombus::service(name = "bench-ticks")]
    pub trait Ticks {
        /// Returns its argument: the call round trip the events are compared with.
        #[idempotent]
        async fn echo(&self, data: Vec<u8>) -> Vec<u8>;
        /// Publishes `count` ticks into the [`Ticks::events`] topic as fast as it can (at most
        /// the ring's size); answers the cursor's sequence number after the last.
        async fn burst(&self, count: u64) -> u64;
        /// Every tick [`Ticks::burst`] publishes.
        async fn events(&self) -> dombus::Events<Tick>;
        /// One tick per poll after the first, published once the poll waits on the server.
        async fn paced(&self) -> dombus::Events<Tick>;
    }
}
pub use service::{Ticks, TicksClient};

/// The peer's implementation of [`Ticks`].
struct TicksServer {
    bursts: Topic<Tick>,
    ring: u64,
    paced: Topic<Tick>,
    /// Polls of [`Ticks::paced`] so far.
    polls: Arc<AtomicU64>,
    /// Wakes the pacer after each poll.
    poll_seen: Arc<tokio::sync::Notify>,
}

impl Ticks for TicksServer {
    async fn echo(&self, data: Vec<u8>) -> Vec<u8> {
        data
    }

    async fn burst(&self, count: u64) -> u64 {
        let mut last = self.bursts.cursor().seq;
        for i in 0..count.min(self.ring) {
            last = self.bursts.publish(Tick::now()).seq;
            if i % PUBLISH_CHUNK == PUBLISH_CHUNK - 1 {
                tokio::task::yield_now().await;
            }
        }
        last
    }

    async fn events(&self) -> Events<Tick> {
        self.bursts.events()
    }

    async fn paced(&self) -> Events<Tick> {
        self.polls.fetch_add(1, Ordering::SeqCst);
        self.poll_seen.notify_one();
        self.paced.events()
    }
}

/// The paced topic's publisher: after poll `p` (numbered from 1) it has published `p - 1`
/// events. It runs only when the poll's task has parked (one thread), so the poll is waiting.
async fn pace(topic: Topic<Tick>, polls: Arc<AtomicU64>, poll_seen: Arc<tokio::sync::Notify>) {
    let mut published = 0u64;
    loop {
        poll_seen.notified().await;
        let due = polls.load(Ordering::SeqCst).saturating_sub(1);
        while published < due {
            topic.publish(Tick::now());
            published += 1;
        }
    }
}

/// What the peer needs: the simulator's socket, the links' polling budget, the burst ring.
#[derive(Debug, Clone, PartialEq)]
struct ServerArgs {
    socket: PathBuf,
    spin: Option<Duration>,
    ring: u64,
}

impl ServerArgs {
    fn encode(&self) -> String {
        let spin = self.spin.map_or_else(|| "-".to_string(), |d| d.as_nanos().to_string());
        format!("{spin}|{}|{}", self.ring, self.socket.display())
    }

    fn decode(s: &str) -> io::Result<ServerArgs> {
        let bad = || io::Error::new(io::ErrorKind::InvalidInput, format!("bad events peer argument {s:?}"));
        let mut parts = s.splitn(3, '|');
        let mut next = || parts.next().ok_or_else(bad);
        let (spin, ring, socket) = (next()?, next()?, next()?);
        let spin = match spin {
            "-" => None,
            ns => Some(Duration::from_nanos(ns.parse().map_err(|_| bad())?)),
        };
        let ring = ring.parse().ok().filter(|&r| r > 0).ok_or_else(bad)?;
        Ok(ServerArgs { socket: PathBuf::from(socket), spin, ring })
    }
}

/// The service's address over `xen:`.
fn address() -> Address {
    Address::Xen(VsockAddr::new(u32::from(SERVER_DOM.0), PORT))
}

/// Peer of the subscription benchmarks: domain [`SERVER_DOM`], serving [`Ticks`] until killed.
pub(crate) fn server_child(arg: &str) -> io::Result<()> {
    let args = ServerArgs::decode(arg)?;
    let rt = runtime(Flavor::Current)?;
    rt.block_on(async move {
        let backend = SimBackend::boot(&args.socket, Some(SERVER_DOM)).map_err(io::Error::other)?;
        let domain = VsockDomain::start(backend, xen_config(args.spin))?;
        let net = Net::new().with_xen(domain.clone());
        let ring = usize::try_from(args.ring).unwrap_or(usize::MAX);
        // Room for every event of a burst whatever its size (a Tick weighs PAYLOAD bytes).
        let limits = TopicLimits { max_events: ring, max_bytes: ring.saturating_mul(4 * PAYLOAD) };
        let paced = Topic::new(TopicLimits::default());
        let polls = Arc::new(AtomicU64::new(0));
        let poll_seen = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(pace(paced.clone(), polls.clone(), poll_seen.clone()));
        let service = TicksServer { bursts: Topic::new(limits), ring: args.ring, paced, polls, poll_seen };
        let _serving =
            Server::new(net, ServerConfig::default()).serve(&address(), service.into_service()).await?;
        std::future::pending::<io::Result<()>>().await
    })
}

/// What one benchmark instance measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// [`Ticks::echo`] calls: one at a time ([`PingPong`]), or [`CALL_DEPTH`] in flight.
    Call,
    /// One subscriber, one event published at a time while its poll waits: latency.
    Paced,
    /// This many subscribers, events published as fast as the peer can: events per second.
    Burst(usize),
}

/// Events delivered to the subscribers of a [`Mode::Burst`] instance, and what went wrong.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Subscriptions that have started (their first resync).
    pub started: u64,
    /// Events delivered, all subscribers together.
    pub delivered: u64,
    /// Events resyncs said were missed ([`ResyncReason::Missed`]), all subscribers together.
    pub missed: u64,
    /// Other resyncs after the start (a new epoch, an unknown cursor).
    pub resyncs: u64,
    /// Failed polls.
    pub errors: u64,
}

impl Tally {
    /// Events accounted for: delivered, or explicitly missed.
    fn accounted(&self) -> u64 {
        self.delivered + self.missed
    }

    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &Tally) {
        self.started += other.started;
        self.delivered += other.delivered;
        self.missed += other.missed;
        self.resyncs += other.resyncs;
        self.errors += other.errors;
    }

    /// Counts one update (or failed poll) of a subscription.
    fn count<S>(&mut self, update: &Result<Update<Tick, S>, dombus::RpcError>) {
        match update {
            Ok(Update::Event { .. }) => self.delivered += 1,
            Ok(Update::Resync { reason: ResyncReason::Start, .. }) => self.started += 1,
            Ok(Update::Resync { reason: ResyncReason::Missed { count }, .. }) => self.missed += count,
            Ok(Update::Resync { .. }) => self.resyncs += 1,
            Err(_) => self.errors += 1,
        }
    }
}

/// A mode's state in the parent.
enum Driver {
    Call,
    /// Boxed: a subscription is large, and the slot is empty only while a run borrows it.
    Paced(Option<Box<Subscription<Tick, ()>>>),
    /// The subscribers' tasks run on the runtime and end with it.
    Burst {
        subscribers: u64,
        tally: watch::Receiver<Tally>,
    },
}

/// One instance of a subscription benchmark: the peer serving [`Ticks`], the parent's domain
/// and client, and the mode's subscriptions.
///
/// Field order is drop order: the subscriptions and client go with the runtime first, then the
/// peer is killed, then the hypervisor stops and the scratch directory goes.
pub struct EventsBench {
    driver: Driver,
    client: TicksClient,
    rt: Runtime,
    peer: PeerProcess,
    _domain: VsockDomain<SimBackend>,
    _hv: SimHypervisorHandle,
    _dir: ScratchDir,
}

impl std::fmt::Debug for EventsBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventsBench").field("peer", &self.peer).finish()
    }
}

fn rpc_error(e: dombus::RpcError) -> io::Error {
    io::Error::other(e)
}

impl EventsBench {
    /// Starts the peer with both domains' links polling for `spin` (`None`: wake-ups only), a
    /// burst ring of `ring` events, and sets up `mode`.
    pub fn new(mode: Mode, spin: Option<Duration>, ring: u64) -> io::Result<EventsBench> {
        let dir = ScratchDir::new()?;
        let rt = runtime(Flavor::Current)?;
        let socket = dir.path().join("simxen.sock");
        let hv = SimHypervisor::spawn(&socket)?;
        let args = ServerArgs { socket: socket.clone(), spin, ring };
        let peer = PeerProcess::spawn(SERVER_ROLE, &args.encode(), &[])?;
        let backend = SimBackend::boot(&socket, Some(CLIENT_DOM)).map_err(io::Error::other)?;
        let domain = rt.block_on(async { VsockDomain::start(backend, xen_config(spin)) })?;
        let mut net = Net::new().with_xen(domain.clone());
        net.xen_connect_wait = Some(SETUP_TIMEOUT);
        let client = TicksClient::with_config(net, address(), ClientConfig::default());
        let setup = rt.block_on(async {
            let setup = async {
                let data = vec![7u8; PAYLOAD];
                for _ in 0..HANDSHAKE {
                    echo(&client, &data).await?;
                }
                Ok(match mode {
                    Mode::Call => Driver::Call,
                    Mode::Paced => {
                        let mut sub = client.paced().wait(POLL_WAIT);
                        match sub.next().await {
                            Some(Ok(Update::Resync { reason: ResyncReason::Start, .. })) => {}
                            other => return Err(io::Error::other(format!("paced subscription: {other:?}"))),
                        }
                        Driver::Paced(Some(Box::new(sub)))
                    }
                    Mode::Burst(k) => subscribe(&client, k).await?,
                })
            };
            match tokio::time::timeout(SETUP_TIMEOUT, setup).await {
                Ok(r) => r,
                Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "events benchmark set-up timed out")),
            }
        })?;
        let mut me = EventsBench { driver: setup, client, rt, peer, _domain: domain, _hv: hv, _dir: dir };
        match mode {
            Mode::Call => {
                me.run(HANDSHAKE, None)?;
            }
            Mode::Paced => {
                me.run(HANDSHAKE, None)?;
            }
            Mode::Burst(_) => {}
        }
        Ok(me)
    }

    /// Runs `units` units of throughput work and returns the wall time: in [`Mode::Call`],
    /// `units` calls with [`CALL_DEPTH`] in flight; in [`Mode::Burst`], a burst of `units` events
    /// until every subscriber has had each (or was told it missed it). Not in [`Mode::Paced`].
    pub fn batch(&mut self, units: u64) -> io::Result<Duration> {
        let client = self.client.clone();
        match &mut self.driver {
            Driver::Call => self.rt.block_on(async move {
                let data = vec![3u8; PAYLOAD];
                let start = Instant::now();
                let mut in_flight = FuturesUnordered::new();
                let mut issued = 0u64;
                while issued < units && in_flight.len() < CALL_DEPTH {
                    in_flight.push(echo(&client, &data));
                    issued += 1;
                }
                while let Some(r) = in_flight.next().await {
                    r?;
                    if issued < units {
                        in_flight.push(echo(&client, &data));
                        issued += 1;
                    }
                }
                Ok(start.elapsed())
            }),
            Driver::Burst { subscribers, tally, .. } => {
                let target = tally.borrow().accounted() + *subscribers * units;
                self.rt.block_on(async move {
                    let start = Instant::now();
                    client.burst(dombus::context::current(), units).await.map_err(rpc_error)?;
                    match tokio::time::timeout(BURST_TIMEOUT, tally.wait_for(|t| t.accounted() >= target))
                        .await
                    {
                        Ok(Ok(_)) => Ok(start.elapsed()),
                        Ok(Err(_)) => Err(io::Error::other("every subscriber ended")),
                        Err(_) => Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "a burst did not reach every subscriber",
                        )),
                    }
                })
            }
            Driver::Paced(_) => {
                Err(io::Error::new(io::ErrorKind::Unsupported, "paced events are a latency benchmark"))
            }
        }
    }

    /// What the subscribers of a [`Mode::Burst`] instance have counted so far.
    pub fn tally(&self) -> Option<Tally> {
        match &self.driver {
            Driver::Burst { tally, .. } => Some(*tally.borrow()),
            _ => None,
        }
    }
}

/// One echo call, checked.
async fn echo(client: &TicksClient, data: &[u8]) -> io::Result<()> {
    let back = client.echo(dombus::context::current(), data.to_vec()).await.map_err(rpc_error)?;
    if back == data { Ok(()) } else { Err(io::Error::other("the peer echoed the wrong bytes")) }
}

/// Starts `k` subscriptions of [`Ticks::events`], each counting into one [`Tally`], and waits
/// until every one has started.
async fn subscribe(client: &TicksClient, k: usize) -> io::Result<Driver> {
    let (tx, mut rx) = watch::channel(Tally::default());
    let tx = Arc::new(tx);
    for _ in 0..k {
        let mut sub = client.events().max_events(MAX_BATCH_EVENTS).wait(POLL_WAIT);
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(update) = sub.next().await {
                let last = update.as_ref().is_err_and(dombus::rpc::events::is_final);
                tx.send_modify(|t| t.count(&update));
                if last {
                    break;
                }
            }
        });
    }
    let k64 = k as u64;
    rx.wait_for(|t| t.started >= k64).await.map_err(|_| io::Error::other("the subscribers ended"))?;
    Ok(Driver::Burst { subscribers: k64, tally: rx })
}

impl PingPong for EventsBench {
    /// [`Mode::Call`]: `n` calls one at a time, each timed from call to answer. [`Mode::Paced`]:
    /// `n` events, each timed from its stamp to the subscription yielding it. In a task of its
    /// own, as an application's would be.
    fn run(&mut self, n: u64, samples: Option<&mut Vec<Duration>>) -> io::Result<Duration> {
        let keep = samples.is_some();
        let (elapsed, laps) = match &mut self.driver {
            Driver::Call => {
                let client = self.client.clone();
                let task = self.rt.spawn(async move {
                    let data = vec![1u8; PAYLOAD];
                    let mut out = Vec::new();
                    let mut laps = crate::Laps::start(keep.then_some(&mut out));
                    for _ in 0..n {
                        echo(&client, &data).await?;
                        laps.lap();
                    }
                    let elapsed = laps.elapsed();
                    Ok::<_, io::Error>((elapsed, out))
                });
                self.rt.block_on(task).map_err(io::Error::other)??
            }
            Driver::Paced(slot) => {
                let mut sub = slot.take().ok_or_else(|| io::Error::other("a previous run failed"))?;
                let task = self.rt.spawn(async move {
                    let start = Instant::now();
                    let mut out = Vec::new();
                    let mut result = Ok(());
                    for _ in 0..n {
                        match sub.next().await {
                            Some(Ok(Update::Event { event, .. })) => {
                                let now = monotonic_ns();
                                if keep {
                                    out.push(Duration::from_nanos(now.saturating_sub(event.stamp_ns)));
                                }
                            }
                            other => {
                                result = Err(io::Error::other(format!("paced subscription: {other:?}")));
                                break;
                            }
                        }
                    }
                    (sub, result.map(|()| (start.elapsed(), out)))
                });
                let (sub, result) = self.rt.block_on(task).map_err(io::Error::other)?;
                *slot = Some(sub);
                result?
            }
            Driver::Burst { .. } => {
                return Err(io::Error::new(io::ErrorKind::Unsupported, "a burst is a throughput benchmark"));
            }
        };
        if let Some(s) = samples {
            s.extend(laps);
        }
        Ok(elapsed)
    }

    fn peer(&self) -> &PeerProcess {
        &self.peer
    }
}

/// Voluntary context switches (a thread blocked, then was woken) of one process, all threads.
#[derive(Debug, Clone, Copy)]
pub struct ContextSwitches {
    pid: Option<u32>,
}

impl ContextSwitches {
    /// This process's.
    pub fn own() -> ContextSwitches {
        ContextSwitches { pid: None }
    }

    /// Process `pid`'s.
    pub fn of(pid: u32) -> ContextSwitches {
        ContextSwitches { pid: Some(pid) }
    }

    /// The sum over the process's threads now (`/proc/<pid>/task/*/status`).
    pub fn count(&self) -> io::Result<u64> {
        let dir = match self.pid {
            Some(pid) => format!("/proc/{pid}/task"),
            None => "/proc/self/task".to_string(),
        };
        let mut total = 0u64;
        for task in std::fs::read_dir(dir)? {
            // A thread may exit between listing and reading.
            let Ok(status) = std::fs::read_to_string(task?.path().join("status")) else { continue };
            total += voluntary_switches(&status).unwrap_or(0);
        }
        Ok(total)
    }
}

/// The `voluntary_ctxt_switches` figure of a `/proc/.../status` text.
fn voluntary_switches(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Wake-ups per operation of one instance: (parent, peer) voluntary context switches per call
/// or event over `n` operations, after the instance's own warm-up.
pub fn wakeups_per_op(bench: &mut EventsBench, n: u64) -> io::Result<(f64, f64)> {
    let (own, peer) = (ContextSwitches::own(), ContextSwitches::of(bench.peer.id()));
    let (a0, b0) = (own.count()?, peer.count()?);
    bench.run(n, None)?;
    let (a1, b1) = (own.count()?, peer.count()?);
    let n = n.max(1) as f64;
    Ok((a1.saturating_sub(a0) as f64 / n, b1.saturating_sub(b0) as f64 / n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_arguments_round_trip() {
        for spin in [None, Some(Duration::from_micros(50))] {
            let a = ServerArgs { socket: "/tmp/a|b/s.sock".into(), spin, ring: 4096 };
            assert_eq!(ServerArgs::decode(&a.encode()).ok(), Some(a));
        }
        assert!(ServerArgs::decode("-|0|/tmp/s").is_err());
        assert!(ServerArgs::decode("x|1|/tmp/s").is_err());
    }

    #[test]
    fn a_tick_encodes_to_the_payload_size() {
        let bytes = dombus::rpc::Codec::Bincode.encode(&Tick::now()).unwrap();
        assert_eq!(bytes.len(), PAYLOAD);
    }

    #[test]
    fn a_tally_counts_missed_events_as_accounted_for() {
        let mut t = Tally::default();
        let c = dombus::Cursor { epoch: 1, seq: 1 };
        t.count::<()>(&Ok(Update::Resync { cursor: c, reason: ResyncReason::Start, snapshot: None }));
        t.count::<()>(&Ok(Update::Event { cursor: c, event: Tick::now() }));
        t.count::<()>(&Ok(Update::Resync {
            cursor: c,
            reason: ResyncReason::Missed { count: 5 },
            snapshot: None,
        }));
        t.count::<()>(&Ok(Update::Resync { cursor: c, reason: ResyncReason::UnknownCursor, snapshot: None }));
        assert_eq!(Tally { started: 1, delivered: 1, missed: 5, resyncs: 1, errors: 0 }, t);
        assert_eq!(t.accounted(), 6);
    }

    #[test]
    fn voluntary_switches_are_read_from_status() {
        let status = "Name:\tx\nvoluntary_ctxt_switches:\t42\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(voluntary_switches(status), Some(42));
        assert_eq!(voluntary_switches("Name:\tx\n"), None);
        assert!(ContextSwitches::own().count().unwrap() > 0);
    }
}
