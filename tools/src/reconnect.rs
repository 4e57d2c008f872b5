//! Round trips that go on across lost connections: a caller that reconnects with bounded back-off
//! and counts what the losses cost — how `dombus-link vsock-ping --reconnect-s` keeps calling a
//! service while the domain agent on either side restarts.
//!
//! Every wait is bounded: a round trip by [`Reconnect::round_trip_limit`], and the time without a
//! successful round trip (reconnecting included) by [`Reconnect::budget`].

use std::future::Future;
use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::diag::Latency;

/// How a caller reconnects.
#[derive(Debug, Clone)]
pub struct Reconnect {
    /// Longest time without a successful round trip, counted from the first failure after the
    /// last success; reconnect attempts stop there and the calls fail.
    pub budget: Duration,
    /// The pause before the first reconnect attempt after a failure; doubled after each failed
    /// attempt, up to [`Reconnect::max_backoff`].
    pub first_backoff: Duration,
    /// The longest pause between two reconnect attempts.
    pub max_backoff: Duration,
    /// Longest a round trip may take: past it, the round trip counts as failed and the
    /// connection is replaced (a peer that stopped answering without closing).
    pub round_trip_limit: Duration,
}

impl Reconnect {
    /// Reconnects for up to `budget`, with back-off from 50 ms to 1 s; round trips time out after
    /// 10 s.
    pub fn within(budget: Duration) -> Reconnect {
        Reconnect {
            budget,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            round_trip_limit: Duration::from_secs(10),
        }
    }
}

/// What happened to one caller's connection, as it happens (for progress lines).
#[derive(Debug)]
pub enum Event<'a> {
    /// A connection is up: the first (`reconnects` 0) or a replacement.
    Connected {
        /// Replacements so far, this one included.
        reconnects: usize,
    },
    /// A round trip failed: the connection is dropped and replaced.
    Lost {
        /// Why.
        error: &'a io::Error,
    },
    /// A reconnect attempt failed; another follows after `retry_in`.
    AttemptFailed {
        /// Why.
        error: &'a io::Error,
        /// The pause before the next attempt.
        retry_in: Duration,
    },
}

/// What a caller's round trips came to.
#[derive(Debug, Clone, PartialEq)]
pub struct Calls {
    /// Round trips that came back intact.
    pub round_trips: usize,
    /// Round trips that failed (each ended its connection).
    pub failed: usize,
    /// Connections that replaced a failed one.
    pub reconnects: usize,
    /// Round trips on the last replacement connection (0 if none was needed): the calls that
    /// went through after the last loss.
    pub after_reconnect: usize,
    /// Percentiles of the successful round trips.
    pub latency: Option<Latency>,
}

/// Makes `count` round trips of `size` bytes against an echoing peer, one every `interval` at
/// most, over connections from `connect`: the first must succeed; when a round trip fails (an
/// error, an end of stream, or no answer within [`Reconnect::round_trip_limit`]), the connection
/// is dropped and `connect` called again with growing pauses, until one succeeds or
/// [`Reconnect::budget`] has passed since the first failure after the last success (then the
/// error says what failed last). An echo that differs from what was sent is an error at once:
/// that is damage, not a lost connection.
pub async fn ping<S, C, F>(
    mut connect: C,
    size: usize,
    count: usize,
    interval: Duration,
    policy: &Reconnect,
    mut on_event: impl FnMut(Event<'_>),
) -> io::Result<Calls>
where
    C: FnMut() -> F,
    F: Future<Output = io::Result<S>>,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let msg: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; size];
    let mut samples = Vec::with_capacity(count);
    let mut calls = Calls { round_trips: 0, failed: 0, reconnects: 0, after_reconnect: 0, latency: None };
    let mut stream = Some(connect().await?);
    on_event(Event::Connected { reconnects: 0 });
    // When the round trips started failing (cleared by a success): the budget counts from here.
    let mut failing_since: Option<Instant> = None;
    while calls.round_trips < count {
        let Some(s) = stream.as_mut() else {
            let since = *failing_since.get_or_insert_with(Instant::now);
            stream = Some(reconnect(&mut connect, since, policy, &mut on_event).await?);
            calls.reconnects += 1;
            calls.after_reconnect = 0;
            on_event(Event::Connected { reconnects: calls.reconnects });
            continue;
        };
        if calls.round_trips + calls.failed > 0 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        let t = Instant::now();
        let trip = async {
            s.write_all(&msg).await?;
            s.read_exact(&mut back).await?;
            io::Result::Ok(())
        };
        let result = match tokio::time::timeout(policy.round_trip_limit, trip).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no echo within {:?}", policy.round_trip_limit),
            )),
        };
        match result {
            Ok(()) if back != msg => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "echo differs from what was sent"));
            }
            Ok(()) => {
                samples.push(t.elapsed());
                calls.round_trips += 1;
                if calls.reconnects > 0 {
                    calls.after_reconnect += 1;
                }
                failing_since = None;
            }
            Err(e) => {
                calls.failed += 1;
                failing_since.get_or_insert(t);
                on_event(Event::Lost { error: &e });
                stream = None;
            }
        }
    }
    if let Some(s) = stream.as_mut() {
        let _ = tokio::time::timeout(policy.round_trip_limit, s.shutdown()).await;
    }
    calls.latency = Latency::from_samples(&mut samples);
    Ok(calls)
}

