//! The admin command line (`sluice queues`, `sluice stats`, `sluice enqueue`, ...): a gRPC
//! client of a running broker, built on the generated client over the typed client's
//! [`Transport`](sluice::client::Transport) (so it sends the same token and TLS settings).
//!
//! Every command prints a human table by default and JSON with `--json` (one object per
//! line for streaming commands). Errors go to stderr with the gRPC status code, and the
//! exit code is 1 (2 for bad arguments). Progress of long operations (redrive) goes to
//! stderr, so stdout stays parseable.

pub mod schedules;
pub mod schema;
pub mod table;

use std::collections::HashMap;
use std::io::{IsTerminal as _, Read as _, Write as _};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::{Value, json};

use sluice::client::{ConnectOptions, Rpc, job_state_name, job_state_named};
use sluice::pb;
use sluice::pb::broker_client::BrokerClient;
use table::{Table, age, count, rate};

/// How to reach the broker and how to print; flattened into every admin command.
#[derive(Debug, Clone, clap::Args)]
pub struct Connection {
    /// The broker's gRPC endpoint.
    #[arg(
        long,
        env = "SLUICE_SERVER",
        default_value = "http://127.0.0.1:50051",
        value_name = "URL"
    )]
    pub server: String,
    /// Print JSON instead of tables (one object per line for streams).
    #[arg(long, env = "SLUICE_JSON")]
    pub json: bool,
    /// Bearer token, for a broker started with `--tokens-file`.
    #[arg(long, env = "SLUICE_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA that signed the broker's certificate, for an `https://` server URL.
    #[arg(long, env = "SLUICE_CA_CERT", value_name = "PATH")]
    pub ca_cert: Option<std::path::PathBuf>,
    /// PEM client certificate, for a broker that requires one (needs `--client-key`).
    #[arg(long, env = "SLUICE_CLIENT_CERT", value_name = "PATH")]
    pub client_cert: Option<std::path::PathBuf>,
    /// PEM key of `--client-cert`.
    #[arg(long, env = "SLUICE_CLIENT_KEY", value_name = "PATH")]
    pub client_key: Option<std::path::PathBuf>,
}

/// `sluice token`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// Read a token from stdin and print only its SHA-256 (for rotating a token you have).
    #[arg(long)]
    pub hash: bool,
    /// The identity to put in the printed `[[token]]` table.
    #[arg(long, default_value = "my-client")]
    pub name: String,
}

/// `sluice queues`.
#[derive(Debug, Clone, clap::Args)]
pub struct QueuesArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
}

/// `sluice stats`.
#[derive(Debug, Clone, clap::Args)]
pub struct StatsArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Keep printing fresh figures (WatchStats) until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// Period of `--watch`, ms (at least 100).
    #[arg(long, default_value_t = 1_000)]
    pub interval_ms: u32,
    /// With `--watch`, stop after this many updates (0: never).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
    /// Only this queue (repeatable).
    #[arg(long = "queue", value_name = "QUEUE")]
    pub queues: Vec<String>,
    /// Only this topic (repeatable).
    #[arg(long = "topic", value_name = "TOPIC")]
    pub topics: Vec<String>,
}

/// `sluice enqueue`.
#[derive(Debug, Clone, clap::Args)]
pub struct EnqueueArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Queue name.
    pub queue: String,
    /// Payload: literal text, `@path` for a file's bytes, or `-` for stdin.
    pub payload: String,
    /// Job type, for handler routing.
    #[arg(long, default_value = "")]
    pub kind: String,
    /// 0 (lowest) to 9.
    #[arg(long, default_value_t = 0)]
    pub priority: u32,
    /// Invisible for this long, ms.
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u64,
    /// Deliveries before dead-lettering (0: the queue policy's).
    #[arg(long, default_value_t = 0)]
    pub max_attempts: u32,
    /// Deduplication key.
    #[arg(long, default_value = "")]
    pub idempotency_key: String,
    /// Jobs with one ordering key run one at a time, in order.
    #[arg(long, default_value = "")]
    pub ordering_key: String,
    /// A header `key=value` (repeatable).
    #[arg(long = "header", value_name = "KEY=VALUE")]
    pub headers: Vec<String>,
}

/// `sluice lease`.
#[derive(Debug, Clone, clap::Args)]
pub struct LeaseArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Queue name.
    pub queue: String,
    /// Most jobs to lease.
    #[arg(long, default_value_t = 1)]
    pub max: u32,
    /// Lease duration, ms (0: the queue policy's).
    #[arg(long, default_value_t = 0)]
    pub visibility_ms: u64,
    /// Long-poll this long when the queue is empty, ms.
    #[arg(long, default_value_t = 0)]
    pub wait_ms: u64,
    /// Consumer name shown by ListConsumers.
    #[arg(long, default_value = "sluice-cli")]
    pub consumer: String,
    /// Ack the leased jobs right away (drains them as done).
    #[arg(long)]
    pub ack: bool,
}

