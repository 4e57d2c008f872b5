//! What a hostile client can make a server hold: a client that sends calls and never reads the
//! replies, more connections than the server takes, frames that announce more than they send.
//!
//! Memory is counted by this test binary's own global allocator: the heap bytes live at a moment
//! (allocated minus freed, at the sizes asked for), and the most live at once since a reset.
//! Unlike the resident set size, that count does not depend on the allocator's arenas or on
//! pages never touched (a reservation of 16 MiB counts 16 MiB), nor on the machine's load. It
//! counts the whole process, so the tests of this binary run one at a time ([`serial`]).
#![allow(clippy::unwrap_used, missing_docs)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use dombus_rpc::codec::{Codec, FrameTransport, Frames};
use dombus_rpc::wire::{BUILTIN_SERVICE, Call, PING, Reply};
use dombus_rpc::{
    Address, CallPath, ClientConfig, Net, RawClient, Server, ServerConfig, envelope, preamble,
    too_many_connections,
};
use dombus_tools::diag::CountingAlloc;
use futures::{FutureExt, StreamExt};
use tarpc::{ClientMessage, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{Mutex, MutexGuard};

#[global_allocator]
static ALLOCATOR: CountingAlloc = CountingAlloc;

fn live() -> isize {
    CountingAlloc::live()
}

fn reset_peak() {
    CountingAlloc::reset_peak()
}

fn peak() -> isize {
    CountingAlloc::peak()
}

const MIB: isize = 1 << 20;

/// Runs this binary's tests one at a time (the allocator counts the whole process).
async fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::const_new(());
    SERIAL.lock().await
}

/// Liveness limit: only a hung server reaches it.
const T: Duration = Duration::from_secs(30);

/// Waits until `cond` holds (a liveness limit of [`T`]).
async fn wait_until(cond: impl Fn() -> bool, what: &str) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < T, "{what}: not within {T:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A directory of this test's own, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("dombus-rpc-hostile-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir(&d).unwrap();
        Scratch(d)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn ctx_for(d: Duration) -> tarpc::context::Context {
    let mut c = tarpc::context::current();
    c.deadline = Instant::now() + d;
    c
}

/// Pings the hostile client sends without reading a reply.
const PINGS: u64 = 200_000;

/// Most heap bytes the whole process may hold beyond where it started while the client that
/// never reads is stuck, and at any moment of the test: the server's share is the stuck
/// connection's calls in flight (at most 128 pings: their replies in tarpc's queue, and the
/// calls waiting to queue theirs) and the connection's buffers, plus the well-behaved client's
/// connection; the test's own writer batch and reader are small. Measured: 0.3 MiB while stuck,
/// 0.6 MiB at the most. A server that reads without bound holds every ping it has read, about
/// 1.7 KiB each: 337 MiB for the 200,000.
const MAX_HEAP: isize = 4 * MIB;

/// Writes `PINGS` pipelined ping calls (tarpc requests, bincode, in frames), setting `blocked`
/// while the socket takes no more.
async fn write_pings(w: tokio::net::unix::OwnedWriteHalf, blocked: Arc<AtomicBool>) {
    let mut batch = Vec::with_capacity(64 << 10);
    for id in 0..PINGS {
        let msg = ClientMessage::Request(tarpc::Request {
            context: ctx_for(Duration::from_secs(3600)),
            id,
            message: Call { method: PING.into(), args: Vec::new() },
        });
        let bytes = Codec::Bincode.encode(&msg).unwrap();
        batch.extend_from_slice(&u32::try_from(bytes.len()).unwrap().to_be_bytes());
        batch.extend_from_slice(&bytes);
        if batch.len() >= 60 << 10 || id + 1 == PINGS {
            let mut rest = &batch[..];
            while !rest.is_empty() {
                match w.try_write(rest) {
                    Ok(n) => {
                        blocked.store(false, Ordering::SeqCst);
                        rest = &rest[n..];
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        blocked.store(true, Ordering::SeqCst);
                        w.writable().await.unwrap();
                    }
                    Err(e) => panic!("writing pings: {e}"),
                }
            }
            batch.clear();
        }
    }
    blocked.store(false, Ordering::SeqCst);
}

