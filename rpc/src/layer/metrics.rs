//! [`MetricsLayer`]: counts every call through a service in [`Metrics`], by service and method,
//! with its outcome and latency.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use tower::{Layer, Service};

use crate::metrics::Metrics;

/// What a call is counted under: its service and method. Kept until the call completes, so it
/// is a cheap handle (a `&'static str`, an `Arc`, an index), not a copy of the names.
pub trait CallName {
    /// The service's name.
    fn service(&self) -> &str;
    /// The method's name.
    fn method(&self) -> &str;
    /// When the call began, if its request knows (a server: when it read the call, a clock
    /// read it makes anyway for the deadline); the layer then counts the latency from there
    /// rather than reading the clock itself.
    fn started(&self) -> Option<Instant> {
        None
    }
}

/// Counts the calls of the service it wraps in [`Metrics`] (calls, errors, latency until its
/// answer from the earliest of: when the call began, if its request says
/// ([`CallName::started`]); when the stack first found its inner service not ready for it (a
/// wait for a concurrency permit counts); when the call was made), naming each by
/// `name(&request)`.
#[derive(Clone)]
pub struct MetricsLayer<F> {
    metrics: Metrics,
    name: F,
}

impl<F> MetricsLayer<F> {
    /// A layer counting into `metrics`, naming each call with `name`.
    pub fn new(metrics: Metrics, name: F) -> MetricsLayer<F> {
        MetricsLayer { metrics, name }
    }
}

impl<S, F: Clone> Layer<S> for MetricsLayer<F> {
    type Service = MetricsService<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService { inner, metrics: self.metrics.clone(), name: self.name.clone(), ready_since: None }
    }
}

/// The service of a [`MetricsLayer`].
#[derive(Clone)]
pub struct MetricsService<S, F> {
    inner: S,
    metrics: Metrics,
    name: F,
    /// When the stack first found its inner service not ready for the next call (waiting for
    /// a concurrency permit counts in the call's latency).
    ready_since: Option<Instant>,
}

impl<S, F, N, Req> Service<Req> for MetricsService<S, F>
where
    S: Service<Req>,
    F: Fn(&Req) -> N,
    N: CallName,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Recorded<S::Future, N>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        let ready = self.inner.poll_ready(cx);
        if ready.is_pending() {
            self.ready_since.get_or_insert_with(Instant::now);
        }
        ready
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let name = (self.name)(&request);
        let start = match (name.started(), self.ready_since.take()) {
            (Some(began), Some(waited)) => began.min(waited),
            (Some(at), None) | (None, Some(at)) => at,
            (None, None) => Instant::now(),
        };
        Recorded { inner: self.inner.call(request), record: Some((self.metrics.clone(), name, start)) }
    }
}

pin_project_lite::pin_project! {
    /// The future of a call a [`MetricsLayer`] counts.
    pub struct Recorded<Fut, N> {
        #[pin]
        inner: Fut,
        record: Option<(Metrics, N, Instant)>,
    }
}

impl<Fut, N, T, E> Future for Recorded<Fut, N>
where
    Fut: Future<Output = Result<T, E>>,
    N: CallName,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = std::task::ready!(this.inner.poll(cx));
        if let Some((metrics, name, start)) = this.record.take() {
            metrics.record(name.service(), name.method(), result.is_ok(), start.elapsed());
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tower::{ServiceBuilder, ServiceExt};

    use super::*;

    struct Named(&'static str);

    impl CallName for Named {
        fn service(&self) -> &str {
            "kv"
        }
        fn method(&self) -> &str {
            self.0
        }
    }

    #[tokio::test]
    async fn counts_calls_errors_and_latency_by_name() {
        let metrics = Metrics::new("server");
        let svc = ServiceBuilder::new()
            .layer(MetricsLayer::new(metrics.clone(), |r: &&'static str| Named(r)))
            .service_fn(|r: &'static str| async move {
                tokio::time::sleep(Duration::from_millis(2)).await;
                if r == "fail" { Err("failed") } else { Ok(r.len()) }
            });
        assert_eq!(svc.clone().oneshot("get").await, Ok(3));
        assert_eq!(svc.clone().oneshot("get").await, Ok(3));
        assert_eq!(svc.oneshot("fail").await, Err("failed"));
        let stats = metrics.snapshot();
        let get = stats.iter().find(|s| s.method == "get").expect("get counted");
        assert_eq!((get.service.as_str(), get.calls, get.errors), ("kv", 2, 0));
        assert!(get.seconds >= 0.004, "latency {}", get.seconds);
        let fail = stats.iter().find(|s| s.method == "fail").expect("fail counted");
        assert_eq!((fail.calls, fail.errors), (1, 1));
        let text = metrics.prometheus();
        assert!(text.contains("dombus_rpc_server_calls_total{service=\"kv\",method=\"get\"} 2"), "{text}");
    }

    /// A request that says when its call began (a server's arrival time) is timed from then;
    /// a wait for the inner service's readiness counts too.
    #[tokio::test]
    async fn latency_counts_from_when_the_call_began_or_waited() {
        struct Began(Instant);
        impl CallName for Began {
            fn service(&self) -> &str {
                "kv"
            }
            fn method(&self) -> &str {
                "get"
            }
            fn started(&self) -> Option<Instant> {
                Some(self.0)
            }
        }
        let metrics = Metrics::new("server");
        let svc = ServiceBuilder::new()
            .layer(MetricsLayer::new(metrics.clone(), |r: &Instant| Began(*r)))
            .service_fn(|_: Instant| async { Ok::<_, ()>(()) });
        svc.clone().oneshot(Instant::now() - Duration::from_secs(3)).await.unwrap();
        let seconds = metrics.snapshot()[0].seconds;
        assert!((3.0..4.0).contains(&seconds), "latency {seconds}");

        // Not ready for 20 ms (a concurrency permit held elsewhere): the wait counts.
        let metrics = Metrics::new("client");
        let svc = ServiceBuilder::new()
            .layer(MetricsLayer::new(metrics.clone(), |r: &&'static str| Named(r)))
            .concurrency_limit(1)
            .service_fn(|_: &'static str| async { Ok::<_, ()>(()) });
        let mut holder = svc.clone();
        holder.ready().await.unwrap();
        let waiting = tokio::spawn(svc.oneshot("get"));
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(holder);
        waiting.await.unwrap().unwrap();
        let seconds = metrics.snapshot()[0].seconds;
        assert!(seconds >= 0.020, "latency {seconds}: the wait for a permit was not counted");
    }

    #[tokio::test]
    async fn a_call_dropped_before_it_completes_is_not_counted() {
        let metrics = Metrics::new("client");
        let svc = ServiceBuilder::new()
            .layer(MetricsLayer::new(metrics.clone(), |r: &&'static str| Named(r)))
            .service_fn(|_: &'static str| std::future::pending::<Result<(), ()>>());
        let call = tokio::time::timeout(Duration::from_millis(1), svc.oneshot("hang")).await;
        assert!(call.is_err());
        assert!(metrics.snapshot().is_empty());
    }
}
