//! Small tools that run over any byte stream: echo, ping with latency percentiles, and a
//! pattern stream, checksummed and checked byte by byte by its receiver. Used by `dombus-link`,
//! the demo, the tests and the benches.

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Latency percentiles of a series of round trips.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Latency {
    /// Number of round trips measured.
    pub count: usize,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Smallest.
    pub min: Duration,
    /// Largest.
    pub max: Duration,
}

impl Latency {
    /// Percentiles of `samples` (sorted in place). `None` if empty.
    pub fn from_samples(samples: &mut [Duration]) -> Option<Latency> {
        if samples.is_empty() {
            return None;
        }
        samples.sort_unstable();
        Some(Latency {
            count: samples.len(),
            p50: percentile(samples, 50.0),
            p99: percentile(samples, 99.0),
            min: percentile(samples, 0.0),
            max: percentile(samples, 100.0),
        })
    }
}

/// Percentile `p` (0 to 100) of `sorted` (ascending), by the nearest-rank definition: the
/// smallest sample that at least `p` percent of the samples are less than or equal to, that is
/// the sample of rank ⌈p/100 · n⌉ (1-based, at least 1). No interpolation: the result is always
/// one of the samples. `p` = 0 gives the smallest, 100 the largest; p outside 0..=100 is
/// clamped. [`Duration::ZERO`] for no samples.
///
/// The one definition every latency figure of the project uses (`dombus-link`, the demo, the
/// benches), so that their figures can be compared.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let n = sorted.len();
    if n == 0 {
        return Duration::ZERO;
    }
    // Float to integer casts saturate (NaN gives 0), so any `p` lands on a valid rank.
    let rank = ((p.clamp(0.0, 100.0) / 100.0) * n as f64).ceil() as usize;
    sorted[rank.clamp(1, n) - 1]
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} round trips: p50 {:.1} µs, p99 {:.1} µs (min {:.1}, max {:.1})",
            self.count,
            us(self.p50),
            us(self.p99),
            us(self.min),
            us(self.max)
        )
    }
}

/// Microseconds as a float, for printing.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Echoes everything read back to the writer until end-of-stream; returns the bytes echoed.
pub async fn echo<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            stream.shutdown().await?;
            return Ok(total);
        }
        stream.write_all(&buf[..n]).await?;
        total += n as u64;
    }
}

/// Sends `count` messages of `size` bytes, waiting for each to be echoed back, after `warmup`
/// unmeasured ones; returns the round-trip percentiles. Fails if an echo differs.
pub async fn ping<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    size: usize,
    warmup: usize,
    count: usize,
) -> std::io::Result<Option<Latency>> {
    let msg: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        stream.write_all(&msg).await?;
        stream.read_exact(&mut back).await?;
        let rtt = t.elapsed();
        if back != msg {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "echo differs from what was sent",
            ));
        }
        if i >= warmup {
            samples.push(rtt);
        }
    }
    Ok(Latency::from_samples(&mut samples))
}

/// Period of the [`send_pattern`] byte pattern: a prime, so that it never lines up with ring
/// sizes or write sizes (a lost, repeated or reordered chunk changes the checksum).
const PATTERN_PERIOD: usize = 65521;

/// Writes `bytes` bytes of a deterministic pattern in `chunk`-sized writes, then shuts down the
/// write half. Returns the CRC-32 of what was written.
///
/// The pattern is generated once and written from slices of it, so the sender costs no more
/// than the link itself (plus the checksum).
pub async fn send_pattern<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: u64,
    chunk: usize,
) -> std::io::Result<u32> {
    let crc = write_pattern(stream, bytes, chunk).await?;
    stream.shutdown().await?;
    Ok(crc)
}

