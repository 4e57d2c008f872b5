//! Loom model check of the link's wake-up protocol: no notification is ever lost.
//!
//! Two [`Endpoint`]s share one control page made of loom atomics; the ring bytes are loom
//! `UnsafeCell`s, so loom also reports a data race if a byte is read before the index that
//! publishes it was acquired (or overwritten before the reader released it). The event channel is
//! one channel with two ends, modelled as two ports (a pending flag under a loom `Mutex` with a
//! `Condvar`): notifying one end sets its pending flag and wakes it; sleeping on an end waits
//! until its flag is set, then clears it — as an event-channel port with the mask/unmask dance.
//!
//! A producer thread sends a message larger than the ring (so it must sleep for space), a
//! consumer thread receives it (so it must sleep for data), both following the shell's contract:
//! notify when an operation says so, and sleep only when `prepare_wait_*` says `Sleep`. Loom
//! explores the interleavings and memory orderings; a lost wake-up leaves both threads blocked,
//! which loom reports as a deadlock. Each check also counts, over all executions, how often each
//! thread went to sleep, and fails if either sleeping path was never explored.
//!
//! The negative controls must deadlock: a reader that sleeps without the re-check, one that
//! sleeps without asking to be notified, and the correct shells over memory whose `full_fence`
//! is a no-op (the store-buffering pair needs the barrier; loom models `SeqCst` fences exactly
//! enough to tell).
//!
//! Rings are 4 bytes (order 2: `Endpoint` and the ring arithmetic take any power of two; only
//! the control-page validation insists on 10..=20) to keep the state space small; one test uses
//! the smallest real order (10) with a 1 300-byte message. Preemption bounds are 2 or 3 per test
//! (`LOOM_MAX_PREEMPTIONS` overrides them); see docs/fuzzing.md for times and deeper runs.
#![allow(clippy::unwrap_used)]

use dombus_transport_xen::layout::{self, RingOrders};
use dombus_transport_xen::link::endpoint::{Endpoint, RecvStatus, Wait};
use dombus_transport_xen::shmem::SharedMem;
use loom::cell::UnsafeCell;
use loom::sync::atomic::{AtomicU8, AtomicU32, Ordering, fence};
use loom::sync::{Condvar, Mutex};
use std::sync::Arc;

/// Bytes of the control page that the endpoint touches: five words, then four bytes.
const CTL_LEN: usize = layout::GRANTS;
/// The first byte-sized field (`cli_live`).
const BYTES_AT: usize = layout::CLI_LIVE;

/// The shared memory of one link: the control-page header and the two rings.
struct Shared {
    /// Offsets 0..20: the four indices and the orders word.
    words: Vec<AtomicU32>,
    /// Offsets 20..24: the live and notify bytes (separate locations, as on real hardware).
    bytes: Vec<AtomicU8>,
    /// Ring data: left (client to server), right (server to client).
    rings: [Vec<UnsafeCell<u8>>; 2],
    /// Whether `full_fence` is a `SeqCst` fence (false only in the negative control).
    fences: bool,
}

// SAFETY: the atomics are Sync; the ring cells are only accessed as the ring protocol allows
// (each byte by one side at a time, ordered by the Acquire/Release indices), and loom's
// UnsafeCell checks exactly that at run time: an access without a happens-before edge to the
// previous conflicting one panics with a causality violation instead of racing.
unsafe impl Sync for Shared {}

impl Shared {
    fn new(ring_len: usize, fences: bool) -> Shared {
        let cells = || (0..ring_len).map(|_| UnsafeCell::new(0u8)).collect();
        Shared {
            words: (0..BYTES_AT / 4).map(|_| AtomicU32::new(0)).collect(),
            bytes: (BYTES_AT..CTL_LEN).map(|_| AtomicU8::new(0)).collect(),
            rings: [cells(), cells()],
            fences,
        }
    }
}

/// Which part of [`Shared`] a [`Mem`] views.
#[derive(Debug, Clone, Copy)]
enum Part {
    Control,
    Ring(usize),
}

/// A [`SharedMem`] view of the control page or one ring.
#[derive(Clone)]
struct Mem {
    shared: Arc<Shared>,
    part: Part,
}

impl std::fmt::Debug for Mem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mem({:?})", self.part)
    }
}

