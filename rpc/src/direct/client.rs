//! The client of the direct call path: no dispatch task; each call's future does the
//! connection's I/O itself (the parent module says why).
//!
//! The connection's state sits behind one mutex, held only while a call's future is polled (it
//! never blocks: the stream is polled, not awaited). A call encodes its request into the write
//! buffer when it is made; every poll of a waiting call then writes what is buffered, reads
//! what arrived and routes each reply to its call by request id. The call that read last until
//! the socket had nothing more is the *reader*: its waker is the socket's and the deadline
//! timer's, so it is woken for every reply and deadline, and wakes the call a reply is for.
//! When the reader finishes, it wakes another waiting call to take its place; the writer (a
//! call that found the socket full) likewise. A call alone on its connection is always the
//! reader and reads its own reply: between its write and its reply nothing but the transport
//! wakes anything.
//!
//! Everything read is untrusted: a frame over the limit or one that does not decode fails the
//! connection (every waiting call gets the error, later calls fail at once and the client
//! connects again); a reply to no waiting call is dropped; one poll reads a bounded number of
//! times before yielding, so a server that never stops sending cannot hold a caller's thread.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context as TaskContext, Poll, Waker};
use std::time::Instant;

use bytes::BytesMut;
use tarpc::client::RpcError;
use tarpc::context::Context;
use tarpc::{ChannelError, Response};
use tokio::time::Sleep;
use tokio_util::codec::Decoder;

use crate::codec::{Codec, Frames};
use crate::envelope::ClientMessage;
use crate::transport::BoxStream;
use crate::wire::{Call, Reply};

/// Reads one poll makes before yielding to the runtime (each reads up to the buffer's room).
const READS_PER_POLL: usize = 32;

/// An error shared by every call it failed.
type Fault = Arc<dyn std::error::Error + Send + Sync>;

/// One connection's calls, made by the callers' futures. Cheap to clone.
#[derive(Clone)]
pub(crate) struct DirectChannel(Arc<Shared>);

struct Shared {
    codec: Codec,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why the connection failed.
#[derive(Clone)]
enum Broken {
    Read(Fault),
    Write(Fault),
}

impl Broken {
    /// The error a call in flight gets (tarpc's kinds: a lost connection is a channel error).
    fn error(&self) -> RpcError {
        match self {
            Broken::Read(f) => RpcError::Channel(ChannelError::Read(f.clone())),
            Broken::Write(f) => RpcError::Channel(ChannelError::Write(f.clone())),
        }
    }

    fn fault(&self) -> &Fault {
        match self {
            Broken::Read(f) | Broken::Write(f) => f,
        }
    }
}

/// A call made on the connection.
enum Slot {
    /// Sent (or buffered to be), no reply yet.
    Waiting { waker: Option<Waker>, deadline: Instant },
    /// Its outcome, until its future takes it.
    Done(Result<Reply, RpcError>),
}

struct State {
    stream: BoxStream,
    frames: Frames,
    /// Bytes read and not yet decoded (at most a partial frame between polls).
    rbuf: BytesMut,
    /// Frames encoded and not yet written.
    wbuf: BytesMut,
    /// The calls waiting, by request id. The ids are this client's own, so a fast hash serves.
    calls: HashMap<u64, Slot, foldhash::fast::RandomState>,
    next_id: u64,
    /// The call whose waker the socket's read side and the timer hold (module docs).
    reader: Option<u64>,
    /// The call whose waker the socket's write side holds.
    writer: Option<u64>,
    /// Why the connection failed, once it has.
    broken: Option<Broken>,
    /// One timer for every call's deadline: armed at the earliest deadline of the calls when it
    /// was last set (never moved later, so it may fire early, and is then armed again).
    timer: Option<(Instant, Pin<Box<Sleep>>)>,
}

impl DirectChannel {
    /// Calls over `stream` (past the preamble), in frames of at most `max_frame` bytes each
    /// way, encoded with `codec`.
    pub(crate) fn new(stream: BoxStream, codec: Codec, max_frame: usize) -> DirectChannel {
        let state = State {
            stream,
            frames: Frames::new(max_frame, max_frame),
            rbuf: BytesMut::with_capacity(super::READ_ROOM),
            wbuf: BytesMut::new(),
            calls: HashMap::default(),
            next_id: 0,
            reader: None,
            writer: None,
            broken: None,
            timer: None,
        };
        DirectChannel(Arc::new(Shared { codec, state: Mutex::new(state) }))
    }

