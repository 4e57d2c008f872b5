//! Fuzz target: a process's connection through its domain's agent (`dombus_agent::AgentStream`,
//! its `AsyncRead`, which takes the agent's frames apart) against a hostile agent, through the
//! public API only.
//!
//! Input: a control byte, then the agent's bytes. In a current-thread tokio runtime a fake agent
//! listens on a Unix socket in a temporary directory, answers `AgentClient::connect` with an OK
//! reply, then writes the bytes in chunks (control bits 0..=3 pick the size: 1 byte to 64 KiB, or
//! all at once), letting the client run between chunks so that it sees partial frames, and
//! closes. The client reads (into a buffer of 1 byte to 68 KiB, bits 4..=7) until `Ok(0)` or an
//! error, then once more.
//!
//! * **Data**: the bytes read are exactly the payloads of the data frames, in order, up to the
//!   first end frame, the first invalid frame or the end of the stream (a data frame is handed
//!   out only once it is whole, so a truncated one gives none of its bytes).
//! * **End**: an end frame of kind 0 (the peer finished) gives `Ok(0)`; kind 1 `ConnectionReset`,
//!   2 `ConnectionAborted` ("transport reset"), 3 `ConnectionAborted` (the agent stopped), 4
//!   `Other`, each with the reason (as `printable` makes it) at the end of its message; an
//!   invalid frame (data length over 64 KiB, end kind over 4, reason over 1 KiB) `InvalidData`;
//!   a stream that stops without an end frame `ConnectionAborted` ("without its end frame"). A
//!   read after the end ends the same way. Whatever follows the end is never looked at.
//! * **Bounds**: every read returns at least one byte or the end, so at most one read per input
//!   byte, plus two; the whole exchange must finish within 20 s (a hang fails the target). No
//!   single allocation while reading exceeds 16 KiB (the client's buffer as it starts) unless the
//!   agent sent at least that much, nor ever more than one frame buffer (4 + 64 KiB + 7 + 1 KiB):
//!   a header's claimed length reserves nothing.
#![no_main]

mod common;

use std::future::poll_fn;
use std::io;
use std::path::PathBuf;
use std::pin::{Pin, pin};
use std::sync::OnceLock;
use std::time::Duration;

use dombus_agent::AgentClient;
use dombus_agent::proto::{MAX_FRAME, MAX_TEXT, REQUEST_LEN, Reply, Request, Target, printable};
use futures::channel::oneshot;
use futures::future::{Either, join, select};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::UnixListener;
use tokio::runtime::Runtime;

#[global_allocator]
static ALLOC: common::Probe = common::Probe;

/// Sizes of the chunks the agent writes (`usize::MAX`: all at once).
const CHUNKS: [usize; 16] = [1, 2, 3, 4, 5, 7, 8, 16, 100, 1000, 1031, 4096, 16384, 16385, 65540, usize::MAX];
/// Sizes of the client's read buffer.
const READS: [usize; 16] = [1, 2, 3, 5, 7, 16, 64, 100, 1000, 4096, 8192, 16384, 65535, 65536, 65540, 70000];
/// The client's buffer as it starts: nothing larger is allocated before the agent sent this much.
const FIRST_BUFFER: usize = 16 << 10;
/// The client's buffer at its largest: one data frame, or an end frame with the longest reason.
const LARGEST_BUFFER: usize = 4 + MAX_FRAME + 7 + MAX_TEXT;
/// Longest an exchange may take: anything longer is a hang.
const LIMIT: Duration = Duration::from_secs(20);
/// The CID and port the client connects to.
const PEER: u32 = 1;
const PORT: u32 = 5000;

/// How the agent's bytes end, by an independent reading of the frame format.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Want {
    /// An end frame: its kind (0..=4) and its reason as the client shows it.
    End(u8, String),
    /// A data length over 64 KiB, an end kind over 4 or a reason over 1 KiB.
    Invalid,
    /// The stream stopped without an end frame.
    Truncated,
}

/// The payloads of the data frames in `b`, in order, and how the stream ends.
fn reference(mut b: &[u8]) -> (Vec<u8>, Want) {
    let mut data = Vec::new();
    loop {
        let Some((len, rest)) = b.split_first_chunk::<4>() else { return (data, Want::Truncated) };
        let len = u32::from_le_bytes(*len) as usize;
        if len > MAX_FRAME {
            return (data, Want::Invalid);
        }
        if len == 0 {
            let Some((&[kind, l0, l1], rest)) = rest.split_first_chunk::<3>() else {
                return (data, Want::Truncated);
            };
            let rlen = usize::from(u16::from_le_bytes([l0, l1]));
            if kind > 4 || rlen > MAX_TEXT {
                return (data, Want::Invalid);
            }
            let Some(reason) = rest.get(..rlen) else { return (data, Want::Truncated) };
            return (data, Want::End(kind, printable(reason)));
        }
        let Some(payload) = rest.get(..len) else { return (data, Want::Truncated) };
        data.extend_from_slice(payload);
        b = &rest[len..];
    }
}

/// What the client saw.
struct Seen {
    data: Vec<u8>,
    /// The first read that gave no data: `Ok(())` for `Ok(0)`.
    end: io::Result<()>,
    /// The read after it.
    again: io::Result<usize>,
    reads: usize,
    largest: usize,
}

fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().expect("a runtime")
    })
}

/// A directory of this process's own for the fake agent's socket (removed once connected).
fn socket_dir() -> PathBuf {
    std::env::temp_dir().join(format!("dombus-fuzz-agent-stream-{}", std::process::id()))
}

