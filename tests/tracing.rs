//! Trace context across services, end to end: the broker, the todo app and the email
//! worker run as separate processes exporting their spans (`--otlp-endpoint`) to an OTLP
//! collector served by this test (the OTLP/gRPC TraceService, from `opentelemetry-proto`'s
//! generated server). A user registered with a known `traceparent` must show up as one
//! trace across the three services, each span the child of the one before it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use sluice::broker::testing::redis::{RedisServer, free_port};
use tokio::process::{Child, Command};
use tokio::sync::Notify;
use tokio_stream::wrappers::TcpListenerStream;

/// One span as the collector received it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
}

/// The OTLP collector: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Received>>>,
    arrived: Arc<Notify>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = Vec::new();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                received.push(Received {
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                });
            }
        }
        self.spans.lock().expect("spans lock").extend(received);
        self.arrived.notify_waiters();
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Serves the collector on a loopback port; returns its `http://` endpoint.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port for the collector");
        let addr = listener.local_addr().expect("its address");
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        format!("http://{addr}")
    }

    /// Waits (at most `limit`) until `done` holds for the spans received so far.
    async fn wait_for(&self, limit: Duration, done: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let arrived = self.arrived.notified();
            let spans = self.spans.lock().expect("spans lock").clone();
            if done(&spans) {
                return spans;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.spans.lock().expect("spans lock").clone();
            }
        }
    }
}

/// The directory of the built example programs, next to the `sluice` binary. Builds them
/// first, with the command `scripts/test.sh` and the end-to-end tests use (so the build is
/// shared, and a quick no-op when they are up to date).
async fn built_examples() -> PathBuf {
    let sluice = Path::new(env!("CARGO_BIN_EXE_sluice"));
    let mut build = Command::new("cargo");
    build
        .args(["build", "--quiet", "--examples", "--bins"])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    // The variables the test runner sets for a test (OUT_DIR, CARGO_PKG_*, NEXTEST_*...)
    // would make the build look different from the shell's and rebuild everything.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        let keep = matches!(name.as_ref(), "CARGO_HOME" | "CARGO_TARGET_DIR");
        let runners = ["CARGO", "NEXTEST", "RUST_TEST", "OUT_DIR", "__"];
        if !keep && runners.iter().any(|p| name.starts_with(p)) {
            build.env_remove(name.as_ref());
        }
    }
    let built = build.status();
    let built = tokio::time::timeout(Duration::from_secs(600), built)
        .await
        .expect("building the examples took over 10 minutes")
        .expect("cargo runs");
    assert!(built.success(), "cargo build --examples --bins failed");
    sluice
        .parent()
        .expect("the binary's directory")
        .join("examples")
}

