//! The todo app of the example system: an HTTP API (axum) over SQLite that publishes
//! events to Sluice and knows nothing of the workers that react to them.
//!
//! | route | what it does |
//! |---|---|
//! | `POST /users` `{"name","email"}` | creates a user, publishes `user.registered` |
//! | `GET /users/{id}` | one user |
//! | `POST /todos` `{"user_id","title","due_at"?}` | creates a todo; with `due_at` (RFC 3339 UTC) in the future, enqueues a `todo.reminder` job into `emails` to run at `due_at` |
//! | `GET /todos?user_id=` | lists todos |
//! | `PUT /todos/{id}/complete` | completes a todo, cancels its pending reminder, publishes `todo.completed` |
//! | `GET /todos/overdue` | lists overdue todos (a read: the overdue scan below publishes) |
//! | `GET /queue/status` | queue and topic counters (broker `Stats`) |
//! | `GET /jobs/history?queue=&limit=` | finished jobs (broker `JobHistory`) |
//! | `GET /workers` | workers per queue (broker `ListConsumers`) |
//! | `GET /users/{id}/notifications` | notifications received on `notification.delivered` |
//! | `GET /healthz` | liveness |
//!
//! Every response is JSON with `"success": true|false`; errors carry `"error"` naming the
//! field, the rule and the value.
//!
//! The overdue scan: at start the app registers (creates, or updates) the broker schedule
//! `todo-overdue-scan`, which enqueues a `todo.overdue-scan` job into `todo-maintenance`
//! every `--overdue-scan-ms` (a minute by default), skipping a tick while the previous
//! scan still runs. A worker in this process consumes that queue and publishes
//! `todo.overdue` once per overdue todo (the `overdue_notified` flag keeps it to once,
//! whichever app instance scans).
//!
//! Consistency: a user or todo is written to SQLite first and its event published right
//! after; if the broker refuses, the row is removed again and the request fails with 503,
//! so no user exists without its welcome event. (A crash between the two steps can still
//! lose an event; a transactional outbox would close that window.)

#[path = "../shared/mod.rs"]
mod shared;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use clap::Parser;
use futures::StreamExt;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::{Value, json};
use shared::{
    EMAILS, NOTIFICATION_DELIVERED, NOTIFICATIONS, Notification, TODO_COMPLETED, TODO_OVERDUE,
    TODO_REMINDER, TodoEvent, USER_REGISTERED, UserRegistered,
};
use sluice::client::{
    Client, ClientError, Done, JobContext, JobError, Raw, ScheduleSpec, StartAt, Worker,
};
use sluice::pb;

/// Todo app of the Sluice example system.
#[derive(Debug, Parser)]
struct Args {
    /// HTTP listen address.
    #[arg(long, env = "TODO_LISTEN", default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// How to reach the broker.
    #[command(flatten)]
    broker: shared::BrokerArgs,
    /// SQLite database file.
    #[arg(long, env = "TODO_DB", default_value = "todo_app.sqlite3")]
    db: PathBuf,
    /// How often the overdue scan runs, ms (the broker schedule's interval; at least 1000).
    #[arg(long, env = "TODO_OVERDUE_SCAN_MS", default_value_t = 60_000)]
    overdue_scan_ms: u64,
}

/// The broker schedule that runs the overdue scan.
const OVERDUE_SCAN_SCHEDULE: &str = "todo-overdue-scan";
/// The queue its jobs go to, which this app consumes.
const MAINTENANCE: &str = "todo-maintenance";
/// The kind of the scan's jobs.
const OVERDUE_SCAN: &str = "todo.overdue-scan";

impl shared::ExampleArgs for Args {
    fn broker(&self) -> &shared::BrokerArgs {
        &self.broker
    }
}

const MAX_NAME: usize = 100;
const MAX_EMAIL: usize = 254;
const MAX_TITLE: usize = 200;
/// How far ahead a due time may be (the broker's limit for `run_at`).
const MAX_DUE_AHEAD: Duration = Duration::from_secs(365 * 86_400);

#[derive(Clone)]
struct App {
    db: Arc<Mutex<Connection>>,
    client: Client,
}