    /// Makes a call: its request is encoded now (an encoding error or a failed connection is
    /// the future's outcome) and sent when the future is first polled. Dropping the future
    /// before its reply cancels the call on the server (tarpc's `Cancel`).
    pub(crate) fn call(&self, ctx: Context, call: &Call) -> PendingCall {
        let id = self.0.lock().start(self.0.codec, ctx, call);
        PendingCall { shared: self.0.clone(), call: id.map_err(Some) }
    }
}

impl State {
    fn start(&mut self, codec: Codec, ctx: Context, call: &Call) -> Result<u64, RpcError> {
        if let Some(broken) = &self.broken {
            // It never left: the client may send it again on a new connection.
            let why = format!("the connection had failed: {}", broken.fault());
            return Err(RpcError::Send(Box::new(io::Error::new(io::ErrorKind::NotConnected, why))));
        }
        // The one clock read of the call's way out: the deadline travels as the time left.
        let now = Instant::now();
        if ctx.deadline <= now {
            return Err(RpcError::DeadlineExceeded);
        }
        let id = self.next_id;
        self.next_id += 1;
        let request = ClientMessage::request(&ctx, id, call, now);
        self.frames
            .encode_with(&mut self.wbuf, |dst| request.write(codec, dst))
            .map_err(|e| RpcError::Send(Box::new(e)))?;
        self.calls.insert(id, Slot::Waiting { waker: None, deadline: ctx.deadline });
        self.arm(ctx.deadline);
        Ok(id)
    }

    /// Makes sure the timer fires at `deadline` or before.
    fn arm(&mut self, deadline: Instant) {
        match &mut self.timer {
            Some((at, _)) if *at <= deadline => {}
            Some((at, sleep)) => {
                *at = deadline;
                sleep.as_mut().reset(deadline.into());
            }
            None => self.timer = Some((deadline, Box::pin(tokio::time::sleep_until(deadline.into())))),
        }
    }

    fn is_waiting(&self, id: u64) -> bool {
        matches!(self.calls.get(&id), Some(Slot::Waiting { .. }))
    }

