//! Jobs: what a producer sends, what the queue keeps and hands back, and the headers the
//! broker writes on dead letters.

use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::broker::domain::limits::Headers;
use crate::broker::domain::time::Millis;

use super::lease_id::LeaseId;

/// Header naming the queue a dead-lettered job came from. Informational only: where a
/// redrive returns a job is the origin the broker recorded ([`Job::origin`]), never a
/// header.
pub(crate) const HEADER_ORIGINAL_QUEUE: &str = "x-sluice-original-queue";
/// Header with the attempts a dead-lettered job made.
pub(crate) const HEADER_ATTEMPTS: &str = "x-sluice-attempts";
/// Header with a dead-lettered job's last error.
pub const HEADER_LAST_ERROR: &str = "x-sluice-last-error";
/// Header with the time (unix ms) a job was dead-lettered.
pub(crate) const HEADER_DEAD_LETTERED_AT: &str = "x-sluice-dead-lettered-at";
/// Prefix of the headers the broker adds; redrive strips them, and producers may not set
/// them (see [`crate::broker::domain::limits::Limits::check_headers`]).
pub(crate) const BROKER_HEADER_PREFIX: &str = "x-sluice-";

/// A job's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// Waiting for its first run time.
    Scheduled,
    /// Visible (or waiting behind its ordering key).
    Pending,
    /// Leased by a worker.
    Leased,
    /// Waiting for a retry after a failed attempt.
    Retrying,
    /// Acked.
    Completed,
    /// Out of attempts, or nacked as poison.
    Dead,
    /// Cancelled or purged.
    Cancelled,
}

impl JobState {
    /// Every state, for conversions that map a foreign enum back by searching it (one
    /// exhaustive match per conversion, the other direction derived from it).
    pub const ALL: [Self; 7] = [
        Self::Scheduled,
        Self::Pending,
        Self::Leased,
        Self::Retrying,
        Self::Completed,
        Self::Dead,
        Self::Cancelled,
    ];

    /// Whether the job is done with (it lives on only in history).
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Dead | Self::Cancelled)
    }

    /// Lower-case name for messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Scheduled => "scheduled",
            Self::Pending => "pending",
            Self::Leased => "leased",
            Self::Retrying => "retrying",
            Self::Completed => "completed",
            Self::Dead => "dead",
            Self::Cancelled => "cancelled",
        }
    }
}

/// A job to enqueue, already validated.
#[derive(Debug, Clone, Default)]
pub struct NewJob {
    /// Body.
    pub payload: Bytes,
    /// Headers.
    pub headers: Headers,
    /// Job type.
    pub kind: String,
    /// 0..=9.
    pub priority: u8,
    /// First run time; `None` runs now.
    pub run_at: Option<Millis>,
    /// Deliveries allowed; `None` takes the policy's.
    pub max_attempts: Option<u32>,
    /// Dedup key.
    pub idempotency_key: Option<String>,
    /// Serialisation key.
    pub ordering_key: Option<String>,
}

/// A job as stored, and as inspection sees it.
#[derive(Debug, Clone)]
pub struct Job {
    /// Id (UUIDv7; for jobs enqueued here it also encodes the queue and seq).
    pub id: Uuid,
    /// Enqueue order within the queue.
    pub seq: u64,
    /// Job type.
    pub kind: String,
    /// Body.
    pub payload: Bytes,
    /// Headers.
    pub headers: Headers,
    /// Priority.
    pub priority: u8,
    /// Deliveries so far.
    pub attempts: u32,
    /// Deliveries allowed.
    pub max_attempts: u32,
    /// Dedup key.
    pub idempotency_key: Option<String>,
    /// Serialisation key.
    pub ordering_key: Option<Arc<str>>,
    /// State.
    pub state: JobState,
    /// Enqueue time.
    pub enqueued_at: Millis,
    /// When it is (or was) visible for its next attempt.
    pub run_at: Millis,
    /// Last change.
    pub updated_at: Millis,
    /// When it finished.
    pub finished_at: Option<Millis>,
    /// Deadline of the live lease.
    pub lease_deadline: Option<Millis>,
    /// Nonce of the latest delivery; a lease id must carry it to settle the job.
    pub lease_nonce: u64,
    /// Consumer of the latest delivery.
    pub consumer: Option<Arc<str>>,
    /// Last failure.
    pub last_error: Option<String>,
    /// Ack result.
    pub result: Option<Bytes>,
    /// Where it was dead-lettered to.
    pub dead_letter_queue: Option<String>,
    /// For a dead letter: the queue the broker moved it from, where a redrive returns it.
    /// Set only by the broker's dead-letter move (and kept by the log), so a job that was
    /// never dead-lettered has none.
    pub origin: Option<String>,
    /// Waiting behind an earlier job with the same ordering key.
    pub(super) blocked: bool,
}

/// What a job's state-change record holds: the fields an ack, nack, expiry, cancel or
/// purge can change. Cheaper than a [`Job`]: no payload, headers or kind are copied.
#[derive(Debug, Clone, PartialEq)]
pub struct JobUpdate {
    /// Id.
    pub id: Uuid,
    /// State after the change.
    pub state: JobState,
    /// Deliveries so far.
    pub attempts: u32,
    /// When it becomes visible (retries).
    pub run_at: Millis,
    /// Error of the last failed attempt.
    pub last_error: Option<String>,
    /// Ack result.
    pub result: Option<Bytes>,
    /// Where a dead job was sent.
    pub dead_letter_queue: Option<String>,
}

