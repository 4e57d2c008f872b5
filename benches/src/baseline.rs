//! The baselines the performance targets are ratios to: an eventfd ping-pong (the wake-up
//! floor), a shared-memory spin ping-pong (the polling floor) and single-process memcpy (the
//! bandwidth floor).

use std::hint::spin_loop;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::time::{Duration, Instant};

use dombus_transport_xen::shmem::{Region, SharedMem, map_shared};
use rustix::event::{EventfdFlags, eventfd};
use rustix::fs::{MemfdFlags, ftruncate, memfd_create};

use crate::{PeerProcess, PingPong, os, timed_loop};

/// Peer role of [`EventfdPingPong`].
pub const EVENTFD_ROLE: &str = "eventfd";
/// Peer role of [`ShmSpinPingPong`].
pub const SHM_SPIN_ROLE: &str = "shm-spin";

/// Round trips done before a constructor returns, so that the peer is up and warm.
const HANDSHAKE_ROUND_TRIPS: u64 = 16;

fn read_u64(fd: impl AsFd) -> io::Result<u64> {
    let mut buf = [0u8; 8];
    let n = rustix::io::read(fd, &mut buf).map_err(os)?;
    if n != 8 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short eventfd read"));
    }
    Ok(u64::from_ne_bytes(buf))
}

fn write_u64(fd: impl AsFd, v: u64) -> io::Result<()> {
    let n = rustix::io::write(fd, &v.to_ne_bytes()).map_err(os)?;
    if n != 8 {
        return Err(io::Error::new(io::ErrorKind::WriteZero, "short eventfd write"));
    }
    Ok(())
}

/// Ping-pong over two blocking eventfds: the parent writes `ping` and blocks reading `pong`; the
/// peer blocks reading `ping` and writes `pong`. No data moves: this is the price of two
/// cross-process wake-ups.
#[derive(Debug)]
pub struct EventfdPingPong {
    ping: OwnedFd,
    pong: OwnedFd,
    peer: PeerProcess,
}

impl EventfdPingPong {
    /// Creates the eventfds and starts the peer.
    pub fn new() -> io::Result<EventfdPingPong> {
        let ping = eventfd(0, EventfdFlags::CLOEXEC).map_err(os)?;
        let pong = eventfd(0, EventfdFlags::CLOEXEC).map_err(os)?;
        let peer = PeerProcess::spawn(EVENTFD_ROLE, "", &[ping.as_fd(), pong.as_fd()])?;
        let mut me = EventfdPingPong { ping, pong, peer };
        me.run(HANDSHAKE_ROUND_TRIPS, None)?;
        Ok(me)
    }
}

impl PingPong for EventfdPingPong {
    fn run(&mut self, n: u64, samples: Option<&mut Vec<Duration>>) -> io::Result<Duration> {
        let (ping, pong) = (&self.ping, &self.pong);
        timed_loop(n, samples, || {
            write_u64(ping, 1)?;
            read_u64(pong).map(drop)
        })
    }

    fn peer(&self) -> &PeerProcess {
        &self.peer
    }
}

/// The peer of [`EventfdPingPong`]: fds `[ping, pong]`.
pub(crate) fn eventfd_child(fds: Vec<OwnedFd>) -> io::Result<()> {
    let [ping, pong]: [OwnedFd; 2] =
        fds.try_into().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "need 2 fds"))?;
    loop {
        read_u64(&ping)?;
        write_u64(&pong, 1)?;
    }
}

/// Maps all `len` bytes of the memfd `fd`, shared and writable, as a [`Region`]: the same
/// bounds-checked atomic words and copies the link's rings use, so the baselines hold no
/// `unsafe` of their own. The region unmaps when its last clone drops.
fn map_memfd(fd: &OwnedFd, len: usize) -> io::Result<Region> {
    Ok(map_shared(fd, len, true, 0)?.into_region())
}

