//! Fuzz target: one link endpoint against a peer that writes arbitrary bytes into shared memory.
//!
//! The whole control page and both rings are writable by the peer in Xen, so *every* load the
//! endpoint makes (indices, live bytes, notify bytes, the orders word, grants, ring data) may
//! return a fresh value taken from the fuzzer input; our own stores are kept, and a value the
//! "peer" produced is kept too (it wrote it), so a later load may see it again. The input is one
//! stream: setup bytes, then operations interleaved with the values the peer writes. Once the
//! input runs out the peer goes quiet (loads return what is stored).
//!
//! Invariants: no panic; every access stays inside its region (checked here, as `Region` does);
//! a receive returns at most `buf.len()` and at most the ring size, a send at most the input length
//! and the ring size; `readable`/`writable` never exceed the ring size; once the endpoint reports
//! `Misbehaved` every later fallible operation returns exactly that error and `failure()` agrees;
//! after `close` operations return `Closed`, after `shutdown_write` sends return `WriteShut`, and
//! neither error comes before (the peer cannot cause them); a receive into an empty buffer on a
//! usable endpoint reports `Empty` without a notification.
#![no_main]

use std::cell::RefCell;
use std::rc::Rc;

use arbitrary::Unstructured;
use dombus_transport_xen::PeerMisbehaved;
use dombus_transport_xen::layout::{ORDERS, Placement, RingOrders};
use dombus_transport_xen::link::endpoint::{Endpoint, EndpointError, RecvStatus, Side};
use dombus_transport_xen::shmem::SharedMem;
use dombus_transport_xen::types::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;

/// Largest send or receive buffer the target uses.
const MAX_IO: usize = 10 * 1024;
/// Operations per input at most (keeps each run short).
const MAX_OPS: usize = 512;

/// The memory of one link: region 0 is the control page, 1 and 2 the left and right ring pages
/// (empty when that ring lives in the control page), plus the peer's input stream.
struct World<'a> {
    regions: RefCell<[Vec<u8>; 3]>,
    peer: RefCell<Unstructured<'a>>,
}

impl World<'_> {
    /// What the peer left at a u32 location: kept, replaced, or moved a little either way.
    fn peer_u32(&self, stored: u32) -> u32 {
        let mut u = self.peer.borrow_mut();
        match u.int_in_range(0u8..=3).unwrap_or(0) {
            0 => stored,
            1 => u.arbitrary::<u32>().unwrap_or(stored),
            2 => stored.wrapping_add(u32::from(u.arbitrary::<u16>().unwrap_or(0))),
            _ => stored.wrapping_sub(u32::from(u.arbitrary::<u8>().unwrap_or(0))),
        }
    }

    /// What the peer left in a byte: kept or replaced.
    fn peer_u8(&self, stored: u8) -> u8 {
        let mut u = self.peer.borrow_mut();
        if u.ratio(1u8, 2u8).unwrap_or(false) { u.arbitrary::<u8>().unwrap_or(stored) } else { stored }
    }

    /// Lets the peer scribble over a byte range (or leave it alone).
    fn peer_bytes(&self, bytes: &mut [u8]) {
        let mut u = self.peer.borrow_mut();
        if u.ratio(1u8, 2u8).unwrap_or(false) {
            // Short input leaves the rest of the range as it was.
            let take = bytes.len().min(u.len());
            if let Ok(src) = u.bytes(take) {
                bytes[..take].copy_from_slice(src);
            }
        }
    }
}

/// A view of `len` bytes at `base` of one region of the world.
#[derive(Clone)]
struct Mem<'a> {
    world: Rc<World<'a>>,
    region: usize,
    base: usize,
    len: usize,
}

impl std::fmt::Debug for Mem<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mem(region {} at {}+{})", self.region, self.base, self.len)
    }
}

impl Mem<'_> {
    /// Bounds check, as `Region` does: a failure is a bug in the crate, and a crash here.
    fn range(&self, off: usize, n: usize) -> std::ops::Range<usize> {
        assert!(
            off.checked_add(n).is_some_and(|end| end <= self.len),
            "shared-memory access {off}+{n} outside {self:?}"
        );
        let start = self.base + off;
        let backing = self.world.regions.borrow()[self.region].len();
        assert!(start + n <= backing, "{self:?} exceeds its backing of {backing} bytes");
        start..start + n
    }

    fn load_byte(&self, off: usize) -> u8 {
        let r = self.range(off, 1);
        let stored = self.world.regions.borrow()[self.region][r.start];
        let val = self.world.peer_u8(stored);
        self.world.regions.borrow_mut()[self.region][r.start] = val;
        val
    }

    fn store_byte(&self, off: usize, val: u8) {
        let r = self.range(off, 1);
        self.world.regions.borrow_mut()[self.region][r.start] = val;
    }
}

