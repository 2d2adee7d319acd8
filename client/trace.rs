//! Trace context across services: the W3C `traceparent` (and `tracestate`) a message or
//! job carries in its headers from the producer to whoever handles it.
//!
//! The client speaks `tracing`. When the program installs `tracing-opentelemetry`'s layer
//! (as `sluice::otlp` does), each publish and enqueue runs in a producer span and writes
//! that span's context into the headers of the messages and jobs it sends (unless they
//! already carry one), every request carries the caller's context as gRPC metadata, and the
//! [`Worker`](crate::client::Worker) handles each job in a consumer span whose parent is
//! the context the job carries. Without that layer nothing is written: there is no context
//! to pass on, and the headers stay as the caller made them.
//!
//! Subscribers and `lease` callers get the same consumer span from
//! [`Delivery::span`](crate::client::Delivery::span) and
//! [`Lease::span`](crate::client::Lease::span).

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Header (and gRPC metadata key) of the W3C trace context: `00-<trace id>-<parent span
/// id>-<flags>`.
pub const TRACEPARENT: &str = "traceparent";
/// Header of the W3C vendor trace state that goes with [`TRACEPARENT`].
pub const TRACESTATE: &str = "tracestate";

/// Most headers a message or job may carry (the broker's limit): the client adds no trace
/// header to one that has them all, rather than have a valid request refused.
const MAX_HEADERS: usize = 64;

/// The trace context `headers` carry; an empty context when they carry none, or one that
/// does not parse.
pub fn extract(headers: &HashMap<String, String>) -> opentelemetry::Context {
    if !headers.contains_key(TRACEPARENT) {
        return opentelemetry::Context::new();
    }
    TraceContextPropagator::new().extract(headers)
}

/// Writes `context`'s span into `headers` as `traceparent` (and `tracestate`), replacing
/// what was there. Returns false, and leaves `headers` alone, when `context` has no valid
/// span (no OpenTelemetry layer is installed, or the span is not recorded).
pub fn inject(context: &opentelemetry::Context, headers: &mut HashMap<String, String>) -> bool {
    if !context.span().span_context().is_valid() {
        return false;
    }
    TraceContextPropagator::new().inject_context(context, headers);
    // The propagator writes `tracestate` even when it is empty: that would add a header
    // (one more against the limit) that says nothing.
    if headers.get(TRACESTATE).is_some_and(String::is_empty) {
        headers.remove(TRACESTATE);
    }
    true
}

/// The OpenTelemetry context of `span`: empty unless the OpenTelemetry layer records it.
pub fn context_of(span: &tracing::Span) -> opentelemetry::Context {
    if span.is_disabled() {
        return opentelemetry::Context::new();
    }
    span.context()
}

/// Makes `parent` (a remote context, from headers or metadata) the parent of `span`, which
/// must not have been entered yet. Does nothing when `parent` has no valid span.
pub fn set_remote_parent(span: &tracing::Span, parent: opentelemetry::Context) {
    if parent.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer records the span: then there is nothing
        // to link.
        let _ = span.set_parent(parent);
    }
}

/// A consumer span for handling a message or job from `source` (a topic or queue), child
/// of the context its `headers` carry (what [`crate::client::Delivery::span`] and
/// [`crate::client::Lease::span`] make). Its fields `messaging.message.id`,
/// `sluice.job.kind` and `sluice.job.attempt` are left for the caller to record.
pub fn consumer_span(source: &str, headers: &HashMap<String, String>) -> tracing::Span {
    let span = tracing::info_span!(
        "process",
        otel.name = %format_args!("process {source}"),
        otel.kind = "consumer",
        messaging.system = "sluice",
        messaging.destination.name = %source,
        messaging.message.id = tracing::field::Empty,
        sluice.job.kind = tracing::field::Empty,
        sluice.job.attempt = tracing::field::Empty,
    );
    set_remote_parent(&span, extract(headers));
    span
}

