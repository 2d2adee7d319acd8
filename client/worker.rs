//! The [`Worker`] runner: typed handlers per job `kind`, lease extension, retries,
//! dead-lettering and graceful drain.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::client::codec::{Codec, Json, Protobuf};
use crate::client::error::{ClientError, Result};
use crate::client::retry::Reconnect;
use crate::client::{Client, Consumer, Lease};
use crate::pb;

/// Most handlers one worker may run at once.
pub const MAX_CONCURRENCY: usize = 10_000;
/// Shortest visibility timeout the worker accepts: extension happens at half of it, and a
/// shorter period would spend the lease on round trips.
pub const MIN_VISIBILITY_TIMEOUT: Duration = Duration::from_millis(200);
/// Longest lease the broker grants.
pub const MAX_VISIBILITY_TIMEOUT: Duration = Duration::from_secs(12 * 3600);

/// The successful outcome of a handler, with an optional result stored with the job
/// (shown by `GetJob` and `JobHistory`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Done {
    result: Bytes,
}

impl Done {
    /// Done, without a result.
    pub fn new() -> Self {
        Self::default()
    }

    /// Done, storing `result` with the job.
    pub fn with_result(result: impl Into<Bytes>) -> Self {
        Self {
            result: result.into(),
        }
    }

    /// Done, storing `value` as JSON with the job.
    pub fn json<T: serde::Serialize>(value: &T) -> Self {
        // A value that cannot be serialized (a map with non-string keys, say) is a bug in
        // the handler; the job still succeeded, so it is acked with the error as its result.
        let result = serde_json::to_vec(value)
            .unwrap_or_else(|e| format!("result not serializable: {e}").into_bytes());
        Self::with_result(result)
    }

    /// The stored result (empty when none).
    pub fn result(&self) -> &Bytes {
        &self.result
    }
}

impl From<()> for Done {
    fn from((): ()) -> Self {
        Self::new()
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Retry per the queue's backoff policy (dead-letter after the last attempt).
    Retry,
    /// Retry after this delay instead of the policy's.
    RetryAfter(Duration),
    /// Dead-letter now: retrying cannot succeed (bad input, rejected address...).
    Permanent,
}

/// A handler's failure. Any `std::error::Error` converts into a retryable `JobError`, so
/// handlers can use `?`; use [`JobError::permanent`] for failures a retry cannot fix.
pub struct JobError {
    message: String,
    failure: Failure,
}

impl JobError {
    /// A failure that retries per the queue's backoff policy.
    pub fn retry(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            failure: Failure::Retry,
        }
    }

    /// A failure that retries after `delay`.
    pub fn retry_after(message: impl Into<String>, delay: Duration) -> Self {
        Self {
            message: message.into(),
            failure: Failure::RetryAfter(delay),
        }
    }

    /// A failure that dead-letters the job at once.
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            failure: Failure::Permanent,
        }
    }

    /// The error text (stored as the job's last error).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// What happens to the job.
    pub fn failure(&self) -> Failure {
        self.failure
    }

    /// Whether the job is dead-lettered at once.
    pub fn is_permanent(&self) -> bool {
        self.failure == Failure::Permanent
    }
}

impl<E: std::error::Error> From<E> for JobError {
    fn from(e: E) -> Self {
        Self::retry(e.to_string())
    }
}

impl fmt::Debug for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobError({:?}, {:?})", self.failure, self.message)
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// A leased job handed to a handler, with its payload decoded as `T`.
#[derive(Debug, Clone)]
pub struct JobContext<T> {
    /// The decoded payload.
    pub value: T,
    job: pb::LeasedJob,
}

impl<T> JobContext<T> {
    /// The job id.
    pub fn job_id(&self) -> &str {
        &self.job.job_id
    }

    /// The job type (for topic-bound queues: the topic the event was published to).
    pub fn kind(&self) -> &str {
        &self.job.kind
    }

    /// The queue it was leased from.
    pub fn queue(&self) -> &str {
        &self.job.queue
    }

    /// Which delivery this is, from 1.
    pub fn attempt(&self) -> u32 {
        self.job.attempt
    }

    /// Deliveries allowed before dead-lettering.
    pub fn max_attempts(&self) -> u32 {
        self.job.max_attempts
    }