/// One read into `buf`, recording the largest allocation made while the client is polled.
async fn read_probed(
    stream: &mut dombus_agent::AgentStream,
    buf: &mut [u8],
    largest: &mut usize,
) -> io::Result<usize> {
    poll_fn(|cx| {
        let mut rb = ReadBuf::new(buf);
        let (r, l) = common::largest_allocation(|| Pin::new(&mut *stream).poll_read(cx, &mut rb));
        *largest = (*largest).max(l);
        r.map_ok(|()| rb.filled().len())
    })
    .await
}

/// The fake agent and the client, together.
async fn exchange(input: &[u8], chunk: usize, read_size: usize) -> Seen {
    let dir = socket_dir();
    std::fs::create_dir_all(&dir).expect("the socket's directory");
    let path = dir.join("agent.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("the fake agent's socket");
    let client = AgentClient::new(&path);
    let (done, mut done_rx) = oneshot::channel::<()>();

    let agent = async {
        let (mut sock, _) = listener.accept().await.expect("the client connects");
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_dir(&dir);
        let mut head = [0u8; REQUEST_LEN];
        sock.read_exact(&mut head).await.expect("the client's request");
        let request = Request::decode(&head, &[]).expect("a well-formed request");
        assert_eq!((request.target, request.port), (Target::Cid(PEER), PORT));
        sock.write_all(&Reply::ok(PEER, 49152, Vec::new()).encode()).await.expect("the reply is sent");
        // Until the client has seen the end: it keeps its socket open until then, so no write
        // meets a closed socket (which would raise SIGPIPE: nothing ignores it in a fuzz target).
        for c in input.chunks(chunk.min(input.len()).max(1)) {
            let write = pin!(sock.write_all(c));
            match select(write, &mut done_rx).await {
                Either::Left((r, _)) => r.expect("the client's socket is open"),
                Either::Right(_) => return,
            }
            tokio::task::yield_now().await;
        }
        // Dropping the socket closes it: the client reads the end of the stream.
    };

    let reader = async {
        let mut stream = client.connect(Target::Cid(PEER), PORT, None).await.expect("the agent's OK reply");
        let mut buf = vec![0u8; read_size];
        let mut seen = Seen { data: Vec::new(), end: Ok(()), again: Ok(0), reads: 0, largest: 0 };
        loop {
            seen.reads += 1;
            assert!(seen.reads <= input.len() + 1, "{} reads for {} bytes", seen.reads, input.len());
            match read_probed(&mut stream, &mut buf, &mut seen.largest).await {
                Ok(0) => break,
                Ok(n) => seen.data.extend_from_slice(&buf[..n]),
                Err(e) => {
                    seen.end = Err(e);
                    break;
                }
            }
        }
        seen.again = read_probed(&mut stream, &mut buf, &mut seen.largest).await;
        let _ = done.send(());
        (stream, seen)
    };

    // The client's stream is dropped only after the agent is done with its socket.
    let ((_stream, seen), ()) = join(reader, agent).await;
    seen
}

fuzz_target!(|data: &[u8]| {
    let [control, input @ ..] = data else { return };
    let chunk = CHUNKS[usize::from(control & 15)];
    let read_size = READS[usize::from(control >> 4)];
    let (want_data, want) = reference(input);

    let seen = runtime()
        .block_on(async { tokio::time::timeout(LIMIT, exchange(input, chunk, read_size)).await })
        .unwrap_or_else(|_| panic!("the exchange still ran after {LIMIT:?}: a hang"));

    assert!(seen.data == want_data, "read {} bytes, {} expected", seen.data.len(), want_data.len());
    let bound = if input.len() < FIRST_BUFFER { FIRST_BUFFER } else { LARGEST_BUFFER };
    assert!(seen.largest <= bound, "{} bytes allocated at once, {} sent", seen.largest, input.len());

    let kind = |r: &io::Result<()>| r.as_ref().err().map(io::Error::kind);
    match &want {
        Want::End(0, _) => {
            assert!(seen.end.is_ok(), "{:?} after an end frame of kind 0", seen.end);
            assert!(matches!(seen.again, Ok(0)), "{:?} read again after Ok(0)", seen.again);
            return;
        }
        Want::End(k, reason) => {
            let e = seen.end.as_ref().expect_err("an end frame other than kind 0 is an error");
            let expected = match k {
                1 => io::ErrorKind::ConnectionReset,
                2 | 3 => io::ErrorKind::ConnectionAborted,
                _ => io::ErrorKind::Other,
            };
            assert_eq!(e.kind(), expected, "{e} for end kind {k}");
            let text = e.to_string();
            if *k == 2 {
                // A TransportReset: "transport reset: the link to domain N is gone (<reason>)".
                assert!(text.starts_with("transport reset"), "{text:?}");
                assert!(text.contains(reason.as_str()), "{text:?} does not hold the reason {reason:?}");
                assert!(dombus_facade::transport::vsock::is_transport_reset(e), "{e:?} is not a TransportReset");
            } else {
                assert!(text.ends_with(reason.as_str()), "{text:?} does not end with the reason {reason:?}");
            }
        }
        Want::Invalid => assert_eq!(kind(&seen.end), Some(io::ErrorKind::InvalidData), "{:?}", seen.end),
        Want::Truncated => {
            assert_eq!(kind(&seen.end), Some(io::ErrorKind::ConnectionAborted), "{:?}", seen.end);
            let text = seen.end.as_ref().map_err(ToString::to_string).expect_err("checked above");
            assert!(text.contains("without its end frame"), "{text:?}");
        }
    }
    assert_eq!(
        seen.again.as_ref().err().map(io::Error::kind),
        kind(&seen.end),
        "read again after {:?}: {:?}",
        seen.end,
        seen.again
    );
});
