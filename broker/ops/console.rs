//! The operations console: the dashboard's companion page that acts. It lists a queue's
//! jobs by state (paged), shows one job (payload as text, JSON and hex; headers,
//! attempts, last error, result, its timeline), lists topics with their retained
//! messages, and redrives, cancels, purges, pauses, resumes and deletes.
//!
//! Everything goes through [`Engine`] methods, so it works on both engines, and every
//! request is checked with the same [`Access`] the gRPC service builds from the same
//! tokens ([`request_access`]), against the same actions: a page or action is allowed here
//! exactly when its RPC would be. Without a tokens file the console is open, like the
//! rest of the operations server, which then listens on loopback only (see `sluice serve
//! --http`).
//!
//! Cross-site requests: the token travels in an `Authorization: Bearer` header that the
//! page's script adds from `sessionStorage`, never in a cookie, so a browser never attaches
//! it to another site's request. Every POST must also carry `X-Sluice-Console: 1`, a header
//! another origin cannot send without a CORS preflight (which this server never allows),
//! and, when the browser sends `Origin`, it must name this server's `Host`: a form on
//! another site cannot act even on a tokenless loopback broker.

use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::broker::auth::{Access, Action, JOB_READERS, QUEUE_WRITERS, request_access};
use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::Headers;
use crate::broker::domain::names::Pattern;
use crate::broker::domain::queue::{HEADER_LAST_ERROR, Job, JobState, QueueCounts};
use crate::broker::domain::time::Millis;
use crate::broker::engine::local::stats::TopicCounts;
use crate::broker::engine::local::subscription::{GapPolicy, Start};
use crate::broker::engine::{Engine, SubscribeSpec};
use crate::broker::ops::AppState;

/// The page served at `/console`.
const PAGE: &str = include_str!("console.html");

/// The header every console POST carries (see the module docs).
const CSRF_HEADER: &str = "x-sluice-console";
/// Jobs per page when the request does not say.
const DEFAULT_PAGE_SIZE: usize = 50;
/// Most jobs per page (ListJobs' own limit applies too).
const MAX_PAGE_SIZE: usize = 500;
/// Most retained messages per page of a topic.
const MAX_MESSAGES: usize = 200;
/// Payload bytes shown as text or JSON; larger payloads show their start.
const PREVIEW_TEXT_BYTES: usize = 64 * 1024;
/// Payload bytes shown as hex.
const PREVIEW_HEX_BYTES: usize = 4096;
/// How long a topic page waits for its messages: they are retained, so they come at once
/// unless the newest are not yet durable (about one fsync).
const TOPIC_READ_WAIT: Duration = Duration::from_secs(2);

/// The console's routes, merged into the operations server's router.
pub(super) fn routes<E: Engine>() -> Router<AppState<E>> {
    Router::new()
        .route("/console", get(page))
        .route("/console/api/session", get(session::<E>))
        .route("/console/api/queues", get(queues::<E>))
        .route("/console/api/queues/{queue}/jobs", get(list_jobs::<E>))
        .route("/console/api/queues/{queue}/history", get(history::<E>))
        .route("/console/api/queues/{queue}/redrive", post(redrive::<E>))
        .route("/console/api/queues/{queue}/purge", post(purge::<E>))
        .route("/console/api/queues/{queue}/pause", post(pause::<E>))
        .route("/console/api/queues/{queue}/resume", post(resume::<E>))
        .route(
            "/console/api/queues/{queue}/delete",
            post(delete_queue::<E>),
        )
        .route(
            "/console/api/queues/{queue}/jobs/{id}/delete",
            post(delete_job::<E>),
        )
        .route("/console/api/jobs/{id}", get(job::<E>))
        .route("/console/api/jobs/{id}/cancel", post(cancel::<E>))
        .route("/console/api/topics", get(topics::<E>))
        .route("/console/api/topics/{topic}/messages", get(messages::<E>))
        .route(
            "/console/api/topics/{topic}/delete",
            post(delete_topic::<E>),
        )
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// A refusal: its HTTP status and a message naming the field and the value, as JSON
/// `{"error": ...}`.
#[derive(Debug)]
pub(crate) struct ConsoleError {
    status: StatusCode,
    message: String,
}

impl ConsoleError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl From<BrokerError> for ConsoleError {
    fn from(err: BrokerError) -> Self {
        let status = match &err {
            BrokerError::InvalidArgument { .. } | BrokerError::SchemaViolation { .. } => {
                StatusCode::BAD_REQUEST
            }
            BrokerError::NotFound(_) => StatusCode::NOT_FOUND,
            BrokerError::AlreadyExists(_) | BrokerError::FailedPrecondition(_) => {
                StatusCode::CONFLICT
            }
            BrokerError::ResourceExhausted(_) => StatusCode::TOO_MANY_REQUESTS,
            BrokerError::DataLoss(_) => StatusCode::INTERNAL_SERVER_ERROR,
            BrokerError::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
            BrokerError::PermissionDenied(_) => StatusCode::FORBIDDEN,
            BrokerError::Unavailable(_)
            | BrokerError::ShuttingDown
            | BrokerError::StorageFailed(_)
            | BrokerError::SchemaStale { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, err.to_string())
    }
}

impl IntoResponse for ConsoleError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // The page asks for a token; a browser must not pop up its own dialog.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"sluice\""),
            );
        }
        response
    }
}

