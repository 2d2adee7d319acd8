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
//!
//! This file holds the `Queue` and its life cycle (enqueue, lease, ack, nack, extend, expiry,
//! cancel, purge). Beside it: [`job`] and [`policy`] (the data a queue keeps and obeys),
//! [`lease_id`], `inspect` (reads: get, list, history, counts), `redrive` (dead letters)
//! and `restore` (replay from the write-ahead log); `slots`, `ready`, `deadlines` and
//! `seq_map` are the storage and indexes.

mod deadlines;
mod inspect;
pub(crate) mod job;
pub(crate) mod lease_id;
pub(crate) mod policy;
mod ready;
mod redrive;
mod restore;
mod seq_map;
mod slots;
mod throttle;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use bytes::Bytes;
use uuid::Uuid;

use crate::broker::domain::dedup::DedupWindow;
use crate::broker::domain::error::BrokerError;
use crate::broker::domain::rate::RateMeter;
use crate::broker::domain::time::Millis;
use deadlines::Deadlines;
use ready::Ready;
use seq_map::SeqMap;
use slots::{IdCodec, Kinds, LiveJob, PayloadRef, Payloads, Slots};
use throttle::Throttle;

use job::NO_HEADERS;
pub use job::*;
pub use lease_id::*;
pub(crate) use policy::*;

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
    /// The policy's `max_in_flight` (0: no limit); `leased` is how much of it is used.
    pub max_in_flight: u32,
    /// The policy's rate limit, jobs a second (0: no limit).
    pub rate_limit_per_second: u32,
    /// The policy's rate limit burst (0: no limit).
    pub rate_limit_burst: u32,
    /// Whole tokens in the rate limit's bucket: jobs it would let out now.
    pub rate_tokens: u64,
    /// Milliseconds since start that the rate limit held visible jobs back from a lease
    /// that asked for them.
    pub rate_limited_ms: u64,
    /// Milliseconds since start that `max_in_flight` held visible jobs back from a lease
    /// that asked for them (until a lease ended).
    pub in_flight_limited_ms: u64,
    /// Made by a Lease or Consume and not named since by anything that puts jobs in it or
    /// sets its policy: most likely a worker's typo (see the README, "Queues").
    pub created_by_consumer: bool,
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
    /// The state of the policy's rate and in-flight limits.
    throttle: Throttle,
    /// Seqs of jobs whose lease expired since the last [`Queue::take_expired`]: the
    /// broker logs their new state (expiry is a state change that must survive a restart).
    expired: Vec<u64>,
    /// Made by a Lease or Consume, and since then nothing has named it on purpose: no job
    /// came in (enqueue, binding, dead letter, redrive) and no policy or pause was set. A
    /// worker whose queue name has a typo waits on such a queue forever, so Stats shows it.
    created_by_consumer: bool,
}

impl Queue {
    /// An empty queue.
    pub fn new(name: &str, policy: QueuePolicy) -> Self {
        Self {
            name: Arc::from(name),
            throttle: Throttle::new(policy.rate_limit),
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
            created_by_consumer: false,
        }
    }

    /// Marks the queue as made by a Lease or Consume (see
    /// [`QueueCounts::created_by_consumer`]).
    pub fn mark_created_by_consumer(&mut self) {
        self.created_by_consumer = true;
    }

    /// Whether only consumers have named the queue so far.
    pub fn is_created_by_consumer(&self) -> bool {
        self.created_by_consumer
    }

    /// Something named the queue on purpose (a job came in, a policy or pause was set):
    /// it is no longer only a consumer's.
    fn named_by_producer(&mut self) {
        self.created_by_consumer = false;
    }

    /// The queue's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The queue's policy.
    pub fn policy(&self) -> &QueuePolicy {
        &self.policy
    }

    /// Replaces the policy. Live jobs keep the attempts they were given; a changed rate
    /// limit starts with a full bucket.
    pub fn set_policy(&mut self, policy: QueuePolicy) {
        let old_rate = std::mem::replace(&mut self.policy, policy).rate_limit;
        self.named_by_producer();
        self.rate_limit_changed(old_rate);
        self.trim_history();
    }

    /// Whether leasing is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Pauses or resumes leasing.
    pub fn set_paused(&mut self, paused: bool) {
        self.named_by_producer();
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

    /// Whether a lease could return a job at `now` (before running `tick`): jobs are
    /// visible and the rate and in-flight limits let one out.
    pub fn has_visible(&self, now: Millis) -> bool {
        !self.paused
            && !self.ready.is_empty()
            && self.lease_room(now).is_none_or(|(room, _)| room > 0)
    }

    /// The earliest time something is due: a scheduled job's run time, a lease deadline,
    /// or the rate limit's next token while it holds visible jobs back (so a waiting
    /// lease wakes when the bucket lets one out).
    pub fn next_due(&self) -> Option<Millis> {
        [
            self.timers.first().map(|(t, _)| *t),
            self.deadlines.first(),
            self.throttle_due(),
        ]
        .into_iter()
        .flatten()
        .min()
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
        self.named_by_producer();
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
        self.refill(now);
        self.ready.len().saturating_sub(before)
    }

    /// Leases up to `max` visible jobs for `visibility_ms`, highest priority first, FIFO
    /// within a priority, and no more than the rate and in-flight limits let out at `now`.
    /// Runs [`Queue::tick`] first, so due work is never missed.
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
        let room = self.lease_room(now);
        let allowed = room.map_or(max, |(n, _)| max.min(n as usize));
        let mut out = Vec::with_capacity(allowed.min(self.ready.len()));
        let deadline = now.saturating_add(visibility_ms);
        while out.len() < allowed {
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
        self.spend(now, out.len() as u64);
        if let Some((_, limit)) = room
            && out.len() == allowed
            && allowed < max
            && !self.ready.is_empty()
        {
            self.note_throttled(now, limit);
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
                "its job no longer exists (finished and evicted from history, or deleted)".into(),
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

    /// Ends the live lease of `seq` at `now`, returning it.
    fn end_lease(&mut self, seq: u64, now: Millis) -> Option<Lease> {
        let lease = self.leases.remove(&seq)?;
        self.note_lease_ended(now);
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
        let ended = self.end_lease(seq, now)?;
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
        let ended = self.end_lease(seq, now);
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

    /// Deletes the record of job `id`, whatever its state; returns it as it was. A live job
    /// is never delivered (again): a lease on it becomes stale, and if it held its ordering
    /// key the next job of the key becomes visible. A finished one leaves history. Unlike
    /// a cancel nothing is counted (the record is gone, not finished), and an idempotency
    /// key stays remembered for its window: a repeat enqueue is still a duplicate.
    pub fn delete(&mut self, now: Millis, id: &Uuid) -> Result<Job, BrokerError> {
        let seq = self.seq_of(id).ok_or_else(|| {
            BrokerError::NotFound(format!("job_id {id} not found in queue {:?}", self.name))
        })?;
        let job = self.job_by_seq(seq).expect("a job with a seq has a record");
        self.forget(seq, now);
        Ok(job)
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

    /// Seqs of jobs whose lease expired since the last call (see [`Queue::job_by_seq`]).
    pub fn take_expired(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.expired)
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
        let was_leased = self.end_lease(seq, now).is_some();
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
}

/// Attempts as a slot stores them: at most [`MAX_ATTEMPTS`].
fn clamp_attempts(n: u32) -> u16 {
    n.clamp(1, MAX_ATTEMPTS) as u16
}

#[cfg(test)]
pub(crate) mod model_tests;
#[cfg(test)]
mod tests;
