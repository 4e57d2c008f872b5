//! The libxenvchan shared control page, byte by byte, and where each ring lives.
//!
//! ```text
//! off  size  field         written by   meaning
//!   0   u32  left.cons     server       left ring (client -> server) consumer index
//!   4   u32  left.prod     client       left ring producer index
//!   8   u32  right.cons    client       right ring (server -> client) consumer index
//!  12   u32  right.prod    server       right ring producer index
//!  16   u16  left_order    server       log2 of the left ring size (10..=20)
//!  18   u16  right_order   server       log2 of the right ring size (10..=20)
//!  20   u8   cli_live      client       0 gone, 1 connected, 2 not yet connected
//!  21   u8   srv_live      server       0 gone, 1 connected
//!  22   u8   cli_notify    both         bits the server asks the client to signal (0x1, 0x2);
//!                                       0x40: the client shut down its write half
//!  23   u8   srv_notify    both         bits the client asks the server to signal (0x1, 0x2);
//!                                       0x40: the server shut down its write half
//!  24   u32[] grants       server       grant refs of ring pages, left ring's first
//! ```
//! All fields little-endian. The 0x40 "write half shut down" bit is a dombus extension: it lets
//! the reader tell a clean end of stream from a crash (where the hypervisor clears the live byte
//! and nothing else). libxenvchan only ever sets and clears bits 0x1 and 0x2 with atomic
//! or/and, so the extra bit survives and a vchan peer is unaffected by it.

use crate::ring::{MAX_ORDER, MIN_ORDER, PeerMisbehaved};
use crate::types::{PAGE_SHIFT, PAGE_SIZE};

/// Offset of the left ring's consumer index.
pub const LEFT_CONS: usize = 0;
/// Offset of the left ring's producer index.
pub const LEFT_PROD: usize = 4;
/// Offset of the right ring's consumer index.
pub const RIGHT_CONS: usize = 8;
/// Offset of the right ring's producer index.
pub const RIGHT_PROD: usize = 12;
/// Offset of the 32-bit word holding `left_order` (low half) and `right_order` (high half).
pub const ORDERS: usize = 16;
/// Offset of the client's live byte.
pub const CLI_LIVE: usize = 20;
/// Offset of the server's live byte.
pub const SRV_LIVE: usize = 21;
/// Offset of the notify byte the client checks after acting (the server sets bits in it).
pub const CLI_NOTIFY: usize = 22;
/// Offset of the notify byte the server checks after acting (the client sets bits in it).
pub const SRV_NOTIFY: usize = 23;
/// Offset of the grant reference array.
pub const GRANTS: usize = 24;
/// Offset of an order-10 ring inside the control page.
pub const SMALL_RING_OFFSET: usize = 1024;
/// Offset of an order-11 ring inside the control page.
pub const LARGE_RING_OFFSET: usize = 2048;

/// Notify bit: "signal me when you have written data".
pub const NOTIFY_WRITE: u8 = 0x1;
/// Notify bit: "signal me when you have read data (freed space)".
pub const NOTIFY_READ: u8 = 0x2;
/// Flag in a side's *own* notify byte: "I will write no more" (dombus extension).
pub const SHUT_WR: u8 = 0x40;

/// The state a side publishes in its live byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Live {
    /// Closed, or died (the hypervisor's unmap notification cleared it).
    Gone = 0,
    /// Connected.
    Connected = 1,
    /// Client not connected yet (set by the server at initialisation).
    Waiting = 2,
}

impl Live {
    /// Decodes a live byte read from the peer.
    pub fn from_byte(b: u8) -> Result<Live, PeerMisbehaved> {
        match b {
            0 => Ok(Live::Gone),
            1 => Ok(Live::Connected),
            2 => Ok(Live::Waiting),
            other => Err(PeerMisbehaved::BadLiveState(other)),
        }
    }
}

/// Where a ring's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Inside the control page at this offset.
    InPage(usize),
    /// In this many separately granted pages.
    Pages(usize),
}

/// The two ring orders of a link, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingOrders {
    /// Order of the left ring (client writes, server reads).
    pub left: u32,
    /// Order of the right ring (server writes, client reads).
    pub right: u32,
}

impl RingOrders {
    /// Chooses orders as libxenvchan's server does for minimum sizes `left_min`/`right_min`:
    /// the smallest power of two of at least a page, except that one order-10 ring and one
    /// order-11 ring are placed inside the control page when the sizes allow.
    ///
    /// Returns `None` if a size exceeds the 1 MiB maximum.
    pub fn for_sizes(left_min: usize, right_min: usize) -> Option<RingOrders> {
        let max = 1usize << MAX_ORDER;
        if left_min > max || right_min > max {
            return None;
        }
        let small = 1usize << MIN_ORDER;
        let large = 1usize << (MIN_ORDER + 1);
        let (mut left, mut right) = (min_order(left_min), min_order(right_min));
        if left_min <= small && right_min <= large {
            (left, right) = (MIN_ORDER, MIN_ORDER + 1);
        } else if left_min <= large && right_min <= small {
            (left, right) = (MIN_ORDER + 1, MIN_ORDER);
        } else if left_min <= large {
            left = MIN_ORDER + 1;
        } else if right_min <= large {
            right = MIN_ORDER + 1;
        }
        Some(RingOrders { left, right })
    }

