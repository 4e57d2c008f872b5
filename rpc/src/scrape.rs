//! A Prometheus scrape endpoint: answers `GET /metrics` over HTTP/1.1 with a server's
//! [`Metrics`] in the text format (what daemons serve with `--metrics-listen`).
//!
//! Hand-written rather than an HTTP crate (hyper, axum): it answers one method on one path,
//! one request per connection (`Connection: close`, no keep-alive, no body), so all it parses
//! is a request line, and the headers are only skipped. A crate would add an HTTP stack to
//! every daemon for that. What a scraper can make it hold is bounded: a request head of at
//! most [`MAX_REQUEST_HEAD`] bytes, read within [`READ_TIMEOUT`], at most [`MAX_SCRAPERS`]
//! connections at once, and an answer of at most [`MAX_METRICS_TEXT`] bytes of metrics.
//! Serve it on a loopback or host-local address (e.g. `127.0.0.1:9464`): anyone who reaches it
//! reads the metrics.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::metrics::{MAX_METRICS_TEXT, Metrics};

/// Most bytes of a request's head (request line and headers) read before answering 431.
pub const MAX_REQUEST_HEAD: usize = 8 << 10;
/// How long a scraper may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrape connections served at once; more wait in the listen backlog.
pub const MAX_SCRAPERS: usize = 16;

/// The path answered.
const PATH: &str = "/metrics";

/// A running scrape endpoint; [`ScrapeEndpoint::stop`] stops it.
#[derive(Debug)]
pub struct ScrapeEndpoint {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl ScrapeEndpoint {
    /// Serves `metrics` on `addr` (port 0: any free port, see [`local_addr`](Self::local_addr)).
    pub async fn bind(addr: SocketAddr, metrics: Metrics) -> io::Result<ScrapeEndpoint> {
        ScrapeEndpoint::bind_with(addr, metrics, READ_TIMEOUT).await
    }

    /// Serves `metrics` on `addr` if one is given (a daemon's `--metrics-listen`).
    pub async fn bind_if(addr: Option<SocketAddr>, metrics: &Metrics) -> io::Result<Option<ScrapeEndpoint>> {
        match addr {
            Some(addr) => ScrapeEndpoint::bind(addr, metrics.clone())
                .await
                .map(Some)
                .map_err(|e| io::Error::new(e.kind(), format!("serving metrics on {addr}: {e}"))),
            None => Ok(None),
        }
    }