/// The sequence number after `seq`, skipping [`STOP`] (which tells the peer to exit).
fn next_seq(seq: u32) -> u32 {
    match seq.wrapping_add(1) {
        STOP => 0,
        next => next,
    }
}

// Layout of the spin page: the two sequence words (`u32`) on separate cache-line pairs, then one
// page of data per direction.
const PING_SEQ: usize = 0;
const PONG_SEQ: usize = 128;
const PING_DATA: usize = 4096;
const PONG_DATA: usize = 8192;
const SHM_LEN: usize = 12288;
/// Largest payload of [`ShmSpinPingPong`].
pub const SHM_MAX_PAYLOAD: usize = 4096;
/// Written to the word the peer watches to make it exit: never a valid sequence number (see
/// [`next_seq`]) nor a stream position (a multiple of [`CHUNK`]).
const STOP: u32 = u32::MAX;

/// Ping-pong through a shared memfd mapping, both processes spinning
/// ([`core::hint::spin_loop`]) on the peer's sequence word. Each round trip copies the payload
/// four times, as a link echo does: parent into the ping area, peer out of it and into the pong
/// area, parent out of that.
#[derive(Debug)]
pub struct ShmSpinPingPong {
    map: Region,
    seq: u32,
    out: Vec<u8>,
    back: Vec<u8>,
    peer: PeerProcess,
}

impl ShmSpinPingPong {
    /// Creates the shared page and starts the spinning peer; `payload` bytes (at most
    /// [`SHM_MAX_PAYLOAD`]) go each way per round trip.
    pub fn new(payload: usize) -> io::Result<ShmSpinPingPong> {
        if payload > SHM_MAX_PAYLOAD {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "payload too large"));
        }
        let fd = memfd_create("dombus-bench-spin", MemfdFlags::CLOEXEC).map_err(os)?;
        ftruncate(&fd, SHM_LEN as u64).map_err(os)?;
        let map = map_memfd(&fd, SHM_LEN)?;
        let peer = PeerProcess::spawn(SHM_SPIN_ROLE, &payload.to_string(), &[fd.as_fd()])?;
        let out = (0..payload).map(|i| i as u8).collect();
        let mut me = ShmSpinPingPong { map, seq: 0, out, back: vec![0; payload], peer };
        me.run(HANDSHAKE_ROUND_TRIPS, None)?;
        if me.back != me.out {
            return Err(io::Error::other("spin peer echoed the wrong bytes"));
        }
        Ok(me)
    }
}

impl PingPong for ShmSpinPingPong {
    fn run(&mut self, n: u64, samples: Option<&mut Vec<Duration>>) -> io::Result<Duration> {
        let ShmSpinPingPong { map, seq, out, back, .. } = self;
        timed_loop(n, samples, || {
            *seq = next_seq(*seq);
            map.write_bytes(PING_DATA, out);
            map.store_u32(PING_SEQ, *seq);
            while map.load_u32(PONG_SEQ) != *seq {
                spin_loop();
            }
            map.read_bytes(PONG_DATA, back);
            Ok(())
        })
    }

    fn peer(&self) -> &PeerProcess {
        &self.peer
    }
}

impl Drop for ShmSpinPingPong {
    fn drop(&mut self) {
        self.map.store_u32(PING_SEQ, STOP);
    }
}

/// The peer of [`ShmSpinPingPong`]: fd `[memfd]`, argument the payload size.
pub(crate) fn shm_spin_child(fds: Vec<OwnedFd>, arg: &str) -> io::Result<()> {
    let [fd]: [OwnedFd; 1] =
        fds.try_into().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "need 1 fd"))?;
    let payload: usize =
        arg.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad payload size"))?;
    let map = map_memfd(&fd, SHM_LEN)?;
    let mut buf = vec![0u8; payload.min(SHM_MAX_PAYLOAD)];
    let mut last = 0;
    loop {
        let seq = map.load_u32(PING_SEQ);
        if seq == last {
            spin_loop();
            continue;
        }
        if seq == STOP {
            return Ok(());
        }
        map.read_bytes(PING_DATA, &mut buf);
        map.write_bytes(PONG_DATA, &buf);
        map.store_u32(PONG_SEQ, seq);
        last = seq;
    }
}

