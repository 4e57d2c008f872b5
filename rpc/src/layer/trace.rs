//! [`TraceLayer`]: runs every call through a service inside a tracing span made for it (as
//! tower-http's `TraceLayer` does for HTTP requests), optionally logging a failure in it.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tower::{Layer, Service};
use tracing::Span;
use tracing::instrument::Instrumented;

/// Runs each call inside the span `make_span(&request)` makes; with
/// [`log_failures`](TraceLayer::log_failures), a call that fails logs its error (debug) there.
#[derive(Clone)]
pub struct TraceLayer<F> {
    make_span: F,
    log_failures: bool,
}

impl<F> TraceLayer<F> {
    /// A layer making each call's span with `make_span`.
    pub fn new(make_span: F) -> TraceLayer<F> {
        TraceLayer { make_span, log_failures: false }
    }

    /// Also logs (debug, in the call's span) why a call failed.
    pub fn log_failures(self) -> TraceLayer<F> {
        TraceLayer { log_failures: true, ..self }
    }
}

impl<S, F: Clone> Layer<S> for TraceLayer<F> {
    type Service = TraceService<S, F>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceService { inner, make_span: self.make_span.clone(), log_failures: self.log_failures }
    }
}

/// The service of a [`TraceLayer`].
#[derive(Clone)]
pub struct TraceService<S, F> {
    inner: S,
    make_span: F,
    log_failures: bool,
}

impl<S, F, Req> Service<Req> for TraceService<S, F>
where
    S: Service<Req>,
    S::Error: Display,
    F: Fn(&Req) -> Span,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Traced<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let span = (self.make_span)(&request);
        let log_failures = self.log_failures;
        // A span no subscriber wants is not entered at every poll: with tracing's `log`
        // feature on (tarpc turns it on), even a disabled span's enter and exit cost a check.
        if span.is_disabled() {
            return Traced { inner: Inner::Plain { fut: self.inner.call(request) }, log_failures };
        }
        let inner = span.in_scope(|| self.inner.call(request));
        Traced { inner: Inner::Spanned { fut: tracing::Instrument::instrument(inner, span) }, log_failures }
    }
}

pin_project_lite::pin_project! {
    /// The future of a call a [`TraceLayer`] traces.
    pub struct Traced<Fut> {
        #[pin]
        inner: Inner<Fut>,
        log_failures: bool,
    }
}

pin_project_lite::pin_project! {
    /// A call's future, in its span if one is enabled.
    #[project = InnerProj]
    enum Inner<Fut> {
        Plain { #[pin] fut: Fut },
        Spanned { #[pin] fut: Instrumented<Fut> },
    }
}

impl<Fut, T, E> Future for Traced<Fut>
where
    Fut: Future<Output = Result<T, E>>,
    E: Display,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let (result, span) = match this.inner.project() {
            InnerProj::Plain { fut } => (std::task::ready!(fut.poll(cx)), None),
            InnerProj::Spanned { mut fut } => {
                let result = std::task::ready!(fut.as_mut().poll(cx));
                (result, Some(fut.into_ref().get_ref().span()))
            }
        };
        if let (Err(e), true) = (&result, *this.log_failures) {
            match span {
                Some(span) => span.in_scope(|| tracing::debug!(error = %e, "call failed")),
                None => tracing::debug!(error = %e, "call failed"),
            }
        }
        Poll::Ready(result)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tower::{ServiceBuilder, ServiceExt};
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata, Subscriber};

    use super::*;

    /// Records, for each event, its message and the names of the spans it is in.
    #[derive(Clone, Default)]
    struct Events {
        spans: Arc<Mutex<Vec<String>>>,
        current: Arc<Mutex<Vec<u64>>>,
        seen: Arc<Mutex<Vec<String>>>,
    }

    struct Message(String);

    impl Visit for Message {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push_str(&format!(" {}={value:?}", field.name()));
        }
    }

    impl Subscriber for Events {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, span: &Attributes<'_>) -> Id {
            let mut spans = self.spans.lock().unwrap();
            let mut fields = Message(span.metadata().name().to_string());
            span.record(&mut fields);
            spans.push(fields.0);
            Id::from_u64(spans.len() as u64)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &Event<'_>) {
            let mut m = Message(String::new());
            event.record(&mut m);
            let spans = self.spans.lock().unwrap();
            let within: Vec<_> =
                self.current.lock().unwrap().iter().map(|&i| spans[i as usize - 1].clone()).collect();
            self.seen.lock().unwrap().push(format!("[{}]{}", within.join(","), m.0));
        }
        fn enter(&self, span: &Id) {
            self.current.lock().unwrap().push(span.into_u64());
        }
        fn exit(&self, _: &Id) {
            self.current.lock().unwrap().pop();
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_run_in_their_span_and_failures_are_logged_there() {
        let events = Events::default();
        let _guard = tracing::subscriber::set_default(events.clone());
        let svc = ServiceBuilder::new()
            .layer(TraceLayer::new(|r: &u32| tracing::debug_span!("call", n = *r)).log_failures())
            .service_fn(|r: u32| async move {
                tracing::debug!("inside");
                tokio::task::yield_now().await;
                if r == 2 { Err("broken") } else { Ok(r) }
            });
        assert_eq!(svc.clone().oneshot(1).await, Ok(1));
        assert_eq!(svc.oneshot(2).await, Err("broken"));
        let seen = events.seen.lock().unwrap().clone();
        assert_eq!(
            seen,
            [
                "[call n=1] message=inside",
                "[call n=2] message=inside",
                "[call n=2] message=call failed error=broken",
            ],
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn failures_are_not_logged_unless_asked() {
        let events = Events::default();
        let _guard = tracing::subscriber::set_default(events.clone());
        let svc = ServiceBuilder::new()
            .layer(TraceLayer::new(|_: &u32| tracing::debug_span!("call")))
            .service_fn(|_: u32| async { Err::<(), _>("broken") });
        assert_eq!(svc.oneshot(1).await, Err("broken"));
        assert!(events.seen.lock().unwrap().is_empty());
    }
}