    /// Whether a retryable failure now dead-letters the job.
    pub fn is_last_attempt(&self) -> bool {
        self.job.attempt >= self.job.max_attempts
    }

    /// The job's headers.
    pub fn headers(&self) -> &HashMap<String, String> {
        &self.job.headers
    }

    /// The raw payload.
    pub fn payload(&self) -> &Bytes {
        &self.job.payload
    }
}

/// What to do with a job whose `kind` has no handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownKind {
    /// Nack it: it retries with backoff (another worker may know the kind) and
    /// dead-letters after its last attempt. The default.
    #[default]
    Retry,
    /// Dead-letter it at once.
    DeadLetter,
}

/// Counters of a finished [`Worker::run`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Jobs acked.
    pub completed: u64,
    /// Jobs nacked for a retry (handler errors, panics, unknown kinds).
    pub retried: u64,
    /// Jobs dead-lettered by the worker (permanent errors, undecodable payloads) or by the
    /// broker (a retryable failure on the last attempt).
    pub dead_lettered: u64,
    /// Jobs still running at the end of the drain, aborted and released.
    pub released: u64,
    /// Acks, nacks or extensions the broker refused because the lease was stale (the job
    /// was redelivered elsewhere after this worker lost its lease).
    pub lost_leases: u64,
}

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    released: AtomicU64,
    lost_leases: AtomicU64,
}

impl Counters {
    fn report(&self) -> WorkerReport {
        WorkerReport {
            completed: self.completed.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            released: self.released.load(Ordering::Relaxed),
            lost_leases: self.lost_leases.load(Ordering::Relaxed),
        }
    }
}

type HandlerFuture = Pin<Box<dyn Future<Output = std::result::Result<Done, JobError>> + Send>>;

/// A handler with its payload type erased.
trait ErasedHandler: Send + Sync {
    /// Decodes the payload and starts the handler; a decode error is a permanent failure.
    fn start(&self, job: pb::LeasedJob) -> std::result::Result<HandlerFuture, JobError>;
}

struct TypedHandler<T, C, F> {
    codec: C,
    f: F,
    _payload: PhantomData<fn() -> T>,
}