type Answer<T> = Result<Json<T>, ConsoleError>;

/// The caller of a console API request: what its token allows. Extracting it checks the
/// token and, for a POST, the cross-site rules of the module docs, before the handler
/// reads anything else, so a refused request changes nothing.
pub(crate) struct Caller {
    access: Access,
}

impl<E: Engine> FromRequestParts<AppState<E>> for Caller {
    type Rejection = ConsoleError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState<E>,
    ) -> Result<Self, Self::Rejection> {
        if parts.method != Method::GET && parts.method != Method::HEAD {
            same_origin(&parts.headers)?;
        }
        let authorization = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        Ok(Self {
            access: request_access(state.auth.as_ref(), authorization)?,
        })
    }
}

/// Refuses a POST that a page of another origin could have sent.
fn same_origin(headers: &HeaderMap) -> Result<(), ConsoleError> {
    if headers.get(CSRF_HEADER).map(|v| v.as_bytes()) != Some(b"1") {
        return Err(ConsoleError::new(
            StatusCode::FORBIDDEN,
            format!(
                "{CSRF_HEADER}: missing; console actions must come from the console page (header \"{CSRF_HEADER}: 1\")"
            ),
        ));
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or_default();
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        let origin_host = origin.split_once("://").map_or(origin, |(_, rest)| rest);
        if host.is_empty() || !origin_host.eq_ignore_ascii_case(host) {
            return Err(ConsoleError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "origin: {origin:?} is not this server ({host:?}); cross-site actions are refused"
                ),
            ));
        }
    }
    Ok(())
}

/// Who the console talks to.
#[derive(Debug, Serialize)]
struct SessionView {
    /// Whether the broker runs with a tokens file.
    auth_required: bool,
    /// The token's name, when there is one.
    token_name: Option<String>,
}

async fn session<E: Engine>(State(state): State<AppState<E>>, caller: Caller) -> Json<SessionView> {
    Json(SessionView {
        auth_required: state.auth.is_some(),
        token_name: caller.access.token_name(),
    })
}

/// One queue as the console lists it.
#[derive(Debug, Serialize)]
struct QueueView {
    name: String,
    paused: bool,
    /// Where its dead letters go.
    dead_letter_queue: String,
    /// Its counters (zeros if the snapshot has none yet).
    counts: QueueCounts,
}

