//! Ring arithmetic: one byte ring, one direction, free-running `u32` indices (sans-IO).
//!
//! A ring of `size = 2^order` bytes has a consumer index and a producer index in the control page
//! and its data in a separate [`SharedMem`] region. Indices run freely and wrap at `u32`; the
//! position in the ring is `index & (size - 1)`, and `prod - cons` (wrapping) is the fill level.
//!
//! Each side keeps a private shadow of the index *it* owns and never reads it back from shared
//! memory; the peer's index is read exactly once per operation, then validated: a fill level above
//! `size` is a [`PeerMisbehaved`] error, never an out-of-bounds access or a loop.

use crate::shmem::SharedMem;

/// Smallest ring order libxenvchan accepts (1 KiB).
pub const MIN_ORDER: u32 = 10;
/// Largest ring order libxenvchan accepts (1 MiB).
pub const MAX_ORDER: u32 = 20;

/// How the peer broke the shared-memory protocol. Each variant names what was seen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerMisbehaved {
    /// The peer's producer index claims more data than the ring can hold.
    #[error(
        "peer moved its producer index to {prod} with our consumer index at {cons}: more than the {size}-byte ring holds"
    )]
    ProducerOverrun {
        /// Producer index read from the peer.
        prod: u32,
        /// Our consumer index.
        cons: u32,
        /// Ring size in bytes.
        size: u32,
    },
    /// The peer's consumer index is ahead of what we produced, or implies a negative fill level.
    #[error(
        "peer moved its consumer index to {cons} with our producer index at {prod} on a {size}-byte ring"
    )]
    ConsumerOverrun {
        /// Our producer index.
        prod: u32,
        /// Consumer index read from the peer.
        cons: u32,
        /// Ring size in bytes.
        size: u32,
    },
    /// The peer wrote a live-state byte that the protocol does not define.
    #[error("peer wrote undefined live state {0} into the control page")]
    BadLiveState(u8),
    /// A ring order in the control page is outside the range the protocol allows.
    #[error("ring order {0} in the control page is outside {MIN_ORDER}..={MAX_ORDER}")]
    BadRingOrder(u32),
    /// Both rings were placed at the same offset inside the control page.
    #[error("both rings have order {0} and would overlap inside the control page")]
    OverlappingRings(u32),
    /// The grant array needed for the ring pages would run into a ring inside the control page.
    #[error("ring orders {left}/{right} make the grant array overlap the in-page ring")]
    GrantsOverlapRing {
        /// Order of the left ring.
        left: u32,
        /// Order of the right ring.
        right: u32,
    },
    /// A value the peer published in the store does not parse.
    #[error("peer published an invalid {what} in the store: {value:?}")]
    BadStoreValue {
        /// Which key.
        what: &'static str,
        /// What was there (truncated).
        value: String,
    },
}

/// The writing end of a ring: owns the producer index.
#[derive(Debug, Clone)]
pub struct Producer {
    size: u32,
    prod: u32,
    cons_off: usize,
    prod_off: usize,
}

impl Producer {
    /// A producer for a ring of `2^order` bytes whose indices live at `cons_off`/`prod_off` of the
    /// control page, starting at producer index `prod`.
    pub fn new(order: u32, cons_off: usize, prod_off: usize, prod: u32) -> Producer {
        debug_assert!((MIN_ORDER..=MAX_ORDER).contains(&order) || order < MIN_ORDER);
        Producer { size: 1 << order, prod, cons_off, prod_off }
    }

    /// Ring size in bytes.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Our producer index (the private shadow).
    pub fn index(&self) -> u32 {
        self.prod
    }

    /// Free bytes in the ring. Reads the peer's consumer index once.
    pub fn space(&self, ctl: &impl SharedMem) -> Result<u32, PeerMisbehaved> {
        let cons = ctl.load_u32(self.cons_off);
        let used = self.prod.wrapping_sub(cons);
        if used > self.size {
            return Err(PeerMisbehaved::ConsumerOverrun { prod: self.prod, cons, size: self.size });
        }
        Ok(self.size - used)
    }

    /// Copies as much of `buf` as fits into the ring and publishes the new producer index.
    /// Returns the number of bytes written (0 if the ring is full or `buf` is empty).
    pub fn write(
        &mut self,
        ctl: &impl SharedMem,
        data: &impl SharedMem,
        buf: &[u8],
    ) -> Result<usize, PeerMisbehaved> {
        let space = self.space(ctl)?;
        let n = (space as usize).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let pos = (self.prod & (self.size - 1)) as usize;
        let first = n.min(self.size as usize - pos);
        data.write_bytes(pos, &buf[..first]);
        if first < n {
            data.write_bytes(0, &buf[first..n]);
        }
        // n <= size <= 2^20, so the cast is lossless.
        self.prod = self.prod.wrapping_add(n as u32);
        ctl.store_u32(self.prod_off, self.prod);
        Ok(n)
    }