/// `sluice publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct PublishArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Topic name.
    pub topic: String,
    /// Payload: literal text, `@path` for a file's bytes, or `-` for stdin.
    pub payload: String,
    /// Message key.
    #[arg(long, default_value = "")]
    pub key: String,
    /// Deduplication key.
    #[arg(long, default_value = "")]
    pub idempotency_key: String,
    /// A header `key=value` (repeatable).
    #[arg(long = "header", value_name = "KEY=VALUE")]
    pub headers: Vec<String>,
}

/// `sluice subscribe`.
#[derive(Debug, Clone, clap::Args)]
pub struct SubscribeArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Topic or pattern (`*` one token, `>` the rest).
    pub pattern: String,
    /// Where to start: `latest`, `earliest` or a sequence number.
    #[arg(long, default_value = "latest")]
    pub from: String,
    /// Stop after this many messages (0: until interrupted).
    #[arg(long, default_value_t = 0)]
    pub count: u64,
}

/// `sluice jobs`.
#[derive(Debug, Clone, clap::Args)]
pub struct JobsArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Queue name.
    pub queue: String,
    /// `live` (scheduled, pending, leased, retrying), or one state: scheduled, pending,
    /// leased, retrying, completed, dead, cancelled.
    #[arg(long, default_value = "live")]
    pub state: String,
    /// Most jobs to list.
    #[arg(long, default_value_t = 100)]
    pub limit: usize,
}

/// `sluice redrive`.
#[derive(Debug, Clone, clap::Args)]
pub struct RedriveArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// The dead-letter queue to move jobs out of.
    pub dead_letter_queue: String,
    /// Jobs per second (0: the broker's default, 1,000).
    #[arg(long, default_value_t = 0)]
    pub rate: u32,
    /// Stop after this many jobs (0: all).
    #[arg(long, default_value_t = 0)]
    pub max: u64,
    /// Only this job id (repeatable).
    #[arg(long = "id", value_name = "JOB_ID")]
    pub ids: Vec<String>,
}

/// `sluice purge`.
#[derive(Debug, Clone, clap::Args)]
pub struct PurgeArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Queue name.
    pub queue: String,
}

/// `sluice delete-job`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeleteJobArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Queue name.
    pub queue: String,
    /// Job id.
    pub job_id: String,
}

/// `sluice limit`.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Queue name.
    pub queue: String,
    /// Jobs handed out per second (0 removes the rate limit).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Most jobs handed out at once after a quiet spell (default: the rate).
    #[arg(long, requires = "rate")]
    pub burst: Option<u32>,
    /// Most jobs leased at once by all consumers together (0 removes the limit).
    #[arg(long)]
    pub max_in_flight: Option<u32>,
}

/// `sluice consumers`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConsumersArgs {
    /// Where the broker is and how to print.
    #[command(flatten)]
    pub conn: Connection,
    /// Queue name.
    pub queue: String,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The broker could not be reached. Says why in the operating system's words
    /// (tonic's own text is only "transport error").
    #[error("cannot connect to {server}: {}", sluice::client::root_cause(.source))]
    Connect {
        /// The endpoint.
        server: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The broker answered with an error: its code as the protocol names it and the
    /// broker's message (tonic's `Display` of a code is a generic English sentence).
    #[error("{}: {}", code_name(.0.code()), .0.message())]
    Status(#[from] tonic::Status),
    /// Reading a payload or writing output failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Self::Usage(_) => ExitCode::from(2),
            _ => ExitCode::from(1),
        }
    }
}

type Result<T> = std::result::Result<T, CliError>;

/// A gRPC status code as the protocol spells it (`NOT_FOUND`), as grpcurl and the other
/// gRPC tools print it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

async fn connect(conn: &Connection) -> Result<Rpc> {
    let read = |flag: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| CliError::Usage(format!("{flag} {}: {e}", path.display())))
    };
    let mut options = ConnectOptions::new().token(conn.token.clone().unwrap_or_default());
    if let Some(ca) = &conn.ca_cert {
        options = options.ca_certificate_pem(read("--ca-cert", ca)?);
    }
    match (&conn.client_cert, &conn.client_key) {
        (Some(cert), Some(key)) => {
            options = options
                .client_identity_pem(read("--client-cert", cert)?, read("--client-key", key)?);
        }
        (None, None) => {}
        _ => {
            return Err(CliError::Usage(
                "--client-cert and --client-key go together".into(),
            ));
        }
    }
    let usage = |e: sluice::client::ClientError| {
        CliError::Usage(format!("--server {:?}: {e}", conn.server))
    };
    let endpoint = options.endpoint(&conn.server).map_err(usage)?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| CliError::Connect {
            server: conn.server.clone(),
            source,
        })?;
    let transport = options.transport(channel).map_err(usage)?;
    // Admin replies (job listings) may be large; the broker bounds them by page size.
    Ok(BrokerClient::new(transport).max_decoding_message_size(256 * 1024 * 1024))
}

