//! [`ConnectionLostLayer`]: on the client, turns the transport error of a call that may have
//! run (it left, the connection went, and it is not idempotent, so it was not sent again) into
//! a [`ConnectionLost`], so that the caller can tell "may or may not have run" from "never sent".

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tarpc::ChannelError;
use tarpc::client::RpcError;
use tower::{Layer, Service};

use crate::client::{ConnectionLost, is_transport_error};

/// A call that says whether it may be sent again after its connection was lost.
pub trait MayRetry {
    /// Whether the method is idempotent.
    fn idempotent(&self) -> bool;
}

/// Answers [`ConnectionLost`] (inside `RpcError::Channel`) for a call that is not idempotent
/// and failed with a transport error after it left; other outcomes pass unchanged.
#[derive(Clone)]
pub struct ConnectionLostLayer {
    addr: Arc<str>,
}

impl ConnectionLostLayer {
    /// A layer for calls to `addr` (named in the error).
    pub fn new(addr: Arc<str>) -> ConnectionLostLayer {
        ConnectionLostLayer { addr }
    }
}

impl<S> Layer<S> for ConnectionLostLayer {
    type Service = ConnectionLostService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        ConnectionLostService { inner, addr: self.addr.clone() }
    }
}

/// The service of a [`ConnectionLostLayer`].
#[derive(Clone)]
pub struct ConnectionLostService<S> {
    inner: S,
    addr: Arc<str>,
}

impl<S, Req> Service<Req> for ConnectionLostService<S>
where
    S: Service<Req, Error = RpcError>,
    Req: MayRetry,
{
    type Response = S::Response;
    type Error = RpcError;
    type Future = MapLost<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RpcError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let lost_to = (!request.idempotent()).then(|| self.addr.clone());
        MapLost { inner: self.inner.call(request), lost_to }
    }
}

pin_project_lite::pin_project! {
    /// The future of a call through a [`ConnectionLostLayer`]: `lost_to` is where the call
    /// went if it is not idempotent (else its errors pass unchanged).
    pub struct MapLost<Fut> {
        #[pin]
        inner: Fut,
        lost_to: Option<Arc<str>>,
    }
}

impl<Fut, T> Future for MapLost<Fut>
where
    Fut: Future<Output = Result<T, RpcError>>,
{
    type Output = Result<T, RpcError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        Poll::Ready(match std::task::ready!(this.inner.poll(cx)) {
            Err(e) if is_transport_error(&e) && !matches!(e, RpcError::Send(_)) => {
                match this.lost_to.take() {
                    Some(addr) => {
                        let lost = ConnectionLost { addr: addr.to_string(), cause: e.to_string() };
                        Err(RpcError::Channel(ChannelError::Read(Arc::new(lost))))
                    }
                    None => Err(e),
                }
            }
            other => other,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use tower::{ServiceBuilder, ServiceExt};

    use super::*;
    use crate::client::connection_lost;

    struct Call {
        idempotent: bool,
        fails_with: fn() -> RpcError,
    }

    impl MayRetry for Call {
        fn idempotent(&self) -> bool {
            self.idempotent
        }
    }

    fn lost_in_flight() -> RpcError {
        RpcError::Channel(ChannelError::Read(Arc::new(io::Error::from(io::ErrorKind::ConnectionReset))))
    }

    fn never_sent() -> RpcError {
        RpcError::Send(Box::new(io::Error::from(io::ErrorKind::ConnectionRefused)))
    }

    fn shutdown() -> RpcError {
        RpcError::Shutdown
    }

    fn refused_by_server() -> RpcError {
        RpcError::Server(tarpc::ServerError::new(io::ErrorKind::NotFound, "no".into()))
    }

    async fn through_layer(idempotent: bool, fails_with: fn() -> RpcError) -> RpcError {
        let svc = ServiceBuilder::new()
            .layer(ConnectionLostLayer::new("xen:1:5000".into()))
            .service_fn(|c: Call| async move { Err::<(), _>((c.fails_with)()) });
        svc.oneshot(Call { idempotent, fails_with }).await.unwrap_err()
    }

    #[tokio::test]
    async fn a_call_that_may_have_run_fails_with_connection_lost() {
        let e = through_layer(false, lost_in_flight).await;
        let lost = connection_lost(&e).expect("ConnectionLost");
        assert_eq!(lost.addr, "xen:1:5000");
        assert_eq!(lost.cause, lost_in_flight().to_string());
        assert!(connection_lost(&through_layer(false, shutdown).await).is_some());
    }

    #[tokio::test]
    async fn other_outcomes_pass_unchanged() {
        assert!(connection_lost(&through_layer(true, lost_in_flight).await).is_none());
        assert!(matches!(through_layer(false, never_sent).await, RpcError::Send(_)));
        assert!(matches!(through_layer(false, refused_by_server).await, RpcError::Server(_)));
        let ok = ServiceBuilder::new()
            .layer(ConnectionLostLayer::new("tcp:h:1".into()))
            .service_fn(|_: Call| async { Ok::<_, RpcError>(7) });
        assert_eq!(ok.oneshot(Call { idempotent: false, fails_with: never_sent }).await.unwrap(), 7);
    }
}