/// Writes `bytes` bytes of the pattern in `chunk`-sized writes; returns their CRC-32.
async fn write_pattern<W: AsyncWrite + Unpin>(w: &mut W, bytes: u64, chunk: usize) -> std::io::Result<u32> {
    let chunk = chunk.max(1);
    let table = pattern_table(chunk);
    let mut crc = crc32fast::Hasher::new();
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(chunk as u64) as usize;
        let start = (sent % PATTERN_PERIOD as u64) as usize;
        let piece = &table[start..start + n];
        w.write_all(piece).await?;
        crc.update(piece);
        sent += n as u64;
    }
    Ok(crc.finalize())
}

/// Writes `bytes` bytes of the [`send_pattern`] pattern to an echoing peer while reading the
/// echo back (no half-close: the echo ends when `bytes` have come back). Returns the CRC-32 of
/// what was sent and of what came back.
pub async fn roundtrip<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: u64,
    chunk: usize,
) -> std::io::Result<(u32, u32)> {
    let echo = roundtrip_checked(stream, bytes, chunk).await?;
    Ok((echo.sent_crc, echo.echo_crc))
}

/// What came back from an echoing peer, checked byte by byte against what was sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo {
    /// CRC-32 of what was sent.
    pub sent_crc: u32,
    /// CRC-32 of what came back.
    pub echo_crc: u32,
    /// The first difference, if any.
    pub first_difference: Option<Difference>,
    /// Bytes that differ in all.
    pub differing_bytes: u64,
}

/// Where an echo first differs from what was sent, described so that the kind of damage shows:
/// a few flipped bytes, a shifted stream (lost or repeated data), or a whole stale page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    /// Stream offset of the first differing byte.
    pub offset: u64,
    /// Length of the read that brought it, and its offset in the stream.
    pub read: (u64, usize),
    /// Up to 16 bytes expected from `offset` on.
    pub expected: Vec<u8>,
    /// Up to 16 bytes received from `offset` on.
    pub got: Vec<u8>,
    /// If the received bytes are the pattern at another position: that position (modulo the
    /// pattern period), which tells a shift from garbage.
    pub got_is_pattern_at: Option<usize>,
}

impl std::fmt::Display for Difference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        write!(
            f,
            "first difference at stream offset {} (read of {} bytes at {}): expected {} got {}",
            self.offset,
            self.read.1,
            self.read.0,
            hex(&self.expected),
            hex(&self.got)
        )?;
        match self.got_is_pattern_at {
            Some(p) => write!(
                f,
                "; the bytes received are the pattern at offset {p} (mod {PATTERN_PERIOD}), expected {}",
                self.offset % PATTERN_PERIOD as u64
            ),
            None => write!(f, "; the bytes received are not the sent pattern anywhere"),
        }
    }
}

/// Compares a stream, read piece by piece, with the [`send_pattern`] pattern.
#[derive(Debug)]
pub struct PatternCheck {
    table: Vec<u8>,
    crc: crc32fast::Hasher,
    offset: u64,
    first_difference: Option<Difference>,
    differing_bytes: u64,
}

impl Default for PatternCheck {
    fn default() -> Self {
        PatternCheck::new()
    }
}

impl PatternCheck {
    /// Longest piece [`PatternCheck::update`] compares at once (longer ones are split).
    const PIECE: usize = 64 << 10;

    /// A check of a stream that starts at the pattern's beginning.
    pub fn new() -> PatternCheck {
        PatternCheck {
            table: pattern_table(Self::PIECE),
            crc: crc32fast::Hasher::new(),
            offset: 0,
            first_difference: None,
            differing_bytes: 0,
        }
    }

    /// Checks the next `data` of the stream.
    pub fn update(&mut self, data: &[u8]) {
        self.crc.update(data);
        for piece in data.chunks(Self::PIECE) {
            self.compare(piece);
            self.offset += piece.len() as u64;
        }
    }