impl SharedMem for Mem<'_> {
    fn len(&self) -> usize {
        self.len
    }

    fn load_u32(&self, off: usize) -> u32 {
        assert!(off % 4 == 0, "unaligned u32 load at {off} of {self:?}");
        let r = self.range(off, 4);
        let stored = {
            let regions = self.world.regions.borrow();
            let b = &regions[self.region][r.clone()];
            u32::from_le_bytes([b[0], b[1], b[2], b[3]])
        };
        let val = self.world.peer_u32(stored);
        self.world.regions.borrow_mut()[self.region][r].copy_from_slice(&val.to_le_bytes());
        val
    }

    fn store_u32(&self, off: usize, val: u32) {
        assert!(off % 4 == 0, "unaligned u32 store at {off} of {self:?}");
        let r = self.range(off, 4);
        self.world.regions.borrow_mut()[self.region][r].copy_from_slice(&val.to_le_bytes());
    }

    fn load_u8(&self, off: usize) -> u8 {
        self.load_byte(off)
    }

    fn store_u8(&self, off: usize, val: u8) {
        self.store_byte(off, val)
    }

    fn fetch_or_u8(&self, off: usize, val: u8) -> u8 {
        let prev = self.load_byte(off);
        self.store_byte(off, prev | val);
        prev
    }

    fn fetch_and_u8(&self, off: usize, val: u8) -> u8 {
        let prev = self.load_byte(off);
        self.store_byte(off, prev & val);
        prev
    }

    fn read_bytes(&self, off: usize, dst: &mut [u8]) {
        let r = self.range(off, dst.len());
        let mut regions = self.world.regions.borrow_mut();
        let bytes = &mut regions[self.region][r];
        self.world.peer_bytes(bytes);
        dst.copy_from_slice(bytes);
    }

    fn write_bytes(&self, off: usize, src: &[u8]) {
        let r = self.range(off, src.len());
        self.world.regions.borrow_mut()[self.region][r].copy_from_slice(src);
    }

    fn full_fence(&self) {}
}

/// The memory for a ring of `order`: a view into the control page or its own pages.
fn ring_mem<'a>(world: &Rc<World<'a>>, region: usize, order: u32) -> Mem<'a> {
    let len = 1usize << order;
    match RingOrders::placement(order) {
        Placement::InPage(base) => {
            assert!(base + len <= PAGE_SIZE, "in-page ring {base}+{len}");
            Mem { world: world.clone(), region: 0, base, len }
        }
        Placement::Pages(n) => {
            assert_eq!(n * PAGE_SIZE, len, "{n} pages for order {order}");
            world.regions.borrow_mut()[region] = vec![0u8; len];
            Mem { world: world.clone(), region, base: 0, len }
        }
    }
}

/// What the target knows the endpoint's state must be.
#[derive(Default)]
struct Expect {
    failed: Option<PeerMisbehaved>,
    closed: bool,
    write_shut: bool,
}

impl Expect {
    /// Checks the stickiness rules on one fallible result and learns from it.
    fn check<T: std::fmt::Debug>(
        &mut self,
        what: &str,
        res: &Result<T, EndpointError>,
        ep: &Endpoint<Mem<'_>>,
    ) {
        if let Some(e) = &self.failed {
            assert_eq!(
                res.as_ref().err(),
                Some(&EndpointError::Misbehaved(e.clone())),
                "{what} after failure {e:?}: {res:?}"
            );
        } else if let Err(EndpointError::Misbehaved(e)) = res {
            self.failed = Some(e.clone());
        } else if self.closed {
            assert_eq!(res.as_ref().err(), Some(&EndpointError::Closed), "{what} after close: {res:?}");
        } else {
            // Only what this side did can make it report `Closed` or `WriteShut`.
            assert_ne!(res.as_ref().err(), Some(&EndpointError::Closed), "{what} before close: {res:?}");
            if !self.write_shut {
                assert_ne!(
                    res.as_ref().err(),
                    Some(&EndpointError::WriteShut),
                    "{what} before shutdown_write: {res:?}"
                );
            }
        }
        assert_eq!(ep.failure(), self.failed.as_ref(), "{what}: failure() disagrees");
    }
}

