//! The baselines the performance targets are ratios to: an eventfd ping-pong (the wake-up
//! floor), a shared-memory spin ping-pong (the polling floor) and single-process memcpy (the
//! bandwidth floor).

use std::hint::spin_loop;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::event::{EventfdFlags, eventfd};
use rustix::fs::{MemfdFlags, ftruncate, memfd_create};
use rustix::mm::{MapFlags, ProtFlags, mmap, munmap};

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

/// A shared mapping of a memfd; unmapped on drop.
#[derive(Debug)]
struct SharedMap {
    ptr: NonNull<u8>,
    len: usize,
}

impl SharedMap {
    fn new(fd: &OwnedFd, len: usize) -> io::Result<SharedMap> {
        // SAFETY: a fresh shared mapping chosen by the kernel aliases no Rust object.
        let ptr = unsafe {
            mmap(std::ptr::null_mut(), len, ProtFlags::READ | ProtFlags::WRITE, MapFlags::SHARED, fd, 0)
        }
        .map_err(os)?;
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SharedMap { ptr, len })
    }

    /// The atomic word at `off` (8-aligned, in bounds).
    fn word(&self, off: usize) -> &AtomicU64 {
        assert!(off & 7 == 0 && off + 8 <= self.len);
        // SAFETY: in bounds and aligned (the mapping is page-aligned); the memory stays mapped
        // while `self` lives, and is only ever accessed atomically at this offset by both
        // processes, so a shared `&AtomicU64` is sound.
        unsafe { &*self.ptr.as_ptr().add(off).cast::<AtomicU64>() }
    }

    /// Copies `src` into the mapping at `off`.
    fn write(&self, off: usize, src: &[u8]) {
        assert!(off + src.len() <= self.len);
        // SAFETY: in bounds; the protocol (Release/Acquire on the sequence words) guarantees the
        // peer is not accessing this area while we write it.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len()) }
    }

    /// Copies `dst.len()` bytes out of the mapping at `off`.
    fn read(&self, off: usize, dst: &mut [u8]) {
        assert!(off + dst.len() <= self.len);
        // SAFETY: in bounds; as for `write`, the peer is not writing this area meanwhile.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }
}