fn token(a: TokenArgs) -> Result<()> {
    use sluice::broker::{generate_token, hash_token};
    if a.hash {
        let mut token = String::new();
        std::io::stdin().read_to_string(&mut token)?;
        let token = token.trim();
        if token.is_empty() {
            return Err(CliError::Usage("--hash: no token on stdin".into()));
        }
        println!("{}", hash_token(token));
        return Ok(());
    }
    let token = generate_token();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "# token (give it to the client; it is not stored anywhere):"
    )?;
    writeln!(out, "# {token}")?;
    writeln!(out, "[[token]]")?;
    writeln!(out, "name = {:?}", a.name)?;
    writeln!(out, "sha256 = {:?}", hash_token(&token))?;
    writeln!(
        out,
        "# publish = [\"events.>\"]  subscribe, enqueue, consume and admin likewise"
    )?;
    Ok(())
}

fn payload(arg: &str) -> Result<Bytes> {
    if arg == "-" {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf)?;
        Ok(Bytes::from(buf))
    } else if let Some(path) = arg.strip_prefix('@') {
        std::fs::read(path)
            .map(Bytes::from)
            .map_err(|e| CliError::Usage(format!("cannot read payload file {path:?}: {e}")))
    } else {
        Ok(Bytes::from(arg.to_owned()))
    }
}

fn headers(args: &[String]) -> Result<HashMap<String, String>> {
    args.iter()
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| CliError::Usage(format!("--header {h:?}: expected KEY=VALUE")))
        })
        .collect()
}

/// A payload for JSON output: text when it is UTF-8, base64 otherwise.
fn payload_json(bytes: &[u8]) -> (Value, &'static str) {
    match std::str::from_utf8(bytes) {
        Ok(s) => (Value::String(s.to_owned()), "utf8"),
        Err(_) => (
            Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
            "base64",
        ),
    }
}

/// A whole payload on one line: text with control characters escaped, or a note for
/// binary data (use `--json` to get it as base64).
fn payload_line(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(s) => s.escape_debug().collect(),
        Err(_) => format!("<{} bytes, binary>", bytes.len()),
    }
}

/// A payload for a table cell: [`payload_line`] cut to 60 characters.
fn payload_text(bytes: &[u8]) -> String {
    let text = payload_line(bytes);
    if text.chars().count() > 60 {
        format!("{}...", text.chars().take(57).collect::<String>())
    } else {
        text
    }
}

/// A table cell that is never blank, so columns stay aligned and parseable.
fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

fn print_json(v: &Value) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, v).map_err(std::io::Error::from)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}

fn print_text(s: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(s.as_bytes())?;
    out.flush()?;
    Ok(())
}

fn state_name(state: i32) -> String {
    job_state_name(state).unwrap_or_else(|| state.to_string())
}

fn parse_state(s: &str) -> Result<pb::JobState> {
    match s.to_ascii_lowercase().as_str() {
        "live" | "all" => Ok(pb::JobState::Unspecified),
        "failed" => Ok(pb::JobState::Dead),
        name => job_state_named(name).ok_or_else(|| {
            CliError::Usage(format!(
                "--state {name:?}: expected live, scheduled, pending, leased, retrying, completed, dead or cancelled"
            ))
        }),
    }
}

/// A Stats response for `--json`: the queue, topic and storage messages as they are.
fn stats_json(s: &pb::StatsResponse) -> Value {
    // A broker always reports what recovery did; print zeros rather than null if not.
    let storage = s.storage.clone().map(|mut storage| {
        storage.recovery.get_or_insert_default();
        storage
    });
    json!({
        "taken_at_unix_ms": s.taken_at_unix_ms,
        "queues": s.queues,
        "topics": s.topics,
        "storage": storage,
        "memory_budget_bytes": s.memory_budget_bytes,
        "memory_used_bytes": s.memory_used_bytes,
    })
}

/// One line on memory, when the broker shows it to this caller (an admin of `>`): the
/// bytes in use and the budget (the in-process engine's payload bytes and
/// `--max-memory-bytes`; on Redis, Redis's own use and `maxmemory`).
fn memory_text(s: &pb::StatsResponse) -> Option<String> {
    if s.memory_used_bytes == 0 && s.memory_budget_bytes == 0 {
        return None;
    }
    let budget = match s.memory_budget_bytes {
        0 => "no budget".to_owned(),
        b => format!("budget {} bytes", count(b)),
    };
    Some(format!(
        "memory: {} bytes in use, {budget}\n",
        count(s.memory_used_bytes)
    ))
}

