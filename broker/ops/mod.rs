//! The operations HTTP server (axum), on its own address next to gRPC:
//!
//! * `GET /metrics`: OpenMetrics / Prometheus text ([`metrics`]).
//! * `GET /healthz`: `200 ok` while serving; `503` with the reason once shutdown has
//!   begun or while the broker is fail-stopped (its write-ahead log failed).
//! * `GET /`: the live dashboard page ([`dashboard`]), fed by
//!   `GET /api/events` (server-sent events, one frame per sample), with
//!   `GET /api/stats` (the latest frame) and `GET /api/history` (the recent samples).
//!
//! * `GET /console`: the operations console ([`console`]): jobs, topics and actions, under
//!   `/console/api/...`, checked against the tokens file's grants when there is one.
//!
//! It follows the broker's shutdown token: when the broker shuts down, open event streams
//! end and [`serve_http`] returns, within the drain timeout. Its own `shutdown` future
//! stops only the HTTP server.

pub(super) mod console;
pub(super) mod dashboard;
pub(super) mod metrics;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::broker::auth::Authenticator;
use crate::broker::engine::Engine;
use crate::broker::ops::dashboard::Sampler;
use crate::broker::ops::metrics::Metrics;

/// Settings of the operations HTTP server.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// How often the dashboard samples the broker's stats (and pushes a frame to open
    /// pages).
    pub sample_interval: Duration,
    /// How many samples the dashboard's charts keep (600 at 1 s: the last 10 minutes).
    pub history: usize,
    /// How long open requests may take to finish after shutdown starts.
    pub drain_timeout: Duration,
    /// The tokens the console checks, as gRPC does (`None`: no tokens file, the console
    /// is open and the server must listen on loopback only).
    pub auth: Option<Authenticator>,
}

impl Default for HttpOptions {
    fn default() -> Self {
        Self {
            sample_interval: Duration::from_secs(1),
            history: 600,
            drain_timeout: Duration::from_secs(5),
            auth: None,
        }
    }
}

/// Shared state of the handlers.
#[derive(Clone)]
struct AppState<E> {
    broker: E,
    metrics: Arc<Metrics>,
    sampler: Sampler,
    /// The console's tokens (see [`HttpOptions::auth`]).
    auth: Option<Authenticator>,
    /// Cancelled when this server stops (a child of the broker's shutdown token).
    stop: CancellationToken,
}

/// Serves `/metrics`, `/healthz` and the dashboard for `broker` on `listener` with the
/// default [`HttpOptions`], until `shutdown` resolves or the broker shuts down.
pub async fn serve_http<E: Engine>(
    listener: TcpListener,
    broker: E,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_http_with(listener, broker, HttpOptions::default(), shutdown).await
}

/// [`serve_http`] with explicit settings.
pub async fn serve_http_with<E: Engine>(
    listener: TcpListener,
    broker: E,
    options: HttpOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let addr = listener.local_addr().ok();
    // A child token: the broker's shutdown stops this server, while `shutdown` stops only
    // this server and leaves the broker (and gRPC) running.
    let stop = broker.shutdown_token().child_token();
    let sampler = Sampler::start(broker.clone(), &options, stop.clone()).await;
    let state = AppState {
        broker: broker.clone(),
        metrics: Arc::new(Metrics::new(&broker)),
        sampler,
        auth: options.auth.clone(),
        stop: stop.clone(),
    };
    let app = Router::new()
        .route("/", get(dashboard_page))
        .route("/metrics", get(metrics_text::<E>))
        .route("/healthz", get(healthz::<E>))
        .route("/api/stats", get(dashboard::latest::<E>))
        .route("/api/history", get(dashboard::history::<E>))
        .route("/api/events", get(dashboard::events::<E>))
        .merge(console::routes::<E>())
        .with_state(state);
    tracing::info!(
        ?addr,
        "sluice serving HTTP (metrics, health, dashboard, console)"
    );
    let server = axum::serve(listener, app).with_graceful_shutdown({
        let stop = stop.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                _ = stop.cancelled() => {}
            }
            // Event streams and the sampler end on this token, so the drain can finish.
            stop.cancel();
        }
    });
    let drain_limit = async {
        stop.cancelled().await;
        tokio::time::sleep(options.drain_timeout).await;
    };
    let result = tokio::select! {
        result = server => result,
        _ = drain_limit => {
            tracing::warn!(timeout = ?options.drain_timeout, "HTTP drain timed out; closing open requests");
            Ok(())
        }
    };
    // The sampler stops with the server even if it ended on an error.
    stop.cancel();
    result
}

async fn dashboard_page() -> Html<&'static str> {
    Html(dashboard::PAGE)
}

async fn metrics_text<E: Engine>(State(state): State<AppState<E>>) -> Response {
    let stats = match state.broker.stats(&[], &[]).await {
        Ok(stats) => stats,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("reading stats failed: {e}\n"),
            )
                .into_response();
        }
    };
    // Encoding many queues' families takes a while; off the async workers it cannot
    // delay other requests.
    let metrics = state.metrics.clone();
    match tokio::task::spawn_blocking(move || metrics.render(stats)).await {
        Ok(body) => ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], body).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics failed: {e}\n"),
        )
            .into_response(),
    }
}

async fn healthz<E: Engine>(State(state): State<AppState<E>>) -> Response {
    if state.stop.is_cancelled() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if let Some(reason) = state.broker.storage_failure() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("fail-stopped (read-only): {reason}\n"),
        )
            .into_response()
    } else {
        (StatusCode::OK, "ok\n").into_response()
    }
}