impl Drop for SharedMap {
    fn drop(&mut self) {
        // SAFETY: we mapped exactly this range and hand out no references that outlive `self`.
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

// Layout of the spin page: the two sequence words on separate cache-line pairs, then one page of
// data per direction.
const PING_SEQ: usize = 0;
const PONG_SEQ: usize = 128;
const PING_DATA: usize = 4096;
const PONG_DATA: usize = 8192;
const SHM_LEN: usize = 12288;
/// Largest payload of [`ShmSpinPingPong`].
pub const SHM_MAX_PAYLOAD: usize = 4096;
const STOP: u64 = u64::MAX;

/// Ping-pong through a shared memfd mapping, both processes spinning
/// ([`core::hint::spin_loop`]) on the peer's sequence word. Each round trip copies the payload
/// four times, as a link echo does: parent into the ping area, peer out of it and into the pong
/// area, parent out of that.
#[derive(Debug)]
pub struct ShmSpinPingPong {
    map: SharedMap,
    seq: u64,
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
        let map = SharedMap::new(&fd, SHM_LEN)?;
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
        let (ping, pong) = (map.word(PING_SEQ), map.word(PONG_SEQ));
        timed_loop(n, samples, || {
            *seq += 1;
            map.write(PING_DATA, out);
            ping.store(*seq, Ordering::Release);
            while pong.load(Ordering::Acquire) != *seq {
                spin_loop();
            }
            map.read(PONG_DATA, back);
            Ok(())
        })
    }

    fn peer(&self) -> &PeerProcess {
        &self.peer
    }
}

impl Drop for ShmSpinPingPong {
    fn drop(&mut self) {
        self.map.word(PING_SEQ).store(STOP, Ordering::Release);
    }
}

/// The peer of [`ShmSpinPingPong`]: fd `[memfd]`, argument the payload size.
pub(crate) fn shm_spin_child(fds: Vec<OwnedFd>, arg: &str) -> io::Result<()> {
    let [fd]: [OwnedFd; 1] =
        fds.try_into().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "need 1 fd"))?;
    let payload: usize =
        arg.parse().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad payload size"))?;
    let map = SharedMap::new(&fd, SHM_LEN)?;
    let (ping, pong) = (map.word(PING_SEQ), map.word(PONG_SEQ));
    let mut buf = vec![0u8; payload.min(SHM_MAX_PAYLOAD)];
    let mut last = 0;
    loop {
        let seq = ping.load(Ordering::Acquire);
        if seq == last {
            spin_loop();
            continue;
        }
        if seq == STOP {
            return Ok(());
        }
        map.read(PING_DATA, &mut buf);
        map.write(PONG_DATA, &buf);
        pong.store(seq, Ordering::Release);
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

/// The cross-process bandwidth ceiling: 64 KiB chunks one way through a 1 MiB ring in shared
/// memory between two processes that spin (no wake-ups, no protocol beyond two counters on
/// separate cache lines). What a link stream could reach at best on this machine, measured in
/// the same run; the difference to [`Memcpy`] is the cost of moving the bytes between cores.
#[derive(Debug)]
pub struct ShmStream {
    map: SharedMap,
    chunk: Vec<u8>,
    prod: u64,
    peer: PeerProcess,
}

impl ShmStream {
    /// Creates the mapping and starts the spinning reader.
    pub fn new() -> io::Result<ShmStream> {
        let fd = memfd_create("dombus-bench-stream", MemfdFlags::CLOEXEC).map_err(os)?;
        ftruncate(&fd, STREAM_LEN as u64).map_err(os)?;
        let map = SharedMap::new(&fd, STREAM_LEN)?;
        let peer = PeerProcess::spawn(SHM_STREAM_ROLE, "", &[fd.as_fd()])?;
        Ok(ShmStream { map, chunk: (0..CHUNK).map(|i| i as u8).collect(), prod: 0, peer })
    }

    /// Streams `chunks` chunks and waits until the reader has consumed them all.
    pub fn run(&mut self, chunks: u64) -> Duration {
        let ShmStream { map, chunk, prod, .. } = self;
        let (p, c) = (map.word(STREAM_PROD), map.word(STREAM_CONS));
        let start = Instant::now();
        for _ in 0..chunks {
            while *prod - c.load(Ordering::Acquire) > (MEMCPY_DST - CHUNK) as u64 {
                spin_loop();
            }
            // CHUNK divides the ring size, so a chunk never wraps.
            map.write(STREAM_DATA + (*prod as usize % MEMCPY_DST), chunk);
            *prod += CHUNK as u64;
            p.store(*prod, Ordering::Release);
        }
        while c.load(Ordering::Acquire) != *prod {
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
        self.map.word(STREAM_PROD).store(STOP, Ordering::Release);
    }
}

/// The peer of [`ShmStream`]: copies every chunk out of the ring as soon as it is there.
pub(crate) fn shm_stream_child(fds: Vec<OwnedFd>) -> io::Result<()> {
    let [fd]: [OwnedFd; 1] =
        fds.try_into().map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "need 1 fd"))?;
    let map = SharedMap::new(&fd, STREAM_LEN)?;
    let (p, c) = (map.word(STREAM_PROD), map.word(STREAM_CONS));
    let mut buf = vec![0u8; CHUNK];
    let mut cons = 0u64;
    loop {
        let prod = p.load(Ordering::Acquire);
        if prod == STOP {
            return Ok(());
        }
        if prod == cons {
            spin_loop();
            continue;
        }
        map.read(STREAM_DATA + (cons as usize % MEMCPY_DST), &mut buf);
        // Keep the copy: nothing else reads `buf`, and the compiler may drop a dead copy.
        std::hint::black_box(&mut buf);
        cons += CHUNK as u64;
        c.store(cons, Ordering::Release);
    }
}