/// A child process killed when the test ends (also on failure).
fn spawn(program: &Path, args: &[&str], env: &[(&str, &str)]) -> Child {
    Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        // Batches leave every 100 ms instead of every 5 s, so the test waits less.
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_from_the_todo_apps_request_through_the_broker_to_the_email_worker() {
    let examples = built_examples().await;
    let (todo_app, email_worker) = (examples.join("todo_app"), examples.join("email_worker"));
    let collector = Collector::default();
    let otlp = collector.serve().await;
    let dir = tempfile::tempdir().expect("a temporary directory");

    let broker_port = free_port().to_string();
    let broker_listen = format!("127.0.0.1:{broker_port}");
    let sluice_url = format!("http://{broker_listen}");
    let redis = (common::engine_under_test() == "redis").then(RedisServer::start);
    let mut broker_args = vec![
        "serve",
        "--listen",
        &broker_listen,
        "--otlp-endpoint",
        &otlp,
    ];
    let redis_url = redis.as_ref().map(RedisServer::url);
    match &redis_url {
        Some(url) => broker_args.extend(["--storage", "redis", "--redis", url]),
        None => broker_args.extend(["--storage", "memory"]),
    }
    let _broker = spawn(Path::new(env!("CARGO_BIN_EXE_sluice")), &broker_args, &[]);

    let app_listen = format!("127.0.0.1:{}", free_port());
    let db = dir.path().join("todo.sqlite3");
    let outbox = dir.path().join("outbox");
    let common_env = [
        ("SLUICE_URL", sluice_url.as_str()),
        ("SLUICE_OTLP_ENDPOINT", otlp.as_str()),
    ];
    let _app = spawn(
        &todo_app,
        &[
            "--listen",
            &app_listen,
            "--db",
            db.to_str().expect("utf-8 path"),
        ],
        &common_env,
    );
    let _worker = spawn(
        &email_worker,
        &["--outbox-dir", outbox.to_str().expect("utf-8 path")],
        &common_env,
    );

    // The app answers once it has joined the broker (it retries while the broker starts).
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let up = http
            .get(format!("http://{app_listen}/healthz"))
            .send()
            .await;
        if up.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the todo app did not answer /healthz within 60 s"
        );
        // Nothing to wait on but the port: poll it.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The caller's own trace: every span of the request must join it.
    let trace_id = "5b8efff798038103d269b633813fc60c";
    let caller_span = "eee19b7ec3c1b174";
    let response = http
        .post(format!("http://{app_listen}/users"))
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&serde_json::json!({"name": "Ada", "email": "ada@example.com"}))
        .send()
        .await
        .expect("POST /users");
    assert_eq!(response.status(), 201, "{:?}", response.text().await);

    let wanted: &[(&str, &str)] = &[
        ("todo_app", "POST /users"),
        ("todo_app", "publish user.registered"),
        ("sluice", "publish user.registered"),
        ("sluice", "deliver emails"),
        ("email_worker", "process emails"),
    ];
    let spans = collector
        .wait_for(Duration::from_secs(30), |spans| {
            wanted.iter().all(|(service, name)| {
                spans.iter().any(|s| {
                    hex(&s.trace_id) == trace_id && s.service == *service && s.name == *name
                })
            })
        })
        .await;
    let in_trace: Vec<&Received> = spans
        .iter()
        .filter(|s| hex(&s.trace_id) == trace_id)
        .collect();
    let find = |service: &str, name: &str| -> &Received {
        in_trace
            .iter()
            .copied()
            .find(|s| s.service == service && s.name == name)
            .unwrap_or_else(|| {
                panic!(
                    "no span {name:?} of {service} in trace {trace_id}; received: {:#?}",
                    spans
                        .iter()
                        .map(|s| (&s.service, &s.name, hex(&s.trace_id)))
                        .collect::<Vec<_>>()
                )
            })
    };
    let request = find("todo_app", "POST /users");
    let produced = find("todo_app", "publish user.registered");
    let broker = find("sluice", "publish user.registered");
    let delivered = find("sluice", "deliver emails");
    let handled = find("email_worker", "process emails");

    // Each hop is the child of the one before: caller -> request -> publish (app) ->
    // publish (broker) -> the worker's handling, and the broker's delivery.
    let parent_of = |child: &Received, parent: &str, what: &str| {
        assert_eq!(hex(&child.parent_span_id), parent, "{what}");
    };
    parent_of(
        request,
        caller_span,
        "the request span's parent is the caller's",
    );
    parent_of(
        produced,
        &hex(&request.span_id),
        "the app's publish is in the request",
    );
    parent_of(
        broker,
        &hex(&produced.span_id),
        "the broker's span is a child of the app's publish (message header)",
    );
    parent_of(
        handled,
        &hex(&broker.span_id),
        "the worker's handling is a child of the broker's span (rewritten header)",
    );
    parent_of(
        delivered,
        &hex(&broker.span_id),
        "the broker's delivery is a child of its publish span",
    );
    let services: std::collections::BTreeSet<&str> =
        in_trace.iter().map(|s| s.service.as_str()).collect();
    assert!(
        ["todo_app", "sluice", "email_worker"]
            .iter()
            .all(|s| services.contains(s)),
        "services in the trace: {services:?}"
    );

    // The email itself went out, in that trace's handling.
    let sent = std::fs::read_dir(&outbox)
        .expect("the worker's outbox")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .count();
    assert_eq!(sent, 1, "one welcome email in {}", outbox.display());
}