    /// The connection's I/O on behalf of call `me`: writes what is buffered, reads and routes
    /// replies until `me` has its own or the socket has nothing more (then `me` is the reader
    /// and checks the deadlines).
    fn pump(&mut self, codec: Codec, me: u64, cx: &mut TaskContext<'_>) {
        if self.broken.is_none() && self.flush(cx).is_pending() {
            self.writer = Some(me);
        }
        for _ in 0..READS_PER_POLL {
            if let Err(broken) = self.route_buffered(codec, me) {
                return self.fail(broken);
            }
            if self.broken.is_some() || !self.is_waiting(me) {
                return;
            }
            match super::poll_read(&mut self.stream, cx, &mut self.rbuf) {
                Poll::Pending => {
                    self.reader = Some(me);
                    return self.check_deadlines(me, cx);
                }
                Poll::Ready(Ok(0)) => {
                    let eof =
                        io::Error::new(io::ErrorKind::UnexpectedEof, "the server closed the connection");
                    return self.fail(Broken::Read(Arc::new(eof)));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return self.fail(Broken::Read(Arc::new(e))),
            }
        }
        // Replies keep coming: let others run, and come back.
        cx.waker().wake_by_ref();
    }

    /// Writes the write buffer; `Pending` when the socket is full (its write side then holds
    /// `cx`'s waker). A failure fails the connection.
    fn flush(&mut self, cx: &mut TaskContext<'_>) -> Poll<()> {
        match super::write_out(&mut self.stream, cx, &mut self.wbuf) {
            Ok(written) if !written.done => Poll::Pending,
            Ok(_) => Poll::Ready(()),
            Err(e) => {
                self.fail(Broken::Write(Arc::new(e)));
                Poll::Ready(())
            }
        }
    }

    /// Routes every whole frame in the read buffer.
    fn route_buffered(&mut self, codec: Codec, me: u64) -> Result<(), Broken> {
        let broken = |e: io::Error| Broken::Read(Arc::new(e));
        while let Some(frame) = self.frames.decode(&mut self.rbuf).map_err(broken)? {
            let Response { request_id, message } = codec.decode::<Response<Reply>>(&frame).map_err(broken)?;
            // A reply to no call waiting (cancelled, past its deadline, or invented) is dropped.
            if let Some(slot @ Slot::Waiting { .. }) = self.calls.get_mut(&request_id) {
                let outcome = Slot::Done(message.map_err(RpcError::Server));
                if let Slot::Waiting { waker: Some(waker), .. } = std::mem::replace(slot, outcome) {
                    if request_id != me {
                        waker.wake();
                    }
                }
            }
        }
        Ok(())
    }

    /// Fails every call waiting past its deadline; keeps the timer armed for the others.
    fn check_deadlines(&mut self, me: u64, cx: &mut TaskContext<'_>) {
        loop {
            let Some((_, sleep)) = &mut self.timer else { return };
            if sleep.as_mut().poll(cx).is_pending() {
                return;
            }
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            for (&id, slot) in &mut self.calls {
                let Slot::Waiting { waker, deadline } = slot else { continue };
                if *deadline > now {
                    next = Some(next.map_or(*deadline, |n| n.min(*deadline)));
                    continue;
                }
                if let Some(waker) = waker.take() {
                    if id != me {
                        waker.wake();
                    }
                }
                *slot = Slot::Done(Err(RpcError::DeadlineExceeded));
            }
            match next {
                None => self.timer = None,
                Some(at) => {
                    self.timer = None;
                    self.arm(at);
                }
            }
        }
    }

    /// The connection failed: every waiting call gets `broken`'s error, later calls fail.
    fn fail(&mut self, broken: Broken) {
        tracing::debug!(error = %broken.fault(), "connection failed");
        for (_, slot) in self.calls.iter_mut() {
            if let Slot::Waiting { waker, .. } = slot {
                if let Some(w) = waker.take() {
                    w.wake();
                }
                *slot = Slot::Done(Err(broken.error()));
            }
        }
        self.broken = Some(broken);
        self.timer = None;
    }

    /// Call `me` is finished. If no waiting call holds the reader's place now (`me` held it,
    /// or read its own reply without waiting for the socket) or the writer's with bytes left
    /// to write, a waiting call is woken to take it: otherwise the others' replies could sit
    /// in the socket with no one to read them.
    fn release(&mut self, me: u64) {
        if self.reader == Some(me) {
            self.reader = None;
        }
        if self.writer == Some(me) {
            self.writer = None;
        }
        if self.reader.is_none() || (self.writer.is_none() && !self.wbuf.is_empty()) {
            let next = self.calls.values().find_map(|slot| match slot {
                Slot::Waiting { waker: Some(w), .. } => Some(w.clone()),
                _ => None,
            });
            if let Some(w) = next {
                w.wake();
            }
        }
    }
}

/// A call in flight on a [`DirectChannel`]: resolves to its reply.
pub(crate) struct PendingCall {
    shared: Arc<Shared>,
    /// The call's id, or (once) why it failed before it was sent; `Err(None)` when finished.
    call: Result<u64, Option<RpcError>>,
}

impl Future for PendingCall {
    type Output = Result<Reply, RpcError>;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let id = match &mut this.call {
            Ok(id) => *id,
            Err(failed) => return Poll::Ready(Err(failed.take().unwrap_or(RpcError::Shutdown))),
        };
        let mut st = this.shared.lock();
        if st.is_waiting(id) {
            st.pump(this.shared.codec, id, cx);
        }
        if let Some(Slot::Waiting { waker, .. }) = st.calls.get_mut(&id) {
            match waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => *waker = Some(cx.waker().clone()),
            }
            return Poll::Pending;
        }
        let outcome = match st.calls.remove(&id) {
            Some(Slot::Done(outcome)) => outcome,
            _ => Err(RpcError::Shutdown),
        };
        st.release(id);
        drop(st);
        this.call = Err(None);
        Poll::Ready(outcome)
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        let Ok(id) = self.call else { return };
        let codec = self.shared.codec;
        let mut st = self.shared.lock();
        if let Some(Slot::Waiting { .. }) = st.calls.remove(&id) {
            if st.broken.is_none() {
                let cancel =
                    ClientMessage::<Call>::Cancel { trace_context: Default::default(), request_id: id };
                let frames = st.frames;
                // Sent now if no call is waiting to write, else with the writer's next bytes.
                if frames.encode_item(codec, &cancel, &mut st.wbuf).is_ok() && st.writer.is_none() {
                    let _ = st.flush(&mut TaskContext::from_waker(futures::task::noop_waker_ref()));
                }
            }
        }
        st.release(id);
    }
}