impl App {
    /// The database. Every use is a few short statements, never held across an `.await`.
    /// A poisoned lock is reused: each SQLite statement is atomic, so a panic between
    /// statements cannot leave a half-written row behind.
    fn db(&self) -> MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// An error response: `{"success": false, "error": ...}` with a status.
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }

    fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            message: message.into(),
        }
    }

    fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            axum::Json(json!({"success": false, "error": self.message})),
        )
            .into_response()
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        tracing::error!(error = %e, "database error");
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("database: {e}"),
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        tracing::warn!(error = %e, "broker error");
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("message broker: {e}"),
        }
    }
}

type ApiResult = Result<(StatusCode, axum::Json<Value>), ApiError>;

fn ok(status: StatusCode, body: Value) -> ApiResult {
    Ok((status, axum::Json(body)))
}

// ---- input parsing ---------------------------------------------------------------------

fn parse_body(body: &Bytes) -> Result<serde_json::Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ApiError::bad_request(format!(
            "body: expected a JSON object, got {}",
            json_type(&other)
        ))),
        Err(e) => Err(ApiError::bad_request(format!("body: invalid JSON: {e}"))),
    }
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A required string field, trimmed, 1..=max characters.
fn string_field(
    map: &serde_json::Map<String, Value>,
    field: &str,
    max: usize,
) -> Result<String, ApiError> {
    match map.get(field) {
        None | Some(Value::Null) => Err(ApiError::bad_request(format!(
            "field {field}: required (a string of 1 to {max} characters)"
        ))),
        Some(Value::String(s)) => {
            let s = s.trim();
            let n = s.chars().count();
            if n == 0 {
                Err(ApiError::bad_request(format!(
                    "field {field}: must not be empty (1 to {max} characters)"
                )))
            } else if n > max {
                Err(ApiError::bad_request(format!(
                    "field {field}: {n} characters exceeds the limit of {max}"
                )))
            } else {
                Ok(s.to_owned())
            }
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "field {field}: expected a string, got {}",
            json_type(other)
        ))),
    }
}

fn validate_email(email: &str) -> Result<(), ApiError> {
    let valid = match email.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && domain.contains('.')
                && !email.chars().any(char::is_whitespace)
        }
        None => false,
    };
    if valid {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "field email: {email:?} is not an email address like name@example.com"
        )))
    }
}

fn parse_id(what: &str, raw: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().ok().filter(|id| *id > 0).ok_or_else(|| {
        ApiError::bad_request(format!("path {what}: {raw:?} is not a positive integer"))
    })
}

fn parse_due_at(raw: &str) -> Result<SystemTime, ApiError> {
    humantime::parse_rfc3339_weak(raw.trim_end_matches('Z'))
        .ok()
        .filter(|_| raw.ends_with('Z'))
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "field due_at: {raw:?} is not an RFC 3339 UTC time like 2026-12-31T18:00:00Z"
            ))
        })
}

fn from_unix(secs: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64)
}

fn now_unix() -> i64 {
    shared::unix_secs(SystemTime::now())
}

// ---- rows --------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct User {
    id: i64,
    name: String,
    email: String,
    created_at: String,
}

impl User {
    fn json(&self) -> Value {
        json!({"id": self.id, "name": self.name, "email": self.email, "created_at": self.created_at})
    }
}

#[derive(Debug, Clone)]
struct Todo {
    id: i64,
    user_id: i64,
    title: String,
    due_at: Option<i64>,
    completed_at: Option<String>,
    created_at: String,
    reminder_job_id: Option<String>,
    overdue_notified: bool,
}

impl Todo {
    fn json(&self) -> Value {
        json!({
            "id": self.id,
            "user_id": self.user_id,
            "title": self.title,
            "due_at": self.due_at.map(|s| shared::rfc3339(from_unix(s))),
            "completed": self.completed_at.is_some(),
            "completed_at": self.completed_at,
            "created_at": self.created_at,
            "reminder_job_id": self.reminder_job_id,
        })
    }

    fn event(&self, user: &User) -> TodoEvent {
        TodoEvent {
            todo_id: self.id,
            user_id: user.id,
            user_name: user.name.clone(),
            email: user.email.clone(),
            title: self.title.clone(),
            due_at: self.due_at.map(|s| shared::rfc3339(from_unix(s))),
            completed_at: self.completed_at.clone(),
        }
    }
}

const TODO_COLUMNS: &str =
    "id, user_id, title, due_at, completed_at, created_at, reminder_job_id, overdue_notified";