/// Reads `PINGS` replies: each request id once, each an empty success.
async fn read_replies(r: tokio::net::unix::OwnedReadHalf) {
    let mut r = tokio::io::BufReader::with_capacity(64 << 10, r);
    let mut seen = vec![false; usize::try_from(PINGS).unwrap()];
    let mut body = Vec::new();
    for n in 0..PINGS {
        let len = match tokio::time::timeout(T, r.read_u32()).await {
            Ok(len) => len.unwrap(),
            Err(_) => panic!("replies stopped after {n}"),
        };
        body.resize(usize::try_from(len).unwrap(), 0);
        r.read_exact(&mut body).await.unwrap();
        let reply: Response<Reply> = Codec::Bincode.decode(&body).unwrap();
        assert_eq!(reply.message, Ok(Reply(Vec::new())), "reply {n}");
        let id = usize::try_from(reply.request_id).unwrap();
        assert!(!std::mem::replace(&mut seen[id], true), "reply {id} twice");
    }
}

/// A client pipelines 200,000 pings over a Unix socket and reads no reply until the server has
/// stopped reading it and its socket takes no more (or, from a server that reads without
/// bound, until all are sent). Meanwhile another client's call is answered; then the first
/// reads every reply. The server's heap stays within [`MAX_HEAP`] throughout, and it never had
/// more than `max_in_flight` calls of that connection in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_replies_is_held_to_its_calls_in_flight_and_stalls_only_itself() {
    let _serial = serial().await;
    let dir = Scratch::new("pipelined");
    let path = dir.0.join("pings.sock");
    let addr = Address::Unix(path.clone());
    let config = ServerConfig::default();
    let server = Server::new(Net::new(), config.clone());
    let handle = server.serve_many(&addr, Vec::new()).await.unwrap();
    let other = RawClient::new(Net::new(), addr.clone(), BUILTIN_SERVICE, ClientConfig::default());
    other.ping(ctx_for(T)).await.unwrap();

    let base = live();
    reset_peak();
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    preamble::client(&mut s, BUILTIN_SERVICE, Codec::Bincode, T).await.unwrap();
    let (r, w) = s.into_split();
    let blocked = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write_pings(w, blocked.clone()));
    wait_until(
        || {
            writer.is_finished()
                || (server.metrics().connections().paused > 0 && blocked.load(Ordering::SeqCst))
        },
        "the pings all sent, or the server paused and the client's socket full",
    )
    .await;
    let stuck = live() - base;
    let stuck_peak = peak() - base;
    let stats = server.metrics().connections();
    eprintln!(
        "client not reading: all {PINGS} pings sent: {}; server paused connections: {}; calls in \
         flight at most {}; heap {:.1} MiB over the start (peak so far {:.1} MiB)",
        writer.is_finished(),
        stats.paused,
        stats.in_flight_peak,
        stuck as f64 / MIB as f64,
        stuck_peak as f64 / MIB as f64,
    );
    assert!(
        stuck_peak <= MAX_HEAP,
        "the heap grew by {:.1} MiB with a client not reading its replies (bound {} MiB)",
        stuck_peak as f64 / MIB as f64,
        MAX_HEAP / MIB
    );

    // The stuck client stalls only itself: another connection is answered.
    let answered = tokio::time::timeout(T, other.ping(ctx_for(T))).await;
    answered.expect("a well-behaved client's ping was not answered beside the stuck one").unwrap();

    // The stuck client reads its replies: every call is answered once, the rest of the pings
    // go through as the replies drain.
    tokio::time::timeout(T, read_replies(r)).await.expect("replies stopped");
    tokio::time::timeout(T, writer).await.expect("the writer hung").unwrap();
    let most = peak() - base;
    let stats = server.metrics().connections();
    eprintln!(
        "after all replies: heap peak {:.1} MiB over the start (bound {} MiB); calls in flight \
         at most {} (bound {})",
        most as f64 / MIB as f64,
        MAX_HEAP / MIB,
        stats.in_flight_peak,
        config.max_in_flight
    );
    assert!(
        most <= MAX_HEAP,
        "the heap grew by {:.1} MiB at most while 200,000 pings went through (bound {} MiB)",
        most as f64 / MIB as f64,
        MAX_HEAP / MIB
    );
    assert!(stats.in_flight_peak <= config.max_in_flight, "{stats:?}");
    assert_eq!(stats.paused, 0, "{stats:?}");
    handle.stop().await;
}