/// A producer span for sending to `destination` (a topic or queue); `operation` is
/// `publish` or `enqueue`.
pub(crate) fn producer_span(operation: &'static str, destination: &str) -> tracing::Span {
    tracing::info_span!(
        "send",
        otel.name = %format_args!("{operation} {destination}"),
        otel.kind = "producer",
        messaging.system = "sluice",
        messaging.operation.name = operation,
        messaging.destination.name = %destination,
    )
}

/// Writes `context` into headers that carry no trace context yet (a caller's own
/// `traceparent` wins) and have room for it.
pub(crate) fn inject_missing(
    context: &opentelemetry::Context,
    headers: &mut HashMap<String, String>,
) {
    if headers.contains_key(TRACEPARENT) || headers.len() + 2 > MAX_HEADERS {
        return;
    }
    inject(context, headers);
}

/// The current span's context as a `traceparent` metadata value, for a request to carry.
pub(crate) fn current_traceparent() -> Option<String> {
    let span = tracing::Span::current();
    let context = context_of(&span);
    let mut carrier = HashMap::new();
    inject(&context, &mut carrier)
        .then(|| carrier.remove(TRACEPARENT))
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    fn remote(trace: u128, span: u64) -> opentelemetry::Context {
        let sc = SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            true,
            TraceState::from_key_value([("vendor", "x")]).expect("a valid trace state"),
        );
        opentelemetry::Context::new().with_remote_span_context(sc)
    }

    #[test]
    fn traceparent_round_trips_through_headers() {
        let mut headers = HashMap::from([("content-type".to_owned(), "text/plain".to_owned())]);
        let context = remote(0x4bf92f3577b34da6a3ce929d0e0e4736, 0x00f067aa0ba902b7);
        assert!(inject(&context, &mut headers));
        assert_eq!(
            headers[TRACEPARENT],
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        assert_eq!(headers[TRACESTATE], "vendor=x");
        assert_eq!(headers["content-type"], "text/plain");

        let back = extract(&headers);
        let sc = back.span().span_context().clone();
        assert!(sc.is_valid() && sc.is_remote() && sc.is_sampled());
        assert_eq!(
            sc.trace_id(),
            TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736)
        );
        assert_eq!(sc.span_id(), SpanId::from(0x00f067aa0ba902b7));
        assert_eq!(sc.trace_state().header(), "vendor=x");
    }

    #[test]
    fn missing_or_malformed_traceparent_gives_no_parent() {
        assert!(!extract(&HashMap::new()).has_active_span());
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "zz-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            let headers = HashMap::from([(TRACEPARENT.to_owned(), bad.to_owned())]);
            let sc = extract(&headers).span().span_context().clone();
            assert!(!sc.is_valid(), "{bad:?} parsed as {sc:?}");
        }
    }

    #[test]
    fn no_context_writes_nothing_and_a_callers_traceparent_wins() {
        let mut headers = HashMap::new();
        assert!(!inject(&opentelemetry::Context::new(), &mut headers));
        assert!(headers.is_empty());

        // An empty trace state adds no `tracestate` header.
        let stateless = opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
            TraceId::from(7),
            SpanId::from(8),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ));
        assert!(inject(&stateless, &mut headers));
        assert_eq!(
            headers.keys().collect::<Vec<_>>(),
            [TRACEPARENT],
            "{headers:?}"
        );
        headers.clear();

        let own = "00-11111111111111111111111111111111-2222222222222222-01".to_owned();
        let mut headers = HashMap::from([(TRACEPARENT.to_owned(), own.clone())]);
        inject_missing(&remote(7, 8), &mut headers);
        assert_eq!(headers[TRACEPARENT], own);

        let mut full: HashMap<String, String> = (0..MAX_HEADERS)
            .map(|i| (format!("h{i}"), String::new()))
            .collect();
        inject_missing(&remote(7, 8), &mut full);
        assert!(!full.contains_key(TRACEPARENT));

        // Without an OpenTelemetry layer, spans have no context to pass on.
        let span = tracing::info_span!("no layer");
        assert!(!context_of(&span).span().span_context().is_valid());
    }
}