fn todo_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Todo> {
    Ok(Todo {
        id: row.get(0)?,
        user_id: row.get(1)?,
        title: row.get(2)?,
        due_at: row.get(3)?,
        completed_at: row.get(4)?,
        created_at: row.get(5)?,
        reminder_job_id: row.get(6)?,
        overdue_notified: row.get(7)?,
    })
}

fn find_user(db: &Connection, id: i64) -> rusqlite::Result<Option<User>> {
    db.query_row(
        "SELECT id, name, email, created_at FROM users WHERE id = ?1",
        [id],
        |row| {
            Ok(User {
                id: row.get(0)?,
                name: row.get(1)?,
                email: row.get(2)?,
                created_at: row.get(3)?,
            })
        },
    )
    .optional()
}

fn find_todo(db: &Connection, id: i64) -> rusqlite::Result<Option<Todo>> {
    db.query_row(
        &format!("SELECT {TODO_COLUMNS} FROM todos WHERE id = ?1"),
        [id],
        todo_row,
    )
    .optional()
}

fn open_db(path: &std::path::Path) -> rusqlite::Result<Connection> {
    let db = Connection::open(path)?;
    db.execute_batch(
        "PRAGMA journal_mode = WAL;
         PRAGMA foreign_keys = ON;
         CREATE TABLE IF NOT EXISTS users (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             name TEXT NOT NULL,
             email TEXT NOT NULL UNIQUE,
             created_at TEXT NOT NULL
         );
         CREATE TABLE IF NOT EXISTS todos (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
             title TEXT NOT NULL,
             due_at INTEGER,
             completed_at TEXT,
             created_at TEXT NOT NULL,
             reminder_job_id TEXT,
             overdue_notified INTEGER NOT NULL DEFAULT 0
         );
         CREATE TABLE IF NOT EXISTS notifications (
             id TEXT PRIMARY KEY,
             user_id INTEGER NOT NULL,
             todo_id INTEGER NOT NULL,
             title TEXT NOT NULL,
             message TEXT NOT NULL,
             channel TEXT NOT NULL,
             delivered_at TEXT NOT NULL,
             received_at TEXT NOT NULL
         );
         -- Where the notification.delivered subscription resumes after a restart.
         CREATE TABLE IF NOT EXISTS subscription_offsets (
             topic TEXT PRIMARY KEY,
             next_sequence INTEGER NOT NULL
         );",
    )?;
    Ok(db)
}

// ---- handlers ----------------------------------------------------------------------------

async fn create_user(State(app): State<App>, body: Bytes) -> ApiResult {
    let map = parse_body(&body)?;
    let name = string_field(&map, "name", MAX_NAME)?;
    let email = string_field(&map, "email", MAX_EMAIL)?.to_lowercase();
    validate_email(&email)?;
    let user = {
        let db = app.db();
        let taken: bool = db
            .query_row("SELECT 1 FROM users WHERE email = ?1", [&email], |_| Ok(()))
            .optional()?
            .is_some();
        if taken {
            return Err(ApiError::conflict(format!(
                "field email: {email:?} is already registered"
            )));
        }
        let created_at = shared::now_rfc3339();
        db.execute(
            "INSERT INTO users (name, email, created_at) VALUES (?1, ?2, ?3)",
            params![name, email, created_at],
        )?;
        User {
            id: db.last_insert_rowid(),
            name,
            email,
            created_at,
        }
    };
    let event = UserRegistered {
        user_id: user.id,
        name: user.name.clone(),
        email: user.email.clone(),
        registered_at: user.created_at.clone(),
    };
    if let Err(e) = app.client.publish_json(USER_REGISTERED, &event).await {
        app.db()
            .execute("DELETE FROM users WHERE id = ?1", [user.id])?;
        return Err(e.into());
    }
    tracing::info!(user_id = user.id, "user registered");
    ok(
        StatusCode::CREATED,
        json!({"success": true, "user": user.json(), "message": "User created, welcome email queued"}),
    )
}

async fn get_user(State(app): State<App>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id("id", &id)?;
    let user = find_user(&app.db(), id)?
        .ok_or_else(|| ApiError::not_found(format!("user {id} does not exist")))?;
    ok(
        StatusCode::OK,
        json!({"success": true, "user": user.json()}),
    )
}

