//! A work queue as a state machine.
//!
//! Every operation takes `now` (unix ms) as an argument and nothing here sleeps, spawns or
//! locks: the [`crate::broker::Broker`] holds each `Queue` behind a short std mutex and drives
//! time. That keeps the semantics (visibility timeouts, retries, priorities, ordering keys,
//! dedup windows) unit-testable with explicit clocks.
//!
//! Indexes, so that no operation scans every job:
//! * `ready`: visible jobs by (priority desc, enqueue seq): leasing pops the front.
//! * `timers`: scheduled and retrying jobs by (run_at, seq): promotion pops due entries.
//! * `leases`: leased jobs by (deadline, seq): expiry pops due entries; extending moves one.
//! * `ordering`: per ordering key, its live jobs in enqueue order; only the front one is in
//!   the indexes above, the rest wait (`blocked`), so one key is never leased twice at once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::broker::error::BrokerError;
use crate::broker::limits::Headers;
use crate::broker::rate::RateMeter;
use crate::broker::time::Millis;

/// Header naming the queue a dead-lettered job came from.
pub const HEADER_ORIGINAL_QUEUE: &str = "x-sluice-original-queue";
/// Header with the attempts a dead-lettered job made.
pub const HEADER_ATTEMPTS: &str = "x-sluice-attempts";
/// Header with a dead-lettered job's last error.
pub const HEADER_LAST_ERROR: &str = "x-sluice-last-error";
/// Header with the time (unix ms) a job was dead-lettered.
pub const HEADER_DEAD_LETTERED_AT: &str = "x-sluice-dead-lettered-at";
/// Prefix of the headers the broker adds; redrive strips them.
pub const BROKER_HEADER_PREFIX: &str = "x-sluice-";

/// Longest visibility timeout: 12 hours.
pub const MAX_VISIBILITY_MS: u64 = 12 * 3600 * 1000;
/// Highest priority.
pub const MAX_PRIORITY: u8 = 9;

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
            initial_ms: 1_000,
            max_ms: 300_000,
            jitter: true,
        }
    }
}

impl Backoff {
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
    /// Id (UUIDv7).
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
    /// Waiting behind an earlier job with the same ordering key.
    blocked: bool,
}