impl<T, C, F, Fut, R> ErasedHandler for TypedHandler<T, C, F>
where
    T: Send + 'static,
    C: Codec<T>,
    F: Fn(JobContext<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<R, JobError>> + Send + 'static,
    R: Into<Done>,
{
    fn start(&self, job: pb::LeasedJob) -> std::result::Result<HandlerFuture, JobError> {
        let context = format!("job {} (kind {:?})", job.job_id, job.kind);
        let value = self
            .codec
            .decode(&job.payload, &context)
            .map_err(|e| JobError::permanent(e.to_string()))?;
        let fut = (self.f)(JobContext { value, job });
        Ok(Box::pin(async move { fut.await.map(Into::into) }))
    }
}

/// Leases jobs from one queue and runs typed handlers per job `kind`.
///
/// ```no_run
/// # async fn demo() -> sluice::client::Result<()> {
/// use std::time::Duration;
/// use sluice::client::{Client, Done, JobError, Worker};
///
/// #[derive(serde::Serialize, serde::Deserialize)]
/// struct Welcome { email: String }
///
/// let client = Client::connect("http://127.0.0.1:50051").await?;
/// let worker = Worker::new(client, "emails")
///     .consumer("email-worker-1")
///     .concurrency(3)
///     .handle_json("user.registered", |job: sluice::client::JobContext<Welcome>| async move {
///         if job.value.email.is_empty() {
///             // Retrying cannot help: dead-letter at once.
///             return Err(JobError::permanent("field email: empty"));
///         }
///         Ok(Done::new())
///     });
/// let report = worker.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
/// println!("{report:?}");
/// # Ok(()) }
/// ```
///
/// Semantics, in the order a delivery sees them:
///
/// * **Delivery.** The worker holds one `Consume` stream (see
///   [`crate::client::Client::consume`]) with a credit of `concurrency`: the broker pushes a
///   job whenever a handler slot is free and the queue has one, with no polling and no
///   round trip per job; acks travel back on the same stream. If the stream fails, the
///   worker reopens it with backoff. The `consumer` name is shown by `ListConsumers`.
/// * **Routing.** A job goes to the handler registered for its `kind`. A job whose kind has
///   no handler is nacked with an error naming the kind and the known kinds, so it retries
///   with backoff and dead-letters after `max_attempts` (a newer worker that knows the kind
///   may pick it up meanwhile, as in a rolling deploy); [`UnknownKind::DeadLetter`] sends it
///   to the dead-letter queue at once instead.
/// * **Decoding.** A payload that does not decode as the handler's type is dead-lettered at
///   once: a retry would decode the same bytes the same way.
/// * **Extension.** While a handler runs, its lease is extended every
///   `visibility_timeout / 2` by `visibility_timeout`, so a long job keeps its lease and a
///   crashed worker's job is redelivered at most one visibility timeout after the crash.
///   If an extension finds the lease stale (it expired during a long pause and the job went
///   to another worker), the handler is aborted: its ack would be refused anyway, and the
///   job's new holder does the work.
/// * **Settling.** `Ok(Done)` acks (storing the optional result); `Err(JobError)` nacks
///   with the error text so the queue's backoff and dead-letter policy apply;
///   [`JobError::permanent`] dead-letters at once; [`JobError::retry_after`] retries after
///   an explicit delay. A handler that panics is nacked like an error. Delivery is
///   at-least-once: if the ack itself is lost (the connection drops), the lease expires and
///   the job runs again, so handlers should be idempotent (the job id is a good key).
/// * **Shutdown.** When the shutdown future resolves the worker asks the broker to stop
///   pushing jobs, lets running handlers finish (their acks still go on the stream) for up
///   to `drain_timeout`, then aborts the rest and nacks them with a short retry delay so
///   another worker takes them at once. Closing the stream then releases any job pushed
///   but not started. A released job's attempt counts as failed.
#[must_use = "a worker does nothing until .run() is awaited"]
pub struct Worker {
    client: Client,
    queue: String,
    consumer: String,
    concurrency: usize,
    visibility_timeout: Duration,
    drain_timeout: Duration,
    unknown_kind: UnknownKind,
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
}

impl fmt::Debug for Worker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut kinds: Vec<_> = self.handlers.keys().collect();
        kinds.sort();
        f.debug_struct("Worker")
            .field("queue", &self.queue)
            .field("consumer", &self.consumer)
            .field("concurrency", &self.concurrency)
            .field("visibility_timeout", &self.visibility_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("unknown_kind", &self.unknown_kind)
            .field("kinds", &kinds)
            .finish()
    }
}

impl Worker {
    /// A worker for `queue` with defaults: concurrency 1, a 30 s visibility timeout, a 10 s
    /// drain, consumer name
    /// `<hostname-or-"worker">-<pid>`.
    pub fn new(client: Client, queue: impl Into<String>) -> Self {
        Self {
            client,
            queue: queue.into(),
            consumer: default_consumer_name(),
            concurrency: 1,
            visibility_timeout: Duration::from_secs(30),
            drain_timeout: Duration::from_secs(10),
            unknown_kind: UnknownKind::default(),
            handlers: HashMap::new(),
        }
    }