async fn create_todo(State(app): State<App>, body: Bytes) -> ApiResult {
    let map = parse_body(&body)?;
    let user_id = match map.get("user_id") {
        Some(Value::Number(n)) if n.as_i64().is_some_and(|v| v > 0) => n.as_i64().unwrap_or(0),
        None | Some(Value::Null) => {
            return Err(ApiError::bad_request(
                "field user_id: required (a positive integer)",
            ));
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "field user_id: {other} is not a positive integer"
            )));
        }
    };
    let title = string_field(&map, "title", MAX_TITLE)?;
    let due_at = match map.get("due_at") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let at = parse_due_at(s)?;
            // The broker schedules jobs at most a year ahead; refuse rather than store a
            // todo whose reminder could never be scheduled.
            if at > SystemTime::now() + MAX_DUE_AHEAD {
                return Err(ApiError::bad_request(format!(
                    "field due_at: {s:?} is more than {} days ahead (the limit for reminders)",
                    MAX_DUE_AHEAD.as_secs() / 86_400
                )));
            }
            Some(at)
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "field due_at: expected an RFC 3339 UTC time string, got {}",
                json_type(other)
            )));
        }
    };
    let (user, mut todo) = {
        let db = app.db();
        let user = find_user(&db, user_id)?.ok_or_else(|| {
            ApiError::not_found(format!("field user_id: user {user_id} does not exist"))
        })?;
        let created_at = shared::now_rfc3339();
        let due = due_at.map(shared::unix_secs);
        db.execute(
            "INSERT INTO todos (user_id, title, due_at, created_at) VALUES (?1, ?2, ?3, ?4)",
            params![user_id, title, due, created_at],
        )?;
        let todo = Todo {
            id: db.last_insert_rowid(),
            user_id,
            title,
            due_at: due,
            completed_at: None,
            created_at,
            reminder_job_id: None,
            overdue_notified: false,
        };
        (user, todo)
    };
    let message = match due_at {
        Some(at) if at > SystemTime::now() => {
            let enqueued = app
                .client
                .enqueue_json(EMAILS, &todo.event(&user))
                .map_err(ApiError::from)?
                .kind(TODO_REMINDER)
                .run_at(at)
                .send()
                .await;
            match enqueued {
                Ok(e) => {
                    app.db().execute(
                        "UPDATE todos SET reminder_job_id = ?1 WHERE id = ?2",
                        params![e.job_id, todo.id],
                    )?;
                    todo.reminder_job_id = Some(e.job_id);
                    format!(
                        "Todo created, reminder scheduled for {}",
                        shared::rfc3339(at)
                    )
                }
                Err(e) => {
                    app.db().execute("DELETE FROM todos WHERE id = ?1", [todo.id])?;
                    return Err(e.into());
                }
            }
        }
        Some(_) => "Todo created; due_at is already past, so no reminder was scheduled (see GET /todos/overdue)".to_owned(),
        None => "Todo created".to_owned(),
    };
    ok(
        StatusCode::CREATED,
        json!({"success": true, "todo": todo.json(), "message": message}),
    )
}

#[derive(Debug, serde::Deserialize)]
struct TodoQuery {
    user_id: Option<String>,
}

async fn list_todos(State(app): State<App>, Query(q): Query<TodoQuery>) -> ApiResult {
    let db = app.db();
    let todos: Vec<Todo> = match q.user_id {
        Some(raw) => {
            let id = raw.parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(|| {
                ApiError::bad_request(format!("query user_id: {raw:?} is not a positive integer"))
            })?;
            let mut stmt = db.prepare(&format!(
                "SELECT {TODO_COLUMNS} FROM todos WHERE user_id = ?1 ORDER BY id"
            ))?;
            stmt.query_map([id], todo_row)?
                .collect::<rusqlite::Result<_>>()?
        }
        None => {
            let mut stmt = db.prepare(&format!("SELECT {TODO_COLUMNS} FROM todos ORDER BY id"))?;
            stmt.query_map([], todo_row)?
                .collect::<rusqlite::Result<_>>()?
        }
    };
    ok(
        StatusCode::OK,
        json!({"success": true, "count": todos.len(), "todos": todos.iter().map(Todo::json).collect::<Vec<_>>()}),
    )
}