/// One line on the storage: its engine and policy, a fail-stop first of all, and what
/// recovery cut or repaired (only when it did).
fn storage_text(s: &pb::StorageStats) -> String {
    let mut line = format!("storage: {}", s.engine);
    if !s.fsync.is_empty() {
        line.push_str(&format!(" (fsync {})", s.fsync));
    }
    if s.failed {
        line.push_str(&format!(
            "; FAIL-STOPPED, changes are refused: {}",
            s.failure_reason
        ));
    }
    let r = s.recovery.clone().unwrap_or_default();
    if r.torn_tail_bytes > 0 {
        line.push_str(&format!(
            "; recovery cut a torn tail of {} bytes ({} records)",
            r.torn_tail_bytes, r.torn_tail_records
        ));
    }
    if r.files_repaired > 0 {
        line.push_str(&format!("; --repair changed {} files", r.files_repaired));
    }
    if !r.missing_files.is_empty() {
        line.push_str(&format!("; started without {}", r.missing_files.join(", ")));
    }
    line.push('\n');
    line
}

fn queue_table(queues: &[pb::QueueStats]) -> Table {
    let mut t = Table::new(&[
        "QUEUE",
        ">PENDING",
        ">SCHEDULED",
        ">LEASED",
        ">RETRYING",
        ">OLDEST",
        ">ENQ/S",
        ">ACK/S",
        ">COMPLETED",
        ">FAILED",
        ">DEAD",
        ">CONSUMERS",
        "STATUS",
    ]);
    for q in queues {
        t.row(vec![
            q.name.clone(),
            count(q.pending),
            count(q.scheduled),
            count(q.leased),
            count(q.retrying),
            if q.pending > 0 {
                age(q.oldest_pending_age_ms)
            } else {
                "-".into()
            },
            rate(q.enqueue_rate),
            rate(q.ack_rate),
            count(q.completed),
            count(q.failed),
            count(q.dead),
            q.consumers.to_string(),
            queue_status(q.paused, q.created_by_consumer),
        ]);
    }
    t
}

/// A queue's STATUS cell: paused or active, plus `consumer-created` while only consumers
/// have named it (see [`CONSUMER_CREATED_NOTE`]).
fn queue_status(paused: bool, created_by_consumer: bool) -> String {
    let state = if paused { "paused" } else { "active" };
    if created_by_consumer {
        format!("{state},consumer-created")
    } else {
        state.to_owned()
    }
}

/// Said on stderr (stdout keeps the table a table) after a table that shows a
/// `consumer-created` queue.
const CONSUMER_CREATED_NOTE: &str = "note: consumer-created: a Lease or Consume created the queue and nothing has enqueued to it or set its policy since; check the worker's queue name for a typo";

/// Says [`CONSUMER_CREATED_NOTE`] on stderr if one of `queues` needs it.
fn note_consumer_created<'a>(mut queues: impl Iterator<Item = &'a pb::QueueStats>) {
    if queues.any(|q| q.created_by_consumer) {
        eprintln!("{CONSUMER_CREATED_NOTE}");
    }
}

fn topic_table(topics: &[pb::TopicStats]) -> Table {
    let mut t = Table::new(&[
        "TOPIC",
        ">FIRST",
        ">LAST",
        ">RETAINED",
        ">BYTES",
        ">PUB/S",
        ">SUBSCRIBERS",
        ">GAPS",
    ]);
    for s in topics {
        t.row(vec![
            s.name.clone(),
            s.first_sequence.to_string(),
            s.last_sequence.to_string(),
            count(s.retained_messages),
            count(s.retained_bytes),
            rate(s.publish_rate),
            s.subscribers.to_string(),
            count(s.gaps),
        ]);
    }
    t
}

fn stats_text(s: &pb::StatsResponse) -> String {
    let mut out = String::new();
    if s.queues.is_empty() {
        out.push_str("no queues\n");
    } else {
        out.push_str(&queue_table(&s.queues).render());
    }
    out.push('\n');
    if s.topics.is_empty() {
        out.push_str("no topics\n");
    } else {
        out.push_str(&topic_table(&s.topics).render());
    }
    if let Some(storage) = &s.storage {
        out.push('\n');
        out.push_str(&storage_text(storage));
    }
    if let Some(memory) = memory_text(s) {
        out.push_str(&memory);
    }
    out
}

/// Runs one admin command and prints its result; returns the process exit code.
pub async fn run(command: crate::config::Command) -> ExitCode {
    use crate::config::Command;
    let result = match command {
        Command::Serve(_) => Err(CliError::Usage(
            "`serve` runs a broker; it is not an admin command".into(),
        )),
        Command::Queues(a) => queues(a).await,
        Command::Stats(a) => stats(a).await,
        Command::Enqueue(a) => enqueue(a).await,
        Command::Lease(a) => lease(a).await,
        Command::Publish(a) => publish(a).await,
        Command::Subscribe(a) => subscribe(a).await,
        Command::Jobs(a) => jobs(a).await,
        Command::Redrive(a) => redrive(a).await,
        Command::Purge(a) => purge(a).await,
        Command::DeleteJob(a) => delete_job(a).await,
        Command::Limit(a) => limit(a).await,
        Command::Consumers(a) => consumers(a).await,
        Command::Token(a) => token(a),
        Command::Schedules(a) => schedules::schedules(a).await,
        Command::Schema(a) => schema::schema(a).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: {e}");
            e.exit_code()
        }
    }
}