    /// Copies all of `parts`, in order, if they fit in the ring together, and publishes the
    /// new producer index once, so that the consumer sees all of them or none: a message in
    /// parts (a packet's header and payload) never shows its first part before its last.
    /// Returns the number of bytes written: all of them, or 0 if they do not fit.
    pub fn write_whole(
        &mut self,
        ctl: &impl SharedMem,
        data: &impl SharedMem,
        parts: &[&[u8]],
    ) -> Result<usize, PeerMisbehaved> {
        let total: usize = parts.iter().map(|p| p.len()).sum();
        if total == 0 || total > self.space(ctl)? as usize {
            return Ok(0);
        }
        let mut prod = self.prod;
        for part in parts {
            let pos = (prod & (self.size - 1)) as usize;
            let first = part.len().min(self.size as usize - pos);
            data.write_bytes(pos, &part[..first]);
            if first < part.len() {
                data.write_bytes(0, &part[first..]);
            }
            // Each part fits in the ring (total <= size <= 2^20): the cast is lossless.
            prod = prod.wrapping_add(part.len() as u32);
        }
        self.prod = prod;
        ctl.store_u32(self.prod_off, self.prod);
        Ok(total)
    }
}

/// The reading end of a ring: owns the consumer index.
#[derive(Debug, Clone)]
pub struct Consumer {
    size: u32,
    cons: u32,
    /// The producer index as last loaded (a valid one: at most `size` ahead of `cons`).
    seen: u32,
    /// The consumer index last stored in shared memory (`cons` may run ahead of it).
    published: u32,
    cons_off: usize,
    prod_off: usize,
}

impl Consumer {
    /// A consumer for a ring of `2^order` bytes whose indices live at `cons_off`/`prod_off` of the
    /// control page, starting at consumer index `cons`.
    pub fn new(order: u32, cons_off: usize, prod_off: usize, cons: u32) -> Consumer {
        Consumer { size: 1 << order, cons, seen: cons, published: cons, cons_off, prod_off }
    }

    /// Ring size in bytes.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// Our consumer index (the private shadow).
    pub fn index(&self) -> u32 {
        self.cons
    }

    /// Bytes ready to read. Reads the peer's producer index once.
    pub fn available(&mut self, ctl: &impl SharedMem) -> Result<u32, PeerMisbehaved> {
        let prod = ctl.load_u32(self.prod_off);
        let ready = prod.wrapping_sub(self.cons);
        if ready > self.size {
            return Err(PeerMisbehaved::ProducerOverrun { prod, cons: self.cons, size: self.size });
        }
        self.seen = prod;
        Ok(ready)
    }

    /// Bytes known to be ready without looking at shared memory: those the producer index
    /// showed when last loaded, less what has been read since. The ring may hold more.
    pub fn seen_ready(&self) -> u32 {
        self.seen.wrapping_sub(self.cons)
    }

    /// Copies up to `buf.len()` ready bytes out of the ring and publishes the new consumer index.
    /// Returns the number of bytes read (0 if the ring is empty or `buf` is empty).
    pub fn read(
        &mut self,
        ctl: &impl SharedMem,
        data: &impl SharedMem,
        buf: &mut [u8],
    ) -> Result<usize, PeerMisbehaved> {
        let n = self.read_unpublished(ctl, data, buf)?;
        if n > 0 {
            self.publish(ctl);
        }
        Ok(n)
    }

    /// Bytes consumed but not yet published to the producer.
    pub fn unpublished(&self) -> u32 {
        self.cons.wrapping_sub(self.published)
    }

    /// Stores the consumer index in shared memory (frees the space read so far for the
    /// producer). Returns false if there was nothing new to publish.
    pub fn publish(&mut self, ctl: &impl SharedMem) -> bool {
        if self.published == self.cons {
            return false;
        }
        ctl.store_u32(self.cons_off, self.cons);
        self.published = self.cons;
        true
    }