/// Size of the chunks [`Memcpy`] and the stream benchmark move.
pub const CHUNK: usize = 64 * 1024;
/// Size of the destination buffer [`Memcpy`] cycles through (the stream benchmark's ring size).
pub const MEMCPY_DST: usize = 1024 * 1024;

/// Span of [`Memcpy::cold`]'s buffers: well past the last-level cache.
pub const MEMCPY_COLD_SPAN: usize = 128 * 1024 * 1024;

/// Single-process copy bandwidth in 64 KiB chunks.
///
/// [`Memcpy::new`] (the baseline the stream target is stated against) copies one 64 KiB source
/// chunk into successive slots of a 1 MiB destination, as a writer fills a 1 MiB ring: it runs
/// from the caches. [`Memcpy::cold`] walks 128 MiB source and destination buffers, so it measures
/// memory bandwidth; it is reported for context.
#[derive(Debug)]
pub struct Memcpy {
    src: Vec<u8>,
    dst: Vec<u8>,
    src_off: usize,
    dst_off: usize,
}

impl Default for Memcpy {
    fn default() -> Self {
        Memcpy::new()
    }
}

impl Memcpy {
    /// Cache-hot: a 64 KiB source into a 1 MiB destination.
    pub fn new() -> Memcpy {
        Memcpy::with_sizes(CHUNK, MEMCPY_DST)
    }

    /// Cache-cold: 128 MiB source and destination walked chunk by chunk.
    pub fn cold() -> Memcpy {
        Memcpy::with_sizes(MEMCPY_COLD_SPAN, MEMCPY_COLD_SPAN)
    }

    fn with_sizes(src: usize, dst: usize) -> Memcpy {
        Memcpy { src: (0..src).map(|i| i as u8).collect(), dst: vec![1; dst], src_off: 0, dst_off: 0 }
    }

    /// Copies `n` chunks; returns the wall time.
    pub fn run(&mut self, n: u64) -> Duration {
        let start = Instant::now();
        for _ in 0..n {
            let (s, d) = (self.src_off, self.dst_off);
            self.dst[d..d + CHUNK].copy_from_slice(&self.src[s..s + CHUNK]);
            std::hint::black_box(&mut self.dst);
            self.src_off = (s + CHUNK) % self.src.len();
            self.dst_off = (d + CHUNK) % self.dst.len();
        }
        start.elapsed()
    }
}

/// Bytes per second for `bytes` moved in `wall`.
pub fn bandwidth(bytes: u64, wall: Duration) -> f64 {
    let s = wall.as_secs_f64();
    if s > 0.0 { bytes as f64 / s } else { 0.0 }
}

/// Peer role of [`ShmStream`].
pub const SHM_STREAM_ROLE: &str = "shm-stream";

// Layout of the stream mapping: producer and consumer counters on separate cache-line pairs,
// then a 1 MiB ring (the link stream's ring size).
const STREAM_PROD: usize = 0;
const STREAM_CONS: usize = 128;
const STREAM_DATA: usize = 4096;
const STREAM_LEN: usize = STREAM_DATA + MEMCPY_DST;
/// [`CHUNK`] as a stream position step.
const CHUNK_U32: u32 = CHUNK as u32;
/// How far the writer may run ahead of the reader: the ring less one chunk.
const RING_ROOM: u32 = (MEMCPY_DST - CHUNK) as u32;

/// Where stream position `pos` (bytes, modulo 2^32) lies in the ring.
fn ring_offset(pos: u32) -> usize {
    // MEMCPY_DST divides 2^32, so the position wrapping keeps the offset continuous.
    pos as usize % MEMCPY_DST
}