#[cfg(test)]
mod tests {
    //! The channel against a hand-written server on an in-memory pipe.
    use super::*;
    use std::time::Duration;
    // What the client writes is read back with tarpc's own type: it must be tarpc's message.
    use tarpc::ClientMessage;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use crate::wire::Call;

    const CODEC: Codec = Codec::Bincode;

    fn call(method: &'static str) -> Call {
        Call { method: method.into(), args: Vec::new() }
    }

    fn ctx(within: Duration) -> Context {
        let mut ctx = Context::current();
        ctx.deadline = Instant::now() + within;
        ctx
    }

    /// The next frame the server side reads.
    async fn next_request(server: &mut DuplexStream) -> ClientMessage<Call> {
        let len = server.read_u32().await.unwrap() as usize;
        let mut frame = vec![0; len];
        server.read_exact(&mut frame).await.unwrap();
        CODEC.decode(&frame).unwrap()
    }

    async fn reply(server: &mut DuplexStream, request_id: u64, message: Result<Reply, tarpc::ServerError>) {
        let mut wire = BytesMut::new();
        Frames::new(1 << 20, 1 << 20)
            .encode_item(CODEC, &Response { request_id, message }, &mut wire)
            .unwrap();
        server.write_all(&wire).await.unwrap();
    }

    fn request_id(m: &ClientMessage<Call>) -> u64 {
        match m {
            ClientMessage::Request(r) => r.id,
            _ => panic!("not a request"),
        }
    }

    fn pair() -> (DirectChannel, DuplexStream) {
        let (client, server) = tokio::io::duplex(1 << 16);
        (DirectChannel::new(Box::new(client), CODEC, 1 << 20), server)
    }

    #[tokio::test]
    async fn replies_reach_their_calls_in_any_order() {
        let (channel, mut server) = pair();
        let first = channel.call(ctx(Duration::from_secs(5)), &call("a"));
        let second = channel.call(ctx(Duration::from_secs(5)), &call("b"));
        let answer = async {
            let a = request_id(&next_request(&mut server).await);
            let b = request_id(&next_request(&mut server).await);
            reply(&mut server, b, Ok(Reply(b"B".to_vec()))).await;
            // A reply to nobody is dropped; the connection goes on.
            reply(&mut server, 999, Ok(Reply(b"?".to_vec()))).await;
            reply(&mut server, a, Err(tarpc::ServerError::new(io::ErrorKind::NotFound, "no".into()))).await;
        };
        let (first, second, ()) = tokio::join!(first, second, answer);
        assert_eq!(second.unwrap(), Reply(b"B".to_vec()));
        match first {
            Err(RpcError::Server(e)) => {
                assert_eq!((e.kind, e.detail.as_str()), (io::ErrorKind::NotFound, "no"))
            }
            other => panic!("{other:?}"),
        }
        assert!(channel.0.lock().calls.is_empty(), "finished calls left behind");
    }