/// The queues the caller administers (as ListQueues filters them), with their counters.
async fn queues<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
) -> Answer<Vec<QueueView>> {
    let stats = state.broker.stats(&[], &[]).await?;
    let queues = state.broker.list_queues().await?;
    Ok(Json(
        queues
            .into_iter()
            .filter(|q| caller.access.allows_name(Action::Admin, &q.name))
            .map(|q| {
                let counts = stats
                    .queues
                    .iter()
                    .find(|(name, _)| *name == q.name)
                    .map(|(_, c)| c.clone())
                    .unwrap_or_default();
                QueueView {
                    dead_letter_queue: q.policy.dead_letter_queue,
                    name: q.name,
                    paused: q.paused,
                    counts,
                }
            })
            .collect(),
    ))
}

/// A payload or result shown three ways.
#[derive(Debug, Serialize)]
struct Preview {
    /// Its length in bytes.
    bytes: usize,
    /// Whether the text and hex show only its start.
    truncated: bool,
    /// As UTF-8 text, if it is (its start, up to [`PREVIEW_TEXT_BYTES`]).
    text: Option<String>,
    /// Parsed, if the whole of it is JSON.
    json: Option<Value>,
    /// Its first [`PREVIEW_HEX_BYTES`] bytes as a hex dump.
    hex: String,
}

impl Preview {
    fn of(bytes: &[u8]) -> Self {
        let head = &bytes[..bytes.len().min(PREVIEW_TEXT_BYTES)];
        // A cut may split a character: show the valid prefix.
        let text = match std::str::from_utf8(head) {
            Ok(text) => Some(text.to_owned()),
            Err(e) if e.error_len().is_none() => {
                Some(String::from_utf8_lossy(&head[..e.valid_up_to()]).into_owned())
            }
            Err(_) => None,
        };
        let json = (bytes.len() <= PREVIEW_TEXT_BYTES)
            .then(|| serde_json::from_slice(bytes).ok())
            .flatten();
        Self {
            bytes: bytes.len(),
            truncated: bytes.len() > PREVIEW_HEX_BYTES,
            text,
            json,
            hex: hex_dump(&bytes[..bytes.len().min(PREVIEW_HEX_BYTES)]),
        }
    }
}

/// `offset  hex bytes  ascii`, 16 bytes a line.
fn hex_dump(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 4 + bytes.len() / 16 * 12);
    for (i, line) in bytes.chunks(16).enumerate() {
        let _ = write!(out, "{:08x} ", i * 16);
        for b in line {
            let _ = write!(out, " {b:02x}");
        }
        out.push_str(&"   ".repeat(16 - line.len()));
        out.push_str("  ");
        out.extend(line.iter().map(|&b| {
            if b.is_ascii_graphic() || b == b' ' {
                b as char
            } else {
                '.'
            }
        }));
        out.push('\n');
    }
    out
}

/// A job's row in a list.
#[derive(Debug, Serialize)]
struct JobRow {
    id: String,
    queue: String,
    state: &'static str,
    kind: String,
    priority: u8,
    attempts: u32,
    max_attempts: u32,
    payload_bytes: usize,
    enqueued_at: Millis,
    updated_at: Millis,
    last_error: Option<String>,
}

impl JobRow {
    fn of(queue: &str, job: &Job) -> Self {
        Self {
            id: job.id.to_string(),
            queue: queue.to_owned(),
            state: job.state.as_str(),
            kind: job.kind.clone(),
            priority: job.priority,
            attempts: job.attempts,
            max_attempts: job.max_attempts,
            payload_bytes: job.payload.len(),
            enqueued_at: job.enqueued_at,
            updated_at: job.updated_at,
            // A dead letter's own record starts afresh; why it died is in the header the
            // broker wrote when it moved it.
            last_error: job
                .last_error
                .clone()
                .or_else(|| job.headers.get(HEADER_LAST_ERROR).cloned()),
        }
    }
}

/// A job's page.
#[derive(Debug, Serialize)]
struct JobPage {
    #[serde(flatten)]
    row: JobRow,
    headers: Headers,
    payload: Preview,
    result: Option<Preview>,
    idempotency_key: Option<String>,
    ordering_key: Option<String>,
    consumer: Option<String>,
    dead_letter_queue: Option<String>,
    /// For a dead letter: the queue a redrive returns it to.
    origin: Option<String>,
    /// What happened to it, oldest first, from the times the broker keeps.
    timeline: Vec<Moment>,
}

