//! Randomized model-based test of the queue state machine, and regression tests of the
//! bugs it found.
//!
//! A [`Queue`] and a deliberately naive reference model (plain maps of full job records,
//! written from SPEC §3, without indexes) are driven with the same long random sequences of
//! operations on two queues, `jobs` and its dead-letter queue `jobs.dlq`: enqueue batches
//! (priorities, delays, idempotency and ordering keys, headers, payloads from empty to
//! 40 KB, around the 16 KB own-chunk size), lease, ack (also in bulk), nack (explicit
//! delays, dead-letter flag), extend, settling stale or repeated leases, cancel, purge,
//! tick, get, list, history, dead letters routed into the DLQ, redrive back, pausing and
//! policy changes (history limit, attempts, backoff, depth, dedup window, DLQ), with time
//! advancing by random steps so leases expire and timers fire. Each operation's answer is
//! compared with the model's. After every step each live job's state, attempts, priority,
//! run time, blocking and lease, the finished jobs, the counters (with
//! `oldest_pending_age_ms` exact), the indexes and the consumers are compared; every 16th
//! step also every job through `list`, `history` and `get`, payloads, kinds and headers
//! included. After the last step everything is drained and no storage may be left.
//!
//! Where the spec is silent the model takes the queue's documented choice: a job waiting
//! behind its ordering key is `pending`; a job is visible (for the oldest-pending age) from
//! its run time; a retry after an expired lease is timed from the tick that expired it;
//! leases expiring in one tick die in the queue's order; a repeat ack succeeds while the job
//! is still in the history.
//!
//! The driver is generic over the engine ([`QueueUnderTest`]): the same generator and
//! model also drive the Redis store (`redis_scripts_follow_the_model` in
//! `broker/engine/redis/queue/model.rs`, whose module docs say what it adapts and what it
//! does not compare); the in-process run here is the reference and checks internals too.
//!
//! A failure prints the seed and the step. Re-run one seed (with a trace of its steps):
//! `SLUICE_MODEL_SEED=<seed> SLUICE_MODEL_TRACE=1 cargo nextest run --lib model_tests`.
//! `SLUICE_MODEL_SEEDS`, `SLUICE_MODEL_FIRST_SEED` and `SLUICE_MODEL_STEPS` set how many
//! seeds run, from which, and for how many steps (for longer soaks).

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};

use std::fmt;

use super::*;
use crate::broker::domain::limits::Headers;

const T0: Millis = 1_700_000_000_000;
/// Seeds are `ORDINARY_SEEDS + i` or `BULK_SEEDS + i`.
pub(crate) const ORDINARY_SEEDS: u64 = 0x51 << 32;
pub(crate) const BULK_SEEDS: u64 = 0xb1 << 32;
const MAIN: usize = 0;
const DLQ: usize = 1;
/// The queue and its dead-letter queue.
const NAMES: [&str; 2] = ["jobs", "jobs.dlq"];
const CONSUMERS: [&str; 3] = ["w1", "w2", "w3"];
const KINDS: [&str; 4] = ["email", "resize", "", "report"];
const ORDERING_KEYS: [&str; 3] = ["A", "B", "C"];

// ---- the reference model ---------------------------------------------------------------

#[derive(Debug, Clone)]
struct MLease {
    nonce: u64,
    deadline: Millis,
    leased_at: Millis,
    consumer: Arc<str>,
}

/// A job as the spec describes it: every field spelled out.
#[derive(Debug, Clone)]
struct MJob {
    id: Uuid,
    seq: u64,
    /// Given elsewhere (a dead letter or a redriven job), not made by this queue.
    foreign: bool,
    kind: String,
    payload: Bytes,
    headers: Headers,
    priority: u8,
    attempts: u32,
    max_attempts: u32,
    idempotency_key: Option<String>,
    ordering_key: Option<String>,
    state: JobState,
    enqueued_at: Millis,
    run_at: Millis,
    finished_at: Option<Millis>,
    lease: Option<MLease>,
    /// Nonce of the lease that finished the job (0 if none did).
    last_nonce: u64,
    /// Consumer of the lease that finished the job.
    last_consumer: Option<Arc<str>>,
    last_error: Option<String>,
    result: Option<Bytes>,
    dead_letter_queue: Option<String>,
    /// The queue the broker dead-lettered it from (only dead letters have one).
    origin: Option<String>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct MConsumer {
    held: u32,
    done: u64,
    failed: u64,
}

#[derive(Debug)]
pub(crate) struct Model {
    name: &'static str,
    policy: QueuePolicy,
    paused: bool,
    next_seq: u64,
    /// Live jobs by seq.
    live: BTreeMap<u64, MJob>,
    /// Finished jobs, oldest first.
    history: VecDeque<MJob>,
    /// (key, id, expires), latest per key.
    dedup: Vec<(String, Uuid, Millis)>,
    enqueued: u64,
    completed: u64,
    failed: u64,
    dead: u64,
    cancelled: u64,
    outbox: Vec<DeadLetter>,
    expired: Vec<u64>,
    consumers: BTreeMap<String, MConsumer>,
}

/// What a lease id may do, per the spec.
#[derive(Debug, PartialEq, Eq)]
enum MLeaseCheck {
    Live,
    AlreadyAcked,
    Stale,
}

fn clamp_max_attempts(n: u32) -> u32 {
    n.clamp(1, MAX_ATTEMPTS)
}

impl Model {
    fn new(name: &'static str, policy: QueuePolicy) -> Self {
        Self {
            name,
            policy,
            paused: false,
            next_seq: 1,
            live: BTreeMap::new(),
            history: VecDeque::new(),
            dedup: Vec::new(),
            enqueued: 0,
            completed: 0,
            failed: 0,
            dead: 0,
            cancelled: 0,
            outbox: Vec::new(),
            expired: Vec::new(),
            consumers: BTreeMap::new(),
        }
    }

    fn find(&self, id: &Uuid) -> Option<&MJob> {
        self.live
            .values()
            .find(|j| j.id == *id)
            .or_else(|| self.history.iter().find(|j| j.id == *id))
    }

    fn find_finished(&self, seq: u64) -> Option<&MJob> {
        self.history.iter().find(|j| j.seq == seq)
    }

    /// Waiting behind an earlier live job with the same ordering key.
    fn is_blocked(&self, j: &MJob) -> bool {
        j.ordering_key.is_some()
            && self
                .live
                .range(..j.seq)
                .any(|(_, o)| o.ordering_key == j.ordering_key)
    }

    /// Jobs a lease may take under `max_in_flight`: all of them without it.
    fn in_flight_room(&self) -> usize {
        let leased = self.live.values().filter(|j| j.lease.is_some()).count();
        self.policy
            .max_in_flight
            .map_or(usize::MAX, |max| (max as usize).saturating_sub(leased))
    }

    /// Jobs a lease may take now, best first.
    fn visible(&self) -> Vec<u64> {
        let mut v: Vec<&MJob> = self
            .live
            .values()
            .filter(|j| j.state == JobState::Pending && !self.is_blocked(j))
            .collect();
        v.sort_by_key(|j| (Reverse(j.priority), j.seq));
        v.into_iter().map(|j| j.seq).collect()
    }

    fn timers(&self) -> Vec<&MJob> {
        self.live
            .values()
            .filter(|j| {
                matches!(j.state, JobState::Scheduled | JobState::Retrying) && !self.is_blocked(j)
            })
            .collect()
    }

    fn backoff(&self, retry: u32) -> u64 {
        match &self.policy.backoff {
            Backoff::Schedule(d) if d.is_empty() => 0,
            Backoff::Schedule(d) => d[(retry as usize - 1).min(d.len() - 1)],
            Backoff::Exponential {
                initial_ms, max_ms, ..
            } => {
                let mut delay = *initial_ms;
                for _ in 1..retry {
                    delay = delay.saturating_mul(2).min(*max_ms);
                }
                delay.min(*max_ms)
            }
        }
    }

    /// Makes an active job visible or scheduled by its run time.
    fn place(j: &mut MJob, now: Millis) {
        j.state = if j.run_at > now {
            if j.attempts == 0 {
                JobState::Scheduled
            } else {
                JobState::Retrying
            }
        } else {
            JobState::Pending
        };
    }

    /// After the job at `seq` with `key` left: the next job of the key runs if it was first.
    fn release_key(&mut self, key: Option<String>, seq: u64, now: Millis) {
        let Some(key) = key else { return };
        let next = self
            .live
            .values()
            .find(|j| j.ordering_key.as_deref() == Some(&key))
            .map(|j| j.seq);
        if let Some(next) = next
            && next > seq
        {
            Self::place(self.live.get_mut(&next).unwrap(), now);
        }
    }

    fn end_lease(&mut self, j: &mut MJob) -> Option<MLease> {
        let l = j.lease.take()?;
        self.consumers.get_mut(&*l.consumer).unwrap().held -= 1;
        Some(l)
    }

    fn finish(&mut self, seq: u64, now: Millis, state: JobState, ended: Option<MLease>) {
        let mut j = self.live.remove(&seq).unwrap();
        j.state = state;
        j.finished_at = Some(now);
        j.lease = None;
        j.last_nonce = ended.as_ref().map_or(0, |l| l.nonce);
        j.last_consumer = ended.map(|l| l.consumer);
        let key = j.ordering_key.clone();
        self.history.push_back(j);
        self.release_key(key, seq, now);
        self.trim();
    }

    fn trim(&mut self) {
        while self.history.len() > self.policy.history_limit as usize {
            self.history.pop_front();
        }
    }

    fn check_lease(&self, now: Millis, lease: &LeaseId) -> MLeaseCheck {
        if let Some(j) = self.live.get(&lease.seq) {
            return match &j.lease {
                Some(l) if l.nonce == lease.nonce && l.deadline > now => MLeaseCheck::Live,
                _ => MLeaseCheck::Stale,
            };
        }
        match self.find_finished(lease.seq) {
            Some(j) if j.state == JobState::Completed && j.last_nonce == lease.nonce => {
                MLeaseCheck::AlreadyAcked
            }
            _ => MLeaseCheck::Stale,
        }
    }

    fn fail(
        &mut self,
        seq: u64,
        now: Millis,
        error: String,
        delay: Option<u64>,
        dead_letter: bool,
    ) -> FailOutcome {
        let mut j = self.live.remove(&seq).unwrap();
        let ended = self.end_lease(&mut j);
        if let Some(l) = &ended {
            self.consumers.get_mut(&*l.consumer).unwrap().failed += 1;
        }
        self.failed += 1;
        j.last_error = Some(error);
        let last = j.attempts >= j.max_attempts;
        let attempts = j.attempts;
        self.live.insert(seq, j);
        if dead_letter || last {
            self.kill(seq, now, ended);
            return FailOutcome::Dead;
        }
        let delay = delay.unwrap_or_else(|| self.backoff(attempts));
        let j = self.live.get_mut(&seq).unwrap();
        j.run_at = now + delay;
        Self::place(j, now);
        FailOutcome::Retry { at: now + delay }
    }

