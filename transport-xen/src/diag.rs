//! Small tools that run over any byte stream: echo, ping with latency percentiles, and a
//! checksummed pattern stream. Used by `dombus-link`, the demo, the tests and the benches.

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
        let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
        Some(Latency {
            count: samples.len(),
            p50: at(0.50),
            p99: at(0.99),
            min: samples[0],
            max: samples[samples.len() - 1],
        })
    }
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
    let (mut rd, mut wr) = tokio::io::split(stream);
    let send = write_pattern(&mut wr, bytes, chunk);
    let recv = async {
        let mut crc = crc32fast::Hasher::new();
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0u64;
        while got < bytes {
            let want = (bytes - got).min(buf.len() as u64) as usize;
            let n = rd.read(&mut buf[..want]).await?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the echo ended after {got} of {bytes} bytes"),
                ));
            }
            crc.update(&buf[..n]);
            got += n as u64;
        }
        Ok(crc.finalize())
    };
    tokio::try_join!(send, recv)
}

/// The pattern of [`send_pattern`], with `extra` bytes past one period so that any window of up
/// to `extra` bytes is one slice.
fn pattern_table(extra: usize) -> Vec<u8> {
    (0..PATTERN_PERIOD + extra).map(|i| (((i % PATTERN_PERIOD) as u64 * 2654435761) >> 13) as u8).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut s: Vec<Duration> = (1..=100).rev().map(Duration::from_micros).collect();
        let l = Latency::from_samples(&mut s).unwrap();
        assert_eq!(l.p50, Duration::from_micros(51));
        assert_eq!(l.p99, Duration::from_micros(99));
        assert_eq!(l.min, Duration::from_micros(1));
        assert!(Latency::from_samples(&mut []).is_none());
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