/// With `max_connections` open, one more is refused in its preamble with the named reason
/// (`ConnectionRefused`, [`dombus_rpc::TooManyConnections`]) and counted in the metrics; once
/// one closes, a new one is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_limit_are_refused_with_the_reason_until_one_closes() {
    let _serial = serial().await;
    let dir = Scratch::new("connections");
    let addr = Address::Unix(dir.0.join("conns.sock"));
    let server = Server::new(Net::new(), ServerConfig { max_connections: 4, ..ServerConfig::default() });
    let handle = server.serve_many(&addr, Vec::new()).await.unwrap();
    let client = || RawClient::new(Net::new(), addr.clone(), BUILTIN_SERVICE, ClientConfig::default());
    let mut open = Vec::new();
    for _ in 0..4 {
        let c = client();
        c.connect_now(T).await.unwrap();
        open.push(c);
    }
    assert_eq!(server.metrics().connections().open, 4);

    let fifth = client();
    let e = fifth.connect_now(T).await.unwrap_err();
    eprintln!("the fifth connection: {e}");
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
    let why = too_many_connections(&e).unwrap_or_else(|| panic!("not the named reason: {e:?}"));
    assert!(why.message.starts_with(preamble::TOO_MANY_CONNECTIONS), "{why}");
    assert!(e.to_string().contains("too many connections: 4 open"), "{e}");
    let stats = server.metrics().connections();
    assert_eq!((stats.open, stats.refused), (4, 1), "{stats:?}");
    let text = server.metrics().prometheus();
    assert!(
        text.contains("dombus_rpc_server_connections_refused_total{reason=\"too_many_connections\"} 1"),
        "{text}"
    );
    assert!(text.contains("dombus_rpc_server_connections 4"), "{text}");

    // Calls on the open connections go on.
    open[0].ping(ctx_for(T)).await.unwrap();

    // One closes: the server counts it closed, and the fifth gets in.
    drop(open.pop());
    wait_until(|| server.metrics().connections().open == 3, "the server seeing a connection close").await;
    fifth.connect_now(T).await.unwrap();
    fifth.ping(ctx_for(T)).await.unwrap();
    assert_eq!(server.metrics().connections().open, 4);
    handle.stop().await;
}

