//! A work queue as a state machine.
//!
//! Every operation takes `now` (unix ms) as an argument and nothing here sleeps, spawns or
//! locks: the [`crate::broker::Broker`] holds each `Queue` behind a short std mutex and drives
//! time. That keeps the semantics (visibility timeouts, retries, priorities, ordering keys,
//! dedup windows) unit-testable with explicit clocks.
//!
//! Live jobs are stored compactly by enqueue seq ([`slots`]); finished ones move to a
//! bounded history of full [`Job`] records. Indexes, so that no operation scans every job:
//! * `ready`: visible jobs by (priority desc, enqueue seq): leasing pops the front.
//! * `timers`: scheduled and retrying jobs by (run_at, seq): promotion pops due entries.
//! * `deadlines`: leased jobs by (deadline, seq): expiry pops due entries; extending moves
//!   one.
//! * `ordering`: per ordering key, its live jobs in enqueue order; only the front one is in
//!   the indexes above, the rest wait (`blocked`), so one key is never leased twice at once.

mod deadlines;
mod ready;
mod seq_map;
mod slots;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::broker::domain::dedup::DedupWindow;
use crate::broker::domain::error::BrokerError;
use crate::broker::domain::limits::Headers;
use crate::broker::domain::rate::RateMeter;
use crate::broker::domain::time::Millis;
use deadlines::Deadlines;
use ready::Ready;
use seq_map::SeqMap;
use slots::{IdCodec, Kinds, LiveJob, PayloadRef, Payloads, Slots};

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

/// Longest visibility timeout: 12 hours.
pub(crate) const MAX_VISIBILITY_MS: u64 = 12 * 3600 * 1000;
/// Highest priority.
pub(crate) const MAX_PRIORITY: u8 = 9;
/// Most deliveries a job may be given (per job or by policy).
pub(crate) const MAX_ATTEMPTS: u32 = 10_000;

/// How long to wait before retry number `n` (1-based) of a failed job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Backoff {
    /// `initial * 2^(n-1)`, capped at `max`; with `jitter`, a uniformly random delay between
    /// half and all of that, so retries of a burst of failures spread out.
    Exponential {
        /// First delay, ms.
        initial_ms: u64,
        /// Cap, ms.
        max_ms: u64,
        /// Randomise each delay between half and all of it.
        jitter: bool,
    },
    /// The n-th retry waits the n-th entry; the last entry repeats.
    Schedule(Vec<u64>),
}

impl Default for Backoff {
    fn default() -> Self {
        Self::Exponential {
            initial_ms: Self::DEFAULT_INITIAL_MS,
            max_ms: Self::DEFAULT_MAX_MS,
            jitter: true,
        }
    }
}

impl Backoff {
    /// First delay of the default exponential backoff, and of one that sets only its cap.
    pub const DEFAULT_INITIAL_MS: u64 = 1_000;
    /// Cap of the default exponential backoff, and of one that sets only its first delay.
    pub const DEFAULT_MAX_MS: u64 = 300_000;

    /// Delay before retry number `retry` (1 for the first retry).
    pub fn delay_ms(&self, retry: u32) -> u64 {
        match self {
            Self::Schedule(delays) => {
                let i = (retry.max(1) as usize - 1).min(delays.len().saturating_sub(1));
                delays.get(i).copied().unwrap_or(0)
            }
            Self::Exponential {
                initial_ms,
                max_ms,
                jitter,
            } => {
                let shift = retry.saturating_sub(1).min(40);
                let full = initial_ms.saturating_mul(1u64 << shift).min(*max_ms);
                if *jitter && full > 1 {
                    fastrand::u64(full / 2..=full)
                } else {
                    full
                }
            }
        }
    }
}

/// A queue's policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePolicy {
    /// Default lease duration.
    pub visibility_timeout_ms: u64,
    /// Default deliveries before dead-lettering.
    pub max_attempts: u32,
    /// Retry delays.
    pub backoff: Backoff,
    /// Where dead jobs go; empty keeps them here as dead records.
    pub dead_letter_queue: String,
    /// Most live jobs.
    pub max_depth: u64,
    /// How long an idempotency key is remembered.
    pub dedup_window_ms: u64,
    /// Topic patterns whose messages are enqueued here.
    pub topic_bindings: Vec<String>,
    /// Finished jobs kept for inspection.
    pub history_limit: u32,
}

impl QueuePolicy {
    /// The default policy of the queue `name`: its dead-letter queue is `<name>.dlq`, except
    /// for a queue that is itself named `*.dlq`, which keeps its dead jobs.
    pub fn default_for(name: &str) -> Self {
        Self {
            visibility_timeout_ms: 30_000,
            max_attempts: 5,
            backoff: Backoff::default(),
            dead_letter_queue: if name.ends_with(".dlq") {
                String::new()
            } else {
                format!("{name}.dlq")
            },
            max_depth: 1_000_000,
            dedup_window_ms: 300_000,
            topic_bindings: Vec::new(),
            history_limit: 1_000,
        }
    }
}

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
    blocked: bool,
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
static NO_HEADERS: std::sync::LazyLock<Headers> = std::sync::LazyLock::new(Headers::new);

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

/// Identifies one delivery: `<queue>/<job seq>/<nonce hex>`. The nonce is random per
/// delivery, so a lease id from an earlier delivery (or an earlier broker run) never
/// matches the current one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseId {
    /// Queue name.
    pub queue: Arc<str>,
    /// The job's seq in that queue.
    pub seq: u64,
    /// The delivery nonce.
    pub nonce: u64,
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{:x}", self.queue, self.seq, self.nonce)
    }
}

/// Why a string is not a lease id (`<queue>/<seq>/<nonce hex>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseIdError {
    /// Fewer than three `/`-separated parts.
    #[error("it has {found} of the 3 parts separated by \"/\"")]
    MissingParts {
        /// How many parts it has.
        found: usize,
    },
    /// Nothing before the seq.
    #[error("the queue name is empty")]
    EmptyQueue,
    /// The middle part is not a decimal `u64`.
    #[error("the seq is not a number")]
    SeqNotANumber,
    /// The last part is not a hexadecimal `u64`.
    #[error("the nonce is not hexadecimal")]
    NonceNotHex,
    /// The bytes are not UTF-8 text (a consume stream's acks carry raw bytes).
    #[error("it is not UTF-8 text")]
    NotUtf8,
}

impl LeaseId {
    /// Splits a lease id into its queue name, seq and nonce.
    fn split(s: &str) -> Result<(&str, u64, u64), LeaseIdError> {
        // The queue name may itself hold "/": the seq and the nonce are the last two parts.
        let mut parts = s.rsplitn(3, '/');
        let nonce = parts.next().unwrap_or_default();
        let seq = parts
            .next()
            .ok_or(LeaseIdError::MissingParts { found: 1 })?;
        let queue = parts
            .next()
            .ok_or(LeaseIdError::MissingParts { found: 2 })?;
        if queue.is_empty() {
            return Err(LeaseIdError::EmptyQueue);
        }
        let seq = seq.parse().map_err(|_| LeaseIdError::SeqNotANumber)?;
        let nonce = u64::from_str_radix(nonce, 16).map_err(|_| LeaseIdError::NonceNotHex)?;
        Ok((queue, seq, nonce))
    }

