//! Exporting a process's `tracing` spans to an OpenTelemetry collector over OTLP/gRPC:
//! what `sluice serve --otlp-endpoint` and the example programs use.
//!
//! ```no_run
//! # async fn demo() -> Result<(), sluice::otlp::OtlpError> {
//! use tracing_subscriber::layer::SubscriberExt as _;
//! use tracing_subscriber::util::SubscriberInitExt as _;
//!
//! let exporter = sluice::otlp::Exporter::start("my-service", "http://127.0.0.1:4317")?;
//! tracing_subscriber::registry()
//!     .with(tracing_subscriber::fmt::layer())
//!     .with(exporter.layer())
//!     .init();
//! // ... spans of INFO and above are exported in batches ...
//! exporter.shutdown().await; // sends what is left
//! # Ok(()) }
//! ```
//!
//! The batches follow the OpenTelemetry SDK's `OTEL_BSP_*` environment variables (e.g.
//! `OTEL_BSP_SCHEDULE_DELAY`, 5000 ms by default).

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{Filtered, LevelFilter};

/// The OTLP exporter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("OTLP endpoint {endpoint:?}: {reason}")]
pub struct OtlpError {
    endpoint: String,
    reason: String,
}

/// The `tracing` layer that hands spans to an [`Exporter`].
pub type OtlpLayer<S> =
    Filtered<tracing_opentelemetry::OpenTelemetryLayer<S, SdkTracer>, LevelFilter, S>;

/// Sends the spans of this process, as service `service_name`, to an OTLP/gRPC collector.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Starts exporting to `endpoint`, an `http://host:port` URL (OTLP over gRPC, without
    /// TLS; collectors listen on port 4317). Must be called inside a Tokio runtime, which
    /// the exporter's connection runs on. A collector that is down costs dropped spans, not
    /// errors: the connection is made when a batch is sent.
    pub fn start(service_name: &str, endpoint: &str) -> Result<Self, OtlpError> {
        let error = |reason: String| OtlpError {
            endpoint: endpoint.to_owned(),
            reason,
        };
        if !endpoint.starts_with("http://") {
            return Err(error(
                "must be an http:// URL (OTLP over gRPC without TLS, e.g. http://127.0.0.1:4317)"
                    .into(),
            ));
        }
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| error(e.to_string()))?;
        let provider = SdkTracerProvider::builder()
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.to_owned())
                    .build(),
            )
            .with_batch_exporter(exporter)
            .build();
        Ok(Self { provider })
    }

    /// The layer to add to the process's `tracing` subscriber: it records spans of level
    /// INFO and above (the client's, the broker's, the program's own) whatever the log
    /// filter prints.
    pub fn layer<S>(&self) -> OtlpLayer<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer(env!("CARGO_PKG_NAME")))
            .with_filter(LevelFilter::INFO)
    }

    /// Sends the spans still waiting and stops. Waits for the collector (at most the
    /// export timeout, `OTEL_BSP_EXPORT_TIMEOUT`).
    pub async fn shutdown(self) {
        // The SDK's shutdown blocks until its export thread is done.
        let done = tokio::task::spawn_blocking(move || self.provider.shutdown()).await;
        if let Ok(Err(e)) = done {
            tracing::warn!(error = %e, "OTLP exporter: spans may be lost at shutdown");
        }
    }
}