/// Connections that each send only a frame's header announcing the largest frame allowed
/// (16 MiB here) hold next to nothing: the read buffer grows with the bytes that arrive, at
/// most doubling them, not with the length announced. Then a frame sent in pieces is read
/// whole.
#[tokio::test]
async fn a_frame_header_alone_costs_nothing_near_the_length_it_announces() {
    let _serial = serial().await;
    const CONNECTIONS: usize = 64;
    const MAX: usize = 16 << 20;
    type Server = FrameTransport<Vec<u8>, Vec<u8>>;
    let mut ends = Vec::with_capacity(CONNECTIONS);
    let mut servers: Vec<Server> = Vec::with_capacity(CONNECTIONS);
    let base = live();
    reset_peak();
    for _ in 0..CONNECTIONS {
        let (mut client, server) = tokio::io::duplex(64 << 10);
        client.write_all(&u32::try_from(MAX).unwrap().to_be_bytes()).await.unwrap();
        let mut t = Server::new(Box::new(server), Codec::Bincode, Frames::new(MAX, MAX));
        assert!(t.next().now_or_never().is_none(), "a header alone is no message");
        servers.push(t);
        ends.push(client);
    }
    let held = live() - base;
    let per_connection = held / CONNECTIONS as isize;
    eprintln!(
        "{CONNECTIONS} connections, each sent a header announcing {} MiB: {held} heap bytes, \
         {per_connection} per connection (peak {} bytes)",
        MAX >> 20,
        peak() - base
    );
    // Each connection: the duplex pipe's buffer (64 KiB), the read buffer (8 KiB), the pair's
    // own state. Reserving the announced length would be 16 MiB each.
    assert!(
        per_connection <= 32 << 10,
        "a connection that sent 4 bytes holds {per_connection} bytes (announcing {MAX})"
    );

    // A frame of 1 MiB sent in pieces: memory follows the bytes in, and the message arrives.
    let message: Vec<u8> = (0..1 << 20).map(|i: u32| i as u8).collect();
    let frame = Codec::Bincode.encode(&message).unwrap();
    let (client, server) = tokio::io::duplex(2 << 20);
    let mut t = Server::new(Box::new(server), Codec::Bincode, Frames::new(MAX, MAX));
    let mut client = client;
    client.write_all(&u32::try_from(frame.len()).unwrap().to_be_bytes()).await.unwrap();
    client.write_all(&frame[..frame.len() / 4]).await.unwrap();
    let before = live();
    assert!(t.next().now_or_never().is_none());
    let quarter = live() - before;
    eprintln!("a quarter of a 1 MiB frame in: the read buffer grew by {quarter} bytes");
    assert!(quarter <= 2 * (frame.len() / 4) as isize + (8 << 10), "{quarter} bytes for a quarter frame");
    client.write_all(&frame[frame.len() / 4..]).await.unwrap();
    let got = tokio::time::timeout(T, t.next()).await.unwrap().unwrap().unwrap();
    assert!(got == message, "the frame read in pieces differs");
    drop((servers, ends));
}

/// One domain cannot take every connection of a server: past `max_connections_per_domain` its
/// connections are refused with the reason, while another domain still gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_domain_is_held_to_its_share_of_connections() {
    use dombus_sim::{SimBackend, SimHypervisor};
    use dombus_transport_xen::types::DomId;
    use dombus_transport_xen::vsock::domain::{VsockConfig, VsockDomain};
    let _serial = serial().await;
    let dir = Scratch::new("per-domain");
    let sock = dir.0.join("simxen.sock");
    let hv = SimHypervisor::spawn(&sock).unwrap();
    let domain = |id: u16| {
        VsockDomain::start(SimBackend::boot(&sock, Some(DomId(id))).unwrap(), VsockConfig::default()).unwrap()
    };
    let config = ServerConfig { max_connections_per_domain: 3, ..ServerConfig::default() };
    let server = Server::new(Net::new().with_xen(domain(1)), config);
    let addr: Address = "xen:1:5000".parse().unwrap();
    let handle = server.serve_many(&addr, Vec::new()).await.unwrap();
    let (greedy, other) = (Net::new().with_xen(domain(2)), Net::new().with_xen(domain(3)));
    let client =
        |net: &Net| RawClient::new(net.clone(), addr.clone(), BUILTIN_SERVICE, ClientConfig::default());
    let mut open = Vec::new();
    for _ in 0..3 {
        let c = client(&greedy);
        c.connect_now(T).await.unwrap();
        open.push(c);
    }
    let fourth = client(&greedy);
    let e = fourth.connect_now(T).await.unwrap_err();
    assert!(too_many_connections(&e).is_some(), "not the named reason: {e:?}");
    assert!(e.to_string().contains("3 from domain 2"), "{e}");
    // Another domain is not affected.
    let c = client(&other);
    c.connect_now(T).await.unwrap();
    c.ping(ctx_for(T)).await.unwrap();
    assert_eq!(server.metrics().connections().refused, 1);
    // One of domain 2's closes: its next gets in.
    drop(open.pop());
    wait_until(|| server.metrics().connections().open == 3, "the server seeing a connection close").await;
    fourth.connect_now(T).await.unwrap();
    fourth.ping(ctx_for(T)).await.unwrap();
    handle.stop().await;
    drop(hv);
}