async fn complete_todo(State(app): State<App>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id("id", &id)?;
    let completed_at = shared::now_rfc3339();
    let (mut todo, user) = {
        let db = app.db();
        let todo = find_todo(&db, id)?
            .ok_or_else(|| ApiError::not_found(format!("todo {id} does not exist")))?;
        let user = find_user(&db, todo.user_id)?
            .ok_or_else(|| ApiError::not_found(format!("user {} does not exist", todo.user_id)))?;
        // The condition makes two concurrent completions publish one event.
        let changed = db.execute(
            "UPDATE todos SET completed_at = ?1 WHERE id = ?2 AND completed_at IS NULL",
            params![completed_at, id],
        )?;
        if changed == 0 {
            let at = find_todo(&db, id)?
                .and_then(|t| t.completed_at)
                .unwrap_or_default();
            return Err(ApiError::conflict(format!(
                "todo {id} is already completed (at {at})"
            )));
        }
        (todo, user)
    };
    todo.completed_at = Some(completed_at);
    if let Err(e) = app
        .client
        .publish_json(TODO_COMPLETED, &todo.event(&user))
        .await
    {
        // Undo, so the user can retry and the event is not lost.
        app.db()
            .execute("UPDATE todos SET completed_at = NULL WHERE id = ?1", [id])?;
        return Err(e.into());
    }
    // A todo completed before its reminder ran gets no reminder.
    let reminder = match &todo.reminder_job_id {
        None => "none",
        Some(job_id) => match app.client.cancel_job(job_id).await {
            Ok(_) => "cancelled",
            // Leased (being sent right now) or finished: too late to cancel.
            Err(e)
                if matches!(
                    e.code(),
                    Some(tonic::Code::FailedPrecondition | tonic::Code::NotFound)
                ) =>
            {
                "already_sent"
            }
            // The todo is completed and its event published; only the cancel failed.
            Err(e) => {
                tracing::warn!(todo_id = id, error = %e, "cannot cancel the reminder");
                "cancel_failed"
            }
        },
    };
    tracing::info!(todo_id = id, reminder, "todo completed");
    ok(
        StatusCode::OK,
        json!({
            "success": true,
            "todo": todo.json(),
            "reminder": reminder,
            "message": "Todo completed, achievement notification queued",
        }),
    )
}

/// The overdue todos (not completed, due before now) with their users, oldest due first.
fn overdue_rows(app: &App) -> Result<Vec<(Todo, User)>, ApiError> {
    Ok({
        let db = app.db();
        let mut stmt = db.prepare(&format!(
            "SELECT {TODO_COLUMNS} FROM todos
             WHERE completed_at IS NULL AND due_at IS NOT NULL AND due_at < ?1 ORDER BY due_at"
        ))?;
        let todos: Vec<Todo> = stmt
            .query_map([now_unix()], todo_row)?
            .collect::<rusqlite::Result<_>>()?;
        let mut rows = Vec::with_capacity(todos.len());
        for todo in todos {
            if let Some(user) = find_user(&db, todo.user_id)? {
                rows.push((todo, user));
            }
        }
        rows
    })
}

/// `GET /todos/overdue`: a read. The overdue scan publishes the events.
async fn overdue_todos(State(app): State<App>) -> ApiResult {
    let rows = overdue_rows(&app)?;
    let notified = rows.iter().filter(|(t, _)| t.overdue_notified).count();
    ok(
        StatusCode::OK,
        json!({
            "success": true,
            "count": rows.len(),
            "todos": rows.iter().map(|(t, _)| t.json()).collect::<Vec<_>>(),
            "message": format!("{} overdue todo(s), {notified} already notified", rows.len()),
        }),
    )
}

/// The overdue scan (one `todo.overdue-scan` job): publishes `todo.overdue` for each
/// overdue todo not notified yet, then marks it, so each todo gets one event however
/// often the scan runs. Returns how many it published.
async fn scan_overdue(app: &App) -> Result<usize, ApiError> {
    let mut published = 0;
    for (todo, user) in overdue_rows(app)? {
        if todo.overdue_notified {
            continue;
        }
        app.client
            .publish_json(TODO_OVERDUE, &todo.event(&user))
            .await?;
        app.db().execute(
            "UPDATE todos SET overdue_notified = 1 WHERE id = ?1",
            [todo.id],
        )?;
        published += 1;
    }
    Ok(published)
}