    #[tokio::test]
    async fn a_call_past_its_deadline_fails_and_the_others_wait_on() {
        let (channel, mut server) = pair();
        // A long deadline, then a short one (the timer must move earlier), then another long
        // one, which polls last and so holds the timer: when it fires, it must wake the short
        // call, each call being in a task of its own.
        let spawn = |within, method| tokio::spawn(channel.call(ctx(within), &call(method)));
        let first = spawn(Duration::from_secs(5), "long");
        tokio::task::yield_now().await;
        let short = spawn(Duration::from_millis(50), "short");
        tokio::task::yield_now().await;
        let last = spawn(Duration::from_secs(5), "long");
        tokio::task::yield_now().await;
        let first_id = request_id(&next_request(&mut server).await);
        let _short = next_request(&mut server).await;
        let last_id = request_id(&next_request(&mut server).await);
        let short = tokio::time::timeout(Duration::from_secs(2), short)
            .await
            .expect("the short deadline did not end its call within 2 s")
            .unwrap();
        assert!(matches!(short, Err(RpcError::DeadlineExceeded)), "{short:?}");
        reply(&mut server, first_id, Ok(Reply(Vec::new()))).await;
        reply(&mut server, last_id, Ok(Reply(Vec::new()))).await;
        first.await.unwrap().unwrap();
        last.await.unwrap().unwrap();
        let past = channel.call(ctx(Duration::ZERO), &call("late")).await;
        assert!(matches!(past, Err(RpcError::DeadlineExceeded)), "{past:?}");
    }

    #[tokio::test]
    async fn a_dropped_call_is_cancelled_on_the_server() {
        let (channel, mut server) = pair();
        let mut pending = Box::pin(channel.call(ctx(Duration::from_secs(5)), &call("slow")));
        assert!(futures::poll!(&mut pending).is_pending());
        let id = request_id(&next_request(&mut server).await);
        drop(pending);
        match next_request(&mut server).await {
            ClientMessage::Cancel { request_id, .. } => assert_eq!(request_id, id),
            other => panic!("{other:?}"),
        }
        assert!(channel.0.lock().calls.is_empty());
    }

    #[tokio::test]
    async fn a_call_dropped_while_another_writes_leaves_the_writing_to_it() {
        // A pipe too small for the second call's request: that call stays the writer, its
        // waker held by the pipe. The first call's cancel must then wait in the buffer for
        // it; written from the drop, it would replace that waker with one that wakes no one.
        let (client, mut server) = tokio::io::duplex(256);
        let channel = DirectChannel::new(Box::new(client), CODEC, 1 << 20);
        let mut dropped = Box::pin(channel.call(ctx(Duration::from_secs(5)), &call("first")));
        assert!(futures::poll!(&mut dropped).is_pending());
        let big = Call { method: "second".into(), args: vec![7; 4096] };
        let writer = tokio::spawn(channel.call(ctx(Duration::from_secs(5)), &big));
        // Until the writer has filled the pipe.
        while channel.0.lock().writer.is_none() {
            tokio::task::yield_now().await;
        }
        drop(dropped);
        let read = async {
            let first = request_id(&next_request(&mut server).await);
            let second = request_id(&next_request(&mut server).await);
            match next_request(&mut server).await {
                ClientMessage::Cancel { request_id, .. } => assert_eq!(request_id, first),
                other => panic!("{other:?}"),
            }
            second
        };
        let second = tokio::time::timeout(Duration::from_secs(2), read)
            .await
            .expect("the writing call was not woken to write the rest of its request");
        reply(&mut server, second, Ok(Reply(b"2".to_vec()))).await;
        assert_eq!(writer.await.unwrap().unwrap(), Reply(b"2".to_vec()));
    }