/// tarpc's rules, kept by the direct server: a request already past its deadline when it
/// arrives is dropped unanswered, a cancel for no call is ignored, and the connection goes on:
/// the one reply is to the request that still had time.
#[tokio::test]
async fn a_request_past_its_deadline_on_arrival_gets_no_reply_and_the_connection_goes_on() {
    let dir = Scratch::new("expired");
    let addr = Address::Unix(dir.0.join("expired.sock"));
    let handle =
        Server::new(Net::new(), ServerConfig::default()).serve_many(&addr, Vec::new()).await.unwrap();
    let mut s = Net::new().connect(&addr).await.unwrap();
    preamble::client(&mut s, BUILTIN_SERVICE, Codec::Bincode, T).await.unwrap();
    let frames = Frames::new(1 << 20, 1 << 20);
    let mut wire = bytes::BytesMut::new();
    let ping = |id: u64, within: Duration| {
        ClientMessage::Request(tarpc::Request {
            context: ctx_for(within),
            id,
            message: Call { method: PING.into(), args: Vec::new() },
        })
    };
    // Serialized as the time left: zero is past by the time the server reads it.
    frames.encode_item(Codec::Bincode, &ping(1, Duration::ZERO), &mut wire).unwrap();
    let cancel = ClientMessage::<Call>::Cancel { trace_context: Default::default(), request_id: 99 };
    frames.encode_item(Codec::Bincode, &cancel, &mut wire).unwrap();
    frames.encode_item(Codec::Bincode, &ping(2, T), &mut wire).unwrap();
    s.write_all(&wire).await.unwrap();
    let len = tokio::time::timeout(T, s.read_u32()).await.expect("no reply").unwrap();
    let mut body = vec![0; usize::try_from(len).unwrap()];
    s.read_exact(&mut body).await.unwrap();
    let reply: Response<Reply> = Codec::Bincode.decode(&body).unwrap();
    assert_eq!(reply.request_id, 2, "the expired request was answered");
    // Nothing more comes: the expired request's reply never does.
    let mut more = [0u8; 1];
    let extra = tokio::time::timeout(Duration::from_millis(200), s.read(&mut more)).await;
    assert!(extra.is_err(), "a second reply: {extra:?}");
    handle.stop().await;
}

/// A deadline beyond what any `Instant` can hold (tarpc's own reader would panic on it) closes
/// the connection that sent it, on either call path; the server answers other connections on.
#[tokio::test]
async fn a_deadline_beyond_any_instant_closes_only_its_connection() {
    let _serial = serial().await;
    for path in [CallPath::Direct, CallPath::Tarpc] {
        let dir = Scratch::new("far-deadline");
        let addr = Address::Unix(dir.0.join("far.sock"));
        let config = ServerConfig { call_path: path, ..ServerConfig::default() };
        let handle = Server::new(Net::new(), config).serve_many(&addr, Vec::new()).await.unwrap();
        let mut s = Net::new().connect(&addr).await.unwrap();
        preamble::client(&mut s, BUILTIN_SERVICE, Codec::Bincode, T).await.unwrap();
        let context = envelope::Context { time_left: Duration::MAX, trace_context: Default::default() };
        let call = Call { method: PING.into(), args: Vec::new() };
        let far = envelope::ClientMessage::Request(envelope::Request { context, id: 1, message: call });
        let mut wire = bytes::BytesMut::new();
        Frames::new(1 << 20, 1 << 20).encode_item(Codec::Bincode, &far, &mut wire).unwrap();
        s.write_all(&wire).await.unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(T, s.read_to_end(&mut rest)).await;
        assert!(
            matches!(read, Ok(Ok(0))),
            "{path}: the connection stayed open or answered: {read:?} {rest:?}"
        );
        let other = RawClient::new(Net::new(), addr.clone(), BUILTIN_SERVICE, ClientConfig::default());
        other.ping(ctx_for(T)).await.unwrap();
        handle.stop().await;
    }
}