/// Registers the overdue scan's schedule (idempotently: creates it, or brings it to this
/// interval), then consumes its queue until shutdown.
async fn run_overdue_scans(app: App, every: Duration) -> Result<(), ClientError> {
    app.client
        .upsert_schedule(
            ScheduleSpec::every(every)
                .name(OVERDUE_SCAN_SCHEDULE)
                .queue(MAINTENANCE)
                .kind(OVERDUE_SCAN)
                .skip_overlap(),
        )
        .await?;
    let consumer = format!("todo-app-{}", std::process::id());
    let scanner = app.clone();
    let report = Worker::new(app.client.clone(), MAINTENANCE)
        .consumer(consumer)
        .handle(OVERDUE_SCAN, Raw, move |_job: JobContext<Bytes>| {
            let app = scanner.clone();
            async move {
                match scan_overdue(&app).await {
                    Ok(n) => {
                        tracing::info!(published = n, "overdue scan done");
                        Ok(Done::new())
                    }
                    Err(e) => Err(JobError::retry(e.message)),
                }
            }
        })
        .run(shared::shutdown_signal())
        .await?;
    tracing::info!(?report, "overdue scanner stopped");
    Ok(())
}

async fn queue_status(State(app): State<App>) -> ApiResult {
    let stats = app.client.stats().await?;
    let queues: serde_json::Map<String, Value> = stats
        .queues
        .iter()
        .map(|q| {
            (
                q.name.clone(),
                json!({
                    "pending": q.pending,
                    "scheduled": q.scheduled,
                    "processing": q.leased,
                    "retrying": q.retrying,
                    "completed": q.completed,
                    "failed": q.failed,
                    "dead": q.dead,
                    "cancelled": q.cancelled,
                    "enqueued": q.enqueued,
                    "consumers": q.consumers,
                    "oldest_pending_age_ms": q.oldest_pending_age_ms,
                    "paused": q.paused,
                }),
            )
        })
        .collect();
    let topics: serde_json::Map<String, Value> = stats
        .topics
        .iter()
        // Request/reply inboxes are private and short-lived.
        .filter(|t| !t.name.starts_with("_inbox."))
        .map(|t| {
            (
                t.name.clone(),
                json!({"published": t.published, "last_sequence": t.last_sequence, "subscribers": t.subscribers}),
            )
        })
        .collect();
    // Workers that leased from each queue in the last 60 s, as the broker counts them.
    let workers: serde_json::Map<String, Value> = stats
        .queues
        .iter()
        .filter(|q| q.name == EMAILS || q.name == NOTIFICATIONS)
        .map(|q| (q.name.clone(), json!(q.consumers)))
        .collect();
    ok(
        StatusCode::OK,
        json!({"success": true, "queues": queues, "topics": topics, "workers": workers}),
    )
}

fn job_state(state: i32) -> String {
    sluice::client::job_state_name(state).unwrap_or_else(|| format!("unknown({state})"))
}

fn job_json(job: &pb::Job) -> Value {
    let time = |ms: u64| (ms > 0).then(|| shared::rfc3339(UNIX_EPOCH + Duration::from_millis(ms)));
    json!({
        "id": job.id,
        "queue": job.queue,
        "kind": job.kind,
        "state": job_state(job.state),
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "consumer": job.consumer,
        "last_error": (!job.last_error.is_empty()).then_some(&job.last_error),
        "result": (!job.result.is_empty()).then(|| String::from_utf8_lossy(&job.result).into_owned()),
        "dead_letter_queue": (!job.dead_letter_queue.is_empty()).then_some(&job.dead_letter_queue),
        "enqueued_at": time(job.enqueued_at_unix_ms),
        "finished_at": time(job.finished_at_unix_ms),
    })
}

#[derive(Debug, serde::Deserialize)]
struct HistoryQuery {
    queue: Option<String>,
    limit: Option<String>,
}

async fn jobs_history(State(app): State<App>, Query(q): Query<HistoryQuery>) -> ApiResult {
    let limit = match q.limit {
        None => 50,
        Some(raw) => raw
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "query limit: {raw:?} is not an integer in 1..=1000"
                ))
            })?,
    };
    let queues = match q.queue {
        Some(name) => vec![name],
        None => vec![EMAILS.to_owned(), NOTIFICATIONS.to_owned()],
    };
    let mut jobs = Vec::new();
    for queue in &queues {
        let request = pb::JobHistoryRequest {
            queue: queue.clone(),
            limit,
        };
        match app.client.rpc().job_history(request).await {
            Ok(r) => jobs.extend(r.into_inner().jobs),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) if s.code() == tonic::Code::InvalidArgument => {
                return Err(ApiError::bad_request(format!(
                    "query queue: {}",
                    s.message()
                )));
            }
            Err(s) => return Err(ClientError::from(s).into()),
        }
    }
    jobs.sort_by_key(|j| std::cmp::Reverse(j.finished_at_unix_ms));
    jobs.truncate(limit as usize);
    ok(
        StatusCode::OK,
        json!({"success": true, "count": jobs.len(), "jobs": jobs.iter().map(job_json).collect::<Vec<_>>()}),
    )
}