    async fn bind_with(addr: SocketAddr, metrics: Metrics, timeout: Duration) -> io::Result<ScrapeEndpoint> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "serving metrics on a non-loopback address: whoever reaches it reads them");
        }
        let permits = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
        let task = tokio::spawn(async move {
            let mut scrapes = tokio::task::JoinSet::new();
            loop {
                while scrapes.try_join_next().is_some() {}
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let metrics = metrics.clone();
                        scrapes.spawn(async move {
                            let _permit = permit;
                            let _ = scrape(stream, &metrics, timeout).await;
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
        });
        tracing::info!(%addr, "serving metrics at http://{addr}{PATH}");
        Ok(ScrapeEndpoint { addr, task })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops listening and drops the open connections.
    pub async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// One connection: reads a request head (bounded in size and time), writes the answer, closes.
async fn scrape(mut stream: TcpStream, metrics: &Metrics, timeout: Duration) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let read = tokio::time::timeout(timeout, async {
        let mut buf = [0u8; 1024];
        loop {
            if head_end(&head).is_some() {
                return Ok(true);
            }
            if head.len() >= MAX_REQUEST_HEAD {
                return Ok(false);
            }
            let room = (MAX_REQUEST_HEAD - head.len()).min(buf.len());
            let n = stream.read(&mut buf[..room]).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            head.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let answer = match read {
        Err(_) => return Ok(()),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(false)) => status(431, "Request Header Fields Too Large", ""),
        Ok(Ok(true)) => respond(&head, metrics),
    };
    tokio::time::timeout(timeout, async {
        stream.write_all(&answer).await?;
        stream.shutdown().await?;
        // Reads what the scraper sent past the head before closing (a socket closed with
        // unread bytes resets the connection, and the scraper could lose the answer).
        let mut rest = [0u8; 1024];
        let mut left = MAX_REQUEST_HEAD * 8;
        while left > 0 {
            let n = stream.read(&mut rest).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok(())
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Where the head ends (after its blank line), if it is all there.
fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The whole HTTP answer to a request head.
fn respond(head: &[u8], metrics: &Metrics) -> Vec<u8> {
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return status(400, "Bad Request", "");
    };
    if !version.starts_with(b"HTTP/1.") {
        return status(400, "Bad Request", "");
    }
    if method != b"GET" {
        return status(405, "Method Not Allowed", "Allow: GET\r\n");
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or_default();
    if path != PATH.as_bytes() {
        return status(404, "Not Found", "");
    }
    let body = metrics.prometheus_within(MAX_METRICS_TEXT);
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// An answer without a body (`headers`: extra header lines, each ending in CRLF).
fn status(code: u16, reason: &str, headers: &str) -> Vec<u8> {
    format!("HTTP/1.1 {code} {reason}\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
        .into_bytes()
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};

    use super::*;

    fn metrics() -> Metrics {
        let m = Metrics::new("server");
        m.record("kv", "get", true, Duration::from_micros(40));
        m.record("kv", "get", true, Duration::from_micros(40));
        m
    }

    #[test]
    fn answers_get_metrics_and_refuses_the_rest() {
        let m = metrics();
        let ok = String::from_utf8(respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m)).unwrap();
        let (head, body) = ok.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("Content-Type: text/plain; version=0.0.4"), "{head}");
        assert!(head.contains(&format!("Content-Length: {}\r\n", body.len())), "{head}");
        assert!(body.contains("dombus_rpc_server_calls_total{service=\"kv\",method=\"get\"} 2"), "{body}");
        assert!(respond(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", &m).starts_with(b"HTTP/1.1 200 OK\r\n"));
        let code = |req: &[u8]| String::from_utf8(respond(req, &m)).unwrap()[9..12].to_string();
        assert_eq!(code(b"POST /metrics HTTP/1.1\r\n\r\n"), "405");
        assert_eq!(code(b"GET / HTTP/1.1\r\n\r\n"), "404");
        assert_eq!(code(b"GET /metricsx HTTP/1.1\r\n\r\n"), "404");
        assert_eq!(code(b"GET /metrics\r\n\r\n"), "400");
        assert_eq!(code(b"GET /metrics SPDY/3\r\n\r\n"), "400");
        assert_eq!(code(b"GET  /metrics HTTP/1.1\r\n\r\n"), "400");
        assert_eq!(code(b"\r\n\r\n"), "400");
    }

    /// A plain TCP client, as a scraper is: one request, the answer until the server closes.
    fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn serves_a_scrape_over_tcp_within_its_bounds() {
        let ep =
            ScrapeEndpoint::bind_with("127.0.0.1:0".parse().unwrap(), metrics(), Duration::from_millis(300))
                .await
                .unwrap();
        let addr = ep.local_addr();
        let answer = tokio::task::spawn_blocking(move || {
            let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
            // A head longer than the bound, never finished: 431, not an endless read.
            let mut long = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
            long.resize(MAX_REQUEST_HEAD + 100, b'a');
            let too_long = get(addr, &long);
            // A head that never ends: the connection is closed at the read deadline.
            let started = std::time::Instant::now();
            let mut slow = std::net::TcpStream::connect(addr).unwrap();
            slow.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
            let mut rest = Vec::new();
            slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let n = slow.read_to_end(&mut rest).map(|_| rest.len());
            (ok, too_long, n.ok(), started.elapsed())
        })
        .await
        .unwrap();
        let (ok, too_long, slow, waited) = answer;
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("\r\nConnection: close\r\n"), "{ok}");
        assert!(ok.contains("dombus_rpc_server_calls_total{service=\"kv\",method=\"get\"} 2\n"), "{ok}");
        assert!(too_long.starts_with("HTTP/1.1 431 "), "{too_long}");
        assert_eq!(slow, Some(0), "a slow client got an answer");
        assert!(waited < Duration::from_secs(5), "the read deadline was not kept: {waited:?}");
        ep.stop().await;
    }
}