impl Mem {
    fn word(&self, off: usize) -> &AtomicU32 {
        assert!(matches!(self.part, Part::Control), "u32 access to {self:?}");
        assert!(off % 4 == 0 && off < BYTES_AT, "u32 access at {off} is not an index or orders word");
        &self.shared.words[off / 4]
    }

    fn byte(&self, off: usize) -> &AtomicU8 {
        assert!(matches!(self.part, Part::Control), "u8 access to {self:?}");
        assert!((BYTES_AT..CTL_LEN).contains(&off), "u8 access at {off} is not a live or notify byte");
        &self.shared.bytes[off - BYTES_AT]
    }

    fn cells(&self, off: usize, n: usize) -> &[UnsafeCell<u8>] {
        let Part::Ring(i) = self.part else { panic!("byte copy from {self:?}") };
        let ring = &self.shared.rings[i];
        assert!(off.checked_add(n).is_some_and(|end| end <= ring.len()), "{off}+{n} outside {self:?}");
        &ring[off..off + n]
    }
}

impl SharedMem for Mem {
    fn len(&self) -> usize {
        match self.part {
            Part::Control => CTL_LEN,
            Part::Ring(i) => self.shared.rings[i].len(),
        }
    }
    fn load_u32(&self, off: usize) -> u32 {
        self.word(off).load(Ordering::Acquire)
    }
    fn store_u32(&self, off: usize, val: u32) {
        self.word(off).store(val, Ordering::Release)
    }
    fn load_u8(&self, off: usize) -> u8 {
        self.byte(off).load(Ordering::Acquire)
    }
    fn store_u8(&self, off: usize, val: u8) {
        self.byte(off).store(val, Ordering::Release)
    }
    fn fetch_or_u8(&self, off: usize, val: u8) -> u8 {
        self.byte(off).fetch_or(val, Ordering::SeqCst)
    }
    fn fetch_and_u8(&self, off: usize, val: u8) -> u8 {
        self.byte(off).fetch_and(val, Ordering::SeqCst)
    }
    fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        let cells = self.cells(off, dst.len());
        for (d, cell) in dst.iter_mut().zip(cells) {
            // SAFETY: a plain read of a u8 the cell owns; loom checks that no write to this cell
            // is concurrent with (not ordered before) the read.
            *d = cell.with(|p| unsafe { *p });
        }
    }
    fn write_bytes(&self, off: usize, src: &[u8]) {
        for (s, cell) in src.iter().zip(self.cells(off, src.len())) {
            // SAFETY: a plain write of a u8 the cell owns; loom checks that no other access to
            // this cell is concurrent with (not ordered before) the write.
            cell.with_mut(|p| unsafe { *p = *s });
        }
    }
    fn full_fence(&self) {
        if self.shared.fences {
            fence(Ordering::SeqCst)
        }
    }
}

/// One end of the event channel: a pending flag, set by the other end's notify.
struct Port {
    pending: Mutex<bool>,
    wake: Condvar,
}

impl Port {
    fn new() -> Port {
        Port { pending: Mutex::new(false), wake: Condvar::new() }
    }

    /// The other end signals this one.
    fn notify(&self) {
        *self.pending.lock().unwrap() = true;
        self.wake.notify_one();
    }

    /// Blocks until this end has a pending event, and consumes it.
    fn wait(&self) {
        let mut pending = self.pending.lock().unwrap();
        while !*pending {
            pending = self.wake.wait(pending).unwrap();
        }
        *pending = false;
    }
}

/// How the sleeping side treats the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shell {
    /// Sleep only when `prepare_wait_*` says `Sleep` (the contract).
    Correct,
    /// Negative control: call `prepare_wait_recv` but sleep even when it says `Retry`.
    SleepWithoutRecheck,
    /// Negative control: sleep on an empty ring without asking the writer to notify.
    SleepWithoutRequest,
}

/// Which way the data flows.
#[derive(Debug, Clone, Copy)]
enum Flow {
    ClientToServer,
    ServerToClient,
}

#[derive(Debug, Clone, Copy)]
struct Scenario {
    /// Ring order of both rings.
    order: u32,
    /// Total bytes sent.
    total: usize,
    /// Largest single send.
    send_chunk: usize,
    /// Largest single receive.
    recv_chunk: usize,
    flow: Flow,
    /// Whether the producer ends with `shutdown_write` and the consumer reads to end-of-stream
    /// (otherwise the consumer stops after `total` bytes).
    shutdown: bool,
    consumer: Shell,
    /// False turns `full_fence` into a no-op (negative control).
    fences: bool,
    preemption_bound: Option<usize>,
}