    fn compare(&mut self, got: &[u8]) {
        let start = (self.offset % PATTERN_PERIOD as u64) as usize;
        let expected = &self.table[start..start + got.len()];
        if expected == got {
            return;
        }
        self.differing_bytes += expected.iter().zip(got).filter(|(a, b)| a != b).count() as u64;
        if self.first_difference.is_some() {
            return;
        }
        let at = expected.iter().zip(got).position(|(a, b)| a != b).unwrap_or(0);
        let end = (at + 16).min(got.len());
        let got_bytes = &got[at..end];
        let got_is_pattern_at = self.table[..PATTERN_PERIOD + got_bytes.len()]
            .windows(got_bytes.len())
            .position(|w| w == got_bytes);
        self.first_difference = Some(Difference {
            offset: self.offset + at as u64,
            read: (self.offset, got.len()),
            expected: expected[at..end].to_vec(),
            got: got_bytes.to_vec(),
            got_is_pattern_at,
        });
    }

    /// Bytes checked so far.
    pub fn bytes(&self) -> u64 {
        self.offset
    }

    /// The first difference so far, if any.
    pub fn first_difference(&self) -> Option<&Difference> {
        self.first_difference.as_ref()
    }

    /// The CRC-32 of everything checked, the first difference and the count of differing bytes.
    pub fn finish(self) -> (u32, Option<Difference>, u64) {
        (self.crc.finalize(), self.first_difference, self.differing_bytes)
    }
}

/// Like [`roundtrip`], and compares every byte that comes back with the byte sent at that
/// position (a CRC says only that the echo differs; this says where and how).
pub async fn roundtrip_checked<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: u64,
    chunk: usize,
) -> std::io::Result<Echo> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let send = write_pattern(&mut wr, bytes, chunk);
    let recv = async {
        let mut check = PatternCheck::new();
        let mut buf = vec![0u8; 64 << 10];
        while check.bytes() < bytes {
            let want = (bytes - check.bytes()).min(buf.len() as u64) as usize;
            let n = rd.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the echo ended after {} of {bytes} bytes", check.bytes()),
                ));
            }
            check.update(&buf[..n]);
        }
        Ok(check.finish())
    };
    let (sent_crc, (echo_crc, first_difference, differing_bytes)) = tokio::try_join!(send, recv)?;
    Ok(Echo { sent_crc, echo_crc, first_difference, differing_bytes })
}

/// Like [`echo`], for a peer that sends the [`send_pattern`] pattern: also checks what it
/// receives, so that damage is pinned to a direction. Returns the bytes echoed and the first
/// difference from the pattern, if any.
pub async fn echo_pattern<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
) -> std::io::Result<(u64, Option<Difference>)> {
    let mut buf = vec![0u8; 64 << 10];
    let mut check = PatternCheck::new();
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            stream.shutdown().await?;
            let bytes = check.bytes();
            return Ok((bytes, check.finish().1));
        }
        check.update(&buf[..n]);
        stream.write_all(&buf[..n]).await?;
    }
}

/// The pattern of [`send_pattern`], with `extra` bytes past one period so that any window of up
/// to `extra` bytes is one slice.
fn pattern_table(extra: usize) -> Vec<u8> {
    (0..PATTERN_PERIOD + extra).map(|i| (((i % PATTERN_PERIOD) as u64 * 2654435761) >> 13) as u8).collect()
}

/// What [`recv_pattern`] read: how much, its CRC-32, and whether it was the pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Bytes read before end-of-stream.
    pub bytes: u64,
    /// CRC-32 of what was read.
    pub crc: u32,
    /// The first byte that is not the [`send_pattern`] pattern at its offset, if any.
    pub first_difference: Option<Difference>,
    /// Bytes that differ from the pattern in all.
    pub differing_bytes: u64,
}

/// Reads until end-of-stream from a peer that sends the [`send_pattern`] pattern, and compares
/// every byte with the pattern byte at its offset: a CRC only says that two ends disagree,
/// while this tells the receiving end on its own that what arrived is wrong, and where.
///
/// It reads on to the end after a difference (the sender's byte count is bounded), so that the
/// count of differing bytes shows the kind of damage and the sender finishes normally; the
/// caller decides to fail.
pub async fn recv_pattern<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<Received> {
    let mut check = PatternCheck::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            let bytes = check.bytes();
            let (crc, first_difference, differing_bytes) = check.finish();
            return Ok(Received { bytes, crc, first_difference, differing_bytes });
        }
        check.update(&buf[..n]);
    }
}