    #[tokio::test]
    async fn garbage_or_an_oversize_frame_fails_every_call_and_the_next_never_leaves() {
        for bad in [&[0u8, 0, 0, 2, 0xff, 0xff][..], &[0x7f, 0xff, 0xff, 0xff][..]] {
            let (channel, mut server) = pair();
            let pending = channel.call(ctx(Duration::from_secs(5)), &call("x"));
            let answer = async {
                next_request(&mut server).await;
                server.write_all(bad).await.unwrap();
            };
            let (r, ()) = tokio::join!(pending, answer);
            assert!(matches!(r, Err(RpcError::Channel(ChannelError::Read(_)))), "{r:?}");
            let next = channel.call(ctx(Duration::from_secs(5)), &call("y")).await;
            assert!(matches!(next, Err(RpcError::Send(_))), "{next:?}");
        }
    }

    #[tokio::test]
    async fn a_closed_connection_fails_the_call_in_flight() {
        let (channel, mut server) = pair();
        let pending = channel.call(ctx(Duration::from_secs(5)), &call("x"));
        let close = async move {
            next_request(&mut server).await;
            drop(server);
        };
        let (r, ()) = tokio::join!(pending, close);
        assert!(matches!(r, Err(RpcError::Channel(ChannelError::Read(_)))), "{r:?}");
    }

    /// Wake-ups of one waker.
    struct Count(std::sync::atomic::AtomicUsize);

