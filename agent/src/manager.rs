//! The protocol between a domain's agent and the connection manager in the backend domain.
//!
//! Each agent keeps one virtual-socket connection to port [`MANAGER_PORT`] of the backend
//! domain (the one link every domain may set up on its own). The backend domain is the only
//! domain that may listen on that port, and the link says which domain an agent speaks for, so
//! neither side takes the other's word for who it is.
//!
//! Every message is a 4-byte little-endian length (at most [`MAX_MESSAGE`]) followed by that many
//! bytes of one postcard-encoded [`ToManager`] or [`FromManager`]. The agent opens with
//! [`ToManager::Hello`] and the manager answers [`FromManager::Welcome`] (the domain's name as
//! the toolstack gave it, and the policy's generation); then the agent makes [`Call`]s, each
//! answered by a [`FromManager::Reply`] with the call's id, in any order, while the manager
//! pushes notices at any time: an introduction to set up a link, a changed policy (cached
//! decisions are void), a revocation.

use std::io;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The backend domain's port the connection manager listens on (privileged: only the backend
/// domain and the toolstack may listen below 1024).
pub const MANAGER_PORT: u32 = 2;
/// The protocol's version, in [`ToManager::Hello`].
pub const VERSION: u32 = 1;
/// Longest message either side sends or accepts.
pub const MAX_MESSAGE: usize = 64 << 10;
/// Most links one [`ToManager::Links`] report lists.
pub const MAX_REPORTED_LINKS: usize = 4096;

/// Whom an introduction is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    /// A domain id.
    Id(u16),
    /// A domain by the name the toolstack gave it.
    Name(String),
}

/// What an agent asks the manager.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Call {
    /// May this domain connect to `port` of `target`? If so, and `link` (this domain has no
    /// link with it), the manager makes a rendezvous for the pair and introduces both.
    Introduce {
        /// The domain to connect to.
        target: Peer,
        /// Its port.
        port: u32,
        /// Whether a link is needed.
        link: bool,
    },
    /// May domain `source` connect to `port` of this domain? (Asked for every connection that
    /// arrives without a cached decision.)
    Check {
        /// The connecting domain.
        source: u16,
        /// Our port.
        port: u32,
    },
    /// Port `port` of this domain serves the service `name` (`None`: no longer): rules may name
    /// it.
    Service {
        /// The port.
        port: u32,
        /// The service's name.
        name: Option<String>,
    },
}

/// An agent's message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ToManager {
    /// The first message: the protocol version this agent speaks.
    Hello {
        /// [`VERSION`].
        version: u32,
    },
    /// A call, answered by a [`FromManager::Reply`] with the same id.
    Call {
        /// The caller's number for it.
        id: u32,
        /// What is asked.
        call: Call,
    },
    /// The links this domain has up now (peer, connections), sent when they change: what the
    /// manager reports as live links.
    Links(Vec<(u16, u32)>),
}

/// The manager's answer to a [`Call`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// Allowed: decision `decision`, the target is domain `peer`; for an introduction that
    /// needed a link, the rendezvous to build it in.
    Allowed {
        /// The decision's id (in the audit trail).
        decision: u64,
        /// The domain the decision is about.
        peer: u16,
        /// Where to build the link.
        rendezvous: Option<String>,
    },
    /// Denied, or no such domain: the caller cannot tell which (the audit trail says).
    Denied {
        /// The decision's id.
        decision: u64,
    },
    /// Done (a [`Call::Service`]).
    Done,
    /// The call could not be carried out.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A manager's message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FromManager {
    /// The answer to [`ToManager::Hello`].
    Welcome {
        /// The agent's domain, as the link says.
        domid: u16,
        /// Its name, as the toolstack gave it.
        name: Option<String>,
        /// The policy's generation.
        generation: u64,
    },
    /// The manager will not serve this agent.
    Refused {
        /// Why.
        reason: String,
    },
    /// The answer to call `id`.
    Reply {
        /// The call's id.
        id: u32,
        /// The answer.
        answer: Answer,
    },
    /// This domain was introduced to `peer`: build the link in `rendezvous`.
    Introduced {
        /// The other domain.
        peer: u16,
        /// Where.
        rendezvous: String,
        /// The decision that allowed it.
        decision: u64,
    },
    /// The policy or the domains' labels changed: cached decisions no longer hold.
    PolicyChanged {
        /// The new generation.
        generation: u64,
    },
    /// Allowed connections with `peer` are no longer allowed: those involving `port` (ours when
    /// `ours`, else the peer's) are to be reset, or with no port the link is to be ended.
    Revoke {
        /// The other domain.
        peer: u16,
        /// Which port, if not the whole link.
        port: Option<u32>,
        /// Whether `port` is this domain's.
        ours: bool,
    },
}

/// Writes one message.
pub async fn write_message<W: AsyncWrite + Unpin, M: Serialize>(w: &mut W, m: &M) -> io::Result<()> {
    let body = encode(m)?;
    let mut b = Vec::with_capacity(4 + body.len());
    b.extend_from_slice(&(body.len() as u32).to_le_bytes());
    b.extend_from_slice(&body);
    w.write_all(&b).await
}

/// A message's bytes after the length (bounded by [`MAX_MESSAGE`]).
pub fn encode<M: Serialize>(m: &M) -> io::Result<Vec<u8>> {
    let body = postcard::to_stdvec(m).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if body.len() > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a message of {} bytes exceeds the {MAX_MESSAGE}-byte limit", body.len()),
        ));
    }
    Ok(body)
}