    /// Like [`Consumer::read`], but leaves the consumer index unpublished: the space stays
    /// taken, from the producer's point of view, until [`Consumer::publish`].
    pub fn read_unpublished(
        &mut self,
        ctl: &impl SharedMem,
        data: &impl SharedMem,
        buf: &mut [u8],
    ) -> Result<usize, PeerMisbehaved> {
        let ready = self.available(ctl)?;
        let n = (ready as usize).min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let pos = (self.cons & (self.size - 1)) as usize;
        let first = n.min(self.size as usize - pos);
        data.read_bytes(pos, &mut buf[..first]);
        if first < n {
            data.read_bytes(0, &mut buf[first..n]);
        }
        self.cons = self.cons.wrapping_add(n as u32);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shmem::Region;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    fn pair(order: u32, start: u32) -> (Region, Region, Producer, Consumer) {
        let ctl = Region::anonymous(16);
        ctl.store_u32(0, start);
        ctl.store_u32(4, start);
        let data = Region::anonymous(1 << order);
        (ctl, data, Producer::new(order, 0, 4, start), Consumer::new(order, 0, 4, start))
    }

    #[test]
    fn fills_exactly_to_size_then_refuses() {
        let (ctl, data, mut p, mut c) = pair(10, 0);
        assert_eq!(p.write(&ctl, &data, &[1u8; 1500]).unwrap(), 1024);
        assert_eq!(p.write(&ctl, &data, &[2u8; 10]).unwrap(), 0);
        let mut out = [0u8; 2000];
        assert_eq!(c.read(&ctl, &data, &mut out).unwrap(), 1024);
        assert!(out[..1024].iter().all(|&b| b == 1));
        assert_eq!(c.read(&ctl, &data, &mut out).unwrap(), 0);
    }

    #[test]
    fn wraps_at_u32_boundary() {
        let (ctl, data, mut p, mut c) = pair(10, u32::MAX - 100);
        let msg: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        assert_eq!(p.write(&ctl, &data, &msg).unwrap(), 1000);
        let mut out = vec![0u8; 1000];
        assert_eq!(c.read(&ctl, &data, &mut out).unwrap(), 1000);
        assert_eq!(out, msg);
        assert_eq!(p.index(), (u32::MAX - 100).wrapping_add(1000));
    }

    #[test]
    fn every_order_wraps_the_ring_and_the_u32_indices() {
        for order in MIN_ORDER..=MAX_ORDER {
            let size = 1usize << order;
            // Start just before the u32 wrap, at an odd position inside the ring.
            let start = u32::MAX - (size as u32 / 3);
            let (ctl, data, mut p, mut c) = pair(order, start);
            let msg: Vec<u8> = (0..size * 3).map(|i| (i * 31 % 253) as u8).collect();
            let mut out = vec![0u8; msg.len()];
            let (mut sent, mut got) = (0, 0);
            while got < msg.len() {
                // Uneven chunks so that copies straddle the ring's end at varying offsets.
                let w = (size / 2 + 7).min(msg.len() - sent);
                sent += p.write(&ctl, &data, &msg[sent..sent + w]).unwrap();
                let r = (size / 3 + 5).min(out.len() - got);
                got += c.read(&ctl, &data, &mut out[got..got + r]).unwrap();
            }
            assert_eq!(out, msg, "order {order}");
            assert_eq!(p.index(), start.wrapping_add(msg.len() as u32));
            assert_eq!(c.available(&ctl).unwrap(), 0);
        }
    }

    #[test]
    fn a_whole_write_is_published_at_once_or_not_at_all() {
        // Start near the ring's end, so that parts straddle it.
        let (ctl, data, mut p, mut c) = pair(10, 1000);
        let (head, body) = ([9u8; 44], (0..900u32).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        assert_eq!(p.write_whole(&ctl, &data, &[&head, &body, &[]]).unwrap(), 944);
        // One publication: the consumer sees the whole message, no part before the other.
        assert_eq!(c.available(&ctl).unwrap(), 944);
        // 80 bytes of room left: 81 in parts write nothing and publish nothing.
        assert_eq!(p.write_whole(&ctl, &data, &[&[1u8; 40], &[2u8; 41]]).unwrap(), 0);
        assert_eq!((c.available(&ctl).unwrap(), p.index()), (944, 1944));
        assert_eq!(p.write_whole(&ctl, &data, &[&[1u8; 40], &[2u8; 40]]).unwrap(), 80);
        assert_eq!(p.write_whole(&ctl, &data, &[]).unwrap(), 0);
        let mut out = vec![0u8; 1024];
        assert_eq!(c.read(&ctl, &data, &mut out).unwrap(), 1024);
        assert_eq!(&out[..44], &head);
        assert_eq!(&out[44..944], &body[..]);
        assert_eq!(&out[944..], &[[1u8; 40], [2u8; 40]].concat()[..]);
    }

    #[test]
    fn producer_overrun_is_named_not_trusted() {
        let (ctl, data, _p, mut c) = pair(10, 0);
        ctl.store_u32(4, 1025);
        let mut out = [0u8; 8];
        assert_eq!(
            c.read(&ctl, &data, &mut out),
            Err(PeerMisbehaved::ProducerOverrun { prod: 1025, cons: 0, size: 1024 })
        );
        // A producer index "behind" the consumer is a huge wrapping distance: also refused.
        ctl.store_u32(4, u32::MAX);
        assert!(matches!(c.read(&ctl, &data, &mut out), Err(PeerMisbehaved::ProducerOverrun { .. })));
    }

    #[test]
    fn consumer_overrun_is_named_not_trusted() {
        let (ctl, data, mut p, _c) = pair(10, 0);
        ctl.store_u32(0, 5); // consumer claims to have read bytes we never wrote
        assert!(matches!(p.write(&ctl, &data, b"x"), Err(PeerMisbehaved::ConsumerOverrun { .. })));
    }

    proptest! {
        /// Random write (whole or in parts, all or nothing) and read splits at every ring
        /// order, from any starting index, against a VecDeque model: the bytes out equal the
        /// bytes in, and fill levels match.
        #[test]
        fn ring_matches_model(
            order in MIN_ORDER..=14u32,
            start in any::<u32>(),
            ops in proptest::collection::vec((0u8..3, 0usize..5000), 1..60),
        ) {
            let (ctl, data, mut p, mut c) = pair(order, start);
            let size = 1usize << order;
            let mut model: VecDeque<u8> = VecDeque::new();
            let mut next = 0u8;
            for (op, len) in ops {
                let buf: Vec<u8> = (0..len).map(|_| { next = next.wrapping_add(7); next }).collect();
                if op == 0 {
                    let n = p.write(&ctl, &data, &buf).unwrap();
                    prop_assert_eq!(n, len.min(size - model.len()));
                    model.extend(&buf[..n]);
                } else if op == 1 {
                    // In three parts, all or nothing.
                    let (a, rest) = buf.split_at(len / 3);
                    let (b, c3) = rest.split_at(rest.len() / 2);
                    let n = p.write_whole(&ctl, &data, &[a, b, c3]).unwrap();
                    let fits = len > 0 && len <= size - model.len();
                    prop_assert_eq!(n, if fits { len } else { 0 });
                    model.extend(&buf[..n]);
                } else {
                    let mut buf = vec![0u8; len];
                    let n = c.read(&ctl, &data, &mut buf).unwrap();
                    prop_assert_eq!(n, len.min(model.len()));
                    let want: Vec<u8> = model.drain(..n).collect();
                    prop_assert_eq!(&buf[..n], &want[..]);
                    // What the read saw and left: all of the ring's rest, as of its look.
                    prop_assert_eq!(c.seen_ready() as usize, model.len());
                }
                // Never more than the ring holds (writes since are not seen yet).
                prop_assert!(c.seen_ready() as usize <= model.len());
                prop_assert_eq!(c.available(&ctl).unwrap() as usize, model.len());
                prop_assert_eq!(c.seen_ready() as usize, model.len());
                prop_assert_eq!(p.space(&ctl).unwrap() as usize, size - model.len());
            }
        }

        /// Whatever the peer writes into its index, the other side returns a value or a named
        /// error: never a panic, never more bytes than the ring holds.
        #[test]
        fn arbitrary_peer_index_is_bounded(order in MIN_ORDER..=12u32, start in any::<u32>(), evil in any::<u32>()) {
            let (ctl, data, mut p, mut c) = pair(order, start);
            ctl.store_u32(4, evil);
            let mut buf = vec![0u8; 1 << 13];
            match c.read(&ctl, &data, &mut buf) {
                Ok(n) => prop_assert!(n <= 1 << order),
                Err(e) => { let is_overrun = matches!(e, PeerMisbehaved::ProducerOverrun { .. }); prop_assert!(is_overrun) }
            }
            // A rejected index is not remembered as seen.
            prop_assert!(c.seen_ready() <= 1 << order);
            ctl.store_u32(0, evil);
            match p.write(&ctl, &data, &buf) {
                Ok(n) => prop_assert!(n <= 1 << order),
                Err(e) => { let is_overrun = matches!(e, PeerMisbehaved::ConsumerOverrun { .. }); prop_assert!(is_overrun) }
            }
        }
    }
}