    /// The consumer name sent with every lease (shown by `ListConsumers`).
    pub fn consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = name.into();
        self
    }

    /// How many handlers run at once (1 to [`MAX_CONCURRENCY`]).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Lease duration; leases are extended at half of it while a handler runs
    /// ([`MIN_VISIBILITY_TIMEOUT`] to 12 h).
    pub fn visibility_timeout(mut self, d: Duration) -> Self {
        self.visibility_timeout = d;
        self
    }

    /// How long running handlers may take to finish after shutdown before they are aborted
    /// and their jobs released.
    pub fn drain_timeout(mut self, d: Duration) -> Self {
        self.drain_timeout = d;
        self
    }

    /// What to do with jobs of a kind that has no handler (default: retry).
    pub fn unknown_kind(mut self, policy: UnknownKind) -> Self {
        self.unknown_kind = policy;
        self
    }

    /// Registers `handler` for jobs of `kind`, decoding payloads with `codec`. A later
    /// registration for the same kind replaces the earlier one.
    ///
    /// The handler returns `Ok(r)` with `r: Into<Done>` (`()` or a [`Done`] with a result)
    /// or `Err(JobError)`; `?` converts any `std::error::Error` into a retryable one.
    pub fn handle<T, C, F, Fut, R>(mut self, kind: impl Into<String>, codec: C, handler: F) -> Self
    where
        T: Send + 'static,
        C: Codec<T>,
        F: Fn(JobContext<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, JobError>> + Send + 'static,
        R: Into<Done> + 'static,
    {
        let typed = TypedHandler {
            codec,
            f: handler,
            _payload: PhantomData,
        };
        self.handlers.insert(kind.into(), Arc::new(typed));
        self
    }

    /// Registers a handler for `kind` whose payload is JSON decoded as `T`.
    pub fn handle_json<T, F, Fut, R>(self, kind: impl Into<String>, handler: F) -> Self
    where
        T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static,
        F: Fn(JobContext<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, JobError>> + Send + 'static,
        R: Into<Done> + 'static,
    {
        self.handle(kind, Json, handler)
    }

    /// Registers a handler for `kind` whose payload is a protobuf message `T`.
    pub fn handle_protobuf<T, F, Fut, R>(self, kind: impl Into<String>, handler: F) -> Self
    where
        T: prost::Message + Default + Send + 'static,
        F: Fn(JobContext<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<R, JobError>> + Send + 'static,
        R: Into<Done> + 'static,
    {
        self.handle(kind, Protobuf, handler)
    }

    fn check(&self) -> Result<()> {
        let bad = |field: &str, limit: String, value: String| {
            Err(ClientError::Config(format!(
                "worker {field}: {value} is outside the allowed range {limit}"
            )))
        };
        if !(1..=MAX_CONCURRENCY).contains(&self.concurrency) {
            return bad(
                "concurrency",
                format!("1..={MAX_CONCURRENCY}"),
                self.concurrency.to_string(),
            );
        }
        if !(MIN_VISIBILITY_TIMEOUT..=MAX_VISIBILITY_TIMEOUT).contains(&self.visibility_timeout) {
            return bad(
                "visibility_timeout",
                format!("{MIN_VISIBILITY_TIMEOUT:?}..={MAX_VISIBILITY_TIMEOUT:?}"),
                format!("{:?}", self.visibility_timeout),
            );
        }
        if self.handlers.is_empty() {
            return Err(ClientError::Config(
                "worker handlers: none registered; add one with .handle(kind, codec, f)".into(),
            ));
        }
        Ok(())
    }

    /// Runs until `shutdown` resolves, then drains, and returns what it did (see
    /// [`Worker`] for the semantics). Fails at once on a bad configuration, and on errors the broker
    /// will keep answering the same way (an invalid queue name, say); connection losses
    /// are retried with backoff.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send) -> Result<WorkerReport> {
        self.check()?;
        let abort = CancellationToken::new();
        let shared = Arc::new(Shared {
            handlers: self.handlers,
            unknown_kind: self.unknown_kind,
            visibility_timeout: self.visibility_timeout,
            counters: Counters::default(),
            abort: abort.clone(),
        });
        let mut running = JoinSet::new();
        let mut reconnect = Reconnect::new(RECONNECT_FIRST_DELAY, RECONNECT_MAX_DELAY);
        let mut consumer: Option<Consumer> = None;

        tokio::pin!(shutdown);
        let consume_result: Result<()> = loop {
            // Reap finished jobs so the set does not grow with the worker's lifetime.
            while running.try_join_next().is_some() {}

            let stream = match consumer.as_mut() {
                Some(stream) => stream,
                None => {
                    // The credit is the concurrency: the broker never pushes more jobs
                    // than there are free handler slots.
                    let open = self
                        .client
                        .consume(&self.queue)
                        .prefetch(self.concurrency as u32)
                        .visibility_timeout(self.visibility_timeout)
                        .consumer(self.consumer.clone())
                        .open();
                    let opened = tokio::select! {
                        r = open => r,
                        () = &mut shutdown => break Ok(()),
                    };
                    match opened {
                        Ok(stream) => {
                            if let Some(cause) = reconnect.succeeded() {
                                tracing::info!(queue = %self.queue, after = %cause, "consume stream open again");
                            }
                            consumer.insert(stream)
                        }
                        Err(e) if is_fatal(&e) => break Err(e),
                        Err(e) => {
                            let delay = retry_later(
                                &self.queue,
                                &mut reconnect,
                                &e,
                                "consume stream failed to open",
                            );
                            tokio::select! {
                                () = tokio::time::sleep(delay) => {}
                                () = &mut shutdown => break Ok(()),
                            }
                            continue;
                        }
                    }
                }
            };
            let next = tokio::select! {
                next = stream.next() => next,
                () = &mut shutdown => break Ok(()),
            };
            match next {
                Some(Ok(lease)) => {
                    let shared = shared.clone();
                    // Each job is handled in a consumer span, child of the trace context
                    // the job carries (the producer's, or the broker's when it traces).
                    let span = lease.span();
                    running.spawn(async move { shared.process(lease).await }.instrument(span));
                }
                Some(Err(ClientError::Refused {
                    lease_id, message, ..
                })) => {
                    // An ack the broker refused (the lease went stale first): the job was
                    // or will be run again by whoever holds it now.
                    tracing::warn!(lease_id = %lease_id, error = %message, "ack refused");
                    shared.counters.completed.fetch_sub(1, Ordering::Relaxed);
                    shared.counters.lost_leases.fetch_add(1, Ordering::Relaxed);
                }
                Some(Err(e)) if is_fatal(&e) => break Err(e),
                ended => {
                    let delay = match ended {
                        Some(Err(e)) => {
                            retry_later(&self.queue, &mut reconnect, &e, "consume stream failed")
                        }
                        _ => {
                            reconnect
                                .failed("the broker ended the consume stream".into())
                                .delay
                        }
                    };
                    consumer = None;
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = &mut shutdown => break Ok(()),
                    }
                }
            }
        };
        // Keep the stream for the running handlers' acks, but take no more jobs.
        if let Some(stream) = &consumer {
            stream.stop_delivery();
        }

        // Drain: let running handlers finish, then abort and release what is left.
        let drained = tokio::time::timeout(self.drain_timeout, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::info!(
                queue = %self.queue,
                remaining = running.len(),
                "drain timeout reached; releasing unfinished jobs"
            );
            abort.cancel();
            while running.join_next().await.is_some() {}
        }
        // Closing the stream releases jobs that were pushed but never started.
        drop(consumer);
        consume_result?;
        Ok(shared.counters.report())
    }
}

