//! The server of the direct call path: one task per connection reads the calls, runs them and
//! writes their replies (the parent module says why).
//!
//! Each turn of the connection's task: run the calls, move the answers of those that finished
//! into the write buffer, write it, then read and start the calls that arrived. It holds the
//! same bounds as tarpc's channel did: calls are read only while the connection's calls in
//! flight leave room ([`InFlight`]); answers move into the write buffer only while it holds
//! under [`WRITE_HIGH`] bytes and wait, holding their calls' places in flight, until it does;
//! so a client that does not read its replies stops its own reading, never the server's
//! memory. The protocol is tarpc's,
//! with tarpc's rules: a request past its deadline on arrival, cancelled, or past its deadline
//! while running gets no reply (the client has given up on it); a second request with the id of
//! one still running is ignored; a frame over the limit, undecodable, or of a kind this server
//! does not know closes the connection, with the reason logged.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;

use bytes::BytesMut;
use futures::future::{AbortHandle, Abortable, BoxFuture};
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tarpc::Response;
use tokio_util::codec::Decoder;

use crate::codec::{self, Codec, Frames};
use crate::envelope::{self, ClientMessage};
use crate::in_flight::InFlight;
use crate::server::{Admitted, Answer, Paused, Stacked, oversize_reply};
use crate::transport::BoxStream;
use crate::wire::{Call, Reply};

/// Bytes of replies the write buffer may hold before the connection stops collecting answers
/// (it may pass it by one reply).
pub(crate) const WRITE_HIGH: usize = 64 << 10;

/// Turns one poll of the connection's task makes before yielding to the runtime.
const TURNS_PER_POLL: usize = 64;

/// How a running call is stopped (cancelled, or the connection gone).
enum Abort {
    Inline(AbortHandle),
    Spawned(tokio::task::AbortHandle),
}

impl Abort {
    fn abort(&self) {
        match self {
            Abort::Inline(h) => h.abort(),
            Abort::Spawned(h) => h.abort(),
        }
    }
}

/// What serves one connection.
pub(crate) struct Connection {
    pub(crate) stream: BoxStream,
    pub(crate) codec: Codec,
    pub(crate) frames: Frames,
    pub(crate) in_flight: Arc<InFlight>,
    pub(crate) paused: Paused,
    pub(crate) stacked: Stacked,
    pub(crate) spawn_calls: bool,
}

/// A connection being served.
struct Serving {
    conn: Connection,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// The calls running, each resolving to its id and its answer (none: aborted, or past its
    /// deadline).
    running: FuturesUnordered<BoxFuture<'static, (u64, Option<Answer>)>>,
    /// How to stop each running call, by request id.
    aborts: HashMap<u64, Abort>,
    /// Answers waiting for room in the write buffer, in the order they came (each holds its
    /// call's place in flight, so they are as bounded as the calls).
    answered: VecDeque<(u64, Answer)>,
    /// Whether the client may still send: once it has shut its side, the calls running are
    /// answered, then the connection closes.
    reading: bool,
    /// What each call's tarpc context is made from ([`envelope::Context::at`]).
    base_context: tarpc::context::Context,
}