    /// Validates orders read from a (possibly hostile) control page, as libxenvchan's client does.
    pub fn from_control_word(word: u32) -> Result<RingOrders, PeerMisbehaved> {
        let left = word & 0xffff;
        let right = word >> 16;
        for o in [left, right] {
            if !(MIN_ORDER..=MAX_ORDER).contains(&o) {
                return Err(PeerMisbehaved::BadRingOrder(o));
            }
        }
        if left == right && left < PAGE_SHIFT {
            return Err(PeerMisbehaved::OverlappingRings(left));
        }
        // Stricter than libxenvchan, which accepts e.g. 10/20: 256 grant refs would run from
        // offset 24 past 1024, into the in-page ring. No honest server chooses that.
        let orders = RingOrders { left, right };
        let (l, r) = orders.page_counts();
        let grants_end = GRANTS + 4 * (l + r);
        for o in [left, right] {
            if let Placement::InPage(off) = Self::placement(o) {
                if off < grants_end {
                    return Err(PeerMisbehaved::GrantsOverlapRing { left, right });
                }
            }
        }
        Ok(orders)
    }

    /// The word to store at [`ORDERS`].
    pub fn control_word(self) -> u32 {
        self.left | (self.right << 16)
    }

    /// Where the ring of `order` lives.
    pub fn placement(order: u32) -> Placement {
        match order {
            10 => Placement::InPage(SMALL_RING_OFFSET),
            11 => Placement::InPage(LARGE_RING_OFFSET),
            o => Placement::Pages(1 << (o - PAGE_SHIFT)),
        }
    }

    /// Number of separately granted pages for (left, right).
    pub fn page_counts(self) -> (usize, usize) {
        let count = |o| match Self::placement(o) {
            Placement::InPage(_) => 0,
            Placement::Pages(n) => n,
        };
        (count(self.left), count(self.right))
    }
}

/// The smallest order >= a page that holds `size` bytes.
fn min_order(size: usize) -> u32 {
    let mut order = PAGE_SHIFT;
    while size > (1usize << order) {
        order += 1;
    }
    order
}

/// Maximum number of grant refs the control page can list.
pub const MAX_GRANTS: usize = (PAGE_SIZE - GRANTS) / 4;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vchan_order_choice() {
        let o = |l, r| RingOrders::for_sizes(l, r).map(|o| (o.left, o.right));
        assert_eq!(o(1024, 2048), Some((10, 11)));
        assert_eq!(o(2048, 1024), Some((11, 10)));
        assert_eq!(o(2048, 65536), Some((11, 16)));
        assert_eq!(o(65536, 65536), Some((16, 16)));
        assert_eq!(o(1 << 20, 1), Some((20, 11)));
        assert_eq!(o((1 << 20) + 1, 1), None);
    }

    #[test]
    fn hostile_orders_refused() {
        assert!(RingOrders::from_control_word(10 | (11 << 16)).is_ok());
        assert_eq!(RingOrders::from_control_word(9 | (11 << 16)), Err(PeerMisbehaved::BadRingOrder(9)));
        assert_eq!(RingOrders::from_control_word(10 | (21 << 16)), Err(PeerMisbehaved::BadRingOrder(21)));
        assert_eq!(RingOrders::from_control_word(11 | (11 << 16)), Err(PeerMisbehaved::OverlappingRings(11)));
        assert!(RingOrders::from_control_word(12 | (12 << 16)).is_ok());
        assert_eq!(
            RingOrders::from_control_word(10 | (20 << 16)),
            Err(PeerMisbehaved::GrantsOverlapRing { left: 10, right: 20 })
        );
        assert!(RingOrders::from_control_word(11 | (20 << 16)).is_ok());
        // Every choice our own server makes is accepted by a client.
        for (l, r) in [(1, 1), (1024, 2048), (2048, 1 << 20), (1 << 20, 1024), (1 << 20, 1 << 20)] {
            let o = RingOrders::for_sizes(l, r).unwrap();
            assert_eq!(RingOrders::from_control_word(o.control_word()), Ok(o), "{l}/{r}");
        }
        assert!(RingOrders::from_control_word(u32::MAX).is_err());
    }

    #[test]
    fn largest_rings_fit_in_grant_array() {
        let o = RingOrders { left: MAX_ORDER, right: MAX_ORDER };
        let (l, r) = o.page_counts();
        assert!(l + r <= MAX_GRANTS);
    }
}