/// The first wait before reopening a consume stream that failed.
const RECONNECT_FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between attempts to reopen it (a broker that is down for long is
/// retried this often).
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(5);

/// Records a failure to consume from `queue` and returns how long to wait before the next
/// attempt. Logs at WARN when the cause is new (the broker went away, or fails in a new
/// way) and at DEBUG while it stays the same, so a broker that is down for minutes costs
/// one warning, not one per attempt.
fn retry_later(queue: &str, reconnect: &mut Reconnect, e: &ClientError, what: &str) -> Duration {
    let cause = e.root_cause();
    let failed = reconnect.failed(cause.clone());
    let retry_in = format!("{:?}", failed.delay);
    if failed.new_cause {
        tracing::warn!(queue, %cause, %retry_in, "{what}; retrying with backoff");
    } else {
        tracing::debug!(queue, %cause, %retry_in, "{what}; retrying");
    }
    failed.delay
}

/// Errors that a retry of the same Lease request cannot fix.
fn is_fatal(e: &ClientError) -> bool {
    matches!(
        e.code(),
        Some(
            tonic::Code::InvalidArgument
                | tonic::Code::PermissionDenied
                | tonic::Code::Unauthenticated
                | tonic::Code::Unimplemented
        )
    )
}

fn default_consumer_name() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    format!("{host}-{}", std::process::id())
}

/// State every job task shares.
struct Shared {
    handlers: HashMap<String, Arc<dyn ErasedHandler>>,
    unknown_kind: UnknownKind,
    visibility_timeout: Duration,
    counters: Counters,
    abort: CancellationToken,
}

/// How one delivery ended, before it is reported to the broker.
enum Settle {
    Ack(Done),
    Fail(JobError),
    Release,
}

impl Shared {
    /// Runs one delivery to its end: handler, extensions, ack or nack.
    async fn process(&self, mut lease: Lease) {
        let settle = match self.handlers.get(lease.kind()) {
            None => {
                let mut known: Vec<_> = self.handlers.keys().map(String::as_str).collect();
                known.sort_unstable();
                let message = format!(
                    "no handler for job kind {:?} on this worker (handled kinds: {})",
                    lease.kind(),
                    known.join(", ")
                );
                Settle::Fail(match self.unknown_kind {
                    UnknownKind::Retry => JobError::retry(message),
                    UnknownKind::DeadLetter => JobError::permanent(message),
                })
            }
            Some(handler) => match handler.start(lease.job().clone()) {
                Err(e) => Settle::Fail(e),
                Ok(fut) => self.supervise(&mut lease, fut).await,
            },
        };
        self.settle(lease, settle).await;
    }