/// The cross-process bandwidth ceiling: 64 KiB chunks one way through a 1 MiB ring in shared
/// memory between two processes that spin (no wake-ups, no protocol beyond two counters on
/// separate cache lines). What a link stream could reach at best on this machine, measured in
/// the same run; the difference to [`Memcpy`] is the cost of moving the bytes between cores.
#[derive(Debug)]
pub struct ShmStream {
    map: Region,
    chunk: Vec<u8>,
    /// Bytes written so far, modulo 2^32 (the ring size divides 2^32).
    prod: u32,
    peer: PeerProcess,
}

impl ShmStream {
    /// Creates the mapping and starts the spinning reader.
    pub fn new() -> io::Result<ShmStream> {
        let fd = memfd_create("dombus-bench-stream", MemfdFlags::CLOEXEC).map_err(os)?;
        ftruncate(&fd, STREAM_LEN as u64).map_err(os)?;
        let map = map_memfd(&fd, STREAM_LEN)?;
        let peer = PeerProcess::spawn(SHM_STREAM_ROLE, "", &[fd.as_fd()])?;
        Ok(ShmStream { map, chunk: (0..CHUNK).map(|i| i as u8).collect(), prod: 0, peer })
    }

    /// Streams `chunks` chunks and waits until the reader has consumed them all.
    pub fn run(&mut self, chunks: u64) -> Duration {
        let ShmStream { map, chunk, prod, .. } = self;
        let start = Instant::now();
        for _ in 0..chunks {
            while prod.wrapping_sub(map.load_u32(STREAM_CONS)) > RING_ROOM {
                spin_loop();
            }
            // CHUNK divides the ring size, so a chunk never wraps.
            map.write_bytes(STREAM_DATA + ring_offset(*prod), chunk);
            *prod = prod.wrapping_add(CHUNK_U32);
            map.store_u32(STREAM_PROD, *prod);
        }
        while map.load_u32(STREAM_CONS) != *prod {
            spin_loop();
        }
        start.elapsed()
    }

    /// The reading process.
    pub fn peer(&self) -> &PeerProcess {
        &self.peer
    }
}

impl Drop for ShmStream {
    fn drop(&mut self) {
        self.map.store_u32(STREAM_PROD, STOP);
    }
}

/// The peer of [`ShmStream`]: copies every chunk out of the ring as soon as it is there.
pub(crate) fn shm_stream_child(fds: Vec<OwnedFd>) -> io::Result<()> {
    let [fd]: [OwnedFd; 1] =
        fds.try_into().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "need 1 fd"))?;
    let map = map_memfd(&fd, STREAM_LEN)?;
    let mut buf = vec![0u8; CHUNK];
    let mut cons = 0u32;
    loop {
        let prod = map.load_u32(STREAM_PROD);
        if prod == STOP {
            return Ok(());
        }
        if prod == cons {
            spin_loop();
            continue;
        }
        map.read_bytes(STREAM_DATA + ring_offset(cons), &mut buf);
        // Keep the copy: nothing else reads `buf`, and the compiler may drop a dead copy.
        std::hint::black_box(&mut buf);
        cons = cons.wrapping_add(CHUNK_U32);
        map.store_u32(STREAM_CONS, cons);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_numbers_wrap_around_stop() {
        assert_eq!(next_seq(0), 1);
        assert_eq!(next_seq(STOP - 1), 0);
        assert_eq!(next_seq(next_seq(STOP - 2)), 0);
    }

    #[test]
    fn stream_positions_wrap_with_the_ring() {
        assert_ne!(STOP % CHUNK_U32, 0, "STOP must never be a stream position");
        let last = 0u32.wrapping_sub(CHUNK_U32);
        assert_eq!(ring_offset(last), MEMCPY_DST - CHUNK);
        assert_eq!(ring_offset(last.wrapping_add(CHUNK_U32)), 0);
        // The writer's room check across the wrap: a full ring less one chunk ahead.
        let cons = last;
        let prod = cons.wrapping_add(RING_ROOM);
        assert_eq!(prod.wrapping_sub(cons), RING_ROOM);
    }
}