    fn kill(&mut self, seq: u64, now: Millis, ended: Option<MLease>) {
        self.dead += 1;
        let target = self.policy.dead_letter_queue.clone();
        let j = self.live.get_mut(&seq).unwrap();
        if !target.is_empty() {
            j.dead_letter_queue = Some(target.clone());
            let mut headers = j.headers.clone();
            headers.insert(HEADER_ORIGINAL_QUEUE.into(), self.name.into());
            headers.insert(HEADER_ATTEMPTS.into(), j.attempts.to_string());
            headers.insert(
                HEADER_LAST_ERROR.into(),
                j.last_error.clone().unwrap_or_default(),
            );
            headers.insert(HEADER_DEAD_LETTERED_AT.into(), now.to_string());
            self.outbox.push(DeadLetter {
                target,
                origin: self.name.into(),
                job_id: j.id,
                kind: j.kind.clone(),
                payload: j.payload.clone(),
                headers,
                priority: j.priority,
            });
        }
        self.finish(seq, now, JobState::Dead, ended);
    }

    fn prune_dedup(&mut self, now: Millis) {
        self.dedup.retain(|(_, _, expires)| *expires > now);
    }

    /// Expires due leases (each a failed attempt), then makes due jobs visible. The spec
    /// leaves open in which order leases that expire in one tick die (it shows in the
    /// history): `order` sorts the due `(deadline, seq)`s into the engine's order
    /// ([`QueueUnderTest::order_expired`]).
    fn tick(&mut self, now: Millis, order: impl FnOnce(&mut [(Millis, u64)])) {
        let mut due: Vec<(Millis, u64)> = self
            .live
            .values()
            .filter_map(|j| j.lease.as_ref().map(|l| (l.deadline, j.seq)))
            .filter(|(deadline, _)| *deadline <= now)
            .collect();
        order(&mut due);
        for (deadline, seq) in due {
            let error =
                format!("lease expired at {deadline} (no ack within the visibility timeout)");
            self.fail(seq, deadline, error, None, false);
            self.expired.push(seq);
        }
        let due: Vec<u64> = self
            .timers()
            .iter()
            .filter(|j| j.run_at <= now)
            .map(|j| j.seq)
            .collect();
        for seq in due {
            self.live.get_mut(&seq).unwrap().state = JobState::Pending;
        }
        self.prune_dedup(now);
    }

    /// Removes a record without counting it (it is replaced or moved away).
    fn forget(&mut self, id: &Uuid, now: Millis) {
        if let Some(i) = self.history.iter().position(|j| j.id == *id) {
            self.history.remove(i);
            return;
        }
        let Some(seq) = self.live.values().find(|j| j.id == *id).map(|j| j.seq) else {
            return;
        };
        let mut j = self.live.remove(&seq).unwrap();
        self.end_lease(&mut j);
        self.release_key(j.ordering_key, seq, now);
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
        self.forget(&id, now);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.live.insert(
            seq,
            MJob {
                id,
                seq,
                foreign: true,
                kind,
                payload,
                headers,
                priority,
                attempts: 0,
                max_attempts: clamp_max_attempts(self.policy.max_attempts),
                idempotency_key: None,
                ordering_key: None,
                state: JobState::Pending,
                enqueued_at: now,
                run_at: now,
                finished_at: None,
                lease: None,
                last_nonce: 0,
                last_consumer: None,
                last_error: None,
                result: None,
                dead_letter_queue: None,
                origin,
            },
        );
    }
}

// ---- comparing the queue with the model ------------------------------------------------

/// Where the run is, for failure messages.
pub(crate) struct Ctx {
    seed: u64,
    step: usize,
    op: String,
}

impl Ctx {
    /// Fails the run here, saying `what`.
    pub(crate) fn fail(&self, what: impl fmt::Display) -> ! {
        panic!(
            "seed {} step {} (op: {}): {what}",
            self.seed, self.step, self.op
        );
    }
}

macro_rules! ensure {
    ($ctx:expr, $cond:expr, $($fmt:tt)+) => {
        if !$cond {
            panic!(
                "seed {} step {} (op: {}): {}",
                $ctx.seed, $ctx.step, $ctx.op, format!($($fmt)+)
            );
        }
    };
}

macro_rules! ensure_eq {
    ($ctx:expr, $a:expr, $b:expr, $($fmt:tt)+) => {{
        let (a, b) = (&$a, &$b);
        if a != b {
            panic!(
                "seed {} step {} (op: {}): {}: queue {:?} != model {:?}",
                $ctx.seed, $ctx.step, $ctx.op, format!($($fmt)+), a, b
            );
        }
    }};
}

fn is_failed_precondition<T: fmt::Debug>(r: &Result<T, BrokerError>) -> bool {
    matches!(r, Err(BrokerError::FailedPrecondition(_)))
}

/// Names a model job in messages, formatted only when a check fails.
struct Named<'a>(&'a MJob);

impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "job seq {} id {}", self.0.seq, self.0.id)
    }
}

fn compare_job(ctx: &Ctx, q: &Job, m: &MJob, payload: bool) {
    let what = Named(m);
    ensure_eq!(ctx, q.id, m.id, "{what}: id");
    ensure_eq!(ctx, q.seq, m.seq, "{what}: seq");
    ensure_eq!(ctx, q.state, m.state, "{what}: state");
    ensure_eq!(ctx, q.attempts, m.attempts, "{what}: attempts");
    ensure_eq!(ctx, q.max_attempts, m.max_attempts, "{what}: max_attempts");
    ensure_eq!(ctx, q.kind, m.kind, "{what}: kind");
    ensure_eq!(ctx, q.headers, m.headers, "{what}: headers");
    ensure_eq!(ctx, q.priority, m.priority, "{what}: priority");
    ensure_eq!(
        ctx,
        q.idempotency_key,
        m.idempotency_key,
        "{what}: idem key"
    );
    ensure_eq!(
        ctx,
        q.ordering_key.as_deref(),
        m.ordering_key.as_deref(),
        "{what}: ordering key"
    );
    ensure_eq!(ctx, q.enqueued_at, m.enqueued_at, "{what}: enqueued_at");
    ensure_eq!(ctx, q.run_at, m.run_at, "{what}: run_at");
    ensure_eq!(ctx, q.finished_at, m.finished_at, "{what}: finished_at");
    ensure_eq!(ctx, q.last_error, m.last_error, "{what}: last_error");
    ensure_eq!(ctx, q.result, m.result, "{what}: result");
    ensure_eq!(
        ctx,
        q.dead_letter_queue,
        m.dead_letter_queue,
        "{what}: dead_letter_queue"
    );
    ensure_eq!(ctx, q.origin, m.origin, "{what}: origin");
    match &m.lease {
        Some(l) => {
            ensure_eq!(ctx, q.lease_deadline, Some(l.deadline), "{what}: deadline");
            ensure_eq!(ctx, q.lease_nonce, l.nonce, "{what}: lease nonce");
            ensure_eq!(
                ctx,
                q.consumer.as_deref(),
                Some(&*l.consumer),
                "{what}: consumer"
            );
        }
        None if m.state.is_finished() => {
            ensure_eq!(ctx, q.lease_deadline, None, "{what}: deadline");
            ensure_eq!(ctx, q.lease_nonce, m.last_nonce, "{what}: lease nonce");
            ensure_eq!(
                ctx,
                q.consumer.as_deref(),
                m.last_consumer.as_deref(),
                "{what}: consumer"
            );
        }
        None => {
            ensure_eq!(ctx, q.lease_deadline, None, "{what}: deadline");
            ensure_eq!(ctx, q.consumer.as_deref(), None, "{what}: consumer");
        }
    }
    if payload {
        ensure!(
            ctx,
            q.payload == m.payload,
            "{what}: payload differs (queue {} bytes, model {} bytes)",
            q.payload.len(),
            m.payload.len()
        );
    }
}

fn compare_delivery(ctx: &Ctx, d: &Delivery, m: &MJob, name: &str) {
    let what = Named(m);
    ensure_eq!(ctx, d.job_id, m.id, "{what}: id");
    ensure_eq!(ctx, d.lease_id.seq, m.seq, "{what}: lease seq");
    ensure_eq!(ctx, &*d.lease_id.queue, name, "{what}: lease queue");
    ensure!(ctx, d.lease_id.nonce != 0, "{what}: zero nonce");
    ensure_eq!(ctx, &*d.kind, m.kind.as_str(), "{what}: kind");
    ensure_eq!(ctx, d.headers, m.headers, "{what}: headers");
    ensure_eq!(ctx, d.priority, m.priority, "{what}: priority");
    ensure_eq!(ctx, d.attempt, m.attempts, "{what}: attempt");
    ensure_eq!(ctx, d.max_attempts, m.max_attempts, "{what}: max_attempts");
    ensure_eq!(ctx, d.enqueued_at, m.enqueued_at, "{what}: enqueued_at");
    ensure_eq!(
        ctx,
        d.ordering_key.as_deref(),
        m.ordering_key.as_deref(),
        "{what}: ordering key"
    );
    ensure!(
        ctx,
        d.payload == m.payload,
        "{what}: payload differs (queue {} bytes, model {} bytes)",
        d.payload.len(),
        m.payload.len()
    );
}

