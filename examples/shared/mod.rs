//! Code shared by the example processes (`todo_app`, `email_worker`,
//! `notification_worker`): the event and job payloads, the broker topology, and small
//! helpers. Each example includes it with `#[path = "../shared/mod.rs"] mod shared;`.
//!
//! # Topology
//!
//! ```text
//!  todo_app ── publish ──► topic user.registered ──┐ (binding)
//!           ── publish ──► topic todo.overdue ─────┼──► queue emails ──► email_worker (x3)
//!           ── enqueue (run_at = due_at) ──────────┘       │ (kind todo.reminder)
//!                                                          └─ dead letters: emails.dlq
//!           ── publish ──► topic todo.completed ─────► queue notifications ──► notification_worker (x2)
//!                                                          └─ dead letters: notifications.dlq
//!  notification_worker ── publish ──► topic notification.delivered ──► todo_app (subscriber)
//! ```
//!
//! The app only publishes events (and schedules reminder jobs); the bindings route them
//! into the workers' queues with `kind` = topic name. Every process runs [`ensure_topology`]
//! at startup, so they can start in any order.

// Each example uses only part of this module.
#![allow(dead_code)]

use std::future::Future;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sluice::client::{Client, ClientError, ConnectOptions, Worker};
use sluice::pb;

/// Topic: a user signed up.
pub const USER_REGISTERED: &str = "user.registered";
/// Topic: a todo was completed.
pub const TODO_COMPLETED: &str = "todo.completed";
/// Topic: a todo is past its due time and not completed.
pub const TODO_OVERDUE: &str = "todo.overdue";
/// Topic: the notification worker delivered an achievement notification.
pub const NOTIFICATION_DELIVERED: &str = "notification.delivered";
/// Job kind of the reminder the app schedules for a todo's due time.
pub const TODO_REMINDER: &str = "todo.reminder";

/// Queue of the email worker.
pub const EMAILS: &str = "emails";
/// Queue of the notification worker.
pub const NOTIFICATIONS: &str = "notifications";

/// Default broker address.
pub const DEFAULT_SLUICE_URL: &str = "http://127.0.0.1:50051";

/// Payload of `user.registered`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserRegistered {
    /// User id.
    pub user_id: i64,
    /// Display name.
    pub name: String,
    /// Email address.
    pub email: String,
    /// RFC 3339.
    pub registered_at: String,
}

/// Payload of `todo.completed`, `todo.overdue` and of `todo.reminder` jobs: everything a
/// worker needs, so workers never read the app's database.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TodoEvent {
    /// Todo id.
    pub todo_id: i64,
    /// Owner.
    pub user_id: i64,
    /// Owner's name.
    pub user_name: String,
    /// Owner's email.
    pub email: String,
    /// Todo title.
    pub title: String,
    /// RFC 3339, if the todo has a due time.
    pub due_at: Option<String>,
    /// RFC 3339, for `todo.completed`.
    pub completed_at: Option<String>,
}

/// Payload of `notification.delivered` (and of the webhook POST).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Notification {
    /// The job that produced it (unique; the app stores each once).
    pub id: String,
    /// Recipient.
    pub user_id: i64,
    /// The completed todo.
    pub todo_id: i64,
    /// Short title.
    pub title: String,
    /// Text shown to the user.
    pub message: String,
    /// `webhook` when it was POSTed to `WEBHOOK_URL`, else `app`.
    pub channel: String,
    /// RFC 3339.
    pub delivered_at: String,
}