    impl futures::task::ArcWake for Count {
        fn wake_by_ref(this: &Arc<Self>) {
            this.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// `n` wakers, each counting its wake-ups in its `Count`.
    fn counting_wakers(n: usize) -> (Vec<Arc<Count>>, Vec<Waker>) {
        let counts: Vec<Arc<Count>> = (0..n).map(|_| Arc::new(Count(Default::default()))).collect();
        let wakers = counts.iter().map(|c| futures::task::waker(c.clone())).collect();
        (counts, wakers)
    }

    /// Polls `call` once with `waker`.
    fn poll_with(call: &mut Pin<Box<PendingCall>>, waker: &Waker) -> Poll<Result<Reply, RpcError>> {
        call.as_mut().poll(&mut TaskContext::from_waker(waker))
    }

    /// The reader finishes and wakes a waiting call to read in its place; that call finds its
    /// own reply already in the socket and finishes without waiting for the socket: the call
    /// still waiting must then be woken too, or no one reads its reply when it comes.
    #[tokio::test]
    async fn when_the_reader_goes_a_waiting_call_is_always_left_to_read() {
        let (channel, mut server) = pair();
        let (counts, wakers) = counting_wakers(3);
        let woken = |i: usize| counts[i].0.load(std::sync::atomic::Ordering::SeqCst);
        let mut calls: Vec<_> =
            (0..3).map(|_| Box::pin(channel.call(ctx(Duration::from_secs(5)), &call("x")))).collect();
        for (call, waker) in calls.iter_mut().zip(&wakers) {
            assert!(poll_with(call, waker).is_pending());
        }
        // Call 2 read last: it is the reader. Its reply comes; it finishes.
        reply(&mut server, 2, Ok(Reply(Vec::new()))).await;
        assert!(poll_with(&mut calls[2], &wakers[2]).is_ready());
        // It woke one of the others to read in its place; that one's reply is there already.
        let next = (0..2).find(|&i| woken(i) > 0).expect("the reader went and woke no one");
        let other = 1 - next;
        let before = woken(other);
        reply(&mut server, next as u64, Ok(Reply(Vec::new()))).await;
        assert!(poll_with(&mut calls[next], &wakers[next]).is_ready());
        // The last call must be polled again (woken now, or by its reply later).
        reply(&mut server, other as u64, Ok(Reply(Vec::new()))).await;
        tokio::task::yield_now().await;
        assert!(woken(other) > before, "the last waiting call was left with no one to read its reply");
        assert!(poll_with(&mut calls[other], &wakers[other]).is_ready());
    }

    /// A call polled again from another task (another waker) is woken there, not where it
    /// was first polled.
    #[tokio::test]
    async fn a_reply_wakes_the_waker_of_the_calls_last_poll() {
        let (channel, mut server) = pair();
        let (counts, wakers) = counting_wakers(3);
        let woken = |i: usize| counts[i].0.load(std::sync::atomic::Ordering::SeqCst);
        let mut moved = Box::pin(channel.call(ctx(Duration::from_secs(5)), &call("moved")));
        let mut reader = Box::pin(channel.call(ctx(Duration::from_secs(5)), &call("reader")));
        assert!(poll_with(&mut moved, &wakers[0]).is_pending());
        assert!(poll_with(&mut moved, &wakers[1]).is_pending());
        assert!(poll_with(&mut reader, &wakers[2]).is_pending());
        // The reader reads the moved call's reply and wakes it.
        reply(&mut server, 0, Ok(Reply(Vec::new()))).await;
        assert!(poll_with(&mut reader, &wakers[2]).is_pending());
        assert_eq!((woken(0), woken(1)), (0, 1), "woken where it was first polled");
        assert!(poll_with(&mut moved, &wakers[1]).is_ready());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever a server sends — garbage, replies to any id, frames cut anywhere — then
        /// closing the connection: every call ends (a reply, the server's error, or a channel
        /// error), nothing panics, no call is left behind.
        #[test]
        fn any_bytes_from_a_server_end_every_call(
            replies in proptest::collection::vec((0u64..6, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..24)), 0..6),
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            cut in 0usize..512,
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            rt.block_on(async {
                let (channel, mut server) = pair();
                let calls: Vec<_> = (0..3).map(|_| channel.call(ctx(Duration::from_secs(5)), &call("x"))).collect();
                let mut wire = BytesMut::new();
                for (id, bytes) in replies {
                    let response = Response { request_id: id, message: Ok(Reply(bytes)) };
                    Frames::new(1 << 20, 1 << 20).encode_item(CODEC, &response, &mut wire).unwrap();
                }
                wire.extend_from_slice(&garbage);
                wire.truncate(cut.min(wire.len()));
                let answer = async move {
                    server.write_all(&wire).await.unwrap();
                    drop(server);
                };
                let both = async { tokio::join!(futures::future::join_all(calls), answer) };
                let (outcomes, ()) =
                    tokio::time::timeout(Duration::from_secs(10), both).await.expect("calls left waiting");
                for outcome in outcomes {
                    match outcome {
                        Ok(_) | Err(RpcError::Server(_)) | Err(RpcError::Channel(_)) => {}
                        other => panic!("{other:?}"),
                    }
                }
                assert!(channel.0.lock().calls.is_empty());
            });
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_concurrent_calls_each_get_their_own_reply() {
        let (channel, mut server) = pair();
        let echo = tokio::spawn(async move {
            loop {
                let len = match server.read_u32().await {
                    Ok(len) => len as usize,
                    Err(_) => return,
                };
                let mut frame = vec![0; len];
                server.read_exact(&mut frame).await.unwrap();
                if let ClientMessage::Request(r) = CODEC.decode::<ClientMessage<Call>>(&frame).unwrap() {
                    reply(&mut server, r.id, Ok(Reply(r.message.args))).await;
                }
            }
        });
        let calls = (0..200u32).map(|i| {
            let channel = channel.clone();
            tokio::spawn(async move {
                let c = Call { method: "echo".into(), args: i.to_le_bytes().to_vec() };
                let r = channel.call(ctx(Duration::from_secs(10)), &c).await.unwrap();
                assert_eq!(r.0, i.to_le_bytes());
            })
        });
        for c in futures::future::join_all(calls).await {
            c.unwrap();
        }
        drop(channel);
        echo.await.unwrap();
    }
}