/// One point of a job's timeline.
#[derive(Debug, Serialize)]
struct Moment {
    at: Millis,
    what: String,
}

impl JobPage {
    fn of(queue: &str, job: Job) -> Self {
        let mut timeline = vec![Moment {
            at: job.enqueued_at,
            what: format!("enqueued into {queue}"),
        }];
        if job.run_at > job.enqueued_at {
            timeline.push(Moment {
                at: job.run_at,
                what: if job.state.is_finished() {
                    "last visible for an attempt".to_owned()
                } else {
                    "visible for its next attempt".to_owned()
                },
            });
        }
        if let Some(deadline) = job.lease_deadline {
            timeline.push(Moment {
                at: deadline,
                what: format!(
                    "lease of {} ends",
                    job.consumer.as_deref().unwrap_or("a worker")
                ),
            });
        }
        if let Some(finished) = job.finished_at {
            timeline.push(Moment {
                at: finished,
                what: format!("finished: {}", job.state.as_str()),
            });
        } else if job.updated_at > job.enqueued_at {
            timeline.push(Moment {
                at: job.updated_at,
                what: format!("last change: now {}", job.state.as_str()),
            });
        }
        timeline.sort_by_key(|m| m.at);
        Self {
            row: JobRow::of(queue, &job),
            payload: Preview::of(&job.payload),
            result: job.result.as_deref().map(Preview::of),
            headers: job.headers,
            idempotency_key: job.idempotency_key,
            ordering_key: job.ordering_key.map(|k| k.to_string()),
            consumer: job.consumer.map(|c| c.to_string()),
            dead_letter_queue: job.dead_letter_queue,
            origin: job.origin,
            timeline,
        }
    }
}

/// The query of a job list. Every field is read as text and parsed here, so a bad value
/// is refused naming it.
#[derive(Debug, Deserialize)]
struct ListQuery {
    state: Option<String>,
    page_size: Option<String>,
    page_token: Option<String>,
}

/// A page of jobs.
#[derive(Debug, Serialize)]
struct JobList {
    jobs: Vec<JobRow>,
    /// The next page's token; `None` on the last page.
    next_page_token: Option<String>,
}

fn parse_state(state: Option<&str>) -> Result<Option<JobState>, ConsoleError> {
    match state {
        None | Some("") | Some("all") => Ok(None),
        Some(s) => JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .map(Some)
            .ok_or_else(|| {
                let known: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
                BrokerError::invalid(
                    "state",
                    format!(
                        "{s:?} is not a job state (one of: all, {})",
                        known.join(", ")
                    ),
                )
                .into()
            }),
    }
}

fn parse_count(
    field: &str,
    value: Option<&str>,
    default: usize,
    max: usize,
) -> Result<usize, ConsoleError> {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return Ok(default);
    };
    match value.parse::<usize>() {
        Ok(n) if (1..=max).contains(&n) => Ok(n),
        _ => Err(
            BrokerError::invalid(field, format!("{value:?} is not a number from 1 to {max}"))
                .into(),
        ),
    }
}

/// A queue's live jobs in one state (or all), a page at a time: ListJobs, with its check
/// (`admin` on the queue).
async fn list_jobs<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
    Path(queue): Path<String>,
    Query(query): Query<ListQuery>,
) -> Answer<JobList> {
    caller.access.check(Action::Admin, "queue", &queue)?;
    let job_state = parse_state(query.state.as_deref())?;
    let page_size = parse_count(
        "page_size",
        query.page_size.as_deref(),
        DEFAULT_PAGE_SIZE,
        MAX_PAGE_SIZE,
    )?;
    let (jobs, next) = state
        .broker
        .list_jobs(
            &queue,
            job_state,
            page_size,
            query.page_token.as_deref().unwrap_or(""),
        )
        .await?;
    Ok(Json(JobList {
        jobs: jobs.iter().map(|j| JobRow::of(&queue, j)).collect(),
        next_page_token: next.map(|n| n.to_string()),
    }))
}