async fn queues(a: QueuesArgs) -> Result<()> {
    let mut client = connect(&a.conn).await?;
    let list = client
        .list_queues(pb::ListQueuesRequest {})
        .await?
        .into_inner();
    let stats = client
        .stats(pb::StatsRequest::default())
        .await?
        .into_inner();
    let by_name: HashMap<&str, &pb::QueueStats> =
        stats.queues.iter().map(|q| (q.name.as_str(), q)).collect();
    if a.conn.json {
        let queues: Vec<Value> = list
            .queues
            .iter()
            .map(|q| {
                let policy = q.policy.clone().unwrap_or_default();
                json!({
                    "name": q.name,
                    "paused": q.paused,
                    "policy": {
                        "visibility_timeout_ms": policy.visibility_timeout_ms,
                        "max_attempts": policy.max_attempts,
                        "dead_letter_queue": policy.dead_letter_queue,
                        "max_depth": policy.max_depth,
                        "dedup_window_ms": policy.dedup_window_ms,
                        "topic_bindings": policy.topic_bindings,
                        "history_limit": policy.history_limit,
                        "limits": limits_json(&policy),
                    },
                    "stats": by_name.get(q.name.as_str()),
                })
            })
            .collect();
        return print_json(&json!({ "queues": queues }));
    }
    if list.queues.is_empty() {
        return print_text("no queues\n");
    }
    let mut t = Table::new(&[
        "QUEUE",
        ">PENDING",
        ">SCHEDULED",
        ">LEASED",
        ">RETRYING",
        ">COMPLETED",
        ">DEAD",
        ">CONSUMERS",
        "STATUS",
        "DLQ",
        "BINDINGS",
        "LIMITS",
    ]);
    for q in &list.queues {
        let policy = q.policy.clone().unwrap_or_default();
        let limits = limits_text(&policy);
        let s = by_name.get(q.name.as_str()).copied().cloned();
        let s = s.unwrap_or_default();
        t.row(vec![
            q.name.clone(),
            count(s.pending),
            count(s.scheduled),
            count(s.leased),
            count(s.retrying),
            count(s.completed),
            count(s.dead),
            s.consumers.to_string(),
            queue_status(q.paused, s.created_by_consumer),
            if policy.dead_letter_queue.is_empty() {
                "-".into()
            } else {
                policy.dead_letter_queue
            },
            if policy.topic_bindings.is_empty() {
                "-".into()
            } else {
                policy.topic_bindings.join(",")
            },
            limits,
        ]);
    }
    print_text(&t.render())?;
    note_consumer_created(stats.queues.iter());
    Ok(())
}

async fn stats(a: StatsArgs) -> Result<()> {
    let mut client = connect(&a.conn).await?;
    let filter = pb::StatsRequest {
        queues: a.queues.clone(),
        topics: a.topics.clone(),
    };
    if !a.watch {
        let s = client.stats(filter).await?.into_inner();
        return if a.conn.json {
            print_json(&stats_json(&s))
        } else {
            print_text(&stats_text(&s))?;
            note_consumer_created(s.queues.iter());
            Ok(())
        };
    }
    let mut stream = client
        .watch_stats(pb::WatchStatsRequest {
            filter: Some(filter),
            interval_ms: a.interval_ms,
        })
        .await?
        .into_inner();
    let redraw = !a.conn.json && std::io::stdout().is_terminal();
    let mut seen = 0u64;
    while let Some(frame) = stream.next().await {
        let s = frame?;
        if a.conn.json {
            print_json(&stats_json(&s))?;
        } else {
            let when = s.taken_at_unix_ms;
            let header = format!(
                "sluice stats at {} (every {} ms, Ctrl-C to stop)\n\n",
                clock(when),
                a.interval_ms
            );
            // On a terminal each update replaces the last; piped, updates follow each other.
            let clear = if redraw { "\x1b[2J\x1b[H" } else { "" };
            print_text(&format!("{clear}{header}{}\n", stats_text(&s)))?;
        }
        seen += 1;
        if a.count > 0 && seen >= a.count {
            break;
        }
    }
    Ok(())
}

/// `HH:MM:SS.mmm` UTC of a unix-ms time.
fn clock(unix_ms: u64) -> String {
    let day_ms = unix_ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03} UTC",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