/// Counts over all explored executions (plain std atomics, outside the model), to show that
/// both sleeping paths were actually explored.
#[derive(Default)]
struct Stats {
    executions: std::sync::atomic::AtomicUsize,
    writer_slept: std::sync::atomic::AtomicUsize,
    reader_slept: std::sync::atomic::AtomicUsize,
}

impl Stats {
    fn bump(counter: &std::sync::atomic::AtomicUsize) {
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    fn get(counter: &std::sync::atomic::AtomicUsize) -> usize {
        counter.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// One side's share of the link: its endpoint, its end of the event channel, the other end.
struct Party {
    ep: Endpoint<Mem>,
    own: Arc<Port>,
    peer: Arc<Port>,
}

fn message(total: usize) -> Vec<u8> {
    (0..total).map(|i| (i as u8).wrapping_mul(37).wrapping_add(1)).collect()
}

fn producer(mut p: Party, sc: Scenario, stats: &Stats) {
    let msg = message(sc.total);
    let mut sent = 0;
    while sent < msg.len() {
        let end = msg.len().min(sent + sc.send_chunk);
        let t = p.ep.send(&msg[sent..end]).unwrap();
        if t.notify {
            p.peer.notify();
        }
        if t.bytes > 0 {
            sent += t.bytes;
            continue;
        }
        match p.ep.prepare_wait_send().unwrap() {
            Wait::Sleep => {
                Stats::bump(&stats.writer_slept);
                p.own.wait();
            }
            Wait::Retry => {}
        }
    }
    if sc.shutdown && p.ep.shutdown_write().unwrap() {
        p.peer.notify();
    }
}

fn consumer(mut p: Party, sc: Scenario, stats: &Stats) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; sc.recv_chunk];
    loop {
        if !sc.shutdown && got.len() == sc.total {
            break;
        }
        match p.ep.recv(&mut buf).unwrap() {
            RecvStatus::Data(t) => {
                got.extend_from_slice(&buf[..t.bytes]);
                if t.notify {
                    p.peer.notify();
                }
            }
            RecvStatus::Eof => break,
            RecvStatus::Empty { notify } => {
                if notify {
                    p.peer.notify();
                }
                let sleep = match sc.consumer {
                    Shell::Correct => p.ep.prepare_wait_recv().unwrap() == Wait::Sleep,
                    Shell::SleepWithoutRecheck => {
                        let _ = p.ep.prepare_wait_recv().unwrap();
                        true
                    }
                    Shell::SleepWithoutRequest => true,
                };
                if sleep {
                    Stats::bump(&stats.reader_slept);
                    p.own.wait();
                }
            }
        }
    }
    got
}

fn check(sc: Scenario) {
    let mut builder = loom::model::Builder::new();
    // An explicit LOOM_MAX_PREEMPTIONS in the environment wins over the scenario's bound.
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = sc.preemption_bound;
    }
    let stats = Arc::new(Stats::default());
    let counts = stats.clone();
    builder.check(move || {
        Stats::bump(&stats.executions);
        let shared = Arc::new(Shared::new(1 << sc.order, sc.fences));
        let ctl = Mem { shared: shared.clone(), part: Part::Control };
        let left = Mem { shared: shared.clone(), part: Part::Ring(0) };
        let right = Mem { shared: shared.clone(), part: Part::Ring(1) };
        let orders = RingOrders { left: sc.order, right: sc.order };
        let server = Endpoint::init_server(ctl.clone(), left.clone(), right.clone(), orders);
        assert_eq!(ctl.load_u32(layout::ORDERS), orders.control_word());
        let client = Endpoint::join_client(ctl, left, right, orders);
        // One event channel, two ends.
        let to_server = Arc::new(Port::new());
        let to_client = Arc::new(Port::new());
        let (tx, rx) = match sc.flow {
            Flow::ClientToServer => (
                Party { ep: client, own: to_client.clone(), peer: to_server.clone() },
                Party { ep: server, own: to_server, peer: to_client },
            ),
            Flow::ServerToClient => (
                Party { ep: server, own: to_server.clone(), peer: to_client.clone() },
                Party { ep: client, own: to_client, peer: to_server },
            ),
        };
        let writer_stats = stats.clone();
        let writer = loom::thread::spawn(move || producer(tx, sc, &writer_stats));
        let got = consumer(rx, sc, &stats);
        writer.join().unwrap();
        assert_eq!(got, message(sc.total), "bytes lost, duplicated or reordered");
    });
    let (runs, ws, rs) =
        (Stats::get(&counts.executions), Stats::get(&counts.writer_slept), Stats::get(&counts.reader_slept));
    println!(
        "{sc:?} (preemption bound in force: {:?}): {runs} executions; writer went to sleep {ws} times, reader {rs} times",
        builder.preemption_bound
    );
    assert!(ws > 0 && rs > 0, "{sc:?}: a sleeping path was never explored ({ws} writer, {rs} reader sleeps)");
}

