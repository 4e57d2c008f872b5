//! A connection's receive queue: payloads kept in the buffers they were read into.
//!
//! A large payload is read off the link into a buffer of its own and that buffer joins the
//! queue as it is, so a byte of a stream is copied twice on the receiving side (link ring →
//! payload buffer → the reader's buffer), as over the bare link plus one, unless its reader
//! was waiting and took it from the link itself (`mux`'s hand-off). Small payloads (a
//! typed call's frames) are copied onto the end of the queue's last buffer instead: a packet of
//! a few bytes never costs a buffer of its own.
//!
//! **Memory.** What a peer can make a queue hold is bounded by the credit it was given, not by
//! the number of packets it splits that credit into. Buffers can hold room their bytes do not
//! use (a buffer started for a small payload, a large one read into a spare buffer a little
//! larger); after each payload the queue counts that room, and if it exceeds an eighth of the
//! unread bytes plus [`SLACK`], copies the unread bytes into buffers of their exact size, as
//! Linux collapses a TCP receive queue whose buffers outgrow its bytes. So after each payload
//! the queue's buffers hold at most `len + len / 8 + SLACK` bytes besides what was already read
//! from the front buffer (at most one payload's buffer). A correct stream never pays for that
//! copy: its payloads fill their buffers.

use std::collections::VecDeque;

use super::packet::MAX_PAYLOAD;

/// Payloads from this size on keep the buffer they were read into; smaller ones are copied.
pub const OWN_BUFFER: usize = 4 << 10;

/// Room of a buffer started for copied payloads.
const SMALL_BUFFER: usize = 4 << 10;

/// Room the queue may hold beyond its unread bytes and an eighth of them before it compacts.
const SLACK: usize = 32 << 10;

/// True if a buffer of `capacity` bytes may hold a payload of `len` bytes as it is.
pub(super) fn fits(capacity: usize, len: usize) -> bool {
    len >= OWN_BUFFER && capacity >= len && capacity <= len + len / 8
}

/// Bytes received on one connection, in arrival order, not yet read.
#[derive(Debug, Default)]
pub(super) struct RxQueue {
    buffers: VecDeque<Vec<u8>>,
    /// Bytes of the front buffer already read.
    head: usize,
    /// Bytes not yet read.
    len: usize,
    /// Capacity of all buffers.
    room: usize,
    /// Times the queue compacted (tests check a stream never makes it).
    #[cfg(test)]
    compactions: usize,
}

impl RxQueue {
    /// Bytes not yet read.
    pub(super) fn len(&self) -> usize {
        self.len
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a copy of `data`.
    pub(super) fn extend_from_slice(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        match self.buffers.back_mut() {
            Some(tail) if tail.capacity() - tail.len() >= data.len() => tail.extend_from_slice(data),
            _ => {
                let mut buffer = Vec::with_capacity(data.len().max(SMALL_BUFFER));
                buffer.extend_from_slice(data);
                self.room += buffer.capacity();
                self.buffers.push_back(buffer);
            }
        }
        self.len += data.len();
        self.bound();
    }

    /// Appends `payload`, keeping its buffer if it is large and [`fits`] it; otherwise copies
    /// it and hands the buffer back for reuse.
    pub(super) fn push(&mut self, payload: Vec<u8>) -> Option<Vec<u8>> {
        if !fits(payload.capacity(), payload.len()) {
            self.extend_from_slice(&payload);
            return Some(payload);
        }
        self.len += payload.len();
        self.room += payload.capacity();
        self.buffers.push_back(payload);
        self.bound();
        None
    }

    /// Compacts the queue if its buffers hold too much room their bytes do not use.
    fn bound(&mut self) {
        let unused = self.room - self.len - self.head;
        if unused <= self.len / 8 + SLACK {
            return;
        }
        let mut compact = VecDeque::with_capacity(self.len.div_ceil(MAX_PAYLOAD as usize));
        let mut room = 0;
        let mut pieces =
            self.buffers.iter().enumerate().map(|(i, b)| if i == 0 { &b[self.head..] } else { &b[..] });
        let mut piece: &[u8] = &[];
        let mut left = self.len;
        while left > 0 {
            let want = left.min(MAX_PAYLOAD as usize);
            let mut buffer = Vec::with_capacity(want);
            while buffer.len() < want {
                if piece.is_empty() {
                    match pieces.next() {
                        Some(next) => piece = next,
                        None => break,
                    }
                    continue;
                }
                let take = piece.len().min(want - buffer.len());
                buffer.extend_from_slice(&piece[..take]);
                piece = &piece[take..];
            }
            left = left.saturating_sub(want);
            room += buffer.capacity();
            compact.push_back(buffer);
        }
        self.buffers = compact;
        self.head = 0;
        self.room = room;
        #[cfg(test)]
        {
            self.compactions += 1;
        }
    }

    /// Moves up to `buf.len()` bytes into `buf`, in order; returns how many. Buffers read to
    /// the end go to `done` for reuse, except a small last one, kept (emptied) for the next
    /// payloads.
    pub(super) fn read(&mut self, buf: &mut [u8], mut done: impl FnMut(Vec<u8>)) -> usize {
        let mut n = 0;
        let last = self.buffers.len();
        for i in 1..=last {
            let Some(front) = self.buffers.front_mut() else { break };
            let available = &front[self.head..];
            let take = available.len().min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&available[..take]);
            n += take;
            self.head += take;
            if self.head < front.len() {
                break;
            }
            self.head = 0;
            if i == last && front.capacity() <= SMALL_BUFFER {
                front.clear();
                break;
            }
            if let Some(spent) = self.buffers.pop_front() {
                self.room -= spent.capacity();
                done(spent);
            }
        }
        self.len -= n;
        n
    }