    /// The queue a lease id names, if it is well formed, without building a [`LeaseId`].
    pub fn queue_of(s: &str) -> Option<&str> {
        Self::split(s).ok().map(|(queue, _, _)| queue)
    }

    /// Parses a lease id that most likely names `queue`, sharing its name if so (settling
    /// a stream's leases then allocates nothing).
    pub fn parse_for(s: &str, queue: &Arc<str>) -> Option<Self> {
        Self::try_parse_for(s, queue).ok()
    }

    /// [`LeaseId::parse_for`], saying why `s` is not a lease id.
    pub fn try_parse_for(s: &str, queue: &Arc<str>) -> Result<Self, LeaseIdError> {
        let (name, seq, nonce) = Self::split(s)?;
        let queue = if name == &**queue {
            queue.clone()
        } else {
            Arc::from(name)
        };
        Ok(Self { queue, seq, nonce })
    }
}

impl FromStr for LeaseId {
    type Err = LeaseIdError;

    fn from_str(s: &str) -> Result<Self, LeaseIdError> {
        let (queue, seq, nonce) = Self::split(s)?;
        Ok(Self {
            queue: Arc::from(queue),
            seq,
            nonce,
        })
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

/// A worker as the queue saw it.
#[derive(Debug, Clone, Default)]
pub struct ConsumerState {
    /// Peer address of its last lease.
    pub address: String,
    /// Leases it holds.
    pub leases_held: u32,
    /// Last Lease / Ack / Nack / ExtendLease.
    pub last_seen: Millis,
    /// Jobs it acked.
    pub done: u64,
    /// Deliveries it failed (nack or expiry).
    pub failed: u64,
}

/// Counters for stats. Serialized as they are by the dashboard (`ops`), whose JSON rows
/// use these field names.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct QueueCounts {
    /// Visible, or waiting behind an ordering key.
    pub pending: u64,
    /// Waiting for a first run time.
    pub scheduled: u64,
    /// Leased.
    pub leased: u64,
    /// Waiting to retry.
    pub retrying: u64,
    /// Enqueued since start.
    pub enqueued: u64,
    /// Acked since start.
    pub completed: u64,
    /// Failed deliveries since start.
    pub failed: u64,
    /// Dead-lettered since start.
    pub dead: u64,
    /// Cancelled or purged since start.
    pub cancelled: u64,
    /// Age of the oldest visible job.
    pub oldest_pending_age_ms: u64,
    /// Enqueues per second, last 10 s.
    pub enqueue_rate: f64,
    /// Acks per second, last 10 s.
    pub ack_rate: f64,
    /// Consumers seen in the last 60 s.
    pub consumers: u32,
    /// Leasing paused.
    pub paused: bool,
}

/// Whether a lease may settle its job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseCheck {
    /// The lease is live.
    Live,
    /// This very lease already acked the job: a repeat ack is a no-op.
    AlreadyAcked,
}

/// Hash maps of the queue not keyed by seq (see [`SeqMap`] for those): their keys are
/// broker-made ids or short strings, and the maps sit on the lease and ack paths, so a
/// fast seeded hasher pays off.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// How long a consumer counts as active in stats after its last call.
const CONSUMER_ACTIVE_MS: u64 = 60_000;
/// Consumers remembered per queue before idle ones (no lease, not seen for
/// [`CONSUMER_ACTIVE_MS`]) are forgotten.
const MAX_IDLE_CONSUMERS: usize = 1_024;

/// The live delivery of a leased job.
#[derive(Debug)]
struct Lease {
    nonce: u64,
    deadline: Millis,
    /// When the delivery was leased, kept across extensions so lease-to-ack time covers
    /// the whole delivery.
    leased_at: Millis,
    updated_at: Millis,
    consumer: Arc<str>,
}

/// A finished job in history: its live slot, moved (so finishing allocates nothing), and
/// how it ended. The payload stays in its chunk until the record leaves history.
#[derive(Debug)]
struct Finished {
    slot: LiveJob,
    finished_at: Millis,
    /// Nonce of the last delivery, so a repeat ack of it is recognised.
    lease_nonce: u64,
    consumer: Option<Arc<str>>,
    result: Option<Bytes>,
}

/// One work queue. See the module docs.
#[derive(Debug)]
pub struct Queue {
    name: Arc<str>,
    policy: QueuePolicy,
    paused: bool,
    next_seq: u64,
    ids: IdCodec,
    /// Live jobs.
    slots: Slots,
    payloads: Payloads,
    kinds: Kinds,
    /// Ids that are not derived from the seq (see [`Extra::id`]), live or in history.
    foreign: FastMap<Uuid, u64>,
    /// Finished jobs kept for inspection, by seq; `history` has them in finish order.
    finished: SeqMap<Finished>,
    history: VecDeque<u64>,
    ready: Ready,
    timers: BTreeSet<(Millis, u64)>,
    /// Leased jobs by (deadline, seq), and their deliveries by seq.
    deadlines: Deadlines,
    leases: SeqMap<Lease>,
    ordering: FastMap<Arc<str>, VecDeque<u64>>,
    dedup: DedupWindow<Uuid>,
    blocked: u64,
    retrying: u64,
    counts: QueueCounts,
    enqueue_rate: RateMeter,
    ack_rate: RateMeter,
    consumers: FastMap<Arc<str>, ConsumerState>,
    outbox: Vec<DeadLetter>,
    /// Seqs of jobs whose lease expired since the last [`Queue::take_expired`]: the
    /// broker logs their new state (expiry is a state change that must survive a restart).
    expired: Vec<u64>,
}

