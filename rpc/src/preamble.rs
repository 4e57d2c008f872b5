//! The connection preamble: before any RPC frame, the client says which protocol version,
//! codec and service it wants, and the server says yes or why not. A client that reached the
//! wrong service, or an incompatible server, gets a clear error instead of a decode failure.
//!
//! ```text
//! client → server   "DOMBUS" | version u8 | codec u8 | name length u8 (1..=64) | name (ASCII)
//! server → client   "DB" | status u8 | message length u8 | message (UTF-8, ≤ 255 bytes)
//! ```
//! Status: 0 accepted, 1 no such service, 2 unsupported version, 3 unsupported codec,
//! 4 malformed preamble, 5 too many connections (try again later). Everything read is bounded
//! by the lengths above.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::codec::Codec;

/// The protocol version this build speaks.
pub const VERSION: u8 = 1;
/// Longest service name.
pub const MAX_NAME: usize = 64;
const MAGIC: &[u8; 6] = b"DOMBUS";
const REPLY_MAGIC: &[u8; 2] = b"DB";

/// What a client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// Protocol version.
    pub version: u8,
    /// Codec byte (see [`Codec::id`]).
    pub codec: u8,
    /// Service name.
    pub service: String,
}

/// Why a server refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No service of that name here.
    NoSuchService = 1,
    /// The protocol version is not ours.
    Version = 2,
    /// The codec is unknown.
    Codec = 3,
    /// Not a dombus preamble.
    Malformed = 4,
    /// The server has as many connections open as it takes (`ServerConfig::max_connections`).
    TooManyConnections = 5,
}

/// Start of the message of a connection refused because the server has as many open as it
/// takes ([`Refusal::TooManyConnections`]).
pub const TOO_MANY_CONNECTIONS: &str = "too many connections";

/// Why a client's connection was refused: the server had as many open as it takes. Inside the
/// `io::Error` (kind `ConnectionRefused`) of the connect; see [`too_many_connections`]. Calls
/// are retried with the client's backoff, so one refusal is not yet a failed call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the server refused the connection: {message}")]
pub struct TooManyConnections {
    /// What the server said.
    pub message: String,
}

/// The [`TooManyConnections`] inside a connect error, if that is what it is.
pub fn too_many_connections(e: &io::Error) -> Option<&TooManyConnections> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<TooManyConnections>())
}

/// Checks a service name: 1 to 64 bytes of `A-Z a-z 0-9 _ . -`.
pub fn check_name(name: &str) -> io::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?}: a service name is 1 to {MAX_NAME} characters of A-Z a-z 0-9 _ . -"),
        ))
    }
}

/// Client side: sends the preamble for `service` and waits (up to `timeout`) for the answer.
pub async fn client<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    service: &str,
    codec: Codec,
    timeout: Duration,
) -> io::Result<()> {
    check_name(service)?;
    let mut hello = Vec::with_capacity(9 + service.len());
    hello.extend_from_slice(MAGIC);
    hello.extend_from_slice(&[VERSION, codec.id(), service.len() as u8]);
    hello.extend_from_slice(service.as_bytes());
    let answer = async {
        s.write_all(&hello).await?;
        s.flush().await?;
        let mut head = [0u8; 4];
        s.read_exact(&mut head).await?;
        if &head[..2] != REPLY_MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the peer is not a dombus RPC server (bad preamble answer)",
            ));
        }
        let mut msg = vec![0u8; usize::from(head[3])];
        s.read_exact(&mut msg).await?;
        Ok((head[2], String::from_utf8_lossy(&msg).into_owned()))
    };
    let (status, msg) = tokio::time::timeout(timeout, answer)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the server did not answer the preamble"))??;
    match status {
        0 => Ok(()),
        1 => Err(io::Error::new(io::ErrorKind::NotFound, format!("no service {service:?} there: {msg}"))),
        2 | 3 => Err(io::Error::new(io::ErrorKind::Unsupported, format!("incompatible server: {msg}"))),
        5 => Err(io::Error::new(io::ErrorKind::ConnectionRefused, TooManyConnections { message: msg })),
        _ => Err(io::Error::new(io::ErrorKind::InvalidData, format!("server refused the preamble: {msg}"))),
    }
}

/// Server side: reads a client's preamble (bounded, up to `timeout`).
pub async fn read_hello<S: AsyncRead + Unpin>(s: &mut S, timeout: Duration) -> Result<Hello, Refusal> {
    let read = async {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).await.map_err(|_| Refusal::Malformed)?;
        if &head[..6] != MAGIC {
            return Err(Refusal::Malformed);
        }
        let len = usize::from(head[8]);
        if len == 0 || len > MAX_NAME {
            return Err(Refusal::Malformed);
        }
        let mut name = vec![0u8; len];
        s.read_exact(&mut name).await.map_err(|_| Refusal::Malformed)?;
        let service = String::from_utf8(name).map_err(|_| Refusal::Malformed)?;
        check_name(&service).map_err(|_| Refusal::Malformed)?;
        Ok(Hello { version: head[6], codec: head[7], service })
    };
    tokio::time::timeout(timeout, read).await.unwrap_or(Err(Refusal::Malformed))
}

/// Server side: answers a preamble (`None` = accepted).
pub async fn answer<S: AsyncWrite + Unpin>(s: &mut S, refusal: Option<Refusal>, msg: &str) -> io::Result<()> {
    let msg = &msg.as_bytes()[..msg.len().min(255)];
    let mut out = Vec::with_capacity(4 + msg.len());
    out.extend_from_slice(REPLY_MAGIC);
    out.extend_from_slice(&[refusal.map_or(0, |r| r as u8), msg.len() as u8]);
    out.extend_from_slice(msg);
    s.write_all(&out).await?;
    s.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn accepted_and_refused() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let server = tokio::spawn(async move {
            let h = read_hello(&mut b, T).await.unwrap();
            assert_eq!(h, Hello { version: VERSION, codec: Codec::Bincode.id(), service: "storage".into() });
            answer(&mut b, Some(Refusal::NoSuchService), "this is network").await.unwrap();
        });
        let e = client(&mut a, "storage", Codec::Bincode, T).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
        assert!(e.to_string().contains("this is network"), "{e}");
        server.await.unwrap();
    }

    #[tokio::test]
    async fn garbage_is_malformed_and_bad_names_are_refused_locally() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(read_hello(&mut b, T).await, Err(Refusal::Malformed));
        let (mut a, mut b) = tokio::io::duplex(1024);
        a.write_all(b"DOMBUS\x01\x01\x00").await.unwrap();
        assert_eq!(read_hello(&mut b, T).await, Err(Refusal::Malformed), "empty name");
        assert!(check_name("a/b").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
        let e = client(&mut a, "../x", Codec::Postcard, T).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn a_silent_server_times_out() {
        let (mut a, _b) = tokio::io::duplex(1024);
        let e = client(&mut a, "x", Codec::Postcard, Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    }
}