/// Client writes 10 bytes through a 4-byte ring in chunks of 3 and shuts down; the server reads
/// 2 at a time to end-of-stream. Both the reader and the writer have to sleep.
#[test]
fn client_to_server_no_lost_wakeup() {
    check(Scenario {
        order: 2,
        total: 10,
        send_chunk: 3,
        recv_chunk: 2,
        flow: Flow::ClientToServer,
        shutdown: true,
        fences: true,
        consumer: Shell::Correct,
        preemption_bound: Some(2),
    });
}

/// The same the other way (the server's notify bytes and the right ring).
#[test]
fn server_to_client_no_lost_wakeup() {
    check(Scenario {
        order: 2,
        total: 9,
        send_chunk: 4,
        recv_chunk: 3,
        flow: Flow::ServerToClient,
        shutdown: false,
        fences: true,
        consumer: Shell::Correct,
        preemption_bound: Some(3),
    });
}

/// The smallest real ring (order 10, 1 KiB) and a 1 300-byte message: one send fills the ring,
/// the writer must wait for the reader to free space for the last 276 bytes.
#[test]
fn real_order_ring_no_lost_wakeup() {
    check(Scenario {
        order: 10,
        total: 1300,
        send_chunk: 1300,
        recv_chunk: 1024,
        flow: Flow::ClientToServer,
        shutdown: true,
        fences: true,
        consumer: Shell::Correct,
        preemption_bound: Some(3),
    });
}

/// Negative control: a reader that ignores `Retry` sleeps on data that is already there after
/// the writer has finished. Loom must find the deadlock.
#[test]
#[should_panic(expected = "deadlock")]
fn negative_control_sleep_without_recheck_deadlocks() {
    check(Scenario {
        order: 2,
        total: 6,
        send_chunk: 3,
        recv_chunk: 2,
        flow: Flow::ClientToServer,
        shutdown: false,
        fences: true,
        consumer: Shell::SleepWithoutRecheck,
        preemption_bound: Some(2),
    });
}

/// Negative control: a reader that never asks to be notified sleeps forever once the request
/// made at connection time has been used up.
#[test]
#[should_panic(expected = "deadlock")]
fn negative_control_sleep_without_request_deadlocks() {
    check(Scenario {
        order: 2,
        total: 6,
        send_chunk: 3,
        recv_chunk: 2,
        flow: Flow::ClientToServer,
        shutdown: false,
        fences: true,
        consumer: Shell::SleepWithoutRequest,
        preemption_bound: Some(2),
    });
}

/// Negative control for the memory model: with `full_fence` a no-op, the writer's "index store,
/// then plain load of the notify byte" (`clear_own`'s fast path) and the reader's "notify-byte
/// RMW, then load of the index" form a store-buffering pair without a barrier; loom lets both
/// loads see the old values, so the reader sleeps and the writer does not notify. (If
/// `clear_own` went back to an unconditional `fetch_and`, the RMWs on the one notify byte would
/// order the pair by themselves and this test would stop panicking: that is a change in what the
/// barrier is needed for, not a lost wake-up.)
#[test]
#[should_panic(expected = "deadlock")]
fn negative_control_without_barrier_deadlocks() {
    check(Scenario {
        order: 2,
        total: 9,
        send_chunk: 4,
        recv_chunk: 3,
        flow: Flow::ServerToClient,
        shutdown: false,
        fences: false,
        consumer: Shell::Correct,
        preemption_bound: Some(2),
    });
}