/// Compares everything observable (and the indexes) of one queue with its model.
fn check_queue(ctx: &Ctx, q: &Queue, m: &Model, now: Millis, full: bool) {
    // The model's derived views, computed once (plain vectors: this runs every step).
    let live: Vec<&MJob> = m.live.values().collect();
    let mut keys_seen: Vec<&str> = Vec::new();
    let blocked: Vec<bool> = live
        .iter()
        .map(|j| match j.ordering_key.as_deref() {
            Some(k) if keys_seen.contains(&k) => true,
            Some(k) => {
                keys_seen.push(k);
                false
            }
            None => false,
        })
        .collect();
    let mut visible: Vec<&MJob> = live
        .iter()
        .zip(&blocked)
        .filter(|(j, b)| j.state == JobState::Pending && !**b)
        .map(|(j, _)| *j)
        .collect();
    visible.sort_by_key(|j| (Reverse(j.priority), j.seq));
    let timers: Vec<&MJob> = live
        .iter()
        .zip(&blocked)
        .filter(|(j, b)| matches!(j.state, JobState::Scheduled | JobState::Retrying) && !**b)
        .map(|(j, _)| *j)
        .collect();
    let leases: Vec<Millis> = live
        .iter()
        .filter_map(|j| j.lease.as_ref().map(|l| l.deadline))
        .collect();
    let blocked_count = blocked.iter().filter(|b| **b).count();
    let count = |s: JobState| live.iter().filter(|j| j.state == s).count() as u64;
    let name = m.name;

    // Counters.
    let c = q.counts(now);
    ensure_eq!(ctx, c.pending, count(JobState::Pending), "{name}: pending");
    ensure_eq!(
        ctx,
        c.scheduled,
        count(JobState::Scheduled),
        "{name}: scheduled"
    );
    ensure_eq!(ctx, c.leased, count(JobState::Leased), "{name}: leased");
    ensure_eq!(
        ctx,
        c.retrying,
        count(JobState::Retrying),
        "{name}: retrying"
    );
    ensure_eq!(ctx, c.enqueued, m.enqueued, "{name}: enqueued");
    ensure_eq!(ctx, c.completed, m.completed, "{name}: completed");
    ensure_eq!(ctx, c.failed, m.failed, "{name}: failed");
    ensure_eq!(ctx, c.dead, m.dead, "{name}: dead");
    ensure_eq!(ctx, c.cancelled, m.cancelled, "{name}: cancelled");
    ensure_eq!(ctx, c.paused, m.paused, "{name}: paused");
    // Age of the job that has been visible longest (visible since its run time).
    let oldest = visible
        .iter()
        .map(|j| j.run_at)
        .min()
        .map_or(0, |since| now.saturating_sub(since));
    ensure_eq!(
        ctx,
        c.oldest_pending_age_ms,
        oldest,
        "{name}: oldest pending age"
    );
    ensure_eq!(ctx, q.live_jobs(), m.live.len() as u64, "{name}: live jobs");
    let has_visible = !m.paused && !visible.is_empty() && m.in_flight_room() > 0;
    ensure_eq!(ctx, q.has_visible(now), has_visible, "{name}: has_visible");

    // Indexes.
    ensure_eq!(ctx, q.ready.len(), visible.len(), "{name}: ready index");
    ensure_eq!(ctx, q.timers.len(), timers.len(), "{name}: timers");
    ensure_eq!(ctx, q.leases.len(), leases.len(), "{name}: leases");
    ensure_eq!(ctx, q.blocked, blocked_count as u64, "{name}: blocked");
    ensure_eq!(
        ctx,
        q.retrying,
        count(JobState::Retrying),
        "{name}: retrying"
    );
    let first_deadline = leases.iter().min().copied();
    ensure_eq!(
        ctx,
        q.deadlines.first(),
        first_deadline,
        "{name}: first deadline"
    );
    let next_due = timers.iter().map(|j| j.run_at).chain(first_deadline).min();
    ensure_eq!(ctx, q.next_due(), next_due, "{name}: next_due");
    let mut ordering: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for j in &live {
        if let Some(k) = &j.ordering_key {
            ordering.entry(k).or_default().push(j.seq);
        }
    }
    ensure_eq!(
        ctx,
        q.ordering.len(),
        ordering.len(),
        "{name}: ordering keys"
    );
    for (k, seqs) in &ordering {
        let got = q
            .ordering
            .get(*k)
            .map(|v| v.iter().copied().collect::<Vec<_>>());
        ensure_eq!(
            ctx,
            got.as_ref(),
            Some(seqs),
            "{name}: jobs of ordering key {k}"
        );
    }
    let foreign: Vec<&MJob> = m
        .live
        .values()
        .chain(m.history.iter())
        .filter(|j| j.foreign)
        .collect();
    ensure_eq!(ctx, q.foreign.len(), foreign.len(), "{name}: foreign ids");
    for j in foreign {
        ensure_eq!(
            ctx,
            q.foreign.get(&j.id),
            Some(&j.seq),
            "{name}: foreign id {}",
            j.id
        );
    }

    // Every live job, from its slot and lease.
    ensure_eq!(ctx, q.slots.len(), live.len(), "{name}: slots");
    for (j, is_blocked) in live.iter().zip(&blocked) {
        let what = Named(j);
        let seq = j.seq;
        let Some(slot) = q.slots.get(seq) else {
            panic!(
                "seed {} step {}: {name}: {what} has no slot",
                ctx.seed, ctx.step
            );
        };
        ensure_eq!(ctx, slot.state, j.state, "{name}: {what}: state");
        ensure_eq!(
            ctx,
            u32::from(slot.attempts),
            j.attempts,
            "{name}: {what}: attempts"
        );
        ensure_eq!(ctx, slot.priority, j.priority, "{name}: {what}: priority");
        ensure_eq!(ctx, slot.run_at(), j.run_at, "{name}: {what}: run_at");
        ensure_eq!(
            ctx,
            slot.enqueued_at,
            j.enqueued_at,
            "{name}: {what}: enqueued_at"
        );
        ensure_eq!(ctx, slot.blocked, *is_blocked, "{name}: {what}: blocked");
        let lease = q.leases.get(&seq).map(|l| (l.nonce, l.deadline));
        let expected = j.lease.as_ref().map(|l| (l.nonce, l.deadline));
        ensure_eq!(ctx, lease, expected, "{name}: {what}: lease");
    }

    // Finished jobs, from the history.
    let history: Vec<u64> = q.history.iter().copied().collect();
    let expected: Vec<u64> = m.history.iter().map(|j| j.seq).collect();
    ensure_eq!(ctx, history, expected, "{name}: history seqs, oldest first");
    ensure_eq!(ctx, q.finished.len(), m.history.len(), "{name}: finished");
    for j in &m.history {
        let got = q
            .finished
            .get(&j.seq)
            .map(|f| (q.id_of(j.seq, &f.slot), f.slot.state));
        ensure_eq!(
            ctx,
            got,
            Some((j.id, j.state)),
            "{name}: finished seq {}",
            j.seq
        );
    }

    // Consumers.
    let consumers = q.consumers();
    ensure_eq!(ctx, consumers.len(), m.consumers.len(), "{name}: consumers");
    for (consumer, c) in consumers {
        let got = MConsumer {
            held: c.leases_held,
            done: c.done,
            failed: c.failed,
        };
        ensure_eq!(
            ctx,
            Some(&got),
            m.consumers.get(&*consumer),
            "{name}: {consumer}"
        );
    }

    if !full {
        return;
    }
    // Every job through the public API, payloads included.
    let (page, next) = q.list(None, 0, usize::MAX);
    ensure_eq!(ctx, next, None, "{name}: list next");
    ensure_eq!(ctx, page.len(), m.live.len(), "{name}: list length");
    for (qj, mj) in page.iter().zip(m.live.values()) {
        compare_job(ctx, qj, mj, true);
    }
    let history = q.history(usize::MAX);
    ensure_eq!(
        ctx,
        history.len(),
        m.history.len(),
        "{name}: history length"
    );
    for (qj, mj) in history.iter().zip(m.history.iter().rev()) {
        compare_job(ctx, qj, mj, true);
    }
    for mj in m.live.values().chain(m.history.iter()) {
        let got = q.get(&mj.id);
        ensure!(ctx, got.is_some(), "{name}: get({}) found nothing", mj.id);
        let got = got.unwrap();
        compare_job(ctx, &got, mj, false);
        // The WAL's state-change record is read without materializing the job.
        ensure_eq!(
            ctx,
            q.job_update(got.seq),
            Some(JobUpdate::from(&got)),
            "{name}: job_update({})",
            mj.id
        );
    }
}

// ---- the engines under test ------------------------------------------------------------