    /// Runs the handler in its own task (so a panic is caught) while extending the lease.
    async fn supervise(&self, lease: &mut Lease, fut: HandlerFuture) -> Settle {
        // A spawned task starts outside every span: it is put back in the job's.
        let mut task = tokio::spawn(fut.in_current_span());
        let period = self.visibility_timeout / 2;
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                joined = &mut task => {
                    return match joined {
                        Ok(Ok(done)) => Settle::Ack(done),
                        Ok(Err(e)) => Settle::Fail(e),
                        Err(e) => Settle::Fail(JobError::retry(format!("handler panicked: {e}"))),
                    };
                }
                _ = ticks.tick() => {
                    if let Err(e) = lease.extend(self.visibility_timeout).await {
                        // A stale lease cannot come back; the handler's work will be redone
                        // by whoever holds the job now, so its ack would be refused anyway.
                        tracing::warn!(job_id = %lease.job_id(), error = %e, "lease extension failed");
                        if e.code() == Some(tonic::Code::FailedPrecondition) {
                            self.counters.lost_leases.fetch_add(1, Ordering::Relaxed);
                            task.abort();
                            return Settle::Release;
                        }
                    }
                }
                () = self.abort.cancelled() => {
                    task.abort();
                    return Settle::Release;
                }
            }
        }
    }

    async fn settle(&self, lease: Lease, settle: Settle) {
        let job_id = lease.job_id().to_owned();
        let outcome = match settle {
            Settle::Ack(done) => {
                let r = lease.ack_with_result(done.result).await;
                if r.is_ok() {
                    self.counters.completed.fetch_add(1, Ordering::Relaxed);
                }
                r.map(|()| None)
            }
            Settle::Fail(e) => {
                tracing::info!(job_id = %job_id, error = %e.message, failure = ?e.failure, "job failed");
                let r = match e.failure {
                    Failure::Retry => lease.nack(e.message).await,
                    Failure::RetryAfter(d) => lease.nack_after(e.message, d).await,
                    Failure::Permanent => lease.dead_letter(e.message).await,
                };
                r.map(Some)
            }
            Settle::Release => {
                if self.abort.is_cancelled() {
                    let r = lease
                        .nack_after(
                            "released: the worker shut down before the handler finished",
                            Duration::from_millis(1),
                        )
                        .await;
                    if r.is_ok() {
                        self.counters.released.fetch_add(1, Ordering::Relaxed);
                    }
                    r.map(|_| None)
                } else {
                    // The lease was lost: nothing to settle.
                    Ok(None)
                }
            }
        };
        match outcome {
            Ok(Some(nacked)) => {
                let counter = if nacked.state == pb::JobState::Dead {
                    &self.counters.dead_lettered
                } else {
                    &self.counters.retried
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Ok(None) => {}
            Err(e) if e.code() == Some(tonic::Code::FailedPrecondition) => {
                self.counters.lost_leases.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(job_id = %job_id, error = %e, "lease was stale when settling");
            }
            // The lease expires by itself and the job is redelivered.
            Err(e) => tracing::warn!(job_id = %job_id, error = %e, "cannot settle job"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_std_error_is_a_retry_and_permanent_is_not() {
        let io = std::io::Error::other("smtp timeout");
        let e: JobError = io.into();
        assert_eq!(e.failure(), Failure::Retry);
        assert_eq!(e.message(), "smtp timeout");
        assert!(JobError::permanent("550").is_permanent());
        assert_eq!(
            JobError::retry_after("busy", Duration::from_secs(2)).failure(),
            Failure::RetryAfter(Duration::from_secs(2))
        );
    }

    #[test]
    fn done_json_stores_the_serialized_value() {
        let done = Done::json(&serde_json::json!({"sent": true}));
        assert_eq!(done.result().as_ref(), br#"{"sent":true}"#);
        assert!(Done::from(()).result().is_empty());
    }
}
