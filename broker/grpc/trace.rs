//! The broker's spans, joined to its callers' traces (`sluice serve --otlp-endpoint`).
//!
//! The trace context comes from the W3C `traceparent` header of each message or job (what
//! producers write, see [`crate::client::trace`]) and, failing that, from the request's
//! `traceparent` gRPC metadata. Only requests that carry one are traced: the broker starts
//! no trace of its own, so untraced traffic costs one header lookup per message.
//!
//! A traced message or job gets a `publish <topic>` or `enqueue <queue>` span, and, when
//! the broker exports spans, its `traceparent` header is rewritten to name that span (as
//! a W3C participating intermediary does: same trace id and flags, the broker's span as
//! the parent), so the consumer's span is a child of the broker's. Every delivery of a
//! traced job gets a `deliver <queue>` span; unary Ack and Nack calls get a span when
//! their metadata carries a context.

use std::collections::HashMap;

use tonic::metadata::MetadataMap;

use crate::broker::domain::limits::Headers;
use crate::broker::domain::queue::Delivery;
use crate::client::trace::{
    TRACEPARENT, TRACESTATE, context_of, extract, inject, set_remote_parent,
};

/// The trace context of a request's `traceparent` (and `tracestate`) metadata, if it
/// carries a valid one.
pub(super) fn metadata_parent(metadata: &MetadataMap) -> Option<opentelemetry::Context> {
    let traceparent = metadata.get(TRACEPARENT)?.to_str().ok()?;
    let mut carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    if let Some(state) = metadata.get(TRACESTATE).and_then(|v| v.to_str().ok()) {
        carrier.insert(TRACESTATE.to_owned(), state.to_owned());
    }
    valid(extract(&carrier))
}

fn valid(context: opentelemetry::Context) -> Option<opentelemetry::Context> {
    use opentelemetry::trace::TraceContextExt as _;
    context.span().span_context().is_valid().then_some(context)
}

/// The spans of a Publish or Enqueue request's entries (`operation` is `publish` or
/// `enqueue`), one per traced entry, with the entries' `traceparent` rewritten to them.
/// Held until the request is applied; dropping them ends them.
pub(super) fn produced<'a>(
    operation: &'static str,
    destination: &str,
    request_parent: Option<&opentelemetry::Context>,
    entries: impl Iterator<Item = &'a mut Headers>,
) -> Vec<tracing::Span> {
    let mut spans = Vec::new();
    for headers in entries {
        let own = headers
            .contains_key(TRACEPARENT)
            .then(|| valid(extract(headers)))
            .flatten();
        let rewrite = own.is_some();
        let Some(parent) = own.or_else(|| request_parent.cloned()) else {
            continue;
        };
        let span = tracing::info_span!(
            target: "sluice::trace",
            "broker",
            otel.name = %format_args!("{operation} {destination}"),
            otel.kind = "server",
            messaging.system = "sluice",
            messaging.operation.name = operation,
            messaging.destination.name = %destination,
        );
        set_remote_parent(&span, parent);
        if rewrite {
            // Leaves the header as it was unless the span is exported (valid context).
            inject(&context_of(&span), headers);
        }
        spans.push(span);
    }
    spans
}

/// Records a `deliver <queue>` span for each traced job handed to `consumer`.
pub(super) fn delivered(queue: &str, consumer: &str, jobs: &[Delivery]) {
    for job in jobs {
        if !job.headers.contains_key(TRACEPARENT) {
            continue;
        }
        let Some(parent) = valid(extract(&job.headers)) else {
            continue;
        };
        let span = tracing::info_span!(
            target: "sluice::trace",
            "broker",
            otel.name = %format_args!("deliver {queue}"),
            otel.kind = "server",
            messaging.system = "sluice",
            messaging.operation.name = "deliver",
            messaging.destination.name = %queue,
            messaging.message.id = %job.job_id,
            messaging.consumer.group.name = %consumer,
            sluice.job.attempt = job.attempt,
        );
        // Dropped at once: a delivery is a moment.
        set_remote_parent(&span, parent);
    }
}