/// Reads one message: `Ok(None)` at a clean end of stream before a message.
pub async fn read_message<R: AsyncRead + Unpin, M: for<'de> Deserialize<'de>>(
    r: &mut R,
) -> io::Result<Option<M>> {
    let mut len = [0u8; 4];
    // A clean end is one before a message's first byte; an end inside the length is a stream
    // cut short.
    if r.read(&mut len[..1]).await? == 0 {
        return Ok(None);
    }
    r.read_exact(&mut len[1..]).await?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a message of {len} bytes exceeds the {MAX_MESSAGE}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    decode(&body).map(Some)
}

/// Parses a message's bytes (after the length): the whole of them, or an error.
pub fn decode<M: for<'de> Deserialize<'de>>(body: &[u8]) -> io::Result<M> {
    match postcard::take_from_bytes(body) {
        Ok((m, [])) => Ok(m),
        Ok((_, rest)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes after the end of a message", rest.len()),
        )),
        Err(e) => Err(io::Error::new(io::ErrorKind::InvalidData, format!("malformed message: {e}"))),
    }
}

/// Whether `s` may be a domain or service name in this protocol: 1 to 64 bytes of
/// `A-Z a-z 0-9 _ . -`, not starting with `-` or `.` (the policy's own rule for names).
pub fn valid_name(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && !s.starts_with(['-', '.'])
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn messages_round_trip_and_bounds_hold() {
        let msgs = vec![
            ToManager::Hello { version: VERSION },
            ToManager::Call {
                id: 7,
                call: Call::Introduce { target: Peer::Name("storage".into()), port: 5100, link: true },
            },
            ToManager::Call { id: 8, call: Call::Check { source: 3, port: 1 } },
            ToManager::Links(vec![(0, 2), (3, 1)]),
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            write_message(&mut buf, m).await.unwrap();
        }
        let mut r = &buf[..];
        for m in &msgs {
            assert_eq!(read_message::<_, ToManager>(&mut r).await.unwrap().as_ref(), Some(m));
        }
        assert_eq!(read_message::<_, ToManager>(&mut r).await.unwrap(), None);

        // A length past the bound is refused before anything is allocated.
        let mut big = ((MAX_MESSAGE + 1) as u32).to_le_bytes().to_vec();
        big.extend_from_slice(&[0; 8]);
        let e = read_message::<_, ToManager>(&mut &big[..]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        // Exactly at the bound is read (and then fails to parse, as garbage).
        let mut at = (MAX_MESSAGE as u32).to_le_bytes().to_vec();
        at.extend(std::iter::repeat_n(0xff, MAX_MESSAGE));
        let e = read_message::<_, ToManager>(&mut &at[..]).await.unwrap_err();
        assert!(e.to_string().contains("malformed"), "{e}");
        // Trailing bytes inside a message are an error.
        let mut body = encode(&ToManager::Hello { version: 1 }).unwrap();
        body.push(0);
        assert!(decode::<ToManager>(&body).unwrap_err().to_string().contains("after the end"));
        // A message cut short is an error, not a clean end.
        let mut cut = Vec::new();
        write_message(&mut cut, &msgs[1]).await.unwrap();
        cut.pop();
        assert!(read_message::<_, ToManager>(&mut &cut[..]).await.is_err());
    }

    /// A reader whose every read fails with `kind`.
    struct Failing(io::ErrorKind);

    impl AsyncRead for Failing {
        fn poll_read(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            _: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<io::Result<()>> {
            std::task::Poll::Ready(Err(io::Error::new(self.0, "the link broke")))
        }
    }

    /// A `Refused` message whose body is exactly `len` bytes (tag, 3-byte length, text).
    fn refused_of(len: usize) -> FromManager {
        FromManager::Refused { reason: "r".repeat(len - 4) }
    }

    #[tokio::test]
    async fn the_bound_holds_on_the_writing_side_too() {
        // The bound is inclusive: a body of exactly MAX_MESSAGE bytes is sent and read back.
        let at = refused_of(MAX_MESSAGE);
        assert_eq!(encode(&at).unwrap().len(), MAX_MESSAGE);
        let mut buf = Vec::new();
        write_message(&mut buf, &at).await.unwrap();
        assert_eq!(buf.len(), 4 + MAX_MESSAGE);
        assert_eq!(read_message::<_, FromManager>(&mut &buf[..]).await.unwrap(), Some(at));
        // One byte more is refused before anything is written.
        let over = refused_of(MAX_MESSAGE + 1);
        let e = encode(&over).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("65537 bytes exceeds"), "{e}");
        let mut buf = Vec::new();
        assert_eq!(write_message(&mut buf, &over).await.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(buf.is_empty());
    }

    #[tokio::test]
    async fn a_failing_read_is_an_error_not_an_end() {
        let e = read_message::<_, ToManager>(&mut Failing(io::ErrorKind::ConnectionReset)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
    }

    /// A stream that stops inside a message's 4-byte length has not ended cleanly "before a
    /// message" (what `Ok(None)` means): it is an error.
    #[tokio::test]
    async fn a_stream_cut_inside_a_length_is_not_a_clean_end() {
        for cut in 1..4 {
            let mut buf = Vec::new();
            write_message(&mut buf, &ToManager::Hello { version: VERSION }).await.unwrap();
            let got = read_message::<_, ToManager>(&mut &buf[..cut]).await;
            assert!(got.is_err(), "{cut} bytes of a length gave {got:?}");
        }
    }

    #[test]
    fn names() {
        for ok in ["storage", "a", "guest-1", "x_y.z", &"n".repeat(64)] {
            assert!(valid_name(ok), "{ok}");
        }
        for bad in ["", "-a", ".a", "a/b", "a b", "é", &"n".repeat(65), "@tag"] {
            assert!(!valid_name(bad), "{bad}");
        }
    }
}
