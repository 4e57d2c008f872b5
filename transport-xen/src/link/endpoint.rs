//! One side of a link as a pure state machine over [`SharedMem`] (no syscalls, no async).
//!
//! The shell that owns an [`Endpoint`] performs the event-channel operations it asks for: every
//! operation returns whether the peer must be sent an event, and the `prepare_wait_*` calls say
//! whether it is safe to sleep. This is libxenvchan's protocol:
//!
//! * after writing, clear [`NOTIFY_WRITE`] in our own notify byte; signal only if it was set;
//! * after reading, clear [`NOTIFY_READ`] likewise;
//! * before sleeping for data (space), set `NOTIFY_WRITE` (`NOTIFY_READ`) in the *peer's* notify
//!   byte, issue a full barrier, and look at the ring again: the peer either sees our request or
//!   we see its update (Dekker), so no wake-up is lost.

use crate::layout::{self, Live, NOTIFY_READ, NOTIFY_WRITE, RingOrders, SHUT_WR};
use crate::ring::{Consumer, PeerMisbehaved, Producer};
use crate::shmem::SharedMem;

/// Which end of the link this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Granted the pages and published them in the store.
    Server,
    /// Mapped the server's pages.
    Client,
}

/// Why an endpoint operation could not proceed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointError {
    /// The peer broke the protocol; the link must be closed.
    #[error("peer broke the link protocol: {0}")]
    Misbehaved(#[from] PeerMisbehaved),
    /// The peer closed the link or died without shutting down its write half.
    #[error("peer closed the link or died")]
    PeerGone,
    /// This side already closed the link.
    #[error("link already closed locally")]
    Closed,
    /// This side shut down its write half.
    #[error("link shut down for writing")]
    WriteShut,
}

/// Outcome of a read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes moved.
    pub bytes: usize,
    /// The peer asked to be signalled: the shell must notify the event channel.
    pub notify: bool,
}

/// Outcome of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecvStatus {
    /// Bytes were read.
    Data(Transfer),
    /// Nothing to read yet. `notify`: the space freed by earlier reads was just published and
    /// the peer waits for it — the shell must notify the event channel.
    Empty {
        /// The peer asked to be signalled.
        notify: bool,
    },
    /// The peer shut down its write half (or closed cleanly after doing so): end of stream.
    Eof,
}

/// Whether a waiting side may sleep on the event channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Notification requested and the condition still holds: sleeping is safe.
    Sleep,
    /// Something changed meanwhile: retry the operation instead of sleeping.
    Retry,
}

/// One side of a link over shared memory `M`.
#[derive(Debug)]
pub struct Endpoint<M> {
    side: Side,
    ctl: M,
    tx_data: M,
    rx_data: M,
    tx: Producer,
    rx: Consumer,
    own_live: usize,
    peer_live: usize,
    own_notify: usize,
    peer_notify: usize,
    write_shut: bool,
    closed: bool,
    /// End of stream was reported once: it stays reported (a peer cannot take it back).
    peer_eof: bool,
    failure: Option<PeerMisbehaved>,
}

impl<M: SharedMem> Endpoint<M> {
    /// Initialises a fresh control page as the server (libxenvchan's `init_gnt_srv`): zeroed
    /// indices, orders, `cli_live = 2`, `srv_live = 1`, and a request to be told of client writes.
    /// Grant refs of ring pages are written by the caller.
    pub fn init_server(ctl: M, left_data: M, right_data: M, orders: RingOrders) -> Endpoint<M> {
        for off in [layout::LEFT_CONS, layout::LEFT_PROD, layout::RIGHT_CONS, layout::RIGHT_PROD] {
            ctl.store_u32(off, 0);
        }
        ctl.store_u32(layout::ORDERS, orders.control_word());
        ctl.store_u8(layout::CLI_NOTIFY, NOTIFY_WRITE);
        ctl.store_u8(layout::SRV_NOTIFY, 0);
        ctl.store_u8(layout::SRV_LIVE, Live::Connected as u8);
        ctl.store_u8(layout::CLI_LIVE, Live::Waiting as u8);
        Endpoint {
            side: Side::Server,
            tx: Producer::new(orders.right, layout::RIGHT_CONS, layout::RIGHT_PROD, 0),
            rx: Consumer::new(orders.left, layout::LEFT_CONS, layout::LEFT_PROD, 0),
            ctl,
            tx_data: right_data,
            rx_data: left_data,
            own_live: layout::SRV_LIVE,
            peer_live: layout::CLI_LIVE,
            own_notify: layout::SRV_NOTIFY,
            peer_notify: layout::CLI_NOTIFY,
            write_shut: false,
            closed: false,
            peer_eof: false,
            failure: None,
        }
    }

