//! Fuzz target: ring orders from a hostile control word, and the server's own order choice.
//!
//! Input: 12 bytes = (control word, left_min, right_min), short inputs padded with zeros.
//!
//! Invariants checked (only what the layout actually guarantees):
//! * `from_control_word` accepts exactly the words whose two halves are in `10..=20`, that do
//!   not put two equal sub-page rings on top of each other, and whose grant array does not run
//!   into an in-page ring (the orders (10, 20) and (20, 10), which libxenvchan's client accepts
//!   but no server chooses: refused with `GrantsOverlapRing`); it round-trips through
//!   `control_word`.
//! * for an accepted word: the grant array (24 + 4 * pages) fits the page
//!   (`left + right pages <= MAX_GRANTS`), `Pages(n)` holds exactly `2^order` bytes, an in-page ring
//!   lies inside the page, two in-page rings do not overlap each other, and an in-page ring does
//!   not overlap the fixed 24-byte header.
//! * for an accepted word the grant array never reaches into an in-page ring.
//! * `for_sizes`: every order it picks is accepted by `from_control_word` (a dombus client accepts
//!   a dombus server), each ring holds at least the requested minimum, and its grants never
//!   overlap an in-page ring.
#![no_main]

use dombus_transport_xen::layout::{GRANTS, MAX_GRANTS, Placement, RingOrders};
use dombus_transport_xen::ring::{MAX_ORDER, MIN_ORDER};
use dombus_transport_xen::types::{PAGE_SHIFT, PAGE_SIZE};
use libfuzzer_sys::fuzz_target;

/// Checks one validated pair of orders; returns true if the grant array overlaps an in-page ring.
fn check_orders(o: RingOrders) -> bool {
    assert!((MIN_ORDER..=MAX_ORDER).contains(&o.left), "{o:?}");
    assert!((MIN_ORDER..=MAX_ORDER).contains(&o.right), "{o:?}");
    let (l, r) = o.page_counts();
    assert!(l + r <= MAX_GRANTS, "{o:?}: {l}+{r} grants");
    let grants_end = GRANTS + 4 * (l + r);
    assert!(grants_end <= PAGE_SIZE, "{o:?}: grant array ends at {grants_end}");

    let mut in_page = Vec::new();
    for order in [o.left, o.right] {
        let size = 1usize << order;
        match RingOrders::placement(order) {
            Placement::InPage(off) => {
                assert!(order < PAGE_SHIFT, "{o:?}: order {order} in page");
                assert!(off % 4 == 0, "{o:?}: unaligned ring at {off}");
                assert!(off >= GRANTS, "{o:?}: ring at {off} overlaps the header");
                assert!(off + size <= PAGE_SIZE, "{o:?}: ring {off}+{size} leaves the page");
                in_page.push(off..off + size);
            }
            Placement::Pages(n) => {
                assert!(order >= PAGE_SHIFT, "{o:?}: order {order} in pages");
                assert_eq!(n * PAGE_SIZE, size, "{o:?}: {n} pages for order {order}");
            }
        }
    }
    if let [a, b] = &in_page[..] {
        assert!(a.end <= b.start || b.end <= a.start, "{o:?}: in-page rings {a:?} and {b:?} overlap");
    }
    in_page.iter().any(|ring| grants_end > ring.start)
}

fuzz_target!(|data: &[u8]| {
    let mut bytes = [0u8; 12];
    let n = data.len().min(12);
    bytes[..n].copy_from_slice(&data[..n]);
    let word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let left_min = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    let right_min = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;

    // A hostile control word.
    let (lo, hi) = (word & 0xffff, word >> 16);
    let expect_ok = (MIN_ORDER..=MAX_ORDER).contains(&lo)
        && (MIN_ORDER..=MAX_ORDER).contains(&hi)
        && !(lo == hi && lo < PAGE_SHIFT)
        && !matches!((lo, hi), (10, 20) | (20, 10));
    match RingOrders::from_control_word(word) {
        Ok(o) => {
            assert!(expect_ok, "accepted {word:#x}");
            assert_eq!((o.left, o.right), (lo, hi));
            assert_eq!(o.control_word(), word);
            assert!(!check_orders(o), "{o:?}: grant array overlaps an in-page ring");
        }
        Err(_) => assert!(!expect_ok, "refused valid word {word:#x}"),
    }

    // The server's choice for requested minimum sizes.
    match RingOrders::for_sizes(left_min, right_min) {
        Some(o) => {
            assert_eq!(RingOrders::from_control_word(o.control_word()), Ok(o), "server chose {o:?}");
            assert!(!check_orders(o), "{o:?}: server's grant array overlaps an in-page ring");
            assert!(1usize << o.left >= left_min && 1usize << o.right >= right_min, "{o:?}");
        }
        None => assert!(left_min > 1 << MAX_ORDER || right_min > 1 << MAX_ORDER),
    }
});