impl Queue {
    /// An empty queue.
    pub fn new(name: &str, policy: QueuePolicy) -> Self {
        Self {
            name: Arc::from(name),
            policy,
            paused: false,
            next_seq: 1,
            ids: IdCodec::random(),
            slots: Slots::default(),
            payloads: Payloads::default(),
            kinds: Kinds::default(),
            foreign: FastMap::default(),
            finished: SeqMap::default(),
            history: VecDeque::new(),
            ready: Ready::default(),
            timers: BTreeSet::new(),
            deadlines: Deadlines::default(),
            leases: SeqMap::default(),
            ordering: FastMap::default(),
            dedup: DedupWindow::default(),
            blocked: 0,
            retrying: 0,
            counts: QueueCounts::default(),
            enqueue_rate: RateMeter::default(),
            ack_rate: RateMeter::default(),
            consumers: FastMap::default(),
            outbox: Vec::new(),
            expired: Vec::new(),
        }
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's policy.
    pub fn policy(&self) -> &QueuePolicy {
        &self.policy
    }

    /// Replaces the policy. Live jobs keep the attempts they were given.
    pub fn set_policy(&mut self, policy: QueuePolicy) {
        self.policy = policy;
        self.trim_history();
    }

    /// Whether leasing is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Pauses or resumes leasing.
    pub fn set_paused(&mut self, paused: bool) {
        self.paused = paused;
    }

    /// Payload bytes the queue holds: its live jobs' and those of finished jobs still in
    /// history (the broker's memory budget counts them).
    pub fn payload_bytes(&self) -> u64 {
        self.payloads.bytes()
    }

    /// Jobs that are not finished.
    pub fn live_jobs(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Whether a lease could return a job right now (before running `tick`).
    pub fn has_visible(&self) -> bool {
        !self.paused && !self.ready.is_empty()
    }

    /// The earliest time something is due: a scheduled job's run time or a lease deadline.
    pub fn next_due(&self) -> Option<Millis> {
        let timer = self.timers.first().map(|(t, _)| *t);
        let lease = self.deadlines.first();
        match (timer, lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Dead jobs waiting to be moved to their dead-letter queue. The broker routes them
    /// after releasing this queue's lock.
    pub fn take_dead_letters(&mut self) -> Vec<DeadLetter> {
        std::mem::take(&mut self.outbox)
    }

    /// Whether `n` more live jobs fit under max depth.
    pub fn check_capacity(&self, n: u64) -> Result<(), BrokerError> {
        let live = self.live_jobs();
        if live + n > self.policy.max_depth {
            return Err(BrokerError::ResourceExhausted(format!(
                "queue {:?} is full: {} live jobs + {} new exceeds max_depth {}",
                self.name, live, n, self.policy.max_depth
            )));
        }
        Ok(())
    }

    /// How many of `jobs` are new (not duplicates of remembered keys or of each other).
    pub fn count_new(&mut self, now: Millis, keys: impl Iterator<Item = Option<String>>) -> u64 {
        self.dedup.count_new(now, keys)
    }

    /// Stores jobs, all or none: if the new ones do not fit under max depth nothing is
    /// stored. Returns one outcome per job, in order.
    pub fn enqueue(
        &mut self,
        now: Millis,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        self.store_new_jobs(now, jobs).map(|(out, _)| out)
    }

    /// [`Queue::enqueue`], handing `record` the log record of each job it stored (not of
    /// the duplicates), in enqueue order, borrowed from the queue: the caller logs the
    /// jobs without looking them up again or copying them whole.
    pub fn enqueue_recorded(
        &mut self,
        now: Millis,
        jobs: Vec<NewJob>,
        mut record: impl FnMut(JobRecord<'_>),
    ) -> Result<Vec<Enqueued>, BrokerError> {
        let (out, stored) = self.store_new_jobs(now, jobs)?;
        for seq in stored {
            if let Some(slot) = self.slots.get(seq) {
                record(self.record_of(seq, slot));
            }
        }
        Ok(out)
    }

    /// The body of [`Queue::enqueue`]; also returns the seqs of the jobs it stored, which
    /// are consecutive (a duplicate takes none).
    fn store_new_jobs(
        &mut self,
        now: Millis,
        jobs: Vec<NewJob>,
    ) -> Result<(Vec<Enqueued>, std::ops::Range<u64>), BrokerError> {
        let new = self.count_new(now, jobs.iter().map(|j| j.idempotency_key.clone()));
        self.check_capacity(new)?;
        let first = self.next_seq;
        let payloads = self.payloads.store(jobs.iter().map(|j| &j.payload));
        let mut out = Vec::with_capacity(jobs.len());
        for (job, payload) in jobs.into_iter().zip(payloads) {
            out.push(self.insert(now, job, payload));
        }
        self.counts.enqueued += new;
        self.enqueue_rate.record(now, new);
        Ok((out, first..self.next_seq))
    }

    /// A new job's seq and id; past [`IdCodec::MAX_SEQ`] ids are random and mapped.
    fn next_id(&mut self, now: Millis) -> (u64, Uuid, bool) {
        let seq = self.next_seq;
        self.next_seq += 1;
        if seq <= IdCodec::MAX_SEQ {
            (seq, self.ids.encode(seq, now), false)
        } else {
            (seq, Uuid::now_v7(), true)
        }
    }

    fn insert(&mut self, now: Millis, new: NewJob, payload: PayloadRef) -> Enqueued {
        if let Some(key) = &new.idempotency_key
            && let Some(id) = self.dedup.get(key)
        {
            self.payloads.release(payload);
            return Enqueued {
                id,
                duplicate: true,
            };
        }
        let (seq, id, foreign) = self.next_id(now);
        if let Some(key) = &new.idempotency_key {
            let expires = now.saturating_add(self.policy.dedup_window_ms);
            self.dedup.insert(key.clone(), id, expires);
        }
        let run_at = new.run_at.unwrap_or(now).max(now);
        let kind = self.kinds.intern(&new.kind);
        let ordering_key: Option<Arc<str>> = new.ordering_key.map(Arc::from);
        let mut slot = LiveJob {
            payload,
            kind,
            enqueued_at: now,
            attempts: 0,
            max_attempts: clamp_attempts(new.max_attempts.unwrap_or(self.policy.max_attempts)),
            priority: new.priority.min(MAX_PRIORITY),
            state: JobState::Pending,
            blocked: false,
            extra: None,
        };
        if run_at > now {
            slot.extra_mut().run_at = run_at;
        }
        if foreign
            || kind == Kinds::OWN
            || !new.headers.is_empty()
            || new.idempotency_key.is_some()
            || ordering_key.is_some()
        {
            let rare = slot.rare_mut();
            rare.id = foreign.then_some(id);
            rare.kind = (kind == Kinds::OWN).then_some(new.kind);
            rare.headers = new.headers;
            rare.idempotency_key = new.idempotency_key;
            rare.ordering_key = ordering_key.clone();
        }
        if foreign {
            self.foreign.insert(id, seq);
        }
        self.add_live_slot(seq, slot, ordering_key, now);
        Enqueued {
            id,
            duplicate: false,
        }
    }

    /// Stores a new live slot and makes it visible, scheduled, or waiting behind its
    /// ordering key.
    fn add_live_slot(
        &mut self,
        seq: u64,
        mut slot: LiveJob,
        ordering_key: Option<Arc<str>>,
        now: Millis,
    ) {
        let mut active = true;
        if let Some(key) = ordering_key {
            let waiting = self.ordering.entry(key).or_default();
            active = waiting.is_empty();
            waiting.push_back(seq);
        }
        slot.blocked = !active;
        self.slots.insert(seq, slot);
        if active {
            self.place(seq, now);
        } else {
            self.blocked += 1;
        }
    }

    /// Puts an active job into `ready` or `timers` by its run time.
    fn place(&mut self, seq: u64, now: Millis) {
        let slot = self.slots.get_mut(seq).expect("placed job exists");
        slot.touch(now);
        let run_at = slot.run_at();
        if run_at > now {
            slot.state = if slot.attempts == 0 {
                JobState::Scheduled
            } else {
                self.retrying += 1;
                JobState::Retrying
            };
            self.timers.insert((run_at, seq));
        } else {
            slot.state = JobState::Pending;
            self.ready.push(slot.priority, seq, run_at);
        }
    }

    /// Removes an active, unleased job from `ready` or `timers`. For a visible job, call
    /// it after the slot is gone (the ready index drops its entry lazily).
    fn unplace(&mut self, seq: u64, state: JobState, priority: u8, run_at: Millis, blocked: bool) {
        if blocked {
            return;
        }
        match state {
            JobState::Pending => {
                let slots = &self.slots;
                self.ready.remove(priority, seq, |s| slots.get(s).is_none());
            }
            JobState::Scheduled | JobState::Retrying => {
                if state == JobState::Retrying {
                    self.retrying -= 1;
                }
                self.timers.remove(&(run_at, seq));
            }
            _ => {}
        }
    }

    /// Makes due timers visible and expires due leases (each a failed attempt). Only due
    /// entries are touched. Returns how many jobs became visible.
    pub fn tick(&mut self, now: Millis) -> usize {
        while let Some((deadline, seqs)) = self.deadlines.pop_due(now) {
            // Leases taken together expire together: they share one error text.
            let error: Arc<str> = Arc::from(format!(
                "lease expired at {deadline} (no ack within the visibility timeout)"
            ));
            for seq in seqs {
                if self
                    .leases
                    .get(&seq)
                    .is_some_and(|l| l.deadline == deadline)
                {
                    // The attempt failed at its deadline, however late this tick noticed
                    // it, so the backoff runs from there.
                    self.fail_attempt(seq, deadline, error.clone(), None, false);
                    self.expired.push(seq);
                }
            }
        }
        let before = self.ready.len();
        while let Some(&(run_at, seq)) = self.timers.first() {
            if run_at > now {
                break;
            }
            self.timers.pop_first();
            let slot = self.slots.get_mut(seq).expect("timer job exists");
            if slot.state == JobState::Retrying {
                self.retrying -= 1;
            }
            slot.state = JobState::Pending;
            slot.touch(now);
            self.ready.push(slot.priority, seq, run_at);
        }
        self.dedup.prune(now);
        self.ready.len().saturating_sub(before)
    }

    /// Leases up to `max` visible jobs for `visibility_ms`, highest priority first, FIFO
    /// within a priority. Runs [`Queue::tick`] first, so due work is never missed.
    pub fn lease(
        &mut self,
        now: Millis,
        max: usize,
        visibility_ms: u64,
        consumer: &Arc<str>,
        address: &str,
    ) -> Vec<Delivery> {
        self.tick(now);
        self.touch_consumer(consumer, address, now);
        if self.paused {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(max.min(self.ready.len()));
        let deadline = now.saturating_add(visibility_ms);
        while out.len() < max {
            let slots = &self.slots;
            let Some(seq) = self.ready.pop(|s| slots.get(s).is_none()) else {
                break;
            };
            let nonce = fastrand::u64(1..);
            let slot = self.slots.get_mut(seq).expect("ready job exists");
            slot.state = JobState::Leased;
            slot.attempts = slot.attempts.saturating_add(1);
            slot.touch(now);
            self.deadlines.insert(deadline, seq);
            self.leases.insert(
                seq,
                Lease {
                    nonce,
                    deadline,
                    leased_at: now,
                    updated_at: now,
                    consumer: consumer.clone(),
                },
            );
            let slot = self.slots.get(seq).expect("ready job exists");
            let rare = slot.rare();
            out.push(Delivery {
                job_id: self.id_of(seq, slot),
                lease_id: LeaseId {
                    queue: self.name.clone(),
                    seq,
                    nonce,
                },
                kind: self.shared_kind(slot),
                payload: self.payloads.get(slot.payload),
                headers: rare.map(|r| r.headers.clone()).unwrap_or_default(),
                priority: slot.priority,
                attempt: u32::from(slot.attempts),
                max_attempts: u32::from(slot.max_attempts),
                enqueued_at: slot.enqueued_at,
                deadline,
                ordering_key: rare.and_then(|r| r.ordering_key.clone()),
            });
        }
        if let Some(state) = self.consumers.get_mut(consumer) {
            state.leases_held += out.len() as u32;
        }
        out
    }

    fn id_of(&self, seq: u64, slot: &LiveJob) -> Uuid {
        slot.own_id()
            .unwrap_or_else(|| self.ids.encode(seq, slot.enqueued_at))
    }

    /// The kind, shared (interned kinds cost no allocation).
    fn shared_kind(&self, slot: &LiveJob) -> Arc<str> {
        if slot.kind == Kinds::OWN {
            Arc::from(self.kind_of(slot))
        } else {
            self.kinds.shared(slot.kind)
        }
    }

    fn kind_of<'a>(&'a self, slot: &'a LiveJob) -> &'a str {
        if slot.kind == Kinds::OWN {
            slot.rare().and_then(|r| r.kind.as_deref()).unwrap_or("")
        } else {
            self.kinds.name(slot.kind)
        }
    }

    /// The seq of the job with `id`, live or in history.
    fn seq_of(&self, id: &Uuid) -> Option<u64> {
        if let Some(seq) = self.foreign.get(id) {
            return Some(*seq);
        }
        let (seq, enqueued_at) = self.ids.decode(id)?;
        let found = match self.slots.get(seq) {
            Some(slot) => {
                slot.own_id().is_none() && slot.enqueued_at & 0xffff_ffff_ffff == enqueued_at
            }
            None => self
                .finished
                .get(&seq)
                .is_some_and(|f| self.id_of(seq, &f.slot) == *id),
        };
        found.then_some(seq)
    }

    /// The job record of a finished job, as inspection sees it.
    fn materialize_finished(&self, seq: u64, f: &Finished) -> Job {
        let mut job = self.materialize(seq, &f.slot);
        job.finished_at = Some(f.finished_at);
        job.updated_at = f.finished_at;
        job.lease_nonce = f.lease_nonce;
        job.consumer = f.consumer.clone();
        job.result = f.result.clone();
        job.dead_letter_queue = f.slot.rare().and_then(|r| r.dead_letter_queue.clone());
        job
    }

    /// The log record of a live slot.
    fn record_of<'a>(&'a self, seq: u64, slot: &'a LiveJob) -> JobRecord<'a> {
        let extra = slot.extra.as_deref();
        let rare = slot.rare();
        JobRecord {
            id: self.id_of(seq, slot),
            kind: self.kind_of(slot),
            payload: self.payloads.get(slot.payload),
            headers: rare.map_or(&NO_HEADERS, |r| &r.headers),
            priority: slot.priority,
            attempts: u32::from(slot.attempts),
            max_attempts: u32::from(slot.max_attempts),
            idempotency_key: rare.and_then(|r| r.idempotency_key.as_deref()),
            ordering_key: rare.and_then(|r| r.ordering_key.as_ref()),
            state: slot.state,
            enqueued_at: slot.enqueued_at,
            run_at: slot.run_at(),
            updated_at: match (self.leases.get(&seq), extra) {
                (Some(l), _) => l.updated_at,
                (None, Some(e)) => e.updated_at,
                (None, None) => slot.enqueued_at,
            },
            finished_at: None,
            last_error: extra.and_then(|e| e.last_error.as_deref()),
            result: None,
            dead_letter_queue: None,
            origin: rare.and_then(|r| r.origin.as_deref()),
        }
    }

    /// The job record of a live slot, as inspection sees it.
    fn materialize(&self, seq: u64, slot: &LiveJob) -> Job {
        let lease = self.leases.get(&seq);
        let record = self.record_of(seq, slot);
        Job {
            id: record.id,
            seq,
            kind: record.kind.to_owned(),
            payload: record.payload,
            headers: record.headers.clone(),
            priority: record.priority,
            attempts: record.attempts,
            max_attempts: record.max_attempts,
            idempotency_key: record.idempotency_key.map(str::to_owned),
            ordering_key: record.ordering_key.cloned(),
            state: record.state,
            enqueued_at: record.enqueued_at,
            run_at: record.run_at,
            updated_at: record.updated_at,
            finished_at: None,
            lease_deadline: lease.map(|l| l.deadline),
            lease_nonce: lease.map_or(0, |l| l.nonce),
            consumer: lease.map(|l| l.consumer.clone()),
            last_error: record.last_error.map(str::to_owned),
            result: None,
            dead_letter_queue: None,
            origin: record.origin.map(str::to_owned),
            blocked: slot.blocked,
        }
    }

    fn touch_consumer(&mut self, consumer: &Arc<str>, address: &str, now: Millis) {
        // Workers without a name are known by their peer address, which changes with every
        // connection: forget idle ones once there are many, so the map stays bounded by
        // the workers that are actually around.
        if self.consumers.len() >= MAX_IDLE_CONSUMERS && !self.consumers.contains_key(consumer) {
            self.consumers.retain(|_, c| {
                c.leases_held > 0 || c.last_seen.saturating_add(CONSUMER_ACTIVE_MS) > now
            });
        }
        let state = self.consumers.entry(consumer.clone()).or_default();
        state.last_seen = now;
        if state.address != address {
            state.address = address.to_owned();
        }
    }

    /// Whether `lease` may settle its job at `now`; the error says why not.
    pub fn check_lease(&self, now: Millis, lease: &LeaseId) -> Result<LeaseCheck, BrokerError> {
        let stale =
            |why: String| BrokerError::FailedPrecondition(format!("lease {lease} is stale: {why}"));
        if let Some(slot) = self.slots.get(lease.seq) {
            // The id is only formatted into refusals; a live ack never builds it.
            let id = || self.id_of(lease.seq, slot);
            return match self.leases.get(&lease.seq) {
                Some(l) if l.nonce != lease.nonce => Err(stale(format!(
                    "job {} was delivered again since (attempt {})",
                    id(),
                    slot.attempts
                ))),
                Some(l) if l.deadline > now => Ok(LeaseCheck::Live),
                Some(l) => Err(stale(format!(
                    "it expired at {} (now {now}); the job will be delivered again",
                    l.deadline
                ))),
                None => Err(stale(format!(
                    "job {} is {} since this lease ended (attempt {})",
                    id(),
                    slot.state.as_str(),
                    slot.attempts
                ))),
            };
        }
        let Some(f) = self.finished.get(&lease.seq) else {
            return Err(stale(
                "its job no longer exists (finished and evicted from history, or purged)".into(),
            ));
        };
        let id = || self.id_of(lease.seq, &f.slot);
        if f.lease_nonce != lease.nonce {
            return Err(stale(format!(
                "job {} was delivered again since (attempt {})",
                id(),
                f.slot.attempts
            )));
        }
        match f.slot.state {
            JobState::Completed => Ok(LeaseCheck::AlreadyAcked),
            state => Err(stale(format!(
                "job {} is {} since this lease ended",
                id(),
                state.as_str()
            ))),
        }
    }

    /// Counts a lease that ended or moved out of the group of `deadline` (`leases` already
    /// shows the change).
    fn count_out_deadline(&mut self, deadline: Millis) {
        let leases = &self.leases;
        self.deadlines.remove(deadline, |s| {
            leases.get(&s).is_some_and(|l| l.deadline == deadline)
        });
    }

    /// Ends the live lease of `seq`, returning it.
    fn end_lease(&mut self, seq: u64) -> Option<Lease> {
        let lease = self.leases.remove(&seq)?;
        self.count_out_deadline(lease.deadline);
        if let Some(state) = self.consumers.get_mut(&lease.consumer) {
            state.leases_held = state.leases_held.saturating_sub(1);
        }
        Some(lease)
    }

    /// Acks a delivery. A repeat ack of the same lease is OK and changes nothing.
    /// Returns how long the delivery was leased before this ack (ms), or `None` for a
    /// repeat ack, so the caller can measure lease-to-ack time.
    pub fn ack(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        result: Option<Bytes>,
    ) -> Result<Option<u64>, BrokerError> {
        Ok(match self.check_lease(now, lease)? {
            LeaseCheck::AlreadyAcked => None,
            LeaseCheck::Live => self.complete(now, lease.seq, result),
        })
    }

    /// [`Queue::ack`] of a lease that [`Queue::check_lease`] accepted at `now` under the
    /// same lock (an Ack checks all its leases before it applies any), without checking
    /// it again. A lease that is no longer live was acked since, by an earlier ack of the
    /// same request: like any repeat ack it changes nothing and returns `None`.
    pub fn ack_checked(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        result: Option<Bytes>,
    ) -> Option<u64> {
        let live = self
            .leases
            .get(&lease.seq)
            .is_some_and(|l| l.nonce == lease.nonce);
        if live {
            self.complete(now, lease.seq, result)
        } else {
            None
        }
    }

    /// Completes the leased job `seq`; returns how long it was leased (ms).
    fn complete(&mut self, now: Millis, seq: u64, result: Option<Bytes>) -> Option<u64> {
        let ended = self.end_lease(seq)?;
        let leased_at = ended.leased_at;
        if let Some(state) = self.consumers.get_mut(&ended.consumer) {
            state.done += 1;
            state.last_seen = now;
        }
        self.counts.completed += 1;
        self.ack_rate.record(now, 1);
        self.finish(seq, now, JobState::Completed, Some(ended), result);
        Some(now.saturating_sub(leased_at))
    }

    /// Fails a delivery: the job retries after `retry_delay_ms` (or the backoff policy's
    /// delay), or dies if it was its last attempt or `dead_letter` is set.
    pub fn nack(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        error: String,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> Result<FailOutcome, BrokerError> {
        if self.check_lease(now, lease)? == LeaseCheck::AlreadyAcked {
            return Err(BrokerError::FailedPrecondition(format!(
                "lease {lease} is stale: its job was already acked"
            )));
        }
        Ok(self.fail_attempt(
            lease.seq,
            now,
            Arc::from(error),
            retry_delay_ms,
            dead_letter,
        ))
    }

    /// Moves a live lease's deadline to `now + visibility_ms`; returns the new deadline.
    pub fn extend(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        visibility_ms: u64,
    ) -> Result<Millis, BrokerError> {
        if self.check_lease(now, lease)? == LeaseCheck::AlreadyAcked {
            return Err(BrokerError::FailedPrecondition(format!(
                "lease {lease} is stale: its job was already acked"
            )));
        }
        let seq = lease.seq;
        let deadline = now.saturating_add(visibility_ms);
        let live = self.leases.get_mut(&seq).expect("live lease");
        let old = std::mem::replace(&mut live.deadline, deadline);
        live.updated_at = now;
        if let Some(state) = self.consumers.get_mut(&live.consumer) {
            state.last_seen = now;
        }
        if old != deadline {
            // (Counting the lease out of a group it stays in would overcount the group
            // if that compacts it.)
            self.count_out_deadline(old);
            self.deadlines.insert(deadline, seq);
        }
        Ok(deadline)
    }

    fn fail_attempt(
        &mut self,
        seq: u64,
        now: Millis,
        error: Arc<str>,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> FailOutcome {
        let ended = self.end_lease(seq);
        if let Some(state) = ended
            .as_ref()
            .and_then(|l| self.consumers.get_mut(&l.consumer))
        {
            state.failed += 1;
        }
        self.counts.failed += 1;
        let slot = self.slots.get_mut(seq).expect("failed job exists");
        let attempts = u32::from(slot.attempts);
        let last = attempts >= u32::from(slot.max_attempts);
        let extra = slot.extra_mut();
        extra.last_error = Some(error);
        extra.updated_at = now;
        if dead_letter || last {
            self.kill(seq, now, ended);
            return FailOutcome::Dead;
        }
        let delay = retry_delay_ms.unwrap_or_else(|| self.policy.backoff.delay_ms(attempts));
        // Saturating: no delay, however it was configured, can wrap into the past.
        let at = now.saturating_add(delay);
        let slot = self.slots.get_mut(seq).expect("failed job exists");
        slot.extra_mut().run_at = at;
        self.place(seq, now);
        FailOutcome::Retry { at }
    }

    /// Marks a job dead and queues its dead letter.
    fn kill(&mut self, seq: u64, now: Millis, ended: Option<Lease>) {
        self.counts.dead += 1;
        let target = self.policy.dead_letter_queue.clone();
        if !target.is_empty() {
            let slot = self.slots.get(seq).expect("dead job exists");
            let job = self.materialize(seq, slot);
            let mut headers = job.headers;
            headers.insert(HEADER_ORIGINAL_QUEUE.into(), self.name.to_string());
            headers.insert(HEADER_ATTEMPTS.into(), job.attempts.to_string());
            headers.insert(HEADER_LAST_ERROR.into(), job.last_error.unwrap_or_default());
            headers.insert(HEADER_DEAD_LETTERED_AT.into(), now.to_string());
            self.outbox.push(DeadLetter {
                target: target.clone(),
                origin: self.name.to_string(),
                job_id: job.id,
                kind: job.kind,
                payload: job.payload,
                headers,
                priority: job.priority,
            });
            let slot = self.slots.get_mut(seq).expect("dead job exists");
            slot.rare_mut().dead_letter_queue = Some(target);
        }
        self.finish(seq, now, JobState::Dead, ended, None);
    }

    /// Moves a live job that reaches the final `state` into history (with the ack's
    /// `result`), frees its ordering key and trims the history. Callers take what they
    /// need from the live job first: with a history limit of 0 the record is gone at once.
    fn finish(
        &mut self,
        seq: u64,
        now: Millis,
        state: JobState,
        ended: Option<Lease>,
        result: Option<Bytes>,
    ) {
        let mut slot = self.slots.remove(seq).expect("finished job exists");
        slot.state = state;
        if std::mem::replace(&mut slot.blocked, false) {
            self.blocked -= 1;
        }
        slot.touch(now);
        let key = slot.rare().and_then(|r| r.ordering_key.clone());
        let (lease_nonce, consumer) = match ended {
            Some(l) => (l.nonce, Some(l.consumer)),
            None => (0, None),
        };
        self.finished.insert(
            seq,
            Finished {
                slot,
                finished_at: now,
                lease_nonce,
                consumer,
                result,
            },
        );
        self.history.push_back(seq);
        if let Some(key) = key {
            self.release_ordering_key(&key, seq, now);
        }
        self.trim_history();
    }

    fn release_ordering_key(&mut self, key: &Arc<str>, seq: u64, now: Millis) {
        let Some(waiting) = self.ordering.get_mut(key) else {
            return;
        };
        let was_front = waiting.front() == Some(&seq);
        waiting.retain(|s| *s != seq);
        let next = if was_front {
            waiting.front().copied()
        } else {
            None
        };
        if waiting.is_empty() {
            self.ordering.remove(key);
        }
        if let Some(next) = next {
            let slot = self.slots.get_mut(next).expect("waiting job exists");
            slot.blocked = false;
            self.blocked -= 1;
            self.place(next, now);
        }
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.policy.history_limit as usize {
            let seq = self.history.pop_front().expect("non-empty history");
            if let Some(f) = self.finished.remove(&seq) {
                self.drop_finished(f);
            }
        }
    }

    /// Frees what a finished record held.
    fn drop_finished(&mut self, f: Finished) {
        self.payloads.release(f.slot.payload);
        if let Some(id) = f.slot.own_id() {
            self.foreign.remove(&id);
        }
    }

    /// Looks a job up by id.
    pub fn get(&self, id: &Uuid) -> Option<Job> {
        self.job_by_seq(self.seq_of(id)?)
    }

    /// Cancels a scheduled, pending or retrying job.
    pub fn cancel(&mut self, now: Millis, id: &Uuid) -> Result<Job, BrokerError> {
        let not_found =
            || BrokerError::NotFound(format!("job {id} not found in queue {:?}", self.name));
        let seq = self.seq_of(id).ok_or_else(not_found)?;
        let Some(slot) = self.slots.get(seq) else {
            let state = self.finished.get(&seq).ok_or_else(not_found)?.slot.state;
            return Err(BrokerError::FailedPrecondition(format!(
                "job {id} is already {}",
                state.as_str()
            )));
        };
        if let Some(lease) = self.leases.get(&seq) {
            debug_assert_eq!(slot.state, JobState::Leased);
            return Err(BrokerError::FailedPrecondition(format!(
                "job {id} is leased by {:?} until {}: ack or nack it, or wait for the lease to expire",
                &*lease.consumer, lease.deadline
            )));
        }
        // The record is taken before it finishes: history may keep nothing.
        let mut job = self.materialize(seq, slot);
        self.cancel_seq(seq, now);
        job.state = JobState::Cancelled;
        job.finished_at = Some(now);
        job.updated_at = now;
        job.blocked = false;
        Ok(job)
    }

    fn cancel_seq(&mut self, seq: u64, now: Millis) {
        let slot = self.slots.get(seq).expect("cancelled job exists");
        let (state, priority, run_at, blocked) =
            (slot.state, slot.priority, slot.run_at(), slot.blocked);
        self.counts.cancelled += 1;
        self.finish(seq, now, JobState::Cancelled, None, None);
        self.unplace(seq, state, priority, run_at, blocked);
    }

    /// Cancels every job that is not leased; returns how many.
    pub fn purge(&mut self, now: Millis) -> u64 {
        self.purge_ids(now).len() as u64
    }

    /// Cancels every job that is not leased; returns their ids (the WAL records each one,
    /// because leased jobs survive a purge and leases are not persisted).
    pub fn purge_ids(&mut self, now: Millis) -> Vec<Uuid> {
        let victims: Vec<(u64, Uuid)> = self
            .slots
            .iter_from(0)
            .filter(|(_, s)| s.state != JobState::Leased)
            .map(|(seq, s)| (seq, self.id_of(seq, s)))
            .collect();
        for (seq, _) in &victims {
            // Cancelling the front of an ordering key activates the next one, which is a
            // victim too; its state is re-read when its turn comes.
            if self.slots.get(*seq).is_some() {
                self.cancel_seq(*seq, now);
            }
        }
        debug_assert!(self.ready.is_empty());
        self.ready.clear();
        victims.into_iter().map(|(_, id)| id).collect()
    }

    /// Jobs in `state` (live ones if `None`), oldest first, after enqueue seq `after`.
    /// Returns the page and the seq to continue after, if more match.
    pub fn list(
        &self,
        state: Option<JobState>,
        after: u64,
        limit: usize,
    ) -> (Vec<Job>, Option<u64>) {
        let from = after.saturating_add(1);
        let (page, more): (Vec<Job>, bool) = match state {
            Some(s) if s.is_finished() => {
                // History is bounded by the policy, so sorting the matches is cheap.
                let mut matching: Vec<(u64, &Finished)> = self
                    .finished
                    .iter()
                    .filter(|(seq, f)| **seq >= from && f.slot.state == s)
                    .map(|(seq, f)| (*seq, f))
                    .collect();
                matching.sort_unstable_by_key(|(seq, _)| *seq);
                let more = matching.len() > limit;
                let page = matching
                    .into_iter()
                    .take(limit)
                    .map(|(seq, f)| self.materialize_finished(seq, f))
                    .collect();
                (page, more)
            }
            _ => {
                let mut matching = self
                    .slots
                    .iter_from(from)
                    .filter(|(_, slot)| state.is_none_or(|s| slot.state == s));
                let page = matching
                    .by_ref()
                    .take(limit)
                    .map(|(seq, slot)| self.materialize(seq, slot))
                    .collect();
                (page, matching.next().is_some())
            }
        };
        let next = if more {
            page.last().map(|j: &Job| j.seq)
        } else {
            None
        };
        (page, next)
    }

    /// The newest finished jobs, newest first.
    pub fn history(&self, limit: usize) -> Vec<Job> {
        self.history
            .iter()
            .rev()
            .take(limit)
            .filter_map(|seq| {
                let f = self.finished.get(seq)?;
                Some(self.materialize_finished(*seq, f))
            })
            .collect()
    }

    /// Stores a dead letter from another queue, recording where it came from (its
    /// [`Job::origin`]). Dead letters ignore max depth: losing them would be a silent drop.
    pub fn insert_dead_letter(&mut self, now: Millis, dead: DeadLetter) {
        self.insert_with_id(
            now,
            dead.job_id,
            dead.kind,
            dead.payload,
            dead.headers,
            dead.priority,
            Some(dead.origin),
        );
        self.counts.enqueued += 1;
    }

    #[allow(clippy::too_many_arguments)]
    fn insert_with_id(
        &mut self,
        now: Millis,
        id: Uuid,
        kind: String,
        payload: Bytes,
        headers: Headers,
        priority: u8,
        origin: Option<String>,
    ) {
        if let Some(old) = self.seq_of(&id) {
            // The same job has a record here already (it died here before, or it is
            // dead-lettered twice): the new record replaces it.
            self.forget(old, now);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let payload = self.payloads.store([payload].iter())[0];
        let mut slot = LiveJob {
            payload,
            kind: Kinds::OWN,
            enqueued_at: now,
            attempts: 0,
            max_attempts: clamp_attempts(self.policy.max_attempts),
            priority: priority.min(MAX_PRIORITY),
            state: JobState::Pending,
            blocked: false,
            extra: None,
        };
        let rare = slot.rare_mut();
        rare.id = Some(id);
        rare.kind = Some(kind);
        rare.headers = headers;
        rare.origin = origin;
        self.foreign.insert(id, seq);
        self.add_live_slot(seq, slot, None, now);
    }

    /// Whether a redrive may move this job: it is not leased and the broker recorded the
    /// queue it was dead-lettered from.
    fn redrivable(slot: &LiveJob) -> Option<&str> {
        if slot.state == JobState::Leased {
            return None;
        }
        slot.rare().and_then(|r| r.origin.as_deref())
    }

    /// The distinct queues a redrive of `ids` (or, when empty, of up to `max` of the oldest
    /// movable jobs) would move jobs into, so the broker can check them all before anything
    /// moves. Reads the queue once; moves nothing.
    pub fn redrive_targets(&self, ids: &[Uuid], max: usize) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        if ids.is_empty() {
            for origin in self
                .slots
                .iter_from(0)
                .filter_map(|(_, s)| Self::redrivable(s))
                .take(max)
            {
                if !out.contains(origin) {
                    out.insert(origin.to_owned());
                }
            }
        } else {
            for id in ids {
                if let Some(origin) = self
                    .seq_of(id)
                    .and_then(|seq| self.slots.get(seq))
                    .and_then(Self::redrivable)
                {
                    out.insert(origin.to_owned());
                }
            }
        }
        out
    }

    /// Takes jobs out of this dead-letter queue for redrive: the given ids, or else up to
    /// `max` of the oldest movable ones. A job returns to its recorded origin (never to a
    /// queue a header names). Leased or finished jobs, jobs the broker never dead-lettered
    /// (no origin), and jobs whose origin `allowed` refuses stay here (and are listed when
    /// asked for by id).
    pub fn take_for_redrive(
        &mut self,
        now: Millis,
        ids: &[Uuid],
        max: usize,
        allowed: impl Fn(&str) -> bool,
    ) -> (Vec<Redriven>, Vec<Uuid>) {
        let movable = |s: &LiveJob| Self::redrivable(s).is_some_and(&allowed);
        let mut skipped = Vec::new();
        let seqs: Vec<u64> = if ids.is_empty() {
            self.slots
                .iter_from(0)
                .filter(|(_, s)| movable(s))
                .take(max)
                .map(|(seq, _)| seq)
                .collect()
        } else {
            let mut seqs = Vec::new();
            for id in ids {
                match self.seq_of(id) {
                    // An id given twice is moved once, then skipped like any id that is
                    // no longer here.
                    Some(seq)
                        if self.slots.get(seq).is_some_and(movable) && !seqs.contains(&seq) =>
                    {
                        seqs.push(seq)
                    }
                    _ => skipped.push(*id),
                }
            }
            seqs
        };
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let slot = self.slots.get(seq).expect("redriven job exists");
            let job = self.materialize(seq, slot);
            self.forget(seq, now);
            let target = job.origin.expect("only jobs with an origin are moved");
            let headers = job
                .headers
                .into_iter()
                .filter(|(k, _)| !k.starts_with(BROKER_HEADER_PREFIX))
                .collect();
            out.push(Redriven {
                target,
                job_id: job.id,
                kind: job.kind,
                payload: job.payload,
                headers,
                priority: job.priority,
            });
        }
        (out, skipped)
    }

    /// Puts a redriven job back, attempts reset, replacing its dead record. It is an
    /// ordinary job here again: it has no origin.
    pub fn restore(&mut self, now: Millis, job: Redriven) {
        self.insert_with_id(
            now,
            job.job_id,
            job.kind,
            job.payload,
            job.headers,
            job.priority,
            None,
        );
    }

    /// Seqs of jobs whose lease expired since the last call (see [`Queue::job_by_seq`]).
    pub fn take_expired(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.expired)
    }

    /// The state-change record of the job with this seq (live or finished), without
    /// materializing the whole [`Job`].
    pub fn job_update(&self, seq: u64) -> Option<JobUpdate> {
        let (slot, finished) = match self.slots.get(seq) {
            Some(slot) => (slot, None),
            None => {
                let f = self.finished.get(&seq)?;
                (&f.slot, Some(f))
            }
        };
        Some(JobUpdate {
            id: self.id_of(seq, slot),
            state: slot.state,
            attempts: u32::from(slot.attempts),
            run_at: slot.run_at(),
            last_error: slot
                .extra
                .as_deref()
                .and_then(|e| e.last_error.as_deref().map(str::to_owned)),
            result: finished.and_then(|f| f.result.clone()),
            dead_letter_queue: finished
                .and_then(|f| f.slot.rare())
                .and_then(|r| r.dead_letter_queue.clone()),
        })
    }

    /// Looks a job up by its seq (e.g. a lease's): a live job's record is built on the
    /// spot, a finished one is borrowed from history.
    pub fn job_by_seq(&self, seq: u64) -> Option<Job> {
        match self.slots.get(seq) {
            Some(slot) => Some(self.materialize(seq, slot)),
            None => self
                .finished
                .get(&seq)
                .map(|f| self.materialize_finished(seq, f)),
        }
    }

    /// Remembered idempotency keys: (key, job id, expiry), for snapshots.
    pub fn dedup_entries(&self) -> Vec<(String, Uuid, Millis)> {
        self.dedup
            .entries()
            .map(|(k, id, expires)| (k.to_owned(), id, expires))
            .collect()
    }

    /// Recovery: remembers an idempotency key until `expires`, in any order.
    pub fn restore_dedup(&mut self, key: String, id: Uuid, expires: Millis) {
        self.dedup.insert(key, id, expires);
    }

    /// Recovery: adds a job rebuilt from the write-ahead log, after every job restored
    /// before it (its seq is the next one, so call in enqueue order for live jobs and in
    /// finish order for finished ones). A job that was leased is visible again, because
    /// leases are not persisted: a crash causes a redelivery, never a loss. Ordering keys,
    /// indexes and history are rebuilt exactly as [`Queue::enqueue`] would. The job keeps
    /// its id, which is then mapped like a dead letter's.
    pub fn restore_job(&mut self, now: Millis, mut job: Job) {
        let seq = self.next_seq;
        self.next_seq += 1;
        job.seq = seq;
        job.lease_deadline = None;
        job.lease_nonce = 0;
        job.blocked = false;
        if let Some(old) = self.seq_of(&job.id) {
            // Recovery hands each id over once; a repeat would be a bug there, and the
            // newest record wins like in `insert_with_id`.
            self.forget(old, now);
        }
        self.foreign.insert(job.id, seq);
        let payload = self.payloads.store([job.payload].iter())[0];
        let mut slot = LiveJob {
            payload,
            kind: Kinds::OWN,
            enqueued_at: job.enqueued_at,
            attempts: job.attempts.min(MAX_ATTEMPTS) as u16,
            max_attempts: clamp_attempts(job.max_attempts),
            priority: job.priority.min(MAX_PRIORITY),
            state: job.state,
            blocked: false,
            extra: None,
        };
        let rare = slot.rare_mut();
        rare.id = Some(job.id);
        rare.kind = Some(job.kind);
        rare.headers = job.headers;
        rare.idempotency_key = job.idempotency_key;
        rare.ordering_key = job.ordering_key.clone();
        rare.dead_letter_queue = job.dead_letter_queue;
        rare.origin = job.origin;
        let extra = slot.extra_mut();
        extra.run_at = job.run_at;
        extra.updated_at = job.updated_at;
        extra.last_error = job.last_error.map(Arc::from);
        if job.state.is_finished() {
            self.finished.insert(
                seq,
                Finished {
                    slot,
                    finished_at: job.finished_at.unwrap_or(job.updated_at),
                    lease_nonce: 0,
                    consumer: None,
                    result: job.result,
                },
            );
            self.history.push_back(seq);
            self.trim_history();
            return;
        }
        // A job that was leased is retried at once; others keep their run time.
        if job.state == JobState::Leased {
            extra.run_at = extra.run_at.min(now);
        }
        slot.state = JobState::Pending;
        let updated_at = job.updated_at;
        self.add_live_slot(seq, slot, job.ordering_key, now);
        let slot = self.slots.get_mut(seq).expect("restored job exists");
        slot.extra_mut().updated_at = updated_at;
    }

    /// Drops the record at `seq` entirely, live or finished, without counting it anywhere
    /// (a dead letter replaced, a job redriven away, a record recovery replaces).
    fn forget(&mut self, seq: u64, now: Millis) {
        if let Some(f) = self.finished.remove(&seq) {
            self.history.retain(|s| *s != seq);
            self.drop_finished(f);
            return;
        }
        let Some(slot) = self.slots.get(seq) else {
            return;
        };
        if let Some(id) = slot.own_id() {
            self.foreign.remove(&id);
        }
        let ordering_key = slot.rare().and_then(|r| r.ordering_key.clone());
        let was_leased = self.end_lease(seq).is_some();
        let slot = self.slots.remove(seq).expect("forgotten job exists");
        self.payloads.release(slot.payload);
        if !was_leased {
            self.unplace(seq, slot.state, slot.priority, slot.run_at(), slot.blocked);
        }
        if slot.blocked {
            self.blocked -= 1;
        }
        if let Some(key) = ordering_key {
            self.release_ordering_key(&key, seq, now);
        }
    }

    /// The queue's counters.
    pub fn counts(&self, now: Millis) -> QueueCounts {
        let slots = &self.slots;
        let oldest = self
            .ready
            .oldest_since(|seq| slots.get(seq).map_or(now, LiveJob::run_at))
            .map(|since| now.saturating_sub(since))
            .unwrap_or(0);
        QueueCounts {
            pending: self.ready.len() as u64 + self.blocked,
            scheduled: self.timers.len() as u64 - self.retrying,
            leased: self.leases.len() as u64,
            retrying: self.retrying,
            oldest_pending_age_ms: oldest,
            enqueue_rate: self.enqueue_rate.per_second(now),
            ack_rate: self.ack_rate.per_second(now),
            consumers: self
                .consumers
                .values()
                .filter(|c| {
                    c.leases_held > 0 || c.last_seen.saturating_add(CONSUMER_ACTIVE_MS) > now
                })
                .count() as u32,
            paused: self.paused,
            ..self.counts.clone()
        }
    }

    /// Consumers seen, by name.
    pub fn consumers(&self) -> Vec<(Arc<str>, ConsumerState)> {
        let mut out: Vec<_> = self
            .consumers
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Attempts as a slot stores them: at most [`MAX_ATTEMPTS`].
fn clamp_attempts(n: u32) -> u16 {
    n.clamp(1, MAX_ATTEMPTS) as u16
}

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;