impl From<&Job> for JobUpdate {
    fn from(job: &Job) -> Self {
        Self {
            id: job.id,
            state: job.state,
            attempts: job.attempts,
            run_at: job.run_at,
            last_error: job.last_error.clone(),
            result: job.result.clone(),
            dead_letter_queue: job.dead_letter_queue.clone(),
        }
    }
}

/// The headers of a job without any (an empty map allocates nothing).
pub(super) static NO_HEADERS: std::sync::LazyLock<Headers> = std::sync::LazyLock::new(Headers::new);

/// A job's whole record as the log keeps it (a new job's, or any job's in a snapshot),
/// borrowed from where the job is held: the log copies what it keeps once, and shares the
/// payload.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord<'a> {
    /// Id.
    pub id: Uuid,
    /// Job type.
    pub kind: &'a str,
    /// Body.
    pub payload: Bytes,
    /// Headers.
    pub headers: &'a Headers,
    /// Priority.
    pub priority: u8,
    /// Deliveries so far.
    pub attempts: u32,
    /// Deliveries allowed.
    pub max_attempts: u32,
    /// Dedup key.
    pub idempotency_key: Option<&'a str>,
    /// Serialisation key.
    pub ordering_key: Option<&'a Arc<str>>,
    /// State.
    pub state: JobState,
    /// Enqueue time.
    pub enqueued_at: Millis,
    /// When it is (or was) visible for its next attempt.
    pub run_at: Millis,
    /// Last change.
    pub updated_at: Millis,
    /// When it finished.
    pub finished_at: Option<Millis>,
    /// Last failure.
    pub last_error: Option<&'a str>,
    /// Ack result.
    pub result: Option<&'a Bytes>,
    /// Where it was dead-lettered to.
    pub dead_letter_queue: Option<&'a str>,
    /// For a dead letter: the queue the broker moved it from.
    pub origin: Option<&'a str>,
}

impl Job {
    /// The job's record as the log keeps it.
    pub fn record(&self) -> JobRecord<'_> {
        JobRecord {
            id: self.id,
            kind: &self.kind,
            payload: self.payload.clone(),
            headers: &self.headers,
            priority: self.priority,
            attempts: self.attempts,
            max_attempts: self.max_attempts,
            idempotency_key: self.idempotency_key.as_deref(),
            ordering_key: self.ordering_key.as_ref(),
            state: self.state,
            enqueued_at: self.enqueued_at,
            run_at: self.run_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
            last_error: self.last_error.as_deref(),
            result: self.result.as_ref(),
            dead_letter_queue: self.dead_letter_queue.as_deref(),
            origin: self.origin.as_deref(),
        }
    }

    /// A job record rebuilt by recovery: pending, never attempted, no keys. Recovery sets
    /// the other public fields from the log, then hands it to [`Queue::restore_job`].
    pub fn restored(id: Uuid, kind: String, payload: Bytes, headers: Headers) -> Self {
        Self {
            id,
            seq: 0,
            kind,
            payload,
            headers,
            priority: 0,
            attempts: 0,
            max_attempts: 1,
            idempotency_key: None,
            ordering_key: None,
            state: JobState::Pending,
            enqueued_at: 0,
            run_at: 0,
            updated_at: 0,
            finished_at: None,
            lease_deadline: None,
            lease_nonce: 0,
            consumer: None,
            last_error: None,
            result: None,
            dead_letter_queue: None,
            origin: None,
            blocked: false,
        }
    }
}

/// One leased job handed to a worker.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Job id.
    pub job_id: Uuid,
    /// The delivery's lease.
    pub lease_id: LeaseId,
    /// Job type.
    pub kind: Arc<str>,
    /// Body.
    pub payload: Bytes,
    /// Headers.
    pub headers: Headers,
    /// Priority.
    pub priority: u8,
    /// Delivery number, from 1.
    pub attempt: u32,
    /// Deliveries allowed.
    pub max_attempts: u32,
    /// Enqueue time.
    pub enqueued_at: Millis,
    /// Lease deadline.
    pub deadline: Millis,
    /// Ordering key.
    pub ordering_key: Option<Arc<str>>,
}

/// The outcome of one enqueued job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Enqueued {
    /// The job's id (the original one for a duplicate).
    pub id: Uuid,
    /// Whether the idempotency key matched an earlier job.
    pub duplicate: bool,
}

/// What a nack (or an expiry) did to the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Will be visible again at `at`.
    Retry {
        /// When.
        at: Millis,
    },
    /// Moved to the dead-letter queue (or kept as dead).
    Dead,
}

/// A dead job on its way to a dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The dead-letter queue.
    pub target: String,
    /// The queue it died in: recorded with the copy as its [`Job::origin`].
    pub origin: String,
    /// Job id (kept across the move).
    pub job_id: Uuid,
    /// Job type.
    pub kind: String,
    /// Body.
    pub payload: Bytes,
    /// Headers, with the `x-sluice-*` record of its death.
    pub headers: Headers,
    /// Priority.
    pub priority: u8,
}

/// A job leaving a dead-letter queue for the queue it came from.
#[derive(Debug, Clone)]
pub struct Redriven {
    /// The queue it was dead-lettered from, as the broker recorded it.
    pub target: String,
    /// Job id.
    pub job_id: Uuid,
    /// Job type.
    pub kind: String,
    /// Body.
    pub payload: Bytes,
    /// Headers without the broker's `x-sluice-*` ones.
    pub headers: Headers,
    /// Priority.
    pub priority: u8,
}