/// A span for a unary settle call (`operation` is `ack` or `nack`) whose metadata carries
/// a trace context; a disabled span otherwise.
pub(super) fn settle_span(operation: &'static str, metadata: &MetadataMap) -> tracing::Span {
    let Some(parent) = metadata_parent(metadata) else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        target: "sluice::trace",
        "broker",
        otel.name = operation,
        otel.kind = "server",
        messaging.system = "sluice",
        messaging.operation.name = operation,
    );
    set_remote_parent(&span, parent);
    span
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::{SpanId, TraceContextExt as _, TracerProvider as _};
    use opentelemetry_sdk::error::OTelSdkResult;
    use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
    use tracing_subscriber::layer::SubscriberExt as _;

    /// Keeps the spans the SDK ends.
    #[derive(Debug, Clone, Default)]
    struct Recorded(Arc<Mutex<Vec<SpanData>>>);

    impl SpanExporter for Recorded {
        async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
            self.0.lock().expect("recorded spans").extend(batch);
            Ok(())
        }
    }

    impl Recorded {
        fn named(&self, name: &str) -> SpanData {
            let spans = self.0.lock().expect("recorded spans");
            spans
                .iter()
                .find(|s| s.name == name)
                .cloned()
                .unwrap_or_else(|| panic!("no span {name:?} among {spans:#?}"))
        }
    }

    fn span_id_of(headers: &Headers) -> SpanId {
        extract(headers).span().span_context().span_id()
    }

    #[test]
    fn producer_broker_and_consumer_spans_chain_through_the_header() {
        let recorded = Recorded::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(recorded.clone())
            .build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            // The producer (the client) writes its span into the message's headers.
            let mut headers = Headers::new();
            let producer = crate::client::trace::producer_span("publish", "user.registered");
            let sent = context_of(&producer);
            crate::client::trace::inject_missing(&sent, &mut headers);
            drop(producer);
            let trace_id = sent.span().span_context().trace_id();
            assert_eq!(span_id_of(&headers), sent.span().span_context().span_id());

            // The broker's span is the producer's child and takes its place in the header.
            let spans = produced(
                "publish",
                "user.registered",
                None,
                [&mut headers].into_iter(),
            );
            let broker = context_of(&spans[0]);
            drop(spans);
            assert_eq!(span_id_of(&headers), broker.span().span_context().span_id());
            assert_eq!(extract(&headers).span().span_context().trace_id(), trace_id);

            // The consumer's handling is the broker span's child.
            drop(crate::client::trace::consumer_span("emails", &headers));
        });
        let producer = recorded.named("publish user.registered");
        let broker = recorded
            .0
            .lock()
            .expect("recorded spans")
            .iter()
            .filter(|s| s.name == "publish user.registered")
            .find(|s| s.parent_span_id == producer.span_context.span_id())
            .cloned()
            .expect("the broker's publish span, child of the producer's");
        let consumer = recorded.named("process emails");
        assert_eq!(consumer.parent_span_id, broker.span_context.span_id());
        assert_eq!(
            consumer.span_context.trace_id(),
            producer.span_context.trace_id()
        );
    }

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn metadata_traceparent_is_a_parent_and_garbage_is_not() {
        let mut metadata = MetadataMap::new();
        assert!(metadata_parent(&metadata).is_none());
        metadata.insert(TRACEPARENT, "not-a-traceparent".parse().expect("ascii"));
        assert!(metadata_parent(&metadata).is_none());
        metadata.insert(TRACEPARENT, PARENT.parse().expect("ascii"));
        assert!(metadata_parent(&metadata).is_some());
    }

    #[test]
    fn without_an_exporter_headers_stay_as_sent() {
        // No OpenTelemetry layer in this test: the spans are not recorded, so the broker
        // must not point the header at a span nobody will see.
        let mut traced = Headers::from([(TRACEPARENT.to_owned(), PARENT.to_owned())]);
        let mut plain = Headers::new();
        let spans = produced("publish", "t", None, [&mut traced, &mut plain].into_iter());
        assert_eq!(spans.len(), 1, "only the traced entry gets a span");
        assert_eq!(traced[TRACEPARENT], PARENT);
        assert!(plain.is_empty());
    }
}