/// The queue policies and topic bindings of the example system. Idempotent: creates the
/// queues, or brings existing ones' bindings and policy to these values.
pub async fn ensure_topology(client: &Client) -> Result<(), ClientError> {
    let queues = [
        (
            EMAILS,
            vec![USER_REGISTERED.to_owned(), TODO_OVERDUE.to_owned()],
        ),
        (NOTIFICATIONS, vec![TODO_COMPLETED.to_owned()]),
    ];
    for (name, bindings) in queues {
        let policy = pb::QueuePolicy {
            max_attempts: 5,
            // Transient failures (SMTP 4xx, webhook 5xx) retry after 1 s, 5 s, 30 s, 2 min.
            backoff: Some(pb::BackoffPolicy {
                delays_ms: vec![1_000, 5_000, 30_000, 120_000],
                ..Default::default()
            }),
            topic_bindings: bindings,
            ..Default::default()
        };
        match client.create_queue(name, policy.clone()).await {
            Ok(_) => {}
            Err(e) if e.code() == Some(tonic::Code::AlreadyExists) => {
                let request = pb::UpdateQueueRequest {
                    name: name.to_owned(),
                    policy: Some(pb::QueuePolicy {
                        replace_bindings: true,
                        ..policy
                    }),
                };
                client.rpc().update_queue(request).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How an example process reaches the broker: its URL and, for a broker started with
/// `--tokens-file` or TLS, a bearer token and the CA that signed its certificate.
#[derive(Debug, clap::Args)]
pub struct BrokerArgs {
    /// Broker URL (`https://` when the broker serves TLS).
    #[arg(long = "sluice-url", env = "SLUICE_URL", default_value = DEFAULT_SLUICE_URL)]
    pub url: String,
    /// Bearer token for a broker with auth on (see `sluice token`).
    #[arg(long = "sluice-token", env = "SLUICE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA that signed the broker's TLS certificate.
    #[arg(long = "sluice-ca-cert", env = "SLUICE_CA_CERT", value_name = "PATH")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// OpenTelemetry collector to export this process's spans to, over OTLP/gRPC
    /// (`http://127.0.0.1:4317`); off when unset. The same variable as the broker's.
    #[arg(long, env = "SLUICE_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// The flags of an example process.
pub trait ExampleArgs: clap::Parser {
    /// How it reaches the broker (and the OTLP collector).
    fn broker(&self) -> &BrokerArgs;
}

impl BrokerArgs {
    fn options(&self) -> Result<ConnectOptions, ClientError> {
        let mut options = ConnectOptions::new();
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(path) = &self.ca_cert {
            let pem = std::fs::read(path).map_err(|e| {
                ClientError::Config(format!(
                    "--sluice-ca-cert: cannot read {}: {e}",
                    path.display()
                ))
            })?;
            options = options.ca_certificate_pem(pem);
        }
        Ok(options)
    }
}

/// Connects to the broker, retrying for up to `patience` so processes can start in any
/// order. Waits [`CONNECT_FIRST_DELAY`], doubling up to [`CONNECT_MAX_DELAY`], between
/// attempts, and warns once per cause (not once per attempt).
async fn connect(broker: &BrokerArgs, patience: Duration) -> Result<Client, ClientError> {
    let options = broker.options()?;
    let url = broker.url.as_str();
    let give_up = tokio::time::Instant::now() + patience;
    let mut delay = CONNECT_FIRST_DELAY;
    let mut last_cause = None;
    loop {
        match Client::connect_with(url, options.clone()).await {
            Ok(c) => {
                if last_cause.is_some() {
                    tracing::info!(url, "broker reachable");
                }
                return Ok(c);
            }
            Err(e) if tokio::time::Instant::now() >= give_up => return Err(e),
            Err(e) => {
                let cause = unreachable_cause(url, &e);
                if last_cause.as_ref() != Some(&cause) {
                    tracing::warn!(
                        url,
                        %cause,
                        "broker not reachable yet; retrying for up to {patience:?}"
                    );
                }
                last_cause = Some(cause);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(CONNECT_MAX_DELAY);
            }
        }
    }
}

/// Why `url` could not be reached, in a few words: `connection refused by
/// 127.0.0.1:50051` when nothing listens there (the broker is not started yet), else the
/// innermost error (the client's own text is only "transport error").
fn unreachable_cause(url: &str, e: &ClientError) -> String {
    let refused = std::iter::successors(Some(e as &(dyn std::error::Error + 'static)), |e| {
        e.source()
    })
    .filter_map(|e| e.downcast_ref::<std::io::Error>())
    .any(|io| io.kind() == std::io::ErrorKind::ConnectionRefused);
    if refused {
        let addr = url.split_once("://").map_or(url, |(_, rest)| rest);
        format!("connection refused by {}", addr.trim_end_matches('/'))
    } else {
        e.root_cause()
    }
}

/// The first wait between attempts to reach the broker at startup.
const CONNECT_FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between them.
const CONNECT_MAX_DELAY: Duration = Duration::from_secs(5);

/// How long a process keeps trying to reach the broker at startup.
const CONNECT_PATIENCE: Duration = Duration::from_secs(30);

/// Joins the example system: connects (retrying for [`CONNECT_PATIENCE`]) and runs
/// [`ensure_topology`], so every process can be the first one started.
pub async fn join_system(broker: &BrokerArgs) -> Result<Client, ClientError> {
    let client = connect(broker, CONNECT_PATIENCE).await?;
    ensure_topology(&client).await?;
    Ok(client)
}

/// The `main` of every example process: its flags, then logging (and span export with
/// `--otlp-endpoint`, as service `program`), then `run`. An error is printed as
/// `<program>: <error>` and exits with status 1.
pub async fn process_main<A, F>(program: &str, run: impl FnOnce(A) -> F) -> ExitCode
where
    A: ExampleArgs,
    F: Future<Output = Result<(), Box<dyn std::error::Error>>>,
{
    let args = A::parse();
    let exporter = match args.broker().otlp_endpoint.as_deref() {
        Some(endpoint) if !endpoint.is_empty() => {
            match sluice::otlp::Exporter::start(program, endpoint) {
                Ok(exporter) => Some(exporter),
                Err(e) => {
                    eprintln!("{program}: --otlp-endpoint: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    init_logging(exporter.as_ref());
    let code = match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e}");
            ExitCode::FAILURE
        }
    };
    if let Some(exporter) = exporter {
        exporter.shutdown().await;
    }
    code
}

/// The flags every example worker takes; `CONCURRENCY` is the default number of
/// handlers, which differs per worker.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs<const CONCURRENCY: usize> {
    /// Handlers running at once.
    #[arg(long, env = "CONCURRENCY", default_value_t = CONCURRENCY)]
    pub concurrency: usize,
    /// Consumer name shown by ListConsumers (default: the worker and the process id,
    /// e.g. `email-worker-4242`).
    #[arg(long, env = "WORKER_NAME")]
    pub name: Option<String>,
    /// Lease duration in ms; the worker extends it at half of it while a job runs.
    #[arg(long, env = "VISIBILITY_TIMEOUT_MS", default_value_t = 30_000)]
    pub visibility_timeout_ms: u64,
}

/// Runs a worker of `queue` until Ctrl-C or SIGTERM, logging `<what> started` and
/// `<what> stopped` (with its report). Its consumer name is `--name`, or `what` with
/// dashes for spaces and the process id. `handlers` adds the job kinds it handles.
pub async fn run_worker<const CONCURRENCY: usize>(
    client: Client,
    queue: &str,
    args: &WorkerArgs<CONCURRENCY>,
    what: &str,
    handlers: impl FnOnce(Worker) -> Worker,
) -> Result<(), ClientError> {
    let name = args
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-{}", what.replace(' ', "-"), std::process::id()));
    tracing::info!(consumer = %name, concurrency = args.concurrency, "{what} started");
    let worker = Worker::new(client, queue)
        .consumer(name)
        .concurrency(args.concurrency)
        .visibility_timeout(Duration::from_millis(args.visibility_timeout_ms));
    let report = handlers(worker).run(shutdown_signal()).await?;
    tracing::info!(?report, "{what} stopped");
    Ok(())
}

/// Now as RFC 3339 UTC, seconds precision.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

/// A time as RFC 3339 UTC, seconds precision.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Unix seconds of a time.
pub fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`), in colour only when stderr is
/// a terminal (a log redirected to a file stays plain text); with an exporter, spans go to
/// it too.
pub fn init_logging(exporter: Option<&sluice::otlp::Exporter>) {
    use std::io::IsTerminal as _;
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // On a terminal the library's default stays (it honours NO_COLOR).
    let logs = if std::io::stderr().is_terminal() {
        logs
    } else {
        logs.with_ansi(false)
    };
    tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(exporter.map(|e| e.layer()))
        .init();
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown signal received");
}