/// Reads until end-of-stream; returns the byte count and CRC-32 of what was read.
pub async fn recv_all<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<(u64, u32)> {
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok((total, crc.finalize()));
        }
        crc.update(&buf[..n]);
        total += n as u64;
    }
}

/// Heap bytes live in the whole process, as [`CountingAlloc`] counts them.
static LIVE_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);
/// The most heap bytes live at once since [`CountingAlloc::reset_peak`].
static PEAK_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

/// The system allocator, counting the bytes live and their high-water mark: for tests and tools
/// that measure what a peer makes a process hold (install it with `#[global_allocator]`; the
/// counts are process-wide).
pub struct CountingAlloc;

impl CountingAlloc {
    /// Heap bytes live now (0 unless this is the process's global allocator).
    pub fn live() -> isize {
        LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most heap bytes live at once since the last [`CountingAlloc::reset_peak`].
    pub fn peak() -> isize {
        PEAK_BYTES.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Starts a new high-water mark at the bytes live now.
    pub fn reset_peak() {
        PEAK_BYTES.store(CountingAlloc::live(), std::sync::atomic::Ordering::Relaxed);
    }

    fn grow(n: usize) {
        let n = isize::try_from(n).unwrap_or(isize::MAX);
        let now = LIVE_BYTES.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
        PEAK_BYTES.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
    }

    fn shrink(n: usize) {
        LIVE_BYTES.fetch_sub(isize::try_from(n).unwrap_or(isize::MAX), std::sync::atomic::Ordering::Relaxed);
    }
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract is `System`'s; the counting only touches atomics and never allocates.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded under the caller's guarantees (non-zero size layout).
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            CountingAlloc::grow(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            CountingAlloc::grow(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` was allocated by `System` (through this allocator) with `layout`.
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        CountingAlloc::shrink(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: forwarded under the caller's guarantees about `ptr`, `layout` and `new_size`.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CountingAlloc::shrink(layout.size());
            CountingAlloc::grow(new_size);
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut s: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let l = Latency::from_samples(&mut s).unwrap();
        // Nearest rank: the 50th of 100 samples (see `percentile`).
        assert_eq!(l.p50, Duration::from_micros(50));
        assert_eq!(l.p99, Duration::from_micros(99));
        assert_eq!(l.min, Duration::from_micros(1));
        assert!(Latency::from_samples(&mut []).is_none());
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let us = Duration::from_micros;
        let ten: Vec<Duration> = (1..=10).map(us).collect();
        // Rank ⌈p/100 · 10⌉: p50 is the 5th sample, p90 the 9th, p91 the 10th.
        assert_eq!(percentile(&ten, 50.0), us(5));
        assert_eq!(percentile(&ten, 90.0), us(9));
        assert_eq!(percentile(&ten, 91.0), us(10));
        assert_eq!(percentile(&ten, 99.0), us(10));
        assert_eq!(percentile(&ten, 0.0), us(1));
        assert_eq!(percentile(&ten, 100.0), us(10));
        // Of four samples the median is the lower middle one, never an interpolated value.
        assert_eq!(percentile(&[us(1), us(2), us(4), us(8)], 50.0), us(2));
        assert_eq!(percentile(&[us(7)], 99.0), us(7));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
        assert_eq!(percentile(&ten, 250.0), us(10));
        assert_eq!(percentile(&ten, -5.0), us(1));
        assert_eq!(percentile(&ten, f64::NAN), us(1));
    }

    #[test]
    fn pattern_check_says_where_and_how_a_stream_differs() {
        let table = pattern_table(0);
        let stream: Vec<u8> = (0..200_000).map(|i| table[i % PATTERN_PERIOD]).collect();

        let mut clean = PatternCheck::new();
        for piece in stream.chunks(7_777) {
            clean.update(piece);
        }
        assert_eq!(clean.bytes(), 200_000);
        let (crc, diff, n) = clean.finish();
        assert_eq!((crc, diff, n), (crc32fast::hash(&stream), None, 0));

        // 64 zeroed bytes inside the second piece: found, counted, described as garbage.
        let mut damaged = stream.clone();
        damaged[70_000..70_064].fill(0);
        let mut check = PatternCheck::new();
        check.update(&damaged[..65_536]);
        check.update(&damaged[65_536..]);
        let (_, diff, n) = check.finish();
        let diff = diff.expect("a difference");
        let first = (70_000..70_064).find(|&i| stream[i] != 0).expect("the pattern is not all zeros");
        assert_eq!(diff.offset, first as u64);
        assert_eq!(diff.read, (65_536, 65_536));
        assert_eq!(diff.got, damaged[first..first + 16].to_vec());
        assert_eq!(diff.got_is_pattern_at, None);
        assert!(n > 60 && n <= 64, "{n}");

        // A lost chunk: what follows is the pattern from later on, and the report says so.
        let mut shifted = stream[..1_000].to_vec();
        shifted.extend_from_slice(&stream[1_500..]);
        let mut check = PatternCheck::new();
        check.update(&shifted);
        let diff = check.finish().1.expect("a difference");
        assert_eq!(diff.offset, 1_000);
        assert_eq!(diff.got_is_pattern_at, Some(1_500));
        assert!(diff.to_string().contains("pattern at offset 1500"), "{diff}");
    }

    #[tokio::test]
    async fn a_corrupting_echo_is_caught_and_located() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let echo = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut at = 0u64;
            loop {
                let n = server.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                // Flip the byte at stream offset 100_000 on the way back.
                if (at..at + n as u64).contains(&100_000) {
                    buf[(100_000 - at) as usize] ^= 0xff;
                }
                at += n as u64;
                server.write_all(&buf[..n]).await.unwrap();
            }
        });
        let echo_result = roundtrip_checked(&mut client, 150_000, 3_000).await.unwrap();
        drop(client);
        echo.await.unwrap();
        assert_ne!(echo_result.sent_crc, echo_result.echo_crc);
        assert_eq!(echo_result.differing_bytes, 1);
        assert_eq!(echo_result.first_difference.map(|d| d.offset), Some(100_000));
    }

    #[tokio::test]
    async fn echo_pattern_checks_what_comes_in() {
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move { echo_pattern(&mut server).await.unwrap() });
        let echo = roundtrip_checked(&mut client, 100_000, 4_096).await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert_eq!((echo.first_difference, echo.sent_crc == echo.echo_crc), (None, true));
        assert_eq!(server.await.unwrap(), (100_000, None));
    }

    #[tokio::test]
    async fn recv_pattern_checks_every_byte() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let sender = tokio::spawn(async move { send_pattern(&mut a, 300_000, 5_000).await.unwrap() });
        let got = recv_pattern(&mut b).await.unwrap();
        assert_eq!(
            (got.bytes, got.crc, got.first_difference, got.differing_bytes),
            (300_000, sender.await.unwrap(), None, 0)
        );

        // One byte flipped in transit: the receiver alone finds it, at its offset.
        let mut stream = pattern_table(0);
        stream.extend_from_slice(&pattern_table(0)[..10_000]);
        stream[70_000] ^= 0x5a;
        let got = recv_pattern(&mut &stream[..]).await.unwrap();
        assert_eq!((got.bytes, got.differing_bytes), (stream.len() as u64, 1));
        assert_eq!(got.first_difference.map(|d| d.offset), Some(70_000));
        assert_eq!(got.crc, crc32fast::hash(&stream));
    }

    #[tokio::test]
    async fn pattern_roundtrip_over_a_duplex() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        let sender = tokio::spawn(async move { send_pattern(&mut a, 100_000, 3000).await.unwrap() });
        let (n, crc) = recv_all(&mut b).await.unwrap();
        assert_eq!(n, 100_000);
        assert_eq!(crc, sender.await.unwrap());
    }
}