    /// Joins as the client over a mapped control page whose orders the caller has validated with
    /// [`RingOrders::from_control_word`]. Starting indices are read once from the page. Marks
    /// the client live and asks to be told of server writes; the caller then notifies the server.
    pub fn join_client(ctl: M, left_data: M, right_data: M, orders: RingOrders) -> Endpoint<M> {
        let left_prod = ctl.load_u32(layout::LEFT_PROD);
        let right_cons = ctl.load_u32(layout::RIGHT_CONS);
        let ep = Endpoint {
            side: Side::Client,
            tx: Producer::new(orders.left, layout::LEFT_CONS, layout::LEFT_PROD, left_prod),
            rx: Consumer::new(orders.right, layout::RIGHT_CONS, layout::RIGHT_PROD, right_cons),
            ctl,
            tx_data: left_data,
            rx_data: right_data,
            own_live: layout::CLI_LIVE,
            peer_live: layout::SRV_LIVE,
            own_notify: layout::CLI_NOTIFY,
            peer_notify: layout::SRV_NOTIFY,
            write_shut: false,
            closed: false,
            peer_eof: false,
            failure: None,
        };
        ep.ctl.store_u8(layout::CLI_LIVE, Live::Connected as u8);
        ep.ctl.store_u8(layout::SRV_NOTIFY, NOTIFY_WRITE);
        ep
    }

    /// Which side this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// Sizes of the (send, receive) rings in bytes.
    pub fn ring_sizes(&self) -> (u32, u32) {
        (self.tx.size(), self.rx.size())
    }

    /// The control-page memory.
    pub fn control(&self) -> &M {
        &self.ctl
    }

    /// The first protocol violation seen, if any (sticky).
    pub fn failure(&self) -> Option<&PeerMisbehaved> {
        self.failure.as_ref()
    }

    fn fail(&mut self, e: PeerMisbehaved) -> EndpointError {
        self.failure.get_or_insert(e.clone());
        EndpointError::Misbehaved(e)
    }

    fn check_usable(&self) -> Result<(), EndpointError> {
        if let Some(e) = &self.failure {
            return Err(EndpointError::Misbehaved(e.clone()));
        }
        if self.closed {
            return Err(EndpointError::Closed);
        }
        Ok(())
    }

    /// The peer's live state, read once.
    pub fn peer_live(&mut self) -> Result<Live, EndpointError> {
        let b = self.ctl.load_u8(self.peer_live);
        match Live::from_byte(b) {
            // The client never publishes "waiting"; only the server's initial value does.
            Ok(Live::Waiting) if self.side == Side::Client => Err(self.fail(PeerMisbehaved::BadLiveState(b))),
            Ok(l) => Ok(l),
            Err(e) => Err(self.fail(e)),
        }
    }

    /// Server: has the client connected? (`Ok(false)` while it has not.)
    pub fn client_connected(&mut self) -> Result<bool, EndpointError> {
        self.check_usable()?;
        match self.peer_live()? {
            Live::Waiting => Ok(false),
            Live::Connected => Ok(true),
            Live::Gone => Err(EndpointError::PeerGone),
        }
    }

    /// True once the peer has shut down its write half (the flag in its own notify byte).
    pub fn peer_shut_write(&self) -> bool {
        self.ctl.load_u8(self.peer_notify) & SHUT_WR != 0
    }

    /// True if waiting for data is pointless: the peer is gone or will write no more.
    pub fn peer_done(&mut self) -> bool {
        !matches!(self.peer_live(), Ok(Live::Connected | Live::Waiting)) || self.peer_shut_write()
    }

    /// Writes as much of `buf` as the ring takes.
    pub fn send(&mut self, buf: &[u8]) -> Result<Transfer, EndpointError> {
        self.transfer_out(|tx, ctl, data| tx.write(ctl, data, buf))
    }

    /// Writes all of `parts` if the ring has room for all of them, published at once (see
    /// [`Producer::write_whole`]); `bytes` is 0 if they do not fit.
    pub fn send_whole(&mut self, parts: &[&[u8]]) -> Result<Transfer, EndpointError> {
        self.transfer_out(|tx, ctl, data| tx.write_whole(ctl, data, parts))
    }

