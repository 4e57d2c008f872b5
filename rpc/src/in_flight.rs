//! The bound on one connection's calls in flight: calls the server has read and not yet
//! answered — running, or their reply waiting to be written. At the bound the server stops
//! reading the connection until replies drain (backpressure, not an error): a client that sends
//! calls and never reads the replies makes the server hold at most this many, not every call it
//! sends.
//!
//! Each call read takes a [`Ticket`], which travels with it — into the handler, then inside its
//! reply — and gives its place back when dropped: once the reply is in the connection's write
//! buffer, or when the call ends without one (cancelled, past its deadline, a duplicate id, the
//! connection gone). So everything the server keeps per call (tarpc's in-flight map entry, the
//! handler's future, the reply in tarpc's queue or in a future waiting to queue it) lives no
//! longer than its ticket.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;

use crate::metrics::Metrics;

/// One connection's calls in flight, counted and weighed.
#[derive(Debug)]
pub(crate) struct InFlight {
    calls: AtomicUsize,
    bytes: AtomicUsize,
    max_calls: usize,
    max_bytes: usize,
    /// The connection's reader, waiting for room.
    reader: AtomicWaker,
    /// Most calls in flight so far.
    peak: AtomicUsize,
    metrics: Metrics,
}

impl InFlight {
    /// At most `max_calls` calls, reading stopping once they weigh `max_bytes` (each at least 1:
    /// one call can always be read when none is in flight).
    pub(crate) fn new(max_calls: usize, max_bytes: usize, metrics: Metrics) -> Arc<InFlight> {
        Arc::new(InFlight {
            calls: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            max_calls: max_calls.max(1),
            max_bytes: max_bytes.max(1),
            reader: AtomicWaker::new(),
            peak: AtomicUsize::new(0),
            metrics,
        })
    }

    fn full(&self) -> bool {
        self.calls.load(Ordering::SeqCst) >= self.max_calls
            || self.bytes.load(Ordering::SeqCst) >= self.max_bytes
    }

    /// Ready when another call may be read; otherwise the reader is woken when one may.
    pub(crate) fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.full() {
            return Poll::Ready(());
        }
        self.reader.register(cx.waker());
        // Checked again after registering: a ticket dropped in between has woken nobody.
        if self.full() { Poll::Pending } else { Poll::Ready(()) }
    }

    /// Takes a ticket for a call that came in a frame of `bytes`.
    pub(crate) fn admit(self: &Arc<Self>, bytes: usize) -> Ticket {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        self.bytes.fetch_add(bytes, Ordering::SeqCst);
        if self.peak.fetch_max(n, Ordering::Relaxed) < n {
            self.metrics.in_flight(n);
        }
        Ticket { in_flight: self.clone(), bytes }
    }

    /// Calls in flight now.
    #[cfg(test)]
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// A call's place among its connection's calls in flight; given back when dropped.
#[derive(Debug)]
pub(crate) struct Ticket {
    in_flight: Arc<InFlight>,
    bytes: usize,
}

impl Ticket {
    /// The call now weighs `bytes` (its reply's, once it has one).
    pub(crate) fn reweigh(&mut self, bytes: usize) {
        let counter = &self.in_flight.bytes;
        counter.fetch_add(bytes, Ordering::SeqCst);
        counter.fetch_sub(self.bytes, Ordering::SeqCst);
        let lighter = bytes < self.bytes;
        self.bytes = bytes;
        if lighter {
            self.in_flight.reader.wake();
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        self.in_flight.calls.fetch_sub(1, Ordering::SeqCst);
        self.in_flight.bytes.fetch_sub(self.bytes, Ordering::SeqCst);
        self.in_flight.reader.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::noop_waker_ref;

    #[test]
    fn room_until_the_count_or_the_weight_is_reached_and_again_when_tickets_go() {
        let f = InFlight::new(2, 100, Metrics::new("server"));
        let mut cx = Context::from_waker(noop_waker_ref());
        let a = f.admit(10);
        assert!(f.poll_room(&mut cx).is_ready());
        let mut b = f.admit(10);
        assert!(f.poll_room(&mut cx).is_pending(), "two calls: the count");
        drop(a);
        assert!(f.poll_room(&mut cx).is_ready());
        b.reweigh(100);
        assert!(f.poll_room(&mut cx).is_pending(), "100 bytes: the weight");
        b.reweigh(0);
        assert!(f.poll_room(&mut cx).is_ready());
        drop(b);
        assert_eq!(f.calls(), 0);
        assert_eq!(f.metrics.connections().in_flight_peak, 2);
    }

    #[test]
    fn bounds_of_zero_still_let_one_call_in_at_a_time() {
        let f = InFlight::new(0, 0, Metrics::new("server"));
        let mut cx = Context::from_waker(noop_waker_ref());
        assert!(f.poll_room(&mut cx).is_ready());
        let t = f.admit(0);
        assert!(f.poll_room(&mut cx).is_pending());
        drop(t);
        assert!(f.poll_room(&mut cx).is_ready());
    }

    #[test]
    fn a_ticket_given_back_wakes_the_waiting_reader() {
        use std::sync::atomic::AtomicBool;
        use std::task::Wake;
        struct Flag(AtomicBool);
        impl Wake for Flag {
            fn wake(self: Arc<Self>) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = std::task::Waker::from(flag.clone());
        let f = InFlight::new(1, usize::MAX, Metrics::new("server"));
        let t = f.admit(1);
        assert!(f.poll_room(&mut Context::from_waker(&waker)).is_pending());
        std::thread::spawn(move || drop(t)).join().unwrap();
        assert!(flag.0.load(Ordering::SeqCst));
        assert!(f.poll_room(&mut Context::from_waker(&waker)).is_ready());
    }
}