/// Calls `connect` until it succeeds, pausing between attempts, for as long as the budget that
/// started at `since` lasts; each attempt is cut off where the budget ends.
async fn reconnect<S, C, F>(
    connect: &mut C,
    since: Instant,
    policy: &Reconnect,
    on_event: &mut impl FnMut(Event<'_>),
) -> io::Result<S>
where
    C: FnMut() -> F,
    F: Future<Output = io::Result<S>>,
{
    let deadline = since + policy.budget;
    let mut backoff = policy.first_backoff;
    let mut attempts = 0u32;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(backoff.min(left)).await;
        let left = deadline.saturating_duration_since(Instant::now());
        attempts += 1;
        let error = match tokio::time::timeout(left, connect()).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) => e,
            Err(_) => io::Error::new(io::ErrorKind::TimedOut, "the attempt was still running"),
        };
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                error.kind(),
                format!(
                    "no round trip for {:?} and no new connection after {attempts} attempts; the last: {error}",
                    policy.budget
                ),
            ));
        }
        backoff = (backoff * 2).min(policy.max_backoff);
        on_event(Event::AttemptFailed { error: &error, retry_in: backoff });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::DuplexStream;

    use super::*;

    /// An echo peer on the other end of a pipe that answers `answers` round trips of `size`
    /// bytes and then closes (`close`) or goes silent with the pipe held open.
    fn peer(answers: usize, size: usize, close: bool) -> DuplexStream {
        let (mine, mut theirs) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = vec![0u8; size];
            for _ in 0..answers {
                if theirs.read_exact(&mut buf).await.is_err() || theirs.write_all(&buf).await.is_err() {
                    return;
                }
            }
            if !close {
                std::future::pending::<()>().await;
            }
        });
        mine
    }

    fn quick(budget: Duration) -> Reconnect {
        Reconnect {
            budget,
            first_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(20),
            round_trip_limit: Duration::from_millis(300),
        }
    }

    #[tokio::test]
    async fn calls_go_on_over_a_new_connection_after_the_peer_closes() {
        // Connection 1 answers 5 round trips and closes; 2 attempts fail; connection 2 answers.
        let attempts = Arc::new(AtomicUsize::new(0));
        let a = attempts.clone();
        let connect = move || {
            let n = a.fetch_add(1, Ordering::Relaxed);
            async move {
                match n {
                    0 => Ok(peer(5, 64, true)),
                    1 | 2 => Err(io::Error::new(io::ErrorKind::ConnectionRefused, "not yet")),
                    _ => Ok(peer(usize::MAX, 64, true)),
                }
            }
        };
        let mut events = Vec::new();
        let calls = ping(connect, 64, 20, Duration::ZERO, &quick(Duration::from_secs(10)), |e| {
            events.push(format!("{e:?}"))
        })
        .await
        .unwrap();
        assert_eq!(
            (calls.round_trips, calls.failed, calls.reconnects, calls.after_reconnect),
            (20, 1, 1, 15),
            "{calls:?}"
        );
        assert_eq!(attempts.load(Ordering::Relaxed), 4);
        assert_eq!(calls.latency.unwrap().count, 20);
        assert_eq!(events.iter().filter(|e| e.starts_with("AttemptFailed")).count(), 2, "{events:?}");
    }

    #[tokio::test]
    async fn a_silent_peer_is_replaced_after_the_round_trip_limit() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let a = attempts.clone();
        let connect = move || {
            let n = a.fetch_add(1, Ordering::Relaxed);
            async move { Ok(peer(if n == 0 { 3 } else { usize::MAX }, 64, false)) }
        };
        let calls =
            ping(connect, 64, 10, Duration::ZERO, &quick(Duration::from_secs(10)), |_| {}).await.unwrap();
        assert_eq!((calls.round_trips, calls.failed, calls.reconnects, calls.after_reconnect), (10, 1, 1, 7));
    }

    #[tokio::test]
    async fn reconnecting_stops_when_the_budget_is_spent() {
        let connect = {
            let mut first = true;
            move || {
                let s = std::mem::take(&mut first)
                    .then(|| peer(2, 64, true))
                    .ok_or_else(|| io::Error::new(io::ErrorKind::ConnectionRefused, "refused"));
                async move { s }
            }
        };
        let t = Instant::now();
        let e = ping(connect, 64, 10, Duration::ZERO, &quick(Duration::from_millis(200)), |_| {})
            .await
            .unwrap_err();
        let took = t.elapsed();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused, "{e}");
        assert!(e.to_string().contains("no new connection"), "{e}");
        assert!(took >= Duration::from_millis(200), "gave up after {took:?}, before its budget");
        assert!(took < Duration::from_secs(5), "went on for {took:?} on a 200 ms budget");
    }

    #[tokio::test]
    async fn a_first_connection_that_fails_is_an_error_at_once() {
        let connect =
            || async { Err::<DuplexStream, _>(io::Error::new(io::ErrorKind::NotFound, "no agent")) };
        let e =
            ping(connect, 64, 10, Duration::ZERO, &quick(Duration::from_secs(10)), |_| {}).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }

    #[tokio::test]
    async fn a_damaged_echo_is_an_error_not_a_reconnect() {
        let connect = || async {
            let (mine, mut theirs) = tokio::io::duplex(4096);
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                while theirs.read_exact(&mut buf).await.is_ok() {
                    buf[7] ^= 1;
                    if theirs.write_all(&buf).await.is_err() {
                        return;
                    }
                }
            });
            Ok(mine)
        };
        let e =
            ping(connect, 64, 10, Duration::ZERO, &quick(Duration::from_secs(10)), |_| {}).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