/// Why serving a connection ended.
enum End {
    /// The client closed it.
    Closed,
    /// It broke the protocol (logged as a warning) or the connection failed.
    Failed(io::Error, &'static str),
}

/// Serves `conn`'s calls until the client goes or breaks the protocol.
pub(crate) async fn serve(conn: Connection) {
    let mut serving = Serving {
        conn,
        rbuf: BytesMut::with_capacity(super::READ_ROOM),
        wbuf: BytesMut::new(),
        running: FuturesUnordered::new(),
        aborts: HashMap::new(),
        answered: VecDeque::new(),
        reading: true,
        base_context: tarpc::context::current(),
    };
    match futures::future::poll_fn(|cx| serving.poll(cx)).await {
        End::Closed => tracing::debug!("connection closed"),
        End::Failed(e, why) if why.starts_with("bad frame") => {
            tracing::warn!(error = %e, "closing the connection: {why}")
        }
        End::Failed(e, why) => tracing::debug!(error = %e, "connection closed: {why}"),
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        // Calls inline go with `running`; spawned ones are stopped here.
        for abort in self.aborts.values() {
            abort.abort();
        }
    }
}

impl Serving {
    fn poll(&mut self, cx: &mut TaskContext<'_>) -> Poll<End> {
        for _ in 0..TURNS_PER_POLL {
            let mut progress = false;
            // Calls run to the end whatever the write side does: a call waiting for room to
            // answer would keep what it holds server-wide (a slot under `max_concurrent`, a
            // domain's poll) for as long as its client chooses not to read.
            while let Poll::Ready(Some((id, answer))) = self.running.poll_next_unpin(cx) {
                self.aborts.remove(&id);
                self.answered.extend(answer.map(|a| (id, a)));
                progress = true;
            }
            while self.wbuf.len() < WRITE_HIGH {
                let Some((id, answer)) = self.answered.pop_front() else { break };
                if let Err(e) = self.write_answer(id, answer) {
                    return Poll::Ready(End::Failed(e, "a reply could not be encoded"));
                }
                progress = true;
            }
            match self.flush(cx) {
                Ok(wrote) => progress |= wrote,
                Err(e) => return Poll::Ready(End::Failed(e, "writing failed")),
            }
            if !self.reading {
                if self.running.is_empty() && self.answered.is_empty() && self.wbuf.is_empty() {
                    return Poll::Ready(End::Closed);
                }
            } else if self.conn.in_flight.poll_room(cx).is_pending() {
                self.conn.paused.set(true);
            } else {
                self.conn.paused.set(false);
                match self.poll_message(cx) {
                    Poll::Pending => {}
                    Poll::Ready(Ok(None)) => {
                        self.reading = false;
                        progress = true;
                    }
                    Poll::Ready(Ok(Some((message, len)))) => {
                        if let Err(e) = self.handle(message, len, cx) {
                            return Poll::Ready(End::Failed(e, "bad frame from the client"));
                        }
                        progress = true;
                    }
                    Poll::Ready(Err((e, why))) => return Poll::Ready(End::Failed(e, why)),
                }
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Still busy: let the runtime run others, and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// The next message from the client, with the length of its frame; `None` at the end.
    #[allow(clippy::type_complexity)]
    fn poll_message(
        &mut self,
        cx: &mut TaskContext<'_>,
    ) -> Poll<Result<Option<(ClientMessage<Call>, usize)>, (io::Error, &'static str)>> {
        let bad = |e| (e, "bad frame from the client");
        loop {
            if let Some(frame) = self.conn.frames.decode(&mut self.rbuf).map_err(bad)? {
                let message = ClientMessage::decode(self.conn.codec, &frame).map_err(bad)?;
                return Poll::Ready(Ok(Some((message, frame.len()))));
            }
            match futures::ready!(super::poll_read(&mut self.conn.stream, cx, &mut self.rbuf)) {
                Ok(0) => return Poll::Ready(Ok(None)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err((e, "reading failed"))),
            }
        }
    }

    /// Starts a request, or cancels one.
    fn handle(
        &mut self,
        message: ClientMessage<Call>,
        len: usize,
        cx: &mut TaskContext<'_>,
    ) -> io::Result<()> {
        match message {
            ClientMessage::Request(request) => self.start(request, len, cx)?,
            ClientMessage::Cancel { request_id, .. } => {
                if let Some(abort) = self.aborts.remove(&request_id) {
                    abort.abort();
                }
            }
        }
        Ok(())
    }

    /// Starts a request: polls it once here, and only a call that does not answer at once
    /// joins the running ones (with its deadline's timer and a way to abort it). A deadline no
    /// `Instant` can hold is an error: the client breaks the protocol.
    fn start(
        &mut self,
        request: envelope::Request<Call>,
        len: usize,
        cx: &mut TaskContext<'_>,
    ) -> io::Result<()> {
        let envelope::Request { context: sent, id, message } = request;
        // The one clock read of the call's way in.
        let now = Instant::now();
        let Some(context) = sent.at(now, self.base_context) else {
            return Err(codec::invalid(format!("a deadline {:?} from now", sent.time_left)));
        };
        if self.aborts.contains_key(&id) {
            tracing::debug!(request_id = id, "a request with the id of one running: ignored");
            return Ok(());
        }
        if context.deadline <= now {
            tracing::debug!(request_id = id, "a request past its deadline on arrival: dropped");
            return Ok(());
        }
        let admitted = Admitted { call: message, ticket: self.conn.in_flight.admit(len), arrived: Some(now) };
        let deadline = context.deadline;
        let mut run = self.conn.stacked.run(context, admitted);
        if self.conn.spawn_calls {
            let work = async move { tokio::time::timeout_at(deadline.into(), run).await.ok() };
            let task = tokio::spawn(work);
            self.aborts.insert(id, Abort::Spawned(task.abort_handle()));
            self.running.push(task.map(move |r| (id, r.ok().flatten())).boxed());
        } else {
            // `Unpin`: polled here first, and moved into a box only if it must wait.
            if let Poll::Ready(answer) = Pin::new(&mut run).poll(cx) {
                self.answered.push_back((id, answer));
                return Ok(());
            }
            let work = async move { tokio::time::timeout_at(deadline.into(), run).await.ok() };
            let (abort, registration) = AbortHandle::new_pair();
            self.aborts.insert(id, Abort::Inline(abort));
            self.running
                .push(Abortable::new(work, registration).map(move |r| (id, r.ok().flatten())).boxed());
        }
        Ok(())
    }

    /// Encodes a call's answer into the write buffer; the call's place in flight goes with it.
    fn write_answer(&mut self, request_id: u64, answer: Answer) -> io::Result<()> {
        let Answer { outcome, ticket: _ticket } = answer;
        let (codec, frames) = (self.conn.codec, self.conn.frames);
        let response = Response { request_id, message: outcome };
        match frames.encode_item(codec, &response, &mut self.wbuf) {
            Err(e) if Frames::is_too_long(&e) => {
                let len = response.message.as_ref().map_or(0, |r| r.0.len());
                let message: Result<Reply, _> = Err(oversize_reply(len, &e));
                frames.encode_item(codec, &Response { request_id, message }, &mut self.wbuf)
            }
            other => other,
        }
    }

    /// Writes what the write buffer holds, as far as the connection takes it; true if it wrote.
    fn flush(&mut self, cx: &mut TaskContext<'_>) -> io::Result<bool> {
        super::write_out(&mut self.conn.stream, cx, &mut self.wbuf).map(|written| written.wrote)
    }
}
