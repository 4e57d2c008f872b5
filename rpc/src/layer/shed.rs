//! [`ShedLayer`]: at most `max` calls at once through the service it wraps; one more is refused
//! at once with tower's [`Overloaded`], never queued. What tower's `LoadShed` over
//! `ConcurrencyLimit` does, with an atomic count for the limit: the semaphore those two share
//! takes a lock to give back every call's permit, and is built to queue waiters, which a
//! server that refuses never has.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tower::load_shed::error::Overloaded;
use tower::{BoxError, Layer, Service};

/// Refuses calls past `max` running at once (over every clone of the service it makes).
#[derive(Debug, Clone)]
pub struct ShedLayer {
    running: Arc<AtomicUsize>,
    max: usize,
}

impl ShedLayer {
    /// At most `max` calls at once.
    pub fn new(max: usize) -> ShedLayer {
        ShedLayer { running: Arc::new(AtomicUsize::new(0)), max }
    }
}

impl<S> Layer<S> for ShedLayer {
    type Service = Shed<S>;

    fn layer(&self, inner: S) -> Shed<S> {
        Shed { inner, running: self.running.clone(), max: self.max }
    }
}

/// The service of a [`ShedLayer`].
#[derive(Debug, Clone)]
pub struct Shed<S> {
    inner: S,
    running: Arc<AtomicUsize>,
    max: usize,
}

impl<S, Req> Service<Req> for Shed<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = ShedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> ShedFuture<S::Future> {
        let max = self.max;
        let taken =
            self.running.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1));
        let state = match taken {
            Ok(_) => State::Running { call: self.inner.call(request), _slot: Slot(self.running.clone()) },
            Err(_) => State::Refused,
        };
        ShedFuture { state }
    }
}

/// A call's place among the `max`, given back when its future completes or is dropped.
#[derive(Debug)]
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// The future of a call through a [`Shed`].
    pub struct ShedFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project_lite::pin_project! {
    #[project = StateProj]
    enum State<F> {
        /// Admitted: the inner service's future, holding its place.
        Running { #[pin] call: F, _slot: Slot },
        /// Refused: [`Overloaded`].
        Refused,
    }
}

impl<F, T, E> Future for ShedFuture<F>
where
    F: Future<Output = Result<T, E>>,
    E: Into<BoxError>,
{
    type Output = Result<T, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Running { call, .. } => call.poll(cx).map_err(Into::into),
            StateProj::Refused => Poll::Ready(Err(Overloaded::new().into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;
    use tower::{ServiceBuilder, ServiceExt};

    use super::*;

    fn overloaded<T: std::fmt::Debug>(r: Result<T, BoxError>) -> bool {
        r.is_err_and(|e| e.is::<Overloaded>())
    }

    #[tokio::test]
    async fn refuses_past_the_limit_and_admits_again_when_a_call_ends() {
        let svc = ServiceBuilder::new()
            .layer(ShedLayer::new(2))
            .service_fn(|gate: oneshot::Receiver<()>| async move { gate.await.map_err(BoxError::from) });
        let (open_a, a) = oneshot::channel();
        let (open_b, b) = oneshot::channel();
        let first = tokio::spawn(svc.clone().oneshot(a));
        let second = tokio::spawn(svc.clone().oneshot(b));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (_keep, c) = oneshot::channel();
        let third = tokio::time::timeout(Duration::from_secs(5), svc.clone().oneshot(c)).await;
        assert!(third.is_ok_and(overloaded), "a third call was admitted past the limit of 2");
        open_a.send(()).unwrap();
        first.await.unwrap().unwrap();
        let (open_d, d) = oneshot::channel();
        open_d.send(()).unwrap();
        svc.clone().oneshot(d).await.expect("a call after one ended was refused");
        open_b.send(()).unwrap();
        second.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_call_dropped_unfinished_gives_its_place_back() {
        let svc = ServiceBuilder::new()
            .layer(ShedLayer::new(1))
            .service_fn(|gate: oneshot::Receiver<()>| async move { gate.await.map_err(BoxError::from) });
        let (_never, gate) = oneshot::channel();
        let pending = tokio::time::timeout(Duration::from_millis(10), svc.clone().oneshot(gate)).await;
        assert!(pending.is_err(), "the held call finished");
        let (open, gate) = oneshot::channel();
        open.send(()).unwrap();
        let next = tokio::time::timeout(Duration::from_secs(5), svc.oneshot(gate)).await;
        assert!(next.is_ok_and(|r| r.is_ok()), "the dropped call kept its place");
    }
}