#[derive(Debug, Deserialize)]
struct HistoryQuery {
    limit: Option<String>,
}

/// A queue's recently finished jobs, newest first: JobHistory, with its check.
async fn history<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
    Path(queue): Path<String>,
    Query(query): Query<HistoryQuery>,
) -> Answer<Vec<JobRow>> {
    caller.access.check(Action::Admin, "queue", &queue)?;
    let limit = parse_count(
        "limit",
        query.limit.as_deref(),
        DEFAULT_PAGE_SIZE,
        MAX_PAGE_SIZE,
    )?;
    let jobs = state.broker.job_history(&queue, limit).await?;
    Ok(Json(jobs.iter().map(|j| JobRow::of(&queue, j)).collect()))
}

#[derive(Debug, Deserialize)]
struct JobQuery {
    queue: Option<String>,
}

/// A job's page: GetJob, with its check (a reader of the job's queue).
async fn job<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<JobQuery>,
) -> Answer<JobPage> {
    let queue = query.queue.filter(|q| !q.is_empty());
    if let Some(queue) = &queue {
        caller.access.check_any(JOB_READERS, "queue", queue)?;
    }
    let (queue, job) = state.broker.get_job(&id, queue.as_deref()).await?;
    caller.access.check_any(JOB_READERS, "id", &queue)?;
    Ok(Json(JobPage::of(&queue, job)))
}

/// Cancels a job: CancelJob, with its check (a writer of the job's queue), made before
/// anything changes.
async fn cancel<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<JobQuery>,
) -> Answer<JobPage> {
    let queue = match query.queue.filter(|q| !q.is_empty()) {
        Some(queue) => queue,
        None => state.broker.get_job(&id, None).await?.0,
    };
    caller.access.check_any(QUEUE_WRITERS, "queue", &queue)?;
    let (queue, job) = state.broker.cancel_job(&id, Some(&queue)).await?;
    Ok(Json(JobPage::of(&queue, job)))
}

/// Deletes one job whatever its state: DeleteJob, with its check (`admin` on the queue).
async fn delete_job<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
    Path((queue, id)): Path<(String, String)>,
) -> Answer<Done> {
    caller.access.check(Action::Admin, "queue", &queue)?;
    let job = state.broker.delete_job(&queue, &id).await?;
    Ok(Json(Done {
        done: format!("job {id} deleted (it was {})", job.state.as_str()),
        name: queue,
    }))
}

/// What to redrive: the listed dead letters, or every one when the list is empty.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedriveBody {
    #[serde(default)]
    job_ids: Vec<String>,
}

/// What a redrive did.
#[derive(Debug, Serialize)]
struct RedriveView {
    redriven: u64,
    skipped_ids: Vec<String>,
}

/// Returns dead letters to their queues: Redrive, with its checks (`admin` on the
/// dead-letter queue here, `enqueue` or `admin` on each target in the engine).
async fn redrive<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
    Path(queue): Path<String>,
    body: Bytes,
) -> Answer<RedriveView> {
    caller
        .access
        .check(Action::Admin, "dead_letter_queue", &queue)?;
    let body: RedriveBody = if body.is_empty() {
        RedriveBody::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ConsoleError::from(BrokerError::invalid(
                "body",
                format!("expected {{\"job_ids\": [\"<id>\", ...]}}: {e}"),
            ))
        })?
    };
    let outcome = state
        .broker
        .redrive(&queue, &body.job_ids, 0, 0, &caller.access)
        .await?;
    Ok(Json(RedriveView {
        redriven: outcome.redriven,
        skipped_ids: outcome.skipped.iter().map(|id| id.to_string()).collect(),
    }))
}

/// The answer of a queue action.
#[derive(Debug, Serialize)]
struct Done {
    /// The queue or topic.
    name: String,
    /// What changed, in words.
    done: String,
}