impl Job {
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
    pub queue: String,
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

impl FromStr for LeaseId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let mut parts = s.rsplitn(3, '/');
        let nonce = u64::from_str_radix(parts.next().ok_or(())?, 16).map_err(|_| ())?;
        let seq = parts.next().ok_or(())?.parse().map_err(|_| ())?;
        let queue = parts.next().filter(|q| !q.is_empty()).ok_or(())?;
        Ok(Self {
            queue: queue.to_owned(),
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
    pub kind: String,
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
    /// The original queue.
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

/// Counters for stats.
#[derive(Debug, Clone, Default)]
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

/// How long a consumer counts as active in stats after its last call.
const CONSUMER_ACTIVE_MS: u64 = 60_000;
/// Consumers remembered per queue before idle ones (no lease, not seen for
/// [`CONSUMER_ACTIVE_MS`]) are forgotten.
const MAX_IDLE_CONSUMERS: usize = 1_024;

/// One work queue. See the module docs.
#[derive(Debug)]
pub struct Queue {
    name: Arc<str>,
    policy: QueuePolicy,
    paused: bool,
    next_seq: u64,
    jobs: BTreeMap<u64, Job>,
    ids: HashMap<Uuid, u64>,
    ready: BTreeMap<(Reverse<u8>, u64), ()>,
    /// The jobs of `ready` by (visible since, seq), so stats find the oldest pending job
    /// exactly: delayed and retried jobs become visible out of enqueue order.
    ready_since: BTreeMap<(Millis, u64), ()>,
    timers: BTreeMap<(Millis, u64), ()>,
    /// Leased jobs by (deadline, seq); the value is when the delivery was leased, kept
    /// across extensions so lease-to-ack time covers the whole delivery.
    leases: BTreeMap<(Millis, u64), Millis>,
    ordering: HashMap<Arc<str>, VecDeque<u64>>,
    dedup: HashMap<String, (Uuid, Millis)>,
    dedup_expiry: VecDeque<(Millis, String)>,
    history: VecDeque<u64>,
    live: u64,
    blocked: u64,
    retrying: u64,
    counts: QueueCounts,
    enqueue_rate: RateMeter,
    ack_rate: RateMeter,
    consumers: HashMap<Arc<str>, ConsumerState>,
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
            jobs: BTreeMap::new(),
            ids: HashMap::new(),
            ready: BTreeMap::new(),
            ready_since: BTreeMap::new(),
            timers: BTreeMap::new(),
            leases: BTreeMap::new(),
            ordering: HashMap::new(),
            dedup: HashMap::new(),
            dedup_expiry: VecDeque::new(),
            history: VecDeque::new(),
            live: 0,
            blocked: 0,
            retrying: 0,
            counts: QueueCounts::default(),
            enqueue_rate: RateMeter::default(),
            ack_rate: RateMeter::default(),
            consumers: HashMap::new(),
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

    /// Jobs that are not finished.
    pub fn live_jobs(&self) -> u64 {
        self.live
    }

    /// Whether a lease could return a job right now (before running `tick`).
    pub fn has_visible(&self) -> bool {
        !self.paused && !self.ready.is_empty()
    }

    /// The earliest time something is due: a scheduled job's run time or a lease deadline.
    pub fn next_due(&self) -> Option<Millis> {
        let timer = self.timers.keys().next().map(|(t, _)| *t);
        let lease = self.leases.keys().next().map(|(t, _)| *t);
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
        if self.live + n > self.policy.max_depth {
            return Err(BrokerError::ResourceExhausted(format!(
                "queue {:?} is full: {} live jobs + {} new exceeds max_depth {}",
                self.name, self.live, n, self.policy.max_depth
            )));
        }
        Ok(())
    }

    fn prune_dedup(&mut self, now: Millis) {
        while let Some((expires, _)) = self.dedup_expiry.front() {
            if *expires > now {
                break;
            }
            let (expires, key) = self.dedup_expiry.pop_front().expect("front exists");
            if self.dedup.get(&key).is_some_and(|(_, e)| *e == expires) {
                self.dedup.remove(&key);
            }
        }
    }

    /// How many of `jobs` are new (not duplicates of remembered keys or of each other).
    pub fn count_new(&mut self, now: Millis, keys: impl Iterator<Item = Option<String>>) -> u64 {
        self.prune_dedup(now);
        let mut seen = HashSet::new();
        keys.filter(|k| match k {
            Some(k) => !self.dedup.contains_key(k) && seen.insert(k.clone()),
            None => true,
        })
        .count() as u64
    }

    /// Stores jobs, all or none: if the new ones do not fit under max depth nothing is
    /// stored. Returns one outcome per job, in order.
    pub fn enqueue(
        &mut self,
        now: Millis,
        jobs: Vec<NewJob>,
    ) -> Result<Vec<Enqueued>, BrokerError> {
        let new = self.count_new(now, jobs.iter().map(|j| j.idempotency_key.clone()));
        self.check_capacity(new)?;
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            out.push(self.insert(now, job));
        }
        self.counts.enqueued += new;
        self.enqueue_rate.record(now, new);
        Ok(out)
    }

    fn insert(&mut self, now: Millis, new: NewJob) -> Enqueued {
        if let Some(key) = &new.idempotency_key
            && let Some((id, _)) = self.dedup.get(key)
        {
            return Enqueued {
                id: *id,
                duplicate: true,
            };
        }
        let id = Uuid::now_v7();
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(key) = &new.idempotency_key {
            let expires = now + self.policy.dedup_window_ms;
            self.dedup.insert(key.clone(), (id, expires));
            self.dedup_expiry.push_back((expires, key.clone()));
        }
        let run_at = new.run_at.unwrap_or(now).max(now);
        let ordering_key: Option<Arc<str>> = new.ordering_key.map(Arc::from);
        let mut job = Job {
            id,
            seq,
            kind: new.kind,
            payload: new.payload,
            headers: new.headers,
            priority: new.priority.min(MAX_PRIORITY),
            attempts: 0,
            max_attempts: new.max_attempts.unwrap_or(self.policy.max_attempts).max(1),
            idempotency_key: new.idempotency_key,
            ordering_key: ordering_key.clone(),
            state: if run_at > now {
                JobState::Scheduled
            } else {
                JobState::Pending
            },
            enqueued_at: now,
            run_at,
            updated_at: now,
            finished_at: None,
            lease_deadline: None,
            lease_nonce: 0,
            consumer: None,
            last_error: None,
            result: None,
            dead_letter_queue: None,
            blocked: false,
        };
        let mut active = true;
        if let Some(key) = ordering_key {
            let waiting = self.ordering.entry(key).or_default();
            active = waiting.is_empty();
            waiting.push_back(seq);
        }
        job.blocked = !active;
        self.jobs.insert(seq, job);
        self.ids.insert(id, seq);
        self.live += 1;
        if active {
            self.place(seq, now);
        } else {
            self.blocked += 1;
        }
        Enqueued {
            id,
            duplicate: false,
        }
    }

    /// Puts an active job into `ready` or `timers` by its run time.
    fn place(&mut self, seq: u64, now: Millis) {
        let job = self.jobs.get_mut(&seq).expect("placed job exists");
        job.updated_at = now;
        if job.run_at > now {
            job.state = if job.attempts == 0 {
                JobState::Scheduled
            } else {
                self.retrying += 1;
                JobState::Retrying
            };
            self.timers.insert((job.run_at, seq), ());
        } else {
            job.state = JobState::Pending;
            self.ready.insert((Reverse(job.priority), seq), ());
            self.ready_since.insert((job.run_at, seq), ());
        }
    }

    /// Removes an active, unleased job from `ready` or `timers`.
    fn unplace(&mut self, seq: u64) {
        let job = &self.jobs[&seq];
        if job.blocked {
            return;
        }
        match job.state {
            JobState::Pending => {
                self.ready.remove(&(Reverse(job.priority), seq));
                self.ready_since.remove(&(job.run_at, seq));
            }
            JobState::Scheduled | JobState::Retrying => {
                if job.state == JobState::Retrying {
                    self.retrying -= 1;
                }
                self.timers.remove(&(job.run_at, seq));
            }
            _ => {}
        }
    }

    /// Makes due timers visible and expires due leases (each a failed attempt). Only due
    /// entries are touched. Returns how many jobs became visible.
    pub fn tick(&mut self, now: Millis) -> usize {
        while let Some(&(deadline, seq)) = self.leases.keys().next() {
            if deadline > now {
                break;
            }
            self.fail_attempt(
                seq,
                now,
                format!("lease expired at {deadline} (no ack within the visibility timeout)"),
                None,
                false,
            );
            self.expired.push(seq);
        }
        let before = self.ready.len();
        while let Some(&(run_at, seq)) = self.timers.keys().next() {
            if run_at > now {
                break;
            }
            self.timers.remove(&(run_at, seq));
            let job = self.jobs.get_mut(&seq).expect("timer job exists");
            if job.state == JobState::Retrying {
                self.retrying -= 1;
            }
            job.state = JobState::Pending;
            job.updated_at = now;
            self.ready.insert((Reverse(job.priority), seq), ());
            self.ready_since.insert((job.run_at, seq), ());
        }
        self.prune_dedup(now);
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
        while out.len() < max {
            let Some(((_, seq), ())) = self.ready.pop_first() else {
                break;
            };
            let deadline = now + visibility_ms;
            let nonce = fastrand::u64(1..);
            let job = self.jobs.get_mut(&seq).expect("ready job exists");
            self.ready_since.remove(&(job.run_at, seq));
            job.state = JobState::Leased;
            job.attempts += 1;
            job.lease_deadline = Some(deadline);
            job.lease_nonce = nonce;
            job.consumer = Some(consumer.clone());
            job.updated_at = now;
            self.leases.insert((deadline, seq), now);
            out.push(Delivery {
                job_id: job.id,
                lease_id: LeaseId {
                    queue: self.name.to_string(),
                    seq,
                    nonce,
                },
                kind: job.kind.clone(),
                payload: job.payload.clone(),
                headers: job.headers.clone(),
                priority: job.priority,
                attempt: job.attempts,
                max_attempts: job.max_attempts,
                enqueued_at: job.enqueued_at,
                deadline,
                ordering_key: job.ordering_key.clone(),
            });
        }
        if let Some(state) = self.consumers.get_mut(consumer) {
            state.leases_held += out.len() as u32;
        }
        out
    }

    fn touch_consumer(&mut self, consumer: &Arc<str>, address: &str, now: Millis) {
        // Workers without a name are known by their peer address, which changes with every
        // connection: forget idle ones once there are many, so the map stays bounded by
        // the workers that are actually around.
        if self.consumers.len() >= MAX_IDLE_CONSUMERS && !self.consumers.contains_key(consumer) {
            self.consumers
                .retain(|_, c| c.leases_held > 0 || c.last_seen + CONSUMER_ACTIVE_MS > now);
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
        let Some(job) = self.jobs.get(&lease.seq) else {
            return Err(stale(
                "its job no longer exists (finished and evicted from history, or purged)".into(),
            ));
        };
        if job.lease_nonce != lease.nonce {
            return Err(stale(format!(
                "job {} was delivered again since (attempt {})",
                job.id, job.attempts
            )));
        }
        match (job.state, job.lease_deadline) {
            (JobState::Leased, Some(deadline)) if deadline > now => Ok(LeaseCheck::Live),
            (JobState::Leased, Some(deadline)) => Err(stale(format!(
                "it expired at {deadline} (now {now}); the job will be delivered again"
            ))),
            (JobState::Completed, _) => Ok(LeaseCheck::AlreadyAcked),
            (state, _) => Err(stale(format!(
                "job {} is {} since this lease ended",
                job.id,
                state.as_str()
            ))),
        }
    }

    fn end_lease(&mut self, seq: u64, now: Millis) -> Option<Arc<str>> {
        let job = self.jobs.get_mut(&seq).expect("leased job exists");
        if let Some(deadline) = job.lease_deadline.take() {
            self.leases.remove(&(deadline, seq));
        }
        job.updated_at = now;
        let consumer = job.consumer.clone();
        if let Some(state) = consumer.as_ref().and_then(|c| self.consumers.get_mut(c)) {
            state.leases_held = state.leases_held.saturating_sub(1);
        }
        consumer
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
        if self.check_lease(now, lease)? == LeaseCheck::AlreadyAcked {
            return Ok(None);
        }
        let seq = lease.seq;
        let leased_at = self.jobs[&seq]
            .lease_deadline
            .and_then(|d| self.leases.get(&(d, seq)).copied())
            .unwrap_or(now);
        let consumer = self.end_lease(seq, now);
        if let Some(state) = consumer.as_ref().and_then(|c| self.consumers.get_mut(c)) {
            state.done += 1;
            state.last_seen = now;
        }
        let job = self.jobs.get_mut(&seq).expect("acked job exists");
        job.state = JobState::Completed;
        job.result = result;
        self.counts.completed += 1;
        self.ack_rate.record(now, 1);
        self.finish(seq, now);
        Ok(Some(now.saturating_sub(leased_at)))
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
        Ok(self.fail_attempt(lease.seq, now, error, retry_delay_ms, dead_letter))
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
        let job = self.jobs.get_mut(&seq).expect("leased job exists");
        let old = job
            .lease_deadline
            .replace(now + visibility_ms)
            .expect("live lease");
        job.updated_at = now;
        let leased_at = self.leases.remove(&(old, seq)).unwrap_or(now);
        self.leases.insert((now + visibility_ms, seq), leased_at);
        if let Some(state) = job
            .consumer
            .as_ref()
            .and_then(|c| self.consumers.get_mut(c))
        {
            state.last_seen = now;
        }
        Ok(now + visibility_ms)
    }

    fn fail_attempt(
        &mut self,
        seq: u64,
        now: Millis,
        error: String,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> FailOutcome {
        let consumer = self.end_lease(seq, now);
        if let Some(state) = consumer.as_ref().and_then(|c| self.consumers.get_mut(c)) {
            state.failed += 1;
        }
        self.counts.failed += 1;
        let job = self.jobs.get_mut(&seq).expect("failed job exists");
        job.last_error = Some(error);
        if dead_letter || job.attempts >= job.max_attempts {
            self.kill(seq, now);
            return FailOutcome::Dead;
        }
        let delay = retry_delay_ms.unwrap_or_else(|| self.policy.backoff.delay_ms(job.attempts));
        job.run_at = now + delay;
        self.place(seq, now);
        FailOutcome::Retry { at: now + delay }
    }

    /// Marks a job dead and queues its dead letter.
    fn kill(&mut self, seq: u64, now: Millis) {
        let target = self.policy.dead_letter_queue.clone();
        let job = self.jobs.get_mut(&seq).expect("dead job exists");
        job.state = JobState::Dead;
        self.counts.dead += 1;
        if !target.is_empty() {
            job.dead_letter_queue = Some(target.clone());
            let mut headers = job.headers.clone();
            headers.insert(HEADER_ORIGINAL_QUEUE.into(), self.name.to_string());
            headers.insert(HEADER_ATTEMPTS.into(), job.attempts.to_string());
            headers.insert(
                HEADER_LAST_ERROR.into(),
                job.last_error.clone().unwrap_or_default(),
            );
            headers.insert(HEADER_DEAD_LETTERED_AT.into(), now.to_string());
            self.outbox.push(DeadLetter {
                target,
                job_id: job.id,
                kind: job.kind.clone(),
                payload: job.payload.clone(),
                headers,
                priority: job.priority,
            });
        }
        self.finish(seq, now);
    }

    /// Moves a job that just reached a final state into history and frees its ordering key.
    fn finish(&mut self, seq: u64, now: Millis) {
        let job = self.jobs.get_mut(&seq).expect("finished job exists");
        job.finished_at = Some(now);
        job.updated_at = now;
        job.lease_deadline = None;
        let key = job.ordering_key.clone();
        let was_blocked = std::mem::replace(&mut job.blocked, false);
        if was_blocked {
            self.blocked -= 1;
        }
        self.live -= 1;
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
            let job = self.jobs.get_mut(&next).expect("waiting job exists");
            job.blocked = false;
            self.blocked -= 1;
            self.place(next, now);
        }
    }

    fn trim_history(&mut self) {
        while self.history.len() > self.policy.history_limit as usize {
            let seq = self.history.pop_front().expect("non-empty history");
            if let Some(job) = self.jobs.remove(&seq) {
                self.ids.remove(&job.id);
            }
        }
    }

    /// Looks a job up by id.
    pub fn get(&self, id: &Uuid) -> Option<&Job> {
        self.ids.get(id).and_then(|seq| self.jobs.get(seq))
    }

    /// Cancels a scheduled, pending or retrying job.
    pub fn cancel(&mut self, now: Millis, id: &Uuid) -> Result<Job, BrokerError> {
        let Some(&seq) = self.ids.get(id) else {
            return Err(BrokerError::NotFound(format!(
                "job {id} not found in queue {:?}",
                self.name
            )));
        };
        let job = &self.jobs[&seq];
        match job.state {
            JobState::Leased => {
                return Err(BrokerError::FailedPrecondition(format!(
                    "job {id} is leased by {:?} until {}: ack or nack it, or wait for the lease to expire",
                    job.consumer.as_deref().unwrap_or(""),
                    job.lease_deadline.unwrap_or(0)
                )));
            }
            state if state.is_finished() => {
                return Err(BrokerError::FailedPrecondition(format!(
                    "job {id} is already {}",
                    state.as_str()
                )));
            }
            _ => {}
        }
        self.cancel_seq(seq, now);
        Ok(self.jobs[&seq].clone())
    }

    fn cancel_seq(&mut self, seq: u64, now: Millis) {
        self.unplace(seq);
        let job = self.jobs.get_mut(&seq).expect("cancelled job exists");
        job.state = JobState::Cancelled;
        self.counts.cancelled += 1;
        self.finish(seq, now);
    }

    /// Cancels every job that is not leased; returns how many.
    pub fn purge(&mut self, now: Millis) -> u64 {
        self.purge_ids(now).len() as u64
    }

    /// Cancels every job that is not leased; returns their ids (the WAL records each one,
    /// because leased jobs survive a purge and leases are not persisted).
    pub fn purge_ids(&mut self, now: Millis) -> Vec<Uuid> {
        let victims: Vec<u64> = self
            .jobs
            .iter()
            .filter(|(_, j)| !j.state.is_finished() && j.state != JobState::Leased)
            .map(|(seq, _)| *seq)
            .collect();
        for seq in &victims {
            // Cancelling the front of an ordering key activates the next one, which is a
            // victim too; its state is re-read here so either index is cleaned.
            if !self.jobs[seq].state.is_finished() {
                self.cancel_seq(*seq, now);
            }
        }
        victims
            .iter()
            .filter_map(|seq| self.jobs.get(seq).map(|j| j.id))
            .collect()
    }

    /// Jobs in `state` (live ones if `None`), oldest first, after enqueue seq `after`.
    /// Returns the page and the seq to continue after, if more match.
    pub fn list(
        &self,
        state: Option<JobState>,
        after: u64,
        limit: usize,
    ) -> (Vec<Job>, Option<u64>) {
        let mut matching = self
            .jobs
            .range(after.saturating_add(1)..)
            .map(|(_, j)| j)
            .filter(|j| match state {
                Some(s) => j.state == s,
                None => !j.state.is_finished(),
            });
        let page: Vec<Job> = matching.by_ref().take(limit).cloned().collect();
        let more = matching.next().is_some();
        let next = if more {
            page.last().map(|j| j.seq)
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
            .filter_map(|seq| self.jobs.get(seq).cloned())
            .collect()
    }

    /// Stores a dead letter from another queue. Dead letters ignore max depth: losing
    /// them would be a silent drop.
    pub fn insert_dead_letter(&mut self, now: Millis, dead: DeadLetter) {
        self.insert_with_id(
            now,
            dead.job_id,
            dead.kind,
            dead.payload,
            dead.headers,
            dead.priority,
        );
        self.counts.enqueued += 1;
    }

    fn insert_with_id(
        &mut self,
        now: Millis,
        id: Uuid,
        kind: String,
        payload: Bytes,
        headers: Headers,
        priority: u8,
    ) {
        if let Some(old) = self.ids.remove(&id) {
            // The same job has a record here already (it died here before, or it is
            // dead-lettered twice): the new record replaces it.
            let state = self.jobs[&old].state;
            if state.is_finished() {
                self.history.retain(|s| *s != old);
            } else if state == JobState::Leased {
                self.end_lease(old, now);
                self.live -= 1;
            } else {
                self.unplace(old);
                self.live -= 1;
            }
            self.jobs.remove(&old);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.jobs.insert(
            seq,
            Job {
                id,
                seq,
                kind,
                payload,
                headers,
                priority,
                attempts: 0,
                max_attempts: self.policy.max_attempts,
                idempotency_key: None,
                ordering_key: None,
                state: JobState::Pending,
                enqueued_at: now,
                run_at: now,
                updated_at: now,
                finished_at: None,
                lease_deadline: None,
                lease_nonce: 0,
                consumer: None,
                last_error: None,
                result: None,
                dead_letter_queue: None,
                blocked: false,
            },
        );
        self.ids.insert(id, seq);
        self.live += 1;
        self.place(seq, now);
    }

    /// Takes jobs out of this dead-letter queue for redrive: the given ids, or else up to
    /// `max` of the oldest. Leased or finished jobs, and jobs with no original queue, are
    /// skipped (and listed when asked for by id).
    pub fn take_for_redrive(&mut self, ids: &[Uuid], max: usize) -> (Vec<Redriven>, Vec<Uuid>) {
        let movable = |j: &Job| {
            !j.state.is_finished()
                && j.state != JobState::Leased
                && j.headers.contains_key(HEADER_ORIGINAL_QUEUE)
        };
        let mut skipped = Vec::new();
        let seqs: Vec<u64> = if ids.is_empty() {
            self.jobs
                .iter()
                .filter(|(_, j)| movable(j))
                .take(max)
                .map(|(s, _)| *s)
                .collect()
        } else {
            let mut seqs = Vec::new();
            for id in ids {
                match self.ids.get(id) {
                    Some(seq) if movable(&self.jobs[seq]) => seqs.push(*seq),
                    _ => skipped.push(*id),
                }
            }
            seqs
        };
        let mut out = Vec::with_capacity(seqs.len());
        for seq in seqs {
            self.unplace(seq);
            let job = self.jobs.remove(&seq).expect("redriven job exists");
            self.ids.remove(&job.id);
            self.live -= 1;
            let target = job.headers[HEADER_ORIGINAL_QUEUE].clone();
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

    /// Puts a redriven job back, attempts reset, replacing its dead record.
    pub fn restore(&mut self, now: Millis, job: Redriven) {
        self.insert_with_id(
            now,
            job.job_id,
            job.kind,
            job.payload,
            job.headers,
            job.priority,
        );
    }

    /// Seqs of jobs whose lease expired since the last call (see [`Queue::job_by_seq`]).
    pub fn take_expired(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.expired)
    }

    /// Looks a job up by its seq (e.g. a lease's).
    pub fn job_by_seq(&self, seq: u64) -> Option<&Job> {
        self.jobs.get(&seq)
    }

    /// Remembered idempotency keys: (key, job id, expiry), for snapshots.
    pub fn dedup_entries(&self) -> Vec<(String, Uuid, Millis)> {
        self.dedup
            .iter()
            .map(|(k, (id, expires))| (k.clone(), *id, *expires))
            .collect()
    }

    /// Recovery: remembers an idempotency key until `expires`. Call in expiry order.
    pub fn restore_dedup(&mut self, key: String, id: Uuid, expires: Millis) {
        self.dedup.insert(key.clone(), (id, expires));
        self.dedup_expiry.push_back((expires, key));
    }

    /// Recovery: adds a job rebuilt from the write-ahead log, after every job restored
    /// before it (its seq is the next one, so call in enqueue order for live jobs and in
    /// finish order for finished ones). A job that was leased is visible again, because
    /// leases are not persisted: a crash causes a redelivery, never a loss. Ordering keys,
    /// indexes and history are rebuilt exactly as [`Queue::enqueue`] would.
    pub fn restore_job(&mut self, now: Millis, mut job: Job) {
        let seq = self.next_seq;
        self.next_seq += 1;
        job.seq = seq;
        job.lease_deadline = None;
        job.lease_nonce = 0;
        job.blocked = false;
        if let Some(old) = self.ids.insert(job.id, seq) {
            // Recovery hands each id over once; a repeat would be a bug there, and the
            // newest record wins like in `insert_with_id`.
            self.forget(old, now);
        }
        if job.state.is_finished() {
            self.jobs.insert(seq, job);
            self.history.push_back(seq);
            self.trim_history();
            return;
        }
        if job.state == JobState::Leased {
            job.state = JobState::Pending;
        }
        let updated_at = job.updated_at;
        let key = job.ordering_key.clone();
        self.jobs.insert(seq, job);
        self.live += 1;
        let mut active = true;
        if let Some(key) = key {
            let waiting = self.ordering.entry(key).or_default();
            active = waiting.is_empty();
            waiting.push_back(seq);
        }
        if active {
            self.place(seq, now);
        } else {
            self.blocked += 1;
        }
        let job = self.jobs.get_mut(&seq).expect("restored job exists");
        job.blocked = !active;
        if !active {
            job.state = JobState::Pending;
        }
        job.updated_at = updated_at;
    }

    /// Drops the record at `seq` entirely (used when recovery replaces a record).
    fn forget(&mut self, seq: u64, now: Millis) {
        let Some(state) = self.jobs.get(&seq).map(|j| j.state) else {
            return;
        };
        if state.is_finished() {
            self.history.retain(|s| *s != seq);
        } else {
            if state == JobState::Leased {
                self.end_lease(seq, now);
            } else {
                self.unplace(seq);
            }
            if self.jobs[&seq].blocked {
                self.blocked -= 1;
            }
            if let Some(key) = self.jobs[&seq].ordering_key.clone() {
                self.release_ordering_key(&key, seq, now);
            }
            self.live -= 1;
        }
        self.jobs.remove(&seq);
    }

    /// The queue's counters.
    pub fn counts(&self, now: Millis) -> QueueCounts {
        debug_assert_eq!(self.ready.len(), self.ready_since.len());
        let oldest = self
            .ready_since
            .keys()
            .next()
            .map(|(since, _)| now.saturating_sub(*since))
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
                .filter(|c| c.leases_held > 0 || c.last_seen + CONSUMER_ACTIVE_MS > now)
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

#[cfg(test)]
mod tests;