/// A queue of some engine, as the driver drives it: every call names its time. The
/// in-process [`Queue`] is one; the Redis store is another
/// (`broker/engine/redis/queue/model.rs`, whose module docs list what it adapts).
pub(crate) trait QueueUnderTest: Sized {
    /// What opening a queue needs.
    type Env;
    /// The in-process queue, the reference: exact answers (an ack's held time), internals
    /// checked every step. Other engines' answers are compared where they report them.
    const IN_PROCESS: bool;
    /// Every how many steps each job is compared through `list`, `history` and `get`.
    const FULL_CHECK_EVERY: usize;
    /// A new, empty queue (the run's earlier queue of that name is gone).
    fn open(env: &Self::Env, name: &'static str, policy: QueuePolicy) -> Self;
    /// Stores jobs, all or none.
    fn enqueue(&mut self, now: Millis, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, BrokerError>;
    /// Leases up to `max` visible jobs, expiring due leases and firing due timers first.
    fn lease(
        &mut self,
        now: Millis,
        max: usize,
        visibility_ms: u64,
        consumer: &Arc<str>,
        address: &str,
    ) -> Vec<Delivery>;
    /// Acks a lease: how long it was held (`None` for a repeat ack, and always `None`
    /// where the engine does not say).
    fn ack(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        result: Option<Bytes>,
    ) -> Result<Option<Millis>, BrokerError>;
    /// Fails a delivery.
    fn nack(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        error: String,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> Result<FailOutcome, BrokerError>;
    /// Moves a live lease's deadline.
    fn extend(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        visibility_ms: u64,
    ) -> Result<Millis, BrokerError>;
    /// What a lease may do; `None` where the engine has no such call.
    fn check_lease(&self, now: Millis, lease: &LeaseId) -> Option<Result<LeaseCheck, BrokerError>>;
    /// Cancels a job that is not leased.
    fn cancel(&mut self, now: Millis, id: &Uuid) -> Result<Job, BrokerError>;
    /// Deletes a job whatever its state.
    fn delete(&mut self, now: Millis, id: &Uuid) -> Result<Job, BrokerError>;
    /// Cancels every job that is not leased.
    fn purge(&mut self, now: Millis) -> Purged;
    /// Expires due leases and fires due timers.
    fn tick(&mut self, now: Millis);
    /// Sorts leases `(deadline, seq)` that expire in one tick into the order they die in.
    fn order_expired(&self, due: &mut [(Millis, u64)]);
    /// Seqs of leases expired since the last call; `None` where the engine does not say.
    fn take_expired(&mut self) -> Option<Vec<u64>>;
    /// Routes this queue's dead letters into `dlq` at `now`.
    fn route_dead_letters(&mut self, dlq: &mut Self, now: Millis) -> Routed;
    /// Redrives jobs of this dead-letter queue into `main` (the only origin, writable if
    /// `allowed`): the jobs moved and the ids skipped; `None` where the engine has no
    /// redrive (yet).
    fn redrive(
        &mut self,
        main: &mut Self,
        now: Millis,
        ids: &[Uuid],
        max: usize,
        allowed: bool,
    ) -> Option<(Vec<Redriven>, Vec<Uuid>)>;
    /// A job by id, live or in history.
    fn get(&self, id: &Uuid) -> Option<Job>;
    /// Jobs in `state` (live ones if `None`) after seq `after`, and the seq to go on after.
    fn list(&self, state: Option<JobState>, after: u64, limit: usize) -> (Vec<Job>, Option<u64>);
    /// The newest finished jobs, newest first.
    fn history(&self, limit: usize) -> Vec<Job>;
    /// Replaces the policy.
    fn set_policy(&mut self, policy: QueuePolicy);
    /// Pauses or resumes leasing.
    fn set_paused(&mut self, paused: bool);
    /// Live (unfinished) jobs.
    fn live_jobs(&self) -> u64;
    /// The counters.
    fn counts(&self, now: Millis) -> QueueCounts;
    /// The consumers seen, by name.
    fn consumers(&self) -> Vec<(Arc<str>, ConsumerState)>;
    /// Compares what the engine reports of its queue with the model, everything (each job
    /// through `list`, `history` and `get`) if `full`.
    fn check(&self, ctx: &Ctx, m: &Model, now: Millis, full: bool);
    /// After a drain (nothing live, every dedup window over): with no history kept, no
    /// storage may be left.
    fn check_drained(&mut self, ctx: &Ctx);
}

/// What a purge answers.
#[derive(Debug)]
pub(crate) enum Purged {
    /// The ids of the jobs it cancelled, in seq order.
    Ids(Vec<Uuid>),
    /// How many it cancelled.
    Count(u64),
}

/// Dead letters routed into a dead-letter queue.
#[derive(Debug)]
pub(crate) enum Routed {
    /// The letters, handed over by the engine (and already inserted).
    Letters(Vec<DeadLetter>),
    /// How many the engine moved by itself.
    Moved(u64),
}

impl QueueUnderTest for Queue {
    type Env = ();
    const IN_PROCESS: bool = true;
    const FULL_CHECK_EVERY: usize = 16;

    fn open(_: &(), name: &'static str, policy: QueuePolicy) -> Self {
        Queue::new(name, policy)
    }

    fn enqueue(&mut self, now: Millis, jobs: Vec<NewJob>) -> Result<Vec<Enqueued>, BrokerError> {
        Queue::enqueue(self, now, jobs)
    }

    fn lease(
        &mut self,
        now: Millis,
        max: usize,
        visibility_ms: u64,
        consumer: &Arc<str>,
        address: &str,
    ) -> Vec<Delivery> {
        Queue::lease(self, now, max, visibility_ms, consumer, address)
    }

    fn ack(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        result: Option<Bytes>,
    ) -> Result<Option<Millis>, BrokerError> {
        Queue::ack(self, now, lease, result)
    }

    fn nack(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        error: String,
        retry_delay_ms: Option<u64>,
        dead_letter: bool,
    ) -> Result<FailOutcome, BrokerError> {
        Queue::nack(self, now, lease, error, retry_delay_ms, dead_letter)
    }

    fn extend(
        &mut self,
        now: Millis,
        lease: &LeaseId,
        visibility_ms: u64,
    ) -> Result<Millis, BrokerError> {
        Queue::extend(self, now, lease, visibility_ms)
    }

    fn check_lease(&self, now: Millis, lease: &LeaseId) -> Option<Result<LeaseCheck, BrokerError>> {
        Some(Queue::check_lease(self, now, lease))
    }

    fn cancel(&mut self, now: Millis, id: &Uuid) -> Result<Job, BrokerError> {
        Queue::cancel(self, now, id)
    }

    fn delete(&mut self, now: Millis, id: &Uuid) -> Result<Job, BrokerError> {
        Queue::delete(self, now, id)
    }

    fn purge(&mut self, now: Millis) -> Purged {
        Purged::Ids(self.purge_ids(now))
    }

    fn tick(&mut self, now: Millis) {
        Queue::tick(self, now);
    }

    fn order_expired(&self, due: &mut [(Millis, u64)]) {
        // The order the queue expired them in (it has not handed them over yet).
        due.sort_unstable_by_key(|(deadline, seq)| {
            let at = self
                .expired
                .iter()
                .position(|s| s == seq)
                .unwrap_or(usize::MAX);
            (at, *deadline, *seq)
        });
    }

    fn take_expired(&mut self) -> Option<Vec<u64>> {
        Some(Queue::take_expired(self))
    }

    fn route_dead_letters(&mut self, dlq: &mut Self, now: Millis) -> Routed {
        let letters = self.take_dead_letters();
        for letter in &letters {
            dlq.insert_dead_letter(now, letter.clone());
        }
        Routed::Letters(letters)
    }

    fn redrive(
        &mut self,
        main: &mut Self,
        now: Millis,
        ids: &[Uuid],
        max: usize,
        allowed: bool,
    ) -> Option<(Vec<Redriven>, Vec<Uuid>)> {
        let (moved, skipped) =
            self.take_for_redrive(now, ids, max, |origin| allowed && origin == main.name());
        for r in &moved {
            main.restore(now, r.clone());
        }
        Some((moved, skipped))
    }

    fn get(&self, id: &Uuid) -> Option<Job> {
        Queue::get(self, id)
    }

    fn list(&self, state: Option<JobState>, after: u64, limit: usize) -> (Vec<Job>, Option<u64>) {
        Queue::list(self, state, after, limit)
    }

    fn history(&self, limit: usize) -> Vec<Job> {
        Queue::history(self, limit)
    }

    fn set_policy(&mut self, policy: QueuePolicy) {
        Queue::set_policy(self, policy);
    }

    fn set_paused(&mut self, paused: bool) {
        Queue::set_paused(self, paused);
    }

    fn live_jobs(&self) -> u64 {
        Queue::live_jobs(self)
    }

    fn counts(&self, now: Millis) -> QueueCounts {
        Queue::counts(self, now)
    }

    fn consumers(&self) -> Vec<(Arc<str>, ConsumerState)> {
        Queue::consumers(self)
    }

    fn check(&self, ctx: &Ctx, m: &Model, now: Millis, full: bool) {
        check_queue(ctx, self, m, now, full);
    }

    fn check_drained(&mut self, ctx: &Ctx) {
        // Finished jobs in history keep their payloads' chunks: with no history, nothing
        // may be left.
        let mut policy = self.policy().clone();
        policy.history_limit = 0;
        Queue::set_policy(self, policy);
        let q = &*self;
        ensure_eq!(ctx, q.slots.len(), 0, "{}: slots", q.name);
        ensure!(ctx, q.finished.is_empty(), "{}: finished", q.name);
        ensure!(
            ctx,
            format!("{:?}", q.slots).contains("pages: []"),
            "{}: slot pages: {:?}",
            q.name,
            q.slots
        );
        ensure_eq!(
            ctx,
            format!("{:?}", q.ready),
            format!("{:?}", Ready::default()),
            "{}: ready",
            q.name
        );
        ensure!(ctx, q.timers.is_empty(), "{}: timers", q.name);
        ensure!(
            ctx,
            q.leases.is_empty() && q.deadlines.is_empty(),
            "{}: leases",
            q.name
        );
        ensure!(ctx, q.ordering.is_empty(), "{}: ordering keys", q.name);
        ensure_eq!(
            ctx,
            (q.blocked, q.retrying),
            (0, 0),
            "{}: blocked, retrying",
            q.name
        );
        ensure!(ctx, q.dedup.is_empty(), "{}: dedup", q.name);
        ensure!(
            ctx,
            !format!("{:?}", q.payloads).contains("Some("),
            "{}: payload chunks left: {:?}",
            q.name,
            q.payloads
        );
        ensure!(
            ctx,
            q.outbox.is_empty() && q.expired.is_empty(),
            "{}: outbox",
            q.name
        );
        ensure!(
            ctx,
            q.foreign.values().all(|seq| q.finished.contains_key(seq)),
            "{}: foreign ids of jobs that are gone",
            q.name
        );
    }
}

/// Compares what any engine reports through its API with the model: the counters, the
/// consumers and, if `full`, every job through `list`, `history` and `get`. For an engine
/// whose internals are not checked ([`check_queue`] does that for the in-process queue).
pub(crate) fn check_observable<Q: QueueUnderTest>(
    ctx: &Ctx,
    q: &Q,
    m: &Model,
    now: Millis,
    full: bool,
) {
    let name = m.name;
    let count = |s: JobState| m.live.values().filter(|j| j.state == s).count() as u64;
    let c = q.counts(now);
    ensure_eq!(ctx, c.pending, count(JobState::Pending), "{name}: pending");
    ensure_eq!(
        ctx,
        c.scheduled,
        count(JobState::Scheduled),
        "{name}: scheduled"
    );
    ensure_eq!(ctx, c.leased, count(JobState::Leased), "{name}: leased");
    ensure_eq!(
        ctx,
        c.retrying,
        count(JobState::Retrying),
        "{name}: retrying"
    );
    ensure_eq!(ctx, c.enqueued, m.enqueued, "{name}: enqueued");
    ensure_eq!(ctx, c.completed, m.completed, "{name}: completed");
    ensure_eq!(ctx, c.failed, m.failed, "{name}: failed");
    ensure_eq!(ctx, c.dead, m.dead, "{name}: dead");
    ensure_eq!(ctx, c.cancelled, m.cancelled, "{name}: cancelled");
    ensure_eq!(ctx, c.paused, m.paused, "{name}: paused");
    // The age of the oldest front of each priority (a documented approximation of the
    // exact age, which the in-process check compares): the front is the visible job of
    // the priority with the lowest seq.
    let mut fronts: BTreeMap<u8, &MJob> = BTreeMap::new();
    for seq in m.visible() {
        let j = &m.live[&seq];
        fronts.entry(j.priority).or_insert(j);
    }
    let oldest = fronts
        .values()
        .map(|j| now.saturating_sub(j.run_at))
        .max()
        .unwrap_or(0);
    ensure_eq!(
        ctx,
        c.oldest_pending_age_ms,
        oldest,
        "{name}: oldest pending age (of the priorities' fronts)"
    );
    ensure_eq!(ctx, q.live_jobs(), m.live.len() as u64, "{name}: live jobs");
    let consumers = q.consumers();
    ensure_eq!(ctx, consumers.len(), m.consumers.len(), "{name}: consumers");
    for (consumer, c) in consumers {
        let got = MConsumer {
            held: c.leases_held,
            done: c.done,
            failed: c.failed,
        };
        ensure_eq!(
            ctx,
            Some(&got),
            m.consumers.get(&*consumer),
            "{name}: {consumer}"
        );
    }
    if !full {
        return;
    }
    let (page, next) = q.list(None, 0, usize::MAX);
    ensure_eq!(ctx, next, None, "{name}: list next");
    ensure_eq!(ctx, page.len(), m.live.len(), "{name}: list length");
    for (qj, mj) in page.iter().zip(m.live.values()) {
        compare_job(ctx, qj, mj, true);
    }
    let history = q.history(usize::MAX);
    ensure_eq!(
        ctx,
        history.len(),
        m.history.len(),
        "{name}: history length"
    );
    for (qj, mj) in history.iter().zip(m.history.iter().rev()) {
        compare_job(ctx, qj, mj, true);
    }
    for mj in m.live.values().chain(m.history.iter()) {
        let got = q.get(&mj.id);
        ensure!(ctx, got.is_some(), "{name}: get({}) found nothing", mj.id);
        compare_job(ctx, &got.unwrap(), mj, false);
    }
}

// ---- the random driver -----------------------------------------------------------------

struct World<Q: QueueUnderTest> {
    rng: fastrand::Rng,
    now: Millis,
    queues: [Q; 2],
    models: [Model; 2],
    /// Deliveries handed out (queue index, lease), newest last; old ones go stale.
    leases: Vec<(usize, LeaseId)>,
    /// Jobs acked anywhere: never delivered again.
    acked: HashSet<Uuid>,
    /// Big batches and leases.
    bulk: bool,
    /// Random bytes that payloads are cut from.
    pool: Bytes,
    ctx: Ctx,
}

fn random_backoff(rng: &mut fastrand::Rng) -> Backoff {
    if rng.bool() {
        let n = rng.usize(0..4);
        Backoff::Schedule(
            (0..n)
                .map(|_| [0, 1, 50, 500, 2_000, 10_000][rng.usize(0..6)])
                .collect(),
        )
    } else {
        Backoff::Exponential {
            initial_ms: rng.u64(0..2_000),
            max_ms: rng.u64(0..20_000),
            jitter: false,
        }
    }
}

fn random_policy(rng: &mut fastrand::Rng, name: &str, bulk: bool) -> QueuePolicy {
    let mut p = QueuePolicy::default_for(name);
    p.max_attempts = rng.u32(1..5);
    p.backoff = random_backoff(rng);
    p.max_depth = if bulk {
        rng.u64(100..300)
    } else {
        rng.u64(4..40)
    };
    p.dedup_window_ms = [0, 1, 1_000, 20_000][rng.usize(0..4)];
    p.history_limit = [0, 1, 2, 5, 20, 40][rng.usize(0..6)];
    if !p.dead_letter_queue.is_empty() && rng.u8(0..10) == 0 {
        // Keep dead jobs here.
        p.dead_letter_queue = String::new();
    }
    if rng.u8(0..4) == 0 {
        p.max_in_flight = Some(rng.u32(1..6));
    }
    p
}

/// A payload: a random slice of `pool` (random bytes), so payloads differ.
fn random_payload(rng: &mut fastrand::Rng, pool: &Bytes) -> Bytes {
    let len = match rng.u8(0..20) {
        0..=1 => 0,
        2..=13 => rng.usize(1..200),
        14..=16 => rng.usize(200..16 * 1024),
        17 => [16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1][rng.usize(0..3)],
        _ => rng.usize(16 * 1024..40 * 1024),
    };
    let at = rng.usize(0..=pool.len() - len);
    pool.slice(at..at + len)
}

impl<Q: QueueUnderTest> World<Q> {
    fn new(seed: u64, env: &Q::Env) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        // The queue's own randomness (nonces, id tags) must not depend on test order.
        fastrand::seed(seed ^ 0x9e37_79b9_7f4a_7c15);
        // Bulk seeds run big batches: deadline groups big enough to compact.
        let bulk = seed >> 32 == BULK_SEEDS >> 32;
        let main = random_policy(&mut rng, NAMES[MAIN], bulk);
        let mut dlq = QueuePolicy::default_for(NAMES[DLQ]);
        dlq.max_attempts = rng.u32(1..4);
        dlq.backoff = Backoff::Schedule(vec![0, 100]);
        dlq.history_limit = rng.u32(0..10);
        Self {
            now: T0,
            queues: [
                Q::open(env, NAMES[MAIN], main.clone()),
                Q::open(env, NAMES[DLQ], dlq.clone()),
            ],
            models: [Model::new(NAMES[MAIN], main), Model::new(NAMES[DLQ], dlq)],
            leases: Vec::new(),
            acked: HashSet::new(),
            bulk,
            pool: {
                let mut pool = vec![0u8; 256 * 1024];
                rng.fill(&mut pool);
                Bytes::from(pool)
            },
            ctx: Ctx {
                seed,
                step: 0,
                op: String::new(),
            },
            rng,
        }
    }

    fn advance(&mut self) {
        self.now += match self.rng.u8(0..20) {
            0..=7 => 0,
            8..=13 => self.rng.u64(1..100),
            14..=18 => self.rng.u64(100..3_000),
            _ => self.rng.u64(3_000..30_000),
        };
    }

    fn step(&mut self) {
        self.advance();
        match self.rng.u32(0..100) {
            0..=15 => self.enqueue(MAIN),
            16..=17 => self.enqueue(DLQ),
            18..=35 => self.lease(MAIN),
            36..=41 => self.lease(DLQ),
            42..=55 => self.ack(),
            56..=63 => self.nack(),
            64..=68 => self.extend(),
            69..=71 => self.cancel(),
            72..=73 => self.delete(),
            74 => self.purge(),
            75..=81 => self.tick(),
            82..=85 => self.inspect(),
            86..=88 => self.redrive(),
            89..=91 => self.set_policy(),
            92 => self.pause(),
            _ => self.stale_ops(),
        }
        self.route_dead_letters();
        self.check_expired();
    }

    fn check(&self, payloads: bool) {
        for k in [MAIN, DLQ] {
            self.queues[k].check(&self.ctx, &self.models[k], self.now, payloads);
        }
    }

    fn random_job(&mut self) -> NewJob {
        let rng = &mut self.rng;
        let mut headers = Headers::new();
        if rng.u8(0..5) == 0 {
            for _ in 0..rng.usize(1..4) {
                headers.insert(format!("h{}", rng.u8(0..5)), format!("v{}", rng.u32(..)));
            }
            if rng.u8(0..4) == 0 {
                // Broker-prefixed headers (refused at the service's edge, possible here)
                // are stripped by a redrive too.
                headers.insert("x-sluice-custom".into(), "mine".into());
            }
        }
        NewJob {
            payload: random_payload(rng, &self.pool),
            headers,
            kind: KINDS[rng.usize(0..KINDS.len())].into(),
            priority: rng.u8(0..=MAX_PRIORITY),
            run_at: match rng.u8(0..10) {
                0..=1 => Some(self.now + rng.u64(0..20_000)),
                2 => Some(self.now.saturating_sub(rng.u64(0..1_000))),
                _ => None,
            },
            max_attempts: (rng.u8(0..4) == 0).then(|| rng.u32(1..5)),
            idempotency_key: (rng.u8(0..5) == 0).then(|| format!("idem-{}", rng.u8(0..6))),
            ordering_key: (rng.u8(0..10) < 3)
                .then(|| ORDERING_KEYS[rng.usize(0..ORDERING_KEYS.len())].into()),
        }
    }

    fn enqueue(&mut self, k: usize) {
        let n = if self.bulk && self.rng.bool() {
            self.rng.usize(30..120)
        } else if self.rng.u8(0..10) == 0 {
            self.rng.usize(8..30)
        } else {
            self.rng.usize(1..6)
        };
        let mut jobs: Vec<NewJob> = (0..n).map(|_| self.random_job()).collect();
        if k == DLQ {
            // Jobs put into a dead-letter queue by hand, some with a header naming an
            // original queue: they have no recorded origin, so a redrive never moves them.
            for j in &mut jobs {
                if self.rng.bool() {
                    j.headers
                        .insert(HEADER_ORIGINAL_QUEUE.into(), NAMES[MAIN].into());
                    // Not with an ordering key: see
                    // `redriving_the_first_job_of_an_ordering_key_keeps_the_next_one_pending`.
                    j.ordering_key = None;
                }
            }
        }
        self.ctx.op = format!("enqueue {n} jobs into {} at {}", NAMES[k], self.now);
        let now = self.now;
        let got = self.queues[k].enqueue(now, jobs.clone());
        let m = &mut self.models[k];
        let ctx = &self.ctx;
        m.prune_dedup(now);
        // The spec: new = keys neither remembered nor repeated in the batch.
        let mut batch_keys: BTreeMap<String, Option<Uuid>> = BTreeMap::new();
        let mut new = 0u64;
        for j in &jobs {
            match &j.idempotency_key {
                Some(k) if m.dedup.iter().any(|(key, _, _)| key == k) => {}
                Some(k) if batch_keys.contains_key(k) => {}
                Some(k) => {
                    batch_keys.insert(k.clone(), None);
                    new += 1;
                }
                None => new += 1,
            }
        }
        if m.live.len() as u64 + new > m.policy.max_depth {
            ensure!(
                ctx,
                matches!(got, Err(BrokerError::ResourceExhausted(_))),
                "a full queue must refuse the batch, got {got:?}"
            );
            return;
        }
        let got = match got {
            Ok(got) => got,
            Err(e) => panic!("seed {} step {}: enqueue refused: {e}", ctx.seed, ctx.step),
        };
        ensure_eq!(ctx, got.len(), jobs.len(), "enqueue outcomes");
        for (j, out) in jobs.into_iter().zip(got) {
            let remembered = j.idempotency_key.as_ref().and_then(|k| {
                m.dedup
                    .iter()
                    .find(|(key, _, _)| key == k)
                    .map(|(_, id, _)| *id)
                    .or_else(|| batch_keys.get(k).copied().flatten())
            });
            if let Some(id) = remembered {
                ensure_eq!(
                    ctx,
                    out,
                    Enqueued {
                        id,
                        duplicate: true
                    },
                    "duplicate enqueue"
                );
                continue;
            }
            ensure!(
                ctx,
                !out.duplicate,
                "a new job with key {:?} reported as a duplicate; model dedup {:?}",
                j.idempotency_key,
                m.dedup
            );
            ensure_eq!(ctx, out.id.get_version_num(), 7, "id version");
            ensure!(ctx, m.find(&out.id).is_none(), "id {} given twice", out.id);
            if let Some(k) = &j.idempotency_key {
                batch_keys.insert(k.clone(), Some(out.id));
                m.dedup.retain(|(key, _, _)| key != k);
                m.dedup
                    .push((k.clone(), out.id, now + m.policy.dedup_window_ms));
            }
            let seq = m.next_seq;
            m.next_seq += 1;
            let mut job = MJob {
                id: out.id,
                seq,
                foreign: false,
                kind: j.kind,
                payload: j.payload,
                headers: j.headers,
                priority: j.priority,
                attempts: 0,
                max_attempts: clamp_max_attempts(j.max_attempts.unwrap_or(m.policy.max_attempts)),
                idempotency_key: j.idempotency_key,
                ordering_key: j.ordering_key,
                state: JobState::Pending,
                enqueued_at: now,
                run_at: j.run_at.unwrap_or(now).max(now),
                finished_at: None,
                lease: None,
                last_nonce: 0,
                last_consumer: None,
                last_error: None,
                result: None,
                dead_letter_queue: None,
                origin: None,
            };
            if !m.is_blocked(&job) {
                Model::place(&mut job, now);
            }
            m.live.insert(seq, job);
        }
        m.enqueued += new;
    }

    fn lease(&mut self, k: usize) {
        let max = match self.rng.u8(0..20) {
            0 => 0,
            1 => self.rng.usize(20..100),
            2..=6 if self.bulk => self.rng.usize(50..200),
            _ => self.rng.usize(1..5),
        };
        let visibility = match self.rng.u8(0..4) {
            0 => self.rng.u64(1..50),
            1 => self.rng.u64(50..2_000),
            _ => self.rng.u64(2_000..20_000),
        };
        let consumer: Arc<str> = Arc::from(CONSUMERS[self.rng.usize(0..CONSUMERS.len())]);
        // The Redis store leases at least one job per call.
        let max = if Q::IN_PROCESS { max } else { max.max(1) };
        let now = self.now;
        self.ctx.op = format!("lease {max} from {} for {visibility} ms at {now}", NAMES[k]);
        let got = self.queues[k].lease(now, max, visibility, &consumer, "127.0.0.1:1");
        let m = &mut self.models[k];
        let ctx = &self.ctx;
        m.tick(now, |due| self.queues[k].order_expired(due));
        m.consumers.entry(consumer.to_string()).or_default();
        let expected: Vec<u64> = if m.paused {
            Vec::new()
        } else {
            let room = m.in_flight_room();
            m.visible().into_iter().take(max.min(room)).collect()
        };
        ensure_eq!(
            ctx,
            got.iter().map(|d| d.lease_id.seq).collect::<Vec<_>>(),
            expected,
            "leased seqs (priority desc, then seq)"
        );
        let mut keys = HashSet::new();
        for d in &got {
            ensure!(
                ctx,
                !self.acked.contains(&d.job_id),
                "acked job {} delivered again",
                d.job_id
            );
            if let Some(key) = &d.ordering_key {
                ensure!(
                    ctx,
                    keys.insert(key.clone()),
                    "ordering key {key} leased twice"
                );
                let other = m
                    .live
                    .values()
                    .any(|j| j.ordering_key.as_deref() == Some(key) && j.lease.is_some());
                ensure!(ctx, !other, "ordering key {key} leased while leased");
            }
            let j = m.live.get_mut(&d.lease_id.seq).unwrap();
            j.attempts += 1;
            j.state = JobState::Leased;
            j.lease = Some(MLease {
                nonce: d.lease_id.nonce,
                deadline: now + visibility,
                leased_at: now,
                consumer: consumer.clone(),
            });
            ensure_eq!(ctx, d.deadline, now + visibility, "delivery deadline");
            compare_delivery(ctx, d, j, NAMES[k]);
            m.consumers.get_mut(&*consumer).unwrap().held += 1;
            self.leases.push((k, d.lease_id.clone()));
        }
        if self.leases.len() > 200 {
            self.leases.drain(..100);
        }
    }

    /// A lease to settle: mostly a recent one, sometimes an old or a forged one.
    fn pick_lease(&mut self) -> Option<(usize, LeaseId)> {
        if self.leases.is_empty() {
            return None;
        }
        let n = self.leases.len();
        let i = match self.rng.u8(0..10) {
            0..=5 => n - 1 - self.rng.usize(0..n.min(8)),
            _ => self.rng.usize(0..n),
        };
        let (k, mut lease) = self.leases[i].clone();
        if self.rng.u8(0..20) == 0 {
            lease.nonce = self.rng.u64(1..);
        }
        Some((k, lease))
    }

    fn ack(&mut self) {
        if self.bulk && self.rng.u8(0..4) == 0 {
            // A worker settling the latest deliveries, heartbeating some on the way.
            let n = self.rng.usize(0..=self.leases.len());
            let batch: Vec<(usize, LeaseId)> = self.leases[self.leases.len() - n..].to_vec();
            for (k, lease) in batch {
                match self.rng.u8(0..10) {
                    0..=7 => self.ack_lease(k, lease),
                    8 => self.extend_lease(k, lease),
                    _ => {}
                }
            }
            return;
        }
        let Some((k, lease)) = self.pick_lease() else {
            return;
        };
        self.ack_lease(k, lease);
    }

    fn ack_lease(&mut self, k: usize, lease: LeaseId) {
        let now = self.now;
        let result = self
            .rng
            .bool()
            .then(|| Bytes::from(format!("r{}", self.rng.u32(..))));
        self.ctx.op = format!("ack {lease} at {now}");
        let got = self.queues[k].ack(now, &lease, result.clone());
        let m = &mut self.models[k];
        let ctx = &self.ctx;
        match m.check_lease(now, &lease) {
            MLeaseCheck::Live => {
                let mut j = m.live.remove(&lease.seq).unwrap();
                let ended = m.end_lease(&mut j).unwrap();
                // Only the in-process queue says how long the lease was held.
                let held = Q::IN_PROCESS.then(|| now - ended.leased_at);
                ensure_eq!(ctx, got, Ok(held), "ack of a live lease");
                m.consumers.get_mut(&*ended.consumer).unwrap().done += 1;
                m.completed += 1;
                j.result = result;
                self.acked.insert(j.id);
                m.live.insert(lease.seq, j);
                m.finish(lease.seq, now, JobState::Completed, Some(ended));
            }
            MLeaseCheck::AlreadyAcked => ensure_eq!(ctx, got, Ok(None), "repeat ack"),
            MLeaseCheck::Stale => {
                ensure!(ctx, is_failed_precondition(&got), "stale ack: {got:?}")
            }
        }
    }

    fn nack(&mut self) {
        let Some((k, lease)) = self.pick_lease() else {
            return;
        };
        let now = self.now;
        let delay = self.rng.bool().then(|| self.rng.u64(0..3_000));
        let dead = self.rng.u8(0..10) == 0;
        let error = format!("error {}", self.rng.u32(..));
        self.ctx.op = format!("nack {lease} delay {delay:?} dead {dead} at {now}");
        let got = self.queues[k].nack(now, &lease, error.clone(), delay, dead);
        let m = &mut self.models[k];
        let ctx = &self.ctx;
        match m.check_lease(now, &lease) {
            MLeaseCheck::Live => {
                let expected = m.fail(lease.seq, now, error, delay, dead);
                ensure_eq!(ctx, got, Ok(expected), "nack");
            }
            _ => ensure!(ctx, is_failed_precondition(&got), "stale nack: {got:?}"),
        }
    }

    fn extend(&mut self) {
        let Some((k, lease)) = self.pick_lease() else {
            return;
        };
        self.extend_lease(k, lease);
    }

    fn extend_lease(&mut self, k: usize, lease: LeaseId) {
        let now = self.now;
        let current = self.models[k]
            .live
            .get(&lease.seq)
            .and_then(|j| j.lease.as_ref())
            .map(|l| l.deadline);
        let visibility = match current {
            // Sometimes to the deadline it has already.
            Some(d) if d > now && self.rng.u8(0..3) == 0 => d - now,
            _ => self.rng.u64(1..10_000),
        };
        self.ctx.op = format!("extend {lease} by {visibility} at {now}");
        let got = self.queues[k].extend(now, &lease, visibility);
        let m = &mut self.models[k];
        let ctx = &self.ctx;
        match m.check_lease(now, &lease) {
            MLeaseCheck::Live => {
                ensure_eq!(ctx, got, Ok(now + visibility), "extend");
                let l = m.live.get_mut(&lease.seq).unwrap().lease.as_mut().unwrap();
                l.deadline = now + visibility;
            }
            _ => ensure!(ctx, is_failed_precondition(&got), "stale extend: {got:?}"),
        }
    }

    /// Settles the same stale or repeated lease every way at once: nothing may change.
    fn stale_ops(&mut self) {
        let Some((k, lease)) = self.pick_lease() else {
            return;
        };
        let now = self.now;
        self.ctx.op = format!("stale checks of {lease} at {now}");
        let m = &self.models[k];
        let check = m.check_lease(now, &lease);
        let q = &mut self.queues[k];
        let ctx = &self.ctx;
        match check {
            MLeaseCheck::Live => {
                if let Some(got) = q.check_lease(now, &lease) {
                    ensure_eq!(ctx, got, Ok(LeaseCheck::Live), "live lease");
                }
            }
            MLeaseCheck::AlreadyAcked => {
                if let Some(got) = q.check_lease(now, &lease) {
                    ensure_eq!(ctx, got, Ok(LeaseCheck::AlreadyAcked), "acked lease");
                }
                ensure_eq!(ctx, q.ack(now, &lease, None), Ok(None), "repeat ack");
                let nack = q.nack(now, &lease, "late".into(), None, true);
                ensure!(
                    ctx,
                    is_failed_precondition(&nack),
                    "nack after ack: {nack:?}"
                );
                let extend = q.extend(now, &lease, 1_000);
                ensure!(
                    ctx,
                    is_failed_precondition(&extend),
                    "extend after ack: {extend:?}"
                );
            }
            MLeaseCheck::Stale => {
                if let Some(c) = q.check_lease(now, &lease) {
                    ensure!(ctx, is_failed_precondition(&c), "stale check: {c:?}");
                }
                let ack = q.ack(now, &lease, None);
                ensure!(ctx, is_failed_precondition(&ack), "stale ack: {ack:?}");
                let nack = q.nack(now, &lease, "late".into(), Some(0), true);
                ensure!(ctx, is_failed_precondition(&nack), "stale nack: {nack:?}");
                let extend = q.extend(now, &lease, 1_000);
                ensure!(
                    ctx,
                    is_failed_precondition(&extend),
                    "stale extend: {extend:?}"
                );
            }
        }
    }

    /// An id to look up: a job of either queue (live or finished) or an unknown one.
    fn pick_id(&mut self) -> Uuid {
        let k = if self.rng.u8(0..4) == 0 { DLQ } else { MAIN };
        let m = &self.models[k];
        let n = m.live.len() + m.history.len();
        if n == 0 || self.rng.u8(0..10) == 0 {
            return Uuid::from_u128(self.rng.u128(..));
        }
        let i = self.rng.usize(0..n);
        match m.live.values().nth(i) {
            Some(j) => j.id,
            None => m.history[i - m.live.len()].id,
        }
    }

    fn cancel(&mut self) {
        let k = if self.rng.u8(0..5) == 0 { DLQ } else { MAIN };
        let id = self.pick_id();
        let now = self.now;
        self.ctx.op = format!("cancel {id} in {} at {now}", NAMES[k]);
        let got = self.queues[k].cancel(now, &id);
        let m = &mut self.models[k];
        if !Q::IN_PROCESS {
            // The Redis store expires due leases and fires due timers first.
            m.tick(now, |due| self.queues[k].order_expired(due));
        }
        let ctx = &self.ctx;
        let live = m.live.values().find(|j| j.id == id).map(|j| j.seq);
        match live {
            Some(seq) if m.live[&seq].lease.is_some() => {
                ensure!(
                    ctx,
                    is_failed_precondition(&got),
                    "cancel of a leased job: {got:?}"
                )
            }
            Some(seq) => {
                m.cancelled += 1;
                let mut expected = m.live[&seq].clone();
                m.finish(seq, now, JobState::Cancelled, None);
                expected.state = JobState::Cancelled;
                expected.finished_at = Some(now);
                match got {
                    Ok(job) => compare_job(ctx, &job, &expected, true),
                    Err(e) => panic!("seed {} step {}: cancel failed: {e}", ctx.seed, ctx.step),
                }
            }
            None if m.find(&id).is_some() => {
                ensure!(
                    ctx,
                    is_failed_precondition(&got),
                    "cancel of a finished job: {got:?}"
                )
            }
            None => ensure!(
                ctx,
                matches!(got, Err(BrokerError::NotFound(_))),
                "cancel of an unknown job: {got:?}"
            ),
        }
    }

    fn delete(&mut self) {
        let k = if self.rng.u8(0..5) == 0 { DLQ } else { MAIN };
        let id = self.pick_id();
        let now = self.now;
        self.ctx.op = format!("delete {id} in {} at {now}", NAMES[k]);
        let got = self.queues[k].delete(now, &id);
        let m = &mut self.models[k];
        if !Q::IN_PROCESS {
            // The Redis store expires due leases and fires due timers first.
            m.tick(now, |due| self.queues[k].order_expired(due));
        }
        let ctx = &self.ctx;
        match m.find(&id).cloned() {
            Some(expected) => {
                m.forget(&id, now);
                match got {
                    Ok(job) => compare_job(ctx, &job, &expected, true),
                    Err(e) => panic!("seed {} step {}: delete failed: {e}", ctx.seed, ctx.step),
                }
            }
            None => ensure!(
                ctx,
                matches!(got, Err(BrokerError::NotFound(_))),
                "delete of an unknown job: {got:?}"
            ),
        }
    }

    fn purge(&mut self) {
        let k = if self.rng.u8(0..4) == 0 { DLQ } else { MAIN };
        let now = self.now;
        self.ctx.op = format!("purge {} at {now}", NAMES[k]);
        let got = self.queues[k].purge(now);
        let m = &mut self.models[k];
        if !Q::IN_PROCESS {
            // The Redis store expires due leases and fires due timers first.
            m.tick(now, |due| self.queues[k].order_expired(due));
        }
        let victims: Vec<(u64, Uuid)> = m
            .live
            .values()
            .filter(|j| j.lease.is_none())
            .map(|j| (j.seq, j.id))
            .collect();
        for (seq, _) in &victims {
            m.cancelled += 1;
            m.finish(*seq, now, JobState::Cancelled, None);
        }
        let expected: Vec<Uuid> = victims.into_iter().map(|(_, id)| id).collect();
        match got {
            Purged::Ids(got) => ensure_eq!(self.ctx, got, expected, "purged ids"),
            Purged::Count(n) => ensure_eq!(self.ctx, n, expected.len() as u64, "purged"),
        }
    }

    fn tick(&mut self) {
        let k = if self.rng.u8(0..4) == 0 { DLQ } else { MAIN };
        let now = self.now;
        self.ctx.op = format!("tick {} at {now}", NAMES[k]);
        self.queues[k].tick(now);
        self.models[k].tick(now, |due| self.queues[k].order_expired(due));
    }

    fn inspect(&mut self) {
        let k = if self.rng.u8(0..4) == 0 { DLQ } else { MAIN };
        let ctx = &mut self.ctx;
        match self.rng.u8(0..3) {
            0 => {
                let id = {
                    let m = &self.models[k];
                    let n = m.live.len() + m.history.len();
                    if n == 0 {
                        Uuid::from_u128(self.rng.u128(..))
                    } else {
                        let i = self.rng.usize(0..n);
                        m.live
                            .values()
                            .chain(m.history.iter())
                            .nth(i)
                            .map(|j| j.id)
                            .unwrap()
                    }
                };
                ctx.op = format!("get {id} from {}", NAMES[k]);
                let got = self.queues[k].get(&id);
                match self.models[k].find(&id) {
                    Some(mj) => {
                        ensure!(ctx, got.is_some(), "get found nothing");
                        compare_job(ctx, &got.unwrap(), mj, true);
                    }
                    None => ensure!(ctx, got.is_none(), "get found a job that is gone"),
                }
            }
            1 => {
                let states = [
                    None,
                    Some(JobState::Pending),
                    Some(JobState::Scheduled),
                    Some(JobState::Leased),
                    Some(JobState::Retrying),
                    Some(JobState::Completed),
                    Some(JobState::Dead),
                    Some(JobState::Cancelled),
                ];
                let state = states[self.rng.usize(0..states.len())];
                let after = self.rng.u64(0..self.models[k].next_seq + 1);
                let limit = self.rng.usize(1..6);
                ctx.op = format!("list {state:?} after {after} limit {limit} in {}", NAMES[k]);
                let (page, next) = self.queues[k].list(state, after, limit);
                let m = &self.models[k];
                let matching: Vec<&MJob> = match state {
                    Some(s) if s.is_finished() => {
                        let mut v: Vec<&MJob> = m.history.iter().filter(|j| j.state == s).collect();
                        v.sort_by_key(|j| j.seq);
                        v
                    }
                    _ => m
                        .live
                        .values()
                        .filter(|j| state.is_none_or(|s| j.state == s))
                        .collect(),
                };
                let matching: Vec<&MJob> = matching.into_iter().filter(|j| j.seq > after).collect();
                let expected: Vec<&MJob> = matching.iter().take(limit).copied().collect();
                ensure_eq!(ctx, page.len(), expected.len(), "list page length");
                for (qj, mj) in page.iter().zip(&expected) {
                    compare_job(ctx, qj, mj, true);
                }
                let expected_next = (matching.len() > limit).then(|| expected[limit - 1].seq);
                ensure_eq!(ctx, next, expected_next, "list next");
            }
            _ => {
                let limit = self.rng.usize(0..10);
                ctx.op = format!("history {limit} of {}", NAMES[k]);
                let got = self.queues[k].history(limit);
                let m = &self.models[k];
                let expected: Vec<&MJob> = m.history.iter().rev().take(limit).collect();
                ensure_eq!(ctx, got.len(), expected.len(), "history length");
                for (qj, mj) in got.iter().zip(&expected) {
                    compare_job(ctx, qj, mj, true);
                }
            }
        }
    }

    fn redrive(&mut self) {
        let now = self.now;
        let (ids, max): (Vec<Uuid>, usize) = if self.rng.bool() {
            (Vec::new(), self.rng.usize(0..6))
        } else {
            let n = self.rng.usize(1..5);
            let mut ids = Vec::new();
            for _ in 0..n {
                let m = &self.models[DLQ];
                let id = if !m.live.is_empty() && self.rng.u8(0..4) != 0 {
                    m.live
                        .values()
                        .nth(self.rng.usize(0..m.live.len()))
                        .unwrap()
                        .id
                } else if !ids.is_empty() && self.rng.bool() {
                    // The same id twice in one request.
                    ids[self.rng.usize(0..ids.len())]
                } else {
                    self.pick_id()
                };
                ids.push(id);
            }
            (ids, 1_000)
        };
        // Now and then the caller may not write into the origin: nothing is moved then.
        let allowed = self.rng.u8(0..8) != 0;
        self.ctx.op = format!("redrive {ids:?} max {max} at {now} (allowed: {allowed})");
        let [main, dlq] = &mut self.queues;
        let Some((moved, skipped)) = dlq.redrive(main, now, &ids, max, allowed) else {
            // Not in this engine (yet): nothing moves.
            return;
        };

        // The model: movable = live, not leased, dead-lettered by the broker (a recorded
        // origin, whatever the headers say), into an allowed queue.
        let m = &mut self.models[DLQ];
        let movable = |j: &MJob| j.lease.is_none() && j.origin.is_some() && allowed;
        let mut expected_skipped = Vec::new();
        let seqs: Vec<u64> = if ids.is_empty() {
            m.live
                .values()
                .filter(|j| movable(j))
                .take(max)
                .map(|j| j.seq)
                .collect()
        } else {
            let mut seqs = Vec::new();
            for id in &ids {
                match m.live.values().find(|j| j.id == *id) {
                    // A repeated id was moved already: it is skipped like any id that
                    // is no longer here.
                    Some(j) if movable(j) && !seqs.contains(&j.seq) => seqs.push(j.seq),
                    _ => expected_skipped.push(*id),
                }
            }
            seqs
        };
        let ctx = &self.ctx;
        ensure_eq!(ctx, skipped, expected_skipped, "redrive skipped ids");
        ensure_eq!(ctx, moved.len(), seqs.len(), "redriven jobs");
        for (r, seq) in moved.iter().zip(&seqs) {
            let j = m.live.remove(seq).unwrap();
            ensure_eq!(ctx, r.job_id, j.id, "redriven id");
            ensure_eq!(ctx, Some(&r.target), j.origin.as_ref(), "redrive target");
            ensure_eq!(ctx, r.kind, j.kind, "redriven kind");
            ensure_eq!(ctx, r.priority, j.priority, "redriven priority");
            ensure!(ctx, r.payload == j.payload, "redriven payload differs");
            let headers: Headers = j
                .headers
                .iter()
                .filter(|(k, _)| !k.starts_with(BROKER_HEADER_PREFIX))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            ensure_eq!(ctx, r.headers, headers, "redriven headers");
        }
        for r in moved {
            assert_eq!(r.target, NAMES[MAIN]);
            self.models[MAIN].insert_with_id(
                now,
                r.job_id,
                r.kind.clone(),
                r.payload.clone(),
                r.headers.clone(),
                r.priority,
                None,
            );
        }
    }

    fn set_policy(&mut self) {
        let k = if self.rng.u8(0..3) == 0 { DLQ } else { MAIN };
        let mut p = self.models[k].policy.clone();
        match self.rng.u8(0..5) {
            0 => p.history_limit = [0, 1, 3, 10, 40][self.rng.usize(0..5)],
            1 => p.max_attempts = self.rng.u32(1..5),
            2 => p.backoff = random_backoff(&mut self.rng),
            3 => p.dedup_window_ms = [0, 1, 1_000, 20_000][self.rng.usize(0..4)],
            _ if k == MAIN => p = random_policy(&mut self.rng, NAMES[MAIN], self.bulk),
            _ => p.history_limit = self.rng.u32(0..5),
        }
        self.ctx.op = format!("set policy of {}: {p:?}", NAMES[k]);
        QueueUnderTest::set_policy(&mut self.queues[k], p.clone());
        self.models[k].policy = p;
        self.models[k].trim();
    }

    fn pause(&mut self) {
        let k = if self.rng.u8(0..3) == 0 { DLQ } else { MAIN };
        let paused = !self.models[k].paused;
        self.ctx.op = format!("pause {}: {paused}", NAMES[k]);
        QueueUnderTest::set_paused(&mut self.queues[k], paused);
        self.models[k].paused = paused;
    }

    /// Moves dead letters of `jobs` into `jobs.dlq`, as the broker does after each call.
    fn route_dead_letters(&mut self) {
        let now = self.now;
        let ctx = &self.ctx;
        let [main, dlq] = &mut self.queues;
        let none = match dlq.route_dead_letters(main, now) {
            Routed::Letters(letters) => letters.is_empty(),
            Routed::Moved(n) => n == 0,
        };
        ensure!(
            ctx,
            none,
            "a queue without a dead-letter queue made dead letters"
        );
        ensure!(ctx, self.models[DLQ].outbox.is_empty(), "model DLQ outbox");
        let letters = match main.route_dead_letters(dlq, now) {
            Routed::Letters(letters) => letters,
            Routed::Moved(n) => {
                self.moved_dead_letters(n);
                return;
            }
        };
        let mut expected = std::mem::take(&mut self.models[MAIN].outbox);
        // Leases expiring together die in an order the spec leaves open.
        let mut got: Vec<&DeadLetter> = letters.iter().collect();
        got.sort_by_key(|l| l.job_id);
        expected.sort_by_key(|l| l.job_id);
        ensure_eq!(ctx, got.len(), expected.len(), "dead letters");
        for (l, e) in got.iter().zip(&expected) {
            ensure_eq!(ctx, l.target, e.target, "dead letter target");
            ensure_eq!(ctx, l.origin, e.origin, "dead letter origin");
            ensure_eq!(ctx, l.job_id, e.job_id, "dead letter id");
            ensure_eq!(ctx, l.kind, e.kind, "dead letter kind");
            ensure_eq!(ctx, l.headers, e.headers, "dead letter headers");
            ensure_eq!(ctx, l.priority, e.priority, "dead letter priority");
            ensure!(ctx, l.payload == e.payload, "dead letter payload differs");
        }
        for letter in letters {
            assert_eq!(letter.target, NAMES[DLQ]);
            self.models[DLQ].enqueued += 1;
            self.models[DLQ].insert_with_id(
                now,
                letter.job_id,
                letter.kind.clone(),
                letter.payload.clone(),
                letter.headers.clone(),
                letter.priority,
                Some(letter.origin.clone()),
            );
        }
    }

    /// An engine moved `n` dead letters by itself (in the order they died): each must be
    /// in the dead-letter queue as the model expects it, headers and payload included.
    fn moved_dead_letters(&mut self, n: u64) {
        let now = self.now;
        let expected = std::mem::take(&mut self.models[MAIN].outbox);
        ensure_eq!(self.ctx, n, expected.len() as u64, "dead letters moved");
        for letter in expected {
            assert_eq!(letter.target, NAMES[DLQ]);
            let id = letter.job_id;
            let m = &mut self.models[DLQ];
            m.enqueued += 1;
            m.insert_with_id(
                now,
                id,
                letter.kind,
                letter.payload,
                letter.headers,
                letter.priority,
                Some(letter.origin),
            );
            let got = self.queues[DLQ].get(&id);
            let ctx = &self.ctx;
            ensure!(
                ctx,
                got.is_some(),
                "dead letter {id} is not in {}",
                NAMES[DLQ]
            );
            let m = &self.models[DLQ];
            let mj = m.live.values().find(|j| j.id == id).unwrap();
            compare_job(ctx, &got.unwrap(), mj, true);
        }
    }

    fn check_expired(&mut self) {
        for k in [MAIN, DLQ] {
            let mut expected = std::mem::take(&mut self.models[k].expired);
            let Some(mut got) = self.queues[k].take_expired() else {
                continue;
            };
            got.sort_unstable();
            expected.sort_unstable();
            ensure_eq!(self.ctx, got, expected, "{}: expired leases", NAMES[k]);
        }
    }

    /// Runs everything to completion, then checks that no storage is left behind.
    fn drain(&mut self) {
        self.ctx.op = "drain".into();
        for k in [MAIN, DLQ] {
            QueueUnderTest::set_paused(&mut self.queues[k], false);
            self.models[k].paused = false;
        }
        let consumer: Arc<str> = Arc::from("drainer");
        for round in 0.. {
            assert!(round < 1_000, "seed {}: drain does not end", self.ctx.seed);
            if self.queues.iter().all(|q| q.live_jobs() == 0) {
                break;
            }
            self.now += 60_000;
            let now = self.now;
            for k in [MAIN, DLQ] {
                self.ctx.op = format!("drain round {round}: lease all of {}", NAMES[k]);
                let got = self.queues[k].lease(now, usize::MAX, 1_000, &consumer, "d");
                let m = &mut self.models[k];
                m.tick(now, |due| self.queues[k].order_expired(due));
                m.consumers.entry(consumer.to_string()).or_default();
                let room = m.in_flight_room();
                let expected: Vec<u64> = m.visible().into_iter().take(room).collect();
                ensure_eq!(
                    self.ctx,
                    got.iter().map(|d| d.lease_id.seq).collect::<Vec<_>>(),
                    expected,
                    "drain lease order"
                );
                for d in &got {
                    let mut j = m.live.remove(&d.lease_id.seq).unwrap();
                    j.attempts += 1;
                    compare_delivery(&self.ctx, d, &j, NAMES[k]);
                    ensure!(
                        self.ctx,
                        !self.acked.contains(&d.job_id),
                        "acked job delivered again"
                    );
                    ensure_eq!(
                        self.ctx,
                        self.queues[k].ack(now, &d.lease_id, None),
                        Ok(Q::IN_PROCESS.then_some(0)),
                        "drain ack"
                    );
                    m.completed += 1;
                    m.consumers.get_mut("drainer").unwrap().done += 1;
                    self.acked.insert(j.id);
                    let seq = j.seq;
                    m.live.insert(seq, j);
                    let ended = MLease {
                        nonce: d.lease_id.nonce,
                        deadline: now + 1_000,
                        leased_at: now,
                        consumer: consumer.clone(),
                    };
                    m.finish(seq, now, JobState::Completed, Some(ended));
                }
            }
            self.route_dead_letters();
            self.check_expired();
            self.check(false);
        }
        // Past every dedup window there was (at most the default five minutes): nothing
        // is remembered.
        self.ctx.op = "drain: final checks".into();
        self.now += 300_001;
        for k in [MAIN, DLQ] {
            self.queues[k].tick(self.now);
            let now = self.now;
            self.models[k].tick(now, |due| self.queues[k].order_expired(due));
        }
        self.check(true);
        for q in &mut self.queues {
            q.check_drained(&self.ctx);
        }
    }
}

fn run_seed<Q: QueueUnderTest>(env: &Q::Env, seed: u64, steps: usize) {
    let mut w = World::<Q>::new(seed, env);
    let trace = std::env::var_os("SLUICE_MODEL_TRACE").is_some();
    let result = catch_unwind(AssertUnwindSafe(|| {
        for step in 0..steps {
            w.ctx.step = step;
            w.step();
            if trace {
                eprintln!("step {step}: {}", w.ctx.op);
            }
            w.check(step % Q::FULL_CHECK_EVERY == 0);
        }
        w.ctx.step = steps;
        w.drain();
    }));
    if let Err(panic) = result {
        eprintln!(
            "model test failed: seed {seed} step {} op {:?}; re-run with SLUICE_MODEL_SEED={seed}",
            w.ctx.step, w.ctx.op
        );
        resume_unwind(panic);
    }
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Runs `seeds` seeds from `base` (`SLUICE_MODEL_SEEDS`, `SLUICE_MODEL_FIRST_SEED` and
/// `SLUICE_MODEL_STEPS` override the counts; `SLUICE_MODEL_SEED` runs one seed).
pub(crate) fn run_seeds<Q: QueueUnderTest>(env: &Q::Env, base: u64, seeds: u64, steps: u64) {
    let steps = env_number("SLUICE_MODEL_STEPS").unwrap_or(steps) as usize;
    if let Some(seed) = env_number("SLUICE_MODEL_SEED") {
        if seed >> 32 == base >> 32 {
            run_seed::<Q>(env, seed, steps);
        }
        return;
    }
    let first = env_number("SLUICE_MODEL_FIRST_SEED").unwrap_or(0);
    let seeds = env_number("SLUICE_MODEL_SEEDS").unwrap_or(seeds);
    for i in first..first + seeds {
        run_seed::<Q>(env, base + i, steps);
    }
}

/// Small queues (depth 4-40, history 0-40), so that keys, limits and history evictions
/// collide often.
#[test]
fn queue_matches_the_reference_model() {
    run_seeds::<Queue>(&(), ORDINARY_SEEDS, 64, 500);
}

/// Deep queues and batches of up to 200 jobs.
#[test]
fn queue_matches_the_reference_model_in_bulk() {
    run_seeds::<Queue>(&(), BULK_SEEDS, 6, 500);
}

// ---- regression tests of bugs the model found ------------------------------------------

fn plain_job(payload: &'static str) -> NewJob {
    NewJob {
        payload: Bytes::from_static(payload.as_bytes()),
        kind: "test".into(),
        ..NewJob::default()
    }
}

#[test]
fn with_no_history_kept_jobs_still_die_and_cancel() {
    let mut p = QueuePolicy::default_for("jobs");
    p.history_limit = 0;
    p.max_attempts = 1;
    let mut q = Queue::new("jobs", p);
    let c: Arc<str> = Arc::from("w");
    let ids: Vec<Uuid> = q
        .enqueue(T0, vec![plain_job("a"), plain_job("b"), plain_job("c")])
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    let ds = q.lease(T0, 2, 1_000, &c, "a");
    // Its last attempt fails: it is dead-lettered (this used to panic).
    assert_eq!(
        q.nack(T0, &ds[0].lease_id, "boom".into(), None, false),
        Ok(FailOutcome::Dead)
    );
    let letters = q.take_dead_letters();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].job_id, ids[0]);
    assert_eq!(letters[0].payload.as_ref(), b"a");
    // A lease expiring on its last attempt too.
    q.tick(T0 + 1_000);
    assert_eq!(q.take_dead_letters()[0].job_id, ids[1]);
    // Cancel answers with the record it does not keep (this used to panic too).
    let cancelled = q.cancel(T0 + 1_000, &ids[2]).unwrap();
    assert_eq!(
        (cancelled.id, cancelled.state),
        (ids[2], JobState::Cancelled)
    );
    assert!(q.history(10).is_empty() && q.finished.is_empty());
    assert!(q.get(&ids[2]).is_none());
    let counts = q.counts(T0 + 1_000);
    assert_eq!((counts.dead, counts.cancelled, counts.pending), (2, 1, 0));
}

#[test]
fn idempotency_keys_are_forgotten_after_a_shrunk_dedup_window() {
    let mut q = Queue::new("jobs", QueuePolicy::default_for("jobs"));
    let keyed = |k: &str| NewJob {
        idempotency_key: Some(k.into()),
        ..plain_job("x")
    };
    // Remembered for the default five minutes.
    q.enqueue(T0, vec![keyed("old")]).unwrap();
    let mut p = q.policy().clone();
    p.dedup_window_ms = 1_000;
    q.set_policy(p);
    let first = q.enqueue(T0 + 1, vec![keyed("new")]).unwrap()[0];
    assert!(q.enqueue(T0 + 1_000, vec![keyed("new")]).unwrap()[0].duplicate);
    // Its one-second window is over even though "old" is still remembered.
    let again = q.enqueue(T0 + 1_001, vec![keyed("new")]).unwrap()[0];
    assert!(!again.duplicate, "{again:?}");
    assert_ne!(again.id, first.id);
    assert!(q.enqueue(T0 + 2_000, vec![keyed("old")]).unwrap()[0].duplicate);
    assert!(!q.enqueue(T0 + 300_000, vec![keyed("old")]).unwrap()[0].duplicate);
}

#[test]
fn a_redrive_naming_a_job_twice_moves_it_once() {
    let mut p = QueuePolicy::default_for("jobs");
    p.max_attempts = 1;
    let mut q = Queue::new("jobs", p);
    let mut dlq = Queue::new("jobs.dlq", QueuePolicy::default_for("jobs.dlq"));
    let c: Arc<str> = Arc::from("w");
    q.enqueue(T0, vec![plain_job("a"), plain_job("b")]).unwrap();
    for d in q.lease(T0, 2, 1_000, &c, "a") {
        q.nack(T0, &d.lease_id, "boom".into(), None, false).unwrap();
    }
    let letters = q.take_dead_letters();
    let (a, b) = (letters[0].job_id, letters[1].job_id);
    for letter in letters {
        dlq.insert_dead_letter(T0, letter);
    }
    // Redrive takes ids from the request as given (this used to panic).
    let (moved, skipped) = dlq.take_for_redrive(T0, &[a, b, a], 10, |_| true);
    assert_eq!(moved.iter().map(|r| r.job_id).collect::<Vec<_>>(), [a, b]);
    assert_eq!(skipped, [a]);
    assert_eq!(dlq.live_jobs(), 0);
    for r in moved {
        q.restore(T0 + 1, r);
    }
    assert_eq!(q.live_jobs(), 2);
}

#[test]
fn extending_a_lease_to_its_own_deadline_keeps_the_deadline_index_exact() {
    let mut q = Queue::new("jobs", QueuePolicy::default_for("jobs"));
    let c: Arc<str> = Arc::from("w");
    q.enqueue(T0, (0..100).map(|_| plain_job("x")).collect())
        .unwrap();
    let ds = q.lease(T0, 100, 1_000, &c, "a");
    assert_eq!(ds.len(), 100);
    for d in &ds[..82] {
        q.ack(T0 + 1, &d.lease_id, None).unwrap();
    }
    // To the deadline it has already: the group of T0 + 1_000 is compacted on the way.
    assert_eq!(q.extend(T0 + 1, &ds[82].lease_id, 999), Ok(T0 + 1_000));
    for d in &ds[82..] {
        q.ack(T0 + 2, &d.lease_id, None).unwrap();
    }
    assert!(q.leases.is_empty());
    assert_eq!(q.next_due(), None);
    assert!(q.deadlines.is_empty());
}

/// Regression: redriving the first job of an ordering key released the key at time 0, so
/// the next job of the key turned `scheduled` (changed at 0) instead of `pending` until the
/// next tick. Dead letters carry no ordering key, so only recovered records (a dead letter
/// with an origin and a key) reach it now.
#[test]
fn redriving_the_first_job_of_an_ordering_key_keeps_the_next_one_pending() {
    let mut dlq = Queue::new("jobs.dlq", QueuePolicy::default_for("jobs.dlq"));
    let ids = [Uuid::now_v7(), Uuid::now_v7()];
    for (id, p) in ids.iter().zip(["a", "b"]) {
        let mut j = Job::restored(*id, String::new(), Bytes::from(p), Headers::new());
        j.origin = Some("jobs".into());
        j.ordering_key = Some(Arc::from("K"));
        j.enqueued_at = T0;
        j.run_at = T0;
        j.updated_at = T0;
        dlq.restore_job(T0, j);
    }
    let (moved, _) = dlq.take_for_redrive(T0, &[], 1, |_| true);
    assert_eq!(moved[0].job_id, ids[0]);
    let next = dlq.get(&ids[1]).unwrap();
    assert_eq!(next.state, JobState::Pending);
    assert!(next.updated_at >= T0);
    assert_eq!(dlq.counts(T0).pending, 1);
}