async fn workers(State(app): State<App>) -> ApiResult {
    let mut out = serde_json::Map::new();
    let mut total = 0;
    for queue in [EMAILS, NOTIFICATIONS] {
        let request = pb::ListConsumersRequest {
            queue: queue.to_owned(),
        };
        let consumers = match app.client.rpc().list_consumers(request).await {
            Ok(r) => r.into_inner().consumers,
            Err(s) if s.code() == tonic::Code::NotFound => Vec::new(),
            Err(s) => return Err(ClientError::from(s).into()),
        };
        total += consumers.len();
        let list: Vec<Value> = consumers
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "address": c.address,
                    "leases_held": c.leases_held,
                    "done": c.done,
                    "failed": c.failed,
                    "last_seen": shared::rfc3339(UNIX_EPOCH + Duration::from_millis(c.last_seen_unix_ms)),
                })
            })
            .collect();
        out.insert(queue.to_owned(), Value::Array(list));
    }
    ok(
        StatusCode::OK,
        json!({"success": true, "count": total, "workers": out}),
    )
}

async fn user_notifications(State(app): State<App>, Path(id): Path<String>) -> ApiResult {
    let id = parse_id("id", &id)?;
    let db = app.db();
    if find_user(&db, id)?.is_none() {
        return Err(ApiError::not_found(format!("user {id} does not exist")));
    }
    let mut stmt = db.prepare(
        "SELECT id, todo_id, title, message, channel, delivered_at FROM notifications
         WHERE user_id = ?1 ORDER BY received_at, id",
    )?;
    let list: Vec<Value> = stmt
        .query_map([id], |row| {
            Ok(json!({
                "id": row.get::<_, String>(0)?,
                "todo_id": row.get::<_, i64>(1)?,
                "title": row.get::<_, String>(2)?,
                "message": row.get::<_, String>(3)?,
                "channel": row.get::<_, String>(4)?,
                "delivered_at": row.get::<_, String>(5)?,
            }))
        })?
        .collect::<rusqlite::Result<_>>()?;
    ok(
        StatusCode::OK,
        json!({"success": true, "user_id": id, "count": list.len(), "notifications": list}),
    )
}

async fn healthz() -> ApiResult {
    ok(StatusCode::OK, json!({"success": true}))
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see the README section \"Example system\"")
}

/// Stores every `notification.delivered` message once, resuming after the last stored
/// sequence across restarts.
async fn store_notifications(app: App) {
    loop {
        let next: Option<i64> = app
            .db()
            .query_row(
                "SELECT next_sequence FROM subscription_offsets WHERE topic = ?1",
                [NOTIFICATION_DELIVERED],
                |row| row.get(0),
            )
            .optional()
            .unwrap_or(None);
        let subscribe = app.client.subscribe(NOTIFICATION_DELIVERED);
        let subscribe = match next {
            Some(seq) => subscribe.resume_from(NOTIFICATION_DELIVERED, seq.max(1) as u64),
            None => subscribe.start(StartAt::Earliest),
        };
        let mut stream = match subscribe.json::<Notification>().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot subscribe to {NOTIFICATION_DELIVERED}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(item) = stream.next().await {
            let delivery = match item {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a notification message");
                    continue;
                }
            };
            // Stored in a consumer span, child of the notification worker's handling.
            let span = delivery.span();
            let _in_span = span.enter();
            let n = delivery.value;
            let db = app.db();
            let stored = db
                .execute(
                    "INSERT OR IGNORE INTO notifications
                     (id, user_id, todo_id, title, message, channel, delivered_at, received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        n.id,
                        n.user_id,
                        n.todo_id,
                        n.title,
                        n.message,
                        n.channel,
                        n.delivered_at,
                        shared::now_rfc3339()
                    ],
                )
                .and_then(|_| {
                    db.execute(
                        "INSERT INTO subscription_offsets (topic, next_sequence) VALUES (?1, ?2)
                         ON CONFLICT(topic) DO UPDATE SET next_sequence = excluded.next_sequence",
                        params![NOTIFICATION_DELIVERED, (delivery.sequence + 1) as i64],
                    )
                });
            if let Err(e) = stored {
                tracing::error!(error = %e, "cannot store notification");
            }
        }
        tracing::warn!("{NOTIFICATION_DELIVERED} subscription ended; resubscribing");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn router(app: App) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/users", post(create_user))
        .route("/users/{id}", get(get_user))
        .route("/users/{id}/notifications", get(user_notifications))
        .route("/todos", post(create_todo).get(list_todos))
        .route("/todos/overdue", get(overdue_todos))
        .route("/todos/{id}/complete", put(complete_todo))
        .route("/queue/status", get(queue_status))
        .route("/jobs/history", get(jobs_history))
        .route("/workers", get(workers))
        .route_layer(axum::middleware::from_fn(traced))
        .fallback(not_found)
        .with_state(app)
}