    /// Runs one write into the send ring, if this side may still write and the peer is there,
    /// and says whether the peer asked to be told of it.
    fn transfer_out(
        &mut self,
        write: impl FnOnce(&mut Producer, &M, &M) -> Result<usize, PeerMisbehaved>,
    ) -> Result<Transfer, EndpointError> {
        self.check_usable()?;
        if self.write_shut {
            return Err(EndpointError::WriteShut);
        }
        if self.peer_live()? == Live::Gone {
            return Err(EndpointError::PeerGone);
        }
        let bytes = match write(&mut self.tx, &self.ctl, &self.tx_data) {
            Ok(n) => n,
            Err(e) => return Err(self.fail(e)),
        };
        let notify = bytes > 0 && self.clear_own(NOTIFY_WRITE);
        Ok(Transfer { bytes, notify })
    }

    /// Reads up to `buf.len()` bytes.
    pub fn recv(&mut self, buf: &mut [u8]) -> Result<RecvStatus, EndpointError> {
        self.check_usable()?;
        if buf.is_empty() {
            return Ok(RecvStatus::Empty { notify: false });
        }
        if let Some(t) = self.read_ring(buf)? {
            return Ok(RecvStatus::Data(t));
        }
        // Empty. Look at the peer's live byte and shutdown flag, then at the ring once more: a
        // peer publishes its data before it sets either, so having seen them we also see all
        // the data it wrote before.
        let live = self.peer_live()?;
        let shut = self.peer_shut_write();
        if let Some(t) = self.read_ring(buf)? {
            return Ok(RecvStatus::Data(t));
        }
        // We are about to wait (or to tell the caller there is nothing): hand back all the
        // space read so far, so that a producer waiting for it is never stalled by us.
        let notify = self.publish_consumed()?;
        match live {
            _ if shut || self.peer_eof => {
                self.peer_eof = true;
                Ok(RecvStatus::Eof)
            }
            Live::Gone => Err(EndpointError::PeerGone),
            Live::Connected | Live::Waiting => Ok(RecvStatus::Empty { notify }),
        }
    }