/// Cancels every live job of a queue: PurgeQueue, with its check.
async fn purge<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
    Path(queue): Path<String>,
) -> Answer<Done> {
    caller.access.check(Action::Admin, "queue", &queue)?;
    let purged = state.broker.purge_queue(&queue).await?;
    Ok(Json(Done {
        done: format!("purged {purged} job(s)"),
        name: queue,
    }))
}

/// Pauses or resumes a queue: PauseQueue or ResumeQueue, with their check.
async fn set_paused<E: Engine>(
    state: AppState<E>,
    caller: Caller,
    queue: String,
    paused: bool,
) -> Answer<Done> {
    caller.access.check(Action::Admin, "queue", &queue)?;
    let info = state.broker.set_paused(&queue, paused).await?;
    Ok(Json(Done {
        done: if info.paused { "paused" } else { "resumed" }.to_owned(),
        name: queue,
    }))
}

async fn pause<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
    Path(queue): Path<String>,
) -> Answer<Done> {
    set_paused(state, caller, queue, true).await
}

async fn resume<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
    Path(queue): Path<String>,
) -> Answer<Done> {
    set_paused(state, caller, queue, false).await
}

/// Deletes a queue and its jobs: DeleteQueue, with its check.
async fn delete_queue<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
    Path(queue): Path<String>,
) -> Answer<Done> {
    caller.access.check(Action::Admin, "queue", &queue)?;
    state.broker.delete_queue(&queue).await?;
    Ok(Json(Done {
        done: "deleted".to_owned(),
        name: queue,
    }))
}

/// The topics the caller administers (as Stats filters them), with their counters.
async fn topics<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
) -> Answer<Vec<TopicCounts>> {
    let stats = state.broker.stats(&[], &[]).await?;
    Ok(Json(
        stats
            .topics
            .into_iter()
            .filter(|t| caller.access.allows_name(Action::Admin, &t.name))
            .collect(),
    ))
}

#[derive(Debug, Deserialize)]
struct MessagesQuery {
    /// The first sequence to show (default: the oldest retained).
    from: Option<String>,
    limit: Option<String>,
}

/// One retained message.
#[derive(Debug, Serialize)]
struct MessageView {
    sequence: u64,
    publish_time: Millis,
    key: String,
    headers: Option<Headers>,
    payload: Preview,
}

/// A page of a topic's retained messages.
#[derive(Debug, Serialize)]
struct MessagePage {
    topic: TopicCounts,
    messages: Vec<MessageView>,
    /// Where the next page starts; `None` when this page reaches the newest message.
    next_from: Option<u64>,
}

/// A topic's retained messages from a sequence on: what a Subscribe replaying from that
/// sequence would read, so it needs what Subscribe needs (`subscribe` on the topic).
async fn messages<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
    Path(topic): Path<String>,
    Query(query): Query<MessagesQuery>,
) -> Answer<MessagePage> {
    let pattern = Pattern::parse("topic", &topic)?;
    caller
        .access
        .check_pattern(Action::Subscribe, "topic", &pattern)?;
    let limit = parse_count(
        "limit",
        query.limit.as_deref(),
        DEFAULT_PAGE_SIZE,
        MAX_MESSAGES,
    )?;
    let from = match query.from.as_deref().filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => Some(f.parse::<u64>().map_err(|_| {
            ConsoleError::from(BrokerError::invalid(
                "from",
                format!("{f:?} is not a message sequence (a whole number)"),
            ))
        })?),
    };
    let stats = state
        .broker
        .stats(&[], std::slice::from_ref(&topic))
        .await?;
    let counts = stats
        .topics
        .into_iter()
        .find(|t| t.name == topic)
        .ok_or_else(|| BrokerError::NotFound(format!("topic: no topic named {topic:?}")))?;
    let start = from
        .unwrap_or(counts.first_sequence)
        .max(counts.first_sequence);
    let mut page = MessagePage {
        messages: Vec::new(),
        next_from: None,
        topic: counts,
    };
    if page.topic.retained_messages == 0 || start > page.topic.last_sequence {
        return Ok(Json(page));
    }
    let ends = CancellationToken::new();
    let spec = SubscribeSpec {
        pattern,
        start: Start::Sequence(start),
        resume_from: Default::default(),
        on_gap: GapPolicy::Notify,
        max_batch: limit,
    };
    let mut stream = state.broker.subscribe(spec, ends.clone()).await?;
    let read = tokio::time::timeout(TOPIC_READ_WAIT, async {
        while page.messages.len() < limit {
            let Some(batch) = stream.next().await else {
                break;
            };
            for slice in batch?.messages {
                for m in slice.messages() {
                    if page.messages.len() < limit {
                        page.messages.push(MessageView {
                            sequence: m.sequence,
                            publish_time: m.publish_time,
                            key: m.entry.key().to_owned(),
                            headers: m.entry.headers().cloned(),
                            payload: Preview::of(&m.entry.payload),
                        });
                    }
                }
            }
            if page
                .messages
                .last()
                .is_some_and(|m| m.sequence >= page.topic.last_sequence)
            {
                break;
            }
        }
        Ok::<_, BrokerError>(())
    })
    .await;
    ends.cancel();
    if let Ok(result) = read {
        result?;
    }
    page.next_from = page
        .messages
        .last()
        .map(|m| m.sequence + 1)
        .filter(|next| *next <= page.topic.last_sequence);
    Ok(Json(page))
}

