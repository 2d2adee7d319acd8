//! Idle connections: a connection with no open request (no unary call in flight, no open
//! Subscribe, Consume or other stream) for `--idle-timeout-ms` is closed, so its slot is
//! not held by a client that went quiet. Keepalive pings (HTTP/2 PING) are not requests:
//! they keep a dead peer from holding a connection, not a live one from being idle.
//!
//! A tower layer counts each connection's open requests (a request is open from its call
//! until its response body is dropped); a small task per connection sleeps until the
//! connection could be idle long enough, and then ends its input, which makes the server
//! close it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::task::AtomicWaker;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::accept::ConnectionInfo;

/// One connection's open requests and idleness.
#[derive(Debug)]
pub(crate) struct Activity {
    /// When the connection was admitted; `idle_since` counts from here.
    epoch: Instant,
    open: AtomicUsize,
    /// Milliseconds after `epoch` at which the last open request ended.
    idle_since_ms: AtomicU64,
    /// Set when the connection must close; its reader is then woken.
    closing: AtomicBool,
    reader: AtomicWaker,
    /// Cancelled when the connection is dropped, ending its idle watch.
    gone: CancellationToken,
}

impl Activity {
    pub(super) fn new() -> Self {
        Self {
            epoch: Instant::now(),
            open: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            reader: AtomicWaker::new(),
            gone: CancellationToken::new(),
        }
    }

    /// Counts a request open until the returned guard is dropped.
    fn begin(self: &Arc<Self>) -> OpenRequest {
        self.open.fetch_add(1, Ordering::AcqRel);
        OpenRequest(self.clone())
    }

    /// Whether the connection must close; else registers the reader to be woken when it
    /// must.
    pub(super) fn poll_close(&self, cx: &mut Context<'_>) -> bool {
        if self.closing.load(Ordering::Acquire) {
            return true;
        }
        self.reader.register(cx.waker());
        self.closing.load(Ordering::Acquire)
    }

    /// The connection was dropped.
    pub(super) fn closed(&self) {
        self.gone.cancel();
    }

    fn close(&self) {
        self.closing.store(true, Ordering::Release);
        self.reader.wake();
    }

    fn since_epoch_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
}

/// One open request of a connection.
#[derive(Debug)]
pub(crate) struct OpenRequest(Arc<Activity>);

impl Drop for OpenRequest {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity
                .idle_since_ms
                .store(activity.since_epoch_ms(), Ordering::Release);
        }
    }
}

/// Closes a connection once it has had no open request for the timeout.
pub(super) struct IdleWatch {
    activity: Arc<Activity>,
    timeout: Duration,
}

impl IdleWatch {
    pub(super) fn new(activity: Arc<Activity>, timeout: Duration) -> Self {
        Self { activity, timeout }
    }

    pub(super) async fn run(self) {
        let a = &self.activity;
        loop {
            // The earliest the connection could have been idle for the whole timeout.
            let idle_since = a.idle_since_ms.load(Ordering::Acquire);
            let due = a.epoch + Duration::from_millis(idle_since) + self.timeout;
            let due = due.max(Instant::now() + Duration::from_millis(1));
            tokio::select! {
                _ = tokio::time::sleep_until(due) => {}
                _ = a.gone.cancelled() => return,
            }
            let idle_for = a
                .since_epoch_ms()
                .saturating_sub(a.idle_since_ms.load(Ordering::Acquire));
            if a.open.load(Ordering::Acquire) == 0 && idle_for >= self.timeout.as_millis() as u64 {
                tracing::debug!(timeout = ?self.timeout, "connection idle; closing it");
                a.close();
                return;
            }
            if a.open.load(Ordering::Acquire) > 0 {
                // Busy: look again a timeout from now (the earliest it could be idle long
                // enough then).
                tokio::select! {
                    _ = tokio::time::sleep(self.timeout) => {}
                    _ = a.gone.cancelled() => return,
                }
            }
        }
    }
}

/// The tower layer that counts each connection's open requests.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct CountRequests;

impl<S> tower::Layer<S> for CountRequests {
    type Service = Counted<S>;

    fn layer(&self, inner: S) -> Counted<S> {
        Counted { inner }
    }
}

/// A service whose requests are counted open until their response body is dropped.
#[derive(Debug, Clone)]
pub(super) struct Counted<S> {
    inner: S,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for Counted<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = CountedFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let open = req
            .extensions()
            .get::<ConnectionInfo>()
            .map(|info| info.activity.begin());
        CountedFuture {
            inner: self.inner.call(req),
            open,
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's response future, holding the request open.
    pub(super) struct CountedFuture<F> {
        #[pin]
        inner: F,
        open: Option<OpenRequest>,
    }
}

impl<F, ResBody, E> Future for CountedFuture<F>
where
    F: Future<Output = Result<http::Response<ResBody>, E>>,
{
    type Output = Result<http::Response<CountedBody<ResBody>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let response = futures::ready!(this.inner.poll(cx));
        let open = this.open.take();
        Poll::Ready(response.map(|r| r.map(|inner| CountedBody { inner, _open: open })))
    }
}

pin_project_lite::pin_project! {
    /// A response body (a stream's responses), holding its request open until dropped.
    pub(super) struct CountedBody<B> {
        #[pin]
        inner: B,
        _open: Option<OpenRequest>,
    }
}

impl<B: http_body::Body> http_body::Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