    /// Copies ready bytes out of the receive ring; `None` if it is empty.
    ///
    /// The consumer index is published lazily: when a quarter of the ring has been read since
    /// the last publication, and whenever the ring is found empty (see [`Endpoint::recv`]).
    /// A producer therefore sees at most a quarter of the ring less free space than there is,
    /// and in request/response traffic the index store lands on the control-page cache line
    /// while we own it anyway (right after our own producer-index store), instead of costing a
    /// cache-line transfer of its own.
    fn read_ring(&mut self, buf: &mut [u8]) -> Result<Option<Transfer>, EndpointError> {
        let bytes = match self.rx.read_unpublished(&self.ctl, &self.rx_data, buf) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) => return Err(self.fail(e)),
        };
        let notify =
            if self.rx.unpublished() >= self.rx.size() / 4 { self.publish_consumed()? } else { false };
        Ok(Some(Transfer { bytes, notify }))
    }

    /// Publishes the consumer index; true if the producer waits for space and must be woken.
    fn publish_consumed(&mut self) -> Result<bool, EndpointError> {
        if !self.rx.publish(&self.ctl) {
            return Ok(false);
        }
        // Barrier between our consumer-index update and the look at the notify byte (the other
        // half of the Dekker pair in `prepare_wait_send`).
        self.ctl.full_fence();
        if self.ctl.load_u8(self.own_notify) & NOTIFY_READ == 0 {
            return Ok(false);
        }
        // The writer waits for space. Wake it only once half the ring is free (always the case
        // before we run dry), so that it writes a large batch per wake-up instead of a few
        // bytes per event. Reading the producer index again is validated as usual.
        let used = match self.rx.available(&self.ctl) {
            Ok(n) => n,
            Err(e) => return Err(self.fail(e)),
        };
        Ok(used <= self.rx.size() / 2
            && self.ctl.fetch_and_u8(self.own_notify, !NOTIFY_READ) & NOTIFY_READ != 0)
    }

    /// Bytes ready to read now (reads the peer's producer index once).
    pub fn readable(&mut self) -> Result<u32, EndpointError> {
        self.check_usable()?;
        self.rx.available(&self.ctl).map_err(|e| self.fail(e))
    }

    /// Bytes known to be in the receive ring from the last look at the peer's producer index,
    /// less those read since; reads no shared memory (the ring may hold more).
    pub fn seen_readable(&self) -> u32 {
        self.rx.seen_ready()
    }

    /// Free bytes in the send ring now (reads the peer's consumer index once).
    pub fn writable(&mut self) -> Result<u32, EndpointError> {
        self.check_usable()?;
        self.tx.space(&self.ctl).map_err(|e| self.fail(e))
    }

    /// Before sleeping for data: asks the peer to signal its next write, then re-checks.
    pub fn prepare_wait_recv(&mut self) -> Result<Wait, EndpointError> {
        self.check_usable()?;
        self.ctl.fetch_or_u8(self.peer_notify, NOTIFY_WRITE);
        self.ctl.full_fence();
        let live = self.peer_live()?;
        if self.readable()? > 0 || live == Live::Gone || self.peer_shut_write() {
            return Ok(Wait::Retry);
        }
        Ok(Wait::Sleep)
    }

    /// Before sleeping for space: asks the peer to signal its next read, then re-checks.
    pub fn prepare_wait_send(&mut self) -> Result<Wait, EndpointError> {
        self.check_usable()?;
        self.ctl.fetch_or_u8(self.peer_notify, NOTIFY_READ);
        self.ctl.full_fence();
        if self.writable()? > 0 || self.peer_live()? == Live::Gone {
            return Ok(Wait::Retry);
        }
        Ok(Wait::Sleep)
    }

    /// Server before sleeping for the client to connect: re-checks after the barrier.
    /// (The server asked for `NOTIFY_WRITE` at initialisation; the client always notifies once
    /// after it marks itself live.)
    pub fn prepare_wait_connect(&mut self) -> Result<Wait, EndpointError> {
        self.ctl.full_fence();
        Ok(if self.client_connected()? { Wait::Retry } else { Wait::Sleep })
    }

    /// Shuts down our write half: the peer reads end-of-stream once it has drained the ring.
    /// Returns true: the shell must notify (the peer may be sleeping for data).
    pub fn shutdown_write(&mut self) -> Result<bool, EndpointError> {
        self.check_usable()?;
        if !self.write_shut {
            self.write_shut = true;
            self.ctl.fetch_or_u8(self.own_notify, SHUT_WR);
        }
        Ok(true)
    }

    /// Closes our side: clears our live byte. Idempotent. Returns true if the shell must notify.
    pub fn close(&mut self) -> bool {
        if self.closed {
            return false;
        }
        self.closed = true;
        // Clean close: first say "no more data", then "gone", so the peer can tell a close from
        // a crash (where the hypervisor clears only the live byte).
        if !self.write_shut {
            self.write_shut = true;
            self.ctl.fetch_or_u8(self.own_notify, SHUT_WR);
        }
        self.ctl.store_u8(self.own_live, Live::Gone as u8);
        true
    }

    /// True once [`Endpoint::close`] ran.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Clears `bit` in our own notify byte; true if the peer had asked for it.
    ///
    /// The barrier orders our index update before the look at the notify byte (the other half
    /// of the Dekker pair in `prepare_wait_*`). A plain load first keeps the common case — the
    /// peer did not ask — free of a locked read-modify-write on the shared cache line.
    fn clear_own(&self, bit: u8) -> bool {
        self.ctl.full_fence();
        if self.ctl.load_u8(self.own_notify) & bit == 0 {
            return false;
        }
        self.ctl.fetch_and_u8(self.own_notify, !bit) & bit != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shmem::Region;

    fn link(orders: RingOrders) -> (Endpoint<Region>, Endpoint<Region>) {
        let page = Region::anonymous(4096);
        let left = page.sub(1024, 1024);
        let right = page.sub(2048, 2048);
        let srv = Endpoint::init_server(page.clone(), left.clone(), right.clone(), orders);
        let got = RingOrders::from_control_word(page.load_u32(layout::ORDERS)).unwrap();
        let cli = Endpoint::join_client(page, left, right, got);
        (srv, cli)
    }

    fn in_page() -> RingOrders {
        RingOrders::for_sizes(1024, 2048).unwrap()
    }

    #[test]
    fn bytes_flow_both_ways_with_requested_notifies_only() {
        let (mut s, mut c) = link(in_page());
        assert!(s.client_connected().unwrap());
        // The server asked (at init) to hear of client writes: first write notifies, second not.
        assert_eq!(c.send(b"ping").unwrap(), Transfer { bytes: 4, notify: true });
        assert_eq!(c.send(b"!").unwrap(), Transfer { bytes: 1, notify: false });
        let mut buf = [0u8; 16];
        assert!(matches!(s.recv(&mut buf).unwrap(), RecvStatus::Data(Transfer { bytes: 5, notify: false })));
        assert_eq!(&buf[..5], b"ping!");
        // The client asked (at join) to hear of server writes.
        assert_eq!(s.send(b"pong").unwrap(), Transfer { bytes: 4, notify: true });
        assert!(matches!(c.recv(&mut buf).unwrap(), RecvStatus::Data(Transfer { bytes: 4, .. })));
    }

    #[test]
    fn waiting_reader_is_notified_by_next_write() {
        let (mut s, mut c) = link(in_page());
        let mut buf = [0u8; 8];
        c.send(b"x").unwrap();
        s.recv(&mut buf).unwrap();
        assert_eq!(s.recv(&mut buf).unwrap(), RecvStatus::Empty { notify: false });
        assert_eq!(s.prepare_wait_recv().unwrap(), Wait::Sleep);
        assert!(c.send(b"y").unwrap().notify, "the sleeping server must be woken");
    }

    #[test]
    fn full_writer_is_notified_by_next_read() {
        let (mut s, mut c) = link(in_page());
        assert_eq!(c.send(&[0u8; 4096]).unwrap().bytes, 1024);
        assert_eq!(c.send(b"more").unwrap().bytes, 0);
        assert_eq!(c.prepare_wait_send().unwrap(), Wait::Sleep);
        let mut buf = [0u8; 600];
        match s.recv(&mut buf).unwrap() {
            RecvStatus::Data(t) => assert!(t.notify, "the blocked client must be woken"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn blocked_writer_is_woken_once_half_the_ring_is_free() {
        let (mut s, mut c) = link(in_page());
        assert_eq!(c.send(&[7u8; 1024]).unwrap().bytes, 1024);
        assert_eq!(c.prepare_wait_send().unwrap(), Wait::Sleep);
        let mut buf = [0u8; 100];
        let mut reads = 0;
        loop {
            match s.recv(&mut buf).unwrap() {
                RecvStatus::Data(t) if t.notify => break,
                RecvStatus::Data(_) => reads += 1,
                other => panic!("{other:?}"),
            }
        }
        // 1024-byte ring: no wake-up until at most 512 bytes remain (after the 6th read).
        assert_eq!(reads, 5);
        assert!(c.writable().unwrap() >= 512);
    }

    #[test]
    fn shutdown_gives_eof_after_data_and_close_is_distinct_from_crash() {
        let (mut s, mut c) = link(in_page());
        c.send(b"last").unwrap();
        c.shutdown_write().unwrap();
        assert_eq!(c.send(b"no"), Err(EndpointError::WriteShut));
        let mut buf = [0u8; 8];
        assert!(matches!(s.recv(&mut buf).unwrap(), RecvStatus::Data(_)));
        assert_eq!(s.recv(&mut buf).unwrap(), RecvStatus::Eof);
        // Server can still write to the half-closed client.
        assert_eq!(s.send(b"reply").unwrap().bytes, 5);
        c.close();
        assert_eq!(s.recv(&mut buf).unwrap(), RecvStatus::Eof);
        assert_eq!(s.send(b"x"), Err(EndpointError::PeerGone));

        // A crash: the hypervisor clears the live byte straight to 0.
        let (mut s, c) = link(in_page());
        c.control().store_u8(layout::CLI_LIVE, 0);
        assert_eq!(s.recv(&mut buf), Err(EndpointError::PeerGone));
    }

    #[test]
    fn scribbled_index_fails_the_endpoint_for_good() {
        let (mut s, c) = link(in_page());
        c.control().store_u32(layout::LEFT_PROD, 5000);
        let mut buf = [0u8; 8];
        let err = s.recv(&mut buf).unwrap_err();
        assert!(matches!(err, EndpointError::Misbehaved(PeerMisbehaved::ProducerOverrun { .. })));
        // Even if the peer repairs the index, the endpoint stays failed.
        c.control().store_u32(layout::LEFT_PROD, 0);
        assert_eq!(s.recv(&mut buf).unwrap_err(), err);
        assert!(s.failure().is_some());
    }

    #[test]
    fn shutdown_flag_survives_notify_traffic() {
        let (mut s, mut c) = link(in_page());
        c.shutdown_write().unwrap();
        // The server asks for notifications in the client's byte; the flag must stay.
        let mut buf = [0u8; 4];
        assert_eq!(s.recv(&mut buf).unwrap(), RecvStatus::Eof);
        s.prepare_wait_recv().unwrap();
        s.send(b"abc").unwrap();
        assert!(matches!(c.recv(&mut buf).unwrap(), RecvStatus::Data(_)));
        assert!(s.peer_shut_write());
        assert_eq!(s.recv(&mut buf).unwrap(), RecvStatus::Eof);
    }

    #[test]
    fn garbage_live_byte_is_a_named_violation() {
        let (mut s, c) = link(in_page());
        c.control().store_u8(layout::CLI_LIVE, 0x7f);
        assert_eq!(s.send(b"x"), Err(EndpointError::Misbehaved(PeerMisbehaved::BadLiveState(0x7f))));
    }
}