/// Deletes a topic and its messages: DeleteTopic, with its check.
async fn delete_topic<E: Engine>(
    State(state): State<AppState<E>>,
    caller: Caller,
    Path(topic): Path<String>,
) -> Answer<Done> {
    caller.access.check(Action::Admin, "topic", &topic)?;
    state.broker.delete_topic(&topic).await?;
    Ok(Json(Done {
        done: "deleted".to_owned(),
        name: topic,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_shows_text_json_and_hex() {
        let p = Preview::of(br#"{"to":"ann"}"#);
        assert_eq!(p.bytes, 12);
        assert_eq!(p.text.as_deref(), Some(r#"{"to":"ann"}"#));
        assert_eq!(p.json, Some(serde_json::json!({"to": "ann"})));
        assert!(p.hex.starts_with("00000000  7b 22 74 6f"), "{}", p.hex);
        assert!(p.hex.trim_end().ends_with(r#"{"to":"ann"}"#), "{}", p.hex);

        let binary = Preview::of(&[0xff, 0x00, 0x41]);
        assert_eq!(binary.text, None);
        assert_eq!(binary.json, None);
        assert!(binary.hex.contains("ff 00 41"), "{}", binary.hex);
        assert!(binary.hex.trim_end().ends_with("..A"), "{}", binary.hex);
    }

    #[test]
    fn a_cut_inside_a_character_keeps_the_text_before_it() {
        let mut payload = vec![b'a'; PREVIEW_TEXT_BYTES - 1];
        payload.extend("é".as_bytes());
        let p = Preview::of(&payload);
        assert_eq!(p.text.map(|t| t.len()), Some(PREVIEW_TEXT_BYTES - 1));
        assert!(p.truncated);
    }

    #[test]
    fn bad_list_parameters_name_the_field_and_value() {
        let e = parse_state(Some("deadd")).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(e.message.starts_with("state: \"deadd\""), "{}", e.message);
        assert_eq!(parse_state(Some("dead")).unwrap(), Some(JobState::Dead));
        let e = parse_count("page_size", Some("0"), 50, 500).unwrap_err();
        assert!(e.message.starts_with("page_size: \"0\""), "{}", e.message);
        assert_eq!(parse_count("page_size", None, 50, 500).unwrap(), 50);
    }

    #[test]
    fn posts_from_other_origins_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(same_origin(&h).unwrap_err().status, StatusCode::FORBIDDEN);
        h.insert(CSRF_HEADER, "1".parse().unwrap());
        assert!(same_origin(&h).is_ok());
        h.insert(header::ORIGIN, "http://127.0.0.1:8080".parse().unwrap());
        assert!(same_origin(&h).is_ok());
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        let e = same_origin(&h).unwrap_err();
        assert!(e.message.starts_with("origin: "), "{}", e.message);
    }
}