fuzz_target!(|data: &[u8]| {
    let world = Rc::new(World {
        regions: RefCell::new([vec![0u8; PAGE_SIZE], Vec::new(), Vec::new()]),
        peer: RefCell::new(Unstructured::new(data)),
    });
    let take = |f: &dyn Fn(&mut Unstructured<'_>) -> arbitrary::Result<u32>| -> u32 {
        f(&mut world.peer.borrow_mut()).unwrap_or(0)
    };

    // Setup: side, then orders.
    let side = if take(&|u| u.arbitrary::<bool>().map(u32::from)) == 0 { Side::Server } else { Side::Client };
    let orders = match take(&|u| u.int_in_range(0u32..=2)) {
        // Any control word at all.
        0 => RingOrders::from_control_word(take(&|u| u.arbitrary::<u32>())),
        // Orders in range (may still be refused as overlapping).
        1 => {
            let left = 10 + take(&|u| u.int_in_range(0u32..=10));
            let right = 10 + take(&|u| u.int_in_range(0u32..=10));
            RingOrders::from_control_word(left | (right << 16))
        }
        // What a server picks for requested sizes.
        _ => {
            let left_min = take(&|u| u.int_in_range(0u32..=(1 << 20) + 1)) as usize;
            let right_min = take(&|u| u.int_in_range(0u32..=(1 << 20) + 1)) as usize;
            RingOrders::for_sizes(left_min, right_min).ok_or(PeerMisbehaved::BadRingOrder(0))
        }
    };
    let Ok(orders) = orders else { return };

    let ctl = Mem { world: world.clone(), region: 0, base: 0, len: PAGE_SIZE };
    let left = ring_mem(&world, 1, orders.left);
    let right = ring_mem(&world, 2, orders.right);
    let mut ep = match side {
        Side::Server => Endpoint::init_server(ctl, left, right, orders),
        Side::Client => {
            ctl.store_u32(ORDERS, orders.control_word());
            Endpoint::join_client(ctl, left, right, orders)
        }
    };
    let (tx_size, rx_size) = ep.ring_sizes();
    let (tx_size, rx_size) = (tx_size as usize, rx_size as usize);
    assert_eq!(ep.side(), side);

    let pattern: Vec<u8> = (0..MAX_IO).map(|i| i as u8).collect();
    let mut buf = vec![0u8; MAX_IO];
    let mut expect = Expect::default();
    let mut close_count = 0;

    for _ in 0..MAX_OPS {
        if world.peer.borrow().is_empty() {
            break;
        }
        match take(&|u| u.int_in_range(0u32..=9)) {
            0 => {
                let len = take(&|u| u.int_in_range(0u32..=MAX_IO as u32)) as usize;
                let res = ep.send(&pattern[..len]);
                expect.check("send", &res, &ep);
                if expect.failed.is_none() && !expect.closed && expect.write_shut {
                    assert_eq!(res, Err(EndpointError::WriteShut));
                }
                if let Ok(t) = res {
                    assert!(t.bytes <= len && t.bytes <= tx_size, "sent {} of {len} on {tx_size}", t.bytes);
                    assert!(!t.notify || t.bytes > 0, "notify without data");
                }
            }
            1 => {
                let len = take(&|u| u.int_in_range(0u32..=MAX_IO as u32)) as usize;
                let res = ep.recv(&mut buf[..len]);
                expect.check("recv", &res, &ep);
                if let Ok(RecvStatus::Data(t)) = res {
                    assert!(t.bytes > 0, "empty Data");
                    assert!(
                        t.bytes <= len && t.bytes <= rx_size,
                        "received {} into {len} on {rx_size}",
                        t.bytes
                    );
                }
                if len == 0 && expect.failed.is_none() && !expect.closed {
                    assert_eq!(res, Ok(RecvStatus::Empty { notify: false }), "recv into []");
                }
            }
            2 => {
                let res = ep.readable();
                expect.check("readable", &res, &ep);
                if let Ok(n) = res {
                    assert!(n as usize <= rx_size, "readable {n} on {rx_size}");
                }
            }
            3 => {
                let res = ep.writable();
                expect.check("writable", &res, &ep);
                if let Ok(n) = res {
                    assert!(n as usize <= tx_size, "writable {n} on {tx_size}");
                }
            }
            4 => {
                let res = ep.prepare_wait_recv();
                expect.check("prepare_wait_recv", &res, &ep);
            }
            5 => {
                let res = ep.prepare_wait_send();
                expect.check("prepare_wait_send", &res, &ep);
            }
            6 => {
                let res = ep.shutdown_write();
                expect.check("shutdown_write", &res, &ep);
                if res.is_ok() {
                    expect.write_shut = true;
                }
            }
            7 => {
                let notify = ep.close();
                close_count += 1;
                assert_eq!(notify, close_count == 1, "close #{close_count} returned {notify}");
                assert!(ep.is_closed());
                expect.closed = true;
                assert_eq!(ep.failure(), expect.failed.as_ref());
            }
            8 => {
                let res = ep.client_connected();
                expect.check("client_connected", &res, &ep);
            }
            _ => {
                let res = ep.prepare_wait_connect();
                expect.check("prepare_wait_connect", &res, &ep);
            }
        }
    }
});