/// Runs a request in a server span named after its route (`POST /users`), child of the
/// caller's W3C `traceparent` header if it sends one: the events and jobs the request
/// produces carry this span's trace to the broker and the workers.
async fn traced(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use sluice::client::trace::{TRACEPARENT, TRACESTATE};
    use tracing::Instrument as _;
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(
            || request.uri().path().to_owned(),
            |p| p.as_str().to_owned(),
        );
    let method = request.method().as_str().to_owned();
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
    );
    let carrier = [TRACEPARENT, TRACESTATE]
        .into_iter()
        .filter_map(|name| {
            let value = request.headers().get(name)?.to_str().ok()?;
            Some((name.to_owned(), value.to_owned()))
        })
        .collect();
    sluice::client::trace::set_remote_parent(&span, sluice::client::trace::extract(&carrier));
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

/// The JSON Schemas of the events this app publishes (`examples/schemas/`): the broker
/// refuses a malformed event with the path of the bad field, so no worker ever sees one.
const EVENT_SCHEMAS: [(&str, &str); 3] = [
    (
        USER_REGISTERED,
        include_str!("../schemas/user.registered.json"),
    ),
    (
        TODO_COMPLETED,
        include_str!("../schemas/todo.completed.json"),
    ),
    (TODO_OVERDUE, include_str!("../schemas/todo.overdue.json")),
];

/// Sets [`EVENT_SCHEMAS`] on their topics. Idempotent: the broker makes a new revision
/// only when a schema's text changed, so every start may run it. A token without `admin`
/// on a topic leaves its schema to an operator (`sluice schema set`): a warning, not a
/// failed start.
async fn set_event_schemas(client: &sluice::client::Client) -> Result<(), ClientError> {
    for (topic, schema) in EVENT_SCHEMAS {
        let set = match client.topic_schema(topic).set_json_schema(schema).await {
            Ok(set) => set,
            Err(e) if e.code() == Some(tonic::Code::PermissionDenied) => {
                tracing::warn!(topic, error = %e, "event schema not set: this token may not admin the topic");
                continue;
            }
            Err(e) => return Err(e),
        };
        tracing::info!(
            topic,
            revision = set.revision,
            new = set.created,
            "event schema"
        );
    }
    Ok(())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    shared::process_main("todo_app", run).await
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let db = open_db(&args.db).map_err(|e| format!("TODO_DB {}: {e}", args.db.display()))?;
    let client = shared::join_system(&args.broker).await?;
    set_event_schemas(&client).await?;
    let app = App {
        db: Arc::new(Mutex::new(db)),
        client,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("TODO_LISTEN {}: {e}", args.listen))?;
    let subscriber = tokio::spawn(store_notifications(app.clone()));
    let every = Duration::from_millis(args.overdue_scan_ms);
    let scans = tokio::spawn({
        let app = app.clone();
        async move {
            if let Err(e) = run_overdue_scans(app, every).await {
                tracing::error!(error = %e, "the overdue scan stopped");
            }
        }
    });
    tracing::info!(listen = %listener.local_addr()?, db = %args.db.display(), "todo app listening");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(shared::shutdown_signal())
        .await?;
    subscriber.abort();
    let _ = scans.await;
    Ok(())
}