async fn enqueue(a: EnqueueArgs) -> Result<()> {
    let job = pb::JobSpec {
        payload: payload(&a.payload)?,
        headers: headers(&a.headers)?,
        kind: a.kind,
        priority: a.priority,
        delay_ms: a.delay_ms,
        run_at_unix_ms: 0,
        max_attempts: a.max_attempts,
        idempotency_key: a.idempotency_key,
        ordering_key: a.ordering_key,
    };
    let mut client = connect(&a.conn).await?;
    let res = client
        .enqueue(pb::EnqueueRequest {
            queue: a.queue.clone(),
            jobs: vec![job],
        })
        .await?
        .into_inner();
    let r = res.results.into_iter().next().unwrap_or_default();
    if a.conn.json {
        print_json(&json!({ "queue": a.queue, "job_id": r.job_id, "duplicate": r.duplicate }))
    } else if r.duplicate {
        print_text(&format!(
            "duplicate of job {} in {} (idempotency key seen)\n",
            r.job_id, a.queue
        ))
    } else {
        print_text(&format!("enqueued job {} in {}\n", r.job_id, a.queue))
    }
}

async fn lease(a: LeaseArgs) -> Result<()> {
    let mut client = connect(&a.conn).await?;
    let jobs = client
        .lease(pb::LeaseRequest {
            queue: a.queue.clone(),
            max_jobs: a.max,
            visibility_timeout_ms: a.visibility_ms,
            wait_ms: a.wait_ms,
            consumer: a.consumer.clone(),
        })
        .await?
        .into_inner()
        .jobs;
    if a.ack && !jobs.is_empty() {
        client
            .ack(pb::AckRequest {
                acks: jobs
                    .iter()
                    .map(|j| pb::LeaseAck {
                        lease_id: j.lease_id.clone(),
                        result: Bytes::new(),
                    })
                    .collect(),
            })
            .await?;
    }
    if a.conn.json {
        let out: Vec<Value> = jobs
            .iter()
            .map(|j| {
                let (payload, encoding) = payload_json(&j.payload);
                json!({
                    "job_id": j.job_id,
                    "lease_id": j.lease_id,
                    "queue": j.queue,
                    "kind": j.kind,
                    "priority": j.priority,
                    "attempt": j.attempt,
                    "max_attempts": j.max_attempts,
                    "enqueued_at_unix_ms": j.enqueued_at_unix_ms,
                    "lease_deadline_unix_ms": j.lease_deadline_unix_ms,
                    "headers": j.headers,
                    "payload": payload,
                    "payload_encoding": encoding,
                    "acked": a.ack,
                })
            })
            .collect();
        return print_json(&json!({ "jobs": out }));
    }
    if jobs.is_empty() {
        return print_text(&format!("no job visible in {}\n", a.queue));
    }
    let mut t = Table::new(&["JOB", "LEASE", "KIND", ">PRIO", ">ATTEMPT", "PAYLOAD"]);
    for j in &jobs {
        t.row(vec![
            j.job_id.clone(),
            j.lease_id.clone(),
            or_dash(&j.kind),
            j.priority.to_string(),
            format!("{}/{}", j.attempt, j.max_attempts),
            payload_text(&j.payload),
        ]);
    }
    let mut text = t.render();
    if a.ack {
        text.push_str(&format!("acked {} job(s)\n", jobs.len()));
    }
    print_text(&text)
}

async fn publish(a: PublishArgs) -> Result<()> {
    let message = pb::PublishMessage {
        payload: payload(&a.payload)?,
        headers: headers(&a.headers)?,
        key: a.key,
        idempotency_key: a.idempotency_key,
    };
    let mut client = connect(&a.conn).await?;
    let res = client
        .publish(pb::PublishRequest {
            topic: a.topic.clone(),
            messages: vec![message],
        })
        .await?
        .into_inner();
    let r = res.results.into_iter().next().unwrap_or_default();
    if a.conn.json {
        print_json(&json!({ "topic": a.topic, "sequence": r.sequence, "duplicate": r.duplicate }))
    } else {
        print_text(&format!(
            "published to {} at sequence {}{}\n",
            a.topic,
            r.sequence,
            if r.duplicate { " (duplicate)" } else { "" }
        ))
    }
}