    /// Drops everything queued and the queue's buffers.
    pub(super) fn clear(&mut self) {
        *self = RxQueue::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Step {
        Copy(usize),
        Own { len: usize, room: usize },
        Read(usize),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1usize..200).prop_map(Step::Copy),
            (1usize..9000).prop_map(Step::Copy),
            (1usize..=65_536, 0usize..70_000).prop_map(|(len, extra)| Step::Own { len, room: len + extra }),
            (4096usize..=65_536).prop_map(|len| Step::Own { len, room: len }),
            (0usize..70_000).prop_map(Step::Read),
        ]
    }

    proptest! {
        /// The queue reads back exactly the bytes pushed, in order, however they were split
        /// into payloads and reads; after each payload its buffers hold at most an eighth more
        /// than its unread bytes plus the slack (besides what was read of the front buffer),
        /// and a read never allocates.
        #[test]
        fn reads_back_what_was_pushed_within_the_memory_bound(steps in proptest::collection::vec(step(), 1..200)) {
            let mut q = RxQueue::default();
            let mut expected: VecDeque<u8> = VecDeque::new();
            let mut next = 0u8;
            let mut bytes = |n: usize| -> Vec<u8> { (0..n).map(|_| { next = next.wrapping_add(1); next }).collect() };
            for s in steps {
                let s = &s;
                match *s {
                    Step::Copy(n) => {
                        let data = bytes(n);
                        expected.extend(&data);
                        q.extend_from_slice(&data);
                    }
                    Step::Own { len, room } => {
                        let mut payload = Vec::with_capacity(room);
                        payload.extend(bytes(len));
                        expected.extend(&payload);
                        let kept = fits(payload.capacity(), payload.len());
                        prop_assert_eq!(q.push(payload).is_none(), kept);
                    }
                    Step::Read(n) => {
                        let mut buf = vec![0u8; n];
                        let room = q.room;
                        let got = q.read(&mut buf, drop);
                        prop_assert!(q.room <= room, "a read allocated");
                        prop_assert_eq!(got, n.min(expected.len()));
                        let want: Vec<u8> = expected.drain(..got).collect();
                        prop_assert_eq!(&buf[..got], &want[..]);
                    }
                }
                prop_assert_eq!(q.len(), expected.len());
                prop_assert_eq!(q.room, q.buffers.iter().map(Vec::capacity).sum::<usize>());
                if !matches!(s, Step::Read(_)) {
                    prop_assert!(q.room - q.head <= q.len + q.len / 8 + SLACK, "room {} for {} bytes", q.room, q.len);
                }
            }
        }
    }

    #[test]
    fn a_large_payload_keeps_its_buffer_and_small_ones_share_one() {
        let mut q = RxQueue::default();
        let big = vec![7u8; OWN_BUFFER];
        let at = big.as_ptr();
        assert!(q.push(big).is_none());
        assert_eq!(q.buffers.back().map(|b| b.as_ptr()), Some(at), "the payload's own buffer is queued");
        for _ in 0..10 {
            q.extend_from_slice(&[1, 2, 3]);
        }
        assert_eq!(q.buffers.len(), 2, "small payloads share one buffer");
        let mut spent = Vec::new();
        let mut buf = vec![0u8; OWN_BUFFER + 30];
        assert_eq!(q.read(&mut buf, |b| spent.push(b)), OWN_BUFFER + 30);
        assert_eq!(spent.len(), 1, "the large buffer, read to its end, goes back for reuse");
        assert_eq!(q.buffers.len(), 1, "the small buffer stays for the next payloads");
        assert!(q.is_empty());
    }

    #[test]
    fn a_stream_of_large_payloads_read_in_small_pieces_never_compacts() {
        let mut q = RxQueue::default();
        let mut buf = [0u8; 1000];
        for _ in 0..64 {
            while q.len() > 3 * 65_536 {
                q.read(&mut buf, drop);
            }
            assert!(q.push(vec![1u8; 65_536]).is_none());
            q.extend_from_slice(&[2u8; 100]);
        }
        assert_eq!(q.compactions, 0);
    }

    #[test]
    fn small_payloads_between_large_ones_make_it_compact_to_the_bound() {
        let mut q = RxQueue::default();
        for _ in 0..40 {
            q.extend_from_slice(&[1]);
            assert!(q.push(vec![2u8; OWN_BUFFER]).is_none());
        }
        assert!(q.compactions > 0, "each small payload started a 4 KiB buffer: the room doubled");
        assert!(q.room <= q.len + q.len / 8 + SLACK);
        let mut all = vec![0u8; q.len()];
        assert_eq!(q.read(&mut all, drop), 40 * (OWN_BUFFER + 1));
        assert!(all.chunks(OWN_BUFFER + 1).all(|c| c[0] == 1 && c[1..].iter().all(|&b| b == 2)));
    }

    #[test]
    fn only_large_payloads_in_buffers_that_fit_them_are_kept() {
        let mut q = RxQueue::default();
        let payload = |len: usize, room: usize| {
            let mut b = Vec::with_capacity(room);
            b.resize(len, 5);
            b
        };
        assert!(q.push(payload(OWN_BUFFER, OWN_BUFFER)).is_none(), "large, exact: kept");
        assert!(q.push(payload(8000, 9000)).is_none(), "large, within an eighth: kept");
        assert!(q.push(payload(8000, 9001)).is_some(), "large, more than an eighth over: copied");
        assert!(q.push(payload(OWN_BUFFER - 1, OWN_BUFFER - 1)).is_some(), "small: copied");
        assert!(q.push(payload(100, 100)).is_some(), "small: copied");
        assert_eq!(q.len(), OWN_BUFFER + 8000 + 8000 + OWN_BUFFER - 1 + 100);
    }
}