async fn subscribe(a: SubscribeArgs) -> Result<()> {
    let (start, start_sequence) = match a.from.as_str() {
        "latest" => (pb::StartPosition::Latest, 0),
        "earliest" => (pb::StartPosition::Earliest, 0),
        seq => match seq.parse::<u64>() {
            Ok(n) => (pb::StartPosition::Sequence, n),
            Err(_) => {
                return Err(CliError::Usage(format!(
                    "--from {seq:?}: expected latest, earliest or a sequence number"
                )));
            }
        },
    };
    let mut client = connect(&a.conn).await?;
    let mut stream = client
        .subscribe(pb::SubscribeRequest {
            pattern: a.pattern.clone(),
            start: start as i32,
            start_sequence,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut seen = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch?;
        for g in &batch.gaps {
            if a.conn.json {
                print_json(&json!({ "gap": {
                    "topic": g.topic,
                    "first_missing": g.first_missing,
                    "next_available": g.next_available,
                }}))?;
            } else {
                eprintln!(
                    "gap in {}: sequences {}..{} were lost to retention",
                    g.topic,
                    g.first_missing,
                    g.next_available.saturating_sub(1)
                );
            }
        }
        for m in &batch.messages {
            if a.conn.json {
                let (payload, encoding) = payload_json(&m.payload);
                print_json(&json!({
                    "topic": m.topic,
                    "sequence": m.sequence,
                    "key": m.key,
                    "headers": m.headers,
                    "publish_time_unix_ms": m.publish_time_unix_ms,
                    "payload": payload,
                    "payload_encoding": encoding,
                }))?;
            } else {
                let key = if m.key.is_empty() {
                    String::new()
                } else {
                    format!(" key={}", m.key)
                };
                print_text(&format!(
                    "{}#{}{} {}\n",
                    m.topic,
                    m.sequence,
                    key,
                    payload_line(&m.payload)
                ))?;
            }
            seen += 1;
            if a.count > 0 && seen >= a.count {
                return Ok(());
            }
        }
    }
    Ok(())
}

async fn jobs(a: JobsArgs) -> Result<()> {
    let state = parse_state(&a.state)?;
    let mut client = connect(&a.conn).await?;
    let mut jobs = Vec::new();
    let mut token = String::new();
    while jobs.len() < a.limit {
        let page = client
            .list_jobs(pb::ListJobsRequest {
                queue: a.queue.clone(),
                state: state as i32,
                page_size: (a.limit - jobs.len()).min(1_000) as u32,
                page_token: token,
            })
            .await?
            .into_inner();
        jobs.extend(page.jobs);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if a.conn.json {
        let out: Vec<Value> = jobs
            .iter()
            .map(|j| {
                let (payload, encoding) = payload_json(&j.payload);
                json!({
                    "id": j.id,
                    "queue": j.queue,
                    "kind": j.kind,
                    "state": state_name(j.state),
                    "priority": j.priority,
                    "attempts": j.attempts,
                    "max_attempts": j.max_attempts,
                    "enqueued_at_unix_ms": j.enqueued_at_unix_ms,
                    "run_at_unix_ms": j.run_at_unix_ms,
                    "updated_at_unix_ms": j.updated_at_unix_ms,
                    "finished_at_unix_ms": j.finished_at_unix_ms,
                    "consumer": j.consumer,
                    "last_error": j.last_error,
                    "dead_letter_queue": j.dead_letter_queue,
                    "headers": j.headers,
                    "payload": payload,
                    "payload_encoding": encoding,
                })
            })
            .collect();
        return print_json(&json!({ "jobs": out }));
    }
    if jobs.is_empty() {
        return print_text(&format!("no {} jobs in {}\n", a.state, a.queue));
    }
    let now = sluice::broker::now_ms();
    let mut t = Table::new(&[
        "JOB",
        "STATE",
        "KIND",
        ">PRIO",
        ">ATTEMPTS",
        ">AGE",
        "LAST-ERROR",
        "PAYLOAD",
    ]);
    for j in &jobs {
        // A dead-lettered copy carries its history in headers; show its original error.
        let error = j
            .headers
            .get(sluice::broker::HEADER_LAST_ERROR)
            .unwrap_or(&j.last_error);
        t.row(vec![
            j.id.clone(),
            state_name(j.state),
            or_dash(&j.kind),
            j.priority.to_string(),
            format!("{}/{}", j.attempts, j.max_attempts),
            age(now.saturating_sub(j.enqueued_at_unix_ms)),
            or_dash(&payload_text(error.as_bytes())),
            payload_text(&j.payload),
        ]);
    }
    print_text(&t.render())
}

/// Jobs in a queue that a redrive may move (not leased, not finished).
async fn movable(client: &mut Rpc, queue: &str) -> Result<u64> {
    let s = client
        .stats(pb::StatsRequest {
            queues: vec![queue.to_owned()],
            topics: vec![],
        })
        .await?
        .into_inner();
    Ok(s.queues
        .iter()
        .find(|q| q.name == queue)
        .map(|q| q.pending + q.scheduled + q.retrying)
        .unwrap_or(0))
}

async fn redrive(a: RedriveArgs) -> Result<()> {
    let mut client = connect(&a.conn).await?;
    let before = movable(&mut client, &a.dead_letter_queue).await?;
    let mut target = if a.ids.is_empty() {
        before
    } else {
        a.ids.len() as u64
    };
    if a.max > 0 {
        target = target.min(a.max);
    }
    let request = pb::RedriveRequest {
        dead_letter_queue: a.dead_letter_queue.clone(),
        job_ids: a.ids.clone(),
        rate_per_second: a.rate,
        max_jobs: a.max,
    };
    let mut call = std::pin::pin!({
        let mut client = client.clone();
        async move { client.redrive(request).await }
    });
    let mut ticker = tokio::time::interval(Duration::from_millis(500));
    ticker.tick().await;
    let progress = std::io::stderr().is_terminal();
    let reply = loop {
        tokio::select! {
            reply = &mut call => break reply?.into_inner(),
            _ = ticker.tick() => {
                // Progress is read from the dead-letter queue's depth while the RPC runs;
                // jobs dead-lettered meanwhile can make it lag, never overshoot.
                let now = movable(&mut client, &a.dead_letter_queue).await?;
                let moved = before.saturating_sub(now).min(target);
                if progress {
                    eprint!("\rredriving {}: {moved}/{target} moved", a.dead_letter_queue);
                } else {
                    eprintln!("redriving {}: {moved}/{target} moved", a.dead_letter_queue);
                }
            }
        }
    };
    if progress {
        eprintln!();
    }
    if a.conn.json {
        return print_json(&json!({
            "dead_letter_queue": a.dead_letter_queue,
            "redriven": reply.redriven,
            "skipped_ids": reply.skipped_ids,
        }));
    }
    let mut text = format!(
        "redrove {} job(s) from {}\n",
        count(reply.redriven),
        a.dead_letter_queue
    );
    if !reply.skipped_ids.is_empty() {
        text.push_str(&format!(
            "skipped (not found or leased): {}\n",
            reply.skipped_ids.join(", ")
        ));
    }
    print_text(&text)
}

async fn purge(a: PurgeArgs) -> Result<()> {
    let mut client = connect(&a.conn).await?;
    let res = client
        .purge_queue(pb::PurgeQueueRequest {
            name: a.queue.clone(),
        })
        .await?
        .into_inner();
    if a.conn.json {
        print_json(&json!({ "queue": a.queue, "purged": res.purged }))
    } else {
        print_text(&format!(
            "purged {} job(s) from {}\n",
            count(res.purged),
            a.queue
        ))
    }
}

async fn delete_job(a: DeleteJobArgs) -> Result<()> {
    let mut client = connect(&a.conn).await?;
    let res = client
        .delete_job(pb::DeleteJobRequest {
            queue: a.queue.clone(),
            job_id: a.job_id.clone(),
        })
        .await?
        .into_inner();
    let state = res.job.map_or_else(String::new, |j| state_name(j.state));
    if a.conn.json {
        print_json(&json!({ "queue": a.queue, "job_id": a.job_id, "state": state }))
    } else {
        print_text(&format!(
            "deleted job {} ({state}) from {}\n",
            a.job_id, a.queue
        ))
    }
}

async fn limit(a: LimitArgs) -> Result<()> {
    if a.rate.is_none() && a.max_in_flight.is_none() {
        return Err(CliError::Usage(
            "give --rate (and --burst) or --max-in-flight".into(),
        ));
    }
    let mut client = connect(&a.conn).await?;
    let info = client
        .update_queue(pb::UpdateQueueRequest {
            name: a.queue.clone(),
            policy: Some(pb::QueuePolicy {
                rate_limit: a.rate.map(|per_second| pb::RateLimit {
                    per_second,
                    burst: a.burst.unwrap_or(0),
                }),
                max_in_flight: a.max_in_flight,
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    let policy = info.policy.unwrap_or_default();
    if a.conn.json {
        print_json(&json!({ "queue": a.queue, "limits": limits_json(&policy) }))
    } else {
        print_text(&format!("{}: {}\n", a.queue, limits_text(&policy)))
    }
}

/// A policy's rate and in-flight limits as JSON (null for none).
fn limits_json(policy: &pb::QueuePolicy) -> Value {
    json!({
        "rate_limit": policy.rate_limit.map(|r| json!({
            "per_second": r.per_second,
            "burst": r.burst,
        })),
        "max_in_flight": policy.max_in_flight,
    })
}

/// A policy's rate and in-flight limits in a few words: `10/s burst 20, 5 in flight`,
/// `-` for none.
fn limits_text(policy: &pb::QueuePolicy) -> String {
    let rate = policy
        .rate_limit
        .map(|r| format!("{}/s burst {}", r.per_second, r.burst));
    let in_flight = policy.max_in_flight.map(|n| format!("{n} in flight"));
    let parts: Vec<String> = rate.into_iter().chain(in_flight).collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

async fn consumers(a: ConsumersArgs) -> Result<()> {
    let mut client = connect(&a.conn).await?;
    let res = client
        .list_consumers(pb::ListConsumersRequest {
            queue: a.queue.clone(),
        })
        .await?
        .into_inner();
    if a.conn.json {
        return print_json(&json!({ "queue": a.queue, "consumers": res.consumers }));
    }
    if res.consumers.is_empty() {
        return print_text(&format!("no consumers seen on {}\n", a.queue));
    }
    let now = sluice::broker::now_ms();
    let mut t = Table::new(&[
        "CONSUMER",
        "ADDRESS",
        ">LEASES",
        ">DONE",
        ">FAILED",
        ">LAST-SEEN",
    ]);
    for c in &res.consumers {
        t.row(vec![
            c.name.clone(),
            or_dash(&c.address),
            c.leases_held.to_string(),
            count(c.done),
            count(c.failed),
            format!("{} ago", age(now.saturating_sub(c.last_seen_unix_ms))),
        ]);
    }
    print_text(&t.render())
}
